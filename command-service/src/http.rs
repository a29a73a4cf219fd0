//! The HTTP API: `POST /commands` (produce a command, wait for its result), `GET /health`,
//! `GET /ready`, `GET /metrics` and `GET /openapi.json` (the document of all of them, generated
//! from the handlers' annotations by utoipa). Every error answers `{"error": {"code", "message"}}`,
//! including bad query strings, oversized bodies, unknown routes and methods.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Extension, Query, State};
use axum::http::{StatusCode, header};
use axum::middleware::from_fn_with_state;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde::{Deserialize, Serialize};
use shared::aggregate::DomainCommand;
use shared::auth::{Caller, HttpAccess, Scope, host_check, scope_check};
use shared::envelope::MalformedCommand;
use shared::kafka::{Topics, canonical_partition};
use shared::trace::{TRACEPARENT, TraceContext};
use shared::{CommandMessage, CommandResult, CommandStatus, RejectionCode, Settings};
use utoipa::{OpenApi, ToSchema};

use crate::engine::{RestoreTotals, Status};
use crate::results::ResultWaiters;

/// The metadata field naming who sent a command over HTTP (the API key's id).
pub const PRINCIPAL: &str = "principal";

/// Largest accepted request body.
const MAX_BODY_BYTES: usize = 64 * 1024;
/// How long `POST /commands` waits for the result by default (`?timeout_ms=` overrides).
const DEFAULT_WAIT: Duration = Duration::from_secs(10);

/// Shared state of the handlers.
#[derive(Clone)]
pub struct AppState {
    /// Settings (partition count, topics).
    pub settings: Arc<Settings>,
    /// Non-transactional producer for incoming commands.
    pub producer: FutureProducer,
    /// Result routing.
    pub waiters: ResultWaiters,
    /// Engine status for `/ready`.
    pub status: Arc<Status>,
    /// The service's stop signal; its failure is the engine's fatal error.
    pub shutdown: shared::shutdown::Shutdown,
    /// Metrics renderer.
    pub metrics: PrometheusHandle,
    /// Reads a command of the served aggregate type ([`read_command`]).
    pub read_command: fn(&[u8], Option<&str>) -> Result<CheckedCommand, MalformedCommand>,
    /// Who may call which route (`HTTP_API_KEYS_FILE`, the `Host` check).
    pub access: HttpAccess,
}

/// An error answer: `{"error": {"code", "message"}}` with its status.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code.to_owned(),
                message: self.message,
            },
        };
        (self.status, Json(body)).into_response()
    }
}

impl From<QueryRejection> for ApiError {
    fn from(e: QueryRejection) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, "InvalidQuery", e.body_text())
    }
}

impl From<BytesRejection> for ApiError {
    fn from(e: BytesRejection) -> Self {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "PayloadTooLarge",
                format!("the body is larger than {MAX_BODY_BYTES} bytes"),
            )
        } else {
            ApiError::new(StatusCode::BAD_REQUEST, "Malformed", e.body_text())
        }
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
    /// Stable, machine-readable: `Malformed`, `InvalidQuery`, `PayloadTooLarge`, `Timeout`,
    /// `KafkaUnavailable`, `NotReady`, `EngineFailed`, `NotFound`, `MethodNotAllowed`, or a
    /// rejection code in a rejected command result.
    pub code: String,
    /// Explanation for people; may change between releases.
    pub message: String,
}

/// The router with every route: `POST /commands` needs `commands:write`, `/metrics`
/// `metrics:read`; `/health`, `/ready` and `/openapi.json` are public; every request passes the
/// `Host` check.
pub fn router(state: AppState) -> Router {
    let access = state.access.clone();
    let scoped = |scope: Scope| from_fn_with_state((access.clone(), scope), scope_check);
    Router::new()
        .route(
            "/commands",
            post(post_command).route_layer(scoped(Scope::CommandsWrite)),
        )
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route(
            "/metrics",
            get(metrics).route_layer(scoped(Scope::MetricsRead)),
        )
        .route("/openapi.json", get(openapi_json))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "NotFound", "no such route") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "MethodNotAllowed",
                "this route does not answer that method",
            )
        })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(from_fn_with_state(access.clone(), host_check))
        .with_state(state)
}

