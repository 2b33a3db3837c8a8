//! The CUDA sLSTM scan of `kernels/cuda/slstm.cu` as candle custom ops: one kernel launch for
//! the forward pass over the whole sequence, one for the backward pass. Inputs, output and tape
//! are laid out as for the fused CPU scan (`fused_cpu.rs`); the tape stays on the device.
//! bf16 inputs are converted to f32 for the kernels and h back to bf16; states stay f32.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut};
use candle_core::{
    CpuStorage, CudaStorage, CustomOp3, DType, Error, Layout, Result, Shape, Tensor,
};

use super::super::cuda::launch::{
    DeviceTape, SLSTM, by_index, cpu_tensors_rejected, f32_view, run,
};
use super::super::cuda::plan::{SlstmScan, slstm_backward, slstm_forward};
use super::{STATE_ROWS, ScanDims, ScanInputs, SlstmState};

/// Forward op: x `[B, S, 4H]`, r_aug `[NH, DH + 1, 4, DH]`, initial state `[4, B, H]`;
/// output `[B, NH, S + 4, DH]` (h of every step, then the final h, c, n, m).
struct ScanForward {
    dims: ScanDims,
    plan: SlstmScan,
    tape: DeviceTape,
}

impl CustomOp3 for ScanForward {
    fn name(&self) -> &'static str {
        "slstm-scan-cuda"
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
        x_storage: &CudaStorage,
        x_layout: &Layout,
        r_storage: &CudaStorage,
        r_layout: &Layout,
        init_storage: &CudaStorage,
        init_layout: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let op = self.name();
        let x = f32_view(op, "x", x_storage, x_layout)?;
        let r_aug = f32_view(op, "r_aug", r_storage, r_layout)?;
        let init = f32_view(op, "initial state", init_storage, init_layout)?;
        let device = x_storage.device().clone();
        let stream = device.cuda_stream();
        let plan = self.plan;
        let recording = self.tape.recording();
        // SAFETY: the kernel writes every row of h and the final state of every pair, and
        // (when recording) every tape slot of every step.
        let mut out = unsafe { device.alloc::<f32>(plan.out_len())? };
        // One float stands in for the tape a non-recording scan does not write.
        let mut tape = unsafe { device.alloc::<f32>(if recording { plan.tape_len() } else { 1 })? };
        {
            let (x_ptr, _x) = x.device_ptr(&stream);
            let (r_ptr, _r) = r_aug.device_ptr(&stream);
            let (init_ptr, _init) = init.device_ptr(&stream);
            let (out_ptr, _out) = out.device_ptr_mut(&stream);
            let (tape_ptr, _tape) = tape.device_ptr_mut(&stream);
            run(
                &device,
                &SLSTM,
                &[plan.forward(op, recording)?],
                &by_index([
                    (slstm_forward::X, x_ptr),
                    (slstm_forward::R_AUG, r_ptr),
                    (slstm_forward::INIT, init_ptr),
                    (slstm_forward::OUT, out_ptr),
                    (slstm_forward::TAPE, tape_ptr),
                ]),
            )?;
        }
        self.tape.keep(op, tape)?;
        let shape = Shape::from((
            plan.batch,
            plan.heads,
            plan.seq_len + STATE_ROWS,
            plan.head_dim,
        ));
        Ok((CudaStorage::wrap_cuda_slice(out, device), shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        r_aug: &Tensor,
        init: &Tensor,
        _packed: &Tensor,
        grad_packed: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let tape = self.tape.recorded(self.name())?;
        let grads = grad_packed.contiguous()?.apply_op3_no_bwd(
            r_aug,
            init,
            &ScanBackward {
                plan: self.plan,
                tape,
            },
        )?;
        // One weight gradient per batch row, summed in a fixed order.
        let (dx, dr, dinit) = self.dims.unpack_grads(&grads, x, r_aug, self.dims.batch)?;
        Ok((Some(dx), Some(dr), Some(dinit)))
    }
}

/// Backward op: output gradient `[B, NH, S + 4, DH]`, r_aug, initial state; output flat
/// `[dx (B·S·4H) | d initial state as [B, 4, H] | d r_aug per batch row (B·NH·(DH + 1)·4·DH)]`.
struct ScanBackward<'a> {
    plan: SlstmScan,
    tape: &'a CudaSlice<f32>,
}

impl CustomOp3 for ScanBackward<'_> {
    fn name(&self) -> &'static str {
        "slstm-scan-cuda-backward"
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
        r_storage: &CudaStorage,
        r_layout: &Layout,
        init_storage: &CudaStorage,
        init_layout: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let op = self.name();
        let grad_out = f32_view(op, "output gradient", grad_storage, grad_layout)?;
        let r_aug = f32_view(op, "r_aug", r_storage, r_layout)?;
        let init = f32_view(op, "initial state", init_storage, init_layout)?;
        let device = grad_storage.device().clone();
        let stream = device.cuda_stream();
        let plan = self.plan;
        // SAFETY: the kernel writes every element: dx and d init of every row, and the weight
        // gradient of every row.
        let mut out = unsafe { device.alloc::<f32>(plan.grads_len())? };
        {
            let (grad_ptr, _grad) = grad_out.device_ptr(&stream);
            let (r_ptr, _r) = r_aug.device_ptr(&stream);
            let (init_ptr, _init) = init.device_ptr(&stream);
            let (tape_ptr, _tape) = self.tape.device_ptr(&stream);
            let (out_ptr, _out) = out.device_ptr_mut(&stream);
            run(
                &device,
                &SLSTM,
                &[plan.backward(op)?],
                &by_index([
                    (slstm_backward::GRAD_OUT, grad_ptr),
                    (slstm_backward::R_AUG, r_ptr),
                    (slstm_backward::INIT, init_ptr),
                    (slstm_backward::TAPE, tape_ptr),
                    (slstm_backward::OUT, out_ptr),
                ]),
            )?;
        }
        let len = plan.grads_len();
        Ok((CudaStorage::wrap_cuda_slice(out, device), Shape::from(len)))
    }
}

pub(super) fn scan(
    x: &Tensor,
    r: &Tensor,
    bias: &Tensor,
    initial: Option<&SlstmState>,
) -> Result<(Tensor, SlstmState)> {
    const OP: &str = "slstm CUDA scan";
    let dims = ScanDims::check(OP, x, r, bias, initial)?;
    let dtype = x.dtype();
    if !matches!(dtype, DType::F32 | DType::BF16) {
        return Err(Error::Msg(format!(
            "{OP}: inputs have dtype {dtype:?}; this kernel takes f32 or bf16 (computed in f32)"
        )));
    }
    let f32 = |t: &Tensor| t.to_dtype(DType::F32);
    let ScanInputs { x, r_aug, init } =
        ScanInputs::new(dims, &f32(x)?, &f32(r)?, &f32(bias)?, initial)?;
    let op = ScanForward {
        dims,
        plan: SlstmScan::new(OP, dims.batch, dims.seq_len, dims.heads, dims.head_dim)?,
        tape: DeviceTape::for_inputs(&[&x, &r_aug, &init]),
    };
    let (h, last) = dims.unpack_output(&x.apply_op3(&r_aug, &init, op)?)?;
    Ok((h.to_dtype(dtype)?, last))
}
