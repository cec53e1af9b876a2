//! A harness that drives a checkout machine at its boundary with a simulated clock.
#![allow(dead_code)]

use chrono::{DateTime, Duration};
use std::collections::BTreeMap;

use sagas::api::{
    Effect, Env, FiredTimer, Input, OperatorAction, OperatorInput, Saga, SagaType, Status, Verdict,
};
use sagas::checkout;
use sagas::shop::{inventory, payment, shipping};
use sagas::stepwise::StepTimer;
use sagas::wire::{Command, Phase, ReplyOutcome, SagaId, Timestamp};
use serde_json::json;
use uuid::Uuid;

pub fn t0() -> Timestamp {
    DateTime::from_timestamp(1_800_000_000, 0).unwrap()
}

pub fn start_request() -> serde_json::Value {
    json!({
        "order_id": "0191d0a0-0000-7000-8000-000000000001",
        "customer": {"id": "c-1", "email": "ada@example.com"},
        "lines": [
            {"sku": "TSHIRT-M", "quantity": 2, "unit_price": {"minor": 1500, "currency": "EUR"}},
            {"sku": "MUG", "quantity": 1, "unit_price": {"minor": 900, "currency": "EUR"}}
        ],
        "payment_token_hint": "…sa",
        "shipping_address": {"name": "Ada", "line1": "1 Main St", "city": "Madrid",
                              "postal_code": "28001", "country": "ES"}
    })
}

/// Every input fed so far, with its environment: what the engine writes to the event log.
#[derive(Clone)]
pub struct Logged {
    pub input: Input,
    pub env: Env,
}

pub struct Harness {
    pub saga: Box<dyn Saga>,
    pub now: Timestamp,
    pub start_effects: Vec<Effect>,
    /// The last command dispatched.
    pub in_flight: Option<Command>,
    /// The armed timers, by name, and when they fire.
    pub timers: BTreeMap<String, (FiredTimer, Timestamp)>,
    /// What the steps said about their health, in order.
    pub health: Vec<(String, bool)>,
    pub log: Vec<Logged>,
    pub events: Vec<String>,
    /// Steps whose breaker is open, as the engine would pass them.
    pub blocked: std::collections::BTreeSet<String>,
    /// The start request, for replays.
    pub request: serde_json::Value,
    /// The saga's type.
    pub ty: &'static dyn SagaType,
}

impl Harness {
    pub fn start() -> Self {
        Self::start_with(start_request())
    }

    pub fn start_with(request: serde_json::Value) -> Self {
        Self::start_of(&checkout::TYPE, request)
    }

    /// A saga of type `ty`, started with `request` (the start request as the engine gets it).
    pub fn start_of(ty: &'static dyn SagaType, request: serde_json::Value) -> Self {
        let id = SagaId::from_uuid(Uuid::from_u128(0x0191_d0a0_0000_7000_8000_0000_0000_0042));
        let (saga, effects) = ty.start(id, &request, &Env::at(t0())).expect("starts");
        let mut h = Self {
            saga,
            now: t0(),
            start_effects: effects.clone(),
            in_flight: None,
            timers: BTreeMap::new(),
            health: Vec::new(),
            log: Vec::new(),
            events: Vec::new(),
            blocked: Default::default(),
            request,
            ty,
        };
        h.track(&effects);
        h
    }

    fn track(&mut self, effects: &[Effect]) {
        for e in effects {
            match e {
                Effect::Dispatch(c) => self.in_flight = Some(c.clone()),
                Effect::SetTimer { name, at, payload } => {
                    let fired = FiredTimer {
                        name: name.clone(),
                        payload: payload.clone(),
                    };
                    self.timers.insert(name.clone(), (fired, *at));
                }
                Effect::CancelTimer { name } => {
                    self.timers.remove(name);
                }
                Effect::Emit(ev) => self.events.push(ev.name.clone()),
                Effect::Health { step, ok } => self.health.push((step.clone(), *ok)),
            }
        }
    }

    /// The environment the next input is fed with: the clock and the open breakers.
    pub fn env(&self) -> Env {
        Env {
            now: self.now,
            blocked: self.blocked.clone(),
        }
    }

