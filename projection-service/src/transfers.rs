//! The transfers of the bank's read model: their rows and steps (written by
//! [`crate::accounts::Accounts`] in the batch's transaction) and the routes `GET /transfers/{id}`
//! and `GET /transfers?account=`.

use axum::Json;
use axum::Router;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::routing::get;
use serde::{Deserialize, Serialize};
use shared::Bank;
use shared::money::{format_minor, minor_digits};
use shared::transfer::{Transfer, TransferStatus};
use sqlx::any::AnyRow;
use sqlx::{Any, Row, Transaction};
use utoipa::ToSchema;

use crate::accounts::{TRANSFER_STEPS, TRANSFERS};
use crate::db::{
    Database, ROWS_PER_INSERT, StoreError, StoreResult, Tables, get_u64, placeholders, to_i64,
};
use crate::http::{ApiError, AppState, DEFAULT_LIMIT, MAX_LIMIT, number_param};
use crate::model::{Applied, Stored};

/// The columns of a transfers row, in the order every query selects and inserts them.
pub(crate) const TRANSFER_COLUMNS: &str = "id, from_account, to_account, amount_minor, currency, \
     status, reason, version, started_at, started_ns, updated_at";

const TRANSFER_COLUMN_COUNT: usize = 11;

/// A stored status text as the domain's; an unknown text is an error.
fn status_from(text: &str) -> StoreResult<TransferStatus> {
    [
        TransferStatus::Pending,
        TransferStatus::Completed,
        TransferStatus::Failed,
    ]
    .into_iter()
    .find(|s| s.as_str() == text)
    .ok_or_else(|| StoreError::Invalid(format!("unknown transfer status `{text}`")))
}

/// A transfers row as the projector's state.
pub(crate) fn stored_transfer(row: &AnyRow) -> StoreResult<Stored<Bank>> {
    let status: String = row.try_get("status")?;
    Ok(Stored {
        id: row.try_get("id")?,
        version: get_u64(row, "version")?,
        state: Bank::Transfer {
            transfer: Transfer {
                status: status_from(&status)?,
                from: row.try_get("from_account")?,
                to: row.try_get("to_account")?,
                amount_minor: row.try_get("amount_minor")?,
                currency: row.try_get("currency")?,
                reason: row.try_get("reason")?,
            },
        },
        first_at: row.try_get("started_at")?,
        updated_at: row.try_get("updated_at")?,
    })
}

/// Nanoseconds of an RFC 3339 time the machinery stored (0 when unreadable: it only orders).
fn nanos_of(rfc3339: &str) -> i64 {
    chrono::DateTime::parse_from_rfc3339(rfc3339)
        .ok()
        .and_then(|t| t.timestamp_nanos_opt())
        .unwrap_or(0)
}

/// Writes the changed transfers.
pub(crate) async fn upsert_transfers(
    tx: &mut Transaction<'static, Any>,
    tables: &Tables,
    transfers: &[(&Stored<Bank>, &Transfer)],
) -> StoreResult<()> {
    for chunk in transfers.chunks(ROWS_PER_INSERT) {
        let sql = format!(
            "INSERT INTO {} ({TRANSFER_COLUMNS}) VALUES {}
             ON CONFLICT (id) DO UPDATE SET currency = excluded.currency,
                status = excluded.status, reason = excluded.reason,
                version = excluded.version, updated_at = excluded.updated_at",
            tables.model(TRANSFERS),
            placeholders(chunk.len(), TRANSFER_COLUMN_COUNT)
        );
        let mut query = sqlx::query(&sql);
        for (stored, t) in chunk {
            query = query
                .bind(stored.id.as_str())
                .bind(t.from.as_str())
                .bind(t.to.as_str())
                .bind(t.amount_minor)
                .bind(t.currency.clone())
                .bind(t.status.as_str())
                .bind(t.reason.clone())
                .bind(to_i64(stored.version))
                .bind(stored.first_at.as_str())
                .bind(nanos_of(&stored.first_at))
                .bind(stored.updated_at.as_str());
        }
        query.execute(&mut **tx).await?;
    }
    Ok(())
}

/// The transfer an applied event is a step of, if it is one.
fn transfer_of(event: &Applied<Bank>) -> Option<String> {
    if event.after.transfer().is_some() {
        return Some(event.aggregate_id.clone());
    }
    if !event.event_type.starts_with("Transfer") {
        return None;
    }
    let data: serde_json::Value = serde_json::from_str(&event.data).ok()?;
    Some(data.get("transfer_id")?.as_str()?.to_owned())
}

