//! The pivot and retriable-only step kinds, on a small definition of their own:
//! `hold` (compensatable) -> `commit` (pivot) -> `notify` (retriable-only).

use chrono::DateTime;
use sagas::api::{Effect, Env, FiredTimer, Input, Saga, SagaType, Status, Verdict};
use sagas::policy::{Backoff, Policy, StepPolicy};
use sagas::shop::OrderId;
use sagas::stepwise::{self, Definition, Emit, End, StepDef, StepKind, validate_definition};
use sagas::wire::{Body, Invalid, Phase, ReplyOutcome, SagaId};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

const P: Policy = Policy {
    max_attempts: 2,
    deadline_ms: 1_000,
    redispatches: 0,
    backoff: Backoff {
        initial_ms: 100,
        max_ms: 1_000,
        factor: 2.0,
        jitter: false,
    },
};

static STEPS: [StepDef; 3] = [
    StepDef {
        name: "hold",
        kind: StepKind::Compensatable,
        service: Some("test"),
        action: Some("reserve_stock"),
        compensation: Some("release_stock"),
        awaits: None,
        policy: StepPolicy {
            forward: P,
            compensation: P,
        },
    },
    StepDef {
        name: "commit",
        kind: StepKind::Pivot,
        service: Some("test"),
        action: Some("charge_payment"),
        compensation: None,
        awaits: None,
        policy: StepPolicy {
            forward: P,
            compensation: P,
        },
    },
    StepDef {
        name: "notify",
        kind: StepKind::RetriableOnly,
        service: Some("test"),
        action: Some("create_shipment"),
        compensation: None,
        awaits: None,
        policy: StepPolicy {
            forward: P,
            compensation: P,
        },
    },
];

#[derive(Clone, Debug, PartialEq)]
struct Flow;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Data {
    order_id: OrderId,
}

impl Definition for Flow {
    const NAME: &'static str = "flow";
    type Data = Data;
    type Start = Data;
    fn steps() -> &'static [StepDef] {
        &STEPS
    }
    fn init(start: Data) -> Result<Data, Invalid> {
        Ok(start)
    }
    fn command(data: &Data, _saga: SagaId, step: &StepDef, _phase: Phase) -> Body {
        Body::of(&serde_json::json!({"action": step.action, "order_id": data.order_id}))
    }
    fn on_end(_: &Data, _: SagaId, _: End<'_>) -> Vec<Emit> {
        Vec::new()
    }
}

static FLOW: stepwise::Type<Flow> = stepwise::Type::new();

struct H {
    saga: Box<dyn Saga>,
    cmd: sagas::wire::Command,
    timer: Option<FiredTimer>,
}

impl H {
    fn start() -> Self {
        let id = SagaId::from_uuid(Uuid::from_u128(5));
        let now = DateTime::from_timestamp(0, 0).unwrap();
        let (saga, effects) = FLOW
            .start(
                id,
                &serde_json::json!({"order_id": Uuid::from_u128(6)}),
                &Env::at(now),
            )
            .unwrap();
        let mut h = Self {
            saga,
            cmd: first_command(&effects).unwrap(),
            timer: None,
        };
        h.track(&effects);
        h
    }
    fn track(&mut self, effects: &[Effect]) {
        if let Some(c) = first_command(effects) {
            self.cmd = c;
        }
        for e in effects {
            if let Effect::SetTimer { name, payload, .. } = e {
                self.timer = Some(FiredTimer {
                    name: name.clone(),
                    payload: payload.clone(),
                });
            }
        }
    }
    fn feed(&mut self, input: Input) -> bool {
        let now = DateTime::from_timestamp(100, 0).unwrap();
        match self.saga.apply(&input, &Env::at(now)) {
            Verdict::Applied(e) => {
                self.track(&e);
                true
            }
            Verdict::Ignored(_) => false,
        }
    }
    fn answer(&mut self, outcome: ReplyOutcome) -> bool {
        let reply = self.cmd.reply(outcome);
        self.feed(Input::Reply(reply))
    }
    fn ok(&mut self) -> bool {
        self.answer(ReplyOutcome::succeeded(
            &serde_json::json!({"kind": "done"}),
        ))
    }
    fn fail(&mut self, retryable: bool) -> bool {
        self.answer(ReplyOutcome::Failed {
            retryable,
            code: "x".into(),
            reason: "x".into(),
        })
    }
    fn fire(&mut self) -> bool {
        let t = self.timer.clone().unwrap();
        self.feed(Input::TimerFired(t))
    }
}

