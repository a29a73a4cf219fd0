//! Test support shared by every crate: the given/when/then harness for the aggregate and the
//! helpers integration tests use to reach the real broker with unique names.

use chrono::{DateTime, Utc};

use crate::aggregate::{self, Aggregate, Context, DomainEvent};
use crate::bank_account::{BankAccount, Event, Rejection, RejectionCode};
use crate::envelope::Metadata;

/// The seed-era v1 events (one JSON envelope per line), as the first producers wrote them: the
/// fixture every crate's upcasting tests read.
pub const SEED_V1_EVENTS: &str = include_str!("../tests/data/seed-v1-events.jsonl");

/// The account states folding [`SEED_V1_EVENTS`] must give, by account id.
pub const SEED_V1_EXPECTED: &str = include_str!("../tests/data/seed-v1-expected.json");

/// Starts a bank-account scenario from the account's past events.
pub fn given(events: impl IntoIterator<Item = Event>) -> Given<BankAccount> {
    Given::history(events)
}

/// A given/when/then scenario for any aggregate type: its history folded with
/// [`Aggregate::evolve`] (which must accept every event of it).
#[derive(Debug)]
pub struct Given<A: Aggregate> {
    state: A,
    version: u64,
    metadata: Metadata,
    now: DateTime<Utc>,
}

impl<A: Aggregate> Given<A> {
    /// Starts a scenario from an aggregate's past events.
    #[track_caller]
    pub fn history(events: impl IntoIterator<Item = A::Event>) -> Self {
        let mut state = A::default();
        let mut version = 0;
        for event in events {
            if let Err(e) = state.evolve(&event) {
                panic!("the given history is not one {} accepts: {e}", A::TYPE);
            }
            version += 1;
        }
        Given {
            state,
            version,
            metadata: Metadata::new(),
            now: Utc::now(),
        }
    }

    /// The command under test, decided as the engine decides it ([`aggregate::execute`]).
    pub fn when(self, command: A::Command) -> When<A> {
        self.when_expecting(None, command)
    }

    /// The command under test, sent with an `expected_version`.
    pub fn when_expecting(self, expected_version: Option<u64>, command: A::Command) -> When<A> {
        let ctx = Context {
            aggregate_id: "given",
            version: self.version,
            now: self.now,
            metadata: &self.metadata,
        };
        let outcome = aggregate::execute(self.state.clone(), expected_version, &command, &ctx);
        When { command, outcome }
    }
}

/// A scenario after the command ran.
#[derive(Debug)]
pub struct When<A: Aggregate> {
    command: A::Command,
    outcome: Result<(Vec<A::Event>, A), Rejection>,
}

