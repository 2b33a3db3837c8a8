//! `xlstm-forecast eval`: the standard long-horizon protocol on a wide CSV file (the first
//! column is the timestamp, the others are channels); see `crate::forecast::eval`.

use std::path::PathBuf;

use anyhow::{Context, bail};

use super::progress::TrainingProgressPrinter;
use super::wide_csv::read_wide_csv;
use crate::data::infer_frequency;
use crate::device::DeviceChoice;
use crate::forecast::{
    EvalOptions, EvalReport, ModelChoice, SplitSpec, evaluate_with_progress, seasonal_period_for,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FeaturesArg {
    /// Multivariate: every channel in and out.
    #[value(name = "M")]
    Multivariate,
    /// Univariate: the --target channel only.
    #[value(name = "S")]
    Univariate,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ModelArg {
    #[value(name = "xlstm")]
    Xlstm,
    #[value(name = "linear")]
    Linear,
    #[value(name = "seasonal-naive")]
    SeasonalNaive,
}

#[derive(Debug, clap::Args)]
pub struct EvalArgs {
    /// Wide CSV: timestamp first, then one column per channel; empty cells are missing.
    #[arg(long, value_name = "FILE")]
    pub csv: PathBuf,
    /// Lookback window length L (rows).
    #[arg(long, value_name = "L")]
    pub lookback: usize,
    /// Forecast horizon H (rows).
    #[arg(long, value_name = "H")]
    pub horizon: usize,
    /// Row counts TRAIN,VAL,TEST from the start of the file.
    #[arg(
        long,
        value_name = "TRAIN,VAL,TEST",
        required_unless_present = "split",
        conflicts_with = "split"
    )]
    pub split_rows: Option<String>,
    /// Fractions TRAIN,VAL,TEST of the rows (validation takes the rounding remainder when
    /// they sum to 1).
    #[arg(long, value_name = "TRAIN,VAL,TEST")]
    pub split: Option<String>,
    /// M: all channels in and out; S: the --target channel only.
    #[arg(long, value_enum, default_value = "M")]
    pub features: FeaturesArg,
    /// Target channel for --features S (default: the last column).
    #[arg(long, value_name = "COL")]
    pub target: Option<String>,
    #[arg(long, value_enum, default_value = "xlstm")]
    pub model: ModelArg,
    /// Model preset (xlstm only).
    #[arg(long, value_name = "NAME")]
    pub preset: Option<String>,
    /// Most training epochs (xlstm only).
    #[arg(long, value_name = "N")]
    pub max_epochs: Option<usize>,
    /// Seed for initialisation, window order and dropout (default: the preset's; the
    /// baselines are deterministic).
    #[arg(long, value_name = "S")]
    pub seed: Option<u64>,
    /// auto, cpu, cuda or cuda:N for the xLSTM model (auto: CUDA when this build has it and a
    /// GPU is usable); the baselines run on the CPU.
    #[arg(long, value_name = "DEVICE", default_value = "auto")]
    pub device: DeviceChoice,
    /// Season length for seasonal naive, the MASE scale and the width of the calibrated
    /// bands (default: from the frequency: hourly 24, 15 min 96, 10 min 144, daily 7,
    /// otherwise 1).
    #[arg(long, value_name = "STEPS")]
    pub season_period: Option<usize>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: EvalArgs) -> anyhow::Result<()> {
    let model = match args.model {
        ModelArg::Xlstm => ModelChoice::Xlstm,
        ModelArg::Linear => ModelChoice::Linear,
        ModelArg::SeasonalNaive => ModelChoice::SeasonalNaive,
    };
    if model != ModelChoice::Xlstm {
        if args.max_epochs.is_some() {
            bail!(
                "--max-epochs: the {} baseline is fitted in closed form; it has no epochs",
                model.name()
            );
        }
        if matches!(args.device, DeviceChoice::Cuda(_)) {
            bail!(
                "--device: the {} baseline runs on the CPU only",
                model.name()
            );
        }
    }
    let split = match (&args.split_rows, &args.split) {
        (Some(rows), None) => SplitSpec::parse_rows(rows)?,
        (None, Some(fractions)) => SplitSpec::parse_fractions(fractions)?,
        _ => bail!("give exactly one of --split-rows TRAIN,VAL,TEST or --split TRAIN,VAL,TEST"),
    };
    let table = read_wide_csv(&args.csv)?;
    let (matrix, channels) = match args.features {
        FeaturesArg::Multivariate => {
            if let Some(target) = &args.target {
                table.channel_index(target, "--target")?;
            }
            (table.matrix, table.channels)
        }
        FeaturesArg::Univariate => {
            let target = match &args.target {
                Some(target) => target.clone(),
                None => table.channels.last().expect("at least one channel").clone(),
            };
            let index = table.channel_index(&target, "--target")?;
            (table.select_channel(index), vec![target])
        }
    };
    let seasonal_period = match args.season_period {
        Some(0) => bail!("--season-period: must be at least 1"),
        Some(period) => period,
        None => seasonal_period_for(infer_frequency(&table.ts_micros)),
    };
    let options = EvalOptions {
        preset: args.preset.clone(),
        max_epochs: args.max_epochs,
        seed: args.seed,
        device: match model {
            ModelChoice::Xlstm => args.device.open().context("--device")?,
            _ => candle_core::Device::Cpu,
        },
        ..EvalOptions::new(args.lookback, args.horizon, split, model, seasonal_period)
    };
    let mut progress = TrainingProgressPrinter::new();
    let report = evaluate_with_progress(matrix, &options, Some(&mut |p| progress.show(p)))?;
    progress.finish();
    if args.json {
        println!(
            "{}",
            serde_json::to_string(&json_report(&report, &channels)?)?
        );
    } else {
        print_text(&report, &channels);
    }
    Ok(())
}

/// The report with each `per_channel` entry named by its column.
fn json_report(report: &EvalReport, channels: &[String]) -> anyhow::Result<serde_json::Value> {
    let mut value = serde_json::to_value(report)?;
    if let Some(entries) = value["per_channel"].as_array_mut() {
        for (entry, name) in entries.iter_mut().zip(channels) {
            entry["channel"] = serde_json::Value::from(name.as_str());
        }
    }
    Ok(value)
}

fn print_text(report: &EvalReport, channels: &[String]) {
    let metrics = &report.metrics;
    println!(
        "{} on {} channel(s) ({}), lookback {}, horizon {}: {} test windows",
        report.model,
        report.channels,
        channels.join(", "),
        report.lookback,
        report.horizon,
        metrics.windows
    );
    println!(
        "mse {:.6}  mae {:.6}  mase {:.6}  wql {:.6}  coverage_80 {:.4}",
        metrics.mse, metrics.mae, metrics.mase, metrics.wql, metrics.coverage_80
    );
    println!(
        "params {}  epochs {}  train_seconds {:.3}  rows train/val/test {}/{}/{}",
        report.params,
        report.epochs,
        report.train_seconds,
        report.train_rows,
        report.validation_rows,
        report.test_rows
    );
    for (name, channel) in channels.iter().zip(&report.per_channel) {
        println!(
            "  {name}: mse {:.6}  mae {:.6}  mase {:.6}",
            channel.mse, channel.mae, channel.mase
        );
    }
}
