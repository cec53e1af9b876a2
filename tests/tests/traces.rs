//! Traces over OTLP: with `OTEL_EXPORTER_OTLP_ENDPOINT` set, a checkout is one trace across
//! the processes. Its trace id is its saga id; the orchestrator exports the saga's root span,
//! the request that started it, a span per input it applies and per reply it takes; each worker a span per command it
//! handles, found through the `traceparent` header the command carried; every one a child of
//! the root. The saga's page links the trace. The collector is this test's own OTLP/HTTP
//! receiver (JSON).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::routing::post;
use e2e::{App, Options, order};
use serde_json::Value;

/// Every span received: (service, trace id, span id, parent span id, name).
type Spans = Arc<Mutex<Vec<(String, String, String, String, String)>>>;

async fn collector() -> (String, Spans) {
    let spans: Spans = Arc::default();
    let store = spans.clone();
    let app = Router::new().route(
        "/v1/traces",
        post(move |body: axum::body::Bytes| {
            let store = store.clone();
            async move {
                let doc: Value = serde_json::from_slice(&body).expect("OTLP JSON");
                for rs in doc["resourceSpans"].as_array().into_iter().flatten() {
                    let service = rs["resource"]["attributes"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .find(|a| a["key"] == "service.name")
                        .and_then(|a| a["value"]["stringValue"].as_str())
                        .unwrap_or("")
                        .to_owned();
                    for ss in rs["scopeSpans"].as_array().into_iter().flatten() {
                        for s in ss["spans"].as_array().into_iter().flatten() {
                            let text = |k: &str| s[k].as_str().unwrap_or("").to_ascii_lowercase();
                            store.lock().unwrap().push((
                                service.clone(),
                                text("traceId"),
                                text("spanId"),
                                text("parentSpanId"),
                                s["name"].as_str().unwrap_or("").to_owned(),
                            ));
                        }
                    }
                }
                "{}"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, spans)
}

#[tokio::test]
async fn a_checkout_is_one_trace_across_the_processes() {
    let (endpoint, spans) = collector().await;
    let mut options = Options::default().orchestrator(
        "SAGA_ADMIN__TRACE_URL",
        "http://traces.example/trace/{trace_id}",
    );
    for (k, v) in [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
    ] {
        options.orchestrator_env.push((k.into(), v.into()));
        options.worker_env.push((k.into(), v.into()));
    }
    let app = App::spawn_with(options).await;
    let saga = app.place(&order(&[("A", 1)], "tok_visa")).await;
    let s = app.wait_terminal(&saga, Duration::from_secs(40)).await;
    assert_eq!(s["status"], "completed", "{s:#}");
    let trace = saga.replace('-', "");

    // Wait until the root, an apply and a reply of the orchestrator, and a command of each of
    // the three pools of the checkout's commands are in.
    let deadline = Instant::now() + Duration::from_secs(30);
    let (root, mine) = loop {
        let all = spans.lock().unwrap().clone();
        let mine: Vec<_> = all.into_iter().filter(|s| s.1 == trace).collect();
        let root = mine
            .iter()
            .find(|s| s.0 == "orchestrator" && s.4 == "saga checkout")
            .map(|s| s.2.clone());
        let by: BTreeMap<(&str, &str), usize> = mine.iter().fold(BTreeMap::new(), |mut m, s| {
            *m.entry((s.0.as_str(), s.4.as_str())).or_default() += 1;
            m
        });
        let complete = root.is_some()
            && by.contains_key(&("orchestrator", "POST /checkout"))
            && by.contains_key(&("orchestrator", "apply"))
            && by.contains_key(&("orchestrator", "reply"))
            && ["worker-inventory", "worker-payment", "worker-shipping"]
                .iter()
                .all(|w| by.contains_key(&(*w, "command")))
            // The checkout's commands: reserve, charge, ship and commit.
            && mine.iter().filter(|s| s.4 == "command").count() >= 4;
        if complete {
            break (root.unwrap(), mine);
        }
        assert!(
            Instant::now() < deadline,
            "the saga's trace is incomplete: {by:?}; logs in {}",
            app.logs.display()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // One trace, one root: every other span of the saga hangs from it.
    for (service, _, span, parent, name) in &mine {
        if *span == root {
            continue;
        }
        assert_eq!(
            parent, &root,
            "{service}'s {name} span is a child of the saga's root"
        );
    }

    // The saga's page shows its trace id and links it.
    let page = app
        .http
        .get(format!("{}/dashboard/sagas/{saga}", app.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        page.contains(&format!("http://traces.example/trace/{trace}")),
        "the trace is linked"
    );
    // And what the saga touched, from its steps' outputs.
    for entity in ["Order", "Reservation", "Payment", "Shipment"] {
        assert!(
            page.contains(&format!(">{entity}<")),
            "{entity} on the saga's page"
        );
    }
}
