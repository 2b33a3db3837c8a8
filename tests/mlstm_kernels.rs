//! The fused CPU mLSTM kernels against the candle-ops reference, the three forms
//! against each other, finite-difference gradients, extreme gates and input errors.

use candle_core::{DType, Device, Result, Tensor, Var};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand_distr::{Distribution, Normal};
use xlstm_forecast::xlstm::kernels::mlstm::{self, MlstmState, fused_cpu, reference};

/// The README's suggested f32 tolerances: at S = 1024 the cumulative log forget gates
/// reach a few hundred, so f32 rounding in them alone moves h by ~1e-5.
const FORWARD_TOL: (f32, f32) = (1e-4, 1e-4);
const GRAD_TOL: (f32, f32) = (1e-3, 1e-3);
/// Long sequences (S ≥ 512): the cumulative log forget gates reach several hundred, and the
/// reference sums them with candle's `cumsum`, a triangular GEMM whose summation order follows
/// the CPU's GEMM kernel; an f32 error of ~1e-3 in a sum of that size is a ~1e-3 relative error
/// of the decay weights, which reaches h and the gradients (1.4e-3 seen at S = 1024 on an
/// AVX-512 machine; the same seed passed within the tolerances above on another CPU). Where
/// terms cancel, the error is a share of the tensor's largest magnitude rather than of the
/// element, so long sequences get `rtol` plus this share of the largest |expected|.
const LONG_SEQUENCE: usize = 512;
const LONG_SEQUENCE_RTOL: f32 = 2e-3;
const LONG_SEQUENCE_SHARE_OF_LARGEST: f32 = 2e-4;

fn random(rng: &mut StdRng, shape: &[usize], mean: f32, std: f32) -> Tensor {
    let normal = Normal::new(mean, std).unwrap();
    let len = shape.iter().product();
    let data: Vec<f32> = (0..len).map(|_| normal.sample(rng)).collect();
    Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
}

/// q, k, v, igate, fgate, shaped like the README's inputs (forget gates mostly open).
fn random_inputs(rng: &mut StdRng, b: usize, nh: usize, s: usize, dh: usize) -> [Tensor; 5] {
    [
        random(rng, &[b, nh, s, dh], 0.0, 1.0),
        random(rng, &[b, nh, s, dh], 0.0, 1.0),
        random(rng, &[b, nh, s, dh], 0.0, 1.0),
        random(rng, &[b, nh, s], 0.0, 2.0),
        random(rng, &[b, nh, s], 2.0, 2.0),
    ]
}

fn random_state(rng: &mut StdRng, b: usize, nh: usize, dh: usize) -> MlstmState {
    MlstmState {
        c: random(rng, &[b, nh, dh, dh], 0.0, 0.5),
        n: random(rng, &[b, nh, dh], 0.0, 0.5),
        m: random(rng, &[b, nh], 0.0, 1.0),
    }
}

/// Panics naming the worst element unless `|actual − expected| <= atol + rtol·|expected|`.
fn assert_close(what: &str, actual: &Tensor, expected: &Tensor, (atol, rtol): (f32, f32)) {
    assert_eq!(actual.dims(), expected.dims(), "{what}: shape");
    let actual = actual.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let expected = expected.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let mut worst: Option<(usize, f32)> = None;
    for (i, (a, e)) in actual.iter().zip(&expected).enumerate() {
        let excess = (a - e).abs() - (atol + rtol * e.abs());
        let violated = excess > 0.0 || excess.is_nan();
        if violated && worst.is_none_or(|(_, w)| excess > w || excess.is_nan()) {
            worst = Some((i, excess));
        }
    }
    if let Some((i, _)) = worst {
        panic!(
            "{what}: element {i} is {} but expected {} (tolerance {atol} + {rtol}·|expected|)",
            actual[i], expected[i]
        );
    }
}

fn assert_finite(what: &str, t: &Tensor) {
    let values = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    if let Some(i) = values.iter().position(|x| !x.is_finite()) {
        panic!("{what}: element {i} is {}", values[i]);
    }
}

