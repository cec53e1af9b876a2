//! Messages and stored inputs in the formats earlier builds wrote still decode: a command, a
//! reply or an event may sit in a stream (or an event log) across an upgrade. Each sample is
//! what the build before the versioned envelope published (commit 5e7b71e), byte for byte.

use sagas::api::Input;
use sagas::shop::{inventory, order, payment, shipping};
use sagas::stepwise::StepTimer;
use sagas::wire::{Command, Event, Phase, Reply, ReplyOutcome};

const RESERVE: &str = r#"{"id":"6f1f5e43-1d8b-5a55-9a43-3e2c8c1a0b11","saga_id":"01a23838-086f-7273-a968-b5965dc8446d","step":"reserve_stock","phase":"forward","attempt":1,"dispatch":0,"deadline":"2026-12-02T20:00:10Z","action":"reserve_stock","order_id":"01a23838-086f-7273-a968-b5965dc84400","lines":[{"sku":"A","quantity":2}],"hold_seconds":1800}"#;

const CHARGE: &str = r#"{"id":"6f1f5e43-1d8b-5a55-9a43-3e2c8c1a0b12","saga_id":"01a23838-086f-7273-a968-b5965dc8446d","step":"charge_payment","phase":"forward","attempt":2,"dispatch":1,"deadline":"2026-12-02T20:00:25Z","action":"charge_payment","order_id":"01a23838-086f-7273-a968-b5965dc84400","customer_id":"cust-1","amount":{"minor":3900,"currency":"EUR"}}"#;

/// Older still: the card and the address travelled in the commands (before the secrets).
const CHARGE_WITH_TOKEN: &str = r#"{"id":"6f1f5e43-1d8b-5a55-9a43-3e2c8c1a0b13","saga_id":"01a23838-086f-7273-a968-b5965dc8446d","step":"charge_payment","phase":"forward","attempt":1,"deadline":"2026-12-02T20:00:25Z","action":"charge_payment","order_id":"01a23838-086f-7273-a968-b5965dc84400","customer_id":"cust-1","amount":{"minor":3900,"currency":"EUR"},"payment_token":"tok_visa"}"#;

const RELEASE: &str = r#"{"id":"6f1f5e43-1d8b-5a55-9a43-3e2c8c1a0b14","saga_id":"01a23838-086f-7273-a968-b5965dc8446d","step":"reserve_stock","phase":"compensation","attempt":1,"dispatch":0,"deadline":"2026-12-02T20:00:35Z","action":"release_stock","order_id":"01a23838-086f-7273-a968-b5965dc84400"}"#;

const SHIP: &str = r#"{"id":"6f1f5e43-1d8b-5a55-9a43-3e2c8c1a0b15","saga_id":"01a23838-086f-7273-a968-b5965dc8446d","step":"create_shipment","phase":"forward","attempt":1,"dispatch":0,"deadline":"2026-12-02T20:00:35Z","action":"create_shipment","order_id":"01a23838-086f-7273-a968-b5965dc84400","address":{"name":"Ada","line1":"1 Main St","city":"Madrid","postal_code":"28001","country":"ES"},"lines":[{"sku":"A","quantity":2}]}"#;

const REPLY: &str = r#"{"command_id":"6f1f5e43-1d8b-5a55-9a43-3e2c8c1a0b11","saga_id":"01a23838-086f-7273-a968-b5965dc8446d","step":"reserve_stock","phase":"forward","attempt":1,"outcome":"succeeded","output":{"kind":"stock_reserved","expires_at":"2026-12-02T20:30:00Z"}}"#;

const FAILED: &str = r#"{"command_id":"6f1f5e43-1d8b-5a55-9a43-3e2c8c1a0b12","saga_id":"01a23838-086f-7273-a968-b5965dc8446d","step":"charge_payment","phase":"forward","attempt":2,"outcome":"failed","retryable":false,"code":"card_declined","reason":"the card was declined"}"#;

const CONFIRMED: &str = r#"{"id":"0a8c1e2d-3b4f-5a6b-8c9d-0e1f2a3b4c5d","occurred_at":"2026-12-02T20:00:01.123456Z","type":"OrderConfirmed","order_id":"01a23838-086f-7273-a968-b5965dc84400","saga_id":"01a23838-086f-7273-a968-b5965dc8446d","customer":{"id":"cust-1","email":"ada@example.com"},"lines":[{"sku":"A","quantity":2}],"total":{"minor":3900,"currency":"EUR"}}"#;

