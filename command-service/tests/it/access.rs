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

/// A self-signed certificate for 127.0.0.1 and localhost, written as PEM files into `dir`.
fn self_signed(dir: &std::path::Path) -> (shared::serve::TlsFiles, reqwest::Certificate) {
    let names = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
    let rcgen::CertifiedKey { cert, key_pair } = rcgen::generate_simple_self_signed(names).unwrap();
    let files = shared::serve::TlsFiles {
        cert: dir.join("cert.pem"),
        key: dir.join("key.pem"),
    };
    std::fs::write(&files.cert, cert.pem()).unwrap();
    std::fs::write(&files.key, key_pair.serialize_pem()).unwrap();
    (
        files,
        reqwest::Certificate::from_pem(cert.pem().as_bytes()).unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_certificate_the_api_speaks_https_only() {
    let dir = tempfile::tempdir().unwrap();
    let (files, ca) = self_signed(dir.path());
    let mut settings = shared::testing::test_settings(1);
    settings.http.tls = Some(files);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let service = tokio::spawn(command_service::run(settings, listener, async {
        let _ = stopped.await;
    }));
    let trusting = reqwest::Client::builder()
        .add_root_certificate(ca)
        .build()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let health = loop {
        match trusting
            .get(format!("https://127.0.0.1:{port}/health"))
            .send()
            .await
        {
            Ok(r) => break r,
            Err(e) => {
                assert!(std::time::Instant::now() < deadline, "no HTTPS answer: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    };
    assert_eq!(health.status().as_u16(), 200);
    // Plain HTTP on the same port gets no answer, and a client that does not trust the
    // certificate refuses it.
    let plain = reqwest::get(format!("http://127.0.0.1:{port}/health")).await;
    assert!(plain.is_err() || !plain.unwrap().status().is_success());
    let untrusting = reqwest::get(format!("https://127.0.0.1:{port}/health")).await;
    assert!(
        untrusting.is_err(),
        "a self-signed certificate is not trusted by default"
    );
    stop.send(()).unwrap();
    service.await.unwrap().unwrap();
}
