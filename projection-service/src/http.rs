//! The query API (axum): accounts now, as of a time or a version, read-your-writes waits, the
//! event history (optionally downcast for old consumers), pages of accounts, health, readiness,
//! metrics, the projection's status (lag per partition, dead-letter count), the newest dead
//! letters, the explorer page ([`explorer`]) at `/`, and `GET /openapi.json` (the document of
//! every route, generated from the handlers' annotations by utoipa: [`ApiDoc`]). Every error is
//! [`ApiError`], one JSON shape `{"error": {"code", "message"}}` with one table of codes to
//! statuses ([`ApiError::parts`]), bad paths, query strings, unknown routes and methods included;
//! internal details are logged, never sent.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::middleware::from_fn_with_state;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use shared::auth::{HttpAccess, Scope, host_check, scope_check};
use shared::envelope::CURRENT_SCHEMA_VERSION;
use shared::money::{format_minor, minor_digits};
use shared::{EventCodec, EventEnvelope};
use utoipa::{OpenApi, ToSchema};

use crate::accounts::{AccountFilter, AccountView};
use crate::db::{Database, RowCounts, StoreError, Tables};
use crate::dlq::{DeadLetterReader, DeadLetterView};
use crate::model::ReadModel;
use crate::projector::{PartitionLag, Status};
use shared::dlq::PageCursor;

/// Default and largest page size of `GET /accounts`.
pub const DEFAULT_LIMIT: u32 = 50;
/// Largest page size of `GET /accounts`.
pub const MAX_LIMIT: u32 = 1000;
/// How long `?min_version` waits by default (`timeout_ms` overrides, up to [`MAX_WAIT`]).
pub const DEFAULT_WAIT: Duration = Duration::from_secs(5);
/// Longest `?min_version` wait.
pub const MAX_WAIT: Duration = Duration::from_secs(60);

/// What handlers share.
#[derive(Clone)]
pub struct AppState {
    /// The read model.
    pub db: Database,
    /// The read model's live tables (`GET /status` counts their rows).
    pub tables: Tables,
    /// Who may call which route (`HTTP_API_KEYS_FILE`, the `Host` check).
    pub access: HttpAccess,
    /// Readiness and the commit signal.
    pub status: Arc<Status>,
    /// For downcasting events to old schema versions.
    pub codec: Arc<EventCodec>,
    /// Renders `/metrics`.
    pub metrics: PrometheusHandle,
    /// The events topic (`GET /status`).
    pub topic: String,
    /// Reads `<prefix>.events.dlq` back (`GET /dead-letters`).
    pub dead_letters: DeadLetterReader,
    /// `PROJECTION_STALL_AFTER`: an unmeasured lag this old makes `/ready` answer `Stalled`.
    pub stall_after: Duration,
}

/// Every error the API answers with.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 404 `AccountNotFound`: no such account (at that time / version).
    #[error("{0}")]
    AccountNotFound(String),
    /// 404 `TransferNotFound`: no such transfer.
    #[error("{0}")]
    TransferNotFound(String),
    /// 400 `InvalidQuery`: a parameter is malformed or parameters conflict.
    #[error("{0}")]
    InvalidQuery(String),
    /// 504 `NotCaughtUp`: `min_version` was not reached in time.
    #[error("{0}")]
    NotCaughtUp(String),
    /// 503 `NotReady`: the projection has not caught up since start.
    #[error("the projection has not caught up with the event topic yet")]
    NotReady,
    /// 503 `Stalled`: the lag has not been measured for `PROJECTION_STALL_AFTER` (no
    /// partition assigned, the watermarks unreadable): events may not be applied.
    #[error("{0}")]
    Stalled(String),
    /// 404 `NotFound`: no such route.
    #[error("no such route")]
    NoRoute,
    /// 405 `MethodNotAllowed`: the route exists but not with this method.
    #[error("this route does not answer that method")]
    MethodNotAllowed,
    /// 503 `KafkaUnavailable`: the dead-letter topic could not be read; retry.
    #[error("the dead-letter topic cannot be read right now: {0}")]
    KafkaUnavailable(String),
    /// 503 `Unavailable`: the database is busy or unreachable; retry.
    #[error("the read model is temporarily unavailable")]
    Unavailable,
    /// 500 `Internal`: a bug or a broken database; details are in the log.
    #[error("internal error")]
    Internal,
}

