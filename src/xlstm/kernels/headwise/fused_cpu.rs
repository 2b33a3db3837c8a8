//! Fused CPU head-wise linear map: a candle custom op on (x, weight) with a hand-written
//! backward pass, parallel over fixed runs of rows.
//!
//! Every block is a small matrix-vector product per row, written as `d_in` multiply-adds of
//! weight columns (forward) or `d_out` of weight rows (backward) so that the inner loop runs
//! along contiguous memory and vectorises. The weight gradient is summed per run of rows and
//! the runs' sums are added in a fixed order, so gradients do not depend on thread timing.

use candle_core::{CpuStorage, CustomOp2, Device, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::super::cpu_data::{contiguous_data, sum_in_task_order, with_contiguous};
use super::super::vmath;

const NAME: &str = "headwise-linear";

/// Rows per parallel task (and per partial sum of the weight gradient).
const ROWS_PER_TASK: usize = 256;

/// Block sizes of one call.
#[derive(Debug, Clone, Copy)]
struct Blocks {
    count: usize,
    d_out: usize,
    d_in: usize,
}

impl Blocks {
    fn width_in(&self) -> usize {
        self.count * self.d_in
    }

    fn width_out(&self) -> usize {
        self.count * self.d_out
    }

    fn weight_len(&self) -> usize {
        self.count * self.d_out * self.d_in
    }
}

/// `y_blk += Σ_i x_blk[i] · columns[i]` over the blocks of one row, where `columns` holds, per
/// block, `d_in` rows of `d_out` values (the block's weight transposed).
#[inline(always)]
fn multiply_row(b: Blocks, columns: &[f32], x: &[f32], y: &mut [f32]) {
    // The blocks of the xLSTM blocks (4×4 in the mLSTM, 16×16 in the sLSTM) get loops of
    // compile-time length, which the compiler unrolls into a few vector multiply-adds.
    match (b.d_out, b.d_in) {
        (4, 4) => multiply_row_fixed::<4, 4>(columns, x, y),
        (8, 8) => multiply_row_fixed::<8, 8>(columns, x, y),
        (16, 16) => multiply_row_fixed::<16, 16>(columns, x, y),
        (32, 32) => multiply_row_fixed::<32, 32>(columns, x, y),
        _ => multiply_row_any(b, columns, x, y),
    }
}

#[inline(always)]
fn multiply_row_fixed<const D_OUT: usize, const D_IN: usize>(
    columns: &[f32],
    x: &[f32],
    y: &mut [f32],
) {
    for ((y_blk, x_blk), cols) in y
        .chunks_exact_mut(D_OUT)
        .zip(x.chunks_exact(D_IN))
        .zip(columns.chunks_exact(D_IN * D_OUT))
    {
        let y_blk: &mut [f32; D_OUT] = y_blk.try_into().expect("chunks of D_OUT");
        let x_blk: &[f32; D_IN] = x_blk.try_into().expect("chunks of D_IN");
        let mut acc = *y_blk;
        for (xi, col) in x_blk.iter().zip(cols.chunks_exact(D_OUT)) {
            let col: &[f32; D_OUT] = col.try_into().expect("chunks of D_OUT");
            for o in 0..D_OUT {
                acc[o] += xi * col[o];
            }
        }
        *y_blk = acc;
    }
}

/// Rows whose outer products are added to the weight gradient in one pass over it: it is then
/// loaded and stored once per group instead of once per row.
const OUTER_ROWS: usize = 4;

/// `grad_w[blk, o, :] += Σ_r dy_r,blk[o] · x_r,blk` over the blocks of a group of rows (`x` and
/// `grad_y` hold the same number of rows, one after another), adding the rows in order.
#[inline(always)]
fn accumulate_outer(b: Blocks, grad_w: &mut [f32], x: &[f32], grad_y: &[f32]) {
    match (b.d_out, b.d_in) {
        (4, 4) => accumulate_outer_fixed::<4, 4>(b, grad_w, x, grad_y),
        (8, 8) => accumulate_outer_fixed::<8, 8>(b, grad_w, x, grad_y),
        (16, 16) => accumulate_outer_fixed::<16, 16>(b, grad_w, x, grad_y),
        (32, 32) => accumulate_outer_fixed::<32, 32>(b, grad_w, x, grad_y),
        _ => {
            for (x_row, g_row) in x
                .chunks_exact(b.width_in())
                .zip(grad_y.chunks_exact(b.width_out()))
            {
                for ((gw_blk, x_blk), g_blk) in grad_w
                    .chunks_exact_mut(b.d_out * b.d_in)
                    .zip(x_row.chunks_exact(b.d_in))
                    .zip(g_row.chunks_exact(b.d_out))
                {
                    for (gw_row, g) in gw_blk.chunks_exact_mut(b.d_in).zip(g_blk) {
                        for (gw, xi) in gw_row.iter_mut().zip(x_blk) {
                            *gw += g * xi;
                        }
                    }
                }
            }
        }
    }
}

#[inline(always)]
fn accumulate_outer_fixed<const D_OUT: usize, const D_IN: usize>(
    b: Blocks,
    grad_w: &mut [f32],
    x: &[f32],
    grad_y: &[f32],
) {
    let (width_in, width_out) = (b.width_in(), b.width_out());
    let rows = x.len() / width_in;
    for (blk, gw_blk) in grad_w.chunks_exact_mut(D_OUT * D_IN).enumerate() {
        for (o, gw_row) in gw_blk.chunks_exact_mut(D_IN).enumerate() {
            let gw_row: &mut [f32; D_IN] = gw_row.try_into().expect("chunks of D_IN");
            let mut acc = *gw_row;
            for r in 0..rows {
                let g = grad_y[r * width_out + blk * D_OUT + o];
                let start = r * width_in + blk * D_IN;
                let x_blk: &[f32; D_IN] = x[start..start + D_IN].try_into().expect("D_IN values");
                for i in 0..D_IN {
                    acc[i] += g * x_blk[i];
                }
            }
            *gw_row = acc;
        }
    }
}

fn multiply_row_any(b: Blocks, columns: &[f32], x: &[f32], y: &mut [f32]) {
    for ((y_blk, x_blk), cols) in y
        .chunks_exact_mut(b.d_out)
        .zip(x.chunks_exact(b.d_in))
        .zip(columns.chunks_exact(b.d_in * b.d_out))
    {
        for (xi, col) in x_blk.iter().zip(cols.chunks_exact(b.d_out)) {
            for (y, w) in y_blk.iter_mut().zip(col) {
                *y += xi * w;
            }
        }
    }
}

/// `[NB, r, c]` → `[NB, c, r]`.
fn transpose_blocks(weight: &[f32], blocks: usize, r: usize, c: usize) -> Vec<f32> {
    let mut out = vec![0f32; weight.len()];
    for (src, dst) in weight
        .chunks_exact(r * c)
        .zip(out.chunks_exact_mut(r * c))
        .take(blocks)
    {
        for i in 0..r {
            for j in 0..c {
                dst[j * r + i] = src[i * c + j];
            }
        }
    }
    out
}

struct HeadwiseOp {
    blocks: Blocks,
}

impl CustomOp2 for HeadwiseOp {
    fn name(&self) -> &'static str {
        NAME
    }

    fn cpu_fwd(
        &self,
        x_storage: &CpuStorage,
        x_layout: &Layout,
        w_storage: &CpuStorage,
        w_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let b = self.blocks;
        let x = contiguous_data(NAME, "x", x_storage, x_layout)?;
        let weight = contiguous_data(NAME, "weight", w_storage, w_layout)?;
        let columns = transpose_blocks(weight, b.count, b.d_out, b.d_in);
        let rows = x.len() / b.width_in();
        let mut y = vec![0f32; rows * b.width_out()];
        y.par_chunks_mut(ROWS_PER_TASK * b.width_out())
            .zip(x.par_chunks(ROWS_PER_TASK * b.width_in()))
            .for_each(|(y, x)| {
                vmath::with_wide_vectors(
                    #[inline(always)]
                    || {
                        for (y_row, x_row) in y
                            .chunks_exact_mut(b.width_out())
                            .zip(x.chunks_exact(b.width_in()))
                        {
                            multiply_row(b, &columns, x_row, y_row);
                        }
                    },
                )
            });
        let mut dims = x_layout.dims().to_vec();
        *dims.last_mut().expect("x has a last dim") = b.width_out();
        Ok((CpuStorage::F32(y), Shape::from(dims)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let b = self.blocks;
        let (grad_x, grad_w) = with_contiguous(NAME, "x", x, |x| {
            with_contiguous(NAME, "weight", weight, |weight| {
                with_contiguous(NAME, "output gradient", grad_res, |grad| {
                    let rows = x.len() / b.width_in();
                    let mut grad_x = vec![0f32; rows * b.width_in()];
                    // Per run of rows: dx = Wᵀ dy row by row (the weight's rows are the
                    // columns of its transpose) and that run's Σ dy ⊗ x.
                    let partial_w: Vec<Vec<f32>> = grad_x
                        .par_chunks_mut(ROWS_PER_TASK * b.width_in())
                        .zip(x.par_chunks(ROWS_PER_TASK * b.width_in()))
                        .zip(grad.par_chunks(ROWS_PER_TASK * b.width_out()))
                        .map(|((grad_x, x), grad)| {
                            vmath::with_wide_vectors(
                                #[inline(always)]
                                || {
                                    let transposed = Blocks {
                                        count: b.count,
                                        d_out: b.d_in,
                                        d_in: b.d_out,
                                    };
                                    let mut grad_w = vec![0f32; b.weight_len()];
                                    for ((gx_rows, x_rows), g_rows) in grad_x
                                        .chunks_mut(OUTER_ROWS * b.width_in())
                                        .zip(x.chunks(OUTER_ROWS * b.width_in()))
                                        .zip(grad.chunks(OUTER_ROWS * b.width_out()))
                                    {
                                        for (gx_row, g_row) in gx_rows
                                            .chunks_exact_mut(b.width_in())
                                            .zip(g_rows.chunks_exact(b.width_out()))
                                        {
                                            multiply_row(transposed, weight, g_row, gx_row);
                                        }
                                        accumulate_outer(b, &mut grad_w, x_rows, g_rows);
                                    }
                                    grad_w
                                },
                            )
                        })
                        .collect();
                    Ok((grad_x, sum_in_task_order(partial_w, b.weight_len())))
                })
            })
        })?;
        Ok((
            Some(Tensor::from_vec(grad_x, x.shape(), &Device::Cpu)?),
            Some(Tensor::from_vec(grad_w, weight.shape(), &Device::Cpu)?),
        ))
    }
}

/// Fused head-wise linear map; see [`super::headwise_linear`].
pub fn headwise_linear(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    let (count, d_out, d_in) = super::check(NAME, x, weight)?;
    x.contiguous()?.apply_op2(
        &weight.contiguous()?,
        HeadwiseOp {
            blocks: Blocks { count, d_out, d_in },
        },
    )
}
