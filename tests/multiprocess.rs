//! Ranks as separate processes.
//!
//! `dynsparse launch` (always): the torchrun variables of each rank, output
//! prefixed by rank, a failing rank stops the others (SIGTERM, then SIGKILL
//! after the grace period), SIGTERM to the launcher reaches the ranks, the
//! exit status and error line, and no rank process left behind.
//!
//! MPI (`--features mpi` and an `mpirun` on PATH, else SKIP): two processes
//! under `mpirun -np 2` on loopback, CPU backend, take the same steps as one
//! process with twice the batch (f32, accum 2, ZeRO-1, f16 with an inf on one
//! rank only, a ZeRO-1 checkpoint resumed at world 2 and at world 1), through
//! the library (rank processes are this test binary's `mpi_rank_worker`) and
//! through the CLI; killing one rank of a 2-rank `train` (under mpirun and
//! under `dynsparse launch`) ends the job with a clear line, non-zero, and no
//! process left.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use dynsparse::DType;
use dynsparse::backend::cpu::CpuBackend;
use dynsparse::data::Corpus;
use dynsparse::model::Model;
use dynsparse::train::checkpoint::{self, TrainState};
use dynsparse::train::{DistConfig, MemoryReport, StepStats, Trainer};

mod dist_setup;
use dist_setup::{STEPS, model_cfg, rel, train_cfg};

const BIN: &str = env!("CARGO_BIN_EXE_dynsparse");

/// One mpirun / launch job at a time: the machine has 2 cores.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("dynsparse-mp-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Waits for `child` at most `limit` (a guard against a hang, not a timing assertion): past
/// it the child is killed and the test fails.
fn wait_guarded(mut child: Child, limit: Duration, what: &str) -> Output {
    let t0 = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if t0.elapsed() > limit {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "{what}: still running after {limit:?} (hang)\nstdout:\n{}\nstderr:\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn spawn(cmd: &mut Command) -> Child {
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap()
}

/// (pid, parent pid, command name) of every process.
fn processes() -> Vec<(u32, u32, String)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else { continue };
        // pid (comm) state ppid ...: comm may hold spaces, so split after the last ')'.
        let (Some(a), Some(b)) = (stat.find('('), stat.rfind(')')) else { continue };
        let comm = stat[a + 1..b].to_string();
        let ppid = stat[b + 1..].split_whitespace().nth(1).and_then(|x| x.parse().ok()).unwrap_or(0);
        out.push((pid, ppid, comm));
    }
    out
}

/// All processes below `root`.
fn descendants(root: u32) -> Vec<(u32, String)> {
    let all = processes();
    let mut found = vec![root];
    let mut out = Vec::new();
    let mut i = 0;
    while i < found.len() {
        for (pid, ppid, comm) in &all {
            if *ppid == found[i] && !found.contains(pid) {
                found.push(*pid);
                out.push((*pid, comm.clone()));
            }
        }
        i += 1;
    }
    out
}

