//! Producing raw bytes and envelopes to a test's events topic, reading its dead letters back.

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::Message;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::OwnedHeaders;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use shared::codec::event_headers;
use shared::kafka::{Topics, canonical_partition};
use shared::testing::unique_name;
use shared::{EventCodec, EventEnvelope, Settings};

/// Writes to the events topic of a test.
pub struct EventWriter {
    producer: FutureProducer,
    /// `<prefix>.events`.
    pub topic: String,
    partitions: i32,
}

impl EventWriter {
    /// A writer for the settings' events topic (which the service creates; this waits for it).
    pub async fn new(settings: &Settings) -> EventWriter {
        projection_service::ensure_projection_topics(settings)
            .await
            .expect("topics");
        let producer = settings
            .kafka
            .client_config()
            .set("enable.idempotence", "true")
            .set("linger.ms", "5")
            // Room for a poison value near the broker's 1 MB limit.
            .set("message.max.bytes", "2000000")
            .create()
            .expect("producer");
        EventWriter {
            producer,
            topic: Topics::new(&settings.topic_prefix).events(),
            partitions: settings.partitions,
        }
    }

    /// The canonical partition of a key.
    pub fn partition_of(&self, key: &str) -> i32 {
        canonical_partition(key.as_bytes(), self.partitions)
    }

    /// Produces bytes as-is, keyed, on the key's canonical partition; returns (partition, offset).
    pub async fn raw(&self, key: &str, bytes: &[u8], headers: Option<OwnedHeaders>) -> (i32, i64) {
        let mut record = FutureRecord::to(&self.topic)
            .key(key)
            .payload(bytes)
            .partition(self.partition_of(key));
        if let Some(h) = headers {
            record = record.headers(h);
        }
        let delivery = self
            .producer
            .send(record, Duration::from_secs(30))
            .await
            .expect("delivered");
        (delivery.partition, delivery.offset)
    }

    /// Produces an envelope encoded by `codec`, with the standard headers.
    pub async fn envelope(&self, codec: &EventCodec, env: &EventEnvelope) -> (i32, i64) {
        let bytes = codec.encode(&self.topic, env).await.expect("encode");
        self.raw(&env.aggregate_id, &bytes, Some(event_headers(env)))
            .await
    }

    /// Produces many (key, bytes) pairs with many deliveries in flight; order per key is kept
    /// (idempotent producer).
    pub async fn many(&self, messages: &[(String, Vec<u8>)]) {
        for chunk in messages.chunks(2000) {
            let sends = chunk.iter().map(|(key, bytes)| {
                self.producer.send(
                    FutureRecord::to(&self.topic)
                        .key(key.as_str())
                        .payload(bytes.as_slice())
                        .partition(self.partition_of(key)),
                    Duration::from_secs(60),
                )
            });
            for r in futures::future::join_all(sends).await {
                r.expect("delivered");
            }
        }
    }
}

/// A dead letter as read back.
#[derive(Debug, Clone)]
pub struct DeadLetterSeen {
    /// Key.
    pub key: Option<Vec<u8>>,
    /// Bytes.
    pub payload: Option<Vec<u8>>,
    /// Headers as text.
    pub headers: BTreeMap<String, String>,
}

/// Reads `count` messages of the DLQ topic from the beginning (fails after 60 s).
pub async fn read_dead_letters(settings: &Settings, count: usize) -> Vec<DeadLetterSeen> {
    let topic = Topics::new(&settings.topic_prefix).events_dlq();
    let consumer: StreamConsumer = settings
        .kafka
        .client_config()
        .set("group.id", unique_name("dlq-reader"))
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    for p in 0..settings.partitions {
        tpl.add_partition_offset(&topic, p, Offset::Beginning)
            .expect("tpl");
    }
    consumer.assign(&tpl).expect("assign");
    let mut out = Vec::new();
    while out.len() < count {
        let m = tokio::time::timeout(Duration::from_secs(60), consumer.recv())
            .await
            .unwrap_or_else(|_| panic!("only {} of {count} dead letters arrived", out.len()))
            .expect("dlq message");
        out.push(DeadLetterSeen {
            key: m.key().map(<[u8]>::to_vec),
            payload: m.payload().map(<[u8]>::to_vec),
            headers: shared::dlq::headers_as_text(&m),
        });
    }
    out
}
