//! `bank load`: a realistic, reproducible workload for demos and throughput checks.
//!
//! [`plan`] simulates the accounts locally with a seeded generator ([`Rng`]) and writes the
//! commands: every open first, then deposits (mostly small, some salary-sized) and withdrawals
//! (never beyond the simulated balance), about 2% deliberate overdrafts (→
//! `InsufficientFunds`), and about 1% of accounts emptied and closed (a final withdrawal, then
//! `CloseAccount`); once in a while a command hits a closed account (→ `AccountClosed`).
//! [`run`] submits the opens, then the rest, with [`CommandClient::submit_all`] (commands of one
//! account keep their order: same partition, produced in order), shows an indicatif progress
//! bar on stderr and prints a [`Summary`].

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use shared::client::CommandClient;
use shared::money::minor_digits;
use shared::{Command, CommandMessage, CommandResult, CommandStatus, Settings};

use crate::error::CliError;
use crate::output;

/// A small deterministic generator (SplitMix64): the same seed gives the same workload.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from a seed.
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// Log-uniform in `[lo, hi]`: small amounts are common, large ones rare, as in real
    /// payments.
    pub fn log_uniform(&mut self, lo: f64, hi: f64) -> f64 {
        (lo.ln() + self.unit() * (hi.ln() - lo.ln())).exp()
    }
}

const OWNERS: [&str; 12] = [
    "Alice", "Bob", "Chloé", "Dmitri", "Emeka", "Fatima", "Goro", "Hana", "Ingrid", "José",
    "Kwame", "Li Wei",
];

/// Currencies of generated accounts, with weights.
const CURRENCIES: [(&str, f64); 4] = [("EUR", 0.4), ("USD", 0.4), ("GBP", 0.15), ("JPY", 0.05)];

/// The commands of a workload, in submission order.
#[derive(Debug, Clone)]
pub struct Plan {
    /// One `OpenAccount` per account.
    pub opens: Vec<CommandMessage>,
    /// Then `ops` commands on them.
    pub ops: Vec<CommandMessage>,
}

struct Sim {
    id: String,
    currency: &'static str,
    balance: i64,
    closed: bool,
}

/// `major` units (in USD-like magnitude) of `currency`, in minor units, at least 1.
fn minor(major: f64, currency: &str) -> i64 {
    // A yen is worth about a cent: keep amounts realistic for zero-decimal currencies.
    let major = if minor_digits(currency) == 0 {
        major * 150.0
    } else {
        major
    };
    ((major * 10f64.powi(minor_digits(currency) as i32)).round() as i64).max(1)
}

/// Generates the workload: `accounts` opens named `<id_prefix>-<n>`, then `ops` commands.
pub fn plan(accounts: u32, ops: u32, seed: u64, id_prefix: &str) -> Plan {
    let mut rng = Rng::new(seed);
    let (opens, mut sims) = open_accounts(&mut rng, accounts, id_prefix);
    let mut closes = CloseBudget {
        left: (accounts as usize).div_ceil(10),
    };
    let mut out = Vec::with_capacity(ops as usize);
    while out.len() < ops as usize {
        let i = pick_account(&mut rng, &sims);
        // A close is a withdrawal and `CloseAccount`: only when both fit.
        let room_for_two = ops as usize - out.len() >= 2;
        next_commands(&mut rng, &mut sims[i], &mut closes, room_for_two, &mut out);
    }
    Plan { opens, ops: out }
}

/// How many more accounts the workload may close (about one in ten at most).
struct CloseBudget {
    left: usize,
}

/// One `OpenAccount` per account, with a weighted currency, a random owner and (seven times in
/// ten) an initial balance; and the simulated accounts.
fn open_accounts(rng: &mut Rng, accounts: u32, id_prefix: &str) -> (Vec<CommandMessage>, Vec<Sim>) {
    let mut sims: Vec<Sim> = Vec::with_capacity(accounts as usize);
    let mut opens = Vec::with_capacity(accounts as usize);
    for n in 1..=accounts {
        let mut pick = rng.unit();
        let currency = CURRENCIES
            .iter()
            .find(|(_, w)| {
                pick -= w;
                pick < 0.0
            })
            .map_or("EUR", |(c, _)| *c);
        let initial = if rng.unit() < 0.3 {
            0
        } else {
            minor(rng.log_uniform(10.0, 5000.0), currency)
        };
        let id = format!("{id_prefix}-{n}");
        opens.push(CommandMessage::new(
            id.clone(),
            Command::OpenAccount {
                owner: OWNERS[rng.below(OWNERS.len())].to_owned(),
                currency: currency.to_owned(),
                initial_balance_minor: initial,
            },
        ));
        sims.push(Sim {
            id,
            currency,
            balance: initial,
            closed: false,
        });
    }
    (opens, sims)
}

/// Mostly active accounts; a closed one only if three picks in a row hit closed ones.
fn pick_account(rng: &mut Rng, sims: &[Sim]) -> usize {
    let mut i = rng.below(sims.len());
    for _ in 0..3 {
        if !sims[i].closed {
            break;
        }
        i = rng.below(sims.len());
    }
    i
}

