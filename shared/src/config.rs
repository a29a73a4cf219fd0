//! Typed configuration from the environment variables of the wire contract (docs/contract.md), with a
//! clear error naming the variable for every bad value.

use std::net::SocketAddr;
use std::time::Duration;

/// A configuration value that could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{var}={value:?} is invalid: {reason}")]
pub struct ConfigError {
    /// The environment variable.
    pub var: std::borrow::Cow<'static, str>,
    /// Its value.
    pub value: String,
    /// What was expected.
    pub reason: String,
}

/// How to reach Kafka: bootstrap servers plus librdkafka security settings passed through.
/// `Debug` hides the values of secret properties (passwords, keys, tokens).
#[derive(Clone, PartialEq, Eq)]
pub struct KafkaSettings {
    /// `KAFKA_BOOTSTRAP_SERVERS`, comma-separated `host:port`.
    pub bootstrap_servers: String,
    /// librdkafka properties from `KAFKA_SECURITY_PROTOCOL`, `KAFKA_SASL_*` and `KAFKA_SSL_*`
    /// (`KAFKA_SASL_USERNAME` → `sasl.username`).
    pub passthrough: Vec<(String, String)>,
}

/// Whether a librdkafka property holds a secret (its value is never shown).
fn is_secret_property(name: &str) -> bool {
    [
        "password",
        "secret",
        "key.pem",
        "token",
        "oauthbearer.config",
        "jaas",
    ]
    .iter()
    .any(|s| name.contains(s))
}

impl std::fmt::Debug for KafkaSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shown: Vec<(&str, &str)> = self
            .passthrough
            .iter()
            .map(|(k, v)| {
                let v = if is_secret_property(k) {
                    "***"
                } else {
                    v.as_str()
                };
                (k.as_str(), v)
            })
            .collect();
        f.debug_struct("KafkaSettings")
            .field("bootstrap_servers", &self.bootstrap_servers)
            .field("passthrough", &shown)
            .finish()
    }
}

/// A URL with the password of its user info replaced by `***`, for logs and `Debug`.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}{user}:***{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_owned(),
    }
}

