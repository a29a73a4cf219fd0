//! What each subcommand does: validate the input locally (exit 2 before anything is sent),
//! then either produce a command over Kafka and wait for its result ([`send`]), or ask the
//! projection and print its answer.

use std::time::Duration;

use serde_json::Value;
use shared::aggregate::DomainCommand;
use shared::bank::BankCommand;
use shared::client::CommandClient;
use shared::transfer::{Start, TransferCommand};
use shared::{Command, CommandMessage, CommandResult, CommandStatus, Settings};

use crate::amount::{Sign, check_currency, check_number, parse_amount};
use crate::args::{Action, Expect, Global, MoneyArgs};
use crate::error::CliError;
use crate::output;
use crate::projection::{AccountQuery, ClientAccess, ListQuery, Projection};

/// How long deposit and withdraw wait for the projection to tell an account's currency (it
/// waits up to 5 s itself for an account opened a moment ago to be projected).
const CURRENCY_LOOKUP_TIMEOUT: Duration = Duration::from_secs(7);

/// The settings of the shared crate, from the flags (or their environment variables) plus the
/// `KAFKA_SECURITY_PROTOCOL` / `KAFKA_SASL_*` / `KAFKA_SSL_*` pass-through, `SCHEMA_REGISTRY_URL`
/// and `DEFAULT_CURRENCY` (to decode events like the services). Other variables are ignored: a service's setting (say `PARTITIONS`) that is invalid must not break the CLI.
pub fn settings(global: &Global) -> Result<Settings, CliError> {
    let mut vars: Vec<(String, String)> = std::env::vars()
        .filter(|(k, _)| {
            k == "KAFKA_SECURITY_PROTOCOL"
                || k.starts_with("KAFKA_SASL_")
                || k.starts_with("KAFKA_SSL_")
                || k == "SCHEMA_REGISTRY_URL"
                || k == "DEFAULT_CURRENCY"
        })
        .collect();
    vars.push((
        "KAFKA_BOOTSTRAP_SERVERS".into(),
        global.bootstrap_servers.clone(),
    ));
    vars.push(("TOPIC_PREFIX".into(), global.topic_prefix.clone()));
    vars.push(("PROJECTION_URL".into(), global.projection_url.clone()));
    Ok(Settings::from_vars(&vars)?)
}

/// Runs one subcommand, printing its output to stdout.
pub async fn execute(global: &Global, action: Action) -> Result<(), CliError> {
    let settings = settings(global)?;
    let timeout = Duration::from_secs(global.timeout_secs.max(1));
    // HTTP requests may include a server-side wait (`min_version`, up to 5 s by default).
    let access = ClientAccess {
        api_key_file: global.api_key_file.clone(),
        ca_file: global.cacert.clone(),
    };
    let projection = || {
        Projection::new(
            &settings.projection_url,
            timeout + Duration::from_secs(5),
            &access,
        )
    };
    match action {
        Action::Open {
            id,
            owner,
            currency,
            initial,
            expect,
        } => {
            let message = open(id, owner, currency, &initial, expect)?;
            send(&settings, global, message).await
        }
        Action::Deposit(args) => {
            let money = money(&args, &projection()?).await?;
            let message = money.message(|amount_minor, currency| Command::Deposit {
                amount_minor,
                currency,
            });
            send(&settings, global, message).await
        }
        Action::Withdraw(args) => {
            let money = money(&args, &projection()?).await?;
            let message = money.message(|amount_minor, currency| Command::Withdraw {
                amount_minor,
                currency,
            });
            send(&settings, global, message).await
        }
        Action::Transfer {
            from,
            to,
            amount,
            currency,
            id,
            no_wait,
        } => {
            let order = TransferOrder {
                from,
                to,
                amount,
                currency,
                id,
            };
            transfer(&settings, global, &projection()?, order, !no_wait).await
        }
        Action::Transfers {
            account,
            limit,
            after,
        } => {
            check_id(&account)?;
            if limit == Some(0) {
                return Err(CliError::Usage("--limit must be 1 or more".into()));
            }
            let answer = projection()?
                .transfers(&account, limit, after.as_deref())
                .await?;
            print_answer(global, answer, |a| {
                Ok(output::transfer_list(&account, &output::decode(a)?))
            })
        }
        Action::Close { id, expect } => {
            check_id(&id)?;
            let message = message(id, Command::CloseAccount, expect);
            send(&settings, global, message).await
        }
        Action::Get {
            id,
            as_of,
            version,
            min_version,
        } => {
            let query = account_query(as_of, version, min_version)?;
            let answer = projection()?.account(&id, &query).await?;
            print_answer(global, answer, |a| Ok(output::account(&output::decode(a)?)))
        }
        Action::History { id } => {
            let answer = projection()?.events(&id).await?;
            print_answer(global, answer, |a| {
                Ok(output::history(&output::decode::<Vec<_>>(a)?))
            })
        }
        Action::List {
            status,
            owner,
            limit,
            after,
        } => {
            if limit == Some(0) {
                return Err(CliError::Usage("--limit must be 1 or more".into()));
            }
            let status = status.map(|s| s.as_str().to_owned());
            let query = ListQuery {
                status,
                owner,
                limit,
                after,
            };
            let answer = projection()?.list(&query).await?;
            print_answer(global, answer, |a| {
                Ok(output::account_list(&output::decode(a)?))
            })
        }
        Action::Load { .. }
        | Action::Dlq { .. }
        | Action::Watch { .. }
        | Action::Completions { .. } => Err(CliError::Usage(
            "internal: this subcommand is dispatched by cli::run".into(),
        )),
    }
}

