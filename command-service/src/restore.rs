//! Restoring the state of newly assigned partitions before their commands are served, in time
//! that follows the live state, not the history:
//!
//! 1. the partition's latest [`Checkpoint`] (`<prefix>.command-checkpoints`, compacted);
//! 2. the latest snapshot of every aggregate (`<prefix>.snapshots`, compacted);
//! 3. the events from the checkpoint's offset on (read_committed, to the end): the tail;
//! 4. the command results of the dedupe window (`<prefix>.command-results`) into the local
//!    dedupe store ([`crate::dedupe`]): from the store's changelog position when the record
//!    there is the one the store saw, else from `now - DEDUPE_WINDOW`.
//!
//! A checkpoint commits in one transaction with a snapshot of every aggregate changed since the
//! previous one, so snapshots + tail are the whole state. The restore proves it: every tail
//! event must continue its aggregate's version (no gap), and the aggregates that existed at the
//! checkpoint must all have a snapshot (their count is in the checkpoint). A partition that
//! fails the proof, has no checkpoint (a store written before checkpoints existed) or has an
//! unreadable snapshot or checkpoint is replayed from its first event instead, still skipping
//! the decoding of events a snapshot covers, and then checkpointed at the first chance.
//!
//! An event that cannot be folded (garbage, an upcast that fails, a version gap in a complete
//! read) quarantines its aggregate instead of failing the restore: commands on it are answered
//! `AggregateUnavailable`, every other aggregate is served. The checkpoint carries the list.
//! An event on another partition than its aggregate's stops the restore with an error naming
//! it and the fix: its aggregate's history would otherwise be ignored.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use chrono::DateTime;
use compact_str::CompactString;
use rdkafka::Offset;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Message};
use shared::aggregate::Aggregate;
use shared::codec::{header, header_str};
use shared::envelope::{Checkpoint, Quarantined, Snapshot, record_fingerprint};
use shared::kafka::{SettleError, TopicReader, Topics, TransactionWatch, canonical_partition};
use shared::{CommandResult, EventCodec, Settings};

use crate::dedupe::{DedupeStore, Entry, Position, ResultRef};
use crate::metrics as m;
use crate::state::{Held, PartitionState};

/// Why a partition could not be restored.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// Shutdown (or a revocation) began during the restore.
    #[error("interrupted")]
    Interrupted,
    /// The local dedupe store failed.
    #[error(transparent)]
    Dedupe(#[from] crate::dedupe::StoreError),
    /// Kafka failed while reading.
    #[error("reading {topic}: {source}")]
    Kafka {
        /// The topic being read.
        topic: String,
        /// What librdkafka said.
        source: KafkaError,
    },
    /// A transaction stayed open below the end of a partition for [`HANGING_AFTER`].
    #[error(transparent)]
    Hanging(SettleError),
    /// The events partition holds events of aggregates that live on other partitions.
    #[error(
        "events partition {partition} holds {count} event(s) of aggregates that live on other \
         partitions with PARTITIONS={partitions} (first: {aggregate_id} at offset {offset}, which \
         belongs on partition {belongs_on}). The partition count was changed after events were \
         written, or a producer used another partitioner; serving would ignore those accounts' \
         histories. Fix: set PARTITIONS (and the topics) back to the count the events were \
         written with; to grow, copy the events into a new TOPIC_PREFIX keyed by aggregate id \
         (README, \"Changing the partition count\")"
    )]
    Misplaced {
        /// The events partition read.
        partition: i32,
        /// How many of its events are misplaced.
        count: u64,
        /// The first misplaced event's aggregate.
        aggregate_id: String,
        /// The first misplaced event's offset.
        offset: i64,
        /// Where that aggregate lives with `partitions`.
        belongs_on: i32,
        /// `PARTITIONS`.
        partitions: i32,
    },
}

/// How long a restore waits for a transaction open below the end before it calls it hanging and
/// stops the service: this system's writers end theirs within 10 s (the broker aborts them at
/// the latest a check interval after), so a wait this long means a hanging transaction.
pub const HANGING_AFTER: Duration = Duration::from_secs(300);

/// The restored partitions and what it took.
#[derive(Debug)]
pub struct Restored<A> {
    /// State per restored partition.
    pub states: HashMap<i32, PartitionState<A>>,
    /// What was read.
    pub stats: RestoreStats,
}

