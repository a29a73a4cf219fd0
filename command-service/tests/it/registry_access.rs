//! A schema registry reached over HTTPS with a private CA and HTTP basic authentication: an
//! authenticating TLS gate (this test's) in front of the real registry. The command-service
//! registers its schemas and writes the Confluent wire format through it with the credentials
//! and the CA read from files; without the CA, or with a wrong password, it stops at start with
//! the reason, and no secret is in its error.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use rdkafka::Message;
use shared::kafka::Topics;

use crate::helpers::*;

/// The gate: answers 401 unless the request carries `authorization`, else forwards it.
struct Gate {
    upstream: String,
    authorization: String,
    http: reqwest::Client,
    allowed: AtomicUsize,
    refused: AtomicUsize,
}

async fn pass(
    State(gate): State<Arc<Gate>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let authorization = headers.get("authorization").and_then(|v| v.to_str().ok());
    if authorization != Some(gate.authorization.as_str()) {
        gate.refused.fetch_add(1, Ordering::SeqCst);
        return (
            StatusCode::UNAUTHORIZED,
            [("www-authenticate", "Basic realm=\"registry\"")],
            r#"{"error_code":401,"message":"Unauthorized"}"#,
        )
            .into_response();
    }
    gate.allowed.fetch_add(1, Ordering::SeqCst);
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let mut request = gate
        .http
        .request(method, format!("{}{path}", gate.upstream))
        .body(body);
    for name in ["content-type", "accept"] {
        if let Some(value) = headers.get(name) {
            request = request.header(name, value);
        }
    }
    match request.send().await {
        Ok(answer) => {
            let status = answer.status();
            let content_type = answer.headers().get("content-type").cloned();
            let mut response = (status, answer.bytes().await.unwrap_or_default()).into_response();
            if let Some(value) = content_type {
                response.headers_mut().insert("content-type", value);
            }
            response
        }
        Err(e) => (StatusCode::BAD_GATEWAY, e.to_string()).into_response(),
    }
}

/// A private CA and a certificate it signed for 127.0.0.1, written as PEM files into `dir`:
/// the CA's certificate file and the server's files.
fn private_ca(dir: &std::path::Path) -> (std::path::PathBuf, shared::serve::TlsFiles) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "bank-es test CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap();
    let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
    let ca_file = dir.join("ca.pem");
    let files = shared::serve::TlsFiles {
        cert: dir.join("registry.pem"),
        key: dir.join("registry-key.pem"),
    };
    std::fs::write(&ca_file, ca.pem()).unwrap();
    std::fs::write(&files.cert, cert.pem()).unwrap();
    std::fs::write(&files.key, key.serialize_pem()).unwrap();
    (ca_file, files)
}

/// Starts the gate in front of the registry at `registry_url`; returns it and the URL through
/// it (same path, HTTPS).
async fn start_gate(
    registry_url: &str,
    tls: shared::serve::TlsFiles,
    user: &str,
    password: &str,
) -> (Arc<Gate>, String) {
    let parsed = reqwest::Url::parse(registry_url).unwrap();
    let upstream = parsed.origin().ascii_serialization();
    let authorization = reqwest::Client::new()
        .get("http://example.invalid/")
        .basic_auth(user, Some(password))
        .build()
        .unwrap()
        .headers()["authorization"]
        .to_str()
        .unwrap()
        .to_owned();
    let gate = Arc::new(Gate {
        upstream,
        authorization,
        http: reqwest::Client::new(),
        allowed: AtomicUsize::new(0),
        refused: AtomicUsize::new(0),
    });
    let router = axum::Router::new().fallback(pass).with_state(gate.clone());
    let http = shared::auth::HttpSettings {
        tls: Some(tls),
        ..shared::testing::test_settings(1).http
    };
    let tls = shared::serve::tls_config(&http).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(shared::serve::serve(
        listener,
        router,
        tls,
        std::future::pending(),
    ));
    (gate, format!("https://127.0.0.1:{port}{}", parsed.path()))
}

/// Settings through the gate, read the way the service reads its environment.
fn settings_through(url: &str, extra: &[(&str, String)]) -> shared::config::Settings {
    let base = shared::testing::test_settings(1);
    let mut vars: Vec<(String, String)> = std::env::vars()
        .filter(|(k, _)| !k.starts_with("SCHEMA_REGISTRY"))
        .collect();
    vars.push((
        "KAFKA_BOOTSTRAP_SERVERS".into(),
        base.kafka.bootstrap_servers,
    ));
    vars.push(("TOPIC_PREFIX".into(), base.topic_prefix));
    vars.push(("PARTITIONS".into(), "1".into()));
    vars.push(("INSTANCE_ID".into(), base.instance_id));
    vars.push(("SCHEMA_REGISTRY_URL".into(), url.to_owned()));
    vars.extend(extra.iter().map(|(k, v)| ((*k).to_owned(), v.clone())));
    shared::config::Settings::from_vars(&vars).expect("settings")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_behind_basic_auth_and_a_private_ca_is_reached_with_secrets_from_files() {
    let Some(registry) = shared::testing::schema_registry_url() else {
        shared::testing::skip_without("a schema registry", "SCHEMA_REGISTRY_URL is unset");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (ca_file, tls) = private_ca(dir.path());
    let password = format!("registry-sentinel-{}", uuid::Uuid::new_v4().simple());
    let (gate, url) = start_gate(&registry, tls, "bank", &password).await;
    let info_file = dir.path().join("registry-user-info");
    std::fs::write(&info_file, format!("bank:{password}\n")).unwrap();
    let wrong_file = dir.path().join("wrong-user-info");
    std::fs::write(&wrong_file, "bank:not-the-password\n").unwrap();
    let ca = ("SCHEMA_REGISTRY_CA_FILE", ca_file.display().to_string());
    let info = |file: &std::path::Path| {
        (
            "SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO_FILE",
            file.display().to_string(),
        )
    };

    // Without the CA the certificate is not trusted; with a wrong password the registry
    // refuses: either way the service stops at start, saying so, and shows no secret.
    for extra in [vec![info(&info_file)], vec![info(&wrong_file), ca.clone()]] {
        let app = TestApp::start_with(settings_through(&url, &extra)).await;
        let error = app
            .stopped(Duration::from_secs(90))
            .await
            .expect_err("the service must not start");
        let text = format!("{error:#}");
        assert!(text.contains("schema registry"), "{text}");
        assert!(!text.contains(&password), "{text}");
    }
    assert!(
        gate.refused.load(Ordering::SeqCst) > 0,
        "the wrong password reached the gate"
    );
    assert_eq!(gate.allowed.load(Ordering::SeqCst), 0);

    // With both, the schemas are registered through the gate and the events are written in
    // the registry's wire format.
    let settings = settings_through(&url, &[info(&info_file), ca]);
    let app = TestApp::spawn_with(settings.clone()).await;
    let (status, body) = app.send(&open("reg-1", "Ann", 500)).await;
    assert_eq!(status, 200, "{body}");
    app.stop().await;
    assert!(gate.allowed.load(Ordering::SeqCst) > 0);
    let events = read_topic(&settings, &Topics::new(&settings.topic_prefix).events());
    assert_eq!(events.len(), 1);
    let payload = events[0].payload().expect("a payload");
    assert_eq!(payload[0], 0, "Confluent wire format: magic byte 0");
    let codec = shared::codec::EventCodec::from_settings(&settings).unwrap();
    let event = codec
        .decode(payload)
        .await
        .expect("decodes through the gate");
    assert_eq!(event.aggregate_id, "reg-1");
}
