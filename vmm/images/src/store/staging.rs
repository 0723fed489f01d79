//! A staging area: where a pull or a load writes and verifies blobs before
//! they enter the store.
//!
//! Each operation gets its own directory under `tmp/` and holds the store's
//! GC lock shared while it lives, so garbage collection neither deletes the
//! blobs it relies on nor its directory. Blobs are checked against their
//! digest and size and flushed to disk here; `commit` then renames the ones
//! the new images need into `blobs/sha256/` and rewrites `index.json`. An
//! operation that fails, or a process that dies, leaves only its staging
//! directory behind, which the next GC (or `Store::open`) removes: the
//! store itself is as it was.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{self, BufWriter, Read, Write};
use std::path::PathBuf;

use super::fsutil::{create_new, sync_dir, unique_name};
use super::lock::{FileLock, Mode};
use super::{IndexEntry, Store};
use crate::digest::{Digest, HashingWriter};
use crate::error::{Error, Result};

/// Why a blob could not be staged, for the caller to word for its source.
#[derive(Debug)]
pub(crate) enum StageError {
    /// Writing the store's own files failed.
    Store(Error),
    /// Reading the source failed.
    Read(io::Error),
    /// The source sent more than `limit` bytes.
    TooLong { limit: u64 },
    /// The source ended after `got` of `expected` bytes.
    Short { got: u64, expected: u64 },
    /// The content does not hash to the digest it was declared with.
    Digest { expected: Digest, actual: Digest },
}

impl StageError {
    /// A one-line description, naming the blob as `what`.
    pub(crate) fn describe(&self, what: &str) -> String {
        match self {
            Self::Store(e) => e.to_string(),
            Self::Read(e) => format!("reading {what}: {e}"),
            Self::TooLong { limit } => format!("{what} is longer than the {limit} bytes it should have"),
            Self::Short { got, expected } => format!("{what} ended after {got} of its {expected} bytes"),
            Self::Digest { expected, actual } => {
                format!("{what} should have digest {expected} but its content hashes to {actual}")
            }
        }
    }
}

/// An operation's staging directory.
#[derive(Debug)]
pub(crate) struct Staging<'s> {
    store: &'s Store,
    dir: PathBuf,
    staged: BTreeMap<Digest, u64>,
    _gc: FileLock,
}

impl<'s> Staging<'s> {
    pub(crate) fn new(store: &'s Store) -> Result<Self> {
        let gc = store.lock_gc(Mode::Shared)?;
        let dir = store.tmp_dir().join(unique_name(""));
        fs::create_dir(&dir).map_err(Error::io(&dir))?;
        Ok(Self { store, dir, staged: BTreeMap::new(), _gc: gc })
    }

    /// Whether the blob is staged, or in the store with the right content.
    pub(crate) fn have(&self, digest: &Digest, size: u64) -> bool {
        self.staged.get(digest) == Some(&size) || self.store.blob_is_valid(digest, size)
    }

    /// Whether the blob is staged by this operation.
    pub(crate) fn is_staged(&self, digest: &Digest) -> bool {
        self.staged.contains_key(digest)
    }

    /// Where a staged blob is, else where the store keeps it.
    pub(crate) fn path(&self, digest: &Digest) -> PathBuf {
        if self.staged.contains_key(digest) {
            self.dir.join(digest.hex())
        } else {
            self.store.blob_path(digest)
        }
    }

    /// Reads a staged (or stored) blob of at most `limit` bytes, checking its
    /// digest.
    pub(crate) fn read(&self, digest: &Digest, limit: u64) -> io::Result<Vec<u8>> {
        let path = self.path(digest);
        let f = fs::File::open(&path)?;
        let mut bytes = Vec::new();
        f.take(limit + 1).read_to_end(&mut bytes)?;
        if bytes.len() as u64 > limit {
            return Err(io::Error::other(format!("blob {digest} is larger than {limit} bytes")));
        }
        if Digest::of(&bytes) != *digest {
            return Err(io::Error::other(format!("blob {digest} does not match its digest")));
        }
        Ok(bytes)
    }

