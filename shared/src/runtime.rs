//! Process plumbing both services share: tracing set-up, the shutdown signal (Ctrl-C or
//! SIGTERM) and the Prometheus recorder.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// Structured logs to stderr, filtered by `RUST_LOG` (default `info`). Safe to call twice.
///
/// A log line that cannot be written (stderr closed, a pipe whose reader died on Ctrl-C) is
/// dropped silently: tracing-subscriber would otherwise report it with `eprintln!`, which panics
/// on that same broken stderr, and a panic in the middle of a shutdown leaves Kafka clients
/// hanging in their destructors.
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,rdkafka=warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_writer(std::io::stderr)
        .log_internal_errors(false)
        .try_init();
}

/// Makes `trace` the parent of `span` in exported traces (no-op unless spans are exported).
pub fn set_parent(span: &tracing::Span, trace: &crate::trace::TraceContext) {
    let _ = (span, trace);
}

/// The trace context of the current span when spans are exported (so that a `traceparent` sent
/// from inside it names it as the parent); `None` otherwise.
pub fn current_trace() -> Option<crate::trace::TraceContext> {
    None
}

/// Resolves on the first Ctrl-C (SIGINT) or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = terminate => {},
    }
    tracing::info!("shutdown signal received");
}

/// The process-wide Prometheus recorder, installed on first use; render it for `GET /metrics`.
pub fn prometheus() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets(&[
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0, 30.0,
                ])
                .map(PrometheusBuilder::build_recorder)
                .unwrap_or_else(|_| PrometheusBuilder::new().build_recorder());
            let handle = recorder.handle();
            // Another recorder may already be installed (tests embedding several apps): then
            // this handle renders nothing, which is acceptable there.
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}
