//! Fused CPU normalisations: candle custom ops with hand-written backward passes, parallel
//! over rows with rayon. Each row of E values is normalised on its own:
//!
//! ```text
//! x̂ = (x − μ)·r,  r = 1/sqrt(var + eps);   y = x̂ ⊙ γ (+ β)
//! dγ += dy ⊙ x̂;   dβ += dy;   g = dy ⊙ γ;   dx = r·(g − mean(g) − x̂·mean(g ⊙ x̂))
//! ```
//!
//! The backward pass recomputes μ and r from x (one extra pass over a row already in cache)
//! instead of storing them. Weight gradients are summed per rayon task, then across tasks.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Device, Error, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::super::cpu_data::{
    contiguous_data, cpu_storage, f32_data, output_buffer, sum_in_task_order, with_contiguous,
};
use super::super::vmath;

/// Elements one rayon task covers at least: tiny tasks cost more to schedule than to run.
const TASK_ELEMS: usize = 16 * 1024;

fn rows_per_task(row_len: usize) -> usize {
    TASK_ELEMS.div_ceil(row_len.max(1)).max(1)
}

/// Mean and inverse standard deviation (biased variance) of one row.
#[inline(always)]
fn row_stats(x: &[f32], eps: f32) -> (f32, f32) {
    let inv_len = 1.0 / x.len() as f32;
    let mean = lane_sum([x], |[v]| v) * inv_len;
    let var = lane_sum([x], |[v]| (v - mean) * (v - mean)) * inv_len;
    (mean, 1.0 / (var + eps).sqrt())
}

/// Partial sums kept per lane of [`LANES`] consecutive terms: one AVX-512 vector, two AVX2
/// ones. The lanes are the same whatever the CPU, so every copy of a loop sums in one order.
const LANES: usize = 16;

/// `Σ_j term(a[j], b[j], ..)` over inputs of one length, in [`LANES`] interleaved partial sums
/// added pairwise at the end. One running sum is a chain of dependent additions that the
/// compiler may not reorder (strict floating point): at 64 values a row it was most of a
/// normalisation's time. The terms are taken a whole chunk of lanes at a time from arrays, so
/// that no index needs a bounds check: with one per term (an index into each input) the
/// compiler kept the loop scalar.
#[inline(always)]
fn lane_sum<const N: usize>(inputs: [&[f32]; N], term: impl Fn([f32; N]) -> f32) -> f32 {
    let len = inputs.first().map_or(0, |x| x.len());
    let whole = len - len % LANES;
    let mut lanes = [0f32; LANES];
    for base in (0..whole).step_by(LANES) {
        let chunks: [&[f32; LANES]; N] = inputs.map(|x| {
            x[base..base + LANES]
                .try_into()
                .expect("chunk of LANES values")
        });
        for (lane, partial) in lanes.iter_mut().enumerate() {
            *partial += term(chunks.map(|chunk| chunk[lane]));
        }
    }
    let mut width = LANES / 2;
    while width > 0 {
        let (low, high) = lanes.split_at_mut(width);
        for (l, h) in low.iter_mut().zip(&high[..width]) {
            *l += h;
        }
        width /= 2;
    }
    (whole..len).fold(lanes[0], |sum, j| sum + term(inputs.map(|x| x[j])))
}

#[inline(always)]
fn normalise_row(x: &[f32], scale: &[f32], bias: Option<&[f32]>, eps: f32, out: &mut [f32]) {
    let (mean, rstd) = row_stats(x, eps);
    for ((o, v), g) in out.iter_mut().zip(x).zip(scale) {
        *o = (v - mean) * rstd * g;
    }
    if let Some(bias) = bias {
        for (o, b) in out.iter_mut().zip(bias) {
            *o += b;
        }
    }
}

