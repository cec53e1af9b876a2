//! The events of the services outside this repository (User, Cart), published with the
//! `shop-event` command as those services would, reach their subscribers: the Notification
//! service writes to the new user, and the Order service starts the checkout a cart initiated.
//! A body its event type cannot read is refused before anything is sent.

use std::process::Command;
use std::time::Duration;

use e2e::{App, binary, order};

const WITHIN: Duration = Duration::from_secs(30);

fn shop_event(app: &App, args: &[&str]) -> std::process::Output {
    Command::new(binary("shop-event"))
        .args(args)
        .env("NATS_URL", &app.nats_url)
        .env("SAGA_NATS__PREFIX", &app.name)
        .env("CART_URL", &app.sim)
        .output()
        .expect("shop-event runs")
}

#[tokio::test]
async fn user_and_cart_events_published_from_outside_reach_their_subscribers() {
    let app = App::spawn().await;

    let out = shop_event(&app, &["user", "UserRegistered", r#"{"user_id": "u-9"}"#]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    app.wait_for(
        "SELECT count(*) FROM notifications.sent
          WHERE kind = 'UserRegistered' AND recipient = 'customer:u-9'",
        1,
        WITHIN,
    )
    .await;

    // Refused before anything is sent: a field of another name, an unknown event.
    let out = shop_event(&app, &["user", "UserRegistered", r#"{"user": "u-9"}"#]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not a UserRegistered"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = shop_event(&app, &["order", "OrderConfirmed", "{}"]);
    assert_eq!(out.status.code(), Some(2));

    // A cart's checkout, its details kept by the Cart service.
    let details = app.logs.join("checkout.json");
    std::fs::write(&details, order(&[("A", 1)], "tok_visa").to_string()).unwrap();
    let cart = uuid::Uuid::now_v7().to_string();
    let body = format!(
        r#"{{"cart_id": "{cart}", "customer": {{"id": "cust-1"}}, "checkout_ref": "co-{cart}"}}"#
    );
    let out = shop_event(
        &app,
        &[
            "cart",
            "CheckoutInitiated",
            &body,
            "--checkout-details",
            details.to_str().unwrap(),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    app.wait_for(
        "SELECT count(*) FROM orchestrator.sagas WHERE saga_type = 'checkout' AND status = 'completed'",
        1,
        WITHIN,
    )
    .await;
}
