//! The bank-account state, the rules ([`BankAccount::handle`]) and the fold ([`BankAccount::apply`]).

use std::collections::BTreeMap;

use compact_str::CompactString;
use serde::{Deserialize, Serialize};

use serde_json::{Value, json};

use super::{Command, Event, Rejection, RejectionCode, TransferLeg};
use crate::aggregate::{Aggregate, Context, DomainCommand, DomainEvent, Inapplicable, Outgoing};
use crate::transfer::{Ending, account_step, ending_step};

/// Lifecycle of an account.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccountStatus {
    /// No `AccountOpened` yet: the id is free.
    #[default]
    New,
    /// Open for business.
    Active,
    /// Closed for good.
    Closed,
}

impl AccountStatus {
    /// Lower-case wire name (`new`, `active`, `closed`).
    pub fn as_str(self) -> &'static str {
        match self {
            AccountStatus::New => "new",
            AccountStatus::Active => "active",
            AccountStatus::Closed => "closed",
        }
    }
}

/// The state of one account, rebuilt by folding its events. Serialisable for snapshots.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BankAccount {
    /// Number of events applied; the next event gets `version + 1`.
    pub version: u64,
    /// Where the account is in its lifecycle.
    pub status: AccountStatus,
    /// Account holder (stored inline up to 24 bytes: a writer holds millions of these).
    pub owner: CompactString,
    /// ISO 4217 code.
    pub currency: CompactString,
    /// Balance in minor units, never negative.
    pub balance_minor: i64,
    /// Deposits, withdrawals and transfer debits, credits and refunds (opening and closing
    /// are not transactions).
    pub transaction_count: u64,
    /// Transfers out of this account in flight (debited, neither settled nor refunded), by
    /// transfer id, with their amounts: the account cannot close while one may come back.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub transfers_out: BTreeMap<String, i64>,
}

fn reject<T>(code: RejectionCode, message: impl Into<String>) -> Result<T, Rejection> {
    Err(Rejection::new(code, message))
}

impl BankAccount {
    /// A money command's currency, when it names one, must be the account's.
    fn same_currency(&self, currency: Option<&str>) -> Result<(), Rejection> {
        match currency {
            Some(c) if c != self.currency => reject(
                RejectionCode::CurrencyMismatch,
                format!(
                    "the amount is in {c}, but the account is in {}",
                    self.currency
                ),
            ),
            _ => Ok(()),
        }
    }
}

