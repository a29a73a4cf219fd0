//! The unmodified engine serving a second aggregate type, the test-only [`StockItem`]: commands
//! and its own rejection codes, `expected_version`, dedupe, snapshots, and a SIGKILL followed by
//! a restore from them, against the real broker; then the unmodified projection machinery
//! serving its read model ([`StockItems`]): rows, a rebuild and its swap. The service runs as a child process: this test
//! binary itself, asked to run [`stock_service_child`].

use rdkafka::Message;
use serde_json::Value;
use shared::CommandMessage;
use shared::envelope::Snapshot;
use shared::kafka::Topics;

use crate::helpers::*;
use crate::stock_item::{StockCommand, StockItem, StockItems};

/// Set in the child's environment: [`stock_service_child`] then runs the service.
const CHILD: &str = "STOCK_SERVICE_CHILD";

/// Not a test of its own: the body of the child process (idle in a normal run).
#[test]
fn stock_service_child() {
    if std::env::var_os(CHILD).is_none() {
        return;
    }
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(command_service::main_for::<StockItem>("stock-service"));
}

fn stock_service(settings: &shared::Settings, instance: &str) -> ServiceProcess {
    let mut program = std::process::Command::new(std::env::current_exe().unwrap());
    program
        .args(["--exact", "stock::stock_service_child", "--nocapture"])
        .env(CHILD, "1");
    ServiceProcess::spawn(program, settings, instance, 2, &[])
}

fn stock(id: &str, command: StockCommand) -> CommandMessage<StockCommand> {
    CommandMessage::new(id, command)
}

async fn send(service: &ServiceProcess, command: &CommandMessage<StockCommand>) -> (u16, Value) {
    post(
        &reqwest::Client::new(),
        &service.url,
        command.to_json().to_string(),
    )
    .await
}

/// Sends `command` and checks that it is refused with `status` and `code`.
async fn refused(
    service: &ServiceProcess,
    command: &CommandMessage<StockCommand>,
    status: u16,
    code: &str,
) {
    let (s, body) = send(service, command).await;
    assert_eq!(
        (s, body["error"]["code"].as_str()),
        (status, Some(code)),
        "{body}"
    );
}

