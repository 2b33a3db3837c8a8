//! The normalisations from plain candle ops (candle autodiff gives their gradients): the test
//! oracle of the fused kernels and the path on devices without one.

use candle_core::{D, Result, Tensor};

/// Normalises over the last dim (mean, biased variance, `eps`), no scale.
fn standardise_last_dim(x: &Tensor, eps: f64) -> Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let centred = x.broadcast_sub(&mean)?;
    let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
    centred.broadcast_div(&(var + eps)?.sqrt()?)
}

/// See [`super::layer_norm`].
pub fn layer_norm(x: &Tensor, scale: &Tensor, bias: Option<&Tensor>, eps: f64) -> Result<Tensor> {
    let y = standardise_last_dim(x, eps)?.broadcast_mul(scale)?;
    match bias {
        Some(bias) => y.broadcast_add(bias),
        None => Ok(y),
    }
}

/// See [`super::multi_head_layer_norm`].
pub fn multi_head_layer_norm(h: &Tensor, scale: &Tensor, eps: f64) -> Result<Tensor> {
    let (b, nh, s, dh) = h.dims4()?;
    standardise_last_dim(h, eps)?
        .broadcast_mul(&scale.reshape((nh, 1, dh))?)?
        .transpose(1, 2)?
        .reshape((b, s, nh * dh))
}
