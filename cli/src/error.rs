//! [`CliError`]: everything that makes `bank` fail, and the exit status each failure means
//! ([`CliError::exit_code`]). `main` prints it as one `error: ...` line on stderr.
//!
//! | status | meaning |
//! |---|---|
//! | 0 | success |
//! | 1 | the command was rejected, the account (or dead letter) is unknown, a transfer failed, or a dead letter still fails |
//! | 2 | usage error: bad flag, amount, currency, time or query; nothing was sent |
//! | 3 | Kafka, command-service or projection-service cannot be reached or did not answer |

use shared::Rejection;
use shared::client::ClientError;

/// Exit status of a rejected command or an unknown account.
pub const EXIT_REJECTED: u8 = 1;
/// Exit status of a usage error (the same as clap's own).
pub const EXIT_USAGE: u8 = 2;
/// Exit status when a service cannot be reached.
pub const EXIT_UNAVAILABLE: u8 = 3;

/// Why `bank` failed.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Bad input found before anything was sent: exit 2.
    #[error("{0}")]
    Usage(String),
    /// command-service refused the command: exit 1.
    #[error("rejected: {0}")]
    Rejected(Rejection),
    /// The projection does not know the account (at that time / version): exit 1.
    #[error("{0}")]
    NotFound(String),
    /// A transfer ended `failed` (the message names the reason): exit 1.
    #[error("{0}")]
    TransferFailed(String),
    /// Dead letters that still fail were not replayed: exit 1.
    #[error("{0}")]
    HeldBack(String),
    /// A service cannot be reached or did not answer in time (the message says which and
    /// where): exit 3.
    #[error("{0}")]
    Unavailable(String),
}

impl CliError {
    /// The process exit status for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Rejected(_)
            | CliError::NotFound(_)
            | CliError::HeldBack(_)
            | CliError::TransferFailed(_) => EXIT_REJECTED,
            CliError::Usage(_) => EXIT_USAGE,
            CliError::Unavailable(_) => EXIT_UNAVAILABLE,
        }
    }
}

impl From<ClientError> for CliError {
    /// Every client error means the command pipeline is out of reach: Kafka itself
    /// (`Unreachable`), command-service never created its topics under this prefix (`NoTopic`)
    /// or is not answering (`Timeout`).
    fn from(e: ClientError) -> Self {
        CliError::Unavailable(e.to_string())
    }
}

impl From<shared::config::ConfigError> for CliError {
    fn from(e: shared::config::ConfigError) -> Self {
        CliError::Usage(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared::RejectionCode;
    use std::time::Duration;

    #[test]
    fn each_failure_has_its_exit_status() {
        assert_eq!(CliError::Usage("x".into()).exit_code(), 2);
        let rejected = CliError::Rejected(Rejection::new(
            RejectionCode::InsufficientFunds,
            "not enough",
        ));
        assert_eq!(rejected.exit_code(), 1);
        assert_eq!(
            rejected.to_string(),
            "rejected: InsufficientFunds: not enough"
        );
        assert_eq!(CliError::NotFound("x".into()).exit_code(), 1);
        assert_eq!(CliError::Unavailable("x".into()).exit_code(), 3);
    }

    #[test]
    fn client_errors_mean_unavailable() {
        let timeout: CliError = ClientError::Timeout(Duration::from_secs(15)).into();
        assert_eq!(timeout.exit_code(), 3);
        let no_topic: CliError = ClientError::NoTopic("bank.commands".into()).into();
        assert_eq!(no_topic.exit_code(), 3);
        assert!(no_topic.to_string().contains("bank.commands"));
        let unreachable: CliError = ClientError::Unreachable {
            bootstrap: "127.0.0.1:1".into(),
            source: rdkafka_error(),
        }
        .into();
        assert_eq!(unreachable.exit_code(), 3);
        assert!(
            unreachable
                .to_string()
                .starts_with("cannot reach Kafka at 127.0.0.1:1"),
            "{unreachable}"
        );
    }

    #[test]
    fn bad_settings_are_usage_errors() {
        let err = shared::Settings::from_vars(&[("TOPIC_PREFIX".into(), "a b".into())])
            .map_err(CliError::from)
            .unwrap_err();
        assert_eq!(err.exit_code(), 2);
        assert!(err.to_string().contains("TOPIC_PREFIX"));
    }

    fn rdkafka_error() -> rdkafka::error::KafkaError {
        rdkafka::error::KafkaError::NoMessageReceived
    }
}