impl ApiError {
    /// The code and status of each error: the single table.
    pub fn parts(&self) -> (&'static str, StatusCode) {
        match self {
            ApiError::AccountNotFound(_) => ("AccountNotFound", StatusCode::NOT_FOUND),
            ApiError::TransferNotFound(_) => ("TransferNotFound", StatusCode::NOT_FOUND),
            ApiError::InvalidQuery(_) => ("InvalidQuery", StatusCode::BAD_REQUEST),
            ApiError::NotCaughtUp(_) => ("NotCaughtUp", StatusCode::GATEWAY_TIMEOUT),
            ApiError::NotReady => ("NotReady", StatusCode::SERVICE_UNAVAILABLE),
            ApiError::Stalled(_) => ("Stalled", StatusCode::SERVICE_UNAVAILABLE),
            ApiError::NoRoute => ("NotFound", StatusCode::NOT_FOUND),
            ApiError::MethodNotAllowed => ("MethodNotAllowed", StatusCode::METHOD_NOT_ALLOWED),
            ApiError::KafkaUnavailable(_) => ("Unavailable", StatusCode::SERVICE_UNAVAILABLE),
            ApiError::Unavailable => ("Unavailable", StatusCode::SERVICE_UNAVAILABLE),
            ApiError::Internal => ("Internal", StatusCode::INTERNAL_SERVER_ERROR),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        tracing::error!(error = %e, "query failed");
        if e.is_retriable() {
            ApiError::Unavailable
        } else {
            ApiError::Internal
        }
    }
}

impl From<QueryRejection> for ApiError {
    fn from(e: QueryRejection) -> Self {
        ApiError::InvalidQuery(e.body_text())
    }
}

impl From<PathRejection> for ApiError {
    fn from(e: PathRejection) -> Self {
        ApiError::InvalidQuery(format!("bad path: {}", e.body_text()))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (code, status) = self.parts();
        let body = ErrorBody {
            error: ErrorDetail {
                code: code.to_owned(),
                message: self.to_string(),
            },
        };
        (status, Json(body)).into_response()
    }
}

/// The body of every error answer.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    /// What went wrong.
    pub error: ErrorDetail,
}

/// A stable code and a message for people.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable, machine-readable: `AccountNotFound`, `TransferNotFound`, `InvalidQuery`, `NotCaughtUp`, `NotReady`,
    /// `NotFound`, `MethodNotAllowed`, `Unavailable`, `Internal`.
    pub code: String,
    /// Explanation for people; may change between releases.
    pub message: String,
}

/// The OpenAPI 3 document of this API (served at `GET /openapi.json`).
#[derive(OpenApi)]
#[openapi(
    info(
        title = "bank-es projection-service",
        description = "The read model: accounts now, as of a time or a version, their events, pages of accounts, transfers and their steps, status and dead letters."
    ),
    paths(
        list_accounts,
        get_account,
        account_events,
        crate::transfers::list_transfers,
        crate::transfers::get_transfer,
        health,
        ready,
        render_metrics,
        status,
        dead_letters,
        openapi_json,
        explorer::page,
        explorer::script,
        explorer::style
    ),
    components(schemas(
        ErrorBody,
        ErrorDetail,
        AccountJson,
        ParkedJson,
        AccountPage,
        crate::transfers::TransferJson,
        crate::transfers::StepJson,
        crate::transfers::TransferPage,
        EventJson,
        EventJsonV1,
        AnyEventJson,
        StatusJson,
        PartitionLag,
        DeadLetterPage,
        DeadLetterView,
        HealthJson,
        ReadyJson
    ))
)]
pub struct ApiDoc;

/// The OpenAPI document as served.
pub fn openapi() -> utoipa::openapi::OpenApi {
    let mut document = ApiDoc::openapi();
    let read = Scope::AccountsRead;
    shared::auth::document_access(
        &mut document,
        &[
            ("/accounts", read),
            ("/accounts/{id}", read),
            ("/accounts/{id}/events", read),
            ("/transfers", read),
            ("/transfers/{id}", read),
            ("/status", read),
            ("/metrics", Scope::MetricsRead),
            ("/dead-letters", Scope::Admin),
        ],
    );
    document
}

/// `GET /openapi.json`: this API's OpenAPI 3 document.
#[utoipa::path(get, path = "/openapi.json", responses(
    (status = 200, description = "The OpenAPI 3 document", content_type = "application/json", body = Object)
))]
async fn openapi_json() -> Json<utoipa::openapi::OpenApi> {
    Json(openapi())
}

/// The bank account's query routes, `/accounts…` ([`crate::accounts::Accounts::routes`]).
pub(crate) fn account_routes() -> Router<AppState> {
    Router::new()
        .route("/accounts", get(list_accounts))
        .route("/accounts/{id}", get(get_account))
        .route("/accounts/{id}/events", get(account_events))
}

/// The explorer page and its assets, public ([`crate::accounts::Accounts::public_routes`]).
pub(crate) fn explorer_routes() -> Router<AppState> {
    Router::new()
        .route("/", get(explorer::page))
        .route("/assets/explorer.js", get(explorer::script))
        .route("/assets/explorer.css", get(explorer::style))
}

