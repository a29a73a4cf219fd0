//! The messages of the wire contract as Rust types: the command message, the command result and
//! the event envelope. Their JSON shapes are fixed by docs/contract.md; how they become bytes (plain JSON
//! or the Confluent wire format) is the codec's business.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::aggregate::{Aggregate, DomainCommand, DomainEvent};
use crate::bank_account::{BankAccount, Command, Event, EventDataError, Rejection, RejectionCode};

/// The schema version every event is written in today. Older versions are upcast on read.
pub const CURRENT_SCHEMA_VERSION: u32 =
    <BankAccount as crate::aggregate::Aggregate>::SCHEMA_VERSION;

/// Free-form metadata carried by commands and events (`correlation_id`, `causation_id`, `user`…).
pub type Metadata = Map<String, Value>;

/// A command as it travels on `<prefix>.commands` (key = `aggregate_id`), for the aggregate
/// type whose commands are `C` (the bank account's by default).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandMessage<C = Command> {
    /// Idempotency key: a retried command with the same id gets the original result.
    pub command_id: Uuid,
    /// The account the command is for; also the Kafka key.
    pub aggregate_id: String,
    /// What to do.
    pub command: C,
    /// Optimistic concurrency: the version the sender believes the account has.
    pub expected_version: Option<u64>,
    /// Passed through to the events (`correlation_id`, `user`…).
    pub metadata: Metadata,
}

/// The JSON shape of [`CommandMessage`]; kept apart so that a bad `type` or `payload` can still
/// be answered by `command_id`.
#[derive(Debug, Serialize, Deserialize)]
struct WireCommand {
    command_id: Uuid,
    aggregate_id: String,
    #[serde(rename = "type")]
    type_name: String,
    #[serde(default)]
    payload: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    expected_version: Option<u64>,
    #[serde(default)]
    metadata: Metadata,
}

/// A command message that could not be read, with whatever could be salvaged for the answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed command: {reason}")]
pub struct MalformedCommand {
    /// The command id, when the bytes had a readable one: the sender can then be answered.
    pub command_id: Option<Uuid>,
    /// The aggregate id, when readable.
    pub aggregate_id: Option<String>,
    /// What is wrong, for people.
    pub reason: String,
}

impl<C: DomainCommand> CommandMessage<C> {
    /// A new command with a fresh `command_id` and a fresh `correlation_id`.
    pub fn new(aggregate_id: impl Into<String>, command: C) -> Self {
        let mut metadata = Metadata::new();
        metadata.insert(
            "correlation_id".into(),
            Value::String(Uuid::new_v4().to_string()),
        );
        CommandMessage {
            command_id: Uuid::new_v4(),
            aggregate_id: aggregate_id.into(),
            command,
            expected_version: None,
            metadata,
        }
    }

    /// The JSON value of the message.
    pub fn to_json(&self) -> Value {
        let wire = WireCommand {
            command_id: self.command_id,
            aggregate_id: self.aggregate_id.clone(),
            type_name: self.command.type_name().to_owned(),
            payload: self.command.payload(),
            expected_version: self.expected_version,
            metadata: self.metadata.clone(),
        };
        serde_json::to_value(wire).unwrap_or(Value::Null)
    }

    /// The message as JSON bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.to_json().to_string().into_bytes()
    }

    /// Reads a command message of the aggregate type whose commands are `C`, saying precisely
    /// what is wrong with bytes it cannot read.
    pub fn parse(bytes: &[u8]) -> Result<Self, MalformedCommand> {
        let value: Value = serde_json::from_slice(bytes).map_err(|e| MalformedCommand {
            command_id: None,
            aggregate_id: None,
            reason: format!("not JSON: {e}"),
        })?;
        let command_id = value
            .get("command_id")
            .and_then(Value::as_str)
            .and_then(|s| Uuid::parse_str(s).ok());
        let aggregate_id = value
            .get("aggregate_id")
            .and_then(Value::as_str)
            .map(str::to_owned);
        let malformed = |reason: String| MalformedCommand {
            command_id,
            aggregate_id: aggregate_id.clone(),
            reason,
        };
        let wire: WireCommand =
            serde_json::from_value(value).map_err(|e| malformed(e.to_string()))?;
        crate::bank_account::check_text("aggregate_id", &wire.aggregate_id).map_err(malformed)?;
        let command = C::from_parts(&wire.type_name, wire.payload).map_err(malformed)?;
        Ok(CommandMessage {
            command_id: wire.command_id,
            aggregate_id: wire.aggregate_id,
            command,
            expected_version: wire.expected_version,
            metadata: wire.metadata,
        })
    }
}

