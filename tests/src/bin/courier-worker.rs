//! The `courier` pool's worker ([`e2e::courier::Worker`]), on the workers' shared command loop.
//! Configured like every worker (workers/config/default.toml, `SAGA_*`, `DATABASE_URL`,
//! `NATS_URL`).

use tokio_util::sync::CancellationToken;
use workers::config::Settings;

fn main() -> std::process::ExitCode {
    runtime::process::main(
        "courier worker",
        Settings::load,
        |s| (&s.log, &s.runtime),
        |settings| async move {
            let shutdown = CancellationToken::new();
            runtime::shutdown::cancel_on_signal(shutdown.clone());
            let pool = runtime::db::connect(&settings.database, "saga-worker-courier").await?;
            let (_client, js) =
                runtime::nats::connect(&settings.nats.url, "courier-worker").await?;
            workers::bus::serve_commands(
                js,
                settings.subjects(),
                e2e::courier::SERVICE,
                e2e::courier::Worker { pool },
                settings.worker.concurrency,
                settings.faults.clone(),
                shutdown,
            )
            .await;
            Ok(())
        },
    )
}