/// Tensors that receive gradients, the loss built from them, and its gradients.
struct Differentiated {
    outputs: Vec<Tensor>,
    grads: Vec<Tensor>,
}

/// Evaluates `forward` on Vars made from `inputs`; the loss is Σ outputs[j]·weights[j].
fn differentiate(
    inputs: &[Tensor],
    weights: &[Tensor],
    forward: impl Fn(&[Tensor]) -> Result<Vec<Tensor>>,
) -> Differentiated {
    let vars: Vec<Var> = inputs
        .iter()
        .map(|t| Var::from_tensor(t).unwrap())
        .collect();
    let tensors: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let outputs = forward(&tensors).unwrap();
    let mut loss = Tensor::zeros((), DType::F32, &Device::Cpu).unwrap();
    for (out, weight) in outputs.iter().zip(weights) {
        loss = (loss + (out * weight).unwrap().sum_all().unwrap()).unwrap();
    }
    let grads = loss.backward().unwrap();
    let grads = vars
        .iter()
        .map(|v| {
            grads
                .get(v.as_tensor())
                .cloned()
                .unwrap_or_else(|| v.as_tensor().zeros_like().unwrap())
        })
        .collect();
    Differentiated { outputs, grads }
}

const INPUT_NAMES: [&str; 8] = ["q", "k", "v", "igate", "fgate", "C0", "n0", "m0"];

/// `short` for sequences shorter than `LONG_SEQUENCE` (dim 2 of `[B, NH, S, ...]`), else
/// the long-sequence tolerance for `expected`.
fn tolerance(expected: &Tensor, short: (f32, f32)) -> (f32, f32) {
    match expected.dims() {
        [_, _, s, ..] if *s >= LONG_SEQUENCE => {
            let largest = expected
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            (LONG_SEQUENCE_SHARE_OF_LARGEST * largest, LONG_SEQUENCE_RTOL)
        }
        _ => short,
    }
}

fn assert_same(what: &str, fused: &Differentiated, reference: &Differentiated) {
    for (j, (f, r)) in fused.outputs.iter().zip(&reference.outputs).enumerate() {
        assert_close(
            &format!("{what} output {j}"),
            f,
            r,
            tolerance(r, FORWARD_TOL),
        );
    }
    for (j, (f, r)) in fused.grads.iter().zip(&reference.grads).enumerate() {
        assert_close(
            &format!("{what} grad {}", INPUT_NAMES[j]),
            f,
            r,
            tolerance(r, GRAD_TOL),
        );
    }
}

/// (B, NH, S, DH, chunk size): S = 1, S not divisible by the chunk, one partial chunk,
/// exact multiples, a long sequence.
const SHAPES: [(usize, usize, usize, usize, usize); 6] = [
    (1, 1, 1, 4, 4),
    (2, 2, 7, 8, 3),
    (2, 3, 37, 16, 16),
    (1, 2, 20, 8, 64),
    (2, 2, 128, 32, 32),
    (2, 2, 1024, 16, 64),
];

#[test]
fn fused_parallel_matches_reference_outputs_and_gradients() {
    let mut rng = StdRng::seed_from_u64(1);
    for (b, nh, s, dh, _) in SHAPES {
        let inputs = random_inputs(&mut rng, b, nh, s, dh);
        let weights = [random(&mut rng, &[b, nh, s, dh], 0.0, 1.0)];
        let run = |parallel: fn(&Tensor, &Tensor, &Tensor, &Tensor, &Tensor) -> Result<Tensor>| {
            differentiate(&inputs, &weights, |x| {
                Ok(vec![parallel(&x[0], &x[1], &x[2], &x[3], &x[4])?])
            })
        };
        assert_same(
            &format!("parallel B{b} NH{nh} S{s} DH{dh}"),
            &run(fused_cpu::parallel),
            &run(reference::parallel),
        );
    }
}

