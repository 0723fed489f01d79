//! The layer disk: how an image's layer blobs reach the guest.
//!
//! The host puts the blobs, byte for byte as the registry sent them
//! (compressed or not), on a read-only disk behind a small index. The agent
//! maps the disk, checks the index against the disk's size, verifies each
//! blob's sha256 before it reads a byte of it, and unpacks it.
//!
//! # Format, version 1
//!
//! All integers are little-endian. Offsets are from the start of the disk.
//!
//! | bytes | field |
//! | --- | --- |
//! | 0..8 | magic `b"vmrunLD\0"` |
//! | 8..12 | format version, `1` |
//! | 12..16 | number of blobs `n` (at most [`MAX_BLOBS`]) |
//! | 16..24 | start of the blob area: `64 + 256 n` rounded up to [`ALIGN`] |
//! | 24..32 | size of the whole disk (a multiple of [`ALIGN`]) |
//! | 32..64 | zero |
//! | 64.. | `n` index entries of [`ENTRY_LEN`] bytes |
//!
//! An index entry:
//!
//! | bytes | field |
//! | --- | --- |
//! | 0..32 | the blob's sha256 |
//! | 32..40 | offset of the blob (a multiple of [`ALIGN`], in the blob area) |
//! | 40..48 | size of the blob in bytes |
//! | 48..50 | length of the media type (at most [`MAX_MEDIA_TYPE`]) |
//! | 50..56 | zero |
//! | 56..256 | the media type (printable ASCII), zero padded |
//!
//! Blobs follow in index order, each at an [`ALIGN`]ed offset, with zeros in
//! between and after the last one. Aligned blobs keep the disk friendly to
//! the page cache: the agent reads it through one `mmap`.

use std::fmt;
use std::io::{self, Read, Write};
use std::str::FromStr;

use sha2::{Digest as _, Sha256};

/// The first eight bytes of a layer disk.
pub const MAGIC: [u8; 8] = *b"vmrunLD\0";
/// The format version this crate writes and reads.
pub const VERSION: u32 = 1;
/// Alignment of blobs and of the disk's size.
pub const ALIGN: u64 = 4096;
/// Size of the fixed header.
pub const HEADER_LEN: usize = 64;
/// Size of one index entry.
pub const ENTRY_LEN: usize = 256;
/// Most blobs one disk holds.
pub const MAX_BLOBS: usize = 1024;
/// Longest media type.
pub const MAX_MEDIA_TYPE: usize = ENTRY_LEN - 56;

/// Errors reading or writing a layer disk.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The disk does not start with the magic number.
    #[error("not a vmrun layer disk (bad magic number)")]
    BadMagic,
    /// The disk was written in another format version.
    #[error("layer disk format version {found}, this agent reads version {VERSION}")]
    Version {
        /// The version on the disk.
        found: u32,
    },
    /// The index is inconsistent or does not fit the disk.
    #[error("corrupt layer disk index: {0}")]
    Corrupt(String),
    /// A blob named in a request is not on the disk.
    #[error("blob {0} is not on the layer disk")]
    MissingBlob(Digest),
    /// A blob's content does not hash to its digest.
    #[error("blob {expected} does not match its digest (its content hashes to {actual})")]
    DigestMismatch {
        /// The digest in the index.
        expected: Digest,
        /// What the content hashes to.
        actual: Digest,
    },
    /// A blob given to the writer was shorter or longer than announced.
    #[error("blob {digest}: announced {announced} bytes, got {got}")]
    SizeMismatch {
        /// The blob.
        digest: Digest,
        /// The size it was announced with.
        announced: u64,
        /// The size it had.
        got: u64,
    },
    /// A media type is too long or not printable ASCII.
    #[error("invalid media type {0:?}")]
    MediaType(String),
    /// Too many blobs for one disk.
    #[error("{0} blobs, a layer disk holds at most {MAX_BLOBS}")]
    TooManyBlobs(usize),
    /// A digest string is not `sha256:` and 64 lower-case hex digits.
    #[error("invalid digest {0:?} (expected sha256: and 64 hex digits)")]
    BadDigest(String),
    /// Reading a blob or writing the disk failed.
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// A sha256 content digest, written `sha256:<64 hex digits>`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    /// The sha256 of `data`.
    pub fn of(data: &[u8]) -> Self {
        Self(Sha256::digest(data).into())
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("sha256:")?;
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for Digest {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        let bad = || Error::BadDigest(s.chars().take(80).collect());
        let hex = s.strip_prefix("sha256:").ok_or_else(bad)?;
        if hex.len() != 64 {
            return Err(bad());
        }
        let mut out = [0u8; 32];
        for (i, pair) in hex.as_bytes().chunks(2).enumerate() {
            let nib = |c: u8| match c {
                b'0'..=b'9' => Some(c - b'0'),
                b'a'..=b'f' => Some(c - b'a' + 10),
                _ => None,
            };
            out[i] = (nib(pair[0]).ok_or_else(bad)? << 4) | nib(pair[1]).ok_or_else(bad)?;
        }
        Ok(Self(out))
    }
}