/// The `OpenAccount` message, checked locally: a non-blank id and owner, an ISO 4217 currency
/// and an initial balance of zero or more in that currency's decimals.
fn open(
    id: String,
    owner: String,
    currency: String,
    initial: &str,
    expect: Expect,
) -> Result<CommandMessage, CliError> {
    check_id(&id)?;
    if owner.trim().is_empty() {
        return Err(CliError::Usage("--owner must not be blank".into()));
    }
    check_currency(&currency)?;
    let initial_balance_minor = parse_amount(initial, &currency, Sign::ZeroOrMore)?;
    let command = Command::OpenAccount {
        owner,
        currency,
        initial_balance_minor,
    };
    Ok(message(id, command, expect))
}

/// The query of `bank get`, checked locally: an RFC 3339 time, versions from 1.
fn account_query(
    as_of: Option<String>,
    version: Option<u64>,
    min_version: Option<u64>,
) -> Result<AccountQuery, CliError> {
    if let Some(t) = &as_of {
        chrono::DateTime::parse_from_rfc3339(t).map_err(|e| {
            CliError::Usage(format!(
                "--as-of `{t}` is not an RFC 3339 time like 2026-01-31T12:00:00Z: {e}"
            ))
        })?;
    }
    if version == Some(0) || min_version == Some(0) {
        return Err(CliError::Usage("versions start at 1".into()));
    }
    Ok(AccountQuery {
        as_of,
        version,
        min_version,
    })
}

/// Prints the projection's answer: as JSON with `--json`, else as `people` renders it.
fn print_answer(
    global: &Global,
    answer: Value,
    people: impl FnOnce(Value) -> Result<String, CliError>,
) -> Result<(), CliError> {
    if global.json {
        println!("{}", output::json(&answer));
    } else {
        print!("{}", people(answer)?);
    }
    Ok(())
}

/// Produces the command, waits for its result and prints it; a rejection is an error (exit 1).
pub async fn send(
    settings: &Settings,
    global: &Global,
    message: CommandMessage,
) -> Result<(), CliError> {
    let result = submit(settings, global, &message).await?;
    if global.json {
        println!("{}", output::json(&result));
    } else {
        println!("{}", output::command_result(&result));
    }
    Ok(())
}

