//! The bank-account aggregate: its commands, its events and the rules that decide between them.
//!
//! [`BankAccount::handle`] decides (command → events or a [`Rejection`]), [`BankAccount::apply`]
//! only folds an event into the state. Nothing here knows about Kafka or the wire format.

mod aggregate;
mod commands;
mod events;
mod wire;

pub use crate::aggregate::EventDataError;
pub use aggregate::{AccountStatus, BankAccount, is_currency_code};
pub use commands::{Command, Rejection, RejectionCode};
pub use events::{Event, TransferLeg};
pub use wire::{current_schemas, json_schema, prepare, schema_name, subject};

/// The `aggregate_type` written in every event envelope of this aggregate.
pub const AGGREGATE_TYPE: &str = "BankAccount";

pub use crate::aggregate::{MAX_TEXT_BYTES, check_text};