/// Fails when any of `pids` still exists (running, or a zombie nobody reaped).
fn assert_gone(pids: &[u32], what: &str) {
    // A process that was just SIGKILLed may take a moment to be reaped by its parent.
    let t0 = Instant::now();
    loop {
        let left: Vec<String> = pids
            .iter()
            .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/stat")).ok())
            .map(|s| s.trim().to_string())
            .collect();
        if left.is_empty() {
            return;
        }
        if t0.elapsed() > Duration::from_secs(5) {
            panic!("{what}: processes left behind: {left:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn error_lines(stderr: &str) -> Vec<&str> {
    stderr.lines().filter(|l| l.starts_with("error:")).collect()
}

// ---------------------------------------------------------------- launch

/// (rank, variables, pid) from the `[rank R] RANK=… PID=…` lines of `rank-env`.
fn rank_lines(stdout: &str) -> Vec<(usize, String, u32)> {
    stdout
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("[rank ")?;
            let (r, body) = rest.split_once("] ")?;
            let (vars, pid) = body.rsplit_once(" PID=")?;
            Some((r.parse().ok()?, vars.to_string(), pid.trim().parse().ok()?))
        })
        .collect()
}

#[test]
fn launch_sets_the_torchrun_variables_and_prefixes_each_ranks_output() {
    let _g = serial();
    let child = spawn(Command::new(BIN).args(["launch", "--nproc", "3", "--master-port", "1234", "--", "rank-env"]));
    let out = wait_guarded(child, Duration::from_secs(60), "launch rank-env");
    let (so, se) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "stdout:\n{so}\nstderr:\n{se}");
    let mut lines = rank_lines(&so);
    lines.sort();
    assert_eq!(lines.len(), 3, "{so}");
    for (r, (rank, vars, _)) in lines.iter().enumerate() {
        assert_eq!(*rank, r);
        assert_eq!(
            vars,
            &format!("RANK={r} WORLD_SIZE=3 LOCAL_RANK={r} LOCAL_WORLD_SIZE=3 MASTER_ADDR=127.0.0.1 MASTER_PORT=1234")
        );
    }
    // The second node of two: global ranks 2 and 3.
    let child = spawn(Command::new(BIN).args([
        "launch",
        "--nproc",
        "2",
        "--nnodes",
        "2",
        "--node-rank",
        "1",
        "--master-addr",
        "10.0.0.1",
        "--",
        "rank-env",
    ]));
    let out = wait_guarded(child, Duration::from_secs(60), "launch rank-env node 1");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let mut lines = rank_lines(&text(&out.stdout));
    lines.sort();
    let got: Vec<(usize, String)> = lines.into_iter().map(|(r, v, _)| (r, v)).collect();
    let want: Vec<(usize, String)> = (0..2)
        .map(|l| {
            (
                l + 2,
                format!(
                    "RANK={} WORLD_SIZE=4 LOCAL_RANK={l} LOCAL_WORLD_SIZE=2 MASTER_ADDR=10.0.0.1 MASTER_PORT=29500",
                    l + 2
                ),
            )
        })
        .collect();
    assert_eq!(got, want);

    // Bad input: one error line, non-zero.
    for bad in [
        vec!["launch", "--nproc", "0", "--", "rank-env"],
        vec!["launch", "--nproc", "2", "--nnodes", "2", "--node-rank", "2", "--", "rank-env"],
        vec!["launch", "--nproc", "2", "--", "no-such-command"],
        vec!["launch", "--nproc", "2", "--", "launch", "--nproc", "2", "--", "info"],
    ] {
        let out = Command::new(BIN).args(&bad).output().unwrap();
        let se = text(&out.stderr);
        assert!(!out.status.success(), "{bad:?}");
        assert_eq!(error_lines(&se).len(), 1, "{bad:?}: {se}");
        assert!(se.starts_with("error: --n") || se.starts_with("error: launch:"), "{bad:?}: {se}");
    }
}

#[test]
fn a_failing_rank_ends_every_rank_and_launch_names_it() {
    let _g = serial();
    // Rank 1 exits with 7 at once; ranks 0 and 2 would sleep two minutes. The second run's
    // ranks ignore SIGTERM, so they end only by the SIGKILL after --grace.
    for extra in [&[][..], &["--ignore-term"][..]] {
        let mut args = vec!["launch", "--nproc", "3", "--grace", "1", "--", "rank-env"];
        args.extend(["--fail-rank", "1", "--exit-code", "7", "--sleep", "120"]);
        args.extend(extra);
        let child = spawn(Command::new(BIN).args(&args));
        let out = wait_guarded(child, Duration::from_secs(60), "launch with a failing rank");
        let (so, se) = (text(&out.stdout), text(&out.stderr));
        assert_eq!(out.status.code(), Some(1), "{extra:?}: stdout:\n{so}\nstderr:\n{se}");
        assert_eq!(
            error_lines(&se),
            vec!["error: launch: rank 1 exited with status 7; the other ranks were stopped"],
            "{extra:?}: {se}"
        );
        assert!(se.contains("[rank 1] rank-env: rank 1 exits with status 7"), "{se}");
        let pids: Vec<u32> = rank_lines(&so).iter().map(|l| l.2).collect();
        assert_eq!(pids.len(), 3, "{so}");
        assert_gone(&pids, "launch with a failing rank");
    }
}

