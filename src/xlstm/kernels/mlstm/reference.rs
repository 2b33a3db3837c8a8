//! The mLSTM forms written with plain candle ops, following XLSTM.md §1 line by line.
//! This is the test oracle (candle autodiff gives its gradients) and the fallback on
//! devices without a fused kernel. Every stabiliser is detached, matching the fused
//! kernels' convention (see the parent module).

use candle_core::{D, DType, Result, Tensor};

use super::{
    DENOMINATOR_EPS, MlstmState, check_chunk_size, check_sequence_inputs, check_state,
    check_step_inputs,
};

/// `log σ(x) = min(x, 0) − ln(1 + e^{−|x|})`, finite for any finite x.
fn log_sigmoid(x: &Tensor) -> Result<Tensor> {
    let softplus_tail = (x.abs()?.neg()?.exp()? + 1.0)?.log()?;
    x.minimum(0f32)? - softplus_tail
}

/// `max(|b|, e^{−m}) + eps` with `m` already detached.
fn denominator(b: &Tensor, m: &Tensor) -> Result<Tensor> {
    b.abs()?.broadcast_maximum(&m.neg()?.exp()?)? + f64::from(DENOMINATOR_EPS)
}

/// `log_d[.., t, j] = cum[.., t] − cum[.., j] + igate[.., j]` for j ≤ t, −∞ above the
/// diagonal. `cum`, `igate`: `[B, NH, L]`; result `[B, NH, L, L]`.
fn causal_log_decay(cum: &Tensor, igate: &Tensor) -> Result<Tensor> {
    let len = cum.dim(D::Minus1)?;
    let log_d = cum
        .unsqueeze(3)?
        .broadcast_sub(&cum.unsqueeze(2)?)?
        .broadcast_add(&igate.unsqueeze(2)?)?;
    let causal = Tensor::tril2(len, DType::U8, cum.device())?.broadcast_as(log_d.shape())?;
    let minus_inf = Tensor::new(f32::NEG_INFINITY, cum.device())?.broadcast_as(log_d.shape())?;
    causal.where_cond(&log_d, &minus_inf)
}

/// Stabilised parallel form (XLSTM.md §1.2).
pub fn parallel(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    igate: &Tensor,
    fgate: &Tensor,
) -> Result<Tensor> {
    let dims = check_sequence_inputs("mlstm parallel", q, k, v, igate, fgate)?;
    let key_scale = 1.0 / (dims.head_dim as f64).sqrt();
    let cum = log_sigmoid(fgate)?.cumsum(D::Minus1)?;
    let log_d = causal_log_decay(&cum, igate)?;
    let m = log_d.max_keepdim(D::Minus1)?.detach();
    let decay = log_d.broadcast_sub(&m)?.exp()?;
    let scores = (q.matmul(&k.t()?)? * key_scale)?;
    let weighted = (scores * decay)?;
    let den = denominator(&weighted.sum_keepdim(D::Minus1)?, &m)?;
    weighted.broadcast_div(&den)?.matmul(v)
}

