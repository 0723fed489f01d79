//! Pulling an image from an OCI distribution registry into the store.
//!
//! The manifest (after the linux/amd64 entry of an index), the config and
//! each missing layer are fetched and checked against the digest and size
//! that name them before anything enters the store (see
//! [`crate::store::staging`]). Manifests and configs are read to at most
//! [`MAX_DOCUMENT_SIZE`] bytes, a blob to at most its declared size, so a
//! registry that sends too much, too little or the wrong bytes gets an
//! error and the store stays as it was. Every transfer is held to a
//! minimum rate and the whole pull to a deadline ([`pace`]), so a registry
//! that trickles bytes cannot keep a pull alive. Registries are spoken to
//! over TLS as docker does ([`tls`]: the system's CAs and a registry's
//! `certs.d` directory), with the credentials [`PullOptions`] carries
//! (see [`crate::auth`] for docker's `config.json`).

pub(crate) mod client;
pub mod pace;
pub mod tls;

use std::collections::BTreeSet;
use std::io::Read;
use std::path::PathBuf;
use std::time::Duration;

use ureq::http::StatusCode;

pub use client::Credentials;
use client::Client;
use pace::{MinRate, Pace};

use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::image::Image;
use crate::progress::{Progress, ProgressReader};
use crate::reference::Reference;
use crate::spec::{self, Blob, ConfigFile, Manifest, Parsed, MAX_DOCUMENT_SIZE};
use crate::store::staging::{StageError, Staging};
use crate::store::{IndexEntry, Store};

/// How to reach registries.
#[derive(Debug, Clone)]
pub struct PullOptions {
    /// Registries (`host[:port]`) spoken to over plain HTTP. Loopback
    /// registries (`localhost`, `127.0.0.0/8`, `[::1]`) are too, unless
    /// they have a directory in [`Self::certs_dir`].
    pub insecure_registries: Vec<String>,
    /// Credentials for the registry, if it needs them.
    pub credentials: Option<Credentials>,
    /// Docker's `certs.d`: `HOST[:PORT]/` in it holds a registry's CA
    /// certificates (`*.crt`) and client certificate (`*.cert`, `*.key`)
    /// ([`tls`]). Default [`tls::DEFAULT_CERTS_DIR`]; `None`: none.
    pub certs_dir: Option<PathBuf>,
    /// How long to wait for a connection, for a response, and for each
    /// next piece of a body.
    pub timeout: Duration,
    /// The least a transfer must receive over a window
    /// (`VMRUN_PULL_MIN_RATE`).
    pub min_rate: MinRate,
    /// How long the whole pull may take (`VMRUN_PULL_TIMEOUT`); `None`:
    /// no limit but the minimum rate.
    pub deadline: Option<Duration>,
}

/// The default deadline of a whole pull: long enough for images of tens of
/// GB on slow links (the minimum rate catches stalls long before).
pub const DEFAULT_PULL_DEADLINE: Duration = Duration::from_secs(6 * 3600);

impl Default for PullOptions {
    fn default() -> Self {
        Self {
            insecure_registries: Vec::new(),
            credentials: None,
            certs_dir: Some(PathBuf::from(tls::DEFAULT_CERTS_DIR)),
            timeout: Duration::from_secs(60),
            min_rate: MinRate::default(),
            deadline: Some(DEFAULT_PULL_DEADLINE),
        }
    }
}

impl PullOptions {
    /// The defaults, changed by the environment: `VMRUN_INSECURE_REGISTRIES`
    /// (comma-separated `host[:port]`), `VMRUN_CERTS_D` (another
    /// `certs.d`), `VMRUN_PULL_MIN_RATE`
    /// (`BYTES[/SECONDS]`, e.g. `1KiB/30s`; `0` turns it off) and
    /// `VMRUN_PULL_TIMEOUT` (`90s`, `30m`, `6h`; `0` turns it off).
    pub fn from_env() -> Result<Self> {
        let mut o = Self::default();
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        if let Some(v) = var("VMRUN_INSECURE_REGISTRIES") {
            o.insecure_registries = v.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_owned).collect();
        }
        if let Some(v) = var(tls::CERTS_DIR_ENV) {
            o.certs_dir = Some(PathBuf::from(v));
        }
        let bad = |name: &'static str| move |reason| Error::BadSetting { name: name.to_owned(), reason };
        if let Some(v) = var(pace::MIN_RATE_ENV) {
            o.min_rate = MinRate::parse(&v).map_err(bad(pace::MIN_RATE_ENV))?;
        }
        if let Some(v) = var(pace::TIMEOUT_ENV) {
            let d = pace::parse_duration(&v).map_err(bad(pace::TIMEOUT_ENV))?;
            o.deadline = Some(d).filter(|d| !d.is_zero());
        }
        Ok(o)
    }
}

