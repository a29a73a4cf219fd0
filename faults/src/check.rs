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

use crate::driver::{Driver, Sent};
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
    /// Instances fenced by a twin with their INSTANCE_ID that did not stop by themselves (with a
    /// failure status) within [`crate::FENCED_EXIT_LIMIT`].
    pub(crate) twins_running: usize,
    /// Transfers answered otherwise than accepted at version 1, not ended in time, ended
    /// otherwise than they must, and accounts whose books do not balance.
    pub(crate) transfers_wrong: usize,
    /// What went wrong, for people (the first few of each kind).
    pub(crate) notes: Vec<String>,
}

impl Tally {
    /// Adds another run's counts and notes to these.
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
        self.twins_running += other.twins_running;
        self.transfers_wrong += other.transfers_wrong;
        self.notes.extend(other.notes.iter().cloned());
    }

    /// Whether the run (or runs) found nothing wrong.
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
            && self.twins_running == 0
            && self.transfers_wrong == 0
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

/// An accepted command as the model predicted it: the account and the version it makes.
struct AcceptedCommand {
    account: String,
    version: u64,
}

/// An event of the events topic with the account it is keyed by.
struct KeyedEvent {
    account: String,
    event: SeenEvent,
}

/// What the read model showed for an account by the deadline.
enum ReadModelView {
    /// It matches the model's fold.
    Matches,
    /// It never did; `last_seen` is the last answer (or [`NO_ANSWER`]).
    Differs { last_seen: String },
}

/// What a read-model check reports when the projection never answered.
const NO_ANSWER: &str = "no answer";

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
    let accepted = tally.check_answers(&ledger, &answers);
    let by_account = read_events_by_account(driver, kafka, partitions, accounts).await?;
    let seen_commands = tally.check_event_streams(&by_account, &accepted);
    tally.check_accepted_have_one_event(&accepted, &seen_commands);
    tally.check_read_model(accounts, projection_url, http).await;
    Ok(tally)
}

impl Tally {
    /// Every command answered, as the model predicted, the same way every time. Returns the
    /// commands that were accepted as predicted.
    fn check_answers(
        &mut self,
        ledger: &[Sent],
        answers: &HashMap<Uuid, Vec<Outcome>>,
    ) -> HashMap<Uuid, AcceptedCommand> {
        let mut accepted = HashMap::new();
        for sent in ledger {
            let answered = self.check_answer(sent);
            if !answered {
                continue;
            }
            self.check_same_answer_on_retries(sent, answers);
            if let (Outcome::Accepted { version }, Some(Outcome::Accepted { .. })) =
                (&sent.expected, &sent.answer)
            {
                let command = AcceptedCommand {
                    account: sent.account.clone(),
                    version: *version,
                };
                accepted.insert(sent.command_id, command);
            }
        }
        accepted
    }

    /// Counts a missing or wrong answer to `sent`; returns whether it was answered at all.
    fn check_answer(&mut self, sent: &Sent) -> bool {
        match &sent.answer {
            None => {
                self.missing_results += 1;
                self.note(format!(
                    "missing result: command {} for {} (expected {:?})",
                    sent.command_id, sent.account, sent.expected
                ));
                return false;
            }
            Some(answer) if *answer != sent.expected => {
                self.wrong_answers += 1;
                self.note(format!(
                    "wrong answer: command {} for {}: got {answer:?}, the model expected {:?}",
                    sent.command_id, sent.account, sent.expected
                ));
            }
            Some(_) => {}
        }
        true
    }

    /// A command answered differently on a retry: two versions means it applied twice.
    fn check_same_answer_on_retries(&mut self, sent: &Sent, answers: &HashMap<Uuid, Vec<Outcome>>) {
        let all = answers.get(&sent.command_id).cloned().unwrap_or_default();
        let distinct: HashSet<String> = all.iter().map(|o| format!("{o:?}")).collect();
        if distinct.len() > 1 {
            self.duplicated += 1;
            self.note(format!(
                "command {} for {} answered differently on retry: {all:?}",
                sent.command_id, sent.account
            ));
        }
    }

    /// Each account's events: no version twice, no version gap, and only commands the model
    /// accepted. Returns how many events each command has.
    fn check_event_streams(
        &mut self,
        by_account: &BTreeMap<String, Vec<SeenEvent>>,
        accepted: &HashMap<Uuid, AcceptedCommand>,
    ) -> HashMap<Uuid, usize> {
        let mut seen_commands = HashMap::new();
        for (account, events) in by_account {
            self.check_versions(account, events);
            self.count_commands_of_events(account, events, accepted, &mut seen_commands);
        }
        seen_commands
    }

