//! Waiting for a saga's outcome without polling: `Prefer: wait` and `?wait`.

use std::time::Duration;

use e2e::{App, order};
use serde_json::{Value, json};

#[tokio::test]
async fn prefer_wait_answers_with_the_outcome_when_the_saga_ends_in_time() {
    let app = App::spawn().await;
    for (token, outcome) in [("tok_visa", "completed"), ("tok_decline", "compensated")] {
        let r = app
            .http
            .post(format!("{}/checkout", app.base))
            .header("Prefer", "wait=20")
            .json(&order(&[("A", 1)], token))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{token}");
        assert_eq!(r.headers()["preference-applied"], "wait=20");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["status"], outcome);
        // The answer is the truth: the saga really ended so.
        let saga = app.saga(body["saga_id"].as_str().unwrap()).await;
        assert_eq!(saga["status"], outcome);
    }
}

#[tokio::test]
async fn a_wait_that_runs_out_is_an_ordinary_202_and_a_long_poll_returns_at_the_end() {
    let app = App::spawn().await;
    app.control("processor", json!({"mode": "hang"})).await;
    let r = app
        .http
        .post(format!("{}/checkout", app.base))
        .header("Prefer", "respond-async, wait=1")
        .json(&order(&[("A", 1)], "tok_visa"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["status"], "running");
    let id = body["saga_id"].as_str().unwrap().to_owned();

    // A long poll, answered when the saga ends (the processor recovers meanwhile).
    let poll = {
        let (http, url) = (app.http.clone(), format!("{}/sagas/{id}?wait=30", app.base));
        tokio::spawn(async move {
            http.get(url)
                .send()
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()
        })
    };
    app.wait_for(
        &format!("SELECT count(*) FROM payments.charges WHERE saga_id = '{id}'"),
        1,
        Duration::from_secs(30),
    )
    .await;
    assert!(
        !poll.is_finished(),
        "the long poll waits while the saga runs"
    );
    app.control("processor", json!({"mode": "normal"})).await;
    let saga = poll.await.unwrap();
    assert_eq!(saga["status"], "completed", "{saga:#}");

    // A long poll on an ended saga answers at once; wait=0 never waits.
    let saga = app.get_json(&format!("/sagas/{id}?wait=0")).await;
    assert_eq!(saga["status"], "completed");
}

#[tokio::test]
async fn invalid_waits_are_refused() {
    let app = App::spawn_with(e2e::Options::without_workers()).await;
    for prefer in ["wait=abc", "wait=-1", "wait=3600", "wait", "wait=1.5"] {
        let r = app
            .http
            .post(format!("{}/checkout", app.base))
            .header("Prefer", prefer)
            .json(&order(&[("A", 1)], "tok_visa"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{prefer}");
        assert_eq!(
            r.json::<Value>().await.unwrap()["type"],
            "/problems/invalid-wait",
            "{prefer}"
        );
    }
    assert_eq!(
        app.count("SELECT count(*) FROM orchestrator.sagas").await,
        0,
        "nothing was started"
    );
    let id = uuid::Uuid::now_v7();
    for q in ["wait=x", "wait=-3", "wait=100000"] {
        let r = app
            .http
            .get(format!("{}/sagas/{id}?{q}", app.base))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{q}");
    }
    let r = app
        .http
        .get(format!("{}/sagas/{id}?colour=blue", app.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
}