/// A manifest document as the registry sent it.
struct Fetched {
    digest: Digest,
    bytes: Vec<u8>,
    content_type: Option<String>,
}

impl Store {
    /// Pulls `reference` from its registry and names it so in the store.
    /// Layers already in the store (with the right content) are not
    /// downloaded again.
    pub fn pull(&self, reference: &Reference, options: &PullOptions, progress: &mut dyn Progress) -> Result<Image> {
        progress.message(&format!("resolving {reference}"));
        let pace = Pace::new(options.min_rate, options.deadline);
        let mut client = Client::new(reference.registry(), reference.repository(), options, pace)?;
        let mut staging = Staging::new(self)?;

        let top = fetch_manifest(&mut client, reference, &reference.manifest_reference(), reference.digest(), None)?;
        let bad = |reason: String| Error::Registry { registry: reference.registry().into(), reason };
        let bad_manifest = |what: String| {
            move |problem| Error::RegistryManifest { registry: reference.registry().into(), what, problem }
        };
        let platform = |problem| Error::Platform { image: reference.to_string(), problem };
        let (manifest_doc, manifest) = match spec::parse_manifest(&top.bytes, top.content_type.as_deref())
            .map_err(bad_manifest(format!("manifest of {reference}")))?
        {
            Parsed::Manifest(m) => (top, m),
            Parsed::Index(entries) => {
                let d = spec::select_platform(&entries).map_err(platform)?;
                let d = Blob::of(d, "its linux/amd64 entry").map_err(bad_manifest(format!("manifest of {reference}")))?;
                let doc = fetch_manifest(&mut client, reference, &d.digest.to_string(), Some(&d.digest), Some(d.size))?;
                let header = doc.content_type.clone().unwrap_or_else(|| d.media_type.clone());
                match spec::parse_manifest(&doc.bytes, Some(&header))
                    .map_err(bad_manifest(format!("manifest {}", d.digest)))?
                {
                    Parsed::Manifest(m) => (doc, m),
                    Parsed::Index(_) => return Err(bad(format!("manifest {} is an index inside an index", d.digest))),
                }
            }
        };

        // The config: small, checked, and for this platform.
        let cfg = &manifest.config;
        if cfg.size > MAX_DOCUMENT_SIZE {
            return Err(bad(format!("config {} is {} bytes, more than the {MAX_DOCUMENT_SIZE} allowed", cfg.digest, cfg.size)));
        }
        let total: u64 = manifest.layers.iter().map(|l| l.size).sum::<u64>() + cfg.size;
        progress.total(total);
        fetch_blob(&mut client, &mut staging, cfg, "config", progress)?;
        let config_bytes = staging.read(&cfg.digest, MAX_DOCUMENT_SIZE).map_err(|e| bad(e.to_string()))?;
        let config: ConfigFile = serde_json::from_slice(&config_bytes)
            .map_err(|e| bad(format!("config {} is not an image config: {e}", cfg.digest)))?;
        spec::check_config_platform(&config).map_err(platform)?;

        for (i, layer) in manifest.layers.iter().enumerate() {
            fetch_blob(&mut client, &mut staging, layer, &format!("layer {}", i + 1), progress)?;
        }

        progress.message("committing");
        let stored = staging.write_bytes(&manifest_doc.bytes)?;
        debug_assert_eq!(stored, manifest_doc.digest);
        let needed = needed_blobs(&manifest_doc.digest, &manifest);
        let manifest_blob = Blob {
            media_type: manifest.media_type.into(),
            digest: manifest_doc.digest.clone(),
            size: manifest_doc.bytes.len() as u64,
        };
        let entry = IndexEntry::new(Some(reference.clone()), manifest_blob).map_err(|e| bad(e.to_string()))?;
        staging.commit(&needed, vec![entry])?;
        self.image(&manifest_doc.digest, Some(reference.clone()))
    }
}

/// Checks that `registry` (`host[:port]`, as [`crate::parse_registry`]
/// gives it) takes `options.credentials`: `GET /v2/` with them, answering
/// its challenge (basic, or a token service's). Refused credentials are
/// [`Error::LoginDenied`].
pub fn login(registry: &str, options: &PullOptions) -> Result<()> {
    let pace = Pace::new(options.min_rate, options.deadline);
    Client::new(registry, "", options, pace)?.login()
}

/// The manifest and every blob it names.
pub(crate) fn needed_blobs(manifest_digest: &Digest, m: &Manifest) -> BTreeSet<Digest> {
    let mut s: BTreeSet<Digest> = m.layers.iter().map(|l| l.digest.clone()).collect();
    s.insert(m.config.digest.clone());
    s.insert(manifest_digest.clone());
    s
}

