//! Advisory file locks (`flock(2)`) between `vmrun` processes: the one
//! lock helper of the host side (the runtime's `Lock` wraps it).
//!
//! A `flock` belongs to an open file description, so two threads that each
//! open the lock file exclude each other just as two processes do, and the
//! kernel drops the lock when its holder dies.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::io::AsRawFd;
use std::path::Path;

/// Whether a lock excludes everyone or only exclusive holders.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Excludes exclusive holders only.
    Shared,
    /// Excludes everyone.
    Exclusive,
}

/// A held lock; dropping it releases it.
#[derive(Debug)]
pub struct FileLock {
    _file: File,
}

impl FileLock {
    /// Takes the lock, waiting for it.
    pub fn acquire(path: &Path, mode: Mode) -> io::Result<Self> {
        Self::lock(path, mode, true)?.ok_or_else(|| io::Error::other("flock returned without the lock"))
    }

    /// Takes the lock if nobody holds it in a conflicting mode.
    pub fn try_acquire(path: &Path, mode: Mode) -> io::Result<Option<Self>> {
        Self::lock(path, mode, false)
    }

    fn lock(path: &Path, mode: Mode, wait: bool) -> io::Result<Option<Self>> {
        let file = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path)?;
        let mut op = match mode {
            Mode::Shared => libc::LOCK_SH,
            Mode::Exclusive => libc::LOCK_EX,
        };
        if !wait {
            op |= libc::LOCK_NB;
        }
        loop {
            // SAFETY: flock only reads its two integer arguments; the file
            // descriptor is open for as long as `file` lives.
            let r = unsafe { libc::flock(file.as_raw_fd(), op) };
            if r == 0 {
                return Ok(Some(Self { _file: file }));
            }
            let err = io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EWOULDBLOCK) if !wait => return Ok(None),
                _ => return Err(err),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_and_exclusive_exclude_each_other() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("l");
        let a = FileLock::acquire(&p, Mode::Shared).unwrap();
        let b = FileLock::try_acquire(&p, Mode::Shared).unwrap();
        assert!(b.is_some());
        assert!(FileLock::try_acquire(&p, Mode::Exclusive).unwrap().is_none());
        drop((a, b));
        let c = FileLock::try_acquire(&p, Mode::Exclusive).unwrap();
        assert!(c.is_some());
        assert!(FileLock::try_acquire(&p, Mode::Shared).unwrap().is_none());
    }
}
