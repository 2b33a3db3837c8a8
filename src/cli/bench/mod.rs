//! `xlstm-forecast bench ...`: benchmarks that print their figures.

mod forecast;
mod ingest;
mod kernels;
mod queue;

use clap::Subcommand;

use crate::config::Settings;

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// xLSTM kernels and the whole stack: fused vs reference, one JSON line per case.
    Kernels(kernels::KernelBenchArgs),
    /// Bulk CSV ingest into Postgres and SQLite, and frame loading.
    Ingest(ingest::IngestBenchArgs),
    /// The run queue: claim-to-start latency and throughput of trivial runs.
    Queue(queue::QueueBenchArgs),
    /// Forecast latency over HTTP with the champion cached (load from a second process).
    Forecast(forecast::ForecastBenchArgs),
    /// The load generator `bench forecast` runs in a second process.
    #[command(hide = true)]
    HttpLoad(forecast::HttpLoadArgs),
}

pub fn run(cmd: BenchCommand, settings: &Settings) -> anyhow::Result<()> {
    match cmd {
        BenchCommand::Kernels(args) => kernels::run(args),
        BenchCommand::Ingest(args) => super::block_on(ingest::run(args, settings)),
        BenchCommand::Queue(args) => super::block_on(queue::run(args)),
        BenchCommand::Forecast(args) => super::block_on(forecast::run(args)),
        BenchCommand::HttpLoad(args) => super::block_on(forecast::http_load(args)),
    }
}