/// Every setting of both services and the CLI. `Debug` shows URLs without their passwords and
/// Kafka's secret properties as `***`.
#[derive(Clone, PartialEq, Eq)]
pub struct Settings {
    /// Broker address and security.
    pub kafka: KafkaSettings,
    /// `TOPIC_PREFIX`: topics are `<prefix>.commands`, `<prefix>.events`…
    pub topic_prefix: String,
    /// `PARTITIONS`: partition count for topics the services create.
    pub partitions: i32,
    /// `SCHEMA_REGISTRY_URL`: unset means plain JSON events.
    pub schema_registry_url: Option<String>,
    /// `SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO[_FILE]` and `SCHEMA_REGISTRY_CA_FILE`: how to
    /// reach a registry that asks for credentials or has a private CA.
    pub schema_registry_access: RegistryAccess,
    /// `PROJECTION_DATABASE_URL`: `sqlite://…` or `postgres://…`.
    pub projection_database_url: String,
    /// `COMMAND_HTTP_ADDR`.
    pub command_http_addr: SocketAddr,
    /// `PROJECTION_HTTP_ADDR`.
    pub projection_http_addr: SocketAddr,
    /// `DEFAULT_CURRENCY`: the currency of v1 events, which had none.
    pub default_currency: String,
    /// `INSTANCE_ID`: stable per command-service instance; its transactional id.
    pub instance_id: String,
    /// `COMMIT_INTERVAL_MS`: how long a command-service transaction stays open at most.
    pub commit_interval: Duration,
    /// `SNAPSHOT_EVERY`: an aggregate snapshot every this many events.
    pub snapshot_every: u64,
    /// `CHECKPOINT_EVERY`: a restore checkpoint of a partition (snapshots of every aggregate
    /// changed since the last one) at the latest after this many of the partition's events, so
    /// a restore reads at most about this many events per partition.
    pub checkpoint_every: u64,
    /// `CHECKPOINT_PIECE`: at most this many snapshots go into one transaction; a larger
    /// checkpoint (the first after a replay) is written in pieces, its record last.
    pub checkpoint_piece: u64,
    /// `DEDUPE_WINDOW`: how long a command id is remembered (a retry gets its original result);
    /// beyond it `expected_version` is the protection. Also the results topic's retention.
    pub dedupe_window: Duration,
    /// `COMMAND_STATE_DIR`: where a command-service keeps its local dedupe store (one file per
    /// prefix and INSTANCE_ID); losing it costs a longer restore, never a wrong answer.
    pub command_state_dir: std::path::PathBuf,
    /// `READY_STALL_AFTER`: a command-service whose transactions keep failing commits nothing
    /// for this long reports not ready (`/ready` 503 `Stalled`), so an orchestrator can act.
    pub ready_stall_after: Duration,
    /// `PROJECTION_URL`: where the CLI finds the projection service.
    pub projection_url: String,
    /// `PROJECTION_STALL_AFTER`: a projection whose lag has gone unmeasured this long (no
    /// partition assigned, the watermarks unreadable) reports not ready (`/ready` 503 `Stalled`).
    pub projection_stall_after: Duration,
    /// `PROJECTION_UNKNOWN_SCHEMA_RETRY`: how long an event whose schema id the registry does
    /// not know waits for it before it is dead-lettered (`0s`: at once).
    pub projection_unknown_schema_retry: Duration,
    /// `PROJECTION_GROUP_ID`: the live projection's consumer group; unset, it derives from the
    /// read-model database's identity (`<prefix>.projection.<read_model_id>`).
    pub projection_group_id: Option<String>,
    /// `HTTP_API_KEYS_FILE`, `HTTP_AUTH`, `HTTP_ALLOWED_HOSTS`: who may call the HTTP APIs.
    pub http: crate::auth::HttpSettings,
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field("kafka", &self.kafka)
            .field("topic_prefix", &self.topic_prefix)
            .field("partitions", &self.partitions)
            .field(
                "schema_registry_url",
                &self.schema_registry_url.as_deref().map(redact_url),
            )
            .field("schema_registry_access", &self.schema_registry_access)
            .field(
                "projection_database_url",
                &redact_url(&self.projection_database_url),
            )
            .field("command_http_addr", &self.command_http_addr)
            .field("projection_http_addr", &self.projection_http_addr)
            .field("default_currency", &self.default_currency)
            .field("instance_id", &self.instance_id)
            .field("commit_interval", &self.commit_interval)
            .field("snapshot_every", &self.snapshot_every)
            .field("checkpoint_every", &self.checkpoint_every)
            .field("checkpoint_piece", &self.checkpoint_piece)
            .field("dedupe_window", &self.dedupe_window)
            .field("command_state_dir", &self.command_state_dir)
            .field("ready_stall_after", &self.ready_stall_after)
            .field("projection_url", &redact_url(&self.projection_url))
            .field("projection_stall_after", &self.projection_stall_after)
            .field(
                "projection_unknown_schema_retry",
                &self.projection_unknown_schema_retry,
            )
            .field("projection_group_id", &self.projection_group_id)
            .field("http", &self.http)
            .finish()
    }
}

