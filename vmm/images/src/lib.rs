//! The vmrun image store: OCI images kept by digest in an OCI image layout,
//! pulled from distribution registries or loaded from `docker save` and
//! OCI archives.
//!
//! ```no_run
//! use vmrun_images::{NoProgress, PullOptions, Reference, Store};
//!
//! let store = Store::open("/var/lib/vmrun/images")?;
//! let reference: Reference = "localhost:5000/busybox:latest".parse()?;
//! store.pull(&reference, &PullOptions::default(), &mut NoProgress)?;
//! let image = store.resolve("localhost:5000/busybox")?;
//! for layer in &image.layers {
//!     println!("{} {} {}", layer.digest, layer.media_type, layer.path.display());
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Every blob is checked against its digest and size before it enters the
//! store; manifests and configs again each time an image is resolved
//! (layers by size there, by digest in [`Store::verify`] and in the guest).
//! Concurrent processes coordinate through `flock` locks in the store, and
//! a crash at any moment leaves the store usable (see [`store`]). The
//! library never prints; pulls and loads report through [`Progress`].

pub mod auth;
mod digest;
mod error;
mod image;
mod load;
mod progress;
mod pull;
mod reference;
pub mod spec;
pub mod store;

pub use digest::{Digest, DigestError};
pub use error::{Error, Result};
pub use image::{Image, ImageConfig, ImageSummary, Layer};
pub use progress::{NoProgress, Progress};
pub use pull::pace::{MinRate, PaceError};
pub use pull::{login, tls, Credentials, PullOptions, DEFAULT_PULL_DEADLINE};
pub use reference::{parse_registry, Reference, ReferenceError, ReferenceProblem, DEFAULT_REGISTRY, DEFAULT_TAG};
pub use store::lock::{FileLock, Mode as LockMode};
pub use store::{default_home, default_store_dir, GcReport, Removed, Store};

/// Entry points for the fuzz targets (`fuzz/`): the parsers of what a
/// registry or an archive sends. Not an API.
#[doc(hidden)]
pub mod fuzzing {
    /// Parses a manifest or index, with and without a claimed media type;
    /// picks an index's linux/amd64 entry and checks its digest.
    pub fn manifest(bytes: &[u8]) {
        if let Ok(crate::spec::Parsed::Index(entries)) = crate::spec::parse_manifest(bytes, None) {
            if let Ok(d) = crate::spec::select_platform(&entries) {
                let _ = crate::spec::Blob::of(d, "entry");
            }
        }
        let _ = crate::spec::parse_manifest(bytes, Some("application/vnd.oci.image.index.v1+json"));
        let _ = crate::spec::parse_manifest(bytes, Some("application/vnd.docker.distribution.manifest.v2+json"));
    }

    /// Parses an image configuration and checks its platform.
    pub fn config(bytes: &[u8]) {
        if let Ok(c) = serde_json::from_slice::<crate::spec::ConfigFile>(bytes) {
            let _ = crate::spec::check_config_platform(&c);
        }
    }

    /// Parses a registry's `WWW-Authenticate` challenge.
    pub fn challenge(bytes: &[u8]) {
        let _ = crate::pull::client::parse_challenge(&String::from_utf8_lossy(bytes));
    }
}
