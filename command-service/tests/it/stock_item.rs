//! A second aggregate type, test-only: a stock item (register it, receive and ship quantities,
//! never more than is on hand). The worked example of docs/aggregates.md, served end to end by
//! the unmodified engine (`examples/stock_service.rs` runs it as a process).

#![allow(dead_code)]

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use shared::aggregate::{Aggregate, Context, DomainCommand, DomainEvent, Inapplicable};
use shared::bank_account::EventDataError;
use shared::{Rejection, RejectionCode};

/// The state: folded from the item's events, serialised in snapshots.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StockItem {
    /// Registered yet?
    pub registered: bool,
    /// What the item is.
    pub name: String,
    /// Units in the warehouse, never negative.
    pub on_hand: i64,
}

/// What can be asked of an item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StockCommand {
    /// Start tracking an item.
    Register { name: String },
    /// Units arrived.
    Receive { quantity: i64 },
    /// Units left, at most what is on hand.
    Ship { quantity: i64 },
}

/// What happened to an item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StockEvent {
    /// The item is tracked.
    Registered { name: String },
    /// Units arrived.
    Received { quantity: i64 },
    /// Units left.
    Shipped { quantity: i64 },
}

#[derive(Deserialize)]
struct Name {
    name: String,
}

#[derive(Deserialize)]
struct Quantity {
    quantity: i64,
}

impl DomainCommand for StockCommand {
    const TYPES: &'static [&'static str] = &["Register", "Receive", "Ship"];

    fn type_name(&self) -> &'static str {
        match self {
            StockCommand::Register { .. } => "Register",
            StockCommand::Receive { .. } => "Receive",
            StockCommand::Ship { .. } => "Ship",
        }
    }

    fn payload(&self) -> Value {
        match self {
            StockCommand::Register { name } => json!({ "name": name }),
            StockCommand::Receive { quantity } | StockCommand::Ship { quantity } => {
                json!({ "quantity": quantity })
            }
        }
    }

    fn from_parts(type_name: &str, payload: Value) -> Result<Self, String> {
        let invalid = |e: serde_json::Error| format!("invalid {type_name} payload: {e}");
        Ok(match type_name {
            "Register" => StockCommand::Register {
                name: serde_json::from_value::<Name>(payload)
                    .map_err(invalid)?
                    .name,
            },
            "Receive" => StockCommand::Receive {
                quantity: serde_json::from_value::<Quantity>(payload)
                    .map_err(invalid)?
                    .quantity,
            },
            "Ship" => StockCommand::Ship {
                quantity: serde_json::from_value::<Quantity>(payload)
                    .map_err(invalid)?
                    .quantity,
            },
            other => return Err(format!("unknown command type `{other}`")),
        })
    }
}

impl DomainEvent for StockEvent {
    const TYPES: &'static [&'static str] = &["Registered", "Received", "Shipped"];

    fn event_type(&self) -> &'static str {
        match self {
            StockEvent::Registered { .. } => "Registered",
            StockEvent::Received { .. } => "Received",
            StockEvent::Shipped { .. } => "Shipped",
        }
    }

    fn data(&self) -> Value {
        match self {
            StockEvent::Registered { name } => json!({ "name": name }),
            StockEvent::Received { quantity } | StockEvent::Shipped { quantity } => {
                json!({ "quantity": quantity })
            }
        }
    }

    fn from_parts(event_type: &str, data: &Value) -> Result<Self, EventDataError> {
        let invalid = |e: serde_json::Error| EventDataError::InvalidData {
            event_type: event_type.to_owned(),
            reason: e.to_string(),
        };
        Ok(match event_type {
            "Registered" => StockEvent::Registered {
                name: Name::deserialize(data).map_err(invalid)?.name,
            },
            "Received" => StockEvent::Received {
                quantity: Quantity::deserialize(data).map_err(invalid)?.quantity,
            },
            "Shipped" => StockEvent::Shipped {
                quantity: Quantity::deserialize(data).map_err(invalid)?.quantity,
            },
            other => return Err(EventDataError::UnknownType(other.to_owned())),
        })
    }
}

fn refuse<T>(code: &str, message: impl Into<String>) -> Result<T, Rejection> {
    Err(Rejection::new(RejectionCode::domain(code), message))
}

impl Aggregate for StockItem {
    const TYPE: &'static str = "StockItem";
    const SCHEMA_VERSION: u32 = 1;
    type Command = StockCommand;
    type Event = StockEvent;

    fn decide(
        &self,
        command: &StockCommand,
        _ctx: &Context<'_>,
    ) -> Result<Vec<StockEvent>, Rejection> {
        match (self.registered, command) {
            (false, StockCommand::Register { name }) if name.trim().is_empty() => {
                refuse("InvalidName", "an item needs a name")
            }
            (false, StockCommand::Register { name }) => {
                Ok(vec![StockEvent::Registered { name: name.clone() }])
            }
            (true, StockCommand::Register { .. }) => refuse("ItemExists", "already registered"),
            (false, _) => refuse("ItemNotFound", "no such item"),
            (true, StockCommand::Receive { quantity } | StockCommand::Ship { quantity })
                if *quantity <= 0 =>
            {
                refuse("InvalidQuantity", format!("{quantity} is not a quantity"))
            }
            (true, StockCommand::Receive { quantity }) => {
                if self.on_hand.checked_add(*quantity).is_none() {
                    return refuse("InvalidQuantity", "too many units");
                }
                Ok(vec![StockEvent::Received {
                    quantity: *quantity,
                }])
            }
            (true, StockCommand::Ship { quantity }) if *quantity > self.on_hand => refuse(
                "OutOfStock",
                format!("{quantity} asked, {} on hand", self.on_hand),
            ),
            (true, StockCommand::Ship { quantity }) => Ok(vec![StockEvent::Shipped {
                quantity: *quantity,
            }]),
        }
    }

    fn evolve(&mut self, event: &StockEvent) -> Result<(), Inapplicable> {
        match (self.registered, event) {
            (false, StockEvent::Registered { name }) => {
                self.registered = true;
                self.name.clone_from(name);
            }
            (true, StockEvent::Received { quantity }) if *quantity > 0 => {
                self.on_hand = self
                    .on_hand
                    .checked_add(*quantity)
                    .ok_or_else(|| Inapplicable("too many units".into()))?;
            }
            (true, StockEvent::Shipped { quantity }) if (1..=self.on_hand).contains(quantity) => {
                self.on_hand -= quantity;
            }
            (_, event) => {
                return Err(Inapplicable(format!(
                    "{} cannot follow {self:?}",
                    event.event_type()
                )));
            }
        }
        Ok(())
    }

    fn event_schema(event_type: &str, schema_version: u32) -> Option<Value> {
        match (event_type, schema_version) {
            ("Registered", 1) => Some(json!({
                "type": "object", "required": ["name"],
                "properties": {"name": {"type": "string", "minLength": 1}}
            })),
            ("Received" | "Shipped", 1) => Some(json!({
                "type": "object", "required": ["quantity"],
                "properties": {"quantity": {"type": "integer", "minimum": 1}}
            })),
            _ => None,
        }
    }
}
