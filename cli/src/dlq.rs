//! `bank dlq list` and `bank dlq replay`: the dead letters of `<prefix>.events.dlq`, read with
//! [`shared::dlq::DeadLetterReader`] (the reader behind the explorer's `GET /dead-letters`), and
//! sent back to `<prefix>.events` exactly as they were (key, bytes, headers without the `dlq.*`
//! ones) on the key's canonical partition.
//!
//! A replay first decodes each letter with the same codec as the projection: a letter that still
//! fails is held back (unless `--force`), so a poison message is only replayed once its cause is
//! fixed (a schema registered, a decoder upgraded). Letters refused for the projection's state
//! (`NotApplicable`, `Unstorable`) decode fine and are sent; the projection decides again.
//! Replaying twice is harmless: readers skip versions they already have.

use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde::Serialize;
use serde_json::json;
use shared::Settings;
use shared::dlq::{DeadLetterReader, StoredDeadLetter, header};
use shared::kafka::{Topics, canonical_partition};
use shared::{DecodeError, EventCodec};

use crate::error::CliError;
use crate::output;

/// Client group id of the reader, under `<prefix>.client.` like every group the CLI uses
/// (assigned partitions only; nothing is committed).
fn group_id(settings: &Settings) -> String {
    format!("{}.client.dlq", settings.topic_prefix)
}

/// How long a replayed message may take to be acknowledged.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(30);

/// `bank dlq list`.
pub async fn list(settings: &Settings, json: bool) -> Result<(), CliError> {
    let topic = Topics::new(&settings.topic_prefix).events_dlq();
    let letters = read_all(settings).await?;
    if json {
        let views: Vec<_> = letters
            .iter()
            .map(|l| {
                let mut v = serde_json::to_value(&l.view).unwrap_or_default();
                v["id"] = json!(l.view.id());
                v
            })
            .collect();
        println!(
            "{}",
            output::json(&json!({ "topic": topic, "dead_letters": views }))
        );
    } else {
        print!("{}", table(&topic, &letters));
    }
    Ok(())
}

/// The people's rendering of `bank dlq list`.
pub fn table(topic: &str, letters: &[StoredDeadLetter]) -> String {
    if letters.is_empty() {
        return format!("no dead letters in {topic}\n");
    }
    let dash = || "-".to_owned();
    let rows: Vec<Vec<String>> = letters
        .iter()
        .map(|l| {
            let v = &l.view;
            vec![
                v.id(),
                v.failed_at.clone().unwrap_or_else(dash),
                v.code.clone().unwrap_or_else(dash),
                match (v.original_partition, v.original_offset) {
                    (Some(p), Some(o)) => format!("{p}:{o}"),
                    _ => dash(),
                },
                v.key.clone().unwrap_or_else(dash),
                v.message.clone().unwrap_or_default(),
            ]
        })
        .collect();
    let mut text = output::table(
        &["ID", "FAILED AT", "REASON", "ORIGINAL", "KEY", "MESSAGE"],
        &[false; 6],
        &rows,
    );
    text.push_str(&format!(
        "{} dead letter(s) in {topic}; ORIGINAL is partition:offset in the events topic; \
         replay with `bank dlq replay --id ID`\n",
        letters.len()
    ));
    text
}

/// What happened to one letter in a replay.
#[derive(Debug, Clone, Serialize)]
pub struct Replayed {
    /// The letter's id (`partition:offset` in the dead-letter topic).
    pub id: String,
    /// The account (key).
    pub key: Option<String>,
    /// Where it went in the events topic, if it was sent.
    pub partition: Option<i32>,
    /// Its new offset there.
    pub offset: Option<i64>,
    /// Why it was held back, if it was.
    pub held_back: Option<String>,
}

/// A dead letter's place in the dead-letter topic: its id `PARTITION:OFFSET`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct LetterId {
    partition: i32,
    offset: i64,
}

/// `bank dlq replay`.
pub async fn replay(
    settings: &Settings,
    ids: &[String],
    all: bool,
    force: bool,
    json: bool,
) -> Result<(), CliError> {
    let wanted: Vec<LetterId> = ids
        .iter()
        .map(|id| parse_id(id))
        .collect::<Result<_, _>>()?;
    let topics = Topics::new(&settings.topic_prefix);
    let letters = read_all(settings).await?;
    let selected = if all {
        letters.iter().collect()
    } else {
        select(&letters, &wanted, &topics.events_dlq())?
    };
    let replayer = Replayer::new(settings, force).await?;
    let mut outcomes = Vec::with_capacity(selected.len());
    for letter in selected {
        outcomes.push(replayer.replay(letter).await?);
    }
    report(&outcomes, json, &topics)
}

/// The letters with the `wanted` ids, in that order; an error naming the first id that is not
/// in the dead-letter topic `dlq`.
fn select<'a>(
    letters: &'a [StoredDeadLetter],
    wanted: &[LetterId],
    dlq: &str,
) -> Result<Vec<&'a StoredDeadLetter>, CliError> {
    wanted
        .iter()
        .map(|LetterId { partition, offset }| {
            letters
                .iter()
                .find(|l| l.view.partition == *partition && l.view.offset == *offset)
                .ok_or_else(|| {
                    CliError::NotFound(format!(
                        "no dead letter {partition}:{offset} in {dlq} (see `bank dlq list`)"
                    ))
                })
        })
        .collect()
}

