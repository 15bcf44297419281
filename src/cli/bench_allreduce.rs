//! `dynsparse bench allreduce`: time, algorithm and bus bandwidth of each
//! collective per message size (nccl-tests' conventions, results checked once
//! per size), and a scaling table of training tokens/s at several world sizes
//! with in-process CPU ranks.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::outln;
use clap::Args;
use dynsparse::backend::cpu::CpuBackend;
use dynsparse::data::synthetic::{SyntheticConfig, generate};
use dynsparse::dist::bench::{BenchOp, bandwidth, elements_for, parse_size, time_host};
use dynsparse::dist::{Collective, InProcess};
use dynsparse::model::{Model, ModelConfig};
use dynsparse::train::dp::DistConfig;
use dynsparse::train::{LrSchedule, MemoryReport, TrainConfig, Trainer};
use dynsparse::util::machine::{host_description, update_markdown_section};
use dynsparse::{DType, Error, Result};

#[derive(Args, Debug)]
pub struct AllreduceArgs {
    /// inproc (threads of this process), mpi (the processes of `mpirun`; the default under mpirun)
    /// or nccl (one process per GPU, ranks from RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT).
    #[arg(long)]
    pub collective: Option<String>,
    /// In-process ranks (inproc only; mpi and nccl take the world from their launcher).
    #[arg(long, default_value_t = 2)]
    pub world: usize,
    /// Message sizes in bytes of f32 (K = 1024): the full buffer, as in nccl-tests.
    #[arg(long, value_delimiter = ',', default_values_t = ["4K".to_string(), "64K".to_string(), "1M".to_string(), "16M".to_string(), "64M".to_string()])]
    pub sizes: Vec<String>,
    #[arg(long, value_delimiter = ',', default_values_t = ["all-reduce".to_string(), "reduce-scatter".to_string(), "all-gather".to_string(), "broadcast".to_string()])]
    pub ops: Vec<String>,
    /// Timed calls per op and size (the median is reported), after `--warmup` untimed ones.
    #[arg(long, default_value_t = 10)]
    pub iters: usize,
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// World sizes of the training scaling table (in-process CPU ranks, same batch per rank);
    /// `--scaling 0` skips the table.
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 2, 4])]
    pub scaling: Vec<usize>,
    /// Scaling table: sequences per rank per step.
    #[arg(long, default_value_t = 2)]
    pub batch: usize,
    #[arg(long, default_value_t = 128)]
    pub seq: usize,
    #[arg(long, default_value_t = 2)]
    pub layers: usize,
    #[arg(long, default_value_t = 128)]
    pub d_model: usize,
    /// Scaling table: timed optimizer steps per world size (after one warm-up step).
    #[arg(long, default_value_t = 5)]
    pub steps: u64,
    /// Seconds a rank waits inside one collective before it fails.
    #[arg(long, default_value_t = 60.0)]
    pub collective_timeout: f64,
    /// Write the tables into this Markdown file (a section replaced on every run), e.g. BENCHMARKS.md.
    #[arg(long)]
    pub write: Option<PathBuf>,
}

/// One op × size measurement.
struct Row {
    op: BenchOp,
    bytes: usize,
    secs: f64,
}

fn parse_args(a: &AllreduceArgs) -> Result<(Vec<BenchOp>, Vec<usize>)> {
    let ops = a.ops.iter().map(|s| BenchOp::parse(s)).collect::<Result<Vec<_>>>()?;
    let sizes = a.sizes.iter().map(|s| parse_size(s)).collect::<Result<Vec<_>>>()?;
    if a.iters == 0 {
        return Err(Error::Invalid("--iters 0: accepted range 1 or more".into()));
    }
    if !(a.collective_timeout > 0.0 && a.collective_timeout.is_finite()) {
        return Err(Error::Invalid("--collective-timeout: expected a positive number of seconds".into()));
    }
    Ok((ops, sizes))
}

/// Every op × size on one rank's handle; rows on every rank (rank 0 prints them).
fn sweep(comm: &dyn Collective, ops: &[BenchOp], sizes: &[usize], warmup: usize, iters: usize) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    for &op in ops {
        for &bytes in sizes {
            let n = elements_for(bytes, comm.world());
            let secs = time_host(comm, op, n, warmup, iters)?;
            rows.push(Row { op, bytes: n * 4, secs });
        }
    }
    Ok(rows)
}

