//! Waiting for a saga's outcome without polling: `Prefer: wait` and `?wait`.

use std::time::{Duration, Instant};

use e2e::{App, order};
use serde_json::{Value, json};

/// How much earlier than asked a wait may end: timers and clocks are not exact.
const TOLERANCE: Duration = Duration::from_millis(100);

/// `POST /checkout` of one order with this `Prefer` header; the answer and how long it took.
async fn checkout_preferring(app: &App, prefer: &str) -> (reqwest::Response, Duration) {
    let started = Instant::now();
    let r = app
        .http
        .post(format!("{}/checkout", app.base))
        .header("Prefer", prefer)
        .json(&order(&[("A", 1)], "tok_visa"))
        .send()
        .await
        .unwrap();
    (r, started.elapsed())
}

#[tokio::test]
async fn prefer_wait_answers_with_the_outcome_when_the_saga_ends_in_time() {
    let app = App::spawn().await;
    for (token, outcome) in [("tok_visa", "completed"), ("tok_decline", "compensated")] {
        let started = Instant::now();
        let r = app
            .http
            .post(format!("{}/checkout", app.base))
            .header("Prefer", "wait=20")
            .json(&order(&[("A", 1)], token))
            .send()
            .await
            .unwrap();
        let elapsed = started.elapsed();
        assert_eq!(r.status(), 200, "{token}");
        assert_eq!(r.headers()["preference-applied"], "wait=20");
        // Answered when the saga ended, not when the wait ran out (a generous bound: a
        // checkout takes milliseconds).
        assert!(
            elapsed < Duration::from_secs(10),
            "{token}: answered after {elapsed:?}"
        );
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
    let (r, elapsed) = checkout_preferring(&app, "respond-async, wait=1").await;
    assert_eq!(r.status(), 202);
    assert_eq!(r.headers()["preference-applied"], "wait=1");
    assert!(
        elapsed >= Duration::from_secs(1) - TOLERANCE,
        "answered after {elapsed:?}, before the wait ran out"
    );
    let location = r.headers()["location"].to_str().unwrap().to_owned();
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["status"], "running");
    let id = body["saga_id"].as_str().unwrap().to_owned();
    // Where to look for the outcome later.
    assert_eq!(body["status_url"], format!("/sagas/{id}"));
    assert_eq!(location, format!("/sagas/{id}"));

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

/// The answer is the problem of an invalid wait.
async fn assert_invalid_wait(what: &str, r: reqwest::Response) {
    assert_eq!(r.status(), 400, "{what}");
    assert_eq!(
        r.headers()["content-type"],
        "application/problem+json",
        "{what}"
    );
    let problem: Value = r.json().await.unwrap();
    assert_eq!(
        problem["type"], "/problems/invalid-wait",
        "{what}: {problem}"
    );
    assert_eq!(problem["status"], 400, "{what}: {problem}");
}

#[tokio::test]
async fn invalid_waits_are_refused_and_valid_ones_are_kept() {
    // No workers: a saga starts and stays running.
    let app = App::spawn_with(e2e::Options::without_workers()).await;
    // Whole seconds from 0 to http.max_wait_seconds (60 here), digits only.
    for prefer in [
        "wait=abc",
        "wait=-1",
        "wait=61",
        "wait=3600",
        "wait",
        "wait=1.5",
        "wait=+5",
    ] {
        let (r, _) = checkout_preferring(&app, prefer).await;
        assert_invalid_wait(prefer, r).await;
    }
    assert_eq!(
        app.count("SELECT count(*) FROM orchestrator.sagas").await,
        0,
        "nothing was started"
    );
    let id = uuid::Uuid::now_v7();
    // `%2B` is `+`: a bare `+` in a query string would be read as a space.
    for q in ["wait=x", "wait=-3", "wait=61", "wait=100000", "wait=%2B5"] {
        let r = app
            .http
            .get(format!("{}/sagas/{id}?{q}", app.base))
            .send()
            .await
            .unwrap();
        assert_invalid_wait(q, r).await;
    }
    let r = app
        .http
        .get(format!("{}/sagas/{id}?colour=blue", app.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);

    // Preferences other than wait are ignored, whatever they hold, even bytes that are not
    // ASCII.
    let r = app
        .http
        .post(format!("{}/checkout", app.base))
        .header(
            "Prefer",
            reqwest::header::HeaderValue::from_bytes(b"respond-async, note=\"caf\xc3\xa9\"")
                .unwrap(),
        )
        .json(&order(&[("A", 1)], "tok_visa"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    assert!(
        !r.headers().contains_key("preference-applied"),
        "{:?}",
        r.headers()
    );

    // wait=0 answers at once (well before the client would give up after 30 s).
    let (r, elapsed) = checkout_preferring(&app, "wait=0").await;
    assert_eq!(r.status(), 202);
    assert_eq!(r.headers()["preference-applied"], "wait=0");
    assert!(
        elapsed < Duration::from_secs(3),
        "wait=0 answered after {elapsed:?}"
    );
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["status"], "running");
    let id = body["saga_id"].as_str().unwrap().to_owned();

    // A long poll of a saga that cannot end (nothing serves its commands) answers with the
    // saga as it stands once the wait ran out, not before.
    let started = Instant::now();
    let r = app
        .http
        .get(format!("{}/sagas/{id}?wait=1", app.base))
        .send()
        .await
        .unwrap();
    let elapsed = started.elapsed();
    assert_eq!(r.status(), 200);
    assert!(
        elapsed >= Duration::from_secs(1) - TOLERANCE && elapsed < Duration::from_secs(10),
        "answered after {elapsed:?}, not when the wait of 1 s ran out"
    );
    let saga: Value = r.json().await.unwrap();
    assert_eq!(saga["status"], "running", "{saga:#}");
}