#[test]
fn sigterm_to_launch_reaches_the_ranks() {
    let _g = serial();
    let child = spawn(Command::new(BIN).args(["launch", "--nproc", "2", "--", "rank-env", "--sleep", "120"]));
    let t0 = Instant::now();
    let ranks = loop {
        let d: Vec<u32> = descendants(child.id()).into_iter().map(|(p, _)| p).collect();
        if d.len() == 2 {
            break d;
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "the ranks did not start");
        std::thread::sleep(Duration::from_millis(50));
    };
    // Let them print (and so be running rank-env) before the signal.
    std::thread::sleep(Duration::from_millis(500));
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let out = wait_guarded(child, Duration::from_secs(60), "launch after SIGTERM");
    let se = text(&out.stderr);
    assert!(!out.status.success(), "{se}");
    assert_eq!(
        error_lines(&se),
        vec!["error: launch: received signal 15 (SIGTERM); forwarded it to the ranks, all have ended"],
        "{se}"
    );
    assert_gone(&ranks, "launch after SIGTERM");
}

// ---------------------------------------------------------------- MPI

fn dist_cfg(zero: bool) -> DistConfig {
    DistConfig { zero, bucket_mb: 0.01, first_bucket_mb: 0.002, class_scale: 1.0 / 2048.0, overlap: true }
}

fn data() -> Corpus {
    dist_setup::corpus()
}

/// One training job, the same for a world-1 run in this process and for each MPI rank.
#[derive(Clone, Debug)]
struct Job {
    batch: usize,
    accum: usize,
    precision: DType,
    zero: bool,
    steps: u64,
    /// (rank, step): an inf in that rank's gradient at that step.
    inject: Option<(usize, u64)>,
    resume: Option<PathBuf>,
}

impl Job {
    fn new(batch: usize) -> Self {
        Job { batch, accum: 1, precision: DType::F32, zero: false, steps: STEPS, inject: None, resume: None }
    }

    fn spec(&self, out: &Path) -> String {
        let mut s = format!(
            "batch={} accum={} precision={} zero={} steps={} out={}",
            self.batch,
            self.accum,
            self.precision.name(),
            self.zero as u8,
            self.steps,
            out.display()
        );
        if let Some((r, st)) = self.inject {
            s += &format!(" inject={r}:{st}");
        }
        if let Some(p) = &self.resume {
            s += &format!(" resume={}", p.display());
        }
        s
    }

    #[cfg(feature = "mpi")]
    fn parse(spec: &str) -> (Self, PathBuf) {
        let kv: std::collections::HashMap<&str, &str> =
            spec.split_whitespace().filter_map(|t| t.split_once('=')).collect();
        let num = |k: &str| kv[k].parse::<u64>().unwrap();
        let job = Job {
            batch: num("batch") as usize,
            accum: num("accum") as usize,
            precision: DType::parse(kv["precision"]).unwrap(),
            zero: num("zero") == 1,
            steps: num("steps"),
            inject: kv.get("inject").map(|s| {
                let (r, st) = s.split_once(':').unwrap();
                (r.parse().unwrap(), st.parse().unwrap())
            }),
            resume: kv.get("resume").map(PathBuf::from),
        };
        (job, PathBuf::from(kv["out"]))
    }
}

/// What a rank (or a world-1 run) ends with.
struct RunOut {
    stats: Vec<StepStats>,
    state: TrainState,
}

/// Runs `job` on `comm` (None: world 1, no collective).
fn run_job(job: &Job, rank: usize, comm: Option<Box<dyn dynsparse::dist::Collective>>, data: &Corpus) -> RunOut {
    let be = CpuBackend::new();
    let tc = train_cfg(job.precision, job.batch, job.accum);
    let model = Model::new(&be, model_cfg(), job.precision, 1).unwrap();
    let mut mem = MemoryReport::default();
    let mut tr = match comm {
        None => Trainer::new(&be, model, tc, &mut mem).unwrap(),
        Some(c) => Trainer::new_distributed(&be, model, tc, dist_cfg(job.zero), c, &mut mem).unwrap(),
    };
    tr.inject_inf_at = job.inject.iter().filter(|(r, _)| *r == rank).map(|&(_, s)| s).collect();
    if let Some(p) = &job.resume {
        tr.restore(&be, &checkpoint::load(p).unwrap().state).unwrap();
    }
    let stats = (0..job.steps).map(|_| tr.train_step(&be, data).unwrap()).collect();
    RunOut { stats, state: tr.state(&be).unwrap() }
}

