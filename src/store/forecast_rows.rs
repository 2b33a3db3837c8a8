//! The mapping between `ForecastPoint`s and the long `forecast_points` rows
//! (one row per step, channel and statistic; quantile NULL = the point forecast).

use chrono::{DateTime, Utc};

use super::{ForecastPoint, StoreError};

/// Forecast points as columns, ready for a bulk insert.
#[derive(Debug, Default)]
pub(crate) struct ForecastRows {
    pub step: Vec<i32>,
    pub ts: Vec<DateTime<Utc>>,
    pub channel: Vec<String>,
    pub quantile: Vec<Option<f64>>,
    pub value: Vec<f64>,
}

impl ForecastRows {
    pub fn from_points(points: &[ForecastPoint], levels: &[f64]) -> Self {
        let capacity = points.len() * (levels.len() + 1);
        let mut rows = ForecastRows {
            step: Vec::with_capacity(capacity),
            ts: Vec::with_capacity(capacity),
            channel: Vec::with_capacity(capacity),
            quantile: Vec::with_capacity(capacity),
            value: Vec::with_capacity(capacity),
        };
        for point in points {
            let statistics = std::iter::once((None, point.mean)).chain(
                levels
                    .iter()
                    .zip(&point.quantiles)
                    .map(|(&level, &value)| (Some(level), value)),
            );
            for (quantile, value) in statistics {
                rows.step.push(point.step as i32);
                rows.ts.push(point.ts);
                rows.channel.push(point.channel.clone());
                rows.quantile.push(quantile);
                rows.value.push(value);
            }
        }
        rows
    }
}

/// One stored row, as read back.
pub(crate) struct ForecastRow {
    pub step: i32,
    pub ts: DateTime<Utc>,
    pub channel: String,
    pub quantile: Option<f64>,
    pub value: f64,
}

/// Rebuilds points from rows ordered by step, channel, then quantile with NULL
/// (the point forecast) first.
pub(crate) fn assemble_points(
    rows: Vec<ForecastRow>,
    levels: &[f64],
) -> Result<Vec<ForecastPoint>, StoreError> {
    let mut points: Vec<ForecastPoint> = Vec::with_capacity(rows.len() / (levels.len() + 1));
    for row in rows {
        match row.quantile {
            None => points.push(ForecastPoint {
                step: u32::try_from(row.step).map_err(|_| {
                    StoreError::invalid("step", format!("stored step {} is negative", row.step))
                })?,
                ts: row.ts,
                channel: row.channel,
                mean: row.value,
                quantiles: Vec::with_capacity(levels.len()),
            }),
            Some(_) => {
                let point = points
                    .last_mut()
                    .filter(|point| point.step as i32 == row.step && point.channel == row.channel)
                    .ok_or_else(|| {
                        StoreError::invalid(
                            "points",
                            format!("stored quantile row for step {} channel '{}' has no point forecast", row.step, row.channel),
                        )
                    })?;
                point.quantiles.push(row.value);
            }
        }
    }
    if let Some(point) = points
        .iter()
        .find(|point| point.quantiles.len() != levels.len())
    {
        return Err(StoreError::invalid(
            "points",
            format!(
                "stored step {} channel '{}' has {} quantiles for {} levels",
                point.step,
                point.channel,
                point.quantiles.len(),
                levels.len()
            ),
        ));
    }
    Ok(points)
}

/// Points in the order `latest_forecast` returns them (step, then channel name).
pub(crate) fn sorted_points(points: &[ForecastPoint]) -> Vec<ForecastPoint> {
    let mut sorted = points.to_vec();
    sorted.sort_by(|a, b| a.step.cmp(&b.step).then_with(|| a.channel.cmp(&b.channel)));
    sorted
}
