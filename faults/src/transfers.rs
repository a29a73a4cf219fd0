//! The transfer load of the transfer scenarios: a few hot accounts, tasks sending transfers
//! among them at once (opposite directions included), some to a closed, an unknown and an
//! other-currency account, some re-sent with the same command id; and the check at the end:
//! every transfer ends within a bounded time, each one as it must, and the books balance.
//! Eight senders in the quick profile, 24 in the long one.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;
use shared::bank::BankCommand;
use shared::bank_account::Command;
use shared::envelope::CommandMessage;
use shared::transfer::{Start, TransferCommand};

use crate::check::Tally;
use crate::driver::Driver;
use crate::model::Outcome;

/// How long the transfers may stay pending after the load stopped.
const END_LIMIT: Duration = Duration::from_secs(120);

/// One transfer the load started.
#[derive(Debug, Clone)]
struct Started {
    id: String,
    from: String,
    to: String,
    amount_minor: i64,
    /// The reason it must fail with; `None`: completed, or failed `InsufficientFunds`.
    must_fail: Option<&'static str>,
    /// Its start was answered; one that was not may have started all the same.
    answered: bool,
}

/// The accounts of the transfer load and the transfers started among them.
pub(crate) struct Book {
    hot: Vec<String>,
    /// Every account of the load with its opening balance.
    opening: HashMap<String, i64>,
    closed: String,
    other_currency: String,
    unknown: String,
    started: Mutex<Vec<Started>>,
    /// Answers that were not what the contract says, for the tally.
    wrong: Mutex<Vec<String>>,
}

async fn answered(driver: &Driver, command: &CommandMessage<BankCommand>) -> Option<Outcome> {
    driver
        .execute(command, Instant::now() + Duration::from_secs(120))
        .await
}

/// Opens the load's accounts (and closes one); `None` with the reason when one was refused.
pub(crate) async fn open_accounts(driver: &Driver, prefix: &str) -> Result<Book, String> {
    let name = |what: &str| format!("tx-{prefix}-{what}");
    let hot: Vec<String> = (0..4).map(|i| name(&format!("hot{i}"))).collect();
    let mut opening = HashMap::new();
    let mut accounts: Vec<(String, &str, i64)> =
        hot.iter().map(|id| (id.clone(), "EUR", 200_000)).collect();
    accounts.push((name("yen"), "JPY", 1_000));
    accounts.push((name("shut"), "EUR", 0));
    for (id, currency, balance) in &accounts {
        let open = CommandMessage::new(
            id.clone(),
            BankCommand::Account(Command::OpenAccount {
                owner: "transfers".into(),
                currency: (*currency).into(),
                initial_balance_minor: *balance,
            }),
        );
        match answered(driver, &open).await {
            Some(Outcome::Accepted { .. }) => {}
            other => return Err(format!("opening {id}: {other:?}")),
        }
        opening.insert(id.clone(), *balance);
    }
    let close = CommandMessage::new(name("shut"), BankCommand::Account(Command::CloseAccount));
    match answered(driver, &close).await {
        Some(Outcome::Accepted { .. }) => {}
        other => return Err(format!("closing the closed account: {other:?}")),
    }
    Ok(Book {
        hot,
        opening,
        closed: name("shut"),
        other_currency: name("yen"),
        unknown: name("ghost"),
        started: Mutex::new(Vec::new()),
        wrong: Mutex::new(Vec::new()),
    })
}

/// Sends transfers until the run stops: each is answered accepted at version 1, and one in
/// ten is sent again with its command id (the same answer, never a second transfer).
pub(crate) async fn transfer_task(driver: Arc<Driver>, book: Arc<Book>, task: usize, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut n = 0;
    while !driver.stop.load(Ordering::SeqCst) {
        while driver.paused.load(Ordering::SeqCst) && !driver.stop.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let from = book.hot[rng.gen_range(0..book.hot.len())].clone();
        let (to, must_fail) = match rng.gen_range(0..20) {
            0 => (book.closed.clone(), Some("AccountClosed")),
            1 => (book.unknown.clone(), Some("AccountNotFound")),
            2 => (book.other_currency.clone(), Some("CurrencyMismatch")),
            _ => {
                let others: Vec<&String> = book.hot.iter().filter(|h| **h != from).collect();
                (others[rng.gen_range(0..others.len())].clone(), None)
            }
        };
        let mut started = Started {
            id: format!("{from}-t{task}-{n}"),
            from,
            to,
            amount_minor: rng.gen_range(1..5_000),
            must_fail,
            answered: false,
        };
        n += 1;
        let command = CommandMessage::new(
            started.id.clone(),
            BankCommand::Transfer(TransferCommand::TransferMoney(Start {
                from: started.from.clone(),
                to: started.to.clone(),
                amount_minor: started.amount_minor,
                currency: None,
            })),
        );
        let answer = answered(&driver, &command).await;
        let again = if rng.gen_range(0..10) == 0 {
            Some(answered(&driver, &command).await)
        } else {
            None
        };
        let expected = Some(Outcome::Accepted { version: 1 });
        if answer != expected || again.as_ref().is_some_and(|a| *a != expected) {
            book.wrong.lock().unwrap().push(format!(
                "transfer {} answered {answer:?} (again: {again:?}), expected accepted at version 1",
                started.id
            ));
        }
        started.answered = answer.is_some();
        book.started.lock().unwrap().push(started);
        tokio::time::sleep(Duration::from_millis(rng.gen_range(5..30))).await;
    }
}

