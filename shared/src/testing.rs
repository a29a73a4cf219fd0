//! Test support shared by every crate: the given/when/then harness for the aggregate and the
//! helpers integration tests use to reach the real broker with unique names.

use crate::bank_account::{BankAccount, Command, Event, RejectionCode};

/// Starts a scenario from the account's past events.
pub fn given(events: impl IntoIterator<Item = Event>) -> Given {
    let history: Vec<Event> = events.into_iter().collect();
    Given {
        account: BankAccount::from_events(&history),
    }
}

/// A scenario with its history folded.
#[derive(Debug)]
pub struct Given {
    account: BankAccount,
}

impl Given {
    /// The command under test.
    pub fn when(self, command: Command) -> When {
        let outcome = self.account.handle(&command);
        When {
            account: self.account,
            command,
            outcome,
        }
    }
}

/// A scenario after the command ran.
#[derive(Debug)]
pub struct When {
    account: BankAccount,
    command: Command,
    outcome: Result<Vec<Event>, crate::bank_account::Rejection>,
}

impl When {
    /// Asserts the command was accepted with exactly these events; returns the new state.
    #[track_caller]
    pub fn then_expect(self, expected: impl IntoIterator<Item = Event>) -> BankAccount {
        let expected: Vec<Event> = expected.into_iter().collect();
        match self.outcome {
            Ok(events) => {
                assert_eq!(events, expected, "events for {:?}", self.command);
                let mut account = self.account;
                events.iter().for_each(|e| account.apply(e));
                account
            }
            Err(rejection) => panic!(
                "{:?} was rejected ({rejection}), expected {expected:?}",
                self.command
            ),
        }
    }

    /// Asserts the command was rejected with this code.
    #[track_caller]
    pub fn then_expect_error(self, code: RejectionCode) {
        match self.outcome {
            Err(rejection) => assert_eq!(rejection.code, code, "{rejection}"),
            Ok(events) => panic!(
                "{:?} was accepted with {events:?}, expected {code}",
                self.command
            ),
        }
    }
}

/// The broker for integration tests, from `KAFKA_BOOTSTRAP_SERVERS`. Panics with instructions
/// when it is not set: a test that needs Kafka never passes silently without it.
#[track_caller]
pub fn kafka_bootstrap() -> String {
    std::env::var("KAFKA_BOOTSTRAP_SERVERS")
        .ok()
        .filter(|v| !v.trim().is_empty())
        .unwrap_or_else(|| {
            panic!(
                "KAFKA_BOOTSTRAP_SERVERS is not set. This test needs a real Kafka broker: run the \
             whole suite with `scripts/test`, or start one with `scripts/kafka start` and export \
             KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:9092"
            )
        })
}

/// The schema registry for integration tests, from `SCHEMA_REGISTRY_URL`, if one is running.
pub fn schema_registry_url() -> Option<String> {
    std::env::var("SCHEMA_REGISTRY_URL")
        .ok()
        .filter(|v| !v.trim().is_empty())
}

/// A name no other test run uses (`<prefix>-<uuid>`), for topics, groups and transactional ids.
pub fn unique_name(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

/// Settings for an integration test: the real broker and a unique topic prefix.
pub fn test_settings(partitions: i32) -> crate::config::Settings {
    let mut vars: Vec<(String, String)> = std::env::vars().collect();
    vars.push(("KAFKA_BOOTSTRAP_SERVERS".into(), kafka_bootstrap()));
    vars.push(("TOPIC_PREFIX".into(), unique_name("test")));
    vars.push(("PARTITIONS".into(), partitions.to_string()));
    vars.push(("INSTANCE_ID".into(), unique_name("instance")));
    crate::config::Settings::from_vars(&vars).expect("test settings are valid")
}
