use std::f64::consts::TAU;

use xlstm_forecast::data::ChannelMatrix;
use xlstm_forecast::forecast::synthetic::{SyntheticKind, SyntheticSpec, generate};
use xlstm_forecast::forecast::{
    EvalOptions, Fit, Forecast, LinearBaseline, ModelChoice, Predict, SeasonalNaive, SplitRows,
    SplitSpec, TrainingData, WindowBatch, evaluate,
};

use super::common::matrix;

fn training_data<'a>(
    series: &'a ChannelMatrix,
    split: &SplitRows,
    lookback: usize,
    horizon: usize,
) -> TrainingData<'a> {
    seasonal_training_data(series, split, lookback, horizon, 1)
}

fn seasonal_training_data<'a>(
    series: &'a ChannelMatrix,
    split: &SplitRows,
    lookback: usize,
    horizon: usize,
    season: usize,
) -> TrainingData<'a> {
    TrainingData {
        series,
        lookback,
        horizon,
        season,
        train: split.train_windows(lookback, horizon).unwrap(),
        validation: split.validation_windows(lookback, horizon).unwrap(),
    }
}

/// |forecast − actual| of every cell of every test window, `[window, step, channel]`.
fn test_errors(model: &impl Predict, series: &ChannelMatrix, split: &SplitRows) -> Vec<f32> {
    let test = split
        .test_windows(model.lookback(), model.horizon())
        .unwrap();
    let (inputs, targets) = test
        .extract(series, 0..test.count, model.lookback(), model.horizon())
        .unwrap();
    let forecast = model.predict(&inputs).unwrap();
    forecast
        .mean
        .iter()
        .zip(&targets.values)
        .map(|(predicted, actual)| (predicted - actual).abs())
        .collect()
}

/// Largest |forecast − actual| over every test window.
fn largest_test_error(model: &impl Predict, series: &ChannelMatrix, split: &SplitRows) -> f32 {
    test_errors(model, series, split)
        .into_iter()
        .fold(0.0, f32::max)
}

fn assert_quantiles_ascend(forecast: &Forecast) {
    let levels = forecast.quantile_levels.len();
    assert!(levels > 1);
    for cell in forecast.quantiles.chunks(levels) {
        assert!(
            cell.windows(2).all(|pair| pair[0] <= pair[1]),
            "crossing quantiles {cell:?}"
        );
    }
}

/// A daily pattern with two peaks, repeated exactly, on a different level per channel.
fn pure_seasonal(rows: usize, channels: usize) -> ChannelMatrix {
    matrix(rows, channels, |row, channel| {
        let hour = (row % 24) as f64;
        10.0 * channel as f64
            + (TAU * hour / 24.0).sin()
            + 0.5 * (2.0 * TAU * hour / 24.0).cos()
            + hour * 0.1
    })
}

#[test]
fn seasonal_naive_has_zero_error_on_a_pure_seasonal_signal() {
    let series = pure_seasonal(480, 2);
    let split = SplitRows {
        train: 240,
        validation: 120,
        test: 120,
    };
    let fitted = SeasonalNaive::new(24)
        .fit(&training_data(&series, &split, 48, 36))
        .unwrap();
    assert_eq!((fitted.epochs, fitted.model.parameter_count()), (0, 0));
    // Instance normalisation and its inverse round in f32 only.
    assert!(largest_test_error(&fitted.model, &series, &split) < 1e-5);
}

#[test]
fn eval_scores_seasonal_naive_on_a_pure_seasonal_signal_as_perfect() {
    let options = EvalOptions {
        lookback: 48,
        horizon: 24,
        split: SplitSpec::Rows {
            train: 240,
            validation: 120,
            test: 120,
        },
        model: ModelChoice::SeasonalNaive,
        seasonal_period: 24,
        preset: None,
        max_epochs: None,
        seed: None,
        device: candle_core::Device::Cpu,
    };
    let report = evaluate(pure_seasonal(500, 3), &options).unwrap();
    assert!(report.metrics.mse < 1e-10, "{report:?}");
    assert!(report.metrics.mae < 1e-5);
    assert!(
        report.metrics.mase.is_nan(),
        "a perfectly periodic training split has no MASE scale"
    );
    assert_eq!(report.metrics.windows, 120 - 24 + 1);
    assert_eq!(
        (report.train_rows, report.validation_rows, report.test_rows),
        (240, 120, 120)
    );
}

