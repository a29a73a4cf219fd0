//! The peers the pipeline is measured against, on the same broker and databases: Kafka's own
//! `ProducerPerformance` (transactional) and `ConsumerPerformance` (read_committed), and a bare
//! batched upsert loop into the read model's schema.

use std::collections::BTreeMap;
use std::process::Command as Process;
use std::time::Instant;

use anyhow::{Context, bail};
use projection_service::accounts::{ACCOUNT_EVENTS, ACCOUNTS};
use projection_service::db::{Backend, Database, Tables};

/// Kafka's `ProducerPerformance`: `records` of `record_size` bytes, acks=all, idempotent, in
/// transactions of `transaction_ms`. Returns records per second.
pub fn producer_performance(
    bootstrap: &str,
    topic: &str,
    records: usize,
    record_size: usize,
    transaction_ms: u64,
) -> anyhow::Result<f64> {
    let out = kafka_tool(&[
        "org.apache.kafka.tools.ProducerPerformance",
        "--topic",
        topic,
        "--num-records",
        &records.to_string(),
        "--record-size",
        &record_size.to_string(),
        "--throughput",
        "-1",
        "--transaction-duration-ms",
        &transaction_ms.to_string(),
        "--producer-props",
        &format!("bootstrap.servers={bootstrap}"),
        "acks=all",
        "enable.idempotence=true",
        "linger.ms=5",
    ])?;
    // "N records sent, R records/sec (M MB/sec), …" — the last such line is the total.
    let line = out
        .lines()
        .rev()
        .find(|l| l.contains("records sent"))
        .with_context(|| format!("no summary in ProducerPerformance output:\n{out}"))?;
    number_before(line, "records/sec")
}

/// Kafka's `ConsumerPerformance` over `messages` messages of `topic`, read_committed. Returns
/// messages per second (its `nMsg.sec` column).
pub fn consumer_performance(bootstrap: &str, topic: &str, messages: usize) -> anyhow::Result<f64> {
    let config =
        std::env::temp_dir().join(format!("bench-consumer-{}.properties", std::process::id()));
    std::fs::write(
        &config,
        "isolation.level=read_committed\nauto.offset.reset=earliest\n",
    )?;
    let out = kafka_tool(&[
        "org.apache.kafka.tools.ConsumerPerformance",
        "--bootstrap-server",
        bootstrap,
        "--topic",
        topic,
        "--messages",
        &messages.to_string(),
        "--consumer.config",
        &config.display().to_string(),
        "--timeout",
        "60000",
    ])?;
    let _ = std::fs::remove_file(&config);
    // header: start.time, end.time, data.consumed.in.MB, MB.sec, data.consumed.in.nMsg, nMsg.sec, …
    let mut lines = out.lines().filter(|l| l.contains(','));
    let header: Vec<&str> = lines
        .find(|l| l.contains("nMsg.sec"))
        .with_context(|| format!("no header in ConsumerPerformance output:\n{out}"))?
        .split(',')
        .map(str::trim)
        .collect();
    let row: Vec<&str> = lines
        .next()
        .context("no data row in ConsumerPerformance output")?
        .split(',')
        .map(str::trim)
        .collect();
    let column = header
        .iter()
        .position(|h| *h == "nMsg.sec")
        .context("no nMsg.sec column")?;
    Ok(row.get(column).context("short row")?.parse()?)
}

fn kafka_tool(args: &[&str]) -> anyhow::Result<String> {
    let out = Process::new("scripts/kafka-tool")
        .args(args)
        .output()
        .context("cannot run scripts/kafka-tool (run the bench from the repository root)")?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        bail!("{} failed: {text}", args[0]);
    }
    Ok(text)
}

fn number_before(line: &str, unit: &str) -> anyhow::Result<f64> {
    let before = line
        .split(unit)
        .next()
        .and_then(|s| s.rsplit(',').next())
        .with_context(|| format!("no `{unit}` in `{line}`"))?;
    Ok(before.trim().parse()?)
}