/// The OpenAPI 3 document of this API (served at `GET /openapi.json`).
#[derive(OpenApi)]
#[openapi(
    info(
        title = "bank-es command-service",
        description = "Validates commands against each account's state and appends events to Kafka, exactly once; starts transfers between accounts."
    ),
    paths(post_command, health, ready, metrics, openapi_json),
    components(schemas(
        ErrorBody,
        ErrorDetail,
        schema::CommandRequest,
        schema::CommandType,
        schema::CommandPayload,
        schema::OpenAccountPayload,
        schema::AmountPayload,
        schema::TransferPayload,
        schema::CommandResultJson,
        schema::EventRefJson,
        HealthJson,
        ReadyJson,
        RestoreTotals
    ))
)]
pub struct ApiDoc;

/// The OpenAPI document as served.
pub fn openapi() -> utoipa::openapi::OpenApi {
    let mut document = ApiDoc::openapi();
    shared::auth::document_access(
        &mut document,
        &[
            ("/commands", Scope::CommandsWrite),
            ("/metrics", Scope::MetricsRead),
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

/// Schemas of the wire shapes that `shared` reads and writes by hand (documentation only: the
/// handlers use `shared`'s own types).
pub mod schema {
    use serde::{Deserialize, Serialize};
    use serde_json::Value;
    use utoipa::ToSchema;
    use uuid::Uuid;

    use super::ErrorDetail;

    /// A command (`shared::CommandMessage` on the wire).
    #[derive(Debug, Serialize, Deserialize, ToSchema)]
    #[schema(example = json!({
        "command_id": "5b8c3a52-4c1e-4d53-9a3c-2f0f5b9d7e11",
        "aggregate_id": "acc-1",
        "type": "OpenAccount",
        "payload": {"owner": "Ida", "currency": "EUR", "initial_balance_minor": 15000}
    }))]
    pub struct CommandRequest {
        /// Idempotency key: a retried command with the same id gets the original result.
        pub command_id: Uuid,
        /// The account; at most 200 bytes, no control characters.
        #[schema(min_length = 1, max_length = 200)]
        pub aggregate_id: String,
        /// What to do.
        #[serde(rename = "type")]
        pub command_type: CommandType,
        /// `OpenAccount`: `{owner, currency, initial_balance_minor}`; `Deposit`, `Withdraw`:
        /// `{amount_minor, currency?}`; `CloseAccount`: none; `TransferMoney` (the
        /// `aggregate_id` is the transfer's id): `{from, to, amount_minor, currency?}`. Amounts
        /// are integer minor units.
        pub payload: Option<CommandPayload>,
        /// Optimistic concurrency: the version the sender believes the account has.
        #[schema(minimum = 0)]
        pub expected_version: Option<u64>,
        /// Passed through to the events (`correlation_id`, `user`…).
        #[schema(value_type = Option<Object>)]
        pub metadata: Option<Value>,
    }

    /// The payload of a command, by its type.
    #[derive(Debug, Serialize, Deserialize, ToSchema)]
    #[serde(untagged)]
    pub enum CommandPayload {
        /// `OpenAccount`.
        OpenAccount(OpenAccountPayload),
        /// `TransferMoney`.
        Transfer(TransferPayload),
        /// `Deposit` or `Withdraw`.
        Amount(AmountPayload),
    }

    /// The payload of `TransferMoney`: answered once the transfer is started (version 1); its
    /// end is `GET /transfers/{id}` on the projection.
    #[derive(Debug, Serialize, Deserialize, ToSchema)]
    pub struct TransferPayload {
        /// The source account.
        #[schema(min_length = 1, max_length = 200)]
        pub from: String,
        /// The target account (not the source).
        #[schema(min_length = 1, max_length = 200)]
        pub to: String,
        /// Minor units of the source's currency, more than zero.
        #[schema(minimum = 1)]
        pub amount_minor: i64,
        /// The currency the amount is meant in: the source refuses the debit
        /// (`CurrencyMismatch`) unless it is its own.
        #[schema(pattern = "^[A-Z]{3}$")]
        pub currency: Option<String>,
    }

    /// The payload of `OpenAccount`.
    #[derive(Debug, Serialize, Deserialize, ToSchema)]
    pub struct OpenAccountPayload {
        /// Account holder: not blank, at most 200 bytes, no control characters.
        #[schema(min_length = 1, max_length = 200)]
        pub owner: String,
        /// ISO 4217 code, three upper-case letters.
        #[schema(pattern = "^[A-Z]{3}$")]
        pub currency: String,
        /// Opening balance in minor units, zero or more (default 0).
        #[schema(minimum = 0)]
        pub initial_balance_minor: Option<i64>,
    }

    /// The payload of `Deposit` and `Withdraw`.
    #[derive(Debug, Serialize, Deserialize, ToSchema)]
    pub struct AmountPayload {
        /// Minor units, more than zero.
        #[schema(minimum = 1)]
        pub amount_minor: i64,
        /// The currency the amount is meant in (ISO 4217): refused with `CurrencyMismatch`
        /// unless it is the account's.
        #[schema(pattern = "^[A-Z]{3}$")]
        pub currency: Option<String>,
    }

    /// The command types.
    #[derive(Debug, Serialize, Deserialize, ToSchema)]
    pub enum CommandType {
        /// Open a new account.
        OpenAccount,
        /// Put money in.
        Deposit,
        /// Take money out, never beyond the balance.
        Withdraw,
        /// Close an account whose balance is zero and no transfer out of it is in flight.
        CloseAccount,
        /// Move money from one account to another (the `aggregate_id` is the transfer's id).
        TransferMoney,
    }

    /// The answer to a command (`shared::CommandResult`).
    #[derive(Debug, Serialize, Deserialize, ToSchema)]
    pub struct CommandResultJson {
        /// The command this answers.
        pub command_id: Uuid,
        /// The account concerned.
        pub aggregate_id: String,
        /// `accepted` or `rejected`.
        #[schema(pattern = "^(accepted|rejected)$")]
        pub status: String,
        /// The account's version after the command (accepted only).
        #[serde(skip_serializing_if = "Option::is_none")]
        #[schema(minimum = 1)]
        pub version: Option<u64>,
        /// The events appended (accepted only).
        #[serde(skip_serializing_if = "Option::is_none")]
        pub events: Option<Vec<EventRefJson>>,
        /// Why not (rejected only): a rejection code (`AccountExists`, `AccountNotFound`,
        /// `AccountClosed`, `InvalidAmount`, `InsufficientFunds`, `CurrencyMismatch`,
        /// `NonZeroBalance`, `TransfersPending`, `SameAccount`, `TransferExists`,
        /// `VersionConflict`, `Malformed`) and a message.
        #[serde(skip_serializing_if = "Option::is_none")]
        pub error: Option<ErrorDetail>,
    }

    /// One appended event.
    #[derive(Debug, Serialize, Deserialize, ToSchema)]
    pub struct EventRefJson {
        /// The event's id.
        pub event_id: Uuid,
        /// The event's type.
        pub event_type: String,
        /// The account version the event has.
        pub version: u64,
    }
}

