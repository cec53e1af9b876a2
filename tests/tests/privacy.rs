//! Secrets and personal data stay where they belong. A payment token is given to the payment
//! service only, through the saga's secrets, and is deleted when the saga ends; neither it nor
//! the customer's contact details appear in any HTTP response, log line, message (command,
//! reply, event) or dead letter.

use std::time::{Duration, Instant};

use e2e::{App, order};
use futures::StreamExt;
use serde_json::{Value, json};

const WITHIN: Duration = Duration::from_secs(60);

/// A checkout whose every personal field is recognisable.
fn private_order(token: &str) -> Value {
    let mut body = order(&[("A", 1)], token);
    body["customer"] = json!({"id": "cust-private", "email": "ada.private@example.org"});
    body["shipping_address"] = json!({"name": "Ada Hidden", "line1": "221B Secret Lane",
        "city": "Madrid", "postal_code": "28001", "country": "ES"});
    body
}

/// The needles: the tokens, and the personal data.
const TOKEN_PART: &str = "S3CRET";
const PERSONAL: [&str; 3] = ["ada.private@example.org", "Ada Hidden", "221B Secret Lane"];

fn assert_clean(what: &str, text: &str) {
    assert!(
        !text.contains(TOKEN_PART),
        "{what} holds a payment token: {}",
        excerpt(text, TOKEN_PART)
    );
    for p in PERSONAL {
        assert!(
            !text.contains(p),
            "{what} holds personal data ({p}): {}",
            excerpt(text, p)
        );
    }
}

fn excerpt(text: &str, needle: &str) -> String {
    let at = text.find(needle).unwrap_or(0);
    let start = text[..at]
        .char_indices()
        .rev()
        .nth(120)
        .map_or(0, |(i, _)| i);
    text[start..].chars().take(300).collect()
}

