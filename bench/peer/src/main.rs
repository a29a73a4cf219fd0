//! `bank-peer`: the bench's bank workload (bench/src/main.rs `workload`) on `cqrs-es` +
//! `postgres-es`, the peer the command pipeline is compared with (issue 10).
//!
//! Opens every account first (not timed), then times the deposits and withdrawals through
//! `CqrsFramework::execute` with `--concurrency` tasks that take the next command from one shared
//! queue. cqrs-es checks the aggregate's sequence on commit (optimistic concurrency): when two
//! tasks hit the same account at once, the loser gets `AggregateConflict` and the command is
//! retried (counted in `retries`). With `--concurrency 1` the commands run strictly in order; with
//! more, commands on one account may swap places, so `accepted`/`rejected` can differ slightly.

mod account;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use anyhow::{Context, bail};
use clap::Parser;
use cqrs_es::AggregateError;
use postgres_es::{PostgresCqrs, postgres_cqrs};
use sqlx::postgres::PgPoolOptions;

use crate::account::{BankAccount, BankCommand};

/// The events and snapshots tables as postgres-es documents them (its `db/init.sql`).
const SCHEMA: &str = r#"
DROP TABLE IF EXISTS events;
DROP TABLE IF EXISTS snapshots;
CREATE TABLE events
(
    aggregate_type text                         NOT NULL,
    aggregate_id   text                         NOT NULL,
    sequence       bigint CHECK (sequence >= 0) NOT NULL,
    event_type     text                         NOT NULL,
    event_version  text                         NOT NULL,
    payload        json                         NOT NULL,
    metadata       json                         NOT NULL,
    PRIMARY KEY (aggregate_type, aggregate_id, sequence)
);
CREATE TABLE snapshots
(
    aggregate_type   text                                 NOT NULL,
    aggregate_id     text                                 NOT NULL,
    last_sequence    bigint CHECK (last_sequence >= 0)    NOT NULL,
    current_snapshot bigint CHECK (current_snapshot >= 0) NOT NULL,
    payload          json                                 NOT NULL,
    PRIMARY KEY (aggregate_type, aggregate_id, last_sequence)
);
"#;

/// Conflicts tolerated on one command before the run fails.
const MAX_RETRIES: u64 = 1_000;

