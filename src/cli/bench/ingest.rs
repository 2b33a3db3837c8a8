use crate::config::Settings;

#[derive(Debug, clap::Args)]
pub struct IngestBenchArgs {}

pub async fn run(_args: IngestBenchArgs, _settings: &Settings) -> anyhow::Result<()> {
    anyhow::bail!("ingest benchmark: under construction")
}
