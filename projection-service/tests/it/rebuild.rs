//! Rebuild while serving: queries keep being answered during the replay and the swap, events
//! produced meanwhile are not lost, and the result equals the fold. Once in-process, once with
//! the real `projection-service rebuild`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use projection_service::rebuild::{Progress, rebuild};
use shared::EventCodec;

use crate::helpers::{
    Backend, EventWriter, History, TestDb, expected_model, generate, ids, read_model,
    rebuild_tables_exist, settings_for, spawn_app, wait_for,
};

both_backends!(
    rebuild_while_serving_gives_the_same_read_model,
    rebuild_commits_no_kafka_offsets
);

async fn produce(writer: &EventWriter, codec: &EventCodec, histories: &[History]) {
    let mut messages = Vec::new();
    for h in histories {
        for env in &h.events {
            let bytes = codec.encode(&writer.topic, env).await.expect("encode");
            messages.push((h.id.clone(), bytes));
        }
    }
    writer.many(&messages).await;
}

async fn rebuild_while_serving_gives_the_same_read_model(backend: Backend) {
    let db = TestDb::new(backend).await;
    let settings = settings_for(&db);
    let app = spawn_app(settings.clone()).await;
    let writer = EventWriter::new(&settings).await;
    let codec = EventCodec::json("USD");
    let prefix = ids("rb");
    let mut all = generate(&format!("{prefix}-a"), 150, 40, 1);
    produce(&writer, &codec, &all).await;
    // One duplicate and one poison message: the rebuild must treat them as the service did.
    let dup = &all[0].events[0];
    writer.envelope(&codec, dup).await;
    writer.raw(&all[0].id, b"garbage", None).await;
    let store = db.open().await;
    let expect = |histories: &[History]| expected_model(histories);
    let want = expect(&all);
    wait_for("the first burst", Duration::from_secs(120), || async {
        (read_model(&store).await == want).then_some(())
    })
    .await;

    // Readers hammer the API for the whole rebuild.
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(std::sync::Mutex::new(Vec::new()));
    let reader = {
        let (stop, ok, failures) = (stop.clone(), ok.clone(), failures.clone());
        let client = app.client.clone();
        let urls = [
            app.url(&format!("/accounts/{}", all[0].id)),
            app.url(&format!("/accounts/{}?version=1", all[1].id)),
            app.url("/accounts?limit=20"),
            app.url(&format!("/accounts/{}/events", all[2].id)),
        ];
        tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(Ordering::SeqCst) {
                let url = &urls[i % urls.len()];
                i += 1;
                match client.get(url).send().await {
                    Ok(r) if r.status() == 200 => {
                        ok.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(r) => failures
                        .lock()
                        .expect("lock")
                        .push(format!("{url}: {}", r.status())),
                    Err(e) => failures.lock().expect("lock").push(format!("{url}: {e}")),
                }
            }
        })
    };

    // In-process rebuild, with more events arriving while it runs.
    let rebuilding = {
        let settings = settings.clone();
        tokio::spawn(async move { rebuild(&settings, Progress::Log, std::future::pending()).await })
    };
    // Produced once the rebuild has captured its end offsets (its tables exist): these events
    // are the live service's to apply again into the swapped-in tables.
    wait_for("the rebuild tables", Duration::from_secs(60), || async {
        rebuild_tables_exist(&store).await.then_some(())
    })
    .await;
    let during = generate(&format!("{prefix}-b"), 50, 20, 2);
    let during_count: usize = during.iter().map(|h| h.events.len()).sum();
    produce(&writer, &codec, &during).await;
    all.extend(during);
    let report = rebuilding
        .await
        .expect("rebuild task")
        .expect("rebuild succeeds");
    assert_eq!(report.poison, 1, "{report:?}");
    let first_burst: u64 = all[..150].iter().map(|h| h.events.len() as u64).sum();
    assert!(
        report.applied >= first_burst,
        "the rebuild reads at least to the captured ends: {report:?}"
    );
    assert!(report.duplicates >= 1, "{report:?}");
    let want = expect(&all);
    wait_for(
        "the service to continue from the swapped-in offsets",
        Duration::from_secs(120),
        || async { (read_model(&store).await == want).then_some(()) },
    )
    .await;
    let total: usize = all.iter().map(|h| h.events.len()).sum();
    let events = store.counts().await.expect("counts").events;
    assert_eq!(
        events, total as i64,
        "no event lost or applied twice across the swap"
    );

    // The real binary, second time (index names, table renames: again).
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_projection-service"))
        .arg("rebuild")
        .env("KAFKA_BOOTSTRAP_SERVERS", &settings.kafka.bootstrap_servers)
        .env("TOPIC_PREFIX", &settings.topic_prefix)
        .env("PARTITIONS", settings.partitions.to_string())
        .env("PROJECTION_DATABASE_URL", &settings.projection_database_url)
        .env("RUST_LOG", "info")
        .output()
        .await
        .expect("run rebuild");
    let stderr = String::from_utf8_lossy(&output.stderr);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "rebuild failed:\n{stdout}\n{stderr}"
    );
    assert!(stderr.contains("rebuild done"), "{stderr}");
    let after = generate(&format!("{prefix}-c"), 20, 10, 3);
    let after_count: usize = after.iter().map(|h| h.events.len()).sum();
    produce(&writer, &codec, &after).await;
    all.extend(after);
    let want = expect(&all);
    wait_for(
        "events after the second swap",
        Duration::from_secs(120),
        || async { (read_model(&store).await == want).then_some(()) },
    )
    .await;
    let total: usize = all.iter().map(|h| h.events.len()).sum();
    let events = store.counts().await.expect("counts").events;
    assert_eq!(events, total as i64);

    stop.store(true, Ordering::SeqCst);
    reader.await.expect("reader");
    let failures = failures.lock().expect("lock").clone();
    assert!(
        failures.is_empty(),
        "queries failed during rebuild: {failures:?}"
    );
    let answered = ok.load(Ordering::SeqCst);
    assert!(answered > 10, "only {answered} answers during the rebuilds");
    let summary = stderr
        .lines()
        .find(|l| l.contains("rebuild done"))
        .unwrap_or_default()
        .to_owned();
    eprintln!(
        "rebuild ({backend:?}): in-process {} messages at {:.0} events/s ({} applied, {} duplicates, {} poison); \
         binary: {summary}; {during_count} events produced during the first rebuild, \
         {after_count} after the second; {answered} queries answered 200 meanwhile; \
         {total} events in the final model",
        report.messages,
        report.rate(),
        report.applied,
        report.duplicates,
        report.poison,
    );
    store.close().await;
    app.stop().await.expect("clean stop");
}