impl BankAccount {
    /// Decides what a command means for this account: the events to append, or why not.
    /// Never changes the state.
    pub fn handle(&self, command: &Command) -> Result<Vec<Event>, Rejection> {
        use RejectionCode::*;
        match (self.status, command) {
            (
                AccountStatus::New,
                Command::OpenAccount {
                    owner,
                    currency,
                    initial_balance_minor,
                },
            ) => {
                if let Err(reason) = super::check_text("owner", owner) {
                    return reject(Malformed, reason);
                }
                if !is_currency_code(currency) {
                    return reject(
                        Malformed,
                        format!("currency `{currency}` is not an ISO 4217 code like USD"),
                    );
                }
                if *initial_balance_minor < 0 {
                    return reject(InvalidAmount, "initial balance must not be negative");
                }
                Ok(vec![Event::AccountOpened {
                    owner: owner.clone(),
                    currency: currency.clone(),
                    initial_balance_minor: *initial_balance_minor,
                }])
            }
            (_, Command::OpenAccount { .. }) => reject(AccountExists, "account already exists"),
            (AccountStatus::New, _) => reject(AccountNotFound, "account does not exist"),
            (AccountStatus::Closed, _) => reject(AccountClosed, "account is closed"),
            (
                AccountStatus::Active,
                Command::Deposit {
                    amount_minor,
                    currency,
                },
            ) => {
                self.same_currency(currency.as_deref())?;
                positive(*amount_minor)?;
                if self.headroom() < *amount_minor {
                    return reject(InvalidAmount, "deposit would overflow the balance");
                }
                Ok(vec![Event::MoneyDeposited {
                    amount_minor: *amount_minor,
                }])
            }
            (
                AccountStatus::Active,
                Command::Withdraw {
                    amount_minor,
                    currency,
                },
            ) => {
                self.same_currency(currency.as_deref())?;
                positive(*amount_minor)?;
                if *amount_minor > self.balance_minor {
                    return reject(
                        InsufficientFunds,
                        format!(
                            "cannot withdraw {amount_minor} minor units: balance is {}",
                            self.balance_minor
                        ),
                    );
                }
                Ok(vec![Event::MoneyWithdrawn {
                    amount_minor: *amount_minor,
                }])
            }
            (AccountStatus::Active, Command::CloseAccount) => {
                if !self.transfers_out.is_empty() {
                    return reject(
                        RejectionCode::domain("TransfersPending"),
                        format!(
                            "{} transfer(s) out of the account are in flight; close it when they end",
                            self.transfers_out.len()
                        ),
                    );
                }
                if self.balance_minor != 0 {
                    return reject(
                        NonZeroBalance,
                        format!("balance is {} minor units, not zero", self.balance_minor),
                    );
                }
                Ok(vec![Event::AccountClosed])
            }
            (AccountStatus::Active, Command::DebitForTransfer(leg)) => {
                self.same_currency(leg.currency.as_deref())?;
                positive(leg.amount_minor)?;
                if leg.amount_minor > self.balance_minor {
                    return reject(
                        InsufficientFunds,
                        format!(
                            "cannot transfer {} minor units: balance is {}",
                            leg.amount_minor, self.balance_minor
                        ),
                    );
                }
                if self.transfers_out.contains_key(&leg.transfer_id) {
                    return reject(Malformed, "this transfer was debited already");
                }
                let mut leg = leg.clone();
                leg.currency = Some(self.currency.to_string());
                Ok(vec![Event::TransferDebited(leg)])
            }
            (AccountStatus::Active, Command::CreditForTransfer(leg)) => {
                self.same_currency(leg.currency.as_deref())?;
                positive(leg.amount_minor)?;
                if self.headroom() < leg.amount_minor {
                    return reject(InvalidAmount, "the credit would overflow the balance");
                }
                Ok(vec![Event::TransferCredited(leg.clone())])
            }
            (AccountStatus::Active, Command::SettleTransfer(leg)) => {
                self.in_flight(leg)?;
                Ok(vec![Event::TransferSettled(leg.clone())])
            }
            (AccountStatus::Active, Command::RefundTransfer(leg)) => {
                self.in_flight(leg)?;
                Ok(vec![Event::TransferRefunded(leg.clone())])
            }
        }
    }

    /// How much more the balance may take: what an `i64` holds beyond the balance and the
    /// amounts in flight out of the account (each may come back as a refund).
    fn headroom(&self) -> i64 {
        let in_flight = self
            .transfers_out
            .values()
            .fold(0i64, |sum, a| sum.saturating_add(*a));
        i64::MAX
            .saturating_sub(self.balance_minor)
            .saturating_sub(in_flight)
    }

    /// A settle or refund must be for a transfer debited from this account and in flight.
    fn in_flight(&self, leg: &TransferLeg) -> Result<(), Rejection> {
        match self.transfers_out.get(&leg.transfer_id) {
            Some(&amount) if amount == leg.amount_minor => Ok(()),
            _ => reject(
                RejectionCode::Malformed,
                format!(
                    "transfer {} is not in flight from this account",
                    leg.transfer_id
                ),
            ),
        }
    }

    /// The steps a decision on this account sets off (see [`crate::transfer`]): after a debit
    /// the credit, after a credit the settle and the completion, after a refund the failure; a
    /// refused debit fails the transfer, a refused credit refunds the source.
    pub fn reactions(&self, command: &Command, outcome: Result<(), &Rejection>) -> Vec<Outgoing> {
        let known_currency =
            || (self.status != AccountStatus::New).then(|| self.currency.to_string());
        match (command, outcome) {
            (Command::DebitForTransfer(leg), Ok(())) => {
                let mut credit = leg.clone();
                credit.currency = Some(self.currency.to_string());
                vec![account_step(&leg.to, "CreditForTransfer", &credit)]
            }
            (Command::DebitForTransfer(leg), Err(rejection)) => {
                let ending = Ending {
                    currency: known_currency(),
                    reason: Some(rejection.code.to_string()),
                };
                vec![ending_step(&leg.transfer_id, "FailTransfer", &ending)]
            }
            (Command::CreditForTransfer(leg), Ok(())) => vec![
                account_step(&leg.from, "SettleTransfer", leg),
                ending_step(
                    &leg.transfer_id,
                    "CompleteTransfer",
                    &Ending {
                        currency: leg.currency.clone(),
                        reason: None,
                    },
                ),
            ],
            (Command::CreditForTransfer(leg), Err(rejection)) => {
                let mut refund = leg.clone();
                refund.reason = Some(rejection.code.to_string());
                vec![account_step(&leg.from, "RefundTransfer", &refund)]
            }
            (Command::RefundTransfer(leg), Ok(())) => {
                let ending = Ending {
                    currency: leg.currency.clone(),
                    reason: leg.reason.clone(),
                };
                vec![ending_step(&leg.transfer_id, "FailTransfer", &ending)]
            }
            (Command::RefundTransfer(leg) | Command::SettleTransfer(leg), Err(rejection)) => {
                tracing::error!(transfer_id = %leg.transfer_id, %rejection, "a transfer's last step on its source was refused");
                Vec::new()
            }
            _ => Vec::new(),
        }
    }

