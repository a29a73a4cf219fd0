//! The consumer side: read batches of `<prefix>.events`, decode and upcast them, plan them
//! ([`crate::plan`]) and write each batch with its offsets in one database transaction.
//!
//! Exactly-once in effect rests on three things:
//! - **The database holds the offsets.** Each batch stores the next offset of its partitions in
//!   the same transaction as the rows, as a compare-and-set against the value this process last
//!   saw ([`OffsetBook`]). On assignment the consumer starts from the stored offsets (the
//!   rebalance callback of [`ProjectionContext`] assigns them explicitly), and a compare-and-set
//!   that fails (another instance, or a rebuild swapped tables in) makes it re-read the database
//!   and seek there before anything of that partition is written.
//! - **Per-aggregate versions** are the second line of defence: a version already applied is
//!   skipped, a gap is parked.
//! - **Dead letters are delivered before the commit** that moves past them.
//!
//! After the database commit the offsets are also committed to Kafka (asynchronously), only so
//! that standard tools show the group's lag. A lag monitor ([`monitor`]) compares the stored
//! offsets with the partitions' last stable offsets, exports the lag and flips readiness once the
//! projection has caught up.
//!
//! While idle the loop re-reads the stored offsets every second, so a rebuild swapped in by
//! another process is picked up even when no new event arrives (see [`crate::rebuild`]).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use rdkafka::ClientContext;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, RebalanceProtocol, StreamConsumer,
};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::types::RDKafkaRespErr;
use shared::shutdown::Shutdown;
use tokio::sync::watch;

use sqlx::{Any, Transaction};

use crate::db::{Database, OffsetAdvance, PartitionOffset, StoreError, Tables};
use crate::decode::{Decoder, Verdict};
use crate::dlq::DeadLetterQueue;
use crate::metrics;
use crate::model::ReadModel;
use crate::plan::{DeadLetter, Incoming, Plan, plan_batch};

/// Most messages per batch.
pub(crate) const MAX_BATCH: usize = 500;
/// How long a batch waits for more messages after its first.
pub(crate) const BATCH_LINGER: Duration = Duration::from_millis(50);
/// How long the loop waits for a first message before doing its idle chores.
const IDLE_TICK: Duration = Duration::from_secs(1);

/// Why the projector stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ProjectorError {
    /// The database failed in a way retrying will not fix.
    #[error("read-model database: {0}")]
    Store(#[from] StoreError),
    /// Kafka refused something retrying will not fix.
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    /// The database's next offset of a partition is beyond the partition's end: the topic was
    /// deleted and created again (or truncated) while the read model was kept.
    #[error(
        "the stored next offset {stored} of {topic} partition {partition} is beyond the \
         partition's end offset {end}: the topic was recreated or truncated while the read \
         model was kept, so the projection cannot continue. Recover with \
         `projection-service rebuild` (replays the topic into fresh tables) or start with a \
         fresh database (PROJECTION_DATABASE_URL)"
    )]
    OffsetBeyondEnd {
        /// The events topic.
        topic: String,
        /// Its partition.
        partition: i32,
        /// The next offset the database holds.
        stored: i64,
        /// The partition's high watermark.
        end: i64,
    },
}

/// What this process believes the database holds as next offsets, plus the current
/// assignment. Shared by the loop, the rebalance callback and the lag monitor.
#[derive(Debug, Default)]
pub(crate) struct OffsetBook {
    inner: Mutex<BookInner>,
}

/// The partitions a consumer holds right now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Assignment {
    /// Assigned partitions, ascending.
    pub partitions: Vec<i32>,
    /// Whether any assignment happened yet (before it, no lag can be measured).
    pub assigned_once: bool,
}

#[derive(Debug, Default)]
struct BookInner {
    stored: HashMap<i32, i64>,
    assigned: BTreeSet<i32>,
    assigned_once: bool,
}

