//! The CUDA kernels of `kernels/cuda/mlstm.cu` as candle custom ops: the chunkwise form
//! (which also serves the parallel form, see that file) with its own backward pass, and the
//! recurrent step. Inputs are packed as for the fused CPU kernels (`fused_cpu.rs`); the op
//! outputs are laid out the same way, so the wrappers here mirror the CPU ones.
//!
//! While gradients are tracked the forward pass keeps its tape on the device (the state
//! before every chunk and the per-row stabiliser and normaliser) for the backward pass.
//! bf16 inputs are converted to f32 for the kernels and h back to bf16; states stay f32.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut};
use candle_core::{CpuStorage, CudaStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};

use super::super::cuda::launch::{
    DeviceTape, MLSTM, by_index, cpu_tensors_rejected, f32_view, run,
};
use super::super::cuda::plan::{
    MlstmChunkwise, mlstm_backward, mlstm_forward, mlstm_step, mlstm_step_buffers,
};
use super::{MlstmState, pack_state, state_record_len, unpack_state};

/// Chunkwise form on (qkv, gates, initial state records); output flat as on the CPU: h of
/// every head `[B, NH, S, DH]`, then every head's final state record.
struct ChunkwiseOp {
    plan: MlstmChunkwise,
    /// `Some` while gradients are tracked: states, then rows (see `mlstm.cu`).
    tape: DeviceTape,
}

impl CustomOp3 for ChunkwiseOp {
    fn name(&self) -> &'static str {
        "mlstm-chunkwise-cuda"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        cpu_tensors_rejected(self.name())
    }

    fn cuda_fwd(
        &self,
        qkv_storage: &CudaStorage,
        qkv_layout: &Layout,
        gates_storage: &CudaStorage,
        gates_layout: &Layout,
        initial_storage: &CudaStorage,
        initial_layout: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let op = self.name();
        let plan = self.plan;
        let qkv = f32_view(op, "qkv", qkv_storage, qkv_layout)?;
        let gates = f32_view(op, "gates", gates_storage, gates_layout)?;
        let initial = f32_view(op, "initial state", initial_storage, initial_layout)?;
        let device = qkv_storage.device().clone();
        let stream = device.cuda_stream();
        let recording = self.tape.recording();
        // SAFETY: the kernels write every element the tape and output hold: the state before
        // every chunk and the last, h (and rows when recording) of every row, every final state.
        let mut tape = unsafe { device.alloc::<f32>(plan.tape_len(recording))? };
        let mut out = unsafe { device.alloc::<f32>(plan.out_len())? };
        {
            let (qkv_ptr, _qkv) = qkv.device_ptr(&stream);
            let (gates_ptr, _gates) = gates.device_ptr(&stream);
            let (initial_ptr, _initial) = initial.device_ptr(&stream);
            let (tape_ptr, _tape) = tape.device_ptr_mut(&stream);
            let (out_ptr, _out) = out.device_ptr_mut(&stream);
            run(
                &device,
                &MLSTM,
                &plan.forward(op, recording)?,
                &by_index([
                    (mlstm_forward::QKV, qkv_ptr),
                    (mlstm_forward::GATES, gates_ptr),
                    (mlstm_forward::INITIAL, initial_ptr),
                    (mlstm_forward::TAPE, tape_ptr),
                    (mlstm_forward::OUT, out_ptr),
                ]),
            )?;
        }
        self.tape.keep(op, tape)?;
        let len = plan.out_len();
        Ok((CudaStorage::wrap_cuda_slice(out, device), Shape::from(len)))
    }

    fn bwd(
        &self,
        qkv: &Tensor,
        gates: &Tensor,
        initial: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let tape = self.tape.recorded(self.name())?;
        let grads = grad_res.contiguous()?.apply_op3_no_bwd(
            &qkv.contiguous()?,
            &gates.contiguous()?,
            &ChunkwiseBackwardOp {
                plan: self.plan,
                tape,
            },
        )?;
        let (qkv_len, gates_len) = (qkv.elem_count(), gates.elem_count());
        Ok((
            Some(grads.narrow(0, 0, qkv_len)?.reshape(qkv.shape())?),
            Some(
                grads
                    .narrow(0, qkv_len, gates_len)?
                    .reshape(gates.shape())?,
            ),
            Some(
                grads
                    .narrow(0, qkv_len + gates_len, initial.elem_count())?
                    .reshape(initial.shape())?,
            ),
        ))
    }
}

