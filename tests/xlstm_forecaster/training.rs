use std::ops::ControlFlow;

use xlstm_forecast::forecast::xlstm::{ChannelMode, TrainingProgress};
use xlstm_forecast::forecast::{
    Fit, ForecastError, LinearBaseline, MetricsAccumulator, Predict, WindowBatch,
};

use super::common::{HORIZON, LOOKBACK, Prepared, forecaster, quick_preset};

fn test_windows(prepared: &Prepared, count: usize) -> WindowBatch {
    let windows = prepared.split.test_windows(LOOKBACK, HORIZON).unwrap();
    windows
        .extract(&prepared.matrix, 0..count, LOOKBACK, HORIZON)
        .unwrap()
        .0
}

fn assert_quantiles_ascend(forecast: &xlstm_forecast::forecast::Forecast) {
    let levels = forecast.quantile_levels.len();
    for cell in forecast.quantiles.chunks(levels) {
        assert!(
            cell.windows(2).all(|pair| pair[0] <= pair[1]),
            "crossing quantiles {cell:?}"
        );
        assert!(cell.iter().all(|v| v.is_finite()));
    }
}

#[test]
fn forecasts_have_the_window_shape_and_ordered_quantiles_in_both_channel_modes() {
    let prepared = Prepared::new(800, 3, 0.0);
    for mode in [ChannelMode::Independent, ChannelMode::Mixing] {
        let mut preset = quick_preset();
        preset.model.channel_mode = mode;
        let model = forecaster(preset).fit(&prepared.data()).unwrap().model;
        let windows = test_windows(&prepared, 5);
        let forecast = model.predict(&windows).unwrap();
        assert_eq!(
            (forecast.batch, forecast.horizon, forecast.channels),
            (5, HORIZON, 3)
        );
        assert_eq!(forecast.mean.len(), 5 * HORIZON * 3);
        assert_eq!(forecast.quantiles.len(), 5 * HORIZON * 3 * 9);
        assert!(forecast.mean.iter().all(|v| v.is_finite()));
        assert_quantiles_ascend(&forecast);
    }
}

#[test]
fn missing_inputs_are_masked_not_read() {
    let prepared = Prepared::new(800, 2, 0.1);
    let model = forecaster(quick_preset())
        .fit(&prepared.data())
        .unwrap()
        .model;
    let windows = test_windows(&prepared, 4);
    assert!(
        windows.missing.iter().any(|m| *m),
        "the test needs missing cells"
    );
    let mut garbage = windows.clone();
    for (value, missing) in garbage.values.iter_mut().zip(&garbage.missing) {
        if *missing {
            *value = 1.0e6;
        }
    }
    assert_eq!(
        model.predict(&windows).unwrap(),
        model.predict(&garbage).unwrap()
    );
    // ... while the mask itself is an input: hiding an observed cell changes the forecast.
    let mut hidden = windows.clone();
    let last = hidden.index(0, LOOKBACK - 1, 0);
    hidden.missing[last] = true;
    hidden.values[last] = 0.0;
    assert_ne!(
        model.predict(&windows).unwrap().mean,
        model.predict(&hidden).unwrap().mean
    );
}

#[test]
fn a_seed_fixes_the_model_and_another_seed_changes_it() {
    let prepared = Prepared::new(700, 2, 0.0);
    let fit = |seed| {
        let mut preset = quick_preset();
        preset.training.seed = seed;
        forecaster(preset).fit(&prepared.data()).unwrap().model
    };
    let (first, second, other) = (fit(3), fit(3), fit(4));
    assert!(first.weights_bytes().unwrap() == second.weights_bytes().unwrap());
    assert_eq!(first.manifest.calibration, second.manifest.calibration);
    let losses = |m: &xlstm_forecast::forecast::xlstm::XlstmModel| {
        m.manifest
            .training
            .history
            .iter()
            .map(|e| (e.train_loss, e.val_loss))
            .collect::<Vec<_>>()
    };
    assert_eq!(losses(&first), losses(&second));
    let windows = test_windows(&prepared, 3);
    assert_eq!(
        first.predict(&windows).unwrap(),
        second.predict(&windows).unwrap()
    );
    assert!(first.weights_bytes().unwrap() != other.weights_bytes().unwrap());
}