/// Writes dx of one row and adds its share of dγ (and dβ).
#[inline(always)]
fn normalise_row_backward(
    x: &[f32],
    scale: &[f32],
    grad_y: &[f32],
    eps: f32,
    grad_x: &mut [f32],
    grad_scale: &mut [f32],
    grad_bias: Option<&mut [f32]>,
) {
    let (mean, rstd) = row_stats(x, eps);
    let inv_len = 1.0 / x.len() as f32;
    let len = x.len();
    let (scale, grad_y) = (&scale[..len], &grad_y[..len]);
    for ((v, dy), ds) in x.iter().zip(grad_y).zip(grad_scale.iter_mut()) {
        *ds += dy * ((v - mean) * rstd);
    }
    let sum_g = lane_sum([grad_y, scale], |[dy, g]| dy * g);
    let sum_g_xhat = lane_sum([grad_y, scale, x], |[dy, g, v]| {
        dy * g * ((v - mean) * rstd)
    });
    if let Some(grad_bias) = grad_bias {
        for (db, dy) in grad_bias.iter_mut().zip(grad_y) {
            *db += dy;
        }
    }
    let (mean_g, mean_g_xhat) = (sum_g * inv_len, sum_g_xhat * inv_len);
    for (((dx, v), g), dy) in grad_x.iter_mut().zip(x).zip(scale).zip(grad_y) {
        let xhat = (v - mean) * rstd;
        *dx = rstd * (dy * g - mean_g - xhat * mean_g_xhat);
    }
}

/// LayerNorm over the last dim on (x, scale) or (x, scale, bias); x contiguous.
struct LayerNormOp {
    eps: f32,
}

impl LayerNormOp {
    const NAME: &'static str = "layer-norm";

    fn forward(
        &self,
        x: &[f32],
        scale: &[f32],
        bias: Option<&[f32]>,
        shape: &Shape,
    ) -> (CpuStorage, Shape) {
        let features = scale.len();
        let mut out = output_buffer(x.len());
        let task = rows_per_task(features) * features;
        out.par_chunks_mut(task)
            .zip(x.par_chunks(task))
            .for_each(|(out, x)| {
                let (mut out_rows, mut x_rows) =
                    (out.chunks_exact_mut(features), x.chunks_exact(features));
                #[cfg(target_arch = "x86_64")]
                if eight_rows::fits(features) {
                    const ROWS: usize = eight_rows::ROWS;
                    while out_rows.len() >= ROWS {
                        let outs: [&mut [f32]; ROWS] = std::array::from_fn(|_| {
                            out_rows.next().expect("at least eight rows left")
                        });
                        let rows: [&[f32]; ROWS] =
                            std::array::from_fn(|_| x_rows.next().expect("as many rows"));
                        // SAFETY: fits() checked AVX2, FMA and the row length; every slice
                        // is one row of `features` values.
                        unsafe { eight_rows::normalise(rows, scale, bias, self.eps, outs) };
                    }
                }
                vmath::with_wide_vectors(
                    #[inline(always)]
                    || {
                        for (out_row, x_row) in out_rows.zip(x_rows) {
                            normalise_row(x_row, scale, bias, self.eps, out_row);
                        }
                    },
                )
            });
        (CpuStorage::F32(out), shape.clone())
    }

    /// (dx, dscale, dbias) for (x, scale) and the output gradient.
    fn backward(
        &self,
        x: &Tensor,
        scale: &Tensor,
        grad_y: &Tensor,
        with_bias: bool,
    ) -> Result<(Tensor, Tensor, Option<Tensor>)> {
        let op = Self::NAME;
        let features = scale.elem_count();
        let task = rows_per_task(features) * features;
        let mut grad_x = vec![0f32; x.elem_count()];
        let partial_len = if with_bias { 2 * features } else { features };
        let partials = with_contiguous(op, "x", x, |x| {
            with_contiguous(op, "scale", scale, |scale| {
                with_contiguous(op, "output gradient", grad_y, |grad_y| {
                    let partials: Vec<Vec<f32>> = grad_x
                        .par_chunks_mut(task)
                        .zip(x.par_chunks(task))
                        .zip(grad_y.par_chunks(task))
                        .map(|((grad_x, x), grad_y)| {
                            vmath::with_wide_vectors(
                                #[inline(always)]
                                || {
                                    let mut partial = vec![0f32; partial_len];
                                    let (grad_scale, grad_bias) = partial.split_at_mut(features);
                                    let rows = grad_x
                                        .chunks_exact_mut(features)
                                        .zip(x.chunks_exact(features))
                                        .zip(grad_y.chunks_exact(features));
                                    for ((grad_x, x), grad_y) in rows {
                                        normalise_row_backward(
                                            x,
                                            scale,
                                            grad_y,
                                            self.eps,
                                            grad_x,
                                            grad_scale,
                                            with_bias.then_some(&mut *grad_bias),
                                        );
                                    }
                                    partial
                                },
                            )
                        })
                        // Partials per fixed chunk, summed in chunk order: the weight
                        // gradients do not depend on how rayon split the work.
                        .collect::<Vec<_>>();
                    Ok(sum_in_task_order(partials, partial_len))
                })
            })
        })?;
        let grad_x = Tensor::from_vec(grad_x, x.shape(), &Device::Cpu)?;
        let grad_scale = Tensor::from_slice(&partials[..features], features, &Device::Cpu)?;
        let grad_bias = with_bias
            .then(|| Tensor::from_slice(&partials[features..], features, &Device::Cpu))
            .transpose()?;
        Ok((grad_x, grad_scale, grad_bias))
    }
}

