//! Launch plans: which kernels of the `.cu` files a call runs, in order, with which grid,
//! block, shared memory and arguments. A plan names its buffers by index and knows nothing of
//! devices, so the same plan runs on a GPU (`launch.rs`, feature `cuda`) and, in tests, on the
//! CPU through the kernels compiled as C++ (`emulation.rs`): the tests check the kernels and
//! the plans against the fused CPU kernels without a GPU.

use candle_core::{Error, Result};

/// Threads per block of the kernels that index their work as one flat range.
pub(crate) const BLOCK_THREADS: usize = 256;

/// Dynamic shared memory every launch may use without opting in.
pub(crate) const DEFAULT_SHARED_BYTES: usize = 48 * 1024;

/// The most dynamic shared memory a launch opts in to (Hopper allows 227 KiB per block;
/// staying at 96 KiB keeps two blocks per multiprocessor).
pub(crate) const MAX_SHARED_BYTES: usize = 96 * 1024;

/// Threads per block at most (a CUDA limit).
const MAX_BLOCK_THREADS: usize = 1024;

/// A kernel argument.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Arg {
    /// `len` f32 elements of buffer `buffer` from element `offset`.
    Slice {
        buffer: usize,
        offset: usize,
        len: usize,
    },
    /// A null pointer (an optional output the call does not want).
    Null,
    Int(i32),
}

impl Arg {
    fn whole(buffer: usize, len: usize) -> Self {
        Self::Slice {
            buffer,
            offset: 0,
            len,
        }
    }

    fn part(buffer: usize, offset: usize, len: usize) -> Self {
        Self::Slice {
            buffer,
            offset,
            len,
        }
    }
}

/// One kernel launch.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Launch {
    pub function: &'static str,
    pub grid: (usize, usize),
    pub block: (usize, usize),
    pub shared_floats: usize,
    pub args: Vec<Arg>,
}

/// Converts a size to the `int` kernel parameters use, failing instead of wrapping.
fn int(op: &str, what: &str, value: usize) -> Result<Arg> {
    i32::try_from(value).map(Arg::Int).map_err(|_| {
        Error::Msg(format!(
            "{op}: {what} = {value} is too large for the kernel"
        ))
    })
}

/// Length of an mLSTM state record `[C (DH·DH) | n (DH) | m]`.
fn mlstm_state_len(head_dim: usize) -> usize {
    head_dim * head_dim + head_dim + 1
}

/// The chunkwise mLSTM kernels (`mlstm.cu`) on `batch_heads` independent heads.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct MlstmChunkwise {
    pub batch_heads: usize,
    pub seq_len: usize,
    pub head_dim: usize,
    pub chunk: usize,
}

/// Buffers of [`MlstmChunkwise::forward`].
pub(crate) mod mlstm_forward {
    /// `[BH, S, 3·DH]`, `[BH, S, 2]`, `[BH, SL]`: the inputs.
    pub const QKV: usize = 0;
    pub const GATES: usize = 1;
    pub const INITIAL: usize = 2;
    /// `tape_len` floats: states before every chunk and the last, then (when recording) rows.
    pub const TAPE: usize = 3;
    /// `out_len` floats: h `[BH, S, DH]`, then the final state records `[BH, SL]`.
    pub const OUT: usize = 4;
}

/// Buffers of [`MlstmChunkwise::backward`].
pub(crate) mod mlstm_backward {
    /// The gradient of the forward output (same layout).
    pub const GRAD_OUT: usize = 0;
    pub const QKV: usize = 1;
    pub const GATES: usize = 2;
    /// The recording forward pass's tape.
    pub const TAPE: usize = 3;
    /// `carries_len` floats of scratch.
    pub const CARRIES: usize = 4;
    /// `grads_len` floats: grad qkv, grad gates, grad initial state records.
    pub const OUT: usize = 5;
}

impl MlstmChunkwise {
    /// The largest chunk the kernels take: beyond it the L×L tiles stop paying for themselves.
    pub const MAX_CHUNK: usize = 64;

