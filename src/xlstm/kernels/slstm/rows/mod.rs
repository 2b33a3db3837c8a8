//! The forward scan of several batch rows of one head at once.
//!
//! One pair's scan is a chain of dependent steps: the recurrent product needs the last h, the
//! gates need the product, and an exponential, a logarithm and a second exponential lie on the
//! way to the next h. Scanning one pair at a time leaves the core waiting on that chain's
//! latency. Here K rows of one head advance together: their chains are independent, so the
//! instructions of one row fill the other rows' waits, and each load of a recurrent weight
//! serves K rows.
//!
//! Each vector implementation does the operations of `simd`'s AVX2 pair step in the same order,
//! so every path gives the same bits (tested in `fused_cpu`).

use super::NUM_GATES;
use super::simd::prefetch_gate_slots;

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;

/// One batch row of a head's scan.
pub(super) struct RowScan<'a> {
    /// The row's gate pre-activations `[S, 4H]` (all heads; this head's slots are read).
    pub x: &'a [f32],
    /// The row's initial h, c, n, m for this head, each `DH` long.
    pub initial: [&'a [f32]; 4],
    /// This pair's output block `[S + 4, DH]`: h for every step, then the final h, c, n, m.
    pub out: &'a mut [f32],
    /// This pair's tape block `[S, TAPE_VALUES, DH]`, when gradients are tracked.
    pub tape: Option<&'a mut [f32]>,
}

/// What every row group of one head shares.
#[derive(Clone, Copy)]
pub(super) struct HeadScan<'a> {
    /// The head's `[DH + 1, 4, DH]` block: recurrent rows, then the bias row.
    pub r_head: &'a [f32],
    pub head_dim: usize,
    /// `head · DH`: where this head's units start within one gate's H slots.
    pub head_offset: usize,
    pub seq_len: usize,
    /// H, the slots of one gate in a step's `[4H]` pre-activations.
    pub hidden: usize,
}

impl HeadScan<'_> {
    /// The slice lengths every row-group scan relies on (checked in debug builds).
    fn debug_check(&self, rows: &[RowScan<'_>]) {
        let dh = self.head_dim;
        debug_assert_eq!(self.r_head.len(), (dh + 1) * super::NUM_GATES * dh);
        for row in rows {
            debug_assert_eq!(row.x.len(), self.seq_len * super::NUM_GATES * self.hidden);
            debug_assert_eq!(row.out.len(), (self.seq_len + super::STATE_ROWS) * dh);
            debug_assert!(row.initial.iter().all(|s| s.len() == dh));
            debug_assert!(
                row.tape.as_ref().is_none_or(|t| {
                    t.len() == self.seq_len * super::fused_cpu::TAPE_VALUES * dh
                })
            );
        }
    }
}

/// Steps ahead whose pre-activations a row-group scan asks the cache for.
const PREFETCH_STEPS: usize = 8;

/// Asks for this head's pre-activations at step `t + PREFETCH_STEPS` of one row, if the
/// sequence has that step.
///
/// A row's steps lie `4H` floats apart and each holds this head's four gates in four separate
/// places, so one row group reads 4·K short strided streams, more than the hardware
/// prefetchers follow across page boundaries: without this, the scan waits on those loads.
#[inline(always)]
fn prefetch_ahead(x: &[f32], t: usize, head: &HeadScan<'_>) {
    let ahead = t + PREFETCH_STEPS;
    if ahead < head.seq_len {
        prefetch_gate_slots(x, ahead, head.hidden, head.head_offset, head.head_dim);
    }
}

/// A vector implementation of the row-group scan.
trait ScanRows {
    /// f32 lanes per vector: a head of DH units is V = DH / LANES vectors per gate.
    const LANES: usize;
    /// Rows per task times vectors per gate (K·V): what fits the registers.
    const ROW_VECTORS: usize;

    /// Scans K rows of one head with V vectors per gate, Q = 4·V vectors per row and step.
    /// Q is a parameter of its own because the compiler cannot size an array by 4·V: arrays
    /// sized for the largest head were zeroed by a call to memset every step (8 % of the scan
    /// at DH = 16), which also pushed the accumulators out of registers around the call.
    ///
    /// # Safety
    /// The CPU has the implementation's instructions; DH = V·LANES and Q = 4·V; the slices have
    /// the lengths [`HeadScan::debug_check`] states.
    unsafe fn scan_rows<const K: usize, const V: usize, const Q: usize>(
        rows: [&mut RowScan<'_>; K],
        head: HeadScan<'_>,
    );
}

/// Which row-group scan runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum RowGroups {
    #[cfg(target_arch = "x86_64")]
    Avx512,
    #[cfg(target_arch = "x86_64")]
    Avx2,
}