/// Sends letters back to the events topic, or holds back those that would fail again.
struct Replayer<'a> {
    settings: &'a Settings,
    /// `<prefix>.events`.
    events: String,
    /// Its partition count, for the canonical partition of each key.
    partitions: i32,
    codec: EventCodec,
    producer: FutureProducer,
    /// Send letters that still fail too.
    force: bool,
}

impl<'a> Replayer<'a> {
    async fn new(settings: &'a Settings, force: bool) -> Result<Replayer<'a>, CliError> {
        let events = Topics::new(&settings.topic_prefix).events();
        let partitions = partition_count(settings, &events).await?;
        let codec = EventCodec::from_settings(settings)
            .map_err(|e| CliError::Usage(format!("SCHEMA_REGISTRY_URL: {e}")))?;
        let producer: FutureProducer = settings
            .kafka
            .producer_config()
            .set("acks", "all")
            .set("message.timeout.ms", "30000")
            .create()
            .map_err(|e| unavailable(settings, e))?;
        Ok(Replayer {
            settings,
            events,
            partitions,
            codec,
            producer,
            force,
        })
    }

    /// Replays one letter, or holds it back with the reason it would fail again.
    async fn replay(&self, letter: &StoredDeadLetter) -> Result<Replayed, CliError> {
        let mut outcome = Replayed {
            id: letter.view.id(),
            key: letter.view.key.clone(),
            partition: None,
            offset: None,
            held_back: None,
        };
        if let Some(why) = cut_short(letter) {
            outcome.held_back = Some(why);
            return Ok(outcome);
        }
        match still_failing(&self.codec, letter).await? {
            Some(why) if !self.force => outcome.held_back = Some(why),
            _ => {
                let (partition, offset) = self.send(letter).await?;
                outcome.partition = Some(partition);
                outcome.offset = Some(offset);
            }
        }
        Ok(outcome)
    }

    /// Sends the letter's key, bytes and original headers to the key's canonical partition;
    /// returns the partition and offset it got.
    async fn send(&self, letter: &StoredDeadLetter) -> Result<(i32, i64), CliError> {
        let key = letter.key.as_deref().unwrap_or_default();
        let mut headers = OwnedHeaders::new();
        for (name, value) in &letter.original_headers {
            headers = headers.insert(Header {
                key: name,
                value: value.as_deref(),
            });
        }
        let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&self.events)
            .partition(canonical_partition(key, self.partitions))
            .key(key)
            .headers(headers);
        if let Some(payload) = &letter.payload {
            record = record.payload(payload.as_slice());
        }
        let delivered = self
            .producer
            .send(record, DELIVERY_TIMEOUT)
            .await
            .map_err(|(e, _)| unavailable(self.settings, e))?;
        Ok((delivered.partition, delivered.offset))
    }
}

/// Prints what a replay did (JSON on stdout, or a line per letter) and fails with
/// [`CliError::HeldBack`] when any letter was held back.
fn report(outcomes: &[Replayed], json: bool, topics: &Topics) -> Result<(), CliError> {
    if json {
        println!("{}", output::json(&outcomes));
    } else if outcomes.is_empty() {
        println!("no dead letters in {}", topics.events_dlq());
    }
    let events = topics.events();
    for o in outcomes {
        let key = o.key.as_deref().unwrap_or("-");
        match (&o.held_back, o.partition, o.offset) {
            (Some(why), _, _) => eprintln!("held back {} (key {key}): {why}", o.id),
            (None, Some(p), Some(off)) if !json => {
                println!(
                    "replayed {} (key {key}) to {events} partition {p} offset {off}",
                    o.id
                );
            }
            _ => {}
        }
    }
    let held: Vec<&str> = outcomes
        .iter()
        .filter(|o| o.held_back.is_some())
        .map(|o| o.id.as_str())
        .collect();
    if held.is_empty() {
        Ok(())
    } else {
        Err(CliError::HeldBack(format!(
            "{} dead letter(s) still fail and were not replayed ({}): fix the cause, or pass \
             --force",
            held.len(),
            held.join(", ")
        )))
    }
}

/// Why this letter can never be replayed, not even with `--force`: it holds only the first bytes
/// of an original too large to dead-letter whole (`dlq.original.truncated`), and replaying them
/// would store a different event. The original is still on its topic.
fn cut_short(letter: &StoredDeadLetter) -> Option<String> {
    let size = letter.view.headers.get(header::ORIGINAL_TRUNCATED)?;
    let view = &letter.view;
    let at = |v: Option<String>| v.unwrap_or_else(|| "?".into());
    Some(format!(
        "it holds only the first bytes of a {size}-byte original ({}); copy the original from {} \
         partition {} offset {} instead (never replayed, not even with --force)",
        header::ORIGINAL_TRUNCATED,
        at(view.original_topic.clone()),
        at(view.original_partition.map(|p| p.to_string())),
        at(view.original_offset.map(|o| o.to_string())),
    ))
}