/// The router with every route: the service's own and read model `M`'s. The model's query
/// routes and `/status` need `accounts:read`, `/metrics` `metrics:read`, `/dead-letters`
/// `admin`; `/health`, `/ready`, `/openapi.json` and the model's public routes (the explorer's
/// page) are public; every request passes the `Host` check.
pub fn router<M: ReadModel>(state: AppState) -> Router {
    let access = state.access.clone();
    let scoped = |scope: Scope| from_fn_with_state((access.clone(), scope), scope_check);
    M::routes()
        .route("/status", get(status))
        .route_layer(scoped(Scope::AccountsRead))
        .merge(M::public_routes())
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route(
            "/metrics",
            get(render_metrics).route_layer(scoped(Scope::MetricsRead)),
        )
        .route(
            "/dead-letters",
            get(dead_letters).route_layer(scoped(Scope::Admin)),
        )
        .route("/openapi.json", get(openapi_json))
        .fallback(|| async { ApiError::NoRoute })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        // 5xx answers are expected here (`/ready` is 503 until caught up, 504 when a
        // `min_version` wait runs out): the handlers log real failures themselves.
        .layer(
            tower_http::trace::TraceLayer::new_for_http().on_failure(
                tower_http::trace::DefaultOnFailure::new().level(tracing::Level::DEBUG),
            ),
        )
        .layer(from_fn_with_state(access, host_check))
        .with_state(state)
}

/// An account as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct AccountJson {
    /// Account id.
    pub id: String,
    /// Holder.
    pub owner: String,
    /// ISO 4217.
    pub currency: String,
    /// Minor units.
    pub balance_minor: i64,
    /// Decimal string with the currency's minor digits ("150.00").
    pub balance: String,
    /// `active` or `closed`.
    pub status: String,
    /// Aggregate version.
    pub version: u64,
    /// Deposits, withdrawals and transfer debits, credits and refunds.
    pub transaction_count: u64,
    /// Transfers out of the account still in flight (the current state only: absent as of a
    /// time or a version). Their amounts already left `balance_minor`; the account cannot close
    /// until they end.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transfers_pending: Option<u64>,
    /// RFC 3339.
    pub opened_at: String,
    /// RFC 3339.
    pub updated_at: String,
    /// Present when later events of the account wait behind a version gap (the current state
    /// only): the account is shown as of `version` until the missing one arrives.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parked: Option<ParkedJson>,
}

/// Events of an account parked behind a version gap.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ParkedJson {
    /// How many events wait.
    pub events: u64,
    /// The version they wait for (the account's version + 1).
    pub waiting_for_version: u64,
    /// RFC 3339: when the oldest of them was parked.
    pub since: String,
}

impl From<AccountView> for AccountJson {
    fn from(v: AccountView) -> Self {
        AccountJson {
            balance: format_minor(v.balance_minor, minor_digits(&v.currency)),
            id: v.id,
            owner: v.owner,
            currency: v.currency,
            balance_minor: v.balance_minor,
            status: v.status,
            version: v.version,
            transaction_count: v.transaction_count,
            transfers_pending: v.transfers_pending,
            opened_at: v.opened_at,
            updated_at: v.updated_at,
            parked: None,
        }
    }
}

/// Query parameters of `GET /accounts/{id}` (parsed by hand for precise 400s).
#[derive(Debug, Default, Deserialize)]
pub struct AccountParams {
    as_of: Option<String>,
    version: Option<String>,
    min_version: Option<String>,
    timeout_ms: Option<String>,
}

fn parse_version(name: &str, text: &str) -> Result<u64, ApiError> {
    text.trim()
        .parse::<u64>()
        .ok()
        .filter(|v| *v >= 1)
        .ok_or_else(|| {
            ApiError::InvalidQuery(format!(
                "{name}={text:?} is not a whole number of 1 or more"
            ))
        })
}

fn parse_time(text: &str) -> Result<DateTime<Utc>, ApiError> {
    let text = text.trim();
    DateTime::parse_from_rfc3339(text)
        // An unencoded `+02:00` arrives as ` 02:00`: take it as meant.
        .or_else(|e| DateTime::parse_from_rfc3339(&text.replace(' ', "+")).map_err(|_| e))
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| {
            ApiError::InvalidQuery(format!(
                "as_of={text:?} is not an RFC 3339 time like 2026-01-31T12:00:00Z: {e}"
            ))
        })
}

fn parse_timeout(text: Option<&str>) -> Result<Duration, ApiError> {
    let Some(text) = text else {
        return Ok(DEFAULT_WAIT);
    };
    text.trim()
        .parse::<u64>()
        .ok()
        .map(Duration::from_millis)
        .filter(|d| *d <= MAX_WAIT)
        .ok_or_else(|| {
            ApiError::InvalidQuery(format!(
                "timeout_ms={text:?} is not a whole number of milliseconds up to {}",
                MAX_WAIT.as_millis()
            ))
        })
}

