//! Kafka plumbing shared by the services and the CLI: topic names, the canonical partitioner,
//! client configuration built in one place, topic creation, and the checks that existing topics
//! are co-partitioned and configured as the contract requires ([`verify_topics`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::message::BorrowedMessage;
use rdkafka::{ClientConfig, ClientContext, Offset, TopicPartitionList};

use crate::config::KafkaSettings;

/// The topic names for one prefix (`bank` by default).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    prefix: String,
}

impl Topics {
    /// Topics named `<prefix>.…`.
    pub fn new(prefix: impl Into<String>) -> Self {
        Topics {
            prefix: prefix.into(),
        }
    }
    /// `<prefix>.commands`: command messages, key = aggregate id.
    pub fn commands(&self) -> String {
        format!("{}.commands", self.prefix)
    }
    /// `<prefix>.events`: the event store, key = aggregate id.
    pub fn events(&self) -> String {
        format!("{}.events", self.prefix)
    }
    /// `<prefix>.command-results`: one result per command, key = command id.
    pub fn command_results(&self) -> String {
        format!("{}.command-results", self.prefix)
    }
    /// `<prefix>.snapshots`: compacted aggregate snapshots, key = aggregate id.
    pub fn snapshots(&self) -> String {
        format!("{}.snapshots", self.prefix)
    }
    /// `<prefix>.command-checkpoints`: the command-service's per-partition restore checkpoints
    /// (compacted, key = partition number, co-partitioned with the events).
    pub fn command_checkpoints(&self) -> String {
        format!("{}.command-checkpoints", self.prefix)
    }
    /// `<prefix>.command-instances`: which process holds each command-service `INSTANCE_ID`
    /// (compacted, key = INSTANCE_ID, written transactionally by every new producer of that
    /// id): tells a twin instance from a broker failover when Kafka reports the id fenced.
    pub fn command_instances(&self) -> String {
        format!("{}.command-instances", self.prefix)
    }
    /// `<prefix>.events.dlq`: events the projection could not use, with headers saying why.
    pub fn events_dlq(&self) -> String {
        format!("{}.events.dlq", self.prefix)
    }
}

/// The partition an aggregate lives on: murmur2 of the key as Java clients compute it
/// (librdkafka `murmur2_random`), positive, modulo the partition count.
pub fn canonical_partition(key: &[u8], partitions: i32) -> i32 {
    let hash = murmur2::murmur2(key, murmur2::KAFKA_SEED) & 0x7fff_ffff;
    // partitions > 0, so the remainder fits an i32.
    (hash % partitions.max(1).unsigned_abs()) as i32
}

impl KafkaSettings {
    /// A librdkafka configuration with the bootstrap servers and the security pass-through:
    /// the one place every client's settings start from. Callers add their role's settings.
    pub fn client_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &self.bootstrap_servers)
            .set("client.dns.lookup", "use_all_dns_ips");
        for (key, value) in &self.passthrough {
            config.set(key, value);
        }
        config
    }

    /// [`KafkaSettings::client_config`] for a producer: idempotent, and the canonical
    /// partitioner for any record sent without an explicit partition (ours always carry one).
    pub fn producer_config(&self) -> ClientConfig {
        let mut config = self.client_config();
        config
            .set("partitioner", "murmur2_random")
            .set("enable.idempotence", "true");
        config
    }
}

/// A topic the services need.
#[derive(Debug, Clone)]
pub struct TopicSpec {
    /// Its name.
    pub name: String,
    /// Partition count when created.
    pub partitions: i32,
    /// Topic configs (`cleanup.policy=compact`, `retention.ms=-1`).
    pub config: Vec<(&'static str, String)>,
}

/// Failure to create or inspect topics.
#[derive(Debug, thiserror::Error)]
pub enum TopicError {
    /// Kafka refused or could not be reached.
    #[error("Kafka at {bootstrap}: {source}")]
    Kafka {
        /// Where we tried.
        bootstrap: String,
        /// What librdkafka said.
        source: KafkaError,
    },
    /// Creating a topic failed.
    #[error("cannot create topic {topic}: {code}")]
    Create {
        /// The topic.
        topic: String,
        /// Kafka's error code.
        code: RDKafkaErrorCode,
    },
    /// A topic did not show up in the metadata in time.
    #[error("topic {0} did not become available in time")]
    NotAvailable(String),
    /// The brokers refused this client's credentials (SASL): nothing will work until they change.
    #[error(
        "Kafka at {bootstrap} refused the credentials: {reason} (check KAFKA_SASL_USERNAME, \
         KAFKA_SASL_MECHANISM and the password in KAFKA_SASL_PASSWORD_FILE)"
    )]
    Authentication {
        /// Where we tried.
        bootstrap: String,
        /// What librdkafka said.
        reason: String,
    },
    /// This principal may neither create a topic it needs nor see it: an ACL is missing.
    #[error(
        "topic {topic}: this principal is not authorized to create it and cannot see it (it \
         may not exist): create it, or grant the ACLs README's Security section lists"
    )]
    NotAuthorized {
        /// The topic.
        topic: String,
    },
    /// Topics that must have the same partition count do not.
    #[error(
        "topics are not co-partitioned: {0}. Commands, events and snapshots must have the same \
         partition count; recreate them or set PARTITIONS to match the existing topics"
    )]
    NotCoPartitioned(String),
    /// The broker would not describe a topic's configs.
    #[error("cannot describe the configs of topic {topic}: {code}")]
    Describe {
        /// The topic.
        topic: String,
        /// Kafka's error code.
        code: RDKafkaErrorCode,
    },
    /// Existing topics have settings the contract forbids; nothing was changed.
    #[error("{}", misconfigured_message(bootstrap, mismatches))]
    Misconfigured {
        /// The brokers, for the fix commands.
        bootstrap: String,
        /// Every setting that differs.
        mismatches: Vec<TopicMismatch>,
    },
}

