//! The writer: one consumer-group member on `<prefix>.commands` and one transactional producer,
//! on a dedicated thread (librdkafka's transaction calls block).
//!
//! Per command: forward it if it is not on its aggregate's canonical partition; answer a
//! duplicate with its original result; check `expected_version`; let the aggregate decide;
//! produce events, snapshot and result. Many commands share one transaction, which also carries
//! the consumed offsets (KIP-447: `send_offsets_to_transaction` with the consumer's group
//! metadata), so events, results and progress commit or vanish together. A transaction opens
//! with the partition checkpoints that are due (see [`crate::restore`]).
//!
//! State changes of the open transaction live in an [`Overlay`] and reach the partition state
//! only after the commit: an abort drops them and seeks the consumer back to the committed
//! offsets. The group uses the cooperative-sticky assignor and static membership
//! (`group.instance.id` = `INSTANCE_ID`): a rebalance moves only the partitions that change
//! owner, and a restarted instance gets its partitions back without waiting for its old session
//! to expire. Rebalance callbacks run on this thread inside `poll`: a revocation commits (or
//! aborts) the open transaction and drops the revoked partitions' state; an assignment pauses
//! the new partitions and restores them on a thread of their own, so the poll loop goes on
//! serving the others and never outstays `max.poll.interval.ms`; a finished restore seeks the
//! partitions to their committed offsets and resumes them.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use chrono::Utc;
use rdkafka::client::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Header, Message, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::Value;
use shared::codec::EncodeError;
use shared::envelope::{Checkpoint, MalformedCommand, Metadata, Snapshot};
use shared::kafka::{Topics, canonical_partition};
use shared::trace::{METADATA_TRACE_ID, TRACEPARENT, TraceContext};
use shared::{
    BankAccount, CommandMessage, CommandResult, EventCodec, EventEnvelope, Rejection,
    RejectionCode, Settings,
};
use uuid::Uuid;

use crate::metrics as m;
use crate::restore;
use crate::state::{Overlay, PartitionState};

/// Commands per transaction at most; the transaction also commits every `COMMIT_INTERVAL_MS`.
const MAX_COMMANDS_PER_TXN: usize = 1000;
const TXN_TIMEOUT: Duration = Duration::from_secs(30);

/// What the HTTP side can see of the engine.
#[derive(Debug, Default)]
pub struct Status {
    /// An assignment was received and every assigned partition is restored (possibly none).
    pub ready: AtomicBool,
    /// The partitions currently owned.
    pub partitions: Mutex<Vec<i32>>,
    /// Set when the engine stopped because of a fatal error.
    pub fatal: Mutex<Option<String>>,
    /// What the restores of this instance read, in total (shown by `/ready`).
    pub restores: Mutex<RestoreTotals>,
}

/// What an instance's restores read since it started: the figures that show whether restores
/// follow the live state or the history.
#[derive(Debug, Default, Clone, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct RestoreTotals {
    /// Partitions restored (a partition kept across a rebalance is not restored again).
    pub partitions: u64,
    /// Snapshots read.
    pub snapshots: u64,
    /// Events read (checkpoint tails, and full replays).
    pub events: u64,
    /// Command results of the dedupe window read.
    pub results: u64,
    /// Partitions that had to be replayed from their first event (no usable checkpoint).
    pub replayed_partitions: u64,
    /// Duration of the last restore.
    pub last_seconds: f64,
}

impl Status {
    fn set_partitions(&self, partitions: Vec<i32>) {
        m::set_owned_partitions(partitions.len());
        *lock(&self.partitions) = partitions;
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Records the offsets of events whose snapshot needs them (opaque token → offset, or `None`
/// when the delivery failed). Delivery reports are served on the engine thread, by its polls
/// of the producer (and by librdkafka's flush inside a commit).
#[derive(Default)]
pub struct DeliveryTracker {
    offsets: Mutex<HashMap<usize, Option<i64>>>,
}

impl DeliveryTracker {
    /// The outcome of the delivery of the event sent with `token`, once it is known.
    fn take(&self, token: usize) -> Option<Option<i64>> {
        lock(&self.offsets).remove(&token)
    }
}

impl ClientContext for DeliveryTracker {}

impl ProducerContext for DeliveryTracker {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, token: usize) {
        let outcome = match result {
            Ok(msg) => Some(msg.offset()),
            Err((e, msg)) => {
                tracing::warn!(topic = msg.topic(), partition = msg.partition(), error = %e, "delivery failed; the transaction will abort");
                None
            }
        };
        if token != 0 {
            lock(&self.offsets).insert(token, outcome);
        }
    }
}

/// Polled by the engine thread itself: with librdkafka's own thread polling it (a
/// `ThreadedProducer`), the flush inside `commit_transaction` waited up to that thread's 100 ms
/// poll for the delivery reports, which made every commit's latency about 100 ms.
type TxnProducer = BaseProducer<DeliveryTracker>;

/// Consumer context: rebalance callbacks reach the engine through it.
pub struct EngineContext {
    engine: Mutex<Engine>,
}

impl ClientContext for EngineContext {}

impl ConsumerContext for EngineContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            let partitions: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
            lock(&self.engine).on_revoke(consumer, &partitions);
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                let partitions: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
                lock(&self.engine).on_assign(consumer, &partitions);
            }
            Rebalance::Error(e) => tracing::warn!(error = %e, "rebalance error"),
            Rebalance::Revoke(_) => {}
        }
    }
}

type EngineConsumer = BaseConsumer<EngineContext>;

