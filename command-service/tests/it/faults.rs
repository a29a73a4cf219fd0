//! Faults other than a crash: a commit whose answer is lost, a producer fenced by another with
//! the same `INSTANCE_ID`, a past writer whose clock ran ahead, and a registry that forgets.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use chrono::Utc;
use rdkafka::producer::{BaseProducer, Producer};
use shared::kafka::{Topics, canonical_partition};
use shared::{Command, CommandMessage, Event, EventEnvelope, Settings};

use crate::helpers::*;
use crate::proxy::{END_TXN, INIT_PRODUCER_ID, LossyProxy, OFFSET_FETCH};

#[tokio::test]
async fn a_commit_whose_outcome_cannot_be_learned_is_never_redone() {
    let Some(proxy) = LossyProxy::start().await else {
        return;
    };
    let mut settings = shared::testing::test_settings(1);
    settings.commit_interval = Duration::from_millis(20);
    let direct = std::mem::replace(
        &mut settings.kafka.bootstrap_servers,
        proxy.bootstrap.clone(),
    );
    let app = TestApp::spawn_with(settings.clone()).await;
    let (s, _) = app.send(&open("ambiguous-1", "Ann", 10)).await;
    assert_eq!(s, 200);

    // The broker commits the next transaction, but its answer is lost until the service gives up
    // on that producer and initialises a new one; and every committed-offsets lookup that could
    // tell what became of the transaction is lost too.
    proxy.lose_responses(END_TXN, Some(INIT_PRODUCER_ID));
    proxy.lose_responses(OFFSET_FETCH, None);
    let deposit = cmd(
        "ambiguous-1",
        Command::Deposit {
            amount_minor: 5,
            currency: None,
        },
    );
    let (s, body) = app.send(&deposit).await;
    assert_eq!(
        (s, body["version"].as_u64()),
        (200, Some(2)),
        "the broker committed the deposit, and the HTTP side reads committed results: {body}"
    );
    let ended = app.stopped(Duration::from_secs(150)).await;
    let reason = format!(
        "{:#}",
        ended.expect_err("the service stops rather than redo")
    );
    assert!(reason.contains("cannot be learned"), "{reason}");
    assert!(proxy.lost(END_TXN) >= 1 && proxy.lost(OFFSET_FETCH) >= 1);
    proxy.heal();

    // The transaction had committed: the deposit is there once, and asking again answers it.
    settings.kafka.bootstrap_servers = direct;
    let app = TestApp::spawn_with(settings.clone()).await;
    let (s, body) = app.send(&deposit).await;
    assert_eq!((s, body["version"].as_u64()), (200, Some(2)), "{body}");
    app.stop().await;
    let (events, _) = verify_store(&settings).await;
    assert_eq!(events, 2, "the deposit was appended once");
}

#[tokio::test]
async fn a_broker_outage_of_minutes_during_a_commit_does_not_stop_the_writer() {
    let Some(proxy) = LossyProxy::start().await else {
        return;
    };
    let mut settings = shared::testing::test_settings(1);
    settings.commit_interval = Duration::from_millis(20);
    settings.kafka.bootstrap_servers = proxy.bootstrap.clone();
    let app = TestApp::spawn_with(settings.clone()).await;
    let (s, _) = app.send(&open("outage-1", "Otto", 10)).await;
    assert_eq!(s, 200);

    // The broker commits the deposit's transaction but its answer is lost (the HTTP side reads
    // the committed result); then the brokers are unreachable for 100 s, longer than the
    // time-outs of the commit's recovery put together.
    proxy.lose_responses(END_TXN, Some(INIT_PRODUCER_ID));
    let deposit = cmd(
        "outage-1",
        Command::Deposit {
            amount_minor: 5,
            currency: None,
        },
    );
    let (s, body) = app.send(&deposit).await;
    assert_eq!((s, body["version"].as_u64()), (200, Some(2)), "{body}");
    proxy.outage();
    tokio::time::sleep(Duration::from_secs(100)).await;
    proxy.heal();

    // The writer waited the outage out: it learns the commit's outcome and serves again.
    let deadline = Instant::now() + Duration::from_secs(120);
    let (s, body) = loop {
        let (s, body) = app.send(&deposit).await;
        if s == 200 || Instant::now() > deadline {
            break (s, body);
        }
        assert!(
            app.ready_json().await["error"]["code"] != "EngineFailed",
            "the engine stopped: {body}"
        );
    };
    assert_eq!((s, body["version"].as_u64()), (200, Some(2)), "{body}");
    app.stop().await;
    let (events, _) = verify_store(&settings).await;
    assert_eq!(events, 2, "the deposit was appended once");
}