    /// Chunks of at most `requested` rows (a power of two no larger than [`Self::MAX_CHUNK`]),
    /// as long as every kernel's tiles fit the default shared memory. Any chunk length gives
    /// the same outputs up to rounding; only the speed differs.
    pub fn new(batch_heads: usize, seq_len: usize, head_dim: usize, requested: usize) -> Self {
        let limit = requested
            .clamp(1, Self::MAX_CHUNK)
            .min(seq_len.next_power_of_two());
        let mut plan = Self {
            batch_heads,
            seq_len,
            head_dim,
            chunk: 1 << limit.ilog2(),
        };
        while plan.chunk > 1 && plan.largest_shared_floats() * 4 > DEFAULT_SHARED_BYTES {
            plan.chunk /= 2;
        }
        plan
    }

    pub fn num_chunks(&self) -> usize {
        self.seq_len.div_ceil(self.chunk)
    }

    pub fn state_len(&self) -> usize {
        mlstm_state_len(self.head_dim)
    }

    fn states_len(&self) -> usize {
        self.batch_heads * (self.num_chunks() + 1) * self.state_len()
    }

    fn rows_len(&self) -> usize {
        self.batch_heads * self.seq_len * (self.head_dim + 2)
    }

    pub fn h_len(&self) -> usize {
        self.batch_heads * self.seq_len * self.head_dim
    }

    fn qkv_len(&self) -> usize {
        self.batch_heads * self.seq_len * 3 * self.head_dim
    }

    fn gates_len(&self) -> usize {
        self.batch_heads * self.seq_len * 2
    }

    pub fn tape_len(&self, recording: bool) -> usize {
        self.states_len() + if recording { self.rows_len() } else { 0 }
    }

    pub fn out_len(&self) -> usize {
        self.h_len() + self.batch_heads * self.state_len()
    }

    pub fn carries_len(&self) -> usize {
        self.batch_heads * self.num_chunks() * (self.head_dim * self.head_dim + self.head_dim)
    }

    pub fn grads_len(&self) -> usize {
        self.qkv_len() + self.gates_len() + self.batch_heads * self.state_len()
    }

    // Shared memory of each kernel in floats, as the kernels carve it (mlstm.cu): tiles
    // `[L, DH]` and `[L, L]` with rows padded by one float, vectors `[L]`, a few scalars.
    fn tiles(&self) -> (usize, usize) {
        let (l, d) = (self.chunk, self.head_dim);
        (l * (d + 1), l * (l + 1))
    }

    fn states_shared(&self) -> usize {
        let (rows, _) = self.tiles();
        2 * rows + 3 * self.chunk + 2
    }

    fn rows_shared(&self) -> usize {
        let (rows, square) = self.tiles();
        3 * rows + square + self.head_dim + 5 * self.chunk
    }

    fn state_grads_shared(&self) -> usize {
        let (rows, _) = self.tiles();
        2 * rows + 6 * self.chunk + 2 + BLOCK_THREADS
    }

    fn grads_shared(&self) -> usize {
        let (rows, square) = self.tiles();
        8 * rows + 3 * square + 11 * self.chunk + 4 + BLOCK_THREADS
    }

    fn largest_shared_floats(&self) -> usize {
        self.states_shared()
            .max(self.rows_shared())
            .max(self.state_grads_shared())
            .max(self.grads_shared())
    }

    /// The kernels' trailing size arguments.
    fn sizes(&self, op: &str) -> Result<[Arg; 4]> {
        Ok([
            int(op, "sequence length", self.seq_len)?,
            int(op, "head dim", self.head_dim)?,
            int(op, "chunk", self.chunk)?,
            int(op, "chunks", self.num_chunks())?,
        ])
    }

