//! Restoring the state of newly assigned partitions before their commands are served, in time
//! that follows the live state, not the history:
//!
//! 1. the partition's latest [`Checkpoint`] (`<prefix>.command-checkpoints`, compacted);
//! 2. the latest snapshot of every aggregate (`<prefix>.snapshots`, compacted);
//! 3. the events from the checkpoint's offset on (read_committed, to the end): the tail;
//! 4. the command results of the dedupe window (`<prefix>.command-results`, from
//!    `now - DEDUPE_WINDOW`).
//!
//! A checkpoint commits in one transaction with a snapshot of every aggregate changed since the
//! previous one, so snapshots + tail are the whole state. The restore proves it: every tail
//! event must continue its aggregate's version (no gap), and the aggregates that existed at the
//! checkpoint must all have a snapshot (their count is in the checkpoint). A partition that
//! fails the proof, has no checkpoint (a store written before checkpoints existed) or has an
//! unreadable snapshot or checkpoint is replayed from its first event instead, still skipping
//! the decoding of events a snapshot covers, and then checkpointed at the first chance.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::AtomicBool;

use chrono::Utc;
use rdkafka::Offset;
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Message};
use shared::codec::{header, header_str};
use shared::envelope::{Checkpoint, Snapshot};
use shared::kafka::{TopicReader, Topics, canonical_partition};
use shared::{BankAccount, CommandResult, EventCodec, Settings};

use crate::metrics as m;
use crate::state::PartitionState;

/// Why a partition could not be restored.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// Shutdown (or a revocation) began during the restore.
    #[error("interrupted")]
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

/// The restored partitions and what it took.
#[derive(Debug, Default)]
pub struct Restored {
    /// State per restored partition.
    pub states: HashMap<i32, PartitionState>,
    /// What was read.
    pub stats: RestoreStats,
}

/// What a restore read: the figures that must stay flat as history grows.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RestoreStats {
    /// Snapshots read.
    pub snapshots: usize,
    /// Events read (tails, plus full replays).
    pub events: usize,
    /// Command results of the dedupe window read.
    pub results: usize,
    /// Partitions replayed from their first event (no usable checkpoint).
    pub replayed: Vec<i32>,
}

/// Restores the given partitions.
pub fn restore(
    settings: &Settings,
    codec: &EventCodec,
    partitions: &[i32],
    stop: &AtomicBool,
) -> Result<Restored, RestoreError> {
    let mut restored = Restored::default();
    if partitions.is_empty() {
        return Ok(restored);
    }
    let reader = Reader::new(settings, partitions, stop);
    // Opened together so that their connections and offset look-ups overlap.
    let checkpoint_reader = reader.open_whole(&reader.topics.command_checkpoints())?;
    let snapshot_reader = reader.open_whole(&reader.topics.snapshots())?;
    let result_reader = reader.open_window()?;
    let checkpoints = reader.checkpoints(checkpoint_reader)?;
    let mut snapshots = reader.snapshots(snapshot_reader)?;
    restored.stats.snapshots = snapshots.read;

    // The tails: from each partition's checkpoint, or from the beginning without a usable one.
    let starts: HashMap<i32, Option<&Checkpoint>> = partitions
        .iter()
        .map(|p| {
            let usable = checkpoints
                .get(p)
                .filter(|_| !snapshots.unreadable_in.contains(p));
            (*p, usable)
        })
        .collect();
    let mut states: HashMap<i32, PartitionState> = partitions
        .iter()
        .map(|p| (*p, snapshots.seed(*p)))
        .collect();
    let tail_starts: Vec<(i32, Offset)> = starts
        .iter()
        .map(|(p, c)| {
            (
                *p,
                c.map_or(Offset::Beginning, |c| Offset::Offset(c.next_event_offset)),
            )
        })
        .collect();
    let tails = reader.fold_events(codec, &tail_starts, &mut states, false)?;
    restored.stats.events += tails.values().map(|t| t.events).sum::<usize>();

    // The proof: a checkpointed partition whose tail has a gap, or whose snapshots miss an
    // aggregate the checkpoint counted, is replayed from its first event. Its state so far is a
    // valid start for that: every aggregate in it is a prefix of its history, and the replay
    // only applies versions beyond it.
    let mut replay = Vec::new();
    for (p, checkpoint) in &starts {
        let Some(checkpoint) = checkpoint else {
            replay_needed(&mut restored.stats, *p, "no usable checkpoint");
            continue;
        };
        let tail = &tails[p];
        let existed = states[p].aggregates().saturating_sub(tail.opened);
        let reason = match &tail.gap {
            Some(gap) => Some(gap.clone()),
            None if existed != checkpoint.aggregates => Some(format!(
                "the checkpoint counts {} aggregates but {existed} have snapshots",
                checkpoint.aggregates
            )),
            None => None,
        };
        if let Some(reason) = reason {
            tracing::error!(partition = p, %reason, "checkpoint incomplete; replaying the partition");
            m::restore_unreadable("checkpoint");
            replay.push(*p);
        }
    }
    if !replay.is_empty() {
        for p in &replay {
            replay_needed(&mut restored.stats, *p, "checkpoint incomplete");
        }
        let from_start: Vec<(i32, Offset)> =
            replay.iter().map(|p| (*p, Offset::Beginning)).collect();
        let replays = reader.fold_events(codec, &from_start, &mut states, true)?;
        restored.stats.events += replays.values().map(|t| t.events).sum::<usize>();
    }
    for p in &restored.stats.replayed {
        if let Some(state) = states.get_mut(p) {
            state.needs_checkpoint = true;
        }
    }

    restored.stats.results = reader.results(result_reader, &mut states)?;
    restored.states = states;
    Ok(restored)
}

