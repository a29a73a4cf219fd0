//! Waiting for command results: one consumer on `<prefix>.command-results` (read_committed,
//! from the end as it was at start) hands each result to the HTTP request waiting for it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::KafkaResult;
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use shared::kafka::Topics;
use shared::{CommandResult, Settings};
use tokio::sync::oneshot;
use uuid::Uuid;

/// Routes results to their waiters. Several requests may wait for the same command id (a
/// client retrying while its first request still waits): each gets the result.
#[derive(Clone, Default)]
pub struct ResultWaiters {
    waiting: Arc<Mutex<Waiting>>,
}

#[derive(Default)]
struct Waiting {
    next_token: u64,
    by_command: HashMap<Uuid, Vec<(u64, oneshot::Sender<CommandResult>)>>,
}

/// One request's interest in a result; dropping it withdraws only this request's interest.
pub struct Waiter {
    waiters: ResultWaiters,
    command_id: Uuid,
    token: u64,
    /// Receives the result.
    pub receiver: oneshot::Receiver<CommandResult>,
}

impl Drop for Waiter {
    fn drop(&mut self) {
        let mut waiting = self.waiters.lock();
        if let Some(list) = waiting.by_command.get_mut(&self.command_id) {
            list.retain(|(token, _)| *token != self.token);
            if list.is_empty() {
                waiting.by_command.remove(&self.command_id);
            }
        }
    }
}

impl ResultWaiters {
    fn lock(&self) -> std::sync::MutexGuard<'_, Waiting> {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers interest in a command's result; register before producing the command.
    pub fn wait_for(&self, command_id: Uuid) -> Waiter {
        let (tx, rx) = oneshot::channel();
        let mut waiting = self.lock();
        waiting.next_token += 1;
        let token = waiting.next_token;
        waiting
            .by_command
            .entry(command_id)
            .or_default()
            .push((token, tx));
        Waiter {
            waiters: self.clone(),
            command_id,
            token,
            receiver: rx,
        }
    }

    fn deliver(&self, result: CommandResult) {
        let senders = self
            .lock()
            .by_command
            .remove(&result.command_id)
            .unwrap_or_default();
        for (_, tx) in senders {
            let _ = tx.send(result.clone());
        }
    }

    /// Every partition of `topic` at its current end.
    fn ends(consumer: &StreamConsumer, topic: &str) -> KafkaResult<TopicPartitionList> {
        let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
        let mut tpl = TopicPartitionList::new();
        for t in metadata.topics().iter().filter(|t| t.name() == topic) {
            for p in t.partitions() {
                let (_, high) =
                    consumer.fetch_watermarks(topic, p.id(), Duration::from_secs(10))?;
                tpl.add_partition_offset(topic, p.id(), Offset::Offset(high))?;
            }
        }
        Ok(tpl)
    }

    /// Starts the listener: assigns every partition of the results topic at its current end,
    /// then delivers results until the process ends.
    pub fn start(&self, settings: &Settings) -> anyhow::Result<tokio::task::JoinHandle<()>> {
        let topic = Topics::new(&settings.topic_prefix).command_results();
        let consumer: StreamConsumer = settings
            .kafka
            .client_config()
            .set(
                "group.id",
                format!("{}.command-service.results", settings.topic_prefix),
            )
            .set("enable.auto.commit", "false")
            .set("isolation.level", "read_committed")
            .create()?;
        // Right after the topics were created a partition may not have a leader yet: retried.
        let mut attempt = 0;
        let tpl = loop {
            attempt += 1;
            match Self::ends(&consumer, &topic) {
                Ok(tpl) => break tpl,
                Err(e) if attempt < 20 => {
                    tracing::info!(error = %e, attempt, "results topic not ready yet; retrying");
                    std::thread::sleep(Duration::from_millis(500));
                }
                Err(e) => return Err(e.into()),
            }
        };
        consumer.assign(&tpl)?;
        let waiters = self.clone();
        Ok(tokio::spawn(async move {
            loop {
                match consumer.recv().await {
                    Ok(msg) => match msg.payload().map(serde_json::from_slice::<CommandResult>) {
                        Some(Ok(result)) => waiters.deliver(result),
                        Some(Err(e)) => tracing::warn!(error = %e, "unreadable command result"),
                        None => {}
                    },
                    Err(e) => {
                        tracing::warn!(error = %e, "result listener error");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
        }))
    }
}
