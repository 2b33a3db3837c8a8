//! Fused CPU head-wise linear maps: a candle custom op on (first input, second input, stacked
//! weights) with a hand-written backward pass, parallel over fixed runs of rows. It computes
//! one or several maps of the same block sizes, their outputs side by side, each map reading
//! one of the two inputs; a single map is the op with one input given twice.
//!
//! Every block is a small matrix-vector product per row, written as `d_in` multiply-adds of
//! weight columns (forward) or `d_out` of weight rows (backward) so that the inner loop runs
//! along contiguous memory and vectorises. The weight gradient is summed per run of rows and
//! the runs' sums are added in a fixed order, so gradients do not depend on thread timing.

use candle_core::{CpuStorage, CustomOp3, Device, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::super::cpu_data::{contiguous_data, output_buffer, sum_in_task_order, with_contiguous};
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

/// Rows the forward pass multiplies together. One row at a time, every multiply-add loaded a
/// column of the block as well as broadcasting an input, and the loads bounded the op; a
/// column loaded once serves all the rows of a group.
const ROW_GROUP: usize = 4;

/// `y_blk = Σ_i x_blk[i] · columns[i]` over the blocks of one row, added to what `y` holds when
/// `ACCUMULATE` (else `y` is only written), where `columns` holds, per block, `d_in` rows of
/// `d_out` values (the block's weight transposed).
#[inline(always)]
fn multiply_row<const ACCUMULATE: bool>(b: Blocks, columns: &[f32], x: &[f32], y: &mut [f32]) {
    multiply_rows::<1, ACCUMULATE>(b, columns, (x, 0), (y, 0));
}

/// [`multiply_row`] for `R` rows, row `r` of x starting at `r · x_stride` and of y at
/// `r · y_stride` (`(slice, stride)` pairs). Each row's sums are added in the same order as
/// one row alone.
#[inline(always)]
fn multiply_rows<const R: usize, const ACCUMULATE: bool>(
    b: Blocks,
    columns: &[f32],
    x: (&[f32], usize),
    y: (&mut [f32], usize),
) {
    // The blocks of the xLSTM blocks (4×4 in the mLSTM, 16×16 in the sLSTM) get loops of
    // compile-time length, which the compiler unrolls into a few vector multiply-adds.
    match (b.d_out, b.d_in) {
        (4, 4) => multiply_rows_fixed::<4, 4, R, ACCUMULATE>(b.count, columns, x, y),
        (8, 8) => multiply_rows_fixed::<8, 8, R, ACCUMULATE>(b.count, columns, x, y),
        (16, 16) => multiply_rows_fixed::<16, 16, R, ACCUMULATE>(b.count, columns, x, y),
        (32, 32) => multiply_rows_fixed::<32, 32, R, ACCUMULATE>(b.count, columns, x, y),
        _ => {
            let ((x, x_stride), (y, y_stride)) = (x, y);
            for r in 0..R {
                multiply_row_any::<ACCUMULATE>(
                    b,
                    columns,
                    &x[r * x_stride..][..b.width_in()],
                    &mut y[r * y_stride..][..b.width_out()],
                );
            }
        }
    }
}

#[inline(always)]
fn multiply_rows_fixed<
    const D_OUT: usize,
    const D_IN: usize,
    const R: usize,
    const ACCUMULATE: bool,
>(
    count: usize,
    columns: &[f32],
    (x, x_stride): (&[f32], usize),
    (y, y_stride): (&mut [f32], usize),
) {
    let (columns, _) = columns.as_chunks::<D_OUT>();
    for blk in 0..count {
        let cols: &[[f32; D_OUT]; D_IN] = columns[blk * D_IN..(blk + 1) * D_IN]
            .try_into()
            .expect("D_IN columns of D_OUT");
        let x_blks: [&[f32; D_IN]; R] = std::array::from_fn(|r| {
            x[r * x_stride + blk * D_IN..][..D_IN]
                .try_into()
                .expect("block of D_IN")
        });
        let mut acc: [[f32; D_OUT]; R] = std::array::from_fn(|r| {
            if ACCUMULATE {
                y[r * y_stride + blk * D_OUT..][..D_OUT]
                    .try_into()
                    .expect("block of D_OUT")
            } else {
                [0.0; D_OUT]
            }
        });
        for (i, col) in cols.iter().enumerate() {
            for (acc, x_blk) in acc.iter_mut().zip(&x_blks) {
                for o in 0..D_OUT {
                    acc[o] += x_blk[i] * col[o];
                }
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            y[r * y_stride + blk * D_OUT..][..D_OUT].copy_from_slice(acc);
        }
    }
}

/// Rows whose outer products are added to the weight gradient in one pass over it: it is then
/// loaded and stored once per group instead of once per row.
const OUTER_ROWS: usize = 4;

/// `grad_w[blk, o, :] += Σ_r dy_r,blk[o] · x_r,blk` over the blocks of a group of rows, adding
/// the rows in order. `x` holds the rows one after another; row `r` of `grad_y` starts at
/// `r · grad_stride` (the map's part of a wider gradient row).
#[inline(always)]
fn accumulate_outer(b: Blocks, grad_w: &mut [f32], x: &[f32], grad_y: &[f32], grad_stride: usize) {
    match (b.d_out, b.d_in) {
        (4, 4) => accumulate_outer_fixed::<4, 4>(b, grad_w, x, grad_y, grad_stride),
        (8, 8) => accumulate_outer_fixed::<8, 8>(b, grad_w, x, grad_y, grad_stride),
        (16, 16) => accumulate_outer_fixed::<16, 16>(b, grad_w, x, grad_y, grad_stride),
        (32, 32) => accumulate_outer_fixed::<32, 32>(b, grad_w, x, grad_y, grad_stride),
        _ => {
            for (r, x_row) in x.chunks_exact(b.width_in()).enumerate() {
                let g_row = &grad_y[r * grad_stride..r * grad_stride + b.width_out()];
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
    grad_stride: usize,
) {
    let width_in = b.width_in();
    let rows = x.len() / width_in;
    for (blk, gw_blk) in grad_w.chunks_exact_mut(D_OUT * D_IN).enumerate() {
        for (o, gw_row) in gw_blk.chunks_exact_mut(D_IN).enumerate() {
            let gw_row: &mut [f32; D_IN] = gw_row.try_into().expect("chunks of D_IN");
            let mut acc = *gw_row;
            for r in 0..rows {
                let g = grad_y[r * grad_stride + blk * D_OUT + o];
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

fn multiply_row_any<const ACCUMULATE: bool>(b: Blocks, columns: &[f32], x: &[f32], y: &mut [f32]) {
    if !ACCUMULATE {
        y.fill(0.0);
    }
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

/// Several head-wise maps of the same block sizes, their outputs side by side: map `m` reads
/// the first input for `m < maps_on_first` and the second one after.
struct HeadwiseOp {
    blocks: Blocks,
    maps: usize,
    maps_on_first: usize,
}

impl HeadwiseOp {
    fn width_out(&self) -> usize {
        self.maps * self.blocks.width_out()
    }

    /// Every map's outputs for `R` consecutive rows of y (`[R, width_out]`), whose inputs start
    /// at `span` in `first` and `second`.
    #[inline(always)]
    fn multiply_maps<const R: usize>(
        &self,
        columns: &[f32],
        [first, second]: [&[f32]; 2],
        span: usize,
        y: &mut [f32],
    ) {
        let b = self.blocks;
        let (width_in, width_out) = (b.width_in(), self.width_out());
        for (m, map_columns) in columns.chunks_exact(b.weight_len()).enumerate() {
            let x = if m < self.maps_on_first {
                first
            } else {
                second
            };
            multiply_rows::<R, false>(
                b,
                map_columns,
                (&x[span..], width_in),
                (&mut y[m * b.width_out()..], width_out),
            );
        }
    }
}

impl CustomOp3 for HeadwiseOp {
    fn name(&self) -> &'static str {
        NAME
    }

    fn cpu_fwd(
        &self,
        first_storage: &CpuStorage,
        first_layout: &Layout,
        second_storage: &CpuStorage,
        second_layout: &Layout,
        w_storage: &CpuStorage,
        w_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let b = self.blocks;
        let first = contiguous_data(NAME, "x", first_storage, first_layout)?;
        let second = contiguous_data(NAME, "second x", second_storage, second_layout)?;
        let weight = contiguous_data(NAME, "weight", w_storage, w_layout)?;
        let columns = transpose_blocks(weight, self.maps * b.count, b.d_out, b.d_in);
        let (width_in, width_out) = (b.width_in(), self.width_out());
        let rows = first.len() / width_in;
        let mut y = output_buffer(rows * width_out);
        y.par_chunks_mut(ROWS_PER_TASK * width_out)
            .enumerate()
            .for_each(|(task, y)| {
                vmath::with_wide_vectors(
                    #[inline(always)]
                    || {
                        let task_rows = y.len() / width_out;
                        let grouped = task_rows - task_rows % ROW_GROUP;
                        let (y_groups, y_rest) = y.split_at_mut(grouped * width_out);
                        let span = |row: usize| (task * ROWS_PER_TASK + row) * width_in;
                        let inputs = [first, second];
                        for (g, y) in y_groups.chunks_exact_mut(ROW_GROUP * width_out).enumerate() {
                            let span = span(g * ROW_GROUP);
                            self.multiply_maps::<ROW_GROUP>(&columns, inputs, span, y);
                        }
                        for (r, y) in y_rest.chunks_exact_mut(width_out).enumerate() {
                            self.multiply_maps::<1>(&columns, inputs, span(grouped + r), y);
                        }
                    },
                )
            });
        let mut dims = first_layout.dims().to_vec();
        *dims.last_mut().expect("x has a last dim") = width_out;
        Ok((CpuStorage::F32(y), Shape::from(dims)))
    }

    fn bwd(
        &self,
        first: &Tensor,
        second: &Tensor,
        weight: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let b = self.blocks;
        let (width_in, width_out) = (b.width_in(), self.width_out());
        let reads_second = self.maps_on_first < self.maps;
        let transposed = Blocks {
            count: b.count,
            d_out: b.d_in,
            d_in: b.d_out,
        };
        let gradients = |first: &[f32], second: &[f32]| {
            with_contiguous(NAME, "weight", weight, |weight| {
                with_contiguous(NAME, "output gradient", grad_res, |grad| {
                    let rows = first.len() / width_in;
                    // Per run of rows: dx = Σ_maps Wᵀ dy, a group of rows at a time (the
                    // weight's rows are the columns of its transpose), and that run's Σ dy ⊗ x
                    // per map.
                    let run = |task: usize,
                               grad_first: &mut [f32],
                               mut grad_second: Option<&mut [f32]>| {
                        vmath::with_wide_vectors(
                            #[inline(always)]
                            || {
                                let mut grad_w = vec![0f32; self.maps * b.weight_len()];
                                let task_start = task * ROWS_PER_TASK;
                                let task_rows = grad_first.len() / width_in;
                                for group in (0..task_rows).step_by(OUTER_ROWS) {
                                    let group_rows = OUTER_ROWS.min(task_rows - group);
                                    let g_rows = &grad[(task_start + group) * width_out..];
                                    for (m, map_weight) in
                                        weight.chunks_exact(b.weight_len()).enumerate()
                                    {
                                        let gx = match grad_second.as_deref_mut() {
                                            Some(gx) if m >= self.maps_on_first => gx,
                                            _ => &mut *grad_first,
                                        };
                                        let g = &g_rows[m * b.width_out()..];
                                        let gx = &mut gx[group * width_in..];
                                        if group_rows == OUTER_ROWS {
                                            multiply_rows::<OUTER_ROWS, true>(
                                                transposed,
                                                map_weight,
                                                (g, width_out),
                                                (gx, width_in),
                                            );
                                            continue;
                                        }
                                        for r in 0..group_rows {
                                            multiply_row::<true>(
                                                transposed,
                                                map_weight,
                                                &g[r * width_out..][..b.width_out()],
                                                &mut gx[r * width_in..][..width_in],
                                            );
                                        }
                                    }
                                    let x_span = (task_start + group) * width_in
                                        ..(task_start + group + group_rows) * width_in;
                                    for (m, gw_map) in
                                        grad_w.chunks_exact_mut(b.weight_len()).enumerate()
                                    {
                                        let x = if m < self.maps_on_first {
                                            first
                                        } else {
                                            second
                                        };
                                        accumulate_outer(
                                            b,
                                            gw_map,
                                            &x[x_span.clone()],
                                            &grad[(task_start + group) * width_out
                                                + m * b.width_out()..],
                                            width_out,
                                        );
                                    }
                                }
                                grad_w
                            },
                        )
                    };
                    let task_len = ROWS_PER_TASK * width_in;
                    let mut grad_first = vec![0f32; rows * width_in];
                    let mut grad_second =
                        vec![0f32; if reads_second { rows * width_in } else { 0 }];
                    let partial_w: Vec<Vec<f32>> = if reads_second {
                        grad_first
                            .par_chunks_mut(task_len)
                            .zip(grad_second.par_chunks_mut(task_len))
                            .enumerate()
                            .map(|(task, (gf, gs))| run(task, gf, Some(gs)))
                            .collect()
                    } else {
                        grad_first
                            .par_chunks_mut(task_len)
                            .enumerate()
                            .map(|(task, gf)| run(task, gf, None))
                            .collect()
                    };
                    let grad_w = sum_in_task_order(partial_w, self.maps * b.weight_len());
                    Ok((grad_first, grad_second, grad_w))
                })
            })
        };
        // A single input arrives as both arguments; its storage is locked once.
        let (grad_first, grad_second, grad_w) = with_contiguous(NAME, "x", first, |first| {
            if reads_second {
                with_contiguous(NAME, "second x", second, |second| gradients(first, second))
            } else {
                gradients(first, first)
            }
        })?;
        let grad_second = if reads_second {
            Some(Tensor::from_vec(grad_second, second.shape(), &Device::Cpu)?)
        } else {
            None
        };
        Ok((
            Some(Tensor::from_vec(grad_first, first.shape(), &Device::Cpu)?),
            grad_second,
            Some(Tensor::from_vec(grad_w, weight.shape(), &Device::Cpu)?),
        ))
    }
}

/// Fused head-wise linear map; see [`super::headwise_linear`].
pub fn headwise_linear(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    headwise_linear_side_by_side([x, x], &[weight], 1)
}

/// Fused head-wise maps with their outputs side by side; see
/// [`super::headwise_linear_side_by_side`].
pub fn headwise_linear_side_by_side(
    inputs: [&Tensor; 2],
    weights: &[&Tensor],
    maps_on_first: usize,
) -> Result<Tensor> {
    let (count, d_out, d_in) = super::check_side_by_side(NAME, inputs, weights, maps_on_first)?;
    let weight = match weights {
        [single] => single.unsqueeze(0)?,
        many => Tensor::stack(many, 0)?,
    };
    let maps = weights.len();
    // An input that no map reads is not an argument: candle's backward pass expects a
    // gradient for every argument it reaches. With one input read, it is both arguments.
    let (first, maps_on_first) = match maps_on_first {
        0 => (inputs[1].contiguous()?, maps),
        _ => (inputs[0].contiguous()?, maps_on_first),
    };
    let second = if maps_on_first == maps {
        first.clone()
    } else {
        inputs[1].contiguous()?
    };
    first.apply_op3(
        &second,
        &weight.contiguous()?,
        HeadwiseOp {
            blocks: Blocks { count, d_out, d_in },
            maps,
            maps_on_first,
        },
    )
}
