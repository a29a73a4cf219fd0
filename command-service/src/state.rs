//! In-memory state of the partitions this instance owns: every aggregate's folded state and
//! what the next checkpoint must cover. Its size follows the live data: one entry per
//! aggregate, never the history nor the commands of the dedupe window (which lives on disk,
//! [`crate::dedupe`]).

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use compact_str::CompactString;
use shared::CommandResult;
use shared::envelope::{Checkpoint, Quarantined};

use crate::dedupe::{Entry, Position, ResultRef};
use uuid::Uuid;

/// A partition with changed aggregates gets a checkpoint at least this often, so that an idle
/// partition's restore tail is bounded in time as well as in events.
pub const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(60);

/// The state of one owned partition of `<prefix>.commands` (and of the co-partitioned events,
/// snapshots, checkpoints and results partitions).
#[derive(Debug)]
pub struct PartitionState<A> {
    /// Folded state of every aggregate living on the partition.
    pub accounts: HashMap<CompactString, Held<A>>,
    /// Aggregates changed since the partition's last checkpoint: the next one snapshots them.
    pub dirty: HashSet<CompactString>,
    /// Events appended since the last checkpoint (the restore tail it would leave).
    pub events_since_checkpoint: u64,
    /// When the last checkpoint committed (or the partition was restored).
    pub last_checkpoint: Instant,
    /// No checkpoint covers this state (a store from before checkpoints, or one a restore could
    /// not use): write one at the first chance.
    pub needs_checkpoint: bool,
    /// Aggregates whose stored events could not be read, by id: commands on them are answered
    /// `AggregateUnavailable`, everything else on the partition is served.
    pub quarantined: HashMap<String, Quarantined>,
    /// The latest event timestamp on the partition: new events are never stamped earlier, so
    /// `as_of` can only return states that existed, whatever the clocks of past writers said.
    pub last_event_at: Option<DateTime<Utc>>,
    /// The checkpoint being written in pieces, if one is.
    pub round: Option<CheckpointRound>,
}

/// A checkpoint written in pieces of at most `CHECKPOINT_PIECE` snapshots, each in a
/// transaction of its own (fenced like any other), its record last. The record is prepared when
/// the round begins: every aggregate changed before its `next_event_offset` is in `remaining`
/// until a piece with its snapshot commits. A snapshot taken later than that offset covers more
/// events, which a restore skips by version, so the record stays true whatever was written
/// meanwhile.
#[derive(Debug)]
pub struct CheckpointRound {
    /// The record written with the last piece.
    pub checkpoint: Checkpoint,
    /// Aggregates whose snapshot is not written yet.
    pub remaining: Vec<CompactString>,
}

impl<A> Default for PartitionState<A> {
    fn default() -> Self {
        PartitionState {
            accounts: HashMap::new(),
            dirty: HashSet::new(),
            events_since_checkpoint: 0,
            last_checkpoint: Instant::now(),
            needs_checkpoint: false,
            quarantined: HashMap::new(),
            last_event_at: None,
            round: None,
        }
    }
}

impl<A> PartitionState<A> {
    /// The checkpoint policy: one is due when none covers the state, when `every` events were
    /// appended since the last, or when changes have waited [`CHECKPOINT_INTERVAL`]; and the
    /// next piece of a round in progress is always due.
    pub fn checkpoint_due(&self, every: u64) -> bool {
        self.round.is_some()
            || checkpoint_due(
                self.needs_checkpoint,
                self.events_since_checkpoint,
                !self.dirty.is_empty(),
                self.last_checkpoint.elapsed(),
                every,
            )
    }

    /// Aggregates that exist (have at least one event) and are not quarantined: the count a
    /// checkpoint records and a restore proves.
    pub fn aggregates(&self) -> u64 {
        self.accounts
            .iter()
            .filter(|(id, a)| a.version > 0 && !self.quarantined.contains_key(id.as_str()))
            .count() as u64
    }

    /// Sets an aggregate aside (the first unreadable record of it is the one reported, with its
    /// fingerprint, so that a restore can tell when the record was repaired).
    pub fn quarantine(
        &mut self,
        aggregate_id: &str,
        offset: i64,
        reason: String,
        fingerprint: Option<u32>,
    ) {
        if !self.quarantined.contains_key(aggregate_id) {
            tracing::error!(aggregate_id, offset, %reason, "unreadable event: the aggregate is unavailable until the record is repaired");
            self.quarantined.insert(
                aggregate_id.to_owned(),
                Quarantined {
                    aggregate_id: aggregate_id.to_owned(),
                    offset,
                    reason,
                    fingerprint,
                },
            );
        }
    }

    /// Records an event's timestamp in the partition's clock floor.
    pub fn saw_event_at(&mut self, at: DateTime<Utc>) {
        self.last_event_at = self.last_event_at.max(Some(at));
    }
}

/// An aggregate as the writer holds it for every aggregate it owns: the engine's version (the
/// events folded) and the aggregate type's state. What an aggregate costs in memory is its
/// state's size (the bank account keeps its text inline).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Held<A> {
    /// Events folded into `state`; the next event gets `version + 1`.
    pub version: u64,
    /// The folded state.
    pub state: A,
}

