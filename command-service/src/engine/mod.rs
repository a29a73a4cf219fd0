//! The writer: one consumer-group member on `<prefix>.commands` and one transactional producer,
//! on a dedicated thread (librdkafka's transaction calls block).
//!
//! Per command ([`commands`]): forward it if it is not on its aggregate's canonical partition;
//! answer a duplicate with its original result; let the aggregate decide (expected version
//! included); produce events, snapshot and result. Many commands share one transaction
//! ([`transactions`]), which also carries the consumed offsets (KIP-447:
//! `send_offsets_to_transaction` with the consumer's group metadata), so events, results and
//! progress commit or vanish together. A transaction opens with the partition checkpoints that
//! are due ([`checkpoints`], read back by [`crate::restore`]).
//!
//! State changes of the open transaction live in an [`Overlay<A>`] and reach the partition state
//! only after the commit: an abort drops them and seeks the consumer back to the committed
//! offsets. The group uses the cooperative-sticky assignor and static membership
//! (`group.instance.id` = `INSTANCE_ID`): a rebalance moves only the partitions that change
//! owner, and a restarted instance gets its partitions back without waiting for its old session
//! to expire. Rebalance callbacks ([`rebalance`]) run on this thread inside `poll`: a
//! revocation commits (or aborts) the open transaction and drops the revoked partitions' state;
//! an assignment pauses the new partitions and restores them on a thread of their own, so the
//! poll loop goes on serving the others and never outstays `max.poll.interval.ms`; a finished
//! restore resumes them.
//!
//! The engine stops through the service's [`Shutdown`]: gracefully when it is triggered, or by
//! failing it with the reason (a fenced producer or consumer, a transaction whose outcome cannot
//! be learned, a failed seek).

mod checkpoints;
mod commands;
mod rebalance;
mod transactions;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::producer::{BaseProducer, DeliveryResult, Producer, ProducerContext};
use rdkafka::{Offset, TopicPartitionList};
use shared::aggregate::Aggregate;
use shared::codec::EncodeError;
use shared::envelope::InstanceLease;
use shared::kafka::{TopicReader, Topics, canonical_partition};
use shared::shutdown::Shutdown;
use shared::trace::TraceContext;
use shared::{EventCodec, Settings};

use crate::dedupe::DedupeStore;
use crate::metrics as m;
use crate::restore;
use crate::state::{Held, Overlay, PartitionState};

/// Commands per transaction at most; the transaction also commits every `COMMIT_INTERVAL_MS`.
const MAX_COMMANDS_PER_TXN: usize = 1000;

/// How much smaller than their maximum transactions are made for now: each transaction that
/// expired ([`TXN_MAX_AGE`]) quarters the commands and checkpoint snapshots the next one may
/// take, each commit doubles them back. A redo after an expiry is smaller than what expired,
/// so it commits where the same size would expire again.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TxnShrink(u32);

impl TxnShrink {
    /// After a transaction expired.
    #[must_use]
    pub fn expired(self) -> Self {
        TxnShrink((self.0 + 2).min(16))
    }

    /// After a transaction committed.
    #[must_use]
    pub fn committed(self) -> Self {
        TxnShrink(self.0.saturating_sub(1))
    }

    /// `max` made smaller by the current shrink, at least 1.
    pub fn limit(self, max: usize) -> usize {
        (max >> self.0).max(1)
    }
}
/// How long one transactional call may block. The coordinator aborts a transaction open for
/// longer than `transaction.timeout.ms` (10 s) anyway, so waiting longer only freezes the
/// engine through a broker failover.
const TXN_TIMEOUT: Duration = Duration::from_secs(10);
/// The group session time-out: a member not heard of for this long leaves the group.
const SESSION_TIMEOUT: Duration = Duration::from_secs(10);
/// A transaction older than this when all its records are written is aborted, never committed:
/// its instance may have been stopped past its session meanwhile, and a new owner of its
/// partitions may have restored without the records it wrote late.
const TXN_MAX_AGE: Duration = Duration::from_secs(9);
/// How long reading the lease of an INSTANCE_ID may take (the brokers may be failing over).
const LEASE_READ_LIMIT: Duration = Duration::from_secs(30);
/// How long the lease of an INSTANCE_ID is tried again while the brokers cannot be reached
/// before the engine stops: a broker outage of minutes does not stop the writer.
pub(super) const OUTAGE_PATIENCE: Duration = Duration::from_secs(15 * 60);
/// How long a fenced instance waits before reading the lease of its INSTANCE_ID.
const LEASE_GRACE: Duration = Duration::from_secs(3);

