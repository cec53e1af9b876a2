//! A saga type of the test suite's own, not the shop's, that proves the platform open: it is
//! registered in an orchestrator binary of the suite (`test-orchestrator`) beside the shop's
//! types, with a service, commands, signals, timers and a read model of its own, and not a line
//! of the engine, the relay, the reply consumer or the timer loop knows of it.
//!
//! A courier collects a parcel and delivers it:
//!
//! - `hand_over` (compensatable): the `courier` pool books the pick-up (`hand_over`, undone by
//!   `take_back`); the step then awaits the courier's `picked_up` scan under an SLA (a day by
//!   default; the `ParcelReady` event may ask for less), armed beside the command's deadline. A
//!   `picked_up` scan saying the parcel is lost fails the step.
//! - `deliver` (the pivot): awaits `delivered` under an SLA of two days; a `delivered` scan that
//!   comes before the pick-up's is kept until the step starts.
//!
//! It starts on the `courier` service's `ParcelReady` event, one saga per parcel, takes the
//! courier's `ParcelScanned` events as signals (the scan names the signal), and projects its
//! parcels into `courier.parcels` ([`SCHEMA`]).

use sagas::api::{EventStart, ProjectionRow, ProjectionTable, Status, Trigger};
use sagas::policy::{Backoff, Policy, StepPolicy};
use sagas::stepwise::{self, Await, Definition, Emit, End, SignalFailure, StepDef, StepKind};
use sagas::wire::{
    Body, Command, Event, Invalid, Phase, ReplyOutcome, SagaId, Signal, SignalId, Timestamp,
};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

pub const NAME: &str = "courier";
pub const SERVICE: &str = "courier";

/// The courier's tables: the read model of the saga type (`parcels`) and the worker's own
/// record of its pick-ups (`handovers`). A deployment that registers the type creates them;
/// the suite does, in each test's database.
pub const SCHEMA: &str = "
CREATE SCHEMA courier;
CREATE TABLE courier.parcels (
    id        uuid PRIMARY KEY,
    saga_id   uuid NOT NULL,
    status    text NOT NULL,
    tracking  text,
    signed_by text
);
CREATE TABLE courier.handovers (
    saga_id    uuid PRIMARY KEY,
    parcel_id  uuid NOT NULL,
    status     text NOT NULL,
    tracking   text NOT NULL
);";

const P: Policy = Policy {
    max_attempts: 3,
    deadline_ms: 2_000,
    redispatches: 1,
    backoff: Backoff {
        initial_ms: 100,
        max_ms: 1_000,
        factor: 2.0,
        jitter: true,
    },
};

