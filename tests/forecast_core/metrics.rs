use xlstm_forecast::forecast::metrics::seasonal_naive_scale;
use xlstm_forecast::forecast::{Forecast, MetricsAccumulator, Targets};

use super::common::matrix;

fn close(found: f64, expected: f64) {
    // Quantile levels are f32, so 0.1 is 0.1 only to about 1e-8.
    assert!(
        (found - expected).abs() < 1e-7,
        "found {found}, expected {expected}"
    );
}

/// One window, two steps, one channel: actuals 1 and −3.
fn one_channel_example(second_step_low_quantile: f32) -> (Forecast, Targets) {
    let forecast = Forecast {
        batch: 1,
        horizon: 2,
        channels: 1,
        mean: vec![2.0, -1.0],
        quantile_levels: vec![0.1, 0.5, 0.9],
        quantiles: vec![0.0, 2.0, 3.0, second_step_low_quantile, -1.0, 0.0],
    };
    let targets = Targets {
        batch: 1,
        horizon: 2,
        channels: 1,
        values: vec![1.0, -3.0],
        missing: vec![false, false],
    };
    (forecast, targets)
}

#[test]
fn point_and_quantile_metrics_match_hand_computation() {
    let (forecast, targets) = one_channel_example(-4.0);
    // The in-sample seasonal naive (period 1) MAE of 0, 2, 1, 3 is (2 + 1 + 2) / 3.
    let scale =
        seasonal_naive_scale(&matrix(4, 1, |row, _| [0.0, 2.0, 1.0, 3.0][row]), 0..4, 1).unwrap();
    close(scale[0], 5.0 / 3.0);
    let mut accumulator = MetricsAccumulator::new(scale);
    accumulator.add(&forecast, &targets).unwrap();
    let metrics = accumulator.finish();
    // Errors −1 and −2.
    close(metrics.mse, (1.0 + 4.0) / 2.0);
    close(metrics.mae, (1.0 + 2.0) / 2.0);
    close(metrics.mase, 1.5 / (5.0 / 3.0));
    // Pinball, y = 1:  τ .1 q 0 → .1;  τ .5 q 2 → .5;  τ .9 q 3 → .2   (sum .8)
    //          y = −3: τ .1 q −4 → .1; τ .5 q −1 → 1;  τ .9 q 0 → .3   (sum 1.4)
    // wql = 2 · 2.2 / (|1| + |−3|) / 3 levels.
    close(metrics.wql, 2.0 * 2.2 / 4.0 / 3.0);
    close(metrics.coverage_80, 1.0);
    assert_eq!(metrics.windows, 1);
}

#[test]
fn an_actual_outside_the_band_lowers_coverage_and_raises_the_loss() {
    let (forecast, targets) = one_channel_example(-2.0);
    let mut accumulator = MetricsAccumulator::new(vec![1.0]);
    accumulator.add(&forecast, &targets).unwrap();
    let metrics = accumulator.finish();
    // y = −3 below q0.1 = −2: pinball .9 · 1 instead of .1.
    close(metrics.wql, 2.0 * (0.8 + 0.9 + 1.0 + 0.3) / 4.0 / 3.0);
    close(metrics.coverage_80, 0.5);
}

#[test]
fn mase_averages_per_channel_ratios_and_missing_actuals_are_skipped() {
    // Two windows, one step, two channels; channel 1 of window 1 is missing.
    let forecast = Forecast {
        batch: 2,
        horizon: 1,
        channels: 2,
        mean: vec![0.0, 0.0, 0.0, 0.0],
        quantile_levels: vec![0.5],
        quantiles: vec![0.0, 0.0, 0.0, 0.0],
    };
    let targets = Targets {
        batch: 2,
        horizon: 1,
        channels: 2,
        values: vec![1.0, 4.0, -1.0, 1000.0],
        missing: vec![false, false, false, true],
    };
    let mut accumulator = MetricsAccumulator::new(vec![1.0, 2.0]);
    accumulator.add(&forecast, &targets).unwrap();
    let metrics = accumulator.finish();
    close(metrics.mse, (1.0 + 16.0 + 1.0) / 3.0);
    close(metrics.mae, (1.0 + 4.0 + 1.0) / 3.0);
    // Channel 0: MAE 1 / scale 1; channel 1: MAE 4 / scale 2.
    close(metrics.mase, (1.0 + 2.0) / 2.0);
    let channels = accumulator.per_channel();
    // Channel 0: errors 1 and −1; channel 1: 4 (the missing actual is not a cell).
    assert_eq!((channels[0].cells, channels[1].cells), (2, 1));
    close(channels[0].mse, 1.0);
    close(channels[1].mse, 16.0);
    close(channels[0].mase, 1.0);
    close(channels[1].mase, 2.0);
    // Only the 0.5 level: pinball .5·|y| each, so wql = 2 · .5 · 6 / 6 = 1.
    close(metrics.wql, 1.0);
    assert!(
        metrics.coverage_80.is_nan(),
        "no 0.1/0.9 levels, no coverage"
    );
    assert_eq!(metrics.windows, 2);
}

#[test]
fn accumulating_in_batches_equals_one_batch() {
    let (forecast, targets) = one_channel_example(-4.0);
    let mut twice = MetricsAccumulator::new(vec![1.0]);
    twice.add(&forecast, &targets).unwrap();
    twice.add(&forecast, &targets).unwrap();
    let mut once = MetricsAccumulator::new(vec![1.0]);
    once.add(&forecast, &targets).unwrap();
    let (twice, once) = (twice.finish(), once.finish());
    close(twice.mse, once.mse);
    close(twice.wql, once.wql);
    assert_eq!(twice.windows, 2);
}

#[test]
fn mismatched_shapes_are_rejected() {
    let (forecast, mut targets) = one_channel_example(-4.0);
    targets.horizon = 1;
    let error = MetricsAccumulator::new(vec![1.0])
        .add(&forecast, &targets)
        .unwrap_err();
    assert!(error.to_string().starts_with("forecast:"), "{error}");
}

#[test]
fn seasonal_scale_compares_each_value_with_one_season_earlier() {
    // Period 2 over 0, 5, 1, 7, 4: |1 − 0|, |7 − 5|, |4 − 1| → 2.
    let series = matrix(5, 1, |row, _| [0.0, 5.0, 1.0, 7.0, 4.0][row]);
    close(seasonal_naive_scale(&series, 0..5, 2).unwrap()[0], 2.0);
    let too_short = seasonal_naive_scale(&series, 0..2, 2).unwrap_err();
    assert!(
        too_short.to_string().starts_with("season_period:"),
        "{too_short}"
    );
}
