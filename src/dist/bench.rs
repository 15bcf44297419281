//! The arithmetic of `dynsparse bench allreduce`: nccl-tests' bandwidth
//! conventions, the rank-dependent fill and its expected results (a wrong
//! reduction fails the bench), and the timing of one collective on host
//! slices through any [`Collective`].

use std::time::Instant;

use super::{Collective, ReduceOp};
use crate::error::{Error, Result};

/// The collectives the bench times.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BenchOp {
    AllReduce,
    ReduceScatter,
    AllGather,
    Broadcast,
}

impl BenchOp {
    pub const ALL: [BenchOp; 4] = [BenchOp::AllReduce, BenchOp::ReduceScatter, BenchOp::AllGather, BenchOp::Broadcast];

    pub fn name(self) -> &'static str {
        match self {
            BenchOp::AllReduce => "all-reduce",
            BenchOp::ReduceScatter => "reduce-scatter",
            BenchOp::AllGather => "all-gather",
            BenchOp::Broadcast => "broadcast",
        }
    }

    pub fn parse(s: &str) -> Result<BenchOp> {
        BenchOp::ALL.into_iter().find(|o| o.name() == s.trim()).ok_or_else(|| {
            Error::Invalid(format!("--ops: `{s}` is not one of all-reduce, reduce-scatter, all-gather, broadcast"))
        })
    }

    /// nccl-tests' bus-bandwidth factor: busbw = algbw · factor. All-reduce moves
    /// 2(n−1)/n of the data per rank over the slowest link, reduce-scatter and
    /// all-gather (n−1)/n, broadcast 1.
    pub fn bus_factor(self, world: usize) -> f64 {
        let n = world.max(1) as f64;
        match self {
            BenchOp::AllReduce => 2.0 * (n - 1.0) / n,
            BenchOp::ReduceScatter | BenchOp::AllGather => (n - 1.0) / n,
            BenchOp::Broadcast => 1.0,
        }
    }
}

/// Parses a size such as `4K`, `64K`, `1M`, `16M`, `1G` or `1000` (bytes; K = 1024).
pub fn parse_size(s: &str) -> Result<usize> {
    let t = s.trim();
    let (num, mul) = match t.chars().last().map(|c| c.to_ascii_uppercase()) {
        Some('K') => (&t[..t.len() - 1], 1usize << 10),
        Some('M') => (&t[..t.len() - 1], 1 << 20),
        Some('G') => (&t[..t.len() - 1], 1 << 30),
        _ => (t, 1),
    };
    let n: usize = num.parse().map_err(|_| Error::Invalid(format!("--sizes: `{s}` is not a size such as 4K, 1M")))?;
    n.checked_mul(mul).filter(|&b| b > 0).ok_or_else(|| Error::Invalid(format!("--sizes: `{s}` out of range")))
}

/// Elements of the full buffer of `op` for a message of about `bytes` bytes
/// (f32), rounded down to a multiple of `world` (at least `world`). The
/// message size is the full buffer, as in nccl-tests (all-gather: the output,
/// reduce-scatter: the input).
pub fn elements_for(bytes: usize, world: usize) -> usize {
    let w = world.max(1);
    ((bytes / 4) / w).max(1) * w
}

/// Algorithm bandwidth (GB/s, 10⁹ bytes) and bus bandwidth of one collective
/// on `bytes` bytes that took `secs`.
pub fn bandwidth(op: BenchOp, world: usize, bytes: usize, secs: f64) -> (f64, f64) {
    let alg = bytes as f64 / secs.max(1e-12) / 1e9;
    (alg, alg * op.bus_factor(world))
}

/// The value rank `r` puts at element `i` (small integers: exact in f32 for any order of summation).
pub fn fill_value(rank: usize, i: usize) -> f32 {
    ((rank + 1) * 3 + i % 7) as f32
}

/// Fills the buffer `op` starts from on `rank` (`n` = full elements).
pub fn fill(op: BenchOp, rank: usize, world: usize, n: usize) -> Vec<f32> {
    match op {
        BenchOp::AllGather => {
            let s = n / world.max(1);
            (0..s).map(|i| fill_value(rank, rank * s + i)).collect()
        }
        _ => (0..n).map(|i| fill_value(rank, i)).collect(),
    }
}

/// What `op` must leave in `rank`'s output (`n` = full elements); broadcast from rank 0.
pub fn expected(op: BenchOp, rank: usize, world: usize, n: usize) -> Vec<f32> {
    let sum = |i: usize| (0..world).map(|r| fill_value(r, i)).sum::<f32>();
    match op {
        BenchOp::AllReduce => (0..n).map(sum).collect(),
        BenchOp::ReduceScatter => {
            let s = n / world.max(1);
            (rank * s..(rank + 1) * s).map(sum).collect()
        }
        BenchOp::AllGather => {
            let s = n / world.max(1);
            (0..n).map(|i| fill_value(i / s.max(1), i)).collect()
        }
        BenchOp::Broadcast => (0..n).map(|i| fill_value(0, i)).collect(),
    }
}

/// Checks `got` against [`expected`]; the error names the first wrong element.
pub fn check(op: BenchOp, rank: usize, world: usize, n: usize, got: &[f32]) -> Result<()> {
    let want = expected(op, rank, world, n);
    if got.len() != want.len() {
        return Err(Error::Collective(format!(
            "bench {}: rank {rank} got {} elements, expected {}",
            op.name(),
            got.len(),
            want.len()
        )));
    }
    match got.iter().zip(&want).position(|(a, b)| a != b) {
        Some(i) => Err(Error::Collective(format!(
            "bench {}: wrong result on rank {rank} at element {i} of {n}: {} instead of {}",
            op.name(),
            got[i],
            want[i]
        ))),
        None => Ok(()),
    }
}

