//! Administration of the schema registry (Confluent API): every event schema of the current
//! version registered up front under its subject, and a compatibility rule per subject, so that
//! the registry itself refuses an incompatible change to an event schema.
//!
//! Subjects follow the codec's TopicRecordNameStrategy: `<topic>-<AggregateType>.<EventType>.v<N>`.
//! The schema version is part of the record name, so the v1 → v2 change (a new required
//! `currency`, amounts in minor units) is a new subject bridged by the upcasters, not a new
//! version of the v1 subject — which the [`COMPATIBILITY`] rule would refuse. Within a subject,
//! only backward-compatible changes (say, an optional field) are accepted.

use std::time::Duration;

use serde_json::{Value, json};

use crate::config::RegistryAccess;

/// The compatibility level set on every event subject: a new schema must read what the previous
/// one wrote.
pub const COMPATIBILITY: &str = "BACKWARD";
/// The content type of the Confluent API.
const CONTENT_TYPE: &str = "application/vnd.schemaregistry.v1+json";

/// Why the registry could not be prepared.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    /// The registry did not answer (down, wrong URL): retry later.
    #[error("schema registry at {url} cannot be reached: {message}")]
    Unreachable {
        /// The base URL.
        url: String,
        /// What the HTTP client said.
        message: String,
    },
    /// The registry refused a schema as incompatible with the subject's latest version.
    #[error(
        "schema registry refuses the schema of {subject}: incompatible with its registered \
         version under {COMPATIBILITY} compatibility ({message}); a breaking change needs a new \
         schema version (a new subject) and an upcaster"
    )]
    Incompatible {
        /// The subject.
        subject: String,
        /// The registry's message.
        message: String,
    },
    /// Any other refusal.
    #[error("schema registry answered {status} for {what}: {message}")]
    Refused {
        /// What was asked.
        what: String,
        /// HTTP status.
        status: u16,
        /// The registry's message.
        message: String,
    },
}

impl RegistryError {
    /// A stable code for logs and tests.
    pub fn code(&self) -> &'static str {
        match self {
            RegistryError::Unreachable { .. } => "RegistryUnreachable",
            RegistryError::Incompatible { .. } => "SchemaIncompatible",
            RegistryError::Refused { .. } => "RegistryRefused",
        }
    }
}

/// The subject of a schema by its record name (`<topic>-<record name>`, TopicRecordNameStrategy).
pub fn record_subject(topic: &str, record: &str) -> String {
    format!("{topic}-{record}")
}

/// A client of the registry's Confluent API at `url` (e.g.
/// `http://127.0.0.1:8081/apis/ccompat/v7`).
#[derive(Debug, Clone)]
pub struct SchemaRegistry {
    http: reqwest::Client,
    url: String,
    access: RegistryAccess,
}

impl SchemaRegistry {
    /// A client with a 10 s timeout per request.
    pub fn new(url: &str) -> Result<Self, RegistryError> {
        Self::with_access(url, &RegistryAccess::default())
    }

    /// [`SchemaRegistry::new`] reaching the registry with `access` (credentials, a private CA).
    pub fn with_access(url: &str, access: &RegistryAccess) -> Result<Self, RegistryError> {
        let url = url.trim_end_matches('/').to_owned();
        let unreachable = |message: String| RegistryError::Unreachable {
            url: url.clone(),
            message,
        };
        let mut builder = reqwest::Client::builder().timeout(Duration::from_secs(10));
        if let Some(pem) = &access.ca_pem {
            let certs = reqwest::Certificate::from_pem_bundle(pem)
                .map_err(|e| unreachable(format!("SCHEMA_REGISTRY_CA_FILE cannot be used: {e}")))?;
            for cert in certs {
                builder = builder.add_root_certificate(cert);
            }
        }
        let http = builder.build().map_err(|e| unreachable(e.to_string()))?;
        Ok(SchemaRegistry {
            http,
            url,
            access: access.clone(),
        })
    }

    /// Sets the compatibility level of `subject`. Two instances starting together may race to
    /// create the rule (the loser gets a 409 from Apicurio): then the level is read back and
    /// set once more if it is not the one wanted.
    pub async fn set_compatibility(&self, subject: &str, level: &str) -> Result<(), RegistryError> {
        let path = format!("config/{subject}");
        let put = || {
            self.call(
                reqwest::Method::PUT,
                &path,
                Some(json!({ "compatibility": level })),
                subject,
            )
        };
        match put().await {
            Ok(_) => Ok(()),
            Err(RegistryError::Incompatible { .. }) => {
                if self.compatibility(subject).await?.as_deref() == Some(level) {
                    Ok(())
                } else {
                    put().await.map(|_| ())
                }
            }
            Err(e) => Err(e),
        }
    }

