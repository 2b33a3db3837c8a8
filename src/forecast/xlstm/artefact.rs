//! A trained xLSTM forecaster on disk or in the store: the weights as one safetensors file and
//! a JSON manifest with everything needed to use them again — the preset (architecture and
//! training settings), the data shape, the quantile calibration, the preprocessing, the
//! training data range, the training history, metrics, the parent model of a fine-tune and the
//! library version. Loading checks the format version and that the weights fit the
//! architecture exactly, so a model of another shape or version fails with a clear message.

use std::fs;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::super::error::ForecastError;
use super::network::NetworkShape;
use super::preset::Preset;
use super::train::TrainingSummary;

/// Version of the artefact layout; bumped when the layout changes. Format 2 replaced the
/// per-level `calibration` shifts of format 1 by a [`QuantileCalibration`]; format 1 files
/// are still read (their shifts become [`QuantileCalibration::Shift`]). Format 3 added
/// [`QuantileCalibration::Residual`]; format 4 its `season` (band widths), which format 3
/// residual calibrations read as 1, the instance scale they were calibrated on.
pub const ARTEFACT_FORMAT: u32 = 4;
/// The oldest format this build reads.
pub const OLDEST_READABLE_FORMAT: u32 = 1;
pub const WEIGHTS_FILE: &str = "model.safetensors";
pub const MANIFEST_FILE: &str = "model.json";

/// The data a model was trained on, in the caller's terms. Models fitted inside `eval` (on an
/// already z-scored matrix) have none.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DataDescription {
    pub series: Option<String>,
    pub channels: Vec<String>,
    /// The series' frequency as text (e.g. "1h"), when known.
    pub frequency: Option<String>,
    /// Per-channel z-scoring applied before the model (training-split statistics).
    pub zscore_mean: Vec<f64>,
    pub zscore_std: Vec<f64>,
    /// Timestamps of the first and last rows used (training and validation).
    pub data_from: Option<DateTime<Utc>>,
    pub data_to: Option<DateTime<Utc>>,
    pub train_rows: usize,
    pub validation_rows: usize,
}

/// Where a fine-tuned model came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ParentModel {
    /// The parent's model-version id in the store, when it came from one.
    pub version_id: Option<i64>,
    pub data_to: Option<DateTime<Utc>>,
    pub library_version: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelManifest {
    pub format: u32,
    pub library_version: String,
    pub kind: String,
    pub preset: Preset,
    pub shape: NetworkShape,
    /// How the raw quantiles are adjusted so that the levels hold empirically on the
    /// validation windows (conformal calibration), on the windows' own scale.
    pub calibration: QuantileCalibration,
    pub training: TrainingSummary,
    pub data: Option<DataDescription>,
    pub parent: Option<ParentModel>,
    /// Validation metrics (`val_mse`, `val_mae`, `coverage_80`, ...), free-form.
    pub metrics: serde_json::Map<String, serde_json::Value>,
}

/// The adjustment of the network's raw quantiles fitted on the validation windows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "method", rename_all = "snake_case", deny_unknown_fields)]
pub enum QuantileCalibration {
    /// One additive shift per level over every horizon step (format 1 models).
    Shift { shifts: Vec<f32> },
    /// The horizon cut into buckets of `bucket_len` consecutive steps (the last may be
    /// shorter); in each, every level's offset from the point forecast is multiplied by its
    /// factor, `factors[bucket][level]`. Scaling keeps the band's per-window width learnt by
    /// the quantile head and lets the band widen with the step.
    Scale {
        bucket_len: usize,
        factors: Vec<Vec<f32>>,
    },
    /// Per horizon step, every level's offset from the point forecast in band widths,
    /// `offsets[step][level]`: the empirical quantiles of the calibration residuals, each
    /// divided by its window's band width ([`crate::forecast::band`], with `season` steps per
    /// season). The quantile head's band is not used. Models saved before the band width
    /// have no `season`: 1, the instance scale alone, as they were calibrated.
    Residual {
        offsets: Vec<Vec<f32>>,
        #[serde(default = "no_season")]
        season: usize,
    },
}

