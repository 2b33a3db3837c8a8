//! `xlstm-forecast import`: load a CSV file into a series in one transaction.

use std::path::PathBuf;

use chrono::DateTime;
use chrono_tz::Tz;

use crate::config::Settings;
use crate::data::{Frequency, ImportOptions, import_csv_file, timestamp::parse_timezone};
use crate::store;

#[derive(Debug, clap::Args)]
pub struct ImportArgs {
    /// Series to import into; created (with the file's value columns as channels) when missing.
    #[arg(long)]
    pub series: String,
    /// CSV file with a header line: one time column, every other column a channel.
    #[arg(long, value_name = "FILE")]
    pub csv: PathBuf,
    /// The time column [default: the column named ts, timestamp, time, date or datetime
    /// (any case), else the first column].
    #[arg(long, value_name = "COLUMN")]
    pub time_column: Option<String>,
    /// Sampling frequency recorded on a new series (e.g. 15m, 1h, 1d); must match an
    /// existing series' frequency.
    #[arg(long)]
    pub frequency: Option<Frequency>,
    /// IANA time zone of timestamps written without an offset [default: the existing series'
    /// zone, else UTC]; recorded on a new series.
    #[arg(long, value_name = "TZ", value_parser = parse_timezone)]
    pub timezone: Option<Tz>,
}

pub async fn run(args: ImportArgs, settings: &Settings) -> anyhow::Result<()> {
    let store = store::connect(&settings.database_url()).await?;
    let options = ImportOptions {
        time_column: args.time_column,
        frequency: args.frequency,
        timezone: args.timezone,
        ..ImportOptions::new(args.series)
    };
    let report = import_csv_file(store.as_ref(), &args.csv, &options).await?;
    let summary = &report.summary;
    let range = match (summary.first_ts_micros, summary.last_ts_micros) {
        (Some(first), Some(last)) => format!("from {} to {}", rfc3339(first), rfc3339(last)),
        _ => "no values".to_string(),
    };
    println!(
        "imported {} rows, {} cells written, {} channels into {} series '{}', {range}",
        report.rows,
        summary.cells_written,
        report.channels.len(),
        if summary.created_series {
            "new"
        } else {
            "existing"
        },
        summary.series,
    );
    Ok(())
}

fn rfc3339(micros: i64) -> String {
    DateTime::from_timestamp_micros(micros)
        .map(|at| at.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true))
        .unwrap_or_else(|| format!("{micros} µs"))
}
