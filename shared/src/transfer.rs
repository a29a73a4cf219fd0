//! The transfer: a workflow moving money from one account to another, on partitions owned by
//! different writers. The transfer is an aggregate of its own (id chosen by the client, its
//! idempotency key); each step is one decision of one aggregate, which appends its events and
//! sends the next step's command in the same Kafka transaction ([`Aggregate::react`]):
//!
//! 1. `TransferMoney` on the transfer: `TransferStarted`; sends `DebitForTransfer` to the source.
//! 2. `DebitForTransfer` on the source: `TransferDebited` (the amount leaves the source's
//!    balance and the transfer holds it); sends `CreditForTransfer` to the target. Refused
//!    (`AccountNotFound`, `AccountClosed`, `InsufficientFunds`): sends `FailTransfer`.
//! 3. `CreditForTransfer` on the target: `TransferCredited`; sends `SettleTransfer` to the
//!    source and `CompleteTransfer` to the transfer. Refused (`AccountNotFound`,
//!    `AccountClosed`, `CurrencyMismatch`): sends `RefundTransfer` to the source.
//! 4. `RefundTransfer` on the source: `TransferRefunded` (never refused: the source cannot be
//!    closed while a transfer out of it is in flight); sends `FailTransfer` with the reason.
//! 5. `CompleteTransfer` / `FailTransfer` on the transfer: `TransferCompleted` /
//!    `TransferFailed`.
//!
//! Step command ids are [`step_id`]s of the transfer id and the step: a step decided twice is
//! answered from the dedupe window. Nothing waits on a lock.

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::aggregate::{
    Aggregate, Context, DomainCommand, DomainEvent, EventDataError, Inapplicable, Outgoing,
    check_text, step_id,
};
use crate::bank_account::{Rejection, RejectionCode, TransferLeg};

/// The `aggregate_type` of a transfer's events.
pub const TRANSFER_TYPE: &str = "Transfer";

/// Where a transfer is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TransferStatus {
    /// No `TransferStarted` yet: the id is free.
    #[default]
    New,
    /// Started; its steps are under way.
    Pending,
    /// The target was credited.
    Completed,
    /// Nothing moved (or the amount came back): see `reason`.
    Failed,
}

impl TransferStatus {
    /// Lower-case wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            TransferStatus::New => "new",
            TransferStatus::Pending => "pending",
            TransferStatus::Completed => "completed",
            TransferStatus::Failed => "failed",
        }
    }
}

/// The state of one transfer, folded from its events.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transfer {
    /// Where it is.
    pub status: TransferStatus,
    /// The source account.
    pub from: String,
    /// The target account.
    pub to: String,
    /// Minor units of the source's currency.
    pub amount_minor: i64,
    /// The currency the sender named, else the source's once known (the source was found).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub currency: Option<String>,
    /// Why it failed (a rejection code).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// The transfer's commands: `TransferMoney` from clients, the two endings from the steps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TransferCommand {
    /// Start a transfer (the client's command).
    TransferMoney(Start),
    /// The target was credited (sent by the engine only).
    CompleteTransfer(Ending),
    /// The transfer failed and nothing stays moved (sent by the engine only).
    FailTransfer(Ending),
}

/// The transfer's events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TransferEvent {
    /// The transfer was accepted; its steps begin.
    TransferStarted(Start),
    /// The target was credited.
    TransferCompleted(Ending),
    /// The transfer failed (`reason`); no balance changed in the end.
    TransferFailed(Ending),
}

/// What a transfer moves: the payload of `TransferMoney` and the data of `TransferStarted`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Start {
    /// The source account.
    pub from: String,
    /// The target account.
    pub to: String,
    /// Minor units of the source's currency, more than zero.
    pub amount_minor: i64,
    /// The currency the sender means the amount in (optional): the source refuses the debit
    /// (`CurrencyMismatch`) unless it is the source's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub currency: Option<String>,
}

/// How a transfer ended: the payload of its ending commands and the data of its ending events.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ending {
    /// The source's currency, when the source was found.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub currency: Option<String>,
    /// Why it failed (a rejection code); absent when completed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

fn reject<T>(code: &str, message: impl Into<String>) -> Result<T, Rejection> {
    Err(Rejection::new(RejectionCode::domain(code), message))
}

