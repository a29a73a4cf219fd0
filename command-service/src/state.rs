//! In-memory state of the partitions this instance owns: every aggregate's folded state and the
//! de-duplication index (command id → original result).

use std::collections::HashMap;

use shared::{BankAccount, CommandResult};
use uuid::Uuid;

/// The state of one owned partition of `<prefix>.commands` (and of the co-partitioned events,
/// snapshots and results partitions).
#[derive(Debug, Default)]
pub struct PartitionState {
    /// Folded state of every aggregate living on the partition.
    pub accounts: HashMap<String, BankAccount>,
    /// Result of every command already processed on the partition, so a retried command gets
    /// its original answer and appends nothing.
    pub results: HashMap<Uuid, CommandResult>,
}

/// Changes made by the open transaction, kept apart until it commits: an abort simply drops
/// them.
#[derive(Debug, Default)]
pub struct Overlay {
    /// Aggregates changed in the transaction (their new state).
    pub accounts: HashMap<String, BankAccount>,
    /// Results decided in the transaction, with their partition.
    pub results: HashMap<Uuid, (i32, CommandResult)>,
}

impl Overlay {
    /// Moves the overlay's changes into the committed partition states.
    pub fn merge_into(
        self,
        partitions: &mut HashMap<i32, PartitionState>,
        partition_of: impl Fn(&str) -> i32,
    ) {
        for (id, account) in self.accounts {
            if let Some(state) = partitions.get_mut(&partition_of(&id)) {
                state.accounts.insert(id, account);
            }
        }
        for (command_id, (partition, result)) in self.results {
            if let Some(state) = partitions.get_mut(&partition) {
                state.results.insert(command_id, result);
            }
        }
    }
}
