use chrono::{TimeZone, Utc};
use serde_json::json;
use shared::codec::DecodeError;
use shared::envelope::{CommandMessage, Metadata};
use shared::{Command, Event, EventCodec, EventEnvelope, RejectionCode};

fn envelope() -> EventEnvelope {
    let mut metadata = Metadata::new();
    metadata.insert(
        "causation_id".into(),
        json!("0b6f1c6e-8a43-4a8e-9a39-3c1f0f0c9d11"),
    );
    EventEnvelope::new(
        "acc-1",
        4,
        &Event::MoneyDeposited { amount_minor: 5000 },
        Utc.with_ymd_and_hms(2026, 11, 26, 12, 0, 0).unwrap(),
        metadata,
    )
}

#[tokio::test]
async fn json_round_trip() {
    let codec = EventCodec::json("USD");
    let env = envelope();
    let bytes = codec.encode("t", &env).await.unwrap();
    assert_eq!(bytes[0], b'{');
    assert_eq!(codec.decode(&bytes).await.unwrap(), env);
}

#[tokio::test]
async fn wire_format_is_read_without_a_registry() {
    let codec = EventCodec::json("USD");
    let env = envelope();
    let mut bytes = vec![0, 0, 0, 0, 42];
    bytes.extend(serde_json::to_vec(&env).unwrap());
    assert_eq!(codec.decode(&bytes).await.unwrap(), env);
}

