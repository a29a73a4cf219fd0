//! The load: one task per account sends a command, waits for its result on
//! `<prefix>.command-results` and only then sends the next, so that the reference model knows
//! the order and can predict every answer. A command without an answer in time is sent again
//! with the same `command_id` (a retry must get the original answer). Everything sent and
//! received is kept in a ledger for the checks.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::Value;
use shared::aggregate::DomainCommand;
use shared::bank_account::Command;
use shared::config::KafkaSettings;
use shared::envelope::CommandMessage;
use shared::kafka::{Topics, canonical_partition};
use tokio::sync::oneshot;
use uuid::Uuid;

use crate::model::{Account, Op, Outcome};

/// One command the suite sent, what the model expected and what came back.
#[derive(Debug, Clone)]
pub(crate) struct Sent {
    pub(crate) command_id: Uuid,
    pub(crate) account: String,
    pub(crate) expected: Outcome,
    /// The first answer; `None` if none came before the deadline.
    pub(crate) answer: Option<Outcome>,
}

/// Reads an answer off the results topic into the model's terms.
pub(crate) fn outcome_of(result: &Value) -> Option<(Uuid, Outcome)> {
    let id = Uuid::parse_str(result.get("command_id")?.as_str()?).ok()?;
    let outcome = match result.get("status")?.as_str()? {
        "accepted" => Outcome::Accepted {
            version: result.get("version")?.as_u64()?,
        },
        _ => Outcome::Rejected {
            code: result
                .pointer("/error/code")
                .and_then(Value::as_str)
                .unwrap_or("?")
                .to_owned(),
        },
    };
    Some((id, outcome))
}

/// Every answer seen on the results topic, by command id, and the tasks waiting for one.
#[derive(Default)]
pub(crate) struct Answers {
    waiting: Mutex<HashMap<Uuid, oneshot::Sender<Outcome>>>,
    /// Every answer received, in order, per command id (a retried command may be answered
    /// more than once; every answer must be the same).
    pub(crate) all: Mutex<HashMap<Uuid, Vec<Outcome>>>,
}

/// Commands out, answers in, for one run.
pub(crate) struct Driver {
    producer: FutureProducer,
    topics: Topics,
    partitions: i32,
    pub(crate) answers: Arc<Answers>,
    pub(crate) ledger: Mutex<Vec<Sent>>,
    /// Set when the run's faults are over: the account tasks finish their current command and stop.
    pub(crate) stop: AtomicBool,
    /// While set, the account tasks send no new command (the load pauses).
    pub(crate) paused: AtomicBool,
    /// How long to wait for an answer before sending the command again.
    pub(crate) retry_after: Duration,
    /// Set with `stop`: a command unanswered by then counts as a missing result.
    pub(crate) give_up_at: Mutex<Option<Instant>>,
}

impl Driver {
    /// Connects a producer and starts reading the results topic from its beginning.
    pub(crate) async fn start(
        kafka: &KafkaSettings,
        prefix: &str,
        partitions: i32,
    ) -> Result<Arc<Driver>> {
        let topics = Topics::new(prefix);
        let producer: FutureProducer = kafka
            .producer_config()
            .set("linger.ms", "2")
            .set("message.timeout.ms", "30000")
            .create()?;
        let consumer: StreamConsumer = kafka
            .client_config()
            .set(
                "group.id",
                format!("{prefix}.faults.{}", Uuid::new_v4().simple()),
            )
            .set("enable.auto.commit", "false")
            .set("isolation.level", "read_committed")
            .set("fetch.wait.max.ms", "20")
            .create()?;
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition_offset(&topics.command_results(), p, Offset::Beginning)?;
        }
        consumer.assign(&tpl)?;
        let answers = Arc::new(Answers::default());
        let reader = answers.clone();
        tokio::spawn(async move {
            loop {
                let Ok(msg) = consumer.recv().await else {
                    // Broker faults show up here; librdkafka reconnects by itself.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                let Some((id, outcome)) = msg
                    .payload()
                    .and_then(|p| serde_json::from_slice::<Value>(p).ok())
                    .and_then(|v| outcome_of(&v))
                else {
                    continue;
                };
                reader
                    .all
                    .lock()
                    .unwrap()
                    .entry(id)
                    .or_default()
                    .push(outcome.clone());
                if let Some(waiter) = reader.waiting.lock().unwrap().remove(&id) {
                    let _ = waiter.send(outcome);
                }
            }
        });
        Ok(Arc::new(Driver {
            producer,
            topics,
            partitions,
            answers,
            ledger: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
            paused: AtomicBool::new(false),
            retry_after: Duration::from_secs(30),
            give_up_at: Mutex::new(None),
        }))
    }