impl CustomOp2 for LayerNormOp {
    fn name(&self) -> &'static str {
        Self::NAME
    }

    fn cpu_fwd(
        &self,
        x_storage: &CpuStorage,
        x_layout: &Layout,
        scale_storage: &CpuStorage,
        scale_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_data(Self::NAME, "x", x_storage, x_layout)?;
        let scale = contiguous_data(Self::NAME, "scale", scale_storage, scale_layout)?;
        Ok(self.forward(x, scale, None, x_layout.shape()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        scale: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (grad_x, grad_scale, _) = self.backward(x, scale, grad_res, false)?;
        Ok((Some(grad_x), Some(grad_scale)))
    }
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        Self::NAME
    }

    fn cpu_fwd(
        &self,
        x_storage: &CpuStorage,
        x_layout: &Layout,
        scale_storage: &CpuStorage,
        scale_layout: &Layout,
        bias_storage: &CpuStorage,
        bias_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_data(Self::NAME, "x", x_storage, x_layout)?;
        let scale = contiguous_data(Self::NAME, "scale", scale_storage, scale_layout)?;
        let bias = contiguous_data(Self::NAME, "bias", bias_storage, bias_layout)?;
        Ok(self.forward(x, scale, Some(bias), x_layout.shape()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        scale: &Tensor,
        _bias: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (grad_x, grad_scale, grad_bias) = self.backward(x, scale, grad_res, true)?;
        Ok((Some(grad_x), Some(grad_scale), grad_bias))
    }
}

/// Fused LayerNorm; see [`super::layer_norm`].
pub fn layer_norm(x: &Tensor, scale: &Tensor, bias: Option<&Tensor>, eps: f64) -> Result<Tensor> {
    let op = LayerNormOp { eps: eps as f32 };
    let x = x.contiguous()?;
    let scale = scale.contiguous()?;
    match bias {
        Some(bias) => x.apply_op3(&scale, &bias.contiguous()?, op),
        None => x.apply_op2(&scale, op),
    }
}

/// Where the rows of a `[B, NH, S, DH]` input lie in its storage (any strides, unit stride
/// along DH), so the cells' outputs are read in place, views included.
#[derive(Debug, Clone, Copy)]
struct HeadRows {
    batch: usize,
    heads: usize,
    seq_len: usize,
    head_dim: usize,
    offset: usize,
    strides: [usize; 3],
}

impl HeadRows {
    fn from_layout(layout: &Layout) -> Option<Self> {
        let &[batch, heads, seq_len, head_dim] = layout.dims() else {
            return None;
        };
        let &[s0, s1, s2, s3] = layout.stride() else {
            return None;
        };
        (s3 == 1 || head_dim == 1).then_some(Self {
            batch,
            heads,
            seq_len,
            head_dim,
            offset: layout.start_offset(),
            strides: [s0, s1, s2],
        })
    }

    #[inline]
    fn row<'a>(&self, data: &'a [f32], b: usize, head: usize, s: usize) -> &'a [f32] {
        let start =
            self.offset + b * self.strides[0] + head * self.strides[1] + s * self.strides[2];
        &data[start..start + self.head_dim]
    }

    fn features(&self) -> usize {
        self.heads * self.head_dim
    }
}

/// Multi-head LayerNorm on (h `[B, NH, S, DH]`, scale `[NH·DH]`) → `[B, S, NH·DH]`.
struct MultiHeadLayerNormOp {
    eps: f32,
}

impl MultiHeadLayerNormOp {
    const NAME: &'static str = "multi-head-layer-norm";

    fn rows(what: &str, layout: &Layout) -> Result<HeadRows> {
        HeadRows::from_layout(layout).ok_or_else(|| {
            Error::Msg(format!(
                "{}: {what} has layout {layout:?}, expected [B, NH, S, DH] with unit stride along DH",
                Self::NAME
            ))
        })
    }
}