#[tokio::test]
async fn a_second_aggregate_type_is_served_end_to_end_and_restored_after_a_kill() {
    let settings = shared::testing::test_settings(2);
    let service = stock_service(&settings, "stock-a");
    service.wait_ready().await;

    let register = stock(
        "sku-1",
        StockCommand::Register {
            name: "Bolt".into(),
        },
    );
    let receive = stock("sku-1", StockCommand::Receive { quantity: 10 });
    let ship = stock("sku-1", StockCommand::Ship { quantity: 3 });
    let mut answers = Vec::new();
    for (command, version) in [(&register, 1), (&receive, 2), (&ship, 3)] {
        let (status, body) = send(&service, command).await;
        assert_eq!(
            (status, body["version"].as_u64()),
            (200, Some(version)),
            "{body}"
        );
        answers.push(body);
    }
    // Its own rules and codes; the engine's expected_version; the engine's dedupe.
    let too_many = stock("sku-1", StockCommand::Ship { quantity: 8 });
    refused(&service, &too_many, 422, "OutOfStock").await;
    let mut stale = stock("sku-1", StockCommand::Receive { quantity: 1 });
    stale.expected_version = Some(1);
    refused(&service, &stale, 409, "VersionConflict").await;
    assert_eq!(
        send(&service, &receive).await,
        (200, answers[1].clone()),
        "a duplicate"
    );
    // A bank-account command is not one of this service's.
    let bank = open("acc-1", "Ann", 5).to_json().to_string();
    let (status, body) = post(&reqwest::Client::new(), &service.url, bank).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("Malformed")),
        "{body}"
    );

    // SIGKILL: no checkpoint at leave; the restore starts from the snapshots (every 2 versions).
    service.kill();
    let service = stock_service(&settings, "stock-a");
    let ready = service.wait_ready().await;
    assert!(
        ready["restores"]["snapshots"].as_u64().unwrap_or(0) >= 1,
        "restored from snapshots: {ready}"
    );
    assert_eq!(
        send(&service, &ship).await,
        (200, answers[2].clone()),
        "a duplicate after the kill"
    );
    let (status, body) = send(
        &service,
        &stock("sku-1", StockCommand::Ship { quantity: 7 }),
    )
    .await;
    assert_eq!(
        (status, body["version"].as_u64()),
        (200, Some(4)),
        "7 on hand: {body}"
    );
    let one_more = stock("sku-1", StockCommand::Ship { quantity: 1 });
    refused(&service, &one_more, 422, "OutOfStock").await;
    service.terminate();

    // The store: the item's events in order, typed StockItem; its snapshots are StockItem states.
    let topics = Topics::new(&settings.topic_prefix);
    // Read as the service wrote them (plain JSON, or the registry's wire format).
    let codec = shared::EventCodec::from_settings(&settings)
        .unwrap()
        .serving::<StockItem>();
    let mut events = Vec::new();
    for m in read_topic(&settings, &topics.events()) {
        events.push(codec.decode(m.payload().unwrap()).await.unwrap());
    }
    let seen: Vec<(u64, &str, &str)> = events
        .iter()
        .map(|e| (e.version, e.aggregate_type.as_str(), e.event_type.as_str()))
        .collect();
    assert_eq!(
        seen,
        [
            (1, "StockItem", "Registered"),
            (2, "StockItem", "Received"),
            (3, "StockItem", "Shipped"),
            (4, "StockItem", "Shipped"),
        ]
    );
    let snapshots: Vec<Snapshot<StockItem>> = read_topic(&settings, &topics.snapshots())
        .iter()
        .map(|m| serde_json::from_slice(m.payload().unwrap()).unwrap())
        .collect();
    let last = snapshots
        .iter()
        .max_by_key(|s| s.version)
        .expect("snapshots");
    assert_eq!(
        (last.version, &last.state),
        (
            4,
            &StockItem {
                registered: true,
                name: "Bolt".into(),
                on_hand: 0
            }
        )
    );

    // The read side: the projection machinery with the item's read model, then a rebuild.
    let dir = tempfile::tempdir().unwrap();
    let mut read_settings = settings.clone();
    read_settings.projection_database_url =
        format!("sqlite://{}", dir.path().join("stock.db").display());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let projection = tokio::spawn(projection_service::run_model::<StockItems>(
        read_settings.clone(),
        listener,
        async {
            let _ = stopped.await;
        },
    ));
    let expected = serde_json::json!({"id": "sku-1", "name": "Bolt", "on_hand": 0, "version": 4});
    assert_eq!(item_at_version(&url, "sku-1", 4).await, expected);
    let http = reqwest::Client::new();
    let missing = http
        .get(format!("{url}/stock-items/sku-2"))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status().as_u16(), 404);
    let report = projection_service::rebuild::rebuild_model::<StockItems>(
        &read_settings,
        projection_service::rebuild::Progress::Quiet,
        std::future::pending(),
    )
    .await
    .unwrap();
    assert_eq!((report.applied, report.poison), (4, 0), "{report:?}");
    assert_eq!(
        item_at_version(&url, "sku-1", 4).await,
        expected,
        "after the swap"
    );
    let status: Value = http
        .get(format!("{url}/status"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        (status["accounts"].as_i64(), status["events"].as_i64()),
        (Some(1), Some(0)),
        "one item row, no history table: {status}"
    );
    stop.send(()).unwrap();
    projection.await.unwrap().unwrap();
}

/// Waits (up to 30 s) until the projection at `url` shows item `id` at `version`.
async fn item_at_version(url: &str, id: &str, version: u64) -> Value {
    let http = reqwest::Client::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let response = http.get(format!("{url}/stock-items/{id}")).send().await;
        if let Ok(r) = response
            && r.status().is_success()
        {
            let body: Value = r.json().await.unwrap();
            if body["version"].as_u64() == Some(version) {
                return body;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{id} never reached version {version}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

#[test]
fn the_stock_item_keeps_the_laws() {
    use proptest::prelude::*;
    let command = prop_oneof![
        "[a-z]{0,3}".prop_map(|name| StockCommand::Register { name }),
        (-3i64..20).prop_map(|quantity| StockCommand::Receive { quantity }),
        (-3i64..20).prop_map(|quantity| StockCommand::Ship { quantity }),
    ];
    proptest!(|(commands in prop::collection::vec(command, 0..30))| {
        shared::testing::check_laws::<StockItem>(&commands).map_err(TestCaseError::fail)?;
    });
}

#[test]
fn the_stock_item_in_given_when_then() {
    use shared::testing::Given;
    Given::<StockItem>::history([crate::stock_item::StockEvent::Registered { name: "Nut".into() }])
        .when(StockCommand::Ship { quantity: 1 })
        .then_expect_error(shared::RejectionCode::domain("OutOfStock"));
    let item = Given::<StockItem>::history([])
        .when(StockCommand::Register { name: "Nut".into() })
        .then_expect([crate::stock_item::StockEvent::Registered { name: "Nut".into() }]);
    assert!(item.registered);
}
