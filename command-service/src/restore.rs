//! Restoring the state of newly assigned partitions before their commands are served: latest
//! snapshots, then the partition's events (read_committed, to the end), then the partition's
//! command results.
//!
//! The de-duplication index comes from two places: accepted commands from the `command_id`
//! header of their events (kept forever, like the events), rejected ones from the co-partitioned
//! `<prefix>.command-results` topic (kept for its retention, 7 days by default — the window in
//! which a rejected command's retry gets the original rejection instead of a fresh decision).
//! Events at or below an aggregate's snapshot version are not decoded: their headers suffice.

use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use shared::codec::{header, header_str};
use shared::envelope::{EventRef, Snapshot};
use shared::kafka::{TopicReader, Topics};
use shared::{CommandResult, CommandStatus, EventCodec, Settings};
use uuid::Uuid;

use crate::state::PartitionState;

/// Why a partition could not be restored.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// Shutdown began during the restore.
    #[error("interrupted by shutdown")]
    Interrupted,
    /// The event store holds an event this service cannot fold: serving commands on top of
    /// it would append versions that already exist. Someone must look at the topic.
    #[error("event at {topic} partition {partition} offset {offset}: {reason}")]
    Corrupt {
        /// The events topic.
        topic: String,
        /// Its partition.
        partition: i32,
        /// The event's offset.
        offset: i64,
        /// What is wrong.
        reason: String,
    },
    /// Kafka failed while reading.
    #[error("reading {topic}: {source}")]
    Kafka {
        /// The topic being read.
        topic: String,
        /// What librdkafka said.
        source: KafkaError,
    },
}