impl<A> Default for Restored<A> {
    fn default() -> Self {
        Restored {
            states: HashMap::new(),
            stats: RestoreStats::default(),
        }
    }
}

/// What a restore read: the figures that must stay flat as history grows.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RestoreStats {
    /// Snapshots read.
    pub snapshots: usize,
    /// Events read (tails, plus full replays).
    pub events: usize,
    /// Command results read (the store's tail, or the whole window for a partition the local
    /// store does not cover).
    pub results: usize,
    /// Partitions replayed from their first event (no usable checkpoint).
    pub replayed: Vec<i32>,
}

/// Restores the given partitions. `now_ms` is the brokers' time (the dedupe window ends there,
/// whatever this writer's clock says).
pub fn restore<A: Aggregate>(
    settings: &Settings,
    codec: &EventCodec,
    dedupe: &DedupeStore,
    partitions: &[i32],
    stop: &AtomicBool,
    now_ms: i64,
) -> Result<Restored<A>, RestoreError> {
    let mut restored = Restored::<A>::default();
    if partitions.is_empty() {
        return Ok(restored);
    }
    let reader = Reader::new(settings, partitions, stop, now_ms)?;
    // Opened together so that their connections and offset look-ups overlap.
    let checkpoint_reader = reader.open_whole(&reader.topics.command_checkpoints())?;
    let snapshot_reader = reader.open_whole(&reader.topics.snapshots())?;
    let mut checkpoints = reader.checkpoints(checkpoint_reader)?;
    let mut snapshots = reader.snapshots(snapshot_reader)?;
    restored.stats.snapshots = snapshots.read;
    for (p, why) in reader.repaired(&checkpoints)? {
        // The store changed under a quarantine (the documented repair): read it all again.
        tracing::info!(partition = p, %why, "a quarantined record changed: the partition is read again from its first event");
        checkpoints.remove(&p);
    }

    let starts = usable_checkpoints(partitions, &checkpoints, &snapshots);
    let mut states = seed_states(&starts, &mut snapshots);
    let tails = reader.fold_events(codec, &tail_starts(&starts), &mut states)?;
    restored.stats.events += tails.values().map(|t| t.events).sum::<usize>();

    for (p, reason) in incomplete(&starts, &tails, &states) {
        replay_needed(&mut restored.stats, p, &reason);
    }
    let replay: Vec<(i32, Offset)> = restored
        .stats
        .replayed
        .iter()
        .filter(|p| starts.get(*p).is_some_and(Option::is_some))
        .map(|p| (*p, Offset::Beginning))
        .collect();
    if !replay.is_empty() {
        // The state so far is a valid start: every aggregate in it is a prefix of its history,
        // and the replay only applies versions beyond it.
        let replays = reader.fold_events(codec, &replay, &mut states)?;
        restored.stats.events += replays.values().map(|t| t.events).sum::<usize>();
    }
    for p in &restored.stats.replayed {
        if let Some(state) = states.get_mut(p) {
            state.needs_checkpoint = true;
        }
    }

    restored.stats.results = reader.results(dedupe)?;
    restored.states = states;
    Ok(restored)
}

/// Each partition's checkpoint, if it can be used (none when a snapshot of the partition is
/// unreadable: the partition is replayed).
fn usable_checkpoints<'c, A>(
    partitions: &[i32],
    checkpoints: &'c HashMap<i32, Checkpoint>,
    snapshots: &Snapshots<A>,
) -> HashMap<i32, Option<&'c Checkpoint>> {
    partitions
        .iter()
        .map(|p| {
            let usable = checkpoints
                .get(p)
                .filter(|_| !snapshots.unreadable_in.contains(p));
            (*p, usable)
        })
        .collect()
}

/// Each partition's state as its snapshots and checkpoint hold it: the aggregates, the
/// quarantined ones and the clock floor.
fn seed_states<A>(
    starts: &HashMap<i32, Option<&Checkpoint>>,
    snapshots: &mut Snapshots<A>,
) -> HashMap<i32, PartitionState<A>> {
    starts
        .iter()
        .map(|(p, checkpoint)| {
            let mut state = snapshots.seed(*p);
            if let Some(c) = checkpoint {
                for q in &c.quarantined {
                    state.quarantine(&q.aggregate_id, q.offset, q.reason.clone(), q.fingerprint);
                }
                // Older checkpoints lack the floor; their time is after every event they cover.
                state.saw_event_at(c.last_event_at.unwrap_or(c.taken_at));
            }
            (*p, state)
        })
        .collect()
}