impl TransferCommand {
    /// Every command type, as written on the wire.
    pub const TYPES: [&'static str; 3] = ["TransferMoney", "CompleteTransfer", "FailTransfer"];
}

impl DomainCommand for TransferCommand {
    const TYPES: &'static [&'static str] = &TransferCommand::TYPES;
    const INTERNAL: &'static [&'static str] = &["CompleteTransfer", "FailTransfer"];

    fn type_name(&self) -> &'static str {
        match self {
            TransferCommand::TransferMoney(_) => "TransferMoney",
            TransferCommand::CompleteTransfer(_) => "CompleteTransfer",
            TransferCommand::FailTransfer(_) => "FailTransfer",
        }
    }

    fn payload(&self) -> Value {
        match self {
            TransferCommand::TransferMoney(start) => serde_json::to_value(start),
            TransferCommand::CompleteTransfer(end) | TransferCommand::FailTransfer(end) => {
                serde_json::to_value(end)
            }
        }
        .unwrap_or(Value::Null)
    }

    fn from_parts(type_name: &str, payload: Value) -> Result<Self, String> {
        let err = |e: serde_json::Error| format!("invalid {type_name} payload: {e}");
        let payload = if payload.is_null() {
            json!({})
        } else {
            payload
        };
        Ok(match type_name {
            "TransferMoney" => TransferCommand::TransferMoney(
                serde_json::from_value::<Start>(payload).map_err(err)?,
            ),
            "CompleteTransfer" => {
                TransferCommand::CompleteTransfer(serde_json::from_value(payload).map_err(err)?)
            }
            "FailTransfer" => {
                TransferCommand::FailTransfer(serde_json::from_value(payload).map_err(err)?)
            }
            other => return Err(format!("unknown command type `{other}`")),
        })
    }
}

impl TransferEvent {
    /// Every event type, as written on the wire.
    pub const TYPES: [&'static str; 3] = ["TransferStarted", "TransferCompleted", "TransferFailed"];
}

impl DomainEvent for TransferEvent {
    const TYPES: &'static [&'static str] = &TransferEvent::TYPES;

    fn event_type(&self) -> &'static str {
        match self {
            TransferEvent::TransferStarted(_) => "TransferStarted",
            TransferEvent::TransferCompleted(_) => "TransferCompleted",
            TransferEvent::TransferFailed(_) => "TransferFailed",
        }
    }

    fn data(&self) -> Value {
        match self {
            TransferEvent::TransferStarted(start) => serde_json::to_value(start),
            TransferEvent::TransferCompleted(end) | TransferEvent::TransferFailed(end) => {
                serde_json::to_value(end)
            }
        }
        .unwrap_or(Value::Null)
    }

    fn from_parts(event_type: &str, data: &Value) -> Result<Self, EventDataError> {
        fn parse<T: for<'de> Deserialize<'de>>(t: &str, data: &Value) -> Result<T, EventDataError> {
            T::deserialize(data).map_err(|e| EventDataError::InvalidData {
                event_type: t.to_owned(),
                reason: e.to_string(),
            })
        }
        Ok(match event_type {
            "TransferStarted" => {
                let start: Start = parse(event_type, data)?;
                if start.amount_minor <= 0 {
                    return Err(EventDataError::InvalidData {
                        event_type: event_type.to_owned(),
                        reason: format!("amount_minor {} is out of range", start.amount_minor),
                    });
                }
                TransferEvent::TransferStarted(start)
            }
            "TransferCompleted" => TransferEvent::TransferCompleted(parse(event_type, data)?),
            "TransferFailed" => TransferEvent::TransferFailed(parse(event_type, data)?),
            other => return Err(EventDataError::UnknownType(other.to_owned())),
        })
    }
}

impl Transfer {
    /// Decides a transfer command: the events, or why not.
    pub fn handle(&self, command: &TransferCommand) -> Result<Vec<TransferEvent>, Rejection> {
        match (self.status, command) {
            (TransferStatus::New, TransferCommand::TransferMoney(start)) => {
                for (field, value) in [("from", &start.from), ("to", &start.to)] {
                    if let Err(reason) = check_text(field, value) {
                        return reject("Malformed", reason);
                    }
                }
                if let Some(currency) = &start.currency
                    && !crate::bank_account::is_currency_code(currency)
                {
                    return reject(
                        "Malformed",
                        format!("currency `{currency}` is not an ISO 4217 code like EUR"),
                    );
                }
                if start.amount_minor <= 0 {
                    return Err(Rejection::new(
                        RejectionCode::InvalidAmount,
                        format!("amount must be more than zero, got {}", start.amount_minor),
                    ));
                }
                if start.from == start.to {
                    return reject("SameAccount", "a transfer needs two different accounts");
                }
                Ok(vec![TransferEvent::TransferStarted(start.clone())])
            }
            (_, TransferCommand::TransferMoney(_)) => {
                reject("TransferExists", "this transfer id was used before")
            }
            (TransferStatus::New, _) => reject("TransferNotFound", "no such transfer"),
            (TransferStatus::Pending, TransferCommand::CompleteTransfer(end)) => {
                Ok(vec![TransferEvent::TransferCompleted(end.clone())])
            }
            (TransferStatus::Pending, TransferCommand::FailTransfer(end)) => {
                Ok(vec![TransferEvent::TransferFailed(end.clone())])
            }
            (_, _) => reject("TransferFinished", "the transfer has ended"),
        }
    }

