//! `bench`: measures the pipeline against raw Kafka on the same broker, in one run, and writes
//! a Markdown table (ratios next to the absolute figures).
//!
//! 1. Raw producer: the same command payloads produced with the CommandClient's producer
//!    settings to a scratch topic — the peer of (2).
//! 2. Command pipeline: the same number of commands through the real `command-service` binary,
//!    from produce to received result.
//! 3. Restore as history grows: a restarted command-service's time to ready and resident memory
//!    after the history H that (2) wrote, and again after 6H on the same accounts (the goal is
//!    flat: restores read checkpoints and a short tail, not the history); then RSS per million
//!    aggregates from a store of `--aggregates` opened accounts.
//! 4. Raw consumer: reading those events with a plain read_committed consumer — the peer of (5).
//! 5. Projection apply: the real `projection-service` binary catching up on the same events, on
//!    SQLite and (when `BENCH_POSTGRES_URL` is set) on PostgreSQL.
//!
//! Needs `KAFKA_BOOTSTRAP_SERVERS` and the release binaries (`scripts/bench` does both).

use std::path::PathBuf;
use std::process::{Child, Command as Process, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use futures::StreamExt;
use rdkafka::producer::{FutureProducer, FutureRecord};
use shared::client::CommandClient;
use shared::kafka::{TopicReader, TopicSpec, Topics, canonical_partition, ensure_topics};
use shared::{Command, CommandMessage, Settings};

#[derive(Parser, Debug)]
#[command(about = "Benchmarks the command pipeline and the projection against raw Kafka")]
struct Args {
    /// Commands to push through the pipeline (and raw messages for the producer peer).
    #[arg(long, default_value_t = 20_000)]
    commands: usize,
    /// Accounts the commands are spread over.
    #[arg(long, default_value_t = 500)]
    accounts: usize,
    /// Partitions of the benchmark topics.
    #[arg(long, default_value_t = 6)]
    partitions: i32,
    /// Where the release binaries are.
    #[arg(long, default_value = "target/release")]
    bin_dir: PathBuf,
    /// Markdown file the table is written to.
    #[arg(long, default_value = "bench/RESULTS.md")]
    out: PathBuf,
    /// Accounts opened for the memory-per-aggregate measurement.
    #[arg(long, default_value_t = 100_000)]
    aggregates: usize,
}

struct Row {
    what: String,
    count: usize,
    seconds: f64,
    note: String,
    /// The "vs peer" column, when the row computes its own.
    ratio: Option<String>,
}

impl Row {
    fn rate(&self) -> f64 {
        self.count as f64 / self.seconds.max(1e-9)
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let bootstrap = std::env::var("KAFKA_BOOTSTRAP_SERVERS")
        .context("KAFKA_BOOTSTRAP_SERVERS is not set: run scripts/bench, or start scripts/kafka")?;
    let prefix = format!("bench-{}", uuid::Uuid::new_v4().simple());
    let vars = vec![
        ("KAFKA_BOOTSTRAP_SERVERS".to_owned(), bootstrap.clone()),
        ("TOPIC_PREFIX".to_owned(), prefix.clone()),
        ("PARTITIONS".to_owned(), args.partitions.to_string()),
    ];
    let settings = Settings::from_vars(&vars)?;
    let commands = workload(args.accounts, args.commands);
    let mut rows = Vec::new();

    // 1. raw producer
    rows.push(raw_producer(&settings, &commands).await?);

    // 2. command pipeline
    let service = Service::start(
        &args.bin_dir,
        "command-service",
        &vars,
        &[("INSTANCE_ID", "bench-1")],
    )?;
    service.wait_ready(Duration::from_secs(120)).await?;
    let rss_empty = service.rss_mb();
    let client = CommandClient::connect(&settings).await?;
    let (opens, rest) = commands.split_at(args.accounts);
    client
        .submit_all(opens, Duration::from_secs(60), |_| {})
        .await?;
    let started = Instant::now();
    let results = client
        .submit_all(rest, Duration::from_secs(60), |_| {})
        .await?;
    let seconds = started.elapsed().as_secs_f64();
    let accepted = results
        .iter()
        .filter(|r| r.status == shared::CommandStatus::Accepted)
        .count();
    rows.push(Row {
        what: "command pipeline (produce → command-service txn → result)".into(),
        count: rest.len(),
        seconds,
        note: format!("{accepted} accepted, {} rejected", rest.len() - accepted),
        ratio: None,
    });
    service.stop();

    // 3. restore as history grows: H, then 6H on the same accounts. The dedupe window is one
    // second so that only the live state is restored (the window's cost is its own row).
    let live_only: Vec<(&str, &str)> = vec![("INSTANCE_ID", "bench-1"), ("DEDUPE_WINDOW", "1s")];
    let events_h = count_messages(&settings, &Topics::new(&prefix).events())?;
    let (row_h, service) = restart(&args.bin_dir, &vars, &live_only, events_h, "H").await?;
    let more = workload(args.accounts, rest.len() * 5 + args.accounts);
    client
        .submit_all(&more[args.accounts..], Duration::from_secs(120), |_| {})
        .await?;
    service.stop();
    let events_6h = count_messages(&settings, &Topics::new(&prefix).events())?;
    let (mut row_6h, service) = restart(&args.bin_dir, &vars, &live_only, events_6h, "6H").await?;
    service.stop();
    row_6h.ratio = Some(format!(
        "{:.2} × time, {:.2} × RSS of H",
        row_6h.seconds / row_h.seconds.max(1e-9),
        row_6h.rss_mb / row_h.rss_mb.max(1e-9)
    ));
    rows.push(row_h.into_row());
    rows.push(row_6h.into_row());
    let events_total = events_6h;
    rows.push(memory_per_aggregate(&args, &bootstrap, rss_empty).await?);

    // 4. raw consumer
    let started = Instant::now();
    let read = count_messages(&settings, &Topics::new(&prefix).events())?;
    rows.push(Row {
        what: "raw read_committed consumer over the events".into(),
        count: read,
        seconds: started.elapsed().as_secs_f64(),
        note: "peer of the projection rows".into(),
        ratio: None,
    });

    // 5. projection
    let dir = std::env::temp_dir().join(&prefix);
    std::fs::create_dir_all(&dir)?;
    let sqlite = format!("sqlite://{}", dir.join("bench.db").display());
    rows.push(projection(&args.bin_dir, &vars, &sqlite, "SQLite", events_total).await?);
    if let Ok(pg) = std::env::var("BENCH_POSTGRES_URL") {
        let pg = fresh_database(&pg, &prefix.replace('-', "_"))?;
        rows.push(projection(&args.bin_dir, &vars, &pg, "PostgreSQL", events_total).await?);
    }

    let table = render(&rows, &args);
    println!("{table}");
    if let Some(parent) = args.out.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&args.out, &table)?;
    eprintln!("written to {}", args.out.display());
    Ok(())
}

/// Opens every account, then a mix of deposits (60 %) and withdrawals (40 %, some too large).
fn workload(accounts: usize, total: usize) -> Vec<CommandMessage> {
    let mut out: Vec<CommandMessage> = (0..accounts)
        .map(|i| {
            CommandMessage::new(
                format!("acc-{i}"),
                Command::OpenAccount {
                    owner: format!("Owner {i}"),
                    currency: "EUR".into(),
                    initial_balance_minor: 10_000,
                },
            )
        })
        .collect();
    let mut x: u64 = 42;
    while out.len() < total.max(accounts + 1) {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let id = format!("acc-{}", (x >> 33) as usize % accounts);
        let amount = 1 + ((x >> 13) % 20_000) as i64;
        let command = if (x >> 7) % 10 < 6 {
            Command::Deposit {
                amount_minor: amount,
            }
        } else {
            Command::Withdraw {
                amount_minor: amount,
            }
        };
        out.push(CommandMessage::new(id, command));
    }
    out
}

async fn raw_producer(settings: &Settings, commands: &[CommandMessage]) -> anyhow::Result<Row> {
    let topic = format!("{}.raw", settings.topic_prefix);
    ensure_topics(
        &settings.kafka,
        &[TopicSpec {
            name: topic.clone(),
            partitions: settings.partitions,
            config: vec![],
        }],
        Duration::from_secs(30),
    )
    .await?;
    let producer: FutureProducer = settings
        .kafka
        .producer_config()
        .set("linger.ms", "5")
        .create()?;
    let payloads: Vec<(String, Vec<u8>)> = commands
        .iter()
        .map(|c| (c.aggregate_id.clone(), c.to_bytes()))
        .collect();
    let started = Instant::now();
    let sends = payloads.iter().map(|(key, payload)| {
        let producer = producer.clone();
        let topic = topic.clone();
        let partition = canonical_partition(key.as_bytes(), settings.partitions);
        async move {
            producer
                .send(
                    FutureRecord::to(&topic)
                        .key(key)
                        .payload(payload)
                        .partition(partition),
                    Duration::from_secs(30),
                )
                .await
                .map_err(|(e, _)| e)
        }
    });
    let mut stream = futures::stream::iter(sends).buffer_unordered(1000);
    while let Some(r) = stream.next().await {
        r?;
    }
    let bytes: usize = payloads.iter().map(|(_, p)| p.len()).sum();
    Ok(Row {
        what: "raw idempotent producer, same payloads".into(),
        count: payloads.len(),
        seconds: started.elapsed().as_secs_f64(),
        note: format!("{} B average", bytes / payloads.len().max(1)),
        ratio: None,
    })
}

/// Reads a whole topic read_committed and counts its messages.
fn count_messages(settings: &Settings, topic: &str) -> anyhow::Result<usize> {
    let partitions: Vec<i32> = (0..settings.partitions).collect();
    let group = format!("{}.bench-reader", settings.topic_prefix);
    let mut count = 0;
    TopicReader::open(&settings.kafka, &group, topic, &partitions)?.drain(|_| count += 1);
    Ok(count)
}

async fn projection(
    bin_dir: &std::path::Path,
    vars: &[(String, String)],
    database_url: &str,
    label: &str,
    events: usize,
) -> anyhow::Result<Row> {
    let started = Instant::now();
    let service = Service::start(
        bin_dir,
        "projection-service",
        vars,
        &[("PROJECTION_DATABASE_URL", database_url)],
    )?;
    service.wait_ready(Duration::from_secs(600)).await?;
    let seconds = started.elapsed().as_secs_f64();
    service.stop();
    Ok(Row {
        what: format!("projection-service catch-up on {label}"),
        count: events,
        seconds,
        note: "process start to /ready (caught up), one DB transaction per batch".into(),
        ratio: None,
    })
}

/// Creates database `name` on the server of `url` (with `psql`) and returns its URL.
fn fresh_database(url: &str, name: &str) -> anyhow::Result<String> {
    let status = Process::new("psql")
        .arg(url)
        .arg("-qc")
        .arg(format!("CREATE DATABASE {name}"))
        .status()
        .context("psql is needed to create the benchmark database")?;
    if !status.success() {
        bail!("CREATE DATABASE {name} failed");
    }
    let base = url.rsplit_once('/').map_or(url, |(base, _)| base);
    Ok(format!("{base}/{name}"))
}

/// A restart measured: time to ready, memory, what the restore read.
struct Restart {
    label: &'static str,
    history: usize,
    seconds: f64,
    rss_mb: f64,
    restores: serde_json::Value,
    ratio: Option<String>,
}

impl Restart {
    fn into_row(self) -> Row {
        let r = &self.restores;
        Row {
            what: format!(
                "command-service restart until ready, history {}",
                self.label
            ),
            count: self.history,
            seconds: self.seconds,
            note: format!(
                "{} events of history; RSS {:.0} MB; the restore read {} snapshots, {} events, {} results; {} partitions replayed",
                self.history,
                self.rss_mb,
                r["snapshots"],
                r["events"],
                r["results"],
                r["replayed_partitions"]
            ),
            ratio: self.ratio,
        }
    }
}

/// Starts the command-service on an existing store and measures its restart; returns it running.
async fn restart(
    bin_dir: &std::path::Path,
    vars: &[(String, String)],
    extra: &[(&str, &str)],
    history: usize,
    label: &'static str,
) -> anyhow::Result<(Restart, Service)> {
    let started = Instant::now();
    let service = Service::start(bin_dir, "command-service", vars, extra)?;
    service.wait_ready(Duration::from_secs(300)).await?;
    let seconds = started.elapsed().as_secs_f64();
    let ready: serde_json::Value = reqwest::get(format!("{}/ready", service.url))
        .await?
        .json()
        .await?;
    Ok((
        Restart {
            label,
            history,
            seconds,
            rss_mb: service.rss_mb(),
            restores: ready["restores"].clone(),
            ratio: None,
        },
        service,
    ))
}

/// Opens `--aggregates` accounts on a fresh store, restarts, and reports the resident memory
/// above an empty service's, per million aggregates.
async fn memory_per_aggregate(args: &Args, bootstrap: &str, rss_empty: f64) -> anyhow::Result<Row> {
    let prefix = format!("bench-{}", uuid::Uuid::new_v4().simple());
    let vars = vec![
        ("KAFKA_BOOTSTRAP_SERVERS".to_owned(), bootstrap.to_owned()),
        ("TOPIC_PREFIX".to_owned(), prefix),
        ("PARTITIONS".to_owned(), args.partitions.to_string()),
    ];
    let settings = Settings::from_vars(&vars)?;
    let extra = [("INSTANCE_ID", "bench-mem"), ("DEDUPE_WINDOW", "1s")];
    let service = Service::start(&args.bin_dir, "command-service", &vars, &extra)?;
    service.wait_ready(Duration::from_secs(120)).await?;
    let client = CommandClient::connect(&settings).await?;
    let opens = workload(args.aggregates, args.aggregates + 1);
    client
        .submit_all(&opens[..args.aggregates], Duration::from_secs(120), |_| {})
        .await?;
    service.stop();
    let (measured, service) = restart(&args.bin_dir, &vars, &extra, args.aggregates, "mem").await?;
    service.stop();
    let per_million = (measured.rss_mb - rss_empty).max(0.0) / args.aggregates as f64 * 1e6;
    Ok(Row {
        what: format!("command-service memory with {} aggregates", args.aggregates),
        count: args.aggregates,
        seconds: measured.seconds,
        note: format!(
            "RSS {:.0} MB after restart vs {:.0} MB empty: {:.0} MB per million aggregates; restart until ready {:.2} s",
            measured.rss_mb, rss_empty, per_million, measured.seconds
        ),
        ratio: Some(format!("{per_million:.0} MB / million aggregates")),
    })
}

/// A service binary as a child process on a free port.
struct Service {
    child: Child,
    url: String,
}

impl Service {
    fn start(
        bin_dir: &std::path::Path,
        name: &str,
        vars: &[(String, String)],
        extra: &[(&str, &str)],
    ) -> anyhow::Result<Service> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let addr_var = if name == "command-service" {
            "COMMAND_HTTP_ADDR"
        } else {
            "PROJECTION_HTTP_ADDR"
        };
        let binary = bin_dir.join(name);
        let child = Process::new(&binary)
            .envs(vars.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .envs(extra.iter().copied())
            .env(addr_var, format!("127.0.0.1:{port}"))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| {
                format!(
                    "cannot start {} (build with `cargo build --release`)",
                    binary.display()
                )
            })?;
        Ok(Service {
            child,
            url: format!("http://127.0.0.1:{port}"),
        })
    }

    async fn wait_ready(&self, limit: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(r) = reqwest::get(format!("{}/ready", self.url)).await
                && r.status() == 200
            {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        bail!("{} not ready within {limit:?}", self.url)
    }

    /// Resident memory (VmRSS) of the process, in MB; 0 when it cannot be read.
    fn rss_mb(&self) -> f64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .ok()
            .and_then(|status| {
                let line = status.lines().find(|l| l.starts_with("VmRSS:"))?.to_owned();
                line.split_whitespace().nth(1)?.parse::<f64>().ok()
            })
            .map_or(0.0, |kb| kb / 1024.0)
    }

    fn stop(mut self) {
        let _ = Process::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn render(rows: &[Row], args: &Args) -> String {
    let peer_producer = rows.first().map(Row::rate).unwrap_or(1.0);
    let peer_consumer = rows
        .iter()
        .find(|r| r.what.starts_with("raw read_committed"))
        .map(Row::rate)
        .unwrap_or(1.0);
    let mut out = format!(
        "# Benchmark\n\n{} on one broker (KRaft, loopback), {} partitions, {} accounts, {} commands; \
         one run, 2 cores shared by broker, services and load generator.\n\n\
         | measurement | count | seconds | per second | vs peer |\n|---|---:|---:|---:|---:|\n",
        chrono::Utc::now().format("%Y-%m-%d %H:%M UTC"),
        args.partitions,
        args.accounts,
        args.commands
    );
    for r in rows {
        let ratio = if let Some(ratio) = &r.ratio {
            ratio.clone()
        } else if r.what.starts_with("command pipeline") {
            format!("{:.2} × raw producer", r.rate() / peer_producer)
        } else if r.what.starts_with("projection") {
            format!("{:.2} × raw consumer", r.rate() / peer_consumer)
        } else {
            "—".into()
        };
        out.push_str(&format!(
            "| {} | {} | {:.2} | {:.0} | {} |\n",
            r.what,
            r.count,
            r.seconds,
            r.rate(),
            ratio
        ));
    }
    out.push_str("\nNotes:\n");
    for r in rows {
        out.push_str(&format!("- {}: {}\n", r.what, r.note));
    }
    out
}
