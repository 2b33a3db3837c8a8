//! The fused CPU layer kernels (LayerNorm, multi-head LayerNorm, causal conv + SiLU, head-wise
//! linear, the SiLU- and GeLU-gates, the feature scale, the head-major packing) against their
//! candle-ops references: outputs and the gradients of every input (x, scale, bias), on
//! contiguous and strided inputs, plus a finite-difference check and argument errors.

use candle_core::{DType, Device, Result, Tensor, Var};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand_distr::{Distribution, Normal};
use xlstm_forecast::xlstm::kernels::norm::{self, fused_cpu, reference};
use xlstm_forecast::xlstm::kernels::{conv, gate, headwise, pack};

const EPS: f64 = 1e-5;
const FORWARD_TOL: (f32, f32) = (1e-5, 1e-4);
const GRAD_TOL: (f32, f32) = (1e-4, 1e-3);

fn random(rng: &mut StdRng, shape: &[usize], mean: f32, std: f32) -> Tensor {
    let normal = Normal::new(mean, std).unwrap();
    let len = shape.iter().product();
    let data: Vec<f32> = (0..len).map(|_| normal.sample(rng)).collect();
    Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
}

fn assert_close(what: &str, actual: &Tensor, expected: &Tensor, (atol, rtol): (f32, f32)) {
    assert_eq!(actual.dims(), expected.dims(), "{what}: shape");
    let actual = actual.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let expected = expected.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    for (i, (a, e)) in actual.iter().zip(&expected).enumerate() {
        assert!(
            (a - e).abs() <= atol + rtol * e.abs(),
            "{what}: element {i} is {a} but expected {e} (tolerance {atol} + {rtol}·|expected|)"
        );
    }
}

/// Output and gradients of Σ forward(inputs) ⊙ weight with respect to every input.
fn differentiate(
    inputs: &[Tensor],
    weight: &Tensor,
    forward: impl Fn(&[Tensor]) -> Result<Tensor>,
) -> (Tensor, Vec<Tensor>) {
    let vars: Vec<Var> = inputs
        .iter()
        .map(|t| Var::from_tensor(t).unwrap())
        .collect();
    let tensors: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let out = forward(&tensors).unwrap();
    let grads = (&out * weight)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let grads = vars
        .iter()
        .map(|v| {
            grads
                .get(v.as_tensor())
                .expect("every input gets a gradient")
                .clone()
        })
        .collect();
    (out, grads)
}

fn assert_same(
    what: &str,
    names: &[&str],
    fused: &(Tensor, Vec<Tensor>),
    reference: &(Tensor, Vec<Tensor>),
) {
    assert_close(
        &format!("{what} output"),
        &fused.0,
        &reference.0,
        FORWARD_TOL,
    );
    for ((f, r), name) in fused.1.iter().zip(&reference.1).zip(names) {
        assert_close(&format!("{what} grad {name}"), f, r, GRAD_TOL);
    }
}

type LayerNormFn = fn(&Tensor, &Tensor, Option<&Tensor>, f64) -> Result<Tensor>;

#[test]
fn fused_layer_norm_matches_reference_with_and_without_bias() {
    let mut rng = StdRng::seed_from_u64(11);
    // One row, odd widths, rows that do not fill a rayon task, many rows, the stack's E = 64.
    for shape in [
        vec![1, 1, 5],
        vec![3, 7],
        vec![2, 9, 33],
        vec![4, 300, 64],
        vec![5000, 16],
    ] {
        let features = *shape.last().unwrap();
        for with_bias in [false, true] {
            // Shifted, scaled rows: the mean and variance matter.
            let mut inputs = vec![
                random(&mut rng, &shape, 0.7, 2.0),
                random(&mut rng, &[features], 1.0, 0.5),
            ];
            if with_bias {
                inputs.push(random(&mut rng, &[features], 0.0, 1.0));
            }
            let weight = random(&mut rng, &shape, 0.0, 1.0);
            let run = |f: LayerNormFn| {
                differentiate(&inputs, &weight, |x| f(&x[0], &x[1], x.get(2), EPS))
            };
            assert_same(
                &format!("layer norm {shape:?} bias {with_bias}"),
                &["x", "scale", "bias"],
                &run(fused_cpu::layer_norm),
                &run(reference::layer_norm),
            );
        }
    }
}

