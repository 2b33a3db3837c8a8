//! The xLSTM forecaster: presets, the network (RevIN, patching, the residual xLSTM stack,
//! point and quantile heads), the trainer, and artefacts.

pub mod artefact;
mod forecaster;
mod init;
pub mod network;
pub mod preset;
pub mod series;
pub mod train;

pub use artefact::{DataDescription, ModelManifest, ParentModel, QuantileCalibration};
pub use forecaster::{XlstmForecaster, XlstmModel};
pub use network::NetworkShape;
pub use preset::{
    CalibrationMethod, ChannelMode, ForecasterConfig, PointLoss, Preset, TrainingConfig,
};
pub use series::{
    DEFAULT_VALIDATION_FRACTION, SeriesData, SeriesForecast, finetune_on_series, forecast_latest,
    recent_validation_mse, train_on_series,
};
pub use train::{EpochRecord, ProgressCallback, TrainingProgress, TrainingSummary};
