//! sLSTM kernel: fused CPU scan against the candle-ops reference, finite-difference check of
//! the fused backward pass, extreme inputs and argument errors.

use candle_core::{DType, Device, Result, Tensor, Var};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand_distr::{Distribution, StandardNormal, Uniform};
use xlstm_forecast::xlstm::kernels::slstm::{self, SlstmState};

type ScanFn = fn(&Tensor, &Tensor, &Tensor, Option<&SlstmState>) -> Result<(Tensor, SlstmState)>;

#[derive(Debug, Clone, Copy)]
struct Dims {
    batch: usize,
    seq_len: usize,
    heads: usize,
    head_dim: usize,
}

/// Shorthand: `dims(batch, seq_len, heads, head_dim)`.
fn dims(batch: usize, seq_len: usize, heads: usize, head_dim: usize) -> Dims {
    Dims {
        batch,
        seq_len,
        heads,
        head_dim,
    }
}

impl Dims {
    fn hidden(&self) -> usize {
        self.heads * self.head_dim
    }
}

fn normal(rng: &mut StdRng, shape: &[usize], scale: f32) -> Tensor {
    let len = shape.iter().product();
    let values: Vec<f32> = (0..len)
        .map(|_| {
            let sample: f32 = StandardNormal.sample(rng);
            scale * sample
        })
        .collect();
    Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
}

/// Inputs of one scan: x, r, bias and a stacked `[4, B, H]` initial state (or none).
struct Inputs {
    x: Tensor,
    r: Tensor,
    bias: Tensor,
    init: Option<Tensor>,
    loss_weight: Tensor,
}

/// A state the recurrence can reach: n > 0, |c| ≤ n, |h| < 1.
fn random_state(rng: &mut StdRng, batch: usize, hidden: usize) -> Tensor {
    let n = normal(rng, &[batch, hidden], 0.5).exp().unwrap();
    let unit = Uniform::new(-1f32, 1f32).unwrap();
    let ratio: Vec<f32> = (0..batch * hidden).map(|_| unit.sample(rng)).collect();
    let ratio = Tensor::from_vec(ratio, (batch, hidden), &Device::Cpu).unwrap();
    let c = n.mul(&ratio).unwrap();
    let h = normal(rng, &[batch, hidden], 1.0).tanh().unwrap();
    let m = normal(rng, &[batch, hidden], 2.0);
    Tensor::stack(&[h, c, n, m], 0).unwrap()
}

fn random_inputs(seed: u64, d: Dims, given_init: bool, x_scale: f32) -> Inputs {
    let mut rng = StdRng::seed_from_u64(seed);
    let h = d.hidden();
    Inputs {
        x: normal(&mut rng, &[d.batch, d.seq_len, 4 * h], x_scale),
        r: normal(&mut rng, &[d.heads, d.head_dim, 4, d.head_dim], 0.5),
        bias: normal(&mut rng, &[d.heads, 4, d.head_dim], 1.0),
        init: given_init.then(|| random_state(&mut rng, d.batch, h)),
        loss_weight: normal(&mut rng, &[d.batch, d.heads, d.seq_len, d.head_dim], 1.0),
    }
}