/// The timestamp of a new event: now, but never earlier than the partition's latest event.
pub fn event_time(now: DateTime<Utc>, floor: Option<DateTime<Utc>>) -> DateTime<Utc> {
    floor.map_or(now, |floor| now.max(floor))
}

/// The snapshot policy: an aggregate reaching a multiple of `every` versions gets a snapshot
/// in the same transaction (besides the checkpoints' snapshots).
pub fn snapshot_due(version: u64, every: u64) -> bool {
    every > 0 && version.is_multiple_of(every)
}

/// The pure checkpoint policy of [`PartitionState::checkpoint_due`].
pub fn checkpoint_due(
    uncovered: bool,
    events_since: u64,
    dirty: bool,
    since_last: Duration,
    every: u64,
) -> bool {
    uncovered || events_since >= every || (dirty && since_last >= CHECKPOINT_INTERVAL)
}

/// Changes made by the open transaction, kept apart until it commits: an abort simply drops
/// them.
#[derive(Debug)]
pub struct Overlay<A> {
    /// Aggregates changed in the transaction (their new state).
    pub accounts: HashMap<String, Held<A>>,
    /// Results decided in the transaction.
    pub results: HashMap<Uuid, Decided>,
    /// The latest event timestamp per partition written in the transaction.
    pub last_event_at: HashMap<i32, DateTime<Utc>>,
}

/// A command's result decided in the open transaction, and the partition it belongs to.
#[derive(Debug)]
pub struct Decided {
    /// The command's partition.
    pub partition: i32,
    /// Its result.
    pub result: CommandResult,
    /// The delivery token of its record, whose offset the dedupe window keeps.
    pub delivery: usize,
}

impl<A> Default for Overlay<A> {
    fn default() -> Self {
        Overlay {
            accounts: HashMap::new(),
            results: HashMap::new(),
            last_event_at: HashMap::new(),
        }
    }
}

impl<A> Overlay<A> {
    /// Moves the overlay's changes into the committed partition states (decided at `now_ms`),
    /// marking the changed aggregates for the next checkpoint. `offset_of` gives a result
    /// record's offset from its delivery token. Returns the results to remember and, per
    /// partition whose every result's offset is known, the dedupe store's new changelog
    /// position.
    pub fn merge_into(
        self,
        partitions: &mut HashMap<i32, PartitionState<A>>,
        partition_of: impl Fn(&str) -> i32,
        mut offset_of: impl FnMut(usize) -> Option<i64>,
        now_ms: i64,
    ) -> (Vec<Entry>, HashMap<i32, Position>) {
        for (id, account) in self.accounts {
            if let Some(state) = partitions.get_mut(&partition_of(&id)) {
                let before = state.accounts.get(id.as_str()).map_or(0, |a| a.version);
                state.events_since_checkpoint += account.version.saturating_sub(before);
                let id = CompactString::from(id);
                state.dirty.insert(id.clone());
                state.accounts.insert(id, account);
            }
        }
        let mut entries = Vec::with_capacity(self.results.len());
        let mut positions: HashMap<i32, Position> = HashMap::new();
        let mut unknown: HashSet<i32> = HashSet::new();
        for (command_id, decided) in self.results {
            if !partitions.contains_key(&decided.partition) {
                continue;
            }
            let result = match offset_of(decided.delivery) {
                Some(offset) => {
                    let later = Position {
                        next: offset + 1,
                        last_command: command_id,
                    };
                    let position = positions.entry(decided.partition).or_insert(later);
                    if later.next > position.next {
                        *position = later;
                    }
                    ResultRef::At(offset)
                }
                None => {
                    // Not on disk with an offset: the changelog position stays where it was, so
                    // that the next restore reads this result from the topic.
                    unknown.insert(decided.partition);
                    ResultRef::Held(Box::new(decided.result))
                }
            };
            entries.push(Entry {
                partition: decided.partition,
                command_id,
                at_ms: now_ms,
                result,
            });
        }
        positions.retain(|p, _| !unknown.contains(p));
        for (partition, at) in self.last_event_at {
            if let Some(state) = partitions.get_mut(&partition) {
                state.saw_event_at(at);
            }
        }
        (entries, positions)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoint_policy() {
        let minute = CHECKPOINT_INTERVAL;
        assert!(checkpoint_due(true, 0, false, Duration::ZERO, 10));
        assert!(checkpoint_due(false, 10, true, Duration::ZERO, 10));
        assert!(!checkpoint_due(false, 9, true, Duration::ZERO, 10));
        assert!(checkpoint_due(false, 1, true, minute, 10));
        assert!(
            !checkpoint_due(false, 0, false, minute * 10, 10),
            "nothing changed: nothing to checkpoint"
        );
    }

    #[test]
    fn snapshot_policy() {
        assert!(snapshot_due(100, 100));
        assert!(snapshot_due(200, 100));
        assert!(!snapshot_due(101, 100));
        assert!(!snapshot_due(0, 0), "SNAPSHOT_EVERY=0 never snapshots");
    }

    #[test]
    fn event_time_never_goes_back() {
        let now = Utc::now();
        let ahead = now + chrono::Duration::hours(1);
        assert_eq!(event_time(now, None), now);
        assert_eq!(event_time(now, Some(ahead)), ahead);
        assert_eq!(event_time(ahead, Some(now)), ahead);
    }
}
