//! Rendering for people: command results as one line, an account as aligned `key: value`
//! lines, history and lists as tables whose amounts are decimals with their currency.
//! `--json` bypasses all of this and prints the raw answers ([`json`]).
//!
//! The projection's answers are read into [`Account`] (the contract's account object) and
//! [`shared::EventEnvelope`]; fields this version does not know are ignored.

use chrono::SecondsFormat;
use serde::Deserialize;
use serde_json::Value;
use shared::money::{format_minor, minor_digits};
use shared::{CommandResult, CommandStatus, Event, EventEnvelope};

use crate::error::CliError;

/// The account object of `GET /accounts/{id}` (docs/contract.md).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Account {
    /// Account id.
    pub id: String,
    /// Holder.
    pub owner: String,
    /// ISO 4217 code.
    pub currency: String,
    /// Balance in minor units.
    pub balance_minor: i64,
    /// Balance as a decimal string; computed from `balance_minor` when absent.
    #[serde(default)]
    pub balance: Option<String>,
    /// `active` or `closed`.
    pub status: String,
    /// Aggregate version.
    pub version: u64,
    /// Deposits plus withdrawals.
    #[serde(default)]
    pub transaction_count: u64,
    /// RFC 3339.
    #[serde(default)]
    pub opened_at: String,
    /// RFC 3339.
    #[serde(default)]
    pub updated_at: String,
    /// Later events waiting behind a version gap, if any.
    #[serde(default)]
    pub parked: Option<Parked>,
}

/// Events of an account parked behind a version gap (`parked` of `GET /accounts/{id}`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Parked {
    /// How many wait.
    pub events: u64,
    /// The missing version they wait for.
    pub waiting_for_version: u64,
    /// When the oldest was parked.
    #[serde(default)]
    pub since: String,
}

impl Account {
    /// The balance as `150.25 EUR`.
    pub fn balance_text(&self) -> String {
        let amount = self
            .balance
            .clone()
            .unwrap_or_else(|| format_minor(self.balance_minor, minor_digits(&self.currency)));
        format!("{amount} {}", self.currency)
    }
}

/// A page of `GET /accounts`.
#[derive(Debug, Clone, Deserialize)]
pub struct AccountPage {
    /// Accounts ordered by id.
    pub accounts: Vec<Account>,
    /// The id to pass as `--after` for the next page.
    #[serde(default)]
    pub next: Option<String>,
}

/// The transfer object of `GET /transfers/{id}` (docs/contract.md).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Transfer {
    /// The transfer's id.
    pub transfer_id: String,
    /// The source account.
    pub from: String,
    /// The target account.
    pub to: String,
    /// Minor units of `currency`.
    pub amount_minor: i64,
    /// ISO 4217 code, once known.
    #[serde(default)]
    pub currency: Option<String>,
    /// `pending`, `completed` or `failed`.
    pub status: String,
    /// Why it failed.
    #[serde(default)]
    pub reason: Option<String>,
    /// RFC 3339.
    #[serde(default)]
    pub started_at: String,
    /// RFC 3339, once ended.
    #[serde(default)]
    pub finished_at: Option<String>,
    /// Its steps (`GET /transfers/{id}` only).
    #[serde(default)]
    pub steps: Vec<TransferStep>,
}

/// One step of a transfer.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct TransferStep {
    /// The transfer or one of its accounts.
    pub aggregate_id: String,
    /// Its version there.
    pub version: u64,
    /// The event.
    pub event_type: String,
    /// RFC 3339.
    pub timestamp: String,
}

impl Transfer {
    /// The amount as `12.50 EUR` (minor units when the currency is not known yet).
    pub fn amount_text(&self) -> String {
        match &self.currency {
            Some(c) => format!("{} {c}", format_minor(self.amount_minor, minor_digits(c))),
            None => format!("{} minor units", self.amount_minor),
        }
    }
}

/// A page of `GET /transfers`.
#[derive(Debug, Clone, Deserialize)]
pub struct TransferPage {
    /// Newest first.
    pub transfers: Vec<Transfer>,
    /// The cursor to pass as `--after` for the next page.
    #[serde(default)]
    pub next: Option<String>,
}

