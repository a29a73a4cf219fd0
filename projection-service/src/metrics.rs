//! Prometheus metrics of the projection: names in one place, the process-wide recorder, and
//! small helpers the projector calls. Every series carries a `topic` label (the events topic),
//! so several projections in one process (tests) keep their figures apart. Names carry their
//! unit (`_seconds`), counters end in `_total`, every metric has HELP text, and label values are
//! snake_case (`code="invalid_json"`).

use std::sync::OnceLock;
use std::time::Duration;

use metrics::Unit;
use metrics_exporter_prometheus::PrometheusHandle;
use shared::runtime::label_value;

/// Counter: events applied to the read model.
pub const APPLIED: &str = "projection_events_applied_total";
/// Counter: re-delivered events skipped because their version was already applied.
pub const DUPLICATES: &str = "projection_events_duplicates_skipped_total";
/// Counter: messages sent to the dead-letter topic (label `code`).
pub const DEAD_LETTERED: &str = "projection_events_dead_lettered_total";
/// Counter: events parked behind a version gap.
pub const PARKED: &str = "projection_events_parked_total";
/// Counter: parked events applied once the gap closed.
pub const UNPARKED: &str = "projection_events_unparked_total";
/// Gauge: messages in the dead-letter topic `<topic>.dlq` (counted every few seconds).
pub const DEAD_LETTERS: &str = "projection_dead_letters";
/// Gauge: messages (a count, not a time) between the stored offset and the partition's last
/// stable offset.
pub const LAG: &str = "projection_consumer_lag";
/// Histogram: seconds to apply and commit one batch.
pub const BATCH_SECONDS: &str = "projection_batch_apply_seconds";
/// Counter: messages processed in committed batches (all outcomes).
pub const BATCH_MESSAGES: &str = "projection_messages_processed_total";
/// Counter: decodes retried because the schema registry was unreachable.
pub const REGISTRY_RETRIES: &str = "projection_registry_retries_total";
/// Counter: batches retried after a transient database or Kafka error.
pub const RETRIES: &str = "projection_batch_retries_total";
/// Gauge: seconds since the lag of every needed partition was last measured (grows while no
/// partition is assigned, the watermarks cannot be read or the monitor is gone).
pub const LAG_AGE: &str = "projection_lag_age_seconds";
/// Counter: fresh joins of the consumer group after a long time without partitions.
pub const REJOINS: &str = "projection_group_rejoins_total";

/// The process-wide Prometheus handle (the recorder `shared::runtime` installs), with this
/// crate's metrics described.
pub fn handle() -> PrometheusHandle {
    let handle = shared::runtime::prometheus();
    static DESCRIBED: OnceLock<()> = OnceLock::new();
    DESCRIBED.get_or_init(describe);
    handle
}

fn describe() {
    metrics::describe_counter!(APPLIED, Unit::Count, "Events applied to the read model");
    metrics::describe_gauge!(
        LAG_AGE,
        Unit::Seconds,
        "Seconds since the lag of every needed partition was last measured; /ready answers 503 Stalled past PROJECTION_STALL_AFTER"
    );
    metrics::describe_counter!(
        REJOINS,
        Unit::Count,
        "Fresh joins of the consumer group after a long time without partitions"
    );
    metrics::describe_counter!(
        DUPLICATES,
        Unit::Count,
        "Re-delivered events skipped (version already applied)"
    );
    metrics::describe_counter!(
        DEAD_LETTERED,
        Unit::Count,
        "Messages sent to the dead-letter topic, by code (snake_case)"
    );
    metrics::describe_counter!(PARKED, Unit::Count, "Events parked behind a version gap");
    metrics::describe_counter!(
        UNPARKED,
        Unit::Count,
        "Parked events applied once the gap closed"
    );
    metrics::describe_gauge!(
        DEAD_LETTERS,
        Unit::Count,
        "Messages in the dead-letter topic (counted every few seconds)"
    );
    metrics::describe_gauge!(
        LAG,
        Unit::Count,
        "Messages not yet projected, per partition (last stable offset minus position)"
    );
    metrics::describe_histogram!(
        BATCH_SECONDS,
        Unit::Seconds,
        "Seconds from a batch's first message to its commit"
    );
    metrics::describe_counter!(
        BATCH_MESSAGES,
        Unit::Count,
        "Messages processed in committed batches (all outcomes)"
    );
    metrics::describe_counter!(
        RETRIES,
        Unit::Count,
        "Batches retried after a transient database or Kafka error"
    );
    metrics::describe_counter!(
        REGISTRY_RETRIES,
        Unit::Count,
        "Decodes retried because the schema registry was unreachable"
    );
}

