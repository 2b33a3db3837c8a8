//! `xlstm-forecast bench ingest`: end-to-end CSV import (parse + upsert + commit) into a
//! fresh Postgres database and a fresh SQLite file, then loading the series as a frame.
//!
//! Goals on the 2-core reference machine: Postgres ≥ 250,000 observations/s, SQLite
//! ≥ 100,000 observations/s, frame load + regularise ≤ 1 s for 100,000 × 10.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::{DateTime, SecondsFormat};
use sqlx::{Connection, Executor, PgConnection};

use crate::config::Settings;
use crate::data::{FrameOptions, Frequency, ImportOptions, import_csv_file, load_frame};
use crate::store::{self, Store};

const SERIES: &str = "bench";
const START_EPOCH_SECONDS: i64 = 1_704_067_200; // 2024-01-01T00:00:00Z
const STEP_SECONDS: i64 = 60;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BenchBackend {
    Postgres,
    Sqlite,
}

#[derive(Debug, clap::Args)]
pub struct IngestBenchArgs {
    /// Timestamps (CSV rows) to generate.
    #[arg(long, default_value_t = 100_000)]
    pub rows: usize,
    /// Value columns per row; observations = rows × channels.
    #[arg(long, default_value_t = 10)]
    pub channels: usize,
    /// Postgres server whose role may create databases; a fresh database is created on it
    /// and dropped afterwards.
    #[arg(
        long,
        value_name = "URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    pub postgres_url: String,
    /// Backends to measure (repeatable) [default: both].
    #[arg(long = "backend", value_enum)]
    pub backends: Vec<BenchBackend>,
    /// Print one JSON object per backend instead of text.
    #[arg(long)]
    pub json: bool,
}

/// The figures of one backend.
#[derive(Debug, serde::Serialize)]
struct IngestFigures {
    bench: &'static str,
    backend: &'static str,
    /// "dev" or "release": debug builds are several times slower.
    build: &'static str,
    rows: usize,
    channels: usize,
    observations: u64,
    csv_bytes: u64,
    import_seconds: f64,
    observations_per_second: f64,
    goal_observations_per_second: f64,
    /// Loading and regularising the whole series into a frame.
    frame_seconds: f64,
    /// The store's part of that: reading the long observations alone.
    store_read_seconds: f64,
    frame_rows: usize,
    goal_frame_seconds: f64,
    /// Peak resident memory (VmHWM) during this backend's import and frame load.
    peak_rss_mib: f64,
    /// Whether the peak was reset before this backend; if not, it covers all earlier work.
    peak_rss_is_per_backend: bool,
}

pub async fn run(args: IngestBenchArgs, _settings: &Settings) -> anyhow::Result<()> {
    if args.rows < 2 || args.channels == 0 {
        anyhow::bail!("--rows must be at least 2 and --channels at least 1");
    }
    let backends = if args.backends.is_empty() {
        vec![BenchBackend::Postgres, BenchBackend::Sqlite]
    } else {
        args.backends.clone()
    };
    let workdir = ScratchDir::create()?;
    let csv_path = workdir.path.join("bench.csv");
    let generation_started = Instant::now();
    let csv_bytes = write_csv(&csv_path, args.rows, args.channels)?;
    if !args.json {
        println!(
            "generated {} rows x {} channels ({:.1} MiB) in {:.2} s",
            args.rows,
            args.channels,
            csv_bytes as f64 / (1 << 20) as f64,
            generation_started.elapsed().as_secs_f64()
        );
    }
    for backend in backends {
        let figures = match backend {
            BenchBackend::Postgres => {
                let database = ScratchPostgres::create(&args.postgres_url).await?;
                let result = measure(
                    &database.url,
                    "postgres",
                    250_000.0,
                    &csv_path,
                    csv_bytes,
                    &args,
                )
                .await;
                database.drop_database().await;
                result?
            }
            BenchBackend::Sqlite => {
                let url = format!("sqlite://{}", workdir.path.join("bench.db").display());
                measure(&url, "sqlite", 100_000.0, &csv_path, csv_bytes, &args).await?
            }
        };
        print_figures(&figures, args.json)?;
    }
    Ok(())
}

async fn measure(
    database_url: &str,
    backend: &'static str,
    goal_observations_per_second: f64,
    csv_path: &Path,
    csv_bytes: u64,
    args: &IngestBenchArgs,
) -> anyhow::Result<IngestFigures> {
    let store = store::connect(database_url).await?;
    let peak_rss_is_per_backend = reset_peak_rss();
    let options = ImportOptions {
        frequency: Some(Frequency::from_micros(STEP_SECONDS * 1_000_000).expect("positive step")),
        ..ImportOptions::new(SERIES)
    };
    let import_started = Instant::now();
    let report = import_csv_file(store.as_ref(), csv_path, &options).await?;
    let import_seconds = import_started.elapsed().as_secs_f64();
    let (frame_rows, frame_elapsed) = time_frame(store.as_ref()).await?;
    let store_read_started = Instant::now();
    store.load_observations(SERIES, None, None, None).await?;
    let store_read_seconds = store_read_started.elapsed().as_secs_f64();
    Ok(IngestFigures {
        bench: "ingest",
        backend,
        build: if cfg!(debug_assertions) {
            "dev"
        } else {
            "release"
        },
        rows: args.rows,
        channels: args.channels,
        observations: report.summary.cells_written,
        csv_bytes,
        import_seconds,
        observations_per_second: report.summary.cells_written as f64 / import_seconds,
        goal_observations_per_second,
        frame_seconds: frame_elapsed.as_secs_f64(),
        store_read_seconds,
        frame_rows,
        goal_frame_seconds: 1.0,
        peak_rss_mib: peak_rss_kib()? as f64 / 1024.0,
        peak_rss_is_per_backend,
    })
}