    /// Versions of one account's events: none seen twice, none missing below the highest.
    fn check_versions(&mut self, account: &str, events: &[SeenEvent]) {
        let versions: BTreeSet<u64> = events.iter().filter_map(|e| e.version).collect();
        let dups = events.len() - versions.len();
        if dups > 0 {
            self.duplicated += dups;
            self.note(format!(
                "{account}: {dups} event(s) with a version seen before"
            ));
        }
        let max = versions.last().copied().unwrap_or(0);
        let gaps = max as usize - versions.len();
        if gaps > 0 {
            self.version_gaps += gaps;
            self.note(format!("{account}: {gaps} version(s) missing below {max}"));
        }
    }

    /// Counts the events of each command into `seen_commands`, and counts an event of a
    /// command the model did not accept as a wrong answer.
    fn count_commands_of_events(
        &mut self,
        account: &str,
        events: &[SeenEvent],
        accepted: &HashMap<Uuid, AcceptedCommand>,
        seen_commands: &mut HashMap<Uuid, usize>,
    ) {
        for e in events {
            if let Some(id) = e.command_id {
                *seen_commands.entry(id).or_default() += 1;
                if !accepted.contains_key(&id) {
                    self.wrong_answers += 1;
                    self.note(format!(
                        "{account}: event v{:?} of command {id}, which the model did not accept",
                        e.version
                    ));
                }
            }
        }
    }

    /// Every accepted command has exactly one event: none lost, none twice.
    fn check_accepted_have_one_event(
        &mut self,
        accepted: &HashMap<Uuid, AcceptedCommand>,
        seen_commands: &HashMap<Uuid, usize>,
    ) {
        for (id, AcceptedCommand { account, version }) in accepted {
            match seen_commands.get(id) {
                None => {
                    self.lost += 1;
                    self.note(format!(
                        "lost: accepted command {id} ({account} v{version}) has no event"
                    ));
                }
                Some(n) if *n > 1 => {
                    self.duplicated += n - 1;
                    self.note(format!("{account}: command {id} has {n} events"));
                }
                Some(_) => {}
            }
        }
    }

    /// The read model is the model's fold (waiting for the projection to catch up).
    async fn check_read_model(
        &mut self,
        accounts: &BTreeMap<String, Account>,
        projection_url: &str,
        http: &reqwest::Client,
    ) {
        let deadline = Instant::now() + Duration::from_secs(90);
        for (id, want) in accounts {
            let url = format!("{projection_url}/accounts/{id}");
            if let ReadModelView::Differs { last_seen } =
                wait_for_read_model(http, &url, want, deadline).await
            {
                self.read_model_diffs += 1;
                self.note(format!(
                    "read model: {id} is {last_seen}, the model has balance {} version {} {}",
                    want.balance_minor,
                    want.version,
                    want.status()
                ));
            }
        }
    }
}

/// Reads the events topic and groups the events of the run's `accounts` by account.
async fn read_events_by_account(
    driver: &Driver,
    kafka: &KafkaSettings,
    partitions: i32,
    accounts: &BTreeMap<String, Account>,
) -> Result<BTreeMap<String, Vec<SeenEvent>>> {
    let events = read_topic(kafka, &driver.topics().events(), partitions, |m| {
        let account = m.key().map(|k| String::from_utf8_lossy(k).into_owned())?;
        Some(KeyedEvent {
            account,
            event: SeenEvent {
                version: header(m, "aggregate_version").and_then(|v| v.parse().ok()),
                command_id: header(m, "command_id").and_then(|v| Uuid::parse_str(&v).ok()),
            },
        })
    })
    .await?;
    let mut by_account: BTreeMap<String, Vec<SeenEvent>> = BTreeMap::new();
    for KeyedEvent { account, event } in events {
        if accounts.contains_key(&account) {
            by_account.entry(account).or_default().push(event);
        }
    }
    Ok(by_account)
}

/// Polls the read model's `url` until it shows `want` or `deadline` passes.
async fn wait_for_read_model(
    http: &reqwest::Client,
    url: &str,
    want: &Account,
    deadline: Instant,
) -> ReadModelView {
    let mut last_seen = String::from(NO_ANSWER);
    loop {
        if let Some(got) = fetch_account(http, url).await {
            if shows_model_state(&got, want) {
                return ReadModelView::Matches;
            }
            last_seen = got.to_string();
        }
        if Instant::now() > deadline {
            return ReadModelView::Differs { last_seen };
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// One account from the read model: its JSON, `null` if it is not there (404), nothing if the
/// projection did not answer.
async fn fetch_account(http: &reqwest::Client, url: &str) -> Option<Value> {
    match http.get(url).send().await {
        Ok(resp) if resp.status().is_success() => resp.json::<Value>().await.ok(),
        Ok(resp) if resp.status().as_u16() == 404 => Some(Value::Null),
        _ => None,
    }
}

/// Whether the read model's `got` is the model's state `want` (no row for an unopened account).
fn shows_model_state(got: &Value, want: &Account) -> bool {
    if want.opened {
        got.get("balance_minor").and_then(Value::as_i64) == Some(want.balance_minor)
            && got.get("version").and_then(Value::as_u64) == Some(want.version)
            && got.get("status").and_then(Value::as_str) == Some(want.status())
    } else {
        got.is_null()
    }
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
