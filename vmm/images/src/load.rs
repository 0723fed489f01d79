//! Loading images from archives: `docker save` output (the classic layout
//! with `manifest.json`, and Docker 25's, which adds an OCI layout) and
//! OCI archives (a tar of an OCI image layout), either of them plain or
//! gzip-compressed.
//!
//! The archive is read once, front to back: files under `blobs/sha256/`
//! are staged and checked against their names, the small JSON documents are
//! kept in memory, other files (a classic archive's `layer.tar`s) are
//! staged by the digest of their content. Then the images are put together
//! and committed as for a pull; a damaged archive leaves the store as it
//! was.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Component, Path};

use oci_spec::image::{Descriptor, ImageIndex};
use serde::Deserialize;

use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::image::Image;
use crate::progress::{Progress, ProgressReader};
use crate::pull::needed_blobs;
use crate::reference::Reference;
use crate::spec::{self, Blob, ConfigFile, Manifest, Parsed, MAX_DOCUMENT_SIZE};
use crate::store::staging::{StageError, Staging};
use crate::store::{IndexEntry, Store};

/// Symbolic links followed at most this deep.
const MAX_LINK_DEPTH: usize = 16;

/// A regular file of the archive.
#[derive(Debug)]
enum Member {
    /// A small document, in memory.
    Small(Vec<u8>),
    /// A file staged as a blob.
    Blob(Digest, u64),
}

/// What one pass over the archive found.
#[derive(Debug, Default)]
struct Scan {
    files: BTreeMap<String, Member>,
    links: BTreeMap<String, String>,
}

impl Scan {
    fn get(&self, path: &str) -> Option<&Member> {
        let mut p = path.to_owned();
        for _ in 0..MAX_LINK_DEPTH {
            if let Some(m) = self.files.get(&p) {
                return Some(m);
            }
            p = self.links.get(&p)?.clone();
        }
        None
    }
}

/// One image found in an archive, before commit.
struct Found {
    names: Vec<Option<Reference>>,
    manifest_digest: Digest,
    manifest_size: u64,
    manifest: Manifest,
}

/// One entry of a classic `docker save` `manifest.json`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerEntry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    #[serde(default)]
    layers: Vec<String>,
}

struct Loader<'a, 's> {
    path: &'a Path,
    staging: Staging<'s>,
    scan: Scan,
}

impl Store {
    /// Loads every image of a `docker save` or OCI archive into the store,
    /// named as the archive names them (an image without a name is stored
    /// unnamed, found by its ID). Returns the images loaded.
    pub fn load(&self, path: &Path, progress: &mut dyn Progress) -> Result<Vec<Image>> {
        let file = File::open(path).map_err(Error::io(path))?;
        let size = file.metadata().map_err(Error::io(path))?.len();
        progress.message(&format!("loading {}", path.display()));
        progress.total(size);
        let mut loader = Loader { path, staging: Staging::new(self)?, scan: Scan::default() };
        {
            let mut buffered = BufReader::with_capacity(1 << 16, file);
            let gzip = buffered.fill_buf().map_err(Error::io(path))?.starts_with(&[0x1f, 0x8b]);
            let counted = ProgressReader { inner: buffered, progress: &mut *progress };
            let reader: Box<dyn Read + '_> =
                if gzip { Box::new(flate2::read::GzDecoder::new(counted)) } else { Box::new(counted) };
            loader.scan(reader)?;
        }
        progress.message("committing");
        let found = if loader.scan.files.contains_key("index.json") {
            loader.oci()?
        } else if loader.scan.files.contains_key("manifest.json") {
            loader.docker()?
        } else {
            return Err(loader.bad(
                "neither a docker save archive (no manifest.json) nor an OCI archive (no index.json)".into(),
            ));
        };
        if found.is_empty() {
            return Err(loader.bad("the archive holds no image".into()));
        }
        let mut needed = BTreeSet::new();
        let mut entries = Vec::new();
        for f in &found {
            needed.extend(needed_blobs(&f.manifest_digest, &f.manifest));
            for name in &f.names {
                let manifest = Blob { media_type: f.manifest.media_type.into(), digest: f.manifest_digest.clone(), size: f.manifest_size };
                entries.push(IndexEntry::new(name.clone(), manifest).map_err(|e| loader.bad(e.to_string()))?);
            }
        }
        loader.staging.commit(&needed, entries)?;
        found
            .into_iter()
            .map(|f| self.image(&f.manifest_digest, f.names.into_iter().next().flatten()))
            .collect()
    }
}

