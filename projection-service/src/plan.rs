//! The pure part of projecting a batch: given the decoded messages and the stored state of the
//! aggregates they touch (of read model `M`'s aggregate type), decide for each message whether it is applied, skipped as a duplicate,
//! parked behind a version gap or dead-lettered, and compute the rows to write. No I/O here, so
//! the rules are unit-tested directly.
//!
//! Rules, per event in offset order:
//! - version <= stored version: a duplicate (re-delivery), skipped and counted;
//! - version > stored + 1: a gap, parked (never applied out of order);
//! - version == stored + 1: applied if the aggregate's [`Aggregate::evolve`] takes it, else
//!   dead-lettered (`NotApplicable`); after an apply, parked events that now follow on are
//!   applied too, in version order.
//!
//! Undecodable messages (the codec's [`DecodeError`]) are dead-lettered with the error's code.

use std::collections::{BTreeMap, HashMap};

use rdkafka::message::OwnedHeaders;
use shared::aggregate::{Aggregate, Inapplicable, check_text};
use shared::dlq::DeadLetterCode;
use shared::kafka::canonical_partition;
use shared::{DecodeError, EventEnvelope};

use crate::db::{BatchWrite, ParkedRow, Unpark, format_ts};
use crate::model::{Applied, ReadModel, Stored};

/// One consumed message after decoding.
#[derive(Debug)]
pub struct Incoming {
    /// Source partition.
    pub partition: i32,
    /// Source offset.
    pub offset: i64,
    /// The original key (kept for the dead-letter topic).
    pub key: Option<Vec<u8>>,
    /// The original bytes (kept for the dead-letter topic).
    pub payload: Option<Vec<u8>>,
    /// The original headers (copied to the dead-letter topic).
    pub headers: Option<OwnedHeaders>,
    /// The decoded, upcast envelope, or why not.
    pub decoded: Result<EventEnvelope, DecodeError>,
}

/// A message to send to the dead-letter topic.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// Source partition.
    pub partition: i32,
    /// Source offset.
    pub offset: i64,
    /// Original key.
    pub key: Option<Vec<u8>>,
    /// Original bytes.
    pub payload: Option<Vec<u8>>,
    /// Original headers.
    pub headers: Option<OwnedHeaders>,
    /// Stable reason code.
    pub code: DeadLetterCode,
    /// Human-readable reason.
    pub message: String,
}

impl DeadLetter {
    /// A dead letter carrying a consumed message's origin and bytes unchanged.
    fn of(msg: &Incoming, refusal: Refusal) -> DeadLetter {
        DeadLetter {
            partition: msg.partition,
            offset: msg.offset,
            key: msg.key.clone(),
            payload: msg.payload.clone(),
            headers: msg.headers.clone(),
            code: refusal.code,
            message: refusal.message,
        }
    }
}

/// Why an event was refused: its dead-letter code and a message for people.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Refusal {
    /// Stable reason code.
    pub(crate) code: DeadLetterCode,
    /// Human-readable reason.
    pub(crate) message: String,
}

impl Refusal {
    fn new(code: DeadLetterCode, message: impl Into<String>) -> Self {
        Refusal {
            code,
            message: message.into(),
        }
    }
}

/// What a batch amounts to.
#[derive(Debug)]
pub struct Plan<A> {
    /// Rows to write (offsets are added by the caller).
    pub write: BatchWrite<A>,
    /// Messages to dead-letter before the batch commits.
    pub dead_letters: Vec<DeadLetter>,
    /// Events applied (including parked ones that now fit).
    pub applied: u64,
    /// Re-delivered events skipped.
    pub duplicates: u64,
    /// Events parked behind a gap.
    pub parked: u64,
    /// Previously parked events applied in this batch.
    pub unparked: u64,
    /// New version of every aggregate the batch changed.
    pub versions: HashMap<String, u64>,
}

impl<A> Default for Plan<A> {
    fn default() -> Self {
        Plan {
            write: BatchWrite::default(),
            dead_letters: Vec::new(),
            applied: 0,
            duplicates: 0,
            parked: 0,
            unparked: 0,
            versions: HashMap::new(),
        }
    }
}

struct Pending {
    row: ParkedRow,
    /// Already in the database (so resolving it needs a delete).
    stored: bool,
    /// Tried after the gap closed and refused (dead-lettered): stays parked, ends the chain.
    refused: bool,
}