/// Backward op on (output gradient, qkv, gates); output flat
/// `[grad qkv | grad gates | grad initial state records]`.
struct ChunkwiseBackwardOp<'a> {
    plan: MlstmChunkwise,
    tape: &'a CudaSlice<f32>,
}

impl CustomOp3 for ChunkwiseBackwardOp<'_> {
    fn name(&self) -> &'static str {
        "mlstm-chunkwise-cuda-backward"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        cpu_tensors_rejected(self.name())
    }

    fn cuda_fwd(
        &self,
        grad_storage: &CudaStorage,
        grad_layout: &Layout,
        qkv_storage: &CudaStorage,
        qkv_layout: &Layout,
        gates_storage: &CudaStorage,
        gates_layout: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let op = self.name();
        let plan = self.plan;
        let grad_out = f32_view(op, "output gradient", grad_storage, grad_layout)?;
        let qkv = f32_view(op, "qkv", qkv_storage, qkv_layout)?;
        let gates = f32_view(op, "gates", gates_storage, gates_layout)?;
        let device = qkv_storage.device().clone();
        let stream = device.cuda_stream();
        // SAFETY: the kernels write every carry record and every element of the output.
        let mut carries = unsafe { device.alloc::<f32>(plan.carries_len())? };
        let mut out = unsafe { device.alloc::<f32>(plan.grads_len())? };
        {
            let (grad_ptr, _grad) = grad_out.device_ptr(&stream);
            let (qkv_ptr, _qkv) = qkv.device_ptr(&stream);
            let (gates_ptr, _gates) = gates.device_ptr(&stream);
            let (tape_ptr, _tape) = self.tape.device_ptr(&stream);
            let (carries_ptr, _carries) = carries.device_ptr_mut(&stream);
            let (out_ptr, _out) = out.device_ptr_mut(&stream);
            run(
                &device,
                &MLSTM,
                &plan.backward(op)?,
                &by_index([
                    (mlstm_backward::GRAD_OUT, grad_ptr),
                    (mlstm_backward::QKV, qkv_ptr),
                    (mlstm_backward::GATES, gates_ptr),
                    (mlstm_backward::TAPE, tape_ptr),
                    (mlstm_backward::CARRIES, carries_ptr),
                    (mlstm_backward::OUT, out_ptr),
                ]),
            )?;
        }
        let len = plan.grads_len();
        Ok((CudaStorage::wrap_cuda_slice(out, device), Shape::from(len)))
    }
}

/// One recurrent step on (qkv `[B, NH, 3·DH]`, gates `[B, NH, 2]`, state records); output
/// `[B, NH, DH + state_len]` = h then the new state record. Inference only, like the CPU op.
struct StepOp {
    head_dim: usize,
}

impl CustomOp3 for StepOp {
    fn name(&self) -> &'static str {
        "mlstm-step-cuda"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        cpu_tensors_rejected(self.name())
    }

    fn cuda_fwd(
        &self,
        qkv_storage: &CudaStorage,
        qkv_layout: &Layout,
        gates_storage: &CudaStorage,
        gates_layout: &Layout,
        state_storage: &CudaStorage,
        state_layout: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let op = self.name();
        let qkv = f32_view(op, "qkv", qkv_storage, qkv_layout)?;
        let gates = f32_view(op, "gates", gates_storage, gates_layout)?;
        let state = f32_view(op, "state", state_storage, state_layout)?;
        let device = qkv_storage.device().clone();
        let stream = device.cuda_stream();
        let (batch, heads) = (qkv_layout.dims()[0], qkv_layout.dims()[1]);
        let out_width = self.head_dim + state_record_len(self.head_dim);
        // SAFETY: the kernel writes h and the whole new state record of every head.
        let mut out = unsafe { device.alloc::<f32>(batch * heads * out_width)? };
        {
            let (qkv_ptr, _qkv) = qkv.device_ptr(&stream);
            let (gates_ptr, _gates) = gates.device_ptr(&stream);
            let (state_ptr, _state) = state.device_ptr(&stream);
            let (out_ptr, _out) = out.device_ptr_mut(&stream);
            run(
                &device,
                &MLSTM,
                &[mlstm_step(op, batch * heads, self.head_dim)?],
                &by_index([
                    (mlstm_step_buffers::QKV, qkv_ptr),
                    (mlstm_step_buffers::GATES, gates_ptr),
                    (mlstm_step_buffers::STATE, state_ptr),
                    (mlstm_step_buffers::OUT, out_ptr),
                ]),
            )?;
        }
        Ok((
            CudaStorage::wrap_cuda_slice(out, device),
            Shape::from((batch, heads, out_width)),
        ))
    }
}

