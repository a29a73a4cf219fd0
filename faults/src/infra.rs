//! The processes under test and the Kafka cluster they run on: the suite's own brokers (started
//! through `scripts/kafka` with ports and a state directory of their own, so that killing them
//! harms nobody) and the real `command-service` / `projection-service` binaries.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tokio::process::{Child, Command};

/// Sends `signal` (`KILL`, `STOP`, `CONT`) to a process this suite started.
pub(crate) async fn signal(pid: u32, signal: &str) -> Result<()> {
    let status = Command::new("kill")
        .args(["-s", signal, &pid.to_string()])
        .status()
        .await
        .context("running kill")?;
    if !status.success() {
        bail!("kill -s {signal} {pid} failed");
    }
    Ok(())
}

/// Whether process `pid` still exists (a zombie of ours counts as gone once reaped).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.contains(") Z "))
        .unwrap_or(false)
}

/// A free TCP port on the loopback interface.
pub(crate) fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A Kafka cluster of `brokers` nodes of this suite's own, managed through `scripts/kafka`.
pub(crate) struct Cluster {
    scripts: PathBuf,
    state: PathBuf,
    port: u16,
    controller_port: u16,
    pub(crate) brokers: usize,
    pub(crate) bootstrap: String,
}

impl Cluster {
    /// A cluster description; nothing runs until [`Cluster::start`].
    pub(crate) fn new(
        scripts: &Path,
        state: &Path,
        port: u16,
        controller_port: u16,
        brokers: usize,
    ) -> Self {
        let bootstrap = (0..brokers)
            .map(|i| format!("127.0.0.1:{}", port as usize + i))
            .collect::<Vec<_>>()
            .join(",");
        Cluster {
            scripts: scripts.to_owned(),
            state: state.to_owned(),
            port,
            controller_port,
            brokers,
            bootstrap,
        }
    }

    fn script(&self) -> Command {
        let mut cmd = Command::new(self.scripts.join("kafka"));
        cmd.env("BANK_STATE_DIR", &self.state)
            .env("KAFKA_PORT", self.port.to_string())
            .env("KAFKA_CONTROLLER_PORT", self.controller_port.to_string())
            .env("KAFKA_HEAP", "512m")
            .env_remove("KAFKA_FRESH")
            .env_remove("KAFKA_BROKERS")
            .stdin(Stdio::null());
        cmd
    }

