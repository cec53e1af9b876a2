//! The payment and shipping services' record of their third-party calls, driven directly
//! (in this process) against the real PostgreSQL schema and the simulated processor and
//! carrier: a call that answers at once is written once, with its result; a slow one is on
//! record as `pending` while it runs; a compensation that finds no row voids the key at the
//! third party, so a call whose answer was never recorded (its worker died after the call) is
//! undone, and one still going on there (its worker timed out) cannot land after it.

use std::time::Duration;

use e2e::handlers::remote;
use e2e::{App, Options};
use sagas::shop::{Address, Currency, Money, OrderId};
use sagas::wire::{ReplyOutcome, SagaId};
use serde_json::json;
use uuid::Uuid;
use workers::clients::{Carrier, Processor};
use workers::payment::Payment;
use workers::shipping::Shipping;

const WITHIN: Duration = Duration::from_secs(20);
const STEP: &str = "charge_payment";

async fn app() -> App {
    App::spawn_with(Options::without_workers()).await
}

fn payment(app: &App) -> Payment {
    Payment::new(
        app.pool.clone(),
        Processor::new(&remote(&app.sim)),
        Duration::from_millis(20),
    )
}

fn eur(minor: i64) -> Money {
    Money {
        minor,
        currency: Currency::parse("EUR").unwrap(),
    }
}

fn address() -> Address {
    Address {
        name: "Ada".into(),
        line1: "1 Main St".into(),
        line2: None,
        city: "Madrid".into(),
        postal_code: "28001".into(),
        country: "ES".into(),
    }
}

