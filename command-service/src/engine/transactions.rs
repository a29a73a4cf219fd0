//! The transaction around many commands: begin, produce, commit with the consumed offsets;
//! on failure abort and rewind, or stop when the outcome cannot be learned or the producer is
//! fenced (redoing then could append a command's events twice, or fence the live instance).

use shared::aggregate::Aggregate;
use std::collections::HashMap;
use std::time::{Duration, Instant};

use chrono::Utc;
use rdkafka::consumer::Consumer;
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use shared::envelope::Snapshot;
use shared::kafka::canonical_partition;
use shared::trace::TRACEPARENT;

use super::{
    DeliveryToken, Engine, EngineConsumer, MAX_COMMANDS_PER_TXN, TXN_MAX_AGE, TXN_TIMEOUT,
    TxnError, UNTRACKED,
};

/// How long a consumer takes at most to learn it was replaced (three heartbeats).
const REPLACEMENT_NOTICE: Duration = Duration::from_secs(3);
use crate::metrics as m;

/// One record to produce in the open transaction.
pub(super) struct Record<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub key: &'a [u8],
    pub payload: &'a [u8],
    pub headers: Option<OwnedHeaders>,
    /// The record's timestamp (events carry their envelope's); `None`: the producer's clock.
    pub timestamp_ms: Option<i64>,
}

/// What became of a transaction whose commit or abort did not complete, learned from the
/// group's committed offsets once a new producer finished it.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Its offsets are the group's: it committed; keep its changes.
    Committed,
    /// The group is still where the transaction started: it aborted; redo its commands.
    Aborted,
    /// The offsets could not be read (or are beyond the transaction's): neither redoing nor
    /// keeping is safe.
    Unknown(String),
}

/// Reads a committed-offsets lookup against the transaction's offsets (`next` per partition of
/// `topic`). A transaction that carried no offsets (only checkpoints) counts as aborted: redoing
/// it rewrites compacted records, which is harmless.
pub(crate) fn outcome_of(
    topic: &str,
    next: &HashMap<i32, i64>,
    lookup: KafkaResult<TopicPartitionList>,
) -> Outcome {
    if next.is_empty() {
        return Outcome::Aborted;
    }
    let committed = match lookup {
        Ok(committed) => committed,
        Err(e) => return Outcome::Unknown(format!("cannot read the committed offsets: {e}")),
    };
    let mut all_ours = true;
    for (p, next) in next {
        let entry = committed.find_partition(topic, *p);
        let offset = match entry.as_ref().map(|e| (e.error(), e.offset())) {
            Some((Ok(()), Offset::Offset(o))) => Some(o),
            Some((Ok(()), Offset::Invalid)) => None,
            other => return Outcome::Unknown(format!("partition {p}: {other:?}")),
        };
        match offset {
            Some(o) if o == *next => {}
            Some(o) if o > *next => {
                return Outcome::Unknown(format!(
                    "partition {p} was committed to {o}, beyond this transaction's {next}"
                ));
            }
            _ => all_ours = false,
        }
    }
    if all_ours {
        Outcome::Committed
    } else {
        Outcome::Aborted
    }
}

/// Runs a phase of a commit, observing its duration (and logging a slow one: the commit
/// latency is every command's latency).
fn timed<T>(phase: &'static str, run: impl FnOnce() -> T) -> T {
    let started = Instant::now();
    let outcome = run();
    let elapsed = started.elapsed();
    m::commit_phase(phase, elapsed);
    if elapsed >= Duration::from_millis(100) {
        tracing::warn!(
            phase,
            elapsed_ms = elapsed.as_millis() as u64,
            "slow commit phase"
        );
    }
    outcome
}

impl<A: Aggregate> Engine<A> {
    /// Begins a transaction and writes the checkpoints that are due into it; false (and the
    /// error handled) when that failed.
    pub(super) fn begin(&mut self, consumer: &EngineConsumer<A>) -> bool {
        if let Err(e) = self.producer.begin_transaction() {
            self.on_txn_error(consumer, e.into());
            return false;
        }
        self.txn = Some(super::Txn::new());
        if let Err(e) = timed("checkpoints", || self.write_checkpoints()) {
            self.on_txn_error(consumer, e);
            return false;
        }
        true
    }

