//! Decoding consumed messages, with the schema registry's failures sorted into "wait" and
//! "dead-letter".
//!
//! - The registry is unreachable (or answers 5xx…): wait and retry, without bound. Never a
//!   reason to dead-letter.
//! - The registry does not know the message's schema id (404): the id may be registered a
//!   moment later (a producer that registered against another registry node, a registry
//!   restored from backup). Wait and retry for up to `PROJECTION_UNKNOWN_SCHEMA_RETRY`
//!   (counted from the first failure of that id), each time with a fresh codec, because the
//!   registry client caches the "not found" answer for good. Only after the bound is the
//!   message dead-lettered (`SchemaRegistry`); later messages with that id are then
//!   dead-lettered at once until the service restarts.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use shared::{DecodeError, EventCodec, EventEnvelope, Settings};

/// The environment variable that bounds the wait for an unknown schema id.
pub const UNKNOWN_SCHEMA_RETRY_VAR: &str = "PROJECTION_UNKNOWN_SCHEMA_RETRY";
/// Its default.
pub const UNKNOWN_SCHEMA_RETRY_DEFAULT: Duration = Duration::from_secs(30);

/// `PROJECTION_UNKNOWN_SCHEMA_RETRY` from the environment (a duration such as `30s` or `2m`;
/// `0s` dead-letters at once), or the default.
pub fn unknown_schema_retry_from_env() -> Result<Duration, String> {
    match std::env::var(UNKNOWN_SCHEMA_RETRY_VAR) {
        Err(_) => Ok(UNKNOWN_SCHEMA_RETRY_DEFAULT),
        Ok(v) if v.trim().is_empty() => Ok(UNKNOWN_SCHEMA_RETRY_DEFAULT),
        Ok(v) => humantime::parse_duration(v.trim()).map_err(|e| {
            format!("{UNKNOWN_SCHEMA_RETRY_VAR}={v:?}: expected a duration like 30s or 2m ({e})")
        }),
    }
}

/// What one decode attempt says.
#[derive(Debug)]
pub(crate) enum Verdict {
    /// Final: the envelope, or why the message is poison.
    Decoded(Result<EventEnvelope, DecodeError>),
    /// Wait and try again.
    Retry {
        /// Why, for the log.
        reason: &'static str,
        /// The registry's failure.
        error: DecodeError,
    },
}

/// Decodes messages with the codec of the settings, re-created while waiting for an unknown
/// schema id.
pub(crate) struct Decoder {
    codec: Mutex<Arc<EventCodec>>,
    settings: Settings,
    unknown_schema_retry: Duration,
    /// Schema ids the registry did not know, since when.
    unknown_since: Mutex<HashMap<u32, Instant>>,
}

impl Decoder {
    /// A decoder starting with `codec` (made from `settings`).
    pub(crate) fn new(
        settings: &Settings,
        codec: Arc<EventCodec>,
        unknown_schema_retry: Duration,
    ) -> Self {
        Decoder {
            codec: Mutex::new(codec),
            settings: settings.clone(),
            unknown_schema_retry,
            unknown_since: Mutex::new(HashMap::new()),
        }
    }

    fn codec(&self) -> Arc<EventCodec> {
        self.codec
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// One attempt at decoding a message's value.
    pub(crate) async fn attempt(&self, payload: Option<&[u8]>) -> Verdict {
        let Some(bytes) = payload else {
            return Verdict::Decoded(Err(DecodeError::Empty));
        };
        match self.codec().decode(bytes).await {
            Err(error) if error.is_retriable() => Verdict::Retry {
                reason: "schema registry unavailable",
                error,
            },
            Err(error @ DecodeError::Registry { schema_id, .. })
                if self.still_waiting_for(schema_id) =>
            {
                self.forget_cached_answers();
                Verdict::Retry {
                    reason: "schema id unknown to the registry (yet)",
                    error,
                }
            }
            result => {
                if result.is_ok()
                    && let Some(id) = wire_schema_id(bytes)
                {
                    self.lock_unknown().remove(&id);
                }
                Verdict::Decoded(result)
            }
        }
    }

    fn lock_unknown(&self) -> std::sync::MutexGuard<'_, HashMap<u32, Instant>> {
        self.unknown_since
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether the bound for an unknown schema id has not passed yet (starting it if new).
    fn still_waiting_for(&self, schema_id: u32) -> bool {
        let since = *self
            .lock_unknown()
            .entry(schema_id)
            .or_insert_with(Instant::now);
        since.elapsed() < self.unknown_schema_retry
    }

    /// A fresh codec: the registry client keeps a "not found" answer for good.
    fn forget_cached_answers(&self) {
        match EventCodec::from_settings(&self.settings) {
            Ok(codec) => {
                *self.codec.lock().unwrap_or_else(PoisonError::into_inner) = Arc::new(codec);
            }
            Err(e) => tracing::warn!(error = %e, "cannot re-create the codec"),
        }
    }
}

/// The schema id of a Confluent wire-format value.
fn wire_schema_id(bytes: &[u8]) -> Option<u32> {
    match bytes {
        [0, a, b, c, d, ..] => Some(u32::from_be_bytes([*a, *b, *c, *d])),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_schema_ids_are_read_from_the_header() {
        assert_eq!(wire_schema_id(&[0, 0, 0, 1, 2, b'{']), Some(258));
        assert_eq!(wire_schema_id(b"{}"), None);
        assert_eq!(wire_schema_id(&[0, 1]), None);
    }
}