fn misconfigured_message(bootstrap: &str, mismatches: &[TopicMismatch]) -> String {
    let lines: Vec<String> = mismatches
        .iter()
        .map(|m| {
            format!(
                "topic {}: {} is {}, required {}{}; fix: {}",
                m.topic,
                m.setting,
                m.found,
                if m.at_least { "at least " } else { "" },
                m.required,
                m.fix(bootstrap)
            )
        })
        .collect();
    format!(
        "existing topics do not match the contract (docs/contract.md), refusing to start:\n- {}",
        lines.join("\n- ")
    )
}

/// A client context that logs librdkafka's errors and remembers an authentication failure, so
/// that a wrong password stops a start at once with that reason instead of a time-out.
#[derive(Clone, Default)]
struct AuthWatch {
    refused: std::sync::Arc<std::sync::Mutex<Option<String>>>,
}

impl AuthWatch {
    /// librdkafka's reason, once the brokers refused the credentials.
    fn refused(&self) -> Option<String> {
        self.refused.lock().ok().and_then(|r| r.clone())
    }
}

impl ClientContext for AuthWatch {
    fn error(&self, error: KafkaError, reason: &str) {
        tracing::error!(error = %error, reason, "librdkafka error");
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::Authentication)
            && let Ok(mut refused) = self.refused.lock()
        {
            *refused = Some(reason.to_owned());
        }
    }
}