fn first_command(effects: &[Effect]) -> Option<sagas::wire::Command> {
    effects.iter().find_map(|e| match e {
        Effect::Dispatch(c) => Some(c.clone()),
        _ => None,
    })
}

#[test]
fn the_test_definition_is_valid() {
    validate_definition(&STEPS).unwrap();
}

#[test]
fn a_failing_pivot_compensates_the_steps_before_it() {
    let mut h = H::start();
    assert!(h.ok());
    assert_eq!(h.cmd.step, "commit");
    assert!(h.fail(false));
    assert_eq!(h.saga.status(), Status::Compensating);
    assert_eq!(
        (h.cmd.step.as_str(), h.cmd.phase),
        ("hold", Phase::Compensation)
    );
    assert!(h.ok());
    assert_eq!(h.saga.status(), Status::Compensated);
}

#[test]
fn after_the_pivot_there_is_no_cancel_and_no_compensation() {
    let mut h = H::start();
    assert!(h.ok());
    assert!(h.ok());
    assert_eq!(h.cmd.step, "notify");
    assert!(
        !h.feed(Input::Cancel {
            reason: "late".into()
        }),
        "cancel refused"
    );
    // A retriable-only step retries...
    assert!(h.fail(true));
    assert_eq!(h.saga.state_name(), "retrying");
    assert!(h.fire());
    assert_eq!(h.cmd.attempt, 2);
    // ...and when it cannot succeed, an operator decides: nothing is compensated.
    assert!(h.fail(true));
    assert_eq!(h.saga.status(), Status::Failed);
    let s = h.saga.snapshot();
    assert_eq!(s["steps"][0]["status"], "succeeded");
    assert_eq!(s["steps"][1]["status"], "succeeded");
    assert_eq!(s["steps"][2]["status"], "abandoned");
}

#[test]
fn definitions_that_break_the_rules_are_refused() {
    let mut bad = STEPS.clone();
    bad[0].compensation = None;
    assert!(
        validate_definition(&bad).is_err(),
        "compensatable without compensation"
    );
    let mut bad = STEPS.clone();
    bad.swap(1, 2);
    assert!(
        validate_definition(&bad).is_err(),
        "retriable-only before the pivot"
    );
    let mut bad = STEPS.clone();
    bad[2].kind = StepKind::Compensatable;
    bad[2].compensation = Some("cancel_shipment");
    assert!(
        validate_definition(&bad).is_err(),
        "compensatable after the pivot"
    );
    assert!(validate_definition(&[]).is_err());
}

// Signals: a step that sends a command and then awaits a signal under an SLA (armed beside the
// command's deadline), and a step that only awaits one.
//   hand_over (compensatable, command `hand_over`, awaits `picked_up` within 60 s)
//   -> deliver (pivot, awaits `delivered` within a day; kept if it comes early)

static PARCEL_STEPS: [StepDef; 2] = [
    StepDef {
        name: "hand_over",
        kind: StepKind::Compensatable,
        service: Some("courier"),
        action: Some("hand_over"),
        compensation: Some("take_back"),
        awaits: Some(stepwise::Await {
            signal: "picked_up",
            sla_ms: 60_000,
            buffer: true,
        }),
        policy: StepPolicy {
            forward: P,
            compensation: P,
        },
    },
    StepDef {
        name: "deliver",
        kind: StepKind::Pivot,
        service: None,
        action: None,
        compensation: None,
        awaits: Some(stepwise::Await {
            signal: "delivered",
            sla_ms: 86_400_000,
            buffer: true,
        }),
        policy: StepPolicy {
            forward: P,
            compensation: P,
        },
    },
];

#[derive(Clone, Debug, PartialEq)]
struct Parcel;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct ParcelData {
    order_id: OrderId,
    #[serde(default)]
    signed_by: Option<String>,
}

impl Definition for Parcel {
    const NAME: &'static str = "parcel";
    type Data = ParcelData;
    type Start = ParcelData;
    fn steps() -> &'static [StepDef] {
        &PARCEL_STEPS
    }
    fn init(start: ParcelData) -> Result<ParcelData, Invalid> {
        Ok(start)
    }
    fn command(data: &ParcelData, _saga: SagaId, step: &StepDef, phase: Phase) -> Body {
        let action = match phase {
            Phase::Forward => step.action,
            Phase::Compensation => step.compensation,
        };
        Body::of(&serde_json::json!({"action": action, "order_id": data.order_id}))
    }
    fn on_signal(
        data: &mut ParcelData,
        _step: &StepDef,
        signal: &sagas::wire::Signal,
    ) -> Result<(), stepwise::SignalFailure> {
        if signal.payload["lost"] == true {
            return Err(stepwise::SignalFailure {
                code: "lost".into(),
                reason: "the courier lost the parcel".into(),
            });
        }
        if let Some(name) = signal.payload["signed_by"].as_str() {
            data.signed_by = Some(name.to_owned());
        }
        Ok(())
    }
    fn on_end(_: &ParcelData, _: SagaId, _: End<'_>) -> Vec<Emit> {
        Vec::new()
    }
}