fn no_season() -> usize {
    1
}

impl QuantileCalibration {
    /// The season that sets each window's band width; 1 (the instance scale alone) for the
    /// methods that keep the quantile head's band.
    pub fn season(&self) -> usize {
        match self {
            Self::Residual { season, .. } => *season,
            Self::Shift { .. } | Self::Scale { .. } => 1,
        }
    }

    /// Checks that the calibration fits `horizon` steps and `levels` quantile levels.
    pub fn check(&self, horizon: usize, levels: usize) -> Result<(), ForecastError> {
        let invalid = |message: String| Err(ForecastError::invalid("model", message));
        match self {
            Self::Shift { shifts } if shifts.len() != levels => invalid(format!(
                "the manifest has {} calibration shifts for {levels} quantile levels",
                shifts.len()
            )),
            Self::Scale { bucket_len: 0, .. } => {
                invalid("the manifest's calibration buckets are 0 steps long".to_string())
            }
            Self::Scale {
                bucket_len,
                factors,
            } if factors.len() != horizon.div_ceil(*bucket_len)
                || factors.iter().any(|bucket| bucket.len() != levels) =>
            {
                invalid(format!(
                    "the manifest's calibration has {} buckets of {bucket_len} steps with {:?} \
                     factors each; horizon {horizon} with {levels} quantile levels needs {} \
                     buckets of {levels}",
                    factors.len(),
                    factors.iter().map(Vec::len).collect::<Vec<_>>(),
                    horizon.div_ceil(*bucket_len)
                ))
            }
            Self::Residual { offsets, .. }
                if offsets.len() != horizon || offsets.iter().any(|step| step.len() != levels) =>
            {
                invalid(format!(
                    "the manifest's residual calibration has {} steps; horizon {horizon} with \
                     {levels} quantile levels needs {horizon} steps of {levels} offsets",
                    offsets.len()
                ))
            }
            _ => Ok(()),
        }
    }

    /// Calibrates one cell's raw quantiles (ascending levels) at horizon step `step` around
    /// its point forecast `point`, all on the windows' own scale; `band_width` is the cell's
    /// window's (residual calibration only). The result is ascending.
    pub fn apply(&self, step: usize, point: f32, band_width: f32, quantiles: &mut [f32]) {
        match self {
            Self::Shift { shifts } => {
                for (value, shift) in quantiles.iter_mut().zip(shifts) {
                    *value += shift;
                }
            }
            Self::Scale {
                bucket_len,
                factors,
            } => {
                for (value, factor) in quantiles.iter_mut().zip(&factors[step / bucket_len]) {
                    *value = point + factor * (*value - point);
                }
            }
            Self::Residual { offsets, .. } => {
                for (value, offset) in quantiles.iter_mut().zip(&offsets[step]) {
                    *value = point + offset * band_width;
                }
            }
        }
        // Adjustments differ per level, so restore the order the head guarantees.
        quantiles.sort_unstable_by(f32::total_cmp);
    }
}

