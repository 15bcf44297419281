//! Naming the machine a figure was measured on.

/// "AMD EPYC 7B13, 2 threads" (from /proc/cpuinfo where it exists).
pub fn host_description() -> String {
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string());
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    format!("{model}, {threads} threads")
}

/// Replaces the block between `<!-- BEGIN key -->` and `<!-- END key -->` in
/// a Markdown file (appending it when absent), writing through a temporary
/// file and a rename so an interrupted write never truncates the file.
pub fn update_markdown_section(path: &std::path::Path, key: &str, body: &str) -> crate::Result<()> {
    let old = match std::fs::read_to_string(path) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(crate::Error::io(format!("reading {}", path.display()), e)),
    };
    let (begin, end) = (format!("<!-- BEGIN {key} -->"), format!("<!-- END {key} -->"));
    let block = format!("{begin}\n{}\n{end}", body.trim_end());
    let new = match (old.find(&begin), old.find(&end)) {
        (Some(b), Some(e)) if e > b => format!("{}{}{}", &old[..b], block, &old[e + end.len()..]),
        _ => format!("{}{}{}\n", old, if old.is_empty() || old.ends_with("\n\n") { "" } else { "\n" }, block),
    };
    write_atomic(path, new.as_bytes())
}

/// Writes `bytes` to `path` via `path.tmp` + rename.
pub fn write_atomic(path: &std::path::Path, bytes: &[u8]) -> crate::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension(format!(
        "{}tmp",
        path.extension().map(|e| format!("{}.", e.to_string_lossy())).unwrap_or_default()
    ));
    let io = |what: &str, e| crate::Error::io(format!("{what} {}", tmp.display()), e);
    let result = std::fs::File::create(&tmp).map_err(|e| io("creating", e)).and_then(|mut f| {
        f.write_all(bytes).map_err(|e| io("writing", e))?;
        f.sync_all().map_err(|e| io("syncing", e))?;
        drop(f);
        std::fs::rename(&tmp, path)
            .map_err(|e| crate::Error::io(format!("renaming {} to {}", tmp.display(), path.display()), e))
    });
    if result.is_err() {
        // A failed save (full disk, quota, rename across devices) leaves no half-written file behind.
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_save_leaves_no_temporary_file() {
        let dir = std::env::temp_dir().join(format!("dynsparse-tmp-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("target")).unwrap();
        std::fs::write(dir.join("target").join("x"), b"x").unwrap();
        // Renaming a file onto a non-empty directory fails after the data was written.
        let e = write_atomic(&dir.join("target"), b"data").unwrap_err().to_string();
        assert!(e.contains("renaming"), "{e}");
        assert!(!dir.join("target.tmp").exists(), "the .tmp file is removed");
        write_atomic(&dir.join("ok.csv"), b"a").unwrap();
        assert_eq!(std::fs::read(dir.join("ok.csv")).unwrap(), b"a");
        assert!(!dir.join("ok.csv.tmp").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn markdown_section_is_replaced_in_place_and_appended_when_missing() {
        let dir = std::env::temp_dir().join(format!("dynsparse-md-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("B.md");
        std::fs::write(&p, "# Bench\n\nintro\n").unwrap();
        update_markdown_section(&p, "k", "one").unwrap();
        update_markdown_section(&p, "other", "x").unwrap();
        update_markdown_section(&p, "k", "two").unwrap();
        let s = std::fs::read_to_string(&p).unwrap();
        assert!(s.starts_with("# Bench\n\nintro\n"));
        assert!(s.contains("<!-- BEGIN k -->\ntwo\n<!-- END k -->") && !s.contains("one"));
        assert!(s.find("BEGIN k").unwrap() < s.find("BEGIN other").unwrap(), "replaced in place");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
