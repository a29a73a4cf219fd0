//! `projection-service rebuild`: replays `<prefix>.events` from the beginning into fresh tables
//! and swaps them in, while a running service keeps answering from the old ones.
//!
//! 1. Capture the end (last stable) offset of every partition.
//! 2. Re-create `accounts_rebuild`, `account_events_rebuild`, `projection_offsets_rebuild` and
//!    `parked_events_rebuild`.
//! 3. Read every partition from offset 0 with its own consumer (assigned, read_committed, no
//!    group membership, no commits) up to the captured ends, through the same projector as the
//!    live service. Poison messages are dead-lettered again (the live service may not have
//!    reached them before the swap moves its offsets past them; the DLQ is at-least-once).
//! 4. Store the captured ends as the rebuild's offsets and rename the new tables into place in one
//!    transaction (the old ones are dropped in it too).
//!
//! **A running service across the swap.** Queries name the tables, so they see the old set
//! until the swap commits and the new set after it (SQLite and PostgreSQL re-prepare statements
//! on a schema change). The running consumer keeps writing the old tables during the rebuild;
//! after the swap the stored offsets are the rebuild's ends, which differ from what the
//! consumer last stored. The consumer notices at its next batch (the offsets compare-and-set
//! fails and nothing is written) or within a second when idle (it re-reads the stored offsets),
//! seeks every partition to the stored offset and re-applies the events produced after the
//! rebuild's ends into the new tables. Nothing is lost and nothing applied twice; no restart is
//! needed. Events it dead-letters in that stretch may be dead-lettered a second time.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::io::IsTerminal;
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressState, ProgressStyle};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use shared::kafka::Topics;
use shared::{EventCodec, Settings};
use tokio::sync::watch;

use crate::db::{Database, Tables};
use crate::dlq::DeadLetterQueue;
use crate::projector::{Collected, OffsetBook, Projector, collect};
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
    /// The end offsets replayed up to, per partition.
    pub ends: Vec<(i32, i64)>,
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

/// Replays the events topic into fresh tables and swaps them in. `shutdown` interrupts it
/// before the swap (the live tables stay as they were).
pub async fn rebuild(
    settings: &Settings,
    progress: Progress,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<RebuildReport, ServiceError> {
    let started = Instant::now();
    let topic = Topics::new(&settings.topic_prefix).events();
    let partitions = ensure_projection_topics(settings).await?;
    let db = Database::connect(&settings.projection_database_url).await?;
    let codec = Arc::new(EventCodec::from_settings(settings)?);
    let group = format!(
        "{}.projection-rebuild-{}",
        settings.topic_prefix,
        uuid::Uuid::new_v4().simple()
    );
    let consumer: Arc<StreamConsumer> = Arc::new(consumer_config(settings, &group).create()?);

    // 1. The ends, fixed now: events produced later are left to the live service.
    let marks = {
        let consumer = consumer.clone();
        let topic = topic.clone();
        tokio::task::spawn_blocking(move || {
            (0..partitions)
                .map(|p| {
                    consumer
                        .fetch_watermarks(&topic, p, Duration::from_secs(10))
                        .map(|(low, high)| (p, low, high))
                })
                .collect::<Result<Vec<_>, _>>()
        })
        .await
        .map_err(|e| ServiceError::Http(std::io::Error::other(e)))??
    };
    let ends: HashMap<i32, i64> = marks.iter().map(|(p, _, high)| (*p, *high)).collect();
    let total: u64 = marks
        .iter()
        .map(|(_, low, high)| u64::try_from(high - low).unwrap_or(0))
        .sum();
    tracing::info!(%topic, partitions, total, "rebuild: replaying up to the current end offsets");

    // 2. Fresh tables.
    let tag = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
    let tables = Tables::rebuild();
    db.recreate_tables(&tables, &tag).await?;

    // 3. Replay.
    let mut tpl = TopicPartitionList::new();
    let mut done: HashSet<i32> = HashSet::new();
    for (p, low, high) in &marks {
        if high <= low {
            done.insert(*p);
        } else {
            tpl.add_partition_offset(&topic, *p, Offset::Beginning)?;
        }
    }
    consumer.assign(&tpl)?;
    let (stop_tx, mut stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let book = Arc::new(OffsetBook::default());
    // Poison is dead-lettered again: the live service may never have reached it (stopped or
    // lagging), and the swap moves its offsets past it. The topic is at-least-once anyway; the
    // `dlq.original.*` headers identify repeats.
    let dlq = DeadLetterQueue::new(
        &settings.kafka,
        Topics::new(&settings.topic_prefix).events_dlq(),
        topic.clone(),
    )?;
    let projector = Projector::rebuild(
        db.clone(),
        tables.clone(),
        topic.clone(),
        codec,
        dlq,
        book.clone(),
    );
    let mut reporter = Reporter::new(progress, total);
    let mut report = RebuildReport::default();
    while done.len() < ends.len() {
        match collect(&consumer, None, Duration::from_millis(200), &mut stop_rx).await {
            Collected::Shutdown => return Err(ServiceError::Interrupted),
            Collected::Idle => {}
            Collected::Batch {
                messages,
                then_stop,
            } => {
                let batch: Vec<_> = messages
                    .into_iter()
                    .filter(|m| ends.get(&m.partition).is_some_and(|end| m.offset < *end))
                    .collect();
                let outcome = projector.process(&consumer, batch, &mut stop_rx).await?;
                if then_stop || outcome.interrupted {
                    return Err(ServiceError::Interrupted);
                }
                report.messages += outcome.messages;
                report.applied += outcome.applied;
                report.duplicates += outcome.duplicates;
                report.parked += outcome.parked;
                report.poison += outcome.dead_lettered;
                reporter.advance(outcome.messages);
            }
        }
        let positions = consumer.position()?;
        for (p, end) in &ends {
            let position = positions
                .find_partition(&topic, *p)
                .and_then(|e| e.offset().to_raw())
                .unwrap_or(-1);
            if book.stored(*p).unwrap_or(-1) >= *end || position >= *end {
                done.insert(*p);
            }
        }
    }
    reporter.finish();
    let _ = tokio::task::spawn_blocking(move || drop(consumer)).await;

    // 4. Swap.
    let mut ends: Vec<(i32, i64)> = ends.into_iter().filter(|(_, end)| *end > 0).collect();
    ends.sort_unstable();
    db.force_offsets(&tables, &topic, &ends).await?;
    let mut attempt = 0;
    loop {
        match db.swap_in(&tables, &tag).await {
            Ok(()) => break,
            Err(e) if e.is_retriable() && attempt < 10 => {
                tracing::warn!(error = %e, "swap failed; retrying");
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(200 * attempt)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
    db.close().await;
    report.ends = ends;
    report.group = group;
    report.elapsed = started.elapsed();
    tracing::info!(
        messages = report.messages,
        applied = report.applied,
        duplicates = report.duplicates,
        parked = report.parked,
        poison = report.poison,
        events_per_sec = report.rate().round(),
        elapsed_ms = report.elapsed.as_millis() as u64,
        "rebuild swapped in"
    );
    Ok(report)
}
