//! What every VM boots: the guest kernel and the agent initramfs.
//!
//! Looked up in this order: an explicit path, `$VMRUN_KERNEL` /
//! `$VMRUN_AGENT_INITRD`, then `boot/vmlinux` and `boot/agent.cpio` in the
//! data directory (`scripts/demo.sh` installs them there).

use std::path::{Path, PathBuf};

use crate::home::Home;
use crate::{Error, Result};

/// The guest kernel and agent initramfs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Artifacts {
    pub kernel: PathBuf,
    pub agent_initrd: PathBuf,
}

fn pick(explicit: Option<&Path>, env: &str, default: PathBuf, what: &str, how: &str) -> Result<PathBuf> {
    let path = explicit.map(Path::to_path_buf).or_else(|| std::env::var_os(env).map(PathBuf::from)).unwrap_or(default);
    if path.is_file() {
        Ok(path)
    } else {
        Err(Error::Artifacts(format!("no {what} at {} ({how}, or set {env})", path.display())))
    }
}

impl Artifacts {
    /// Finds the kernel and initramfs.
    pub fn find(home: &Home, kernel: Option<&Path>, initrd: Option<&Path>) -> Result<Self> {
        Ok(Self {
            kernel: pick(
                kernel,
                "VMRUN_KERNEL",
                home.boot().join("vmlinux"),
                "guest kernel",
                "build it with kernel-config/build.sh and copy it there",
            )?,
            agent_initrd: pick(
                initrd,
                "VMRUN_AGENT_INITRD",
                home.boot().join("agent.cpio"),
                "agent initramfs",
                "build it with rootfs/build.sh and copy it there",
            )?,
        })
    }
}
