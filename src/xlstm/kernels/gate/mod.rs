//! The mLSTM block's output gate, `y = (a + b) ⊙ SiLU(z)`: the normalised cell output plus the
//! learnable skip of the conv branch, gated by the up-projection's z half. f32 tensors on the
//! CPU run the fused op of [`fused_cpu`] (one pass forward, one backward, z read in place
//! through its row stride); every other device or dtype runs [`reference`].

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