impl rdkafka::producer::ProducerContext for AuthWatch {
    type DeliveryOpaque = ();
    fn delivery(&self, _: &rdkafka::message::DeliveryResult<'_>, _: ()) {}
}

/// Asks the brokers for their metadata until they answer, within `timeout`: refused credentials
/// (SASL) end the wait at once with [`TopicError::Authentication`]; an unreachable cluster ends
/// it with [`TopicError::Kafka`] once `timeout` has passed.
pub fn check_credentials(settings: &KafkaSettings, timeout: Duration) -> Result<(), TopicError> {
    let kafka_err = |source| TopicError::Kafka {
        bootstrap: settings.bootstrap_servers.clone(),
        source,
    };
    let watch = AuthWatch::default();
    // A producer's poll serves the main queue, where librdkafka reports authentication errors.
    let probe: rdkafka::producer::BaseProducer<AuthWatch> = settings
        .client_config()
        .create_with_context(watch.clone())
        .map_err(kafka_err)?;
    let deadline = Instant::now() + timeout;
    loop {
        let answer = rdkafka::producer::Producer::client(&probe)
            .fetch_metadata(None, Duration::from_secs(1));
        probe.poll(Duration::ZERO);
        if let Some(reason) = watch.refused() {
            return Err(TopicError::Authentication {
                bootstrap: settings.bootstrap_servers.clone(),
                reason,
            });
        }
        match answer {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() >= deadline => return Err(kafka_err(e)),
            Err(_) => {}
        }
    }
}

/// Creates the missing topics (existing ones are left alone) and waits until all of them are
/// visible with their leaders. Returns each topic's actual partition count. Refused credentials
/// stop it at once ([`check_credentials`]). A topic this principal may not create is fine if it
/// exists and can be described: a least-privilege principal reads topics another service owns.
pub async fn ensure_topics(
    settings: &KafkaSettings,
    specs: &[TopicSpec],
    timeout: Duration,
) -> Result<Vec<(String, i32)>, TopicError> {
    {
        let probe = settings.clone();
        tokio::task::spawn_blocking(move || check_credentials(&probe, timeout))
            .await
            .map_err(|_| TopicError::Kafka {
                bootstrap: settings.bootstrap_servers.clone(),
                source: KafkaError::Canceled,
            })??;
    }
    let kafka_err = |source| TopicError::Kafka {
        bootstrap: settings.bootstrap_servers.clone(),
        source,
    };
    let admin: AdminClient<DefaultClientContext> =
        settings.client_config().create().map_err(kafka_err)?;
    let new_topics: Vec<NewTopic<'_>> = specs
        .iter()
        .map(|s| {
            let mut t = NewTopic::new(&s.name, s.partitions, TopicReplication::Fixed(-1));
            for (k, v) in &s.config {
                t = t.set(k, v);
            }
            t
        })
        .collect();
    let options = AdminOptions::new()
        .operation_timeout(Some(timeout))
        .request_timeout(Some(timeout));
    for result in admin
        .create_topics(&new_topics, &options)
        .await
        .map_err(kafka_err)?
    {
        match result {
            Ok(_)
            | Err((_, RDKafkaErrorCode::TopicAlreadyExists))
            | Err((_, RDKafkaErrorCode::TopicAuthorizationFailed)) => {}
            Err((topic, code)) => return Err(TopicError::Create { topic, code }),
        }
    }
    let deadline = Instant::now() + timeout;
    let mut counts = Vec::new();
    for spec in specs {
        loop {
            match partition_count_of(&admin, &spec.name) {
                Ok(Some(n)) => {
                    counts.push((spec.name.clone(), n));
                    break;
                }
                Err(e)
                    if e.rdkafka_error_code()
                        == Some(RDKafkaErrorCode::TopicAuthorizationFailed) =>
                {
                    return Err(TopicError::NotAuthorized {
                        topic: spec.name.clone(),
                    });
                }
                Ok(None) | Err(_) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Ok(None) => return Err(TopicError::NotAvailable(spec.name.clone())),
                Err(source) => return Err(kafka_err(source)),
            }
        }
    }
    Ok(counts)
}

/// The partition count of `topic` once every partition has a leader; `None` while it is not
/// (yet) there; an error when this principal may not see it.
fn partition_count_of<C: ClientContext>(
    admin: &AdminClient<C>,
    topic: &str,
) -> Result<Option<i32>, KafkaError> {
    let metadata = admin
        .inner()
        .fetch_metadata(Some(topic), Duration::from_secs(5))?;
    let found = metadata.topics().iter().find(|t| t.name() == topic);
    if let Some(error) = found.and_then(|t| t.error()) {
        let code = RDKafkaErrorCode::from(error);
        if code == RDKafkaErrorCode::TopicAuthorizationFailed {
            return Err(KafkaError::MetadataFetch(code));
        }
    }
    Ok(found.and_then(|t| {
        let ready = t.error().is_none()
            && !t.partitions().is_empty()
            && t.partitions().iter().all(|p| p.leader() >= 0);
        ready.then(|| t.partitions().len() as i32)
    }))
}

/// Checks that the named topics all have the same partition count.
pub fn check_copartitioned(counts: &[(String, i32)]) -> Result<i32, TopicError> {
    let first = counts.first().map(|(_, n)| *n).unwrap_or(1);
    if counts.iter().all(|(_, n)| *n == first) {
        Ok(first)
    } else {
        let listed: Vec<String> = counts.iter().map(|(t, n)| format!("{t} has {n}")).collect();
        Err(TopicError::NotCoPartitioned(listed.join(", ")))
    }
}

/// The settings the contract requires of the topics of one prefix, so that a topic created by
/// hand (or by an older version) cannot silently lose events or snapshots.
impl Topics {
    /// The topics that must have the same partition count: an aggregate lives on the same
    /// partition number of each.
    pub fn copartitioned(&self) -> [String; 5] {
        [
            self.commands(),
            self.events(),
            self.snapshots(),
            self.command_results(),
            self.command_checkpoints(),
        ]
    }

    /// The configs the contract requires of topic `name` (`config`, value); none for a topic
    /// it says nothing about. The events topic is the store: never compacted, never expired.
    /// Snapshots and checkpoints are compacted (one per key is all a restore reads).
    pub fn required_configs(&self, name: &str) -> &'static [(&'static str, &'static str)] {
        if name == self.events() {
            &[
                ("cleanup.policy", "delete"),
                ("retention.ms", "-1"),
                ("retention.bytes", "-1"),
            ]
        } else if name == self.snapshots() || name == self.command_checkpoints() {
            &[("cleanup.policy", "compact")]
        } else if name == self.command_results() {
            // A duplicate is answered by reading its original result at its offset: compaction
            // (which keeps only a key's latest copy) or a size limit would take it away within
            // the dedupe window. Its time retention is a floor (`RetentionFloor`).
            &[("cleanup.policy", "delete"), ("retention.bytes", "-1")]
        } else {
            &[]
        }
    }
}

/// An existing topic as the broker describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FoundTopic {
    /// Its name.
    pub name: String,
    /// Its partition count.
    pub partitions: i32,
    /// Its effective configs (topic overrides and broker defaults), by name.
    pub configs: HashMap<String, String>,
}

