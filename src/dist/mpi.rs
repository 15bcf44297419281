//! MPI collectives (feature `mpi`): one process per rank started by
//! `mpirun`, any backend, buffers staged through the host.
//!
//! MPI calls block without a timeout, so a watchdog thread watches the call
//! in flight: past the timeout it prints one error line naming the
//! collective and the rank and calls `MPI_Abort`, which ends every rank of
//! the job (a rank killed outright is noticed by `mpirun`, which ends the
//! others itself).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ::mpi::collective::SystemOperation;
use ::mpi::environment::Universe;
use ::mpi::topology::SimpleCommunicator;
use ::mpi::traits::*;

use super::{Collective, ReduceOp, check_shard};
use crate::error::{Error, Result};

/// The collective in flight and when it started.
type InFlight = Arc<Mutex<Option<(&'static str, Instant)>>>;

pub struct Mpi {
    world: SimpleCommunicator,
    rank: usize,
    size: usize,
    in_flight: InFlight,
    stop: Arc<AtomicBool>,
    // Dropped last: finalizes MPI.
    _universe: Universe,
}

// SAFETY: MPI is initialised with MPI_THREAD_MULTIPLE when the library offers it (else
// SERIALIZED); the handle is used by one thread at a time (`Collective` takes `&self` from the
// rank's training thread only), and the watchdog only calls MPI_Abort, allowed from any thread.
unsafe impl Send for Mpi {}

/// Whether this process was started by an MPI launcher (Open MPI, MPICH/PMI, Slurm's PMI).
pub fn under_mpirun() -> bool {
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"].iter().any(|k| std::env::var_os(k).is_some())
}

impl Mpi {
    /// Initialises MPI (once per process) and starts the watchdog.
    pub fn init(timeout: Duration) -> Result<Self> {
        let (universe, _threading) = ::mpi::initialize_with_threading(::mpi::Threading::Multiple)
            .ok_or_else(|| Error::Collective("MPI is already initialised in this process".into()))?;
        let world = universe.world();
        let (rank, size) = (world.rank() as usize, world.size() as usize);
        let in_flight: InFlight = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (f, s) = (in_flight.clone(), stop.clone());
        std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(100));
                let late = f.lock().ok().and_then(|g| *g).filter(|(_, t0)| t0.elapsed() > timeout);
                if let Some((op, _)) = late {
                    eprintln!(
                        "error: collective: {op} on rank {rank} of {size} timed out after {:.1} s (a peer rank died or hangs); aborting the MPI job",
                        timeout.as_secs_f64()
                    );
                    SimpleCommunicator::world().abort(3);
                }
            }
        });
        Ok(Mpi { world, rank, size, in_flight, stop, _universe: universe })
    }

    fn watch<T>(&self, op: &'static str, f: impl FnOnce() -> T) -> T {
        if let Ok(mut g) = self.in_flight.lock() {
            *g = Some((op, Instant::now()));
        }
        let out = f();
        if let Ok(mut g) = self.in_flight.lock() {
            *g = None;
        }
        out
    }
}

impl Drop for Mpi {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl Collective for Mpi {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.size
    }
    fn all_reduce(&self, buf: &mut [f32], op: ReduceOp) -> Result<()> {
        let send = buf.to_vec();
        self.watch("all_reduce", || match op {
            ReduceOp::Sum | ReduceOp::Avg => self.world.all_reduce_into(&send[..], buf, SystemOperation::sum()),
            ReduceOp::Min => self.world.all_reduce_into(&send[..], buf, SystemOperation::min()),
            ReduceOp::Max => self.world.all_reduce_into(&send[..], buf, SystemOperation::max()),
        });
        if op == ReduceOp::Avg {
            let inv = 1.0 / self.size as f32;
            buf.iter_mut().for_each(|x| *x *= inv);
        }
        Ok(())
    }
    fn reduce_scatter(&self, input: &[f32], out: &mut [f32]) -> Result<()> {
        check_shard("reduce_scatter", self.size, input.len(), out.len())?;
        self.watch("reduce_scatter", || self.world.reduce_scatter_block_into(input, out, SystemOperation::sum()));
        Ok(())
    }
    fn all_gather(&self, shard: &[f32], out: &mut [f32]) -> Result<()> {
        check_shard("all_gather", self.size, out.len(), shard.len())?;
        self.watch("all_gather", || self.world.all_gather_into(shard, out));
        Ok(())
    }
    fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<()> {
        if root >= self.size {
            return Err(Error::Invalid(format!("broadcast: root {root} outside world {}", self.size)));
        }
        self.watch("broadcast", || self.world.process_at_rank(root as i32).broadcast_into(buf));
        Ok(())
    }
    fn barrier(&self) -> Result<()> {
        self.watch("barrier", || self.world.barrier());
        Ok(())
    }
}
