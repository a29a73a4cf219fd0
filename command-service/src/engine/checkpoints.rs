//! Partition checkpoints, written first in a transaction from the committed state: a snapshot
//! of every aggregate changed since the previous checkpoint, then the checkpoint record with
//! the events partition's end offset. [`crate::restore`] reads them back.

use std::time::{Duration, Instant};

use chrono::Utc;
use rdkafka::consumer::Consumer;
use shared::BankAccount;
use shared::envelope::{Checkpoint, Snapshot};

use super::transactions::Record;
use super::{Engine, EngineConsumer, TakenCheckpoint, TxnError};
use crate::state::PartitionState;

/// At most this many quarantined aggregates are listed in a checkpoint (about 150 B each: the
/// record stays far below the producer's 1 MB limit).
pub const MAX_QUARANTINED: usize = 1000;

/// A checkpoint ready to be produced: the snapshots (aggregate id, JSON) and the record.
struct Prepared {
    snapshots: Vec<(String, Vec<u8>)>,
    checkpoint: Checkpoint,
}

impl Engine {
    /// When no command is coming, a due checkpoint gets a transaction of its own.
    /// After a postponed checkpoint (the end offset could not be read) not before a second
    /// has passed, so that it does not spin transactions. Never while the consumer knows its
    /// assignment lost (the rebalance is served first); the commit's offsets fence the rest
    /// ([`Engine::commit`]).
    pub(super) fn checkpoint_idle(&mut self, consumer: &EngineConsumer) {
        if self.txn.is_none()
            && !consumer.assignment_lost()
            && self
                .checkpoint_retry_at
                .is_none_or(|at| Instant::now() >= at)
            && self.partitions.values().any(|s| self.checkpoint_due(s))
            && self.begin(consumer)
        {
            self.commit(consumer);
        }
    }

    /// Whether `state` gets a checkpoint now: by the policy, or for anything changed once the
    /// engine is stopping (so that the next start reads no tail).
    fn checkpoint_due(&self, state: &PartitionState) -> bool {
        state.checkpoint_due(self.settings.checkpoint_every)
            || (self.shutdown.is_triggered() && !state.dirty.is_empty())
    }

    /// Writes a checkpoint of every partition that is due. Called first in a transaction, so
    /// the state written is the committed state and every event below the recorded offset is in
    /// it. A partition whose end offset cannot be read is postponed.
    pub(super) fn write_checkpoints(&mut self) -> Result<(), TxnError> {
        let due: Vec<i32> = self
            .partitions
            .iter()
            .filter(|(_, s)| self.checkpoint_due(s))
            .map(|(p, _)| *p)
            .collect();
        let events = self.topics.events();
        for partition in due {
            let end = match self.offsets.fetch_watermarks(
                &events,
                partition,
                Duration::from_secs(5),
            ) {
                Ok((_, high)) => high,
                Err(e) => {
                    tracing::warn!(partition, error = %e, "cannot read the events' end offset; checkpoint postponed");
                    self.checkpoint_retry_at = Some(Instant::now() + Duration::from_secs(1));
                    continue;
                }
            };
            let Some(prepared) = self.take_checkpoint(partition, end) else {
                continue;
            };
            self.produce_checkpoint(partition, &prepared)?;
        }
        Ok(())
    }

    /// Takes the partition's checkpoint bookkeeping into the open transaction (given back if it
    /// aborts) and prepares the checkpoint at `end`. A partition with more quarantined
    /// aggregates than a checkpoint record can list ([`MAX_QUARANTINED`]) is not checkpointed:
    /// its restores read the events since its last checkpoint instead (slower, never wrong).
    fn take_checkpoint(&mut self, partition: i32, end: i64) -> Option<Prepared> {
        let (state, txn) = (self.partitions.get_mut(&partition)?, self.txn.as_mut()?);
        if state.quarantined.len() > MAX_QUARANTINED {
            tracing::error!(
                partition,
                quarantined = state.quarantined.len(),
                "too many unreadable aggregates to list in a checkpoint: the partition is not \
                 checkpointed until the store is repaired (its restores read more events)"
            );
            state.dirty.clear();
            state.events_since_checkpoint = 0;
            state.needs_checkpoint = false;
            state.last_checkpoint = Instant::now();
            return None;
        }
        let taken = TakenCheckpoint {
            partition,
            dirty: std::mem::take(&mut state.dirty),
            events_since: std::mem::take(&mut state.events_since_checkpoint),
            needed: std::mem::replace(&mut state.needs_checkpoint, false),
        };
        let now = Utc::now();
        // A quarantined aggregate's state is not known: no snapshot of it; the checkpoint
        // lists it instead.
        let snapshots = taken
            .dirty
            .iter()
            .filter(|id| !state.quarantined.contains_key(id.as_str()))
            .filter_map(|id| {
                let account = state.accounts.get(id)?;
                let snapshot = Snapshot {
                    aggregate_id: id.to_string(),
                    version: account.version,
                    event_offset: end - 1,
                    state: BankAccount::from(account),
                    taken_at: now,
                };
                Some((id.to_string(), serde_json::to_vec(&snapshot).ok()?))
            })
            .collect();
        let checkpoint = Checkpoint {
            partition,
            next_event_offset: end,
            aggregates: state.aggregates(),
            taken_at: now,
            last_event_at: state.last_event_at,
            quarantined: state.quarantined.values().cloned().collect(),
        };
        txn.checkpoints.push(taken);
        Some(Prepared {
            snapshots,
            checkpoint,
        })
    }

    fn produce_checkpoint(&self, partition: i32, prepared: &Prepared) -> Result<(), TxnError> {
        let topic = self.topics.snapshots();
        for (id, payload) in &prepared.snapshots {
            let record = Record {
                topic: &topic,
                partition,
                key: id.as_bytes(),
                payload,
                headers: None,
                timestamp_ms: None,
            };
            self.send(record, None)?;
        }
        let payload = serde_json::to_vec(&prepared.checkpoint).unwrap_or_default();
        let key = partition.to_string();
        let topic = self.topics.command_checkpoints();
        let record = Record {
            topic: &topic,
            partition,
            key: key.as_bytes(),
            payload: &payload,
            headers: None,
            timestamp_ms: None,
        };
        self.send(record, None)?;
        tracing::debug!(
            partition,
            next_event_offset = prepared.checkpoint.next_event_offset,
            snapshots = prepared.snapshots.len(),
            "checkpoint written"
        );
        Ok(())
    }
}
