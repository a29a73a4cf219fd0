//! The explorer at `/`: the JSON routes it adds (search, status, dead letters, assets) on both
//! engines, and the page itself in a real browser — headless Chromium from Debian's `chromium`
//! and `chromium-driver` packages, driven over WebDriver (fantoccini) — against the running
//! service. The browser test saves screenshots under `<target>/explorer/`.
//!
//! Without Chromium the browser test skips with a loud message, except under `CI=true`, where it
//! fails: CI installs it (`scripts/test` → `ensure_browser`).

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use chrono::{DateTime, FixedOffset, TimeZone, Utc};
use fantoccini::elements::Element;
use fantoccini::key::Key;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};
use shared::envelope::Metadata;
use shared::{Bank, BankAccount, BankEvent, Event, EventCodec, EventEnvelope};

use crate::helpers::{
    Backend, EventWriter, TestApp, TestDb, ids, rfc3339, settings_for, spawn_app, wait_for,
};

both_backends!(explorer_api);

/// One event of a test account, with its command and correlation ids in the metadata.
fn env(id: &str, version: u64, event: Event, at: DateTime<Utc>) -> EventEnvelope {
    let mut metadata = Metadata::new();
    metadata.insert(
        "causation_id".into(),
        json!(uuid::Uuid::new_v4().to_string()),
    );
    metadata.insert(
        "correlation_id".into(),
        json!(format!("corr-{}", uuid::Uuid::new_v4().simple())),
    );
    EventEnvelope::new(id, version, &event, at, metadata)
}

fn base() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 3, 2, 8, 0, 0)
        .single()
        .expect("valid date")
}

fn opened(owner: &str, currency: &str, initial: i64) -> Event {
    Event::AccountOpened {
        owner: owner.into(),
        currency: currency.into(),
        initial_balance_minor: initial,
    }
}

/// Produces `events` for `id` (versions from 1, one hour apart from `base() + offset_h`).
async fn write_account(
    writer: &EventWriter,
    codec: &EventCodec,
    id: &str,
    offset_h: i64,
    events: Vec<Event>,
) -> Vec<EventEnvelope> {
    let mut out = Vec::new();
    for (i, e) in events.into_iter().enumerate() {
        let at = base() + chrono::Duration::hours(offset_h + i as i64);
        let envelope = env(id, i as u64 + 1, e, at);
        writer.envelope(codec, &envelope).await;
        out.push(envelope);
    }
    out
}

