//! The bank: accounts and the transfers between them, served by one engine (one writer per
//! partition decides for both, since a transfer's steps go from one to the other).
//!
//! Accounts and transfers share one id space: an id is an account's once `AccountOpened` is
//! appended to it, a transfer's once `TransferStarted` is. Account events keep
//! `aggregate_type` `BankAccount`, transfer events carry `Transfer`; snapshots of accounts keep
//! the account's shape, a transfer's is `{"transfer": {...}}`.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::aggregate::{
    Aggregate, Context, DomainCommand, DomainEvent, EventDataError, Inapplicable, Outgoing,
};
use crate::bank_account::{
    AGGREGATE_TYPE, AccountStatus, BankAccount, Command, Event, Rejection, RejectionCode,
};
use crate::transfer::{TRANSFER_TYPE, Transfer, TransferCommand, TransferEvent, TransferStatus};

/// What an id of the bank holds: an account (also a free id) or a transfer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum Bank {
    /// A transfer (`{"transfer": {...}}` in a snapshot).
    Transfer {
        /// Its state.
        transfer: Transfer,
    },
    /// An account, or an id nothing was appended to yet.
    Account(BankAccount),
}

/// A snapshot's state as read: an account's fields, or `transfer` (a plain struct, so that a
/// restore reading millions of snapshots does not buffer each one as an untagged enum would).
#[derive(Deserialize)]
struct BankRepr {
    transfer: Option<Transfer>,
    version: Option<u64>,
    status: Option<AccountStatus>,
    owner: Option<compact_str::CompactString>,
    currency: Option<compact_str::CompactString>,
    balance_minor: Option<i64>,
    transaction_count: Option<u64>,
    #[serde(default)]
    transfers_out: std::collections::BTreeMap<String, i64>,
}

impl<'de> Deserialize<'de> for Bank {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let repr = BankRepr::deserialize(deserializer)?;
        if let Some(transfer) = repr.transfer {
            return Ok(Bank::Transfer { transfer });
        }
        let missing = |field: &'static str| D::Error::missing_field(field);
        Ok(Bank::Account(BankAccount {
            version: repr.version.ok_or_else(|| missing("version"))?,
            status: repr.status.ok_or_else(|| missing("status"))?,
            owner: repr.owner.ok_or_else(|| missing("owner"))?,
            currency: repr.currency.ok_or_else(|| missing("currency"))?,
            balance_minor: repr.balance_minor.ok_or_else(|| missing("balance_minor"))?,
            transaction_count: repr
                .transaction_count
                .ok_or_else(|| missing("transaction_count"))?,
            transfers_out: repr.transfers_out,
        }))
    }
}

impl Default for Bank {
    fn default() -> Self {
        Bank::Account(BankAccount::default())
    }
}

impl Bank {
    /// The account, when the id is one (or still free).
    pub fn account(&self) -> Option<&BankAccount> {
        match self {
            Bank::Account(account) => Some(account),
            Bank::Transfer { .. } => None,
        }
    }

    /// The transfer, when the id is one.
    pub fn transfer(&self) -> Option<&Transfer> {
        match self {
            Bank::Transfer { transfer } => Some(transfer),
            Bank::Account(_) => None,
        }
    }

    /// Whether nothing was appended to the id yet.
    fn is_free(&self) -> bool {
        matches!(self, Bank::Account(a) if a.status == AccountStatus::New)
    }
}

/// A command of the bank: an account's or a transfer's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BankCommand {
    /// For an account.
    Account(Command),
    /// For a transfer.
    Transfer(TransferCommand),
}

/// An event of the bank: an account's or a transfer's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BankEvent {
    /// Of an account (`aggregate_type` `BankAccount`).
    Account(Event),
    /// Of a transfer (`aggregate_type` `Transfer`).
    Transfer(TransferEvent),
}

impl DomainCommand for BankCommand {
    const TYPES: &'static [&'static str] = &[
        "OpenAccount",
        "Deposit",
        "Withdraw",
        "CloseAccount",
        "DebitForTransfer",
        "CreditForTransfer",
        "SettleTransfer",
        "RefundTransfer",
        "TransferMoney",
        "CompleteTransfer",
        "FailTransfer",
    ];
    const INTERNAL: &'static [&'static str] = &[
        "DebitForTransfer",
        "CreditForTransfer",
        "SettleTransfer",
        "RefundTransfer",
        "CompleteTransfer",
        "FailTransfer",
    ];

    fn type_name(&self) -> &'static str {
        match self {
            BankCommand::Account(c) => c.type_name(),
            BankCommand::Transfer(c) => c.type_name(),
        }
    }

    fn payload(&self) -> Value {
        match self {
            BankCommand::Account(c) => c.payload(),
            BankCommand::Transfer(c) => c.payload(),
        }
    }

    fn from_parts(type_name: &str, payload: Value) -> Result<Self, String> {
        if TransferCommand::TYPES.contains(&type_name) {
            TransferCommand::from_parts(type_name, payload).map(BankCommand::Transfer)
        } else {
            Command::from_parts(type_name, payload).map(BankCommand::Account)
        }
    }
}

