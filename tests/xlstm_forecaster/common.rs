use candle_core::Device;
use xlstm_forecast::data::ChannelMatrix;
use xlstm_forecast::forecast::synthetic::{SyntheticKind, SyntheticSpec, generate};
use xlstm_forecast::forecast::xlstm::{Preset, SeriesData, XlstmForecaster};
use xlstm_forecast::forecast::{SplitRows, TrainingData, ZScore};

pub const LOOKBACK: usize = 48;
pub const HORIZON: usize = 12;

/// The `tiny` preset cut down to a couple of seconds of training.
pub fn quick_preset() -> Preset {
    let mut preset = Preset::load("tiny").unwrap();
    preset.training.max_epochs = 2;
    preset.training.max_windows_per_epoch = Some(64);
    preset.training.max_validation_windows = Some(64);
    preset
}

pub fn forecaster(preset: Preset) -> XlstmForecaster {
    XlstmForecaster::new(preset, Device::Cpu)
}

/// A z-scored synthetic hourly series with its split.
pub struct Prepared {
    pub matrix: ChannelMatrix,
    pub split: SplitRows,
}

impl Prepared {
    pub fn new(rows: usize, channels: usize, missing_fraction: f64) -> Self {
        let mut spec = SyntheticSpec::new(SyntheticKind::Hourly, rows, channels, 7);
        spec.missing_fraction = missing_fraction;
        let mut matrix = generate(&spec).unwrap().matrix;
        let split = SplitRows {
            train: rows * 6 / 10,
            validation: rows * 2 / 10,
            test: rows - rows * 6 / 10 - rows * 2 / 10,
        };
        ZScore::fit(&matrix, split.train_range())
            .unwrap()
            .apply(&mut matrix);
        Self { matrix, split }
    }

    pub fn data(&self) -> TrainingData<'_> {
        TrainingData {
            series: &self.matrix,
            lookback: LOOKBACK,
            horizon: HORIZON,
            season: 24,
            train: self.split.train_windows(LOOKBACK, HORIZON).unwrap(),
            validation: self.split.validation_windows(LOOKBACK, HORIZON).unwrap(),
        }
    }
}

/// A synthetic series in its own units, as the CLI and the service hold it.
pub fn series_data(rows: usize, channels: usize, seed: u64) -> SeriesData {
    let series = generate(&SyntheticSpec::new(
        SyntheticKind::Hourly,
        rows,
        channels,
        seed,
    ))
    .unwrap();
    SeriesData {
        series: Some("synthetic".into()),
        channels: series.channel_names.clone(),
        ts_micros: (0..rows).map(|row| series.timestamp_micros(row)).collect(),
        matrix: series.matrix,
        frequency: Some(SyntheticKind::Hourly.frequency()),
    }
}
