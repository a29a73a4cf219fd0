//! Transfers as pure decisions: every step decided by [`Bank`] in any order the partitions may
//! take them (each aggregate's own commands in order, different aggregates interleaved at
//! random), some steps delivered twice, and the books must balance.

use std::collections::{HashMap, HashSet, VecDeque};

use chrono::Utc;
use proptest::prelude::*;
use shared::aggregate::{self, Aggregate, Context, DomainCommand};
use shared::bank::{Bank, BankCommand};
use shared::envelope::Metadata;
use shared::transfer::{Start, TransferCommand, TransferStatus};
use shared::{AccountStatus, Command};
use uuid::Uuid;

/// A bank without Kafka: one command queue per aggregate (its partition), the dedupe window,
/// and what each decision sends on.
#[derive(Default)]
struct Ledger {
    states: HashMap<String, (u64, Bank)>,
    queues: HashMap<String, VecDeque<(Uuid, BankCommand)>>,
    decided: HashSet<Uuid>,
    rejections: Vec<String>,
}

impl Ledger {
    fn send(&mut self, aggregate_id: &str, command_id: Uuid, command: BankCommand) {
        self.queues
            .entry(aggregate_id.to_owned())
            .or_default()
            .push_back((command_id, command));
    }

    /// Decides the next command of `aggregate_id`'s queue as the engine does; `twice` sends
    /// the steps it sets off a second time (a redone step).
    fn step(&mut self, aggregate_id: &str, twice: bool) {
        let Some((command_id, command)) = self
            .queues
            .get_mut(aggregate_id)
            .and_then(VecDeque::pop_front)
        else {
            return;
        };
        if !self.decided.insert(command_id) {
            return; // answered from the dedupe window
        }
        let (version, state) = self.states.get(aggregate_id).cloned().unwrap_or_default();
        let metadata = Metadata::new();
        let ctx = Context {
            aggregate_id,
            version,
            now: Utc::now(),
            metadata: &metadata,
        };
        let steps = match aggregate::execute(state.clone(), None, &command, &ctx) {
            Ok((events, after)) => {
                let steps = after.react(&command, Ok(&events), &ctx);
                self.states.insert(
                    aggregate_id.to_owned(),
                    (version + events.len() as u64, after),
                );
                steps
            }
            Err(rejection) => {
                self.rejections.push(rejection.code.to_string());
                state.react(&command, Err(&rejection), &ctx)
            }
        };
        for _ in 0..if twice { 2 } else { 1 } {
            for step in &steps {
                let command =
                    BankCommand::from_parts(step.command_type, step.payload.clone()).unwrap();
                self.send(&step.aggregate_id, step.command_id, command);
            }
        }
    }

    fn busy(&self) -> Vec<String> {
        let mut ids: Vec<String> = self
            .queues
            .iter()
            .filter(|(_, q)| !q.is_empty())
            .map(|(id, _)| id.clone())
            .collect();
        ids.sort();
        ids
    }

    fn balance(&self, id: &str) -> i64 {
        self.states
            .get(id)
            .and_then(|(_, s)| s.account())
            .map_or(0, |a| a.balance_minor)
    }

    fn transfer_status(&self, id: &str) -> TransferStatus {
        self.states
            .get(id)
            .and_then(|(_, s)| s.transfer())
            .map_or(TransferStatus::New, |t| t.status)
    }
}

fn open(ledger: &mut Ledger, id: &str, currency: &str, balance: i64) {
    ledger.send(
        id,
        Uuid::new_v4(),
        BankCommand::Account(Command::OpenAccount {
            owner: "o".into(),
            currency: currency.into(),
            initial_balance_minor: balance,
        }),
    );
    ledger.step(id, false);
}

fn transfer(ledger: &mut Ledger, id: &str, from: &str, to: &str, amount_minor: i64) {
    ledger.send(
        id,
        Uuid::new_v4(),
        BankCommand::Transfer(TransferCommand::TransferMoney(Start {
            from: from.into(),
            to: to.into(),
            amount_minor,
            currency: None,
        })),
    );
}

/// Runs every queue dry, picking the next aggregate with `picks`.
fn drain(ledger: &mut Ledger, picks: &[(usize, bool)]) {
    let mut picks = picks.iter().cycle();
    for _ in 0..100_000 {
        let busy = ledger.busy();
        if busy.is_empty() {
            return;
        }
        let (i, twice) = picks.next().copied().unwrap_or((0, false));
        ledger.step(&busy[i % busy.len()], twice);
    }
    panic!("the workflow did not end");
}

