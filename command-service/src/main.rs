//! `command-service`: configured by the environment (see docs/contract.md), no arguments.

use anyhow::Context;

#[tokio::main]
async fn main() {
    shared::runtime::init_tracing();
    let outcome = start().await;
    // Exported spans not sent yet go out now (nothing to do unless OTLP export is on).
    let _ = tokio::task::spawn_blocking(shared::runtime::shutdown_tracing).await;
    if let Err(e) = outcome {
        tracing::error!("{e:#}");
        eprintln!("command-service: {e:#}");
        std::process::exit(1);
    }
}

async fn start() -> anyhow::Result<()> {
    let settings = shared::Settings::from_env()?;
    let listener = tokio::net::TcpListener::bind(settings.command_http_addr)
        .await
        .with_context(|| {
            format!(
                "cannot listen on COMMAND_HTTP_ADDR={}",
                settings.command_http_addr
            )
        })?;
    command_service::run(settings, listener, shared::runtime::shutdown_signal()).await
}
