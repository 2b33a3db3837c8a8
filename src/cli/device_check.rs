//! `xlstm-forecast device-check`: the kernels on a device against the fused CPU kernels, on the
//! same inputs: outputs, final states and gradients of the mLSTM (chunkwise, parallel, step),
//! the sLSTM scan and the whole stack. One line per case (JSON with `--json`) with the largest
//! error relative to the largest CPU value of each compared tensor; exits non-zero when a case
//! exceeds its tolerance. On CUDA the kernel cases run again with bf16 inputs, against the CPU
//! in f32 on the same (bf16-rounded) values. This is the parity check `scripts/gpu-check.sh` runs on a GPU
//! machine, where there is no cargo; on `--device cpu` it compares the CPU with itself.

use std::collections::HashMap;

use anyhow::{Context, bail};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use serde_json::json;

use crate::device::DeviceChoice;
use crate::xlstm::kernels::{mlstm, slstm};
use crate::xlstm::{XlstmConfig, XlstmStack};

/// Largest error allowed relative to the largest CPU value: f32 sums in another order.
const F32_TOLERANCE: f32 = 1e-4;
/// The same for bf16 inputs: the kernels compute in f32, but h and the input gradients come
/// back rounded to bf16 (8 significant bits, a relative step of 2⁻⁸ ≈ 3.9e-3).
const BF16_TOLERANCE: f32 = 1e-2;

#[derive(Debug, clap::Args)]
pub struct DeviceCheckArgs {
    /// The device to check: cuda, cuda:N (or cpu, which compares the CPU with itself).
    #[arg(long, value_name = "DEVICE", default_value = "cuda")]
    pub device: DeviceChoice,
    /// One JSON object per case.
    #[arg(long)]
    pub json: bool,
    /// Small shapes only (a smoke test of the command).
    #[arg(long)]
    pub quick: bool,
}

/// The tensors a case compares, by name, computed on one device.
type Outputs = Vec<(&'static str, Tensor)>;

pub fn run(args: DeviceCheckArgs) -> anyhow::Result<()> {
    let device = args.device.open().context("--device")?;
    // bf16 inputs exist on CUDA only; on the CPU both sides would compute in f32 anyway.
    let dtypes: &[DType] = if device.is_cuda() {
        &[DType::F32, DType::BF16]
    } else {
        &[DType::F32]
    };
    let (mut cases, mut failed) = (0, 0);
    for case in cases_for(args.quick)? {
        for &dtype in dtypes {
            if dtype == DType::BF16 && !case.bf16 {
                continue;
            }
            let bf16 = dtype == DType::BF16;
            let cpu = Inputs::new(&Device::Cpu, DType::F32, bf16);
            let on_cpu = (case.run)(&cpu).with_context(|| format!("{} on the CPU", case.name))?;
            let on_device = (case.run)(&Inputs::new(&device, dtype, bf16))
                .with_context(|| format!("{} {dtype:?} on {device:?}", case.name))?;
            let tolerance = if bf16 { BF16_TOLERANCE } else { F32_TOLERANCE };
            let mut worst = 0f32;
            let mut errors = serde_json::Map::new();
            for ((name, cpu), (_, dev)) in on_cpu.iter().zip(&on_device) {
                let error = relative_error(cpu, dev)?;
                worst = if error.is_nan() {
                    error
                } else {
                    worst.max(error)
                };
                errors.insert(name.to_string(), json!(error));
            }
            let pass = worst <= tolerance;
            cases += 1;
            failed += usize::from(!pass);
            let dtype_name = format!("{dtype:?}").to_lowercase();
            if args.json {
                println!(
                    "{}",
                    json!({"case": case.name, "shape": case.shape, "dtype": dtype_name,
                           "device": args.device.to_string(), "max_rel_err": worst,
                           "tolerance": tolerance, "errors": errors, "pass": pass})
                );
            } else {
                println!(
                    "{} {:<16} {:<24} {dtype_name:<5} max rel err {worst:.2e}",
                    if pass { "PASS" } else { "FAIL" },
                    case.name,
                    case.shape
                );
            }
        }
    }
    if failed > 0 {
        bail!("{failed} of {cases} parity cases exceed their tolerance");
    }
    Ok(())
}

/// max |device − cpu| / max |cpu| over the tensor (NaN when either holds a NaN).
fn relative_error(cpu: &Tensor, device: &Tensor) -> anyhow::Result<f32> {
    let values = |t: &Tensor| -> anyhow::Result<Vec<f32>> {
        Ok(t.to_device(&Device::Cpu)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?)
    };
    let (cpu, device) = (values(cpu)?, values(device)?);
    if cpu.len() != device.len() {
        bail!(
            "{} values on the CPU, {} on the device",
            cpu.len(),
            device.len()
        );
    }
    let scale = cpu.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-12);
    let mut worst = 0f32;
    for (c, d) in cpu.iter().zip(&device) {
        let error = (c - d).abs();
        if error.is_nan() {
            return Ok(f32::NAN);
        }
        worst = worst.max(error);
    }
    Ok(worst / scale)
}

