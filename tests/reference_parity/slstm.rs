//! Reference parity: slstm. Vectors from the official vanilla backend
//! (`slstm_cell.safetensors`, see reference/README.md §2). The candle-ops reference must match
//! everything, including the `full_loss` gradients through the final c, n, m; the public
//! `scan` (fused on CPU, stabiliser treated as a constant in the backward pass) must match the
//! outputs and every gradient of the output loss L_h.

use super::common::{FORWARD_TOL, GRAD_TOL, assert_close, load_vectors};
use candle_core::{Device, Result, Tensor, Var};
use std::collections::HashMap;
use xlstm_forecast::xlstm::kernels::slstm::{
    self, SlstmState, bias_from_vanilla, bias_to_vanilla, powerlaw_forget_bias,
    recurrent_kernel_from_vanilla, recurrent_kernel_to_vanilla,
};

const FILE: &str = "slstm_cell.safetensors";

type ScanFn = fn(&Tensor, &Tensor, &Tensor, Option<&SlstmState>) -> Result<(Tensor, SlstmState)>;

fn vector<'a>(v: &'a HashMap<String, Tensor>, name: &str) -> &'a Tensor {
    v.get(name)
        .unwrap_or_else(|| panic!("{FILE} has no tensor {name}"))
}

struct CaseResult {
    h: Tensor,
    final_state: Tensor,
    grad_x: Tensor,
    grad_r: Tensor,
    grad_bias: Tensor,
    grad_init_state: Option<Tensor>,
}

/// Runs one case with the loss L_h (or L_full = L_h + Σ final_state·loss_weight_state).
fn run_case(
    scan: ScanFn,
    v: &HashMap<String, Tensor>,
    given_init: bool,
    full_loss: bool,
) -> CaseResult {
    let x = Var::from_tensor(vector(v, "x")).unwrap();
    let r = Var::from_tensor(vector(v, "R")).unwrap();
    let bias = Var::from_tensor(vector(v, "bias")).unwrap();
    let init = given_init.then(|| Var::from_tensor(vector(v, "init_state")).unwrap());
    let initial = init
        .as_ref()
        .map(|s| SlstmState::from_stacked(s.as_tensor()).unwrap());
    let (h, state) = scan(&x, &r, &bias, initial.as_ref()).unwrap();
    let final_state = state.stacked().unwrap();
    let mut loss = h
        .mul(vector(v, "loss_weight_h"))
        .unwrap()
        .sum_all()
        .unwrap();
    if full_loss {
        let state_term = final_state
            .mul(vector(v, "loss_weight_state"))
            .unwrap()
            .sum_all()
            .unwrap();
        loss = loss.add(&state_term).unwrap();
    }
    let grads = loss.backward().unwrap();
    let grad = |var: &Var, name: &str| {
        grads
            .get(var)
            .unwrap_or_else(|| panic!("no gradient for {name}"))
            .clone()
    };
    CaseResult {
        grad_x: grad(&x, "x"),
        grad_r: grad(&r, "R"),
        grad_bias: grad(&bias, "bias"),
        grad_init_state: init.as_ref().map(|s| grad(s, "init_state")),
        h,
        final_state,
    }
}

fn check_case(scan: ScanFn, impl_name: &str, case: &str, full_loss: bool) {
    let v = load_vectors(FILE);
    let given_init = case == "given_init";
    let result = run_case(scan, &v, given_init, full_loss);
    let expected = |suffix: &str| {
        let name = if full_loss {
            format!("{case}.full_loss.{suffix}")
        } else {
            format!("{case}.{suffix}")
        };
        vector(&v, &name).clone()
    };
    let label = |what: &str| format!("{impl_name} {case} {what}");
    assert_close(
        &label("h"),
        &result.h,
        vector(&v, &format!("{case}.h")),
        FORWARD_TOL,
    );
    assert_close(
        &label("final_state"),
        &result.final_state,
        vector(&v, &format!("{case}.final_state")),
        FORWARD_TOL,
    );
    assert_close(
        &label("grad_x"),
        &result.grad_x,
        &expected("grad_x"),
        GRAD_TOL,
    );
    assert_close(
        &label("grad_R"),
        &result.grad_r,
        &expected("grad_R"),
        GRAD_TOL,
    );
    assert_close(
        &label("grad_bias"),
        &result.grad_bias,
        &expected("grad_bias"),
        GRAD_TOL,
    );
    if given_init {
        assert_close(
            &label("grad_init_state"),
            result.grad_init_state.as_ref().unwrap(),
            &expected("grad_init_state"),
            GRAD_TOL,
        );
    }
}

