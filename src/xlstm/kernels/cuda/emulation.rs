//! Test-only: the CUDA kernels run on the CPU. `emulation.cpp` compiles the `.cu` files as C++
//! (one OS thread per CUDA thread, a barrier for `__syncthreads`, NaN-filled shared memory);
//! the tests here run the same launch plans the GPU path runs and compare every output and
//! gradient with the fused CPU kernels. This checks kernel logic and plans on machines without
//! a GPU; `scripts/gpu-check.sh` checks the real thing on one.

use std::ffi::{CString, c_void};
use std::path::Path;
use std::process::Command;
use std::sync::OnceLock;

use candle_core::{DType, Device, Tensor, Var};

use super::plan::{Arg, Launch, MlstmChunkwise, SlstmScan, mlstm_step};
use crate::xlstm::kernels::{mlstm, slstm};

type LaunchFn = unsafe extern "C" fn(
    *const std::ffi::c_char,
    u32,
    u32,
    u32,
    u32,
    usize,
    *mut *mut c_void,
) -> i32;

struct Emulator {
    library: libloading::Library,
    _dir: tempfile::TempDir,
}

/// Compiles the emulation once per test process (g++ with C++20, as CI has).
fn emulator() -> &'static Emulator {
    static EMULATOR: OnceLock<Emulator> = OnceLock::new();
    EMULATOR.get_or_init(|| {
        let sources = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/xlstm/kernels/cuda");
        let dir = tempfile::tempdir().expect("temporary directory");
        let library = dir.path().join("libxlstm_cuda_emulation.so");
        let output = Command::new("g++")
            .args(["-std=c++20", "-O2", "-pthread", "-shared", "-fPIC"])
            .arg("-I")
            .arg(&sources)
            .arg(sources.join("emulation.cpp"))
            .arg("-o")
            .arg(&library)
            .output()
            .expect("g++ runs (the CUDA kernel tests compile them as C++)");
        assert!(
            output.status.success(),
            "g++ failed on the CUDA kernels:\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        // SAFETY: the library only defines functions; loading it runs no initialiser of ours.
        let library = unsafe { libloading::Library::new(&library) }.expect("load the emulation");
        Emulator { library, _dir: dir }
    })
}

impl Emulator {
    /// Runs `launches` in order on `buffers` (indexed as the plan's buffers).
    fn run(&self, launches: &[Launch], buffers: &mut [Vec<f32>]) {
        // SAFETY: the symbol has this signature (emulation.cpp).
        let launch_fn = unsafe { self.library.get::<LaunchFn>(b"xlstm_emulated_launch") }
            .expect("emulation entry point");
        for launch in launches {
            let ints: Vec<i32> = launch
                .args
                .iter()
                .map(|arg| match arg {
                    Arg::Int(value) => *value,
                    _ => 0,
                })
                .collect();
            let mut args: Vec<*mut c_void> = launch
                .args
                .iter()
                .zip(&ints)
                .map(|(arg, int)| match *arg {
                    Arg::Slice {
                        buffer,
                        offset,
                        len,
                    } => {
                        let data = &mut buffers[buffer];
                        assert!(
                            offset + len <= data.len(),
                            "{}: argument slice {offset}..{} of buffer {buffer} ({} floats)",
                            launch.function,
                            offset + len,
                            data.len()
                        );
                        // SAFETY: in bounds, checked above.
                        unsafe { data.as_mut_ptr().add(offset) as *mut c_void }
                    }
                    Arg::Null => std::ptr::null_mut(),
                    Arg::Int(_) => int as *const i32 as *mut c_void,
                })
                .collect();
            let name = CString::new(launch.function).unwrap();
            // SAFETY: `args` follows the kernel's parameter order with live buffers of the
            // lengths the plan gives, as `xlstm_emulated_launch` expects.
            let status = unsafe {
                launch_fn(
                    name.as_ptr(),
                    launch.grid.0 as u32,
                    launch.grid.1 as u32,
                    launch.block.0 as u32,
                    launch.block.1 as u32,
                    launch.shared_floats,
                    args.as_mut_ptr(),
                )
            };
            assert_eq!(status, 0, "unknown kernel {}", launch.function);
        }
    }
}

