//! `dynsparse launch`: starts the ranks of a data-parallel job on this node,
//! like `torchrun`, and supervises them.
//!
//! Each rank is a child process of this same binary with RANK, WORLD_SIZE,
//! LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT set. Every line a
//! rank writes is forwarded with a `[rank R] ` prefix (stdout to stdout, stderr
//! to stderr). SIGINT and SIGTERM are forwarded to the ranks. When a rank fails,
//! the others get SIGTERM, then SIGKILL after `--grace` seconds; all are
//! reaped and the launcher exits non-zero with one line naming the rank.
//!
//! Collectives come from existing engines (DESIGN §8): CUDA ranks use NCCL;
//! `train` on host backends (cpu, wgpu) has no collective of its own across
//! processes, so `launch` re-runs it under `mpirun -np N` (builds with the
//! `mpi` feature and an `mpirun` on PATH), else it says how to run it.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::{Args, Parser};
use dynsparse::backend::BackendChoice;
use dynsparse::{Error, Result};

#[derive(Args, Debug)]
pub struct LaunchArgs {
    /// Ranks (processes) on this node.
    #[arg(long)]
    pub nproc: usize,
    /// Nodes of the job; run `launch` once on each with its --node-rank.
    #[arg(long, default_value_t = 1)]
    pub nnodes: usize,
    /// This node's index, 0..nnodes; its ranks are node_rank·nproc ..
    #[arg(long, default_value_t = 0)]
    pub node_rank: usize,
    /// Address of node 0 (where rank 0 publishes the NCCL id).
    #[arg(long, default_value = "127.0.0.1")]
    pub master_addr: String,
    #[arg(long, default_value_t = 29500)]
    pub master_port: u16,
    /// Seconds the other ranks get to end after SIGTERM (when a rank failed or on SIGINT/SIGTERM)
    /// before SIGKILL.
    #[arg(long, default_value_t = 10.0)]
    pub grace: f64,
    /// The dynsparse command every rank runs, after `--` (e.g. `-- --backend cuda train --out runs/dp`).
    #[arg(last = true, required = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}

/// `dynsparse rank-env` (hidden): prints the rank variables `launch` sets; for the tests of
/// the supervisor (no collective involved).
#[derive(Args, Debug)]
pub struct RankEnvArgs {
    /// The rank that exits with --exit-code after printing (the others sleep --sleep seconds).
    #[arg(long)]
    pub fail_rank: Option<usize>,
    #[arg(long, default_value_t = 3)]
    pub exit_code: i32,
    /// Seconds to sleep after printing.
    #[arg(long, default_value_t = 0.0)]
    pub sleep: f64,
    /// Ignore SIGTERM (to test the SIGKILL after the grace period).
    #[arg(long)]
    pub ignore_term: bool,
}

const RANK_VARS: [&str; 6] = ["RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"];

pub fn rank_env(a: RankEnvArgs) -> Result<()> {
    if a.ignore_term {
        // SAFETY: setting a signal's disposition to SIG_IGN installs no handler code.
        unsafe { libc::signal(libc::SIGTERM, libc::SIG_IGN) };
    }
    let vars: Vec<String> = RANK_VARS.iter().map(|k| format!("{k}={}", std::env::var(k).unwrap_or_default())).collect();
    crate::outln!("{} PID={}", vars.join(" "), std::process::id());
    let rank = std::env::var("RANK").ok().and_then(|r| r.parse::<usize>().ok());
    if a.fail_rank.is_some() && a.fail_rank == rank {
        // Gives the other ranks time to start and print before this one fails.
        std::thread::sleep(Duration::from_secs(1));
        eprintln!("rank-env: rank {} exits with status {} as asked", a.fail_rank.unwrap_or(0), a.exit_code);
        std::process::exit(a.exit_code);
    }
    if a.sleep > 0.0 && a.sleep.is_finite() {
        std::thread::sleep(Duration::from_secs_f64(a.sleep.min(3600.0)));
    }
    Ok(())
}

/// The last SIGINT/SIGTERM received (0: none).
static PENDING_SIGNAL: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(sig: libc::c_int) {
    PENDING_SIGNAL.store(sig, Ordering::SeqCst);
}

fn install_forwarding() {
    let handler = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, handler);
        libc::signal(libc::SIGTERM, handler);
    }
}

fn signal_name(sig: i32) -> String {
    let name = match sig {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGTERM => "SIGTERM",
        _ => "",
    };
    if name.is_empty() { format!("signal {sig}") } else { format!("signal {sig} ({name})") }
}

/// "exited with status 3" / "was killed by signal 9 (SIGKILL)".
pub fn describe(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exited with status {c}"),
        (None, Some(s)) => format!("was killed by {}", signal_name(s)),
        _ => format!("ended ({status})"),
    }
}

fn send(child: &Child, sig: i32) {
    if let Ok(pid) = libc::pid_t::try_from(child.id()) {
        // SAFETY: `pid` is our own child, not yet reaped (callers only signal running children).
        unsafe { libc::kill(pid, sig) };
    }
}

fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(name)).find(|p| p.is_file())
}

/// One supervised process: its label in output lines and error messages.
struct Proc {
    label: String,
    child: Child,
    status: Option<ExitStatus>,
}

/// Copies `from` line by line to stdout or stderr with `prefix`; lines that name a failed
/// rank the way `mpirun` does are kept in `seen`.
fn forward(
    from: impl Read + Send + 'static,
    prefix: String,
    to_err: bool,
    seen: Arc<Mutex<Option<String>>>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut r = BufReader::new(from);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match r.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            let line = String::from_utf8_lossy(&buf);
            let line = line.trim_end_matches(['\n', '\r']);
            if let Some(i) = line.find("process rank ")
                && let Ok(mut s) = seen.lock()
                && s.is_none()
            {
                *s = Some(line[i..].trim().to_string());
            }
            let text = format!("{prefix}{line}\n");
            let ok = if to_err {
                std::io::stderr().lock().write_all(text.as_bytes()).is_ok()
            } else {
                let mut o = std::io::stdout().lock();
                o.write_all(text.as_bytes()).and_then(|_| o.flush()).is_ok()
            };
            if !ok {
                // The reader of our output left: keep draining so the rank never blocks on a pipe.
                continue;
            }
        }
    })
}

/// Runs `procs` to the end: forwards signals, stops the others when one fails, reaps all.
fn supervise(cmds: Vec<(String, Command)>, grace: Duration) -> Result<()> {
    install_forwarding();
    let seen = Arc::new(Mutex::new(None::<String>));
    let mut procs = Vec::new();
    let mut threads = Vec::new();
    for (label, mut cmd) in cmds {
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                let err = Error::io(format!("launch: starting {label}"), e);
                stop_all(&mut procs, grace);
                return Err(err);
            }
        };
        let prefix = if label.starts_with("rank ") { format!("[{label}] ") } else { String::new() };
        if let Some(o) = child.stdout.take() {
            threads.push(forward(o, prefix.clone(), false, seen.clone()));
        }
        if let Some(e) = child.stderr.take() {
            threads.push(forward(e, prefix, true, seen.clone()));
        }
        procs.push(Proc { label, child, status: None });
    }
    let mut failed: Option<(String, ExitStatus)> = None;
    let mut interrupted: Option<i32> = None;
    let mut deadline: Option<Instant> = None;
    let mut killed = false;
    loop {
        for p in procs.iter_mut().filter(|p| p.status.is_none()) {
            if let Ok(Some(st)) = p.child.try_wait() {
                p.status = Some(st);
                if !st.success() && failed.is_none() && interrupted.is_none() {
                    failed = Some((p.label.clone(), st));
                }
            }
        }
        let sig = PENDING_SIGNAL.swap(0, Ordering::SeqCst);
        if sig != 0 {
            interrupted.get_or_insert(sig);
            procs.iter().filter(|p| p.status.is_none()).for_each(|p| send(&p.child, sig));
            deadline.get_or_insert(Instant::now() + grace);
        }
        if failed.is_some() && deadline.is_none() {
            procs.iter().filter(|p| p.status.is_none()).for_each(|p| send(&p.child, libc::SIGTERM));
            deadline = Some(Instant::now() + grace);
        }
        if procs.iter().all(|p| p.status.is_some()) {
            break;
        }
        if !killed && deadline.is_some_and(|d| Instant::now() >= d) {
            procs.iter().filter(|p| p.status.is_none()).for_each(|p| send(&p.child, libc::SIGKILL));
            killed = true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // The pipes close when every process holding them has ended; a grandchild that outlived
    // its parent (not ours to reap) must not keep launch waiting, so give up after a moment.
    let t0 = Instant::now();
    while threads.iter().any(|t| !t.is_finished()) && t0.elapsed() < Duration::from_secs(2) {
        std::thread::sleep(Duration::from_millis(20));
    }
    if let Some(sig) = interrupted {
        return Err(Error::Invalid(format!(
            "launch: received {}; forwarded it to the ranks, all have ended",
            signal_name(sig)
        )));
    }
    match failed {
        None => Ok(()),
        Some((label, st)) => {
            let detail = match seen.lock().ok().and_then(|s| s.clone()) {
                Some(line) if !label.starts_with("rank ") => format!(" ({line})"),
                _ => String::new(),
            };
            let others = if procs.len() > 1 { "; the other ranks were stopped" } else { "" };
            Err(Error::Invalid(format!("launch: {label} {}{detail}{others}", describe(st))))
        }
    }
}

/// Stops and reaps processes started before a failed spawn.
fn stop_all(procs: &mut [Proc], grace: Duration) {
    procs.iter().for_each(|p| send(&p.child, libc::SIGTERM));
    let t0 = Instant::now();
    for p in procs.iter_mut() {
        while p.child.try_wait().ok().flatten().is_none() {
            if t0.elapsed() > grace {
                let _ = p.child.kill();
                let _ = p.child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Whether `train` ranks of `choice` run on CUDA (and so reduce with NCCL).
fn cuda_ranks(choice: BackendChoice) -> bool {
    match choice {
        BackendChoice::Cuda => true,
        BackendChoice::Cpu | BackendChoice::Wgpu => false,
        #[cfg(feature = "cuda")]
        BackendChoice::Auto => dynsparse::backend::cuda::probe().is_ok_and(|d| !d.is_empty()),
        #[cfg(not(feature = "cuda"))]
        BackendChoice::Auto => false,
    }
}

pub fn run(outer: BackendChoice, a: LaunchArgs) -> Result<()> {
    if !(1..=256).contains(&a.nproc) {
        return Err(Error::Invalid(format!("--nproc {}: accepted range 1..=256", a.nproc)));
    }
    if !(1..=4096).contains(&a.nnodes) || a.node_rank >= a.nnodes {
        return Err(Error::Invalid(format!(
            "--nnodes {} --node-rank {}: expected 1 <= nnodes <= 4096 and 0 <= node-rank < nnodes",
            a.nnodes, a.node_rank
        )));
    }
    if !(a.grace.is_finite() && a.grace > 0.0 && a.grace <= 3600.0) {
        return Err(Error::Invalid(format!("--grace {}: accepted range 0 < s <= 3600", a.grace)));
    }
    let mut command = a.command.clone();
    let inner = super::Cli::try_parse_from(std::iter::once("dynsparse".to_string()).chain(command.iter().cloned()))
        .map_err(|e| {
            let msg = e.to_string();
            let first = msg.lines().next().unwrap_or("").trim_start_matches("error: ").to_string();
            Error::Invalid(format!("launch: the command after `--` is not a dynsparse command: {first}"))
        })?;
    let mut choice = inner.backend;
    if choice == BackendChoice::Auto && outer != BackendChoice::Auto {
        choice = outer;
        let name = format!("{outer:?}").to_ascii_lowercase();
        command.insert(0, name);
        command.insert(0, "--backend".to_string());
    }
    let exe = std::env::current_exe().map_err(|e| Error::io("launch: finding this program", e))?;
    let grace = Duration::from_secs_f64(a.grace);
    match inner.command {
        super::Command::Launch(_) => {
            return Err(Error::Invalid("launch: the command after `--` cannot be another launch".into()));
        }
        super::Command::Train(_) if !cuda_ranks(choice) => return run_under_mpirun(&a, &exe, &command, grace),
        _ => {}
    }
    let world = a.nnodes * a.nproc;
    let cmds = (0..a.nproc)
        .map(|local| {
            let rank = a.node_rank * a.nproc + local;
            let mut cmd = Command::new(&exe);
            cmd.args(&command)
                .env("RANK", rank.to_string())
                .env("WORLD_SIZE", world.to_string())
                .env("LOCAL_RANK", local.to_string())
                .env("LOCAL_WORLD_SIZE", a.nproc.to_string())
                .env("MASTER_ADDR", &a.master_addr)
                .env("MASTER_PORT", a.master_port.to_string());
            (format!("rank {rank}"), cmd)
        })
        .collect();
    supervise(cmds, grace)
}

/// `train` on host backends: the ranks are MPI processes.
fn run_under_mpirun(a: &LaunchArgs, exe: &std::path::Path, command: &[String], grace: Duration) -> Result<()> {
    let how = format!(
        "run the ranks in this process (`dynsparse train --world {} …`), or under MPI (`mpirun -np {} dynsparse train …` with a build that has --features mpi)",
        a.nproc, a.nproc
    );
    if a.nnodes > 1 {
        return Err(Error::Invalid(
            "launch: `train` on the cpu or wgpu backend across nodes runs under mpirun with a hostfile (`mpirun --hostfile hosts -np N dynsparse train …`, see README); launch starts NCCL (CUDA) ranks only on several nodes".into(),
        ));
    }
    if !cfg!(feature = "mpi") {
        return Err(Error::Unavailable(format!(
            "launch: `train` on the cpu or wgpu backend has no cross-process collective in this build (no `mpi` feature); {how}"
        )));
    }
    let Some(mpirun) = on_path("mpirun") else {
        return Err(Error::Unavailable(format!(
            "launch: `train` on the cpu or wgpu backend needs mpirun on PATH; {how}"
        )));
    };
    let mut cmd = Command::new(&mpirun);
    let extra: Vec<String> =
        std::env::var("DYNSPARSE_MPIRUN_ARGS").unwrap_or_default().split_whitespace().map(String::from).collect();
    cmd.arg("-np").arg(a.nproc.to_string()).args(&extra).arg(exe).args(command);
    eprintln!(
        "launch: host backend ranks use MPI: {} -np {} {}{}{} {}",
        mpirun.display(),
        a.nproc,
        extra.join(" "),
        if extra.is_empty() { "" } else { " " },
        exe.display(),
        command.join(" ")
    );
    supervise(vec![("mpirun".to_string(), cmd)], grace)
}
