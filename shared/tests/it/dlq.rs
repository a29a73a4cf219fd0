//! Reading the dead-letter topic back a page at a time, against the real broker.

use std::collections::HashSet;
use std::time::Duration;

use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use shared::dlq::{DeadLetterReader, PageCursor, header};
use shared::kafka::{TopicSpec, ensure_topics};
use shared::testing::{test_settings, unique_name};

#[tokio::test]
async fn pages_of_dead_letters_show_every_letter_once_newest_first() {
    let settings = test_settings(3);
    let topic = unique_name("dlq-pages");
    ensure_topics(
        &settings.kafka,
        &[TopicSpec {
            name: topic.clone(),
            // One partition stays empty: nothing to wait for there.
            partitions: 4,
            config: vec![],
        }],
        Duration::from_secs(30),
    )
    .await
    .unwrap();
    let producer: FutureProducer = settings.kafka.client_config().create().unwrap();
    // 23 letters over 3 of the 4 partitions; failure times interleave across the partitions.
    for i in 0..23u32 {
        let failed_at = format!("2026-01-01T00:00:{:02}Z", 59 - i % 60);
        let failed_at = if i % 3 == 0 {
            format!("2026-01-02T00:00:{:02}Z", i)
        } else {
            failed_at
        };
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: header::ERROR_CODE,
                value: Some("InvalidJson"),
            })
            .insert(Header {
                key: header::FAILED_AT,
                value: Some(failed_at.as_str()),
            });
        producer
            .send(
                FutureRecord::to(&topic)
                    .partition((i % 3) as i32)
                    .key(&format!("k{i}"))
                    .payload("x")
                    .headers(headers),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(e, _)| e)
            .unwrap();
    }
    let reader = DeadLetterReader::new(settings.kafka.clone(), topic);
    let mut seen = HashSet::new();
    let mut cursor: Option<PageCursor> = None;
    let mut pages = 0;
    loop {
        let reader = reader.clone();
        let before = cursor.clone();
        let page = tokio::task::spawn_blocking(move || reader.page(5, before.as_ref()))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(page.total, 23);
        assert!(page.letters.len() <= 5);
        pages += 1;
        for pair in page.letters.windows(2) {
            // Within a partition, newer offsets first.
            if pair[0].partition == pair[1].partition {
                assert!(pair[0].offset > pair[1].offset, "{pair:?}");
            }
        }
        for letter in &page.letters {
            assert!(seen.insert(letter.id()), "{} shown twice", letter.id());
        }
        // The cursor survives its text form.
        cursor = page
            .next
            .map(|c| PageCursor::parse(&c.to_string()).unwrap());
        if cursor.is_none() {
            break;
        }
        assert!(pages < 10, "paging ends");
    }
    assert_eq!(seen.len(), 23, "every letter once");
    assert_eq!(pages, 5);

    // The first page holds the newest: every letter of 2026-01-02 sorts before the others.
    let first = reader.clone();
    let page = tokio::task::spawn_blocking(move || first.page(8, None))
        .await
        .unwrap()
        .unwrap();
    let newest: Vec<&str> = page
        .letters
        .iter()
        .map(|l| l.failed_at.as_deref().unwrap())
        .collect();
    assert!(
        newest.iter().all(|t| t.starts_with("2026-01-02")),
        "{newest:?}"
    );
}

#[test]
fn cursors_are_checked() {
    assert_eq!(PageCursor::parse("0:5,2:7").unwrap().to_string(), "0:5,2:7");
    for bad in ["0", "x:1", "0:x", "0:1,0:2", "-1:3"] {
        assert!(PageCursor::parse(bad).is_err(), "{bad}");
    }
}
