//! Test harness: a fresh database per test (SQLite file in a temp dir, or a new PostgreSQL
//! database), unique topics, an in-process app on port 0, producers for raw bytes and envelopes,
//! generated account histories with their expected fold, and polling helpers with deadlines.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use projection_service::ServiceError;
use projection_service::db::Database;
use rdkafka::Message;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::OwnedHeaders;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use serde_json::Value;
use shared::codec::event_headers;
use shared::envelope::Metadata;
use shared::kafka::{Topics, canonical_partition};
use shared::testing::{test_settings, unique_name};
use shared::{BankAccount, Command, EventCodec, EventEnvelope, Settings};
use sqlx::Connection;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Partitions of the test topics.
pub const PARTITIONS: i32 = 3;

/// Which read-model database a test runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// A SQLite file in a temporary directory.
    Sqlite,
    /// A fresh database on `TEST_POSTGRES_URL`.
    Postgres,
}

/// A database of its own for one test. A PostgreSQL database is dropped when the value is
/// dropped (best effort, in the background: a failed test may leave its database behind).
pub struct TestDb {
    /// The URL to give the service.
    pub url: String,
    _dir: Option<tempfile::TempDir>,
    postgres: Option<(String, String)>,
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let Some((admin, name)) = self.postgres.take() else {
            return;
        };
        // A thread of its own: the test's runtime may be shutting down.
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                if let Ok(mut conn) = sqlx::PgConnection::connect(&admin).await {
                    let _ = sqlx::raw_sql(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .execute(&mut conn)
                        .await;
                    let _ = conn.close().await;
                }
            });
        })
        .join();
    }
}

/// `TEST_POSTGRES_URL`, or a failure that says how to get one (never a silent pass).
#[track_caller]
pub fn postgres_url() -> String {
    std::env::var("TEST_POSTGRES_URL")
        .ok()
        .filter(|v| !v.trim().is_empty())
        .unwrap_or_else(|| {
            panic!(
                "TEST_POSTGRES_URL is not set. The PostgreSQL variant of this test needs a real \
                 server: run the suite with `scripts/test`, or run `scripts/postgres start` and \
                 export TEST_POSTGRES_URL=<the URL it prints>"
            )
        })
}

fn with_database(url: &str, name: &str) -> String {
    let (base, query) = url
        .split_once('?')
        .map_or((url, None), |(b, q)| (b, Some(q)));
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let path_start = base[scheme_end..]
        .find('/')
        .map_or(base.len(), |i| scheme_end + i);
    let mut out = format!("{}/{name}", &base[..path_start]);
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    out
}

impl TestDb {
    /// A new empty database.
    pub async fn new(backend: Backend) -> TestDb {
        match backend {
            Backend::Sqlite => {
                let dir = tempfile::tempdir().expect("temp dir");
                let url = format!("sqlite://{}", dir.path().join("projection.db").display());
                TestDb {
                    url,
                    _dir: Some(dir),
                    postgres: None,
                }
            }
            Backend::Postgres => {
                let admin = postgres_url();
                let name = unique_name("projection_test").replace('-', "_");
                let mut conn = sqlx::PgConnection::connect(&admin)
                    .await
                    .expect("connect to TEST_POSTGRES_URL");
                sqlx::raw_sql(&format!("CREATE DATABASE {name}"))
                    .execute(&mut conn)
                    .await
                    .expect("CREATE DATABASE (user needs CREATEDB)");
                let _ = conn.close().await;
                TestDb {
                    url: with_database(&admin, &name),
                    _dir: None,
                    postgres: Some((admin, name)),
                }
            }
        }
    }

    /// A connection to the read model for direct checks.
    pub async fn open(&self) -> Database {
        Database::connect(&self.url).await.expect("open read model")
    }
}

/// A running in-process projection-service.
pub struct TestApp {
    /// Where it listens.
    pub addr: SocketAddr,
    /// HTTP client.
    pub client: reqwest::Client,
    /// `<prefix>.events`.
    pub topic: String,
    stop: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<Result<(), ServiceError>>>,
}

/// Settings for a test: unique topics with [`PARTITIONS`] partitions and the given database.
pub fn settings_for(db: &TestDb) -> Settings {
    let mut settings = test_settings(PARTITIONS);
    settings.projection_database_url = db.url.clone();
    settings
}

