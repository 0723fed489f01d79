//! The vmrun virtual machine monitor: builds a KVM virtual machine from a
//! [`VmConfig`], boots a Linux kernel in it and runs it until the guest
//! resets, crashes or the VMM is told to stop.
//!
//! The CLI (`vmrun boot`) is a thin front over [`run`].

pub mod config;
pub mod console;
pub mod controller;
pub mod error;
pub mod host_compat;
pub mod loader;
pub mod memory;
pub mod report;
pub mod seccomp;
pub mod snapshot;
pub mod stats;
mod vcpu;
mod virtio_devices;
mod vm;

pub use config::{ConsoleOutput, DiskConfig, HostCompatMode, NetConfig, SeccompMode, VmConfig, VsockConfig};
pub use error::Error;
pub use report::BootReport;
pub use vm::{check_resources, restore, run, ExitReason, RestoreConfig, RunOptions, MAX_MEM_MIB};