type MultiHeadFn = fn(&Tensor, &Tensor, f64) -> Result<Tensor>;

#[test]
fn fused_multi_head_layer_norm_matches_reference() {
    let mut rng = StdRng::seed_from_u64(12);
    for (b, nh, s, dh) in [(1, 1, 1, 4), (2, 3, 7, 5), (2, 4, 96, 32), (3, 4, 300, 16)] {
        let inputs = [
            random(&mut rng, &[b, nh, s, dh], -0.3, 1.5),
            random(&mut rng, &[nh * dh], 1.0, 0.5),
        ];
        let weight = random(&mut rng, &[b, s, nh * dh], 0.0, 1.0);
        let run = |f: MultiHeadFn| differentiate(&inputs, &weight, |x| f(&x[0], &x[1], EPS));
        assert_same(
            &format!("multi-head layer norm B{b} NH{nh} S{s} DH{dh}"),
            &["h", "scale"],
            &run(fused_cpu::multi_head_layer_norm),
            &run(reference::multi_head_layer_norm),
        );
    }
}

/// The cells hand over views (a narrow of a packed output, a transpose): the fused op reads
/// them in place or copies them, and the gradient reaches the viewed tensor either way.
#[test]
fn fused_multi_head_layer_norm_reads_strided_views() {
    let mut rng = StdRng::seed_from_u64(13);
    let (b, nh, s, dh) = (2, 3, 10, 8);
    let packed = random(&mut rng, &[b, nh, s + 4, dh], 0.0, 1.0);
    let token_major = random(&mut rng, &[b, s, nh, dh], 0.0, 1.0);
    let scale = random(&mut rng, &[nh * dh], 1.0, 0.5);
    let weight = random(&mut rng, &[b, s, nh * dh], 0.0, 1.0);
    type View = fn(&Tensor) -> Result<Tensor>;
    let views: [(&str, Tensor, View); 2] = [
        ("narrow", packed, |t| t.narrow(2, 2, t.dim(2)? - 4)),
        ("transpose", token_major, |t| t.transpose(1, 2)),
    ];
    for (name, base, view) in views {
        let inputs = [base, scale.clone()];
        let run =
            |f: MultiHeadFn| differentiate(&inputs, &weight, |x| f(&view(&x[0])?, &x[1], EPS));
        assert_same(
            &format!("multi-head layer norm on a {name} view"),
            &["base", "scale"],
            &run(fused_cpu::multi_head_layer_norm),
            &run(reference::multi_head_layer_norm),
        );
    }
}