async fn explorer_api(backend: Backend) {
    let db = TestDb::new(backend).await;
    let settings = settings_for(&db);
    let app = spawn_app(settings.clone()).await;
    let writer = EventWriter::new(&settings).await;
    let codec = EventCodec::json("USD");
    let p = ids("search");
    let a = format!("{p}-a1");
    let b = format!("{p}-b2");
    let pct = format!("{p}-50%off");
    let e = format!("{p}-É3");
    write_account(
        &writer,
        &codec,
        &a,
        0,
        vec![opened("Zoë Quinn", "EUR", 100)],
    )
    .await;
    write_account(&writer, &codec, &b, 0, vec![opened("Bo", "USD", 5)]).await;
    write_account(&writer, &codec, &pct, 0, vec![opened("Al", "USD", 0)]).await;
    write_account(
        &writer,
        &codec,
        &e,
        0,
        vec![opened("Élise Ørsted", "EUR", 0)],
    )
    .await;
    writer.raw(&format!("{p}-poison"), b"{not json", None).await;
    for id in [&a, &b, &pct, &e] {
        app.wait_version(id, 1).await;
    }
    app.wait_ready().await;

    let ids_of = |body: &Value| -> Vec<String> {
        body["accounts"]
            .as_array()
            .map(|list| {
                list.iter()
                    .filter_map(|a| a["id"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };
    for (q, want) in [
        (p.clone(), vec![&a, &pct, &b, &e]),
        ("QUINN".to_owned(), vec![&a]),
        ("zoë".to_owned(), vec![&a]),
        // Letters beyond ASCII fold on both databases (SQLite's LOWER would miss these).
        ("ZOË".to_owned(), vec![&a]),
        ("élise".to_owned(), vec![&e]),
        ("ØRSTED".to_owned(), vec![&e]),
        (format!("{p}-é3"), vec![&e]),
        ("%".to_owned(), vec![&pct]),
        ("_".to_owned(), vec![]),
        ("  BO ".to_owned(), vec![&b]),
    ] {
        let mut want: Vec<String> = want.into_iter().cloned().collect();
        want.sort();
        let (status, body) = app.get(&format!("/accounts?q={}", urlencode(&q))).await;
        assert_eq!(status, 200, "q={q:?}: {body}");
        assert_eq!(ids_of(&body), want, "q={q:?}: {body}");
    }
    let (_, body) = app
        .get(&format!(
            "/accounts?q={}&owner=Bo&status=active",
            urlencode(&p)
        ))
        .await;
    assert_eq!(ids_of(&body), vec![b.clone()], "{body}");
    let (_, body) = app
        .get(&format!("/accounts?q={}&limit=2", urlencode(&p)))
        .await;
    assert_eq!(ids_of(&body), vec![pct.clone(), a.clone()], "{body}");
    assert_eq!(body["next"], a.as_str(), "{body}");
    let (_, body) = app
        .get(&format!(
            "/accounts?q={}&limit=2&after={}",
            urlencode(&p),
            urlencode(&a)
        ))
        .await;
    assert_eq!(ids_of(&body), vec![b.clone(), e.clone()], "{body}");

    // Status: lag per partition, counts and the dead-letter count (counted every 2 s).
    let status = wait_for(
        "the dead letter to be counted",
        Duration::from_secs(60),
        || async {
            let (code, body) = app.get("/status").await;
            (code == 200 && body["dead_letters"] == 1).then_some(body)
        },
    )
    .await;
    assert_eq!(status["ready"], true, "{status}");
    assert_eq!(status["topic"], app.topic.as_str(), "{status}");
    assert_eq!(status["accounts"], 4, "{status}");
    assert_eq!(status["events"], 4, "{status}");
    assert_eq!(status["lag"], 0, "{status}");
    assert!(status.get("lag_problem").is_none(), "{status}");
    assert!(status["lag_age_ms"].as_u64() < Some(10_000), "{status}");
    assert_eq!(
        status["dead_letter_topic"],
        format!("{}.dlq", app.topic),
        "{status}"
    );
    let partitions = status["partitions"].as_array().expect("partitions");
    assert_eq!(
        partitions.len(),
        crate::helpers::PARTITIONS as usize,
        "{status}"
    );
    for part in partitions {
        assert_eq!(part["lag"], 0, "{status}");
        assert_eq!(part["position"], part["end"], "{status}");
    }

    let (code, body) = app.get("/dead-letters").await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["total"], 1, "{body}");
    let letter = &body["dead_letters"][0];
    assert_eq!(letter["code"], "InvalidJson", "{body}");
    assert_eq!(letter["key"], format!("{p}-poison"), "{body}");
    assert_eq!(letter["original_topic"], app.topic.as_str(), "{body}");
    assert_eq!(letter["payload"], "{not json", "{body}");
    assert!(body.get("next").is_none(), "one letter: one page: {body}");
    for bad in [
        "/dead-letters?limit=0",
        "/dead-letters?limit=501",
        "/dead-letters?limit=x",
        "/dead-letters?before=0",
        "/dead-letters?before=0:1,0:2",
    ] {
        let (code, body) = app.get(bad).await;
        assert_eq!(
            (code, &body["error"]["code"]),
            (400, &json!("InvalidQuery")),
            "{bad}"
        );
    }

    // The page and its assets, with their content types.
    for (path, content_type, needle) in [
        ("/", "text/html; charset=utf-8", "/assets/explorer.js"),
        (
            "/assets/explorer.js",
            "text/javascript; charset=utf-8",
            "min_version",
        ),
        ("/assets/explorer.css", "text/css; charset=utf-8", "@media"),
    ] {
        let r = app.client.get(app.url(path)).send().await.expect("request");
        assert_eq!(r.status().as_u16(), 200, "{path}");
        assert_eq!(
            r.headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok()),
            Some(content_type),
            "{path}"
        );
        let text = r.text().await.unwrap_or_default();
        assert!(text.contains(needle), "{path} lacks {needle}");
        // Nothing from another origin (the SVG namespace is a name, not a fetch).
        let text = text.replace("http://www.w3.org/2000/svg", "");
        assert!(
            !text.contains("http://") && !text.contains("https://") && !text.contains("//cdn"),
            "{path} refers to another origin"
        );
    }
    app.stop().await.expect("clean stop");
}

fn urlencode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

// ------------------------------------------------------------------------ the browser test

/// The browser test runs once, on SQLite: the page only talks to the HTTP API, whose answers on
/// both engines the other tests (and `explorer_api`) compare.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explorer_in_a_browser() {
    let Some(browser) = Browser::find() else {
        return;
    };
    let started = Instant::now();
    let db = TestDb::new(Backend::Sqlite).await;
    let settings = settings_for(&db);
    let app = spawn_app(settings.clone()).await;
    let writer = EventWriter::new(&settings).await;
    let codec = EventCodec::json("USD");
    // The database and topics are the test's own: short ids keep the screenshots readable.
    let p = format!("acc-{}", &ids("x")[2..8]);
    let alice = format!("{p}-alice");
    let bob = format!("{p}-bob");
    let carol = format!("{p}-carol");
    let alice_events = write_account(
        &writer,
        &codec,
        &alice,
        0,
        vec![
            opened("Alice Martin", "EUR", 10_000),
            Event::MoneyDeposited {
                amount_minor: 5_025,
            },
            Event::MoneyWithdrawn {
                amount_minor: 2_000,
            },
            Event::MoneyDeposited {
                amount_minor: 123_456,
            },
            Event::MoneyWithdrawn {
                amount_minor: 31_000,
            },
        ],
    )
    .await;
    write_account(
        &writer,
        &codec,
        &bob,
        1,
        vec![
            opened("Bob Chen", "USD", 250_000),
            Event::MoneyDeposited { amount_minor: 99 },
        ],
    )
    .await;
    write_account(
        &writer,
        &codec,
        &carol,
        2,
        vec![
            opened("Carol Diaz", "JPY", 0),
            Event::MoneyDeposited { amount_minor: 5000 },
            Event::MoneyWithdrawn { amount_minor: 5000 },
            Event::AccountClosed,
        ],
    )
    .await;
    writer
        .raw(&format!("{p}-poison"), b"\x00garbage", None)
        .await;
    app.wait_version(&alice, 5).await;
    app.wait_version(&bob, 2).await;
    app.wait_version(&carol, 4).await;
    app.wait_ready().await;
    let setup = started.elapsed();

    let web = browser.start().await;
    let shots = screenshot_dir();
    let page = Page {
        client: &web.client,
        app: &app,
    };

    // ---- The accounts list, searched by the test's prefix.
    page.goto(&format!("/#/?q={p}")).await;
    page.wait(&format!("#accounts tbody tr[data-id=\"{carol}\"]"))
        .await;
    page.wait("#projection[data-ready=\"true\"]").await;
    page.wait("#dlq-count[data-count=\"1\"]").await;
    page.wait(&format!(
        ".lag[data-partition=\"{}\"]",
        crate::helpers::PARTITIONS - 1
    ))
    .await;
    let (_, listed) = app.get(&format!("/accounts?q={p}")).await;
    let rows = page.all("#accounts tbody tr[data-id]").await;
    assert_eq!(rows.len(), 3);
    for (row, want) in rows
        .iter()
        .zip(listed["accounts"].as_array().expect("accounts"))
    {
        assert_eq!(attr(row, "data-id").await, want["id"].as_str().expect("id"));
        assert_eq!(
            cell(row, "owner").await,
            want["owner"].as_str().expect("owner")
        );
        assert_eq!(
            cell(row, "currency").await,
            want["currency"].as_str().expect("cur")
        );
        assert_eq!(
            cell(row, "balance").await,
            grouped(want["balance"].as_str().expect("balance"))
        );
        assert_eq!(
            cell(row, "status").await,
            want["status"].as_str().expect("status")
        );
        assert_eq!(cell(row, "version").await, want["version"].to_string());
        assert_eq!(
            cell(row, "updated").await,
            local(want["updated_at"].as_str().expect("updated"))
        );
    }
    let zone = page.text("#tz").await;
    assert!(
        zone.ends_with("UTC+05:30"),
        "the page says which time zone it shows: {zone}"
    );
    page.shot(&shots, "accounts").await;

    // Status filter: only the closed account.
    page.find("#status")
        .await
        .select_by_value("closed")
        .await
        .expect("select closed");
    page.wait("#accounts tbody tr[data-id]:only-child").await;
    page.wait(&format!("#accounts tbody tr[data-id=\"{carol}\"]"))
        .await;
    assert!(
        page.client
            .current_url()
            .await
            .expect("url")
            .as_str()
            .contains("status=closed")
    );

    // Live: a new account appears in the open list.
    page.goto(&format!("/#/?q={p}")).await;
    page.wait(&format!("#accounts tbody tr[data-id=\"{alice}\"]"))
        .await;
    let dave = format!("{p}-dave");
    write_account(
        &writer,
        &codec,
        &dave,
        3,
        vec![opened("Dave Okafor", "GBP", 4_200)],
    )
    .await;
    page.wait(&format!("#accounts tbody tr[data-id=\"{dave}\"]"))
        .await;
    let row = page
        .find(&format!("#accounts tbody tr[data-id=\"{dave}\"]"))
        .await;
    assert_eq!(cell(&row, "balance").await, "42.00");

    // ---- One account: opened from the list by keyboard-reachable link.
    page.find(&format!("#accounts tbody tr[data-id=\"{alice}\"] a"))
        .await
        .click()
        .await
        .expect("open alice");
    page.wait("#account[data-version=\"5\"]").await;
    page.wait("#asof[data-version=\"5\"]").await;
    let (_, now) = app.get(&format!("/accounts/{alice}")).await;
    assert_eq!(
        page.text("#now-balance").await,
        format!("{} EUR", grouped(now["balance"].as_str().expect("balance")))
    );
    check_timeline(&page, &alice, &alice_events).await;
    assert_eq!(page.all("#chart circle.point").await.len(), 5);

    // As of a version, chosen with the keyboard on the slider: Home → 1, → 2, → 3.
    let slider = page.find("#version-slider").await;
    slider.send_keys(&Key::Home).await.expect("Home");
    check_as_of(&page, &alice, "?version=1", 1).await;
    slider.send_keys(&Key::Right).await.expect("Right");
    check_as_of(&page, &alice, "?version=2", 2).await;
    slider.send_keys(&Key::Right).await.expect("Right");
    check_as_of(&page, &alice, "?version=3", 3).await;
    let selected = page.find("#timeline tbody tr.selected").await;
    assert_eq!(attr(&selected, "data-version").await, "3");
    page.wait("#chart circle.point.selected[data-version=\"3\"]")
        .await;
    page.shot_full(&shots, "account").await;

    // As of a time between versions 2 and 3 (a link into the page).
    let between = rfc3339(&(alice_events[1].timestamp + chrono::Duration::minutes(30)));
    page.goto(&format!("/#/account/{alice}?as_of={between}"))
        .await;
    check_as_of(&page, &alice, &format!("?as_of={between}"), 2).await;

    // Bad input: a time that is no time, a time before the account, an unknown account.
    page.goto(&format!("/#/account/{alice}?as_of=yesterday"))
        .await;
    page.wait("#asof[data-error=\"InvalidQuery\"]").await;
    let (status, body) = app.get(&format!("/accounts/{alice}?as_of=yesterday")).await;
    assert_eq!(status, 400);
    let shown = page.text("#asof").await;
    assert!(
        shown.contains(body["error"]["message"].as_str().expect("message")),
        "{shown}"
    );
    page.goto(&format!("/#/account/{alice}?as_of=2020-01-01T00:00:00Z"))
        .await;
    page.wait("#asof[data-error=\"AccountNotFound\"]").await;
    page.goto(&format!("/#/account/{p}-nobody")).await;
    page.wait("#error").await;
    let (status, body) = app.get(&format!("/accounts/{p}-nobody")).await;
    assert_eq!(status, 404);
    let shown = page.text("#error").await;
    assert!(
        shown.contains(body["error"]["message"].as_str().expect("message")),
        "{shown}"
    );
    page.shot(&shots, "unknown-account").await;

    // Schema toggle: the same events as seed-era (v1) readers get them.
    page.goto(&format!("/#/account/{alice}")).await;
    page.wait("#timeline[data-schema=\"2\"] tbody tr[data-version=\"5\"]")
        .await;
    page.find("input[name=schema][value=\"1\"]")
        .await
        .click()
        .await
        .expect("v1");
    page.wait("#timeline[data-schema=\"1\"]").await;
    let (_, v1) = app
        .get(&format!("/accounts/{alice}/events?schema_version=1"))
        .await;
    let v1 = v1.as_array().expect("v1 events").clone();
    let rows = page.all("#timeline tbody tr").await;
    assert_eq!(rows.len(), v1.len());
    for (row, want) in rows.iter().zip(&v1) {
        let shown: Value = serde_json::from_str(&cell(row, "data").await).expect("data is JSON");
        let keys = |v: &Value| -> Vec<String> {
            v.as_object()
                .map(|o| o.keys().cloned().collect())
                .unwrap_or_default()
        };
        assert_eq!(keys(&shown), keys(&want["data"]), "v{}", want["version"]);
    }
    assert!(cell(&rows[1], "data").await.contains("\"amount\""));

    // Live: a new event shows up in the open account without a reload.
    page.find("input[name=schema][value=\"2\"]")
        .await
        .click()
        .await
        .expect("v2");
    page.wait("#timeline[data-schema=\"2\"]").await;
    let sixth = env(
        &alice,
        6,
        Event::MoneyDeposited { amount_minor: 750 },
        base() + chrono::Duration::hours(5),
    );
    writer.envelope(&codec, &sixth).await;
    page.wait("#account[data-version=\"6\"]").await;
    page.wait("#timeline tbody tr[data-version=\"6\"]").await;
    let mut all_events = alice_events.clone();
    all_events.push(sixth);
    check_timeline(&page, &alice, &all_events).await;

    // ---- Dead letters.
    page.find("#nav-dlq")
        .await
        .click()
        .await
        .expect("dead letters");
    page.wait("#dead-letters tbody tr").await;
    let (_, dead) = app.get("/dead-letters").await;
    assert_eq!(page.all("#dead-letters tbody tr").await.len(), 1);
    let code = dead["dead_letters"][0]["code"]
        .as_str()
        .expect("code")
        .to_owned();
    assert_eq!(
        page.text("#dead-letters tbody tr td[data-col=code]").await,
        code
    );
    page.shot(&shots, "dead-letters").await;

    // ---- A narrow screen.
    page.client.set_window_size(420, 900).await.expect("resize");
    page.goto(&format!("/#/?q={p}")).await;
    page.wait(&format!("#accounts tbody tr[data-id=\"{dave}\"]"))
        .await;
    let width: Value = page
        .client
        .execute("return document.documentElement.scrollWidth;", vec![])
        .await
        .expect("width");
    assert!(
        width.as_u64().unwrap_or(9999) <= 420,
        "no sideways scrolling: {width}"
    );
    page.shot(&shots, "accounts-narrow").await;
    page.goto(&format!("/#/account/{alice}")).await;
    page.wait("#asof[data-version=\"6\"]").await;
    let width: Value = page
        .client
        .execute("return document.documentElement.scrollWidth;", vec![])
        .await
        .expect("width");
    assert!(
        width.as_u64().unwrap_or(9999) <= 420,
        "no sideways scrolling: {width}"
    );
    page.shot_full(&shots, "account-narrow").await;

    web.stop().await;
    app.stop().await.expect("clean stop");
    eprintln!(
        "explorer browser test: setup {:.1}s, browser part {:.1}s; screenshots in {}",
        setup.as_secs_f64(),
        (started.elapsed() - setup).as_secs_f64(),
        shots.display()
    );
}

/// A transfer on both accounts' timelines, linked to its own page with its steps.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transfer_in_a_browser() {
    let Some(browser) = Browser::find() else {
        return;
    };
    let db = TestDb::new(Backend::Sqlite).await;
    let settings = settings_for(&db);
    let app = spawn_app(settings.clone()).await;
    let writer = EventWriter::new(&settings).await;
    let codec = EventCodec::json("USD");
    let p = format!("tr-{}", &ids("x")[2..8]);
    let (from, to, transfer) = (format!("{p}-from"), format!("{p}-to"), format!("{p}-t"));
    write_account(
        &writer,
        &codec,
        &from,
        0,
        vec![opened("Ann", "EUR", 10_000)],
    )
    .await;
    write_account(&writer, &codec, &to, 0, vec![opened("Ben", "EUR", 0)]).await;
    let leg = shared::bank_account::TransferLeg {
        transfer_id: transfer.clone(),
        from: from.clone(),
        to: to.clone(),
        amount_minor: 2_550,
        currency: Some("EUR".into()),
        reason: None,
    };
    let started = shared::transfer::Start {
        from: from.clone(),
        to: to.clone(),
        amount_minor: 2_550,
        currency: Some("EUR".into()),
    };
    let ending = shared::transfer::Ending {
        currency: Some("EUR".into()),
        reason: None,
    };
    use shared::transfer::TransferEvent;
    let steps: Vec<(&str, u64, BankEvent)> = vec![
        (
            &transfer,
            1,
            BankEvent::Transfer(TransferEvent::TransferStarted(started)),
        ),
        (
            &from,
            2,
            BankEvent::Account(Event::TransferDebited(leg.clone())),
        ),
        (
            &to,
            2,
            BankEvent::Account(Event::TransferCredited(leg.clone())),
        ),
        (
            &from,
            3,
            BankEvent::Account(Event::TransferSettled(leg.clone())),
        ),
        (
            &transfer,
            2,
            BankEvent::Transfer(TransferEvent::TransferCompleted(ending)),
        ),
    ];
    for (i, (id, version, event)) in steps.into_iter().enumerate() {
        let mut metadata = Metadata::new();
        metadata.insert("correlation_id".into(), json!(transfer));
        let at = base() + chrono::Duration::minutes(60 + i as i64);
        let envelope = EventEnvelope::of::<Bank>(id, version, &event, at, metadata);
        writer.envelope(&codec, &envelope).await;
    }
    app.wait_version(&from, 3).await;
    app.wait_version(&to, 2).await;

    let web = browser.start().await;
    let shots = screenshot_dir();
    let page = Page {
        client: &web.client,
        app: &app,
    };
    // The source's timeline: the debit, with the balance after it and a link to the transfer.
    page.goto(&format!("/#/account/{from}")).await;
    let debit = page.wait("tr[data-type=\"TransferDebited\"]").await;
    assert_eq!(cell(&debit, "amount").await, "−25.50");
    assert_eq!(cell(&debit, "balance").await, "74.50");
    let link = page
        .find("tr[data-type=\"TransferDebited\"] a.transfer-link")
        .await;
    link.click().await.expect("follow the transfer link");
    // The transfer's page: status, both accounts and its five steps in order.
    page.wait("#transfer-steps tbody tr:nth-child(5)").await;
    assert_eq!(
        page.text("#transfer-facts [data-field=\"status\"]").await,
        "completed"
    );
    assert_eq!(page.text("#transfer-facts [data-field=\"to\"]").await, to);
    assert_eq!(
        page.text("#transfer-facts [data-field=\"amount\"]").await,
        "25.50 EUR"
    );
    let mut order = Vec::new();
    for row in page.all("#transfer-steps tbody tr").await {
        order.push(attr(&row, "data-type").await);
    }
    assert_eq!(
        order,
        [
            "TransferStarted",
            "TransferDebited",
            "TransferCredited",
            "TransferSettled",
            "TransferCompleted"
        ]
    );
    page.shot_full(&shots, "transfer").await;
    // The target's timeline shows the credit.
    page.find("#transfer-facts [data-field=\"to\"]")
        .await
        .click()
        .await
        .expect("follow the target link");
    let credit = page.wait("tr[data-type=\"TransferCredited\"]").await;
    assert_eq!(cell(&credit, "amount").await, "+25.50");

    // A history longer than one page (1000 events) is read in pages, and a new event is
    // fetched alone and appended live.
    let long = format!("{p}-long");
    let mut history = vec![opened("Lee", "EUR", 0)];
    history.extend((0..1204).map(|_| Event::MoneyDeposited { amount_minor: 1 }));
    let mut messages = Vec::new();
    for (i, event) in history.into_iter().enumerate() {
        let envelope = env(
            &long,
            i as u64 + 1,
            event,
            base() + chrono::Duration::seconds(i as i64),
        );
        messages.push((
            long.clone(),
            codec.encode(&writer.topic, &envelope).await.unwrap(),
        ));
    }
    writer.many(&messages).await;
    app.wait_version(&long, 1205).await;
    page.goto(&format!("/#/account/{long}")).await;
    page.wait("#timeline tr[data-version=\"1205\"]").await;
    assert_eq!(page.all("#timeline tbody tr").await.len(), 1205);
    let next = env(
        &long,
        1206,
        Event::MoneyDeposited { amount_minor: 7 },
        base() + chrono::Duration::seconds(2000),
    );
    writer.envelope(&codec, &next).await;
    let appended = page.wait("#timeline tr[data-version=\"1206\"]").await;
    assert_eq!(cell(&appended, "balance").await, "12.11");
    assert_eq!(page.all("#timeline tbody tr").await.len(), 1206);
    web.stop().await;
    app.stop().await.expect("clean stop");
}

