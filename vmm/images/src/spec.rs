//! The JSON documents of OCI images and Docker's v2 schema 2, as far as
//! vmrun reads or writes them.
//!
//! Manifests, indexes (Docker's manifest lists too) and their descriptors
//! are `oci-spec`'s types ([`ImageManifest`], [`ImageIndex`],
//! [`Descriptor`]); Docker's media types are [`MediaType::Other`] there,
//! kept as sent. Written here: the first look at a document that tells an
//! index from a manifest and refuses Docker schema 1 (`parse_manifest`);
//! the checks that make a manifest one vmrun can use (`Manifest`, with
//! digests the store can name files by: `Blob`); the image config
//! (`ConfigFile`, which says why).

use oci_spec::image::{Arch, Config, Descriptor, ImageIndex, ImageManifest, ImageManifestBuilder, MediaType, Os, Platform, SCHEMA_VERSION};
use serde::de::IgnoredAny;
use serde::Deserialize;

use crate::digest::{Digest, DigestError};

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

/// A blob a checked [`Manifest`] names (its config or a layer), or the
/// manifest an index entry names: the parts of its [`Descriptor`] vmrun
/// uses, its digest made a store key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Blob {
    /// What the content is.
    pub media_type: String,
    /// Its digest: the blob's name in the store.
    pub digest: Digest,
    /// Its size in bytes.
    pub size: u64,
}

impl Blob {
    /// The blob `d` describes; `what` names it in the error (`layer 2`).
    /// `oci-spec` takes a digest of any algorithm; vmrun keeps blobs by
    /// sha256 only.
    pub(crate) fn of(d: &Descriptor, what: &str) -> Result<Self, ManifestError> {
        let digest = Digest::from_oci(d.digest()).map_err(|source| ManifestError::Digest { what: what.into(), source })?;
        Ok(Self { media_type: d.media_type().as_ref().to_owned(), digest, size: d.size() })
    }

    /// Its descriptor, for a document vmrun writes.
    pub(crate) fn descriptor(&self) -> Result<Descriptor, DigestError> {
        Ok(Descriptor::new(MediaType::from(self.media_type.as_str()), self.size, self.digest.to_oci()?))
    }
}

/// An image manifest vmrun can use: the document, parsed as `oci-spec`'s
/// [`ImageManifest`], with an image config, layers vmrun can unpack, and
/// digests it can keep blobs by. Only this is kept of it; the store keeps
/// the document's bytes as they were sent.
#[derive(Debug, Clone)]
pub(crate) struct Manifest {
    /// `OCI_MANIFEST` or `DOCKER_MANIFEST`.
    pub media_type: &'static str,
    /// The config blob.
    pub config: Blob,
    /// The layer blobs, bottom first.
    pub layers: Vec<Blob>,
}

impl Manifest {
    /// Checks a manifest document: every digest first, then the config's
    /// and the layers' media types.
    fn check(doc: &ImageManifest, media_type: &'static str) -> Result<Self, ManifestError> {
        let config = Blob::of(doc.config(), "config")?;
        let layers =
            doc.layers().iter().enumerate().map(|(i, l)| Blob::of(l, &format!("layer {}", i + 1))).collect::<Result<Vec<_>, _>>()?;
        if !is_config(&config.media_type) {
            return Err(ManifestError::ConfigMediaType(config.media_type));
        }
        if let Some(l) = layers.iter().find(|l| !is_layer(&l.media_type)) {
            let (digest, media_type) = (l.digest.clone(), l.media_type.clone());
            return Err(ManifestError::LayerMediaType { digest, media_type });
        }
        Ok(Self { media_type, config, layers })
    }

    /// The manifest as a document (compact JSON), for an image vmrun puts
    /// together itself (from a `docker save` archive).
    pub(crate) fn to_document(&self) -> Result<Vec<u8>, WriteError> {
        let layers = self.layers.iter().map(Blob::descriptor).collect::<Result<Vec<_>, _>>()?;
        let doc = ImageManifestBuilder::default()
            .schema_version(SCHEMA_VERSION)
            .media_type(MediaType::from(self.media_type))
            .config(self.config.descriptor()?)
            .layers(layers)
            .build()?;
        Ok(serde_json::to_vec(&doc)?)
    }
}