    /// Feed an input; returns the effects, or `None` when it was ignored.
    pub fn feed(&mut self, input: Input) -> Option<Vec<Effect>> {
        match self.apply(input) {
            Verdict::Applied(effects) => Some(effects),
            Verdict::Ignored(_) => None,
        }
    }

    /// Feed an input and return the machine's verdict (with the reason it was ignored); an
    /// applied input is logged and its effects tracked, as with [`Harness::feed`].
    pub fn apply(&mut self, input: Input) -> Verdict {
        let env = self.env();
        let verdict = self.saga.apply(&input, &env);
        if let Verdict::Applied(effects) = &verdict {
            self.log.push(Logged { input, env });
            self.track(effects);
        }
        verdict
    }

    /// An operator's action, as the dashboard sends it.
    pub fn operator(&mut self, action: OperatorAction) -> Verdict {
        self.apply(Input::Operator(OperatorInput {
            by: "ada".into(),
            reason: format!("{} from the test", action.as_str()),
            action,
        }))
    }

    pub fn command(&self) -> Command {
        self.in_flight.clone().expect("a command in flight")
    }

    pub fn reply(cmd: &Command, outcome: ReplyOutcome) -> Input {
        Input::Reply(cmd.reply(outcome))
    }

    pub fn ok(&mut self) -> Option<Vec<Effect>> {
        let cmd = self.command();
        self.feed(Self::reply(&cmd, success_for(&cmd)))
    }

    pub fn fail(&mut self, retryable: bool, code: &str) -> Option<Vec<Effect>> {
        let cmd = self.command();
        self.feed(Self::reply(
            &cmd,
            ReplyOutcome::Failed {
                retryable,
                code: code.into(),
                reason: format!("simulated {code}"),
            },
        ))
    }

    /// Advance the clock to the timer that fires first and fire it.
    pub fn fire(&mut self) -> Option<Vec<Effect>> {
        let (timer, at) = self
            .timers
            .values()
            .min_by_key(|(_, at)| *at)
            .cloned()
            .expect("a timer armed");
        self.fire_timer(timer, at)
    }

    /// Advance the clock to the timer `name` and fire it.
    pub fn fire_named(&mut self, name: &str) -> Option<Vec<Effect>> {
        let (timer, at) = self.timers.get(name).cloned().expect("the timer is armed");
        self.fire_timer(timer, at)
    }

    fn fire_timer(&mut self, timer: FiredTimer, at: Timestamp) -> Option<Vec<Effect>> {
        self.now = self.now.max(at);
        self.timers.remove(&timer.name);
        self.feed(Input::TimerFired(timer))
    }

    /// The step timer armed now, as the machine set it.
    pub fn step_timer(&self) -> Option<StepTimer> {
        let (fired, _) = self.timers.get("step")?;
        serde_json::from_value(serde_json::Value::Object(fired.payload.clone())).ok()
    }

    pub fn cancel(&mut self) -> Option<Vec<Effect>> {
        self.feed(Input::Cancel {
            reason: "customer changed their mind".into(),
        })
    }

    pub fn status(&self) -> Status {
        self.saga.status()
    }

    pub fn state(&self) -> &'static str {
        self.saga.state_name()
    }

    /// Replay the log through a fresh machine and compare snapshots.
    pub fn replayed_snapshot(&self) -> serde_json::Value {
        let (mut saga, _) = self
            .ty
            .start(self.saga.id(), &self.request, &Env::at(t0()))
            .unwrap();
        for l in &self.log {
            match saga.apply(&l.input, &l.env) {
                Verdict::Applied(_) => {}
                Verdict::Ignored(why) => panic!("replayed input ignored: {why}"),
            }
        }
        saga.snapshot()
    }

    /// Restore the machine from its own snapshot, as the engine does after a cache miss.
    pub fn reload(&mut self) {
        let snapshot = self.saga.snapshot();
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&self.saga.snapshot_json()).unwrap(),
            snapshot,
            "the text snapshot the engine writes is the snapshot"
        );
        self.saga = self.ty.restore(&snapshot).expect("restores");
        assert_eq!(self.saga.snapshot(), snapshot, "restore is lossless");
    }
}

