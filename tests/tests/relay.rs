//! The outbox relay: what a transition commits leaves the process only after the commit, with
//! the command id as `Nats-Msg-Id`, and a row whose publish never happened (NATS was down, the
//! process died) is published by the next start. On the real PostgreSQL and NATS JetStream.

use std::time::Duration;

use async_nats::jetstream;
use e2e::{App, Nats, Options, order};
use sagas::wire::Subjects;
use serde_json::Value;

const OUTBOX: &str = "SELECT count(*) FROM orchestrator.outbox";

#[tokio::test]
async fn a_command_goes_out_with_its_id_as_nats_msg_id_and_leaves_no_row() {
    // No workers: the first command stays in its stream, where the test reads it.
    let app = App::spawn_with(Options::without_workers()).await;
    let id = app.place(&order(&[("A", 1)], "tok_visa")).await;
    app.wait_for(OUTBOX, 0, Duration::from_secs(20)).await;

    let subjects = Subjects::new(&app.name).unwrap();
    let js = jetstream::new(async_nats::connect(&app.nats_url).await.expect("NATS"));
    let stream = js
        .get_stream(subjects.stream("COMMANDS"))
        .await
        .expect("commands stream");
    let msg = stream
        .get_last_raw_message_by_subject(&subjects.command(sagas::shop::inventory::SERVICE))
        .await
        .expect("the reserve command is in its stream");
    let command: Value = serde_json::from_slice(&msg.payload).expect("a command");
    assert_eq!(command["saga_id"], id.as_str());
    let msg_id = msg
        .headers
        .get(sagas::wire::headers::MSG_ID)
        .expect("Nats-Msg-Id")
        .as_str();
    assert_eq!(msg_id, command["id"].as_str().unwrap());
    // The id is the one the saga committed in its event log, not one made up at publish time.
    let saga = app.saga(&id).await;
    let committed = saga["events"]
        .as_array()
        .expect("an event log")
        .iter()
        .flat_map(|e| e["effects"].as_array().cloned().unwrap_or_default())
        .any(|effect| effect["effect"] == "dispatch" && effect["id"] == command["id"]);
    assert!(
        committed,
        "the published command is in the event log: {saga}"
    );
    assert!(
        msg.headers
            .get(sagas::wire::headers::CORRELATION_ID)
            .is_some_and(|c| c.as_str() == saga["correlation_id"].as_str().unwrap()),
        "the command carries the saga's correlation id"
    );
}

#[tokio::test]
async fn a_row_committed_while_nats_was_down_is_published_by_the_next_start() {
    let mut nats = Nats::start().await;
    let mut app = App::spawn_with(Options {
        nats_url: Some(nats.url()),
        ..Options::default()
    })
    .await;
    nats.kill();
    // The checkout commits (PostgreSQL is up) but its command cannot be published.
    let id = app.place(&order(&[("A", 1)], "tok_visa")).await;
    // Its two rows (the reserve command and `OrderCreated`) stay in the outbox.
    app.wait_for(OUTBOX, 2, Duration::from_secs(10)).await;
    // The process dies with the rows unpublished: only the table remembers them.
    app.kill("orchestrator");
    assert_eq!(app.count(OUTBOX).await, 2, "the rows outlive the process");

    nats.restart().await;
    app.start("orchestrator");
    app.wait_ready(Duration::from_secs(60)).await;
    let saga = app.wait_terminal(&id, Duration::from_secs(60)).await;
    assert_eq!(saga["status"], "completed", "{saga}");
    app.wait_for(OUTBOX, 0, Duration::from_secs(20)).await;
    app.assert_invariants(1, Duration::from_secs(30)).await;
}
