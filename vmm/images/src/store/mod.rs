//! The image store: an OCI image layout on disk, shared safely by
//! concurrent `vmrun` processes.
//!
//! ```text
//! <store>/oci-layout            {"imageLayoutVersion":"1.0.0"}
//! <store>/index.json            one descriptor per image name, its name in the
//!                               org.opencontainers.image.ref.name annotation
//!                               (the full reference: docker.io/library/busybox:latest)
//! <store>/blobs/sha256/<hex>    manifests, configs and layers, by digest
//! <store>/tmp/.tmp-*/           staging directories of running pulls and loads
//! <store>/locks/gc              shared by pulls, loads and rmi; exclusive for GC
//! <store>/locks/index           exclusive while index.json is rewritten
//! ```
//!
//! Because the layout is a standard OCI layout, other tools read it
//! (`skopeo inspect oci:<store>:docker.io/library/busybox:latest`).
//!
//! Crash safety: a blob enters `blobs/` only by a rename of a file that was
//! verified against its digest and size and flushed to disk; `index.json`
//! is replaced the same way, after the blobs it names. A crash leaves at
//! worst unreferenced blobs and temporary files, which GC removes.

mod fsutil;
pub mod lock;
pub(crate) mod staging;

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io::Read;
use std::path::{Path, PathBuf};

use oci_spec::image::{Descriptor, ImageIndex, MediaType};

use crate::digest::{digest_reader, Digest, DigestError};
use crate::error::{Error, Result};
use crate::image::{Image, ImageConfig, ImageSummary, Layer};
use crate::reference::Reference;
use crate::spec::{self, Blob, ConfigFile, Manifest, Parsed, MAX_DOCUMENT_SIZE};
use fsutil::{write_atomic, TEMP_PREFIX};
use lock::{FileLock, Mode};

const LAYOUT_FILE: &str = "oci-layout";
const LAYOUT_CONTENT: &[u8] = br#"{"imageLayoutVersion":"1.0.0"}"#;
const INDEX_FILE: &str = "index.json";
/// The index is refused beyond this size.
const MAX_INDEX_SIZE: u64 = 64 << 20;

/// The data directory: `$VMRUN_HOME`, else `/var/lib/vmrun` for root, else
/// `$XDG_DATA_HOME/vmrun` or `~/.local/share/vmrun`. `None` when no
/// variable says where a user's home is.
pub fn default_home() -> Option<PathBuf> {
    if let Some(h) = std::env::var_os("VMRUN_HOME").filter(|h| !h.is_empty()) {
        return Some(PathBuf::from(h));
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return Some(PathBuf::from("/var/lib/vmrun"));
    }
    if let Some(x) = std::env::var_os("XDG_DATA_HOME").filter(|h| !h.is_empty()) {
        return Some(PathBuf::from(x).join("vmrun"));
    }
    std::env::var_os("HOME").filter(|h| !h.is_empty()).map(|h| PathBuf::from(h).join(".local/share/vmrun"))
}

/// The image store's directory: `images/` in [`default_home`].
pub fn default_store_dir() -> Option<PathBuf> {
    default_home().map(|h| h.join("images"))
}

/// One entry of the store's index: an image, by name or unnamed.
#[derive(Debug, Clone)]
pub(crate) struct IndexEntry {
    pub reference: Option<Reference>,
    /// The manifest's digest: the descriptor's, as the store's key.
    pub digest: Digest,
    /// The entry as `index.json` has it (its `ref.name` annotation is
    /// rewritten from `reference` when the index is written).
    pub descriptor: Descriptor,
}

impl IndexEntry {
    /// An entry for a manifest vmrun stored.
    pub(crate) fn new(reference: Option<Reference>, manifest: Blob) -> Result<Self, DigestError> {
        let descriptor = manifest.descriptor()?;
        Ok(Self { reference, digest: manifest.digest, descriptor })
    }
}

/// What [`Store::remove`] untagged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Removed {
    /// The name removed (`None` for an unnamed image).
    pub reference: Option<Reference>,
    /// The manifest it pointed to.
    pub manifest_digest: Digest,
}