fn table(rows: &[Row], world: usize) -> String {
    let mut md = String::from(
        "| op | bytes | time (µs) | algbw (GB/s) | busbw (GB/s) | result |\n|---|---:|---:|---:|---:|---|\n",
    );
    for r in rows {
        let (alg, bus) = bandwidth(r.op, world, r.bytes, r.secs);
        md.push_str(&format!(
            "| {} | {} | {:.1} | {:.3} | {:.3} | checked |\n",
            r.op.name(),
            r.bytes,
            r.secs * 1e6,
            alg,
            bus
        ));
    }
    md
}

fn inproc_rows(a: &AllreduceArgs, ops: &[BenchOp], sizes: &[usize], timeout: Duration) -> Result<Vec<Row>> {
    let comms = InProcess::group(a.world, timeout)?;
    let (warmup, iters) = (a.warmup, a.iters);
    std::thread::scope(|s| {
        let hs: Vec<_> = comms.into_iter().map(|c| s.spawn(move || sweep(&c, ops, sizes, warmup, iters))).collect();
        let mut first = None;
        for (r, h) in hs.into_iter().enumerate() {
            let out = h.join().map_err(|_| Error::Collective(format!("rank {r} panicked")))?;
            let rows = out.map_err(|e| Error::Collective(format!("rank {r}: {e}")))?;
            if first.is_none() {
                first = Some(rows);
            }
        }
        first.ok_or_else(|| Error::Invalid("empty world".into()))
    })
}

/// Training tokens/s of `world` in-process CPU ranks, `batch` sequences each (global batch
/// world·batch): (median step, fastest step), from rank 0's step times (the ranks meet in
/// every step's collectives, so rank 0's step is the group's).
fn scaling_point(a: &AllreduceArgs, world: usize, timeout: Duration) -> Result<(f64, f64)> {
    let cfg = ModelConfig { n_layers: a.layers, d_model: a.d_model, ..ModelConfig::default() };
    let data = std::sync::Arc::new(generate(3, 400_000.max(4 * world * a.batch * a.seq), SyntheticConfig::default()));
    let tc = TrainConfig {
        steps: 1000,
        batch: a.batch,
        seq: a.seq,
        accum: 1,
        precision: DType::F32,
        lr: LrSchedule { lr: 1e-3, min_lr: 1e-4, warmup_steps: 1, total_steps: 1000 },
        beta1: 0.9,
        beta2: 0.95,
        weight_decay: 0.1,
        grad_clip: 1.0,
        warmup_frac: 0.0,
        ramp_frac: 0.0,
        kl_every: 1,
        seed: 1,
    };
    let steps = a.steps.max(1);
    let run = move |comm: Option<InProcess>| -> Result<Vec<f64>> {
        let be = CpuBackend::new();
        let model = Model::new(&be, cfg, DType::F32, 1)?;
        let mut mem = MemoryReport::default();
        let mut tr = match comm {
            Some(c) => Trainer::new_distributed(&be, model, tc, DistConfig::default(), Box::new(c), &mut mem)?,
            None => Trainer::new(&be, model, tc, &mut mem)?,
        };
        tr.train_step(&be, &data)?;
        let mut t = Vec::new();
        for _ in 0..steps {
            let t0 = Instant::now();
            tr.train_step(&be, &data)?;
            t.push(t0.elapsed().as_secs_f64());
        }
        Ok(t)
    };
    let times = if world == 1 {
        run(None)?
    } else {
        let comms = InProcess::group(world, timeout)?;
        let hs: Vec<_> = comms
            .into_iter()
            .map(|c| {
                let run = run.clone();
                std::thread::spawn(move || run(Some(c)))
            })
            .collect();
        let mut all = Vec::new();
        for (r, h) in hs.into_iter().enumerate() {
            all.push(
                h.join()
                    .map_err(|_| Error::Collective(format!("rank {r} panicked")))?
                    .map_err(|e| Error::Collective(format!("rank {r}: {e}")))?,
            );
        }
        all.swap_remove(0)
    };
    let tokens = (world * a.batch * a.seq) as f64;
    let best = times.iter().cloned().fold(f64::INFINITY, f64::min);
    Ok((tokens / dynsparse::dist::bench::median(&times), tokens / best))
}

