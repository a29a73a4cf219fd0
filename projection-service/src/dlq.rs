//! The dead-letter topic `<prefix>.events.dlq`: the original key, bytes and headers, plus headers
//! that say where the message came from and why it could not be projected:
//! `dlq.original.topic`, `dlq.original.partition`, `dlq.original.offset`, `dlq.error.code`,
//! `dlq.error.message`, `dlq.failed.at`.
//!
//! Delivery is awaited (acks=all, idempotent producer) before the batch that dead-letters commits
//! its offsets, so nothing is lost; a crash in between sends it again (at-least-once).
//!
//! For the explorer, [`count_monitor`] keeps the number of dead letters in [`Status`] and
//! [`DeadLetterReader`] reads the newest ones back (`GET /dead-letters`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::try_join_all;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use serde::Serialize;
use tokio::sync::watch;

use crate::plan::DeadLetter;
use crate::projector::Status;

/// How often [`count_monitor`] counts the dead letters.
pub const COUNT_INTERVAL: Duration = Duration::from_secs(2);
/// How long reading dead letters back may take before giving up.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Payload bytes shown per dead letter; the rest is cut.
const PAYLOAD_PREVIEW: usize = 4096;

/// Header names of dead letters.
pub mod header {
    /// The topic the message was read from.
    pub const ORIGINAL_TOPIC: &str = "dlq.original.topic";
    /// Its partition.
    pub const ORIGINAL_PARTITION: &str = "dlq.original.partition";
    /// Its offset.
    pub const ORIGINAL_OFFSET: &str = "dlq.original.offset";
    /// Stable reason code.
    pub const ERROR_CODE: &str = "dlq.error.code";
    /// Human-readable reason.
    pub const ERROR_MESSAGE: &str = "dlq.error.message";
    /// When it was dead-lettered (RFC 3339).
    pub const FAILED_AT: &str = "dlq.failed.at";
}

/// Sends dead letters.
#[derive(Clone)]
pub struct DeadLetterQueue {
    producer: FutureProducer,
    topic: String,
    source_topic: String,
}

impl std::fmt::Debug for DeadLetterQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeadLetterQueue")
            .field("topic", &self.topic)
            .finish()
    }
}

impl DeadLetterQueue {
    /// A producer for `topic`, for messages read from `source_topic`.
    pub fn new(
        kafka: &shared::config::KafkaSettings,
        topic: String,
        source_topic: String,
    ) -> Result<Self, KafkaError> {
        let producer = kafka
            .producer_config()
            .set("acks", "all")
            .set("linger.ms", "5")
            // A dead letter is awaited inside the batch's database transaction: fail it (and
            // redo the batch) after 30 s rather than librdkafka's 5 minutes.
            .set("message.timeout.ms", "30000")
            .create()?;
        Ok(DeadLetterQueue {
            producer,
            topic,
            source_topic,
        })
    }

    /// Sends every dead letter and waits until all are acknowledged.
    pub async fn send_all(&self, letters: &[DeadLetter]) -> Result<(), KafkaError> {
        let failed_at = crate::db::format_ts(&chrono::Utc::now());
        try_join_all(letters.iter().map(|letter| {
            let headers = self.headers(letter, &failed_at);
            async move {
                let mut record: FutureRecord<'_, [u8], [u8]> =
                    FutureRecord::to(&self.topic).headers(headers);
                if let Some(key) = &letter.key {
                    record = record.key(key.as_slice());
                }
                if let Some(payload) = &letter.payload {
                    record = record.payload(payload.as_slice());
                }
                self.producer
                    .send(record, Duration::from_secs(30))
                    .await
                    .map(|_| ())
                    .map_err(|(e, _)| e)
            }
        }))
        .await?;
        Ok(())
    }

    fn headers(&self, letter: &DeadLetter, failed_at: &str) -> OwnedHeaders {
        let mut headers = OwnedHeaders::new();
        if let Some(original) = &letter.headers {
            for h in original.iter() {
                headers = headers.insert(Header {
                    key: h.key,
                    value: h.value,
                });
            }
        }
        let partition = letter.partition.to_string();
        let offset = letter.offset.to_string();
        for (key, value) in [
            (header::ORIGINAL_TOPIC, self.source_topic.as_str()),
            (header::ORIGINAL_PARTITION, partition.as_str()),
            (header::ORIGINAL_OFFSET, offset.as_str()),
            (header::ERROR_CODE, letter.code.as_str()),
            (header::ERROR_MESSAGE, letter.message.as_str()),
            (header::FAILED_AT, failed_at),
        ] {
            headers = headers.insert(Header {
                key,
                value: Some(value),
            });
        }
        headers
    }
}

/// Per partition of `topic`: (partition, low watermark, high watermark). Blocking.
fn watermarks(client: &BaseConsumer, topic: &str) -> Result<Vec<(i32, i64, i64)>, KafkaError> {
    let metadata = client.fetch_metadata(Some(topic), READ_TIMEOUT)?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .filter(|t| t.name() == topic)
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    partitions
        .into_iter()
        .map(|p| {
            let (low, high) = client.fetch_watermarks(topic, p, READ_TIMEOUT)?;
            Ok((p, low, high))
        })
        .collect()
}

