//! Fused CPU packing: candle custom ops on (q, k, v), or on one tensor holding them side by
//! side, whose backward passes unpack the gradient, all parallel over the batch. Pure copies,
//! so outputs and gradients equal the reference's exactly.

use candle_core::{CpuStorage, CustomOp1, CustomOp3, Device, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::super::cpu_data::{contiguous_data, output_buffer, with_contiguous};

const NAME: &str = "pack-heads";
const NAME_SIDE_BY_SIDE: &str = "pack-heads-side-by-side";

struct PackHeadsOp {
    num_heads: usize,
}

/// Sizes of one call.
#[derive(Debug, Clone, Copy)]
struct Sizes {
    seq_len: usize,
    heads: usize,
    head_dim: usize,
}

impl Sizes {
    fn new(dims: &[usize], heads: usize) -> Self {
        Self {
            seq_len: dims[1],
            heads,
            head_dim: dims[2] / heads,
        }
    }

    /// Values of one part of one token.
    fn width(&self) -> usize {
        self.heads * self.head_dim
    }

    /// Values of one part of one batch element.
    fn batch_len(&self) -> usize {
        self.seq_len * self.width()
    }
}

/// One batch element: token-major parts → head-major packed block `[NH, S, 3·DH]`. Token t
/// of a part starts at `t · row_stride` (the part's width, or three times it where the parts
/// lie side by side in one tensor).
fn pack(sizes: Sizes, parts: [&[f32]; 3], row_stride: usize, packed: &mut [f32]) {
    let Sizes {
        seq_len, head_dim, ..
    } = sizes;
    for (h, head) in packed.chunks_exact_mut(seq_len * 3 * head_dim).enumerate() {
        for (t, token) in head.chunks_exact_mut(3 * head_dim).enumerate() {
            let from = t * row_stride + h * head_dim;
            for (slot, part) in token.chunks_exact_mut(head_dim).zip(parts) {
                slot.copy_from_slice(&part[from..from + head_dim]);
            }
        }
    }
}

/// Every `DH`-long slot of one batch element's packed block with its part p, token t and
/// head h: what the inverses of [`pack`] copy back.
fn for_each_slot(sizes: Sizes, packed: &[f32], mut f: impl FnMut(usize, usize, usize, &[f32])) {
    let Sizes {
        seq_len, head_dim, ..
    } = sizes;
    for (h, head) in packed.chunks_exact(seq_len * 3 * head_dim).enumerate() {
        for (t, token) in head.chunks_exact(3 * head_dim).enumerate() {
            for (p, slot) in token.chunks_exact(head_dim).enumerate() {
                f(p, t, h, slot);
            }
        }
    }
}

/// The inverse of [`pack`] for one batch element.
fn unpack(sizes: Sizes, packed: &[f32], mut parts: [&mut [f32]; 3]) {
    let (width, dh) = (sizes.width(), sizes.head_dim);
    for_each_slot(sizes, packed, |p, t, h, slot| {
        let at = t * width + h * dh;
        parts[p][at..at + dh].copy_from_slice(slot);
    });
}

/// The inverse of [`pack`] for one batch element into its `[S, 3·D]` rows of parts side by
/// side (token t's part p at `t·3D + p·D`).
fn unpack_side_by_side(sizes: Sizes, packed: &[f32], rows: &mut [f32]) {
    let (width, dh) = (sizes.width(), sizes.head_dim);
    for_each_slot(sizes, packed, |p, t, h, slot| {
        let at = t * 3 * width + p * width + h * dh;
        rows[at..at + dh].copy_from_slice(slot);
    });
}

/// A batch element's `[S, 3·D]` rows of parts side by side as the three parts, each starting
/// at its first value (tokens every 3·D values).
fn side_by_side_parts(rows: &[f32], width: usize) -> [&[f32]; 3] {
    [rows, &rows[width..], &rows[2 * width..]]
}

impl CustomOp3 for PackHeadsOp {
    fn name(&self) -> &'static str {
        NAME
    }

    fn cpu_fwd(
        &self,
        q_storage: &CpuStorage,
        q_layout: &Layout,
        k_storage: &CpuStorage,
        k_layout: &Layout,
        v_storage: &CpuStorage,
        v_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let q = contiguous_data(NAME, "q", q_storage, q_layout)?;
        let k = contiguous_data(NAME, "k", k_storage, k_layout)?;
        let v = contiguous_data(NAME, "v", v_storage, v_layout)?;
        let dims = q_layout.dims();
        let sizes = Sizes::new(dims, self.num_heads);
        let n = sizes.batch_len();
        let mut packed = output_buffer(3 * q.len());
        packed
            .par_chunks_mut(3 * n)
            .zip(q.par_chunks(n).zip(k.par_chunks(n)).zip(v.par_chunks(n)))
            .for_each(|(packed, ((q, k), v))| pack(sizes, [q, k, v], sizes.width(), packed));
        let shape = Shape::from((dims[0], sizes.heads, sizes.seq_len, 3 * sizes.head_dim));
        Ok((CpuStorage::F32(packed), shape))
    }

    fn bwd(
        &self,
        q: &Tensor,
        _k: &Tensor,
        _v: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let sizes = Sizes::new(q.dims(), self.num_heads);
        let n = sizes.batch_len();
        let len = q.elem_count();
        let (mut grad_q, mut grad_k, mut grad_v) =
            (output_buffer(len), output_buffer(len), output_buffer(len));
        with_contiguous(NAME, "output gradient", grad_res, |g| {
            g.par_chunks(3 * n)
                .zip(
                    grad_q
                        .par_chunks_mut(n)
                        .zip(grad_k.par_chunks_mut(n))
                        .zip(grad_v.par_chunks_mut(n)),
                )
                .for_each(|(g, ((gq, gk), gv))| unpack(sizes, g, [gq, gk, gv]));
            Ok(())
        })?;
        let tensor = |data| Tensor::from_vec(data, q.shape(), &Device::Cpu);
        Ok((
            Some(tensor(grad_q)?),
            Some(tensor(grad_k)?),
            Some(tensor(grad_v)?),
        ))
    }
}

