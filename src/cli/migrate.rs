//! `xlstm-forecast migrate`: apply pending migrations to the configured store.

use crate::config::{Settings, mask_database_url};
use crate::store;

#[derive(Debug, clap::Args)]
pub struct MigrateArgs {
    /// Database URL to migrate instead of the configured one.
    #[arg(long, value_name = "URL")]
    pub database_url: Option<String>,
}

pub async fn run(args: MigrateArgs, settings: &Settings) -> anyhow::Result<()> {
    let url = args.database_url.unwrap_or_else(|| settings.database_url());
    let masked_url = mask_database_url(&url);
    let store = store::open(&url).await?;
    let report = store.migrate().await?;
    println!("{} store at {masked_url}", store.backend().as_str());
    if report.newly_applied.is_empty() {
        println!(
            "schema up to date ({} migrations applied)",
            report.total_applied
        );
    } else {
        for (version, description) in &report.newly_applied {
            println!("applied {version} {description}");
        }
        println!(
            "{} newly applied, {} in total",
            report.newly_applied.len(),
            report.total_applied
        );
    }
    Ok(())
}
