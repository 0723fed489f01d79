//! What the store hands out: plain descriptions of images.

use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::digest::Digest;
use crate::reference::Reference;
use crate::spec::ConfigFile;

/// An image in the store, resolved to its files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    /// The name it was found by, if it has one.
    pub reference: Option<Reference>,
    /// The digest of its manifest (the "repo digest" of a pull).
    pub manifest_digest: Digest,
    /// The digest of its config: the image ID, as Docker defines it.
    pub config_digest: Digest,
    /// How to run it.
    pub config: ImageConfig,
    /// Its layers, bottom first.
    pub layers: Vec<Layer>,
}

impl Image {
    /// The image ID as `docker images` shows it (12 hex digits).
    pub fn short_id(&self) -> &str {
        self.config_digest.short()
    }

    /// The size of its blobs in the store (compressed layers and config).
    pub fn size(&self) -> u64 {
        self.layers.iter().map(|l| l.size).sum()
    }
}

/// One layer blob of an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layer {
    /// The blob's digest.
    pub digest: Digest,
    /// Its media type (says the compression: `...tar`, `...tar+gzip`, `...tar+zstd`).
    pub media_type: String,
    /// Its size in bytes (checked against the file by [`crate::Store::resolve`]).
    pub size: u64,
    /// The blob's file in the store. Read-only: never write to it.
    pub path: PathBuf,
}

/// How an image wants to be run: the `config` part of its OCI config.
///
/// Empty vectors and `None` mean the image does not set the field.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageConfig {
    /// `amd64`.
    pub architecture: String,
    /// `linux`.
    pub os: String,
    /// When the image was made (RFC 3339), if it says.
    pub created: Option<String>,
    /// The entrypoint.
    pub entrypoint: Vec<String>,
    /// The command (arguments to the entrypoint, or the command itself).
    pub cmd: Vec<String>,
    /// `KEY=VALUE` environment entries.
    pub env: Vec<String>,
    /// The working directory.
    pub working_dir: Option<String>,
    /// `user`, `uid`, `user:group` or `uid:gid`.
    pub user: Option<String>,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Exposed ports (`80/tcp`).
    pub exposed_ports: Vec<String>,
    /// Volumes (guest paths).
    pub volumes: Vec<String>,
    /// The signal that stops the container (`SIGTERM` when `None`).
    pub stop_signal: Option<String>,
    /// The digests of the uncompressed layers, bottom first.
    pub diff_ids: Vec<Digest>,
}

impl From<ConfigFile> for ImageConfig {
    fn from(c: ConfigFile) -> Self {
        let cc = c.config.unwrap_or_default();
        let list = |v: &Option<Vec<String>>| v.clone().unwrap_or_default();
        // `oci-spec` keeps these maps' keys as they come out of a hash map.
        let sorted = |v: &Option<Vec<String>>| {
            let mut v = list(v);
            v.sort();
            v
        };
        Self {
            architecture: c.architecture,
            os: c.os,
            created: c.created,
            entrypoint: list(cc.entrypoint()),
            cmd: list(cc.cmd()),
            env: list(cc.env()),
            working_dir: cc.working_dir().clone().filter(|w| !w.is_empty()),
            user: cc.user().clone().filter(|u| !u.is_empty()),
            labels: cc.labels().clone().unwrap_or_default().into_iter().collect(),
            exposed_ports: sorted(cc.exposed_ports()),
            volumes: sorted(cc.volumes()),
            stop_signal: cc.stop_signal().clone().filter(|s| !s.is_empty()),
            diff_ids: c.rootfs.unwrap_or_default().diff_ids,
        }
    }
}

/// One line of [`crate::Store::list`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageSummary {
    /// Its name, or `None` for an image loaded without one.
    pub reference: Option<Reference>,
    /// The manifest's digest.
    pub manifest_digest: Digest,
    /// The config's digest (the image ID); `None` if the manifest is
    /// damaged.
    pub config_digest: Option<Digest>,
    /// The size of its layers in the store, in bytes.
    pub size: u64,
    /// When it was made, if the config says.
    pub created: Option<String>,
}
