//! Windows over a wide `[time, channel]` matrix and the standard long-horizon split protocol.
//!
//! Splits are contiguous row ranges from the start of the series: train, then validation,
//! then test. As in the reference long-horizon code (Informer/Autoformer/PatchTST data
//! loaders), a validation or test window's lookback may reach back into the previous split;
//! only its horizon must lie inside its own split. So with `T` rows in a split and horizon
//! `H` there are `T - H + 1` validation or test windows at stride 1, and `T - L - H + 1`
//! training windows.

use std::ops::Range;

use crate::data::{CALENDAR_FEATURES, ChannelMatrix};

use super::error::ForecastError;
use super::model::{Targets, WindowBatch};

/// How to split a series' rows into train / validation / test.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SplitSpec {
    /// Row counts from the start of the series; rows after `train + validation + test` are
    /// not used.
    Rows {
        train: usize,
        validation: usize,
        test: usize,
    },
    /// Fractions of the row count. Train and test are rounded down; when the fractions sum to
    /// one, validation takes the remaining rows (the convention of the reference code for
    /// custom data sets), otherwise it is rounded down too.
    Fractions {
        train: f64,
        validation: f64,
        test: f64,
    },
}

impl SplitSpec {
    /// Parses `TRAIN,VAL,TEST` row counts (`--split-rows`).
    pub fn parse_rows(text: &str) -> Result<Self, ForecastError> {
        let [train, validation, test] = three_parts(text, "split-rows")?;
        let parse = |part: &str| {
            part.parse::<usize>().map_err(|_| {
                ForecastError::invalid(
                    "split-rows",
                    format!("'{part}' is not a row count in '{text}' (expected TRAIN,VAL,TEST)"),
                )
            })
        };
        let (train, validation, test) = (parse(train)?, parse(validation)?, parse(test)?);
        if train == 0 || validation == 0 || test == 0 {
            return Err(ForecastError::invalid(
                "split-rows",
                format!("every split needs at least one row, got '{text}'"),
            ));
        }
        Ok(Self::Rows {
            train,
            validation,
            test,
        })
    }

    /// Parses `TRAIN,VAL,TEST` fractions (`--split`), each in (0, 1), summing to at most 1.
    pub fn parse_fractions(text: &str) -> Result<Self, ForecastError> {
        let [train, validation, test] = three_parts(text, "split")?;
        let parse = |part: &str| {
            part.parse::<f64>()
                .ok()
                .filter(|fraction| *fraction > 0.0 && *fraction < 1.0)
                .ok_or_else(|| {
                    ForecastError::invalid(
                        "split",
                        format!(
                            "'{part}' in '{text}' is not a fraction strictly between 0 and 1 \
                             (expected TRAIN,VAL,TEST such as 0.7,0.1,0.2)"
                        ),
                    )
                })
        };
        let (train, validation, test) = (parse(train)?, parse(validation)?, parse(test)?);
        if train + validation + test > 1.0 + FRACTION_TOLERANCE {
            return Err(ForecastError::invalid(
                "split",
                format!("the fractions in '{text}' sum to more than 1"),
            ));
        }
        Ok(Self::Fractions {
            train,
            validation,
            test,
        })
    }

    /// The split's row counts for a series of `total_rows` rows.
    pub fn resolve(&self, total_rows: usize) -> Result<SplitRows, ForecastError> {
        match *self {
            Self::Rows {
                train,
                validation,
                test,
            } => {
                let needed = train + validation + test;
                if needed > total_rows {
                    return Err(ForecastError::invalid(
                        "split-rows",
                        format!(
                            "{train} + {validation} + {test} = {needed} rows requested, but the \
                             data has {total_rows} rows"
                        ),
                    ));
                }
                Ok(SplitRows {
                    train,
                    validation,
                    test,
                })
            }
            Self::Fractions {
                train,
                validation,
                test,
            } => {
                let rows = |fraction: f64| (total_rows as f64 * fraction).floor() as usize;
                let (train_rows, test_rows) = (rows(train), rows(test));
                let validation_rows =
                    if (train + validation + test - 1.0).abs() <= FRACTION_TOLERANCE {
                        total_rows - train_rows - test_rows
                    } else {
                        rows(validation)
                    };
                if train_rows == 0 || validation_rows == 0 || test_rows == 0 {
                    return Err(ForecastError::invalid(
                        "split",
                        format!(
                            "{train},{validation},{test} of {total_rows} rows leaves a split \
                             without rows"
                        ),
                    ));
                }
                Ok(SplitRows {
                    train: train_rows,
                    validation: validation_rows,
                    test: test_rows,
                })
            }
        }
    }
}

