//! The service's Prometheus metrics, named in one place.

use std::time::Duration;

/// Counts a processed command by outcome (`accepted`, a rejection code, `duplicate`,
/// `forwarded`, `unreadable`) and observes its processing latency (receipt to commit).
pub fn command(outcome: &'static str, latency: Duration) {
    metrics::counter!("commands_total", "outcome" => outcome).increment(1);
    metrics::histogram!("command_processing_seconds").record(latency.as_secs_f64());
}

/// Counts a transaction by result (`committed` or `aborted`).
pub fn transaction(result: &'static str) {
    metrics::counter!("transactions_total", "result" => result).increment(1);
}

/// Observes how long restoring newly assigned partitions took.
pub fn restore_seconds(elapsed: Duration) {
    metrics::histogram!("restore_seconds").record(elapsed.as_secs_f64());
}

/// The number of partitions this instance owns.
pub fn set_owned_partitions(count: usize) {
    metrics::gauge!("owned_partitions").set(count as f64);
}
