//! In-memory state of the partitions this instance owns: every aggregate's folded state, the
//! de-duplication window (command id → original result) and what the next checkpoint must
//! cover. Its size follows the live data: one entry per aggregate plus the commands of the
//! dedupe window, never the history.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use compact_str::CompactString;
use shared::envelope::Quarantined;
use shared::{AccountStatus, BankAccount, CommandResult};
use uuid::Uuid;

/// A partition with changed aggregates gets a checkpoint at least this often, so that an idle
/// partition's restore tail is bounded in time as well as in events.
pub const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(60);

/// The state of one owned partition of `<prefix>.commands` (and of the co-partitioned events,
/// snapshots, checkpoints and results partitions).
#[derive(Debug)]
pub struct PartitionState {
    /// Folded state of every aggregate living on the partition.
    pub accounts: HashMap<CompactString, StoredAccount>,
    /// Results of the commands processed within the dedupe window, so a retried command gets
    /// its original answer and appends nothing.
    pub dedupe: Dedupe,
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
}

impl Default for PartitionState {
    fn default() -> Self {
        PartitionState {
            accounts: HashMap::new(),
            dedupe: Dedupe::default(),
            dirty: HashSet::new(),
            events_since_checkpoint: 0,
            last_checkpoint: Instant::now(),
            needs_checkpoint: false,
            quarantined: HashMap::new(),
            last_event_at: None,
        }
    }
}

impl PartitionState {
    /// The checkpoint policy: one is due when none covers the state, when `every` events were
    /// appended since the last, or when changes have waited [`CHECKPOINT_INTERVAL`].
    pub fn checkpoint_due(&self, every: u64) -> bool {
        checkpoint_due(
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

    /// Sets an aggregate aside (the first unreadable record of it is the one reported).
    pub fn quarantine(&mut self, aggregate_id: &str, offset: i64, reason: String) {
        if !self.quarantined.contains_key(aggregate_id) {
            tracing::error!(aggregate_id, offset, %reason, "unreadable event: the aggregate is unavailable until the record is repaired");
            self.quarantined.insert(
                aggregate_id.to_owned(),
                Quarantined {
                    aggregate_id: aggregate_id.to_owned(),
                    offset,
                    reason,
                },
            );
        }
    }

    /// Records an event's timestamp in the partition's clock floor.
    pub fn saw_event_at(&mut self, at: DateTime<Utc>) {
        self.last_event_at = self.last_event_at.max(Some(at));
    }
}

/// An aggregate's state as the writer keeps it for every aggregate it owns: a [`BankAccount`]
/// whose text fields are stored inline when they fit in 24 bytes (every currency, most owners),
/// so an aggregate costs no heap allocation besides its map entry. Converted to a
/// [`BankAccount`] to decide or fold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoredAccount {
    /// Events applied.
    pub version: u64,
    status: AccountStatus,
    owner: CompactString,
    currency: CompactString,
    balance_minor: i64,
    transaction_count: u64,
}

impl From<&BankAccount> for StoredAccount {
    fn from(a: &BankAccount) -> Self {
        StoredAccount {
            version: a.version,
            status: a.status,
            owner: CompactString::from(a.owner.as_str()),
            currency: CompactString::from(a.currency.as_str()),
            balance_minor: a.balance_minor,
            transaction_count: a.transaction_count,
        }
    }
}

impl From<&StoredAccount> for BankAccount {
    fn from(a: &StoredAccount) -> Self {
        BankAccount {
            version: a.version,
            status: a.status,
            owner: a.owner.to_string(),
            currency: a.currency.to_string(),
            balance_minor: a.balance_minor,
            transaction_count: a.transaction_count,
        }
    }
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

/// Command results remembered for the dedupe window, oldest first out. A result is kept as the
/// offset of its record on the partition's `<prefix>.command-results` (read back for the rare
/// duplicate), so an entry costs tens of bytes however large the result: the window holds every
/// command of `DEDUPE_WINDOW`, which outgrows the aggregates on a busy system.
#[derive(Debug, Default)]
pub struct Dedupe {
    entries: HashMap<Uuid, Remembered>,
    order: VecDeque<(i64, Uuid)>,
}

/// Where a remembered result is.
#[derive(Debug, Clone, PartialEq)]
pub enum ResultRef {
    /// At this offset of the partition of `<prefix>.command-results`.
    At(i64),
    /// Held in memory (its offset was not reported; rare).
    Held(Box<CommandResult>),
}

#[derive(Debug)]
struct Remembered {
    /// When the result was first decided (ms since the epoch).
    at_ms: i64,
    result: ResultRef,
}

impl Dedupe {
    /// Where the remembered result of `command_id` is.
    pub fn get(&self, command_id: &Uuid) -> Option<&ResultRef> {
        self.entries.get(command_id).map(|r| &r.result)
    }

