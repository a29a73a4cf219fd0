//! Crash safety of the real binary: SIGKILL while it applies a 20k-event burst, twice, then a
//! restart; the read model must equal the fold computed here (nothing applied twice, nothing
//! lost). Also measures the apply throughput and checks that SIGTERM stops it cleanly.

use std::process::Stdio;
use std::time::{Duration, Instant};

use projection_service::db::Database;
use shared::EventCodec;
use shared::testing::schema_registry_url;
use tokio::process::{Child, Command};

use crate::helpers::{
    Backend, EventWriter, TestDb, expected_model, generate, ids, read_model, settings_for, wait_for,
};

both_backends!(killed_mid_burst_and_restarted_equals_a_fresh_replay);

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

fn start(settings: &shared::Settings, port: u16, log: &std::path::Path) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("log file");
    let mut command = Command::new(env!("CARGO_BIN_EXE_projection-service"));
    command
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("KAFKA_BOOTSTRAP_SERVERS", &settings.kafka.bootstrap_servers)
        .env("TOPIC_PREFIX", &settings.topic_prefix)
        .env("PARTITIONS", settings.partitions.to_string())
        .env("PROJECTION_DATABASE_URL", &settings.projection_database_url)
        .env("PROJECTION_HTTP_ADDR", format!("127.0.0.1:{port}"))
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .kill_on_drop(true);
    if let Some(url) = schema_registry_url() {
        command.env("SCHEMA_REGISTRY_URL", url);
    }
    command.spawn().expect("start projection-service")
}

async fn applied(db: &Database) -> i64 {
    db.counts().await.map(|c| c.events).unwrap_or(0)
}

async fn killed_mid_burst_and_restarted_equals_a_fresh_replay(backend: Backend) {
    let db = TestDb::new(backend).await;
    let settings = settings_for(&db);
    let writer = EventWriter::new(&settings).await;
    let codec = EventCodec::json("USD");
    let histories = generate(&ids("crash"), 400, 100, 42);
    let total: usize = histories.iter().map(|h| h.events.len()).sum();
    assert!(total >= 18_000, "a large burst ({total})");

    // The whole burst is in the topic before the service starts: it applies flat out.
    let mut messages = Vec::with_capacity(total);
    let longest = histories.iter().map(|h| h.events.len()).max().unwrap_or(0);
    for i in 0..longest {
        for h in &histories {
            if let Some(env) = h.events.get(i) {
                let bytes = codec.encode(&writer.topic, env).await.expect("encode");
                messages.push((h.id.clone(), bytes));
            }
        }
    }
    writer.many(&messages).await;

    let dir = tempfile::tempdir().expect("temp dir");
    let log = dir.path().join("projection-service.log");
    let store = db.open().await;
    let port = free_port();

    // Two SIGKILLs while it applies.
    let mut killed_at = Vec::new();
    let mut floor = 0i64;
    for round in 0..2 {
        let mut child = start(&settings, port, &log);
        let target = floor + 1 + (total as i64 / 4);
        let reached = wait_for(
            &format!("round {round}: progress past {target} events"),
            Duration::from_secs(120),
            || async {
                let n = applied(&store).await;
                (n >= target || n >= total as i64).then_some(n)
            },
        )
        .await;
        child.start_kill().expect("SIGKILL");
        let _ = child.wait().await;
        let n = applied(&store).await;
        killed_at.push(n);
        assert!(
            n < total as i64,
            "round {round}: the kill came after the burst was applied ({reached}); not a crash test"
        );
        floor = n;
    }

    // Restart and let it finish.
    let mut child = start(&settings, port, &log);
    let resumed_from = applied(&store).await;
    let first = wait_for(
        "progress after restart",
        Duration::from_secs(120),
        || async {
            let n = applied(&store).await;
            (n > resumed_from).then(|| (Instant::now(), n))
        },
    )
    .await;
    wait_for("the whole burst", Duration::from_secs(300), || async {
        (applied(&store).await == total as i64).then_some(())
    })
    .await;
    let finished = Instant::now();
    let rate = (total as i64 - first.1) as f64 / (finished - first.0).as_secs_f64().max(1e-3);

    let projection_service::db::RowCounts {
        accounts,
        events,
        parked,
    } = store.counts().await.expect("counts");
    assert_eq!(events, total as i64, "every event applied once");
    assert_eq!(accounts, histories.len() as i64);
    assert_eq!(parked, 0);
    assert_eq!(read_model(&store).await, expected_model(&histories));
    let offsets: i64 = store
        .offsets(&projection_service::db::Tables::live(), &writer.topic)
        .await
        .expect("offsets")
        .values()
        .sum();
    assert_eq!(
        offsets, total as i64,
        "stored offsets are at the end of every partition"
    );

    // Ready over HTTP, then a graceful stop on SIGTERM.
    let client = reqwest::Client::new();
    wait_for("/ready", Duration::from_secs(30), || async {
        let r = client
            .get(format!("http://127.0.0.1:{port}/ready"))
            .send()
            .await
            .ok()?;
        (r.status() == 200).then_some(())
    })
    .await;
    let pid = child.id().expect("pid").to_string();
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill -TERM");
    assert!(status.success());
    let exit = tokio::time::timeout(Duration::from_secs(60), child.wait())
        .await
        .expect("stops within 60 s of SIGTERM")
        .expect("exit status");
    let log_text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(exit.success(), "exit {exit:?}; log:\n{log_text}");
    assert!(log_text.contains("projection-service stopped"));
    eprintln!(
        "crash ({backend:?}): {total} events over {} accounts; SIGKILL at {} and {} applied; \
         restart finished with {events} events, read model equals the fold; \
         apply throughput {rate:.0} events/s",
        histories.len(),
        killed_at[0],
        killed_at[1],
    );
    store.close().await;
}
