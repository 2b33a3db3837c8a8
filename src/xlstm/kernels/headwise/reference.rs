//! The head-wise linear map from candle ops (autodiff gives the gradients): the oracle of the
//! fused op and the path on other devices.

use candle_core::{D, Result, Tensor};

/// See [`super::headwise_linear`]: the blocks as one batched matmul over NB.
pub fn headwise_linear(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    let (blocks, d_out, d_in) = weight.dims3()?;
    let rows = x.elem_count() / (blocks * d_in);
    let mut out_dims = x.dims().to_vec();
    *out_dims.last_mut().expect("x has a last dim") = blocks * d_out;
    // [N, NB, d_in] → [NB, N, d_in] × [NB, d_in, d_out] → [NB, N, d_out] → [.., NB·d_out]
    let blocked = x
        .reshape((rows, blocks, d_in))?
        .transpose(0, 1)?
        .contiguous()?;
    let y = blocked.matmul(&weight.transpose(1, 2)?.contiguous()?)?;
    y.transpose(0, 1)?.contiguous()?.reshape(out_dims)
}

/// See [`super::headwise_linear_side_by_side`]: each map on its own, then concatenated.
pub fn headwise_linear_side_by_side(
    inputs: [&Tensor; 2],
    weights: &[&Tensor],
    maps_on_first: usize,
) -> Result<Tensor> {
    let outputs = weights
        .iter()
        .enumerate()
        .map(|(m, weight)| headwise_linear(inputs[usize::from(m >= maps_on_first)], weight))
        .collect::<Result<Vec<_>>>()?;
    Tensor::cat(&outputs, D::Minus1)
}