impl ModelManifest {
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a manifest always serialises")
    }

    /// Parses a manifest, refusing other formats and kinds before looking at the rest. An
    /// older manifest is read as this format: format 1 shifts become
    /// [`QuantileCalibration::Shift`], and what later formats added takes its default.
    pub fn from_json(text: &str) -> Result<Self, ForecastError> {
        let mut value: serde_json::Value = serde_json::from_str(text).map_err(|err| {
            ForecastError::invalid("model", format!("manifest is not JSON: {err}"))
        })?;
        let format = value.get("format").and_then(serde_json::Value::as_u64);
        let readable = u64::from(OLDEST_READABLE_FORMAT)..=u64::from(ARTEFACT_FORMAT);
        if !format.is_some_and(|format| readable.contains(&format)) {
            let written_by = value
                .get("library_version")
                .and_then(serde_json::Value::as_str)
                .unwrap_or("an unknown version");
            return Err(ForecastError::invalid(
                "model",
                format!(
                    "model format {} (written by xlstm-forecast {written_by}) cannot be read by \
                     this build, which reads formats {OLDEST_READABLE_FORMAT} to \
                     {ARTEFACT_FORMAT} (xlstm-forecast {})",
                    format.map_or("missing".to_string(), |f| f.to_string()),
                    env!("CARGO_PKG_VERSION")
                ),
            ));
        }
        if format == Some(1) {
            let shifts = value
                .get_mut("calibration")
                .map(serde_json::Value::take)
                .unwrap_or_default();
            value["calibration"] = serde_json::json!({ "method": "shift", "shifts": shifts });
        }
        value["format"] = serde_json::json!(ARTEFACT_FORMAT);
        let manifest: Self = serde_json::from_value(value)
            .map_err(|err| ForecastError::invalid("model", format!("manifest: {err}")))?;
        if manifest.kind != "xlstm" {
            return Err(ForecastError::invalid(
                "model",
                format!(
                    "manifest is for a {:?} model, expected \"xlstm\"",
                    manifest.kind
                ),
            ));
        }
        Ok(manifest)
    }
}

/// Writes `weights` and `manifest` into the new directory `dir` all at once: both files go
/// into a sibling temporary directory that is renamed into place, so a crash never leaves a
/// half-written model behind. An existing `dir` is an error unless `replace`.
pub fn write_dir(
    dir: &Path,
    weights: &[u8],
    manifest: &ModelManifest,
    replace: bool,
) -> Result<(), ForecastError> {
    let io = |what: &str, path: &Path, err: std::io::Error| {
        ForecastError::invalid("out", format!("{what} {}: {err}", path.display()))
    };
    if dir.exists() && !replace {
        return Err(ForecastError::invalid(
            "out",
            format!("{} already exists; choose a new directory", dir.display()),
        ));
    }
    let parent = match dir.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
        _ => PathBuf::from("."),
    };
    fs::create_dir_all(&parent).map_err(|err| io("cannot create", &parent, err))?;
    let name = dir.file_name().ok_or_else(|| {
        ForecastError::invalid("out", format!("{} names no directory", dir.display()))
    })?;
    let staging = parent.join(format!(
        ".{}.partial-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    if staging.exists() {
        fs::remove_dir_all(&staging).map_err(|err| io("cannot clear", &staging, err))?;
    }
    fs::create_dir(&staging).map_err(|err| io("cannot create", &staging, err))?;
    let write = || -> Result<(), ForecastError> {
        write_synced(&staging.join(WEIGHTS_FILE), weights)
            .map_err(|err| io("cannot write", &staging, err))?;
        write_synced(&staging.join(MANIFEST_FILE), manifest.to_json().as_bytes())
            .map_err(|err| io("cannot write", &staging, err))?;
        if dir.exists() {
            fs::remove_dir_all(dir).map_err(|err| io("cannot replace", dir, err))?;
        }
        fs::rename(&staging, dir).map_err(|err| io("cannot move the model into", dir, err))
    };
    let written = write();
    if written.is_err() {
        let _ = fs::remove_dir_all(&staging);
    }
    written
}

fn write_synced(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut file = fs::File::create(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

/// Reads the weights and manifest written by [`write_dir`].
pub fn read_dir(dir: &Path) -> Result<(Vec<u8>, ModelManifest), ForecastError> {
    let read = |file: &str| {
        let path = dir.join(file);
        fs::read(&path).map_err(|err| {
            ForecastError::invalid("model", format!("cannot read {}: {err}", path.display()))
        })
    };
    let manifest_bytes = read(MANIFEST_FILE)?;
    let text = String::from_utf8(manifest_bytes)
        .map_err(|_| ForecastError::invalid("model", format!("{MANIFEST_FILE} is not UTF-8")))?;
    let manifest = ModelManifest::from_json(&text)?;
    Ok((read(WEIGHTS_FILE)?, manifest))
}
