//! Two instances in one group: partitions split, one writer per aggregate, and killing one moves
//! its partitions without losing anything.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use crate::crash::workload;
use crate::helpers::*;

fn owned(ready: &serde_json::Value) -> Vec<i64> {
    ready["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_i64().unwrap())
        .collect()
}

#[tokio::test]
async fn two_instances_split_the_partitions_and_survive_a_kill() {
    let settings = shared::testing::test_settings(4);
    let a = ServiceProcess::start(&settings, "pair-a", 100);
    let b = ServiceProcess::start(&settings, "pair-b", 100);
    // wait until both own a disjoint, complete split
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        if let (Some(ra), Some(rb)) = (a.ready().await, b.ready().await) {
            let (pa, pb) = (owned(&ra), owned(&rb));
            let all: HashSet<i64> = pa.iter().chain(&pb).copied().collect();
            if !pa.is_empty() && !pb.is_empty() && all.len() == 4 && pa.len() + pb.len() == 4 {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "partitions split between two instances"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let producer = producer(&settings);
    let commands = workload(20, 600, 11);
    let half = commands.len() / 2;
    for c in &commands[..half] {
        produce_raw(&producer, &settings, &c.aggregate_id, &c.to_bytes(), None).await;
    }
    a.kill();
    for c in &commands[half..] {
        produce_raw(&producer, &settings, &c.aggregate_id, &c.to_bytes(), None).await;
    }
    // b takes everything over
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        if let Some(rb) = b.ready().await
            && owned(&rb).len() == 4
        {
            break;
        }
        assert!(Instant::now() < deadline, "survivor owns all partitions");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let distinct: HashSet<_> = commands.iter().map(|c| c.command_id).collect();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let answered: HashSet<_> = read_results(&settings)
            .iter()
            .map(|r| r.command_id)
            .collect();
        if distinct.iter().all(|id| answered.contains(id)) {
            break;
        }
        assert!(Instant::now() < deadline, "all commands answered");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    b.terminate();
    let (events, decided) = verify_store(&settings).await;
    assert_eq!(decided, distinct.len());
    eprintln!(
        "two instances: {} commands, {events} events, one instance killed, 0 duplicates",
        distinct.len()
    );
}

#[tokio::test]
async fn a_second_instance_with_the_same_instance_id_stops_the_first() {
    let settings = shared::testing::test_settings(2);
    let mut a = ServiceProcess::start(&settings, "twin", 100);
    a.wait_ready().await;
    let b = ServiceProcess::start(&settings, "twin", 100);
    // The newcomer fences the old one (producer and static group member alike): the old one
    // must stop with an error instead of fencing back.
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = a.child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the fenced instance stops");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(!status.success(), "it exits non-zero: {status}");
    let ready = b.wait_ready().await;
    assert_eq!(
        owned(&ready).len(),
        2,
        "the newcomer owns everything: {ready}"
    );
    let (s, body) = post(
        &reqwest::Client::new(),
        &b.url,
        open("twin-1", "Tess", 10).to_json().to_string(),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    b.terminate();
}
