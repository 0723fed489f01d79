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

/// The layer disk of `image` under `dir`, built if missing. Returns its
/// path and the layers' digests in order.
pub fn for_image(dir: &Path, image: &Image) -> Result<(PathBuf, Vec<Digest>)> {
    let name = image.manifest_digest.to_string().replace(':', "-");
    let path = dir.join(format!("{name}.disk"));
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
    fn digests_parse() {
        let hex = "ab".repeat(32);
        assert_eq!(digest_of(&format!("sha256:{hex}")), Some(Digest([0xab; 32])));
        assert_eq!(digest_of(&format!("sha512:{hex}")), None);
        assert_eq!(digest_of("sha256:abc"), None);
        assert_eq!(digest_of(&format!("sha256:{}", "zz".repeat(32))), None);
    }
}