struct Txn {
    started: Instant,
    commands: usize,
    next_offsets: HashMap<i32, i64>,
    overlay: Overlay,
    outcomes: Vec<(&'static str, Instant)>,
    /// Snapshots due in this transaction, written just before it commits, when the offsets of
    /// the events they cover are known: (delivery token, partition, aggregate id, state).
    snapshots: Vec<(usize, i32, String, BankAccount)>,
    /// Checkpoints written at the start of this transaction, with what they took from their
    /// partition's state, given back if the transaction aborts.
    checkpoints: Vec<TakenCheckpoint>,
}

impl Txn {
    fn new() -> Self {
        Txn {
            started: Instant::now(),
            commands: 0,
            next_offsets: HashMap::new(),
            overlay: Overlay::default(),
            outcomes: Vec::new(),
            snapshots: Vec::new(),
            checkpoints: Vec::new(),
        }
    }
}

/// A checkpoint in an open transaction: the partition's checkpoint bookkeeping it reset.
struct TakenCheckpoint {
    partition: i32,
    dirty: HashSet<String>,
    events_since: u64,
    needed: bool,
}

/// A restore running on its own thread for some newly assigned partitions.
struct PendingRestore {
    partitions: Vec<i32>,
    cancel: Arc<AtomicBool>,
}

/// What a restore thread sends back.
struct RestoreDone {
    id: u64,
    started: Instant,
    outcome: Result<(HashMap<i32, Offset>, restore::Restored), restore::RestoreError>,
}

/// The command processor. Lives inside the consumer's context, driven by [`run_engine`].
pub struct Engine {
    settings: Arc<Settings>,
    topics: Topics,
    codec: Arc<EventCodec>,
    runtime: tokio::runtime::Handle,
    producer_config: ClientConfig,
    producer: TxnProducer,
    /// Asks for the events partitions' high watermarks (read_uncommitted: the end of everything
    /// written, where a read_committed client would get the last stable offset, which lags
    /// until a commit's markers are written).
    offsets: BaseConsumer,
    partitions: HashMap<i32, PartitionState>,
    committed_next: HashMap<i32, Offset>,
    txn: Option<Txn>,
    next_token: usize,
    /// The trace of the command being processed (its record's `traceparent`): events and the
    /// result get child spans of it.
    trace: Option<TraceContext>,
    /// Partition → the restore that will bring its state (paused until then).
    restoring: HashMap<i32, u64>,
    /// Restoring partitions of which a message was fetched (and ignored) before the pause.
    skipped_while_restoring: HashSet<i32>,
    restores: HashMap<u64, PendingRestore>,
    next_restore: u64,
    restore_done: (mpsc::Sender<RestoreDone>, mpsc::Receiver<RestoreDone>),
    /// An assignment (possibly empty) was received: readiness needs one.
    assigned: bool,
    /// Set when a checkpoint was postponed: no idle checkpoint before then.
    checkpoint_retry_at: Option<Instant>,
    status: Arc<Status>,
    /// Set on shutdown; long work (restore) checks it.
    stop: Arc<AtomicBool>,
    fatal: Option<String>,
}

fn new_producer(config: &ClientConfig) -> KafkaResult<TxnProducer> {
    let producer: TxnProducer = config.create_with_context(DeliveryTracker::default())?;
    producer.init_transactions(TXN_TIMEOUT)?;
    Ok(producer)
}

impl Engine {
    fn new(
        settings: Arc<Settings>,
        codec: Arc<EventCodec>,
        runtime: tokio::runtime::Handle,
        status: Arc<Status>,
        stop: Arc<AtomicBool>,
    ) -> KafkaResult<Self> {
        let mut producer_config = settings.kafka.producer_config();
        producer_config
            .set("transactional.id", transactional_id(&settings))
            .set("transaction.timeout.ms", "10000")
            .set("linger.ms", "2")
            // A transaction begun right after a commit finds the coordinator still writing the
            // previous one's markers (CONCURRENT_TRANSACTIONS) and retries after this backoff:
            // librdkafka's 100 ms default would be the latency floor of group commit.
            .set("retry.backoff.ms", "5")
            .set("message.timeout.ms", "10000");
        let producer = new_producer(&producer_config)?;
        let offsets: BaseConsumer = settings
            .kafka
            .client_config()
            .set("group.id", group_id(&settings))
            .set("isolation.level", "read_uncommitted")
            .create()?;
        Ok(Engine {
            topics: Topics::new(&settings.topic_prefix),
            settings,
            codec,
            runtime,
            producer_config,
            producer,
            offsets,
            partitions: HashMap::new(),
            committed_next: HashMap::new(),
            txn: None,
            next_token: 0,
            trace: None,
            restoring: HashMap::new(),
            skipped_while_restoring: HashSet::new(),
            restores: HashMap::new(),
            next_restore: 0,
            restore_done: mpsc::channel(),
            assigned: false,
            checkpoint_retry_at: None,
            status,
            stop,
            fatal: None,
        })
    }

    // ---------------------------------------------------------------- rebalance

    /// Pauses newly assigned partitions and restores them on a thread of their own;
    /// [`Engine::install_restores`] resumes them.
    fn on_assign(&mut self, consumer: &EngineConsumer, partitions: &[i32]) {
        self.assigned = true;
        if partitions.is_empty() {
            self.update_status();
            return;
        }
        let commands = self.topics.commands();
        let mut tpl = TopicPartitionList::new();
        for p in partitions {
            tpl.add_partition(&commands, *p);
        }
        if let Err(e) = consumer.pause(&tpl) {
            // Not fatal: messages of a partition being restored are ignored, and the restore
            // ends with a seek to the committed offsets.
            tracing::warn!(error = %e, "cannot pause the partitions being restored");
        }
        self.next_restore += 1;
        let id = self.next_restore;
        let cancel = Arc::new(AtomicBool::new(self.stop.load(Ordering::SeqCst)));
        for p in partitions {
            self.restoring.insert(*p, id);
        }
        self.restores.insert(
            id,
            PendingRestore {
                partitions: partitions.to_vec(),
                cancel: Arc::clone(&cancel),
            },
        );
        let settings = Arc::clone(&self.settings);
        let codec = Arc::clone(&self.codec);
        let done = self.restore_done.0.clone();
        let partitions = partitions.to_vec();
        tracing::info!(?partitions, "partitions assigned; restoring");
        let spawned = std::thread::Builder::new()
            .name(format!("restore-{id}"))
            .spawn(move || {
                let started = Instant::now();
                let outcome = committed_offsets(&settings, &partitions, &cancel).and_then(|c| {
                    restore::restore(&settings, &codec, &partitions, &cancel).map(|r| (c, r))
                });
                let _ = done.send(RestoreDone {
                    id,
                    started,
                    outcome,
                });
            });
        if let Err(e) = spawned {
            self.fail(format!("cannot start a restore thread: {e}"));
        }
        self.update_status();
    }

