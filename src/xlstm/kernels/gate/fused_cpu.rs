//! Fused CPU output gate: a candle custom op on (a, b, z) with a hand-written backward pass,
//! parallel over runs of rows.
//!
//! With σ = sigmoid(z) and s = z·σ: `y = (a + b)·s`, so `da = db = dy·s` and
//! `dz = dy·(a + b)·σ·(1 + z·(1 − σ))`. z may be a view whose rows are strided (the z half of
//! the up-projection): it is read in place.

use candle_core::{CpuStorage, CustomOp3, Device, Error, Layout, Result, Shape, Storage, Tensor};
use rayon::prelude::*;

const NAME: &str = "silu-gated-sum";

/// Rows per parallel task.
const ROWS_PER_TASK: usize = 64;

/// Where the rows `[.., D]` of a tensor lie in its storage: unit stride along D and one stride
/// between consecutive rows.
#[derive(Debug, Clone, Copy)]
struct Rows {
    offset: usize,
    count: usize,
    width: usize,
    stride: usize,
}

impl Rows {
    fn from_layout(what: &str, layout: &Layout) -> Result<Self> {
        let dims = layout.dims();
        let strides = layout.stride();
        let width = *dims.last().expect("checked: rank ≥ 1");
        let count = dims[..dims.len() - 1].iter().product();
        let stride = if dims.len() >= 2 {
            strides[dims.len() - 2]
        } else {
            width
        };
        // Leading dims must collapse into one run of equally spaced rows.
        let collapses = (0..dims.len().saturating_sub(2))
            .all(|i| dims[i] == 1 || strides[i] == strides[i + 1] * dims[i + 1]);
        if (width > 1 && strides[dims.len() - 1] != 1) || !collapses {
            return Err(Error::Msg(format!(
                "{NAME}: {what} has layout {layout:?}, expected rows of unit stride"
            )));
        }
        Ok(Self {
            offset: layout.start_offset(),
            count,
            width,
            stride,
        })
    }

    fn row<'a>(&self, data: &'a [f32], i: usize) -> &'a [f32] {
        let start = self.offset + i * self.stride;
        &data[start..start + self.width]
    }
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// The f32 storage of a CPU tensor and its layout.
fn with_storage<R>(t: &Tensor, f: impl FnOnce(&[f32], &Layout) -> Result<R>) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(cpu) => f(cpu.as_slice::<f32>()?, layout),
        _ => Err(Error::Msg(format!("{NAME}: a tensor is not on the CPU"))),
    }
}

struct SiluGatedSumOp;

impl CustomOp3 for SiluGatedSumOp {
    fn name(&self) -> &'static str {
        NAME
    }

    fn cpu_fwd(
        &self,
        a_storage: &CpuStorage,
        a_layout: &Layout,
        b_storage: &CpuStorage,
        b_layout: &Layout,
        z_storage: &CpuStorage,
        z_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let a = slice_of(a_storage.as_slice::<f32>()?, a_layout)?;
        let b = slice_of(b_storage.as_slice::<f32>()?, b_layout)?;
        let z_rows = Rows::from_layout("z", z_layout)?;
        let z = z_storage.as_slice::<f32>()?;
        let width = z_rows.width;
        if z_rows.count * width != a.len() || b.len() != a.len() {
            return Err(Error::Msg(format!(
                "{NAME}: a, b and z hold {}, {} and {} values, expected one size",
                a.len(),
                b.len(),
                z_rows.count * width
            )));
        }
        let mut y = vec![0f32; a.len()];
        y.par_chunks_mut(ROWS_PER_TASK * width)
            .enumerate()
            .for_each(|(task, y)| {
                for (r, y_row) in y.chunks_exact_mut(width).enumerate() {
                    let row = task * ROWS_PER_TASK + r;
                    let span = row * width..(row + 1) * width;
                    for (((y, a), b), z) in y_row
                        .iter_mut()
                        .zip(&a[span.clone()])
                        .zip(&b[span])
                        .zip(z_rows.row(z, row))
                    {
                        *y = (a + b) * z * sigmoid(*z);
                    }
                }
            });
        Ok((CpuStorage::F32(y), a_layout.shape().clone()))
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        z: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (a, b, grad) = (a.contiguous()?, b.contiguous()?, grad_res.contiguous()?);
        let len = a.elem_count();
        let mut grad_sum = vec![0f32; len];
        let mut grad_z = vec![0f32; len];
        with_storage(&a, |a_data, a_layout| {
            with_storage(&b, |b_data, b_layout| {
                with_storage(&grad, |g_data, g_layout| {
                    with_storage(z, |z_data, z_layout| {
                        let a = slice_of(a_data, a_layout)?;
                        let b = slice_of(b_data, b_layout)?;
                        let g = slice_of(g_data, g_layout)?;
                        let z_rows = Rows::from_layout("z", z_layout)?;
                        let width = z_rows.width;
                        grad_sum
                            .par_chunks_mut(ROWS_PER_TASK * width)
                            .zip(grad_z.par_chunks_mut(ROWS_PER_TASK * width))
                            .enumerate()
                            .for_each(|(task, (grad_sum, grad_z))| {
                                for (r, (gs_row, gz_row)) in grad_sum
                                    .chunks_exact_mut(width)
                                    .zip(grad_z.chunks_exact_mut(width))
                                    .enumerate()
                                {
                                    let row = task * ROWS_PER_TASK + r;
                                    let span = row * width..(row + 1) * width;
                                    let z_row = z_rows.row(z_data, row);
                                    for j in 0..width {
                                        let (zj, gj) = (z_row[j], g[span.start + j]);
                                        let sig = sigmoid(zj);
                                        let sum = a[span.start + j] + b[span.start + j];
                                        gs_row[j] = gj * zj * sig;
                                        gz_row[j] = gj * sum * sig * (1.0 + zj * (1.0 - sig));
                                    }
                                }
                            });
                        Ok(())
                    })
                })
            })
        })?;
        let grad_sum = Tensor::from_vec(grad_sum, a.shape(), &Device::Cpu)?;
        Ok((
            Some(grad_sum.clone()),
            Some(grad_sum),
            Some(Tensor::from_vec(grad_z, z.shape(), &Device::Cpu)?),
        ))
    }
}

fn slice_of<'a>(data: &'a [f32], layout: &Layout) -> Result<&'a [f32]> {
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| Error::Msg(format!("{NAME}: expected a contiguous tensor")))?;
    Ok(&data[start..end])
}

/// Fused output gate; see [`super::silu_gated_sum`].
pub fn silu_gated_sum(a: &Tensor, b: &Tensor, z: &Tensor) -> Result<Tensor> {
    // z is read through its strides unless they do not form rows.
    let z = match Rows::from_layout("z", z.layout()) {
        Ok(_) => z.clone(),
        Err(_) => z.contiguous()?,
    };
    a.contiguous()?
        .apply_op3(&b.contiguous()?, &z, SiluGatedSumOp)
}
