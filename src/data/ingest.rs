//! CSV ingest: header → column layout → chunks parsed by polars → validated columnar batches
//! written through ONE store import session (one transaction).
//!
//! Every validation error carries the file line (1-based, the header is line 1) where the
//! offending record starts and the column concerned. Any error drops the import session
//! before commit, so nothing is written and a new series is not created.
//!
//! Parsing runs on a blocking thread and hands bounded batches to the writer through a
//! channel of capacity one, so parsing the next chunk overlaps writing the previous one and
//! at most about three chunks are in memory at a time.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;
use std::sync::Arc;

use chrono_tz::Tz;
use polars::prelude::*;

use super::csv_records::{CsvHeader, CsvRecordReader, QUOTE, RecordChunk, SEPARATOR};
use super::error::DataError;
use super::frequency::Frequency;
use super::timestamp::parse_timestamp_micros;
use crate::store::{
    ImportSummary, MAX_TS_MICROS, MIN_TS_MICROS, ObservationBatch, Series, SeriesSpec, Store,
};

/// Column names (case-insensitive) taken as the time column when none is named.
const TIME_COLUMN_NAMES: [&str; 5] = ["ts", "timestamp", "time", "date", "datetime"];
/// Frames name their time column `ts`, so no channel may be called that.
pub const RESERVED_CHANNEL_NAME: &str = "ts";
const READ_BUFFER_BYTES: usize = 1 << 20;

#[derive(Debug, Clone)]
pub struct ImportOptions {
    pub series: String,
    /// The time column; default: the first column named ts/timestamp/time/date/datetime
    /// (any case), else the first column.
    pub time_column: Option<String>,
    /// Frequency recorded on a series this import creates. For an existing series it must
    /// match the recorded one.
    pub frequency: Option<Frequency>,
    /// Zone for timestamps without an offset; default: the existing series' zone, else UTC.
    /// Also recorded on a series this import creates.
    pub timezone: Option<Tz>,
    /// Records parsed and written per batch.
    pub batch_rows: usize,
}

impl ImportOptions {
    pub const DEFAULT_BATCH_ROWS: usize = 20_000;

    pub fn new(series: impl Into<String>) -> Self {
        Self {
            series: series.into(),
            time_column: None,
            frequency: None,
            timezone: None,
            batch_rows: Self::DEFAULT_BATCH_ROWS,
        }
    }
}

#[derive(Debug)]
pub struct ImportReport {
    /// Data records read from the file (blank lines are not records).
    pub rows: u64,
    /// Non-empty value cells read; `summary.cells_written` is what the store wrote.
    pub cells: u64,
    pub channels: Vec<String>,
    pub summary: ImportSummary,
}

/// Imports the CSV file at `path`; see [`import_csv`].
pub async fn import_csv_file(
    store: &dyn Store,
    path: &Path,
    options: &ImportOptions,
) -> Result<ImportReport, DataError> {
    let file = File::open(path).map_err(|err| {
        DataError::Io(std::io::Error::new(
            err.kind(),
            format!("cannot open {}: {err}", path.display()),
        ))
    })?;
    import_csv(store, file, options).await
}