/// Where each partition's events are read from: its checkpoint's offset, or the beginning.
fn tail_starts(starts: &HashMap<i32, Option<&Checkpoint>>) -> Vec<(i32, Offset)> {
    starts
        .iter()
        .map(|(p, c)| {
            (
                *p,
                c.map_or(Offset::Beginning, |c| Offset::Offset(c.next_event_offset)),
            )
        })
        .collect()
}

/// The proof: the partitions (with why) whose restore is not complete. One without a
/// checkpoint was read from its beginning already; a checkpointed one whose tail has a gap,
/// or whose snapshots miss an aggregate the checkpoint counted, must be replayed.
fn incomplete<A>(
    starts: &HashMap<i32, Option<&Checkpoint>>,
    tails: &HashMap<i32, Tail>,
    states: &HashMap<i32, PartitionState<A>>,
) -> Vec<(i32, String)> {
    let mut incomplete = Vec::new();
    for (p, checkpoint) in starts {
        let Some(checkpoint) = checkpoint else {
            incomplete.push((*p, "no usable checkpoint".to_owned()));
            continue;
        };
        let tail = &tails[p];
        let existed = states[p].aggregates().saturating_sub(tail.opened);
        let reason = match &tail.gap {
            Some(gap) => gap.clone(),
            None if existed != checkpoint.aggregates => format!(
                "the checkpoint counts {} aggregates but {existed} have snapshots",
                checkpoint.aggregates
            ),
            None => continue,
        };
        tracing::error!(partition = p, %reason, "checkpoint incomplete; replaying the partition");
        m::restore_unreadable("checkpoint");
        incomplete.push((*p, reason));
    }
    incomplete
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
struct Snapshots<A> {
    latest: HashMap<i32, HashMap<CompactString, Held<A>>>,
    /// Partitions with an unreadable snapshot: their aggregates fall back to the events.
    unreadable_in: HashSet<i32>,
    read: usize,
}

impl<A> Default for Snapshots<A> {
    fn default() -> Self {
        Snapshots {
            latest: HashMap::new(),
            unreadable_in: HashSet::new(),
            read: 0,
        }
    }
}

impl<A> Snapshots<A> {
    /// A partition's state made of its snapshots (moved out).
    fn seed(&mut self, partition: i32) -> PartitionState<A> {
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
    /// Read from the partition's first event: nothing comes before it.
    complete_read: bool,
    /// Aggregates whose first event (version 1) is in the tail: they did not exist before it.
    opened: u64,
    /// The first version gap of a tail read from a checkpoint, if any.
    gap: Option<String>,
    /// Events of aggregates that live on other partitions, and the first (offset, aggregate).
    misplaced: u64,
    first_misplaced: Option<(i64, String)>,
}

impl Tail {
    /// An error if the partition holds events of aggregates that live elsewhere: serving it
    /// would ignore those aggregates' histories (and let them be opened again).
    fn check_placement(&self, partition: i32, partitions: i32) -> Result<(), RestoreError> {
        match &self.first_misplaced {
            None => Ok(()),
            Some((offset, aggregate_id)) => Err(RestoreError::Misplaced {
                partition,
                count: self.misplaced,
                offset: *offset,
                belongs_on: canonical_partition(aggregate_id.as_bytes(), partitions),
                aggregate_id: aggregate_id.clone(),
                partitions,
            }),
        }
    }
}

impl Tail {
    /// Folds one event, quarantining its aggregate when it cannot be read.
    fn fold<A: Aggregate>(
        &mut self,
        codec: &EventCodec,
        state: &mut PartitionState<A>,
        msg: &BorrowedMessage<'_>,
        partitions: i32,
    ) {
        match fold_event(codec, state, msg, partitions) {
            Folded::Covered { first } | Folded::Applied { first } => {
                self.opened += u64::from(first);
            }
            Folded::Skipped => {}
            Folded::Misplaced { aggregate_id } => {
                m::restore_unreadable("misplaced_event");
                self.misplaced += 1;
                self.first_misplaced
                    .get_or_insert((msg.offset(), aggregate_id));
            }
            Folded::Gap { reason, .. } if !self.complete_read => self.gap = Some(reason),
            Folded::Gap {
                aggregate_id,
                reason,
            }
            | Folded::Unreadable {
                aggregate_id: Some(aggregate_id),
                reason,
            } => {
                m::restore_unreadable("event");
                let fingerprint = record_fingerprint(msg.key(), msg.payload());
                state.quarantine(&aggregate_id, msg.offset(), reason, Some(fingerprint));
            }
            Folded::Unreadable {
                aggregate_id: None,
                reason,
            } => {
                // No aggregate to set aside: if one of its events is lost with it, the version
                // gap that follows quarantines that aggregate.
                m::restore_unreadable("event");
                tracing::error!(partition = msg.partition(), offset = msg.offset(), %reason, "unreadable event without an aggregate id ignored");
            }
        }
    }
}

/// What one event did to the state.
enum Folded {
    /// A snapshot already holds it.
    Covered { first: bool },
    /// Applied to its aggregate.
    Applied { first: bool },
    /// Not folded: its aggregate is quarantined.
    Skipped,
    /// Its aggregate lives on another partition (the partition count changed, or a producer
    /// used another partitioner).
    Misplaced { aggregate_id: String },
    /// Its version does not follow the aggregate's.
    Gap {
        aggregate_id: String,
        reason: String,
    },
    /// It cannot be read (garbage, an upcast that fails, data that does not fit its type).
    Unreadable {
        aggregate_id: Option<String>,
        reason: String,
    },
}

/// Readers of the partitions' topics, sharing one restore group name and the stop flag.
struct Reader<'a> {
    settings: &'a Settings,
    /// Each topic is read only once the transactions open in it have ended.
    watch: TransactionWatch,
    partitions: &'a [i32],
    stop: &'a AtomicBool,
    topics: Topics,
    group: String,
    now_ms: i64,
    /// The dedupe window starts here (ms since the epoch).
    since_ms: i64,
}

impl<'a> Reader<'a> {
    fn new(
        settings: &'a Settings,
        partitions: &'a [i32],
        stop: &'a AtomicBool,
        now_ms: i64,
    ) -> Result<Self, RestoreError> {
        let group = format!("{}.command-service.restore", settings.topic_prefix);
        let watch = TransactionWatch::new(&settings.kafka, &format!("{group}.watch")).map_err(
            |source| RestoreError::Kafka {
                topic: "(transaction watch)".into(),
                source,
            },
        )?;
        Ok(Reader {
            settings,
            watch,
            partitions,
            stop,
            topics: Topics::new(&settings.topic_prefix),
            group,
            now_ms,
            since_ms: now_ms.saturating_sub(
                i64::try_from(settings.dedupe_window.as_millis()).unwrap_or(i64::MAX),
            ),
        })
    }

    /// Waits until no transaction is open in `topic`'s partitions below their end (a writer that
    /// was replaced may have one, and what committed after it would not be read).
    fn settle(&self, topic: &str) -> Result<(), RestoreError> {
        let kafka = |source| RestoreError::Kafka {
            topic: topic.to_owned(),
            source,
        };
        match self
            .watch
            .settle(topic, self.partitions, self.stop, HANGING_AFTER)
        {
            Ok(true) => Ok(()),
            Ok(false) => Err(RestoreError::Interrupted),
            Err(SettleError::Kafka(source)) => Err(kafka(source)),
            Err(hanging @ SettleError::Hanging { .. }) => Err(RestoreError::Hanging(hanging)),
        }
    }

    fn open(&self, topic: &str, starts: &[(i32, Offset)]) -> Result<TopicReader, RestoreError> {
        self.settle(topic)?;
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
    fn snapshots<A: Aggregate>(&self, reader: TopicReader) -> Result<Snapshots<A>, RestoreError> {
        let mut snapshots = Snapshots::<A>::default();
        let partitions = self.settings.partitions;
        self.drain(reader, |msg| {
            snapshots.read += 1;
            let latest = snapshots.latest.entry(msg.partition()).or_default();
            match msg.payload().map(serde_json::from_slice::<Snapshot<A>>) {
                Some(Ok(s))
                    if canonical_partition(s.aggregate_id.as_bytes(), partitions)
                        != msg.partition() =>
                {
                    tracing::error!(partition = msg.partition(), offset = msg.offset(), aggregate_id = %s.aggregate_id, "snapshot on another partition than its aggregate's ignored");
                    m::restore_unreadable("snapshot");
                }
                Some(Ok(s))
                    if latest
                        .get(s.aggregate_id.as_str())
                        .is_none_or(|old| old.version < s.version) =>
                {
                    let held = Held {
                        version: s.version,
                        state: s.state,
                    };
                    latest.insert(s.aggregate_id.into(), held);
                }
                // Older than one already read.
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    let key = msg.key().map(|k| String::from_utf8_lossy(k).into_owned());
                    tracing::error!(partition = msg.partition(), offset = msg.offset(), aggregate_id = ?key, error = %e, "unreadable snapshot ignored; the aggregate is restored from its events");
                    m::restore_unreadable("snapshot");
                    if let Some(key) = key {
                        latest.remove(key.as_str());
                    }
                    snapshots.unreadable_in.insert(msg.partition());
                }
                None => {}
            }
        })?;
        Ok(snapshots)
    }

    /// Folds the events from `starts` into `states`. A partition read from its beginning is
    /// read in full: a version gap there quarantines the aggregate. A partition read from a
    /// checkpoint reports its first gap in its [`Tail`] (the caller replays it).
    fn fold_events<A: Aggregate>(
        &self,
        codec: &EventCodec,
        starts: &[(i32, Offset)],
        states: &mut HashMap<i32, PartitionState<A>>,
    ) -> Result<HashMap<i32, Tail>, RestoreError> {
        let mut tails: HashMap<i32, Tail> = starts
            .iter()
            .map(|(p, start)| {
                let tail = Tail {
                    complete_read: *start == Offset::Beginning,
                    ..Tail::default()
                };
                (*p, tail)
            })
            .collect();
        let partitions = self.settings.partitions;
        let reader = self.open(&self.topics.events(), starts)?;
        self.drain(reader, |msg| {
            let partition = msg.partition();
            let (Some(state), Some(tail)) = (states.get_mut(&partition), tails.get_mut(&partition))
            else {
                return;
            };
            tail.events += 1;
            if tail.gap.is_none() {
                tail.fold(codec, state, msg, partitions);
            }
        })?;
        m::restored_events(tails.values().map(|t| t.events).sum());
        for (p, tail) in &tails {
            tail.check_placement(*p, partitions)?;
        }
        Ok(tails)
    }

    /// The partitions (with why) whose checkpoint quarantines an aggregate for a record that is
    /// no longer the one it saw: missing, or with another fingerprint. Quarantines from before
    /// fingerprints were recorded are kept as they are.
    fn repaired(
        &self,
        checkpoints: &HashMap<i32, Checkpoint>,
    ) -> Result<Vec<(i32, String)>, RestoreError> {
        let checked: Vec<(i32, &Quarantined)> = checkpoints
            .iter()
            .flat_map(|(p, c)| c.quarantined.iter().map(move |q| (*p, q)))
            .filter(|(_, q)| q.fingerprint.is_some())
            .collect();
        if checked.is_empty() {
            return Ok(Vec::new());
        }
        let topic = self.topics.events();
        let kafka = |source| RestoreError::Kafka {
            topic: topic.clone(),
            source,
        };
        let consumer: BaseConsumer = self
            .settings
            .kafka
            .client_config()
            .set("group.id", &self.group)
            .set("enable.auto.commit", "false")
            .set("isolation.level", "read_committed")
            .set("enable.partition.eof", "true")
            .create()
            .map_err(kafka)?;
        let mut repaired = Vec::new();
        for (p, q) in checked {
            if repaired.iter().any(|(r, _)| *r == p) {
                continue;
            }
            let found = record_at(&consumer, &topic, p, q.offset).map_err(kafka)?;
            if found != q.fingerprint {
                repaired.push((
                    p,
                    format!(
                        "the record of {} at offset {} is not the unreadable one any more",
                        q.aggregate_id, q.offset
                    ),
                ));
            }
        }
        Ok(repaired)
    }

    /// Brings the dedupe store up to the end of each partition's results: from just before the
    /// store's changelog position (the record there must be the one the store saw: else the
    /// topic is another incarnation, or the store too old, and the partition is read again from
    /// the window's start), or from the window's start for a partition the store has no
    /// position of. Returns how many records were read.
    fn results(&self, dedupe: &DedupeStore) -> Result<usize, RestoreError> {
        let topic = self.topics.command_results();
        self.settle(&topic)?;
        let kafka = |source| RestoreError::Kafka {
            topic: topic.clone(),
            source,
        };
        let window = TopicReader::offsets_since(
            &self.settings.kafka,
            &self.group,
            &topic,
            self.partitions,
            self.since_ms,
        )
        .map_err(kafka)?;
        let window_start = |p: &i32| window.get(p).copied().unwrap_or(Offset::End);
        let mut checks = HashMap::new();
        let mut starts = Vec::with_capacity(self.partitions.len());
        for p in self.partitions {
            match dedupe.position(*p)? {
                Some(position) if position.next > 0 => {
                    checks.insert(*p, position);
                    starts.push((*p, Offset::Offset(position.next - 1)));
                }
                _ => {
                    dedupe.clear(*p)?;
                    starts.push((*p, window_start(p)));
                }
            }
        }
        let (mut read, stale) = self.read_results(&topic, &starts, &checks, dedupe)?;
        if !stale.is_empty() {
            tracing::warn!(?stale, %topic, "the local dedupe store does not match the results topic: reading these partitions' whole window");
            let mut again = Vec::with_capacity(stale.len());
            for p in stale {
                dedupe.clear(p)?;
                again.push((p, window_start(&p)));
            }
            read += self
                .read_results(&topic, &again, &HashMap::new(), dedupe)?
                .0;
        }
        Ok(read)
    }

    /// Reads results from `starts` into the store, in bounded batches; a partition in `checks`
    /// must begin with the record its position names. Returns how many were read and the
    /// partitions whose check failed (nothing of them was stored).
    fn read_results(
        &self,
        topic: &str,
        starts: &[(i32, Offset)],
        checks: &HashMap<i32, Position>,
        dedupe: &DedupeStore,
    ) -> Result<(usize, HashSet<i32>), RestoreError> {
        const BATCH: usize = 10_000;
        let reader = TopicReader::open_at(&self.settings.kafka, &self.group, topic, starts)
            .map_err(|source| RestoreError::Kafka {
                topic: topic.to_owned(),
                source,
            })?;
        let (now_ms, since_ms) = (self.now_ms, self.since_ms);
        let mut read = 0;
        let mut verified = HashSet::new();
        let mut stale = HashSet::new();
        let mut batch = Vec::new();
        let mut positions: HashMap<i32, Position> = HashMap::new();
        let mut failed = None;
        self.drain(reader, |msg| {
            read += 1;
            let p = msg.partition();
            if stale.contains(&p) || failed.is_some() {
                return;
            }
            let parsed = msg.payload().map(serde_json::from_slice::<CommandResult>);
            if let Some(expected) = checks.get(&p)
                && !verified.contains(&p)
            {
                let same = msg.offset() == expected.next - 1
                    && matches!(&parsed, Some(Ok(r)) if r.command_id == expected.last_command);
                if same {
                    verified.insert(p);
                } else {
                    stale.insert(p);
                }
                return;
            }
            let at_ms = msg.timestamp().to_millis().unwrap_or(now_ms);
            match parsed {
                Some(Ok(result)) => {
                    positions.insert(
                        p,
                        Position {
                            next: msg.offset() + 1,
                            last_command: result.command_id,
                        },
                    );
                    // A non-final answer (`AggregateUnavailable`) is decided afresh.
                    if at_ms >= since_ms && result.is_final() {
                        batch.push(Entry {
                            partition: p,
                            command_id: result.command_id,
                            at_ms,
                            result: ResultRef::At(msg.offset()),
                        });
                    }
                }
                Some(Err(e)) => {
                    tracing::error!(partition = p, offset = msg.offset(), error = %e, "unreadable command result ignored");
                    m::restore_unreadable("result");
                }
                None => {}
            }
            if batch.len() >= BATCH
                && let Err(e) = dedupe.record_with(std::mem::take(&mut batch), &positions, true)
            {
                failed = Some(e);
            }
        })?;
        if let Some(e) = failed {
            return Err(e.into());
        }
        dedupe.record_with(batch, &positions, true)?;
        // A checked partition of which nothing came: the record it names is gone.
        stale.extend(checks.keys().filter(|p| !verified.contains(*p)));
        Ok((read, stale))
    }
}

/// The fingerprint of the record at `offset` of the partition, `None` if there is none (the
/// partition ends before it, or begins after it).
fn record_at(
    consumer: &BaseConsumer,
    topic: &str,
    partition: i32,
    offset: i64,
) -> Result<Option<u32>, KafkaError> {
    let mut tpl = rdkafka::TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, Offset::Offset(offset))?;
    consumer.assign(&tpl)?;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while std::time::Instant::now() < deadline {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(msg)) if msg.offset() == offset => {
                return Ok(Some(record_fingerprint(msg.key(), msg.payload())));
            }
            // Another offset first (the record is gone), or the end: no such record.
            Some(Ok(_))
            | Some(Err(
                KafkaError::PartitionEOF(_)
                | KafkaError::MessageConsumption(rdkafka::types::RDKafkaErrorCode::OffsetOutOfRange),
            )) => return Ok(None),
            Some(Err(e)) => return Err(e),
            None => {}
        }
    }
    Err(KafkaError::MessageConsumption(
        rdkafka::types::RDKafkaErrorCode::RequestTimedOut,
    ))
}