const FRACTION_TOLERANCE: f64 = 1e-9;

fn three_parts<'a>(text: &'a str, argument: &str) -> Result<[&'a str; 3], ForecastError> {
    let parts: Vec<&str> = text.split(',').map(str::trim).collect();
    <[&str; 3]>::try_from(parts).map_err(|parts| {
        ForecastError::invalid(
            argument,
            format!(
                "expected three comma-separated values TRAIN,VAL,TEST, found {} in '{text}'",
                parts.len()
            ),
        )
    })
}

/// Row counts of the three contiguous splits, starting at row 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SplitRows {
    pub train: usize,
    pub validation: usize,
    pub test: usize,
}

impl SplitRows {
    pub fn train_range(&self) -> Range<usize> {
        0..self.train
    }

    pub fn validation_range(&self) -> Range<usize> {
        self.train..self.train + self.validation
    }

    pub fn test_range(&self) -> Range<usize> {
        self.train + self.validation..self.train + self.validation + self.test
    }

    /// Stride-1 training windows: lookback and horizon both inside the training rows.
    pub fn train_windows(
        &self,
        lookback: usize,
        horizon: usize,
    ) -> Result<WindowSet, ForecastError> {
        check_window_shape(lookback, horizon)?;
        if lookback + horizon > self.train {
            return Err(ForecastError::invalid(
                "lookback",
                format!(
                    "lookback {lookback} plus horizon {horizon} exceeds the {} training rows",
                    self.train
                ),
            ));
        }
        Ok(WindowSet {
            first_start: 0,
            count: self.train - lookback - horizon + 1,
            stride: 1,
        })
    }

    /// Stride-1 windows whose horizon lies inside the validation rows.
    pub fn validation_windows(
        &self,
        lookback: usize,
        horizon: usize,
    ) -> Result<WindowSet, ForecastError> {
        self.windows_ending_in(self.validation_range(), "validation", lookback, horizon)
    }

    /// Stride-1 windows whose horizon lies inside the test rows: every test window scored.
    pub fn test_windows(
        &self,
        lookback: usize,
        horizon: usize,
    ) -> Result<WindowSet, ForecastError> {
        self.windows_ending_in(self.test_range(), "test", lookback, horizon)
    }

    fn windows_ending_in(
        &self,
        rows: Range<usize>,
        name: &str,
        lookback: usize,
        horizon: usize,
    ) -> Result<WindowSet, ForecastError> {
        check_window_shape(lookback, horizon)?;
        if horizon > rows.len() {
            return Err(ForecastError::invalid(
                "horizon",
                format!("horizon {horizon} exceeds the {} {name} rows", rows.len()),
            ));
        }
        if lookback > rows.start {
            return Err(ForecastError::invalid(
                "lookback",
                format!(
                    "lookback {lookback} reaches before the first row: the {name} split starts \
                     at row {}",
                    rows.start
                ),
            ));
        }
        Ok(WindowSet {
            first_start: rows.start - lookback,
            count: rows.len() - horizon + 1,
            stride: 1,
        })
    }
}

fn check_window_shape(lookback: usize, horizon: usize) -> Result<(), ForecastError> {
    if lookback == 0 {
        return Err(ForecastError::invalid("lookback", "must be at least 1"));
    }
    if horizon == 0 {
        return Err(ForecastError::invalid("horizon", "must be at least 1"));
    }
    Ok(())
}

/// Windows at `first_start + i * stride` for `i < count`; a window starting at row `s` has its
/// lookback at rows `s .. s + L` and its horizon at `s + L .. s + L + H`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowSet {
    pub first_start: usize,
    pub count: usize,
    pub stride: usize,
}

impl WindowSet {
    pub fn start(&self, window: usize) -> usize {
        self.first_start + window * self.stride
    }

    /// The lookbacks and horizons of windows `windows` (indices into this set) of `series`.
    pub fn extract(
        &self,
        series: &ChannelMatrix,
        windows: Range<usize>,
        lookback: usize,
        horizon: usize,
    ) -> Result<(WindowBatch, Targets), ForecastError> {
        let indices: Vec<usize> = windows.collect();
        self.extract_indices(series, &indices, lookback, horizon)
    }

