//! Unpacking an image's layers from the layer disk into a container root.
//!
//! 1. The disk is mapped read-only (four system calls for the whole disk; no
//!    `read` copies in the guest kernel).
//! 2. The index is checked against the disk's size and every requested
//!    blob's sha256 is verified before anything is written.
//! 3. Each layer is decompressed (gzip, zstd or none, from its media type)
//!    and its tar entries applied in order by [`apply::Applier`], which never
//!    resolves a path outside the root.
//!
//! Limits ([`UnpackLimits`]) bound the file bytes and entries of all layers
//! together, checked from each header before anything is written, and the
//! decompressed stream itself (a decompression bomb ends as an error).

pub mod apply;
pub mod path;
pub mod tar;

use std::io::{self, Read};
use std::os::fd::AsFd;
use std::path::Path;

use vmrun_agent_protocol::UnpackLimits;
use vmrun_layerdisk::{Compression, Digest, LayerDisk};

use self::apply::{ApplyError, Applier};
use self::path::{PathError, Target};
use self::tar::{Kind, TarError, TarReader};
use crate::sys;

/// Size of the buffer file content passes through.
const BUF: usize = 1 << 20;

/// Why an image could not be unpacked.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    /// The layer disk cannot be opened.
    #[error("layer disk {path}: {err}")]
    Disk {
        /// Its path.
        path: String,
        /// What failed.
        err: io::Error,
    },
    /// The layer disk's index or a blob is bad.
    #[error(transparent)]
    LayerDisk(#[from] vmrun_layerdisk::Error),
    /// A blob is not a layer.
    #[error("layer {digest}: media type {media_type:?} is not a layer this agent unpacks")]
    MediaType {
        /// The blob.
        digest: Digest,
        /// Its media type.
        media_type: String,
    },
    /// The root directory cannot be opened.
    #[error("container root {path}: {err}")]
    Root {
        /// Its path.
        path: String,
        /// What failed.
        err: io::Error,
    },
    /// A layer is malformed, malicious or over the limits.
    #[error("layer {digest}: {what}")]
    Layer {
        /// The layer.
        digest: Digest,
        /// What is wrong.
        what: LayerError,
    },
}

/// What is wrong in a layer.
#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    /// The tar stream.
    #[error(transparent)]
    Tar(#[from] TarError),
    /// A path it names.
    #[error(transparent)]
    Path(#[from] PathError),
    /// Writing an entry.
    #[error(transparent)]
    Apply(#[from] ApplyError),
    /// A limit.
    #[error("{0}")]
    Limit(String),
}

/// What unpacking did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    /// Layers applied.
    pub layers: usize,
    /// Tar entries applied.
    pub entries: u64,
    /// Bytes of file content written.
    pub bytes: u64,
}

/// A reader that refuses to go past a bound.
struct Bounded<R> {
    inner: R,
    left: u64,
}

impl<R: Read> Read for Bounded<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.left == 0 {
            let mut probe = [0u8; 1];
            return match self.inner.read(&mut probe)? {
                0 => Ok(0),
                _ => Err(io::Error::other("decompressed layer exceeds the size limit (decompression bomb?)")),
            };
        }
        let want = (buf.len() as u64).min(self.left) as usize;
        let n = self.inner.read(&mut buf[..want])?;
        self.left -= n as u64;
        Ok(n)
    }
}

/// All frames of a zstd stream (image layers may hold several, and
/// skippable frames).
struct ZstdFrames<'a> {
    rest: &'a [u8],
    dec: Option<ruzstd::decoding::StreamingDecoder<&'a [u8], ruzstd::decoding::FrameDecoder>>,
}

impl Read for ZstdFrames<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            if let Some(d) = &mut self.dec {
                let n = d.read(buf)?;
                if n > 0 || buf.is_empty() {
                    return Ok(n);
                }
                if let Some(d) = self.dec.take() {
                    self.rest = d.into_inner();
                }
            }
            if self.rest.is_empty() {
                return Ok(0);
            }
            if self.rest.len() >= 8 && u32::from_le_bytes([self.rest[0], self.rest[1], self.rest[2], self.rest[3]]) & 0xffff_fff0 == 0x184d_2a50 {
                let len = u32::from_le_bytes([self.rest[4], self.rest[5], self.rest[6], self.rest[7]]) as usize;
                let end = 8usize.checked_add(len).filter(|&e| e <= self.rest.len()).ok_or_else(|| io::Error::other("truncated zstd skippable frame"))?;
                self.rest = &self.rest[end..];
                continue;
            }
            let d = ruzstd::decoding::StreamingDecoder::new(self.rest).map_err(io::Error::other)?;
            self.dec = Some(d);
        }
    }
}

/// Unpacks `layers` (lowest first) from the layer disk at `disk` into the
/// directory `root`.
pub fn unpack_from_disk(disk: &Path, layers: &[Digest], root: &Path, limits: UnpackLimits) -> Result<Stats, UnpackError> {
    let cpath = sys::cstring(disk.as_os_str().as_encoded_bytes())
        .map_err(|err| UnpackError::Disk { path: disk.display().to_string(), err })?;
    let open = || sys::Mapping::open(&cpath).map_err(|err| UnpackError::Disk { path: disk.display().to_string(), err });
    let mut map = open()?;
    // A VM restored from a snapshot gets its layer disk in place of the
    // template's placeholder: until the guest kernel has handled the
    // capacity change the host announced, the device looks smaller than
    // the disk's header says. Wait for it (a few seconds at most).
    let mut tries = 0;
    while map.bytes().len() < declared_size(map.bytes()) && tries < 200 {
        std::thread::sleep(std::time::Duration::from_millis(50));
        map = open()?;
        tries += 1;
    }
    unpack(map.bytes(), layers, root, limits)
}