fn scaling_table(a: &AllreduceArgs, timeout: Duration) -> Result<Option<String>> {
    let worlds: Vec<usize> = a.scaling.iter().copied().filter(|&w| w > 0).collect();
    if worlds.is_empty() {
        return Ok(None);
    }
    let mut md = format!(
        "Training tokens/s, in-process CPU ranks, same batch per rank ({} × {} tokens; global batch = world × {}), \
         {} layers, d_model {}, f32; {} timed steps after 1 warm-up: the median step and the fastest.\n\n\
         | world | tokens/s (median step) | tokens/s (fastest step) | fastest vs world 1 |\n|---:|---:|---:|---:|\n",
        a.batch, a.seq, a.batch, a.layers, a.d_model, a.steps
    );
    let mut base = None;
    for w in worlds {
        let (med, best) = scaling_point(a, w, timeout)?;
        let b = *base.get_or_insert(best);
        md.push_str(&format!("| {w} | {med:.0} | {best:.0} | {:.2}× |\n", best / b));
    }
    Ok(Some(md))
}

fn emit(a: &AllreduceArgs, key: &str, head: &str, ops_md: &str, scaling: Option<String>) -> Result<()> {
    let mut md = format!("{head}\n\n{ops_md}");
    if let Some(s) = scaling {
        md.push_str(&format!("\n{s}"));
    }
    outln!("{md}");
    if let Some(p) = &a.write {
        update_markdown_section(p, key, &md)?;
        outln!("written to {}", p.display());
    }
    Ok(())
}

pub fn run(a: AllreduceArgs) -> Result<()> {
    let (ops, sizes) = parse_args(&a)?;
    let timeout = Duration::from_secs_f64(a.collective_timeout);
    let kind = match a.collective.as_deref() {
        Some(k) => k.to_string(),
        None if under_mpirun() => "mpi".into(),
        None => "inproc".into(),
    };
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load = load.split_whitespace().take(3).collect::<Vec<_>>().join(" ");
    match kind.as_str() {
        "inproc" => {
            if a.world == 0 {
                return Err(Error::Invalid("--world 0: accepted range 1 or more".into()));
            }
            let rows = inproc_rows(&a, &ops, &sizes, timeout)?;
            let head = format!(
                "`dynsparse bench allreduce --collective inproc --world {}`: {} in-process ranks (threads), \
                 host f32 slices, median of {} calls after {} warm-up; {}; load average {load}.",
                a.world,
                a.world,
                a.iters,
                a.warmup,
                host_description()
            );
            let scaling = scaling_table(&a, timeout)?;
            emit(&a, &format!("bench allreduce inproc world {}", a.world), &head, &table(&rows, a.world), scaling)
        }
        "mpi" => mpi_run(&a, &ops, &sizes, timeout, &load),
        "nccl" => nccl_run(&a, &ops, &sizes, timeout),
        other => Err(Error::Invalid(format!("--collective {other}: expected inproc, mpi or nccl"))),
    }
}

#[cfg(feature = "mpi")]
fn under_mpirun() -> bool {
    dynsparse::dist::mpi::under_mpirun()
}

#[cfg(not(feature = "mpi"))]
fn under_mpirun() -> bool {
    false
}

#[cfg(feature = "mpi")]
fn mpi_run(a: &AllreduceArgs, ops: &[BenchOp], sizes: &[usize], timeout: Duration, load: &str) -> Result<()> {
    use dynsparse::dist::mpi::Mpi;
    if !under_mpirun() {
        return Err(Error::Invalid(
            "--collective mpi: start the bench with mpirun (e.g. `mpirun -np 2 dynsparse bench allreduce`)".into(),
        ));
    }
    let comm = Mpi::init(timeout)?;
    let world = comm.world();
    let rows = sweep(&comm, ops, sizes, a.warmup, a.iters)?;
    if comm.rank() != 0 {
        return Ok(());
    }
    let head = format!(
        "`mpirun -np {world} dynsparse bench allreduce --collective mpi`: {world} MPI processes, host f32 slices, \
         median of {} calls after {} warm-up; {}; load average {load}.",
        a.iters,
        a.warmup,
        host_description()
    );
    // The scaling table uses in-process ranks; under mpirun only rank 0 would run it: skipped.
    emit(a, &format!("bench allreduce mpi world {world}"), &head, &table(&rows, world), None)
}

#[cfg(not(feature = "mpi"))]
fn mpi_run(_: &AllreduceArgs, _: &[BenchOp], _: &[usize], _: Duration, _: &str) -> Result<()> {
    Err(Error::Unavailable("--collective mpi: this build has no MPI support (build with --features mpi)".into()))
}

