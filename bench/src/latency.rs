//! Open-loop latency: commands sent on a fixed schedule (not after each answer), each one's
//! time from produce to its result being readable, and for a sample of accepted ones to the
//! account being visible at that version on the projection (`?min_version=`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::StreamExt;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Message};
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
    /// The percentiles of a sample of milliseconds.
    pub fn of(mut ms: Vec<f64>) -> Self {
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

/// When each command was produced, shared by the sender and the result listener.
type SentAt = Arc<Mutex<HashMap<Uuid, Instant>>>;

/// Sends `commands` at `rate` per second and measures all but the first second's (a warm-up);
/// `projection_url` gets every `sample_every`-th accepted command's `min_version` read.
pub async fn open_loop(
    settings: &Settings,
    commands: &[CommandMessage],
    rate: f64,
    projection_url: &str,
    sample_every: usize,
) -> anyhow::Result<Latencies> {
    let consumer = results_consumer_at_the_end(settings)?;
    let sent_at: SentAt = Arc::default();
    let listener = Listener {
        sent_at: Arc::clone(&sent_at),
        http: reqwest::Client::new(),
        projection_url: projection_url.to_owned(),
        sample_every,
        to_result: Vec::with_capacity(commands.len()),
        split: Vec::new(),
        reads: Vec::new(),
        accepted: 0,
    };
    // The first second (at most a tenth of the commands) warms the pipeline up, unmeasured:
    // fresh clients connect, fetch metadata and register their first partitions then.
    let warm_up = (rate as usize).min(commands.len() / 10);
    let (warm_up, commands) = commands.split_at(warm_up);
    let listener = tokio::spawn(listener.run(consumer, commands.len()));
    send_on_schedule(settings, warm_up, rate, &SentAt::default()).await?;
    let sent_seconds = send_on_schedule(settings, commands, rate, &sent_at).await?;
    let (to_result, to_projection) = listener.await.context("result listener")?;
    Ok(Latencies {
        sent: commands.len(),
        rate: commands.len() as f64 / sent_seconds.max(1e-9),
        to_result: Percentiles::of(to_result),
        to_projection: Percentiles::of(to_projection),
    })
}

/// A consumer of every partition of the results topic from its current end.
fn results_consumer_at_the_end(settings: &Settings) -> anyhow::Result<StreamConsumer> {
    let results_topic = Topics::new(&settings.topic_prefix).command_results();
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
    Ok(consumer)
}

/// Produces `commands` on a fixed schedule (`rate` per second, whatever the answers), noting
/// each one's send time in `sent_at`; returns the seconds the sending took.
async fn send_on_schedule(
    settings: &Settings,
    commands: &[CommandMessage],
    rate: f64,
    sent_at: &SentAt,
) -> anyhow::Result<f64> {
    let producer: FutureProducer = settings
        .kafka
        .producer_config()
        .set("linger.ms", "0")
        .create()?;
    let topic = Topics::new(&settings.topic_prefix).commands();
    produce_on_schedule(&producer, rate, commands.len(), |i| {
        let command = &commands[i];
        sent_at
            .lock()
            .map_err(|_| anyhow::anyhow!("poisoned"))?
            .insert(command.command_id, Instant::now());
        Ok(Scheduled {
            topic: topic.clone(),
            key: Some(command.aggregate_id.clone()),
            payload: command.to_bytes(),
            partition: canonical_partition(command.aggregate_id.as_bytes(), settings.partitions),
        })
    })
    .await
}

/// One record of [`produce_on_schedule`].
pub struct Scheduled {
    /// Where it goes.
    pub topic: String,
    /// Its key, if any.
    pub key: Option<String>,
    /// Its value.
    pub payload: Vec<u8>,
    /// Its partition.
    pub partition: i32,
}

/// Produces `total` records on a fixed schedule, `rate` a second whatever the answers:
/// `record(i)` makes the i-th one just before it is sent (so that it can note the send time).
/// Keeps the deliveries moving while waiting for the next slot; the first failed delivery ends
/// it. Returns the seconds the sending took.
pub async fn produce_on_schedule(
    producer: &FutureProducer,
    rate: f64,
    total: usize,
    mut record: impl FnMut(usize) -> anyhow::Result<Scheduled>,
) -> anyhow::Result<f64> {
    let started = Instant::now();
    let mut sends = futures::stream::FuturesUnordered::new();
    for i in 0..total {
        let due = started + Duration::from_secs_f64(i as f64 / rate);
        while Instant::now() < due {
            let wait = tokio::time::sleep_until(due.into());
            tokio::select! {
                _ = wait => break,
                Some(r) = sends.next(), if !sends.is_empty() => { r?; }
            }
        }
        let next = record(i)?;
        let producer = producer.clone();
        sends.push(async move {
            let mut sent = FutureRecord::<str, [u8]>::to(&next.topic)
                .payload(&next.payload)
                .partition(next.partition);
            if let Some(key) = &next.key {
                sent = sent.key(key.as_str());
            }
            producer
                .send(sent, Duration::from_secs(10))
                .await
                .map(|_| ())
                .map_err(|(e, _)| anyhow::Error::from(e))
        });
    }
    while let Some(r) = sends.next().await {
        r?;
    }
    Ok(started.elapsed().as_secs_f64())
}

/// Where one result's time went, in milliseconds: until the result was produced (consume +
/// decide), and from then until it was readable (commit + markers + fetch).
struct TimeSplit {
    until_produced: f64,
    until_readable: f64,
}

/// Reads results as they arrive; for every `sample_every`-th accepted one, a projection read
/// at its version starts at once (it answers when the projection has applied it).
struct Listener {
    sent_at: SentAt,
    http: reqwest::Client,
    projection_url: String,
    sample_every: usize,
    /// Milliseconds from produce to result readable, per command.
    to_result: Vec<f64>,
    split: Vec<TimeSplit>,
    /// The sampled projection reads: milliseconds from produce to visible, if they answered.
    reads: Vec<tokio::task::JoinHandle<Option<f64>>>,
    accepted: usize,
}

impl Listener {
    /// Listens until `wanted` results came (or none for 30 s); returns the milliseconds to
    /// the result and to the projection.
    async fn run(mut self, consumer: StreamConsumer, wanted: usize) -> (Vec<f64>, Vec<f64>) {
        let mut stream = consumer.stream();
        while self.to_result.len() < wanted {
            let Ok(Some(Ok(msg))) =
                tokio::time::timeout(Duration::from_secs(30), stream.next()).await
            else {
                break;
            };
            self.record(&msg, Instant::now());
        }
        let mut to_projection = Vec::new();
        for read in self.reads {
            if let Ok(Some(ms)) = read.await {
                to_projection.push(ms);
            }
        }
        let before = Percentiles::of(self.split.iter().map(|s| s.until_produced).collect());
        let after = Percentiles::of(self.split.iter().map(|s| s.until_readable).collect());
        eprintln!(
            "until the result was produced: p50 {:.1} ms p99 {:.1} ms; then until readable: p50 {:.1} ms p99 {:.1} ms",
            before.p50, before.p99, after.p50, after.p99
        );
        (self.to_result, to_projection)
    }

    /// Records one result message `received` at that instant, if it answers one of ours.
    fn record(&mut self, msg: &BorrowedMessage<'_>, received: Instant) {
        let Some(Ok(result)) = msg.payload().map(serde_json::from_slice::<CommandResult>) else {
            return;
        };
        let Ok(Some(started)) = self
            .sent_at
            .lock()
            .map(|m| m.get(&result.command_id).copied())
        else {
            return;
        };
        let total = received.duration_since(started).as_secs_f64() * 1e3;
        // BENCH_TRACE_SLOW=1: when each slow command was sent, to line up with the logs.
        if total > 150.0 && std::env::var_os("BENCH_TRACE_SLOW").is_some() {
            let sent = chrono::Utc::now() - chrono::Duration::milliseconds(total as i64);
            eprintln!(
                "slow: sent {} took {total:.0} ms",
                sent.format("%H:%M:%S%.3f")
            );
        }
        self.to_result.push(total);
        if let Some(produced_ms) = msg.timestamp().to_millis() {
            let now_ms = chrono::Utc::now().timestamp_millis();
            let until_readable = (now_ms - produced_ms) as f64;
            self.split.push(TimeSplit {
                until_produced: total - until_readable,
                until_readable,
            });
        }
        if result.status != CommandStatus::Accepted {
            return;
        }
        self.accepted += 1;
        if let (0, Some(version)) = (self.accepted % self.sample_every, result.version) {
            self.sample_projection(&result.aggregate_id, version, started);
        }
    }

    /// Starts a read of the account at `version` on the projection, timed from `started`.
    fn sample_projection(&mut self, account: &str, version: u64, started: Instant) {
        let url = format!(
            "{}/accounts/{account}?min_version={version}&timeout_ms=10000",
            self.projection_url
        );
        let http = self.http.clone();
        self.reads.push(tokio::spawn(async move {
            let ok = http
                .get(url)
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            ok.then(|| started.elapsed().as_secs_f64() * 1e3)
        }));
    }
}
