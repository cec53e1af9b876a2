//! The `courier` pool's worker ([`e2e::courier::Worker`]), on the workers' shared command loop.
//! Configured like every worker (workers/config/default.toml, `SAGA_*`, `DATABASE_URL`,
//! `NATS_URL`), with the workers' health and metrics listener (`health` settings).

use sagas::wire::consumers;
use tokio_util::sync::CancellationToken;
use workers::config::Settings;
use workers::health::{Health, Source};

fn main() -> std::process::ExitCode {
    runtime::process::main(
        "courier worker",
        Settings::load,
        |s| (&s.log, &s.runtime),
        |settings| async move {
            let shutdown = CancellationToken::new();
            runtime::shutdown::cancel_on_signal(shutdown.clone());
            let subjects = settings.subjects();
            let health = Health::new(
                Source {
                    stream: subjects.stream("COMMANDS"),
                    consumer: Some((
                        consumers::commands(e2e::courier::SERVICE).to_owned(),
                        e2e::courier::SERVICE.to_owned(),
                    )),
                },
                true,
            );
            health.listen(&settings.health, shutdown.clone()).await?;
            let pool = runtime::db::connect(&settings.database, "saga-worker-courier").await?;
            health.set_pool(pool.clone());
            let (_client, js) = runtime::nats::connect(&settings.nats, "courier-worker").await?;
            health.set_jetstream(js.clone());
            workers::bus::serve_commands(
                js,
                subjects,
                e2e::courier::SERVICE,
                e2e::courier::Worker { pool },
                settings.worker.concurrency,
                settings.faults.clone(),
                health.metrics(),
                shutdown,
            )
            .await;
            Ok(())
        },
    )
}