fn replay_needed(stats: &mut RestoreStats, partition: i32, why: &str) {
    if !stats.replayed.contains(&partition) {
        tracing::info!(
            partition,
            why,
            "restoring the partition from its first event"
        );
        stats.replayed.push(partition);
    }
}

/// The latest readable snapshot of every aggregate of the partitions being restored, by
/// partition (a snapshot is written to its aggregate's partition).
#[derive(Default)]
struct Snapshots {
    latest: HashMap<i32, HashMap<String, BankAccount>>,
    /// Partitions with an unreadable snapshot: their aggregates fall back to the events.
    unreadable_in: HashSet<i32>,
    read: usize,
}

impl Snapshots {
    /// A partition's state made of its snapshots (moved out).
    fn seed(&mut self, partition: i32) -> PartitionState {
        PartitionState {
            accounts: self.latest.remove(&partition).unwrap_or_default(),
            ..PartitionState::default()
        }
    }
}

/// What folding one partition's events found.
#[derive(Debug, Default)]
struct Tail {
    events: usize,
    /// Aggregates whose first event (version 1) is in the tail: they did not exist before it.
    opened: u64,
    /// The first version gap, if any.
    gap: Option<String>,
}

/// What one event did to the state.
enum Folded {
    /// A snapshot already holds it.
    Covered { first: bool },
    /// Applied to its aggregate.
    Applied { first: bool },
    /// Its version does not follow the aggregate's.
    Gap(String),
}

/// Readers of the partitions' topics, sharing one restore group name and the stop flag.
struct Reader<'a> {
    settings: &'a Settings,
    partitions: &'a [i32],
    stop: &'a AtomicBool,
    topics: Topics,
    group: String,
    now_ms: i64,
    /// The dedupe window starts here (ms since the epoch).
    since_ms: i64,
}

impl<'a> Reader<'a> {
    fn new(settings: &'a Settings, partitions: &'a [i32], stop: &'a AtomicBool) -> Self {
        let now_ms = Utc::now().timestamp_millis();
        Reader {
            settings,
            partitions,
            stop,
            topics: Topics::new(&settings.topic_prefix),
            group: format!("{}.command-service.restore", settings.topic_prefix),
            now_ms,
            since_ms: now_ms.saturating_sub(
                i64::try_from(settings.dedupe_window.as_millis()).unwrap_or(i64::MAX),
            ),
        }
    }

