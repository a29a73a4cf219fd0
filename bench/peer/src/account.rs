//! The bank account aggregate on cqrs-es, with the same rules as `shared::bank_account`.

use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, DomainEvent};
use serde::{Deserialize, Serialize};

/// Commands a bank account accepts (money in minor units).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum BankCommand {
    /// Open the account with an initial balance.
    OpenAccount {
        /// Account holder.
        owner: String,
        /// ISO 4217 code, e.g. EUR.
        currency: String,
        /// Opening balance, not negative.
        initial_balance_minor: i64,
    },
    /// Add money.
    Deposit {
        /// Positive amount.
        amount_minor: i64,
    },
    /// Take money out, at most the balance.
    Withdraw {
        /// Positive amount.
        amount_minor: i64,
    },
    /// Close an account whose balance is zero.
    CloseAccount,
}

/// Events a bank account records.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum BankEvent {
    /// The account was opened.
    AccountOpened {
        /// Account holder.
        owner: String,
        /// ISO 4217 code.
        currency: String,
        /// Opening balance.
        initial_balance_minor: i64,
    },
    /// Money was deposited.
    MoneyDeposited {
        /// Amount added.
        amount_minor: i64,
    },
    /// Money was withdrawn.
    MoneyWithdrawn {
        /// Amount taken out.
        amount_minor: i64,
    },
    /// The account was closed.
    AccountClosed,
}

impl DomainEvent for BankEvent {
    fn event_type(&self) -> String {
        match self {
            BankEvent::AccountOpened { .. } => "AccountOpened",
            BankEvent::MoneyDeposited { .. } => "MoneyDeposited",
            BankEvent::MoneyWithdrawn { .. } => "MoneyWithdrawn",
            BankEvent::AccountClosed => "AccountClosed",
        }
        .to_owned()
    }

    fn event_version(&self) -> String {
        "1.0".to_owned()
    }
}

/// Why a command was rejected (a business rule, not a failure).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BankError {
    /// OpenAccount on an account that exists.
    #[error("account already exists")]
    AlreadyOpen,
    /// Any other command on an account that was never opened.
    #[error("account does not exist")]
    NotFound,
    /// Any command on a closed account.
    #[error("account is closed")]
    Closed,
    /// A withdrawal larger than the balance.
    #[error("cannot withdraw {requested} minor units: balance is {balance}")]
    InsufficientFunds {
        /// Balance before the withdrawal.
        balance: i64,
        /// Amount asked for.
        requested: i64,
    },
    /// A non-positive amount, a negative opening balance or an overflowing deposit.
    #[error("invalid amount: {0}")]
    InvalidAmount(&'static str),
    /// A malformed owner or currency.
    #[error("malformed command: {0}")]
    Malformed(&'static str),
    /// CloseAccount while money is left.
    #[error("balance is {0} minor units, not zero")]
    NonZeroBalance(i64),
}

/// Lifecycle of an account.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Status {
    /// Never opened.
    #[default]
    New,
    /// Open.
    Active,
    /// Closed.
    Closed,
}

/// A bank account's state, rebuilt from its events.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BankAccount {
    /// Where the account is in its lifecycle.
    pub status: Status,
    /// Current balance in minor units.
    pub balance_minor: i64,
    /// ISO 4217 code.
    pub currency: String,
}

