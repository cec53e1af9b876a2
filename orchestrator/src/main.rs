/// mimalloc: the saga hot path allocates many small, short-lived buffers (JSON, rows,
/// messages); it spends less CPU on them than glibc's allocator (2.26 -> 2.20 ms per saga, 787 ->
/// 795 sagas/s, BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The shop's orchestrator: the command line of [`orchestrator::cli`] with the shop's saga
/// types.
fn main() -> std::process::ExitCode {
    orchestrator::cli::main(sagas::shop_types())
}
