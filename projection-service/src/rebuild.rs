//! `projection-service rebuild`: replays `<prefix>.events` from the beginning into fresh tables
//! and swaps them in, while a running service keeps answering from the old ones.
//!
//! 1. Capture the end (high watermark) of every partition.
//! 2. Re-create `accounts_rebuild`, `account_events_rebuild`, `projection_offsets_rebuild` and
//!    `parked_events_rebuild`.
//! 3. Read every partition from offset 0 with its own consumer (assigned, read_committed, no
//!    group membership, nothing committed to Kafka) up to the captured ends, through the same
//!    projector as the live service. Poison messages are dead-lettered again (the live service
//!    may not have reached them before the swap moves its offsets past them; the DLQ is
//!    at-least-once).
//! 4. Store the offsets reached and rename the new tables into place in one transaction (the
//!    old ones are dropped in it too), **only if no live offset is ahead of them**, checked
//!    under the swap's locks. If the live projection got further meanwhile, capture the ends
//!    again, read on to them and try again: a reader never sees an account go back in time.
//!
//! **A running service across the swap.** Queries name the tables, so they see the old set
//! until the swap commits and the new set after it (SQLite and PostgreSQL re-prepare statements
//! on a schema change). The running consumer keeps writing the old tables during the rebuild;
//! after the swap the stored offsets are the rebuild's, at or past what the consumer last
//! stored. The consumer notices at its next batch (the offsets compare-and-set fails and
//! nothing is written) or within a second when idle (it re-reads the stored offsets), seeks
//! every partition to the stored offset and applies the events produced after it into the new
//! tables. Nothing is lost and nothing applied twice; no restart is needed. Events it
//! dead-letters in that stretch may be dead-lettered a second time.

use std::future::Future;
use std::io::IsTerminal;
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressState, ProgressStyle};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use shared::kafka::Topics;
use shared::shutdown::Shutdown;
use shared::{EventCodec, Settings};

use crate::accounts::Accounts;
use crate::db::{Database, PartitionOffset, Swap, Tables};
use crate::decode::Decoder;
use crate::dlq::DeadLetterQueue;
use crate::model::ReadModel;
use crate::projector::{BatchOutcome, Collected, OffsetBook, Projector, collect};
use crate::{ServiceError, consumer_config, ensure_projection_topics};

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// A progress bar when stderr is a terminal, log lines otherwise.
    Auto,
    /// Log lines every two seconds.
    Log,
    /// Nothing.
    Quiet,
}

/// What a rebuild did.
#[derive(Debug, Clone, Default)]
pub struct RebuildReport {
    /// Messages read (events and poison).
    pub messages: u64,
    /// Events applied.
    pub applied: u64,
    /// Duplicates skipped.
    pub duplicates: u64,
    /// Events parked behind gaps.
    pub parked: u64,
    /// Poison messages skipped.
    pub poison: u64,
    /// The next offsets swapped in, per partition: at least where the live projection was.
    pub ends: Vec<PartitionOffset>,
    /// Wall time.
    pub elapsed: Duration,
    /// The throwaway consumer group it read with (assigned partitions, nothing committed).
    pub group: String,
}

impl RebuildReport {
    /// Messages per second over the whole rebuild.
    pub fn rate(&self) -> f64 {
        self.messages as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    fn log(&self) {
        tracing::info!(
            messages = self.messages,
            applied = self.applied,
            duplicates = self.duplicates,
            parked = self.parked,
            poison = self.poison,
            events_per_sec = self.rate().round(),
            elapsed_ms = self.elapsed.as_millis() as u64,
            "rebuild swapped in"
        );
    }
}

struct Reporter {
    bar: Option<ProgressBar>,
    log: bool,
    total: u64,
    done: u64,
    started: Instant,
    last_log: Instant,
}

impl Reporter {
    fn new(mode: Progress, total: u64) -> Self {
        let tty = std::io::stderr().is_terminal();
        let bar = (mode == Progress::Auto && tty).then(|| {
            let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
            if let Ok(style) = ProgressStyle::with_template(
                "{spinner} rebuild [{elapsed_precise}] {wide_bar} {pos}/{len} events \
                 ({rate} events/s, ETA {eta})",
            ) {
                bar.set_style(style.with_key(
                    "rate",
                    |state: &ProgressState, w: &mut dyn std::fmt::Write| {
                        let _ = write!(w, "{:.0}", state.per_sec());
                    },
                ));
            }
            bar
        });
        Reporter {
            log: mode == Progress::Log || (mode == Progress::Auto && !tty),
            bar,
            total,
            done: 0,
            started: Instant::now(),
            last_log: Instant::now(),
        }
    }

