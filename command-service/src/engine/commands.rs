//! One command inside the open transaction: route it to its canonical partition, answer a
//! duplicate with its original result, let the aggregate decide, produce its events (and a
//! snapshot when one is due) and its result.

use std::time::{Duration, Instant};

use chrono::Utc;
use rdkafka::consumer::Consumer;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Message, OwnedHeaders};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::Value;
use shared::aggregate::{self, Aggregate, Context, Outgoing};
use shared::envelope::{MalformedCommand, Metadata};
use shared::kafka::canonical_partition;
use shared::trace::{METADATA_TRACE_ID, TraceContext};
use shared::{CommandMessage, CommandResult, EventEnvelope, Rejection, RejectionCode};
use uuid::Uuid;

use super::{DeliveryToken, DueSnapshot, Engine, EngineConsumer, Processed, TxnError};
use crate::dedupe::ResultRef;
use crate::state::{Decided, Held, event_time, snapshot_due};

/// Why a command's events could not be produced.
enum AppendError {
    /// Redoing the transaction cannot help (the record is larger than Kafka takes): the
    /// command is rejected with this reason.
    Unwritable(String),
    /// Abort and redo.
    Txn(TxnError),
}

impl<E: Into<TxnError>> From<E> for AppendError {
    fn from(e: E) -> Self {
        AppendError::Txn(e.into())
    }
}

/// A decided command: its result and the outcome label of the metrics.
struct Decision {
    result: CommandResult,
    outcome: &'static str,
}

impl Decision {
    fn rejected(command_id: Uuid, aggregate_id: &str, rejection: Rejection) -> Self {
        Decision {
            outcome: rejection.code.static_name(),
            result: CommandResult::rejected(command_id, aggregate_id, rejection),
        }
    }
}