/// An input of the event log and a stored timer, as the engine wrote them before timers had
/// names.
const TIMER_INPUT: &str = r#"{"input":"timer_fired","timer":"step_deadline","step":"charge_payment","phase":"forward","attempt":1,"dispatch":0}"#;
const TIMER_ROW: &str =
    r#"{"timer":"step_retry","step":"charge_payment","phase":"compensation","attempt":3}"#;

#[test]
fn commands_of_before_the_envelope_decode_as_version_1_checkouts() {
    let cmd: Command = serde_json::from_str(RESERVE).unwrap();
    assert_eq!((cmd.v, cmd.saga_type.as_str()), (1, "checkout"));
    assert_eq!(cmd.service, "", "the subject said which pool");
    assert_eq!(cmd.action(), "reserve_stock");
    let body: inventory::Command = cmd.body.decode().unwrap();
    assert!(matches!(
        body,
        inventory::Command::ReserveStock {
            hold_seconds: 1800,
            ..
        }
    ));

    let cmd: Command = serde_json::from_str(CHARGE).unwrap();
    assert_eq!(
        (cmd.attempt, cmd.dispatch, cmd.phase),
        (2, 1, Phase::Forward)
    );
    assert!(matches!(
        cmd.body.decode().unwrap(),
        payment::Command::ChargePayment { .. }
    ));
    // A field the contract dropped (the card) is ignored, not an error.
    let cmd: Command = serde_json::from_str(CHARGE_WITH_TOKEN).unwrap();
    assert_eq!(cmd.dispatch, 0, "dispatch had a default");
    assert!(matches!(
        cmd.body.decode().unwrap(),
        payment::Command::ChargePayment { .. }
    ));
    // A compensation that named nothing names the order's.
    let cmd: Command = serde_json::from_str(RELEASE).unwrap();
    assert_eq!(
        cmd.body.decode::<inventory::Command>().unwrap(),
        inventory::Command::ReleaseStock {
            order_id: "01a23838-086f-7273-a968-b5965dc84400".parse().unwrap(),
            reservation_id: None
        }
    );
    let cmd: Command = serde_json::from_str(SHIP).unwrap();
    assert!(matches!(
        cmd.body.decode().unwrap(),
        shipping::Command::CreateShipment { .. }
    ));
}

#[test]
fn replies_events_timers_and_inputs_of_before_decode() {
    let reply: Reply = serde_json::from_str(REPLY).unwrap();
    let ReplyOutcome::Succeeded { output } = &reply.outcome else {
        panic!("{reply:?}")
    };
    assert!(matches!(
        output.decode().unwrap(),
        inventory::Output::StockReserved {
            reservation_id: None,
            ..
        }
    ));
    let reply: Reply = serde_json::from_str(FAILED).unwrap();
    assert!(matches!(
        reply.outcome,
        ReplyOutcome::Failed {
            retryable: false,
            ..
        }
    ));

    let event: Event = serde_json::from_str(CONFIRMED).unwrap();
    assert_eq!(
        (event.name.as_str(), event.v, event.source.as_str()),
        ("OrderConfirmed", 1, "")
    );
    // The email it carried then is read and dropped.
    let typed: order::Event = event.decode().unwrap();
    assert!(matches!(typed, order::Event::OrderConfirmed { .. }));
    assert!(!serde_json::to_string(&typed).unwrap().contains("ada@"));

    let input: Input = serde_json::from_str(TIMER_INPUT).unwrap();
    let Input::TimerFired(fired) = input else {
        panic!("a timer")
    };
    assert_eq!(fired.name, "step", "timers before names were all `step`");
    let timer: StepTimer =
        serde_json::from_value(serde_json::Value::Object(fired.payload)).unwrap();
    assert!(matches!(timer, StepTimer::StepDeadline { attempt: 1, .. }));
    let row: StepTimer = serde_json::from_str(TIMER_ROW).unwrap();
    assert_eq!(row.name(), "step");
}

#[test]
fn an_unknown_action_or_event_type_is_told_from_an_unreadable_message() {
    // A newer saga type's command: the envelope reads, the action is unknown to the contract.
    let newer = RESERVE.replace(r#""action":"reserve_stock""#, r#""action":"weigh_parcel""#);
    let cmd: Command = serde_json::from_str(&newer).unwrap();
    let e = cmd.body.decode::<inventory::Command>().unwrap_err();
    assert!(e.to_string().starts_with("unknown variant"), "{e}");
    // A newer event type: the envelope reads, the order's contract does not know it.
    let newer = CONFIRMED.replace("OrderConfirmed", "OrderWrapped");
    let event: Event = serde_json::from_str(&newer).unwrap();
    assert!(event.decode::<order::Event>().is_err());
    // Not a command at all.
    assert!(serde_json::from_str::<Command>(r#"{"hello":"world"}"#).is_err());
}
