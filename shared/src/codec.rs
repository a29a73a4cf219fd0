//! The only module that knows the wire format of events: plain JSON envelopes, the Confluent
//! Schema Registry wire format (magic byte 0, 4-byte big-endian schema id, JSON) with one JSON
//! Schema per event type and version, and the Kafka headers that repeat the routing fields.
//!
//! Decoding accepts both formats whatever the configuration (without a registry, wire-format
//! bytes are read without schema validation), upcasts to the current schema version and checks
//! that the data fits the event type, so a decoded [`EventEnvelope`] is always usable.

use std::collections::HashMap;
use std::time::Duration;

use rdkafka::message::{Header, Headers, OwnedHeaders};
use schema_registry_converter::async_impl::json::{JsonDecoder, JsonEncoder};
use schema_registry_converter::async_impl::schema_registry::SrSettings;
use schema_registry_converter::error::SRCError;
use schema_registry_converter::schema_registry_common::{
    SchemaType, SubjectNameStrategy, SuppliedSchema,
};
use serde_json::{Value, json};

use crate::aggregate::{Aggregate, DomainEvent, EventDataError};
use crate::envelope::EventEnvelope;
use crate::upcast::{UpcastContext, UpcastError, Upcasters};

/// Header names that repeat envelope fields for routing without decoding.
pub mod header {
    /// The event type.
    pub const EVENT_TYPE: &str = "event_type";
    /// The schema version the value is written in.
    pub const SCHEMA_VERSION: &str = "schema_version";
    /// The aggregate version of the event.
    pub const AGGREGATE_VERSION: &str = "aggregate_version";
    /// The event id.
    pub const EVENT_ID: &str = "event_id";
    /// The command that caused the event (extension: lets readers de-duplicate commands).
    pub const COMMAND_ID: &str = "command_id";
}

/// Why bytes could not be read as an event. Every variant but a retriable
/// [`DecodeError::Registry`] means the message is poison: dead-letter it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The message has no value.
    #[error("empty message")]
    Empty,
    /// Starts like the Confluent wire format but is shorter than its 5-byte header.
    #[error("truncated wire-format header ({0} bytes)")]
    Truncated(usize),
    /// Neither a JSON object nor the Confluent wire format.
    #[error(
        "unknown format: first byte 0x{0:02x} is neither `{{` nor the wire-format magic byte 0"
    )]
    UnknownFormat(u8),
    /// The bytes are not valid JSON.
    #[error("invalid JSON: {0}")]
    NotJson(String),
    /// The schema registry could not resolve the schema id. Retry when `retriable`.
    #[error("schema registry, schema id {schema_id}: {message}")]
    Registry {
        /// The schema id of the message.
        schema_id: u32,
        /// What the registry client said.
        message: String,
        /// A transient failure (registry down): retry, never dead-letter.
        retriable: bool,
    },
    /// The event could not be upcast to the current schema version.
    #[error("upcast: {0}")]
    Upcast(#[from] UpcastError),
    /// The envelope lacks or mistypes a field.
    #[error("invalid envelope: {0}")]
    Envelope(String),
    /// The data does not fit the event type, or the type is unknown.
    #[error("{0}")]
    Data(#[from] EventDataError),
}

impl DecodeError {
    /// A stable code for dead-letter headers and metrics: its [`crate::dlq::DeadLetterCode`].
    pub fn code(&self) -> &'static str {
        crate::dlq::DeadLetterCode::from(self).as_str()
    }

    /// Whether trying again later may succeed (the registry was unreachable).
    pub fn is_retriable(&self) -> bool {
        matches!(
            self,
            DecodeError::Registry {
                retriable: true,
                ..
            }
        )
    }
}

/// Why an event could not be encoded.
#[derive(Debug, Clone, thiserror::Error)]
pub enum EncodeError {
    /// The registry refused or could not be reached; `retriable` says whether to try again.
    #[error("schema registry: {message}")]
    Registry {
        /// What the registry client said.
        message: String,
        /// A transient failure.
        retriable: bool,
    },
}

