//! What crosses the boundary between the processes that start VMMs and
//! the VMM (`vmrun-vmm`): a VM's configuration, to boot or to restore
//! ([`config`]), and the control protocol spoken on its control socket
//! ([`control`]), with a small client, and the guest profile it writes
//! ([`profile`]). Each is versioned: a reader checks
//! [`VERSION`] or [`CONTROL_VERSION`] first and refuses any other. Plain
//! serde types: both sides use these, nothing formats or parses device
//! strings in between.

pub mod config;
pub mod control;
pub mod hash;
pub mod profile;

pub use config::{
    ConfigError, ConsoleOutput, DiskConfig, HostCompatMode, Mac, MacError, NetConfig, ProcessOptions, RateLimit,
    RestoreConfig, RestoreDisk, RestoreNet, SeccompMode, Start, VmConfig, VmmConfig, VsockConfig, DEFAULT_CMDLINE, VERSION,
};
pub use control::{
    attach_disk, read_line_with_fds, request, request_with_fd, ControlError, Envelope, Request, RequestError, Response, VcpuStats, VmmStats, CONTROL_VERSION,
};