#[tokio::test]
async fn a_payment_token_and_personal_data_appear_in_no_output() {
    let app = App::spawn().await;
    // Every message of this deployment as it is published: commands, replies, events and dead
    // letters (a core subscription sees what is published to JetStream's subjects).
    let client = async_nats::connect(&app.nats_url).await.unwrap();
    let mut wire = client.subscribe(format!("{}.>", app.name)).await.unwrap();
    client.flush().await.unwrap();
    let mut responses: Vec<(String, String)> = Vec::new();
    let mut post = |what: &str, text: String| responses.push((what.to_owned(), text));

    // One checkout completes, one is declined, one is cancelled while its charge is in flight.
    let r = app
        .checkout(&private_order("tok_visa_S3CRET_7f3a9c1e"), Some("p-1"))
        .await;
    assert_eq!(r.status(), 202);
    let text = r.text().await.unwrap();
    let completed = serde_json::from_str::<Value>(&text).unwrap()["saga_id"]
        .as_str()
        .unwrap()
        .to_owned();
    post("POST /checkout", text);
    let r = app
        .checkout(&private_order("tok_decline_S3CRET_0b1d2e"), None)
        .await;
    let text = r.text().await.unwrap();
    let declined = serde_json::from_str::<Value>(&text).unwrap()["saga_id"]
        .as_str()
        .unwrap()
        .to_owned();
    post("POST /checkout", text);
    // The same key and body again: the replay shows nothing more.
    let r = app
        .checkout(&private_order("tok_visa_S3CRET_7f3a9c1e"), Some("p-1"))
        .await;
    post("POST /checkout (replayed)", r.text().await.unwrap());
    // The same key with another card: the conflict shows nothing either.
    let r = app
        .checkout(&private_order("tok_visa_S3CRET_other"), Some("p-1"))
        .await;
    assert_eq!(r.status(), 422);
    post("POST /checkout (key reused)", r.text().await.unwrap());

    app.control("processor", json!({"mode": "hang"})).await;
    let cancelled = app.place(&private_order("tok_visa_S3CRET_c4nc3l")).await;
    app.wait_for(
        &format!("SELECT count(*) FROM payments.charges WHERE saga_id = '{cancelled}'"),
        1,
        WITHIN,
    )
    .await;
    // While the saga runs, its token is a secret of its own, for the payment service.
    assert_eq!(
        app.count(&format!(
            "SELECT count(*) FROM orchestrator.saga_secrets WHERE saga_id = '{cancelled}' AND name = 'payment_token'"
        ))
        .await,
        1
    );
    let r = app
        .http
        .post(format!("{}/sagas/{cancelled}/cancel", app.base))
        .json(&json!({"reason": "changed my mind"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    post("POST /sagas/{id}/cancel", r.text().await.unwrap());
    app.control("processor", json!({"mode": "normal"})).await;

    for (id, status) in [
        (&completed, "completed"),
        (&declined, "compensated"),
        (&cancelled, "compensated"),
    ] {
        let saga = app.wait_terminal(id, WITHIN).await;
        assert_eq!(saga["status"], status, "{saga:#}");
    }
    app.wait_for(
        "SELECT count(*) FROM notifications.sent WHERE kind IN ('OrderConfirmed', 'OrderCancelled')",
        3,
        WITHIN,
    )
    .await;
    // The customer was written to (the address is read from the order, not from an event),
    // about every event of their orders.
    assert_eq!(
        app.count(
            "SELECT count(*) FROM notifications.sent WHERE kind IN ('OrderConfirmed', 'OrderCancelled')
               AND recipient = 'ada.private@example.org'"
        )
        .await,
        3
    );
    assert_eq!(
        app.count(
            "SELECT count(*) FROM notifications.sent WHERE recipient <> 'ada.private@example.org'"
        )
        .await,
        0
    );
    // A forged command naming the completed saga is dead-lettered: its dead letter too.
    let js = async_nats::jetstream::new(client.clone());
    js.publish(
        format!("{}.cmd.shipping", app.name),
        serde_json::to_vec(&json!({
            "id": uuid::Uuid::now_v7(), "saga_id": completed, "step": "create_shipment",
            "phase": "forward", "attempt": 9, "deadline": "2099-01-01T00:00:00Z",
            "action": "create_shipment", "order_id": uuid::Uuid::now_v7(), "lines": []
        }))
        .unwrap()
        .into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();

    // Every answer of the API about these sagas.
    for id in [&completed, &declined, &cancelled] {
        for path in [format!("/sagas/{id}"), format!("/sagas/{id}/verify")] {
            let r = app
                .http
                .get(format!("{}{path}", app.base))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200, "{path}");
            post(&format!("GET {path}"), r.text().await.unwrap());
        }
    }
    for path in [
        "/sagas",
        "/sagas?status=compensated",
        "/breakers",
        "/metrics",
    ] {
        let r = app
            .http
            .get(format!("{}{path}", app.base))
            .send()
            .await
            .unwrap();
        post(&format!("GET {path}"), r.text().await.unwrap());
    }
    // The saga detail still shows what a reader needs: the card's hint, the masked email.
    let detail = app.saga(&completed).await;
    assert_eq!(detail["data"]["payment_token_hint"], "tok_…9c1e");
    assert_eq!(detail["data"]["customer"]["email"], "a…@example.org");
    assert_eq!(detail["data"]["shipping_address"]["country"], "ES");

    // Every message on the wire, until it has been quiet for a while (the dead letter last).
    let mut messages = Vec::new();
    let mut dead_letters = 0;
    let deadline = Instant::now() + WITHIN;
    loop {
        match tokio::time::timeout(Duration::from_secs(2), wire.next()).await {
            Ok(Some(m)) => {
                if m.subject.as_str().contains(".dlq.") {
                    dead_letters += 1;
                }
                let headers = format!("{:?}", m.headers);
                messages.push((
                    m.subject.to_string(),
                    format!("{headers} {}", String::from_utf8_lossy(&m.payload)),
                ));
            }
            _ if dead_letters > 0 => break,
            _ => assert!(
                Instant::now() < deadline,
                "the forged command was not dead-lettered"
            ),
        }
    }
    assert!(
        messages.iter().any(|(s, _)| s.contains(".cmd.payment")),
        "charges were seen on the wire"
    );
    for (subject, text) in &messages {
        assert_clean(&format!("message on {subject}"), text);
    }
    for (what, text) in &responses {
        assert_clean(what, text);
    }
    // Every log line of every process.
    let mut lines = 0;
    for entry in std::fs::read_dir(&app.logs).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        lines += text.lines().count();
        assert_clean(&format!("log {}", path.display()), &text);
    }
    assert!(lines > 20, "the processes logged ({lines} lines)");
    // The third party's own record keeps the card's last four characters only.
    assert_clean("the simulator's ledger", &app.ledger().await.to_string());
    // And once the sagas ended, the token is kept nowhere, not even in the database.
    assert_eq!(
        app.count("SELECT count(*) FROM orchestrator.saga_secrets")
            .await,
        0
    );
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT table_schema || '.' || table_name FROM information_schema.tables
          WHERE table_schema IN ('orchestrator', 'inventory', 'payments', 'shipping', 'notifications')
            AND table_type = 'BASE TABLE'",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap();
    assert!(tables.len() >= 10, "{tables:?}");
    for table in tables {
        assert_eq!(
            app.count(&format!(
                "SELECT count(*) FROM {table} t WHERE t::text LIKE '%{TOKEN_PART}%'"
            ))
            .await,
            0,
            "{table} holds a payment token"
        );
    }
}
