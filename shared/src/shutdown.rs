//! The one way both services stop: a [`Shutdown`] handle, cloned into every part (HTTP server,
//! Kafka loops, worker threads). Anyone may trigger it, gracefully (a signal, the end of a
//! test) or with a fatal reason (a fenced producer, a corrupt store); every part sees it at
//! once, from async code ([`Shutdown::wait`]) or from a blocking thread
//! ([`Shutdown::is_triggered`]), and the service reports the first fatal reason as its exit
//! error.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

/// A shared stop signal with an optional fatal reason. Cloning shares it.
#[derive(Clone, Debug)]
pub struct Shutdown {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// Also readable as a plain flag by code that takes `&AtomicBool` (long reads check it).
    triggered: AtomicBool,
    /// The first fatal reason; `None` for a graceful stop.
    failure: Mutex<Option<String>>,
    notify: watch::Sender<bool>,
}

impl Default for Shutdown {
    fn default() -> Self {
        Shutdown::new()
    }
}

impl Shutdown {
    /// A signal not triggered yet.
    pub fn new() -> Self {
        Shutdown {
            inner: Arc::new(Inner {
                triggered: AtomicBool::new(false),
                failure: Mutex::new(None),
                notify: watch::Sender::new(false),
            }),
        }
    }

    /// Asks every part to stop gracefully.
    pub fn trigger(&self) {
        self.inner.triggered.store(true, Ordering::SeqCst);
        self.inner.notify.send_replace(true);
    }

    /// Stops everything because of a fatal error; the first reason given is the one reported.
    pub fn fail(&self, reason: impl Into<String>) {
        {
            let mut failure = self
                .inner
                .failure
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            failure.get_or_insert_with(|| reason.into());
        }
        self.trigger();
    }

    /// Whether a stop was asked for (gracefully or not).
    pub fn is_triggered(&self) -> bool {
        self.inner.triggered.load(Ordering::SeqCst)
    }

    /// The flag itself, for code that polls a `&AtomicBool`.
    pub fn flag(&self) -> &AtomicBool {
        &self.inner.triggered
    }

    /// The fatal reason, if the stop was a failure.
    pub fn failure(&self) -> Option<String> {
        self.inner
            .failure
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Resolves once a stop was asked for.
    pub async fn wait(&self) {
        let mut rx = self.inner.notify.subscribe();
        let _ = rx.wait_for(|triggered| *triggered).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_clone_sees_the_first_failure() {
        let shutdown = Shutdown::new();
        let watcher = shutdown.clone();
        let waiting = tokio::spawn(async move { watcher.wait().await });
        assert!(!shutdown.is_triggered());
        shutdown.clone().fail("fenced");
        shutdown.fail("second reason");
        waiting.await.unwrap();
        assert!(shutdown.is_triggered());
        assert!(shutdown.flag().load(Ordering::SeqCst));
        assert_eq!(shutdown.failure().as_deref(), Some("fenced"));
    }

    #[tokio::test]
    async fn a_graceful_stop_has_no_failure_and_wait_returns_after_it() {
        let shutdown = Shutdown::new();
        shutdown.trigger();
        shutdown.wait().await;
        assert_eq!(shutdown.failure(), None);
    }
}