/// One line per step: step, loss bits, skipped, loss scale bits, tokens.
#[cfg(feature = "mpi")]
fn stats_text(stats: &[StepStats]) -> String {
    stats
        .iter()
        .map(|s| {
            format!("{} {:x} {} {:x} {}\n", s.step, s.loss.to_bits(), s.skipped as u8, s.loss_scale.to_bits(), s.tokens)
        })
        .collect()
}

fn parse_stats(t: &str) -> Vec<StepStats> {
    t.lines()
        .map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            StepStats {
                step: f[0].parse().unwrap(),
                loss: f64::from_bits(u64::from_str_radix(f[1], 16).unwrap()),
                indexer_kl: 0.0,
                grad_norm: 0.0,
                lr: 0.0,
                loss_scale: f32::from_bits(u32::from_str_radix(f[3], 16).unwrap()),
                skipped: f[2] == "1",
                plan: None,
                tokens: f[4].parse().unwrap(),
            }
        })
        .collect()
}

/// A rank of an `mpirun` job started by [`mpi_job`]: trains the job in DYNSPARSE_MPI_JOB and
/// writes its step stats and final state (a checkpoint) to the job's folder.
#[cfg(feature = "mpi")]
#[test]
#[ignore = "one rank of an mpirun job: started by the MPI tests"]
fn mpi_rank_worker() {
    use dynsparse::dist::Collective;
    let Ok(spec) = std::env::var("DYNSPARSE_MPI_JOB") else {
        println!("SKIP: mpi_rank_worker runs only as a rank started by the MPI tests");
        return;
    };
    let (job, out) = Job::parse(&spec);
    let comm = dynsparse::dist::mpi::Mpi::init(Duration::from_secs(60)).unwrap();
    let rank = comm.rank();
    let run = run_job(&job, rank, Some(Box::new(comm)), &data());
    let tc = train_cfg(job.precision, job.batch, job.accum);
    checkpoint::save(&out.join(format!("rank{rank}.safetensors")), &model_cfg(), &tc, &run.state, &BTreeMap::new())
        .unwrap();
    std::fs::write(out.join(format!("rank{rank}.stats")), stats_text(&run.stats)).unwrap();
}

/// `mpirun` when this build has MPI and one is on PATH; else why not.
fn mpirun() -> Result<PathBuf, String> {
    if !cfg!(feature = "mpi") {
        return Err("this build has no `mpi` feature (cargo test --features mpi --test multiprocess)".into());
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join("mpirun"))
        .find(|p| p.is_file())
        .ok_or_else(|| "no mpirun on PATH (apt-get install openmpi-bin libopenmpi-dev)".into())
}

/// An `mpirun -np 2` command on loopback that also runs as root and on a 2-core machine.
fn mpirun_cmd(mpirun: &Path) -> Command {
    let mut c = Command::new(mpirun);
    c.args(["-np", "2", "--oversubscribe", "--mca", "btl", "self,vader,tcp", "--mca", "btl_tcp_if_include", "lo"])
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("OMPI_MCA_rmaps_base_oversubscribe", "1");
    c
}

