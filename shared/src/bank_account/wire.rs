//! The bank account on the wire: its upcasting steps (v1 ↔ v2), and the bank-account defaults
//! of the generic codec, registry and upcasters ([`EventCodec::json`],
//! [`EventCodec::from_settings`], [`Upcasters::standard`], [`prepare`]…), which the services,
//! the CLI and the tools use. The machinery itself only knows [`crate::aggregate::Aggregate`].

use serde_json::{Map, Number, Value, json};

use super::{AGGREGATE_TYPE, BankAccount};
use crate::codec::{EncodeError, EventCodec, aggregate_schema, record_name, schemas_of};
use crate::money::{format_minor, minor_digits, parse_minor};
use crate::registry::{RegistryError, SchemaRegistry, prepare_for, record_subject};
use crate::upcast::{UpcastContext, UpcastError, Upcasters};

/// The bank account's steps (its [`crate::aggregate::Aggregate::register_upcasters`]).
pub(super) fn register_upcasters(u: &mut Upcasters) {
    let bank = AGGREGATE_TYPE;
    u.register_up(bank, "AccountOpened", 1, v1_to_v2::account_opened);
    u.register_up(bank, "MoneyDeposited", 1, v1_to_v2::amount);
    u.register_up(bank, "MoneyWithdrawn", 1, v1_to_v2::amount);
    u.register_up(bank, "AccountClosed", 1, |_, _| Ok(()));
    u.register_down(bank, "AccountOpened", 2, v2_to_v1::account_opened);
    u.register_down(bank, "MoneyDeposited", 2, v2_to_v1::amount);
    u.register_down(bank, "MoneyWithdrawn", 2, v2_to_v1::amount);
    u.register_down(bank, "AccountClosed", 2, |_, _| Ok(()));
}

/// The bank account's upcasters as the default.
impl Upcasters {
    /// The steps of the bank-account events: v1 ↔ v2.
    pub fn standard() -> Self {
        let mut u = Self::empty();
        u.register_aggregate::<crate::bank::Bank>();
        u
    }
}

impl Default for Upcasters {
    fn default() -> Self {
        Self::standard()
    }
}

/// Codecs serving the bank: accounts and transfers (the services' default).
impl EventCodec {
    /// A plain-JSON codec of the bank's events; v1 events get `default_currency`.
    pub fn json(default_currency: &str) -> Self {
        Self::plain(default_currency).serving::<crate::bank::Bank>()
    }

    /// A codec of bank-account events writing the Confluent wire format through the registry
    /// at `url` (see [`EventCodec::registry_backed`]).
    pub fn with_registry(default_currency: &str, url: &str) -> Result<Self, EncodeError> {
        let access = crate::config::RegistryAccess::default();
        Ok(Self::registry_backed(default_currency, url, &access)?.serving::<crate::bank::Bank>())
    }

    /// The bank-account codec the settings ask for (see [`EventCodec::for_settings`]).
    pub fn from_settings(settings: &crate::config::Settings) -> Result<Self, EncodeError> {
        Ok(Self::for_settings(settings)?.serving::<crate::bank::Bank>())
    }
}

/// The JSON Schema of one bank-account event type at one schema version (the whole envelope),
/// older versions included.
pub fn json_schema(event_type: &str, schema_version: u32) -> Value {
    aggregate_schema::<BankAccount>(event_type, schema_version)
}

/// The record name of a bank-account event type's schema: `BankAccount.<EventType>.v<N>`; the
/// registry subject is `<topic>-<record name>` (TopicRecordNameStrategy).
pub fn schema_name(event_type: &str, schema_version: u32) -> String {
    record_name(AGGREGATE_TYPE, event_type, schema_version)
}

/// Every event type's schema of the bank (accounts and transfers) at the current version, for
/// tools that register them up front.
pub fn current_schemas() -> Vec<(String, Value)> {
    schemas_of::<crate::bank::Bank>()
}

/// The registry subject of a bank-account event type's schema at a schema version, for events
/// on `topic`.
pub fn subject(topic: &str, event_type: &str, schema_version: u32) -> String {
    record_subject(topic, &schema_name(event_type, schema_version))
}