impl OffsetBook {
    /// A book starting from the offsets read from the database.
    pub(crate) fn new(stored: HashMap<i32, i64>) -> Self {
        OffsetBook {
            inner: Mutex::new(BookInner {
                stored,
                ..BookInner::default()
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BookInner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The stored next offset of a partition (`None`: nothing stored yet, start at the beginning).
    pub(crate) fn stored(&self, partition: i32) -> Option<i64> {
        self.lock().stored.get(&partition).copied()
    }

    fn set(&self, partition: i32, next: Option<i64>) {
        let mut inner = self.lock();
        match next {
            Some(n) => inner.stored.insert(partition, n),
            None => inner.stored.remove(&partition),
        };
    }

    /// Partitions currently assigned, and whether any assignment happened yet.
    pub(crate) fn assignment(&self) -> Assignment {
        let inner = self.lock();
        Assignment {
            partitions: inner.assigned.iter().copied().collect(),
            assigned_once: inner.assigned_once,
        }
    }

    fn assign(&self, partitions: &[i32]) {
        let mut inner = self.lock();
        inner.assigned.extend(partitions);
        inner.assigned_once = true;
    }

    fn revoke(&self, partitions: &[i32], all: bool) {
        let mut inner = self.lock();
        if all {
            inner.assigned.clear();
        } else {
            for p in partitions {
                inner.assigned.remove(p);
            }
        }
    }
}

/// Progress signals shared with the HTTP side.
#[derive(Debug)]
pub struct Status {
    /// Caught up at least once since start (`GET /ready`).
    pub ready: AtomicBool,
    /// Bumped after every commit; `?min_version` waits on it.
    pub commits: watch::Sender<u64>,
    idle: AtomicBool,
    received: AtomicU64,
    lags: Mutex<Vec<PartitionLag>>,
    dead_letters: Mutex<Option<i64>>,
    measured: Mutex<Measured>,
}

/// When the lag of every partition the read model needs was last measured, and what stood in
/// the way since.
#[derive(Debug)]
struct Measured {
    at: Instant,
    problem: Option<String>,
}

impl Default for Status {
    fn default() -> Self {
        Status {
            ready: AtomicBool::new(false),
            commits: watch::channel(0).0,
            idle: AtomicBool::new(true),
            received: AtomicU64::new(0),
            lags: Mutex::new(Vec::new()),
            dead_letters: Mutex::new(None),
            measured: Mutex::new(Measured {
                at: Instant::now(),
                problem: None,
            }),
        }
    }
}

/// The lag of one assigned partition as the last [`monitor`] round measured it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
pub(crate) struct PartitionLag {
    /// Partition of the events topic.
    pub partition: i32,
    /// The next offset the projection will read (stored, or the consumer's position).
    pub position: i64,
    /// The partition's last stable offset.
    pub end: i64,
    /// `end - position`: messages not yet projected.
    pub lag: i64,
}

impl Status {
    /// The lag of each assigned partition, by partition (empty before the first assignment).
    pub(crate) fn lags(&self) -> Vec<PartitionLag> {
        self.lags
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn set_lags(&self, lags: Vec<PartitionLag>) {
        *self.lags.lock().unwrap_or_else(PoisonError::into_inner) = lags;
    }

    /// A monitor round measured the lag of every assigned partition (and some are assigned).
    fn measured(&self) {
        let mut measured = self.measured.lock().unwrap_or_else(PoisonError::into_inner);
        measured.at = Instant::now();
        measured.problem = None;
    }

    /// How long ago the lag of every needed partition was last measured.
    fn lag_age(&self) -> Duration {
        self.measured
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .at
            .elapsed()
    }

    /// How old the lag figures are, and why the last monitor round could not measure them
    /// (`None` when it could): what `/status` shows at once, long before a stall.
    pub(crate) fn lag_freshness(&self) -> (Duration, Option<String>) {
        let measured = self.measured.lock().unwrap_or_else(PoisonError::into_inner);
        (measured.at.elapsed(), measured.problem.clone())
    }

    /// A monitor round could not measure the lag: why.
    fn not_measured(&self, problem: String) {
        self.measured
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .problem = Some(problem);
    }

    /// Why the projection cannot be trusted to be applying events, once the lag has gone
    /// unmeasured for `after` (no partition assigned, the watermarks unreadable, the monitor
    /// gone): `Some(reason)`. The gauge `projection_lag_age_seconds` shows the age.
    pub(crate) fn stalled(&self, after: Duration) -> Option<String> {
        let measured = self.measured.lock().unwrap_or_else(PoisonError::into_inner);
        let age = measured.at.elapsed();
        (age >= after).then(|| {
            format!(
                "the lag has not been measured for {}s ({}): the projection may not be \
                 applying events",
                age.as_secs(),
                measured
                    .problem
                    .as_deref()
                    .unwrap_or("the lag monitor stopped")
            )
        })
    }

    /// Messages in the dead-letter topic (`None` until first counted, see
    /// [`crate::dlq::count_monitor`]).
    pub(crate) fn dead_letters(&self) -> Option<i64> {
        *self
            .dead_letters
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Records the dead-letter count.
    pub(crate) fn set_dead_letters(&self, count: Option<i64>) {
        *self
            .dead_letters
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = count;
    }
}

/// Consumer context that assigns partitions at the offsets stored in the database.
pub(crate) struct ProjectionContext {
    topic: String,
    book: Arc<OffsetBook>,
}

impl ProjectionContext {
    /// A context for `topic` reading offsets from `book`.
    pub(crate) fn new(topic: String, book: Arc<OffsetBook>) -> Self {
        ProjectionContext { topic, book }
    }
}

impl ClientContext for ProjectionContext {}

impl ConsumerContext for ProjectionContext {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        let cooperative = matches!(
            consumer.rebalance_protocol(),
            RebalanceProtocol::Cooperative
        );
        let partitions: Vec<i32> = tpl
            .elements_for_topic(&self.topic)
            .iter()
            .map(|e| e.partition())
            .collect();
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                for p in &partitions {
                    let offset = match self.book.stored(*p) {
                        Some(next) => Offset::Offset(next),
                        None => Offset::Beginning,
                    };
                    if let Err(e) = tpl.set_partition_offset(&self.topic, *p, offset) {
                        tracing::error!(partition = p, error = %e, "cannot set assignment offset");
                    }
                }
                let result = if cooperative {
                    consumer.incremental_assign(tpl)
                } else {
                    consumer.assign(tpl)
                };
                match result {
                    Ok(()) => {
                        self.book.assign(&partitions);
                        tracing::info!(?partitions, "partitions assigned at stored offsets");
                    }
                    Err(e) => tracing::error!(error = %e, "assign failed"),
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                let result = if cooperative {
                    consumer.incremental_unassign(tpl)
                } else {
                    consumer.unassign()
                };
                if let Err(e) = result {
                    tracing::warn!(error = %e, "unassign failed");
                }
                self.book.revoke(&partitions, !cooperative);
                tracing::info!(?partitions, "partitions revoked");
            }
            other => {
                tracing::error!(error = ?other, "rebalance error");
                if !cooperative {
                    let _ = consumer.unassign();
                    self.book.revoke(&partitions, true);
                }
            }
        }
    }
}

/// One consumed message, owned.
#[derive(Debug, Clone)]
pub(crate) struct RawMessage {
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
    /// Key.
    pub key: Option<Vec<u8>>,
    /// Value.
    pub payload: Option<Vec<u8>>,
    /// Headers.
    pub headers: Option<rdkafka::message::OwnedHeaders>,
}

impl RawMessage {
    /// Copies a borrowed message.
    pub(crate) fn from_borrowed(m: &BorrowedMessage<'_>) -> Self {
        RawMessage {
            partition: m.partition(),
            offset: m.offset(),
            key: m.key().map(<[u8]>::to_vec),
            payload: m.payload().map(<[u8]>::to_vec),
            headers: m.headers().map(|h| h.detach()),
        }
    }
}

/// What [`collect`] found.
#[derive(Debug)]
pub(crate) enum Collected {
    /// Messages to process.
    Batch {
        /// The messages, in arrival order.
        messages: Vec<RawMessage>,
        /// Shutdown was requested while gathering: process them, then stop.
        then_stop: bool,
    },
    /// Nothing arrived within the idle tick.
    Idle,
    /// Shutdown was requested and nothing is pending.
    Shutdown,
}

/// Waits for a first message (up to `idle`), then gathers more for [`BATCH_LINGER`] or until
/// [`MAX_BATCH`].
pub(crate) async fn collect<C: ConsumerContext + 'static>(
    consumer: &StreamConsumer<C>,
    status: Option<&Status>,
    idle: Duration,
    shutdown: &Shutdown,
) -> Collected {
    if shutdown.is_triggered() {
        return Collected::Shutdown;
    }
    let first = tokio::select! {
        m = tokio::time::timeout(idle, consumer.recv()) => m,
        _ = shutdown.wait() => return Collected::Shutdown,
    };
    let mut batch = Vec::new();
    match first {
        Err(_) => return Collected::Idle,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "consumer error");
            // Errors can repeat while a broker is away: do not spin.
            tokio::time::sleep(Duration::from_millis(200)).await;
            return Collected::Idle;
        }
        Ok(Ok(m)) => {
            if let Some(s) = status {
                s.idle.store(false, Ordering::SeqCst);
                s.received.fetch_add(1, Ordering::SeqCst);
            }
            batch.push(RawMessage::from_borrowed(&m));
        }
    }
    let deadline = tokio::time::Instant::now() + BATCH_LINGER;
    let mut stop = false;
    while batch.len() < MAX_BATCH {
        tokio::select! {
            m = tokio::time::timeout_at(deadline, consumer.recv()) => match m {
                Err(_) => break,
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "consumer error");
                    break;
                }
                Ok(Ok(m)) => {
                    if let Some(s) = status {
                        s.received.fetch_add(1, Ordering::SeqCst);
                    }
                    batch.push(RawMessage::from_borrowed(&m));
                }
            },
            _ = shutdown.wait() => {
                stop = true;
                break;
            }
        }
    }
    Collected::Batch {
        messages: batch,
        then_stop: stop,
    }
}

