//! Normalisation layers of the xLSTM blocks as kernels: LayerNorm over the last dim (scale,
//! optional bias) and the multi-head LayerNorm (per-head GroupNorm) that reads the cells'
//! head-major output `[B, NH, S, DH]` and writes features `[B, S, NH·DH]`.
//!
//! Built from candle ops, each would be a dozen small tensors forward and twice that in
//! autodiff; the fused CPU ops make one pass forward and one pass backward (mean and inverse
//! standard deviation recomputed per row, which is cheaper than storing them).
//!
//! Both take the effective `scale` (the xLSTM modules pass `1 + weight`). f32 tensors on the
//! CPU run [`fused_cpu`]; every other device or dtype runs [`reference`] (the test oracle),
//! the seam where device kernels plug in.

pub mod fused_cpu;
pub mod reference;

use candle_core::{DType, Device, Error, Result, Tensor};

fn fused_applies(x: &Tensor) -> bool {
    matches!(x.device(), Device::Cpu) && x.dtype() == DType::F32
}

/// `y = (x − mean) / sqrt(var + eps) ⊙ scale (+ bias)` over the last dim of `x` `[.., E]`;
/// `scale`, `bias` `[E]`.
pub fn layer_norm(x: &Tensor, scale: &Tensor, bias: Option<&Tensor>, eps: f64) -> Result<Tensor> {
    check_layer_norm("layer norm", x, scale, bias)?;
    if fused_applies(x) {
        fused_cpu::layer_norm(x, scale, bias, eps)
    } else {
        reference::layer_norm(x, scale, bias, eps)
    }
}

/// Head-major `h` `[B, NH, S, DH]` → `[B, S, NH·DH]`, each head's DH values normalised on
/// their own and then scaled by `scale` `[NH·DH]`.
pub fn multi_head_layer_norm(h: &Tensor, scale: &Tensor, eps: f64) -> Result<Tensor> {
    check_multi_head("multi-head layer norm", h, scale)?;
    if fused_applies(h) {
        fused_cpu::multi_head_layer_norm(h, scale, eps)
    } else {
        reference::multi_head_layer_norm(h, scale, eps)
    }
}

fn check_same_kind(op: &str, name: &str, t: &Tensor, x: &Tensor) -> Result<()> {
    if t.dtype() != x.dtype() {
        return Err(Error::Msg(format!(
            "{op}: {name} has dtype {:?}, expected {:?} (the dtype of the input)",
            t.dtype(),
            x.dtype()
        )));
    }
    if !t.device().same_device(x.device()) {
        return Err(Error::Msg(format!(
            "{op}: {name} is on {:?}, expected the input's device {:?}",
            t.device(),
            x.device()
        )));
    }
    Ok(())
}

fn check_layer_norm(op: &str, x: &Tensor, scale: &Tensor, bias: Option<&Tensor>) -> Result<()> {
    let Some(&features) = x.dims().last() else {
        return Err(Error::Msg(format!("{op}: x is a scalar, expected [.., E]")));
    };
    let named = [("scale", Some(scale)), ("bias", bias)];
    for (name, t) in named.into_iter().filter_map(|(n, t)| Some((n, t?))) {
        if t.dims() != [features] {
            return Err(Error::Msg(format!(
                "{op}: {name} has shape {:?}, expected [E] = [{features}] (last dim of x {:?})",
                t.dims(),
                x.dims()
            )));
        }
        check_same_kind(op, name, t, x)?;
    }
    Ok(())
}

fn check_multi_head(op: &str, h: &Tensor, scale: &Tensor) -> Result<()> {
    let &[_, heads, _, head_dim] = h.dims() else {
        return Err(Error::Msg(format!(
            "{op}: input has shape {:?}, expected [B, NH, S, DH]",
            h.dims()
        )));
    };
    if scale.dims() != [heads * head_dim] {
        return Err(Error::Msg(format!(
            "{op}: scale has shape {:?}, expected [NH·DH] = [{}] (input {:?})",
            scale.dims(),
            heads * head_dim,
            h.dims()
        )));
    }
    check_same_kind(op, "scale", scale, h)
}