/// Reproducible values uniform in [offset − scale, offset + scale] (splitmix64).
fn values(seed: u64, len: usize, offset: f32, scale: f32) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
    (0..len)
        .map(|_| {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            let unit = (z >> 40) as f32 / (1u64 << 24) as f32;
            offset + scale * (2.0 * unit - 1.0)
        })
        .collect()
}

fn nan(len: usize) -> Vec<f32> {
    vec![f32::NAN; len]
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// Every element within `1e-4·max|want| + 1e-4·|want|` (f32 sums in another order).
fn assert_close(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let scale = want.iter().fold(0f32, |m, w| m.max(w.abs())).max(1e-6);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let tolerance = 1e-4 * scale + 1e-4 * w.abs();
        assert!(
            (g - w).abs() <= tolerance,
            "{what}[{i}]: emulated CUDA {g}, fused CPU {w} (tolerance {tolerance:.2e})"
        );
    }
}

fn tensor(values: Vec<f32>, shape: &[usize]) -> Tensor {
    Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
}

/// Chunkwise mLSTM from a random initial state: forward outputs, final state and every
/// gradient (of a loss on h and the final C and n) against the fused CPU kernel.
fn check_mlstm_chunkwise(batch: usize, heads: usize, seq_len: usize, d: usize, chunk: usize) {
    let bh = batch * heads;
    let seed = (batch * 1000 + seq_len * 10 + d + chunk) as u64;
    let qkv = Var::from_tensor(&tensor(
        values(seed, bh * seq_len * 3 * d, 0.0, 1.0),
        &[batch, heads, seq_len, 3 * d],
    ))
    .unwrap();
    let igate = values(seed + 1, bh * seq_len, 0.0, 3.0);
    let fgate = values(seed + 2, bh * seq_len, 2.0, 3.0);
    let gates_data: Vec<f32> = igate
        .iter()
        .zip(&fgate)
        .flat_map(|(i, f)| [*i, *f])
        .collect();
    let gates = Var::from_tensor(&tensor(gates_data, &[batch, heads, seq_len, 2])).unwrap();
    let c0 = Var::from_tensor(&tensor(
        values(seed + 3, bh * d * d, 0.0, 0.5),
        &[batch, heads, d, d],
    ))
    .unwrap();
    let n0 = Var::from_tensor(&tensor(
        values(seed + 4, bh * d, 0.5, 0.5),
        &[batch, heads, d],
    ))
    .unwrap();
    let m0 = Var::from_tensor(&tensor(values(seed + 5, bh, 0.0, 1.0), &[batch, heads])).unwrap();
    let initial = mlstm::MlstmState {
        c: c0.as_tensor().clone(),
        n: n0.as_tensor().clone(),
        m: m0.as_tensor().clone(),
    };
    let (h, last) =
        mlstm::chunkwise_packed(qkv.as_tensor(), gates.as_tensor(), chunk, Some(&initial)).unwrap();
    let wh = values(seed + 6, bh * seq_len * d, 0.0, 1.0);
    let wc = values(seed + 7, bh * d * d, 0.0, 1.0);
    let wn = values(seed + 8, bh * d, 0.0, 1.0);
    let loss = ((h
        .mul(&tensor(wh.clone(), h.dims()))
        .unwrap()
        .sum_all()
        .unwrap()
        + last
            .c
            .mul(&tensor(wc.clone(), last.c.dims()))
            .unwrap()
            .sum_all()
            .unwrap())
    .unwrap()
        + last
            .n
            .mul(&tensor(wn.clone(), last.n.dims()))
            .unwrap()
            .sum_all()
            .unwrap())
    .unwrap();
    let grads = loss.backward().unwrap();

    let plan = MlstmChunkwise::new(bh, seq_len, d, chunk);
    let sl = plan.state_len();
    let records = mlstm::pack_state(&initial).unwrap();
    let mut forward = vec![
        flat(qkv.as_tensor()),
        flat(gates.as_tensor()),
        flat(&records),
        nan(plan.tape_len(true)),
        nan(plan.out_len()),
    ];
    let emulator = emulator();
    emulator.run(&plan.forward("test", true).unwrap(), &mut forward);
    let case = format!(
        "chunkwise B{batch} NH{heads} S{seq_len} DH{d} chunk {chunk}→{}",
        plan.chunk
    );
    let out = &forward[4];
    assert_close(&format!("{case} h"), &out[..plan.h_len()], &flat(&h));
    let final_records = mlstm::pack_state(&last).unwrap();
    assert_close(
        &format!("{case} final state"),
        &out[plan.h_len()..],
        &flat(&final_records),
    );

    let mut grad_out = wh;
    for head in 0..bh {
        grad_out.extend_from_slice(&wc[head * d * d..(head + 1) * d * d]);
        grad_out.extend_from_slice(&wn[head * d..(head + 1) * d]);
        grad_out.push(0.0);
    }
    let mut backward = vec![
        grad_out,
        forward[0].clone(),
        forward[1].clone(),
        forward[3].clone(),
        nan(plan.carries_len()),
        nan(plan.grads_len()),
    ];
    emulator.run(&plan.backward("test").unwrap(), &mut backward);
    let out = &backward[5];
    let (grad_qkv, rest) = out.split_at(bh * seq_len * 3 * d);
    let (grad_gates, grad_initial) = rest.split_at(bh * seq_len * 2);
    assert_close(
        &format!("{case} grad qkv"),
        grad_qkv,
        &flat(grads.get(&qkv).unwrap()),
    );
    assert_close(
        &format!("{case} grad gates"),
        grad_gates,
        &flat(grads.get(&gates).unwrap()),
    );
    let want_initial = mlstm::pack_state(&mlstm::MlstmState {
        c: grads.get(&c0).unwrap().clone(),
        n: grads.get(&n0).unwrap().clone(),
        m: grads.get(&m0).unwrap().clone(),
    })
    .unwrap();
    assert_eq!(grad_initial.len(), bh * sl);
    assert_close(
        &format!("{case} grad initial state"),
        grad_initial,
        &flat(&want_initial),
    );
}