/// The command message of a workflow's step ([`crate::aggregate::Aggregate::react`]): the
/// deciding command's metadata (its `principal`, `user`…) with the workflow's
/// `correlation_id`.
pub fn step_message(step: &crate::aggregate::Outgoing, cause: &Metadata) -> Vec<u8> {
    let mut metadata = cause.clone();
    metadata.remove(crate::trace::METADATA_TRACE_ID);
    metadata.remove("causation_id");
    metadata.insert(
        "correlation_id".into(),
        Value::String(step.correlation_id.clone()),
    );
    let wire = WireCommand {
        command_id: step.command_id,
        aggregate_id: step.aggregate_id.clone(),
        type_name: step.command_type.to_owned(),
        payload: step.payload.clone(),
        expected_version: None,
        metadata,
    };
    serde_json::to_vec(&wire).unwrap_or_default()
}

impl CommandMessage {
    /// Reads a bank-account command message ([`CommandMessage::parse`]).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, MalformedCommand> {
        Self::parse(bytes)
    }
}

/// Whether a command was accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CommandStatus {
    /// Events were appended.
    Accepted,
    /// Nothing was appended; `error` says why.
    Rejected,
}

/// One appended event as listed in an accepted result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventRef {
    /// The event's id.
    pub event_id: Uuid,
    /// The event's type.
    pub event_type: String,
    /// The aggregate version the event has.
    pub version: u64,
}

/// The answer to a command, on `<prefix>.command-results` (key = `command_id`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandResult {
    /// The command this answers.
    pub command_id: Uuid,
    /// The account concerned (empty when it could not be read from a malformed command).
    pub aggregate_id: String,
    /// Accepted or rejected.
    pub status: CommandStatus,
    /// The aggregate's version after the command (accepted only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
    /// The events appended (accepted only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub events: Vec<EventRef>,
    /// Why not (rejected only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<Rejection>,
}

impl CommandResult {
    /// An accepted result listing the appended events.
    pub fn accepted(command_id: Uuid, aggregate_id: &str, events: &[EventEnvelope]) -> Self {
        CommandResult {
            command_id,
            aggregate_id: aggregate_id.to_owned(),
            status: CommandStatus::Accepted,
            version: events.last().map(|e| e.version),
            events: events
                .iter()
                .map(|e| EventRef {
                    event_id: e.event_id,
                    event_type: e.event_type.clone(),
                    version: e.version,
                })
                .collect(),
            error: None,
        }
    }

    /// A rejected result.
    pub fn rejected(command_id: Uuid, aggregate_id: &str, rejection: Rejection) -> Self {
        CommandResult {
            command_id,
            aggregate_id: aggregate_id.to_owned(),
            status: CommandStatus::Rejected,
            version: None,
            events: Vec::new(),
            error: Some(rejection),
        }
    }

    /// The rejection code, if rejected.
    pub fn rejection_code(&self) -> Option<RejectionCode> {
        self.error.as_ref().map(|e| e.code.clone())
    }

    /// Whether this is the command's final answer (remembered for the dedupe window): every
    /// result but a rejection whose code is not final ([`RejectionCode::is_final`]).
    pub fn is_final(&self) -> bool {
        self.error.as_ref().is_none_or(|e| e.code.is_final())
    }

    /// JSON bytes of the result.
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// The event envelope (value of `<prefix>.events`, key = `aggregate_id`), at the current schema
/// version once read through the codec.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventEnvelope {
    /// Unique id of the event.
    pub event_id: Uuid,
    /// The account.
    pub aggregate_id: String,
    /// The aggregate type ([`Aggregate::TYPE`]): `BankAccount` for accounts.
    pub aggregate_type: String,
    /// `AccountOpened`, `MoneyDeposited`, `MoneyWithdrawn` or `AccountClosed`.
    pub event_type: String,
    /// Shape version of `data`; see the upcasters.
    pub schema_version: u32,
    /// Position of the event in its aggregate's history, from 1, without gaps.
    pub version: u64,
    /// When the event was recorded (UTC).
    pub timestamp: DateTime<Utc>,
    /// `correlation_id`, `causation_id` (the command id)…
    #[serde(default)]
    pub metadata: Metadata,
    /// The event's payload, shaped by `event_type` and `schema_version`.
    pub data: Value,
}

impl EventEnvelope {
    /// Wraps a bank-account event at the current schema version.
    pub fn new(
        aggregate_id: &str,
        version: u64,
        event: &Event,
        timestamp: DateTime<Utc>,
        metadata: Metadata,
    ) -> Self {
        Self::of::<BankAccount>(aggregate_id, version, event, timestamp, metadata)
    }

    /// Wraps an event of aggregate type `A` at its current schema version.
    pub fn of<A: Aggregate>(
        aggregate_id: &str,
        version: u64,
        event: &A::Event,
        timestamp: DateTime<Utc>,
        metadata: Metadata,
    ) -> Self {
        EventEnvelope {
            event_id: Uuid::new_v4(),
            aggregate_id: aggregate_id.to_owned(),
            aggregate_type: A::event_aggregate_type(event.event_type()).to_owned(),
            event_type: event.event_type().to_owned(),
            schema_version: A::SCHEMA_VERSION,
            version,
            timestamp,
            metadata,
            data: event.data(),
        }
    }

    /// The bank-account event (only meaningful at the current schema version).
    pub fn event(&self) -> Result<Event, EventDataError> {
        self.event_of::<BankAccount>()
    }