#[tokio::test]
async fn a_restore_reads_what_committed_behind_another_writers_open_transaction() {
    let settings = shared::testing::test_settings(1);
    let events = Topics::new(&settings.topic_prefix).events();

    // A writer that was replaced (a zombie) has a transaction open on the events partition; the
    // broker aborts it after its time-out.
    let zombie: BaseProducer = settings
        .kafka
        .producer_config()
        .set("transactional.id", shared::testing::unique_name("zombie"))
        // Long enough to be open still when the next owner restores (the broker aborts it
        // within 5 s after, scripts/kafka's abort check), short enough for its readiness wait.
        .set("transaction.timeout.ms", "30000")
        .create()
        .unwrap();
    let service = ServiceProcess::start(&settings, "behind-a", 1000);
    service.wait_ready().await;
    zombie.init_transactions(Duration::from_secs(30)).unwrap();
    zombie.begin_transaction().unwrap();
    zombie
        .send(
            rdkafka::producer::BaseRecord::<[u8], [u8]>::to(&events)
                .partition(0)
                .key(b"zombie".as_slice())
                .payload(b"never committed".as_slice()),
        )
        .map_err(|(e, _)| e)
        .unwrap();
    zombie.flush(Duration::from_secs(10)).unwrap();

    // The new owner commits two events behind it, and dies before any checkpoint covers them.
    let http = reqwest::Client::new();
    let (s, _) = post(
        &http,
        &service.url,
        open("behind-1", "Ann", 10).to_json().to_string(),
    )
    .await;
    assert_eq!(s, 200);
    let deposit = cmd(
        "behind-1",
        Command::Deposit {
            amount_minor: 5,
            currency: None,
        },
    );
    let (s, body) = post(&http, &service.url, deposit.to_json().to_string()).await;
    assert_eq!((s, body["version"].as_u64()), (200, Some(2)), "{body}");
    service.kill();

    // The next owner restores while the zombie's transaction is still open: it must wait for it
    // to end rather than stop reading at it and miss both events.
    let app = TestApp::spawn_with(settings.clone()).await;
    let (s, body) = app
        .send(&cmd(
            "behind-1",
            Command::Deposit {
                amount_minor: 1,
                currency: None,
            },
        ))
        .await;
    assert_eq!((s, body["version"].as_u64()), (200, Some(3)), "{body}");
    app.stop().await;
    drop(zombie);
    let (events, _) = verify_store(&settings).await;
    assert_eq!(events, 3);
}

#[tokio::test]
async fn a_producer_fenced_without_a_twin_instance_recovers_and_loses_nothing() {
    let app = TestApp::spawn(1).await;
    let settings = app.settings.clone();
    let (s, _) = app.send(&open("fenced-1", "Ann", 10)).await;
    assert_eq!(s, 200);

    // What a broker restart does to a transaction it timed out (and what librdkafka then
    // reports as "fenced by a newer instance"): the producer epoch is bumped by someone else.
    // No other instance is in the group, so this is not a twin.
    let bump: BaseProducer = settings
        .kafka
        .producer_config()
        .set(
            "transactional.id",
            command_service::engine::transactional_id(&settings),
        )
        .create()
        .unwrap();
    bump.init_transactions(Duration::from_secs(30)).unwrap();
    drop(bump);

    // The next command meets the fenced producer; the service recovers and answers it.
    let deposit = cmd(
        "fenced-1",
        Command::Deposit {
            amount_minor: 1,
            currency: None,
        },
    );
    let answer = app
        .http
        .post(format!("{}/commands?timeout_ms=60000", app.url))
        .header("content-type", "application/json")
        .body(deposit.to_json().to_string())
        .send()
        .await
        .unwrap();
    let status = answer.status().as_u16();
    let body: serde_json::Value = answer.json().await.unwrap();
    assert_eq!((status, body["version"].as_u64()), (200, Some(2)), "{body}");
    let (s, body) = app
        .send(&cmd(
            "fenced-1",
            Command::Deposit {
                amount_minor: 1,
                currency: None,
            },
        ))
        .await;
    assert_eq!((s, body["version"].as_u64()), (200, Some(3)), "{body}");
    app.stop().await;
    let (events, _) = verify_store(&settings).await;
    assert_eq!(events, 3, "no event lost or doubled");
}

