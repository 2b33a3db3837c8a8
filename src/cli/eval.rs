//! `xlstm-forecast eval`: the standard long-horizon protocol on a wide CSV file (the first
//! column is the timestamp, the others are channels); see `crate::forecast::eval`.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use polars::prelude::{CsvReadOptions, SerReader};

use crate::data::timestamp::parse_timestamp_micros;
use crate::data::{ChannelMatrix, infer_frequency};
use crate::forecast::{
    EvalOptions, EvalReport, ModelChoice, SplitSpec, evaluate, seasonal_period_for,
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DeviceArg {
    #[value(name = "cpu")]
    Cpu,
    #[value(name = "cuda")]
    Cuda,
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
    /// Seed for initialisation and shuffling (the baselines are deterministic).
    #[arg(long, value_name = "S", default_value_t = 0)]
    pub seed: u64,
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: DeviceArg,
    /// Season length for seasonal naive and the MASE scale (default: from the frequency:
    /// hourly 24, 15 min 96, 10 min 144, daily 7, otherwise 1).
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
        if args.device != DeviceArg::Cpu {
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
                table.channel_index(target)?;
            }
            (table.matrix, table.channels)
        }
        FeaturesArg::Univariate => {
            let target = match &args.target {
                Some(target) => target.clone(),
                None => table.channels.last().expect("at least one channel").clone(),
            };
            let index = table.channel_index(&target)?;
            (table.select_channel(index), vec![target])
        }
    };
    let seasonal_period = match args.season_period {
        Some(0) => bail!("--season-period: must be at least 1"),
        Some(period) => period,
        None => seasonal_period_for(infer_frequency(&table.ts_micros)),
    };
    let options = EvalOptions {
        lookback: args.lookback,
        horizon: args.horizon,
        split,
        model,
        seasonal_period,
        preset: args.preset.clone(),
    };
    let report = evaluate(matrix, &options)?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_text(&report, &channels);
    }
    Ok(())
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
}

/// A wide CSV read whole: timestamps and the channel matrix.
struct WideTable {
    channels: Vec<String>,
    ts_micros: Vec<i64>,
    matrix: ChannelMatrix,
}

impl WideTable {
    fn channel_index(&self, name: &str) -> anyhow::Result<usize> {
        self.channels
            .iter()
            .position(|channel| channel == name)
            .with_context(|| {
                format!(
                    "--target: no column '{name}' in the CSV (channels: {})",
                    self.channels.join(", ")
                )
            })
    }

    fn select_channel(&self, channel: usize) -> ChannelMatrix {
        let matrix = &self.matrix;
        let cells = (0..matrix.steps).map(|row| row * matrix.channels + channel);
        ChannelMatrix {
            steps: matrix.steps,
            channels: 1,
            values: cells.clone().map(|cell| matrix.values[cell]).collect(),
            missing: cells.map(|cell| matrix.missing[cell]).collect(),
        }
    }
}

/// Reads the file with polars (every column as text), parses the first column with the
/// ingest timestamp parser (zone-less times are UTC) and the others as numbers. Rows must be
/// in strictly increasing time order: the protocol splits by row position.
fn read_wide_csv(path: &Path) -> anyhow::Result<WideTable> {
    let context = || format!("--csv: cannot read {}", path.display());
    let frame = CsvReadOptions::default()
        .with_has_header(true)
        .with_infer_schema_length(Some(0))
        .map_parse_options(|parse| parse.with_missing_is_null(true))
        .try_into_reader_with_file_path(Some(path.to_path_buf()))
        .with_context(context)?
        .finish()
        .with_context(context)?;
    let columns = frame.columns();
    if columns.len() < 2 {
        bail!(
            "--csv: {} needs a timestamp column and at least one channel column, found {} column(s)",
            path.display(),
            columns.len()
        );
    }
    if frame.height() == 0 {
        bail!("--csv: {} has a header but no data rows", path.display());
    }
    // The header is line 1, so data row i is on line i + 2.
    let line = |row: usize| row + 2;
    let time_name = columns[0].name().to_string();
    let mut ts_micros = Vec::with_capacity(frame.height());
    for (row, text) in columns[0].str()?.iter().enumerate() {
        let micros =
            parse_timestamp_micros(text.unwrap_or(""), chrono_tz::UTC).map_err(|message| {
                anyhow::anyhow!("--csv: line {}, column '{time_name}': {message}", line(row))
            })?;
        if let Some(previous) = ts_micros.last() {
            if micros <= *previous {
                bail!(
                    "--csv: line {}, column '{time_name}': timestamps must be strictly increasing",
                    line(row)
                );
            }
        }
        ts_micros.push(micros);
    }
    let channels: Vec<String> = columns[1..]
        .iter()
        .map(|column| column.name().to_string())
        .collect();
    let (steps, channel_count) = (frame.height(), channels.len());
    let mut values = vec![0.0_f32; steps * channel_count];
    let mut missing = vec![true; steps * channel_count];
    for (channel, column) in columns[1..].iter().enumerate() {
        for (row, text) in column.str()?.iter().enumerate() {
            let Some(text) = text.map(str::trim).filter(|text| !text.is_empty()) else {
                continue;
            };
            let value: f64 = text.parse().map_err(|_| {
                anyhow::anyhow!(
                    "--csv: line {}, column '{}': expected a number, found '{text}'",
                    line(row),
                    channels[channel]
                )
            })?;
            if !value.is_finite() {
                bail!(
                    "--csv: line {}, column '{}': value must be finite, found '{text}'",
                    line(row),
                    channels[channel]
                );
            }
            values[row * channel_count + channel] = value as f32;
            missing[row * channel_count + channel] = false;
        }
    }
    Ok(WideTable {
        channels,
        ts_micros,
        matrix: ChannelMatrix {
            steps,
            channels: channel_count,
            values,
            missing,
        },
    })
}
