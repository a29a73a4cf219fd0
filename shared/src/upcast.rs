//! Schema evolution of events: upcasting old envelopes to the current schema version on read,
//! and downcasting current events for old consumers.
//!
//! Each step is a small function registered per (event type, from-version) that rewrites the
//! `data` of one version into the next (or previous) one, so adding v3 adds steps and touches no
//! old one. Steps run on raw JSON before anything is deserialised. The seed's v1 envelope shape
//! (`id` instead of `event_id`, no `schema_version`, zone-less timestamps) is normalised first.

use std::collections::HashMap;

use chrono::{DateTime, NaiveDateTime, Utc};
use serde_json::{Map, Value, json};

use crate::envelope::CURRENT_SCHEMA_VERSION;
use crate::money::AmountError;

/// What upcasting or downcasting needs to know besides the event itself.
#[derive(Debug, Clone)]
pub struct UpcastContext {
    /// Currency of v1 events, which had none (`DEFAULT_CURRENCY`); for downcasting, the
    /// account's currency, which decides how many decimals v1 amounts get.
    pub currency: String,
}

impl Default for UpcastContext {
    fn default() -> Self {
        UpcastContext {
            currency: "USD".into(),
        }
    }
}

/// Why an event could not be brought to the wanted schema version.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UpcastError {
    /// No step is registered for this event type at this version.
    #[error("no {direction} step for {event_type} from schema version {from}")]
    NoStep {
        /// `upcast` or `downcast`.
        direction: &'static str,
        /// The event type.
        event_type: String,
        /// The version the event was at.
        from: u32,
    },
    /// The event is newer than this program understands.
    #[error("schema version {0} is newer than the supported {1}")]
    FromTheFuture(u32, u32),
    /// A v1 amount that is not an exact number of minor units.
    #[error("field `{field}`: {source}")]
    Amount {
        /// Which data field.
        field: &'static str,
        /// What is wrong with it.
        source: AmountError,
    },
    /// A v1 amount below zero: v1 events never carried one, so it is poison, not a withdrawal.
    #[error("field `{field}`: `{text}` is negative")]
    NegativeAmount {
        /// Which data field.
        field: &'static str,
        /// The amount as written.
        text: String,
    },
    /// The envelope or data lacks something a step needs.
    #[error("{0}")]
    Invalid(String),
}

/// One step: rewrites an event's `data` from one schema version to the adjacent one.
pub type Step = fn(&mut Map<String, Value>, &UpcastContext) -> Result<(), UpcastError>;

/// The registry of upcasting and downcasting steps.
#[derive(Clone)]
pub struct Upcasters {
    /// Steps by (aggregate type, event type, version they start from).
    up: HashMap<(String, String, u32), Step>,
    down: HashMap<(String, String, u32), Step>,
    /// The current schema version per aggregate type (absent: [`CURRENT_SCHEMA_VERSION`]).
    current: HashMap<String, u32>,
}