#[test]
fn linear_model_recovers_an_exact_linear_autoregression() {
    // A level plus two sinusoids satisfies an exact AR(5) recursion whose coefficients sum to
    // one, so the normalised horizon is an exact linear function of the normalised lookback.
    let series = matrix(700, 2, |row, channel| {
        let t = row as f64;
        3.0 + channel as f64 + (TAU * t / 17.0).sin() + 0.5 * (TAU * t / 7.0 + channel as f64).cos()
    });
    let split = SplitRows {
        train: 400,
        validation: 150,
        test: 150,
    };
    let fitted = LinearBaseline::default()
        .fit(&training_data(&series, &split, 32, 8))
        .unwrap();
    assert_eq!(fitted.epochs, 1);
    assert_eq!(fitted.model.parameter_count(), (32 + 1) * 8);
    let error = largest_test_error(&fitted.model, &series, &split);
    assert!(error < 1e-3, "largest test error {error}");
    // The weakest ridge fits an exact relation best on validation.
    assert_eq!(
        fitted.model.ridge, 1e-6,
        "{:?}",
        fitted.model.validation_mse
    );
}

#[test]
fn linear_model_is_not_thrown_by_changes_after_a_flat_lookback() {
    // Channel 0 is the exact autoregression above; channel 1 is flat with a short pulse every
    // 100 rows, as rain or night-time radiation are. A window whose lookback is flat has a scale
    // of sqrt(eps), so a pulse in its horizon is a normalised target in the thousands: fitted
    // unweighted, those rows alone set the intercept and channel 0's forecasts were off by up
    // to 35. Weighted by scale², they weigh what their error on the series' scale weighs; the
    // weights shared with the pulses still cost channel 0 its exact fit (0.66 at most).
    let series = matrix(1200, 2, |row, channel| {
        let t = row as f64;
        match channel {
            0 => 3.0 + (TAU * t / 17.0).sin() + 0.5 * (TAU * t / 7.0).cos(),
            _ => f64::from(row % 100 >= 95) * 5.0,
        }
    });
    let split = SplitRows {
        train: 800,
        validation: 200,
        test: 200,
    };
    let fitted = LinearBaseline::default()
        .fit(&training_data(&series, &split, 32, 8))
        .unwrap();
    let channel_0_error = test_errors(&fitted.model, &series, &split)
        .into_iter()
        .step_by(2)
        .fold(0.0, f32::max);
    assert!(
        channel_0_error < 1.0,
        "largest test error on the autoregressive channel {channel_0_error}"
    );
}

#[test]
fn baseline_quantiles_never_cross_and_cover_about_eighty_percent() {
    let spec = SyntheticSpec::new(SyntheticKind::Hourly, 3000, 3, 7);
    let series = generate(&spec).unwrap().matrix;
    let mut options = EvalOptions {
        lookback: 96,
        horizon: 24,
        split: SplitSpec::Fractions {
            train: 0.6,
            validation: 0.2,
            test: 0.2,
        },
        model: ModelChoice::Linear,
        seasonal_period: 24,
        preset: None,
        max_epochs: None,
        seed: None,
        device: candle_core::Device::Cpu,
    };
    let linear = evaluate(series.clone(), &options).unwrap();
    options.model = ModelChoice::SeasonalNaive;
    let naive = evaluate(series.clone(), &options).unwrap();
    for report in [&linear, &naive] {
        let coverage = report.metrics.coverage_80;
        assert!((0.65..=0.92).contains(&coverage), "{report:?}");
        assert!(report.metrics.wql.is_finite() && report.metrics.mase.is_finite());
    }
    assert!(
        linear.metrics.mse < naive.metrics.mse,
        "linear {linear:?} naive {naive:?}"
    );

    let split = SplitSpec::Fractions {
        train: 0.6,
        validation: 0.2,
        test: 0.2,
    }
    .resolve(3000)
    .unwrap();
    let data = training_data(&series, &split, 96, 24);
    let test = split.test_windows(96, 24).unwrap();
    let (inputs, _) = test.extract(&series, 0..50, 96, 24).unwrap();
    assert_quantiles_ascend(
        &LinearBaseline::default()
            .fit(&data)
            .unwrap()
            .model
            .predict(&inputs)
            .unwrap(),
    );
    assert_quantiles_ascend(
        &SeasonalNaive::new(24)
            .fit(&data)
            .unwrap()
            .model
            .predict(&inputs)
            .unwrap(),
    );
}

/// A deterministic noise in [-0.5, 0.5).
fn noise(step: usize) -> f64 {
    ((step * 7919 + 13) % 1000) as f64 / 1000.0 - 0.5
}

