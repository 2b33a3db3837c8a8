use crate::config::Settings;

#[derive(Debug, clap::Args)]
pub struct MigrateArgs {}

pub async fn run(_args: MigrateArgs, _settings: &Settings) -> anyhow::Result<()> {
    anyhow::bail!("under construction")
}