/// What the HTTP side can see of the engine (the fatal reason, if any, is the [`Shutdown`]'s).
#[derive(Debug, Default)]
pub struct Status {
    /// An assignment was received and every assigned partition is restored (possibly none).
    pub ready: AtomicBool,
    /// The partitions currently owned.
    pub partitions: Mutex<Vec<i32>>,
    /// What the restores of this instance read, in total (shown by `/ready`).
    pub restores: Mutex<RestoreTotals>,
    /// Set while transactions fail: since when nothing committed, and the last failure.
    pub failing: Mutex<Option<Failing>>,
}

/// Transactions that keep failing: the engine has work and commits none of it.
#[derive(Debug, Clone)]
pub struct Failing {
    /// The last commit (or the start of the failures, if nothing committed before).
    pub since: Instant,
    /// The last transaction's error.
    pub reason: String,
}

impl Status {
    /// How long transactions have failed without a commit in between, and why, once that is at
    /// least `after`.
    pub fn stalled(&self, after: Duration) -> Option<(Duration, String)> {
        let failing = lock(&self.failing).clone()?;
        let elapsed = failing.since.elapsed();
        (elapsed >= after).then_some((elapsed, failing.reason))
    }
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
    /// Aggregates set aside because a stored event of theirs cannot be read.
    #[serde(default)]
    pub quarantined_aggregates: u64,
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

/// Why the engine stopped, or could not start.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// A Kafka client could not be created or set up.
    #[error("cannot start the {what}: {source}")]
    Start {
        /// Which client.
        what: &'static str,
        /// What librdkafka said.
        source: KafkaError,
    },
    /// The engine stopped on a fatal error (the reason is also the [`Shutdown`]'s).
    #[error("{0}")]
    Fatal(String),
}

/// Why the open transaction must be aborted and its commands redone.
#[derive(Debug, thiserror::Error)]
enum TxnError {
    /// Kafka refused or failed a produce, an offset send, a commit.
    #[error(transparent)]
    Kafka(#[from] KafkaError),
    /// An event could not be encoded (the schema registry failed or refused).
    #[error(transparent)]
    Encode(#[from] EncodeError),
    /// The local dedupe store could not be read.
    #[error("{0}")]
    Dedupe(String),
    /// Between rebalances there is no group generation: nothing can be committed.
    #[error("not in a consumer group generation")]
    NoGeneration,
    /// A checkpoint's partition has no offset to commit with it, so the group generation could
    /// not fence the transaction.
    #[error("no offset to fence the checkpoint of partition {0} with")]
    Unfenced(i32),
    /// The event a snapshot covers was not delivered in time, so its offset is unknown.
    #[error("the event a snapshot covers was not delivered")]
    SnapshotEventUndelivered,
    /// Records of the transaction were not all delivered in time.
    #[error("the transaction's records were not all delivered in time")]
    Undelivered,
    /// The transaction outlived [`TXN_MAX_AGE`] before all its records were written.
    #[error("the transaction is {0:?} old once its records are written; aborted, never committed")]
    Expired(Duration),
    /// A duplicate's original result could not be read back from the results topic.
    #[error(
        "cannot read the original result at {topic} partition {partition} offset {offset}: {reason}"
    )]
    ResultUnreadable {
        topic: String,
        partition: i32,
        offset: i64,
        reason: String,
    },
}

/// Identifies a produced record whose offset is wanted. Records nobody waits
/// for go out with [`UNTRACKED`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct DeliveryToken(usize);

/// The opaque of records whose delivery nobody waits for.
const UNTRACKED: usize = 0;

/// Records the offsets of records whose offset is wanted (token → offset, or `None` when the
/// delivery failed): events a snapshot covers, and results the dedupe window points at. Delivery reports are served on the engine thread, by its polls of the
/// producer.
#[derive(Default)]
pub struct DeliveryTracker {
    offsets: Mutex<HashMap<usize, Option<i64>>>,
    /// The latest broker append time seen (results and leases are `LogAppendTime` topics),
    /// and when it was seen: the brokers' clock, which the dedupe window rests on.
    broker_time: Mutex<Option<(i64, Instant)>>,
}

impl DeliveryTracker {
    /// The brokers' time now, if a delivery told it: the latest append time plus the
    /// (monotonic) time since.
    fn broker_now_ms(&self) -> Option<i64> {
        lock(&self.broker_time).map(|(at_ms, seen)| {
            at_ms.saturating_add(i64::try_from(seen.elapsed().as_millis()).unwrap_or(i64::MAX))
        })
    }

    /// The outcome of the delivery of the record sent with `token`, once it is known.
    fn take(&self, token: DeliveryToken) -> Option<Option<i64>> {
        lock(&self.offsets).remove(&token.0)
    }

    /// Forgets every outcome (the transaction they belonged to is gone).
    fn clear(&self) {
        lock(&self.offsets).clear();
    }
}