const ACCOUNTS: [(&str, &str, i64); 5] = [
    ("a", "EUR", 1_000),
    ("b", "EUR", 500),
    ("c", "EUR", 0),
    ("y", "JPY", 10_000),
    ("closed", "EUR", 0),
];

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// Money is conserved, every transfer ends, each account's balance is its opening balance
    /// plus completed transfers in minus completed transfers out, failed ones change nothing and
    /// no transfer is left in flight, whatever the interleaving and however often steps repeat.
    #[test]
    fn transfers_conserve_money_in_any_interleaving(
        transfers in prop::collection::vec((0..7usize, 0..7usize, 1..700i64), 1..40),
        picks in prop::collection::vec((0..64usize, prop::bool::weighted(0.2)), 1..200),
    ) {
        let mut ledger = Ledger::default();
        for (id, currency, balance) in ACCOUNTS {
            open(&mut ledger, id, currency, balance);
        }
        ledger.send("closed", Uuid::new_v4(), BankCommand::Account(Command::CloseAccount));
        ledger.step("closed", false);
        // Two ids that are no account: "ghost" (never opened) and "t0" (a transfer's).
        let names = ["a", "b", "c", "y", "closed", "ghost", "t0"];
        for (n, (from, to, amount)) in transfers.iter().enumerate() {
            transfer(&mut ledger, &format!("t{n}"), names[*from], names[*to], *amount);
        }
        drain(&mut ledger, &picks);

        let total_before: i64 = ACCOUNTS.iter().map(|(_, _, b)| b).sum();
        let total_after: i64 = ACCOUNTS.iter().map(|(id, _, _)| ledger.balance(id)).sum();
        prop_assert_eq!(total_after, total_before);
        let mut expected: HashMap<&str, i64> =
            ACCOUNTS.iter().map(|(id, _, b)| (*id, *b)).collect();
        for (n, (from, to, amount)) in transfers.iter().enumerate() {
            let id = format!("t{n}");
            let status = ledger.transfer_status(&id);
            if from == to {
                prop_assert_eq!(status, TransferStatus::New, "SameAccount is refused at once");
            }
            prop_assert!(status != TransferStatus::Pending, "{} still pending", id);
            if status == TransferStatus::Completed {
                *expected.get_mut(names[*from]).unwrap() -= amount;
                *expected.get_mut(names[*to]).unwrap() += amount;
            }
        }
        for (id, _, _) in ACCOUNTS {
            prop_assert_eq!(ledger.balance(id), expected[id], "balance of {}", id);
            let account = ledger.states[id].1.account().unwrap().clone();
            prop_assert!(account.transfers_out.is_empty(), "{} keeps {:?}", id, account.transfers_out);
        }
        prop_assert_eq!(ledger.states["closed"].1.account().unwrap().status, AccountStatus::Closed);
    }
}

#[test]
fn each_failure_has_its_reason_and_moves_nothing() {
    let mut ledger = Ledger::default();
    for (id, currency, balance) in ACCOUNTS {
        open(&mut ledger, id, currency, balance);
    }
    ledger.send(
        "closed",
        Uuid::new_v4(),
        BankCommand::Account(Command::CloseAccount),
    );
    ledger.step("closed", false);
    let cases = [
        ("ok", "a", "b", 100, None),
        ("poor", "c", "a", 1, Some("InsufficientFunds")),
        ("nobody-from", "ghost", "a", 1, Some("AccountNotFound")),
        ("nobody-to", "a", "ghost", 1, Some("AccountNotFound")),
        ("to-closed", "a", "closed", 1, Some("AccountClosed")),
        ("from-closed", "closed", "a", 1, Some("AccountClosed")),
        ("yen", "a", "y", 1, Some("CurrencyMismatch")),
    ];
    for (id, from, to, amount, _) in cases {
        transfer(&mut ledger, id, from, to, amount);
    }
    drain(&mut ledger, &[(0, false)]);
    for (id, _, _, _, reason) in cases {
        let (_, state) = &ledger.states[id];
        let t = state.transfer().unwrap();
        match reason {
            None => assert_eq!(t.status, TransferStatus::Completed, "{id}"),
            Some(reason) => {
                assert_eq!(t.status, TransferStatus::Failed, "{id}");
                assert_eq!(t.reason.as_deref(), Some(reason), "{id}");
            }
        }
    }
    assert_eq!(ledger.balance("a"), 900);
    assert_eq!(ledger.balance("b"), 600);
    assert_eq!(ledger.balance("y"), 10_000);
}