/// Runs the chunkwise op on packed, checked inputs (f32 or bf16, computed in f32); returns h
/// `[B, NH, S, DH]` in the inputs' dtype and the final state records `[B, NH, SL]` in f32.
fn run_chunkwise(
    qkv: &Tensor,
    gates: &Tensor,
    initial: &Tensor,
    chunk_size: usize,
) -> Result<(Tensor, Tensor)> {
    let (batch, heads, seq_len, width) = qkv.dims4()?;
    let plan = MlstmChunkwise::new(batch * heads, seq_len, width / 3, chunk_size);
    let dtype = qkv.dtype();
    let (qkv, gates) = (qkv.to_dtype(DType::F32)?, gates.to_dtype(DType::F32)?);
    let tape = DeviceTape::for_inputs(&[&qkv, &gates, initial]);
    let out =
        qkv.contiguous()?
            .apply_op3(&gates.contiguous()?, initial, ChunkwiseOp { plan, tape })?;
    let h = out
        .narrow(0, 0, plan.h_len())?
        .reshape((batch, heads, seq_len, width / 3))?
        .to_dtype(dtype)?;
    let records = out
        .narrow(0, plan.h_len(), batch * heads * plan.state_len())?
        .reshape((batch, heads, plan.state_len()))?;
    Ok((h, records))
}

/// The parallel form on packed, checked inputs: the chunkwise kernels from the state
/// (0, 0, m = −inf), whose row stabilisers are the parallel form's. Returns h `[B, NH, S, DH]`.
pub(super) fn parallel_packed(qkv: &Tensor, gates: &Tensor) -> Result<Tensor> {
    let (batch, heads, _, width) = qkv.dims4()?;
    let d = width / 3;
    let state_len = state_record_len(d);
    let no_state = Tensor::zeros((batch, heads, state_len - 1), DType::F32, qkv.device())?;
    let minus_inf = Tensor::full(f32::NEG_INFINITY, (batch, heads, 1), qkv.device())?;
    let initial = Tensor::cat(&[&no_state, &minus_inf], 2)?;
    let (h, _) = run_chunkwise(qkv, gates, &initial, MlstmChunkwise::MAX_CHUNK)?;
    Ok(h)
}

/// The chunkwise form on packed, checked inputs; returns h `[B, NH, S, DH]` and the final state.
pub(super) fn chunkwise_packed(
    qkv: &Tensor,
    gates: &Tensor,
    chunk_size: usize,
    initial: Option<&MlstmState>,
) -> Result<(Tensor, MlstmState)> {
    let (batch, heads, _, width) = qkv.dims4()?;
    let d = width / 3;
    let state_len = state_record_len(d);
    let initial = match initial {
        Some(state) => pack_state(state)?,
        None => Tensor::zeros((batch, heads, state_len), DType::F32, qkv.device())?,
    };
    let (h, records) = run_chunkwise(qkv, gates, &initial, chunk_size)?;
    Ok((h, unpack_state(&records, d)?))
}

/// One recurrent step on checked inputs (q, k, v `[B, NH, DH]`, gates `[B, NH]`).
pub(super) fn step(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    igate: &Tensor,
    fgate: &Tensor,
    state: &MlstmState,
) -> Result<(Tensor, MlstmState)> {
    let head_dim = q.dim(2)?;
    let dtype = q.dtype();
    let qkv = Tensor::cat(&[q, k, v], 2)?
        .to_dtype(DType::F32)?
        .contiguous()?;
    let gates = Tensor::stack(&[igate, fgate], 2)?
        .to_dtype(DType::F32)?
        .contiguous()?;
    let out = qkv.apply_op3_no_bwd(&gates, &pack_state(state)?, &StepOp { head_dim })?;
    let h = out.narrow(2, 0, head_dim)?.to_dtype(dtype)?.contiguous()?;
    let record_len = state_record_len(head_dim);
    let new_state = unpack_state(&out.narrow(2, head_dim, record_len)?, head_dim)?;
    Ok((h, new_state))
}
