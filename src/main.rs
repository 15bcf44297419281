//! `dynsparse`: the command-line front end. Errors print as one line and exit non-zero.

mod cli;

use std::process::ExitCode;

use clap::Parser;
use cli::{Cli, Command};

fn main() -> ExitCode {
    quiet_headless_vulkan();
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

/// Mesa's implicit Vulkan layer `VK_LAYER_MESA_device_select` asks the Wayland
/// compositor for the default GPU while wgpu lists adapters. On a headless
/// machine (no usable `XDG_RUNTIME_DIR`) there is none, and libwayland prints
/// `error: XDG_RUNTIME_DIR is invalid or not set in the environment.` twice,
/// which reads like our own failure at the top of every run. We choose the
/// adapter ourselves (`--adapter`, hardware before software), so when the user
/// has not asked the layer for anything (`DRI_PRIME`, `MESA_VK_DEVICE_SELECT`,
/// `NODEVICE_SELECT`), it is switched off by its documented variable.
fn quiet_headless_vulkan() {
    let unset = |key: &str| std::env::var_os(key).is_none_or(|v| v.is_empty());
    let no_runtime_dir = std::env::var_os("XDG_RUNTIME_DIR").is_none_or(|d| !std::path::Path::new(&d).is_dir());
    if no_runtime_dir && unset("NODEVICE_SELECT") && unset("DRI_PRIME") && unset("MESA_VK_DEVICE_SELECT") {
        // SAFETY: the first statement of `main`, before any thread exists, so
        // nothing reads the environment while it changes.
        unsafe { std::env::set_var("NODEVICE_SELECT", "1") };
    }
}