/// Produces a command of any aggregate type and waits for its result; a rejection is an error
/// (exit 1).
async fn submit<C: DomainCommand>(
    settings: &Settings,
    global: &Global,
    message: &CommandMessage<C>,
) -> Result<CommandResult, CliError> {
    let timeout = Duration::from_secs(global.timeout_secs.max(1));
    let client = CommandClient::connect(settings).await?;
    let result = client.submit(message, timeout).await?;
    match (result.status, result.error.clone()) {
        (CommandStatus::Accepted, _) => Ok(result),
        (CommandStatus::Rejected, rejection) => {
            if global.json {
                println!("{}", output::json(&result));
            }
            Err(CliError::Rejected(rejection.unwrap_or_else(|| {
                shared::Rejection::new(
                    shared::RejectionCode::Malformed,
                    "rejected without a reason",
                )
            })))
        }
    }
}

/// What `bank transfer` was asked, before it is checked.
struct TransferOrder {
    from: String,
    to: String,
    amount: String,
    currency: Option<String>,
    id: Option<String>,
}

/// How often `bank transfer` asks the projection whether the transfer has ended.
const TRANSFER_POLL: Duration = Duration::from_millis(100);

/// Starts a transfer (the amount read in `--currency` or the source's currency, never a
/// guess) and, when `wait`, waits up to the timeout for its end at the projection: a failed
/// transfer is an error naming its reason (exit 1).
async fn transfer(
    settings: &Settings,
    global: &Global,
    projection: &Projection,
    order: TransferOrder,
    wait: bool,
) -> Result<(), CliError> {
    check_id(&order.from)?;
    check_id(&order.to)?;
    if order.from == order.to {
        return Err(CliError::Usage(
            "FROM and TO are the same account: a transfer needs two".into(),
        ));
    }
    check_number(&order.amount, Sign::Positive)?;
    let currency = known_currency(
        order.currency.as_deref(),
        projection,
        &order.from,
        &order.amount,
    )
    .await?;
    let amount_minor = parse_amount(&order.amount, &currency, Sign::Positive)?;
    let id = order.id.unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    check_id(&id)?;
    let start = Start {
        from: order.from,
        to: order.to,
        amount_minor,
        currency: Some(currency),
    };
    let mut message = CommandMessage::new(
        id.clone(),
        BankCommand::Transfer(TransferCommand::TransferMoney(start.clone())),
    );
    // The transfer id is the idempotency key: the same transfer again is the same command,
    // answered with its original result within the dedupe window (TransferExists after it);
    // another transfer under the same id is another command, refused TransferExists.
    let order_text = message.command.payload().to_string();
    message.command_id = shared::aggregate::step_id(&id, &format!("TransferMoney {order_text}"));
    let result = submit(settings, global, &message).await?;
    if !wait {
        if global.json {
            println!("{}", output::json(&result));
        } else {
            println!("transfer {id} started (bank transfers ACCOUNT lists it; it ends shortly)");
        }
        return Ok(());
    }
    let timeout = Duration::from_secs(global.timeout_secs.max(1));
    let deadline = tokio::time::Instant::now() + timeout;
    let ended = loop {
        // A projection that is busy, catching up or briefly away is asked again until the
        // deadline; the last such answer is the error if the deadline passes.
        match projection.transfer(&id).await {
            Ok(t) if t["status"] != "pending" => break t,
            Ok(_) | Err(CliError::NotFound(_)) => {}
            Err(CliError::Unavailable(_)) if tokio::time::Instant::now() < deadline => {}
            Err(e) => return Err(e),
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(CliError::Unavailable(format!(
                "transfer {id} was started but the projection does not show its end after {} s; \
                 it ends on its own: bank transfers {} shows it",
                timeout.as_secs(),
                message.command.payload()["from"]
                    .as_str()
                    .unwrap_or_default()
            )));
        }
        tokio::time::sleep(TRANSFER_POLL).await;
    };
    let shown: output::Transfer = output::decode(ended.clone())?;
    if (shown.from.as_str(), shown.to.as_str(), shown.amount_minor)
        != (start.from.as_str(), start.to.as_str(), start.amount_minor)
    {
        return Err(CliError::Rejected(shared::Rejection::new(
            shared::RejectionCode::domain("TransferExists"),
            format!(
                "transfer id {id} is another transfer: {} from {} to {}",
                shown.amount_text(),
                shown.from,
                shown.to
            ),
        )));
    }
    if global.json {
        println!("{}", output::json(&ended));
    } else {
        print!("{}", output::transfer(&shown));
    }
    if ended["status"] == "failed" {
        return Err(CliError::TransferFailed(format!(
            "transfer {id} failed: {}",
            ended["reason"].as_str().unwrap_or("no reason given")
        )));
    }
    Ok(())
}