/// One setting of an existing topic that is not what the contract requires.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicMismatch {
    /// The topic.
    pub topic: String,
    /// `partitions`, or the name of a topic config.
    pub setting: String,
    /// The value the topic has (`(unset)` when the broker reports none).
    pub found: String,
    /// The value it must have (at least, when `at_least`).
    pub required: String,
    /// Whether any larger value (or -1, unlimited) would do too: a retention floor.
    pub at_least: bool,
}

/// A topic whose `retention.ms` must be unlimited (-1) or at least `at_least`, e.g. the results
/// topic, which must keep a command's result for the whole dedupe window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetentionFloor {
    /// The topic.
    pub topic: String,
    /// The shortest retention that will do.
    pub at_least: Duration,
}

impl TopicMismatch {
    /// The command that fixes it, for the operator.
    pub fn fix(&self, bootstrap: &str) -> String {
        if self.setting == PARTITIONS_SETTING {
            format!(
                "a topic's partition count cannot shrink, and growing one that holds data moves \
                 its keys to other partitions: recreate the co-partitioned topics with {} \
                 partitions, or if {} is still empty, `kafka-topics.sh --bootstrap-server \
                 {bootstrap} --alter --topic {} --partitions {}`",
                self.required, self.topic, self.topic, self.required
            )
        } else {
            format!(
                "`kafka-configs.sh --bootstrap-server {bootstrap} --alter --entity-type topics \
                 --entity-name {} --add-config {}={}`",
                self.topic, self.setting, self.required
            )
        }
    }
}

/// The pseudo-setting a partition-count mismatch is reported under.
const PARTITIONS_SETTING: &str = "partitions";

/// Compares existing topics with the contract: the co-partitioned topics among `found` must all
/// have the partition count of the first of them, and every topic the configs
/// [`Topics::required_configs`] names, and every retention floor. Returns every difference, in
/// the order of `found`.
pub fn topic_mismatches(
    topics: &Topics,
    found: &[FoundTopic],
    floors: &[RetentionFloor],
) -> Vec<TopicMismatch> {
    let copartitioned = topics.copartitioned();
    let required_partitions = found
        .iter()
        .find(|t| copartitioned.contains(&t.name))
        .map(|t| t.partitions);
    let mut mismatches = Vec::new();
    for topic in found {
        if let Some(required) = required_partitions
            && copartitioned.contains(&topic.name)
            && topic.partitions != required
        {
            mismatches.push(TopicMismatch {
                topic: topic.name.clone(),
                setting: PARTITIONS_SETTING.into(),
                found: topic.partitions.to_string(),
                required: required.to_string(),
                at_least: false,
            });
        }
        for (setting, required) in topics.required_configs(&topic.name) {
            let found = topic.configs.get(*setting).map(String::as_str);
            if found != Some(*required) {
                mismatches.push(TopicMismatch {
                    topic: topic.name.clone(),
                    setting: (*setting).into(),
                    found: found.unwrap_or("(unset)").into(),
                    required: (*required).into(),
                    at_least: false,
                });
            }
        }
        for floor in floors.iter().filter(|f| f.topic == topic.name) {
            if let Some(mismatch) = below_floor(topic, floor) {
                mismatches.push(mismatch);
            }
        }
    }
    mismatches
}

/// The mismatch when `topic` keeps records for less than `floor` (unset counts as too short:
/// the broker reports its effective value, so unset means unknown).
fn below_floor(topic: &FoundTopic, floor: &RetentionFloor) -> Option<TopicMismatch> {
    let required = floor.at_least.as_millis();
    let found = topic.configs.get("retention.ms");
    let enough = found
        .and_then(|v| v.parse::<i64>().ok())
        .is_some_and(|ms| ms < 0 || u128::try_from(ms).is_ok_and(|ms| ms >= required));
    (!enough).then(|| TopicMismatch {
        topic: topic.name.clone(),
        setting: "retention.ms".into(),
        found: found.map_or("(unset)", String::as_str).into(),
        required: required.to_string(),
        at_least: true,
    })
}

/// Refuses topics of `prefix` that exist with settings the contract forbids (see
/// [`topic_mismatches`]); `counts` are the topics' partition counts as [`ensure_topics`] returns
/// them. Call it at start, after [`ensure_topics`], before anything is read or written.
pub async fn verify_topics(
    settings: &KafkaSettings,
    prefix: &str,
    counts: &[(String, i32)],
    floors: &[RetentionFloor],
) -> Result<(), TopicError> {
    let found = describe_topics(settings, counts).await?;
    let mismatches = topic_mismatches(&Topics::new(prefix), &found, floors);
    if mismatches.is_empty() {
        Ok(())
    } else {
        Err(TopicError::Misconfigured {
            bootstrap: settings.bootstrap_servers.clone(),
            mismatches,
        })
    }
}