/// Runs a case's computation on one side of the comparison.
type CaseRun = Box<dyn Fn(&Inputs) -> anyhow::Result<Outputs>>;

struct Case {
    name: &'static str,
    shape: String,
    /// Whether the case also runs with bf16 inputs (on CUDA).
    bf16: bool,
    run: CaseRun,
}

/// A case's inputs on one side of the comparison: reproducible values made on the CPU from a
/// seed, rounded to bf16 values when the case runs in bf16 (on both sides, so that both start
/// from the same numbers), then moved to the side's device in the side's dtype.
struct Inputs {
    device: Device,
    dtype: DType,
    round_to_bf16: bool,
}

impl Inputs {
    fn new(device: &Device, dtype: DType, round_to_bf16: bool) -> Self {
        Self {
            device: device.clone(),
            dtype,
            round_to_bf16,
        }
    }

    /// An input of a kernel, in the side's dtype.
    fn var(&self, seed: u64, shape: &[usize], offset: f32, scale: f32) -> anyhow::Result<Var> {
        self.make(seed, shape, offset, scale, self.dtype)
    }

    /// A recurrent state: always f32.
    fn state(&self, seed: u64, shape: &[usize], offset: f32, scale: f32) -> anyhow::Result<Var> {
        self.make(seed, shape, offset, scale, DType::F32)
    }

    fn make(
        &self,
        seed: u64,
        shape: &[usize],
        offset: f32,
        scale: f32,
        dtype: DType,
    ) -> anyhow::Result<Var> {
        let len: usize = shape.iter().product();
        let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let values: Vec<f32> = (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                offset + scale * (2.0 * ((state >> 40) as f32 / (1u64 << 24) as f32) - 1.0)
            })
            .collect();
        let mut t = Tensor::from_vec(values, shape, &Device::Cpu)?;
        if self.round_to_bf16 {
            t = t.to_dtype(DType::BF16)?.to_dtype(DType::F32)?;
        }
        Ok(Var::from_tensor(
            &t.to_dtype(dtype)?.to_device(&self.device)?,
        )?)
    }

    /// Σ t ⊙ w with fixed weights w: a loss whose gradient reaches every element of t.
    fn weighted_sum(&self, t: &Tensor, seed: u64) -> anyhow::Result<Tensor> {
        let weights = self.make(seed, t.dims(), 0.0, 1.0, t.dtype())?;
        Ok(t.mul(weights.as_tensor())?
            .to_dtype(DType::F32)?
            .sum_all()?)
    }
}

/// Embedding of the stack cases (the benchmarked configuration).
const STACK_EMBEDDING: usize = 64;

