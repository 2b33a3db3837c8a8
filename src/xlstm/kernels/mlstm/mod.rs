//! The mLSTM cell (XLSTM.md §1): matrix memory with exponential input gate and
//! sigmoid forget gate, in three equivalent forms.
//!
//! * [`parallel`]: the stabilised quadratic form used by the official block for
//!   full-sequence forward passes (O(S²) per head).
//! * [`chunkwise`]: the same outputs from chunk-local quadratic parts plus a
//!   recurrence over chunk states (O(S·L + S/L·DH²)); also returns the final state.
//! * [`step`]: one recurrent step for inference.
//!
//! State convention (xlstm's): `C` and `n` are built from `k / sqrt(DH)`, `m` is the
//! per-head stabiliser, all in stabilised coordinates.
//!
//! Inputs must be f32; on a CUDA device they may be bf16 instead (the kernels compute and
//! keep states in f32 and return h in bf16). Other dtypes are rejected, not converted. States
//! are always f32. On the CPU the fused kernels of [`fused_cpu`] run, on a CUDA device
//! (feature `cuda`) those of `fused_cuda`; any other device uses [`reference`].
//!
//! Gradients: the stabiliser `m` is treated as a constant (stop-gradient) everywhere,
//! which is exact for losses on `h` because `h` does not depend on `m`. The final
//! state returned by [`chunkwise`] carries gradients for `C` and `n` under the same
//! convention; the initial state receives gradients for `C`, `n` and `m`.

pub mod fused_cpu;
#[cfg(feature = "cuda")]
mod fused_cuda;
pub mod reference;

use candle_core::{DType, Device, Error, Result, Tensor};

/// Added to the normaliser of `h` (the official `eps`).
pub const DENOMINATOR_EPS: f32 = 1e-6;

/// Chunk length used when the caller has no reason to pick another one. Measured on the
/// fused CPU kernels (B 32, NH 4, DH 16/32, S 96–1024, forward + backward): 32 is as
/// fast as or faster than 64 everywhere except S = 96 at DH 16.
pub const DEFAULT_CHUNK_SIZE: usize = 32;

/// Recurrent mLSTM state per batch element and head.
#[derive(Debug, Clone)]
pub struct MlstmState {
    /// Matrix memory `[B, NH, DH, DH]`; first index = key dim, second = value dim.
    pub c: Tensor,
    /// Normaliser `[B, NH, DH]`.
    pub n: Tensor,
    /// Stabiliser `[B, NH]`.
    pub m: Tensor,
}

impl MlstmState {
    /// The all-zero initial state (`m = 0`, as in the official recurrent form).
    pub fn zeros(batch: usize, heads: usize, head_dim: usize, device: &Device) -> Result<Self> {
        Ok(Self {
            c: Tensor::zeros((batch, heads, head_dim, head_dim), DType::F32, device)?,
            n: Tensor::zeros((batch, heads, head_dim), DType::F32, device)?,
            m: Tensor::zeros((batch, heads), DType::F32, device)?,
        })
    }
}

/// Stabilised parallel form. q, k, v `[B, NH, S, DH]` (k not pre-scaled); igate and
/// fgate pre-activations `[B, NH, S]`. Returns h `[B, NH, S, DH]`.
pub fn parallel(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    igate: &Tensor,
    fgate: &Tensor,
) -> Result<Tensor> {
    match q.device() {
        Device::Cpu => fused_cpu::parallel(q, k, v, igate, fgate),
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => {
            check_sequence_inputs("mlstm parallel", q, k, v, igate, fgate)?;
            fused_cuda::parallel_packed(&pack_qkv(q, k, v)?, &pack_gates(igate, fgate)?)
        }
        _ => reference::parallel(q, k, v, igate, fgate),
    }
}

