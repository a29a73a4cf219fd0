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
//! 6. Latency, open loop at half the measured pipeline rate: produce → result, and produce →
//!    visible on the projection at the command's version.
//!    Beside it the floor ([`floor`]): a bare transactional copy loop at 1000 records/s.
//! 7. Transfers: transfers per second from start to ended on the projection (beside the
//!    single commands per second of (2)), and the latency from start to `completed` on the
//!    projection at 200 transfers/s (about 1000 commands/s of steps, beside (6) at 1000/s).
//!
//! Peers (see [`baselines`]): Kafka's `ProducerPerformance` with transactions as long as the
//! commit interval, `ConsumerPerformance` read_committed, a bare upsert loop into the read
//! model's tables, and (from `scripts/bench-peer`, if it ran) cqrs-es + postgres-es.
//!
//! Writes the Markdown table and `target/bench/results.json`. Needs `KAFKA_BOOTSTRAP_SERVERS`
//! and the release binaries (`scripts/bench` does both). For a diagnosis: `BENCH_SERVICE_LOG`
//! is the services' `RUST_LOG` (default `warn`), `BENCH_TRACE_SLOW=1` prints when each command
//! slower than 150 ms was sent, and `--latency-at RATE` measures only the latency and the floor.

mod baselines;
mod floor;
mod latency;
mod transfers;

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
    #[arg(long, default_value_t = 500_000)]
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
    #[arg(long, default_value_t = 1_000_000)]
    aggregates: usize,
    /// Seconds of open-loop load for the latency measurement.
    #[arg(long, default_value_t = 30)]
    latency_seconds: u64,
    /// `COMMIT_INTERVAL_MS` of the command-service (and the raw producer's transaction length).
    #[arg(long, default_value_t = 100)]
    commit_interval_ms: u64,
    /// The machine-readable figures.
    #[arg(long, default_value = "target/bench/results.json")]
    json: PathBuf,
    /// A short run (under 10 minutes on 2 cores): 50000 commands, 100000 aggregates, 10 s of
    /// latency load.
    #[arg(long)]
    quick: bool,
    /// Only the latency measurement, at this rate (commands per second): for exploring.
    #[arg(long)]
    latency_at: Option<f64>,
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

/// The figures of one run: the Markdown table's rows and the machine-readable JSON.
#[derive(Default)]
struct Report {
    rows: Vec<Row>,
    json: serde_json::Map<String, serde_json::Value>,
}

impl Report {
    /// Records one machine-readable figure.
    fn figure(&mut self, key: impl Into<String>, value: impl Into<serde_json::Value>) {
        self.json.insert(key.into(), value.into());
    }
}

/// What every step of a run needs: the arguments, the broker, the run's topic prefix and the
/// services' environment for it.
struct Bench {
    args: Args,
    bootstrap: String,
    prefix: String,
    vars: Vec<(String, String)>,
    settings: Settings,
    /// Scratch files of the run (the SQLite read models).
    dir: PathBuf,
}

/// What the command pipeline step leaves to the later ones.
struct Pipeline {
    client: CommandClient,
    /// Commands after the opens, measured.
    ops: usize,
    commands_per_s: f64,
    /// Resident memory of a command-service with nothing to restore.
    rss_empty: f64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let bench = Bench::new(Args::parse())?;
    if let Some(rate) = bench.args.latency_at {
        return bench.latency_only(rate).await;
    }
    let mut report = Report::default();
    let commands = workload(bench.args.accounts, bench.args.commands);
    let raw_tx = bench.raw_producers(&mut report, &commands).await?;
    let pipeline = bench
        .command_pipeline(&mut report, &commands, raw_tx)
        .await?;
    let events_total = bench.restores(&mut report, &pipeline).await?;
    let raw_consumer = bench.raw_consumer(&mut report, events_total)?;
    bench
        .projections(&mut report, events_total, raw_consumer)
        .await?;
    bench
        .latencies(&mut report, pipeline.commands_per_s)
        .await?;
    bench
        .transfers(&mut report, pipeline.commands_per_s)
        .await?;
    bench.peer(&mut report, pipeline.commands_per_s);
    bench.write(report)
}

