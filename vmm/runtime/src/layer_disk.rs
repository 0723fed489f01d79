//! Putting an image's layer blobs on a disk for the guest, byte for byte as
//! the registry sent them, behind the index the agent reads
//! (`vmrun_layerdisk`). The host never parses a layer: the agent in the
//! guest verifies and unpacks them.
//!
//! A disk is built once per image (its manifest digest names it) and shared
//! read-only by every VM that runs the image.

use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use vmrun_images::Image;
use vmrun_layerdisk::{Digest, Index};

use crate::lock::Lock;
use crate::{Error, Result};

fn digest_of(d: &str) -> Option<Digest> {
    let hex = d.strip_prefix("sha256:")?;
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(Digest(out))
}

/// The file name of the layer disk of the image with this manifest digest
/// (`sha256-<hex>.disk`).
pub fn file_name(manifest_digest: &str) -> String {
    format!("{}.disk", manifest_digest.replace(':', "-"))
}

/// The manifest digest a layer disk's file name stands for, if it is one
/// of an image's.
pub fn manifest_digest_of(file_name: &str) -> Option<String> {
    let hex = file_name.strip_prefix("sha256-")?.strip_suffix(".disk")?;
    (hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit())).then(|| format!("sha256:{hex}"))
}

/// The lock file of a layer disk: held shared by a run from before the
/// disk is looked at until its VM's agent answers, exclusively (without
/// waiting) by whatever removes the disk.
pub fn lock_path(disk: &Path) -> PathBuf {
    let name = disk.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    disk.with_file_name(format!(".{name}.lock"))
}

/// The layer disk of `image` under `dir`, built if missing. Returns its
/// path and the layers' digests in order.
pub fn for_image(dir: &Path, image: &Image) -> Result<(PathBuf, Vec<Digest>)> {
    use_for_image(dir, image).map(|(path, digests, _lock)| (path, digests))
}

/// [`for_image`], with a shared lock on the disk that keeps it from being
/// removed (by `vmrun rmi` or `vmrun system prune`) while it is held: hand
/// it to [`crate::vm::VmProcess::hold_until_ready`].
pub fn use_for_image(dir: &Path, image: &Image) -> Result<(PathBuf, Vec<Digest>, Lock)> {
    let path = dir.join(file_name(&image.manifest_digest.to_string()));
    std::fs::create_dir_all(dir)?;
    let lock = Lock::shared(&lock_path(&path))?;
    let (path, digests) = build(dir, image, path)?;
    Ok((path, digests, lock))
}

/// Removes the layer disk of the image with this manifest digest after its
/// unpack failed in a guest, so that the next run builds it again from the
/// store (unless a run is starting with it right now). Returns whether it
/// was removed.
pub fn discard(dir: &Path, manifest_digest: &str) -> bool {
    let path = dir.join(file_name(manifest_digest));
    match Lock::try_take(&lock_path(&path)) {
        Ok(Some(_lock)) => std::fs::remove_file(&path).is_ok(),
        _ => false,
    }
}

fn build(dir: &Path, image: &Image, path: PathBuf) -> Result<(PathBuf, Vec<Digest>)> {
    let name = image.manifest_digest.to_string().replace(':', "-");
    let err = |reason: String| Error::LayerDisk { path: path.clone(), reason };
    let mut blobs = Vec::with_capacity(image.layers.len());
    for l in &image.layers {
        let d = digest_of(&l.digest.to_string()).ok_or_else(|| err(format!("layer digest {} is not sha256", l.digest)))?;
        blobs.push((d, l.media_type.clone(), l.size));
    }
    let digests: Vec<Digest> = blobs.iter().map(|b| b.0).collect();
    if path.is_file() {
        return Ok((path, digests));
    }
    std::fs::create_dir_all(dir)?;
    let index = Index::layout(&blobs).map_err(|e| err(e.to_string()))?;
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let result = (|| -> std::io::Result<()> {
        let mut f = File::create(&tmp)?;
        f.write_all(&index.encode())?;
        for (entry, layer) in index.entries.iter().zip(&image.layers) {
            f.seek(SeekFrom::Start(entry.offset))?;
            let mut src = File::open(&layer.path)?;
            let copied = std::io::copy(&mut src, &mut f)?;
            if copied != entry.size {
                return Err(std::io::Error::other(format!(
                    "layer {} has {copied} bytes, {} expected",
                    layer.digest, entry.size
                )));
            }
        }
        f.set_len(index.disk_size)?;
        f.sync_all()
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(err(e.to_string()));
    }
    std::fs::rename(&tmp, &path).map_err(|e| err(e.to_string()))?;
    Ok((path, digests))
}

/// A layer disk that holds no layers, under `dir` (written once): for VMs
/// whose container root comes from elsewhere (the OCI runtime attaches a
/// bundle's root file system as a disk of its own), so that the agent
/// finds a valid, empty index in the layer disk slot.
pub fn empty(dir: &Path) -> Result<PathBuf> {
    let path = dir.join("empty.disk");
    if path.is_file() {
        return Ok(path);
    }
    let err = |reason: String| Error::LayerDisk { path: path.clone(), reason };
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".empty.{}.tmp", std::process::id()));
    let result = (|| -> std::io::Result<()> {
        let mut f = File::create(&tmp)?;
        vmrun_layerdisk::write::<_, std::io::Empty>(&mut f, &mut []).map_err(|e| std::io::Error::other(e.to_string()))?;
        f.sync_all()
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(err(e.to_string()));
    }
    std::fs::rename(&tmp, &path).map_err(|e| err(e.to_string()))?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn an_empty_disk_has_a_valid_index_and_no_layers() {
        let dir = std::env::temp_dir().join(format!("vmrun-empty-disk-{}", std::process::id()));
        let path = empty(&dir).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let disk = vmrun_layerdisk::LayerDisk::new(&bytes).unwrap();
        assert!(disk.index().entries.is_empty());
        assert_eq!(empty(&dir).unwrap(), path, "written once");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_discarded_disk_goes_unless_a_run_holds_it() {
        let dir = std::env::temp_dir().join(format!("vmrun-discard-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let digest = format!("sha256:{}", "cd".repeat(32));
        let path = dir.join(file_name(&digest));
        std::fs::write(&path, b"index").unwrap();
        let held = Lock::shared(&lock_path(&path)).unwrap();
        assert!(!discard(&dir, &digest), "removed while a run starts with it");
        assert!(path.is_file());
        drop(held);
        assert!(discard(&dir, &digest));
        assert!(!path.exists());
        assert_eq!(manifest_digest_of(&file_name(&digest)), Some(digest));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn digests_parse() {
        let hex = "ab".repeat(32);
        assert_eq!(digest_of(&format!("sha256:{hex}")), Some(Digest([0xab; 32])));
        assert_eq!(digest_of(&format!("sha512:{hex}")), None);
        assert_eq!(digest_of("sha256:abc"), None);
        assert_eq!(digest_of(&format!("sha256:{}", "zz".repeat(32))), None);
    }
}
