use xlstm_forecast::forecast::xlstm::{
    DEFAULT_VALIDATION_FRACTION, SeriesData, XlstmModel, train_on_series,
};
use xlstm_forecast::forecast::{ForecastError, Predict};

use super::common::{HORIZON, LOOKBACK, Prepared, forecaster, quick_preset, series_data};

/// Trains the quick preset with calendar covariates on `data`.
fn train_with_calendar(data: &SeriesData) -> Result<XlstmModel, ForecastError> {
    let mut preset = quick_preset();
    preset.model.calendar_covariates = true;
    train_on_series(
        &forecaster(preset),
        data,
        LOOKBACK,
        HORIZON,
        DEFAULT_VALIDATION_FRACTION,
        None,
    )
}

#[test]
fn a_model_with_calendar_covariates_forecasts_by_the_calendar_it_is_given() {
    let model = train_with_calendar(&series_data(600, 2, 5)).unwrap();
    let prepared = Prepared::new(600, 2, 0.0);
    let windows = prepared
        .split
        .test_windows(LOOKBACK, HORIZON)
        .unwrap()
        .extract(&prepared.matrix, 0..2, LOOKBACK, HORIZON)
        .unwrap()
        .0;
    let as_given = model.predict(&windows).unwrap();
    assert_eq!(as_given.mean, model.predict(&windows).unwrap().mean);
    // The same values, with the two windows' calendars swapped.
    let mut swapped = windows.clone();
    let calendar = windows.calendar.clone().unwrap();
    let half = calendar.len() / 2;
    swapped.calendar = Some([&calendar[half..], &calendar[..half]].concat());
    assert_ne!(as_given.mean, model.predict(&swapped).unwrap().mean);

    let mut timeless = windows;
    timeless.calendar = None;
    let err = model.predict(&timeless).unwrap_err().to_string();
    assert!(
        err.contains("calendar_covariates") && err.contains("no times"),
        "{err}"
    );
}

#[test]
fn training_with_calendar_covariates_needs_the_rows_times() {
    let mut data = series_data(600, 2, 5);
    data.matrix.calendar = None;
    let err = train_with_calendar(&data).unwrap_err().to_string();
    assert!(err.contains("calendar_covariates"), "{err}");
}
