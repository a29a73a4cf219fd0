//! Client side of the command pipeline, for the CLI, benchmarks and tests: produce commands to
//! `<prefix>.commands` on their aggregate's canonical partition and wait for their results on
//! `<prefix>.command-results` (which the command-service writes to the same partition number).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use uuid::Uuid;

use crate::aggregate::DomainCommand;
use crate::config::Settings;
use crate::envelope::{CommandMessage, CommandResult};
use crate::kafka::{Topics, canonical_partition};

/// Why a command could not be submitted or answered.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Kafka could not be reached (or answered with an error).
    #[error("cannot reach Kafka at {bootstrap}: {source}")]
    Unreachable {
        /// Where we tried.
        bootstrap: String,
        /// What librdkafka said.
        source: KafkaError,
    },
    /// The topics do not exist: no command-service has run with this prefix.
    #[error("topic {0} does not exist: is command-service running with the same TOPIC_PREFIX?")]
    NoTopic(String),
    /// No result came in time; the command stays queued and is processed later.
    #[error(
        "no result within {0:?}: is command-service running? (the command is queued and will be processed)"
    )]
    Timeout(Duration),
}

/// How many commands [`CommandClient::submit_all`] has Kafka take at once.
const MAX_SENDS_IN_FLIGHT: usize = 1000;

/// Produces commands and waits for their results.
pub struct CommandClient {
    settings: Settings,
    topics: Topics,
    partitions: i32,
    producer: FutureProducer,
}

impl CommandClient {
    /// Connects and learns the partition count of `<prefix>.commands`.
    pub async fn connect(settings: &Settings) -> Result<CommandClient, ClientError> {
        let unreachable = |source| ClientError::Unreachable {
            bootstrap: settings.kafka.bootstrap_servers.clone(),
            source,
        };
        let producer: FutureProducer = settings
            .kafka
            .producer_config()
            .set("linger.ms", "5")
            .set("message.timeout.ms", "10000")
            .create()
            .map_err(unreachable)?;
        let topics = Topics::new(&settings.topic_prefix);
        let commands = topics.commands();
        let metadata = {
            let producer = producer.clone();
            let commands = commands.clone();
            tokio::task::spawn_blocking(move || {
                producer
                    .client()
                    .fetch_metadata(Some(&commands), Duration::from_secs(5))
            })
            .await
            .expect("metadata task")
            .map_err(unreachable)?
        };
        let partitions = metadata
            .topics()
            .iter()
            .find(|t| t.name() == commands && t.error().is_none())
            .map(|t| t.partitions().len() as i32)
            .filter(|n| *n > 0)
            .ok_or(ClientError::NoTopic(commands))?;
        Ok(CommandClient {
            settings: settings.clone(),
            topics,
            partitions,
            producer,
        })
    }

    /// The partition count of the command topics.
    pub fn partitions(&self) -> i32 {
        self.partitions
    }

    /// Submits one command and waits up to `timeout` for its result.
    pub async fn submit<C: DomainCommand>(
        &self,
        command: &CommandMessage<C>,
        timeout: Duration,
    ) -> Result<CommandResult, ClientError> {
        let mut results = self
            .submit_all(std::slice::from_ref(command), timeout, |_| {})
            .await?;
        results.pop().ok_or(ClientError::Timeout(timeout))
    }

    /// Submits many commands and waits until every one has a result (or `timeout` passes
    /// without progress). Calls `on_result` as results arrive; returns them in arrival order.
    pub async fn submit_all<C: DomainCommand>(
        &self,
        commands: &[CommandMessage<C>],
        timeout: Duration,
        on_result: impl FnMut(&CommandResult),
    ) -> Result<Vec<CommandResult>, ClientError> {
        let wanted_partitions: HashSet<i32> = commands
            .iter()
            .map(|c| canonical_partition(c.aggregate_id.as_bytes(), self.partitions))
            .collect();
        // Positioned before anything is sent, so no result can be missed.
        let consumer = self.results_consumer(&wanted_partitions).await?;
        self.send_all(commands).await?;
        let pending: HashSet<Uuid> = commands.iter().map(|c| c.command_id).collect();
        self.await_results(&consumer, pending, timeout, on_result)
            .await
    }

