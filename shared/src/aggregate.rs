//! The seam between the machinery and a domain: an aggregate type is a *decider*. It decides
//! what a command means for its current state (`decide`, pure and synchronous) and folds the
//! events it emitted (`evolve`). Nothing here knows about Kafka, codecs or databases; the engine
//! owns versions, the `expected_version` check, the clock floor, metadata, snapshots,
//! checkpoints and quarantine.
//!
//! [`crate::BankAccount`] is the first implementation; `docs/aggregates.md` walks through
//! adding another.

use std::fmt::Debug;

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::bank_account::{Rejection, RejectionCode};
use crate::envelope::Metadata;
use crate::upcast::Upcasters;

/// Longest aggregate id (or other indexed text, such as an account's owner), in bytes: read
/// models index them, and database
/// indexes have row limits (PostgreSQL's b-tree takes at most 2704 bytes).
pub const MAX_TEXT_BYTES: usize = 200;

/// Checks an aggregate id or other indexed text: not blank, at most [`MAX_TEXT_BYTES`], no control
/// characters (PostgreSQL refuses NUL in text). The error says which rule `field` broke.
pub fn check_text(field: &str, value: &str) -> Result<(), String> {
    if value.trim().is_empty() {
        Err(format!("{field} must not be blank"))
    } else if value.len() > MAX_TEXT_BYTES {
        Err(format!(
            "{field} is {} bytes long; at most {MAX_TEXT_BYTES} are allowed",
            value.len()
        ))
    } else if value.chars().any(char::is_control) {
        Err(format!("{field} must not contain control characters"))
    } else {
        Ok(())
    }
}

/// Event `data` that does not match its event type at the current schema version.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventDataError {
    /// The event type is not one of this aggregate's.
    #[error("unknown event type `{0}`")]
    UnknownType(String),
    /// The data does not have the fields the event type requires.
    #[error("invalid {event_type} data: {reason}")]
    InvalidData {
        /// The event type whose data was invalid.
        event_type: String,
        /// What serde said.
        reason: String,
    },
}

/// A command of an aggregate type as it travels in the command message: a wire `type` name and
/// a JSON `payload`.
pub trait DomainCommand: Clone + Debug + PartialEq + Send + Sync + 'static {
    /// Every command type name of the aggregate, as written on the wire.
    const TYPES: &'static [&'static str];

    /// The command types only the engine sends (the steps of a workflow, see
    /// [`Aggregate::react`]): `POST /commands` refuses them. None by default.
    const INTERNAL: &'static [&'static str] = &[];

    /// The wire name (`type` field of the command message).
    fn type_name(&self) -> &'static str;

    /// The wire payload (`payload` field of the command message).
    fn payload(&self) -> Value;

    /// Reads a command from its wire `type` and `payload`; the error says what is wrong.
    fn from_parts(type_name: &str, payload: Value) -> Result<Self, String>;
}

/// An event of an aggregate type at its current schema version: a wire `event_type` name and a
/// JSON `data` object.
pub trait DomainEvent: Clone + Debug + PartialEq + Send + Sync + 'static {
    /// Every event type name of the aggregate, as written on the wire.
    const TYPES: &'static [&'static str];

    /// The wire name (`event_type` of the envelope).
    fn event_type(&self) -> &'static str;

    /// The envelope's `data` at the current schema version.
    fn data(&self) -> Value;

    /// Reads an event from its type and current-version `data`.
    fn from_parts(event_type: &str, data: &Value) -> Result<Self, EventDataError>;
}

/// What a decision may know besides the state: the aggregate's id and version (the number of
/// events folded), the event time the engine will stamp, and the command's metadata.
#[derive(Debug, Clone, Copy)]
pub struct Context<'a> {
    /// The aggregate the command is for.
    pub aggregate_id: &'a str,
    /// Events folded into the state so far.
    pub version: u64,
    /// The timestamp the events will carry (never earlier than the partition's latest event).
    pub now: DateTime<Utc>,
    /// The command's metadata (`correlation_id`, `user`…).
    pub metadata: &'a Metadata,
}

/// A command one aggregate's decision sends to another ([`Aggregate::react`]), as it goes on
/// the wire.
#[derive(Debug, Clone, PartialEq)]
pub struct Outgoing {
    /// The aggregate it is for (its partition gets it).
    pub aggregate_id: String,
    /// Derived from the workflow and the step ([`step_id`]), never random: a step decided
    /// twice is answered from the dedupe window instead of being applied twice.
    pub command_id: uuid::Uuid,
    /// The command's wire `type`.
    pub command_type: &'static str,
    /// The command's wire `payload`.
    pub payload: Value,
    /// The workflow's identity, `metadata.correlation_id` of the command and of every event
    /// it causes.
    pub correlation_id: String,
}

/// The namespace of [`step_id`] (a UUID v5 namespace of this project's own).
const STEP_NAMESPACE: uuid::Uuid = uuid::Uuid::from_u128(0x6f1d_53a2_9c4b_4e0a_b1d7_2f3e_8a90_c5d1);

