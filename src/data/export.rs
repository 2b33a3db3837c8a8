//! Writes frames as CSV with polars' writer: `ts` as RFC 3339 in UTC, then the channels;
//! missing cells are empty.

use std::io::Write;

use polars::prelude::*;

use super::error::DataError;
use super::frame::SeriesFrame;

/// RFC 3339 with a `Z`; fractional seconds appear only when a timestamp has them.
const TIMESTAMP_FORMAT: &str = "%Y-%m-%dT%H:%M:%S%.fZ";

/// Writes `ts` and the channel columns of `frame` (calendar columns are left out: they are
/// derived, not data) with a header line.
pub fn write_frame_csv<W: Write>(frame: &SeriesFrame, writer: W) -> Result<(), DataError> {
    let mut columns = Vec::with_capacity(1 + frame.channels.len());
    columns.push(frame.data.column("ts")?.clone());
    for channel in &frame.channels {
        columns.push(frame.data.column(channel)?.clone());
    }
    let mut table = DataFrame::new(frame.data.height(), columns)?;
    CsvWriter::new(writer)
        .include_header(true)
        .with_datetime_format(Some(TIMESTAMP_FORMAT.into()))
        .finish(&mut table)?;
    Ok(())
}