/// Runs `op` once on host slices (`n` = full elements), returning the output.
pub fn run_once(comm: &dyn Collective, op: BenchOp, n: usize, input: &[f32]) -> Result<Vec<f32>> {
    let world = comm.world();
    match op {
        BenchOp::AllReduce => {
            let mut b = input.to_vec();
            comm.all_reduce(&mut b, ReduceOp::Sum)?;
            Ok(b)
        }
        BenchOp::ReduceScatter => {
            let mut out = vec![0f32; n / world];
            comm.reduce_scatter(input, &mut out)?;
            Ok(out)
        }
        BenchOp::AllGather => {
            let mut out = vec![0f32; n];
            comm.all_gather(input, &mut out)?;
            Ok(out)
        }
        BenchOp::Broadcast => {
            let mut b = input.to_vec();
            comm.broadcast(&mut b, 0)?;
            Ok(b)
        }
    }
}

/// One checked call, `warmup` untimed ones, then `iters` timed ones: the
/// median seconds per call (every rank must call this with the same arguments).
pub fn time_host(comm: &dyn Collective, op: BenchOp, n: usize, warmup: usize, iters: usize) -> Result<f64> {
    let (rank, world) = (comm.rank(), comm.world());
    let input = fill(op, rank, world, n);
    let out = run_once(comm, op, n, &input)?;
    check(op, rank, world, n, &out)?;
    for _ in 0..warmup {
        run_once(comm, op, n, &input)?;
    }
    let mut t = Vec::with_capacity(iters.max(1));
    for _ in 0..iters.max(1) {
        comm.barrier()?;
        let t0 = Instant::now();
        run_once(comm, op, n, &input)?;
        t.push(t0.elapsed().as_secs_f64());
    }
    Ok(median(&t))
}

/// The median of `v` (the mean of the middle two for an even count; 0 when empty).
pub fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let m = s.len() / 2;
    if s.len() % 2 == 1 { s[m] } else { (s[m - 1] + s[m]) / 2.0 }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dist::InProcess;
    use std::time::Duration;

    #[test]
    fn bus_bandwidth_follows_nccl_tests() {
        assert_eq!(BenchOp::AllReduce.bus_factor(2), 1.0);
        assert_eq!(BenchOp::AllReduce.bus_factor(4), 1.5);
        assert_eq!(BenchOp::ReduceScatter.bus_factor(4), 0.75);
        assert_eq!(BenchOp::AllGather.bus_factor(2), 0.5);
        assert_eq!(BenchOp::Broadcast.bus_factor(8), 1.0);
        let (alg, bus) = bandwidth(BenchOp::AllReduce, 4, 1_000_000_000, 0.5);
        assert!((alg - 2.0).abs() < 1e-12 && (bus - 3.0).abs() < 1e-12, "{alg} {bus}");
        assert_eq!(parse_size("64K").unwrap(), 65536);
        assert_eq!(parse_size("16m").unwrap(), 16 << 20);
        assert_eq!(parse_size("100").unwrap(), 100);
        assert!(parse_size("x1K").is_err() && parse_size("0").is_err());
        assert_eq!(elements_for(4096, 3), 1023);
        assert_eq!(elements_for(4, 4), 4);
        assert!(BenchOp::parse("all-gather").is_ok() && BenchOp::parse("gather").is_err());
    }

    /// A collective that adds 1 to the first element of every all-reduce: the check must catch it.
    struct OffByOne(InProcess);
    impl Collective for OffByOne {
        fn rank(&self) -> usize {
            self.0.rank()
        }
        fn world(&self) -> usize {
            self.0.world()
        }
        fn all_reduce(&self, buf: &mut [f32], op: ReduceOp) -> Result<()> {
            self.0.all_reduce(buf, op)?;
            buf[0] += 1.0;
            Ok(())
        }
        fn reduce_scatter(&self, i: &[f32], o: &mut [f32]) -> Result<()> {
            self.0.reduce_scatter(i, o)
        }
        fn all_gather(&self, s: &[f32], o: &mut [f32]) -> Result<()> {
            self.0.all_gather(s, o)
        }
        fn broadcast(&self, b: &mut [f32], root: usize) -> Result<()> {
            self.0.broadcast(b, root)
        }
        fn barrier(&self) -> Result<()> {
            self.0.barrier()
        }
    }

    #[test]
    fn every_op_checks_out_at_world_2_and_a_wrong_reduction_fails() {
        let comms = InProcess::group(2, Duration::from_secs(20)).unwrap();
        let hs: Vec<_> = comms
            .into_iter()
            .map(|c| {
                std::thread::spawn(move || -> Result<Vec<f64>> {
                    let mut ts = Vec::new();
                    for op in BenchOp::ALL {
                        for n in [2usize, 14, 1000] {
                            let t = time_host(&c, op, n, 1, 3)?;
                            assert!(t > 0.0);
                            ts.push(t);
                        }
                    }
                    Ok(ts)
                })
            })
            .collect();
        for h in hs {
            assert_eq!(h.join().unwrap().unwrap().len(), 12);
        }
        let comms = InProcess::group(2, Duration::from_secs(20)).unwrap();
        let hs: Vec<_> = comms
            .into_iter()
            .map(|c| std::thread::spawn(move || time_host(&OffByOne(c), BenchOp::AllReduce, 8, 0, 1)))
            .collect();
        for h in hs {
            let e = h.join().unwrap().unwrap_err().to_string();
            assert!(e.contains("wrong result on rank") && e.contains("element 0 of 8"), "{e}");
        }
        assert_eq!(expected(BenchOp::AllGather, 1, 2, 4), vec![3.0, 4.0, 8.0, 9.0]);
    }
}
