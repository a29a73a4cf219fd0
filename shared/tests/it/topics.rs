//! Existing topics are checked against the contract at start (issue 9, defect 11): partition
//! counts, compaction, the events topic's infinite retention and the results topic's retention
//! floor, on the real broker.

use std::time::Duration;

use shared::kafka::{RetentionFloor, TopicError, TopicSpec, Topics, ensure_topics, verify_topics};
use shared::testing::test_settings;

fn spec(name: String, partitions: i32, config: &[(&'static str, &str)]) -> TopicSpec {
    TopicSpec {
        name,
        partitions,
        config: config.iter().map(|(k, v)| (*k, (*v).to_owned())).collect(),
    }
}

/// The topics as the services create them.
fn contract_specs(topics: &Topics, partitions: i32) -> Vec<TopicSpec> {
    let compact = [("cleanup.policy", "compact"), ("segment.ms", "3600000")];
    vec![
        spec(topics.commands(), partitions, &[]),
        spec(topics.events(), partitions, &[("retention.ms", "-1")]),
        spec(topics.snapshots(), partitions, &compact),
        spec(topics.command_checkpoints(), partitions, &compact),
        spec(
            topics.command_results(),
            partitions,
            &[("retention.ms", "604800000")],
        ),
        spec(topics.events_dlq(), partitions, &[]),
    ]
}

const TIMEOUT: Duration = Duration::from_secs(30);

#[tokio::test]
async fn topics_created_as_the_services_do_pass() {
    let settings = test_settings(2);
    let topics = Topics::new(&settings.topic_prefix);
    let counts = ensure_topics(&settings.kafka, &contract_specs(&topics, 2), TIMEOUT)
        .await
        .expect("topics created");
    verify_topics(&settings.kafka, &settings.topic_prefix, &counts, &[])
        .await
        .expect("topics as the contract says are accepted");
}

#[tokio::test]
async fn existing_topics_with_wrong_settings_are_refused_with_the_fix() {
    let settings = test_settings(2);
    let topics = Topics::new(&settings.topic_prefix);
    // Somebody created these by hand: events with a week's retention and 3 partitions,
    // snapshots not compacted.
    ensure_topics(
        &settings.kafka,
        &[
            spec(topics.events(), 3, &[("retention.ms", "604800000")]),
            spec(topics.snapshots(), 2, &[("cleanup.policy", "delete")]),
        ],
        TIMEOUT,
    )
    .await
    .expect("wrong topics created");

    let counts = ensure_topics(&settings.kafka, &contract_specs(&topics, 2), TIMEOUT)
        .await
        .expect("the others created, the existing ones left alone");
    let err = verify_topics(&settings.kafka, &settings.topic_prefix, &counts, &[])
        .await
        .expect_err("wrong topics are refused");
    let TopicError::Misconfigured { mismatches, .. } = &err else {
        panic!("not a refusal: {err}");
    };
    let named: Vec<(&str, &str, &str, &str)> = mismatches
        .iter()
        .map(|m| {
            (
                m.topic.as_str(),
                m.setting.as_str(),
                m.found.as_str(),
                m.required.as_str(),
            )
        })
        .collect();
    let (events, snapshots) = (topics.events(), topics.snapshots());
    assert_eq!(
        named,
        vec![
            (events.as_str(), "partitions", "3", "2"),
            (events.as_str(), "retention.ms", "604800000", "-1"),
            (snapshots.as_str(), "cleanup.policy", "delete", "compact"),
        ]
    );
    let message = err.to_string();
    let bootstrap = &settings.kafka.bootstrap_servers;
    assert!(
        message.contains(&format!(
            "topic {events}: retention.ms is 604800000, required -1; fix: `kafka-configs.sh \
             --bootstrap-server {bootstrap} --alter --entity-type topics --entity-name {events} \
             --add-config retention.ms=-1`"
        )),
        "{message}"
    );
    assert!(
        message.contains(&format!(
            "topic {snapshots}: cleanup.policy is delete, required compact"
        )),
        "{message}"
    );
}

#[tokio::test]
async fn a_finite_retention_bytes_on_the_events_topic_is_refused() {
    let settings = test_settings(1);
    let topics = Topics::new(&settings.topic_prefix);
    let counts = ensure_topics(
        &settings.kafka,
        &[spec(
            topics.events(),
            1,
            &[("retention.ms", "-1"), ("retention.bytes", "1073741824")],
        )],
        TIMEOUT,
    )
    .await
    .expect("topic created");
    let message = verify_topics(&settings.kafka, &settings.topic_prefix, &counts, &[])
        .await
        .expect_err("finite retention.bytes is refused")
        .to_string();
    assert!(
        message.contains(&format!(
            "topic {}: retention.bytes is 1073741824, required -1",
            topics.events()
        )),
        "{message}"
    );
}

#[tokio::test]
async fn a_results_topic_that_forgets_within_the_dedupe_window_is_refused() {
    let settings = test_settings(1);
    let topics = Topics::new(&settings.topic_prefix);
    let counts = ensure_topics(
        &settings.kafka,
        &[spec(
            topics.command_results(),
            1,
            &[("retention.ms", "3600000")],
        )],
        TIMEOUT,
    )
    .await
    .expect("topic created");
    let floor = |days: u64| RetentionFloor {
        topic: topics.command_results(),
        at_least: Duration::from_secs(days * 24 * 3600),
    };
    let message = verify_topics(
        &settings.kafka,
        &settings.topic_prefix,
        &counts,
        &[floor(7)],
    )
    .await
    .expect_err("an hour's retention for a week's window is refused")
    .to_string();
    assert!(
        message.contains(&format!(
            "topic {}: retention.ms is 3600000, required at least 604800000",
            topics.command_results()
        )),
        "{message}"
    );
    let ok = RetentionFloor {
        at_least: Duration::from_secs(1800),
        ..floor(0)
    };
    verify_topics(&settings.kafka, &settings.topic_prefix, &counts, &[ok])
        .await
        .expect("an hour's retention is enough for a half-hour window");
}
