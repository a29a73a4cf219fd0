//! The read side's seam: what one aggregate type's read model provides to the machinery.
//!
//! The machinery ([`crate::projector`], [`crate::plan`], [`crate::rebuild`]) owns the consumer,
//! the offsets stored in the same database transaction as the rows, the version checks
//! (duplicates skipped, gaps parked, inapplicable events dead-lettered), rebuild and its swap,
//! lag and readiness. It folds each event into the aggregate's state with
//! [`Aggregate::evolve`]; a [`ReadModel`] only says which tables it keeps, how to read the
//! states a batch touches, and what to write for the events the machinery applied, inside the
//! transaction the machinery opened. Its HTTP routes are its queries.
//!
//! The bank account's read model is [`crate::accounts::Accounts`]; docs/aggregates.md shows
//! another one step by step.

use std::collections::HashMap;
use std::future::Future;

use chrono::{DateTime, Utc};
use shared::aggregate::Aggregate;
use sqlx::{Any, Transaction};

use crate::db::{StoreResult, Tables};
use crate::http::AppState;

/// One aggregate as the read model stores it: the folded state plus what the machinery keeps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored<A> {
    /// The aggregate id.
    pub id: String,
    /// Events applied so far (the machinery's, whatever the state keeps).
    pub version: u64,
    /// The folded state.
    pub state: A,
    /// Timestamp of version 1 (RFC 3339).
    pub first_at: String,
    /// Timestamp of the latest applied event (RFC 3339).
    pub updated_at: String,
}

impl<A: Default> Stored<A> {
    /// An aggregate with no event yet.
    pub fn new(id: &str) -> Self {
        Stored {
            id: id.to_owned(),
            version: 0,
            state: A::default(),
            first_at: String::new(),
            updated_at: String::new(),
        }
    }
}

/// One event the machinery applied, with the state right after it (for history tables and
/// queries as of a version or a time).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied<A> {
    /// The aggregate.
    pub aggregate_id: String,
    /// Its version.
    pub version: u64,
    /// The event id.
    pub event_id: String,
    /// The event type (wire name).
    pub event_type: String,
    /// When it happened.
    pub timestamp: DateTime<Utc>,
    /// Its `data` at the current schema version (JSON text).
    pub data: String,
    /// The whole envelope at the current schema version (JSON text).
    pub envelope: String,
    /// The state after the event.
    pub after: A,
    /// Where the event was read from.
    pub source_partition: i32,
    /// Where the event was read from.
    pub source_offset: i64,
}

/// A read model of one aggregate type. Implementations are zero-sized markers: the machinery
/// is generic over them (static dispatch on the batch path).
///
/// Table names: the machinery passes [`Tables`], which maps each base name in
/// [`ReadModel::TABLES`] to the set in use (`accounts` live, `accounts_rebuild` during a
/// rebuild) with [`Tables::model`]. Queries served over HTTP read the live names.
pub trait ReadModel: Send + Sync + 'static {
    /// The aggregate type whose events this model folds.
    type Aggregate: Aggregate;

    /// Base names of the model's tables. The first is the state table: one row per aggregate
    /// with at least `id TEXT PRIMARY KEY` and `version BIGINT` (a rebuild's swap compares
    /// them with the live ones).
    const TABLES: &'static [&'static str];

    /// The table counted as `events` in `GET /status`, if the model keeps a history.
    const HISTORY_TABLE: Option<&'static str> = None;

    /// The `CREATE TABLE` / `CREATE INDEX` statements of the model's tables in `tables`. Index
    /// names must carry `tag` (index names are per schema, and a swapped-in table keeps the
    /// index names it was built with).
    fn ddl(tables: &Tables, tag: &str) -> Vec<String>;

    /// The numbered changes (from 3) that bring the live tables of an older release's
    /// database to [`ReadModel::ddl`]'s shape, applied once each, in order. A database created
    /// by this release gets [`ReadModel::ddl`] whole and records them as done. None by default.
    fn upgrades(tables: &Tables) -> Vec<(i64, Vec<String>)> {
        let _ = tables;
        Vec::new()
    }

    /// Refuses an event whose text the tables cannot store (PostgreSQL refuses NUL bytes, index
    /// rows are bounded): it is dead-lettered as `Unstorable` instead of failing its batch.
    /// Called before the event is folded.
    fn check_storable(
        aggregate_id: &str,
        event: &<Self::Aggregate as Aggregate>::Event,
    ) -> Result<(), String> {
        let _ = (aggregate_id, event);
        Ok(())
    }

    /// The stored state of the aggregates `ids` (missing ids are absent from the map).
    fn load(
        tx: &mut Transaction<'static, Any>,
        tables: &Tables,
        ids: &[&str],
    ) -> impl Future<Output = StoreResult<HashMap<String, Stored<Self::Aggregate>>>> + Send;

    /// Writes what a batch did, inside the machinery's transaction: the applied events in
    /// order, then the final state of every aggregate they changed.
    fn write(
        tx: &mut Transaction<'static, Any>,
        tables: &Tables,
        applied: &[Applied<Self::Aggregate>],
        changed: &[Stored<Self::Aggregate>],
    ) -> impl Future<Output = StoreResult<()>> + Send;

    /// The model's query routes, merged into the service's router behind the `accounts:read`
    /// scope (none by default).
    fn routes() -> axum::Router<AppState> {
        axum::Router::new()
    }

    /// Routes anyone may fetch, such as a page and its assets (none by default). Never data.
    fn public_routes() -> axum::Router<AppState> {
        axum::Router::new()
    }
}