impl serde::Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// How a layer blob is compressed, from its media type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// A plain tar.
    None,
    /// gzip.
    Gzip,
    /// zstd.
    Zstd,
}

impl Compression {
    /// The compression of a layer with this OCI or Docker media type, or
    /// `None` where the media type is not a layer this agent can unpack.
    pub fn from_media_type(media_type: &str) -> Option<Self> {
        match media_type {
            "application/vnd.oci.image.layer.v1.tar"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar"
            | "application/vnd.docker.image.rootfs.diff.tar" => Some(Self::None),
            "application/vnd.oci.image.layer.v1.tar+gzip"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
            | "application/vnd.docker.image.rootfs.diff.tar.gzip"
            | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => Some(Self::Gzip),
            "application/vnd.oci.image.layer.v1.tar+zstd"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd" => Some(Self::Zstd),
            _ => None,
        }
    }
}

/// One blob as the index describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Its sha256.
    pub digest: Digest,
    /// Its media type, as the image manifest gave it.
    pub media_type: String,
    /// Where it starts on the disk.
    pub offset: u64,
    /// Its size in bytes.
    pub size: u64,
}

/// The index of a layer disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Index {
    /// The blobs, in disk order.
    pub entries: Vec<Entry>,
    /// The size of the whole disk.
    pub disk_size: u64,
}

fn align_up(x: u64) -> Option<u64> {
    x.checked_add(ALIGN - 1).map(|v| v / ALIGN * ALIGN)
}

/// The start of the blob area for `n` blobs.
pub fn data_start(n: usize) -> u64 {
    // n <= MAX_BLOBS, so this cannot overflow.
    (HEADER_LEN as u64 + (n * ENTRY_LEN) as u64).div_ceil(ALIGN) * ALIGN
}