/// Folds one event into its partition's state. Events a snapshot covers are recognised by
/// their headers and not decoded; the others are decoded from the JSON inside the wire format
/// (no registry round trip, so a registry outage cannot make a restore skip events).
fn fold_event<A: Aggregate>(
    codec: &EventCodec,
    state: &mut PartitionState<A>,
    msg: &BorrowedMessage<'_>,
    partitions: i32,
) -> Folded {
    let key = msg.key().and_then(|k| std::str::from_utf8(k).ok());
    if let Some(id) = key
        && canonical_partition(id.as_bytes(), partitions) != msg.partition()
    {
        return Folded::Misplaced {
            aggregate_id: id.to_owned(),
        };
    }
    if key.is_some_and(|id| state.quarantined.contains_key(id)) {
        return Folded::Skipped;
    }
    if let Some(at) = msg
        .timestamp()
        .to_millis()
        .and_then(DateTime::from_timestamp_millis)
    {
        state.saw_event_at(at);
    }
    let header_version: Option<u64> =
        header_str(msg.headers(), header::AGGREGATE_VERSION).and_then(|v| v.parse().ok());
    if let (Some(id), Some(version)) = (key, header_version)
        && state.accounts.get(id).is_some_and(|a| a.version >= version)
    {
        return Folded::Covered {
            first: version == 1,
        };
    }
    let unreadable = |reason: String| Folded::Unreadable {
        aggregate_id: key.map(str::to_owned),
        reason,
    };
    let envelope = match codec.decode_json(msg.payload().unwrap_or_default()) {
        Ok(envelope) => envelope,
        Err(e) => return unreadable(e.to_string()),
    };
    if key.is_some_and(|k| k != envelope.aggregate_id) {
        return unreadable(format!(
            "the record's key differs from its aggregate id {}",
            envelope.aggregate_id
        ));
    }
    if state.quarantined.contains_key(&envelope.aggregate_id) {
        return Folded::Skipped;
    }
    state.saw_event_at(envelope.timestamp);
    let account = state
        .accounts
        .entry(CompactString::from(envelope.aggregate_id.as_str()))
        .or_default();
    let first = envelope.version == 1;
    if envelope.version <= account.version {
        return Folded::Covered { first };
    }
    if envelope.version > account.version + 1 {
        return Folded::Gap {
            reason: format!(
                "version gap: {} version {} follows version {}",
                envelope.aggregate_id, envelope.version, account.version
            ),
            aggregate_id: envelope.aggregate_id,
        };
    }
    let event = match envelope.event_of::<A>() {
        Ok(event) => event,
        Err(e) => return unreadable(e.to_string()),
    };
    if let Err(e) = account.state.evolve(&event) {
        // Not a possible next event (say, a deposit on an account never opened): folding it
        // would make up a state no decision produced. (`evolve` left the state as it was.)
        return unreadable(e.to_string());
    }
    account.version += 1;
    state.events_since_checkpoint += 1;
    state
        .dirty
        .insert(CompactString::from(envelope.aggregate_id));
    Folded::Applied { first }
}