/// Central differences of an f64 loss along a random direction of each input, against the
/// fused backward pass.
#[test]
fn fused_layer_gradients_match_finite_differences() {
    const STEP: f64 = 1e-2;
    let mut rng = StdRng::seed_from_u64(14);
    let ln_inputs = vec![
        random(&mut rng, &[3, 6], 0.5, 1.0),
        random(&mut rng, &[6], 1.0, 0.5),
        random(&mut rng, &[6], 0.0, 1.0),
    ];
    let mh_inputs = vec![
        random(&mut rng, &[2, 2, 3, 4], 0.0, 1.0),
        random(&mut rng, &[8], 1.0, 0.5),
    ];
    type Forward = Box<dyn Fn(&[Tensor]) -> Result<Tensor>>;
    let headwise_inputs = vec![
        random(&mut rng, &[2, 3, 12], 0.0, 1.0),
        random(&mut rng, &[3, 5, 4], 0.0, 0.5),
    ];
    let gate_inputs = vec![
        random(&mut rng, &[2, 3, 5], 0.0, 1.0),
        random(&mut rng, &[2, 3, 5], 0.5, 1.0),
        random(&mut rng, &[2, 3, 5], 0.0, 2.0),
    ];
    let side_by_side_inputs = vec![
        random(&mut rng, &[2, 3, 8], 0.0, 1.0),
        random(&mut rng, &[2, 3, 8], 0.3, 1.0),
        random(&mut rng, &[2, 4, 4], 0.0, 0.5),
        random(&mut rng, &[2, 4, 4], 0.0, 0.5),
        random(&mut rng, &[2, 4, 4], 0.0, 0.5),
    ];
    let gelu_inputs = vec![random(&mut rng, &[3, 2, 8], 0.0, 1.5)];
    let scale_inputs = vec![
        random(&mut rng, &[2, 3, 5], 0.0, 1.0),
        random(&mut rng, &[5], 1.0, 0.5),
    ];
    let cases: [(&str, Vec<Tensor>, Forward); 7] = [
        (
            "head-wise maps side by side",
            side_by_side_inputs,
            Box::new(|x| {
                headwise::fused_cpu::headwise_linear_side_by_side(
                    [&x[0], &x[1]],
                    &[&x[2], &x[3], &x[4]],
                    1,
                )
            }),
        ),
        (
            "feature scale",
            scale_inputs,
            Box::new(|x| gate::fused_cpu::scale_features(&x[0], &x[1])),
        ),
        (
            "GeLU-gated",
            gelu_inputs,
            Box::new(|x| gate::fused_cpu::gelu_gated(&x[0])),
        ),
        (
            "SiLU-gated sum",
            gate_inputs,
            Box::new(|x| gate::fused_cpu::silu_gated_sum(&x[0], &x[1], &x[2])),
        ),
        (
            "head-wise linear",
            headwise_inputs,
            Box::new(|x| headwise::fused_cpu::headwise_linear(&x[0], &x[1])),
        ),
        (
            "layer norm",
            ln_inputs,
            Box::new(|x| fused_cpu::layer_norm(&x[0], &x[1], Some(&x[2]), EPS)),
        ),
        (
            "multi-head layer norm",
            mh_inputs,
            Box::new(|x| fused_cpu::multi_head_layer_norm(&x[0], &x[1], EPS)),
        ),
    ];
    for (what, inputs, forward) in cases {
        let out = forward(&inputs).unwrap();
        let weight = random(&mut rng, out.dims(), 0.0, 1.0);
        let weight_data = weight.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let loss = |x: &[Tensor]| -> f64 {
            let y = forward(x)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            y.iter()
                .zip(&weight_data)
                .map(|(a, b)| f64::from(*a) * f64::from(*b))
                .sum()
        };
        let (_, grads) = differentiate(&inputs, &weight, &forward);
        for (j, input) in inputs.iter().enumerate() {
            let direction = random(&mut rng, input.dims(), 0.0, 1.0);
            let moved = |offset: f64| {
                let mut x = inputs.clone();
                x[j] = (input + (&direction * offset).unwrap()).unwrap();
                loss(&x)
            };
            let numeric = (moved(STEP) - moved(-STEP)) / (2.0 * STEP);
            let predicted = f64::from(
                (&grads[j] * &direction)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap(),
            );
            assert!(
                numeric.abs() > 1e-2,
                "{what} input {j}: derivative {numeric} too small to test"
            );
            assert!(
                (numeric - predicted).abs() <= 2e-3 + 2e-3 * numeric.abs(),
                "{what} input {j}: finite difference {numeric}, backward pass {predicted}"
            );
        }
    }
}

#[test]
fn norm_arguments_are_checked_with_clear_errors() {
    let dev = Device::Cpu;
    let x = Tensor::zeros((2, 3, 8), DType::F32, &dev).unwrap();
    let scale = Tensor::ones(8, DType::F32, &dev).unwrap();
    let err = norm::layer_norm(&x, &Tensor::ones(7, DType::F32, &dev).unwrap(), None, EPS)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("scale has shape [7]") && err.contains("[8]"),
        "{err}"
    );
    let err = norm::layer_norm(
        &x,
        &scale,
        Some(&Tensor::ones(3, DType::F32, &dev).unwrap()),
        EPS,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("bias has shape [3]"), "{err}");
    let err = norm::multi_head_layer_norm(&x, &scale, EPS)
        .unwrap_err()
        .to_string();
    assert!(err.contains("expected [B, NH, S, DH]"), "{err}");
    let h = Tensor::zeros((2, 2, 3, 4), DType::F32, &dev).unwrap();
    let err = norm::multi_head_layer_norm(&h, &Tensor::ones(4, DType::F32, &dev).unwrap(), EPS)
        .unwrap_err()
        .to_string();
    assert!(err.contains("expected [NH·DH] = [8]"), "{err}");
    let err = norm::layer_norm(&x, &scale.to_dtype(DType::F64).unwrap(), None, EPS)
        .unwrap_err()
        .to_string();
    assert!(err.contains("scale has dtype F64"), "{err}");
}

