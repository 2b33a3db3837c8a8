//! Champion models kept in memory, so a forecast reads no artefact from the store: at most a
//! byte budget of weights, least recently used evicted first. A version's weights never change,
//! so an entry is valid for as long as it is cached; promotion simply makes another version the
//! one looked up. Entries are keyed by id and creation time (`VersionRef`), because SQLite may
//! reuse a deleted version's id.

use std::sync::{Arc, Mutex};

use candle_core::Device;

use crate::forecast::ForecastError;
use crate::forecast::xlstm::XlstmModel;
use crate::jobs::training::load_model_version;
use crate::store::{ModelVersion, VersionRef};

pub const DEFAULT_MODEL_CACHE_BYTES: usize = 256 * 1024 * 1024;

pub struct ModelCache {
    budget_bytes: usize,
    /// Most recently used last: `(version, model, artefact bytes)`.
    entries: Mutex<Vec<(VersionRef, Arc<XlstmModel>, usize)>>,
}

impl ModelCache {
    pub fn new(budget_bytes: usize) -> Self {
        Self {
            budget_bytes,
            entries: Mutex::new(Vec::new()),
        }
    }

    pub fn get(&self, version: VersionRef) -> Option<Arc<XlstmModel>> {
        let mut entries = self.entries.lock().expect("model cache lock poisoned");
        let position = entries.iter().position(|(held, _, _)| *held == version)?;
        let entry = entries.remove(position);
        let model = entry.1.clone();
        entries.push(entry);
        Some(model)
    }

    /// Builds the model of `version` and keeps it (unless it alone exceeds the budget).
    pub fn insert(&self, version: &ModelVersion) -> Result<Arc<XlstmModel>, ForecastError> {
        let model = Arc::new(load_model_version(version, &Device::Cpu)?);
        let bytes = version.artefact.len();
        let mut entries = self.entries.lock().expect("model cache lock poisoned");
        let key = VersionRef {
            id: version.summary.id,
            created_at: version.summary.created_at,
        };
        entries.retain(|(held, _, _)| held.id != key.id);
        if bytes <= self.budget_bytes {
            let mut used: usize = entries.iter().map(|(_, _, b)| b).sum();
            while used + bytes > self.budget_bytes && !entries.is_empty() {
                used -= entries.remove(0).2;
            }
            entries.push((key, model.clone(), bytes));
        }
        Ok(model)
    }

    pub fn cached_bytes(&self) -> usize {
        let entries = self.entries.lock().expect("model cache lock poisoned");
        entries.iter().map(|(_, _, b)| b).sum()
    }
}
