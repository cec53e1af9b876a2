//! The fulfilment saga's commands at the inventory and payment services, driven through their
//! command handlers for a checkout that completed over the real stack: the pick takes the
//! units the checkout consumed, a restock puts them back once, the charge is verified and
//! refunded once (under the checkout's key), and a command from a saga that is not the
//! order's fulfilment, or that names what the order does not have, does nothing.
//!
//! The fulfilment's read-model row is written here as the engine writes it for a running
//! fulfilment (the shop does not register the type until the carrier's hand-over is served).

use std::time::Duration;

use e2e::handlers::{command, refused_with, remote};
use e2e::{App, order};
use sagas::shop::{Money, OrderId, ids, inventory, payment};
use sagas::wire::{Body, Phase, ReplyOutcome, SagaId};
use serde_json::Value;
use uuid::Uuid;
use workers::bus::{self, Handler};
use workers::clients::Processor;

const WITHIN: Duration = Duration::from_secs(30);

fn output<T: serde::de::DeserializeOwned>(outcome: &ReplyOutcome) -> T {
    match outcome {
        ReplyOutcome::Succeeded { output } => output.decode().unwrap(),
        other => panic!("not a success: {other:?}"),
    }
}

#[tokio::test]
async fn a_fulfilments_commands_pick_restock_verify_and_refund_once_and_only_its_orders() {
    let app = App::spawn().await;
    let id = app.place(&order(&[("A", 2)], "tok_visa")).await;
    let done = app.wait_terminal(&id, WITHIN).await;
    assert_eq!(done["status"], "completed", "{done:#}");
    let checkout: SagaId = id.parse().unwrap();
    let detail: Value = app.saga(&id).await;
    let order_id: OrderId = detail["data"]["order_id"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let total: Money = serde_json::from_value(detail["data"]["total"].clone()).unwrap();
    let reservation = ids::reservation(checkout, "reserve_stock");
    let charge = ids::charge(checkout, "charge_payment");
    let stranger = Uuid::now_v7();

    let fulfilment = SagaId::from_uuid(Uuid::now_v7());
    sqlx::query(
        "INSERT INTO orders.fulfilments (order_id, saga_id, status, shipment_id, started_at)
         VALUES ($1, $2, 'preparing', $3, now())",
    )
    .bind(order_id.as_uuid())
    .bind(fulfilment.as_uuid())
    .bind(ids::shipment(checkout, "create_shipment"))
    .execute(&app.pool)
    .await
    .unwrap();

    let stock = workers::inventory::Inventory::new(app.pool.clone());
    let payments = workers::payment::Payment::new(
        app.pool.clone(),
        Processor::new(&remote(&app.sim)),
        Duration::from_millis(20),
    );
    let quantity = || app.count("SELECT quantity::bigint FROM inventory.variants WHERE sku = 'A'");
    let sold = quantity().await;

    // Inventory: pick, then restock once.
    let pick = |saga, reservation_id| {
        command(
            "fulfilment",
            saga,
            "pick_and_pack",
            Phase::Forward,
            inventory::SERVICE,
            Body::of(&inventory::Command::PickOrder {
                order_id,
                reservation_id,
            }),
        )
    };
    let restock = |saga, reservation_id| {
        command(
            "fulfilment",
            saga,
            "pick_and_pack",
            Phase::Compensation,
            inventory::SERVICE,
            Body::of(&inventory::Command::Restock {
                order_id,
                reservation_id,
            }),
        )
    };
    let out = stock.handle(&pick(fulfilment, reservation)).await.unwrap();
    assert_eq!(
        output::<inventory::Output>(&out),
        inventory::Output::OrderPicked
    );
    // A late reserve of the checkout's (a renewal redelivered after the sale) takes nothing.
    let late = stock
        .reserve(
            checkout,
            order_id,
            &[sagas::shop::Line {
                sku: sagas::shop::Sku::parse("A").unwrap(),
                quantity: sagas::shop::Quantity::new(2).unwrap(),
            }],
            60,
        )
        .await
        .unwrap();
    assert!(matches!(late, ReplyOutcome::Succeeded { .. }), "{late:?}");
    assert_eq!(
        app.count(&format!(
            "SELECT count(*) FROM inventory.reservations WHERE order_id = '{order_id}' AND status = 'picked'"
        ))
        .await,
        1,
        "still picked"
    );
    assert_eq!(
        app.count("SELECT reserved::bigint FROM inventory.variants WHERE sku = 'A'")
            .await,
        0,
        "nothing held again"
    );
    let out = stock.handle(&pick(fulfilment, stranger)).await.unwrap();
    assert_eq!(refused_with(&out), Some("unknown_reservation"), "{out:?}");
    // The checkout is not the order's fulfilment: its pick is poison, and does nothing.
    let err = stock
        .handle(&pick(checkout, reservation))
        .await
        .unwrap_err();
    assert!(matches!(err, bus::Error::Poison(_)), "{err:?}");
    for _ in 0..2 {
        let out = stock
            .handle(&restock(fulfilment, reservation))
            .await
            .unwrap();
        assert_eq!(
            output::<inventory::Output>(&out),
            inventory::Output::Restocked { units: 2 }
        );
    }
    assert_eq!(quantity().await, sold + 2, "the two units are back, once");
    assert_eq!(
        app.count(&format!(
            "SELECT count(*) FROM inventory.stock_movements WHERE order_id = '{order_id}' AND kind = 'restock'"
        ))
        .await,
        1
    );
    let out = stock.handle(&pick(fulfilment, reservation)).await.unwrap();
    assert_eq!(
        refused_with(&out),
        Some("cancelled"),
        "a late pick: {out:?}"
    );

    // Payment: verify, then refund once, under the checkout's charge.
    let verify = |charge_id| {
        command(
            "fulfilment",
            fulfilment,
            "verify_payment",
            Phase::Forward,
            payment::SERVICE,
            Body::of(&payment::Command::VerifyCharge {
                order_id,
                amount: total.clone(),
                charge_id,
            }),
        )
    };
    let refund = |charge_id| {
        command(
            "fulfilment",
            fulfilment,
            "verify_payment",
            Phase::Compensation,
            payment::SERVICE,
            Body::of(&payment::Command::RefundPayment {
                order_id,
                amount: total.clone(),
                charge_id: Some(charge_id),
            }),
        )
    };
    let out = payments.handle(&verify(charge)).await.unwrap();
    assert_eq!(
        output::<payment::Output>(&out),
        payment::Output::ChargeVerified { charge_id: charge }
    );
    let out = payments.handle(&verify(stranger)).await.unwrap();
    assert_eq!(refused_with(&out), Some("unknown_charge"), "{out:?}");
    let out = payments.handle(&refund(stranger)).await.unwrap();
    assert_eq!(refused_with(&out), Some("unknown_charge"), "{out:?}");
    for _ in 0..2 {
        let out = payments.handle(&refund(charge)).await.unwrap();
        assert!(matches!(out, ReplyOutcome::Succeeded { .. }), "{out:?}");
    }
    assert_eq!(
        app.count(&format!(
            "SELECT count(*) FROM payments.refunds WHERE charge_id = '{charge}'"
        ))
        .await,
        1,
        "one refund"
    );
    let out = payments.handle(&verify(charge)).await.unwrap();
    assert_eq!(refused_with(&out), Some("charge_refunded"), "{out:?}");
    // An amount that is not the order's: poison.
    let mut wrong = verify(charge);
    wrong.body = Body::of(&payment::Command::VerifyCharge {
        order_id,
        amount: Money {
            minor: total.minor + 1,
            currency: total.currency.clone(),
        },
        charge_id: charge,
    });
    let err = payments.handle(&wrong).await.unwrap_err();
    assert!(matches!(err, bus::Error::Poison(_)), "{err:?}");
}
