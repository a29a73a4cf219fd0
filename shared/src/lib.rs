//! What both services and the CLI share.
//!
//! - [`aggregate`]: the decide/evolve seam every aggregate type implements; no I/O.
//! - [`auth`]: who may call the HTTP APIs (API keys and scopes, the `Host` check).
//! - [`bank`]: accounts and transfers served by one engine ([`bank::Bank`]).
//! - [`transfer`]: the transfer between two accounts, a workflow of steps across partitions.
//! - [`bank_account`]: the domain — commands, events, rules (`handle`) and fold (`apply`); no I/O.
//! - [`envelope`]: the messages of the wire contract (command, result, event envelope).
//! - [`client`]: producing commands and waiting for their results (CLI, benchmarks).
//! - [`codec`]: the only place that knows how events become bytes (JSON, Confluent wire format,
//!   headers) and back.
//! - [`upcast`]: schema evolution steps (v1 ↔ v2) applied by the codec.
//! - [`money`]: exact decimal ↔ minor-unit conversion.
//! - [`registry`]: schema registry administration (subjects, compatibility rules).
//! - [`config`]: typed settings from the environment.
//! - [`dlq`]: reading the dead-letter topic back (explorer, `bank dlq`).
//! - [`kafka`]: topic names, the canonical partitioner, client configuration, topic creation.
//! - [`serve`]: serving a router over HTTP or HTTPS with a graceful stop.
//! - [`runtime`]: tracing, shutdown signal and Prometheus recorder for the binaries.
//! - [`trace`]: W3C `traceparent` carried on commands, events and results.
//! - [`testing`]: the given/when/then harness and integration-test helpers.

pub mod aggregate;
pub mod auth;
pub mod bank;
pub mod bank_account;
pub mod client;
pub mod codec;
pub mod config;
pub mod dlq;
pub mod envelope;
pub mod kafka;
pub mod money;
pub mod registry;
pub mod runtime;
pub mod serve;
pub mod shutdown;
pub mod testing;
pub mod trace;
pub mod transfer;
pub mod upcast;

pub use bank::{Bank, BankCommand, BankEvent};
pub use bank_account::{AccountStatus, BankAccount, Command, Event, Rejection, RejectionCode};
pub use codec::{DecodeError, EventCodec};
pub use config::Settings;
pub use envelope::{CommandMessage, CommandResult, CommandStatus, EventEnvelope};
