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

/// What [`DeadLetterReader::page`] read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewestDeadLetters {
    /// Dead letters in the topic.
    pub total: i64,
    /// The newest of them (below the page's cursor), newest first.
    pub letters: Vec<DeadLetterView>,
    /// Where the next, older page starts; `None` on the last page.
    pub next: Option<PageCursor>,
}

/// Where a page of dead letters ends: per partition of the dead-letter topic, the offset below
/// which the next page reads (`<partition>:<offset>,…`). A partition it does not name has
/// nothing older left.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PageCursor(BTreeMap<i32, i64>);

impl PageCursor {
    /// Reads a cursor as [`PageCursor`]'s `Display` writes it; the error says what is wrong.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut ends = BTreeMap::new();
        for part in text.split(',').filter(|p| !p.is_empty()) {
            let (p, o) = part
                .split_once(':')
                .ok_or_else(|| format!("`{part}` is not <partition>:<offset>"))?;
            let p: i32 = p.parse().map_err(|_| format!("`{p}` is not a partition"))?;
            let o: i64 = o.parse().map_err(|_| format!("`{o}` is not an offset"))?;
            if p < 0 || o < 0 || ends.insert(p, o).is_some() {
                return Err(format!("`{part}` is not a new <partition>:<offset>"));
            }
        }
        Ok(PageCursor(ends))
    }
}

impl std::fmt::Display for PageCursor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: Vec<String> = self.0.iter().map(|(p, o)| format!("{p}:{o}")).collect();
        f.write_str(&parts.join(","))
    }
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

    /// The total count and the newest `limit` dead letters, newest first.
    pub fn newest(&self, limit: usize) -> Result<NewestDeadLetters, KafkaError> {
        self.page(limit, None)
    }

    /// A page of at most `limit` dead letters, newest first, older than `before` (a cursor from
    /// an earlier page; `None`: from the newest). Partitions are merged by `failed_at` and each
    /// is taken from its end down, so paging on from `next` shows every letter once. Reads at
    /// most `limit` messages per partition and keeps their views (payloads cut at 4 KiB): the
    /// cost is bounded by `limit`, not by the topic. Fails when a partition cannot be read to its
    /// page's end within 5 s. Blocking: call from `spawn_blocking`.
    pub fn page(
        &self,
        limit: usize,
        before: Option<&PageCursor>,
    ) -> Result<NewestDeadLetters, KafkaError> {
        let want = i64::try_from(limit).unwrap_or(i64::MAX);
        let mut ranges = BTreeMap::new();
        let (total, read) = self.read(
            |m| {
                let end = match before {
                    None => m.high,
                    Some(cursor) => cursor
                        .0
                        .get(&m.partition)
                        .map_or(m.low, |e| (*e).min(m.high)),
                };
                let start = (end - want).max(m.low);
                ranges.insert(m.partition, (m.low, end));
                (start < end).then_some((start, end))
            },
            |m| view(m),
        )?;
        // Each partition newest (highest offset) first; the k-way merge takes the newest head.
        let mut lists: BTreeMap<i32, Vec<DeadLetterView>> = BTreeMap::new();
        for letter in read {
            lists.entry(letter.partition).or_default().push(letter);
        }
        for list in lists.values_mut() {
            list.sort_by_key(|l| l.offset);
        }
        let mut letters = Vec::with_capacity(limit.min(total.max(0) as usize));
        while letters.len() < limit {
            let newest = lists
                .iter()
                .filter_map(|(p, list)| Some((*p, list.last()?)))
                .max_by(|(_, a), (_, b)| {
                    a.failed_at
                        .cmp(&b.failed_at)
                        .then(b.partition.cmp(&a.partition))
                });
            let Some((p, _)) = newest else { break };
            letters.extend(lists.get_mut(&p).and_then(Vec::pop));
        }
        let mut ends = BTreeMap::new();
        for (p, (low, end)) in ranges {
            let next_end = letters
                .iter()
                .filter(|l| l.partition == p)
                .map(|l| l.offset)
                .min()
                .unwrap_or(end);
            if next_end > low {
                ends.insert(p, next_end);
            }
        }
        let next = (!ends.is_empty()).then_some(PageCursor(ends));
        Ok(NewestDeadLetters {
            total,
            letters,
            next,
        })
    }

    /// Every dead letter, by partition then offset, with the original messages. Reads until the
    /// end of every partition; fails when a partition goes 5 s without a message. Blocking.
    pub fn all(&self) -> Result<Vec<StoredDeadLetter>, KafkaError> {
        let (_, mut letters) = self.read(|m| Some((m.low, m.high)), |m| dead_letter(m))?;
        letters.sort_by_key(|l| (l.view.partition, l.view.offset));
        Ok(letters)
    }

    /// Reads the offsets `range(marks)` (start, end) of each partition, each message through
    /// `keep`; fails when one goes [`READ_TIMEOUT`] without a message before its end.
    fn read<T>(
        &self,
        mut range: impl FnMut(&PartitionMarks) -> Option<(i64, i64)>,
        keep: impl Fn(&rdkafka::message::BorrowedMessage<'_>) -> T,
    ) -> Result<(i64, Vec<T>), KafkaError> {
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
            if let Some((start, end)) = range(m).filter(|(start, end)| start < end) {
                tpl.add_partition_offset(&self.topic, m.partition, Offset::Offset(start))?;
                ends.insert(m.partition, end);
            }
        }
        let mut kept = Vec::new();
        if ends.is_empty() {
            return Ok((total, kept));
        }
        client.assign(&tpl)?;
        let mut deadline = Instant::now() + READ_TIMEOUT;
        while !ends.is_empty() {
            if Instant::now() >= deadline {
                return Err(KafkaError::MessageConsumption(
                    rdkafka::types::RDKafkaErrorCode::OperationTimedOut,
                ));
            }
            let Some(message) = client.poll(Duration::from_millis(100)) else {
                continue;
            };
            let m = message?;
            let Some(end) = ends.get(&m.partition()).copied() else {
                continue;
            };
            if m.offset() >= end {
                continue;
            }
            if m.offset() + 1 >= end {
                ends.remove(&m.partition());
            }
            kept.push(keep(&m));
            deadline = Instant::now() + READ_TIMEOUT;
        }
        Ok((total, kept))
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
