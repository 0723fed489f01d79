//! A tar reader for image layers, with hard bounds.
//!
//! Reads ustar, GNU (long names, base-256 numbers) and PAX (path,
//! linkpath, size, uid, gid, mtime, `SCHILY.xattr.*`) headers. Every
//! extension header is bounded ([`MAX_EXTENSION`]) before it is read into
//! memory; sparse files and unknown entry types are refused.

use std::io::{self, Read};

/// Largest PAX or GNU long-name header read into memory.
pub const MAX_EXTENSION: u64 = 1 << 20;
/// Longest path or link target.
pub const MAX_PATH: usize = 4096;
const BLOCK: usize = 512;

/// Errors reading a tar stream.
#[derive(Debug, thiserror::Error)]
pub enum TarError {
    /// The stream is not a valid tar.
    #[error("corrupt tar: {0}")]
    Corrupt(String),
    /// A valid tar feature the agent does not unpack.
    #[error("unsupported tar entry: {0}")]
    Unsupported(String),
    /// Reading (decompressing) the stream failed.
    #[error("reading the layer: {0}")]
    Io(#[from] io::Error),
}

/// What an entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A regular file.
    File,
    /// A hard link to `link`.
    HardLink,
    /// A symbolic link to `link`.
    Symlink,
    /// A character device.
    Char,
    /// A block device.
    Block,
    /// A directory.
    Dir,
    /// A named pipe.
    Fifo,
}

/// One entry's header, extensions applied.
#[derive(Debug, Clone)]
pub struct Header {
    /// Path as stored (not yet checked).
    pub path: Vec<u8>,
    /// Link target for links.
    pub link: Vec<u8>,
    /// What it is.
    pub kind: Kind,
    /// Permission bits (with setuid, setgid, sticky).
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Modification time, seconds.
    pub mtime: i64,
    /// Size of the content (regular files only).
    pub size: u64,
    /// Device numbers.
    pub dev: (u32, u32),
    /// Extended attributes (`SCHILY.xattr.*`).
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

#[derive(Default)]
struct Pending {
    path: Option<Vec<u8>>,
    link: Option<Vec<u8>>,
    size: Option<u64>,
    uid: Option<u32>,
    gid: Option<u32>,
    mtime: Option<i64>,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

/// Reads a tar stream entry by entry.
#[derive(Debug)]
pub struct TarReader<R> {
    r: R,
    /// Content bytes of the current entry not yet read.
    left: u64,
    /// Padding after the current entry's content.
    pad: u64,
    done: bool,
    /// Headers read, extensions included.
    pub headers: u64,
}

fn corrupt(m: impl Into<String>) -> TarError {
    TarError::Corrupt(m.into())
}

fn cstr_field(b: &[u8]) -> &[u8] {
    let n = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    &b[..n]
}

/// Parses a numeric header field: octal text, or GNU base-256.
fn number(field: &[u8], what: &str) -> Result<u64, TarError> {
    if let Some(&first) = field.first() {
        if first & 0x80 != 0 {
            if first == 0xff {
                return Err(corrupt(format!("negative {what}")));
            }
            let mut v: u64 = u64::from(first & 0x7f);
            for &b in &field[1..] {
                if v >> 56 != 0 {
                    return Err(corrupt(format!("{what} too large")));
                }
                v = (v << 8) | u64::from(b);
            }
            return Ok(v);
        }
    }
    let s = cstr_field(field);
    let s: Vec<u8> = s.iter().copied().skip_while(|&c| c == b' ').take_while(|&c| c != b' ').collect();
    if s.is_empty() {
        return Ok(0);
    }
    let mut v: u64 = 0;
    for c in s {
        if !(b'0'..=b'7').contains(&c) {
            return Err(corrupt(format!("bad {what} field")));
        }
        v = v.checked_mul(8).and_then(|v| v.checked_add(u64::from(c - b'0'))).ok_or_else(|| corrupt(format!("{what} too large")))?;
    }
    Ok(v)
}

fn checksum_ok(h: &[u8; BLOCK]) -> Result<bool, TarError> {
    let want = number(&h[148..156], "checksum")?;
    let mut unsigned: u64 = 0;
    let mut signed: i64 = 0;
    for (i, &b) in h.iter().enumerate() {
        let b = if (148..156).contains(&i) { b' ' } else { b };
        unsigned += u64::from(b);
        signed += i64::from(b as i8);
    }
    Ok(want == unsigned || want as i64 == signed)
}

fn to_u32(v: u64, what: &str) -> Result<u32, TarError> {
    u32::try_from(v).map_err(|_| corrupt(format!("{what} {v} out of range")))
}

fn parse_pax(data: &[u8], p: &mut Pending) -> Result<(), TarError> {
    let mut rest = data;
    while !rest.is_empty() {
        let sp = rest.iter().position(|&c| c == b' ').ok_or_else(|| corrupt("PAX record without length"))?;
        let len: usize = std::str::from_utf8(&rest[..sp])
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| corrupt("bad PAX record length"))?;
        if len <= sp + 1 || len > rest.len() || rest[len - 1] != b'\n' {
            return Err(corrupt("bad PAX record"));
        }
        let rec = &rest[sp + 1..len - 1];
        rest = &rest[len..];
        let eq = rec.iter().position(|&c| c == b'=').ok_or_else(|| corrupt("PAX record without ="))?;
        let (key, value) = (&rec[..eq], &rec[eq + 1..]);
        let num = |what: &str| -> Result<u64, TarError> {
            std::str::from_utf8(value).ok().and_then(|s| s.parse().ok()).ok_or_else(|| corrupt(format!("bad PAX {what}")))
        };
        match key {
            b"path" => p.path = Some(value.to_vec()),
            b"linkpath" => p.link = Some(value.to_vec()),
            b"size" => p.size = Some(num("size")?),
            b"uid" => p.uid = Some(to_u32(num("uid")?, "uid")?),
            b"gid" => p.gid = Some(to_u32(num("gid")?, "gid")?),
            b"mtime" => {
                // Seconds, maybe with a fraction (and maybe negative).
                let s = std::str::from_utf8(value).map_err(|_| corrupt("bad PAX mtime"))?;
                let whole = s.split('.').next().unwrap_or("");
                p.mtime = Some(whole.parse().map_err(|_| corrupt("bad PAX mtime"))?);
            }
            k if k.starts_with(b"SCHILY.xattr.") => p.xattrs.push((k[13..].to_vec(), value.to_vec())),
            k if k.starts_with(b"GNU.sparse.") => return Err(TarError::Unsupported("sparse file (PAX)".into())),
            _ => {}
        }
    }
    Ok(())
}

impl<R: Read> TarReader<R> {
    /// Reads the tar stream `r`.
    pub fn new(r: R) -> Self {
        Self { r, left: 0, pad: 0, done: false, headers: 0 }
    }

