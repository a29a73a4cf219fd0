//! The checks at the end of a run: the answers against the reference model, the events topic
//! against the accepted commands (nothing lost, nothing twice, no version gap), and the read
//! model against the model's fold.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::time::{Duration, Instant};

use anyhow::Result;
use rdkafka::message::{Headers, Message};
use serde_json::Value;
use shared::config::KafkaSettings;
use shared::kafka::TopicReader;
use uuid::Uuid;

use crate::driver::Driver;
use crate::model::{Account, Outcome};

/// What a run (or all runs) found. Every count but `commands` must be zero.
#[derive(Debug, Default, Clone)]
pub(crate) struct Tally {
    pub(crate) commands: usize,
    pub(crate) lost: usize,
    pub(crate) duplicated: usize,
    pub(crate) version_gaps: usize,
    pub(crate) missing_results: usize,
    pub(crate) wrong_answers: usize,
    pub(crate) read_model_diffs: usize,
    pub(crate) poison_unhandled: usize,
    /// Services that exited on their own (not killed by the suite, not a fenced zombie).
    pub(crate) crashes: usize,
    /// Faults after which no command was answered for [`crate::STALL_LIMIT`].
    pub(crate) stalls: usize,
    /// What went wrong, for people (the first few of each kind).
    pub(crate) notes: Vec<String>,
}

impl Tally {
    pub(crate) fn add(&mut self, other: &Tally) {
        self.commands += other.commands;
        self.lost += other.lost;
        self.duplicated += other.duplicated;
        self.version_gaps += other.version_gaps;
        self.missing_results += other.missing_results;
        self.wrong_answers += other.wrong_answers;
        self.read_model_diffs += other.read_model_diffs;
        self.poison_unhandled += other.poison_unhandled;
        self.crashes += other.crashes;
        self.stalls += other.stalls;
        self.notes.extend(other.notes.iter().cloned());
    }

    pub(crate) fn ok(&self) -> bool {
        self.lost == 0
            && self.duplicated == 0
            && self.version_gaps == 0
            && self.missing_results == 0
            && self.wrong_answers == 0
            && self.read_model_diffs == 0
            && self.poison_unhandled == 0
            && self.crashes == 0
            && self.stalls == 0
    }

    fn note(&mut self, note: String) {
        if self.notes.len() < 40 {
            self.notes.push(note);
        }
    }
}

/// One event as the check sees it: from the record's headers only.
struct SeenEvent {
    version: Option<u64>,
    command_id: Option<Uuid>,
}

fn header(msg: &impl Message, name: &str) -> Option<String> {
    let headers = msg.headers()?;
    headers
        .iter()
        .find(|h| h.key == name)
        .and_then(|h| h.value)
        .map(|v| String::from_utf8_lossy(v).into_owned())
}

/// Reads a whole topic (read_committed) and returns `(key, record)` pairs through `each`.
async fn read_topic<T: Send + 'static>(
    kafka: &KafkaSettings,
    topic: &str,
    partitions: i32,
    each: impl Fn(&rdkafka::message::BorrowedMessage<'_>) -> Option<T> + Send + 'static,
) -> Result<Vec<T>> {
    let kafka = kafka.clone();
    let topic = topic.to_owned();
    let all: Vec<i32> = (0..partitions).collect();
    tokio::task::spawn_blocking(move || -> Result<Vec<T>> {
        let group = format!("faults.check.{}", Uuid::new_v4().simple());
        let reader = TopicReader::open(&kafka, &group, &topic, &all)?;
        let mut out = Vec::new();
        reader.drain(|m| out.extend(each(m)));
        Ok(out)
    })
    .await?
}

