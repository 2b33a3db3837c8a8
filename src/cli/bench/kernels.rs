//! `xlstm-forecast bench kernels`: times the xLSTM kernels (fused vs the candle-ops reference),
//! the chunkwise kernel's peak memory against the sequence length, and the whole residual stack
//! (inference forward, one AdamW training step, recurrent step); optionally runs the official
//! PyTorch implementation (`--peer`) in the same run and prints ours/peer ratios.
//!
//! One JSON object per case with `--json`, a readable line otherwise. Memory probes run in a
//! fresh child process of this binary each, so the peak RSS of one case is not hidden by the
//! high-water mark of an earlier one.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarBuilder, VarMap};
use serde_json::{Value, json};

use crate::device::DeviceChoice;
use crate::xlstm::kernels::{conv, gate, headwise, mlstm, norm, simd, slstm};
use crate::xlstm::shards::{backward_sharded, forward_sharded, shard_count, split_rows};
use crate::xlstm::{MlstmKernel, StackState, XlstmConfig, XlstmStack};

/// Which groups of cases to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CaseGroup {
    /// Each kernel, fused vs reference, forward and forward+backward.
    Kernels,
    /// Peak memory of the mLSTM kernels' forward+backward against the sequence length.
    Memory,
    /// Each op of the sLSTM block's inference forward at one batch shard of the stack cases
    /// (the stack's embedding, heads and contexts): where the sLSTM-only forward spends its
    /// time. With `RAYON_NUM_THREADS=1`, one core's time, as each shard runs.
    Layers,
    /// The whole stack: forward, training step, recurrent step.
    Stack,
}

#[derive(Debug, clap::Args)]
pub struct KernelBenchArgs {
    /// Print one JSON object per case.
    #[arg(long)]
    pub json: bool,
    /// Timed iterations per case, at least (the candle-ops references: at most 3): every case
    /// also runs until 2 s have been timed, after at least 0.3 s of warm-up runs (the peer
    /// times itself). The median is reported.
    #[arg(long, default_value_t = 5)]
    pub iters: usize,
    /// A tiny subset at small sizes (a smoke test of every code path, seconds).
    #[arg(long)]
    pub quick: bool,
    /// Run only these groups (repeatable); all by default.
    #[arg(long = "only", value_enum)]
    pub only: Vec<CaseGroup>,
    /// Time only these kernels in the kernel group (repeatable: mlstm_parallel,
    /// mlstm_chunkwise, slstm_scan); all by default.
    #[arg(long = "kernel", value_name = "NAME")]
    pub kernels: Vec<String>,
    /// Python of a virtual environment with the official xLSTM (see
    /// ../shared/bench/setup-peer.sh): also time it on each stack case, right after ours, and
    /// print ours/peer.
    #[arg(long, value_name = "PYTHON")]
    pub peer: Option<PathBuf>,
    /// The peer benchmark script.
    #[arg(long, default_value = "../shared/bench/peer_xlstm_cpu.py")]
    pub peer_script: PathBuf,
    /// Internal: measure one memory case (`<kernel>:<seq_len>:<head_dim>:<batch>`) in this process.
    #[arg(long, hide = true)]
    pub probe_memory: Option<String>,
    /// Where the stack cases run: cpu (default), cuda or cuda:N. The kernel and memory cases
    /// compare CPU kernels and run on the CPU only.
    #[arg(long, value_name = "DEVICE", default_value = "cpu")]
    pub device: DeviceChoice,
    /// Batch size of the stack cases (default 32; the GPU benchmark uses 256).
    #[arg(long, value_name = "N")]
    pub batch: Option<usize>,
    /// Contexts of the stack cases, comma-separated (default 96,336).
    #[arg(long, value_name = "LIST", value_delimiter = ',')]
    pub contexts: Vec<usize>,
    /// Batch shards of the stack's forward and training step, each run on its own thread
    /// (src/xlstm/shards.rs). Default: what training uses, one per thread on the CPU; 1 runs
    /// the whole batch as one.
    #[arg(long, value_name = "N")]
    pub shards: Option<usize>,
    /// The mLSTM blocks' whole-sequence kernel in the stack cases: chunkwise (chunks of 64,
    /// the library default) or parallel (the quadratic form the official mLSTM layer runs).
    #[arg(long, value_enum, default_value = "chunkwise")]
    pub mlstm_kernel: StackMlstmKernel,
    /// Stack variants to run (repeatable; all by default), also for the peer.
    #[arg(long = "variant", value_enum)]
    pub variants: Vec<StackVariant>,
}

