//! The bank's read model: the `accounts` table (one row per account, its current state),
//! `account_events` (every applied account event with the state after it, for history and
//! queries as of a version or a time), `transfers` (one row per transfer) and `transfer_steps`
//! (every event of a transfer's workflow, on the transfer or on its accounts), and the queries
//! of the account routes ([`crate::transfers`] has the transfer routes). The machinery folds the
//! events ([`shared::Bank`] is the aggregate); this module only stores and reads.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use shared::bank_account::{MAX_TEXT_BYTES, check_text};
use shared::transfer::{Transfer, TransferEvent};
use shared::{AccountStatus, Bank, BankAccount, BankEvent, Event};
use sqlx::any::AnyRow;
use sqlx::{Any, Row, Transaction};

use crate::db::{
    Database, ROWS_PER_INSERT, RowCounts, StoreError, StoreResult, Tables, contains_pattern,
    fetch_by_ids, fold_case, format_ts, get_u64, placeholders, to_i64, ts_nanos,
};
use crate::model::{Applied, ReadModel, Stored};

/// The state table's base name.
pub const ACCOUNTS: &str = "accounts";
/// The history table's base name.
pub const ACCOUNT_EVENTS: &str = "account_events";
/// The transfers table's base name.
pub const TRANSFERS: &str = "transfers";
/// The base name of the table of every transfer's steps.
pub const TRANSFER_STEPS: &str = "transfer_steps";

/// The bank account's read model (a marker: the machinery is generic over it).
#[derive(Debug, Clone, Copy, Default)]
pub struct Accounts;

