//! The `dynsparse` command line.

pub mod bench;
pub mod bench_attention;
pub mod bench_decode;
pub mod bench_train;
pub mod info;
pub mod train;

use clap::{Parser, Subcommand};
use dynsparse::backend::BackendChoice;

#[derive(Parser, Debug)]
#[command(
    name = "dynsparse",
    version,
    about = "Train, compress and serve transformer LMs with dynamic sparse attention on any GPU (wgpu, CUDA) or the CPU",
    long_about = "dynsparse runs a transformer with dynamic sparse attention on one of three backends: \
the pure-Rust CPU reference, WGSL compute shaders through wgpu (Vulkan, Metal, DX12), or CUDA (build with \
--features cuda).\n\nLogging: RUST_LOG=debug for detail. A software Vulkan adapter (lavapipe) is used only \
when asked for: --backend wgpu or DYNSPARSE_WGPU_ADAPTER=<name or index>."
)]
pub struct Cli {
    /// Where to run: auto = CUDA if a device answers, else a hardware wgpu adapter, else the CPU.
    #[arg(long, value_enum, default_value_t = BackendChoice::Auto, global = true)]
    pub backend: BackendChoice,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Train the DSA language model (default: a small model on the embedded long-range retrieval corpus,
    /// a few minutes on a 2-core CPU). Writes a checkpoint, a CSV log and an SVG loss curve to --out.
    Train(Box<train::TrainArgs>),
    /// Validation loss, perplexity and retrieval accuracy of a checkpoint.
    Eval(train::EvalArgs),
    /// Generate text from a checkpoint (greedy or sampled).
    Generate(train::GenerateArgs),
    /// List the compiled-in backends, every GPU adapter found, and what `--backend auto` would pick.
    Info,
    /// Measure op throughput side by side with the CPU backend.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
}