/// The read model's cost without the projection: `events` events over `accounts` accounts
/// written the way the projection stores them (an event row each, the accounts they touch
/// upserted once per batch with their last state, and the offsets row), 500 events per
/// transaction (multi-row statements on PostgreSQL, prepared single-row ones on SQLite, the
/// faster way for each), into the projection's own tables. Events per second.
pub async fn db_upserts(database_url: &str, events: usize, accounts: usize) -> anyhow::Result<f64> {
    const BATCH: usize = 500;
    let db = Database::connect(database_url).await?;
    let t = Tables::live();
    let accounts = accounts.max(1);
    let started = Instant::now();
    let mut version = vec![0i64; accounts];
    for chunk_start in (0..events).step_by(BATCH) {
        let batch = Batch::new(chunk_start..(chunk_start + BATCH).min(events), &mut version);
        let mut tx = db.pool().begin().await?;
        if db.backend() == Backend::Sqlite {
            write_row_by_row(&mut tx, &t, &batch).await?;
        } else {
            write_multi_row(&mut tx, &t, &batch).await?;
        }
        offsets_row(&mut tx, &t, batch.next_offset).await?;
        tx.commit().await?;
    }
    let rate = events as f64 / started.elapsed().as_secs_f64().max(1e-9);
    db.close().await;
    Ok(rate)
}

/// One generated event: the `version`-th deposit of account `acc-<account>`, at `offset`.
struct EventRow {
    account: usize,
    version: i64,
    offset: i64,
}

/// One transaction's worth of generated events.
struct Batch {
    rows: Vec<EventRow>,
    /// The last version of every account the batch touches.
    last: BTreeMap<usize, i64>,
    /// The batch's time, as RFC 3339 and as nanoseconds since the epoch.
    ts: String,
    ts_ns: i64,
    /// The offset after the batch (what the offsets row stores).
    next_offset: usize,
}

impl Batch {
    /// The events at offsets `chunk`, spread round-robin over the accounts of `version` (each
    /// account's last version, advanced here).
    fn new(chunk: std::ops::Range<usize>, version: &mut [i64]) -> Batch {
        let now = chrono::Utc::now();
        let mut rows = Vec::with_capacity(chunk.len());
        let mut last = BTreeMap::new();
        for i in chunk.clone() {
            let account = i % version.len();
            version[account] += 1;
            rows.push(EventRow {
                account,
                version: version[account],
                offset: i as i64,
            });
            last.insert(account, version[account]);
        }
        Batch {
            rows,
            last,
            ts: now.to_rfc3339(),
            ts_ns: now.timestamp_nanos_opt().unwrap_or_default(),
            next_offset: chunk.end,
        }
    }
}