/// Chunkwise form for any S (the last chunk may be shorter than `chunk_size`).
/// `initial` None = the all-zero state. Returns (h `[B, NH, S, DH]`, final state); on the
/// CPU h is a view of the fused op's output (call `contiguous` for a packed copy).
pub fn chunkwise(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    igate: &Tensor,
    fgate: &Tensor,
    chunk_size: usize,
    initial: Option<&MlstmState>,
) -> Result<(Tensor, MlstmState)> {
    match q.device() {
        Device::Cpu => fused_cpu::chunkwise(q, k, v, igate, fgate, chunk_size, initial),
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => {
            check_sequence_inputs("mlstm chunkwise", q, k, v, igate, fgate)?;
            chunkwise_packed(
                &pack_qkv(q, k, v)?,
                &pack_gates(igate, fgate)?,
                chunk_size,
                initial,
            )
        }
        _ => reference::chunkwise(q, k, v, igate, fgate, chunk_size, initial),
    }
}

/// [`parallel`] on the kernels' packed layout: `qkv` `[B, NH, S, 3·DH]` (q, k, v side by
/// side on the last dim) and `gates` `[B, NH, S, 2]` (igate, fgate). A caller that computes
/// q, k, v together (the mLSTM block) skips the repacking copies of the unpacked form.
pub fn parallel_packed(qkv: &Tensor, gates: &Tensor) -> Result<Tensor> {
    let [q, k, v, igate, fgate] = unpack("mlstm parallel", qkv, gates)?;
    check_sequence_inputs("mlstm parallel", &q, &k, &v, &igate, &fgate)?;
    match q.device() {
        Device::Cpu => fused_cpu::parallel_packed(qkv, gates),
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => fused_cuda::parallel_packed(qkv, gates),
        _ => reference::parallel(&q, &k, &v, &igate, &fgate),
    }
}

/// [`chunkwise`] on the packed layout of [`parallel_packed`].
pub fn chunkwise_packed(
    qkv: &Tensor,
    gates: &Tensor,
    chunk_size: usize,
    initial: Option<&MlstmState>,
) -> Result<(Tensor, MlstmState)> {
    const OP: &str = "mlstm chunkwise";
    let [q, k, v, igate, fgate] = unpack(OP, qkv, gates)?;
    let dims = check_sequence_inputs(OP, &q, &k, &v, &igate, &fgate)?;
    check_chunk_size(OP, chunk_size)?;
    if let Some(state) = initial {
        check_state(OP, state, dims.batch, dims.heads, dims.head_dim, q.device())?;
    }
    match q.device() {
        Device::Cpu => fused_cpu::chunkwise_packed(qkv, gates, chunk_size, initial),
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => fused_cuda::chunkwise_packed(qkv, gates, chunk_size, initial),
        _ => reference::chunkwise(&q, &k, &v, &igate, &fgate, chunk_size, initial),
    }
}

/// Length of a state record `[C (DH·DH) | n (DH) | m]`.
pub(crate) fn state_record_len(head_dim: usize) -> usize {
    head_dim * head_dim + head_dim + 1
}

/// q, k, v side by side `[B, NH, S, 3·DH]`: the kernels' input layout.
pub(crate) fn pack_qkv(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    // Each (batch row, head) as a batch row of one head: the fused pack then lays q, k and v
    // side by side in one copy each way. candle's `cat` along the last dim copied row by row,
    // and its backward pass copied again.
    let (batch, heads, seq_len, head_dim) = q.dims4()?;
    let rows = |t: &Tensor| t.reshape((batch * heads, seq_len, head_dim));
    super::pack::pack_heads(&rows(q)?, &rows(k)?, &rows(v)?, 1)?.reshape((
        batch,
        heads,
        seq_len,
        3 * head_dim,
    ))
}

/// igate, fgate interleaved `[B, NH, S, 2]`.
pub(crate) fn pack_gates(igate: &Tensor, fgate: &Tensor) -> Result<Tensor> {
    Tensor::stack(&[igate, fgate], 3)?.contiguous()
}

/// Packs a state into contiguous records `[B, NH, DH·DH + DH + 1]`.
pub(crate) fn pack_state(state: &MlstmState) -> Result<Tensor> {
    Tensor::cat(
        &[
            state.c.flatten_from(2)?,
            state.n.clone(),
            state.m.unsqueeze(2)?,
        ],
        2,
    )?
    .contiguous()
}