static PARCEL: stepwise::Type<Parcel> = stepwise::Type::new();

/// A parcel saga driven at its boundary, with a clock of its own.
struct P2 {
    saga: Box<dyn Saga>,
    now: chrono::DateTime<chrono::Utc>,
    cmd: Option<sagas::wire::Command>,
    timers: std::collections::BTreeMap<String, (FiredTimer, chrono::DateTime<chrono::Utc>)>,
}

impl P2 {
    fn start() -> (Self, Vec<Effect>) {
        let now = DateTime::from_timestamp(1_000, 0).unwrap();
        let (saga, effects) = PARCEL
            .start(
                SagaId::from_uuid(Uuid::from_u128(8)),
                &serde_json::json!({"order_id": Uuid::from_u128(9)}),
                &Env::at(now),
            )
            .unwrap();
        let mut p = Self {
            saga,
            now,
            cmd: None,
            timers: Default::default(),
        };
        p.track(&effects);
        (p, effects)
    }
    fn track(&mut self, effects: &[Effect]) {
        for e in effects {
            match e {
                Effect::Dispatch(c) => self.cmd = Some(c.clone()),
                Effect::SetTimer { name, at, payload } => {
                    let t = FiredTimer {
                        name: name.clone(),
                        payload: payload.clone(),
                    };
                    self.timers.insert(name.clone(), (t, *at));
                }
                Effect::CancelTimer { name } => {
                    self.timers.remove(name);
                }
                _ => {}
            }
        }
    }
    fn feed(&mut self, input: Input) -> Result<Vec<Effect>, String> {
        match self.saga.apply(&input, &Env::at(self.now)) {
            Verdict::Applied(e) => {
                self.track(&e);
                Ok(e)
            }
            Verdict::Ignored(why) => Err(why),
        }
    }
    fn signal(
        &mut self,
        id: u128,
        name: &str,
        payload: serde_json::Value,
    ) -> Result<Vec<Effect>, String> {
        self.feed(Input::Signal(sagas::wire::Signal {
            id: sagas::wire::SignalId::from_uuid(Uuid::from_u128(id)),
            name: name.into(),
            payload,
        }))
    }
    fn reply_ok(&mut self) -> Result<Vec<Effect>, String> {
        let cmd = self.cmd.clone().unwrap();
        self.feed(Input::Reply(cmd.reply(ReplyOutcome::succeeded(
            &serde_json::json!({"kind": "handed_over"}),
        ))))
    }
    fn fire(&mut self, name: &str) -> Result<Vec<Effect>, String> {
        let (t, at) = self.timers.remove(name).expect("armed");
        self.now = self.now.max(at);
        self.feed(Input::TimerFired(t))
    }
    fn snapshot(&self) -> serde_json::Value {
        self.saga.snapshot()
    }
}

#[test]
fn the_parcel_definition_is_valid() {
    validate_definition(&PARCEL_STEPS).unwrap();
    let mut bad = PARCEL_STEPS.clone();
    bad[1].awaits = None;
    assert!(
        validate_definition(&bad).is_err(),
        "a step that does nothing"
    );
    let mut bad = PARCEL_STEPS.clone();
    bad[0].awaits = Some(stepwise::Await {
        signal: "x",
        sla_ms: 31 * 86_400_000,
        buffer: false,
    });
    assert!(validate_definition(&bad).is_err(), "an SLA of a month");
}