/// Keeps the histograms' memory bounded; runs until the process ends.
pub async fn upkeep(handle: PrometheusHandle) {
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        tick.tick().await;
        handle.run_upkeep();
    }
}

/// Records one committed batch.
#[derive(Debug, Clone)]
pub struct BatchFigures<'a> {
    /// The events topic (label).
    pub topic: &'a str,
    /// Applied events.
    pub applied: u64,
    /// Skipped duplicates.
    pub duplicates: u64,
    /// Newly parked.
    pub parked: u64,
    /// Parked events applied.
    pub unparked: u64,
    /// Messages in the batch.
    pub size: usize,
}

/// Adds a committed batch to the counters.
pub fn record_batch(f: &BatchFigures<'_>) {
    let topic = f.topic.to_owned();
    metrics::counter!(APPLIED, "topic" => topic.clone()).increment(f.applied);
    metrics::counter!(DUPLICATES, "topic" => topic.clone()).increment(f.duplicates);
    metrics::counter!(PARKED, "topic" => topic.clone()).increment(f.parked);
    metrics::counter!(UNPARKED, "topic" => topic.clone()).increment(f.unparked);
    metrics::counter!(BATCH_MESSAGES, "topic" => topic).increment(f.size as u64);
}

/// Records the time one batch took from its first message to its commit.
pub fn record_batch_time(topic: &str, elapsed: Duration) {
    metrics::histogram!(BATCH_SECONDS, "topic" => topic.to_owned()).record(elapsed.as_secs_f64());
}

/// Counts one dead letter.
pub fn record_dead_letter(topic: &str, code: shared::dlq::DeadLetterCode) {
    metrics::counter!(DEAD_LETTERED, "topic" => topic.to_owned(), "code" => label_value(code.as_str()))
        .increment(1);
}

/// Sets the number of messages in the dead-letter topic of `topic`.
pub fn record_dead_letter_count(topic: &str, count: i64) {
    metrics::gauge!(DEAD_LETTERS, "topic" => topic.to_owned()).set(count as f64);
}

/// Sets a partition's lag.
pub fn record_lag(topic: &str, partition: i32, lag: i64) {
    metrics::gauge!(LAG, "topic" => topic.to_owned(), "partition" => partition.to_string())
        .set(lag as f64);
}

/// Counts one retried batch.
pub fn record_retry(topic: &str) {
    metrics::counter!(RETRIES, "topic" => topic.to_owned()).increment(1);
}

/// Counts one decode retried because the registry was unreachable.
pub fn record_registry_retry(topic: &str) {
    metrics::counter!(REGISTRY_RETRIES, "topic" => topic.to_owned()).increment(1);
}

/// Sets how long ago the lag of every needed partition was last measured.
pub fn record_lag_age(topic: &str, age: Duration) {
    metrics::gauge!(LAG_AGE, "topic" => topic.to_owned()).set(age.as_secs_f64());
}

/// Counts one fresh join of the consumer group after a long time without partitions.
pub fn record_rejoin(topic: &str) {
    metrics::counter!(REJOINS, "topic" => topic.to_owned()).increment(1);
}
