//! The read model on PostgreSQL over TLS: `sslmode=verify-full` against a server whose
//! certificate a private CA signed (`scripts/postgres` makes one; `TEST_POSTGRES_CA`) connects
//! encrypted, with the password from `PROJECTION_DATABASE_PASSWORD_FILE`; another CA is refused.

use projection_service::db::Database;
use sqlx::{Connection, Row};

use crate::helpers::{Backend, TestDb};

#[tokio::test]
async fn postgres_over_verify_full_tls_with_a_private_ca_and_a_password_file() {
    let Some(ca) = std::env::var("TEST_POSTGRES_CA")
        .ok()
        .filter(|v| !v.is_empty())
    else {
        shared::testing::skip_without(
            "PostgreSQL's CA",
            "TEST_POSTGRES_CA is unset (scripts/test sets it)",
        );
        return;
    };
    let db = TestDb::new(Backend::Postgres).await;
    let dir = tempfile::tempdir().unwrap();
    // The URL without its password; the password from a file, as an operator would.
    let mut url = reqwest::Url::parse(&db.url).unwrap();
    let password = url.password().unwrap_or_default().to_owned();
    url.set_password(None).unwrap();
    let password_file = dir.path().join("pg-password");
    std::fs::write(&password_file, format!("{password}\n")).unwrap();
    let with_ca = |ca: &str| format!("{url}?sslmode=verify-full&sslrootcert={ca}");
    let settings_url = |ca: &str| {
        let vars = [
            ("PROJECTION_DATABASE_URL".to_owned(), with_ca(ca)),
            (
                "PROJECTION_DATABASE_PASSWORD_FILE".to_owned(),
                password_file.display().to_string(),
            ),
        ];
        shared::config::Settings::from_vars(&vars)
            .unwrap()
            .projection_database_url
    };

    let trusted = settings_url(&ca);
    let database = Database::connect(&trusted)
        .await
        .expect("the read model connects with verify-full");
    drop(database);
    let mut conn = sqlx::PgConnection::connect(&trusted).await.unwrap();
    let row = sqlx::query("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert!(row.get::<bool, _>("ssl"), "the connection is not encrypted");
    conn.close().await.unwrap();

    // A CA that did not sign the server's certificate.
    let other_key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let other = params.self_signed(&other_key).unwrap();
    let other_ca = dir.path().join("other-ca.pem");
    std::fs::write(&other_ca, other.pem()).unwrap();
    let refused = Database::connect(&settings_url(&other_ca.display().to_string())).await;
    assert!(refused.is_err(), "a certificate of another CA was accepted");
}