/// The body of `GET /health`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct HealthJson {
    /// Always `ok`.
    pub status: String,
}

/// The body of `GET /ready`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ReadyJson {
    /// Every assigned partition is restored.
    pub ready: bool,
    /// The partitions this instance owns.
    pub partitions: Vec<i32>,
    /// What this instance's restores read.
    pub restores: RestoreTotals,
    /// Why not ready (absent when ready): `NotReady` (restoring), `Stalled` (transactions keep
    /// failing) or `EngineFailed`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorDetail>,
}

/// Query parameters of `POST /commands`.
#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct WaitParams {
    /// How long to wait for the result, in milliseconds (default 10000, at most 60000: larger
    /// values wait 60000).
    #[param(minimum = 0)]
    timeout_ms: Option<u64>,
}

/// HTTP status of a result: 200 accepted, 409 version conflict, 400 malformed, 422 otherwise.
pub fn result_status(result: &CommandResult) -> StatusCode {
    match (result.status, result.rejection_code()) {
        (CommandStatus::Accepted, _) => StatusCode::OK,
        (_, Some(RejectionCode::VersionConflict)) => StatusCode::CONFLICT,
        (_, Some(RejectionCode::Malformed)) => StatusCode::BAD_REQUEST,
        _ => StatusCode::UNPROCESSABLE_ENTITY,
    }
}

