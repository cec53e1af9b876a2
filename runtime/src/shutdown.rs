//! Stopping gracefully: a process cancels its token on SIGTERM or Ctrl-C and finishes what it
//! holds.

use tokio_util::sync::CancellationToken;

/// Cancel `token` on SIGTERM or Ctrl-C.
pub fn cancel_on_signal(token: CancellationToken) {
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {},
            _ = term.recv() => {},
        }
        tracing::info!("stop requested");
        token.cancel();
    });
}
