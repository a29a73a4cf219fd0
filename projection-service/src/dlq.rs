//! The dead-letter topic `<prefix>.events.dlq`: the original key, bytes and headers, plus headers
//! that say where the message came from and why it could not be projected:
//! `dlq.original.topic`, `dlq.original.partition`, `dlq.original.offset`, `dlq.error.code`,
//! `dlq.error.message`, `dlq.failed.at`.
//!
//! Delivery is awaited (acks=all, idempotent producer) before the batch that dead-letters commits
//! its offsets, so nothing is lost; a crash in between sends it again (at-least-once).
//!
//! For the explorer, [`count_monitor`] keeps the number of dead letters in [`Status`] and
//! [`DeadLetterReader`] (in `shared::dlq`, with the header names, so that `bank dlq` reads them
//! the same way) reads the newest ones back (`GET /dead-letters`).

use std::sync::Arc;
use std::time::Duration;

use futures::future::try_join_all;
use rdkafka::consumer::BaseConsumer;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use shared::shutdown::Shutdown;

pub use shared::dlq::{DeadLetterReader, DeadLetterView, header};
use shared::dlq::{PartitionMarks, watermarks};

use crate::plan::DeadLetter;
use crate::projector::Status;

/// The most bytes (key, value and headers) a dead letter takes: below librdkafka's default
/// `message.max.bytes` (1,000,000) and the broker's (1,048,588), with room for the record
/// overhead. A larger letter has its value cut.
pub(crate) const MAX_LETTER_BYTES: usize = 900_000;
/// Room for the `dlq.original.truncated` header.
const TRUNCATION_HEADER_BYTES: usize = 64;

/// Bytes of header names and values.
fn headers_size(headers: &OwnedHeaders) -> usize {
    headers
        .iter()
        .map(|h| h.key.len() + h.value.map_or(0, <[u8]>::len))
        .sum()
}

/// How often [`count_monitor`] counts the dead letters.
pub const COUNT_INTERVAL: Duration = Duration::from_secs(2);

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

    /// Sends every dead letter and waits until all are acknowledged. A letter too large for
    /// the topic goes with its value cut (see [`MAX_LETTER_BYTES`]), or without it if the
    /// broker still refuses it, so that poison never blocks its partition.
    pub async fn send_all(&self, letters: &[DeadLetter]) -> Result<(), KafkaError> {
        let failed_at = crate::db::format_ts(&chrono::Utc::now());
        try_join_all(letters.iter().map(|letter| self.send(letter, &failed_at))).await?;
        Ok(())
    }

    async fn send(&self, letter: &DeadLetter, failed_at: &str) -> Result<(), KafkaError> {
        let headers = self.headers(letter, failed_at);
        let payload = letter.payload.as_deref();
        let budget = MAX_LETTER_BYTES
            .saturating_sub(letter.key.as_ref().map_or(0, Vec::len))
            .saturating_sub(headers_size(&headers) + TRUNCATION_HEADER_BYTES);
        match payload {
            Some(bytes) if bytes.len() > budget => {
                self.send_truncated(letter, headers, bytes, budget).await
            }
            _ => self.produce(letter, headers, payload).await,
        }
    }

    /// Sends the first `budget` bytes of the value and says so in a header; if the broker
    /// still refuses the size, sends the letter without a value.
    async fn send_truncated(
        &self,
        letter: &DeadLetter,
        headers: OwnedHeaders,
        bytes: &[u8],
        budget: usize,
    ) -> Result<(), KafkaError> {
        tracing::warn!(
            partition = letter.partition,
            offset = letter.offset,
            size = bytes.len(),
            kept = budget,
            "dead letter too large: its value is cut"
        );
        let size = bytes.len().to_string();
        let headers = headers.insert(Header {
            key: header::ORIGINAL_TRUNCATED,
            value: Some(size.as_str()),
        });
        match self
            .produce(letter, headers.clone(), Some(&bytes[..budget]))
            .await
        {
            Err(KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge)) => {
                self.produce(letter, headers, None).await
            }
            other => other,
        }
    }

    async fn produce(
        &self,
        letter: &DeadLetter,
        headers: OwnedHeaders,
        payload: Option<&[u8]>,
    ) -> Result<(), KafkaError> {
        let mut record: FutureRecord<'_, [u8], [u8]> =
            FutureRecord::to(&self.topic).headers(headers);
        if let Some(key) = &letter.key {
            record = record.key(key.as_slice());
        }
        if let Some(payload) = payload {
            record = record.payload(payload);
        }
        self.producer
            .send(record, Duration::from_secs(30))
            .await
            .map(|_| ())
            .map_err(|(e, _)| e)
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

/// Every [`COUNT_INTERVAL`] until `shutdown`: the number of messages in the dead-letter topic
/// (the sum over its partitions of high minus low watermark; the producer is not transactional,
/// so every offset is a message), stored in [`Status`] for `GET /status` and in the
/// `projection_dead_letters` gauge.
pub async fn count_monitor(
    client: Arc<BaseConsumer>,
    topic: String,
    status: Arc<Status>,
    shutdown: Shutdown,
) {
    let mut tick = tokio::time::interval(COUNT_INTERVAL);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.wait() => return,
        }
        let query = {
            let client = client.clone();
            let topic = topic.clone();
            tokio::task::spawn_blocking(move || watermarks(&*client, &topic))
        };
        let counted = tokio::select! {
            counted = query => counted,
            _ = shutdown.wait() => return,
        };
        match counted {
            Ok(Ok(marks)) => {
                let count = marks.iter().map(PartitionMarks::count).sum();
                status.set_dead_letters(Some(count));
                let events = topic.strip_suffix(".dlq").unwrap_or(&topic);
                crate::metrics::record_dead_letter_count(events, count);
            }
            Ok(Err(e)) => tracing::debug!(error = %e, %topic, "cannot count dead letters"),
            Err(_) => {}
        }
    }
}
