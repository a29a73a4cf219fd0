//! The HTTP contract: errors and their codes, parameter checks, read-your-writes waits,
//! currencies' minor digits, health, readiness and metrics.

use std::time::{Duration, Instant};

use chrono::Utc;
use shared::envelope::Metadata;
use shared::{Event, EventCodec, EventEnvelope};

use crate::helpers::{Backend, EventWriter, TestDb, ids, settings_for, spawn_app, wait_for};

both_backends!(http_contract);

fn env(id: &str, version: u64, event: Event) -> EventEnvelope {
    EventEnvelope::new(id, version, &event, Utc::now(), Metadata::new())
}

async fn http_contract(backend: Backend) {
    let db = TestDb::new(backend).await;
    let settings = settings_for(&db);
    let app = spawn_app(settings.clone()).await;
    let writer = EventWriter::new(&settings).await;
    let codec = EventCodec::json("USD");
    let id = ids("api");

    let (status, body) = app.get(&format!("/accounts/{id}")).await;
    assert_eq!(status, 404);
    assert_eq!(body["error"]["code"], "AccountNotFound", "{body}");
    assert!(body["error"]["message"].as_str().is_some());
    let (status, body) = app.get(&format!("/accounts/{id}/events")).await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (404, &"AccountNotFound".into())
    );

    writer
        .envelope(
            &codec,
            &env(
                &id,
                1,
                Event::AccountOpened {
                    owner: "Ida".into(),
                    currency: "EUR".into(),
                    initial_balance_minor: 15000,
                },
            ),
        )
        .await;
    writer
        .envelope(
            &codec,
            &env(&id, 2, Event::MoneyDeposited { amount_minor: 5 }),
        )
        .await;
    let account = app.wait_version(&id, 2).await;
    assert_eq!(account["balance"], "150.05");
    assert_eq!(account["status"], "active");
    app.wait_ready().await;

    for bad in [
        format!("/accounts/{id}?version=abc"),
        format!("/accounts/{id}?version=0"),
        format!("/accounts/{id}?as_of=yesterday"),
        format!("/accounts/{id}?as_of=2026-01-01T00:00:00Z&version=1"),
        format!("/accounts/{id}?min_version=x"),
        format!("/accounts/{id}?min_version=3&timeout_ms=-1"),
        format!("/accounts/{id}/events?schema_version=3"),
        "/accounts?limit=0".to_owned(),
        "/accounts?limit=1001".to_owned(),
        "/accounts?limit=ten".to_owned(),
        "/accounts?status=frozen".to_owned(),
    ] {
        let (status, body) = app.get(&bad).await;
        assert_eq!(status, 400, "{bad}: {body}");
        assert_eq!(body["error"]["code"], "InvalidQuery", "{bad}: {body}");
    }
    let (status, body) = app.get("/no/such/route").await;
    assert_eq!((status, &body["error"]["code"]), (404, &"NotFound".into()));

    // Read-your-writes: a waiting request is answered as soon as version 3 is projected.
    let waiting = {
        let client = app.client.clone();
        let url = app.url(&format!("/accounts/{id}?min_version=3&timeout_ms=20000"));
        tokio::spawn(async move {
            let started = Instant::now();
            let r = client.get(url).send().await.expect("request");
            let status = r.status().as_u16();
            let body: serde_json::Value = r.json().await.expect("json");
            (status, body, started.elapsed())
        })
    };
    writer
        .envelope(
            &codec,
            &env(&id, 3, Event::MoneyWithdrawn { amount_minor: 5 }),
        )
        .await;
    let (status, body, took) = waiting.await.expect("waiter");
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["version"], 3);
    assert!(took < Duration::from_secs(15), "answered after {took:?}");
    let (status, body) = app
        .get(&format!("/accounts/{id}?min_version=9&timeout_ms=300"))
        .await;
    assert_eq!(status, 504, "{body}");
    assert_eq!(body["error"]["code"], "NotCaughtUp");
    let (status, _) = app.get(&format!("/accounts/{id}?version=4")).await;
    assert_eq!(status, 404, "no version 4 yet");

    // Minor digits follow the currency.
    for (suffix, currency, minor, text) in
        [("jpy", "JPY", 1500, "1500"), ("kwd", "KWD", 1234, "1.234")]
    {
        let other = format!("{id}-{suffix}");
        writer
            .envelope(
                &codec,
                &env(
                    &other,
                    1,
                    Event::AccountOpened {
                        owner: "Yen".into(),
                        currency: currency.into(),
                        initial_balance_minor: minor,
                    },
                ),
            )
            .await;
        let account = app.wait_version(&other, 1).await;
        assert_eq!(account["balance"], text, "{account}");
    }

    let (status, body) = app.get("/health").await;
    assert_eq!((status, &body["status"]), (200, &"ok".into()));
    let (status, _) = app.get("/ready").await;
    assert_eq!(status, 200);
    wait_for(
        "the lag gauges to read 0",
        Duration::from_secs(30),
        || async { (app.metric("projection_consumer_lag").await == 0.0).then_some(()) },
    )
    .await;
    let (status, metrics) = app.get_text("/metrics").await;
    assert_eq!(status, 200);
    for name in [
        "projection_events_applied_total",
        "projection_consumer_lag",
        "projection_batch_apply_seconds_bucket",
    ] {
        assert!(metrics.contains(name), "{name} missing from /metrics");
    }
    app.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_history_is_answered_in_pages() {
    let db = TestDb::new(Backend::Sqlite).await;
    let settings = settings_for(&db);
    let app = spawn_app(settings.clone()).await;
    let writer = EventWriter::new(&settings).await;
    let codec = EventCodec::json("USD");
    let id = ids("paged");
    let opened = Event::AccountOpened {
        owner: "Pam".into(),
        currency: "EUR".into(),
        initial_balance_minor: 0,
    };
    let mut messages = Vec::new();
    for version in 1..=1205 {
        let event = if version == 1 {
            opened.clone()
        } else {
            Event::MoneyDeposited { amount_minor: 1 }
        };
        let bytes = codec
            .encode(&writer.topic, &env(&id, version, event))
            .await
            .expect("encode");
        messages.push((id.clone(), bytes));
    }
    writer.many(&messages).await;
    app.wait_version(&id, 1205).await;

    let page = |query: String| {
        let (client, url) = (
            app.client.clone(),
            app.url(&format!("/accounts/{id}/events{query}")),
        );
        async move {
            let r = client.get(url).send().await.unwrap();
            let next = r
                .headers()
                .get("next-after-version")
                .map(|v| v.to_str().unwrap().parse::<u64>().unwrap());
            (
                r.status().as_u16(),
                next,
                r.json::<Vec<serde_json::Value>>().await.unwrap_or_default(),
            )
        }
    };
    // Without parameters: the first 1000 (the cap), and where the next page starts.
    let (status, next, events) = page(String::new()).await;
    assert_eq!((status, next, events.len()), (200, Some(1000), 1000));
    assert_eq!(events[999]["version"], 1000);
    let (_, next, events) = page("?after_version=1000".into()).await;
    assert_eq!((next, events.len()), (None, 205), "the last page");
    assert_eq!(events[0]["version"], 1001);
    let (_, next, events) = page("?after_version=10&limit=5".into()).await;
    assert_eq!((next, events.len()), (Some(15), 5));
    let (status, _, events) = page("?after_version=1205".into()).await;
    assert_eq!(
        (status, events.len()),
        (200, 0),
        "after the end: empty, not unknown"
    );
    for bad in ["?limit=0", "?limit=1001", "?after_version=-1", "?limit=x"] {
        let (status, body) = app.get(&format!("/accounts/{id}/events{bad}")).await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (400, Some("InvalidQuery")),
            "{bad}"
        );
    }
    let (status, _) = app
        .get(&format!("/accounts/{id}-nobody/events?after_version=3"))
        .await;
    assert_eq!(status, 404);
    app.stop().await.expect("clean stop");
}