/// The effective configs of the topics in `counts`, from the broker: one request per topic,
/// so that every answer is certainly the topic's (they are few, and this runs once at start).
async fn describe_topics(
    settings: &KafkaSettings,
    counts: &[(String, i32)],
) -> Result<Vec<FoundTopic>, TopicError> {
    let kafka_err = |source| TopicError::Kafka {
        bootstrap: settings.bootstrap_servers.clone(),
        source,
    };
    let admin: AdminClient<DefaultClientContext> =
        settings.client_config().create().map_err(kafka_err)?;
    let options = AdminOptions::new().request_timeout(Some(Duration::from_secs(30)));
    let mut found = Vec::with_capacity(counts.len());
    for (name, partitions) in counts {
        let described = admin
            .describe_configs(&[ResourceSpecifier::Topic(name)], &options)
            .await
            .map_err(kafka_err)?;
        let describe_err = |code| TopicError::Describe {
            topic: name.clone(),
            code,
        };
        let resource = described
            .into_iter()
            .next()
            .ok_or(describe_err(RDKafkaErrorCode::UnknownTopicOrPartition))?
            .map_err(describe_err)?;
        let configs = resource
            .entries
            .into_iter()
            .filter_map(|e| Some((e.name, e.value?)))
            .collect();
        found.push(FoundTopic {
            name: name.clone(),
            partitions: *partitions,
            configs,
        });
    }
    Ok(found)
}

/// Tells when the transactions open in a topic's partitions have ended. A read_committed read
/// ends at the last stable offset: below the first transaction still open. Whatever was
/// committed after that transaction began (by the writer that replaced a stopped one, say) is
/// not visible until it ends, so a restore that read only that far would miss committed events.
/// A restore therefore first [`settle`](TransactionWatch::settle)s: it waits until the last
/// stable offset has reached the end as it is now (the high watermark).
pub struct TransactionWatch {
    /// read_committed: its "latest" offset is the last stable offset.
    committed: BaseConsumer<QuietEof>,
    /// read_uncommitted: its "latest" offset is the high watermark.
    uncommitted: BaseConsumer<QuietEof>,
}

/// Why [`TransactionWatch::settle`] gave up.
#[derive(Debug, thiserror::Error)]
pub enum SettleError {
    /// The offsets could not be read for a long while.
    #[error(transparent)]
    Kafka(#[from] KafkaError),
    /// A transaction stayed open below the end far longer than any writer of this system keeps
    /// one open.
    #[error(
        "a transaction has stayed open in {topic} for {}s (partition, last stable offset, end): \
         {open:?}; it may be hanging (KIP-890): find it with `kafka-transactions.sh \
         --bootstrap-server <broker> find-hanging --broker-id <leader of the partition>` and end it \
         with `kafka-transactions.sh --bootstrap-server <broker> abort --topic {topic} --partition \
         <partition> --start-offset <its start offset>`",
        waited.as_secs()
    )]
    Hanging {
        /// The topic read.
        topic: String,
        /// How long the wait lasted.
        waited: Duration,
        /// The partitions still open: (partition, last stable offset, end).
        open: Vec<(i32, i64, i64)>,
    },
}

impl TransactionWatch {
    /// Two clients, one per isolation level, under client group id `group_id` (nothing is
    /// committed under it, but librdkafka looks its coordinator up, so on a secured cluster the
    /// principal needs to be allowed the group: the caller names one under its own prefix).
    pub fn new(settings: &KafkaSettings, group_id: &str) -> KafkaResult<TransactionWatch> {
        let client = |isolation: &str| {
            settings
                .client_config()
                .set("group.id", group_id)
                .set("isolation.level", isolation)
                .create_with_context(QuietEof)
        };
        Ok(TransactionWatch {
            committed: client("read_committed")?,
            uncommitted: client("read_uncommitted")?,
        })
    }

