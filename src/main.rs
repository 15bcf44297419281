//! `dynsparse`: the command-line front end. Errors print as one line and exit non-zero.

mod cli;

use std::process::ExitCode;

use clap::Parser;
use cli::{Cli, Command};

fn main() -> ExitCode {
    env_logger::Builder::from_env(
        env_logger::Env::default().default_filter_or("dynsparse=info,wgpu_hal=off,wgpu_core=error,naga=error,warn"),
    )
    .format_timestamp(None)
    .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Train(a) => cli::train::train(cli.backend, *a),
        Command::Eval(a) => cli::train::eval(cli.backend, a),
        Command::Generate(a) => cli::train::generate_text(cli.backend, a),
        Command::Serve(a) => cli::serve::run(cli.backend, a),
        Command::Compress(a) => cli::compress::run(cli.backend, a),
        Command::Info => cli::info::run(cli.backend),
        Command::Bench(b) => cli::bench::run(cli.backend, b),
        Command::Launch(a) => cli::launch::run(cli.backend, a),
        Command::RankEnv(a) => cli::launch::rank_env(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
