//! Checks both backends apply before writing, so that both reject the same
//! input with the same error, and the batch flattening they share.

use super::{
    NewForecast, NewModelVersion, NewRun, ObservationBatch, ScheduleSpec, SeriesSpec, StoreError,
};

/// 0001-01-01T00:00:00Z: the earliest timestamp both backends store.
pub const MIN_TS_MICROS: i64 = -62_135_596_800_000_000;
/// 9999-12-31T23:59:59.999999Z: the latest timestamp both backends store.
pub const MAX_TS_MICROS: i64 = 253_402_300_799_999_999;

/// Channels are stored as a small integer index into the series' channel list.
const MAX_CHANNELS: usize = i16::MAX as usize;

/// Series names appear in URL paths and file names, so they are limited to
/// characters that never need escaping there.
pub const MAX_SERIES_NAME_CHARS: usize = 128;

pub(crate) fn series_spec(spec: &SeriesSpec) -> Result<(), StoreError> {
    series_name(&spec.name)?;
    if let Some(frequency) = &spec.frequency
        && frequency.trim().is_empty()
    {
        return Err(StoreError::invalid(
            "frequency",
            "must not be empty when given",
        ));
    }
    timezone("timezone", &spec.timezone)?;
    if spec.channels.is_empty() {
        return Err(StoreError::invalid(
            "channels",
            format!("series '{}' needs at least one channel", spec.name),
        ));
    }
    if spec.channels.len() > MAX_CHANNELS {
        return Err(StoreError::invalid(
            "channels",
            format!(
                "{} channels given, at most {MAX_CHANNELS} are supported",
                spec.channels.len()
            ),
        ));
    }
    distinct_names("channels", &spec.channels)?;
    Ok(())
}

/// The rule every series name follows, whichever way the series is created
/// (HTTP, CLI import, quick start).
pub fn series_name(name: &str) -> Result<(), StoreError> {
    let problem = if name.is_empty() {
        "the series name must not be empty".to_string()
    } else if name.chars().count() > MAX_SERIES_NAME_CHARS {
        format!("must be at most {MAX_SERIES_NAME_CHARS} characters")
    } else if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')))
    {
        format!("'{bad}' is not allowed; use letters, digits, '_', '-' and '.'")
    } else if name.starts_with('.') {
        "must not start with '.'".to_string()
    } else {
        return Ok(());
    };
    Err(StoreError::invalid("name", problem))
}

/// Parses a cron expression the way the scheduler reads it: six fields,
/// seconds first (`sec min hour day-of-month month day-of-week`).
pub fn cron_expression(expression: &str) -> Result<croner::Cron, StoreError> {
    let fields = expression.split_whitespace().count();
    if fields != 6 {
        return Err(StoreError::invalid(
            "cron",
            format!(
                "'{expression}' has {fields} fields; expected 6: second minute hour day-of-month month day-of-week (e.g. '0 0 * * * *' for hourly)"
            ),
        ));
    }
    croner::parser::CronParser::builder()
        .seconds(croner::parser::Seconds::Required)
        .dom_and_dow(true)
        .build()
        .parse(expression)
        .map_err(|err| StoreError::invalid("cron", format!("'{expression}': {err}")))
}

pub(crate) fn timezone(field: &'static str, name: &str) -> Result<(), StoreError> {
    name.parse::<chrono_tz::Tz>().map(|_| ()).map_err(|_| {
        StoreError::invalid(
            field,
            format!("'{name}' is not an IANA time zone name (e.g. UTC, Europe/Berlin)"),
        )
    })
}

fn distinct_names(field: &'static str, names: &[String]) -> Result<(), StoreError> {
    let mut seen = std::collections::HashSet::with_capacity(names.len());
    for name in names {
        if name.is_empty() {
            return Err(StoreError::invalid(
                field,
                "channel names must not be empty",
            ));
        }
        if !seen.insert(name.as_str()) {
            return Err(StoreError::invalid(
                field,
                format!("channel '{name}' is listed twice"),
            ));
        }
    }
    Ok(())
}

/// The index of each of `requested` in the series' `known` channels.
pub(crate) fn channel_indices(
    series: &str,
    known: &[String],
    requested: &[String],
) -> Result<Vec<i16>, StoreError> {
    requested
        .iter()
        .map(|name| {
            known
                .iter()
                .position(|known_name| known_name == name)
                .map(|index| index as i16)
                .ok_or_else(|| {
                    StoreError::invalid(
                        "channels",
                        format!(
                            "unknown channel '{name}' for existing series '{series}' (known: {})",
                            known.join(", ")
                        ),
                    )
                })
        })
        .collect()
}

