//! The xLSTM model library: kernels, blocks and the residual stack. No I/O.

pub mod kernels;