#[test]
fn mlstm_chunkwise_kernels_match_the_fused_cpu_kernel() {
    // S = 1; S not a multiple of the chunk; several chunks; chunk longer than S; a head dim
    // whose tiles force a smaller chunk.
    for (batch, heads, seq_len, d, chunk) in [
        (1, 1, 1, 4, 4),
        (2, 2, 13, 8, 4),
        (1, 2, 40, 16, 16),
        (2, 1, 7, 4, 64),
        (1, 1, 9, 64, 64),
        // The stack's shape: DH 32 in chunks of 32, the largest tiles the kernels carve.
        (1, 2, 70, 32, 32),
    ] {
        check_mlstm_chunkwise(batch, heads, seq_len, d, chunk);
    }
}

#[test]
fn mlstm_parallel_form_is_the_chunkwise_kernels_from_no_state() {
    let (batch, heads, seq_len, d) = (2, 2, 37, 8);
    let bh = batch * heads;
    let qkv = Var::from_tensor(&tensor(
        values(11, bh * seq_len * 3 * d, 0.0, 1.0),
        &[batch, heads, seq_len, 3 * d],
    ))
    .unwrap();
    // Strongly negative input gates: the row stabilisers then differ from the chunkwise
    // form's from a zero state, so this checks that the −inf state reproduces the parallel form.
    let gates_data: Vec<f32> = values(12, bh * seq_len, -6.0, 4.0)
        .into_iter()
        .zip(values(13, bh * seq_len, 1.0, 3.0))
        .flat_map(|(i, f)| [i, f])
        .collect();
    let gates = Var::from_tensor(&tensor(gates_data, &[batch, heads, seq_len, 2])).unwrap();
    let h = mlstm::parallel_packed(qkv.as_tensor(), gates.as_tensor()).unwrap();
    let wh = values(14, bh * seq_len * d, 0.0, 1.0);
    let grads = h
        .mul(&tensor(wh.clone(), h.dims()))
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();

    let plan = MlstmChunkwise::new(bh, seq_len, d, 16);
    let sl = plan.state_len();
    let mut no_state = vec![0f32; bh * sl];
    for head in 0..bh {
        no_state[(head + 1) * sl - 1] = f32::NEG_INFINITY;
    }
    let mut forward = vec![
        flat(qkv.as_tensor()),
        flat(gates.as_tensor()),
        no_state,
        nan(plan.tape_len(true)),
        nan(plan.out_len()),
    ];
    let emulator = emulator();
    emulator.run(&plan.forward("test", true).unwrap(), &mut forward);
    assert_close("parallel h", &forward[4][..plan.h_len()], &flat(&h));
    let mut grad_out = wh;
    grad_out.resize(plan.out_len(), 0.0);
    let mut backward = vec![
        grad_out,
        forward[0].clone(),
        forward[1].clone(),
        forward[3].clone(),
        nan(plan.carries_len()),
        nan(plan.grads_len()),
    ];
    emulator.run(&plan.backward("test").unwrap(), &mut backward);
    let (grad_qkv, rest) = backward[5].split_at(bh * seq_len * 3 * d);
    assert_close(
        "parallel grad qkv",
        grad_qkv,
        &flat(grads.get(&qkv).unwrap()),
    );
    assert_close(
        "parallel grad gates",
        &rest[..bh * seq_len * 2],
        &flat(grads.get(&gates).unwrap()),
    );
    assert!(rest[bh * seq_len * 2..].iter().all(|g| g.is_finite()));
}