impl<A: Aggregate> When<A> {
    /// Asserts the command was accepted with exactly these events; returns the new state.
    #[track_caller]
    pub fn then_expect(self, expected: impl IntoIterator<Item = A::Event>) -> A {
        let expected: Vec<A::Event> = expected.into_iter().collect();
        match self.outcome {
            Ok((events, state)) => {
                assert_eq!(events, expected, "events for {:?}", self.command);
                state
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
            Ok((events, _)) => panic!(
                "{:?} was accepted with {events:?}, expected {code}",
                self.command
            ),
        }
    }
}

/// Checks the laws every aggregate type must keep, over one sequence of commands (drive it with
/// proptest): `decide` is deterministic; every event it emits is accepted by `evolve`, in order;
/// replaying the accepted events from nothing rebuilds the same state; and an event the state
/// refuses leaves the state unchanged. Returns the accepted history, or which law broke.
pub fn check_laws<A: Aggregate>(commands: &[A::Command]) -> Result<Vec<A::Event>, String> {
    let metadata = Metadata::new();
    let now = Utc::now();
    let mut live = A::default();
    let mut history: Vec<A::Event> = Vec::new();
    for command in commands {
        let ctx = Context {
            aggregate_id: "law",
            version: history.len() as u64,
            now,
            metadata: &metadata,
        };
        let first = live.decide(command, &ctx);
        if live.decide(command, &ctx) != first {
            return Err(format!("decide is not deterministic for {command:?}"));
        }
        let Ok(events) = first else { continue };
        for event in events {
            if let Err(e) = live.evolve(&event) {
                return Err(format!(
                    "{command:?} emitted {} which evolve refuses: {e}",
                    event.event_type()
                ));
            }
            history.push(event);
        }
        for event in &history {
            let mut probe = live.clone();
            if probe.evolve(event).is_err() && probe != live {
                return Err(format!(
                    "a refused {} changed the state",
                    event.event_type()
                ));
            }
        }
    }
    match A::from_events(&history) {
        Ok(replayed) if replayed == live => Ok(history),
        Ok(replayed) => Err(format!(
            "replaying the history gives {replayed:?}, the live state is {live:?}"
        )),
        Err(e) => Err(format!("replaying the history fails: {e}")),
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

/// The SCRAM listener of the test broker (`scripts/kafka` with `KAFKA_SASL_PORT`), from
/// `TEST_KAFKA_SASL_BOOTSTRAP`, and the directory of its users' password files
/// (`TEST_KAFKA_SASL_SECRETS`, one `<user>.password` each). `None` (after a loud skip, or a
/// failure under CI) when the suite was started without it.
#[track_caller]
pub fn sasl_kafka() -> Option<(String, std::path::PathBuf)> {
    let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
    match (
        var("TEST_KAFKA_SASL_BOOTSTRAP"),
        var("TEST_KAFKA_SASL_SECRETS"),
    ) {
        (Some(bootstrap), Some(secrets)) => Some((bootstrap, secrets.into())),
        _ => {
            skip_without(
                "a SCRAM listener",
                "TEST_KAFKA_SASL_BOOTSTRAP and TEST_KAFKA_SASL_SECRETS are unset; scripts/test \
                 starts the broker with one",
            );
            None
        }
    }
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

/// Whether this runs under CI (`CI=true`), where a missing external checker fails the test
/// instead of skipping it.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// Skips a test loudly because `tool` is missing, or fails it under CI (see [`in_ci`]).
#[track_caller]
pub fn skip_without(tool: &str, why: &str) {
    if in_ci() {
        panic!("{tool} is required under CI=true but is unavailable: {why}");
    }
    eprintln!(
        "\n**********************************************************************\n\
         ** SKIPPED: {tool} is unavailable ({why}).\n\
         ** Install it (scripts/test does) to run this check; CI=true fails here.\n\
         **********************************************************************\n"
    );
}

/// What an external checker run said.
#[derive(Debug)]
pub enum ExternalCheck {
    /// The checker could not run (not installed, cannot be installed); the reason.
    Unavailable(String),
    /// It ran: whether it passed, and what it printed (stdout and stderr).
    Ran {
        /// Exit status 0.
        passed: bool,
        /// Its output, for the assertion message.
        output: String,
    },
}

/// Runs `promtool check metrics` (Debian's `prometheus` package) on a `/metrics` exposition.
pub async fn promtool_check_metrics(exposition: &str) -> ExternalCheck {
    use tokio::io::AsyncWriteExt;
    let child = tokio::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn();
    let mut child = match child {
        Ok(child) => child,
        Err(e) => return ExternalCheck::Unavailable(format!("cannot run promtool: {e}")),
    };
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(exposition.as_bytes())
            .await
            .expect("write to promtool");
    }
    let out = child.wait_with_output().await.expect("promtool runs");
    ExternalCheck::Ran {
        passed: out.status.success(),
        output: format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

/// Exit status of `scripts/api-check` when schemathesis cannot be installed (no python3, venv
/// or pip): the check could not run, which is not a failure of the API.
pub const API_CHECK_UNAVAILABLE: i32 = 3;

/// Runs `scripts/api-check URL` (schemathesis against `URL/openapi.json`), its output passed
/// through to the test's; every request carries `Authorization: Bearer <bearer>` when given.
pub async fn api_check(base_url: &str, bearer: Option<&str>) -> ExternalCheck {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/api-check");
    let mut command = tokio::process::Command::new(script);
    if let Some(secret) = bearer {
        command.env("API_CHECK_BEARER", secret);
    }
    let status = command.arg(base_url).kill_on_drop(true).status().await;
    match status {
        Err(e) => ExternalCheck::Unavailable(format!("cannot run {script}: {e}")),
        Ok(s) if s.code() == Some(API_CHECK_UNAVAILABLE) => ExternalCheck::Unavailable(
            "scripts/api-check could not install schemathesis (python3 with venv and pip needed)"
                .into(),
        ),
        Ok(s) => ExternalCheck::Ran {
            passed: s.success(),
            output: format!("scripts/api-check {base_url} exited with {s} (output above)"),
        },
    }
}

/// The secret of the key [`keys_file_per_scope`] writes for `scope`.
pub fn secret_of(scope: crate::auth::Scope) -> String {
    format!("secret-{}", scope.as_str().replace(':', "-"))
}

/// The secret of the key with every scope that [`keys_file_per_scope`] writes too (id
/// `all-key`).
pub const ALL_SCOPES_SECRET: &str = "secret-all-scopes";

/// An HTTP client that sends `Authorization: Bearer <secret>` with every request.
pub fn keyed_client(secret: &str) -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    let value = reqwest::header::HeaderValue::from_str(&format!("Bearer {secret}"))
        .expect("a secret fit for a header");
    headers.insert(reqwest::header::AUTHORIZATION, value);
    reqwest::Client::builder()
        .default_headers(headers)
        .build()
        .expect("an HTTP client")
}

/// Writes `HTTP_API_KEYS_FILE` into `dir` with one key per scope (id `<scope>-key`, secret
/// [`secret_of`]) and one with every scope ([`ALL_SCOPES_SECRET`]), and returns its path.
pub fn keys_file_per_scope(dir: &std::path::Path) -> std::path::PathBuf {
    use crate::auth::{Scope, hash_secret};
    let path = dir.join("api-keys");
    let mut text = String::from("# one key per scope, for tests\n");
    for scope in Scope::ALL {
        let id = format!("{}-key", scope.as_str().replace(':', "-"));
        text.push_str(&format!(
            "{id} {} {scope}\n",
            hash_secret(&secret_of(scope))
        ));
    }
    let all: Vec<&str> = Scope::ALL.iter().map(|s| s.as_str()).collect();
    text.push_str(&format!(
        "all-key {} {}\n",
        hash_secret(ALL_SCOPES_SECRET),
        all.join(",")
    ));
    std::fs::write(&path, text).expect("write the keys file");
    path
}

/// Checks every route of the OpenAPI document served at `base` (keys from
/// [`keys_file_per_scope`]): without a key, 401 `Unauthenticated` with `WWW-Authenticate:
/// Bearer`, unless public; with a key of another scope, 403 `Forbidden`; with its own scope,
/// neither. `scopes` gives each documented path its scope (`None`: public); a documented path
/// missing from it fails, so a new route cannot go out without a decision.
pub async fn assert_every_route_guarded(base: &str, scopes: &[(&str, Option<crate::auth::Scope>)]) {
    use crate::auth::Scope;
    let http = reqwest::Client::new();
    let document: serde_json::Value = http
        .get(format!("{base}/openapi.json"))
        .send()
        .await
        .expect("GET /openapi.json")
        .json()
        .await
        .expect("the OpenAPI document");
    let paths = document["paths"].as_object().expect("paths");
    assert!(!paths.is_empty());
    for (path, operations) in paths {
        let scope = scopes
            .iter()
            .find(|(p, _)| p == path)
            .unwrap_or_else(|| panic!("{path} is documented but has no scope decided"))
            .1;
        let url = format!("{base}{}", path.replace("{id}", "x"));
        for method in operations.as_object().expect("operations").keys() {
            let send = |key: Option<String>| {
                let mut request = match method.as_str() {
                    "post" => http
                        .post(&url)
                        .header("content-type", "application/json")
                        .body("{}"),
                    _ => http.get(&url),
                };
                if let Some(secret) = key {
                    request = request.bearer_auth(secret);
                }
                async move { request.send().await.expect("request") }
            };
            let anonymous = send(None).await;
            let what = format!("{method} {path}");
            match scope {
                None => assert!(
                    !matches!(anonymous.status().as_u16(), 401 | 403),
                    "{what} is public but answered {}",
                    anonymous.status()
                ),
                Some(scope) => {
                    assert_eq!(anonymous.status().as_u16(), 401, "{what} without a key");
                    assert_eq!(
                        anonymous
                            .headers()
                            .get("www-authenticate")
                            .and_then(|v| v.to_str().ok()),
                        Some("Bearer"),
                        "{what}"
                    );
                    let body: serde_json::Value = anonymous.json().await.expect("error body");
                    assert_eq!(body["error"]["code"], "Unauthenticated", "{what}");
                    let other = Scope::ALL
                        .into_iter()
                        .find(|s| *s != scope)
                        .expect("a scope");
                    let wrong = send(Some(secret_of(other))).await;
                    assert_eq!(wrong.status().as_u16(), 403, "{what} with {other}");
                    let body: serde_json::Value = wrong.json().await.expect("error body");
                    assert_eq!(body["error"]["code"], "Forbidden", "{what}");
                    let right = send(Some(secret_of(scope))).await;
                    assert!(
                        !matches!(right.status().as_u16(), 401 | 403),
                        "{what} with {scope} answered {}",
                        right.status()
                    );
                }
            }
        }
    }
}
