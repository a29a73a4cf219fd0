//! A TCP proxy in front of the broker's second listener (`scripts/kafka`, `KAFKA_PROXIED_PORT`)
//! that reads Kafka's framing and loses the responses to chosen requests: what a network does to
//! a client when it drops the answer after the broker acted.
//!
//! The broker advertises that listener on the port after it, where the proxy listens, so a client
//! that bootstraps through the proxy sends every request through it. Only one proxy can run at a
//! time (the port is fixed). It runs on a thread and runtime of its own, so that a service that
//! blocks its runtime's thread (a metadata call) does not stall the proxy it waits on.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinSet;

/// Kafka API keys the tests name.
pub const OFFSET_FETCH: i16 = 9;
pub const INIT_PRODUCER_ID: i16 = 22;
pub const END_TXN: i16 = 26;

/// What the proxy loses, and what it saw.
#[derive(Default)]
struct Rules {
    /// API key whose responses are lost → the request (API key) that ends the loss, if any.
    losing: HashMap<i16, Option<i16>>,
    lost: HashMap<i16, usize>,
    /// Everything is lost both ways: the broker is unreachable.
    outage: bool,
}

type Shared = Arc<Mutex<Rules>>;

fn lock(rules: &Shared) -> MutexGuard<'_, Rules> {
    rules.lock().unwrap_or_else(|e| e.into_inner())
}

/// Held by the running proxy: the port is fixed, so tests that use it take turns.
static PORT: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The proxy; it stops (with every connection through it) when dropped.
pub struct LossyProxy {
    /// The address to bootstrap from.
    pub bootstrap: String,
    rules: Shared,
    stop: Option<oneshot::Sender<()>>,
    /// The proxy's thread: joined on drop, so the port is free before the next turn.
    thread: Option<std::thread::JoinHandle<()>>,
    _turn: tokio::sync::MutexGuard<'static, ()>,
}

impl LossyProxy {
    /// Starts the proxy, or `None` when `TEST_KAFKA_PROXIED_PORT` is unset (skipped loudly; a
    /// failure under CI, where scripts/test sets it).
    pub async fn start() -> Option<LossyProxy> {
        let Some(port) = std::env::var("TEST_KAFKA_PROXIED_PORT")
            .ok()
            .and_then(|p| p.parse::<u16>().ok())
        else {
            shared::testing::skip_without(
                "TEST_KAFKA_PROXIED_PORT",
                "the broker's proxied listener (scripts/test starts Kafka with one)",
            );
            return None;
        };
        let turn = PORT.lock().await;
        let upstream = format!("127.0.0.1:{port}");
        TcpStream::connect(&upstream).await.unwrap_or_else(|e| {
            panic!("the broker has no proxied listener on {upstream} ({e}): start it with KAFKA_PROXIED_PORT={port} scripts/kafka start --fresh")
        });
        let bootstrap = format!("127.0.0.1:{}", port + 1);
        // The previous proxy's thread is joined before its turn ends; a moment more for the
        // port to be given back by the kernel.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let listener = loop {
            match std::net::TcpListener::bind(&bootstrap) {
                Ok(listener) => break listener,
                Err(e) if std::time::Instant::now() < deadline => {
                    eprintln!("proxy port {bootstrap} busy ({e}); trying again");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
                Err(e) => panic!("proxy port {bootstrap} free: {e}"),
            }
        };
        listener
            .set_nonblocking(true)
            .expect("non-blocking listener");
        let rules = Shared::default();
        let (stop, stopped) = oneshot::channel();
        let shared = Arc::clone(&rules);
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("proxy runtime");
            runtime.block_on(async move {
                let listener = TcpListener::from_std(listener).expect("tokio listener");
                tokio::select! {
                    () = accept_loop(listener, upstream, shared) => {}
                    _ = stopped => {}
                }
            });
        });
        Some(LossyProxy {
            bootstrap,
            rules,
            stop: Some(stop),
            thread: Some(thread),
            _turn: turn,
        })
    }

    /// Loses every response to requests with `api_key` from now on, until a request with
    /// `until_request` passes (never, if `None`).
    pub fn lose_responses(&self, api_key: i16, until_request: Option<i16>) {
        lock(&self.rules).losing.insert(api_key, until_request);
    }

    /// Loses every request and every response from now on, until [`LossyProxy::heal`]: a
    /// broker outage as its clients see it.
    pub fn outage(&self) {
        lock(&self.rules).outage = true;
    }

    /// Loses nothing any more.
    pub fn heal(&self) {
        let mut rules = lock(&self.rules);
        rules.losing.clear();
        rules.outage = false;
    }

    /// How many responses to `api_key` were lost.
    pub fn lost(&self, api_key: i16) -> usize {
        lock(&self.rules).lost.get(&api_key).copied().unwrap_or(0)
    }
}

