//! Integration tests of projection-service against the real broker (and schema registry when
//! `SCHEMA_REGISTRY_URL` is set). Every scenario runs twice, on SQLite and on PostgreSQL
//! (`TEST_POSTGRES_URL`; the PostgreSQL variants fail, not skip, without it). Run them all with
//! `scripts/test -p projection-service`.
#![allow(clippy::unwrap_used)]

/// Runs each named `async fn(Backend)` as two tests, `<name>::sqlite` and `<name>::postgres`.
macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn sqlite() {
                    super::$name(crate::helpers::Backend::Sqlite).await
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn postgres() {
                    super::$name(crate::helpers::Backend::Postgres).await
                }
            }
        )*
    };
}

mod access;
mod api;
mod contract;
mod crash;
mod database_tls;
mod delivery;
mod explorer;
mod hardening;
mod helpers;
mod identity;
mod projection;
mod rebuild;
mod upgrade;
