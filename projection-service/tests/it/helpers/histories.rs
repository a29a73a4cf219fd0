//! Generated account histories (deterministic), their expected fold, and assertions on them.

use std::collections::BTreeMap;

use chrono::{DateTime, TimeZone, Utc};
use serde_json::Value;
use shared::envelope::Metadata;
use shared::testing::unique_name;
use shared::{BankAccount, Command, EventCodec, EventEnvelope};

use super::AccountModel;

/// A small deterministic generator (no external randomness: failures reproduce).
pub struct Rng(u64);

impl Rng {
    /// Seeded.
    pub fn new(seed: u64) -> Self {
        Rng(seed ^ 0x9E37_79B9_7F4A_7C15)
    }

    /// Next number (xorshift64*).
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// In `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// One account's generated history: envelopes (current version) with distinct, increasing
/// timestamps, produced by running commands through the aggregate's rules.
#[derive(Debug, Clone)]
pub struct History {
    /// Account id.
    pub id: String,
    /// Its events.
    pub events: Vec<EventEnvelope>,
}

impl History {
    /// The state after each version (index 0 = version 1).
    pub fn states(&self) -> Vec<BankAccount> {
        let mut account = BankAccount::default();
        self.events
            .iter()
            .map(|e| {
                account.apply(&e.event().expect("valid event"));
                account.clone()
            })
            .collect()
    }

    /// The final state.
    pub fn final_state(&self) -> BankAccount {
        self.states().pop().unwrap_or_default()
    }
}

/// Generates `accounts` histories of up to `max_events` events each (USD accounts, so they can
/// also be written as v1 events). Timestamps start at `base` and step one second per version.
pub fn generate(prefix: &str, accounts: usize, max_events: u64, seed: u64) -> Vec<History> {
    let mut rng = Rng::new(seed);
    let base = Utc
        .with_ymd_and_hms(2026, 1, 1, 0, 0, 0)
        .single()
        .expect("valid date");
    (0..accounts)
        .map(|i| {
            let id = format!("{prefix}-{i:05}");
            let mut account = BankAccount::default();
            let mut events = Vec::new();
            let target = 1 + rng.below(max_events.max(1));
            let owner = ["Ann", "Bo", "Chen", "Dana"][i % 4].to_owned();
            let mut commands = vec![Command::OpenAccount {
                owner,
                currency: "USD".into(),
                initial_balance_minor: i64::try_from(rng.below(10_000)).unwrap_or(0),
            }];
            while (events.len() as u64) < target {
                let command = commands.pop().unwrap_or_else(|| {
                    let amount = 1 + i64::try_from(rng.below(5_000)).unwrap_or(0);
                    if rng.below(3) == 0 && account.balance_minor > 0 {
                        Command::Withdraw {
                            amount_minor: amount.min(account.balance_minor),
                            currency: None,
                        }
                    } else {
                        Command::Deposit {
                            amount_minor: amount,
                            currency: None,
                        }
                    }
                });
                let new = account
                    .handle(&command)
                    .expect("generated commands are valid");
                for e in new {
                    account.apply(&e);
                    let ts = base
                        + chrono::Duration::seconds(account.version as i64 * 60)
                        + chrono::Duration::milliseconds(i as i64);
                    events.push(EventEnvelope::new(
                        &id,
                        account.version,
                        &e,
                        ts,
                        Metadata::new(),
                    ));
                }
            }
            // Some accounts end closed: empty them, then close.
            if i % 5 == 4 {
                for command in [
                    Command::Withdraw {
                        amount_minor: account.balance_minor,
                        currency: None,
                    },
                    Command::CloseAccount,
                ] {
                    if let Ok(new) = account.handle(&command) {
                        for e in new {
                            account.apply(&e);
                            let ts = base + chrono::Duration::seconds(account.version as i64 * 60);
                            events.push(EventEnvelope::new(
                                &id,
                                account.version,
                                &e,
                                ts,
                                Metadata::new(),
                            ));
                        }
                    }
                }
            }
            History { id, events }
        })
        .collect()
}

/// The envelope as the seed era wrote it (v1: `id`, no `schema_version`, decimal amounts).
pub fn as_v1_bytes(codec: &EventCodec, env: &EventEnvelope) -> Vec<u8> {
    codec
        .downcast(env, 1, "USD")
        .expect("downcast to v1")
        .to_string()
        .into_bytes()
}

/// Asserts an API account equals an expected state.
#[track_caller]
pub fn assert_account(body: &Value, id: &str, want: &BankAccount) {
    assert_eq!(body["id"], id, "{body}");
    assert_eq!(body["owner"], want.owner.as_str(), "{id}: {body}");
    assert_eq!(body["currency"], want.currency.as_str(), "{id}: {body}");
    assert_eq!(
        body["balance_minor"].as_i64(),
        Some(want.balance_minor),
        "{id}: {body}"
    );
    assert_eq!(
        body["balance"],
        shared::money::format_minor(
            want.balance_minor,
            shared::money::minor_digits(&want.currency)
        )
        .as_str(),
        "{id}: {body}"
    );
    assert_eq!(body["status"], want.status.as_str(), "{id}: {body}");
    assert_eq!(body["version"].as_u64(), Some(want.version), "{id}: {body}");
    assert_eq!(
        body["transaction_count"].as_u64(),
        Some(want.transaction_count),
        "{id}: {body}"
    );
}

/// The expected read model of generated histories, in the shape of [`read_model`].
pub fn expected_model(histories: &[History]) -> BTreeMap<String, AccountModel> {
    histories
        .iter()
        .map(|h| {
            let s = h.final_state();
            (
                h.id.clone(),
                AccountModel {
                    balance_minor: s.balance_minor,
                    version: s.version as i64,
                    transaction_count: s.transaction_count as i64,
                    status: s.status.as_str().to_owned(),
                },
            )
        })
        .collect()
}

/// A timestamp strictly between two of the generated ones.
pub fn just_after(ts: &DateTime<Utc>) -> DateTime<Utc> {
    *ts + chrono::Duration::milliseconds(1)
}

/// An RFC 3339 query value (URL-safe: `Z`, no `+`).
pub fn rfc3339(ts: &DateTime<Utc>) -> String {
    ts.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
}

/// A unique account-id prefix for a test.
pub fn ids(prefix: &str) -> String {
    unique_name(prefix)
}
