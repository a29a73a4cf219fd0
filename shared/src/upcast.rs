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
        self.current.insert(A::TYPE.to_owned(), A::SCHEMA_VERSION);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> UpcastContext {
        UpcastContext::default()
    }

    fn v1(event_type: &str, data: &str) -> Value {
        serde_json::from_str(&format!(
            r#"{{"id":"a6a3a450-6513-270e-269e-0d37f2a74de4","aggregate_id":"a","aggregate_type":"BankAccount",
            "event_type":"{event_type}","data":{data},"metadata":{{}},"version":1,
            "timestamp":"2025-03-01T00:01:00.098702"}}"#
        ))
        .unwrap()
    }

    #[test]
    fn steps_are_per_aggregate_type() {
        let mut u = Upcasters::standard();
        // Another type with an event of the same name and a step that always fails.
        u.register_up("Other", "MoneyDeposited", 1, |_, _| {
            Err(UpcastError::Invalid("the other type's step".into()))
        });
        let bank = u
            .upcast(v1("MoneyDeposited", r#"{"amount": 1.5}"#), &ctx())
            .unwrap();
        assert_eq!(bank["data"]["amount_minor"], 150, "the bank's own step ran");
        let mut other = v1("MoneyDeposited", r#"{"amount": 1.5}"#);
        other["aggregate_type"] = json!("Other");
        assert_eq!(
            u.upcast(other, &ctx()),
            Err(UpcastError::Invalid("the other type's step".into()))
        );
    }

    #[test]
    fn v1_envelope_is_normalised() {
        let up = Upcasters::standard()
            .upcast(v1("AccountClosed", "{}"), &ctx())
            .unwrap();
        assert_eq!(up["event_id"], "a6a3a450-6513-270e-269e-0d37f2a74de4");
        assert_eq!(up["schema_version"], 2);
        assert_eq!(up["timestamp"], "2025-03-01T00:01:00.098702+00:00");
        assert!(up.get("id").is_none());
    }

    #[test]
    fn v1_amounts_convert_exactly_in_any_number_form() {
        let u = Upcasters::standard();
        for (text, minor) in [
            ("0.1", 10),
            ("0.2", 20),
            ("1e2", 10000),
            ("2.5E-1", 25),
            ("33.33", 3333),
            ("7", 700),
        ] {
            let up = u
                .upcast(
                    v1("MoneyDeposited", &format!(r#"{{"amount":{text}}}"#)),
                    &ctx(),
                )
                .unwrap();
            assert_eq!(up["data"], json!({"amount_minor": minor}), "{text}");
        }
    }

    #[test]
    fn v1_amount_with_three_decimals_is_an_error_not_a_rounding() {
        let err = Upcasters::standard()
            .upcast(v1("MoneyWithdrawn", r#"{"amount":1.005}"#), &ctx())
            .unwrap_err();
        assert!(
            matches!(
                err,
                UpcastError::Amount {
                    field: "amount",
                    ..
                }
            ),
            "{err}"
        );
    }

    // Regression (issue 9, defect 5): a v1 amount of `1e999999999999` aborted both services
    // on every start; a negative one was upcast into a negative deposit or opening balance.
    #[test]
    fn v1_amounts_that_are_no_i64_of_minor_units_or_negative_are_errors() {
        let u = Upcasters::standard();
        let max = "92233720368547758.07";
        let above = "92233720368547758.08";
        let huge_mantissa = "9".repeat(10_000);
        for (event_type, field, text) in [
            ("MoneyDeposited", "amount", "1e999999999999"),
            ("MoneyDeposited", "amount", "1e-999999999999"),
            ("MoneyWithdrawn", "amount", huge_mantissa.as_str()),
            ("MoneyDeposited", "amount", above),
            ("MoneyDeposited", "amount", "-5.00"),
            ("MoneyWithdrawn", "amount", "-0.01"),
            ("AccountOpened", "initial_balance", "-5.00"),
            ("AccountOpened", "initial_balance", "1e999999999999"),
        ] {
            let data = format!(r#"{{"name":"A","{field}":{text}}}"#);
            let err = u.upcast(v1(event_type, &data), &ctx()).unwrap_err();
            assert!(
                matches!(
                    &err,
                    UpcastError::Amount { field: f, .. } | UpcastError::NegativeAmount { field: f, .. }
                        if *f == field
                ),
                "{event_type} {text}: {err}"
            );
        }
        let up = u
            .upcast(
                v1("MoneyDeposited", &format!(r#"{{"amount":{max}}}"#)),
                &ctx(),
            )
            .unwrap();
        assert_eq!(up["data"], json!({"amount_minor": i64::MAX}));
    }

    #[test]
    fn v1_open_gets_owner_and_default_currency() {
        let ctx = UpcastContext {
            currency: "EUR".into(),
        };
        let up = Upcasters::standard()
            .upcast(
                v1("AccountOpened", r#"{"name":"Zoë","initial_balance":50.5}"#),
                &ctx,
            )
            .unwrap();
        assert_eq!(
            up["data"],
            json!({"owner":"Zoë","currency":"EUR","initial_balance_minor":5050})
        );
    }

    #[test]
    fn unknown_type_at_old_version_has_no_step() {
        let err = Upcasters::standard()
            .upcast(v1("Frobnicated", "{}"), &ctx())
            .unwrap_err();
        assert!(matches!(err, UpcastError::NoStep { .. }));
    }

    #[test]
    fn future_versions_are_refused() {
        let mut env = v1("AccountClosed", "{}");
        env["schema_version"] = json!(9);
        assert_eq!(
            Upcasters::standard().upcast(env, &ctx()),
            Err(UpcastError::FromTheFuture(9, CURRENT_SCHEMA_VERSION))
        );
    }

    #[test]
    fn downcast_gives_the_seed_shape_back() {
        let u = Upcasters::standard();
        let original = v1(
            "AccountOpened",
            r#"{"name":"Alice","initial_balance":50.5}"#,
        );
        let current = u.upcast(original, &ctx()).unwrap();
        let old = u.downcast(current.clone(), 1, &ctx()).unwrap();
        assert_eq!(old["data"]["name"], "Alice");
        assert_eq!(old["data"]["initial_balance"].to_string(), "50.50");
        assert_eq!(old["id"], current["event_id"]);
        assert!(old.get("schema_version").is_none());
        // and back up again to the same current event
        assert_eq!(u.upcast(old, &ctx()).unwrap(), current);
    }
}
