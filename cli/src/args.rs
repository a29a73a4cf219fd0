//! The command line, declared with clap's derive API: [`Cli`] holds the global options
//! ([`Global`]: where Kafka and the projection are, output format, timeouts) and one
//! [`Action`] per subcommand.
//!
//! Every connection setting can also come from the environment variables of docs/contract.md
//! (`KAFKA_BOOTSTRAP_SERVERS`, `TOPIC_PREFIX`, `PROJECTION_URL`); a flag wins over the variable.

use clap::{Args, Parser, Subcommand};

/// `bank`: open accounts, move money and read the projection of an event-sourced bank.
///
/// Commands (open, deposit, withdraw, close) are written to `<prefix>.commands` in Kafka and
/// answered by command-service; queries (get, history, list) ask projection-service over HTTP;
/// `watch` and `dlq` read Kafka directly.
///
/// Exit status: 0 success, 1 command rejected, account or dead letter unknown, or a dead letter
/// held back, 2 usage error (bad flag or amount; nothing was sent), 3 Kafka, command-service or
/// the projection cannot be reached.
#[derive(Debug, Parser)]
#[command(name = "bank", version, about, long_about)]
pub struct Cli {
    /// Connection and output options, accepted before or after the subcommand.
    #[command(flatten)]
    pub global: Global,
    /// What to do.
    #[command(subcommand)]
    pub action: Action,
}

/// Options every subcommand accepts.
#[derive(Debug, Clone, Args)]
pub struct Global {
    /// Kafka bootstrap servers (host:port, comma-separated).
    #[arg(
        long,
        global = true,
        env = "KAFKA_BOOTSTRAP_SERVERS",
        default_value = "localhost:9092",
        value_name = "HOSTS"
    )]
    pub bootstrap_servers: String,
    /// Topic prefix: commands go to `<prefix>.commands`.
    #[arg(
        long,
        global = true,
        env = "TOPIC_PREFIX",
        default_value = "bank",
        value_name = "PREFIX"
    )]
    pub topic_prefix: String,
    /// Base URL of projection-service.
    #[arg(
        long,
        global = true,
        env = "PROJECTION_URL",
        default_value = "http://127.0.0.1:8090",
        value_name = "URL"
    )]
    pub projection_url: String,
    /// How long to wait for a command's result (for `load`: without any progress).
    #[arg(long, global = true, default_value_t = 15, value_name = "SECONDS")]
    pub timeout_secs: u64,
    /// Print the raw JSON of the command result or projection answer instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    /// A file holding the API key's secret for the projection (`HTTP_API_KEYS_FILE` on its
    /// side); else `BANK_API_KEY`; else the local key `scripts/run` made
    /// (`~/.local/state/bank-es/api-key`, under `BANK_STATE_DIR` when set), if there is one.
    #[arg(long, global = true, env = "BANK_API_KEY_FILE", value_name = "FILE")]
    pub api_key_file: Option<std::path::PathBuf>,
    /// A PEM CA certificate to trust for an HTTPS projection (a private CA).
    #[arg(long, global = true, env = "BANK_CA_FILE", value_name = "PEM")]
    pub cacert: Option<std::path::PathBuf>,
}

