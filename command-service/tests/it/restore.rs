//! Restores that follow the live state, not the history: checkpoints + a short tail, the dedupe
//! window across restarts, a store written before checkpoints existed, unreadable snapshots, and
//! a rebalance that moves only the partitions that change owner.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use rdkafka::message::Message;
use rdkafka::producer::FutureRecord;
use serde_json::Value;
use shared::kafka::{Topics, canonical_partition};
use shared::{BankAccount, Command, Event, EventCodec, EventEnvelope, Settings};

use crate::crash::workload;
use crate::helpers::*;

fn restores(ready: &Value) -> &Value {
    &ready["restores"]
}

fn count(v: &Value, field: &str) -> u64 {
    v[field]
        .as_u64()
        .unwrap_or_else(|| panic!("{field} in {v}"))
}

#[tokio::test]
async fn a_restart_after_a_long_history_reads_checkpoints_and_a_short_tail() {
    let settings = shared::testing::test_settings(2);
    let env = [("CHECKPOINT_EVERY", "50")];
    // SNAPSHOT_EVERY out of the way: only checkpoints write snapshots here.
    let service = ServiceProcess::start_with(&settings, "long-1", 1_000_000, &env);
    service.wait_ready().await;
    produce_and_wait(&settings, &workload(8, 2500, 7)).await;
    // SIGKILL: no goodbye checkpoint, the restore needs its tail.
    service.kill();
    let history = read_topic(&settings, &Topics::new(&settings.topic_prefix).events()).len();
    assert!(history > 2000, "a long history: {history} events");

    let service = ServiceProcess::start_with(&settings, "long-1", 1_000_000, &env);
    let ready = service.wait_ready().await;
    let read = restores(&ready);
    assert_eq!(count(read, "replayed_partitions"), 0, "{ready}");
    assert_eq!(count(read, "partitions"), 2, "{ready}");
    let tail = count(read, "events");
    assert!(
        tail < history as u64 / 5,
        "the tail is bounded by the checkpoints: {tail} of {history} events read"
    );
    assert!(count(read, "snapshots") >= 8, "{ready}");
    // The restored state is exact: more commands on top match the reference model.
    produce_and_wait(&settings, &workload(8, 300, 8)).await;
    service.terminate();
    verify_store(&settings).await;
    eprintln!("restore after {history} events read {tail} events");
}

#[tokio::test]
async fn a_retried_command_gets_its_original_result_after_two_restarts() {
    let mut settings = shared::testing::test_settings(2);
    settings.commit_interval = Duration::from_millis(20);
    settings.checkpoint_every = 1; // every change is checkpointed: no event is re-read
    let app = TestApp::spawn_with(settings.clone()).await;
    let opened = open("win-1", "Wim", 500);
    let too_much = cmd(
        "win-1",
        Command::Withdraw {
            amount_minor: 900,
            currency: None,
        },
    );
    let deposit = cmd(
        "win-1",
        Command::Deposit {
            amount_minor: 100,
            currency: None,
        },
    );
    let first = (
        app.send(&opened).await,
        app.send(&too_much).await,
        app.send(&deposit).await,
    );
    assert_eq!((first.0.0, first.1.0, first.2.0), (200, 422, 200));
    app.stop().await;
    let app = TestApp::spawn_with(settings.clone()).await;
    app.stop().await;

    let app = TestApp::spawn_with(settings.clone()).await;
    let ready = app.ready_json().await;
    assert_eq!(
        count(restores(&ready), "events"),
        0,
        "the state came from snapshots, the answers from the dedupe window: {ready}"
    );
    assert_eq!(app.send(&opened).await, first.0);
    assert_eq!(app.send(&too_much).await, first.1);
    assert_eq!(app.send(&deposit).await, first.2);
    app.stop().await;
    assert_eq!(
        read_events(&settings).await.len(),
        2,
        "nothing appended twice"
    );
}

/// Writes `deposits` + 1 events of one account as a store from before checkpoints would hold
/// them: no checkpoint, no snapshot.
async fn write_old_store(settings: &Settings, id: &str, deposits: u64) {
    write_old_accounts_on(settings, &[id.to_owned()], deposits, None).await;
}

/// [`write_old_store`] on the given events partition, right or wrong.
async fn write_old_store_on(settings: &Settings, id: &str, deposits: u64, partition: i32) {
    write_old_accounts_on(settings, &[id.to_owned()], deposits, Some(partition)).await;
}

