//! The JSON documents of OCI images and Docker's v2 schema 2, as far as
//! vmrun reads or writes them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::digest::Digest;

/// OCI image manifest.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// OCI image config.
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// OCI uncompressed layer.
pub const OCI_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
/// OCI gzip layer.
pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// OCI zstd layer.
pub const OCI_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
/// Docker image manifest, schema 2.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker manifest list.
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// Docker image config.
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
/// Docker gzip layer.
pub const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
/// Docker uncompressed layer (found in `docker save` conversions).
pub const DOCKER_LAYER_TAR: &str = "application/vnd.docker.image.rootfs.diff.tar";

/// Annotation holding a reference's name in an OCI layout's `index.json`.
pub const ANNOTATION_REF_NAME: &str = "org.opencontainers.image.ref.name";
/// Annotation containerd and Docker put the full image name in.
pub const ANNOTATION_IMAGE_NAME: &str = "io.containerd.image.name";

/// Manifest and config documents larger than this are refused.
pub const MAX_DOCUMENT_SIZE: u64 = 4 << 20;

/// The `Accept` header for manifest requests.
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
    application/vnd.oci.image.manifest.v1+json, \
    application/vnd.docker.distribution.manifest.list.v2+json, \
    application/vnd.docker.distribution.manifest.v2+json";

/// Whether `media_type` is a layer vmrun can unpack: the one list host and
/// agent share, the layer disk's (`vmrun_layerdisk::Compression`), so the
/// store never takes an image whose layers the agent would refuse.
pub fn is_layer(media_type: &str) -> bool {
    vmrun_layerdisk::Compression::from_media_type(media_type).is_some()
}

/// Whether `media_type` is an image config.
pub fn is_config(media_type: &str) -> bool {
    matches!(media_type, OCI_CONFIG | DOCKER_CONFIG)
}

/// A content descriptor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    /// What the content is.
    pub media_type: String,
    /// Its digest.
    pub digest: Digest,
    /// Its size in bytes.
    pub size: u64,
    /// The platform, in an index.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    /// Annotations.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// A platform in an index.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Platform {
    /// CPU architecture (`amd64`).
    #[serde(default)]
    pub architecture: String,
    /// Operating system (`linux`).
    #[serde(default)]
    pub os: String,
    /// CPU variant (`v8`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

/// Either kind of manifest document, before we know which it is.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct AnyManifest {
    #[serde(default)]
    pub schema_version: u32,
    #[serde(default)]
    pub media_type: Option<String>,
    #[serde(default)]
    pub manifests: Option<Vec<Descriptor>>,
    #[serde(default)]
    pub config: Option<Descriptor>,
    #[serde(default)]
    pub layers: Option<Vec<Descriptor>>,
}

/// An image manifest.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    /// Always 2.
    pub schema_version: u32,
    /// `OCI_MANIFEST` or `DOCKER_MANIFEST`.
    pub media_type: String,
    /// The config blob.
    pub config: Descriptor,
    /// The layer blobs, bottom first.
    pub layers: Vec<Descriptor>,
}

/// An image index or manifest list.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Index {
    /// Always 2.
    pub schema_version: u32,
    /// `OCI_INDEX` (absent in old layouts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    /// The manifests.
    #[serde(default)]
    pub manifests: Vec<Descriptor>,
}

/// What a parsed manifest document is.
#[derive(Debug, Clone)]
pub(crate) enum Parsed {
    /// An image manifest.
    Manifest(Manifest),
    /// An index or manifest list.
    Index(Vec<Descriptor>),
}

