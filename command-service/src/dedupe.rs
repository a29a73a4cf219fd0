//! The dedupe window on local disk, with `<prefix>.command-results` as its changelog (the way
//! Kafka Streams keeps a state store: a local store, a changelog topic, and the changelog offset
//! the store covers, so that a restart reads only the changelog's tail).
//!
//! Each entry is a command id and where its result is: the offset of its record on the
//! partition's results topic (read back for the rare duplicate). Entries live in an embedded
//! B-tree file ([`redb`]), one per cluster, prefix and instance (`<COMMAND_STATE_DIR>/
//! <cluster id>/<prefix>/<INSTANCE_ID>.redb`), with a bounded page cache: the memory of the window does not grow with
//! the commands in it, and neither does a restart's reading, which starts where the file's
//! changelog offset says. A partition new to this instance (or whose file is gone or belongs to
//! another incarnation of the topic) reads the whole window from the results topic, into the
//! file, in bounded batches.
//!
//! Writes happen only after a Kafka commit, with the changelog offset of the same commit, in one
//! store transaction: the file never holds an uncommitted result, and after a crash it is a
//! consistent older state whose tail the next restore reads again. Commits are made durable
//! every few seconds (and at close), not each time.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use redb::{
    Database, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition,
};
use shared::CommandResult;
use uuid::Uuid;

/// (partition, command id) → (decided at, ms since the epoch; result offset).
const ENTRIES: TableDefinition<(i32, u128), (i64, i64)> = TableDefinition::new("entries");
/// (partition, decided at, command id): the entries in expiry order.
const BY_TIME: TableDefinition<(i32, i64, u128), ()> = TableDefinition::new("by_time");
/// partition → (the next results offset the file covers, the command id of the record just
/// before it): the changelog position, and a check that the topic is still the one it read.
const CHANGELOG: TableDefinition<i32, (i64, u128)> = TableDefinition::new("changelog");

/// The page cache: what the window costs in memory at most, whatever its size.
const CACHE_BYTES: usize = 8 << 20;
/// How often the writes are made durable (a crash loses at most this much, which the next
/// restore reads again from the results topic).
const DURABLE_EVERY: Duration = Duration::from_secs(1);
/// How often expired entries are removed, and at most how many at a time.
const EXPIRE_EVERY: Duration = Duration::from_secs(10);
const EXPIRE_BATCH: usize = 50_000;
/// How long opening waits for another process to let go of the file (a replaced twin of this
/// INSTANCE_ID stops within seconds); then a file of this process's own is used, filled from the
/// results topic (slower to restore, never wrong) and deleted at close.
const OPEN_PATIENCE: Duration = Duration::from_secs(1);

/// Where a remembered result is.
#[derive(Debug, Clone, PartialEq)]
pub enum ResultRef {
    /// At this offset of the partition of `<prefix>.command-results`.
    At(i64),
    /// Held in memory (its offset was not reported; rare, and only until the next restart,
    /// whose restore reads it from the results topic).
    Held(Box<CommandResult>),
}

/// A result to remember: its command, partition, when it was decided, and where it is.
#[derive(Debug)]
pub struct Entry {
    /// The command's partition.
    pub partition: i32,
    /// The command.
    pub command_id: Uuid,
    /// When the result was first decided (ms since the epoch).
    pub at_ms: i64,
    /// Where it is.
    pub result: ResultRef,
}

/// The changelog position of a partition: the next results offset the file covers, and the
/// command id of the record at the offset before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    /// The next offset of the results partition not in the file.
    pub next: i64,
    /// The command answered by the record at `next - 1`.
    pub last_command: Uuid,
}

/// The local store failed: the engine stops rather than answer a duplicate as new.
#[derive(Debug, thiserror::Error)]
#[error("the dedupe store {path}: {reason}")]
pub struct StoreError {
    path: PathBuf,
    reason: String,
}

/// The dedupe window of one instance: every partition it owns or owned.
pub struct DedupeStore {
    db: Option<Database>,
    path: PathBuf,
    /// A file of this process's own (the instance's was held by another): deleted at close.
    ephemeral: bool,
    /// Results whose offsets were not reported, by (partition, command id).
    held: Mutex<HashMap<(i32, Uuid), (i64, CommandResult)>>,
    timers: Mutex<Timers>,
}

struct Timers {
    durable: Instant,
    expired: Instant,
}

impl std::fmt::Debug for DedupeStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DedupeStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

fn key(partition: i32, id: Uuid) -> (i32, u128) {
    (partition, id.as_u128())
}