#[test]
fn fused_chunkwise_matches_reference_outputs_state_and_gradients() {
    let mut rng = StdRng::seed_from_u64(2);
    for (b, nh, s, dh, chunk) in SHAPES {
        for with_initial in [false, true] {
            let mut inputs = random_inputs(&mut rng, b, nh, s, dh).to_vec();
            if with_initial {
                let state = random_state(&mut rng, b, nh, dh);
                inputs.extend([state.c, state.n, state.m]);
            }
            // The loss also reads the final C and n, so their gradients seed the reverse pass.
            let weights = [
                random(&mut rng, &[b, nh, s, dh], 0.0, 1.0),
                random(&mut rng, &[b, nh, dh, dh], 0.0, 1.0),
                random(&mut rng, &[b, nh, dh], 0.0, 1.0),
                random(&mut rng, &[b, nh], 0.0, 1.0),
            ];
            type Chunkwise = fn(
                &Tensor,
                &Tensor,
                &Tensor,
                &Tensor,
                &Tensor,
                usize,
                Option<&MlstmState>,
            ) -> Result<(Tensor, MlstmState)>;
            let run = |chunkwise: Chunkwise| {
                differentiate(&inputs, &weights, |x| {
                    let initial = (x.len() == 8).then(|| MlstmState {
                        c: x[5].clone(),
                        n: x[6].clone(),
                        m: x[7].clone(),
                    });
                    let (h, state) =
                        chunkwise(&x[0], &x[1], &x[2], &x[3], &x[4], chunk, initial.as_ref())?;
                    Ok(vec![h, state.c, state.n, state.m])
                })
            };
            assert_same(
                &format!("chunkwise B{b} NH{nh} S{s} DH{dh} L{chunk} initial {with_initial}"),
                &run(fused_cpu::chunkwise),
                &run(reference::chunkwise),
            );
        }
    }
}

#[test]
fn fused_step_matches_reference_step() {
    let mut rng = StdRng::seed_from_u64(3);
    let (b, nh, dh) = (2, 3, 8);
    let mut fused_state = random_state(&mut rng, b, nh, dh);
    let mut reference_state = fused_state.clone();
    for t in 0..5 {
        let [q, k, v, i, f] = random_inputs(&mut rng, b, nh, 1, dh).map(|x| x.squeeze(2).unwrap());
        let (h_fused, next_fused) = fused_cpu::step(&q, &k, &v, &i, &f, &fused_state).unwrap();
        let (h_ref, next_ref) = reference::step(&q, &k, &v, &i, &f, &reference_state).unwrap();
        assert_close(&format!("step {t} h"), &h_fused, &h_ref, FORWARD_TOL);
        assert_close(
            &format!("step {t} C"),
            &next_fused.c,
            &next_ref.c,
            FORWARD_TOL,
        );
        assert_close(
            &format!("step {t} n"),
            &next_fused.n,
            &next_ref.n,
            FORWARD_TOL,
        );
        assert_close(
            &format!("step {t} m"),
            &next_fused.m,
            &next_ref.m,
            FORWARD_TOL,
        );
        fused_state = next_fused;
        reference_state = next_ref;
    }
}

