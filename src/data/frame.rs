//! Wide, regular frames of a series: what models train on and what `export` writes.
//!
//! Long observations (channel, ts, value) are pivoted to one column per channel on a regular
//! time grid:
//! - the step is `FrameOptions::frequency` (to resample), else the series' frequency, else
//!   inferred (the most common positive step between distinct timestamps);
//! - buckets are aligned to the Unix epoch in UTC and labelled by their start; a bucket holds
//!   the mean of the observations inside it (so duplicates and sub-step jitter average out);
//! - the grid runs from the first to the last bucket holding data, with empty buckets
//!   inserted;
//! - a run of at most `interpolation_limit` empty buckets between two filled ones is filled
//!   by linear interpolation; longer runs, and runs at either end, stay missing.
//!
//! Missing cells are null in [`SeriesFrame::data`] and `true` in the separate boolean frame
//! [`SeriesFrame::missing`]. Calendar features are computed in the series' time zone, where
//! hours of the day shift at daylight-saving changes.

use std::f64::consts::TAU;

use chrono::{DateTime, Datelike, TimeZone, Timelike, Utc};
use chrono_tz::Tz;
use polars::prelude::*;

use super::error::DataError;
use super::frequency::{Frequency, infer_frequency};
use super::ingest::RESERVED_CHANNEL_NAME;
use crate::store::{LongObservations, Store, StoreError};

/// Upper bound on grid cells (rows × channels), so that a too-fine frequency over a long
/// range fails clearly instead of exhausting memory.
pub const MAX_FRAME_CELLS: usize = 200_000_000;

/// Calendar features per instant (the length of [`CALENDAR_COLUMNS`]).
pub const CALENDAR_FEATURES: usize = 6;

/// Calendar feature columns, in order, each in [-1, 1]: hour of day (with minutes and
/// seconds as a fraction), day of week (Monday = 0) and day of year (1 January = 0, over the
/// length of that year), as sine/cosine pairs so that the cycle wraps smoothly.
pub const CALENDAR_COLUMNS: [&str; CALENDAR_FEATURES] = [
    "hour_sin",
    "hour_cos",
    "weekday_sin",
    "weekday_cos",
    "yearday_sin",
    "yearday_cos",
];

#[derive(Debug, Clone)]
pub struct FrameOptions {
    /// Grid step, to resample (e.g. an hourly series to 1d); default: the series' recorded
    /// frequency, else inferred from the data.
    pub frequency: Option<Frequency>,
    /// Longest run of empty buckets filled by linear interpolation; 0 disables filling.
    pub interpolation_limit: usize,
    /// Append the [`CALENDAR_COLUMNS`] to `data`.
    pub calendar_features: bool,
    /// Only these channels, in this order; default: all, in the series' order.
    pub channels: Option<Vec<String>>,
}

impl FrameOptions {
    /// The frame a forecaster trains on and forecasts from: the defaults, with the calendar
    /// features (a model may take them as covariates).
    pub fn for_forecasting() -> Self {
        Self {
            calendar_features: true,
            ..Self::default()
        }
    }
}

impl Default for FrameOptions {
    fn default() -> Self {
        Self {
            frequency: None,
            interpolation_limit: 3,
            calendar_features: false,
            channels: None,
        }
    }
}

/// A regularised wide frame of one series.
pub struct SeriesFrame {
    pub series: String,
    pub frequency: Frequency,
    pub timezone: Tz,
    pub channels: Vec<String>,
    /// `ts` (Datetime µs, UTC; bucket start), one Float64 column per channel (null where
    /// missing), then the calendar columns when requested.
    pub data: DataFrame,
    /// `ts` and one Boolean column per channel: `true` where the cell is missing (no
    /// observation in the bucket and not filled by interpolation).
    pub missing: DataFrame,
}

/// Channel values laid out for tensors.
#[derive(Debug, Clone, PartialEq)]
pub struct ChannelMatrix {
    pub steps: usize,
    pub channels: usize,
    /// Row-major `[step, channel]`; missing cells hold 0.0.
    pub values: Vec<f32>,
    /// Row-major `[step, channel]`; `true` where the cell is missing.
    pub missing: Vec<bool>,
    /// Row-major `[step, CALENDAR_FEATURES]`: each row's [`calendar_features`], when the rows'
    /// times are known.
    pub calendar: Option<Vec<f32>>,
}

impl SeriesFrame {
    pub fn height(&self) -> usize {
        self.data.height()
    }

