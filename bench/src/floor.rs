//! The floor of transactional latency on this broker: a bare read-process-write loop doing
//! what the command-service's engine does around its work and nothing else. A generator
//! produces records on a fixed schedule; the loop consumes them read_committed, copies each
//! one in a Kafka transaction with the consumed offsets, group-committed as the engine does
//! (commit as soon as nothing more is waiting, or after the commit interval); a reader sees
//! the copies read_committed. Each record's time from produce to its copy being readable is
//! the latency no engine on this broker can beat, measured in the same run as the engine's.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use futures::StreamExt;
use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::producer::{BaseProducer, BaseRecord, FutureProducer, Producer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Offset, TopicPartitionList};
use shared::config::KafkaSettings;
use shared::kafka::{TopicSpec, ensure_topics};

use crate::latency::{Percentiles, Scheduled};

/// How the floor loop runs: the engine's transaction settings.
pub struct Floor {
    /// The brokers.
    pub kafka: KafkaSettings,
    /// Partitions of the input and output topics.
    pub partitions: i32,
    /// The longest a transaction stays open (`COMMIT_INTERVAL_MS`).
    pub commit_interval: Duration,
}

impl Floor {
    /// Sends `rate` records a second for `seconds` and returns produce → copy readable, in
    /// milliseconds, without the first second (a warm-up).
    pub async fn measure(&self, rate: f64, seconds: u64) -> anyhow::Result<Percentiles> {
        let prefix = format!("bench-floor-{}", uuid::Uuid::new_v4().simple());
        let (input, output) = (format!("{prefix}.in"), format!("{prefix}.out"));
        let spec = |name: &str| TopicSpec {
            name: name.to_owned(),
            partitions: self.partitions,
            config: vec![],
        };
        ensure_topics(
            &self.kafka,
            &[spec(&input), spec(&output)],
            Duration::from_secs(30),
        )
        .await?;
        let stop = Arc::new(AtomicBool::new(false));
        let copier = {
            let (kafka, stop) = (self.kafka.clone(), Arc::clone(&stop));
            let (input, output, prefix) = (input.clone(), output.clone(), prefix.clone());
            let (partitions, interval) = (self.partitions, self.commit_interval);
            std::thread::spawn(move || {
                copy_loop(
                    &kafka, &prefix, &input, &output, partitions, interval, &stop,
                )
            })
        };
        let reader = self.reader(&prefix, &output)?;
        let total = (rate * seconds as f64) as usize;
        // Read while sending: a copy's time ends when it is read.
        let (sent, seen) =
            tokio::join!(self.send(&input, rate, total), read_copies(&reader, total));
        let seen = sent.and(seen);
        stop.store(true, Ordering::SeqCst);
        let copied = copier
            .join()
            .map_err(|_| anyhow::anyhow!("the floor's copy loop panicked"))?;
        copied.context("the floor's copy loop")?;
        let warm_up = rate as usize;
        Ok(Percentiles::of(seen?.into_iter().skip(warm_up).collect()))
    }

    /// A read_committed reader of every partition of `output` from its start.
    fn reader(&self, prefix: &str, output: &str) -> anyhow::Result<StreamConsumer> {
        let consumer: StreamConsumer = self
            .kafka
            .client_config()
            .set("group.id", format!("{prefix}.reader"))
            .set("enable.auto.commit", "false")
            .set("isolation.level", "read_committed")
            .set("fetch.wait.max.ms", "5")
            .create()?;
        consumer.assign(&all_partitions(output, self.partitions, Offset::Beginning)?)?;
        Ok(consumer)
    }

    /// Produces `total` records to `input` at `rate` a second, each holding its send time.
    async fn send(&self, input: &str, rate: f64, total: usize) -> anyhow::Result<()> {
        let producer: FutureProducer = self
            .kafka
            .producer_config()
            .set("linger.ms", "0")
            .create()?;
        let partitions = self.partitions.max(1) as usize;
        crate::latency::produce_on_schedule(&producer, rate, total, |i| {
            Ok(Scheduled {
                topic: input.to_owned(),
                key: None,
                payload: now_micros().to_be_bytes().to_vec(),
                partition: (i % partitions) as i32,
            })
        })
        .await?;
        Ok(())
    }
}

/// Reads `total` copies and returns each one's produce → readable time in milliseconds.
async fn read_copies(reader: &StreamConsumer, total: usize) -> anyhow::Result<Vec<f64>> {
    let mut seen = Vec::with_capacity(total);
    let mut stream = reader.stream();
    while seen.len() < total {
        let message = tokio::time::timeout(Duration::from_secs(30), stream.next())
            .await
            .context("no copy became readable for 30 s")?
            .context("the reader stopped")??;
        let sent = message
            .payload()
            .and_then(|p| <[u8; 8]>::try_from(p).ok())
            .map(u64::from_be_bytes)
            .context("a copy without its send time")?;
        seen.push(now_micros().saturating_sub(sent) as f64 / 1000.0);
    }
    Ok(seen)
}

fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

fn all_partitions(topic: &str, partitions: i32, at: Offset) -> anyhow::Result<TopicPartitionList> {
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, at)?;
    }
    Ok(tpl)
}

/// The loop: consume, copy in a transaction with the consumed offsets, commit as soon as
/// nothing more is waiting (or after `interval`), until `stop`.
fn copy_loop(
    kafka: &KafkaSettings,
    prefix: &str,
    input: &str,
    output: &str,
    partitions: i32,
    interval: Duration,
    stop: &AtomicBool,
) -> anyhow::Result<()> {
    let consumer: BaseConsumer = kafka
        .client_config()
        .set("group.id", format!("{prefix}.copier"))
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .set("fetch.wait.max.ms", "10")
        .create()?;
    consumer.assign(&all_partitions(input, partitions, Offset::Beginning)?)?;
    // The engine's transactional settings (command-service/src/engine/mod.rs).
    let producer: BaseProducer = kafka
        .producer_config()
        .set("transactional.id", format!("{prefix}.copier"))
        .set("transaction.timeout.ms", "10000")
        .set("linger.ms", "2")
        .set("retry.backoff.ms", "5")
        .set("message.timeout.ms", "10000")
        .create()?;
    producer.init_transactions(Duration::from_secs(30))?;
    let group = consumer
        .group_metadata()
        .context("the copier's group metadata")?;
    while !stop.load(Ordering::SeqCst) {
        let Some(first) = consumer.poll(Duration::from_millis(100)) else {
            continue;
        };
        producer.begin_transaction()?;
        let opened = Instant::now();
        let mut next = Some(first);
        while let Some(message) = next.take() {
            let message = message?;
            let mut record = BaseRecord::<(), [u8]>::to(output)
                .partition(message.partition())
                .payload(message.payload().unwrap_or_default());
            loop {
                match producer.send(record) {
                    Ok(()) => break,
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                        producer.poll(Duration::from_millis(1));
                        record = back;
                    }
                    Err((e, _)) => return Err(e.into()),
                }
            }
            producer.poll(Duration::ZERO);
            if opened.elapsed() < interval {
                next = consumer.poll(Duration::ZERO);
            }
        }
        // Serve the deliveries first, as the engine does: the flush inside commit_transaction
        // waits for them in steps of 100 ms.
        let deadline = Instant::now() + Duration::from_secs(10);
        while producer.in_flight_count() > 0 && Instant::now() < deadline {
            producer.poll(Duration::from_millis(1));
        }
        let positions = consumer.position()?;
        producer.send_offsets_to_transaction(&positions, &group, Duration::from_secs(10))?;
        producer.commit_transaction(Duration::from_secs(10))?;
    }
    Ok(())
}