#[test]
fn training_starts_from_the_ridge_fit_of_the_linear_baseline() {
    let prepared = Prepared::new(700, 2, 0.0);
    let data = prepared.data();
    let mut preset = quick_preset();
    preset.training.max_validation_windows = None;
    preset.training.max_epochs = 1;
    let model = forecaster(preset).fit(&data).unwrap().model;
    let linear = LinearBaseline::default().fit(&data).unwrap().model;
    let ridge_mse = linear
        .validation_mse
        .iter()
        .find(|(ridge, _)| *ridge == linear.ridge)
        .and_then(|(_, mse)| *mse)
        .unwrap();
    let initial = model.manifest.training.history[0].val_loss;
    assert!(
        (initial - ridge_mse).abs() <= 1e-3 * ridge_mse,
        "epoch 0 validation mse {initial} should be the ridge's {ridge_mse}"
    );
    // Early stopping keeps the best epoch, so the model is never worse than its start.
    assert!(model.manifest.training.best_val_loss <= initial);
}

#[test]
fn progress_is_reported_and_the_callback_can_cancel() {
    let prepared = Prepared::new(700, 2, 0.0);
    let mut seen: Vec<TrainingProgress> = Vec::new();
    let fitted = forecaster(quick_preset())
        .fit_with_progress(
            &prepared.data(),
            Some(&mut |p: &TrainingProgress| {
                seen.push(p.clone());
                ControlFlow::Continue(())
            }),
        )
        .unwrap();
    let last = seen.last().unwrap();
    assert_eq!(
        last.history.len(),
        fitted.epochs + 1,
        "epoch 0 plus each epoch"
    );
    assert!(
        seen.iter()
            .all(|p| p.step <= p.steps_per_epoch && p.epoch <= p.max_epochs)
    );
    assert!(
        seen.iter()
            .any(|p| p.train_loss.is_some() && p.eta_seconds.is_some())
    );

    let mut calls = 0;
    let cancelled = forecaster(quick_preset()).fit_with_progress(
        &prepared.data(),
        Some(&mut |_: &TrainingProgress| {
            calls += 1;
            ControlFlow::Break(())
        }),
    );
    assert!(matches!(cancelled, Err(ForecastError::Cancelled)));
    assert_eq!(calls, 1, "the run stops at the first report");
}

#[test]
fn validation_checks_within_epochs_keep_the_best_check() {
    let prepared = Prepared::new(700, 2, 0.0);
    let mut preset = quick_preset();
    // 64 windows in batches of 16: 4 steps per epoch, checked after steps 2 and 4.
    preset.training.validations_per_epoch = 2;
    preset.training.patience = 10;
    preset.training.max_epochs = 2;
    let training = forecaster(preset)
        .fit(&prepared.data())
        .unwrap()
        .model
        .manifest
        .training;
    let checks: Vec<(usize, Option<usize>)> = training
        .history
        .iter()
        .map(|record| (record.epoch, record.mid_epoch_step))
        .collect();
    assert_eq!(
        checks,
        vec![(0, None), (1, Some(2)), (1, None), (2, Some(2)), (2, None)]
    );
    let best = training
        .history
        .iter()
        .min_by(|a, b| a.val_loss.total_cmp(&b.val_loss))
        .unwrap();
    assert_eq!(training.best_val_loss, best.val_loss);
    assert_eq!(
        (training.best_epoch, training.best_mid_epoch_step),
        (best.epoch, best.mid_epoch_step)
    );
    assert_eq!(training.epochs, 2);
}

#[test]
fn the_kept_model_weighs_its_deep_correction_as_its_best_check_did() {
    let prepared = Prepared::new(700, 2, 0.0);
    let data = prepared.data();
    let mut preset = quick_preset();
    preset.training.max_validation_windows = None;
    preset.training.validations_per_epoch = 2;
    preset.training.patience = 10;
    let model = forecaster(preset).fit(&data).unwrap().model;
    let training = &model.manifest.training;
    for record in &training.history {
        let weights = record
            .deep_scale
            .as_ref()
            .expect("a linear path weighs its deep correction");
        // One weight per group of horizon steps: the 12 steps in 8 groups.
        assert_eq!(weights.len(), 8, "{weights:?}");
        assert!(
            weights.iter().all(|w| (0.0..=1.0).contains(w)),
            "deep scale {weights:?}"
        );
    }
    // The untrained correction is zero: every weight scores the same, and the tie keeps 1.
    assert_eq!(training.history[0].deep_scale, Some(vec![1.0; 8]));
    let kept = training
        .history
        .iter()
        .find(|r| {
            (r.epoch, r.mid_epoch_step) == (training.best_epoch, training.best_mid_epoch_step)
        })
        .unwrap();
    assert_eq!(training.deep_scale, kept.deep_scale);
    // The saved model forecasts with those weights: its validation MSE is the kept check's.
    let mut metrics = MetricsAccumulator::new(vec![1.0; 2]);
    data.validation
        .for_each_block(
            &prepared.matrix,
            LOOKBACK,
            HORIZON,
            64,
            |inputs, targets| metrics.add(&model.predict(&inputs)?, &targets),
        )
        .unwrap();
    let mse = metrics.finish().mse;
    assert!(
        (mse - training.best_val_loss).abs() <= 1e-4 * training.best_val_loss,
        "validation mse {mse} against the kept check's {}",
        training.best_val_loss
    );
}