/// Splits records `[B, NH, DH·DH + DH + 1]` into a state.
pub(crate) fn unpack_state(records: &Tensor, head_dim: usize) -> Result<MlstmState> {
    let (batch, heads, _) = records.dims3()?;
    let d = head_dim;
    Ok(MlstmState {
        c: records.narrow(2, 0, d * d)?.reshape((batch, heads, d, d))?,
        n: records.narrow(2, d * d, d)?.contiguous()?,
        m: records.narrow(2, d * d + d, 1)?.squeeze(2)?.contiguous()?,
    })
}

/// Views q, k, v, igate, fgate of packed inputs.
fn unpack(op: &str, qkv: &Tensor, gates: &Tensor) -> Result<[Tensor; 5]> {
    let head_dim = match qkv.dims() {
        &[_, _, _, width] if width > 0 && width % 3 == 0 => width / 3,
        dims => {
            return Err(Error::Msg(format!(
                "{op}: packed qkv has shape {dims:?}, expected [B, NH, S, 3·DH]"
            )));
        }
    };
    if !matches!(gates.dims(), &[_, _, _, 2]) {
        return Err(Error::Msg(format!(
            "{op}: packed gates have shape {:?}, expected [B, NH, S, 2] (igate, fgate)",
            gates.dims()
        )));
    }
    let part = |t: &Tensor, i: usize, len: usize| t.narrow(3, i * len, len);
    Ok([
        part(qkv, 0, head_dim)?,
        part(qkv, 1, head_dim)?,
        part(qkv, 2, head_dim)?,
        part(gates, 0, 1)?.squeeze(3)?,
        part(gates, 1, 1)?.squeeze(3)?,
    ])
}

/// One recurrent step: q, k, v `[B, NH, DH]`, gate pre-activations `[B, NH]`.
/// Returns (h `[B, NH, DH]`, new state). Not differentiable on the CPU path.
pub fn step(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    igate: &Tensor,
    fgate: &Tensor,
    state: &MlstmState,
) -> Result<(Tensor, MlstmState)> {
    match q.device() {
        Device::Cpu => fused_cpu::step(q, k, v, igate, fgate, state),
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => {
            check_step_inputs("mlstm step", q, k, v, igate, fgate, state)?;
            fused_cuda::step(q, k, v, igate, fgate, state)
        }
        _ => reference::step(q, k, v, igate, fgate, state),
    }
}

/// Sizes of a checked sequence call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SequenceDims {
    pub batch: usize,
    pub heads: usize,
    pub seq_len: usize,
    pub head_dim: usize,
}

/// Sizes of a checked step call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct StepDims {
    pub batch: usize,
    pub heads: usize,
    pub head_dim: usize,
}

fn expect_f32_on(op: &str, name: &str, t: &Tensor, device: &Device) -> Result<()> {
    expect_dtype_on(op, name, t, DType::F32, "", device)
}

/// The dtype of q: f32, or bf16 on a CUDA device (whose kernels compute in f32 and return h
/// in bf16); every other input must have it too.
fn expect_input_dtype(op: &str, q: &Tensor) -> Result<DType> {
    match q.dtype() {
        DType::F32 => Ok(DType::F32),
        DType::BF16 if q.device().is_cuda() => Ok(DType::BF16),
        other => Err(Error::Msg(format!(
            "{op}: q has dtype {other:?}, expected F32 (or BF16 on a CUDA device)"
        ))),
    }
}

fn expect_dtype_on(
    op: &str,
    name: &str,
    t: &Tensor,
    dtype: DType,
    why: &str,
    device: &Device,
) -> Result<()> {
    if t.dtype() != dtype {
        return Err(Error::Msg(format!(
            "{op}: {name} has dtype {:?}, expected {dtype:?}{why}",
            t.dtype()
        )));
    }
    if !t.device().same_device(device) {
        return Err(Error::Msg(format!(
            "{op}: {name} is on {:?}, but q is on {:?}",
            t.device(),
            device
        )));
    }
    Ok(())
}

fn expect_shape(op: &str, name: &str, t: &Tensor, expected: &[usize], meaning: &str) -> Result<()> {
    if t.dims() != expected {
        return Err(Error::Msg(format!(
            "{op}: {name} has shape {:?}, expected {meaning} = {expected:?}",
            t.dims()
        )));
    }
    Ok(())
}