/// Why this letter would be dead-lettered again, if it would: no key, or bytes the codec cannot
/// decode (or whose account is not the key). A registry that cannot be reached is an error.
async fn still_failing(
    codec: &EventCodec,
    letter: &StoredDeadLetter,
) -> Result<Option<String>, CliError> {
    let Some(key) = letter.key.as_deref().filter(|k| !k.is_empty()) else {
        return Ok(Some("it has no key, so it has no partition".into()));
    };
    let Some(payload) = letter.payload.as_deref() else {
        return Ok(Some(
            DecodeError::Empty.code().to_owned() + ": empty message",
        ));
    };
    match codec.decode(payload).await {
        Ok(envelope) if envelope.aggregate_id.as_bytes() == key => Ok(None),
        Ok(envelope) => Ok(Some(format!(
            "its key is not its account ({})",
            envelope.aggregate_id
        ))),
        Err(e) if e.is_retriable() => Err(CliError::Unavailable(format!(
            "cannot check dead letter {}: {e}",
            letter.view.id()
        ))),
        Err(e) => Ok(Some(format!("{}: {e}", e.code()))),
    }
}

/// `PARTITION:OFFSET`.
fn parse_id(id: &str) -> Result<LetterId, CliError> {
    id.split_once(':')
        .and_then(|(p, o)| {
            Some(LetterId {
                partition: p.trim().parse().ok()?,
                offset: o.trim().parse().ok()?,
            })
        })
        .filter(|id| id.partition >= 0 && id.offset >= 0)
        .ok_or_else(|| {
            CliError::Usage(format!(
                "--id `{id}` is not PARTITION:OFFSET like `0:12` (see `bank dlq list`)"
            ))
        })
}

async fn read_all(settings: &Settings) -> Result<Vec<StoredDeadLetter>, CliError> {
    let reader = DeadLetterReader::new(
        settings.kafka.clone(),
        Topics::new(&settings.topic_prefix).events_dlq(),
    )
    .with_group_id(group_id(settings));
    tokio::task::spawn_blocking(move || reader.all())
        .await
        .map_err(|e| CliError::Unavailable(format!("reading the dead letters failed: {e}")))?
        .map_err(|e| unavailable(settings, e))
}

/// The partition count of `topic`; an error when it does not exist.
pub async fn partition_count(settings: &Settings, topic: &str) -> Result<i32, CliError> {
    let client: BaseConsumer = settings
        .kafka
        .client_config()
        .create()
        .map_err(|e| unavailable(settings, e))?;
    let name = topic.to_owned();
    let metadata = tokio::task::spawn_blocking(move || {
        client.fetch_metadata(Some(&name), Duration::from_secs(10))
    })
    .await
    .map_err(|e| CliError::Unavailable(format!("reading Kafka metadata failed: {e}")))?
    .map_err(|e| unavailable(settings, e))?;
    let count = metadata
        .topics()
        .iter()
        .find(|t| t.name() == topic && t.error().is_none())
        .map_or(0, |t| t.partitions().len());
    match i32::try_from(count) {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(CliError::Unavailable(format!(
            "topic {topic} does not exist at {}: is command-service running with this \
             TOPIC_PREFIX?",
            settings.kafka.bootstrap_servers
        ))),
    }
}

/// A Kafka failure: exit 3, naming the broker.
pub fn unavailable(settings: &Settings, e: rdkafka::error::KafkaError) -> CliError {
    CliError::Unavailable(format!(
        "cannot reach Kafka at {}: {e}",
        settings.kafka.bootstrap_servers
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_partition_colon_offset() {
        let id = |partition, offset| LetterId { partition, offset };
        assert_eq!(parse_id("0:12").unwrap(), id(0, 12));
        assert_eq!(parse_id(" 2 : 3 ").unwrap(), id(2, 3));
        for bad in ["", "3", "a:1", "1:-1", "-1:0", "1:2:3"] {
            let err = parse_id(bad).unwrap_err();
            assert_eq!(err.exit_code(), 2, "{bad}");
        }
    }

    #[test]
    fn a_truncated_letter_is_never_replayable_and_says_where_the_original_is() {
        let mut letter = StoredDeadLetter {
            view: shared::dlq::DeadLetterView {
                original_topic: Some("t.events".into()),
                original_partition: Some(2),
                original_offset: Some(41),
                ..Default::default()
            },
            key: Some(b"acc-1".to_vec()),
            payload: Some(vec![b'{'; 10]),
            original_headers: vec![],
        };
        assert_eq!(cut_short(&letter), None, "a whole letter");
        letter
            .view
            .headers
            .insert(header::ORIGINAL_TRUNCATED.into(), "1048600".into());
        let why = cut_short(&letter).expect("a cut letter is held back");
        assert!(
            why.contains("1048600-byte original") && why.contains("t.events partition 2 offset 41"),
            "{why}"
        );
    }

    #[test]
    fn an_empty_topic_says_so() {
        assert_eq!(
            table("t.events.dlq", &[]),
            "no dead letters in t.events.dlq\n"
        );
    }
}