impl Settings {
    /// Reads the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        let vars: Vec<(String, String)> = std::env::vars().collect();
        Self::from_vars(&vars)
    }

    /// Reads settings from `(name, value)` pairs (the environment, or a test's own list).
    pub fn from_vars(vars: &[(String, String)]) -> Result<Self, ConfigError> {
        let v = Vars(vars);
        let kafka = KafkaSettings {
            bootstrap_servers: v.text("KAFKA_BOOTSTRAP_SERVERS", "localhost:9092"),
            passthrough: v.kafka_passthrough()?,
        };
        let topic_prefix = v.topic_prefix()?;
        let partitions = v.partitions()?;
        let schema_registry_url = v.schema_registry_url()?;
        let schema_registry_access = v.registry_access()?;
        let projection_database_url = v.database_url()?;
        let default_currency = v.currency("DEFAULT_CURRENCY", "USD")?;
        let instance_id = v.get("INSTANCE_ID").unwrap_or_else(default_instance_id);
        let projection_url = v.http_url("PROJECTION_URL", "http://127.0.0.1:8090")?;
        Ok(Settings {
            kafka,
            topic_prefix,
            partitions,
            schema_registry_url,
            schema_registry_access,
            projection_database_url,
            command_http_addr: v.addr("COMMAND_HTTP_ADDR", "127.0.0.1:8080")?,
            projection_http_addr: v.addr("PROJECTION_HTTP_ADDR", "127.0.0.1:8090")?,
            default_currency,
            instance_id,
            commit_interval: Duration::from_millis(v.commit_interval()?),
            snapshot_every: v.positive("SNAPSHOT_EVERY", "100")?,
            checkpoint_every: v.positive("CHECKPOINT_EVERY", "10000")?,
            checkpoint_piece: v.positive("CHECKPOINT_PIECE", "10000")?,
            dedupe_window: v.window("DEDUPE_WINDOW", "7d")?,
            ready_stall_after: v.window("READY_STALL_AFTER", "60s")?,
            command_state_dir: v.get("COMMAND_STATE_DIR").map_or_else(
                || std::env::temp_dir().join("bank-es-command-state"),
                Into::into,
            ),
            projection_url,
            projection_group_id: v.get("PROJECTION_GROUP_ID"),
            projection_stall_after: v.window("PROJECTION_STALL_AFTER", "30s")?,
            projection_unknown_schema_retry: v
                .duration("PROJECTION_UNKNOWN_SCHEMA_RETRY", "30s")?,
            http: v.http()?,
        })
    }
}

/// The `(name, value)` pairs settings are read from, with one reader per kind of value; each
/// error names its variable.
struct Vars<'a>(&'a [(String, String)]);

