//! Rebuilds the crate when a migration changes (`sqlx::migrate!` embeds `migrations/` at
//! compile time), and with the `cuda` feature compiles the CUDA kernels under
//! `src/xlstm/kernels/cuda/` to PTX (one file per kernel family) for the crate to embed.
//!
//! nvcc is `$NVCC`, else `$CUDA_HOME/bin/nvcc`, else `nvcc` on PATH. The PTX targets
//! `compute_$CUDA_COMPUTE_CAP` (default 80), which the driver JIT-compiles for any newer GPU.

use std::path::{Path, PathBuf};
use std::process::Command;

const KERNEL_DIR: &str = "src/xlstm/kernels/cuda";
const KERNELS: [&str; 2] = ["mlstm", "slstm"];

fn main() {
    println!("cargo:rerun-if-changed=migrations");
    println!("cargo:rerun-if-changed={KERNEL_DIR}");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    for var in ["NVCC", "CUDA_HOME", "CUDA_COMPUTE_CAP", "NVCC_CCBIN"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let nvcc = std::env::var_os("NVCC")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("CUDA_HOME").map(|home| Path::new(&home).join("bin/nvcc")))
        .unwrap_or_else(|| PathBuf::from("nvcc"));
    let cap = std::env::var("CUDA_COMPUTE_CAP")
        .unwrap_or_else(|_| "80".into())
        .trim()
        .trim_start_matches("sm_")
        .replace('.', "");
    for kernel in KERNELS {
        let source = Path::new(KERNEL_DIR).join(format!("{kernel}.cu"));
        let mut cmd = Command::new(&nvcc);
        cmd.arg("--ptx")
            .arg(format!("--gpu-architecture=compute_{cap}"))
            .args(["-O3", "-std=c++17"])
            .arg("-I")
            .arg(KERNEL_DIR)
            .arg("-o")
            .arg(out.join(format!("{kernel}.ptx")))
            .arg(&source);
        if let Some(ccbin) = std::env::var_os("NVCC_CCBIN") {
            cmd.arg("-ccbin").arg(ccbin);
        }
        let status = cmd.status().unwrap_or_else(|e| {
            panic!(
                "cannot run {} (set CUDA_HOME or NVCC; README.md, \"GPU\"): {e}",
                nvcc.display()
            )
        });
        assert!(
            status.success(),
            "nvcc failed on {}: {status}",
            source.display()
        );
    }
}
