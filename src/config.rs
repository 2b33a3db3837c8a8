//! Effective settings: defaults, an optional TOML file, environment overrides.

use std::path::Path;

#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Settings {}

impl Settings {
    pub fn load(_file: Option<&Path>) -> anyhow::Result<Self> {
        Ok(Self::default())
    }
}
