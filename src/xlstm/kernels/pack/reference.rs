//! The packing from candle ops (autodiff gives the gradients): the oracle of the fused op and
//! the path on other devices.

use candle_core::{D, Result, Tensor};

/// See [`super::pack_heads`].
pub fn pack_heads(q: &Tensor, k: &Tensor, v: &Tensor, num_heads: usize) -> Result<Tensor> {
    let (b, s, d) = q.dims3()?;
    let head_dim = d / num_heads;
    Tensor::cat(&[q, k, v], D::Minus1)?
        .reshape((b, s, 3, num_heads, head_dim))?
        .permute((0, 3, 1, 2, 4))?
        .contiguous()?
        .reshape((b, num_heads, s, 3 * head_dim))
}

/// See [`super::pack_heads_side_by_side`].
pub fn pack_heads_side_by_side(qkv: &Tensor, num_heads: usize) -> Result<Tensor> {
    let (b, s, width) = qkv.dims3()?;
    let head_dim = width / (3 * num_heads);
    qkv.reshape((b, s, 3, num_heads, head_dim))?
        .permute((0, 3, 1, 2, 4))?
        .contiguous()?
        .reshape((b, num_heads, s, 3 * head_dim))
}