fn fetch_manifest(
    client: &mut Client,
    reference: &Reference,
    what: &str,
    expected: Option<&Digest>,
    expected_size: Option<u64>,
) -> Result<Fetched> {
    let registry = client.registry.clone();
    let bad = |reason: String| Error::Registry { registry: registry.clone(), reason };
    let mut resp = client.get(&format!("manifests/{what}"), Some(spec::MANIFEST_ACCEPT))?;
    match resp.status() {
        StatusCode::OK => {}
        StatusCode::NOT_FOUND => {
            let r = match expected {
                Some(d) if reference.digest() != Some(d) => reference.with_digest(d.clone()).to_string(),
                _ => reference.to_string(),
            };
            return Err(Error::ManifestUnknown { registry: registry.clone(), reference: r });
        }
        s => {
            let detail = client.error_detail(&mut resp);
            return Err(bad(format!("GET manifest {what}: HTTP {}{detail}", s.as_u16())));
        }
    }
    let header = |name: &str| resp.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let content_type = header("content-type").map(|t| t.split(';').next().unwrap_or("").trim().to_owned());
    let header_digest = header("docker-content-digest");
    if let Some(len) = resp.body().content_length() {
        if len > MAX_DOCUMENT_SIZE {
            return Err(bad(format!("manifest {what} is {len} bytes, more than the {MAX_DOCUMENT_SIZE} allowed")));
        }
    }
    let mut bytes = Vec::new();
    client
        .body(&mut resp)
        .take(MAX_DOCUMENT_SIZE + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| client.slow(&format!("manifest {what}"), &e).unwrap_or_else(|| bad(format!("reading manifest {what}: {e}"))))?;
    if bytes.len() as u64 > MAX_DOCUMENT_SIZE {
        return Err(bad(format!("manifest {what} is larger than the {MAX_DOCUMENT_SIZE} bytes allowed")));
    }
    let digest = Digest::of(&bytes);
    if let Some(want) = expected {
        if &digest != want {
            return Err(bad(format!("manifest {want} was asked for, but the content sent hashes to {digest}")));
        }
    }
    if let Some(size) = expected_size {
        if bytes.len() as u64 != size {
            return Err(bad(format!("manifest {what} is {} bytes, the index says {size}", bytes.len())));
        }
    }
    if let Some(h) = header_digest {
        match h.parse::<Digest>() {
            Ok(d) if d == digest => {}
            // A header in another algorithm cannot be checked here; the
            // content is checked against what we asked for anyway.
            Err(_) if !h.starts_with("sha256:") => {}
            _ => {
                return Err(bad(format!(
                    "manifest {what}: the Docker-Content-Digest header says {h}, but the content hashes to {digest}"
                )))
            }
        }
    }
    Ok(Fetched { digest, bytes, content_type })
}

fn fetch_blob(
    client: &mut Client,
    staging: &mut Staging<'_>,
    d: &Blob,
    what: &str,
    progress: &mut dyn Progress,
) -> Result<()> {
    if staging.have(&d.digest, d.size) {
        progress.blob_exists(&d.digest, d.size);
        return Ok(());
    }
    let registry = client.registry.clone();
    let bad = |reason: String| Error::Registry { registry: registry.clone(), reason };
    let mut resp = client.get(&format!("blobs/{}", d.digest), None)?;
    match resp.status() {
        StatusCode::OK => {}
        StatusCode::NOT_FOUND => return Err(bad(format!("{what} {} is missing from the registry", d.digest))),
        s => {
            let detail = client.error_detail(&mut resp);
            return Err(bad(format!("GET {what} {}: HTTP {}{detail}", d.digest, s.as_u16())));
        }
    }
    if let Some(len) = resp.body().content_length() {
        if len != d.size {
            return Err(bad(format!(
                "{what} {} is {len} bytes by the registry's Content-Length, the manifest says {}",
                d.digest, d.size
            )));
        }
    }
    progress.blob_started(&d.digest, d.size);
    let body = client.body(&mut resp);
    let mut reader = ProgressReader { inner: body, progress: &mut *progress };
    let named = format!("{what} {}", d.digest);
    staging.write(&mut reader, Some((&d.digest, d.size)), d.size).map_err(|e| match e {
        StageError::Store(e) => e,
        StageError::Read(e) => client.slow(&named, &e).unwrap_or_else(|| bad(StageError::Read(e).describe(&named))),
        other => bad(other.describe(&named)),
    })?;
    progress.blob_done(&d.digest);
    Ok(())
}