    /// Group commit: the open transaction commits as soon as no further command is waiting
    /// (`drained`), so an idle service answers at once and a busy one builds larger
    /// transactions while the previous commit runs; and at the latest after
    /// [`MAX_COMMANDS_PER_TXN`] commands (fewer for a while after an expiry,
    /// [`super::TxnShrink`]) or `COMMIT_INTERVAL_MS`.
    pub(super) fn commit_due(&self, drained: bool) -> bool {
        self.txn.as_ref().is_some_and(|t| {
            drained
                || t.commands >= self.shrink.limit(MAX_COMMANDS_PER_TXN)
                || t.started.elapsed() >= self.settings.commit_interval
        })
    }

    /// Commits the open transaction with its offsets; on failure aborts and rewinds.
    pub(super) fn commit(&mut self, consumer: &EngineConsumer<A>) {
        let Some(txn) = self.txn.as_ref() else { return };
        let commands = self.topics.commands();
        let offsets = match self.fence_offsets(consumer, txn) {
            Ok(offsets) => offsets,
            Err(e) => return self.on_txn_error(consumer, e),
        };
        let mut tpl = TopicPartitionList::new();
        for (p, next) in offsets {
            if let Err(e) = tpl.add_partition_offset(&commands, p, Offset::Offset(next)) {
                tracing::error!(error = %e, "bad offset");
            }
        }
        // The offsets go first (right after the records are produced: librdkafka can block past
        // its time-out in send_offsets_to_transaction while the group coordinator is down,
        // confluentinc/librdkafka#5456). Then every record must be written while the
        // transaction is young: an instance stopped past its session before that may have lost
        // its partitions to an owner that restored without its late records (the restore
        // waits for transactions open below the end, not for records not yet written).
        let started = txn.started;
        let result = match consumer.group_metadata() {
            Some(cgm) => timed("snapshots", || self.write_snapshots()).and_then(|()| {
                timed("offsets", || {
                    self.producer
                        .send_offsets_to_transaction(&tpl, &cgm, TXN_TIMEOUT)
                })?;
                if !timed("deliveries", || self.await_deliveries(TXN_TIMEOUT)) {
                    return Err(TxnError::Undelivered);
                }
                let age = started.elapsed();
                if age > TXN_MAX_AGE {
                    return Err(TxnError::Expired(age));
                }
                Ok(timed("commit", || self.commit_with_retries())?)
            }),
            None => Err(TxnError::NoGeneration),
        };
        match result {
            Ok(()) => self.committed(),
            Err(e) => self.on_txn_error(consumer, e),
        }
    }

    /// The offsets the transaction commits: its commands' progress, plus, for every partition
    /// it checkpoints without a command of its own, the partition's committed offset again.
    /// The offsets are what fences a transaction (KIP-447: the group coordinator refuses a
    /// `TxnOffsetCommit` from an older generation), and librdkafka sends none for an empty
    /// list: without them a writer that was frozen and replaced could commit a checkpoint of
    /// its stale state over its replacement's events.
    /// A checkpoint that cannot be fenced is not committed: `Err` names its partition.
    fn fence_offsets(
        &self,
        consumer: &EngineConsumer<A>,
        txn: &super::Txn<A>,
    ) -> Result<Vec<(i32, i64)>, TxnError> {
        let mut offsets: Vec<(i32, i64)> = txn.next_offsets.iter().map(|(p, o)| (*p, *o)).collect();
        for taken in &txn.checkpoints {
            if !txn.next_offsets.contains_key(&taken.partition) {
                let offset = self
                    .resume_offset(consumer, taken.partition)
                    .ok_or(TxnError::Unfenced(taken.partition))?;
                offsets.push((taken.partition, offset));
            }
        }
        Ok(offsets)
    }

    /// Where the partition's commands resume: its committed offset, else (nothing committed
    /// yet) the commands partition's first offset.
    fn resume_offset(&self, consumer: &EngineConsumer<A>, partition: i32) -> Option<i64> {
        if let Some(Offset::Offset(o)) = self.committed_next.get(&partition) {
            return Some(*o);
        }
        let commands = self.topics.commands();
        consumer
            .fetch_watermarks(&commands, partition, Duration::from_secs(5))
            .ok()
            .map(|(low, _)| low)
    }

