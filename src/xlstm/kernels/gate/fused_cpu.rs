//! Fused CPU gates: candle custom ops with hand-written backward passes, parallel over runs of
//! rows.
//!
//! * Output gate on (a, b, z). With σ = sigmoid(z) and s = z·σ: `y = (a + b)·s`, so
//!   `da = db = dy·s` and `dz = dy·(a + b)·σ·(1 + z·(1 − σ))`. z may be a view whose rows are
//!   strided (the z half of the up-projection): it is read in place.
//! * GeLU gate on `up = [g | u]`: `y = GeLU(g)·u` with `GeLU(g) = g·Φ(g)`, so `du = dy·GeLU(g)`
//!   and `dg = dy·u·(Φ(g) + g·φ(g))` (Φ, φ: the standard normal CDF and density).
//! * Feature scale on (x, w): `y = x·w` per feature, so `dx = dy·w` and `dw = Σ_rows dy·x`,
//!   summed per run of rows and then over the runs in order (no dependence on thread timing).

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, Device, Error, Layout, Result, Shape, Tensor,
};
use rayon::prelude::*;

use super::super::cpu_data::{
    contiguous_data, cpu_storage, f32_data, output_buffer, sum_in_task_order, with_contiguous,
};
use super::super::vmath;

const SILU_NAME: &str = "silu-gated-sum";
const GELU_NAME: &str = "gelu-gated";
const SCALE_NAME: &str = "feature-scale";

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
    fn from_layout(op: &str, what: &str, layout: &Layout) -> Result<Self> {
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
                "{op}: {what} has layout {layout:?}, expected rows of unit stride"
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

#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + vmath::exp(-x))
}

struct SiluGatedSumOp;

