//! `dynsparse bench …`: throughput measured side by side with the CPU backend
//! in one run, printed as a Markdown table and optionally written into
//! BENCHMARKS.md (`--write`).

use std::path::PathBuf;
use std::time::Instant;

use crate::outln;
use clap::{Args, Subcommand};
use dynsparse::backend::{AnyBackend, BackendChoice, BackendJob, cpu::CpuBackend, run_on, select};
use dynsparse::train::memory::{MemoryPlan, Place};
use dynsparse::util::machine::{host_description, update_markdown_section};
use dynsparse::util::rng::Rng;
use dynsparse::{Backend, DType, Error, Result, Tensor, ops};
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// GFLOP/s of `C = A·B` (square, f32 accumulation) per dtype and size, with the ratio to the CPU backend.
    Matmul(MatmulArgs),
    /// Dense vs dynamic sparse attention (block mode): attention alone and end to end with the
    /// indexer and selection, forward and forward+backward, with peak device bytes.
    Attention(AttentionArgs),
    /// Peak device bytes and tokens/s of one training step in f32, f16 and bf16.
    Train(super::bench_train::TrainBenchArgs),
    /// Prefill and decode tokens/s through the KV cache: dense vs sparse decode at long contexts,
    /// batch 1 vs B, and the whole-window path for reference (random weights).
    Decode(super::bench_decode::DecodeArgs),
    /// Decode tokens/s by weight format (f32, bf16, int8, int4, 2:4) at batch 1 and B, random weights.
    Qdecode(super::bench_qdecode::QDecodeArgs),
    /// The OpenAI-compatible server under load: N concurrent streaming clients over loopback;
    /// requests/s, tokens/s, time to first token and inter-token latency, paged vs contiguous KV memory.
    Serve(super::bench_serve::ServeBenchArgs),
    /// Time, algorithm and bus bandwidth of all-reduce, reduce-scatter, all-gather and broadcast per
    /// message size (in-process, MPI or NCCL ranks), and training tokens/s at world 1, 2, 4.
    Allreduce(super::bench_allreduce::AllreduceArgs),
}

#[derive(Args, Debug)]
pub struct AttentionArgs {
    /// Sequence lengths.
    #[arg(long, value_delimiter = ',', default_values_t = [1024usize, 4096, 16384])]
    pub seqs: Vec<usize>,
    /// Query heads.
    #[arg(long, default_value_t = 8)]
    pub heads: usize,
    /// Key/value heads (must divide --heads; fewer than --heads is grouped-query attention).
    #[arg(long, default_value_t = 8)]
    pub kv_heads: usize,
    #[arg(long, default_value_t = 64)]
    pub head_dim: usize,
    /// Key block size of the sparse pattern.
    #[arg(long, default_value_t = 64)]
    pub block: usize,
    /// Key blocks each query keeps (incl. the sink and its own block): 16×64 = 1024 keys.
    #[arg(long, default_value_t = 16)]
    pub keep_blocks: usize,
    /// Indexer heads H_I.
    #[arg(long, default_value_t = 4)]
    pub index_heads: usize,
    /// Indexer head dim d_I.
    #[arg(long, default_value_t = 32)]
    pub index_dim: usize,
    /// Working dtype of q, k, v (and the indexer inputs).
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Also time forward+backward.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub backward: bool,
    /// Minimum seconds of timed work per measurement.
    #[arg(long, default_value_t = 0.3)]
    pub min_time: f64,
    /// Write the table into this Markdown file (a section replaced on every run), e.g. BENCHMARKS.md.
    #[arg(long)]
    pub write: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct MatmulArgs {
    /// Square sizes n (A, B, C are n×n).
    #[arg(long, value_delimiter = ',', default_values_t = [256usize, 512, 1024])]
    pub sizes: Vec<usize>,
    /// Dtypes to time (those the backend does not support are reported and skipped).
    #[arg(long, value_delimiter = ',', default_values_t = ["f32".to_string(), "f16".to_string(), "bf16".to_string()])]
    pub dtypes: Vec<String>,
    /// Minimum seconds of timed work per measurement (after one warm-up call).
    #[arg(long, default_value_t = 0.5, allow_negative_numbers = true)]
    pub min_time: f64,
    /// Skip the CPU-backend baseline (and the ratio column).
    #[arg(long)]
    pub no_cpu_baseline: bool,
    /// Write the table into this Markdown file (a section replaced on every run), e.g. BENCHMARKS.md.
    #[arg(long)]
    pub write: Option<PathBuf>,
}

pub fn run(choice: BackendChoice, cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Matmul(a) => matmul(choice, a),
        BenchCommand::Attention(a) => super::bench_attention::run(choice, a),
        BenchCommand::Train(a) => super::bench_train::run(choice, a),
        BenchCommand::Decode(a) => super::bench_decode::run(choice, a),
        BenchCommand::Qdecode(a) => super::bench_qdecode::run(choice, a),
        BenchCommand::Serve(a) => super::bench_serve::run(choice, a),
        BenchCommand::Allreduce(a) => super::bench_allreduce::run(a),
    }
}

