//! Transfers against the real broker: two command-service instances, concurrent transfers
//! among a few hot accounts (opposite directions at once, to closed, unknown and
//! other-currency accounts, re-sent commands), one instance killed and restarted midway; every
//! transfer ends, the books balance, and the projection shows each transfer with its steps.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{Value, json};
use shared::CommandMessage;
use shared::bank::BankCommand;
use shared::transfer::{Start, TransferCommand};

use crate::helpers::*;

fn transfer_message(
    id: &str,
    from: &str,
    to: &str,
    amount_minor: i64,
) -> CommandMessage<BankCommand> {
    CommandMessage::new(
        id,
        BankCommand::Transfer(TransferCommand::TransferMoney(Start {
            from: from.into(),
            to: to.into(),
            amount_minor,
            currency: None,
        })),
    )
}

/// Posts until the service answers (a killed instance's partitions move meanwhile).
async fn post_until_answered(http: &reqwest::Client, url: &str, body: &str) -> (u16, Value) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (status, answer) = post(http, url, body.to_owned()).await;
        if status != 504 && status != 503 && status != 0 {
            return (status, answer);
        }
        assert!(Instant::now() < deadline, "no answer: {status} {answer}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until the projection at `url` shows transfer `id` ended; returns it.
async fn ended(http: &reqwest::Client, url: &str, id: &str, deadline: Instant) -> Value {
    loop {
        let response = http.get(format!("{url}/transfers/{id}")).send().await;
        if let Ok(r) = response
            && r.status() == 200
        {
            let body: Value = r.json().await.unwrap();
            if body["status"] != "pending" {
                return body;
            }
        }
        assert!(
            Instant::now() < deadline,
            "transfer {id} did not end in time"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn transfers_end_and_conserve_money_across_two_instances_and_a_kill() {
    let settings = shared::testing::test_settings(4);
    let mut a = ServiceProcess::start(&settings, "transfers-a", 5);
    let b = ServiceProcess::start(&settings, "transfers-b", 5);
    a.wait_ready().await;
    b.wait_ready().await;

    let dir = tempfile::tempdir().unwrap();
    let mut read_settings = settings.clone();
    read_settings.projection_database_url =
        format!("sqlite://{}", dir.path().join("bank.db").display());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let projection_url = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let projection = tokio::spawn(projection_service::run(read_settings, listener, async {
        let _ = stopped.await;
    }));

    let http = reqwest::Client::new();
    let hot = ["hot-0", "hot-1", "hot-2", "hot-3"];
    let mut opening: HashMap<&str, i64> = HashMap::new();
    for (id, currency, balance) in [
        ("hot-0", "EUR", 50_000),
        ("hot-1", "EUR", 50_000),
        ("hot-2", "EUR", 300),
        ("hot-3", "EUR", 0),
        ("yen", "JPY", 1_000),
        ("shut", "EUR", 0),
    ] {
        let open = json!({
            "command_id": uuid::Uuid::new_v4(), "aggregate_id": id, "type": "OpenAccount",
            "payload": {"owner": "o", "currency": currency, "initial_balance_minor": balance}
        });
        let (s, body) = post_until_answered(&http, &b.url, &open.to_string()).await;
        assert_eq!(s, 200, "{body}");
        opening.insert(id, balance);
    }
    let close = cmd("shut", shared::Command::CloseAccount);
    let (s, body) = post(&http, &b.url, close.to_json().to_string()).await;
    assert_eq!(s, 200, "{body}");

    // 600 transfers: among the hot accounts in both directions, and some that must fail.
    let mut planned = Vec::new();
    for n in 0..600usize {
        let from = hot[n % 4];
        let (to, expected_failure) = match n % 20 {
            7 => ("shut", Some("AccountClosed")),
            11 => ("ghost", Some("AccountNotFound")),
            13 => ("yen", Some("CurrencyMismatch")),
            _ => (hot[(n * 7 + 1) % 4], None),
        };
        // The failures' source has the funds: each must fail for its target's reason.
        let from = if expected_failure.is_some() {
            "hot-0"
        } else {
            from
        };
        let to = if to == from { hot[(n + 1) % 4] } else { to };
        planned.push((
            format!("tr-{n}"),
            from,
            to,
            1 + (n as i64 % 97),
            expected_failure,
        ));
    }
    let messages: Vec<CommandMessage<BankCommand>> = planned
        .iter()
        .map(|(id, from, to, amount, _)| transfer_message(id, from, to, *amount))
        .collect();

    let urls = [a.url.clone(), b.url.clone()];
    let send_all = |range: std::ops::Range<usize>, urls: Vec<String>| {
        let http = http.clone();
        let messages = &messages;
        async move {
            futures::stream::iter(range)
                .map(|i| {
                    let (http, url) = (http.clone(), urls[i % urls.len()].clone());
                    let body = messages[i].to_json().to_string();
                    async move { (i, post(&http, &url, body).await) }
                })
                .buffer_unordered(32)
                .collect::<Vec<_>>()
                .await
        }
    };
    let first = send_all(0..300, urls.to_vec()).await;
    for (i, (status, body)) in &first {
        assert_eq!(*status, 200, "transfer {i}: {body}");
        assert_eq!(
            (body["status"].as_str(), body["version"].as_u64()),
            (Some("accepted"), Some(1))
        );
    }
    // Kill one instance with steps in flight, and keep sending through the other.
    let killed_at = Instant::now();
    a.kill();
    let rest = send_all(300..600, vec![b.url.clone()]).await;
    for (i, (status, body)) in &rest {
        // Sent while the group rebalanced: the answer may not come in time (504); the command
        // is in the log all the same, and re-sending it below gets its one result.
        assert!(
            *status == 200 || *status == 504,
            "transfer {i}: {status} {body}"
        );
    }
    a = ServiceProcess::start(&settings, "transfers-a", 5);
    // Every transfer re-sent once: each answers its original result, none is started twice.
    for (i, message) in messages.iter().enumerate() {
        let (status, body) =
            post_until_answered(&http, &b.url, &message.to_json().to_string()).await;
        assert_eq!(status, 200, "re-sent transfer {i}: {body}");
        assert_eq!(body["version"].as_u64(), Some(1), "{body}");
    }
    // A step command from a client is refused.
    let forged = json!({
        "command_id": uuid::Uuid::new_v4(), "aggregate_id": "hot-3", "type": "CreditForTransfer",
        "payload": {"transfer_id": "x", "from": "hot-0", "to": "hot-3", "amount_minor": 1_000_000}
    });
    let (s, body) = post(&http, &b.url, forged.to_string()).await;
    assert_eq!(
        (s, body["error"]["code"].as_str()),
        (400, Some("Malformed")),
        "{body}"
    );

    let deadline = Instant::now() + Duration::from_secs(180);
    let mut balances: HashMap<&str, i64> = opening.clone();
    for (id, from, to, amount, expected_failure) in &planned {
        let t = ended(&http, &projection_url, id, deadline).await;
        match expected_failure {
            Some(reason) => {
                assert_eq!(
                    (t["status"].as_str(), t["reason"].as_str()),
                    (Some("failed"), Some(*reason)),
                    "{t}"
                );
            }
            None if t["status"] == "completed" => {
                *balances.get_mut(from).unwrap() -= amount;
                *balances.get_mut(to).unwrap() += amount;
            }
            None => assert_eq!(t["reason"], "InsufficientFunds", "{t}"),
        }
        assert_eq!(
            (t["from"].as_str(), t["to"].as_str()),
            (Some(*from), Some(*to))
        );
        assert!(t["finished_at"].is_string(), "{t}");
    }
    eprintln!(
        "all transfers ended {:?} after the kill",
        killed_at.elapsed()
    );
    let completed = planned.len()
        - futures::stream::iter(&planned)
            .filter(|(id, ..)| {
                let http = http.clone();
                let url = format!("{projection_url}/transfers/{id}");
                async move {
                    let t: Value = http.get(url).send().await.unwrap().json().await.unwrap();
                    t["status"] != "completed"
                }
            })
            .count()
            .await;
    assert!(
        completed > 300,
        "most transfers among the hot accounts complete: {completed}"
    );

    // The books: each balance is its opening plus what completed transfers moved, the total is
    // unchanged, and no transfer is left in flight (the settles may land just after the end).
    let total: i64 = opening.values().sum();
    let settle_deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut seen = HashMap::new();
        for id in opening.keys() {
            let account: Value = http
                .get(format!("{projection_url}/accounts/{id}"))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            seen.insert(
                *id,
                (
                    account["balance_minor"].as_i64().unwrap(),
                    account["transfers_pending"].as_u64().unwrap_or(0),
                ),
            );
        }
        let settled = seen.values().all(|(_, pending)| *pending == 0);
        if settled || Instant::now() > settle_deadline {
            for (id, (balance, pending)) in &seen {
                assert_eq!(*balance, balances[id], "balance of {id}");
                assert_eq!(*pending, 0, "{id} keeps a transfer in flight");
            }
            assert_eq!(seen.values().map(|(b, _)| b).sum::<i64>(), total);
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The transfer's page: its steps, in order, and an account's list names it.
    let (ok_id, ok_from, ok_to) = planned
        .iter()
        .find(|p| p.4.is_none())
        .map(|p| (p.0.clone(), p.1, p.2))
        .unwrap();
    let t: Value = http
        .get(format!("{projection_url}/transfers/{ok_id}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    if t["status"] == "completed" {
        let steps: Vec<&str> = t["steps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["event_type"].as_str().unwrap())
            .collect();
        for step in [
            "TransferStarted",
            "TransferDebited",
            "TransferCredited",
            "TransferCompleted",
        ] {
            assert!(steps.contains(&step), "{steps:?}");
        }
        assert_eq!(t["steps"][0]["event_type"], "TransferStarted", "{t}");
    }
    for account in [ok_from, ok_to] {
        let mut after = String::new();
        let mut found = false;
        loop {
            let page: Value = http
                .get(format!(
                    "{projection_url}/transfers?account={account}&limit=100&after={after}"
                ))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            found |= page["transfers"]
                .as_array()
                .unwrap()
                .iter()
                .any(|t| t["transfer_id"] == ok_id.as_str());
            match page["next"].as_str() {
                Some(next) if !found => after = next.to_owned(),
                _ => break,
            }
        }
        assert!(found, "{account}'s transfers list {ok_id}");
    }
    // Every account event caused by a transfer carries the transfer id as its correlation id.
    let events: Value = http
        .get(format!("{projection_url}/accounts/{ok_from}/events"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    for e in events.as_array().unwrap() {
        if let Some(transfer_id) = e["data"]["transfer_id"].as_str() {
            assert_eq!(
                e["metadata"]["correlation_id"].as_str(),
                Some(transfer_id),
                "{e}"
            );
        }
    }

    stop.send(()).unwrap();
    projection.await.unwrap().unwrap();
    drop(a);
    drop(b);
}
