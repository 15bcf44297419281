//! What an NCCL rank needs that runs without a GPU (compiled in every build,
//! unit-tested in CI): the argument checks of the device-buffer collectives
//! and the bootstrap that hands rank 0's 128-byte NCCL unique id to the other
//! ranks, through a rendezvous file or a TCP connection to
//! `MASTER_ADDR:MASTER_PORT`. The bootstrap only moves the id; every
//! collective then runs inside NCCL.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::LaunchEnv;
use super::rendezvous;
use crate::DType;
use crate::error::{Error, Result};

/// Bytes of an NCCL unique id (`ncclUniqueId`, `NCCL_UNIQUE_ID_BYTES`).
pub const NCCL_ID_BYTES: usize = 128;

/// Environment variable naming a rendezvous file (shared by every rank, e.g. on
/// NFS) instead of the TCP bootstrap.
pub const ID_FILE_ENV: &str = "DYNSPARSE_NCCL_ID_FILE";

/// An NCCL unique id of the right length.
pub fn check_id(bytes: &[u8]) -> Result<[u8; NCCL_ID_BYTES]> {
    <[u8; NCCL_ID_BYTES]>::try_from(bytes)
        .map_err(|_| Error::Collective(format!("NCCL unique id: got {} bytes, expected {NCCL_ID_BYTES}", bytes.len())))
}

/// Element types NCCL reduces here, and their NCCL names.
pub fn nccl_dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "ncclFloat32",
        DType::F16 => "ncclFloat16",
        DType::BF16 => "ncclBfloat16",
        DType::U32 => "ncclUint32",
        DType::I32 => "ncclInt32",
    }
}

/// Byte span of elements `range` of a `dtype` buffer of `buf_bytes` bytes:
/// `(byte offset, element count)`. Fails when the range is empty-reversed or
/// reaches past the buffer.
pub fn byte_span(op: &str, dtype: DType, range: &Range<usize>, buf_bytes: usize) -> Result<(usize, usize)> {
    let es = dtype.size();
    let cap = buf_bytes / es;
    if range.start > range.end || range.end > cap {
        return Err(Error::Invalid(format!(
            "{op}: elements {}..{} outside the buffer ({cap} {dtype} elements, {buf_bytes} bytes)",
            range.start, range.end
        )));
    }
    Ok((range.start * es, range.len()))
}

/// The in-place reduce-scatter / all-gather plan of `range` over `world` ranks:
/// the range is split in `world` equal shards and rank `r` owns shard `r`
/// (NCCL's in-place convention: `recvbuff = sendbuff + rank·count`).
/// Returns `(shard length, rank's shard range)`.
pub fn shard_plan(op: &str, world: usize, rank: usize, range: &Range<usize>) -> Result<(usize, Range<usize>)> {
    if world == 0 || rank >= world {
        return Err(Error::Invalid(format!("{op}: rank {rank} outside world {world}")));
    }
    let n = range.len();
    if !n.is_multiple_of(world) {
        return Err(Error::Invalid(format!(
            "{op}: {n} elements do not split into {world} equal shards (pad the flat buffer to a multiple of the world size)"
        )));
    }
    let s = n / world;
    let start = range.start + rank * s;
    Ok((s, start..start + s))
}

/// How the ranks get rank 0's unique id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Bootstrap {
    /// Rank 0 writes the id to this file, the others read it.
    File(PathBuf),
    /// Rank 0 listens on this address; the others connect and receive the id.
    Tcp(String),
}

impl Bootstrap {
    /// `DYNSPARSE_NCCL_ID_FILE` (read through `get`) if set, else TCP on `MASTER_ADDR:MASTER_PORT`.
    pub fn from_env(env: &LaunchEnv, get: impl Fn(&str) -> Option<String>) -> Bootstrap {
        match get(ID_FILE_ENV).filter(|s| !s.trim().is_empty()) {
            Some(p) => Bootstrap::File(PathBuf::from(p)),
            None => Bootstrap::Tcp(format!("{}:{}", env.master_addr, env.master_port)),
        }
    }

    /// Rank 0: hands `id` to the `world − 1` other ranks (waits until each has it, at most `timeout`).
    pub fn publish(&self, id: &[u8], world: usize, timeout: Duration) -> Result<()> {
        check_id(id)?;
        match self {
            Bootstrap::File(p) => rendezvous::publish(p, id),
            Bootstrap::Tcp(addr) => {
                let l = TcpListener::bind(addr.as_str())
                    .map_err(|e| Error::Collective(format!("NCCL bootstrap: rank 0 cannot listen on {addr}: {e}")))?;
                serve_id(&l, id, world, timeout)
            }
        }
    }

