//! Who may call the HTTP APIs, the same way in both services: API keys with scopes read from
//! `HTTP_API_KEYS_FILE`, the `Host` check that keeps DNS-rebinding pages out, and the rule that
//! a listener reachable beyond loopback never runs open by accident.
//!
//! A service builds one [`HttpAccess`] at start ([`HttpAccess::for_listener`]), puts
//! [`host_check`] on its whole router and [`scope_check`] on each route that needs a [`Scope`]. A request that passes carries its [`Caller`] (the key id) in its
//! extensions. Refusals answer the services' one error shape, `{"error": {"code", "message"}}`:
//! 401 `Unauthenticated` (with `WWW-Authenticate: Bearer`), 403 `Forbidden`, 421 `ForeignHost`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// What a key may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scope {
    /// `POST /commands`.
    CommandsWrite,
    /// Accounts, their events, transfers, `/status` and the explorer's data.
    AccountsRead,
    /// `GET /metrics`.
    MetricsRead,
    /// Dead letters, replays and rebuilds.
    Admin,
}

impl Scope {
    /// Every scope, in the order the contract lists them.
    pub const ALL: [Scope; 4] = [
        Scope::CommandsWrite,
        Scope::AccountsRead,
        Scope::MetricsRead,
        Scope::Admin,
    ];

    /// The scope's name in the keys file.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::CommandsWrite => "commands:write",
            Scope::AccountsRead => "accounts:read",
            Scope::MetricsRead => "metrics:read",
            Scope::Admin => "admin",
        }
    }

    fn parse(text: &str) -> Option<Scope> {
        Scope::ALL.into_iter().find(|s| s.as_str() == text)
    }
}

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One key: its id (the principal recorded in events), the SHA-256 of its secret, its scopes.
/// `Debug` shows the id and scopes only.
#[derive(Clone)]
struct ApiKey {
    id: String,
    hash: [u8; 32],
    scopes: Vec<Scope>,
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiKey")
            .field("id", &self.id)
            .field("scopes", &self.scopes)
            .finish_non_exhaustive()
    }
}

/// The keys of `HTTP_API_KEYS_FILE`.
#[derive(Debug, Clone)]
pub struct ApiKeys {
    keys: Vec<ApiKey>,
}

/// Why the keys file cannot be used: the service does not start.
#[derive(Debug, thiserror::Error)]
pub enum KeysFileError {
    /// The file cannot be read.
    #[error("HTTP_API_KEYS_FILE {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A line is not `<key_id> <sha256 hex of the secret> <scope>[,<scope>…]`.
    #[error("HTTP_API_KEYS_FILE {path} line {line}: {reason}")]
    Line {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong with it.
        reason: String,
    },
    /// No key at all (a file of comments would lock every route).
    #[error("HTTP_API_KEYS_FILE {path} holds no key")]
    Empty {
        /// The file.
        path: PathBuf,
    },
}

