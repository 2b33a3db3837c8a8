//! The residual xLSTM stack with random weights: the three ways to run it (whole-sequence
//! forward with either mLSTM kernel, state-carrying forward, recurrent step) agree, training
//! gradients reach every parameter, and bad configs are refused with errors naming the field.

use candle_core::{DType, Device, Result, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use xlstm_forecast::xlstm::config::{MlstmBlockConfig, SlstmBlockConfig};
use xlstm_forecast::xlstm::{MlstmKernel, StackState, XlstmConfig, XlstmStack};

/// A freshly initialised stack whose parameters are then perturbed with N(0, 0.1²) noise so that
/// zero-initialised weights (recurrent kernel, gate weights, norm offsets) are exercised too.
fn random_stack(cfg: &XlstmConfig) -> (XlstmStack, VarMap) {
    let varmap = VarMap::new();
    let stack = XlstmStack::new(
        cfg,
        VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu),
    )
    .unwrap();
    for var in varmap.all_vars() {
        let noise = Tensor::randn(0f32, 0.1, var.shape(), &Device::Cpu).unwrap();
        var.set(&(var.as_tensor() + noise).unwrap()).unwrap();
    }
    (stack, varmap)
}

fn config(embedding_dim: usize, num_blocks: usize, slstm_at: Vec<usize>) -> XlstmConfig {
    XlstmConfig {
        embedding_dim,
        num_blocks,
        slstm_at,
        ..XlstmConfig::default()
    }
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar()
        .unwrap()
}

fn steps(stack: &XlstmStack, x: &Tensor) -> Result<Tensor> {
    let (batch, seq_len, _) = x.dims3()?;
    let mut state = StackState::new(stack.config(), batch, x.device())?;
    let ys = (0..seq_len)
        .map(|t| stack.step(&x.narrow(1, t, 1)?, &mut state))
        .collect::<Result<Vec<_>>>()?;
    Tensor::cat(&ys, 1)
}

#[test]
fn forward_equals_step_by_step() {
    let cases = [
        ("xLSTM[3:1] E=32", config(32, 4, vec![1]), 2, 9),
        ("mLSTM-only E=16", config(16, 2, vec![]), 3, 5),
        ("sLSTM-only E=16", config(16, 2, vec![0, 1]), 1, 7),
        (
            "sLSTM without conv, no final norm",
            XlstmConfig {
                slstm: SlstmBlockConfig {
                    conv_kernel_size: 0,
                    ..SlstmBlockConfig::default()
                },
                add_post_blocks_norm: false,
                ..config(16, 2, vec![0])
            },
            2,
            4,
        ),
    ];
    for (name, cfg, batch, seq_len) in cases {
        let (stack, _) = random_stack(&cfg);
        let x =
            Tensor::randn(0f32, 1.0, (batch, seq_len, cfg.embedding_dim), &Device::Cpu).unwrap();
        let y = stack.forward(&x).unwrap();
        let y_steps = steps(&stack, &x).unwrap();
        let diff = max_abs_diff(&y, &y_steps);
        assert!(diff < 1e-4, "{name}: forward vs step differ by {diff}");
        // The [B, E] form of a step gives the same as [B, 1, E].
        let mut state = StackState::new(&cfg, batch, &Device::Cpu).unwrap();
        let first = stack
            .step(&x.narrow(1, 0, 1).unwrap().squeeze(1).unwrap(), &mut state)
            .unwrap();
        assert_eq!(first.dims(), [batch, cfg.embedding_dim]);
        let diff = max_abs_diff(&first, &y.narrow(1, 0, 1).unwrap().squeeze(1).unwrap());
        assert!(diff < 1e-4, "{name}: [B, E] step differs by {diff}");
    }
}

#[test]
fn chunkwise_and_parallel_kernels_agree() {
    let mut cfg = config(32, 2, vec![]);
    let (stack_chunkwise, varmap) = random_stack(&XlstmConfig {
        mlstm: MlstmBlockConfig {
            kernel: MlstmKernel::Chunkwise { chunk_size: 8 },
            ..MlstmBlockConfig::default()
        },
        ..cfg.clone()
    });
    cfg.mlstm.kernel = MlstmKernel::Parallel;
    // The same parameters, read back from the first stack's VarMap.
    let stack_parallel = XlstmStack::new(
        &cfg,
        VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu),
    )
    .unwrap();
    for seq_len in [1, 8, 21] {
        let x = Tensor::randn(0f32, 1.0, (2, seq_len, 32), &Device::Cpu).unwrap();
        let diff = max_abs_diff(
            &stack_chunkwise.forward(&x).unwrap(),
            &stack_parallel.forward(&x).unwrap(),
        );
        assert!(
            diff < 1e-4,
            "S = {seq_len}: chunkwise vs parallel differ by {diff}"
        );
    }
}

#[test]
fn forward_with_state_continues_where_it_stopped() {
    let cfg = config(16, 3, vec![1]);
    let (stack, _) = random_stack(&cfg);
    let x = Tensor::randn(0f32, 1.0, (2, 13, 16), &Device::Cpu).unwrap();
    let y = stack.forward(&x).unwrap();
    let zero = StackState::new(&cfg, 2, &Device::Cpu).unwrap();
    let (head, state) = stack
        .forward_with_state(&x.narrow(1, 0, 10).unwrap(), &zero)
        .unwrap();
    let (tail, _) = stack
        .forward_with_state(&x.narrow(1, 10, 3).unwrap(), &state)
        .unwrap();
    let diff = max_abs_diff(&Tensor::cat(&[head, tail], 1).unwrap(), &y);
    assert!(
        diff < 1e-4,
        "history + continuation differs from one forward by {diff}"
    );
}

