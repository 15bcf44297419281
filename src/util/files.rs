//! Files a user names: only regular files are opened for reading (a FIFO or a
//! device would block or never end), their size is bounded before reading,
//! output folders are checked writable before any compute is spent, and a run
//! folder is held by an advisory lock so two runs cannot interleave their saves.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Fails unless `path` is a regular file (symlinks followed); `what` names it
/// in the message ("data file", "checkpoint"). Returns its size in bytes.
pub fn check_regular(path: &Path, what: &str) -> Result<u64> {
    let md = std::fs::metadata(path).map_err(|e| Error::io(format!("{what} {}", path.display()), e))?;
    if !md.is_file() {
        let ft = md.file_type();
        let kind = if ft.is_dir() {
            "a directory"
        } else if is_fifo(&ft) {
            "a FIFO (named pipe)"
        } else if is_device(&ft) {
            "a device"
        } else {
            "not a regular file"
        };
        return Err(Error::Invalid(format!("{what} {} is {kind}; a regular file is needed", path.display())));
    }
    Ok(md.len())
}

#[cfg(unix)]
fn is_fifo(ft: &std::fs::FileType) -> bool {
    use std::os::unix::fs::FileTypeExt;
    ft.is_fifo() || ft.is_socket()
}
#[cfg(not(unix))]
fn is_fifo(_: &std::fs::FileType) -> bool {
    false
}
#[cfg(unix)]
fn is_device(ft: &std::fs::FileType) -> bool {
    use std::os::unix::fs::FileTypeExt;
    ft.is_block_device() || ft.is_char_device()
}
#[cfg(not(unix))]
fn is_device(_: &std::fs::FileType) -> bool {
    false
}

/// Reads a whole regular file of at most `limit` bytes. The type is checked
/// before opening (opening a FIFO for reading blocks until a writer appears)
/// and again on the open handle, and at most `limit + 1` bytes are read, so a
/// file that grows meanwhile cannot exhaust memory either.
pub fn read_regular(path: &Path, what: &str, limit: u64) -> Result<Vec<u8>> {
    let size = check_regular(path, what)?;
    let too_big = |n: u64| {
        Error::Invalid(format!(
            "{what} {} has {} bytes; at most {} are accepted{}",
            path.display(),
            n,
            limit,
            if limit == max_read_bytes() { " (limited by the available memory)" } else { "" }
        ))
    };
    if size > limit {
        return Err(too_big(size));
    }
    let f = File::open(path).map_err(|e| Error::io(format!("opening {what} {}", path.display()), e))?;
    let md = f.metadata().map_err(|e| Error::io(format!("reading {what} {}", path.display()), e))?;
    if !md.is_file() {
        return Err(Error::Invalid(format!("{what} {} is not a regular file", path.display())));
    }
    let mut bytes = Vec::new();
    f.take(limit.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(|e| Error::io(format!("reading {what} {}", path.display()), e))?;
    if bytes.len() as u64 > limit {
        return Err(too_big(bytes.len() as u64));
    }
    Ok(bytes)
}

/// Largest file read whole into memory: half the available host memory (the
/// rest is for what is built from it), or 16 GiB when that is unknown.
pub fn max_read_bytes() -> u64 {
    mem_available().map(|m| m / 2).unwrap_or(16 << 30)
}

/// `MemAvailable` of /proc/meminfo in bytes (None where there is no such file).
pub fn mem_available() -> Option<u64> {
    // Tests pin the budget (bytes) so the preflight behaves the same on every machine.
    if let Ok(s) = std::env::var("DYNSPARSE_MEM_AVAILABLE") {
        match s.trim().parse::<u64>() {
            Ok(v) => return Some(v),
            Err(_) => log::warn!("DYNSPARSE_MEM_AVAILABLE=`{s}` is not a byte count; using /proc/meminfo"),
        }
    }
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    parse_meminfo(&s)
}

fn parse_meminfo(s: &str) -> Option<u64> {
    let line = s.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// Creates `dir` if needed and proves it writable by creating and removing a
/// probe file, so a read-only output folder is found before training starts.
pub fn ensure_writable_dir(dir: &Path, flag: &str) -> Result<()> {
    if dir.exists() && !dir.is_dir() {
        return Err(Error::Invalid(format!("{flag} {}: exists and is not a folder", dir.display())));
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io(format!("{flag} {}: creating the folder", dir.display()), e))?;
    let probe = dir.join(format!(".write-probe-{}", std::process::id()));
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&probe)
        .map_err(|e| Error::io(format!("{flag} {}: the folder is not writable", dir.display()), e))?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

/// An exclusive advisory lock on a run folder (`DIR/.lock`), held while the
/// value lives; the OS drops it when the process dies, even by SIGKILL.
#[derive(Debug)]
pub struct DirLock {
    _file: File,
    pub path: PathBuf,
}

impl DirLock {
    /// Takes the lock or fails at once (never waits) naming the folder.
    pub fn acquire(dir: &Path) -> Result<Self> {
        let path = dir.join(".lock");
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| Error::io(format!("creating the lock file {}", path.display()), e))?;
        match try_lock(&file) {
            Ok(true) => Ok(DirLock { _file: file, path }),
            Ok(false) => Err(Error::Invalid(format!(
                "{} is in use by another dynsparse process (lock file {}); wait for it or use another --out",
                dir.display(),
                path.display()
            ))),
            Err(e) => Err(Error::io(format!("locking {}", path.display()), e)),
        }
    }
}

/// An exclusive, non-blocking `flock(2)`: `Ok(false)` when another open file holds it.
#[cfg(unix)]
fn try_lock(file: &File) -> std::io::Result<bool> {
    use std::os::fd::AsRawFd;
    // SAFETY: flock only reads the descriptor, which `file` keeps open for the whole call.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) { Ok(false) } else { Err(e) }
}

/// Elsewhere there is no advisory lock: the folder is taken as free.
#[cfg(not(unix))]
fn try_lock(_: &File) -> std::io::Result<bool> {
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_is_parsed_in_bytes() {
        let s = "MemTotal:       24000000 kB\nMemFree:  1000 kB\nMemAvailable:   20000000 kB\n";
        assert_eq!(parse_meminfo(s), Some(20_000_000 * 1024));
        assert_eq!(parse_meminfo("MemTotal: 5 kB\n"), None);
    }

    #[test]
    fn a_second_lock_on_the_same_folder_is_refused_until_the_first_is_dropped() {
        let dir = std::env::temp_dir().join(format!("dynsparse-lock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let a = DirLock::acquire(&dir).unwrap();
        let e = DirLock::acquire(&dir).unwrap_err().to_string();
        assert!(e.contains("in use"), "{e}");
        drop(a);
        DirLock::acquire(&dir).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn directories_and_oversized_files_are_refused_before_reading() {
        let dir = std::env::temp_dir().join(format!("dynsparse-files-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let e = read_regular(&dir, "data file", 100).unwrap_err().to_string();
        assert!(e.contains("a directory"), "{e}");
        let p = dir.join("f.txt");
        std::fs::write(&p, [b'a'; 50]).unwrap();
        assert_eq!(read_regular(&p, "data file", 50).unwrap().len(), 50);
        let e = read_regular(&p, "data file", 49).unwrap_err().to_string();
        assert!(e.contains("50 bytes") && e.contains("at most 49"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
