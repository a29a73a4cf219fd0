//! Events of the bank-account aggregate (current schema version), past tense.

use serde::{Deserialize, Serialize};
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
    /// The amount left this account (the source) for a transfer: the transfer holds it until
    /// the target is credited or the amount is refunded.
    TransferDebited(TransferLeg),
    /// The amount of a transfer arrived on this account (the target).
    TransferCredited(TransferLeg),
    /// The transfer out of this account completed: nothing more will come back.
    TransferSettled(TransferLeg),
    /// The target refused the transfer (`reason`); the amount came back to this account.
    TransferRefunded(TransferLeg),
}

/// What a transfer's steps and the account events they cause carry: the payload of the
/// account's transfer commands and the `data` of its transfer events.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransferLeg {
    /// The transfer (its aggregate id; also `metadata.correlation_id`).
    pub transfer_id: String,
    /// The source account.
    pub from: String,
    /// The target account.
    pub to: String,
    /// Minor units, positive.
    pub amount_minor: i64,
    /// The source's currency (known once the source was debited).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub currency: Option<String>,
    /// Why the transfer failed (a rejection code), on a refund.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
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
    pub const TYPES: [&'static str; 8] = [
        "AccountOpened",
        "MoneyDeposited",
        "MoneyWithdrawn",
        "AccountClosed",
        "TransferDebited",
        "TransferCredited",
        "TransferSettled",
        "TransferRefunded",
    ];

    /// The wire name (`event_type`).
    pub fn event_type(&self) -> &'static str {
        match self {
            Event::AccountOpened { .. } => "AccountOpened",
            Event::MoneyDeposited { .. } => "MoneyDeposited",
            Event::MoneyWithdrawn { .. } => "MoneyWithdrawn",
            Event::AccountClosed => "AccountClosed",
            Event::TransferDebited(_) => "TransferDebited",
            Event::TransferCredited(_) => "TransferCredited",
            Event::TransferSettled(_) => "TransferSettled",
            Event::TransferRefunded(_) => "TransferRefunded",
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
            Event::TransferDebited(leg)
            | Event::TransferCredited(leg)
            | Event::TransferSettled(leg)
            | Event::TransferRefunded(leg) => serde_json::to_value(leg).unwrap_or(Value::Null),
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
        let leg = |leg: TransferLeg| match leg.amount_minor {
            a if a > 0 => Ok(leg),
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
            "TransferDebited" => Event::TransferDebited(leg(parse(event_type, data)?)?),
            "TransferCredited" => Event::TransferCredited(leg(parse(event_type, data)?)?),
            "TransferSettled" => Event::TransferSettled(leg(parse(event_type, data)?)?),
            "TransferRefunded" => Event::TransferRefunded(leg(parse(event_type, data)?)?),
            other => return Err(EventDataError::UnknownType(other.to_owned())),
        })
    }
}