impl BankAccount {
    /// The events `command` produces on this state, or why it is rejected.
    pub fn decide(&self, command: BankCommand) -> Result<BankEvent, BankError> {
        match (self.status, command) {
            (
                Status::New,
                BankCommand::OpenAccount {
                    owner,
                    currency,
                    initial_balance_minor,
                },
            ) => {
                if owner.trim().is_empty() {
                    return Err(BankError::Malformed("owner must not be empty"));
                }
                if currency.len() != 3 || !currency.bytes().all(|b| b.is_ascii_uppercase()) {
                    return Err(BankError::Malformed("currency is not an ISO 4217 code"));
                }
                if initial_balance_minor < 0 {
                    return Err(BankError::InvalidAmount(
                        "initial balance must not be negative",
                    ));
                }
                Ok(BankEvent::AccountOpened {
                    owner,
                    currency,
                    initial_balance_minor,
                })
            }
            (_, BankCommand::OpenAccount { .. }) => Err(BankError::AlreadyOpen),
            (Status::New, _) => Err(BankError::NotFound),
            (Status::Closed, _) => Err(BankError::Closed),
            (Status::Active, BankCommand::Deposit { amount_minor }) => {
                positive(amount_minor)?;
                if self.balance_minor.checked_add(amount_minor).is_none() {
                    return Err(BankError::InvalidAmount(
                        "deposit would overflow the balance",
                    ));
                }
                Ok(BankEvent::MoneyDeposited { amount_minor })
            }
            (Status::Active, BankCommand::Withdraw { amount_minor }) => {
                positive(amount_minor)?;
                if amount_minor > self.balance_minor {
                    return Err(BankError::InsufficientFunds {
                        balance: self.balance_minor,
                        requested: amount_minor,
                    });
                }
                Ok(BankEvent::MoneyWithdrawn { amount_minor })
            }
            (Status::Active, BankCommand::CloseAccount) => {
                if self.balance_minor != 0 {
                    return Err(BankError::NonZeroBalance(self.balance_minor));
                }
                Ok(BankEvent::AccountClosed)
            }
        }
    }
}

fn positive(amount_minor: i64) -> Result<(), BankError> {
    if amount_minor <= 0 {
        return Err(BankError::InvalidAmount("amount must be positive"));
    }
    Ok(())
}

impl Aggregate for BankAccount {
    const TYPE: &'static str = "BankAccount";
    type Command = BankCommand;
    type Event = BankEvent;
    type Error = BankError;
    type Services = ();

    async fn handle(
        &mut self,
        command: Self::Command,
        _services: &Self::Services,
        sink: &EventSink<Self>,
    ) -> Result<(), Self::Error> {
        let event = self.decide(command)?;
        sink.write(event, self).await;
        Ok(())
    }

    fn apply(&mut self, event: Self::Event) {
        match event {
            BankEvent::AccountOpened {
                currency,
                initial_balance_minor,
                ..
            } => {
                self.status = Status::Active;
                self.currency = currency;
                self.balance_minor = initial_balance_minor;
            }
            BankEvent::MoneyDeposited { amount_minor } => self.balance_minor += amount_minor,
            BankEvent::MoneyWithdrawn { amount_minor } => self.balance_minor -= amount_minor,
            BankEvent::AccountClosed => self.status = Status::Closed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open() -> BankAccount {
        let mut account = BankAccount::default();
        account.apply(
            account
                .decide(BankCommand::OpenAccount {
                    owner: "Owner 0".into(),
                    currency: "EUR".into(),
                    initial_balance_minor: 100,
                })
                .unwrap(),
        );
        account
    }

    #[test]
    fn rules() {
        let fresh = BankAccount::default();
        assert_eq!(
            fresh.decide(BankCommand::Deposit { amount_minor: 1 }),
            Err(BankError::NotFound)
        );
        let mut account = open();
        assert_eq!(account.balance_minor, 100);
        assert!(matches!(
            account.decide(BankCommand::Withdraw { amount_minor: 101 }),
            Err(BankError::InsufficientFunds { .. })
        ));
        account.apply(
            account
                .decide(BankCommand::Withdraw { amount_minor: 100 })
                .unwrap(),
        );
        account.apply(account.decide(BankCommand::CloseAccount).unwrap());
        assert_eq!(
            account.decide(BankCommand::Deposit { amount_minor: 1 }),
            Err(BankError::Closed)
        );
        assert_eq!(
            open().decide(BankCommand::OpenAccount {
                owner: "x".into(),
                currency: "EUR".into(),
                initial_balance_minor: 0
            }),
            Err(BankError::AlreadyOpen)
        );
    }
}
