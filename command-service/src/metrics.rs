//! The service's Prometheus metrics, named and described (HELP text, unit) in one place. Names
//! carry their unit (`_seconds`) and counters end in `_total`; label values are snake_case
//! (`outcome="insufficient_funds"`).

use std::sync::OnceLock;
use std::time::Duration;

use metrics::Unit;
use metrics_exporter_prometheus::PrometheusHandle;
use shared::runtime::label_value;

/// Counter: processed commands, by `outcome`.
pub const COMMANDS: &str = "commands_total";
/// Histogram: seconds from a command's receipt to the commit of its transaction.
pub const COMMAND_PROCESSING: &str = "command_processing_seconds";
/// Counter: transactions, by `result`.
pub const TRANSACTIONS: &str = "transactions_total";
/// Histogram: seconds a transaction's commit took (snapshots, deliveries, offsets, commit), by
/// `phase`.
pub const COMMIT_PHASE: &str = "transaction_commit_phase_seconds";
/// Histogram: seconds to restore newly assigned partitions.
pub const RESTORE: &str = "restore_seconds";
/// Gauge: partitions this instance owns.
pub const OWNED_PARTITIONS: &str = "owned_partitions";
/// Counter: events read by restores.
pub const RESTORED_EVENTS: &str = "restored_events_total";
/// Counter: partitions restored.
pub const RESTORED_PARTITIONS: &str = "restored_partitions_total";
/// Counter: records a restore could not decode, by `kind`.
pub const RESTORE_UNREADABLE: &str = "restore_unreadable_records_total";
/// Counter: checkpoints committed.
pub const CHECKPOINTS: &str = "checkpoints_total";
/// Counter: snapshots written with checkpoints.
pub const CHECKPOINT_SNAPSHOTS: &str = "checkpoint_snapshots_total";
/// Gauge: aggregates held in memory.
pub const AGGREGATES: &str = "aggregates_in_memory";
/// Gauge: command ids remembered for deduplication.
pub const DEDUPE_ENTRIES: &str = "dedupe_entries";
/// Gauge: seconds since the last commit while transactions keep failing (0 while they commit).
pub const TRANSACTIONS_FAILING: &str = "transactions_failing_seconds";

/// The process-wide Prometheus handle (the recorder `shared::runtime` installs), with this
/// crate's metrics described.
pub fn handle() -> PrometheusHandle {
    let handle = shared::runtime::prometheus();
    static DESCRIBED: OnceLock<()> = OnceLock::new();
    DESCRIBED.get_or_init(describe);
    handle
}

fn describe() {
    metrics::describe_counter!(
        COMMANDS,
        Unit::Count,
        "Commands processed, by outcome (accepted, a rejection code in snake_case, duplicate, forwarded, unreadable)"
    );
    metrics::describe_histogram!(
        COMMAND_PROCESSING,
        Unit::Seconds,
        "Seconds from a command's receipt to the commit of its transaction"
    );
    metrics::describe_counter!(
        TRANSACTIONS,
        Unit::Count,
        "Kafka transactions, by result (committed, aborted)"
    );
    metrics::describe_histogram!(
        COMMIT_PHASE,
        Unit::Seconds,
        "Seconds each phase of a transaction took (checkpoints: writing the due checkpoints when it begins; snapshots: waiting for the offsets of snapshotted events; deliveries: waiting until every record is written; offsets: send_offsets_to_transaction; commit: commit_transaction)"
    );
    metrics::describe_histogram!(
        RESTORE,
        Unit::Seconds,
        "Seconds to restore newly assigned partitions"
    );
    metrics::describe_gauge!(
        OWNED_PARTITIONS,
        Unit::Count,
        "Partitions this instance owns"
    );
    metrics::describe_counter!(
        RESTORED_EVENTS,
        Unit::Count,
        "Events read by restores (checkpoint tails and replays)"
    );
    metrics::describe_counter!(
        RESTORED_PARTITIONS,
        Unit::Count,
        "Partitions restored (a partition kept across a rebalance is not counted again)"
    );
    metrics::describe_counter!(
        RESTORE_UNREADABLE,
        Unit::Count,
        "Records a restore could not decode and worked around, by kind (snapshot, checkpoint, result)"
    );
    metrics::describe_counter!(CHECKPOINTS, Unit::Count, "Partition checkpoints committed");
    metrics::describe_counter!(
        CHECKPOINT_SNAPSHOTS,
        Unit::Count,
        "Snapshots written with the checkpoints"
    );
    metrics::describe_gauge!(AGGREGATES, Unit::Count, "Aggregates held in memory");
    metrics::describe_gauge!(
        TRANSACTIONS_FAILING,
        Unit::Seconds,
        "Seconds since the last commit while transactions keep failing (0 while they commit); /ready answers 503 Stalled past READY_STALL_AFTER"
    );
    metrics::describe_gauge!(
        DEDUPE_ENTRIES,
        Unit::Count,
        "Command ids remembered for deduplication"
    );
}