/// The batch as one small prepared statement per row: the fastest way for in-process SQLite.
async fn write_row_by_row(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    t: &Tables,
    batch: &Batch,
) -> anyhow::Result<()> {
    for row in &batch.rows {
        sqlx::query(&format!(
            "INSERT INTO {} (aggregate_id, version, event_id, event_type, \"timestamp\", \
             timestamp_ns, data, envelope, balance_minor, status, transaction_count, \
             source_partition, source_offset) VALUES ($1, $2, $3, 'MoneyDeposited', $4, \
             $5, '{{\"amount_minor\":100}}', '{{}}', $6, 'active', $7, 0, $8)",
            t.model(ACCOUNT_EVENTS)
        ))
        .bind(format!("acc-{}", row.account))
        .bind(row.version)
        .bind(uuid::Uuid::new_v4().to_string())
        .bind(batch.ts.clone())
        .bind(batch.ts_ns)
        .bind(row.version * 100)
        .bind(row.version)
        .bind(row.offset)
        .execute(&mut **tx)
        .await?;
    }
    for (account, v) in &batch.last {
        sqlx::query(&format!(
            "INSERT INTO {} (id, owner, currency, balance_minor, status, version, \
             transaction_count, opened_at, updated_at) VALUES ($1, 'Owner', 'EUR', $2, \
             'active', $3, $3, $4, $4) ON CONFLICT (id) DO UPDATE SET \
             balance_minor = excluded.balance_minor, version = excluded.version, \
             transaction_count = excluded.transaction_count, updated_at = excluded.updated_at",
            t.model(ACCOUNTS)
        ))
        .bind(format!("acc-{account}"))
        .bind(*v * 100)
        .bind(*v)
        .bind(batch.ts.clone())
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}

/// The batch as two multi-row statements (events, then accounts): the fastest way for
/// PostgreSQL.
async fn write_multi_row(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    t: &Tables,
    batch: &Batch,
) -> anyhow::Result<()> {
    let sql = format!(
        "INSERT INTO {} (aggregate_id, version, event_id, event_type, \"timestamp\", \
         timestamp_ns, data, envelope, balance_minor, status, transaction_count, \
         source_partition, source_offset) VALUES {}",
        t.model(ACCOUNT_EVENTS),
        placeholders(batch.rows.len(), 13)
    );
    let mut query = sqlx::query(&sql);
    for row in &batch.rows {
        query = query
            .bind(format!("acc-{}", row.account))
            .bind(row.version)
            .bind(uuid::Uuid::new_v4().to_string())
            .bind("MoneyDeposited")
            .bind(batch.ts.clone())
            .bind(batch.ts_ns)
            .bind("{\"amount_minor\":100}")
            .bind("{}")
            .bind(row.version * 100)
            .bind("active")
            .bind(row.version)
            .bind(0i64)
            .bind(row.offset);
    }
    query.execute(&mut **tx).await?;
    let sql = format!(
        "INSERT INTO {} (id, owner, currency, balance_minor, status, version, \
         transaction_count, opened_at, updated_at) VALUES {} ON CONFLICT (id) DO UPDATE SET \
         balance_minor = excluded.balance_minor, version = excluded.version, \
         transaction_count = excluded.transaction_count, updated_at = excluded.updated_at",
        t.model(ACCOUNTS),
        placeholders(batch.last.len(), 9)
    );
    let mut query = sqlx::query(&sql);
    for (account, v) in &batch.last {
        query = query
            .bind(format!("acc-{account}"))
            .bind("Owner")
            .bind("EUR")
            .bind(*v * 100)
            .bind("active")
            .bind(*v)
            .bind(*v)
            .bind(batch.ts.clone())
            .bind(batch.ts.clone());
    }
    query.execute(&mut **tx).await?;
    Ok(())
}

/// `($1, …, $width), ($width+1, …)`: `n` rows of numbered placeholders.
fn placeholders(n: usize, width: usize) -> String {
    (0..n)
        .map(|r| {
            let cols: Vec<String> = (1..=width).map(|c| format!("${}", r * width + c)).collect();
            format!("({})", cols.join(", "))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

async fn offsets_row(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    t: &Tables,
    next: usize,
) -> anyhow::Result<()> {
    sqlx::query(&format!(
        "INSERT INTO {} (topic, \"partition\", next_offset) VALUES ('bench', 0, $1) \
         ON CONFLICT (topic, \"partition\") DO UPDATE SET next_offset = excluded.next_offset",
        t.offsets
    ))
    .bind(next as i64)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The rows the bare upsert loop leaves: every event, every account at its last version
    /// and the offsets row after the last event.
    async fn written(url: &str) -> (i64, i64, i64, i64) {
        let db = Database::connect(url).await.unwrap();
        let t = Tables::live();
        let count = |sql: String| {
            let pool = db.pool().clone();
            async move {
                sqlx::query_scalar::<_, i64>(&sql)
                    .fetch_one(&pool)
                    .await
                    .unwrap()
            }
        };
        let events = count(format!("SELECT COUNT(*) FROM {}", t.model(ACCOUNT_EVENTS))).await;
        let accounts = count(format!("SELECT COUNT(*) FROM {}", t.model(ACCOUNTS))).await;
        let top = count(format!("SELECT MAX(version) FROM {}", t.model(ACCOUNTS))).await;
        let next = count(format!("SELECT MAX(next_offset) FROM {}", t.offsets)).await;
        db.close().await;
        (events, accounts, top, next)
    }

    #[tokio::test]
    async fn db_upserts_writes_every_event_and_account_on_sqlite() {
        let dir = std::env::temp_dir().join(format!("bench-test-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let url = format!("sqlite://{}", dir.join("raw.db").display());
        // 1234 events over 7 accounts: three batches, the last one short; account 0 gets
        // offsets 0, 7, … 1232, so 177 versions.
        let rate = db_upserts(&url, 1234, 7).await.unwrap();
        assert!(rate > 0.0);
        assert_eq!(written(&url).await, (1234, 7, 177, 1234));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn db_upserts_writes_every_event_and_account_on_postgres() {
        let Ok(base) = std::env::var("TEST_POSTGRES_URL") else {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "TEST_POSTGRES_URL is not set under CI=true"
            );
            eprintln!("SKIPPED: TEST_POSTGRES_URL is not set (scripts/test starts PostgreSQL)");
            return;
        };
        let name = format!("bench_test_{}", uuid::Uuid::new_v4().simple());
        let psql = |sql: &str| {
            let status = Process::new("psql")
                .arg(&base)
                .arg("-qc")
                .arg(sql)
                .status()
                .expect("psql runs");
            assert!(status.success(), "{sql}");
        };
        psql(&format!("CREATE DATABASE {name}"));
        let url = format!("{}/{name}", base.rsplit_once('/').unwrap().0);
        let rate = db_upserts(&url, 1234, 7).await.unwrap();
        assert!(rate > 0.0);
        assert_eq!(written(&url).await, (1234, 7, 177, 1234));
        psql(&format!("DROP DATABASE {name} WITH (FORCE)"));
    }
}
