//! The seed era's v1 events must fold to the account states the seed computed.

use std::collections::BTreeMap;

use shared::money::format_minor;
use shared::{BankAccount, EventCodec};

#[test]
fn seed_v1_events_fold_to_the_expected_states() {
    let codec = EventCodec::json("USD");
    let mut accounts: BTreeMap<String, BankAccount> = BTreeMap::new();
    let lines = shared::testing::SEED_V1_EVENTS;
    let mut count = 0;
    for line in lines.lines().filter(|l| !l.trim().is_empty()) {
        let envelope = codec
            .decode_json(line.as_bytes())
            .expect("seed event decodes");
        assert_eq!(envelope.schema_version, 2);
        let event = envelope.event().unwrap();
        let account = accounts.entry(envelope.aggregate_id.clone()).or_default();
        account.check_applicable(&event).unwrap();
        assert_eq!(
            envelope.version,
            account.version + 1,
            "versions are contiguous"
        );
        account.apply(&event);
        count += 1;
    }
    assert_eq!(count, 53);

    let expected: BTreeMap<String, serde_json::Value> =
        serde_json::from_str(shared::testing::SEED_V1_EXPECTED).unwrap();
    assert_eq!(
        accounts.keys().collect::<Vec<_>>(),
        expected.keys().collect::<Vec<_>>()
    );
    for (id, want) in &expected {
        let got = &accounts[id];
        assert_eq!(got.owner, want["owner"].as_str().unwrap(), "{id} owner");
        assert_eq!(
            got.currency,
            want["currency"].as_str().unwrap(),
            "{id} currency"
        );
        assert_eq!(
            got.balance_minor,
            want["balance_minor"].as_i64().unwrap(),
            "{id} balance"
        );
        assert_eq!(
            format_minor(got.balance_minor, 2),
            want["balance"].as_str().unwrap(),
            "{id}"
        );
        assert_eq!(
            got.status.as_str(),
            want["status"].as_str().unwrap(),
            "{id} status"
        );
        assert_eq!(
            got.version,
            want["version"].as_u64().unwrap(),
            "{id} version"
        );
        assert_eq!(
            got.transaction_count,
            want["transaction_count"].as_u64().unwrap(),
            "{id} txns"
        );
    }
}