/// The present cells of a batch in long form: ordered by the batch's row
/// order, then by the series' channel order, which is the key order when the
/// rows are sorted by time (inserting in key order keeps the index writes cheap).
#[derive(Debug, Default)]
pub(crate) struct LongCells {
    pub channel: Vec<i16>,
    pub ts_micros: Vec<i64>,
    pub value: Vec<f64>,
    pub first_ts_micros: Option<i64>,
    pub last_ts_micros: Option<i64>,
}

impl LongCells {
    pub fn len(&self) -> usize {
        self.value.len()
    }
}

pub(crate) fn flatten_batch(
    series: &str,
    known: &[String],
    batch: &ObservationBatch,
) -> Result<LongCells, StoreError> {
    distinct_names("channels", &batch.channels)?;
    let indices = channel_indices(series, known, &batch.channels)?;
    if batch.values.len() != batch.channels.len() {
        return Err(StoreError::invalid(
            "values",
            format!(
                "{} value columns for {} channels",
                batch.values.len(),
                batch.channels.len()
            ),
        ));
    }
    let rows = batch.ts_micros.len();
    for (name, column) in batch.channels.iter().zip(&batch.values) {
        if column.len() != rows {
            return Err(StoreError::invalid(
                "values",
                format!(
                    "channel '{name}' has {} values for {rows} timestamps",
                    column.len()
                ),
            ));
        }
    }
    unique_in_range_timestamps(&batch.ts_micros)?;

    let mut column_order: Vec<usize> = (0..indices.len()).collect();
    column_order.sort_by_key(|&column| indices[column]);

    let present = batch
        .values
        .iter()
        .map(|column| column.iter().filter(|cell| cell.is_some()).count())
        .sum();
    let mut cells = LongCells {
        channel: Vec::with_capacity(present),
        ts_micros: Vec::with_capacity(present),
        value: Vec::with_capacity(present),
        ..LongCells::default()
    };
    for (row, &ts) in batch.ts_micros.iter().enumerate() {
        let mut row_has_value = false;
        for &column in &column_order {
            if let Some(value) = batch.values[column][row] {
                if !value.is_finite() {
                    return Err(StoreError::invalid(
                        "values",
                        format!(
                            "channel '{}' at {ts} µs is {value}; only finite numbers are stored",
                            batch.channels[column]
                        ),
                    ));
                }
                cells.channel.push(indices[column]);
                cells.ts_micros.push(ts);
                cells.value.push(value);
                row_has_value = true;
            }
        }
        if row_has_value {
            cells.first_ts_micros = Some(cells.first_ts_micros.map_or(ts, |first| first.min(ts)));
            cells.last_ts_micros = Some(cells.last_ts_micros.map_or(ts, |last| last.max(ts)));
        }
    }
    Ok(cells)
}

/// Rejects timestamps outside what both backends store, and repeated ones (an
/// upsert statement may not touch the same key twice).
fn unique_in_range_timestamps(ts_micros: &[i64]) -> Result<(), StoreError> {
    if let Some(&bad) = ts_micros
        .iter()
        .find(|&&ts| !(MIN_TS_MICROS..=MAX_TS_MICROS).contains(&ts))
    {
        return Err(StoreError::invalid(
            "ts_micros",
            format!("{bad} µs lies outside the years 1 to 9999"),
        ));
    }
    let strictly_increasing = ts_micros.windows(2).all(|pair| pair[0] < pair[1]);
    if !strictly_increasing {
        let mut sorted = ts_micros.to_vec();
        sorted.sort_unstable();
        if let Some(pair) = sorted.windows(2).find(|pair| pair[0] == pair[1]) {
            return Err(StoreError::invalid(
                "ts_micros",
                format!("timestamp {} µs appears twice in one batch", pair[0]),
            ));
        }
    }
    Ok(())
}

pub(crate) fn min_option(a: Option<i64>, b: Option<i64>) -> Option<i64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

pub(crate) fn max_option(a: Option<i64>, b: Option<i64>) -> Option<i64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    }
}

