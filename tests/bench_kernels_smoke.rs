//! Smoke test of `xlstm-forecast bench kernels --quick --json` through the real binary: every
//! case group runs at tiny sizes and each output line is a JSON object with the documented keys.

use std::process::Command;

use serde_json::Value;

#[test]
fn quick_kernel_benchmark_prints_json_cases() {
    let out = Command::new(env!("CARGO_BIN_EXE_xlstm-forecast"))
        .args(["bench", "kernels", "--quick", "--json"])
        .output()
        .expect("the binary runs");
    assert!(
        out.status.success(),
        "bench kernels --quick failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).expect("utf-8 output");
    let cases: Vec<Value> = stdout
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}")))
        .collect();
    for case in &cases {
        for key in ["case", "mode", "seq_len", "batch", "heads"] {
            assert!(case.get(key).is_some(), "{case} lacks {key}");
        }
    }
    let timed = |name: &str, mode: &str| {
        cases
            .iter()
            .find(|c| c["case"] == name && c["mode"] == mode)
            .unwrap_or_else(|| panic!("no {name} {mode} case in {stdout}"))
    };
    for kernel in ["mlstm_parallel", "mlstm_chunkwise", "slstm_scan"] {
        for mode in ["forward", "forward_backward"] {
            let case = timed(kernel, mode);
            assert!(
                case["median_ms"].as_f64().is_some_and(|ms| ms >= 0.0),
                "{case}"
            );
            assert!(
                case["speedup_vs_reference"]
                    .as_f64()
                    .is_some_and(|s| s > 0.0),
                "{case}"
            );
        }
    }
    let memory = timed("mlstm_chunkwise", "peak_memory_forward_backward");
    assert!(
        memory["peak_rss_delta_bytes"].as_u64().is_some(),
        "{memory}"
    );
    for variant in ["xLSTM[3:1]", "mLSTM-only", "sLSTM-only"] {
        for mode in ["forward", "train_step", "step"] {
            let case = cases
                .iter()
                .find(|c| c["case"] == "stack" && c["variant"] == variant && c["mode"] == mode)
                .unwrap_or_else(|| panic!("no stack {variant} {mode} case"));
            assert!(
                case["median_ms"].as_f64().is_some_and(|ms| ms >= 0.0),
                "{case}"
            );
        }
    }
    let step = cases
        .iter()
        .find(|c| c["case"] == "stack" && c["mode"] == "step")
        .unwrap();
    assert_eq!(
        step["state_bytes"], step["state_bytes_after_steps"],
        "the recurrent state has constant size"
    );
}