/// `(status, whether the row was written more than once)` of a saga's charge.
async fn charge_row(app: &App, saga: SagaId) -> (String, bool) {
    sqlx::query_as(
        "SELECT status, updated_at > created_at FROM payments.charges WHERE saga_id = $1 AND step = $2",
    )
    .bind(saga.as_uuid())
    .bind(STEP)
    .fetch_one(&app.pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn a_charge_that_answers_at_once_is_written_once_and_a_slow_one_is_pending_while_it_runs() {
    let app = app().await;
    let payment = payment(&app);

    let fast = SagaId::from_uuid(Uuid::now_v7());
    let out = payment
        .charge(fast, STEP, Uuid::now_v7(), &eur(1500), "tok_visa")
        .await
        .unwrap();
    assert!(matches!(out, ReplyOutcome::Succeeded { .. }), "{out:?}");
    assert_eq!(charge_row(&app, fast).await, ("succeeded".into(), false));

    app.control("processor", json!({"latency_ms": 400})).await;
    let slow = SagaId::from_uuid(Uuid::now_v7());
    let running = tokio::spawn({
        let payment = payment.clone();
        async move {
            payment
                .charge(slow, STEP, Uuid::now_v7(), &eur(900), "tok_visa")
                .await
        }
    });
    app.wait_for(
        &format!(
            "SELECT count(*) FROM payments.charges WHERE saga_id = '{slow}' AND status = 'pending'"
        ),
        1,
        WITHIN,
    )
    .await;
    let out = running.await.unwrap().unwrap();
    assert!(matches!(out, ReplyOutcome::Succeeded { .. }), "{out:?}");
    assert_eq!(charge_row(&app, slow).await, ("succeeded".into(), true));

    // A redelivered command answers what is on record and calls the processor no more.
    app.control("processor", json!({})).await;
    let again = payment
        .charge(fast, STEP, Uuid::now_v7(), &eur(1500), "tok_visa")
        .await
        .unwrap();
    assert!(matches!(again, ReplyOutcome::Succeeded { .. }), "{again:?}");
    let ledger = app.ledger().await;
    for c in ledger["charges"].as_array().unwrap() {
        assert_eq!(c["calls"], 1, "{c}");
    }
    assert_eq!(ledger["charges"].as_array().unwrap().len(), 2, "{ledger}");

    // A decline is written once too.
    let declined = SagaId::from_uuid(Uuid::now_v7());
    let out = payment
        .charge(declined, STEP, Uuid::now_v7(), &eur(100), "tok_decline")
        .await
        .unwrap();
    assert!(
        matches!(&out, ReplyOutcome::Failed { retryable: false, code, .. } if code == "card_declined"),
        "{out:?}"
    );
    assert_eq!(charge_row(&app, declined).await, ("declined".into(), false));
}

#[tokio::test]
async fn a_refund_that_finds_no_row_undoes_a_charge_whose_answer_was_never_recorded() {
    let app = app().await;
    let payment = payment(&app);
    let processor = Processor::new(&remote(&app.sim));
    let saga = SagaId::from_uuid(Uuid::now_v7());
    let order = Uuid::now_v7();
    // A worker called the processor and died before it wrote anything.
    let charge_ref = processor
        .charge(&format!("{saga}:{STEP}"), 1500, "EUR", "tok_visa")
        .await
        .unwrap();

    let out = payment.refund(saga, STEP, order, &eur(1500)).await.unwrap();
    assert!(
        matches!(&out, ReplyOutcome::Succeeded { output } if output.str("kind") == Some("payment_refunded")),
        "{out:?}"
    );
    let ledger = app.ledger().await;
    let refunds = ledger["refunds"].as_array().unwrap();
    assert_eq!(refunds.len(), 1, "{ledger}");
    assert_eq!(refunds[0]["charge_id"], charge_ref.as_str());
    assert_eq!(charge_row(&app, saga).await.0, "refunded");

    // The command, redelivered after the compensation, charges nothing and says so.
    let late = payment
        .charge(saga, STEP, order, &eur(1500), "tok_visa")
        .await
        .unwrap();
    assert!(
        matches!(&late, ReplyOutcome::Failed { retryable: false, code, .. } if code == "cancelled"),
        "{late:?}"
    );
    let ledger = app.ledger().await;
    assert_eq!(ledger["charges"].as_array().unwrap().len(), 1, "{ledger}");
    assert_eq!(ledger["charges"][0]["calls"], 1, "{ledger}");
    assert_eq!(ledger["refunds"].as_array().unwrap().len(), 1, "{ledger}");

    // A refund with nothing charged at all leaves a tombstone and refunds nothing.
    let never = SagaId::from_uuid(Uuid::now_v7());
    let out = payment
        .refund(never, STEP, Uuid::now_v7(), &eur(1500))
        .await
        .unwrap();
    assert!(matches!(out, ReplyOutcome::Succeeded { .. }), "{out:?}");
    assert_eq!(charge_row(&app, never).await.0, "voided");
    assert_eq!(app.ledger().await["refunds"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn a_cancel_that_finds_no_row_cancels_a_booking_whose_answer_was_never_recorded() {
    let app = app().await;
    let carrier = Carrier::new(&remote(&app.sim));
    let shipping = Shipping::new(
        app.pool.clone(),
        Carrier::new(&remote(&app.sim)),
        Duration::from_millis(20),
    );
    let saga = SagaId::from_uuid(Uuid::now_v7());
    let order = OrderId::from_uuid(Uuid::now_v7());
    carrier
        .ship(&format!("shipment:{order}"), "ES")
        .await
        .unwrap();

    let out = shipping.cancel(saga, order).await.unwrap();
    assert!(
        matches!(&out, ReplyOutcome::Succeeded { output } if output.str("kind") == Some("shipment_cancelled")
        ),
        "{out:?}"
    );
    let ledger = app.ledger().await;
    assert_eq!(ledger["shipments"][0]["cancelled"], true, "{ledger}");

    // The booking, redelivered after the cancel, books nothing.
    let late = shipping.create(saga, order, &address(), &[]).await.unwrap();
    assert!(
        matches!(
            &late,
            ReplyOutcome::Failed {
                retryable: false,
                ..
            }
        ),
        "{late:?}"
    );
    let ledger = app.ledger().await;
    assert_eq!(ledger["shipments"].as_array().unwrap().len(), 1, "{ledger}");
    assert_eq!(ledger["shipments"][0]["calls"], 1, "{ledger}");

    // A booking that answers at once (another saga's, another order's) is written once.
    let other = OrderId::from_uuid(Uuid::now_v7());
    let other_saga = SagaId::from_uuid(Uuid::now_v7());
    let out = shipping
        .create(other_saga, other, &address(), &[])
        .await
        .unwrap();
    assert!(matches!(out, ReplyOutcome::Succeeded { .. }), "{out:?}");
    let (status, rewritten): (String, bool) = sqlx::query_as(
        "SELECT status, updated_at > created_at FROM shipping.shipments WHERE order_id = $1",
    )
    .bind(other.as_uuid())
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!((status.as_str(), rewritten), ("created", false));
}

/// Wait until the simulator has finished `n` calls under `key` (of `calls`: `charge_calls` or
/// `shipment_calls`), whatever they answered.
async fn until_calls_finished(app: &App, calls: &str, key: &str, n: u64) -> serde_json::Value {
    let deadline = std::time::Instant::now() + WITHIN;
    loop {
        let ledger = app.ledger().await;
        if ledger[calls][key].as_u64() == Some(n) {
            return ledger;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{calls}[{key}] never reached {n}: {ledger}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A client that gives up long before the party answers.
fn impatient(url: &str) -> workers::config::Remote {
    workers::config::Remote {
        timeout_ms: 300,
        ..remote(url)
    }
}

#[tokio::test]
async fn a_charge_that_lands_after_its_refund_is_refused_by_the_processor() {
    let app = app().await;
    let payment = Payment::new(
        app.pool.clone(),
        Processor::new(&impatient(&app.sim)),
        Duration::from_millis(20),
    );
    // The processor takes 1.5 s; the worker gives up after 0.3 s, but the charge goes on.
    app.control("processor", json!({"latency_ms": 1500})).await;
    let (saga, order) = (SagaId::from_uuid(Uuid::now_v7()), Uuid::now_v7());
    let out = payment
        .charge(saga, STEP, order, &eur(1500), "tok_visa")
        .await
        .unwrap();
    assert!(
        matches!(
            out,
            ReplyOutcome::Failed {
                retryable: true,
                ..
            }
        ),
        "{out:?}"
    );
    // The processor answers at once again, but the charge it took 1.5 s for is still going
    // on: the saga gives up on the step and refunds it while the charge is in flight.
    app.control("processor", json!({})).await;
    let out = payment.refund(saga, STEP, order, &eur(1500)).await.unwrap();
    assert!(
        matches!(&out, ReplyOutcome::Succeeded { output } if output.str("kind") == Some("payment_refunded")),
        "{out:?}"
    );
    // When the charge reaches the processor's ledger, the voided key refuses it.
    let ledger = until_calls_finished(&app, "charge_calls", &format!("{saga}:{STEP}"), 1).await;
    assert_eq!(ledger["charges"].as_array().unwrap().len(), 0, "{ledger}");
    assert_eq!(charge_row(&app, saga).await.0, "voided");
}

#[tokio::test]
async fn a_booking_that_lands_after_its_cancel_is_refused_by_the_carrier() {
    let app = app().await;
    let shipping = Shipping::new(
        app.pool.clone(),
        Carrier::new(&impatient(&app.sim)),
        Duration::from_millis(20),
    );
    app.control("carrier", json!({"latency_ms": 1500})).await;
    let (saga, order) = (
        SagaId::from_uuid(Uuid::now_v7()),
        OrderId::from_uuid(Uuid::now_v7()),
    );
    let out = shipping.create(saga, order, &address(), &[]).await.unwrap();
    assert!(
        matches!(
            out,
            ReplyOutcome::Failed {
                retryable: true,
                ..
            }
        ),
        "{out:?}"
    );
    app.control("carrier", json!({})).await;
    let out = shipping.cancel(saga, order).await.unwrap();
    assert!(
        matches!(&out, ReplyOutcome::Succeeded { output } if output.str("kind") == Some("shipment_cancelled")
        ),
        "{out:?}"
    );
    let ledger =
        until_calls_finished(&app, "shipment_calls", &format!("shipment:{order}"), 1).await;
    assert_eq!(ledger["shipments"].as_array().unwrap().len(), 0, "{ledger}");
}
