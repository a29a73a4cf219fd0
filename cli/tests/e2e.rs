//! End to end: the real `command-service` and `projection-service` binaries as child processes
//! (unique topic prefix, 3 partitions, free ports, a temporary SQLite read model), driven
//! through the `bank` binary exactly as the README's tour does.
//!
//! Needs a broker: `KAFKA_BOOTSTRAP_SERVERS` (see `scripts/test`). The service binaries are
//! built first with `cargo build --bin command-service --bin projection-service` (quick when
//! up to date): integration tests only get their own crate's binaries from cargo.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Once;
use std::time::{Duration, Instant};

use serde_json::Value;
use shared::testing::{kafka_bootstrap, unique_name};

/// How long the services get to become ready (topic creation, group join, catch-up).
const READY_TIMEOUT: Duration = Duration::from_secs(90);
/// How long the projection gets to show a write.
const PROJECTION_DEADLINE: Duration = Duration::from_secs(30);

/// The workspace's `target/<profile>` directory: where this test binary's `deps/` lives.
fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    exe.parent()
        .and_then(Path::parent)
        .expect("test binary lives in target/<profile>/deps")
        .to_path_buf()
}

/// Builds both services once per test run.
fn build_services() {
    static BUILD: Once = Once::new();
    BUILD.call_once(|| {
        let cargo = std::env::var("CARGO")
            .ok()
            .or_else(|| option_env!("CARGO").map(str::to_owned))
            .unwrap_or_else(|| "cargo".to_owned());
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let mut build = Command::new(&cargo);
        build.current_dir(&workspace).args([
            "build",
            "--bin",
            "command-service",
            "--bin",
            "projection-service",
        ]);
        if target_dir().file_name().is_some_and(|p| p == "release") {
            build.arg("--release");
        }
        let status = build
            .status()
            .unwrap_or_else(|e| panic!("cannot run `{cargo} build` for the service binaries: {e}"));
        assert!(
            status.success(),
            "`cargo build --bin command-service --bin projection-service` failed ({status}); \
             build them by hand and rerun"
        );
    });
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// `GET path` on `addr` with a plain HTTP/1.0 request: the status code, if anyone answered.
fn http_status(addr: &str, path: &str) -> Option<u16> {
    let mut stream =
        TcpStream::connect_timeout(&addr.parse().ok()?, Duration::from_secs(1)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).ok()?;
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}

/// `GET path` on the base URL `http://host:port`: the body, if anyone answered.
fn http_get(base: &str, path: &str) -> Option<String> {
    let addr = base.strip_prefix("http://")?;
    let mut stream =
        TcpStream::connect_timeout(&addr.parse().ok()?, Duration::from_secs(1)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
}

/// The two services, killed when dropped (their logs are shown if the test failed).
struct Services {
    children: Vec<(&'static str, Child, PathBuf)>,
    bootstrap: String,
    prefix: String,
    /// Extra environment of every `bank` run (a secured Kafka's settings).
    cli_env: Vec<(&'static str, String)>,
    projection_url: String,
    _dir: tempfile::TempDir,
}

impl Services {
    fn start() -> Services {
        Services::start_with(&[])
    }

    /// [`Services::start`] with extra environment variables for both services.
    fn start_with(env: &[(&'static str, String)]) -> Services {
        Services::start_on(&kafka_bootstrap(), &unique_name("e2e"), |_| env.to_vec())
    }

    /// Both services on the brokers at `bootstrap`, on the topics of `prefix`, each with the
    /// extra environment `env_of(its name)`.
    fn start_on(
        bootstrap: &str,
        prefix: &str,
        env_of: impl Fn(&str) -> Vec<(&'static str, String)>,
    ) -> Services {
        let (bootstrap, prefix) = (bootstrap.to_owned(), prefix.to_owned());
        let build = Instant::now();
        build_services();
        eprintln!("service binaries built in {:?}", build.elapsed());
        let dir = tempfile::tempdir().expect("temp dir");
        let command_addr = format!("127.0.0.1:{}", free_port());
        let projection_addr = format!("127.0.0.1:{}", free_port());
        let database = format!("sqlite://{}", dir.path().join("projection.db").display());
        let mut services = Services {
            children: Vec::new(),
            bootstrap: bootstrap.clone(),
            prefix: prefix.clone(),
            projection_url: format!("http://{projection_addr}"),
            cli_env: Vec::new(),
            _dir: dir,
        };
        for name in ["command-service", "projection-service"] {
            let log = services._dir.path().join(format!("{name}.log"));
            let out = std::fs::File::create(&log).expect("log file");
            let err = out.try_clone().expect("log file");
            let binary = target_dir().join(name);
            let child = Command::new(&binary)
                .env("KAFKA_BOOTSTRAP_SERVERS", &bootstrap)
                .env("TOPIC_PREFIX", &prefix)
                .env("PARTITIONS", "3")
                .env("COMMAND_HTTP_ADDR", &command_addr)
                .env("PROJECTION_HTTP_ADDR", &projection_addr)
                .env("PROJECTION_DATABASE_URL", &database)
                .env("INSTANCE_ID", unique_name("e2e-command-service"))
                .env("RUST_LOG", "info,rdkafka=warn")
                .env("NO_COLOR", "1")
                .envs(env_of(name))
                .stdin(Stdio::null())
                .stdout(out)
                .stderr(err)
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.display()));
            services.children.push((name, child, log));
        }
        let started = Instant::now();
        let deadline = started + READY_TIMEOUT;
        for (name, addr) in [
            ("command-service", &command_addr),
            ("projection-service", &projection_addr),
        ] {
            while http_status(addr, "/ready") != Some(200) {
                services.assert_running();
                assert!(
                    Instant::now() < deadline,
                    "{name} at {addr} not ready within {READY_TIMEOUT:?}"
                );
                std::thread::sleep(Duration::from_millis(200));
            }
            eprintln!("{name} ready after {:?}", started.elapsed());
        }
        services
    }

    fn assert_running(&mut self) {
        for (name, child, _) in &mut self.children {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("{name} exited early: {status}");
            }
        }
    }

    /// A `bank` process with this system's settings, not started yet.
    fn bank_command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_bank"));
        command
            .args(args)
            .env("KAFKA_BOOTSTRAP_SERVERS", &self.bootstrap)
            .env("TOPIC_PREFIX", &self.prefix)
            .env("PROJECTION_URL", &self.projection_url)
            .envs(self.cli_env.iter().cloned())
            .env_remove("RUST_LOG")
            .stdin(Stdio::null());
        command
    }

    /// Runs `bank` with this system's settings (flags given in `args` win).
    fn bank(&self, args: &[&str]) -> Run {
        let started = Instant::now();
        let output = self.bank_command(args).output().expect("run bank");
        let run = Run::new(args, output, started.elapsed());
        eprintln!("bank {} -> {} in {:?}", run.args, run.code, run.took);
        run
    }

    /// `bank get ID --json` until the projection shows `version`.
    fn wait_for_version(&self, id: &str, version: u64) -> Value {
        let deadline = Instant::now() + PROJECTION_DEADLINE;
        loop {
            let run = self.bank(&["get", id, "--json"]);
            if run.code == 0 {
                let account = run.json();
                if account["version"].as_u64() >= Some(version) {
                    return account;
                }
            } else {
                assert_eq!(run.code, 1, "{run}"); // 404 until the open is projected
            }
            assert!(
                Instant::now() < deadline,
                "the projection did not reach {id} version {version} in {PROJECTION_DEADLINE:?}: {run}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Services {
    fn drop(&mut self) {
        for (name, child, log) in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
            if std::thread::panicking() {
                let text = std::fs::read_to_string(&*log).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(40).collect();
                eprintln!("---- last lines of {name}'s log ----");
                tail.iter().rev().for_each(|l| eprintln!("{l}"));
            }
        }
    }
}

/// One `bank` run.
struct Run {
    args: String,
    code: i32,
    stdout: String,
    stderr: String,
    took: Duration,
}

impl Run {
    fn new(args: &[&str], output: Output, took: Duration) -> Run {
        Run {
            args: args.join(" "),
            code: output.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
            took,
        }
    }

    #[track_caller]
    fn expect(self, code: i32) -> Run {
        assert_eq!(self.code, code, "{self}");
        self
    }

    #[track_caller]
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {self}"))
    }
}

impl std::fmt::Display for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "`bank {}` exited {} after {:?}\n--- stdout ---\n{}--- stderr ---\n{}",
            self.args, self.code, self.took, self.stdout, self.stderr
        )
    }
}

#[test]
fn the_readme_tour_works_end_to_end() {
    let system = Services::start();
    let bank = |args: &[&str]| system.bank(args);

    // Commands over Kafka.
    let open = bank(&[
        "open",
        "acc-1",
        "--owner",
        "Alice",
        "--currency",
        "EUR",
        "--initial",
        "100.00",
    ])
    .expect(0);
    assert_eq!(
        open.stdout.trim(),
        "accepted: acc-1 is at version 1",
        "{open}"
    );
    let deposit = bank(&["deposit", "acc-1", "50.25"]).expect(0);
    assert_eq!(
        deposit.stdout.trim(),
        "accepted: acc-1 is at version 2",
        "{deposit}"
    );
    let overdraft = bank(&["withdraw", "acc-1", "1000"]).expect(1);
    assert!(
        overdraft.stderr.contains("InsufficientFunds"),
        "{overdraft}"
    );
    assert!(overdraft.stderr.starts_with("error: "), "{overdraft}");
    let overdraft = bank(&["withdraw", "acc-1", "1000", "--json"]).expect(1);
    assert_eq!(
        overdraft.json()["error"]["code"],
        "InsufficientFunds",
        "{overdraft}"
    );

    // Queries over HTTP, once the projection has caught up.
    let account = system.wait_for_version("acc-1", 2);
    assert_eq!(account["balance"], "150.25");
    assert_eq!(account["balance_minor"], 15025);
    let get = bank(&["get", "acc-1"]).expect(0);
    assert!(get.stdout.contains("balance:      150.25 EUR"), "{get}");
    assert!(get.stdout.contains("owner:        Alice"), "{get}");
    assert!(get.stdout.contains("version:      2"), "{get}");

    let history = bank(&["history", "acc-1"]).expect(0);
    assert_eq!(
        history.stdout.lines().count(),
        3,
        "header and two events: {history}"
    );
    assert!(history.stdout.contains("AccountOpened"), "{history}");
    assert!(
        history.stdout.contains("50.25 EUR  150.25 EUR"),
        "{history}"
    );
    let events = bank(&["history", "acc-1", "--json"]).expect(0).json();
    let events = events.as_array().expect("an array of events");
    assert_eq!(events.len(), 2);
    let time = |i: usize| {
        chrono::DateTime::parse_from_rfc3339(events[i]["timestamp"].as_str().expect("timestamp"))
            .expect("RFC 3339 timestamp")
    };
    let between = time(0) + (time(1) - time(0)) / 2;
    assert!(time(0) < between && between < time(1), "events {events:?}");
    let as_of = bank(&["get", "acc-1", "--as-of", &between.to_rfc3339()]).expect(0);
    assert!(as_of.stdout.contains("balance:      100.00 EUR"), "{as_of}");
    let v1 = bank(&["get", "acc-1", "--version", "1", "--json"])
        .expect(0)
        .json();
    assert_eq!(
        (v1["version"].as_u64(), v1["balance"].as_str()),
        (Some(1), Some("100.00"))
    );

    let list = bank(&["list"]).expect(0);
    assert!(
        list.stdout
            .lines()
            .any(|l| l.starts_with("acc-1  Alice  active")),
        "{list}"
    );
    let page = bank(&["list", "--status", "active", "--json"])
        .expect(0)
        .json();
    assert!(
        page["accounts"]
            .as_array()
            .is_some_and(|a| a.iter().any(|x| x["id"] == "acc-1"))
    );

    let close = bank(&["close", "acc-1"]).expect(1);
    assert!(close.stderr.contains("NonZeroBalance"), "{close}");

    // A bad amount is refused before anything is sent: the next deposit is version 3.
    let bad = bank(&["deposit", "acc-1", "12.345"]).expect(2);
    assert!(bad.stderr.contains("more than 2 decimal places"), "{bad}");
    let next = bank(&["deposit", "acc-1", "1", "--json"]).expect(0).json();
    assert_eq!(
        (next["status"].as_str(), next["version"].as_u64()),
        (Some("accepted"), Some(3))
    );

    let unknown = bank(&["get", "no-such-account"]).expect(1);
    assert!(unknown.stderr.contains("no-such-account"), "{unknown}");

    // Unreachable services: exit 3, naming the address, in bounded time.
    let no_projection = bank(&["get", "acc-1", "--projection-url", "http://127.0.0.1:1"]).expect(3);
    assert!(
        no_projection
            .stderr
            .contains("cannot reach the projection at http://127.0.0.1:1"),
        "{no_projection}"
    );
    let no_kafka = bank(&[
        "deposit",
        "acc-1",
        "1",
        "--bootstrap-servers",
        "127.0.0.1:1",
    ])
    .expect(3);
    assert!(
        no_kafka
            .stderr
            .contains("cannot reach Kafka at 127.0.0.1:1"),
        "{no_kafka}"
    );
    assert!(no_kafka.took < Duration::from_secs(10), "{no_kafka}");

    // A small workload, all answered.
    let load = bank(&["load", "--accounts", "5", "--ops", "50", "--seed", "1"]).expect(0);
    assert!(load.stdout.starts_with("55 commands in "), "{load}");
    let summary = bank(&["load", "--accounts", "3", "--ops", "20", "--json"])
        .expect(0)
        .json();
    assert_eq!(summary["commands"], 23);
}

#[test]
fn money_commands_carry_their_currency_and_never_guess_its_decimals() {
    let system = Services::start();
    let bank = |args: &[&str]| system.bank(args);
    for (id, currency, initial) in [
        ("cur-jpy", "JPY", "1000"),
        ("cur-eur", "EUR", "10.00"),
        ("cur-kwd", "KWD", "1.000"),
    ] {
        bank(&[
            "open",
            id,
            "--owner",
            "Kim",
            "--currency",
            currency,
            "--initial",
            initial,
        ])
        .expect(0);
    }
    // Right after the open, the currency is learned (the projection is waited for): the amount
    // is read in the account's own decimals.
    bank(&["deposit", "cur-jpy", "500"]).expect(0);
    bank(&["deposit", "cur-eur", "5.25"]).expect(0);
    bank(&["withdraw", "cur-kwd", "0.5"]).expect(0);
    assert_eq!(system.wait_for_version("cur-jpy", 2)["balance_minor"], 1500);
    assert_eq!(system.wait_for_version("cur-eur", 2)["balance_minor"], 1525);
    assert_eq!(system.wait_for_version("cur-kwd", 2)["balance_minor"], 500);

    // A currency that is not the account's is refused by the aggregate: nothing is booked.
    let mismatch = bank(&["deposit", "cur-jpy", "5", "--currency", "EUR", "--json"]).expect(1);
    assert_eq!(
        mismatch.json()["error"]["code"],
        "CurrencyMismatch",
        "{mismatch}"
    );

    // The projection cannot be asked: refused before anything is sent, naming --currency.
    let unknown = bank(&[
        "deposit",
        "cur-jpy",
        "500",
        "--projection-url",
        "http://127.0.0.1:1",
    ])
    .expect(2);
    assert!(unknown.stderr.contains("--currency"), "{unknown}");
    let unknown = bank(&[
        "withdraw",
        "cur-kwd",
        "1.5",
        "--projection-url",
        "http://127.0.0.1:1",
    ])
    .expect(2);
    assert!(unknown.stderr.contains("--currency"), "{unknown}");
    // An account the projection does not know: the same.
    let missing = bank(&["deposit", "cur-none", "5"]).expect(2);
    assert!(missing.stderr.contains("--currency"), "{missing}");
    // With --currency it is sent whatever the projection knows.
    bank(&[
        "deposit",
        "cur-kwd",
        "1.5",
        "--currency",
        "KWD",
        "--projection-url",
        "http://127.0.0.1:1",
    ])
    .expect(0);
    let kwd = system.wait_for_version("cur-kwd", 3);
    assert_eq!(kwd["balance_minor"], 2000, "{kwd}");
    let jpy = bank(&["get", "cur-jpy", "--json"]).expect(0).json();
    assert_eq!(
        (jpy["version"].as_u64(), jpy["balance_minor"].as_i64()),
        (Some(2), Some(1500)),
        "neither the mismatch nor the refused commands booked anything: {jpy}"
    );
}

#[test]
fn transfers_wait_for_their_end_and_fail_with_their_reason() {
    let system = Services::start();
    let bank = |args: &[&str]| system.bank(args);
    for (id, currency, initial) in [
        ("tr-eur-a", "EUR", "100.00"),
        ("tr-eur-b", "EUR", "0"),
        ("tr-jpy", "JPY", "1000"),
    ] {
        bank(&[
            "open",
            id,
            "--owner",
            "Kim",
            "--currency",
            currency,
            "--initial",
            initial,
        ])
        .expect(0);
    }
    // Waits for the end: completed, the amount read in the source's decimals.
    let done = bank(&[
        "transfer", "tr-eur-a", "tr-eur-b", "12.50", "--id", "xfer-1",
    ])
    .expect(0);
    assert!(done.stdout.contains("completed"), "{done}");
    assert_eq!(
        system.wait_for_version("tr-eur-b", 2)["balance_minor"],
        1250
    );
    // The same id again is the same transfer: nothing moves twice.
    let again = bank(&[
        "transfer", "tr-eur-a", "tr-eur-b", "12.50", "--id", "xfer-1",
    ])
    .expect(0);
    assert!(again.stdout.contains("completed"), "{again}");
    // The id of another transfer is refused.
    let other_id = bank(&["transfer", "tr-eur-a", "tr-eur-b", "3", "--id", "xfer-1"]).expect(1);
    assert!(other_id.stderr.contains("TransferExists"), "{other_id}");
    // Failures exit 1 with their reason, and move nothing.
    let poor = bank(&["transfer", "tr-eur-b", "tr-eur-a", "500"]).expect(1);
    assert!(poor.stderr.contains("InsufficientFunds"), "{poor}");
    let other = bank(&["transfer", "tr-eur-a", "tr-jpy", "1", "--json"]).expect(1);
    assert_eq!(other.json()["reason"], "CurrencyMismatch", "{other}");
    let nobody = bank(&["transfer", "tr-eur-a", "tr-nobody", "1"]).expect(1);
    assert!(nobody.stderr.contains("AccountNotFound"), "{nobody}");
    // Refused at once: the same account, or a source whose currency cannot be learned.
    bank(&["transfer", "tr-eur-a", "tr-eur-a", "1"]).expect(2);
    let unknown = bank(&["transfer", "tr-none", "tr-eur-a", "1"]).expect(2);
    assert!(unknown.stderr.contains("--currency"), "{unknown}");
    // --no-wait returns once started; the list shows every transfer of the account.
    bank(&[
        "transfer",
        "tr-eur-a",
        "tr-eur-b",
        "1",
        "--id",
        "xfer-late",
        "--no-wait",
    ])
    .expect(0);
    let deadline = Instant::now() + PROJECTION_DEADLINE;
    loop {
        let list = bank(&["transfers", "tr-eur-a", "--json"]).expect(0).json();
        let transfers = list["transfers"].as_array().unwrap();
        let late = transfers.iter().find(|t| t["transfer_id"] == "xfer-late");
        if late.is_some_and(|t| t["status"] == "completed") {
            // Two out of it that failed, the one into it that failed, and two that completed.
            assert_eq!(transfers.len(), 5, "{list}");
            assert_eq!(
                transfers[0]["transfer_id"], "xfer-late",
                "newest first: {list}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "tr-late did not complete: {list}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let text = bank(&["transfers", "tr-eur-a"]).expect(0);
    assert!(
        text.stdout.contains("xfer-1") && text.stdout.contains("out"),
        "{text}"
    );
    // Opened, 2 events per transfer out (debit, then settle or refund) for 4 transfers.
    let a = system.wait_for_version("tr-eur-a", 9);
    assert_eq!(a["balance_minor"], 10_000 - 1250 - 100, "{a}");
}

/// No services needed: the amount is refused before Kafka is even contacted (the broker address
/// is unreachable, and the answer is 2, not 3).
#[test]
fn bad_input_is_refused_before_sending() {
    let bank = |args: &[&str]| {
        let started = Instant::now();
        let output = Command::new(env!("CARGO_BIN_EXE_bank"))
            .args(args)
            .args([
                "--bootstrap-servers",
                "127.0.0.1:1",
                "--projection-url",
                "http://127.0.0.1:1",
            ])
            .output()
            .expect("run bank");
        Run::new(args, output, started.elapsed())
    };
    for (args, message) in [
        (
            &["deposit", "acc-1", "12.345", "--currency", "EUR"][..],
            "more than 2 decimal places",
        ),
        (&["withdraw", "acc-1", "abc"][..], "is not a number"),
        (
            &["deposit", "acc-1", "1e3", "--currency", "EUR"][..],
            "exponent",
        ),
        (&["get", ".."][..], "dot"),
        (&["history", "."][..], "dot"),
        (&["deposit", "acc-1", "0"][..], "more than zero"),
        (
            &["withdraw", "acc-1", "-5", "--currency", "USD"][..],
            "more than zero",
        ),
        (
            &["open", "acc-1", "--owner", "A", "--initial", "-1"][..],
            "must not be negative",
        ),
        (
            &["open", "acc-1", "--owner", "A", "--currency", "euro"][..],
            "ISO 4217",
        ),
        (
            &[
                "open",
                "jpy-1",
                "--owner",
                "A",
                "--currency",
                "JPY",
                "--initial",
                "1.5",
            ][..],
            "JPY",
        ),
        (&["get", "acc-1", "--as-of", "yesterday"][..], "RFC 3339"),
    ] {
        let run = bank(args).expect(2);
        assert!(run.stderr.contains(message), "{run}");
        assert_eq!(run.stderr.lines().count(), 1, "one line: {run}");
        assert!(run.took < Duration::from_secs(3), "{run}");
    }
    // clap's own usage errors exit 2 too.
    bank(&["open", "acc-1"]).expect(2);
    bank(&["frobnicate"]).expect(2);
}

/// A producer for the test's own records (plain, idempotent, acks=all).
fn producer(bootstrap: &str) -> rdkafka::producer::FutureProducer {
    rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .create()
        .expect("a producer")
}

/// Produces one record and returns its (partition, offset).
fn produce(
    producer: &rdkafka::producer::FutureProducer,
    topic: &str,
    partition: i32,
    key: &[u8],
    payload: &[u8],
    headers: rdkafka::message::OwnedHeaders,
) -> (i32, i64) {
    let record = rdkafka::producer::FutureRecord::to(topic)
        .partition(partition)
        .key(key)
        .payload(payload)
        .headers(headers);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let delivered = runtime
        .block_on(producer.send(record, Duration::from_secs(30)))
        .unwrap_or_else(|(e, _)| panic!("cannot produce to {topic}: {e}"));
    (delivered.partition, delivered.offset)
}

/// The headers of a message as (name, bytes) pairs, in order.
fn header_pairs<M: rdkafka::Message>(m: &M) -> Vec<(String, Option<Vec<u8>>)> {
    use rdkafka::message::Headers;
    m.headers()
        .map(|h| {
            h.iter()
                .map(|h| (h.key.to_owned(), h.value.map(<[u8]>::to_vec)))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn dead_letters_are_listed_and_replayed_once_their_cause_is_fixed() {
    use rdkafka::message::{Header, OwnedHeaders};
    use shared::dlq::header as dlq;
    use shared::kafka::{TopicReader, canonical_partition};

    let system = Services::start();
    let events = format!("{}.events", system.prefix);
    let dead_letters = format!("{}.events.dlq", system.prefix);
    let producer = producer(&system.bootstrap);

    // A poison message: the projection dead-letters it (neither JSON nor the wire format).
    let poison_partition = canonical_partition(b"poison-1", 3);
    let (_, poison_offset) = produce(
        &producer,
        &events,
        poison_partition,
        b"poison-1",
        b"not an event",
        OwnedHeaders::new().insert(Header {
            key: "event_type",
            value: Some("AccountOpened"),
        }),
    );
    let deadline = Instant::now() + PROJECTION_DEADLINE;
    let listed = loop {
        // Until the projection has dead-lettered it (a failed read is retried too).
        let run = system.bank(&["dlq", "list", "--json"]);
        let letters = match run.code {
            0 => run.json()["dead_letters"]
                .as_array()
                .cloned()
                .unwrap_or_default(),
            _ => Vec::new(),
        };
        if let Some(letter) = letters.into_iter().find(|l| l["key"] == "poison-1") {
            break letter;
        }
        assert!(
            Instant::now() < deadline,
            "the poison message was not dead-lettered in {PROJECTION_DEADLINE:?}: {run}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(listed["code"], "UnknownFormat", "{listed}");
    // The dashboard's dead-letter count (a gauge the projection refreshes every 2 s).
    let gauge = format!("projection_dead_letters{{topic=\"{events}\"}} 1");
    let deadline = Instant::now() + PROJECTION_DEADLINE;
    loop {
        let metrics = http_get(&system.projection_url, "/metrics").unwrap_or_default();
        if metrics.lines().any(|l| l == gauge) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no `{gauge}` in /metrics:\n{metrics}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(listed["original_topic"], events.as_str(), "{listed}");
    assert_eq!(listed["original_partition"], poison_partition, "{listed}");
    assert_eq!(listed["original_offset"], poison_offset, "{listed}");
    let poison_id = listed["id"].as_str().expect("an id").to_owned();
    let table = system.bank(&["dlq", "list"]).expect(0);
    let row = table
        .stdout
        .lines()
        .find(|l| l.contains("poison-1"))
        .unwrap_or_else(|| panic!("no row for poison-1: {table}"));
    assert!(row.starts_with(&poison_id), "{table}");
    assert!(row.contains("UnknownFormat"), "{table}");
    assert!(
        row.contains(&format!("{poison_partition}:{poison_offset}")),
        "{table}"
    );

    // Its cause is not fixed: replaying it is refused and nothing is sent.
    let refused = system
        .bank(&["dlq", "replay", "--id", &poison_id])
        .expect(1);
    assert!(
        refused.stderr.contains("held back") && refused.stderr.contains("UnknownFormat"),
        "{refused}"
    );
    assert!(!refused.stdout.contains("replayed"), "{refused}");

    // A dead letter whose cause is gone (say, a schema since registered): a valid event, with
    // its original headers, dead-lettered from a partition other than its key's.
    let home = canonical_partition(b"fixed-1", 3);
    let event = shared::EventEnvelope::new(
        "fixed-1",
        1,
        &shared::Event::AccountOpened {
            owner: "Fay".into(),
            currency: "EUR".into(),
            initial_balance_minor: 700,
        },
        chrono::Utc::now(),
        Default::default(),
    );
    let bytes = serde_json::to_vec(&event).expect("json");
    let original = shared::codec::event_headers(&event);
    let original_pairs: Vec<(String, Option<Vec<u8>>)> = {
        use rdkafka::message::Headers;
        original
            .iter()
            .map(|h| (h.key.to_owned(), h.value.map(<[u8]>::to_vec)))
            .collect()
    };
    let mut letter_headers = original.clone();
    let elsewhere = ((home + 1) % 3).to_string();
    for (key, value) in [
        (dlq::ORIGINAL_TOPIC, events.as_str()),
        (dlq::ORIGINAL_PARTITION, elsewhere.as_str()),
        (dlq::ORIGINAL_OFFSET, "0"),
        (dlq::ERROR_CODE, "SchemaRegistry"),
        (dlq::ERROR_MESSAGE, "schema id 99: not found"),
    ] {
        letter_headers = letter_headers.insert(Header {
            key,
            value: Some(value),
        });
    }
    let (p, o) = produce(
        &producer,
        &dead_letters,
        0,
        b"fixed-1",
        &bytes,
        letter_headers,
    );
    let fixed_id = format!("{p}:{o}");

    // --all replays what now decodes, holds the poison back (exit 1).
    let replay = system.bank(&["dlq", "replay", "--all"]).expect(1);
    assert!(
        replay.stdout.contains(&format!(
            "replayed {fixed_id} (key fixed-1) to {events} partition {home}"
        )),
        "{replay}"
    );
    assert!(replay.stderr.contains(&poison_id), "{replay}");

    // It is back on its key's partition, byte for byte, with its original headers only.
    let settings = shared::config::KafkaSettings {
        bootstrap_servers: system.bootstrap.clone(),
        passthrough: Vec::new(),
    };
    let mut found = Vec::new();
    TopicReader::open(&settings, &unique_name("e2e-check"), &events, &[home])
        .expect("a reader")
        .drain(|m| {
            use rdkafka::Message;
            if m.key() == Some(&b"fixed-1"[..]) {
                found.push((m.payload().map(<[u8]>::to_vec), header_pairs(m)));
            }
        });
    assert_eq!(found.len(), 1, "fixed-1 in partition {home}: {found:?}");
    assert_eq!(found[0].0.as_deref(), Some(bytes.as_slice()));
    assert_eq!(found[0].1, original_pairs);

    // The projection takes it this time; the poison stays a dead letter and was not resent.
    let account = system.wait_for_version("fixed-1", 1);
    assert_eq!(account["owner"], "Fay");
    let mut poison_copies = 0;
    TopicReader::open(
        &settings,
        &unique_name("e2e-check"),
        &events,
        &[poison_partition],
    )
    .expect("a reader")
    .drain(|m| {
        use rdkafka::Message;
        poison_copies += usize::from(m.key() == Some(&b"poison-1"[..]));
    });
    assert_eq!(poison_copies, 1, "the poison message was replayed");
}

#[test]
fn watch_prints_events_as_they_commit() {
    use std::io::{BufRead, BufReader};

    let system = Services::start();
    let mut watch = system
        .bank_command(&["watch", "w-1", "--json", "--max-events", "1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start bank watch");
    // Wait until it listens (its first stderr line), then commit events.
    let mut stderr = BufReader::new(watch.stderr.take().expect("stderr"));
    let mut first = String::new();
    stderr.read_line(&mut first).expect("read stderr");
    assert!(first.starts_with("watching "), "bank watch said: {first}");
    let started = Instant::now();
    system
        .bank(&["open", "w-other", "--owner", "Otto"])
        .expect(0);
    system
        .bank(&["open", "w-1", "--owner", "Wanda", "--initial", "5"])
        .expect(0);
    let deadline = Instant::now() + PROJECTION_DEADLINE;
    let status = loop {
        if let Some(status) = watch.try_wait().expect("wait for bank watch") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = watch.kill();
            panic!("bank watch did not print w-1's event within {PROJECTION_DEADLINE:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    eprintln!("bank watch saw the event after {:?}", started.elapsed());
    let mut out = String::new();
    watch
        .stdout
        .take()
        .expect("stdout")
        .read_to_string(&mut out)
        .expect("read stdout");
    assert!(status.success(), "bank watch exited {status}: {out}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "one event expected (w-other filtered out): {out}"
    );
    let event: Value = serde_json::from_str(lines[0]).expect("a JSON envelope per line");
    assert_eq!(event["aggregate_id"], "w-1");
    assert_eq!(event["event_type"], "AccountOpened");
    assert_eq!(event["version"], 1);
    assert_eq!(event["data"]["owner"], "Wanda");
}

/// The trace id of a message's `traceparent` header, and its span id.
fn traceparent_of<M: rdkafka::Message>(m: &M) -> Option<(String, String)> {
    let header = shared::codec::header_str(m.headers(), shared::trace::TRACEPARENT)?;
    let trace = shared::trace::TraceContext::parse(header)?;
    Some((trace.trace_id_hex(), trace.span_id_hex()))
}

/// Every message of `topic` (all 3 partitions) whose key is `key`, with its `traceparent`.
fn traced_messages(
    system: &Services,
    topic: &str,
    wanted: impl Fn(&rdkafka::message::BorrowedMessage<'_>) -> bool,
) -> Vec<Option<(String, String)>> {
    let settings = shared::config::KafkaSettings {
        bootstrap_servers: system.bootstrap.clone(),
        passthrough: Vec::new(),
    };
    let mut found = Vec::new();
    shared::kafka::TopicReader::open(&settings, &unique_name("e2e-trace"), topic, &[0, 1, 2])
        .expect("a reader")
        .drain(|m| {
            if wanted(m) {
                found.push(traceparent_of(m));
            }
        });
    found
}

#[test]
fn one_trace_from_the_command_to_the_projection() {
    use rdkafka::Message;

    let system = Services::start();
    let trace_id = uuid::Uuid::new_v4().simple().to_string();
    let caller_span = "00f067aa0ba902b7";
    let output = system
        .bank_command(&["open", "tr-1", "--owner", "Tess"])
        .env("TRACEPARENT", format!("00-{trace_id}-{caller_span}-01"))
        .output()
        .expect("run bank");
    assert!(output.status.success(), "{output:?}");

    let is_tr1 = |m: &rdkafka::message::BorrowedMessage<'_>| m.key() == Some(&b"tr-1"[..]);
    let commands = traced_messages(&system, &format!("{}.commands", system.prefix), is_tr1);
    let events = traced_messages(&system, &format!("{}.events", system.prefix), is_tr1);
    let results = traced_messages(
        &system,
        &format!("{}.command-results", system.prefix),
        |m| {
            m.payload()
                .and_then(|p| serde_json::from_slice::<Value>(p).ok())
                .is_some_and(|r| r["aggregate_id"] == "tr-1")
        },
    );
    for (what, found) in [
        ("command", &commands),
        ("event", &events),
        ("result", &results),
    ] {
        assert_eq!(found.len(), 1, "one {what} record: {found:?}");
        let (trace, span) = found[0]
            .clone()
            .unwrap_or_else(|| panic!("no traceparent on the {what}"));
        assert_eq!(trace, trace_id, "the {what} is in the caller's trace");
        assert_ne!(span, caller_span, "the {what} is a span of its own");
    }

    // The projection applied it in that trace, and keeps the trace id with the event's metadata.
    system.wait_for_version("tr-1", 1);
    let history = system.bank(&["history", "tr-1", "--json"]).expect(0).json();
    let metadata = &history[0]["metadata"];
    assert_eq!(metadata["trace_id"], trace_id.as_str(), "{history}");
    assert!(metadata["correlation_id"].is_string(), "{history}");
    assert!(metadata["causation_id"].is_string(), "{history}");
}

/// The (path, body) of every request a collector received.
type Received = std::sync::Arc<std::sync::Mutex<Vec<(String, Vec<u8>)>>>;

/// A minimal OTLP/HTTP collector: accepts requests (keep-alive), answers 200 and keeps each
/// request's path and body.
fn otlp_collector() -> (String, Received) {
    use std::io::{BufRead, BufReader};
    use std::sync::Arc;

    let listener = TcpListener::bind("127.0.0.1:0").expect("a port");
    let url = format!("http://{}", listener.local_addr().expect("its address"));
    let received: Received = Arc::default();
    let store = Arc::clone(&received);
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let store = Arc::clone(&store);
            std::thread::spawn(move || {
                let mut writer = stream.try_clone().expect("a clone");
                let mut reader = BufReader::new(stream);
                loop {
                    let mut request_line = String::new();
                    if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
                        return;
                    }
                    let path = request_line.split(' ').nth(1).unwrap_or("").to_owned();
                    let mut length = 0usize;
                    loop {
                        let mut line = String::new();
                        if reader.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        let line = line.trim_end();
                        if line.is_empty() {
                            break;
                        }
                        if let Some((name, value)) = line.split_once(':')
                            && name.eq_ignore_ascii_case("content-length")
                        {
                            length = value.trim().parse().unwrap_or(0);
                        }
                    }
                    let mut body = vec![0; length];
                    if reader.read_exact(&mut body).is_err() {
                        return;
                    }
                    store.lock().expect("the store").push((path, body));
                    let ok = "HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n";
                    if writer.write_all(ok.as_bytes()).is_err() {
                        return;
                    }
                }
            });
        }
    });
    (url, received)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn spans_are_exported_over_otlp_in_the_commands_trace() {
    let (endpoint, received) = otlp_collector();
    let system = Services::start_with(&[
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint),
        ("OTEL_BSP_SCHEDULE_DELAY", "200".to_owned()),
    ]);
    let trace = shared::trace::TraceContext::new_root();
    let output = system
        .bank_command(&["open", "otel-1", "--owner", "Olga"])
        .env("TRACEPARENT", trace.to_header())
        .output()
        .expect("run bank");
    assert!(output.status.success(), "{output:?}");
    system.wait_for_version("otel-1", 1);

    // Both services export spans of the command's trace: command-service's `command` span and
    // the projection's `apply_event` span (raw trace id bytes and names inside the protobuf).
    let deadline = Instant::now() + PROJECTION_DEADLINE;
    loop {
        let bodies = received.lock().expect("the store").clone();
        let in_trace = |service: &str, span: &str| {
            // A span's name is field 5 of the OTLP `Span` message: tag 0x2a, length, bytes.
            let mut name = vec![0x2a, span.len() as u8];
            name.extend_from_slice(span.as_bytes());
            bodies.iter().any(|(path, body)| {
                path == "/v1/traces"
                    && contains(body, &trace.trace_id())
                    && contains(body, service.as_bytes())
                    && contains(body, &name)
            })
        };
        if in_trace("command-service", "command") && in_trace("projection-service", "apply_event") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no exported spans of trace {} from both services within {PROJECTION_DEADLINE:?} \
             ({} OTLP requests: {:?})",
            trace.trace_id_hex(),
            bodies.len(),
            bodies
                .iter()
                .map(|(p, b)| (p.clone(), b.len()))
                .collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The settings of SCRAM user `user` of the test broker's secured listener, its password read
/// from the file `scripts/kafka` wrote (never from the environment).
fn scram_env(bootstrap: &str, secrets: &Path, user: &str) -> Vec<(&'static str, String)> {
    vec![
        ("KAFKA_BOOTSTRAP_SERVERS", bootstrap.to_owned()),
        ("KAFKA_SECURITY_PROTOCOL", "SASL_PLAINTEXT".to_owned()),
        ("KAFKA_SASL_MECHANISM", "SCRAM-SHA-512".to_owned()),
        ("KAFKA_SASL_USERNAME", user.to_owned()),
        (
            "KAFKA_SASL_PASSWORD_FILE",
            secrets
                .join(format!("{user}.password"))
                .display()
                .to_string(),
        ),
    ]
}

/// The SCRAM user each service runs as (scripts/kafka creates them).
fn scram_user_of(service: &str) -> &'static str {
    match service {
        "command-service" => "bank-command",
        _ => "bank-projection",
    }
}

/// Grants the ACLs of prefix `prefix` with `scripts/kafka acls`: exactly what README's Security
/// section lists, so this tests the documented least privilege.
fn grant_acls(prefix: &str) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/kafka");
    let output = Command::new(&script)
        .args(["acls", prefix])
        .stdin(Stdio::null())
        .output()
        .expect("run scripts/kafka acls");
    assert!(
        output.status.success(),
        "scripts/kafka acls {prefix} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A producer of `user` on the secured listener, acknowledging every write.
fn scram_producer(
    bootstrap: &str,
    secrets: &Path,
    user: &str,
) -> rdkafka::producer::FutureProducer {
    let password =
        std::fs::read_to_string(secrets.join(format!("{user}.password"))).expect("password file");
    rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("security.protocol", "SASL_PLAINTEXT")
        .set("sasl.mechanism", "SCRAM-SHA-512")
        .set("sasl.username", user)
        .set("sasl.password", password.trim_end())
        .set("message.timeout.ms", "10000")
        .create()
        .expect("producer")
}

/// Sends one record to `topic` as `producer`; Kafka's error code if it is refused.
fn try_append(
    producer: &rdkafka::producer::FutureProducer,
    topic: &str,
) -> Result<(), rdkafka::types::RDKafkaErrorCode> {
    let record = rdkafka::producer::FutureRecord::to(topic)
        .key("intruder")
        .payload("{}");
    let sent = tokio::runtime::Runtime::new()
        .expect("runtime")
        .block_on(producer.send(record, Duration::from_secs(10)));
    match sent {
        Ok(_) => Ok(()),
        Err((e, _)) => Err(e.rdkafka_error_code().expect("a broker error code")),
    }
}

#[test]
fn a_secured_kafka_serves_least_privilege_principals_with_passwords_from_files() {
    let Some((bootstrap, secrets)) = shared::testing::sasl_kafka() else {
        return;
    };
    let prefix = unique_name("e2e-sasl");
    grant_acls(&prefix);
    let mut system = Services::start_on(&bootstrap, &prefix, |service| {
        scram_env(&bootstrap, &secrets, scram_user_of(service))
    });
    system.cli_env = scram_env(&bootstrap, &secrets, "bank-cli");

    // The README tour's money path, each program as its own principal.
    system
        .bank(&["open", "sasl-a", "--owner", "Ann", "--currency", "EUR"])
        .expect(0);
    system
        .bank(&["open", "sasl-b", "--owner", "Bob", "--currency", "EUR"])
        .expect(0);
    system
        .bank(&["deposit", "sasl-a", "10.00", "--currency", "EUR"])
        .expect(0);
    let transfer = system.bank(&["transfer", "sasl-a", "sasl-b", "4.00", "--currency", "EUR"]);
    assert_eq!(transfer.code, 0, "{transfer}");
    let b = system.wait_for_version("sasl-b", 2);
    assert_eq!(b["balance_minor"], 400, "{b}");
    assert_eq!(system.wait_for_version("sasl-a", 3)["balance_minor"], 600);

    // Least privilege: the projection's principal may write its dead-letter topic but not
    // append to the event store, and the CLI's may not either.
    let topics = shared::kafka::Topics::new(&prefix);
    let projection = scram_producer(&bootstrap, &secrets, "bank-projection");
    assert_eq!(try_append(&projection, &topics.events_dlq()), Ok(()));
    assert_eq!(
        try_append(&projection, &topics.events()),
        Err(rdkafka::types::RDKafkaErrorCode::TopicAuthorizationFailed)
    );
    let cli = scram_producer(&bootstrap, &secrets, "bank-cli");
    assert_eq!(
        try_append(&cli, &topics.events()),
        Err(rdkafka::types::RDKafkaErrorCode::TopicAuthorizationFailed)
    );
}

#[test]
fn a_wrong_password_stops_a_service_with_an_authentication_error() {
    let Some((bootstrap, secrets)) = shared::testing::sasl_kafka() else {
        return;
    };
    build_services();
    let dir = tempfile::tempdir().expect("temp dir");
    let sentinel = format!("wrong-{}", uuid::Uuid::new_v4().simple());
    let wrong = dir.path().join("wrong.password");
    std::fs::write(&wrong, format!("{sentinel}\n")).expect("password file");
    for service in ["command-service", "projection-service"] {
        let mut env = scram_env(&bootstrap, &secrets, scram_user_of(service));
        env.retain(|(k, _)| *k != "KAFKA_SASL_PASSWORD_FILE");
        let started = Instant::now();
        let mut child = Command::new(target_dir().join(service))
            .envs(env)
            .env("KAFKA_SASL_PASSWORD_FILE", &wrong)
            .env("TOPIC_PREFIX", unique_name("e2e-wrong"))
            .env("COMMAND_HTTP_ADDR", format!("127.0.0.1:{}", free_port()))
            .env("PROJECTION_HTTP_ADDR", format!("127.0.0.1:{}", free_port()))
            .env(
                "PROJECTION_DATABASE_URL",
                format!(
                    "sqlite://{}",
                    dir.path().join(format!("{service}.db")).display()
                ),
            )
            .env("RUST_LOG", "debug")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the service");
        let readers = [
            read_to_end(child.stdout.take().expect("stdout")),
            read_to_end(child.stderr.take().expect("stderr")),
        ];
        // It must stop by itself within a minute.
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait") {
                break status;
            }
            if started.elapsed() > Duration::from_secs(60) {
                let _ = child.kill();
                panic!("{service} still runs after a minute with a wrong password");
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let text: String = readers.map(|r| r.join().expect("pipe reader")).concat();
        assert!(!status.success(), "{service} exited {status}:\n{text}");
        assert!(
            text.contains("refused the credentials") && text.contains("KAFKA_SASL_PASSWORD_FILE"),
            "{service} did not say why it stopped:\n{text}"
        );
        assert!(
            !text.contains(&sentinel),
            "{service} logged the password at RUST_LOG=debug:\n{text}"
        );
    }
}

/// Reads `pipe` to its end on a thread of its own.
fn read_to_end(mut pipe: impl Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut text = String::new();
        let _ = pipe.read_to_string(&mut text);
        text
    })
}
