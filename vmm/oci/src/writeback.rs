//! What a container changed in its root, written back into the bundle's
//! root on the host when its process has ended: under runc the container
//! writes there itself, and callers look there (containerd's snapshot of
//! a container, `docker commit`, tests that read a file the container
//! wrote).
//!
//! The guest's agent lists the changes from its overlay's upper layer
//! ([`vmrun_agent_protocol::Request::ReadChanges`]); the guest is not
//! trusted, so every change is written with [`vmrun_tree`]: beneath the
//! bundle's root, following no symbolic link, of plain names only, and
//! no more than the root's disk could have held.

use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;

use vmrun_agent_client::Client;
use vmrun_agent_protocol::{Change, CopyContent};

use crate::error::{io, Result};

/// Failed changes logged one by one (the count says the rest).
const MAX_LOGGED: u64 = 20;

/// What a write-back did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Written {
    /// Changes written.
    pub changes: u64,
    /// Bytes of file content written.
    pub bytes: u64,
    /// Changes that could not be written (each logged).
    pub failed: u64,
}

/// Reads the changes of container `guest_id` from its agent and writes
/// them into `rootfs`; at most `limit` bytes of content (the size of the
/// disk the container wrote on) and as many changes.
pub fn write_back(client: &Client, guest_id: &str, rootfs: &Path, limit: u64) -> Result<Written> {
    let root: OwnedFd = std::fs::File::open(rootfs).map_err(io(format!("opening the bundle's root {}", rootfs.display())))?.into();
    let mut written = Written::default();
    let mut from = 0;
    loop {
        let (changes, next) = client.read_changes(guest_id, from)?;
        for c in &changes {
            apply(root.as_fd(), c, &mut written);
        }
        if written.bytes > limit || written.changes + written.failed > limit {
            log::warn!("container {guest_id}: its changes go past what its disk holds; the rest is not written back");
            return Ok(written);
        }
        match next {
            Some(n) if n > from && !changes.is_empty() => from = n,
            Some(n) => {
                log::warn!("container {guest_id}: the guest's list of changes does not go on ({from} then {n}); the rest is not written back");
                return Ok(written);
            }
            None => return Ok(written),
        }
    }
}

/// Writes one change (a failure is logged and counted).
fn apply(root: std::os::fd::BorrowedFd<'_>, c: &Change, written: &mut Written) {
    match vmrun_tree::apply(root, c) {
        Ok(()) => {
            written.changes += 1;
            if let Change::Put { entry: vmrun_agent_protocol::CopyEntry { content: CopyContent::File { data, .. }, .. }, .. } = c {
                written.bytes += data.len() as u64;
            }
        }
        Err(e) => {
            written.failed += 1;
            if written.failed <= MAX_LOGGED {
                let path = match c {
                    Change::Put { entry, .. } => &entry.path,
                    Change::Remove { path } => path,
                };
                log::warn!("writing back {path:?} into the bundle's root: {e}");
            }
        }
    }
}
