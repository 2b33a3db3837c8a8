//! Head-wise (block-diagonal) linear map without bias, the official `LinearHeadwiseExpand`:
//!
//! ```text
//! y[.., blk·d_out + o] = Σ_i weight[blk, o, i] · x[.., blk·d_in + i]
//! ```
//!
//! for `weight` `[NB, d_out, d_in]`. The mLSTM block's q, k, v projections are 32 blocks of 4×4
//! and the sLSTM gates 4 blocks of 16×16: as a dense GEMM they would spend NB times the
//! multiply-adds the blocks need, and as candle's batched matmul the tiny blocks are slower
//! still. f32 tensors on the CPU run the fused op of [`fused_cpu`] (NB·d_out·d_in multiply-adds
//! per row, forward and backward); every other device or dtype runs [`reference`].

pub mod fused_cpu;
pub mod reference;

use candle_core::{DType, Device, Error, Result, Tensor};

/// `x` `[.., NB·d_in]`, `weight` `[NB, d_out, d_in]` → `[.., NB·d_out]`.
pub fn headwise_linear(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    check("headwise linear", x, weight)?;
    if matches!(x.device(), Device::Cpu) && x.dtype() == DType::F32 {
        fused_cpu::headwise_linear(x, weight)
    } else {
        reference::headwise_linear(x, weight)
    }
}

/// The outputs of several head-wise maps with the same block sizes side by side:
/// `[.., M·NB·d_out]`, map `m` (weight `weights[m]` `[NB, d_out, d_in]`) reading `inputs[0]`
/// for `m < maps_on_first` and `inputs[1]` after. One pass writes what M maps and a
/// concatenation would (the sLSTM block's four gates, two of them from the conv's output).
pub fn headwise_linear_side_by_side(
    inputs: [&Tensor; 2],
    weights: &[&Tensor],
    maps_on_first: usize,
) -> Result<Tensor> {
    check_side_by_side("head-wise linear maps", inputs, weights, maps_on_first)?;
    if matches!(inputs[0].device(), Device::Cpu) && inputs[0].dtype() == DType::F32 {
        fused_cpu::headwise_linear_side_by_side(inputs, weights, maps_on_first)
    } else {
        reference::headwise_linear_side_by_side(inputs, weights, maps_on_first)
    }
}

/// [`check`] for every map, and the two inputs alike; returns (NB, d_out, d_in).
pub(crate) fn check_side_by_side(
    op: &str,
    inputs: [&Tensor; 2],
    weights: &[&Tensor],
    maps_on_first: usize,
) -> Result<(usize, usize, usize)> {
    let Some(first_weight) = weights.first() else {
        return Err(Error::Msg(format!("{op}: no weights given")));
    };
    if maps_on_first > weights.len() {
        return Err(Error::Msg(format!(
            "{op}: {maps_on_first} maps on the first input, but only {} weights",
            weights.len()
        )));
    }
    if inputs[0].dims() != inputs[1].dims() {
        return Err(Error::Msg(format!(
            "{op}: the inputs have shapes {:?} and {:?}, expected one shape",
            inputs[0].dims(),
            inputs[1].dims()
        )));
    }
    let sizes = check(op, inputs[0], first_weight)?;
    for (m, weight) in weights.iter().enumerate() {
        if weight.dims() != first_weight.dims() {
            return Err(Error::Msg(format!(
                "{op}: weight {m} has shape {:?}, expected {:?} like weight 0",
                weight.dims(),
                first_weight.dims()
            )));
        }
        check(op, inputs[usize::from(m >= maps_on_first)], weight)?;
    }
    Ok(sizes)
}

/// Checks shapes, dtypes and devices; returns (NB, d_out, d_in).
pub(crate) fn check(op: &str, x: &Tensor, weight: &Tensor) -> Result<(usize, usize, usize)> {
    let &[blocks, d_out, d_in] = weight.dims() else {
        return Err(Error::Msg(format!(
            "{op}: weight has shape {:?}, expected [NB, d_out, d_in]",
            weight.dims()
        )));
    };
    if blocks == 0 || d_out == 0 || d_in == 0 {
        return Err(Error::Msg(format!(
            "{op}: weight has shape {:?}, expected [NB, d_out, d_in] with every size at least 1",
            weight.dims()
        )));
    }
    match x.dims().last() {
        Some(&width) if width == blocks * d_in => {}
        _ => {
            return Err(Error::Msg(format!(
                "{op}: x has shape {:?}, expected [.., NB·d_in] = [.., {}]",
                x.dims(),
                blocks * d_in
            )));
        }
    }
    if weight.dtype() != x.dtype() || !weight.device().same_device(x.device()) {
        return Err(Error::Msg(format!(
            "{op}: weight is {:?} on {:?}, expected {:?} on {:?} like x",
            weight.dtype(),
            weight.device(),
            x.dtype(),
            x.device()
        )));
    }
    Ok((blocks, d_out, d_in))
}