impl std::fmt::Debug for Upcasters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upcasters")
            .field("up", &self.up.keys().collect::<Vec<_>>())
            .field("down", &self.down.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Upcasters {
    /// No steps at all.
    pub fn empty() -> Self {
        Upcasters {
            up: HashMap::new(),
            down: HashMap::new(),
            current: HashMap::new(),
        }
    }

    /// Registers an aggregate type: its current schema version and its steps.
    pub fn register_aggregate<A: crate::aggregate::Aggregate>(&mut self) {
        for aggregate_type in A::TYPES {
            self.current
                .insert((*aggregate_type).to_owned(), A::SCHEMA_VERSION);
        }
        A::register_upcasters(self);
    }

    /// Registers the step that takes `event_type` of `aggregate_type` from `from` to `from + 1`.
    pub fn register_up(&mut self, aggregate_type: &str, event_type: &str, from: u32, step: Step) {
        let key = (aggregate_type.to_owned(), event_type.to_owned(), from);
        self.up.insert(key, step);
    }

    /// Registers the step that takes `event_type` of `aggregate_type` from `from` to `from - 1`.
    pub fn register_down(&mut self, aggregate_type: &str, event_type: &str, from: u32, step: Step) {
        let key = (aggregate_type.to_owned(), event_type.to_owned(), from);
        self.down.insert(key, step);
    }

    /// Brings a raw envelope of any known version to its aggregate type's current version
    /// ([`CURRENT_SCHEMA_VERSION`] for the bank account and unregistered types).
    pub fn upcast(&self, envelope: Value, ctx: &UpcastContext) -> Result<Value, UpcastError> {
        let mut env = match envelope {
            Value::Object(map) => map,
            other => {
                return Err(UpcastError::Invalid(format!(
                    "envelope is not an object: {other}"
                )));
            }
        };
        normalize_envelope(&mut env)?;
        let mut version = schema_version(&env)?;
        let aggregate_type = aggregate_type(&env);
        let current = self
            .current
            .get(&aggregate_type)
            .copied()
            .unwrap_or(CURRENT_SCHEMA_VERSION);
        if version > current {
            return Err(UpcastError::FromTheFuture(version, current));
        }
        let event_type = event_type(&env)?;
        while version < current {
            let step = find_step(&self.up, "upcast", &aggregate_type, &event_type, version)?;
            step(data_mut(&mut env)?, ctx)?;
            version += 1;
        }
        env.insert("schema_version".into(), json!(version));
        Ok(Value::Object(env))
    }

    /// Takes a current envelope down to schema version `target` for old consumers. Version 1
    /// also gets the seed's envelope shape (`id`, no `schema_version`).
    pub fn downcast(
        &self,
        envelope: Value,
        target: u32,
        ctx: &UpcastContext,
    ) -> Result<Value, UpcastError> {
        let Value::Object(mut env) = envelope else {
            return Err(UpcastError::Invalid("envelope is not an object".into()));
        };
        let mut version = schema_version(&env)?;
        let aggregate_type = aggregate_type(&env);
        let event_type = event_type(&env)?;
        if target == 0 || target > version {
            return Err(UpcastError::Invalid(format!(
                "cannot downcast from schema version {version} to {target}"
            )));
        }
        while version > target {
            let step = find_step(
                &self.down,
                "downcast",
                &aggregate_type,
                &event_type,
                version,
            )?;
            step(data_mut(&mut env)?, ctx)?;
            version -= 1;
        }
        if version == 1 {
            env.remove("schema_version");
            if let Some(id) = env.remove("event_id") {
                env.insert("id".into(), id);
            }
        } else {
            env.insert("schema_version".into(), json!(version));
        }
        Ok(Value::Object(env))
    }
}

/// The step of `table` for (aggregate type, event type, version), or why there is none.
fn find_step(
    table: &HashMap<(String, String, u32), Step>,
    direction: &'static str,
    aggregate_type: &str,
    event_type: &str,
    version: u32,
) -> Result<Step, UpcastError> {
    let key = (aggregate_type.to_owned(), event_type.to_owned(), version);
    table.get(&key).copied().ok_or_else(|| UpcastError::NoStep {
        direction,
        event_type: event_type.to_owned(),
        from: version,
    })
}

/// Seed-era envelopes: `id` → `event_id`, absent `schema_version` → 1, a zone-less timestamp is
/// UTC. Harmless on current envelopes.
fn normalize_envelope(env: &mut Map<String, Value>) -> Result<(), UpcastError> {
    if !env.contains_key("event_id")
        && let Some(id) = env.remove("id")
    {
        env.insert("event_id".into(), id);
    }
    if !env.contains_key("schema_version") {
        env.insert("schema_version".into(), json!(1));
    }
    if let Some(Value::String(ts)) = env.get("timestamp")
        && DateTime::parse_from_rfc3339(ts).is_err()
    {
        let naive = NaiveDateTime::parse_from_str(ts, "%Y-%m-%dT%H:%M:%S%.f")
            .or_else(|_| NaiveDateTime::parse_from_str(ts, "%Y-%m-%d %H:%M:%S%.f"))
            .map_err(|e| UpcastError::Invalid(format!("timestamp `{ts}`: {e}")))?;
        let utc: DateTime<Utc> = naive.and_utc();
        env.insert("timestamp".into(), json!(utc.to_rfc3339()));
    }
    Ok(())
}

fn schema_version(env: &Map<String, Value>) -> Result<u32, UpcastError> {
    env.get("schema_version")
        .and_then(Value::as_u64)
        .and_then(|v| u32::try_from(v).ok())
        .ok_or_else(|| {
            UpcastError::Invalid("schema_version is not a small positive integer".into())
        })
}

/// The envelope's `aggregate_type` (empty when it has none: no type's steps apply).
fn aggregate_type(env: &Map<String, Value>) -> String {
    env.get("aggregate_type")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned()
}

fn event_type(env: &Map<String, Value>) -> Result<String, UpcastError> {
    env.get("event_type")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .ok_or_else(|| UpcastError::Invalid("event_type is missing".into()))
}

fn data_mut(env: &mut Map<String, Value>) -> Result<&mut Map<String, Value>, UpcastError> {
    env.entry("data")
        .or_insert_with(|| json!({}))
        .as_object_mut()
        .ok_or_else(|| UpcastError::Invalid("data is not an object".into()))
}
