//! A compensation names what it undoes (the reservation, the charge, the shipment), and an undo
//! of something the service does not know is refused with an error reply, never answered as a
//! success with nothing undone. The services are driven through their command handlers, for
//! orders whose sagas exist (and stay at their first step: no worker runs).

use std::time::Duration;

use e2e::handlers::{command, refused_with, remote};
use e2e::{App, Options, order};
use sagas::shop::{Money, OrderId, ids, inventory, payment, shipping};
use sagas::wire::{Body, Command, Phase, ReplyOutcome, SagaId};
use serde_json::Value;
use uuid::Uuid;
use workers::bus::Handler;
use workers::clients::{Carrier, Processor};

/// A compensation command of `step`, as the checkout sends it.
fn undo(saga: SagaId, step: &str, service: &str, body: Body) -> Command {
    command("checkout", saga, step, Phase::Compensation, service, body)
}

#[tokio::test]
async fn an_undo_of_something_unknown_is_refused_and_an_undo_of_its_own_is_not() {
    let app = App::spawn_with(Options::without_workers()).await;
    let id = app.place(&order(&[("A", 1)], "tok_visa")).await;
    let saga: SagaId = id.parse().unwrap();
    let detail: Value = app.saga(&id).await;
    let order_id: OrderId = detail["data"]["order_id"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let total: Money = serde_json::from_value(detail["data"]["total"].clone()).unwrap();
    let stranger = Uuid::now_v7();

    let stock = workers::inventory::Inventory::new(app.pool.clone());
    let payments = workers::payment::Payment::new(
        app.pool.clone(),
        Processor::new(&remote(&app.sim)),
        Duration::from_millis(20),
    );
    let shipments = workers::shipping::Shipping::new(
        app.pool.clone(),
        Carrier::new(&remote(&app.sim)),
        Duration::from_millis(20),
    );

    // Something this saga never had: refused, by name.
    let release = |reservation_id| {
        undo(
            saga,
            "reserve_stock",
            inventory::SERVICE,
            Body::of(&inventory::Command::ReleaseStock {
                order_id,
                reservation_id: Some(reservation_id),
            }),
        )
    };
    let refund = |charge_id| {
        undo(
            saga,
            "charge_payment",
            payment::SERVICE,
            Body::of(&payment::Command::RefundPayment {
                order_id,
                amount: total.clone(),
                charge_id: Some(charge_id),
            }),
        )
    };
    let cancel = |shipment_id| {
        undo(
            saga,
            "create_shipment",
            shipping::SERVICE,
            Body::of(&shipping::Command::CancelShipment {
                order_id,
                shipment_id: Some(shipment_id),
            }),
        )
    };
    let out = stock.handle(&release(stranger)).await.unwrap();
    assert_eq!(refused_with(&out), Some("unknown_reservation"), "{out:?}");
    let out = payments.handle(&refund(stranger)).await.unwrap();
    assert_eq!(refused_with(&out), Some("unknown_charge"), "{out:?}");
    let out = shipments.handle(&cancel(stranger)).await.unwrap();
    assert_eq!(refused_with(&out), Some("unknown_shipment"), "{out:?}");
    // Nothing was written for them: no tombstone, no row.
    for table in [
        "inventory.reservations",
        "payments.charges",
        "shipping.shipments",
    ] {
        assert_eq!(
            app.count(&format!("SELECT count(*) FROM {table}")).await,
            0,
            "{table}"
        );
    }

    // Its own effects, named by the ids the saga derives: not made yet, so each leaves its
    // tombstone (a late forward command finds it) and answers that nothing is held.
    let out = stock
        .handle(&release(ids::reservation(saga, "reserve_stock")))
        .await
        .unwrap();
    assert!(matches!(out, ReplyOutcome::Succeeded { .. }), "{out:?}");
    let out = payments
        .handle(&refund(ids::charge(saga, "charge_payment")))
        .await
        .unwrap();
    assert!(matches!(out, ReplyOutcome::Succeeded { .. }), "{out:?}");
    let out = shipments
        .handle(&cancel(ids::shipment(saga, "create_shipment")))
        .await
        .unwrap();
    assert!(matches!(out, ReplyOutcome::Succeeded { .. }), "{out:?}");
    assert_eq!(
        app.count("SELECT count(*) FROM inventory.reservations WHERE status = 'released'")
            .await,
        1
    );
    assert_eq!(
        app.count("SELECT count(*) FROM payments.charges WHERE status = 'voided'")
            .await,
        1
    );
    assert_eq!(
        app.count("SELECT count(*) FROM shipping.shipments WHERE status = 'voided'")
            .await,
        1
    );
    // And once there is a row, only its own id undoes it.
    let out = payments.handle(&refund(stranger)).await.unwrap();
    assert_eq!(refused_with(&out), Some("unknown_charge"), "{out:?}");
}
