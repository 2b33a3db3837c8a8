//! Data parallelism over the batch on the CPU.
//!
//! At forecasting sizes (a few thousand tokens of 64–128 features) every candle op takes well
//! under a millisecond, so splitting each op across the cores costs about as much in
//! synchronisation as the extra cores give back. Cutting the batch into one shard per core and
//! running each shard's whole forward and backward pass on its own core keeps the cores apart
//! between ops. A loss that is a sum over windows has the sum of the shards' gradients as its
//! gradient, so training with shards follows the same trajectory as without, up to the order
//! of floating-point sums.
//!
//! On a GPU there is one shard: its kernels already fill the device.

use std::ops::Range;

use candle_core::backprop::{GradStore, with_grad_enabled};
use candle_core::{Device, Result, Tensor};
use rayon::prelude::*;

/// Fewest batch rows per shard: below this, an op's fixed cost outweighs the parallelism.
const MIN_ROWS_PER_SHARD: usize = 2;

/// How many shards a batch of `batch` rows is cut into on `device`: one per rayon thread on the
/// CPU (never fewer than two rows each), one on a GPU.
pub fn shard_count(device: &Device, batch: usize) -> usize {
    if !device.is_cpu() {
        return 1;
    }
    rayon::current_num_threads()
        .min(batch / MIN_ROWS_PER_SHARD)
        .max(1)
}

/// Contiguous row ranges that cut `batch` rows into `shards` shards (at most one per row);
/// earlier shards get the extra row when the batch does not divide evenly.
pub fn split_rows(batch: usize, shards: usize) -> Vec<Range<usize>> {
    let shards = shards.clamp(1, batch.max(1));
    let (base, extra) = (batch / shards, batch % shards);
    let mut start = 0;
    (0..shards)
        .map(|i| {
            let len = base + usize::from(i < extra);
            let range = start..start + len;
            start += len;
            range
        })
        .collect()
}

/// The shards of a batch of `batch` rows on `device`.
pub fn shard_ranges(device: &Device, batch: usize) -> Vec<Range<usize>> {
    split_rows(batch, shard_count(device, batch))
}

/// Runs `f` on every shard concurrently and returns the results in shard order. `record_ops`
/// says whether candle records the shard's ops for backpropagation. It is set inside each
/// shard's task because the switch is per thread, and a pool thread that waits inside one
/// task may run another one (say, a training shard while it serves a forecast).
fn map_shards<T, F>(shards: &[Range<usize>], record_ops: bool, f: F) -> Result<Vec<T>>
where
    T: Send,
    F: Fn(usize, Range<usize>) -> Result<T> + Sync,
{
    let run =
        |i: usize, range: &Range<usize>| with_grad_enabled(record_ops, || f(i, range.clone()));
    if shards.len() == 1 {
        // On a pool thread all the same: called from outside the pool, each op of the pass
        // would hand its parallel tasks over to the pool and wait for them (a LayerNorm of
        // one shard's rows took 65 µs that way, against 45 µs on a pool thread).
        return Ok(vec![rayon::join(|| run(0, &shards[0]), || ()).0?]);
    }
    shards
        .par_iter()
        .enumerate()
        .map(|(i, range)| run(i, range))
        .collect()
}

/// Runs an inference pass on every shard concurrently and returns the outputs in shard order.
/// No op is recorded for backpropagation: the weights are variables (so that a model can be
/// fine-tuned), and recording would keep every intermediate tensor alive and make the fused
/// kernels save their backward tapes.
pub fn infer_sharded<T, F>(shards: &[Range<usize>], f: F) -> Result<Vec<T>>
where
    T: Send,
    F: Fn(Range<usize>) -> Result<T> + Sync,
{
    map_shards(shards, false, |_, range| f(range))
}

/// [`infer_sharded`] for a pass with one output, concatenated along the batch (dim 0).
pub fn forward_sharded<F>(shards: &[Range<usize>], f: F) -> Result<Tensor>
where
    F: Fn(Range<usize>) -> Result<Tensor> + Sync,
{
    let outputs = infer_sharded(shards, f)?;
    if outputs.len() == 1 {
        return Ok(outputs.into_iter().next().expect("one shard"));
    }
    Tensor::cat(&outputs, 0)
}