#[tokio::test]
async fn refuses_unreadable_bytes_precisely() {
    let codec = EventCodec::json("USD");
    let cases: Vec<(&[u8], &str)> = vec![
        (b"", "Empty"),
        (b"\x00\x00\x01", "Truncated"),
        (b"garbage", "UnknownFormat"),
        (b"{not json", "InvalidJson"),
        (b"{\"event_id\": 1}", "UpcastFailed"),
        (br#"{"event_id":"0b6f1c6e-8a43-4a8e-9a39-3c1f0f0c9d11","aggregate_id":"a","aggregate_type":"BankAccount","event_type":"Frobnicated","schema_version":2,"version":1,"timestamp":"2026-01-01T00:00:00Z","data":{}}"#, "UnknownEventType"),
        (br#"{"event_id":"0b6f1c6e-8a43-4a8e-9a39-3c1f0f0c9d11","aggregate_id":"a","aggregate_type":"BankAccount","event_type":"MoneyDeposited","schema_version":2,"version":1,"timestamp":"2026-01-01T00:00:00Z","data":{"amount_minor":"ten"}}"#, "InvalidEventData"),
        (br#"{"event_id":"0b6f1c6e-8a43-4a8e-9a39-3c1f0f0c9d11","aggregate_id":"a","aggregate_type":"BankAccount","event_type":"MoneyDeposited","schema_version":2,"version":2,"timestamp":"2026-01-01T00:00:00Z","data":{"amount_minor":-500}}"#, "InvalidEventData"),
        (br#"{"event_id":"0b6f1c6e-8a43-4a8e-9a39-3c1f0f0c9d11","aggregate_id":"a","aggregate_type":"BankAccount","event_type":"MoneyWithdrawn","schema_version":2,"version":2,"timestamp":"2026-01-01T00:00:00Z","data":{"amount_minor":0}}"#, "InvalidEventData"),
        (br#"{"event_id":"0b6f1c6e-8a43-4a8e-9a39-3c1f0f0c9d11","aggregate_id":"a","aggregate_type":"BankAccount","event_type":"AccountOpened","schema_version":2,"version":1,"timestamp":"2026-01-01T00:00:00Z","data":{"owner":"o","currency":"EUR","initial_balance_minor":-1}}"#, "InvalidEventData"),
        (br#"{"event_id":"nope","aggregate_id":"a","aggregate_type":"BankAccount","event_type":"AccountClosed","schema_version":2,"version":1,"timestamp":"2026-01-01T00:00:00Z","data":{}}"#, "InvalidEnvelope"),
        (br#"{"event_id":"0b6f1c6e-8a43-4a8e-9a39-3c1f0f0c9d11","aggregate_id":"a","aggregate_type":"BankAccount","event_type":"AccountClosed","schema_version":2,"version":0,"timestamp":"2026-01-01T00:00:00Z","data":{}}"#, "InvalidEnvelope"),
    ];
    for (bytes, code) in cases {
        let err: DecodeError = codec.decode(bytes).await.unwrap_err();
        assert_eq!(
            err.code(),
            code,
            "{:?}: {err}",
            String::from_utf8_lossy(bytes)
        );
        assert!(!err.is_retriable());
    }
}

#[test]
fn headers_repeat_the_routing_fields() {
    use rdkafka::message::Headers;
    let env = envelope();
    let headers = shared::codec::event_headers(&env);
    let get = |name| shared::codec::header_str(Some(&headers), name).map(str::to_owned);
    assert_eq!(get("event_type").as_deref(), Some("MoneyDeposited"));
    assert_eq!(get("schema_version").as_deref(), Some("2"));
    assert_eq!(get("aggregate_version").as_deref(), Some("4"));
    assert_eq!(get("event_id"), Some(env.event_id.to_string()));
    assert_eq!(
        get("command_id").as_deref(),
        Some("0b6f1c6e-8a43-4a8e-9a39-3c1f0f0c9d11")
    );
    assert_eq!(headers.count(), 5);
}

#[test]
fn commands_round_trip_and_malformed_ones_keep_their_id() {
    let mut cmd = CommandMessage::new(
        "acc-9",
        Command::Withdraw {
            amount_minor: 250,
            currency: None,
        },
    );
    cmd.expected_version = Some(3);
    assert_eq!(CommandMessage::from_bytes(&cmd.to_bytes()).unwrap(), cmd);

    let bad = json!({"command_id": cmd.command_id, "aggregate_id": "acc-9", "type": "Teleport", "payload": {}});
    let err = CommandMessage::from_bytes(bad.to_string().as_bytes()).unwrap_err();
    assert_eq!(err.command_id, Some(cmd.command_id));
    assert!(err.reason.contains("Teleport"), "{}", err.reason);

    let err = CommandMessage::from_bytes(b"\xff\xfe").unwrap_err();
    assert_eq!(err.command_id, None);

    // ids the read model cannot index are refused with the command id kept
    let long_id = json!({"command_id": cmd.command_id, "aggregate_id": "a".repeat(201), "type": "CloseAccount"});
    let err = CommandMessage::from_bytes(long_id.to_string().as_bytes()).unwrap_err();
    assert_eq!(err.command_id, Some(cmd.command_id));
    assert!(err.reason.contains("aggregate_id"), "{}", err.reason);

    // floats are not money
    let float = json!({"command_id": cmd.command_id, "aggregate_id": "a", "type": "Deposit", "payload": {"amount_minor": 10.5}});
    assert!(CommandMessage::from_bytes(float.to_string().as_bytes()).is_err());
    let _ = RejectionCode::Malformed;
}

#[test]
fn schemas_exist_for_every_current_event_type() {
    // The bank's: eight account event types, three transfer event types.
    let schemas = shared::bank_account::current_schemas();
    assert_eq!(schemas.len(), 11);
    for (name, schema) in &schemas {
        let aggregate_type = if name.starts_with("Transfer.Transfer") {
            "Transfer"
        } else {
            "BankAccount"
        };
        assert!(
            name.starts_with(&format!("{aggregate_type}.")) && name.ends_with(".v2"),
            "{name}"
        );
        assert_eq!(schema["properties"]["schema_version"]["const"], 2);
        assert_eq!(
            schema["properties"]["aggregate_type"]["const"], aggregate_type,
            "{name}"
        );
    }
    let transfers = schemas
        .iter()
        .filter(|(n, _)| n.starts_with("Transfer."))
        .count();
    assert_eq!(transfers, 3);
}

// Regression (issue 9, defect 5): these v1 amounts aborted the process (a trillion-zero string)
// or were upcast into negative money; each is now poison with the stable code `UpcastFailed`,
// which the projection dead-letters.
#[tokio::test]
async fn v1_amounts_out_of_range_or_negative_are_upcast_failures() {
    let codec = EventCodec::json("USD");
    let huge_mantissa = "1".repeat(10_000);
    for amount in [
        "1e999999999999",
        "1e-999999999999",
        huge_mantissa.as_str(),
        "92233720368547758.08",
        "-5.00",
    ] {
        let bytes = format!(
            r#"{{"id":"0b6f1c6e-8a43-4a8e-9a39-3c1f0f0c9d11","aggregate_id":"a","aggregate_type":"BankAccount","event_type":"MoneyDeposited","version":2,"timestamp":"2025-03-01T00:01:00","data":{{"amount":{amount}}}}}"#
        );
        let err = codec.decode(bytes.as_bytes()).await.unwrap_err();
        assert_eq!(
            err.code(),
            "UpcastFailed",
            "{}: {err}",
            &amount[..amount.len().min(20)]
        );
        assert!(!err.is_retriable());
    }
}
