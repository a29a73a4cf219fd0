//! Rebalance callbacks: newly assigned partitions are paused and restored on a thread of their
//! own; finished restores are installed and resumed from the poll loop; revoked partitions
//! commit the open transaction and drop their state.

use shared::aggregate::Aggregate;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rdkafka::consumer::Consumer;
use rdkafka::{Offset, TopicPartitionList};

use super::{
    Engine, EngineConsumer, PendingRestore, RestoreDone, RestoredPartitions, committed_offsets,
    lock,
};
use crate::metrics as m;
use crate::restore;
use crate::state::PartitionState;

impl<A: Aggregate> Engine<A> {
    /// Pauses newly assigned partitions and restores them on a thread of their own;
    /// [`Engine::install_restores`] resumes them.
    pub(super) fn on_assign(&mut self, consumer: &EngineConsumer<A>, partitions: &[i32]) {
        self.assigned = true;
        if partitions.is_empty() {
            self.update_status();
            return;
        }
        let commands = self.topics.commands();
        let mut tpl = TopicPartitionList::new();
        for p in partitions {
            tpl.add_partition(&commands, *p);
        }
        if let Err(e) = consumer.pause(&tpl) {
            // Not fatal: messages of a partition being restored are ignored, and the restore
            // ends with a seek to the committed offsets.
            tracing::warn!(error = %e, "cannot pause the partitions being restored");
        }
        self.next_restore += 1;
        let id = self.next_restore;
        let cancel = Arc::new(AtomicBool::new(self.shutdown.is_triggered()));
        for p in partitions {
            self.restoring.insert(*p, id);
        }
        self.restores.insert(
            id,
            PendingRestore {
                partitions: partitions.to_vec(),
                cancel: Arc::clone(&cancel),
            },
        );
        tracing::info!(?partitions, "partitions assigned; restoring");
        if let Err(e) = self.spawn_restore(id, partitions.to_vec(), cancel) {
            self.fail(format!("cannot start a restore thread: {e}"));
        }
        self.update_status();
    }

    /// Runs restore `id` on a thread of its own; its outcome comes back on `restore_done`.
    fn spawn_restore(
        &self,
        id: u64,
        partitions: Vec<i32>,
        cancel: Arc<AtomicBool>,
    ) -> std::io::Result<()> {
        let settings = Arc::clone(&self.settings);
        let codec = Arc::clone(&self.codec);
        let dedupe = Arc::clone(&self.dedupe);
        let done = self.restore_done.0.clone();
        let now_ms = self.broker_now_ms();
        std::thread::Builder::new()
            .name(format!("restore-{id}"))
            .spawn(move || {
                let started = Instant::now();
                let outcome =
                    committed_offsets(&settings, &partitions, &cancel).and_then(|committed| {
                        restore::restore(&settings, &codec, &dedupe, &partitions, &cancel, now_ms)
                            .map(|restored| RestoredPartitions {
                                committed,
                                restored,
                            })
                    });
                let _ = done.send(RestoreDone {
                    id,
                    started,
                    outcome,
                });
            })
            .map(drop)
    }

    /// Installs the restores that finished: their state, their committed offsets, and the
    /// partitions resumed from there.
    pub(super) fn install_restores(&mut self, consumer: &EngineConsumer<A>) {
        while let Ok(done) = self.restore_done.1.try_recv() {
            let Some(pending) = self.restores.remove(&done.id) else {
                continue;
            };
            // Partitions revoked (or assigned again) meanwhile are not this restore's anymore.
            let current: Vec<i32> = pending
                .partitions
                .iter()
                .copied()
                .filter(|p| self.restoring.get(p) == Some(&done.id))
                .collect();
            for p in &current {
                self.restoring.remove(p);
            }
            let found = match done.outcome {
                Ok(found) => found,
                Err(restore::RestoreError::Interrupted) => continue,
                Err(e) => {
                    self.fail(format!("restore failed: {e}"));
                    return;
                }
            };
            let stats = found.restored.stats.clone();
            let Some(installed) = self.install(consumer, current, found) else {
                return;
            };
            self.record_restore(&installed, &stats, done.started.elapsed());
        }
        self.update_status();
    }