/// The SHA-256 of a secret in hex: the second field of a keys-file line.
pub fn hash_secret(secret: &str) -> String {
    Sha256::digest(secret.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn parse_hash(text: &str) -> Option<[u8; 32]> {
    if text.len() != 64 || !text.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

impl ApiKeys {
    /// Reads and checks the keys file.
    pub fn load(path: &Path) -> Result<ApiKeys, KeysFileError> {
        let text = std::fs::read_to_string(path).map_err(|source| KeysFileError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Reads the keys from the text of a keys file (`path` names it in errors).
    pub fn parse(text: &str, path: &Path) -> Result<ApiKeys, KeysFileError> {
        let mut keys: Vec<ApiKey> = Vec::new();
        for (n, raw) in text.lines().enumerate() {
            let line = raw.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let bad = |reason: String| KeysFileError::Line {
                path: path.to_owned(),
                line: n + 1,
                reason,
            };
            let fields: Vec<&str> = line.split_whitespace().collect();
            let [id, hash, scopes] = fields[..] else {
                return Err(bad(format!(
                    "expected `<key_id> <sha256 hex of the secret> <scope>[,<scope>...]`, \
                     found {} field(s)",
                    fields.len()
                )));
            };
            crate::aggregate::check_text("the key id", id).map_err(&bad)?;
            if keys.iter().any(|k| k.id == id) {
                return Err(bad(format!("key id `{id}` is listed twice")));
            }
            let hash = parse_hash(&hash.to_ascii_lowercase()).ok_or_else(|| {
                bad("the second field must be the 64 hex digits of the secret's SHA-256".into())
            })?;
            let scopes = scopes
                .split(',')
                .map(|s| {
                    Scope::parse(s.trim()).ok_or_else(|| {
                        bad(format!(
                            "unknown scope `{s}` (known: {})",
                            Scope::ALL.map(Scope::as_str).join(", ")
                        ))
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            keys.push(ApiKey {
                id: id.to_owned(),
                hash,
                scopes,
            });
        }
        if keys.is_empty() {
            return Err(KeysFileError::Empty {
                path: path.to_owned(),
            });
        }
        Ok(ApiKeys { keys })
    }

    /// The key whose secret this is. Every key is compared, each in constant time.
    fn find(&self, secret: &str) -> Option<&ApiKey> {
        let hash: [u8; 32] = Sha256::digest(secret.as_bytes()).into();
        let mut found = None;
        for key in &self.keys {
            if bool::from(key.hash.ct_eq(&hash)) {
                found = Some(key);
            }
        }
        found
    }
}

/// The HTTP settings of both services (`HTTP_API_KEYS_FILE`, `HTTP_AUTH`, `HTTP_ALLOWED_HOSTS`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HttpSettings {
    /// `HTTP_API_KEYS_FILE`.
    pub api_keys_file: Option<PathBuf>,
    /// `HTTP_AUTH=none`: run without keys even on a non-loopback address.
    pub auth_none: bool,
    /// `HTTP_ALLOWED_HOSTS`: extra `Host` names accepted besides localhost, 127.0.0.1, [::1]
    /// and the bound address.
    pub allowed_hosts: Vec<String>,
    /// `HTTP_TLS_CERT_FILE` and `HTTP_TLS_KEY_FILE`: HTTPS only on the listener.
    pub tls: Option<crate::serve::TlsFiles>,
    /// `HTTP_RATE_LIMIT`: requests per second each key may make (bursts up to as many); 0 in
    /// `Default`, which the settings never give (their default is 1000).
    pub rate_limit: u32,
    /// `HTTP_MAX_IN_FLIGHT`: requests served at once (beyond: 503 `Overloaded` at once, never
    /// queued); 0 in `Default` means no bound, which the settings never give (their default is
    /// 1024).
    pub max_in_flight: usize,
}

/// Why a service will not serve its listener.
#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    /// The keys file is unusable.
    #[error(transparent)]
    Keys(#[from] KeysFileError),
    /// Reachable beyond loopback without keys, and not explicitly allowed.
    #[error(
        "{service} listens on {addr}, beyond loopback, without HTTP_API_KEYS_FILE: anyone who \
         reaches it could use every route. Set HTTP_API_KEYS_FILE (see README, Security), bind \
         to 127.0.0.1, or set HTTP_AUTH=none to run open on purpose"
    )]
    OpenBeyondLoopback {
        /// The service.
        service: String,
        /// The bound address.
        addr: SocketAddr,
    },
}

/// Who is calling: the key id, or nobody when the service runs without keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The key id (`None` without keys).
    pub principal: Option<String>,
}

/// A refused request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denied {
    /// No key, or one this service does not know.
    Unauthenticated(&'static str),
    /// A known key without the route's scope.
    Forbidden(Scope),
    /// A `Host` this service does not answer to (a DNS-rebinding page, a misrouted request).
    ForeignHost(String),
    /// The key made more requests than `HTTP_RATE_LIMIT` allows: try again after this long.
    TooManyRequests(std::time::Duration),
    /// `HTTP_MAX_IN_FLIGHT` requests are being served already.
    Overloaded,
}

impl Denied {
    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            Denied::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            Denied::Forbidden(_) => StatusCode::FORBIDDEN,
            Denied::ForeignHost(_) => StatusCode::MISDIRECTED_REQUEST,
            Denied::TooManyRequests(_) => StatusCode::TOO_MANY_REQUESTS,
            Denied::Overloaded => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The stable error code.
    pub fn code(&self) -> &'static str {
        match self {
            Denied::Unauthenticated(_) => "Unauthenticated",
            Denied::Forbidden(_) => "Forbidden",
            Denied::ForeignHost(_) => "ForeignHost",
            Denied::TooManyRequests(_) => "TooManyRequests",
            Denied::Overloaded => "Overloaded",
        }
    }

    fn message(&self) -> String {
        match self {
            Denied::Unauthenticated(why) => format!("{why}: send `Authorization: Bearer <key>`"),
            Denied::Forbidden(scope) => format!("this key lacks the scope `{scope}`"),
            Denied::ForeignHost(host) => format!(
                "this service does not answer to Host `{host}` (HTTP_ALLOWED_HOSTS lists the \
                 names it does)"
            ),
            Denied::TooManyRequests(wait) => format!(
                "this key made more requests per second than HTTP_RATE_LIMIT allows; retry in \
                 {} ms",
                wait.as_millis()
            ),
            Denied::Overloaded => "this service is serving as many requests as \
                 HTTP_MAX_IN_FLIGHT allows; retry in a moment"
                .to_owned(),
        }
    }
}

impl IntoResponse for Denied {
    fn into_response(self) -> Response {
        let body = serde_json::json!({"error": {"code": self.code(), "message": self.message()}});
        let mut response = (self.status(), axum::Json(body)).into_response();
        match self {
            Denied::Unauthenticated(_) => {
                response
                    .headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            Denied::TooManyRequests(wait) => {
                let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(seconds.max(1)));
            }
            Denied::Overloaded => {
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(1u64));
            }
            _ => {}
        }
        response
    }
}

/// Requests per key and second ([`governor`]'s keyed GCRA limiter).
type KeyLimiter = governor::DefaultKeyedRateLimiter<String>;

/// The access rules of one listener: its keys (none: open), each key's rate limit, and the
/// `Host` names it answers to.
#[derive(Clone)]
pub struct HttpAccess {
    keys: Option<Arc<ApiKeys>>,
    limiter: Option<Arc<KeyLimiter>>,
    hosts: Arc<Vec<String>>,
    /// One permit per request in flight (`HTTP_MAX_IN_FLIGHT`).
    in_flight: Arc<tokio::sync::Semaphore>,
}

impl std::fmt::Debug for HttpAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpAccess")
            .field("keys", &self.keys)
            .field("hosts", &self.hosts)
            .finish_non_exhaustive()
    }
}

/// The name part of a `Host` value, lower-cased: `[::1]:80` → `[::1]`, `a:80` → `a`.
fn host_name(host: &str) -> String {
    let host = host.trim().to_ascii_lowercase();
    if host.starts_with('[') {
        return host.split_inclusive(']').next().unwrap_or("").to_owned();
    }
    host.split(':').next().unwrap_or("").to_owned()
}

impl HttpAccess {
    /// The rules of `service`'s listener bound to `addr`: with `HTTP_API_KEYS_FILE`, its keys;
    /// without, open on loopback (with a warning) or with `HTTP_AUTH=none`, else refused.
    pub fn for_listener(
        settings: &HttpSettings,
        addr: SocketAddr,
        service: &str,
    ) -> Result<HttpAccess, AccessError> {
        let keys = match &settings.api_keys_file {
            Some(path) => Some(Arc::new(ApiKeys::load(path)?)),
            None if addr.ip().is_loopback() => {
                tracing::warn!(
                    %addr,
                    "{service} runs without HTTP_API_KEYS_FILE: every route is open to anyone who \
                     can reach this loopback address (see README, Security)"
                );
                None
            }
            None if settings.auth_none => {
                tracing::warn!(%addr, "{service} runs open beyond loopback: HTTP_AUTH=none");
                None
            }
            None => {
                return Err(AccessError::OpenBeyondLoopback {
                    service: service.to_owned(),
                    addr,
                });
            }
        };
        let mut hosts: Vec<String> = ["localhost", "127.0.0.1", "[::1]"]
            .iter()
            .map(|h| (*h).to_owned())
            .collect();
        hosts.push(host_name(&addr.to_string()));
        hosts.extend(settings.allowed_hosts.iter().map(|h| host_name(h)));
        let limiter = std::num::NonZeroU32::new(settings.rate_limit)
            .filter(|_| keys.is_some())
            .map(|n| Arc::new(KeyLimiter::keyed(governor::Quota::per_second(n))));
        let permits = match settings.max_in_flight {
            0 => tokio::sync::Semaphore::MAX_PERMITS,
            n => n.min(tokio::sync::Semaphore::MAX_PERMITS),
        };
        Ok(HttpAccess {
            keys,
            limiter,
            hosts: Arc::new(hosts),
            in_flight: Arc::new(tokio::sync::Semaphore::new(permits)),
        })
    }

    /// Refuses a request whose `Host` (or HTTP/2 authority) names none of this listener's hosts:
    /// `localhost`, the bound address, `HTTP_ALLOWED_HOSTS`, or any IP address (a DNS-rebinding
    /// page always sends its own domain name).
    pub fn check_host(&self, request: &Request) -> Result<(), Denied> {
        let host = request
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .map(str::to_owned)
            .or_else(|| request.uri().authority().map(|a| a.to_string()))
            .unwrap_or_default();
        let name = host_name(&host);
        // An address is never a rebinding: a page served from it is the service's own origin.
        let literal = name
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok();
        if literal || self.hosts.contains(&name) {
            Ok(())
        } else {
            Err(Denied::ForeignHost(host))
        }
    }

    /// The caller of a request that needs `scope`, or why it is refused.
    pub fn authorize(&self, headers: &HeaderMap, scope: Scope) -> Result<Caller, Denied> {
        let Some(keys) = &self.keys else {
            return Ok(Caller { principal: None });
        };
        let value = headers
            .get(header::AUTHORIZATION)
            .ok_or(Denied::Unauthenticated("no API key"))?;
        let secret = value
            .to_str()
            .ok()
            .and_then(|v| {
                let (kind, secret) = v.trim().split_once(' ')?;
                kind.eq_ignore_ascii_case("bearer").then(|| secret.trim())
            })
            .ok_or(Denied::Unauthenticated(
                "the Authorization header is not a Bearer key",
            ))?;
        let key = keys
            .find(secret)
            .ok_or(Denied::Unauthenticated("unknown API key"))?;
        if !key.scopes.contains(&scope) {
            return Err(Denied::Forbidden(scope));
        }
        if let Some(limiter) = &self.limiter
            && let Err(not_until) = limiter.check_key(&key.id)
        {
            use governor::clock::{Clock, DefaultClock};
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            return Err(Denied::TooManyRequests(wait));
        }
        Ok(Caller {
            principal: Some(key.id.clone()),
        })
    }
}

/// Routes outside the `HTTP_MAX_IN_FLIGHT` bound: an orchestrator's probes still answer while
/// the service sheds load.
const PROBES: [&str; 2] = ["/health", "/ready"];

/// Middleware for a whole router (`axum::middleware::from_fn_with_state(access, host_check)`):
/// the `Host` check on every request, then the bound on requests in flight (beyond it 503
/// `Overloaded` at once, the probes excepted).
pub async fn host_check(
    State(access): State<HttpAccess>,
    request: Request,
    next: Next,
) -> Response {
    if let Err(denied) = access.check_host(&request) {
        return denied.into_response();
    }
    if PROBES.contains(&request.uri().path()) {
        return next.run(request).await;
    }
    let Ok(_permit) = Arc::clone(&access.in_flight).try_acquire_owned() else {
        return Denied::Overloaded.into_response();
    };
    next.run(request).await
}

/// Route middleware requiring a scope (`from_fn_with_state((access, scope), scope_check)`); the
/// [`Caller`] goes into the request's extensions.
pub async fn scope_check(
    State((access, scope)): State<(HttpAccess, Scope)>,
    mut request: Request,
    next: Next,
) -> Response {
    match access.authorize(request.headers(), scope) {
        Ok(caller) => {
            request.extensions_mut().insert(caller);
            next.run(request).await
        }
        Err(denied) => denied.into_response(),
    }
}

/// Documents the access rules in an OpenAPI document: the `bearer` security scheme, and on each
/// operation of the `secured` paths its requirement (the scope in the description) and its 401
/// and 403 answers.
#[cfg(feature = "openapi")]
pub fn document_access(openapi: &mut utoipa::openapi::OpenApi, secured: &[(&str, Scope)]) {
    use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityRequirement, SecurityScheme};
    use utoipa::openapi::{RefOr, ResponseBuilder};
    let mut scheme = Http::new(HttpAuthScheme::Bearer);
    scheme.description = Some(
        "An API key's secret from HTTP_API_KEYS_FILE (`Authorization: Bearer <secret>`); without \
         that file the service runs open"
            .into(),
    );
    openapi
        .components
        .get_or_insert_with(Default::default)
        .add_security_scheme("bearer", SecurityScheme::Http(scheme));
    for (path, item) in openapi.paths.paths.iter_mut() {
        if !PROBES.contains(&path.as_str()) {
            for operation in [&mut item.get, &mut item.post].into_iter().flatten() {
                document_overload(operation);
            }
        }
        let Some((_, scope)) = secured.iter().find(|(p, _)| p == path) else {
            continue;
        };
        for operation in [&mut item.get, &mut item.post].into_iter().flatten() {
            operation.security = Some(vec![SecurityRequirement::new(
                "bearer",
                Vec::<String>::new(),
            )]);
            let answers = [
                (
                    "401",
                    "No key, or an unknown one (`Unauthenticated`)".to_owned(),
                ),
                (
                    "403",
                    format!("The key lacks the scope `{scope}` (`Forbidden`)"),
                ),
            ];
            for (status, description) in answers {
                operation.responses.responses.insert(
                    status.into(),
                    RefOr::T(ResponseBuilder::new().description(description).build()),
                );
            }
        }
    }
}