    fn read_block(&mut self, b: &mut [u8; BLOCK]) -> Result<bool, TarError> {
        let mut got = 0;
        while got < BLOCK {
            match self.r.read(&mut b[got..]) {
                Ok(0) if got == 0 => return Ok(false),
                Ok(0) => return Err(corrupt("truncated header")),
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(true)
    }

    fn skip(&mut self, mut n: u64) -> Result<(), TarError> {
        let mut buf = [0u8; 8192];
        while n > 0 {
            let want = n.min(buf.len() as u64) as usize;
            let got = self.r.read(&mut buf[..want])?;
            if got == 0 {
                return Err(corrupt("truncated entry"));
            }
            n -= got as u64;
        }
        Ok(())
    }

    fn read_extension(&mut self, size: u64) -> Result<Vec<u8>, TarError> {
        if size > MAX_EXTENSION {
            return Err(corrupt(format!("extension header of {size} bytes (limit {MAX_EXTENSION})")));
        }
        let mut v = vec![0u8; size as usize];
        self.r.read_exact(&mut v).map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof => corrupt("truncated extension header"),
            _ => TarError::Io(e),
        })?;
        self.skip((BLOCK as u64 - size % BLOCK as u64) % BLOCK as u64)?;
        Ok(v)
    }

    /// The next entry, or `None` at the end of the archive. Unread content
    /// of the previous entry is skipped.
    pub fn next_entry(&mut self) -> Result<Option<Header>, TarError> {
        if self.done {
            return Ok(None);
        }
        self.skip(self.left + self.pad)?;
        self.left = 0;
        self.pad = 0;
        let mut pending = Pending::default();
        let mut b = [0u8; BLOCK];
        loop {
            if !self.read_block(&mut b)? {
                // A stream that ends without the two zero blocks: accept,
                // as most unpackers do, but only between entries.
                self.done = true;
                return if pending.path.is_some() || pending.link.is_some() || pending.size.is_some() {
                    Err(corrupt("archive ends after an extension header"))
                } else {
                    Ok(None)
                };
            }
            if b.iter().all(|&c| c == 0) {
                self.done = true;
                return Ok(None);
            }
            self.headers += 1;
            if !checksum_ok(&b)? {
                return Err(corrupt("header checksum mismatch"));
            }
            let size = number(&b[124..136], "size")?;
            let flag = b[156];
            match flag {
                b'x' => {
                    let data = self.read_extension(size)?;
                    parse_pax(&data, &mut pending)?;
                    continue;
                }
                b'g' => {
                    // Global PAX header: bounded, read and ignored.
                    self.read_extension(size)?;
                    continue;
                }
                b'L' | b'K' => {
                    let data = self.read_extension(size)?;
                    let name = cstr_field(&data).to_vec();
                    if flag == b'L' {
                        pending.path = Some(name);
                    } else {
                        pending.link = Some(name);
                    }
                    continue;
                }
                _ => {}
            }
            let kind = match flag {
                b'0' | 0 | b'7' => Kind::File,
                b'1' => Kind::HardLink,
                b'2' => Kind::Symlink,
                b'3' => Kind::Char,
                b'4' => Kind::Block,
                b'5' => Kind::Dir,
                b'6' => Kind::Fifo,
                b'S' => return Err(TarError::Unsupported("GNU sparse file".into())),
                other => return Err(TarError::Unsupported(format!("entry type {:?}", other as char))),
            };
            let ustar = &b[257..263] == b"ustar\0";
            let path = match pending.path.take() {
                Some(p) => p,
                None => {
                    let name = cstr_field(&b[0..100]);
                    let prefix = cstr_field(&b[345..500]);
                    if ustar && !prefix.is_empty() {
                        let mut p = prefix.to_vec();
                        p.push(b'/');
                        p.extend_from_slice(name);
                        p
                    } else {
                        name.to_vec()
                    }
                }
            };
            let link = pending.link.take().unwrap_or_else(|| cstr_field(&b[157..257]).to_vec());
            if path.len() > MAX_PATH || link.len() > MAX_PATH {
                return Err(corrupt("path longer than 4096 bytes"));
            }
            let size = pending.size.unwrap_or(size);
            let h = Header {
                path,
                link,
                kind,
                mode: (number(&b[100..108], "mode")? & 0o7777) as u32,
                uid: match pending.uid {
                    Some(u) => u,
                    None => to_u32(number(&b[108..116], "uid")?, "uid")?,
                },
                gid: match pending.gid {
                    Some(g) => g,
                    None => to_u32(number(&b[116..124], "gid")?, "gid")?,
                },
                mtime: match pending.mtime {
                    Some(m) => m,
                    None => i64::try_from(number(&b[136..148], "mtime")?).map_err(|_| corrupt("mtime out of range"))?,
                },
                size: if kind == Kind::File { size } else { 0 },
                dev: (to_u32(number(&b[329..337], "device major")?, "major")?, to_u32(number(&b[337..345], "device minor")?, "minor")?),
                xattrs: std::mem::take(&mut pending.xattrs),
            };
            // Content follows regular files only; other entries' sizes
            // (hard links may carry one) are skipped.
            self.left = size;
            self.pad = (BLOCK as u64 - size % BLOCK as u64) % BLOCK as u64;
            return Ok(Some(h));
        }
    }

