//! Polars pipelines between CSV files, the store and models: ingest (parse, validate,
//! dedupe, sort), frames (pivot long→wide, regularise, fill gaps, calendar features) and
//! export.

mod csv_records;
pub mod error;
pub mod export;
pub mod frame;
pub mod frequency;
pub mod ingest;
pub mod timestamp;

pub use error::DataError;
pub use export::write_frame_csv;
pub use frame::{
    CALENDAR_COLUMNS, CALENDAR_FEATURES, ChannelMatrix, FrameOptions, SeriesFrame, build_frame,
    calendar_rows, load_frame,
};
pub use frequency::{Frequency, FrequencyError, infer_frequency};
pub use ingest::{ImportOptions, ImportReport, import_csv, import_csv_file};
