//! An orchestrator of the test suite: the shop's saga types and the suite's own `courier`
//! ([`e2e::courier`]), registered beside them through the orchestrator's command line, as
//! any deployment would register its types.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    orchestrator::cli::main(e2e::courier::registry())
}