impl Vars<'_> {
    /// The trimmed value of `name` (the last one wins), `None` when unset or blank.
    fn get(&self, name: &str) -> Option<String> {
        self.0
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.trim().to_owned())
            .filter(|v| !v.is_empty())
    }

    /// `HTTP_API_KEYS_FILE`, `HTTP_AUTH` (unset, or `none`) and `HTTP_ALLOWED_HOSTS` (names
    /// separated by commas).
    fn http(&self) -> Result<crate::auth::HttpSettings, ConfigError> {
        let auth_none = match self.get("HTTP_AUTH") {
            None => false,
            Some(v) if v == "none" => true,
            Some(v) => {
                return Err(invalid(
                    "HTTP_AUTH",
                    &v,
                    "expected `none` (run without keys on purpose) or nothing",
                ));
            }
        };
        let tls = match (
            self.get("HTTP_TLS_CERT_FILE"),
            self.get("HTTP_TLS_KEY_FILE"),
        ) {
            (None, None) => None,
            (Some(cert), Some(key)) => Some(crate::serve::TlsFiles {
                cert: cert.into(),
                key: key.into(),
            }),
            (Some(cert), None) => {
                return Err(invalid(
                    "HTTP_TLS_KEY_FILE",
                    "",
                    &format!("HTTP_TLS_CERT_FILE is {cert}: HTTPS needs the key file too"),
                ));
            }
            (None, Some(key)) => {
                return Err(invalid(
                    "HTTP_TLS_CERT_FILE",
                    "",
                    &format!("HTTP_TLS_KEY_FILE is {key}: HTTPS needs the certificate file too"),
                ));
            }
        };
        let rate_limit =
            u32::try_from(self.positive("HTTP_RATE_LIMIT", "1000")?).unwrap_or(u32::MAX);
        let max_in_flight =
            usize::try_from(self.positive("HTTP_MAX_IN_FLIGHT", "1024")?).unwrap_or(usize::MAX);
        Ok(crate::auth::HttpSettings {
            tls,
            rate_limit,
            max_in_flight,
            api_keys_file: self.get("HTTP_API_KEYS_FILE").map(Into::into),
            auth_none,
            allowed_hosts: self
                .get("HTTP_ALLOWED_HOSTS")
                .map(|v| {
                    v.split(',')
                        .map(|h| h.trim().to_owned())
                        .filter(|h| !h.is_empty())
                        .collect()
                })
                .unwrap_or_default(),
        })
    }

    fn text(&self, name: &str, default: &str) -> String {
        self.get(name).unwrap_or_else(|| default.to_owned())
    }

    fn addr(&self, name: &'static str, default: &str) -> Result<SocketAddr, ConfigError> {
        let v = self.text(name, default);
        v.parse()
            .map_err(|_| invalid(name, &v, "expected an address like 127.0.0.1:8080"))
    }

    fn positive(&self, name: &'static str, default: &str) -> Result<u64, ConfigError> {
        let v = self.text(name, default);
        match v.parse::<u64>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(invalid(
                name,
                &v,
                "expected a whole number greater than zero",
            )),
        }
    }

    /// `COMMIT_INTERVAL_MS`, at most 2000: a transaction must commit well within its 10 s
    /// time-out (the command-service aborts one older than 9 s when its records are written).
    fn commit_interval(&self) -> Result<u64, ConfigError> {
        const NAME: &str = "COMMIT_INTERVAL_MS";
        match self.positive(NAME, "100")? {
            ms if ms <= 2000 => Ok(ms),
            ms => Err(invalid(
                NAME,
                &ms.to_string(),
                "expected at most 2000 (a transaction must commit well within its 10 s time-out)",
            )),
        }
    }

    /// A duration such as `30s` or `2m`; zero allowed.
    fn duration(&self, name: &'static str, default: &str) -> Result<Duration, ConfigError> {
        let v = self.text(name, default);
        humantime::parse_duration(&v).map_err(|e| {
            invalid(
                name,
                &v,
                &format!("expected a duration like 30s or 2m ({e})"),
            )
        })
    }

    fn window(&self, name: &'static str, default: &str) -> Result<Duration, ConfigError> {
        let v = self.text(name, default);
        match humantime::parse_duration(&v) {
            Ok(d) if d >= Duration::from_secs(1) => Ok(d),
            _ => Err(invalid(
                name,
                &v,
                "expected a duration of at least 1s, like 7d, 12h or 30m",
            )),
        }
    }

    /// `KAFKA_SECURITY_PROTOCOL`, `KAFKA_SASL_*` and `KAFKA_SSL_*` as librdkafka properties. A
    /// name ending in `_FILE` names a file holding the value (`KAFKA_SASL_PASSWORD_FILE` →
    /// `sasl.password` read from that file, its trailing newline dropped).
    fn kafka_passthrough(&self) -> Result<Vec<(String, String)>, ConfigError> {
        let mut out = Vec::new();
        for (k, v) in self.0 {
            let Some(rest) = k.strip_prefix("KAFKA_") else {
                continue;
            };
            let wanted = rest == "SECURITY_PROTOCOL"
                || rest.starts_with("SASL_")
                || rest.starts_with("SSL_");
            if !wanted {
                continue;
            }
            let (name, value) = match rest.strip_suffix("_FILE") {
                Some(stem) => (stem, secret_file(k, v)?),
                None => (rest, v.clone()),
            };
            out.push((name.to_ascii_lowercase().replace('_', "."), value));
        }
        Ok(out)
    }

    fn topic_prefix(&self) -> Result<String, ConfigError> {
        let prefix = self.text("TOPIC_PREFIX", "bank");
        let allowed = |c: char| c.is_ascii_alphanumeric() || "._-".contains(c);
        if !prefix.chars().all(allowed) || prefix.len() > 200 {
            return Err(invalid(
                "TOPIC_PREFIX",
                &prefix,
                "use letters, digits, '.', '_' and '-'",
            ));
        }
        Ok(prefix)
    }

    fn partitions(&self) -> Result<i32, ConfigError> {
        let partitions = self.positive("PARTITIONS", "6")?;
        i32::try_from(partitions)
            .ok()
            .filter(|p| *p <= 10_000)
            .ok_or_else(|| invalid("PARTITIONS", &partitions.to_string(), "at most 10000"))
    }

    fn schema_registry_url(&self) -> Result<Option<String>, ConfigError> {
        let url = self.get("SCHEMA_REGISTRY_URL");
        if let Some(url) = &url
            && !is_http(url)
        {
            return Err(invalid(
                "SCHEMA_REGISTRY_URL",
                &redact_url(url),
                "expected an http:// or https:// URL",
            ));
        }
        Ok(url)
    }

    /// `SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO` (`USER:PASSWORD`, Confluent's
    /// `basic.auth.user.info`) or the same from the file `..._FILE` names, and the PEM
    /// certificates of `SCHEMA_REGISTRY_CA_FILE`. Errors never show the credentials.
    fn registry_access(&self) -> Result<RegistryAccess, ConfigError> {
        const INFO: &str = "SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO";
        const INFO_FILE: &str = "SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO_FILE";
        const CA: &str = "SCHEMA_REGISTRY_CA_FILE";
        let info = match (self.get(INFO), self.get(INFO_FILE)) {
            (Some(_), Some(file)) => {
                return Err(invalid(
                    INFO_FILE,
                    &file,
                    &format!("set it or {INFO}, not both"),
                ));
            }
            (Some(info), None) => Some((INFO, info)),
            (None, Some(file)) => Some((INFO_FILE, secret_file(INFO_FILE, &file)?)),
            (None, None) => None,
        };
        let basic_auth = info
            .map(|(var, info)| match info.split_once(':') {
                Some((user, password)) if !user.is_empty() => {
                    Ok((user.to_owned(), password.to_owned()))
                }
                _ => Err(invalid(var, "***", "expected USER:PASSWORD")),
            })
            .transpose()?;
        let ca_pem = self
            .get(CA)
            .map(|file| {
                let pem = std::fs::read(file.trim())
                    .map_err(|e| invalid(CA, &file, &format!("cannot read it: {e}")))?;
                match reqwest::Certificate::from_pem_bundle(&pem) {
                    Ok(certs) if !certs.is_empty() => Ok(pem),
                    _ => Err(invalid(CA, &file, "it holds no PEM certificate")),
                }
            })
            .transpose()?;
        Ok(RegistryAccess { basic_auth, ca_pem })
    }

    /// `PROJECTION_DATABASE_URL`, with the password from `PROJECTION_DATABASE_PASSWORD_FILE`
    /// when that is set (PostgreSQL).
    fn database_url(&self) -> Result<String, ConfigError> {
        let url = self.database_url_text()?;
        let Some(file) = self.get("PROJECTION_DATABASE_PASSWORD_FILE") else {
            return Ok(url);
        };
        const NAME: &str = "PROJECTION_DATABASE_PASSWORD_FILE";
        let password = secret_file(NAME, &file)?;
        let mut parsed = reqwest::Url::parse(&url)
            .ok()
            .filter(|u| u.scheme().starts_with("postgres") && u.has_host())
            .ok_or_else(|| {
                invalid(
                    NAME,
                    &file,
                    "a password file needs PROJECTION_DATABASE_URL=postgres://USER@HOST/DB",
                )
            })?;
        parsed
            .set_password(Some(&password))
            .map_err(|()| invalid(NAME, &file, "the URL cannot take a password"))?;
        Ok(parsed.to_string())
    }

    fn database_url_text(&self) -> Result<String, ConfigError> {
        let url = self.text("PROJECTION_DATABASE_URL", "sqlite://projection.db");
        if !["sqlite:", "postgres://", "postgresql://"]
            .iter()
            .any(|p| url.starts_with(p))
        {
            return Err(invalid(
                "PROJECTION_DATABASE_URL",
                &redact_url(&url),
                "expected sqlite://FILE or postgres://USER@HOST/DB",
            ));
        }
        Ok(url)
    }

    fn currency(&self, name: &'static str, default: &str) -> Result<String, ConfigError> {
        let code = self.text(name, default);
        if code.len() != 3 || !code.bytes().all(|b| b.is_ascii_uppercase()) {
            return Err(invalid(name, &code, "expected an ISO 4217 code like USD"));
        }
        Ok(code)
    }

    fn http_url(&self, name: &'static str, default: &str) -> Result<String, ConfigError> {
        let url = self.text(name, default);
        if !is_http(&url) {
            return Err(invalid(name, &url, "expected an http:// URL"));
        }
        Ok(url)
    }
}