/// Runs `job` as two MPI processes; returns both ranks' outcomes.
fn mpi_job(mpirun: &Path, job: &Job, name: &str) -> Vec<RunOut> {
    let dir = tmpdir(name);
    let exe = std::env::current_exe().unwrap();
    let mut cmd = mpirun_cmd(mpirun);
    cmd.arg(&exe)
        .args(["mpi_rank_worker", "--exact", "--ignored", "--nocapture", "--test-threads=1"])
        .env("DYNSPARSE_MPI_JOB", job.spec(&dir));
    let out = wait_guarded(spawn(&mut cmd), Duration::from_secs(120), name);
    assert!(
        out.status.success(),
        "{name}: mpirun failed ({:?})\nstdout:\n{}\nstderr:\n{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    let runs = (0..2)
        .map(|r| RunOut {
            stats: parse_stats(&std::fs::read_to_string(dir.join(format!("rank{r}.stats"))).unwrap()),
            state: checkpoint::load(&dir.join(format!("rank{r}.safetensors"))).unwrap().state,
        })
        .collect();
    let _ = std::fs::remove_dir_all(&dir);
    runs
}

fn assert_same_run(one: &RunOut, many: &[RunOut], tol: f64, what: &str) {
    let many: Vec<_> = many.iter().map(|r| (&r.stats[..], &r.state.params[..])).collect();
    dist_setup::assert_same_run((&one.stats, &one.state.params), &many, tol, what);
}

#[test]
fn two_mpi_processes_take_the_steps_of_one_with_twice_the_batch() {
    let mpirun = match mpirun() {
        Ok(p) => p,
        Err(why) => return println!("SKIP: MPI equivalence: {why}"),
    };
    let _g = serial();
    let data = data();
    let one = run_job(&Job::new(4), 0, None, &data);
    assert!(one.stats[0].loss - one.stats[STEPS as usize - 1].loss > 0.3, "training moved");
    assert_same_run(&one, &mpi_job(&mpirun, &Job::new(2), "f32"), 1e-6, "mpi f32");

    let mut a = Job::new(2);
    a.accum = 2;
    let mut b = Job::new(1);
    b.accum = 2;
    assert_same_run(&run_job(&a, 0, None, &data), &mpi_job(&mpirun, &b, "accum"), 1e-6, "mpi f32 accum 2");

    let mut z = Job::new(2);
    z.zero = true;
    let zero = mpi_job(&mpirun, &z, "zero1");
    assert_same_run(&one, &zero, 1e-6, "mpi zero-1");

    // A ZeRO-1 checkpoint after 10 steps at world 2 resumes bit for bit at world 2 and
    // continues at world 1.
    let mut first = z.clone();
    first.steps = 10;
    let ck_dir = tmpdir("zero1-ck");
    let ck = ck_dir.join("rank0.safetensors");
    let st = mpi_job(&mpirun, &first, "zero1-first").remove(0).state;
    checkpoint::save(&ck, &model_cfg(), &train_cfg(DType::F32, 2, 1), &st, &BTreeMap::new()).unwrap();
    let mut again = first.clone();
    again.resume = Some(ck.clone());
    let again = mpi_job(&mpirun, &again, "zero1-again");
    let losses = |r: &RunOut| r.stats.iter().map(|s| s.loss).collect::<Vec<_>>();
    assert_eq!(losses(&again[0]), losses(&zero[0])[10..], "resumed at world 2: bit for bit");
    assert_eq!(again[0].state.params, zero[0].state.params);
    let mut single = Job::new(4);
    single.steps = 10;
    single.resume = Some(ck);
    let single = run_job(&single, 0, None, &data);
    let d = rel(&single.state.params, &one.state.params);
    assert!(d <= 1e-6, "resumed at world 1: weights differ by {d:.2e}");

    // f16 loss scaling, an inf in rank 1's gradient only: both ranks skip that step.
    let mut a = Job::new(4);
    a.precision = DType::F16;
    a.inject = Some((0, 3));
    a.steps = 8;
    let one16 = run_job(&a, 0, None, &data);
    for zero in [false, true] {
        let mut b = Job::new(2);
        b.precision = DType::F16;
        b.inject = Some((1, 3));
        b.steps = 8;
        b.zero = zero;
        let two = mpi_job(&mpirun, &b, &format!("f16-zero{}", zero as u8));
        for (r, run) in two.iter().enumerate() {
            let skipped: Vec<u64> = run.stats.iter().filter(|s| s.skipped).map(|s| s.step).collect();
            assert_eq!(skipped, vec![3], "zero {zero}: rank {r} skips only the step rank 1 overflowed");
            assert_eq!(run.state.scaler, one16.state.scaler, "zero {zero}: rank {r}");
        }
        assert_same_run(&one16, &two, 1e-3, "mpi f16");
    }
    let _ = std::fs::remove_dir_all(&ck_dir);
}

/// The flags of a tiny CLI training run (sparse attention, 3 of 8-token blocks).
fn tiny_train(out: &Path, batch: usize, steps: u64) -> Vec<String> {
    tiny_train_with(out, batch, steps, &["--block", "8", "--keep-blocks", "3"])
}

/// [`tiny_train`] with `attention` as its attention flags.
fn tiny_train_with(out: &Path, batch: usize, steps: u64, attention: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = [
        "--backend",
        "cpu",
        "train",
        "--layers",
        "2",
        "--d-model",
        "32",
        "--heads",
        "2",
        "--kv-heads",
        "1",
        "--context",
        "64",
        "--seq",
        "32",
        "--seed",
        "5",
        "--eval-every",
        "1000",
        "--eval-windows",
        "2",
        "--collective-timeout",
        "10",
    ]
    .iter()
    .chain(attention)
    .map(|s| s.to_string())
    .collect();
    v.extend(["--out".into(), out.display().to_string()]);
    v.extend(["--batch".into(), batch.to_string(), "--steps".into(), steps.to_string()]);
    v
}

/// (step, loss) of a CLI run's log.
fn log_losses(dir: &Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(dir.join("log.csv"))
        .unwrap()
        .lines()
        .skip(1)
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            (f[0].parse().unwrap(), f[1].parse().unwrap())
        })
        .collect()
}