/// Appends the next command on account `s` to `out` (two when it empties and closes it),
/// updating the simulated balance.
fn next_commands(
    rng: &mut Rng,
    s: &mut Sim,
    closes: &mut CloseBudget,
    room_for_two: bool,
    out: &mut Vec<CommandMessage>,
) {
    let roll = rng.unit();
    let command = if s.closed {
        // Rejected with AccountClosed.
        Command::Deposit {
            amount_minor: minor(rng.log_uniform(5.0, 300.0), s.currency),
            currency: None,
        }
    } else if roll < 0.02 {
        // An overdraft attempt: rejected with InsufficientFunds.
        Command::Withdraw {
            amount_minor: s.balance + minor(rng.log_uniform(1.0, 500.0), s.currency),
            currency: None,
        }
    } else if roll < 0.03 && closes.left > 0 && room_for_two {
        closes.left -= 1;
        if s.balance > 0 {
            let amount_minor = std::mem::take(&mut s.balance);
            out.push(CommandMessage::new(
                s.id.clone(),
                Command::Withdraw {
                    amount_minor,
                    currency: None,
                },
            ));
        }
        s.closed = true;
        Command::CloseAccount
    } else {
        everyday(rng, s, roll)
    };
    out.push(CommandMessage::new(s.id.clone(), command));
}

/// A deposit (mostly small, one in ten salary-sized) or a withdrawal the balance covers;
/// `roll` below 0.55 always deposits.
fn everyday(rng: &mut Rng, s: &mut Sim, roll: f64) -> Command {
    let withdraw = minor(rng.log_uniform(1.0, 400.0), s.currency);
    if roll < 0.55 || withdraw > s.balance {
        let amount_minor = if rng.unit() < 0.1 {
            minor(rng.log_uniform(1500.0, 5000.0), s.currency) // salary
        } else {
            minor(rng.log_uniform(5.0, 300.0), s.currency)
        };
        s.balance += amount_minor;
        Command::Deposit {
            amount_minor,
            currency: None,
        }
    } else {
        s.balance -= withdraw;
        Command::Withdraw {
            amount_minor: withdraw,
            currency: None,
        }
    }
}

/// What a run did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Summary {
    /// The generator's seed (pass `--seed` to repeat the workload).
    pub seed: u64,
    /// Commands answered.
    pub commands: u64,
    /// Accepted commands.
    pub accepted: u64,
    /// Rejected commands by code.
    pub rejected: BTreeMap<String, u64>,
    /// From the first command sent to the last result.
    pub elapsed_secs: f64,
    /// `commands / elapsed_secs`.
    pub commands_per_sec: f64,
}

impl Summary {
    fn record(&mut self, result: &CommandResult) {
        self.commands += 1;
        match (result.status, &result.error) {
            (CommandStatus::Accepted, _) => self.accepted += 1,
            (CommandStatus::Rejected, e) => {
                let code = e.as_ref().map_or("Unknown", |e| e.code.as_str());
                *self.rejected.entry(code.to_owned()).or_default() += 1;
            }
        }
    }

    fn finish(&mut self, elapsed: Duration) {
        self.elapsed_secs = elapsed.as_secs_f64();
        self.commands_per_sec = if self.elapsed_secs > 0.0 {
            self.commands as f64 / self.elapsed_secs
        } else {
            0.0
        };
    }

    /// The summary for people.
    pub fn render(&self) -> String {
        let rejected: u64 = self.rejected.values().sum();
        let mut out = format!(
            "{} commands in {:.2} s ({:.1} commands/s), seed {}\n",
            self.commands, self.elapsed_secs, self.commands_per_sec, self.seed
        );
        let mut rows = vec![
            vec!["accepted".to_owned(), self.accepted.to_string()],
            vec!["rejected".to_owned(), rejected.to_string()],
        ];
        for (code, n) in &self.rejected {
            rows.push(vec![format!("  {code}"), n.to_string()]);
        }
        let table = output::table(&["OUTCOME", "COMMANDS"], &[false, true], &rows);
        out.push_str(&table);
        out
    }
}