#[tokio::test]
async fn a_store_from_before_checkpoints_is_replayed_once_then_checkpointed() {
    let settings = settings_with_topics(1).await;
    write_old_store(&settings, "old-1", 29).await;

    // First start: a full replay, then a checkpoint of its own.
    let app = TestApp::spawn_with(settings.clone()).await;
    let ready = app.ready_json().await;
    assert_eq!(count(restores(&ready), "replayed_partitions"), 1, "{ready}");
    assert_eq!(count(restores(&ready), "events"), 30, "{ready}");
    let (s, body) = app
        .send(&cmd(
            "old-1",
            Command::Withdraw {
                amount_minor: 1291,
                currency: None,
            },
        ))
        .await;
    assert_eq!(
        (s, &body["error"]["code"]),
        (422, &Value::from("InsufficientFunds"))
    );
    let (s, body) = app
        .send(&cmd(
            "old-1",
            Command::Withdraw {
                amount_minor: 1290,
                currency: None,
            },
        ))
        .await;
    assert_eq!((s, body["version"].as_u64()), (200, Some(31)));
    app.stop().await;
    let checkpoints = read_topic(
        &settings,
        &Topics::new(&settings.topic_prefix).command_checkpoints(),
    );
    assert!(!checkpoints.is_empty(), "the replay was checkpointed");

    // Second start: bounded, from the checkpoint.
    let app = TestApp::spawn_with(settings.clone()).await;
    let ready = app.ready_json().await;
    assert_eq!(count(restores(&ready), "replayed_partitions"), 0, "{ready}");
    assert!(
        count(restores(&ready), "events") <= 1,
        "only the withdrawal after the checkpoint: {ready}"
    );
    app.stop().await;

    // An unreadable snapshot: that aggregate falls back to its events, nothing crashes.
    let snapshots_topic = Topics::new(&settings.topic_prefix).snapshots();
    produce_to(&settings, &snapshots_topic, "old-1", b"{not a snapshot", 0).await;
    let app = TestApp::spawn_with(settings.clone()).await;
    let ready = app.ready_json().await;
    assert_eq!(count(restores(&ready), "replayed_partitions"), 1, "{ready}");
    assert_eq!(count(restores(&ready), "events"), 31, "{ready}");
    let (s, body) = app
        .send(&cmd(
            "old-1",
            Command::Deposit {
                amount_minor: 5,
                currency: None,
            },
        ))
        .await;
    assert_eq!((s, body["version"].as_u64()), (200, Some(32)), "{body}");
    app.stop().await;
    let snapshots = read_topic(&settings, &Topics::new(&settings.topic_prefix).snapshots());
    assert!(
        snapshots
            .last()
            .is_some_and(|m| m.payload() != Some(b"{not a snapshot".as_slice())),
        "a fresh snapshot replaced the unreadable one"
    );
}

/// Writes the accounts `ids`, `deposits` + 1 events each, as a store from before checkpoints
/// would hold them (on `partition`, else each on its own), many records in flight at once.
async fn write_old_accounts_on(
    settings: &Settings,
    ids: &[String],
    deposits: u64,
    partition: Option<i32>,
) {
    let codec = EventCodec::json("USD");
    let topic = Topics::new(&settings.topic_prefix).events();
    let producer = producer(settings);
    for chunk in ids.chunks(20_000) {
        let mut records = Vec::with_capacity(chunk.len() * (deposits as usize + 1));
        for id in chunk {
            let mut account = BankAccount::default();
            let events = std::iter::once(Event::AccountOpened {
                owner: "Olga".into(),
                currency: "EUR".into(),
                initial_balance_minor: 1000,
            })
            .chain((0..deposits).map(|_| Event::MoneyDeposited { amount_minor: 10 }));
            for event in events {
                account.apply(&event);
                let envelope = EventEnvelope::new(
                    id,
                    account.version,
                    &event,
                    chrono::Utc::now(),
                    Default::default(),
                );
                let bytes = codec.encode(&topic, &envelope).await.unwrap();
                records.push((id.clone(), bytes, shared::codec::event_headers(&envelope)));
            }
        }
        let sends =
            records.iter().map(|(id, bytes, headers)| {
                producer.send(
                    FutureRecord::to(&topic)
                        .key(id)
                        .payload(bytes)
                        .partition(partition.unwrap_or_else(|| {
                            canonical_partition(id.as_bytes(), settings.partitions)
                        }))
                        .headers(headers.clone()),
                    Duration::from_secs(60),
                )
            });
        for sent in futures::future::join_all(sends).await {
            sent.map_err(|(e, _)| e).unwrap();
        }
    }
}

