//! Exponential-gating kernels and the fused layers around them. Each kernel has a candle-ops
//! reference (the test oracle) and a fused CPU custom op with a hand-written backward; the
//! mLSTM and sLSTM kernels also have CUDA custom ops (feature `cuda`). The public function of
//! each kernel dispatches by device.

pub mod conv;
mod cpu_data;
mod cuda;
pub mod gate;
pub mod headwise;
pub mod mlstm;
pub mod norm;
pub mod slstm;