/// The timeline rows against the API's events and the balance each event leaves.
async fn check_timeline(page: &Page<'_>, id: &str, produced: &[EventEnvelope]) {
    let (_, api) = page.app.get(&format!("/accounts/{id}/events")).await;
    let api = api.as_array().expect("events").clone();
    assert_eq!(api.len(), produced.len());
    let rows = page.all("#timeline tbody tr").await;
    assert_eq!(rows.len(), api.len(), "one row per event");
    let mut account = BankAccount::default();
    for ((row, event), sent) in rows.iter().zip(&api).zip(produced) {
        let before = account.balance_minor;
        account.apply(&sent.event().expect("valid"));
        assert_eq!(
            attr(row, "data-version").await,
            event["version"].to_string()
        );
        assert_eq!(cell(row, "version").await, event["version"].to_string());
        let time = row
            .find(Locator::Css("td[data-col=time] time"))
            .await
            .expect("time");
        assert_eq!(
            attr(&time, "datetime").await,
            event["timestamp"].as_str().expect("ts")
        );
        assert_eq!(
            time.text().await.expect("text"),
            local(event["timestamp"].as_str().expect("ts"))
        );
        assert_eq!(
            cell(row, "type").await,
            event["event_type"].as_str().expect("type")
        );
        let delta = account.balance_minor - before;
        let amount = match sent.event().expect("valid") {
            Event::AccountClosed => String::new(),
            Event::AccountOpened {
                initial_balance_minor,
                ..
            } => sign(initial_balance_minor),
            _ => sign(delta),
        };
        assert_eq!(cell(row, "amount").await, amount, "v{}", event["version"]);
        assert_eq!(
            cell(row, "balance").await,
            grouped(&shared::money::format_minor(account.balance_minor, 2)),
            "v{}",
            event["version"]
        );
        for (col, key) in [
            ("command_id", "causation_id"),
            ("correlation_id", "correlation_id"),
        ] {
            let want = event["metadata"][key].as_str().expect("id in the metadata");
            let shown = row
                .find(Locator::Css(&format!("td[data-col={col}] span")))
                .await
                .expect("id");
            assert_eq!(attr(&shown, "data-full").await, want, "{col}");
            assert_eq!(attr(&shown, "title").await, want, "{col}");
            assert_eq!(
                shown.text().await.expect("text"),
                format!("{}…", &want[..8]),
                "{col}"
            );
        }
    }
}