impl Drop for LossyProxy {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn accept_loop(listener: TcpListener, upstream: String, rules: Shared) {
    let mut connections = JoinSet::new();
    while let Ok((client, _)) = listener.accept().await {
        let Ok(broker) = TcpStream::connect(&upstream).await else {
            continue;
        };
        let (client_read, client_write) = client.into_split();
        let (broker_read, broker_write) = broker.into_split();
        // Correlation id → API key of the requests in flight on this connection.
        let pending = Arc::new(Mutex::new(HashMap::new()));
        connections.spawn(requests(
            client_read,
            broker_write,
            Arc::clone(&rules),
            Arc::clone(&pending),
        ));
        connections.spawn(responses(
            broker_read,
            client_write,
            Arc::clone(&rules),
            pending,
        ));
    }
}

/// One frame: a big-endian i32 size, then that many bytes.
async fn read_frame(from: &mut OwnedReadHalf) -> Option<Vec<u8>> {
    let size = from.read_i32().await.ok()?;
    let mut body = vec![0; usize::try_from(size).ok()?];
    from.read_exact(&mut body).await.ok()?;
    Some(body)
}

async fn write_frame(to: &mut OwnedWriteHalf, body: &[u8]) -> Option<()> {
    let size = i32::try_from(body.len()).ok()?;
    to.write_all(&size.to_be_bytes()).await.ok()?;
    to.write_all(body).await.ok()
}

/// The `N` bytes of `body` at `at`, if it is that long (a big-endian number, for the caller).
fn be_bytes<const N: usize>(body: &[u8], at: usize) -> Option<[u8; N]> {
    body.get(at..at + N)?.try_into().ok()
}

/// Client → broker: notes each request's API key by correlation id (request header: api key,
/// api version, correlation id) and ends the losses it ends.
async fn requests(
    mut client: OwnedReadHalf,
    mut broker: OwnedWriteHalf,
    rules: Shared,
    pending: Arc<Mutex<HashMap<i32, i16>>>,
) {
    while let Some(body) = read_frame(&mut client).await {
        let (Some(api), Some(correlation)) = (
            be_bytes(&body, 0).map(i16::from_be_bytes),
            be_bytes(&body, 4).map(i32::from_be_bytes),
        ) else {
            return;
        };
        {
            let mut rules = lock(&rules);
            if rules.outage {
                continue;
            }
            rules.losing.retain(|_, until| *until != Some(api));
        }
        pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(correlation, api);
        if write_frame(&mut broker, &body).await.is_none() {
            return;
        }
    }
}

/// Broker → client: forwards each response (header: correlation id) unless its request's API key
/// is being lost.
async fn responses(
    mut broker: OwnedReadHalf,
    mut client: OwnedWriteHalf,
    rules: Shared,
    pending: Arc<Mutex<HashMap<i32, i16>>>,
) {
    while let Some(body) = read_frame(&mut broker).await {
        let Some(correlation) = be_bytes(&body, 0).map(i32::from_be_bytes) else {
            return;
        };
        let api = pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&correlation);
        if lock(&rules).outage {
            continue;
        }
        if let Some(api) = api {
            let mut rules = lock(&rules);
            if rules.losing.contains_key(&api) {
                *rules.lost.entry(api).or_default() += 1;
                continue;
            }
        }
        if write_frame(&mut client, &body).await.is_none() {
            return;
        }
    }
}
