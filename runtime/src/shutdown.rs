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

/// Call `pass` every `interval` until `shutdown` is cancelled: the first call at once, a tick
/// missed while a pass ran delayed rather than bunched, and no pass begun once stopping.
pub async fn every<F, Fut>(interval: std::time::Duration, shutdown: &CancellationToken, mut pass: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {}
        }
        pass().await;
    }
}