/// What one processed batch amounted to.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct BatchOutcome {
    /// Events applied.
    pub applied: u64,
    /// Duplicates skipped.
    pub duplicates: u64,
    /// Events parked.
    pub parked: u64,
    /// Messages dead-lettered.
    pub dead_lettered: u64,
    /// Messages written (all that were not stale).
    pub messages: u64,
    /// Whether shutdown interrupted the batch (nothing was committed).
    pub interrupted: bool,
}

/// What a projector is for; decides what it does besides writing its tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// The service's own projection: a member of the live consumer group, writing the live
    /// tables; after each commit it also commits the offsets to Kafka so that standard tools
    /// show the group's lag.
    Live,
    /// A rebuild filling fresh tables with a throwaway consumer (assigned partitions, no group
    /// membership): nothing is ever committed to Kafka.
    Rebuild,
}

/// The distinct aggregates a batch's decodable events touch, in first-seen order.
fn touched_aggregates(messages: &[Incoming]) -> Vec<&str> {
    let mut seen = HashSet::new();
    messages
        .iter()
        .filter_map(|m| m.decoded.as_ref().ok())
        .map(|e| e.aggregate_id.as_str())
        .filter(|id| seen.insert(*id))
        .collect()
}

/// Per partition of the batch: the offset after its last message.
fn next_offsets(messages: &[Incoming]) -> HashMap<i32, i64> {
    let mut next: HashMap<i32, i64> = HashMap::new();
    for m in messages {
        let n = next.entry(m.partition).or_insert(m.offset + 1);
        *n = (*n).max(m.offset + 1);
    }
    next
}