/// What the HTTP side needs of a command it checked: its ids and its bytes to produce.
#[derive(Debug)]
pub struct CheckedCommand {
    /// The command's idempotency key.
    pub command_id: uuid::Uuid,
    /// Its aggregate (the record key).
    pub aggregate_id: String,
    /// The command message as produced to `<prefix>.commands`.
    pub bytes: Vec<u8>,
}

/// Reads a command of the served aggregate type (`C`), refusing what the engine would refuse
/// as malformed. `metadata.principal` becomes the caller's key id (`None`: no key, and nothing
/// a client wrote under that name is kept).
pub fn read_command<C: DomainCommand>(
    body: &[u8],
    principal: Option<&str>,
) -> Result<CheckedCommand, MalformedCommand> {
    let mut command = CommandMessage::<C>::parse(body)?;
    let type_name = command.command.type_name();
    if C::INTERNAL.contains(&type_name) {
        return Err(MalformedCommand {
            command_id: Some(command.command_id),
            aggregate_id: Some(command.aggregate_id),
            reason: format!(
                "{type_name} is a step of a workflow: only the command-service sends it"
            ),
        });
    }
    match principal {
        Some(id) => {
            command
                .metadata
                .insert(PRINCIPAL.to_owned(), serde_json::Value::from(id));
        }
        None => {
            command.metadata.remove(PRINCIPAL);
        }
    }
    Ok(CheckedCommand {
        command_id: command.command_id,
        bytes: command.to_bytes(),
        aggregate_id: command.aggregate_id,
    })
}

/// A body that is not declared `application/json` is refused (415 `UnsupportedMediaType`): a web
/// page can send `text/plain` or a form without a preflight, never JSON.
fn require_json(headers: &axum::http::HeaderMap) -> Result<(), ApiError> {
    let declared = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let essence = declared.split(';').next().unwrap_or("").trim();
    if essence.eq_ignore_ascii_case("application/json") {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "UnsupportedMediaType",
            format!("the body must be sent as `Content-Type: application/json`, not `{declared}`"),
        ))
    }
}