/// A transfer as aligned `key: value` lines, then its steps.
pub fn transfer(t: &Transfer) -> String {
    let mut rows = vec![
        ("transfer", t.transfer_id.clone()),
        ("from", t.from.clone()),
        ("to", t.to.clone()),
        ("amount", t.amount_text()),
        ("status", t.status.clone()),
    ];
    if let Some(reason) = &t.reason {
        rows.push(("reason", reason.clone()));
    }
    rows.push(("started at", t.started_at.clone()));
    if let Some(finished) = &t.finished_at {
        rows.push(("finished at", finished.clone()));
    }
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0) + 1;
    let mut out: String = rows
        .iter()
        .map(|(k, v)| format!("{:<width$} {v}\n", format!("{k}:")))
        .collect();
    if !t.steps.is_empty() {
        let steps: Vec<Vec<String>> = t
            .steps
            .iter()
            .map(|s| {
                vec![
                    s.timestamp.clone(),
                    s.event_type.clone(),
                    format!("{} v{}", s.aggregate_id, s.version),
                ]
            })
            .collect();
        out.push_str(&table(
            &["TIME", "STEP", "ON"],
            &[false, false, false],
            &steps,
        ));
    }
    out
}

/// An account's transfers as a table, with a hint for the next page.
pub fn transfer_list(account: &str, page: &TransferPage) -> String {
    if page.transfers.is_empty() {
        return format!("no transfers from or to {account}\n");
    }
    let rows: Vec<Vec<String>> = page
        .transfers
        .iter()
        .map(|t| {
            let (direction, other) = if t.from == account {
                ("out", &t.to)
            } else {
                ("in", &t.from)
            };
            vec![
                t.transfer_id.clone(),
                direction.to_owned(),
                other.clone(),
                t.amount_text(),
                t.status.clone(),
                t.reason.clone().unwrap_or_default(),
                t.started_at.clone(),
            ]
        })
        .collect();
    let mut out = table(
        &[
            "TRANSFER", "DIR", "WITH", "AMOUNT", "STATUS", "REASON", "STARTED",
        ],
        &[false, false, false, true, false, false, false],
        &rows,
    );
    if let Some(next) = &page.next {
        out.push_str(&format!("more: bank transfers {account} --after {next}\n"));
    }
    out
}

/// Reads a projection answer into `T`; an answer of another shape means the service at that
/// URL is not the projection this CLI speaks to (exit 3).
pub fn decode<T: serde::de::DeserializeOwned>(value: Value) -> Result<T, CliError> {
    serde_json::from_value(value).map_err(|e| {
        CliError::Unavailable(format!(
            "the projection answered with an unexpected shape ({e}): is it projection-service?"
        ))
    })
}

/// JSON for `--json`: pretty-printed, numbers exactly as received.
pub fn json(value: &impl serde::Serialize) -> String {
    serde_json::to_string_pretty(value).unwrap_or_else(|_| "null".into())
}

/// One line for a command result: `accepted: acc-1 is at version 2` or
/// `rejected: InsufficientFunds: ...`.
pub fn command_result(result: &CommandResult) -> String {
    match (result.status, &result.error) {
        (CommandStatus::Accepted, _) => format!(
            "accepted: {} is at version {}",
            result.aggregate_id,
            result.version.unwrap_or_default()
        ),
        (CommandStatus::Rejected, Some(e)) => format!("rejected: {}: {}", e.code, e.message),
        (CommandStatus::Rejected, None) => "rejected".to_owned(),
    }
}

/// An account as aligned `key: value` lines.
pub fn account(a: &Account) -> String {
    let rows = [
        ("id", a.id.clone()),
        ("owner", a.owner.clone()),
        ("balance", a.balance_text()),
        ("status", a.status.clone()),
        ("version", a.version.to_string()),
        ("transactions", a.transaction_count.to_string()),
        ("opened at", a.opened_at.clone()),
        ("updated at", a.updated_at.clone()),
    ];
    let parked = a.parked.as_ref().map(|p| {
        (
            "parked",
            format!(
                "{} later event(s) wait for version {} since {}: the account is shown as of \
                 version {} until it arrives (bank dlq list may say why it is missing)",
                p.events, p.waiting_for_version, p.since, a.version
            ),
        )
    });
    let rows: Vec<(&str, String)> = rows.into_iter().chain(parked).collect();
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0) + 1;
    rows.iter()
        .map(|(k, v)| format!("{:<width$} {v}\n", format!("{k}:")))
        .collect()
}