    /// The chunk-state recurrence, then every chunk's rows; rows are recorded on the tape
    /// only when `recording` (for a backward pass).
    pub fn forward(&self, op: &str, recording: bool) -> Result<Vec<Launch>> {
        use mlstm_forward::*;
        let sizes = self.sizes(op)?;
        let states = Arg::part(TAPE, 0, self.states_len());
        let rows = if recording {
            Arg::part(TAPE, self.states_len(), self.rows_len())
        } else {
            Arg::Null
        };
        let h = Arg::part(OUT, 0, self.h_len());
        let final_states = Arg::part(OUT, self.h_len(), self.batch_heads * self.state_len());
        let inputs = [
            Arg::whole(QKV, self.qkv_len()),
            Arg::whole(GATES, self.gates_len()),
        ];
        Ok(vec![
            Launch {
                function: "mlstm_chunk_states_f32",
                grid: (self.batch_heads, 1),
                block: (BLOCK_THREADS, 1),
                shared_floats: self.states_shared(),
                args: [
                    &inputs[..],
                    &[
                        Arg::whole(INITIAL, self.batch_heads * self.state_len()),
                        states,
                        final_states,
                    ],
                    &sizes,
                ]
                .concat(),
            },
            Launch {
                function: "mlstm_chunk_rows_f32",
                grid: (self.batch_heads, self.num_chunks()),
                block: (BLOCK_THREADS, 1),
                shared_floats: self.rows_shared(),
                args: [&inputs[..], &[states, h, rows], &sizes].concat(),
            },
        ])
    }

    /// The state-gradient recurrence, then every chunk's input gradients.
    pub fn backward(&self, op: &str) -> Result<Vec<Launch>> {
        use mlstm_backward::*;
        let sizes = self.sizes(op)?;
        let common = [
            Arg::whole(QKV, self.qkv_len()),
            Arg::whole(GATES, self.gates_len()),
            Arg::part(TAPE, 0, self.states_len()),
            Arg::part(TAPE, self.states_len(), self.rows_len()),
            Arg::whole(GRAD_OUT, self.out_len()),
            Arg::whole(CARRIES, self.carries_len()),
        ];
        let grad_qkv = Arg::part(OUT, 0, self.qkv_len());
        let grad_gates = Arg::part(OUT, self.qkv_len(), self.gates_len());
        let grad_initial = Arg::part(
            OUT,
            self.qkv_len() + self.gates_len(),
            self.batch_heads * self.state_len(),
        );
        Ok(vec![
            Launch {
                function: "mlstm_chunk_state_grads_f32",
                grid: (self.batch_heads, 1),
                block: (BLOCK_THREADS, 1),
                shared_floats: self.state_grads_shared(),
                args: [
                    &common[..],
                    &[grad_initial, int(op, "batch·heads", self.batch_heads)?],
                    &sizes,
                ]
                .concat(),
            },
            Launch {
                function: "mlstm_chunk_grads_f32",
                grid: (self.batch_heads, self.num_chunks()),
                block: (BLOCK_THREADS, 1),
                shared_floats: self.grads_shared(),
                args: [&common[..], &[grad_qkv, grad_gates], &sizes].concat(),
            },
        ])
    }
}

/// Buffers of [`mlstm_step`]: qkv `[BH, 3·DH]`, gates `[BH, 2]`, state records `[BH, SL]`,
/// out `[BH, DH + SL]` (h, then the new state record).
pub(crate) mod mlstm_step_buffers {
    pub const QKV: usize = 0;
    pub const GATES: usize = 1;
    pub const STATE: usize = 2;
    pub const OUT: usize = 3;
}

/// One recurrent mLSTM step of `batch_heads` heads.
pub(crate) fn mlstm_step(op: &str, batch_heads: usize, head_dim: usize) -> Result<Launch> {
    use mlstm_step_buffers::*;
    let state_len = mlstm_state_len(head_dim);
    Ok(Launch {
        function: "mlstm_step_f32",
        grid: (batch_heads, 1),
        block: (BLOCK_THREADS, 1),
        shared_floats: 2,
        args: vec![
            Arg::whole(QKV, batch_heads * 3 * head_dim),
            Arg::whole(GATES, batch_heads * 2),
            Arg::whole(STATE, batch_heads * state_len),
            Arg::whole(OUT, batch_heads * (head_dim + state_len)),
            int(op, "head dim", head_dim)?,
        ],
    })
}

