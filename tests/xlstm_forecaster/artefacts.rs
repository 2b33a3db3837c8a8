use candle_core::{Device, Tensor};
use xlstm_forecast::forecast::Predict;
use xlstm_forecast::forecast::xlstm::artefact::{MANIFEST_FILE, read_dir, write_dir};
use xlstm_forecast::forecast::xlstm::{
    CalibrationMethod, DEFAULT_VALIDATION_FRACTION, ModelManifest, ParentModel,
    QuantileCalibration, XlstmModel, finetune_on_series, forecast_latest, train_on_series,
};

use super::common::{HORIZON, LOOKBACK, forecaster, quick_preset, series_data};

fn trained() -> XlstmModel {
    train_on_series(
        &forecaster(quick_preset()),
        &series_data(600, 3, 11),
        LOOKBACK,
        HORIZON,
        DEFAULT_VALIDATION_FRACTION,
        None,
    )
    .unwrap()
}

#[test]
fn a_model_round_trips_through_its_directory_exactly() {
    let model = trained();
    let data = series_data(600, 3, 11);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("model");
    write_dir(
        &out,
        &model.weights_bytes().unwrap(),
        &model.manifest,
        false,
    )
    .unwrap();
    let (weights, manifest) = read_dir(&out).unwrap();
    assert_eq!(manifest, model.manifest);
    let loaded = XlstmModel::from_parts(&weights, manifest, &Device::Cpu).unwrap();
    assert!(loaded.weights_bytes().unwrap() == model.weights_bytes().unwrap());
    assert_eq!(
        forecast_latest(&loaded, &data, HORIZON).unwrap(),
        forecast_latest(&model, &data, HORIZON).unwrap()
    );
    // The manifest says what the model is and how it was made.
    let description = loaded.manifest.data.as_ref().unwrap();
    assert_eq!(description.channels.len(), 3);
    assert_eq!(description.frequency.as_deref(), Some("1h"));
    assert!(description.data_from < description.data_to);
    for key in ["val_mse", "val_mae", "coverage_80", "epochs", "params"] {
        assert!(
            loaded.manifest.metrics.contains_key(key),
            "metrics lack {key}"
        );
    }
    assert_eq!(loaded.manifest.library_version, env!("CARGO_PKG_VERSION"));
    // Nothing is left beside the model directory.
    let entries: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(entries.len(), 1);
    // An existing directory is never overwritten by accident.
    let err = write_dir(&out, b"x", &model.manifest, false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("already exists"), "{err}");
    assert!(read_dir(&out).unwrap().0 == weights);
}