fn cases_for(quick: bool) -> anyhow::Result<Vec<Case>> {
    let mut cases = Vec::new();
    let chunkwise_shapes: &[(usize, usize, usize, usize)] = if quick {
        &[(2, 2, 13, 8)]
    } else {
        &[
            (4, 4, 1, 16),
            (4, 4, 100, 16),
            (8, 4, 336, 32),
            (2, 4, 1024, 32),
            (2, 2, 70, 64),
        ]
    };
    for &(batch, heads, seq_len, head_dim) in chunkwise_shapes {
        cases.push(Case {
            name: "mlstm_chunkwise",
            shape: format!("B{batch} NH{heads} S{seq_len} DH{head_dim}"),
            bf16: true,
            run: Box::new(move |inputs| mlstm_chunkwise(inputs, batch, heads, seq_len, head_dim)),
        });
    }
    let parallel_shapes: &[(usize, usize, usize, usize)] = if quick {
        &[(2, 2, 9, 8)]
    } else {
        &[(8, 4, 96, 32), (4, 4, 336, 16)]
    };
    for &(batch, heads, seq_len, head_dim) in parallel_shapes {
        cases.push(Case {
            name: "mlstm_parallel",
            shape: format!("B{batch} NH{heads} S{seq_len} DH{head_dim}"),
            bf16: true,
            run: Box::new(move |inputs| mlstm_parallel(inputs, batch, heads, seq_len, head_dim)),
        });
    }
    cases.push(Case {
        name: "mlstm_step",
        shape: "B8 NH4 DH32".into(),
        bf16: true,
        run: Box::new(|inputs| mlstm_step(inputs, 8, 4, 32)),
    });
    let scan_shapes: &[(usize, usize, usize, usize)] = if quick {
        &[(3, 5, 2, 8)]
    } else {
        &[
            (16, 1, 4, 16),
            (32, 96, 4, 16),
            (16, 200, 2, 32),
            (8, 50, 2, 6),
            (4, 30, 1, 96),
        ]
    };
    for &(batch, seq_len, heads, head_dim) in scan_shapes {
        cases.push(Case {
            name: "slstm_scan",
            shape: format!("B{batch} S{seq_len} NH{heads} DH{head_dim}"),
            bf16: true,
            run: Box::new(move |inputs| slstm_scan(inputs, batch, seq_len, heads, head_dim)),
        });
    }
    for (variant, mlstm_parts, slstm_parts) in [("xLSTM[3:1]", 3, 1), ("mLSTM-only", 1, 0)] {
        let (batch, context) = if quick { (2, 12) } else { (16, 96) };
        let cfg = XlstmConfig::with_ratio(STACK_EMBEDDING, 4, mlstm_parts, slstm_parts)?;
        // One initialisation, on the CPU, copied to each device.
        let varmap = VarMap::new();
        XlstmStack::new(
            &cfg,
            VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu),
        )?;
        let weights: HashMap<String, Tensor> = varmap
            .data()
            .lock()
            .expect("var map lock")
            .iter()
            .map(|(name, var)| (name.clone(), var.as_tensor().clone()))
            .collect();
        cases.push(Case {
            name: "stack",
            shape: format!("{variant} B{batch} S{context}"),
            bf16: false,
            run: Box::new(move |inputs| stack(inputs, &cfg, &weights, batch, context)),
        });
    }
    Ok(cases)
}