impl DedupeStore {
    /// The store file of this instance and prefix of the Kafka cluster `cluster_id` under `dir`
    /// (a new cluster with the same topic names is never mistaken for the old one).
    pub fn path(dir: &Path, cluster_id: &str, prefix: &str, instance_id: &str) -> PathBuf {
        dir.join(cluster_id)
            .join(prefix)
            .join(format!("{instance_id}.redb"))
    }

    /// Opens (or creates) the store at `path`, waiting a little for another process that holds
    /// it (a twin being replaced); if it stays held, a file of this process's own beside it.
    /// Files of earlier processes' own that nobody holds any more are deleted.
    pub fn open(path: &Path) -> Result<DedupeStore, StoreError> {
        let fail = |reason: String| StoreError {
            path: path.to_owned(),
            reason,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| fail(format!("cannot create {dir:?}: {e}")))?;
        }
        sweep_own_files(path);
        let started = Instant::now();
        let (db, path, ephemeral) = loop {
            match create(path) {
                Ok(db) => break (db, path.to_owned(), false),
                Err(redb::DatabaseError::DatabaseAlreadyOpen)
                    if started.elapsed() < OPEN_PATIENCE =>
                {
                    std::thread::sleep(Duration::from_millis(500));
                }
                Err(redb::DatabaseError::DatabaseAlreadyOpen) => {
                    let own = own_file(path, &Uuid::new_v4().simple().to_string()[..12]);
                    tracing::warn!(held = ?path, using = ?own, "the dedupe store is held by another process (a twin of this INSTANCE_ID?): using a file of this process's own, filled from the results topic");
                    break (create(&own).map_err(|e| fail(e.to_string()))?, own, true);
                }
                Err(e) => return Err(fail(e.to_string())),
            }
        };
        let store = DedupeStore {
            db: Some(db),
            ephemeral,
            path,
            held: Mutex::new(HashMap::new()),
            timers: Mutex::new(Timers {
                durable: Instant::now(),
                expired: Instant::now(),
            }),
        };
        store.write(Durability::Immediate, |txn| {
            txn.open_table(ENTRIES)?;
            txn.open_table(BY_TIME)?;
            txn.open_table(CHANGELOG)?;
            Ok(())
        })?;
        Ok(store)
    }

    fn db(&self) -> &Database {
        // Set from open until drop.
        self.db
            .as_ref()
            .unwrap_or_else(|| unreachable!("the store is open until dropped"))
    }

    fn fail(&self, e: impl std::fmt::Display) -> StoreError {
        StoreError {
            path: self.path.clone(),
            reason: e.to_string(),
        }
    }

    fn write(
        &self,
        durability: Durability,
        body: impl FnOnce(&redb::WriteTransaction) -> Result<(), redb::Error>,
    ) -> Result<(), StoreError> {
        let mut txn = self.db().begin_write().map_err(|e| self.fail(e))?;
        txn.set_durability(durability).map_err(|e| self.fail(e))?;
        body(&txn).map_err(|e| self.fail(e))?;
        txn.commit().map_err(|e| self.fail(e))
    }

    /// Where the remembered result of `command_id` on `partition` is.
    pub fn get(&self, partition: i32, command_id: Uuid) -> Result<Option<ResultRef>, StoreError> {
        if let Some((_, result)) = self.lock_held().get(&(partition, command_id)) {
            return Ok(Some(ResultRef::Held(Box::new(result.clone()))));
        }
        let txn = self.db().begin_read().map_err(|e| self.fail(e))?;
        let table = txn.open_table(ENTRIES).map_err(|e| self.fail(e))?;
        let found = table
            .get(key(partition, command_id))
            .map_err(|e| self.fail(e))?;
        Ok(found.map(|v| ResultRef::At(v.value().1)))
    }

    fn lock_held(&self) -> std::sync::MutexGuard<'_, HashMap<(i32, Uuid), (i64, CommandResult)>> {
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Remembers committed results (the first one decided for a command id stays) and moves the
    /// partitions' changelog positions, in one store transaction.
    pub fn record(
        &self,
        entries: Vec<Entry>,
        positions: &HashMap<i32, Position>,
    ) -> Result<(), StoreError> {
        self.record_with(entries, positions, false)
    }

    /// [`DedupeStore::record`], durable at once when `durable` (a restore's batches: memory
    /// stays bounded however much it reads).
    pub fn record_with(
        &self,
        entries: Vec<Entry>,
        positions: &HashMap<i32, Position>,
        durable: bool,
    ) -> Result<(), StoreError> {
        let durable = durable || {
            let mut timers = self.timers.lock().unwrap_or_else(PoisonError::into_inner);
            let due = timers.durable.elapsed() >= DURABLE_EVERY;
            if due {
                timers.durable = Instant::now();
            }
            due
        };
        let mut at_offsets = Vec::with_capacity(entries.len());
        for entry in entries {
            match entry.result {
                ResultRef::At(offset) => {
                    at_offsets.push((entry.partition, entry.command_id, entry.at_ms, offset));
                }
                ResultRef::Held(result) => {
                    self.lock_held()
                        .entry((entry.partition, entry.command_id))
                        .or_insert((entry.at_ms, *result));
                }
            }
        }
        let durability = if durable {
            Durability::Immediate
        } else {
            Durability::None
        };
        self.write(durability, |txn| {
            let mut table = txn.open_table(ENTRIES)?;
            let mut by_time = txn.open_table(BY_TIME)?;
            for (partition, id, at_ms, offset) in at_offsets {
                let k = key(partition, id);
                if table.get(k)?.is_none() {
                    table.insert(k, (at_ms, offset))?;
                    by_time.insert((partition, at_ms, id.as_u128()), ())?;
                }
            }
            let mut changelog = txn.open_table(CHANGELOG)?;
            for (partition, position) in positions {
                changelog.insert(*partition, (position.next, position.last_command.as_u128()))?;
            }
            Ok(())
        })
    }

    /// The changelog position of `partition`, if the file has one.
    pub fn position(&self, partition: i32) -> Result<Option<Position>, StoreError> {
        let txn = self.db().begin_read().map_err(|e| self.fail(e))?;
        let table = txn.open_table(CHANGELOG).map_err(|e| self.fail(e))?;
        let found = table.get(partition).map_err(|e| self.fail(e))?;
        Ok(found.map(|v| {
            let (next, last) = v.value();
            Position {
                next,
                last_command: Uuid::from_u128(last),
            }
        }))
    }

    /// Forgets everything of `partition` (its file state belongs to another incarnation of the
    /// results topic, or is too old to be checked).
    pub fn clear(&self, partition: i32) -> Result<(), StoreError> {
        self.lock_held().retain(|(p, _), _| *p != partition);
        self.write(Durability::Immediate, |txn| {
            let mut table = txn.open_table(ENTRIES)?;
            table.retain_in((partition, 0)..=(partition, u128::MAX), |_, _| false)?;
            let mut by_time = txn.open_table(BY_TIME)?;
            by_time.retain_in(
                (partition, i64::MIN, 0)..=(partition, i64::MAX, u128::MAX),
                |_, ()| false,
            )?;
            txn.open_table(CHANGELOG)?.remove(partition)?;
            Ok(())
        })
    }

    /// Forgets the results decided before `before_ms`, at most every few seconds and a bounded
    /// number at a time (the rest next time); returns how many.
    pub fn expire(&self, before_ms: i64) -> Result<usize, StoreError> {
        {
            let mut timers = self.timers.lock().unwrap_or_else(PoisonError::into_inner);
            if timers.expired.elapsed() < EXPIRE_EVERY {
                return Ok(0);
            }
            timers.expired = Instant::now();
        }
        self.lock_held().retain(|_, (at_ms, _)| *at_ms >= before_ms);
        let mut expired = 0;
        self.write(Durability::None, |txn| {
            let mut by_time = txn.open_table(BY_TIME)?;
            let mut table = txn.open_table(ENTRIES)?;
            let mut old = Vec::new();
            for item in by_time.iter()? {
                let (k, _) = item?;
                let (partition, at_ms, id) = k.value();
                if old.len() >= EXPIRE_BATCH {
                    break;
                }
                if at_ms < before_ms {
                    old.push((partition, at_ms, id));
                }
            }
            for (partition, at_ms, id) in old {
                by_time.remove((partition, at_ms, id))?;
                table.remove((partition, id))?;
                expired += 1;
            }
            Ok(())
        })?;
        Ok(expired)
    }

    /// How many command ids are remembered (on disk and held).
    pub fn len(&self) -> usize {
        let on_disk = self
            .db()
            .begin_read()
            .ok()
            .and_then(|txn| txn.open_table(ENTRIES).ok()?.len().ok())
            .unwrap_or(0);
        usize::try_from(on_disk).unwrap_or(usize::MAX) + self.lock_held().len()
    }

    /// Whether nothing is remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The size of the store file in bytes.
    pub fn file_bytes(&self) -> u64 {
        std::fs::metadata(&self.path).map_or(0, |m| m.len())
    }
}

