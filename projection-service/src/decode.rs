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
//!   message dead-lettered (`SchemaRegistry`). Later messages with that id (a `bank dlq
//!   replay` once the schema is registered again, say) ask a fresh codec once more, at most
//!   every [`RECHECK_EVERY`] per id, and are dead-lettered at once if it still does not know it:
//!   the documented recovery works without a restart, and a flood of one unknown id costs one
//!   registry request per interval.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use shared::{DecodeError, EventCodec, EventEnvelope, Settings};

/// How often an id given up on is asked again (with a fresh codec) when a message carries it.
pub const RECHECK_EVERY: Duration = Duration::from_secs(2);

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
    /// Schema ids given up on, and when a fresh codec last asked the registry about them.
    rechecked: Mutex<HashMap<u32, Instant>>,
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
            rechecked: Mutex::new(HashMap::new()),
        }
    }

    /// `PARTITIONS`: where each account lives.
    pub(crate) fn partitions(&self) -> i32 {
        self.settings.partitions
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
            Err(DecodeError::Registry { schema_id, .. }) if self.recheck_due(schema_id) => {
                // Given up on before: perhaps registered again since (the documented repair).
                self.forget_cached_answers();
                let again = self.codec().decode(bytes).await;
                self.decoded(bytes, again)
            }
            result => self.decoded(bytes, result),
        }
    }

    /// A final answer; a schema id that decodes is no longer waited for nor given up on.
    fn decoded(&self, bytes: &[u8], result: Result<EventEnvelope, DecodeError>) -> Verdict {
        if result.is_ok()
            && let Some(id) = wire_schema_id(bytes)
        {
            self.lock_unknown().remove(&id);
            self.rechecked
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&id);
        }
        Verdict::Decoded(result)
    }

    /// Whether an id given up on may be asked again now (then the time is recorded).
    fn recheck_due(&self, schema_id: u32) -> bool {
        let mut rechecked = self
            .rechecked
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let due = rechecked
            .get(&schema_id)
            .is_none_or(|at| at.elapsed() >= RECHECK_EVERY);
        if due {
            rechecked.insert(schema_id, Instant::now());
        }
        due
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
        let renewed = self.codec().renewed(&self.settings);
        match renewed {
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