impl Loader<'_, '_> {
    fn bad(&self, reason: String) -> Error {
        // Parser messages may quote the archive's bytes: keep one short line.
        let mut reason: String =
            reason.chars().map(|c| if c.is_control() { ' ' } else { c }).take(300).collect();
        if reason.len() >= 300 {
            reason.push_str("...");
        }
        Error::Archive { path: self.path.to_owned(), reason }
    }

    fn stage_error(&self, e: StageError, what: &str) -> Error {
        match e {
            StageError::Store(e) => e,
            other => self.bad(other.describe(what)),
        }
    }

    /// Reads every member of the archive.
    fn scan(&mut self, reader: impl Read) -> Result<()> {
        let mut archive = tar::Archive::new(reader);
        let entries = archive.entries().map_err(|e| self.bad(format!("not a tar archive: {e}")))?;
        for (i, entry) in entries.enumerate() {
            let mut entry = entry.map_err(|e| {
                if i == 0 {
                    // The parser's detail would quote the file's bytes.
                    drop(e);
                    self.bad("not a tar archive (nor a gzip-compressed one)".into())
                } else {
                    self.bad(format!("damaged tar archive: {e}"))
                }
            })?;
            let raw = entry.path().map_err(|e| self.bad(format!("bad member name: {e}")))?.into_owned();
            let Some(name) = normalize(&raw) else { continue };
            let kind = entry.header().entry_type();
            if kind.is_symlink() || kind.is_hard_link() {
                let target = entry.link_name().ok().flatten().map(|t| t.into_owned());
                let base = if kind.is_symlink() { Path::new(&name).parent().map(Path::to_owned) } else { None };
                let resolved = target.and_then(|t| normalize(&base.unwrap_or_default().join(t)));
                if let Some(t) = resolved {
                    self.scan.links.insert(name, t);
                }
                continue;
            }
            if !kind.is_file() {
                continue;
            }
            let size = entry.size();
            let member = if let Some(hex) = name.strip_prefix("blobs/sha256/") {
                let d = Digest::from_hex(hex).map_err(|e| self.bad(format!("member {name}: {e}")))?;
                self.staging
                    .write(&mut entry, Some((&d, size)), size)
                    .map_err(|e| self.stage_error(e, &format!("blob {d}")))?;
                Member::Blob(d, size)
            } else if is_document(&name) && size <= MAX_DOCUMENT_SIZE {
                let mut bytes = Vec::new();
                entry.read_to_end(&mut bytes).map_err(|e| self.bad(format!("reading {name}: {e}")))?;
                Member::Small(bytes)
            } else {
                let (d, n) = self
                    .staging
                    .write(&mut entry, None, u64::MAX)
                    .map_err(|e| self.stage_error(e, &format!("member {name}")))?;
                Member::Blob(d, n)
            };
            self.scan.files.insert(name, member);
        }
        // Read the end-of-archive padding too, so progress ends at 100%.
        let _ = std::io::copy(&mut archive.into_inner(), &mut std::io::sink());
        Ok(())
    }

    /// A small document of the archive, by member name.
    fn document(&self, name: &str) -> Result<Vec<u8>> {
        match self.scan.get(name) {
            Some(Member::Small(b)) => Ok(b.clone()),
            Some(Member::Blob(d, _)) => {
                self.staging.read(d, MAX_DOCUMENT_SIZE).map_err(|e| self.bad(format!("{name}: {e}")))
            }
            None => Err(self.bad(format!("{name} is not in the archive"))),
        }
    }

    /// A blob the archive must contain (or the store already has).
    fn require(&self, d: &Blob, what: &str) -> Result<()> {
        if self.staging.have(&d.digest, d.size) {
            Ok(())
        } else if self.staging.is_staged(&d.digest) {
            Err(self.bad(format!("{what} {} has a size other than the {} bytes its manifest says", d.digest, d.size)))
        } else {
            Err(self.bad(format!("{what} {} is not in the archive", d.digest)))
        }
    }

