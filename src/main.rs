use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = xlstm_forecast::cli::Cli::parse();
    match xlstm_forecast::cli::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
