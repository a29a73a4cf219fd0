//! command-service: validates commands against each aggregate's state and appends versioned
//! events to the aggregate's Kafka partition, exactly once, with Kafka transactions.
//!
//! - [`engine`]: the consumer-group member and transactional producer (one writer per partition).
//! - [`restore`]: rebuilding a partition's state (snapshots, events, results) on assignment.
//! - [`state`]: the in-memory partition state and the open transaction's overlay.
//! - [`results`]: routing command results to waiting HTTP requests.
//! - [`http`]: the HTTP API.
//! - [`metrics`]: Prometheus metric names.
//!
//! [`run`] ties them together: it creates the topics (refusing to start when they are not
//! co-partitioned), starts the engine thread, the result listener and the HTTP server, and stops
//! them in order on shutdown.

pub mod dedupe;
pub mod engine;
pub mod http;
pub mod metrics;
pub mod restore;
pub mod results;
pub mod state;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use shared::aggregate::Aggregate;
use shared::kafka::{RetentionFloor, TopicSpec, Topics, check_copartitioned, ensure_topics};
use shared::shutdown::Shutdown;
use shared::{Bank, EventCodec, Settings};
use tokio::net::TcpListener;

/// How much longer than the dedupe window a new results topic keeps its records.
pub const RESULTS_RETENTION_MARGIN: Duration = Duration::from_secs(24 * 3600);

/// The topics the service needs, with their configuration.
pub fn topic_specs(settings: &Settings) -> Vec<TopicSpec> {
    let topics = Topics::new(&settings.topic_prefix);
    let n = settings.partitions;
    // A day beyond the window: a margin for records from before the topic was stamped by the
    // brokers (their timestamps were set by writers' clocks).
    let results_retention = (settings
        .dedupe_window
        .max(std::time::Duration::from_secs(7 * 24 * 3600))
        + RESULTS_RETENTION_MARGIN)
        .as_millis()
        .to_string();
    vec![
        TopicSpec {
            name: topics.commands(),
            partitions: n,
            config: vec![],
        },
        TopicSpec {
            name: topics.events(),
            partitions: n,
            config: vec![
                ("retention.ms", "-1".into()),
                ("retention.bytes", "-1".into()),
            ],
        },
        // Compacted, with segments rolled hourly so that compaction keeps up: a restore reads
        // about one snapshot per live aggregate.
        TopicSpec {
            name: topics.snapshots(),
            partitions: n,
            config: vec![
                ("cleanup.policy", "compact".into()),
                ("segment.ms", "3600000".into()),
            ],
        },
        TopicSpec {
            name: topics.command_checkpoints(),
            partitions: n,
            config: vec![
                ("cleanup.policy", "compact".into()),
                ("segment.ms", "3600000".into()),
            ],
        },
        // Who holds each INSTANCE_ID; co-partitioned only so that the partition check stays
        // simple (a lease lives on its INSTANCE_ID's canonical partition).
        TopicSpec {
            name: topics.command_instances(),
            partitions: n,
            // Stamped by the brokers: a lease's delivery tells a starting writer their time.
            config: vec![
                ("cleanup.policy", "compact".into()),
                ("message.timestamp.type", "LogAppendTime".into()),
            ],
        },
        // Co-partitioned too: results are written to the aggregate's partition, which makes a
        // partition's results readable on restore: the dedupe window, kept at least as long.
        TopicSpec {
            name: topics.command_results(),
            partitions: n,
            // Stamped by the brokers: the dedupe window (its expiry, its restore, the broker's
            // retention) rests on their clock, never on a writer's.
            config: vec![
                ("retention.ms", results_retention),
                ("retention.bytes", "-1".into()),
                ("message.timestamp.type", "LogAppendTime".into()),
            ],
        },
    ]
}

/// How long a registry that cannot be reached is retried at start.
const REGISTRY_START_TIMEOUT: Duration = Duration::from_secs(30);