/// The disk size a layer disk's header declares (0 if it has no header).
fn declared_size(disk: &[u8]) -> usize {
    disk.get(24..32)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .filter(|_| disk.starts_with(&vmrun_layerdisk::MAGIC))
        .map_or(0, |b| usize::try_from(u64::from_le_bytes(b)).unwrap_or(usize::MAX))
}

/// Unpacks `layers` from a layer disk held in memory into `root`.
pub fn unpack(disk: &[u8], layers: &[Digest], root: &Path, limits: UnpackLimits) -> Result<Stats, UnpackError> {
    let disk = LayerDisk::new(disk)?;
    // Verify every blob first: nothing is written from a disk that lies.
    let mut blobs = Vec::with_capacity(layers.len());
    for d in layers {
        let (entry, data) = disk.verified_blob(d)?;
        let c = Compression::from_media_type(&entry.media_type)
            .ok_or_else(|| UnpackError::MediaType { digest: *d, media_type: entry.media_type.clone() })?;
        blobs.push((*d, c, data));
    }
    let croot = sys::cstring(root.as_os_str().as_encoded_bytes())
        .map_err(|err| UnpackError::Root { path: root.display().to_string(), err })?;
    let rootfd = sys::open(&croot, libc::O_PATH | libc::O_DIRECTORY, 0)
        .map_err(|err| UnpackError::Root { path: root.display().to_string(), err })?;
    let mut applier = Applier::new(rootfd);
    let mut stats = Stats::default();
    let mut buf = vec![0u8; BUF];
    for (digest, compression, data) in blobs {
        let bound = limits.max_bytes.saturating_sub(stats.bytes).saturating_add(limits.max_entries.saturating_mul(1024)).saturating_add(16 << 20);
        let r: Box<dyn Read> = match compression {
            Compression::None => Box::new(data),
            Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(data)),
            Compression::Zstd => Box::new(ZstdFrames { rest: data, dec: None }),
        };
        let r = Bounded { inner: r, left: bound };
        apply_layer(&mut applier, r, &limits, &mut stats, &mut buf).map_err(|what| UnpackError::Layer { digest, what })?;
        stats.layers += 1;
    }
    Ok(stats)
}

fn apply_layer<R: Read>(a: &mut Applier, r: R, limits: &UnpackLimits, stats: &mut Stats, buf: &mut [u8]) -> Result<(), LayerError> {
    a.begin_layer();
    let mut t = TarReader::new(r);
    let mut headers_before = 0;
    while let Some(h) = t.next_entry()? {
        // Extension headers count against the entry limit too.
        stats.entries += t.headers - headers_before;
        headers_before = t.headers;
        if stats.entries > limits.max_entries {
            return Err(LayerError::Limit(format!("more than {} entries", limits.max_entries)));
        }
        match path::classify(&h.path)? {
            Target::Root | Target::Ignored => {}
            Target::Whiteout(p) => a.whiteout(&p)?,
            Target::Opaque(d) => a.opaque(&d)?,
            Target::Path(p) => match h.kind {
                Kind::File => {
                    if h.size > limits.max_bytes.saturating_sub(stats.bytes) {
                        return Err(LayerError::Limit(format!(
                            "{:?} ({} bytes) would exceed the limit of {} bytes of content",
                            String::from_utf8_lossy(&p),
                            h.size,
                            limits.max_bytes
                        )));
                    }
                    let fd = a.create_file(&p, &h)?;
                    loop {
                        let n = t.read_data(buf)?;
                        if n == 0 {
                            break;
                        }
                        sys::write_all(fd.as_fd(), &buf[..n])
                            .map_err(|err| ApplyError::Io { path: String::from_utf8_lossy(&p).into_owned(), err })?;
                    }
                    stats.bytes += h.size;
                    a.finish_file(&p, fd, &h)?;
                }
                Kind::Dir => a.dir(&p, &h)?,
                Kind::HardLink => {
                    let l = path::normalize(&h.link)?;
                    if l.is_empty() {
                        return Err(LayerError::Path(PathError::Empty));
                    }
                    a.special(&p, &h, Some(&l))?;
                }
                Kind::Symlink | Kind::Char | Kind::Block | Kind::Fifo => a.special(&p, &h, None)?,
            },
        }
    }
    a.end_layer()?;
    Ok(())
}

/// Removes a directory tree (a container's root that is not a mount).
pub fn remove_tree(path: &Path) -> io::Result<()> {
    let parent = path.parent().unwrap_or(Path::new("/"));
    let name = path.file_name().ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
    let pfd = sys::open(&sys::cstring(parent.as_os_str().as_encoded_bytes())?, libc::O_PATH | libc::O_DIRECTORY, 0)?;
    apply::remove_all(pfd.as_fd(), &sys::cstring(name.as_encoded_bytes())?, 0)
}
