//! The API as a contract: the OpenAPI document lists every route, bad input of every kind
//! answers the error shape, `/metrics` passes `promtool check metrics`, and schemathesis finds
//! no response outside the document (`scripts/api-check`). On SQLite only: nothing here depends
//! on the database.

use chrono::Utc;
use serde_json::Value;
use shared::config::Settings;
use shared::envelope::Metadata;
use shared::testing::{ExternalCheck, api_check, promtool_check_metrics, skip_without};
use shared::{Event, EventCodec, EventEnvelope};

use crate::helpers::{
    Backend, EventWriter, TestApp, TestDb, ids, settings_for, spawn_app, wait_for,
};

/// Every route the router serves (all GET): the document must list each, and nothing else.
const ROUTES: [&str; 14] = [
    "/",
    "/accounts",
    "/accounts/{id}",
    "/accounts/{id}/events",
    "/transfers",
    "/transfers/{id}",
    "/status",
    "/dead-letters",
    "/health",
    "/ready",
    "/metrics",
    "/openapi.json",
    "/assets/explorer.js",
    "/assets/explorer.css",
];

/// An app on SQLite with one account (`id`, two events), ready.
async fn app_with_an_account() -> (TestApp, TestDb, String) {
    app_with_an_account_and(|_| {}).await
}

/// [`app_with_an_account`] with settings changed by `change`; with API keys on, the test's
/// client sends the key with every scope.
async fn app_with_an_account_and(change: impl FnOnce(&mut Settings)) -> (TestApp, TestDb, String) {
    let db = TestDb::new(Backend::Sqlite).await;
    let mut settings = settings_for(&db);
    change(&mut settings);
    let mut app = spawn_app(settings.clone()).await;
    if settings.http.api_keys_file.is_some() {
        app.client = shared::testing::keyed_client(shared::testing::ALL_SCOPES_SECRET);
    }
    let writer = EventWriter::new(&settings).await;
    let codec = EventCodec::json("USD");
    let id = ids("contract");
    let opened = Event::AccountOpened {
        owner: "Ida".into(),
        currency: "EUR".into(),
        initial_balance_minor: 15000,
    };
    for (version, event) in [(1, opened), (2, Event::MoneyDeposited { amount_minor: 5 })] {
        let env = EventEnvelope::new(&id, version, &event, Utc::now(), Metadata::new());
        writer.envelope(&codec, &env).await;
    }
    app.wait_version(&id, 2).await;
    app.wait_ready().await;
    (app, db, id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_document_and_error_shape() {
    let (app, _db, id) = app_with_an_account().await;

    let (status, doc) = app.get("/openapi.json").await;
    assert_eq!(status, 200);
    assert!(
        doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.")),
        "not OpenAPI 3: {}",
        doc["openapi"]
    );
    assert!(doc["info"]["title"].is_string() && doc["info"]["version"].is_string());
    for path in ROUTES {
        assert!(
            doc["paths"][path]["get"].is_object(),
            "GET {path} missing from /openapi.json"
        );
    }
    assert_eq!(
        doc["paths"].as_object().unwrap().len(),
        ROUTES.len(),
        "undocumented or stale paths"
    );
    let text = doc.to_string();
    for reference in text.split("\"$ref\":\"#/components/schemas/").skip(1) {
        let name = reference.split('"').next().unwrap();
        assert!(
            doc["components"]["schemas"][name].is_object(),
            "dangling $ref {name}"
        );
    }

    // Bad input of every kind answers the error shape, as JSON.
    let client = &app.client;
    let cases: Vec<(String, reqwest::RequestBuilder, (u16, &str))> = vec![
        (
            "bad % escape in a path".into(),
            client.get(app.url("/accounts/%FF%FE")),
            (400, "InvalidQuery"),
        ),
        (
            "bad % escape in a query".into(),
            client.get(app.url("/accounts?limit=%zz")),
            (400, "InvalidQuery"),
        ),
        (
            "a repeated parameter".into(),
            client.get(app.url(&format!("/accounts/{id}?version=1&version=2"))),
            (400, "InvalidQuery"),
        ),
        (
            "a bad dead-letter limit".into(),
            client.get(app.url("/dead-letters?limit=0")),
            (400, "InvalidQuery"),
        ),
        (
            "a bad schema_version".into(),
            client.get(app.url(&format!("/accounts/{id}/events?schema_version=x"))),
            (400, "InvalidQuery"),
        ),
        (
            "an unknown route".into(),
            client.get(app.url("/nothing/here")),
            (404, "NotFound"),
        ),
        (
            "POST /accounts".into(),
            client.post(app.url("/accounts")).body("{}"),
            (405, "MethodNotAllowed"),
        ),
        (
            "DELETE on an account".into(),
            client.delete(app.url(&format!("/accounts/{id}"))),
            (405, "MethodNotAllowed"),
        ),
    ];
    for (what, request, expected) in cases {
        let r = request.send().await.unwrap();
        let status = r.status().as_u16();
        let content_type = r
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let body: Value = r.json().await.unwrap_or(Value::Null);
        assert_eq!(content_type, "application/json", "{what}: {body}");
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (expected.0, Some(expected.1)),
            "{what}: {body}"
        );
        assert!(
            body["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{what}: {body}"
        );
    }
    app.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_pass_promtool() {
    let db = TestDb::new(Backend::Sqlite).await;
    let settings = settings_for(&db);
    let app = spawn_app(settings.clone()).await;
    let writer = EventWriter::new(&settings).await;
    let id = ids("metrics");
    // A poison message, so that the dead-letter counter and its `code` label show up.
    writer.raw(&id, b"{not json", None).await;
    wait_for(
        "the dead letter to be counted",
        std::time::Duration::from_secs(60),
        || async {
            (app.metric("projection_events_dead_lettered_total").await >= 1.0).then_some(())
        },
    )
    .await;
    let r = app.client.get(app.url("/metrics")).send().await.unwrap();
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain; version=0.0.4")
    );
    let text = r.text().await.unwrap();
    for expected in [
        "# HELP projection_events_dead_lettered_total ",
        "# TYPE projection_events_dead_lettered_total counter",
        "code=\"invalid_json\"",
        "# HELP projection_batch_apply_seconds ",
        "# TYPE projection_batch_apply_seconds histogram",
        "# HELP projection_consumer_lag ",
    ] {
        assert!(
            text.contains(expected),
            "{expected:?} missing from:\n{text}"
        );
    }
    match promtool_check_metrics(&text).await {
        ExternalCheck::Unavailable(why) => skip_without("promtool", &why),
        ExternalCheck::Ran { passed, output } => assert!(
            passed && output.trim().is_empty(),
            "promtool check metrics:\n{output}\n--- exposition:\n{text}"
        ),
    }
    app.stop().await.expect("clean stop");
}

/// With keys on, as a deployment runs: schemathesis sends a key with every scope.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_no_contract_violation() {
    let dir = tempfile::tempdir().unwrap();
    let keys = shared::testing::keys_file_per_scope(dir.path());
    let (app, _db, _id) = app_with_an_account_and(|s| s.http.api_keys_file = Some(keys)).await;
    let secret = Some(shared::testing::ALL_SCOPES_SECRET);
    match api_check(&format!("http://{}", app.addr), secret).await {
        ExternalCheck::Unavailable(why) => skip_without("schemathesis", &why),
        ExternalCheck::Ran { passed, output } => assert!(passed, "{output}"),
    }
    app.stop().await.expect("clean stop");
}