/// Projects batches into one set of read model `M`'s tables.
pub(crate) struct Projector<M> {
    db: Database,
    tables: Tables,
    mode: Mode,
    topic: String,
    decoder: Decoder,
    dlq: DeadLetterQueue,
    book: Arc<OffsetBook>,
    status: Arc<Status>,
    model: std::marker::PhantomData<M>,
}

impl<M> std::fmt::Debug for Projector<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Projector")
            .field("topic", &self.topic)
            .field("tables", &self.tables)
            .field("mode", &self.mode)
            .finish()
    }
}

fn backoff(attempt: u32) -> Duration {
    Duration::from_millis(100u64.saturating_mul(1 << attempt.min(6))).min(Duration::from_secs(5))
}

/// Sleeps, or returns false at once when shutdown is requested.
async fn sleep_unless_stopped(d: Duration, shutdown: &Shutdown) -> bool {
    if shutdown.is_triggered() {
        return false;
    }
    tokio::select! {
        _ = tokio::time::sleep(d) => true,
        _ = shutdown.wait() => false,
    }
}

impl<M: ReadModel> Projector<M> {
    /// The live projection: writes the live tables, reports to `status` and commits its
    /// offsets to Kafka too (for monitoring).
    pub(crate) fn live(
        db: Database,
        topic: String,
        decoder: Decoder,
        dlq: DeadLetterQueue,
        book: Arc<OffsetBook>,
        status: Arc<Status>,
    ) -> Self {
        Projector {
            db,
            tables: Tables::live_of::<M>(),
            mode: Mode::Live,
            topic,
            decoder,
            dlq,
            book,
            status,
            model: std::marker::PhantomData,
        }
    }

    /// A rebuild's projector: writes `tables` and commits nothing to Kafka.
    pub(crate) fn rebuild(
        db: Database,
        tables: Tables,
        topic: String,
        decoder: Decoder,
        dlq: DeadLetterQueue,
        book: Arc<OffsetBook>,
    ) -> Self {
        Projector {
            db,
            tables,
            mode: Mode::Rebuild,
            topic,
            decoder,
            dlq,
            book,
            status: Arc::new(Status::default()),
            model: std::marker::PhantomData,
        }
    }

    /// Decodes, retrying while the schema registry is unreachable or does not know a schema id
    /// yet (see [`crate::decode`]). `None` on shutdown.
    ///
    /// Adds one `apply_event` span per message to `spans`: the caller keeps them open until the
    /// batch is committed, so each covers its event's decode, apply and commit.
    async fn decode(
        &self,
        batch: Vec<RawMessage>,
        spans: &mut Vec<tracing::Span>,
        shutdown: &Shutdown,
    ) -> Option<Vec<Incoming>> {
        let mut out = Vec::with_capacity(batch.len());
        for m in batch {
            spans.push(Self::apply_span(&m));
            let mut attempt = 0;
            let decoded = loop {
                match self.decoder.attempt(m.payload.as_deref()).await {
                    Verdict::Decoded(result) => break result,
                    Verdict::Retry { reason, error } => {
                        tracing::warn!(
                            partition = m.partition,
                            offset = m.offset,
                            error = %error,
                            "{reason}; retrying"
                        );
                        metrics::record_registry_retry(&self.topic);
                        if !sleep_unless_stopped(backoff(attempt), shutdown).await {
                            return None;
                        }
                        attempt += 1;
                    }
                }
            };
            out.push(Incoming {
                partition: m.partition,
                offset: m.offset,
                key: m.key,
                payload: m.payload,
                headers: m.headers,
                decoded,
            });
        }
        Some(out)
    }