/// Starts the service in-process on port 0.
pub async fn spawn_app(settings: Settings) -> TestApp {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind port 0");
    let addr = listener.local_addr().expect("local addr");
    let (stop, stopped) = oneshot::channel::<()>();
    let topic = Topics::new(&settings.topic_prefix).events();
    let handle = tokio::spawn(projection_service::run(settings, listener, async move {
        let _ = stopped.await;
    }));
    let app = TestApp {
        addr,
        client: reqwest::Client::new(),
        topic,
        stop: Some(stop),
        handle: Some(handle),
    };
    wait_for(
        "the service to answer /health",
        Duration::from_secs(60),
        || async {
            let r = app.client.get(app.url("/health")).send().await.ok()?;
            r.status().is_success().then_some(())
        },
    )
    .await;
    app
}

impl TestApp {
    /// `http://addr{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// GET, returning status and JSON body (Null when not JSON).
    pub async fn get(&self, path: &str) -> (u16, Value) {
        let r = self
            .client
            .get(self.url(path))
            .send()
            .await
            .expect("request");
        let status = r.status().as_u16();
        let text = r.text().await.unwrap_or_default();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// GET as text.
    pub async fn get_text(&self, path: &str) -> (u16, String) {
        let r = self
            .client
            .get(self.url(path))
            .send()
            .await
            .expect("request");
        (r.status().as_u16(), r.text().await.unwrap_or_default())
    }

    /// Waits until `GET /accounts/{id}` shows at least `version` (uses the service's own
    /// `min_version` wait, repeated until the deadline).
    pub async fn wait_version(&self, id: &str, version: u64) -> Value {
        wait_for(
            &format!("{id} to reach version {version}"),
            Duration::from_secs(60),
            || async {
                let (status, body) = self
                    .get(&format!(
                        "/accounts/{id}?min_version={version}&timeout_ms=2000"
                    ))
                    .await;
                (status == 200).then_some(body)
            },
        )
        .await
    }

    /// Sums the series of a counter for this app's topic from `/metrics`.
    pub async fn metric(&self, name: &str) -> f64 {
        let (_, text) = self.get_text("/metrics").await;
        metric_value(&text, name, &self.topic)
    }

    /// Waits until the service says it caught up.
    pub async fn wait_ready(&self) {
        wait_for("/ready to say 200", Duration::from_secs(60), || async {
            (self.get("/ready").await.0 == 200).then_some(())
        })
        .await;
    }

    /// Graceful stop; returns what `run` returned.
    pub async fn stop(mut self) -> Result<(), ServiceError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let handle = self.handle.take().expect("running");
        tokio::time::timeout(Duration::from_secs(60), handle)
            .await
            .expect("service stops within 60 s")
            .expect("service task did not panic")
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Sums every series of `name` whose labels include `topic="<topic>"`.
pub fn metric_value(text: &str, name: &str, topic: &str) -> f64 {
    let label = format!("topic=\"{topic}\"");
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) && l.contains(&label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Polls `check` every 50 ms until it yields a value; panics naming `what` after `timeout`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Writes to the events topic of a test.
pub struct EventWriter {
    producer: FutureProducer,
    /// `<prefix>.events`.
    pub topic: String,
    partitions: i32,
}

impl EventWriter {
    /// A writer for the settings' events topic (which the service creates; this waits for it).
    pub async fn new(settings: &Settings) -> EventWriter {
        projection_service::ensure_projection_topics(settings)
            .await
            .expect("topics");
        let producer = settings
            .kafka
            .client_config()
            .set("enable.idempotence", "true")
            .set("linger.ms", "5")
            .create()
            .expect("producer");
        EventWriter {
            producer,
            topic: Topics::new(&settings.topic_prefix).events(),
            partitions: settings.partitions,
        }
    }

    /// The canonical partition of a key.
    pub fn partition_of(&self, key: &str) -> i32 {
        canonical_partition(key.as_bytes(), self.partitions)
    }

    /// Produces bytes as-is, keyed, on the key's canonical partition; returns (partition, offset).
    pub async fn raw(&self, key: &str, bytes: &[u8], headers: Option<OwnedHeaders>) -> (i32, i64) {
        let mut record = FutureRecord::to(&self.topic)
            .key(key)
            .payload(bytes)
            .partition(self.partition_of(key));
        if let Some(h) = headers {
            record = record.headers(h);
        }
        let delivery = self
            .producer
            .send(record, Duration::from_secs(30))
            .await
            .expect("delivered");
        (delivery.partition, delivery.offset)
    }

    /// Produces an envelope encoded by `codec`, with the standard headers.
    pub async fn envelope(&self, codec: &EventCodec, env: &EventEnvelope) -> (i32, i64) {
        let bytes = codec.encode(&self.topic, env).await.expect("encode");
        self.raw(&env.aggregate_id, &bytes, Some(event_headers(env)))
            .await
    }

    /// Produces many (key, bytes) pairs with many deliveries in flight; order per key is kept
    /// (idempotent producer).
    pub async fn many(&self, messages: &[(String, Vec<u8>)]) {
        for chunk in messages.chunks(2000) {
            let sends = chunk.iter().map(|(key, bytes)| {
                self.producer.send(
                    FutureRecord::to(&self.topic)
                        .key(key.as_str())
                        .payload(bytes.as_slice())
                        .partition(self.partition_of(key)),
                    Duration::from_secs(60),
                )
            });
            for r in futures::future::join_all(sends).await {
                r.expect("delivered");
            }
        }
    }
}

/// A small deterministic generator (no external randomness: failures reproduce).
pub struct Rng(u64);

impl Rng {
    /// Seeded.
    pub fn new(seed: u64) -> Self {
        Rng(seed ^ 0x9E37_79B9_7F4A_7C15)
    }

    /// Next number (xorshift64*).
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// In `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// One account's generated history: envelopes (current version) with distinct, increasing
/// timestamps, produced by running commands through the aggregate's rules.
#[derive(Debug, Clone)]
pub struct History {
    /// Account id.
    pub id: String,
    /// Its events.
    pub events: Vec<EventEnvelope>,
}

impl History {
    /// The state after each version (index 0 = version 1).
    pub fn states(&self) -> Vec<BankAccount> {
        let mut account = BankAccount::default();
        self.events
            .iter()
            .map(|e| {
                account.apply(&e.event().expect("valid event"));
                account.clone()
            })
            .collect()
    }

    /// The final state.
    pub fn final_state(&self) -> BankAccount {
        self.states().pop().unwrap_or_default()
    }
}

/// Generates `accounts` histories of up to `max_events` events each (USD accounts, so they can
/// also be written as v1 events). Timestamps start at `base` and step one second per version.
pub fn generate(prefix: &str, accounts: usize, max_events: u64, seed: u64) -> Vec<History> {
    let mut rng = Rng::new(seed);
    let base = Utc
        .with_ymd_and_hms(2026, 1, 1, 0, 0, 0)
        .single()
        .expect("valid date");
    (0..accounts)
        .map(|i| {
            let id = format!("{prefix}-{i:05}");
            let mut account = BankAccount::default();
            let mut events = Vec::new();
            let target = 1 + rng.below(max_events.max(1));
            let owner = ["Ann", "Bo", "Chen", "Dana"][i % 4].to_owned();
            let mut commands = vec![Command::OpenAccount {
                owner,
                currency: "USD".into(),
                initial_balance_minor: i64::try_from(rng.below(10_000)).unwrap_or(0),
            }];
            while (events.len() as u64) < target {
                let command = commands.pop().unwrap_or_else(|| {
                    let amount = 1 + i64::try_from(rng.below(5_000)).unwrap_or(0);
                    if rng.below(3) == 0 && account.balance_minor > 0 {
                        Command::Withdraw {
                            amount_minor: amount.min(account.balance_minor),
                        }
                    } else {
                        Command::Deposit {
                            amount_minor: amount,
                        }
                    }
                });
                let new = account
                    .handle(&command)
                    .expect("generated commands are valid");
                for e in new {
                    account.apply(&e);
                    let ts = base
                        + chrono::Duration::seconds(account.version as i64 * 60)
                        + chrono::Duration::milliseconds(i as i64);
                    events.push(EventEnvelope::new(
                        &id,
                        account.version,
                        &e,
                        ts,
                        Metadata::new(),
                    ));
                }
            }
            // Some accounts end closed: empty them, then close.
            if i % 5 == 4 {
                for command in [
                    Command::Withdraw {
                        amount_minor: account.balance_minor,
                    },
                    Command::CloseAccount,
                ] {
                    if let Ok(new) = account.handle(&command) {
                        for e in new {
                            account.apply(&e);
                            let ts = base + chrono::Duration::seconds(account.version as i64 * 60);
                            events.push(EventEnvelope::new(
                                &id,
                                account.version,
                                &e,
                                ts,
                                Metadata::new(),
                            ));
                        }
                    }
                }
            }
            History { id, events }
        })
        .collect()
}

/// The envelope as the seed era wrote it (v1: `id`, no `schema_version`, decimal amounts).
pub fn as_v1_bytes(codec: &EventCodec, env: &EventEnvelope) -> Vec<u8> {
    codec
        .downcast(env, 1, "USD")
        .expect("downcast to v1")
        .to_string()
        .into_bytes()
}

/// Asserts an API account equals an expected state.
#[track_caller]
pub fn assert_account(body: &Value, id: &str, want: &BankAccount) {
    assert_eq!(body["id"], id, "{body}");
    assert_eq!(body["owner"], want.owner.as_str(), "{id}: {body}");
    assert_eq!(body["currency"], want.currency.as_str(), "{id}: {body}");
    assert_eq!(
        body["balance_minor"].as_i64(),
        Some(want.balance_minor),
        "{id}: {body}"
    );
    assert_eq!(
        body["balance"],
        shared::money::format_minor(
            want.balance_minor,
            shared::money::minor_digits(&want.currency)
        )
        .as_str(),
        "{id}: {body}"
    );
    assert_eq!(body["status"], want.status.as_str(), "{id}: {body}");
    assert_eq!(body["version"].as_u64(), Some(want.version), "{id}: {body}");
    assert_eq!(
        body["transaction_count"].as_u64(),
        Some(want.transaction_count),
        "{id}: {body}"
    );
}

/// Every account of the read model as (balance, version, tx count, status), read directly.
pub async fn read_model(db: &Database) -> BTreeMap<String, (i64, i64, i64, String)> {
    use sqlx::Row;
    sqlx::query(
        "SELECT id, balance_minor, version, transaction_count, status FROM accounts ORDER BY id",
    )
    .fetch_all(db.pool())
    .await
    .expect("read accounts")
    .iter()
    .map(|r| {
        (
            r.try_get::<String, _>(0).expect("id"),
            (
                r.try_get::<i64, _>(1).expect("balance"),
                r.try_get::<i64, _>(2).expect("version"),
                r.try_get::<i64, _>(3).expect("tx"),
                r.try_get::<String, _>(4).expect("status"),
            ),
        )
    })
    .collect()
}

/// The expected read model of generated histories, in the shape of [`read_model`].
pub fn expected_model(histories: &[History]) -> BTreeMap<String, (i64, i64, i64, String)> {
    histories
        .iter()
        .map(|h| {
            let s = h.final_state();
            (
                h.id.clone(),
                (
                    s.balance_minor,
                    s.version as i64,
                    s.transaction_count as i64,
                    s.status.as_str().to_owned(),
                ),
            )
        })
        .collect()
}

/// A dead letter as read back.
#[derive(Debug, Clone)]
pub struct DeadLetterSeen {
    /// Key.
    pub key: Option<Vec<u8>>,
    /// Bytes.
    pub payload: Option<Vec<u8>>,
    /// Headers as text.
    pub headers: BTreeMap<String, String>,
}

/// Reads `count` messages of the DLQ topic from the beginning (fails after 60 s).
pub async fn read_dead_letters(settings: &Settings, count: usize) -> Vec<DeadLetterSeen> {
    let topic = Topics::new(&settings.topic_prefix).events_dlq();
    let consumer: StreamConsumer = settings
        .kafka
        .client_config()
        .set("group.id", unique_name("dlq-reader"))
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    for p in 0..settings.partitions {
        tpl.add_partition_offset(&topic, p, Offset::Beginning)
            .expect("tpl");
    }
    consumer.assign(&tpl).expect("assign");
    let mut out = Vec::new();
    while out.len() < count {
        let m = tokio::time::timeout(Duration::from_secs(60), consumer.recv())
            .await
            .unwrap_or_else(|_| panic!("only {} of {count} dead letters arrived", out.len()))
            .expect("dlq message");
        out.push(DeadLetterSeen {
            key: m.key().map(<[u8]>::to_vec),
            payload: m.payload().map(<[u8]>::to_vec),
            headers: shared::dlq::headers_as_text(&m),
        });
    }
    out
}

/// A timestamp strictly between two of the generated ones.
pub fn just_after(ts: &DateTime<Utc>) -> DateTime<Utc> {
    *ts + chrono::Duration::milliseconds(1)
}

/// An RFC 3339 query value (URL-safe: `Z`, no `+`).
pub fn rfc3339(ts: &DateTime<Utc>) -> String {
    ts.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
}

/// A unique account-id prefix for a test.
pub fn ids(prefix: &str) -> String {
    unique_name(prefix)
}
