//! `xlstm-forecast bench ...`: benchmarks that print their figures.

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
}

pub fn run(cmd: BenchCommand, settings: &Settings) -> anyhow::Result<()> {
    match cmd {
        BenchCommand::Kernels(args) => kernels::run(args),
        BenchCommand::Ingest(args) => super::block_on(ingest::run(args, settings)),
        BenchCommand::Queue(args) => super::block_on(queue::run(args)),
    }
}