fn is_http(url: &str) -> bool {
    url.starts_with("http://") || url.starts_with("https://")
}

/// The secret in the file `path` names (`var` is the variable, for the error), without its
/// trailing newline. The error never shows the file's content.
fn secret_file(var: &str, path: &str) -> Result<String, ConfigError> {
    std::fs::read_to_string(path.trim())
        .map(|text| text.trim_end_matches(['\n', '\r']).to_owned())
        .map_err(|e| {
            invalid(
                var.to_owned(),
                path,
                &format!("cannot read the secret file: {e}"),
            )
        })
}

fn invalid(
    var: impl Into<std::borrow::Cow<'static, str>>,
    value: &str,
    reason: &str,
) -> ConfigError {
    ConfigError {
        var: var.into(),
        value: value.to_owned(),
        reason: reason.to_owned(),
    }
}

/// How to reach the schema registry beyond its URL: basic credentials and a private CA. Its
/// `Debug` shows neither the password nor the certificates.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct RegistryAccess {
    /// User and password for HTTP basic authentication.
    pub basic_auth: Option<(String, String)>,
    /// PEM certificates trusted besides the system's roots.
    pub ca_pem: Option<Vec<u8>>,
}

impl std::fmt::Debug for RegistryAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryAccess")
            .field(
                "basic_auth",
                &self.basic_auth.as_ref().map(|(user, _)| (user, "***")),
            )
            .field("ca_pem", &self.ca_pem.as_ref().map(|pem| pem.len()))
            .finish()
    }
}