/// The command id of a workflow's step: a UUID v5 of the workflow's id and the step's name,
/// the same every time the step is decided.
pub fn step_id(workflow_id: &str, step: &str) -> uuid::Uuid {
    let mut name = Vec::with_capacity(workflow_id.len() + step.len() + 1);
    name.extend_from_slice(workflow_id.as_bytes());
    name.push(0);
    name.extend_from_slice(step.as_bytes());
    uuid::Uuid::new_v5(&STEP_NAMESPACE, &name)
}

/// An event that is not a possible next event of the state it is folded into: restore
/// quarantines the aggregate, the projection dead-letters the event. Never a panic.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("inapplicable event: {0}")]
pub struct Inapplicable(pub String);

/// An aggregate type: its state (`Self`, folded from events, serialisable for snapshots), its
/// commands, its events and the two functions between them.
pub trait Aggregate:
    Default + Clone + Debug + PartialEq + Send + Sync + Serialize + DeserializeOwned + 'static
{
    /// The stable type name: `aggregate_type` in every event envelope.
    const TYPE: &'static str;
    /// Every `aggregate_type` this aggregate's events carry: just [`Aggregate::TYPE`], unless
    /// the aggregate serves several types through one engine (see [`crate::bank::Bank`]).
    const TYPES: &'static [&'static str] = &[Self::TYPE];
    /// The schema version every event of this type is written in.
    const SCHEMA_VERSION: u32;
    /// The aggregate's commands.
    type Command: DomainCommand;
    /// The aggregate's events.
    type Event: DomainEvent;

    /// Decides what `command` means for this state: the events to append (in order), or why
    /// not. Pure and synchronous: no I/O, no clock but `ctx.now`, the same answer every time.
    /// A decision emitting several events must account for each one's effect (fold as you
    /// emit); [`execute`] checks that every one is applicable.
    fn decide(
        &self,
        command: &Self::Command,
        ctx: &Context<'_>,
    ) -> Result<Vec<Self::Event>, Rejection>;

    /// Folds one event into the state. An event that cannot follow this state is
    /// [`Inapplicable`] and leaves the state as it was.
    fn evolve(&mut self, event: &Self::Event) -> Result<(), Inapplicable>;

    /// The JSON Schema of an event type's `data` at a schema version (at least
    /// [`Aggregate::SCHEMA_VERSION`], which the registry gets at start; older ones for readers
    /// that ask); `None` for a type or version this aggregate does not have.
    fn event_schema(event_type: &str, schema_version: u32) -> Option<Value>;

    /// Registers the steps that bring older schema versions of this type's events to
    /// [`Aggregate::SCHEMA_VERSION`] (and back, for old readers), keyed by (event type,
    /// version). None by default: a type still at its first version needs none.
    fn register_upcasters(upcasters: &mut Upcasters) {
        let _ = upcasters;
    }

    /// The `aggregate_type` of an event type (one of [`Aggregate::TYPES`]).
    fn event_aggregate_type(event_type: &str) -> &'static str {
        let _ = event_type;
        Self::TYPE
    }

    /// What a decision sets off at other aggregates (a workflow's next step): commands the
    /// engine produces, in the transaction that appends the decision's events or records its
    /// rejection, to their aggregates' partitions. `outcome` is the decision: the events
    /// appended (`self` is then the state after them) or the rejection (`self` unchanged).
    /// Nothing by default. Must be pure, like [`Aggregate::decide`].
    fn react(
        &self,
        command: &Self::Command,
        outcome: Result<&[Self::Event], &Rejection>,
        ctx: &Context<'_>,
    ) -> Vec<Outgoing> {
        let _ = (command, outcome, ctx);
        Vec::new()
    }

    /// Rebuilds a state from a whole history, stopping at the first inapplicable event.
    fn from_events<'a>(
        events: impl IntoIterator<Item = &'a Self::Event>,
    ) -> Result<Self, Inapplicable> {
        let mut state = Self::default();
        for event in events {
            state.evolve(event)?;
        }
        Ok(state)
    }
}

/// What the engine does with a command: checks `expected_version` against `ctx.version`
/// (`VersionConflict`), asks [`Aggregate::decide`], and folds each emitted event into the
/// state. Returns the events and the new state. An
/// emitted event the state refuses is a bug in the decider, answered as a rejection rather than
/// appended.
pub fn execute<A: Aggregate>(
    mut state: A,
    expected_version: Option<u64>,
    command: &A::Command,
    ctx: &Context<'_>,
) -> Result<(Vec<A::Event>, A), Rejection> {
    if let Some(expected) = expected_version
        && expected != ctx.version
    {
        return Err(Rejection::new(
            RejectionCode::VersionConflict,
            format!(
                "expected version {expected}, but the {} is at version {}",
                A::TYPE,
                ctx.version
            ),
        ));
    }
    let events = state.decide(command, ctx)?;
    for event in &events {
        state.evolve(event).map_err(|e| {
            tracing::error!(aggregate_type = A::TYPE, aggregate_id = ctx.aggregate_id, %e, "the decider emitted an event its state refuses");
            Rejection::new(
                RejectionCode::Malformed,
                format!(
                    "{} decided {} which its state refuses ({e}); nothing was appended",
                    A::TYPE,
                    event.event_type()
                ),
            )
        })?;
    }
    Ok((events, state))
}
