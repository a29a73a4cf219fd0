//! Faults other than a crash: a producer fenced by another with the same `INSTANCE_ID`, and a
//! past writer whose clock ran ahead.

use std::time::Duration;

use chrono::Utc;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use shared::kafka::{Topics, canonical_partition};
use shared::{Command, Event, EventEnvelope};

use crate::helpers::*;

#[tokio::test]
async fn a_fenced_producer_stops_the_instance_and_never_fences_back() {
    let app = TestApp::spawn(1).await;
    let settings = app.settings.clone();
    let (s, _) = app.send(&open("fenced-1", "Ann", 10)).await;
    assert_eq!(s, 200);

    // Another producer takes this instance's transactional id.
    let intruder: BaseProducer = settings
        .kafka
        .producer_config()
        .set(
            "transactional.id",
            command_service::engine::transactional_id(&settings),
        )
        .create()
        .unwrap();
    intruder.init_transactions(Duration::from_secs(30)).unwrap();

    // The next command makes the engine use its fenced producer.
    let deposit = cmd("fenced-1", Command::Deposit { amount_minor: 1 });
    produce_raw(
        &producer(&settings),
        &settings,
        "fenced-1",
        deposit.to_json().to_string().as_bytes(),
        None,
    )
    .await;
    let error = app
        .finished(Duration::from_secs(60))
        .await
        .expect_err("a fenced instance stops with an error");
    let message = format!("{error:#}");
    assert!(message.contains("INSTANCE_ID"), "{message}");

    // It did not re-create its producer, which would have fenced the intruder in turn.
    intruder.begin_transaction().unwrap();
    let topic = Topics::new(&settings.topic_prefix).command_results();
    intruder
        .send(BaseRecord::to(&topic).key("k").payload("v").partition(0))
        .map_err(|(e, _)| e)
        .unwrap();
    intruder
        .commit_transaction(Duration::from_secs(30))
        .expect("the intruder is still the owner of the transactional id");
}

#[tokio::test]
async fn events_are_never_stamped_before_the_previous_event_of_their_partition() {
    let mut settings = shared::testing::test_settings(1);
    settings.commit_interval = Duration::from_millis(20);
    let app = TestApp::spawn_with(settings.clone()).await;
    let (s, _) = app.send(&open("clock-1", "Cy", 10)).await;
    assert_eq!(s, 200);
    app.stop().await;

    // A past writer whose clock ran an hour ahead appended version 2.
    let ahead = Utc::now() + chrono::Duration::hours(1);
    let envelope = EventEnvelope::new(
        "clock-1",
        2,
        &Event::MoneyDeposited { amount_minor: 5 },
        ahead,
        Default::default(),
    );
    let topic = Topics::new(&settings.topic_prefix).events();
    let partition = canonical_partition(b"clock-1", settings.partitions);
    let bytes = serde_json::to_vec(&envelope).unwrap();
    produce_to(&settings, &topic, "clock-1", &bytes, partition).await;

    let app = TestApp::spawn_with(settings.clone()).await;
    let (s, body) = app
        .send(&cmd("clock-1", Command::Deposit { amount_minor: 1 }))
        .await;
    assert_eq!((s, body["version"].as_u64()), (200, Some(3)), "{body}");
    let events = read_events(&settings).await;
    let stamped = events
        .iter()
        .map(|(_, e)| e)
        .find(|e| e.aggregate_id == "clock-1" && e.version == 3)
        .expect("version 3 is stored")
        .timestamp;
    assert!(
        stamped >= ahead,
        "version 3 at {stamped} is earlier than version 2 at {ahead}"
    );
    app.stop().await;
}