    fn open(&self, topic: &str, starts: &[(i32, Offset)]) -> Result<TopicReader, RestoreError> {
        TopicReader::open_at(&self.settings.kafka, &self.group, topic, starts).map_err(|source| {
            RestoreError::Kafka {
                topic: topic.to_owned(),
                source,
            }
        })
    }

    fn open_whole(&self, topic: &str) -> Result<TopicReader, RestoreError> {
        let starts: Vec<(i32, Offset)> = self
            .partitions
            .iter()
            .map(|p| (*p, Offset::Beginning))
            .collect();
        self.open(topic, &starts)
    }

    fn drain(
        &self,
        reader: TopicReader,
        each: impl FnMut(&BorrowedMessage<'_>),
    ) -> Result<(), RestoreError> {
        if reader.drain_until(self.stop, each) {
            Ok(())
        } else {
            Err(RestoreError::Interrupted)
        }
    }

    /// The latest readable checkpoint of each partition.
    fn checkpoints(&self, reader: TopicReader) -> Result<HashMap<i32, Checkpoint>, RestoreError> {
        let mut latest = HashMap::new();
        self.drain(reader, |msg| {
            match msg.payload().map(serde_json::from_slice::<Checkpoint>) {
                Some(Ok(c)) if c.partition == msg.partition() => {
                    latest.insert(msg.partition(), c);
                }
                other => {
                    // The partition replays in full: slower, never wrong.
                    let error = match other {
                        Some(Err(e)) => e.to_string(),
                        _ => "missing or for another partition".into(),
                    };
                    tracing::error!(partition = msg.partition(), offset = msg.offset(), %error, "unreadable checkpoint ignored");
                    m::restore_unreadable("checkpoint");
                    latest.remove(&msg.partition());
                }
            }
        })?;
        Ok(latest)
    }

    /// The latest snapshot of each aggregate; an unreadable one drops the aggregate's snapshot
    /// and marks its partition for a replay.
    fn snapshots(&self, reader: TopicReader) -> Result<Snapshots, RestoreError> {
        let mut snapshots = Snapshots::default();
        let partitions = self.settings.partitions;
        self.drain(reader, |msg| {
            snapshots.read += 1;
            let latest = snapshots.latest.entry(msg.partition()).or_default();
            match msg.payload().map(serde_json::from_slice::<Snapshot>) {
                Some(Ok(s))
                    if canonical_partition(s.aggregate_id.as_bytes(), partitions)
                        != msg.partition() =>
                {
                    tracing::error!(partition = msg.partition(), offset = msg.offset(), aggregate_id = %s.aggregate_id, "snapshot on another partition than its aggregate's ignored");
                    m::restore_unreadable("snapshot");
                }
                Some(Ok(s))
                    if latest
                        .get(&s.aggregate_id)
                        .is_none_or(|old| old.version < s.version) =>
                {
                    latest.insert(s.aggregate_id, s.state);
                }
                // Older than one already read.
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    let key = msg.key().map(|k| String::from_utf8_lossy(k).into_owned());
                    tracing::error!(partition = msg.partition(), offset = msg.offset(), aggregate_id = ?key, error = %e, "unreadable snapshot ignored; the aggregate is restored from its events");
                    m::restore_unreadable("snapshot");
                    if let Some(key) = key {
                        latest.remove(&key);
                    }
                    snapshots.unreadable_in.insert(msg.partition());
                }
                None => {}
            }
        })?;
        Ok(snapshots)
    }