/// Imports a CSV stream into `options.series` in one transaction: creates the series when it
/// is missing, upserts by (series, channel, ts), and writes nothing at all on any error.
pub async fn import_csv<R: Read + Send + 'static>(
    store: &dyn Store,
    reader: R,
    options: &ImportOptions,
) -> Result<ImportReport, DataError> {
    if options.series.trim().is_empty() {
        return Err(DataError::invalid("series name must not be empty"));
    }
    if options.batch_rows == 0 {
        return Err(DataError::invalid("batch_rows must be positive"));
    }
    let time_column = options.time_column.clone();
    let (mut records, layout) = tokio::task::spawn_blocking(move || {
        let mut records = CsvRecordReader::new(BufReader::with_capacity(READ_BUFFER_BYTES, reader));
        let header = records
            .read_header()?
            .ok_or_else(|| DataError::invalid("the CSV file is empty: expected a header line"))?;
        let layout = ColumnLayout::from_header(&header, time_column.as_deref())?;
        Ok::<_, DataError>((records, layout))
    })
    .await
    .expect("CSV header task panicked")?;

    let existing = store.get_series(&options.series).await?;
    let timezone = match (&options.timezone, &existing) {
        (Some(timezone), _) => *timezone,
        (None, Some(series)) => series.timezone.parse::<Tz>().map_err(|_| {
            DataError::invalid(format!(
                "series '{}' has time zone '{}', which is not a known IANA name",
                series.name, series.timezone
            ))
        })?,
        (None, None) => Tz::UTC,
    };
    if let Some(series) = &existing {
        check_compatible(series, &layout.channels, options.frequency)?;
    }
    let spec = SeriesSpec {
        name: options.series.clone(),
        frequency: options.frequency.map(|frequency| frequency.to_string()),
        timezone: timezone.name().to_string(),
        channels: layout.channels.clone(),
    };
    let mut session = store.begin_import(&spec).await?;

    let (sender, mut receiver) = tokio::sync::mpsc::channel::<Result<ParsedBatch, DataError>>(1);
    let batch_rows = options.batch_rows;
    let parser_layout = layout.clone();
    let parser = tokio::task::spawn_blocking(move || {
        let field_count = parser_layout.field_count;
        loop {
            let parsed = match records.next_chunk(batch_rows, field_count) {
                Ok(Some(chunk)) => parse_chunk(chunk, &parser_layout, timezone),
                Ok(None) => return,
                Err(err) => Err(err),
            };
            let failed = parsed.is_err();
            // A closed channel means the writer stopped (store error); nothing more to do.
            if sender.blocking_send(parsed).is_err() || failed {
                return;
            }
        }
    });

    let mut rows = 0_u64;
    let mut cells = 0_u64;
    while let Some(parsed) = receiver.recv().await {
        let parsed = parsed?;
        rows += parsed.rows;
        cells += parsed.cells;
        session.write(&parsed.batch).await?;
    }
    parser.await.expect("CSV parser task panicked");
    if rows == 0 {
        return Err(DataError::invalid(
            "the CSV file has a header but no data rows",
        ));
    }
    let summary = session.commit().await?;
    Ok(ImportReport {
        rows,
        cells,
        channels: layout.channels,
        summary,
    })
}

fn check_compatible(
    series: &Series,
    channels: &[String],
    frequency: Option<Frequency>,
) -> Result<(), DataError> {
    if let Some(unknown) = channels
        .iter()
        .find(|channel| !series.channels.contains(channel))
    {
        return Err(DataError::invalid_column(
            unknown,
            format!(
                "not a channel of existing series '{}' (its channels: {})",
                series.name,
                series.channels.join(", ")
            ),
        ));
    }
    if let (Some(requested), Some(recorded)) = (frequency, series.frequency.as_deref()) {
        let recorded_frequency = Frequency::parse(recorded).ok();
        if recorded_frequency != Some(requested) {
            return Err(DataError::invalid(format!(
                "frequency {requested} differs from the frequency {recorded} of existing series '{}'",
                series.name
            )));
        }
    }
    Ok(())
}

/// Which CSV field is the time and which are channels.
#[derive(Debug, Clone)]
struct ColumnLayout {
    field_count: usize,
    time_index: usize,
    time_name: String,
    channels: Vec<String>,
    /// CSV field index of each channel, parallel to `channels`.
    channel_indices: Vec<usize>,
}