/// A rebuild reads with a throwaway consumer group and must leave nothing behind under it: no
/// committed Kafka offsets (its progress lives only in the rebuild tables).
async fn rebuild_commits_no_kafka_offsets(backend: Backend) {
    let db = TestDb::new(backend).await;
    let settings = settings_for(&db);
    let writer = EventWriter::new(&settings).await;
    let codec = EventCodec::json("USD");
    let histories = generate(&ids("rbk"), 20, 5, 4);
    produce(&writer, &codec, &histories).await;
    let report = rebuild(&settings, Progress::Quiet, std::future::pending())
        .await
        .expect("rebuild succeeds");
    assert!(report.applied > 0, "{report:?}");
    let committed = committed_offsets(&settings, &report.group, &writer.topic).await;
    assert!(
        committed.is_empty(),
        "the rebuild's throwaway group {} has committed offsets {committed:?}",
        report.group
    );
}

/// The offsets committed under `group` for each partition of `topic` (none: empty).
async fn committed_offsets(
    settings: &shared::Settings,
    group: &str,
    topic: &str,
) -> Vec<(i32, i64)> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::topic_partition_list::TopicPartitionList;
    let client: BaseConsumer = settings
        .kafka
        .client_config()
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    for p in 0..settings.partitions {
        tpl.add_partition(topic, p);
    }
    tokio::task::spawn_blocking(move || {
        client
            .committed_offsets(tpl, Duration::from_secs(10))
            .expect("committed offsets")
            .elements()
            .iter()
            .filter_map(|e| Some((e.partition(), e.offset().to_raw().filter(|o| *o >= 0)?)))
            .collect()
    })
    .await
    .expect("lookup")
}

/// Pages of the SQLite file in use (the WAL included).
async fn sqlite_pages(db: &projection_service::db::Database) -> i64 {
    sqlx::query_scalar("PRAGMA page_count")
        .fetch_one(db.pool())
        .await
        .expect("page count")
}

#[tokio::test]
async fn a_rebuild_leaves_the_sqlite_file_the_size_of_one_read_model() {
    let db = TestDb::new(Backend::Sqlite).await;
    let settings = settings_for(&db);
    let writer = EventWriter::new(&settings).await;
    let codec = EventCodec::json("USD");
    let histories = generate(&ids("rbs"), 300, 20, 5);
    produce(&writer, &codec, &histories).await;
    let first = rebuild(&settings, Progress::Quiet, std::future::pending())
        .await
        .expect("the first rebuild");
    assert!(first.applied > 0, "{first:?}");
    let store = db.open().await;
    let one = sqlite_pages(&store).await;
    rebuild(&settings, Progress::Quiet, std::future::pending())
        .await
        .expect("the second rebuild");
    let after = sqlite_pages(&store).await;
    let mode: i64 = sqlx::query_scalar("PRAGMA auto_vacuum")
        .fetch_one(store.pool())
        .await
        .expect("mode");
    let free: i64 = sqlx::query_scalar("PRAGMA freelist_count")
        .fetch_one(store.pool())
        .await
        .expect("free");
    eprintln!("auto_vacuum {mode}, free pages {free}");
    assert!(
        after * 10 <= one * 13,
        "the file holds {after} pages after a rebuild, {one} before: the retired tables' pages \
         were kept"
    );
}
