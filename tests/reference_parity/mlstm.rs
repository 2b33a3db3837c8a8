//! Reference parity: the mLSTM kernels against `mlstm_cell.safetensors` (README §1).
//! Every check runs twice: on the candle-ops reference and on the public dispatching
//! API (the fused CPU kernels on this device).

use std::collections::HashMap;

use candle_core::{Device, Result, Tensor, Var};
use xlstm_forecast::xlstm::kernels::mlstm::{self, MlstmState, reference};

use super::common::{FORWARD_TOL, GRAD_TOL, assert_close, load_vectors};

const CASES: [&str; 2] = ["s16", "s64"];

type ParallelFn = fn(&Tensor, &Tensor, &Tensor, &Tensor, &Tensor) -> Result<Tensor>;
type ChunkwiseFn = fn(
    &Tensor,
    &Tensor,
    &Tensor,
    &Tensor,
    &Tensor,
    usize,
    Option<&MlstmState>,
) -> Result<(Tensor, MlstmState)>;
type StepFn =
    fn(&Tensor, &Tensor, &Tensor, &Tensor, &Tensor, &MlstmState) -> Result<(Tensor, MlstmState)>;

const PARALLEL_IMPLS: [(&str, ParallelFn); 2] = [
    ("reference", reference::parallel),
    ("dispatched", mlstm::parallel),
];
const CHUNKWISE_IMPLS: [(&str, ChunkwiseFn); 2] = [
    ("reference", reference::chunkwise),
    ("dispatched", mlstm::chunkwise),
];
const STEP_IMPLS: [(&str, StepFn); 2] =
    [("reference", reference::step), ("dispatched", mlstm::step)];

struct Vectors(HashMap<String, Tensor>);

impl Vectors {
    fn load() -> Self {
        Self(load_vectors("mlstm_cell.safetensors"))
    }

    fn get(&self, case: &str, name: &str) -> Tensor {
        let key = format!("{case}.{name}");
        self.0
            .get(&key)
            .unwrap_or_else(|| panic!("reference vectors have no tensor {key}"))
            .clone()
    }

    /// q, k, v, igate, fgate of a case.
    fn inputs(&self, case: &str) -> [Tensor; 5] {
        ["q", "k", "v", "igate_preact", "fgate_preact"].map(|name| self.get(case, name))
    }
}

#[test]
fn parallel_h_matches_official_parallel_form() {
    let vectors = Vectors::load();
    for case in CASES {
        let [q, k, v, i, f] = vectors.inputs(case);
        for (name, parallel) in PARALLEL_IMPLS {
            let h = parallel(&q, &k, &v, &i, &f).unwrap();
            assert_close(
                &format!("{name} {case} h"),
                &h,
                &vectors.get(case, "h_parallel"),
                FORWARD_TOL,
            );
        }
    }
}

#[test]
fn stepped_h_and_final_state_match_official_recurrent_form() {
    let vectors = Vectors::load();
    for case in CASES {
        let [q, k, v, i, f] = vectors.inputs(case);
        let (batch, heads, seq_len, head_dim) = q.dims4().unwrap();
        for (name, step) in STEP_IMPLS {
            let mut state = MlstmState::zeros(batch, heads, head_dim, &Device::Cpu).unwrap();
            let mut outputs = Vec::with_capacity(seq_len);
            for t in 0..seq_len {
                let at = |x: &Tensor| x.narrow(2, t, 1).unwrap().squeeze(2).unwrap();
                let (h, next) = step(&at(&q), &at(&k), &at(&v), &at(&i), &at(&f), &state).unwrap();
                outputs.push(h);
                state = next;
            }
            let h = Tensor::stack(&outputs, 2).unwrap();
            let what = format!("{name} {case}");
            assert_close(
                &format!("{what} h"),
                &h,
                &vectors.get(case, "h_recurrent"),
                FORWARD_TOL,
            );
            assert_final_state(&what, &state, &vectors, case);
        }
    }
}