/// The subcommands.
#[derive(Debug, Clone, Subcommand)]
pub enum Action {
    /// Open a new account.
    Open {
        /// Account id (also the Kafka key).
        id: String,
        /// Account holder's name.
        #[arg(long)]
        owner: String,
        /// ISO 4217 currency code of the account.
        #[arg(long, default_value = "USD", value_name = "CODE")]
        currency: String,
        /// Opening balance in major units (`100`, `12.34`); zero or more.
        #[arg(
            long,
            default_value = "0",
            value_name = "AMOUNT",
            allow_hyphen_values = true
        )]
        initial: String,
        /// Only if the account is at this version (0 for a new account).
        #[command(flatten)]
        expect: Expect,
    },
    /// Deposit money into an account.
    Deposit(MoneyArgs),
    /// Withdraw money from an account (never beyond its balance).
    Withdraw(MoneyArgs),
    /// Close an account whose balance is zero.
    Close {
        /// Account id.
        id: String,
        /// Optimistic concurrency.
        #[command(flatten)]
        expect: Expect,
    },
    /// Move money from one account to another. The transfer starts at once and ends when the
    /// command-service's steps have debited FROM and credited TO (or refunded FROM); by default
    /// this waits for the end and exits 1 when the transfer failed, printing the reason.
    Transfer {
        /// The source account.
        from: String,
        /// The target account.
        to: String,
        /// Amount in major units of the source's currency (`50`, `12.34`), more than zero.
        #[arg(allow_hyphen_values = true)]
        amount: String,
        /// Currency of AMOUNT, sent with the transfer: the source must be in it. Default: the
        /// source's currency as the projection knows it; when that cannot be learned, nothing is
        /// sent (exit 2).
        #[arg(long, value_name = "CODE")]
        currency: Option<String>,
        /// The transfer's id, its idempotency key: the same id again is the same transfer.
        /// Default: a new UUID.
        #[arg(long, value_name = "ID")]
        id: Option<String>,
        /// Return once the transfer is started, without waiting for its end.
        #[arg(long)]
        no_wait: bool,
    },
    /// List an account's transfers (from or to it), newest first.
    Transfers {
        /// Account id.
        account: String,
        /// At most this many transfers (1 to 1000; the projection's default is 50).
        #[arg(long, value_name = "N")]
        limit: Option<u32>,
        /// Older than this (the `next` of the previous page).
        #[arg(long, value_name = "CURSOR")]
        after: Option<String>,
    },
    /// Show an account now, as of a time or as of a version.
    Get {
        /// Account id.
        id: String,
        /// The account as it was at this time (RFC 3339, e.g. 2026-01-31T12:00:00Z).
        #[arg(long, value_name = "RFC3339", conflicts_with = "version")]
        as_of: Option<String>,
        /// The account as it was after this many events.
        #[arg(long, value_name = "N")]
        version: Option<u64>,
        /// Wait (bounded, server side) until the projection has at least this version:
        /// read-your-writes after a command.
        #[arg(long, value_name = "N")]
        min_version: Option<u64>,
    },
    /// Show an account's events, oldest first.
    History {
        /// Account id.
        id: String,
    },
    /// List accounts, ordered by id.
    List {
        /// Only accounts with this status.
        #[arg(long, value_enum)]
        status: Option<StatusFilter>,
        /// Only accounts of this owner (exact name).
        #[arg(long, value_name = "NAME")]
        owner: Option<String>,
        /// At most this many accounts (1 to 1000; the projection's default is 50).
        #[arg(long, value_name = "N")]
        limit: Option<u32>,
        /// Start after this account id (the `next` of the previous page).
        #[arg(long, value_name = "ID")]
        after: Option<String>,
    },
    /// Generate a realistic workload: open accounts, then deposits and withdrawals (with a few
    /// overdrafts and closes), and report throughput and outcomes.
    Load {
        /// Number of accounts to open.
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
        accounts: u32,
        /// Number of operations after the opens.
        #[arg(long, value_name = "M")]
        ops: u32,
        /// Seed of the generator (same seed, same amounts and choices).
        #[arg(long, value_name = "S")]
        seed: Option<u64>,
        /// Prefix of the generated account ids (default: `load-` and a random tag, so runs do
        /// not collide).
        #[arg(long, value_name = "PREFIX")]
        id_prefix: Option<String>,
    },
    /// Dead letters: the events the projection could not use (`<prefix>.events.dlq`).
    Dlq {
        /// What to do with them.
        #[command(subcommand)]
        action: DlqAction,
    },
    /// Print events as they commit, from now on (read_committed), until Ctrl-C.
    Watch {
        /// Only the events of this account.
        account: Option<String>,
        /// Stop after printing this many events.
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
        max_events: Option<u64>,
    },
    /// Print a shell completion script, e.g. `bank completions bash > ~/.local/share/bash-completion/completions/bank`.
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