/// Registers every current event schema of the bank (accounts and transfers) for `topic`
/// ([`prepare_for`]).
pub async fn prepare(url: &str, topic: &str) -> Result<Vec<(String, u32)>, RegistryError> {
    prepare_for::<crate::bank::Bank>(&SchemaRegistry::new(url)?, topic).await
}

/// Reads a decimal amount in major units from a JSON number (or numeric string), exactly. It
/// must fit an `i64` of minor units and must not be negative.
fn major_to_minor(
    data: &Map<String, Value>,
    field: &'static str,
    currency: &str,
) -> Result<i64, UpcastError> {
    let text = match data.get(field) {
        Some(Value::Number(n)) => n.to_string(),
        Some(Value::String(s)) => s.clone(),
        None => return Err(UpcastError::Invalid(format!("field `{field}` is missing"))),
        Some(other) => {
            return Err(UpcastError::Invalid(format!(
                "field `{field}` is not a number: {other}"
            )));
        }
    };
    let minor = parse_minor(&text, minor_digits(currency))
        .map_err(|source| UpcastError::Amount { field, source })?;
    if minor < 0 {
        return Err(UpcastError::NegativeAmount { field, text });
    }
    Ok(minor)
}

/// Writes minor units as a JSON number in major units ("50.5" stays exact, as text).
fn minor_to_major(minor: i64, currency: &str) -> Result<Value, UpcastError> {
    let text = format_minor(minor, minor_digits(currency));
    serde_json::from_str::<Number>(&text)
        .map(Value::Number)
        .map_err(|e| UpcastError::Invalid(format!("amount {text}: {e}")))
}

fn minor_field(data: &Map<String, Value>, field: &str) -> Result<i64, UpcastError> {
    data.get(field)
        .and_then(Value::as_i64)
        .ok_or_else(|| UpcastError::Invalid(format!("field `{field}` is not an integer")))
}

mod v1_to_v2 {
    use super::*;

    pub(super) fn account_opened(
        data: &mut Map<String, Value>,
        ctx: &UpcastContext,
    ) -> Result<(), UpcastError> {
        let owner = data.remove("name").unwrap_or(Value::Null);
        if !owner.is_string() {
            return Err(UpcastError::Invalid(
                "AccountOpened v1 has no string `name`".into(),
            ));
        }
        let initial = match data.contains_key("initial_balance") {
            true => major_to_minor(data, "initial_balance", &ctx.currency)?,
            false => 0,
        };
        data.remove("initial_balance");
        data.insert("owner".into(), owner);
        data.insert("currency".into(), json!(ctx.currency));
        data.insert("initial_balance_minor".into(), json!(initial));
        Ok(())
    }

    pub(super) fn amount(
        data: &mut Map<String, Value>,
        ctx: &UpcastContext,
    ) -> Result<(), UpcastError> {
        let minor = major_to_minor(data, "amount", &ctx.currency)?;
        data.remove("amount");
        data.insert("amount_minor".into(), json!(minor));
        Ok(())
    }
}

mod v2_to_v1 {
    use super::*;

    pub(super) fn account_opened(
        data: &mut Map<String, Value>,
        _ctx: &UpcastContext,
    ) -> Result<(), UpcastError> {
        let currency = data
            .get("currency")
            .and_then(Value::as_str)
            .unwrap_or("USD")
            .to_owned();
        let initial = minor_field(data, "initial_balance_minor")?;
        let owner = data.remove("owner").unwrap_or(Value::Null);
        data.clear();
        data.insert("name".into(), owner);
        data.insert(
            "initial_balance".into(),
            minor_to_major(initial, &currency)?,
        );
        Ok(())
    }

    pub(super) fn amount(
        data: &mut Map<String, Value>,
        ctx: &UpcastContext,
    ) -> Result<(), UpcastError> {
        let minor = minor_field(data, "amount_minor")?;
        data.clear();
        data.insert("amount".into(), minor_to_major(minor, &ctx.currency)?);
        Ok(())
    }
}

/// The bank account's steps through the upcasters (v1 ↔ v2, the seed's envelope shape).
#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::CURRENT_SCHEMA_VERSION;
    use crate::upcast::UpcastError;

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

    #[test]
    fn subjects_follow_the_topic_record_name_strategy() {
        assert_eq!(
            subject("bank.events", "AccountOpened", 2),
            "bank.events-BankAccount.AccountOpened.v2"
        );
    }
}