/// Off the fused path (another dtype) the reference runs and agrees with the fused f32 op.
#[test]
fn non_f32_inputs_take_the_reference_path() {
    let mut rng = StdRng::seed_from_u64(15);
    let x = random(&mut rng, &[4, 16], 0.0, 1.0);
    let scale = random(&mut rng, &[16], 1.0, 0.2);
    let fused = norm::layer_norm(&x, &scale, None, EPS).unwrap();
    let as_f64 = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
    let wide = norm::layer_norm(&as_f64(&x), &as_f64(&scale), None, EPS).unwrap();
    assert_eq!(wide.dtype(), DType::F64);
    assert_close(
        "f64 layer norm",
        &wide.to_dtype(DType::F32).unwrap(),
        &fused,
        FORWARD_TOL,
    );
}

type ConvFn = fn(&Tensor, &Tensor, &Tensor, Option<&Tensor>) -> Result<Tensor>;

/// Fused causal conv + SiLU against the candle-ops reference: with and without a carried state,
/// sequences shorter than the kernel, and x handed over as a narrow view (as the mLSTM block
/// does with its up-projection).
#[test]
fn fused_causal_conv_silu_matches_reference() {
    let mut rng = StdRng::seed_from_u64(21);
    for (b, s, c, k) in [
        (1, 1, 3, 4),
        (2, 3, 5, 4),
        (2, 17, 8, 1),
        (3, 96, 128, 4),
        (2, 9, 6, 2),
    ] {
        for with_state in [false, true] {
            for as_view in [false, true] {
                let wide = random(&mut rng, &[b, s, 2 * c], 0.0, 1.5);
                let mut inputs = vec![
                    wide,
                    random(&mut rng, &[c, k], 0.0, 0.7),
                    random(&mut rng, &[c], 0.0, 0.5),
                ];
                if with_state {
                    inputs.push(random(&mut rng, &[b, k, c], 0.0, 1.0));
                }
                let weight = random(&mut rng, &[b, s, c], 0.0, 1.0);
                let run = |f: ConvFn| {
                    differentiate(&inputs, &weight, |x| {
                        let input = if as_view {
                            x[0].narrow(2, c, c)?
                        } else {
                            x[0].narrow(2, 0, c)?.contiguous()?
                        };
                        f(&input, &x[1], &x[2], x.get(3))
                    })
                };
                assert_same(
                    &format!("conv B{b} S{s} C{c} K{k} state {with_state} view {as_view}"),
                    &["x", "weight", "bias", "state"],
                    &run(conv::fused_cpu::causal_conv_silu),
                    &run(conv::reference::causal_conv_silu),
                );
            }
        }
    }
}

#[test]
fn conv_arguments_are_checked_with_clear_errors() {
    let dev = Device::Cpu;
    let x = Tensor::zeros((2, 5, 3), DType::F32, &dev).unwrap();
    let weight = Tensor::zeros((3, 4), DType::F32, &dev).unwrap();
    let bias = Tensor::zeros(3, DType::F32, &dev).unwrap();
    let err = conv::causal_conv_silu(
        &x,
        &Tensor::zeros((2, 4), DType::F32, &dev).unwrap(),
        &bias,
        None,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("weight has shape [2, 4]") && err.contains("[3, K]"),
        "{err}"
    );
    let state = Tensor::zeros((2, 3, 3), DType::F32, &dev).unwrap();
    let err = conv::causal_conv_silu(&x, &weight, &bias, Some(&state))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("state has shape [2, 3, 3]") && err.contains("[2, 4, 3]"),
        "{err}"
    );
}

