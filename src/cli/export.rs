use crate::config::Settings;

#[derive(Debug, clap::Args)]
pub struct ExportArgs {}

pub async fn run(_args: ExportArgs, _settings: &Settings) -> anyhow::Result<()> {
    anyhow::bail!("under construction")
}