    /// Installs the state of the restored partitions still wanted and resumes them; `None` when
    /// that failed (the engine then stops).
    fn install(
        &mut self,
        consumer: &EngineConsumer<A>,
        partitions: Vec<i32>,
        found: RestoredPartitions<A>,
    ) -> Option<Vec<i32>> {
        let commands = self.topics.commands();
        let mut resume = TopicPartitionList::new();
        let mut installed = Vec::new();
        let mut states: HashMap<i32, PartitionState<A>> = found.restored.states;
        for p in partitions {
            let Some(state) = states.remove(&p) else {
                continue;
            };
            let offset = match found.committed.get(&p) {
                Some(Offset::Offset(o)) => Offset::Offset(*o),
                _ => Offset::Beginning,
            };
            // Nothing of the partition delivered: the consumer starts it at the committed
            // offset by itself. A message fetched (and ignored) before the pause took effect
            // moved the position past it: seek back.
            if self.skipped_while_restoring.remove(&p)
                && let Err(e) = consumer.seek(&commands, p, offset, Duration::from_secs(10))
            {
                self.fail(format!(
                    "cannot seek partition {p} to its committed offset {offset:?}: {e}"
                ));
                return None;
            }
            self.committed_next.insert(p, offset);
            self.partitions.insert(p, state);
            resume.add_partition(&commands, p);
            installed.push(p);
        }
        if let Err(e) = consumer.resume(&resume) {
            self.fail(format!("cannot resume the restored partitions: {e}"));
            return None;
        }
        Some(installed)
    }

    /// Metrics, `/ready` totals and a log line for a restore that was installed.
    fn record_restore(&self, installed: &[i32], stats: &restore::RestoreStats, elapsed: Duration) {
        m::restore_seconds(elapsed);
        m::restored_partitions(installed.len());
        let quarantined: usize = installed
            .iter()
            .filter_map(|p| self.partitions.get(p))
            .map(|s| s.quarantined.len())
            .sum();
        {
            let mut totals = lock(&self.status.restores);
            totals.partitions += installed.len() as u64;
            totals.snapshots += stats.snapshots as u64;
            totals.events += stats.events as u64;
            totals.results += stats.results as u64;
            totals.replayed_partitions += stats.replayed.len() as u64;
            totals.quarantined_aggregates += quarantined as u64;
            totals.last_seconds = elapsed.as_secs_f64();
        }
        tracing::info!(
            partitions = ?installed,
            snapshots = stats.snapshots,
            events = stats.events,
            results = stats.results,
            replayed = ?stats.replayed,
            quarantined,
            elapsed_ms = elapsed.as_millis() as u64,
            "partitions restored"
        );
    }

    pub(super) fn on_revoke(&mut self, consumer: &EngineConsumer<A>, partitions: &[i32]) {
        self.commit(consumer);
        for p in partitions {
            self.partitions.remove(p);
            self.committed_next.remove(p);
            self.restoring.remove(p);
            self.skipped_while_restoring.remove(p);
        }
        // A restore none of whose partitions is still wanted can stop.
        let restoring = &self.restoring;
        self.restores.retain(|id, pending| {
            let wanted = pending
                .partitions
                .iter()
                .any(|p| restoring.get(p) == Some(id));
            if !wanted {
                pending.cancel.store(true, Ordering::SeqCst);
            }
            wanted
        });
        tracing::info!(?partitions, "partitions revoked");
        if self.partitions.is_empty() {
            // No work left that could be failing.
            *super::lock(&self.status.failing) = None;
        }
        self.update_status();
    }

    /// Drops every partition (the consumer is being replaced): the new consumer's assignment
    /// restores them again.
    pub(super) fn forget_partitions(&mut self) {
        // Its open transaction dies with the producer that a new member comes with.
        self.drop_txn();
        self.cancel_restores();
        self.restores.clear();
        self.restoring.clear();
        self.skipped_while_restoring.clear();
        self.partitions.clear();
        self.committed_next.clear();
        self.assigned = false;
        self.update_status();
    }

    /// Stops the restores still running (shutdown).
    pub(super) fn cancel_restores(&mut self) {
        for pending in self.restores.values() {
            pending.cancel.store(true, Ordering::SeqCst);
        }
    }
}