pub(crate) fn load_bounds(
    from_micros: Option<i64>,
    to_micros: Option<i64>,
) -> Result<(i64, i64), StoreError> {
    let from = from_micros.unwrap_or(MIN_TS_MICROS).max(MIN_TS_MICROS);
    let to = to_micros.unwrap_or(MAX_TS_MICROS).min(MAX_TS_MICROS);
    if let (Some(from), Some(to)) = (from_micros, to_micros)
        && from > to
    {
        return Err(StoreError::invalid(
            "from",
            format!("from ({from} µs) is after to ({to} µs)"),
        ));
    }
    Ok((from, to))
}

pub(crate) fn new_model_version(version: &NewModelVersion) -> Result<(), StoreError> {
    if version.data_from > version.data_to {
        return Err(StoreError::invalid(
            "data_from",
            format!(
                "data_from ({}) is after data_to ({})",
                version.data_from, version.data_to
            ),
        ));
    }
    if version.artefact.is_empty() {
        return Err(StoreError::invalid(
            "artefact",
            "the model artefact is empty",
        ));
    }
    Ok(())
}

pub(crate) fn new_run(run: &NewRun) -> Result<(), StoreError> {
    if run.max_attempts < 1 {
        return Err(StoreError::invalid(
            "max_attempts",
            format!("must be at least 1, got {}", run.max_attempts),
        ));
    }
    if run.schedule_id.is_some() != run.scheduled_for.is_some() {
        return Err(StoreError::invalid(
            "scheduled_for",
            "schedule_id and scheduled_for go together",
        ));
    }
    Ok(())
}

pub(crate) fn schedule(schedule: &ScheduleSpec) -> Result<(), StoreError> {
    cron_expression(&schedule.cron)?;
    timezone("timezone", &schedule.timezone)
}