/// The packing of one tensor that holds q, k and v side by side, `[B, S, 3·NH·DH]`.
struct PackSideBySideOp {
    num_heads: usize,
}

impl CustomOp1 for PackSideBySideOp {
    fn name(&self) -> &'static str {
        NAME_SIDE_BY_SIDE
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let qkv = contiguous_data(NAME_SIDE_BY_SIDE, "qkv", storage, layout)?;
        let dims = layout.dims();
        let sizes = Sizes::new(&[dims[0], dims[1], dims[2] / 3], self.num_heads);
        let n = 3 * sizes.batch_len();
        let mut packed = output_buffer(qkv.len());
        packed
            .par_chunks_mut(n)
            .zip(qkv.par_chunks(n))
            .for_each(|(packed, rows)| {
                let parts = side_by_side_parts(rows, sizes.width());
                pack(sizes, parts, 3 * sizes.width(), packed)
            });
        let shape = Shape::from((dims[0], sizes.heads, sizes.seq_len, 3 * sizes.head_dim));
        Ok((CpuStorage::F32(packed), shape))
    }

    fn bwd(&self, qkv: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let (b, s, d3) = qkv.dims3()?;
        let sizes = Sizes::new(&[b, s, d3 / 3], self.num_heads);
        let n = 3 * sizes.batch_len();
        let mut grad = output_buffer(qkv.elem_count());
        with_contiguous(NAME_SIDE_BY_SIDE, "output gradient", grad_res, |g| {
            g.par_chunks(n)
                .zip(grad.par_chunks_mut(n))
                .for_each(|(g, rows)| unpack_side_by_side(sizes, g, rows));
            Ok(())
        })?;
        Ok(Some(Tensor::from_vec(grad, qkv.shape(), &Device::Cpu)?))
    }
}

/// Fused packing of side-by-side parts; see [`super::pack_heads_side_by_side`].
pub fn pack_heads_side_by_side(qkv: &Tensor, num_heads: usize) -> Result<Tensor> {
    super::check_side_by_side(qkv, num_heads)?;
    qkv.contiguous()?.apply_op1(PackSideBySideOp { num_heads })
}

/// Fused packing; see [`super::pack_heads`].
pub fn pack_heads(q: &Tensor, k: &Tensor, v: &Tensor, num_heads: usize) -> Result<Tensor> {
    super::check(q, k, v, num_heads)?;
    q.contiguous()?.apply_op3(
        &k.contiguous()?,
        &v.contiguous()?,
        PackHeadsOp { num_heads },
    )
}