    /// Installs the restores that finished: their state, their committed offsets, and the
    /// partitions resumed from there.
    fn install_restores(&mut self, consumer: &EngineConsumer) {
        while let Ok(done) = self.restore_done.1.try_recv() {
            let Some(pending) = self.restores.remove(&done.id) else {
                continue;
            };
            // Partitions revoked (or assigned again) meanwhile are not this restore's anymore.
            let current: Vec<i32> = pending
                .partitions
                .iter()
                .copied()
                .filter(|p| self.restoring.get(p) == Some(&done.id))
                .collect();
            for p in &current {
                self.restoring.remove(p);
            }
            let (committed, restored) = match done.outcome {
                Ok(found) => found,
                Err(restore::RestoreError::Interrupted) => continue,
                Err(e) => {
                    self.fail(format!("restore failed: {e}"));
                    return;
                }
            };
            let commands = self.topics.commands();
            let mut resume = TopicPartitionList::new();
            let mut installed = Vec::new();
            let mut states = restored.states;
            for p in current {
                let Some(state) = states.remove(&p) else {
                    continue;
                };
                let offset = match committed.get(&p) {
                    Some(Offset::Offset(o)) => Offset::Offset(*o),
                    _ => Offset::Beginning,
                };
                // Nothing of the partition delivered: the consumer starts it at the committed
                // offset by itself. A message fetched (and ignored) before the pause took effect
                // moved the position past it: seek back.
                if self.skipped_while_restoring.remove(&p)
                    && let Err(e) = consumer.seek(&commands, p, offset, Duration::from_secs(10))
                {
                    self.fail(format!(
                        "cannot seek partition {p} to its committed offset {offset:?}: {e}"
                    ));
                    return;
                }
                self.committed_next.insert(p, offset);
                self.partitions.insert(p, state);
                resume.add_partition(&commands, p);
                installed.push(p);
            }
            if let Err(e) = consumer.resume(&resume) {
                self.fail(format!("cannot resume the restored partitions: {e}"));
                return;
            }
            let elapsed = done.started.elapsed();
            m::restore_seconds(elapsed);
            m::restored_partitions(installed.len());
            let stats = &restored.stats;
            {
                let mut totals = lock(&self.status.restores);
                totals.partitions += installed.len() as u64;
                totals.snapshots += stats.snapshots as u64;
                totals.events += stats.events as u64;
                totals.results += stats.results as u64;
                totals.replayed_partitions += stats.replayed.len() as u64;
                totals.last_seconds = elapsed.as_secs_f64();
            }
            tracing::info!(
                partitions = ?installed,
                snapshots = stats.snapshots,
                events = stats.events,
                results = stats.results,
                replayed = ?stats.replayed,
                elapsed_ms = elapsed.as_millis() as u64,
                "partitions restored"
            );
        }
        self.update_status();
    }

    fn on_revoke(&mut self, consumer: &EngineConsumer, partitions: &[i32]) {
        self.commit(consumer);
        for p in partitions {
            self.partitions.remove(p);
            self.committed_next.remove(p);
            self.restoring.remove(p);
            self.skipped_while_restoring.remove(p);
        }
        // A restore none of whose partitions is still wanted can stop.
        let restoring = &self.restoring;
        self.restores.retain(|id, pending| {
            let wanted = pending
                .partitions
                .iter()
                .any(|p| restoring.get(p) == Some(id));
            if !wanted {
                pending.cancel.store(true, Ordering::SeqCst);
            }
            wanted
        });
        tracing::info!(?partitions, "partitions revoked");
        self.update_status();
    }

    /// Stops the restores still running (shutdown).
    fn cancel_restores(&mut self) {
        for pending in self.restores.values() {
            pending.cancel.store(true, Ordering::SeqCst);
        }
    }

    /// Readiness (an assignment received, nothing being restored), owned partitions and the
    /// memory gauges.
    fn update_status(&self) {
        let mut owned: Vec<i32> = self.partitions.keys().copied().collect();
        owned.sort_unstable();
        self.status.set_partitions(owned);
        let ready = self.assigned && self.restoring.is_empty() && self.fatal.is_none();
        self.status.ready.store(ready, Ordering::SeqCst);
        self.update_memory_gauges();
    }

    /// The gauges of what the owned partitions hold in memory.
    fn update_memory_gauges(&self) {
        let aggregates = self.partitions.values().map(|s| s.accounts.len()).sum();
        let dedupe = self.partitions.values().map(|s| s.dedupe.len()).sum();
        m::set_memory(aggregates, dedupe);
    }

    // ---------------------------------------------------------------- commands

    fn on_message(&mut self, consumer: &EngineConsumer, msg: &BorrowedMessage<'_>) {
        let partition = msg.partition();
        if !self.partitions.contains_key(&partition) {
            tracing::debug!(partition, "message for a partition not owned; ignored");
            if self.restoring.contains_key(&partition) {
                // Fetched before the pause: the restore's end must seek back over it.
                self.skipped_while_restoring.insert(partition);
            }
            return;
        }
        if self.txn.is_none() && !self.begin(consumer) {
            return;
        }
        let received = Instant::now();
        self.trace = TraceContext::from_headers(msg.headers());
        let span = tracing::info_span!(
            "command",
            partition,
            offset = msg.offset(),
            trace_id = tracing::field::Empty
        );
        if let Some(trace) = &self.trace {
            span.record("trace_id", trace.trace_id_hex());
            shared::runtime::set_parent(&span, trace);
        }
        let processed = span.in_scope(|| self.process(msg));
        self.trace = None;
        match processed {
            Ok(outcome) => {
                if let Some(txn) = self.txn.as_mut() {
                    txn.next_offsets.insert(partition, msg.offset() + 1);
                    txn.commands += 1;
                    txn.outcomes.push((outcome, received));
                }
            }
            Err(e) => self.on_txn_error(consumer, e),
        }
    }