    /// The span of applying one event: a child of the trace in its `traceparent` header (the
    /// command's), with the trace id as a field.
    fn apply_span(m: &RawMessage) -> tracing::Span {
        let span = tracing::info_span!(
            "apply_event",
            partition = m.partition,
            offset = m.offset,
            trace_id = tracing::field::Empty
        );
        if let Some(trace) = shared::trace::TraceContext::from_headers(m.headers.as_ref()) {
            span.record("trace_id", trace.trace_id_hex());
            shared::runtime::set_parent(&span, &trace);
        }
        span
    }

    /// Applies one batch: plan, write with offsets, dead-letter, commit. Transient failures are
    /// retried with backoff; a moved stored offset makes the partition seek to it and its
    /// messages are dropped from the batch (they will be read again from there).
    pub(crate) async fn process<C: ConsumerContext + 'static>(
        &self,
        consumer: &StreamConsumer<C>,
        batch: Vec<RawMessage>,
        shutdown: &Shutdown,
    ) -> Result<BatchOutcome, ProjectorError> {
        let started = Instant::now();
        // Messages fetched before a seek to a later stored offset are already applied.
        let batch: Vec<RawMessage> = batch
            .into_iter()
            .filter(|m| self.book.stored(m.partition).is_none_or(|s| m.offset >= s))
            .collect();
        let mut apply_spans = Vec::with_capacity(batch.len());
        let Some(mut messages) = self.decode(batch, &mut apply_spans, shutdown).await else {
            return Ok(BatchOutcome {
                interrupted: true,
                ..BatchOutcome::default()
            });
        };
        let mut attempt = 0u32;
        loop {
            if messages.is_empty() {
                return Ok(BatchOutcome::default());
            }
            match self.try_commit(consumer, &messages).await {
                Ok(outcome) => {
                    self.after_commit(consumer, &messages, &outcome, started);
                    return Ok(outcome);
                }
                Err(Attempt::Moved(partitions)) if !partitions.is_empty() => {
                    messages.retain(|m| !partitions.contains(&m.partition));
                }
                Err(Attempt::Store(e)) if !e.is_retriable() => return Err(e.into()),
                Err(failure) => {
                    let reason = match &failure {
                        // A conflict although no offset moved (the tables disagree with each
                        // other): back off instead of spinning on it.
                        Attempt::Moved(_) => "write conflict without moved offsets".to_owned(),
                        Attempt::Store(e) => format!("batch failed: {e}"),
                        Attempt::Kafka(e) => format!("dead-letter delivery failed: {e}"),
                    };
                    tracing::warn!(%reason, attempt, "retrying the batch");
                    metrics::record_retry(&self.topic);
                    if !sleep_unless_stopped(backoff(attempt), shutdown).await {
                        return Ok(BatchOutcome {
                            interrupted: true,
                            ..BatchOutcome::default()
                        });
                    }
                    attempt += 1;
                }
            }
        }
    }

    async fn try_commit<C: ConsumerContext + 'static>(
        &self,
        consumer: &StreamConsumer<C>,
        messages: &[Incoming],
    ) -> Result<BatchOutcome, Attempt> {
        let mut tx = self.db.begin_write().await?;
        let plan = self.plan(&mut tx, messages).await?;
        match Database::write_batch::<M>(&mut tx, &self.tables, &self.topic, &plan.write).await {
            Ok(()) => {}
            Err(StoreError::Conflict(reason)) => {
                tx.rollback().await.map_err(StoreError::from)?;
                tracing::warn!(%reason, "stored offsets moved; re-reading them");
                let partitions = plan.write.offsets.iter().map(|o| o.partition);
                let moved = self.resync(consumer, partitions).await?;
                return Err(Attempt::Moved(moved));
            }
            Err(e) => return Err(e.into()),
        }
        self.deliver_dead_letters(&plan.dead_letters).await?;
        tx.commit().await.map_err(StoreError::from)?;
        Ok(self.record_committed(&plan, messages.len()))
    }

    /// Loads what the batch touches and plans it, with the offsets to compare-and-set.
    async fn plan(
        &self,
        tx: &mut Transaction<'static, Any>,
        messages: &[Incoming],
    ) -> Result<Plan<M::Aggregate>, StoreError> {
        let ids = touched_aggregates(messages);
        let stored = M::load(tx, &self.tables, &ids).await?;
        let parked = if Database::parked_count(tx, &self.tables).await? > 0 {
            Database::load_parked(tx, &self.tables, &ids).await?
        } else {
            Vec::new()
        };
        let partitions = self.decoder.partitions();
        let mut plan = plan_batch::<M>(&self.topic, partitions, messages, stored, parked);
        plan.write.offsets = next_offsets(messages)
            .into_iter()
            .map(|(partition, next)| OffsetAdvance {
                partition,
                expected: self.book.stored(partition),
                next,
            })
            .collect();
        Ok(plan)
    }

    /// Sends the batch's dead letters and waits for their acknowledgement.
    async fn deliver_dead_letters(&self, letters: &[DeadLetter]) -> Result<(), Attempt> {
        if letters.is_empty() {
            return Ok(());
        }
        self.dlq.send_all(letters).await.map_err(Attempt::Kafka)
    }

    /// After the database commit: logs and counts the dead letters, moves the book to the new
    /// offsets and records the batch's figures.
    fn record_committed(&self, plan: &Plan<M::Aggregate>, size: usize) -> BatchOutcome {
        for letter in &plan.dead_letters {
            tracing::warn!(
                partition = letter.partition,
                offset = letter.offset,
                code = %letter.code,
                reason = %letter.message,
                "event dead-lettered"
            );
            metrics::record_dead_letter(&self.topic, letter.code);
        }
        for advance in &plan.write.offsets {
            self.book.set(advance.partition, Some(advance.next));
        }
        metrics::record_batch(&metrics::BatchFigures {
            topic: &self.topic,
            applied: plan.applied,
            duplicates: plan.duplicates,
            parked: plan.parked,
            unparked: plan.unparked,
            size,
        });
        BatchOutcome {
            applied: plan.applied,
            duplicates: plan.duplicates,
            parked: plan.parked,
            dead_lettered: plan.dead_letters.len() as u64,
            messages: size as u64,
            interrupted: false,
        }
    }

    fn after_commit<C: ConsumerContext + 'static>(
        &self,
        consumer: &StreamConsumer<C>,
        messages: &[Incoming],
        outcome: &BatchOutcome,
        started: Instant,
    ) {
        metrics::record_batch_time(&self.topic, started.elapsed());
        self.status.commits.send_modify(|n| *n += 1);
        if let Some(last) = messages.last() {
            tracing::debug!(
                messages = messages.len(),
                applied = outcome.applied,
                partition = last.partition,
                offset = last.offset,
                "batch committed"
            );
        }
        // Only for monitoring tools: the database is the source of truth.
        if self.mode == Mode::Live {
            let mut tpl = TopicPartitionList::new();
            let partitions: BTreeSet<i32> = messages.iter().map(|m| m.partition).collect();
            for p in partitions {
                if let Some(next) = self.book.stored(p) {
                    let _ = tpl.add_partition_offset(&self.topic, p, Offset::Offset(next));
                }
            }
            if let Err(e) = consumer.commit(&tpl, CommitMode::Async) {
                tracing::debug!(error = %e, "kafka offset commit failed (monitoring only)");
            }
        }
    }

    /// Re-reads the stored offsets of `partitions` and seeks every partition whose stored
    /// offset differs from the book. Returns the partitions that moved.
    pub(crate) async fn resync<C: ConsumerContext + 'static>(
        &self,
        consumer: &StreamConsumer<C>,
        partitions: impl IntoIterator<Item = i32>,
    ) -> Result<Vec<i32>, StoreError> {
        let stored = self.db.offsets(&self.tables, &self.topic).await?;
        let mut moved = Vec::new();
        for p in partitions {
            let db = stored.get(&p).copied();
            if db == self.book.stored(p) {
                continue;
            }
            moved.push(p);
            let offset = db.map_or(Offset::Beginning, Offset::Offset);
            // Timeout zero: librdkafka starts the seek and returns at once (this runs on an
            // async worker thread); messages fetched before it are discarded either way.
            match consumer.seek(&self.topic, p, offset, Duration::ZERO) {
                Ok(()) => {
                    tracing::info!(
                        partition = p,
                        ?db,
                        "stored offset moved: consumer seeked there"
                    );
                    self.book.set(p, db);
                }
                // The book keeps the old value, so the next batch of p conflicts again and
                // writes nothing until a seek succeeds.
                Err(e) => tracing::warn!(partition = p, error = %e, "seek failed; will retry"),
            }
        }
        Ok(moved)
    }

    /// The live loop: until shutdown, collect and process batches; while idle, pick up offsets
    /// moved by a rebuild. On shutdown the current batch is finished and committed.
    pub(crate) async fn run(
        &self,
        consumer: &StreamConsumer<ProjectionContext>,
        shutdown: Shutdown,
    ) -> Result<(), ProjectorError> {
        loop {
            match collect(consumer, Some(&self.status), IDLE_TICK, &shutdown).await {
                Collected::Shutdown => return Ok(()),
                Collected::Idle => {
                    let assigned = self.book.assignment().partitions;
                    if let Err(e) = self.resync(consumer, assigned).await {
                        tracing::warn!(error = %e, "could not re-read stored offsets");
                    }
                }
                Collected::Batch {
                    messages,
                    then_stop,
                } => {
                    let outcome = self.process(consumer, messages, &shutdown).await;
                    self.status.idle.store(true, Ordering::SeqCst);
                    let outcome = outcome?;
                    if then_stop || outcome.interrupted {
                        return Ok(());
                    }
                }
            }
        }
    }
}

