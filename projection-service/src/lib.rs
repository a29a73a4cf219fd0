//! The projection service: consumes `<prefix>.events` exactly once in effect into a read model
//! (SQLite by default, PostgreSQL with a `postgres://` URL) and answers queries over HTTP,
//! including the state of an account as of a time or a version.
//!
//! Parts:
//! - [`model`]: the seam: what one aggregate type's read model provides ([`model::ReadModel`]).
//! - [`accounts`]: the bank account's read model (its tables, writes and queries).
//! - [`db`]: the machinery's tables, migrations, batch write, swap and backend-error translation.
//! - [`plan`]: the pure rules of a batch (apply / duplicate / park / dead-letter).
//! - [`projector`]: the consumer loop: batches, one transaction per batch with the offsets,
//!   rebalance handling, lag and readiness.
//! - [`decode`]: decoding with the schema registry's failures sorted into wait and dead-letter.
//! - [`dlq`]: the dead-letter topic.
//! - [`http`]: the query API and the explorer page at `/`.
//! - [`rebuild`]: replay the whole topic into fresh tables and swap them in.
//! - [`metrics`]: Prometheus series.
//!
//! [`run_model`] wires them together for any read model, [`run`] for the bank account's;
//! `main.rs` only parses the command line and calls it (or [`rebuild::rebuild`]). Tests call
//! [`run`] in-process with a listener on port 0.

pub mod accounts;
pub mod db;
pub mod decode;
pub(crate) mod dlq;
pub(crate) mod http;
pub mod identity;
pub(crate) mod metrics;
pub mod model;
pub(crate) mod plan;
pub mod projector;
pub mod rebuild;
pub mod transfers;

pub use http::AppState;
use std::future::Future;

use std::sync::Arc;
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use shared::codec::EncodeError;
use shared::kafka::{TopicError, TopicSpec, Topics, ensure_topics};
use shared::shutdown::Shutdown;
use shared::{EventCodec, Settings};
use tokio::net::TcpListener;

use crate::accounts::Accounts;
use crate::db::{Database, StoreError, Tables};
use crate::decode::Decoder;
use crate::dlq::DeadLetterQueue;
use crate::model::ReadModel;
use crate::projector::{OffsetBook, ProjectionContext, Projector, ProjectorError, Status};