    /// Produces raw bytes to `<prefix>.commands` or `<prefix>.events` (poison), on `key`'s
    /// partition.
    pub(crate) async fn produce_raw(&self, topic: &str, key: &str, payload: &[u8]) -> Result<()> {
        let partition = canonical_partition(key.as_bytes(), self.partitions);
        self.producer
            .send(
                FutureRecord::to(topic)
                    .key(key)
                    .payload(payload)
                    .partition(partition),
                Duration::from_secs(30),
            )
            .await
            .map_err(|(e, _)| e)
            .with_context(|| format!("producing to {topic}"))?;
        Ok(())
    }

    /// Pauses the load and waits (at most `within`) until no command is waiting for its answer;
    /// false if some still were.
    pub(crate) async fn pause(&self, within: Duration) -> bool {
        self.paused.store(true, Ordering::SeqCst);
        let deadline = Instant::now() + within;
        while !self.answers.waiting.lock().unwrap().is_empty() {
            if Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        true
    }

    /// Lets the load go on.
    pub(crate) fn resume(&self) {
        self.paused.store(false, Ordering::SeqCst);
    }

    /// The run's topic names.
    pub(crate) fn topics(&self) -> &Topics {
        &self.topics
    }

    /// Registers interest in the answer to `id` (before the command is sent, so none is missed).
    pub(crate) fn expect(&self, id: Uuid) -> oneshot::Receiver<Outcome> {
        let (tx, rx) = oneshot::channel();
        self.answers.waiting.lock().unwrap().insert(id, tx);
        rx
    }

    /// Sends `command` until it is answered or `deadline` passes.
    pub(crate) async fn execute<C: DomainCommand>(
        &self,
        command: &CommandMessage<C>,
        deadline: Instant,
    ) -> Option<Outcome> {
        let deadline = || match *self.give_up_at.lock().unwrap() {
            Some(give_up) => give_up.min(deadline),
            None => deadline,
        };
        let bytes = command.to_bytes();
        let topic = self.topics.commands();
        loop {
            let answer = self.expect(command.command_id);
            if self
                .produce_raw(&topic, &command.aggregate_id, &bytes)
                .await
                .is_err()
            {
                // The broker is down: try again shortly (the same command id).
                if Instant::now() > deadline() {
                    return None;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
            // Wait in short steps, so that a deadline moved closer is noticed.
            let sent = Instant::now();
            let mut answer = answer;
            loop {
                let step = Duration::from_millis(500)
                    .min(deadline().saturating_duration_since(Instant::now()));
                match tokio::time::timeout(step, &mut answer).await {
                    Ok(Ok(outcome)) => return Some(outcome),
                    // The waiter was replaced: cannot happen for one task's own command.
                    Ok(Err(_)) => break,
                    Err(_) if Instant::now() >= deadline() => return None,
                    Err(_) if sent.elapsed() >= self.retry_after => break,
                    Err(_) => {}
                }
            }
        }
    }

    /// Drives one account until the run stops (at least `min_ops` commands), or until an answer
    /// disagrees with the model (the account's state is unknown from then on). Returns the
    /// model's final state of the account.
    pub(crate) async fn account_task(
        self: Arc<Self>,
        account: String,
        seed: u64,
        min_ops: usize,
        deadline: Instant,
    ) -> Account {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut state = Account::default();
        let mut n = 0;
        loop {
            while self.paused.load(Ordering::SeqCst) && !self.stop.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            if (self.stop.load(Ordering::SeqCst) && n >= min_ops) || Instant::now() > deadline {
                return state;
            }
            if state.closed && n > 0 {
                // One more command to see `AccountClosed`, then this account is done.
                if !self
                    .step(
                        &account,
                        &mut state,
                        Op::Deposit { amount_minor: 1 },
                        None,
                        deadline,
                    )
                    .await
                {
                    return state;
                }
                return state;
            }
            let winding_down = self.stop.load(Ordering::SeqCst);
            let (op, expected_version) = choose(&mut rng, &state, n, winding_down);
            if !self
                .step(&account, &mut state, op, expected_version, deadline)
                .await
            {
                return state;
            }
            n += 1;
            // Pace the load a little so that faults land in the middle of it.
            tokio::time::sleep(Duration::from_millis(rng.gen_range(5..40))).await;
        }
    }

    /// Sends one command and folds the model; false if the answer was missing or unexpected.
    async fn step(
        &self,
        account: &str,
        state: &mut Account,
        op: Op,
        expected_version: Option<u64>,
        deadline: Instant,
    ) -> bool {
        let (expected, next) = state.decide(&op, expected_version);
        let mut message = CommandMessage::new(account, to_command(&op));
        message.expected_version = expected_version;
        let answer = self.execute(&message, deadline).await;
        let agrees = answer.as_ref() == Some(&expected);
        self.ledger.lock().unwrap().push(Sent {
            command_id: message.command_id,
            account: account.to_owned(),
            expected,
            answer,
        });
        if agrees {
            *state = next;
        }
        agrees
    }
}

fn to_command(op: &Op) -> Command {
    match op {
        Op::Open { initial_minor } => Command::OpenAccount {
            owner: "Fault Tester".into(),
            currency: "EUR".into(),
            initial_balance_minor: *initial_minor,
        },
        Op::Deposit { amount_minor } => Command::Deposit {
            amount_minor: *amount_minor,
            currency: None,
        },
        Op::Withdraw { amount_minor } => Command::Withdraw {
            amount_minor: *amount_minor,
            currency: None,
        },
        Op::Close => Command::CloseAccount,
    }
}

/// The next command for an account: mostly valid ones, with every rejection code in the mix.
/// Accounts are emptied and closed only once the run winds down, so that the load lasts.
fn choose(rng: &mut StdRng, state: &Account, n: usize, winding_down: bool) -> (Op, Option<u64>) {
    if n == 0 {
        return (
            Op::Open {
                initial_minor: rng.gen_range(0..20_000),
            },
            None,
        );
    }
    let balance = state.balance_minor;
    match rng.gen_range(0..100) {
        0..45 => (
            Op::Deposit {
                amount_minor: rng.gen_range(1..5_000),
            },
            None,
        ),
        45..72 => (
            Op::Withdraw {
                amount_minor: rng.gen_range(1..balance + 3_000),
            },
            None,
        ),
        72..76 => (Op::Deposit { amount_minor: 0 }, None),
        76..80 => (Op::Open { initial_minor: 1 }, None),
        80..88 => (
            Op::Deposit {
                amount_minor: rng.gen_range(1..100),
            },
            Some(state.version),
        ),
        88..92 => (Op::Withdraw { amount_minor: 1 }, Some(state.version + 3)),
        92..95 => (Op::Close, None),
        _ if !winding_down => (Op::Deposit { amount_minor: 7 }, None),
        _ if balance > 0 => (
            Op::Withdraw {
                amount_minor: balance,
            },
            None,
        ),
        _ => (Op::Close, None),
    }
}
