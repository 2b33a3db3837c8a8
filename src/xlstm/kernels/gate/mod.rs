//! The elementwise gates of the blocks, each one pass forward and one backward:
//!
//! * [`silu_gated_sum`], the mLSTM block's output gate `y = (a + b) ⊙ SiLU(z)`: the normalised
//!   cell output plus the learnable skip of the conv branch, gated by the up-projection's z
//!   half;
//! * [`gelu_gated`], the gated feed-forward's `y = GeLU(g) ⊙ u` on its up-projection `[g | u]`
//!   (the exact erf GeLU);
//! * [`scale_features`], `y = x ⊙ w` with one learned factor per feature (the mLSTM block's
//!   learnable skip). As candle ops its backward pass sums `dy ⊙ x` over the leading dims
//!   with a strided reduction that cost more than the rest of the op.
//!
//! f32 tensors on the CPU run the fused ops of [`fused_cpu`] (views read in place through
//! their row stride); every other device or dtype runs [`reference`].

pub mod fused_cpu;
pub mod reference;

use candle_core::{DType, Device, Error, Result, Tensor};

/// `a`, `b`, `z` of one shape `[.., D]` → `(a + b) ⊙ SiLU(z)`.
pub fn silu_gated_sum(a: &Tensor, b: &Tensor, z: &Tensor) -> Result<Tensor> {
    const OP: &str = "silu-gated sum";
    for (name, t) in [("b", b), ("z", z)] {
        if t.dims() != a.dims() {
            return Err(Error::Msg(format!(
                "{OP}: {name} has shape {:?}, expected the shape of a {:?}",
                t.dims(),
                a.dims()
            )));
        }
        if t.dtype() != a.dtype() || !t.device().same_device(a.device()) {
            return Err(Error::Msg(format!(
                "{OP}: {name} is {:?} on {:?}, expected {:?} on {:?} like a",
                t.dtype(),
                t.device(),
                a.dtype(),
                a.device()
            )));
        }
    }
    if a.rank() == 0 {
        return Err(Error::Msg(format!("{OP}: a is a scalar, expected [.., D]")));
    }
    if matches!(a.device(), Device::Cpu) && a.dtype() == DType::F32 {
        fused_cpu::silu_gated_sum(a, b, z)
    } else {
        reference::silu_gated_sum(a, b, z)
    }
}

/// `up` `[.., 2F]` = `[g | u]` → `GeLU(g) ⊙ u` `[.., F]`.
pub fn gelu_gated(up: &Tensor) -> Result<Tensor> {
    if !matches!(up.dims().last(), Some(&w) if w > 0 && w % 2 == 0) {
        {
            return Err(Error::Msg(format!(
                "gelu-gated: up has shape {:?}, expected [.., 2F] with F ≥ 1",
                up.dims()
            )));
        }
    }
    if matches!(up.device(), Device::Cpu) && up.dtype() == DType::F32 {
        fused_cpu::gelu_gated(up)
    } else {
        reference::gelu_gated(up)
    }
}

/// `x` `[.., D]`, `scale` `[D]` → `x ⊙ scale` (each feature times its factor).
pub fn scale_features(x: &Tensor, scale: &Tensor) -> Result<Tensor> {
    const OP: &str = "feature scale";
    let width = match x.dims().last() {
        Some(&w) => w,
        None => return Err(Error::Msg(format!("{OP}: x is a scalar, expected [.., D]"))),
    };
    if scale.dims() != [width] {
        return Err(Error::Msg(format!(
            "{OP}: scale has shape {:?}, expected [{width}] (the last dim of x {:?})",
            scale.dims(),
            x.dims()
        )));
    }
    if scale.dtype() != x.dtype() || !scale.device().same_device(x.device()) {
        return Err(Error::Msg(format!(
            "{OP}: scale is {:?} on {:?}, expected {:?} on {:?} like x",
            scale.dtype(),
            scale.device(),
            x.dtype(),
            x.device()
        )));
    }
    if matches!(x.device(), Device::Cpu) && x.dtype() == DType::F32 {
        fused_cpu::scale_features(x, scale)
    } else {
        reference::scale_features(x, scale)
    }
}