    /// Bucket start times as epoch microseconds (UTC).
    pub fn ts_micros(&self) -> Result<Vec<i64>, DataError> {
        let ts = self.data.column("ts")?.datetime()?;
        Ok(ts.physical().into_no_null_iter().collect())
    }

    /// The channel columns as one contiguous `[time, channel]` matrix plus its missing mask.
    pub fn channel_matrix(&self) -> Result<ChannelMatrix, DataError> {
        let steps = self.data.height();
        let channel_count = self.channels.len();
        let mut values = vec![0.0_f32; steps * channel_count];
        let mut missing = vec![true; steps * channel_count];
        for (channel_index, channel) in self.channels.iter().enumerate() {
            let column = self.data.column(channel)?.f64()?;
            for (step, value) in column.iter().enumerate() {
                if let Some(value) = value {
                    values[step * channel_count + channel_index] = value as f32;
                    missing[step * channel_count + channel_index] = false;
                }
            }
        }
        let calendar = if self.data.column(CALENDAR_COLUMNS[0]).is_ok() {
            let columns = CALENDAR_COLUMNS
                .iter()
                .map(|name| Ok(self.data.column(name)?.f64()?.clone()))
                .collect::<Result<Vec<_>, DataError>>()?;
            let mut rows = Vec::with_capacity(steps * CALENDAR_FEATURES);
            for step in 0..steps {
                rows.extend(
                    columns
                        .iter()
                        .map(|column| column.get(step).unwrap_or(0.0) as f32),
                );
            }
            Some(rows)
        } else {
            None
        };
        Ok(ChannelMatrix {
            steps,
            channels: channel_count,
            values,
            missing,
            calendar,
        })
    }
}

/// Loads `series` between `from` and `to` (inclusive, either open) as a regular wide frame.
pub async fn load_frame(
    store: &dyn Store,
    series: &str,
    from: Option<DateTime<Utc>>,
    to: Option<DateTime<Utc>>,
    options: &FrameOptions,
) -> Result<SeriesFrame, DataError> {
    let record = store
        .get_series(series)
        .await?
        .ok_or_else(|| DataError::UnknownSeries {
            name: series.to_string(),
        })?;
    let timezone: Tz = record.timezone.parse().map_err(|_| {
        DataError::invalid(format!(
            "series '{series}' has time zone '{}', which is not a known IANA name",
            record.timezone
        ))
    })?;
    let recorded_frequency = record
        .frequency
        .as_deref()
        .map(Frequency::parse)
        .transpose()
        .map_err(|err| {
            DataError::invalid(format!(
                "series '{series}' has an unusable frequency: {err}"
            ))
        })?;
    if let Some(wanted) = &options.channels
        && let Some(unknown) = wanted
            .iter()
            .find(|channel| !record.channels.contains(channel))
    {
        return Err(DataError::invalid_column(
            unknown,
            format!(
                "not a channel of series '{series}' (its channels: {})",
                record.channels.join(", ")
            ),
        ));
    }
    let observations = store
        .load_observations(
            series,
            from.map(|at| at.timestamp_micros()),
            to.map(|at| at.timestamp_micros()),
            options.channels.as_deref(),
        )
        .await
        .map_err(|err| match err {
            // The series was deleted between the two queries.
            StoreError::NotFound { .. } => DataError::UnknownSeries {
                name: series.to_string(),
            },
            other => DataError::Store(other),
        })?;
    build_frame(series, recorded_frequency, timezone, &observations, options)
}

