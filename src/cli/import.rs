use crate::config::Settings;

#[derive(Debug, clap::Args)]
pub struct ImportArgs {}

pub async fn run(_args: ImportArgs, _settings: &Settings) -> anyhow::Result<()> {
    anyhow::bail!("under construction")
}