/// The as-of panel shows version `version`, equal to `GET /accounts/{id}{query}`.
async fn check_as_of(page: &Page<'_>, id: &str, query: &str, version: u64) {
    page.wait(&format!("#asof[data-version=\"{version}\"]"))
        .await;
    let (status, want) = page.app.get(&format!("/accounts/{id}{query}")).await;
    assert_eq!(status, 200, "{want}");
    assert_eq!(want["version"], version, "{want}");
    let mut shown = BTreeMap::new();
    for col in ["balance", "status", "version", "transaction_count", "owner"] {
        shown.insert(col, page.text(&format!("#asof-{col}")).await);
    }
    assert_eq!(
        shown["balance"],
        format!(
            "{} {}",
            grouped(want["balance"].as_str().expect("balance")),
            want["currency"].as_str().expect("currency")
        )
    );
    assert_eq!(shown["status"], want["status"].as_str().expect("status"));
    assert_eq!(shown["version"], want["version"].to_string());
    assert_eq!(
        shown["transaction_count"],
        want["transaction_count"].to_string()
    );
    assert_eq!(shown["owner"], want["owner"].as_str().expect("owner"));
    let updated = page.find("#asof-updated_at time").await;
    assert_eq!(
        attr(&updated, "datetime").await,
        want["updated_at"].as_str().expect("updated")
    );
}