    /// Folds the events from `starts` into `states`. With `final_read`, a gap is a corrupt
    /// store; otherwise it is reported in the partition's [`Tail`] (the caller replays).
    fn fold_events(
        &self,
        codec: &EventCodec,
        starts: &[(i32, Offset)],
        states: &mut HashMap<i32, PartitionState>,
        final_read: bool,
    ) -> Result<HashMap<i32, Tail>, RestoreError> {
        let mut tails: HashMap<i32, Tail> =
            starts.iter().map(|(p, _)| (*p, Tail::default())).collect();
        let topic = self.topics.events();
        let mut corrupt: Option<RestoreError> = None;
        let reader = self.open(&topic, starts)?;
        self.drain(reader, |msg| {
            let partition = msg.partition();
            let (Some(state), Some(tail)) = (states.get_mut(&partition), tails.get_mut(&partition))
            else {
                return;
            };
            tail.events += 1;
            if tail.gap.is_some() || corrupt.is_some() {
                return;
            }
            match fold_event(codec, state, msg) {
                Ok(Folded::Covered { first }) => tail.opened += u64::from(first),
                Ok(Folded::Applied { first }) => tail.opened += u64::from(first),
                Ok(Folded::Gap(reason)) if !final_read => tail.gap = Some(reason),
                Ok(Folded::Gap(reason)) | Err(reason) => {
                    corrupt = Some(RestoreError::Corrupt {
                        topic: topic.clone(),
                        partition,
                        offset: msg.offset(),
                        reason,
                    });
                }
            }
        })?;
        m::restored_events(tails.values().map(|t| t.events).sum());
        match corrupt {
            Some(error) => Err(error),
            None => Ok(tails),
        }
    }

    /// A reader of the command results decided within the dedupe window.
    fn open_window(&self) -> Result<TopicReader, RestoreError> {
        let topic = self.topics.command_results();
        TopicReader::open_since(
            &self.settings.kafka,
            &self.group,
            &topic,
            self.partitions,
            self.since_ms,
        )
        .map_err(|source| RestoreError::Kafka { topic, source })
    }

    /// Fills each partition's dedupe window from the results read by `reader`; returns how
    /// many were read.
    fn results(
        &self,
        reader: TopicReader,
        states: &mut HashMap<i32, PartitionState>,
    ) -> Result<usize, RestoreError> {
        let (now_ms, since_ms) = (self.now_ms, self.since_ms);
        let mut read = 0;
        self.drain(reader, |msg| {
            read += 1;
            let at_ms = msg.timestamp().to_millis().unwrap_or(now_ms);
            match msg.payload().map(serde_json::from_slice::<CommandResult>) {
                Some(Ok(result)) if at_ms >= since_ms => {
                    if let Some(state) = states.get_mut(&msg.partition()) {
                        state.dedupe.insert(result.command_id, at_ms, result);
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    tracing::error!(partition = msg.partition(), offset = msg.offset(), error = %e, "unreadable command result ignored");
                    m::restore_unreadable("result");
                }
                None => {}
            }
        })?;
        Ok(read)
    }
}

/// Folds one event into its partition's state. Events a snapshot covers are recognised by
/// their headers and not decoded; the others are decoded from the JSON inside the wire format
/// (no registry round trip, so a registry outage cannot make a restore skip events).
fn fold_event(
    codec: &EventCodec,
    state: &mut PartitionState,
    msg: &BorrowedMessage<'_>,
) -> Result<Folded, String> {
    let key = msg.key().and_then(|k| std::str::from_utf8(k).ok());
    let header_version: Option<u64> =
        header_str(msg.headers(), header::AGGREGATE_VERSION).and_then(|v| v.parse().ok());
    if let (Some(id), Some(version)) = (key, header_version)
        && state.accounts.get(id).is_some_and(|a| a.version >= version)
    {
        return Ok(Folded::Covered {
            first: version == 1,
        });
    }
    let envelope = codec
        .decode_json(msg.payload().unwrap_or_default())
        .map_err(|e| e.to_string())?;
    let account = state
        .accounts
        .entry(envelope.aggregate_id.clone())
        .or_default();
    let first = envelope.version == 1;
    if envelope.version <= account.version {
        return Ok(Folded::Covered { first });
    }
    if envelope.version > account.version + 1 {
        return Ok(Folded::Gap(format!(
            "version gap: {} version {} follows version {}",
            envelope.aggregate_id, envelope.version, account.version
        )));
    }
    let event = envelope.event().map_err(|e| e.to_string())?;
    account.apply(&event);
    state.events_since_checkpoint += 1;
    state.dirty.insert(envelope.aggregate_id);
    Ok(Folded::Applied { first })
}