/// Checks a finished run: `accounts` are the model's final states.
pub(crate) async fn check_run(
    driver: &Driver,
    kafka: &KafkaSettings,
    partitions: i32,
    accounts: &BTreeMap<String, Account>,
    projection_url: &str,
    http: &reqwest::Client,
) -> Result<Tally> {
    let mut tally = Tally::default();
    let ledger = driver.ledger.lock().unwrap().clone();
    let answers = driver.answers.all.lock().unwrap().clone();
    tally.commands = ledger.len();

    // 1. Every command answered, as the model predicted, the same way every time.
    let mut accepted: HashMap<Uuid, (String, u64)> = HashMap::new();
    for sent in &ledger {
        match &sent.answer {
            None => {
                tally.missing_results += 1;
                tally.note(format!(
                    "missing result: command {} for {} (expected {:?})",
                    sent.command_id, sent.account, sent.expected
                ));
                continue;
            }
            Some(answer) if *answer != sent.expected => {
                tally.wrong_answers += 1;
                tally.note(format!(
                    "wrong answer: command {} for {}: got {answer:?}, the model expected {:?}",
                    sent.command_id, sent.account, sent.expected
                ));
            }
            Some(_) => {}
        }
        let all = answers.get(&sent.command_id).cloned().unwrap_or_default();
        let distinct: HashSet<String> = all.iter().map(|o| format!("{o:?}")).collect();
        if distinct.len() > 1 {
            // Answered differently on a retry: two versions means it applied twice.
            tally.duplicated += 1;
            tally.note(format!(
                "command {} for {} answered differently on retry: {all:?}",
                sent.command_id, sent.account
            ));
        }
        if let (Outcome::Accepted { version }, Some(Outcome::Accepted { .. })) =
            (&sent.expected, &sent.answer)
        {
            accepted.insert(sent.command_id, (sent.account.clone(), *version));
        }
    }

    // 2. The events topic holds exactly the accepted commands, versions contiguous.
    let events = read_topic(kafka, &driver.topics().events(), partitions, |m| {
        let key = m.key().map(|k| String::from_utf8_lossy(k).into_owned())?;
        Some((
            key,
            SeenEvent {
                version: header(m, "aggregate_version").and_then(|v| v.parse().ok()),
                command_id: header(m, "command_id").and_then(|v| Uuid::parse_str(&v).ok()),
            },
        ))
    })
    .await?;
    let mut by_account: BTreeMap<String, Vec<SeenEvent>> = BTreeMap::new();
    for (key, event) in events {
        if accounts.contains_key(&key) {
            by_account.entry(key).or_default().push(event);
        }
    }
    let mut seen_commands: HashMap<Uuid, usize> = HashMap::new();
    for (account, events) in &by_account {
        let versions: BTreeSet<u64> = events.iter().filter_map(|e| e.version).collect();
        let dups = events.len() - versions.len();
        if dups > 0 {
            tally.duplicated += dups;
            tally.note(format!(
                "{account}: {dups} event(s) with a version seen before"
            ));
        }
        let max = versions.last().copied().unwrap_or(0);
        let gaps = max as usize - versions.len();
        if gaps > 0 {
            tally.version_gaps += gaps;
            tally.note(format!("{account}: {gaps} version(s) missing below {max}"));
        }
        for e in events {
            if let Some(id) = e.command_id {
                *seen_commands.entry(id).or_default() += 1;
                if !accepted.contains_key(&id) {
                    tally.wrong_answers += 1;
                    tally.note(format!(
                        "{account}: event v{:?} of command {id}, which the model did not accept",
                        e.version
                    ));
                }
            }
        }
    }
    for (id, (account, version)) in &accepted {
        match seen_commands.get(id) {
            None => {
                tally.lost += 1;
                tally.note(format!(
                    "lost: accepted command {id} ({account} v{version}) has no event"
                ));
            }
            Some(n) if *n > 1 => {
                tally.duplicated += n - 1;
                tally.note(format!("{account}: command {id} has {n} events"));
            }
            Some(_) => {}
        }
    }

    // 3. The read model is the model's fold (waiting for the projection to catch up).
    let deadline = Instant::now() + Duration::from_secs(90);
    for (id, want) in accounts {
        let url = format!("{projection_url}/accounts/{id}");
        let mut last = String::from("no answer");
        let matches = loop {
            let got = match http.get(&url).send().await {
                Ok(resp) if resp.status().is_success() => resp.json::<Value>().await.ok(),
                Ok(resp) if resp.status().as_u16() == 404 => Some(Value::Null),
                _ => None,
            };
            if let Some(got) = got {
                let same = if want.opened {
                    got.get("balance_minor").and_then(Value::as_i64) == Some(want.balance_minor)
                        && got.get("version").and_then(Value::as_u64) == Some(want.version)
                        && got.get("status").and_then(Value::as_str) == Some(want.status())
                } else {
                    got.is_null()
                };
                if same {
                    break true;
                }
                last = got.to_string();
            }
            if Instant::now() > deadline {
                break false;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        if !matches {
            tally.read_model_diffs += 1;
            tally.note(format!(
                "read model: {id} is {last}, the model has balance {} version {} {}",
                want.balance_minor,
                want.version,
                want.status()
            ));
        }
    }
    Ok(tally)
}

/// Reads `<prefix>.events.dlq` and returns the error codes of the letters that came from
/// `<prefix>.events`.
pub(crate) async fn dead_letter_codes(
    driver: &Driver,
    kafka: &KafkaSettings,
    partitions: i32,
) -> Result<Vec<String>> {
    let events = driver.topics().events();
    read_topic(kafka, &driver.topics().events_dlq(), partitions, move |m| {
        (header(m, "dlq.original.topic").as_deref() == Some(events.as_str()))
            .then(|| header(m, "dlq.error.code").unwrap_or_default())
    })
    .await
}
