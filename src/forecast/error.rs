/// Errors of the forecasting layer. `InvalidArgument` is the caller's input (a bad lookback,
/// split or shape); `Unavailable` names a model this build cannot run; `Numerical` is a
/// failure of the maths on valid input (a singular system on degenerate data, a diverged
/// training run); `Cancelled` is a run stopped by its caller.
#[derive(Debug, thiserror::Error)]
pub enum ForecastError {
    #[error("{argument}: {message}")]
    InvalidArgument { argument: String, message: String },
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Numerical(String),
    /// The progress callback asked the run to stop.
    #[error("training was cancelled")]
    Cancelled,
    #[error("candle: {0}")]
    Candle(#[from] candle_core::Error),
}

impl ForecastError {
    pub fn invalid(argument: &str, message: impl Into<String>) -> Self {
        Self::InvalidArgument {
            argument: argument.to_string(),
            message: message.into(),
        }
    }
}