/// `command-service-<host name>`: stable across restarts on one host.
fn default_instance_id() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_owned());
    format!("command-service-{host}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_follow_the_contract() {
        let s = Settings::from_vars(&[]).unwrap();
        assert_eq!(s.kafka.bootstrap_servers, "localhost:9092");
        assert_eq!(s.topic_prefix, "bank");
        assert_eq!(s.partitions, 6);
        assert_eq!(s.schema_registry_url, None);
        assert_eq!(s.projection_database_url, "sqlite://projection.db");
        assert_eq!(s.command_http_addr.to_string(), "127.0.0.1:8080");
        assert_eq!(s.projection_http_addr.to_string(), "127.0.0.1:8090");
        assert_eq!(s.default_currency, "USD");
        assert_eq!(s.commit_interval, Duration::from_millis(100));
        assert_eq!(s.snapshot_every, 100);
        assert_eq!(s.checkpoint_every, 10_000);
        assert_eq!(s.dedupe_window, Duration::from_secs(7 * 24 * 3600));
        assert_eq!(s.projection_url, "http://127.0.0.1:8090");
        assert!(s.instance_id.starts_with("command-service-"));
    }

    #[test]
    fn bad_values_name_the_variable() {
        for (var, value) in [
            ("PARTITIONS", "0"),
            ("PARTITIONS", "six"),
            ("COMMIT_INTERVAL_MS", "-5"),
            ("COMMIT_INTERVAL_MS", "60000"),
            ("COMMAND_HTTP_ADDR", "localhost"),
            ("DEFAULT_CURRENCY", "euro"),
            ("PROJECTION_DATABASE_URL", "mysql://x"),
            ("SCHEMA_REGISTRY_URL", "registry:8081"),
            ("TOPIC_PREFIX", "bank events"),
            ("DEDUPE_WINDOW", "forever"),
            ("DEDUPE_WINDOW", "10ms"),
            ("CHECKPOINT_EVERY", "0"),
        ] {
            let err = Settings::from_vars(&vars(&[(var, value)])).unwrap_err();
            assert_eq!(err.var, var);
            assert!(err.to_string().contains(var), "{err}");
        }
    }

    #[test]
    fn dedupe_window_takes_human_durations() {
        let s = Settings::from_vars(&vars(&[("DEDUPE_WINDOW", "36h")])).unwrap();
        assert_eq!(s.dedupe_window, Duration::from_secs(36 * 3600));
    }

    #[test]
    fn security_settings_pass_through_to_librdkafka() {
        let s = Settings::from_vars(&vars(&[
            ("KAFKA_SECURITY_PROTOCOL", "SASL_SSL"),
            ("KAFKA_SASL_MECHANISM", "SCRAM-SHA-512"),
            ("KAFKA_SSL_CA_LOCATION", "/etc/ca.pem"),
            ("KAFKA_BOOTSTRAP_SERVERS", "b1:9092,b2:9092"),
            ("KAFKA_UNRELATED", "x"),
        ]))
        .unwrap();
        assert_eq!(s.kafka.bootstrap_servers, "b1:9092,b2:9092");
        assert_eq!(
            s.kafka.passthrough,
            vec![
                ("security.protocol".to_string(), "SASL_SSL".to_string()),
                ("sasl.mechanism".to_string(), "SCRAM-SHA-512".to_string()),
                ("ssl.ca.location".to_string(), "/etc/ca.pem".to_string()),
            ]
        );
    }

    #[test]
    fn secrets_come_from_files_and_never_show_in_debug() {
        let dir = std::env::temp_dir().join(format!("secrets-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let kafka = dir.join("kafka");
        let db = dir.join("db");
        std::fs::write(&kafka, "kafka-sentinel-5e1\n").unwrap();
        std::fs::write(&db, "db sentinel/7e2\n").unwrap();
        let s = Settings::from_vars(&vars(&[
            ("KAFKA_SASL_USERNAME", "bank"),
            ("KAFKA_SASL_PASSWORD_FILE", kafka.to_str().unwrap()),
            ("PROJECTION_DATABASE_URL", "postgres://bank@db.local/bank"),
            ("PROJECTION_DATABASE_PASSWORD_FILE", db.to_str().unwrap()),
            (
                "SCHEMA_REGISTRY_URL",
                "http://user:registry-sentinel-9f3@registry:8081",
            ),
        ]))
        .unwrap();
        assert!(
            s.kafka
                .passthrough
                .contains(&("sasl.password".into(), "kafka-sentinel-5e1".into()))
        );
        assert_eq!(
            s.projection_database_url,
            "postgres://bank:db%20sentinel%2F7e2@db.local/bank"
        );
        let shown = format!("{s:?} {s:#?}");
        for secret in [
            "kafka-sentinel",
            "sentinel%2F7e2",
            "db sentinel",
            "registry-sentinel",
        ] {
            assert!(!shown.contains(secret), "{secret} in {shown}");
        }
        assert!(shown.contains("sasl.username") && shown.contains("bank"));
        let missing = Settings::from_vars(&vars(&[("KAFKA_SASL_PASSWORD_FILE", "/nonexistent")]))
            .unwrap_err()
            .to_string();
        assert!(missing.contains("KAFKA_SASL_PASSWORD_FILE"), "{missing}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn registry_credentials_come_from_a_file_and_are_checked_without_showing_them() {
        let dir = std::env::temp_dir().join(format!("registry-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let info = dir.join("info");
        std::fs::write(&info, "bank:reg-sentinel:with-colon\n").unwrap();
        let not_pem = dir.join("not.pem");
        std::fs::write(&not_pem, "no certificate here").unwrap();
        let info_path = info.to_str().unwrap();
        let s = Settings::from_vars(&vars(&[(
            "SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO_FILE",
            info_path,
        )]))
        .unwrap();
        assert_eq!(
            s.schema_registry_access.basic_auth,
            Some(("bank".into(), "reg-sentinel:with-colon".into()))
        );
        assert!(!format!("{s:?}").contains("reg-sentinel"));
        let error = |pairs: &[(&str, &str)]| Settings::from_vars(&vars(pairs)).unwrap_err();
        let both = error(&[
            ("SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO", "bank:x"),
            ("SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO_FILE", info_path),
        ]);
        assert!(both.to_string().contains("not both"), "{both}");
        let no_colon = error(&[("SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO", "reg-sentinel")]);
        assert!(no_colon.to_string().contains("USER:PASSWORD"), "{no_colon}");
        assert!(!no_colon.to_string().contains("reg-sentinel"), "{no_colon}");
        let ca = error(&[("SCHEMA_REGISTRY_CA_FILE", not_pem.to_str().unwrap())]);
        assert!(ca.to_string().contains("no PEM certificate"), "{ca}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