impl ColumnLayout {
    fn from_header(header: &CsvHeader, time_column: Option<&str>) -> Result<Self, DataError> {
        let names = &header.names;
        for (index, name) in names.iter().enumerate() {
            if name.is_empty() {
                return Err(DataError::invalid_at(
                    header.line,
                    None,
                    format!("column {} of the header has no name", index + 1),
                ));
            }
            if names[..index].contains(name) {
                return Err(DataError::invalid_at(
                    header.line,
                    Some(name),
                    "duplicate column name",
                ));
            }
        }
        let time_index = match time_column {
            Some(wanted) => names
                .iter()
                .position(|name| name == wanted.trim())
                .ok_or_else(|| {
                    DataError::invalid_column(
                        wanted,
                        format!(
                            "time column not found; the header has: {}",
                            names.join(", ")
                        ),
                    )
                })?,
            None => names
                .iter()
                .position(|name| {
                    TIME_COLUMN_NAMES
                        .iter()
                        .any(|candidate| name.eq_ignore_ascii_case(candidate))
                })
                .unwrap_or(0),
        };
        let (channel_indices, channels): (Vec<usize>, Vec<String>) = names
            .iter()
            .enumerate()
            .filter(|(index, _)| *index != time_index)
            .map(|(index, name)| (index, name.clone()))
            .unzip();
        if channels.is_empty() {
            return Err(DataError::invalid_at(
                header.line,
                None,
                format!(
                    "no value columns: the header has only the time column '{}'",
                    names[time_index]
                ),
            ));
        }
        if let Some(reserved) = channels.iter().find(|name| *name == RESERVED_CHANNEL_NAME) {
            return Err(DataError::invalid_at(
                header.line,
                Some(reserved),
                "'ts' is reserved for the time column of frames; rename this value column",
            ));
        }
        Ok(Self {
            field_count: names.len(),
            time_index,
            time_name: names[time_index].clone(),
            channels,
            channel_indices,
        })
    }

    /// Positional names for polars, so odd header text never reaches its parser.
    fn polars_schema(&self) -> Schema {
        (0..self.field_count)
            .map(|index| Field::new(field_name(index), DataType::String))
            .collect()
    }
}

fn field_name(index: usize) -> PlSmallStr {
    format!("field_{index}").into()
}

struct ParsedBatch {
    rows: u64,
    cells: u64,
    batch: ObservationBatch,
}

fn parse_chunk(
    chunk: RecordChunk,
    layout: &ColumnLayout,
    timezone: Tz,
) -> Result<ParsedBatch, DataError> {
    let RecordChunk {
        bytes,
        record_lines,
    } = chunk;
    let frame = CsvReadOptions::default()
        .with_has_header(false)
        .with_schema(Some(Arc::new(layout.polars_schema())))
        .map_parse_options(|parse| {
            parse
                .with_separator(SEPARATOR)
                .with_quote_char(Some(QUOTE))
                .with_missing_is_null(true)
        })
        .into_reader_with_file_handle(std::io::Cursor::new(bytes))
        .finish()?;
    if frame.height() != record_lines.len() {
        return Err(DataError::invalid_at(
            record_lines[0],
            None,
            format!(
                "CSV parser read {} records where {} were expected in the chunk starting here",
                frame.height(),
                record_lines.len()
            ),
        ));
    }

    let mut ts_micros = Vec::with_capacity(record_lines.len());
    let times = frame.column(&field_name(layout.time_index))?.str()?;
    for (row, text) in times.iter().enumerate() {
        let micros = parse_timestamp_micros(text.unwrap_or(""), timezone)
            .and_then(|micros| {
                if (MIN_TS_MICROS..=MAX_TS_MICROS).contains(&micros) {
                    Ok(micros)
                } else {
                    let text = text.unwrap_or_default().trim();
                    // Epoch milliseconds are the usual way to get here.
                    let hint = if text
                        .bytes()
                        .all(|b| b.is_ascii_digit() || b == b'.' || b == b'-')
                    {
                        " (epoch numbers are read as seconds)"
                    } else {
                        ""
                    };
                    Err(format!(
                        "timestamp '{text}' lies outside the years 1 to 9999{hint}"
                    ))
                }
            })
            .map_err(|message| {
                DataError::invalid_at(record_lines[row], Some(&layout.time_name), message)
            })?;
        ts_micros.push(micros);
    }

    let mut cells = 0_u64;
    let mut values = Vec::with_capacity(layout.channels.len());
    for (channel, field_index) in layout.channels.iter().zip(&layout.channel_indices) {
        let texts = frame.column(&field_name(*field_index))?.str()?;
        let numbers = texts.cast(&DataType::Float64)?;
        let numbers = numbers.f64()?;
        let mut channel_values = Vec::with_capacity(record_lines.len());
        for (row, (text, number)) in texts.iter().zip(numbers.iter()).enumerate() {
            let value = match (text, number) {
                (None, _) => None,
                (Some(_), Some(number)) => Some(number),
                // polars is strict about surrounding blanks; accept them, and quoted empties.
                (Some(text), None) => parse_value_text(text).map_err(|message| {
                    DataError::invalid_at(record_lines[row], Some(channel), message)
                })?,
            };
            if let Some(number) = value {
                if !number.is_finite() {
                    return Err(DataError::invalid_at(
                        record_lines[row],
                        Some(channel),
                        format!(
                            "value must be finite, found '{}'",
                            text.unwrap_or_default().trim()
                        ),
                    ));
                }
                cells += 1;
            }
            channel_values.push(value);
        }
        values.push(channel_values);
    }
    let rows = ts_micros.len() as u64;
    let (ts_micros, values) = sort_and_merge_duplicates(ts_micros, values);
    Ok(ParsedBatch {
        rows,
        cells,
        batch: ObservationBatch {
            channels: layout.channels.clone(),
            ts_micros,
            values,
        },
    })
}

