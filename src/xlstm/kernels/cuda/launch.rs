//! Runs launch plans on a CUDA device through candle's CUDA backend (cudarc).

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute;
use std::sync::OnceLock;

use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDevice, WrapErr};
use candle_core::{CpuStorage, CudaStorage, DType, Error, Layout, Result, Shape, Tensor};

use super::plan::{Arg, DEFAULT_SHARED_BYTES, Launch, MAX_SHARED_BYTES};

/// One `.cu` file's PTX, loaded once per device under `name`.
pub(crate) struct Module {
    name: &'static str,
    ptx: &'static str,
}

pub(crate) const MLSTM: Module = Module {
    name: "xlstm_forecast_mlstm",
    ptx: include_str!(concat!(env!("OUT_DIR"), "/mlstm.ptx")),
};

pub(crate) const SLSTM: Module = Module {
    name: "xlstm_forecast_slstm",
    ptx: include_str!(concat!(env!("OUT_DIR"), "/slstm.ptx")),
};

/// Runs `launches` in order on the device's stream; `buffers[i]` is the device address of the
/// plan's buffer i. The caller keeps the buffers alive (and their cudarc access records)
/// until this returns: the launches are queued on the same stream as every later use.
pub(crate) fn run(
    device: &CudaDevice,
    module: &Module,
    launches: &[Launch],
    buffers: &[u64],
) -> Result<()> {
    enum Value {
        Pointer(u64),
        Int(i32),
    }
    for launch in launches {
        let shared_bytes = launch.shared_floats * 4;
        if shared_bytes > MAX_SHARED_BYTES {
            return Err(Error::Msg(format!(
                "{}: needs {shared_bytes} bytes of shared memory, more than the \
                 {MAX_SHARED_BYTES} a launch may use",
                launch.function
            )));
        }
        let func = device.get_or_load_custom_func(launch.function, module.name, module.ptx)?;
        if shared_bytes > DEFAULT_SHARED_BYTES {
            func.set_attribute(
                CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                shared_bytes as i32,
            )
            .w()?;
        }
        let values: Vec<Value> = launch
            .args
            .iter()
            .map(|arg| match *arg {
                Arg::Slice { buffer, offset, .. } => {
                    Value::Pointer(buffers[buffer] + (offset * std::mem::size_of::<f32>()) as u64)
                }
                Arg::Null => Value::Pointer(0),
                Arg::Int(value) => Value::Int(value),
            })
            .collect();
        let mut builder = func.builder();
        for value in &values {
            match value {
                Value::Pointer(address) => builder.arg(address),
                Value::Int(value) => builder.arg(value),
            };
        }
        let config = LaunchConfig {
            grid_dim: (launch.grid.0 as u32, launch.grid.1 as u32, 1),
            block_dim: (launch.block.0 as u32, launch.block.1 as u32, 1),
            shared_mem_bytes: shared_bytes as u32,
        };
        // SAFETY: plans pass every kernel the arguments of its signature, in order, and
        // buffers of the lengths the kernel reads and writes.
        unsafe { builder.launch(config) }.w()?;
    }
    Ok(())
}

/// Device addresses in the order of a plan's buffer indices: `(index, address)` pairs, each
/// index of `0..N` exactly once.
pub(crate) fn by_index<const N: usize>(entries: [(usize, u64); N]) -> [u64; N] {
    let mut addresses = [None; N];
    for (index, address) in entries {
        assert!(
            addresses[index].replace(address).is_none(),
            "buffer {index} given twice"
        );
    }
    addresses.map(|address| address.expect("every buffer given"))
}

/// What a forward op keeps on the device for its backward pass (torch's `save_for_backward`),
/// only while gradients are tracked.
pub(crate) struct DeviceTape(Option<OnceLock<CudaSlice<f32>>>);

impl DeviceTape {
    /// Records when any of the op's inputs is tracked.
    pub fn for_inputs(inputs: &[&Tensor]) -> Self {
        Self(inputs.iter().any(|t| t.track_op()).then(OnceLock::new))
    }

    pub fn recording(&self) -> bool {
        self.0.is_some()
    }

    pub fn keep(&self, op: &str, tape: CudaSlice<f32>) -> Result<()> {
        match &self.0 {
            Some(slot) => slot
                .set(tape)
                .map_err(|_| Error::Msg(format!("{op}: forward pass ran twice on one tape"))),
            None => Ok(()),
        }
    }

    pub fn recorded(&self, op: &str) -> Result<&CudaSlice<f32>> {
        self.0.as_ref().and_then(OnceLock::get).ok_or_else(|| {
            Error::Msg(format!(
                "{op}: backward pass without a recorded forward pass (inputs were not tracked)"
            ))
        })
    }
}

/// The CPU half of a CUDA-only custom op: the kernels' device dispatch sends CPU tensors to the
/// fused CPU kernels, so this answers only a caller that bypassed it.
pub(crate) fn cpu_tensors_rejected(op: &str) -> Result<(CpuStorage, Shape)> {
    Err(Error::Msg(format!(
        "{op}: runs on CUDA devices; CPU tensors go to the fused CPU kernels"
    )))
}

/// The f32 elements of a contiguous custom-op argument.
pub(crate) fn f32_view<'a>(
    op: &str,
    name: &str,
    storage: &'a CudaStorage,
    layout: &Layout,
) -> Result<CudaView<'a, f32>> {
    if storage.dtype() != DType::F32 {
        return Err(Error::Msg(format!(
            "{op}: {name} has dtype {:?}, expected F32",
            storage.dtype()
        )));
    }
    let (start, end) = layout.contiguous_offsets().ok_or_else(|| {
        Error::Msg(format!(
            "{op}: {name} is not contiguous (layout {layout:?})"
        ))
    })?;
    Ok(storage.as_cuda_slice::<f32>()?.slice(start..end))
}