/// Adds the `HTTP_MAX_IN_FLIGHT` answer (503 `Overloaded`) to an operation's 503, or as its 503.
#[cfg(feature = "openapi")]
fn document_overload(operation: &mut utoipa::openapi::path::Operation) {
    use utoipa::openapi::{RefOr, ResponseBuilder};
    const OVERLOADED: &str =
        "as many requests in flight as HTTP_MAX_IN_FLIGHT allows (`Overloaded`, `Retry-After: 1`)";
    let responses = &mut operation.responses.responses;
    match responses.get_mut("503") {
        Some(RefOr::T(existing)) => {
            existing.description = format!("{}; or {OVERLOADED}", existing.description);
        }
        Some(RefOr::Ref(_)) => {}
        None => {
            let mut first = OVERLOADED.to_owned();
            first[..1].make_ascii_uppercase();
            responses.insert(
                "503".into(),
                RefOr::T(ResponseBuilder::new().description(first).build()),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(text: &str) -> Result<ApiKeys, KeysFileError> {
        ApiKeys::parse(text, Path::new("keys"))
    }

    #[test]
    fn a_keys_file_names_the_line_that_is_wrong() {
        let good = hash_secret("s3cret");
        let text = format!("# ops\n\nops {good} commands:write,accounts:read # the team\n");
        let parsed = keys(&text).unwrap();
        assert_eq!(parsed.find("s3cret").map(|k| k.id.as_str()), Some("ops"));
        assert!(parsed.find("other").is_none());
        for (text, line, says) in [
            (format!("a {good}\n"), 1, "found 2 field(s)"),
            ("\na abc commands:write\n".to_string(), 2, "64 hex digits"),
            (
                format!("a {good} commands:read\n"),
                1,
                "unknown scope `commands:read`",
            ),
            (
                format!("a {good} admin\na {good} admin\n"),
                2,
                "listed twice",
            ),
        ] {
            let error = keys(&text).unwrap_err().to_string();
            assert!(
                error.contains(&format!("line {line}:")) && error.contains(says),
                "{error}"
            );
        }
        assert!(matches!(keys("# none\n"), Err(KeysFileError::Empty { .. })));
    }

    #[test]
    fn scopes_and_hosts_are_checked() {
        let dir = std::env::temp_dir().join(format!("keys-{}", uuid::Uuid::new_v4()));
        std::fs::write(&dir, format!("reader {} accounts:read\n", hash_secret("r"))).unwrap();
        let settings = HttpSettings {
            api_keys_file: Some(dir.clone()),
            allowed_hosts: vec!["bank.example".into()],
            rate_limit: 2,
            ..HttpSettings::default()
        };
        let access =
            HttpAccess::for_listener(&settings, "0.0.0.0:8090".parse().unwrap(), "t").unwrap();
        std::fs::remove_file(&dir).unwrap();
        let with = |value: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::AUTHORIZATION, value.parse().unwrap());
            h
        };
        assert_eq!(
            access.authorize(&with("Bearer r"), Scope::AccountsRead),
            Ok(Caller {
                principal: Some("reader".into())
            })
        );
        assert_eq!(
            access.authorize(&with("Bearer r"), Scope::Admin),
            Err(Denied::Forbidden(Scope::Admin))
        );
        assert!(matches!(
            access.authorize(&with("Bearer x"), Scope::AccountsRead),
            Err(Denied::Unauthenticated(_))
        ));
        assert!(matches!(
            access.authorize(&HeaderMap::new(), Scope::AccountsRead),
            Err(Denied::Unauthenticated(_))
        ));
        // Two a second per key: a third at once is refused, with the time to wait.
        assert!(
            access
                .authorize(&with("Bearer r"), Scope::AccountsRead)
                .is_ok()
        );
        let refused = access.authorize(&with("Bearer r"), Scope::AccountsRead);
        let Err(Denied::TooManyRequests(wait)) = refused else {
            panic!("{refused:?}")
        };
        assert!(wait <= std::time::Duration::from_secs(1), "{wait:?}");
        let answer = Denied::TooManyRequests(wait).into_response();
        assert_eq!(answer.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(answer.headers()[header::RETRY_AFTER], "1");
        let request = |host: &str| {
            axum::http::Request::builder()
                .header(header::HOST, host)
                .body(axum::body::Body::empty())
                .unwrap()
        };
        for host in [
            "localhost:8090",
            "127.0.0.1",
            "[::1]:8090",
            "BANK.example",
            "10.1.2.3:8090",
        ] {
            assert_eq!(access.check_host(&request(host)), Ok(()), "{host}");
        }
        assert!(access.check_host(&request("evil.example:8090")).is_err());
        assert!(
            access
                .check_host(&request("127.0.0.1.evil.example"))
                .is_err()
        );
    }

    #[tokio::test]
    async fn requests_beyond_the_in_flight_bound_are_shed_at_once_and_probes_still_answer() {
        let settings = HttpSettings {
            max_in_flight: 1,
            ..HttpSettings::default()
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let access = HttpAccess::for_listener(&settings, addr, "t").unwrap();
        let (entered, release) = (
            Arc::new(tokio::sync::Notify::new()),
            Arc::new(tokio::sync::Notify::new()),
        );
        let slow = {
            let (entered, release) = (Arc::clone(&entered), Arc::clone(&release));
            move || async move {
                entered.notify_one();
                release.notified().await;
                "done"
            }
        };
        let app = axum::Router::new()
            .route("/slow", axum::routing::get(slow))
            .route("/fast", axum::routing::get(|| async { "fast" }))
            .route("/health", axum::routing::get(|| async { "ok" }))
            .layer(axum::middleware::from_fn_with_state(access, host_check));
        tokio::spawn(crate::serve::serve(
            listener,
            app,
            None,
            std::future::pending(),
        ));
        let http = reqwest::Client::new();
        let get = |path: &str| http.get(format!("http://{addr}{path}")).send();
        let first = tokio::spawn(get("/slow"));
        entered.notified().await;
        let shed = get("/fast").await.unwrap();
        assert_eq!(shed.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(shed.headers()[header::RETRY_AFTER], "1");
        let body: serde_json::Value = shed.json().await.unwrap();
        assert_eq!(body["error"]["code"], "Overloaded", "{body}");
        assert_eq!(get("/health").await.unwrap().status(), StatusCode::OK);
        release.notify_one();
        assert_eq!(first.await.unwrap().unwrap().status(), StatusCode::OK);
        // The permit came back with the answer.
        assert_eq!(get("/fast").await.unwrap().status(), StatusCode::OK);
    }

    #[test]
    fn without_keys_only_loopback_or_an_explicit_choice_runs_open() {
        let open = HttpSettings::default();
        let loopback = HttpAccess::for_listener(&open, "127.0.0.1:1".parse().unwrap(), "t");
        assert!(loopback.unwrap().keys.is_none());
        let wide = HttpAccess::for_listener(&open, "0.0.0.0:1".parse().unwrap(), "t");
        assert!(wide.unwrap_err().to_string().contains("HTTP_API_KEYS_FILE"));
        let chosen = HttpSettings {
            auth_none: true,
            ..HttpSettings::default()
        };
        assert!(HttpAccess::for_listener(&chosen, "0.0.0.0:1".parse().unwrap(), "t").is_ok());
    }
}