/// Wire format of the events this codec writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WireFormat {
    /// The envelope as plain JSON.
    Json,
    /// Confluent wire format through the schema registry.
    SchemaRegistry,
}

struct Registry {
    encoder: JsonEncoder,
    decoder: JsonDecoder,
}

/// Encodes and decodes event envelopes; one per process, shared (it caches schemas).
pub struct EventCodec {
    upcasters: Upcasters,
    context: UpcastContext,
    registry: Option<Registry>,
    /// The aggregate types it reads and writes, by `aggregate_type`.
    types: HashMap<&'static str, TypeEntry>,
}

/// What the codec knows of one aggregate type.
#[derive(Clone, Copy)]
struct TypeEntry {
    /// Checks that an envelope's `event_type` and `data` are an event of the type.
    check: fn(&EventEnvelope) -> Result<(), EventDataError>,
    /// The JSON Schema of an event type at a schema version (the whole envelope).
    schema: fn(&str, u32) -> Value,
}

impl TypeEntry {
    fn of<A: Aggregate>() -> Self {
        TypeEntry {
            check: |envelope| envelope.event_of::<A>().map(drop),
            schema: aggregate_schema::<A>,
        }
    }
}

impl std::fmt::Debug for EventCodec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventCodec")
            .field("format", &self.format())
            .field("context", &self.context)
            .finish()
    }
}

const MAGIC_BYTE: u8 = 0;

impl EventCodec {
    /// A plain-JSON codec serving no aggregate type yet ([`EventCodec::serving`] adds them);
    /// `default_currency` is the upcasting context of events that had none.
    pub fn plain(default_currency: &str) -> Self {
        EventCodec {
            upcasters: Upcasters::empty(),
            context: UpcastContext {
                currency: default_currency.to_owned(),
            },
            registry: None,
            types: HashMap::new(),
        }
    }

    /// The codec reading (and upcasting) the events of aggregate type `A` too.
    pub fn serving<A: Aggregate>(mut self) -> Self {
        self.upcasters.register_aggregate::<A>();
        for aggregate_type in A::TYPES {
            self.types.insert(aggregate_type, TypeEntry::of::<A>());
        }
        self
    }

    /// A codec that writes the Confluent wire format through the registry at `url` (a
    /// Confluent-compatible base URL such as `http://127.0.0.1:8081/apis/ccompat/v7`), reached
    /// with `access` (credentials, a private CA), serving no aggregate type yet.
    pub fn registry_backed(
        default_currency: &str,
        url: &str,
        access: &crate::config::RegistryAccess,
    ) -> Result<Self, EncodeError> {
        let mut builder = SrSettings::new_builder(url.trim_end_matches('/').to_owned());
        builder.set_timeout(Duration::from_secs(5));
        if let Some((user, password)) = &access.basic_auth {
            builder.set_basic_authorization(user, Some(password));
        }
        let mut client = reqwest_sr::Client::builder();
        if let Some(pem) = &access.ca_pem {
            let certs = reqwest_sr::Certificate::from_pem_bundle(pem).map_err(|e| {
                EncodeError::Registry {
                    message: format!("SCHEMA_REGISTRY_CA_FILE cannot be used: {e}"),
                    retriable: false,
                }
            })?;
            client = client.tls_certs_merge(certs);
        }
        let settings = builder.build_with(client).map_err(registry_encode_error)?;
        Ok(EventCodec {
            registry: Some(Registry {
                encoder: JsonEncoder::new(settings.clone()),
                decoder: JsonDecoder::new(settings),
            }),
            ..Self::plain(default_currency)
        })
    }

    /// Builds the codec the settings ask for (`SCHEMA_REGISTRY_URL` or plain JSON), serving no
    /// aggregate type yet.
    pub fn for_settings(settings: &crate::config::Settings) -> Result<Self, EncodeError> {
        match &settings.schema_registry_url {
            Some(url) => Self::registry_backed(
                &settings.default_currency,
                url,
                &settings.schema_registry_access,
            ),
            None => Ok(Self::plain(&settings.default_currency)),
        }
    }

