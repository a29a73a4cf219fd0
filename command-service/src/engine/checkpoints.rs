//! Partition checkpoints, written first in a transaction from the committed state: a snapshot
//! of every aggregate changed since the previous checkpoint, then the checkpoint record with
//! the events partition's end offset, in pieces of at most `CHECKPOINT_PIECE` snapshots per
//! transaction ([`CheckpointRound`]). [`crate::restore`] reads them back.

use shared::aggregate::Aggregate;
use std::time::{Duration, Instant};

use chrono::Utc;
use rdkafka::consumer::Consumer;
use shared::envelope::{Checkpoint, Snapshot};

use super::transactions::Record;
use super::{Engine, EngineConsumer, TakenCheckpoint, TxnError};
use crate::state::{CheckpointRound, PartitionState};

/// At most this many quarantined aggregates are listed in a checkpoint (about 150 B each: the
/// record stays far below the producer's 1 MB limit).
pub const MAX_QUARANTINED: usize = 1000;

/// A piece of a checkpoint ready to be produced: snapshots (aggregate id, JSON), and the
/// record if this piece is the round's last.
struct Piece {
    snapshots: Vec<(String, Vec<u8>)>,
    record: Option<Checkpoint>,
}

/// Begins a checkpoint round of `state` at the events' end offset `end`: the record of the
/// state now, and every aggregate changed since the previous checkpoint to snapshot.
fn begin_round<A>(state: &mut PartitionState<A>, partition: i32, end: i64) -> CheckpointRound {
    state.events_since_checkpoint = 0;
    state.needs_checkpoint = false;
    CheckpointRound {
        checkpoint: Checkpoint {
            partition,
            next_event_offset: end,
            aggregates: state.aggregates(),
            taken_at: Utc::now(),
            last_event_at: state.last_event_at,
            quarantined: state.quarantined.values().cloned().collect(),
        },
        remaining: std::mem::take(&mut state.dirty).into_iter().collect(),
    }
}

/// How long a transaction waits at most for an events partition's end offset before it
/// postpones the checkpoints.
const END_OFFSET_TIMEOUT: Duration = Duration::from_secs(2);

/// How long checkpoints wait after `failures` postponements in a row: 1 s, doubling up to 30 s.
fn postponement(failures: u32) -> Duration {
    Duration::from_secs(1)
        .saturating_mul(1 << failures.min(5))
        .min(Duration::from_secs(30))
}