#[test]
fn refused_at_once_and_the_id_is_never_reused() {
    let mut ledger = Ledger::default();
    open(&mut ledger, "a", "EUR", 10);
    open(&mut ledger, "b", "EUR", 10);
    for (id, from, to, amount) in [("t", "a", "a", 1), ("u", "a", "b", 0), ("a", "b", "a", 1)] {
        transfer(&mut ledger, id, from, to, amount);
        ledger.step(id, false);
    }
    assert_eq!(
        ledger.rejections,
        ["SameAccount", "InvalidAmount", "TransferExists"]
    );
    transfer(&mut ledger, "v", "a", "b", 5);
    drain(&mut ledger, &[(0, false)]);
    transfer(&mut ledger, "v", "b", "a", 5);
    ledger.step("v", false);
    assert_eq!(
        ledger.rejections.last().map(String::as_str),
        Some("TransferExists")
    );
    // An account with a transfer out in flight cannot close; it can once the transfer ends.
    transfer(&mut ledger, "w", "a", "b", 5);
    ledger.step("w", false); // started; the debit waits in a's queue
    ledger.step("a", false); // debited: a's balance is 0
    ledger.send(
        "a",
        Uuid::new_v4(),
        BankCommand::Account(Command::CloseAccount),
    );
    ledger.step("a", false);
    assert_eq!(
        ledger.rejections.last().map(String::as_str),
        Some("TransfersPending")
    );
    drain(&mut ledger, &[(0, false)]);
    ledger.send(
        "a",
        Uuid::new_v4(),
        BankCommand::Account(Command::CloseAccount),
    );
    ledger.step("a", false);
    assert_eq!(
        ledger.states["a"].1.account().unwrap().status,
        AccountStatus::Closed
    );
}

#[test]
fn a_named_currency_must_be_a_code_and_no_refund_can_overflow() {
    let mut ledger = Ledger::default();
    open(&mut ledger, "a", "EUR", 10);
    open(&mut ledger, "b", "EUR", 10);
    // Regression (review): a client's currency reached the read model unchecked (a NUL stops a
    // PostgreSQL projection).
    for currency in ["\u{0}", "eur", "EURO"] {
        ledger.send(
            "t",
            Uuid::new_v4(),
            BankCommand::Transfer(TransferCommand::TransferMoney(Start {
                from: "a".into(),
                to: "b".into(),
                amount_minor: 1,
                currency: Some(currency.into()),
            })),
        );
        ledger.step("t", false);
        assert_eq!(
            ledger.rejections.last().map(String::as_str),
            Some("Malformed")
        );
    }
    // A deposit that would leave no room for the amount in flight to come back is refused:
    // the refund could not be booked in full.
    transfer(&mut ledger, "u", "a", "ghost", 10);
    ledger.step("u", false);
    ledger.step("a", false); // debited: 10 in flight, balance 0
    ledger.send(
        "a",
        Uuid::new_v4(),
        BankCommand::Account(Command::Deposit {
            amount_minor: i64::MAX - 5,
            currency: None,
        }),
    );
    ledger.step("a", false);
    assert_eq!(
        ledger.rejections.last().map(String::as_str),
        Some("InvalidAmount")
    );
    drain(&mut ledger, &[(0, false)]);
    assert_eq!(ledger.balance("a"), 10, "refunded in full");
}

#[test]
fn step_commands_are_internal_and_their_ids_derived() {
    for internal in BankCommand::INTERNAL {
        assert!(BankCommand::TYPES.contains(internal));
    }
    assert!(!BankCommand::INTERNAL.contains(&"TransferMoney"));
    assert_eq!(
        aggregate::step_id("t-1", "DebitForTransfer"),
        aggregate::step_id("t-1", "DebitForTransfer")
    );
    assert_ne!(
        aggregate::step_id("t-1", "DebitForTransfer"),
        aggregate::step_id("t-2", "DebitForTransfer")
    );
    assert_ne!(
        aggregate::step_id("t-1", "DebitForTransfer"),
        aggregate::step_id("t-1", "CreditForTransfer")
    );
}

#[test]
fn snapshots_keep_the_account_shape_and_name_transfers() {
    let account = Bank::default();
    let json = serde_json::to_value(&account).unwrap();
    assert!(json.get("balance_minor").is_some(), "{json}");
    assert_eq!(serde_json::from_value::<Bank>(json).unwrap(), account);
    let mut ledger = Ledger::default();
    open(&mut ledger, "a", "EUR", 10);
    transfer(&mut ledger, "t", "a", "b", 1);
    ledger.step("t", false);
    let transfer = ledger.states["t"].1.clone();
    let json = serde_json::to_value(&transfer).unwrap();
    assert_eq!(json["transfer"]["status"], "pending", "{json}");
    assert_eq!(serde_json::from_value::<Bank>(json).unwrap(), transfer);
}
