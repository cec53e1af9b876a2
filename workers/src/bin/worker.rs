use clap::Parser;
use tokio_util::sync::CancellationToken;
use workers::config::Settings;
use workers::run::{self, Kind};

/// mimalloc: the saga hot path allocates many small, short-lived buffers (JSON, rows,
/// messages); it spends less CPU on them than glibc's allocator (2.26 -> 2.20 ms per saga, 787 ->
/// 795 sagas/s, BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A step worker. Configuration: workers/config/default.toml; override with SAGA_CONFIG=<file>,
/// SAGA_<SECTION>__<KEY>=<value>, DATABASE_URL, NATS_URL, PROCESSOR_URL and CARRIER_URL.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Which worker pool this process serves.
    #[arg(value_enum)]
    kind: Kind,
    /// With `product`: load this catalogue file (categories, products, variants with their
    /// prices and stock) through the Product service's repositories, then exit.
    #[arg(long, value_name = "FILE")]
    load: Option<std::path::PathBuf>,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // The process's name in its traces: `worker-inventory`, ...
    let name = format!(
        "worker-{}",
        clap::ValueEnum::to_possible_value(&cli.kind)
            .map(|v| v.get_name().to_owned())
            .unwrap_or_default()
    );
    runtime::process::main(
        &name,
        Settings::load,
        |s| (&s.log, &s.runtime),
        |settings| async move {
            let shutdown = CancellationToken::new();
            if let Some(file) = cli.load {
                anyhow::ensure!(
                    cli.kind == Kind::Product,
                    "--load is an option of the product service: worker product --load FILE"
                );
                return run::load_catalogue(&settings, &file).await;
            }
            runtime::shutdown::cancel_on_signal(shutdown.clone());
            run::run(cli.kind, settings, shutdown).await
        },
    )
}
