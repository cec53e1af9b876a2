//! NATS: connect, retrying while the server starts; reconnects are async-nats' own.

use std::time::Duration;

use async_nats::jetstream;
use backon::Retryable;

pub async fn connect(
    url: &str,
    name: &str,
) -> Result<(async_nats::Client, jetstream::Context), async_nats::ConnectError> {
    let client = (|| async {
        async_nats::ConnectOptions::new()
            .name(name)
            .connection_timeout(Duration::from_secs(5))
            // Keep trying forever once connected: a restarted server is picked up again.
            .max_reconnects(None)
            .connect(url)
            .await
    })
    .retry(crate::db::retry())
    .notify(|e: &async_nats::ConnectError, d| {
        tracing::warn!(error = %e, "NATS not ready; retrying in {d:?}")
    })
    .await?;
    let js = jetstream::context::ContextBuilder::new()
        .timeout(Duration::from_secs(10))
        .build(client.clone());
    Ok((client, js))
}