/// "+12.34" / "−12.34" as the page writes amounts (EUR: 2 digits).
fn sign(minor: i64) -> String {
    let text = grouped(&shared::money::format_minor(minor.abs(), 2));
    match minor.signum() {
        1 => format!("+{text}"),
        -1 => format!("−{text}"),
        _ => text,
    }
}

/// Thousands separators, as the page shows decimals ("1234.50" → "1,234.50").
fn grouped(decimal: &str) -> String {
    let (sign, rest) = decimal
        .strip_prefix('-')
        .map_or(("", decimal), |r| ("-", r));
    let (whole, fraction) = rest
        .split_once('.')
        .map_or((rest, None), |(w, f)| (w, Some(f)));
    let mut out = String::new();
    for (i, c) in whole.chars().enumerate() {
        if i > 0 && (whole.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    format!(
        "{sign}{out}{}",
        fraction.map(|f| format!(".{f}")).unwrap_or_default()
    )
}

/// The browser's time zone in this test: +05:30 all year, so the expected text is fixed.
const TZ: &str = "Asia/Kolkata";

/// An RFC 3339 time as the page shows it in [`TZ`].
fn local(rfc3339: &str) -> String {
    let offset = FixedOffset::east_opt(5 * 3600 + 1800).expect("offset");
    DateTime::parse_from_rfc3339(rfc3339)
        .expect("RFC 3339")
        .with_timezone(&offset)
        .format("%Y-%m-%d %H:%M:%S")
        .to_string()
}

async fn attr(el: &Element, name: &str) -> String {
    el.attr(name).await.expect("attribute").unwrap_or_default()
}

async fn cell(row: &Element, col: &str) -> String {
    row.find(Locator::Css(&format!("td[data-col={col}]")))
        .await
        .unwrap_or_else(|e| panic!("no {col} cell: {e}"))
        .text()
        .await
        .expect("text")
        .trim()
        .to_owned()
}

/// `<target>/explorer/`: `CARGO_TARGET_DIR`, else the workspace's `target/`.
fn screenshot_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let dir = target.join("explorer");
    std::fs::create_dir_all(&dir).expect("create the screenshot directory");
    dir
}

/// The page under test.
struct Page<'a> {
    client: &'a Client,
    app: &'a TestApp,
}