/// The subcommands of `bank dlq`.
#[derive(Debug, Clone, Subcommand)]
pub enum DlqAction {
    /// List the dead letters, oldest first: id, reason, original partition and offset, key.
    List,
    /// Send dead letters back to `<prefix>.events` (same key, bytes and headers, on the key's
    /// partition). A letter whose bytes still cannot be decoded is held back (exit 1) unless
    /// `--force`: fix the cause first. A letter cut short is always held back.
    Replay {
        /// The letter to replay, as `bank dlq list` shows it (`PARTITION:OFFSET`); repeatable.
        #[arg(
            long = "id",
            value_name = "PARTITION:OFFSET",
            required_unless_present = "all",
            conflicts_with = "all"
        )]
        ids: Vec<String>,
        /// Replay every dead letter.
        #[arg(long)]
        all: bool,
        /// Replay even letters that still fail to decode (never one cut short: see
        /// `dlq.original.truncated`).
        #[arg(long)]
        force: bool,
    },
}

/// Arguments of deposit and withdraw.
#[derive(Debug, Clone, Args)]
pub struct MoneyArgs {
    /// Account id.
    pub id: String,
    /// Amount in major units (`50`, `12.34`), more than zero.
    #[arg(allow_hyphen_values = true)]
    pub amount: String,
    /// Currency of AMOUNT (its decimals), sent with the command: the account must be in it.
    /// Default: the account's currency as the projection knows it; when that cannot be
    /// learned, nothing is sent (exit 2).
    #[arg(long, value_name = "CODE")]
    pub currency: Option<String>,
    /// Optimistic concurrency.
    #[command(flatten)]
    pub expect: Expect,
}

/// `--expected-version`, accepted by every command.
#[derive(Debug, Clone, Copy, Args)]
pub struct Expect {
    /// Only apply the command if the account is at this version (else: VersionConflict).
    #[arg(long, value_name = "N")]
    pub expected_version: Option<u64>,
}

/// `--status` values of `list`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StatusFilter {
    /// Open accounts.
    Active,
    /// Closed accounts.
    Closed,
}

impl StatusFilter {
    /// The value the projection expects.
    pub fn as_str(self) -> &'static str {
        match self {
            StatusFilter::Active => "active",
            StatusFilter::Closed => "closed",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn flags_go_before_or_after_the_subcommand() {
        let cli =
            Cli::try_parse_from(["bank", "--json", "get", "acc-1", "--version", "1"]).unwrap();
        assert!(cli.global.json);
        let cli = Cli::try_parse_from([
            "bank",
            "get",
            "acc-1",
            "--json",
            "--projection-url",
            "http://x:1",
        ])
        .unwrap();
        assert!(cli.global.json);
        assert_eq!(cli.global.projection_url, "http://x:1");
    }

    #[test]
    fn as_of_and_version_conflict() {
        let err = Cli::try_parse_from([
            "bank",
            "get",
            "acc-1",
            "--version",
            "1",
            "--as-of",
            "2026-01-01T00:00:00Z",
        ])
        .unwrap_err();
        assert_eq!(err.exit_code(), 2);
    }

    #[test]
    fn completions_cover_the_new_subcommands() {
        let mut script = Vec::new();
        clap_complete::generate(
            clap_complete::Shell::Bash,
            &mut Cli::command(),
            "bank",
            &mut script,
        );
        let script = String::from_utf8(script).unwrap();
        for word in ["dlq", "replay", "watch", "--max-events", "completions"] {
            assert!(script.contains(word), "no `{word}` in the bash completions");
        }
    }

    #[test]
    fn replay_needs_ids_or_all_but_not_both() {
        let err = Cli::try_parse_from(["bank", "dlq", "replay"]).unwrap_err();
        assert_eq!(err.exit_code(), 2);
        let err =
            Cli::try_parse_from(["bank", "dlq", "replay", "--all", "--id", "0:1"]).unwrap_err();
        assert_eq!(err.exit_code(), 2);
        let cli =
            Cli::try_parse_from(["bank", "dlq", "replay", "--id", "0:1", "--id", "2:3"]).unwrap();
        match cli.action {
            Action::Dlq {
                action: DlqAction::Replay { ids, all, force },
            } => {
                assert_eq!(ids, ["0:1", "2:3"]);
                assert!(!all && !force);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn negative_amounts_reach_the_validator() {
        // Without allow_hyphen_values clap would call `-5` an unknown flag, a less helpful message.
        let cli = Cli::try_parse_from(["bank", "deposit", "acc-1", "-5"]).unwrap();
        match cli.action {
            Action::Deposit(m) => assert_eq!(m.amount, "-5"),
            other => panic!("{other:?}"),
        }
    }
}
