//! Fault hardening: values the read model cannot store, poison too large to dead-letter whole,
//! a stored offset beyond the topic's end, schema ids the registry learns late, and a rebuild
//! swap that must not go back in time.

use std::time::Duration;

use chrono::Utc;
use shared::envelope::Metadata;
use shared::{Event, EventCodec, EventEnvelope};

use crate::helpers::{
    Backend, EventWriter, TestDb, expected_model, generate, ids, read_dead_letters, read_model,
    rebuild_tables_exist, settings_for, spawn_app, wait_for,
};

both_backends!(
    unstorable_text_is_dead_lettered_and_the_stream_goes_on,
    a_poison_message_near_one_megabyte_is_dead_lettered_cut,
    a_stored_offset_beyond_the_end_stops_the_service,
    a_rebuild_swap_never_takes_a_version_back,
    a_schema_id_the_registry_learns_late_is_applied,
    queries_never_hold_the_connections_the_projection_writes_with
);

/// Readers of the API (16 slow history queries, say) hold query connections only: the
/// projection still gets its connection at once.
async fn queries_never_hold_the_connections_the_projection_writes_with(backend: Backend) {
    let db = TestDb::new(backend).await;
    let store = db.open().await;
    let mut busy = Vec::new();
    for _ in 0..8 {
        busy.push(store.reads().acquire().await.expect("a query connection"));
    }
    let write = tokio::time::timeout(Duration::from_secs(2), store.pool().acquire()).await;
    assert!(
        write.is_ok_and(|c| c.is_ok()),
        "the projection waited behind {} busy query connections",
        busy.len()
    );
    drop(busy);
    store.close().await;
}

fn opened(id: &str, currency: &str) -> EventEnvelope {
    EventEnvelope::new(
        id,
        1,
        &Event::AccountOpened {
            owner: "Uma".into(),
            currency: currency.into(),
            initial_balance_minor: 100,
        },
        Utc::now(),
        Metadata::new(),
    )
}

fn deposit(id: &str, version: u64, amount_minor: i64) -> EventEnvelope {
    EventEnvelope::new(
        id,
        version,
        &Event::MoneyDeposited { amount_minor },
        Utc::now(),
        Metadata::new(),
    )
}

/// A NUL byte in the currency: PostgreSQL refuses it (the service used to stop on it, and
/// crash-loop on restart); SQLite would store it. Both dead-letter it as `Unstorable` and go on.
async fn unstorable_text_is_dead_lettered_and_the_stream_goes_on(backend: Backend) {
    let db = TestDb::new(backend).await;
    let settings = settings_for(&db);
    let app = spawn_app(settings.clone()).await;
    let writer = EventWriter::new(&settings).await;
    let codec = EventCodec::json("USD");
    let id = ids("nul");
    let (_, poison_offset) = writer.envelope(&codec, &opened(&id, "EU\u{0}R")).await;
    writer.envelope(&codec, &opened(&id, "EUR")).await;
    writer.envelope(&codec, &deposit(&id, 2, 5)).await;

    let account = app.wait_version(&id, 2).await;
    assert_eq!(account["currency"], "EUR", "{account}");
    assert_eq!(account["balance_minor"], 105, "{account}");
    let letters = read_dead_letters(&settings, 1).await;
    let h = &letters[0].headers;
    assert_eq!(h["dlq.error.code"], "Unstorable", "{h:?}");
    assert_eq!(h["dlq.original.offset"], poison_offset.to_string(), "{h:?}");
    app.stop().await.expect("clean stop");
}

/// A value the events topic accepts but that, with the dead-letter headers, is over the size a
/// dead letter may have: it used to be retried forever, blocking its partition.
async fn a_poison_message_near_one_megabyte_is_dead_lettered_cut(backend: Backend) {
    let db = TestDb::new(backend).await;
    let settings = settings_for(&db);
    let app = spawn_app(settings.clone()).await;
    let writer = EventWriter::new(&settings).await;
    let codec = EventCodec::json("USD");
    let id = ids("big");
    let poison = vec![b'x'; 1_000_000];
    let (_, poison_offset) = writer.raw(&id, &poison, None).await;
    writer.envelope(&codec, &opened(&id, "EUR")).await;

    let account = tokio::time::timeout(Duration::from_secs(90), app.wait_version(&id, 1))
        .await
        .expect("the event after the poison is applied");
    assert_eq!(account["balance_minor"], 100, "{account}");
    let letters = read_dead_letters(&settings, 1).await;
    let letter = &letters[0];
    let h = &letter.headers;
    assert_eq!(h["dlq.error.code"], "UnknownFormat", "{h:?}");
    assert_eq!(h["dlq.original.offset"], poison_offset.to_string(), "{h:?}");
    assert_eq!(h["dlq.original.truncated"], "1000000", "{h:?}");
    let kept = letter.payload.as_ref().map_or(0, Vec::len);
    assert!(kept < poison.len(), "the value is cut: {kept} bytes");
    assert!(
        poison.starts_with(letter.payload.as_deref().unwrap_or_default()),
        "what is kept is the value's beginning"
    );
    app.stop().await.expect("clean stop");
}