#[test]
fn the_band_is_narrower_for_a_lookback_that_repeats_its_season() {
    // A daily cycle whose noise grows and shrinks over the weeks.
    let series = matrix(2400, 1, |row, _| {
        2.0 * (TAU * row as f64 / 24.0).sin()
            + (1.0 + (TAU * row as f64 / 500.0).sin()) * noise(row)
    });
    let split = SplitSpec::Fractions {
        train: 0.6,
        validation: 0.2,
        test: 0.2,
    }
    .resolve(2400)
    .unwrap();
    // Two lookbacks with the same cycle: one repeats it exactly, one carries noise.
    let lookback = 96;
    let values: Vec<f32> = (0..2 * lookback)
        .map(|cell| {
            let (window, step) = (cell / lookback, cell % lookback);
            let cycle = 2.0 * (TAU * step as f64 / 24.0).sin();
            (cycle
                + if window == 1 {
                    1.5 * noise(step + 100)
                } else {
                    0.0
                }) as f32
        })
        .collect();
    let windows =
        WindowBatch::new(2, lookback, 1, values.clone(), vec![false; 2 * lookback]).unwrap();
    let std_dev = |window: usize| {
        let cells = &values[window * lookback..(window + 1) * lookback];
        let mean = cells.iter().map(|v| f64::from(*v)).sum::<f64>() / lookback as f64;
        (cells
            .iter()
            .map(|v| (f64::from(*v) - mean).powi(2))
            .sum::<f64>()
            / lookback as f64)
            .sqrt()
    };
    // The 0.1–0.9 width at the first step, per unit of the lookback's standard deviation.
    let relative_widths = |season: usize| {
        let data = seasonal_training_data(&series, &split, lookback, 24, season);
        let forecast = LinearBaseline::default()
            .fit(&data)
            .unwrap()
            .model
            .predict(&windows)
            .unwrap();
        assert_quantiles_ascend(&forecast);
        let levels = forecast.quantile_levels.len();
        (0..2)
            .map(|window| {
                let cell = window * forecast.horizon * forecast.channels;
                let band = &forecast.quantiles[cell * levels..(cell + 1) * levels];
                f64::from(band[levels - 1] - band[0]) / std_dev(window)
            })
            .collect::<Vec<_>>()
    };
    // Without a season the band follows the standard deviation alone.
    let plain = relative_widths(1);
    assert!((plain[0] - plain[1]).abs() < 1e-3 * plain[0], "{plain:?}");
    // With the daily season it also follows what repeating the last day misses.
    let seasonal = relative_widths(24);
    assert!(seasonal[0] < 0.5 * seasonal[1], "{seasonal:?}");
}

#[test]
fn a_model_rejects_windows_of_another_lookback() {
    let series = pure_seasonal(480, 1);
    let split = SplitRows {
        train: 240,
        validation: 120,
        test: 120,
    };
    let fitted = SeasonalNaive::new(24)
        .fit(&training_data(&series, &split, 48, 24))
        .unwrap();
    let test = split.test_windows(30, 24).unwrap();
    let (inputs, _) = test.extract(&series, 0..2, 30, 24).unwrap();
    let error = fitted.model.predict(&inputs).unwrap_err();
    assert!(error.to_string().contains("lookback 48"), "{error}");
}

#[test]
fn seasonal_naive_needs_a_lookback_of_at_least_one_season() {
    let series = pure_seasonal(480, 1);
    let split = SplitRows {
        train: 240,
        validation: 120,
        test: 120,
    };
    let error = SeasonalNaive::new(24)
        .fit(&training_data(&series, &split, 12, 24))
        .err()
        .unwrap();
    assert!(error.to_string().starts_with("lookback:"), "{error}");
}

#[test]
fn eval_refuses_unknown_presets_and_presets_for_baselines() {
    let mut options = EvalOptions {
        lookback: 48,
        horizon: 24,
        split: SplitSpec::Rows {
            train: 240,
            validation: 120,
            test: 120,
        },
        model: ModelChoice::Xlstm,
        seasonal_period: 24,
        preset: None,
        max_epochs: None,
        seed: None,
        device: candle_core::Device::Cpu,
    };
    options.preset = Some("huge".to_string());
    let error = evaluate(pure_seasonal(480, 1), &options).unwrap_err();
    assert!(
        error
            .to_string()
            .starts_with("preset: unknown preset \"huge\""),
        "{error}"
    );
    options.preset = None;
    options.max_epochs = Some(0);
    let error = evaluate(pure_seasonal(480, 1), &options).unwrap_err();
    assert!(error.to_string().starts_with("max_epochs:"), "{error}");
    options.model = ModelChoice::Linear;
    options.preset = Some("small".to_string());
    let error = evaluate(pure_seasonal(480, 1), &options).unwrap_err();
    assert!(error.to_string().starts_with("preset:"), "{error}");
}