impl DomainEvent for BankEvent {
    const TYPES: &'static [&'static str] = &[
        "AccountOpened",
        "MoneyDeposited",
        "MoneyWithdrawn",
        "AccountClosed",
        "TransferDebited",
        "TransferCredited",
        "TransferSettled",
        "TransferRefunded",
        "TransferStarted",
        "TransferCompleted",
        "TransferFailed",
    ];

    fn event_type(&self) -> &'static str {
        match self {
            BankEvent::Account(e) => e.event_type(),
            BankEvent::Transfer(e) => e.event_type(),
        }
    }

    fn data(&self) -> Value {
        match self {
            BankEvent::Account(e) => e.data(),
            BankEvent::Transfer(e) => e.data(),
        }
    }

    fn from_parts(event_type: &str, data: &Value) -> Result<Self, EventDataError> {
        if TransferEvent::TYPES.contains(&event_type) {
            TransferEvent::from_parts(event_type, data).map(BankEvent::Transfer)
        } else {
            Event::from_parts(event_type, data).map(BankEvent::Account)
        }
    }
}

fn reject<T>(code: RejectionCode, message: &str) -> Result<T, Rejection> {
    Err(Rejection::new(code, message))
}

impl Aggregate for Bank {
    const TYPE: &'static str = AGGREGATE_TYPE;
    const TYPES: &'static [&'static str] = &[AGGREGATE_TYPE, TRANSFER_TYPE];
    const SCHEMA_VERSION: u32 = BankAccount::SCHEMA_VERSION;
    type Command = BankCommand;
    type Event = BankEvent;

    fn decide(
        &self,
        command: &BankCommand,
        ctx: &Context<'_>,
    ) -> Result<Vec<BankEvent>, Rejection> {
        let account_events =
            |events: Vec<Event>| events.into_iter().map(BankEvent::Account).collect();
        let transfer_events =
            |events: Vec<TransferEvent>| events.into_iter().map(BankEvent::Transfer).collect();
        match (self, command) {
            (Bank::Account(account), BankCommand::Account(c)) => {
                account.decide(c, ctx).map(account_events)
            }
            (state, BankCommand::Transfer(c)) if state.is_free() => {
                Transfer::default().decide(c, ctx).map(transfer_events)
            }
            (Bank::Transfer { transfer }, BankCommand::Transfer(c)) => {
                transfer.decide(c, ctx).map(transfer_events)
            }
            (Bank::Account(_), BankCommand::Transfer(TransferCommand::TransferMoney(_))) => reject(
                RejectionCode::domain("TransferExists"),
                "this id is an account's, not a free transfer id",
            ),
            (Bank::Account(_), BankCommand::Transfer(_)) => reject(
                RejectionCode::domain("TransferNotFound"),
                "this id is an account's, not a transfer's",
            ),
            (Bank::Transfer { .. }, BankCommand::Account(Command::OpenAccount { .. })) => reject(
                RejectionCode::AccountExists,
                "this id is a transfer's, not a free account id",
            ),
            (Bank::Transfer { .. }, BankCommand::Account(_)) => reject(
                RejectionCode::AccountNotFound,
                "this id is a transfer's, not an account's",
            ),
        }
    }

    fn evolve(&mut self, event: &BankEvent) -> Result<(), Inapplicable> {
        match (&mut *self, event) {
            (Bank::Account(account), BankEvent::Account(e)) => account.evolve(e),
            (Bank::Transfer { transfer }, BankEvent::Transfer(e)) => transfer.evolve(e),
            (state, BankEvent::Transfer(e)) if state.is_free() => {
                let mut transfer = Transfer::default();
                transfer.evolve(e)?;
                *self = Bank::Transfer { transfer };
                Ok(())
            }
            (state, e) => Err(Inapplicable(format!(
                "{} for an id that is {}",
                e.event_type(),
                match state {
                    Bank::Account(_) => "an account's",
                    Bank::Transfer { .. } => "a transfer's",
                }
            ))),
        }
    }

    fn event_aggregate_type(event_type: &str) -> &'static str {
        if TransferEvent::TYPES.contains(&event_type) {
            TRANSFER_TYPE
        } else {
            AGGREGATE_TYPE
        }
    }

    fn react(
        &self,
        command: &BankCommand,
        outcome: Result<&[BankEvent], &Rejection>,
        ctx: &Context<'_>,
    ) -> Vec<Outgoing> {
        match (self, command) {
            (Bank::Account(account), BankCommand::Account(c)) => {
                account.reactions(c, outcome.map(drop))
            }
            // A step for an account sent to a transfer's id is refused as for an account never
            // opened, and compensated the same way.
            (Bank::Transfer { .. }, BankCommand::Account(c)) => {
                BankAccount::default().reactions(c, outcome.map(drop))
            }
            (Bank::Transfer { transfer }, BankCommand::Transfer(_)) => {
                transfer.reactions(outcome.is_ok(), ctx.aggregate_id)
            }
            (Bank::Account(_), BankCommand::Transfer(_)) => Vec::new(),
        }
    }

    fn register_upcasters(upcasters: &mut crate::upcast::Upcasters) {
        BankAccount::register_upcasters(upcasters);
    }

    fn event_schema(event_type: &str, schema_version: u32) -> Option<Value> {
        if TransferEvent::TYPES.contains(&event_type) {
            Transfer::event_schema(event_type, schema_version)
        } else {
            BankAccount::event_schema(event_type, schema_version)
        }
    }
}

impl TransferStatus {
    /// Whether the transfer has ended (`completed` or `failed`).
    pub fn is_final(self) -> bool {
        matches!(self, TransferStatus::Completed | TransferStatus::Failed)
    }
}