    /// Copies a blob from `reader` into the staging area. With `expected`,
    /// the content must have that digest and size (reading stops one byte
    /// past the size); without, at most `limit` bytes are read. Returns
    /// the digest and size.
    pub(crate) fn write(
        &mut self,
        reader: &mut dyn Read,
        expected: Option<(&Digest, u64)>,
        limit: u64,
    ) -> Result<(Digest, u64), StageError> {
        let tmp = self.dir.join(unique_name(".blob"));
        let result = self.write_file(&tmp, reader, expected, limit);
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    fn write_file(
        &mut self,
        tmp: &PathBuf,
        reader: &mut dyn Read,
        expected: Option<(&Digest, u64)>,
        limit: u64,
    ) -> Result<(Digest, u64), StageError> {
        let io_err = |e| StageError::Store(Error::Io { path: tmp.clone(), source: e });
        let file = create_new(tmp).map_err(io_err)?;
        let mut w = HashingWriter::new(BufWriter::with_capacity(1 << 16, file));
        let cap = expected.map_or(limit, |(_, size)| size);
        let mut buf = vec![0u8; 1 << 16];
        let mut count: u64 = 0;
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(StageError::Read(e)),
            };
            count += n as u64;
            if count > cap {
                return Err(StageError::TooLong { limit: cap });
            }
            w.write_all(&buf[..n]).map_err(io_err)?;
        }
        let (digest, size, bw) = w.finish();
        let file = bw.into_inner().map_err(|e| io_err(e.into_error()))?;
        if let Some((want, want_size)) = expected {
            if size < want_size {
                return Err(StageError::Short { got: size, expected: want_size });
            }
            if digest != *want {
                return Err(StageError::Digest { expected: want.clone(), actual: digest });
            }
        }
        file.sync_all().map_err(io_err)?;
        drop(file);
        let dest = self.dir.join(digest.hex());
        fs::rename(tmp, &dest).map_err(|e| StageError::Store(Error::Io { path: dest, source: e }))?;
        self.staged.insert(digest.clone(), size);
        Ok((digest, size))
    }

    /// Stages `bytes` (a document made here, such as a converted manifest).
    pub(crate) fn write_bytes(&mut self, bytes: &[u8]) -> Result<Digest> {
        let mut r = bytes;
        self.write(&mut r, None, bytes.len() as u64).map(|(d, _)| d).map_err(|e| match e {
            StageError::Store(e) => e,
            other => Error::Io { path: self.dir.clone(), source: io::Error::other(other.describe("document")) },
        })
    }

    /// Moves the staged blobs in `needed` into the store and records
    /// `entries` in its index (a named entry replaces the entry of the same
    /// name; an unnamed one is added unless its manifest is already listed).
    pub(crate) fn commit(self, needed: &BTreeSet<Digest>, entries: Vec<IndexEntry>) -> Result<()> {
        let _index = self.store.lock_index(Mode::Exclusive)?;
        let blobs = self.store.blobs_dir();
        for d in needed.iter().filter(|d| self.staged.contains_key(*d)) {
            let from = self.dir.join(d.hex());
            fs::rename(&from, self.store.blob_path(d)).map_err(Error::io(&from))?;
        }
        sync_dir(&blobs).map_err(Error::io(&blobs))?;
        let mut index = self.store.read_index()?;
        for e in entries {
            match &e.reference {
                Some(r) => index.retain(|old| old.reference.as_ref() != Some(r)),
                None => {
                    if index.iter().any(|old| old.digest == e.digest) {
                        continue;
                    }
                }
            }
            index.push(e);
        }
        self.store.write_index(&index)
    }
}

impl Drop for Staging<'_> {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_live_operation_keeps_its_staging_and_holds_off_gc() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut st = Staging::new(&store).unwrap();
        let (d, n) = st.write(&mut &b"hello"[..], None, 100).unwrap();
        assert_eq!((d.clone(), n), (Digest::of(b"hello"), 5));
        // Another process opening the store, or trying GC, leaves it alone.
        let other = Store::open(dir.path()).unwrap();
        assert!(st.path(&d).exists());
        assert!(other.try_gc().unwrap().is_none());

        let wrong = Digest::of(b"other");
        assert!(matches!(st.write(&mut &b"hello"[..], Some((&wrong, 5)), 5), Err(StageError::Digest { .. })));
        assert!(matches!(st.write(&mut &b"hello!"[..], Some((&d, 5)), 5), Err(StageError::TooLong { limit: 5 })));
        assert!(matches!(
            st.write(&mut &b"hell"[..], Some((&d, 5)), 5),
            Err(StageError::Short { got: 4, expected: 5 })
        ));
        assert!(matches!(st.write(&mut &b"toolong"[..], None, 3), Err(StageError::TooLong { limit: 3 })));
        // Failed writes leave nothing behind; the good blob is there once.
        let staged = fs::read_dir(&st.dir).unwrap().count();
        assert_eq!(staged, 1);

        let staging_dir = st.dir.clone();
        st.commit(&BTreeSet::from([d.clone()]), Vec::new()).unwrap();
        assert!(!staging_dir.exists());
        assert_eq!(fs::read(store.blob_path(&d)).unwrap(), b"hello");
        // Nothing names it: GC takes it.
        assert_eq!(store.gc().unwrap().removed, vec![d]);
    }
}
