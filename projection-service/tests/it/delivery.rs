//! Delivery anomalies: re-delivered duplicates, version gaps, and poison messages that must go
//! to the dead-letter topic while the stream goes on.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::Utc;
use serde_json::json;
use shared::envelope::Metadata;
use shared::{Event, EventCodec, EventEnvelope};

use crate::helpers::{
    Backend, EventWriter, TestDb, ids, read_dead_letters, settings_for, spawn_app, wait_for,
};

both_backends!(duplicates_are_skipped_and_gaps_parked_until_filled);
both_backends!(poison_goes_to_the_dead_letter_topic_and_the_stream_goes_on);

fn history(id: &str) -> Vec<EventEnvelope> {
    let mut events = vec![Event::AccountOpened {
        owner: "Dup".into(),
        currency: "EUR".into(),
        initial_balance_minor: 1000,
    }];
    events.extend((1..=7).map(|i| Event::MoneyDeposited {
        amount_minor: i * 100,
    }));
    events
        .iter()
        .enumerate()
        .map(|(i, e)| EventEnvelope::new(id, i as u64 + 1, e, Utc::now(), Metadata::new()))
        .collect()
}

async fn duplicates_are_skipped_and_gaps_parked_until_filled(backend: Backend) {
    let db = TestDb::new(backend).await;
    let settings = settings_for(&db);
    let app = spawn_app(settings.clone()).await;
    let writer = EventWriter::new(&settings).await;
    let codec = EventCodec::json("USD");
    let id = ids("dup");
    let events = history(&id);

    for e in &events[..5] {
        writer.envelope(&codec, e).await;
    }
    let before = app.wait_version(&id, 5).await;
    assert_eq!(before["balance_minor"], 2000);

    // Re-delivery of versions 2..=4 and 1: nothing changes, four skips are counted.
    for e in events[1..4].iter().chain(&events[..1]) {
        writer.envelope(&codec, e).await;
    }
    wait_for("4 duplicates skipped", Duration::from_secs(30), || async {
        (app.metric("projection_events_duplicates_skipped_total")
            .await
            >= 4.0)
            .then_some(())
    })
    .await;
    let (_, after) = app.get(&format!("/accounts/{id}")).await;
    assert_eq!(after, before, "duplicates changed the read model");
    let (_, history) = app.get(&format!("/accounts/{id}/events")).await;
    assert_eq!(history.as_array().map(Vec::len), Some(5));

    // Version 7 before 6: a gap, parked, not applied.
    writer.envelope(&codec, &events[6]).await;
    wait_for("the gap to be parked", Duration::from_secs(30), || async {
        (app.metric("projection_events_parked_total").await >= 1.0).then_some(())
    })
    .await;
    let (_, still) = app.get(&format!("/accounts/{id}")).await;
    assert_eq!(still["version"], 5);
    // The account says so: one later event waits for version 6.
    assert_eq!(still["parked"]["events"], 1, "{still}");
    assert_eq!(still["parked"]["waiting_for_version"], 6, "{still}");
    assert!(
        still["parked"]["since"]
            .as_str()
            .is_some_and(|t| !t.is_empty()),
        "{still}"
    );
    // An account of which only a later event arrived says what it waits for.
    let orphan = ids("orphan");
    let orphan_second = EventEnvelope::new(
        &orphan,
        2,
        &Event::MoneyDeposited { amount_minor: 100 },
        Utc::now(),
        Metadata::new(),
    );
    writer.envelope(&codec, &orphan_second).await;
    wait_for(
        "the orphan to be parked",
        Duration::from_secs(30),
        || async { (app.metric("projection_events_parked_total").await >= 2.0).then_some(()) },
    )
    .await;
    let (status, missing) = app.get(&format!("/accounts/{orphan}")).await;
    assert_eq!(status, 404, "{missing}");
    assert!(
        missing["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("wait for version 1")),
        "{missing}"
    );
    let store = db.open().await;
    let parked = store.counts().await.expect("counts").parked;
    assert_eq!(parked, 2, "two parked event rows");

    // Version 6 fills the gap: 6 and the parked 7 are applied, the parked row is gone.
    writer.envelope(&codec, &events[5]).await;
    let filled = app.wait_version(&id, 7).await;
    assert!(filled.get("parked").is_none(), "{filled}");
    assert_eq!(filled["balance_minor"], 1000 + (1..=6).sum::<i64>() * 100);
    assert_eq!(filled["transaction_count"], 6);
    let counts = store.counts().await.expect("counts");
    let (events_after, parked) = (counts.events, counts.parked);
    assert_eq!(
        (events_after, parked),
        (7, 1),
        "the orphan's event stays parked"
    );
    assert_eq!(app.metric("projection_events_unparked_total").await, 1.0);
    assert_eq!(
        app.metric("projection_events_duplicates_skipped_total")
            .await,
        4.0
    );
    eprintln!(
        "duplicates ({backend:?}): 4 re-delivered events skipped, 1 gap parked then applied, 7 events applied"
    );
    store.close().await;
    app.stop().await.expect("clean stop");
}

async fn poison_goes_to_the_dead_letter_topic_and_the_stream_goes_on(backend: Backend) {
    let db = TestDb::new(backend).await;
    let settings = settings_for(&db);
    let app = spawn_app(settings.clone()).await;
    let writer = EventWriter::new(&settings).await;
    let codec = EventCodec::json("USD");
    let id = ids("poison");
    let deposit = |version: u64, amount_minor: i64| {
        EventEnvelope::new(
            &id,
            version,
            &Event::MoneyDeposited { amount_minor },
            Utc::now(),
            Metadata::new(),
        )
    };
    let unknown_type = json!({
        "event_id": uuid::Uuid::new_v4().to_string(), "aggregate_id": id,
        "aggregate_type": "BankAccount", "event_type": "AccountRenamed", "schema_version": 2,
        "version": 1, "timestamp": "2026-01-01T00:00:00Z", "data": {"name": "x"}
    })
    .to_string();
    let never_opened = serde_json::to_string(&deposit(1, 500)).expect("json");

    // Everything on the account's partition, poison first, good events between and after.
    let mut expected: BTreeMap<i64, (&str, Vec<u8>)> = BTreeMap::new();
    for (code, bytes) in [
        ("UnknownFormat", b"definitely not an event".to_vec()),
        ("InvalidJson", b"{\"event_id\": ".to_vec()),
        ("UnknownEventType", unknown_type.into_bytes()),
        ("NotApplicable", never_opened.into_bytes()),
    ] {
        let (_, offset) = writer.raw(&id, &bytes, None).await;
        expected.insert(offset, (code, bytes));
    }
    let opened = EventEnvelope::new(
        &id,
        1,
        &Event::AccountOpened {
            owner: "Pia".into(),
            currency: "EUR".into(),
            initial_balance_minor: 100,
        },
        Utc::now(),
        Metadata::new(),
    );
    writer.envelope(&codec, &opened).await;
    writer.envelope(&codec, &deposit(2, 50)).await;
    let truncated = vec![0u8, 0, 1];
    let (_, offset) = writer.raw(&id, &truncated, None).await;
    expected.insert(offset, ("Truncated", truncated));
    writer.envelope(&codec, &deposit(3, 25)).await;

    let account = app.wait_version(&id, 3).await;
    assert_eq!(account["balance_minor"], 175);

    let letters = read_dead_letters(&settings, expected.len()).await;
    let partition = writer.partition_of(&id).to_string();
    for letter in &letters {
        let h = &letter.headers;
        let offset: i64 = h["dlq.original.offset"].parse().expect("offset header");
        let (code, bytes) = expected.get(&offset).expect("a dead letter we sent");
        assert_eq!(h["dlq.original.topic"], writer.topic);
        assert_eq!(h["dlq.original.partition"], partition);
        assert_eq!(h["dlq.error.code"], *code, "{h:?}");
        assert!(!h["dlq.error.message"].is_empty());
        assert_eq!(letter.key.as_deref(), Some(id.as_bytes()));
        assert_eq!(letter.payload.as_deref(), Some(bytes.as_slice()));
    }
    let offsets: std::collections::BTreeSet<String> = letters
        .iter()
        .map(|l| l.headers["dlq.original.offset"].clone())
        .collect();
    assert_eq!(offsets.len(), expected.len(), "each poison message once");
    assert_eq!(
        app.metric("projection_events_dead_lettered_total").await,
        expected.len() as f64
    );
    eprintln!(
        "dead letters ({backend:?}): {} poison messages dead-lettered with headers, 3 events after them applied",
        expected.len()
    );
    app.stop().await.expect("clean stop");
}

both_backends!(an_unreachable_registry_is_retried_never_dead_lettered);

async fn an_unreachable_registry_is_retried_never_dead_lettered(backend: Backend) {
    let Some(registry) = shared::testing::schema_registry_url() else {
        eprintln!(
            "SCHEMA_REGISTRY_URL is not set: the registry-outage path is not exercised \
             (scripts/test starts a registry)"
        );
        return;
    };
    let db = TestDb::new(backend).await;
    let settings = settings_for(&db);
    let writer = EventWriter::new(&settings).await;
    let wire = EventCodec::with_registry("USD", &registry).expect("registry codec");
    let id = ids("outage");
    let opened = EventEnvelope::new(
        &id,
        1,
        &Event::AccountOpened {
            owner: "Reg".into(),
            currency: "EUR".into(),
            initial_balance_minor: 10,
        },
        Utc::now(),
        Metadata::new(),
    );
    writer.envelope(&wire, &opened).await;
    let deposit = EventEnvelope::new(
        &id,
        2,
        &Event::MoneyDeposited { amount_minor: 5 },
        Utc::now(),
        Metadata::new(),
    );
    writer.envelope(&EventCodec::json("USD"), &deposit).await;

    // A registry nobody listens on: the wire-format event waits, it is not dead-lettered, and
    // nothing behind it on its partition is applied out of order.
    let mut down = settings.clone();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("port");
    down.schema_registry_url = Some(format!("http://127.0.0.1:{port}/apis/ccompat/v7"));
    let app = spawn_app(down).await;
    wait_for("decode retries", Duration::from_secs(60), || async {
        (app.metric("projection_registry_retries_total").await >= 2.0).then_some(())
    })
    .await;
    let (status, _) = app.get(&format!("/accounts/{id}")).await;
    assert_eq!(status, 404, "nothing applied while the registry is down");
    assert_eq!(
        app.metric("projection_events_dead_lettered_total").await,
        0.0
    );
    let (status, body) = app.get("/ready").await;
    assert_eq!(status, 503, "not caught up while an event waits: {body}");
    assert_eq!(body["error"]["code"], "NotReady");
    let retries = app.metric("projection_registry_retries_total").await;
    // Shutdown interrupts the retry loop without committing anything.
    app.stop().await.expect("clean stop while retrying");

    // The registry is back: both events are applied, in order.
    let app = spawn_app(settings).await;
    let account = app.wait_version(&id, 2).await;
    assert_eq!(account["balance_minor"], 15);
    app.wait_ready().await;
    assert_eq!(
        app.metric("projection_events_dead_lettered_total").await,
        0.0
    );
    eprintln!(
        "registry outage ({backend:?}): {retries} decode retries, 0 dead letters, both events applied once the registry was back"
    );
    app.stop().await.expect("clean stop");
}