#[test]
fn parallel_chunkwise_and_stepped_forms_agree() {
    let mut rng = StdRng::seed_from_u64(4);
    let (b, nh, s, dh) = (2, 2, 45, 8);
    let [q, k, v, i, f] = random_inputs(&mut rng, b, nh, s, dh);
    let h_parallel = mlstm::parallel(&q, &k, &v, &i, &f).unwrap();
    let mut state = MlstmState::zeros(b, nh, dh, &Device::Cpu).unwrap();
    let mut stepped = Vec::with_capacity(s);
    for t in 0..s {
        let at = |x: &Tensor| x.narrow(2, t, 1).unwrap().squeeze(2).unwrap();
        let (h, next) = mlstm::step(&at(&q), &at(&k), &at(&v), &at(&i), &at(&f), &state).unwrap();
        stepped.push(h);
        state = next;
    }
    let h_stepped = Tensor::stack(&stepped, 2).unwrap();
    assert_close(
        "stepped vs parallel h",
        &h_stepped,
        &h_parallel,
        FORWARD_TOL,
    );
    for chunk in [1, 4, 16, 45, 64] {
        let (h, last) = mlstm::chunkwise(&q, &k, &v, &i, &f, chunk, None).unwrap();
        let what = format!("chunk {chunk}");
        assert_close(
            &format!("{what} h vs parallel"),
            &h,
            &h_parallel,
            FORWARD_TOL,
        );
        assert_close(
            &format!("{what} C vs steps"),
            &last.c,
            &state.c,
            FORWARD_TOL,
        );
        assert_close(
            &format!("{what} n vs steps"),
            &last.n,
            &state.n,
            FORWARD_TOL,
        );
        assert_close(
            &format!("{what} m vs steps"),
            &last.m,
            &state.m,
            FORWARD_TOL,
        );
    }
    // Splitting the sequence and carrying the state equals one call.
    let (h_head, mid) = mlstm::chunkwise(
        &q.narrow(2, 0, 20).unwrap(),
        &k.narrow(2, 0, 20).unwrap(),
        &v.narrow(2, 0, 20).unwrap(),
        &i.narrow(2, 0, 20).unwrap(),
        &f.narrow(2, 0, 20).unwrap(),
        16,
        None,
    )
    .unwrap();
    let (h_tail, last) = mlstm::chunkwise(
        &q.narrow(2, 20, 25).unwrap(),
        &k.narrow(2, 20, 25).unwrap(),
        &v.narrow(2, 20, 25).unwrap(),
        &i.narrow(2, 20, 25).unwrap(),
        &f.narrow(2, 20, 25).unwrap(),
        16,
        Some(&mid),
    )
    .unwrap();
    let h_split = Tensor::cat(&[h_head, h_tail], 2).unwrap();
    assert_close("split chunkwise h", &h_split, &h_parallel, FORWARD_TOL);
    assert_close("split chunkwise C", &last.c, &state.c, FORWARD_TOL);
}

/// f64 loss `Σ h·w` from an f32 forward.
fn loss_f64(h: &Tensor, weight: &[f32]) -> f64 {
    let h = h.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    h.iter()
        .zip(weight)
        .map(|(a, b)| f64::from(*a) * f64::from(*b))
        .sum()
}

/// Finite differences (f64 loss of the f32 forward) along a random direction of each
/// input in turn, against the fused gradient's directional derivative.
fn check_directional_derivatives(
    what: &str,
    rng: &mut StdRng,
    inputs: &[Tensor],
    forward: impl Fn(&[Tensor]) -> Tensor,
) {
    const STEP: f64 = 5e-3;
    // f32 rounding of the loss divided by the step: below 1e-4 on these sizes.
    const ATOL: f64 = 2e-4;
    const RTOL: f64 = 5e-4;
    let h = forward(inputs);
    let weight = random(rng, h.dims(), 0.0, 1.0);
    let weight_data = weight.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let analytic = differentiate(inputs, std::slice::from_ref(&weight), |x| {
        Ok(vec![forward(x)])
    });
    for (j, input) in inputs.iter().enumerate() {
        let direction = random(rng, input.dims(), 0.0, 1.0);
        let shifted = |offset: f64| {
            let mut moved = inputs.to_vec();
            moved[j] = (input + (&direction * offset).unwrap()).unwrap();
            loss_f64(&forward(&moved), &weight_data)
        };
        let numeric = (shifted(STEP) - shifted(-STEP)) / (2.0 * STEP);
        let predicted = f64::from(
            (&analytic.grads[j] * &direction)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap(),
        );
        assert!(
            numeric.abs() > 40.0 * ATOL,
            "{what} {}: directional derivative {numeric} is too small to test anything",
            INPUT_NAMES[j]
        );
        assert!(
            (numeric - predicted).abs() <= ATOL + RTOL * numeric.abs(),
            "{what} {}: finite difference {numeric} but the backward pass gives {predicted}",
            INPUT_NAMES[j]
        );
    }
}

