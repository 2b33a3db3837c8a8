use clap::Parser;

// Tensor code allocates a fresh buffer per op; mimalloc keeps freed pages for reuse where
// glibc hands large blocks back to the kernel and faults them in again (about a fifth of a
// training step on the CPU, BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let cli = xlstm_forecast::cli::Cli::parse();
    match xlstm_forecast::cli::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
