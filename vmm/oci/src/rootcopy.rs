//! The copy of a bundle's root that a container's VM gets (the host's
//! file system is never shown to a guest; `docs/oci.md`).
//!
//! A root that containerd made is an overlay mount of the image's
//! snapshots (`lowerdir=`, committed and never changed while in use) and
//! the container's own snapshot (`upperdir=`, empty until the container
//! writes). Such a root, while its upper directory is empty, is the
//! image's: it is copied **once per set of snapshots**, into
//! `$VMRUN_HOME/rootfs-copies/KEY.disk`, and that disk is shared by every
//! container made from the same snapshots, in any VM: the VMM opens it
//! read-only and the guest mounts it read-only. Each container writes on
//! a small disk of its own (the overlay's upper layer in the guest), and
//! what it changed is written back into the bundle's root when it ends.
//! A copy whose snapshots are gone is removed by the next `create`.
//!
//! Any other root (a plain directory, or an overlay the container already
//! wrote in) is copied for the container alone, onto a disk that holds
//! its upper layer too.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use vmrun_agent_protocol::RootfsSpec;
use vmrun_runtime::home::Home;
use vmrun_runtime::lock::Lock;
use vmrun_runtime::volume::{guest_device, make_dir_image, make_empty_image};

use crate::bundle::MIN_ROOTFS_BYTES;
use crate::error::{io, Result};

/// The directory of `$VMRUN_HOME` that holds the shared copies.
pub const COPIES_DIR: &str = "rootfs-copies";
/// The container's own copy, in the VM's directory.
pub const OWN_DISK: &str = "rootfs.disk";
/// The container's upper layer's disk beside a shared copy.
pub const UPPER_DISK: &str = "upper.disk";

/// The disks of a container's root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootCopy {
    /// A copy of the container's own; the upper layer goes on it too.
    Own(PathBuf),
    /// A copy of the image's root shared with other containers
    /// (read-only), and the disk of this container's upper layer.
    Shared {
        /// The shared copy.
        copy: PathBuf,
        /// The container's own upper layer.
        upper: PathBuf,
    },
}

/// What a shared copy was made from: the snapshots whose removal makes
/// it garbage.
#[derive(Debug, Serialize, Deserialize)]
struct Record {
    lowers: Vec<PathBuf>,
}

impl RootCopy {
    /// The disks for the VM's first volume slots, in order.
    pub fn disks(&self) -> Vec<PathBuf> {
        match self {
            Self::Own(d) => vec![d.clone()],
            Self::Shared { copy, upper } => vec![copy.clone(), upper.clone()],
        }
    }

    /// The volume slots the VMM opens read-only.
    pub fn read_only_slots(&self) -> Vec<usize> {
        match self {
            Self::Own(_) => Vec::new(),
            Self::Shared { .. } => vec![0],
        }
    }

    /// The disk the container writes on (what it can change is bounded by
    /// its size).
    pub fn writable(&self) -> &Path {
        match self {
            Self::Own(d) => d,
            Self::Shared { upper, .. } => upper,
        }
    }

    /// How the agent makes the container's root of these disks, in the
    /// VM's first volume slots.
    pub fn rootfs_spec(&self) -> RootfsSpec {
        self.rootfs_spec_in(&[0, 1])
    }

    /// How the agent makes the container's root of these disks, in the
    /// volume slots `slots` (in the order of [`RootCopy::disks`]).
    pub fn rootfs_spec_in(&self, slots: &[usize]) -> RootfsSpec {
        let slot = |i: usize| slots.get(i).copied().unwrap_or(i);
        RootfsSpec::Overlay {
            source: guest_device(slot(0)),
            fstype: "ext4".into(),
            // noinit_itable: no kernel thread zeroing the disks' inode
            // tables in the background (guest kernel time, for disks
            // that are thrown away or never written).
            options: "noinit_itable".into(),
            upper: match self {
                Self::Own(_) => None,
                Self::Shared { .. } => Some(guest_device(slot(1))),
            },
        }
    }
}