/// `POST /commands`: produces the command and waits for its result.
#[utoipa::path(
    post,
    path = "/commands",
    params(WaitParams),
    request_body(content = schema::CommandRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "Accepted: the events were appended", body = schema::CommandResultJson),
        (status = 400, description = "Malformed command or query string (`Malformed`, `InvalidQuery`)", body = ErrorBody),
        (status = 409, description = "Rejected: `VersionConflict`", body = schema::CommandResultJson),
        (status = 413, description = "Body larger than 64 KiB (`PayloadTooLarge`)", body = ErrorBody),
        (status = 415, description = "The body is not sent as `Content-Type: application/json` (`UnsupportedMediaType`)", body = ErrorBody),
        (status = 422, description = "Rejected by the account's rules", body = schema::CommandResultJson),
        (status = 503, description = "Kafka did not take the command (`KafkaUnavailable`): retry with the same command_id", body = ErrorBody),
        (status = 504, description = "No result in time (`Timeout`): the command is queued; retry with the same command_id", body = ErrorBody),
    )
)]
async fn post_command(
    State(state): State<AppState>,
    caller: Option<Extension<Caller>>,
    params: Result<Query<WaitParams>, QueryRejection>,
    request_headers: axum::http::HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let Query(params) = params?;
    require_json(&request_headers)?;
    let body = body?;
    let principal = caller.and_then(|Extension(c)| c.principal);
    // W3C Trace Context: continue the caller's trace, or start one; the command record carries
    // it and the response names it.
    let trace = request_headers
        .get(TRACEPARENT)
        .and_then(|v| v.to_str().ok())
        .and_then(TraceContext::parse)
        .map_or_else(TraceContext::new_root, |parent| parent.child());
    let traceparent = trace.to_header();
    let command = (state.read_command)(&body, principal.as_deref())
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "Malformed", e.reason))?;
    let wait = params
        .timeout_ms
        .map_or(DEFAULT_WAIT, Duration::from_millis)
        .min(Duration::from_secs(60));
    let waiter = state.waiters.wait_for(command.command_id);
    let topic = Topics::new(&state.settings.topic_prefix).commands();
    let partition = canonical_partition(command.aggregate_id.as_bytes(), state.settings.partitions);
    let payload = &command.bytes;
    state
        .producer
        .send(
            FutureRecord::to(&topic)
                .key(&command.aggregate_id)
                .payload(payload)
                .partition(partition)
                .headers(OwnedHeaders::new().insert(Header {
                    key: TRACEPARENT,
                    value: Some(traceparent.as_str()),
                })),
            Duration::from_secs(5),
        )
        .await
        .map_err(|(e, _)| {
            tracing::error!(error = %e, "cannot produce command");
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "KafkaUnavailable",
                "Kafka did not confirm the command in time; its outcome is unknown: retry with the same command_id",
            )
        })?;
    let mut waiter = waiter;
    match tokio::time::timeout(wait, &mut waiter.receiver).await {
        Ok(Ok(result)) => Ok((
            result_status(&result),
            [(TRACEPARENT, traceparent)],
            Json(result),
        )
            .into_response()),
        _ => Err(ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            "Timeout",
            format!(
                "no result for command {} within {} ms; it is queued and will be processed — retry with the same command_id to get its result",
                command.command_id,
                wait.as_millis()
            ),
        )),
    }
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

/// `GET /ready`: 200 once every assigned partition is restored; 503 (with the error shape) before,
/// or after the engine stopped on a fatal error.
#[utoipa::path(get, path = "/ready", responses(
    (status = 200, description = "Ready", body = ReadyJson),
    (status = 503, description = "Not ready (`NotReady`), transactions failing without a commit for `READY_STALL_AFTER` (`Stalled`), or the engine stopped (`EngineFailed`)", body = ReadyJson),
))]
async fn ready(State(state): State<AppState>) -> Response {
    let ready = state.status.ready.load(Ordering::SeqCst);
    let partitions = state
        .status
        .partitions
        .lock()
        .map(|p| p.clone())
        .unwrap_or_default();
    let fatal = state.shutdown.failure();
    let restores = state
        .status
        .restores
        .lock()
        .map(|r| r.clone())
        .unwrap_or_default();
    let stalled = state.status.stalled(state.settings.ready_stall_after);
    let (code, error) = match (ready, fatal) {
        (_, Some(reason)) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Some(ErrorDetail {
                code: "EngineFailed".into(),
                message: reason,
            }),
        ),
        (true, None) => match stalled {
            None => (StatusCode::OK, None),
            Some((elapsed, reason)) => (
                StatusCode::SERVICE_UNAVAILABLE,
                Some(ErrorDetail {
                    code: "Stalled".into(),
                    message: format!(
                        "no transaction has committed for {}s while transactions keep failing \
                         (the last: {reason})",
                        elapsed.as_secs()
                    ),
                }),
            ),
        },
        (false, None) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Some(ErrorDetail {
                code: "NotReady".into(),
                message: "the assigned partitions are not restored yet".into(),
            }),
        ),
    };
    let body = ReadyJson {
        ready: ready && error.is_none(),
        partitions,
        restores,
        error,
    };
    (code, Json(body)).into_response()
}

/// `GET /metrics`: Prometheus text format.
#[utoipa::path(get, path = "/metrics", responses(
    (status = 200, description = "Prometheus text exposition format 0.0.4", content_type = "text/plain", body = String)
))]
async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    crate::metrics::set_failing(state.status.stalled(Duration::ZERO).map(|(d, _)| d));
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
}