/// Decides what to do with a batch of `topic`, whose aggregates live on `partitions`
/// partitions. `stored` holds the stored state of the aggregates the batch touches; `parked`
/// their parked events.
pub(crate) fn plan_batch<M: ReadModel>(
    topic: &str,
    partitions: i32,
    messages: &[Incoming],
    stored: HashMap<String, Stored<M::Aggregate>>,
    parked: Vec<ParkedRow>,
) -> Plan<M::Aggregate> {
    let mut planner = Planner::<M>::new(topic, partitions, stored, parked);
    for msg in messages {
        planner.take(msg);
    }
    planner.finish()
}

/// The state of planning one batch, message by message.
struct Planner<'a, M: ReadModel> {
    topic: &'a str,
    partitions: i32,
    plan: Plan<M::Aggregate>,
    stored: HashMap<String, Stored<M::Aggregate>>,
    /// Parked events per aggregate by version: stored ones and those parked in this batch.
    pending: HashMap<String, BTreeMap<u64, Pending>>,
    /// Aggregates changed by the batch, in first-changed order.
    dirty: Vec<String>,
}

impl<'a, M: ReadModel> Planner<'a, M> {
    fn new(
        topic: &'a str,
        partitions: i32,
        stored: HashMap<String, Stored<M::Aggregate>>,
        parked: Vec<ParkedRow>,
    ) -> Self {
        let mut pending: HashMap<String, BTreeMap<u64, Pending>> = HashMap::new();
        for row in parked {
            pending
                .entry(row.aggregate_id.clone())
                .or_default()
                .entry(row.version)
                .or_insert(Pending {
                    row,
                    stored: true,
                    refused: false,
                });
        }
        Planner {
            topic,
            partitions,
            plan: Plan::default(),
            stored,
            pending,
            dirty: Vec::new(),
        }
    }

    /// Decides one message: dead-letter, duplicate, park or apply (then unpark what follows).
    fn take(&mut self, msg: &Incoming) {
        let envelope = match &msg.decoded {
            Ok(envelope) => envelope,
            Err(error) => {
                let refusal = Refusal::new(error.into(), error.to_string());
                self.plan.dead_letters.push(DeadLetter::of(msg, refusal));
                return;
            }
        };
        let id = envelope.aggregate_id.clone();
        let home = canonical_partition(id.as_bytes(), self.partitions);
        if home != msg.partition {
            let refusal = Refusal::new(
                DeadLetterCode::Misplaced,
                format!(
                    "an event of {id} on partition {}, but the aggregate lives on partition \
                     {home} with PARTITIONS={}: the partition count changed under existing \
                     events, or a producer used another partitioner",
                    msg.partition, self.partitions
                ),
            );
            self.plan.dead_letters.push(DeadLetter::of(msg, refusal));
            return;
        }
        let aggregate = self
            .stored
            .entry(id.clone())
            .or_insert_with(|| Stored::new(&id));
        let stored = aggregate.version;
        if envelope.version <= stored {
            self.plan.duplicates += 1;
            return;
        }
        if envelope.version > stored + 1 {
            self.park(msg, envelope, stored + 1);
            return;
        }
        match apply_one::<M>(aggregate, envelope, msg.partition, msg.offset) {
            Ok(row) => {
                self.plan.write.applied.push(row);
                self.plan.applied += 1;
            }
            Err(refusal) => {
                self.plan.dead_letters.push(DeadLetter::of(msg, refusal));
                return;
            }
        }
        self.apply_parked_followers(&id);
        if !self.dirty.contains(&id) {
            self.dirty.push(id);
        }
    }

    /// Keeps an event aside behind a version gap.
    fn park(&mut self, msg: &Incoming, envelope: &EventEnvelope, expected: u64) {
        let id = &envelope.aggregate_id;
        tracing::error!(
            aggregate_id = %id,
            version = envelope.version,
            expected,
            partition = msg.partition,
            offset = msg.offset,
            "version gap: event parked, not applied"
        );
        self.plan.parked += 1;
        let row = ParkedRow {
            topic: self.topic.to_owned(),
            partition: msg.partition,
            offset: msg.offset,
            aggregate_id: id.clone(),
            version: envelope.version,
            expected_version: expected,
            event_id: envelope.event_id.to_string(),
            reason: format!("version gap: got {}, expected {expected}", envelope.version),
            envelope: serde_json::to_string(envelope).unwrap_or_default(),
        };
        self.pending
            .entry(id.clone())
            .or_default()
            .entry(envelope.version)
            .or_insert(Pending {
                row,
                stored: false,
                refused: false,
            });
    }