fn parse_value_text(text: &str) -> Result<Option<f64>, String> {
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Ok(None);
    }
    trimmed
        .parse::<f64>()
        .map(Some)
        .map_err(|_| format!("expected a number, found '{trimmed}'"))
}

/// Orders rows by timestamp and merges rows with equal timestamps: a later row's non-empty
/// cell replaces an earlier one, exactly as importing the rows one at a time would (upsert).
fn sort_and_merge_duplicates(
    ts_micros: Vec<i64>,
    values: Vec<Vec<Option<f64>>>,
) -> (Vec<i64>, Vec<Vec<Option<f64>>>) {
    if ts_micros.windows(2).all(|pair| pair[0] < pair[1]) {
        return (ts_micros, values);
    }
    let mut order: Vec<usize> = (0..ts_micros.len()).collect();
    order.sort_by_key(|row| ts_micros[*row]); // stable: equal timestamps keep file order
    let mut merged_ts: Vec<i64> = Vec::with_capacity(ts_micros.len());
    let mut merged_values: Vec<Vec<Option<f64>>> = values
        .iter()
        .map(|_| Vec::with_capacity(ts_micros.len()))
        .collect();
    for row in order {
        let ts = ts_micros[row];
        let same_as_previous = merged_ts.last() == Some(&ts);
        if !same_as_previous {
            merged_ts.push(ts);
        }
        for (merged, source) in merged_values.iter_mut().zip(&values) {
            match (same_as_previous, source[row]) {
                (false, cell) => merged.push(cell),
                (true, Some(value)) => *merged.last_mut().expect("row pushed above") = Some(value),
                (true, None) => {}
            }
        }
    }
    (merged_ts, merged_values)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(names: &[&str]) -> CsvHeader {
        CsvHeader {
            names: names.iter().map(|name| name.to_string()).collect(),
            line: 1,
        }
    }

    fn layout(names: &[&str]) -> ColumnLayout {
        ColumnLayout::from_header(&header(names), None).unwrap()
    }

    fn chunk(text: &str, first_line: u64) -> RecordChunk {
        let record_lines = (0..text.lines().count() as u64)
            .map(|offset| first_line + offset)
            .collect();
        RecordChunk {
            bytes: text.as_bytes().to_vec(),
            record_lines,
        }
    }

    #[test]
    fn time_column_is_found_by_name_or_defaults_to_the_first() {
        let by_name = layout(&["load", "Timestamp", "temp"]);
        assert_eq!(by_name.time_index, 1);
        assert_eq!(by_name.channels, vec!["load", "temp"]);
        assert_eq!(by_name.channel_indices, vec![0, 2]);
        assert_eq!(layout(&["when", "a"]).time_index, 0);
        let explicit = ColumnLayout::from_header(&header(&["a", "at", "b"]), Some("at")).unwrap();
        assert_eq!(explicit.time_index, 1);
    }

    #[test]
    fn header_problems_name_the_column() {
        let err = |names: &[&str], time: Option<&str>| {
            ColumnLayout::from_header(&header(names), time)
                .unwrap_err()
                .to_string()
        };
        assert_eq!(
            err(&["ts", "a", "a"], None),
            "line 1, column 'a': duplicate column name"
        );
        assert!(err(&["ts"], None).contains("no value columns"));
        assert!(err(&["a", "b"], Some("when")).starts_with("column 'when': time column not found"));
        assert!(err(&["when", "ts"], Some("when")).contains("column 'ts'"));
        assert!(err(&["ts", ""], None).contains("column 2 of the header has no name"));
    }

    #[test]
    fn chunk_parses_values_blanks_and_missing_cells() {
        let layout = layout(&["ts", "a", "b"]);
        let parsed = parse_chunk(chunk("1,1.5, 2 \n2,,\"\"\n3,-4e2,7\n", 2), &layout, Tz::UTC)
            .unwrap_or_else(|err| panic!("{err}"));
        assert_eq!(parsed.rows, 3);
        assert_eq!(parsed.cells, 4);
        assert_eq!(
            parsed.batch.ts_micros,
            vec![1_000_000, 2_000_000, 3_000_000]
        );
        assert_eq!(parsed.batch.values[0], vec![Some(1.5), None, Some(-400.0)]);
        assert_eq!(parsed.batch.values[1], vec![Some(2.0), None, Some(7.0)]);
    }

    #[test]
    fn chunk_errors_name_line_and_column() {
        let layout = layout(&["ts", "a", "b"]);
        let err = |text: &str| {
            parse_chunk(chunk(text, 2), &layout, Tz::UTC)
                .err()
                .expect("chunk should be rejected")
                .to_string()
        };
        assert!(
            err("1,1,2\n2,1,abc\n")
                .starts_with("line 3, column 'b': expected a number, found 'abc'")
        );
        assert!(
            err("1,1,2\nsoon,1,2\n")
                .starts_with("line 3, column 'ts': cannot parse timestamp 'soon'")
        );
        assert_eq!(
            err("1,NaN,2\n"),
            "line 2, column 'a': value must be finite, found 'NaN'"
        );
        assert_eq!(
            err("1,1,-inf\n"),
            "line 2, column 'b': value must be finite, found '-inf'"
        );
        assert!(err(",1,2\n").starts_with("line 2, column 'ts': timestamp is empty"));
        assert!(
            err("1700000000000,1,2\n")
                .ends_with("outside the years 1 to 9999 (epoch numbers are read as seconds)")
        );
    }

    #[test]
    fn duplicates_merge_with_later_cells_winning_and_rows_get_sorted() {
        let (ts, values) = sort_and_merge_duplicates(
            vec![30, 10, 30, 20],
            vec![
                vec![Some(1.0), Some(2.0), Some(3.0), None],
                vec![Some(5.0), None, None, Some(6.0)],
            ],
        );
        assert_eq!(ts, vec![10, 20, 30]);
        assert_eq!(values[0], vec![Some(2.0), None, Some(3.0)]);
        assert_eq!(values[1], vec![None, Some(6.0), Some(5.0)]);
    }
}