/// `GET /accounts/{id}[?as_of=|?version=][&min_version=&timeout_ms=]`.
#[utoipa::path(
    get,
    path = "/accounts/{id}",
    params(
        ("id" = String, Path, description = "Account id"),
        ("as_of" = Option<String>, Query, format = DateTime, description = "The account as of this RFC 3339 time (not with `version`)"),
        ("version" = Option<u64>, Query, minimum = 1, description = "The account at this version (not with `as_of`)"),
        ("min_version" = Option<u64>, Query, minimum = 1, description = "Read-your-writes: wait until the projection has this version"),
        ("timeout_ms" = Option<u64>, Query, minimum = 0, maximum = 60000, description = "How long `min_version` waits (default 5000)"),
    ),
    responses(
        (status = 200, description = "The account", body = AccountJson),
        (status = 400, description = "A bad parameter (`InvalidQuery`)", body = ErrorBody),
        (status = 404, description = "No such account, at that time or version (`AccountNotFound`)", body = ErrorBody),
        (status = 503, description = "The read model is unavailable (`Unavailable`): retry", body = ErrorBody),
        (status = 504, description = "`min_version` was not reached in time (`NotCaughtUp`)", body = ErrorBody),
    )
)]
async fn get_account(
    State(state): State<AppState>,
    id: Result<Path<String>, PathRejection>,
    params: Result<Query<AccountParams>, QueryRejection>,
) -> Result<Json<AccountJson>, ApiError> {
    let Path(id) = id?;
    let Query(params) = params?;
    let as_of = params.as_of.as_deref().map(parse_time).transpose()?;
    let version = params
        .version
        .as_deref()
        .map(|v| parse_version("version", v))
        .transpose()?;
    if as_of.is_some() && version.is_some() {
        return Err(ApiError::InvalidQuery(
            "as_of and version cannot be combined: ask for one or the other".into(),
        ));
    }
    let min_version = params
        .min_version
        .as_deref()
        .map(|v| parse_version("min_version", v))
        .transpose()?;
    let timeout = parse_timeout(params.timeout_ms.as_deref())?;
    if let Some(min) = min_version {
        wait_for_version(&state, &id, min, timeout).await?;
    }
    let found = match (as_of, version) {
        (Some(at), _) => state.db.account_as_of(&id, &at).await?.ok_or_else(|| {
            ApiError::AccountNotFound(format!("account {id} did not exist at {}", at.to_rfc3339()))
        })?,
        (None, Some(v)) => {
            state.db.account_at_version(&id, v).await?.ok_or_else(|| {
                ApiError::AccountNotFound(format!("account {id} has no version {v}"))
            })?
        }
        (None, None) => {
            let parked = state.db.parked_of(&id).await?;
            let Some(found) = state.db.account(&id).await? else {
                return Err(ApiError::AccountNotFound(match parked {
                    None => format!("account {id} does not exist"),
                    Some((events, since)) => format!(
                        "account {id} has no applied event: {events} of its events wait for \
                         version 1 (parked since {since})"
                    ),
                }));
            };
            let mut account = AccountJson::from(found);
            account.parked = parked.map(|(events, since)| ParkedJson {
                events,
                waiting_for_version: account.version + 1,
                since,
            });
            return Ok(Json(account));
        }
    };
    Ok(Json(found.into()))
}

/// Waits until the account's projected version reaches `min`, woken by each commit.
async fn wait_for_version(
    state: &AppState,
    id: &str,
    min: u64,
    timeout: Duration,
) -> Result<(), ApiError> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut commits = state.status.commits.subscribe();
    loop {
        commits.borrow_and_update();
        let current = state.db.account(id).await?.map(|a| a.version);
        if current.is_some_and(|v| v >= min) {
            return Ok(());
        }
        match tokio::time::timeout_at(deadline, commits.changed()).await {
            Ok(Ok(())) => {}
            _ => {
                return Err(ApiError::NotCaughtUp(format!(
                    "account {id} is at version {} in the projection, not {min}, after {} ms",
                    current.unwrap_or(0),
                    timeout.as_millis()
                )));
            }
        }
    }
}

/// Query parameters of `GET /accounts/{id}/events`.
#[derive(Debug, Default, Deserialize)]
pub struct EventsParams {
    schema_version: Option<String>,
    limit: Option<String>,
    after_version: Option<String>,
}

/// Events per page of `GET /accounts/{id}/events` at most (and by default): a history answers
/// in bounded time and memory; longer ones are read page by page.
pub const EVENTS_PAGE_MAX: u32 = 1000;

/// The header naming the `after_version` of the next page, when there is one.
pub const NEXT_AFTER_VERSION: &str = "next-after-version";

