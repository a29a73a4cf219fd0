//! Events written to and read back from the real broker, as plain JSON and (when a registry is
//! running) in the Confluent wire format.

use std::time::Duration;

use chrono::Utc;
use rdkafka::Message;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use shared::codec::{event_headers, header_str};
use shared::envelope::Metadata;
use shared::kafka::{TopicSpec, Topics, canonical_partition, ensure_topics};
use shared::testing::{schema_registry_url, test_settings, unique_name};
use shared::{Event, EventCodec, EventEnvelope, Settings};

async fn round_trip(settings: &Settings, codec: &EventCodec) -> Vec<u8> {
    let topic = Topics::new(&settings.topic_prefix).events();
    let counts = ensure_topics(
        &settings.kafka,
        &[TopicSpec {
            name: topic.clone(),
            partitions: 3,
            config: vec![("retention.ms", "-1".into())],
        }],
        Duration::from_secs(30),
    )
    .await
    .expect("topic created");
    assert_eq!(counts, vec![(topic.clone(), 3)]);

    let producer: FutureProducer = settings.kafka.client_config().create().unwrap();
    let events = [
        Event::AccountOpened {
            owner: "Zoë 王".into(),
            currency: "EUR".into(),
            initial_balance_minor: 100,
        },
        Event::MoneyDeposited { amount_minor: 250 },
        Event::MoneyWithdrawn { amount_minor: 50 },
        Event::AccountClosed,
    ];
    let mut sent = Vec::new();
    let mut first_bytes = Vec::new();
    for (i, e) in events.iter().enumerate() {
        let env = EventEnvelope::new("acc-rt", i as u64 + 1, e, Utc::now(), Metadata::new());
        let bytes = codec.encode(&topic, &env).await.expect("encoded");
        if first_bytes.is_empty() {
            first_bytes = bytes.clone();
        }
        let partition = canonical_partition(b"acc-rt", 3);
        producer
            .send(
                FutureRecord::to(&topic)
                    .key("acc-rt")
                    .payload(&bytes)
                    .partition(partition)
                    .headers(event_headers(&env)),
                Duration::from_secs(10),
            )
            .await
            .expect("delivered");
        sent.push(env);
    }

    let consumer: StreamConsumer = settings
        .kafka
        .client_config()
        .set("group.id", unique_name("shared-it"))
        .set("auto.offset.reset", "earliest")
        .set("isolation.level", "read_committed")
        .create()
        .unwrap();
    consumer.subscribe(&[&topic]).unwrap();
    let mut received = Vec::new();
    while received.len() < sent.len() {
        let msg = tokio::time::timeout(Duration::from_secs(30), consumer.recv())
            .await
            .expect("message within 30 s")
            .unwrap();
        assert_eq!(msg.key(), Some(&b"acc-rt"[..]));
        let env = codec.decode(msg.payload().unwrap()).await.expect("decodes");
        assert_eq!(
            header_str(msg.headers(), "event_type"),
            Some(env.event_type.as_str())
        );
        assert_eq!(
            header_str(msg.headers(), "aggregate_version"),
            Some(env.version.to_string().as_str())
        );
        received.push(env);
    }
    assert_eq!(received, sent);
    first_bytes
}

#[tokio::test]
async fn events_round_trip_through_the_broker_as_json() {
    let settings = test_settings(3);
    let bytes = round_trip(&settings, &EventCodec::json("USD")).await;
    assert_eq!(bytes[0], b'{');
}

#[tokio::test]
async fn events_round_trip_through_the_broker_and_the_schema_registry() {
    let Some(url) = schema_registry_url() else {
        eprintln!(
            "SCHEMA_REGISTRY_URL is not set: the registry path is not exercised (scripts/test starts one)"
        );
        return;
    };
    let settings = test_settings(3);
    let codec = EventCodec::with_registry("USD", &url).unwrap();
    let bytes = round_trip(&settings, &codec).await;
    assert_eq!(bytes[0], 0, "Confluent magic byte");
    // A plain-JSON reader without a registry still reads the wire format.
    let plain = EventCodec::json("USD");
    assert!(plain.decode(&bytes).await.is_ok());
}

#[tokio::test]
async fn a_transaction_left_open_is_reported_as_hanging_after_the_bound() {
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    use shared::kafka::{SettleError, TransactionWatch};
    use std::sync::atomic::AtomicBool;

    let settings = test_settings(1);
    let topic = unique_name("hanging");
    ensure_topics(
        &settings.kafka,
        &[TopicSpec {
            name: topic.clone(),
            partitions: 1,
            config: vec![],
        }],
        Duration::from_secs(30),
    )
    .await
    .expect("topic created");
    let watch = TransactionWatch::new(&settings.kafka, &unique_name("watch")).unwrap();
    let stop = AtomicBool::new(false);
    let bound = Duration::from_secs(3);
    assert!(
        watch.settle(&topic, &[0], &stop, bound).unwrap(),
        "nothing open: settled at once"
    );

    // A writer that keeps its transaction open (for longer than the bound, shorter than its
    // own time-out).
    let writer: BaseProducer = settings
        .kafka
        .producer_config()
        .set("transactional.id", unique_name("hanging-writer"))
        .set("transaction.timeout.ms", "60000")
        .create()
        .unwrap();
    writer.init_transactions(Duration::from_secs(30)).unwrap();
    writer.begin_transaction().unwrap();
    writer
        .send(
            BaseRecord::<[u8], [u8]>::to(&topic)
                .partition(0)
                .payload(b"open".as_slice()),
        )
        .map_err(|(e, _)| e)
        .unwrap();
    writer.flush(Duration::from_secs(10)).unwrap();

    let waited = std::time::Instant::now();
    let error = watch
        .settle(&topic, &[0], &stop, bound)
        .expect_err("an open transaction past the bound is an error");
    assert!(waited.elapsed() >= bound);
    assert!(matches!(&error, SettleError::Hanging { open, .. } if open[0].0 == 0));
    let message = error.to_string();
    assert!(
        message.contains("find-hanging") && message.contains(&topic),
        "{message}"
    );
    writer.abort_transaction(Duration::from_secs(10)).unwrap();
    assert!(watch.settle(&topic, &[0], &stop, bound).unwrap());
}