/// Output, final state and gradients of L = Σ h·loss_weight.
struct Outcome {
    h: Tensor,
    final_state: Tensor,
    grads: Vec<(&'static str, Tensor)>,
}

fn run(scan: ScanFn, inputs: &Inputs) -> Outcome {
    let x = Var::from_tensor(&inputs.x).unwrap();
    let r = Var::from_tensor(&inputs.r).unwrap();
    let bias = Var::from_tensor(&inputs.bias).unwrap();
    let init = inputs.init.as_ref().map(|t| Var::from_tensor(t).unwrap());
    let initial = init
        .as_ref()
        .map(|v| SlstmState::from_stacked(v.as_tensor()).unwrap());
    let (h, state) = scan(&x, &r, &bias, initial.as_ref()).unwrap();
    let loss = h.mul(&inputs.loss_weight).unwrap().sum_all().unwrap();
    let store = loss.backward().unwrap();
    let mut grads = vec![
        ("x", store.get(&x).expect("grad x").clone()),
        ("r", store.get(&r).expect("grad r").clone()),
        ("bias", store.get(&bias).expect("grad bias").clone()),
    ];
    if let Some(init) = &init {
        grads.push(("initial state", store.get(init).expect("grad init").clone()));
    }
    Outcome {
        h,
        final_state: state.stacked().unwrap(),
        grads,
    }
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

/// Asserts `|actual - expected| <= atol + rtol·|expected|` elementwise and that both are finite.
fn assert_close(what: &str, actual: &Tensor, expected: &Tensor, atol: f64, rtol: f64) {
    assert_eq!(actual.dims(), expected.dims(), "{what}: shapes differ");
    let (a, e) = (values(actual), values(expected));
    for (idx, (&av, &ev)) in a.iter().zip(&e).enumerate() {
        let diff = (av as f64 - ev as f64).abs();
        assert!(
            diff <= atol + rtol * (ev as f64).abs(),
            "{what}: element {idx} is {av}, expected {ev} (|diff| {diff:e}, atol {atol:e}, rtol {rtol:e})"
        );
    }
}

fn assert_finite(what: &str, t: &Tensor) {
    let v = values(t);
    if let Some(idx) = v.iter().position(|x| !x.is_finite()) {
        panic!("{what}: element {idx} is {}", v[idx]);
    }
}

fn check_fused_matches_reference(seed: u64, d: Dims, given_init: bool, x_scale: f32) {
    let inputs = random_inputs(seed, d, given_init, x_scale);
    let fused = run(slstm::scan, &inputs);
    let reference = run(slstm::reference::scan, &inputs);
    let label = format!("{d:?} given_init={given_init} x_scale={x_scale}");
    assert_eq!(fused.h.dims(), [d.batch, d.heads, d.seq_len, d.head_dim]);
    assert_close(&format!("{label} h"), &fused.h, &reference.h, 1e-5, 1e-4);
    assert_close(
        &format!("{label} final state"),
        &fused.final_state,
        &reference.final_state,
        1e-5,
        1e-4,
    );
    for ((name, fused_grad), (_, reference_grad)) in fused.grads.iter().zip(&reference.grads) {
        assert_finite(&format!("{label} fused grad {name}"), fused_grad);
        assert_close(
            &format!("{label} grad {name}"),
            fused_grad,
            reference_grad,
            1e-4,
            1e-3,
        );
    }
}

#[test]
fn fused_matches_reference_single_step() {
    let d = dims(3, 1, 2, 4);
    check_fused_matches_reference(1, d, false, 1.0);
    check_fused_matches_reference(2, d, true, 1.0);
}

#[test]
fn fused_matches_reference_short_sequences() {
    for (seed, d) in [
        (3, dims(2, 7, 1, 1)),
        (4, dims(4, 19, 3, 5)),
        (5, dims(2, 33, 2, 16)),
        // One 8-wide vector block plus a scalar tail per head.
        (6, dims(3, 21, 2, 12)),
    ] {
        check_fused_matches_reference(seed, d, false, 1.0);
        check_fused_matches_reference(seed + 100, d, true, 1.0);
    }
}

#[test]
fn fused_matches_reference_long_sequence() {
    // candle's backward pass walks the graph recursively; the reference graph of a 1024-step
    // loop is ~30k nodes deep, more than a test thread's default stack.
    std::thread::Builder::new()
        .stack_size(512 << 20)
        .spawn(|| {
            let d = dims(2, 1024, 2, 2);
            check_fused_matches_reference(6, d, false, 1.0);
            check_fused_matches_reference(7, d, true, 1.0);
        })
        .unwrap()
        .join()
        .unwrap();
}

#[test]
fn fused_matches_reference_with_extreme_preactivations() {
    for d in [dims(2, 40, 2, 3), dims(2, 40, 2, 11)] {
        check_fused_matches_reference(8, d, false, 50.0);
        check_fused_matches_reference(9, d, true, 50.0);
    }
}

#[test]
fn fused_is_finite_for_saturated_gates_over_long_sequences() {
    let d = dims(2, 2048, 2, 12);
    let mut inputs = random_inputs(10, d, true, 1.0);
    // Every pre-activation at ±50: gates fully saturated, the stabiliser moving by ±50 a step.
    let signs = normal(&mut StdRng::seed_from_u64(11), inputs.x.dims(), 1.0)
        .ge(0.0)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    inputs.x = signs.affine(100.0, -50.0).unwrap();
    let outcome = run(slstm::scan, &inputs);
    assert_finite("h", &outcome.h);
    assert_finite("final state", &outcome.final_state);
    for (name, grad) in &outcome.grads {
        assert_finite(&format!("grad {name}"), grad);
    }
    let max_h = values(&outcome.h)
        .iter()
        .fold(0f32, |acc, v| acc.max(v.abs()));
    assert!(max_h <= 1.0, "|h| must stay ≤ 1 (|c| ≤ n), got {max_h}");
}

/// Loss Σ h·w computed from the fused forward pass, accumulated in f64.
fn fused_loss(inputs: &Inputs) -> f64 {
    let initial = inputs
        .init
        .as_ref()
        .map(|t| SlstmState::from_stacked(t).unwrap());
    let (h, _) = slstm::scan(&inputs.x, &inputs.r, &inputs.bias, initial.as_ref()).unwrap();
    values(&h)
        .iter()
        .zip(values(&inputs.loss_weight))
        .map(|(&h, w)| h as f64 * w as f64)
        .sum()
}

fn with_element(t: &Tensor, idx: usize, delta: f32) -> Tensor {
    let mut v = values(t);
    v[idx] += delta;
    Tensor::from_vec(v, t.dims(), &Device::Cpu).unwrap()
}

#[test]
fn fused_gradients_match_finite_differences() {
    // DH = 9: the vector kernels for units 0..8, the scalar ones for unit 8.
    let d = dims(2, 4, 2, 9);
    let inputs = random_inputs(12, d, true, 1.0);
    let analytic = run(slstm::scan, &inputs).grads;
    let step = 5e-3f32;
    for (name, grad) in &analytic {
        let grad = values(grad);
        let mut max_err = 0f64;
        let mut max_grad = 0f64;
        for (idx, &g) in grad.iter().enumerate() {
            let perturbed = |delta: f32| {
                let mut p = Inputs {
                    x: inputs.x.clone(),
                    r: inputs.r.clone(),
                    bias: inputs.bias.clone(),
                    init: inputs.init.clone(),
                    loss_weight: inputs.loss_weight.clone(),
                };
                match *name {
                    "x" => p.x = with_element(&p.x, idx, delta),
                    "r" => p.r = with_element(&p.r, idx, delta),
                    "bias" => p.bias = with_element(&p.bias, idx, delta),
                    "initial state" => {
                        p.init = Some(with_element(p.init.as_ref().unwrap(), idx, delta))
                    }
                    other => unreachable!("unexpected input {other}"),
                }
                fused_loss(&p)
            };
            let numeric = (perturbed(step) - perturbed(-step)) / (2.0 * step as f64);
            max_err = max_err.max((numeric - g as f64).abs());
            max_grad = max_grad.max((g as f64).abs());
        }
        // The finite difference is good to ~1e-4 here (f32 forward, step 5e-3); a wrong
        // gradient term is off by O(max_grad).
        assert!(
            max_grad > 0.1,
            "grad {name} is suspiciously small: max |g| = {max_grad}"
        );
        assert!(
            max_err <= 2e-3 + 1e-3 * max_grad,
            "grad {name}: max |finite difference − analytic| = {max_err:e} (max |g| = {max_grad})"
        );
    }
}

#[test]
fn state_carried_across_calls_matches_one_scan() {
    // Two chunks with the state handed over: outputs equal one scan over the whole sequence,
    // and the fused gradients (m constant, final-m gradient ignored) equal the reference's
    // (m differentiated) because the chained loss on h does not depend on the stabiliser.
    let d = dims(2, 24, 2, 4);
    let inputs = random_inputs(13, d, true, 1.0);
    let split = 10;
    let chained = |scan: ScanFn| {
        let x = Var::from_tensor(&inputs.x).unwrap();
        let r = Var::from_tensor(&inputs.r).unwrap();
        let bias = Var::from_tensor(&inputs.bias).unwrap();
        let init = Var::from_tensor(inputs.init.as_ref().unwrap()).unwrap();
        let initial = SlstmState::from_stacked(init.as_tensor()).unwrap();
        let first = x.narrow(1, 0, split).unwrap();
        let second = x.narrow(1, split, d.seq_len - split).unwrap();
        let (h1, mid) = scan(&first, &r, &bias, Some(&initial)).unwrap();
        let (h2, _) = scan(&second, &r, &bias, Some(&mid)).unwrap();
        let h = Tensor::cat(&[h1, h2], 2).unwrap();
        let loss = h.mul(&inputs.loss_weight).unwrap().sum_all().unwrap();
        let store = loss.backward().unwrap();
        let grads: Vec<Tensor> = [
            x.as_tensor(),
            r.as_tensor(),
            bias.as_tensor(),
            init.as_tensor(),
        ]
        .iter()
        .map(|v| store.get(v).unwrap().clone())
        .collect();
        (h, grads)
    };
    let whole = run(slstm::scan, &inputs);
    let (fused_h, fused_grads) = chained(slstm::scan);
    let (_, reference_grads) = chained(slstm::reference::scan);
    assert_close("chained h vs one scan", &fused_h, &whole.h, 1e-6, 1e-5);
    for ((name, fused), reference) in ["x", "r", "bias", "initial state"]
        .iter()
        .zip(&fused_grads)
        .zip(&reference_grads)
    {
        assert_close(
            &format!("chained grad {name}"),
            fused,
            reference,
            1e-4,
            1e-3,
        );
    }
    for ((name, chained), (_, single)) in ["x", "r", "bias", "initial state"]
        .iter()
        .zip(&fused_grads)
        .zip(&whole.grads)
    {
        assert_close(
            &format!("chained vs one scan grad {name}"),
            chained,
            single,
            1e-4,
            1e-3,
        );
    }
}

#[test]
fn inference_without_gradient_tracking_matches() {
    let d = dims(3, 9, 2, 4);
    let inputs = random_inputs(14, d, true, 1.0);
    let initial = SlstmState::from_stacked(inputs.init.as_ref().unwrap()).unwrap();
    let (h, state) = slstm::scan(&inputs.x, &inputs.r, &inputs.bias, Some(&initial)).unwrap();
    let (h_ref, state_ref) =
        slstm::reference::scan(&inputs.x, &inputs.r, &inputs.bias, Some(&initial)).unwrap();
    assert_close("h", &h, &h_ref, 1e-5, 1e-4);
    assert_close(
        "final state",
        &state.stacked().unwrap(),
        &state_ref.stacked().unwrap(),
        1e-5,
        1e-4,
    );
}

#[test]
fn zero_state_helpers_round_trip() {
    let zeros = SlstmState::zeros(3, 8, &Device::Cpu).unwrap();
    let stacked = zeros.stacked().unwrap();
    assert_eq!(stacked.dims(), [4, 3, 8]);
    let inputs = random_inputs(15, dims(3, 4, 2, 4), false, 1.0);
    let (h_none, _) = slstm::scan(&inputs.x, &inputs.r, &inputs.bias, None).unwrap();
    let (h_zero, _) = slstm::scan(&inputs.x, &inputs.r, &inputs.bias, Some(&zeros)).unwrap();
    assert_close("None vs explicit zero state", &h_none, &h_zero, 0.0, 0.0);
    let round_trip = SlstmState::from_stacked(&stacked)
        .unwrap()
        .stacked()
        .unwrap();
    assert_close("stacked round trip", &round_trip, &stacked, 0.0, 0.0);
    let err =
        SlstmState::from_stacked(&Tensor::zeros((3, 3, 8), DType::F32, &Device::Cpu).unwrap())
            .unwrap_err();
    assert!(err.to_string().contains("[4, B, H]"), "{err}");
}

#[test]
fn argument_errors_name_the_argument() {
    let d = dims(2, 3, 2, 4);
    let inputs = random_inputs(16, d, false, 1.0);
    let (x, r, bias) = (&inputs.x, &inputs.r, &inputs.bias);
    let cpu = &Device::Cpu;
    let expect_err = |result: Result<(Tensor, SlstmState)>, needle: &str| {
        let err = result.expect_err("expected an argument error").to_string();
        assert!(
            err.contains(needle),
            "error {err:?} should mention {needle:?}"
        );
    };
    for scan in [slstm::scan as ScanFn, slstm::reference::scan] {
        let bad_x = Tensor::zeros((2, 3, 31), DType::F32, cpu).unwrap();
        expect_err(scan(&bad_x, r, bias, None), "x has shape [2, 3, 31]");
        let bad_r = Tensor::zeros((2, 4, 4, 3), DType::F32, cpu).unwrap();
        expect_err(scan(x, &bad_r, bias, None), "r has shape [2, 4, 4, 3]");
        let bad_bias = Tensor::zeros((2, 4, 3), DType::F32, cpu).unwrap();
        expect_err(scan(x, r, &bad_bias, None), "bias has shape [2, 4, 3]");
        let mut bad_state = SlstmState::zeros(2, 8, cpu).unwrap();
        bad_state.n = Tensor::zeros((2, 7), DType::F32, cpu).unwrap();
        expect_err(
            scan(x, r, bias, Some(&bad_state)),
            "initial.n has shape [2, 7]",
        );
        let empty = Tensor::zeros((2, 0, 32), DType::F32, cpu).unwrap();
        expect_err(scan(&empty, r, bias, None), "x has shape [2, 0, 32]");
        let f64_bias = bias.to_dtype(DType::F64).unwrap();
        expect_err(scan(x, r, &f64_bias, None), "bias has dtype F64");
    }
    let (x64, r64, bias64) = (
        x.to_dtype(DType::F64).unwrap(),
        r.to_dtype(DType::F64).unwrap(),
        bias.to_dtype(DType::F64).unwrap(),
    );
    expect_err(slstm::scan(&x64, &r64, &bias64, None), "f32 only");
    // The reference works in f64 (useful as a higher-precision oracle).
    let (h64, _) = slstm::reference::scan(&x64, &r64, &bias64, None).unwrap();
    let (h32, _) = slstm::scan(x, r, bias, None).unwrap();
    assert_close(
        "f64 reference vs f32 fused",
        &h32,
        &h64.to_dtype(DType::F32).unwrap(),
        1e-5,
        1e-4,
    );
}
