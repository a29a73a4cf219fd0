//! `projection-service`: runs the projection and its query API, configured by the environment
//! (docs/contract.md); `projection-service rebuild` replays the event topic into fresh tables and swaps
//! them in.

use anyhow::Context;
use clap::{Parser, Subcommand};
use projection_service::rebuild::{Progress, rebuild};
use shared::Settings;
use shared::runtime::{init_tracing, shutdown_signal};

/// The read side of the bank: an exactly-once read model of `<prefix>.events` and its query API.
#[derive(Debug, Parser)]
#[command(name = "projection-service", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Replay the whole event topic into fresh tables and swap them in (a running service keeps
    /// answering meanwhile and continues from the swapped-in offsets).
    Rebuild,
}

#[tokio::main]
async fn main() {
    init_tracing();
    let cli = Cli::parse();
    let outcome = real_main(cli).await;
    // Exported spans not sent yet go out now (nothing to do unless OTLP export is on).
    let _ = tokio::task::spawn_blocking(shared::runtime::shutdown_tracing).await;
    if let Err(e) = outcome {
        tracing::error!("{e:#}");
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

async fn real_main(cli: Cli) -> anyhow::Result<()> {
    let settings = Settings::from_env().context("invalid configuration")?;
    match cli.command {
        None => {
            let addr = settings.projection_http_addr;
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on PROJECTION_HTTP_ADDR={addr}"))?;
            projection_service::run(settings, listener, shutdown_signal())
                .await
                .context("projection-service failed")
        }
        Some(Command::Rebuild) => {
            let report = rebuild(&settings, Progress::Auto, shutdown_signal())
                .await
                .context("rebuild failed")?;
            eprintln!(
                "rebuild done: {} messages ({} applied, {} duplicates, {} parked, {} poison) in \
                 {:.1} s, {:.0} events/s",
                report.messages,
                report.applied,
                report.duplicates,
                report.parked,
                report.poison,
                report.elapsed.as_secs_f64(),
                report.rate()
            );
            Ok(())
        }
    }
}
