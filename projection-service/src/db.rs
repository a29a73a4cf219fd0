//! The read model's storage: one code path for SQLite and PostgreSQL through `sqlx::Any`.
//!
//! - [`Database`]: the pool, the backend, migrations and the machinery's queries (offsets,
//!   parked events, the batch write around the read model's, a rebuild's swap). A read model's
//!   own queries live with it ([`crate::accounts`] for the bank account).
//! - [`Tables`]: the names of one set of tables: `projection_offsets` and `parked_events`, plus
//!   the read model's ([`crate::model::ReadModel::TABLES`]); a rebuild fills a `_rebuild` set
//!   and [`Database::swap_in`] renames it into place in one transaction.
//! - [`StoreError`]: backend errors translated in one place (a compare-and-set that found another
//!   value is a [`StoreError::Conflict`], a locked database or a lost connection is
//!   [`StoreError::Transient`]).
//!
//! Portability rules: SQL uses `$N` placeholders (sqlx's SQLite driver maps them by number), only
//! `BIGINT` and `TEXT` columns, `INSERT … ON CONFLICT`, and no aggregate that PostgreSQL would
//! type as `NUMERIC`. Timestamps are stored twice: as RFC 3339 text for display and as
//! nanoseconds since the epoch (`BIGINT`) for ordering and `as_of` comparisons.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::error::ErrorKind;
use sqlx::{Any, AnyPool, Executor, Row, Transaction};

use crate::model::{Applied, ReadModel, Stored};

/// Which database engine the URL named.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// `sqlite://FILE` (the default): WAL mode, one writer.
    Sqlite,
    /// `postgres://…`.
    Postgres,
}

/// A storage failure, classified for the caller's retry decision.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A compare-and-set found another value: someone else (a rebuild's swap, another instance)
    /// moved the offsets. Re-read them and retry.
    #[error("conflict: {0}")]
    Conflict(String),
    /// The database is locked, busy, restarting or unreachable: retry with backoff.
    #[error("database temporarily unavailable: {0}")]
    Transient(#[source] sqlx::Error),
    /// Anything else (a bad schema, a bug): retrying will not help.
    #[error("database error: {0}")]
    Fatal(#[source] sqlx::Error),
    /// A stored value is out of its range (a negative version, an unknown status): the tables
    /// were changed by something else than this service. Retrying will not help.
    #[error("invalid stored value: {0}")]
    Invalid(String),
}

impl StoreError {
    /// Whether trying again may succeed.
    pub fn is_retriable(&self) -> bool {
        !matches!(self, StoreError::Fatal(_) | StoreError::Invalid(_))
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        match &e {
            sqlx::Error::Io(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::Tls(_)
            | sqlx::Error::Protocol(_)
            | sqlx::Error::WorkerCrashed => StoreError::Transient(e),
            sqlx::Error::Database(db) => {
                if matches!(db.kind(), ErrorKind::UniqueViolation) {
                    return StoreError::Conflict(db.message().to_owned());
                }
                let code = db.code().map(|c| c.into_owned()).unwrap_or_default();
                // SQLite: BUSY (5), LOCKED (6) and their extended codes (x + 256·n).
                // PostgreSQL: serialization failure, deadlock, connection and shutdown classes.
                let sqlite_busy = code
                    .parse::<i32>()
                    .map(|c| matches!(c & 0xff, 5 | 6))
                    .unwrap_or(false);
                let pg_transient = matches!(code.as_str(), "40001" | "40P01" | "53300" | "55P03")
                    || code.starts_with("08")
                    || code.starts_with("57P");
                if sqlite_busy || pg_transient {
                    StoreError::Transient(e)
                } else {
                    StoreError::Fatal(e)
                }
            }
            _ => StoreError::Fatal(e),
        }
    }
}

/// Result alias of this module.
pub type StoreResult<T> = Result<T, StoreError>;

/// The names of one set of read-model tables: the machinery's (offsets, parked events) and the
/// read model's ([`ReadModel::TABLES`]), all with the same suffix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tables {
    /// Appended to every base name: empty for the live set.
    suffix: String,
    /// Next offset to read per (topic, partition): the consumer's source of truth.
    pub offsets: String,
    /// Events that arrived after a version gap, kept aside until the gap is filled.
    pub parked: String,
    /// The read model's base names ([`ReadModel::TABLES`]); the first is its state table.
    bases: &'static [&'static str],
    /// The base name of the table counted as `events` in `GET /status`.
    history: Option<&'static str>,
}

