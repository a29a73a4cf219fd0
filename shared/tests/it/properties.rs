use chrono::{TimeZone, Utc};
use proptest::prelude::*;
use serde_json::json;
use shared::aggregate::Aggregate;
use shared::envelope::Metadata;
use shared::upcast::{UpcastContext, Upcasters};
use shared::{BankAccount, Command, Event, EventCodec, EventEnvelope};

fn command() -> impl Strategy<Value = Command> {
    let amount = -100i64..100_000;
    prop_oneof![
        (
            "\\PC{1,12}",
            prop::sample::select(vec!["EUR", "USD", "JPY", "bad"]),
            -10i64..50_000
        )
            .prop_map(
                |(owner, currency, initial_balance_minor)| Command::OpenAccount {
                    owner,
                    currency: currency.into(),
                    initial_balance_minor
                }
            ),
        amount.clone().prop_map(|amount_minor| Command::Deposit {
            amount_minor,
            currency: None
        }),
        amount.prop_map(|amount_minor| Command::Withdraw {
            amount_minor,
            currency: None
        }),
        Just(Command::CloseAccount),
    ]
}

fn event() -> impl Strategy<Value = Event> {
    prop_oneof![
        ("\\PC{1,20}", "[A-Z]{3}", 0i64..i64::MAX).prop_map(
            |(owner, currency, initial_balance_minor)| {
                Event::AccountOpened {
                    owner,
                    currency,
                    initial_balance_minor,
                }
            }
        ),
        (1i64..i64::MAX).prop_map(|amount_minor| Event::MoneyDeposited { amount_minor }),
        (1i64..i64::MAX).prop_map(|amount_minor| Event::MoneyWithdrawn { amount_minor }),
        Just(Event::AccountClosed),
    ]
}

proptest! {
    /// The laws of the seam hold for the bank account (deterministic decisions, every emitted
    /// event accepted by evolve, replay rebuilds the state), and the rules keep the balance
    /// non-negative.
    #[test]
    fn the_bank_account_keeps_the_laws(commands in prop::collection::vec(command(), 0..40)) {
        let history = shared::testing::check_laws::<BankAccount>(&commands)
            .map_err(TestCaseError::fail)?;
        let mut live = BankAccount::default();
        for e in &history {
            live.evolve(e).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert!(live.balance_minor >= 0);
        }
        prop_assert_eq!(live.version as usize, history.len());
    }

    /// Events the rules never emit in that order are refused by evolve, which then leaves the
    /// state as it was.
    #[test]
    fn evolve_refuses_impossible_events_without_a_change(events in prop::collection::vec(event(), 0..20)) {
        let mut state = BankAccount::default();
        for e in &events {
            let before = state.clone();
            if state.evolve(e).is_err() {
                prop_assert_eq!(&state, &before);
            }
        }
    }

    /// decode(encode(e)) == e for any current event.
    #[test]
    fn decode_encode_round_trips(e in event(), version in 1u64..1_000_000, secs in 0i64..4_000_000_000, nanos in 0u32..1_000_000_000, id in "\\PC{1,30}") {
        let ts = Utc.timestamp_opt(secs, nanos).unwrap();
        let env = EventEnvelope::new(&id, version, &e, ts, Metadata::new());
        let codec = EventCodec::json("USD");
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let bytes = rt.block_on(codec.encode("t", &env)).unwrap();
        let back = rt.block_on(codec.decode(&bytes)).unwrap();
        prop_assert_eq!(back.event().unwrap(), e);
        prop_assert_eq!(back, env);
    }

    /// Upcasting is deterministic and exact, and downcasting then upcasting gives the event back.
    #[test]
    fn upcasting_is_deterministic(cents in 1i64..10_000_000_000, form in 0usize..4) {
        let major = format!("{}.{:02}", cents / 100, cents % 100);
        let text = match form {
            0 => major,
            1 => format!("{cents}e-2"),
            2 => format!("{}E-3", cents * 10),
            _ => format!("{major}000"),
        };
        let raw: serde_json::Value = serde_json::from_str(&format!(
            r#"{{"id":"a6a3a450-6513-270e-269e-0d37f2a74de4","aggregate_id":"a","aggregate_type":"BankAccount","event_type":"MoneyDeposited","data":{{"amount":{text}}},"version":2,"timestamp":"2025-03-01T00:01:00"}}"#
        )).unwrap();
        let u = Upcasters::standard();
        let ctx = UpcastContext::default();
        let once = u.upcast(raw.clone(), &ctx).unwrap();
        prop_assert_eq!(&once, &u.upcast(raw, &ctx).unwrap());
        prop_assert_eq!(&once["data"], &json!({"amount_minor": cents}));
        let down = u.downcast(once.clone(), 1, &ctx).unwrap();
        prop_assert_eq!(u.upcast(down, &ctx).unwrap(), once);
    }
}