async fn get(http: &reqwest::Client, url: &str) -> Option<Value> {
    let response = http.get(url).send().await.ok()?;
    if response.status() != 200 {
        return None;
    }
    response.json().await.ok()
}

/// The end of the run: every transfer ends within [`END_LIMIT`], as it must; each account's
/// balance is its opening plus the completed transfers in minus those out, the total is
/// unchanged, and nothing is left in flight. Counts what is not into `tally`.
pub(crate) async fn check(
    book: &Book,
    projection_url: &str,
    http: &reqwest::Client,
    tally: &mut Tally,
) {
    let started = book.started.lock().unwrap().clone();
    for wrong in book.wrong.lock().unwrap().iter() {
        tally.transfers_wrong += 1;
        tally.notes.push(wrong.clone());
    }
    let deadline = Instant::now() + END_LIMIT;
    let mut balances = book.opening.clone();
    let (mut completed, mut failed) = (0, 0);
    // The answered ones first: by the time the unanswered ones are asked for, the projection
    // has caught up, and one it does not know never started.
    let (answered, unanswered): (Vec<&Started>, Vec<&Started>) =
        started.iter().partition(|t| t.answered);
    for t in answered.iter().chain(unanswered.iter()) {
        let url = format!("{projection_url}/transfers/{}", t.id);
        if !t.answered {
            match http.get(&url).send().await {
                Ok(r) if r.status() == 404 => continue,
                _ => {}
            }
        }
        let ended = loop {
            match get(http, &url).await {
                Some(v) if v["status"] != "pending" => break Some(v),
                _ if Instant::now() > deadline => break None,
                _ => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        };
        let Some(ended) = ended else {
            tally.transfers_wrong += 1;
            tally.notes.push(format!(
                "transfer {} did not end within {END_LIMIT:?}",
                t.id
            ));
            continue;
        };
        let status = ended["status"].as_str().unwrap_or("?");
        let reason = ended["reason"].as_str();
        // A source drained by earlier transfers refuses first, whatever the target.
        let fine = match (t.must_fail, status) {
            (Some(must), "failed") => reason == Some(must) || reason == Some("InsufficientFunds"),
            (None, "completed") => true,
            (None, "failed") => reason == Some("InsufficientFunds"),
            _ => false,
        };
        if !fine {
            tally.transfers_wrong += 1;
            tally.notes.push(format!(
                "transfer {} ended {status} ({reason:?}), expected {:?}",
                t.id, t.must_fail
            ));
        }
        if status == "completed" {
            completed += 1;
            *balances.entry(t.from.clone()).or_default() -= t.amount_minor;
            *balances.entry(t.to.clone()).or_default() += t.amount_minor;
        } else {
            failed += 1;
        }
    }
    crate::log(format!(
        "    transfers: {} started, {completed} completed, {failed} failed",
        started.len()
    ));
    // The settles of the last transfers may land a moment after their completion.
    loop {
        let mut wrong = Vec::new();
        let mut total = 0;
        for (id, want) in &balances {
            let account = get(http, &format!("{projection_url}/accounts/{id}")).await;
            let balance = account.as_ref().and_then(|a| a["balance_minor"].as_i64());
            let pending = account
                .as_ref()
                .and_then(|a| a["transfers_pending"].as_u64());
            total += balance.unwrap_or(0);
            if balance != Some(*want) || pending != Some(0) {
                wrong.push(format!(
                    "{id}: balance {balance:?} (expected {want}), transfers pending {pending:?}"
                ));
            }
        }
        let opening: i64 = book.opening.values().sum();
        if total != opening {
            wrong.push(format!("the balances add up to {total}, not {opening}"));
        }
        if wrong.is_empty() {
            return;
        }
        if Instant::now() > deadline {
            tally.transfers_wrong += wrong.len();
            tally.notes.extend(wrong);
            return;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