/// The topics were recreated (empty) while the database kept its offsets: the service must not
/// sit there answering `/ready` with a frozen read model; it stops, naming the partition, the
/// offsets and the way out.
async fn a_stored_offset_beyond_the_end_stops_the_service(backend: Backend) {
    let db = TestDb::new(backend).await;
    let settings = settings_for(&db);
    let app = spawn_app(settings.clone()).await;
    let writer = EventWriter::new(&settings).await;
    let codec = EventCodec::json("USD");
    let histories = generate(&ids("gone"), 12, 3, 7);
    for h in &histories {
        for e in &h.events {
            writer.envelope(&codec, e).await;
        }
    }
    let last = histories.last().expect("histories");
    app.wait_version(&last.id, last.events.len() as u64).await;
    app.wait_ready().await;
    app.stop().await.expect("clean stop");

    recreate_events_topic(&settings, &writer.topic).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<()>();
    let addr = listener.local_addr().expect("addr");
    let run = tokio::spawn(projection_service::run(
        settings.clone(),
        listener,
        async move {
            let _ = ready_rx.await;
        },
    ));
    let outcome = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("the service stops by itself")
        .expect("no panic");
    drop(ready_tx);
    let message = format!("{}", outcome.expect_err("stops with an error"));
    for part in [
        writer.topic.as_str(),
        "partition",
        "beyond",
        "projection-service rebuild",
        "fresh database",
    ] {
        assert!(message.contains(part), "`{part}` missing from: {message}");
    }
    let ready = reqwest::get(format!("http://{addr}/ready")).await;
    assert!(ready.is_err(), "nothing answers /ready after the stop");
}

/// Deletes the events topic and creates it again, empty.
async fn recreate_events_topic(settings: &shared::Settings, topic: &str) {
    use rdkafka::admin::{AdminClient, AdminOptions};
    use rdkafka::client::DefaultClientContext;
    let admin: AdminClient<DefaultClientContext> =
        settings.kafka.client_config().create().expect("admin");
    admin
        .delete_topics(&[topic], &AdminOptions::new())
        .await
        .expect("delete topics");
    wait_for(
        "the topic to be recreated",
        Duration::from_secs(60),
        || async {
            projection_service::ensure_projection_topics(settings)
                .await
                .ok()?;
            let consumer: rdkafka::consumer::BaseConsumer =
                settings.kafka.client_config().create().ok()?;
            let topic = topic.to_owned();
            tokio::task::spawn_blocking(move || {
                use rdkafka::consumer::Consumer;
                let (low, high) = consumer
                    .fetch_watermarks(&topic, 0, Duration::from_secs(5))
                    .ok()?;
                (low == 0 && high == 0).then_some(())
            })
            .await
            .ok()?
        },
    )
    .await;
}

