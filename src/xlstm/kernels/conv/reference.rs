//! Causal depthwise conv + SiLU from candle ops (autodiff gives the gradients): the oracle of
//! the fused op and the path on other devices.

use candle_core::{Result, Tensor};

/// See [`super::causal_conv_silu`].
pub fn causal_conv_silu(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    state: Option<&Tensor>,
) -> Result<Tensor> {
    let seq_len = x.dim(1)?;
    let k = weight.dim(1)?;
    // K − 1 rows of history, then the S inputs.
    let padded = match state {
        Some(state) => Tensor::cat(&[&state.narrow(1, 1, k - 1)?, x], 1)?,
        None => x.pad_with_zeros(1, k - 1, 0)?,
    };
    // [C, K] → [K, C]: tap s of every channel as one row.
    let taps = weight.t()?;
    let mut y = bias.broadcast_as(x.shape())?;
    for s in 0..k {
        let tap = taps.narrow(0, s, 1)?;
        y = (y + padded.narrow(1, s, seq_len)?.broadcast_mul(&tap)?)?;
    }
    y.silu()
}
