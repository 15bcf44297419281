//! In-process collectives: one thread per rank (several backends in one
//! process: CPU ranks, several wgpu adapters, tests). Every collective is one
//! exchange round: each rank deposits its slice, the last to arrive publishes
//! all of them, and each rank combines them in rank order, so the result is
//! bit-identical on every rank and independent of arrival order.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::{Collective, ReduceOp, check_shard};
use crate::error::{Error, Result};

struct State {
    /// Completed rounds; a waiter knows its round finished when this moves.
    round: u64,
    slots: Vec<Option<Vec<f32>>>,
    arrived: usize,
    /// The last finished round's contributions, until every rank has read them.
    published: Option<Arc<Vec<Vec<f32>>>>,
    readers_left: usize,
    /// Set when a rank left or timed out: every later or waiting call fails with it.
    broken: Option<String>,
}

struct Shared {
    world: usize,
    timeout: Duration,
    state: Mutex<State>,
    cv: Condvar,
}

/// One rank of an in-process group (see [`InProcess::group`]).
pub struct InProcess {
    rank: usize,
    shared: Arc<Shared>,
}

impl InProcess {
    /// Handles for ranks `0..world`, to be moved one into each rank's thread.
    pub fn group(world: usize, timeout: Duration) -> Result<Vec<InProcess>> {
        if world == 0 {
            return Err(Error::Invalid("in-process group: world size 0".into()));
        }
        let shared = Arc::new(Shared {
            world,
            timeout,
            state: Mutex::new(State {
                round: 0,
                slots: vec![None; world],
                arrived: 0,
                published: None,
                readers_left: 0,
                broken: None,
            }),
            cv: Condvar::new(),
        });
        Ok((0..world).map(|rank| InProcess { rank, shared: shared.clone() }).collect())
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A poisoned lock means a rank panicked mid-collective; the state itself stays consistent.
        self.shared.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn fail(&self, st: &mut State, why: String) -> Error {
        if st.broken.is_none() {
            st.broken = Some(why.clone());
        }
        self.shared.cv.notify_all();
        Error::Collective(why)
    }

    /// Deposits `data`, waits for every rank's, returns all of them in rank order.
    fn exchange(&self, op: &str, data: Vec<f32>) -> Result<Arc<Vec<Vec<f32>>>> {
        let sh = &self.shared;
        let deadline = Instant::now() + sh.timeout;
        let mut st = self.lock();
        let timed_out = |st: &State, waiting: &str| {
            let missing: Vec<usize> = (0..sh.world).filter(|&r| st.slots[r].is_none()).collect();
            format!(
                "{op} on rank {} timed out after {:.1} s {waiting} (ranks not arrived: {missing:?})",
                self.rank,
                sh.timeout.as_secs_f64()
            )
        };
        // Wait until the previous round has been read by everyone.
        while st.published.is_some() && st.broken.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let why = timed_out(&st, "waiting for the previous round to drain");
                return Err(self.fail(&mut st, why));
            }
            st = sh.cv.wait_timeout(st, left).unwrap_or_else(|e| e.into_inner()).0;
        }
        if let Some(b) = &st.broken {
            return Err(Error::Collective(format!("{op} on rank {}: {b}", self.rank)));
        }
        st.slots[self.rank] = Some(data);
        st.arrived += 1;
        let my_round = st.round;
        if st.arrived == sh.world {
            let all: Vec<Vec<f32>> = st.slots.iter_mut().map(|s| s.take().unwrap_or_default()).collect();
            st.published = Some(Arc::new(all));
            st.readers_left = sh.world;
            st.arrived = 0;
            st.round += 1;
            sh.cv.notify_all();
        }
        while st.round == my_round && st.broken.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let why = timed_out(&st, "waiting for its peers");
                return Err(self.fail(&mut st, why));
            }
            st = sh.cv.wait_timeout(st, left).unwrap_or_else(|e| e.into_inner()).0;
        }
        if st.round == my_round {
            let b = st.broken.clone().unwrap_or_default();
            return Err(Error::Collective(format!("{op} on rank {}: {b}", self.rank)));
        }
        let all = st.published.clone().ok_or_else(|| Error::Collective(format!("{op}: round vanished")))?;
        st.readers_left -= 1;
        if st.readers_left == 0 {
            st.published = None;
            sh.cv.notify_all();
        }
        Ok(all)
    }

    fn same_len(&self, op: &str, all: &[Vec<f32>], len: usize) -> Result<()> {
        match all.iter().position(|v| v.len() != len) {
            Some(r) => Err(Error::Collective(format!(
                "{op}: rank {} passed {len} elements but rank {r} passed {}",
                self.rank,
                all[r].len()
            ))),
            None => Ok(()),
        }
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        // A rank that leaves (finished, failed or panicked) releases peers stuck waiting for it.
        let mut st = self.lock();
        if st.broken.is_none() {
            st.broken = Some(format!("rank {} left the group", self.rank));
        }
        self.shared.cv.notify_all();
    }
}

fn combine(op: ReduceOp, acc: &mut [f32], x: &[f32]) {
    match op {
        ReduceOp::Sum | ReduceOp::Avg => acc.iter_mut().zip(x).for_each(|(a, b)| *a += b),
        ReduceOp::Min => acc.iter_mut().zip(x).for_each(|(a, b)| *a = a.min(*b)),
        ReduceOp::Max => acc.iter_mut().zip(x).for_each(|(a, b)| *a = a.max(*b)),
    }
}