    /// Reads content of the current entry; 0 at its end.
    pub fn read_data(&mut self, buf: &mut [u8]) -> Result<usize, TarError> {
        if self.left == 0 {
            return Ok(0);
        }
        let want = self.left.min(buf.len() as u64) as usize;
        let n = loop {
            match self.r.read(&mut buf[..want]) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        };
        if n == 0 {
            return Err(corrupt("truncated file content"));
        }
        self.left -= n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build(f: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        f(&mut b);
        b.into_inner().unwrap()
    }

    fn header(kind: tar::EntryType, size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_size(size);
        h.set_mode(0o644);
        h.set_mtime(1_700_000_000);
        h
    }

    fn read_all(bytes: &[u8]) -> Result<Vec<(Header, Vec<u8>)>, TarError> {
        let mut t = TarReader::new(bytes);
        let mut out = Vec::new();
        while let Some(h) = t.next_entry()? {
            let mut data = Vec::new();
            let mut buf = [0u8; 7];
            loop {
                let n = t.read_data(&mut buf)?;
                if n == 0 {
                    break;
                }
                data.extend_from_slice(&buf[..n]);
            }
            out.push((h, data));
        }
        Ok(out)
    }

    #[test]
    fn reads_what_the_tar_crate_writes() {
        let long = format!("{}/file", "d".repeat(150));
        let bytes = build(|b| {
            let mut h = header(tar::EntryType::Directory, 0);
            h.set_mode(0o755);
            b.append_data(&mut h, "dir/", &[][..]).unwrap();
            let mut h = header(tar::EntryType::Regular, 11);
            h.set_uid(1000);
            h.set_gid(2000);
            b.append_data(&mut h, "dir/hello.txt", &b"hello world"[..]).unwrap();
            let mut h = header(tar::EntryType::Regular, 3);
            b.append_data(&mut h, &long, &b"abc"[..]).unwrap();
            let mut h = header(tar::EntryType::Symlink, 0);
            b.append_link(&mut h, "dir/link", "hello.txt").unwrap();
            let mut h = header(tar::EntryType::Link, 0);
            b.append_link(&mut h, "dir/hard", "dir/hello.txt").unwrap();
            let mut h = header(tar::EntryType::Char, 0);
            h.set_device_major(1).unwrap();
            h.set_device_minor(3).unwrap();
            b.append_data(&mut h, "dev/null", &[][..]).unwrap();
        });
        let e = read_all(&bytes).unwrap();
        assert_eq!(e.len(), 6);
        assert_eq!((e[0].0.kind, e[0].0.mode, e[0].0.path.as_slice()), (Kind::Dir, 0o755, &b"dir/"[..]));
        assert_eq!((e[1].0.uid, e[1].0.gid, e[1].0.mtime), (1000, 2000, 1_700_000_000));
        assert_eq!(e[1].1, b"hello world");
        assert_eq!(e[2].0.path, long.as_bytes());
        assert_eq!(e[2].1, b"abc");
        assert_eq!((e[3].0.kind, e[3].0.link.as_slice()), (Kind::Symlink, &b"hello.txt"[..]));
        assert_eq!(e[4].0.kind, Kind::HardLink);
        assert_eq!((e[5].0.kind, e[5].0.dev), (Kind::Char, (1, 3)));
    }

    #[test]
    fn pax_overrides_and_xattrs() {
        let bytes = build(|b| {
            let mut h = header(tar::EntryType::Regular, 4);
            b.append_pax_extensions([("path", &b"pax/name"[..]), ("mtime", b"123.5"), ("SCHILY.xattr.user.k", b"v")]).unwrap();
            b.append_data(&mut h, "short", &b"data"[..]).unwrap();
        });
        let e = read_all(&bytes).unwrap();
        assert_eq!(e[0].0.path, b"pax/name");
        assert_eq!(e[0].0.mtime, 123);
        assert_eq!(e[0].0.xattrs, vec![(b"user.k".to_vec(), b"v".to_vec())]);
    }

    #[test]
    fn corruption_is_caught() {
        let bytes = build(|b| {
            let mut h = header(tar::EntryType::Regular, 600);
            b.append_data(&mut h, "f", &[1u8; 600][..]).unwrap();
        });
        let mut bad = bytes.clone();
        bad[10] ^= 1;
        assert!(matches!(read_all(&bad), Err(TarError::Corrupt(m)) if m.contains("checksum")));
        // Cut inside the content.
        assert!(matches!(read_all(&bytes[..700]), Err(TarError::Corrupt(_))));
        // Cut inside a header.
        assert!(matches!(read_all(&bytes[..100]), Err(TarError::Corrupt(_))));
    }

    #[test]
    fn oversized_extensions_are_refused_before_reading() {
        let mut h = header(tar::EntryType::XHeader, MAX_EXTENSION + 1);
        h.set_path("pax").unwrap();
        h.set_cksum();
        let mut bytes = h.as_bytes().to_vec();
        bytes.extend_from_slice(&[0u8; 1024]);
        assert!(matches!(read_all(&bytes), Err(TarError::Corrupt(m)) if m.contains("extension")));
    }

    #[test]
    fn sparse_and_unknown_types_are_refused() {
        for t in [b'S', b'V', b'Z'] {
            let mut h = header(tar::EntryType::new(t), 0);
            h.set_path("x").unwrap();
            h.set_cksum();
            let mut bytes = h.as_bytes().to_vec();
            bytes.extend_from_slice(&[0u8; 1024]);
            assert!(matches!(read_all(&bytes), Err(TarError::Unsupported(_))));
        }
    }

    #[test]
    fn numbers() {
        assert_eq!(number(b"0000644\0", "x").unwrap(), 0o644);
        assert_eq!(number(b"  644 \0", "x").unwrap(), 0o644);
        assert_eq!(number(b"\0\0\0", "x").unwrap(), 0);
        assert_eq!(number(&[0x80, 0, 0, 0, 0, 0, 1, 0], "x").unwrap(), 256);
        assert!(number(b"0009", "x").is_err());
        assert!(number(&[0xff, 0xff], "x").is_err());
    }
}
