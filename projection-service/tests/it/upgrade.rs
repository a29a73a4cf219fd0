//! A read model written by the release before the aggregate seam (ee8c859) is served and carried
//! on by this one: its tables, migrations and offsets are taken as they are (no migration runs
//! again, nothing is projected twice), its rows are answered, and the next event is applied on
//! top of the stored state.

use chrono::{TimeZone, Utc};
use shared::envelope::Metadata;
use shared::{Event, EventCodec, EventEnvelope};
use sqlx::any::AnyPoolOptions;

use crate::helpers::{Backend, EventWriter, TestDb, settings_for, spawn_app};

both_backends!(a_read_model_of_the_release_before_the_seam_is_carried_on);

/// The fixture's statements for `topic` and `partition`.
fn fixture(topic: &str, partition: i32) -> Vec<String> {
    include_str!("fixtures/read_model_ee8c859.sql")
        .replace("{topic}", topic)
        .replace("{partition}", &partition.to_string())
        .split("\n;\n")
        .map(|s| {
            s.lines()
                .filter(|l| !l.starts_with("--"))
                .collect::<Vec<_>>()
                .join("\n")
        })
        .filter(|s| !s.trim().is_empty())
        .collect()
}

async fn a_read_model_of_the_release_before_the_seam_is_carried_on(backend: Backend) {
    let db = TestDb::new(backend).await;
    let settings = settings_for(&db);
    let writer = EventWriter::new(&settings).await;
    let partition = writer.partition_of("acc-old");

    // The old release's database, as it left it: version 2 of acc-old applied, offset 2 next.
    sqlx::any::install_default_drivers();
    let url = match backend {
        Backend::Sqlite => format!("{}?mode=rwc", db.url),
        Backend::Postgres => db.url.clone(),
    };
    let pool = AnyPoolOptions::new()
        .max_connections(1)
        .connect(&url)
        .await
        .unwrap();
    for statement in fixture(&writer.topic, partition) {
        sqlx::query(&statement).execute(&pool).await.unwrap();
    }
    pool.close().await;

    // The topic holds versions 1 and 2 (offsets 0 and 1, already projected) and a third.
    let codec = EventCodec::json("EUR");
    let at = |s| Utc.timestamp_opt(1_796_032_800 + s, 0).unwrap();
    let events = [
        Event::AccountOpened {
            owner: "Ann".into(),
            currency: "EUR".into(),
            initial_balance_minor: 100,
        },
        Event::MoneyDeposited { amount_minor: 50 },
        Event::MoneyDeposited { amount_minor: 25 },
    ];
    for (i, event) in events.iter().enumerate() {
        let version = i as u64 + 1;
        let envelope =
            EventEnvelope::new("acc-old", version, event, at(i as i64 + 1), Metadata::new());
        assert_eq!(
            writer.envelope(&codec, &envelope).await,
            (partition, i as i64),
            "a fresh topic"
        );
    }

    let app = spawn_app(settings).await;
    let account = app.wait_version("acc-old", 3).await;
    assert_eq!(
        (
            account["balance_minor"].as_i64(),
            account["transaction_count"].as_u64(),
            account["opened_at"].as_str()
        ),
        (Some(175), Some(2), Some("2026-11-30T10:00:01Z")),
        "the third event on top of the stored state: {account}"
    );
    let (status, history) = app.get("/accounts/acc-old/events").await;
    assert_eq!(status, 200, "{history}");
    let ids: Vec<&str> = history
        .as_array()
        .expect("events")
        .iter()
        .map(|e| e["event_id"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(ids.len(), 3, "{history}");
    assert_eq!(
        ids[..2],
        [
            "0192e5a4-0000-7000-8000-000000000001",
            "0192e5a4-0000-7000-8000-000000000002"
        ],
        "the old rows are served, not projected again"
    );
    let (_, at_two) = app.get("/accounts/acc-old?version=2").await;
    assert_eq!(at_two["balance_minor"].as_i64(), Some(150), "{at_two}");
    app.stop().await.expect("clean stop");
}
