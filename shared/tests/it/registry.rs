//! The schema registry as the guard of event schemas: every current schema registered with a
//! BACKWARD compatibility rule on its subject, an incompatible change refused by the registry
//! itself, and the v1 → v2 story (a new subject, bridged by the upcasters).
//!
//! Needs `SCHEMA_REGISTRY_URL` (scripts/test starts one): skipped with a note without it, a
//! failure under `CI=true`.

use serde_json::json;
use shared::bank_account::{json_schema, prepare, subject};
use shared::registry::{COMPATIBILITY, RegistryError, SchemaRegistry};
use shared::testing::unique_name;

fn registry_url() -> Option<String> {
    let url = shared::testing::schema_registry_url();
    if url.is_none() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "SCHEMA_REGISTRY_URL is not set under CI=true: start the registry (scripts/test does)"
        );
        eprintln!("SKIPPED: SCHEMA_REGISTRY_URL is not set (scripts/test starts a registry)");
    }
    url
}

#[tokio::test]
async fn the_registry_refuses_incompatible_event_schemas() {
    let Some(url) = registry_url() else { return };
    let topic = format!("{}.events", unique_name("compat"));
    let registry = SchemaRegistry::new(&url).unwrap();

    // Every current schema, registered once with its rule; preparing again changes nothing.
    let first = prepare(&url, &topic).await.unwrap();
    assert_eq!(
        first.len(),
        11,
        "the bank's account and transfer event types"
    );
    assert_eq!(prepare(&url, &topic).await.unwrap(), first);
    let opened_v2 = subject(&topic, "AccountOpened", 2);
    assert!(first.iter().any(|(s, _)| *s == opened_v2), "{first:?}");
    for (s, _) in &first {
        assert_eq!(
            registry.compatibility(s).await.unwrap().as_deref(),
            Some(COMPATIBILITY),
            "{s}"
        );
    }

    // An incompatible change to AccountOpened v2 (a new required field) is refused.
    let mut breaking = json_schema("AccountOpened", 2);
    breaking["properties"]["data"]["required"]
        .as_array_mut()
        .unwrap()
        .push(json!("branch"));
    breaking["properties"]["data"]["properties"]["branch"] = json!({"type": "string"});
    let err = registry.register(&opened_v2, &breaking).await.unwrap_err();
    assert!(
        matches!(&err, RegistryError::Incompatible { subject, .. } if *subject == opened_v2),
        "{err}"
    );
    assert_eq!(err.code(), "SchemaIncompatible");

    // A backward-compatible one (a looser rule: any owner, even empty) is accepted.
    let mut looser = json_schema("AccountOpened", 2);
    looser["properties"]["data"]["properties"]["owner"] = json!({"type": "string"});
    let id = registry.register(&opened_v2, &looser).await.unwrap();
    assert!(first.iter().all(|(_, old)| *old != id), "a new schema id");

    // v1 → v2: the v2 shape (owner instead of name, a required currency, minor units) is not a
    // compatible successor of v1, so it cannot be a new version of the v1 subject...
    let opened_v1 = subject(&topic, "AccountOpened", 1);
    registry
        .register(&opened_v1, &json_schema("AccountOpened", 1))
        .await
        .unwrap();
    registry
        .set_compatibility(&opened_v1, COMPATIBILITY)
        .await
        .unwrap();
    let err = registry
        .register(&opened_v1, &json_schema("AccountOpened", 2))
        .await
        .unwrap_err();
    assert_eq!(err.code(), "SchemaIncompatible", "{err}");
    // ...which is why the schema version is in the record name: v2 lives in its own subject,
    // and the upcasters turn v1 events (still readable by their schema id) into v2 on read.
    assert!(opened_v2.ends_with(".v2") && opened_v1.ends_with(".v1"));
}
