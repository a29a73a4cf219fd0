//! The HTTP contract around the commands: the OpenAPI document, the error shape of bad input
//! (query strings, bodies, routes, methods), `/metrics` under `promtool check metrics`, and the
//! property-based check of the whole API with schemathesis (`scripts/api-check`).

use serde_json::Value;
use shared::Command;
use shared::testing::{ExternalCheck, api_check, promtool_check_metrics, skip_without};

use crate::helpers::*;

/// Every route the router serves, with its method: the document must list each.
const ROUTES: [(&str, &str); 5] = [
    ("/commands", "post"),
    ("/health", "get"),
    ("/ready", "get"),
    ("/metrics", "get"),
    ("/openapi.json", "get"),
];

async fn get_json(app: &TestApp, path: &str) -> (u16, Value) {
    let r = app
        .http
        .get(format!("{}{path}", app.url))
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

#[track_caller]
fn assert_error_shape(what: &str, status: u16, body: &Value, expected: (u16, &str)) {
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

#[tokio::test]
async fn openapi_document_and_error_shape() {
    let app = TestApp::spawn(1).await;

    let (status, doc) = get_json(&app, "/openapi.json").await;
    assert_eq!(status, 200);
    assert!(
        doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.")),
        "not OpenAPI 3: {}",
        doc["openapi"]
    );
    assert!(doc["info"]["title"].is_string() && doc["info"]["version"].is_string());
    for (path, method) in ROUTES {
        assert!(
            doc["paths"][path][method].is_object(),
            "{method} {path} missing from /openapi.json"
        );
    }
    let documented = doc["paths"].as_object().unwrap().len();
    assert_eq!(documented, ROUTES.len(), "undocumented or stale paths");
    // Every $ref resolves to a schema of the document.
    let text = doc.to_string();
    for reference in text.split("\"$ref\":\"#/components/schemas/").skip(1) {
        let name = reference.split('"').next().unwrap();
        assert!(
            doc["components"]["schemas"][name].is_object(),
            "dangling $ref {name}"
        );
    }

    // Bad input answers the error shape.
    let long = format!(
        "{{\"command_id\":\"{}\",\"aggregate_id\":\"x\",\"type\":\"Deposit\",\"payload\":{{\"amount_minor\":1}},\"metadata\":{{\"pad\":\"{}\"}}}}",
        uuid::Uuid::new_v4(),
        "x".repeat(70 * 1024)
    );
    let cases: Vec<(&str, reqwest::RequestBuilder, (u16, &str))> = vec![
        (
            "bad timeout_ms",
            app.http
                .post(format!("{}/commands?timeout_ms=soon", app.url)),
            (400, "InvalidQuery"),
        ),
        (
            "bad % escape",
            app.http
                .post(format!("{}/commands?timeout_ms=%zz", app.url)),
            (400, "InvalidQuery"),
        ),
        (
            "negative timeout_ms",
            app.http.post(format!("{}/commands?timeout_ms=-1", app.url)),
            (400, "InvalidQuery"),
        ),
        (
            "not JSON",
            app.http
                .post(format!("{}/commands", app.url))
                .header("content-type", "application/json")
                .body("{"),
            (400, "Malformed"),
        ),
        (
            "not sent as JSON",
            app.http.post(format!("{}/commands", app.url)).body("{}"),
            (415, "UnsupportedMediaType"),
        ),
        (
            "too large",
            app.http
                .post(format!("{}/commands", app.url))
                .header("content-type", "application/json")
                .body(long),
            (413, "PayloadTooLarge"),
        ),
        (
            "unknown route",
            app.http.get(format!("{}/no/such/route", app.url)),
            (404, "NotFound"),
        ),
        (
            "GET /commands",
            app.http.get(format!("{}/commands", app.url)),
            (405, "MethodNotAllowed"),
        ),
        (
            "DELETE /health",
            app.http.delete(format!("{}/health", app.url)),
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
        assert_eq!(content_type, "application/json", "{what}");
        assert_error_shape(what, status, &body, expected);
    }
    // A rejection is a result whose `error` has the same shape.
    let (status, body) = app.send(&cmd("nobody", Command::CloseAccount)).await;
    assert_error_shape("rejection", status, &body, (422, "AccountNotFound"));
    app.stop().await;
}

#[tokio::test]
async fn metrics_pass_promtool() {
    let app = TestApp::spawn(1).await;
    let (status, body) = app.send(&open("acc-1", "Ida", 100)).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = app
        .send(&cmd(
            "acc-1",
            Command::Withdraw {
                amount_minor: 1000,
                currency: None,
            },
        ))
        .await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (422, &"InsufficientFunds".into()),
        "{body}"
    );
    // The engine counts a command once its transaction committed, which may be a moment after
    // the result reached the caller: wait for the count.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let text = loop {
        let r = app
            .http
            .get(format!("{}/metrics", app.url))
            .send()
            .await
            .unwrap();
        assert!(
            r.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("text/plain; version=0.0.4")
        );
        let text = r.text().await.unwrap();
        if text.contains("commands_total{outcome=\"insufficient_funds\"}")
            || std::time::Instant::now() > deadline
        {
            break text;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    for expected in [
        "# HELP commands_total ",
        "# TYPE commands_total counter",
        "commands_total{outcome=\"insufficient_funds\"}",
        "# HELP command_processing_seconds ",
        "# TYPE command_processing_seconds histogram",
        "# HELP transactions_total ",
        "# HELP owned_partitions ",
    ] {
        assert!(
            text.contains(expected),
            "{expected:?} missing from:\n{text}"
        );
    }
    assert!(
        !text.contains("outcome=\"InsufficientFunds\""),
        "label values must be snake_case:\n{text}"
    );
    match promtool_check_metrics(&text).await {
        ExternalCheck::Unavailable(why) => skip_without("promtool", &why),
        ExternalCheck::Ran { passed, output } => {
            assert!(
                passed && output.trim().is_empty(),
                "promtool check metrics:\n{output}\n--- exposition:\n{text}"
            );
        }
    }
    app.stop().await;
}

/// With keys on, as a deployment runs: schemathesis sends a key with every scope.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_no_contract_violation() {
    let dir = tempfile::tempdir().unwrap();
    let mut settings = shared::testing::test_settings(1);
    settings.commit_interval = std::time::Duration::from_millis(20);
    settings.http.api_keys_file = Some(shared::testing::keys_file_per_scope(dir.path()));
    let mut app = TestApp::start_with(settings).await;
    app.http = shared::testing::keyed_client(shared::testing::ALL_SCOPES_SECRET);
    app.wait_ready().await;
    // Something to find: an account the generated requests may meet.
    assert_eq!(app.send(&open("acc-1", "Ida", 100)).await.0, 200);
    match api_check(&app.url, Some(shared::testing::ALL_SCOPES_SECRET)).await {
        ExternalCheck::Unavailable(why) => skip_without("schemathesis", &why),
        ExternalCheck::Ran { passed, output } => assert!(passed, "{output}"),
    }
    app.stop().await;
}