fn check_media_type(mt: &str) -> Result<(), Error> {
    if mt.is_empty() || mt.len() > MAX_MEDIA_TYPE || !mt.bytes().all(|b| (0x21..0x7f).contains(&b)) {
        return Err(Error::MediaType(mt.chars().take(MAX_MEDIA_TYPE + 8).collect()));
    }
    Ok(())
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

impl Index {
    /// Lays out `blobs` (digest, media type, size) one after the other.
    pub fn layout(blobs: &[(Digest, String, u64)]) -> Result<Self, Error> {
        if blobs.len() > MAX_BLOBS {
            return Err(Error::TooManyBlobs(blobs.len()));
        }
        let mut offset = data_start(blobs.len());
        let mut entries = Vec::with_capacity(blobs.len());
        for (digest, media_type, size) in blobs {
            check_media_type(media_type)?;
            entries.push(Entry { digest: *digest, media_type: media_type.clone(), offset, size: *size });
            offset = offset
                .checked_add(*size)
                .and_then(align_up)
                .ok_or_else(|| Error::Corrupt("blobs too large".into()))?;
        }
        Ok(Self { entries, disk_size: offset })
    }

    /// The header and index, padded to the start of the blob area.
    pub fn encode(&self) -> Vec<u8> {
        let n = self.entries.len();
        let mut out = vec![0u8; data_start(n) as usize];
        out[0..8].copy_from_slice(&MAGIC);
        out[8..12].copy_from_slice(&VERSION.to_le_bytes());
        out[12..16].copy_from_slice(&(n as u32).to_le_bytes());
        out[16..24].copy_from_slice(&data_start(n).to_le_bytes());
        out[24..32].copy_from_slice(&self.disk_size.to_le_bytes());
        for (i, e) in self.entries.iter().enumerate() {
            let b = &mut out[HEADER_LEN + i * ENTRY_LEN..HEADER_LEN + (i + 1) * ENTRY_LEN];
            b[0..32].copy_from_slice(&e.digest.0);
            b[32..40].copy_from_slice(&e.offset.to_le_bytes());
            b[40..48].copy_from_slice(&e.size.to_le_bytes());
            let mt = e.media_type.as_bytes();
            let len = mt.len().min(MAX_MEDIA_TYPE);
            b[48..50].copy_from_slice(&(len as u16).to_le_bytes());
            b[56..56 + len].copy_from_slice(&mt[..len]);
        }
        out
    }

    /// Parses and checks the index at the start of `disk` (the whole disk,
    /// or at least its first [`data_start`] bytes when `disk_len`, the
    /// disk's real size, is given separately).
    pub fn decode(disk: &[u8], disk_len: u64) -> Result<Self, Error> {
        let corrupt = |m: String| Error::Corrupt(m);
        if disk.len() < HEADER_LEN {
            return Err(if disk.len() >= 8 && disk[..8] != MAGIC { Error::BadMagic } else { corrupt("disk shorter than its header".into()) });
        }
        if disk[..8] != MAGIC {
            return Err(Error::BadMagic);
        }
        let version = u32_at(disk, 8);
        if version != VERSION {
            return Err(Error::Version { found: version });
        }
        let n = u32_at(disk, 12) as usize;
        if n > MAX_BLOBS {
            return Err(corrupt(format!("{n} blobs, at most {MAX_BLOBS}")));
        }
        let start = data_start(n);
        if u64_at(disk, 16) != start {
            return Err(corrupt(format!("blob area at {}, expected {start}", u64_at(disk, 16))));
        }
        let disk_size = u64_at(disk, 24);
        if disk_size > disk_len {
            return Err(corrupt(format!("index says {disk_size} bytes, the disk has {disk_len} (truncated?)")));
        }
        if disk_size < start || disk.len() < HEADER_LEN + n * ENTRY_LEN {
            return Err(corrupt("disk shorter than its index".into()));
        }
        let mut entries = Vec::with_capacity(n);
        let mut end_of_previous = start;
        for i in 0..n {
            let b = &disk[HEADER_LEN + i * ENTRY_LEN..HEADER_LEN + (i + 1) * ENTRY_LEN];
            let mut d = [0u8; 32];
            d.copy_from_slice(&b[0..32]);
            let offset = u64_at(b, 32);
            let size = u64_at(b, 40);
            let len = u16::from_le_bytes([b[48], b[49]]) as usize;
            if len > MAX_MEDIA_TYPE {
                return Err(corrupt(format!("blob {i}: media type of {len} bytes")));
            }
            let media_type = std::str::from_utf8(&b[56..56 + len])
                .map_err(|_| corrupt(format!("blob {i}: media type is not ASCII")))?
                .to_string();
            check_media_type(&media_type)?;
            let end = offset.checked_add(size).ok_or_else(|| corrupt(format!("blob {i}: size overflows")))?;
            if offset % ALIGN != 0 || offset < end_of_previous || end > disk_size {
                return Err(corrupt(format!(
                    "blob {i} at {offset}+{size} is outside the blob area, unaligned or overlaps the previous one"
                )));
            }
            end_of_previous = end;
            entries.push(Entry { digest: Digest(d), media_type, offset, size });
        }
        Ok(Self { entries, disk_size })
    }

    /// The entry of the blob with this digest.
    pub fn find(&self, digest: &Digest) -> Result<&Entry, Error> {
        self.entries.iter().find(|e| e.digest == *digest).ok_or(Error::MissingBlob(*digest))
    }
}

/// A layer disk already in memory (in the agent: mapped from the device).
#[derive(Debug)]
pub struct LayerDisk<'a> {
    bytes: &'a [u8],
    index: Index,
}