/// One timed configuration.
#[derive(Clone, Debug)]
struct Row {
    dtype: DType,
    n: usize,
    ms: f64,
    gflops: f64,
}

struct MatmulJob<'a> {
    sizes: &'a [usize],
    dtypes: &'a [DType],
    min_time: f64,
    bar: &'a ProgressBar,
}

impl BackendJob for MatmulJob<'_> {
    type Output = Vec<Row>;
    fn run<B: Backend>(self, be: &B) -> Result<Vec<Row>> {
        let mut rows = Vec::new();
        for &dt in self.dtypes {
            if !be.supports(dt) {
                self.bar.println(format!("{}: {dt} not supported by {}, skipped", be.kind(), be.device_name()));
                self.bar.inc(self.sizes.len() as u64);
                continue;
            }
            for &n in self.sizes {
                self.bar.set_message(format!("{} {dt} {n}³", be.kind()));
                let mut rng = Rng::new(n as u64);
                let a = Tensor::from_f32(be, &rng.normal_vec(n * n), &[n, n], dt)?;
                let b = Tensor::from_f32(be, &rng.normal_vec(n * n), &[n, n], dt)?;
                let mut c = Tensor::empty(be, &[n, n], dt)?;
                let s = measure(be, self.min_time, || ops::matmul(be, &a, &b, &mut c, false, false, 1.0, 0.0))?;
                rows.push(Row { dtype: dt, n, ms: s * 1e3, gflops: 2.0 * (n as f64).powi(3) / s / 1e9 });
                self.bar.inc(1);
            }
        }
        Ok(rows)
    }
}

/// Mean seconds of one call of `f`, synchronised: a warm-up call on GPU
/// backends (pipeline and kernel compilation), one timed call, then as many
/// more as fit in `min_time` (at most 1000).
pub fn measure<B: Backend>(be: &B, min_time: f64, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    if be.kind() != dynsparse::BackendKind::Cpu {
        f()?;
        be.synchronize()?;
    }
    let t0 = Instant::now();
    f()?;
    be.synchronize()?;
    let once = t0.elapsed().as_secs_f64();
    if once >= min_time {
        return Ok(once);
    }
    let iters = ((min_time / once.max(1e-6)).ceil() as usize).clamp(1, 1000);
    let t0 = Instant::now();
    for _ in 0..iters {
        f()?;
    }
    be.synchronize()?;
    Ok(t0.elapsed().as_secs_f64() / iters as f64)
}

/// Largest square size `bench matmul` takes (a 65536² f32 matrix is 16 GiB).
const MAX_MATMUL: usize = 65536;

pub fn parse_dtypes(v: &[String]) -> Result<Vec<DType>> {
    v.iter()
        .map(|s| {
            DType::parse(s)
                .filter(|d| d.is_float())
                .ok_or_else(|| Error::Invalid(format!("unknown float dtype `{s}` (expected f32, f16 or bf16)")))
        })
        .collect()
}