enum Attempt {
    /// Stored offsets of these partitions moved: drop their messages and retry the rest.
    Moved(Vec<i32>),
    Store(StoreError),
    Kafka(KafkaError),
}

impl From<StoreError> for Attempt {
    fn from(e: StoreError) -> Self {
        Attempt::Store(e)
    }
}

impl From<sqlx::Error> for Attempt {
    fn from(e: sqlx::Error) -> Self {
        Attempt::Store(e.into())
    }
}

/// A member with no partition for this long leaves its group and joins again.
const REJOIN_AFTER: Duration = Duration::from_secs(30);

/// Leaves the group and subscribes again: a member that was left out (after a broker restart,
/// say) gets a fresh join instead of waiting forever.
fn rejoin<C: ConsumerContext + 'static>(consumer: &StreamConsumer<C>, topic: &str) {
    tracing::warn!(%topic, "no partition assigned for a long while: joining the group again");
    metrics::record_rejoin(topic);
    consumer.unsubscribe();
    if let Err(e) = consumer.subscribe(&[topic]) {
        tracing::error!(%topic, error = %e, "cannot subscribe again");
    }
}

/// Every 500 ms: the lag of each assigned partition (last stable offset minus the stored
/// offset, or the consumer's position when everything it has handed out is committed, which
/// also steps over transaction markers), the lag gauge, and readiness once all lags are zero.
///
/// `watermarks` is a separate client only for watermark queries: on the group consumer's own
/// connection a query waits behind the broker's long-poll fetch (up to `fetch.wait.max.ms` per
/// partition), which made readiness and shutdown take seconds.
///
/// A stored offset beyond its partition's end ([`ProjectorError::OffsetBeyondEnd`]) ends the
/// monitor with that error; the caller stops the service.
pub(crate) async fn monitor(
    consumer: Arc<StreamConsumer<ProjectionContext>>,
    watermarks: Arc<BaseConsumer>,
    topic: String,
    book: Arc<OffsetBook>,
    status: Arc<Status>,
    shutdown: Shutdown,
) -> Result<(), ProjectorError> {
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let mut committed: HashMap<i32, i64> = HashMap::new();
    let mut last_rejoin: Option<Instant> = None;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.wait() => return Ok(()),
        }
        metrics::record_lag_age(&topic, status.lag_age());
        let assignment = book.assignment();
        if !assignment.assigned_once {
            continue;
        }
        if assignment.partitions.is_empty() {
            // After a broker restart a member can stay out of its group: say so, and join again.
            status.not_measured("no partition of the events topic is assigned".into());
            status.set_lags(Vec::new());
            if status.stalled(REJOIN_AFTER).is_some()
                && last_rejoin.is_none_or(|at| at.elapsed() >= REJOIN_AFTER)
            {
                rejoin(&consumer, &topic);
                last_rejoin = Some(Instant::now());
            }
            continue;
        }
        let positions = settled_positions(&consumer, &status);
        // Read before the watermarks: a batch committed meanwhile can then not look like an
        // offset beyond the end.
        let stored_before: HashMap<i32, Option<i64>> = assignment
            .partitions
            .iter()
            .map(|p| (*p, book.stored(*p)))
            .collect();
        let marks = tokio::select! {
            marks = fetch_watermarks(watermarks.clone(), &topic, assignment.partitions) => marks,
            _ = shutdown.wait() => return Ok(()),
        };
        let Some(marks) = marks else { continue };
        let round = measure_lags(&topic, &book, &stored_before, positions.as_ref(), marks);
        if let Some(beyond) = round.beyond_end {
            return Err(beyond);
        }
        match &round.unmeasured {
            None => status.measured(),
            Some(problem) => status.not_measured(problem.clone()),
        }
        status.set_lags(round.lags);
        commit_positions(&consumer, &topic, &round.ahead_of_stored, &mut committed);
        if round.caught_up && !status.ready.swap(true, Ordering::SeqCst) {
            tracing::info!("projection caught up: ready");
        }
    }
}

