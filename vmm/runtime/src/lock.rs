//! A lock on a file (`flock`), held while the value lives: the image
//! store's (`vmrun_images::FileLock`), for the runtime's files.

use std::path::Path;

use vmrun_images::{FileLock, LockMode};

/// Holds a lock on a file while alive.
#[derive(Debug)]
pub struct Lock {
    _held: FileLock,
}

impl Lock {
    /// Waits for and takes the lock on `path` (created if missing).
    pub fn take(path: &Path) -> std::io::Result<Self> {
        FileLock::acquire(path, LockMode::Exclusive).map(|l| Self { _held: l })
    }

    /// Waits for and takes a shared lock on `path` (created if missing).
    pub fn shared(path: &Path) -> std::io::Result<Self> {
        FileLock::acquire(path, LockMode::Shared).map(|l| Self { _held: l })
    }

    /// Takes the lock on `path` if nobody holds it, shared or not; `None`
    /// if someone does.
    pub fn try_take(path: &Path) -> std::io::Result<Option<Self>> {
        Ok(FileLock::try_acquire(path, LockMode::Exclusive)?.map(|l| Self { _held: l }))
    }
}
