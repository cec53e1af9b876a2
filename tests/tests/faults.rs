//! Faults: processes killed at random moments, NATS restarted, PostgreSQL sessions terminated,
//! a third party down, commands swallowed, poison messages, SIGTERM under load. Whatever
//! happens, every saga ends, no effect happens twice, and no money or stock is left behind
//! (`App::assert_invariants`). And readiness says when NATS is gone.

use std::time::{Duration, Instant};

use e2e::drills::{moments, schedule, workload};
use e2e::{App, Nats, Options, WORKERS, order, place_many};
use rand::Rng;
use rand::seq::SliceRandom;
use serde_json::{Value, json};

const SETTLE: Duration = Duration::from_secs(240);

/// Short deadlines and quick recovery, so that faults resolve in seconds, not minutes.
fn resilient(nats: Option<String>) -> Options {
    Options {
        nats_url: nats,
        ..Options::default()
    }
    .quick_steps(2000, 6)
    .quick_recovery()
}

async fn sagas_created(app: &App) -> i64 {
    app.count("SELECT count(*) FROM orchestrator.sagas").await
}

/// Wait until at least `n` sagas exist (the load is flowing), with a deadline.
async fn until_created(app: &App, n: i64) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while sagas_created(app).await < n {
        assert!(
            Instant::now() < deadline,
            "the load stopped before {n} sagas; logs in {}",
            app.logs.display()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_checkouts_survive_killed_processes_and_a_nats_restart() {
    let mut nats = Nats::start().await;
    let mut app = App::spawn_with(resilient(Some(nats.url()))).await;
    let n = 1000;
    let mut rng = schedule();
    // Seven rounds at random moments of the load: in six, SIGKILL the orchestrator and a
    // worker and start them again; in one, SIGKILL NATS and start it again under processes
    // that all keep running (the orchestrator's relay, reply consumer and timer loop, and the
    // workers, ride through the outage on their reconnects).
    let rounds = 7;
    let at = moments(
        &mut rng,
        rounds,
        (n as i64 / 20, n as i64 * 9 / 10),
        n as i64 / 25,
    );
    // Every kind of worker, and the Product service that prices the checkouts, is killed
    // once, in a random order (while it is down, checkouts are refused with 503 and retried).
    let mut workers = WORKERS.to_vec();
    workers.push("product");
    workers.shuffle(&mut rng);
    let nats_round = rng.random_range(0..rounds);
    let load = tokio::spawn(place_many(app.base.clone(), n, 16, workload, SETTLE));
    let mut kills = 0;
    for (round, &created) in at.iter().enumerate() {
        until_created(&app, created).await;
        if round == nats_round {
            nats.restart().await;
            eprintln!("round {round}, at {created} sagas: restarted NATS under live processes");
            continue;
        }
        app.kill("orchestrator");
        let worker = workers[kills % workers.len()];
        app.kill(worker);
        app.start("orchestrator");
        app.start(worker);
        kills += 1;
        eprintln!("round {round}, at {created} sagas: killed the orchestrator and {worker}");
    }
    assert_eq!(kills, 6);
    for name in ["orchestrator", "product"].iter().chain(WORKERS.iter()) {
        assert!(app.is_running(name), "{name} is still running");
    }
    let placed = load.await.expect("load");
    assert_eq!(placed.len(), n);
    app.assert_invariants(n, SETTLE).await;
    let compensated = app
        .count("SELECT count(*) FROM orchestrator.sagas WHERE status = 'compensated'")
        .await;
    eprintln!(
        "{} completed, {compensated} compensated",
        n as i64 - compensated
    );
    assert!(
        compensated >= n as i64 / 10,
        "the declined cards compensate"
    );
}

/// [`resilient`], with the fulfilment running under deadlines and SLAs of seconds.
fn resilient_fulfilment(nats: Option<String>) -> Options {
    let mut o = Options {
        fulfilment: true,
        ..resilient(nats)
    };
    for step in ["VERIFY_PAYMENT", "PICK_AND_PACK", "HAND_OVER"] {
        for phase in ["FORWARD", "COMPENSATION"] {
            for (key, value) in [("DEADLINE_MS", "2000"), ("BACKOFF_MAX_MS", "1000")] {
                o = o.orchestrator(
                    &format!("SAGA_SAGAS__POLICIES__FULFILMENT__{step}__{phase}__{key}"),
                    value,
                );
            }
        }
        o = o.orchestrator(
            &format!("SAGA_SAGAS__POLICIES__FULFILMENT__{step}__FORWARD__MAX_ATTEMPTS"),
            "6",
        );
    }
    o.orchestrator("SAGA_SAGAS__POLICIES__FULFILMENT__DISPATCH__SLA_MS", "3000")
        .orchestrator("SAGA_SAGAS__POLICIES__FULFILMENT__DELIVER__SLA_MS", "5000")
}

/// Tell the carrier to lose the parcels of some orders still being checked out, and never to
/// collect those of others (their fulfilments end as cases); how many were marked.
async fn mark_some(app: &App, n: i64) -> usize {
    let orders: Vec<uuid::Uuid> = sqlx::query_scalar(
        "SELECT id FROM orders.orders WHERE status = 'pending' ORDER BY created_at DESC LIMIT $1",
    )
    .bind(n)
    .fetch_all(&app.pool)
    .await
    .unwrap();
    for (i, order) in orders.iter().enumerate() {
        let plan = if i % 2 == 0 {
            json!({"outcome": "lost"})
        } else {
            json!({"dispatch_after_ms": null})
        };
        let r = app
            .http
            .put(format!(
                "{}/carrier/v1/shipments/by-key/shipment:{order}/plan",
                app.sim
            ))
            .json(&plan)
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success());
    }
    orders.len()
}

/// Cancel, as their customers would, up to `n` orders being prepared; how many were taken.
async fn cancel_some(app: &App, n: i64) -> usize {
    let orders: Vec<uuid::Uuid> = sqlx::query_scalar(
        "SELECT order_id FROM orders.fulfilments WHERE status = 'preparing' LIMIT $1",
    )
    .bind(n)
    .fetch_all(&app.pool)
    .await
    .unwrap();
    let mut taken = 0;
    for order in orders {
        let r = app
            .http
            .post(format!("{}/orders/{order}/cancel", app.base))
            .send()
            .await;
        // 202, or 409 when the parcel left meanwhile; a killed orchestrator does not answer.
        if r.is_ok_and(|r| r.status() == 202) {
            taken += 1;
        }
    }
    taken
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkouts_and_fulfilments_survive_killed_processes_and_a_nats_restart() {
    let mut nats = Nats::start().await;
    let mut app = App::spawn_with(resilient_fulfilment(Some(nats.url()))).await;
    let n = 300;
    let mut rng = schedule();
    // A round per kind of worker and one for NATS; in each, the carrier is told to lose some
    // parcels and never to collect others, its reports come once or twice, and customers
    // cancel.
    let rounds = WORKERS.len() + 1;
    let at = moments(
        &mut rng,
        rounds,
        (n as i64 / 20, n as i64 * 9 / 10),
        n as i64 / 25,
    );
    let mut workers = WORKERS.to_vec();
    workers.shuffle(&mut rng);
    let nats_round = rng.random_range(0..rounds);
    let plans = [json!({"duplicate": true}), json!({})];
    let load = tokio::spawn(place_many(app.base.clone(), n, 16, workload, SETTLE));
    let (mut cancelled, mut marked) = (0, 0);
    for (round, &created) in at.iter().enumerate() {
        until_created(&app, created).await;
        let plan = &plans[round % plans.len()];
        app.control("carrier", json!({ "plan": plan })).await;
        marked += mark_some(&app, 4).await;
        cancelled += cancel_some(&app, 3).await;
        if round == nats_round {
            nats.restart().await;
            eprintln!("round {round}, at {created} sagas: carrier plan {plan}; restarted NATS");
            continue;
        }
        let worker = workers.pop().expect("a worker per round");
        app.kill("orchestrator");
        app.kill(worker);
        app.start("orchestrator");
        app.start(worker);
        eprintln!(
            "round {round}, at {created} sagas: carrier plan {plan}; killed the orchestrator and {worker}"
        );
    }
    assert!(workers.is_empty(), "every kind of worker was killed");
    // The carrier delivers again, and the rest of the load settles.
    app.control("carrier", json!({})).await;
    let placed = load.await.expect("load");
    assert_eq!(placed.len(), n);
    app.assert_invariants(n, SETTLE).await;
    let mut ended = Vec::new();
    for status in ["delivered", "cancelled", "needs_attention"] {
        ended.push(
            app.count(&format!(
                "SELECT count(*) FROM orders.fulfilments WHERE status = '{status}'"
            ))
            .await,
        );
    }
    let (delivered, undone, cases) = (ended[0], ended[1], ended[2]);
    eprintln!(
        "fulfilments: {delivered} delivered, {undone} cancelled ({cancelled} cancels taken), {cases} cases ({marked} orders marked)"
    );
    assert!(delivered > 0, "parcels were delivered");
    assert!(cases > 0, "lost or uncollected parcels opened cases");
    assert_eq!(
        undone, cancelled as i64,
        "each cancel taken undid its order, and only those"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_checkouts_survive_terminated_database_sessions() {
    let app = App::spawn_with(resilient(None)).await;
    let n = 1000;
    let at = moments(
        &mut schedule(),
        6,
        (n as i64 / 20, n as i64 * 9 / 10),
        n as i64 / 25,
    );
    let load = tokio::spawn(place_many(app.base.clone(), n, 16, workload, SETTLE));
    let mut terminated = 0;
    for created in at {
        until_created(&app, created).await;
        terminated += app.terminate_orchestrator_sessions().await;
    }
    assert!(terminated >= 6, "sessions were terminated ({terminated})");
    let placed = load.await.expect("load");
    assert_eq!(placed.len(), n);
    app.assert_invariants(n, SETTLE).await;
}

async fn breaker(app: &App, step: &str) -> Value {
    let all = app.get_json("/breakers").await;
    all["breakers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["step"] == step)
        .cloned()
        .expect("a breaker per step")
}

async fn wait_breaker(app: &App, step: &str, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let b = breaker(app, step).await;
        if ok(&b) {
            return b;
        }
        assert!(
            Instant::now() < deadline,
            "breaker of {step} never {what}: {b}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `PUT /breakers/{step}` with `body`.
async fn force(app: &App, step: &str, body: Value) -> reqwest::Response {
    app.http
        .put(format!("{}/breakers/{step}", app.base))
        .json(&body)
        .send()
        .await
        .unwrap_or_else(|e| panic!("PUT /breakers/{step}: {e}"))
}

/// Forward attempts of the charge step dispatched so far, summed over all sagas.
async fn charge_attempts(app: &App) -> i64 {
    app.count(
        "SELECT coalesce(sum((snapshot -> 'steps' -> 1 ->> 'attempts')::int), 0)::bigint FROM orchestrator.sagas",
    )
    .await
}

#[tokio::test]
async fn an_open_breaker_parks_sagas_until_the_processor_recovers() {
    // Ten attempts leave room for the probes and for the one or two attempts the parked sagas
    // spend while an operator forces the breaker closed below: that no attempts are spent
    // while the breaker is open is checked by counting them, not by running out of them.
    let mut options = Options::default()
        .orchestrator("SAGA_BREAKERS__FAILURE_THRESHOLD", "3")
        .orchestrator("SAGA_BREAKERS__OPEN_INITIAL_MS", "800")
        .orchestrator("SAGA_BREAKERS__OPEN_MAX_MS", "1500")
        .orchestrator(
            "SAGA_CHECKOUT__POLICIES__CHARGE_PAYMENT__FORWARD__MAX_ATTEMPTS",
            "10",
        )
        .orchestrator(
            "SAGA_CHECKOUT__POLICIES__CHARGE_PAYMENT__FORWARD__BACKOFF_INITIAL_MS",
            "100",
        );
    options
        .worker_env
        .push(("SAGA_PROCESSOR__BREAKER_OPEN_MAX_MS".into(), "1000".into()));
    let app = App::spawn_with(options).await;
    app.control("processor", json!({"mode": "fail"})).await;
    let mut ids = Vec::new();
    for _ in 0..10 {
        ids.push(app.place(&order(&[("A", 1)], "tok_visa")).await);
    }
    // The failures open the breaker; the sagas park instead of spending their attempts.
    let opened = wait_breaker(&app, "charge_payment", "opened with sagas parked", |b| {
        b["state"] != "closed" && b["parked"].as_i64().unwrap() >= 5
    })
    .await;
    // The breaker is read before the attempts here and after them below, so that a probe
    // sent between two readings is counted on the side that makes the check looser.
    let opened_before = opened["times_opened"].as_i64().unwrap();
    let attempts_before = charge_attempts(&app).await;
    let metrics = app
        .http
        .get(format!("{}/metrics", app.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("saga_breaker_opened_total{step=\"charge_payment\"}"),
        "{metrics}"
    );
    // Half-open probes fail and open it again, while the outage lasts.
    wait_breaker(
        &app,
        "charge_payment",
        "re-opened twice after failed probes",
        |b| b["times_opened"].as_i64().unwrap() >= opened_before + 2,
    )
    .await;
    let attempts_after = charge_attempts(&app).await;
    let opened_after = breaker(&app, "charge_payment").await["times_opened"]
        .as_i64()
        .unwrap();
    // While the breaker blocks, a charge is attempted only as the probe of a half-open period,
    // and each such period ends with the breaker opening again (the outage goes on); only the
    // period under way when the counts were read may have a probe out and not yet re-opened.
    // Sagas that kept retrying would spend far more.
    let (spent, reopened) = (
        attempts_after - attempts_before,
        opened_after - opened_before,
    );
    assert!(
        spent <= reopened + 1,
        "{spent} charge attempts spent while the breaker opened {reopened} more times"
    );
    assert_eq!(
        app.count("SELECT count(*) FROM orchestrator.sagas WHERE status IN ('compensating', 'compensated')").await,
        0,
        "no saga ran out of attempts while the breaker was open"
    );
    // An operator forces the open breaker closed: it stops blocking at once, though its own
    // state is still open or half-open; handed back, it blocks again while the outage lasts.
    let r = force(
        &app,
        "charge_payment",
        json!({"force": "closed", "reason": "let them through"}),
    )
    .await;
    assert_eq!(r.status(), 200);
    let b = breaker(&app, "charge_payment").await;
    assert!(
        b["forced"] == "closed" && b["blocking"] == false && b["state"] != "closed",
        "forced closed: {b}"
    );
    let r = force(&app, "charge_payment", json!({"force": null})).await;
    assert_eq!(r.status(), 200);
    let b = breaker(&app, "charge_payment").await;
    assert!(
        b["forced"].is_null() && b["blocking"] == true && b["state"] != "closed",
        "handed back: {b}"
    );
    // The processor recovers: a probe succeeds, the breaker closes, every parked saga completes.
    app.control("processor", json!({"mode": "normal"})).await;
    for id in &ids {
        let saga = app.wait_terminal(id, Duration::from_secs(90)).await;
        assert_eq!(saga["status"], "completed", "{saga:#}");
    }
    wait_breaker(&app, "charge_payment", "closed", |b| b["state"] == "closed").await;
    assert_eq!(
        app.ledger().await["charges"].as_array().unwrap().len(),
        10,
        "one charge each"
    );

    // An operator forces a breaker open: new sagas park on it; handing it back lets them go.
    let r = force(
        &app,
        "create_shipment",
        json!({"force": "open", "reason": "carrier maintenance"}),
    )
    .await;
    assert_eq!(r.status(), 200);
    let id = app.place(&order(&[("B", 1)], "tok_visa")).await;
    app.wait_for(
        &format!("SELECT count(*) FROM orchestrator.sagas WHERE id = '{id}' AND parked_on = 'create_shipment'"),
        1,
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(breaker(&app, "create_shipment").await["forced"], "open");
    let r = force(&app, "create_shipment", json!({"force": null})).await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        app.wait_terminal(&id, Duration::from_secs(30)).await["status"],
        "completed"
    );
    let r = force(&app, "no_such_step", json!({"force": "open"})).await;
    assert_eq!(r.status(), 404);
    let r = force(&app, "create_shipment", json!({"force": "ajar"})).await;
    assert_eq!(r.status(), 422);
    app.assert_invariants(11, SETTLE).await;
}

#[tokio::test]
async fn one_saga_failing_for_ever_parks_nobody_else() {
    // A customer whose card the processor refuses retryably on every attempt: that saga keeps
    // retrying (as many attempts as a policy allows), and its failures come back faster than
    // anybody else's. Breakers that counted them would open (the orchestrator's after three,
    // the payment worker's after two) and park every other checkout.
    let mut options = Options::default()
        .orchestrator("SAGA_BREAKERS__FAILURE_THRESHOLD", "3")
        .orchestrator(
            "SAGA_CHECKOUT__POLICIES__CHARGE_PAYMENT__FORWARD__MAX_ATTEMPTS",
            "10000",
        )
        .orchestrator(
            "SAGA_CHECKOUT__POLICIES__CHARGE_PAYMENT__FORWARD__BACKOFF_INITIAL_MS",
            "20",
        )
        .orchestrator(
            "SAGA_CHECKOUT__POLICIES__CHARGE_PAYMENT__FORWARD__BACKOFF_MAX_MS",
            "50",
        );
    options
        .worker_env
        .push(("SAGA_PROCESSOR__BREAKER_FAILURES".into(), "2".into()));
    let app = App::spawn_with(options).await;
    let stuck = app.place(&order(&[("A", 1)], "tok_fail_transient")).await;
    let attempts = format!(
        "SELECT coalesce((snapshot -> 'steps' -> 1 ->> 'attempts')::bigint, 0) FROM orchestrator.sagas WHERE id = '{stuck}'"
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while app.count(&attempts).await < 10 {
        assert!(
            Instant::now() < deadline,
            "the failing saga stopped retrying"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Other checkouts flow meanwhile, while the failing one goes on failing.
    let mut ids = Vec::new();
    for _ in 0..20 {
        ids.push(app.place(&order(&[("B", 1)], "tok_visa")).await);
    }
    for id in &ids {
        let saga = app.wait_terminal(id, Duration::from_secs(60)).await;
        assert_eq!(saga["status"], "completed", "{saga:#}");
    }
    let failing_since = app.count(&attempts).await;
    assert!(failing_since >= 10, "it failed {failing_since} times");
    assert_eq!(
        app.count("SELECT count(*) FROM orchestrator.saga_events WHERE state_after IN ('parked', 'compensation_parked')")
            .await,
        0,
        "no saga ever parked"
    );
    assert_eq!(
        breaker(&app, "charge_payment").await["times_opened"],
        0,
        "the charge breaker never opened"
    );
    let stuck_saga = app.saga(&stuck).await;
    assert_eq!(stuck_saga["status"], "running", "{stuck_saga:#}");
    // Its customer gives up; the saga compensates like any other.
    let r = app
        .http
        .post(format!("{}/sagas/{stuck}/cancel", app.base))
        .json(&json!({"reason": "the customer gave up"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    assert_eq!(
        app.wait_terminal(&stuck, Duration::from_secs(60)).await["status"],
        "compensated"
    );
    app.assert_invariants(21, SETTLE).await;
}

#[tokio::test]
async fn a_swallowed_command_is_sent_again_after_its_deadline() {
    let mut options = Options::default();
    for step in ["RESERVE_STOCK", "CHARGE_PAYMENT", "CREATE_SHIPMENT"] {
        options = options.orchestrator(
            &format!("SAGA_CHECKOUT__POLICIES__{step}__FORWARD__DEADLINE_MS"),
            "1000",
        );
    }
    // Every worker loses the first command it gets.
    options
        .worker_env
        .push(("SAGA_FAULTS__SWALLOW".into(), "1".into()));
    let app = App::spawn_with(options).await;
    let id = app.place(&order(&[("A", 2)], "tok_visa")).await;
    let saga = app.wait_terminal(&id, Duration::from_secs(60)).await;
    assert_eq!(saga["status"], "completed", "{saga:#}");
    for step in saga["steps"].as_array().unwrap() {
        assert_eq!(step["attempts"], 1, "re-sent, not retried: {step}");
    }
    let resent = saga["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "timer_fired")
        .count();
    assert_eq!(resent, 3, "one deadline per step");
    // Each deadline sent the same command again: the same id and attempt, one dispatch later
    // (only its Nats-Msg-Id differs, so that JetStream does not drop it as a duplicate), so
    // the worker's idempotency makes it safe.
    let events = saga["events"].as_array().unwrap();
    for step in ["reserve_stock", "charge_payment", "create_shipment"] {
        let dispatches: Vec<(&Value, &Value)> = events
            .iter()
            .flat_map(|e| {
                e["effects"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|f| f["effect"] == "dispatch" && f["step"] == step)
                    .map(move |f| (e, f))
            })
            .collect();
        assert_eq!(
            dispatches.len(),
            2,
            "{step}: sent, then sent again: {dispatches:?}"
        );
        let ((sent_by, sent), (resent_by, resent)) = (dispatches[0], dispatches[1]);
        assert_ne!(sent_by["kind"], "timer_fired", "{step}: {sent_by}");
        assert_eq!(resent_by["kind"], "timer_fired", "{step}: {resent_by}");
        assert!(sent["id"].is_string(), "{step}: {sent}");
        assert_eq!(
            (&resent["id"], &resent["attempt"]),
            (&sent["id"], &sent["attempt"]),
            "{step}: the deadline re-sends the same command"
        );
        assert_eq!(
            (&sent["dispatch"], &resent["dispatch"]),
            (&json!(0), &json!(1)),
            "{step}"
        );
    }
    assert_eq!(app.ledger().await["charges"].as_array().unwrap().len(), 1);
    assert_eq!(app.count("SELECT count(*) FROM payments.charges").await, 1);
    app.assert_invariants(1, SETTLE).await;
}

#[tokio::test]
async fn poison_messages_are_dead_lettered_and_the_system_keeps_serving() {
    let app = App::spawn().await;
    let client = async_nats::connect(&app.nats_url).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let p = &app.name;
    let unknown_saga = json!({
        "command_id": uuid::Uuid::now_v7(), "saga_id": uuid::Uuid::now_v7(), "step": "charge_payment",
        "phase": "forward", "attempt": 1, "outcome": "succeeded",
        "output": {"kind": "payment_charged", "charge_id": uuid::Uuid::now_v7(), "processor_ref": "x"}
    });
    // Well-formed commands the orchestrator never sent: for a saga that does not exist, and a
    // charge of another amount than its order's total for one that does. Workers act only for
    // an order, as the order is.
    let real = app.place(&order(&[("A", 1)], "tok_visa")).await;
    let real = app.wait_terminal(&real, Duration::from_secs(30)).await;
    assert_eq!(real["status"], "completed");
    let stray = uuid::Uuid::now_v7();
    let command = |saga: &Value, step: &str, body: Value| {
        let mut c = json!({
            "id": uuid::Uuid::now_v7(), "saga_id": saga, "step": step, "phase": "forward",
            "attempt": 2, "dispatch": 0, "deadline": "2099-01-01T00:00:00Z",
        });
        c.as_object_mut()
            .unwrap()
            .extend(body.as_object().unwrap().clone());
        serde_json::to_vec(&c).unwrap()
    };
    let stray_charge = command(
        &json!(stray),
        "charge_payment",
        json!({"action": "charge_payment", "order_id": uuid::Uuid::now_v7(), "customer_id": "cust-1",
               "amount": {"minor": 100_000, "currency": "EUR"}}),
    );
    let stray_reserve = command(
        &json!(stray),
        "reserve_stock",
        json!({"action": "reserve_stock", "order_id": stray, "hold_seconds": 60,
               "lines": [{"sku": "A", "quantity": 1}]}),
    );
    let total = real["data"]["total"]["minor"]
        .as_i64()
        .expect("the order's total");
    let overcharge = command(
        &real["id"],
        "charge_payment",
        json!({"action": "charge_payment", "order_id": real["data"]["order_id"], "customer_id": "cust-1",
               "amount": {"minor": total + 1, "currency": real["data"]["total"]["currency"]}}),
    );
    let poison: Vec<(String, Vec<u8>)> = vec![
        (format!("{p}.cmd.payment"), stray_charge.clone()),
        (format!("{p}.cmd.inventory"), stray_reserve.clone()),
        (format!("{p}.cmd.payment"), overcharge.clone()),
        (format!("{p}.cmd.payment"), b"\x00\xff not json".to_vec()),
        (
            format!("{p}.cmd.inventory"),
            br#"{"hello": "world"}"#.to_vec(),
        ),
        (format!("{p}.reply.payment"), b"garbage".to_vec()),
        (
            format!("{p}.reply.shipping"),
            br#"{"outcome": "succeeded"}"#.to_vec(),
        ),
        (
            format!("{p}.reply.payment"),
            serde_json::to_vec(&unknown_saga).unwrap(),
        ),
    ];
    // No two are alike, so that a dead letter (its original subject and its payload, which is
    // kept as it was) names the one poison message it carries.
    for (i, message) in poison.iter().enumerate() {
        assert!(!poison[..i].contains(message), "poison {i} is not unique");
    }
    for (subject, payload) in &poison {
        js.publish(subject.clone(), payload.clone().into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let dlq = js
        .get_stream(format!("{}_DEAD_LETTERS", p.to_uppercase()))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut stream = dlq.clone();
        if stream.info().await.unwrap().state.messages as usize >= poison.len() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "poison messages did not all reach the dead-letter stream"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Every dead letter: (original subject, reason, payload).
    let mut stream = dlq.clone();
    let state = &stream.info().await.unwrap().state;
    let (first, last) = (state.first_sequence, state.last_sequence);
    let mut letters = Vec::new();
    for seq in first..=last {
        let m = dlq.get_raw_message(seq).await.unwrap();
        let header = |name: &str| {
            m.headers
                .get(name)
                .map(|v| v.to_string())
                .unwrap_or_default()
        };
        let (origin, reason) = (header("Dead-Letter-Subject"), header("Dead-Letter-Reason"));
        assert!(!reason.is_empty(), "dead letter {seq} has a reason");
        letters.push((origin, reason, m.payload.to_vec()));
    }
    // Each poison message was set aside exactly once: one dead-lettered twice cannot stand in
    // for another that never arrived.
    for (subject, payload) in &poison {
        let copies = letters
            .iter()
            .filter(|(origin, _, body)| origin == subject && body == payload)
            .count();
        assert_eq!(
            copies,
            1,
            "{subject} {:?} dead-lettered {copies} times: {letters:?}",
            String::from_utf8_lossy(payload)
        );
    }
    assert_eq!(
        letters.len(),
        poison.len(),
        "only the poison is dead-lettered: {letters:?}"
    );
    let unknown_saga = serde_json::to_vec(&unknown_saga).unwrap();
    let reason_of = |payload: &[u8]| {
        letters
            .iter()
            .find(|(_, _, body)| body == payload)
            .map(|(_, reason, _)| reason.clone())
            .unwrap_or_default()
    };
    for (payload, why, what) in [
        (&unknown_saga, "unknown saga", "a reply for an unknown saga"),
        (
            &stray_charge,
            "unknown saga",
            "a charge for an unknown saga",
        ),
        (
            &stray_reserve,
            "unknown saga",
            "a reservation for an unknown saga",
        ),
        (
            &overcharge,
            "does not match order total",
            "a charge of another amount",
        ),
    ] {
        let reason = reason_of(payload);
        assert!(
            reason.contains(why),
            "{what} is dead-lettered as such: {reason:?}"
        );
    }
    // None of them did anything: one charge, of the real saga, and no stock held for the stray.
    let ledger = app.ledger().await;
    assert_eq!(ledger["charges"].as_array().unwrap().len(), 1, "{ledger}");
    assert_eq!(
        app.count(&format!(
            "SELECT count(*) FROM inventory.reservations WHERE order_id = '{stray}'"
        ))
        .await,
        0
    );
    // And the consumers still serve.
    let id = app.place(&order(&[("A", 1)], "tok_visa")).await;
    assert_eq!(
        app.wait_terminal(&id, Duration::from_secs(30)).await["status"],
        "completed"
    );
    // Meanwhile no poison message was dead-lettered a second time (say, redelivered after its
    // dead letter was stored but before it was acknowledged).
    let mut stream = dlq.clone();
    assert_eq!(
        stream.info().await.unwrap().state.messages,
        poison.len() as u64,
        "dead letters after the saga"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_loses_nothing_and_repeats_nothing() {
    let mut app = App::spawn_with(resilient(None)).await;
    let n = 300;
    let load = tokio::spawn(place_many(app.base.clone(), n, 12, workload, SETTLE));
    until_created(&app, 100).await;
    // Every process stops gracefully, with exit code 0, while checkouts are in flight.
    assert_eq!(
        app.terminate("orchestrator", Duration::from_secs(30)).await,
        Some(0)
    );
    // It published everything it had committed before it exited: nothing waits in the outbox
    // for a restart (or for another orchestrator's sweep).
    assert_eq!(
        app.count("SELECT count(*) FROM orchestrator.outbox").await,
        0,
        "outbox rows left behind by a graceful shutdown"
    );
    for w in WORKERS {
        assert_eq!(
            app.terminate(w, Duration::from_secs(30)).await,
            Some(0),
            "{w}"
        );
    }
    app.start("orchestrator");
    app.wait_ready(Duration::from_secs(30)).await;
    for w in WORKERS {
        app.start(w);
    }
    let placed = load.await.expect("load");
    assert_eq!(placed.len(), n);
    app.assert_invariants(n, SETTLE).await;
}

#[tokio::test]
async fn a_retry_scheduled_before_an_orchestrator_crash_happens_after_it() {
    let mut app = App::spawn_with(
        Options::default()
            .orchestrator(
                "SAGA_CHECKOUT__POLICIES__CHARGE_PAYMENT__FORWARD__BACKOFF_INITIAL_MS",
                "1500",
            )
            .orchestrator(
                "SAGA_CHECKOUT__POLICIES__CHARGE_PAYMENT__FORWARD__JITTER",
                "false",
            ),
    )
    .await;
    // A flaky card fails its first charge: the retry waits 1.5 s in a durable timer.
    let id = app.place(&order(&[("A", 1)], "tok_flaky")).await;
    app.wait_for(
        &format!(
            "SELECT count(*) FROM orchestrator.sagas WHERE id = '{id}' AND state = 'retrying'"
        ),
        1,
        Duration::from_secs(30),
    )
    .await;
    app.kill("orchestrator");
    assert_eq!(
        app.count("SELECT count(*) FROM orchestrator.timers WHERE key = 'step'")
            .await,
        1
    );
    app.start("orchestrator");
    app.wait_ready(Duration::from_secs(30)).await;
    let saga = app.wait_terminal(&id, Duration::from_secs(30)).await;
    assert_eq!(saga["status"], "completed", "{saga:#}");
    assert_eq!(saga["steps"][1]["attempts"], 2);
    app.assert_invariants(1, SETTLE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_orchestrators_side_by_side_share_the_sagas_safely() {
    // The two divide the partitions; when one crashes, its partitions move to the other once
    // its leases expire (a short lease here), and back when it returns: the replies, signals
    // and timers of its sagas wait in its partitions' inboxes and table meanwhile.
    let mut app =
        App::spawn_with(resilient(None).orchestrator("SAGA_PARTITIONS__LEASE_MS", "2000")).await;
    app.start("orchestrator-b");
    app.wait_ready_at(&app.base_b, Duration::from_secs(30))
        .await;
    let n = 600;
    let through_a = tokio::spawn(place_many(app.base.clone(), n / 2, 8, workload, SETTLE));
    let through_b = tokio::spawn(place_many(app.base_b.clone(), n / 2, 8, workload, SETTLE));
    // Midway, one of them crashes and comes back; the other carries on meanwhile.
    until_created(&app, n as i64 / 3).await;
    app.kill("orchestrator-b");
    until_created(&app, n as i64 / 2).await;
    app.start("orchestrator-b");
    app.wait_ready_at(&app.base_b, Duration::from_secs(30))
        .await;
    assert_eq!(through_a.await.expect("load").len(), n / 2);
    assert_eq!(through_b.await.expect("load").len(), n / 2);
    app.assert_invariants(n, SETTLE).await;
    for base in [&app.base, &app.base_b] {
        let applied = app
            .metric(
                base,
                "saga_inputs_total{kind=\"step_succeeded\",verdict=\"applied\"}",
            )
            .await;
        assert!(
            applied > 0.0,
            "{base} applied no reply: both must share the work"
        );
    }
}

async fn readyz(app: &App) -> reqwest::Response {
    app.http
        .get(format!("{}/readyz", app.base))
        .send()
        .await
        .expect("GET /readyz")
}

#[tokio::test]
async fn readiness_follows_nats_down_and_back() {
    // The test's own nats-server, which it may kill; no workers: nothing but readiness is
    // looked at.
    let mut nats = Nats::start().await;
    let mut app = App::spawn_with(Options {
        nats_url: Some(nats.url()),
        ..Options::without_workers()
    })
    .await;
    assert_eq!(readyz(&app).await.status(), 200);
    nats.kill();
    // Not ready while JetStream does not answer: a problem that says when to ask again.
    let deadline = Instant::now() + Duration::from_secs(30);
    let r = loop {
        let r = readyz(&app).await;
        if r.status() != 200 {
            break r;
        }
        assert!(
            Instant::now() < deadline,
            "/readyz still 200 with NATS down; logs in {}",
            app.logs.display()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    assert!(r.headers().contains_key("retry-after"), "{:?}", r.headers());
    let problem: Value = r.json().await.unwrap();
    assert_eq!(problem["type"], "/problems/unavailable", "{problem}");
    assert_eq!(problem["status"], 503, "{problem}");
    // Ready again once NATS is back (same port, same store), without a restart.
    nats.restart().await;
    app.wait_ready(Duration::from_secs(30)).await;
    assert!(
        app.is_running("orchestrator"),
        "the orchestrator rode out the outage; logs in {}",
        app.logs.display()
    );
}
