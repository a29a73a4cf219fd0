//! Test helpers: in-process apps on port 0, the real binary as a child process, and readers of
//! the real broker's topics.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::process::{Child, Command as Process, Stdio};
use std::time::{Duration, Instant};

use rdkafka::message::{Message, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::Value;
use shared::kafka::{TopicReader, Topics, canonical_partition};
use shared::{
    BankAccount, Command, CommandMessage, CommandResult, CommandStatus, EventCodec, EventEnvelope,
    Settings,
};
use tokio::sync::oneshot;
use uuid::Uuid;

/// A command-service running inside the test process.
pub struct TestApp {
    pub url: String,
    pub settings: Settings,
    shutdown: Option<oneshot::Sender<()>>,
    handle: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    pub http: reqwest::Client,
}

impl TestApp {
    /// Starts an app with fresh topics and waits until it is ready.
    pub async fn spawn(partitions: i32) -> TestApp {
        let mut settings = shared::testing::test_settings(partitions);
        settings.commit_interval = Duration::from_millis(20);
        Self::spawn_with(settings).await
    }

    /// Starts an app with these settings (same settings = same topics, group and instance).
    pub async fn spawn_with(settings: Settings) -> TestApp {
        let app = Self::start_with(settings).await;
        app.wait_ready().await;
        app
    }

    /// Starts an app with these settings without waiting until it is ready.
    pub async fn start_with(settings: Settings) -> TestApp {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (tx, rx) = oneshot::channel();
        let handle = tokio::spawn(command_service::run(settings.clone(), listener, async {
            let _ = rx.await;
        }));
        TestApp {
            url,
            settings,
            shutdown: Some(tx),
            handle: Some(handle),
            http: reqwest::Client::new(),
        }
    }

    pub async fn wait_ready(&self) {
        self.wait_ready_within(Duration::from_secs(60)).await;
    }

    /// Waits until the app is ready, at most `within`.
    pub async fn wait_ready_within(&self, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            if let Ok(r) = self.http.get(format!("{}/ready", self.url)).send().await
                && r.status() == 200
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "service at {} not ready within {within:?}",
                self.url
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The body of `GET /ready`.
    pub async fn ready_json(&self) -> Value {
        self.http
            .get(format!("{}/ready", self.url))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// POSTs a command and returns the HTTP status and body.
    pub async fn send(&self, command: &CommandMessage) -> (u16, Value) {
        post(&self.http, &self.url, command.to_json().to_string()).await
    }

    /// Waits (at most `within`) for the app to stop by itself, and returns how it ended.
    pub async fn stopped(mut self, within: Duration) -> anyhow::Result<()> {
        let handle = self.handle.take().expect("running");
        tokio::time::timeout(within, handle)
            .await
            .unwrap_or_else(|_| panic!("the service did not stop within {within:?}"))
            .expect("the app task did not panic")
    }

    /// Stops gracefully and waits for the end.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(h) = self.handle.take() {
            h.await.unwrap().expect("clean shutdown");
        }
    }
}

pub async fn post(http: &reqwest::Client, url: &str, body: String) -> (u16, Value) {
    let r = http
        .post(format!("{url}/commands"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// The real `command-service` binary as a child process.
pub struct ServiceProcess {
    pub child: Child,
    pub url: String,
}

impl ServiceProcess {
    pub fn start(settings: &Settings, instance: &str, snapshot_every: u64) -> ServiceProcess {
        Self::start_with(settings, instance, snapshot_every, &[])
    }

    /// [`ServiceProcess::start`] with more environment variables.
    pub fn start_with(
        settings: &Settings,
        instance: &str,
        snapshot_every: u64,
        env: &[(&str, &str)],
    ) -> ServiceProcess {
        let program = Process::new(env!("CARGO_BIN_EXE_command-service"));
        Self::spawn(program, settings, instance, snapshot_every, env)
    }

    /// Runs `program` as the service, configured like [`ServiceProcess::start_with`].
    pub fn spawn(
        mut program: Process,
        settings: &Settings,
        instance: &str,
        snapshot_every: u64,
        env: &[(&str, &str)],
    ) -> ServiceProcess {
        let port = free_port();
        let child = program
            .envs(env.iter().copied())
            .env("KAFKA_BOOTSTRAP_SERVERS", &settings.kafka.bootstrap_servers)
            .env("TOPIC_PREFIX", &settings.topic_prefix)
            .env("PARTITIONS", settings.partitions.to_string())
            .env("INSTANCE_ID", instance)
            .env("COMMAND_HTTP_ADDR", format!("127.0.0.1:{port}"))
            .env("COMMIT_INTERVAL_MS", "20")
            .env("SNAPSHOT_EVERY", snapshot_every.to_string())
            .env("RUST_LOG", "warn,command_service=info")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("command-service binary starts");
        ServiceProcess {
            child,
            url: format!("http://127.0.0.1:{port}"),
        }
    }

    pub async fn ready(&self) -> Option<Value> {
        let r = reqwest::get(format!("{}/ready", self.url)).await.ok()?;
        if r.status() == 200 {
            r.json().await.ok()
        } else {
            None
        }
    }

    pub async fn wait_ready(&self) -> Value {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            if let Some(v) = self.ready().await {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "service at {} not ready",
                self.url
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// SIGKILL: no goodbye, no commit.
    pub fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// SIGTERM and wait for a clean exit.
    pub fn terminate(mut self) {
        Process::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        let status = self.child.wait().unwrap();
        assert!(status.success(), "clean exit on SIGTERM, got {status}");
    }
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn producer(settings: &Settings) -> FutureProducer {
    settings
        .kafka
        .client_config()
        .set("linger.ms", "1")
        .create()
        .unwrap()
}

/// Produces raw bytes to any topic's `partition`.
pub async fn produce_to(
    settings: &Settings,
    topic: &str,
    key: &str,
    payload: &[u8],
    partition: i32,
) {
    producer(settings)
        .send(
            FutureRecord::to(topic)
                .key(key)
                .payload(payload)
                .partition(partition),
            Duration::from_secs(10),
        )
        .await
        .map_err(|(e, _)| e)
        .unwrap();
}

/// Produces raw bytes to the commands topic (on `partition`, or the key's canonical partition).
pub async fn produce_raw(
    producer: &FutureProducer,
    settings: &Settings,
    key: &str,
    payload: &[u8],
    partition: Option<i32>,
) {
    let topic = Topics::new(&settings.topic_prefix).commands();
    let p = partition.unwrap_or_else(|| canonical_partition(key.as_bytes(), settings.partitions));
    producer
        .send(
            FutureRecord::to(&topic)
                .key(key)
                .payload(payload)
                .partition(p),
            Duration::from_secs(10),
        )
        .await
        .map_err(|(e, _)| e)
        .unwrap();
}

pub fn cmd(id: &str, command: Command) -> CommandMessage {
    CommandMessage::new(id, command)
}

pub fn open(id: &str, owner: &str, initial: i64) -> CommandMessage {
    cmd(
        id,
        Command::OpenAccount {
            owner: owner.into(),
            currency: "EUR".into(),
            initial_balance_minor: initial,
        },
    )
}

/// Every message of `topic`, partition by partition in offset order, read_committed, to the end.
pub fn read_topic(settings: &Settings, topic: &str) -> Vec<OwnedMessage> {
    let partitions: Vec<i32> = (0..settings.partitions).collect();
    let reader = TopicReader::open(
        &settings.kafka,
        &shared::testing::unique_name("reader"),
        topic,
        &partitions,
    )
    .unwrap();
    let mut out = Vec::new();
    reader.drain(|m| out.push(m.detach()));
    out.sort_by_key(|m| (m.partition(), m.offset()));
    out
}

/// All events, decoded.
pub async fn read_events(settings: &Settings) -> Vec<(i32, EventEnvelope)> {
    let codec = EventCodec::json("USD");
    let mut out = Vec::new();
    for m in read_topic(settings, &Topics::new(&settings.topic_prefix).events()) {
        out.push((
            m.partition(),
            codec
                .decode(m.payload().unwrap())
                .await
                .expect("event decodes"),
        ));
    }
    out
}

/// All results by command id (the last one written wins; duplicates repeat the original).
pub fn read_results(settings: &Settings) -> Vec<CommandResult> {
    read_topic(
        settings,
        &Topics::new(&settings.topic_prefix).command_results(),
    )
    .iter()
    .map(|m| serde_json::from_slice(m.payload().unwrap()).unwrap())
    .collect()
}

/// What the reference model predicts from the commands topic: commands in log order per
/// canonical partition, the first of each command id wins, aggregates fold the domain.
pub struct Reference {
    pub accounts: BTreeMap<String, BankAccount>,
    pub events: BTreeMap<String, Vec<(u64, String, Value)>>,
    pub results: HashMap<Uuid, CommandStatus>,
}

pub fn reference_model(settings: &Settings) -> Reference {
    let mut seen = HashSet::new();
    let mut r = Reference {
        accounts: BTreeMap::new(),
        events: BTreeMap::new(),
        results: HashMap::new(),
    };
    for m in read_topic(settings, &Topics::new(&settings.topic_prefix).commands()) {
        let Ok(c) = CommandMessage::from_bytes(m.payload().unwrap_or_default()) else {
            continue;
        };
        if canonical_partition(c.aggregate_id.as_bytes(), settings.partitions) != m.partition() {
            continue; // forwarded: counted where it lands
        }
        if !seen.insert(c.command_id) {
            continue;
        }
        let account = r.accounts.entry(c.aggregate_id.clone()).or_default();
        let decision = match c.expected_version {
            Some(v) if v != account.version => None,
            _ => account.handle(&c.command).ok(),
        };
        match decision {
            Some(events) => {
                for e in events {
                    account.apply(&e);
                    r.events.entry(c.aggregate_id.clone()).or_default().push((
                        account.version,
                        e.event_type().to_owned(),
                        e.data(),
                    ));
                }
                r.results.insert(c.command_id, CommandStatus::Accepted);
            }
            None => {
                r.results.insert(c.command_id, CommandStatus::Rejected);
            }
        }
    }
    r
}

/// Checks the event store against the reference model: no duplicate, no gap, nothing lost, on
/// the canonical partition, one result per command with the predicted status.
pub async fn verify_store(settings: &Settings) -> (usize, usize) {
    let reference = reference_model(settings);
    let events = read_events(settings).await;
    let mut by_aggregate: BTreeMap<String, Vec<(u64, String, Value)>> = BTreeMap::new();
    let mut event_ids = HashSet::new();
    let mut causes: HashMap<Uuid, String> = HashMap::new();
    for (partition, e) in &events {
        assert_eq!(
            *partition,
            canonical_partition(e.aggregate_id.as_bytes(), settings.partitions),
            "event on its canonical partition"
        );
        assert!(
            event_ids.insert(e.event_id),
            "duplicate event id {}",
            e.event_id
        );
        let cause = e.causation_id().expect("events carry their command id");
        if let Some(other) = causes.insert(cause, e.aggregate_id.clone()) {
            // one command makes events for one aggregate only
            assert_eq!(other, e.aggregate_id);
        }
        by_aggregate
            .entry(e.aggregate_id.clone())
            .or_default()
            .push((e.version, e.event_type.clone(), e.data.clone()));
    }
    for (id, list) in &by_aggregate {
        let versions: Vec<u64> = list.iter().map(|(v, _, _)| *v).collect();
        let expected: Vec<u64> = (1..=list.len() as u64).collect();
        assert_eq!(
            versions, expected,
            "versions of {id} are 1..n without gap or duplicate"
        );
    }
    assert_eq!(
        by_aggregate, reference.events,
        "the store holds exactly the events the domain predicts"
    );
    let results = read_results(settings);
    let mut first: HashMap<Uuid, CommandStatus> = HashMap::new();
    for r in &results {
        let prev = first.insert(r.command_id, r.status);
        if let Some(prev) = prev {
            assert_eq!(prev, r.status, "a repeated result repeats the original");
        }
    }
    for (id, status) in &reference.results {
        assert_eq!(first.get(id), Some(status), "result of {id}");
    }
    (events.len(), reference.results.len())
}

/// Produces `commands` to their canonical partitions and waits until each has a result.
pub async fn produce_and_wait(settings: &Settings, commands: &[CommandMessage]) {
    let producer = producer(settings);
    for c in commands {
        produce_raw(&producer, settings, &c.aggregate_id, &c.to_bytes(), None).await;
    }
    let wanted: HashSet<Uuid> = commands.iter().map(|c| c.command_id).collect();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let answered: HashSet<Uuid> = read_results(settings)
            .iter()
            .map(|r| r.command_id)
            .collect();
        if wanted.is_subset(&answered) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "all commands answered within 120 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Copies every record of one of `from`'s topics (named by `topic`) to the same topic of `to`,
/// partition for partition with keys, values, headers and timestamps, leaving out those `skip`
/// names: the way an operator restores a topic from a backup.
pub async fn copy_topic(
    from: &Settings,
    to: &Settings,
    topic: impl Fn(&Topics) -> String,
    skip: impl Fn(&OwnedMessage) -> bool,
) {
    let target = topic(&Topics::new(&to.topic_prefix));
    let producer = producer(to);
    for m in read_topic(from, &topic(&Topics::new(&from.topic_prefix))) {
        if skip(&m) {
            continue;
        }
        let mut record = FutureRecord::<[u8], [u8]>::to(&target).partition(m.partition());
        if let Some(k) = m.key() {
            record = record.key(k);
        }
        if let Some(v) = m.payload() {
            record = record.payload(v);
        }
        if let Some(h) = m.headers() {
            record = record.headers(h.clone());
        }
        if let Some(ts) = m.timestamp().to_millis() {
            record = record.timestamp(ts);
        }
        producer
            .send(record, Duration::from_secs(10))
            .await
            .map_err(|(e, _)| e)
            .unwrap();
    }
}

/// Test settings on a fresh prefix (`partitions`, 20 ms commits) whose topics exist already, as
/// the service creates them: for writing to them before the service starts.
pub async fn settings_with_topics(partitions: i32) -> Settings {
    let mut settings = shared::testing::test_settings(partitions);
    settings.commit_interval = Duration::from_millis(20);
    shared::kafka::ensure_topics(
        &settings.kafka,
        &command_service::topic_specs(&settings),
        Duration::from_secs(30),
    )
    .await
    .unwrap();
    settings
}