/// The machinery's offsets table (live name).
pub const OFFSETS_TABLE: &str = "projection_offsets";
/// The machinery's parked-events table (live name).
pub const PARKED_TABLE: &str = "parked_events";

impl Tables {
    fn with_suffix<M: ReadModel>(suffix: &str) -> Self {
        Self::named(M::TABLES, M::HISTORY_TABLE, suffix)
    }

    fn named(bases: &'static [&'static str], history: Option<&'static str>, suffix: &str) -> Self {
        Tables {
            suffix: suffix.to_owned(),
            offsets: format!("{OFFSETS_TABLE}{suffix}"),
            parked: format!("{PARKED_TABLE}{suffix}"),
            bases,
            history,
        }
    }

    /// The tables read model `M` reads and writes.
    pub fn live_of<M: ReadModel>() -> Self {
        Self::with_suffix::<M>("")
    }

    /// The tables a rebuild of read model `M` fills before swapping them in.
    pub(crate) fn rebuild_of<M: ReadModel>() -> Self {
        Self::with_suffix::<M>("_rebuild")
    }

    /// The same set under another suffix.
    fn resuffixed(&self, suffix: &str) -> Self {
        Self::named(self.bases, self.history, suffix)
    }

    /// The name in this set of the read model's table `base` (one of [`ReadModel::TABLES`]).
    pub fn model(&self, base: &str) -> String {
        format!("{base}{}", self.suffix)
    }

    /// The read model's state table (one row per aggregate, `id` and `version` columns).
    fn state(&self) -> String {
        self.model(self.bases.first().copied().unwrap_or(""))
    }

    /// Every table of the set, the read model's first (the order the projector locks them in).
    fn all(&self) -> Vec<String> {
        let mut all: Vec<String> = self.bases.iter().map(|b| self.model(b)).collect();
        all.push(self.offsets.clone());
        all.push(self.parked.clone());
        all
    }

    /// The machinery's `CREATE TABLE` and `CREATE INDEX` statements, then the read model's.
    /// Index names carry `tag` because index names are per schema, and a swapped-in table keeps
    /// the index names it was built with.
    fn ddl<M: ReadModel>(&self, tag: &str) -> Vec<String> {
        let Tables {
            offsets, parked, ..
        } = self;
        let mut ddl = M::ddl(self, tag);
        ddl.extend([
            format!(
                "CREATE TABLE {offsets} (
                    topic TEXT NOT NULL,
                    \"partition\" BIGINT NOT NULL,
                    next_offset BIGINT NOT NULL,
                    PRIMARY KEY (topic, \"partition\")
                )"
            ),
            format!(
                "CREATE TABLE {parked} (
                    topic TEXT NOT NULL,
                    \"partition\" BIGINT NOT NULL,
                    source_offset BIGINT NOT NULL,
                    aggregate_id TEXT NOT NULL,
                    version BIGINT NOT NULL,
                    expected_version BIGINT NOT NULL,
                    event_id TEXT NOT NULL,
                    reason TEXT NOT NULL,
                    envelope TEXT NOT NULL,
                    parked_at TEXT NOT NULL,
                    PRIMARY KEY (topic, \"partition\", source_offset)
                )"
            ),
            format!("CREATE INDEX ix_parked_aggregate_{tag} ON {parked} (aggregate_id, version)"),
        ]);
        ddl
    }
}

/// An event kept aside because its version is ahead of the stored one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ParkedRow {
    /// Where it was read from.
    pub topic: String,
    /// Where it was read from.
    pub partition: i32,
    /// Where it was read from.
    pub offset: i64,
    /// The account.
    pub aggregate_id: String,
    /// Its version.
    pub version: u64,
    /// The version the projection expected instead.
    pub expected_version: u64,
    /// The event id.
    pub event_id: String,
    /// Why it was parked.
    pub reason: String,
    /// The envelope (current schema version) as JSON text.
    pub envelope: String,
}