impl ReadModel for Accounts {
    type Aggregate = Bank;
    const TABLES: &'static [&'static str] = &[ACCOUNTS, ACCOUNT_EVENTS, TRANSFERS, TRANSFER_STEPS];
    const HISTORY_TABLE: Option<&'static str> = Some(ACCOUNT_EVENTS);

    fn ddl(tables: &Tables, tag: &str) -> Vec<String> {
        let accounts = tables.model(ACCOUNTS);
        let events = tables.model(ACCOUNT_EVENTS);
        vec![
            format!(
                "CREATE TABLE {accounts} (
                    id TEXT PRIMARY KEY,
                    owner TEXT NOT NULL,
                    currency TEXT NOT NULL,
                    balance_minor BIGINT NOT NULL,
                    status TEXT NOT NULL,
                    version BIGINT NOT NULL,
                    transaction_count BIGINT NOT NULL,
                    opened_at TEXT NOT NULL,
                    updated_at TEXT NOT NULL,
                    transfers_out TEXT NOT NULL DEFAULT '',
                    search TEXT
                )"
            ),
            format!("CREATE INDEX ix_accounts_owner_{tag} ON {accounts} (owner, id)"),
            format!("CREATE INDEX ix_accounts_status_{tag} ON {accounts} (status, id)"),
            format!(
                "CREATE TABLE {events} (
                    aggregate_id TEXT NOT NULL,
                    version BIGINT NOT NULL,
                    event_id TEXT NOT NULL,
                    event_type TEXT NOT NULL,
                    \"timestamp\" TEXT NOT NULL,
                    timestamp_ns BIGINT NOT NULL,
                    data TEXT NOT NULL,
                    envelope TEXT NOT NULL,
                    balance_minor BIGINT NOT NULL,
                    status TEXT NOT NULL,
                    transaction_count BIGINT NOT NULL,
                    source_partition BIGINT NOT NULL,
                    source_offset BIGINT NOT NULL,
                    PRIMARY KEY (aggregate_id, version)
                )"
            ),
            format!("CREATE INDEX ix_events_time_{tag} ON {events} (aggregate_id, timestamp_ns)"),
        ]
        .into_iter()
        .chain(transfer_ddl(tables, tag))
        .collect()
    }

    fn upgrades(tables: &Tables) -> Vec<(i64, Vec<String>)> {
        let accounts = tables.model(ACCOUNTS);
        let mut transfers = vec![format!(
            "ALTER TABLE {accounts} ADD COLUMN transfers_out TEXT NOT NULL DEFAULT ''"
        )];
        transfers.extend(transfer_ddl(tables, "v3"));
        // The search text, folded in Rust so that both databases match the same letters (an
        // account written before keeps the old matching until it changes or is rebuilt).
        let search = vec![format!("ALTER TABLE {accounts} ADD COLUMN search TEXT")];
        vec![(3, transfers), (4, search)]
    }

    /// The owner follows the command rules ([`check_text`]); the currency may not hold a
    /// control character or exceed the same length. The `data` and envelope columns are JSON
    /// text, in which a NUL is escaped.
    fn check_storable(_aggregate_id: &str, event: &BankEvent) -> Result<(), String> {
        let ids = match event {
            BankEvent::Transfer(TransferEvent::TransferStarted(start)) => {
                vec![("from", &start.from), ("to", &start.to)]
            }
            BankEvent::Account(
                Event::TransferDebited(leg)
                | Event::TransferCredited(leg)
                | Event::TransferSettled(leg)
                | Event::TransferRefunded(leg),
            ) => vec![
                ("transfer_id", &leg.transfer_id),
                ("from", &leg.from),
                ("to", &leg.to),
            ],
            _ => Vec::new(),
        };
        for (field, value) in ids {
            check_text(field, value)?;
        }
        let currency = match event {
            BankEvent::Transfer(
                TransferEvent::TransferCompleted(end) | TransferEvent::TransferFailed(end),
            ) => end.currency.as_deref(),
            BankEvent::Transfer(TransferEvent::TransferStarted(start)) => start.currency.as_deref(),
            BankEvent::Account(
                Event::TransferDebited(leg)
                | Event::TransferCredited(leg)
                | Event::TransferSettled(leg)
                | Event::TransferRefunded(leg),
            ) => leg.currency.as_deref(),
            _ => None,
        };
        if let Some(currency) = currency
            && !shared::bank_account::is_currency_code(currency)
        {
            return Err(format!("currency {currency:?} is not an ISO 4217 code"));
        }
        if let BankEvent::Account(Event::AccountOpened {
            owner, currency, ..
        }) = event
        {
            check_text("owner", owner)?;
            if currency.len() > MAX_TEXT_BYTES || currency.chars().any(char::is_control) {
                return Err(format!(
                    "currency {currency:?} holds a control character or is longer than \
                     {MAX_TEXT_BYTES} bytes"
                ));
            }
        }
        Ok(())
    }

    async fn load(
        tx: &mut Transaction<'static, Any>,
        tables: &Tables,
        ids: &[&str],
    ) -> StoreResult<HashMap<String, Stored<Bank>>> {
        let select = format!("SELECT {ACCOUNT_COLUMNS} FROM {}", tables.model(ACCOUNTS));
        let rows = fetch_by_ids(tx, &select, "id", ids).await?;
        let mut out = HashMap::with_capacity(rows.len());
        for row in rows {
            let account = stored_account(&row)?;
            out.insert(account.id.clone(), account);
        }
        let select = format!(
            "SELECT {} FROM {}",
            crate::transfers::TRANSFER_COLUMNS,
            tables.model(TRANSFERS)
        );
        for row in fetch_by_ids(tx, &select, "id", ids).await? {
            let transfer = crate::transfers::stored_transfer(&row)?;
            out.insert(transfer.id.clone(), transfer);
        }
        Ok(out)
    }

    async fn write(
        tx: &mut Transaction<'static, Any>,
        tables: &Tables,
        applied: &[Applied<Bank>],
        changed: &[Stored<Bank>],
    ) -> StoreResult<()> {
        let account_events: Vec<(&Applied<Bank>, &BankAccount)> = applied
            .iter()
            .filter_map(|e| Some((e, e.after.account()?)))
            .collect();
        insert_events(tx, tables, &account_events).await?;
        crate::transfers::insert_steps(tx, tables, applied).await?;
        let accounts: Vec<(&Stored<Bank>, &BankAccount)> = changed
            .iter()
            .filter_map(|s| Some((s, s.state.account()?)))
            .collect();
        upsert_accounts(tx, tables, &accounts).await?;
        let transfers: Vec<(&Stored<Bank>, &Transfer)> = changed
            .iter()
            .filter_map(|s| Some((s, s.state.transfer()?)))
            .collect();
        crate::transfers::upsert_transfers(tx, tables, &transfers).await
    }

    fn routes() -> axum::Router<crate::http::AppState> {
        crate::http::account_routes().merge(crate::transfers::routes())
    }

    fn public_routes() -> axum::Router<crate::http::AppState> {
        crate::http::explorer_routes()
    }
}