#[test]
fn the_calibration_scales_each_horizon_bucket_and_round_trips() {
    let model = trained();
    let QuantileCalibration::Scale {
        bucket_len,
        factors,
    } = &model.manifest.calibration
    else {
        panic!(
            "a new model is calibrated by scale: {:?}",
            model.manifest.calibration
        );
    };
    let buckets = model.manifest.preset.model.calibration_buckets.min(HORIZON);
    assert_eq!(*bucket_len, HORIZON.div_ceil(buckets));
    assert_eq!(factors.len(), HORIZON.div_ceil(*bucket_len));
    let levels = model.quantile_levels().len();
    assert!(factors.iter().all(|bucket| bucket.len() == levels));
    assert!(factors.iter().flatten().all(|factor| factor.is_finite()));
    let text = model.manifest.to_json();
    assert_eq!(ModelManifest::from_json(&text).unwrap(), model.manifest);

    // A calibration that does not fit the horizon is refused on load.
    let mut short = model.manifest.clone();
    short.calibration = QuantileCalibration::Scale {
        bucket_len: *bucket_len,
        factors: factors[..factors.len() - 1].to_vec(),
    };
    let err = XlstmModel::from_parts(&model.weights_bytes().unwrap(), short, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(err.contains("needs"), "{err}");
}

#[test]
fn the_residual_calibration_bands_each_step_by_its_residual_quantiles() {
    let mut preset = quick_preset();
    preset.model.calibration = CalibrationMethod::Residual;
    let data = series_data(600, 3, 11);
    let model = train_on_series(
        &forecaster(preset),
        &data,
        LOOKBACK,
        HORIZON,
        DEFAULT_VALIDATION_FRACTION,
        None,
    )
    .unwrap();
    let QuantileCalibration::Residual { offsets, season } = &model.manifest.calibration else {
        panic!(
            "the preset asks for residual calibration: {:?}",
            model.manifest.calibration
        );
    };
    assert_eq!(
        *season, 24,
        "an hourly series' band widths use a daily season"
    );
    let levels = model.quantile_levels().len();
    assert_eq!(offsets.len(), HORIZON);
    for step in offsets {
        assert_eq!(step.len(), levels);
        assert!(step.iter().all(|offset| offset.is_finite()), "{step:?}");
        assert!(step.windows(2).all(|pair| pair[0] <= pair[1]), "{step:?}");
        assert!(step[0] < 0.0 && step[levels - 1] > 0.0, "{step:?}");
    }
    // Each cell's band is its step's offsets times its window's band width: the same
    // proportions around the point forecast in every channel, whatever the quantile head says.
    let forecast = forecast_latest(&model, &data, HORIZON).unwrap();
    for (step, cells) in forecast.quantiles.iter().enumerate() {
        let expected_width = offsets[step][levels - 1] - offsets[step][0];
        for (channel, cell) in cells.iter().enumerate() {
            let width = cell[levels - 1] - cell[0];
            for (level, value) in cell.iter().enumerate() {
                let share = (value - forecast.mean[step][channel]) / width;
                let expected = offsets[step][level] / expected_width;
                assert!(
                    (share - expected).abs() < 1e-3,
                    "step {step} channel {channel} level {level}: {share} vs {expected}"
                );
            }
        }
    }
    let text = model.manifest.to_json();
    assert_eq!(ModelManifest::from_json(&text).unwrap(), model.manifest);
    // Format 3 models, saved before the band width, have no season, and keep the instance
    // scale alone.
    let mut older = serde_json::to_value(&model.manifest).unwrap();
    older["format"] = serde_json::json!(3);
    older["calibration"]
        .as_object_mut()
        .unwrap()
        .remove("season")
        .unwrap();
    let older = ModelManifest::from_json(&older.to_string()).unwrap();
    assert_eq!(older.calibration.season(), 1);
    assert_eq!(
        older.format, model.manifest.format,
        "read as the current format"
    );

    // Offsets for fewer steps than the horizon are refused on load.
    let mut short = model.manifest.clone();
    short.calibration = QuantileCalibration::Residual {
        offsets: offsets[..HORIZON - 1].to_vec(),
        season: *season,
    };
    let err = XlstmModel::from_parts(&model.weights_bytes().unwrap(), short, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(err.contains("needs"), "{err}");
}

#[test]
fn format_1_manifests_load_with_their_shifts() {
    let model = trained();
    let data = series_data(600, 3, 11);
    let levels = model.quantile_levels().len();
    let weights = model.weights_bytes().unwrap();
    // A format 1 manifest: one shift per level in `calibration`, and neither head_rank nor
    // calibration_buckets in the preset.
    let load_with_shift = |shift: f32| {
        let mut old = serde_json::to_value(&model.manifest).unwrap();
        old["format"] = serde_json::json!(1);
        old["calibration"] = serde_json::json!(vec![shift; levels]);
        let preset_model = old["preset"]["model"].as_object_mut().unwrap();
        preset_model.remove("head_rank");
        preset_model.remove("calibration_buckets");
        let manifest = ModelManifest::from_json(&old.to_string()).unwrap();
        assert_eq!(
            manifest.calibration,
            QuantileCalibration::Shift {
                shifts: vec![shift; levels]
            }
        );
        assert_eq!(manifest.preset.model.calibration_buckets, 1);
        XlstmModel::from_parts(&weights, manifest, &Device::Cpu).unwrap()
    };
    let plain = forecast_latest(&load_with_shift(0.0), &data, HORIZON).unwrap();
    let shifted = forecast_latest(&load_with_shift(0.5), &data, HORIZON).unwrap();
    // The shifts move every quantile up and leave the point forecast alone.
    assert_eq!(plain.mean, shifted.mean);
    for (plain_step, shifted_step) in plain.quantiles.iter().zip(&shifted.quantiles) {
        for (plain_cell, shifted_cell) in plain_step.iter().zip(shifted_step) {
            for (low, high) in plain_cell.iter().zip(shifted_cell) {
                assert!(high > low, "{low} {high}");
            }
        }
    }
}

#[test]
fn models_saved_with_one_deep_weight_use_it_at_every_step() {
    let model = trained();
    let data = series_data(600, 3, 11);
    let dir = tempfile::tempdir().unwrap();
    let with_deep_scale = |deep_scale: Tensor| {
        let mut tensors =
            candle_core::safetensors::load_buffer(&model.weights_bytes().unwrap(), &Device::Cpu)
                .unwrap();
        tensors.insert("deep_scale".to_string(), deep_scale);
        let path = dir.path().join("weights.safetensors");
        candle_core::safetensors::save(&tensors, &path).unwrap();
        let weights = std::fs::read(&path).unwrap();
        XlstmModel::from_parts(&weights, model.manifest.clone(), &Device::Cpu).unwrap()
    };
    let one = with_deep_scale(Tensor::new(&[0.25f32], &Device::Cpu).unwrap());
    let per_step = with_deep_scale(Tensor::new(&[0.25f32; HORIZON], &Device::Cpu).unwrap());
    let whole = with_deep_scale(Tensor::new(&[1f32; HORIZON], &Device::Cpu).unwrap());
    let forecast = |model: &XlstmModel| forecast_latest(model, &data, HORIZON).unwrap().mean;
    assert_eq!(forecast(&one), forecast(&per_step));
    assert_ne!(forecast(&one), forecast(&whole));
}

#[test]
fn models_of_another_shape_or_format_are_refused_with_the_reason() {
    let model = trained();
    let weights = model.weights_bytes().unwrap();

    let mut wider = model.manifest.clone();
    wider.preset.model.xlstm.embedding_dim = 32;
    let err = XlstmModel::from_parts(&weights, wider, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("has shape") && err.contains("in the weights"),
        "{err}"
    );

    let mut deeper = model.manifest.clone();
    deeper.preset.model.xlstm.num_blocks = 3;
    let err = XlstmModel::from_parts(&weights, deeper, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("the weights lack parameter stack.blocks.2"),
        "{err}"
    );

    let mut newer = serde_json::to_value(&model.manifest).unwrap();
    newer["format"] = serde_json::json!(99);
    let err = ModelManifest::from_json(&newer.to_string())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("model format 99") && err.contains("reads formats 1 to 4"),
        "{err}"
    );

    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("model");
    write_dir(&out, &weights, &model.manifest, false).unwrap();
    std::fs::write(out.join(MANIFEST_FILE), "{").unwrap();
    let err = read_dir(&out).unwrap_err().to_string();
    assert!(err.contains("manifest is not JSON"), "{err}");

    let err = XlstmModel::from_parts(b"not safetensors", model.manifest.clone(), &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(err.contains("not a safetensors file"), "{err}");
}

#[test]
fn fine_tuning_makes_a_child_that_records_its_parent() {
    let parent = trained();
    let newer = series_data(700, 3, 11);
    let parent_ref = ParentModel {
        version_id: Some(41),
        data_to: parent.manifest.data.as_ref().unwrap().data_to,
        library_version: parent.manifest.library_version.clone(),
    };
    let child = finetune_on_series(
        &parent,
        parent_ref.clone(),
        &newer,
        DEFAULT_VALIDATION_FRACTION,
        None,
    )
    .unwrap();
    assert_eq!(child.manifest.parent, Some(parent_ref));
    assert_eq!(child.manifest.shape, parent.manifest.shape);
    let (parent_data, child_data) = (
        parent.manifest.data.clone().unwrap(),
        child.manifest.data.clone().unwrap(),
    );
    assert_eq!(
        child_data.zscore_mean, parent_data.zscore_mean,
        "same preprocessing"
    );
    assert!(child_data.data_to > parent_data.data_to);
    assert!(child.manifest.training.epochs <= child.manifest.preset.training.finetune_max_epochs);
    // It trained (it may keep its starting weights when no epoch beats them on validation).
    assert!(child.manifest.training.history.len() >= 2);
    assert!(child.parameter_count() > 0);

    let other_channels = series_data(700, 2, 11);
    let err = finetune_on_series(
        &child,
        ParentModel {
            version_id: None,
            data_to: None,
            library_version: "x".into(),
        },
        &other_channels,
        DEFAULT_VALIDATION_FRACTION,
        None,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("the model was trained on channels"), "{err}");
}

#[test]
fn forecasts_continue_the_series_in_its_units() {
    let model = trained();
    let data = series_data(600, 3, 11);
    let forecast = forecast_latest(&model, &data, 5).unwrap();
    let step = 3_600_000_000_i64;
    let last = *data.ts_micros.last().unwrap();
    assert_eq!(forecast.origin.timestamp_micros(), last);
    let expected: Vec<i64> = (1..=5).map(|k| last + k * step).collect();
    let got: Vec<i64> = forecast
        .timestamps
        .iter()
        .map(|t| t.timestamp_micros())
        .collect();
    assert_eq!(got, expected);
    assert_eq!(forecast.mean.len(), 5);
    // In the series' units: near the recent level of each channel, not near 0.
    for channel in 0..3 {
        let recent: f32 = (0..24)
            .map(|back| data.matrix.values[(600 - 1 - back) * 3 + channel])
            .sum::<f32>()
            / 24.0;
        let forecast_mean = forecast.mean.iter().map(|step| step[channel]).sum::<f32>() / 5.0;
        let spread = data
            .matrix
            .values
            .iter()
            .skip(channel)
            .step_by(3)
            .fold(0.0_f32, |m, v| m.max(v.abs()));
        assert!(
            (forecast_mean - recent).abs() < spread,
            "channel {channel}: {forecast_mean} vs {recent}"
        );
    }
    let err = forecast_latest(&model, &data, HORIZON + 1)
        .unwrap_err()
        .to_string();
    assert!(err.contains(&format!("model's horizon {HORIZON}")), "{err}");
}
