use crate::store::StoreError;

/// Errors of the data pipelines. `Invalid` is always the caller's data (HTTP 400/422); the
/// others are environment failures.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// Bad input. `line` is the 1-based line of the CSV file (the header is line 1) where the
    /// offending record starts; `column` is the CSV column (or channel) concerned.
    #[error("{}", describe_invalid(*line, column.as_deref(), message))]
    Invalid {
        line: Option<u64>,
        column: Option<String>,
        message: String,
    },
    #[error("unknown series '{name}'")]
    UnknownSeries { name: String },
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("polars: {0}")]
    Polars(#[from] polars::error::PolarsError),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

impl DataError {
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::Invalid {
            line: None,
            column: None,
            message: message.into(),
        }
    }

    pub fn invalid_column(column: &str, message: impl Into<String>) -> Self {
        Self::Invalid {
            line: None,
            column: Some(column.to_string()),
            message: message.into(),
        }
    }

    pub fn invalid_at(line: u64, column: Option<&str>, message: impl Into<String>) -> Self {
        Self::Invalid {
            line: Some(line),
            column: column.map(str::to_string),
            message: message.into(),
        }
    }
}

fn describe_invalid(line: Option<u64>, column: Option<&str>, message: &str) -> String {
    match (line, column) {
        (Some(line), Some(column)) => format!("line {line}, column '{column}': {message}"),
        (Some(line), None) => format!("line {line}: {message}"),
        (None, Some(column)) => format!("column '{column}': {message}"),
        (None, None) => message.to_string(),
    }
}