impl Collective for InProcess {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.shared.world
    }
    fn all_reduce(&self, buf: &mut [f32], op: ReduceOp) -> Result<()> {
        let all = self.exchange("all_reduce", buf.to_vec())?;
        self.same_len("all_reduce", &all, buf.len())?;
        buf.copy_from_slice(&all[0]);
        for x in &all[1..] {
            combine(op, buf, x);
        }
        if op == ReduceOp::Avg {
            let inv = 1.0 / self.shared.world as f32;
            buf.iter_mut().for_each(|a| *a *= inv);
        }
        Ok(())
    }
    fn reduce_scatter(&self, input: &[f32], out: &mut [f32]) -> Result<()> {
        check_shard("reduce_scatter", self.world(), input.len(), out.len())?;
        let all = self.exchange("reduce_scatter", input.to_vec())?;
        self.same_len("reduce_scatter", &all, input.len())?;
        let r = self.rank * out.len()..(self.rank + 1) * out.len();
        out.copy_from_slice(&all[0][r.clone()]);
        for x in &all[1..] {
            combine(ReduceOp::Sum, out, &x[r.clone()]);
        }
        Ok(())
    }
    fn all_gather(&self, shard: &[f32], out: &mut [f32]) -> Result<()> {
        check_shard("all_gather", self.world(), out.len(), shard.len())?;
        let all = self.exchange("all_gather", shard.to_vec())?;
        self.same_len("all_gather", &all, shard.len())?;
        for (dst, src) in out.chunks_exact_mut(shard.len().max(1)).zip(all.iter()) {
            dst.copy_from_slice(src);
        }
        Ok(())
    }
    fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<()> {
        if root >= self.world() {
            return Err(Error::Invalid(format!("broadcast: root {root} outside world {}", self.world())));
        }
        let mine = if self.rank == root { buf.to_vec() } else { Vec::new() };
        let all = self.exchange("broadcast", mine)?;
        if all[root].len() != buf.len() {
            return Err(Error::Collective(format!(
                "broadcast: rank {} expects {} elements, root {root} sent {}",
                self.rank,
                buf.len(),
                all[root].len()
            )));
        }
        buf.copy_from_slice(&all[root]);
        Ok(())
    }
    fn barrier(&self) -> Result<()> {
        self.exchange("barrier", Vec::new()).map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run<T: Send + 'static>(world: usize, f: impl Fn(InProcess) -> T + Send + Sync + 'static) -> Vec<T> {
        let f = Arc::new(f);
        let hs: Vec<_> = InProcess::group(world, Duration::from_secs(10))
            .unwrap()
            .into_iter()
            .map(|c| {
                let f = f.clone();
                std::thread::spawn(move || f(c))
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    }

    #[test]
    fn collectives_give_every_rank_the_rank_ordered_result() {
        let out = run(3, |c| {
            let r = c.rank() as f32;
            let mut a = vec![r, 10.0 * r, 1.0];
            c.all_reduce(&mut a, ReduceOp::Sum).unwrap();
            let mut m = vec![r];
            c.all_reduce(&mut m, ReduceOp::Max).unwrap();
            let mut avg = vec![r];
            c.all_reduce(&mut avg, ReduceOp::Avg).unwrap();
            let input: Vec<f32> = (0..6).map(|i| i as f32 + r).collect();
            let mut shard = vec![0.0; 2];
            c.reduce_scatter(&input, &mut shard).unwrap();
            let mut full = vec![0.0; 6];
            c.all_gather(&[r, -r], &mut full).unwrap();
            let mut b = vec![r; 2];
            c.broadcast(&mut b, 2).unwrap();
            c.barrier().unwrap();
            (a, m[0], avg[0], shard, full, b)
        });
        for (rank, (a, m, avg, shard, full, b)) in out.into_iter().enumerate() {
            assert_eq!(a, vec![3.0, 30.0, 3.0]);
            assert_eq!((m, avg), (2.0, 1.0));
            let s = (2 * rank) as f32;
            assert_eq!(shard, vec![3.0 * s + 3.0, 3.0 * (s + 1.0) + 3.0], "rank {rank}");
            assert_eq!(full, vec![0.0, -0.0, 1.0, -1.0, 2.0, -2.0]);
            assert_eq!(b, vec![2.0, 2.0]);
        }
    }

    #[test]
    fn a_missing_rank_times_out_with_a_clear_error_and_a_departed_one_releases_peers() {
        let mut g = InProcess::group(2, Duration::from_millis(200)).unwrap();
        let r1 = g.pop().unwrap();
        let t = Instant::now();
        let e = g[0].barrier().unwrap_err().to_string();
        assert!(t.elapsed() < Duration::from_secs(5));
        assert!(e.contains("timed out") && e.contains("[1]"), "{e}");
        assert!(r1.barrier().is_err(), "the group is broken for everyone after a timeout");

        let mut g = InProcess::group(2, Duration::from_secs(30)).unwrap();
        let r1 = g.pop().unwrap();
        let h = std::thread::spawn(move || r1.barrier());
        std::thread::sleep(Duration::from_millis(50));
        drop(g);
        let e = h.join().unwrap().unwrap_err().to_string();
        assert!(e.contains("rank 0 left"), "{e}");
    }

    #[test]
    fn mismatched_lengths_are_errors_not_panics() {
        let out = run(2, |c| {
            let mut a = vec![0.0; 1 + c.rank()];
            c.all_reduce(&mut a, ReduceOp::Sum).is_err()
        });
        assert_eq!(out, vec![true, true]);
    }
}