impl CustomOp3 for SiluGatedSumOp {
    fn name(&self) -> &'static str {
        SILU_NAME
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
        let a = contiguous_data(SILU_NAME, "a", a_storage, a_layout)?;
        let b = contiguous_data(SILU_NAME, "b", b_storage, b_layout)?;
        let z_rows = Rows::from_layout(SILU_NAME, "z", z_layout)?;
        let z = f32_data(SILU_NAME, "z", z_storage)?;
        let width = z_rows.width;
        if z_rows.count * width != a.len() || b.len() != a.len() {
            return Err(Error::Msg(format!(
                "{SILU_NAME}: a, b and z hold {}, {} and {} values, expected one size",
                a.len(),
                b.len(),
                z_rows.count * width
            )));
        }
        let mut y = output_buffer(a.len());
        y.par_chunks_mut(ROWS_PER_TASK * width)
            .enumerate()
            .for_each(|(task, y)| {
                vmath::with_wide_vectors(
                    #[inline(always)]
                    || {
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
                    },
                )
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
        let len = a.elem_count();
        let mut grad_sum = vec![0f32; len];
        let mut grad_z = vec![0f32; len];
        let (z_guard, z_layout) = z.storage_and_layout();
        let z_data = f32_data(SILU_NAME, "z", cpu_storage(SILU_NAME, "z", &z_guard)?)?;
        let z_rows = Rows::from_layout(SILU_NAME, "z", z_layout)?;
        let width = z_rows.width;
        with_contiguous(SILU_NAME, "a", a, |a| {
            with_contiguous(SILU_NAME, "b", b, |b| {
                with_contiguous(SILU_NAME, "output gradient", grad_res, |g| {
                    grad_sum
                        .par_chunks_mut(ROWS_PER_TASK * width)
                        .zip(grad_z.par_chunks_mut(ROWS_PER_TASK * width))
                        .enumerate()
                        .for_each(|(task, (grad_sum, grad_z))| {
                            vmath::with_wide_vectors(
                                #[inline(always)]
                                || {
                                    for (r, (gs_row, gz_row)) in grad_sum
                                        .chunks_exact_mut(width)
                                        .zip(grad_z.chunks_exact_mut(width))
                                        .enumerate()
                                    {
                                        let row = task * ROWS_PER_TASK + r;
                                        let span = row * width..(row + 1) * width;
                                        for (((((gs, gz), &z), &g), &a), &b) in gs_row
                                            .iter_mut()
                                            .zip(gz_row.iter_mut())
                                            .zip(z_rows.row(z_data, row))
                                            .zip(&g[span.clone()])
                                            .zip(&a[span.clone()])
                                            .zip(&b[span])
                                        {
                                            let sig = sigmoid(z);
                                            *gs = g * z * sig;
                                            *gz = g * (a + b) * sig * (1.0 + z * (1.0 - sig));
                                        }
                                    }
                                },
                            )
                        });
                    Ok(())
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

/// Fused output gate; see [`super::silu_gated_sum`].
pub fn silu_gated_sum(a: &Tensor, b: &Tensor, z: &Tensor) -> Result<Tensor> {
    // z is read through its strides unless they do not form rows.
    let z = match Rows::from_layout(SILU_NAME, "z", z.layout()) {
        Ok(_) => z.clone(),
        Err(_) => z.contiguous()?,
    };
    a.contiguous()?
        .apply_op3(&b.contiguous()?, &z, SiluGatedSumOp)
}

/// Φ(x) and φ(x) of the standard normal distribution, from one exponential: φ(x)·√(2π) is
/// e^{−(x/√2)²}, which the erf in Φ evaluates.
#[inline(always)]
fn normal_cdf_pdf(x: f32) -> (f32, f32) {
    let (erf, gaussian) = vmath::erf_and_gaussian(x * std::f32::consts::FRAC_1_SQRT_2);
    let pdf = gaussian * (0.5 * std::f32::consts::FRAC_2_SQRT_PI * std::f32::consts::FRAC_1_SQRT_2);
    (0.5 * (1.0 + erf), pdf)
}

struct GeluGatedOp;

impl CustomOp1 for GeluGatedOp {
    fn name(&self) -> &'static str {
        GELU_NAME
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let up = Rows::from_layout(GELU_NAME, "up", layout)?;
        let data = f32_data(GELU_NAME, "up", storage)?;
        let width = up.width / 2;
        let mut y = output_buffer(up.count * width);
        #[cfg(target_arch = "x86_64")]
        let avx2 = gelu_avx2::preferred();
        y.par_chunks_mut(ROWS_PER_TASK * width)
            .enumerate()
            .for_each(|(task, y)| {
                for (r, y_row) in y.chunks_exact_mut(width).enumerate() {
                    let (g, u) = up.row(data, task * ROWS_PER_TASK + r).split_at(width);
                    #[cfg(target_arch = "x86_64")]
                    if avx2 {
                        // SAFETY: preferred() found AVX2 and FMA; g, u and y_row have one length.
                        unsafe { gelu_avx2::gelu_gate(g, u, y_row) };
                        continue;
                    }
                    vmath::with_wide_vectors(
                        #[inline(always)]
                        || {
                            for ((y, g), u) in y_row.iter_mut().zip(g).zip(u) {
                                *y = g * normal_cdf_pdf(*g).0 * u;
                            }
                        },
                    )
                }
            });
        let mut dims = layout.dims().to_vec();
        *dims.last_mut().expect("checked: rank ≥ 1") = width;
        Ok((CpuStorage::F32(y), Shape::from(dims)))
    }

    fn bwd(&self, up: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let mut grad_up = vec![0f32; up.elem_count()];
        let (up_guard, up_layout) = up.storage_and_layout();
        let up_data = f32_data(GELU_NAME, "up", cpu_storage(GELU_NAME, "up", &up_guard)?)?;
        let rows = Rows::from_layout(GELU_NAME, "up", up_layout)?;
        let width = rows.width / 2;
        with_contiguous(GELU_NAME, "output gradient", grad_res, |g| {
            grad_up
                .par_chunks_mut(ROWS_PER_TASK * rows.width)
                .enumerate()
                .for_each(|(task, grad_up)| {
                    vmath::with_wide_vectors(
                        #[inline(always)]
                        || {
                            for (r, gu_row) in grad_up.chunks_exact_mut(rows.width).enumerate() {
                                let row = task * ROWS_PER_TASK + r;
                                let (gate, value) = rows.row(up_data, row).split_at(width);
                                let dy = &g[row * width..(row + 1) * width];
                                let (grad_gate, grad_value) = gu_row.split_at_mut(width);
                                for ((((grad_g, grad_u), &g), &u), &dy) in grad_gate
                                    .iter_mut()
                                    .zip(grad_value.iter_mut())
                                    .zip(gate)
                                    .zip(value)
                                    .zip(dy)
                                {
                                    let (cdf, pdf) = normal_cdf_pdf(g);
                                    *grad_u = dy * g * cdf;
                                    *grad_g = dy * u * (cdf + g * pdf);
                                }
                            }
                        },
                    )
                });
            Ok(())
        })?;
        Ok(Some(Tensor::from_vec(grad_up, up.shape(), &Device::Cpu)?))
    }
}

/// Fused GeLU gate; see [`super::gelu_gated`].
pub fn gelu_gated(up: &Tensor) -> Result<Tensor> {
    let up = match Rows::from_layout(GELU_NAME, "up", up.layout()) {
        Ok(_) => up.clone(),
        Err(_) => up.contiguous()?,
    };
    up.apply_op1(GeluGatedOp)
}

struct ScaleFeaturesOp;

impl CustomOp2 for ScaleFeaturesOp {
    fn name(&self) -> &'static str {
        SCALE_NAME
    }

    fn cpu_fwd(
        &self,
        x_storage: &CpuStorage,
        x_layout: &Layout,
        scale_storage: &CpuStorage,
        scale_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_data(SCALE_NAME, "x", x_storage, x_layout)?;
        let scale = contiguous_data(SCALE_NAME, "scale", scale_storage, scale_layout)?;
        let width = scale.len();
        if width == 0 || x.len() % width != 0 {
            return Err(Error::Msg(format!(
                "{SCALE_NAME}: x holds {} values, expected rows of {width}",
                x.len()
            )));
        }
        let mut y = output_buffer(x.len());
        y.par_chunks_mut(ROWS_PER_TASK * width)
            .zip(x.par_chunks(ROWS_PER_TASK * width))
            .for_each(|(y, x)| {
                for (y_row, x_row) in y.chunks_exact_mut(width).zip(x.chunks_exact(width)) {
                    for ((y, x), w) in y_row.iter_mut().zip(x_row).zip(scale) {
                        *y = x * w;
                    }
                }
            });
        Ok((CpuStorage::F32(y), x_layout.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        scale: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let width = scale.elem_count();
        let mut grad_x = vec![0f32; x.elem_count()];
        let grad_scale = with_contiguous(SCALE_NAME, "x", x, |x| {
            with_contiguous(SCALE_NAME, "scale", scale, |scale| {
                with_contiguous(SCALE_NAME, "output gradient", grad_res, |g| {
                    let partial_sums: Vec<Vec<f32>> = grad_x
                        .par_chunks_mut(ROWS_PER_TASK * width)
                        .zip(x.par_chunks(ROWS_PER_TASK * width))
                        .zip(g.par_chunks(ROWS_PER_TASK * width))
                        .map(|((grad_x, x), g)| {
                            let mut sum = vec![0f32; width];
                            for ((gx_row, x_row), g_row) in grad_x
                                .chunks_exact_mut(width)
                                .zip(x.chunks_exact(width))
                                .zip(g.chunks_exact(width))
                            {
                                for j in 0..width {
                                    gx_row[j] = g_row[j] * scale[j];
                                    sum[j] += g_row[j] * x_row[j];
                                }
                            }
                            sum
                        })
                        .collect();
                    Ok(sum_in_task_order(partial_sums, width))
                })
            })
        })?;
        Ok((
            Some(Tensor::from_vec(grad_x, x.shape(), &Device::Cpu)?),
            Some(Tensor::from_vec(grad_scale, scale.shape(), &Device::Cpu)?),
        ))
    }
}

/// Fused feature scale; see [`super::scale_features`].
pub fn scale_features(x: &Tensor, scale: &Tensor) -> Result<Tensor> {
    x.contiguous()?
        .apply_op2(&scale.contiguous()?, ScaleFeaturesOp)
}

/// The GeLU gate's forward in AVX2 + FMA, four vectors at a time with their operations
/// interleaved (two: 15 % faster than the compiled loop, four: 22 %). Each value's Φ is one
/// long chain of dependent operations (a division, a polynomial, an exponential); the compiled
/// loop of [`vmath::with_wide_vectors`] took them one vector after the other and ran at half
/// the speed of its AVX-512 copy, whose vectors hold twice the values for the same chain. Same
/// operations in the same order as [`vmath::erf_and_gaussian`] and [`vmath::exp`], so the same
/// bits.
#[cfg(target_arch = "x86_64")]
mod gelu_avx2 {
    use std::arch::x86_64::*;

    const LANES: usize = 8;

    /// Whether this path runs: AVX2 and FMA without AVX-512, where the compiled wide loop is
    /// already one 16-value vector per chain.
    pub(super) fn preferred() -> bool {
        crate::xlstm::kernels::simd::level() == crate::xlstm::kernels::simd::SimdLevel::Avx2
    }

    /// `y = g·Φ(g)·u` over one row.
    ///
    /// # Safety
    /// AVX2 and FMA available; `g`, `u` and `y` of one length.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn gelu_gate(g: &[f32], u: &[f32], y: &mut [f32]) {
        debug_assert!(g.len() == y.len() && u.len() == y.len());
        let len = y.len();
        let mut j = 0;
        // SAFETY: every access is below `len` (j + 4·LANES ≤ len, then j + LANES ≤ len).
        unsafe {
            while j + 4 * LANES <= len {
                let (mut x, mut w) = ([_mm256_setzero_ps(); 4], [_mm256_setzero_ps(); 4]);
                for k in 0..4 {
                    x[k] = _mm256_loadu_ps(g.as_ptr().add(j + k * LANES));
                    w[k] = _mm256_loadu_ps(u.as_ptr().add(j + k * LANES));
                }
                let out = gelu_gate_n(x, w);
                for (k, out) in out.into_iter().enumerate() {
                    _mm256_storeu_ps(y.as_mut_ptr().add(j + k * LANES), out);
                }
                j += 4 * LANES;
            }
            while j + LANES <= len {
                let [out] = gelu_gate_n(
                    [_mm256_loadu_ps(g.as_ptr().add(j))],
                    [_mm256_loadu_ps(u.as_ptr().add(j))],
                );
                _mm256_storeu_ps(y.as_mut_ptr().add(j), out);
                j += LANES;
            }
        }
        for ((y, g), u) in y[j..].iter_mut().zip(&g[j..]).zip(&u[j..]) {
            *y = g * super::normal_cdf_pdf(*g).0 * u;
        }
    }

    /// `g·Φ(g)·u` of N vectors, each operation applied to all N before the next.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn gelu_gate_n<const N: usize>(g: [__m256; N], u: [__m256; N]) -> [__m256; N] {
        let splat = _mm256_set1_ps;
        let zeros = [_mm256_setzero_ps(); N];
        // x = g/√2 (`scaled`), a = |x|, t = 1 / (0.3275911·a + 1).
        let (mut scaled, mut a, mut t) = (zeros, zeros, zeros);
        for j in 0..N {
            let x = _mm256_mul_ps(g[j], splat(std::f32::consts::FRAC_1_SQRT_2));
            a[j] = _mm256_andnot_ps(splat(-0.0), x);
            scaled[j] = x;
        }
        for j in 0..N {
            t[j] = _mm256_div_ps(
                splat(1.0),
                _mm256_fmadd_ps(splat(0.327_591_1), a[j], splat(1.0)),
            );
        }
        // e^{−a²}, as vmath::exp: n = ⌊x·log₂e + ½⌋, the reduced argument, a polynomial.
        let (mut reduced, mut n) = (zeros, zeros);
        for j in 0..N {
            let x = _mm256_mul_ps(_mm256_xor_ps(a[j], splat(-0.0)), a[j]);
            let x = _mm256_max_ps(splat(-88.376_26), _mm256_min_ps(splat(88.376_26), x));
            n[j] = _mm256_floor_ps(_mm256_add_ps(
                _mm256_mul_ps(x, splat(std::f32::consts::LOG2_E)),
                splat(0.5),
            ));
            let r = _mm256_fnmadd_ps(n[j], splat(0.693_359_4), x);
            reduced[j] = _mm256_fnmadd_ps(n[j], splat(-2.121_944_4e-4), r);
        }
        let mut p = [splat(super::vmath::EXP_POLYNOMIAL[0]); N];
        for &coefficient in &super::vmath::EXP_POLYNOMIAL[1..] {
            for j in 0..N {
                p[j] = _mm256_fmadd_ps(p[j], reduced[j], splat(coefficient));
            }
        }
        let mut poly = [splat(1.061_405_4); N];
        for coefficient in [-1.453_152_1, 1.421_413_8, -0.284_496_74, 0.254_829_6] {
            for j in 0..N {
                poly[j] = _mm256_fmadd_ps(poly[j], t[j], splat(coefficient));
            }
        }
        let mut out = zeros;
        for j in 0..N {
            let r = reduced[j];
            let y = _mm256_add_ps(_mm256_fmadd_ps(p[j], _mm256_mul_ps(r, r), r), splat(1.0));
            let biased = _mm256_sub_epi32(
                _mm256_castps_si256(_mm256_add_ps(n[j], splat(12_582_912.0))),
                _mm256_set1_epi32(0x4B40_0000 - 127),
            );
            let gaussian = _mm256_mul_ps(y, _mm256_castsi256_ps(_mm256_slli_epi32(biased, 23)));
            let poly = _mm256_mul_ps(poly[j], t[j]);
            // erf = (1 − poly·e^{−a²}) with the sign of x; Φ = 0.5·(1 + erf).
            let erf_abs = _mm256_fnmadd_ps(poly, gaussian, splat(1.0));
            let erf = _mm256_or_ps(
                _mm256_andnot_ps(splat(-0.0), erf_abs),
                _mm256_and_ps(splat(-0.0), scaled[j]),
            );
            let cdf = _mm256_mul_ps(splat(0.5), _mm256_add_ps(splat(1.0), erf));
            out[j] = _mm256_mul_ps(_mm256_mul_ps(g[j], cdf), u[j]);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn gelu_avx2_gives_the_bits_of_the_compiled_loop() {
        if !(is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")) {
            eprintln!("skipped: this CPU lacks AVX2+FMA");
            return;
        }
        // 77 values: two chunks of four vectors, one lone vector and a scalar tail.
        let special = [
            f32::NAN,
            0.0,
            -0.0,
            1e-30,
            -1e-30,
            9.0,
            -9.0,
            80.0,
            -80.0,
            1e30,
            -1e30,
        ];
        let len = 77;
        let g: Vec<f32> = (0..len)
            .map(|i| {
                special
                    .get(i)
                    .copied()
                    .unwrap_or(((i * 37 % 101) as f32 - 50.0) * 0.13)
            })
            .collect();
        let u: Vec<f32> = (0..len).map(|i| 1.0 - (i as f32) * 0.03).collect();
        let mut fused = vec![0f32; len];
        // SAFETY: AVX2 and FMA checked above; one length.
        unsafe { gelu_avx2::gelu_gate(&g, &u, &mut fused) };
        let compiled: Vec<f32> = vmath::with_wide_vectors(|| {
            g.iter()
                .zip(&u)
                .map(|(g, u)| g * normal_cdf_pdf(*g).0 * u)
                .collect()
        });
        for (i, (a, b)) in fused.iter().zip(&compiled).enumerate() {
            assert!(
                a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()),
                "value {i} (g = {}): {a} against {b}",
                g[i]
            );
        }
    }
}