impl ClientContext for DeliveryTracker {}

impl ProducerContext for DeliveryTracker {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, token: usize) {
        let outcome = match result {
            Ok(msg) => {
                if let rdkafka::Timestamp::LogAppendTime(at_ms) = msg.timestamp() {
                    let mut clock = lock(&self.broker_time);
                    if clock.is_none_or(|(seen_ms, _)| at_ms >= seen_ms) {
                        *clock = Some((at_ms, Instant::now()));
                    }
                }
                Some(msg.offset())
            }
            Err((e, msg)) => {
                tracing::warn!(topic = msg.topic(), partition = msg.partition(), error = %e, "delivery failed; the transaction will abort");
                None
            }
        };
        if token != UNTRACKED {
            lock(&self.offsets).insert(token, outcome);
        }
    }
}

/// Polled by the engine thread itself: with librdkafka's own thread polling it (a
/// `ThreadedProducer`), the flush inside `commit_transaction` waited up to that thread's 100 ms
/// poll for the delivery reports, which made every commit's latency about 100 ms.
type TxnProducer = BaseProducer<DeliveryTracker>;

/// Consumer context: rebalance callbacks reach the engine through it. The engine outlives a
/// consumer that must be replaced (see [`run_engine`]).
pub struct EngineContext<A: Aggregate> {
    engine: Arc<Mutex<Engine<A>>>,
}

impl<A: Aggregate> ClientContext for EngineContext<A> {}

