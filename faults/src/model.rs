//! The reference model: this suite's own fold of the commands it sent, written apart from the
//! domain code in `shared` so that a defect there cannot hide itself. It predicts every answer
//! (accepted at which version, or rejected with which code) and the final state of every account.

/// What the suite asks of an account (a command in the model's own terms).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Op {
    Open { initial_minor: i64 },
    Deposit { amount_minor: i64 },
    Withdraw { amount_minor: i64 },
    Close,
}

/// The answer the model expects, and the shape every received result is reduced to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Accepted; the account is at this version afterwards.
    Accepted { version: u64 },
    /// Rejected with this stable code.
    Rejected { code: String },
}

/// One account as the model sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Account {
    pub(crate) opened: bool,
    pub(crate) closed: bool,
    pub(crate) balance_minor: i64,
    pub(crate) version: u64,
}

fn rejected(code: &str) -> Outcome {
    Outcome::Rejected {
        code: code.to_owned(),
    }
}

impl Account {
    /// The answer to `op` sent with `expected_version`, and the account afterwards.
    pub(crate) fn decide(&self, op: &Op, expected_version: Option<u64>) -> (Outcome, Account) {
        if let Some(expected) = expected_version
            && expected != self.version
        {
            return (rejected("VersionConflict"), self.clone());
        }
        let mut next = self.clone();
        let outcome = match (op, self.opened, self.closed) {
            (Op::Open { initial_minor }, false, _) => {
                if *initial_minor < 0 {
                    return (rejected("InvalidAmount"), next);
                }
                next.opened = true;
                next.balance_minor = *initial_minor;
                None
            }
            (Op::Open { .. }, true, _) => Some(rejected("AccountExists")),
            (_, false, _) => Some(rejected("AccountNotFound")),
            (_, true, true) => Some(rejected("AccountClosed")),
            (Op::Deposit { amount_minor }, true, false) => {
                if *amount_minor <= 0 {
                    Some(rejected("InvalidAmount"))
                } else {
                    next.balance_minor += amount_minor;
                    None
                }
            }
            (Op::Withdraw { amount_minor }, true, false) => {
                if *amount_minor <= 0 {
                    Some(rejected("InvalidAmount"))
                } else if *amount_minor > self.balance_minor {
                    Some(rejected("InsufficientFunds"))
                } else {
                    next.balance_minor -= amount_minor;
                    None
                }
            }
            (Op::Close, true, false) => {
                if self.balance_minor != 0 {
                    Some(rejected("NonZeroBalance"))
                } else {
                    next.closed = true;
                    None
                }
            }
        };
        match outcome {
            Some(rejection) => (rejection, self.clone()),
            None => {
                next.version += 1;
                (
                    Outcome::Accepted {
                        version: next.version,
                    },
                    next,
                )
            }
        }
    }

    /// `active` or `closed`, as the read model names it.
    pub(crate) fn status(&self) -> &'static str {
        if self.closed { "closed" } else { "active" }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_model_folds_a_life() {
        let a = Account::default();
        let (o, a) = a.decide(&Op::Deposit { amount_minor: 5 }, None);
        assert_eq!(o, rejected("AccountNotFound"));
        let (o, a) = a.decide(&Op::Open { initial_minor: 10 }, None);
        assert_eq!(o, Outcome::Accepted { version: 1 });
        let (o, a) = a.decide(&Op::Withdraw { amount_minor: 11 }, None);
        assert_eq!(o, rejected("InsufficientFunds"));
        let (o, a) = a.decide(&Op::Close, None);
        assert_eq!(o, rejected("NonZeroBalance"));
        let (o, a) = a.decide(&Op::Withdraw { amount_minor: 10 }, Some(3));
        assert_eq!(o, rejected("VersionConflict"));
        let (o, a) = a.decide(&Op::Withdraw { amount_minor: 10 }, Some(1));
        assert_eq!(o, Outcome::Accepted { version: 2 });
        let (o, a) = a.decide(&Op::Close, None);
        assert_eq!(o, Outcome::Accepted { version: 3 });
        let (o, a) = a.decide(&Op::Deposit { amount_minor: 1 }, None);
        assert_eq!(o, rejected("AccountClosed"));
        assert_eq!((a.balance_minor, a.version, a.status()), (0, 3, "closed"));
    }
}