/// Fused head-wise linear map against the batched-matmul reference: the mLSTM's 4×4 and the
/// sLSTM's 16×16 blocks, rectangular blocks (the generic path), one row, more rows than one
/// parallel task takes, and x handed over as a view.
#[test]
fn fused_headwise_linear_matches_reference() {
    let mut rng = StdRng::seed_from_u64(31);
    for (lead, blocks, d_out, d_in) in [
        (vec![2, 5], 32, 4, 4),
        (vec![3, 7], 4, 16, 16),
        (vec![1], 3, 2, 5),
        (vec![600], 2, 8, 8),
        (vec![2, 300], 2, 32, 32),
    ] {
        for as_view in [false, true] {
            let mut wide_dims = lead.clone();
            wide_dims.push(2 * blocks * d_in);
            let inputs = vec![
                random(&mut rng, &wide_dims, 0.0, 1.0),
                random(&mut rng, &[blocks, d_out, d_in], 0.0, 0.5),
            ];
            let mut out_dims = lead.clone();
            out_dims.push(blocks * d_out);
            let weight = random(&mut rng, &out_dims, 0.0, 1.0);
            let last = lead.len();
            let run = |f: fn(&Tensor, &Tensor) -> Result<Tensor>| {
                differentiate(&inputs, &weight, |x| {
                    let input = if as_view {
                        x[0].narrow(last, blocks * d_in, blocks * d_in)?
                    } else {
                        x[0].narrow(last, 0, blocks * d_in)?.contiguous()?
                    };
                    f(&input, &x[1])
                })
            };
            assert_same(
                &format!("head-wise {lead:?} NB{blocks} {d_out}x{d_in} view {as_view}"),
                &["x", "weight"],
                &run(headwise::fused_cpu::headwise_linear),
                &run(headwise::reference::headwise_linear),
            );
        }
    }
}

/// Several maps side by side against each map on its own concatenated, with every map on the
/// first input, a split, and all but one on the second; rows that fill neither a task nor a
/// group of outer products.
#[test]
fn fused_headwise_maps_side_by_side_match_reference() {
    let mut rng = StdRng::seed_from_u64(33);
    for (rows, maps, maps_on_first, blocks, d) in [
        (vec![1], 1, 1, 3, 5),
        (vec![2, 5], 4, 2, 4, 16),
        (vec![3, 7], 3, 3, 2, 8),
        (vec![4, 97], 4, 2, 4, 16),
        (vec![600], 3, 1, 8, 4),
        (vec![2, 9], 2, 0, 2, 6),
    ] {
        let mut in_dims = rows.clone();
        in_dims.push(blocks * d);
        // Only the inputs some map reads (an unread one gets no gradient).
        let read = [maps_on_first > 0, maps_on_first < maps];
        let mut inputs = vec![
            random(&mut rng, &in_dims, 0.0, 1.0),
            random(&mut rng, &in_dims, 0.5, 1.5),
        ];
        let mut names = vec!["first", "second"];
        for (i, read) in read.iter().enumerate().rev() {
            if !read {
                inputs.remove(i);
                names.remove(i);
            }
        }
        let read_inputs = inputs.len();
        names.extend(["w0", "w1", "w2", "w3"]);
        for _ in 0..maps {
            inputs.push(random(&mut rng, &[blocks, d, d], 0.0, 0.5));
        }
        let mut out_dims = rows.clone();
        out_dims.push(maps * blocks * d);
        let weight = random(&mut rng, &out_dims, 0.0, 1.0);
        type SideBySide = fn([&Tensor; 2], &[&Tensor], usize) -> Result<Tensor>;
        let run = |f: SideBySide| {
            differentiate(&inputs, &weight, |x| {
                let weights: Vec<&Tensor> = x[read_inputs..].iter().collect();
                f([&x[0], &x[read_inputs - 1]], &weights, maps_on_first)
            })
        };
        let fused = run(headwise::fused_cpu::headwise_linear_side_by_side);
        let reference = run(headwise::reference::headwise_linear_side_by_side);
        assert_same(
            &format!("{maps} head-wise maps, {maps_on_first} on the first input, rows {rows:?}"),
            &names,
            &fused,
            &reference,
        );
    }
}

