//! Publish a domain event of a service outside this repository (User, Cart), as that service
//! would: for tests and demos.
//!
//! ```sh
//! shop-event user UserRegistered '{"user_id": "u-1"}'
//! shop-event cart CheckoutInitiated '{"cart_id": "…", "customer": {"id": "u-1"}, "checkout_ref": "co-1"}' \
//!     --checkout-details checkout.json
//! ```
//!
//! The body is checked against the event's type (`sagas::events`) before anything is sent; the
//! envelope (a new event id, the time, the schema version, a correlation id) is added here. With
//! `--checkout-details`, the checkout's details (the body of a `POST /checkout`) are first put
//! where the Cart service keeps them (`CART_URL`, the simulator in development), under the
//! event's `checkout_ref`: the event itself carries no personal data. Environment: `NATS_URL`
//! (nats://127.0.0.1:4222), `SAGA_NATS__PREFIX` (shop), `CART_URL` (http://127.0.0.1:8090).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use sagas::events::{self, DomainEvent, cart, user};
use sagas::wire::{Body, EventId, Subjects, headers};

#[derive(Parser)]
#[command(
    version,
    about = "Publish a User or Cart domain event, as that service would"
)]
struct Cli {
    /// The service: `user` or `cart`.
    source: String,
    /// The event's type, e.g. `UserRegistered`.
    name: String,
    /// The event's fields, as a JSON object.
    body: String,
    /// A correlation id (default: a new one).
    #[arg(long)]
    correlation_id: Option<String>,
    /// For `CheckoutInitiated`: a file with the checkout's details, put at the Cart service
    /// under the event's `checkout_ref` first.
    #[arg(long)]
    checkout_details: Option<PathBuf>,
}

/// The body decoded as its event's type, to refuse what the subscribers could not read.
fn check(source: &str, name: &str, body: &Body) -> Result<(), String> {
    fn as_<E: DomainEvent>(body: &Body) -> Result<(), String> {
        let event = events::envelope(
            &serde_json::from_value::<E>(serde_json::Value::Object(body.0.clone()))
                .map_err(|e| format!("not a {}: {e}", E::NAME))?,
            EventId::from_uuid(uuid::Uuid::nil()),
            chrono::Utc::now(),
        );
        events::decode::<E>(&event)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
    match (source, name) {
        (user::SOURCE, user::UserRegistered::NAME) => as_::<user::UserRegistered>(body),
        (user::SOURCE, user::EmailVerified::NAME) => as_::<user::EmailVerified>(body),
        (cart::SOURCE, cart::CartAbandoned::NAME) => as_::<cart::CartAbandoned>(body),
        (cart::SOURCE, cart::CheckoutInitiated::NAME) => as_::<cart::CheckoutInitiated>(body),
        _ => Err(format!(
            "{source}.{name} is not an event of a service outside this repository \
             (user: UserRegistered, EmailVerified; cart: CartAbandoned, CheckoutInitiated)"
        )),
    }
}

async fn run(cli: Cli) -> Result<String, String> {
    let body: Body = serde_json::from_str(&cli.body)
        .map_err(|e| format!("the body is not a JSON object: {e}"))?;
    check(&cli.source, &cli.name, &body)?;
    if let Some(path) = &cli.checkout_details {
        let reference = body
            .str("checkout_ref")
            .ok_or("--checkout-details needs a CheckoutInitiated with a checkout_ref")?;
        let details: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?,
        )
        .map_err(|e| format!("{}: not JSON: {e}", path.display()))?;
        let cart = std::env::var("CART_URL").unwrap_or_else(|_| "http://127.0.0.1:8090".into());
        let r = reqwest::Client::new()
            .put(format!(
                "{}/cart/v1/checkouts/{reference}",
                cart.trim_end_matches('/')
            ))
            .json(&details)
            .send()
            .await
            .map_err(|e| format!("the Cart service: {e}"))?;
        if !r.status().is_success() {
            return Err(format!("the Cart service answered {}", r.status()));
        }
    }
    let prefix = std::env::var("SAGA_NATS__PREFIX").unwrap_or_else(|_| "shop".into());
    let subjects = Subjects::new(&prefix).map_err(|e| e.0)?;
    let id = EventId::from_uuid(uuid::Uuid::now_v7());
    let correlation_id = cli
        .correlation_id
        .unwrap_or_else(runtime::telemetry::new_correlation_id);
    let event = sagas::wire::Event {
        id,
        name: cli.name.clone(),
        v: sagas::wire::SCHEMA_VERSION,
        occurred_at: chrono::Utc::now(),
        source: cli.source.clone(),
        correlation_id: Some(correlation_id.clone()),
        body,
    };
    let url = std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    let client = async_nats::connect(&url)
        .await
        .map_err(|e| format!("NATS at {url}: {e}"))?;
    let js = async_nats::jetstream::new(client);
    let mut h = async_nats::HeaderMap::new();
    h.insert(headers::CORRELATION_ID, correlation_id.as_str());
    h.insert(async_nats::header::NATS_MESSAGE_ID, id.to_string().as_str());
    let subject = subjects.event(&event);
    js.publish_with_headers(
        subject.clone(),
        h,
        serde_json::to_vec(&event).expect("events serialize").into(),
    )
    .await
    .map_err(|e| format!("publish: {e}"))?
    .await
    .map_err(|e| format!("JetStream did not store it: {e}"))?;
    Ok(format!("published {} {id} on {subject}", cli.name))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    match rt.block_on(run(cli)) {
        Ok(done) => {
            println!("{done}");
            ExitCode::SUCCESS
        }
        Err(why) => {
            eprintln!("shop-event: {why}");
            ExitCode::from(2)
        }
    }
}