#[test]
fn a_low_rank_head_trains_and_stays_small() {
    let prepared = Prepared::new(700, 2, 0.0);
    let full = forecaster(quick_preset())
        .fit(&prepared.data())
        .unwrap()
        .model;
    let mut preset = quick_preset();
    preset.model.head_rank = Some(2);
    let low_rank = forecaster(preset).fit(&prepared.data()).unwrap().model;
    // tiny: E=16, (48 − 8)/8 + 1 = 6 tokens; full head 96·12 + 12, rank 2: 96·2 + 2 + 2·12 + 12.
    assert_eq!(
        full.parameter_count() - low_rank.parameter_count(),
        (96 * 12 + 12) - (96 * 2 + 2 + 2 * 12 + 12)
    );
    let forecast = low_rank.predict(&test_windows(&prepared, 3)).unwrap();
    assert!(forecast.mean.iter().all(|v| v.is_finite()));
    assert_quantiles_ascend(&forecast);
}

#[test]
fn beyond_the_deep_horizon_the_forecast_is_the_linear_paths() {
    let prepared = Prepared::new(700, 2, 0.0);
    let data = prepared.data();
    let deep = 4;
    let mut preset = quick_preset();
    preset.model.deep_horizon = Some(deep);
    let model = forecaster(preset).fit(&data).unwrap().model;
    let linear = LinearBaseline::default().fit(&data).unwrap().model;
    let windows = test_windows(&prepared, 3);
    let (ours, theirs) = (
        model.predict(&windows).unwrap(),
        linear.predict(&windows).unwrap(),
    );
    let channels = ours.channels;
    let mut deep_differs = false;
    for (cell, (a, b)) in ours.mean.iter().zip(&theirs.mean).enumerate() {
        let step = (cell / channels) % HORIZON;
        if step >= deep {
            assert!(
                (a - b).abs() <= 1e-3 * (1.0 + b.abs()),
                "step {step}: {a} vs {b}"
            );
        } else {
            deep_differs |= (a - b).abs() > 1e-3 * (1.0 + b.abs());
        }
    }
    // Trained weights (a kept epoch after the start) move the steps within the deep horizon.
    if model.manifest.training.best_epoch > 0 {
        assert!(
            deep_differs,
            "the deep path changed none of the first {deep} steps"
        );
    }
    // A deep horizon needs the linear path for the steps beyond it.
    let mut preset = quick_preset();
    preset.model.deep_horizon = Some(deep);
    preset.model.linear_path = false;
    let err = forecaster(preset).fit(&data).unwrap_err().to_string();
    assert!(err.contains("deep_horizon"), "{err}");
}

#[test]
fn a_diverging_run_stops_with_a_clear_error() {
    let prepared = Prepared::new(700, 2, 0.0);
    let mut preset = quick_preset();
    preset.training.learning_rate = 1e30;
    preset.training.warmup_fraction = 0.0;
    let err = forecaster(preset)
        .fit(&prepared.data())
        .unwrap_err()
        .to_string();
    assert!(err.contains("training diverged at epoch 1"), "{err}");
}

#[test]
fn a_lookback_shorter_than_a_patch_is_refused() {
    let prepared = Prepared::new(700, 2, 0.0);
    let mut data = prepared.data();
    data.lookback = 4;
    data.train = prepared.split.train_windows(4, HORIZON).unwrap();
    data.validation = prepared.split.validation_windows(4, HORIZON).unwrap();
    let err = forecaster(quick_preset())
        .fit(&data)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("lookback 4 is shorter than the preset's patch_len 8"),
        "{err}"
    );
}
