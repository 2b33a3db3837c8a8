//! Causal depthwise conv1d followed by SiLU, the input branch of both xLSTM blocks:
//!
//! ```text
//! y[b, t, c] = SiLU(bias[c] + Σ_s weight[c, s] · x[b, t − K + 1 + s, c])
//! ```
//!
//! where positions before the sequence start read the carried state (the last K inputs seen
//! before `x`, zeros when there is none). f32 tensors on the CPU run the fused op of
//! [`fused_cpu`] (one pass forward, one backward, no padded copy of the input); every other
//! device or dtype runs [`reference`], the candle-ops oracle.

pub mod fused_cpu;
pub mod reference;

use candle_core::{DType, Device, Error, Result, Tensor};

/// `x` `[B, S, C]`, `weight` `[C, K]`, `bias` `[C]`, `state` `[B, K, C]` (`None`: zeros).
/// Returns `SiLU(conv(x))` `[B, S, C]`.
pub fn causal_conv_silu(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    state: Option<&Tensor>,
) -> Result<Tensor> {
    check("causal conv + SiLU", x, weight, bias, state)?;
    if matches!(x.device(), Device::Cpu) && x.dtype() == DType::F32 {
        fused_cpu::causal_conv_silu(x, weight, bias, state)
    } else {
        reference::causal_conv_silu(x, weight, bias, state)
    }
}

fn check(
    op: &str,
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    state: Option<&Tensor>,
) -> Result<()> {
    let &[batch, _, channels] = x.dims() else {
        return Err(Error::Msg(format!(
            "{op}: x has shape {:?}, expected [B, S, C]",
            x.dims()
        )));
    };
    let kernel_size = match weight.dims() {
        &[c, k] if c == channels && k > 0 => k,
        dims => {
            return Err(Error::Msg(format!(
                "{op}: weight has shape {dims:?}, expected [C, K] = [{channels}, K] with K ≥ 1"
            )));
        }
    };
    if bias.dims() != [channels] {
        return Err(Error::Msg(format!(
            "{op}: bias has shape {:?}, expected [C] = [{channels}]",
            bias.dims()
        )));
    }
    if let Some(state) = state
        && state.dims() != [batch, kernel_size, channels]
    {
        return Err(Error::Msg(format!(
            "{op}: state has shape {:?}, expected [B, K, C] = [{batch}, {kernel_size}, {channels}]",
            state.dims()
        )));
    }
    let named = [
        ("weight", Some(weight)),
        ("bias", Some(bias)),
        ("state", state),
    ];
    for (name, t) in named.into_iter().filter_map(|(n, t)| Some((n, t?))) {
        if t.dtype() != x.dtype() || !t.device().same_device(x.device()) {
            return Err(Error::Msg(format!(
                "{op}: {name} is {:?} on {:?}, expected {:?} on {:?} like x",
                t.dtype(),
                t.device(),
                x.dtype(),
                x.device()
            )));
        }
    }
    Ok(())
}