    /// Whether `event` is a possible next event of this account (an `AccountOpened` only for a
    /// new account, anything else only for an open one). Readers use it to refuse events they
    /// must not fold; [`BankAccount::handle`] never produces an event that fails it.
    pub fn check_applicable(&self, event: &Event) -> Result<(), String> {
        match (self.status, event) {
            (AccountStatus::New, Event::AccountOpened { .. }) => Ok(()),
            (_, Event::AccountOpened { .. }) => Err("AccountOpened for an existing account".into()),
            (AccountStatus::New, e) => {
                Err(format!("{} for an account never opened", e.event_type()))
            }
            (AccountStatus::Closed, e) => Err(format!("{} for a closed account", e.event_type())),
            (AccountStatus::Active, Event::TransferDebited(leg)) => {
                if leg.amount_minor > self.balance_minor {
                    Err(format!(
                        "TransferDebited of {} beyond the balance {}",
                        leg.amount_minor, self.balance_minor
                    ))
                } else if self.transfers_out.contains_key(&leg.transfer_id) {
                    Err(format!("TransferDebited twice for {}", leg.transfer_id))
                } else {
                    Ok(())
                }
            }
            (
                AccountStatus::Active,
                e @ (Event::TransferSettled(leg) | Event::TransferRefunded(leg)),
            ) => {
                if self.transfers_out.contains_key(&leg.transfer_id) {
                    Ok(())
                } else {
                    Err(format!(
                        "{} for transfer {}, which is not in flight from this account",
                        e.event_type(),
                        leg.transfer_id
                    ))
                }
            }
            (AccountStatus::Active, Event::AccountClosed) if !self.transfers_out.is_empty() => {
                Err("AccountClosed with transfers out in flight".into())
            }
            (AccountStatus::Active, _) => Ok(()),
        }
    }

    /// Folds one event into the state and bumps the version. Takes no decision.
    pub fn apply(&mut self, event: &Event) {
        match event {
            Event::AccountOpened {
                owner,
                currency,
                initial_balance_minor,
            } => {
                self.status = AccountStatus::Active;
                self.owner = CompactString::from(owner.as_str());
                self.currency = CompactString::from(currency.as_str());
                self.balance_minor = *initial_balance_minor;
            }
            Event::MoneyDeposited { amount_minor } => {
                self.balance_minor = self.balance_minor.saturating_add(*amount_minor);
                self.transaction_count += 1;
            }
            Event::MoneyWithdrawn { amount_minor } => {
                self.balance_minor = self.balance_minor.saturating_sub(*amount_minor);
                self.transaction_count += 1;
            }
            Event::AccountClosed => self.status = AccountStatus::Closed,
            Event::TransferDebited(leg) => {
                self.balance_minor = self.balance_minor.saturating_sub(leg.amount_minor);
                self.transaction_count += 1;
                self.transfers_out
                    .insert(leg.transfer_id.clone(), leg.amount_minor);
            }
            Event::TransferCredited(leg) => {
                self.balance_minor = self.balance_minor.saturating_add(leg.amount_minor);
                self.transaction_count += 1;
            }
            Event::TransferSettled(leg) => {
                self.transfers_out.remove(&leg.transfer_id);
            }
            Event::TransferRefunded(leg) => {
                let amount = self
                    .transfers_out
                    .remove(&leg.transfer_id)
                    .unwrap_or(leg.amount_minor);
                self.balance_minor = self.balance_minor.saturating_add(amount);
                self.transaction_count += 1;
            }
        }
        self.version += 1;
    }

    /// Rebuilds a state from a whole event history (folding every event, applicable or not).
    pub fn replay<'a>(events: impl IntoIterator<Item = &'a Event>) -> Self {
        let mut account = BankAccount::default();
        for event in events {
            account.apply(event);
        }
        account
    }
}

