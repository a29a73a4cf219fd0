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

/// Counts the events read by restores (tails and replays).
pub fn restored_events(count: usize) {
    metrics::counter!("restored_events_total").increment(count as u64);
}

/// Counts the partitions restored (each time one is, so a rebalance that keeps a partition
/// shows none).
pub fn restored_partitions(count: usize) {
    metrics::counter!("restored_partitions_total").increment(count as u64);
}

/// Counts records a restore could not decode and worked around, by kind (`snapshot`,
/// `checkpoint`, `result`).
pub fn restore_unreadable(kind: &'static str) {
    metrics::counter!("restore_unreadable_records_total", "kind" => kind).increment(1);
}

/// Counts the checkpoints committed.
pub fn checkpoints(count: usize, snapshots: usize) {
    metrics::counter!("checkpoints_total").increment(count as u64);
    metrics::counter!("checkpoint_snapshots_total").increment(snapshots as u64);
}

/// The live state held in memory: aggregates and remembered command ids.
pub fn set_memory(aggregates: usize, dedupe_entries: usize) {
    metrics::gauge!("aggregates_in_memory").set(aggregates as f64);
    metrics::gauge!("dedupe_entries").set(dedupe_entries as f64);
}