/// Why a document is not a manifest or index vmrun can use.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// The document does not start with `{`.
    #[error("not a manifest: not a JSON object")]
    NotObject,
    /// The document is not valid JSON or has fields of the wrong type.
    #[error("not a manifest: {0}")]
    Json(#[source] serde_json::Error),
    /// A Docker schema 1 manifest.
    #[error("Docker schema 1 manifests are not supported (re-push the image with a current client)")]
    SchemaOne,
    /// A schema version other than 2.
    #[error("schema version {0} (expected 2)")]
    SchemaVersion(u32),
    /// The config descriptor's media type is not an image config's.
    #[error("config media type {0:?} is not an image config")]
    ConfigMediaType(String),
    /// A layer vmrun has no unpacker for.
    #[error("layer {digest} has media type {media_type:?}, which vmrun cannot unpack")]
    LayerMediaType {
        /// The layer.
        digest: Digest,
        /// Its media type.
        media_type: String,
    },
    /// Neither `manifests` nor `config` and `layers`.
    #[error("neither an image manifest nor an index")]
    Neither,
}

/// Why an image is not one for the platform vmrun runs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlatformError {
    /// An index without a linux/amd64 entry.
    #[error("no {OS}/{ARCH} image in the index (it has: {}); use an image built for {OS}/{ARCH}", have_list(.have))]
    NotInIndex {
        /// The platforms the index has (attestations left out).
        have: Vec<String>,
    },
    /// A config for another platform.
    #[error("the image is for {os}/{architecture}; vmrun runs {OS}/{ARCH} guests")]
    Other {
        /// The config's OS.
        os: String,
        /// The config's architecture.
        architecture: String,
    },
}

fn have_list(have: &[String]) -> String {
    if have.is_empty() {
        "none".into()
    } else {
        have.join(", ")
    }
}

/// Parses a manifest or index document; `header_type` is the media type the
/// sender claimed (the `Content-Type` or a descriptor's), used when the
/// document does not say.
pub(crate) fn parse_manifest(bytes: &[u8], header_type: Option<&str>) -> Result<Parsed, ManifestError> {
    if !bytes.trim_ascii_start().starts_with(b"{") {
        return Err(ManifestError::NotObject);
    }
    let m: AnyManifest = serde_json::from_slice(bytes).map_err(ManifestError::Json)?;
    let media_type = m.media_type.clone().or_else(|| header_type.map(str::to_owned)).unwrap_or_default();
    if media_type.starts_with("application/vnd.docker.distribution.manifest.v1") || m.schema_version == 1 {
        return Err(ManifestError::SchemaOne);
    }
    if m.schema_version != 2 {
        return Err(ManifestError::SchemaVersion(m.schema_version));
    }
    match (m.manifests, m.config, m.layers) {
        (Some(manifests), None, _) => Ok(Parsed::Index(manifests)),
        (None, Some(config), Some(layers)) => {
            if !is_config(&config.media_type) {
                return Err(ManifestError::ConfigMediaType(config.media_type));
            }
            if let Some(l) = layers.iter().find(|l| !is_layer(&l.media_type)) {
                let (digest, media_type) = (l.digest.clone(), l.media_type.clone());
                return Err(ManifestError::LayerMediaType { digest, media_type });
            }
            let media_type = if media_type == DOCKER_MANIFEST { DOCKER_MANIFEST } else { OCI_MANIFEST };
            Ok(Parsed::Manifest(Manifest { schema_version: 2, media_type: media_type.into(), config, layers }))
        }
        _ => Err(ManifestError::Neither),
    }
}

/// The architecture vmrun runs.
pub const ARCH: &str = "amd64";
/// The OS vmrun runs.
pub const OS: &str = "linux";

/// Picks the linux/amd64 manifest from an index.
pub(crate) fn select_platform(manifests: &[Descriptor]) -> Result<&Descriptor, PlatformError> {
    let is_ours = |d: &&Descriptor| d.platform.as_ref().is_some_and(|p| p.os == OS && p.architecture == ARCH);
    // Attestations (`unknown/unknown`) and other platforms are skipped.
    manifests.iter().find(is_ours).ok_or_else(|| {
        let have = manifests
            .iter()
            .filter_map(|d| d.platform.as_ref())
            .filter(|p| p.os != "unknown")
            .map(ToString::to_string)
            .collect();
        PlatformError::NotInIndex { have }
    })
}