/// Plans and submits the workload, then prints the summary (`--json`: as JSON).
pub async fn run(
    settings: &Settings,
    timeout: Duration,
    json: bool,
    (accounts, ops): (u32, u32),
    seed: Option<u64>,
    id_prefix: Option<String>,
) -> Result<(), CliError> {
    let clock = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos() as u64
        ^ u64::from(std::process::id()).rotate_left(32);
    let seed = seed.unwrap_or_else(|| Rng::new(clock).next_u64() % 1_000_000);
    let id_prefix =
        id_prefix.unwrap_or_else(|| format!("load-{:08x}", Rng::new(!clock).next_u64() as u32));
    if id_prefix.trim().is_empty() {
        return Err(CliError::Usage("--id-prefix must not be blank".into()));
    }
    let plan = plan(accounts, ops, seed, &id_prefix);
    let client = CommandClient::connect(settings).await?;

    let total = (plan.opens.len() + plan.ops.len()) as u64;
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template(
            "{msg:>5} [{bar:40.cyan/blue}] {pos}/{len} commands  {per_sec}  ETA {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    let mut summary = Summary {
        seed,
        ..Summary::default()
    };
    let start = Instant::now();
    let mut on_result = |r: &CommandResult| {
        summary.record(r);
        bar.inc(1);
    };
    bar.set_message("open");
    let mut outcome = client
        .submit_all(&plan.opens, timeout, &mut on_result)
        .await;
    if outcome.is_ok() {
        bar.set_message("ops");
        outcome = client.submit_all(&plan.ops, timeout, &mut on_result).await;
    }
    bar.finish_and_clear();
    summary.finish(start.elapsed());
    match outcome {
        Ok(_) => {
            if json {
                println!("{}", output::json(&summary));
            } else {
                print!("{}", summary.render());
                println!("accounts: {id_prefix}-1 … {id_prefix}-{accounts}");
            }
            Ok(())
        }
        Err(e) => {
            eprint!("stopped early: {}", summary.render());
            Err(e.into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared::BankAccount;
    use std::collections::HashMap;

    #[test]
    fn the_same_seed_gives_the_same_workload() {
        let a = plan(20, 300, 42, "t");
        let b = plan(20, 300, 42, "t");
        let payloads = |p: &Plan| {
            p.opens
                .iter()
                .chain(&p.ops)
                .map(|c| (c.aggregate_id.clone(), c.command.clone()))
                .collect::<Vec<_>>()
        };
        assert_eq!(payloads(&a), payloads(&b));
        assert_ne!(payloads(&a), payloads(&plan(20, 300, 43, "t")));
    }

    #[test]
    fn the_workload_has_the_promised_shape() {
        let p = plan(50, 5000, 7, "acc");
        assert_eq!(p.opens.len(), 50);
        assert_eq!(p.ops.len(), 5000);
        assert!(
            p.opens
                .iter()
                .all(|c| c.command.type_name() == "OpenAccount")
        );
        assert_eq!(p.opens[0].aggregate_id, "acc-1");

        // Replay through the real aggregate, as command-service would, in order.
        let mut accounts: HashMap<String, BankAccount> = HashMap::new();
        let mut outcomes: BTreeMap<String, u64> = BTreeMap::new();
        for c in p.opens.iter().chain(&p.ops) {
            let account = accounts.entry(c.aggregate_id.clone()).or_default();
            let key = match account.handle(&c.command) {
                Ok(events) => {
                    events.iter().for_each(|e| account.apply(e));
                    c.command.type_name().to_owned()
                }
                Err(rejection) => rejection.code.to_string(),
            };
            *outcomes.entry(key).or_default() += 1;
        }
        let n = |k: &str| outcomes.get(k).copied().unwrap_or(0);
        assert_eq!(n("OpenAccount"), 50, "{outcomes:?}");
        assert!(n("Deposit") > 1500, "{outcomes:?}");
        assert!(n("Withdraw") > 1500, "{outcomes:?}");
        assert!((1..=5).contains(&n("CloseAccount")), "{outcomes:?}");
        assert!((30..300).contains(&n("InsufficientFunds")), "{outcomes:?}");
        let unexpected: Vec<_> = outcomes
            .keys()
            .filter(|k| {
                ![
                    "OpenAccount",
                    "Deposit",
                    "Withdraw",
                    "CloseAccount",
                    "InsufficientFunds",
                    "AccountClosed",
                ]
                .contains(&k.as_str())
            })
            .collect();
        assert!(unexpected.is_empty(), "{outcomes:?}");
    }

    #[test]
    fn amounts_are_realistic_for_the_currency() {
        assert_eq!(minor(12.345, "EUR"), 1235);
        assert_eq!(minor(2.0, "JPY"), 300);
        assert_eq!(minor(0.0001, "USD"), 1);
        let mut rng = Rng::new(1);
        for _ in 0..1000 {
            let x = rng.log_uniform(5.0, 300.0);
            assert!((5.0..=300.0).contains(&x), "{x}");
        }
    }

    #[test]
    fn summaries_count_by_code() {
        let mut s = Summary::default();
        let accepted: CommandResult = serde_json::from_value(serde_json::json!({
            "command_id": "8a5f3c1e-0000-4000-8000-000000000001", "aggregate_id": "a",
            "status": "accepted", "version": 1
        }))
        .unwrap();
        let rejected: CommandResult = serde_json::from_value(serde_json::json!({
            "command_id": "8a5f3c1e-0000-4000-8000-000000000002", "aggregate_id": "a",
            "status": "rejected", "error": {"code": "InsufficientFunds", "message": "no"}
        }))
        .unwrap();
        s.record(&accepted);
        s.record(&accepted);
        s.record(&rejected);
        s.finish(Duration::from_secs(2));
        assert_eq!(s.commands, 3);
        assert_eq!(s.accepted, 2);
        assert_eq!(s.rejected.get("InsufficientFunds"), Some(&1));
        assert!((s.commands_per_sec - 1.5).abs() < 1e-9);
        let text = s.render();
        assert!(text.contains("1.5 commands/s"), "{text}");
        assert!(text.contains("  InsufficientFunds         1"), "{text}");
    }
}
