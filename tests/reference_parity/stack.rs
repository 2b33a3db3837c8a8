//! Reference parity: the residual stack (`xlstm_block_stack.safetensors`, reference/README.md
//! §3): an official xLSTMBlockStack with E = 16, an mLSTM block and an sLSTM block, loaded by
//! the official parameter names. Output of the whole-sequence forward (both mLSTM kernels), of
//! the recurrent step, of the state-carrying forward, every gradient, the official
//! initialisation, and the official parameter counts.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use xlstm_forecast::xlstm::config::{MlstmBlockConfig, MlstmKernel, slstm_at_for_ratio};
use xlstm_forecast::xlstm::{StackState, XlstmConfig, XlstmStack};

use super::common::{FORWARD_TOL, GRAD_TOL, assert_close, load_vectors};

const FILE: &str = "xlstm_block_stack.safetensors";

fn vector(v: &HashMap<String, Tensor>, name: &str) -> Tensor {
    v.get(name)
        .unwrap_or_else(|| panic!("{FILE} has no tensor {name}"))
        .clone()
}

/// The file's config: E = 16, 2 blocks, sLSTM at block 1, official defaults otherwise.
fn reference_config(kernel: MlstmKernel) -> XlstmConfig {
    XlstmConfig {
        embedding_dim: 16,
        num_blocks: 2,
        slstm_at: vec![1],
        mlstm: MlstmBlockConfig {
            kernel,
            ..MlstmBlockConfig::default()
        },
        ..XlstmConfig::default()
    }
}

/// The `param.*` tensors as trainable variables, keyed by official name, and the stack loaded
/// from them (a tensor builder: a missing or misnamed parameter is an error, not a fresh one).
fn load_stack(
    v: &HashMap<String, Tensor>,
    kernel: MlstmKernel,
) -> (XlstmStack, HashMap<String, Var>) {
    let vars: HashMap<String, Var> = v
        .iter()
        .filter_map(|(k, t)| {
            k.strip_prefix("param.")
                .map(|name| (name.to_string(), Var::from_tensor(t).unwrap()))
        })
        .collect();
    let tensors = vars
        .iter()
        .map(|(k, var)| (k.clone(), var.as_tensor().clone()))
        .collect();
    let vb = VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
    let stack = XlstmStack::new(&reference_config(kernel), vb)
        .expect("stack loads from the official names");
    (stack, vars)
}

const KERNELS: [MlstmKernel; 3] = [
    MlstmKernel::Parallel,
    MlstmKernel::Chunkwise { chunk_size: 64 },
    // Chunks shorter than the sequence (12 = 5 + 5 + 2) exercise the inter-chunk state.
    MlstmKernel::Chunkwise { chunk_size: 5 },
];

#[test]
fn forward_matches_official_output() {
    let v = load_vectors(FILE);
    for kernel in KERNELS {
        let (stack, _) = load_stack(&v, kernel);
        let y = stack.forward(&vector(&v, "x")).unwrap();
        assert_close(
            &format!("y ({kernel:?})"),
            &y,
            &vector(&v, "y"),
            FORWARD_TOL,
        );
    }
}

#[test]
fn step_matches_official_step_output() {
    let v = load_vectors(FILE);
    let (stack, _) = load_stack(&v, MlstmKernel::default());
    let x = vector(&v, "x");
    let (batch, seq_len, _) = x.dims3().unwrap();
    let mut state = StackState::new(stack.config(), batch, &Device::Cpu).unwrap();
    let steps: Vec<Tensor> = (0..seq_len)
        .map(|t| stack.step(&x.narrow(1, t, 1).unwrap(), &mut state).unwrap())
        .collect();
    let y_step = Tensor::cat(&steps, 1).unwrap();
    assert_close("y_step", &y_step, &vector(&v, "y_step"), FORWARD_TOL);
}