/// Checks dtypes, devices and shapes of the sequence inputs (q sets B, NH, S, DH).
pub(crate) fn check_sequence_inputs(
    op: &str,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    igate: &Tensor,
    fgate: &Tensor,
) -> Result<SequenceDims> {
    let &[batch, heads, seq_len, head_dim] = q.dims() else {
        return Err(Error::Msg(format!(
            "{op}: q has shape {:?}, expected [B, NH, S, DH]",
            q.dims()
        )));
    };
    if batch == 0 || heads == 0 || seq_len == 0 || head_dim == 0 {
        return Err(Error::Msg(format!(
            "{op}: q has shape {:?}, expected [B, NH, S, DH] with every size at least 1",
            q.dims()
        )));
    }
    let device = q.device();
    let dtype = expect_input_dtype(op, q)?;
    let qkv_shape = [batch, heads, seq_len, head_dim];
    for (name, t) in [("k", k), ("v", v)] {
        expect_dtype_on(op, name, t, dtype, " (the dtype of q)", device)?;
        expect_shape(op, name, t, &qkv_shape, "[B, NH, S, DH] (the shape of q)")?;
    }
    for (name, t) in [("igate", igate), ("fgate", fgate)] {
        expect_dtype_on(op, name, t, dtype, " (the dtype of q)", device)?;
        expect_shape(op, name, t, &qkv_shape[..3], "[B, NH, S]")?;
    }
    Ok(SequenceDims {
        batch,
        heads,
        seq_len,
        head_dim,
    })
}

/// Checks that `state` matches B, NH, DH and is f32 on `device`.
pub(crate) fn check_state(
    op: &str,
    state: &MlstmState,
    batch: usize,
    heads: usize,
    head_dim: usize,
    device: &Device,
) -> Result<()> {
    expect_f32_on(op, "state.c", &state.c, device)?;
    expect_f32_on(op, "state.n", &state.n, device)?;
    expect_f32_on(op, "state.m", &state.m, device)?;
    expect_shape(
        op,
        "state.c",
        &state.c,
        &[batch, heads, head_dim, head_dim],
        "[B, NH, DH, DH]",
    )?;
    expect_shape(
        op,
        "state.n",
        &state.n,
        &[batch, heads, head_dim],
        "[B, NH, DH]",
    )?;
    expect_shape(op, "state.m", &state.m, &[batch, heads], "[B, NH]")
}

pub(crate) fn check_chunk_size(op: &str, chunk_size: usize) -> Result<()> {
    if chunk_size == 0 {
        return Err(Error::Msg(format!(
            "{op}: chunk_size is 0, expected at least 1"
        )));
    }
    Ok(())
}

/// Checks dtypes, devices and shapes of the step inputs and the state.
pub(crate) fn check_step_inputs(
    op: &str,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    igate: &Tensor,
    fgate: &Tensor,
    state: &MlstmState,
) -> Result<StepDims> {
    let &[batch, heads, head_dim] = q.dims() else {
        return Err(Error::Msg(format!(
            "{op}: q has shape {:?}, expected [B, NH, DH]",
            q.dims()
        )));
    };
    if batch == 0 || heads == 0 || head_dim == 0 {
        return Err(Error::Msg(format!(
            "{op}: q has shape {:?}, expected [B, NH, DH] with every size at least 1",
            q.dims()
        )));
    }
    let device = q.device();
    let dtype = expect_input_dtype(op, q)?;
    let qkv_shape = [batch, heads, head_dim];
    for (name, t) in [("k", k), ("v", v)] {
        expect_dtype_on(op, name, t, dtype, " (the dtype of q)", device)?;
        expect_shape(op, name, t, &qkv_shape, "[B, NH, DH] (the shape of q)")?;
    }
    for (name, t) in [("igate", igate), ("fgate", fgate)] {
        expect_dtype_on(op, name, t, dtype, " (the dtype of q)", device)?;
        expect_shape(op, name, t, &qkv_shape[..2], "[B, NH]")?;
    }
    check_state(op, state, batch, heads, head_dim, device)?;
    Ok(StepDims {
        batch,
        heads,
        head_dim,
    })
}