#[test]
fn mpirun_train_through_the_cli_matches_one_process_and_a_killed_rank_ends_the_job() {
    let mpirun = match mpirun() {
        Ok(p) => p,
        Err(why) => return println!("SKIP: MPI through the CLI: {why}"),
    };
    let _g = serial();
    // world 2 × batch 2 under mpirun == world 1 × batch 4, with dense attention: the two
    // runs differ by the order of the gradient sums only, and the sparse phase's top-k
    // block selection turns such rounding into a different block at a near tie (then
    // ~1e-4 apart after 20 steps, for some seeds before and after any kernel change:
    // measured in the closing note of 2026-12-03). The sparse path's equivalence under
    // MPI is `two_mpi_processes_take_the_steps_of_one_with_twice_the_batch` (1e-6).
    let (d1, d2) = (tmpdir("cli-one"), tmpdir("cli-two"));
    let dense = ["--attention", "dense"];
    let out = Command::new(BIN).args(tiny_train_with(&d1, 4, STEPS, &dense)).output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let child = spawn(mpirun_cmd(&mpirun).arg(BIN).args(tiny_train_with(&d2, 2, STEPS, &dense)));
    let out = wait_guarded(child, Duration::from_secs(120), "mpirun train");
    assert!(out.status.success(), "{}\n{}", text(&out.stdout), text(&out.stderr));
    let err = text(&out.stderr);
    assert!(err.contains("rank 0 of 2") && err.contains("data parallel: 2 MPI ranks"), "{err}");
    let (l1, l2) = (log_losses(&d1), log_losses(&d2));
    assert_eq!(l1.len(), STEPS as usize);
    assert_eq!(l1.iter().map(|x| x.0).collect::<Vec<_>>(), l2.iter().map(|x| x.0).collect::<Vec<_>>());
    for ((s, a), (_, b)) in l1.iter().zip(&l2) {
        // The log prints 5 decimals.
        assert!((a - b).abs() <= 2e-5, "step {s}: loss {a} at world 1, {b} at world 2");
    }
    let w = |d: &Path| checkpoint::load(&d.join("checkpoint.safetensors")).unwrap().state.params;
    let d = rel(&w(&d1), &w(&d2));
    assert!(d <= 1e-6, "CLI checkpoints differ by {d:.2e} relative");

    // SIGKILL one rank mid-run, under mpirun and under `dynsparse launch` (which runs mpirun).
    // Then SIGSTOP one rank (a hang): the watchdog of the waiting rank ends the job after the
    // collective timeout.
    for (via_launch, hang) in [(false, false), (true, false), (false, true)] {
        let dir = tmpdir(&format!("kill-{via_launch}-{hang}"));
        let mut args = tiny_train(&dir, 2, 100_000);
        args.extend(["--save-every".into(), "1".into()]);
        if hang {
            let i = args.iter().position(|a| a == "--collective-timeout").unwrap();
            args[i + 1] = "3".into();
        }
        let mut cmd = if via_launch {
            let mut c = Command::new(BIN);
            c.args(["launch", "--nproc", "2", "--grace", "2", "--"])
                .args(&args)
                .env("DYNSPARSE_MPIRUN_ARGS", "--oversubscribe --mca btl self,vader,tcp --mca btl_tcp_if_include lo")
                .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
                .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1");
            c
        } else {
            let mut c = mpirun_cmd(&mpirun);
            c.arg(BIN).args(&args);
            c
        };
        let child = spawn(&mut cmd);
        let what = match (via_launch, hang) {
            (true, _) => "launch",
            (false, false) => "mpirun",
            (false, true) => "mpirun, a rank stopped",
        };
        // Wait until training runs (rank 0 has logged a step), then kill rank 1.
        let t0 = Instant::now();
        while !dir.join("log.csv").exists() {
            assert!(t0.elapsed() < Duration::from_secs(60), "{what}: training did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        let ranks: Vec<u32> =
            descendants(child.id()).into_iter().filter(|(_, c)| c == "dynsparse").map(|(p, _)| p).collect();
        assert_eq!(ranks.len(), 2, "{what}: rank processes {ranks:?}");
        let rank1 = ranks
            .iter()
            .copied()
            .find(|p| {
                std::fs::read(format!("/proc/{p}/environ"))
                    .map(|e| e.split(|b| *b == 0).any(|kv| kv == b"OMPI_COMM_WORLD_RANK=1"))
                    .unwrap_or(false)
            })
            .expect("rank 1 by its OMPI_COMM_WORLD_RANK");
        let sig = if hang { libc::SIGSTOP } else { libc::SIGKILL };
        // SAFETY: signalling a process this test started (through mpirun).
        unsafe { libc::kill(rank1 as libc::pid_t, sig) };
        // The job must end well within the 10 s collective timeout plus start-up slack.
        let out = wait_guarded(child, Duration::from_secs(40), what);
        let se = text(&out.stderr);
        assert!(!out.status.success(), "{what}: {se}");
        if hang {
            // Rank 0's watchdog names the timeout. The stopped rank may print the same line
            // for its own side if mpirun lets it run (SIGCONT) before killing it, so a
            // second line is allowed, as long as every error line is such a collective
            // error; that line can be cut short (unbuffered stderr is written piece by
            // piece and the rank is killed mid-line), so only rank 0's must be whole.
            let errs = error_lines(&se);
            assert!(matches!(errs.len(), 1 | 2), "{what}: {se}");
            assert!(errs.iter().all(|e| e.starts_with("error: collective: ")), "{what}: {se}");
            assert!(
                errs.iter().any(|e| e.contains("on rank 0 of 2 timed out after 3.0 s (a peer rank died or hangs)")),
                "{what}: {se}"
            );
        } else {
            assert!(se.contains("process rank 1"), "{what}: no line names rank 1:\n{se}");
        }
        if via_launch {
            let errs = error_lines(&se);
            assert_eq!(errs.len(), 1, "{se}");
            assert!(errs[0].starts_with("error: launch: mpirun exited with status"), "{se}");
            assert!(errs[0].contains("process rank 1"), "{se}");
        }
        assert_gone(&ranks, what);
        let _ = std::fs::remove_dir_all(&dir);
    }
    let _ = (std::fs::remove_dir_all(&d1), std::fs::remove_dir_all(&d2));
}

/// `train` on a host backend under launch without MPI support, or started with the torchrun
/// variables by hand: one line that says how to run it.
#[test]
fn train_ranks_without_an_mpi_collective_say_how_to_run_them() {
    let _g = serial();
    let dir = tmpdir("launch-nompi");
    let out = Command::new(BIN).args(tiny_train(&dir, 2, 2)).env("WORLD_SIZE", "2").env("RANK", "1").output().unwrap();
    let se = text(&out.stderr);
    assert!(!out.status.success());
    assert_eq!(error_lines(&se).len(), 1, "{se}");
    assert!(se.contains("rank 1 of 2") && se.contains("--world 2"), "{se}");
    if cfg!(feature = "mpi") {
        let _ = std::fs::remove_dir_all(&dir);
        return println!(
            "SKIP: launch of train without MPI: this build has MPI (launch runs train under mpirun, tested above)"
        );
    }
    let out = Command::new(BIN).args(["launch", "--nproc", "2", "--"]).args(tiny_train(&dir, 2, 2)).output().unwrap();
    let se = text(&out.stderr);
    assert!(!out.status.success());
    assert_eq!(error_lines(&se).len(), 1, "{se}");
    assert!(se.contains("train --world 2") && se.contains("--features mpi"), "{se}");
    let _ = std::fs::remove_dir_all(&dir);
}