#[test]
fn forward_with_state_continues_the_sequence() {
    let v = load_vectors(FILE);
    let (stack, _) = load_stack(&v, MlstmKernel::Chunkwise { chunk_size: 4 });
    let x = vector(&v, "x");
    let state = StackState::new(stack.config(), x.dim(0).unwrap(), &Device::Cpu).unwrap();
    let (first, state) = stack
        .forward_with_state(&x.narrow(1, 0, 7).unwrap(), &state)
        .unwrap();
    let (second, state) = stack
        .forward_with_state(&x.narrow(1, 7, 4).unwrap(), &state)
        .unwrap();
    let mut state = state;
    let last = stack
        .step(&x.narrow(1, 11, 1).unwrap(), &mut state)
        .unwrap();
    let y = Tensor::cat(&[first, second, last], 1).unwrap();
    assert_close(
        "history forward + continuation + step",
        &y,
        &vector(&v, "y"),
        FORWARD_TOL,
    );
}

#[test]
fn gradients_match_official_autograd() {
    let v = load_vectors(FILE);
    for kernel in KERNELS {
        let (stack, vars) = load_stack(&v, kernel);
        let x = Var::from_tensor(&vector(&v, "x")).unwrap();
        let y = stack.forward_t(x.as_tensor(), true).unwrap();
        let loss = (y * vector(&v, "loss_weight")).unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        let grad = |t: &Tensor, name: &str| {
            grads
                .get(t)
                .unwrap_or_else(|| panic!("no gradient reached {name} ({kernel:?})"))
                .clone()
        };
        assert_close(
            &format!("grad.x ({kernel:?})"),
            &grad(x.as_tensor(), "x"),
            &vector(&v, "grad.x"),
            GRAD_TOL,
        );
        let mut checked = 0;
        for (name, var) in &vars {
            let expected = vector(&v, &format!("grad.{name}"));
            assert_close(
                &format!("grad.{name} ({kernel:?})"),
                &grad(var.as_tensor(), name),
                &expected,
                GRAD_TOL,
            );
            checked += 1;
        }
        assert_eq!(
            checked, 28,
            "every official parameter has its gradient checked"
        );
    }
}

/// Builds a fresh stack in a VarMap; returns the map.
fn fresh(cfg: &XlstmConfig) -> VarMap {
    let varmap = VarMap::new();
    XlstmStack::new(
        cfg,
        VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu),
    )
    .unwrap();
    varmap
}

fn parameter_count(varmap: &VarMap) -> usize {
    varmap.all_vars().iter().map(|v| v.elem_count()).sum()
}

#[test]
fn fresh_initialisation_matches_official_init() {
    let v = load_vectors(FILE);
    let varmap = fresh(&reference_config(MlstmKernel::default()));
    assert_eq!(parameter_count(&varmap), 9_640);
    let data = varmap.data().lock().unwrap();
    let official: Vec<(&str, &Tensor)> = v
        .iter()
        .filter_map(|(k, t)| k.strip_prefix("init.").map(|name| (name, t)))
        .collect();
    assert_eq!(
        data.len(),
        official.len(),
        "same parameter set as the official stack"
    );
    for (name, expected) in official {
        let ours = data
            .get(name)
            .unwrap_or_else(|| panic!("fresh stack lacks the official parameter {name}"))
            .as_tensor();
        assert_eq!(ours.dims(), expected.dims(), "{name}: shape");
        // Random initialisers only need the right shape; deterministic ones must match exactly.
        let random = name.ends_with("proj_up.weight")
            || name.ends_with("proj_down.weight")
            || name.ends_with("_proj.weight")
            || name.contains("conv1d")
            || name.ends_with("igate.bias")
            || name.ends_with("gate.weight") && name.starts_with("blocks.1.");
        if !random {
            assert_close(&format!("init.{name}"), ours, expected, 1e-6);
        }
    }
}

#[test]
fn parameter_counts_match_official_stacks() {
    for (mlstm_parts, slstm_parts, expected) in [(3, 1, 124_056), (1, 0, 120_672), (0, 1, 134_208)]
    {
        let cfg = XlstmConfig {
            slstm_at: slstm_at_for_ratio(4, mlstm_parts, slstm_parts).unwrap(),
            ..XlstmConfig::default()
        };
        assert_eq!(
            parameter_count(&fresh(&cfg)),
            expected,
            "{} with E = 64, 4 blocks, 4 heads",
            cfg.variant_name()
        );
    }
}
