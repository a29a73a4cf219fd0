use shared::testing::given;
use shared::{Command, Event, RejectionCode::*};

fn opened(balance: i64) -> Event {
    Event::AccountOpened {
        owner: "Alice".into(),
        currency: "EUR".into(),
        initial_balance_minor: balance,
    }
}

fn open(owner: &str, balance: i64) -> Command {
    Command::OpenAccount {
        owner: owner.into(),
        currency: "EUR".into(),
        initial_balance_minor: balance,
    }
}

#[test]
fn opening_a_new_account() {
    let account = given([])
        .when(open("Alice", 10_000))
        .then_expect([opened(10_000)]);
    assert_eq!(account.balance_minor, 10_000);
    assert_eq!(account.version, 1);
    assert_eq!(account.transaction_count, 0);
}

#[test]
fn unicode_owner_names_are_kept_as_given() {
    let owner = "Zoë 王 🦀 Ñandú";
    let account = given([])
        .when(open(owner, 0))
        .then_expect([Event::AccountOpened {
            owner: owner.into(),
            currency: "EUR".into(),
            initial_balance_minor: 0,
        }]);
    assert_eq!(account.owner, owner);
}

#[test]
fn opening_twice_is_account_exists() {
    given([opened(0)])
        .when(open("Bob", 0))
        .then_expect_error(AccountExists);
}

#[test]
fn operations_on_unknown_accounts_are_not_found() {
    given([])
        .when(Command::Deposit {
            amount_minor: 1,
            currency: None,
        })
        .then_expect_error(AccountNotFound);
    given([])
        .when(Command::Withdraw {
            amount_minor: 1,
            currency: None,
        })
        .then_expect_error(AccountNotFound);
    given([])
        .when(Command::CloseAccount)
        .then_expect_error(AccountNotFound);
}

#[test]
fn closed_accounts_refuse_everything() {
    let history = || [opened(0), Event::AccountClosed];
    given(history())
        .when(Command::Deposit {
            amount_minor: 5,
            currency: None,
        })
        .then_expect_error(AccountClosed);
    given(history())
        .when(Command::Withdraw {
            amount_minor: 5,
            currency: None,
        })
        .then_expect_error(AccountClosed);
    given(history())
        .when(Command::CloseAccount)
        .then_expect_error(AccountClosed);
    given(history())
        .when(open("Alice", 0))
        .then_expect_error(AccountExists);
}

#[test]
fn amounts_must_be_positive() {
    given([opened(100)])
        .when(Command::Deposit {
            amount_minor: 0,
            currency: None,
        })
        .then_expect_error(InvalidAmount);
    given([opened(100)])
        .when(Command::Deposit {
            amount_minor: -5,
            currency: None,
        })
        .then_expect_error(InvalidAmount);
    given([opened(100)])
        .when(Command::Withdraw {
            amount_minor: 0,
            currency: None,
        })
        .then_expect_error(InvalidAmount);
    given([])
        .when(open("Alice", -1))
        .then_expect_error(InvalidAmount);
}

#[test]
fn deposits_that_would_overflow_are_refused() {
    given([opened(i64::MAX - 1)])
        .when(Command::Deposit {
            amount_minor: 2,
            currency: None,
        })
        .then_expect_error(InvalidAmount);
}

#[test]
fn deposit_and_withdraw_move_the_balance() {
    let account = given([opened(100)])
        .when(Command::Deposit {
            amount_minor: 50,
            currency: None,
        })
        .then_expect([Event::MoneyDeposited { amount_minor: 50 }]);
    assert_eq!(account.balance_minor, 150);
    let account = given([opened(100), Event::MoneyDeposited { amount_minor: 50 }])
        .when(Command::Withdraw {
            amount_minor: 150,
            currency: None,
        })
        .then_expect([Event::MoneyWithdrawn { amount_minor: 150 }]);
    assert_eq!(
        (
            account.balance_minor,
            account.transaction_count,
            account.version
        ),
        (0, 2, 3)
    );
}

#[test]
fn no_withdrawal_beyond_the_balance() {
    given([opened(100)])
        .when(Command::Withdraw {
            amount_minor: 101,
            currency: None,
        })
        .then_expect_error(InsufficientFunds);
}

#[test]
fn close_only_at_zero_balance() {
    given([opened(1)])
        .when(Command::CloseAccount)
        .then_expect_error(NonZeroBalance);
    given([opened(1), Event::MoneyWithdrawn { amount_minor: 1 }])
        .when(Command::CloseAccount)
        .then_expect([Event::AccountClosed]);
}

#[test]
fn blank_owner_and_bad_currency_are_malformed() {
    given([]).when(open("  ", 0)).then_expect_error(Malformed);
    given([])
        .when(Command::OpenAccount {
            owner: "A".into(),
            currency: "eur".into(),
            initial_balance_minor: 0,
        })
        .then_expect_error(Malformed);
}

// Regression: such names reached the read model and failed PostgreSQL batches for good.
#[test]
fn owners_too_long_or_with_control_characters_are_malformed() {
    given([])
        .when(open(&"é".repeat(101), 0))
        .then_expect_error(Malformed);
    given([])
        .when(open("Nul\u{0}Byte", 0))
        .then_expect_error(Malformed);
    given([])
        .when(open(&"é".repeat(100), 0))
        .then_expect([Event::AccountOpened {
            owner: "é".repeat(100),
            currency: "EUR".into(),
            initial_balance_minor: 0,
        }]);
}

#[test]
fn money_in_another_currency_than_the_accounts_is_refused() {
    let eur = || Some("EUR".to_string());
    let jpy = || Some("JPY".to_string());
    given([opened(100)])
        .when(Command::Deposit {
            amount_minor: 500,
            currency: jpy(),
        })
        .then_expect_error(CurrencyMismatch);
    given([opened(100)])
        .when(Command::Withdraw {
            amount_minor: 5,
            currency: jpy(),
        })
        .then_expect_error(CurrencyMismatch);
    let account = given([opened(100)])
        .when(Command::Deposit {
            amount_minor: 5,
            currency: eur(),
        })
        .then_expect([Event::MoneyDeposited { amount_minor: 5 }]);
    assert_eq!(account.balance_minor, 105);
    given([opened(100)])
        .when(Command::Withdraw {
            amount_minor: 5,
            currency: eur(),
        })
        .then_expect([Event::MoneyWithdrawn { amount_minor: 5 }]);
}

#[test]
fn a_money_commands_currency_travels_on_the_wire_only_when_named() {
    let named = Command::Deposit {
        amount_minor: 5,
        currency: Some("KWD".into()),
    };
    assert_eq!(
        named.payload(),
        serde_json::json!({"amount_minor": 5, "currency": "KWD"})
    );
    assert_eq!(
        Command::from_parts("Deposit", named.payload()).unwrap(),
        named
    );
    let bare = Command::Withdraw {
        amount_minor: 5,
        currency: None,
    };
    assert_eq!(bare.payload(), serde_json::json!({"amount_minor": 5}));
    assert_eq!(
        Command::from_parts("Withdraw", bare.payload()).unwrap(),
        bare
    );
}