    fn config(&self, d: &Digest) -> Result<ConfigFile> {
        let bytes = self.staging.read(d, MAX_DOCUMENT_SIZE).map_err(|e| self.bad(format!("config {d}: {e}")))?;
        let config: ConfigFile =
            serde_json::from_slice(&bytes).map_err(|e| self.bad(format!("config {d} is not an image config: {e}")))?;
        spec::check_config_platform(&config).map_err(|problem| Error::Platform { image: format!("config {d}"), problem })?;
        Ok(config)
    }

    /// An OCI archive: `index.json` names manifests (or indexes) by digest.
    fn oci(&mut self) -> Result<Vec<Found>> {
        let bytes = self.document("index.json")?;
        let index: ImageIndex =
            serde_json::from_slice(&bytes).map_err(|e| self.bad(format!("index.json is not an OCI index: {e}")))?;
        let mut found: Vec<Found> = Vec::new();
        for (i, entry) in index.manifests().iter().enumerate() {
            let name = self.oci_name(entry)?;
            let top = Blob::of(entry, &format!("entry {}", i + 1)).map_err(|e| self.bad(format!("index.json: {e}")))?;
            let mut d = top.clone();
            let manifest = loop {
                if !self.staging.is_staged(&d.digest) {
                    return Err(self.bad(format!("manifest {} is not in the archive", d.digest)));
                }
                let doc = self.document(&format!("blobs/sha256/{}", d.digest.hex()))?;
                if doc.len() as u64 != d.size {
                    return Err(self.bad(format!("manifest {} is {} bytes, its descriptor says {}", d.digest, doc.len(), d.size)));
                }
                match spec::parse_manifest(&doc, Some(&d.media_type)).map_err(|problem| Error::ArchiveManifest {
                    path: self.path.to_owned(),
                    digest: d.digest.clone(),
                    problem,
                })?
                {
                    Parsed::Manifest(m) => break m,
                    Parsed::Index(entries) if d.digest == top.digest => {
                        let platform = |problem| Error::Platform { image: format!("index {}", d.digest), problem };
                        let ours = spec::select_platform(&entries).map_err(platform)?;
                        d = Blob::of(ours, "its linux/amd64 entry").map_err(|problem| Error::ArchiveManifest {
                            path: self.path.to_owned(),
                            digest: d.digest.clone(),
                            problem,
                        })?;
                    }
                    Parsed::Index(_) => return Err(self.bad(format!("index {} is nested too deep", d.digest))),
                }
            };
            self.require(&manifest.config, "config")?;
            for (i, l) in manifest.layers.iter().enumerate() {
                self.require(l, &format!("layer {}", i + 1))?;
            }
            self.config(&manifest.config.digest)?;
            match found.iter_mut().find(|f| f.manifest_digest == d.digest) {
                Some(f) => f.names.push(name),
                None => found.push(Found { names: vec![name], manifest_digest: d.digest, manifest_size: d.size, manifest }),
            }
        }
        Ok(found)
    }

    /// The name an OCI archive gives a manifest: containerd's full image
    /// name, else a `ref.name` that is a whole reference (a bare tag such
    /// as `latest` names no repository, so the image stays unnamed).
    fn oci_name(&self, d: &Descriptor) -> Result<Option<Reference>> {
        let annotation = |key| d.annotations().as_ref().and_then(|a| a.get(key));
        if let Some(n) = annotation(spec::ANNOTATION_IMAGE_NAME) {
            return n.parse().map(Some).map_err(|e| self.bad(format!("image name in index.json: {e}")));
        }
        match annotation(spec::ANNOTATION_REF_NAME) {
            Some(n) if n.contains(['/', ':', '@']) => {
                n.parse().map(Some).map_err(|e| self.bad(format!("image name in index.json: {e}")))
            }
            _ => Ok(None),
        }
    }

