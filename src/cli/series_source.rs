//! Where `train` and `forecast` read a series from: a wide CSV file or a series in the store.

use std::path::PathBuf;

use crate::config::Settings;
use crate::data::{FrameOptions, load_frame};
use crate::forecast::xlstm::SeriesData;
use crate::store;

use super::wide_csv::read_wide_csv;

#[derive(Debug, clap::Args)]
#[group(required = true, multiple = false)]
pub struct SeriesSourceArgs {
    /// Wide CSV: timestamp first, then one column per channel; empty cells are missing.
    #[arg(long, value_name = "FILE")]
    pub csv: Option<PathBuf>,
    /// A series in the configured store (regularised to its frequency, short gaps
    /// interpolated).
    #[arg(long, value_name = "NAME")]
    pub series: Option<String>,
}

impl SeriesSourceArgs {
    pub async fn load(&self, settings: &Settings) -> anyhow::Result<SeriesData> {
        if let Some(path) = &self.csv {
            let table = read_wide_csv(path)?;
            return Ok(SeriesData {
                series: None,
                channels: table.channels,
                ts_micros: table.ts_micros,
                matrix: table.matrix,
                frequency: None,
            });
        }
        let name = self
            .series
            .as_deref()
            .expect("clap requires --csv or --series");
        let store = store::connect(&settings.database_url()).await?;
        let frame = load_frame(
            store.as_ref(),
            name,
            None,
            None,
            &FrameOptions::for_forecasting(),
        )
        .await?;
        Ok(SeriesData::from_frame(&frame)?)
    }
}