/// Why the service could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The topics could not be created or checked.
    #[error("kafka topics: {0}")]
    Topics(#[from] TopicError),
    /// The read-model database failed.
    #[error("read-model database: {0}")]
    Store(#[from] StoreError),
    /// A Kafka client could not be created or used.
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    /// The schema-registry client could not be configured.
    #[error("schema registry: {0}")]
    Codec(#[from] EncodeError),
    /// The HTTP server failed.
    #[error("http server: {0}")]
    Http(#[from] std::io::Error),
    /// Who may call the API cannot be settled (a bad keys file, open beyond loopback).
    #[error(transparent)]
    Access(#[from] shared::auth::AccessError),
    /// The consumer loop failed for good.
    #[error(transparent)]
    Projector(#[from] ProjectorError),
    /// A setting of this service's own is invalid.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The database holds another read model, or could not say which.
    #[error(transparent)]
    Identity(#[from] identity::IdentityError),
    /// A rebuild's tables would take accounts back (it dead-lettered events the live projection
    /// applied): nothing was swapped in.
    #[error(
        "the rebuild refused to swap its tables in: accounts would go back to an earlier \
         version (account, live version, rebuilt version): {0:?}; the rebuild dead-lettered \
         events the live projection applied (a schema the registry lost, stricter checks): see \
         the dead letters, fix their cause and rebuild again; the live tables are unchanged"
    )]
    SwapRefused(Vec<(String, i64, Option<i64>)>),
    /// A rebuild was interrupted (nothing was swapped in).
    #[error("rebuild interrupted before the swap; the live tables are unchanged")]
    Interrupted,
}

/// Consumer settings shared by the live projection and the rebuild: read_committed, no
/// auto-commit (the database holds the offsets), start at the beginning when nothing is stored.
pub fn consumer_config(settings: &Settings, group: &str) -> ClientConfig {
    let mut config = settings.kafka.client_config();
    config
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("isolation.level", "read_committed")
        .set("auto.offset.reset", "earliest")
        .set("enable.partition.eof", "false")
        // A crashed instance's partitions move on after 10 s rather than librdkafka's 45 s.
        .set("session.timeout.ms", "10000")
        .set("heartbeat.interval.ms", "1000");
    config
}

/// Creates `<prefix>.events` (PARTITIONS partitions, `retention.ms=-1`) and
/// `<prefix>.events.dlq` when missing; returns the events topic's partition count.
pub async fn ensure_projection_topics(settings: &Settings) -> Result<i32, TopicError> {
    let topics = Topics::new(&settings.topic_prefix);
    let counts = ensure_topics(
        &settings.kafka,
        &[
            TopicSpec {
                name: topics.events(),
                partitions: settings.partitions,
                config: vec![("retention.ms", "-1".into())],
            },
            TopicSpec {
                name: topics.events_dlq(),
                partitions: settings.partitions,
                config: vec![],
            },
        ],
        Duration::from_secs(30),
    )
    .await?;
    shared::kafka::verify_topics(&settings.kafka, &settings.topic_prefix, &counts, &[]).await?;
    Ok(counts.first().map_or(settings.partitions, |(_, n)| *n))
}

/// Runs the bank account's projection and its HTTP API: [`run_model`] with
/// [`accounts::Accounts`].
pub async fn run(
    settings: Settings,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServiceError> {
    run_model::<Accounts>(settings, listener, shutdown).await
}

/// Runs read model `M`'s projection and its HTTP API on `listener` until `shutdown` resolves:
/// then the current batch is finished and committed, the consumer leaves its group and the
/// server drains. Returns an error if the projection cannot go on.
pub async fn run_model<M: ReadModel>(
    settings: Settings,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServiceError> {
    let access = shared::auth::HttpAccess::for_listener(
        &settings.http,
        listener.local_addr()?,
        "projection-service",
    )?;
    let tls = shared::serve::tls_config(&settings.http).await?;
    let topics = Topics::new(&settings.topic_prefix);
    let topic = topics.events();
    ensure_projection_topics(&settings).await?;
    let db = Database::connect_for::<M>(&settings.projection_database_url).await?;
    let identity = identity::claim(&db, &settings.topic_prefix, &topic).await?;
    let group = identity.group_id(settings.projection_group_id.as_deref());
    let codec = Arc::new(EventCodec::for_settings(&settings)?.serving::<M::Aggregate>());
    let tables = Tables::live_of::<M>();
    let book = Arc::new(OffsetBook::new(db.offsets(&tables, &topic).await?));
    let status = Arc::new(Status::default());
    let metrics_handle = metrics::handle();
    let consumer = subscribe(&settings, &group, &topic, &book)?;
    let dlq = DeadLetterQueue::new(&settings.kafka, topics.events_dlq(), topic.clone())?;
    let unknown_schema_retry = settings.projection_unknown_schema_retry;
    let projector = Projector::<M>::live(
        db.clone(),
        topic.clone(),
        Decoder::new(&settings, codec.clone(), unknown_schema_retry),
        dlq,
        book.clone(),
        status.clone(),
    );
    let stop = stop_on(shutdown);
    let app = http::router::<M>(http::AppState {
        db: db.clone(),
        tables,
        access,
        status: status.clone(),
        codec,
        metrics: metrics_handle.clone(),
        topic: topic.clone(),
        // Under the projection's group, which its principal is granted (README, Security).
        dead_letters: dlq::DeadLetterReader::new(settings.kafka.clone(), topics.events_dlq())
            .with_group_id(format!("{group}.dead-letters")),
        stall_after: settings.projection_stall_after,
    });
    let addr = listener.local_addr()?;
    tracing::info!(%addr, %topic, %group, read_model_id = %identity.read_model_id, database = %redact(&settings.projection_database_url), "projection-service started");
    let server = spawn_server(listener, app, tls, stop.clone());
    let watermarks: Arc<BaseConsumer> = Arc::new(settings.kafka.client_config().create()?);
    let dead_letter_count = tokio::spawn(dlq::count_monitor(
        watermarks.clone(),
        topics.events_dlq(),
        status.clone(),
        stop.clone(),
    ));
    let mut monitor = tokio::spawn(projector::monitor(
        consumer.clone(),
        watermarks,
        topic.clone(),
        book,
        status,
        stop.clone(),
    ));
    let upkeep = tokio::spawn(metrics::upkeep(metrics_handle));

    let result = tokio::select! {
        result = projector.run(&consumer, stop.clone()) => result,
        Ok(Err(e)) = &mut monitor => Err(e),
    };
    if let Err(e) = &result {
        tracing::error!(error = %e, "projection stopped");
    }
    stop.trigger();
    if !monitor.is_finished() {
        let _ = monitor.await;
    }
    let _ = dead_letter_count.await;
    upkeep.abort();
    let served = server.await;
    // Closing the consumer leaves the group (blocking: off the runtime's threads).
    let _ = tokio::task::spawn_blocking(move || drop(consumer)).await;
    db.close().await;
    tracing::info!("projection-service stopped");
    result?;
    match served {
        Ok(r) => r.map_err(ServiceError::Http),
        Err(join) => Err(ServiceError::Http(std::io::Error::other(join))),
    }
}

/// The live consumer, a member of `group` (the read model's, [`identity::Identity::group_id`]),
/// subscribed to `topic`; its partitions are assigned at the offsets in `book`.
fn subscribe(
    settings: &Settings,
    group: &str,
    topic: &str,
    book: &Arc<OffsetBook>,
) -> Result<Arc<StreamConsumer<ProjectionContext>>, ServiceError> {
    let consumer: StreamConsumer<ProjectionContext> = consumer_config(settings, group)
        .create_with_context(ProjectionContext::new(topic.to_owned(), book.clone()))?;
    consumer.subscribe(&[topic])?;
    Ok(Arc::new(consumer))
}

/// The stop signal every task watches, triggered when `shutdown` resolves.
pub(crate) fn stop_on(shutdown: impl Future<Output = ()> + Send + 'static) -> Shutdown {
    let stop = Shutdown::new();
    let trigger = stop.clone();
    tokio::spawn(async move {
        shutdown.await;
        trigger.trigger();
    });
    stop
}

/// Serves `app` on `listener` (over HTTPS with `tls`) until the stop signal, then drains.
fn spawn_server(
    listener: TcpListener,
    app: axum::Router,
    tls: Option<axum_server::tls_rustls::RustlsConfig>,
    stop: Shutdown,
) -> tokio::task::JoinHandle<std::io::Result<()>> {
    tokio::spawn(shared::serve::serve(listener, app, tls, async move {
        stop.wait().await;
    }))
}

/// The URL without its password, for logs ([`shared::config::redact_url`]).
pub fn redact(url: &str) -> String {
    shared::config::redact_url(url)
}