/// The losses and summed gradients of a loss that is the sum of per-shard losses: `f` builds
/// shard `i`'s scalar loss (its share of the total, e.g. its error sum over the whole batch's
/// count), and each shard's backward pass runs on the shard's own thread. Gradients are added
/// in shard order, so a run is reproducible for a given shard count.
pub fn backward_sharded<F>(shards: &[Range<usize>], f: F) -> Result<(Vec<Tensor>, GradStore)>
where
    F: Fn(usize, Range<usize>) -> Result<Tensor> + Sync,
{
    let per_shard = map_shards(shards, true, |i, range| {
        let loss = f(i, range)?;
        let grads = loss.backward()?;
        Ok((loss.detach(), grads))
    })?;
    let mut losses = Vec::with_capacity(per_shard.len());
    let mut total: Option<GradStore> = None;
    for (loss, grads) in per_shard {
        losses.push(loss);
        match total.as_mut() {
            None => total = Some(grads),
            Some(sum) => sum.extend(grads)?,
        }
    }
    Ok((losses, total.expect("at least one shard")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    #[test]
    fn shards_cover_the_batch_in_order() {
        let ranges = shard_ranges(&Device::Cpu, 7);
        assert_eq!(ranges.first().unwrap().start, 0);
        assert_eq!(ranges.last().unwrap().end, 7);
        for pair in ranges.windows(2) {
            assert_eq!(pair[0].end, pair[1].start);
            assert!(pair[0].len() >= pair[1].len());
        }
        assert_eq!(shard_ranges(&Device::Cpu, 1), vec![0..1]);
        assert_eq!(split_rows(7, 3), vec![0..3, 3..5, 5..7]);
        assert_eq!(split_rows(2, 5), vec![0..1, 1..2]);
    }

    #[test]
    fn sharded_gradients_equal_the_whole_batch_gradients() -> Result<()> {
        let dev = Device::Cpu;
        let w = Var::from_tensor(&Tensor::randn(0f32, 1.0, (5, 3), &dev)?)?;
        let x = Tensor::randn(0f32, 1.0, (9, 5), &dev)?;
        let y = Tensor::randn(0f32, 1.0, (9, 3), &dev)?;
        let loss_of = |rows: Range<usize>| -> Result<Tensor> {
            let xs = x.narrow(0, rows.start, rows.len())?;
            let ys = y.narrow(0, rows.start, rows.len())?;
            (xs.matmul(w.as_tensor())?.tanh()? - ys)?.sqr()?.sum_all()? / 27.0
        };
        let whole = loss_of(0..9)?;
        let whole_grad = whole.backward()?.get(w.as_tensor()).unwrap().clone();
        let shards = vec![0..4, 4..7, 7..9];
        let (losses, grads) = backward_sharded(&shards, |_, rows| loss_of(rows))?;
        let loss_sum: f32 = losses
            .iter()
            .map(|l| l.to_scalar::<f32>())
            .sum::<Result<f32>>()?;
        assert!((loss_sum - whole.to_scalar::<f32>()?).abs() < 1e-5);
        let diff = (grads.get(w.as_tensor()).unwrap() - whole_grad)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert!(diff < 1e-5, "gradient differs by {diff}");
        let out = forward_sharded(&shards, |rows| {
            x.narrow(0, rows.start, rows.len())?
                .matmul(w.as_tensor())?
                .tanh()
        })?;
        let whole_out = x.matmul(w.as_tensor())?.tanh()?;
        assert_eq!(out.to_vec2::<f32>()?, whole_out.to_vec2::<f32>()?);
        assert!(
            whole_out.track_op(),
            "outside a shard the ops on w are recorded"
        );
        assert!(!out.track_op(), "an inference pass records no op");
        Ok(())
    }

    /// Recording is per thread, and a pool thread busy with an inference shard may pick up a
    /// training shard: `backward_sharded` must switch recording on in each of its tasks.
    #[test]
    fn training_shards_record_even_where_recording_is_off() -> Result<()> {
        let dev = Device::Cpu;
        let w = Var::from_tensor(&Tensor::randn(0f32, 1.0, (4, 2), &dev)?)?;
        let x = Tensor::randn(0f32, 1.0, (6, 4), &dev)?;
        // d Σ(x·w) / dw = Σ_rows x, the same for each output column.
        let expected = x.sum(0)?.to_vec1::<f32>()?;
        // One shard runs on the calling thread, where recording is off.
        for shards in [split_rows(6, 1), split_rows(6, 2)] {
            let (_, grads) = with_grad_enabled(false, || {
                backward_sharded(&shards, |_, rows| {
                    x.narrow(0, rows.start, rows.len())?
                        .matmul(w.as_tensor())?
                        .sum_all()
                })
            })?;
            let grad = grads.get(w.as_tensor()).expect("w has a gradient");
            for (row, want) in grad.to_vec2::<f32>()?.iter().zip(&expected) {
                for got in row {
                    assert!((got - want).abs() < 1e-5, "gradient {got}, expected {want}");
                }
            }
        }
        Ok(())
    }
}
