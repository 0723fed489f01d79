//! An exclusive lock on a file (`flock`), held while the value lives.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;

/// Holds an exclusive lock on a file while alive.
#[derive(Debug)]
pub struct Lock {
    _file: File,
}

impl Lock {
    /// Waits for and takes the lock on `path` (created if missing).
    pub fn take(path: &Path) -> std::io::Result<Self> {
        let f = File::create(path)?;
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Self { _file: f })
    }

    /// Takes the lock on `path` if nobody holds it (`None` if somebody
    /// does); creates the file if missing.
    pub fn try_take(path: &Path) -> std::io::Result<Option<Self>> {
        let f = File::create(path)?;
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = std::io::Error::last_os_error();
            return if e.kind() == std::io::ErrorKind::WouldBlock { Ok(None) } else { Err(e) };
        }
        Ok(Some(Self { _file: f }))
    }
}
