//! Errors that stop a VM from being built or run. Each message says what
//! failed and, where the user can do something about it, what to do.

use std::path::PathBuf;
use std::time::Duration;

use vmrun_devices::virtio::{block, net::tap, vsock};

/// Why a VM could not be built or run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open /dev/kvm: {0} (is KVM available, and may this user open /dev/kvm?)")]
    Kvm(#[source] kvm_ioctls::Error),
    #[error("KVM API version {0} is not supported (12 is needed)")]
    KvmApiVersion(i32),
    #[error("KVM lacks a capability vmrun needs: {0}")]
    KvmCapability(&'static str),
    #[error("KVM ioctl {what} failed: {source}")]
    KvmIoctl { what: &'static str, source: kvm_ioctls::Error },
    #[error("vCPU {id}: KVM ioctl {what} failed: {source}")]
    VcpuIoctl { id: u8, what: &'static str, source: kvm_ioctls::Error },
    #[error("cannot build the {what} for KVM: {source}")]
    KvmList { what: &'static str, source: vmm_sys_util::fam::Error },
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("cannot allocate {mib} MiB of guest memory: {reason}")]
    GuestMemory { mib: u32, reason: String },
    #[error("cannot open {what} {path}: {source}")]
    Open { what: &'static str, path: PathBuf, source: std::io::Error },
    #[error("{path} is not a kernel vmrun can boot ({reason}); pass an ELF vmlinux or a bzImage")]
    KernelFormat { path: PathBuf, reason: String },
    #[error("cannot load kernel {path}: {reason} (is the file complete? a truncated or corrupt vmlinux fails here)")]
    KernelLoad { path: PathBuf, reason: String },
    #[error("initramfs {path} ({size} bytes) does not fit in guest memory ({mem_mib} MiB) above the kernel; give the VM more memory")]
    InitrdTooLarge { path: PathBuf, size: u64, mem_mib: u32 },
    #[error("cannot read initramfs {path}: {source}")]
    InitrdRead { path: PathBuf, source: std::io::Error },
    #[error("kernel command line: {0}")]
    Cmdline(String),
    #[error("the VMM is not in its jail's cgroup: {0}")]
    Confine(#[source] vmrun_jail::Error),
    #[error("cannot write the {0} into guest memory")]
    BootSetup(String),
    #[error("cannot set up the console: {0}")]
    Console(std::io::Error),
    #[error("event loop: {0}")]
    EventLoop(String),
    #[error("cannot start vCPU thread: {0}")]
    VcpuThread(std::io::Error),
    #[error("cannot write the boot report {path}: {source}")]
    Report { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Disk(#[from] block::Error),
    #[error(transparent)]
    Tap(#[from] tap::Error),
    #[error(transparent)]
    Vsock(#[from] vsock::Error),
    #[error("cannot set up the rate limit of {what}: {source}")]
    RateLimit { what: String, source: vmrun_devices::rate_limiter::Error },
    #[error("cannot listen on the control socket {path}: {source} (is its directory there and writable, and no other VMM serving it?)")]
    ControlSocket { path: PathBuf, source: std::io::Error },
    #[error("cannot read the control request: {0}")]
    ControlRead(#[source] std::io::Error),
    #[error(transparent)]
    ControlRequest(#[from] vmrun_vmm_api::RequestError),
    #[error("disk slot {disk}: {reason}")]
    DiskSlot { disk: usize, reason: String },
    #[error("the vCPUs did not pause within {0:?} (the host may be overloaded): try again")]
    PauseTimeout(Duration),
    #[error("only {saved} of {expected} vCPUs saved their state: try again")]
    VcpusSaved { saved: usize, expected: usize },
    #[error("cannot save the snapshot into {dir}: {source}")]
    SnapshotSave { dir: PathBuf, source: crate::snapshot::Error },
    #[error("cannot restore the snapshot: {0}")]
    SnapshotLoad(#[source] crate::snapshot::Error),
    #[error("the snapshot's network slot has an invalid MAC address: {0} (is the snapshot corrupt?)")]
    SnapshotMac(#[source] vmrun_vmm_api::MacError),
    #[error("snapshot: {0}")]
    Snapshot(String),
    #[error(transparent)]
    Seccomp(#[from] crate::seccomp::Error),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl Error {
    /// Wraps a failed KVM ioctl.
    pub fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
        move |source| Error::KvmIoctl { what, source }
    }

    /// Wraps a failed KVM ioctl on vCPU `id`.
    pub fn vcpu(id: u8, what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
        move |source| Error::VcpuIoctl { id, what, source }
    }

    /// Wraps a list KVM could not be handed (too many entries).
    pub fn kvm_list(what: &'static str) -> impl FnOnce(vmm_sys_util::fam::Error) -> Error {
        move |source| Error::KvmList { what, source }
    }
}

/// Result of building or running a VM.
pub type Result<T> = std::result::Result<T, Error>;