/// The consumer's positions, if they can be trusted as "everything before is committed": the
/// loop was idle and received nothing while they were read.
fn settled_positions<C: ConsumerContext + 'static>(
    consumer: &StreamConsumer<C>,
    status: &Status,
) -> Option<TopicPartitionList> {
    let before = status.received.load(Ordering::SeqCst);
    let idle_before = status.idle.load(Ordering::SeqCst);
    let positions = consumer.position().ok();
    let settled = idle_before
        && status.idle.load(Ordering::SeqCst)
        && before == status.received.load(Ordering::SeqCst);
    positions.filter(|_| settled)
}

/// One partition's watermarks, or why they could not be read.
struct PartitionMarks {
    partition: i32,
    marks: Result<Watermarks, KafkaError>,
}

/// A partition's low and high watermarks.
#[derive(Debug, Clone, Copy)]
struct Watermarks {
    low: i64,
    high: i64,
}

/// The watermarks of `partitions` (off the async threads: the queries block). `None` if the
/// query task failed.
async fn fetch_watermarks(
    client: Arc<BaseConsumer>,
    topic: &str,
    partitions: Vec<i32>,
) -> Option<Vec<PartitionMarks>> {
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || {
        partitions
            .into_iter()
            .map(|partition| PartitionMarks {
                partition,
                marks: client
                    .fetch_watermarks(&topic, partition, Duration::from_secs(5))
                    .map(|(low, high)| Watermarks { low, high }),
            })
            .collect()
    })
    .await
    .ok()
}