    /// The event of aggregate type `A` (only meaningful at its current schema version); an
    /// envelope of another aggregate type is [`EventDataError::UnknownType`].
    pub fn event_of<A: Aggregate>(&self) -> Result<A::Event, EventDataError> {
        let expected = A::event_aggregate_type(&self.event_type);
        if self.aggregate_type != expected {
            return Err(EventDataError::UnknownType(format!(
                "{} of aggregate type {} (expected {expected})",
                self.event_type, self.aggregate_type,
            )));
        }
        A::Event::from_parts(&self.event_type, &self.data)
    }

    /// The command that caused the event (`metadata.causation_id`), when recorded.
    pub fn causation_id(&self) -> Option<Uuid> {
        self.metadata
            .get("causation_id")
            .and_then(Value::as_str)
            .and_then(|s| s.parse().ok())
    }
}

/// An aggregate snapshot (value of `<prefix>.snapshots`, key = `aggregate_id`, compacted): the
/// state `S` (an [`Aggregate`]; the bank account's by default) after `version` events, none of
/// which is after `event_offset` in the aggregate's partition of `<prefix>.events`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot<S = BankAccount> {
    /// The account.
    pub aggregate_id: String,
    /// Number of events folded into `state`.
    pub version: u64,
    /// Offset of the last covered event in the events partition; for a snapshot written at a
    /// [`Checkpoint`], the partition's last offset at that moment (an upper bound).
    pub event_offset: i64,
    /// The folded state.
    pub state: S,
    /// When the snapshot was taken.
    pub taken_at: DateTime<Utc>,
}

/// A restore checkpoint of one partition (value of `<prefix>.command-checkpoints`, key = the
/// partition number, compacted), committed in the same transaction as a snapshot of every
/// aggregate of the partition that changed since the previous checkpoint. Together with the
/// snapshots it holds the partition's state as of `next_event_offset`, so a restore reads only
/// the events from there on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// The partition (of the events, snapshots and commands topics alike).
    pub partition: i32,
    /// Every event of the partition below this offset is covered by the snapshots.
    pub next_event_offset: i64,
    /// How many aggregates the partition held then: a restore that finds fewer snapshots
    /// of them knows one is missing and replays the partition instead.
    pub aggregates: u64,
    /// When the checkpoint was taken.
    pub taken_at: DateTime<Utc>,
    /// The latest event timestamp of the partition then: the next event is never stamped
    /// earlier, whatever the writer's clock says (absent in checkpoints of older versions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_event_at: Option<DateTime<Utc>>,
    /// Aggregates whose stored events could not be read: they have no snapshot, are not counted
    /// in `aggregates`, and stay unavailable after a restore from this checkpoint.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub quarantined: Vec<Quarantined>,
}

/// Who holds a command-service `INSTANCE_ID` (value of `<prefix>.command-instances`, key = the
/// INSTANCE_ID, compacted): written in a transaction by every producer of the id when it is
/// created, so the latest committed one names the process that fenced all earlier ones.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceLease {
    /// The INSTANCE_ID.
    pub instance_id: String,
    /// The holding process (random per process start).
    pub process: String,
    /// When it took the id.
    pub taken_at: DateTime<Utc>,
    /// How many times in a row the id was taken from a holder that had itself taken it moments
    /// before: two instances configured with one INSTANCE_ID, restarted by an orchestrator each
    /// time the other fences them. The next taker backs off longer each time (absent: 0).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub takeovers: u32,
    /// Written by the holding process as it stops gracefully: nobody holds the id.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub released: bool,
    /// Written (outside a transaction) by a process that found the id taken by another running
    /// process and stops: the id is contested by two instances. Not a lease: `process` names
    /// the one that stops, `takeovers` those of the lease that replaced it, and the next taker
    /// backs off. A holder that died without a word (SIGKILL, a crash) writes none, so its
    /// restart takes the id at once. (Absent: false.)
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub contested: bool,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// An aggregate set aside because one of its stored events cannot be read: commands on it are
/// answered `AggregateUnavailable` until the record is repaired and the partition restored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quarantined {
    /// The aggregate.
    pub aggregate_id: String,
    /// Offset of the first unreadable record of it on the events partition.
    pub offset: i64,
    /// What is wrong with that record.
    pub reason: String,
    /// [`record_fingerprint`] of that record: a restore that finds another record there (the
    /// store was repaired) lifts the quarantine by reading the partition again. Absent in
    /// checkpoints written before it existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<u32>,
}

/// A fingerprint of a record's key and value (murmur2), to tell whether the record at an offset
/// is still the one seen before.
pub fn record_fingerprint(key: Option<&[u8]>, value: Option<&[u8]>) -> u32 {
    let key_hash = murmur2::murmur2(key.unwrap_or_default(), murmur2::KAFKA_SEED);
    murmur2::murmur2(
        value.unwrap_or_default(),
        key_hash ^ u32::from(key.is_some()),
    )
}