    /// A classic `docker save` archive: `manifest.json` names a config and
    /// layer files by path; an OCI manifest is made for each image.
    fn docker(&mut self) -> Result<Vec<Found>> {
        let bytes = self.document("manifest.json")?;
        let entries: Vec<DockerEntry> = serde_json::from_slice(&bytes)
            .map_err(|e| self.bad(format!("manifest.json is not a docker save manifest: {e}")))?;
        let mut found = Vec::new();
        for e in entries {
            let config_digest = match self.scan.get(&e.config) {
                Some(Member::Small(b)) => {
                    let b = b.clone();
                    self.staging.write_bytes(&b)?
                }
                Some(Member::Blob(d, _)) => d.clone(),
                None => return Err(self.bad(format!("config {} is not in the archive", e.config))),
            };
            let config = self.config(&config_digest)?;
            let config_size = self.staging.read(&config_digest, MAX_DOCUMENT_SIZE).map_err(|e| self.bad(e.to_string()))?.len();
            let diff_ids = config.rootfs.unwrap_or_default().diff_ids;
            if diff_ids.len() != e.layers.len() {
                return Err(self.bad(format!(
                    "the config lists {} layers, manifest.json {}",
                    diff_ids.len(),
                    e.layers.len()
                )));
            }
            let mut layers = Vec::new();
            for (i, (path, diff_id)) in e.layers.iter().zip(&diff_ids).enumerate() {
                let (digest, size) = match self.scan.get(path) {
                    Some(Member::Blob(d, n)) => (d.clone(), *n),
                    Some(Member::Small(b)) => {
                        let b = b.clone();
                        (self.staging.write_bytes(&b)?, b.len() as u64)
                    }
                    None => return Err(self.bad(format!("layer {} ({path}) is not in the archive", i + 1))),
                };
                let media_type = self.sniff_layer(&digest)?;
                if media_type == spec::OCI_LAYER_TAR && &digest != diff_id {
                    return Err(self.bad(format!(
                        "layer {} ({path}) hashes to {digest}, but the config says {diff_id}",
                        i + 1
                    )));
                }
                layers.push(Blob { media_type: media_type.into(), digest, size });
            }
            let manifest = Manifest {
                media_type: spec::OCI_MANIFEST,
                config: Blob { media_type: spec::OCI_CONFIG.into(), digest: config_digest, size: config_size as u64 },
                layers,
            };
            let doc = manifest.to_document().map_err(|e| self.bad(e.to_string()))?;
            let manifest_digest = self.staging.write_bytes(&doc)?;
            let mut names = Vec::new();
            for t in e.repo_tags.unwrap_or_default() {
                names.push(Some(t.parse::<Reference>().map_err(|e| self.bad(format!("RepoTags in manifest.json: {e}")))?));
            }
            if names.is_empty() {
                names.push(None);
            }
            found.push(Found { names, manifest_digest, manifest_size: doc.len() as u64, manifest });
        }
        Ok(found)
    }

    /// A layer's media type from its first bytes (`docker save` writes
    /// plain tars; a hand-made archive may hold compressed ones).
    fn sniff_layer(&self, d: &Digest) -> Result<&'static str> {
        let path = self.staging.path(d);
        let mut head = [0u8; 4];
        let n = File::open(&path).and_then(|mut f| f.read(&mut head)).map_err(Error::io(&path))?;
        Ok(match &head[..n] {
            [0x1f, 0x8b, ..] => spec::OCI_LAYER_GZIP,
            [0x28, 0xb5, 0x2f, 0xfd] => spec::OCI_LAYER_ZSTD,
            _ => spec::OCI_LAYER_TAR,
        })
    }
}

/// Whether a member is one of the small documents kept in memory.
fn is_document(name: &str) -> bool {
    name.ends_with(".json") || name == "oci-layout" || name == "repositories" || name.ends_with("/VERSION") || name.ends_with("/json")
}

/// A member name as a relative path with `/` separators, or `None` if it
/// leaves the archive's root or names the root itself.
fn normalize(p: &Path) -> Option<String> {
    let mut parts: Vec<String> = Vec::new();
    for c in p.components() {
        match c {
            Component::Normal(s) => parts.push(s.to_str()?.to_owned()),
            Component::CurDir => {}
            Component::ParentDir => {
                parts.pop()?;
            }
            Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    if parts.is_empty() {
        None
    } else {
        Some(parts.join("/"))
    }
}


#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes_member_names() {
        assert_eq!(normalize(Path::new("./blobs/sha256/x")).as_deref(), Some("blobs/sha256/x"));
        assert_eq!(normalize(Path::new("a/../b")).as_deref(), Some("b"));
        assert_eq!(normalize(Path::new("../b")), None);
        assert_eq!(normalize(Path::new("/etc/passwd")), None);
        assert_eq!(normalize(Path::new(".")), None);
    }
}