    /// Begins a transaction and writes the checkpoints that are due into it; false (and the
    /// error handled) when that failed.
    fn begin(&mut self, consumer: &EngineConsumer) -> bool {
        if let Err(e) = self.producer.begin_transaction() {
            self.on_txn_error(consumer, e);
            return false;
        }
        self.txn = Some(Txn::new());
        if let Err(e) = self.write_checkpoints() {
            self.on_txn_error(consumer, e);
            return false;
        }
        true
    }

    /// When no command is coming, a due checkpoint gets a transaction of its own.
    /// After a postponed checkpoint (the end offset could not be read) not before a second
    /// has passed, so that it does not spin transactions.
    fn checkpoint_idle(&mut self, consumer: &EngineConsumer) {
        if self.txn.is_none()
            && self
                .checkpoint_retry_at
                .is_none_or(|at| Instant::now() >= at)
            && self.partitions.values().any(|s| self.checkpoint_due(s))
            && self.begin(consumer)
        {
            self.commit(consumer);
        }
    }

    /// Whether `state` gets a checkpoint now: by the policy, or for anything changed once the
    /// engine is stopping (so that the next start reads no tail).
    fn checkpoint_due(&self, state: &PartitionState) -> bool {
        let stopping = self.stop.load(Ordering::SeqCst);
        state.checkpoint_due(self.settings.checkpoint_every)
            || (stopping && !state.dirty.is_empty())
    }

    /// Writes a checkpoint of every partition that is due: a snapshot of each aggregate changed
    /// since the partition's last checkpoint, then the checkpoint record with the partition's
    /// end offset. Called first in a transaction, so the state written is the committed state
    /// and every event below that offset is in it.
    fn write_checkpoints(&mut self) -> KafkaResult<()> {
        let due: Vec<i32> = self
            .partitions
            .iter()
            .filter(|(_, s)| self.checkpoint_due(s))
            .map(|(p, _)| *p)
            .collect();
        let events = self.topics.events();
        for partition in due {
            let end = match self.offsets.fetch_watermarks(
                &events,
                partition,
                Duration::from_secs(5),
            ) {
                Ok((_, high)) => high,
                Err(e) => {
                    tracing::warn!(partition, error = %e, "cannot read the events' end offset; checkpoint postponed");
                    self.checkpoint_retry_at = Some(Instant::now() + Duration::from_secs(1));
                    continue;
                }
            };
            let (Some(state), Some(txn)) = (self.partitions.get_mut(&partition), self.txn.as_mut())
            else {
                continue;
            };
            let taken = TakenCheckpoint {
                partition,
                dirty: std::mem::take(&mut state.dirty),
                events_since: std::mem::take(&mut state.events_since_checkpoint),
                needed: std::mem::replace(&mut state.needs_checkpoint, false),
            };
            let now = Utc::now();
            let snapshots: Vec<(String, Vec<u8>)> = taken
                .dirty
                .iter()
                .filter_map(|id| {
                    let account = state.accounts.get(id)?;
                    let snapshot = Snapshot {
                        aggregate_id: id.clone(),
                        version: account.version,
                        event_offset: end - 1,
                        state: account.clone(),
                        taken_at: now,
                    };
                    Some((id.clone(), serde_json::to_vec(&snapshot).ok()?))
                })
                .collect();
            let checkpoint = Checkpoint {
                partition,
                next_event_offset: end,
                aggregates: state.aggregates(),
                taken_at: now,
            };
            txn.checkpoints.push(taken);
            let topic = self.topics.snapshots();
            for (id, bytes) in &snapshots {
                self.send(&topic, partition, id.as_bytes(), bytes, None, 0)?;
            }
            let bytes = serde_json::to_vec(&checkpoint).unwrap_or_default();
            let key = partition.to_string();
            self.send(
                &self.topics.command_checkpoints(),
                partition,
                key.as_bytes(),
                &bytes,
                None,
                0,
            )?;
            tracing::debug!(
                partition,
                next_event_offset = end,
                snapshots = snapshots.len(),
                "checkpoint written"
            );
        }
        Ok(())
    }