#[tokio::test]
async fn events_are_never_stamped_before_the_previous_event_of_their_partition() {
    let mut settings = shared::testing::test_settings(1);
    settings.commit_interval = Duration::from_millis(20);
    let app = TestApp::spawn_with(settings.clone()).await;
    let (s, _) = app.send(&open("clock-1", "Cy", 10)).await;
    assert_eq!(s, 200);
    app.stop().await;

    // A past writer whose clock ran an hour ahead appended version 2.
    let ahead = Utc::now() + chrono::Duration::hours(1);
    let envelope = EventEnvelope::new(
        "clock-1",
        2,
        &Event::MoneyDeposited { amount_minor: 5 },
        ahead,
        Default::default(),
    );
    let topic = Topics::new(&settings.topic_prefix).events();
    let partition = canonical_partition(b"clock-1", settings.partitions);
    let bytes = serde_json::to_vec(&envelope).unwrap();
    produce_to(&settings, &topic, "clock-1", &bytes, partition).await;

    let app = TestApp::spawn_with(settings.clone()).await;
    let (s, body) = app
        .send(&cmd(
            "clock-1",
            Command::Deposit {
                amount_minor: 1,
                currency: None,
            },
        ))
        .await;
    assert_eq!((s, body["version"].as_u64()), (200, Some(3)), "{body}");
    let events = read_events(&settings).await;
    let stamped = events
        .iter()
        .map(|(_, e)| e)
        .find(|e| e.aggregate_id == "clock-1" && e.version == 3)
        .expect("version 3 is stored")
        .timestamp;
    assert!(
        stamped >= ahead,
        "version 3 at {stamped} is earlier than version 2 at {ahead}"
    );
    app.stop().await;
}

/// A schema registry in front of the real one that answers 404 to everything while `refusing`.
struct FlakyRegistry {
    url: String,
    refusing: Arc<AtomicBool>,
    refused: Arc<AtomicUsize>,
}

