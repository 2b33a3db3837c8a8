use crate::config::Settings;

#[derive(Debug, clap::Args)]
pub struct ConfigArgs {}

pub fn run(_args: ConfigArgs, _settings: &Settings) -> anyhow::Result<()> {
    anyhow::bail!("under construction")
}
