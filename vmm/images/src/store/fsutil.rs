//! Crash-safe file writes: a temporary file in the same directory, written
//! and flushed to disk, then renamed over the target.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Prefix of every temporary file and directory the store makes; anything
/// that starts with it is a leftover when no operation runs.
pub(crate) const TEMP_PREFIX: &str = ".tmp-";

/// A name no other thread or process uses at the same time:
/// `.tmp-<pid>-<counter>-<nanoseconds><suffix>`.
pub(crate) fn unique_name(suffix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    format!("{TEMP_PREFIX}{}-{n}-{nanos}{suffix}", std::process::id())
}

/// Flushes a directory's entries (a rename in it) to disk.
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Creates a new file that nobody else has, for writing.
pub(crate) fn create_new(path: &Path) -> io::Result<File> {
    OpenOptions::new().write(true).create_new(true).open(path)
}

/// Replaces `path` with `bytes`, so that a reader (or a crash) sees either
/// the old content or the new, never a mix.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp: PathBuf = dir.join(unique_name(".partial"));
    let result = (|| {
        let mut f = create_new(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        sync_dir(dir)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}
