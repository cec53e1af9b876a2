use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use orchestrator::catalog;
use orchestrator::config::Settings;
use orchestrator::startup::Application;
use runtime::shutdown::cancel_on_signal;
use tokio_util::sync::CancellationToken;

/// mimalloc: the saga hot path allocates many small, short-lived buffers (JSON, rows,
/// messages); it spends less CPU on them than glibc's allocator (2.26 -> 2.20 ms per saga, 787 ->
/// 795 sagas/s, BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    /// Run the orchestrator (the default).
    Serve,
    /// Apply the database migrations and exit.
    Migrate,
    /// Print the effective configuration (secrets redacted) and exit.
    Config,
    /// Manage the product catalogue.
    Catalog {
        #[command(subcommand)]
        command: CatalogCommand,
    },
    /// Delete this deployment's JetStream streams (and their messages). For test and
    /// benchmark resets; the next start declares them again.
    DeleteStreams,
}

#[derive(Subcommand)]
enum CatalogCommand {
    /// Load (or reload) products and their stock from a JSON file.
    Load { file: PathBuf },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let settings = match Settings::load() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    runtime::telemetry::init(settings.log.format, &settings.log.level);
    let runtime = match settings.runtime.build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli, settings)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "orchestrator failed");
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli, settings: Settings) -> anyhow::Result<()> {
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => {
            let app = Application::build(settings, sagas::shop_types()).await?;
            let shutdown = CancellationToken::new();
            cancel_on_signal(shutdown.clone());
            app.run_until_stopped(shutdown).await
        }
        Command::Migrate => {
            runtime::db::connect(&settings.database, "saga-orchestrator").await?;
            println!("migrations applied");
            Ok(())
        }
        Command::Config => {
            println!("{settings:#?}");
            Ok(())
        }
        Command::DeleteStreams => {
            let (_client, js) =
                runtime::nats::connect(&settings.nats.url, "orchestrator-admin").await?;
            let topology = orchestrator::topology::Topology::new(
                settings.subjects(),
                settings.nats.replicas,
                orchestrator::config::ms(settings.replies.ack_wait_ms),
                settings.replies.max_deliver,
                sagas::shop_types().services(),
            );
            for stream in topology.streams() {
                match js.delete_stream(&stream.name).await {
                    Ok(_) => println!("deleted {}", stream.name),
                    Err(e) => println!("{}: {e}", stream.name),
                }
            }
            Ok(())
        }
        Command::Catalog {
            command: CatalogCommand::Load { file },
        } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            let catalogue: catalog::CatalogueFile = serde_json::from_str(&text)
                .with_context(|| format!("{} is not a valid catalogue", file.display()))?;
            let pool = runtime::db::connect(&settings.database, "saga-orchestrator").await?;
            let n = catalog::load(&pool, &catalogue).await?;
            println!("loaded {n} variants from {}", file.display());
            Ok(())
        }
    }
}
