//! The output gate from candle ops (autodiff gives the gradients): the oracle of the fused op
//! and the path on other devices.

use candle_core::{Result, Tensor};

/// See [`super::silu_gated_sum`].
pub fn silu_gated_sum(a: &Tensor, b: &Tensor, z: &Tensor) -> Result<Tensor> {
    (a + b)? * z.silu()?
}