    /// Handles one command inside the open transaction; returns its outcome label.
    fn process(&mut self, msg: &BorrowedMessage<'_>) -> KafkaResult<&'static str> {
        let partition = msg.partition();
        let payload = msg.payload().unwrap_or_default();
        let parsed = CommandMessage::from_bytes(payload);
        let routing_key: Option<Vec<u8>> = match &parsed {
            Ok(c) => Some(c.aggregate_id.as_bytes().to_vec()),
            Err(m) => m
                .aggregate_id
                .as_ref()
                .map(|a| a.as_bytes().to_vec())
                .or(msg.key().map(<[u8]>::to_vec)),
        };
        if let Some(key) = routing_key {
            let canonical = canonical_partition(&key, self.settings.partitions);
            if canonical != partition {
                self.forward(msg, canonical)?;
                return Ok("forwarded");
            }
        }
        let command = match parsed {
            Ok(command) => command,
            Err(malformed) => return self.malformed(partition, malformed),
        };
        if let Some(previous) = self.result_of(partition, command.command_id) {
            tracing::info!(command_id = %command.command_id, "duplicate command: original result sent again");
            self.send_result(partition, &previous)?;
            return Ok("duplicate");
        }
        let state = self.account(partition, &command.aggregate_id);
        let decision = match command.expected_version {
            Some(expected) if expected != state.version => Err(Rejection::new(
                RejectionCode::VersionConflict,
                format!(
                    "expected version {expected}, but the account is at version {}",
                    state.version
                ),
            )),
            _ => state.handle(&command.command),
        };
        let (result, outcome) = match decision {
            Err(rejection) => {
                let outcome = rejection.code.as_str();
                (
                    CommandResult::rejected(command.command_id, &command.aggregate_id, rejection),
                    outcome,
                )
            }
            Ok(events) => match self.append(partition, &command, state, &events) {
                Ok(envelopes) => (
                    CommandResult::accepted(command.command_id, &command.aggregate_id, &envelopes),
                    "accepted",
                ),
                Err(AppendError::Unwritable(reason)) => {
                    tracing::warn!(command_id = %command.command_id, %reason, "command's event cannot be written");
                    let rejection = Rejection::new(RejectionCode::Malformed, reason);
                    (
                        CommandResult::rejected(
                            command.command_id,
                            &command.aggregate_id,
                            rejection,
                        ),
                        "Malformed",
                    )
                }
                Err(AppendError::Kafka(e)) => return Err(e),
            },
        };
        self.send_result(partition, &result)?;
        self.remember(partition, result);
        Ok(outcome)
    }

    fn malformed(
        &mut self,
        partition: i32,
        malformed: MalformedCommand,
    ) -> KafkaResult<&'static str> {
        let Some(command_id) = malformed.command_id else {
            tracing::warn!(partition, reason = %malformed.reason, "unreadable command without a command_id; skipped");
            return Ok("unreadable");
        };
        if let Some(previous) = self.result_of(partition, command_id) {
            self.send_result(partition, &previous)?;
            return Ok("duplicate");
        }
        tracing::warn!(partition, %command_id, reason = %malformed.reason, "malformed command");
        let aggregate_id = malformed.aggregate_id.clone().unwrap_or_default();
        let result = CommandResult::rejected(
            command_id,
            &aggregate_id,
            Rejection::new(RejectionCode::Malformed, malformed.reason),
        );
        self.send_result(partition, &result)?;
        self.remember(partition, result);
        Ok("Malformed")
    }