#[test]
fn mlstm_step_kernel_matches_the_fused_cpu_step() {
    let (batch, heads, d) = (3, 2, 8);
    let bh = batch * heads;
    let part =
        |seed, offset, scale| tensor(values(seed, bh * d, offset, scale), &[batch, heads, d]);
    let (q, k, v) = (part(21, 0.0, 1.0), part(22, 0.0, 1.0), part(23, 0.0, 1.0));
    let igate = tensor(values(24, bh, 0.0, 3.0), &[batch, heads]);
    let fgate = tensor(values(25, bh, 2.0, 3.0), &[batch, heads]);
    let state = mlstm::MlstmState {
        c: tensor(values(26, bh * d * d, 0.0, 0.5), &[batch, heads, d, d]),
        n: tensor(values(27, bh * d, 0.5, 0.5), &[batch, heads, d]),
        m: tensor(values(28, bh, 0.0, 1.0), &[batch, heads]),
    };
    let (h, next) = mlstm::step(&q, &k, &v, &igate, &fgate, &state).unwrap();
    let qkv = Tensor::cat(&[&q, &k, &v], 2).unwrap();
    let gates = Tensor::stack(&[&igate, &fgate], 2).unwrap();
    let sl = d * d + d + 1;
    let mut buffers = vec![
        flat(&qkv),
        flat(&gates),
        flat(&mlstm::pack_state(&state).unwrap()),
        nan(bh * (d + sl)),
    ];
    emulator().run(&[mlstm_step("test", bh, d).unwrap()], &mut buffers);
    let want = Tensor::cat(&[&h, &mlstm::pack_state(&next).unwrap()], 2).unwrap();
    assert_close("step h and state", &buffers[3], &flat(&want));
}