impl FlakyRegistry {
    async fn start(upstream: String) -> FlakyRegistry {
        let refusing = Arc::new(AtomicBool::new(false));
        let refused = Arc::new(AtomicUsize::new(0));
        let (flag, count) = (Arc::clone(&refusing), Arc::clone(&refused));
        let client = reqwest::Client::new();
        let app = axum::Router::new().fallback(move |req: axum::extract::Request| {
            let (flag, count, client, upstream) = (
                flag.clone(),
                count.clone(),
                client.clone(),
                upstream.clone(),
            );
            async move {
                if flag.load(Ordering::SeqCst) {
                    count.fetch_add(1, Ordering::SeqCst);
                    let body = r#"{"error_code":40401,"message":"Subject not found"}"#;
                    return (axum::http::StatusCode::NOT_FOUND, body.to_owned());
                }
                let (parts, body) = req.into_parts();
                let bytes = axum::body::to_bytes(body, 1 << 20).await.unwrap();
                let answer = client
                    .request(parts.method, format!("{upstream}{}", parts.uri))
                    .header("content-type", "application/vnd.schemaregistry.v1+json")
                    .body(bytes)
                    .send()
                    .await
                    .unwrap();
                let status = axum::http::StatusCode::from_u16(answer.status().as_u16()).unwrap();
                (status, answer.text().await.unwrap())
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        FlakyRegistry {
            url,
            refusing,
            refused,
        }
    }
}

/// A command-service on a fresh prefix whose registry is a [`FlakyRegistry`] in front of the
/// real one (settings changed by `adjust` first); `None` (said on stderr) without a registry.
async fn behind_a_flaky_registry(
    adjust: impl FnOnce(&mut Settings),
) -> Option<(FlakyRegistry, Settings, TestApp)> {
    let Some(upstream) = shared::testing::schema_registry_url() else {
        eprintln!("SCHEMA_REGISTRY_URL is not set: the registry path is not exercised");
        return None;
    };
    let registry = FlakyRegistry::start(upstream).await;
    let mut settings = shared::testing::test_settings(1);
    settings.schema_registry_url = Some(registry.url.clone());
    settings.commit_interval = Duration::from_millis(20);
    adjust(&mut settings);
    let app = TestApp::spawn_with(settings.clone()).await;
    Some((registry, settings, app))
}

/// Makes the registry refuse, then POSTs `command` in the background: its answer.
fn send_while_refused(
    registry: &FlakyRegistry,
    app: &TestApp,
    command: &CommandMessage,
) -> tokio::task::JoinHandle<(u16, serde_json::Value)> {
    registry.refusing.store(true, Ordering::SeqCst);
    let (http, url, body) = (
        app.http.clone(),
        app.url.clone(),
        command.to_json().to_string(),
    );
    tokio::spawn(async move { post(&http, &url, body).await })
}

#[tokio::test]
async fn a_registry_refusing_for_a_while_delays_commands_but_never_rejects_them() {
    let Some((registry, settings, app)) = behind_a_flaky_registry(|_| {}).await else {
        return;
    };
    // A restarted registry with in-memory storage answers 404 until the schemas are back.
    let open = open("flaky-1", "Fay", 10);
    let answer = send_while_refused(&registry, &app, &open);
    let deadline = Instant::now() + Duration::from_secs(30);
    while registry.refused.load(Ordering::SeqCst) < 2 {
        assert!(
            Instant::now() < deadline,
            "the engine never asked the registry"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    registry.refusing.store(false, Ordering::SeqCst);
    let (status, body) = answer.await.unwrap();
    assert_eq!(
        (status, body["status"].as_str(), body["version"].as_u64()),
        (200, Some("accepted"), Some(1)),
        "a registry refusal is not the command's fault: {body}"
    );
    let results: Vec<_> = read_results(&settings)
        .into_iter()
        .filter(|r| r.command_id == open.command_id)
        .collect();
    assert_eq!(results.len(), 1, "one answer, never a remembered rejection");
    app.stop().await;
}

#[tokio::test]
async fn an_engine_whose_transactions_keep_failing_reports_itself_stalled_until_one_commits() {
    let stalled = |s: &mut Settings| s.ready_stall_after = Duration::from_secs(2);
    let Some((registry, _, app)) = behind_a_flaky_registry(stalled).await else {
        return;
    };
    // Every transaction holding the command aborts while the registry refuses.
    let open = open("stalled-1", "Sol", 10);
    let answer = send_while_refused(&registry, &app, &open);
    let ready = |app: &TestApp| {
        let (http, url) = (app.http.clone(), format!("{}/ready", app.url));
        async move {
            let r = http.get(url).send().await.unwrap();
            (
                r.status().as_u16(),
                r.json::<serde_json::Value>().await.unwrap(),
            )
        }
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let body = loop {
        let (status, body) = ready(&app).await;
        if status == 503 {
            break body;
        }
        assert!(Instant::now() < deadline, "never reported stalled: {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(body["error"]["code"], "Stalled", "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("keep failing"), "{message}");
    let metrics = app
        .http
        .get(format!("{}/metrics", app.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let failing: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("transactions_failing_seconds "))
        .and_then(|v| v.trim().parse().ok())
        .expect("the gauge is exported");
    assert!(failing >= 2.0, "transactions_failing_seconds {failing}");

    // The registry is back: the command commits and the engine is ready again.
    registry.refusing.store(false, Ordering::SeqCst);
    // The first answer may have timed out (504) meanwhile; the same command again answers
    // from the log.
    let _ = answer.await.unwrap();
    let (status, body) = app.send(&open).await;
    assert_eq!((status, body["version"].as_u64()), (200, Some(1)), "{body}");
    let (status, body) = ready(&app).await;
    assert_eq!(status, 200, "{body}");
    app.stop().await;
}