/// Records the applied events that are steps of a transfer (the transfer's own and its
/// accounts' transfer events).
pub(crate) async fn insert_steps(
    tx: &mut Transaction<'static, Any>,
    tables: &Tables,
    applied: &[Applied<Bank>],
) -> StoreResult<()> {
    let steps: Vec<(&Applied<Bank>, String)> = applied
        .iter()
        .filter_map(|e| Some((e, transfer_of(e)?)))
        .collect();
    for chunk in steps.chunks(ROWS_PER_INSERT) {
        let sql = format!(
            "INSERT INTO {} (aggregate_id, version, transfer_id, event_type, \"timestamp\", data)
             VALUES {}",
            tables.model(TRANSFER_STEPS),
            placeholders(chunk.len(), 6)
        );
        let mut query = sqlx::query(&sql);
        for (e, transfer_id) in chunk {
            query = query
                .bind(e.aggregate_id.as_str())
                .bind(to_i64(e.version))
                .bind(transfer_id.as_str())
                .bind(e.event_type.as_str())
                .bind(crate::db::format_ts(&e.timestamp))
                .bind(e.data.as_str());
        }
        query.execute(&mut **tx).await?;
    }
    Ok(())
}

/// The transfer routes (behind `accounts:read`).
pub(crate) fn routes() -> Router<AppState> {
    Router::new()
        .route("/transfers", get(list_transfers))
        .route("/transfers/{id}", get(get_transfer))
}

/// A transfer as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct TransferJson {
    /// The transfer's id (chosen by the client).
    pub transfer_id: String,
    /// The source account.
    pub from: String,
    /// The target account.
    pub to: String,
    /// Minor units of `currency`.
    pub amount_minor: i64,
    /// Decimal string with the currency's minor digits, once the currency is known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub amount: Option<String>,
    /// The currency the client named, else the source's once debited; `null` before that and
    /// when the source was not found.
    pub currency: Option<String>,
    /// `pending`, `completed` or `failed`.
    pub status: String,
    /// When failed, a stable code: `AccountNotFound`, `AccountClosed`, `InsufficientFunds`,
    /// `CurrencyMismatch` (or `InvalidAmount`, `AggregateUnavailable`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// RFC 3339: when it was started.
    pub started_at: String,
    /// RFC 3339: when it ended (absent while pending).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<String>,
    /// Its steps in time order (`GET /transfers/{id}` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steps: Option<Vec<StepJson>>,
}

/// One step of a transfer: an event on the transfer or on one of its accounts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct StepJson {
    /// The aggregate the event belongs to (the transfer or an account).
    pub aggregate_id: String,
    /// Its version there.
    pub version: u64,
    /// `TransferStarted`, `TransferDebited`, `TransferCredited`, `TransferSettled`,
    /// `TransferRefunded`, `TransferCompleted` or `TransferFailed`.
    pub event_type: String,
    /// RFC 3339.
    pub timestamp: String,
    /// The event's data.
    #[schema(value_type = Object)]
    pub data: serde_json::Value,
}

fn transfer_json(row: &AnyRow) -> StoreResult<TransferJson> {
    let status = status_from(&row.try_get::<String, _>("status")?)?;
    let currency: Option<String> = row.try_get("currency")?;
    let amount_minor: i64 = row.try_get("amount_minor")?;
    Ok(TransferJson {
        transfer_id: row.try_get("id")?,
        from: row.try_get("from_account")?,
        to: row.try_get("to_account")?,
        amount: currency
            .as_deref()
            .map(|c| format_minor(amount_minor, minor_digits(c))),
        amount_minor,
        currency,
        status: status.as_str().to_owned(),
        reason: row.try_get("reason")?,
        started_at: row.try_get("started_at")?,
        finished_at: if status.is_final() {
            Some(row.try_get("updated_at")?)
        } else {
            None
        },
        steps: None,
    })
}