#[test]
fn training_gradients_reach_every_parameter() {
    let cfg = config(16, 2, vec![1]);
    let (stack, varmap) = random_stack(&cfg);
    let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 6, 16), &Device::Cpu).unwrap()).unwrap();
    let loss = stack
        .forward_t(x.as_tensor(), true)
        .unwrap()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap();
    let grads = loss.backward().unwrap();
    for (name, var) in varmap.data().lock().unwrap().iter() {
        let grad = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        let norm: f32 = grad.sqr().unwrap().sum_all().unwrap().to_scalar().unwrap();
        assert!(
            norm.is_finite() && norm > 0.0,
            "{name}: gradient norm {norm}"
        );
    }
}

#[test]
fn dropout_only_acts_in_training() {
    let cfg = XlstmConfig {
        dropout: 0.5,
        ..config(16, 2, vec![1])
    };
    let (stack, _) = random_stack(&cfg);
    let x = Tensor::randn(0f32, 1.0, (2, 5, 16), &Device::Cpu).unwrap();
    assert_eq!(
        max_abs_diff(
            &stack.forward(&x).unwrap(),
            &stack.forward_t(&x, false).unwrap()
        ),
        0.0
    );
    assert!(
        max_abs_diff(
            &stack.forward(&x).unwrap(),
            &stack.forward_t(&x, true).unwrap()
        ) > 0.0
    );
}

#[test]
fn invalid_configs_name_the_field() {
    let bad = [
        (config(64, 4, vec![4]), "slstm_at[0] = 4 is out of range"),
        (config(64, 4, vec![1, 1]), "slstm_at lists block 1 twice"),
        (config(0, 4, vec![]), "embedding_dim"),
        (config(64, 0, vec![]), "num_blocks"),
        (
            XlstmConfig {
                slstm: SlstmBlockConfig {
                    num_heads: 3,
                    ..SlstmBlockConfig::default()
                },
                ..config(64, 4, vec![1])
            },
            "slstm.num_heads = 3",
        ),
        (
            XlstmConfig {
                mlstm: MlstmBlockConfig {
                    num_heads: 5,
                    ..MlstmBlockConfig::default()
                },
                ..config(64, 4, vec![1])
            },
            "mlstm.num_heads = 5",
        ),
        (
            XlstmConfig {
                mlstm: MlstmBlockConfig {
                    kernel: MlstmKernel::Chunkwise { chunk_size: 0 },
                    ..MlstmBlockConfig::default()
                },
                ..config(64, 4, vec![1])
            },
            "chunk_size",
        ),
        (
            XlstmConfig {
                dropout: 1.0,
                ..config(64, 4, vec![1])
            },
            "dropout",
        ),
    ];
    for (cfg, expected) in bad {
        let err = cfg.validate().expect_err(expected).to_string();
        assert!(
            err.contains(expected),
            "error {err:?} should mention {expected:?}"
        );
        let varmap = VarMap::new();
        let built = XlstmStack::new(
            &cfg,
            VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu),
        );
        assert!(
            built.is_err(),
            "building from an invalid config ({expected}) must fail"
        );
        assert!(StackState::new(&cfg, 1, &Device::Cpu).is_err());
    }
}

#[test]
fn step_refuses_mismatched_state_and_shapes() {
    let cfg = config(16, 2, vec![1]);
    let (stack, _) = random_stack(&cfg);
    let mut state = StackState::new(&cfg, 2, &Device::Cpu).unwrap();
    let wrong_batch = Tensor::zeros((3, 1, 16), DType::F32, &Device::Cpu).unwrap();
    let err = stack
        .step(&wrong_batch, &mut state)
        .unwrap_err()
        .to_string();
    assert!(err.contains("batch"), "{err}");
    let wrong_width = Tensor::zeros((2, 1, 8), DType::F32, &Device::Cpu).unwrap();
    let err = stack
        .step(&wrong_width, &mut state)
        .unwrap_err()
        .to_string();
    assert!(err.contains("x_t has shape [2, 1, 8]"), "{err}");
    let mut other_layout = StackState::new(&config(16, 2, vec![0]), 2, &Device::Cpu).unwrap();
    let x = Tensor::zeros((2, 1, 16), DType::F32, &Device::Cpu).unwrap();
    let err = stack.step(&x, &mut other_layout).unwrap_err().to_string();
    assert!(err.contains("does not fit"), "{err}");
}

#[test]
fn config_round_trips_through_toml_with_defaults() {
    let cfg: XlstmConfig = toml::from_str(
        "embedding_dim = 32\nnum_blocks = 3\nslstm_at = [2]\n[mlstm.kernel]\nform = \"parallel\"\n",
    )
    .unwrap();
    assert_eq!(cfg.mlstm.kernel, MlstmKernel::Parallel);
    assert_eq!(cfg.mlstm.num_heads, 4);
    assert_eq!(cfg.mlstm_inner_dim(), 64);
    let text = toml::to_string(&cfg).unwrap();
    assert_eq!(toml::from_str::<XlstmConfig>(&text).unwrap(), cfg);
    assert!(
        toml::from_str::<XlstmConfig>("embedding_dims = 3").is_err(),
        "unknown fields are refused"
    );
}
