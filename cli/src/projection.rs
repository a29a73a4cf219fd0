//! The projection-service client: `GET /accounts/{id}` (now, `as_of`, `version`,
//! `min_version`), `GET /accounts/{id}/events` and `GET /accounts`, answered as raw JSON (what
//! `--json` prints; [`crate::output`] gives it shape).
//!
//! Failures become [`CliError`]s here and nowhere else: 404 `AccountNotFound` is
//! [`CliError::NotFound`] (exit 1), 400 is [`CliError::Usage`] (exit 2), and a refused
//! connection, a timeout, a 5xx or an answer that is not the projection's is
//! [`CliError::Unavailable`] (exit 3), always naming the URL that was tried.

use std::time::Duration;

use reqwest::{StatusCode, Url};
use serde_json::Value;

use crate::error::CliError;

/// How long to wait for a TCP connection to the projection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// What `GET /accounts/{id}` should answer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AccountQuery {
    /// `as_of`: the state at this RFC 3339 time.
    pub as_of: Option<String>,
    /// `version`: the state after this many events.
    pub version: Option<u64>,
    /// `min_version`: wait until the projection has reached this version.
    pub min_version: Option<u64>,
}

/// Filters of `GET /accounts`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListQuery {
    /// `active` or `closed`.
    pub status: Option<String>,
    /// Exact owner name.
    pub owner: Option<String>,
    /// Page size.
    pub limit: Option<u32>,
    /// Start after this id.
    pub after: Option<String>,
}

/// How the CLI proves itself to the projection: an API key (`--api-key-file`, else
/// `BANK_API_KEY`, else [`local_key_file`] if it exists) and a CA to trust (`--cacert`, else
/// `BANK_CA_FILE`).
#[derive(Debug, Clone, Default)]
pub struct ClientAccess {
    /// `--api-key-file`: the secret is the file's first line.
    pub api_key_file: Option<std::path::PathBuf>,
    /// `--cacert` / `BANK_CA_FILE`.
    pub ca_file: Option<std::path::PathBuf>,
}

impl ClientAccess {
    /// The key's secret and where it came from, if one was given.
    fn api_key(&self) -> Result<Option<(String, String)>, CliError> {
        if let Some(path) = &self.api_key_file {
            let from = format!("--api-key-file {}", path.display());
            let text = std::fs::read_to_string(path)
                .map_err(|e| CliError::Usage(format!("{from}: {e}")))?;
            let key = text.lines().next().unwrap_or_default().trim().to_owned();
            if key.is_empty() {
                return Err(CliError::Usage(format!("{from} is empty")));
            }
            return Ok(Some((key, from)));
        }
        let from_env = std::env::var("BANK_API_KEY")
            .ok()
            .map(|k| k.trim().to_owned())
            .filter(|k| !k.is_empty())
            .map(|k| (k, "BANK_API_KEY".to_owned()));
        if from_env.is_some() {
            return Ok(from_env);
        }
        match local_key_file().filter(|path| path.is_file()) {
            Some(path) => ClientAccess {
                api_key_file: Some(path),
                ca_file: None,
            }
            .api_key(),
            None => Ok(None),
        }
    }
}

/// Where `scripts/run` keeps the secret of the local key it makes:
/// `$BANK_STATE_DIR/api-key`, by default `~/.local/state/bank-es/api-key`.
pub fn local_key_file() -> Option<std::path::PathBuf> {
    let dir = std::env::var_os("BANK_STATE_DIR")
        .filter(|d| !d.is_empty())
        .map(std::path::PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .map(|home| std::path::PathBuf::from(home).join(".local/state/bank-es"))
        })?;
    Some(dir.join("api-key"))
}

/// A client of one projection-service.
#[derive(Debug, Clone)]
pub struct Projection {
    base: Url,
    http: reqwest::Client,
}