impl<A: Aggregate> Engine<A> {
    pub(super) fn on_message(&mut self, consumer: &EngineConsumer<A>, msg: &BorrowedMessage<'_>) {
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
                    txn.outcomes.push(Processed { outcome, received });
                }
            }
            Err(e) => self.on_txn_error(consumer, e),
        }
    }

    /// Handles one command inside the open transaction; returns its outcome label.
    fn process(&mut self, msg: &BorrowedMessage<'_>) -> Result<&'static str, TxnError> {
        let partition = msg.partition();
        let parsed = CommandMessage::<A::Command>::parse(msg.payload().unwrap_or_default());
        if let Some(canonical) = self.misrouted(msg, &parsed) {
            self.forward(msg, canonical)?;
            return Ok("forwarded");
        }
        let command = match parsed {
            Ok(command) => command,
            Err(malformed) => return self.malformed(partition, malformed),
        };
        if let Some(previous) =
            self.result_of(partition, command.command_id, &command.aggregate_id)?
        {
            tracing::info!(command_id = %command.command_id, "duplicate command: original result sent again");
            self.send_result(partition, &previous, None)?;
            return Ok("duplicate");
        }
        let decision = self.decide(partition, &command)?;
        self.answer(partition, decision.result)?;
        Ok(decision.outcome)
    }

    /// The canonical partition of a command that arrived on another one (its aggregate id, or
    /// for an unreadable command its key, decides).
    fn misrouted(
        &self,
        msg: &BorrowedMessage<'_>,
        parsed: &Result<CommandMessage<A::Command>, MalformedCommand>,
    ) -> Option<i32> {
        let routing_key: &[u8] = match parsed {
            Ok(c) => c.aggregate_id.as_bytes(),
            Err(m) => m
                .aggregate_id
                .as_ref()
                .map(|a| a.as_bytes())
                .or(msg.key())?,
        };
        let canonical = canonical_partition(routing_key, self.settings.partitions);
        (canonical != msg.partition()).then_some(canonical)
    }

    /// What the aggregate makes of the command; its events are produced when accepted.
    fn decide(
        &mut self,
        partition: i32,
        command: &CommandMessage<A::Command>,
    ) -> Result<Decision, TxnError> {
        let (id, aggregate_id) = (command.command_id, command.aggregate_id.as_str());
        let Held {
            version: before,
            state,
        } = self.held(partition, aggregate_id);
        let at = event_time(Utc::now(), self.clock_floor(partition));
        let ctx = Context {
            aggregate_id,
            version: before,
            now: at,
            metadata: &command.metadata,
        };
        if let Some(rejection) = self.unavailable(partition, aggregate_id) {
            // A workflow's step refused here is compensated like any refusal (a transfer's
            // credit refunds its source): nothing sends a step again.
            let steps = state.react(&command.command, Err(&rejection), &ctx);
            self.send_steps(&steps, &command.metadata)?;
            return Ok(Decision::rejected(id, aggregate_id, rejection));
        }
        let (events, state) =
            match aggregate::execute(state, command.expected_version, &command.command, &ctx) {
                Ok(decided) => decided,
                Err(rejection) => {
                    let unchanged = self.held(partition, aggregate_id).state;
                    let steps = unchanged.react(&command.command, Err(&rejection), &ctx);
                    self.send_steps(&steps, &command.metadata)?;
                    return Ok(Decision::rejected(id, aggregate_id, rejection));
                }
            };
        let steps = state.react(&command.command, Ok(&events), &ctx);
        match self.append(partition, command, before, at, state, &events) {
            Ok(envelopes) => {
                self.send_steps(&steps, &command.metadata)?;
                Ok(Decision {
                    result: CommandResult::accepted(id, aggregate_id, &envelopes),
                    outcome: "accepted",
                })
            }
            Err(AppendError::Unwritable(reason)) => {
                tracing::warn!(command_id = %id, %reason, "command's event cannot be written");
                let rejection = Rejection::new(RejectionCode::Malformed, reason);
                Ok(Decision::rejected(id, aggregate_id, rejection))
            }
            Err(AppendError::Txn(e)) => Err(e),
        }
    }

    /// The rejection for a command on a quarantined aggregate (one whose stored events cannot
    /// be read), if it is one.
    fn unavailable(&self, partition: i32, aggregate_id: &str) -> Option<Rejection> {
        let quarantined = self
            .partitions
            .get(&partition)?
            .quarantined
            .get(aggregate_id)?;
        Some(Rejection::new(
            RejectionCode::AggregateUnavailable,
            format!(
                "{aggregate_id} cannot be served: its event at {} partition {partition} offset {} \
                 is unreadable ({}); repair the record and restart the command-service",
                self.topics.events(),
                quarantined.offset,
                quarantined.reason
            ),
        ))
    }

    fn malformed(
        &mut self,
        partition: i32,
        malformed: MalformedCommand,
    ) -> Result<&'static str, TxnError> {
        let Some(command_id) = malformed.command_id else {
            tracing::warn!(partition, reason = %malformed.reason, "unreadable command without a command_id; skipped");
            return Ok("unreadable");
        };
        let aggregate_id = malformed.aggregate_id.clone().unwrap_or_default();
        if let Some(previous) = self.result_of(partition, command_id, &aggregate_id)? {
            self.send_result(partition, &previous, None)?;
            return Ok("duplicate");
        }
        tracing::warn!(partition, %command_id, reason = %malformed.reason, "malformed command");
        let rejection = Rejection::new(RejectionCode::Malformed, malformed.reason);
        let decision = Decision::rejected(command_id, &aggregate_id, rejection);
        self.answer(partition, decision.result)?;
        Ok(decision.outcome)
    }

    /// Produces the events of an accepted command (versions from `before + 1`, stamped `at`, a
    /// snapshot when one is due) and records the new state in the overlay.
    fn append(
        &mut self,
        partition: i32,
        command: &CommandMessage<A::Command>,
        before: u64,
        at: chrono::DateTime<Utc>,
        state: A,
        events: &[A::Event],
    ) -> Result<Vec<EventEnvelope>, AppendError> {
        let metadata = self.event_metadata(command);
        let mut envelopes = Vec::with_capacity(events.len());
        let mut snapshot = None;
        for (i, event) in (1..).zip(events) {
            let version = before + i;
            let envelope =
                EventEnvelope::of::<A>(&command.aggregate_id, version, event, at, metadata.clone());
            let token = snapshot_due(version, self.settings.snapshot_every).then(|| {
                let token = self.new_token();
                snapshot = Some((token, i as usize));
                token
            });
            let first = envelopes.is_empty();
            self.produce_event(partition, &envelope, token, first)?;
            envelopes.push(envelope);
        }
        let held = Held {
            version: before + events.len() as u64,
            state,
        };
        // The state the snapshot covers: after the command, or (rare) after one of its events.
        let snapshot = snapshot.map(|(token, after)| {
            let taken = if after == events.len() {
                held.clone()
            } else {
                self.held_after(partition, command, &events[..after])
            };
            (token, taken)
        });
        if let Some(txn) = self.txn.as_mut() {
            if let Some((token, taken)) = snapshot {
                txn.snapshots.push(DueSnapshot {
                    token,
                    partition,
                    aggregate_id: command.aggregate_id.clone(),
                    held: taken,
                });
            }
            txn.overlay.last_event_at.insert(partition, at);
            txn.overlay
                .accounts
                .insert(command.aggregate_id.clone(), held);
        }
        Ok(envelopes)
    }

    /// The aggregate after the first `events` of a command, for a snapshot due before its last
    /// event (rare: most commands emit one). [`aggregate::execute`] already folded them all.
    fn held_after(
        &self,
        partition: i32,
        command: &CommandMessage<A::Command>,
        events: &[A::Event],
    ) -> Held<A> {
        let mut held = self.held(partition, &command.aggregate_id);
        for event in events {
            let _ = held.state.evolve(event);
            held.version += 1;
        }
        held
    }

    /// The metadata of a command's events: the command's own, plus causation, correlation and
    /// trace ids.
    fn event_metadata(&self, command: &CommandMessage<A::Command>) -> Metadata {
        let mut metadata: Metadata = command.metadata.clone();
        let command_id = Value::String(command.command_id.to_string());
        metadata.insert("causation_id".into(), command_id.clone());
        metadata.entry("correlation_id").or_insert(command_id);
        if let Some(trace) = &self.trace {
            metadata.insert(
                METADATA_TRACE_ID.into(),
                Value::String(trace.trace_id_hex()),
            );
        }
        metadata
    }

    /// The latest event timestamp of the partition, the open transaction's included.
    fn clock_floor(&self, partition: i32) -> Option<chrono::DateTime<Utc>> {
        let committed = self
            .partitions
            .get(&partition)
            .and_then(|s| s.last_event_at);
        let open = self
            .txn
            .as_ref()
            .and_then(|t| t.overlay.last_event_at.get(&partition).copied());
        committed.max(open)
    }

    /// Encodes and sends one event. A record larger than Kafka takes is [`AppendError::Unwritable`]
    /// when it is the command's first event (nothing of the command was produced yet).
    fn produce_event(
        &mut self,
        partition: i32,
        envelope: &EventEnvelope,
        token: Option<DeliveryToken>,
        first: bool,
    ) -> Result<(), AppendError> {
        let topic = self.topics.events();
        let bytes = self
            .runtime
            .block_on(self.codec.encode(&topic, envelope))
            .inspect_err(
                |e| tracing::warn!(error = %e, "event encoding failed; the transaction is redone"),
            )?;
        let headers = self.traced(shared::codec::event_headers(envelope));
        let record = super::transactions::Record {
            topic: &topic,
            partition,
            key: envelope.aggregate_id.as_bytes(),
            payload: &bytes,
            headers: Some(headers),
            timestamp_ms: Some(envelope.timestamp.timestamp_millis()),
        };
        match self.send(record, token) {
            Err(KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge)) if first => {
                Err(AppendError::Unwritable(format!(
                    "the event ({} bytes) is larger than Kafka accepts",
                    bytes.len()
                )))
            }
            other => Ok(other?),
        }
    }

    fn new_token(&mut self) -> DeliveryToken {
        self.next_token += 1;
        DeliveryToken(self.next_token)
    }

    /// Produces the commands a decision set off ([`Aggregate::react`]) to their aggregates'
    /// partitions, in the open transaction: they are sent exactly when the decision commits.
    fn send_steps(&mut self, steps: &[Outgoing], cause: &Metadata) -> Result<(), TxnError> {
        let topic = self.topics.commands();
        for step in steps {
            let payload = shared::envelope::step_message(step, cause);
            let partition =
                canonical_partition(step.aggregate_id.as_bytes(), self.settings.partitions);
            tracing::debug!(command_id = %step.command_id, command_type = step.command_type, aggregate_id = %step.aggregate_id, "workflow step sent");
            let record = super::transactions::Record {
                topic: &topic,
                partition,
                key: step.aggregate_id.as_bytes(),
                payload: &payload,
                headers: self.trace.map(|_| self.traced(OwnedHeaders::new())),
                timestamp_ms: None,
            };
            self.send(record, None)?;
        }
        Ok(())
    }

    fn forward(&mut self, msg: &BorrowedMessage<'_>, canonical: i32) -> Result<(), TxnError> {
        tracing::debug!(
            from = msg.partition(),
            to = canonical,
            "command forwarded to its canonical partition"
        );
        let topic = self.topics.commands();
        let record = super::transactions::Record {
            topic: &topic,
            partition: canonical,
            key: msg.key().unwrap_or_default(),
            payload: msg.payload().unwrap_or_default(),
            headers: msg.headers().map(|h| h.detach()),
            timestamp_ms: None,
        };
        Ok(self.send(record, None)?)
    }

    /// Sends a newly decided result and, when it is final, remembers it for the dedupe window
    /// (a non-final one, `AggregateUnavailable`, is decided afresh when the command comes
    /// again).
    fn answer(&mut self, partition: i32, result: CommandResult) -> Result<(), TxnError> {
        if !result.is_final() {
            return self.send_result(partition, &result, None);
        }
        let token = self.new_token();
        self.send_result(partition, &result, Some(token))?;
        if let Some(txn) = self.txn.as_mut() {
            let decided = Decided {
                partition,
                result,
                delivery: token.0,
            };
            txn.overlay
                .results
                .insert(decided.result.command_id, decided);
        }
        Ok(())
    }

    /// Sends a result; `token` asks for its record's offset.
    fn send_result(
        &mut self,
        partition: i32,
        result: &CommandResult,
        token: Option<DeliveryToken>,
    ) -> Result<(), TxnError> {
        let topic = self.topics.command_results();
        let key = result.command_id.to_string();
        let payload = result.to_bytes();
        let record = super::transactions::Record {
            topic: &topic,
            partition,
            key: key.as_bytes(),
            payload: &payload,
            headers: self.trace.map(|_| self.traced(OwnedHeaders::new())),
            timestamp_ms: None,
        };
        Ok(self.send(record, token)?)
    }

    /// The result already decided for `command_id`, if any: from the open transaction, or
    /// read back from the results topic where the dedupe window points.
    fn result_of(
        &self,
        partition: i32,
        command_id: Uuid,
        aggregate_id: &str,
    ) -> Result<Option<CommandResult>, TxnError> {
        if let Some(decided) = self
            .txn
            .as_ref()
            .and_then(|t| t.overlay.results.get(&command_id))
        {
            return Ok(Some(decided.result.clone()));
        }
        let remembered = self
            .dedupe
            .get(partition, command_id)
            .map_err(|e| TxnError::Dedupe(e.to_string()))?;
        match remembered {
            None => Ok(None),
            Some(ResultRef::Held(result)) => Ok(Some(*result)),
            Some(ResultRef::At(offset)) => Ok(Some(
                self.read_result(partition, offset, command_id)?
                    .unwrap_or_else(|| result_lost(command_id, aggregate_id, offset)),
            )),
        }
    }

    /// Reads the result at `offset` of the results partition (the rare duplicate's path). When
    /// that record is gone (deleted by retention or `kafka-delete-records.sh`, removed by
    /// compaction) the copy a later duplicate re-sent under the same key is read instead;
    /// `None` when no copy is left: the original result is lost, and the engine says so rather
    /// than try the same offset again.
    fn read_result(
        &self,
        partition: i32,
        offset: i64,
        command_id: Uuid,
    ) -> Result<Option<CommandResult>, TxnError> {
        let topic = self.topics.command_results();
        let unreadable = |reason: String| TxnError::ResultUnreadable {
            topic: topic.clone(),
            partition,
            offset,
            reason,
        };
        let (low, high) = self
            .results
            .fetch_watermarks(&topic, partition, Duration::from_secs(5))
            .map_err(|e| unreadable(e.to_string()))?;
        // `high` is the last stable offset (the reader is read_committed): right after a commit
        // it can still be below the record, until the coordinator's markers land. A record at or
        // above it is waited for if the log holds it (below the end of everything written, which
        // the read_uncommitted client gives), and gone if not (a log truncated by an unclean
        // leader election); a record below the log start is gone too.
        if offset >= high {
            let (_, end) = self
                .offsets
                .fetch_watermarks(&topic, partition, Duration::from_secs(5))
                .map_err(|e| unreadable(e.to_string()))?;
            if offset >= end {
                return Ok(None);
            }
        }
        let start = offset.max(low);
        if start > offset && start >= high {
            return Ok(None);
        }
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&topic, partition, Offset::Offset(start))
            .and_then(|()| self.results.assign(&tpl))
            .map_err(|e| unreadable(e.to_string()))?;
        let key = command_id.to_string();
        // Past the original's offset, a quiet fetch means the end: no copy.
        let mut past = start > offset;
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut quiet_since = Instant::now();
        while Instant::now() < deadline {
            match self.results.poll(Duration::from_millis(100)) {
                Some(Ok(msg)) => {
                    quiet_since = Instant::now();
                    past |= msg.offset() > offset;
                    if msg.offset() != offset && msg.key() != Some(key.as_bytes()) {
                        continue;
                    }
                    let result: CommandResult =
                        serde_json::from_slice(msg.payload().unwrap_or_default())
                            .map_err(|e| unreadable(e.to_string()))?;
                    if result.command_id == command_id {
                        if msg.offset() != offset {
                            tracing::warn!(%command_id, partition, offset, copy = msg.offset(), "the original result record is gone; answering from a later copy");
                        }
                        return Ok(Some(result));
                    }
                    if msg.offset() == offset {
                        return Err(unreadable(format!("it answers {}", result.command_id)));
                    }
                }
                None if past && quiet_since.elapsed() >= Duration::from_secs(1) => {
                    return Ok(None);
                }
                None => {}
                Some(Err(e)) => return Err(unreadable(e.to_string())),
            }
        }
        if past {
            return Ok(None);
        }
        Err(unreadable("not fetched within 10 s".into()))
    }

    /// The aggregate as the open transaction left it, or as committed, or new.
    fn held(&self, partition: i32, aggregate_id: &str) -> Held<A> {
        self.txn
            .as_ref()
            .and_then(|t| t.overlay.accounts.get(aggregate_id))
            .or_else(|| self.partitions.get(&partition)?.accounts.get(aggregate_id))
            .cloned()
            .unwrap_or_default()
    }
}

/// The answer to a command decided within the dedupe window whose result record is gone from
/// the results topic: it is not decided again.
fn result_lost(command_id: Uuid, aggregate_id: &str, offset: i64) -> CommandResult {
    tracing::warn!(%command_id, offset, "a duplicate's original result record is gone; answered ResultLost");
    let rejection = Rejection::new(
        RejectionCode::ResultLost,
        format!(
            "command {command_id} was decided before, but its result (offset {offset} of the \
             results topic) is gone; it is not decided again: its events name it in \
             metadata.command_id"
        ),
    );
    Decision::rejected(command_id, aggregate_id, rejection).result
}
