//! The real binary: `train` → `forecast` on a CSV and on a series in a SQLite store,
//! fine-tuning, `eval --model xlstm`, and the errors of bad requests.

use std::path::Path;
use std::process::{Command, Output};

use xlstm_forecast::forecast::synthetic::{SyntheticKind, SyntheticSpec, generate};

const BINARY: &str = env!("CARGO_BIN_EXE_xlstm-forecast");

fn run(dir: &Path, args: &[&str]) -> Output {
    Command::new(BINARY)
        .args(args)
        .current_dir(dir)
        .env(
            "DATABASE_URL",
            format!("sqlite://{}", dir.join("store.db").display()),
        )
        .env_remove("XLSTM_FORECAST_CONFIG")
        .output()
        .expect("run xlstm-forecast")
}

fn succeed(dir: &Path, args: &[&str]) -> String {
    let output = run(dir, args);
    assert!(
        output.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn fail(dir: &Path, args: &[&str]) -> String {
    let output = run(dir, args);
    assert!(!output.status.success(), "{args:?} should have failed");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// A wide hourly CSV of `rows` rows and 2 channels.
fn write_csv(dir: &Path, name: &str, rows: usize) -> String {
    let series = generate(&SyntheticSpec::new(SyntheticKind::Hourly, rows, 2, 5)).unwrap();
    let mut text = String::from("ts,load,temp\n");
    for row in 0..rows {
        let ts = chrono::DateTime::from_timestamp_micros(series.timestamp_micros(row)).unwrap();
        let v = &series.matrix.values[row * 2..row * 2 + 2];
        text.push_str(&format!("{},{},{}\n", ts.to_rfc3339(), v[0], v[1]));
    }
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

const QUICK: [&str; 8] = [
    "--preset",
    "tiny",
    "--lookback",
    "48",
    "--horizon",
    "12",
    "--max-epochs",
    "1",
];

#[test]
fn train_then_forecast_a_csv_then_fine_tune_on_newer_rows() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let csv = write_csv(dir, "series.csv", 500);
    let out = succeed(
        dir,
        &[
            &["train", "--csv", &csv, "--out", "m1", "--json"][..],
            &QUICK,
        ]
        .concat(),
    );
    let summary: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(summary["preset"], "tiny");
    assert_eq!(summary["epochs"], 1);
    assert!(summary["metrics"]["val_mse"].as_f64().unwrap().is_finite());
    assert!(dir.join("m1/model.safetensors").is_file() && dir.join("m1/model.json").is_file());

    let out = succeed(
        dir,
        &[
            "forecast",
            "--model",
            "m1",
            "--csv",
            &csv,
            "--json",
            "--quantiles",
            "0.1,0.9",
        ],
    );
    let forecast: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(forecast["horizon"], 12);
    assert_eq!(forecast["timestamps"].as_array().unwrap().len(), 12);
    let load = &forecast["channels"]["load"];
    assert_eq!(load["mean"].as_array().unwrap().len(), 12);
    let (low, high) = (&load["quantiles"]["0.1"], &load["quantiles"]["0.9"]);
    for step in 0..12 {
        assert!(low[step].as_f64().unwrap() <= high[step].as_f64().unwrap());
    }
    assert_eq!(forecast["origin"], "2016-07-21T19:00:00Z");
    assert_eq!(forecast["timestamps"][0], "2016-07-21T20:00:00Z");

    // The table form: a header, then one row per step.
    let table = succeed(
        dir,
        &["forecast", "--model", "m1", "--csv", &csv, "--horizon", "3"],
    );
    assert_eq!(table.lines().count(), 4);
    assert!(table.starts_with("ts,load.mean,load.q0.1,"), "{table}");

    let newer = write_csv(dir, "newer.csv", 600);
    let out = succeed(
        dir,
        &[
            "train",
            "--csv",
            &newer,
            "--finetune-from",
            "m1",
            "--out",
            "m2",
            "--json",
        ],
    );
    let summary: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert!(summary["epochs"].as_u64().unwrap() <= 2);
    let child: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("m2/model.json")).unwrap()).unwrap();
    assert!(child["parent"].is_object(), "{}", child["parent"]);

    // Refusals name the problem and leave what exists alone.
    let err = fail(
        dir,
        &[&["train", "--csv", &csv, "--out", "m1"][..], &QUICK].concat(),
    );
    assert!(
        err.contains("--out") && err.contains("already exists"),
        "{err}"
    );
    let err = fail(
        dir,
        &[
            "forecast",
            "--model",
            "m1",
            "--csv",
            &csv,
            "--horizon",
            "13",
        ],
    );
    assert!(
        err.contains("horizon") && err.contains("model's horizon 12"),
        "{err}"
    );
    let err = fail(
        dir,
        &[
            "forecast",
            "--model",
            "m1",
            "--csv",
            &csv,
            "--quantiles",
            "0.15",
        ],
    );
    assert!(
        err.contains("--quantiles: the model has no level 0.15"),
        "{err}"
    );
    let err = fail(dir, &["forecast", "--model", "nowhere", "--csv", &csv]);
    assert!(
        err.contains("cannot read") && err.contains("nowhere"),
        "{err}"
    );
    let err = fail(
        dir,
        &[
            "train",
            "--csv",
            &csv,
            "--out",
            "m3",
            "--preset",
            "tiny",
            "--lookback",
            "400",
            "--horizon",
            "12",
        ],
    );
    assert!(err.contains("too few for lookback 400"), "{err}");
    assert!(!dir.join("m3").exists());
    let bad = dir.join("bad.csv");
    std::fs::write(
        &bad,
        "ts,load\n2024-01-01T00:00:00Z,1\n2024-01-01T01:00:00Z,abc\n",
    )
    .unwrap();
    let err = fail(
        dir,
        &["train", "--csv", bad.to_str().unwrap(), "--out", "m4"],
    );
    assert!(
        err.contains("line 3, column 'load': expected a number, found 'abc'"),
        "{err}"
    );
}

#[test]
fn train_and_forecast_a_series_from_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let csv = write_csv(dir, "series.csv", 400);
    succeed(dir, &["import", "--csv", &csv, "--series", "plant"]);
    succeed(
        dir,
        &[&["train", "--series", "plant", "--out", "m"][..], &QUICK].concat(),
    );
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("m/model.json")).unwrap()).unwrap();
    assert_eq!(manifest["data"]["series"], "plant");
    assert_eq!(manifest["data"]["frequency"], "1h");
    let out = succeed(
        dir,
        &["forecast", "--model", "m", "--series", "plant", "--json"],
    );
    let forecast: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(forecast["timestamps"].as_array().unwrap().len(), 12);
    let err = fail(dir, &["forecast", "--model", "m", "--series", "nope"]);
    assert!(err.contains("nope"), "{err}");
}