impl Bench {
    fn new(mut args: Args) -> anyhow::Result<Bench> {
        if args.quick {
            args.commands = 50_000;
            args.aggregates = 100_000;
            args.latency_seconds = 10;
        }
        let bootstrap = std::env::var("KAFKA_BOOTSTRAP_SERVERS").context(
            "KAFKA_BOOTSTRAP_SERVERS is not set: run scripts/bench, or start scripts/kafka",
        )?;
        let prefix = format!("bench-{}", uuid::Uuid::new_v4().simple());
        let vars = service_vars(&bootstrap, &prefix, &args);
        let settings = Settings::from_vars(&vars)?;
        let dir = std::env::temp_dir().join(&prefix);
        Ok(Bench {
            args,
            bootstrap,
            prefix,
            vars,
            settings,
            dir,
        })
    }

    /// `--latency-at RATE`: only the latency measurement and the floor's, printed.
    async fn latency_only(&self, rate: f64) -> anyhow::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        let l = latency_run(&self.args, &self.bootstrap, rate, &self.dir).await?;
        println!(
            "sent at {:.0}/s: to result p50 {:.1} ms p99 {:.1} ms; to projection p50 {:.1} ms p99 {:.1} ms",
            l.rate, l.to_result.p50, l.to_result.p99, l.to_projection.p50, l.to_projection.p99
        );
        let floor = self
            .floor()
            .measure(rate, self.args.latency_seconds)
            .await?;
        println!(
            "floor at {rate:.0}/s: p50 {:.1} ms p99 {:.1} ms max {:.1} ms",
            floor.p50, floor.p99, floor.max
        );
        Ok(())
    }

    /// The bare transactional copy loop with the engine's settings, on this broker.
    fn floor(&self) -> floor::Floor {
        floor::Floor {
            kafka: self.settings.kafka.clone(),
            partitions: self.args.partitions,
            commit_interval: Duration::from_millis(self.args.commit_interval_ms),
        }
    }

    /// Step 1: Raw producers: rdkafka idempotent, and Kafka's own with transactions. Returns the
    /// transactional producer's records per second.
    async fn raw_producers(
        &self,
        report: &mut Report,
        commands: &[CommandMessage],
    ) -> anyhow::Result<f64> {
        let raw = raw_producer(&self.settings, commands).await?;
        let record_size = raw.count.max(1);
        let record_size = commands.iter().map(|c| c.to_bytes().len()).sum::<usize>() / record_size;
        report.rows.push(raw);
        let tx_topic = format!("{}.raw-tx", self.prefix);
        ensure_topics(
            &self.settings.kafka,
            &[TopicSpec {
                name: tx_topic.clone(),
                partitions: self.args.partitions,
                config: vec![],
            }],
            Duration::from_secs(30),
        )
        .await?;
        let tx_records = (self.args.commands * 2).max(100_000);
        let raw_tx = baselines::producer_performance(
            &self.bootstrap,
            &tx_topic,
            tx_records,
            record_size,
            self.args.commit_interval_ms,
        )?;
        report.figure("raw_producer_tx_records_per_s", raw_tx);
        report.rows.push(Row {
            what: "Kafka ProducerPerformance, acks=all, idempotent, transactional".into(),
            count: tx_records,
            seconds: tx_records as f64 / raw_tx.max(1e-9),
            note: format!(
                "{record_size} B records, one transaction every {} ms",
                self.args.commit_interval_ms
            ),
            ratio: None,
        });
        Ok(raw_tx)
    }

    /// Step 2: The command pipeline: the commands through the real command-service, compared with
    /// the transactional producer's `raw_tx` records per second.
    async fn command_pipeline(
        &self,
        report: &mut Report,
        commands: &[CommandMessage],
        raw_tx: f64,
    ) -> anyhow::Result<Pipeline> {
        let service = Service::start(
            &self.args.bin_dir,
            "command-service",
            &self.vars,
            &[("INSTANCE_ID", "bench-1")],
        )?;
        service.wait_ready(Duration::from_secs(120)).await?;
        let rss_empty = service.rss_mb();
        let client = CommandClient::connect(&self.settings).await?;
        let (opens, rest) = commands.split_at(self.args.accounts);
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
        // SIGKILL, as the restarts after it: both histories' restarts start from the same kind of
        // end (no checkpoint at a goodbye).
        service.kill();
        let topics = Topics::new(&self.prefix);
        let produced: usize = [
            topics.events(),
            topics.command_results(),
            topics.snapshots(),
            topics.command_checkpoints(),
        ]
        .iter()
        .map(|t| count_messages(&self.settings, t))
        .sum::<anyhow::Result<usize>>()?;
        let records_per_command = produced as f64 / commands.len() as f64;
        let commands_per_s = rest.len() as f64 / seconds.max(1e-9);
        let ratio_commands = commands_per_s * records_per_command / raw_tx.max(1e-9);
        report.figure("commands_per_s", commands_per_s);
        report.figure("records_per_command", records_per_command);
        report.figure("ratio_commands", ratio_commands);
        report.rows.push(Row {
            what: "command pipeline (produce → command-service txn → result)".into(),
            count: rest.len(),
            seconds,
            note: format!(
                "{accepted} accepted, {} rejected; {records_per_command:.2} records produced per command",
                rest.len() - accepted
            ),
            ratio: Some(format!(
                "{ratio_commands:.2} × transactional producer (records/s)"
            )),
        });
        Ok(Pipeline {
            client,
            ops: rest.len(),
            commands_per_s,
            rss_empty,
        })
    }

    /// Step 3: Restore as history grows: H, then 6H on the same accounts, with the default
    /// dedupe window (every command of both histories is in it) and restarts by SIGKILL. Then
    /// the memory per aggregate. Returns the events written in all.
    async fn restores(&self, report: &mut Report, pipeline: &Pipeline) -> anyhow::Result<usize> {
        let (args, vars) = (&self.args, &self.vars);
        let instance: Vec<(&str, &str)> = vec![("INSTANCE_ID", "bench-1")];
        let events = Topics::new(&self.prefix).events();
        let events_h = count_messages(&self.settings, &events)?;
        let (row_h, service) = restart(&args.bin_dir, vars, &instance, events_h, "H").await?;
        let more = workload(args.accounts, pipeline.ops * 5 + args.accounts);
        pipeline
            .client
            .submit_all(&more[args.accounts..], Duration::from_secs(120), |_| {})
            .await?;
        let entries = service.gauge("dedupe_entries").await.unwrap_or(0.0);
        let store = dedupe_store_bytes(vars, "bench-1");
        service.kill();
        let events_6h = count_messages(&self.settings, &events)?;
        let (mut row_6h, service) =
            restart(&args.bin_dir, vars, &instance, events_6h, "6H").await?;
        service.kill();
        if entries > 0.0 {
            report.figure("dedupe_bytes_per_command", store as f64 / entries);
            report.figure("dedupe_entries_6h", entries);
        }
        row_6h.ratio = Some(format!(
            "{:.2} × time, {:.2} × RSS of H",
            row_6h.seconds / row_h.seconds.max(1e-9),
            row_6h.rss_mb / row_h.rss_mb.max(1e-9)
        ));
        report.figure(
            "restore_events_per_s",
            events_6h as f64 / row_6h.seconds.max(1e-9),
        );
        report.figure("restart_seconds_h", row_h.seconds);
        report.figure("restart_seconds_6h", row_6h.seconds);
        report.figure("rss_mb_h", row_h.rss_mb);
        report.figure("rss_mb_6h", row_6h.rss_mb);
        report.rows.push(row_h.into_row());
        report.rows.push(row_6h.into_row());
        let (memory, per_million) =
            memory_per_aggregate(args, &self.bootstrap, pipeline.rss_empty).await?;
        report.figure("rss_mb_per_million_aggregates", per_million);
        report.rows.push(memory);
        Ok(events_6h)
    }

    /// Step 4: Raw consumer: Kafka's own, read_committed, over the events. Returns its records per
    /// second.
    fn raw_consumer(&self, report: &mut Report, events_total: usize) -> anyhow::Result<f64> {
        let events = Topics::new(&self.prefix).events();
        let raw_consumer = baselines::consumer_performance(&self.bootstrap, &events, events_total)?;
        report.figure("raw_consumer_records_per_s", raw_consumer);
        report.rows.push(Row {
            what: "Kafka ConsumerPerformance, read_committed, over the events".into(),
            count: events_total,
            seconds: events_total as f64 / raw_consumer.max(1e-9),
            note: "peer of the projection rows".into(),
            ratio: None,
        });
        Ok(raw_consumer)
    }

    /// Step 5: The projection catching up on the events, on SQLite and (with `BENCH_POSTGRES_URL`)
    /// PostgreSQL, each beside a bare upsert loop into the same database.
    async fn projections(
        &self,
        report: &mut Report,
        events_total: usize,
        raw_consumer: f64,
    ) -> anyhow::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        let sqlite = format!("sqlite://{}", self.dir.join("bench.db").display());
        let mut databases = vec![("SQLite", sqlite)];
        if let Ok(pg) = std::env::var("BENCH_POSTGRES_URL") {
            databases.push((
                "PostgreSQL",
                fresh_database(&pg, &self.prefix.replace('-', "_"))?,
            ));
        }
        let mut measured = Vec::new();
        for (label, url) in &databases {
            measured.push(
                self.projection_on(report, label, url, events_total, raw_consumer)
                    .await?,
            );
        }
        // The headline keys: the worse database.
        if let Some(worst) = measured.iter().min_by(|a, b| a.ratio.total_cmp(&b.ratio)) {
            report.figure("projection_events_per_s", worst.rate);
            report.figure("raw_db_upserts_per_s", worst.raw_db);
            report.figure("ratio_projection", worst.ratio);
        }
        Ok(())
    }

    /// One database of step 5: the projection's row and the bare upsert loop's.
    async fn projection_on(
        &self,
        report: &mut Report,
        label: &str,
        url: &str,
        events_total: usize,
        raw_consumer: f64,
    ) -> anyhow::Result<ProjectionFigures> {
        let mut row = projection(&self.args.bin_dir, &self.vars, url, label, events_total).await?;
        let raw_db_url = match label {
            "SQLite" => format!("sqlite://{}", self.dir.join("raw.db").display()),
            _ => fresh_database(
                &std::env::var("BENCH_POSTGRES_URL")?,
                &format!("{}_raw", self.prefix.replace('-', "_")),
            )?,
        };
        let raw_db = baselines::db_upserts(&raw_db_url, events_total, self.args.accounts).await?;
        let ratio = row.rate() / raw_consumer.min(raw_db).max(1e-9);
        row.ratio = Some(format!("{ratio:.2} × min(raw consumer, raw DB)"));
        let key = label.to_lowercase();
        report.figure(format!("projection_events_per_s_{key}"), row.rate());
        report.figure(format!("raw_db_upserts_per_s_{key}"), raw_db);
        report.figure(format!("ratio_projection_{key}"), ratio);
        let figures = ProjectionFigures {
            rate: row.rate(),
            raw_db,
            ratio,
        };
        report.rows.push(row);
        report.rows.push(Row {
            what: format!("bare batched upsert loop into the read model, {label}"),
            count: events_total,
            seconds: events_total as f64 / raw_db.max(1e-9),
            note: "event rows and upserts of the accounts they touch, 500 events per transaction, the faster statement shape for each database".into(),
            ratio: None,
        });
        Ok(figures)
    }

    /// Step 6: Latency at half the measured pipeline rate, open loop; and at a modest fixed rate,
    /// where the floor shows.
    async fn latencies(&self, report: &mut Report, commands_per_s: f64) -> anyhow::Result<()> {
        let (args, bootstrap) = (&self.args, &self.bootstrap);
        let half = latency_run(args, bootstrap, commands_per_s / 2.0, &self.dir).await?;
        record_latency(report, "", "at half the pipeline rate", &half);
        let low = latency_run(args, bootstrap, 1000.0, &self.dir).await?;
        record_latency(report, "_at_1000_per_s", "at 1000 commands/s", &low);
        // The floor: a bare transactional copy loop at the same rate on the same broker.
        let floor = self.floor().measure(1000.0, args.latency_seconds).await?;
        report.figure("floor_p50_ms_at_1000_per_s", floor.p50);
        report.figure("floor_p99_ms_at_1000_per_s", floor.p99);
        let ratio = |x: f64| x / floor.p99.max(1e-9);
        report.figure("ratio_result_p99_to_floor_p99", ratio(low.to_result.p99));
        report.figure(
            "ratio_projection_p99_to_floor_p99",
            ratio(low.to_projection.p99),
        );
        report.rows.push(Row {
            what: "floor: bare transactional copy loop at 1000 records/s, produce → copy readable"
                .into(),
            count: floor.n,
            seconds: args.latency_seconds as f64,
            note: format!(
                "p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; the service's p99 to the result is \
                 {:.2}× it (aim ≤ 2), to the projection {:.2}× (aim ≤ 3)",
                floor.p50,
                floor.p99,
                floor.max,
                ratio(low.to_result.p99),
                ratio(low.to_projection.p99)
            ),
            ratio: Some(format!("{:.2}× floor p99", ratio(low.to_result.p99))),
        });
        Ok(())
    }

    /// Step 7: Transfers through both services: throughput (closed loop, to ended on the
    /// projection) against `commands_per_s`, and latency to `completed` on the projection at
    /// 200 transfers/s against the single commands' p99 to the projection at 1000/s.
    async fn transfers(&self, report: &mut Report, commands_per_s: f64) -> anyhow::Result<()> {
        let prefix = format!("bench-{}", uuid::Uuid::new_v4().simple());
        let vars = service_vars(&self.bootstrap, &prefix, &self.args);
        let settings = Settings::from_vars(&vars)?;
        let command = Service::start(
            &self.args.bin_dir,
            "command-service",
            &vars,
            &[("INSTANCE_ID", "bench-transfers")],
        )?;
        command.wait_ready(Duration::from_secs(120)).await?;
        let sqlite = format!(
            "sqlite://{}",
            self.dir.join(format!("transfers-{prefix}.db")).display()
        );
        let projection = Service::start(
            &self.args.bin_dir,
            "projection-service",
            &vars,
            &[("PROJECTION_DATABASE_URL", sqlite.as_str())],
        )?;
        projection.wait_ready(Duration::from_secs(120)).await?;
        let client = CommandClient::connect(&settings).await?;
        let accounts = 1000;
        client
            .submit_all(
                &transfers::accounts(accounts),
                Duration::from_secs(60),
                |_| {},
            )
            .await?;
        let n = if self.args.quick { 5_000 } else { 20_000 };
        let batch = transfers::workload(accounts, n, 1);
        let in_log = transfers::ended_in_log(&settings, n, Duration::from_secs(600))?;
        let started = Instant::now();
        client
            .submit_all(&batch, Duration::from_secs(60), |_| {})
            .await?;
        let logged = in_log.await??.duration_since(started).as_secs_f64();
        transfers::wait_ended(&sqlite, n, Duration::from_secs(600)).await?;
        let seconds = started.elapsed().as_secs_f64();
        // Like the single commands' figure (produce → result): start → ended in the log.
        let per_s = n as f64 / logged.max(1e-9);
        let ratio = per_s / commands_per_s.max(1e-9);
        report.figure("transfers_per_s", per_s);
        report.figure("ratio_transfers_to_commands", ratio);
        report.figure(
            "transfers_per_s_to_projection",
            n as f64 / seconds.max(1e-9),
        );
        report.rows.push(Row {
            what: "transfers, closed loop: start → ended in the log (TransferCompleted/Failed)"
                .into(),
            count: n,
            seconds: logged,
            note: format!(
                "among {accounts} accounts; five steps (start, debit, credit, then settle and \
                 complete at once), 14 records per transfer against 2 per single command"
            ),
            ratio: Some(format!("{ratio:.2} × single commands/s (aim ≥ 0.33)")),
        });
        report.rows.push(Row {
            what: "transfers, closed loop: start → ended on the projection (SQLite)".into(),
            count: n,
            seconds,
            note: "five events per transfer to apply".into(),
            ratio: None,
        });
        let rate = 200.0;
        let open = transfers::workload(
            accounts,
            (rate as usize) * self.args.latency_seconds as usize,
            2,
        );
        let l = transfers::open_loop(&settings, &open, rate, &projection.url, 10).await?;
        report.figure("transfer_to_completed_p50_ms_at_200_per_s", l.p50);
        report.figure("transfer_to_completed_p99_ms_at_200_per_s", l.p99);
        let single_p99 = report
            .json
            .get("e2e_command_to_projection_p99_ms_at_1000_per_s")
            .and_then(serde_json::Value::as_f64);
        let ratio_p99 = single_p99.map(|s| l.p99 / s.max(1e-9));
        if let Some(r) = ratio_p99 {
            report.figure("ratio_transfer_p99_to_command_p99", r);
        }
        report.rows.push(Row {
            what: "transfer latency, open loop at 200 transfers/s: start → completed on the projection".into(),
            count: l.n,
            seconds: open.len() as f64 / rate,
            note: format!(
                "{} sampled: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
                l.n, l.p50, l.p99, l.max
            ),
            ratio: Some(match (ratio_p99, single_p99) {
                (Some(r), Some(s)) => format!("p99 {r:.1} × a single command's to the projection ({s:.1} ms at 1000/s; aim ≤ 4)"),
                _ => "no single-command p99 to compare".into(),
            }),
        });
        command.stop();
        projection.stop();
        Ok(())
    }

    /// Step 8: The peer, if scripts/bench-peer ran (its figures beside ours).
    fn peer(&self, report: &mut Report, commands_per_s: f64) {
        let peer_file = self
            .args
            .json
            .parent()
            .map(|d| d.join("peer.json"))
            .unwrap_or_else(|| PathBuf::from("peer.json"));
        let Some(peer) = std::fs::read_to_string(&peer_file)
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        else {
            return;
        };
        let Some(peer_rate) = peer["peer_commands_per_s"].as_f64() else {
            return;
        };
        report.figure("peer_commands_per_s", peer_rate);
        report.figure("peer", peer.clone());
        let commands = peer["commands"].as_u64().unwrap_or(0) as usize;
        report.rows.push(Row {
            what: format!(
                "peer: {}",
                peer["peer"].as_str().unwrap_or("cqrs-es + postgres-es")
            ),
            count: commands,
            seconds: commands as f64 / peer_rate.max(1e-9),
            note: format!(
                "same workload shape on PostgreSQL, concurrency {}",
                peer["concurrency"]
            ),
            ratio: Some(format!(
                "bank-es pipeline = {:.1} × peer",
                commands_per_s / peer_rate.max(1e-9)
            )),
        });
    }

    /// Writes the JSON figures (with the run's parameters) and the Markdown table.
    fn write(&self, mut report: Report) -> anyhow::Result<()> {
        let args = &self.args;
        report.figure("kafka_version", kafka_version());
        report.figure("librdkafka_version", rdkafka::util::get_rdkafka_version().1);
        report.figure("partitions", args.partitions);
        report.figure("commit_interval_ms", args.commit_interval_ms);
        report.figure("commands", args.commands);
        report.figure("accounts", args.accounts);
        if let Some(parent) = args.json.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(
            &args.json,
            serde_json::to_string_pretty(&serde_json::Value::Object(report.json))?,
        )?;
        eprintln!("figures written to {}", args.json.display());

        let table = render(&report.rows, args);
        println!("{table}");
        if let Some(parent) = args.out.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&args.out, &table)?;
        eprintln!("written to {}", args.out.display());
        Ok(())
    }
}

