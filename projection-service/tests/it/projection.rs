//! The read model from real topics: the seed era's v1 fixture, its v2 twins, and a generated mix
//! of v1, v2 JSON and (with a registry) wire-format events; current and temporal queries.

use std::collections::BTreeMap;

use serde_json::Value;
use shared::testing::schema_registry_url;
use shared::{BankAccount, EventCodec};

use crate::helpers::{
    Backend, EventWriter, Rng, TestDb, as_v1_bytes, assert_account, generate, ids, just_after,
    rfc3339, settings_for, spawn_app,
};

both_backends!(seed_fixture_and_its_v2_twins_give_the_expected_read_model);
both_backends!(generated_mix_of_v1_and_v2_events_gives_the_fold);

/// The codec a writer of current events would use (wire format when a registry runs).
fn writer_codec() -> EventCodec {
    match schema_registry_url() {
        Some(url) => EventCodec::with_registry("USD", &url).expect("registry codec"),
        None => EventCodec::json("USD"),
    }
}

async fn seed_fixture_and_its_v2_twins_give_the_expected_read_model(backend: Backend) {
    let db = TestDb::new(backend).await;
    let settings = settings_for(&db);
    let app = spawn_app(settings.clone()).await;
    let writer = EventWriter::new(&settings).await;
    let plain = EventCodec::json("USD");
    let codec = writer_codec();

    let lines: Vec<&str> = shared::testing::SEED_V1_EVENTS
        .lines()
        .filter(|l| !l.trim().is_empty())
        .collect();
    let mut histories: BTreeMap<String, Vec<shared::EventEnvelope>> = BTreeMap::new();
    for line in &lines {
        let raw: Value = serde_json::from_str(line).expect("fixture line is JSON");
        let id = raw["aggregate_id"]
            .as_str()
            .expect("aggregate_id")
            .to_owned();
        // The seed's bytes exactly as they are.
        writer.raw(&id, line.as_bytes(), None).await;
        // Its v2 equivalent under another id.
        let mut twin = plain.decode_json(line.as_bytes()).expect("fixture decodes");
        histories.entry(id.clone()).or_default().push(twin.clone());
        twin.aggregate_id = format!("twin-{id}");
        writer.envelope(&codec, &twin).await;
    }

    let expected: BTreeMap<String, Value> =
        serde_json::from_str(shared::testing::SEED_V1_EXPECTED).expect("expected states");
    for (id, want) in &expected {
        let version = want["version"].as_u64().expect("version");
        let got = app.wait_version(id, version).await;
        for field in [
            "owner",
            "currency",
            "balance_minor",
            "balance",
            "status",
            "version",
            "transaction_count",
        ] {
            assert_eq!(got[field], want[field], "{id}.{field}: {got}");
        }
        // v1 and v2 give exactly the same read model.
        let mut twin = app.wait_version(&format!("twin-{id}"), version).await;
        twin["id"] = Value::String(id.clone());
        assert_eq!(twin, got, "twin of {id}");
        let (_, events) = app.get(&format!("/accounts/{id}/events")).await;
        let (_, twin_events) = app.get(&format!("/accounts/twin-{id}/events")).await;
        let events = events.as_array().expect("array").clone();
        let mut twin_events = twin_events.as_array().expect("array").clone();
        for e in &mut twin_events {
            e["aggregate_id"] = Value::String(id.clone());
        }
        assert_eq!(events, twin_events, "history of {id} and its twin");
        assert_eq!(events.len() as u64, version);
    }

    // Temporal queries: the state at every version and at every event's timestamp.
    for (id, envelopes) in &histories {
        let mut state = BankAccount::default();
        let first = envelopes.first().expect("history").timestamp;
        let (status, body) = app
            .get(&format!(
                "/accounts/{id}?as_of={}",
                rfc3339(&(first - chrono::Duration::seconds(1)))
            ))
            .await;
        assert_eq!(status, 404, "{id} before its opening: {body}");
        assert_eq!(body["error"]["code"], "AccountNotFound");
        for env in envelopes {
            state.apply(&env.event().expect("event"));
            let (_, by_version) = app
                .get(&format!("/accounts/{id}?version={}", env.version))
                .await;
            assert_account(&by_version, id, &state);
            let (_, by_time) = app
                .get(&format!("/accounts/{id}?as_of={}", rfc3339(&env.timestamp)))
                .await;
            assert_eq!(by_time, by_version, "{id} as of v{}", env.version);
            assert_eq!(by_time["updated_at"], rfc3339(&env.timestamp).as_str());
        }
    }

    // Old consumers get the seed's shape back.
    let (status, v1) = app
        .get("/accounts/legacy-001/events?schema_version=1")
        .await;
    assert_eq!(status, 200, "{v1}");
    let v1 = v1.as_array().expect("array");
    assert_eq!(v1.len(), 5);
    assert!(v1[0].get("schema_version").is_none() && v1[0].get("id").is_some());
    assert_eq!(v1[0]["data"]["name"], "Alice");
    assert_eq!(v1[0]["data"]["initial_balance"].to_string(), "50.50");
    assert_eq!(v1[1]["data"]["amount"].to_string(), "33.33");

    let applied = app.metric("projection_events_applied_total").await;
    assert_eq!(applied, 2.0 * lines.len() as f64);
    eprintln!(
        "seed fixture ({backend:?}): {} v1 events + {} v2 twins applied, {} accounts checked",
        lines.len(),
        lines.len(),
        expected.len() * 2
    );
    app.stop().await.expect("clean stop");
}

