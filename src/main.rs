use clap::Parser;

// Tensor code allocates a fresh buffer per op. glibc hands large blocks back to the kernel and
// faults them in (zeroed) again on the next op; mimalloc, told to keep freed memory for a few
// seconds, reuses it from one training step to the next (BENCHMARKS.md: about a fifth of a CPU
// training step).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `mi_option_purge_delay` (mimalloc.h): milliseconds before freed memory goes back
/// to the OS.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
const PURGE_DELAY_MS: std::ffi::c_long = 5_000;

/// candle's elementwise ops split large tensors over a pool of its own, whose workers spin
/// between ops and which takes one caller at a time. Our models cut each batch into one shard
/// per core instead (src/xlstm/shards.rs), so two shards' ops would queue for that pool and its
/// spinning workers would take the cores the shards run on (BENCHMARKS.md: a training step
/// 1.8–2.1× slower). One thread means no pool: each op runs on the thread that calls it.
/// An operator's own `CANDLE_NUM_THREADS` is kept.
fn keep_candle_ops_on_their_callers_thread() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        // SAFETY: the first thing main does, before any other thread exists.
        unsafe { std::env::set_var("CANDLE_NUM_THREADS", "1") };
    }
}

fn main() -> std::process::ExitCode {
    keep_candle_ops_on_their_callers_thread();
    // SAFETY: sets a documented mimalloc option to a valid value; no memory is touched.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, PURGE_DELAY_MS) };
    let cli = xlstm_forecast::cli::Cli::parse();
    match xlstm_forecast::cli::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
