//! `xlstm-forecast config`: print the effective settings.

use crate::config::Settings;

#[derive(Debug, clap::Args)]
pub struct ConfigArgs {
    /// Print only the effective database URL (password masked).
    #[arg(long)]
    pub database_url: bool,
}

pub fn run(args: ConfigArgs, settings: &Settings) -> anyhow::Result<()> {
    if args.database_url {
        println!(
            "{}",
            crate::config::mask_database_url(&settings.database_url())
        );
    } else {
        print!("{}", settings.to_masked_toml()?);
    }
    Ok(())
}