/// Set `PIECES_TEST_ACCOUNTS=1000000` to try it at scale once (3M events of 1M accounts, pieces
/// of the default 10,000): the partition is checkpointed while it serves.
#[tokio::test]
async fn a_replayed_partition_is_checkpointed_in_bounded_pieces() {
    let accounts: usize = std::env::var("PIECES_TEST_ACCOUNTS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(400);
    let piece = if accounts > 10_000 { 10_000 } else { 40 };
    let mut settings = settings_with_topics(1).await;
    settings.checkpoint_piece = piece as u64;
    let ids: Vec<String> = (0..accounts).map(|i| format!("piece-{i}")).collect();
    let seeded = Instant::now();
    let deposits = if accounts > 10_000 { 2 } else { 0 };
    write_old_accounts_on(&settings, &ids, deposits, None).await;
    eprintln!("{accounts} accounts written in {:?}", seeded.elapsed());
    let topics = Topics::new(&settings.topic_prefix);

    let started = Instant::now();
    let app = TestApp::start_with(settings.clone()).await;
    app.wait_ready_within(Duration::from_secs(if accounts > 10_000 {
        1800
    } else {
        60
    }))
    .await;
    let ready = app.ready_json().await;
    eprintln!("replayed and ready in {:?}", started.elapsed());
    assert_eq!(count(restores(&ready), "replayed_partitions"), 1, "{ready}");
    let deposit = Command::Deposit {
        amount_minor: 5,
        currency: None,
    };
    let before = 1 + deposits;
    let (s, body) = app.send(&cmd("piece-7", deposit.clone())).await;
    assert_eq!(
        (s, body["version"].as_u64()),
        (200, Some(before + 1)),
        "{body}"
    );
    eprintln!("a deposit answered {:?} after the start", started.elapsed());
    let deadline = Instant::now() + Duration::from_secs(if accounts > 10_000 { 1800 } else { 60 });
    while read_topic(&settings, &topics.command_checkpoints()).is_empty() {
        assert!(Instant::now() < deadline, "the replay is checkpointed");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    eprintln!("checkpointed {:?} after start", started.elapsed());
    app.stop().await;

    // A transaction's records have consecutive offsets, its commit marker takes the next one:
    // the longest run of consecutive offsets is the largest piece.
    let snapshots = read_topic(&settings, &topics.snapshots());
    let keys: HashSet<&[u8]> = snapshots.iter().filter_map(|m| m.key()).collect();
    assert_eq!(keys.len(), ids.len(), "every aggregate has a snapshot");
    let mut longest = 0;
    let mut run = 0;
    let mut previous = None;
    for m in &snapshots {
        run = if previous == Some(m.offset() - 1) {
            run + 1
        } else {
            1
        };
        longest = longest.max(run);
        previous = Some(m.offset());
    }
    eprintln!(
        "{} snapshots, the largest transaction held {longest}",
        snapshots.len()
    );
    assert!(
        longest <= piece,
        "pieces of at most {piece} snapshots, not {longest}"
    );

    // The pieces and their record are a checkpoint a restart can prove.
    let app = TestApp::spawn_with(settings.clone()).await;
    let ready = app.ready_json().await;
    assert_eq!(count(restores(&ready), "replayed_partitions"), 0, "{ready}");
    let (s, body) = app.send(&cmd("piece-7", deposit)).await;
    assert_eq!(
        (s, body["version"].as_u64()),
        (200, Some(before + 2)),
        "{body}"
    );
    app.stop().await;
}

#[tokio::test]
async fn events_on_another_partition_than_their_aggregates_stop_the_start_with_the_fix() {
    // As after the partition count was changed under existing events: an account whose events
    // are on a partition it does not live on with PARTITIONS.
    let settings = settings_with_topics(2).await;
    write_old_store(&settings, "placed", 1).await;
    let wrong = 1 - canonical_partition(b"moved", 2);
    write_old_store_on(&settings, "moved", 1, wrong).await;
    let app = TestApp::start_with(settings.clone()).await;
    let ended = app.stopped(Duration::from_secs(60)).await;
    let reason = format!("{:#}", ended.expect_err("the start is refused"));
    assert!(
        reason.contains("first: moved at offset")
            && reason.contains("set PARTITIONS")
            && reason.contains(&format!("events partition {wrong} holds 2 event(s)")),
        "{reason}"
    );
}

#[tokio::test]
async fn a_result_written_by_a_writer_whose_clock_was_behind_still_answers_its_retry() {
    // A past writer, its clock 31 minutes behind, opened an account: its event and its result,
    // which it stamped with its own clock, outside the 30-minute window by that clock.
    let mut settings = settings_with_topics(1).await;
    settings.dedupe_window = Duration::from_secs(30 * 60);
    let opened = open("late-1", "Lea", 10);
    let codec = EventCodec::json("USD");
    let topics = Topics::new(&settings.topic_prefix);
    let event = Event::AccountOpened {
        owner: "Lea".into(),
        currency: "EUR".into(),
        initial_balance_minor: 10,
    };
    let behind = chrono::Utc::now() - chrono::Duration::minutes(31);
    let envelope = EventEnvelope::new("late-1", 1, &event, behind, Default::default());
    let bytes = codec.encode(&topics.events(), &envelope).await.unwrap();
    produce_to(&settings, &topics.events(), "late-1", &bytes, 0).await;
    let result = shared::CommandResult::accepted(opened.command_id, "late-1", &[envelope]);
    producer(&settings)
        .send(
            FutureRecord::to(&topics.command_results())
                .key(&opened.command_id.to_string())
                .payload(&serde_json::to_vec(&result).unwrap())
                .partition(0)
                .timestamp(behind.timestamp_millis()),
            Duration::from_secs(10),
        )
        .await
        .map_err(|(e, _)| e)
        .unwrap();

    // A writer with a right clock restores the partition and gets the command again: the
    // window rests on the brokers' time, so the result is within it.
    let app = TestApp::spawn_with(settings.clone()).await;
    let (s, body) = app.send(&opened).await;
    assert_eq!(
        (s, body["version"].as_u64()),
        (200, Some(1)),
        "the retry gets its original result, not a fresh decision: {body}"
    );
    app.stop().await;
}

#[tokio::test]
async fn a_second_instance_takes_partitions_without_restoring_the_ones_that_stay() {
    let settings = shared::testing::test_settings(4);
    let a = ServiceProcess::start(&settings, "join-a", 100);
    let ready = a.wait_ready().await;
    assert_eq!(count(restores(&ready), "partitions"), 4, "{ready}");
    produce_and_wait(&settings, &workload(12, 200, 3)).await;

    let b = ServiceProcess::start(&settings, "join-b", 100);
    let deadline = Instant::now() + Duration::from_secs(90);
    let (ra, rb) = loop {
        if let (Some(ra), Some(rb)) = (a.ready().await, b.ready().await) {
            let owned = |r: &Value| -> HashSet<i64> {
                r["partitions"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter_map(Value::as_i64)
                    .collect()
            };
            let (pa, pb) = (owned(&ra), owned(&rb));
            if !pa.is_empty() && !pb.is_empty() && pa.is_disjoint(&pb) && pa.len() + pb.len() == 4 {
                break (ra, rb);
            }
        }
        assert!(Instant::now() < deadline, "the partitions split");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        count(restores(&ra), "partitions"),
        4,
        "the first instance restored nothing again: {ra}"
    );
    assert_eq!(
        count(restores(&rb), "partitions") as usize,
        rb["partitions"].as_array().unwrap().len(),
        "the second restored exactly what it took: {rb}"
    );
    produce_and_wait(&settings, &workload(12, 200, 4)).await;
    a.terminate();
    b.terminate();
    verify_store(&settings).await;
}

#[tokio::test]
async fn a_restart_reads_only_the_results_after_its_dedupe_store_and_a_lost_store_reads_them_all() {
    let mut settings = shared::testing::test_settings(2);
    settings.commit_interval = Duration::from_millis(20);
    let state = tempfile::tempdir().unwrap();
    settings.command_state_dir = state.path().to_owned();
    let app = TestApp::spawn_with(settings.clone()).await;
    let mut commands = Vec::new();
    for i in 0..40 {
        let id = format!("window-{i}");
        commands.push(open(&id, "Wen", 10));
        commands.push(cmd(
            &id,
            Command::Deposit {
                amount_minor: 5,
                currency: None,
            },
        ));
        commands.push(cmd(
            &id,
            Command::Withdraw {
                amount_minor: 500,
                currency: None,
            },
        ));
    }
    let mut first = Vec::new();
    for c in &commands {
        first.push(app.send(c).await);
    }
    app.stop().await;

    // Graceful restart: the store covers every result; only the record at its position is read.
    let app = TestApp::spawn_with(settings.clone()).await;
    let ready = app.ready_json().await;
    let read = count(restores(&ready), "results");
    assert!(
        read <= 2,
        "{read} results read for {} commands in the window: {ready}",
        commands.len()
    );
    for (c, answer) in commands.iter().zip(&first) {
        assert_eq!(&app.send(c).await, answer, "a retry inside the window");
    }
    app.stop().await;

    // The store is lost (a new machine): the window is read from the topic, answers unchanged.
    drop(state);
    let fresh = tempfile::tempdir().unwrap();
    settings.command_state_dir = fresh.path().to_owned();
    let app = TestApp::spawn_with(settings.clone()).await;
    let ready = app.ready_json().await;
    assert!(
        count(restores(&ready), "results") >= commands.len() as u64,
        "{ready}"
    );
    for (c, answer) in commands.iter().zip(&first) {
        assert_eq!(
            &app.send(c).await,
            answer,
            "a retry after the store was lost"
        );
    }
    app.stop().await;
    assert_eq!(
        read_events(&settings).await.len(),
        80,
        "nothing appended twice"
    );
}
