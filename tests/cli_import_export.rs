//! The real `xlstm-forecast import` / `export` commands against a fresh SQLite file and a
//! fresh Postgres database: round trip, failures and their exit codes.

mod common;

use std::path::Path;
use std::process::{Command, Output};

const BINARY: &str = env!("CARGO_BIN_EXE_xlstm-forecast");

fn run(database_url: &str, args: &[&str]) -> Output {
    Command::new(BINARY)
        .args(args)
        .env("DATABASE_URL", database_url)
        .env_remove("XLSTM_FORECAST_CONFIG")
        .output()
        .expect("run xlstm-forecast")
}

fn succeed(database_url: &str, args: &[&str]) -> String {
    let output = run(database_url, args);
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{args:?} failed: {}\n{stdout}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// Runs a command that must fail and returns its stderr.
fn fail(database_url: &str, args: &[&str]) -> String {
    let output = run(database_url, args);
    assert!(!output.status.success(), "{args:?} should have failed");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn path(dir: &Path, name: &str) -> String {
    dir.join(name).display().to_string()
}

/// Local Berlin times (winter, +01:00) with a short gap in `load` and a long one in `temp`.
const INPUT: &str = "Timestamp,temp,load\n\
2024-01-01 01:00:00,1.5,10\n\
2024-01-01 02:00:00,2.5,\n\
2024-01-01 03:00:00,,12\n\
2024-01-01 07:00:00,7.25,16\n";

const EXPECTED_EXPORT: &str = "ts,temp,load\n\
2024-01-01T00:00:00Z,1.5,10.0\n\
2024-01-01T01:00:00Z,2.5,11.0\n\
2024-01-01T02:00:00Z,,12.0\n\
2024-01-01T03:00:00Z,,13.0\n\
2024-01-01T04:00:00Z,,14.0\n\
2024-01-01T05:00:00Z,,15.0\n\
2024-01-01T06:00:00Z,7.25,16.0\n";

fn round_trip(database_url: &str) {
    let dir = tempfile::tempdir().unwrap();
    let input = path(dir.path(), "input.csv");
    std::fs::write(&input, INPUT).unwrap();
    let stdout = succeed(
        database_url,
        &[
            "import",
            "--series",
            "plant",
            "--csv",
            &input,
            "--frequency",
            "1h",
            "--timezone",
            "Europe/Berlin",
        ],
    );
    assert_eq!(
        stdout.trim(),
        "imported 4 rows, 6 cells written, 2 channels into new series 'plant', \
         from 2024-01-01T00:00:00Z to 2024-01-01T06:00:00Z"
    );
    let again = succeed(
        database_url,
        &["import", "--series", "plant", "--csv", &input],
    );
    assert!(again.contains("into existing series 'plant'"), "{again}");

    let first_export = path(dir.path(), "first.csv");
    let stdout = succeed(
        database_url,
        &["export", "--series", "plant", "--csv", &first_export],
    );
    assert_eq!(
        stdout.trim(),
        format!("exported 7 rows x 2 channels of series 'plant' at frequency 1h to {first_export}")
    );
    assert_eq!(
        std::fs::read_to_string(&first_export).unwrap(),
        EXPECTED_EXPORT
    );

    // The export imports back unchanged (its times carry a Z, so no zone is needed).
    succeed(
        database_url,
        &[
            "import",
            "--series",
            "copy",
            "--csv",
            &first_export,
            "--frequency",
            "1h",
        ],
    );
    let second_export = path(dir.path(), "second.csv");
    succeed(
        database_url,
        &["export", "--series", "copy", "--csv", &second_export],
    );
    assert_eq!(
        std::fs::read_to_string(&second_export).unwrap(),
        EXPECTED_EXPORT
    );

    let window = path(dir.path(), "window.csv");
    succeed(
        database_url,
        &[
            "export",
            "--series",
            "plant",
            "--csv",
            &window,
            "--from",
            "2024-01-01T01:00:00Z",
            "--to",
            "2024-01-01 02:00:00",
            "--interpolation-limit",
            "0",
        ],
    );
    assert_eq!(
        std::fs::read_to_string(&window).unwrap(),
        "ts,temp,load\n2024-01-01T01:00:00Z,2.5,\n2024-01-01T02:00:00Z,,12.0\n"
    );
}

fn failures(database_url: &str) {
    let dir = tempfile::tempdir().unwrap();
    let bad = path(dir.path(), "bad.csv");
    std::fs::write(
        &bad,
        "ts,v\n2024-01-01T00:00:00Z,1\n2024-01-01T01:00:00Z,one\n",
    )
    .unwrap();
    let stderr = fail(database_url, &["import", "--series", "s", "--csv", &bad]);
    assert_eq!(
        stderr.trim(),
        "error: line 3, column 'v': expected a number, found 'one'"
    );

    let out = path(dir.path(), "out.csv");
    let stderr = fail(database_url, &["export", "--series", "s", "--csv", &out]);
    assert_eq!(
        stderr.trim(),
        "error: unknown series 's'",
        "the failed import must not create the series"
    );
    assert!(
        !Path::new(&out).exists(),
        "a failed export must not leave a file"
    );

    let missing_file = path(dir.path(), "absent.csv");
    let stderr = fail(
        database_url,
        &["import", "--series", "s", "--csv", &missing_file],
    );
    assert!(
        stderr.contains("cannot open") && stderr.contains("absent.csv"),
        "{stderr}"
    );

    let stderr = fail(
        database_url,
        &[
            "import",
            "--series",
            "s",
            "--csv",
            &bad,
            "--frequency",
            "1M",
        ],
    );
    assert!(stderr.contains("invalid frequency '1M'"), "{stderr}");
    let stderr = fail(
        database_url,
        &[
            "import",
            "--series",
            "s",
            "--csv",
            &bad,
            "--timezone",
            "Mars/Base",
        ],
    );
    assert!(stderr.contains("unknown time zone 'Mars/Base'"), "{stderr}");
}

#[test]
fn sqlite_round_trip() {
    let database = common::fresh_sqlite();
    round_trip(database.url());
}

#[test]
fn sqlite_failures() {
    let database = common::fresh_sqlite();
    failures(database.url());
}

#[tokio::test]
async fn postgres_round_trip() {
    let database = common::fresh_postgres().await;
    round_trip(database.url());
}

#[tokio::test]
async fn postgres_failures() {
    let database = common::fresh_postgres().await;
    failures(database.url());
}

/// The ingest benchmark runs end to end on a small input and reports one JSON object per
/// backend with consistent counts (its speed is for people to judge, not this test).
#[test]
fn bench_ingest_reports_both_backends() {
    let mut args = vec![
        "bench",
        "ingest",
        "--rows",
        "300",
        "--channels",
        "3",
        "--json",
    ];
    let postgres_url = std::env::var(common::POSTGRES_URL_VAR).ok();
    if let Some(url) = &postgres_url {
        args.extend(["--postgres-url", url.as_str()]);
    }
    let dir = tempfile::tempdir().unwrap();
    let stdout = succeed(
        &format!("sqlite://{}", path(dir.path(), "unused.db")),
        &args,
    );
    let reports: Vec<serde_json::Value> = stdout
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|err| panic!("{err}: {line}")))
        .collect();
    let backends: Vec<&str> = reports
        .iter()
        .map(|report| report["backend"].as_str().unwrap())
        .collect();
    assert_eq!(backends, vec!["postgres", "sqlite"]);
    for report in &reports {
        assert_eq!(report["observations"], 900);
        assert_eq!(report["frame_rows"], 300);
        assert!(
            report["observations_per_second"].as_f64().unwrap() > 0.0,
            "{report}"
        );
        assert!(report["peak_rss_mib"].as_f64().unwrap() > 0.0, "{report}");
    }
}