/// Counts a processed command by outcome (`accepted`, a rejection code in snake_case,
/// `duplicate`, `forwarded`, `unreadable`) and observes its processing latency (receipt to
/// commit).
pub fn command(outcome: &'static str, latency: Duration) {
    metrics::counter!(COMMANDS, "outcome" => label_value(outcome)).increment(1);
    metrics::histogram!(COMMAND_PROCESSING).record(latency.as_secs_f64());
}

/// Counts a transaction by result (`committed` or `aborted`).
pub fn transaction(result: &'static str) {
    metrics::counter!(TRANSACTIONS, "result" => result).increment(1);
}

/// Observes how long a phase of a transaction took (`checkpoints`, `snapshots`, `deliveries`,
/// `offsets`, `commit`).
pub fn commit_phase(phase: &'static str, elapsed: Duration) {
    metrics::histogram!(COMMIT_PHASE, "phase" => phase).record(elapsed.as_secs_f64());
}

/// Observes how long restoring newly assigned partitions took.
pub fn restore_seconds(elapsed: Duration) {
    metrics::histogram!(RESTORE).record(elapsed.as_secs_f64());
}

/// The number of partitions this instance owns.
pub fn set_owned_partitions(count: usize) {
    metrics::gauge!(OWNED_PARTITIONS).set(count as f64);
}

/// Counts the events read by restores (tails and replays).
pub fn restored_events(count: usize) {
    metrics::counter!(RESTORED_EVENTS).increment(count as u64);
}

/// Counts the partitions restored (each time one is, so a rebalance that keeps a partition
/// shows none).
pub fn restored_partitions(count: usize) {
    metrics::counter!(RESTORED_PARTITIONS).increment(count as u64);
}

/// Counts records a restore could not decode and worked around, by kind (`snapshot`,
/// `checkpoint`, `result`).
pub fn restore_unreadable(kind: &'static str) {
    metrics::counter!(RESTORE_UNREADABLE, "kind" => kind).increment(1);
}

/// Counts the checkpoints committed.
pub fn checkpoints(count: usize, snapshots: usize) {
    metrics::counter!(CHECKPOINTS).increment(count as u64);
    metrics::counter!(CHECKPOINT_SNAPSHOTS).increment(snapshots as u64);
}

/// The live state held in memory: aggregates and remembered command ids.
pub fn set_memory(aggregates: usize, dedupe_entries: usize) {
    metrics::gauge!(AGGREGATES).set(aggregates as f64);
    metrics::gauge!(DEDUPE_ENTRIES).set(dedupe_entries as f64);
}

/// Sets how long transactions have been failing without a commit (`None`: they commit).
pub fn set_failing(for_: Option<Duration>) {
    metrics::gauge!(TRANSACTIONS_FAILING).set(for_.map_or(0.0, |d| d.as_secs_f64()));
}
