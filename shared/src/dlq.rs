//! Reading the dead-letter topic `<prefix>.events.dlq` back: its header names, a view of each
//! dead letter ([`DeadLetterView`]) and [`DeadLetterReader`], used by the projection's explorer
//! (`GET /dead-letters`) and by `bank dlq list` / `bank dlq replay`.
//!
//! A dead letter is the original message (key, bytes and headers) plus headers that say where it
//! came from and why it could not be projected (see [`header`]).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::message::{Headers, Message};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use serde::Serialize;

use crate::DecodeError;
use crate::bank_account::EventDataError;
use crate::config::KafkaSettings;

/// How long reading dead letters back may go without a message before giving up.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Payload bytes shown per dead letter; the rest is cut.
const PAYLOAD_PREVIEW: usize = 4096;

/// Header names of dead letters.
pub mod header {
    /// Prefix of every header the dead-letter queue adds (the original headers have none).
    pub const PREFIX: &str = "dlq.";
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
    /// Present when the original value was too large to dead-letter whole: its size in bytes.
    /// The letter then carries only the value's first bytes (or none); the original stays at
    /// `dlq.original.topic` / `.partition` / `.offset`.
    pub const ORIGINAL_TRUNCATED: &str = "dlq.original.truncated";
}

/// Why a message was dead-lettered: the stable code in the `dlq.error.code` header. The wire
/// form ([`DeadLetterCode::as_str`], also the serde form) never changes; metrics use it in
/// snake_case.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, serde::Deserialize)]
pub enum DeadLetterCode {
    /// The message has no value.
    Empty,
    /// Shorter than the Confluent wire-format header.
    Truncated,
    /// Neither a JSON object nor the Confluent wire format.
    UnknownFormat,
    /// Not valid JSON.
    InvalidJson,
    /// The schema registry does not know the schema id.
    SchemaRegistry,
    /// The event could not be upcast to the current schema version.
    UpcastFailed,
    /// The envelope lacks or mistypes a field.
    InvalidEnvelope,
    /// An event type this version does not know.
    UnknownEventType,
    /// The data does not fit the event type.
    InvalidEventData,
    /// The event does not apply to the account's state.
    NotApplicable,
    /// A value the read model cannot store (NUL byte, oversized text).
    Unstorable,
    /// An event on another partition than its account's (the partition count changed under
    /// existing events, or a producer used another partitioner).
    Misplaced,
}

impl DeadLetterCode {
    /// The code as it appears in `dlq.error.code`.
    pub fn as_str(self) -> &'static str {
        match self {
            DeadLetterCode::Empty => "Empty",
            DeadLetterCode::Truncated => "Truncated",
            DeadLetterCode::UnknownFormat => "UnknownFormat",
            DeadLetterCode::InvalidJson => "InvalidJson",
            DeadLetterCode::SchemaRegistry => "SchemaRegistry",
            DeadLetterCode::UpcastFailed => "UpcastFailed",
            DeadLetterCode::InvalidEnvelope => "InvalidEnvelope",
            DeadLetterCode::UnknownEventType => "UnknownEventType",
            DeadLetterCode::InvalidEventData => "InvalidEventData",
            DeadLetterCode::NotApplicable => "NotApplicable",
            DeadLetterCode::Unstorable => "Unstorable",
            DeadLetterCode::Misplaced => "Misplaced",
        }
    }
}

impl std::fmt::Display for DeadLetterCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<&DecodeError> for DeadLetterCode {
    fn from(e: &DecodeError) -> Self {
        match e {
            DecodeError::Empty => DeadLetterCode::Empty,
            DecodeError::Truncated(_) => DeadLetterCode::Truncated,
            DecodeError::UnknownFormat(_) => DeadLetterCode::UnknownFormat,
            DecodeError::NotJson(_) => DeadLetterCode::InvalidJson,
            DecodeError::Registry { .. } => DeadLetterCode::SchemaRegistry,
            DecodeError::Upcast(_) => DeadLetterCode::UpcastFailed,
            DecodeError::Envelope(_) => DeadLetterCode::InvalidEnvelope,
            DecodeError::Data(EventDataError::UnknownType(_)) => DeadLetterCode::UnknownEventType,
            DecodeError::Data(_) => DeadLetterCode::InvalidEventData,
        }
    }
}

/// The offsets one partition holds: from `low` (its first offset) to `high` (the next offset
/// to be written).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionMarks {
    /// The partition.
    pub partition: i32,
    /// Low watermark.
    pub low: i64,
    /// High watermark.
    pub high: i64,
}