impl CustomOp2 for MultiHeadLayerNormOp {
    fn name(&self) -> &'static str {
        Self::NAME
    }

    fn cpu_fwd(
        &self,
        h_storage: &CpuStorage,
        h_layout: &Layout,
        scale_storage: &CpuStorage,
        scale_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let geo = Self::rows("input", h_layout)?;
        let h = f32_data(Self::NAME, "input", h_storage)?;
        let scale = contiguous_data(Self::NAME, "scale", scale_storage, scale_layout)?;
        let (features, dh) = (geo.features(), geo.head_dim);
        let mut out = output_buffer(geo.batch * geo.seq_len * features);
        let task = rows_per_task(features) * features;
        out.par_chunks_mut(task).enumerate().for_each(|(t, out)| {
            vmath::with_wide_vectors(
                #[inline(always)]
                || {
                    let first_row = t * (task / features);
                    for (i, out_row) in out.chunks_exact_mut(features).enumerate() {
                        let (b, s) = ((first_row + i) / geo.seq_len, (first_row + i) % geo.seq_len);
                        for head in 0..geo.heads {
                            let span = head * dh..(head + 1) * dh;
                            normalise_row(
                                geo.row(h, b, head, s),
                                &scale[span.clone()],
                                None,
                                self.eps,
                                &mut out_row[span],
                            );
                        }
                    }
                },
            )
        });
        let shape = Shape::from((geo.batch, geo.seq_len, features));
        Ok((CpuStorage::F32(out), shape))
    }

    fn bwd(
        &self,
        h: &Tensor,
        scale: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let op = Self::NAME;
        let (h_guard, h_layout) = h.storage_and_layout();
        let geo = Self::rows("input", h_layout)?;
        let h_data = f32_data(op, "input", cpu_storage(op, "input", &h_guard)?)?;
        let (features, dh, seq_len) = (geo.features(), geo.head_dim, geo.seq_len);
        // dh in [B, NH, S, DH] order: one task per run of whole (b, head) blocks of S rows.
        let block = seq_len * dh;
        let blocks_per_task = (TASK_ELEMS.div_ceil(block)).max(1);
        let mut grad_h = vec![0f32; geo.batch * geo.heads * block];
        let grad_scale = with_contiguous(op, "scale", scale, |scale| {
            with_contiguous(op, "output gradient", grad_res, |grad_y| {
                let partials: Vec<Vec<f32>> = grad_h
                    .par_chunks_mut(blocks_per_task * block)
                    .enumerate()
                    .map(|(t, grad_h)| {
                        vmath::with_wide_vectors(
                            #[inline(always)]
                            || {
                                let mut grad_scale = vec![0f32; features];
                                for (i, grad_h) in grad_h.chunks_exact_mut(block).enumerate() {
                                    let bh = t * blocks_per_task + i;
                                    let (b, head) = (bh / geo.heads, bh % geo.heads);
                                    let span = head * dh..(head + 1) * dh;
                                    for (s, grad_row) in grad_h.chunks_exact_mut(dh).enumerate() {
                                        let y_row = (b * seq_len + s) * features;
                                        normalise_row_backward(
                                            geo.row(h_data, b, head, s),
                                            &scale[span.clone()],
                                            &grad_y[y_row + span.start..y_row + span.end],
                                            self.eps,
                                            grad_row,
                                            &mut grad_scale[span.clone()],
                                            None,
                                        );
                                    }
                                }
                                grad_scale
                            },
                        )
                    })
                    // Summed in task order: deterministic whatever rayon's split.
                    .collect::<Vec<_>>();
                Ok(sum_in_task_order(partials, features))
            })
        })?;
        let shape = (geo.batch, geo.heads, geo.seq_len, dh);
        drop(h_guard);
        Ok((
            Some(Tensor::from_vec(grad_h, shape, &Device::Cpu)?),
            Some(Tensor::from_vec(grad_scale, features, &Device::Cpu)?),
        ))
    }
}

/// Fused multi-head LayerNorm; see [`super::multi_head_layer_norm`].
pub fn multi_head_layer_norm(h: &Tensor, scale: &Tensor, eps: f64) -> Result<Tensor> {
    let h = match HeadRows::from_layout(h.layout()) {
        Some(_) => h.clone(),
        None => h.contiguous()?,
    };
    h.apply_op2(
        &scale.contiguous()?,
        MultiHeadLayerNormOp { eps: eps as f32 },
    )
}

