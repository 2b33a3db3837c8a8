//! Plain candle-ops sLSTM scan: a time loop mirroring the official vanilla backend op for op,
//! so that candle autodiff (which, like torch, splits the gradient evenly at ties of
//! `maximum`/`minimum`) reproduces the official gradients, including those through the final
//! c, n, m. This is the test oracle; it is slow (a few dozen small ops per time step), and
//! candle's backward pass walks its graph recursively, so back-propagating through ~1000 steps
//! needs a thread stack of tens of MiB. Works for any float dtype (the fused CPU kernel is
//! f32 only).

use super::{NUM_GATES, ScanDims, SlstmState};
use candle_core::{D, Result, Tensor};

/// Same contract as [`super::scan`].
pub fn scan(
    x: &Tensor,
    r: &Tensor,
    bias: &Tensor,
    initial: Option<&SlstmState>,
) -> Result<(Tensor, SlstmState)> {
    let dims = ScanDims::check("slstm reference scan", x, r, bias, initial)?;
    let ScanDims {
        batch,
        seq_len,
        heads,
        head_dim,
    } = dims;
    let hidden = dims.hidden();

    // [NH, DH_in, 4·DH_out] so that one batched matmul gives all gates of a head.
    let r_heads = r.reshape((heads, head_dim, NUM_GATES * head_dim))?;
    // Gate-major like x: [4·H] with index g·H + head·DH + j.
    let bias_flat = bias.transpose(0, 1)?.contiguous()?.flatten_all()?;

    let mut state = match initial {
        Some(s) => s.clone(),
        None => {
            let zeros = Tensor::zeros((batch, hidden), x.dtype(), x.device())?;
            SlstmState {
                h: zeros.clone(),
                c: zeros.clone(),
                n: zeros.clone(),
                m: zeros,
            }
        }
    };

    let mut outputs = Vec::with_capacity(seq_len);
    for t in 0..seq_len {
        let recurrent = state
            .h
            .reshape((batch, heads, head_dim))?
            .transpose(0, 1)?
            .contiguous()?
            .matmul(&r_heads)? // [NH, B, 4·DH]
            .reshape((heads, batch, NUM_GATES, head_dim))?
            .permute((1, 2, 0, 3))?
            .reshape((batch, NUM_GATES * hidden))?;
        let pre = x
            .narrow(1, t, 1)?
            .squeeze(1)?
            .add(&recurrent)?
            .broadcast_add(&bias_flat)?;
        let gate = |g: usize| pre.narrow(D::Minus1, g * hidden, hidden);
        let (i_pre, f_pre, z_pre, o_pre) = (gate(0)?, gate(1)?, gate(2)?, gate(3)?);

        let log_f_plus_m = state.m.add(&log_sigmoid(&f_pre)?)?;
        let empty = state.n.eq(0.0)?;
        let m = empty.where_cond(&i_pre, &i_pre.maximum(&log_f_plus_m)?)?;
        // The official min(exp(·), 1), taken in the log domain: same values and the same
        // gradients (ties split alike), but an exp that overflows in the empty-state case
        // (m = ĩ far below logσ(f̃) + m₀) cannot become 0·∞ = NaN in the backward pass.
        let i = i_pre.sub(&m)?.minimum(0.0)?.exp()?;
        let f = log_f_plus_m.sub(&m)?.minimum(0.0)?.exp()?;
        let c = f.mul(&state.c)?.add(&i.mul(&z_pre.tanh()?)?)?;
        let n = f.mul(&state.n)?.add(&i)?;
        let h = candle_nn::ops::sigmoid(&o_pre)?.mul(&c)?.div(&n)?;
        outputs.push(h.clone());
        state = SlstmState { h, c, n, m };
    }

    let h_all = Tensor::stack(&outputs, 1)? // [B, S, H]
        .reshape((batch, seq_len, heads, head_dim))?
        .transpose(1, 2)?
        .contiguous()?;
    Ok((h_all, state))
}

/// log σ(x) = −softplus(−x), written as a log-sum-exp with its own max shift so that it is
/// finite for any x and its autodiff gradient is exact even where the shift has a tie (x = 0):
/// the result does not depend on the shift, so the shift's gradients cancel.
fn log_sigmoid(x: &Tensor) -> Result<Tensor> {
    let neg_x = x.neg()?;
    let shift = neg_x.maximum(0.0)?;
    let sum = shift.neg()?.exp()?.add(&neg_x.sub(&shift)?.exp()?)?;
    shift.add(&sum.log()?)?.neg()
}
