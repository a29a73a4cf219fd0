//! The bank-account aggregate: its commands, its events and the rules that decide between them.
//!
//! [`BankAccount::handle`] decides (command → events or a [`Rejection`]), [`BankAccount::apply`]
//! only folds an event into the state. Nothing here knows about Kafka or the wire format.

mod aggregate;
mod commands;
mod events;

pub use aggregate::{AccountStatus, BankAccount};
pub use commands::{Command, Rejection, RejectionCode};
pub use events::{Event, EventDataError};

/// The `aggregate_type` written in every event envelope of this aggregate.
pub const AGGREGATE_TYPE: &str = "BankAccount";

/// Longest account id or owner name, in bytes: the read model indexes both, and database
/// indexes have row limits (PostgreSQL's b-tree takes at most 2704 bytes).
pub const MAX_TEXT_BYTES: usize = 200;

/// Checks an account id or owner name: not blank, at most [`MAX_TEXT_BYTES`], no control
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
