//! The xLSTM model library: kernels, blocks and the residual stack. No I/O.

pub mod config;
pub mod kernels;
pub mod layers;
pub mod mlstm_block;
pub mod shards;
pub mod slstm_block;
pub mod stack;

pub use config::{MlstmKernel, XlstmConfig};
pub use stack::{StackState, XlstmStack};