impl PartitionMarks {
    /// Messages (or offsets) in the partition.
    pub fn count(&self) -> i64 {
        self.high - self.low
    }
}

/// The watermarks of every partition of `topic`; none when the topic does not exist. Blocking.
pub fn watermarks<C, X>(client: &C, topic: &str) -> Result<Vec<PartitionMarks>, KafkaError>
where
    C: Consumer<X>,
    X: ConsumerContext,
{
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
            Ok(PartitionMarks {
                partition: p,
                low,
                high,
            })
        })
        .collect()
}

/// One dead letter as `GET /dead-letters` and `bank dlq list` show it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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

impl DeadLetterView {
    /// The dead letter's id for `bank dlq replay --id`: `<partition>:<offset>` in the
    /// dead-letter topic.
    pub fn id(&self) -> String {
        format!("{}:{}", self.partition, self.offset)
    }
}

/// What [`DeadLetterReader::newest`] read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewestDeadLetters {
    /// Dead letters in the topic.
    pub total: i64,
    /// The newest of them, newest first.
    pub letters: Vec<DeadLetterView>,
}

/// A dead letter with the original message exactly as it was: what a replay sends back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredDeadLetter {
    /// How it is shown.
    pub view: DeadLetterView,
    /// The original key.
    pub key: Option<Vec<u8>>,
    /// The original bytes.
    pub payload: Option<Vec<u8>>,
    /// The original headers, in order (the `dlq.*` ones left out).
    pub original_headers: Vec<(String, Option<Vec<u8>>)>,
}

/// Reads the dead-letter topic back with a short-lived consumer of its own (assigned, no group
/// membership, nothing committed).
#[derive(Clone)]
pub struct DeadLetterReader {
    kafka: KafkaSettings,
    topic: String,
    group_id: String,
}

impl std::fmt::Debug for DeadLetterReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeadLetterReader")
            .field("topic", &self.topic)
            .finish()
    }
}

impl DeadLetterReader {
    /// A reader of `topic` (its client group id is `<topic>.explorer`; nothing is committed).
    pub fn new(kafka: KafkaSettings, topic: String) -> Self {
        let group_id = format!("{topic}.explorer");
        DeadLetterReader {
            kafka,
            topic,
            group_id,
        }
    }

    /// The same reader with another client group id (nothing is ever committed under it).
    pub fn with_group_id(mut self, group_id: impl Into<String>) -> Self {
        self.group_id = group_id.into();
        self
    }

    /// The dead-letter topic's name.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The total count and the newest `limit` dead letters, newest first (by `failed_at`, then
    /// offset). Reads at most `limit` messages from the end of each partition, for at most 5 s.
    /// Blocking: call from `spawn_blocking`.
    pub fn newest(&self, limit: usize) -> Result<NewestDeadLetters, KafkaError> {
        let want = i64::try_from(limit).unwrap_or(i64::MAX);
        let (total, letters) = self.read(|low, high| (high - want).max(low), true)?;
        let mut letters: Vec<DeadLetterView> = letters.into_iter().map(|l| l.view).collect();
        letters.sort_by(|a, b| {
            b.failed_at
                .cmp(&a.failed_at)
                .then(a.partition.cmp(&b.partition))
                .then(b.offset.cmp(&a.offset))
        });
        letters.truncate(limit);
        Ok(NewestDeadLetters { total, letters })
    }

    /// Every dead letter, by partition then offset, with the original messages. Reads until the
    /// end of every partition; gives up when no message came for 5 s. Blocking.
    pub fn all(&self) -> Result<Vec<StoredDeadLetter>, KafkaError> {
        let (_, mut letters) = self.read(|low, _| low, false)?;
        letters.sort_by_key(|l| (l.view.partition, l.view.offset));
        Ok(letters)
    }