#[test]
fn eval_scores_the_xlstm_model_with_every_field() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let csv = write_csv(dir, "series.csv", 600);
    let out = succeed(
        dir,
        &[
            "eval",
            "--csv",
            &csv,
            "--lookback",
            "48",
            "--horizon",
            "12",
            "--split",
            "0.6,0.2,0.2",
            "--model",
            "xlstm",
            "--preset",
            "tiny",
            "--max-epochs",
            "1",
            "--seed",
            "3",
            "--json",
        ],
    );
    let report: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    for key in ["mse", "mae", "mase", "wql", "coverage_80", "train_seconds"] {
        assert!(
            report[key].as_f64().unwrap().is_finite(),
            "{key}: {}",
            report[key]
        );
    }
    assert_eq!(report["model"], "xlstm");
    assert_eq!(report["preset"], "tiny");
    assert_eq!(report["epochs"], 1);
    assert!(report["params"].as_u64().unwrap() > 1000);
    assert_eq!(report["windows"], 600 - 480 - 12 + 1);
    let err = fail(
        dir,
        &[
            "eval",
            "--csv",
            &csv,
            "--lookback",
            "48",
            "--horizon",
            "12",
            "--split",
            "0.6,0.2,0.2",
            "--preset",
            "huge",
        ],
    );
    assert!(err.contains("unknown preset \"huge\""), "{err}");
}

#[test]
fn quickstart_prepares_the_embedded_store_once() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let output = run(dir, &["quickstart", "--no-serve", "--rows", "400"]);
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(output.status.success(), "{stderr}");
    for needle in [
        "series 'demo': 400 hourly rows x 4 channels",
        "training preset 'tiny'",
        "forecast persisted",
        "schedule: fine-tune 'demo' hourly",
        "/docs/",
        "/api/v1/series/demo/forecast",
    ] {
        assert!(stderr.contains(needle), "missing {needle:?} in:\n{stderr}");
    }
    // A second run keeps what is there.
    let again = run(dir, &["quickstart", "--no-serve", "--rows", "400"]);
    let stderr = String::from_utf8_lossy(&again.stderr).into_owned();
    assert!(again.status.success(), "{stderr}");
    assert!(
        stderr.contains("series 'demo' exists") && stderr.contains("a champion exists"),
        "{stderr}"
    );
    // What it trained serves from the store like any model.
    let out = succeed(dir, &["export", "--series", "demo", "--csv", "demo.csv"]);
    assert!(out.contains("400 rows x 4 channels"), "{out}");
}

#[test]
fn the_forecast_latency_bench_serves_forecasts_to_a_second_process() {
    let dir = tempfile::tempdir().unwrap();
    let out = succeed(
        dir.path(),
        &[
            "bench",
            "forecast",
            "--preset",
            "tiny",
            "--seconds",
            "1",
            "--concurrency",
            "2",
            "--backend",
            "sqlite",
            "--json",
        ],
    );
    // One line per memo setting, the default being both.
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    let memo: Vec<&str> = lines.iter().map(|f| f["memo"].as_str().unwrap()).collect();
    assert_eq!(memo, ["on", "off"], "{out}");
    for figures in &lines {
        assert_eq!(figures["backend"], "sqlite");
        assert_eq!(figures["errors"], 0, "{figures}");
        assert!(figures["requests"].as_u64().unwrap() > 0, "{figures}");
        assert!(figures["p50_ms"].as_f64().unwrap() <= figures["p99_ms"].as_f64().unwrap());
    }
}
