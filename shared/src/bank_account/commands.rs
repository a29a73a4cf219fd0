//! Commands of the bank-account aggregate and the rejections they can meet.

use compact_str::CompactString;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::TransferLeg;

/// An intention to change an account. Amounts are integer minor units of the account currency.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Open a new account.
    OpenAccount {
        /// Account holder's name (any unicode, not blank).
        owner: String,
        /// ISO 4217 code, three upper-case letters.
        currency: String,
        /// Opening balance in minor units, zero or more.
        initial_balance_minor: i64,
    },
    /// Put money in.
    Deposit {
        /// Minor units, more than zero.
        amount_minor: i64,
        /// The currency the sender means the amount in: refused (`CurrencyMismatch`) unless it
        /// is the account's. Optional on the wire; clients that scale amounts by a currency's
        /// decimals should send it.
        currency: Option<String>,
    },
    /// Take money out, never beyond the balance.
    Withdraw {
        /// Minor units, more than zero.
        amount_minor: i64,
        /// As for [`Command::Deposit`].
        currency: Option<String>,
    },
    /// Close an account whose balance is zero and that has no transfer out in flight.
    CloseAccount,
    /// A transfer's step (sent by the engine only): take the amount out of this account, the
    /// source, for the transfer.
    DebitForTransfer(TransferLeg),
    /// A transfer's step (sent by the engine only): book the amount on this account, the
    /// target.
    CreditForTransfer(TransferLeg),
    /// A transfer's step (sent by the engine only): the target was credited; the transfer no
    /// longer holds this account open.
    SettleTransfer(TransferLeg),
    /// A transfer's step (sent by the engine only): the target refused the credit; the amount
    /// comes back. Never refused for an account with the transfer in flight.
    RefundTransfer(TransferLeg),
}

#[derive(Deserialize)]
struct OpenPayload {
    owner: String,
    currency: String,
    #[serde(default)]
    initial_balance_minor: i64,
}

#[derive(Deserialize)]
struct AmountPayload {
    amount_minor: i64,
    #[serde(default)]
    currency: Option<String>,
}

impl Command {
    /// The wire name of the command (`type` field of the command message).
    pub fn type_name(&self) -> &'static str {
        match self {
            Command::OpenAccount { .. } => "OpenAccount",
            Command::Deposit { .. } => "Deposit",
            Command::Withdraw { .. } => "Withdraw",
            Command::CloseAccount => "CloseAccount",
            Command::DebitForTransfer(_) => "DebitForTransfer",
            Command::CreditForTransfer(_) => "CreditForTransfer",
            Command::SettleTransfer(_) => "SettleTransfer",
            Command::RefundTransfer(_) => "RefundTransfer",
        }
    }

    /// The wire payload of the command (`payload` field of the command message).
    pub fn payload(&self) -> Value {
        match self {
            Command::OpenAccount {
                owner,
                currency,
                initial_balance_minor,
            } => json!({
                "owner": owner, "currency": currency, "initial_balance_minor": initial_balance_minor
            }),
            Command::Deposit {
                amount_minor,
                currency,
            }
            | Command::Withdraw {
                amount_minor,
                currency,
            } => match currency {
                Some(currency) => json!({ "amount_minor": amount_minor, "currency": currency }),
                None => json!({ "amount_minor": amount_minor }),
            },
            Command::CloseAccount => json!({}),
            Command::DebitForTransfer(step)
            | Command::CreditForTransfer(step)
            | Command::SettleTransfer(step)
            | Command::RefundTransfer(step) => serde_json::to_value(step).unwrap_or(Value::Null),
        }
    }

    /// Builds a command from its wire `type` and `payload`; the error says what is wrong.
    pub fn from_parts(type_name: &str, payload: Value) -> Result<Command, String> {
        let payload = if payload.is_null() {
            json!({})
        } else {
            payload
        };
        let err = |e: serde_json::Error| format!("invalid {type_name} payload: {e}");
        let step = |payload: Value| serde_json::from_value::<TransferLeg>(payload).map_err(err);
        Ok(match type_name {
            "OpenAccount" => {
                let p: OpenPayload = serde_json::from_value(payload).map_err(err)?;
                Command::OpenAccount {
                    owner: p.owner,
                    currency: p.currency,
                    initial_balance_minor: p.initial_balance_minor,
                }
            }
            "Deposit" => {
                let p: AmountPayload = serde_json::from_value(payload).map_err(err)?;
                Command::Deposit {
                    amount_minor: p.amount_minor,
                    currency: p.currency,
                }
            }
            "Withdraw" => {
                let p: AmountPayload = serde_json::from_value(payload).map_err(err)?;
                Command::Withdraw {
                    amount_minor: p.amount_minor,
                    currency: p.currency,
                }
            }
            "CloseAccount" => Command::CloseAccount,
            "DebitForTransfer" => Command::DebitForTransfer(step(payload)?),
            "CreditForTransfer" => Command::CreditForTransfer(step(payload)?),
            "SettleTransfer" => Command::SettleTransfer(step(payload)?),
            "RefundTransfer" => Command::RefundTransfer(step(payload)?),
            other => {
                return Err(format!(
                    "unknown command type `{other}` (expected OpenAccount, Deposit, Withdraw or CloseAccount)"
                ));
            }
        })
    }
}

