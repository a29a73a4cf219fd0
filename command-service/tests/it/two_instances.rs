//! Two instances in one group: partitions split, one writer per aggregate, and killing one moves
//! its partitions without losing anything.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use crate::crash::workload;
use crate::helpers::*;

fn owned(ready: &serde_json::Value) -> Vec<i64> {
    ready["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_i64().unwrap())
        .collect()
}

#[tokio::test]
async fn two_instances_split_the_partitions_and_survive_a_kill() {
    let settings = shared::testing::test_settings(4);
    let a = ServiceProcess::start(&settings, "pair-a", 100);
    let b = ServiceProcess::start(&settings, "pair-b", 100);
    // wait until both own a disjoint, complete split
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        if let (Some(ra), Some(rb)) = (a.ready().await, b.ready().await) {
            let (pa, pb) = (owned(&ra), owned(&rb));
            let all: HashSet<i64> = pa.iter().chain(&pb).copied().collect();
            if !pa.is_empty() && !pb.is_empty() && all.len() == 4 && pa.len() + pb.len() == 4 {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "partitions split between two instances"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let producer = producer(&settings);
    let commands = workload(20, 600, 11);
    let half = commands.len() / 2;
    for c in &commands[..half] {
        produce_raw(&producer, &settings, &c.aggregate_id, &c.to_bytes(), None).await;
    }
    a.kill();
    for c in &commands[half..] {
        produce_raw(&producer, &settings, &c.aggregate_id, &c.to_bytes(), None).await;
    }
    // b takes everything over
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        if let Some(rb) = b.ready().await
            && owned(&rb).len() == 4
        {
            break;
        }
        assert!(Instant::now() < deadline, "survivor owns all partitions");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let distinct: HashSet<_> = commands.iter().map(|c| c.command_id).collect();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let answered: HashSet<_> = read_results(&settings)
            .iter()
            .map(|r| r.command_id)
            .collect();
        if distinct.iter().all(|id| answered.contains(id)) {
            break;
        }
        assert!(Instant::now() < deadline, "all commands answered");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    b.terminate();
    let (events, decided) = verify_store(&settings).await;
    assert_eq!(decided, distinct.len());
    eprintln!(
        "two instances: {} commands, {events} events, one instance killed, 0 duplicates",
        distinct.len()
    );
}

#[tokio::test]
async fn a_second_instance_with_the_same_instance_id_stops_the_first() {
    let settings = shared::testing::test_settings(2);
    let mut a = ServiceProcess::start(&settings, "twin", 100);
    a.wait_ready().await;
    let b = ServiceProcess::start(&settings, "twin", 100);
    // The newcomer fences the old one (producer and static group member alike): the old one
    // must stop with an error instead of fencing back.
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = a.child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the fenced instance stops");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(!status.success(), "it exits non-zero: {status}");
    let ready = b.wait_ready().await;
    assert_eq!(
        owned(&ready).len(),
        2,
        "the newcomer owns everything: {ready}"
    );
    let (s, body) = post(
        &reqwest::Client::new(),
        &b.url,
        open("twin-1", "Tess", 10).to_json().to_string(),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    b.terminate();
}

/// Sends `signal` (e.g. "-STOP") to the process.
fn signal(process: &ServiceProcess, signal: &str) {
    let sent = std::process::Command::new("kill")
        .arg(signal)
        .arg(process.child.id().to_string())
        .status()
        .unwrap();
    assert!(sent.success(), "kill {signal}");
}

/// POSTs a deposit of `amount_minor` on `id` to the service at `url`.
async fn deposit(url: &str, id: &str, amount_minor: i64) -> (u16, serde_json::Value) {
    let command = shared::Command::Deposit {
        amount_minor,
        currency: None,
    };
    let body = cmd(id, command).to_json().to_string();
    post(&reqwest::Client::new(), url, body).await
}

/// Waits until `process` reports owning `partitions`.
async fn wait_owning(process: &ServiceProcess, partitions: usize, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        if let Some(ready) = process.ready().await
            && owned(&ready).len() == partitions
        {
            return;
        }
        assert!(Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn a_writer_frozen_while_idle_and_replaced_never_checkpoints_over_its_replacement() {
    // One partition; A owns it and is idle with changes no checkpoint covers yet.
    let settings = shared::testing::test_settings(1);
    let http = reqwest::Client::new();
    let mut a = ServiceProcess::start(&settings, "frozen-a", 1000);
    a.wait_ready().await;
    let (s, body) = post(
        &http,
        &a.url,
        open("frozen-x", "Xena", 10).to_json().to_string(),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    let (s, body) = deposit(&a.url, "frozen-x", 5).await;
    assert_eq!((s, body["version"].as_u64()), (200, Some(2)), "{body}");
    let b = ServiceProcess::start(&settings, "frozen-b", 1000);
    b.wait_ready().await;

    // A freezes past its session; B takes the partition over and appends.
    signal(&a, "-STOP");
    wait_owning(&b, 1, "B takes the partition over from the frozen A").await;
    let (s, body) = post(
        &http,
        &b.url,
        open("frozen-y", "Yuri", 20).to_json().to_string(),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    let (s, body) = deposit(&b.url, "frozen-x", 7).await;
    assert_eq!((s, body["version"].as_u64()), (200, Some(3)), "{body}");

    // A resumes with a stop request pending: its way out checkpoints what it holds as dirty,
    // before it has heard that it lost the partition.
    signal(&a, "-TERM");
    signal(&a, "-CONT");
    let deadline = Instant::now() + Duration::from_secs(60);
    while a.child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "the resumed A stops");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // B dies before its own next checkpoint; a third instance restores (once B's session is
    // over and the partition is its).
    b.kill();
    let c = ServiceProcess::start(&settings, "frozen-c", 1000);
    wait_owning(&c, 1, "C takes the partition over").await;
    let (s, body) = deposit(&c.url, "frozen-y", 1).await;
    assert_eq!(
        (s, body["version"].as_u64()),
        (200, Some(2)),
        "the account B opened is still there: {body}"
    );
    let (s, body) = deposit(&c.url, "frozen-x", 1).await;
    assert_eq!(
        (s, body["version"].as_u64()),
        (200, Some(4)),
        "no version written twice: {body}"
    );
    c.terminate();
    verify_store(&settings).await;
}

/// The latest lease of INSTANCE_ID `instance`, as JSON.
fn latest_lease(settings: &shared::Settings, instance: &str) -> serde_json::Value {
    let topic = shared::kafka::Topics::new(&settings.topic_prefix).command_instances();
    read_topic(settings, &topic)
        .iter()
        .rev()
        .filter(|m| rdkafka::Message::key(*m) == Some(instance.as_bytes()))
        .find_map(|m| serde_json::from_slice(rdkafka::Message::payload(m)?).ok())
        .expect("a lease")
}

#[tokio::test]
async fn twins_restarted_by_an_orchestrator_back_off_instead_of_fencing_each_other_forever() {
    let settings = shared::testing::test_settings(1);
    let a = ServiceProcess::start(&settings, "twins", 100);
    a.wait_ready().await;
    let (s, body) = post(
        &reqwest::Client::new(),
        &a.url,
        open("twins-1", "Tom", 10).to_json().to_string(),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    // B takes the id at once (one takeover is a replacement), and A stops.
    let b = ServiceProcess::start(&settings, "twins", 100);
    b.wait_ready().await;
    let mut a = a;
    let deadline = Instant::now() + Duration::from_secs(60);
    while a.child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "the fenced instance stops");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A found its id taken while it ran, and said so as it stopped.
    let mark = latest_lease(&settings, "twins");
    assert_eq!(mark["contested"], true, "{mark}");

    // The orchestrator restarts A moments later: a takeover of a contested id backs off, so B
    // keeps serving meanwhile instead of being fenced at once.
    let a = ServiceProcess::start(&settings, "twins", 100);
    let started = Instant::now();
    let mut amount = 1;
    while started.elapsed() < Duration::from_secs(4) {
        let (s, body) = deposit(&b.url, "twins-1", amount).await;
        assert_eq!(
            s,
            200,
            "B still serves {:?} after A restarted: {body}",
            started.elapsed()
        );
        amount += 1;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    a.wait_ready().await;
    assert!(
        started.elapsed() >= Duration::from_secs(5),
        "A backed off 5 s before taking the id"
    );
    assert_eq!(latest_lease(&settings, "twins")["takeovers"], 1);
    drop(b);

    // A graceful stop releases the id: the next start is no takeover and does not wait.
    a.terminate();
    assert_eq!(latest_lease(&settings, "twins")["released"], true);
    let c = ServiceProcess::start(&settings, "twins", 100);
    c.wait_ready().await;
    assert!(latest_lease(&settings, "twins").get("takeovers").is_none());

    // One instance crash-looping (SIGKILL, restarted at once, again and again) is no twin: it
    // never backs off. (It did before the contested mark: 5 s at the second restart.)
    c.kill();
    let d = ServiceProcess::start(&settings, "twins", 100);
    d.wait_ready().await;
    d.kill();
    let e = ServiceProcess::start(&settings, "twins", 100);
    e.wait_ready().await;
    let lease = latest_lease(&settings, "twins");
    assert!(
        lease.get("takeovers").is_none() && lease.get("contested").is_none(),
        "no takeover counted: {lease}"
    );
    e.terminate();
}