/// An account's history as a table with a running balance.
pub fn history(events: &[EventEnvelope]) -> String {
    let mut currency = String::from("");
    let mut balance: i64 = 0;
    let mut rows = Vec::with_capacity(events.len());
    for e in events {
        let (amount, what) = match e.event() {
            Ok(Event::AccountOpened {
                owner,
                currency: c,
                initial_balance_minor,
            }) => {
                currency = c;
                balance = initial_balance_minor;
                (Some(initial_balance_minor), format!("owner {owner}"))
            }
            Ok(Event::MoneyDeposited { amount_minor }) => {
                balance = balance.saturating_add(amount_minor);
                (Some(amount_minor), String::new())
            }
            Ok(Event::MoneyWithdrawn { amount_minor }) => {
                balance = balance.saturating_sub(amount_minor);
                (Some(-amount_minor), String::new())
            }
            Ok(Event::AccountClosed) => (None, String::new()),
            Ok(Event::TransferDebited(leg)) => {
                balance = balance.saturating_sub(leg.amount_minor);
                (
                    Some(-leg.amount_minor),
                    format!("transfer {} to {}", leg.transfer_id, leg.to),
                )
            }
            Ok(Event::TransferCredited(leg)) => {
                balance = balance.saturating_add(leg.amount_minor);
                (
                    Some(leg.amount_minor),
                    format!("transfer {} from {}", leg.transfer_id, leg.from),
                )
            }
            Ok(Event::TransferRefunded(leg)) => {
                balance = balance.saturating_add(leg.amount_minor);
                (
                    Some(leg.amount_minor),
                    format!(
                        "transfer {} refunded ({})",
                        leg.transfer_id,
                        leg.reason.as_deref().unwrap_or("failed")
                    ),
                )
            }
            Ok(Event::TransferSettled(leg)) => {
                (None, format!("transfer {} completed", leg.transfer_id))
            }
            Err(err) => (None, err.to_string()),
        };
        let money = |minor: i64| {
            format!(
                "{} {currency}",
                format_minor(minor, minor_digits(&currency))
            )
        };
        rows.push(vec![
            e.version.to_string(),
            e.timestamp.to_rfc3339_opts(SecondsFormat::AutoSi, true),
            e.event_type.clone(),
            amount.map(money).unwrap_or_default(),
            money(balance),
            what,
        ]);
    }
    table(
        &["VERSION", "TIME", "EVENT", "AMOUNT", "BALANCE", ""],
        &[true, false, false, true, true, false],
        &rows,
    )
}

/// A page of accounts as a table, with a hint for the next page.
pub fn account_list(page: &AccountPage) -> String {
    if page.accounts.is_empty() {
        return "no accounts\n".to_owned();
    }
    let rows: Vec<Vec<String>> = page
        .accounts
        .iter()
        .map(|a| {
            vec![
                a.id.clone(),
                a.owner.clone(),
                a.status.clone(),
                a.balance_text(),
                a.version.to_string(),
                a.updated_at.clone(),
            ]
        })
        .collect();
    let mut out = table(
        &["ID", "OWNER", "STATUS", "BALANCE", "VERSION", "UPDATED"],
        &[false, false, false, true, true, false],
        &rows,
    );
    if let Some(next) = &page.next {
        out.push_str(&format!("more: bank list --after {next}\n"));
    }
    out
}