    async fn run(&self, args: &[&str]) -> Result<String> {
        let out = self
            .script()
            .args(args)
            .output()
            .await
            .context("running scripts/kafka")?;
        if !out.status.success() {
            bail!(
                "scripts/kafka {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Starts every node on empty data directories.
    pub(crate) async fn start_fresh(&self) -> Result<()> {
        self.run(&["start", "--fresh", "--brokers", &self.brokers.to_string()])
            .await
            .map(drop)
    }

    /// Starts the nodes that are not running (after a kill), keeping their data.
    pub(crate) async fn restart_missing(&self) -> Result<()> {
        self.run(&["start", "--brokers", &self.brokers.to_string()])
            .await
            .map(drop)
    }

    /// Stops every node.
    pub(crate) async fn stop(&self) -> Result<()> {
        self.run(&["stop"]).await.map(drop)
    }

    /// The process id of node `node` (1-based).
    pub(crate) async fn pid(&self, node: usize) -> Result<u32> {
        let out = self.run(&["pid", "--node", &node.to_string()]).await?;
        out.trim()
            .parse()
            .with_context(|| format!("scripts/kafka pid printed {out:?}"))
    }

    /// SIGKILLs node `node` and waits until it is gone.
    pub(crate) async fn kill(&self, node: usize) -> Result<()> {
        let pid = self.pid(node).await?;
        signal(pid, "KILL").await?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while alive(pid) {
            if Instant::now() > deadline {
                bail!("broker node {node} (pid {pid}) survived SIGKILL");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    /// Runs a Kafka tool class with the cluster's classpath; returns its standard output.
    pub(crate) async fn tool(&self, args: &[&str]) -> Result<String> {
        let mut all = vec!["run-class"];
        all.extend_from_slice(args);
        let mut cmd = self.script();
        cmd.env("KAFKA_TOOL_HEAP", "256m");
        let out = cmd
            .args(&all)
            .output()
            .await
            .context("running a Kafka tool")?;
        if !out.status.success() {
            bail!(
                "Kafka tool {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

/// One running service process, its HTTP base URL and its log file.
pub(crate) struct Service {
    pub(crate) name: String,
    pub(crate) base_url: String,
    pub(crate) instance_id: String,
    /// Set for a superseded instance, which may stop by itself (fenced) without that being a crash.
    pub(crate) may_exit: bool,
    log: PathBuf,
    child: Child,
}

/// A helper service of the suite's own, managed by one of the scripts (`postgres`, `registry`)
/// with its own port and directory.
pub(crate) struct Helper {
    script: PathBuf,
    env: Vec<(String, String)>,
}

impl Helper {
    /// `scripts/<name>` with `env` (ports, directories).
    pub(crate) fn new(scripts: &Path, name: &str, env: &[(&str, String)]) -> Self {
        Helper {
            script: scripts.join(name),
            env: env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), v.clone()))
                .collect(),
        }
    }

    async fn run(&self, args: &[&str]) -> Result<String> {
        let out = Command::new(&self.script)
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .output()
            .await
            .with_context(|| format!("running {}", self.script.display()))?;
        if !out.status.success() {
            bail!(
                "{} {} failed: {}",
                self.script.display(),
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .unwrap_or_default()
            .to_owned())
    }

    /// Starts it (`fresh`: on empty data); returns the address it prints.
    pub(crate) async fn start(&self, fresh: bool) -> Result<String> {
        if fresh {
            self.run(&["start", "--fresh"]).await
        } else {
            self.run(&["start"]).await
        }
    }

    /// Stops it.
    pub(crate) async fn stop(&self) -> Result<()> {
        self.run(&["stop"]).await.map(drop)
    }
}

/// How to start services for one run: the binaries, the broker, the topic prefix, a directory
/// for logs and the SQLite read model.
#[derive(Clone)]
pub(crate) struct Launcher {
    pub(crate) bin_dir: PathBuf,
    pub(crate) dir: PathBuf,
    pub(crate) bootstrap: String,
    pub(crate) prefix: String,
    pub(crate) partitions: i32,
    /// The read model's database; `None`: a SQLite file of the run.
    pub(crate) postgres_url: Option<String>,
    /// The schema registry; `None`: plain JSON events.
    pub(crate) registry_url: Option<String>,
}

impl Launcher {
    /// The read model's database URL (one SQLite file per run, or the suite's PostgreSQL).
    pub(crate) fn database_url(&self) -> String {
        self.postgres_url
            .clone()
            .unwrap_or_else(|| format!("sqlite://{}", self.dir.join("read-model.db").display()))
    }

    fn base(&self, binary: &str, log_name: &str) -> Result<Command> {
        let path = self.bin_dir.join(binary);
        if !path.exists() {
            bail!(
                "{} is missing: build it first (scripts/faults does; `cargo test --workspace` builds it too)",
                path.display()
            );
        }
        std::fs::create_dir_all(&self.dir)?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("{log_name}.log")))?;
        let mut cmd = Command::new(path);
        cmd.env("KAFKA_BOOTSTRAP_SERVERS", &self.bootstrap)
            .env("TOPIC_PREFIX", &self.prefix)
            .env("PARTITIONS", self.partitions.to_string())
            // Set and empty: plain JSON events, no registry.
            .env(
                "SCHEMA_REGISTRY_URL",
                self.registry_url.as_deref().unwrap_or_default(),
            )
            .env("RUST_LOG", "info")
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true);
        Ok(cmd)
    }

    /// Starts a command-service with `instance_id` (does not wait for readiness).
    pub(crate) fn command_service(&self, instance_id: &str, log_name: &str) -> Result<Service> {
        let port = free_port()?;
        let mut cmd = self.base("command-service", log_name)?;
        cmd.env("INSTANCE_ID", instance_id)
            .env("COMMAND_HTTP_ADDR", format!("127.0.0.1:{port}"))
            // Small numbers, so that snapshots and checkpoints happen within a short run and
            // restores take their checkpoint path.
            .env("SNAPSHOT_EVERY", "10")
            .env("CHECKPOINT_EVERY", "50");
        Ok(Service {
            name: log_name.to_owned(),
            base_url: format!("http://127.0.0.1:{port}"),
            instance_id: instance_id.to_owned(),
            may_exit: false,
            log: self.dir.join(format!("{log_name}.log")),
            child: cmd.spawn().context("starting command-service")?,
        })
    }

    /// Starts a projection-service on the run's read model.
    pub(crate) fn projection_service(&self, log_name: &str) -> Result<Service> {
        let port = free_port()?;
        let mut cmd = self.base("projection-service", log_name)?;
        cmd.env("PROJECTION_DATABASE_URL", self.database_url())
            .env("PROJECTION_HTTP_ADDR", format!("127.0.0.1:{port}"));
        Ok(Service {
            name: log_name.to_owned(),
            base_url: format!("http://127.0.0.1:{port}"),
            instance_id: String::new(),
            may_exit: false,
            log: self.dir.join(format!("{log_name}.log")),
            child: cmd.spawn().context("starting projection-service")?,
        })
    }

    /// Runs `projection-service rebuild` on the run's read model in the background.
    pub(crate) fn rebuild(&self, log_name: &str) -> Result<Child> {
        let mut cmd = self.base("projection-service", log_name)?;
        cmd.arg("rebuild")
            .env("PROJECTION_DATABASE_URL", self.database_url())
            .env(
                "PROJECTION_HTTP_ADDR",
                format!("127.0.0.1:{}", free_port()?),
            );
        cmd.spawn().context("starting projection-service rebuild")
    }
}

impl Service {
    /// The process id (the process was started by this suite).
    pub(crate) fn pid(&self) -> Result<u32> {
        self.child.id().context("the process has exited")
    }

    /// The last line of its log (where a service says why it stopped).
    pub(crate) fn last_words(&self) -> String {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("(empty log)")
            .to_owned()
    }

    /// Its log file.
    pub(crate) fn log_path(&self) -> &Path {
        &self.log
    }

    /// Whether the process has exited (and how).
    pub(crate) fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// SIGKILL, and reap it.
    pub(crate) async fn kill(&mut self) -> Result<()> {
        if self.exited().is_none() {
            self.child.start_kill()?;
        }
        self.child.wait().await?;
        Ok(())
    }

    /// Waits until `GET /ready` answers 200 (a command-service: also that it owns at least
    /// `partitions` partitions, when given).
    pub(crate) async fn wait_ready(
        &mut self,
        http: &reqwest::Client,
        partitions: Option<usize>,
        within: Duration,
    ) -> Result<()> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.exited() {
                bail!("{} exited with {status} before it was ready", self.name);
            }
            if let Ok(resp) = http.get(format!("{}/ready", self.base_url)).send().await
                && resp.status().is_success()
            {
                let owned = resp
                    .json::<serde_json::Value>()
                    .await
                    .ok()
                    .and_then(|v| v.get("partitions").and_then(|p| p.as_array()).map(Vec::len));
                if partitions.is_none() || owned >= partitions {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!("{} was not ready within {within:?}", self.name);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