impl Drop for DedupeStore {
    fn drop(&mut self) {
        // Closing flushes what was written without durability.
        drop(self.db.take());
        if self.ephemeral {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn create(path: &Path) -> Result<Database, redb::DatabaseError> {
    Database::builder().set_cache_size(CACHE_BYTES).create(path)
}

/// `<INSTANCE_ID>.own-<suffix>.redb` beside the instance's file.
fn own_file(path: &Path, suffix: &str) -> PathBuf {
    let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("store");
    path.with_file_name(format!("{stem}.own-{suffix}.redb"))
}

/// Deletes the own files of earlier processes of this instance that nobody holds (a process
/// killed before it could delete its own).
fn sweep_own_files(path: &Path) {
    let (Some(dir), Some(stem)) = (path.parent(), path.file_stem().and_then(|s| s.to_str())) else {
        return;
    };
    let prefix = format!("{stem}.own-");
    let Ok(listing) = std::fs::read_dir(dir) else {
        return;
    };
    for file in listing.flatten() {
        let name = file.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(&prefix) && name.ends_with(".redb") && create(&file.path()).is_ok() {
            let _ = std::fs::remove_file(file.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared::CommandResult;

    fn store() -> (tempfile::TempDir, DedupeStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = DedupeStore::open(&DedupeStore::path(dir.path(), "c", "p", "i")).unwrap();
        (dir, store)
    }

    fn at(partition: i32, id: Uuid, at_ms: i64, offset: i64) -> Entry {
        Entry {
            partition,
            command_id: id,
            at_ms,
            result: ResultRef::At(offset),
        }
    }

    #[test]
    fn the_first_result_of_a_command_stays_and_survives_a_reopen() {
        let (dir, store) = store();
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        let position = Position {
            next: 8,
            last_command: b,
        };
        store
            .record(
                vec![at(0, a, 1, 5), at(0, a, 2, 6), at(1, b, 3, 7)],
                &HashMap::from([(0, position)]),
            )
            .unwrap();
        assert_eq!(store.get(0, a).unwrap(), Some(ResultRef::At(5)));
        assert_eq!(store.get(1, a).unwrap(), None, "entries are per partition");
        assert_eq!(store.len(), 2);
        drop(store);
        let store = DedupeStore::open(&DedupeStore::path(dir.path(), "c", "p", "i")).unwrap();
        assert_eq!(store.get(1, b).unwrap(), Some(ResultRef::At(7)));
        assert_eq!(store.position(0).unwrap(), Some(position));
        assert_eq!(store.position(1).unwrap(), None);
    }

    #[test]
    fn expiry_forgets_the_oldest_and_clear_forgets_a_partition() {
        let (_dir, store) = store();
        let ids: Vec<Uuid> = (0..4).map(|_| Uuid::new_v4()).collect();
        let held = CommandResult::accepted(ids[3], "x", &[]);
        store
            .record(
                vec![
                    at(0, ids[0], 10, 0),
                    at(0, ids[1], 20, 1),
                    at(1, ids[2], 30, 0),
                    Entry {
                        partition: 1,
                        command_id: ids[3],
                        at_ms: 5,
                        result: ResultRef::Held(Box::new(held)),
                    },
                ],
                &HashMap::new(),
            )
            .unwrap();
        store.timers.lock().unwrap().expired = Instant::now() - EXPIRE_EVERY;
        assert_eq!(store.expire(20).unwrap(), 1);
        assert_eq!(store.get(0, ids[0]).unwrap(), None);
        assert_eq!(store.get(0, ids[1]).unwrap(), Some(ResultRef::At(1)));
        assert_eq!(
            store.get(1, ids[3]).unwrap(),
            None,
            "held results expire too"
        );
        assert_eq!(store.expire(100).unwrap(), 0, "not again so soon");
        store.clear(0).unwrap();
        assert_eq!(store.get(0, ids[1]).unwrap(), None);
        assert_eq!(store.get(1, ids[2]).unwrap(), Some(ResultRef::At(0)));
    }

    #[test]
    fn a_store_held_by_another_handle_gives_a_file_of_its_own_deleted_at_close() {
        let (dir, held) = store();
        let path = DedupeStore::path(dir.path(), "c", "p", "i");
        let own = DedupeStore::open(&path).unwrap();
        assert!(own.ephemeral, "the held file is not shared");
        assert_ne!(own.path, path);
        let own_path = own.path.clone();
        assert!(own_path.exists());
        drop(own);
        assert!(!own_path.exists(), "deleted at close");
        // A leftover of a killed process is swept at the next open.
        let leftover = own_file(&path, "left");
        drop(create(&leftover).unwrap());
        drop(held);
        let reopened = DedupeStore::open(&path).unwrap();
        assert!(!reopened.ephemeral);
        assert!(!leftover.exists(), "swept");
    }
}
