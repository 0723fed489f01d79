//! What every VM boots: the guest kernel and the agent initramfs.
//!
//! Looked up in this order: an explicit path, `$VMRUN_KERNEL` /
//! `$VMRUN_AGENT_INITRD`, then `boot/vmlinux` and `boot/agent.cpio` in the
//! data directory (`scripts/demo.sh` installs them there).
//!
//! A uniprocessor build of the kernel may lie beside it, its name with
//! `-up` added (`vmlinux-up`, which `kernel-config/build.sh` builds with
//! `vmlinux`): VMs of one vCPU boot it instead. Without SMP the guest's
//! kernel does less for the same work (no RCU grace-period thread, no
//! spinlocks, no cross-CPU bookkeeping): where guest kernel mode is
//! emulated, a quarter fewer instructions in a warm run.

use std::path::{Path, PathBuf};

use crate::home::Home;
use crate::{Error, Result};

/// The guest kernel and agent initramfs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Artifacts {
    /// The kernel: SMP, for any number of vCPUs.
    pub kernel: PathBuf,
    /// Its uniprocessor build, if there is one ([`up_kernel_beside`]).
    pub kernel_up: Option<PathBuf>,
    pub agent_initrd: PathBuf,
}

/// The uniprocessor build of `kernel`: the file beside it named as it is
/// with `-up` added, if there is one.
pub fn up_kernel_beside(kernel: &Path) -> Option<PathBuf> {
    let mut name = kernel.file_name()?.to_os_string();
    name.push("-up");
    Some(kernel.with_file_name(name)).filter(|p| p.is_file())
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
    /// The kernel (with its uniprocessor build, if one is beside it) and
    /// the initramfs.
    pub fn new(kernel: PathBuf, agent_initrd: PathBuf) -> Self {
        Self { kernel_up: up_kernel_beside(&kernel), kernel, agent_initrd }
    }

    /// The kernel a VM of `cpus` vCPUs boots: the uniprocessor build for
    /// one, when there is one.
    pub fn kernel_for(&self, cpus: u8) -> &Path {
        match &self.kernel_up {
            Some(up) if cpus == 1 => up,
            _ => &self.kernel,
        }
    }

    /// Finds the kernel and initramfs.
    pub fn find(home: &Home, kernel: Option<&Path>, initrd: Option<&Path>) -> Result<Self> {
        Ok(Self::new(
            pick(
                kernel,
                "VMRUN_KERNEL",
                home.boot().join("vmlinux"),
                "guest kernel",
                "build it with kernel-config/build.sh and copy it there",
            )?,
            pick(
                initrd,
                "VMRUN_AGENT_INITRD",
                home.boot().join("agent.cpio"),
                "agent initramfs",
                "build it with rootfs/build.sh and copy it there",
            )?,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_vcpu_boots_the_uniprocessor_build_when_it_is_beside_the_kernel() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = dir.path().join("vmlinux");
        std::fs::write(&kernel, b"smp").unwrap();
        let initrd = dir.path().join("agent.cpio");
        let alone = Artifacts::new(kernel.clone(), initrd.clone());
        assert_eq!(alone.kernel_up, None);
        assert_eq!((alone.kernel_for(1), alone.kernel_for(2)), (kernel.as_path(), kernel.as_path()));

        let up = dir.path().join("vmlinux-up");
        std::fs::write(&up, b"up").unwrap();
        let both = Artifacts::new(kernel.clone(), initrd);
        assert_eq!(both.kernel_for(1), up.as_path());
        assert_eq!(both.kernel_for(2), kernel.as_path());
        assert_eq!(both.kernel_for(32), kernel.as_path());

        // A directory of that name is no kernel.
        std::fs::remove_file(&up).unwrap();
        std::fs::create_dir(&up).unwrap();
        assert_eq!(up_kernel_beside(&kernel), None);
    }
}