/// Restores the given partitions; returns their states and how many events were read.
pub fn restore(
    settings: &Settings,
    codec: &EventCodec,
    partitions: &[i32],
    stop: &AtomicBool,
) -> Result<(HashMap<i32, PartitionState>, usize), RestoreError> {
    let topics = Topics::new(&settings.topic_prefix);
    let mut states: HashMap<i32, PartitionState> = partitions
        .iter()
        .map(|p| (*p, PartitionState::default()))
        .collect();
    if partitions.is_empty() {
        return Ok((states, 0));
    }

    let started = Instant::now();
    let group = format!("{}.command-service.restore", settings.topic_prefix);
    let open = |topic: String| {
        TopicReader::open(&settings.kafka, &group, &topic, partitions)
            .map_err(|source| RestoreError::Kafka { topic, source })
    };
    let snapshot_reader = open(topics.snapshots())?;
    let event_reader = open(topics.events())?;
    let result_reader = open(topics.command_results())?;
    // 1. Latest snapshot per aggregate.
    let mut snapshots: HashMap<String, Snapshot> = HashMap::new();
    let complete = snapshot_reader.drain_until(stop, |msg| {
        match msg.payload().map(serde_json::from_slice::<Snapshot>) {
            Some(Ok(s))
                if snapshots
                    .get(&s.aggregate_id)
                    .is_none_or(|old| old.version < s.version) =>
            {
                snapshots.insert(s.aggregate_id.clone(), s);
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => {
                tracing::warn!(offset = msg.offset(), error = %e, "unreadable snapshot ignored")
            }
            None => {}
        }
    });
    if !complete {
        return Err(RestoreError::Interrupted);
    }
    for snapshot in snapshots.values() {
        if let Some(state) = snapshot_partition(&states, snapshot, settings.partitions) {
            state_mut(&mut states, state)
                .accounts
                .insert(snapshot.aggregate_id.clone(), snapshot.state.clone());
        }
    }

    // 2. Events: fold what the snapshots do not cover; collect accepted commands from headers.
    let mut accepted: HashMap<Uuid, (i32, String, Vec<EventRef>)> = HashMap::new();
    let mut events_read = 0usize;
    let events_topic = topics.events();
    let mut corrupt: Option<RestoreError> = None;
    let complete = event_reader.drain_until(stop, |msg| {
        events_read += 1;
        let partition = msg.partition();
        let aggregate_id = msg.key().map(|k| String::from_utf8_lossy(k).into_owned());
        let header_version: Option<u64> =
            header_str(msg.headers(), header::AGGREGATE_VERSION).and_then(|v| v.parse().ok());
        let command_id: Option<Uuid> =
            header_str(msg.headers(), header::COMMAND_ID).and_then(|v| v.parse().ok());
        let event_id: Option<Uuid> =
            header_str(msg.headers(), header::EVENT_ID).and_then(|v| v.parse().ok());
        let event_type = header_str(msg.headers(), header::EVENT_TYPE).map(str::to_owned);
        let state = states.entry(partition).or_default();
        let covered = match (&aggregate_id, header_version) {
            (Some(id), Some(v)) => state.accounts.get(id).is_some_and(|a| a.version >= v),
            _ => false,
        };
        let fast = match (
            covered,
            aggregate_id,
            header_version,
            command_id,
            event_id,
            event_type,
        ) {
            (true, Some(id), Some(version), command_id, Some(event_id), Some(event_type)) => {
                Some((
                    id,
                    command_id,
                    EventRef {
                        event_id,
                        event_type,
                        version,
                    },
                ))
            }
            _ => None,
        };
        let (aggregate_id, command_id, event_ref) = match fast {
            Some(found) => found,
            None => {
                let offset = msg.offset();
                let mut fail = |reason: String| {
                    corrupt.get_or_insert(RestoreError::Corrupt {
                        topic: events_topic.clone(),
                        partition,
                        offset,
                        reason,
                    });
                };
                // The JSON inside the wire format is enough here: no registry round trip, so
                // a registry outage cannot make a restore skip events.
                let envelope = match codec.decode_json(msg.payload().unwrap_or_default()) {
                    Ok(env) => env,
                    Err(e) => return fail(e.to_string()),
                };
                let account = state
                    .accounts
                    .entry(envelope.aggregate_id.clone())
                    .or_default();
                if envelope.version == account.version + 1 {
                    match envelope.event() {
                        Ok(event) => account.apply(&event),
                        Err(e) => return fail(e.to_string()),
                    }
                } else if envelope.version > account.version + 1 {
                    return fail(format!(
                        "version gap: {} version {} follows version {}",
                        envelope.aggregate_id, envelope.version, account.version
                    ));
                }
                let event_ref = EventRef {
                    event_id: envelope.event_id,
                    event_type: envelope.event_type.clone(),
                    version: envelope.version,
                };
                (
                    envelope.aggregate_id.clone(),
                    command_id.or(envelope.causation_id()),
                    event_ref,
                )
            }
        };
        if let Some(command_id) = command_id {
            accepted
                .entry(command_id)
                .or_insert_with(|| (partition, aggregate_id, Vec::new()))
                .2
                .push(event_ref);
        }
    });
    if !complete {
        return Err(RestoreError::Interrupted);
    }
    if let Some(error) = corrupt {
        return Err(error);
    }
    for (command_id, (partition, aggregate_id, events)) in accepted {
        let result = CommandResult {
            command_id,
            aggregate_id,
            status: CommandStatus::Accepted,
            version: events.last().map(|e| e.version),
            events,
            error: None,
        };
        state_mut(&mut states, partition)
            .results
            .insert(command_id, result);
    }

    // 3. Results (rejections, and accepted ones again).
    let complete = result_reader.drain_until(stop, |msg| {
        if let Some(Ok(result)) = msg.payload().map(serde_json::from_slice::<CommandResult>) {
            states
                .entry(msg.partition())
                .or_default()
                .results
                .entry(result.command_id)
                .or_insert(result);
        }
    });
    if !complete {
        return Err(RestoreError::Interrupted);
    }
    tracing::debug!(
        elapsed_ms = started.elapsed().as_millis() as u64,
        "restore read"
    );
    Ok((states, events_read))
}

fn snapshot_partition(
    states: &HashMap<i32, PartitionState>,
    snapshot: &Snapshot,
    partitions: i32,
) -> Option<i32> {
    let p = shared::kafka::canonical_partition(snapshot.aggregate_id.as_bytes(), partitions);
    states.contains_key(&p).then_some(p)
}

fn state_mut(states: &mut HashMap<i32, PartitionState>, partition: i32) -> &mut PartitionState {
    states.entry(partition).or_default()
}