/// Inputs whose normalisers stay well away from 0 (q·k mostly positive), so finite
/// differences do not straddle the singularity of h = num / |b|.
fn well_conditioned_inputs(
    rng: &mut StdRng,
    b: usize,
    nh: usize,
    s: usize,
    dh: usize,
) -> [Tensor; 5] {
    [
        random(rng, &[b, nh, s, dh], 1.0, 0.5),
        random(rng, &[b, nh, s, dh], 1.0, 0.5),
        random(rng, &[b, nh, s, dh], 0.0, 1.0),
        random(rng, &[b, nh, s], 0.0, 1.5),
        random(rng, &[b, nh, s], 2.0, 1.5),
    ]
}

#[test]
fn fused_gradients_match_finite_differences() {
    let mut rng = StdRng::seed_from_u64(5);
    let (b, nh, dh) = (1, 2, 4);
    let parallel_inputs = well_conditioned_inputs(&mut rng, b, nh, 9, dh);
    check_directional_derivatives("parallel", &mut rng, &parallel_inputs, |x| {
        fused_cpu::parallel(&x[0], &x[1], &x[2], &x[3], &x[4]).unwrap()
    });
    let mut chunk_inputs = well_conditioned_inputs(&mut rng, b, nh, 11, dh).to_vec();
    // A large initial memory makes the m0 derivative (which flows through C0·e^m0) sizeable.
    let state = random_state(&mut rng, b, nh, dh);
    chunk_inputs.extend([(state.c * 4.0).unwrap(), (state.n * 4.0).unwrap(), state.m]);
    check_directional_derivatives("chunkwise", &mut rng, &chunk_inputs, |x| {
        let initial = MlstmState {
            c: x[5].clone(),
            n: x[6].clone(),
            m: x[7].clone(),
        };
        fused_cpu::chunkwise(&x[0], &x[1], &x[2], &x[3], &x[4], 4, Some(&initial))
            .unwrap()
            .0
    });
}

#[test]
fn extreme_gates_give_finite_outputs_and_gradients() {
    let mut rng = StdRng::seed_from_u64(6);
    let (b, nh, s, dh) = (1, 2, 200, 8);
    let [q, k, v, _, _] = random_inputs(&mut rng, b, nh, s, dh);
    let alternating = |phase: usize| {
        let data: Vec<f32> = (0..b * nh * s)
            .map(|j| {
                if (j / 7 + phase).is_multiple_of(2) {
                    50.0
                } else {
                    -50.0
                }
            })
            .collect();
        Tensor::from_vec(data, (b, nh, s), &Device::Cpu).unwrap()
    };
    let constant = |value: f32| Tensor::full(value, (b, nh, s), &Device::Cpu).unwrap();
    let gate_cases = [
        ("i+50 f+50", constant(50.0), constant(50.0)),
        ("i+50 f-50", constant(50.0), constant(-50.0)),
        ("i-50 f+50", constant(-50.0), constant(50.0)),
        ("i-50 f-50", constant(-50.0), constant(-50.0)),
        ("alternating", alternating(0), alternating(1)),
    ];
    let weight = [random(&mut rng, &[b, nh, s, dh], 0.0, 1.0)];
    for (name, igate, fgate) in gate_cases {
        let inputs = [q.clone(), k.clone(), v.clone(), igate, fgate];
        let parallel = differentiate(&inputs, &weight, |x| {
            Ok(vec![mlstm::parallel(&x[0], &x[1], &x[2], &x[3], &x[4])?])
        });
        let chunkwise = differentiate(&inputs, &weight, |x| {
            let (h, state) = mlstm::chunkwise(&x[0], &x[1], &x[2], &x[3], &x[4], 64, None)?;
            Ok(vec![h, state.c, state.n, state.m])
        });
        for (form, result) in [("parallel", &parallel), ("chunkwise", &chunkwise)] {
            for (j, out) in result.outputs.iter().enumerate() {
                assert_finite(&format!("{name} {form} output {j}"), out);
            }
            for (j, grad) in result.grads.iter().enumerate() {
                assert_finite(&format!("{name} {form} grad {}", INPUT_NAMES[j]), grad);
            }
        }
        // With every decay ≈ 1 (i = f = +50) the normaliser is a sum of random scores
        // that nearly cancel (|h| reaches ~5e3), so f32 rounding is amplified ~1e3×.
        assert_close(
            &format!("{name} chunkwise vs parallel h"),
            &chunkwise.outputs[0],
            &parallel.outputs[0],
            (1e-3, 1e-3),
        );
    }
}

