//! Access to the f32 data of CPU tensors for the fused kernels' custom ops, with errors that
//! name the op and the argument.

use candle_core::{CpuStorage, Error, Layout, Result, Storage, Tensor};

/// All f32 values of a CPU storage.
pub(crate) fn f32_data<'a>(op: &str, what: &str, storage: &'a CpuStorage) -> Result<&'a [f32]> {
    match storage {
        CpuStorage::F32(data) => Ok(data),
        other => Err(Error::Msg(format!(
            "{op}: {what} has dtype {:?}, this kernel computes in f32 only",
            candle_core::backend::BackendStorage::dtype(other)
        ))),
    }
}

/// The f32 values of a contiguous tensor argument.
pub(crate) fn contiguous_data<'a>(
    op: &str,
    what: &str,
    storage: &'a CpuStorage,
    layout: &Layout,
) -> Result<&'a [f32]> {
    let data = f32_data(op, what, storage)?;
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| Error::Msg(format!("{op}: {what} is not contiguous")))?;
    Ok(&data[start..end])
}

/// The CPU storage of a tensor argument.
pub(crate) fn cpu_storage<'a>(
    op: &str,
    what: &str,
    storage: &'a Storage,
) -> Result<&'a CpuStorage> {
    match storage {
        Storage::Cpu(cpu) => Ok(cpu),
        _ => Err(Error::Msg(format!(
            "{op}: {what} is not on the CPU; this kernel is CPU-only"
        ))),
    }
}

/// Runs `f` on the f32 data of a contiguous copy of `t` (no copy when `t` is contiguous).
pub(crate) fn with_contiguous<R>(
    op: &str,
    what: &str,
    t: &Tensor,
    f: impl FnOnce(&[f32]) -> Result<R>,
) -> Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    f(contiguous_data(
        op,
        what,
        cpu_storage(op, what, &storage)?,
        layout,
    )?)
}

/// The sum of per-task partial sums (weight gradients), each `len` long, added in task order
/// onto zeros: the result does not depend on how rayon split or scheduled the tasks.
pub(crate) fn sum_in_task_order(partials: Vec<Vec<f32>>, len: usize) -> Vec<f32> {
    partials
        .into_iter()
        .fold(vec![0f32; len], |mut total, partial| {
            for (t, p) in total.iter_mut().zip(partial) {
                *t += p;
            }
            total
        })
}

/// A buffer of `len` values for a kernel's output, which the kernel writes in full before
/// anything reads it. It is not zeroed: zeroing the outputs of the forward pass cost about a
/// seventh of the sLSTM stack's inference forward (BENCHMARKS.md, "Sixth speed pass"), mostly
/// in the allocator's memset of reused memory.
#[allow(clippy::uninit_vec)]
pub(crate) fn output_buffer(len: usize) -> Vec<f32> {
    let mut buffer = Vec::with_capacity(len);
    // SAFETY: f32 has no drop glue and every bit pattern is a valid f32; each caller writes
    // every element before the buffer is read or handed to candle (the kernels' tests compare
    // whole outputs against candle-ops references, which a stale element would fail).
    unsafe { buffer.set_len(len) };
    buffer
}
