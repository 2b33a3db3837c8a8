//! `xlstm-forecast bench forecast`: forecast latency over HTTP with the champion cached. A
//! series is imported and a model trained through the real run queue (one short epoch: the
//! architecture, not its accuracy, sets the latency), the service is started on a free port,
//! and a second process (`bench http-load`, this binary) keeps N keep-alive connections busy
//! with `GET /api/v1/series/{name}/forecast` for a fixed time.

use std::io::Cursor;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use super::queue::{QueueBackend, ScratchStore};
use crate::api::{ApiConfig, Application, BodyLimits};
use crate::data::{ImportOptions, import_csv};
use crate::forecast::synthetic::{SyntheticKind, SyntheticSpec, generate};
use crate::jobs::{TrainMode, WorkerConfig, WorkerPool, enqueue_train, standard_executors};
use crate::store::{self, RunStatus};

const SERIES: &str = "bench";
const GOAL_P50_MS: f64 = 5.0;
const GOAL_P99_MS: f64 = 25.0;
const GOAL_PER_SECOND: f64 = 300.0;

#[derive(Debug, clap::Args)]
pub struct ForecastBenchArgs {
    /// Concurrent keep-alive connections of the load generator.
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
    /// Seconds of load per backend.
    #[arg(long, default_value_t = 10.0)]
    pub seconds: f64,
    /// Offer this many requests per second in all, spread over the connections on a fixed
    /// schedule, with latency counted from each request's scheduled time (so a slow answer
    /// also counts against the requests queued behind it). Without it each connection sends
    /// its next request as soon as the previous one is answered, which measures saturation.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Model preset (lookback 336, horizon 96, 7 channels).
    #[arg(long, default_value = "small")]
    pub preset: String,
    /// Postgres server whose role may create databases (a scratch database is dropped after).
    #[arg(
        long,
        value_name = "URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    pub postgres_url: String,
    /// Backends to measure (repeatable) [default: sqlite and postgres].
    #[arg(long = "backend", value_enum)]
    pub backends: Vec<QueueBackend>,
    /// Forecast memo settings to measure (repeatable) [default: on and off]. `on`: the
    /// service's default, so the rows being unchanged, requests after the first reuse its
    /// forecast; `off`: every request reads the rows and runs the network.
    #[arg(long = "memo", value_enum)]
    pub memo: Vec<MemoSetting>,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MemoSetting {
    On,
    Off,
}

/// The load generator's side (run as a second process by `bench forecast`).
#[derive(Debug, clap::Args)]
pub struct HttpLoadArgs {
    #[arg(long)]
    pub addr: SocketAddr,
    #[arg(long)]
    pub path: String,
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
    #[arg(long, default_value_t = 10.0)]
    pub seconds: f64,
    #[arg(long)]
    pub rate: Option<f64>,
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct LoadFigures {
    requests: usize,
    errors: usize,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    per_second: f64,
}

#[derive(Debug, serde::Serialize)]
struct ForecastFigures {
    bench: &'static str,
    backend: &'static str,
    memo: MemoSetting,
    build: &'static str,
    preset: String,
    lookback: usize,
    horizon: usize,
    channels: usize,
    concurrency: usize,
    /// Requests per second offered (open loop); null when each connection sends as fast as
    /// it is answered.
    offered_per_second: Option<f64>,
    seconds: f64,
    requests: usize,
    errors: usize,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    forecasts_per_second: f64,
    goal_p50_ms: f64,
    goal_p99_ms: f64,
    goal_forecasts_per_second: f64,
}

pub async fn run(args: ForecastBenchArgs) -> anyhow::Result<()> {
    let positive = |value: f64| value > 0.0 && value.is_finite();
    if args.concurrency == 0 || !positive(args.seconds) || args.rate.is_some_and(|r| !positive(r)) {
        bail!("--concurrency, --seconds and --rate must be positive");
    }
    let backends = if args.backends.is_empty() {
        vec![QueueBackend::Sqlite, QueueBackend::Postgres]
    } else {
        args.backends.clone()
    };
    let memo = if args.memo.is_empty() {
        vec![MemoSetting::On, MemoSetting::Off]
    } else {
        args.memo.clone()
    };
    for backend in backends {
        let scratch = ScratchStore::create(backend, &args.postgres_url, "forecast").await?;
        let result = measure(scratch.url(), scratch.backend(), &memo, &args).await;
        scratch.remove().await;
        let measured = result?;
        for figures in measured {
            if args.json {
                println!("{}", serde_json::to_string(&figures)?);
            } else {
                println!(
                    "{} (memo {:?}): {} forecasts in {:.1} s at concurrency {}: p50 {:.2} ms \
                     (goal ≤ {GOAL_P50_MS}), p99 {:.2} ms (goal ≤ {GOAL_P99_MS}), {:.0}/s \
                     (goal ≥ {GOAL_PER_SECOND}), {} errors",
                    figures.backend,
                    figures.memo,
                    figures.requests,
                    figures.seconds,
                    figures.concurrency,
                    figures.p50_ms,
                    figures.p99_ms,
                    figures.forecasts_per_second,
                    figures.errors
                );
            }
        }
    }
    Ok(())
}

async fn measure(
    url: &str,
    backend: &'static str,
    memo: &[MemoSetting],
    args: &ForecastBenchArgs,
) -> anyhow::Result<Vec<ForecastFigures>> {
    let (lookback, horizon, channels, rows) = (336, 96, 7, 1200);
    let store = store::connect(url).await?;
    let sample = generate(&SyntheticSpec::new(
        SyntheticKind::Hourly,
        rows,
        channels,
        3,
    ))?;
    let mut csv = format!("ts,{}\n", sample.channel_names.join(","));
    for row in 0..rows {
        let ts = chrono::DateTime::from_timestamp_micros(sample.timestamp_micros(row))
            .context("timestamp")?;
        let values: Vec<String> = (0..channels)
            .map(|c| sample.matrix.values[row * channels + c].to_string())
            .collect();
        csv.push_str(&format!("{},{}\n", ts.to_rfc3339(), values.join(",")));
    }
    let mut options = ImportOptions::new(SERIES);
    options.frequency = Some(SyntheticKind::Hourly.frequency());
    import_csv(store.as_ref(), Cursor::new(csv.into_bytes()), &options).await?;
    let series = store
        .get_series(SERIES)
        .await?
        .context("the bench series")?;
    let run = enqueue_train(
        store.as_ref(),
        &series,
        TrainMode::Full,
        serde_json::json!({"preset": args.preset,
            "overrides": {"lookback": lookback, "horizon": horizon, "max_epochs": 1}}),
    )
    .await?;
    let workers = WorkerPool::start(
        store.clone(),
        standard_executors(store.clone(), candle_core::Device::Cpu),
        WorkerConfig::default(),
    );
    let trained = loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let current = store.get_run(run.id).await?.context("the training run")?;
        if !matches!(current.status, RunStatus::Queued | RunStatus::Running) {
            break current;
        }
    };
    workers.shutdown().await;
    if trained.status != RunStatus::Succeeded {
        bail!(
            "training the bench model failed: {}",
            trained.error.unwrap_or_default()
        );
    }
    let mut measured = Vec::new();
    for &setting in memo {
        let load = load_server(url, setting, args).await?;
        measured.push(ForecastFigures {
            bench: "forecast",
            backend,
            memo: setting,
            build: if cfg!(debug_assertions) {
                "debug"
            } else {
                "release"
            },
            preset: args.preset.clone(),
            lookback,
            horizon,
            channels,
            concurrency: args.concurrency,
            offered_per_second: args.rate,
            seconds: args.seconds,
            requests: load.requests,
            errors: load.errors,
            p50_ms: load.p50_ms,
            p99_ms: load.p99_ms,
            max_ms: load.max_ms,
            forecasts_per_second: load.per_second,
            goal_p50_ms: GOAL_P50_MS,
            goal_p99_ms: GOAL_P99_MS,
            goal_forecasts_per_second: GOAL_PER_SECOND,
        });
    }
    Ok(measured)
}

/// Serves the store at `url` on a free port and runs the load generator against it. Each
/// server gets its own connection pool: pooled Postgres connections belong to the runtime
/// (an actix worker's) that opened them, which is gone once the previous server stopped.
async fn load_server(
    url: &str,
    memo: MemoSetting,
    args: &ForecastBenchArgs,
) -> anyhow::Result<LoadFigures> {
    let store = store::connect(url).await?;
    let config = ApiConfig {
        bind: "127.0.0.1:0".parse()?,
        api_key: None,
        limits: BodyLimits::default(),
        workers: None,
        cors_allowed_origins: Vec::new(),
        forecast_memo_bytes: match memo {
            MemoSetting::On => crate::api::DEFAULT_FORECAST_MEMO_BYTES,
            MemoSetting::Off => 0,
        },
    };
    let application = Application::build(&config, store.clone())?;
    let addr = application.local_addr();
    let server = tokio::spawn(application.run_until_stopped());
    let path = format!("/api/v1/series/{SERIES}/forecast");
    // The first request loads the champion into the cache.
    let (status, _) = request(&mut connect(addr).await?, addr, &path).await?;
    if status != 200 {
        bail!("the warm-up forecast answered {status}");
    }
    let output = tokio::process::Command::new(std::env::current_exe()?)
        .args([
            "bench",
            "http-load",
            "--addr",
            &addr.to_string(),
            "--path",
            &path,
        ])
        .args([
            "--concurrency",
            &args.concurrency.to_string(),
            "--seconds",
            &args.seconds.to_string(),
        ])
        .args(
            args.rate
                .map(|rate| vec!["--rate".to_string(), rate.to_string()])
                .unwrap_or_default(),
        )
        .output()
        .await?;
    server.abort();
    if !output.status.success() {
        bail!(
            "the load generator failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    serde_json::from_slice(&output.stdout).context("the load generator's figures")
}

type Connection = BufReader<TcpStream>;

async fn connect(addr: SocketAddr) -> anyhow::Result<Connection> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    Ok(BufReader::new(stream))
}

/// One keep-alive GET; returns the status and the body length.
async fn request(
    conn: &mut Connection,
    addr: SocketAddr,
    path: &str,
) -> anyhow::Result<(u16, usize)> {
    let head = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: keep-alive\r\n\r\n");
    conn.get_mut().write_all(head.as_bytes()).await?;
    let mut line = String::new();
    conn.read_line(&mut line).await?;
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("bad status line {line:?}"))?;
    let mut length = 0_usize;
    loop {
        line.clear();
        if conn.read_line(&mut line).await? == 0 {
            bail!("connection closed in the headers");
        }
        let header = line.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            length = value.trim().parse()?;
        }
    }
    let mut body = vec![0_u8; length];
    conn.read_exact(&mut body).await?;
    Ok((status, length))
}