fn assert_final_state(what: &str, state: &MlstmState, vectors: &Vectors, case: &str) {
    assert_close(
        &format!("{what} final C"),
        &state.c,
        &vectors.get(case, "final_C"),
        FORWARD_TOL,
    );
    assert_close(
        &format!("{what} final n"),
        &state.n,
        &vectors.get(case, "final_n"),
        FORWARD_TOL,
    );
    assert_close(
        &format!("{what} final m"),
        &state.m,
        &vectors.get(case, "final_m"),
        FORWARD_TOL,
    );
}

#[test]
fn chunkwise_h_and_final_state_match_official_forms() {
    let vectors = Vectors::load();
    let [q, k, v, i, f] = vectors.inputs("s64");
    for (name, chunkwise) in CHUNKWISE_IMPLS {
        let (h, state) = chunkwise(&q, &k, &v, &i, &f, 16, None).unwrap();
        let what = format!("{name} s64 chunk 16");
        assert_close(
            &format!("{what} h"),
            &h,
            &vectors.get("s64", "h_chunkwise"),
            FORWARD_TOL,
        );
        assert_final_state(&what, &state, &vectors, "s64");
    }
    // Chunk boundaries must not matter for the final state: S = 16 in one short chunk
    // plus pieces that do not divide S.
    for case in CASES {
        let [q, k, v, i, f] = vectors.inputs(case);
        for (name, chunkwise) in CHUNKWISE_IMPLS {
            for chunk_size in [5, 64] {
                let (h, state) = chunkwise(&q, &k, &v, &i, &f, chunk_size, None).unwrap();
                let what = format!("{name} {case} chunk {chunk_size}");
                assert_close(
                    &format!("{what} h"),
                    &h,
                    &vectors.get(case, "h_recurrent"),
                    FORWARD_TOL,
                );
                assert_final_state(&what, &state, &vectors, case);
            }
        }
    }
}

/// Gradients of `sum(h · loss_weight)` for q, k, v, igate, fgate.
fn gradients(
    vectors: &Vectors,
    case: &str,
    forward: impl Fn(&[Tensor; 5]) -> Tensor,
) -> [Tensor; 5] {
    let vars = vectors.inputs(case).map(|t| Var::from_tensor(&t).unwrap());
    let inputs = [0, 1, 2, 3, 4].map(|j| vars[j].as_tensor().clone());
    let h = forward(&inputs);
    let loss = (h * vectors.get(case, "loss_weight"))
        .unwrap()
        .sum_all()
        .unwrap();
    let grads = loss.backward().unwrap();
    vars.map(|var| {
        grads
            .get(var.as_tensor())
            .expect("every input receives a gradient")
            .clone()
    })
}

const GRAD_NAMES: [&str; 5] = [
    "grad_q",
    "grad_k",
    "grad_v",
    "grad_igate_preact",
    "grad_fgate_preact",
];

#[test]
fn parallel_gradients_match_official_autograd() {
    let vectors = Vectors::load();
    for case in CASES {
        for (name, parallel) in PARALLEL_IMPLS {
            let grads = gradients(&vectors, case, |[q, k, v, i, f]| {
                parallel(q, k, v, i, f).unwrap()
            });
            for (grad, grad_name) in grads.iter().zip(GRAD_NAMES) {
                assert_close(
                    &format!("{name} {case} {grad_name}"),
                    grad,
                    &vectors.get(case, grad_name),
                    GRAD_TOL,
                );
            }
        }
    }
}

#[test]
fn chunkwise_gradients_match_official_parallel_autograd() {
    let vectors = Vectors::load();
    for (name, chunkwise) in CHUNKWISE_IMPLS {
        let grads = gradients(&vectors, "s64", |[q, k, v, i, f]| {
            chunkwise(q, k, v, i, f, 16, None).unwrap().0
        });
        for (grad, grad_name) in grads.iter().zip(GRAD_NAMES) {
            assert_close(
                &format!("{name} s64 chunk 16 {grad_name}"),
                grad,
                &vectors.get("s64", grad_name),
                GRAD_TOL,
            );
        }
    }
}