/// Makes the disks of the root `rootfs` for a container whose VM's
/// directory is `vm_dir`.
pub fn make(home: &Home, rootfs: &Path, vm_dir: &Path) -> Result<RootCopy> {
    let Some(lowers) = snapshot_lowers(rootfs) else {
        let own = vm_dir.join(OWN_DISK);
        make_dir_image(rootfs, &own, "rootfs", "vmrun-rootfs", MIN_ROOTFS_BYTES)?;
        return Ok(RootCopy::Own(own));
    };
    let dir = home.root().join(COPIES_DIR);
    let copy = shared_copy(&dir, rootfs, &lowers)?;
    let upper = vm_dir.join(UPPER_DISK);
    let size = std::fs::metadata(&copy).map_err(io(format!("reading {}", copy.display())))?.len();
    make_empty_image(&upper, "vmrun-upper", (size / 4).max(MIN_ROOTFS_BYTES))?;
    remove_unused(&dir);
    Ok(RootCopy::Shared { copy, upper })
}

/// The lower directories of `rootfs` when it is an overlay mount whose
/// upper directory (if any) is empty: the image's snapshots.
fn snapshot_lowers(rootfs: &Path) -> Option<Vec<PathBuf>> {
    let path = rootfs.canonicalize().ok()?;
    let mounts = procfs::process::Process::myself().ok()?.mountinfo().ok()?;
    // The last mount at a path is the one on top.
    let m = mounts.0.iter().rev().find(|m| m.mount_point == path)?;
    if m.fs_type != "overlay" {
        return None;
    }
    let lowers: Vec<PathBuf> = m.super_options.get("lowerdir")?.as_ref()?.split(':').map(PathBuf::from).collect();
    if let Some(Some(upper)) = m.super_options.get("upperdir") {
        if std::fs::read_dir(upper).ok()?.next().is_some() {
            log::debug!("the root's upper directory {upper} is not empty: the root is copied for this container alone");
            return None;
        }
    }
    lowers.iter().all(|l| l.is_absolute()).then_some(lowers)
}

/// The key of a set of snapshots: their paths and the identity of their
/// directories (a snapshot removed and another made at the same path is
/// another key).
fn key(lowers: &[PathBuf]) -> std::io::Result<String> {
    let mut h = Sha256::new();
    for l in lowers {
        let m = std::fs::metadata(l)?;
        h.update(l.as_os_str().as_encoded_bytes());
        h.update([0]);
        for n in [m.dev(), m.ino(), m.ctime() as u64, m.ctime_nsec() as u64] {
            h.update(n.to_le_bytes());
        }
    }
    Ok(h.finalize().iter().take(16).map(|b| format!("{b:02x}")).collect())
}

/// The lock of shared copy `key` in `dir`, waited for and taken.
fn lock(dir: &Path, key: &str) -> Result<Lock> {
    let path = dir.join(format!("{key}.lock"));
    Lock::take(&path).map_err(io(format!("locking {}", path.display())))
}

/// The shared copy of the snapshots `lowers` (merged at `rootfs`), made
/// if it is not there yet (one `create` makes it, others wait for it).
fn shared_copy(dir: &Path, rootfs: &Path, lowers: &[PathBuf]) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
    let key = key(lowers).map_err(io(format!("reading the snapshots of {}", rootfs.display())))?;
    let disk = dir.join(format!("{key}.disk"));
    let _lock = lock(dir, &key)?;
    if disk.exists() {
        log::debug!("the image's root: the shared copy {}", disk.display());
        return Ok(disk);
    }
    log::info!("copying the image's root {} (once for all containers of its snapshots)", rootfs.display());
    let tmp = dir.join(format!(".{key}.{}.tmp", std::process::id()));
    let made = make_dir_image(rootfs, &tmp, "rootfs", "vmrun-rootfs", MIN_ROOTFS_BYTES).map_err(Into::into).and_then(|()| {
        // Readable by the jailed VMMs (their own uids), whatever the umask.
        std::fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(0o644))
            .map_err(io(format!("setting the mode of {}", tmp.display())))?;
        let record = serde_json::to_vec(&Record { lowers: lowers.to_vec() }).unwrap_or_default();
        let json = dir.join(format!("{key}.json"));
        std::fs::write(&json, record).map_err(io(format!("writing {}", json.display())))?;
        std::fs::rename(&tmp, &disk).map_err(io(format!("renaming {} to {}", tmp.display(), disk.display())))
    });
    if made.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    made.map(|()| disk)
}