impl Page<'_> {
    async fn goto(&self, path: &str) {
        self.client
            .goto(&self.app.url(path))
            .await
            .unwrap_or_else(|e| panic!("open {path}: {e}"));
    }

    /// Waits (up to 30 s, checking every 100 ms) for an element; fails with the page's text.
    async fn wait(&self, css: &str) -> Element {
        match self
            .client
            .wait()
            .at_most(Duration::from_secs(30))
            .every(Duration::from_millis(100))
            .for_element(Locator::Css(css))
            .await
        {
            Ok(el) => el,
            Err(e) => {
                let body = match self.client.find(Locator::Css("body")).await {
                    Ok(b) => b.text().await.unwrap_or_default(),
                    Err(_) => String::new(),
                };
                panic!("waiting for `{css}`: {e}\n--- page text ---\n{body}");
            }
        }
    }

    async fn find(&self, css: &str) -> Element {
        self.client
            .find(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("find `{css}`: {e}"))
    }

    async fn all(&self, css: &str) -> Vec<Element> {
        self.client
            .find_all(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("find all `{css}`: {e}"))
    }

    async fn text(&self, css: &str) -> String {
        self.find(css)
            .await
            .text()
            .await
            .expect("text")
            .trim()
            .to_owned()
    }

    async fn shot(&self, dir: &std::path::Path, name: &str) {
        let png = self.client.screenshot().await.expect("screenshot");
        let path = dir.join(format!("{name}.png"));
        std::fs::write(&path, png).expect("write screenshot");
    }

    /// A screenshot of the whole page: the window is made as tall as the page first.
    async fn shot_full(&self, dir: &std::path::Path, name: &str) {
        let (width, height) = {
            let (_, _, w, h) = self.client.get_window_rect().await.expect("window rect");
            (w as u32, h as u32)
        };
        let page_height: Value = self
            .client
            .execute("return document.documentElement.scrollHeight;", vec![])
            .await
            .expect("page height");
        let tall = page_height.as_u64().unwrap_or(u64::from(height)) as u32;
        self.client
            .set_window_size(width, tall.max(height))
            .await
            .expect("resize");
        self.shot(dir, name).await;
        self.client
            .set_window_size(width, height)
            .await
            .expect("resize back");
    }
}

