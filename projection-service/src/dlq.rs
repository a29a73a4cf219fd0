//! The dead-letter topic `<prefix>.events.dlq`: the original key, bytes and headers, plus headers
//! that say where the message came from and why it could not be projected:
//! `dlq.original.topic`, `dlq.original.partition`, `dlq.original.offset`, `dlq.error.code`,
//! `dlq.error.message`, `dlq.failed.at`.
//!
//! Delivery is awaited (acks=all, idempotent producer) before the batch that dead-letters commits
//! its offsets, so nothing is lost; a crash in between sends it again (at-least-once).

use std::time::Duration;

use futures::future::try_join_all;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::plan::DeadLetter;

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