pub async fn http_load(args: HttpLoadArgs) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs_f64(args.seconds);
    let started = Instant::now();
    let connections = args.concurrency.max(1);
    // Open loop: connection i sends its k-th request at started + (k·connections + i) / rate.
    let interval = args
        .rate
        .map(|rate| Duration::from_secs_f64(connections as f64 / rate));
    let tasks: Vec<_> = (0..connections)
        .map(|index| {
            let path = args.path.clone();
            let addr = args.addr;
            tokio::spawn(async move {
                let (mut latencies, mut errors) = (Vec::new(), 0_usize);
                let mut conn = None;
                let mut next = interval
                    .map(|every| started + every.mul_f64(index as f64 / connections as f64));
                while Instant::now() < deadline {
                    let scheduled = match (next, interval) {
                        (Some(at), Some(every)) => {
                            if at >= deadline {
                                break;
                            }
                            tokio::time::sleep_until(at.into()).await;
                            next = Some(at + every);
                            Some(at)
                        }
                        _ => None,
                    };
                    if conn.is_none() {
                        match connect(addr).await {
                            Ok(c) => conn = Some(c),
                            Err(_) => {
                                errors += 1;
                                continue;
                            }
                        }
                    }
                    let sent = scheduled.unwrap_or_else(Instant::now);
                    match request(conn.as_mut().expect("connected"), addr, &path).await {
                        Ok((200, _)) => latencies.push(sent.elapsed().as_secs_f64() * 1e3),
                        Ok(_) => errors += 1,
                        Err(_) => {
                            errors += 1;
                            conn = None;
                        }
                    }
                }
                (latencies, errors)
            })
        })
        .collect();
    let (mut latencies, mut errors) = (Vec::new(), 0);
    for task in tasks {
        let (l, e) = task.await?;
        latencies.extend(l);
        errors += e;
    }
    let elapsed = started.elapsed().as_secs_f64();
    latencies.sort_by(f64::total_cmp);
    let pick = |q: f64| {
        if latencies.is_empty() {
            f64::NAN
        } else {
            latencies[((latencies.len() - 1) as f64 * q).round() as usize]
        }
    };
    let figures = LoadFigures {
        requests: latencies.len(),
        errors,
        p50_ms: pick(0.5),
        p99_ms: pick(0.99),
        max_ms: pick(1.0),
        per_second: latencies.len() as f64 / elapsed,
    };
    println!("{}", serde_json::to_string(&figures)?);
    Ok(())
}
