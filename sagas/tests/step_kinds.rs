//! The pivot and retriable-only step kinds, on a small definition of their own:
//! `hold` (compensatable) -> `commit` (pivot) -> `notify` (retriable-only).

use chrono::DateTime;
use sagas::api::{Effect, Env, Input, Saga, SagaType, Status, Timer, Verdict};
use sagas::policy::{Backoff, Policy, StepPolicy};
use sagas::stepwise::{self, Definition, End, StepDef, StepKind, validate_definition};
use sagas::wire::{
    Action, CommandBody, DomainEvent, Invalid, OrderId, Phase, ReplyOutcome, SagaId, StepOutput,
};
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
        action: Action::ReserveStock,
        compensation: Some(Action::ReleaseStock),
        policy: StepPolicy {
            forward: P,
            compensation: P,
        },
    },
    StepDef {
        name: "commit",
        kind: StepKind::Pivot,
        action: Action::ChargePayment,
        compensation: None,
        policy: StepPolicy {
            forward: P,
            compensation: P,
        },
    },
    StepDef {
        name: "notify",
        kind: StepKind::RetriableOnly,
        action: Action::CreateShipment,
        compensation: None,
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
    fn command(data: &Data, _step: &StepDef, _phase: Phase) -> CommandBody {
        CommandBody::ReleaseStock {
            order_id: data.order_id,
        }
    }
    fn on_end(_: &Data, _: SagaId, _: End<'_>) -> Vec<DomainEvent> {
        Vec::new()
    }
}

static FLOW: stepwise::Type<Flow> = stepwise::Type::new();

struct H {
    saga: Box<dyn Saga>,
    cmd: sagas::wire::Command,
    timer: Option<Timer>,
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
            if let Effect::SetTimer { timer, .. } = e {
                self.timer = Some(timer.clone());
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
        self.answer(ReplyOutcome::Succeeded {
            output: StepOutput::StockReleased,
        })
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
    bad[2].compensation = Some(Action::CancelShipment);
    assert!(
        validate_definition(&bad).is_err(),
        "compensatable after the pivot"
    );
    assert!(validate_definition(&[]).is_err());
}