/// Removes the shared copies whose snapshots are gone (a VM that still
/// runs on one keeps its open disk), and copies half made by a `create`
/// that died.
fn remove_unused(dir: &Path) {
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(pid) = name.strip_suffix(".tmp").and_then(|n| n.rsplit('.').next()).and_then(|p| p.parse::<i32>().ok()) {
            // SAFETY: signal 0 only checks that the process exists.
            if unsafe { libc::kill(pid, 0) } != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH) {
                let _ = std::fs::remove_file(e.path());
            }
            continue;
        }
        let Some(key) = name.strip_suffix(".json") else { continue };
        let Ok(record) = std::fs::read(e.path()).map(|b| serde_json::from_slice::<Record>(&b)) else { continue };
        let gone = record.map_or(true, |r| r.lowers.iter().any(|l| !l.exists()));
        if gone {
            let Ok(_lock) = lock(dir, key) else { continue };
            let _ = std::fs::remove_file(dir.join(format!("{key}.disk")));
            let _ = std::fs::remove_file(e.path());
            let _ = std::fs::remove_file(dir.join(format!("{key}.lock")));
            log::debug!("removed the shared copy {key}: its snapshots are gone");
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // test code: a failed step is a failed test

    use super::*;

    #[test]
    fn a_plain_directory_is_no_snapshot() {
        let t = tempfile::tempdir().unwrap();
        assert_eq!(snapshot_lowers(t.path()), None);
    }

    #[test]
    fn keys_follow_the_snapshots_identity() {
        let t = tempfile::tempdir().unwrap();
        let (a, b) = (t.path().join("a"), t.path().join("b"));
        std::fs::create_dir_all(&a).unwrap();
        std::fs::create_dir_all(&b).unwrap();
        let k = key(&[a.clone(), b.clone()]).unwrap();
        assert_eq!(k, key(&[a.clone(), b.clone()]).unwrap());
        assert_ne!(k, key(&[b.clone(), a.clone()]).unwrap(), "the order of the layers counts");
        std::fs::remove_dir(&b).unwrap();
        assert!(key(&[a.clone(), b.clone()]).is_err());
        std::fs::create_dir_all(&b).unwrap();
        assert_ne!(k, key(&[a, b]).unwrap(), "a snapshot made again at the same path is another");
    }

    #[test]
    fn copies_of_removed_snapshots_and_dead_creates_are_removed() {
        let t = tempfile::tempdir().unwrap();
        let (live, gone) = (t.path().join("live"), t.path().join("gone"));
        std::fs::create_dir_all(&live).unwrap();
        let dir = t.path().join(COPIES_DIR);
        std::fs::create_dir_all(&dir).unwrap();
        for (k, l) in [("k1", &live), ("k2", &gone)] {
            std::fs::write(dir.join(format!("{k}.disk")), "disk").unwrap();
            std::fs::write(dir.join(format!("{k}.json")), serde_json::to_vec(&Record { lowers: vec![l.clone()] }).unwrap()).unwrap();
        }
        // A pid that is no process (above the kernel's largest).
        std::fs::write(dir.join(".k3.4194305.tmp"), "half").unwrap();
        std::fs::write(dir.join(format!(".k4.{}.tmp", std::process::id())), "being made").unwrap();
        remove_unused(&dir);
        let mut left: Vec<String> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        left.sort();
        assert_eq!(left, [format!(".k4.{}.tmp", std::process::id()), "k1.disk".into(), "k1.json".into()]);
    }
}
