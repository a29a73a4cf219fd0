//! A database of its own per test (SQLite file in a temp dir, or a new PostgreSQL database)
//! and the read model as tests compare it.

use std::collections::BTreeMap;

use projection_service::db::Database;
use shared::testing::unique_name;
use sqlx::{Connection, Row};

/// Which read-model database a test runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// A SQLite file in a temporary directory.
    Sqlite,
    /// A fresh database on `TEST_POSTGRES_URL`.
    Postgres,
}

/// A database of its own for one test. A PostgreSQL database is dropped when the value is
/// dropped (best effort, in the background: a failed test may leave its database behind).
pub struct TestDb {
    /// The URL to give the service.
    pub url: String,
    _dir: Option<tempfile::TempDir>,
    postgres: Option<(String, String)>,
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let Some((admin, name)) = self.postgres.take() else {
            return;
        };
        // A thread of its own: the test's runtime may be shutting down.
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                if let Ok(mut conn) = sqlx::PgConnection::connect(&admin).await {
                    let _ = sqlx::raw_sql(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .execute(&mut conn)
                        .await;
                    let _ = conn.close().await;
                }
            });
        })
        .join();
    }
}

/// `TEST_POSTGRES_URL`, or a failure that says how to get one (never a silent pass).
#[track_caller]
pub fn postgres_url() -> String {
    std::env::var("TEST_POSTGRES_URL")
        .ok()
        .filter(|v| !v.trim().is_empty())
        .unwrap_or_else(|| {
            panic!(
                "TEST_POSTGRES_URL is not set. The PostgreSQL variant of this test needs a real \
                 server: run the suite with `scripts/test`, or run `scripts/postgres start` and \
                 export TEST_POSTGRES_URL=<the URL it prints>"
            )
        })
}

fn with_database(url: &str, name: &str) -> String {
    let (base, query) = url
        .split_once('?')
        .map_or((url, None), |(b, q)| (b, Some(q)));
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let path_start = base[scheme_end..]
        .find('/')
        .map_or(base.len(), |i| scheme_end + i);
    let mut out = format!("{}/{name}", &base[..path_start]);
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    out
}

impl TestDb {
    /// A new empty database.
    pub async fn new(backend: Backend) -> TestDb {
        match backend {
            Backend::Sqlite => {
                let dir = tempfile::tempdir().expect("temp dir");
                let url = format!("sqlite://{}", dir.path().join("projection.db").display());
                TestDb {
                    url,
                    _dir: Some(dir),
                    postgres: None,
                }
            }
            Backend::Postgres => {
                let admin = postgres_url();
                let name = unique_name("projection_test").replace('-', "_");
                let mut conn = sqlx::PgConnection::connect(&admin)
                    .await
                    .expect("connect to TEST_POSTGRES_URL");
                sqlx::raw_sql(&format!("CREATE DATABASE {name}"))
                    .execute(&mut conn)
                    .await
                    .expect("CREATE DATABASE (user needs CREATEDB)");
                let _ = conn.close().await;
                TestDb {
                    url: with_database(&admin, &name),
                    _dir: None,
                    postgres: Some((admin, name)),
                }
            }
        }
    }

    /// A connection to the read model for direct checks.
    pub async fn open(&self) -> Database {
        Database::connect(&self.url).await.expect("open read model")
    }
}

/// One account of the read model, as the tests compare it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountModel {
    /// Balance in minor units.
    pub balance_minor: i64,
    /// Aggregate version.
    pub version: i64,
    /// Deposits plus withdrawals.
    pub transaction_count: i64,
    /// `active` / `closed`.
    pub status: String,
}

/// Whether a rebuild's tables exist yet (it creates them once it has captured its end offsets).
pub async fn rebuild_tables_exist(db: &Database) -> bool {
    sqlx::query("SELECT COUNT(*) FROM accounts_rebuild")
        .fetch_one(db.pool())
        .await
        .is_ok()
}

/// Every account of the read model, by id, read directly from the tables.
pub async fn read_model(db: &Database) -> BTreeMap<String, AccountModel> {
    sqlx::query(
        "SELECT id, balance_minor, version, transaction_count, status FROM accounts ORDER BY id",
    )
    .fetch_all(db.pool())
    .await
    .expect("read accounts")
    .iter()
    .map(|r| {
        (
            r.try_get::<String, _>("id").expect("id"),
            AccountModel {
                balance_minor: r.try_get("balance_minor").expect("balance"),
                version: r.try_get("version").expect("version"),
                transaction_count: r.try_get("transaction_count").expect("tx"),
                status: r.try_get("status").expect("status"),
            },
        )
    })
    .collect()
}