static STEPS: [StepDef; 2] = [
    StepDef {
        name: "hand_over",
        kind: StepKind::Compensatable,
        service: Some(SERVICE),
        action: Some("hand_over"),
        compensation: Some("take_back"),
        awaits: Some(Await {
            signal: "picked_up",
            sla_ms: 86_400_000,
            buffer: false,
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
        awaits: Some(Await {
            signal: "delivered",
            sla_ms: 2 * 86_400_000,
            buffer: true,
        }),
        policy: StepPolicy {
            forward: P,
            compensation: P,
        },
    },
];

/// The courier's contract.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum CourierCommand {
    HandOver { parcel_id: Uuid },
    TakeBack { parcel_id: Uuid },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum CourierOutput {
    HandedOver { tracking: String },
    TakenBack,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Start {
    pub parcel_id: Uuid,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Parcel {
    pub parcel_id: Uuid,
    #[serde(default)]
    pub tracking: Option<String>,
    #[serde(default)]
    pub signed_by: Option<String>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Courier;

pub const PARCELS: ProjectionTable = ProjectionTable {
    table: "courier.parcels",
    key: &["id"],
    columns: &["id", "saga_id", "status", "tracking", "signed_by"],
};

impl Definition for Courier {
    const NAME: &'static str = NAME;
    const PROJECTIONS: &'static [ProjectionTable] = &[PARCELS];
    const TRIGGERS: &'static [Trigger] = &[Trigger {
        source: SERVICE,
        event: "ParcelReady",
    }];
    const SIGNALS: &'static [Trigger] = &[Trigger {
        source: SERVICE,
        event: "ParcelScanned",
    }];
    type Data = Parcel;
    type Start = Start;

    fn steps() -> &'static [StepDef] {
        &STEPS
    }

    fn init(start: Start) -> Result<Parcel, Invalid> {
        Ok(Parcel {
            parcel_id: start.parcel_id,
            tracking: None,
            signed_by: None,
        })
    }

    fn command(data: &Parcel, _saga: SagaId, step: &StepDef, phase: Phase) -> Body {
        let parcel_id = data.parcel_id;
        match (step.name, phase) {
            ("hand_over", Phase::Forward) => Body::of(&CourierCommand::HandOver { parcel_id }),
            ("hand_over", Phase::Compensation) => Body::of(&CourierCommand::TakeBack { parcel_id }),
            (other, _) => unreachable!("the courier has no command for {other}"),
        }
    }

    fn record(data: &mut Parcel, _step: &StepDef, output: &Body) {
        if let Ok(CourierOutput::HandedOver { tracking }) = output.decode() {
            data.tracking = Some(tracking);
        }
    }

    fn on_signal(data: &mut Parcel, _step: &StepDef, signal: &Signal) -> Result<(), SignalFailure> {
        if signal.payload["lost"] == true {
            return Err(SignalFailure {
                code: "parcel_lost".into(),
                reason: "the courier reports the parcel lost".into(),
            });
        }
        if let Some(name) = signal.payload["signed_by"].as_str() {
            data.signed_by = Some(name.to_owned());
        }
        Ok(())
    }

    fn start_on(event: &Event) -> Option<EventStart> {
        let parcel_id: Uuid = event.body.str("parcel_id")?.parse().ok()?;
        let mut request = serde_json::json!({ "parcel_id": parcel_id });
        // The pick-up's SLA, when the event asks for another than the default.
        if let Some(sla) = event.body.0.get("pickup_sla_ms").and_then(|v| v.as_u64()) {
            request["policies"] = serde_json::json!({ "hand_over": { "sla_ms": sla } });
        }
        Some(EventStart {
            key: parcel_id.to_string(),
            request,
        })
    }

    fn subject(data: &Parcel) -> Option<String> {
        Some(data.parcel_id.to_string())
    }

    /// The courier's `ParcelScanned {parcel_id, scan, ...}` is the signal `scan` of the
    /// parcel's saga, with the rest of the event as its payload.
    fn signal_on(event: &Event) -> Option<(String, Signal)> {
        let parcel_id: Uuid = event.body.str("parcel_id")?.parse().ok()?;
        let scan = event.body.str("scan")?.to_owned();
        let mut payload = event.body.0.clone();
        payload.remove("parcel_id");
        payload.remove("scan");
        Some((
            parcel_id.to_string(),
            Signal {
                id: SignalId::from_event(event.id, &scan),
                name: scan,
                payload: serde_json::Value::Object(payload),
            },
        ))
    }

    fn on_end(data: &Parcel, _saga: SagaId, end: End<'_>) -> Vec<Emit> {
        let name = match end {
            End::Completed => "ParcelDelivered",
            End::Compensated { .. } | End::Failed { .. } => "ParcelReturned",
        };
        vec![Emit {
            source: SERVICE,
            name,
            body: Body::of(&serde_json::json!({ "parcel_id": data.parcel_id })),
        }]
    }

    fn project(
        data: &Parcel,
        saga: SagaId,
        status: Status,
        _started_at: Timestamp,
    ) -> Vec<ProjectionRow> {
        let status = match status {
            Status::Completed => "delivered",
            Status::Compensated => "returned",
            Status::Failed => "needs_attention",
            // An operator settled the case by hand.
            Status::Resolved => "settled",
            _ => "on_its_way",
        };
        let serde_json::Value::Object(row) = serde_json::json!({
            "id": data.parcel_id, "saga_id": saga, "status": status,
            "tracking": data.tracking, "signed_by": data.signed_by,
        }) else {
            unreachable!("a row is an object")
        };
        vec![ProjectionRow {
            table: PARCELS.table,
            row,
        }]
    }
}

/// The courier saga type, for an orchestrator's registry.
pub static TYPE: stepwise::Type<Courier> = stepwise::Type::new();

/// The shop's saga types and the courier's.
pub fn registry() -> sagas::api::Registry {
    sagas::shop_types().with(&TYPE)
}

/// The `courier` pool's worker: books pick-ups in `courier.handovers`, idempotent per saga.
pub struct Worker {
    pub pool: sqlx::PgPool,
}

impl workers::bus::Handler for Worker {
    async fn handle(&self, cmd: &Command) -> Result<ReplyOutcome, workers::bus::Error> {
        match workers::bus::payload(cmd, SERVICE)? {
            CourierCommand::HandOver { parcel_id } => {
                let tracking = format!("CR-{}", &parcel_id.simple().to_string()[..8]);
                // A pick-up taken back before it was booked stays taken back.
                let status: String = sqlx::query_scalar(
                    "INSERT INTO courier.handovers (saga_id, parcel_id, status, tracking)
                     VALUES ($1, $2, 'booked', $3)
                     ON CONFLICT (saga_id) DO UPDATE SET saga_id = excluded.saga_id
                     RETURNING status",
                )
                .bind(cmd.saga_id.as_uuid())
                .bind(parcel_id)
                .bind(&tracking)
                .fetch_one(&self.pool)
                .await?;
                Ok(if status == "booked" {
                    ReplyOutcome::succeeded(&CourierOutput::HandedOver { tracking })
                } else {
                    ReplyOutcome::refused("taken_back", "the pick-up was taken back")
                })
            }
            CourierCommand::TakeBack { parcel_id } => {
                sqlx::query(
                    "INSERT INTO courier.handovers (saga_id, parcel_id, status, tracking)
                     VALUES ($1, $2, 'taken_back', '')
                     ON CONFLICT (saga_id) DO UPDATE SET status = 'taken_back'",
                )
                .bind(cmd.saga_id.as_uuid())
                .bind(parcel_id)
                .execute(&self.pool)
                .await?;
                Ok(ReplyOutcome::succeeded(&CourierOutput::TakenBack))
            }
        }
    }
}
