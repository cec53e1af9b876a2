//! A message that cannot be handled (PostgreSQL down, say) comes back later, with a growing
//! delay; on the consumer's last allowed delivery it is set aside on the dead-letter subject with
//! the reason, never dropped without a trace. On the real NATS JetStream.

use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::pull, stream};
use sagas::shop::{CustomerRef, OrderId, order};
use sagas::wire::{Body, Event, EventId, SagaId, Subjects, headers};
use tokio_util::sync::CancellationToken;
use workers::bus::{self, Unavailable};

const CONSUMER: &str = "always-failing";

#[tokio::test]
async fn an_event_that_keeps_failing_is_dead_lettered_at_the_delivery_limit() {
    let prefix = format!("r{}", &uuid::Uuid::now_v7().simple().to_string()[16..]);
    let subjects = Subjects::new(&prefix).unwrap();
    let client = async_nats::connect(e2e::nats_url()).await.expect("NATS");
    let js = jetstream::new(client);
    for (role, subject) in [
        ("EVENTS", subjects.events()),
        ("DEAD_LETTERS", subjects.dead_letters()),
    ] {
        js.create_stream(stream::Config {
            name: subjects.stream(role),
            subjects: vec![subject],
            ..Default::default()
        })
        .await
        .expect("stream");
    }
    let events = js.get_stream(subjects.stream("EVENTS")).await.unwrap();
    events
        .create_consumer(pull::Config {
            durable_name: Some(CONSUMER.into()),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            max_deliver: 3,
            ..Default::default()
        })
        .await
        .expect("consumer");

    let saga = SagaId::from_uuid(uuid::Uuid::now_v7());
    let cancelled = order::Event::OrderCancelled {
        order_id: OrderId::from_uuid(uuid::Uuid::now_v7()),
        saga_id: saga,
        customer: CustomerRef {
            id: "cust-1".into(),
        },
        reason: "test".into(),
        needs_operator: false,
    };
    let mut body = Body::of(&cancelled);
    body.0.remove("type");
    let event = Event {
        id: EventId::derive(saga, "OrderCancelled"),
        name: "OrderCancelled".into(),
        v: 1,
        occurred_at: chrono::Utc::now(),
        source: order::SOURCE.into(),
        correlation_id: None,
        body,
    };
    js.publish(
        subjects.event(&event),
        serde_json::to_vec(&event).unwrap().into(),
    )
    .await
    .unwrap()
    .await
    .expect("published");

    // A handler that never succeeds, counting its calls and when they came.
    let calls = std::sync::Arc::new(std::sync::Mutex::new(Vec::<Instant>::new()));
    let shutdown = CancellationToken::new();
    let serve = tokio::spawn({
        let (js, subjects, calls, shutdown) = (
            js.clone(),
            subjects.clone(),
            calls.clone(),
            shutdown.clone(),
        );
        async move {
            bus::serve_events(js, subjects, CONSUMER, 4, shutdown, move |_| {
                calls.lock().unwrap().push(Instant::now());
                async { Err(Unavailable("database: connection refused".into()).into()) }
            })
            .await
        }
    });

    let dead_letters = js
        .get_stream(subjects.stream("DEAD_LETTERS"))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let stored = loop {
        if let Ok(m) = dead_letters
            .get_last_raw_message_by_subject(&subjects.dead_letter(&format!("events-{CONSUMER}")))
            .await
        {
            break m;
        }
        assert!(Instant::now() < deadline, "no dead letter within 30 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    shutdown.cancel();
    serve.await.unwrap();

    let calls = calls.lock().unwrap().clone();
    assert_eq!(calls.len(), 3, "handled once per allowed delivery");
    // Handed back with a growing delay: a second, then two.
    assert!(
        calls[1] - calls[0] >= Duration::from_millis(900),
        "{calls:?}"
    );
    assert!(
        calls[2] - calls[1] >= Duration::from_millis(1900),
        "{calls:?}"
    );
    let reason = stored
        .headers
        .get(headers::DEAD_LETTER_REASON)
        .map(|v| v.as_str().to_owned())
        .unwrap_or_default();
    assert!(
        reason.contains("not handled after 3 deliveries") && reason.contains("connection refused"),
        "{reason}"
    );
    assert_eq!(
        &stored.payload[..],
        &serde_json::to_vec(&event).unwrap()[..]
    );
    // Nothing is left to deliver.
    let mut consumer: jetstream::consumer::PullConsumer =
        events.get_consumer(CONSUMER).await.unwrap();
    assert_eq!(consumer.info().await.unwrap().num_ack_pending, 0);
    for role in ["EVENTS", "DEAD_LETTERS"] {
        let _ = js.delete_stream(subjects.stream(role)).await;
    }
}