/// A whole number query parameter within `range`, or the error naming it.
pub(crate) fn number_param<T: std::str::FromStr + PartialOrd + std::fmt::Display + Copy>(
    name: &str,
    text: Option<&str>,
    range: std::ops::RangeInclusive<T>,
) -> Result<Option<T>, ApiError> {
    let Some(text) = text else { return Ok(None) };
    text.trim()
        .parse::<T>()
        .ok()
        .filter(|v| range.contains(v))
        .map(Some)
        .ok_or_else(|| {
            ApiError::InvalidQuery(format!(
                "{name}={text:?} must be a whole number from {} to {}",
                range.start(),
                range.end()
            ))
        })
}

/// An event envelope as `GET /accounts/{id}/events` shows it (documentation of
/// `shared::EventEnvelope`'s JSON shape).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct EventJson {
    /// Unique id of the event.
    pub event_id: uuid::Uuid,
    /// The account.
    pub aggregate_id: String,
    /// `BankAccount`.
    pub aggregate_type: String,
    /// `AccountOpened`, `MoneyDeposited`, `MoneyWithdrawn` or `AccountClosed`.
    pub event_type: String,
    /// Shape version of `data`.
    pub schema_version: u32,
    /// Position in the account's history, from 1.
    pub version: u64,
    /// When the event was recorded (RFC 3339, UTC).
    #[schema(format = DateTime)]
    pub timestamp: String,
    /// `correlation_id`, `causation_id`…
    #[schema(value_type = Object)]
    pub metadata: Value,
    /// The event's payload, shaped by `event_type` and `schema_version`.
    #[schema(value_type = Object)]
    pub data: Value,
}

/// An event envelope downcast to schema version 1 (`?schema_version=1`): `id` for `event_id`, no
/// `schema_version`, and version 1's `data`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct EventJsonV1 {
    /// Unique id of the event.
    pub id: uuid::Uuid,
    /// The account.
    pub aggregate_id: String,
    /// `BankAccount`.
    pub aggregate_type: String,
    /// The event's type.
    pub event_type: String,
    /// Position in the account's history, from 1.
    pub version: u64,
    /// When the event was recorded (RFC 3339, UTC).
    #[schema(format = DateTime)]
    pub timestamp: String,
    /// `correlation_id`, `causation_id`…
    #[schema(value_type = Object)]
    pub metadata: Value,
    /// Version 1's payload (decimal amounts).
    #[schema(value_type = Object)]
    pub data: Value,
}

/// One element of `GET /accounts/{id}/events`: the current envelope, or version 1's when asked
/// for with `?schema_version=1`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum AnyEventJson {
    /// The current schema version.
    Current(EventJson),
    /// Schema version 1.
    V1(EventJsonV1),
}