/// The benchmarked stack variants, of E = 64 and 4 blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StackVariant {
    /// xLSTM[3:1]: sLSTM at block 1 of 4.
    #[value(name = "xlstm-3-1")]
    Xlstm31,
    #[value(name = "mlstm-only")]
    MlstmOnly,
    #[value(name = "slstm-only")]
    SlstmOnly,
}

impl StackVariant {
    const ALL: [StackVariant; 3] = [Self::Xlstm31, Self::MlstmOnly, Self::SlstmOnly];

    /// The name in our JSON lines.
    fn name(self) -> &'static str {
        match self {
            Self::Xlstm31 => "xLSTM[3:1]",
            Self::MlstmOnly => "mLSTM-only",
            Self::SlstmOnly => "sLSTM-only",
        }
    }

    /// (mLSTM parts, sLSTM parts) of the block ratio.
    fn ratio(self) -> (usize, usize) {
        match self {
            Self::Xlstm31 => (3, 1),
            Self::MlstmOnly => (1, 0),
            Self::SlstmOnly => (0, 1),
        }
    }

    /// The peer script's name of the variant.
    fn peer_name(self) -> &'static str {
        match self {
            Self::Xlstm31 => "xLSTM[3:1]",
            Self::MlstmOnly => "mLSTM-only[1:0]",
            Self::SlstmOnly => "sLSTM-only[0:1]",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StackMlstmKernel {
    Chunkwise,
    Parallel,
}

/// Batch, heads and embedding of the benchmarked configuration (the forecasting default).
const BATCH: usize = 32;
const HEADS: usize = 4;
const EMBEDDING: usize = 64;
const CHUNK_SIZE: usize = mlstm::DEFAULT_CHUNK_SIZE;
/// The quadratic candle-ops reference of the parallel form keeps several [B, NH, S, S] tensors
/// for its backward (≈ 0.5 GiB each at S = 1024); it is only timed up to this length.
const PARALLEL_REFERENCE_MAX_SEQ: usize = 336;
/// Timed runs a reference kernel needs at most, besides those that fit in [`TIMED_SPAN`]: the
/// slowest references (the sLSTM one steps S times through candle ops) take seconds a run.
const REFERENCE_MAX_ITERS: usize = 3;

struct Sizes {
    batch: usize,
    seq_lens: Vec<usize>,
    head_dims: Vec<usize>,
    memory_seq_lens: Vec<usize>,
    contexts: Vec<usize>,
    step_tokens: usize,
    shards: Option<usize>,
    mlstm_kernel: MlstmKernel,
    /// The stack variants to run.
    variants: Vec<StackVariant>,
}

impl Sizes {
    fn new(quick: bool) -> Self {
        if quick {
            Sizes {
                batch: 2,
                seq_lens: vec![24],
                head_dims: vec![16],
                memory_seq_lens: vec![64],
                contexts: vec![16],
                step_tokens: 4,
                shards: None,
                mlstm_kernel: MlstmKernel::default(),
                variants: StackVariant::ALL.to_vec(),
            }
        } else {
            Sizes {
                batch: BATCH,
                seq_lens: vec![96, 336, 1024],
                head_dims: vec![16, 32],
                memory_seq_lens: vec![256, 512, 1024, 2048],
                contexts: vec![96, 336],
                step_tokens: 32,
                shards: None,
                mlstm_kernel: MlstmKernel::default(),
                variants: StackVariant::ALL.to_vec(),
            }
        }
    }
}

pub fn run(args: KernelBenchArgs) -> anyhow::Result<()> {
    if let Some(spec) = &args.probe_memory {
        return probe_memory(spec);
    }
    if args.iters == 0 {
        bail!("--iters must be at least 1");
    }
    let mut sizes = Sizes::new(args.quick);
    if let Some(batch) = args.batch {
        if batch == 0 {
            bail!("--batch must be at least 1");
        }
        sizes.batch = batch;
    }
    if !args.contexts.is_empty() {
        if args.contexts.contains(&0) {
            bail!("--contexts: every context must be at least 1");
        }
        sizes.contexts = args.contexts.clone();
    }
    if args.mlstm_kernel == StackMlstmKernel::Parallel {
        sizes.mlstm_kernel = MlstmKernel::Parallel;
    }
    if !args.variants.is_empty() {
        sizes.variants = StackVariant::ALL
            .into_iter()
            .filter(|v| args.variants.contains(v))
            .collect();
    }
    if let Some(shards) = args.shards {
        if shards == 0 {
            bail!("--shards must be at least 1");
        }
        sizes.shards = Some(shards);
    }
    let runs = if args.quick {
        Runs {
            iters: 1,
            span: Duration::ZERO,
        }
    } else {
        Runs {
            iters: args.iters,
            span: TIMED_SPAN,
        }
    };
    let wants = |g: CaseGroup| args.only.is_empty() || args.only.contains(&g);
    let device = args.device.open().context("--device")?;
    if !device.is_cpu() && (wants(CaseGroup::Kernels) || wants(CaseGroup::Memory)) {
        bail!(
            "--device {}: only the stack cases run on a device; add --only stack",
            args.device
        );
    }
    let report = Reporter { json: args.json };
    if wants(CaseGroup::Kernels) {
        let kernels = if args.kernels.is_empty() {
            Kernel::ALL.to_vec()
        } else {
            args.kernels
                .iter()
                .map(|name| Kernel::parse(name))
                .collect::<anyhow::Result<_>>()?
        };
        kernel_cases(&kernels, &sizes, runs, &report)?;
    }
    if wants(CaseGroup::Memory) {
        memory_cases(&sizes, &report)?;
    }
    if wants(CaseGroup::Layers) {
        // On a pool thread, as in the stack's shards: an op called from outside the pool
        // would time handing its tasks over to the pool as well.
        rayon::join(|| layer_cases(&sizes, runs, &report), || ()).0?;
    }
    if wants(CaseGroup::Stack) {
        let peer = args.peer.as_ref().map(|python| Peer {
            python,
            script: &args.peer_script,
        });
        stack_cases(&sizes, &device, runs, peer.as_ref(), &report)?;
    }
    Ok(())
}

struct Reporter {
    json: bool,
}

impl Reporter {
    fn emit(&self, case: &Value) {
        if self.json {
            println!("{case}");
            return;
        }
        let field = |k: &str| case.get(k).map(|v| v.to_string()).unwrap_or_default();
        let mut line = format!(
            "{:<16} {:<12} {:<16} S={:<5} B={:<3} NH={:<2} DH={:<3}",
            field("case").trim_matches('"'),
            field("variant").trim_matches('"'),
            field("mode").trim_matches('"'),
            field("seq_len"),
            field("batch"),
            field("heads"),
            field("head_dim"),
        );
        for (key, label) in [
            ("median_ms", "median ms"),
            ("reference_median_ms", "reference ms"),
            ("speedup_vs_reference", "speedup"),
            ("peak_rss_delta_bytes", "peak RSS Δ bytes"),
            ("state_bytes", "state bytes"),
            ("peer_median_ms", "peer ms"),
            ("ratio_ours_over_peer", "ours/peer"),
            ("note", "note"),
        ] {
            if let Some(v) = case.get(key) {
                line.push_str(&format!("  {label}: {v}"));
            }
        }
        println!("{line}");
    }
}

/// Warm-up before a timed case: at least one run, and runs until this long has passed. In a
/// fresh process the stack's first 0.1-0.2 s of forwards took twice their steady time (memory
/// still being faulted in), and one warm-up run left that in the first case's median
/// (BENCHMARKS.md, tenth speed pass).
const WARM_UP: Duration = Duration::from_millis(300);

/// Timed wall time every case runs for at least, besides `--iters` runs. The VMs here have slow
/// spells of a second or more: the median of 15 runs of a 10 ms case, 0.15 s in all, was the
/// spell's whenever one fell on the case, while the peer's runs of the same case span seconds.
const TIMED_SPAN: Duration = Duration::from_secs(2);

/// How many timed runs a case gets.
#[derive(Clone, Copy, Debug)]
struct Runs {
    /// At least this many.
    iters: usize,
    /// And as many as fit in this much wall time.
    span: Duration,
}

/// What the timed runs of one case measured.
struct Timed {
    median_ms: f64,
    min_ms: f64,
    runs: usize,
}

/// Times one case: the runs `runs` asks for, after the warm-up ([`WARM_UP`]).
fn time_ms(runs: Runs, mut f: impl FnMut() -> anyhow::Result<()>) -> anyhow::Result<Timed> {
    let start = Instant::now();
    loop {
        f()?;
        if start.elapsed() >= WARM_UP {
            break;
        }
    }
    let start = Instant::now();
    let mut times = Vec::with_capacity(runs.iters);
    while times.len() < runs.iters || start.elapsed() < runs.span {
        let run_start = Instant::now();
        f()?;
        times.push(run_start.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    Ok(Timed {
        median_ms: times[times.len() / 2],
        min_ms: times[0],
        runs: times.len(),
    })
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// For the layer ops, which take tens of microseconds.
fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// Random inputs of one kernel case.
enum KernelInputs {
    Mlstm {
        q: Tensor,
        k: Tensor,
        v: Tensor,
        igate: Tensor,
        fgate: Tensor,
    },
    Slstm {
        x: Tensor,
        r: Tensor,
        bias: Tensor,
    },
}

impl KernelInputs {
    /// The same values as variables, so that a pass over them records its ops for the
    /// backward pass. Made once per case: copying the inputs into fresh variables on every run
    /// would add the same time to the fused kernel and to its reference.
    fn tracked(&self) -> candle_core::Result<Self> {
        let var = |t: &Tensor| -> candle_core::Result<Tensor> {
            Ok(Var::from_tensor(t)?.as_tensor().clone())
        };
        Ok(match self {
            KernelInputs::Mlstm {
                q,
                k,
                v,
                igate,
                fgate,
            } => KernelInputs::Mlstm {
                q: var(q)?,
                k: var(k)?,
                v: var(v)?,
                igate: var(igate)?,
                fgate: var(fgate)?,
            },
            KernelInputs::Slstm { x, r, bias } => KernelInputs::Slstm {
                x: var(x)?,
                r: var(r)?,
                bias: var(bias)?,
            },
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kernel {
    MlstmParallel,
    MlstmChunkwise,
    SlstmScan,
}

impl Kernel {
    const ALL: [Kernel; 3] = [
        Kernel::MlstmParallel,
        Kernel::MlstmChunkwise,
        Kernel::SlstmScan,
    ];

    fn name(self) -> &'static str {
        match self {
            Kernel::MlstmParallel => "mlstm_parallel",
            Kernel::MlstmChunkwise => "mlstm_chunkwise",
            Kernel::SlstmScan => "slstm_scan",
        }
    }

    fn parse(name: &str) -> anyhow::Result<Self> {
        Self::ALL
            .into_iter()
            .find(|k| k.name() == name)
            .with_context(|| format!("unknown kernel {name:?}"))
    }

    fn inputs(
        self,
        batch: usize,
        seq_len: usize,
        head_dim: usize,
    ) -> candle_core::Result<KernelInputs> {
        let dev = Device::Cpu;
        Ok(match self {
            Kernel::MlstmParallel | Kernel::MlstmChunkwise => {
                let qkv = (batch, HEADS, seq_len, head_dim);
                KernelInputs::Mlstm {
                    q: Tensor::randn(0f32, 1.0, qkv, &dev)?,
                    k: Tensor::randn(0f32, 1.0, qkv, &dev)?,
                    v: Tensor::randn(0f32, 1.0, qkv, &dev)?,
                    igate: Tensor::randn(0f32, 1.0, (batch, HEADS, seq_len), &dev)?,
                    fgate: Tensor::randn(3f32, 1.0, (batch, HEADS, seq_len), &dev)?,
                }
            }
            Kernel::SlstmScan => {
                let hidden = HEADS * head_dim;
                KernelInputs::Slstm {
                    x: Tensor::randn(0f32, 1.0, (batch, seq_len, 4 * hidden), &dev)?,
                    r: Tensor::randn(
                        0f32,
                        (1.0 / head_dim as f64).sqrt() as f32,
                        (HEADS, head_dim, 4, head_dim),
                        &dev,
                    )?,
                    bias: Tensor::randn(0f32, 1.0, (HEADS, 4, head_dim), &dev)?,
                }
            }
        })
    }

    /// Runs the kernel (fused dispatch or reference) once; with `backward`, the inputs become
    /// variables and a weighted-sum loss is back-propagated to all of them.
    fn run(
        self,
        inputs: &KernelInputs,
        reference: bool,
        backward: bool,
    ) -> candle_core::Result<()> {
        let out = match inputs {
            KernelInputs::Mlstm {
                q,
                k,
                v,
                igate,
                fgate,
            } => match (self, reference) {
                (Kernel::MlstmParallel, false) => mlstm::parallel(q, k, v, igate, fgate)?,
                (Kernel::MlstmParallel, true) => mlstm::reference::parallel(q, k, v, igate, fgate)?,
                (_, false) => mlstm::chunkwise(q, k, v, igate, fgate, CHUNK_SIZE, None)?.0,
                (_, true) => {
                    mlstm::reference::chunkwise(q, k, v, igate, fgate, CHUNK_SIZE, None)?.0
                }
            },
            KernelInputs::Slstm { x, r, bias } => {
                if reference {
                    slstm::reference::scan(x, r, bias, None)?.0
                } else {
                    slstm::scan(x, r, bias, None)?.0
                }
            }
        };
        if backward {
            // A fixed non-uniform weighting so that every output element carries gradient.
            let weight = out.ones_like()?.affine(0.5, 0.25)?;
            (out * weight)?.sum_all()?.backward()?;
        } else {
            // The kernel has run once it returns (a GPU may still be busy). A reduction here
            // would time candle's strided walk over a view of the output, not the kernel: the
            // sLSTM scan's h is a narrow of its packed output, and summing it took longer than
            // the scan's forward and backward passes together.
            out.device().synchronize()?;
        }
        Ok(())
    }
}

fn kernel_cases(
    kernels: &[Kernel],
    sizes: &Sizes,
    runs: Runs,
    report: &Reporter,
) -> anyhow::Result<()> {
    for &kernel in kernels {
        for &head_dim in &sizes.head_dims {
            for &seq_len in &sizes.seq_lens {
                let untracked = kernel.inputs(sizes.batch, seq_len, head_dim)?;
                let tracked = untracked.tracked()?;
                for (mode, backward) in [("forward", false), ("forward_backward", true)] {
                    let inputs = if backward { &tracked } else { &untracked };
                    let fused = time_ms(runs, || Ok(kernel.run(inputs, false, backward)?))?;
                    let median = fused.median_ms;
                    let mut case = json!({
                        "case": kernel.name(), "mode": mode, "seq_len": seq_len, "batch": sizes.batch,
                        "heads": HEADS, "head_dim": head_dim, "median_ms": round2(median),
                        "min_ms": round2(fused.min_ms), "iters": fused.runs,
                        "threads": rayon::current_num_threads(),
                        "cpu_simd": simd::level().name(),
                    });
                    if kernel == Kernel::MlstmChunkwise {
                        case["chunk_size"] = json!(CHUNK_SIZE);
                    }
                    if kernel == Kernel::MlstmParallel && seq_len > PARALLEL_REFERENCE_MAX_SEQ {
                        case["note"] = json!(format!(
                            "reference not timed above S = {PARALLEL_REFERENCE_MAX_SEQ} (quadratic memory)"
                        ));
                    } else {
                        // Timed as ours (warm-up, then at least TIMED_SPAN): three cold runs'
                        // median moved by 40 % between runs of one build, and set whether a
                        // case near its goal passed (BENCHMARKS.md, twelfth pass).
                        let reference_runs = Runs {
                            iters: runs.iters.min(REFERENCE_MAX_ITERS),
                            span: runs.span,
                        };
                        let reference =
                            time_ms(reference_runs, || Ok(kernel.run(inputs, true, backward)?))?;
                        case["reference_median_ms"] = json!(round2(reference.median_ms));
                        case["reference_iters"] = json!(reference.runs);
                        case["speedup_vs_reference"] = json!(round2(reference.median_ms / median));
                    }
                    report.emit(&case);
                }
            }
        }
    }
    Ok(())
}

fn memory_cases(sizes: &Sizes, report: &Reporter) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("locating this binary for the memory probes")?;
    let head_dim = *sizes.head_dims.last().expect("at least one head dim");
    for kernel in [Kernel::MlstmChunkwise, Kernel::MlstmParallel] {
        // The quadratic form for contrast, up to the longest kernel-timing length.
        let max_seq = match kernel {
            Kernel::MlstmParallel => *sizes.seq_lens.last().expect("at least one sequence length"),
            _ => usize::MAX,
        };
        for &seq_len in sizes.memory_seq_lens.iter().filter(|&&s| s <= max_seq) {
            let spec = format!("{}:{seq_len}:{head_dim}:{}", kernel.name(), sizes.batch);
            let out = Command::new(&exe)
                .args(["bench", "kernels", "--probe-memory", &spec])
                .output()
                .with_context(|| format!("running the memory probe {spec}"))?;
            if !out.status.success() {
                bail!(
                    "memory probe {spec} failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            let delta: u64 = String::from_utf8_lossy(&out.stdout)
                .trim()
                .parse()
                .with_context(|| format!("memory probe {spec} printed no byte count"))?;
            report.emit(&json!({
                "case": kernel.name(), "mode": "peak_memory_forward_backward", "seq_len": seq_len,
                "batch": sizes.batch, "heads": HEADS, "head_dim": head_dim,
                "peak_rss_delta_bytes": delta,
                "input_bytes": 4 * sizes.batch * HEADS * seq_len * (3 * head_dim + 2),
            }));
        }
    }
    Ok(())
}

/// `kernel:seq_len:head_dim:batch` → prints the peak RSS growth (bytes) of one
/// forward+backward, measured from just after the inputs were made.
fn probe_memory(spec: &str) -> anyhow::Result<()> {
    let parts: Vec<&str> = spec.split(':').collect();
    let [kernel, seq_len, head_dim, batch] = parts[..] else {
        bail!("--probe-memory expects kernel:seq_len:head_dim:batch, got {spec:?}");
    };
    let kernel = Kernel::parse(kernel)?;
    let inputs = kernel
        .inputs(batch.parse()?, seq_len.parse()?, head_dim.parse()?)?
        .tracked()?;
    let before = proc_status_bytes("VmRSS")?;
    kernel.run(&inputs, false, true)?;
    let peak = proc_status_bytes("VmHWM")?;
    println!("{}", peak.saturating_sub(before));
    Ok(())
}

/// A `kB` field of /proc/self/status (Linux), in bytes.
fn proc_status_bytes(field: &str) -> anyhow::Result<u64> {
    let status =
        std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .with_context(|| format!("no {field} in /proc/self/status"))
}

fn stack_cases(
    sizes: &Sizes,
    dev: &Device,
    runs: Runs,
    peer: Option<&Peer>,
    report: &Reporter,
) -> anyhow::Result<()> {
    let device_name = match dev {
        Device::Cpu => "cpu".to_string(),
        other => format!("{other:?}"),
    };
    let shards = split_rows(
        sizes.batch,
        sizes
            .shards
            .unwrap_or_else(|| shard_count(dev, sizes.batch)),
    );
    for &context in &sizes.contexts {
        for &variant in &sizes.variants {
            let (mlstm_parts, slstm_parts) = variant.ratio();
            let mut cfg = XlstmConfig::with_ratio(EMBEDDING, 4, mlstm_parts, slstm_parts)?;
            cfg.mlstm.kernel = sizes.mlstm_kernel;
            let varmap = VarMap::new();
            let stack = XlstmStack::new(&cfg, VarBuilder::from_varmap(&varmap, DType::F32, dev))?;
            let params: usize = varmap.all_vars().iter().map(|v| v.elem_count()).sum();
            let head_dim = if cfg.num_slstm_blocks() == cfg.num_blocks {
                cfg.slstm_head_dim()
            } else {
                cfg.mlstm_head_dim()
            };
            let x = Tensor::randn(0f32, 1.0, (sizes.batch, context, EMBEDDING), dev)?;
            let target = Tensor::randn(0f32, 1.0, (sizes.batch, context, EMBEDDING), dev)?;
            let base = json!({
                "case": "stack", "variant": variant.name(), "seq_len": context, "batch": sizes.batch,
                "heads": HEADS, "head_dim": head_dim, "embedding_dim": EMBEDDING,
                "num_blocks": 4, "params": params, "threads": rayon::current_num_threads(),
                "cpu_simd": simd::level().name(), "shards": shards.len(), "device": device_name,
            });

            let forward = time_ms(runs, || {
                forward_sharded(&shards, |rows| {
                    stack.forward(&x.narrow(0, rows.start, rows.len())?)
                })?
                .sum_all()?
                .to_scalar::<f32>()?;
                Ok(())
            })?;
            let mut case = base.clone();
            case["mode"] = json!("forward");
            case["median_ms"] = json!(round2(forward.median_ms));
            case["iters"] = json!(forward.runs);
            report.emit(&case);

            let mut opt = AdamW::new(
                varmap.all_vars(),
                ParamsAdamW {
                    lr: 1e-3,
                    weight_decay: 0.01,
                    ..ParamsAdamW::default()
                },
            )?;
            let train = time_ms(runs, || {
                let cells = target.elem_count() as f64;
                let (_, grads) = backward_sharded(&shards, |_, rows| {
                    let x = x.narrow(0, rows.start, rows.len())?;
                    let target = target.narrow(0, rows.start, rows.len())?;
                    (stack.forward_t(&x, true)? - target)?.sqr()?.sum_all()? / cells
                })?;
                opt.step(&grads)?;
                // A GPU queues the step; the time is the step's, not its launch's.
                dev.synchronize()?;
                Ok(())
            })?;
            let mut case = base.clone();
            case["mode"] = json!("train_step");
            case["median_ms"] = json!(round2(train.median_ms));
            case["iters"] = json!(train.runs);
            report.emit(&case);
            // The peer runs this case right after ours: the machine's speed drifts by tens of
            // percent over minutes, and a ratio is only fair between neighbouring measurements.
            if let Some(peer) = peer {
                peer.compare(
                    sizes,
                    runs.iters,
                    variant,
                    context,
                    [forward.median_ms, train.median_ms],
                    report,
                )?;
            }

            // The recurrent step is the same for every context; measure it once per variant.
            if context == sizes.contexts[0] {
                let mut state = StackState::new(&cfg, sizes.batch, dev)?;
                let state_bytes = state_bytes(&state);
                let token = x.narrow(1, 0, 1)?;
                let mut per_step = Vec::with_capacity(sizes.step_tokens);
                for _ in 0..sizes.step_tokens {
                    let start = Instant::now();
                    stack
                        .step(&token, &mut state)?
                        .sum_all()?
                        .to_scalar::<f32>()?;
                    per_step.push(start.elapsed().as_secs_f64() * 1e3);
                }
                per_step.sort_by(f64::total_cmp);
                let mut case = base;
                case["mode"] = json!("step");
                case["seq_len"] = json!(1);
                case["steps"] = json!(sizes.step_tokens);
                case["median_ms"] = json!(round2(per_step[per_step.len() / 2]));
                case["state_bytes"] = json!(state_bytes);
                case["state_bytes_after_steps"] = json!(self::state_bytes(&state));
                report.emit(&case);
            }
        }
    }
    Ok(())
}

/// One op of [`layer_cases`]: its name and a run of it.
type LayerOp<'a> = (
    &'static str,
    Box<dyn Fn() -> candle_core::Result<Tensor> + 'a>,
);

/// The sLSTM block's ops, forward, on one shard of the stack cases' batch: the rows a core
/// runs in the stack's inference forward.
fn layer_cases(sizes: &Sizes, runs: Runs, report: &Reporter) -> anyhow::Result<()> {
    let dev = Device::Cpu;
    let cfg = XlstmConfig::with_ratio(EMBEDDING, 4, 0, 1)?;
    let (e, ffn) = (EMBEDDING, cfg.ffn_dim());
    let dh = cfg.slstm_head_dim();
    let rows = split_rows(sizes.batch, shard_count(&dev, sizes.batch))[0].len();
    let randn = |shape: &[usize], std: f64| Tensor::randn(0f32, std as f32, shape, &dev);
    let scale = randn(&[e], 1.0)?;
    let conv_weight = randn(&[e, 4], 0.5)?;
    let conv_bias = randn(&[e], 0.1)?;
    let gate_weight = randn(&[HEADS, dh, dh], (1.0 / dh as f64).sqrt())?;
    let r = randn(&[HEADS, dh, 4, dh], (1.0 / dh as f64).sqrt())?;
    let bias = randn(&[HEADS, 4, dh], 1.0)?;
    let proj_up = randn(&[2 * ffn, e], (1.0 / e as f64).sqrt())?;
    let proj_down = randn(&[e, ffn], (1.0 / ffn as f64).sqrt())?;
    for &context in &sizes.contexts {
        let x = randn(&[rows, context, e], 1.0)?;
        let gates = randn(&[rows, context, 4 * e], 1.0)?;
        let h = randn(&[rows, HEADS, context, dh], 1.0)?;
        let up = randn(&[rows, context, 2 * ffn], 1.0)?;
        let hidden = randn(&[rows, context, ffn], 1.0)?;
        let flat = |t: &Tensor| t.reshape(((), t.dim(2)?));
        let ops: [LayerOp; 9] = [
            (
                "layer_norm",
                Box::new(|| norm::layer_norm(&x, &scale, None, 1e-5)),
            ),
            (
                "causal_conv_silu",
                Box::new(|| conv::causal_conv_silu(&x, &conv_weight, &conv_bias, None)),
            ),
            (
                "headwise_gates",
                Box::new(|| {
                    let w = [&gate_weight; 4];
                    headwise::headwise_linear_side_by_side([&x, &x], &w, 2)
                }),
            ),
            (
                "slstm_scan",
                Box::new(|| Ok(slstm::scan(&gates, &r, &bias, None)?.0)),
            ),
            (
                "multi_head_layer_norm",
                Box::new(|| norm::multi_head_layer_norm(&h, &scale, 1e-5)),
            ),
            ("residual_add", Box::new(|| &x + &x)),
            ("ffn_proj_up", Box::new(|| flat(&x)?.matmul(&proj_up.t()?))),
            ("gelu_gated", Box::new(|| gate::gelu_gated(&up))),
            (
                "ffn_proj_down",
                Box::new(|| flat(&hidden)?.matmul(&proj_down.t()?)),
            ),
        ];
        for (op, run) in ops {
            let timed = time_ms(runs, || {
                run()?;
                Ok(())
            })?;
            report.emit(&json!({
                "case": "layer", "op": op, "mode": "forward", "seq_len": context, "batch": rows,
                "heads": HEADS, "head_dim": dh, "embedding_dim": e, "ffn_dim": ffn,
                "iters": timed.runs, "threads": rayon::current_num_threads(),
                "median_ms": round3(timed.median_ms), "min_ms": round3(timed.min_ms),
            }));
        }
    }
    Ok(())
}

/// Bytes of every tensor the recurrent state holds (constant in the number of steps taken).
fn state_bytes(state: &StackState) -> usize {
    use crate::xlstm::stack::BlockState;
    let t = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
    state
        .blocks
        .iter()
        .map(|b| match b {
            BlockState::Mlstm(s) => t(&s.conv) + t(&s.cell.c) + t(&s.cell.n) + t(&s.cell.m),
            BlockState::Slstm(s) => {
                s.conv.as_ref().map_or(0, t)
                    + t(&s.cell.h)
                    + t(&s.cell.c)
                    + t(&s.cell.n)
                    + t(&s.cell.m)
            }
        })
        .sum()
}

/// The official implementation (`../shared/bench/setup-peer.sh`) run by its benchmark script.
struct Peer<'a> {
    python: &'a PathBuf,
    script: &'a PathBuf,
}

impl Peer<'_> {
    /// Runs one stack case on the peer and prints ours/peer for
    /// the forward and the training step (`ours_ms`, in that order).
    fn compare(
        &self,
        sizes: &Sizes,
        iters: usize,
        variant: StackVariant,
        context: usize,
        ours_ms: [f64; 2],
        report: &Reporter,
    ) -> anyhow::Result<()> {
        let peer_variant = variant.peer_name();
        let out = Command::new(self.python)
            .arg(self.script)
            .args(["--one", peer_variant, &context.to_string()])
            .args(["--iters", &iters.to_string()])
            .args(["--batch", &sizes.batch.to_string()])
            .args(["--threads", &rayon::current_num_threads().to_string()])
            .output()
            .with_context(|| {
                format!(
                    "running the peer benchmark {} {}",
                    self.python.display(),
                    self.script.display()
                )
            })?;
        if !out.status.success() {
            bail!(
                "peer benchmark failed on {peer_variant} at context {context}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let stdout = String::from_utf8_lossy(&out.stdout);
        let line = stdout.lines().last().context("the peer printed nothing")?;
        let peer: Value =
            serde_json::from_str(line).with_context(|| format!("peer printed {line:?}"))?;
        for ((mode, peer_key), ours_ms) in
            [("forward", "forward_nograd"), ("train_step", "train_step")]
                .into_iter()
                .zip(ours_ms)
        {
            let peer_ms = peer[peer_key]["median_ms"]
                .as_f64()
                .with_context(|| format!("peer line without {peer_key}.median_ms: {line}"))?;
            report.emit(&json!({
                "case": "stack_vs_peer", "variant": variant.name(), "seq_len": context, "batch": sizes.batch,
                "heads": HEADS, "mode": mode, "median_ms": round2(ours_ms), "peer_median_ms": peer_ms,
                "ratio_ours_over_peer": (ours_ms / peer_ms * 1000.0).round() / 1000.0,
                "peer_params": peer["params"], "peer_torch": peer["torch"],
            }));
        }
        Ok(())
    }
}