impl Projection {
    /// A client of the projection at `base_url`, giving up on a request after `timeout`, with
    /// the key and CA of `access`.
    pub fn new(
        base_url: &str,
        timeout: Duration,
        access: &ClientAccess,
    ) -> Result<Projection, CliError> {
        let base = Url::parse(base_url)
            .ok()
            .filter(|u| matches!(u.scheme(), "http" | "https") && !u.cannot_be_a_base())
            .ok_or_else(|| {
                CliError::Usage(format!(
                    "projection URL `{base_url}` is not an http:// URL like http://127.0.0.1:8090"
                ))
            })?;
        let mut headers = reqwest::header::HeaderMap::new();
        if let Some((key, from)) = access.api_key()? {
            let mut value = reqwest::header::HeaderValue::from_str(&format!("Bearer {key}"))
                .map_err(|_| CliError::Usage(format!("{from} holds characters no header may")))?;
            value.set_sensitive(true);
            headers.insert(reqwest::header::AUTHORIZATION, value);
        }
        let mut builder = reqwest::Client::builder();
        if let Some(path) = &access.ca_file {
            let shown = path.display();
            let pem = std::fs::read(path)
                .map_err(|e| CliError::Usage(format!("--cacert / BANK_CA_FILE {shown}: {e}")))?;
            // A file with no certificate in it is refused, not taken as "trust nothing more".
            let cas = reqwest::Certificate::from_pem_bundle(&pem)
                .ok()
                .filter(|cas| !cas.is_empty())
                .ok_or_else(|| {
                    CliError::Usage(format!(
                        "--cacert / BANK_CA_FILE {shown} holds no PEM certificate"
                    ))
                })?;
            for ca in cas {
                builder = builder.add_root_certificate(ca);
            }
        }
        let http = builder
            .connect_timeout(CONNECT_TIMEOUT.min(timeout))
            .timeout(timeout)
            .user_agent(concat!("bank-cli/", env!("CARGO_PKG_VERSION")))
            .default_headers(headers)
            .build()
            .map_err(|e| CliError::Unavailable(format!("cannot start an HTTP client: {e}")))?;
        Ok(Projection { base, http })
    }

    /// `GET /accounts/{id}` with the query's parameters.
    pub async fn account(&self, id: &str, query: &AccountQuery) -> Result<Value, CliError> {
        askable(id)?;
        let mut params = Vec::new();
        if let Some(t) = &query.as_of {
            params.push(("as_of", t.clone()));
        }
        if let Some(v) = query.version {
            params.push(("version", v.to_string()));
        }
        if let Some(v) = query.min_version {
            params.push(("min_version", v.to_string()));
        }
        self.get(&["accounts", id], &params).await
    }

    /// `GET /accounts/{id}/events`: the account's event envelopes, oldest first, every page
    /// (the projection answers at most 1000 per request and names the next page in the
    /// `next-after-version` header).
    pub async fn events(&self, id: &str) -> Result<Value, CliError> {
        askable(id)?;
        let mut all = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let params: Vec<(&str, String)> =
                after.iter().map(|a| ("after_version", a.clone())).collect();
            let (page, next) = self
                .get_with_header(
                    &["accounts", id, "events"],
                    &params,
                    Some("next-after-version"),
                )
                .await?;
            match page {
                Value::Array(events) => all.extend(events),
                other => return Ok(other),
            }
            match next {
                Some(next) if after.as_deref() != Some(next.as_str()) => after = Some(next),
                _ => return Ok(Value::Array(all)),
            }
        }
    }

    /// `GET /transfers/{id}`: the transfer with its steps.
    pub async fn transfer(&self, id: &str) -> Result<Value, CliError> {
        self.get(&["transfers", id], &[]).await
    }

    /// `GET /transfers?account=...`: `{"transfers": [...], "next": ...}`.
    pub async fn transfers(
        &self,
        account: &str,
        limit: Option<u32>,
        after: Option<&str>,
    ) -> Result<Value, CliError> {
        let mut params = vec![("account", account.to_owned())];
        if let Some(l) = limit {
            params.push(("limit", l.to_string()));
        }
        if let Some(a) = after {
            params.push(("after", a.to_owned()));
        }
        self.get(&["transfers"], &params).await
    }

    /// `GET /accounts?...`: `{"accounts": [...], "next": ...}`.
    pub async fn list(&self, query: &ListQuery) -> Result<Value, CliError> {
        let mut params = Vec::new();
        if let Some(s) = &query.status {
            params.push(("status", s.clone()));
        }
        if let Some(o) = &query.owner {
            params.push(("owner", o.clone()));
        }
        if let Some(l) = query.limit {
            params.push(("limit", l.to_string()));
        }
        if let Some(a) = &query.after {
            params.push(("after", a.clone()));
        }
        self.get(&["accounts"], &params).await
    }

    /// The URL of `segments` under the base URL (each segment percent-encoded, so an id with
    /// `/` or `?` stays one segment).
    pub fn url(&self, segments: &[&str]) -> Url {
        let mut url = self.base.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().extend(segments);
        }
        url
    }

    async fn get(&self, segments: &[&str], params: &[(&str, String)]) -> Result<Value, CliError> {
        Ok(self.get_with_header(segments, params, None).await?.0)
    }

    /// [`Projection::get`], with the value of the answer's `header` (if asked for and present).
    async fn get_with_header(
        &self,
        segments: &[&str],
        params: &[(&str, String)],
        header: Option<&str>,
    ) -> Result<(Value, Option<String>), CliError> {
        let mut url = self.url(segments);
        if !params.is_empty() {
            url.query_pairs_mut().extend_pairs(params);
        }
        let response = self
            .http
            .get(url.clone())
            .send()
            .await
            .map_err(|e| self.unreachable(&e))?;
        let status = response.status();
        let value = header
            .and_then(|h| response.headers().get(h))
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = response.bytes().await.map_err(|e| self.unreachable(&e))?;
        Ok((classify(self.base.as_str(), status, &body)?, value))
    }

    fn unreachable(&self, e: &reqwest::Error) -> CliError {
        let why = if e.is_timeout() {
            "no answer in time".to_owned()
        } else {
            root_cause(e)
        };
        CliError::Unavailable(format!(
            "cannot reach the projection at {}: {why}",
            display_base(self.base.as_str())
        ))
    }
}

