//! Who may call the command-service: with `HTTP_API_KEYS_FILE` every route but `/health`,
//! `/ready` and `/openapi.json` needs a key with its scope; commands record the key id as
//! `metadata.principal` (whatever the client wrote there); a body not sent as JSON and a
//! request for a foreign `Host` are refused with or without keys.

use serde_json::json;
use shared::auth::Scope;
use shared::testing::{assert_every_route_guarded, keys_file_per_scope, secret_of};

use crate::helpers::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_needs_its_scope_and_commands_record_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let mut settings = shared::testing::test_settings(1);
    settings.http.api_keys_file = Some(keys_file_per_scope(dir.path()));
    let app = TestApp::spawn_with(settings.clone()).await;
    assert_every_route_guarded(
        &app.url,
        &[
            ("/commands", Some(Scope::CommandsWrite)),
            ("/metrics", Some(Scope::MetricsRead)),
            ("/health", None),
            ("/ready", None),
            ("/openapi.json", None),
        ],
    )
    .await;

    // The key id is the principal, whatever the client wrote under that name.
    let mut command = open("acc-p", "Ann", 10).to_json();
    command["metadata"] = json!({"principal": "forged", "user": "ann"});
    let answer = app
        .http
        .post(format!("{}/commands", app.url))
        .bearer_auth(secret_of(Scope::CommandsWrite))
        .header("content-type", "application/json; charset=utf-8")
        .body(command.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(
        answer.status().as_u16(),
        200,
        "{}",
        answer.text().await.unwrap()
    );
    let events = read_events(&settings).await;
    let metadata = &events.first().expect("the event").1.metadata;
    assert_eq!(
        (metadata["principal"].as_str(), metadata["user"].as_str()),
        (Some("commands-write-key"), Some("ann"))
    );

    // Browser safety: a form or text/plain body (no preflight) and a foreign Host.
    for content_type in ["text/plain", "application/x-www-form-urlencoded", ""] {
        let mut request = app
            .http
            .post(format!("{}/commands", app.url))
            .bearer_auth(secret_of(Scope::CommandsWrite))
            .body(open("acc-q", "Ann", 1).to_json().to_string());
        if !content_type.is_empty() {
            request = request.header("content-type", content_type);
        }
        let refused = request.send().await.unwrap();
        assert_eq!(refused.status().as_u16(), 415, "{content_type}");
        let body: serde_json::Value = refused.json().await.unwrap();
        assert_eq!(body["error"]["code"], "UnsupportedMediaType");
    }
    let rebound = app
        .http
        .get(format!("{}/health", app.url))
        .header("host", "attacker.example")
        .send()
        .await
        .unwrap();
    assert_eq!(rebound.status().as_u16(), 421);
    let body: serde_json::Value = rebound.json().await.unwrap();
    assert_eq!(body["error"]["code"], "ForeignHost");
    app.stop().await;
}
