//! `xlstm-forecast eval` and `generate` through the real binary: scores checked against a hand
//! computation, and bad input rejected with messages naming the argument.

use std::path::Path;
use std::process::{Command, Output};

const BINARY: &str = env!("CARGO_BIN_EXE_xlstm-forecast");

fn run(args: &[&str]) -> Output {
    Command::new(BINARY)
        .args(args)
        .env_remove("XLSTM_FORECAST_CONFIG")
        .output()
        .expect("the binary runs")
}

fn succeed(args: &[&str]) -> String {
    let output = run(args);
    assert!(
        output.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

fn fail(args: &[&str]) -> String {
    let output = run(args);
    assert!(!output.status.success(), "{args:?} unexpectedly succeeded");
    String::from_utf8(output.stderr).unwrap()
}

/// The error of a one-step linear `eval` on `csv` (a path that need not exist).
fn linear_eval_failure(csv: &str) -> String {
    fail(&[
        "eval",
        "--csv",
        csv,
        "--lookback",
        "1",
        "--horizon",
        "1",
        "--split-rows",
        "1,1,1",
        "--model",
        "linear",
    ])
}

/// Writes `text` as `name` in `dir` and returns the linear `eval` error on it.
fn linear_eval_failure_on(dir: &std::path::Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    linear_eval_failure(path.to_str().unwrap())
}

fn json(stdout: &str) -> serde_json::Value {
    serde_json::from_str(stdout.trim()).unwrap_or_else(|err| panic!("not JSON ({err}): {stdout}"))
}

fn number(report: &serde_json::Value, field: &str) -> f64 {
    report[field]
        .as_f64()
        .unwrap_or_else(|| panic!("{field} is not a number in {report}"))
}

/// Twelve hourly rows of two channels.
const SMALL: [[f64; 2]; 12] = [
    [1.0, 10.0],
    [2.0, 12.0],
    [4.0, 11.0],
    [3.0, 15.0],
    [5.0, 14.0],
    [6.0, 13.0],
    [8.0, 17.0],
    [7.0, 16.0],
    [9.0, 18.0],
    [12.0, 21.0],
    [10.0, 19.0],
    [11.0, 25.0],
];

fn write_small_csv(dir: &Path) -> String {
    let mut text = String::from("date,load,temp\n");
    for (row, [load, temp]) in SMALL.iter().enumerate() {
        text.push_str(&format!("2024-01-01 {row:02}:00:00,{load},{temp}\n"));
    }
    let path = dir.join("small.csv");
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_string()
}

#[test]
fn repeat_last_value_is_scored_exactly_as_by_hand() {
    let dir = tempfile::tempdir().unwrap();
    let csv = write_small_csv(dir.path());
    let stdout = succeed(&[
        "eval",
        "--csv",
        &csv,
        "--lookback",
        "2",
        "--horizon",
        "2",
        "--split-rows",
        "6,3,3",
        "--model",
        "seasonal-naive",
        "--season-period",
        "1",
        "--json",
    ]);
    let report = json(&stdout);

    // By hand: z-score each channel with the mean and population std of rows 0..6.
    let mut z = [[0.0_f64; 2]; 12];
    let mut scale = [0.0_f64; 2];
    for channel in 0..2 {
        let train: Vec<f64> = SMALL[..6].iter().map(|row| row[channel]).collect();
        let mean = train.iter().sum::<f64>() / 6.0;
        let std = (train.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / 6.0).sqrt();
        for row in 0..12 {
            z[row][channel] = (SMALL[row][channel] - mean) / std;
        }
        // Naive in-sample MAE on the training rows.
        scale[channel] = (1..6)
            .map(|row| (z[row][channel] - z[row - 1][channel]).abs())
            .sum::<f64>()
            / 5.0;
    }
    // Test rows 9, 10, 11; windows whose horizon lies inside them start their horizon at rows
    // 9 and 10, and repeat the value just before it.
    let (mut squared, mut absolute) = (0.0, [0.0_f64; 2]);
    for horizon_start in [9, 10] {
        for row in horizon_start..horizon_start + 2 {
            for channel in 0..2 {
                let error = z[row][channel] - z[horizon_start - 1][channel];
                squared += error * error;
                absolute[channel] += error.abs();
            }
        }
    }
    let cells = 2.0 * 2.0 * 2.0;
    let close = |field: &str, expected: f64| {
        let found = number(&report, field);
        assert!(
            (found - expected).abs() < 1e-5,
            "{field}: found {found}, by hand {expected}"
        );
    };
    close("mse", squared / cells);
    close("mae", (absolute[0] + absolute[1]) / cells);
    let per_channel = report["per_channel"].as_array().expect("per_channel list");
    assert_eq!(per_channel.len(), 2);
    for (channel, (entry, name)) in per_channel.iter().zip(["load", "temp"]).enumerate() {
        assert_eq!(entry["channel"], name);
        assert_eq!(entry["cells"], 4);
        let found = entry["mae"].as_f64().unwrap();
        let expected = absolute[channel] / 4.0;
        assert!(
            (found - expected).abs() < 1e-5,
            "{name} mae: {found} vs {expected}"
        );
    }
    let channel_mse: f64 = per_channel
        .iter()
        .map(|entry| entry["mse"].as_f64().unwrap())
        .sum();
    assert!(
        (channel_mse / 2.0 - squared / cells).abs() < 1e-5,
        "channel mse mean"
    );
    close(
        "mase",
        (absolute[0] / 4.0 / scale[0] + absolute[1] / 4.0 / scale[1]) / 2.0,
    );
    assert_eq!(report["windows"], 2);
    assert_eq!(report["params"], 0);
    assert_eq!(report["epochs"], 0);
    assert_eq!(report["model"], "seasonal-naive");
    assert!(report["preset"].is_null());
    assert!(number(&report, "train_seconds") >= 0.0);
    assert!(number(&report, "wql") > 0.0);
    let coverage = number(&report, "coverage_80");
    assert!((0.0..=1.0).contains(&coverage));
}

#[test]
fn univariate_features_score_only_the_target() {
    let dir = tempfile::tempdir().unwrap();
    let csv = write_small_csv(dir.path());
    let common = [
        "eval",
        "--csv",
        &csv,
        "--lookback",
        "2",
        "--horizon",
        "2",
        "--split-rows",
        "6,3,3",
        "--model",
        "seasonal-naive",
        "--season-period",
        "1",
        "--json",
        "--features",
        "S",
    ];
    let last_column = json(&succeed(&common));
    assert_eq!(last_column["channels"], 1);
    let mut with_target = common.to_vec();
    with_target.extend(["--target", "temp"]);
    assert_eq!(json(&succeed(&with_target))["mse"], last_column["mse"]);
    let mut load = common.to_vec();
    load.extend(["--target", "load"]);
    assert_ne!(json(&succeed(&load))["mse"], last_column["mse"]);
}

#[test]
fn bad_input_is_rejected_with_a_message_naming_the_argument() {
    let dir = tempfile::tempdir().unwrap();
    let csv = write_small_csv(dir.path());
    let eval = |extra: &[&str]| {
        let mut args = vec![
            "eval",
            "--csv",
            csv.as_str(),
            "--model",
            "seasonal-naive",
            "--season-period",
            "1",
        ];
        args.extend_from_slice(extra);
        fail(&args)
    };
    let long_lookback = eval(&["--lookback", "6", "--horizon", "2", "--split-rows", "6,3,3"]);
    assert!(
        long_lookback.contains("lookback") && long_lookback.contains("6 training rows"),
        "{long_lookback}"
    );
    let long_horizon = eval(&["--lookback", "2", "--horizon", "4", "--split-rows", "6,3,3"]);
    assert!(
        long_horizon.contains("horizon") && long_horizon.contains("3 validation rows"),
        "{long_horizon}"
    );
    let too_many_rows = eval(&["--lookback", "2", "--horizon", "2", "--split-rows", "6,3,4"]);
    assert!(
        too_many_rows.contains("split-rows") && too_many_rows.contains("12 rows"),
        "{too_many_rows}"
    );
    let bad_fractions = eval(&["--lookback", "2", "--horizon", "2", "--split", "0.7,0.3"]);
    assert!(
        bad_fractions.contains("split") && bad_fractions.contains("three"),
        "{bad_fractions}"
    );
    let unknown_target = eval(&[
        "--lookback",
        "2",
        "--horizon",
        "2",
        "--split-rows",
        "6,3,3",
        "--features",
        "S",
        "--target",
        "humidity",
    ]);
    assert!(
        unknown_target.contains("--target") && unknown_target.contains("humidity"),
        "{unknown_target}"
    );
    let both_splits = eval(&[
        "--lookback",
        "2",
        "--horizon",
        "2",
        "--split-rows",
        "6,3,3",
        "--split",
        "0.5,0.25,0.25",
    ]);
    assert!(both_splits.contains("--split"), "{both_splits}");

    let xlstm = fail(&[
        "eval",
        "--csv",
        &csv,
        "--lookback",
        "2",
        "--horizon",
        "2",
        "--split-rows",
        "6,3,3",
        "--season-period",
        "1",
    ]);
    assert!(
        xlstm.contains("lookback 2 is shorter than the preset's patch_len 16"),
        "{xlstm}"
    );

    let message = linear_eval_failure_on(
        dir.path(),
        "bad_cell.csv",
        "ts,a\n2024-01-01 00:00:00,1\n2024-01-01 01:00:00,abc\n",
    );
    assert!(
        message.contains("line 3, column 'a'") && message.contains("'abc'"),
        "{message}"
    );

    let message = linear_eval_failure_on(
        dir.path(),
        "unordered.csv",
        "ts,a\n2024-01-01 01:00:00,1\n2024-01-01 00:00:00,2\n",
    );
    assert!(
        message.contains("line 3") && message.contains("strictly increasing"),
        "{message}"
    );

    let message = linear_eval_failure_on(dir.path(), "bad_time.csv", "ts,a\nyesterday,1\n");
    assert!(message.contains("line 2, column 'ts'"), "{message}");

    let missing_file = linear_eval_failure("/nonexistent/file.csv");
    assert!(missing_file.contains("--csv"), "{missing_file}");
}

#[test]
fn generate_is_deterministic_and_its_output_evaluates() {
    let dir = tempfile::tempdir().unwrap();
    let first = dir.path().join("first.csv");
    let second = dir.path().join("second.csv");
    for path in [&first, &second] {
        succeed(&[
            "generate",
            "--kind",
            "hourly",
            "--rows",
            "1200",
            "--channels",
            "3",
            "--seed",
            "5",
            "--csv",
            path.to_str().unwrap(),
        ]);
    }
    let text = std::fs::read_to_string(&first).unwrap();
    assert_eq!(text, std::fs::read_to_string(&second).unwrap());
    assert!(
        text.starts_with("ts,channel_1,channel_2,channel_3\n2016-07-01T00:00:00Z,"),
        "{}",
        &text[..80]
    );
    assert_eq!(text.lines().count(), 1201);

    for model in ["linear", "seasonal-naive"] {
        let report = json(&succeed(&[
            "eval",
            "--csv",
            first.to_str().unwrap(),
            "--lookback",
            "96",
            "--horizon",
            "24",
            "--split",
            "0.6,0.2,0.2",
            "--model",
            model,
            "--json",
        ]));
        assert_eq!(report["model"], model);
        // 1200 rows: test floor(240) rows → 240 − 24 + 1 windows; hourly → season 24.
        assert_eq!(report["windows"], 217);
        assert_eq!(report["seasonal_period"], 24);
        for field in ["mse", "mae", "mase", "wql", "coverage_80"] {
            assert!(number(&report, field).is_finite(), "{field} in {report}");
        }
    }
}
