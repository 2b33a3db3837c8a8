//! The gates from candle ops (autodiff gives the gradients): the oracle of the fused op
//! and the path on other devices.

use candle_core::{D, Result, Tensor};

/// See [`super::silu_gated_sum`].
pub fn silu_gated_sum(a: &Tensor, b: &Tensor, z: &Tensor) -> Result<Tensor> {
    (a + b)? * z.silu()?
}

/// See [`super::gelu_gated`].
pub fn gelu_gated(up: &Tensor) -> Result<Tensor> {
    let width = up.dim(D::Minus1)? / 2;
    up.narrow(D::Minus1, 0, width)?.gelu_erf()? * up.narrow(D::Minus1, width, width)?
}

/// See [`super::scale_features`].
pub fn scale_features(x: &Tensor, scale: &Tensor) -> Result<Tensor> {
    x.broadcast_mul(scale)
}