async fn insert_events(
    tx: &mut Transaction<'static, Any>,
    tables: &Tables,
    events: &[(&Applied<Bank>, &BankAccount)],
) -> StoreResult<()> {
    for chunk in events.chunks(ROWS_PER_INSERT) {
        let sql = format!(
            "INSERT INTO {} (aggregate_id, version, event_id, event_type, \"timestamp\",
                timestamp_ns, data, envelope, balance_minor, status, transaction_count,
                source_partition, source_offset) VALUES {}",
            tables.model(ACCOUNT_EVENTS),
            placeholders(chunk.len(), 13)
        );
        let mut query = sqlx::query(&sql);
        for (e, after) in chunk {
            query = query
                .bind(e.aggregate_id.as_str())
                .bind(to_i64(e.version))
                .bind(e.event_id.as_str())
                .bind(e.event_type.as_str())
                .bind(format_ts(&e.timestamp))
                .bind(ts_nanos(&e.timestamp))
                .bind(e.data.as_str())
                .bind(e.envelope.as_str())
                .bind(after.balance_minor)
                .bind(after.status.as_str())
                .bind(to_i64(after.transaction_count))
                .bind(i64::from(e.source_partition))
                .bind(e.source_offset);
        }
        query.execute(&mut **tx).await?;
    }
    Ok(())
}

async fn upsert_accounts(
    tx: &mut Transaction<'static, Any>,
    tables: &Tables,
    accounts: &[(&Stored<Bank>, &BankAccount)],
) -> StoreResult<()> {
    for chunk in accounts.chunks(ROWS_PER_INSERT) {
        let sql = format!(
            "INSERT INTO {} ({ACCOUNT_COLUMNS}, search) VALUES {}
             ON CONFLICT (id) DO UPDATE SET owner = excluded.owner, search = excluded.search,
                currency = excluded.currency, balance_minor = excluded.balance_minor,
                status = excluded.status, version = excluded.version,
                transaction_count = excluded.transaction_count,
                opened_at = excluded.opened_at, updated_at = excluded.updated_at,
                transfers_out = excluded.transfers_out",
            tables.model(ACCOUNTS),
            placeholders(chunk.len(), ACCOUNT_COLUMN_COUNT + 1)
        );
        let mut query = sqlx::query(&sql);
        for (a, state) in chunk {
            let transfers_out = if state.transfers_out.is_empty() {
                String::new()
            } else {
                serde_json::to_string(&state.transfers_out).unwrap_or_default()
            };
            query = query
                .bind(a.id.as_str())
                .bind(state.owner.as_str())
                .bind(state.currency.as_str())
                .bind(state.balance_minor)
                .bind(state.status.as_str())
                .bind(to_i64(a.version))
                .bind(to_i64(state.transaction_count))
                .bind(a.first_at.as_str())
                .bind(a.updated_at.as_str())
                .bind(transfers_out)
                .bind(search_text(&a.id, &state.owner));
        }
        query.execute(&mut **tx).await?;
    }
    Ok(())
}

/// The tables of the transfers (created with the others, or by upgrade 3).
fn transfer_ddl(tables: &Tables, tag: &str) -> Vec<String> {
    let transfers = tables.model(TRANSFERS);
    let steps = tables.model(TRANSFER_STEPS);
    vec![
        format!(
            "CREATE TABLE {transfers} (
                id TEXT PRIMARY KEY,
                from_account TEXT NOT NULL,
                to_account TEXT NOT NULL,
                amount_minor BIGINT NOT NULL,
                currency TEXT,
                status TEXT NOT NULL,
                reason TEXT,
                version BIGINT NOT NULL,
                started_at TEXT NOT NULL,
                started_ns BIGINT NOT NULL,
                updated_at TEXT NOT NULL
            )"
        ),
        format!("CREATE INDEX ix_transfers_from_{tag} ON {transfers} (from_account, started_ns)"),
        format!("CREATE INDEX ix_transfers_to_{tag} ON {transfers} (to_account, started_ns)"),
        format!(
            "CREATE TABLE {steps} (
                aggregate_id TEXT NOT NULL,
                version BIGINT NOT NULL,
                transfer_id TEXT NOT NULL,
                event_type TEXT NOT NULL,
                \"timestamp\" TEXT NOT NULL,
                data TEXT NOT NULL,
                PRIMARY KEY (aggregate_id, version)
            )"
        ),
        format!("CREATE INDEX ix_transfer_steps_{tag} ON {steps} (transfer_id)"),
    ]
}