/// What [`Store::gc`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcReport {
    /// The blobs deleted.
    pub removed: Vec<Digest>,
    /// Bytes freed by deleting blobs and temporary files.
    pub freed_bytes: u64,
    /// Temporary files and staging directories left by failed or killed
    /// operations, deleted.
    pub temp_removed: usize,
}

/// An image store in a directory. Cheap to open; every method re-reads the
/// index, so several `Store`s (in one process or many) on one directory
/// stay consistent.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

impl Store {
    /// Opens the store in `root`, creating it if needed, and removes what
    /// crashed operations left behind if no other operation is running.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self> {
        let store = Self { root: root.into() };
        for d in [store.root.clone(), store.blobs_dir(), store.tmp_dir(), store.locks_dir()] {
            fs::create_dir_all(&d).map_err(Error::io(&d))?;
        }
        {
            let _gc = store.lock_gc(Mode::Shared)?;
            let _index = store.lock_index(Mode::Exclusive)?;
            let layout = store.root.join(LAYOUT_FILE);
            if !layout.exists() {
                write_atomic(&layout, LAYOUT_CONTENT).map_err(Error::io(&layout))?;
            }
            if !store.index_path().exists() {
                store.write_index(&[])?;
            }
        }
        if let Some(_gc) = store.try_lock_gc()? {
            store.remove_temp_files()?;
        }
        Ok(store)
    }

    /// The store's directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where the blob with `digest` is (whether or not it is there).
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.blobs_dir().join(digest.hex())
    }

    pub(crate) fn blobs_dir(&self) -> PathBuf {
        self.root.join("blobs").join("sha256")
    }

    pub(crate) fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    fn locks_dir(&self) -> PathBuf {
        self.root.join("locks")
    }

    fn index_path(&self) -> PathBuf {
        self.root.join(INDEX_FILE)
    }

    pub(crate) fn lock_gc(&self, mode: Mode) -> Result<FileLock> {
        let p = self.locks_dir().join("gc");
        FileLock::acquire(&p, mode).map_err(Error::io(p))
    }

    fn try_lock_gc(&self) -> Result<Option<FileLock>> {
        let p = self.locks_dir().join("gc");
        FileLock::try_acquire(&p, Mode::Exclusive).map_err(Error::io(p))
    }

    pub(crate) fn lock_index(&self, mode: Mode) -> Result<FileLock> {
        let p = self.locks_dir().join("index");
        FileLock::acquire(&p, mode).map_err(Error::io(p))
    }

    // ----- the index -----

    pub(crate) fn read_index(&self) -> Result<Vec<IndexEntry>> {
        let path = self.index_path();
        let bad = |reason: String| Error::BadStore { path: path.clone(), reason };
        let mut bytes = Vec::new();
        File::open(&path)
            .and_then(|f| f.take(MAX_INDEX_SIZE + 1).read_to_end(&mut bytes))
            .map_err(Error::io(&path))?;
        if bytes.len() as u64 > MAX_INDEX_SIZE {
            return Err(bad(format!("larger than {MAX_INDEX_SIZE} bytes")));
        }
        let index: ImageIndex = serde_json::from_slice(&bytes).map_err(|e| bad(format!("not an OCI index: {}", spec::one_line(&e))))?;
        index
            .manifests()
            .iter()
            .cloned()
            .enumerate()
            .map(|(i, descriptor)| {
                let digest = Digest::from_oci(descriptor.digest()).map_err(|e| bad(format!("entry {}: {e}", i + 1)))?;
                let name = descriptor.annotations().as_ref().and_then(|a| a.get(spec::ANNOTATION_REF_NAME));
                Ok(IndexEntry { reference: name.and_then(|n| n.parse().ok()), digest, descriptor })
            })
            .collect()
    }

    /// Rewrites `index.json`; the caller holds the index lock.
    pub(crate) fn write_index(&self, entries: &[IndexEntry]) -> Result<()> {
        let manifests = entries
            .iter()
            .map(|e| {
                let mut d = e.descriptor.clone();
                let mut annotations = d.annotations().clone().unwrap_or_default();
                annotations.remove(spec::ANNOTATION_REF_NAME);
                if let Some(r) = &e.reference {
                    annotations.insert(spec::ANNOTATION_REF_NAME.into(), r.to_string());
                }
                d.set_annotations(Some(annotations).filter(|a| !a.is_empty()));
                d
            })
            .collect();
        let mut index = ImageIndex::default();
        index.set_media_type(Some(MediaType::ImageIndex)).set_manifests(manifests);
        let mut bytes = serde_json::to_vec_pretty(&index).map_err(|e| Error::BadStore {
            path: self.index_path(),
            reason: e.to_string(),
        })?;
        bytes.push(b'\n');
        let path = self.index_path();
        write_atomic(&path, &bytes).map_err(Error::io(path))
    }

    // ----- blobs -----

    /// Whether the store has the blob with exactly this content and size.
    pub(crate) fn blob_is_valid(&self, digest: &Digest, size: u64) -> bool {
        let path = self.blob_path(digest);
        let Ok(mut f) = File::open(&path) else { return false };
        if f.metadata().map(|m| m.len()).ok() != Some(size) {
            return false;
        }
        digest_reader(&mut f).is_ok_and(|(d, n)| &d == digest && n == size)
    }

    /// Reads a small blob (a manifest or config) and checks its digest.
    fn read_document(&self, digest: &Digest, what: &str) -> Result<Vec<u8>> {
        let path = self.blob_path(digest);
        let corrupt = |reason: String| Error::CorruptBlob { digest: digest.clone(), what: what.into(), reason };
        let f = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::MissingBlob { digest: digest.clone(), what: what.into() })
            }
            Err(e) => return Err(Error::Io { path, source: e }),
        };
        let mut bytes = Vec::new();
        f.take(MAX_DOCUMENT_SIZE + 1).read_to_end(&mut bytes).map_err(Error::io(&path))?;
        if bytes.len() as u64 > MAX_DOCUMENT_SIZE {
            return Err(corrupt(format!("larger than {MAX_DOCUMENT_SIZE} bytes")));
        }
        let actual = Digest::of(&bytes);
        if &actual != digest {
            return Err(corrupt(format!("its content hashes to {actual}")));
        }
        Ok(bytes)
    }

    /// The manifest at `digest` (an index in the store, which other tools
    /// may write, is followed to its linux/amd64 manifest).
    fn read_manifest(&self, digest: &Digest) -> Result<(Digest, Manifest)> {
        let mut digest = digest.clone();
        for _ in 0..2 {
            let bytes = self.read_document(&digest, "manifest")?;
            let bad = |problem| Error::StoreManifest { path: self.blob_path(&digest), problem };
            match spec::parse_manifest(&bytes, None).map_err(bad)? {
                Parsed::Manifest(m) => return Ok((digest, m)),
                Parsed::Index(ms) => {
                    let platform = |problem| Error::Platform { image: format!("index {digest}"), problem };
                    let d = spec::select_platform(&ms).map_err(platform)?;
                    digest = Blob::of(d, "its linux/amd64 entry").map_err(bad)?.digest;
                }
            }
        }
        Err(Error::BadStore { path: self.blob_path(&digest), reason: "an index inside an index".into() })
    }

    fn read_config(&self, manifest: &Manifest) -> Result<ConfigFile> {
        let d = &manifest.config.digest;
        let bytes = self.read_document(d, "config")?;
        if bytes.len() as u64 != manifest.config.size {
            return Err(Error::CorruptBlob {
                digest: d.clone(),
                what: "config".into(),
                reason: format!("{} bytes, the manifest says {}", bytes.len(), manifest.config.size),
            });
        }
        serde_json::from_slice(&bytes)
            .map_err(|e| Error::BadStore { path: self.blob_path(d), reason: format!("not an image config: {e}") })
    }

    /// Builds the [`Image`] for a manifest: manifest and config are read and
    /// their digests checked; each layer blob must be there with its size.
    pub(crate) fn image(&self, manifest_digest: &Digest, reference: Option<Reference>) -> Result<Image> {
        let (manifest_digest, manifest) = self.read_manifest(manifest_digest)?;
        let config = self.read_config(&manifest)?;
        let mut layers = Vec::with_capacity(manifest.layers.len());
        for (i, l) in manifest.layers.iter().enumerate() {
            let path = self.blob_path(&l.digest);
            let what = format!("layer {}", i + 1);
            match fs::metadata(&path) {
                Ok(m) if m.len() == l.size => {}
                Ok(m) => {
                    return Err(Error::CorruptBlob {
                        digest: l.digest.clone(),
                        what,
                        reason: format!("{} bytes, the manifest says {}", m.len(), l.size),
                    })
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Err(Error::MissingBlob { digest: l.digest.clone(), what })
                }
                Err(e) => return Err(Error::Io { path, source: e }),
            }
            layers.push(Layer { digest: l.digest.clone(), media_type: l.media_type.clone(), size: l.size, path });
        }
        Ok(Image {
            reference,
            manifest_digest,
            config_digest: manifest.config.digest.clone(),
            config: ImageConfig::from(config),
            layers,
        })
    }

    // ----- the public API -----

    /// Finds an image by reference (`busybox`, `localhost:5000/app:1`,
    /// `busybox@sha256:...`) or by image ID (a prefix of at least 4 hex
    /// digits of the config digest, `sha256:` optional), the way `docker
    /// run` does. The manifest's and config's digests are checked, and each
    /// layer's size; [`Store::verify`] checks the layers' digests too.
    pub fn resolve(&self, name: &str) -> Result<Image> {
        let entries = self.read_index()?;
        if let Some(i) = self.find(&entries, name)?.first() {
            let e = &entries[*i];
            return self.image(&e.digest, e.reference.clone());
        }
        Err(Error::NotFound(name.into()))
    }

    /// Finds an image by reference.
    pub fn get(&self, reference: &Reference) -> Result<Image> {
        self.resolve(&reference.to_string())
    }

    /// Indexes of the entries `name` selects: the one named so, or all
    /// those of the image whose ID starts with it. An unparseable name that
    /// is not an ID is a reference error.
    fn find(&self, entries: &[IndexEntry], name: &str) -> Result<Vec<usize>> {
        let parsed = name.parse::<Reference>();
        if let Ok(r) = &parsed {
            let hits: Vec<usize> = (0..entries.len()).filter(|&i| matches_reference(&entries[i], r)).collect();
            if !hits.is_empty() {
                return Ok(hits);
            }
        }
        let hex = name.strip_prefix("sha256:").unwrap_or(name);
        let is_id = hex.len() >= 4 && hex.len() <= 64 && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if !is_id {
            return parsed.map(|_| Vec::new()).map_err(Error::from);
        }
        let mut ids = BTreeSet::new();
        let mut hits = Vec::new();
        for (i, e) in entries.iter().enumerate() {
            let Ok((_, m)) = self.read_manifest(&e.digest) else { continue };
            if m.config.digest.hex().starts_with(hex) {
                ids.insert(m.config.digest.clone());
                hits.push(i);
            }
        }
        if ids.len() > 1 {
            return Err(Error::Ambiguous(name.into()));
        }
        Ok(hits)
    }

    /// Checks every layer of `image` against its digest (reading all of
    /// them). The guest checks them again before it unpacks them.
    pub fn verify(&self, image: &Image) -> Result<()> {
        for (i, l) in image.layers.iter().enumerate() {
            let what = format!("layer {}", i + 1);
            let mut f = match File::open(&l.path) {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Err(Error::MissingBlob { digest: l.digest.clone(), what })
                }
                Err(e) => return Err(Error::Io { path: l.path.clone(), source: e }),
            };
            let (d, n) = digest_reader(&mut f).map_err(Error::io(&l.path))?;
            if d != l.digest || n != l.size {
                return Err(Error::CorruptBlob {
                    digest: l.digest.clone(),
                    what,
                    reason: format!("its {n} bytes hash to {d}"),
                });
            }
        }
        Ok(())
    }

    /// Every image in the store, in the index's order (oldest first). An
    /// image whose manifest is damaged is listed without its config digest.
    pub fn list(&self) -> Result<Vec<ImageSummary>> {
        let entries = self.read_index()?;
        Ok(entries
            .into_iter()
            .map(|e| {
                let found = self.read_manifest(&e.digest).ok();
                let created = found.as_ref().and_then(|(_, m)| self.read_config(m).ok()).and_then(|c| c.created);
                ImageSummary {
                    reference: e.reference,
                    manifest_digest: e.digest,
                    config_digest: found.as_ref().map(|(_, m)| m.config.digest.clone()),
                    size: found.map_or(0, |(_, m)| m.layers.iter().map(|l| l.size).sum()),
                    created,
                }
            })
            .collect())
    }

    /// Removes a name (`busybox:latest`), or all names of an image ID, from
    /// the index. Blobs stay until [`Store::gc`].
    pub fn remove(&self, name: &str) -> Result<Vec<Removed>> {
        let _gc = self.lock_gc(Mode::Shared)?;
        let _index = self.lock_index(Mode::Exclusive)?;
        let mut entries = self.read_index()?;
        let hits = self.find(&entries, name)?;
        if hits.is_empty() {
            return Err(Error::NotFound(name.into()));
        }
        let mut removed = Vec::new();
        for i in hits.into_iter().rev() {
            let e = entries.remove(i);
            removed.push(Removed { reference: e.reference, manifest_digest: e.digest });
        }
        removed.reverse();
        self.write_index(&entries)?;
        Ok(removed)
    }

    /// Removes every name of the image with this manifest digest from the
    /// index (nothing if it has none). Blobs stay until [`Store::gc`].
    pub fn remove_manifest(&self, digest: &Digest) -> Result<Vec<Removed>> {
        let _gc = self.lock_gc(Mode::Shared)?;
        let _index = self.lock_index(Mode::Exclusive)?;
        let mut entries = self.read_index()?;
        let mut removed = Vec::new();
        entries.retain(|e| {
            let hit = &e.digest == digest;
            if hit {
                removed.push(Removed { reference: e.reference.clone(), manifest_digest: e.digest.clone() });
            }
            !hit
        });
        if !removed.is_empty() {
            self.write_index(&entries)?;
        }
        Ok(removed)
    }

    /// Gives the image `name` finds a further name, as `docker tag` does
    /// (the name moves if another image had it).
    pub fn tag(&self, name: &str, new: &Reference) -> Result<()> {
        let _gc = self.lock_gc(Mode::Shared)?;
        let _index = self.lock_index(Mode::Exclusive)?;
        let mut entries = self.read_index()?;
        let mut entry = match self.find(&entries, name)?.first() {
            Some(&i) => entries[i].clone(),
            None => return Err(Error::NotFound(name.into())),
        };
        entries.retain(|e| e.reference.as_ref() != Some(new));
        entry.reference = Some(new.clone());
        entries.push(entry);
        self.write_index(&entries)
    }

    /// Deletes every blob no image in the index refers to, and the
    /// leftovers of crashed operations. Waits for running pulls and loads
    /// to end.
    pub fn gc(&self) -> Result<GcReport> {
        let _gc = self.lock_gc(Mode::Exclusive)?;
        self.collect()
    }

    /// Like [`Store::gc`], but returns `None` at once if a pull, load or
    /// removal is running.
    pub fn try_gc(&self) -> Result<Option<GcReport>> {
        match self.try_lock_gc()? {
            Some(_gc) => self.collect().map(Some),
            None => Ok(None),
        }
    }

    /// The blobs the index refers to.
    fn reachable(&self) -> Result<BTreeSet<Digest>> {
        let mut keep = BTreeSet::new();
        for e in self.read_index()? {
            let mut todo = vec![e.digest];
            while let Some(d) = todo.pop() {
                if !keep.insert(d.clone()) {
                    continue;
                }
                // A damaged document keeps only itself.
                let Ok(bytes) = self.read_document(&d, "manifest") else { continue };
                match spec::parse_manifest(&bytes, None) {
                    Ok(Parsed::Manifest(m)) => {
                        keep.insert(m.config.digest);
                        keep.extend(m.layers.into_iter().map(|l| l.digest));
                    }
                    // An entry whose digest is not sha256 names no blob here.
                    Ok(Parsed::Index(ms)) => todo.extend(ms.iter().filter_map(|m| Digest::from_oci(m.digest()).ok())),
                    Err(_) => {}
                }
            }
        }
        Ok(keep)
    }

    /// GC proper; the caller holds the GC lock exclusively.
    fn collect(&self) -> Result<GcReport> {
        let keep = self.reachable()?;
        let mut report = GcReport::default();
        let dir = self.blobs_dir();
        for entry in fs::read_dir(&dir).map_err(Error::io(&dir))? {
            let entry = entry.map_err(Error::io(&dir))?;
            let name = entry.file_name();
            let digest = name.to_str().and_then(|n| Digest::from_hex(n).ok());
            if digest.as_ref().is_some_and(|d| keep.contains(d)) {
                continue;
            }
            let len = entry.metadata().map(|m| m.len()).unwrap_or(0);
            let path = entry.path();
            let removed = if entry.file_type().is_ok_and(|t| t.is_dir()) {
                fs::remove_dir_all(&path)
            } else {
                fs::remove_file(&path)
            };
            removed.map_err(Error::io(&path))?;
            report.freed_bytes += len;
            match digest {
                Some(d) => report.removed.push(d),
                None => report.temp_removed += 1,
            }
        }
        let (n, bytes) = self.remove_temp_files()?;
        report.temp_removed += n;
        report.freed_bytes += bytes;
        Ok(report)
    }

    /// Removes staging directories and temporary files; the caller holds the
    /// GC lock exclusively, so none of them belongs to a live operation.
    fn remove_temp_files(&self) -> Result<(usize, u64)> {
        let mut n = 0;
        let mut bytes = 0;
        let tmp = self.tmp_dir();
        for entry in fs::read_dir(&tmp).map_err(Error::io(&tmp))? {
            let entry = entry.map_err(Error::io(&tmp))?;
            bytes += dir_size(&entry.path());
            let path = entry.path();
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                fs::remove_dir_all(&path).map_err(Error::io(&path))?;
            } else {
                fs::remove_file(&path).map_err(Error::io(&path))?;
            }
            n += 1;
        }
        for entry in fs::read_dir(&self.root).map_err(Error::io(&self.root))? {
            let entry = entry.map_err(Error::io(&self.root))?;
            if entry.file_name().to_string_lossy().starts_with(TEMP_PREFIX) {
                let path = entry.path();
                bytes += dir_size(&path);
                fs::remove_file(&path).map_err(Error::io(&path))?;
                n += 1;
            }
        }
        Ok((n, bytes))
    }
}

fn matches_reference(e: &IndexEntry, r: &Reference) -> bool {
    let Some(er) = &e.reference else { return false };
    if er == r {
        return true;
    }
    // `name@digest` also finds the image pulled by tag whose manifest (or
    // the index it came from) has that digest.
    match r.digest() {
        Some(d) => er.name() == r.name() && (&e.digest == d || er.digest() == Some(d)),
        None => false,
    }
}

/// The bytes in a file or a directory tree (best effort).
fn dir_size(path: &Path) -> u64 {
    let Ok(m) = fs::symlink_metadata(path) else { return 0 };
    if !m.is_dir() {
        return m.len();
    }
    fs::read_dir(path).map_or(0, |rd| rd.flatten().map(|e| dir_size(&e.path())).sum())
}
