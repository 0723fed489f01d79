//! The crate's error type.

use std::io;
use std::path::PathBuf;

use crate::digest::Digest;
use crate::pull::pace::PaceError;
use crate::reference::ReferenceError;
use crate::spec::{ManifestError, PlatformError};

/// Everything that can go wrong in the image store, a pull or a load. Each
/// message is one line that says what failed and where.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A reference could not be parsed.
    #[error(transparent)]
    Reference(#[from] ReferenceError),
    /// A file of the store (or an archive) could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What the system said.
        source: io::Error,
    },
    /// The store has no image by that name or ID.
    #[error("no image {0:?} in the store (pull or load it first)")]
    NotFound(String),
    /// An image ID prefix matches several images.
    #[error("image ID {0:?} matches several images; give more digits")]
    Ambiguous(String),
    /// A blob the store needs is not there.
    #[error("blob {digest} of {what} is missing from the store; pull or load the image again")]
    MissingBlob {
        /// The blob.
        digest: Digest,
        /// What it is (`manifest`, `config`, `layer 2`).
        what: String,
    },
    /// A blob in the store no longer matches its digest or size.
    #[error("blob {digest} ({what}) is corrupt in the store: {reason}; pull or load the image again")]
    CorruptBlob {
        /// The blob.
        digest: Digest,
        /// What it is.
        what: String,
        /// What is wrong.
        reason: String,
    },
    /// The store holds something it cannot parse (a damaged `index.json`,
    /// a manifest or config that is not one).
    #[error("image store {}: {reason}", path.display())]
    BadStore {
        /// The store's directory or file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The registry could not be reached at all.
    #[error("cannot reach registry {registry}: {reason}")]
    Unreachable {
        /// `host[:port]`.
        registry: String,
        /// What failed (DNS, connection refused, TLS, time-out).
        reason: String,
    },
    /// The registry has no such image.
    #[error("image {reference} not found in registry {registry}")]
    ManifestUnknown {
        /// `host[:port]`.
        registry: String,
        /// The reference asked for.
        reference: String,
    },
    /// The registry wants credentials this pull does not have.
    #[error("registry {registry} denied access to {repository}: {reason}")]
    Denied {
        /// `host[:port]`.
        registry: String,
        /// The repository.
        repository: String,
        /// What it said.
        reason: String,
    },
    /// The registry refused the credentials of a login.
    #[error("registry {registry} refused the user name and password: {reason}")]
    LoginDenied {
        /// `host[:port]`.
        registry: String,
        /// What it said.
        reason: String,
    },
    /// A registry's certificate or key (in `certs.d`) cannot be used.
    #[error("{}: {reason}", path.display())]
    Certs {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The registry answered something a registry must not: a wrong
    /// digest or size, an oversized document, an HTTP error, bad JSON.
    #[error("registry {registry}: {reason}")]
    Registry {
        /// `host[:port]`.
        registry: String,
        /// What it did wrong.
        reason: String,
    },
    /// A transfer of a pull received less than the minimum rate over a
    /// window (a stalled or trickling registry).
    #[error(
        "registry {registry} sent {bytes} bytes of {what} in the last {elapsed} (minimum {min_rate}): giving up; check the network or set VMRUN_PULL_MIN_RATE / VMRUN_PULL_TIMEOUT"
    )]
    TooSlow {
        /// `host[:port]`.
        registry: String,
        /// What was being received (`layer 1 sha256:...`, `manifest latest`).
        what: String,
        /// The bytes received over the window.
        bytes: u64,
        /// The window's length, as words (`30 s`).
        elapsed: String,
        /// The minimum rate, as words (`1 KiB/s over 30 s`).
        min_rate: String,
    },
    /// A pull ran past its overall deadline.
    #[error(
        "registry {registry}: the pull took longer than the {limit} allowed (while receiving {what}): giving up; check the network or set VMRUN_PULL_TIMEOUT"
    )]
    PullTimeout {
        /// `host[:port]`.
        registry: String,
        /// What was being received.
        what: String,
        /// The deadline, as words (`6 h`).
        limit: String,
    },
    /// A setting (an environment variable) has a value that is not one.
    #[error("{name}: {reason}")]
    BadSetting {
        /// The variable.
        name: String,
        /// What is wrong with its value.
        reason: PaceError,
    },
    /// A registry sent a manifest or index vmrun cannot use.
    #[error("registry {registry}: {what}: {problem}")]
    RegistryManifest {
        /// `host[:port]`.
        registry: String,
        /// Which document (`manifest of REFERENCE`, `manifest DIGEST`).
        what: String,
        /// What is wrong with it.
        problem: ManifestError,
    },
    /// A manifest or index in the store cannot be used.
    #[error("image store {}: {problem}; pull or load the image again", path.display())]
    StoreManifest {
        /// The blob.
        path: PathBuf,
        /// What is wrong with it.
        problem: ManifestError,
    },
    /// A manifest or index in an archive given to `load` cannot be used.
    #[error("{}: manifest {digest}: {problem}", path.display())]
    ArchiveManifest {
        /// The archive.
        path: PathBuf,
        /// The manifest.
        digest: Digest,
        /// What is wrong with it.
        problem: ManifestError,
    },
    /// The image is for another platform than the one vmrun runs.
    #[error("{image}: {problem}")]
    Platform {
        /// The image: its reference, or its manifest's or config's digest.
        image: String,
        /// Which platforms it has.
        problem: PlatformError,
    },
    /// An archive given to `load` is not a `docker save` or OCI archive, or
    /// is damaged.
    #[error("{}: {reason}", path.display())]
    Archive {
        /// The archive.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The image is well formed but not something vmrun runs (another
    /// platform, a layer type it cannot unpack).
    #[error("{0}")]
    Unsupported(String),
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> Self {
        let path = path.into();
        move |source| Self::Io { path, source }
    }
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

