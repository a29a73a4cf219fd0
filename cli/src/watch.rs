//! `bank watch [ACCOUNT]`: the events of `<prefix>.events` as they commit, from the end of every
//! partition (read_committed, so aborted transactions never show), decoded with the services'
//! [`EventCodec`] (plain JSON or the schema registry's wire format).
//!
//! One line per event for people (`TIME  ACCOUNT  vN  TYPE  DATA  (partition:offset)`), one JSON
//! envelope per line with `--json`. A line `watching …` on stderr says when it is listening.

use chrono::SecondsFormat;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use shared::dlq::watermarks;
use shared::kafka::Topics;
use shared::{EventCodec, EventEnvelope, Settings};

use crate::dlq::unavailable;
use crate::error::CliError;

/// Client group id of the watcher, under `<prefix>.client.` like every group the CLI uses, so
/// that one grant covers them (assigned partitions only; nothing is committed).
fn group_id(settings: &Settings) -> String {
    format!("{}.client.watch", settings.topic_prefix)
}

/// Watches until Ctrl-C, or until `max_events` events were printed.
pub async fn run(
    settings: &Settings,
    account: Option<&str>,
    max_events: Option<u64>,
    json: bool,
) -> Result<(), CliError> {
    let topic = Topics::new(&settings.topic_prefix).events();
    // Fails clearly when the topic is not there.
    crate::dlq::partition_count(settings, &topic).await?;
    let codec = EventCodec::from_settings(settings)
        .map_err(|e| CliError::Usage(format!("SCHEMA_REGISTRY_URL: {e}")))?;
    let (consumer, partitions) = consumer_at_the_end(settings, &topic)?;
    eprintln!(
        "watching {topic} ({partitions} partitions){} from now on; Ctrl-C to stop",
        account.map(|a| format!(" for {a}")).unwrap_or_default()
    );

    let mut printed = 0u64;
    let interrupted = tokio::signal::ctrl_c();
    tokio::pin!(interrupted);
    while max_events.is_none_or(|max| printed < max) {
        let message = tokio::select! {
            _ = &mut interrupted => break,
            message = consumer.recv() => message,
        };
        match message {
            Ok(message) if wanted(&message, account) => {
                if print_event(&codec, &message, json).await {
                    printed += 1;
                }
            }
            Ok(_) => {}
            Err(e) => eprintln!("warning: {e} (still watching)"),
        }
    }
    Ok(())
}

/// A consumer of every partition of `topic`, each from its current end, and the number of
/// partitions. Explicit end offsets (not `Offset::End`, resolved lazily): an event committed
/// after the `watching` line is printed is never missed.
fn consumer_at_the_end(
    settings: &Settings,
    topic: &str,
) -> Result<(StreamConsumer, usize), CliError> {
    let consumer: StreamConsumer = settings
        .kafka
        .client_config()
        .set("group.id", group_id(settings))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("isolation.level", "read_committed")
        .set("fetch.wait.max.ms", "50")
        .create()
        .map_err(|e| unavailable(settings, e))?;
    let marks = tokio::task::block_in_place(|| watermarks(&consumer, topic))
        .map_err(|e| unavailable(settings, e))?;
    let mut tpl = TopicPartitionList::new();
    // Explicit end offsets (not `Offset::End`, resolved lazily): an event committed after the
    // `watching` line is printed is never missed.
    for m in &marks {
        tpl.add_partition_offset(topic, m.partition, Offset::Offset(m.high))
            .map_err(|e| unavailable(settings, e))?;
    }
    consumer
        .assign(&tpl)
        .map_err(|e| unavailable(settings, e))?;
    Ok((consumer, marks.len()))
}

/// Whether the message is of the watched account (all are when none is given).
fn wanted(message: &BorrowedMessage<'_>, account: Option<&str>) -> bool {
    account.is_none_or(|wanted| message.key() == Some(wanted.as_bytes()))
}

/// Prints the event in the message (a line, or JSON); a message that has no value or cannot be
/// decoded is a warning on stderr. Returns whether an event was printed.
async fn print_event(codec: &EventCodec, message: &BorrowedMessage<'_>, json: bool) -> bool {
    let (partition, offset) = (message.partition(), message.offset());
    let Some(payload) = message.payload() else {
        eprintln!("warning: {partition}:{offset} has no value");
        return false;
    };
    match codec.decode(payload).await {
        Ok(envelope) => {
            if json {
                println!("{}", serde_json::to_string(&envelope).unwrap_or_default());
            } else {
                println!("{}", line(&envelope, partition, offset));
            }
            true
        }
        Err(e) => {
            eprintln!(
                "warning: {partition}:{offset} cannot be decoded ({}): {e}",
                e.code()
            );
            false
        }
    }
}

/// One event for people.
pub fn line(e: &EventEnvelope, partition: i32, offset: i64) -> String {
    format!(
        "{}  {}  v{}  {}  {}  ({partition}:{offset})",
        e.timestamp.to_rfc3339_opts(SecondsFormat::Millis, true),
        e.aggregate_id,
        e.version,
        e.event_type,
        e.data
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared::Event;

    #[test]
    fn an_event_is_one_line() {
        let ts = "2026-11-26T12:00:01.5Z".parse().unwrap();
        let e = EventEnvelope::new(
            "acc-1",
            2,
            &Event::MoneyDeposited { amount_minor: 5025 },
            ts,
            Default::default(),
        );
        assert_eq!(
            line(&e, 1, 42),
            r#"2026-11-26T12:00:01.500Z  acc-1  v2  MoneyDeposited  {"amount_minor":5025}  (1:42)"#
        );
    }
}
