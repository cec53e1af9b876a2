//! The orchestrator's command line: `serve` (the default), `migrate`, `config`,
//! `delete-streams`, and `admin`, the operators' tools ([`crate::admin_cli`]). (A catalogue is
//! loaded by the Product service: `worker product --load`.) The binary is a thin `main` around
//! [`main`].

use clap::{Parser, Subcommand};
use runtime::shutdown::cancel_on_signal;
use sagas::api::Registry;
use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::startup::Application;

/// The saga orchestrator. Configuration: see orchestrator/config/default.toml; override with
/// SAGA_CONFIG=<file>, SAGA_<SECTION>__<KEY>=<value>, DATABASE_URL and NATS_URL.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    #[command(flatten)]
    Process(Process),
    /// Operators' tools: accounts, API tokens, and sagas and dead letters through the admin
    /// API.
    Admin(crate::admin_cli::Args),
}

/// What runs as the orchestrator process, with its settings, logging and runtime.
#[derive(Subcommand)]
enum Process {
    /// Run the orchestrator (the default).
    Serve,
    /// Apply the database migrations and exit.
    Migrate,
    /// Print the effective configuration (secrets redacted) and exit.
    Config,
    /// Delete this deployment's JetStream streams (and their messages). For test and
    /// benchmark resets; the next start declares them again.
    DeleteStreams,
}

/// Run the orchestrator command line with the saga types of `registry`: the shop's binary
/// passes [`sagas::shop_types`]; another deployment (or a test) builds its own binary that
/// passes its own, and nothing else changes.
pub fn main(registry: Registry) -> std::process::ExitCode {
    let process = match Cli::parse().command {
        None => Process::Serve,
        Some(Command::Process(p)) => p,
        // An operator's command has a life of its own (no server's settings checks, its own
        // exit statuses).
        Some(Command::Admin(args)) => return crate::admin_cli::main(args),
    };
    runtime::process::main(
        "orchestrator",
        Settings::load,
        |s| (&s.log, &s.runtime),
        |settings| run(process, settings, registry),
    )
}

async fn run(process: Process, settings: Settings, registry: Registry) -> anyhow::Result<()> {
    let registry = registry
        .without(&settings.sagas.disabled())
        .map_err(|e| anyhow::anyhow!("invalid configuration: sagas.disabled: {e}"))?;
    for (name, policies) in &settings.sagas.policies {
        let t = registry.get(name).ok_or_else(|| {
            anyhow::anyhow!(
                "invalid configuration: sagas.policies: no saga type {name:?} runs here"
            )
        })?;
        t.validate_policies(policies).map_err(|e| {
            anyhow::anyhow!("invalid configuration: sagas.policies.{name}: {}", e.0)
        })?;
    }
    match process {
        Process::Serve => {
            let app = Application::build(settings, registry).await?;
            let shutdown = CancellationToken::new();
            cancel_on_signal(shutdown.clone());
            app.run_until_stopped(shutdown).await
        }
        Process::Migrate => {
            runtime::db::connect(&settings.database, "saga-orchestrator").await?;
            println!("migrations applied");
            Ok(())
        }
        Process::Config => {
            println!("{settings:#?}");
            Ok(())
        }
        Process::DeleteStreams => {
            let (_client, js) =
                runtime::nats::connect(&settings.nats, "orchestrator-admin").await?;
            let topology = crate::topology::Topology::new(
                settings.subjects(),
                settings.nats.replicas,
                crate::config::ms(settings.replies.ack_wait_ms),
                settings.replies.max_deliver,
                &registry,
                settings.partitions.count,
            );
            for stream in topology.streams() {
                match js.delete_stream(&stream.name).await {
                    Ok(_) => println!("deleted {}", stream.name),
                    Err(e) => println!("{}: {e}", stream.name),
                }
            }
            Ok(())
        }
    }
}
