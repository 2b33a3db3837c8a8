//! `xlstm-forecast generate`: write a realistic synthetic multivariate series as CSV (the
//! same layout `export` writes: `ts` in RFC 3339 UTC, one column per channel, empty cells
//! where values are missing).

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::PathBuf;

use anyhow::Context;
use polars::prelude::*;

use crate::data::{SeriesFrame, write_frame_csv};
use crate::forecast::synthetic::{SyntheticKind, SyntheticSeries, SyntheticSpec, generate};

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum KindArg {
    #[value(name = "hourly")]
    Hourly,
    #[value(name = "15min")]
    FifteenMinutes,
    #[value(name = "10min")]
    TenMinutes,
}

#[derive(Debug, clap::Args)]
pub struct GenerateArgs {
    /// Sampling step of the series.
    #[arg(long, value_enum)]
    pub kind: KindArg,
    /// Number of rows (time steps).
    #[arg(long)]
    pub rows: usize,
    /// Number of channels (value columns).
    #[arg(long, default_value_t = 7)]
    pub channels: usize,
    /// Random seed; the same arguments and seed always give the same file.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Fraction of cells left empty (missing completely at random), in [0, 1).
    #[arg(long, value_name = "FRACTION", default_value_t = 0.0)]
    pub missing: f64,
    /// Output CSV file (overwritten).
    #[arg(long, value_name = "OUT")]
    pub csv: PathBuf,
}

pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    let kind = match args.kind {
        KindArg::Hourly => SyntheticKind::Hourly,
        KindArg::FifteenMinutes => SyntheticKind::FifteenMinutes,
        KindArg::TenMinutes => SyntheticKind::TenMinutes,
    };
    let spec = SyntheticSpec {
        missing_fraction: args.missing,
        ..SyntheticSpec::new(kind, args.rows, args.channels, args.seed)
    };
    let series = generate(&spec)?;
    let frame = series_frame(&series, kind)?;
    let file =
        File::create(&args.csv).with_context(|| format!("cannot create {}", args.csv.display()))?;
    let mut writer = BufWriter::new(file);
    write_frame_csv(&frame, &mut writer)?;
    writer
        .flush()
        .with_context(|| format!("cannot write {}", args.csv.display()))?;
    println!(
        "generated {} rows x {} channels ({}, seed {}) to {}",
        args.rows,
        args.channels,
        kind.frequency(),
        args.seed,
        args.csv.display()
    );
    Ok(())
}

fn series_frame(series: &SyntheticSeries, kind: SyntheticKind) -> anyhow::Result<SeriesFrame> {
    let matrix = &series.matrix;
    let ts: Vec<i64> = (0..matrix.steps)
        .map(|row| series.timestamp_micros(row))
        .collect();
    let ts_column = Int64Chunked::from_vec("ts".into(), ts)
        .into_datetime(TimeUnit::Microseconds, Some(polars::prelude::TimeZone::UTC))
        .into_column();
    let mut data_columns = vec![ts_column.clone()];
    let mut missing_columns = vec![ts_column];
    for (channel, name) in series.channel_names.iter().enumerate() {
        let cells = (0..matrix.steps).map(|row| row * matrix.channels + channel);
        let values: Vec<Option<f64>> = cells
            .clone()
            .map(|cell| (!matrix.missing[cell]).then(|| f64::from(matrix.values[cell])))
            .collect();
        let missing: Vec<bool> = cells.map(|cell| matrix.missing[cell]).collect();
        data_columns.push(Float64Chunked::from_slice_options(name.into(), &values).into_column());
        missing_columns.push(BooleanChunked::from_slice(name.into(), &missing).into_column());
    }
    Ok(SeriesFrame {
        series: "synthetic".to_string(),
        frequency: kind.frequency(),
        timezone: chrono_tz::UTC,
        channels: series.channel_names.clone(),
        data: DataFrame::new(matrix.steps, data_columns)?,
        missing: DataFrame::new(matrix.steps, missing_columns)?,
    })
}