/// Builds the frame from long observations in any order, duplicates allowed; see the module
/// documentation. `recorded_frequency` is the series' own frequency, if it has one.
pub fn build_frame(
    series: &str,
    recorded_frequency: Option<Frequency>,
    timezone: Tz,
    observations: &LongObservations,
    options: &FrameOptions,
) -> Result<SeriesFrame, DataError> {
    let LongObservations {
        channels: all_channels,
        channel,
        ts_micros,
        value,
    } = observations;
    if channel.len() != ts_micros.len() || value.len() != ts_micros.len() {
        return Err(DataError::invalid(format!(
            "long observations of series '{series}' have {} channels, {} timestamps and {} values",
            channel.len(),
            ts_micros.len(),
            value.len()
        )));
    }
    let selected: Vec<String> = options
        .channels
        .clone()
        .unwrap_or_else(|| all_channels.clone());
    // Frame column position of each series channel (None: not selected).
    let mut frame_column_of: Vec<Option<usize>> = vec![None; all_channels.len()];
    for (position, name) in selected.iter().enumerate() {
        if selected[..position].contains(name) {
            return Err(DataError::invalid_column(name, "channel selected twice"));
        }
        let index = all_channels
            .iter()
            .position(|candidate| candidate == name)
            .ok_or_else(|| {
                DataError::invalid_column(name, format!("not a channel of series '{series}'"))
            })?;
        frame_column_of[index] = Some(position);
    }
    let reserved = std::iter::once(RESERVED_CHANNEL_NAME).chain(
        options
            .calendar_features
            .then_some(CALENDAR_COLUMNS)
            .into_iter()
            .flatten(),
    );
    for name in reserved {
        if selected.iter().any(|channel| channel == name) {
            return Err(DataError::invalid_column(
                name,
                "channel name clashes with a frame column of the same name; rename the channel",
            ));
        }
    }

    let frequency = match options.frequency.or(recorded_frequency) {
        Some(frequency) => frequency,
        None => {
            let mut distinct = ts_micros.clone();
            if !distinct.is_sorted() {
                distinct.sort_unstable();
            }
            distinct.dedup();
            infer_frequency(&distinct).ok_or_else(|| {
                DataError::invalid(format!(
                    "cannot infer the frequency of series '{series}': it needs observations at \
                     two or more distinct times in the range, or a frequency given explicitly"
                ))
            })?
        }
    };
    let step = frequency.micros();

    let (first_bucket, bucket_count) = match (ts_micros.iter().min(), ts_micros.iter().max()) {
        (Some(&first), Some(&last)) => {
            let first_bucket = frequency.bucket_start(first);
            let span = (frequency.bucket_start(last) - first_bucket) / step;
            let bucket_count = usize::try_from(span)
                .ok()
                .and_then(|span| span.checked_add(1));
            match bucket_count
                .filter(|count| count.saturating_mul(selected.len().max(1)) <= MAX_FRAME_CELLS)
            {
                Some(count) => (first_bucket, count),
                None => {
                    return Err(DataError::invalid(format!(
                        "a frame of series '{series}' at frequency {frequency} would have {} rows \
                         × {} channels, over the limit of {MAX_FRAME_CELLS} cells; use a coarser \
                         frequency or a shorter range",
                        span.saturating_add(1),
                        selected.len()
                    )));
                }
            }
        }
        _ => (0, 0),
    };

    // Column-major sums and counts per (frame channel, bucket).
    let mut sums = vec![0.0_f64; selected.len() * bucket_count];
    let mut counts = vec![0_u32; selected.len() * bucket_count];
    for ((&channel_index, &ts), &cell) in channel.iter().zip(ts_micros).zip(value) {
        let frame_column = frame_column_of.get(channel_index as usize).ok_or_else(|| {
            DataError::invalid(format!(
                "long observations of series '{series}' refer to channel index {channel_index}, \
                     but the series has {} channels",
                all_channels.len()
            ))
        })?;
        if let Some(frame_column) = frame_column {
            let bucket = ((frequency.bucket_start(ts) - first_bucket) / step) as usize;
            sums[frame_column * bucket_count + bucket] += cell;
            counts[frame_column * bucket_count + bucket] += 1;
        }
    }

    let ts: Vec<i64> = (0..bucket_count as i64)
        .map(|bucket| first_bucket + bucket * step)
        .collect();
    let ts_column = Int64Chunked::from_vec("ts".into(), ts.clone())
        .into_datetime(TimeUnit::Microseconds, Some(polars::prelude::TimeZone::UTC))
        .into_column();
    let mut data_columns = Vec::with_capacity(1 + selected.len() + CALENDAR_COLUMNS.len());
    let mut missing_columns = Vec::with_capacity(1 + selected.len());
    data_columns.push(ts_column.clone());
    missing_columns.push(ts_column);
    for (frame_column, name) in selected.iter().enumerate() {
        let range = frame_column * bucket_count..(frame_column + 1) * bucket_count;
        let mut cells: Vec<Option<f64>> = sums[range.clone()]
            .iter()
            .zip(&counts[range])
            .map(|(sum, count)| (*count > 0).then(|| sum / f64::from(*count)))
            .collect();
        interpolate_short_gaps(&mut cells, options.interpolation_limit);
        let missing: Vec<bool> = cells.iter().map(Option::is_none).collect();
        data_columns.push(Float64Chunked::from_slice_options(name.into(), &cells).into_column());
        missing_columns.push(BooleanChunked::from_slice(name.into(), &missing).into_column());
    }
    if options.calendar_features {
        data_columns.extend(calendar_columns(&ts, timezone));
    }
    Ok(SeriesFrame {
        series: series.to_string(),
        frequency,
        timezone,
        channels: selected,
        data: DataFrame::new(bucket_count, data_columns)?,
        missing: DataFrame::new(bucket_count, missing_columns)?,
    })
}