impl<A: Aggregate> ConsumerContext for EngineContext<A> {
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

type EngineConsumer<A> = BaseConsumer<EngineContext<A>>;

/// The open transaction.
struct Txn<A> {
    started: Instant,
    commands: usize,
    /// Per partition of the commands topic, the offset after the last command processed.
    next_offsets: HashMap<i32, i64>,
    overlay: Overlay<A>,
    /// Per command processed: its outcome label and when it was received (for the metrics).
    outcomes: Vec<Processed>,
    /// Snapshots due in this transaction, written just before it commits, when the offsets of
    /// the events they cover are known.
    snapshots: Vec<DueSnapshot<A>>,
    /// Checkpoints written at the start of this transaction, with what they took from their
    /// partition's state, given back if the transaction aborts.
    checkpoints: Vec<TakenCheckpoint>,
}

impl<A> Txn<A> {
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

/// A command processed in the open transaction, for the metrics once it commits.
struct Processed {
    outcome: &'static str,
    received: Instant,
}

/// A snapshot due in the open transaction: the aggregate's state after the event sent with
/// `token`, whose offset the snapshot records.
struct DueSnapshot<A> {
    token: DeliveryToken,
    partition: i32,
    aggregate_id: String,
    /// The aggregate after the event.
    held: Held<A>,
}

/// A checkpoint piece in an open transaction: the aggregates it snapshots (back to the round
/// if it aborts), and whether it completes the round with the record.
struct TakenCheckpoint {
    partition: i32,
    ids: Vec<compact_str::CompactString>,
    completes: bool,
}

/// A restore running on its own thread for some newly assigned partitions.
struct PendingRestore {
    partitions: Vec<i32>,
    cancel: Arc<AtomicBool>,
}

/// What a restore thread sends back.
struct RestoreDone<A> {
    id: u64,
    started: Instant,
    outcome: Result<RestoredPartitions<A>, restore::RestoreError>,
}

/// A finished restore: where the partitions' commands resume, and their state.
struct RestoredPartitions<A> {
    committed: HashMap<i32, Offset>,
    restored: restore::Restored<A>,
}

/// The command processor. Lives inside the consumer's context, driven by [`run_engine`].
pub struct Engine<A: Aggregate> {
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
    /// Reads a duplicate's original result back from `<prefix>.command-results`.
    results: BaseConsumer,
    /// The dedupe window: which command ids were decided, and where their results are.
    dedupe: Arc<DedupeStore>,
    partitions: HashMap<i32, PartitionState<A>>,
    committed_next: HashMap<i32, Offset>,
    txn: Option<Txn<A>>,
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
    restore_done: (mpsc::Sender<RestoreDone<A>>, mpsc::Receiver<RestoreDone<A>>),
    /// An assignment (possibly empty) was received: readiness needs one.
    assigned: bool,
    /// Set when a checkpoint was postponed: no idle checkpoint before then.
    checkpoint_retry_at: Option<Instant>,
    /// Checkpoints postponed in a row (the wait before the next try doubles with them).
    checkpoints_postponed: u32,
    /// Consecutive aborted transactions: the pause before a redo grows with them.
    aborts_in_a_row: u32,
    /// How much smaller transactions are for now, after an expiry.
    shrink: TxnShrink,
    /// When the last transaction committed (or the engine started).
    last_commit: Instant,
    /// Set when the producer was fenced: the loop finds out whether by a twin instance.
    fenced: Option<String>,
    /// This process's name in the lease of its INSTANCE_ID (`<INSTANCE_ID>.<random>`).
    process: String,
    status: Arc<Status>,
    shutdown: Shutdown,
}

/// Commits this process's lease of its INSTANCE_ID with a new producer (whose
/// `init_transactions` just fenced every earlier holder).
fn take_lease(
    producer: &TxnProducer,
    settings: &Settings,
    process: &str,
    takeovers: u32,
) -> KafkaResult<()> {
    write_lease(
        producer,
        settings,
        &InstanceLease {
            instance_id: settings.instance_id.clone(),
            process: process.to_owned(),
            taken_at: chrono::Utc::now(),
            takeovers,
            released: false,
            contested: false,
        },
    )
}

/// Commits `lease` of this INSTANCE_ID in a transaction of its own.
/// Where the records of this INSTANCE_ID live: `<prefix>.command-instances`, on the id's
/// canonical partition.
fn lease_place(settings: &Settings) -> (String, i32) {
    let topic = Topics::new(&settings.topic_prefix).command_instances();
    let partition = canonical_partition(settings.instance_id.as_bytes(), settings.partitions);
    (topic, partition)
}

fn write_lease(
    producer: &TxnProducer,
    settings: &Settings,
    lease: &InstanceLease,
) -> KafkaResult<()> {
    let payload = serde_json::to_vec(lease).unwrap_or_default();
    let (topic, partition) = lease_place(settings);
    producer.begin_transaction()?;
    let record = rdkafka::producer::BaseRecord::with_opaque_to(&topic, UNTRACKED)
        .partition(partition)
        .key(settings.instance_id.as_bytes())
        .payload(&payload);
    producer.send(record).map_err(|(e, _)| e)?;
    // Delivered or not, the commit flushes (and fails if the record cannot be written).
    let _ = serve_deliveries(producer, TXN_TIMEOUT);
    producer.commit_transaction(TXN_TIMEOUT)
}

/// Serves delivery reports until every produced message is delivered (or `timeout`): our polls
/// serve them, not the flush inside `commit_transaction`, which waits in steps of 100 ms.
/// Whether every message was delivered.
fn serve_deliveries(producer: &TxnProducer, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while producer.in_flight_count() > 0 && Instant::now() < deadline {
        producer.poll(Duration::from_millis(1));
    }
    producer.in_flight_count() == 0
}

fn new_producer(config: &ClientConfig) -> KafkaResult<TxnProducer> {
    let producer: TxnProducer = config.create_with_context(DeliveryTracker::default())?;
    producer.init_transactions(TXN_TIMEOUT)?;
    Ok(producer)
}

impl<A: Aggregate> Engine<A> {
    fn new(
        settings: Arc<Settings>,
        codec: Arc<EventCodec>,
        runtime: tokio::runtime::Handle,
        status: Arc<Status>,
        shutdown: Shutdown,
    ) -> Result<Self, EngineError> {
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
        let process = format!(
            "{}.{}",
            settings.instance_id,
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        );
        let takeovers = back_off_from_twin(&settings, &shutdown);
        let producer = new_producer(&producer_config)
            .and_then(|p| take_lease(&p, &settings, &process, takeovers).map(|()| p))
            .map_err(|source| EngineError::Start {
                what: "transactional producer",
                source,
            })?;
        let offsets: BaseConsumer = settings
            .kafka
            .client_config()
            .set("group.id", group_id(&settings))
            .set("isolation.level", "read_uncommitted")
            .create()
            .map_err(|source| EngineError::Start {
                what: "offsets client",
                source,
            })?;
        let cluster_id = producer
            .client()
            .fetch_cluster_id(Duration::from_secs(30))
            .ok_or_else(|| {
                EngineError::Fatal(
                    "cannot learn the Kafka cluster's id (for the dedupe store's path)".into(),
                )
            })?;
        let dedupe_path = DedupeStore::path(
            &settings.command_state_dir,
            &cluster_id,
            &settings.topic_prefix,
            &settings.instance_id,
        );
        let dedupe = DedupeStore::open(&dedupe_path)
            .map(Arc::new)
            .map_err(|e| EngineError::Fatal(e.to_string()))?;
        let results: BaseConsumer = settings
            .kafka
            .client_config()
            .set("group.id", group_id(&settings))
            .set("enable.auto.commit", "false")
            .set("isolation.level", "read_committed")
            .set("fetch.wait.max.ms", "10")
            // A result deleted below the log start: read on from there (its copy, or the end).
            .set("auto.offset.reset", "earliest")
            .create()
            .map_err(|source| EngineError::Start {
                what: "results reader",
                source,
            })?;
        Ok(Engine {
            topics: Topics::new(&settings.topic_prefix),
            results,
            dedupe,
            settings,
            codec,
            runtime,
            producer_config,
            producer,
            offsets,
            partitions: HashMap::new(),
            committed_next: HashMap::new(),
            txn: None,
            next_token: UNTRACKED,
            trace: None,
            restoring: HashMap::new(),
            skipped_while_restoring: HashSet::new(),
            restores: HashMap::new(),
            next_restore: 0,
            restore_done: mpsc::channel(),
            assigned: false,
            checkpoint_retry_at: None,
            checkpoints_postponed: 0,
            aborts_in_a_row: 0,
            shrink: TxnShrink::default(),
            last_commit: Instant::now(),
            fenced: None,
            process,
            status,
            shutdown,
        })
    }