    /// A new codec for `settings` serving the same aggregate types with the same upcasters,
    /// and a registry client of its own (which forgets the old one's cached answers).
    pub fn renewed(&self, settings: &crate::config::Settings) -> Result<Self, EncodeError> {
        Ok(EventCodec {
            upcasters: self.upcasters.clone(),
            types: self.types.clone(),
            ..Self::for_settings(settings)?
        })
    }

    /// The format this codec writes.
    pub fn format(&self) -> WireFormat {
        if self.registry.is_some() {
            WireFormat::SchemaRegistry
        } else {
            WireFormat::Json
        }
    }

    fn type_of(&self, envelope: &EventEnvelope) -> Result<&TypeEntry, EventDataError> {
        self.types
            .get(envelope.aggregate_type.as_str())
            .ok_or_else(|| {
                EventDataError::UnknownType(format!(
                    "{} of aggregate type {}, which this program does not serve",
                    envelope.event_type, envelope.aggregate_type
                ))
            })
    }

    /// The upcasters and their context, for downcasting on request.
    pub fn upcasters(&self) -> &Upcasters {
        &self.upcasters
    }

    /// Encodes an envelope for `topic` in this codec's format.
    pub async fn encode(
        &self,
        topic: &str,
        envelope: &EventEnvelope,
    ) -> Result<Vec<u8>, EncodeError> {
        let value = serde_json::to_value(envelope).unwrap_or(Value::Null);
        match &self.registry {
            None => Ok(value.to_string().into_bytes()),
            Some(registry) => {
                let schema = self
                    .type_of(envelope)
                    .map_err(|e| EncodeError::Registry {
                        message: e.to_string(),
                        retriable: false,
                    })?
                    .schema;
                let strategy = SubjectNameStrategy::TopicRecordNameStrategyWithSchema(
                    topic.to_owned(),
                    SuppliedSchema::new(
                        Some(record_name(
                            &envelope.aggregate_type,
                            &envelope.event_type,
                            envelope.schema_version,
                        )),
                        SchemaType::Json,
                        schema(&envelope.event_type, envelope.schema_version).to_string(),
                    ),
                );
                registry
                    .encoder
                    .encode(&value, strategy)
                    .await
                    .map_err(|e| {
                        // The client caches a refusal as final; the writer retries every
                        // registry failure (a restarted registry answers 404 for a while), so
                        // the retry must ask again.
                        registry.encoder.remove_errors_from_cache();
                        registry_encode_error(e)
                    })
            }
        }
    }

    /// Decodes bytes of either format into a current-version envelope whose data fits its type.
    pub async fn decode(&self, bytes: &[u8]) -> Result<EventEnvelope, DecodeError> {
        let raw = match self.split(bytes)? {
            Framing::Json(json) => parse_json(json)?,
            Framing::Wire { schema_id, json } => match &self.registry {
                None => parse_json(json)?,
                Some(registry) => {
                    let decoded = match registry.decoder.decode(Some(bytes)).await {
                        Ok(decoded) => decoded,
                        Err(e) => {
                            let retriable = registry_error_is_transient(&e);
                            if retriable && !e.retriable {
                                // The client cached it as final: forget it so the retry asks again.
                                registry.decoder.remove_errors_from_cache();
                            }
                            return Err(DecodeError::Registry {
                                schema_id,
                                message: format!("{e}"),
                                retriable,
                            });
                        }
                    };
                    decoded.map(|d| d.value).ok_or(DecodeError::Empty)?
                }
            },
        };
        self.from_raw(raw)
    }

    /// Decodes a plain JSON envelope (any schema version) without touching the network.
    pub fn decode_json(&self, bytes: &[u8]) -> Result<EventEnvelope, DecodeError> {
        match self.split(bytes)? {
            Framing::Json(json) | Framing::Wire { json, .. } => self.from_raw(parse_json(json)?),
        }
    }