#[derive(Parser, Debug)]
#[command(
    about = "The bank benchmark workload on cqrs-es + postgres-es (peer of the command pipeline)"
)]
struct Args {
    /// PostgreSQL URL; the events and snapshots tables there are dropped and re-created.
    #[arg(long, env = "BENCH_POSTGRES_URL")]
    database_url: String,
    /// Accounts the commands are spread over.
    #[arg(long, default_value_t = 500)]
    accounts: usize,
    /// Commands in total, the account openings included.
    #[arg(long, default_value_t = 20_000)]
    commands: usize,
    /// Tasks executing commands at once.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Where to write the result as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// Outcomes of a batch of commands.
#[derive(Debug, Default, Clone, Copy)]
struct Tally {
    accepted: u64,
    rejected: u64,
    retries: u64,
}

impl std::ops::AddAssign for Tally {
    fn add_assign(&mut self, other: Tally) {
        self.accepted += other.accepted;
        self.rejected += other.rejected;
        self.retries += other.retries;
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.accounts == 0 || args.concurrency == 0 {
        bail!("--accounts and --concurrency must be at least 1");
    }
    let pool = PgPoolOptions::new()
        .max_connections(u32::try_from(args.concurrency + 1).unwrap_or(u32::MAX))
        .connect(&args.database_url)
        .await
        .context("connecting to PostgreSQL")?;
    sqlx::raw_sql(SCHEMA)
        .execute(&pool)
        .await
        .context("creating the events and snapshots tables")?;
    let cqrs: Arc<PostgresCqrs<BankAccount>> = Arc::new(postgres_cqrs(pool, Vec::new(), ()));

    let mut commands = workload(args.accounts, args.commands);
    let rest: Arc<[(String, BankCommand)]> = commands.split_off(args.accounts).into();
    let opens: Arc<[(String, BankCommand)]> = commands.into();

    let opened = run(&cqrs, opens, args.concurrency).await?;
    if opened.accepted != args.accounts as u64 {
        bail!(
            "opened {} of {} accounts ({} rejected)",
            opened.accepted,
            args.accounts,
            opened.rejected
        );
    }

    let count = rest.len();
    let start = Instant::now();
    let tally = run(&cqrs, rest, args.concurrency).await?;
    let seconds = start.elapsed().as_secs_f64();
    let rate = count as f64 / seconds;

    let peer = format!(
        "cqrs-es {} + postgres-es {}",
        env!("PEER_CQRS_ES_VERSION"),
        env!("PEER_POSTGRES_ES_VERSION")
    );
    println!(
        "{peer}: {count} commands in {seconds:.2} s = {rate:.0} commands/s \
         ({} accepted, {} rejected, {} retries, concurrency {})",
        tally.accepted, tally.rejected, tally.retries, args.concurrency
    );
    if let Some(path) = &args.json {
        let json = serde_json::json!({
            "peer": peer,
            "commands": count,
            "seconds": seconds,
            "peer_commands_per_s": rate,
            "accepted": tally.accepted,
            "rejected": tally.rejected,
            "retries": tally.retries,
            "concurrency": args.concurrency,
        });
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        std::fs::write(path, serde_json::to_string_pretty(&json)? + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// Executes `commands` with `concurrency` tasks pulling from one shared cursor; a command that
/// loses an optimistic-concurrency race is executed again.
async fn run(
    cqrs: &Arc<PostgresCqrs<BankAccount>>,
    commands: Arc<[(String, BankCommand)]>,
    concurrency: usize,
) -> anyhow::Result<Tally> {
    let cursor = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        let (cqrs, commands, cursor) = (cqrs.clone(), commands.clone(), cursor.clone());
        tasks.push(tokio::spawn(async move {
            let mut tally = Tally::default();
            loop {
                let i = cursor.fetch_add(1, Ordering::Relaxed);
                let Some((id, command)) = commands.get(i) else {
                    return anyhow::Ok(tally);
                };
                let mut conflicts = 0;
                loop {
                    match cqrs.execute(id, command.clone()).await {
                        Ok(()) => tally.accepted += 1,
                        Err(AggregateError::UserError(_)) => tally.rejected += 1,
                        Err(AggregateError::AggregateConflict) if conflicts < MAX_RETRIES => {
                            conflicts += 1;
                            tally.retries += 1;
                            continue;
                        }
                        Err(e) => {
                            return Err(anyhow::Error::new(e))
                                .with_context(|| format!("{command:?} on {id}"));
                        }
                    }
                    break;
                }
            }
        }));
    }
    let mut total = Tally::default();
    for task in tasks {
        total += task.await.context("a worker task panicked")??;
    }
    Ok(total)
}

/// The bench's workload (bench/src/main.rs `workload`): `acc-0..acc-{accounts-1}` opened with
/// 10 000 EUR minor units, then a deterministic LCG mix of deposits (60 %) and withdrawals up to
/// `total` commands (at least one).
fn workload(accounts: usize, total: usize) -> Vec<(String, BankCommand)> {
    let mut out: Vec<(String, BankCommand)> = (0..accounts)
        .map(|i| {
            (
                format!("acc-{i}"),
                BankCommand::OpenAccount {
                    owner: format!("Owner {i}"),
                    currency: "EUR".into(),
                    initial_balance_minor: 10_000,
                },
            )
        })
        .collect();
    let mut x: u64 = 42;
    while out.len() < total.max(accounts + 1) {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let id = format!("acc-{}", (x >> 33) as usize % accounts);
        let amount = 1 + ((x >> 13) % 20_000) as i64;
        let command = if (x >> 7) % 10 < 6 {
            BankCommand::Deposit {
                amount_minor: amount,
            }
        } else {
            BankCommand::Withdraw {
                amount_minor: amount,
            }
        };
        out.push((id, command));
    }
    out
}