    /// Readiness (an assignment received, nothing being restored), owned partitions and the
    /// memory gauges.
    fn update_status(&self) {
        let mut owned: Vec<i32> = self.partitions.keys().copied().collect();
        owned.sort_unstable();
        self.status.set_partitions(owned);
        let ready = self.assigned && self.restoring.is_empty() && !self.shutdown.is_triggered();
        self.status.ready.store(ready, Ordering::SeqCst);
        self.update_memory_gauges();
    }

    /// The gauges of what the owned partitions hold in memory.
    fn update_memory_gauges(&self) {
        let aggregates = self.partitions.values().map(|s| s.accounts.len()).sum();
        m::set_memory(aggregates, self.dedupe.len());
    }

    /// Stops the engine (and the service) for `reason`.
    fn fail(&mut self, reason: String) {
        tracing::error!(%reason, "command engine stops");
        self.status.ready.store(false, Ordering::SeqCst);
        self.shutdown.fail(reason);
    }

    /// A new transactional producer (its `init_transactions` fences the old one), tried again
    /// through a broker outage for [`OUTAGE_PATIENCE`]; `Err` with the reason when it cannot be
    /// created.
    fn renew_producer(&mut self) -> Result<(), String> {
        let since = Instant::now();
        loop {
            let renewed = new_producer(&self.producer_config)
                .and_then(|p| take_lease(&p, &self.settings, &self.process, 0).map(|()| p));
            match renewed {
                Ok(producer) => {
                    self.producer = producer;
                    return Ok(());
                }
                // A broker outage is waited out; a fenced id is not (a twin holds it).
                Err(e)
                    if since.elapsed() < OUTAGE_PATIENCE
                        && !self.shutdown.is_triggered()
                        && !matches!(
                            e.rdkafka_error_code(),
                            Some(
                                RDKafkaErrorCode::ProducerFenced
                                    | RDKafkaErrorCode::Fenced
                                    | RDKafkaErrorCode::InvalidProducerEpoch
                            )
                        ) =>
                {
                    tracing::warn!(error = %e, waited_s = since.elapsed().as_secs(), "cannot re-create the transactional producer yet; trying again");
                    std::thread::sleep(Duration::from_secs(1));
                }
                Err(e) => return Err(format!("cannot re-create the transactional producer: {e}")),
            }
        }
    }

    /// Releases the lease of the INSTANCE_ID on a graceful stop: nobody holds it. Best effort.
    fn release_lease(&self) {
        if self.txn.is_some() {
            return;
        }
        let lease = InstanceLease {
            instance_id: self.settings.instance_id.clone(),
            process: self.process.clone(),
            taken_at: chrono::Utc::now(),
            takeovers: 0,
            released: true,
            contested: false,
        };
        if let Err(e) = write_lease(&self.producer, &self.settings, &lease) {
            tracing::warn!(error = %e, "cannot release the lease of INSTANCE_ID={}", self.settings.instance_id);
        }
    }

    /// The brokers' time now (ms since the epoch), which the dedupe window's expiry and
    /// restore rest on; this writer's clock only until a delivery told the brokers' (topics
    /// created before their `LogAppendTime`).
    fn broker_now_ms(&self) -> i64 {
        self.producer
            .context()
            .broker_now_ms()
            .unwrap_or_else(|| chrono::Utc::now().timestamp_millis())
    }