async fn time_frame(store: &dyn Store) -> anyhow::Result<(usize, Duration)> {
    let started = Instant::now();
    let frame = load_frame(store, SERIES, None, None, &FrameOptions::default()).await?;
    Ok((frame.height(), started.elapsed()))
}

fn print_figures(figures: &IngestFigures, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string(figures)?);
        return Ok(());
    }
    let verdict = |ok: bool| if ok { "meets goal" } else { "BELOW GOAL" };
    println!(
        "{}: {} observations in {:.2} s = {:.0} obs/s (goal {:.0}: {}); frame {} rows in {:.3} s (store read alone {:.3} s; goal {:.1} s: {}); peak RSS {:.0} MiB{} [{} build]",
        figures.backend,
        figures.observations,
        figures.import_seconds,
        figures.observations_per_second,
        figures.goal_observations_per_second,
        verdict(figures.observations_per_second >= figures.goal_observations_per_second),
        figures.frame_rows,
        figures.frame_seconds,
        figures.store_read_seconds,
        figures.goal_frame_seconds,
        verdict(figures.frame_seconds <= figures.goal_frame_seconds),
        figures.peak_rss_mib,
        if figures.peak_rss_is_per_backend {
            ""
        } else {
            " (cumulative)"
        },
        figures.build,
    );
    Ok(())
}

/// A minute-step CSV with RFC 3339 times; returns its size in bytes.
fn write_csv(path: &Path, rows: usize, channels: usize) -> anyhow::Result<u64> {
    let file = File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let mut out = BufWriter::with_capacity(1 << 20, file);
    write!(out, "ts")?;
    for channel in 0..channels {
        write!(out, ",c{channel}")?;
    }
    writeln!(out)?;
    for row in 0..rows {
        let seconds = START_EPOCH_SECONDS + row as i64 * STEP_SECONDS;
        let at = DateTime::from_timestamp(seconds, 0).expect("benchmark times are in range");
        write!(out, "{}", at.to_rfc3339_opts(SecondsFormat::Secs, true))?;
        for channel in 0..channels {
            // A daily cycle per channel plus a slow drift: realistic, varied decimals.
            let phase =
                (row as f64 / 1440.0 + channel as f64 / channels as f64) * std::f64::consts::TAU;
            let value = 100.0 * phase.sin() + row as f64 * 1e-3 + channel as f64;
            write!(out, ",{value:.4}")?;
        }
        writeln!(out)?;
    }
    out.flush()?;
    Ok(out.get_ref().metadata()?.len())
}

/// Resets the kernel's peak-RSS mark (VmHWM) for this process; false where not permitted.
fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

fn peak_rss_kib() -> anyhow::Result<u64> {
    let status =
        std::fs::read_to_string("/proc/self/status").context("cannot read /proc/self/status")?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .context("/proc/self/status has no VmHWM line")
}

/// A database created for one benchmark run on a Postgres server.
pub(super) struct ScratchPostgres {
    admin_url: String,
    name: String,
    pub(super) url: String,
}

impl ScratchPostgres {
    pub(super) async fn create(admin_url: &str) -> anyhow::Result<Self> {
        let mut admin = PgConnection::connect(admin_url).await.with_context(|| {
            format!(
                "cannot connect to Postgres at {}",
                crate::config::mask_database_url(admin_url)
            )
        })?;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        let name = format!("xf_bench_{}_{nanos}", std::process::id());
        // The name is built here from digits and underscores, so quoting it is safe.
        admin
            .execute(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
            .await
            .with_context(|| format!("cannot create benchmark database {name}"))?;
        admin.close().await.ok();
        let mut url = url::Url::parse(admin_url).context("--postgres-url is not a valid URL")?;
        url.set_path(&format!("/{name}"));
        Ok(Self {
            admin_url: admin_url.to_string(),
            name,
            url: url.to_string(),
        })
    }

    /// Drops the database; failures are reported, not fatal (the figures are already taken).
    pub(super) async fn drop_database(self) {
        let dropped = async {
            let mut admin = PgConnection::connect(&self.admin_url).await?;
            admin
                .execute(sqlx::AssertSqlSafe(format!(
                    "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
                    self.name
                )))
                .await?;
            admin.close().await
        };
        if let Err(err) = dropped.await {
            eprintln!(
                "warning: could not drop benchmark database {}: {err}",
                self.name
            );
        }
    }
}

/// A directory under the system temp dir for the generated CSV and the SQLite file, removed
/// when dropped.
struct ScratchDir {
    path: std::path::PathBuf,
}

impl ScratchDir {
    fn create() -> anyhow::Result<Self> {
        let path =
            std::env::temp_dir().join(format!("xlstm-forecast-bench-{}", std::process::id()));
        std::fs::create_dir_all(&path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        Ok(Self { path })
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        if let Err(err) = std::fs::remove_dir_all(&self.path) {
            eprintln!("warning: could not remove {}: {err}", self.path.display());
        }
    }
}
