//! Crash safety: SIGKILL the service while it processes a stream of commands, start it again,
//! and compare the event store with the reference model of the domain.

use std::time::{Duration, Instant};

use rand_like::Lcg;
use shared::Command;

use crate::helpers::*;

/// A tiny deterministic generator (no extra dependency needed for test data).
mod rand_like {
    pub struct Lcg(pub u64);
    impl Lcg {
        pub fn next(&mut self, n: u64) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (self.0 >> 33) % n
        }
    }
}

/// A realistic stream: opens first, then deposits, withdrawals (some too large), closes, and a
/// few retried command ids.
pub fn workload(accounts: usize, ops: usize, seed: u64) -> Vec<shared::CommandMessage> {
    let mut rng = Lcg(seed);
    let mut out: Vec<shared::CommandMessage> = (0..accounts)
        .map(|i| open(&format!("acc-{i}"), &format!("Owner {i}"), 1000))
        .collect();
    for _ in 0..ops {
        let id = format!("acc-{}", rng.next(accounts as u64));
        let command = match rng.next(10) {
            0..=4 => Command::Deposit {
                amount_minor: 1 + rng.next(5000) as i64,
                currency: None,
            },
            5..=8 => Command::Withdraw {
                amount_minor: 1 + rng.next(4000) as i64,
                currency: None,
            },
            _ => Command::CloseAccount,
        };
        if rng.next(20) == 0 && !out.is_empty() {
            // a client retry: same command id again
            let again = out[rng.next(out.len() as u64) as usize].clone();
            out.push(again);
        }
        out.push(cmd(&id, command));
    }
    out
}

#[tokio::test]
async fn sigkill_while_processing_loses_nothing_and_duplicates_nothing() {
    let settings = shared::testing::test_settings(3);
    let service = ServiceProcess::start(&settings, "crash-a", 25);
    service.wait_ready().await;
    let producer = producer(&settings);
    let commands = workload(40, 3000, 7);
    let total = commands.len();

    // Stream every command into Kafka while the service is killed and restarted twice.
    let mut service = Some(service);
    let mut kills = 0;
    for (i, c) in commands.iter().enumerate() {
        produce_raw(&producer, &settings, &c.aggregate_id, &c.to_bytes(), None).await;
        if i == total / 3 || i == 2 * total / 3 {
            // let it get busy first
            tokio::time::sleep(Duration::from_millis(300)).await;
            service.take().unwrap().kill();
            kills += 1;
            let restarted = ServiceProcess::start(&settings, "crash-a", 25);
            service = Some(restarted);
        }
    }
    let service = service.unwrap();
    service.wait_ready().await;

    // Wait until every distinct command has a result.
    let distinct: std::collections::HashSet<_> = commands.iter().map(|c| c.command_id).collect();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let answered: std::collections::HashSet<_> = read_results(&settings)
            .iter()
            .map(|r| r.command_id)
            .collect();
        if distinct.iter().all(|id| answered.contains(id)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "all commands answered within 120 s ({} of {})",
            answered.len(),
            distinct.len()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    service.terminate();
    let (events, decided) = verify_store(&settings).await;
    assert_eq!(decided, distinct.len());
    eprintln!(
        "crash test: {total} commands ({} distinct), {kills} SIGKILLs, {events} events, 0 duplicates, 0 gaps",
        distinct.len()
    );
}