    /// Whether the engine stopped on a fatal error.
    fn failed(&self) -> bool {
        self.shutdown.failure().is_some()
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

/// Runs the engine on the current (dedicated) thread until `shutdown` is triggered; fails
/// `shutdown` (and returns the reason) on a fatal error.
pub fn run_engine<A: Aggregate>(
    settings: Arc<Settings>,
    codec: Arc<EventCodec>,
    runtime: tokio::runtime::Handle,
    status: Arc<Status>,
    shutdown: Shutdown,
) -> Result<(), EngineError> {
    let engine = Arc::new(Mutex::new(Engine::<A>::new(
        Arc::clone(&settings),
        codec,
        runtime,
        Arc::clone(&status),
        shutdown.clone(),
    )?));
    let process = lock(&engine).process.clone();
    let mut consumer = subscribe(&settings, Arc::clone(&engine), &process)?;
    while !shutdown.is_triggered() {
        let Some(fenced) = poll_once(&consumer) else {
            continue;
        };
        drop(consumer);
        consumer = recover_from_fencing(&settings, &engine, &process, &fenced)?;
    }
    leave(&consumer, &status);
    match shutdown.failure() {
        Some(reason) => Err(EngineError::Fatal(reason)),
        None => Ok(()),
    }
}

/// Kafka said another instance holds this one's INSTANCE_ID (the consumer's
/// `group.instance.id`, the producer's `transactional.id`). A real twin is fatal: stop. But a
/// broker restart says the same wrongly (the coordinator reloads an older member id; it aborts
/// the transaction it timed out with a bumped epoch). Told apart by the lease: every new
/// producer of an id commits `<prefix>.command-instances` naming its process before it joins
/// the group. If the latest lease is still this process's, a new producer (with a new lease)
/// and a new member take over, and the partitions are restored.
fn recover_from_fencing<A: Aggregate>(
    settings: &Settings,
    engine: &Arc<Mutex<Engine<A>>>,
    process: &str,
    fenced: &str,
) -> Result<EngineConsumer<A>, EngineError> {
    tracing::warn!(%fenced, "fenced: checking whether another instance took INSTANCE_ID={}", settings.instance_id);
    let shutdown = {
        let mut engine = lock(engine);
        engine.forget_partitions();
        engine.shutdown.clone()
    };
    // A twin writes its lease right after its producer fenced ours, before its consumer joins:
    // give it that moment.
    let deadline = Instant::now() + LEASE_GRACE;
    while Instant::now() < deadline && !shutdown.is_triggered() {
        std::thread::sleep(Duration::from_millis(100));
    }
    let twin = twin_holder_patiently(settings, process, &shutdown);
    let mut engine_guard = lock(engine);
    let outcome = match twin {
        Ok(None) => engine_guard.renew_producer(),
        Ok(Some(twin)) => {
            mark_contested(settings, process, &twin);
            Err(format!(
                "fenced by another instance with INSTANCE_ID={} (process {} holds it now); \
                 stopping",
                settings.instance_id, twin.process
            ))
        }
        Err(e) => Err(format!(
            "fenced ({fenced}), and the group cannot be described to tell a twin instance \
             from a broker failover: {e}"
        )),
    };
    if let Err(reason) = outcome {
        engine_guard.fail(reason);
    } else {
        tracing::warn!(
            "no other instance holds INSTANCE_ID={}: rejoining with a new producer",
            settings.instance_id
        );
    }
    drop(engine_guard);
    subscribe(settings, Arc::clone(engine), process)
}

/// [`twin_holder`], tried again while the brokers cannot be reached (each try takes up to
/// [`LEASE_READ_LIMIT`]), for [`OUTAGE_PATIENCE`] at most or until shutdown.
pub(super) fn twin_holder_patiently(
    settings: &Settings,
    process: &str,
    shutdown: &Shutdown,
) -> KafkaResult<Option<InstanceLease>> {
    let since = Instant::now();
    loop {
        match twin_holder(settings, process) {
            Err(e) if since.elapsed() < OUTAGE_PATIENCE && !shutdown.is_triggered() => {
                tracing::warn!(error = %e, waited_s = since.elapsed().as_secs(), "the lease of INSTANCE_ID={} cannot be read (the brokers are unreachable?); trying again", settings.instance_id);
                std::thread::sleep(Duration::from_secs(1));
            }
            read => return read,
        }
    }
}

/// The lease of the process that holds this INSTANCE_ID now, if it is not this one: the
/// latest committed lease of the id (a contested mark is no lease).
pub(super) fn twin_holder(
    settings: &Settings,
    process: &str,
) -> KafkaResult<Option<InstanceLease>> {
    Ok(read_lease(settings)?
        .holder
        .filter(|lease| !lease.released && lease.process != process))
}

/// What `<prefix>.command-instances` says of this INSTANCE_ID.
#[derive(Debug, Default)]
struct LeaseRecords {
    /// The latest lease (taken or released).
    holder: Option<InstanceLease>,
    /// The latest record: the lease, or a contested mark written after it.
    latest: Option<InstanceLease>,
}

/// The latest records of this INSTANCE_ID.
fn read_lease(settings: &Settings) -> KafkaResult<LeaseRecords> {
    let (topic, partition) = lease_place(settings);
    let reader = TopicReader::open_at(
        &settings.kafka,
        &format!("{}.lease-check", group_id(settings)),
        &topic,
        &[(partition, Offset::Beginning)],
    )?;
    let mut records = LeaseRecords::default();
    // Bounded: a broker that stays away must not hold the engine (and its lock) for ever.
    let read = reader.drain_for(LEASE_READ_LIMIT, |msg| {
        if msg.key() == Some(settings.instance_id.as_bytes())
            && let Some(Ok(lease)) = msg.payload().map(serde_json::from_slice::<InstanceLease>)
        {
            if !lease.contested {
                records.holder = Some(lease.clone());
            }
            records.latest = Some(lease);
        }
    });
    if !read {
        return Err(KafkaError::MessageConsumption(
            RDKafkaErrorCode::RequestTimedOut,
        ));
    }
    Ok(records)
}

/// Says (outside a transaction: this process's producer is fenced) that this process stops
/// because `holder` took its INSTANCE_ID while it ran: the next taker backs off
/// ([`twin_back_off`]). Best effort: unwritten, the next taker just does not wait.
pub(super) fn mark_contested(settings: &Settings, process: &str, holder: &InstanceLease) {
    let mark = InstanceLease {
        instance_id: settings.instance_id.clone(),
        process: process.to_owned(),
        taken_at: chrono::Utc::now(),
        takeovers: holder.takeovers,
        released: false,
        contested: true,
    };
    let written = settings
        .kafka
        .producer_config()
        .create::<rdkafka::producer::BaseProducer>()
        .and_then(|producer| {
            let payload = serde_json::to_vec(&mark).unwrap_or_default();
            let (topic, partition) = lease_place(settings);
            producer
                .send(
                    rdkafka::producer::BaseRecord::<[u8], [u8]>::to(&topic)
                        .partition(partition)
                        .key(settings.instance_id.as_bytes())
                        .payload(&payload),
                )
                .map_err(|(e, _)| e)?;
            producer.flush(Duration::from_secs(5))
        });
    if let Err(e) = written {
        tracing::warn!(error = %e, "cannot mark INSTANCE_ID={} as contested", settings.instance_id);
    }
}

/// A contested mark older than this no longer counts: the fight it records is over.
const TWIN_WINDOW: Duration = Duration::from_secs(120);

/// The back-off before taking the id after the `previous` record of it: none after a lease
/// (held, released, or left by a holder that died without a word: a crash or SIGKILL restarts
/// at once); after a contested mark (its writer found the id taken while it ran, and stopped:
/// two instances configured with one INSTANCE_ID, restarted by an orchestrator each time the
/// other fences them), 5 s, doubling with each takeover in a row up to 5 min. Returns the
/// takeovers in a row this taking makes, and the wait.
pub fn twin_back_off(
    previous: Option<&InstanceLease>,
    now: chrono::DateTime<chrono::Utc>,
) -> (u32, Duration) {
    let Some(previous) = previous.filter(|p| p.contested) else {
        return (0, Duration::ZERO);
    };
    let since = (now - previous.taken_at).to_std().unwrap_or(Duration::ZERO);
    if since >= TWIN_WINDOW {
        return (0, Duration::ZERO);
    }
    let takeovers = previous.takeovers.saturating_add(1);
    let wait = Duration::from_secs(5)
        .saturating_mul(1 << (takeovers - 1).min(6))
        .min(Duration::from_secs(300));
    (takeovers, wait)
}

fn back_off_from_twin(settings: &Settings, shutdown: &Shutdown) -> u32 {
    let previous = match read_lease(settings) {
        Ok(records) => records.latest,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the lease of INSTANCE_ID={}; taking it", settings.instance_id);
            return 0;
        }
    };
    let (takeovers, wait) = twin_back_off(previous.as_ref(), chrono::Utc::now());
    if !wait.is_zero() {
        tracing::error!(
            instance_id = %settings.instance_id,
            takeovers,
            wait_s = wait.as_secs(),
            "INSTANCE_ID={} has changed hands {takeovers} times in a row, each moments after \
             the last: two instances are configured with the same INSTANCE_ID and fence each \
             other. Give each instance its own INSTANCE_ID. Waiting before taking it",
            settings.instance_id
        );
        let until = Instant::now() + wait;
        while Instant::now() < until && !shutdown.is_triggered() {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    takeovers
}

/// The group member on `<prefix>.commands`, with the engine in its context.
fn subscribe<A: Aggregate>(
    settings: &Settings,
    engine: Arc<Mutex<Engine<A>>>,
    process: &str,
) -> Result<EngineConsumer<A>, EngineError> {
    let start = |source| EngineError::Start {
        what: "consumer",
        source,
    };
    let consumer: EngineConsumer<A> = settings
        .kafka
        .client_config()
        .set("group.id", group_id(settings))
        .set("client.id", format!("command-service.{process}"))
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .set("auto.offset.reset", "earliest")
        .set(
            "session.timeout.ms",
            SESSION_TIMEOUT.as_millis().to_string(),
        )
        .set("heartbeat.interval.ms", "1000")
        .set("fetch.wait.max.ms", "10")
        // Incremental rebalancing: partitions that stay keep their state.
        .set("partition.assignment.strategy", "cooperative-sticky")
        // Static membership: a restarted instance takes its partitions back at once.
        .set("group.instance.id", &settings.instance_id)
        // Restores run off the poll loop; a commit can take three 10 s attempts.
        .set("max.poll.interval.ms", "300000")
        .create_with_context(EngineContext { engine })
        .map_err(start)?;
    let commands = Topics::new(&settings.topic_prefix).commands();
    consumer.subscribe(&[&commands]).map_err(start)?;
    tracing::info!(transactional_id = %transactional_id(settings), topic = %commands, "command engine started");
    Ok(consumer)
}

/// One turn of the loop: take a command (or wait a little for one), serve delivery reports,
/// install finished restores, commit when due, checkpoint when idle. Returns why this instance
/// was fenced (its consumer's fatal error, or its producer's), if it was.
fn poll_once<A: Aggregate>(consumer: &EngineConsumer<A>) -> Option<String> {
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
        Some(Ok(msg)) => engine.on_message(consumer, &msg),
        Some(Err(e)) => tracing::warn!(error = %e, "consumer error"),
        None => {}
    }
    // Fatal client errors arrive as error events, not from poll: e.g. another member joined
    // with the same group.instance.id (INSTANCE_ID) and fenced this one.
    if let Some((code, reason)) = consumer.client().fatal_error() {
        return Some(format!("{code:?}: {reason}"));
    }
    if let Some(reason) = engine.fenced.take() {
        return Some(reason);
    }
    engine.install_restores(consumer);
    if engine.commit_due(drained) {
        engine.commit(consumer);
    }
    engine.checkpoint_idle(consumer);
    None
}

/// How long a leaving engine spends on checkpoint pieces at most.
const LEAVE_CHECKPOINT_TIME: Duration = Duration::from_secs(5);

/// Leaves the group: the open transaction commits (unless the engine failed), a checkpoint of
/// whatever changed is written so that the next start reads a short tail, and the revocation
/// callback is served.
fn leave<A: Aggregate>(consumer: &EngineConsumer<A>, status: &Status) {
    {
        let mut engine = lock(&consumer.context().engine);
        engine.cancel_restores();
        if !engine.failed() {
            engine.commit(consumer);
            engine.checkpoint_all(consumer, LEAVE_CHECKPOINT_TIME);
            engine.release_lease();
        }
    }
    tracing::info!("command engine leaving the group");
    consumer.unsubscribe();
    let _ = consumer.poll(Duration::from_millis(100));
    status.ready.store(false, Ordering::SeqCst);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn record(
        taken_secs_ago: i64,
        takeovers: u32,
        released: bool,
        contested: bool,
    ) -> InstanceLease {
        InstanceLease {
            instance_id: "i".into(),
            process: "i.p".into(),
            taken_at: chrono::Utc::now() - chrono::Duration::seconds(taken_secs_ago),
            takeovers,
            released,
            contested,
        }
    }

    #[test]
    fn only_a_contested_id_backs_off_and_ever_longer() {
        let now = chrono::Utc::now();
        let none = (0, Duration::ZERO);
        assert_eq!(twin_back_off(None, now), none);
        // A released lease, a lease held a while, a lease taken moments ago by a process that
        // then died (a crash loop): no wait.
        assert_eq!(twin_back_off(Some(&record(5, 0, true, false)), now), none);
        assert_eq!(
            twin_back_off(Some(&record(600, 4, false, false)), now),
            none
        );
        assert_eq!(twin_back_off(Some(&record(1, 3, false, false)), now), none);
        // A contested mark: its writer was fenced by a running twin.
        assert_eq!(
            twin_back_off(Some(&record(5, 0, false, true)), now),
            (1, Duration::from_secs(5))
        );
        assert_eq!(
            twin_back_off(Some(&record(5, 1, false, true)), now),
            (2, Duration::from_secs(10))
        );
        assert_eq!(
            twin_back_off(Some(&record(5, 40, false, true)), now),
            (41, Duration::from_secs(300))
        );
        assert_eq!(
            twin_back_off(Some(&record(600, 5, false, true)), now),
            none,
            "an old fight is over"
        );
    }
}