#[test]
fn reference_zero_init_matches_official() {
    check_case(slstm::reference::scan, "reference", "zero_init", false);
}

#[test]
fn reference_given_init_matches_official() {
    check_case(slstm::reference::scan, "reference", "given_init", false);
}

#[test]
fn reference_zero_init_full_loss_matches_official() {
    check_case(slstm::reference::scan, "reference", "zero_init", true);
}

#[test]
fn reference_given_init_full_loss_matches_official() {
    check_case(slstm::reference::scan, "reference", "given_init", true);
}

#[test]
fn dispatched_scan_zero_init_matches_official() {
    check_case(slstm::scan, "scan", "zero_init", false);
}

#[test]
fn dispatched_scan_given_init_matches_official() {
    check_case(slstm::scan, "scan", "given_init", false);
}

#[test]
fn vanilla_layouts_convert_both_ways() {
    let v = load_vectors(FILE);
    let r_vanilla = vector(&v, "R_internal_vanilla");
    let bias_vanilla = vector(&v, "bias_internal_vanilla");
    let r = vector(&v, "R");
    let bias = vector(&v, "bias");
    let heads = r.dims()[0];
    // Layout changes only move values: exact equality.
    assert_close(
        "R from vanilla",
        &recurrent_kernel_from_vanilla(r_vanilla).unwrap(),
        r,
        0.0,
    );
    assert_close(
        "R to vanilla",
        &recurrent_kernel_to_vanilla(r).unwrap(),
        r_vanilla,
        0.0,
    );
    assert_close(
        "bias from vanilla",
        &bias_from_vanilla(bias_vanilla, heads).unwrap(),
        bias,
        0.0,
    );
    assert_close(
        "bias to vanilla",
        &bias_to_vanilla(bias).unwrap(),
        bias_vanilla,
        0.0,
    );
}

#[test]
fn powerlaw_bias_matches_official_init() {
    let v = load_vectors(FILE);
    let expected = vector(&v, "bias_init_powerlaw_block0of1");
    let (heads, _, head_dim) = expected.dims3().unwrap();
    let bias = powerlaw_forget_bias(heads, head_dim, 0, 1, &Device::Cpu).unwrap();
    assert_close("powerlaw bias block 0 of 1", &bias, expected, 1e-6);
}

#[test]
fn powerlaw_bias_matches_documented_examples() {
    // XLSTM.md §2: DH = 4, block 0 of 1 → [5, −3.63, −5.63, −7]; block 1 of 2 → [5, 2.93, −1.27, −7].
    for (block_idx, num_blocks, forget) in [
        (0, 1, [5.0f32, -3.63, -5.63, -7.0]),
        (1, 2, [5.0f32, 2.93, -1.27, -7.0]),
    ] {
        let bias = powerlaw_forget_bias(1, 4, block_idx, num_blocks, &Device::Cpu).unwrap();
        let expected = Tensor::from_slice(&forget, 4, &Device::Cpu).unwrap();
        assert_close(
            &format!("powerlaw forget bias block {block_idx} of {num_blocks}"),
            &bias.get(0).unwrap().get(1).unwrap(),
            &expected,
            3e-3,
        );
        let others = bias
            .get(0)
            .unwrap()
            .index_select(&Tensor::new(&[0u32, 2, 3], &Device::Cpu).unwrap(), 0);
        assert_close(
            "powerlaw i/z/o bias",
            &others.unwrap(),
            &Tensor::zeros((3, 4), candle_core::DType::F32, &Device::Cpu).unwrap(),
            0.0,
        );
    }
}

#[test]
fn powerlaw_bias_rejects_degenerate_sizes() {
    let err = powerlaw_forget_bias(2, 1, 0, 1, &Device::Cpu).unwrap_err();
    assert!(err.to_string().contains("head_dim = 1"), "{err}");
    let err = powerlaw_forget_bias(2, 4, 2, 2, &Device::Cpu).unwrap_err();
    assert!(err.to_string().contains("block_idx = 2"), "{err}");
}