/// Fills each run of at most `limit` missing cells that has values on both sides by linear
/// interpolation between those values; leaves longer runs and runs at the ends missing.
fn interpolate_short_gaps(cells: &mut [Option<f64>], limit: usize) {
    if limit == 0 {
        return;
    }
    let mut previous: Option<(usize, f64)> = None;
    for index in 0..cells.len() {
        let Some(value) = cells[index] else { continue };
        if let Some((previous_index, previous_value)) = previous {
            let gap = index - previous_index - 1;
            if (1..=limit).contains(&gap) {
                let slope = (value - previous_value) / (gap + 1) as f64;
                for offset in 1..=gap {
                    cells[previous_index + offset] = Some(previous_value + slope * offset as f64);
                }
            }
        }
        previous = Some((index, value));
    }
}

/// The [`CALENDAR_COLUMNS`] of the instant `micros` (epoch microseconds) in `timezone`.
pub fn calendar_features(micros: i64, timezone: Tz) -> [f64; CALENDAR_FEATURES] {
    let local = timezone
        .timestamp_micros(micros)
        .single()
        .expect("a UTC instant maps to exactly one local time");
    let hour = f64::from(local.hour())
        + f64::from(local.minute()) / 60.0
        + f64::from(local.second()) / 3600.0;
    let weekday = f64::from(local.weekday().num_days_from_monday());
    let days_in_year = if local.date_naive().leap_year() {
        366.0
    } else {
        365.0
    };
    let yearday = f64::from(local.ordinal0());
    let angles = [
        TAU * hour / 24.0,
        TAU * weekday / 7.0,
        TAU * yearday / days_in_year,
    ];
    let mut features = [0.0; CALENDAR_FEATURES];
    for (pair, angle) in angles.into_iter().enumerate() {
        features[2 * pair] = angle.sin();
        features[2 * pair + 1] = angle.cos();
    }
    features
}

/// [`calendar_features`] of each instant, row-major `[instant, CALENDAR_FEATURES]`.
pub fn calendar_rows(ts_micros: &[i64], timezone: Tz) -> Vec<f32> {
    ts_micros
        .iter()
        .flat_map(|&micros| calendar_features(micros, timezone).map(|value| value as f32))
        .collect()
}

