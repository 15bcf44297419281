//! The `dynsparse` command line.

pub mod bench;
pub mod bench_allreduce;
pub mod bench_attention;
pub mod bench_decode;
pub mod bench_qdecode;
pub mod bench_serve;
pub mod bench_train;
pub mod compress;
pub mod info;
pub mod launch;
pub mod serve;
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
    /// Serve a checkpoint over HTTP: an OpenAI-compatible API (/v1/completions with SSE streaming,
    /// /v1/models, /health, /metrics) with continuous batching over a paged KV cache.
    Serve(serve::ServeArgs),
    /// Quantize a training checkpoint's linear weights (int8, int4, 2:4) into a compressed
    /// checkpoint that eval, generate and serve load; prints size, Δ validation loss and decode speed.
    Compress(compress::CompressArgs),
    /// List the compiled-in backends, every GPU adapter found, and what `--backend auto` would pick.
    Info,
    /// Measure op throughput side by side with the CPU backend.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Start the ranks of a data-parallel job on this node, like torchrun.
    ///
    /// Runs N processes of this program, each running the command after `--` with RANK,
    /// WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT set. Every line a
    /// rank prints is forwarded with a `[rank R] ` prefix. SIGINT/SIGTERM are forwarded to the
    /// ranks; when a rank fails the others get SIGTERM, then SIGKILL after --grace seconds, and
    /// launch exits non-zero naming the rank. CUDA ranks reduce with NCCL. `train` on the cpu
    /// or wgpu backend is run as `mpirun -np N …` instead (the collectives come from MPI; needs
    /// a build with --features mpi and mpirun on PATH; extra mpirun flags in
    /// DYNSPARSE_MPIRUN_ARGS; output as mpirun prints it); without them, use `train --world N`
    /// (ranks in one process).
    ///
    /// Example: dynsparse launch --nproc 2 -- --backend cpu train --out runs/dp --batch 2
    Launch(launch::LaunchArgs),
    /// Prints the rank variables set by `launch` (a diagnostic for its tests).
    #[command(hide = true)]
    RankEnv(launch::RankEnvArgs),
}

use dynsparse::backend::AnyBackend;
use dynsparse::train::memory::MemoryPlan;
use dynsparse::util::files::mem_available;

/// Writes program output to stdout. When the reader has gone (EPIPE, as in
/// `dynsparse generate … | head -c 20`) the process ends at once with status 0:
/// the consumer took what it wanted, and nothing is left to do (checkpoints are
/// saved before anything is printed). Any other write error is an error line, status 1.
pub fn emit(args: std::fmt::Arguments) {
    use std::io::Write;
    let mut o = std::io::stdout().lock();
    if let Err(e) = o.write_fmt(args).and_then(|_| o.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("error: writing to stdout: {e}");
        std::process::exit(1);
    }
}

/// `println!` through [`emit`].
#[macro_export]
macro_rules! outln {
    () => { $crate::cli::emit(format_args!("\n")) };
    ($($t:tt)*) => { $crate::cli::emit(format_args!("{}\n", format_args!($($t)*))) };
}

/// Memory of the chosen device for the memory preflight: `None` when the
/// device's memory is the host's (the CPU backend, a software wgpu adapter);
/// else its total bytes (`u64::MAX` where the API does not tell) and name.
pub fn device_memory(any: &AnyBackend) -> Option<(u64, String)> {
    match any {
        AnyBackend::Cpu(_) => None,
        #[cfg(feature = "wgpu")]
        AnyBackend::Wgpu(_) => {
            let name = any.device_name();
            let n = name.to_ascii_lowercase();
            if n.contains("llvmpipe") || n.contains("swiftshader") { None } else { Some((u64::MAX, name)) }
        }
        #[cfg(feature = "cuda")]
        AnyBackend::Cuda(_) => {
            let total = dynsparse::backend::cuda::probe().ok().and_then(|d| d.first().map(|d| d.total_memory as u64));
            Some((total.unwrap_or(u64::MAX), any.device_name()))
        }
    }
}

/// Runs the memory preflight of `plan` for the backend `any` will run it on.
pub fn preflight(plan: &MemoryPlan, any: &AnyBackend, what: &str, hint: &str) -> dynsparse::Result<()> {
    let dev = device_memory(any);
    plan.check(what, mem_available(), dev.as_ref().map(|(b, n)| (*b, n.as_str())), hint)
}