/// Turns an HTTP answer into JSON or the error it stands for.
pub fn classify(base: &str, status: StatusCode, body: &[u8]) -> Result<Value, CliError> {
    let base = display_base(base);
    let json: Option<Value> = serde_json::from_slice(body).ok();
    if status.is_success() {
        return json.ok_or_else(|| {
            CliError::Unavailable(format!(
                "the projection at {base} answered {status} with something that is not JSON: \
                 is it projection-service?"
            ))
        });
    }
    let error = json.as_ref().and_then(|j| j.get("error"));
    let code = error.and_then(|e| e.get("code")).and_then(Value::as_str);
    let message = error
        .and_then(|e| e.get("message"))
        .and_then(Value::as_str)
        .map(str::to_owned);
    match (status, code) {
        (StatusCode::NOT_FOUND, Some(code @ ("AccountNotFound" | "TransferNotFound"))) => {
            Err(CliError::NotFound(message.unwrap_or_else(|| {
                format!(
                    "no such {}",
                    code.trim_end_matches("NotFound").to_lowercase()
                )
            })))
        }
        (StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN, _) => Err(CliError::Usage(format!(
            "the projection at {base} refused the key: {} (give a key with the scope this needs in \
             --api-key-file or BANK_API_KEY; see README, Security)",
            message.unwrap_or_else(|| status.to_string())
        ))),
        (StatusCode::BAD_REQUEST, _) => Err(CliError::Usage(format!(
            "the projection refused the query: {}",
            message.unwrap_or_else(|| String::from_utf8_lossy(body).into_owned())
        ))),
        (_, Some(code)) => Err(CliError::Unavailable(format!(
            "the projection at {base} answered {status} {code}: {}",
            message.unwrap_or_default()
        ))),
        _ => Err(CliError::Unavailable(format!(
            "the projection at {base} answered {status}: is it projection-service?"
        ))),
    }
}

/// `http://host:8090/` → `http://host:8090` (how people write it).
fn display_base(base: &str) -> &str {
    base.strip_suffix('/').unwrap_or(base)
}

/// The innermost error's message, shortened the way people say it: `connection refused`.
fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut inner = e;
    while let Some(source) = inner.source() {
        inner = source;
    }
    let text = inner.to_string();
    let text = match text.find(" (os error") {
        Some(i) => &text[..i],
        None => &text,
    };
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => text.to_owned(),
    }
}

