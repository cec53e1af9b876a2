//! The platform is open: the suite's own saga type, `courier` ([`e2e::courier`]), with its own
//! service, commands, signals, timers and read model, runs in an orchestrator binary of the
//! suite beside the shop's types. Its machine is tested at its boundary, then end to end over
//! the real stack: started by an event (published twice, started once), a signal awaited under
//! an SLA beside the step's deadline, signals delivered twice and late, an SLA that runs out,
//! and commands of an unknown action dead-lettered with the reason.

use std::time::{Duration, Instant};

use e2e::courier::{self, CourierCommand};
use e2e::{App, Options};
use sagas::api::{Effect, Env, FiredTimer, Input, SagaType, Status, Verdict};
use sagas::wire::{
    Body, Event, EventId, ReplyOutcome, SagaId, Signal, SignalId, SignalMessage, SignalTarget,
    headers,
};
use serde_json::{Value, json};
use uuid::Uuid;

const WITHIN: Duration = Duration::from_secs(60);

fn t(secs: i64) -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::from_timestamp(1_900_000_000 + secs, 0).unwrap()
}

fn signal(id: u128, name: &str, payload: Value) -> Input {
    Input::Signal(Signal {
        id: SignalId::from_uuid(Uuid::from_u128(id)),
        name: name.into(),
        payload,
    })
}

#[test]
fn the_courier_machine_at_its_boundary() {
    let parcel = Uuid::from_u128(77);
    let saga = SagaId::from_uuid(Uuid::from_u128(78));
    let (mut m, effects) = courier::TYPE
        .start(saga, &json!({"parcel_id": parcel}), &Env::at(t(0)))
        .unwrap();
    // The command goes out with its deadline, and the SLA of the scan it awaits beside it.
    let mut timers: Vec<(String, i64)> = effects
        .iter()
        .filter_map(|e| match e {
            Effect::SetTimer { name, at, .. } => Some((name.clone(), (*at - t(0)).num_seconds())),
            _ => None,
        })
        .collect();
    timers.sort();
    assert_eq!(
        timers,
        [("sla:hand_over".to_owned(), 86_400), ("step".to_owned(), 2)]
    );
    let cmd = effects
        .iter()
        .find_map(|e| match e {
            Effect::Dispatch(c) => Some(c.clone()),
            _ => None,
        })
        .unwrap();
    assert_eq!(
        (cmd.service.as_str(), cmd.saga_type.as_str()),
        ("courier", "courier")
    );
    assert_eq!(
        cmd.body.decode::<CourierCommand>().unwrap(),
        CourierCommand::HandOver { parcel_id: parcel }
    );
    let env = Env::at(t(1));
    let applied = |v: Verdict| matches!(v, Verdict::Applied(_));
    assert!(applied(m.apply(
        &Input::Reply(cmd.reply(ReplyOutcome::succeeded(
            &courier::CourierOutput::HandedOver {
                tracking: "CR-1".into()
            }
        ))),
        &env,
    )));
    assert_eq!(m.state_name(), "awaiting");
    assert!(applied(m.apply(&signal(1, "picked_up", json!({})), &env)));
    // The same scan again changes nothing.
    assert!(!applied(m.apply(&signal(1, "picked_up", json!({})), &env)));
    assert!(applied(m.apply(
        &signal(2, "delivered", json!({"signed_by": "Ada"})),
        &env
    )));
    assert_eq!(m.status(), Status::Completed);
    // A late scan changes nothing either.
    assert!(!applied(m.apply(&signal(3, "delivered", json!({})), &env)));
    let rows = m.projection();
    assert_eq!(rows[0].row["status"], "delivered");
    assert_eq!(rows[0].row["signed_by"], "Ada");
    assert_eq!(rows[0].row["tracking"], "CR-1");

    // Started by its event: keyed by the parcel, with the SLA the event asks for.
    let event = Event {
        id: EventId::from_uuid(Uuid::from_u128(5)),
        name: "ParcelReady".into(),
        v: 1,
        occurred_at: t(0),
        source: "courier".into(),
        correlation_id: None,
        body: Body::of(&json!({"parcel_id": parcel, "pickup_sla_ms": 1500})),
    };
    let start = courier::TYPE.start_on(&event).unwrap();
    assert_eq!(start.key, parcel.to_string());
    let (_, effects) = courier::TYPE
        .start(saga, &start.request, &Env::at(t(0)))
        .unwrap();
    assert!(effects.iter().any(|e| matches!(e,
        Effect::SetTimer { name, at, .. } if name == "sla:hand_over" && (*at - t(0)).num_milliseconds() == 1500)));
    // The SLA runs out: the pick-up is taken back.
    let (mut m, effects) = courier::TYPE
        .start(saga, &start.request, &Env::at(t(0)))
        .unwrap();
    let (name, payload) = effects
        .iter()
        .find_map(|e| match e {
            Effect::SetTimer { name, payload, .. } if name.starts_with("sla") => {
                Some((name.clone(), payload.clone()))
            }
            _ => None,
        })
        .unwrap();
    let Verdict::Applied(effects) = m.apply(
        &Input::TimerFired(FiredTimer { name, payload }),
        &Env::at(t(2)),
    ) else {
        panic!("the SLA applies")
    };
    assert_eq!(m.status(), Status::Compensating);
    assert!(effects.iter().any(|e| matches!(e,
        Effect::Dispatch(c) if c.action() == "take_back")));
}

