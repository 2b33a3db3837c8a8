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

/// Version of the artefact layout; bumped when a change makes old files unreadable.
pub const ARTEFACT_FORMAT: u32 = 1;
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
    /// Additive shift of each quantile level on the windows' own scale, fitted on the
    /// validation windows so that the levels hold empirically (conformal calibration).
    pub calibration: Vec<f32>,
    pub training: TrainingSummary,
    pub data: Option<DataDescription>,
    pub parent: Option<ParentModel>,
    /// Validation metrics (`val_mse`, `val_mae`, `coverage_80`, ...), free-form.
    pub metrics: serde_json::Map<String, serde_json::Value>,
}

impl ModelManifest {
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a manifest always serialises")
    }

    /// Parses a manifest, refusing other formats and kinds before looking at the rest.
    pub fn from_json(text: &str) -> Result<Self, ForecastError> {
        let value: serde_json::Value = serde_json::from_str(text).map_err(|err| {
            ForecastError::invalid("model", format!("manifest is not JSON: {err}"))
        })?;
        let format = value.get("format").and_then(serde_json::Value::as_u64);
        if format != Some(u64::from(ARTEFACT_FORMAT)) {
            let written_by = value
                .get("library_version")
                .and_then(serde_json::Value::as_str)
                .unwrap_or("an unknown version");
            return Err(ForecastError::invalid(
                "model",
                format!(
                    "model format {} (written by xlstm-forecast {written_by}) cannot be read by \
                     this build, which reads format {ARTEFACT_FORMAT} (xlstm-forecast {})",
                    format.map_or("missing".to_string(), |f| f.to_string()),
                    env!("CARGO_PKG_VERSION")
                ),
            ));
        }
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
