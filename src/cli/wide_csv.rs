//! Wide CSV files as the CLI reads them for `eval`, `train` and `forecast`: the first column
//! is the timestamp, every other column a channel; empty cells are missing.

use std::path::Path;

use anyhow::{Context, bail};
use polars::prelude::{CsvReadOptions, SerReader};

use crate::data::timestamp::parse_timestamp_micros;
use crate::data::{ChannelMatrix, calendar_rows};

/// A wide CSV read whole: timestamps and the channel matrix.
pub struct WideTable {
    pub channels: Vec<String>,
    pub ts_micros: Vec<i64>,
    pub matrix: ChannelMatrix,
}

impl WideTable {
    pub fn channel_index(&self, name: &str, flag: &str) -> anyhow::Result<usize> {
        self.channels
            .iter()
            .position(|channel| channel == name)
            .with_context(|| {
                format!(
                    "{flag}: no column '{name}' in the CSV (channels: {})",
                    self.channels.join(", ")
                )
            })
    }

    pub fn select_channel(&self, channel: usize) -> ChannelMatrix {
        let matrix = &self.matrix;
        let cells = (0..matrix.steps).map(|row| row * matrix.channels + channel);
        ChannelMatrix {
            steps: matrix.steps,
            channels: 1,
            values: cells.clone().map(|cell| matrix.values[cell]).collect(),
            missing: cells.map(|cell| matrix.missing[cell]).collect(),
            calendar: matrix.calendar.clone(),
        }
    }
}

/// Reads the file with polars (every column as text), parses the first column with the
/// ingest timestamp parser (zone-less times are UTC) and the others as numbers. Rows must be
/// in strictly increasing time order: the protocol splits by row position.
pub fn read_wide_csv(path: &Path) -> anyhow::Result<WideTable> {
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
        if let Some(previous) = ts_micros.last()
            && micros <= *previous
        {
            bail!(
                "--csv: line {}, column '{time_name}': timestamps must be strictly increasing",
                line(row)
            );
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
    // Zone-less times are read as UTC, so the calendar is UTC's.
    let calendar = Some(calendar_rows(&ts_micros, chrono_tz::UTC));
    Ok(WideTable {
        channels,
        ts_micros,
        matrix: ChannelMatrix {
            steps,
            channels: channel_count,
            values,
            missing,
            calendar,
        },
    })
}