    /// Produces `commands` to their canonical partitions, each with a `traceparent` header
    /// that starts a trace (or continues the one in `TRACEPARENT`); returns once Kafka has
    /// taken them all.
    async fn send_all<C: DomainCommand>(
        &self,
        commands: &[CommandMessage<C>],
    ) -> Result<(), ClientError> {
        let topic = self.topics.commands();
        let parent = crate::trace::TraceContext::from_env();
        let sends = commands.iter().map(|command| {
            let trace = parent.map_or_else(crate::trace::TraceContext::new_root, |p| p.child());
            let payload = command.to_bytes();
            let partition = canonical_partition(command.aggregate_id.as_bytes(), self.partitions);
            let producer = self.producer.clone();
            let topic = topic.clone();
            let key = command.aggregate_id.clone();
            async move {
                let traceparent = trace.to_header();
                let headers =
                    rdkafka::message::OwnedHeaders::new().insert(rdkafka::message::Header {
                        key: crate::trace::TRACEPARENT,
                        value: Some(traceparent.as_str()),
                    });
                producer
                    .send(
                        FutureRecord::to(&topic)
                            .key(&key)
                            .payload(&payload)
                            .partition(partition)
                            .headers(headers),
                        Duration::from_secs(10),
                    )
                    .await
                    .map_err(|(e, _)| e)
            }
        });
        let mut sent = futures::stream::iter(sends).buffer_unordered(MAX_SENDS_IN_FLIGHT);
        while let Some(sent) = sent.next().await {
            sent.map_err(|e| self.unreachable(e))?;
        }
        Ok(())
    }

    /// Reads results until every command id in `pending` has one; gives up when `timeout`
    /// passes without one arriving.
    async fn await_results(
        &self,
        consumer: &StreamConsumer,
        mut pending: HashSet<Uuid>,
        timeout: Duration,
        mut on_result: impl FnMut(&CommandResult),
    ) -> Result<Vec<CommandResult>, ClientError> {
        let mut results = Vec::with_capacity(pending.len());
        let mut last_progress = Instant::now();
        while !pending.is_empty() {
            let left = timeout.saturating_sub(last_progress.elapsed());
            if left.is_zero() {
                return Err(ClientError::Timeout(timeout));
            }
            let msg = match tokio::time::timeout(left, consumer.recv()).await {
                Err(_) => return Err(ClientError::Timeout(timeout)),
                Ok(Err(e)) => return Err(self.unreachable(e)),
                Ok(Ok(msg)) => msg,
            };
            // Results of other clients' commands, or unreadable ones, are not ours to wait for.
            let Some(Ok(result)) = msg.payload().map(serde_json::from_slice::<CommandResult>)
            else {
                continue;
            };
            if pending.remove(&result.command_id) {
                last_progress = Instant::now();
                on_result(&result);
                results.push(result);
            }
        }
        Ok(results)
    }

    fn unreachable(&self, source: KafkaError) -> ClientError {
        ClientError::Unreachable {
            bootstrap: self.settings.kafka.bootstrap_servers.clone(),
            source,
        }
    }

    /// A consumer of the results partitions, positioned at their current ends (before the
    /// commands are produced, so no result can be missed).
    async fn results_consumer(
        &self,
        partitions: &HashSet<i32>,
    ) -> Result<Arc<StreamConsumer>, ClientError> {
        let unreachable = |source| self.unreachable(source);
        let consumer: StreamConsumer = self
            .settings
            .kafka
            .client_config()
            .set(
                "group.id",
                format!(
                    "{}.client.{}",
                    self.settings.topic_prefix,
                    Uuid::new_v4().simple()
                ),
            )
            .set("enable.auto.commit", "false")
            .set("isolation.level", "read_committed")
            .set("fetch.wait.max.ms", "20")
            .create()
            .map_err(unreachable)?;
        let consumer = Arc::new(consumer);
        let topic = self.topics.command_results();
        // Watermark queries block: off the async threads.
        let ends: HashMap<i32, i64> = {
            let consumer = consumer.clone();
            let watermark_topic = topic.clone();
            let partitions: Vec<i32> = partitions.iter().copied().collect();
            tokio::task::spawn_blocking(move || {
                partitions
                    .into_iter()
                    .map(|p| {
                        consumer
                            .fetch_watermarks(&watermark_topic, p, Duration::from_secs(5))
                            .map(|(_, high)| (p, high))
                    })
                    .collect::<Result<HashMap<i32, i64>, KafkaError>>()
            })
            .await
            .expect("watermark task")
            .map_err(|e| match e {
                KafkaError::MetadataFetch(RDKafkaErrorCode::UnknownTopicOrPartition) => {
                    ClientError::NoTopic(topic.clone())
                }
                other => unreachable(other),
            })?
        };
        let mut tpl = TopicPartitionList::new();
        for (p, high) in ends {
            tpl.add_partition_offset(&topic, p, Offset::Offset(high))
                .map_err(unreachable)?;
        }
        consumer.assign(&tpl).map_err(unreachable)?;
        Ok(consumer)
    }
}