    /// `commit_transaction`, called again while it fails with a retriable error (a timeout):
    /// librdkafka resumes the commit where it was.
    fn commit_with_retries(&self) -> KafkaResult<()> {
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
        self.aborts_in_a_row = 0;
        self.shrink = self.shrink.committed();
        self.last_commit = Instant::now();
        *super::lock(&self.status.failing) = None;
        let n = self.settings.partitions;
        let now_ms = self.broker_now_ms();
        if !txn.checkpoints.is_empty() {
            let snapshots = txn.checkpoints.iter().map(|c| c.ids.len()).sum();
            let completed = txn.checkpoints.iter().filter(|c| c.completes).count();
            m::checkpoints(completed, snapshots);
            for taken in txn.checkpoints.iter().filter(|c| c.completes) {
                if let Some(state) = self.partitions.get_mut(&taken.partition) {
                    state.round = None;
                    state.last_checkpoint = Instant::now();
                }
            }
        }
        let tracker = self.producer.context();
        let (results, positions) = txn.overlay.merge_into(
            &mut self.partitions,
            |id| canonical_partition(id.as_bytes(), n),
            |token| tracker.take(DeliveryToken(token)).flatten(),
            now_ms,
        );
        tracker.clear();
        if let Err(e) = self.dedupe.record(results, &positions) {
            // Committed, but not remembered: a retry could be decided afresh. The restart's
            // restore reads these results from the topic again.
            self.fail(format!(
                "{e}; stopping rather than decide a retried command afresh"
            ));
        }
        let window_ms = i64::try_from(self.settings.dedupe_window.as_millis()).unwrap_or(i64::MAX);
        if let Err(e) = self.dedupe.expire(now_ms.saturating_sub(window_ms)) {
            tracing::warn!(error = %e, "cannot expire old dedupe entries (tried again later)");
        }
        for (p, next) in txn.next_offsets {
            self.committed_next.insert(p, Offset::Offset(next));
        }
        m::transaction("committed");
        for processed in txn.outcomes {
            m::command(processed.outcome, processed.received.elapsed());
        }
        self.update_memory_gauges();
    }

    /// Drops the open transaction (aborted, or lost to a fatal error): its overlay goes, and
    /// the aggregates its checkpoint pieces snapshotted go back to their round.
    pub(super) fn drop_txn(&mut self) {
        self.producer.context().clear();
        let Some(txn) = self.txn.take() else { return };
        for taken in txn.checkpoints {
            if let Some(state) = self.partitions.get_mut(&taken.partition) {
                match &mut state.round {
                    Some(round) => round.remaining.extend(taken.ids),
                    None => state.dirty.extend(taken.ids),
                }
            }
        }
    }

    /// After an indefinite failure and a new producer (whose `init_transactions` finished the
    /// old transaction one way or the other): what became of it. The lookup is retried for a
    /// while before the outcome is called unknown.
    fn txn_outcome(&self, consumer: &EngineConsumer<A>) -> Outcome {
        let Some(txn) = self.txn.as_ref() else {
            return Outcome::Aborted;
        };
        let commands = self.topics.commands();
        let mut tpl = TopicPartitionList::new();
        for p in txn.next_offsets.keys() {
            tpl.add_partition(&commands, *p);
        }
        let mut attempt = 1;
        let since = Instant::now();
        loop {
            let lookup = consumer.committed_offsets(tpl.clone(), Duration::from_secs(5));
            match outcome_of(&commands, &txn.next_offsets, lookup) {
                Outcome::Unknown(why)
                    if !self.shutdown.is_triggered()
                        && (attempt < 5
                            || (since.elapsed() < super::OUTAGE_PATIENCE
                                && self.brokers_unreachable(consumer))) =>
                {
                    tracing::warn!(attempt, %why, "the outcome of the timed-out transaction is not known yet; asking again");
                    attempt += 1;
                    std::thread::sleep(Duration::from_secs(1));
                }
                outcome => return outcome,
            }
        }
    }

    /// Whether the brokers answer nothing (an outage, waited out) rather than refuse the one
    /// lookup (which, answered otherwise, is no outage).
    fn brokers_unreachable(&self, consumer: &EngineConsumer<A>) -> bool {
        let commands = self.topics.commands();
        let partition = self.partitions.keys().next().copied().unwrap_or(0);
        consumer
            .fetch_watermarks(&commands, partition, Duration::from_secs(5))
            .is_err()
    }

