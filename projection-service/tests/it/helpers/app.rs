//! The service in-process on port 0, its HTTP API and metrics, and polling with deadlines.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use projection_service::ServiceError;
use serde_json::Value;
use shared::Settings;
use shared::kafka::Topics;
use shared::testing::test_settings;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::TestDb;

/// Partitions of the test topics.
pub const PARTITIONS: i32 = 3;

/// A running in-process projection-service.
pub struct TestApp {
    /// Where it listens.
    pub addr: SocketAddr,
    /// HTTP client.
    pub client: reqwest::Client,
    /// `<prefix>.events`.
    pub topic: String,
    stop: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<Result<(), ServiceError>>>,
}

/// Settings for a test: unique topics with [`PARTITIONS`] partitions and the given database.
pub fn settings_for(db: &TestDb) -> Settings {
    let mut settings = test_settings(PARTITIONS);
    settings.projection_database_url = db.url.clone();
    settings
}

/// Starts the service in-process on port 0.
pub async fn spawn_app(settings: Settings) -> TestApp {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind port 0");
    let addr = listener.local_addr().expect("local addr");
    let (stop, stopped) = oneshot::channel::<()>();
    let topic = Topics::new(&settings.topic_prefix).events();
    let handle = tokio::spawn(projection_service::run(settings, listener, async move {
        let _ = stopped.await;
    }));
    let app = TestApp {
        addr,
        client: reqwest::Client::new(),
        topic,
        stop: Some(stop),
        handle: Some(handle),
    };
    wait_for(
        "the service to answer /health",
        Duration::from_secs(60),
        || async {
            let r = app.client.get(app.url("/health")).send().await.ok()?;
            r.status().is_success().then_some(())
        },
    )
    .await;
    app
}

impl TestApp {
    /// `http://addr{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// GET, returning status and JSON body (Null when not JSON).
    pub async fn get(&self, path: &str) -> (u16, Value) {
        let r = self
            .client
            .get(self.url(path))
            .send()
            .await
            .expect("request");
        let status = r.status().as_u16();
        let text = r.text().await.unwrap_or_default();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// GET as text.
    pub async fn get_text(&self, path: &str) -> (u16, String) {
        let r = self
            .client
            .get(self.url(path))
            .send()
            .await
            .expect("request");
        (r.status().as_u16(), r.text().await.unwrap_or_default())
    }

    /// Waits until `GET /accounts/{id}` shows at least `version` (uses the service's own
    /// `min_version` wait, repeated until the deadline).
    pub async fn wait_version(&self, id: &str, version: u64) -> Value {
        wait_for(
            &format!("{id} to reach version {version}"),
            Duration::from_secs(60),
            || async {
                let (status, body) = self
                    .get(&format!(
                        "/accounts/{id}?min_version={version}&timeout_ms=2000"
                    ))
                    .await;
                (status == 200).then_some(body)
            },
        )
        .await
    }

    /// Sums the series of a counter for this app's topic from `/metrics`.
    pub async fn metric(&self, name: &str) -> f64 {
        let (_, text) = self.get_text("/metrics").await;
        metric_value(&text, name, &self.topic)
    }

    /// Waits until the service says it caught up.
    pub async fn wait_ready(&self) {
        wait_for("/ready to say 200", Duration::from_secs(60), || async {
            (self.get("/ready").await.0 == 200).then_some(())
        })
        .await;
    }

    /// Graceful stop; returns what `run` returned.
    pub async fn stop(mut self) -> Result<(), ServiceError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let handle = self.handle.take().expect("running");
        tokio::time::timeout(Duration::from_secs(60), handle)
            .await
            .expect("service stops within 60 s")
            .expect("service task did not panic")
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Sums every series of `name` whose labels include `topic="<topic>"`.
pub fn metric_value(text: &str, name: &str, topic: &str) -> f64 {
    let label = format!("topic=\"{topic}\"");
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) && l.contains(&label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Polls `check` every 50 ms until it yields a value; panics naming `what` after `timeout`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