/// A plain-text table: a header, then rows; `right[i]` right-aligns column `i` (numbers).
/// Widths count characters, so names in any script line up as long as they are not wide.
pub fn table(header: &[&str], right: &[bool], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut out = String::new();
        for (i, cell) in cells.enumerate() {
            let pad = widths[i].saturating_sub(cell.chars().count());
            if i > 0 {
                out.push_str("  ");
            }
            if right.get(i).copied().unwrap_or(false) {
                out.push_str(&" ".repeat(pad));
                out.push_str(cell);
            } else {
                out.push_str(cell);
                out.push_str(&" ".repeat(pad));
            }
        }
        out.truncate(out.trim_end().len());
        out.push('\n');
        out
    };
    let mut out = line(&mut header.iter().copied());
    for row in rows {
        out.push_str(&line(&mut row.iter().map(String::as_str)));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn alice() -> Account {
        decode(json!({
            "id": "acc-1", "owner": "Alice", "currency": "EUR", "balance_minor": 15025,
            "balance": "150.25", "status": "active", "version": 2, "transaction_count": 1,
            "opened_at": "2026-11-26T12:00:00Z", "updated_at": "2026-11-26T12:00:05Z"
        }))
        .unwrap()
    }

    fn envelope(version: u64, event_type: &str, data: Value) -> EventEnvelope {
        decode(json!({
            "event_id": "8a5f3c1e-0000-4000-8000-00000000000".to_owned() + &version.to_string(),
            "aggregate_id": "acc-1", "aggregate_type": "BankAccount",
            "event_type": event_type, "schema_version": 2, "version": version,
            "timestamp": format!("2026-11-26T12:00:0{version}.5Z"), "metadata": {}, "data": data
        }))
        .unwrap()
    }

    #[test]
    fn results_are_one_line() {
        let accepted: CommandResult = decode(json!({
            "command_id": "8a5f3c1e-0000-4000-8000-000000000001", "aggregate_id": "acc-1",
            "status": "accepted", "version": 2,
            "events": [{"event_id": "8a5f3c1e-0000-4000-8000-000000000002",
                        "event_type": "MoneyDeposited", "version": 2}]
        }))
        .unwrap();
        assert_eq!(command_result(&accepted), "accepted: acc-1 is at version 2");
        let rejected: CommandResult = decode(json!({
            "command_id": "8a5f3c1e-0000-4000-8000-000000000001", "aggregate_id": "acc-1",
            "status": "rejected",
            "error": {"code": "InsufficientFunds", "message": "balance is 150.25"}
        }))
        .unwrap();
        assert_eq!(
            command_result(&rejected),
            "rejected: InsufficientFunds: balance is 150.25"
        );
    }

    #[test]
    fn an_account_waiting_behind_a_gap_says_so() {
        let mut a = alice();
        a.parked = Some(Parked {
            events: 2,
            waiting_for_version: a.version + 1,
            since: "2026-12-07T08:00:00Z".into(),
        });
        let text = account(&a);
        assert!(
            text.contains(&format!(
                "parked:       2 later event(s) wait for version {} since 2026-12-07T08:00:00Z",
                a.version + 1
            )),
            "{text}"
        );
        assert!(!account(&alice()).contains("parked"));
    }

    #[test]
    fn an_account_is_aligned_key_value_lines() {
        assert_eq!(
            account(&alice()),
            "id:           acc-1\n\
             owner:        Alice\n\
             balance:      150.25 EUR\n\
             status:       active\n\
             version:      2\n\
             transactions: 1\n\
             opened at:    2026-11-26T12:00:00Z\n\
             updated at:   2026-11-26T12:00:05Z\n"
        );
    }

    #[test]
    fn a_missing_balance_text_is_computed_with_the_currency_digits() {
        let mut a = alice();
        a.balance = None;
        a.currency = "JPY".into();
        a.balance_minor = 500;
        assert_eq!(a.balance_text(), "500 JPY");
    }

    #[test]
    fn history_has_signed_amounts_and_a_running_balance() {
        let events = [
            envelope(
                1,
                "AccountOpened",
                json!({"owner": "Alice", "currency": "EUR", "initial_balance_minor": 10000}),
            ),
            envelope(2, "MoneyDeposited", json!({"amount_minor": 5025})),
            envelope(3, "MoneyWithdrawn", json!({"amount_minor": 15025})),
            envelope(4, "AccountClosed", json!({})),
        ];
        assert_eq!(
            history(&events),
            "VERSION  TIME                      EVENT                AMOUNT     BALANCE\n\
             \x20     1  2026-11-26T12:00:01.500Z  AccountOpened    100.00 EUR  100.00 EUR  owner Alice\n\
             \x20     2  2026-11-26T12:00:02.500Z  MoneyDeposited    50.25 EUR  150.25 EUR\n\
             \x20     3  2026-11-26T12:00:03.500Z  MoneyWithdrawn  -150.25 EUR    0.00 EUR\n\
             \x20     4  2026-11-26T12:00:04.500Z  AccountClosed                  0.00 EUR\n"
        );
    }

    #[test]
    fn lists_are_tables_with_a_next_page_hint() {
        let page = AccountPage {
            accounts: vec![alice()],
            next: Some("acc-1".into()),
        };
        assert_eq!(
            account_list(&page),
            "ID     OWNER  STATUS     BALANCE  VERSION  UPDATED\n\
             acc-1  Alice  active  150.25 EUR        2  2026-11-26T12:00:05Z\n\
             more: bank list --after acc-1\n"
        );
        let empty = AccountPage {
            accounts: vec![],
            next: None,
        };
        assert_eq!(account_list(&empty), "no accounts\n");
    }

    #[test]
    fn unexpected_shapes_mean_unavailable() {
        let err = decode::<Account>(json!({"hello": "world"})).unwrap_err();
        assert_eq!(err.exit_code(), 3);
    }
}