/// An account as of some point, as the HTTP API shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct AccountView {
    /// Account id.
    pub id: String,
    /// Holder.
    pub owner: String,
    /// ISO 4217.
    pub currency: String,
    /// Minor units.
    pub balance_minor: i64,
    /// `active` or `closed`.
    pub status: String,
    /// Aggregate version.
    pub version: u64,
    /// Deposits plus withdrawals.
    pub transaction_count: u64,
    /// Transfers out of the account in flight (the current state only).
    pub transfers_pending: Option<u64>,
    /// RFC 3339.
    pub opened_at: String,
    /// RFC 3339.
    pub updated_at: String,
}

/// Filters and cursor of `GET /accounts`.
#[derive(Debug, Clone, Default)]
pub(crate) struct AccountFilter {
    /// `active` / `closed`.
    pub status: Option<String>,
    /// Exact owner.
    pub owner: Option<String>,
    /// Only ids greater than this (the previous page's `next`).
    pub after: Option<String>,
    /// Search: only accounts whose id or owner contains this text, ignoring case (Unicode, the same on SQLite and PostgreSQL).
    pub q: Option<String>,
    /// Page size.
    pub limit: u32,
}

/// The columns of an accounts row, in the order every query selects and inserts them.
const ACCOUNT_COLUMNS: &str = "id, owner, currency, balance_minor, status, version, \
     transaction_count, opened_at, updated_at, transfers_out";

/// How many [`ACCOUNT_COLUMNS`] there are.
const ACCOUNT_COLUMN_COUNT: usize = 10;

/// What `?q=` searches: the id and the owner, case-folded by [`fold_case`] the way the query
/// text is, one per line (neither may hold a line break).
fn search_text(id: &str, owner: &str) -> String {
    format!("{}\n{}", fold_case(id), fold_case(owner))
}

/// A stored status text as the domain's status; an unknown text is an error.
fn status_from(text: &str) -> StoreResult<AccountStatus> {
    [
        AccountStatus::New,
        AccountStatus::Active,
        AccountStatus::Closed,
    ]
    .into_iter()
    .find(|s| s.as_str() == text)
    .ok_or_else(|| StoreError::Invalid(format!("unknown account status `{text}`")))
}

/// An account as of one of its events, with the columns named as in [`ACCOUNT_COLUMNS`].
const HISTORY_SELECT: &str = "SELECT e.aggregate_id AS id, a.owner AS owner,
        a.currency AS currency, e.balance_minor AS balance_minor, e.status AS status,
        e.version AS version, e.transaction_count AS transaction_count,
        a.opened_at AS opened_at, e.\"timestamp\" AS updated_at
     FROM account_events e JOIN accounts a ON a.id = e.aggregate_id";

/// An accounts row ([`ACCOUNT_COLUMNS`]) as the projector's state.
fn stored_account(row: &AnyRow) -> StoreResult<Stored<Bank>> {
    let status: String = row.try_get("status")?;
    let version = get_u64(row, "version")?;
    let transfers_out: String = row.try_get("transfers_out")?;
    let transfers_out = if transfers_out.is_empty() {
        Default::default()
    } else {
        serde_json::from_str(&transfers_out)
            .map_err(|e| StoreError::Invalid(format!("unreadable transfers_out: {e}")))?
    };
    Ok(Stored {
        id: row.try_get("id")?,
        version,
        state: Bank::Account(BankAccount {
            owner: row.try_get::<String, _>("owner")?.into(),
            currency: row.try_get::<String, _>("currency")?.into(),
            balance_minor: row.try_get("balance_minor")?,
            status: status_from(&status)?,
            version,
            transaction_count: get_u64(row, "transaction_count")?,
            transfers_out,
        }),
        first_at: row.try_get("opened_at")?,
        updated_at: row.try_get("updated_at")?,
    })
}

