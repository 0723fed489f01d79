//! The vmrun virtual machine monitor: builds a KVM virtual machine from a
//! [`VmConfig`], boots a Linux kernel in it and runs it until the guest
//! resets, crashes or the VMM is told to stop.
//!
//! Its configuration is the VMM API's ([`vmrun_vmm_api`]); [`launch`]
//! runs one (jail, boot or restore). The `vmrun-vmm` binary (`src/main.rs`)
//! reads one as JSON and launches it; `vmrun boot` and `vmrun restore` build
//! one from their flags and launch it in their own process.

pub mod config;
pub mod console;
pub mod controller;
pub mod error;
pub mod host_compat;
pub mod launch;
pub mod loader;
pub mod logger;
pub mod memory;
pub mod profile;
pub mod report;
pub mod seccomp;
pub mod snapshot;
pub mod stats;
mod vcpu;
mod virtio_devices;
mod vm;

pub use config::{
    ConsoleOutput, DiskConfig, HostCompatMode, NetConfig, ProcessOptions, RateLimit, RestoreConfig, RestoreDisk, RestoreNet,
    SeccompMode, VmConfig, VmmConfig, VsockConfig,
};
pub use launch::{launch, LaunchError};
pub use error::Error;
pub use report::BootReport;
pub use vm::{check_resources, restore, run, ExitReason, RunOptions, MAX_MEM_MIB};