/// Everything one batch writes, in one transaction.
#[derive(Debug)]
pub(crate) struct BatchWrite<A> {
    /// Applied events, in order.
    pub applied: Vec<Applied<A>>,
    /// Final state of every aggregate the batch changed.
    pub changed: Vec<Stored<A>>,
    /// Newly parked events.
    pub parked: Vec<ParkedRow>,
    /// Accounts whose parked events up to a version were applied or became duplicates.
    pub unpark: Vec<Unpark>,
    /// The offsets to compare-and-set, per partition.
    pub offsets: Vec<OffsetAdvance>,
}

impl<A> Default for BatchWrite<A> {
    fn default() -> Self {
        BatchWrite {
            applied: Vec::new(),
            changed: Vec::new(),
            parked: Vec::new(),
            unpark: Vec::new(),
            offsets: Vec::new(),
        }
    }
}

/// Parked events of an account that are resolved: every one up to `through_version` goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Unpark {
    /// The account.
    pub aggregate_id: String,
    /// Its version now; parked events at or below it are applied or duplicates.
    pub through_version: u64,
}

/// A compare-and-set of one partition's stored next offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct OffsetAdvance {
    /// Partition of the events topic.
    pub partition: i32,
    /// The stored offset this process last saw (`None`: no row yet).
    pub expected: Option<i64>,
    /// The new next offset.
    pub next: i64,
}

/// The next offset of one partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct PartitionOffset {
    /// Partition of the events topic.
    pub partition: i32,
    /// The next offset to read.
    pub next: i64,
}

/// What [`Database::swap_in`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Swap {
    /// The tables are swapped in.
    Done,
    /// Nothing was swapped: the live tables are ahead on a partition.
    LiveAhead(LiveAhead),
    /// Nothing was swapped: at the same offsets, accounts of the rebuilt tables are behind the
    /// live ones (the rebuild dead-lettered events the live projection applied): swapping
    /// would take them back. A few of them, as (account, live version, rebuilt version).
    AccountsBehind(Vec<(String, i64, Option<i64>)>),
}

/// A partition on which the live tables are ahead of a rebuild's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LiveAhead {
    /// Partition of the events topic.
    pub(crate) partition: i32,
    /// The live next offset.
    pub(crate) live: i64,
    /// The rebuild's next offset (`None`: nothing stored yet).
    pub(crate) rebuilt: Option<i64>,
}

/// Row counts of the live tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowCounts {
    /// The read model's state table (`accounts`): one row per aggregate.
    pub accounts: i64,
    /// The read model's history table (`account_events`), 0 without one.
    pub events: i64,
    /// `parked_events`.
    pub parked: i64,
}

/// `%text%` for `column LIKE … ESCAPE '\'` over text folded by [`fold_case`], folded the same
/// way, with `%`, `_` and `\` taken literally.
pub fn contains_pattern(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('%');
    for c in text.chars() {
        if matches!(c, '%' | '_' | '\\') {
            out.push('\\');
        }
        out.extend(c.to_lowercase());
    }
    out.push('%');
    out
}

/// Unicode lower case, letter by letter: what search compares (`É` and `é` alike), the same
/// on every database because it is done here, not by the database's `LOWER`.
pub fn fold_case(text: &str) -> String {
    text.chars().flat_map(char::to_lowercase).collect()
}

/// A timestamp as RFC 3339 text (UTC, `Z`, as many fraction digits as needed).
pub fn format_ts(ts: &DateTime<Utc>) -> String {
    ts.to_rfc3339_opts(SecondsFormat::AutoSi, true)
}

/// Nanoseconds since the epoch, saturating outside 1677–2262 (the range an `i64` holds).
pub fn ts_nanos(ts: &DateTime<Utc>) -> i64 {
    ts.timestamp_nanos_opt().unwrap_or(if ts.timestamp() > 0 {
        i64::MAX
    } else {
        i64::MIN
    })
}