    /// Reads each partition from `start(low, high)` to its high watermark.
    fn read(
        &self,
        start: impl Fn(i64, i64) -> i64,
        overall_deadline: bool,
    ) -> Result<(i64, Vec<StoredDeadLetter>), KafkaError> {
        let client: BaseConsumer = self
            .kafka
            .client_config()
            .set("group.id", &self.group_id)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "false")
            .create()?;
        let marks = watermarks(&client, &self.topic)?;
        let total = marks.iter().map(PartitionMarks::count).sum();
        let mut tpl = TopicPartitionList::new();
        let mut ends = BTreeMap::new();
        for m in &marks {
            if m.high > m.low {
                tpl.add_partition_offset(
                    &self.topic,
                    m.partition,
                    Offset::Offset(start(m.low, m.high)),
                )?;
                ends.insert(m.partition, m.high);
            }
        }
        let mut letters = Vec::new();
        if ends.is_empty() {
            return Ok((total, letters));
        }
        client.assign(&tpl)?;
        let mut deadline = Instant::now() + READ_TIMEOUT;
        while !ends.is_empty() && Instant::now() < deadline {
            let Some(message) = client.poll(Duration::from_millis(100)) else {
                continue;
            };
            let m = message?;
            if m.offset() + 1 >= ends.get(&m.partition()).copied().unwrap_or(0) {
                ends.remove(&m.partition());
            }
            letters.push(dead_letter(&m));
            if !overall_deadline {
                deadline = Instant::now() + READ_TIMEOUT;
            }
        }
        Ok((total, letters))
    }
}

fn dead_letter<M: Message>(m: &M) -> StoredDeadLetter {
    let original_headers = m
        .headers()
        .map(|h| {
            h.iter()
                .filter(|h| !h.key.starts_with(header::PREFIX))
                .map(|h| (h.key.to_owned(), h.value.map(<[u8]>::to_vec)))
                .collect()
        })
        .unwrap_or_default();
    StoredDeadLetter {
        view: view(m),
        key: m.key().map(<[u8]>::to_vec),
        payload: m.payload().map(<[u8]>::to_vec),
        original_headers,
    }
}

/// A message's headers as text (values lossy UTF-8), by name.
pub fn headers_as_text<M: Message>(m: &M) -> BTreeMap<String, String> {
    m.headers()
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
        .unwrap_or_default()
}

fn view<M: Message>(m: &M) -> DeadLetterView {
    let headers = headers_as_text(m);
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

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::message::{Header, OwnedHeaders, OwnedMessage, Timestamp};

    #[test]
    fn decode_errors_have_stable_wire_codes() {
        let errors = [
            (DecodeError::Empty, "Empty"),
            (DecodeError::Truncated(2), "Truncated"),
            (DecodeError::UnknownFormat(b'x'), "UnknownFormat"),
            (DecodeError::NotJson("x".into()), "InvalidJson"),
            (
                DecodeError::Registry {
                    schema_id: 1,
                    message: "x".into(),
                    retriable: false,
                },
                "SchemaRegistry",
            ),
            (
                DecodeError::Upcast(crate::upcast::UpcastError::NoStep {
                    direction: "upcast",
                    event_type: "X".into(),
                    from: 0,
                }),
                "UpcastFailed",
            ),
            (DecodeError::Envelope("x".into()), "InvalidEnvelope"),
            (
                DecodeError::Data(EventDataError::UnknownType("X".into())),
                "UnknownEventType",
            ),
        ];
        for (e, code) in &errors {
            assert_eq!(e.code(), *code, "{e:?}");
        }
        assert_eq!(
            serde_json::to_string(&DeadLetterCode::NotApplicable).expect("json"),
            "\"NotApplicable\""
        );
    }

    #[test]
    fn a_dead_letter_keeps_the_original_headers_apart() {
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "event_type",
                value: Some("AccountOpened"),
            })
            .insert(Header {
                key: header::ERROR_CODE,
                value: Some("InvalidJson"),
            })
            .insert(Header {
                key: header::ORIGINAL_OFFSET,
                value: Some("17"),
            })
            .insert(Header::<&[u8]> {
                key: "empty",
                value: None,
            });
        let m = OwnedMessage::new(
            Some(b"{x".to_vec()),
            Some(b"acc-1".to_vec()),
            "t.events.dlq".into(),
            Timestamp::NotAvailable,
            2,
            5,
            Some(headers),
        );
        let letter = dead_letter(&m);
        assert_eq!(letter.view.id(), "2:5");
        assert_eq!(letter.view.code.as_deref(), Some("InvalidJson"));
        assert_eq!(letter.view.original_offset, Some(17));
        assert_eq!(letter.view.key.as_deref(), Some("acc-1"));
        assert_eq!(
            letter.original_headers,
            vec![
                ("event_type".to_owned(), Some(b"AccountOpened".to_vec())),
                ("empty".to_owned(), None)
            ]
        );
        assert_eq!(letter.payload.as_deref(), Some(&b"{x"[..]));
    }
}
