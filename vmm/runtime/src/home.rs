//! The data directory (`$VMRUN_HOME`, default `/var/lib/vmrun` for root,
//! else `~/.local/share/vmrun`):
//!
//! ```text
//! images/            the image store (OCI image layout)
//! boot/vmlinux       the guest kernel (kernel-config/build.sh)
//! boot/vmlinux-up    its uniprocessor build, for VMs of one vCPU
//! boot/agent.cpio    the agent initramfs (rootfs/build.sh)
//! layer-disks/       one read-only layer disk per image, built once
//! templates/<key>/   snapshots of booted guests for warm starts
//! containers/<id>/   a container's VM: console, sockets, state
//! pools/<template>/   a pool's socket and its restored VMs (`vmrun pool`)
//! ```

use std::path::{Path, PathBuf};

/// The data directory and its parts.
#[derive(Debug, Clone)]
pub struct Home {
    root: PathBuf,
}

impl Home {
    /// The data directory from `$VMRUN_HOME` or the default (the same
    /// rule as the image store's).
    pub fn from_env() -> std::io::Result<Self> {
        vmrun_images::default_home()
            .map(|root| Self { root })
            .ok_or_else(|| std::io::Error::other("set VMRUN_HOME (no HOME to put the data directory in)"))
    }

    /// A data directory at `root`.
    pub fn at(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The data directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The image store.
    pub fn images(&self) -> PathBuf {
        self.root.join("images")
    }

    /// Where the guest kernel and agent initramfs are installed.
    pub fn boot(&self) -> PathBuf {
        self.root.join("boot")
    }

    /// Built layer disks.
    pub fn layer_disks(&self) -> PathBuf {
        self.root.join("layer-disks")
    }

    /// Warm-start templates (snapshots of booted guests).
    pub fn templates(&self) -> PathBuf {
        self.root.join("templates")
    }

    /// Pools of restored VMs, one per prepared template.
    pub fn pools(&self) -> PathBuf {
        self.root.join("pools")
    }

    /// Per-container directories.
    pub fn containers(&self) -> PathBuf {
        self.root.join("containers")
    }
}