#[test]
fn a_signal_awaited_under_an_sla_beside_the_step_deadline() {
    let (mut p, effects) = P2::start();
    // The command and its deadline go out, and the SLA of its signal is armed beside them.
    assert!(matches!(&effects[0], Effect::SetTimer { name, .. } if name == "sla:hand_over"));
    assert_eq!(
        p.timers.keys().collect::<Vec<_>>(),
        ["sla:hand_over", "step"]
    );
    // The command succeeds: the deadline goes, the SLA stays; the saga awaits its signal.
    p.reply_ok().unwrap();
    assert_eq!(p.saga.state_name(), "awaiting");
    assert_eq!(p.timers.keys().collect::<Vec<_>>(), ["sla:hand_over"]);
    // A signal nobody awaits is recorded and ignored; the awaited one moves the saga on and
    // arms the next step's SLA (a day).
    p.signal(1, "weather_report", serde_json::json!({}))
        .unwrap();
    p.signal(2, "picked_up", serde_json::json!({})).unwrap();
    assert_eq!(p.timers.keys().collect::<Vec<_>>(), ["sla:deliver"]);
    assert_eq!(
        (p.timers["sla:deliver"].1 - p.now).num_seconds(),
        86_400,
        "a day"
    );
    // Delivered twice: applied once.
    p.signal(3, "delivered", serde_json::json!({"signed_by": "Ada"}))
        .unwrap();
    assert_eq!(p.saga.status(), Status::Completed);
    let again = p.signal(3, "delivered", serde_json::json!({"signed_by": "Bob"}));
    assert!(again.is_err(), "a signal sent twice is applied once");
    let s = p.snapshot();
    assert_eq!(s["data"]["signed_by"], "Ada");
    let outcomes: Vec<(&str, &str)> = s["signals"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["name"].as_str().unwrap(), r["outcome"].as_str().unwrap()))
        .collect();
    assert_eq!(
        outcomes,
        [
            ("weather_report", "ignored"),
            ("picked_up", "applied"),
            ("delivered", "applied")
        ]
    );
    assert!(p.timers.is_empty(), "no timer left: {:?}", p.timers.keys());
}

#[test]
fn a_signal_before_the_reply_and_one_for_a_later_step() {
    let (mut p, _) = P2::start();
    // The courier scans the parcel before the hand-over's reply is back: the step waits for
    // its reply, then succeeds at once.
    p.signal(1, "picked_up", serde_json::json!({})).unwrap();
    assert_eq!(p.saga.state_name(), "running");
    assert!(p.timers.contains_key("step") && !p.timers.contains_key("sla:hand_over"));
    // `delivered` comes early too: its step keeps it (buffered) until it starts.
    p.signal(2, "delivered", serde_json::json!({"signed_by": "Ada"}))
        .unwrap();
    assert_eq!(p.snapshot()["inbox"][0]["name"], "delivered");
    // The reply: hand-over succeeds, deliver starts and finds its signal waiting.
    p.reply_ok().unwrap();
    assert_eq!(p.saga.status(), Status::Completed);
    let s = p.snapshot();
    assert_eq!(s["data"]["signed_by"], "Ada");
    assert!(s.get("inbox").is_none());
    let outcomes: Vec<&str> = s["signals"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(outcomes, ["applied", "buffered"]);
    assert!(
        p.timers.is_empty(),
        "no SLA was armed for a signal already in hand"
    );
}

#[test]
fn an_expired_sla_or_a_failure_signal_undoes_the_step() {
    // The signal never comes: the SLA fires, the handed-over parcel is taken back.
    let (mut p, _) = P2::start();
    p.reply_ok().unwrap();
    p.fire("sla:hand_over").unwrap();
    assert_eq!(p.saga.status(), Status::Compensating);
    assert_eq!(p.cmd.as_ref().unwrap().action(), "take_back");
    let s = p.snapshot();
    assert_eq!(s["failure"]["code"], "sla_expired");
    assert_eq!(s["steps"][0]["status"], "compensating");
    // The late signal changes nothing.
    assert!(p.signal(4, "picked_up", serde_json::json!({})).is_err());

    // The courier reports the parcel lost: the step fails the same way.
    let (mut q, _) = P2::start();
    q.reply_ok().unwrap();
    q.signal(5, "picked_up", serde_json::json!({"lost": true}))
        .unwrap();
    assert_eq!(q.saga.status(), Status::Compensating);
    assert_eq!(q.snapshot()["failure"]["code"], "lost");
    assert!(
        !q.timers.contains_key("sla:hand_over"),
        "its SLA is disarmed"
    );

    // Past the pivot an expired SLA leaves the saga to an operator.
    let (mut r, _) = P2::start();
    r.reply_ok().unwrap();
    r.signal(6, "picked_up", serde_json::json!({})).unwrap();
    r.fire("sla:deliver").unwrap();
    assert_eq!(
        r.saga.status(),
        Status::Compensating,
        "deliver is the pivot, not yet passed"
    );
}

#[test]
fn a_stale_sla_timer_is_ignored() {
    let (mut p, _) = P2::start();
    let (stale, _) = p.timers["sla:hand_over"].clone();
    p.reply_ok().unwrap();
    p.signal(1, "picked_up", serde_json::json!({})).unwrap();
    assert!(p.feed(Input::TimerFired(stale)).is_err());
    assert_eq!(p.saga.state_name(), "awaiting");
}