    /// The lookbacks and horizons of the windows at `indices` (into this set, any order).
    pub fn extract_indices(
        &self,
        series: &ChannelMatrix,
        indices: &[usize],
        lookback: usize,
        horizon: usize,
    ) -> Result<(WindowBatch, Targets), ForecastError> {
        if let Some(&bad) = indices.iter().find(|&&window| {
            window >= self.count || self.start(window) + lookback + horizon > series.steps
        }) {
            return Err(ForecastError::invalid(
                "windows",
                format!(
                    "window {bad} of a set of {} with lookback {lookback} and horizon {horizon} \
                     does not fit in {} rows",
                    self.count, series.steps
                ),
            ));
        }
        let channels = series.channels;
        let batch = indices.len();
        let mut values = Vec::with_capacity(batch * lookback * channels);
        let mut missing = Vec::with_capacity(batch * lookback * channels);
        let mut target_values = Vec::with_capacity(batch * horizon * channels);
        let mut target_missing = Vec::with_capacity(batch * horizon * channels);
        for &window in indices {
            let start = self.start(window) * channels;
            let split = start + lookback * channels;
            let end = split + horizon * channels;
            values.extend_from_slice(&series.values[start..split]);
            missing.extend_from_slice(&series.missing[start..split]);
            target_values.extend_from_slice(&series.values[split..end]);
            target_missing.extend_from_slice(&series.missing[split..end]);
        }
        let mut inputs = WindowBatch::new(batch, lookback, channels, values, missing)?;
        if let Some(calendar) = &series.calendar {
            let last_rows = indices.iter().flat_map(|&window| {
                let row = self.start(window) + lookback - 1;
                &calendar[row * CALENDAR_FEATURES..(row + 1) * CALENDAR_FEATURES]
            });
            inputs = inputs.with_calendar(last_rows.copied().collect())?;
        }
        let targets = Targets {
            batch,
            horizon,
            channels,
            values: target_values,
            missing: target_missing,
        };
        Ok((inputs, targets))
    }

    /// Calls `visit` on consecutive blocks of at most `block` windows, so that large window
    /// sets are streamed rather than materialised.
    pub fn for_each_block(
        &self,
        series: &ChannelMatrix,
        lookback: usize,
        horizon: usize,
        block: usize,
        mut visit: impl FnMut(WindowBatch, Targets) -> Result<(), ForecastError>,
    ) -> Result<(), ForecastError> {
        let block = block.max(1);
        let mut first = 0;
        while first < self.count {
            let end = (first + block).min(self.count);
            let (inputs, targets) = self.extract(series, first..end, lookback, horizon)?;
            visit(inputs, targets)?;
            first = end;
        }
        Ok(())
    }
}

/// Per-channel z-scoring with statistics of the training rows (observed cells only;
/// population standard deviation, as scikit-learn's `StandardScaler` in the reference code).
/// A channel without variation in the training rows keeps a scale of 1.
#[derive(Debug, Clone, PartialEq)]
pub struct ZScore {
    pub mean: Vec<f64>,
    pub std: Vec<f64>,
}

impl ZScore {
    pub fn fit(series: &ChannelMatrix, rows: Range<usize>) -> Result<Self, ForecastError> {
        let channels = series.channels;
        // Two passes (mean, then squared deviations) so that a large level does not cancel
        // the variance away in single precision sums.
        let observed = |channel: usize| {
            rows.clone()
                .map(move |row| row * channels + channel)
                .filter(|cell| !series.missing[*cell])
                .map(|cell| f64::from(series.values[cell]))
        };
        let mut mean = vec![0.0; channels];
        let mut std = vec![1.0; channels];
        for channel in 0..channels {
            let count = observed(channel).count();
            if count == 0 {
                return Err(ForecastError::invalid(
                    "series",
                    format!(
                        "channel {channel} has no observed value in the training rows {rows:?}"
                    ),
                ));
            }
            let n = count as f64;
            mean[channel] = observed(channel).sum::<f64>() / n;
            let variance = observed(channel)
                .map(|value| (value - mean[channel]).powi(2))
                .sum::<f64>()
                / n;
            if variance > 0.0 {
                std[channel] = variance.sqrt();
            }
        }
        Ok(Self { mean, std })
    }

    /// Scales every observed cell in place; missing cells stay 0.0.
    pub fn apply(&self, series: &mut ChannelMatrix) {
        let channels = series.channels;
        for (cell, value) in series.values.iter_mut().enumerate() {
            if !series.missing[cell] {
                let channel = cell % channels;
                *value = ((f64::from(*value) - self.mean[channel]) / self.std[channel]) as f32;
            }
        }
    }
}