pub(crate) fn new_forecast(forecast: &NewForecast) -> Result<(), StoreError> {
    if forecast.horizon == 0 {
        return Err(StoreError::invalid("horizon", "must be at least 1"));
    }
    let levels = &forecast.quantile_levels;
    if levels.iter().any(|level| !(*level > 0.0 && *level < 1.0))
        || levels.windows(2).any(|pair| pair[0] >= pair[1])
    {
        return Err(StoreError::invalid(
            "quantile_levels",
            format!(
                "{levels:?}: levels must be strictly increasing and lie strictly between 0 and 1"
            ),
        ));
    }
    let mut seen = std::collections::HashSet::with_capacity(forecast.points.len());
    for point in &forecast.points {
        if point.step == 0 || point.step > forecast.horizon {
            return Err(StoreError::invalid(
                "points",
                format!("step {} is outside 1..={}", point.step, forecast.horizon),
            ));
        }
        if point.quantiles.len() != levels.len() {
            return Err(StoreError::invalid(
                "points",
                format!(
                    "step {} channel '{}' has {} quantiles for {} levels",
                    point.step,
                    point.channel,
                    point.quantiles.len(),
                    levels.len()
                ),
            ));
        }
        if !point.mean.is_finite() || point.quantiles.iter().any(|value| !value.is_finite()) {
            return Err(StoreError::invalid(
                "points",
                format!(
                    "step {} channel '{}' holds a non-finite value",
                    point.step, point.channel
                ),
            ));
        }
        if !seen.insert((point.step, point.channel.as_str())) {
            return Err(StoreError::invalid(
                "points",
                format!(
                    "step {} channel '{}' appears twice",
                    point.step, point.channel
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_names_are_path_safe() {
        for good in ["load", "site-1.power_kW", "A9", &"x".repeat(128)] {
            assert!(series_name(good).is_ok(), "{good}");
        }
        for bad in ["", "a b", "a/b", "..", ".hidden", "é", &"x".repeat(129)] {
            let err = series_name(bad).unwrap_err();
            assert!(
                matches!(err, StoreError::Invalid { field: "name", .. }),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn cron_expressions_need_six_valid_fields() {
        for good in [
            "0 0 * * * *",
            "*/30 * * * * *",
            "0 15 3 * * MON-FRI",
            "0 0 0 1 1 *",
        ] {
            assert!(cron_expression(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "0 * * * *",
            "0 0 * * * * 2030",
            "61 0 * * * *",
            "0 0 25 * * *",
            "a b c d e f",
        ] {
            let err = cron_expression(bad).unwrap_err();
            assert!(
                matches!(err, StoreError::Invalid { field: "cron", .. }),
                "{bad}: {err}"
            );
        }
    }

    fn known() -> Vec<String> {
        vec!["a".into(), "b".into(), "c".into()]
    }

    #[test]
    fn flatten_orders_cells_by_row_then_series_channel_order_and_skips_missing() {
        let batch = ObservationBatch {
            channels: vec!["c".into(), "a".into()],
            ts_micros: vec![10, 20],
            values: vec![vec![Some(3.0), None], vec![Some(1.0), Some(2.0)]],
        };
        let cells = flatten_batch("s", &known(), &batch).unwrap();
        assert_eq!(cells.channel, vec![0, 2, 0]);
        assert_eq!(cells.ts_micros, vec![10, 10, 20]);
        assert_eq!(cells.value, vec![1.0, 3.0, 2.0]);
        assert_eq!(
            (cells.first_ts_micros, cells.last_ts_micros),
            (Some(10), Some(20))
        );
    }

    #[test]
    fn flatten_rejects_unknown_channel_duplicates_ragged_and_non_finite() {
        let base = ObservationBatch {
            channels: vec!["a".into()],
            ts_micros: vec![1, 2],
            values: vec![vec![Some(1.0), Some(2.0)]],
        };

        let unknown = ObservationBatch {
            channels: vec!["x".into()],
            ..base.clone()
        };
        let err = flatten_batch("s", &known(), &unknown)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("unknown channel 'x' for existing series 's' (known: a, b, c)"),
            "{err}"
        );

        let duplicate_ts = ObservationBatch {
            ts_micros: vec![2, 2],
            ..base.clone()
        };
        assert!(matches!(
            flatten_batch("s", &known(), &duplicate_ts),
            Err(StoreError::Invalid {
                field: "ts_micros",
                ..
            })
        ));

        let ragged = ObservationBatch {
            values: vec![vec![Some(1.0)]],
            ..base.clone()
        };
        assert!(matches!(
            flatten_batch("s", &known(), &ragged),
            Err(StoreError::Invalid {
                field: "values",
                ..
            })
        ));

        let nan = ObservationBatch {
            values: vec![vec![Some(f64::NAN), None]],
            ..base.clone()
        };
        assert!(matches!(
            flatten_batch("s", &known(), &nan),
            Err(StoreError::Invalid {
                field: "values",
                ..
            })
        ));

        let out_of_range = ObservationBatch {
            ts_micros: vec![1, MAX_TS_MICROS + 1],
            ..base
        };
        assert!(matches!(
            flatten_batch("s", &known(), &out_of_range),
            Err(StoreError::Invalid {
                field: "ts_micros",
                ..
            })
        ));
    }

    #[test]
    fn unsorted_but_unique_timestamps_are_accepted() {
        let batch = ObservationBatch {
            channels: vec!["b".into()],
            ts_micros: vec![5, 1, 3],
            values: vec![vec![Some(5.0), Some(1.0), None]],
        };
        let cells = flatten_batch("s", &known(), &batch).unwrap();
        assert_eq!(cells.ts_micros, vec![5, 1]);
        assert_eq!(
            (cells.first_ts_micros, cells.last_ts_micros),
            (Some(1), Some(5))
        );
    }

    #[test]
    fn series_spec_checks_name_timezone_and_channels() {
        let spec = SeriesSpec {
            name: "s".into(),
            frequency: Some("1h".into()),
            timezone: "Europe/Berlin".into(),
            channels: known(),
        };
        series_spec(&spec).unwrap();
        let bad_tz = SeriesSpec {
            timezone: "Mars/Olympus".into(),
            ..spec.clone()
        };
        assert!(matches!(
            series_spec(&bad_tz),
            Err(StoreError::Invalid {
                field: "timezone",
                ..
            })
        ));
        let no_channels = SeriesSpec {
            channels: vec![],
            ..spec.clone()
        };
        assert!(matches!(
            series_spec(&no_channels),
            Err(StoreError::Invalid {
                field: "channels",
                ..
            })
        ));
        let repeated = SeriesSpec {
            channels: vec!["a".into(), "a".into()],
            ..spec.clone()
        };
        assert!(matches!(
            series_spec(&repeated),
            Err(StoreError::Invalid {
                field: "channels",
                ..
            })
        ));
        let unnamed = SeriesSpec {
            name: " ".into(),
            ..spec
        };
        assert!(matches!(
            series_spec(&unnamed),
            Err(StoreError::Invalid { field: "name", .. })
        ));
    }
}