/// Stable machine-readable reason for refusing a command. The names are part of the wire
/// contract: clients match on them. Written as a plain string.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum RejectionCode {
    /// `OpenAccount` for an id that already exists.
    AccountExists,
    /// Any command but `OpenAccount` for an id that was never opened.
    AccountNotFound,
    /// Any command on a closed account.
    AccountClosed,
    /// An amount of zero or less (or a negative opening balance, or an overflow).
    InvalidAmount,
    /// A withdrawal beyond the balance.
    InsufficientFunds,
    /// A deposit or withdrawal that names another currency than the account's: nothing is
    /// booked (its amount was meant in other units).
    CurrencyMismatch,
    /// Closing an account whose balance is not zero.
    NonZeroBalance,
    /// `expected_version` differs from the aggregate's version: reload and retry.
    VersionConflict,
    /// The command could not be read (bad JSON, unknown type, missing or invalid fields).
    Malformed,
    /// The aggregate's stored events cannot be read right now (an unreadable event on its
    /// partition): nothing is decided on it until an operator repairs the store. Not final:
    /// the same command id is decided afresh when sent again.
    AggregateUnavailable,
    /// A command id decided before, within the dedupe window, whose original result record is
    /// gone from the results topic (deleted early): it is not decided again.
    ResultLost,
    /// A rule of an aggregate type other than the bank account, by its own stable code
    /// (UpperCamelCase, not one of the names above), written as it is.
    Domain(CompactString),
}

impl RejectionCode {
    const NAMED: [RejectionCode; 11] = [
        RejectionCode::AccountExists,
        RejectionCode::AccountNotFound,
        RejectionCode::AccountClosed,
        RejectionCode::InvalidAmount,
        RejectionCode::InsufficientFunds,
        RejectionCode::CurrencyMismatch,
        RejectionCode::NonZeroBalance,
        RejectionCode::VersionConflict,
        RejectionCode::Malformed,
        RejectionCode::AggregateUnavailable,
        RejectionCode::ResultLost,
    ];

    /// A code of an aggregate type's own rules: one of the named codes when it is one.
    pub fn domain(code: &str) -> Self {
        Self::NAMED
            .into_iter()
            .find(|c| c.as_str() == code)
            .unwrap_or_else(|| RejectionCode::Domain(CompactString::from(code)))
    }

    /// A static name for the code (metric labels): the code itself, or `Rejected` for
    /// [`RejectionCode::Domain`] codes.
    pub fn static_name(&self) -> &'static str {
        match self {
            RejectionCode::AccountExists => "AccountExists",
            RejectionCode::AccountNotFound => "AccountNotFound",
            RejectionCode::AccountClosed => "AccountClosed",
            RejectionCode::InvalidAmount => "InvalidAmount",
            RejectionCode::InsufficientFunds => "InsufficientFunds",
            RejectionCode::CurrencyMismatch => "CurrencyMismatch",
            RejectionCode::NonZeroBalance => "NonZeroBalance",
            RejectionCode::VersionConflict => "VersionConflict",
            RejectionCode::Malformed => "Malformed",
            RejectionCode::AggregateUnavailable => "AggregateUnavailable",
            RejectionCode::ResultLost => "ResultLost",
            RejectionCode::Domain(_) => "Rejected",
        }
    }

    /// The code as written on the wire.
    pub fn as_str(&self) -> &str {
        match self {
            RejectionCode::Domain(code) => code.as_str(),
            named => named.static_name(),
        }
    }

    /// Whether the rejection is the command's final answer, remembered for the dedupe window.
    /// [`RejectionCode::AggregateUnavailable`] is not: the command was never decided.
    pub fn is_final(&self) -> bool {
        !matches!(self, RejectionCode::AggregateUnavailable)
    }
}

impl Serialize for RejectionCode {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for RejectionCode {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let code = CompactString::deserialize(deserializer)?;
        Ok(RejectionCode::domain(&code))
    }
}

impl std::fmt::Display for RejectionCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A refused command: a stable code and a human message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{code}: {message}")]
pub struct Rejection {
    /// Stable reason, part of the wire contract.
    pub code: RejectionCode,
    /// Explanation for people; may change between releases.
    pub message: String,
}

impl Rejection {
    /// A rejection with the given code and message.
    pub fn new(code: RejectionCode, message: impl Into<String>) -> Self {
        Rejection {
            code,
            message: message.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_plain_strings_and_other_aggregates_codes_pass_through() {
        for code in RejectionCode::NAMED {
            let json = serde_json::to_string(&code).unwrap();
            assert_eq!(json, format!("\"{}\"", code.as_str()));
            assert_eq!(serde_json::from_str::<RejectionCode>(&json).unwrap(), code);
            assert_eq!(code.static_name(), code.as_str());
        }
        let own = RejectionCode::domain("OverLimit");
        assert_eq!(own, RejectionCode::Domain("OverLimit".into()));
        assert_eq!(serde_json::to_string(&own).unwrap(), "\"OverLimit\"");
        assert_eq!(
            serde_json::from_str::<RejectionCode>("\"OverLimit\"").unwrap(),
            own
        );
        assert_eq!(own.static_name(), "Rejected", "metric labels stay bounded");
        assert_eq!(
            RejectionCode::domain("VersionConflict"),
            RejectionCode::VersionConflict
        );
    }
}
