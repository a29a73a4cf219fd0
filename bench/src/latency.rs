//! Open-loop latency: commands sent on a fixed schedule (not after each answer), each one's
//! time from produce to its result being readable, and for a sample of accepted ones to the
//! account being visible at that version on the projection (`?min_version=`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::StreamExt;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use shared::kafka::{Topics, canonical_partition};
use shared::{CommandMessage, CommandResult, CommandStatus, Settings};
use uuid::Uuid;

/// Latency percentiles in milliseconds.
#[derive(Debug, Default, Clone)]
pub struct Latencies {
    /// Commands sent.
    pub sent: usize,
    /// Rate they were sent at (per second).
    pub rate: f64,
    /// Produce → result readable.
    pub to_result: Percentiles,
    /// Produce → account visible at the command's version on the projection.
    pub to_projection: Percentiles,
}

/// p50 / p99 / max of a sample, in milliseconds.
#[derive(Debug, Default, Clone)]
pub struct Percentiles {
    /// Sample size.
    pub n: usize,
    /// Median.
    pub p50: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Largest.
    pub max: f64,
}

impl Percentiles {
    fn of(mut ms: Vec<f64>) -> Self {
        ms.sort_by(f64::total_cmp);
        let at = |q: f64| {
            ms.get(((ms.len() as f64 - 1.0) * q).round() as usize)
                .copied()
                .unwrap_or(0.0)
        };
        Percentiles {
            n: ms.len(),
            p50: at(0.5),
            p99: at(0.99),
            max: ms.last().copied().unwrap_or(0.0),
        }
    }
}

/// Sends `commands` at `rate` per second and measures; `projection_url` gets every
/// `sample_every`-th accepted command's `min_version` read.
pub async fn open_loop(
    settings: &Settings,
    commands: &[CommandMessage],
    rate: f64,
    projection_url: &str,
    sample_every: usize,
) -> anyhow::Result<Latencies> {
    let topics = Topics::new(&settings.topic_prefix);
    let results_topic = topics.command_results();
    let consumer: StreamConsumer = settings
        .kafka
        .client_config()
        .set("group.id", format!("{}.latency", settings.topic_prefix))
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .set("fetch.wait.max.ms", "5")
        .create()?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..settings.partitions {
        let (_, high) = consumer.fetch_watermarks(&results_topic, p, Duration::from_secs(10))?;
        tpl.add_partition_offset(&results_topic, p, Offset::Offset(high))?;
    }
    consumer.assign(&tpl)?;
    let sent_at: Arc<Mutex<HashMap<Uuid, Instant>>> = Arc::default();
    let wanted = commands.len();
    // Results as they arrive; for every `sample_every`-th accepted one, a projection read at its
    // version starts at once (it answers when the projection has applied it).
    let listener = {
        let sent_at = Arc::clone(&sent_at);
        let http = reqwest::Client::new();
        let projection_url = projection_url.to_owned();
        tokio::spawn(async move {
            let mut to_result = Vec::with_capacity(wanted);
            let mut split: Vec<(f64, f64)> = Vec::new();
            let mut reads = Vec::new();
            let mut accepted = 0usize;
            let mut stream = consumer.stream();
            while to_result.len() < wanted {
                let Ok(Some(Ok(msg))) =
                    tokio::time::timeout(Duration::from_secs(30), stream.next()).await
                else {
                    break;
                };
                let received = Instant::now();
                let Some(Ok(result)) = msg.payload().map(serde_json::from_slice::<CommandResult>)
                else {
                    continue;
                };
                let Ok(Some(started)) = sent_at.lock().map(|m| m.get(&result.command_id).copied())
                else {
                    continue;
                };
                to_result.push(received.duration_since(started).as_secs_f64() * 1e3);
                if let Some(produced_ms) = msg.timestamp().to_millis() {
                    // Where the time goes: until the result was produced (consume + decide),
                    // and from then until it was readable (commit + markers + fetch).
                    let now_ms = chrono::Utc::now().timestamp_millis();
                    let total = received.duration_since(started).as_secs_f64() * 1e3;
                    split.push((
                        total - (now_ms - produced_ms) as f64,
                        (now_ms - produced_ms) as f64,
                    ));
                }
                if result.status != CommandStatus::Accepted {
                    continue;
                }
                accepted += 1;
                if let (0, Some(version)) = (accepted % sample_every, result.version) {
                    let url = format!(
                        "{projection_url}/accounts/{}?min_version={version}&timeout_ms=10000",
                        result.aggregate_id
                    );
                    let http = http.clone();
                    reads.push(tokio::spawn(async move {
                        let ok = http
                            .get(url)
                            .send()
                            .await
                            .is_ok_and(|r| r.status().is_success());
                        ok.then(|| started.elapsed().as_secs_f64() * 1e3)
                    }));
                }
            }
            let mut to_projection = Vec::new();
            for read in reads {
                if let Ok(Some(ms)) = read.await {
                    to_projection.push(ms);
                }
            }
            let before = Percentiles::of(split.iter().map(|s| s.0).collect());
            let after = Percentiles::of(split.iter().map(|s| s.1).collect());
            eprintln!(
                "until the result was produced: p50 {:.1} ms p99 {:.1} ms; then until readable: p50 {:.1} ms p99 {:.1} ms",
                before.p50, before.p99, after.p50, after.p99
            );
            (to_result, to_projection)
        })
    };

    let producer: FutureProducer = settings
        .kafka
        .producer_config()
        .set("linger.ms", "0")
        .create()?;
    let commands_topic = topics.commands();
    let started = Instant::now();
    let mut sends = futures::stream::FuturesUnordered::new();
    for (i, command) in commands.iter().enumerate() {
        let due = started + Duration::from_secs_f64(i as f64 / rate);
        // Keep the deliveries moving while waiting for the next slot.
        while Instant::now() < due {
            let wait = tokio::time::sleep_until(due.into());
            tokio::select! {
                _ = wait => break,
                Some(r) = sends.next(), if !sends.is_empty() => { r?; }
            }
        }
        let partition = canonical_partition(command.aggregate_id.as_bytes(), settings.partitions);
        let payload = command.to_bytes();
        sent_at
            .lock()
            .map_err(|_| anyhow::anyhow!("poisoned"))?
            .insert(command.command_id, Instant::now());
        let producer = producer.clone();
        let (topic, key) = (commands_topic.clone(), command.aggregate_id.clone());
        sends.push(async move {
            producer
                .send(
                    FutureRecord::to(&topic)
                        .key(&key)
                        .payload(&payload)
                        .partition(partition),
                    Duration::from_secs(10),
                )
                .await
                .map(|_| ())
                .map_err(|(e, _)| anyhow::Error::from(e))
        });
    }
    while let Some(r) = sends.next().await {
        r?;
    }
    let sent_seconds = started.elapsed().as_secs_f64();
    let (to_result, to_projection) = listener.await.context("result listener")?;
    Ok(Latencies {
        sent: commands.len(),
        rate: commands.len() as f64 / sent_seconds.max(1e-9),
        to_result: Percentiles::of(to_result),
        to_projection: Percentiles::of(to_projection),
    })
}