fn matmul(choice: BackendChoice, args: MatmulArgs) -> Result<()> {
    let dtypes = parse_dtypes(&args.dtypes)?;
    if let Some(&n) = args.sizes.iter().find(|&&n| n == 0 || n > MAX_MATMUL) {
        return Err(Error::Invalid(format!("--sizes {n}: accepted range 1..={MAX_MATMUL}")));
    }
    if args.sizes.is_empty() {
        return Err(Error::Invalid("--sizes needs positive sizes, e.g. --sizes 256,512,1024".into()));
    }
    if !(args.min_time.is_finite() && (0.0..=3600.0).contains(&args.min_time)) {
        return Err(Error::Invalid(format!("--min-time {}: accepted range 0..=3600 seconds", args.min_time)));
    }
    let sel = select(choice)?;
    // One size at a time is alive: A, B, C in the widest dtype plus the two f32 host vectors
    // they are made from; the CPU baseline holds the same in host memory.
    let n = args.sizes.iter().copied().max().unwrap_or(0) as u128;
    let width = dtypes.iter().map(|d| d.size()).max().unwrap_or(4) as u128;
    let cpu_baseline = !args.no_cpu_baseline && !matches!(sel.backend, AnyBackend::Cpu(_));
    let plan = MemoryPlan {
        parts: vec![
            ("A, B, C", Place::Device, 3 * n * n * width),
            ("host inputs", Place::Host, 8 * n * n),
            ("CPU baseline", Place::Host, if cpu_baseline { 3 * n * n * width } else { 0 }),
        ],
    };
    super::preflight(&plan, &sel.backend, &format!("bench matmul at n = {n}"), "lower --sizes")?;
    log::info!("bench on {} ({}): {}", sel.backend.kind(), sel.backend.device_name(), sel.reason);
    let with_cpu = !args.no_cpu_baseline && !matches!(sel.backend, AnyBackend::Cpu(_));
    let total = (dtypes.len() * args.sizes.len() * if with_cpu { 2 } else { 1 }) as u64;
    let bar = ProgressBar::new(total)
        .with_style(ProgressStyle::with_template("{bar:30} {pos}/{len} {msg} [{elapsed}]").expect("static template"));
    let job = |bar| MatmulJob { sizes: &args.sizes, dtypes: &dtypes, min_time: args.min_time, bar };
    let rows = run_on(&sel.backend, job(&bar))?;
    let cpu_rows = if with_cpu { Some(job(&bar).run(&CpuBackend::new())?) } else { None };
    bar.finish_and_clear();

    let kind = sel.backend.kind();
    let mut md = format!(
        "Machine: {} — device: {} ({kind}).\n\nCommand: `dynsparse --backend {kind} bench matmul --sizes {} --dtypes {}`\n\n",
        host_description(),
        sel.backend.device_name(),
        args.sizes.iter().map(|s| s.to_string()).collect::<Vec<_>>().join(","),
        dtypes.iter().map(|d| d.name()).collect::<Vec<_>>().join(","),
    );
    if cpu_rows.is_some() {
        md.push_str(&format!(
            "| dtype | n | {kind} ms | {kind} GFLOP/s | cpu GFLOP/s | {kind} / cpu |\n|---|---:|---:|---:|---:|---:|\n"
        ));
    } else {
        md.push_str(&format!("| dtype | n | {kind} ms | {kind} GFLOP/s |\n|---|---:|---:|---:|\n"));
    }
    for r in &rows {
        let base = cpu_rows.as_ref().and_then(|c| c.iter().find(|c| c.dtype == r.dtype && c.n == r.n));
        match base {
            Some(c) => md.push_str(&format!(
                "| {} | {} | {:.3} | {:.2} | {:.2} | {:.3}× |\n",
                r.dtype,
                r.n,
                r.ms,
                r.gflops,
                c.gflops,
                r.gflops / c.gflops
            )),
            None => md.push_str(&format!("| {} | {} | {:.3} | {:.2} |\n", r.dtype, r.n, r.ms, r.gflops)),
        }
    }
    outln!("{md}");
    if let Some(path) = &args.write {
        update_markdown_section(path, &format!("bench matmul {kind}"), &md)?;
        outln!("written to {}", path.display());
    }
    Ok(())
}
