//! `xlstm-forecast serve`: the HTTP service, the cron scheduler and the run
//! workers over the configured store, in one process (`--role all`, the
//! default) or split across processes and machines (`--role api`,
//! `--role worker`) that share one Postgres.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use crate::api::{ApiConfig, Application};
use crate::config::{Settings, mask_database_url};
use crate::jobs::{SchedulerHandle, WorkerConfig, WorkerPool, standard_executors};
use crate::store::{self, Store};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Role {
    /// HTTP API, scheduler and workers.
    All,
    /// Only the HTTP API.
    Api,
    /// Only the scheduler and the workers.
    Worker,
}

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Address to listen on [default: server.bind from the settings].
    #[arg(long, value_name = "HOST:PORT")]
    pub bind: Option<SocketAddr>,
    /// Largest observation upload accepted, in bytes (larger ones get 413).
    #[arg(long, value_name = "BYTES", default_value_t = crate::api::BodyLimits::DEFAULT_OBSERVATIONS_BYTES)]
    pub max_upload_bytes: usize,
    /// What this process runs.
    #[arg(long, value_enum, default_value_t = Role::All)]
    pub role: Role,
    /// Runs executed at once by this process (roles all and worker).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
    pub workers: u16,
    /// Seconds a run's lease lasts without a heartbeat: a run whose worker
    /// died is taken over this long after its last heartbeat.
    #[arg(long, value_name = "SECONDS", default_value_t = 30.0)]
    pub lease_seconds: f64,
    /// Seconds between reloads of the schedules from the store (changes made
    /// through another process's API take effect within this).
    #[arg(long, value_name = "SECONDS", default_value_t = 30)]
    pub schedule_reload_seconds: u64,
}

/// The scheduler and workers of a process.
struct Jobs {
    scheduler: SchedulerHandle,
    workers: WorkerPool,
}

impl Jobs {
    async fn start(
        store: Arc<dyn Store>,
        args: &ServeArgs,
        settings: &Settings,
    ) -> anyhow::Result<Self> {
        if !(args.lease_seconds.is_finite() && (0.5..=86_400.0).contains(&args.lease_seconds)) {
            anyhow::bail!("--lease-seconds must lie between 0.5 and 86400");
        }
        let lease = Duration::from_secs_f64(args.lease_seconds);
        let config = WorkerConfig {
            workers: usize::from(args.workers),
            lease,
            // Several beats per lease, so one slow beat does not lose it.
            heartbeat_interval: (lease / 4).min(WorkerConfig::default().heartbeat_interval),
            ..WorkerConfig::default()
        };
        let scheduler = SchedulerHandle::start(
            store.clone(),
            Duration::from_secs(args.schedule_reload_seconds.max(1)),
        )
        .await?;
        let device = settings
            .compute
            .device
            .open()
            .with_context(|| settings.origin_label("compute.device"))?;
        let workers = WorkerPool::start(store.clone(), standard_executors(store, device), config);
        Ok(Self { scheduler, workers })
    }

    /// Stops firing schedules, then lets each worker finish or release its run.
    async fn shutdown(self) {
        self.scheduler.shutdown().await;
        self.workers.shutdown().await;
    }
}

pub async fn run(args: ServeArgs, settings: &Settings) -> anyhow::Result<()> {
    let url = settings.database_url();
    let store = store::connect(&url).await?;
    let backend = store::Backend::from_url(&url)?.as_str();
    let jobs = match args.role {
        Role::Api => None,
        Role::All | Role::Worker => Some(Jobs::start(store.clone(), &args, settings).await?),
    };
    match args.role {
        Role::Api | Role::All => {
            let mut config = ApiConfig::from_settings(settings);
            if let Some(bind) = args.bind {
                config.bind = bind;
            }
            config.limits.observations_bytes = args.max_upload_bytes;
            let scheduler = jobs.as_ref().map(|jobs| jobs.scheduler.clone());
            let application = Application::build_with_scheduler(&config, store, scheduler)?;
            // Printed, not logged: the default log level is warn, and whoever started
            // the service needs to know where it listens.
            eprintln!(
                "listening on http://{} ({} store at {}; API key {}; {})",
                application.local_addr(),
                backend,
                mask_database_url(&url),
                if config.api_key.is_some() {
                    "required for writes"
                } else {
                    "not configured: writes are open"
                },
                describe_jobs(&args),
            );
            // actix stops gracefully on SIGINT/SIGTERM and returns here.
            application.run_until_stopped().await?;
        }
        Role::Worker => {
            eprintln!(
                "worker running ({} store at {}; {})",
                backend,
                mask_database_url(&url),
                describe_jobs(&args)
            );
            wait_for_stop_signal().await?;
        }
    }
    if let Some(jobs) = jobs {
        eprintln!("shutting down: finishing or releasing running runs");
        jobs.shutdown().await;
    }
    Ok(())
}

fn describe_jobs(args: &ServeArgs) -> String {
    match args.role {
        Role::Api => "no workers or scheduler (role api)".to_string(),
        Role::All | Role::Worker => format!(
            "{} worker(s), lease {} s, scheduler on",
            args.workers, args.lease_seconds
        ),
    }
}

async fn wait_for_stop_signal() -> std::io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate())?;
    tokio::select! {
        result = tokio::signal::ctrl_c() => result,
        _ = terminate.recv() => Ok(()),
    }
}