/// The bank account as an implementation of the seam: `decide` is [`BankAccount::handle`],
/// `evolve` is [`BankAccount::check_applicable`] then [`BankAccount::apply`].
impl Aggregate for BankAccount {
    const TYPE: &'static str = super::AGGREGATE_TYPE;
    const SCHEMA_VERSION: u32 = 2;
    type Command = Command;
    type Event = Event;

    fn decide(&self, command: &Command, _ctx: &Context<'_>) -> Result<Vec<Event>, Rejection> {
        self.handle(command)
    }

    fn evolve(&mut self, event: &Event) -> Result<(), Inapplicable> {
        self.check_applicable(event).map_err(Inapplicable)?;
        self.apply(event);
        Ok(())
    }

    fn react(
        &self,
        command: &Command,
        outcome: Result<&[Event], &Rejection>,
        _ctx: &Context<'_>,
    ) -> Vec<Outgoing> {
        self.reactions(command, outcome.map(drop))
    }

    fn register_upcasters(upcasters: &mut crate::upcast::Upcasters) {
        super::wire::register_upcasters(upcasters);
    }

    fn event_schema(event_type: &str, schema_version: u32) -> Option<Value> {
        Some(match (event_type, schema_version) {
            ("AccountOpened", 2) => json!({
                "type": "object",
                "required": ["owner", "currency", "initial_balance_minor"],
                "properties": {
                    "owner": {"type": "string", "minLength": 1},
                    "currency": {"type": "string", "pattern": "^[A-Z]{3}$"},
                    "initial_balance_minor": {"type": "integer", "minimum": 0}
                }
            }),
            ("MoneyDeposited" | "MoneyWithdrawn", 2) => json!({
                "type": "object",
                "required": ["amount_minor"],
                "properties": {"amount_minor": {"type": "integer", "minimum": 1}}
            }),
            // v1: the holder was `name`, amounts were decimals in major units, no currency.
            ("AccountOpened", 1) => json!({
                "type": "object",
                "required": ["name"],
                "properties": {
                    "name": {"type": "string"},
                    "initial_balance": {"type": ["number", "string"]}
                }
            }),
            ("MoneyDeposited" | "MoneyWithdrawn", 1) => json!({
                "type": "object",
                "required": ["amount"],
                "properties": {"amount": {"type": ["number", "string"]}}
            }),
            ("AccountClosed", 1 | 2) => json!({"type": "object"}),
            (
                "TransferDebited" | "TransferCredited" | "TransferSettled" | "TransferRefunded",
                2,
            ) => {
                let text = json!({"type": "string", "minLength": 1});
                json!({
                    "type": "object",
                    "required": ["transfer_id", "from", "to", "amount_minor"],
                    "properties": {
                        "transfer_id": text, "from": text, "to": text,
                        "amount_minor": {"type": "integer", "minimum": 1},
                        "currency": {"type": "string", "pattern": "^[A-Z]{3}$"},
                        "reason": text
                    }
                })
            }
            _ => return None,
        })
    }
}

impl DomainCommand for Command {
    const TYPES: &'static [&'static str] = &[
        "OpenAccount",
        "Deposit",
        "Withdraw",
        "CloseAccount",
        "DebitForTransfer",
        "CreditForTransfer",
        "SettleTransfer",
        "RefundTransfer",
    ];
    const INTERNAL: &'static [&'static str] = &[
        "DebitForTransfer",
        "CreditForTransfer",
        "SettleTransfer",
        "RefundTransfer",
    ];

    fn type_name(&self) -> &'static str {
        Command::type_name(self)
    }

    fn payload(&self) -> Value {
        Command::payload(self)
    }

    fn from_parts(type_name: &str, payload: Value) -> Result<Self, String> {
        Command::from_parts(type_name, payload)
    }
}

impl DomainEvent for Event {
    const TYPES: &'static [&'static str] = &Event::TYPES;

    fn event_type(&self) -> &'static str {
        Event::event_type(self)
    }

    fn data(&self) -> Value {
        Event::data(self)
    }

    fn from_parts(event_type: &str, data: &Value) -> Result<Self, super::EventDataError> {
        Event::from_parts(event_type, data)
    }
}

/// Whether `code` looks like an ISO 4217 code: three upper-case ASCII letters.
pub fn is_currency_code(code: &str) -> bool {
    code.len() == 3 && code.bytes().all(|b| b.is_ascii_uppercase())
}

fn positive(amount_minor: i64) -> Result<(), Rejection> {
    if amount_minor <= 0 {
        return reject(
            RejectionCode::InvalidAmount,
            format!("amount must be more than zero, got {amount_minor}"),
        );
    }
    Ok(())
}