    /// The compatibility level of `subject`.
    pub async fn compatibility(&self, subject: &str) -> Result<Option<String>, RegistryError> {
        let answer = self
            .call(
                reqwest::Method::GET,
                &format!("config/{subject}"),
                None,
                subject,
            )
            .await?;
        Ok(answer["compatibilityLevel"]
            .as_str()
            .or(answer["compatibility"].as_str())
            .map(str::to_owned))
    }

    /// Registers a JSON Schema under `subject` (the existing id if it is already there); an
    /// incompatible schema is [`RegistryError::Incompatible`].
    pub async fn register(&self, subject: &str, schema: &Value) -> Result<u32, RegistryError> {
        let body = json!({ "schemaType": "JSON", "schema": schema.to_string() });
        let answer = self
            .call(
                reqwest::Method::POST,
                &format!("subjects/{subject}/versions"),
                Some(body),
                subject,
            )
            .await?;
        answer["id"]
            .as_u64()
            .and_then(|id| u32::try_from(id).ok())
            .ok_or_else(|| RegistryError::Refused {
                what: format!("registering {subject}"),
                status: 200,
                message: format!("no schema id in {answer}"),
            })
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
        subject: &str,
    ) -> Result<Value, RegistryError> {
        let mut request = self
            .http
            .request(method.clone(), format!("{}/{path}", self.url))
            .header(reqwest::header::ACCEPT, CONTENT_TYPE);
        if let Some((user, password)) = &self.access.basic_auth {
            request = request.basic_auth(user, Some(password));
        }
        if let Some(body) = body {
            request = request
                .header(reqwest::header::CONTENT_TYPE, CONTENT_TYPE)
                .body(body.to_string());
        }
        let unreachable = |e: reqwest::Error| RegistryError::Unreachable {
            url: self.url.clone(),
            message: e.to_string(),
        };
        let response = request.send().await.map_err(unreachable)?;
        let status = response.status().as_u16();
        let text = response.text().await.map_err(unreachable)?;
        let answer: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        let message = || {
            answer["message"]
                .as_str()
                .map(str::to_owned)
                .unwrap_or_else(|| answer.to_string())
        };
        match status {
            200..=299 => Ok(answer),
            409 => Err(RegistryError::Incompatible {
                subject: subject.to_owned(),
                message: message(),
            }),
            500.. => Err(RegistryError::Unreachable {
                url: self.url.clone(),
                message: format!("{status}: {}", message()),
            }),
            _ => Err(RegistryError::Refused {
                what: format!("{method} {path}"),
                status,
                message: message(),
            }),
        }
    }
}

/// Registers every current event schema of aggregate type `A` for `topic` and sets [`COMPATIBILITY`] on its subject.
/// Returns each subject with its schema id. A schema changed incompatibly since it was first
/// registered is refused here, before any event is written with it.
pub async fn prepare_for<A: crate::aggregate::Aggregate>(
    registry: &SchemaRegistry,
    topic: &str,
) -> Result<Vec<(String, u32)>, RegistryError> {
    let mut registered = Vec::new();
    for (record, schema) in crate::codec::schemas_of::<A>() {
        let subject = record_subject(topic, &record);
        // Register first: a rule on a subject that does not exist yet is not kept by every
        // registry. The first version has nothing to be compatible with.
        let id = registry.register(&subject, &schema).await?;
        registry.set_compatibility(&subject, COMPATIBILITY).await?;
        registered.push((subject, id));
    }
    Ok(registered)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bank_account::prepare;

    #[tokio::test]
    async fn racing_instances_both_set_the_rule() {
        let Some(url) = crate::testing::schema_registry_url() else {
            eprintln!("SKIPPED: SCHEMA_REGISTRY_URL is not set");
            return;
        };
        // Regression: two command-service instances starting together made the registry answer
        // 409 "rule already exists" to one of them, which stopped it as "incompatible".
        let topic = format!("{}.events", crate::testing::unique_name("race"));
        let (a, b, c) = tokio::join!(
            prepare(&url, &topic),
            prepare(&url, &topic),
            prepare(&url, &topic)
        );
        let (a, b, c) = (a.unwrap(), b.unwrap(), c.unwrap());
        assert_eq!(a, b);
        assert_eq!(b, c);
    }

    #[test]
    fn errors_have_stable_codes() {
        let e = RegistryError::Incompatible {
            subject: "s".into(),
            message: "m".into(),
        };
        assert_eq!(e.code(), "SchemaIncompatible");
        assert!(e.to_string().contains("BACKWARD"), "{e}");
    }
}