    /// Waits until no transaction that is open now remains open below the current end of
    /// `partitions` of `topic` (a writer's transaction ends within its transaction time-out
    /// at the latest). Returns false when `stop` was set first. A read opened afterwards sees
    /// everything written before this call that committed. A transaction still open after
    /// `hanging_after` is an error ([`SettleError::Hanging`]): no writer of this system keeps
    /// one open for long, so it is a hanging transaction (KIP-890), which only an operator can
    /// abort.
    pub fn settle(
        &self,
        topic: &str,
        partitions: &[i32],
        stop: &AtomicBool,
        hanging_after: Duration,
    ) -> Result<bool, SettleError> {
        const TIMEOUT: Duration = Duration::from_secs(10);
        // Errors (a leader moving, a broker restarting) are waited out for this long.
        const ERRORS_FOR: Duration = Duration::from_secs(120);
        let started = Instant::now();
        let mut last_log = started;
        let mut ends: Vec<(i32, Option<i64>)> = partitions.iter().map(|p| (*p, None)).collect();
        loop {
            let mut open = Vec::new();
            let mut failed = None;
            for (p, end) in &mut ends {
                let read = end.map_or_else(
                    || {
                        self.uncommitted
                            .fetch_watermarks(topic, *p, TIMEOUT)
                            .map(|w| w.1)
                    },
                    Ok,
                );
                let stable = read.and_then(|high| {
                    *end = Some(high);
                    self.committed
                        .fetch_watermarks(topic, *p, TIMEOUT)
                        .map(|w| (high, w.1))
                });
                match stable {
                    Ok((high, stable)) if stable < high => open.push((*p, stable, high)),
                    Ok(_) => {}
                    Err(e) => failed = Some(e),
                }
            }
            if open.is_empty() && failed.is_none() {
                return Ok(true);
            }
            if stop.load(Ordering::SeqCst) {
                return Ok(false);
            }
            if let Some(e) = &failed
                && started.elapsed() >= ERRORS_FOR
            {
                return Err(SettleError::Kafka(e.clone()));
            }
            if !open.is_empty() && started.elapsed() >= hanging_after {
                return Err(SettleError::Hanging {
                    topic: topic.to_owned(),
                    waited: started.elapsed(),
                    open,
                });
            }
            if last_log.elapsed() >= Duration::from_secs(5) {
                tracing::info!(
                    %topic,
                    waiting_s = started.elapsed().as_secs(),
                    ?open,
                    error = failed.as_ref().map(ToString::to_string),
                    "waiting for transactions open below the end to end before reading on \
                     (partition, last stable offset, end)"
                );
                last_log = Instant::now();
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Reads partitions of a topic from the beginning to their end, read_committed: for restoring
/// state, for tools and for tests. "The end" is where the consumer reports end-of-partition;
/// with read_committed that is the last stable offset: an open transaction ends the read (see
/// [`TransactionWatch`] to wait for it first).
pub struct TopicReader {
    consumer: BaseConsumer<QuietEof>,
    topic: String,
    partitions: Vec<i32>,
}

/// Consumer context that does not log end-of-partition, which a [`TopicReader`] waits for.
struct QuietEof;

impl ClientContext for QuietEof {
    fn error(&self, error: KafkaError, reason: &str) {
        let eof = matches!(
            error,
            KafkaError::PartitionEOF(_) | KafkaError::Global(RDKafkaErrorCode::PartitionEOF)
        );
        if !eof {
            tracing::error!(error = %error, reason, "librdkafka error");
        }
    }
}

impl ConsumerContext for QuietEof {}

impl TopicReader {
    /// Assigns `partitions` of `topic` from the beginning. Creating several readers before
    /// draining any lets their connections and offset look-ups overlap.
    pub fn open(
        settings: &KafkaSettings,
        group_id: &str,
        topic: &str,
        partitions: &[i32],
    ) -> KafkaResult<TopicReader> {
        let starts: Vec<(i32, Offset)> =
            partitions.iter().map(|p| (*p, Offset::Beginning)).collect();
        Self::open_at(settings, group_id, topic, &starts)
    }

    /// Like [`TopicReader::open`], each partition from its own start offset (for a tail after a
    /// checkpoint).
    pub fn open_at(
        settings: &KafkaSettings,
        group_id: &str,
        topic: &str,
        starts: &[(i32, Offset)],
    ) -> KafkaResult<TopicReader> {
        let consumer = Self::consumer(settings, group_id)?;
        let mut tpl = TopicPartitionList::new();
        for (p, offset) in starts {
            tpl.add_partition_offset(topic, *p, *offset)?;
        }
        consumer.assign(&tpl)?;
        Ok(TopicReader {
            consumer,
            topic: topic.to_owned(),
            partitions: starts.iter().map(|(p, _)| *p).collect(),
        })
    }

    /// Like [`TopicReader::open`], from the first message of each partition whose timestamp is
    /// at or after `since_ms` (milliseconds since the epoch): for reading a time window.
    pub fn open_since(
        settings: &KafkaSettings,
        group_id: &str,
        topic: &str,
        partitions: &[i32],
        since_ms: i64,
    ) -> KafkaResult<TopicReader> {
        let starts = Self::offsets_since(settings, group_id, topic, partitions, since_ms)?;
        let starts: Vec<(i32, Offset)> = partitions
            .iter()
            .map(|p| (*p, starts.get(p).copied().unwrap_or(Offset::End)))
            .collect();
        Self::open_at(settings, group_id, topic, &starts)
    }

    /// Per partition, the offset of the first message at or after `since_ms` (ms since the
    /// epoch, by record timestamp); [`Offset::End`] where there is none that recent.
    pub fn offsets_since(
        settings: &KafkaSettings,
        group_id: &str,
        topic: &str,
        partitions: &[i32],
        since_ms: i64,
    ) -> KafkaResult<HashMap<i32, Offset>> {
        let consumer = Self::consumer(settings, group_id)?;
        let mut query = TopicPartitionList::new();
        for p in partitions {
            query.add_partition_offset(topic, *p, Offset::Offset(since_ms))?;
        }
        let found = consumer.offsets_for_times(query, Duration::from_secs(30))?;
        Ok(partitions
            .iter()
            .map(|p| {
                let offset = found
                    .find_partition(topic, *p)
                    .filter(|e| e.error().is_ok())
                    .map(|e| e.offset())
                    .filter(|o| matches!(o, Offset::Offset(_)))
                    .unwrap_or(Offset::End);
                (*p, offset)
            })
            .collect())
    }

    fn consumer(settings: &KafkaSettings, group_id: &str) -> KafkaResult<BaseConsumer<QuietEof>> {
        settings
            .client_config()
            .set("group.id", group_id)
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "true")
            .set("fetch.wait.max.ms", "10")
            // Enough read-ahead to keep the reads fast, without librdkafka's 64 MB default
            // per consumer inflating the memory of a restore.
            .set("queued.max.messages.kbytes", "8192")
            .set("isolation.level", "read_committed")
            .set("auto.offset.reset", "earliest")
            .create_with_context(QuietEof)
    }

    /// Calls `each` for every message up to the end of every partition. Read errors are logged
    /// and the read goes on (librdkafka retries by itself).
    pub fn drain(self, each: impl FnMut(&BorrowedMessage<'_>)) {
        self.drain_until(&AtomicBool::new(false), each);
    }

    /// [`TopicReader::drain`] that gives up when `stop` is set; returns whether it reached the
    /// end of every partition.
    pub fn drain_until(self, stop: &AtomicBool, each: impl FnMut(&BorrowedMessage<'_>)) -> bool {
        self.drain_while(|| !stop.load(Ordering::SeqCst), each)
    }

    /// [`TopicReader::drain`] that gives up after `limit` (a broker that stays away); returns
    /// whether it reached the end of every partition in time.
    pub fn drain_for(self, limit: Duration, each: impl FnMut(&BorrowedMessage<'_>)) -> bool {
        let deadline = Instant::now() + limit;
        self.drain_while(|| Instant::now() < deadline, each)
    }

    fn drain_while(
        self,
        keep_going: impl Fn() -> bool,
        mut each: impl FnMut(&BorrowedMessage<'_>),
    ) -> bool {
        let TopicReader {
            consumer,
            topic,
            mut partitions,
        } = self;
        let mut last_log = Instant::now();
        while !partitions.is_empty() {
            if !keep_going() {
                return false;
            }
            match consumer.poll(Duration::from_millis(200)) {
                Some(Ok(msg)) => each(&msg),
                Some(Err(KafkaError::PartitionEOF(p))) => partitions.retain(|x| *x != p),
                Some(Err(e)) => tracing::warn!(%topic, error = %e, "read error; retrying"),
                None => {}
            }
            if last_log.elapsed() > Duration::from_secs(5) {
                tracing::info!(%topic, waiting_for = ?partitions, "still reading");
                last_log = Instant::now();
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitioner_matches_the_java_client() {
        // Kafka's own test vectors (clients UtilsTest / DefaultPartitioner).
        assert_eq!(
            murmur2::murmur2(b"21", murmur2::KAFKA_SEED) as i32,
            -973_932_308
        );
        assert_eq!(
            murmur2::murmur2(b"foobar", murmur2::KAFKA_SEED) as i32,
            -790_332_482
        );
        assert_eq!(
            murmur2::murmur2(b"a-little-bit-long-string", murmur2::KAFKA_SEED) as i32,
            -985_981_536
        );
        let p = canonical_partition(b"acc-1", 6);
        assert!((0..6).contains(&p));
        assert_eq!(p, canonical_partition(b"acc-1", 6));
    }

    fn found(name: &str, partitions: i32, configs: &[(&str, &str)]) -> FoundTopic {
        FoundTopic {
            name: name.into(),
            partitions,
            configs: configs
                .iter()
                .map(|(k, v)| ((*k).into(), (*v).into()))
                .collect(),
        }
    }

    const GOOD_EVENTS: [(&str, &str); 3] = [
        ("cleanup.policy", "delete"),
        ("retention.ms", "-1"),
        ("retention.bytes", "-1"),
    ];

    #[test]
    fn topics_as_the_contract_says_have_no_mismatch() {
        let t = Topics::new("p");
        let compact = [("cleanup.policy", "compact"), ("retention.ms", "604800000")];
        let found = [
            found("p.commands", 6, &[("cleanup.policy", "delete")]),
            found("p.events", 6, &GOOD_EVENTS),
            found("p.snapshots", 6, &compact),
            found("p.command-checkpoints", 6, &compact),
            found("p.command-results", 6, &GOOD_EVENTS),
            // not co-partitioned, no required config
            found("p.events.dlq", 3, &[]),
        ];
        assert_eq!(topic_mismatches(&t, &found, &[]), vec![]);
    }

    #[test]
    fn every_difference_is_named_with_found_and_required_values() {
        let t = Topics::new("p");
        let found = [
            found("p.commands", 6, &[]),
            found(
                "p.events",
                4,
                &[("cleanup.policy", "compact"), ("retention.ms", "604800000")],
            ),
            found("p.snapshots", 6, &[("cleanup.policy", "compact,delete")]),
        ];
        let mismatch = |topic: &str, setting: &str, found: &str, required: &str| TopicMismatch {
            topic: topic.into(),
            setting: setting.into(),
            found: found.into(),
            required: required.into(),
            at_least: false,
        };
        assert_eq!(
            topic_mismatches(&t, &found, &[]),
            vec![
                mismatch("p.events", "partitions", "4", "6"),
                mismatch("p.events", "cleanup.policy", "compact", "delete"),
                mismatch("p.events", "retention.ms", "604800000", "-1"),
                mismatch("p.events", "retention.bytes", "(unset)", "-1"),
                mismatch("p.snapshots", "cleanup.policy", "compact,delete", "compact"),
            ]
        );
        let message = TopicError::Misconfigured {
            bootstrap: "k:9092".into(),
            mismatches: topic_mismatches(&t, &found, &[]),
        }
        .to_string();
        assert!(
            message.contains(
                "topic p.events: retention.ms is 604800000, required -1; fix: \
                 `kafka-configs.sh --bootstrap-server k:9092 --alter --entity-type topics \
                 --entity-name p.events --add-config retention.ms=-1`"
            ),
            "{message}"
        );
        assert!(
            message.contains("topic p.events: partitions is 4, required 6; fix:"),
            "{message}"
        );
    }

    #[test]
    fn a_retention_below_its_floor_is_a_mismatch_and_unlimited_is_enough() {
        let t = Topics::new("p");
        let week = Duration::from_secs(7 * 24 * 3600);
        let floors = [RetentionFloor {
            topic: "p.command-results".into(),
            at_least: week,
        }];
        let results = |ms: &str| {
            [found(
                "p.command-results",
                1,
                &[
                    ("cleanup.policy", "delete"),
                    ("retention.bytes", "-1"),
                    ("retention.ms", ms),
                ],
            )]
        };
        assert_eq!(topic_mismatches(&t, &results("604800000"), &floors), vec![]);
        assert_eq!(topic_mismatches(&t, &results("704800000"), &floors), vec![]);
        assert_eq!(topic_mismatches(&t, &results("-1"), &floors), vec![]);
        let compacted = [found(
            "p.command-results",
            1,
            &[
                ("cleanup.policy", "compact"),
                ("retention.bytes", "-1"),
                ("retention.ms", "-1"),
            ],
        )];
        let settings: Vec<String> = topic_mismatches(&t, &compacted, &floors)
            .into_iter()
            .map(|m| m.setting)
            .collect();
        assert_eq!(
            settings,
            vec!["cleanup.policy".to_string()],
            "compaction keeps only a command's latest result: a duplicate's original can vanish"
        );
        let capped = [found(
            "p.command-results",
            1,
            &[
                ("cleanup.policy", "delete"),
                ("retention.bytes", "1073741824"),
                ("retention.ms", "-1"),
            ],
        )];
        let settings: Vec<String> = topic_mismatches(&t, &capped, &floors)
            .into_iter()
            .map(|m| m.setting)
            .collect();
        assert_eq!(
            settings,
            vec!["retention.bytes".to_string()],
            "a size limit can delete results within the window"
        );
        let short = topic_mismatches(&t, &results("3600000"), &floors);
        assert_eq!(
            short,
            vec![TopicMismatch {
                topic: "p.command-results".into(),
                setting: "retention.ms".into(),
                found: "3600000".into(),
                required: "604800000".into(),
                at_least: true,
            }]
        );
        let message = TopicError::Misconfigured {
            bootstrap: "k:9092".into(),
            mismatches: short,
        }
        .to_string();
        assert!(
            message.contains(
                "topic p.command-results: retention.ms is 3600000, required at least 604800000; \
                 fix: `kafka-configs.sh --bootstrap-server k:9092 --alter --entity-type topics \
                 --entity-name p.command-results --add-config retention.ms=604800000`"
            ),
            "{message}"
        );
    }

    #[test]
    fn copartitioning_is_checked() {
        let ok = [("a".to_string(), 3), ("b".to_string(), 3)];
        assert_eq!(check_copartitioned(&ok).unwrap(), 3);
        let bad = [("a".to_string(), 3), ("b".to_string(), 4)];
        let err = check_copartitioned(&bad).unwrap_err().to_string();
        assert!(err.contains("a has 3") && err.contains("b has 4"), "{err}");
    }
}