fn gradients(
    loss: &Tensor,
    vars: &[(&'static str, &Var)],
) -> anyhow::Result<Vec<(&'static str, Tensor)>> {
    let grads = loss.backward()?;
    vars.iter()
        .map(|(name, var)| {
            let grad = grads
                .get(var)
                .with_context(|| format!("no gradient for {name}"))?;
            Ok((*name, grad.clone()))
        })
        .collect()
}

fn mlstm_chunkwise(
    inputs: &Inputs,
    batch: usize,
    heads: usize,
    seq_len: usize,
    d: usize,
) -> anyhow::Result<Outputs> {
    let qkv = inputs.var(1, &[batch, heads, seq_len, 3 * d], 0.0, 1.0)?;
    let igate = inputs.var(2, &[batch, heads, seq_len, 1], 0.0, 3.0)?;
    let fgate = inputs.var(3, &[batch, heads, seq_len, 1], 2.0, 3.0)?;
    let gates = Tensor::cat(&[igate.as_tensor(), fgate.as_tensor()], 3)?;
    let c = inputs.state(4, &[batch, heads, d, d], 0.0, 0.5)?;
    let n = inputs.state(5, &[batch, heads, d], 0.5, 0.5)?;
    let m = inputs.state(6, &[batch, heads], 0.0, 1.0)?;
    let initial = mlstm::MlstmState {
        c: c.as_tensor().clone(),
        n: n.as_tensor().clone(),
        m: m.as_tensor().clone(),
    };
    let (h, last) = mlstm::chunkwise_packed(qkv.as_tensor(), &gates, 32, Some(&initial))?;
    let loss = ((inputs.weighted_sum(&h, 7)? + inputs.weighted_sum(&last.c, 8)?)?
        + inputs.weighted_sum(&last.n, 9)?)?;
    let mut outputs = vec![
        ("h", h),
        ("final_c", last.c),
        ("final_n", last.n),
        ("final_m", last.m),
    ];
    outputs.extend(gradients(
        &loss,
        &[
            ("grad_qkv", &qkv),
            ("grad_igate", &igate),
            ("grad_fgate", &fgate),
            ("grad_c0", &c),
            ("grad_n0", &n),
            ("grad_m0", &m),
        ],
    )?);
    Ok(outputs)
}

fn mlstm_parallel(
    inputs: &Inputs,
    batch: usize,
    heads: usize,
    seq_len: usize,
    d: usize,
) -> anyhow::Result<Outputs> {
    let qkv = inputs.var(11, &[batch, heads, seq_len, 3 * d], 0.0, 1.0)?;
    let gates = inputs.var(12, &[batch, heads, seq_len, 2], 0.0, 3.0)?;
    let h = mlstm::parallel_packed(qkv.as_tensor(), gates.as_tensor())?;
    let loss = inputs.weighted_sum(&h, 13)?;
    let mut outputs = vec![("h", h)];
    outputs.extend(gradients(
        &loss,
        &[("grad_qkv", &qkv), ("grad_gates", &gates)],
    )?);
    Ok(outputs)
}

fn mlstm_step(inputs: &Inputs, batch: usize, heads: usize, d: usize) -> anyhow::Result<Outputs> {
    let part = |seed| inputs.var(seed, &[batch, heads, d], 0.0, 1.0);
    let (q, k, v) = (part(21)?, part(22)?, part(23)?);
    let igate = inputs.var(24, &[batch, heads], 0.0, 3.0)?;
    let fgate = inputs.var(25, &[batch, heads], 2.0, 3.0)?;
    let state = mlstm::MlstmState {
        c: inputs
            .state(26, &[batch, heads, d, d], 0.0, 0.5)?
            .as_tensor()
            .clone(),
        n: inputs
            .state(27, &[batch, heads, d], 0.5, 0.5)?
            .as_tensor()
            .clone(),
        m: inputs
            .state(28, &[batch, heads], 0.0, 1.0)?
            .as_tensor()
            .clone(),
    };
    let (h, next) = mlstm::step(
        q.as_tensor(),
        k.as_tensor(),
        v.as_tensor(),
        igate.as_tensor(),
        fgate.as_tensor(),
        &state,
    )?;
    Ok(vec![("h", h), ("c", next.c), ("n", next.n), ("m", next.m)])
}

fn slstm_scan(
    inputs: &Inputs,
    batch: usize,
    seq_len: usize,
    heads: usize,
    dh: usize,
) -> anyhow::Result<Outputs> {
    let hidden = heads * dh;
    let x = inputs.var(31, &[batch, seq_len, 4 * hidden], 0.0, 2.0)?;
    let r = inputs.var(32, &[heads, dh, 4, dh], 0.0, 0.5)?;
    let bias = inputs.var(33, &[heads, 4, dh], 0.0, 1.0)?;
    let h0 = inputs.state(34, &[batch, hidden], 0.0, 0.5)?;
    let c0 = inputs.state(35, &[batch, hidden], 0.0, 0.5)?;
    let n0 = inputs.state(36, &[batch, hidden], 1.0, 0.5)?;
    let m0 = inputs.state(37, &[batch, hidden], 0.0, 1.0)?;
    let initial = slstm::SlstmState {
        h: h0.as_tensor().clone(),
        c: c0.as_tensor().clone(),
        n: n0.as_tensor().clone(),
        m: m0.as_tensor().clone(),
    };
    let (h, last) = slstm::scan(
        x.as_tensor(),
        r.as_tensor(),
        bias.as_tensor(),
        Some(&initial),
    )?;
    let mut loss = inputs.weighted_sum(&h, 38)?;
    for (seed, state) in [(39, &last.h), (40, &last.c), (41, &last.n)] {
        loss = (loss + inputs.weighted_sum(state, seed)?)?;
    }
    let mut outputs = vec![
        ("h", h),
        ("final_h", last.h),
        ("final_c", last.c),
        ("final_n", last.n),
        ("final_m", last.m),
    ];
    outputs.extend(gradients(
        &loss,
        &[
            ("grad_x", &x),
            ("grad_r", &r),
            ("grad_bias", &bias),
            ("grad_h0", &h0),
            ("grad_c0", &c0),
            ("grad_n0", &n0),
            ("grad_m0", &m0),
        ],
    )?);
    Ok(outputs)
}

/// The residual stack with the same weights on both devices: its output and the gradient of a
/// loss on it with respect to the input.
fn stack(
    inputs: &Inputs,
    cfg: &XlstmConfig,
    weights: &HashMap<String, Tensor>,
    batch: usize,
    context: usize,
) -> anyhow::Result<Outputs> {
    let on_device = weights
        .iter()
        .map(|(name, w)| Ok((name.clone(), w.to_device(&inputs.device)?)))
        .collect::<anyhow::Result<HashMap<_, _>>>()?;
    let stack = XlstmStack::new(
        cfg,
        VarBuilder::from_tensors(on_device, DType::F32, &inputs.device),
    )?;
    let x = inputs.var(51, &[batch, context, STACK_EMBEDDING], 0.0, 1.0)?;
    let y = stack.forward(x.as_tensor())?;
    let loss = inputs.weighted_sum(&y, 52)?;
    let mut outputs = vec![("y", y)];
    outputs.extend(gradients(&loss, &[("grad_x", &x)])?);
    Ok(outputs)
}
