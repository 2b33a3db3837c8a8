//! Fused CPU packing: a candle custom op on (q, k, v) whose backward pass unpacks the
//! gradient, both parallel over the batch. Pure copies, so outputs and gradients equal the
//! reference's exactly.

use candle_core::{CpuStorage, CustomOp3, Device, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::super::cpu_data::{contiguous_data, output_buffer, with_contiguous};

const NAME: &str = "pack-heads";

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

    /// Values of one batch element.
    fn batch_len(&self) -> usize {
        self.seq_len * self.heads * self.head_dim
    }
}

/// One batch element: token-major parts → head-major packed block `[NH, S, 3·DH]`.
fn pack(sizes: Sizes, parts: [&[f32]; 3], packed: &mut [f32]) {
    let Sizes {
        seq_len,
        heads,
        head_dim,
    } = sizes;
    let width = heads * head_dim;
    for (h, head) in packed.chunks_exact_mut(seq_len * 3 * head_dim).enumerate() {
        for (t, token) in head.chunks_exact_mut(3 * head_dim).enumerate() {
            let from = t * width + h * head_dim;
            for (slot, part) in token.chunks_exact_mut(head_dim).zip(parts) {
                slot.copy_from_slice(&part[from..from + head_dim]);
            }
        }
    }
}

/// The inverse of [`pack`] for one batch element.
fn unpack(sizes: Sizes, packed: &[f32], parts: [&mut [f32]; 3]) {
    let Sizes {
        seq_len,
        heads,
        head_dim,
    } = sizes;
    let width = heads * head_dim;
    let [q, k, v] = parts;
    for (h, head) in packed.chunks_exact(seq_len * 3 * head_dim).enumerate() {
        for (t, token) in head.chunks_exact(3 * head_dim).enumerate() {
            let to = t * width + h * head_dim..t * width + (h + 1) * head_dim;
            let (slot_q, rest) = token.split_at(head_dim);
            let (slot_k, slot_v) = rest.split_at(head_dim);
            q[to.clone()].copy_from_slice(slot_q);
            k[to.clone()].copy_from_slice(slot_k);
            v[to].copy_from_slice(slot_v);
        }
    }
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
            .for_each(|(packed, ((q, k), v))| pack(sizes, [q, k, v], packed));
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

/// Fused packing; see [`super::pack_heads`].
pub fn pack_heads(q: &Tensor, k: &Tensor, v: &Tensor, num_heads: usize) -> Result<Tensor> {
    super::check(q, k, v, num_heads)?;
    q.contiguous()?.apply_op3(
        &k.contiguous()?,
        &v.contiguous()?,
        PackHeadsOp { num_heads },
    )
}
