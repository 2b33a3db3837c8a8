//! The `xlstm-forecast` command. Each subcommand lives in its own file with its
//! argument struct and a `run` function; this file only dispatches.

mod bench;
mod config_cmd;
mod device_check;
mod eval;
mod export;
mod forecast;
mod generate;
mod import;
mod migrate;
mod progress;
mod quickstart;
mod series_source;
mod serve;
mod train;
mod wide_csv;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::config::Settings;

#[derive(Debug, Parser)]
#[command(
    name = "xlstm-forecast",
    version,
    about = "Self-hosted xLSTM time-series forecasting"
)]
pub struct Cli {
    /// Optional TOML configuration file (environment variables override it).
    #[arg(long, global = true, env = "XLSTM_FORECAST_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print the effective settings (secrets masked).
    Config(config_cmd::ConfigArgs),
    /// Apply database migrations to the configured store.
    Migrate(migrate::MigrateArgs),
    /// Import a CSV file into a series (one transaction; idempotent upsert).
    Import(import::ImportArgs),
    /// Export a series as a regularised wide CSV.
    Export(export::ExportArgs),
    /// From nothing to a running service: sample series, a trained model, a forecast, an
    /// hourly fine-tune schedule, then serve (the embedded SQLite store unless configured).
    Quickstart(quickstart::QuickstartArgs),
    /// Run the HTTP service.
    Serve(serve::ServeArgs),
    /// Train (or fine-tune) an xLSTM forecaster on a series; writes a model directory.
    Train(train::TrainArgs),
    /// Forecast the steps after a series' last row with a trained model directory.
    Forecast(forecast::ForecastArgs),
    /// Score a forecaster on a CSV with the standard long-horizon protocol.
    Eval(eval::EvalArgs),
    /// Write a realistic synthetic multivariate series as CSV.
    Generate(generate::GenerateArgs),
    /// Check the kernels on a device (a GPU) against the fused CPU kernels: outputs and
    /// gradients, one line per case; fails when a case exceeds its tolerance.
    DeviceCheck(device_check::DeviceCheckArgs),
    /// Benchmarks that print figures (JSON lines with --json).
    #[command(subcommand)]
    Bench(bench::BenchCommand),
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    init_tracing();
    // The kernels read the cap lazily and fall back to the CPU's widest set on a bad value;
    // refuse it here instead, before any work.
    crate::xlstm::kernels::simd::configured_cap().map_err(anyhow::Error::msg)?;
    let settings = Settings::load(cli.config.as_deref())?;
    match cli.command {
        Command::Config(args) => config_cmd::run(args, &settings),
        Command::Migrate(args) => block_on(migrate::run(args, &settings)),
        Command::Import(args) => block_on(import::run(args, &settings)),
        Command::Export(args) => block_on(export::run(args, &settings)),
        Command::Quickstart(args) => block_on(quickstart::run(args, &settings)),
        Command::Serve(args) => block_on(serve::run(args, &settings)),
        Command::Train(args) => block_on(train::run(args, &settings)),
        Command::Forecast(args) => block_on(forecast::run(args, &settings)),
        Command::Eval(args) => eval::run(args),
        Command::Generate(args) => generate::run(args),
        Command::DeviceCheck(args) => device_check::run(args),
        Command::Bench(cmd) => bench::run(cmd, &settings),
    }
}

fn block_on<F: std::future::Future<Output = anyhow::Result<()>>>(fut: F) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(fut)
}

fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_env("XLSTM_FORECAST_LOG").unwrap_or_else(|_| EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