impl<A: Aggregate> Engine<A> {
    /// When no command is coming, a due checkpoint gets a transaction of its own.
    /// After a postponed checkpoint (the end offset could not be read) not before a second
    /// has passed, so that it does not spin transactions. Never while the consumer knows its
    /// assignment lost (the rebalance is served first); the commit's offsets fence the rest
    /// ([`Engine::commit`]).
    pub(super) fn checkpoint_idle(&mut self, consumer: &EngineConsumer<A>) {
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

    /// On the way out: the due checkpoints, piece after piece, for at most `within` (a round
    /// left unfinished costs the next start a longer tail, nothing else).
    pub(super) fn checkpoint_all(&mut self, consumer: &EngineConsumer<A>, within: Duration) {
        let until = Instant::now() + within;
        while !self.failed()
            && Instant::now() < until
            && self
                .checkpoint_retry_at
                .is_none_or(|at| Instant::now() >= at)
            && self.partitions.values().any(|s| self.checkpoint_due(s))
        {
            self.checkpoint_idle(consumer);
        }
    }

    /// Whether `state` gets a checkpoint now: by the policy, or for anything changed once the
    /// engine is stopping (so that the next start reads no tail).
    fn checkpoint_due(&self, state: &PartitionState<A>) -> bool {
        state.checkpoint_due(self.settings.checkpoint_every)
            || (self.shutdown.is_triggered() && !state.dirty.is_empty())
    }

    /// Writes the next piece of every partition's checkpoint that is due, at most
    /// `CHECKPOINT_PIECE` snapshots in all (fewer for a while after an expiry). Called first in a transaction, so the state written
    /// is the committed state. A partition whose end offset cannot be read is postponed.
    pub(super) fn write_checkpoints(&mut self) -> Result<(), TxnError> {
        // Postponed: this transaction carries commands only. A checkpoint can always wait; a
        // command must not wait for one (a partition whose leader is away made every
        // transaction spend its time here, and expire).
        if self
            .checkpoint_retry_at
            .is_some_and(|at| Instant::now() < at)
        {
            return Ok(());
        }
        let due: Vec<i32> = self
            .partitions
            .iter()
            .filter(|(_, s)| self.checkpoint_due(s))
            .map(|(p, _)| *p)
            .collect();
        let events = self.topics.events();
        let mut budget = self
            .shrink
            .limit(usize::try_from(self.settings.checkpoint_piece).unwrap_or(usize::MAX));
        for partition in due {
            if budget == 0 {
                break;
            }
            let end = match self
                .offsets
                .fetch_watermarks(&events, partition, END_OFFSET_TIMEOUT)
            {
                Ok((_, high)) => {
                    self.checkpoints_postponed = 0;
                    high
                }
                Err(e) => {
                    let wait = postponement(self.checkpoints_postponed);
                    self.checkpoints_postponed = self.checkpoints_postponed.saturating_add(1);
                    tracing::warn!(partition, error = %e, retry_in_s = wait.as_secs(), "cannot read the events' end offset; checkpoints postponed");
                    self.checkpoint_retry_at = Some(Instant::now() + wait);
                    break;
                }
            };
            let Some(piece) = self.take_piece(partition, end, budget) else {
                continue;
            };
            budget = budget.saturating_sub(piece.snapshots.len());
            self.produce_piece(partition, &piece)?;
        }
        Ok(())
    }

    /// Takes the partition's next piece into the open transaction (given back if it aborts),
    /// beginning a round at `end` if none is in progress. A partition with more quarantined
    /// aggregates than a checkpoint record can list ([`MAX_QUARANTINED`]) is not checkpointed:
    /// its restores read the events since its last checkpoint instead (slower, never wrong).
    fn take_piece(&mut self, partition: i32, end: i64, budget: usize) -> Option<Piece> {
        let (state, txn) = (self.partitions.get_mut(&partition)?, self.txn.as_mut()?);
        if state.round.is_none() {
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
            state.round = Some(begin_round(state, partition, end));
        }
        let round = state.round.as_mut()?;
        let split = round.remaining.len().saturating_sub(budget);
        let ids = round.remaining.split_off(split);
        let record = round.remaining.is_empty().then(|| round.checkpoint.clone());
        let now = Utc::now();
        // A quarantined aggregate's state is not known: no snapshot of it; the checkpoint
        // lists it instead.
        let snapshots = ids
            .iter()
            .filter(|id| !state.quarantined.contains_key(id.as_str()))
            .filter_map(|id| {
                let account = state.accounts.get(id)?;
                let snapshot = Snapshot {
                    aggregate_id: id.to_string(),
                    version: account.version,
                    event_offset: end - 1,
                    state: &account.state,
                    taken_at: now,
                };
                Some((id.to_string(), serde_json::to_vec(&snapshot).ok()?))
            })
            .collect();
        txn.checkpoints.push(TakenCheckpoint {
            partition,
            ids,
            completes: record.is_some(),
        });
        Some(Piece { snapshots, record })
    }

    fn produce_piece(&self, partition: i32, piece: &Piece) -> Result<(), TxnError> {
        let topic = self.topics.snapshots();
        for (id, payload) in &piece.snapshots {
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
        let Some(checkpoint) = &piece.record else {
            tracing::debug!(
                partition,
                snapshots = piece.snapshots.len(),
                "checkpoint piece written"
            );
            return Ok(());
        };
        let payload = serde_json::to_vec(checkpoint).unwrap_or_default();
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
            next_event_offset = checkpoint.next_event_offset,
            snapshots = piece.snapshots.len(),
            "checkpoint written"
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn postponed_checkpoints_wait_ever_longer_up_to_half_a_minute() {
        let waits: Vec<u64> = (0..8).map(|n| postponement(n).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 30, 30, 30]);
    }
}