#[cfg(feature = "nccl")]
fn nccl_run(a: &AllreduceArgs, ops: &[BenchOp], sizes: &[usize], timeout: Duration) -> Result<()> {
    use dynsparse::backend::cuda::CudaBackend;
    use dynsparse::dist::LaunchEnv;
    use dynsparse::dist::nccl::{Nccl, new_id};
    use dynsparse::dist::nccl_prep::Bootstrap;

    let env = LaunchEnv::from_vars(|k| std::env::var(k).ok())?;
    let (be, comm) = match &env {
        Some(e) => {
            let be = CudaBackend::new(e.local_rank)?;
            let boot = Bootstrap::from_env(e, |k| std::env::var(k).ok());
            let comm = Nccl::from_launch(&be, e, &boot, timeout)?;
            (be, comm)
        }
        None => {
            let be = CudaBackend::new(0)?;
            let comm = Nccl::init(&be, 0, 1, &new_id()?, timeout)?;
            (be, comm)
        }
    };
    let (rank, world) = (comm.rank(), comm.world());
    let mut rows = Vec::new();
    for &op in ops {
        for &bytes in sizes {
            let n = elements_for(bytes, world);
            let secs = nccl_time(&be, &comm, op, n, a.warmup, a.iters)?;
            rows.push(Row { op, bytes: n * 4, secs });
        }
    }
    if rank != 0 {
        return Ok(());
    }
    let head = format!(
        "`dynsparse bench allreduce --collective nccl`: {world} rank(s), device {}, in-place on device buffers \
         (no host staging), median of {} calls after {} warm-up, each waited for.",
        be.info().name,
        a.iters,
        a.warmup
    );
    emit(a, &format!("bench allreduce nccl world {world}"), &head, &table(&rows, world), None)
}

/// One checked call, then timed ones, of `op` on a device buffer of `n` f32.
#[cfg(feature = "nccl")]
fn nccl_time(
    be: &dynsparse::backend::cuda::CudaBackend,
    comm: &dynsparse::dist::nccl::Nccl,
    op: BenchOp,
    n: usize,
    warmup: usize,
    iters: usize,
) -> Result<f64> {
    use dynsparse::Backend;
    use dynsparse::dist::ReduceOp;
    use dynsparse::dist::bench::{check, fill, median};
    use dynsparse::dtype::{bytes_to_f32, f32_to_bytes};
    let (rank, world) = (comm.rank(), comm.world());
    let s = n / world;
    let mut host = fill(op, rank, world, n);
    if op == BenchOp::AllGather {
        // In place: this rank's shard sits at its place in the full buffer.
        let mut full = vec![0f32; n];
        full[rank * s..(rank + 1) * s].copy_from_slice(&host);
        host = full;
    }
    let mut buf = be.upload(DType::F32, &f32_to_bytes(&host, DType::F32))?;
    let once = |buf: &mut _| -> Result<()> {
        match op {
            BenchOp::AllReduce => comm.all_reduce_device(buf, DType::F32, 0..n, ReduceOp::Sum),
            BenchOp::ReduceScatter => comm.reduce_scatter_device(buf, DType::F32, 0..n).map(|_| ()),
            BenchOp::AllGather => comm.all_gather_device(buf, DType::F32, 0..n),
            BenchOp::Broadcast => comm.broadcast_device(buf, DType::F32, 0..n, 0),
        }?;
        comm.wait()
    };
    once(&mut buf)?;
    let got = bytes_to_f32(&be.download(&buf, DType::F32, n)?, DType::F32);
    let got = if op == BenchOp::ReduceScatter { got[rank * s..(rank + 1) * s].to_vec() } else { got };
    check(op, rank, world, n, &got)?;
    for _ in 0..warmup {
        once(&mut buf)?;
    }
    let mut t = Vec::with_capacity(iters);
    for _ in 0..iters.max(1) {
        let t0 = Instant::now();
        once(&mut buf)?;
        t.push(t0.elapsed().as_secs_f64());
    }
    Ok(median(&t))
}

#[cfg(not(feature = "nccl"))]
fn nccl_run(_: &AllreduceArgs, _: &[BenchOp], _: &[usize], _: Duration) -> Result<()> {
    Err(Error::Unavailable(
        "--collective nccl: this build has no NCCL support (build with --features cuda,nccl)".into(),
    ))
}