/// Publish on this app's subject `subject` with a correlation id.
async fn publish(app: &App, subject: String, payload: Vec<u8>) {
    let client = async_nats::connect(&app.nats_url).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let mut h = async_nats::HeaderMap::new();
    h.insert(headers::CORRELATION_ID, "platform-test");
    js.publish_with_headers(subject, h, payload.into())
        .await
        .unwrap()
        .await
        .unwrap();
}

async fn parcel_ready(app: &App, parcel: Uuid, extra: Value) {
    let mut body = json!({"parcel_id": parcel});
    body.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    let event = Event {
        id: EventId::from_uuid(Uuid::now_v7()),
        name: "ParcelReady".into(),
        v: 1,
        occurred_at: chrono::Utc::now(),
        source: "courier".into(),
        correlation_id: None,
        body: Body::of(&body),
    };
    let subject = format!("{}.events.courier.ParcelReady", app.name);
    publish(app, subject, serde_json::to_vec(&event).unwrap()).await;
}

/// The reason of the last dead letter set aside by `origin` (`cmd-courier`, `starts`...), once
/// there is one.
async fn dead_letter_reason(app: &App, origin: &str) -> String {
    let client = async_nats::connect(&app.nats_url).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let deadline = Instant::now() + WITHIN;
    loop {
        if let Ok(dlq) = js
            .get_stream(format!("{}_DEAD_LETTERS", app.name.to_uppercase()))
            .await
            && let Ok(m) = dlq
                .get_last_raw_message_by_subject(&format!("{}.dlq.{origin}", app.name))
                .await
        {
            return String::from_utf8_lossy(
                m.headers.get(headers::DEAD_LETTER_REASON).unwrap().as_ref(),
            )
            .into_owned();
        }
        assert!(
            Instant::now() < deadline,
            "nothing dead-lettered by {origin}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn saga_of(app: &App, parcel: Uuid) -> String {
    let deadline = Instant::now() + WITHIN;
    loop {
        let id: Option<Uuid> = sqlx::query_scalar(
            "SELECT id FROM orchestrator.sagas WHERE saga_type = 'courier' AND subject = $1",
        )
        .bind(parcel.to_string())
        .fetch_optional(&app.pool)
        .await
        .unwrap();
        if let Some(id) = id {
            return id.to_string();
        }
        assert!(Instant::now() < deadline, "no courier saga for {parcel}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

async fn wait_state(app: &App, saga: &str, state: &str) -> Value {
    let deadline = Instant::now() + WITHIN;
    loop {
        let s = app.saga(saga).await;
        if s["state"] == state {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "saga {saga} never {state}: {}",
            s["state"]
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test]
async fn a_saga_type_of_the_suite_runs_on_the_platform_end_to_end() {
    let app = App::spawn_with(Options::with_courier()).await;

    // Started by its event, published twice: one saga.
    let parcel = Uuid::now_v7();
    parcel_ready(&app, parcel, json!({})).await;
    parcel_ready(&app, parcel, json!({})).await;
    let saga = saga_of(&app, parcel).await;
    let s = wait_state(&app, &saga, "awaiting").await;
    assert_eq!(s["type"], "courier");
    // The hand-over's deadline and the pick-up's SLA were armed side by side; now only the SLA
    // (a day) and nothing else is pending.
    let started = &s["events"][0]["effects"];
    let armed: Vec<&str> = started
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["effect"] == "set_timer")
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert_eq!(armed, ["sla:hand_over", "step"]);
    let timers: Vec<(String, f64)> = sqlx::query_as(
        "SELECT key, extract(epoch FROM fire_at - now())::float8 FROM orchestrator.timers
          WHERE saga_id = $1::uuid",
    )
    .bind(&saga)
    .fetch_all(&app.pool)
    .await
    .unwrap();
    assert_eq!(timers.len(), 1, "{timers:?}");
    assert_eq!(timers[0].0, "sla:hand_over");
    assert!(timers[0].1 > 86_000.0, "an SLA of a day: {timers:?}");
    // The courier's record and the read model.
    assert_eq!(
        app.count(&format!(
            "SELECT count(*) FROM courier.handovers WHERE saga_id = '{saga}' AND status = 'booked'"
        ))
        .await,
        1
    );
    app.wait_for(
        &format!("SELECT count(*) FROM courier.parcels WHERE id = '{parcel}' AND status = 'on_its_way' AND tracking LIKE 'CR-%'"),
        1,
        WITHIN,
    )
    .await;

    // The courier's scan arrives as its domain event, delivered twice (one event id): the
    // orchestrator makes it the saga's signal, applied once.
    let scanned = Event {
        id: EventId::from_uuid(Uuid::now_v7()),
        name: "ParcelScanned".into(),
        v: 1,
        occurred_at: chrono::Utc::now(),
        source: "courier".into(),
        correlation_id: None,
        body: Body::of(&json!({"parcel_id": parcel, "scan": "picked_up"})),
    };
    for _ in 0..2 {
        publish(
            &app,
            format!("{}.events.courier.ParcelScanned", app.name),
            serde_json::to_vec(&scanned).unwrap(),
        )
        .await;
    }
    let deadline = Instant::now() + WITHIN;
    loop {
        let s = app.saga(&saga).await;
        if s["steps"][0]["status"] == "succeeded" {
            break;
        }
        assert!(Instant::now() < deadline, "the scan was not applied: {s:#}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    // A scan of the same pick-up sent by a service straight to the saga (over JetStream, by
    // parcel) comes late: recorded and ignored.
    let scan = SignalMessage {
        v: 1,
        target: SignalTarget::Subject {
            saga_type: "courier".into(),
            subject: parcel.to_string(),
        },
        signal: Signal {
            id: SignalId::from_uuid(Uuid::now_v7()),
            name: "picked_up".into(),
            payload: json!({}),
        },
    };
    for _ in 0..2 {
        publish(
            &app,
            format!("{}.signals", app.name),
            serde_json::to_vec(&scan).unwrap(),
        )
        .await;
    }
    let deadline = Instant::now() + WITHIN;
    loop {
        let s = app.saga(&saga).await;
        if s["signals"].as_array().map_or(0, Vec::len) == 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the late scan was not recorded: {s:#}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    // The delivery over HTTP, with an idempotency key, sent twice: applied once, the second
    // answered as ignored.
    let deliver = || {
        app.http
            .post(format!("{}/sagas/{saga}/signals/delivered", app.base))
            .header("Idempotency-Key", "scan-42")
            .json(&json!({"signed_by": "Ada"}))
            .send()
    };
    let first = deliver().await.unwrap();
    assert_eq!(first.status(), 202);
    let second = deliver().await.unwrap();
    assert_eq!(second.status(), 200);
    let second: Value = second.json().await.unwrap();
    assert!(second["ignored"].is_string(), "{second}");
    let s = app.wait_terminal(&saga, WITHIN).await;
    assert_eq!(s["status"], "completed", "{s:#}");
    let history: Vec<(&str, &str)> = s["signals"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["name"].as_str().unwrap(), r["outcome"].as_str().unwrap()))
        .collect();
    assert_eq!(
        history,
        [
            ("picked_up", "applied"),
            ("picked_up", "ignored"),
            ("delivered", "applied")
        ]
    );
    let kinds: Vec<&str> = s["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        ["started", "step_succeeded", "signal", "signal", "signal"]
    );
    // A late scan: nothing changes, and the answer says why.
    let late = app
        .http
        .post(format!("{}/sagas/{saga}/signals/delivered", app.base))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(late.status(), 200);
    assert!(
        late.json::<Value>().await.unwrap()["ignored"]
            .as_str()
            .unwrap()
            .contains("ended")
    );
    app.wait_for(
        &format!("SELECT count(*) FROM courier.parcels WHERE id = '{parcel}' AND status = 'delivered' AND signed_by = 'Ada'"),
        1,
        WITHIN,
    )
    .await;

    // Another parcel whose pick-up never comes: its SLA (asked for by the event) runs out and
    // the pick-up is taken back.
    let lost = Uuid::now_v7();
    parcel_ready(&app, lost, json!({"pickup_sla_ms": 1500})).await;
    let other = saga_of(&app, lost).await;
    let s = app.wait_terminal(&other, WITHIN).await;
    assert_eq!(s["status"], "compensated", "{s:#}");
    assert_eq!(s["failure"]["code"], "sla_expired");
    assert_eq!(
        app.count(&format!(
            "SELECT count(*) FROM courier.handovers WHERE saga_id = '{other}' AND status = 'taken_back'"
        ))
        .await,
        1
    );

    // A command of an action the courier's contract does not have: dead-lettered, saying so.
    let unknown = json!({
        "v": 1, "saga_type": "courier", "id": Uuid::now_v7(), "saga_id": other, "step": "hand_over",
        "phase": "forward", "attempt": 9, "deadline": "2099-01-01T00:00:00Z", "service": "courier",
        "action": "weigh_parcel", "parcel_id": lost
    });
    publish(
        &app,
        format!("{}.cmd.courier", app.name),
        serde_json::to_vec(&unknown).unwrap(),
    )
    .await;
    let reason = dead_letter_reason(&app, "cmd-courier").await;
    assert!(
        reason.contains("unknown command") && reason.contains("weigh_parcel"),
        "{reason}"
    );

    // An event whose saga the type refuses to start (a pick-up SLA under the platform's
    // minimum of a second): set aside with the reason, not silently dropped.
    let refused = Uuid::now_v7();
    parcel_ready(&app, refused, json!({"pickup_sla_ms": 5})).await;
    let reason = dead_letter_reason(&app, "starts").await;
    assert!(
        reason.contains("starts or signals no saga")
            && reason.contains("courier")
            && reason.contains("SLA"),
        "{reason}"
    );
    assert_eq!(
        app.count(&format!(
            "SELECT count(*) FROM orchestrator.sagas WHERE subject = '{refused}'"
        ))
        .await,
        0
    );

    // Both event logs replay to their snapshots (through the suite's registry).
    app.assert_logs_replay().await;
}