/// A count or version for a `BIGINT` column (saturating: no count reaches `i64::MAX`).
pub fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// A `BIGINT` column that must not be negative, read by name.
pub fn get_u64(row: &AnyRow, column: &str) -> StoreResult<u64> {
    let n: i64 = row.try_get(column)?;
    u64::try_from(n).map_err(|_| StoreError::Invalid(format!("{column} is negative: {n}")))
}

/// A `BIGINT` partition column, read by name.
fn get_partition(row: &AnyRow, column: &str) -> StoreResult<i32> {
    let n: i64 = row.try_get(column)?;
    i32::try_from(n).map_err(|_| StoreError::Invalid(format!("{column} out of range: {n}")))
}

/// `($1,$2,…),($k+1,…)` for `rows` rows of `cols` columns.
pub fn placeholders(rows: usize, cols: usize) -> String {
    let mut s = String::with_capacity(rows * cols * 5);
    for r in 0..rows {
        if r > 0 {
            s.push(',');
        }
        s.push('(');
        for c in 0..cols {
            if c > 0 {
                s.push(',');
            }
            s.push('$');
            s.push_str(&(r * cols + c + 1).to_string());
        }
        s.push(')');
    }
    s
}

/// Runs `select` (a `SELECT … FROM table` without a `WHERE`) for the rows whose `column` is one
/// of `ids`, in chunks of 500 (below both engines' parameter limits).
pub async fn fetch_by_ids(
    tx: &mut Transaction<'static, Any>,
    select: &str,
    column: &str,
    ids: &[&str],
) -> StoreResult<Vec<AnyRow>> {
    let mut out = Vec::with_capacity(ids.len());
    for chunk in ids.chunks(500) {
        let sql = format!(
            "{select} WHERE {column} IN ({})",
            placeholders(1, chunk.len()).trim_matches(['(', ')'])
        );
        let mut query = sqlx::query(&sql);
        for id in chunk {
            query = query.bind(*id);
        }
        out.extend(query.fetch_all(&mut **tx).await?);
    }
    Ok(out)
}

/// Rows per multi-row `INSERT` (well below both engines' parameter limits).
pub const ROWS_PER_INSERT: usize = 100;

/// The read-model database: a pool for the projection's writes and one of their own for the
/// API's queries, so that slow or many queries never queue the projection's batches behind
/// them.
#[derive(Debug, Clone)]
pub struct Database {
    pool: AnyPool,
    reads: AnyPool,
    backend: Backend,
}

const MIGRATIONS_TABLE: &str = "projection_schema";

impl Database {
    /// Connects (creating a SQLite file if missing, in WAL mode) and runs the migrations of
    /// the machinery's tables and read model `M`'s.
    pub async fn connect_for<M: ReadModel>(url: &str) -> StoreResult<Database> {
        sqlx::any::install_default_drivers();
        let (backend, url) = if url.starts_with("sqlite:") {
            let url = if url.contains("mode=") || url.contains(":memory:") {
                url.to_owned()
            } else if url.contains('?') {
                format!("{url}&mode=rwc")
            } else {
                format!("{url}?mode=rwc")
            };
            (Backend::Sqlite, url)
        } else {
            (Backend::Postgres, url.to_owned())
        };
        let options = |max_connections| {
            AnyPoolOptions::new()
                .max_connections(max_connections)
                .acquire_timeout(Duration::from_secs(30))
                .after_connect(move |conn, _meta| {
                    Box::pin(async move {
                        if backend == Backend::Sqlite {
                            // First, on every connection (whichever creates the file's first table
                            // sets it; a no-op for an existing file): pages freed by a rebuild's
                            // swap can then be given back ([`Database::give_back_free_pages`]).
                            conn.execute("PRAGMA auto_vacuum = INCREMENTAL").await?;
                            conn.execute("PRAGMA journal_mode = WAL").await?;
                            conn.execute("PRAGMA synchronous = NORMAL").await?;
                            conn.execute("PRAGMA busy_timeout = 10000").await?;
                        }
                        Ok(())
                    })
                })
        };
        let pool = options(4).connect(&url).await?;
        // An in-memory SQLite database exists once per connection pool: one pool serves both.
        let reads = if url.contains(":memory:") {
            pool.clone()
        } else {
            options(8).connect_lazy(&url)?
        };
        let db = Database {
            pool,
            reads,
            backend,
        };
        db.migrate::<M>().await?;
        Ok(db)
    }