/// One database's projection figures (step 5).
struct ProjectionFigures {
    /// Events per second the projection applied.
    rate: f64,
    /// Events per second of the bare upsert loop.
    raw_db: f64,
    /// `rate` against the slower of the raw consumer and the raw database.
    ratio: f64,
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
                currency: None,
            }
        } else {
            Command::Withdraw {
                amount_minor: amount,
                currency: None,
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
async fn memory_per_aggregate(
    args: &Args,
    bootstrap: &str,
    rss_empty: f64,
) -> anyhow::Result<(Row, f64)> {
    let prefix = format!("bench-{}", uuid::Uuid::new_v4().simple());
    let vars = service_vars(bootstrap, &prefix, args);
    let settings = Settings::from_vars(&vars)?;
    let extra = [("INSTANCE_ID", "bench-mem")];
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
    let row = Row {
        what: format!("command-service memory with {} aggregates", args.aggregates),
        count: args.aggregates,
        seconds: measured.seconds,
        note: format!(
            "RSS {:.0} MB after restart vs {:.0} MB empty: {:.0} MB per million aggregates; restart until ready {:.2} s",
            measured.rss_mb, rss_empty, per_million, measured.seconds
        ),
        ratio: Some(format!("{per_million:.0} MB / million aggregates")),
    };
    Ok((row, per_million))
}

/// The environment of the services for one benchmark topic prefix.
fn service_vars(bootstrap: &str, prefix: &str, args: &Args) -> Vec<(String, String)> {
    vec![
        ("KAFKA_BOOTSTRAP_SERVERS".to_owned(), bootstrap.to_owned()),
        ("TOPIC_PREFIX".to_owned(), prefix.to_owned()),
        (
            "COMMAND_STATE_DIR".to_owned(),
            args.json
                .parent()
                .unwrap_or(std::path::Path::new("."))
                .join("command-state")
                .display()
                .to_string(),
        ),
        ("PARTITIONS".to_owned(), args.partitions.to_string()),
        (
            "COMMIT_INTERVAL_MS".to_owned(),
            args.commit_interval_ms.to_string(),
        ),
    ]
}

/// Both services on a fresh prefix, accounts opened, then `--latency-seconds` of open-loop load
/// at `rate`.
async fn latency_run(
    args: &Args,
    bootstrap: &str,
    rate: f64,
    dir: &std::path::Path,
) -> anyhow::Result<latency::Latencies> {
    let prefix = format!("bench-{}", uuid::Uuid::new_v4().simple());
    let vars = service_vars(bootstrap, &prefix, args);
    let settings = Settings::from_vars(&vars)?;
    let command = Service::start(
        &args.bin_dir,
        "command-service",
        &vars,
        &[("INSTANCE_ID", "bench-latency")],
    )?;
    command.wait_ready(Duration::from_secs(120)).await?;
    // A database of this prefix's own: one read model per database.
    let sqlite = format!(
        "sqlite://{}",
        dir.join(format!("latency-{prefix}.db")).display()
    );
    let projection = Service::start(
        &args.bin_dir,
        "projection-service",
        &vars,
        &[("PROJECTION_DATABASE_URL", sqlite.as_str())],
    )?;
    projection.wait_ready(Duration::from_secs(120)).await?;
    let total = (rate * args.latency_seconds as f64) as usize + args.accounts;
    let commands = workload(args.accounts, total.max(args.accounts + 1));
    let (opens, rest) = commands.split_at(args.accounts);
    CommandClient::connect(&settings)
        .await?
        .submit_all(opens, Duration::from_secs(60), |_| {})
        .await?;
    let measured = latency::open_loop(&settings, rest, rate, &projection.url, 20).await?;
    command.stop();
    projection.stop();
    Ok(measured)
}

/// Adds a latency measurement's keys (with `suffix`) and its row.
fn record_latency(report: &mut Report, suffix: &str, label: &str, l: &latency::Latencies) {
    for (key, value) in [
        ("e2e_command_to_result_p50_ms", l.to_result.p50),
        ("e2e_command_to_result_p99_ms", l.to_result.p99),
        ("e2e_command_to_projection_p50_ms", l.to_projection.p50),
        ("e2e_command_to_projection_p99_ms", l.to_projection.p99),
    ] {
        report.figure(format!("{key}{suffix}"), value);
    }
    report.rows.push(Row {
        what: format!("latency, open loop {label}: produce → result / → on the projection"),
        count: l.to_result.n,
        seconds: l.sent as f64 / l.rate.max(1e-9),
        note: format!(
            "sent at {:.0}/s; to the result p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; to the \
             account at its version on the projection (SQLite, {} sampled) p50 {:.1} ms, p99 \
             {:.1} ms",
            l.rate,
            l.to_result.p50,
            l.to_result.p99,
            l.to_result.max,
            l.to_projection.n,
            l.to_projection.p50,
            l.to_projection.p99
        ),
        ratio: Some(format!(
            "p99 {:.1} ms / {:.1} ms",
            l.to_result.p99, l.to_projection.p99
        )),
    });
}

/// The version of the Kafka jars `scripts/kafka` runs.
fn kafka_version() -> String {
    Process::new("scripts/kafka-tool")
        .arg("org.apache.kafka.tools.TopicCommand")
        .arg("--version")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| "unknown".into())
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
            .env(
                "RUST_LOG",
                std::env::var("BENCH_SERVICE_LOG").unwrap_or_else(|_| "warn".into()),
            )
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

    /// SIGKILL: no goodbye, nothing flushed.
    fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The value of an unlabelled gauge from `/metrics`.
    async fn gauge(&self, name: &str) -> Option<f64> {
        let text = reqwest::get(format!("{}/metrics", self.url))
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
    }
}

/// The size of the command-service's dedupe store file for `instance` under the variables'
/// `COMMAND_STATE_DIR` and `TOPIC_PREFIX`.
fn dedupe_store_bytes(vars: &[(String, String)], instance: &str) -> u64 {
    let var = |name: &str| {
        vars.iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    // `<dir>/<cluster id>/<prefix>/<instance>.redb`: the bench's broker is the one cluster.
    let Ok(clusters) = std::fs::read_dir(var("COMMAND_STATE_DIR")) else {
        return 0;
    };
    clusters
        .flatten()
        .map(|c| {
            c.path()
                .join(var("TOPIC_PREFIX"))
                .join(format!("{instance}.redb"))
        })
        .filter_map(|path| std::fs::metadata(path).ok())
        .map(|m| m.len())
        .sum()
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
        "# Benchmark\n\n{} on one broker (Apache Kafka {}, KRaft, loopback; librdkafka {}), {} \
         partitions, {} accounts, {} commands, COMMIT_INTERVAL_MS={}; one run{}. Machine: {} \
         cores ({}), {} GiB, shared by the broker, the services and the load generator.\n\n\
         | measurement | count | seconds | per second | vs peer |\n|---|---:|---:|---:|---:|\n",
        chrono::Utc::now().format("%Y-%m-%d %H:%M UTC"),
        kafka_version(),
        rdkafka::util::get_rdkafka_version().1,
        args.partitions,
        args.accounts,
        args.commands,
        args.commit_interval_ms,
        if args.quick { " (--quick)" } else { "" },
        std::thread::available_parallelism().map_or(0, usize::from),
        cpu_model(),
        memory_gib(),
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

/// The CPU model from /proc/cpuinfo.
fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            let line = info
                .lines()
                .find(|l| l.starts_with("model name"))?
                .to_owned();
            Some(line.split_once(':')?.1.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

/// Total memory in GiB from /proc/meminfo.
fn memory_gib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|info| {
            let kb: u64 = info
                .lines()
                .next()?
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()?;
            Some(kb / 1024 / 1024)
        })
        .unwrap_or(0)
}
