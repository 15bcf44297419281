//! Rendezvous of a multi-process job through a shared file: rank 0 publishes
//! a small blob (an NCCL unique id is 128 bytes), the other ranks wait for it
//! with a timeout. The file is written to a temporary name and renamed, so a
//! reader never sees a partial blob.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// Rank 0: publishes `blob` at `path`.
pub fn publish(path: &Path, blob: &[u8]) -> Result<()> {
    crate::util::machine::write_atomic(path, blob)
}

/// Other ranks: waits until `path` holds exactly `len` bytes, at most `timeout`.
pub fn wait_for(path: &Path, len: usize, timeout: Duration) -> Result<Vec<u8>> {
    let t0 = Instant::now();
    loop {
        match std::fs::read(path) {
            Ok(b) if b.len() == len => return Ok(b),
            Ok(b) => {
                return Err(Error::Collective(format!(
                    "rendezvous file {} holds {} bytes, expected {len} (a file of another job?)",
                    path.display(),
                    b.len()
                )));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(format!("rendezvous file {}", path.display()), e)),
        }
        if t0.elapsed() > timeout {
            return Err(Error::Collective(format!(
                "rendezvous: rank 0 did not publish {} within {:.1} s",
                path.display(),
                timeout.as_secs_f64()
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_receive_rank_zeros_blob_or_a_clear_timeout() {
        let dir = std::env::temp_dir().join(format!("dynsparse-rdv-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("nccl-id");
        let blob: Vec<u8> = (0..128u8).collect();
        let p = path.clone();
        let waiter = std::thread::spawn(move || wait_for(&p, 128, Duration::from_secs(10)));
        std::thread::sleep(Duration::from_millis(50));
        publish(&path, &blob).unwrap();
        assert_eq!(waiter.join().unwrap().unwrap(), blob);
        let e = wait_for(&path, 64, Duration::from_secs(1)).unwrap_err().to_string();
        assert!(e.contains("128 bytes, expected 64"), "{e}");
        let e = wait_for(&dir.join("none"), 128, Duration::from_millis(100)).unwrap_err().to_string();
        assert!(e.contains("did not publish"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