/// An accounts row ([`ACCOUNT_COLUMNS`], or [`HISTORY_SELECT`]) as the API shows it.
fn account_view(row: &AnyRow) -> StoreResult<AccountView> {
    let status: String = row.try_get("status")?;
    Ok(AccountView {
        id: row.try_get("id")?,
        owner: row.try_get("owner")?,
        currency: row.try_get("currency")?,
        balance_minor: row.try_get("balance_minor")?,
        status: status_from(&status)?.as_str().to_owned(),
        version: get_u64(row, "version")?,
        transaction_count: get_u64(row, "transaction_count")?,
        transfers_pending: match row.try_get::<String, _>("transfers_out") {
            Ok(text) if text.is_empty() => Some(0),
            Ok(text) => Some(
                serde_json::from_str::<HashMap<String, i64>>(&text)
                    .map_err(|e| StoreError::Invalid(format!("unreadable transfers_out: {e}")))?
                    .len() as u64,
            ),
            Err(_) => None,
        },
        opened_at: row.try_get("opened_at")?,
        updated_at: row.try_get("updated_at")?,
    })
}

/// The bank account's tables as the default: what `projection-service` serves.
impl Tables {
    /// The live tables of the bank account's read model.
    pub fn live() -> Self {
        Tables::live_of::<Accounts>()
    }
}

/// The account routes' queries (on the API's pool, the live tables), and the default read
/// model's connection.
impl Database {
    /// Connects to the bank account's read model (see [`Database::connect_for`]).
    pub async fn connect(url: &str) -> StoreResult<Database> {
        Database::connect_for::<Accounts>(url).await
    }

    /// Row counts of the bank account's live tables.
    pub async fn counts(&self) -> StoreResult<RowCounts> {
        self.counts_of(&Tables::live()).await
    }