/// `GET /accounts/{id}/events[?schema_version=N][&after_version=V][&limit=N]`: a JSON array of
/// envelopes, oldest first, at most `limit` (default and cap [`EVENTS_PAGE_MAX`]) after version
/// `after_version`; when more follow, the `next-after-version` header names the next page's
/// `after_version`.
#[utoipa::path(
    get,
    path = "/accounts/{id}/events",
    params(
        ("id" = String, Path, description = "Account id"),
        ("schema_version" = Option<u32>, Query, minimum = 1, maximum = 2, description = "Downcast the events to this schema version"),
        ("after_version" = Option<u64>, Query, minimum = 0, description = "Only the events after this version (default 0: from the first)"),
        ("limit" = Option<u32>, Query, minimum = 1, maximum = 1000, description = "Events per page (default and at most 1000)"),
    ),
    responses(
        (status = 200, description = "The account's events, oldest first; the `next-after-version` header names the next page's `after_version` when more follow", body = Vec<AnyEventJson>,
            headers(("next-after-version" = u64, description = "The `after_version` of the next page (absent on the last)"))),
        (status = 400, description = "A bad parameter (`InvalidQuery`)", body = ErrorBody),
        (status = 404, description = "No such account (`AccountNotFound`)", body = ErrorBody),
        (status = 503, description = "The read model is unavailable (`Unavailable`): retry", body = ErrorBody),
    )
)]
async fn account_events(
    State(state): State<AppState>,
    id: Result<Path<String>, PathRejection>,
    params: Result<Query<EventsParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Path(id) = id?;
    let Query(params) = params?;
    let limit = number_param("limit", params.limit.as_deref(), 1..=EVENTS_PAGE_MAX)?
        .unwrap_or(EVENTS_PAGE_MAX);
    let after_version = number_param(
        "after_version",
        params.after_version.as_deref(),
        0..=u64::MAX,
    )?
    .unwrap_or(0);
    let target = match params.schema_version.as_deref() {
        None => None,
        Some(text) => Some(
            text.trim()
                .parse::<u32>()
                .ok()
                .filter(|v| (1..=CURRENT_SCHEMA_VERSION).contains(v))
                .ok_or_else(|| {
                    ApiError::InvalidQuery(format!(
                        "schema_version={text:?} must be between 1 and {CURRENT_SCHEMA_VERSION}"
                    ))
                })?,
        ),
    };
    let mut rows = state.db.events(&id, after_version, limit + 1).await?;
    if rows.is_empty() && (after_version == 0 || state.db.account(&id).await?.is_none()) {
        return Err(ApiError::AccountNotFound(format!(
            "account {id} does not exist"
        )));
    }
    let more = rows.len() > limit as usize;
    rows.truncate(limit as usize);
    let currency = match target {
        Some(t) if t < CURRENT_SCHEMA_VERSION => state.db.account(&id).await?.map(|a| a.currency),
        _ => None,
    };
    let envelopes = rows
        .iter()
        .map(|text| {
            serde_json::from_str::<EventEnvelope>(text).map_err(|e| {
                tracing::error!(error = %e, %id, "stored envelope unreadable");
                ApiError::Internal
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let next = envelopes.last().map(|e| e.version).filter(|_| more);
    let body = envelopes
        .iter()
        .map(|envelope| match (target, &currency) {
            (Some(t), Some(currency)) => state.codec.downcast(envelope, t, currency).map_err(|e| {
                tracing::error!(error = %e, %id, "downcast failed");
                ApiError::Internal
            }),
            _ => serde_json::to_value(envelope).map_err(|_| ApiError::Internal),
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut response = Json(body).into_response();
    if let Some(next) = next
        && let Ok(value) = axum::http::HeaderValue::from_str(&next.to_string())
    {
        response.headers_mut().insert(NEXT_AFTER_VERSION, value);
    }
    Ok(response)
}

/// Query parameters of `GET /accounts`.
#[derive(Debug, Default, Deserialize)]
pub struct ListParams {
    status: Option<String>,
    owner: Option<String>,
    limit: Option<String>,
    after: Option<String>,
    q: Option<String>,
}

/// A page of accounts.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct AccountPage {
    /// Accounts ordered by id.
    pub accounts: Vec<AccountJson>,
    /// Pass as `after` for the next page; `null` on the last page.
    pub next: Option<String>,
}

/// `GET /accounts?status=&owner=&q=&limit=&after=`.
#[utoipa::path(
    get,
    path = "/accounts",
    params(
        ("status" = Option<String>, Query, pattern = "^(active|closed)?$", description = "`active` or `closed`"),
        ("owner" = Option<String>, Query, description = "Exactly this owner"),
        ("q" = Option<String>, Query, description = "Id or owner contains this, ignoring case"),
        ("limit" = Option<u32>, Query, minimum = 1, maximum = 1000, description = "Page size (default 50)"),
        ("after" = Option<String>, Query, description = "The previous page's `next`"),
    ),
    responses(
        (status = 200, description = "A page of accounts ordered by id", body = AccountPage),
        (status = 400, description = "A bad parameter (`InvalidQuery`)", body = ErrorBody),
        (status = 503, description = "The read model is unavailable (`Unavailable`): retry", body = ErrorBody),
    )
)]
async fn list_accounts(
    State(state): State<AppState>,
    params: Result<Query<ListParams>, QueryRejection>,
) -> Result<Json<AccountPage>, ApiError> {
    let Query(params) = params?;
    let status = match params.status.as_deref().map(str::trim) {
        None | Some("") => None,
        Some(s @ ("active" | "closed")) => Some(s.to_owned()),
        Some(other) => {
            return Err(ApiError::InvalidQuery(format!(
                "status={other:?} must be active or closed"
            )));
        }
    };
    let limit =
        number_param("limit", params.limit.as_deref(), 1..=MAX_LIMIT)?.unwrap_or(DEFAULT_LIMIT);
    let filter = AccountFilter {
        status,
        owner: params.owner.filter(|o| !o.is_empty()),
        after: params.after.filter(|a| !a.is_empty()),
        q: params
            .q
            .map(|q| q.trim().to_owned())
            .filter(|q| !q.is_empty()),
        limit: limit + 1,
    };
    let mut rows = state.db.list_accounts(&filter).await?;
    let more = rows.len() > limit as usize;
    rows.truncate(limit as usize);
    let next = if more {
        rows.last().map(|a| a.id.clone())
    } else {
        None
    };
    Ok(Json(AccountPage {
        accounts: rows.into_iter().map(AccountJson::from).collect(),
        next,
    }))
}

/// The body of `GET /health`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct HealthJson {
    /// Always `ok`.
    pub status: String,
}

/// The body of `GET /ready` when ready.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ReadyJson {
    /// Always `ready`.
    pub status: String,
}

/// `GET /health`: the process is up.
#[utoipa::path(get, path = "/health", responses(
    (status = 200, description = "The process is up", body = HealthJson)
))]
async fn health() -> Json<HealthJson> {
    Json(HealthJson {
        status: "ok".into(),
    })
}

