//! The bank account on the wire: its upcasting steps (v1 ↔ v2), and the bank-account defaults
//! of the generic codec, registry and upcasters ([`EventCodec::json`],
//! [`EventCodec::from_settings`], [`Upcasters::standard`], [`prepare`]…), which the services,
//! the CLI and the tools use. The machinery itself only knows [`crate::aggregate::Aggregate`].

use serde_json::{Map, Number, Value, json};

use super::{AGGREGATE_TYPE, BankAccount};
use crate::codec::{EncodeError, EventCodec, aggregate_schema, record_name, schemas_of};
use crate::money::{format_minor, minor_digits, parse_minor};
use crate::registry::{RegistryError, prepare_for, record_subject};
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
        u.register_aggregate::<BankAccount>();
        u
    }
}

impl Default for Upcasters {
    fn default() -> Self {
        Self::standard()
    }
}

/// Codecs serving the bank account (the services' default).
impl EventCodec {
    /// A plain-JSON codec of bank-account events; v1 events get `default_currency`.
    pub fn json(default_currency: &str) -> Self {
        Self::plain(default_currency).serving::<BankAccount>()
    }

    /// A codec of bank-account events writing the Confluent wire format through the registry
    /// at `url` (see [`EventCodec::registry_backed`]).
    pub fn with_registry(default_currency: &str, url: &str) -> Result<Self, EncodeError> {
        Ok(Self::registry_backed(default_currency, url)?.serving::<BankAccount>())
    }

    /// The bank-account codec the settings ask for (see [`EventCodec::for_settings`]).
    pub fn from_settings(settings: &crate::config::Settings) -> Result<Self, EncodeError> {
        Ok(Self::for_settings(settings)?.serving::<BankAccount>())
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

/// Every bank-account event type's schema at the current version, for tools that register them
/// up front.
pub fn current_schemas() -> Vec<(String, Value)> {
    schemas_of::<BankAccount>()
}

/// The registry subject of a bank-account event type's schema at a schema version, for events
/// on `topic`.
pub fn subject(topic: &str, event_type: &str, schema_version: u32) -> String {
    record_subject(topic, &schema_name(event_type, schema_version))
}

/// Registers every current bank-account event schema for `topic` ([`prepare_for`]).
pub async fn prepare(url: &str, topic: &str) -> Result<Vec<(String, u32)>, RegistryError> {
    prepare_for::<BankAccount>(url, topic).await
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