    /// Produces the events of an accepted command (and a snapshot when one is due) and records
    /// the new state in the overlay.
    fn append(
        &mut self,
        partition: i32,
        command: &CommandMessage,
        mut state: BankAccount,
        events: &[shared::Event],
    ) -> Result<Vec<EventEnvelope>, AppendError> {
        let mut metadata: Metadata = command.metadata.clone();
        metadata.insert(
            "causation_id".into(),
            Value::String(command.command_id.to_string()),
        );
        metadata
            .entry("correlation_id")
            .or_insert_with(|| Value::String(command.command_id.to_string()));
        if let Some(trace) = &self.trace {
            metadata.insert(
                METADATA_TRACE_ID.into(),
                Value::String(trace.trace_id_hex()),
            );
        }
        let now = Utc::now();
        let events_topic = self.topics.events();
        let mut envelopes = Vec::with_capacity(events.len());
        let mut snapshot_token = None;
        for event in events {
            state.apply(event);
            let envelope = EventEnvelope::new(
                &command.aggregate_id,
                state.version,
                event,
                now,
                metadata.clone(),
            );
            // A failure that redoing cannot cure (the registry refuses the event, the record is
            // larger than Kafka takes) rejects the command instead of blocking the partition;
            // only before anything of the command was produced.
            let first = envelopes.is_empty();
            let bytes = match self
                .runtime
                .block_on(self.codec.encode(&events_topic, &envelope))
            {
                Ok(bytes) => bytes,
                Err(EncodeError::Registry {
                    message,
                    retriable: false,
                }) if first => {
                    return Err(AppendError::Unwritable(format!(
                        "the event cannot be encoded: {message}"
                    )));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "event encoding failed; the transaction is redone");
                    return Err(AppendError::Kafka(KafkaError::MessageProduction(
                        RDKafkaErrorCode::InvalidRecord,
                    )));
                }
            };
            let token = if state.version.is_multiple_of(self.settings.snapshot_every) {
                self.next_token += 1;
                snapshot_token = Some((self.next_token, state.clone()));
                self.next_token
            } else {
                0
            };
            let headers = self.traced(shared::codec::event_headers(&envelope));
            let sent = self.send(
                &events_topic,
                partition,
                command.aggregate_id.as_bytes(),
                &bytes,
                Some(headers),
                token,
            );
            match sent {
                Err(KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge))
                    if first =>
                {
                    return Err(AppendError::Unwritable(format!(
                        "the event ({} bytes) is larger than Kafka accepts",
                        bytes.len()
                    )));
                }
                other => other?,
            }
            envelopes.push(envelope);
        }
        if let Some(txn) = self.txn.as_mut() {
            if let Some((token, snapshot_state)) = snapshot_token {
                txn.snapshots.push((
                    token,
                    partition,
                    command.aggregate_id.clone(),
                    snapshot_state,
                ));
            }
            txn.overlay
                .accounts
                .insert(command.aggregate_id.clone(), state);
        }
        Ok(envelopes)
    }

    /// Writes the transaction's due snapshots, each with the offset of the event it covers
    /// (delivered by now, or soon: waiting here is on our own delivery reports, not a flush).
    fn write_snapshots(&mut self) -> KafkaResult<()> {
        let Some(snapshots) = self.txn.as_mut().map(|t| std::mem::take(&mut t.snapshots)) else {
            return Ok(());
        };
        let topic = self.topics.snapshots();
        for (token, partition, aggregate_id, state) in snapshots {
            let Some(event_offset) = self.delivery_of(token, TXN_TIMEOUT) else {
                return Err(KafkaError::MessageProduction(
                    RDKafkaErrorCode::MessageTimedOut,
                ));
            };
            let snapshot = Snapshot {
                aggregate_id: aggregate_id.clone(),
                version: state.version,
                event_offset,
                state,
                taken_at: Utc::now(),
            };
            let bytes = serde_json::to_vec(&snapshot).unwrap_or_default();
            self.send(&topic, partition, aggregate_id.as_bytes(), &bytes, None, 0)?;
            tracing::debug!(%aggregate_id, version = snapshot.version, event_offset, "snapshot written");
        }
        Ok(())
    }

    fn forward(&mut self, msg: &BorrowedMessage<'_>, canonical: i32) -> KafkaResult<()> {
        tracing::debug!(
            from = msg.partition(),
            to = canonical,
            "command forwarded to its canonical partition"
        );
        let topic = self.topics.commands();
        let headers = msg.headers().map(|h| h.detach());
        self.send(
            &topic,
            canonical,
            msg.key().unwrap_or_default(),
            msg.payload().unwrap_or_default(),
            headers,
            0,
        )
    }

    fn send_result(&mut self, partition: i32, result: &CommandResult) -> KafkaResult<()> {
        let topic = self.topics.command_results();
        let key = result.command_id.to_string();
        let headers = self.trace.map(|_| self.traced(OwnedHeaders::new()));
        self.send(
            &topic,
            partition,
            key.as_bytes(),
            &result.to_bytes(),
            headers,
            0,
        )
    }

    /// Serves delivery reports until every produced message is delivered (or `timeout`):
    /// rdkafka's flush inside `commit_transaction` waits for them in steps of 100 ms, which
    /// would be every commit's latency.
    fn await_deliveries(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.producer.in_flight_count() > 0 && Instant::now() < deadline {
            self.producer.poll(Duration::from_millis(1));
        }
    }

    /// Waits for the delivery of the event sent with `token` (serving delivery reports
    /// meanwhile); its offset, or `None` when it failed or did not come within `timeout`.
    fn delivery_of(&self, token: usize, timeout: Duration) -> Option<i64> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(outcome) = self.producer.context().take(token) {
                return outcome;
            }
            deadline.checked_duration_since(Instant::now())?;
            self.producer.poll(Duration::from_millis(5));
        }
    }

    /// `headers` plus a `traceparent` of a new span in the current command's trace (the current
    /// tracing span's, when spans are exported), if the command had one.
    fn traced(&self, headers: OwnedHeaders) -> OwnedHeaders {
        let Some(trace) = &self.trace else {
            return headers;
        };
        let child = shared::runtime::current_trace().unwrap_or_else(|| trace.child());
        let value = child.to_header();
        headers.insert(Header {
            key: TRACEPARENT,
            value: Some(value.as_str()),
        })
    }

    fn send(
        &self,
        topic: &str,
        partition: i32,
        key: &[u8],
        payload: &[u8],
        headers: Option<OwnedHeaders>,
        token: usize,
    ) -> KafkaResult<()> {
        let mut record = BaseRecord::with_opaque_to(topic, token)
            .partition(partition)
            .key(key)
            .payload(payload);
        if let Some(h) = headers {
            record = record.headers(h);
        }
        loop {
            match self.producer.send(record) {
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    record = back;
                    // Serving delivery reports makes room in the queue.
                    self.producer.poll(Duration::from_millis(5));
                }
                Err((e, _)) => return Err(e),
            }
        }
    }

    fn result_of(&self, partition: i32, command_id: Uuid) -> Option<CommandResult> {
        self.txn
            .as_ref()
            .and_then(|t| t.overlay.results.get(&command_id).map(|(_, r)| r.clone()))
            .or_else(|| {
                self.partitions
                    .get(&partition)?
                    .dedupe
                    .get(&command_id)
                    .cloned()
            })
    }

    fn account(&self, partition: i32, aggregate_id: &str) -> BankAccount {
        self.txn
            .as_ref()
            .and_then(|t| t.overlay.accounts.get(aggregate_id).cloned())
            .or_else(|| {
                self.partitions
                    .get(&partition)?
                    .accounts
                    .get(aggregate_id)
                    .cloned()
            })
            .unwrap_or_default()
    }

    fn remember(&mut self, partition: i32, result: CommandResult) {
        if let Some(txn) = self.txn.as_mut() {
            txn.overlay
                .results
                .insert(result.command_id, (partition, result));
        }
    }

    // ---------------------------------------------------------------- transactions

    /// Group commit: the open transaction commits as soon as no further command is waiting
    /// (`drained`), so an idle service answers at once and a busy one builds larger
    /// transactions while the previous commit runs; and at the latest after
    /// [`MAX_COMMANDS_PER_TXN`] commands or `COMMIT_INTERVAL_MS`.
    fn commit_due(&self, drained: bool) -> bool {
        self.txn.as_ref().is_some_and(|t| {
            drained
                || t.commands >= MAX_COMMANDS_PER_TXN
                || t.started.elapsed() >= self.settings.commit_interval
        })
    }

    /// Commits the open transaction with its offsets; on failure aborts and rewinds.
    fn commit(&mut self, consumer: &EngineConsumer) {
        let Some(txn) = self.txn.as_ref() else { return };
        let commands = self.topics.commands();
        let mut tpl = TopicPartitionList::new();
        for (p, next) in &txn.next_offsets {
            if let Err(e) = tpl.add_partition_offset(&commands, *p, Offset::Offset(*next)) {
                tracing::error!(error = %e, "bad offset");
            }
        }
        let result = match consumer.group_metadata() {
            Some(cgm) => self.write_snapshots().and_then(|()| {
                self.producer
                    .send_offsets_to_transaction(&tpl, &cgm, TXN_TIMEOUT)
                    .and_then(|()| self.commit_with_retries())
            }),
            // Not in a group generation (between rebalances): nothing can be committed.
            None => Err(KafkaError::ConsumerCommit(
                RDKafkaErrorCode::IllegalGeneration,
            )),
        };
        match result {
            Ok(()) => self.committed(),
            Err(e) => self.on_txn_error(consumer, e),
        }
    }

    /// `commit_transaction`, called again while it fails with a retriable error (a timeout):
    /// librdkafka resumes the commit where it was.
    fn commit_with_retries(&self) -> KafkaResult<()> {
        self.await_deliveries(TXN_TIMEOUT);
        let mut attempt = 1;
        loop {
            match self.producer.commit_transaction(TXN_TIMEOUT) {
                Err(KafkaError::Transaction(e))
                    if attempt < 3
                        && e.is_retriable()
                        && !e.is_fatal()
                        && !e.txn_requires_abort() =>
                {
                    tracing::warn!(error = %e, attempt, "commit did not complete; retrying");
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    /// The open transaction is committed: its overlay becomes the partitions' state.
    fn committed(&mut self) {
        let Some(txn) = self.txn.take() else { return };
        let n = self.settings.partitions;
        let now_ms = Utc::now().timestamp_millis();
        if !txn.checkpoints.is_empty() {
            let snapshots = txn.checkpoints.iter().map(|c| c.dirty.len()).sum();
            m::checkpoints(txn.checkpoints.len(), snapshots);
            for taken in &txn.checkpoints {
                if let Some(state) = self.partitions.get_mut(&taken.partition) {
                    state.last_checkpoint = Instant::now();
                }
            }
        }
        txn.overlay.merge_into(
            &mut self.partitions,
            |id| canonical_partition(id.as_bytes(), n),
            now_ms,
        );
        let window_ms = i64::try_from(self.settings.dedupe_window.as_millis()).unwrap_or(i64::MAX);
        for state in self.partitions.values_mut() {
            state.dedupe.expire(now_ms.saturating_sub(window_ms));
        }
        for (p, next) in txn.next_offsets {
            self.committed_next.insert(p, Offset::Offset(next));
        }
        m::transaction("committed");
        for (outcome, received) in txn.outcomes {
            m::command(outcome, received.elapsed());
        }
        self.update_memory_gauges();
    }

    /// Drops the open transaction (aborted, or lost to a fatal error): its overlay goes, and
    /// what its checkpoints took from the partitions comes back, so the next one covers it.
    fn drop_txn(&mut self) {
        let Some(txn) = self.txn.take() else { return };
        for taken in txn.checkpoints {
            if let Some(state) = self.partitions.get_mut(&taken.partition) {
                state.dirty.extend(taken.dirty);
                state.events_since_checkpoint += taken.events_since;
                state.needs_checkpoint |= taken.needed;
            }
        }
    }

    /// After an indefinite failure and a new producer (whose `init_transactions` finished the
    /// old transaction one way or the other): did it commit? Its offsets say so.
    fn committed_in_the_end(&self, consumer: &EngineConsumer) -> bool {
        let Some(txn) = self.txn.as_ref().filter(|t| !t.next_offsets.is_empty()) else {
            return false;
        };
        let commands = self.topics.commands();
        let mut tpl = TopicPartitionList::new();
        for p in txn.next_offsets.keys() {
            tpl.add_partition(&commands, *p);
        }
        match consumer.committed_offsets(tpl, TXN_TIMEOUT) {
            Ok(committed) => txn.next_offsets.iter().all(|(p, next)| {
                committed
                    .find_partition(&commands, *p)
                    .is_some_and(|e| e.error().is_ok() && e.offset() == Offset::Offset(*next))
            }),
            Err(e) => {
                // Unknown outcome and no way to learn it: stopping is the only safe move.
                tracing::error!(error = %e, "cannot read the committed offsets after an indefinite commit");
                false
            }
        }
    }

    /// Abortable errors abort and rewind; a timed-out (indefinite) commit or abort re-creates
    /// the producer, whose `init_transactions` fences and aborts what the old one left open;
    /// fatal errors (fenced) stop the engine so that the partitions move.
    fn on_txn_error(&mut self, consumer: &EngineConsumer, error: KafkaError) {
        let (fatal, abortable, retriable) = match &error {
            KafkaError::Transaction(e) => (e.is_fatal(), e.txn_requires_abort(), e.is_retriable()),
            _ => (false, true, false),
        };
        if fatal {
            self.drop_txn();
            self.fail(format!("fatal transaction error: {error}"));
            return;
        }
        tracing::warn!(error = %error, abortable, retriable, "transaction failed; aborting and rewinding");
        let aborted = !retriable && self.producer.abort_transaction(TXN_TIMEOUT).is_ok();
        if !aborted {
            match new_producer(&self.producer_config) {
                Ok(p) => self.producer = p,
                Err(e) => {
                    self.drop_txn();
                    self.fail(format!("cannot re-create the transactional producer: {e}"));
                    return;
                }
            }
            if self.committed_in_the_end(consumer) {
                tracing::warn!("the timed-out transaction did commit; keeping its changes");
                self.committed();
                return;
            }
        }
        m::transaction("aborted");
        self.drop_txn();
        self.rewind(consumer);
    }

    fn rewind(&mut self, consumer: &EngineConsumer) {
        // Whatever failed (the registry, a broker) gets a moment before the redo.
        std::thread::sleep(Duration::from_millis(200));
        let commands = self.topics.commands();
        let mut failed = None;
        for p in self.partitions.keys() {
            let offset = match self.committed_next.get(p) {
                Some(Offset::Offset(o)) => Offset::Offset(*o),
                _ => Offset::Beginning,
            };
            if let Err(e) = consumer.seek(&commands, *p, offset, Duration::from_secs(10)) {
                // Going on would commit offsets past commands never processed.
                failed = Some(format!("cannot seek partition {p} back to {offset:?}: {e}"));
                break;
            }
        }
        if let Some(reason) = failed {
            self.fail(reason);
        }
    }

    fn fail(&mut self, reason: String) {
        tracing::error!(%reason, "command engine stops");
        *lock(&self.status.fatal) = Some(reason.clone());
        self.status.ready.store(false, Ordering::SeqCst);
        self.fatal = Some(reason);
    }
}

/// Why a command's events could not be produced.
enum AppendError {
    /// Redoing the transaction cannot help: the command is rejected with this reason.
    Unwritable(String),
    /// Abort and redo.
    Kafka(KafkaError),
}

impl From<KafkaError> for AppendError {
    fn from(e: KafkaError) -> Self {
        AppendError::Kafka(e)
    }
}

/// `<prefix>.command-service.<INSTANCE_ID>`: stable per instance, so a restart fences its
/// predecessor and aborts its open transaction at once.
pub fn transactional_id(settings: &Settings) -> String {
    format!(
        "{}.command-service.{}",
        settings.topic_prefix, settings.instance_id
    )
}

/// Runs the engine on the current (dedicated) thread until `stop` is set or a fatal error.
/// Returns the fatal error, if any.
pub fn run_engine(
    settings: Arc<Settings>,
    codec: Arc<EventCodec>,
    runtime: tokio::runtime::Handle,
    status: Arc<Status>,
    stop: Arc<AtomicBool>,
) -> Result<(), String> {
    let engine = Engine::new(
        Arc::clone(&settings),
        codec,
        runtime,
        Arc::clone(&status),
        Arc::clone(&stop),
    )
    .map_err(|e| format!("cannot start the transactional producer: {e}"))?;
    let consumer: EngineConsumer = settings
        .kafka
        .client_config()
        .set("group.id", group_id(settings.as_ref()))
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "10000")
        .set("heartbeat.interval.ms", "1000")
        // Incremental rebalancing: partitions that stay keep their state.
        .set("partition.assignment.strategy", "cooperative-sticky")
        // Static membership: a restarted instance takes its partitions back at once.
        .set("group.instance.id", &settings.instance_id)
        // Restores run off the poll loop; a commit can take three 30 s attempts.
        .set("max.poll.interval.ms", "300000")
        .create_with_context(EngineContext {
            engine: Mutex::new(engine),
        })
        .map_err(|e| format!("cannot create the consumer: {e}"))?;
    let commands = Topics::new(&settings.topic_prefix).commands();
    consumer
        .subscribe(&[&commands])
        .map_err(|e| format!("cannot subscribe: {e}"))?;
    tracing::info!(transactional_id = %transactional_id(&settings), topic = %commands, "command engine started");

    let mut outcome = Ok(());
    while !stop.load(Ordering::SeqCst) {
        // With a transaction open, only what is already fetched is taken (then it commits);
        // without one, wait a little for the next command.
        let open = lock(&consumer.context().engine).txn.is_some();
        let polled = consumer.poll(if open {
            Duration::ZERO
        } else {
            Duration::from_millis(20)
        });
        let drained = polled.is_none();
        let mut engine = lock(&consumer.context().engine);
        engine.producer.poll(Duration::ZERO);
        match polled {
            Some(Ok(msg)) => engine.on_message(&consumer, &msg),
            Some(Err(e)) => tracing::warn!(error = %e, "consumer error"),
            None => {}
        }
        // Fatal client errors arrive as error events, not from poll: e.g. another member
        // joined with the same group.instance.id (INSTANCE_ID) and fenced this one.
        if let Some((code, reason)) = consumer.client().fatal_error() {
            engine.fail(format!(
                "fatal consumer error {code:?}: {reason} (is another instance running with \
                 INSTANCE_ID={}?)",
                settings.instance_id
            ));
        }
        engine.install_restores(&consumer);
        if engine.commit_due(drained) {
            engine.commit(&consumer);
        }
        engine.checkpoint_idle(&consumer);
        if let Some(reason) = engine.fatal.clone() {
            outcome = Err(reason);
            break;
        }
    }
    {
        let mut engine = lock(&consumer.context().engine);
        engine.cancel_restores();
        if outcome.is_ok() {
            engine.commit(&consumer);
            // A checkpoint of whatever is due, so that the next start reads a short tail.
            engine.checkpoint_idle(&consumer);
        }
    }
    tracing::info!("command engine leaving the group");
    consumer.unsubscribe();
    // Serve the revocation callback.
    let _ = consumer.poll(Duration::from_millis(100));
    status.ready.store(false, Ordering::SeqCst);
    outcome
}

/// The committed offsets of `partitions` of `<prefix>.commands`, read as the group's
/// (read_committed: this waits for offsets a previous owner left pending in an unfinished
/// transaction, KIP-447, so the restore that follows sees everything they cover). Without them
/// neither the restore nor a later rewind would be sound: retried, then an error.
fn committed_offsets(
    settings: &Settings,
    partitions: &[i32],
    cancel: &AtomicBool,
) -> Result<HashMap<i32, Offset>, restore::RestoreError> {
    let commands = Topics::new(&settings.topic_prefix).commands();
    let kafka_error = |source| restore::RestoreError::Kafka {
        topic: commands.clone(),
        source,
    };
    let consumer: BaseConsumer = settings
        .kafka
        .client_config()
        .set("group.id", group_id(settings))
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .create()
        .map_err(kafka_error)?;
    let mut tpl = TopicPartitionList::new();
    for p in partitions {
        tpl.add_partition(&commands, *p);
    }
    let mut attempt = 0;
    loop {
        attempt += 1;
        match consumer.committed_offsets(tpl.clone(), Duration::from_secs(30)) {
            Ok(c) if c.elements().iter().all(|e| e.error().is_ok()) => {
                return Ok(c
                    .elements()
                    .iter()
                    .map(|e| (e.partition(), e.offset()))
                    .collect());
            }
            Ok(c) => tracing::warn!(attempt, offsets = ?c, "committed offsets not stable yet"),
            Err(e) if attempt >= 4 => return Err(kafka_error(e)),
            Err(e) => tracing::warn!(attempt, error = %e, "cannot read committed offsets"),
        }
        if cancel.load(Ordering::SeqCst) {
            return Err(restore::RestoreError::Interrupted);
        }
        if attempt >= 4 {
            return Err(kafka_error(KafkaError::OffsetFetch(
                RDKafkaErrorCode::UnstableOffsetCommit,
            )));
        }
    }
}

/// `<prefix>.command-service`: the consumer group of all instances.
fn group_id(settings: &Settings) -> String {
    format!("{}.command-service", settings.topic_prefix)
}
