//! The HTTP API: `POST /commands` (produce a command, wait for its result), `GET /health`,
//! `GET /ready`, `GET /metrics`.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde::Deserialize;
use serde_json::json;
use shared::kafka::{Topics, canonical_partition};
use shared::trace::{TRACEPARENT, TraceContext};
use shared::{CommandMessage, CommandResult, CommandStatus, RejectionCode, Settings};

use crate::engine::Status;
use crate::results::ResultWaiters;

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
    /// Metrics renderer.
    pub metrics: PrometheusHandle,
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
        (
            self.status,
            Json(json!({"error": {"code": self.code, "message": self.message}})),
        )
            .into_response()
    }
}

/// The router with every route.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/commands", post(post_command))
        .route("/health", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

#[derive(Deserialize)]
struct WaitParams {
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

async fn post_command(
    State(state): State<AppState>,
    Query(params): Query<WaitParams>,
    request_headers: axum::http::HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    // W3C Trace Context: continue the caller's trace, or start one; the command record carries
    // it and the response names it.
    let trace = request_headers
        .get(TRACEPARENT)
        .and_then(|v| v.to_str().ok())
        .and_then(TraceContext::parse)
        .map_or_else(TraceContext::new_root, |parent| parent.child());
    let traceparent = trace.to_header();
    let command = CommandMessage::from_bytes(&body)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "Malformed", e.reason))?;
    let wait = params
        .timeout_ms
        .map_or(DEFAULT_WAIT, Duration::from_millis)
        .min(Duration::from_secs(60));
    let waiter = state.waiters.wait_for(command.command_id);
    let topic = Topics::new(&state.settings.topic_prefix).commands();
    let partition = canonical_partition(command.aggregate_id.as_bytes(), state.settings.partitions);
    let payload = command.to_bytes();
    state
        .producer
        .send(
            FutureRecord::to(&topic)
                .key(&command.aggregate_id)
                .payload(&payload)
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

async fn ready(State(state): State<AppState>) -> Response {
    let ready = state.status.ready.load(Ordering::SeqCst);
    let partitions = state
        .status
        .partitions
        .lock()
        .map(|p| p.clone())
        .unwrap_or_default();
    let fatal = state.status.fatal.lock().ok().and_then(|f| f.clone());
    let restores = state
        .status
        .restores
        .lock()
        .map(|r| r.clone())
        .unwrap_or_default();
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        code,
        Json(
            json!({"ready": ready, "partitions": partitions, "error": fatal, "restores": restores}),
        ),
    )
        .into_response()
}

async fn metrics(State(state): State<AppState>) -> String {
    state.metrics.render()
}