    fn advance(&mut self, n: u64) {
        self.done += n;
        if let Some(bar) = &self.bar {
            bar.inc(n);
        }
        if self.log && self.last_log.elapsed() >= Duration::from_secs(2) {
            self.last_log = Instant::now();
            let rate = self.done as f64 / self.started.elapsed().as_secs_f64().max(1e-9);
            let eta = self.total.saturating_sub(self.done) as f64 / rate.max(1e-9);
            tracing::info!(
                done = self.done,
                total = self.total,
                events_per_sec = rate.round(),
                eta_secs = eta.round(),
                "rebuild progress"
            );
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// Rebuilds the bank account's read model: [`rebuild_model`] with [`Accounts`].
pub async fn rebuild(
    settings: &Settings,
    progress: Progress,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<RebuildReport, ServiceError> {
    rebuild_model::<Accounts>(settings, progress, shutdown).await
}

/// Replays the events topic into fresh tables of read model `M` and swaps them in. `shutdown`
/// interrupts it before the swap (the live tables stay as they were).
pub async fn rebuild_model<M: ReadModel>(
    settings: &Settings,
    progress: Progress,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<RebuildReport, ServiceError> {
    let started = Instant::now();
    let topics = Topics::new(&settings.topic_prefix);
    let topic = topics.events();
    let partitions = ensure_projection_topics(settings).await?;
    let db = Database::connect_for::<M>(&settings.projection_database_url).await?;
    let codec = Arc::new(EventCodec::for_settings(settings)?.serving::<M::Aggregate>());
    crate::identity::claim(&db, &settings.topic_prefix, &topic).await?;
    let unknown_schema_retry = settings.projection_unknown_schema_retry;
    let group = throwaway_group(settings);
    let consumer: Arc<StreamConsumer> = Arc::new(consumer_config(settings, &group).create()?);
    let mut ranges = partition_ranges(&consumer, &topic, partitions).await?;
    let total = ranges.iter().map(PartitionRange::len).sum();
    tracing::info!(%topic, partitions, total, "rebuild: replaying up to the current end offsets");

    let tag = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
    let tables = Tables::rebuild_of::<M>();
    db.recreate_tables::<M>(&tables, &tag).await?;
    consumer.assign(&from_beginning(&topic, partitions)?)?;
    let stop = crate::stop_on(shutdown);
    // Poison is dead-lettered again: the live service may never have reached it (stopped or
    // lagging), and the swap moves its offsets past it. The topic is at-least-once anyway; the
    // `dlq.original.*` headers identify repeats.
    let dlq = DeadLetterQueue::new(&settings.kafka, topics.events_dlq(), topic.clone())?;
    let book = Arc::new(OffsetBook::default());
    let projector = Projector::<M>::rebuild(
        db.clone(),
        tables.clone(),
        topic.clone(),
        Decoder::new(settings, codec, unknown_schema_retry),
        dlq,
        book.clone(),
    );
    let mut replay = Replay {
        consumer: &consumer,
        projector: &projector,
        book: &book,
        topic: &topic,
        reporter: Reporter::new(progress, total),
        report: RebuildReport::default(),
    };
    let offsets = loop {
        replay.until(&ranges, &stop).await?;
        let offsets = swapped_offsets(&ranges, &book);
        db.force_offsets(&tables, &topic, &offsets).await?;
        match swap_in(&db, &tables, &tag, &topic).await? {
            Swap::Done => break offsets,
            Swap::LiveAhead(ahead) => {
                tracing::info!(
                    partition = ahead.partition,
                    live = ahead.live,
                    rebuilt = ?ahead.rebuilt,
                    "the live projection is ahead: catching up before the swap"
                );
                ranges = partition_ranges(&consumer, &topic, partitions).await?;
            }
            Swap::AccountsBehind(accounts) => {
                let _ = db.recreate_tables::<M>(&tables, &tag).await;
                return Err(ServiceError::SwapRefused(accounts));
            }
        }
    };
    replay.reporter.finish();
    let mut report = replay.report;
    let _ = tokio::task::spawn_blocking(move || drop(consumer)).await;
    db.close().await;
    report.ends = offsets;
    report.group = group;
    report.elapsed = started.elapsed();
    report.log();
    Ok(report)
}

/// A consumer group id of its own: `<prefix>.projection-rebuild-<uuid>`. The rebuild never
/// joins it (partitions are assigned) and commits nothing under it.
fn throwaway_group(settings: &Settings) -> String {
    format!(
        "{}.projection-rebuild-{}",
        settings.topic_prefix,
        uuid::Uuid::new_v4().simple()
    )
}

/// The offsets of one partition at a moment.
#[derive(Debug, Clone, Copy)]
struct PartitionRange {
    partition: i32,
    low: i64,
    high: i64,
}

impl PartitionRange {
    fn len(&self) -> u64 {
        u64::try_from(self.high - self.low).unwrap_or(0)
    }
}

/// The low and high watermarks of every partition, now.
async fn partition_ranges(
    consumer: &Arc<StreamConsumer>,
    topic: &str,
    partitions: i32,
) -> Result<Vec<PartitionRange>, ServiceError> {
    let consumer = consumer.clone();
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || {
        (0..partitions)
            .map(|partition| {
                consumer
                    .fetch_watermarks(&topic, partition, Duration::from_secs(10))
                    .map(|(low, high)| PartitionRange {
                        partition,
                        low,
                        high,
                    })
            })
            .collect::<Result<Vec<_>, _>>()
    })
    .await
    .map_err(|e| ServiceError::Http(std::io::Error::other(e)))?
    .map_err(ServiceError::Kafka)
}

/// Every partition from its first offset.
fn from_beginning(topic: &str, partitions: i32) -> Result<TopicPartitionList, ServiceError> {
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning)?;
    }
    Ok(tpl)
}

/// The next offsets to swap in once every partition reached its range's end: that end, or
/// further where the replay read past it.
fn swapped_offsets(ranges: &[PartitionRange], book: &OffsetBook) -> Vec<PartitionOffset> {
    let mut offsets: Vec<PartitionOffset> = ranges
        .iter()
        .map(|r| PartitionOffset {
            partition: r.partition,
            next: book.stored(r.partition).map_or(r.high, |s| s.max(r.high)),
        })
        .filter(|o| o.next > 0)
        .collect();
    offsets.sort_unstable();
    offsets
}

/// Swaps the tables in, retrying transient failures.
async fn swap_in(
    db: &Database,
    tables: &Tables,
    tag: &str,
    topic: &str,
) -> Result<Swap, ServiceError> {
    let mut attempt = 0;
    loop {
        match db.swap_in(tables, tag, topic).await {
            Ok(swap) => return Ok(swap),
            Err(e) if e.is_retriable() && attempt < 10 => {
                tracing::warn!(error = %e, "swap failed; retrying");
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(200 * attempt)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// The replay: reads the assigned partitions through the rebuild's projector.
struct Replay<'a, M> {
    consumer: &'a StreamConsumer,
    projector: &'a Projector<M>,
    book: &'a OffsetBook,
    topic: &'a str,
    reporter: Reporter,
    report: RebuildReport,
}

impl<M: ReadModel> Replay<'_, M> {
    /// Projects batches until every partition reached its range's end.
    async fn until(
        &mut self,
        ranges: &[PartitionRange],
        stop: &Shutdown,
    ) -> Result<(), ServiceError> {
        while !self.reached(ranges)? {
            match collect(self.consumer, None, Duration::from_millis(200), stop).await {
                Collected::Shutdown => return Err(ServiceError::Interrupted),
                Collected::Idle => {}
                Collected::Batch {
                    messages,
                    then_stop,
                } => {
                    let outcome = self
                        .projector
                        .process(self.consumer, messages, stop)
                        .await?;
                    if then_stop || outcome.interrupted {
                        return Err(ServiceError::Interrupted);
                    }
                    self.count(&outcome);
                }
            }
        }
        Ok(())
    }

    /// Whether every partition is read up to its range's end (the stored offset, or the
    /// position, which also steps over transaction markers).
    fn reached(&self, ranges: &[PartitionRange]) -> Result<bool, ServiceError> {
        let positions = self.consumer.position()?;
        Ok(ranges.iter().all(|r| {
            let position = positions
                .find_partition(self.topic, r.partition)
                .and_then(|e| e.offset().to_raw());
            r.high <= r.low
                || self.book.stored(r.partition).is_some_and(|s| s >= r.high)
                || position.is_some_and(|p| p >= r.high)
        }))
    }

    fn count(&mut self, outcome: &BatchOutcome) {
        self.report.messages += outcome.messages;
        self.report.applied += outcome.applied;
        self.report.duplicates += outcome.duplicates;
        self.report.parked += outcome.parked;
        self.report.poison += outcome.dead_lettered;
        self.reporter.advance(outcome.messages);
    }
}