/// Normalisation of eight rows at a time in AVX2 + FMA: the rows' sums are added up lane-wise
/// as [`lane_sum`] adds each, and the last steps of its pairwise tree, the square root and the
/// division run once for the eight rows, across a transposed block, instead of once per row.
/// A row's statistics are one chain of dependent sums (the mean, then the variance around it,
/// then 1/σ); taken one row after the other the chains ran at a fraction of the core. Same
/// operations in the same order for every value, so the same bits as [`normalise_row`]. The
/// multi-head norm's 16-value head rows measured slower this way (0.121 against 0.105 ms,
/// BENCHMARKS.md, tenth speed pass) and keep the row loop.
#[cfg(target_arch = "x86_64")]
mod eight_rows {
    use std::arch::x86_64::*;

    pub(super) const ROWS: usize = 8;
    const LANES: usize = super::LANES;

    /// Whether rows of `len` values go through [`normalise`] on this CPU.
    pub(super) fn fits(len: usize) -> bool {
        len > 0 && len.is_multiple_of(LANES) && crate::xlstm::kernels::simd::avx2_fma()
    }

    /// `out = (x − mean)·rstd·scale (+ bias)` for eight rows.
    ///
    /// # Safety
    /// AVX2 and FMA available; every slice `len` long with [`fits`]`(len)`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn normalise(
        rows: [&[f32]; ROWS],
        scale: &[f32],
        bias: Option<&[f32]>,
        eps: f32,
        outs: [&mut [f32]; ROWS],
    ) {
        let len = rows[0].len();
        let inv_len = _mm256_set1_ps(1.0 / len as f32);
        let zero = _mm256_setzero_ps();
        // SAFETY: every offset is below `len` (whole chunks of 16), the caller's length.
        unsafe {
            let mut sums = [zero; ROWS];
            for (sum, row) in sums.iter_mut().zip(rows) {
                let (mut low, mut high) = (zero, zero);
                for at in (0..len).step_by(LANES) {
                    low = _mm256_add_ps(low, load(row, at));
                    high = _mm256_add_ps(high, load(row, at + 8));
                }
                *sum = _mm256_add_ps(low, high);
            }
            let mean = _mm256_mul_ps(tree_sums(sums), inv_len);
            let row_means: [__m256; ROWS] = lane_broadcasts(mean);
            for ((sum, row), m) in sums.iter_mut().zip(rows).zip(row_means) {
                let (mut low, mut high) = (zero, zero);
                for at in (0..len).step_by(LANES) {
                    let d_low = _mm256_sub_ps(load(row, at), m);
                    let d_high = _mm256_sub_ps(load(row, at + 8), m);
                    low = _mm256_add_ps(low, _mm256_mul_ps(d_low, d_low));
                    high = _mm256_add_ps(high, _mm256_mul_ps(d_high, d_high));
                }
                *sum = _mm256_add_ps(low, high);
            }
            let var = _mm256_mul_ps(tree_sums(sums), inv_len);
            let rstd = _mm256_div_ps(
                _mm256_set1_ps(1.0),
                _mm256_sqrt_ps(_mm256_add_ps(var, _mm256_set1_ps(eps))),
            );
            let row_rstds = lane_broadcasts(rstd);
            for (r, out) in outs.into_iter().enumerate() {
                for at in (0..len).step_by(8) {
                    let centred = _mm256_sub_ps(load(rows[r], at), row_means[r]);
                    let mut y =
                        _mm256_mul_ps(_mm256_mul_ps(centred, row_rstds[r]), load(scale, at));
                    if let Some(bias) = bias {
                        y = _mm256_add_ps(y, load(bias, at));
                    }
                    _mm256_storeu_ps(out.as_mut_ptr().add(at), y);
                }
            }
        }
    }

    /// Lane r of the result: the pairwise sum of the eight lanes of `sums[r]`, in
    /// [`super::lane_sum`]'s order ((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7)).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn tree_sums(sums: [__m256; ROWS]) -> __m256 {
        let [s0, s1, s2, s3, s4, s5, s6, s7] = sums;
        // Transpose: column i holds lane i of every row.
        let (a0, a1) = (_mm256_unpacklo_ps(s0, s1), _mm256_unpackhi_ps(s0, s1));
        let (a2, a3) = (_mm256_unpacklo_ps(s2, s3), _mm256_unpackhi_ps(s2, s3));
        let (a4, a5) = (_mm256_unpacklo_ps(s4, s5), _mm256_unpackhi_ps(s4, s5));
        let (a6, a7) = (_mm256_unpacklo_ps(s6, s7), _mm256_unpackhi_ps(s6, s7));
        let b0 = _mm256_shuffle_ps::<0x44>(a0, a2);
        let b1 = _mm256_shuffle_ps::<0xEE>(a0, a2);
        let b2 = _mm256_shuffle_ps::<0x44>(a1, a3);
        let b3 = _mm256_shuffle_ps::<0xEE>(a1, a3);
        let b4 = _mm256_shuffle_ps::<0x44>(a4, a6);
        let b5 = _mm256_shuffle_ps::<0xEE>(a4, a6);
        let b6 = _mm256_shuffle_ps::<0x44>(a5, a7);
        let b7 = _mm256_shuffle_ps::<0xEE>(a5, a7);
        let column = [
            _mm256_permute2f128_ps::<0x20>(b0, b4),
            _mm256_permute2f128_ps::<0x20>(b1, b5),
            _mm256_permute2f128_ps::<0x20>(b2, b6),
            _mm256_permute2f128_ps::<0x20>(b3, b7),
            _mm256_permute2f128_ps::<0x31>(b0, b4),
            _mm256_permute2f128_ps::<0x31>(b1, b5),
            _mm256_permute2f128_ps::<0x31>(b2, b6),
            _mm256_permute2f128_ps::<0x31>(b3, b7),
        ];
        let add = _mm256_add_ps;
        let even = add(add(column[0], column[4]), add(column[2], column[6]));
        let odd = add(add(column[1], column[5]), add(column[3], column[7]));
        add(even, odd)
    }

    /// # Safety
    /// `at + 8 <= row.len()`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn load(row: &[f32], at: usize) -> __m256 {
        debug_assert!(at + 8 <= row.len());
        // SAFETY: the caller's bound.
        unsafe { _mm256_loadu_ps(row.as_ptr().add(at)) }
    }

    /// Lane r of `v` in every lane, for each r.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn lane_broadcasts(v: __m256) -> [__m256; ROWS] {
        let mut out = [v; ROWS];
        for (r, out) in out.iter_mut().enumerate() {
            *out = _mm256_permutevar8x32_ps(v, _mm256_set1_epi32(r as i32));
        }
        out
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod eight_rows_tests {
    use super::*;

    #[test]
    fn eight_rows_give_the_bits_of_one_row_at_a_time() {
        if !eight_rows::fits(16) {
            eprintln!("skipped: this CPU lacks AVX2+FMA");
            return;
        }
        for len in [16, 32, 64] {
            // Rows of different scales and offsets; one constant (variance 0), one with ±0.
            let rows: Vec<Vec<f32>> = (0..8)
                .map(|r| {
                    (0..len)
                        .map(|j| match r {
                            0 => 3.5,
                            1 => {
                                if j % 2 == 0 {
                                    0.0
                                } else {
                                    -0.0
                                }
                            }
                            _ => {
                                let wave = ((j * 7 + r * 13) % 23) as f32 - 11.0;
                                wave * 10f32.powi(r as i32 - 4) + 1000.0 * (r as f32 - 5.0)
                            }
                        })
                        .collect()
                })
                .collect();
            let scale: Vec<f32> = (0..len).map(|j| 1.0 + 0.01 * j as f32).collect();
            let bias: Vec<f32> = (0..len).map(|j| j as f32 * -0.5).collect();
            for with_bias in [false, true] {
                let bias = with_bias.then_some(bias.as_slice());
                let mut grouped = vec![vec![0f32; len]; 8];
                {
                    let mut outs = grouped.iter_mut();
                    // SAFETY: fits() checked AVX2 and FMA; every slice is `len` long.
                    unsafe {
                        eight_rows::normalise(
                            std::array::from_fn(|r| rows[r].as_slice()),
                            &scale,
                            bias,
                            1e-5,
                            std::array::from_fn(|_| outs.next().unwrap().as_mut_slice()),
                        )
                    };
                }
                for r in 0..8 {
                    let mut single = vec![0f32; len];
                    vmath::with_wide_vectors(|| {
                        normalise_row(&rows[r], &scale, bias, 1e-5, &mut single)
                    });
                    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    assert_eq!(
                        bits(&grouped[r]),
                        bits(&single),
                        "len {len}, row {r}, bias {with_bias}"
                    );
                }
            }
        }
    }
}
