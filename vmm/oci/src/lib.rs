//! `vmrun-oci`: an OCI runtime with runc's command line that runs each
//! container in a vmrun microVM, and `containerd-shim-vmrun-v2`, which lets
//! containerd drive it through containerd's own runc shim.
//!
//! - [`cli`]: the command line (`create`, `start`, `state`, `kill`,
//!   `delete`, `exec`, `ps`, `events`, `update`, `features`, `spec`) and
//!   runc's global flags;
//! - [`bundle`]: a bundle's `config.json`, checked and turned into what the
//!   VM and the guest agent need ([`bundle::Plan`]);
//! - [`copies`]: bind mounts copied in through the guest agent and kept
//!   up to date;
//! - [`cgroups`]: `events` and `update`, the container's cgroup in the
//!   guest;
//! - [`state`]: a container's state directory under `--root`;
//! - [`supervisor`]: the process that owns a container's VM and the one
//!   that owns an exec'd process;
//! - [`holder`]: the container's pid on the host, in the spec's
//!   namespaces;
//! - [`console`]: pseudo-terminals and `--console-socket`;
//! - [`hooks`]: the spec's hooks, run on the host;
//! - [`shim`]: the containerd shim wrapper.
//!
//! `docs/oci.md` explains the design.

pub mod bundle;
pub mod cgroups;
pub mod cli;
pub mod console;
pub mod copies;
pub mod error;
pub mod hooks;
pub mod holder;
pub mod host_cgroup;
pub mod logger;
pub mod rootcopy;
pub mod ops;
pub mod pod;
pub mod shim;
pub mod signals;
pub mod state;
pub mod supervisor;
pub mod time;
pub mod writeback;

pub use error::{Error, Result};
