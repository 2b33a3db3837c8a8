//! `xlstm-forecast export`: write a series as a regular wide CSV.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::PathBuf;

use anyhow::Context;
use chrono::{DateTime, Utc};

use crate::config::Settings;
use crate::data::timestamp::parse_timestamp_micros;
use crate::data::{FrameOptions, load_frame, write_frame_csv};
use crate::store;

#[derive(Debug, clap::Args)]
pub struct ExportArgs {
    /// Series to export.
    #[arg(long)]
    pub series: String,
    /// Output CSV file (overwritten): ts as RFC 3339 UTC, one column per channel, empty
    /// cells where values are missing.
    #[arg(long, value_name = "OUT")]
    pub csv: PathBuf,
    /// First time to include (RFC 3339, 'YYYY-MM-DD HH:MM:SS' in UTC, or epoch seconds).
    #[arg(long, value_name = "T", value_parser = parse_utc_time)]
    pub from: Option<DateTime<Utc>>,
    /// Last time to include (same forms as --from).
    #[arg(long, value_name = "T", value_parser = parse_utc_time)]
    pub to: Option<DateTime<Utc>>,
    /// Longest run of missing buckets filled by linear interpolation (0: none).
    #[arg(long, value_name = "N", default_value_t = FrameOptions::default().interpolation_limit)]
    pub interpolation_limit: usize,
}

fn parse_utc_time(text: &str) -> Result<DateTime<Utc>, String> {
    let micros = parse_timestamp_micros(text, chrono_tz::UTC)?;
    DateTime::from_timestamp_micros(micros).ok_or_else(|| format!("time '{text}' is out of range"))
}

pub async fn run(args: ExportArgs, settings: &Settings) -> anyhow::Result<()> {
    let store = store::connect(&settings.database_url()).await?;
    let options = FrameOptions {
        interpolation_limit: args.interpolation_limit,
        ..FrameOptions::default()
    };
    let frame = load_frame(store.as_ref(), &args.series, args.from, args.to, &options).await?;
    // Created only once the frame exists, so an unknown series or bad range leaves no file.
    let file =
        File::create(&args.csv).with_context(|| format!("cannot create {}", args.csv.display()))?;
    let mut writer = BufWriter::new(file);
    write_frame_csv(&frame, &mut writer)?;
    writer
        .flush()
        .with_context(|| format!("cannot write {}", args.csv.display()))?;
    println!(
        "exported {} rows x {} channels of series '{}' at frequency {} to {}",
        frame.height(),
        frame.channels.len(),
        frame.series,
        frame.frequency,
        args.csv.display()
    );
    Ok(())
}
