//! Exponential-gating kernels and the fused layers around them. Each kernel has a candle-ops
//! reference (the test oracle) and a fused CPU custom op with a hand-written backward; the
//! mLSTM and sLSTM kernels also have CUDA custom ops (feature `cuda`). The public function of
//! each kernel dispatches by device.

pub mod conv;
mod cpu_data;
mod cuda;
pub mod gate;
pub mod headwise;
pub mod mlstm;
pub mod norm;
pub mod pack;
pub mod simd;
pub mod slstm;
mod vmath;

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor, Var};

    /// The vendored candle-core stores a node's first gradient as computed instead of adding it
    /// to zeros (vendor/candle-core/PATCHED.md). Every kernel's gradient relies on it: a
    /// variable used several times sums all its contributions, and one reached only through a
    /// subtraction gets the negated gradient.
    #[test]
    fn autodiff_sums_every_contribution_of_a_variable() -> candle_core::Result<()> {
        let x = Var::from_tensor(&Tensor::new(&[1.5f32, -2.0, 0.25], &Device::Cpu)?)?;
        let y = Var::from_tensor(&Tensor::new(&[0.5f32, 3.0, -1.0], &Device::Cpu)?)?;
        // loss = Σ (x + x·x + x.t().t() − y)
        let (xt, yt) = (x.as_tensor(), y.as_tensor());
        let loss = ((xt + (xt * xt)?)? + xt.unsqueeze(0)?.t()?.t()?.squeeze(0)?)?
            .sub(yt)?
            .sum_all()?;
        let grads = loss.backward()?;
        let grad_x = grads.get(xt).expect("x has a gradient").to_vec1::<f32>()?;
        let grad_y = grads.get(yt).expect("y has a gradient").to_vec1::<f32>()?;
        // d/dx = 1 + 2x + 1, d/dy = −1.
        assert_eq!(grad_x, vec![5.0, -2.0, 2.5]);
        assert_eq!(grad_y, vec![-1.0, -1.0, -1.0]);
        Ok(())
    }
}