#[test]
fn headwise_maps_side_by_side_are_checked_with_clear_errors() {
    let dev = Device::Cpu;
    let x = Tensor::zeros((2, 3, 8), DType::F32, &dev).unwrap();
    let other = Tensor::zeros((2, 4, 8), DType::F32, &dev).unwrap();
    let w = Tensor::zeros((2, 4, 4), DType::F32, &dev).unwrap();
    let w_small = Tensor::zeros((4, 2, 2), DType::F32, &dev).unwrap();
    let err = |inputs: [&Tensor; 2], weights: &[&Tensor], first: usize| {
        headwise::headwise_linear_side_by_side(inputs, weights, first)
            .unwrap_err()
            .to_string()
    };
    assert!(err([&x, &x], &[], 0).contains("no weights given"));
    assert!(err([&x, &x], &[&w], 2).contains("2 maps on the first input, but only 1 weights"));
    assert!(
        err([&x, &other], &[&w, &w], 1).contains("the inputs have shapes [2, 3, 8] and [2, 4, 8]")
    );
    assert!(
        err([&x, &x], &[&w, &w_small], 1)
            .contains("weight 1 has shape [4, 2, 2], expected [2, 4, 4]")
    );
}

/// The weight gradient sums its per-task parts in a fixed order: the same inputs give the same
/// bits every time, whatever the threads did.
#[test]
fn fused_headwise_weight_gradient_is_deterministic() {
    let mut rng = StdRng::seed_from_u64(32);
    let inputs = vec![
        random(&mut rng, &[4, 700, 64], 0.0, 1.0),
        random(&mut rng, &[4, 16, 16], 0.0, 0.5),
    ];
    let weight = random(&mut rng, &[4, 700, 64], 0.0, 1.0);
    let grads = || {
        differentiate(&inputs, &weight, |x| {
            headwise::headwise_linear(&x[0], &x[1])
        })
        .1[1]
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    let first = grads();
    for _ in 0..3 {
        assert_eq!(grads(), first);
    }
}

#[test]
fn headwise_arguments_are_checked_with_clear_errors() {
    let dev = Device::Cpu;
    let x = Tensor::zeros((2, 3, 8), DType::F32, &dev).unwrap();
    let err = headwise::headwise_linear(&x, &Tensor::zeros((2, 4), DType::F32, &dev).unwrap())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("weight has shape [2, 4], expected [NB, d_out, d_in]"),
        "{err}"
    );
    let err = headwise::headwise_linear(&x, &Tensor::zeros((3, 4, 4), DType::F32, &dev).unwrap())
        .unwrap_err()
        .to_string();
    assert!(err.contains("expected [.., NB·d_in] = [.., 12]"), "{err}");
    let err = headwise::headwise_linear(&x, &Tensor::zeros((2, 4, 4), DType::F64, &dev).unwrap())
        .unwrap_err()
        .to_string();
    assert!(err.contains("weight is F64"), "{err}");
}

