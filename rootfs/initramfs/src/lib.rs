//! Initramfs archives in the cpio "newc" format the Linux kernel unpacks.
//!
//! Written in Rust rather than with `cpio(1)` so that device nodes (the
//! kernel needs `/dev/console` before it starts init) can be put in the
//! archive without creating them on the host, and so that archives are
//! byte-for-byte reproducible (fixed inode numbers, owners and times).

pub mod demo;

use std::io::{self, Write};

const MAGIC: &str = "070701";
const TRAILER: &str = "TRAILER!!!";
const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

/// Errors building an archive.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid path {0:?} in initramfs (relative, no '..', no empty parts)")]
    InvalidPath(String),
    #[error("file {0:?} is too large for a cpio archive")]
    TooLarge(String),
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// An archive being written.
#[derive(Debug)]
pub struct Archive<W: Write> {
    out: W,
    written: u64,
    next_ino: u32,
}

fn check_path(path: &str) -> Result<(), Error> {
    let ok = !path.is_empty()
        && !path.starts_with('/')
        && path.split('/').all(|p| !p.is_empty() && p != ".." && p != ".");
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidPath(path.to_string()))
    }
}

impl<W: Write> Archive<W> {
    /// Starts an archive written to `out`.
    pub fn new(out: W) -> Self {
        Self { out, written: 0, next_ino: 1 }
    }

    fn pad(&mut self, align: u64) -> io::Result<()> {
        let n = (align - self.written % align) % align;
        self.out.write_all(&vec![0u8; n as usize])?;
        self.written += n;
        Ok(())
    }

    fn entry(&mut self, name: &str, mode: u32, data: &[u8], rdev: (u32, u32)) -> Result<(), Error> {
        let size = u32::try_from(data.len()).map_err(|_| Error::TooLarge(name.to_string()))?;
        let ino = self.next_ino;
        self.next_ino += 1;
        let nlink = if mode & S_IFDIR != 0 { 2 } else { 1 };
        let header = format!(
            "{MAGIC}{ino:08X}{mode:08X}{:08X}{:08X}{nlink:08X}{:08X}{size:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}",
            0, // uid
            0, // gid
            0, // mtime
            0, // dev major
            0, // dev minor
            rdev.0,
            rdev.1,
            name.len() + 1,
            0, // checksum
        );
        self.out.write_all(header.as_bytes())?;
        self.out.write_all(name.as_bytes())?;
        self.out.write_all(&[0])?;
        self.written += (header.len() + name.len() + 1) as u64;
        self.pad(4)?;
        self.out.write_all(data)?;
        self.written += data.len() as u64;
        self.pad(4)?;
        Ok(())
    }

    /// Adds a directory.
    pub fn dir(&mut self, path: &str, perm: u32) -> Result<(), Error> {
        check_path(path)?;
        self.entry(path, S_IFDIR | (perm & 0o7777), &[], (0, 0))
    }

    /// Adds a regular file.
    pub fn file(&mut self, path: &str, perm: u32, data: &[u8]) -> Result<(), Error> {
        check_path(path)?;
        self.entry(path, S_IFREG | (perm & 0o7777), data, (0, 0))
    }

    /// Adds a symbolic link to `target`.
    pub fn symlink(&mut self, path: &str, target: &str) -> Result<(), Error> {
        check_path(path)?;
        self.entry(path, S_IFLNK | 0o777, target.as_bytes(), (0, 0))
    }

    /// Adds a character device node.
    pub fn char_device(&mut self, path: &str, perm: u32, major: u32, minor: u32) -> Result<(), Error> {
        check_path(path)?;
        self.entry(path, S_IFCHR | (perm & 0o7777), &[], (major, minor))
    }

    /// Writes the trailer, pads to 512 bytes and returns the writer.
    pub fn finish(mut self) -> Result<W, Error> {
        self.entry(TRAILER, 0, &[], (0, 0))?;
        self.pad(512)?;
        self.out.flush()?;
        Ok(self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads back (name, mode, data) triples, checking the format as the
    /// kernel's unpacker does.
    fn parse(mut b: &[u8]) -> Vec<(String, u32, Vec<u8>, u32)> {
        let total = b.len();
        let mut out = Vec::new();
        let hex = |s: &[u8]| u32::from_str_radix(std::str::from_utf8(s).unwrap(), 16).unwrap();
        loop {
            let off = total - b.len();
            assert_eq!(off % 4, 0);
            assert_eq!(&b[..6], b"070701");
            let mode = hex(&b[14..22]);
            let size = hex(&b[54..62]) as usize;
            let rdev_major = hex(&b[78..86]);
            let namesize = hex(&b[94..102]) as usize;
            let name = std::str::from_utf8(&b[110..110 + namesize - 1]).unwrap().to_string();
            assert_eq!(b[110 + namesize - 1], 0);
            let data_start = (off + 110 + namesize).div_ceil(4) * 4 - off;
            let data = b[data_start..data_start + size].to_vec();
            let next = (off + data_start + size).div_ceil(4) * 4 - off;
            b = &b[next..];
            if name == TRAILER {
                assert!(b.iter().all(|&x| x == 0));
                return out;
            }
            out.push((name, mode, data, rdev_major));
        }
    }

    #[test]
    fn round_trip() {
        let mut a = Archive::new(Vec::new());
        a.dir("dev", 0o755).unwrap();
        a.char_device("dev/console", 0o600, 5, 1).unwrap();
        a.file("init", 0o755, b"#!/bin/sh\necho hi\n").unwrap();
        a.symlink("bin/sh", "busybox").unwrap();
        let bytes = a.finish().unwrap();
        assert_eq!(bytes.len() % 512, 0);
        let e = parse(&bytes);
        assert_eq!(e.len(), 4);
        assert_eq!(e[0].0, "dev");
        assert_eq!(e[0].1, S_IFDIR | 0o755);
        assert_eq!((e[1].1, e[1].3), (S_IFCHR | 0o600, 5));
        assert_eq!(e[2].2, b"#!/bin/sh\necho hi\n");
        assert_eq!((e[3].1, e[3].2.as_slice()), (S_IFLNK | 0o777, &b"busybox"[..]));
    }

    #[test]
    fn bad_paths_are_refused() {
        let mut a = Archive::new(Vec::new());
        for p in ["", "/abs", "a/../b", "a//b", "./x"] {
            assert!(matches!(a.file(p, 0o644, b""), Err(Error::InvalidPath(_))), "{p:?}");
        }
    }

    #[test]
    fn reproducible() {
        let build = || {
            let mut a = Archive::new(Vec::new());
            a.file("x", 0o644, b"data").unwrap();
            a.finish().unwrap()
        };
        assert_eq!(build(), build());
    }
}
