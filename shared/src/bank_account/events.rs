//! Events of the bank-account aggregate (current schema version), past tense.

use serde::Deserialize;
use serde_json::{Value, json};

use crate::aggregate::EventDataError;

/// Something that happened to an account. Amounts are integer minor units.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The account was opened.
    AccountOpened {
        /// Account holder.
        owner: String,
        /// ISO 4217 currency of every amount of this account.
        currency: String,
        /// Opening balance, minor units.
        initial_balance_minor: i64,
    },
    /// Money was deposited.
    MoneyDeposited {
        /// Minor units, positive.
        amount_minor: i64,
    },
    /// Money was withdrawn.
    MoneyWithdrawn {
        /// Minor units, positive.
        amount_minor: i64,
    },
    /// The account was closed.
    AccountClosed,
}

#[derive(Deserialize)]
struct Opened {
    owner: String,
    currency: String,
    initial_balance_minor: i64,
}

#[derive(Deserialize)]
struct Amount {
    amount_minor: i64,
}

impl Event {
    /// All event types of the aggregate, as written on the wire.
    pub const TYPES: [&'static str; 4] = [
        "AccountOpened",
        "MoneyDeposited",
        "MoneyWithdrawn",
        "AccountClosed",
    ];

    /// The wire name (`event_type`).
    pub fn event_type(&self) -> &'static str {
        match self {
            Event::AccountOpened { .. } => "AccountOpened",
            Event::MoneyDeposited { .. } => "MoneyDeposited",
            Event::MoneyWithdrawn { .. } => "MoneyWithdrawn",
            Event::AccountClosed => "AccountClosed",
        }
    }

    /// The `data` of the envelope at the current schema version.
    pub fn data(&self) -> Value {
        match self {
            Event::AccountOpened {
                owner,
                currency,
                initial_balance_minor,
            } => json!({
                "owner": owner, "currency": currency, "initial_balance_minor": initial_balance_minor
            }),
            Event::MoneyDeposited { amount_minor } | Event::MoneyWithdrawn { amount_minor } => {
                json!({ "amount_minor": amount_minor })
            }
            Event::AccountClosed => json!({}),
        }
    }

    /// Reads an event from its type and current-version `data`.
    pub fn from_parts(event_type: &str, data: &Value) -> Result<Event, EventDataError> {
        fn parse<T: for<'de> Deserialize<'de>>(t: &str, data: &Value) -> Result<T, EventDataError> {
            T::deserialize(data).map_err(|e| EventDataError::InvalidData {
                event_type: t.to_owned(),
                reason: e.to_string(),
            })
        }
        // The rules never produce these; an event that carries one was not written by them and
        // would corrupt a balance if folded.
        let out_of_range = |what: &str, value: i64| EventDataError::InvalidData {
            event_type: event_type.to_owned(),
            reason: format!("{what} {value} is out of range"),
        };
        let positive = |amount: Amount| match amount.amount_minor {
            a if a > 0 => Ok(a),
            a => Err(out_of_range("amount_minor", a)),
        };
        Ok(match event_type {
            "AccountOpened" => {
                let o: Opened = parse(event_type, data)?;
                if o.initial_balance_minor < 0 {
                    return Err(out_of_range(
                        "initial_balance_minor",
                        o.initial_balance_minor,
                    ));
                }
                Event::AccountOpened {
                    owner: o.owner,
                    currency: o.currency,
                    initial_balance_minor: o.initial_balance_minor,
                }
            }
            "MoneyDeposited" => Event::MoneyDeposited {
                amount_minor: positive(parse(event_type, data)?)?,
            },
            "MoneyWithdrawn" => Event::MoneyWithdrawn {
                amount_minor: positive(parse(event_type, data)?)?,
            },
            "AccountClosed" => Event::AccountClosed,
            other => return Err(EventDataError::UnknownType(other.to_owned())),
        })
    }
}
