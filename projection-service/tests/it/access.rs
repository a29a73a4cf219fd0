//! Who may call the projection-service: with `HTTP_API_KEYS_FILE` the accounts, `/status`,
//! `/metrics` and `/dead-letters` need a key with their scope, the health routes, the OpenAPI
//! document and the explorer's page stay public, and a foreign `Host` is refused.

use shared::auth::Scope;
use shared::testing::{assert_every_route_guarded, keys_file_per_scope};

use crate::helpers::{Backend, TestDb, settings_for, spawn_app};

both_backends!(every_route_needs_its_scope);

async fn every_route_needs_its_scope(backend: Backend) {
    let db = TestDb::new(backend).await;
    let dir = tempfile::tempdir().unwrap();
    let mut settings = settings_for(&db);
    settings.http.api_keys_file = Some(keys_file_per_scope(dir.path()));
    let app = spawn_app(settings).await;
    let read = Some(Scope::AccountsRead);
    assert_every_route_guarded(
        &app.url(""),
        &[
            ("/accounts", read),
            ("/accounts/{id}", read),
            ("/accounts/{id}/events", read),
            ("/transfers", read),
            ("/transfers/{id}", read),
            ("/status", read),
            ("/metrics", Some(Scope::MetricsRead)),
            ("/dead-letters", Some(Scope::Admin)),
            ("/health", None),
            ("/ready", None),
            ("/openapi.json", None),
            ("/", None),
            ("/assets/explorer.js", None),
            ("/assets/explorer.css", None),
        ],
    )
    .await;
    let rebound = reqwest::Client::new()
        .get(app.url("/health"))
        .header("host", "attacker.example:8090")
        .send()
        .await
        .unwrap();
    assert_eq!(rebound.status().as_u16(), 421);
    app.stop().await.expect("clean stop");
}
