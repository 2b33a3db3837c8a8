//! `xlstm-forecast forecast`: forecast the steps after the last row of a series with a
//! trained model directory.

use std::path::PathBuf;

use anyhow::{Context, bail};

use crate::config::Settings;
use crate::device::DeviceChoice;
use crate::forecast::Predict;
use crate::forecast::xlstm::artefact::read_dir;
use crate::forecast::xlstm::{SeriesForecast, XlstmModel, forecast_latest};

use super::series_source::SeriesSourceArgs;

#[derive(Debug, clap::Args)]
pub struct ForecastArgs {
    /// Model directory written by `train`.
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    #[command(flatten)]
    pub source: SeriesSourceArgs,
    /// Steps to forecast (default and maximum: the model's horizon).
    #[arg(long, value_name = "H")]
    pub horizon: Option<usize>,
    /// Quantile levels to print, comma-separated, among the model's (default: all).
    #[arg(long, value_name = "LEVELS", value_delimiter = ',')]
    pub quantiles: Option<Vec<f32>>,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
    /// auto, cpu, cuda or cuda:N (auto: CUDA when this build has it and a GPU is usable).
    #[arg(long, value_name = "DEVICE", default_value = "auto")]
    pub device: DeviceChoice,
}

pub async fn run(args: ForecastArgs, settings: &Settings) -> anyhow::Result<()> {
    let (weights, manifest) = read_dir(&args.model)?;
    let device = args.device.open().context("--device")?;
    let model = XlstmModel::from_parts(&weights, manifest, &device)?;
    let data = args.source.load(settings).await?;
    let horizon = args.horizon.unwrap_or(model.horizon());
    let forecast = forecast_latest(&model, &data, horizon)?;
    let levels = match &args.quantiles {
        None => (0..forecast.quantile_levels.len()).collect(),
        Some(wanted) => wanted
            .iter()
            .map(|level| {
                forecast
                    .quantile_levels
                    .iter()
                    .position(|known| (known - level).abs() < 1e-6)
                    .ok_or_else(|| {
                        anyhow::anyhow!(
                            "--quantiles: the model has no level {level}; it has {:?}",
                            forecast.quantile_levels
                        )
                    })
            })
            .collect::<anyhow::Result<Vec<usize>>>()?,
    };
    if levels.is_empty() {
        bail!("--quantiles: give at least one level");
    }
    if args.json {
        println!("{}", forecast_json(&forecast, &levels, &model));
    } else {
        print_table(&forecast, &levels);
    }
    Ok(())
}

/// The forecast in the API's shape: per channel the mean and each quantile.
fn forecast_json(
    forecast: &SeriesForecast,
    levels: &[usize],
    model: &XlstmModel,
) -> serde_json::Value {
    let channels: serde_json::Map<String, serde_json::Value> = forecast
        .channels
        .iter()
        .enumerate()
        .map(|(c, name)| {
            let mean: Vec<f32> = forecast.mean.iter().map(|step| step[c]).collect();
            let quantiles: serde_json::Map<String, serde_json::Value> = levels
                .iter()
                .map(|&l| {
                    let values: Vec<f32> =
                        forecast.quantiles.iter().map(|step| step[c][l]).collect();
                    (
                        format!("{}", forecast.quantile_levels[l]),
                        serde_json::json!(values),
                    )
                })
                .collect();
            (
                name.clone(),
                serde_json::json!({ "mean": mean, "quantiles": quantiles }),
            )
        })
        .collect();
    serde_json::json!({
        "origin": forecast.origin,
        "horizon": forecast.timestamps.len(),
        "quantile_levels": levels.iter().map(|&l| forecast.quantile_levels[l]).collect::<Vec<_>>(),
        "timestamps": forecast.timestamps,
        "channels": channels,
        "model": {
            "preset": model.manifest.preset.name,
            "data_to": model.manifest.data.as_ref().and_then(|d| d.data_to),
            "library_version": model.manifest.library_version,
        },
    })
}

fn print_table(forecast: &SeriesForecast, levels: &[usize]) {
    let mut header = vec!["ts".to_string()];
    for channel in &forecast.channels {
        header.push(format!("{channel}.mean"));
        header.extend(
            levels
                .iter()
                .map(|&l| format!("{channel}.q{}", forecast.quantile_levels[l])),
        );
    }
    println!("{}", header.join(","));
    for (step, ts) in forecast.timestamps.iter().enumerate() {
        let mut row = vec![ts.to_rfc3339()];
        for c in 0..forecast.channels.len() {
            row.push(format!("{}", forecast.mean[step][c]));
            row.extend(
                levels
                    .iter()
                    .map(|&l| format!("{}", forecast.quantiles[step][c][l])),
            );
        }
        println!("{}", row.join(","));
    }
}