/// The sLSTM scan from a random initial state: h, final state and every gradient (of a loss
/// on h and the final h, c, n) against the fused CPU scan.
fn check_slstm(batch: usize, seq_len: usize, heads: usize, dh: usize, weights_in_global: bool) {
    let hidden = heads * dh;
    let seed = (batch * 100 + seq_len * 10 + dh) as u64;
    let var = |seed, shape: &[usize], offset, scale| {
        let len = shape.iter().product();
        Var::from_tensor(&tensor(values(seed, len, offset, scale), shape)).unwrap()
    };
    let x = var(seed, &[batch, seq_len, 4 * hidden], 0.0, 2.0);
    let r = var(seed + 1, &[heads, dh, 4, dh], 0.0, 0.5);
    let bias = var(seed + 2, &[heads, 4, dh], 0.0, 1.0);
    let h0 = var(seed + 3, &[batch, hidden], 0.0, 0.5);
    let c0 = var(seed + 4, &[batch, hidden], 0.0, 0.5);
    let n0 = var(seed + 5, &[batch, hidden], 1.0, 0.5);
    let m0 = var(seed + 6, &[batch, hidden], 0.0, 1.0);
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
    )
    .unwrap();
    let wh = values(seed + 7, batch * heads * seq_len * dh, 0.0, 1.0);
    // Weights of the final h, c and n in the loss.
    let w_final: Vec<Vec<f32>> = (0..3)
        .map(|row| values(seed + 8 + row, batch * hidden, 0.0, 1.0))
        .collect();
    let mut loss = h
        .mul(&tensor(wh.clone(), h.dims()))
        .unwrap()
        .sum_all()
        .unwrap();
    for (state, weights) in [&last.h, &last.c, &last.n].into_iter().zip(&w_final) {
        let term = state
            .mul(&tensor(weights.clone(), state.dims()))
            .unwrap()
            .sum_all()
            .unwrap();
        loss = (loss + term).unwrap();
    }
    let grads = loss.backward().unwrap();

    let mut plan = SlstmScan::new("test", batch, seq_len, heads, dh).unwrap();
    if weights_in_global {
        plan = plan.with_weights_in_global_memory();
    }
    let r_aug = Tensor::cat(&[r.as_tensor(), &bias.as_tensor().unsqueeze(1).unwrap()], 1).unwrap();
    let mut forward = vec![
        flat(x.as_tensor()),
        flat(&r_aug),
        flat(&initial.stacked().unwrap()),
        nan(plan.out_len()),
        nan(plan.tape_len()),
    ];
    let emulator = emulator();
    emulator.run(&[plan.forward("test", true).unwrap()], &mut forward);
    let case = format!("sLSTM B{batch} S{seq_len} NH{heads} DH{dh} global {weights_in_global}");
    // The packed output per (batch, head): S rows of h, then the final h, c, n, m.
    let per_head = |t: &Tensor| {
        t.reshape((batch, heads, 1, dh))
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
    };
    let final_rows = [&last.h, &last.c, &last.n, &last.m].map(per_head);
    let mut want_packed = vec![h.clone()];
    want_packed.extend(final_rows.iter().cloned());
    let want_packed = Tensor::cat(&want_packed, 2).unwrap();
    assert_close(&format!("{case} output"), &forward[3], &flat(&want_packed));

    // The gradient of the packed output; its m row is random: the kernel must ignore it.
    let w_rows: Vec<Tensor> = w_final
        .iter()
        .cloned()
        .chain([values(seed + 20, batch * hidden, 0.0, 1.0)])
        .map(|w| per_head(&tensor(w, &[batch, hidden])))
        .collect();
    assert_eq!(w_rows.len(), 4, "final h, c, n, m");
    let mut grad_packed = vec![tensor(wh, h.dims())];
    grad_packed.extend(w_rows);
    let grad_packed = Tensor::cat(&grad_packed, 2).unwrap();
    let mut backward = vec![
        flat(&grad_packed),
        forward[1].clone(),
        forward[2].clone(),
        forward[4].clone(),
        nan(plan.grads_len()),
    ];
    emulator.run(&[plan.backward("test").unwrap()], &mut backward);
    let x_len = batch * seq_len * 4 * hidden;
    let (dx, rest) = backward[4].split_at(x_len);
    let (dinit, dr_rows) = rest.split_at(4 * batch * hidden);
    assert_close(&format!("{case} grad x"), dx, &flat(grads.get(&x).unwrap()));
    let want_dinit = Tensor::stack(
        &[&h0, &c0, &n0, &m0].map(|v| grads.get(v).unwrap().clone()),
        1,
    )
    .unwrap();
    assert_close(
        &format!("{case} grad initial state"),
        dinit,
        &flat(&want_dinit),
    );
    let r_len = r_aug.elem_count();
    let dr = tensor(dr_rows.to_vec(), &[batch, r_len]).sum(0).unwrap();
    let want_dr = Tensor::cat(
        &[
            grads.get(&r).unwrap(),
            &grads.get(&bias).unwrap().unsqueeze(1).unwrap(),
        ],
        1,
    )
    .unwrap();
    assert_close(&format!("{case} grad r, bias"), &flat(&dr), &flat(&want_dr));
}

#[test]
fn slstm_scan_kernels_match_the_fused_cpu_scan() {
    // Register accumulators (DH 8, 16), any head dim (DH 6), weights read from global memory,
    // a batch tile with rows past the batch, S = 1 with one and with several (batch, head) pairs.
    for (batch, seq_len, heads, dh, global) in [
        (3, 9, 2, 8, false),
        (2, 5, 1, 16, false),
        (5, 7, 2, 6, false),
        (2, 6, 2, 8, true),
        (1, 1, 1, 4, false),
        (2, 1, 2, 4, false),
        // DH 32: two rows per block, so the second block holds a row past the batch.
        (3, 4, 1, 32, false),
    ] {
        check_slstm(batch, seq_len, heads, dh, global);
    }
}
