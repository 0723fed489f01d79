//! Progress reporting for pulls and loads. The library never prints; the
//! command line turns these calls into a progress bar.

use std::io::{self, Read};

use crate::digest::Digest;

/// Receives the progress of a pull or a load. Every method has an empty
/// default, so an implementation picks what it shows.
pub trait Progress {
    /// A step begins (`resolving docker.io/library/busybox:latest`,
    /// `committing`).
    fn message(&mut self, _message: &str) {}
    /// The number of bytes the operation will transfer, once known (the
    /// sum of the blobs for a pull, the archive's size for a load).
    fn total(&mut self, _bytes: u64) {}
    /// A blob starts to arrive.
    fn blob_started(&mut self, _digest: &Digest, _size: u64) {}
    /// A blob is already in the store and is not transferred: its size
    /// counts as done.
    fn blob_exists(&mut self, _digest: &Digest, _size: u64) {}
    /// `bytes` more bytes arrived.
    fn advance(&mut self, _bytes: u64) {}
    /// A blob arrived and matched its digest.
    fn blob_done(&mut self, _digest: &Digest) {}
}

/// Reports nothing.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoProgress;

impl Progress for NoProgress {}

/// Reports the bytes read through it.
pub(crate) struct ProgressReader<'p, R> {
    pub inner: R,
    pub progress: &'p mut dyn Progress,
}

impl<R: Read> Read for ProgressReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.progress.advance(n as u64);
        Ok(n)
    }
}
