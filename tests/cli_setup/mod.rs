//! What the tests that drive the `dynsparse` binary share: the command with a
//! quiet log and no adapter override from the user's environment, a fresh
//! scratch folder per test, and the tiny model they train.

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Command;

/// The binary under test, logging errors only, with `XDG_RUNTIME_DIR` set (the
/// Vulkan loader wants one) and no `DYNSPARSE_WGPU_ADAPTER` from the caller.
pub fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_dynsparse"));
    c.env("RUST_LOG", "error").env("XDG_RUNTIME_DIR", "/tmp").env_remove("DYNSPARSE_WGPU_ADAPTER");
    c
}

/// An empty folder `dynsparse-{suite}-{pid}-{name}` under the system temp dir.
pub fn scratch(suite: &str, name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("dynsparse-{suite}-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A model and run small enough for a test.
pub const TINY: [&str; 14] = [
    "--layers",
    "1",
    "--d-model",
    "32",
    "--heads",
    "2",
    "--kv-heads",
    "1",
    "--seq",
    "64",
    "--batch",
    "2",
    "--context",
    "128",
];