    /// The current state of an account.
    pub(crate) async fn account(&self, id: &str) -> StoreResult<Option<AccountView>> {
        let row = sqlx::query(&format!(
            "SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(self.reads())
        .await?;
        row.map(|r| account_view(&r)).transpose()
    }

    /// The state of an account right after version `version`.
    pub(crate) async fn account_at_version(
        &self,
        id: &str,
        version: u64,
    ) -> StoreResult<Option<AccountView>> {
        let row = sqlx::query(&format!(
            "{HISTORY_SELECT} WHERE e.aggregate_id = $1 AND e.version = $2"
        ))
        .bind(id)
        .bind(to_i64(version))
        .fetch_optional(self.reads())
        .await?;
        row.map(|r| account_view(&r)).transpose()
    }

    /// The state of an account after the highest version whose timestamp is at or before `at`.
    pub(crate) async fn account_as_of(
        &self,
        id: &str,
        at: &DateTime<Utc>,
    ) -> StoreResult<Option<AccountView>> {
        let row = sqlx::query(&format!(
            "{HISTORY_SELECT} WHERE e.aggregate_id = $1 AND e.timestamp_ns <= $2
             ORDER BY e.version DESC LIMIT 1"
        ))
        .bind(id)
        .bind(ts_nanos(at))
        .fetch_optional(self.reads())
        .await?;
        row.map(|r| account_view(&r)).transpose()
    }

    /// A page of accounts ordered by id.
    pub(crate) async fn list_accounts(
        &self,
        filter: &AccountFilter,
    ) -> StoreResult<Vec<AccountView>> {
        let mut conditions = Vec::new();
        let mut n = 0;
        let mut next = || {
            n += 1;
            format!("${n}")
        };
        if filter.status.is_some() {
            conditions.push(format!("status = {}", next()));
        }
        if filter.owner.is_some() {
            conditions.push(format!("owner = {}", next()));
        }
        if filter.after.is_some() {
            conditions.push(format!("id > {}", next()));
        }
        // Unicode case-insensitive on both databases: the text is folded here and the column
        // when written ([`search_text`]); rows written before upgrade 4 have none and are
        // matched by the database's LOWER as before (ASCII-only on SQLite).
        let pattern = filter.q.as_deref().map(contains_pattern);
        if pattern.is_some() {
            let p = next();
            conditions.push(format!(
                "(search LIKE {p} ESCAPE '\\' OR (search IS NULL AND \
                 (LOWER(id) LIKE {p} ESCAPE '\\' OR LOWER(owner) LIKE {p} ESCAPE '\\')))"
            ));
        }
        let limit = next();
        let sql = format!(
            "SELECT {ACCOUNT_COLUMNS} FROM accounts {} ORDER BY id LIMIT {limit}",
            if conditions.is_empty() {
                String::new()
            } else {
                format!("WHERE {}", conditions.join(" AND "))
            }
        );
        let mut query = sqlx::query(&sql);
        for value in [&filter.status, &filter.owner, &filter.after, &pattern]
            .into_iter()
            .flatten()
        {
            query = query.bind(value.as_str());
        }
        let rows = query
            .bind(i64::from(filter.limit))
            .fetch_all(self.reads())
            .await?;
        rows.iter().map(account_view).collect()
    }

    /// An account's events (envelope JSON text at the current schema version) after
    /// `after_version`, oldest first, at most `limit`.
    pub(crate) async fn events(
        &self,
        id: &str,
        after_version: u64,
        limit: u32,
    ) -> StoreResult<Vec<String>> {
        Ok(sqlx::query_scalar(
            "SELECT envelope FROM account_events WHERE aggregate_id = $1 AND version > $2
             ORDER BY version LIMIT $3",
        )
        .bind(id)
        .bind(i64::try_from(after_version).unwrap_or(i64::MAX))
        .bind(i64::from(limit))
        .fetch_all(self.reads())
        .await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_values_out_of_range_are_errors() {
        assert!(matches!(status_from("frozen"), Err(StoreError::Invalid(_))));
        assert_eq!(status_from("closed").ok(), Some(AccountStatus::Closed));
        assert_eq!(
            ACCOUNT_COLUMNS.split(',').count(),
            ACCOUNT_COLUMN_COUNT,
            "the count follows the list"
        );
    }
}

/// The planner's rules, with the bank account's read model.
#[cfg(test)]
mod plan_tests {
    use chrono::Utc;
    use shared::Event;
    use shared::envelope::Metadata;

    use std::collections::HashMap;

    use shared::dlq::DeadLetterCode;
    use shared::kafka::canonical_partition;
    use shared::{DecodeError, EventEnvelope};

    use super::Accounts;
    use crate::db::Unpark;
    use crate::model::Stored;
    use crate::plan::{Incoming, plan_batch};

    fn msg(offset: i64, id: &str, version: u64, event: &Event) -> Incoming {
        Incoming {
            partition: 0,
            offset,
            key: Some(id.as_bytes().to_vec()),
            payload: Some(b"{}".to_vec()),
            headers: None,
            decoded: Ok(EventEnvelope::new(
                id,
                version,
                event,
                Utc::now(),
                Metadata::new(),
            )),
        }
    }

    fn opened() -> Event {
        Event::AccountOpened {
            owner: "Ann".into(),
            currency: "EUR".into(),
            initial_balance_minor: 100,
        }
    }

    fn deposit(amount_minor: i64) -> Event {
        Event::MoneyDeposited { amount_minor }
    }

    #[test]
    fn applies_in_order_and_skips_duplicates() {
        let plan = plan_batch::<Accounts>(
            "t",
            1,
            &[
                msg(0, "a", 1, &opened()),
                msg(1, "a", 2, &deposit(50)),
                msg(2, "a", 2, &deposit(50)),
                msg(3, "a", 1, &opened()),
            ],
            HashMap::new(),
            vec![],
        );
        assert_eq!((plan.applied, plan.duplicates), (2, 2));
        assert_eq!(plan.write.changed.len(), 1);
        assert_eq!(
            plan.write.changed[0].state.account().unwrap().balance_minor,
            150
        );
        assert_eq!(
            plan.write.applied[1].after.account().unwrap().balance_minor,
            150
        );
        assert_eq!(plan.versions["a"], 2);
    }

    #[test]
    fn a_gap_is_parked_then_applied_when_the_missing_version_arrives() {
        let plan = plan_batch::<Accounts>(
            "t",
            1,
            &[
                msg(0, "a", 1, &opened()),
                msg(1, "a", 3, &deposit(7)),
                msg(2, "a", 4, &deposit(8)),
            ],
            HashMap::new(),
            vec![],
        );
        assert_eq!((plan.applied, plan.parked), (1, 2));
        assert_eq!(plan.write.parked.len(), 2);
        let stored = Stored {
            first_at: "x".into(),
            updated_at: "x".into(),
            ..plan.write.changed[0].clone()
        };
        let accounts = HashMap::from([("a".to_string(), stored)]);
        let later = plan_batch::<Accounts>(
            "t",
            1,
            &[msg(3, "a", 2, &deposit(1))],
            accounts,
            plan.write.parked,
        );
        assert_eq!((later.applied, later.unparked), (3, 2));
        assert_eq!(
            later.write.changed[0]
                .state
                .account()
                .unwrap()
                .balance_minor,
            116
        );
        assert_eq!(
            later.write.unpark,
            vec![Unpark {
                aggregate_id: "a".into(),
                through_version: 4
            }]
        );
        assert!(later.write.parked.is_empty());
    }

    // Regression: on PostgreSQL an id with a NUL byte or a few KB of owner failed the whole
    // batch as a fatal store error, and the service crash-looped on it.
    #[test]
    fn text_the_read_model_cannot_store_is_dead_lettered() {
        let long_owner = Event::AccountOpened {
            owner: "x".repeat(3000),
            currency: "EUR".into(),
            initial_balance_minor: 0,
        };
        let nul_currency = Event::AccountOpened {
            owner: "Ann".into(),
            currency: "EU\u{0}R".into(),
            initial_balance_minor: 0,
        };
        let plan = plan_batch::<Accounts>(
            "t",
            1,
            &[
                msg(0, "nul\u{0}id", 1, &opened()),
                msg(1, "b", 1, &long_owner),
                msg(2, "d", 1, &nul_currency),
                msg(3, "c", 1, &opened()),
            ],
            HashMap::new(),
            vec![],
        );
        let codes: Vec<DeadLetterCode> = plan.dead_letters.iter().map(|d| d.code).collect();
        assert_eq!(codes, [DeadLetterCode::Unstorable; 3]);
        assert_eq!(plan.applied, 1);
    }

    #[test]
    fn inapplicable_and_undecodable_events_are_dead_lettered() {
        let mut bad = msg(1, "b", 1, &opened());
        bad.decoded = Err(DecodeError::UnknownFormat(b'x'));
        let plan = plan_batch::<Accounts>(
            "t",
            1,
            &[msg(0, "a", 1, &deposit(5)), bad, msg(2, "c", 1, &opened())],
            HashMap::new(),
            vec![],
        );
        let codes: Vec<DeadLetterCode> = plan.dead_letters.iter().map(|d| d.code).collect();
        assert_eq!(
            codes,
            [DeadLetterCode::NotApplicable, DeadLetterCode::UnknownFormat]
        );
        assert_eq!(plan.applied, 1);
        assert_eq!(plan.write.changed.len(), 1);
        assert_eq!(plan.write.changed[0].id, "c");
    }

    #[test]
    fn an_event_on_another_partition_than_its_account_is_dead_lettered() {
        let home = canonical_partition(b"a", 2);
        let mut stray = msg(0, "a", 1, &opened());
        stray.partition = 1 - home;
        let mut placed = msg(1, "a", 1, &opened());
        placed.partition = home;
        let plan = plan_batch::<Accounts>("t", 2, &[stray, placed], HashMap::new(), Vec::new());
        let codes: Vec<DeadLetterCode> = plan.dead_letters.iter().map(|d| d.code).collect();
        assert_eq!(codes, [DeadLetterCode::Misplaced]);
        assert_eq!(plan.dead_letters[0].partition, 1 - home);
        assert_eq!(
            plan.applied, 1,
            "the event on its account's partition is applied"
        );
    }
}
