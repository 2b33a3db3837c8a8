//! `xlstm-forecast train`: train (or fine-tune) an xLSTM forecaster on a series and write
//! the model directory (weights + manifest), all at once.

use std::path::PathBuf;

use anyhow::{Context, bail};

use crate::config::Settings;
use crate::forecast::DEFAULT_PRESET;
use crate::forecast::xlstm::artefact::{read_dir, write_dir};
use crate::forecast::xlstm::{
    DEFAULT_VALIDATION_FRACTION, ParentModel, Preset, XlstmForecaster, XlstmModel,
    finetune_on_series, train_on_series,
};

use super::progress::TrainingProgressPrinter;
use super::series_source::SeriesSourceArgs;
use crate::device::DeviceChoice;

#[derive(Debug, clap::Args)]
pub struct TrainArgs {
    #[command(flatten)]
    pub source: SeriesSourceArgs,
    /// Preset name (tiny, small, base) or a preset .toml file.
    #[arg(long, value_name = "NAME", default_value = DEFAULT_PRESET)]
    pub preset: String,
    /// Lookback L in rows (default: the preset's).
    #[arg(long, value_name = "L")]
    pub lookback: Option<usize>,
    /// Horizon H in rows (default: the preset's).
    #[arg(long, value_name = "H")]
    pub horizon: Option<usize>,
    /// New directory for the model (model.safetensors + model.json).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Warm-start from this model directory on the given (newer) data, with its preset,
    /// lookback, horizon and preprocessing, at the fine-tuning learning rate.
    #[arg(long, value_name = "DIR")]
    pub finetune_from: Option<PathBuf>,
    /// Caps the training epochs.
    #[arg(long, value_name = "N")]
    pub max_epochs: Option<usize>,
    /// Seed for initialisation, window order and dropout (default: the preset's).
    #[arg(long, value_name = "S")]
    pub seed: Option<u64>,
    /// Share of the most recent rows held out for validation.
    #[arg(long, value_name = "F", default_value_t = DEFAULT_VALIDATION_FRACTION)]
    pub validation_fraction: f64,
    /// auto, cpu, cuda or cuda:N (auto: CUDA when this build has it and a GPU is usable).
    #[arg(long, value_name = "DEVICE", default_value = "auto")]
    pub device: DeviceChoice,
    /// Print the manifest's summary as one JSON object.
    #[arg(long)]
    pub json: bool,
}

pub async fn run(args: TrainArgs, settings: &Settings) -> anyhow::Result<()> {
    if args.out.exists() {
        bail!(
            "--out: {} already exists; choose a new directory",
            args.out.display()
        );
    }
    if args.max_epochs == Some(0) {
        bail!("--max-epochs: must be at least 1");
    }
    let device = args.device.open().context("--device")?;
    let data = args.source.load(settings).await?;
    let mut progress = TrainingProgressPrinter::new();
    let mut show = |p: &_| progress.show(p);
    let model = match &args.finetune_from {
        Some(parent_dir) => {
            if args.lookback.is_some() || args.horizon.is_some() {
                bail!("--lookback/--horizon: a fine-tune keeps its parent's; drop them");
            }
            let (weights, manifest) = read_dir(parent_dir)?;
            let mut parent = XlstmModel::from_parts(&weights, manifest, &device)?;
            let training = &mut parent.manifest.preset.training;
            if let Some(max_epochs) = args.max_epochs {
                training.finetune_max_epochs = max_epochs;
            }
            if let Some(seed) = args.seed {
                training.seed = seed;
            }
            let parent_ref = ParentModel {
                version_id: None,
                data_to: parent.manifest.data.as_ref().and_then(|d| d.data_to),
                library_version: parent.manifest.library_version.clone(),
            };
            finetune_on_series(
                &parent,
                parent_ref,
                &data,
                args.validation_fraction,
                Some(&mut show),
            )?
        }
        None => {
            let mut preset = Preset::load(&args.preset)?;
            if let Some(max_epochs) = args.max_epochs {
                preset.training.max_epochs = max_epochs;
            }
            if let Some(seed) = args.seed {
                preset.training.seed = seed;
            }
            let lookback = args.lookback.unwrap_or(preset.lookback);
            let horizon = args.horizon.unwrap_or(preset.horizon);
            let forecaster = XlstmForecaster::new(preset, device);
            train_on_series(
                &forecaster,
                &data,
                lookback,
                horizon,
                args.validation_fraction,
                Some(&mut show),
            )?
        }
    };
    progress.finish();
    write_dir(&args.out, &model.weights_bytes()?, &model.manifest, false)?;
    let manifest = &model.manifest;
    if args.json {
        let summary = serde_json::json!({
            "out": args.out,
            "preset": manifest.preset.name,
            "lookback": manifest.shape.lookback,
            "horizon": manifest.shape.horizon,
            "channels": manifest.shape.channels,
            "epochs": manifest.training.epochs,
            "best_epoch": manifest.training.best_epoch,
            "stopped_early": manifest.training.stopped_early,
            "train_seconds": manifest.training.train_seconds,
            "metrics": manifest.metrics,
            "finetuned_from": args.finetune_from,
        });
        println!("{summary}");
    } else {
        let metric = |key: &str| {
            manifest
                .metrics
                .get(key)
                .and_then(serde_json::Value::as_f64)
                .unwrap_or(f64::NAN)
        };
        println!(
            "trained {} (lookback {}, horizon {}, {} channels) in {} epochs ({:.1} s), best \
             epoch {}: validation mse {:.4}, mae {:.4}, coverage_80 {:.3}; written to {}",
            manifest.preset.name,
            manifest.shape.lookback,
            manifest.shape.horizon,
            manifest.shape.channels,
            manifest.training.epochs,
            manifest.training.train_seconds,
            manifest.training.best_epoch,
            metric("val_mse"),
            metric("val_mae"),
            metric("coverage_80"),
            args.out.display()
        );
    }
    Ok(())
}