/// Live traffic during a rebuild: the swapped-in tables must be at least where the live ones
/// were, so that no reader ever sees an account's version go down across the swap.
async fn a_rebuild_swap_never_takes_a_version_back(backend: Backend) {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    let db = TestDb::new(backend).await;
    let settings = settings_for(&db);
    let app = spawn_app(settings.clone()).await;
    let writer = EventWriter::new(&settings).await;
    let codec = EventCodec::json("USD");
    // Enough history that the replay takes a while.
    let histories = generate(&ids("swap"), 600, 40, 11);
    let mut messages = Vec::new();
    for h in &histories {
        for e in &h.events {
            messages.push((
                h.id.clone(),
                codec.encode(&writer.topic, e).await.expect("encode"),
            ));
        }
    }
    writer.many(&messages).await;
    let id = ids("watched");
    writer.envelope(&codec, &opened(&id, "EUR")).await;
    let store = db.open().await;
    let want = expected_model(&histories);
    wait_for(
        "the history to be applied",
        Duration::from_secs(120),
        || async {
            let model = read_model(&store).await;
            want.iter()
                .all(|(k, v)| model.get(k) == Some(v))
                .then_some(())
        },
    )
    .await;
    app.wait_version(&id, 1).await;

    // A reader watches the account's version for the whole rebuild.
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let stop = stop.clone();
        let client = app.client.clone();
        let url = app.url(&format!("/accounts/{id}"));
        tokio::spawn(async move {
            let mut seen: Vec<u64> = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                let Ok(r) = client.get(&url).send().await else {
                    continue;
                };
                let body: serde_json::Value = r.json().await.unwrap_or_default();
                if let Some(v) = body["version"].as_u64()
                    && seen.last() != Some(&v)
                {
                    seen.push(v);
                }
            }
            seen
        })
    };
    // Live events while the rebuild replays, each applied by the live service. A rebuild that
    // ends before two of them (a fast machine) is run again, so the swap is always crossed.
    let mut version = 1;
    let mut report = None;
    for _ in 0..5 {
        let rebuilding = {
            let settings = settings.clone();
            tokio::spawn(async move {
                projection_service::rebuild::rebuild(
                    &settings,
                    projection_service::rebuild::Progress::Quiet,
                    std::future::pending(),
                )
                .await
            })
        };
        wait_for("the rebuild tables", Duration::from_secs(60), || async {
            (rebuilding.is_finished() || rebuild_tables_exist(&store).await).then_some(())
        })
        .await;
        let started_at = version;
        while !rebuilding.is_finished() && version < 200 {
            version += 1;
            writer.envelope(&codec, &deposit(&id, version, 1)).await;
            app.wait_version(&id, version).await;
        }
        report = Some(rebuilding.await.expect("rebuild task").expect("rebuild"));
        if version - started_at >= 2 {
            break;
        }
    }
    let report = report.expect("a rebuild ran");
    app.wait_version(&id, version).await;
    stop.store(true, Ordering::SeqCst);
    let seen = reader.await.expect("reader");
    assert!(
        version > 2,
        "the rebuild ended before live events were applied"
    );
    assert!(
        seen.windows(2).all(|w| w[0] < w[1]),
        "the version went back across the swap: {seen:?} (rebuild {report:?})"
    );
    eprintln!(
        "swap ({backend:?}): {} live events during a rebuild of {} messages; versions seen {:?}..{:?}",
        version - 1,
        report.messages,
        seen.first(),
        seen.last()
    );
    store.close().await;
    app.stop().await.expect("clean stop");
}

/// An event whose schema id the registry does not know yet (404), registered a moment later:
/// the projection waits for it (bounded by `PROJECTION_UNKNOWN_SCHEMA_RETRY`, 30 s by default)
/// and applies it, instead of dead-lettering it on the first 404.
async fn a_schema_id_the_registry_learns_late_is_applied(backend: Backend) {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    let Some(registry) = shared::testing::schema_registry_url() else {
        eprintln!(
            "SCHEMA_REGISTRY_URL is not set: the unknown-schema-id path is not exercised \
             (scripts/test starts a registry)"
        );
        return;
    };
    let db = TestDb::new(backend).await;
    let settings = settings_for(&db);
    let writer = EventWriter::new(&settings).await;
    let wire = EventCodec::with_registry("USD", &registry).expect("registry codec");
    let id = ids("late");
    writer.envelope(&wire, &opened(&id, "EUR")).await;

    let knows = Arc::new(AtomicBool::new(false));
    let mut late = settings.clone();
    late.schema_registry_url = Some(late_registry(&registry, knows.clone()).await);
    let app = spawn_app(late).await;
    wait_for(
        "the unknown schema id to be met",
        Duration::from_secs(60),
        || async {
            let retried = app.metric("projection_registry_retries_total").await;
            let dead = app.metric("projection_events_dead_lettered_total").await;
            (retried + dead >= 1.0).then_some(())
        },
    )
    .await;
    knows.store(true, Ordering::SeqCst);
    let account = app.wait_version(&id, 1).await;
    assert_eq!(account["balance_minor"], 100, "{account}");
    assert_eq!(
        app.metric("projection_events_dead_lettered_total").await,
        0.0,
        "not dead-lettered"
    );
    app.stop().await.expect("clean stop");
}