/// The sLSTM scan kernels (`slstm.cu`): a block holds `rows` batch rows of one head, one
/// thread per gate unit and row.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct SlstmScan {
    pub batch: usize,
    pub seq_len: usize,
    pub heads: usize,
    pub head_dim: usize,
    rows: usize,
    weights_in_shared: bool,
}

/// Buffers of [`SlstmScan::forward`].
pub(crate) mod slstm_forward {
    /// x `[B, S, 4H]`, r_aug `[NH, DH + 1, 4, DH]`, initial state `[4, B, H]`.
    pub const X: usize = 0;
    pub const R_AUG: usize = 1;
    pub const INIT: usize = 2;
    /// `out_len` floats `[B, NH, S + 4, DH]`: h of every step, then the final h, c, n, m.
    pub const OUT: usize = 3;
    /// `tape_len` floats (only when recording).
    pub const TAPE: usize = 4;
}

/// Buffers of [`SlstmScan::backward`].
pub(crate) mod slstm_backward {
    pub const GRAD_OUT: usize = 0;
    pub const R_AUG: usize = 1;
    pub const INIT: usize = 2;
    pub const TAPE: usize = 3;
    /// `grads_len` floats: dx `[B, S, 4H]`, d initial state `[B, 4, H]`, then the weight
    /// gradient of every batch row `[B, NH, DH + 1, 4·DH]` (the caller sums over B).
    pub const OUT: usize = 4;
}

/// Per step and unit the tape holds this many values (the CPU kernel's `TAPE_VALUES`).
const SLSTM_TAPE_VALUES: usize = 7;

/// Gates per unit (i, f, z, o).
const SLSTM_GATES: usize = 4;

impl SlstmScan {
    pub fn new(
        op: &str,
        batch: usize,
        seq_len: usize,
        heads: usize,
        head_dim: usize,
    ) -> Result<Self> {
        let gates = SLSTM_GATES * head_dim;
        if gates > MAX_BLOCK_THREADS {
            return Err(Error::Msg(format!(
                "{op}: head dim {head_dim} needs {gates} threads per batch row, more than a \
                 block's {MAX_BLOCK_THREADS}; use more heads"
            )));
        }
        let mut plan = Self {
            batch,
            seq_len,
            heads,
            head_dim,
            // Enough threads per block to hide latency, blocks enough to fill the GPU.
            rows: (BLOCK_THREADS / gates).clamp(1, 8).min(batch),
            weights_in_shared: true,
        };
        if plan.shared_floats() * 4 > MAX_SHARED_BYTES {
            plan.weights_in_shared = false;
        }
        Ok(plan)
    }

    /// The same scan reading its weights from global memory, as it does when they do not fit
    /// on chip.
    #[cfg(test)]
    pub fn with_weights_in_global_memory(mut self) -> Self {
        self.weights_in_shared = false;
        self
    }

    fn hidden(&self) -> usize {
        self.heads * self.head_dim
    }

    /// Dynamic shared memory in floats, as the kernels carve it (slstm.cu).
    fn shared_floats(&self) -> usize {
        let dh = self.head_dim;
        let gates = SLSTM_GATES * dh;
        let weights = if self.weights_in_shared {
            (dh + 1) * (gates + 1)
        } else {
            0
        };
        weights + self.rows * (dh + gates)
    }

    fn x_len(&self) -> usize {
        self.batch * self.seq_len * SLSTM_GATES * self.hidden()
    }

    fn r_len(&self) -> usize {
        self.heads * (self.head_dim + 1) * SLSTM_GATES * self.head_dim
    }