/// Registers the current event schemas with their per-subject compatibility rule
/// ([`shared::registry::prepare`]) before any event is written: a schema changed incompatibly
/// stops the service here, with the registry's reason. A registry that cannot be reached is
/// retried for a while; any other refusal is tried again twice (instances starting together make
/// the registry write the same schemas concurrently) before it stops the service.
async fn prepare_registry<A: Aggregate>(
    url: &str,
    access: &shared::config::RegistryAccess,
    topic: &str,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + REGISTRY_START_TIMEOUT;
    let mut refusals = 0;
    let registry = shared::registry::SchemaRegistry::with_access(url, access)?;
    loop {
        match shared::registry::prepare_for::<A>(&registry, topic).await {
            Ok(subjects) => {
                for (subject, id) in &subjects {
                    tracing::info!(%subject, id, compatibility = shared::registry::COMPATIBILITY, "event schema registered");
                }
                return Ok(());
            }
            Err(e @ shared::registry::RegistryError::Unreachable { .. })
                if tokio::time::Instant::now() < deadline =>
            {
                tracing::warn!(error = %e, "schema registry not reachable yet; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) if refusals < 2 => {
                refusals += 1;
                tracing::warn!(error = %e, "schema registry refused; trying again");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(anyhow::anyhow!(e).context("cannot prepare the schema registry")),
        }
    }
}

/// The whole process for the aggregate type `A`: tracing, settings from the environment, the
/// HTTP listener on `COMMAND_HTTP_ADDR`, [`run_aggregate`] until SIGTERM or Ctrl-C; exits 1
/// with the reason on a fatal error. `name` names the program in that message.
pub async fn main_for<A: Aggregate>(name: &str) {
    shared::runtime::init_tracing();
    let outcome = start::<A>().await;
    // Exported spans not sent yet go out now (nothing to do unless OTLP export is on).
    let _ = tokio::task::spawn_blocking(shared::runtime::shutdown_tracing).await;
    if let Err(e) = outcome {
        tracing::error!("{e:#}");
        eprintln!("{name}: {e:#}");
        std::process::exit(1);
    }
}

async fn start<A: Aggregate>() -> anyhow::Result<()> {
    let settings = Settings::from_env()?;
    let listener = TcpListener::bind(settings.command_http_addr)
        .await
        .with_context(|| {
            format!(
                "cannot listen on COMMAND_HTTP_ADDR={}",
                settings.command_http_addr
            )
        })?;
    run_aggregate::<A>(settings, listener, shared::runtime::shutdown_signal()).await
}

/// Runs the service for the bank (accounts and the transfers between them) until `shutdown` resolves or the engine stops on a fatal
/// error.
pub async fn run(
    settings: Settings,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    run_aggregate::<Bank>(settings, listener, shutdown).await
}

/// Runs the service for the aggregate type `A` (its commands on `<prefix>.commands`, its events
/// on `<prefix>.events`) until `shutdown` resolves or the engine stops on a fatal error.
pub async fn run_aggregate<A: Aggregate>(
    settings: Settings,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let settings = Arc::new(settings);
    let access = shared::auth::HttpAccess::for_listener(
        &settings.http,
        listener.local_addr()?,
        "command-service",
    )?;
    let tls = shared::serve::tls_config(&settings.http).await?;
    let counts = ensure_topics(
        &settings.kafka,
        &topic_specs(&settings),
        Duration::from_secs(30),
    )
    .await
    .context("cannot create or inspect the topics")?;
    let partitions = check_copartitioned(&counts)?;
    // A result must outlive its dedupe window, or a re-sent command would be decided again.
    let floors = [RetentionFloor {
        topic: Topics::new(&settings.topic_prefix).command_results(),
        at_least: settings.dedupe_window,
    }];
    shared::kafka::verify_topics(&settings.kafka, &settings.topic_prefix, &counts, &floors).await?;
    if partitions != settings.partitions {
        anyhow::bail!(
            "the topics have {partitions} partitions but PARTITIONS={}; set PARTITIONS={partitions} \
             (the canonical partitioner depends on it)",
            settings.partitions
        );
    }
    let codec = Arc::new(EventCodec::for_settings(&settings)?.serving::<A>());
    if let Some(url) = &settings.schema_registry_url {
        let topic = Topics::new(&settings.topic_prefix).events();
        prepare_registry::<A>(url, &settings.schema_registry_access, &topic).await?;
    }
    let metrics = metrics::handle();
    let status = Arc::new(engine::Status::default());
    let stop = Shutdown::new();

    let waiters = results::ResultWaiters::default();
    let listener_task = waiters
        .start(&settings)
        .context("cannot start the result listener")?;
    let engine_thread = start_engine::<A>(&settings, &codec, &status, &stop)?;

    let producer = settings
        .kafka
        .producer_config()
        .set("linger.ms", "1")
        // Bounds how long POST /commands waits for Kafka to take the command.
        .set("message.timeout.ms", "5000")
        .create()
        .context("cannot create the command producer")?;
    let state = http::AppState {
        settings: Arc::clone(&settings),
        producer,
        waiters,
        status: Arc::clone(&status),
        shutdown: stop.clone(),
        metrics,
        read_command: http::read_command::<A::Command>,
        access,
    };
    tracing::info!(addr = %listener.local_addr()?, "command-service listening");

    // Stop on the caller's signal or when the engine fails.
    let stopping = {
        let stop = stop.clone();
        async move {
            tokio::select! {
                _ = shutdown => stop.trigger(),
                _ = stop.wait() => {},
            }
        }
    };
    shared::serve::serve(listener, http::router(state), tls, stopping).await?;

    stop.trigger();
    listener_task.abort();
    tokio::task::spawn_blocking(move || engine_thread.join())
        .await
        .context("engine thread join")?
        .map_err(|_| anyhow::anyhow!("the engine thread panicked"))?;
    if let Some(reason) = stop.failure() {
        anyhow::bail!(reason);
    }
    tracing::info!("command-service stopped");
    Ok(())
}

/// Starts the engine on a thread of its own. However it ends (an error at start, a fatal error,
/// a panic), `stop` is failed with the reason, which stops the HTTP side too.
fn start_engine<A: Aggregate>(
    settings: &Arc<Settings>,
    codec: &Arc<EventCodec>,
    status: &Arc<engine::Status>,
    stop: &Shutdown,
) -> anyhow::Result<std::thread::JoinHandle<()>> {
    let (settings, codec, status, stop) = (
        Arc::clone(settings),
        Arc::clone(codec),
        Arc::clone(status),
        stop.clone(),
    );
    let runtime = tokio::runtime::Handle::current();
    std::thread::Builder::new()
        .name("command-engine".into())
        .spawn(move || {
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                engine::run_engine::<A>(settings, codec, runtime, status, stop.clone())
            }));
            match outcome {
                Ok(Ok(())) => {}
                Ok(Err(e)) => stop.fail(e.to_string()),
                Err(_) => stop.fail("the command engine panicked"),
            }
        })
        .context("cannot start the engine thread")
}
