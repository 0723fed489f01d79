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
        Self::flock(path, libc::LOCK_EX)
    }

    /// Waits for and takes a shared lock on `path` (created if missing).
    pub fn shared(path: &Path) -> std::io::Result<Self> {
        Self::flock(path, libc::LOCK_SH)
    }

    /// Takes the lock on `path` if nobody holds it, shared or not; `None`
    /// if someone does.
    pub fn try_take(path: &Path) -> std::io::Result<Option<Self>> {
        match Self::flock(path, libc::LOCK_EX | libc::LOCK_NB) {
            Ok(l) => Ok(Some(l)),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn flock(path: &Path, op: libc::c_int) -> std::io::Result<Self> {
        let f = File::options().create(true).truncate(false).write(true).open(path)?;
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(f.as_raw_fd(), op) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Self { _file: f })
    }
}