/// Every [`COUNT_INTERVAL`] until `shutdown`: the number of messages in the dead-letter topic
/// (the sum over its partitions of high minus low watermark; the producer is not transactional,
/// so every offset is a message), stored in [`Status`] for `GET /status`.
pub async fn count_monitor(
    client: Arc<BaseConsumer>,
    topic: String,
    status: Arc<Status>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(COUNT_INTERVAL);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        let query = {
            let client = client.clone();
            let topic = topic.clone();
            tokio::task::spawn_blocking(move || watermarks(&client, &topic))
        };
        let counted = tokio::select! {
            counted = query => counted,
            _ = shutdown.changed() => return,
        };
        match counted {
            Ok(Ok(marks)) => {
                status.set_dead_letters(Some(marks.iter().map(|(_, low, high)| high - low).sum()));
            }
            Ok(Err(e)) => tracing::debug!(error = %e, %topic, "cannot count dead letters"),
            Err(_) => {}
        }
    }
}

/// One dead letter as `GET /dead-letters` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct DeadLetterView {
    /// Partition of the dead-letter topic.
    pub partition: i32,
    /// Offset in that partition.
    pub offset: i64,
    /// The original key as text (lossy UTF-8).
    pub key: Option<String>,
    /// `dlq.error.code`.
    pub code: Option<String>,
    /// `dlq.error.message`.
    pub message: Option<String>,
    /// `dlq.original.topic`.
    pub original_topic: Option<String>,
    /// `dlq.original.partition`.
    pub original_partition: Option<i32>,
    /// `dlq.original.offset`.
    pub original_offset: Option<i64>,
    /// `dlq.failed.at` (RFC 3339).
    pub failed_at: Option<String>,
    /// Every header as text (lossy UTF-8).
    pub headers: BTreeMap<String, String>,
    /// The original bytes as text (lossy UTF-8), cut after 4 KiB.
    pub payload: Option<String>,
    /// Size of the original bytes.
    pub payload_bytes: usize,
}

/// Reads the dead-letter topic back, newest first, with a short-lived consumer of its own
/// (assigned, no group membership, nothing committed).
#[derive(Clone)]
pub struct DeadLetterReader {
    kafka: shared::config::KafkaSettings,
    topic: String,
}

impl std::fmt::Debug for DeadLetterReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeadLetterReader")
            .field("topic", &self.topic)
            .finish()
    }
}

impl DeadLetterReader {
    /// A reader of `topic`.
    pub fn new(kafka: shared::config::KafkaSettings, topic: String) -> Self {
        DeadLetterReader { kafka, topic }
    }

    /// The dead-letter topic's name.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The total count and the newest `limit` dead letters, newest first (by `failed_at`, then
    /// offset). Reads at most `limit` messages from the end of each partition, for at most 5 s.
    /// Blocking: call from `spawn_blocking`.
    pub fn newest(&self, limit: usize) -> Result<(i64, Vec<DeadLetterView>), KafkaError> {
        let client: BaseConsumer = self
            .kafka
            .client_config()
            .set("group.id", format!("{}.explorer", self.topic))
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "false")
            .create()?;
        let marks = watermarks(&client, &self.topic)?;
        let total = marks.iter().map(|(_, low, high)| high - low).sum();
        let mut tpl = TopicPartitionList::new();
        let mut ends = BTreeMap::new();
        let want = i64::try_from(limit).unwrap_or(i64::MAX);
        for (p, low, high) in &marks {
            if high > low {
                let start = (*high - want).max(*low);
                tpl.add_partition_offset(&self.topic, *p, Offset::Offset(start))?;
                ends.insert(*p, *high);
            }
        }
        let mut letters = Vec::new();
        if ends.is_empty() {
            return Ok((total, letters));
        }
        client.assign(&tpl)?;
        let deadline = Instant::now() + READ_TIMEOUT;
        while !ends.is_empty() && Instant::now() < deadline {
            let Some(message) = client.poll(Duration::from_millis(100)) else {
                continue;
            };
            let m = message?;
            if m.offset() + 1 >= ends.get(&m.partition()).copied().unwrap_or(0) {
                ends.remove(&m.partition());
            }
            letters.push(view(&m));
        }
        letters.sort_by(|a, b| {
            b.failed_at
                .cmp(&a.failed_at)
                .then(a.partition.cmp(&b.partition))
                .then(b.offset.cmp(&a.offset))
        });
        letters.truncate(limit);
        Ok((total, letters))
    }
}

fn view<M: Message>(m: &M) -> DeadLetterView {
    let headers: BTreeMap<String, String> = m
        .headers()
        .map(|h| {
            h.iter()
                .map(|h| {
                    (
                        h.key.to_owned(),
                        String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    let text = |name: &str| headers.get(name).cloned();
    let payload = m.payload();
    DeadLetterView {
        partition: m.partition(),
        offset: m.offset(),
        key: m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
        code: text(header::ERROR_CODE),
        message: text(header::ERROR_MESSAGE),
        original_topic: text(header::ORIGINAL_TOPIC),
        original_partition: text(header::ORIGINAL_PARTITION).and_then(|p| p.parse().ok()),
        original_offset: text(header::ORIGINAL_OFFSET).and_then(|o| o.parse().ok()),
        failed_at: text(header::FAILED_AT),
        payload: payload
            .map(|p| String::from_utf8_lossy(&p[..p.len().min(PAYLOAD_PREVIEW)]).into_owned()),
        payload_bytes: payload.map_or(0, <[u8]>::len),
        headers,
    }
}
