//! Records the writer stored before the aggregate seam (captured from the release before it,
//! `ee8c859`): this release reads them as they are and writes the same shape, so an upgrade (and
//! a step back) restores from the checkpoints and snapshots already on the topics.

use serde_json::Value;
use shared::envelope::{Checkpoint, Snapshot};
use shared::{AccountStatus, BankAccount};

const SNAPSHOTS: [&str; 2] = [
    r#"{"aggregate_id":"up-2","version":1,"event_offset":1,"state":{"version":1,"status":"active","owner":"A name longer than twenty-four bytes for sure","currency":"USD","balance_minor":7,"transaction_count":0},"taken_at":"2026-12-07T13:34:31.830817235Z"}"#,
    r#"{"aggregate_id":"up-1","version":3,"event_offset":5,"state":{"version":3,"status":"active","owner":"Ünïcode Owner","currency":"EUR","balance_minor":120,"transaction_count":2},"taken_at":"2026-12-07T13:34:31.830511883Z"}"#,
];

const CHECKPOINTS: [&str; 2] = [
    r#"{"partition":1,"next_event_offset":0,"aggregates":0,"taken_at":"2026-12-07T13:34:31.628951072Z"}"#,
    r#"{"partition":0,"next_event_offset":6,"aggregates":1,"taken_at":"2026-12-07T13:34:31.830509319Z","last_event_at":"2026-12-07T13:34:31.788235973Z"}"#,
];

#[test]
fn snapshots_of_the_release_before_are_read_and_written_back_unchanged() {
    let read: Vec<Snapshot> = SNAPSHOTS
        .iter()
        .map(|s| serde_json::from_str(s).unwrap())
        .collect();
    assert_eq!(
        read[1].state,
        BankAccount {
            version: 3,
            status: AccountStatus::Active,
            owner: "Ünïcode Owner".into(),
            currency: "EUR".into(),
            balance_minor: 120,
            transaction_count: 2,
            transfers_out: Default::default(),
        }
    );
    assert_eq!(
        read[0].state.owner,
        "A name longer than twenty-four bytes for sure"
    );
    for (text, snapshot) in SNAPSHOTS.iter().zip(&read) {
        let written: Value = serde_json::to_value(snapshot).unwrap();
        assert_eq!(written, serde_json::from_str::<Value>(text).unwrap());
    }
}

#[test]
fn checkpoints_of_the_release_before_are_read_and_written_back_unchanged() {
    for text in CHECKPOINTS {
        let checkpoint: Checkpoint = serde_json::from_str(text).unwrap();
        let written: Value = serde_json::to_value(&checkpoint).unwrap();
        assert_eq!(written, serde_json::from_str::<Value>(text).unwrap());
    }
}
