//! One VMM process's life from its configuration ([`VmmConfig`]): the
//! compatibility layer decided while the host's /sys is in sight, the jail
//! entered if the configuration asks for it (its needs derived from the
//! configuration), then the VM booted or restored and run to its end.
//! The `vmrun-vmm` binary and `vmrun boot`/`vmrun restore` both come here.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use vmrun_jail::{Confined, Jail, Needs};

use crate::config::{ConsoleOutput, HostCompatMode, ProcessOptions, RestoreConfig, Start, VmConfig, VmmConfig};
use crate::vm::ExitReason;
use crate::BootReport;

/// Why a VMM could not start or run its VM.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("cannot read the snapshot {path}: {source}")]
    Snapshot { path: PathBuf, source: crate::snapshot::Error },
    #[error("cannot set up the jail: {0}")]
    JailPaths(#[source] std::io::Error),
    #[error(transparent)]
    Jail(#[from] vmrun_jail::Error),
    #[error(transparent)]
    Vm(#[from] crate::Error),
}

/// `auto` decided here, while the host's /sys is still in sight (the jail
/// hides it).
pub fn resolve_host_compat(mode: HostCompatMode) -> HostCompatMode {
    match mode {
        HostCompatMode::Auto if std::path::Path::new(crate::host_compat::PVM_MODULE_PATH).exists() => HostCompatMode::On,
        HostCompatMode::Auto => HostCompatMode::Off,
        m => m,
    }
}

/// What a boot's configuration names.
pub fn boot_needs(c: &VmConfig) -> Needs {
    Needs {
        read_only: [Some(c.kernel.clone()), c.initrd.clone()].into_iter().flatten().collect(),
        disks: c.disks.iter().map(|d| d.path.clone()).collect(),
        outputs: process_outputs(&c.options).chain(c.vsock.as_ref().map(|v| v.uds.clone())).collect(),
        taps: c.nets.iter().map(|n| n.tap.clone()).collect(),
        memory_mib: u64::from(c.mem_mib),
        cpus: u32::from(c.vcpus),
        keep_fds: Vec::new(),
    }
}

/// What a restore's configuration names; the VM's size is the snapshot's.
pub fn restore_needs(c: &RestoreConfig, mem_mib: u32, vcpus: usize) -> Needs {
    Needs {
        read_only: vec![c.snapshot.clone()],
        disks: c.disks.iter().map(|d| d.path.clone()).collect(),
        outputs: process_outputs(&c.options).chain(c.vsock_uds.clone()).collect(),
        taps: c.nets.iter().map(|n| n.tap.clone()).collect(),
        memory_mib: u64::from(mem_mib),
        cpus: u32::try_from(vcpus).unwrap_or(u32::MAX),
        keep_fds: Vec::new(),
    }
}

/// The files the process options name that the VMM writes: the console
/// file, the report, the control socket, the profile.
fn process_outputs(o: &ProcessOptions) -> impl Iterator<Item = PathBuf> {
    let console = match &o.console {
        ConsoleOutput::File(p) => Some(p.clone()),
        _ => None,
    };
    [console, o.report.clone(), o.control.clone(), o.profile.clone()].into_iter().flatten()
}

fn enter_jail(mut needs: Needs, ready: Option<&File>) -> Result<Confined, LaunchError> {
    needs.keep_fds.extend(ready.map(AsRawFd::as_raw_fd));
    let jail = Jail::for_needs(&needs).map_err(LaunchError::JailPaths)?;
    log::debug!("jail: {jail:?}");
    Ok(jail.enter()?)
}

/// Runs the VM `config` describes until it ends. `start` is when the VMM
/// started (the zero of the report's times). `ready` (a pipe's write end,
/// kept through the jail) gets one byte once the VM's sockets listen.
pub fn launch(config: VmmConfig, start: Instant, ready: Option<File>) -> Result<(ExitReason, BootReport), LaunchError> {
    match config.start {
        Start::Boot(mut c) => {
            crate::check_resources(u64::from(c.vcpus), u64::from(c.mem_mib))?;
            c.options.host_compat = resolve_host_compat(c.options.host_compat);
            // A boot writes the kernel into guest memory before it runs
            // it: in the cgroup from the start.
            if c.options.jail {
                enter_jail(boot_needs(&c), ready.as_ref())?.wait()?;
            }
            Ok(crate::vm::run_signalling(&c, start, ready.map(Arc::new))?)
        }
        Start::Restore(mut c) => {
            c.options.host_compat = resolve_host_compat(c.options.host_compat);
            let mut confined = None;
            if c.options.jail {
                let state = crate::snapshot::load_state(&c.snapshot)
                    .map_err(|source| LaunchError::Snapshot { path: c.snapshot.clone(), source })?;
                // A restore only maps guest memory before the guest runs:
                // it is set up while the jail's outer process moves it into
                // its cgroup.
                confined = Some(enter_jail(restore_needs(&c, state.mem_mib, state.vcpus.len()), ready.as_ref())?);
            }
            Ok(crate::vm::restore_signalling(&c, start, ready.map(Arc::new), confined)?)
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::config::{DiskConfig, RestoreDisk, RestoreNet, VsockConfig};

    #[test]
    fn needs_follow_the_configuration() {
        let mut b = VmConfig::new("/k/vmlinux");
        b.initrd = Some("/k/agent.cpio".into());
        b.disks = vec![DiskConfig::new("/layers/l.disk"), DiskConfig::new("/dev/null")];
        b.options.console = ConsoleOutput::File("/vm/console.log".into());
        b.vsock = Some(VsockConfig { cid: 3, uds: "/vm/vsock.sock".into() });
        b.mem_mib = 256;
        b.vcpus = 2;
        let n = boot_needs(&b);
        assert_eq!(n.read_only, vec![PathBuf::from("/k/vmlinux"), PathBuf::from("/k/agent.cpio")]);
        assert_eq!(n.outputs, vec![PathBuf::from("/vm/console.log"), PathBuf::from("/vm/vsock.sock")]);
        assert_eq!((n.memory_mib, n.cpus), (256, 2));
        let jail = Jail::for_needs(&n).unwrap();
        assert_eq!(jail.writable, vec![PathBuf::from("/vm")]);

        let mut r = RestoreConfig::new("/t/snap");
        r.disks = vec![RestoreDisk::new("/layers/l.disk")];
        r.nets = vec![RestoreNet::new("vmtap3")];
        r.options.control = Some("/vm/control.sock".into());
        let n = restore_needs(&r, 512, 1);
        assert_eq!(n.read_only, vec![PathBuf::from("/t/snap")]);
        assert_eq!(n.taps, vec!["vmtap3".to_string()]);
        assert_eq!(n.outputs, vec![PathBuf::from("/vm/control.sock")]);
        assert_eq!((n.memory_mib, n.cpus), (512, 1));
    }
}