    /// Upcasts a raw JSON envelope of any version and checks it.
    pub fn from_raw(&self, raw: Value) -> Result<EventEnvelope, DecodeError> {
        let current = self.upcasters.upcast(raw, &self.context)?;
        let envelope: EventEnvelope =
            serde_json::from_value(current).map_err(|e| DecodeError::Envelope(e.to_string()))?;
        if envelope.version == 0 {
            return Err(DecodeError::Envelope("version must be 1 or more".into()));
        }
        if envelope.aggregate_id.is_empty() {
            return Err(DecodeError::Envelope(
                "aggregate_id must not be empty".into(),
            ));
        }
        (self.type_of(&envelope)?.check)(&envelope)?;
        Ok(envelope)
    }

    /// The envelope as JSON at an older schema version, for old consumers. `currency` is the
    /// account's (it decides the decimals of v1 amounts).
    pub fn downcast(
        &self,
        envelope: &EventEnvelope,
        target: u32,
        currency: &str,
    ) -> Result<Value, UpcastError> {
        let value = serde_json::to_value(envelope).unwrap_or(Value::Null);
        let ctx = UpcastContext {
            currency: currency.to_owned(),
        };
        self.upcasters.downcast(value, target, &ctx)
    }

    fn split<'a>(&self, bytes: &'a [u8]) -> Result<Framing<'a>, DecodeError> {
        let first = bytes.iter().copied().find(|b| !b.is_ascii_whitespace());
        match (bytes.first(), first) {
            (None, _) => Err(DecodeError::Empty),
            (Some(&MAGIC_BYTE), _) => {
                if bytes.len() < 5 {
                    return Err(DecodeError::Truncated(bytes.len()));
                }
                let schema_id = u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]);
                Ok(Framing::Wire {
                    schema_id,
                    json: &bytes[5..],
                })
            }
            (_, Some(b'{')) => Ok(Framing::Json(bytes)),
            (_, Some(other)) => Err(DecodeError::UnknownFormat(other)),
            (_, None) => Err(DecodeError::Empty),
        }
    }
}

enum Framing<'a> {
    Json(&'a [u8]),
    Wire { schema_id: u32, json: &'a [u8] },
}

fn parse_json(bytes: &[u8]) -> Result<Value, DecodeError> {
    serde_json::from_slice(bytes).map_err(|e| DecodeError::NotJson(e.to_string()))
}

fn registry_encode_error(e: SRCError) -> EncodeError {
    EncodeError::Registry {
        retriable: registry_error_is_transient(&e),
        message: format!("{e}"),
    }
}

/// Whether a registry failure may go away by itself. The client library calls only 502 and
/// 503 retriable; a registry also answers 500 (its store is unavailable), 504 (a proxy),
/// 408, 429, 401 and 403 (credentials being rotated) in an outage. Only an answer about the
/// schema itself — 400/409/422 (invalid, incompatible), 404 (no such id) — or an unreadable
/// payload is final.
fn registry_error_is_transient(e: &SRCError) -> bool {
    if e.retriable {
        return true;
    }
    let text = format!("{e}");
    let status = text
        .split("with status ")
        .nth(1)
        .and_then(|rest| rest.get(..3)?.parse::<u16>().ok());
    !matches!(status, Some(400 | 404 | 409 | 422) | None)
}

/// The headers written with every event.
pub fn event_headers(envelope: &EventEnvelope) -> OwnedHeaders {
    let schema_version = envelope.schema_version.to_string();
    let version = envelope.version.to_string();
    let event_id = envelope.event_id.to_string();
    let mut headers = OwnedHeaders::new()
        .insert(Header {
            key: header::EVENT_TYPE,
            value: Some(envelope.event_type.as_str()),
        })
        .insert(Header {
            key: header::SCHEMA_VERSION,
            value: Some(schema_version.as_str()),
        })
        .insert(Header {
            key: header::AGGREGATE_VERSION,
            value: Some(version.as_str()),
        })
        .insert(Header {
            key: header::EVENT_ID,
            value: Some(event_id.as_str()),
        });
    if let Some(command_id) = envelope.causation_id() {
        let command_id = command_id.to_string();
        headers = headers.insert(Header {
            key: header::COMMAND_ID,
            value: Some(command_id.as_str()),
        });
    }
    headers
}

/// The value of the first header called `name`, as UTF-8 text.
pub fn header_str<'a, H: Headers>(headers: Option<&'a H>, name: &str) -> Option<&'a str> {
    headers?
        .iter()
        .find(|h| h.key == name)
        .and_then(|h| h.value)
        .and_then(|v| std::str::from_utf8(v).ok())
}

