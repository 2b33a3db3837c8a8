//! The CUDA kernels of the mLSTM and sLSTM (`mlstm.cu`, `slstm.cu` beside this file, compiled
//! to PTX by `build.rs` with the `cuda` feature) and what runs them: launch plans that know
//! nothing of devices ([`plan`]), their execution on a GPU (`launch`, feature `cuda`), and in
//! tests their execution on the CPU with the kernels compiled as C++ (`emulation`).
//!
//! The custom ops that use them are `mlstm::fused_cuda` and `slstm::fused_cuda`, chosen by the
//! kernels' device dispatch when tensors live on a CUDA device.

#[cfg(test)]
mod emulation;
#[cfg(feature = "cuda")]
pub(crate) mod launch;
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) mod plan;