/// The transfer queries (on the API's pool, the live tables).
impl Database {
    /// One transfer with its steps.
    pub(crate) async fn transfer(&self, id: &str) -> StoreResult<Option<TransferJson>> {
        let row = sqlx::query(&format!(
            "SELECT {TRANSFER_COLUMNS} FROM {TRANSFERS} WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(self.reads())
        .await?;
        let Some(mut transfer) = row.map(|r| transfer_json(&r)).transpose()? else {
            return Ok(None);
        };
        let rows = sqlx::query(&format!(
            "SELECT aggregate_id, version, event_type, \"timestamp\", data FROM {TRANSFER_STEPS}
             WHERE transfer_id = $1"
        ))
        .bind(id)
        .fetch_all(self.reads())
        .await?;
        let mut steps = rows
            .iter()
            .map(|r| {
                let data: String = r.try_get("data")?;
                Ok(StepJson {
                    aggregate_id: r.try_get("aggregate_id")?,
                    version: get_u64(r, "version")?,
                    event_type: r.try_get("event_type")?,
                    timestamp: r.try_get("timestamp")?,
                    data: serde_json::from_str(&data).unwrap_or(serde_json::Value::Null),
                })
            })
            .collect::<StoreResult<Vec<_>>>()?;
        // Time order; equal times (steps decided in one millisecond) in the workflow's order.
        steps.sort_by_key(|s| (nanos_of(&s.timestamp), step_rank(&s.event_type)));
        transfer.steps = Some(steps);
        Ok(Some(transfer))
    }

    /// A page of transfers, newest first: an account's (from or to it), or all of them.
    pub(crate) async fn list_transfers(
        &self,
        account: Option<&str>,
        before: Option<(i64, &str)>,
        limit: u32,
    ) -> StoreResult<Vec<(TransferJson, i64)>> {
        let mut conditions = Vec::new();
        let mut n = 0;
        let mut next = || {
            n += 1;
            format!("${n}")
        };
        if account.is_some() {
            let p = next();
            conditions.push(format!("(from_account = {p} OR to_account = {p})"));
        }
        if before.is_some() {
            let (ns, id) = (next(), next());
            conditions.push(format!(
                "(started_ns < {ns} OR (started_ns = {ns} AND id < {id}))"
            ));
        }
        let limit_param = next();
        let sql = format!(
            "SELECT {TRANSFER_COLUMNS} FROM {TRANSFERS} {} ORDER BY started_ns DESC, id DESC \
             LIMIT {limit_param}",
            if conditions.is_empty() {
                String::new()
            } else {
                format!("WHERE {}", conditions.join(" AND "))
            }
        );
        let mut query = sqlx::query(&sql);
        if let Some(account) = account {
            query = query.bind(account);
        }
        if let Some((ns, id)) = before {
            query = query.bind(ns).bind(id);
        }
        let rows = query.bind(i64::from(limit)).fetch_all(self.reads()).await?;
        rows.iter()
            .map(|r| Ok((transfer_json(r)?, r.try_get("started_ns")?)))
            .collect()
    }
}

/// The workflow order of the step event types (ties of equal timestamps).
fn step_rank(event_type: &str) -> u8 {
    match event_type {
        "TransferStarted" => 0,
        "TransferDebited" => 1,
        "TransferCredited" => 2,
        "TransferRefunded" => 3,
        "TransferSettled" => 4,
        _ => 5,
    }
}

/// `GET /transfers/{id}`.
#[utoipa::path(
    get,
    path = "/transfers/{id}",
    params(("id" = String, Path, description = "Transfer id")),
    responses(
        (status = 200, description = "The transfer with its steps", body = TransferJson),
        (status = 404, description = "No such transfer (`TransferNotFound`)", body = crate::http::ErrorBody),
        (status = 503, description = "The read model is unavailable (`Unavailable`): retry", body = crate::http::ErrorBody),
    )
)]
pub(crate) async fn get_transfer(
    State(state): State<AppState>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<TransferJson>, ApiError> {
    let Path(id) = id?;
    state
        .db
        .transfer(&id)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::TransferNotFound(format!("transfer {id} does not exist")))
}

/// Query parameters of `GET /transfers`.
#[derive(Debug, Default, Deserialize)]
pub struct TransferListParams {
    account: Option<String>,
    limit: Option<String>,
    after: Option<String>,
}

/// A page of transfers.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TransferPage {
    /// Transfers, newest first.
    pub transfers: Vec<TransferJson>,
    /// Pass as `after` for the next (older) page; `null` on the last page.
    pub next: Option<String>,
}

/// `GET /transfers?account=&limit=&after=`.
#[utoipa::path(
    get,
    path = "/transfers",
    params(
        ("account" = Option<String>, Query, description = "Only transfers from or to this account"),
        ("limit" = Option<u32>, Query, minimum = 1, maximum = 1000, description = "Page size (default 50)"),
        ("after" = Option<String>, Query, description = "The previous page's `next`"),
    ),
    responses(
        (status = 200, description = "A page of transfers, newest first", body = TransferPage),
        (status = 400, description = "A bad parameter (`InvalidQuery`)", body = crate::http::ErrorBody),
        (status = 503, description = "The read model is unavailable (`Unavailable`): retry", body = crate::http::ErrorBody),
    )
)]
pub(crate) async fn list_transfers(
    State(state): State<AppState>,
    params: Result<Query<TransferListParams>, QueryRejection>,
) -> Result<Json<TransferPage>, ApiError> {
    let Query(params) = params?;
    let limit =
        number_param("limit", params.limit.as_deref(), 1..=MAX_LIMIT)?.unwrap_or(DEFAULT_LIMIT);
    let before = match params.after.as_deref().filter(|a| !a.is_empty()) {
        None => None,
        Some(cursor) => Some(
            cursor
                .split_once(':')
                .and_then(|(ns, id)| Some((ns.parse::<i64>().ok()?, id)))
                .ok_or_else(|| {
                    ApiError::InvalidQuery(format!(
                        "after={cursor:?} is not a `next` this API gave"
                    ))
                })?,
        ),
    };
    let account = params.account.as_deref().filter(|a| !a.is_empty());
    let mut rows = state.db.list_transfers(account, before, limit + 1).await?;
    let more = rows.len() > limit as usize;
    rows.truncate(limit as usize);
    let next = if more {
        rows.last().map(|(t, ns)| format!("{ns}:{}", t.transfer_id))
    } else {
        None
    };
    Ok(Json(TransferPage {
        transfers: rows.into_iter().map(|(t, _)| t).collect(),
        next,
    }))
}