fn calendar_columns(ts_micros: &[i64], timezone: Tz) -> Vec<Column> {
    let rows: Vec<[f64; CALENDAR_FEATURES]> = ts_micros
        .iter()
        .map(|&micros| calendar_features(micros, timezone))
        .collect();
    CALENDAR_COLUMNS
        .iter()
        .enumerate()
        .map(|(index, name)| {
            let values: Vec<f64> = rows.iter().map(|row| row[index]).collect();
            Float64Chunked::from_vec((*name).into(), values).into_column()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: i64 = 3_600_000_000;

    fn long(channels: &[&str], cells: &[(u32, i64, f64)]) -> LongObservations {
        LongObservations {
            channels: channels.iter().map(|name| name.to_string()).collect(),
            channel: cells.iter().map(|cell| cell.0).collect(),
            ts_micros: cells.iter().map(|cell| cell.1).collect(),
            value: cells.iter().map(|cell| cell.2).collect(),
        }
    }

    fn column(frame: &SeriesFrame, name: &str) -> Vec<Option<f64>> {
        frame
            .data
            .column(name)
            .unwrap()
            .f64()
            .unwrap()
            .iter()
            .collect()
    }

    #[test]
    fn interpolation_fills_only_short_interior_gaps() {
        let mut cells = vec![
            None,
            Some(0.0),
            None,
            None,
            Some(3.0),
            None,
            None,
            None,
            None,
            Some(9.0),
            None,
        ];
        interpolate_short_gaps(&mut cells, 3);
        assert_eq!(
            cells,
            vec![
                None,
                Some(0.0),
                Some(1.0),
                Some(2.0),
                Some(3.0),
                None,
                None,
                None,
                None,
                Some(9.0),
                None
            ]
        );
        let mut untouched = vec![Some(1.0), None, Some(3.0)];
        interpolate_short_gaps(&mut untouched, 0);
        assert_eq!(untouched, vec![Some(1.0), None, Some(3.0)]);
    }

    #[test]
    fn pivots_unsorted_long_rows_and_averages_within_buckets() {
        let observations = long(
            &["a", "b"],
            &[
                (1, 2 * HOUR, 20.0),
                (0, HOUR + 60_000_000, 3.0),
                (0, 0, 1.0),
                (0, HOUR, 1.0),
                (1, 0, 10.0),
                (0, 2 * HOUR, 5.0),
            ],
        );
        let frame = build_frame(
            "s",
            Frequency::from_micros(HOUR),
            Tz::UTC,
            &observations,
            &FrameOptions::default(),
        )
        .unwrap();
        assert_eq!(frame.ts_micros().unwrap(), vec![0, HOUR, 2 * HOUR]);
        assert_eq!(column(&frame, "a"), vec![Some(1.0), Some(2.0), Some(5.0)]);
        assert_eq!(
            column(&frame, "b"),
            vec![Some(10.0), Some(15.0), Some(20.0)]
        );
    }

    #[test]
    fn missing_mask_and_matrix_agree() {
        let observations = long(&["a"], &[(0, 0, 1.0), (0, 6 * HOUR, 7.0)]);
        let options = FrameOptions {
            interpolation_limit: 2,
            ..FrameOptions::default()
        };
        let frame = build_frame(
            "s",
            Frequency::from_micros(HOUR),
            Tz::UTC,
            &observations,
            &options,
        )
        .unwrap();
        assert_eq!(frame.height(), 7);
        let missing: Vec<bool> = frame
            .missing
            .column("a")
            .unwrap()
            .bool()
            .unwrap()
            .iter()
            .map(|cell| cell.unwrap())
            .collect();
        assert_eq!(missing, vec![false, true, true, true, true, true, false]);
        let matrix = frame.channel_matrix().unwrap();
        assert_eq!(matrix.missing, missing);
        assert_eq!(matrix.values, vec![1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 7.0]);
    }

    #[test]
    fn infers_frequency_when_none_is_recorded_or_given() {
        let observations = long(
            &["a"],
            &[
                (0, 0, 1.0),
                (0, 15 * 60_000_000, 2.0),
                (0, 30 * 60_000_000, 3.0),
                (0, 60 * 60_000_000, 5.0),
            ],
        );
        let frame =
            build_frame("s", None, Tz::UTC, &observations, &FrameOptions::default()).unwrap();
        assert_eq!(frame.frequency.to_string(), "15m");
        assert_eq!(
            column(&frame, "a"),
            vec![Some(1.0), Some(2.0), Some(3.0), Some(4.0), Some(5.0)]
        );
        let single = long(&["a"], &[(0, 0, 1.0)]);
        let err = build_frame("s", None, Tz::UTC, &single, &FrameOptions::default())
            .err()
            .unwrap();
        assert!(
            err.to_string().contains("cannot infer the frequency"),
            "{err}"
        );
    }

    #[test]
    fn the_option_resamples_over_the_recorded_frequency() {
        let observations = long(&["a"], &[(0, 0, 1.0), (0, HOUR, 3.0), (0, 2 * HOUR, 8.0)]);
        let recorded = Frequency::from_micros(HOUR);
        let frame = build_frame(
            "s",
            recorded,
            Tz::UTC,
            &observations,
            &FrameOptions::default(),
        )
        .unwrap();
        assert_eq!(frame.height(), 3);
        let options = FrameOptions {
            frequency: Frequency::from_micros(2 * HOUR),
            ..FrameOptions::default()
        };
        let frame = build_frame("s", recorded, Tz::UTC, &observations, &options).unwrap();
        assert_eq!(frame.frequency, options.frequency.unwrap());
        assert_eq!(column(&frame, "a"), vec![Some(2.0), Some(8.0)]);
    }

    #[test]
    fn selects_and_orders_channels() {
        let observations = long(&["a", "b", "c"], &[(0, 0, 1.0), (1, 0, 2.0), (2, 0, 3.0)]);
        let options = FrameOptions {
            channels: Some(vec!["c".into(), "a".into()]),
            ..FrameOptions::default()
        };
        let frame = build_frame(
            "s",
            Frequency::from_micros(HOUR),
            Tz::UTC,
            &observations,
            &options,
        )
        .unwrap();
        let names: Vec<String> = frame
            .data
            .get_column_names()
            .iter()
            .map(|name| name.to_string())
            .collect();
        assert_eq!(names, vec!["ts", "c", "a"]);
        assert_eq!(frame.channel_matrix().unwrap().values, vec![3.0, 1.0]);
    }

    #[test]
    fn empty_range_gives_an_empty_frame_when_the_frequency_is_known() {
        let frame = build_frame(
            "s",
            Frequency::from_micros(HOUR),
            Tz::UTC,
            &long(&["a"], &[]),
            &FrameOptions::default(),
        )
        .unwrap();
        assert_eq!(frame.height(), 0);
        assert_eq!(frame.data.width(), 2);
    }

    #[test]
    fn refuses_grids_over_the_cell_limit() {
        let observations = long(&["a"], &[(0, 0, 1.0), (0, 400 * 24 * HOUR, 2.0)]);
        let err = build_frame(
            "s",
            Frequency::from_micros(1),
            Tz::UTC,
            &observations,
            &FrameOptions::default(),
        )
        .err()
        .unwrap();
        assert!(err.to_string().contains("coarser frequency"), "{err}");
    }

    #[test]
    fn calendar_features_follow_local_time_across_dst() {
        // Berlin springs forward on 2024-03-31 at 01:00 UTC: 00:00 UTC is 01:00 local,
        // 01:00 UTC is already 03:00 local.
        let midnight_utc = chrono::DateTime::parse_from_rfc3339("2024-03-31T00:00:00Z")
            .unwrap()
            .timestamp_micros();
        let observations = long(
            &["a"],
            &[(0, midnight_utc, 1.0), (0, midnight_utc + HOUR, 2.0)],
        );
        let options = FrameOptions {
            calendar_features: true,
            ..FrameOptions::default()
        };
        let frame = build_frame(
            "s",
            Frequency::from_micros(HOUR),
            chrono_tz::Europe::Berlin,
            &observations,
            &options,
        )
        .unwrap();
        let hour_sin = column(&frame, "hour_sin");
        let hour_cos = column(&frame, "hour_cos");
        let local_hour = |row: usize| {
            (hour_sin[row].unwrap().atan2(hour_cos[row].unwrap()) / TAU * 24.0).rem_euclid(24.0)
        };
        assert!((local_hour(0) - 1.0).abs() < 1e-9);
        assert!((local_hour(1) - 3.0).abs() < 1e-9);
        // 2024-03-31 is a Sunday (6 days after Monday) and day 90 (0-based) of a leap year.
        let weekday = column(&frame, "weekday_sin")[0]
            .unwrap()
            .atan2(column(&frame, "weekday_cos")[0].unwrap());
        assert!((weekday.rem_euclid(TAU) - TAU * 6.0 / 7.0).abs() < 1e-9);
        let yearday = column(&frame, "yearday_sin")[0]
            .unwrap()
            .atan2(column(&frame, "yearday_cos")[0].unwrap());
        assert!((yearday - TAU * 90.0 / 366.0).abs() < 1e-9);
        // The tensor layout carries the same features, row by row.
        let calendar = frame.channel_matrix().unwrap().calendar.unwrap();
        assert_eq!(calendar.len(), 2 * CALENDAR_FEATURES);
        for (feature, name) in CALENDAR_COLUMNS.iter().enumerate() {
            for row in 0..2 {
                let expected = column(&frame, name)[row].unwrap() as f32;
                assert_eq!(calendar[row * CALENDAR_FEATURES + feature], expected);
            }
        }
        let plain = build_frame(
            "s",
            Frequency::from_micros(HOUR),
            chrono_tz::Europe::Berlin,
            &observations,
            &FrameOptions::default(),
        )
        .unwrap();
        assert_eq!(plain.channel_matrix().unwrap().calendar, None);
    }

    #[test]
    fn channel_names_may_not_clash_with_frame_columns() {
        let observations = long(&["hour_sin"], &[(0, 0, 1.0)]);
        let options = FrameOptions {
            calendar_features: true,
            ..FrameOptions::default()
        };
        let err = build_frame(
            "s",
            Frequency::from_micros(HOUR),
            Tz::UTC,
            &observations,
            &options,
        )
        .err()
        .unwrap();
        assert!(err.to_string().starts_with("column 'hour_sin'"), "{err}");
    }
}
