//! Transfers: their throughput from start to ended at the projection (closed loop: all sent,
//! then the time until the projection shows every one ended), and their latency from start to
//! `completed` on the projection (open loop, a sample of transfers polled on
//! `GET /transfers/{id}`).

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use rdkafka::producer::FutureProducer;
use shared::bank::BankCommand;
use shared::kafka::{Topics, canonical_partition};
use shared::transfer::{Start, TransferCommand};
use shared::{Command, CommandMessage, Settings};

use crate::latency::Percentiles;

/// The accounts transfers move money among: opened with enough that none runs dry.
pub fn accounts(n: usize) -> Vec<CommandMessage<BankCommand>> {
    (0..n)
        .map(|i| {
            CommandMessage::new(
                format!("tacc-{i}"),
                BankCommand::Account(Command::OpenAccount {
                    owner: format!("Owner {i}"),
                    currency: "EUR".into(),
                    initial_balance_minor: 1_000_000_000,
                }),
            )
        })
        .collect()
}

/// `n` transfers between random pairs of `accounts` accounts (never an account to itself).
pub fn workload(accounts: usize, n: usize, seed: u64) -> Vec<CommandMessage<BankCommand>> {
    let mut x = seed;
    let mut next = move || {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        x >> 33
    };
    (0..n)
        .map(|i| {
            let from = next() as usize % accounts;
            let to = (from + 1 + next() as usize % (accounts - 1)) % accounts;
            CommandMessage::new(
                format!("tr-{seed}-{i}"),
                BankCommand::Transfer(TransferCommand::TransferMoney(Start {
                    from: format!("tacc-{from}"),
                    to: format!("tacc-{to}"),
                    amount_minor: 1 + (next() % 1000) as i64,
                    currency: Some("EUR".into()),
                })),
            )
        })
        .collect()
}

/// Counts the transfers that end in the log (`TransferCompleted` or `TransferFailed` events,
/// read_committed, from the events topic's current end) until `n` did; resolves to the instant
/// the last one was read. Positioned before it returns, so nothing sent after is missed.
pub fn ended_in_log(
    settings: &Settings,
    n: usize,
    limit: Duration,
) -> anyhow::Result<tokio::task::JoinHandle<anyhow::Result<Instant>>> {
    use rdkafka::consumer::{Consumer, StreamConsumer};
    use rdkafka::message::{Headers, Message};
    use rdkafka::{Offset, TopicPartitionList};
    let topic = Topics::new(&settings.topic_prefix).events();
    let consumer: StreamConsumer = settings
        .kafka
        .client_config()
        .set("group.id", format!("{}.transfers", settings.topic_prefix))
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .set("fetch.wait.max.ms", "5")
        .create()?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..settings.partitions {
        let (_, high) = consumer.fetch_watermarks(&topic, p, Duration::from_secs(10))?;
        tpl.add_partition_offset(&topic, p, Offset::Offset(high))?;
    }
    consumer.assign(&tpl)?;
    Ok(tokio::spawn(async move {
        let deadline = Instant::now() + limit;
        let mut ended = 0;
        while ended < n {
            let left = deadline.saturating_duration_since(Instant::now());
            let msg = tokio::time::timeout(left, consumer.recv())
                .await
                .map_err(|_| {
                    anyhow::anyhow!("only {ended} of {n} transfers ended within {limit:?}")
                })??;
            let ends = msg.headers().is_some_and(|h| {
                h.iter().any(|h| {
                    h.key == "event_type"
                        && matches!(
                            h.value,
                            Some(b"TransferCompleted") | Some(b"TransferFailed")
                        )
                })
            });
            if ends {
                ended += 1;
            }
        }
        Ok(Instant::now())
    }))
}

/// Waits until the read model at `sqlite_url` shows `n` transfers ended (read-only, beside the
/// projection), polling; `limit` bounds the wait.
pub async fn wait_ended(sqlite_url: &str, n: usize, limit: Duration) -> anyhow::Result<()> {
    use sqlx::sqlite::SqliteConnectOptions;
    let options: SqliteConnectOptions = sqlite_url.parse()?;
    let pool = sqlx::SqlitePool::connect_with(options.read_only(true)).await?;
    let deadline = Instant::now() + limit;
    loop {
        let ended: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM transfers WHERE status <> 'pending'")
                .fetch_one(&pool)
                .await
                .unwrap_or(0);
        if ended as usize >= n {
            pool.close().await;
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("only {ended} of {n} transfers ended within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls `GET /transfers/{id}` until it shows the transfer ended; the milliseconds since
/// `sent`, or `None` if it did not end `completed` within 30 s.
async fn time_to_completed(http: reqwest::Client, url: String, sent: Instant) -> Option<f64> {
    let deadline = sent + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Ok(r) = http.get(&url).send().await
            && r.status() == 200
            && let Ok(body) = r.json::<serde_json::Value>().await
        {
            match body["status"].as_str() {
                Some("completed") => return Some(sent.elapsed().as_secs_f64() * 1000.0),
                Some("failed") => return None,
                _ => {}
            }
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    None
}

/// Sends `transfers` at `rate` per second (whatever the answers); every `sample_every`-th after
/// the first second's warm-up is timed from its produce to `completed` on the projection.
pub async fn open_loop(
    settings: &Settings,
    transfers: &[CommandMessage<BankCommand>],
    rate: f64,
    projection_url: &str,
    sample_every: usize,
) -> anyhow::Result<Percentiles> {
    let producer: FutureProducer = settings
        .kafka
        .producer_config()
        .set("linger.ms", "0")
        .create()?;
    let topic = Topics::new(&settings.topic_prefix).commands();
    let http = reqwest::Client::new();
    let warm_up = (rate as usize).min(transfers.len() / 10);
    let mut polls = Vec::new();
    crate::latency::produce_on_schedule(&producer, rate, transfers.len(), |i| {
        let transfer = &transfers[i];
        if i >= warm_up && (i - warm_up).is_multiple_of(sample_every) {
            let url = format!("{projection_url}/transfers/{}", transfer.aggregate_id);
            polls.push(tokio::spawn(time_to_completed(
                http.clone(),
                url,
                Instant::now(),
            )));
        }
        Ok(crate::latency::Scheduled {
            topic: topic.clone(),
            key: Some(transfer.aggregate_id.clone()),
            payload: transfer.to_bytes(),
            partition: canonical_partition(transfer.aggregate_id.as_bytes(), settings.partitions),
        })
    })
    .await?;
    let mut ms = Vec::with_capacity(polls.len());
    let sampled = polls.len();
    for poll in polls {
        if let Some(t) = poll.await.context("poller")? {
            ms.push(t);
        }
    }
    if ms.len() < sampled {
        bail!(
            "{} of {sampled} sampled transfers did not complete within 30 s",
            sampled - ms.len()
        );
    }
    Ok(Percentiles::of(ms))
}