/// `GET /ready`: 200 once the projection caught up with its partitions since start.
#[utoipa::path(get, path = "/ready", responses(
    (status = 200, description = "Caught up since start", body = ReadyJson),
    (status = 503, description = "Not caught up yet (`NotReady`), or the lag unmeasured for `PROJECTION_STALL_AFTER` (`Stalled`: no partition assigned, the watermarks unreadable)", body = ErrorBody),
))]
async fn ready(State(state): State<AppState>) -> Result<Json<ReadyJson>, ApiError> {
    if !state.status.ready.load(Ordering::SeqCst) {
        return Err(ApiError::NotReady);
    }
    match state.status.stalled(state.stall_after) {
        Some(reason) => Err(ApiError::Stalled(reason)),
        None => Ok(Json(ReadyJson {
            status: "ready".into(),
        })),
    }
}

/// The body of `GET /status`.
#[derive(Debug, Serialize, ToSchema)]
pub struct StatusJson {
    /// As `GET /ready`: caught up at least once since start, and not stalled.
    pub ready: bool,
    /// Why the projection may not be applying events (absent when it is): as `Stalled` of
    /// `GET /ready`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stalled: Option<String>,
    /// The events topic.
    pub topic: String,
    /// Lag of each assigned partition (empty before the first assignment).
    pub partitions: Vec<PartitionLag>,
    /// Sum of the partitions' lags.
    pub lag: i64,
    /// How old the lag figures are, in milliseconds (a monitor round measures them every
    /// second or so): large while Kafka cannot be reached, although `ready` stays true until
    /// `PROJECTION_STALL_AFTER`.
    pub lag_age_ms: u64,
    /// Why the last monitor round could not measure the lag (the partitions' ends unreadable,
    /// no partition assigned); absent when it could.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lag_problem: Option<String>,
    /// Batches committed since start: changes whenever the read model changes.
    pub commits: u64,
    /// Rows in the read model's state table (`accounts`: one per aggregate).
    pub accounts: i64,
    /// Events applied (rows of the history table, `account_events`; 0 for a read model without
    /// one).
    pub events: i64,
    /// Events parked behind a version gap.
    pub parked: i64,
    /// The dead-letter topic.
    pub dead_letter_topic: String,
    /// Messages in it (`null` until first counted).
    pub dead_letters: Option<i64>,
}

/// `GET /status`: readiness, lag per partition, counts and the dead-letter count.
#[utoipa::path(get, path = "/status", responses(
    (status = 200, description = "Readiness, lag per partition and counts", body = StatusJson),
    (status = 503, description = "The read model is unavailable (`Unavailable`): retry", body = ErrorBody),
))]
async fn status(State(state): State<AppState>) -> Result<Json<StatusJson>, ApiError> {
    let RowCounts {
        accounts,
        events,
        parked,
    } = state.db.counts_of(&state.tables).await?;
    let partitions = state.status.lags();
    let stalled = state.status.stalled(state.stall_after);
    let (lag_age, lag_problem) = state.status.lag_freshness();
    Ok(Json(StatusJson {
        ready: state.status.ready.load(Ordering::SeqCst) && stalled.is_none(),
        stalled,
        topic: state.topic.clone(),
        lag: partitions.iter().map(|p| p.lag).sum(),
        lag_age_ms: u64::try_from(lag_age.as_millis()).unwrap_or(u64::MAX),
        lag_problem,
        partitions,
        commits: *state.status.commits.borrow(),
        accounts,
        events,
        parked,
        dead_letter_topic: state.dead_letters.topic().to_owned(),
        dead_letters: state.status.dead_letters(),
    }))
}

/// Default and largest number of dead letters `GET /dead-letters` answers with.
pub const DEFAULT_DEAD_LETTERS: usize = 50;
/// Largest `limit` of `GET /dead-letters`.
pub const MAX_DEAD_LETTERS: usize = 500;

/// Query parameters of `GET /dead-letters`.
#[derive(Debug, Default, Deserialize)]
pub struct DeadLetterParams {
    limit: Option<String>,
    before: Option<String>,
}

/// The body of `GET /dead-letters`.
#[derive(Debug, Serialize, ToSchema)]
pub struct DeadLetterPage {
    /// The dead-letter topic.
    pub topic: String,
    /// Messages in it.
    pub total: i64,
    /// The newest ones (older than `before`, when given), newest first.
    pub dead_letters: Vec<DeadLetterView>,
    /// The `before` of the next, older page; absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
}

/// How many `GET /dead-letters` read the topic at once (each has a Kafka client of its own):
/// one, an admin's tool; more wait their turn.
const DEAD_LETTER_READERS: usize = 1;

