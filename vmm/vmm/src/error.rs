//! Errors that stop a VM from being built or run. Each message says what
//! failed and, where the user can do something about it, what to do.

use std::path::PathBuf;

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
}

/// Result of building or running a VM.
pub type Result<T> = std::result::Result<T, Error>;
