//! Device selection through the real binary: `device-check` runs its parity cases, bad device
//! names and CUDA requests to a CPU-only build fail with messages that say what to do.

use std::process::{Command, Output};

use serde_json::Value;

fn xlstm_forecast(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_xlstm-forecast"));
    command.args(args);
    for (key, value) in env {
        command.env(key, value);
    }
    command.output().expect("the binary runs")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn device_check_on_the_cpu_runs_every_case_and_reports_json() {
    let out = xlstm_forecast(
        &["device-check", "--device", "cpu", "--quick", "--json"],
        &[],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let cases: Vec<Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    for name in [
        "mlstm_chunkwise",
        "mlstm_parallel",
        "mlstm_step",
        "slstm_scan",
        "stack",
    ] {
        assert!(cases.iter().any(|c| c["case"] == name), "no {name} case");
    }
    for case in &cases {
        // The CPU against itself: the same kernels on the same inputs agree exactly.
        assert_eq!(case["max_rel_err"].as_f64(), Some(0.0), "{case}");
        assert_eq!(case["pass"], true, "{case}");
        assert!(
            case["errors"].as_object().is_some_and(|e| !e.is_empty()),
            "{case}"
        );
    }
}

#[test]
fn an_unknown_device_name_is_rejected_with_the_accepted_spellings() {
    let out = xlstm_forecast(&["device-check", "--device", "gpu"], &[]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("expected auto, cpu, cuda or cuda:N"),
        "{}",
        stderr(&out)
    );
    let out = xlstm_forecast(&["config"], &[("XLSTM_FORECAST_DEVICE", "tpu")]);
    assert!(!out.status.success());
    let message = stderr(&out);
    assert!(
        message.contains("XLSTM_FORECAST_DEVICE") && message.contains("'tpu' is not a device"),
        "{message}"
    );
    let out = xlstm_forecast(&["config"], &[("XLSTM_FORECAST_DEVICE", "cuda:1")]);
    assert!(out.status.success(), "{}", stderr(&out));
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(printed.contains("device = \"cuda:1\""), "{printed}");
}

#[cfg(not(feature = "cuda"))]
#[test]
fn asking_a_cpu_only_build_for_cuda_says_how_to_get_it() {
    for args in [
        &["device-check"][..],
        &[
            "bench", "kernels", "--only", "stack", "--device", "cuda:0", "--quick",
        ][..],
    ] {
        let out = xlstm_forecast(args, &[]);
        assert!(!out.status.success(), "{args:?} succeeded");
        let message = stderr(&out);
        assert!(
            message.contains("--device") && message.contains("this build has no CUDA support"),
            "{args:?}: {message}"
        );
        assert!(message.contains("--features cuda"), "{message}");
    }
}
