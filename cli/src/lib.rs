//! The `bank` command-line tool: writes commands to Kafka (through
//! [`shared::client::CommandClient`]) and reads the projection over HTTP.
//!
//! - [`args`]: the command line (clap derive); flags fall back to the contract's environment
//!   variables.
//! - [`amount`]: major-unit amounts typed by people → exact minor units, or a clear refusal.
//! - [`commands`]: what each subcommand does.
//! - [`load`]: the workload generator behind `bank load`.
//! - [`projection`]: the projection-service client; HTTP failures → [`CliError`]s.
//! - [`dlq`]: `bank dlq list` / `bank dlq replay`, on `<prefix>.events.dlq`.
//! - [`watch`]: `bank watch`, events as they commit.
//! - [`output`]: rendering for people (`--json` prints raw answers instead).
//! - [`error`]: [`CliError`] and the exit statuses (0 ok, 1 rejected / unknown account, 2 usage,
//!   3 unreachable).
//!
//! `main` only parses the command line and calls [`run`].

pub mod amount;
pub mod args;
pub mod commands;
pub mod dlq;
pub mod error;
pub mod load;
pub mod output;
pub mod projection;
pub mod watch;

use std::time::Duration;

pub use args::Cli;
pub use error::CliError;

/// Runs the parsed command line to completion.
pub async fn run(cli: Cli) -> Result<(), CliError> {
    match cli.action {
        args::Action::Load {
            accounts,
            ops,
            seed,
            id_prefix,
        } => {
            let settings = commands::settings(&cli.global)?;
            load::run(
                &settings,
                Duration::from_secs(cli.global.timeout_secs.max(1)),
                cli.global.json,
                (accounts, ops),
                seed,
                id_prefix,
            )
            .await
        }
        args::Action::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(shell, &mut Cli::command(), "bank", &mut std::io::stdout());
            Ok(())
        }
        args::Action::Dlq { action } => {
            let settings = commands::settings(&cli.global)?;
            match action {
                args::DlqAction::List => dlq::list(&settings, cli.global.json).await,
                args::DlqAction::Replay { ids, all, force } => {
                    dlq::replay(&settings, &ids, all, force, cli.global.json).await
                }
            }
        }
        args::Action::Watch {
            account,
            max_events,
        } => {
            let settings = commands::settings(&cli.global)?;
            watch::run(&settings, account.as_deref(), max_events, cli.global.json).await
        }
        action => commands::execute(&cli.global, action).await,
    }
}

/// Logs to stderr when `RUST_LOG` is set (librdkafka's complaints included); silent otherwise,
/// so that stdout stays clean for `--json` and stderr holds one `error:` line.
pub fn init_logging() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .try_init();
    }
}