/// An id that can be one path segment: `.` and `..` cannot (URLs resolve them, even
/// percent-encoded, so the request would name another resource, the account list).
fn askable(id: &str) -> Result<(), CliError> {
    if matches!(id, "." | "..") {
        return Err(CliError::Usage(format!(
            "the account id `{id}` cannot be asked for over HTTP (a URL resolves it as a dot \
             segment)"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {

    #[test]
    fn an_unknown_transfer_is_not_found_like_an_unknown_account() {
        // Regression: `bank transfer` waits for the transfer to be projected and took the
        // projection's 404 for a transfer not projected yet as "unreachable" (exit 3).
        let body =
            br#"{"error": {"code": "TransferNotFound", "message": "transfer t does not exist"}}"#;
        let answer = classify("http://p", StatusCode::NOT_FOUND, body);
        assert!(
            matches!(&answer, Err(CliError::NotFound(m)) if m.contains("transfer t")),
            "{answer:?}"
        );
    }

    #[test]
    fn an_api_key_file_gives_its_first_line_and_an_empty_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("key");
        std::fs::write(&file, "  s3cret \nignored\n").unwrap();
        let access = ClientAccess {
            api_key_file: Some(file.clone()),
            ca_file: None,
        };
        let (key, from) = access.api_key().unwrap().unwrap();
        assert_eq!(key, "s3cret");
        assert!(from.contains("--api-key-file"), "{from}");
        std::fs::write(&file, "\n").unwrap();
        let empty = access.api_key().unwrap_err();
        assert!(matches!(empty, CliError::Usage(_)), "{empty}");
        let missing = ClientAccess {
            api_key_file: Some(dir.path().join("none")),
            ca_file: None,
        };
        assert!(matches!(missing.api_key(), Err(CliError::Usage(_))));
        let bad_ca = ClientAccess {
            api_key_file: None,
            ca_file: Some(file),
        };
        let refused = Projection::new("http://127.0.0.1:1", Duration::from_secs(1), &bad_ca);
        assert!(
            matches!(&refused, Err(CliError::Usage(m)) if m.contains("--cacert")),
            "{refused:?}"
        );
    }
    use super::*;

    #[tokio::test]
    async fn dot_segment_ids_are_refused_not_resolved_to_the_list() {
        let p = projection("http://127.0.0.1:1");
        for id in [".", ".."] {
            let refused = p.account(id, &AccountQuery::default()).await;
            assert!(
                matches!(refused, Err(CliError::Usage(_))),
                "{id}: {refused:?}"
            );
            let refused = p.events(id).await;
            assert!(
                matches!(refused, Err(CliError::Usage(_))),
                "{id}: {refused:?}"
            );
        }
        assert!(
            matches!(p.events("...").await, Err(CliError::Unavailable(_))),
            "three dots are an ordinary segment (asked, and the closed port answers)"
        );
    }

    fn projection(base: &str) -> Projection {
        Projection::new(base, Duration::from_secs(1), &ClientAccess::default()).unwrap()
    }

    #[test]
    fn ids_are_one_path_segment() {
        let p = projection("http://127.0.0.1:8090");
        assert_eq!(
            p.url(&["accounts", "acc-1"]).as_str(),
            "http://127.0.0.1:8090/accounts/acc-1"
        );
        assert_eq!(
            p.url(&["accounts", "a/b?c", "events"]).as_str(),
            "http://127.0.0.1:8090/accounts/a%2Fb%3Fc/events"
        );
        let behind_proxy = projection("http://gw/projection/");
        assert_eq!(
            behind_proxy.url(&["accounts"]).as_str(),
            "http://gw/projection/accounts"
        );
    }

    #[test]
    fn bad_urls_are_usage_errors() {
        for bad in ["127.0.0.1:8090", "ftp://x", "nonsense"] {
            assert_eq!(
                Projection::new(bad, Duration::from_secs(1), &ClientAccess::default())
                    .unwrap_err()
                    .exit_code(),
                2,
                "{bad}"
            );
        }
    }

    #[test]
    fn answers_map_to_exit_codes() {
        let base = "http://p:8090/";
        let ok = classify(base, StatusCode::OK, br#"{"id":"acc-1"}"#).unwrap();
        assert_eq!(ok["id"], "acc-1");

        let not_found =
            br#"{"error":{"code":"AccountNotFound","message":"account x does not exist"}}"#;
        let err = classify(base, StatusCode::NOT_FOUND, not_found).unwrap_err();
        assert_eq!(err.exit_code(), 1);
        assert_eq!(err.to_string(), "account x does not exist");

        let bad = br#"{"error":{"code":"InvalidQuery","message":"as_of is bad"}}"#;
        let err = classify(base, StatusCode::BAD_REQUEST, bad).unwrap_err();
        assert_eq!(err.exit_code(), 2);
        assert!(err.to_string().contains("as_of is bad"));

        let not_ready = br#"{"error":{"code":"NotReady","message":"not caught up"}}"#;
        let err = classify(base, StatusCode::SERVICE_UNAVAILABLE, not_ready).unwrap_err();
        assert_eq!(err.exit_code(), 3);
        assert_eq!(
            err.to_string(),
            "the projection at http://p:8090 answered 503 Service Unavailable NotReady: not caught up"
        );

        // Something else listens there (a 404 without our error body, or HTML).
        let err = classify(base, StatusCode::NOT_FOUND, b"nope").unwrap_err();
        assert_eq!(err.exit_code(), 3);
        let err = classify(base, StatusCode::OK, b"<html>").unwrap_err();
        assert_eq!(err.exit_code(), 3);
    }

    #[tokio::test]
    async fn a_closed_port_is_unavailable_and_names_the_url() {
        // Port 1 (tcpmux) is closed on any machine that runs these tests.
        let err = projection("http://127.0.0.1:1")
            .account("acc-1", &AccountQuery::default())
            .await
            .unwrap_err();
        assert_eq!(err.exit_code(), 3);
        assert_eq!(
            err.to_string(),
            "cannot reach the projection at http://127.0.0.1:1: connection refused"
        );
    }
}