    /// Remembers a result decided at `at_ms`; the first one decided for a command id stays.
    pub fn insert(&mut self, command_id: Uuid, at_ms: i64, result: ResultRef) {
        if self.entries.contains_key(&command_id) {
            return;
        }
        self.entries
            .insert(command_id, Remembered { at_ms, result });
        self.order.push_back((at_ms, command_id));
    }

    /// Forgets the results decided before `before_ms`; returns how many.
    pub fn expire(&mut self, before_ms: i64) -> usize {
        let mut forgotten = 0;
        while let Some(&(at_ms, id)) = self.order.front() {
            if at_ms >= before_ms {
                break;
            }
            self.order.pop_front();
            if self.entries.get(&id).is_some_and(|r| r.at_ms == at_ms) {
                self.entries.remove(&id);
                forgotten += 1;
            }
        }
        forgotten
    }

    /// How many command ids are remembered.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing is remembered.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// Changes made by the open transaction, kept apart until it commits: an abort simply drops
/// them.
#[derive(Debug, Default)]
pub struct Overlay {
    /// Aggregates changed in the transaction (their new state).
    pub accounts: HashMap<String, BankAccount>,
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

impl Overlay {
    /// Moves the overlay's changes into the committed partition states (decided at `now_ms`),
    /// marking the changed aggregates for the next checkpoint. `offset_of` gives a result
    /// record's offset from its delivery token.
    pub fn merge_into(
        self,
        partitions: &mut HashMap<i32, PartitionState>,
        partition_of: impl Fn(&str) -> i32,
        mut offset_of: impl FnMut(usize) -> Option<i64>,
        now_ms: i64,
    ) {
        for (id, account) in self.accounts {
            if let Some(state) = partitions.get_mut(&partition_of(&id)) {
                let before = state.accounts.get(id.as_str()).map_or(0, |a| a.version);
                state.events_since_checkpoint += account.version.saturating_sub(before);
                let id = CompactString::from(id);
                state.dirty.insert(id.clone());
                state.accounts.insert(id, StoredAccount::from(&account));
            }
        }
        for (command_id, decided) in self.results {
            if let Some(state) = partitions.get_mut(&decided.partition) {
                let result = match offset_of(decided.delivery) {
                    Some(offset) => ResultRef::At(offset),
                    None => ResultRef::Held(Box::new(decided.result)),
                };
                state.dedupe.insert(command_id, now_ms, result);
            }
        }
        for (partition, at) in self.last_event_at {
            if let Some(state) = partitions.get_mut(&partition) {
                state.saw_event_at(at);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared::{Rejection, RejectionCode};

    fn result(id: Uuid) -> CommandResult {
        CommandResult::rejected(id, "a", Rejection::new(RejectionCode::Malformed, "x"))
    }

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

    #[test]
    fn dedupe_forgets_oldest_first_and_keeps_the_first_result() {
        let mut d = Dedupe::default();
        let (a, b, c) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        d.insert(a, 100, ResultRef::At(1));
        d.insert(b, 200, ResultRef::Held(Box::new(result(b))));
        d.insert(a, 300, ResultRef::At(99));
        d.insert(c, 300, ResultRef::At(3));
        assert_eq!(d.get(&a), Some(&ResultRef::At(1)), "first result stays");
        assert_eq!(d.expire(200), 1);
        assert!(d.get(&a).is_none());
        assert!(d.get(&b).is_some());
        assert_eq!(d.expire(1000), 2);
        assert!(d.is_empty());
    }
}
