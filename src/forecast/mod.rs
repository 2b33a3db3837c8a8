//! Forecasting on top of the model library: the window/forecast types and the `Fit` →
//! `Predict` traits every forecaster implements, instance normalisation (RevIN), windowing and
//! the long-horizon split protocol, metrics, the built-in baselines, the `eval` protocol and
//! a synthetic data generator. Nothing here knows about HTTP or SQL.

pub mod band;
pub mod baseline;
pub mod error;
pub mod eval;
mod linalg;
pub mod metrics;
pub mod model;
pub mod revin;
pub mod synthetic;
pub mod window;
pub mod xlstm;

pub use baseline::{LinearBaseline, LinearModel, SeasonalNaive, SeasonalNaiveModel};
pub use error::ForecastError;
pub use eval::{
    DEFAULT_PRESET, EvalOptions, EvalReport, ModelChoice, evaluate, evaluate_with_progress,
    seasonal_period_for,
};
pub use metrics::{ChannelMetrics, Metrics, MetricsAccumulator};
pub use model::{
    DEFAULT_QUANTILE_LEVELS, Fit, Fitted, Forecast, Predict, Targets, TrainingData, WindowBatch,
};
pub use revin::{Centre, InstanceNorm, InstanceStats};
pub use window::{SplitRows, SplitSpec, WindowSet, ZScore};
