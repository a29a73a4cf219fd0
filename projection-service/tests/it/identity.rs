//! One read model per database (issue: "a second read model steals half the partitions"): the
//! database records the prefix it projects and a read-model id; the consumer group derives from
//! it, so two databases each hold every account, and a database of another prefix refuses to
//! start.

use std::time::Duration;

use shared::EventCodec;

use crate::helpers::{Backend, EventWriter, TestDb, generate, settings_for, spawn_app};

both_backends!(two_databases_of_one_prefix_are_two_complete_read_models);
both_backends!(a_database_of_another_prefix_refuses_to_start);

async fn two_databases_of_one_prefix_are_two_complete_read_models(backend: Backend) {
    let (first_db, second_db) = (TestDb::new(backend).await, TestDb::new(backend).await);
    let settings = settings_for(&first_db);
    let mut second_settings = settings.clone();
    second_settings.projection_database_url = second_db.url.clone();
    let first = spawn_app(settings.clone()).await;
    let second = spawn_app(second_settings).await;
    let writer = EventWriter::new(&settings).await;
    let codec = EventCodec::json("USD");
    let histories = generate("twice", 24, 3, 7);
    for history in &histories {
        for event in &history.events {
            writer.envelope(&codec, event).await;
        }
    }
    // Each instance holds every account (one group would split the partitions between them).
    for history in &histories {
        let version = history.events.len() as u64;
        for app in [&first, &second] {
            let got = app.wait_version(&history.id, version).await;
            assert_eq!(got["version"].as_u64(), Some(version), "{got}");
        }
    }
    first.stop().await.expect("clean stop");
    second.stop().await.expect("clean stop");
}

async fn a_database_of_another_prefix_refuses_to_start(backend: Backend) {
    let db = TestDb::new(backend).await;
    let settings = settings_for(&db);
    let app = spawn_app(settings.clone()).await;
    app.stop().await.expect("clean stop");

    let mut other = settings_for(&db);
    assert_ne!(other.topic_prefix, settings.topic_prefix);
    other.projection_database_url = db.url.clone();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let ran = tokio::time::timeout(
        Duration::from_secs(60),
        projection_service::run(other.clone(), listener, std::future::pending()),
    )
    .await
    .expect("it stops at start, not after serving");
    let message = ran
        .expect_err("another prefix's database is refused")
        .to_string();
    assert!(
        message.contains(&settings.topic_prefix)
            && message.contains(&other.topic_prefix)
            && message.contains("PROJECTION_DATABASE_URL"),
        "{message}"
    );

    // The same prefix again is served by the same read model.
    let again = spawn_app(settings).await;
    again.wait_ready().await;
    again.stop().await.expect("clean stop");
}

/// Members of a consumer group that are not projections: they take partitions away.
struct Squatters {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Squatters {
    fn join(&mut self, settings: &shared::Settings, group: &str, topic: &str) {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        let consumer: BaseConsumer = settings
            .kafka
            .client_config()
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("session.timeout.ms", "10000")
            .create()
            .unwrap();
        consumer.subscribe(&[topic]).unwrap();
        let stop = self.stop.clone();
        self.threads.push(std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let _ = consumer.poll(Duration::from_millis(100));
            }
            // Dropped here: leaves the group.
        }));
    }

    fn leave(self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        for t in self.threads {
            t.join().unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_projection_left_without_partitions_reports_itself_stalled() {
    let db = TestDb::new(Backend::Sqlite).await;
    let mut settings = settings_for(&db);
    settings.partitions = 1;
    let group = shared::testing::unique_name("shared-group");
    settings.projection_group_id = Some(group.clone());
    settings.projection_stall_after = Duration::from_secs(2);
    let app = spawn_app(settings.clone()).await;
    app.wait_ready().await;
    let (status, body) = app.get("/status").await;
    assert_eq!(
        (status, body["partitions"].as_array().map(Vec::len)),
        (200, Some(1)),
        "{body}"
    );

    // Other members join the group until the projection's one partition is taken from it.
    let mut squatters = Squatters {
        stop: Default::default(),
        threads: Vec::new(),
    };
    let mut lost = false;
    for _ in 0..20 {
        squatters.join(&settings, &group, &app.topic);
        // The rebalance the newcomer causes settles within seconds; a lost partition shows as
        // stalled after 2 s more.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !lost && tokio::time::Instant::now() < deadline {
            lost = app.get("/status").await.1["stalled"].is_string();
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        if lost {
            break;
        }
    }
    assert!(
        lost,
        "the projection never lost its partition to 20 other members"
    );
    let (status, body) = app.get("/ready").await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (503, Some("Stalled")),
        "{body}"
    );
    let reason = body["error"]["message"].as_str().unwrap_or_default();
    assert!(reason.contains("no partition"), "{reason}");
    let (_, body) = app.get("/status").await;
    assert_eq!(body["ready"], false, "{body}");
    // /status says why at once, and how old its lag figures are.
    let problem = body["lag_problem"].as_str().unwrap_or_default();
    assert!(problem.contains("no partition"), "{body}");
    assert!(body["lag_age_ms"].as_u64() >= Some(2000), "{body}");
    let (_, metrics) = app.get_text("/metrics").await;
    assert!(
        crate::helpers::metric_value(&metrics, "projection_lag_age_seconds", &app.topic) >= 1.0,
        "the gauge shows the age"
    );

    // The others leave: the partition comes back and the projection is ready again.
    squatters.leave();
    crate::helpers::wait_for("ready again", Duration::from_secs(60), || async {
        (app.get("/ready").await.0 == 200).then_some(())
    })
    .await;
    app.stop().await.expect("clean stop");
}
