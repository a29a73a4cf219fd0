//! Interoperability: the events command-service writes through the schema registry are read by
//! a client nobody here wrote — Confluent's Python `SchemaRegistryClient` + `JSONDeserializer`
//! (scripts/interop/read-events) — as the very envelopes our codec reads. And the registry got
//! the schemas with their compatibility rule before the first event.
//!
//! Needs `SCHEMA_REGISTRY_URL` and Python 3 with venv + PyPI access (or the cached venv): skipped
//! with a note without them, a failure under `CI=true`.

use std::path::Path;
use std::process::Command as Process;
use std::time::Duration;

use rdkafka::Message;
use serde_json::Value;
use shared::bank_account::subject;
use shared::kafka::Topics;
use shared::registry::{COMPATIBILITY, SchemaRegistry};
use shared::{Command, EventCodec};

use crate::helpers::*;

fn under_ci() -> bool {
    std::env::var("CI").as_deref() == Ok("true")
}

#[tokio::test]
async fn confluents_own_json_schema_deserializer_reads_the_same_envelopes() {
    let Some(url) = shared::testing::schema_registry_url() else {
        assert!(!under_ci(), "SCHEMA_REGISTRY_URL is not set under CI=true");
        eprintln!("SKIPPED: SCHEMA_REGISTRY_URL is not set (scripts/test starts a registry)");
        return;
    };
    let mut settings = shared::testing::test_settings(2);
    settings.schema_registry_url = Some(url.clone());
    settings.commit_interval = Duration::from_millis(20);
    let events = Topics::new(&settings.topic_prefix).events();
    let app = TestApp::spawn_with(settings.clone()).await;
    for command in [
        open("ix-1", "Ida", 100),
        cmd(
            "ix-1",
            Command::Deposit {
                amount_minor: 25,
                currency: None,
            },
        ),
        open("ix-2", "Ivo", 0),
        cmd(
            "ix-1",
            Command::Withdraw {
                amount_minor: 5,
                currency: None,
            },
        ),
        cmd("ix-2", Command::CloseAccount),
    ] {
        let (status, body) = app.send(&command).await;
        assert_eq!(status, 200, "{body}");
    }
    app.stop().await;

    // The rule was set on every subject at start.
    let registry = SchemaRegistry::new(&url).unwrap();
    for event_type in shared::Event::TYPES {
        let subject = subject(&events, event_type, 2);
        assert_eq!(
            registry.compatibility(&subject).await.unwrap().as_deref(),
            Some(COMPATIBILITY),
            "{subject}"
        );
    }

    // What our codec reads.
    let codec = EventCodec::with_registry("USD", &url).unwrap();
    let mut ours = Vec::new();
    for m in read_topic(&settings, &events) {
        let bytes = m.payload().expect("a value");
        assert_eq!(bytes[0], 0, "Confluent magic byte");
        let envelope = codec.decode(bytes).await.expect("our codec reads it");
        let key = m.key().map(|k| String::from_utf8_lossy(k).into_owned());
        ours.push((
            m.partition(),
            m.offset(),
            key,
            serde_json::to_value(&envelope).unwrap(),
        ));
    }
    assert_eq!(ours.len(), 5);

    // What Confluent's deserializer reads.
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/interop/read-events");
    let output = Process::new(&script)
        .args([
            "--bootstrap",
            &settings.kafka.bootstrap_servers,
            "--topic",
            &events,
            "--registry",
            &url,
            "--count",
            &ours.len().to_string(),
        ])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    let stderr = String::from_utf8_lossy(&output.stderr);
    if output.status.code() == Some(77) {
        assert!(
            !under_ci(),
            "the interop client is unavailable under CI=true: {stderr}"
        );
        eprintln!("SKIPPED: Confluent's Python client is unavailable here: {stderr}");
        return;
    }
    assert!(output.status.success(), "read-events failed: {stderr}");
    let mut theirs: Vec<(i32, i64, Option<String>, Value)> =
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .map(|line| {
                let v: Value = serde_json::from_str(line).expect("one JSON object per line");
                (
                    v["partition"].as_i64().unwrap() as i32,
                    v["offset"].as_i64().unwrap(),
                    v["key"].as_str().map(str::to_owned),
                    v["envelope"].clone(),
                )
            })
            .collect();
    theirs.sort_by_key(|(p, o, _, _)| (*p, *o));
    ours.sort_by_key(|(p, o, _, _)| (*p, *o));
    assert_eq!(theirs.len(), ours.len(), "{theirs:?}");
    for (a, b) in theirs.iter().zip(&ours) {
        assert_eq!(a, b, "Confluent's deserializer read another envelope");
    }
}