    /// Applies the parked events of `id` that now follow on, in version order, until one is
    /// missing or refused (a refused one is dead-lettered, stays parked and ends the chain).
    fn apply_parked_followers(&mut self, id: &str) {
        let (Some(aggregate), Some(waiting)) = (self.stored.get_mut(id), self.pending.get_mut(id))
        else {
            return;
        };
        while let Some(next) = waiting.get_mut(&(aggregate.version + 1)) {
            if next.refused {
                break;
            }
            let outcome = match serde_json::from_str::<EventEnvelope>(&next.row.envelope) {
                Ok(envelope) => {
                    apply_one::<M>(aggregate, &envelope, next.row.partition, next.row.offset)
                }
                Err(e) => Err(Refusal::new(DeadLetterCode::InvalidEnvelope, e.to_string())),
            };
            match outcome {
                Ok(row) => {
                    self.plan.write.applied.push(row);
                    self.plan.applied += 1;
                    self.plan.unparked += 1;
                }
                Err(Refusal { code, message }) => {
                    self.plan.dead_letters.push(DeadLetter {
                        partition: next.row.partition,
                        offset: next.row.offset,
                        key: Some(id.as_bytes().to_vec()),
                        payload: Some(next.row.envelope.clone().into_bytes()),
                        headers: None,
                        code,
                        message,
                    });
                    next.refused = true;
                    break;
                }
            }
        }
    }

    /// The rows to write: new parked events, resolved parked ones, changed aggregates.
    fn finish(mut self) -> Plan<M::Aggregate> {
        for (id, waiting) in self.pending {
            let version = self.stored.get(&id).map_or(0, |a| a.version);
            let mut resolved_stored = false;
            for (v, p) in waiting {
                if v <= version {
                    resolved_stored |= p.stored;
                } else if !p.stored {
                    self.plan.write.parked.push(p.row);
                }
            }
            if resolved_stored {
                self.plan.write.unpark.push(Unpark {
                    aggregate_id: id,
                    through_version: version,
                });
            }
        }
        for id in self.dirty {
            if let Some(aggregate) = self.stored.remove(&id) {
                self.plan.versions.insert(id, aggregate.version);
                self.plan.write.changed.push(aggregate);
            }
        }
        self.plan
    }
}

/// Applies one event to an aggregate, returning the history row, or a dead-letter reason. The
/// id must be storable text (PostgreSQL refuses a NUL byte anywhere, b-tree index rows are
/// bounded) and so must the event's fields the read model stores ([`ReadModel::check_storable`]):
/// such an event is dead-lettered (`Unstorable`) here rather than failing its whole batch over
/// and over.
fn apply_one<M: ReadModel>(
    stored: &mut Stored<M::Aggregate>,
    envelope: &EventEnvelope,
    partition: i32,
    offset: i64,
) -> Result<Applied<M::Aggregate>, Refusal> {
    let event = envelope
        .event_of::<M::Aggregate>()
        .map_err(|e| Refusal::new(DeadLetterCode::InvalidEventData, e.to_string()))?;
    let unstorable = |reason: String| Refusal::new(DeadLetterCode::Unstorable, reason);
    check_text("aggregate_id", &envelope.aggregate_id).map_err(unstorable)?;
    M::check_storable(&envelope.aggregate_id, &event).map_err(unstorable)?;
    stored
        .state
        .evolve(&event)
        .map_err(|Inapplicable(reason)| Refusal::new(DeadLetterCode::NotApplicable, reason))?;
    stored.version = envelope.version;
    let ts = format_ts(&envelope.timestamp);
    if stored.version == 1 || stored.first_at.is_empty() {
        stored.first_at.clone_from(&ts);
    }
    stored.updated_at = ts;
    Ok(Applied {
        aggregate_id: envelope.aggregate_id.clone(),
        version: envelope.version,
        event_id: envelope.event_id.to_string(),
        event_type: envelope.event_type.clone(),
        timestamp: envelope.timestamp,
        data: envelope.data.to_string(),
        envelope: serde_json::to_string(envelope).unwrap_or_default(),
        after: stored.state.clone(),
        source_partition: partition,
        source_offset: offset,
    })
}