impl RowGroups {
    /// The fastest row-group scan this CPU runs for heads of `head_dim` units, if any.
    pub fn detect(head_dim: usize) -> Option<Self> {
        Self::available()
            .into_iter()
            .find(|groups| groups.fits(head_dim))
    }

    /// Every row-group scan this CPU runs, fastest first.
    pub fn available() -> Vec<Self> {
        let mut found = Vec::new();
        #[cfg(target_arch = "x86_64")]
        {
            if avx512::available() {
                found.push(RowGroups::Avx512);
            }
            if avx2::available() {
                found.push(RowGroups::Avx2);
            }
        }
        found
    }

    /// (LANES, ROW_VECTORS) of the implementation.
    fn shape(self) -> (usize, usize) {
        match self {
            #[cfg(target_arch = "x86_64")]
            RowGroups::Avx512 => (avx512::Avx512::LANES, avx512::Avx512::ROW_VECTORS),
            #[cfg(target_arch = "x86_64")]
            RowGroups::Avx2 => (avx2::Avx2::LANES, avx2::Avx2::ROW_VECTORS),
        }
    }

    /// Whether heads of `head_dim` units are 1, 2, 4 or 8 whole vectors per gate, at most
    /// ROW_VECTORS.
    pub fn fits(self, head_dim: usize) -> bool {
        let (lanes, row_vectors) = self.shape();
        let vectors = head_dim / lanes;
        head_dim.is_multiple_of(lanes) && vectors.is_power_of_two() && vectors <= row_vectors.min(8)
    }

    /// Batch rows of one head per task (at most 4).
    pub fn rows_per_task(self, head_dim: usize) -> usize {
        let (lanes, row_vectors) = self.shape();
        (row_vectors / (head_dim / lanes)).clamp(1, 4)
    }

    /// Scans one task's group of rows of one head.
    ///
    /// # Safety
    /// `self.fits(head.head_dim)` on this CPU (as [`RowGroups::detect`] or
    /// [`RowGroups::available`] found); the slices have the lengths
    /// [`HeadScan::debug_check`] states.
    pub unsafe fn scan(self, group: &mut [RowScan<'_>], head: HeadScan<'_>) {
        debug_assert!(self.fits(head.head_dim));
        head.debug_check(group);
        // SAFETY: passed on from the caller.
        unsafe {
            match self {
                #[cfg(target_arch = "x86_64")]
                RowGroups::Avx512 => scan_group::<avx512::Avx512>(group, head),
                #[cfg(target_arch = "x86_64")]
                RowGroups::Avx2 => scan_group::<avx2::Avx2>(group, head),
            }
        }
    }
}

/// # Safety
/// As [`RowGroups::scan`].
#[cfg(target_arch = "x86_64")]
unsafe fn scan_group<S: ScanRows>(group: &mut [RowScan<'_>], head: HeadScan<'_>) {
    // SAFETY: passed on from the caller.
    unsafe {
        match head.head_dim / S::LANES {
            1 => scan_in_parts::<S, 1, { NUM_GATES }>(group, head),
            2 => scan_in_parts::<S, 2, { 2 * NUM_GATES }>(group, head),
            4 => scan_in_parts::<S, 4, { 4 * NUM_GATES }>(group, head),
            8 if S::ROW_VECTORS >= 8 => scan_in_parts::<S, 8, { 8 * NUM_GATES }>(group, head),
            vectors => unreachable!("{vectors} vectors per gate do not fit a row group"),
        }
    }
}

/// Scans the group four, two or one rows at a time.
///
/// # Safety
/// As [`RowGroups::scan`].
#[cfg(target_arch = "x86_64")]
unsafe fn scan_in_parts<S: ScanRows, const V: usize, const Q: usize>(
    group: &mut [RowScan<'_>],
    head: HeadScan<'_>,
) {
    let mut rest = group;
    // SAFETY: passed on from the caller.
    unsafe {
        loop {
            rest = match rest {
                [a, b, c, d, tail @ ..] => {
                    S::scan_rows::<4, V, Q>([a, b, c, d], head);
                    tail
                }
                [a, b, tail @ ..] => {
                    S::scan_rows::<2, V, Q>([a, b], head);
                    tail
                }
                [a, tail @ ..] => {
                    S::scan_rows::<1, V, Q>([a], head);
                    tail
                }
                [] => return,
            }
        }
    }
}