/// Fused output gate against `(a + b) ⊙ SiLU(z)` from candle ops, with z contiguous and as the
/// z half of an up-projection (a view with strided rows), and extreme z.
#[test]
fn fused_silu_gated_sum_matches_reference() {
    let mut rng = StdRng::seed_from_u64(33);
    for dims in [
        vec![1usize, 1, 1],
        vec![2, 9, 16],
        vec![3, 70, 128],
        vec![5, 12],
    ] {
        for as_view in [false, true] {
            let last = dims.len() - 1;
            let mut wide = dims.clone();
            wide[last] *= 2;
            let inputs = vec![
                random(&mut rng, &dims, 0.0, 1.0),
                random(&mut rng, &dims, 0.0, 1.0),
                random(&mut rng, &wide, 0.0, 30.0),
            ];
            let weight = random(&mut rng, &dims, 0.0, 1.0);
            let width = dims[last];
            let run = |f: fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor>| {
                differentiate(&inputs, &weight, |x| {
                    let z = if as_view {
                        x[2].narrow(last, width, width)?
                    } else {
                        x[2].narrow(last, 0, width)?.contiguous()?
                    };
                    f(&x[0], &x[1], &z)
                })
            };
            assert_same(
                &format!("gated sum {dims:?} view {as_view}"),
                &["a", "b", "z"],
                &run(gate::fused_cpu::silu_gated_sum),
                &run(gate::reference::silu_gated_sum),
            );
        }
    }
    let a = Tensor::zeros((2, 4), DType::F32, &Device::Cpu).unwrap();
    let err = gate::silu_gated_sum(
        &a,
        &a,
        &Tensor::zeros((2, 3), DType::F32, &Device::Cpu).unwrap(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("z has shape [2, 3], expected the shape of a [2, 4]"),
        "{err}"
    );
}

/// Fused GeLU gate against `GeLU(g) ⊙ u` from candle ops (exact erf GeLU), with the
/// up-projection contiguous and as a view with strided rows, and extreme values.
#[test]
fn fused_gelu_gated_matches_reference() {
    let mut rng = StdRng::seed_from_u64(34);
    for dims in [
        vec![1usize, 2],
        vec![2, 9, 32],
        vec![3, 70, 256],
        vec![4, 6],
    ] {
        for as_view in [false, true] {
            let last = dims.len() - 1;
            let mut wide = dims.clone();
            wide[last] *= 2;
            let inputs = vec![random(&mut rng, &wide, 0.0, 4.0)];
            let width = dims[last];
            let mut out = dims.clone();
            out[last] /= 2;
            let weight = random(&mut rng, &out, 0.0, 1.0);
            let run = |f: fn(&Tensor) -> Result<Tensor>| {
                differentiate(&inputs, &weight, |x| {
                    let up = if as_view {
                        x[0].narrow(last, width, width)?
                    } else {
                        x[0].narrow(last, 0, width)?.contiguous()?
                    };
                    f(&up)
                })
            };
            assert_same(
                &format!("GeLU gate {dims:?} view {as_view}"),
                &["up"],
                &run(gate::fused_cpu::gelu_gated),
                &run(gate::reference::gelu_gated),
            );
        }
    }
    let odd = Tensor::zeros((2, 3), DType::F32, &Device::Cpu).unwrap();
    let err = gate::gelu_gated(&odd).unwrap_err().to_string();
    assert!(
        err.contains("up has shape [2, 3], expected [.., 2F]"),
        "{err}"
    );
}

/// Fused feature scale against `x ⊙ w` from candle ops: shapes with rows that do not fill a
/// rayon task and with many tasks (the weight gradient is summed over both), and a view.
#[test]
fn fused_feature_scale_matches_reference() {
    let mut rng = StdRng::seed_from_u64(35);
    for dims in [
        vec![1usize, 1],
        vec![2, 9, 16],
        vec![3, 700, 128],
        vec![5, 12],
    ] {
        let width = *dims.last().unwrap();
        let inputs = vec![
            random(&mut rng, &dims, 0.0, 1.0),
            random(&mut rng, &[width], 1.0, 0.5),
        ];
        let weight = random(&mut rng, &dims, 0.0, 1.0);
        let run = |f: fn(&Tensor, &Tensor) -> Result<Tensor>| {
            differentiate(&inputs, &weight, |x| f(&x[0], &x[1]))
        };
        assert_same(
            &format!("feature scale {dims:?}"),
            &["x", "scale"],
            &run(gate::fused_cpu::scale_features),
            &run(gate::reference::scale_features),
        );
    }
    // A transposed view is read as the values it shows.
    let x = random(&mut rng, &[6, 4], 0.0, 1.0);
    let scale = random(&mut rng, &[6], 1.0, 0.5);
    assert_close(
        "feature scale of a view",
        &gate::scale_features(&x.t().unwrap(), &scale).unwrap(),
        &gate::reference::scale_features(&x.t().unwrap(), &scale).unwrap(),
        FORWARD_TOL,
    );
    let err = gate::scale_features(&x, &scale).unwrap_err().to_string();
    assert!(
        err.contains("scale has shape [6], expected [4] (the last dim of x [6, 4])"),
        "{err}"
    );
}

/// q, k and v side by side in one tensor pack as the three thirds do, and the fused op equals
/// the permuted copy of candle ops exactly, forward and backward.
#[test]
fn fused_pack_heads_side_by_side_matches_reference() {
    let mut rng = StdRng::seed_from_u64(38);
    for (dims, heads) in [
        ([1usize, 1, 12], 1usize),
        ([2, 5, 36], 3),
        ([3, 96, 384], 4),
    ] {
        let inputs = vec![random(&mut rng, &dims, 0.0, 1.0)];
        let d = dims[2] / 3;
        let packed_dims = [dims[0], heads, dims[1], dims[2] / heads];
        let weight = random(&mut rng, &packed_dims, 0.0, 1.0);
        let run = |f: fn(&Tensor, usize) -> Result<Tensor>| {
            differentiate(&inputs, &weight, |x| f(&x[0], heads))
        };
        let fused = run(pack::fused_cpu::pack_heads_side_by_side);
        let reference = run(pack::reference::pack_heads_side_by_side);
        let what = format!("{dims:?} / {heads}");
        assert_close(&what, &fused.0, &reference.0, (0.0, 0.0));
        assert_close(
            &format!("grad {what}"),
            &fused.1[0],
            &reference.1[0],
            (0.0, 0.0),
        );
        let third = |i: usize| inputs[0].narrow(2, i * d, d).unwrap().contiguous().unwrap();
        let from_thirds = pack::pack_heads(&third(0), &third(1), &third(2), heads).unwrap();
        assert_close(
            &format!("thirds {what}"),
            &fused.0,
            &from_thirds,
            (0.0, 0.0),
        );
    }
    let qkv = Tensor::zeros((2, 3, 10), DType::F32, &Device::Cpu).unwrap();
    let err = pack::pack_heads_side_by_side(&qkv, 1)
        .unwrap_err()
        .to_string();
    assert!(err.contains("not three parts of 1 heads"), "{err}");
}

/// The fused head-major packing equals the concatenation and permuted copy of candle ops
/// exactly, forward and backward (both are copies), including S = 1 and one head.
#[test]
fn fused_pack_heads_matches_reference() {
    let mut rng = StdRng::seed_from_u64(37);
    for (dims, heads) in [
        ([1usize, 1, 4], 1usize),
        ([2, 5, 12], 3),
        ([3, 96, 128], 4),
        ([2, 7, 16], 16),
    ] {
        let inputs: Vec<Tensor> = (0..3).map(|_| random(&mut rng, &dims, 0.0, 1.0)).collect();
        let packed_dims = [dims[0], heads, dims[1], 3 * dims[2] / heads];
        let weight = random(&mut rng, &packed_dims, 0.0, 1.0);
        let run = |f: fn(&Tensor, &Tensor, &Tensor, usize) -> Result<Tensor>| {
            differentiate(&inputs, &weight, |x| f(&x[0], &x[1], &x[2], heads))
        };
        let (fused, reference) = (
            run(pack::fused_cpu::pack_heads),
            run(pack::reference::pack_heads),
        );
        assert_close(
            &format!("packed {dims:?} / {heads}"),
            &fused.0,
            &reference.0,
            (0.0, 0.0),
        );
        for (name, (f, r)) in ["q", "k", "v"].iter().zip(fused.1.iter().zip(&reference.1)) {
            assert_close(&format!("grad {name} {dims:?} / {heads}"), f, r, (0.0, 0.0));
        }
    }
    let q = Tensor::zeros((2, 3, 8), DType::F32, &Device::Cpu).unwrap();
    let err = pack::pack_heads(&q, &q, &q, 3).unwrap_err().to_string();
    assert!(
        err.contains("3 heads do not divide the feature dim 8"),
        "{err}"
    );
    let k = Tensor::zeros((2, 4, 8), DType::F32, &Device::Cpu).unwrap();
    let err = pack::pack_heads(&q, &k, &q, 2).unwrap_err().to_string();
    assert!(
        err.contains("k has shape [2, 4, 8], expected the shape of q [2, 3, 8]"),
        "{err}"
    );
}
