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

/// No secret reaches the log, even with `RUST_LOG=debug` for every crate: not an API key's
/// secret (a right one and a wrong one sent), not a SASL password read from a file (the
/// plaintext broker never asks for it, but it is read and handed to librdkafka all the same).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_reaches_a_debug_level_log() {
    let settings = shared::testing::test_settings(1);
    let dir = tempfile::tempdir().unwrap();
    let keys = keys_file_per_scope(dir.path());
    let sasl_password = "sasl-sentinel-5f2a9c";
    let sasl_file = dir.path().join("sasl-password");
    std::fs::write(&sasl_file, sasl_password).unwrap();
    let wrong_secret = "wrong-sentinel-77e1d0";
    let log_path = dir.path().join("service.log");
    let port = free_port();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_command-service"))
        .env("KAFKA_BOOTSTRAP_SERVERS", &settings.kafka.bootstrap_servers)
        .env("TOPIC_PREFIX", &settings.topic_prefix)
        .env("PARTITIONS", "1")
        .env("INSTANCE_ID", "log-check")
        .env("COMMAND_HTTP_ADDR", format!("127.0.0.1:{port}"))
        .env("HTTP_API_KEYS_FILE", &keys)
        .env("KAFKA_SASL_USERNAME", "bank")
        .env("KAFKA_SASL_PASSWORD_FILE", &sasl_file)
        .env("RUST_LOG", "debug")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(90);
    while !http
        .get(format!("{url}/ready"))
        .send()
        .await
        .is_ok_and(|r| r.status() == 200)
    {
        assert!(std::time::Instant::now() < deadline, "not ready");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let post = |secret: &str| {
        http.post(format!("{url}/commands"))
            .bearer_auth(secret)
            .header("content-type", "application/json")
            .body(open("acc-log", "Ann", 10).to_json().to_string())
            .send()
    };
    assert_eq!(
        post(&secret_of(Scope::CommandsWrite))
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(post(wrong_secret).await.unwrap().status(), 401);
    let metrics = http
        .get(format!("{url}/metrics"))
        .bearer_auth(secret_of(Scope::MetricsRead))
        .send()
        .await
        .unwrap();
    assert_eq!(metrics.status(), 200);
    std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(child.wait().unwrap().success());
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(
        log.contains("command-service listening") && log.contains("DEBUG"),
        "the debug log was written:\n{log}"
    );
    for secret in [
        secret_of(Scope::CommandsWrite),
        secret_of(Scope::MetricsRead),
        wrong_secret.to_owned(),
        sasl_password.to_owned(),
    ] {
        let line = log.lines().find(|l| l.contains(&secret));
        assert!(line.is_none(), "{secret} is in the log: {line:?}");
    }
}