impl<'a> LayerDisk<'a> {
    /// Checks the index of the disk held in `bytes`.
    pub fn new(bytes: &'a [u8]) -> Result<Self, Error> {
        let index = Index::decode(bytes, bytes.len() as u64)?;
        Ok(Self { bytes, index })
    }

    /// The index.
    pub fn index(&self) -> &Index {
        &self.index
    }

    /// The blob with this digest, after checking its content against the
    /// digest.
    pub fn verified_blob(&self, digest: &Digest) -> Result<(&Entry, &'a [u8]), Error> {
        let e = self.index.find(digest)?;
        // Index::decode checked offset + size <= disk_size <= bytes.len().
        let data = &self.bytes[e.offset as usize..(e.offset + e.size) as usize];
        let actual = Digest::of(data);
        if actual != e.digest {
            return Err(Error::DigestMismatch { expected: e.digest, actual });
        }
        Ok((e, data))
    }
}

/// A blob to put on a disk.
#[derive(Debug)]
pub struct Blob<R> {
    /// Its digest, as the image manifest gives it.
    pub digest: Digest,
    /// Its media type.
    pub media_type: String,
    /// Its size.
    pub size: u64,
    /// Its content.
    pub data: R,
}

/// Writes a layer disk holding `blobs` to `out` and returns its index.
///
/// Each blob's content is hashed as it is copied and checked against its
/// digest and size: the host never ships a blob the agent would refuse.
/// On error, what was written is garbage.
pub fn write<W: Write, R: Read>(out: &mut W, blobs: &mut [Blob<R>]) -> Result<Index, Error> {
    let specs: Vec<_> = blobs.iter().map(|b| (b.digest, b.media_type.clone(), b.size)).collect();
    let index = Index::layout(&specs)?;
    let head = index.encode();
    out.write_all(&head)?;
    let mut pos = head.len() as u64;
    let mut buf = vec![0u8; 1 << 20];
    let zeros = [0u8; ALIGN as usize];
    for (blob, entry) in blobs.iter_mut().zip(&index.entries) {
        let pad = entry.offset - pos;
        out.write_all(&zeros[..pad as usize])?;
        let mut hasher = Sha256::new();
        let mut got = 0u64;
        loop {
            let n = match blob.data.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            };
            got += n as u64;
            if got > blob.size {
                return Err(Error::SizeMismatch { digest: blob.digest, announced: blob.size, got });
            }
            hasher.update(&buf[..n]);
            out.write_all(&buf[..n])?;
        }
        if got != blob.size {
            return Err(Error::SizeMismatch { digest: blob.digest, announced: blob.size, got });
        }
        let actual = Digest(hasher.finalize().into());
        if actual != blob.digest {
            return Err(Error::DigestMismatch { expected: blob.digest, actual });
        }
        pos = entry.offset + entry.size;
    }
    out.write_all(&zeros[..(index.disk_size - pos) as usize])?;
    out.flush()?;
    Ok(index)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GZ: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

    fn disk(blobs: &[&[u8]]) -> (Vec<u8>, Index) {
        let mut bs: Vec<_> = blobs
            .iter()
            .map(|d| Blob { digest: Digest::of(d), media_type: GZ.into(), size: d.len() as u64, data: *d })
            .collect();
        let mut out = Vec::new();
        let index = write(&mut out, &mut bs).unwrap();
        (out, index)
    }

    #[test]
    fn digest_round_trip_and_refusals() {
        let d = Digest::of(b"abc");
        let s = d.to_string();
        assert_eq!(s, "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        assert_eq!(s.parse::<Digest>().unwrap(), d);
        for bad in ["", "sha256:", "md5:ba78", &s.to_uppercase(), &s[..70], &format!("{s}0"), "sha256:zz16bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"] {
            assert!(bad.parse::<Digest>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn round_trip() {
        let (bytes, index) = disk(&[b"first blob", b"", &[7u8; 5000]]);
        assert_eq!(bytes.len() as u64, index.disk_size);
        assert_eq!(bytes.len() as u64 % ALIGN, 0);
        let d = LayerDisk::new(&bytes).unwrap();
        assert_eq!(d.index(), &index);
        assert_eq!(index.entries.len(), 3);
        for (e, want) in index.entries.iter().zip([&b"first blob"[..], b"", &[7u8; 5000]]) {
            assert_eq!(e.offset % ALIGN, 0);
            let (_, got) = d.verified_blob(&e.digest).unwrap();
            assert_eq!(got, want);
        }
        assert!(matches!(d.verified_blob(&Digest::of(b"other")), Err(Error::MissingBlob(_))));
    }

    #[test]
    fn corrupt_blob_is_caught() {
        let (mut bytes, index) = disk(&[b"payload"]);
        bytes[index.entries[0].offset as usize] ^= 1;
        let d = LayerDisk::new(&bytes).unwrap();
        assert!(matches!(d.verified_blob(&index.entries[0].digest), Err(Error::DigestMismatch { .. })));
    }

    #[test]
    fn truncated_disk_is_refused() {
        let (bytes, _) = disk(&[&[1u8; 10000]]);
        let err = LayerDisk::new(&bytes[..8192]).unwrap_err();
        assert!(err.to_string().contains("truncated"), "{err}");
        assert!(matches!(LayerDisk::new(&bytes[..10]), Err(Error::Corrupt(_))));
    }

    #[test]
    fn bad_headers_are_refused() {
        let (bytes, _) = disk(&[b"x"]);
        let mut b = bytes.clone();
        b[0] = b'X';
        assert!(matches!(LayerDisk::new(&b), Err(Error::BadMagic)));
        let mut b = bytes.clone();
        b[8] = 2;
        let e = LayerDisk::new(&b).unwrap_err();
        assert!(e.to_string().contains("version 2"), "{e}");
        let mut b = bytes.clone();
        b[12..16].copy_from_slice(&5000u32.to_le_bytes());
        assert!(matches!(LayerDisk::new(&b), Err(Error::Corrupt(_))));
        // A blob pointing into the index, or past the end.
        for off in [0u64, 4095, u64::MAX - 2] {
            let mut b = bytes.clone();
            b[64 + 32..64 + 40].copy_from_slice(&off.to_le_bytes());
            assert!(matches!(LayerDisk::new(&b), Err(Error::Corrupt(_))), "offset {off}");
        }
        let mut b = bytes.clone();
        b[64 + 40..64 + 48].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(LayerDisk::new(&b), Err(Error::Corrupt(_))));
    }

    #[test]
    fn overlapping_blobs_are_refused() {
        let (bytes, index) = disk(&[&[1u8; 100], &[2u8; 100]]);
        let mut b = bytes.clone();
        let e1 = 64 + ENTRY_LEN;
        b[e1 + 32..e1 + 40].copy_from_slice(&index.entries[0].offset.to_le_bytes());
        assert!(matches!(LayerDisk::new(&b), Err(Error::Corrupt(_))));
    }

    #[test]
    fn writer_checks_what_it_ships() {
        let mut out = Vec::new();
        let mut bad = [Blob { digest: Digest::of(b"other"), media_type: GZ.into(), size: 4, data: &b"data"[..] }];
        assert!(matches!(write(&mut out, &mut bad), Err(Error::DigestMismatch { .. })));
        let mut short = [Blob { digest: Digest::of(b"data"), media_type: GZ.into(), size: 9, data: &b"data"[..] }];
        assert!(matches!(write(&mut Vec::new(), &mut short), Err(Error::SizeMismatch { .. })));
        let mut long = [Blob { digest: Digest::of(b"data"), media_type: GZ.into(), size: 2, data: &b"data"[..] }];
        assert!(matches!(write(&mut Vec::new(), &mut long), Err(Error::SizeMismatch { .. })));
        let mut badmt = [Blob { digest: Digest::of(b"data"), media_type: "a b".into(), size: 4, data: &b"data"[..] }];
        assert!(matches!(write(&mut Vec::new(), &mut badmt), Err(Error::MediaType(_))));
    }

    #[test]
    fn media_types() {
        assert_eq!(Compression::from_media_type(GZ), Some(Compression::Gzip));
        assert_eq!(Compression::from_media_type("application/vnd.oci.image.layer.v1.tar+zstd"), Some(Compression::Zstd));
        assert_eq!(Compression::from_media_type("application/vnd.docker.image.rootfs.diff.tar"), Some(Compression::None));
        assert_eq!(Compression::from_media_type("application/vnd.oci.image.config.v1+json"), None);
    }
}
