//! Serving a service's router on its listener (through `axum-server`): plain HTTP, or HTTPS only
//! when `HTTP_TLS_CERT_FILE` and `HTTP_TLS_KEY_FILE` are set (rustls), with the same graceful
//! stop either way (in-flight requests finish, new connections are refused) and a bound on how
//! long a client may take to send its request headers (a slow client holds no connection open
//! for ever).

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use axum::Router;
use tokio::net::TcpListener;

/// The certificate chain and key of an HTTPS listener (PEM files).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// `HTTP_TLS_CERT_FILE`: the certificate chain, leaf first.
    pub cert: PathBuf,
    /// `HTTP_TLS_KEY_FILE`: its private key.
    pub key: PathBuf,
}

/// How long a client may take to send a request's headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Loads the TLS configuration `settings` ask for (`None`: plain HTTP), so that a bad file stops
/// the start (before anything else runs) with a message naming it.
pub async fn tls_config(
    settings: &crate::auth::HttpSettings,
) -> std::io::Result<Option<axum_server::tls_rustls::RustlsConfig>> {
    let Some(files) = &settings.tls else {
        return Ok(None);
    };
    // Several crypto back-ends are linked in (through other crates): name the one to use.
    let _ = rustls::crypto::ring::default_provider().install_default();
    axum_server::tls_rustls::RustlsConfig::from_pem_file(&files.cert, &files.key)
        .await
        .map(Some)
        .map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!(
                    "HTTP_TLS_CERT_FILE {} / HTTP_TLS_KEY_FILE {}: {e}",
                    files.cert.display(),
                    files.key.display()
                ),
            )
        })
}

/// Serves `app` on `listener` until `stop` resolves, then drains (every in-flight request
/// finishes, as long as it takes): over HTTPS with `tls`, plain HTTP without.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    tls: Option<axum_server::tls_rustls::RustlsConfig>,
    stop: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let handle = axum_server::Handle::new();
    let draining = handle.clone();
    tokio::spawn(async move {
        stop.await;
        draining.graceful_shutdown(None);
    });
    let listener = listener.into_std()?;
    let app = app.into_make_service();
    match tls {
        None => {
            let mut server = axum_server::from_tcp(listener)?.handle(handle);
            bound_header_reads(&mut server);
            server.serve(app).await
        }
        Some(config) => {
            let mut server = axum_server::from_tcp_rustls(listener, config)?.handle(handle);
            bound_header_reads(&mut server);
            server.serve(app).await
        }
    }
}

/// A client gets [`HEADER_READ_TIMEOUT`] to send its request headers.
fn bound_header_reads<Acceptor>(server: &mut axum_server::Server<std::net::SocketAddr, Acceptor>) {
    server
        .http_builder()
        .http1()
        .header_read_timeout(HEADER_READ_TIMEOUT);
}
