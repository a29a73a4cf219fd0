//! Test harness, by concern: [`database`] (a fresh database per test, the read model as
//! compared), [`app`] (the service in-process on port 0, polling with deadlines), [`kafka`]
//! (producers for raw bytes and envelopes, the dead letters read back) and [`histories`]
//! (generated account histories with their expected fold).

pub mod app;
pub mod database;
pub mod histories;
pub mod kafka;

pub use app::*;
pub use database::*;
pub use histories::*;
pub use kafka::*;