/// `GET /dead-letters?limit=N&before=CURSOR`: the newest dead letters with their reasons, a page
/// at a time.
#[utoipa::path(
    get,
    path = "/dead-letters",
    params(
        ("limit" = Option<u32>, Query, minimum = 1, maximum = 500, description = "How many (default 50)"),
        ("before" = Option<String>, Query, description = "The `next` of the previous page (`<partition>:<offset>,…`): the letters older than it"),
    ),
    responses(
        (status = 200, description = "The newest dead letters, newest first", body = DeadLetterPage),
        (status = 400, description = "A bad parameter (`InvalidQuery`)", body = ErrorBody),
        (status = 503, description = "The dead-letter topic cannot be read (`Unavailable`): retry", body = ErrorBody),
    )
)]
async fn dead_letters(
    State(state): State<AppState>,
    params: Result<Query<DeadLetterParams>, QueryRejection>,
) -> Result<Json<DeadLetterPage>, ApiError> {
    let Query(params) = params?;
    let limit = number_param("limit", params.limit.as_deref(), 1..=MAX_DEAD_LETTERS)?
        .unwrap_or(DEFAULT_DEAD_LETTERS);
    let before = params
        .before
        .as_deref()
        .map(PageCursor::parse)
        .transpose()
        .map_err(|reason| ApiError::InvalidQuery(format!("before: {reason}")))?;
    static READERS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(DEAD_LETTER_READERS);
    let _turn = READERS.acquire().await.map_err(|_| ApiError::Internal)?;
    let reader = state.dead_letters.clone();
    let read = tokio::task::spawn_blocking(move || reader.page(limit, before.as_ref()))
        .await
        .map_err(|_| ApiError::Internal)?;
    match read {
        Ok(page) => Ok(Json(DeadLetterPage {
            topic: state.dead_letters.topic().to_owned(),
            total: page.total,
            dead_letters: page.letters,
            next: page.next.map(|c| c.to_string()),
        })),
        Err(e) => {
            tracing::warn!(error = %e, "reading dead letters failed");
            Err(ApiError::KafkaUnavailable(e.to_string()))
        }
    }
}

/// `GET /metrics`: Prometheus text format.
#[utoipa::path(get, path = "/metrics", responses(
    (status = 200, description = "Prometheus text exposition format 0.0.4", content_type = "text/plain", body = String)
))]
async fn render_metrics(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
}

/// The explorer: one HTML page, one script and one style sheet, compiled into the binary (no
/// build step, nothing fetched from elsewhere: it works offline). The page only calls the JSON
/// routes above.
pub mod explorer {
    use axum::http::{HeaderValue, header};
    use axum::response::{IntoResponse, Response};

    /// The page at `/`.
    pub const HTML: &str = include_str!("../assets/explorer.html");
    /// `/assets/explorer.js`.
    pub const SCRIPT: &str = include_str!("../assets/explorer.js");
    /// `/assets/explorer.css`.
    pub const STYLE: &str = include_str!("../assets/explorer.css");

    /// Only this origin's script, style and API; nothing inline except SVG built by the script.
    const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
        connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; \
        frame-ancestors 'none'";

    fn asset(content_type: &'static str, body: &'static str) -> Response {
        let mut response = body.into_response();
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        headers.insert(
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        );
        headers.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(CSP),
        );
        response
    }

    /// `GET /`.
    #[utoipa::path(get, path = "/", responses(
        (status = 200, description = "The explorer page", content_type = "text/html", body = String)
    ))]
    pub async fn page() -> Response {
        asset("text/html; charset=utf-8", HTML)
    }

    /// `GET /assets/explorer.js`.
    #[utoipa::path(get, path = "/assets/explorer.js", responses(
        (status = 200, description = "The explorer's script", content_type = "text/javascript", body = String)
    ))]
    pub async fn script() -> Response {
        asset("text/javascript; charset=utf-8", SCRIPT)
    }

    /// `GET /assets/explorer.css`.
    #[utoipa::path(get, path = "/assets/explorer.css", responses(
        (status = 200, description = "The explorer's style sheet", content_type = "text/css", body = String)
    ))]
    pub async fn style() -> Response {
        asset("text/css; charset=utf-8", STYLE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_are_checked() {
        assert_eq!(parse_version("version", "3").ok(), Some(3));
        assert!(parse_version("version", "0").is_err());
        assert!(parse_version("version", "-1").is_err());
        assert!(parse_time("2026-01-01T00:00:00Z").is_ok());
        assert!(parse_time("2026-01-01T00:00:00+02:00").is_ok());
        assert_eq!(
            parse_time("2026-01-01T02:00:00 02:00").ok(),
            parse_time("2026-01-01T00:00:00Z").ok()
        );
        assert!(parse_time("yesterday").is_err());
        assert_eq!(parse_timeout(None).ok(), Some(DEFAULT_WAIT));
        assert!(parse_timeout(Some("999999")).is_err());
    }

    #[test]
    fn errors_have_one_shape() {
        let (code, status) = ApiError::AccountNotFound("x".into()).parts();
        assert_eq!((code, status), ("AccountNotFound", StatusCode::NOT_FOUND));
        assert_eq!(
            ApiError::NotCaughtUp(String::new()).parts().1,
            StatusCode::GATEWAY_TIMEOUT
        );
    }
}