    /// Folds one event; one that cannot follow this state is refused.
    pub fn fold(&mut self, event: &TransferEvent) -> Result<(), Inapplicable> {
        match (self.status, event) {
            (TransferStatus::New, TransferEvent::TransferStarted(start)) => {
                self.status = TransferStatus::Pending;
                self.from.clone_from(&start.from);
                self.to.clone_from(&start.to);
                self.amount_minor = start.amount_minor;
                self.currency.clone_from(&start.currency);
            }
            (TransferStatus::Pending, TransferEvent::TransferCompleted(end)) => {
                self.status = TransferStatus::Completed;
                if end.currency.is_some() {
                    self.currency.clone_from(&end.currency);
                }
            }
            (TransferStatus::Pending, TransferEvent::TransferFailed(end)) => {
                self.status = TransferStatus::Failed;
                if end.currency.is_some() {
                    self.currency.clone_from(&end.currency);
                }
                self.reason.clone_from(&end.reason);
            }
            (status, event) => {
                return Err(Inapplicable(format!(
                    "{} for a transfer that is {}",
                    event.event_type(),
                    status.as_str()
                )));
            }
        }
        Ok(())
    }

    /// The step a decision sets off: a started transfer debits its source.
    pub fn reactions(&self, accepted: bool, transfer_id: &str) -> Vec<Outgoing> {
        if !accepted || self.status != TransferStatus::Pending {
            return Vec::new();
        }
        let leg = TransferLeg {
            transfer_id: transfer_id.to_owned(),
            from: self.from.clone(),
            to: self.to.clone(),
            amount_minor: self.amount_minor,
            currency: self.currency.clone(),
            reason: None,
        };
        vec![account_step(&self.from, "DebitForTransfer", &leg)]
    }
}

/// A transfer's step for an account (`DebitForTransfer`, `CreditForTransfer`, `SettleTransfer`,
/// `RefundTransfer`), with its derived command id.
pub fn account_step(account: &str, command_type: &'static str, leg: &TransferLeg) -> Outgoing {
    Outgoing {
        aggregate_id: account.to_owned(),
        command_id: step_id(&leg.transfer_id, command_type),
        command_type,
        payload: serde_json::to_value(leg).unwrap_or(Value::Null),
        correlation_id: leg.transfer_id.clone(),
    }
}

/// A transfer's ending step (`CompleteTransfer` or `FailTransfer`), with its derived command id.
pub fn ending_step(transfer_id: &str, command_type: &'static str, ending: &Ending) -> Outgoing {
    Outgoing {
        aggregate_id: transfer_id.to_owned(),
        command_id: step_id(transfer_id, command_type),
        command_type,
        payload: serde_json::to_value(ending).unwrap_or(Value::Null),
        correlation_id: transfer_id.to_owned(),
    }
}

impl Aggregate for Transfer {
    const TYPE: &'static str = TRANSFER_TYPE;
    const SCHEMA_VERSION: u32 = crate::bank_account::BankAccount::SCHEMA_VERSION;
    type Command = TransferCommand;
    type Event = TransferEvent;

    fn decide(
        &self,
        command: &TransferCommand,
        _ctx: &Context<'_>,
    ) -> Result<Vec<TransferEvent>, Rejection> {
        self.handle(command)
    }

    fn evolve(&mut self, event: &TransferEvent) -> Result<(), Inapplicable> {
        self.fold(event)
    }

    fn react(
        &self,
        _command: &TransferCommand,
        outcome: Result<&[TransferEvent], &Rejection>,
        ctx: &Context<'_>,
    ) -> Vec<Outgoing> {
        self.reactions(outcome.is_ok(), ctx.aggregate_id)
    }

    fn event_schema(event_type: &str, schema_version: u32) -> Option<Value> {
        if schema_version != Self::SCHEMA_VERSION {
            return None;
        }
        let text = json!({"type": "string", "minLength": 1});
        Some(match event_type {
            "TransferStarted" => json!({
                "type": "object",
                "required": ["from", "to", "amount_minor"],
                "properties": {
                    "from": text, "to": text,
                    "amount_minor": {"type": "integer", "minimum": 1},
                    "currency": {"type": "string", "pattern": "^[A-Z]{3}$"}
                }
            }),
            "TransferCompleted" | "TransferFailed" => json!({
                "type": "object",
                "properties": {
                    "currency": {"type": "string", "pattern": "^[A-Z]{3}$"},
                    "reason": text
                }
            }),
            _ => return None,
        })
    }
}