    /// The reason to stop when the producer can no longer be used by this instance: fenced by
    /// another producer with the same `transactional.id` (`INSTANCE_ID`), or otherwise in a
    /// fatal state. Re-creating it would fence the live instance in turn.
    fn producer_unusable(&self, error: &TxnError) -> Option<String> {
        let fenced = matches!(
            error,
            TxnError::Kafka(e) if matches!(
                e.rdkafka_error_code(),
                Some(RDKafkaErrorCode::ProducerFenced | RDKafkaErrorCode::InvalidProducerEpoch | RDKafkaErrorCode::Fenced)
            )
        ) || matches!(error, TxnError::Kafka(KafkaError::Transaction(e)) if e.is_fatal());
        let fatal = self.producer.client().fatal_error();
        if !fenced && fatal.is_none() {
            return None;
        }
        let detail = fatal.map_or_else(
            || error.to_string(),
            |(code, reason)| format!("{code:?}: {reason}"),
        );
        Some(format!(
            "the transactional producer was fenced or failed fatally ({detail})"
        ))
    }

    /// Whether this instance was replaced while its transaction hung (e.g. it was stopped past
    /// its session time-out and a twin took its INSTANCE_ID): then the lease of the id names the
    /// twin's process (a twin commits it before it serves anything), or the consumer learns it
    /// from its next heartbeats. Re-creating the producer then would fence the live replacement.
    fn replaced(&self, consumer: &EngineConsumer<A>) -> Option<String> {
        if let Some(reason) = self.twin_lease() {
            return Some(reason);
        }
        let deadline = Instant::now() + REPLACEMENT_NOTICE;
        loop {
            if let Some((code, reason)) = consumer.client().fatal_error() {
                return Some(format!(
                    "replaced while a transaction was pending ({code:?}: {reason})"
                ));
            }
            if Instant::now() >= deadline {
                // Read the lease again: this instance may have been stopped during the wait
                // while a twin started (its lease is committed before it serves anything), and
                // a new producer now would fence that twin.
                return self.twin_lease();
            }
            // Heartbeats run on librdkafka's threads; polling here could re-enter the engine.
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Why to stop if the lease of this INSTANCE_ID names another process (or cannot be read).
    fn twin_lease(&self) -> Option<String> {
        match super::twin_holder_patiently(&self.settings, &self.process, &self.shutdown) {
            Ok(Some(twin)) => {
                super::mark_contested(&self.settings, &self.process, &twin);
                Some(format!(
                    "replaced while a transaction was pending: process {} holds INSTANCE_ID={} now",
                    twin.process, self.settings.instance_id
                ))
            }
            Ok(None) => None,
            Err(e) => Some(format!(
                "a transaction timed out, and the lease of INSTANCE_ID={} cannot be read to tell \
                 whether another instance took it ({e})",
                self.settings.instance_id
            )),
        }
    }

    /// The producer (or the consumer) was fenced: the open transaction is lost, and the loop
    /// finds out whether another instance holds this INSTANCE_ID ([`super::run_engine`]).
    fn fenced(&mut self, reason: String) {
        self.drop_txn();
        self.fenced.get_or_insert(reason);
    }

    /// Abortable errors abort and rewind; a timed-out (indefinite) commit or abort re-creates
    /// the producer, whose `init_transactions` fences and finishes what the old one left open,
    /// and the committed offsets then say whether it committed; a fenced producer, or an
    /// outcome that cannot be learned, stops the engine.
    pub(super) fn on_txn_error(&mut self, consumer: &EngineConsumer<A>, error: TxnError) {
        {
            let mut failing = super::lock(&self.status.failing);
            let since = failing.as_ref().map_or(self.last_commit, |f| f.since);
            *failing = Some(super::Failing {
                since,
                reason: error.to_string(),
            });
        }
        if let Some(reason) = self.producer_unusable(&error) {
            self.fenced(reason);
            return;
        }
        if matches!(error, TxnError::Expired(_)) {
            self.shrink = self.shrink.expired();
        }
        let indefinite =
            matches!(&error, TxnError::Kafka(KafkaError::Transaction(e)) if e.is_retriable());
        tracing::warn!(error = %error, indefinite, "transaction failed; aborting and rewinding");
        let aborted = if indefinite {
            Err(error)
        } else {
            self.producer
                .abort_transaction(TXN_TIMEOUT)
                .map_err(TxnError::from)
        };
        if let Err(error) = aborted {
            if let Some(reason) = self.producer_unusable(&error) {
                self.fenced(reason);
                return;
            }
            if let Some(reason) = self.replaced(consumer) {
                self.fenced(reason);
                return;
            }
            if let Err(reason) = self.renew_producer() {
                self.drop_txn();
                self.fail(reason);
                return;
            }
            match self.txn_outcome(consumer) {
                Outcome::Committed => {
                    tracing::warn!("the timed-out transaction did commit; keeping its changes");
                    self.committed();
                    return;
                }
                Outcome::Aborted => {}
                Outcome::Unknown(why) => {
                    self.drop_txn();
                    self.fail(format!(
                        "the outcome of a timed-out transaction cannot be learned ({why}); \
                         stopping rather than risk appending its commands' events twice"
                    ));
                    return;
                }
            }
        }
        m::transaction("aborted");
        self.drop_txn();
        self.rewind(consumer);
    }

    /// Seeks every owned partition back to its committed offset, after a pause that grows with
    /// consecutive aborts (whatever failed, the registry or a broker, gets a moment). A failed
    /// seek stops the engine: going on would commit offsets past commands never processed.
    fn rewind(&mut self, consumer: &EngineConsumer<A>) {
        self.aborts_in_a_row = self.aborts_in_a_row.saturating_add(1);
        let exponent = self.aborts_in_a_row.min(6) - 1;
        std::thread::sleep(Duration::from_millis(200 << exponent));
        let positions = self.partitions.keys().map(|p| {
            let offset = match self.committed_next.get(p) {
                Some(Offset::Offset(o)) => Offset::Offset(*o),
                _ => Offset::Beginning,
            };
            (*p, offset)
        });
        if let Err(reason) = seek_back(consumer, &self.topics.commands(), positions) {
            self.fail(reason);
        }
    }

    /// Writes the transaction's due snapshots, each with the offset of the event it covers
    /// (delivered by now, or soon: waiting here is on our own delivery reports, not a flush).
    fn write_snapshots(&mut self) -> Result<(), TxnError> {
        let Some(snapshots) = self.txn.as_mut().map(|t| std::mem::take(&mut t.snapshots)) else {
            return Ok(());
        };
        let topic = self.topics.snapshots();
        for due in snapshots {
            let event_offset = self
                .delivery_of(due.token, TXN_TIMEOUT)
                .ok_or(TxnError::SnapshotEventUndelivered)?;
            let snapshot = Snapshot {
                aggregate_id: due.aggregate_id,
                version: due.held.version,
                event_offset,
                state: due.held.state,
                taken_at: Utc::now(),
            };
            let payload = serde_json::to_vec(&snapshot).unwrap_or_default();
            let record = Record {
                topic: &topic,
                partition: due.partition,
                key: snapshot.aggregate_id.as_bytes(),
                payload: &payload,
                headers: None,
                timestamp_ms: None,
            };
            self.send(record, None)?;
            tracing::debug!(aggregate_id = %snapshot.aggregate_id, version = snapshot.version, event_offset, "snapshot written");
        }
        Ok(())
    }

    /// Serves delivery reports until every produced message is delivered (or `timeout`):
    /// rdkafka's flush inside `commit_transaction` waits for them in steps of 100 ms, which
    /// would be every commit's latency. Whether every one was delivered.
    fn await_deliveries(&self, timeout: Duration) -> bool {
        super::serve_deliveries(&self.producer, timeout)
    }

    /// Waits for the delivery of the event sent with `token` (serving delivery reports
    /// meanwhile); its offset, or `None` when it failed or did not come within `timeout`.
    fn delivery_of(&self, token: DeliveryToken, timeout: Duration) -> Option<i64> {
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
    pub(super) fn traced(&self, headers: OwnedHeaders) -> OwnedHeaders {
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

    /// Produces `record` in the open transaction; `token` asks for its delivery offset.
    pub(super) fn send(&self, record: Record<'_>, token: Option<DeliveryToken>) -> KafkaResult<()> {
        let opaque = token.map_or(UNTRACKED, |t| t.0);
        let mut base = BaseRecord::with_opaque_to(record.topic, opaque)
            .partition(record.partition)
            .key(record.key)
            .payload(record.payload);
        if let Some(h) = record.headers {
            base = base.headers(h);
        }
        if let Some(ms) = record.timestamp_ms {
            base = base.timestamp(ms);
        }
        loop {
            match self.producer.send(base) {
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    base = back;
                    // Serving delivery reports makes room in the queue.
                    self.producer.poll(Duration::from_millis(5));
                }
                Err((e, _)) => return Err(e),
            }
        }
    }
}

/// How many times a seek is asked before the rewind gives up.
const SEEK_ATTEMPTS: u32 = 5;

/// Seeks `topic`'s partitions to the given offsets; the first that keeps failing, named, as
/// `Err`.
pub(crate) fn seek_back<C: Consumer<X>, X: rdkafka::consumer::ConsumerContext>(
    consumer: &C,
    topic: &str,
    positions: impl IntoIterator<Item = (i32, Offset)>,
) -> Result<(), String> {
    for (p, offset) in positions {
        // librdkafka refuses a seek for a moment while the partition's position is being
        // looked up (after a rewind to the beginning, say): asked again, it takes it.
        let mut attempt = 1;
        while let Err(e) = consumer.seek(topic, p, offset, Duration::from_secs(10)) {
            if attempt == SEEK_ATTEMPTS {
                return Err(format!(
                    "cannot seek partition {p} of {topic} back to {offset:?}: {e}"
                ));
            }
            attempt += 1;
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::consumer::BaseConsumer;

    #[test]
    fn a_seek_that_fails_is_an_error_naming_the_partition() {
        // A partition this consumer does not hold: librdkafka refuses the seek, as it does one
        // while the partition's position is being looked up.
        let consumer: BaseConsumer = shared::testing::test_settings(1)
            .kafka
            .client_config()
            .set("group.id", shared::testing::unique_name("seek"))
            .create()
            .expect("consumer");
        let topic = shared::testing::unique_name("seek");
        let failed = seek_back(&consumer, &topic, [(3, Offset::Offset(7))]);
        let reason = failed.expect_err("the seek fails");
        assert!(
            reason.contains("partition 3") && reason.contains(&topic),
            "{reason}"
        );
        assert_eq!(seek_back(&consumer, &topic, []), Ok(()));
    }

    fn lookup(entries: &[(i32, Offset)]) -> KafkaResult<TopicPartitionList> {
        let mut tpl = TopicPartitionList::new();
        for (p, o) in entries {
            tpl.add_partition_offset("c", *p, *o).unwrap();
        }
        Ok(tpl)
    }

    #[test]
    fn an_unreadable_outcome_is_unknown_never_aborted() {
        let next = HashMap::from([(0, 10), (1, 5)]);
        let failed = Err(KafkaError::OffsetFetch(RDKafkaErrorCode::RequestTimedOut));
        assert!(matches!(
            outcome_of("c", &next, failed),
            Outcome::Unknown(_)
        ));
        assert_eq!(
            outcome_of(
                "c",
                &next,
                lookup(&[(0, Offset::Offset(10)), (1, Offset::Offset(5))])
            ),
            Outcome::Committed
        );
        assert_eq!(
            outcome_of(
                "c",
                &next,
                lookup(&[(0, Offset::Offset(7)), (1, Offset::Offset(5))])
            ),
            Outcome::Aborted
        );
        assert_eq!(
            outcome_of(
                "c",
                &next,
                lookup(&[(0, Offset::Invalid), (1, Offset::Invalid)])
            ),
            Outcome::Aborted,
            "no offsets committed at all: the first transaction aborted"
        );
        assert!(matches!(
            outcome_of(
                "c",
                &next,
                lookup(&[(0, Offset::Offset(12)), (1, Offset::Offset(5))])
            ),
            Outcome::Unknown(_)
        ));
        assert!(
            matches!(
                outcome_of("c", &next, lookup(&[(0, Offset::Offset(10))])),
                Outcome::Unknown(_)
            ),
            "a partition missing from the answer"
        );
        assert_eq!(
            outcome_of("c", &HashMap::new(), Err(KafkaError::Canceled)),
            Outcome::Aborted,
            "a checkpoint-only transaction is redone harmlessly"
        );
    }
}

#[cfg(test)]
mod shrink_tests {
    use super::super::TxnShrink;

    #[test]
    fn a_redo_after_an_expiry_is_smaller_and_commits_grow_it_back() {
        let full = TxnShrink::default();
        assert_eq!(full.limit(1000), 1000);
        let after = full.expired();
        assert_eq!(after.limit(1000), 250, "a quarter of what expired");
        assert_eq!(after.expired().limit(1000), 62);
        assert_eq!(after.committed().limit(1000), 500);
        assert_eq!(after.committed().committed().limit(1000), 1000);
        assert_eq!(after.committed().committed().committed(), full);
        let floor = (0..20).fold(full, |s, _| s.expired());
        assert_eq!(floor.limit(1000), 1, "never nothing");
        assert_eq!(floor.limit(10_000), 1);
    }
}