fn expect_error(what: &str, result: Result<impl std::fmt::Debug>, needles: &[&str]) {
    let message = result
        .expect_err(&format!("{what}: expected an error"))
        .to_string();
    for needle in needles {
        assert!(
            message.contains(needle),
            "{what}: error {message:?} does not mention {needle:?}"
        );
    }
}

#[test]
fn invalid_inputs_are_rejected_with_clear_errors() {
    let mut rng = StdRng::seed_from_u64(7);
    let [q, k, v, i, f] = random_inputs(&mut rng, 2, 2, 6, 4);
    let short_k = k.narrow(2, 0, 5).unwrap();
    let flat_i = i.flatten_all().unwrap();
    let f64_v = v.to_dtype(DType::F64).unwrap();
    let q3 = q.flatten_to(1).unwrap();
    expect_error(
        "parallel q rank",
        mlstm::parallel(&q3, &k, &v, &i, &f),
        &["mlstm parallel", "q", "[B, NH, S, DH]"],
    );
    expect_error(
        "parallel k shape",
        mlstm::parallel(&q, &short_k, &v, &i, &f),
        &["mlstm parallel", "k has shape [2, 2, 5, 4]", "[2, 2, 6, 4]"],
    );
    expect_error(
        "chunkwise igate shape",
        mlstm::chunkwise(&q, &k, &v, &flat_i, &f, 4, None),
        &["mlstm chunkwise", "igate", "[B, NH, S]"],
    );
    expect_error(
        "chunkwise dtype",
        mlstm::chunkwise(&q, &k, &f64_v, &i, &f, 4, None),
        &["mlstm chunkwise", "v has dtype F64", "F32"],
    );
    expect_error(
        "chunkwise chunk size",
        mlstm::chunkwise(&q, &k, &v, &i, &f, 0, None),
        &["mlstm chunkwise", "chunk_size"],
    );
    let wrong_state = MlstmState::zeros(2, 2, 3, &Device::Cpu).unwrap();
    expect_error(
        "chunkwise state",
        mlstm::chunkwise(&q, &k, &v, &i, &f, 4, Some(&wrong_state)),
        &["mlstm chunkwise", "state.c", "[2, 2, 4, 4]"],
    );
    let at0 = |x: &Tensor| x.narrow(2, 0, 1).unwrap().squeeze(2).unwrap();
    expect_error(
        "step state",
        mlstm::step(
            &at0(&q),
            &at0(&k),
            &at0(&v),
            &at0(&i),
            &at0(&f),
            &wrong_state,
        ),
        &["mlstm step", "state.c"],
    );
    expect_error(
        "step gate",
        mlstm::step(
            &at0(&q),
            &at0(&k),
            &at0(&v),
            &at0(&q),
            &at0(&f),
            &wrong_state,
        ),
        &["mlstm step", "igate", "[B, NH]"],
    );
}

#[test]
fn backward_through_the_fused_step_fails_loudly() {
    let mut rng = StdRng::seed_from_u64(8);
    let [q, k, v, i, f] = random_inputs(&mut rng, 1, 2, 1, 4).map(|x| x.squeeze(2).unwrap());
    let q = Var::from_tensor(&q).unwrap();
    let state = MlstmState::zeros(1, 2, 4, &Device::Cpu).unwrap();
    let (h, _) = fused_cpu::step(q.as_tensor(), &k, &v, &i, &f, &state).unwrap();
    expect_error(
        "step backward",
        h.sum_all().unwrap().backward(),
        &["mlstm-step"],
    );
}