/// Chunkwise form (XLSTM.md §1.3) for any S: the last chunk is shorter when
/// `chunk_size` does not divide S.
pub fn chunkwise(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    igate: &Tensor,
    fgate: &Tensor,
    chunk_size: usize,
    initial: Option<&MlstmState>,
) -> Result<(Tensor, MlstmState)> {
    const OP: &str = "mlstm chunkwise";
    let dims = check_sequence_inputs(OP, q, k, v, igate, fgate)?;
    check_chunk_size(OP, chunk_size)?;
    let state = match initial {
        Some(state) => {
            check_state(OP, state, dims.batch, dims.heads, dims.head_dim, q.device())?;
            state.clone()
        }
        None => MlstmState::zeros(dims.batch, dims.heads, dims.head_dim, q.device())?,
    };
    let key_scale = 1.0 / (dims.head_dim as f64).sqrt();
    // [B, NH, DH, DH], [B, NH, DH, 1], [B, NH, 1, 1]
    let mut c = state.c;
    let mut n = state.n.unsqueeze(3)?;
    let mut m = state.m.unsqueeze(2)?.unsqueeze(3)?;
    let mut outputs = Vec::with_capacity(dims.seq_len.div_ceil(chunk_size));
    let mut start = 0;
    while start < dims.seq_len {
        let len = chunk_size.min(dims.seq_len - start);
        let qc = q.narrow(2, start, len)?;
        let kc = (k.narrow(2, start, len)? * key_scale)?;
        let vc = v.narrow(2, start, len)?;
        let ic = igate.narrow(2, start, len)?;
        let cum = log_sigmoid(&fgate.narrow(2, start, len)?)?.cumsum(D::Minus1)?;

        // Outputs of this chunk read the state from before it.
        let log_d = causal_log_decay(&cum, &ic)?;
        let m_inter = cum.unsqueeze(3)?.broadcast_add(&m)?;
        let m_row = log_d.max_keepdim(D::Minus1)?.maximum(&m_inter)?.detach();
        let inter_weight = m_inter.broadcast_sub(&m_row)?.exp()?;
        let decay = log_d.broadcast_sub(&m_row)?.exp()?;
        let weighted = (qc.matmul(&kc.t()?)? * decay)?;
        let num = (qc.matmul(&c)?.broadcast_mul(&inter_weight)? + weighted.matmul(&vc)?)?;
        let b =
            (qc.matmul(&n)?.broadcast_mul(&inter_weight)? + weighted.sum_keepdim(D::Minus1)?)?;
        outputs.push(num.broadcast_div(&denominator(&b, &m_row)?)?);

        // State after the chunk.
        let total = cum.narrow(2, len - 1, 1)?.unsqueeze(3)?; // [B, NH, 1, 1]
        let log_input = cum
            .broadcast_sub(&cum.narrow(2, len - 1, 1)?)?
            .neg()?
            .add(&ic)?;
        let m_next = (&total + &m)?
            .maximum(&log_input.max_keepdim(D::Minus1)?.unsqueeze(3)?)?
            .detach();
        let carry = (&total + &m)?.broadcast_sub(&m_next)?.exp()?;
        let input_weight = log_input.unsqueeze(3)?.broadcast_sub(&m_next)?.exp()?;
        let weighted_keys = kc.broadcast_mul(&input_weight)?; // [B, NH, L, DH]
        c = (c.broadcast_mul(&carry)? + weighted_keys.t()?.matmul(&vc)?)?;
        n = (n.broadcast_mul(&carry)? + weighted_keys.sum_keepdim(2)?.t()?)?;
        m = m_next;
        start += len;
    }
    let h = Tensor::cat(&outputs, 2)?;
    let final_state = MlstmState {
        c,
        n: n.squeeze(3)?,
        m: m.squeeze(3)?.squeeze(2)?,
    };
    Ok((h, final_state))
}

/// One recurrent step (XLSTM.md §1.1).
pub fn step(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    igate: &Tensor,
    fgate: &Tensor,
    state: &MlstmState,
) -> Result<(Tensor, MlstmState)> {
    let dims = check_step_inputs("mlstm step", q, k, v, igate, fgate, state)?;
    let key_scale = 1.0 / (dims.head_dim as f64).sqrt();
    let log_f = (log_sigmoid(fgate)? + &state.m)?;
    let m = log_f.maximum(igate)?.detach();
    let forget = (log_f - &m)?.exp()?;
    let input = (igate - &m)?.exp()?;
    let weighted_key = (k * key_scale)?.broadcast_mul(&input.unsqueeze(2)?)?; // [B, NH, DH]
    let c = (state.c.broadcast_mul(&forget.unsqueeze(2)?.unsqueeze(3)?)?
        + weighted_key.unsqueeze(3)?.matmul(&v.unsqueeze(2)?)?)?;
    let n = (state.n.broadcast_mul(&forget.unsqueeze(2)?)? + weighted_key)?;
    let num = q.unsqueeze(2)?.matmul(&c)?.squeeze(2)?;
    let b = (&n * q)?.sum_keepdim(2)?;
    let h = num.broadcast_div(&denominator(&b, &m.unsqueeze(2)?)?)?;
    Ok((h, MlstmState { c, n, m }))
}