/// A registry in front of `registry` that answers every request with Confluent's 404 "Schema
/// not found" until `knows` is set, and passes requests through afterwards. Returns its URL.
async fn late_registry(
    registry: &str,
    knows: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> String {
    use axum::http::{StatusCode, Uri};
    use axum::response::IntoResponse;

    let scheme_end = registry.find("://").map_or(0, |i| i + 3);
    let path_start = registry[scheme_end..]
        .find('/')
        .map_or(registry.len(), |i| scheme_end + i);
    let (origin, path) = (registry[..path_start].to_owned(), &registry[path_start..]);
    let client = reqwest::Client::new();
    let app = axum::Router::new().fallback(move |uri: Uri| {
        let (origin, client, knows) = (origin.clone(), client.clone(), knows.clone());
        async move {
            if !knows.load(std::sync::atomic::Ordering::SeqCst) {
                let body = serde_json::json!({"error_code": 40403, "message": "Schema not found"});
                return (StatusCode::NOT_FOUND, axum::Json(body)).into_response();
            }
            let url = format!(
                "{origin}{}",
                uri.path_and_query().map_or("/", |p| p.as_str())
            );
            match client.get(&url).send().await {
                Ok(r) => {
                    let status = StatusCode::from_u16(r.status().as_u16())
                        .unwrap_or(StatusCode::BAD_GATEWAY);
                    let body = r.bytes().await.unwrap_or_default();
                    (
                        status,
                        [("content-type", "application/vnd.schemaregistry.v1+json")],
                        body,
                    )
                        .into_response()
                }
                Err(e) => (StatusCode::BAD_GATEWAY, e.to_string()).into_response(),
            }
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}{path}")
}

/// The documented recovery for schemas a registry lost: once they are registered again, a
/// dead letter sent back (`bank dlq replay` writes its original bytes to the events topic) is
/// applied by the running projection, without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_event_is_applied_once_its_schema_is_known_again() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    let Some(registry) = shared::testing::schema_registry_url() else {
        eprintln!("SCHEMA_REGISTRY_URL is not set: the schema-id recovery is not exercised");
        return;
    };
    let db = TestDb::new(Backend::Sqlite).await;
    let settings = settings_for(&db);
    let writer = EventWriter::new(&settings).await;
    let wire = EventCodec::with_registry("USD", &registry).expect("registry codec");
    let id = ids("relearned");
    writer.envelope(&wire, &opened(&id, "EUR")).await;

    let knows = Arc::new(AtomicBool::new(false));
    let mut forgetful = settings.clone();
    forgetful.schema_registry_url = Some(late_registry(&registry, knows.clone()).await);
    forgetful.projection_unknown_schema_retry = Duration::from_secs(1);
    let app = spawn_app(forgetful).await;
    wait_for(
        "the event to be dead-lettered",
        Duration::from_secs(60),
        || async {
            (app.metric("projection_events_dead_lettered_total").await >= 1.0).then_some(())
        },
    )
    .await;

    // The schemas are back; the same bytes come again, as a replay sends them (an id given up
    // on is asked again at most every RECHECK_EVERY: the replay comes later than that after
    // the dead letter, as a person's would).
    knows.store(true, Ordering::SeqCst);
    tokio::time::sleep(projection_service::decode::RECHECK_EVERY).await;
    writer.envelope(&wire, &opened(&id, "EUR")).await;
    let account = app.wait_version(&id, 1).await;
    assert_eq!(account["balance_minor"], 100, "{account}");
    assert_eq!(
        app.metric("projection_events_dead_lettered_total").await,
        1.0,
        "the replay was not dead-lettered again"
    );
    app.stop().await.expect("clean stop");
}

/// A rebuild whose tables hold an account at an earlier version than the live tables (it
/// dead-lettered an event the live projection applied) must not be swapped in: the account
/// would go back a version and then wait behind a gap for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_that_would_take_an_account_back_is_refused() {
    let db = TestDb::new(Backend::Sqlite).await;
    let settings = settings_for(&db);
    let app = spawn_app(settings.clone()).await;
    let writer = EventWriter::new(&settings).await;
    let codec = EventCodec::json("USD");
    let (ahead, other) = (ids("ahead"), ids("other"));
    for id in [&ahead, &other] {
        writer.envelope(&codec, &opened(id, "EUR")).await;
        writer.envelope(&codec, &deposit(id, 2, 5)).await;
        app.wait_version(id, 2).await;
    }
    app.stop().await.expect("clean stop");
    // The live model holds a version the events topic no longer gives a rebuild.
    let store = db.open().await;
    sqlx::query("UPDATE accounts SET version = 3 WHERE id = $1")
        .bind(&ahead)
        .execute(store.pool())
        .await
        .unwrap();

    let refused = projection_service::rebuild::rebuild(
        &settings,
        projection_service::rebuild::Progress::Quiet,
        std::future::pending(),
    )
    .await
    .expect_err("the swap is refused");
    let message = refused.to_string();
    assert!(
        message.contains(&ahead) && !message.contains(&other),
        "{message}"
    );
    let model = read_model(&store).await;
    assert_eq!(model[&ahead].version, 3, "the live tables are unchanged");
    store.close().await;
}