/// Why a document vmrun writes could not be made. With digests vmrun
/// parsed, none of these happens; `oci-spec` has no infallible way to make
/// its digest and manifest types.
#[derive(Debug, thiserror::Error)]
pub(crate) enum WriteError {
    /// A digest `oci-spec` refused.
    #[error(transparent)]
    Digest(#[from] DigestError),
    /// A manifest `oci-spec` would not build.
    #[error("cannot make a manifest: {0}")]
    Build(#[from] oci_spec::OciSpecError),
    /// The document could not be serialized.
    #[error("cannot write a manifest: {0}")]
    Json(#[from] serde_json::Error),
}

/// The first look at a manifest document: which kind it is and its schema
/// version. `oci-spec` has no type for "a manifest or an index", and would
/// refuse a Docker schema 1 manifest only for a missing field; so this
/// decides, and the document is then parsed as [`ImageManifest`] or
/// [`ImageIndex`].
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Probe {
    #[serde(default)]
    schema_version: u32,
    #[serde(default)]
    media_type: Option<String>,
    #[serde(default)]
    manifests: Option<IgnoredAny>,
    #[serde(default)]
    config: Option<IgnoredAny>,
    #[serde(default)]
    layers: Option<IgnoredAny>,
}

/// What a parsed manifest document is.
#[derive(Debug, Clone)]
pub(crate) enum Parsed {
    /// An image manifest.
    Manifest(Manifest),
    /// An index or manifest list: its entries, as sent (their digests are
    /// checked when one is used: [`Blob::of`]).
    Index(Vec<Descriptor>),
}

/// Why a document is not a manifest or index vmrun can use.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// The document does not start with `{`.
    #[error("not a manifest: not a JSON object")]
    NotObject,
    /// The document is not valid JSON or has fields of the wrong type.
    #[error("not a manifest: {}", one_line(.0))]
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
    /// A descriptor's digest is not one vmrun can keep a blob by (sha256
    /// only).
    #[error("{what}: {source}")]
    Digest {
        /// Which descriptor (`config`, `layer 2`).
        what: String,
        /// What is wrong with its digest.
        source: DigestError,
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

/// A parser's message as one short line: `oci-spec`'s messages quote a
/// refused digest whole, control characters and all.
pub(crate) fn one_line(e: &serde_json::Error) -> String {
    const MAX: usize = 300;
    let msg = e.to_string();
    let mut line: String = msg.chars().take(MAX).map(|c| if c.is_control() { ' ' } else { c }).collect();
    if msg.chars().nth(MAX).is_some() {
        line.push_str("...");
    }
    line
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
    let probe: Probe = serde_json::from_slice(bytes).map_err(ManifestError::Json)?;
    let media_type = probe.media_type.as_deref().or(header_type).unwrap_or_default();
    if media_type.starts_with("application/vnd.docker.distribution.manifest.v1") || probe.schema_version == 1 {
        return Err(ManifestError::SchemaOne);
    }
    if probe.schema_version != 2 {
        return Err(ManifestError::SchemaVersion(probe.schema_version));
    }
    match (probe.manifests.is_some(), probe.config.is_some(), probe.layers.is_some()) {
        (true, false, _) => {
            let index: ImageIndex = serde_json::from_slice(bytes).map_err(ManifestError::Json)?;
            Ok(Parsed::Index(index.manifests().clone()))
        }
        (false, true, true) => {
            let doc: ImageManifest = serde_json::from_slice(bytes).map_err(ManifestError::Json)?;
            let media_type = if media_type == DOCKER_MANIFEST { DOCKER_MANIFEST } else { OCI_MANIFEST };
            Manifest::check(&doc, media_type).map(Parsed::Manifest)
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
    let is_ours = |p: &Platform| *p.os() == Os::from(OS) && *p.architecture() == Arch::from(ARCH);
    // Attestations (`unknown/unknown`) and other platforms are skipped.
    manifests.iter().find(|d| d.platform().as_ref().is_some_and(is_ours)).ok_or_else(|| {
        let have = manifests
            .iter()
            .filter_map(|d| d.platform().as_ref())
            .filter(|p| !matches!(p.os(), Os::Other(os) if os == "unknown"))
            .map(platform_name)
            .collect();
        PlatformError::NotInIndex { have }
    })
}

/// `os/architecture[/variant]`, as docker names a platform.
fn platform_name(p: &Platform) -> String {
    let mut name = format!("{}/{}", p.os(), p.architecture());
    if let Some(v) = p.variant() {
        name.push('/');
        name.push_str(v);
    }
    name
}

/// An image config document (only the fields vmrun uses).
///
/// Not `oci-spec`'s `ImageConfiguration`: that requires `architecture`,
/// `os` and `rootfs`, and in `rootfs` both `type` and `diff_ids`, which
/// images in use leave out (Docker omits an empty `diff_ids`; some builders
/// write no `type`), so it would refuse images vmrun runs; and its
/// `diff_ids` are strings, where vmrun wants digests. Its `config` member
/// is `oci-spec`'s [`Config`].
#[derive(Debug, Clone, Default, Deserialize)]
pub(crate) struct ConfigFile {
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub os: String,
    #[serde(default)]
    pub created: Option<String>,
    #[serde(default)]
    pub config: Option<Config>,
    #[serde(default)]
    pub rootfs: Option<RootFs>,
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
        assert_eq!((m.media_type, m.layers.len()), (DOCKER_MANIFEST, 1));
        let i = format!(
            r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"{OCI_MANIFEST}","digest":"{D}","size":3,"platform":{{"architecture":"arm64","os":"linux","variant":"v8"}}}},{{"mediaType":"{OCI_MANIFEST}","digest":"{D}","size":4,"platform":{{"architecture":"amd64","os":"linux"}}}}]}}"#
        );
        let Parsed::Index(ms) = parse_manifest(i.as_bytes(), Some(OCI_INDEX)).unwrap() else { panic!() };
        assert_eq!(select_platform(&ms).unwrap().size(), 4);
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

    #[test]
    fn docker_media_types_and_manifest_lists() {
        let m = format!(
            r#"{{"schemaVersion":2,"mediaType":"{DOCKER_MANIFEST}","config":{{"mediaType":"{DOCKER_CONFIG}","digest":"{D}","size":1}},"layers":[{{"mediaType":"{DOCKER_LAYER_TAR}","digest":"{D}","size":2}},{{"mediaType":"{OCI_LAYER_ZSTD}","digest":"{D}","size":3}}]}}"#
        );
        let Parsed::Manifest(m) = parse_manifest(m.as_bytes(), None).unwrap() else { panic!() };
        assert_eq!((m.media_type, m.config.media_type.as_str()), (DOCKER_MANIFEST, DOCKER_CONFIG));
        let types: Vec<_> = m.layers.iter().map(|l| (l.media_type.as_str(), l.size)).collect();
        assert_eq!(types, [(DOCKER_LAYER_TAR, 2), (OCI_LAYER_ZSTD, 3)]);
        assert_eq!(m.config.digest.to_string(), D);

        // A manifest list with an attestation and another platform only.
        let entry = |media_type: &str, size: u32, platform: &str| {
            format!(r#"{{"mediaType":"{media_type}","digest":"{D}","size":{size},"platform":{platform}}}"#)
        };
        let list = |entries: &[String]| {
            format!(r#"{{"schemaVersion":2,"mediaType":"{DOCKER_MANIFEST_LIST}","manifests":[{}]}}"#, entries.join(","))
        };
        let attestation = entry(OCI_MANIFEST, 5, r#"{"architecture":"unknown","os":"unknown"}"#);
        let arm = entry(DOCKER_MANIFEST, 6, r#"{"architecture":"arm","os":"linux","variant":"v7","features":["sse4"]}"#);
        let Parsed::Index(ms) = parse_manifest(list(&[attestation.clone(), arm.clone()]).as_bytes(), None).unwrap() else { panic!() };
        assert_eq!(select_platform(&ms).unwrap_err(), PlatformError::NotInIndex { have: vec!["linux/arm/v7".into()] });
        let amd64 = entry(DOCKER_MANIFEST, 7, r#"{"architecture":"amd64","os":"linux"}"#);
        let Parsed::Index(ms) = parse_manifest(list(&[attestation, arm, amd64]).as_bytes(), None).unwrap() else { panic!() };
        let ours = Blob::of(select_platform(&ms).unwrap(), "entry").unwrap();
        assert_eq!((ours.media_type.as_str(), ours.size), (DOCKER_MANIFEST, 7));
    }

    #[test]
    fn digests_are_sha256_and_errors_one_short_line() {
        let manifest = |config: &str, layer: &str| {
            format!(
                r#"{{"schemaVersion":2,"config":{{"mediaType":"{OCI_CONFIG}","digest":"{config}","size":1}},"layers":[{{"mediaType":"{OCI_LAYER_GZIP}","digest":"{D}","size":2}},{{"mediaType":"{OCI_LAYER_GZIP}","digest":"{layer}","size":2}}]}}"#
            )
        };
        // Well formed, but not sha256: oci-spec takes them, the store cannot.
        let sha512 = format!("sha512:{}", "ab".repeat(64));
        let e = parse_manifest(manifest(D, &sha512).as_bytes(), None).unwrap_err();
        assert!(matches!(&e, ManifestError::Digest { what, .. } if what == "layer 2"), "{e:?}");
        assert!(e.to_string().starts_with("layer 2: invalid digest \"sha512:abab") && e.to_string().contains("only sha256"), "{e}");
        assert!(std::error::Error::source(&e).is_some());
        let e = parse_manifest(manifest("blake3:0123", D).as_bytes(), None).unwrap_err();
        assert!(e.to_string().starts_with("config: invalid digest \"blake3:0123\""), "{e}");
        // Malformed: oci-spec's parser refuses them, and its message (which
        // quotes the digest whole) is cut to one short line.
        let hostile = format!("sha256:{}\\n{}", "!".repeat(10_000), "x");
        let e = parse_manifest(manifest(D, &hostile).as_bytes(), None).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, ManifestError::Json(_)) && !msg.contains('\n') && msg.len() < 400, "{msg}");
        assert!(parse_manifest(manifest(D, "sha256:e3b0").as_bytes(), None).unwrap_err().to_string().starts_with("not a manifest"));

        // In an index, only the entry used must be sha256.
        let index = |amd64: &str| {
            format!(
                r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"{OCI_MANIFEST}","digest":"{sha512}","size":3,"platform":{{"architecture":"arm64","os":"linux"}}}},{{"mediaType":"{OCI_MANIFEST}","digest":"{amd64}","size":4,"platform":{{"architecture":"amd64","os":"linux"}}}}]}}"#
            )
        };
        let Parsed::Index(ms) = parse_manifest(index(D).as_bytes(), None).unwrap() else { panic!() };
        assert_eq!(Blob::of(select_platform(&ms).unwrap(), "entry").unwrap().digest.to_string(), D);
        let Parsed::Index(ms) = parse_manifest(index(&sha512).as_bytes(), None).unwrap() else { panic!() };
        let e = Blob::of(select_platform(&ms).unwrap(), "its linux/amd64 entry").unwrap_err();
        assert!(e.to_string().starts_with("its linux/amd64 entry: invalid digest"), "{e}");
    }

    #[test]
    fn writes_manifests_as_before() {
        let blob = |media_type: &str, size| Blob { media_type: media_type.into(), digest: D.parse().unwrap(), size };
        let layers = vec![blob(OCI_LAYER_TAR, 2), blob(OCI_LAYER_GZIP, 3)];
        let m = Manifest { media_type: OCI_MANIFEST, config: blob(OCI_CONFIG, 1), layers };
        let doc = String::from_utf8(m.to_document().unwrap()).unwrap();
        assert_eq!(
            doc,
            format!(
                r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{"mediaType":"{OCI_CONFIG}","digest":"{D}","size":1}},"layers":[{{"mediaType":"{OCI_LAYER_TAR}","digest":"{D}","size":2}},{{"mediaType":"{OCI_LAYER_GZIP}","digest":"{D}","size":3}}]}}"#
            )
        );
        let Parsed::Manifest(again) = parse_manifest(doc.as_bytes(), None).unwrap() else { panic!() };
        assert_eq!((again.config, again.layers), (m.config, m.layers));
    }

    #[test]
    fn config_fields() {
        let c: ConfigFile = serde_json::from_slice(
            br#"{"architecture":"amd64","os":"linux","config":{"User":"1:2","Env":["A=1"],"Entrypoint":["/e"],"Cmd":null,"WorkingDir":"","Labels":{"b":"2","a":"1"},"ExposedPorts":{"80/tcp":{},"53/udp":{}},"Volumes":{"/v":{}},"StopSignal":"SIGINT","Hostname":"h"}}"#,
        )
        .unwrap();
        check_config_platform(&c).unwrap();
        let i = crate::ImageConfig::from(c);
        assert_eq!((i.user.as_deref(), i.env, i.entrypoint), (Some("1:2"), vec!["A=1".to_owned()], vec!["/e".to_owned()]));
        assert!(i.cmd.is_empty() && i.working_dir.is_none() && i.diff_ids.is_empty());
        assert_eq!((i.exposed_ports, i.volumes), (vec!["53/udp".to_owned(), "80/tcp".to_owned()], vec!["/v".to_owned()]));
        assert_eq!(i.stop_signal.as_deref(), Some("SIGINT"));
        assert_eq!(i.labels.into_iter().collect::<Vec<_>>(), [("a".to_owned(), "1".to_owned()), ("b".to_owned(), "2".to_owned())]);
        // What images in use leave out (no rootfs type or diff_ids, no
        // rootfs, no platform) is taken as before; another platform is not.
        for doc in [&br#"{"architecture":"amd64","os":"linux","rootfs":{"diff_ids":[]}}"#[..], br#"{"rootfs":{"type":"layers"}}"#, b"{}"] {
            check_config_platform(&serde_json::from_slice(doc).unwrap()).unwrap();
        }
        // `oci-spec` reads `ExposedPorts` and `Volumes` as Go's sets (each
        // value `{}`, as a `map[string]struct{}` is written); others fail.
        assert!(serde_json::from_slice::<ConfigFile>(br#"{"config":{"Volumes":{"/v":null}}}"#).is_err());
        // Go's nil maps and slices, as docker writes them, are none.
        let docker = br#"{"architecture":"amd64","os":"linux","config":{"Hostname":"","Env":null,"Cmd":["sh"],"Entrypoint":null,"Volumes":null,"ExposedPorts":null,"OnBuild":null,"Labels":null,"WorkingDir":""},"rootfs":{"type":"layers","diff_ids":["sha256:0000000000000000000000000000000000000000000000000000000000000000"]}}"#;
        let c: ConfigFile = serde_json::from_slice(docker).unwrap();
        let i = c.config.unwrap_or_default();
        assert!(i.volumes().is_none() && i.exposed_ports().is_none() && i.env().is_none() && i.labels().is_none());
        let arm: ConfigFile = serde_json::from_slice(br#"{"architecture":"arm64","os":"linux"}"#).unwrap();
        assert_eq!(check_config_platform(&arm).unwrap_err().to_string(), "the image is for linux/arm64; vmrun runs linux/amd64 guests");
    }
}
