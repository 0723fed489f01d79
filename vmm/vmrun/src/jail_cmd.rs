//! `--jail on` for `vmrun boot` and `vmrun restore`: what the VMM needs is
//! collected from its options and the process confines itself
//! (`vmrun-jail`) before it opens /dev/kvm. `vmrun run` turns it on when it
//! runs as root.
//!
//! Read-only: the kernel, the initramfs, the snapshot, disks outside the
//! VM's directory. Writable: the directories of the sockets, the console
//! file and the report (the VM's own directory). Empty disk slots
//! (`/dev/null`) use the jail's own device node.

use std::os::fd::RawFd;
use std::path::{Path, PathBuf};

use clap::ValueEnum;
use vmrun_jail::{Jail, Limits};

/// `--jail`.
#[derive(Clone, Copy, Debug, Default, ValueEnum, PartialEq, Eq)]
pub enum JailArg {
    /// Run the VMM as it was started.
    #[default]
    Off,
    /// Confine the VMM (needs root): namespaces, a private root with only
    /// its files, an unprivileged uid of its own, a cgroup.
    On,
}

/// What a VMM's options name.
#[derive(Debug, Default)]
pub struct Needs {
    pub read_only: Vec<PathBuf>,
    pub disks: Vec<PathBuf>,
    /// Files the VMM creates or writes (sockets, console, report).
    pub outputs: Vec<PathBuf>,
    pub taps: Vec<String>,
    pub memory_mib: u64,
    pub cpus: u32,
    /// Inherited descriptors the VMM keeps (`--ready-fd`).
    pub keep_fds: Vec<RawFd>,
}

fn parent(p: &Path) -> Option<PathBuf> {
    let abs = std::path::absolute(p).ok()?;
    abs.parent().map(Path::to_path_buf)
}

/// The jail for `needs`.
pub fn jail_for(needs: &Needs) -> std::io::Result<Jail> {
    let mut writable: Vec<PathBuf> = needs.outputs.iter().filter_map(|p| parent(p)).collect();
    writable.sort();
    writable.dedup();
    // A directory inside another is covered by it.
    let outer: Vec<PathBuf> = writable.iter().filter(|d| !writable.iter().any(|o| o != *d && d.starts_with(o))).cloned().collect();
    let covered = |p: &Path| outer.iter().any(|d| p.starts_with(d));
    let mut read_only = Vec::new();
    for p in needs.read_only.iter().chain(&needs.disks) {
        let abs = std::path::absolute(p)?;
        if abs.starts_with("/dev") || covered(&abs) {
            continue;
        }
        read_only.push(abs);
    }
    Ok(Jail {
        read_only,
        writable: outer,
        taps: needs.taps.clone(),
        limits: Some(Limits { guest_memory: needs.memory_mib << 20, cpus: needs.cpus }),
        keep_fds: needs.keep_fds.clone(),
    })
}

/// Enters the jail if asked.
pub fn enter(arg: JailArg, needs: &Needs) -> anyhow::Result<()> {
    if arg == JailArg::Off {
        return Ok(());
    }
    let jail = jail_for(needs)?;
    log::debug!("jail: {jail:?}");
    jail.enter()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outputs_make_writable_directories_and_the_rest_is_read_only() {
        let needs = Needs {
            read_only: vec!["/k/vmlinux".into(), "/t/snap".into()],
            disks: vec!["/vm/volume-0.disk".into(), "/layers/l.disk".into(), "/dev/null".into()],
            outputs: vec!["/vm/vsock.sock".into(), "/vm/control.sock".into(), "/vm/console.log".into()],
            taps: vec![],
            memory_mib: 256,
            cpus: 1,
            keep_fds: vec![7],
        };
        let j = jail_for(&needs).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(j.writable, vec![PathBuf::from("/vm")]);
        assert_eq!(j.read_only, vec![PathBuf::from("/k/vmlinux"), PathBuf::from("/t/snap"), PathBuf::from("/layers/l.disk")]);
        assert_eq!(j.limits, Some(Limits { guest_memory: 256 << 20, cpus: 1 }));
        assert_eq!(j.keep_fds, [7]);
    }
}