/// An image config document (only the fields vmrun uses).
#[derive(Debug, Clone, Default, Deserialize)]
pub(crate) struct ConfigFile {
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub os: String,
    #[serde(default)]
    pub created: Option<String>,
    #[serde(default)]
    pub config: Option<ContainerConfig>,
    #[serde(default)]
    pub rootfs: Option<RootFs>,
}

/// The `config` member of an image config.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct ContainerConfig {
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub env: Option<Vec<String>>,
    #[serde(default)]
    pub entrypoint: Option<Vec<String>>,
    #[serde(default)]
    pub cmd: Option<Vec<String>>,
    #[serde(default)]
    pub working_dir: Option<String>,
    #[serde(default)]
    pub labels: Option<BTreeMap<String, String>>,
    #[serde(default)]
    pub exposed_ports: Option<BTreeMap<String, serde_json::Value>>,
    #[serde(default)]
    pub volumes: Option<BTreeMap<String, serde_json::Value>>,
    #[serde(default)]
    pub stop_signal: Option<String>,
}

/// The `rootfs` member of an image config.
#[derive(Debug, Clone, Default, Deserialize)]
pub(crate) struct RootFs {
    #[serde(default)]
    pub diff_ids: Vec<Digest>,
}

/// Checks an image config's platform, if it names one.
pub(crate) fn check_config_platform(c: &ConfigFile) -> Result<(), PlatformError> {
    let os_ok = c.os.is_empty() || c.os == OS;
    let arch_ok = c.architecture.is_empty() || c.architecture == ARCH;
    if os_ok && arch_ok {
        Ok(())
    } else {
        Err(PlatformError::Other { os: c.os.clone(), architecture: c.architecture.clone() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn parses_manifest_and_index() {
        let m = format!(
            r#"{{"schemaVersion":2,"mediaType":"{DOCKER_MANIFEST}","config":{{"mediaType":"{DOCKER_CONFIG}","digest":"{D}","size":1}},"layers":[{{"mediaType":"{DOCKER_LAYER_GZIP}","digest":"{D}","size":2}}]}}"#
        );
        let Parsed::Manifest(m) = parse_manifest(m.as_bytes(), None).unwrap() else { panic!() };
        assert_eq!((m.media_type.as_str(), m.layers.len()), (DOCKER_MANIFEST, 1));
        let i = format!(
            r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"{OCI_MANIFEST}","digest":"{D}","size":3,"platform":{{"architecture":"arm64","os":"linux","variant":"v8"}}}},{{"mediaType":"{OCI_MANIFEST}","digest":"{D}","size":4,"platform":{{"architecture":"amd64","os":"linux"}}}}]}}"#
        );
        let Parsed::Index(ms) = parse_manifest(i.as_bytes(), Some(OCI_INDEX)).unwrap() else { panic!() };
        assert_eq!(select_platform(&ms).unwrap().size, 4);
        let err = select_platform(&ms[..1]).unwrap_err().to_string();
        assert!(err.contains("linux/arm64/v8"), "{err}");
    }

    #[test]
    fn rejects_odd_manifests() {
        assert!(parse_manifest(br#"{"schemaVersion":1}"#, None).unwrap_err().to_string().contains("schema 1"));
        assert!(parse_manifest(b"[]", None).unwrap_err().to_string().contains("not a manifest"));
        let e = parse_manifest(b"{", None).unwrap_err();
        assert!(matches!(e, ManifestError::Json(_)) && std::error::Error::source(&e).is_some(), "{e:?}");
        let m = format!(
            r#"{{"schemaVersion":2,"config":{{"mediaType":"{OCI_CONFIG}","digest":"{D}","size":1}},"layers":[{{"mediaType":"application/x-foreign","digest":"{D}","size":2}}]}}"#
        );
        assert!(parse_manifest(m.as_bytes(), None).unwrap_err().to_string().contains("cannot unpack"));
    }
}