/// Where Chromium and its driver are.
struct Browser {
    chromium: PathBuf,
    driver: PathBuf,
}

/// A running chromedriver with one session.
struct Web {
    client: Client,
    driver: tokio::process::Child,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// `CHROMIUM`/`CHROMEDRIVER` or Debian's paths. Missing: `None` with a loud message, or a
    /// failure under `CI=true`.
    fn find() -> Option<Browser> {
        let pick = |var: &str, default: &str| {
            std::env::var_os(var)
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(default))
        };
        let chromium = pick("CHROMIUM", "/usr/bin/chromium");
        let driver = pick("CHROMEDRIVER", "/usr/bin/chromedriver");
        let missing: Vec<String> = [&chromium, &driver]
            .into_iter()
            .filter(|p| !p.exists())
            .map(|p| p.display().to_string())
            .collect();
        if missing.is_empty() {
            return Some(Browser { chromium, driver });
        }
        let text = format!(
            "the explorer browser test needs Chromium and chromedriver, missing: {}. Install \
             them with `apt-get install chromium chromium-driver` (scripts/test does), or set \
             CHROMIUM / CHROMEDRIVER",
            missing.join(", ")
        );
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("{text} (CI=true: failing instead of skipping)");
        }
        eprintln!("\n********************************************************************");
        eprintln!("** SKIPPED: {text}");
        eprintln!("********************************************************************\n");
        None
    }

    async fn start(&self) -> Web {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let driver = tokio::process::Command::new(&self.driver)
            .arg(format!("--port={port}"))
            .env("TZ", TZ)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", self.driver.display()));
        wait_for(
            "chromedriver to listen",
            Duration::from_secs(30),
            || async {
                tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .ok()
                    .map(|_| ())
            },
        )
        .await;
        let profile = tempfile::tempdir().expect("profile dir");
        let mut caps = serde_json::Map::new();
        caps.insert("browserName".into(), json!("chrome"));
        caps.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": self.chromium.display().to_string(),
                "args": [
                    "--headless",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-quic",
                    "--no-first-run",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-sync",
                    "--disable-dev-shm-usage",
                    "--hide-scrollbars",
                    "--force-device-scale-factor=1",
                    "--lang=en-US",
                    "--window-size=1280,960",
                    format!("--user-data-dir={}", profile.path().display()),
                ],
            }),
        );
        let client = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps)
            .connect(&format!("http://127.0.0.1:{port}"))
            .await
            .expect("a Chromium session");
        Web {
            client,
            driver,
            _profile: profile,
        }
    }
}

impl Web {
    async fn stop(mut self) {
        let _ = self.client.clone().close().await;
        let _ = self.driver.start_kill();
        let _ = self.driver.wait().await;
    }
}