/// What one monitor round measured.
struct LagRound {
    lags: Vec<PartitionLag>,
    /// Partitions whose consumer position is past the stored offset (transaction markers):
    /// the position to commit to Kafka for monitoring.
    ahead_of_stored: Vec<PartitionOffset>,
    caught_up: bool,
    /// A partition whose stored offset is past its end.
    beyond_end: Option<ProjectorError>,
    /// Why some partition's lag could not be measured.
    unmeasured: Option<String>,
}

/// The lag of each partition from its watermarks, the stored offset and the settled position;
/// `stored_before` (the stored offsets read before the watermarks) tells an offset beyond the
/// end.
fn measure_lags(
    topic: &str,
    book: &OffsetBook,
    stored_before: &HashMap<i32, Option<i64>>,
    positions: Option<&TopicPartitionList>,
    marks: Vec<PartitionMarks>,
) -> LagRound {
    let mut round = LagRound {
        lags: Vec::with_capacity(marks.len()),
        ahead_of_stored: Vec::new(),
        caught_up: true,
        beyond_end: None,
        unmeasured: None,
    };
    for PartitionMarks { partition, marks } in marks {
        let Watermarks { low, high } = match marks {
            Ok(marks) => marks,
            Err(e) => {
                round.caught_up = false;
                round.unmeasured = Some(format!(
                    "the end of partition {partition} cannot be read: {e}"
                ));
                continue;
            }
        };
        let before = stored_before.get(&partition).copied().flatten();
        if let Some(stored) = before.filter(|s| *s > high) {
            round.caught_up = false;
            round.beyond_end = Some(ProjectorError::OffsetBeyondEnd {
                topic: topic.to_owned(),
                partition,
                stored,
                end: high,
            });
            continue;
        }
        let stored = book.stored(partition);
        let position = positions
            .and_then(|tpl| tpl.find_partition(topic, partition))
            .and_then(|e| e.offset().to_raw())
            .filter(|o| *o >= 0);
        let effective = match (stored, position) {
            (Some(stored), Some(position)) => stored.max(position),
            (Some(stored), None) => stored,
            (None, Some(position)) => low.max(position),
            (None, None) => low,
        };
        let lag = (high - effective).max(0);
        metrics::record_lag(topic, partition, lag);
        round.lags.push(PartitionLag {
            partition,
            position: effective.max(low),
            end: high,
            lag,
        });
        if lag > 0 {
            round.caught_up = false;
        }
        if position.is_some() && stored.is_none_or(|s| effective > s) {
            round.ahead_of_stored.push(PartitionOffset {
                partition,
                next: effective,
            });
        }
    }
    round
}

/// Commits positions to Kafka (monitoring only), each only once.
fn commit_positions<C: ConsumerContext + 'static>(
    consumer: &StreamConsumer<C>,
    topic: &str,
    ahead_of_stored: &[PartitionOffset],
    committed: &mut HashMap<i32, i64>,
) {
    let mut tpl = TopicPartitionList::new();
    for PartitionOffset { partition, next } in ahead_of_stored {
        if committed.get(partition) != Some(next) {
            let _ = tpl.add_partition_offset(topic, *partition, Offset::Offset(*next));
            committed.insert(*partition, *next);
        }
    }
    if tpl.count() > 0 {
        let _ = consumer.commit(&tpl, CommitMode::Async);
    }
}
