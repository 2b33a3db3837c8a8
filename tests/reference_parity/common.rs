//! Loading the reference vectors and comparing tensors with the README's tolerances.

use std::path::PathBuf;

pub fn reference_dir() -> PathBuf {
    std::env::var_os("XLSTM_REFERENCE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/reference"))
}
