//! Loading the reference vectors and comparing tensors with the README's tolerances.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{Device, Tensor};

/// Forward tolerance of reference/README.md: `|a − b| ≤ 1e-4 + 1e-4·|b|`.
pub const FORWARD_TOL: f64 = 1e-4;
/// Gradient tolerance of reference/README.md: `|a − b| ≤ 1e-3 + 1e-3·|b|`.
pub const GRAD_TOL: f64 = 1e-3;

pub fn reference_dir() -> PathBuf {
    std::env::var_os("XLSTM_REFERENCE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/reference"))
}

/// All tensors of one vector file (e.g. `xlstm_block_stack.safetensors`), on the CPU.
pub fn load_vectors(file: &str) -> HashMap<String, Tensor> {
    let path = reference_dir().join(file);
    candle_core::safetensors::load(&path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("cannot load {}: {e}", path.display()))
}

/// Asserts `|actual − expected| ≤ tol + tol·|expected|` elementwise, naming the worst element.
pub fn assert_close(what: &str, actual: &Tensor, expected: &Tensor, tol: f64) {
    assert_eq!(
        actual.dims(),
        expected.dims(),
        "{what}: shape differs from the expected one"
    );
    let a: Vec<f32> = actual.flatten_all().unwrap().to_vec1().unwrap();
    let e: Vec<f32> = expected.flatten_all().unwrap().to_vec1().unwrap();
    let mut worst: Option<(usize, f64)> = None;
    for (idx, (&av, &ev)) in a.iter().zip(&e).enumerate() {
        let excess = (av as f64 - ev as f64).abs() - (tol + tol * (ev as f64).abs());
        if (excess > 0.0 || excess.is_nan()) && worst.is_none_or(|(_, w)| excess > w) {
            worst = Some((idx, excess));
        }
    }
    if let Some((idx, _)) = worst {
        panic!(
            "{what}: element {idx} is {} but expected {} (tolerance {tol} abs + {tol} rel)",
            a[idx], e[idx]
        );
    }
}
