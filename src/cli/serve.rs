//! `xlstm-forecast serve`: the HTTP service over the configured store.

use std::net::SocketAddr;

use crate::api::{ApiConfig, Application};
use crate::config::{Settings, mask_database_url};
use crate::store;

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Address to listen on [default: server.bind from the settings].
    #[arg(long, value_name = "HOST:PORT")]
    pub bind: Option<SocketAddr>,
    /// Largest observation upload accepted, in bytes (larger ones get 413).
    #[arg(long, value_name = "BYTES", default_value_t = crate::api::BodyLimits::DEFAULT_OBSERVATIONS_BYTES)]
    pub max_upload_bytes: usize,
}

pub async fn run(args: ServeArgs, settings: &Settings) -> anyhow::Result<()> {
    let url = settings.database_url();
    let store = store::connect(&url).await?;
    let mut config = ApiConfig::from_settings(settings);
    if let Some(bind) = args.bind {
        config.bind = bind;
    }
    config.limits.observations_bytes = args.max_upload_bytes;
    let application = Application::build(&config, store)?;
    // Printed, not logged: the default log level is warn, and whoever started
    // the service needs to know where it listens.
    eprintln!(
        "listening on http://{} ({} store at {}; API key {})",
        application.local_addr(),
        store::Backend::from_url(&url)?.as_str(),
        mask_database_url(&url),
        if config.api_key.is_some() {
            "required for writes"
        } else {
            "not configured: writes are open"
        }
    );
    application.run_until_stopped().await?;
    Ok(())
}