/// The JSON Schema of an event type of `A` at a schema version (the whole envelope): its `data`
/// as [`Aggregate::event_schema`] gives it, an open object for a version it does not know.
pub fn aggregate_schema<A: Aggregate>(event_type: &str, schema_version: u32) -> Value {
    let data =
        A::event_schema(event_type, schema_version).unwrap_or_else(|| json!({"type": "object"}));
    envelope_schema(
        A::event_aggregate_type(event_type),
        event_type,
        schema_version,
        data,
    )
}

/// The envelope around an event type's `data` schema.
fn envelope_schema(
    aggregate_type: &str,
    event_type: &str,
    schema_version: u32,
    data: Value,
) -> Value {
    json!({
        "$schema": "http://json-schema.org/draft-07/schema#",
        "title": record_name(aggregate_type, event_type, schema_version),
        "type": "object",
        "required": ["event_id", "aggregate_id", "aggregate_type", "event_type",
                     "schema_version", "version", "timestamp", "data"],
        "properties": {
            "event_id": {"type": "string", "format": "uuid"},
            "aggregate_id": {"type": "string", "minLength": 1},
            "aggregate_type": {"const": aggregate_type},
            "event_type": {"const": event_type},
            "schema_version": {"const": schema_version},
            "version": {"type": "integer", "minimum": 1},
            "timestamp": {"type": "string", "format": "date-time"},
            "metadata": {"type": "object"},
            "data": data
        }
    })
}

/// The record name of any aggregate type's event schema: `<AggregateType>.<EventType>.v<N>`.
pub fn record_name(aggregate_type: &str, event_type: &str, schema_version: u32) -> String {
    format!("{aggregate_type}.{event_type}.v{schema_version}")
}

/// Every event type's schema of `A` at its current version, by record name.
pub fn schemas_of<A: Aggregate>() -> Vec<(String, Value)> {
    A::Event::TYPES
        .iter()
        .map(|t| {
            (
                record_name(A::event_aggregate_type(t), t, A::SCHEMA_VERSION),
                aggregate_schema::<A>(t, A::SCHEMA_VERSION),
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    // Regression: a registry answering 500 or 504 during an outage was taken as final, and the
    // projection dead-lettered valid events.
    #[test]
    fn registry_outages_are_transient_and_answers_about_the_schema_are_final() {
        let http = |status: &str| {
            SRCError::new(
                &format!("HTTP request to schema registry failed with status {status}"),
                None,
                false,
            )
        };
        for status in [
            "500 Internal Server Error",
            "504 Gateway Timeout",
            "429 Too Many Requests",
            "401 Unauthorized",
        ] {
            assert!(registry_error_is_transient(&http(status)), "{status}");
        }
        for status in [
            "404 Not Found",
            "422 Unprocessable Entity",
            "400 Bad Request",
        ] {
            assert!(!registry_error_is_transient(&http(status)), "{status}");
        }
        assert!(registry_error_is_transient(&SRCError::new(
            "connection refused",
            None,
            true
        )));
        assert!(!registry_error_is_transient(&SRCError::new(
            "could not create value from bytes",
            None,
            false
        )));
    }
}
