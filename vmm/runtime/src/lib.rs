//! Containers in microVMs: everything between a resolved image and a
//! running container process, shared by `vmrun run` and the OCI runtime.
//!
//! - [`home`]: the data directory and what lives in it;
//! - [`artifacts`]: the guest kernel and the agent initramfs;
//! - [`layer_disk`]: an image's layer blobs on a read-only disk for the guest;
//! - [`vm`]: the VMM process (a child `vmrun-vmm` given its typed
//!   configuration), reaching its agent, stopping it;
//! - [`sandbox`]: one VM with its agent and its containers, from start to
//!   end, which every front end drives; [`signal::Relay`] takes the
//!   signals of the process that owns it;
//! - [`template`]: warm starts from snapshots, taken through the VMM's
//!   control socket (the typed client of `vmrun-vmm-api`);
//! - [`pool`]: VMs restored ahead of the runs that take them;
//! - [`prune`]: what the data directory no longer needs (`rmi`, `system df`,
//!   `system prune`);
//! - [`watch`]: waiting on events (a process ending, a state file
//!   replaced, a log growing) instead of sleeping and looking again.

pub mod artifacts;
pub mod container;
pub mod cpu;
pub mod home;
pub mod layer_disk;
pub mod lock;
pub mod net;
pub mod pool;
pub mod prune;
pub mod sandbox;
pub mod signal;
pub mod size;
pub mod template;
pub mod vm;
pub mod volume;
pub mod watch;

/// Errors of the runtime. Each says what failed and what to do.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Artifacts(String),
    #[error("cannot build the layer disk {path}: {reason}")]
    LayerDisk { path: std::path::PathBuf, reason: String },
    #[error("cannot start the VMM: {0}")]
    Spawn(std::io::Error),
    #[error("cannot find the vmrun-vmm executable: install it beside {beside}, set {env}, or put it on PATH", env = vm::VMM_ENV)]
    VmmNotFound { beside: String },
    #[error("cannot write the VMM's configuration: {0}")]
    VmmConfig(#[from] vmrun_vmm_api::ConfigError),
    #[error(transparent)]
    Control(#[from] vmrun_vmm_api::ControlError),
    #[error("the VM ended before its agent answered ({status}): {reason}")]
    VmEnded { status: String, reason: String },
    #[error("the guest agent did not answer within {secs} s; its console is in {console}")]
    AgentTimeout { secs: u64, console: std::path::PathBuf },
    #[error("guest agent: {0}")]
    Agent(#[from] vmrun_agent_client::Error),
    #[error("{0}")]
    Volume(String),
    #[error("{0}")]
    Network(String),
    #[error("{0}")]
    Pool(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl Error {
    /// The exit code the agent gave for a process it could not start (126:
    /// cannot be run, 127: not found).
    pub fn exit_code(&self) -> Option<i32> {
        match self {
            Error::Agent(e) => e.exit_code(),
            _ => None,
        }
    }
}

/// Result of runtime operations.
pub type Result<T> = std::result::Result<T, Error>;