async fn generated_mix_of_v1_and_v2_events_gives_the_fold(backend: Backend) {
    let db = TestDb::new(backend).await;
    let settings = settings_for(&db);
    let app = spawn_app(settings.clone()).await;
    let writer = EventWriter::new(&settings).await;
    let plain = EventCodec::json("USD");
    let codec = writer_codec();
    let histories = generate(&ids("mix"), 30, 12, 7);
    let mut rng = Rng::new(11);
    let mut formats = [0u32; 3];

    // Interleave accounts (version by version) so partitions and batches mix them.
    let longest = histories.iter().map(|h| h.events.len()).max().unwrap_or(0);
    for i in 0..longest {
        for h in &histories {
            let Some(env) = h.events.get(i) else { continue };
            let choice = rng.below(3) as usize;
            formats[choice] += 1;
            match choice {
                0 => {
                    writer.raw(&h.id, &as_v1_bytes(&plain, env), None).await;
                }
                1 => {
                    writer.envelope(&plain, env).await;
                }
                _ => {
                    writer.envelope(&codec, env).await;
                }
            }
        }
    }
    for h in &histories {
        let want = h.final_state();
        let got = app.wait_version(&h.id, want.version).await;
        assert_account(&got, &h.id, &want);
    }

    // Temporal queries on every account, every version.
    for h in &histories {
        for (env, state) in h.events.iter().zip(h.states()) {
            let (_, by_version) = app
                .get(&format!("/accounts/{}?version={}", h.id, env.version))
                .await;
            assert_account(&by_version, &h.id, &state);
            let (_, at) = app
                .get(&format!(
                    "/accounts/{}?as_of={}",
                    h.id,
                    rfc3339(&env.timestamp)
                ))
                .await;
            assert_eq!(at, by_version);
            let (_, between) = app
                .get(&format!(
                    "/accounts/{}?as_of={}",
                    h.id,
                    rfc3339(&just_after(&env.timestamp))
                ))
                .await;
            assert_eq!(between, by_version);
        }
        let (status, _) = app
            .get(&format!(
                "/accounts/{}?version={}",
                h.id,
                h.events.len() + 1
            ))
            .await;
        assert_eq!(status, 404, "a version the account does not have yet");
    }

    // History: upcast envelopes, oldest first, with their original ids.
    let h = &histories[0];
    let (_, events) = app.get(&format!("/accounts/{}/events", h.id)).await;
    let events = events.as_array().expect("array");
    assert_eq!(events.len(), h.events.len());
    for (got, want) in events.iter().zip(&h.events) {
        assert_eq!(got["event_id"], want.event_id.to_string().as_str());
        assert_eq!(got["schema_version"], 2);
        assert_eq!(got["version"], want.version);
        assert_eq!(got["data"], want.data);
    }

    // Pages of accounts cover everything once, in id order.
    let mut seen = Vec::new();
    let mut after = String::new();
    loop {
        let (status, page) = app.get(&format!("/accounts?limit=7&after={after}")).await;
        assert_eq!(status, 200, "{page}");
        for a in page["accounts"].as_array().expect("accounts") {
            seen.push(a["id"].as_str().expect("id").to_owned());
        }
        match page["next"].as_str() {
            Some(next) => after = next.to_owned(),
            None => break,
        }
    }
    let mut all: Vec<String> = histories.iter().map(|h| h.id.clone()).collect();
    all.sort();
    assert_eq!(seen, all);
    let closed = histories
        .iter()
        .filter(|h| h.final_state().status.as_str() == "closed")
        .count();
    let (_, page) = app.get("/accounts?status=closed&limit=1000").await;
    assert_eq!(page["accounts"].as_array().expect("accounts").len(), closed);
    assert!(closed > 0);
    let (_, page) = app.get("/accounts?owner=Bo&limit=1000").await;
    assert!(
        page["accounts"]
            .as_array()
            .expect("accounts")
            .iter()
            .all(|a| a["owner"] == "Bo")
    );

    let total: usize = histories.iter().map(|h| h.events.len()).sum();
    assert_eq!(
        app.metric("projection_events_applied_total").await,
        total as f64
    );
    eprintln!(
        "generated mix ({backend:?}): {total} events over {} accounts (v1 {}, v2 JSON {}, v2 {}), all versions and times checked",
        histories.len(),
        formats[0],
        formats[1],
        if schema_registry_url().is_some() {
            format!("wire format {}", formats[2])
        } else {
            format!("JSON {}", formats[2])
        }
    );
    app.stop().await.expect("clean stop");
}