    /// Ranks 1..: receives rank 0's id (at most `timeout`).
    pub fn receive(&self, rank: usize, timeout: Duration) -> Result<[u8; NCCL_ID_BYTES]> {
        match self {
            Bootstrap::File(p) => check_id(&rendezvous::wait_for(p, NCCL_ID_BYTES, timeout)?),
            Bootstrap::Tcp(addr) => fetch_id(addr, rank, timeout),
        }
    }
}

/// A job-specific rendezvous file name under the temp folder, derived from
/// `MASTER_ADDR` and `MASTER_PORT` (for ranks that share a file system).
pub fn default_id_file(env: &LaunchEnv) -> PathBuf {
    let addr: String =
        env.master_addr.chars().map(|c| if c.is_ascii_alphanumeric() || c == '.' { c } else { '_' }).collect();
    std::env::temp_dir().join(format!("dynsparse-nccl-{addr}-{}.id", env.master_port))
}

const MAGIC: &[u8; 8] = b"DSNCCL01";

/// Rank 0's side of the TCP bootstrap on an already bound listener: answers
/// `world − 1` distinct ranks, each sending `MAGIC` and its rank (u32 LE), with
/// `MAGIC` and the id.
pub fn serve_id(l: &TcpListener, id: &[u8], world: usize, timeout: Duration) -> Result<()> {
    let id = check_id(id)?;
    let deadline = Instant::now() + timeout;
    let err = |m: String| Error::Collective(format!("NCCL bootstrap (rank 0): {m}"));
    l.set_nonblocking(true).map_err(|e| err(format!("listener: {e}")))?;
    let mut served = vec![false; world];
    served[0] = true;
    while served.iter().any(|s| !s) {
        match l.accept() {
            Ok((mut s, peer)) => {
                s.set_nonblocking(false).map_err(|e| err(format!("{peer}: {e}")))?;
                let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(10));
                s.set_read_timeout(Some(left)).map_err(|e| err(format!("{peer}: {e}")))?;
                let mut hello = [0u8; 12];
                if s.read_exact(&mut hello).is_err() || &hello[..8] != MAGIC {
                    // Not one of ours (a port scan, another job): ignore it.
                    log::warn!("NCCL bootstrap: ignoring a connection from {peer} that is not a dynsparse rank");
                    continue;
                }
                let r = u32::from_le_bytes([hello[8], hello[9], hello[10], hello[11]]) as usize;
                if r == 0 || r >= world || served[r] {
                    return Err(err(format!(
                        "{peer} says it is rank {r}, expected one of the ranks 1..{world} not yet served"
                    )));
                }
                let mut reply = MAGIC.to_vec();
                reply.extend_from_slice(&id);
                s.write_all(&reply).map_err(|e| err(format!("sending the id to rank {r}: {e}")))?;
                served[r] = true;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() > deadline {
                    let missing: Vec<usize> = (0..world).filter(|&r| !served[r]).collect();
                    return Err(err(format!(
                        "ranks {missing:?} did not connect within {:.1} s",
                        timeout.as_secs_f64()
                    )));
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(err(format!("accept: {e}"))),
        }
    }
    Ok(())
}

/// A rank's side of the TCP bootstrap: connects to `addr` (retrying until rank
/// 0 listens, at most `timeout`) and reads the id.
pub fn fetch_id(addr: &str, rank: usize, timeout: Duration) -> Result<[u8; NCCL_ID_BYTES]> {
    let deadline = Instant::now() + timeout;
    let err = |m: String| Error::Collective(format!("NCCL bootstrap (rank {rank}): {m}"));
    let rank32 = u32::try_from(rank).map_err(|_| err("rank past u32".into()))?;
    loop {
        let addrs: Vec<_> =
            addr.to_socket_addrs().map_err(|e| err(format!("MASTER_ADDR:MASTER_PORT {addr}: {e}")))?.collect();
        let conn = addrs.iter().find_map(|a| TcpStream::connect_timeout(a, Duration::from_millis(500)).ok());
        if let Some(mut s) = conn {
            let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(10));
            s.set_read_timeout(Some(left)).map_err(|e| err(e.to_string()))?;
            let mut hello = MAGIC.to_vec();
            hello.extend_from_slice(&rank32.to_le_bytes());
            s.write_all(&hello).map_err(|e| err(format!("sending to {addr}: {e}")))?;
            let mut reply = [0u8; 8 + NCCL_ID_BYTES];
            s.read_exact(&mut reply).map_err(|e| err(format!("reading the id from {addr}: {e}")))?;
            if &reply[..8] != MAGIC {
                return Err(err(format!("{addr} is not a dynsparse rank 0")));
            }
            return check_id(&reply[8..]);
        }
        if Instant::now() > deadline {
            return Err(err(format!("rank 0 did not answer at {addr} within {:.1} s", timeout.as_secs_f64())));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Removes a rendezvous file left by an earlier run (rank 0, before publishing).
pub fn clear_id_file(p: &Path) {
    let _ = std::fs::remove_file(p);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_and_shards_are_checked_before_any_device_call() {
        assert_eq!(byte_span("all_reduce", DType::F32, &(4..12), 64).unwrap(), (16, 8));
        assert_eq!(byte_span("all_reduce", DType::BF16, &(0..32), 64).unwrap(), (0, 32));
        let e = byte_span("all_reduce", DType::F32, &(4..17), 64).unwrap_err().to_string();
        assert!(e.contains("outside the buffer (16 f32 elements"), "{e}");
        #[allow(clippy::reversed_empty_ranges)]
        let rev = 5..4;
        assert!(byte_span("x", DType::F32, &rev, 64).is_err());
        assert_eq!(shard_plan("reduce_scatter", 4, 2, &(8..24)).unwrap(), (4, 16..20));
        let e = shard_plan("reduce_scatter", 3, 0, &(0..10)).unwrap_err().to_string();
        assert!(e.contains("do not split into 3 equal shards"), "{e}");
        assert!(shard_plan("all_gather", 2, 2, &(0..10)).is_err());
        assert!(shard_plan("all_gather", 0, 0, &(0..10)).is_err());
        assert_eq!(check_id(&[7u8; 128]).unwrap(), [7u8; 128]);
        assert!(check_id(&[7u8; 127]).unwrap_err().to_string().contains("got 127 bytes, expected 128"));
        assert_eq!(nccl_dtype_name(DType::BF16), "ncclBfloat16");
    }

    fn env(port: u16) -> LaunchEnv {
        LaunchEnv { rank: 0, world: 3, local_rank: 0, master_addr: "127.0.0.1".into(), master_port: port }
    }

    #[test]
    fn bootstrap_from_env_prefers_the_id_file() {
        let e = env(29511);
        assert_eq!(Bootstrap::from_env(&e, |_| None), Bootstrap::Tcp("127.0.0.1:29511".into()));
        let f = Bootstrap::from_env(&e, |k| (k == ID_FILE_ENV).then(|| "/tmp/x.id".to_string()));
        assert_eq!(f, Bootstrap::File("/tmp/x.id".into()));
        let d = default_id_file(&LaunchEnv { master_addr: "node-1:x".into(), ..e });
        assert!(d.to_string_lossy().ends_with("dynsparse-nccl-node_1_x-29511.id"), "{}", d.display());
    }

    #[test]
    fn tcp_bootstrap_hands_rank_zeros_id_to_every_rank() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let id: Vec<u8> = (0..128u8).rev().collect();
        let peers: Vec<_> = (1..3)
            .map(|r| {
                let a = addr.clone();
                std::thread::spawn(move || fetch_id(&a, r, Duration::from_secs(10)))
            })
            .collect();
        serve_id(&l, &id, 3, Duration::from_secs(10)).unwrap();
        for p in peers {
            assert_eq!(p.join().unwrap().unwrap().to_vec(), id);
        }
        // Nobody connects: rank 0 names the missing ranks.
        let e = serve_id(&l, &id, 2, Duration::from_millis(100)).unwrap_err().to_string();
        assert!(e.contains("ranks [1] did not connect"), "{e}");
        drop(l);
        // Nobody listens: a rank gives up with the address.
        let e = fetch_id(&addr, 1, Duration::from_millis(200)).unwrap_err().to_string();
        assert!(e.contains("did not answer at"), "{e}");
    }

    #[test]
    fn file_bootstrap_round_trips_the_id() {
        let dir = std::env::temp_dir().join(format!("dynsparse-nccl-prep-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let b = Bootstrap::File(dir.join("id"));
        let id = [42u8; 128];
        let b2 = b.clone();
        let waiter = std::thread::spawn(move || b2.receive(1, Duration::from_secs(10)));
        b.publish(&id, 2, Duration::from_secs(1)).unwrap();
        assert_eq!(waiter.join().unwrap().unwrap(), id);
        assert!(b.publish(&id[..5], 2, Duration::from_secs(1)).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
