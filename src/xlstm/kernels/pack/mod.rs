//! The mLSTM kernels' packed input: q, k and v of every token, token-major `[B, S, NH·DH]`,
//! laid out head-major and side by side, `[B, NH, S, 3·DH]`:
//!
//! ```text
//! packed[b, h, s, p·DH + e] = x_p[b, s, h·DH + e]   for x_0 = q, x_1 = k, x_2 = v
//! ```
//!
//! As candle ops this is a concatenation and a permuted copy, and their backward passes copy
//! the gradient twice more; the fused op copies once each way. f32 tensors on the CPU run
//! [`fused_cpu`]; every other device or dtype runs [`reference`].

pub mod fused_cpu;
pub mod reference;

use candle_core::{DType, Device, Error, Result, Tensor};

/// `q`, `k`, `v` `[B, S, NH·DH]` → `[B, NH, S, 3·DH]`.
pub fn pack_heads(q: &Tensor, k: &Tensor, v: &Tensor, num_heads: usize) -> Result<Tensor> {
    check(q, k, v, num_heads)?;
    if matches!(q.device(), Device::Cpu) && q.dtype() == DType::F32 {
        fused_cpu::pack_heads(q, k, v, num_heads)
    } else {
        reference::pack_heads(q, k, v, num_heads)
    }
}

/// `qkv` `[B, S, 3·NH·DH]`, q, k and v side by side along the last dim, → `[B, NH, S, 3·DH]`:
/// [`pack_heads`] of the three thirds, without cutting them apart first.
pub fn pack_heads_side_by_side(qkv: &Tensor, num_heads: usize) -> Result<Tensor> {
    check_side_by_side(qkv, num_heads)?;
    if matches!(qkv.device(), Device::Cpu) && qkv.dtype() == DType::F32 {
        fused_cpu::pack_heads_side_by_side(qkv, num_heads)
    } else {
        reference::pack_heads_side_by_side(qkv, num_heads)
    }
}

/// Checks the shape of side-by-side parts; returns (B, S, D) of one part.
pub(crate) fn check_side_by_side(qkv: &Tensor, num_heads: usize) -> Result<(usize, usize, usize)> {
    const OP: &str = "pack heads side by side";
    let (b, s, width) = qkv.dims3().map_err(|_| {
        Error::Msg(format!(
            "{OP}: qkv has shape {:?}, expected [B, S, 3·NH·DH]",
            qkv.dims()
        ))
    })?;
    let d = width / 3;
    if num_heads == 0 || d == 0 || width % 3 != 0 || !d.is_multiple_of(num_heads) {
        return Err(Error::Msg(format!(
            "{OP}: qkv has shape {:?}; its last dim is not three parts of {num_heads} heads",
            qkv.dims()
        )));
    }
    Ok((b, s, d))
}

/// Checks shapes, dtypes and devices; returns (B, S, D).
pub(crate) fn check(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    num_heads: usize,
) -> Result<(usize, usize, usize)> {
    const OP: &str = "pack heads";
    let (b, s, d) = q.dims3().map_err(|_| {
        Error::Msg(format!(
            "{OP}: q has shape {:?}, expected [B, S, NH·DH]",
            q.dims()
        ))
    })?;
    if num_heads == 0 || d == 0 || !d.is_multiple_of(num_heads) {
        return Err(Error::Msg(format!(
            "{OP}: {num_heads} heads do not divide the feature dim {d} of q {:?}",
            q.dims()
        )));
    }
    for (name, t) in [("k", k), ("v", v)] {
        if t.dims() != q.dims() {
            return Err(Error::Msg(format!(
                "{OP}: {name} has shape {:?}, expected the shape of q {:?}",
                t.dims(),
                q.dims()
            )));
        }
        if t.dtype() != q.dtype() || !t.device().same_device(q.device()) {
            return Err(Error::Msg(format!(
                "{OP}: {name} is {:?} on {:?}, expected {:?} on {:?} like q",
                t.dtype(),
                t.device(),
                q.dtype(),
                q.device()
            )));
        }
    }
    Ok((b, s, d))
}