pub fn success_for(cmd: &Command) -> ReplyOutcome {
    match cmd.action() {
        "reserve_stock" => ReplyOutcome::succeeded(&inventory::Output::StockReserved {
            reservation_id: None,
            expires_at: cmd.deadline + Duration::minutes(30),
        }),
        "release_stock" => ReplyOutcome::succeeded(&inventory::Output::StockReleased),
        "commit_stock" => ReplyOutcome::succeeded(&inventory::Output::StockCommitted),
        "charge_payment" => ReplyOutcome::succeeded(&payment::Output::PaymentCharged {
            charge_id: Uuid::from_u128(9),
            processor_ref: "ch_1".into(),
        }),
        "refund_payment" => {
            ReplyOutcome::succeeded(&payment::Output::PaymentRefunded { refund_id: None })
        }
        "create_shipment" => ReplyOutcome::succeeded(&shipping::Output::ShipmentCreated {
            shipment_id: Uuid::from_u128(10),
            tracking_number: "TRK1".into(),
        }),
        "cancel_shipment" => ReplyOutcome::succeeded(&shipping::Output::ShipmentCancelled),
        "verify_charge" => ReplyOutcome::succeeded(&payment::Output::ChargeVerified {
            charge_id: Uuid::from_u128(9),
        }),
        "pick_order" => ReplyOutcome::succeeded(&inventory::Output::OrderPicked),
        "restock" => ReplyOutcome::succeeded(&inventory::Output::Restocked { units: 3 }),
        "request_pickup" => ReplyOutcome::succeeded(&shipping::Output::PickupRequested {
            shipment_id: Uuid::from_u128(10),
            tracking_number: "TRK1".into(),
        }),
        other => panic!("no such action {other}"),
    }
}

/// A compact, readable form of effects, relative to `now`, for the tables. (Health reports are
/// left out: they are checked on their own.)
pub fn describe(effects: &[Effect], now: Timestamp) -> Vec<String> {
    effects
        .iter()
        .filter_map(|e| {
            Some(match e {
                Effect::Dispatch(c) if c.dispatch > 0 => format!(
                    "redispatch {} {} #{}.{}",
                    c.action(),
                    phase(c.phase),
                    c.attempt,
                    c.dispatch
                ),
                Effect::Dispatch(c) => {
                    format!("dispatch {} {} #{}", c.action(), phase(c.phase), c.attempt)
                }
                Effect::SetTimer { at, payload, .. } => {
                    let ms = (*at - now).num_milliseconds();
                    let timer: StepTimer =
                        serde_json::from_value(serde_json::Value::Object(payload.clone()))
                            .expect("a step timer");
                    match timer {
                        StepTimer::StepDeadline {
                            step,
                            phase: p,
                            attempt,
                            dispatch: 0,
                        } => format!("deadline {step} {} #{attempt} +{ms}ms", phase(p)),
                        StepTimer::StepDeadline {
                            step,
                            phase: p,
                            attempt,
                            dispatch,
                        } => format!("deadline {step} {} #{attempt}.{dispatch} +{ms}ms", phase(p)),
                        StepTimer::StepRetry {
                            step,
                            phase: p,
                            attempt,
                        } => format!("retry {step} {} #{attempt}", phase(p)),
                        StepTimer::Sla { step } => format!("sla {step} +{ms}ms"),
                    }
                }
                Effect::CancelTimer { name } => format!("cancel timer {name}"),
                Effect::Emit(ev) => format!("emit {}", ev.name),
                Effect::Health { .. } => return None,
            })
        })
        .collect()
}

fn phase(p: Phase) -> &'static str {
    match p {
        Phase::Forward => "fwd",
        Phase::Compensation => "comp",
    }
}

/// The delay of the retry timer among `effects`, in milliseconds from `now`.
pub fn retry_delay_ms(effects: &[Effect], now: Timestamp) -> i64 {
    effects
        .iter()
        .find_map(|e| match e {
            Effect::SetTimer { at, payload, .. } if payload["timer"] == "step_retry" => {
                Some((*at - now).num_milliseconds())
            }
            _ => None,
        })
        .expect("a retry timer")
}
