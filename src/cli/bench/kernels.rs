#[derive(Debug, clap::Args)]
pub struct KernelBenchArgs {
    /// Print one JSON object per case.
    #[arg(long)]
    pub json: bool,
}

pub fn run(_args: KernelBenchArgs) -> anyhow::Result<()> {
    anyhow::bail!("kernel benchmark: under construction")
}
