//! The runtime's errors. Their messages are what runc callers see: on
//! standard error, and as the `msg` of the last `error` line in the
//! `--log` file (which containerd's shim quotes).

/// An error of a `vmrun-oci` command.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No container with that id under `--root` (containerd's shim
    /// recognises "does not exist").
    #[error("container \"{0}\" does not exist")]
    NotFound(String),
    /// `create` of an id that is taken.
    #[error("container with id exists: {0}")]
    Exists(String),
    /// An id runc would refuse.
    #[error("invalid container id {0:?}: use [A-Za-z0-9_+.-] (not . or ..)")]
    InvalidId(String),
    /// The bundle or its `config.json` cannot be used.
    #[error("{0}")]
    Bundle(String),
    /// The container is not in a state that allows the command
    /// ("container not running", ...).
    #[error("{0}")]
    State(String),
    /// Bad command-line input.
    #[error("{0}")]
    Usage(String),
    /// A `--log-format` other than `text` or `json`.
    #[error("invalid log format {0:?} (use --log-format text or --log-format json)")]
    LogFormat(String),
    /// A namespace entry's path is not a namespace of its type.
    #[error(transparent)]
    NamespacePath(#[from] crate::bundle::NamespacePathError),
    /// Starting or reaching the VM failed.
    #[error(transparent)]
    Runtime(#[from] vmrun_runtime::Error),
    /// The guest agent refused or failed.
    #[error(transparent)]
    Agent(#[from] vmrun_agent_client::Error),
    /// A hook failed (`prestart`, `createRuntime`, `createContainer`).
    #[error(transparent)]
    Hook(#[from] crate::hooks::HookError),
    /// A host operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
}

/// Result of the runtime's operations.
pub type Result<T> = std::result::Result<T, Error>;

/// Wraps an I/O error with what was being done.
pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}