    /// The engine in use.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The pool, for tests and tools that look at the tables directly.
    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// The queries' pool, for tests.
    pub fn reads(&self) -> &AnyPool {
        &self.reads
    }

    /// Closes the pools.
    pub async fn close(&self) {
        self.reads.close().await;
        self.pool.close().await;
    }

    /// Begins a write transaction (`BEGIN IMMEDIATE` on SQLite, so that a read-then-write
    /// transaction never fails to upgrade its lock).
    pub(crate) async fn begin_write(&self) -> StoreResult<Transaction<'static, Any>> {
        Ok(match self.backend {
            Backend::Sqlite => self.pool.begin_with("BEGIN IMMEDIATE").await?,
            Backend::Postgres => self.pool.begin().await?,
        })
    }

    /// Creates the live tables once (numbered migrations recorded in `projection_schema`).
    async fn migrate<M: ReadModel>(&self) -> StoreResult<()> {
        self.pool
            .execute(
                format!(
                    "CREATE TABLE IF NOT EXISTS {MIGRATIONS_TABLE} (
                        version BIGINT PRIMARY KEY, applied_at TEXT NOT NULL)"
                )
                .as_str(),
            )
            .await?;
        let live = Tables::live_of::<M>();
        let upgrades = M::upgrades(&live);
        // A new database gets the current shape at once: the upgrades are recorded as done in
        // the same transaction.
        let mut create = live.ddl::<M>("v1");
        let now = format_ts(&Utc::now());
        create.extend(upgrades.iter().map(|(version, _)| {
            format!(
                "INSERT INTO {MIGRATIONS_TABLE} (version, applied_at) VALUES ({version}, '{now}')"
            )
        }));
        let mut migrations: Vec<(i64, Vec<String>)> =
            vec![(1, create), (2, vec![crate::identity::DDL.to_owned()])];
        migrations.extend(upgrades);
        for attempt in 0..3 {
            match self.apply_migrations(&migrations).await {
                // Two processes migrating at once: the loser retries and finds it done.
                Err(e) if e.is_retriable() && attempt < 2 => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                other => return other,
            }
        }
        Ok(())
    }

    async fn apply_migrations(&self, migrations: &[(i64, Vec<String>)]) -> StoreResult<()> {
        for (version, statements) in migrations {
            let mut tx = self.begin_write().await?;
            let done: Option<i64> = sqlx::query_scalar(&format!(
                "SELECT version FROM {MIGRATIONS_TABLE} WHERE version = $1"
            ))
            .bind(*version)
            .fetch_optional(&mut *tx)
            .await?;
            if done.is_some() {
                continue;
            }
            for statement in statements {
                tx.execute(statement.as_str()).await?;
            }
            sqlx::query(&format!(
                "INSERT INTO {MIGRATIONS_TABLE} (version, applied_at) VALUES ($1, $2)"
            ))
            .bind(*version)
            .bind(format_ts(&Utc::now()))
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            tracing::info!(version, "read-model migration applied");
        }
        Ok(())
    }

    /// Drops and re-creates a table set (for a rebuild). `tag` makes index names unique.
    pub(crate) async fn recreate_tables<M: ReadModel>(
        &self,
        tables: &Tables,
        tag: &str,
    ) -> StoreResult<()> {
        let mut tx = self.begin_write().await?;
        for table in tables.all() {
            tx.execute(format!("DROP TABLE IF EXISTS {table}").as_str())
                .await?;
        }
        for statement in tables.ddl::<M>(tag) {
            tx.execute(statement.as_str()).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Renames `from` into the live names in one transaction and drops the previous live tables,
    /// but only if no live offset of `topic` is ahead of `from`'s (else nothing changes and the
    /// partition that is behind is returned, [`Swap::LiveAhead`]) and no live account is at a
    /// later version than in `from` (else nothing changes, [`Swap::AccountsBehind`]). The check runs under the
    /// swap's locks (`BEGIN IMMEDIATE` on SQLite, `ACCESS EXCLUSIVE` on PostgreSQL), so the live
    /// projection cannot move between the check and the swap. Readers keep querying by name
    /// and see either the old or the new set, never a mix, and never an older one.
    pub(crate) async fn swap_in(&self, from: &Tables, tag: &str, topic: &str) -> StoreResult<Swap> {
        let live = from.resuffixed("");
        let retired = from.resuffixed(&format!("_retired_{tag}"));
        let mut tx = self.begin_write().await?;
        if self.backend == Backend::Postgres {
            // Take every lock up front, in the order the projector takes them: no deadlock.
            let mut names = live.all();
            names.extend(from.all());
            tx.execute(
                format!("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE", names.join(", ")).as_str(),
            )
            .await?;
        }
        let live_offsets = Self::load_offsets(&mut *tx, &live, topic).await?;
        let rebuilt = Self::load_offsets(&mut *tx, from, topic).await?;
        let mut behind: Vec<LiveAhead> = live_offsets
            .iter()
            .filter(|(p, live)| rebuilt.get(*p).is_none_or(|r| r < *live))
            .map(|(p, live)| LiveAhead {
                partition: *p,
                live: *live,
                rebuilt: rebuilt.get(p).copied(),
            })
            .collect();
        if let Some(ahead) = behind.pop() {
            tx.rollback().await?;
            return Ok(Swap::LiveAhead(ahead));
        }
        let back: Vec<(String, i64, Option<i64>)> = sqlx::query_as(&format!(
            "SELECT l.id, l.version, r.version FROM {} l LEFT JOIN {} r ON r.id = l.id
             WHERE r.id IS NULL OR r.version < l.version ORDER BY l.id LIMIT 5",
            live.state(),
            from.state()
        ))
        .fetch_all(&mut *tx)
        .await?;
        if !back.is_empty() {
            tx.rollback().await?;
            return Ok(Swap::AccountsBehind(back));
        }
        for ((old, new), gone) in live.all().into_iter().zip(from.all()).zip(retired.all()) {
            tx.execute(format!("ALTER TABLE {old} RENAME TO {gone}").as_str())
                .await?;
            tx.execute(format!("ALTER TABLE {new} RENAME TO {old}").as_str())
                .await?;
        }
        for gone in retired.all() {
            tx.execute(format!("DROP TABLE {gone}").as_str()).await?;
        }
        tx.commit().await?;
        self.give_back_free_pages().await;
        Ok(Swap::Done)
    }

    /// SQLite keeps the pages of dropped tables in its file: after a swap the file would stay
    /// the size of two read models. A file created with `auto_vacuum = INCREMENTAL` (every file
    /// this version creates) gives them back to the file system here; an older one keeps them
    /// until a `VACUUM` (logged). Best effort: a failure costs disk space, nothing else.
    async fn give_back_free_pages(&self) {
        if self.backend != Backend::Sqlite {
            return;
        }
        let mode: Result<i64, _> = sqlx::query_scalar("PRAGMA auto_vacuum")
            .fetch_one(&self.pool)
            .await;
        match mode {
            Ok(2) => {
                if let Err(e) = sqlx::query("PRAGMA incremental_vacuum")
                    .execute(&self.pool)
                    .await
                {
                    tracing::warn!(error = %e, "cannot give the retired tables' pages back");
                }
            }
            _ => tracing::info!(
                "the SQLite file keeps the retired tables' pages (created before auto_vacuum \
                 was set): run `sqlite3 FILE VACUUM` while the projection-service is stopped \
                 to shrink it"
            ),
        }
    }

    /// The stored next offsets of `topic`, per partition.
    pub(crate) async fn load_offsets<'e, E>(
        executor: E,
        tables: &Tables,
        topic: &str,
    ) -> StoreResult<HashMap<i32, i64>>
    where
        E: Executor<'e, Database = Any>,
    {
        let rows = sqlx::query(&format!(
            "SELECT \"partition\", next_offset FROM {} WHERE topic = $1",
            tables.offsets
        ))
        .bind(topic)
        .fetch_all(executor)
        .await?;
        rows.iter()
            .map(|r| Ok((get_partition(r, "partition")?, r.try_get("next_offset")?)))
            .collect()
    }

    /// The stored offsets, outside any transaction.
    pub async fn offsets(&self, tables: &Tables, topic: &str) -> StoreResult<HashMap<i32, i64>> {
        Self::load_offsets(&self.pool, tables, topic).await
    }

    /// Number of parked events (cheap check before loading any).
    pub(crate) async fn parked_count(
        tx: &mut Transaction<'static, Any>,
        tables: &Tables,
    ) -> StoreResult<i64> {
        Ok(
            sqlx::query_scalar(&format!("SELECT COUNT(*) FROM {}", tables.parked))
                .fetch_one(&mut **tx)
                .await?,
        )
    }

    /// Parked events of the given accounts.
    pub(crate) async fn load_parked(
        tx: &mut Transaction<'static, Any>,
        tables: &Tables,
        ids: &[&str],
    ) -> StoreResult<Vec<ParkedRow>> {
        let select = format!(
            "SELECT topic, \"partition\", source_offset, aggregate_id, version,
                    expected_version, event_id, reason, envelope FROM {}",
            tables.parked
        );
        let rows = fetch_by_ids(tx, &select, "aggregate_id", ids).await?;
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            out.push(ParkedRow {
                topic: row.try_get("topic")?,
                partition: get_partition(&row, "partition")?,
                offset: row.try_get("source_offset")?,
                aggregate_id: row.try_get("aggregate_id")?,
                version: get_u64(&row, "version")?,
                expected_version: get_u64(&row, "expected_version")?,
                event_id: row.try_get("event_id")?,
                reason: row.try_get("reason")?,
                envelope: row.try_get("envelope")?,
            });
        }
        Ok(out)
    }

    /// Writes a batch. Offsets are compare-and-set: if a partition's stored offset is not the
    /// expected one, nothing is written and [`StoreError::Conflict`] names the partition.
    pub(crate) async fn write_batch<M: ReadModel>(
        tx: &mut Transaction<'static, Any>,
        tables: &Tables,
        topic: &str,
        batch: &BatchWrite<M::Aggregate>,
    ) -> StoreResult<()> {
        M::write(tx, tables, &batch.applied, &batch.changed).await?;
        Self::insert_parked(tx, tables, &batch.parked).await?;
        Self::delete_unparked(tx, tables, &batch.unpark).await?;
        Self::advance_offsets(tx, tables, topic, &batch.offsets).await
    }

    async fn insert_parked(
        tx: &mut Transaction<'static, Any>,
        tables: &Tables,
        parked: &[ParkedRow],
    ) -> StoreResult<()> {
        for chunk in parked.chunks(ROWS_PER_INSERT) {
            let sql = format!(
                "INSERT INTO {} (topic, \"partition\", source_offset, aggregate_id, version,
                    expected_version, event_id, reason, envelope, parked_at) VALUES {}
                 ON CONFLICT (topic, \"partition\", source_offset) DO NOTHING",
                tables.parked,
                placeholders(chunk.len(), 10)
            );
            let now = format_ts(&Utc::now());
            let mut query = sqlx::query(&sql);
            for p in chunk {
                query = query
                    .bind(p.topic.as_str())
                    .bind(i64::from(p.partition))
                    .bind(p.offset)
                    .bind(p.aggregate_id.as_str())
                    .bind(to_i64(p.version))
                    .bind(to_i64(p.expected_version))
                    .bind(p.event_id.as_str())
                    .bind(p.reason.as_str())
                    .bind(p.envelope.as_str())
                    .bind(now.clone());
            }
            query.execute(&mut **tx).await?;
        }
        Ok(())
    }

    /// Deletes parked events that were applied or became duplicates.
    async fn delete_unparked(
        tx: &mut Transaction<'static, Any>,
        tables: &Tables,
        unpark: &[Unpark],
    ) -> StoreResult<()> {
        for Unpark {
            aggregate_id: id,
            through_version: version,
        } in unpark
        {
            sqlx::query(&format!(
                "DELETE FROM {} WHERE aggregate_id = $1 AND version <= $2",
                tables.parked
            ))
            .bind(id.as_str())
            .bind(to_i64(*version))
            .execute(&mut **tx)
            .await?;
        }
        Ok(())
    }

    /// Compare-and-sets each partition's next offset.
    async fn advance_offsets(
        tx: &mut Transaction<'static, Any>,
        tables: &Tables,
        topic: &str,
        offsets: &[OffsetAdvance],
    ) -> StoreResult<()> {
        for OffsetAdvance {
            partition,
            expected,
            next,
        } in offsets
        {
            let done = match expected {
                Some(expected) => sqlx::query(&format!(
                    "UPDATE {} SET next_offset = $1
                     WHERE topic = $2 AND \"partition\" = $3 AND next_offset = $4",
                    tables.offsets
                ))
                .bind(*next)
                .bind(topic)
                .bind(i64::from(*partition))
                .bind(*expected)
                .execute(&mut **tx)
                .await?
                .rows_affected(),
                None => sqlx::query(&format!(
                    "INSERT INTO {} (topic, \"partition\", next_offset) VALUES ($1, $2, $3)
                     ON CONFLICT (topic, \"partition\") DO NOTHING",
                    tables.offsets
                ))
                .bind(topic)
                .bind(i64::from(*partition))
                .bind(*next)
                .execute(&mut **tx)
                .await?
                .rows_affected(),
            };
            if done != 1 {
                return Err(StoreError::Conflict(format!(
                    "stored offset of partition {partition} is no longer {expected:?}"
                )));
            }
        }
        Ok(())
    }

    /// Sets offsets without a compare (the end of a rebuild).
    pub(crate) async fn force_offsets(
        &self,
        tables: &Tables,
        topic: &str,
        offsets: &[PartitionOffset],
    ) -> StoreResult<()> {
        let mut tx = self.begin_write().await?;
        for PartitionOffset { partition, next } in offsets {
            sqlx::query(&format!(
                "INSERT INTO {} (topic, \"partition\", next_offset) VALUES ($1, $2, $3)
                 ON CONFLICT (topic, \"partition\") DO UPDATE SET next_offset = excluded.next_offset",
                tables.offsets
            ))
            .bind(topic)
            .bind(i64::from(*partition))
            .bind(*next)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// The events of an account parked behind a version gap: how many, and since when (the
    /// oldest `parked_at`); `None` when none is.
    pub(crate) async fn parked_of(&self, id: &str) -> StoreResult<Option<(u64, String)>> {
        let (count, since): (i64, Option<String>) = sqlx::query_as(&format!(
            "SELECT COUNT(*), MIN(parked_at) FROM {PARKED_TABLE} WHERE aggregate_id = $1"
        ))
        .bind(id)
        .fetch_one(&self.reads)
        .await?;
        Ok((count > 0).then(|| (u64::try_from(count).unwrap_or(0), since.unwrap_or_default())))
    }

    /// Row counts of `tables` (the read model's state and history tables, parked events).
    pub async fn counts_of(&self, tables: &Tables) -> StoreResult<RowCounts> {
        let count = |table: &str| {
            let table = table.to_owned();
            let pool = self.reads.clone();
            async move {
                sqlx::query_scalar::<_, i64>(&format!("SELECT COUNT(*) FROM {table}"))
                    .fetch_one(&pool)
                    .await
            }
        };
        Ok(RowCounts {
            accounts: count(&tables.state()).await?,
            events: match tables.history {
                Some(history) => count(&tables.model(history)).await?,
                None => 0,
            },
            parked: count(&tables.parked).await?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_number_every_column() {
        assert_eq!(placeholders(2, 3), "($1,$2,$3),($4,$5,$6)");
    }

    #[test]
    fn search_patterns_take_wildcards_literally() {
        assert_eq!(contains_pattern("Ab"), "%ab%");
        assert_eq!(contains_pattern("50%_a\\"), "%50\\%\\_a\\\\%");
    }

    #[test]
    fn timestamps_order_as_nanoseconds() {
        let a: DateTime<Utc> = "2025-03-01T00:01:00.000000001Z".parse().expect("valid");
        let b: DateTime<Utc> = "2025-03-01T00:01:00.000000002Z".parse().expect("valid");
        assert!(ts_nanos(&a) < ts_nanos(&b));
        assert_eq!(format_ts(&a), "2025-03-01T00:01:00.000000001Z");
    }
}