    fn init_len(&self) -> usize {
        4 * self.batch * self.hidden()
    }

    pub fn out_len(&self) -> usize {
        self.batch * self.heads * (self.seq_len + 4) * self.head_dim
    }

    pub fn tape_len(&self) -> usize {
        self.batch * self.heads * self.seq_len * SLSTM_TAPE_VALUES * self.head_dim
    }

    pub fn grads_len(&self) -> usize {
        self.x_len() + self.init_len() + self.batch * self.r_len()
    }

    fn launch(&self, op: &str, function: &'static str, buffers: [Arg; 5]) -> Result<Launch> {
        let sizes = [
            int(op, "batch", self.batch)?,
            int(op, "sequence length", self.seq_len)?,
            int(op, "heads", self.heads)?,
            int(op, "head dim", self.head_dim)?,
            Arg::Int(i32::from(self.weights_in_shared)),
        ];
        Ok(Launch {
            function,
            grid: (self.batch.div_ceil(self.rows), self.heads),
            block: (SLSTM_GATES * self.head_dim, self.rows),
            shared_floats: self.shared_floats(),
            args: [&buffers[..], &sizes].concat(),
        })
    }

    /// The whole forward scan in one launch; the tape is written only when `recording`.
    pub fn forward(&self, op: &str, recording: bool) -> Result<Launch> {
        use slstm_forward::*;
        let tape = if recording {
            Arg::whole(TAPE, self.tape_len())
        } else {
            Arg::Null
        };
        self.launch(
            op,
            "slstm_scan_forward_f32",
            [
                Arg::whole(X, self.x_len()),
                Arg::whole(R_AUG, self.r_len()),
                Arg::whole(INIT, self.init_len()),
                Arg::whole(OUT, self.out_len()),
                tape,
            ],
        )
    }

    /// The whole backward scan in one launch (register accumulators for the common head dims).
    pub fn backward(&self, op: &str) -> Result<Launch> {
        use slstm_backward::*;
        let function = match self.head_dim {
            8 => "slstm_scan_backward_f32_dh8",
            16 => "slstm_scan_backward_f32_dh16",
            32 => "slstm_scan_backward_f32_dh32",
            64 => "slstm_scan_backward_f32_dh64",
            _ => "slstm_scan_backward_f32_any",
        };
        self.launch(
            op,
            function,
            [
                Arg::whole(GRAD_OUT, self.out_len()),
                Arg::whole(R_AUG, self.r_len()),
                Arg::whole(INIT, self.init_len()),
                Arg::whole(TAPE, self.tape_len()),
                Arg::whole(OUT, self.grads_len()),
            ],
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_shrink_until_every_kernel_fits_shared_memory() {
        for (head_dim, requested, expected) in [
            (16, 64, 32),
            (32, 32, 32),
            (32, 64, 32),
            (64, 64, 16),
            (128, 64, 8),
            (16, 20, 16),
            (16, 1, 1),
        ] {
            let plan = MlstmChunkwise::new(4, 1000, head_dim, requested);
            assert_eq!(plan.chunk, expected, "DH {head_dim}, requested {requested}");
            assert!(plan.largest_shared_floats() * 4 <= DEFAULT_SHARED_BYTES);
        }
        // Never longer than the sequence needs.
        assert_eq!(MlstmChunkwise::new(4, 5, 16, 64).chunk, 8);
    }

    #[test]
    fn slstm_weights_stay_on_chip_while_they_fit() {
        for head_dim in [8, 16, 32] {
            let plan = SlstmScan::new("t", 256, 96, 4, head_dim).unwrap();
            assert!(plan.weights_in_shared, "DH {head_dim}");
        }
        let wide = SlstmScan::new("t", 256, 96, 1, 128).unwrap();
        assert!(!wide.weights_in_shared);
        assert!(wide.shared_floats() * 4 <= MAX_SHARED_BYTES);
        assert!(SlstmScan::new("t", 256, 96, 1, 512).is_err());
    }
}