fn message(id: String, command: Command, expect: Expect) -> CommandMessage {
    let mut message = CommandMessage::new(id, command);
    message.expected_version = expect.expected_version;
    message
}

fn check_id(id: &str) -> Result<(), CliError> {
    if id.trim().is_empty() {
        return Err(CliError::Usage("the account id must not be blank".into()));
    }
    Ok(())
}

/// The account, amount in minor units and expectation of a deposit or withdrawal.
///
/// The amount's decimals depend on the account's currency, which only the server side knows:
/// `--currency` when given, else the currency the projection reports for the account. Never a
/// guess: when neither is known (projection unreachable, or the account not projected yet) it
/// is a usage error naming `--currency`, and nothing is sent. The command carries the currency,
/// so the aggregate refuses it (`CurrencyMismatch`) if the account's is another: the amount is
/// never booked in units it was not meant in.
async fn money(args: &MoneyArgs, projection: &Projection) -> Result<Money, CliError> {
    check_id(&args.id)?;
    check_number(&args.amount, Sign::Positive)?;
    let currency =
        known_currency(args.currency.as_deref(), projection, &args.id, &args.amount).await?;
    let minor = parse_amount(&args.amount, &currency, Sign::Positive)?;
    Ok(Money {
        id: args.id.clone(),
        amount_minor: minor,
        currency,
        expect: args.expect,
    })
}

/// A deposit or withdrawal, checked locally.
struct Money {
    /// The account.
    id: String,
    /// More than zero, in the minor units of `currency`.
    amount_minor: i64,
    /// The currency the amount was read in, sent with the command.
    currency: String,
    expect: Expect,
}

impl Money {
    /// The command message that moves this money (`Deposit` or `Withdraw`).
    fn message(self, command: impl FnOnce(i64, Option<String>) -> Command) -> CommandMessage {
        message(
            self.id,
            command(self.amount_minor, Some(self.currency)),
            self.expect,
        )
    }
}

/// The currency an amount is read in: `--currency` when given, else the account's according to
/// the projection; when neither is known, a usage error naming `--currency`.
async fn known_currency(
    given: Option<&str>,
    projection: &Projection,
    account: &str,
    amount: &str,
) -> Result<String, CliError> {
    match given {
        Some(c) => {
            check_currency(c)?;
            Ok(c.to_owned())
        }
        None => account_currency(projection, account).await.map_err(|why| {
            CliError::Usage(format!(
                "{why}, so the decimals of `{amount}` are not known: pass --currency CODE \
                 (nothing was sent)"
            ))
        }),
    }
}

/// The account's currency according to the projection, or why it is not known.
async fn account_currency(projection: &Projection, id: &str) -> Result<String, String> {
    // min_version 1: an account opened a moment ago is waited for, not reported unknown.
    let opened = AccountQuery {
        min_version: Some(1),
        ..AccountQuery::default()
    };
    let lookup = projection.account(id, &opened);
    match tokio::time::timeout(CURRENCY_LOOKUP_TIMEOUT, lookup).await {
        Ok(Ok(answer)) => output::decode::<output::Account>(answer)
            .map(|a| a.currency)
            .map_err(|e| e.to_string()),
        Ok(Err(CliError::NotFound(_))) => Err(format!("the projection does not know {id}")),
        Ok(Err(e)) => Err(format!("cannot learn the currency of {id}: {e}")),
        Err(_) => Err(format!(
            "the projection did not tell the currency of {id} within {} s",
            CURRENCY_LOOKUP_TIMEOUT.as_secs()
        )),
    }
}
