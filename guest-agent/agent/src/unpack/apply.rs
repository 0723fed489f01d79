//! Writing tar entries into a root directory, never outside it.
//!
//! Every lookup starts at a descriptor of the root and goes through
//! `openat2(RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)`: a `..`, an absolute
//! symlink or a relative one that climbs out fails the lookup with `EXDEV`
//! instead of leaving the root. Names are then created relative to their
//! parent's descriptor with `O_CREAT | O_EXCL` (or `mkdirat`, `symlinkat`,
//! ...), which never follow a symlink in the last component. An existing
//! entry is removed and created again, never written through.
//!
//! System calls per regular file: `openat2`, `write` (one per MiB), `fchown`
//! when not owned by root, `futimens`, `close`. Parent directories are kept
//! open in a small cache, so tar's usual order (a directory, then its files)
//! costs no extra lookups.

use std::collections::HashSet;
use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use super::path::{is_plain_name, is_under, join, split};
use super::tar::{Header, Kind};
use crate::sys;

const RESOLVE: u64 = libc::RESOLVE_BENEATH | libc::RESOLVE_NO_MAGICLINKS;
const CACHE: usize = 16;

/// Why an entry could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// A lookup would leave the root (through a symlink).
    #[error("{0:?} resolves outside the container root (through a symlink)")]
    Escape(String),
    /// The entry cannot be created.
    #[error("{path:?}: {err}")]
    Io {
        /// The entry.
        path: String,
        /// What failed.
        err: io::Error,
    },
    /// A link target or name the agent refuses.
    #[error("{0}")]
    Invalid(String),
}

fn show(p: &[u8]) -> String {
    String::from_utf8_lossy(&p[..p.len().min(200)]).into_owned()
}

fn io_err(path: &[u8], err: io::Error) -> ApplyError {
    match err.raw_os_error() {
        Some(libc::EXDEV) => ApplyError::Escape(show(path)),
        _ => ApplyError::Io { path: show(path), err },
    }
}

fn cs(b: &[u8]) -> io::Result<CString> {
    sys::cstring(b)
}

fn errno_is(e: &io::Error, n: i32) -> bool {
    e.raw_os_error() == Some(n)
}

pub use vmrun_tree::remove_all;

/// Applies the entries of one image's layers to a root directory.
#[derive(Debug)]
pub struct Applier {
    root: OwnedFd,
    /// Recently used parent directories (path, descriptor), newest last.
    parents: Vec<(Vec<u8>, OwnedFd)>,
    /// Paths created by the current layer (opaque directories keep them).
    layer_paths: HashSet<Vec<u8>>,
    /// Directory mtimes to set once the layer is done.
    dir_times: Vec<(Vec<u8>, i64)>,
}

impl Applier {
    /// Applies into the directory `root` (a descriptor of it).
    pub fn new(root: OwnedFd) -> Self {
        Self { root, parents: Vec::new(), layer_paths: HashSet::new(), dir_times: Vec::new() }
    }

    /// The root's descriptor.
    pub fn root(&self) -> BorrowedFd<'_> {
        self.root.as_fd()
    }

    /// Starts a new layer.
    pub fn begin_layer(&mut self) {
        self.layer_paths.clear();
        self.dir_times.clear();
    }

    /// Ends a layer: sets the directories' modification times, now that
    /// nothing more is created in them.
    pub fn end_layer(&mut self) -> Result<(), ApplyError> {
        let mut times = std::mem::take(&mut self.dir_times);
        times.sort();
        for (p, mtime) in &times {
            let (dir, name) = split(p);
            let Ok(pfd) = self.parent(dir) else { continue };
            let name = cs(name).map_err(|e| io_err(p, e))?;
            match sys::lutimensat(pfd, &name, *mtime) {
                Err(e) if errno_is(&e, libc::ENOENT) => {}
                r => r.map_err(|e| io_err(p, e))?,
            }
        }
        Ok(())
    }

    /// Forgets cached parents at or below `p` (it is being removed).
    fn forget(&mut self, p: &[u8]) {
        self.parents.retain(|(c, _)| !is_under(c, p));
    }

    /// A descriptor of directory `dir` (relative to the root), creating
    /// missing directories (0755, root's) on the way.
    fn parent(&mut self, dir: &[u8]) -> io::Result<BorrowedFd<'_>> {
        if dir.is_empty() {
            return Ok(self.root.as_fd());
        }
        if let Some(i) = self.parents.iter().position(|(p, _)| p == dir) {
            let e = self.parents.remove(i);
            self.parents.push(e);
        } else {
            let fd = self.open_dir(dir)?;
            if self.parents.len() == CACHE {
                self.parents.remove(0);
            }
            self.parents.push((dir.to_vec(), fd));
        }
        match self.parents.last() {
            Some((_, fd)) => Ok(fd.as_fd()),
            None => Err(io::Error::other("parent cache empty")),
        }
    }

    fn open_dir(&self, dir: &[u8]) -> io::Result<OwnedFd> {
        let c = cs(dir)?;
        match sys::openat2(self.root.as_fd(), &c, libc::O_PATH | libc::O_DIRECTORY, 0, RESOLVE) {
            Err(e) if errno_is(&e, libc::ENOENT) => {}
            r => return r,
        }
        // Create what is missing, top down.
        let (up, name) = split(dir);
        let upfd = if up.is_empty() { sys::dup(self.root.as_fd())? } else { self.open_dir(up)? };
        let cname = cs(name)?;
        match sys::mkdirat(upfd.as_fd(), &cname, 0o755) {
            Err(e) if errno_is(&e, libc::EEXIST) => {}
            r => r?,
        }
        sys::openat2(upfd.as_fd(), &cname, libc::O_PATH | libc::O_DIRECTORY, 0, RESOLVE)
    }

    /// Removes whatever is at `p` (a whiteout, or an entry in the way).
    fn remove(&mut self, p: &[u8]) -> Result<(), ApplyError> {
        let (dir, name) = split(p);
        // `..` would be looked up below without `RESOLVE_BENEATH`: only a
        // plain name is ever removed (the paths are checked before; this
        // keeps it so whatever the caller).
        if !is_plain_name(name) {
            return Err(ApplyError::Invalid(format!("{}: refusing to remove {:?}", show(p), show(name))));
        }
        self.forget(p);
        let cname = cs(name).map_err(|e| io_err(p, e))?;
        let pfd = match self.parent(dir) {
            Ok(fd) => fd,
            Err(e) if errno_is(&e, libc::ENOENT) || errno_is(&e, libc::ENOTDIR) => return Ok(()),
            Err(e) => return Err(io_err(p, e)),
        };
        remove_all(pfd, &cname, 0).map_err(|e| io_err(p, e))
    }

    /// `.wh.NAME`: removes `p` from lower layers.
    pub fn whiteout(&mut self, p: &[u8]) -> Result<(), ApplyError> {
        if self.layer_paths.contains(p) {
            return Ok(());
        }
        self.remove(p)
    }

    /// `.wh..wh..opq`: removes from `dir` whatever this layer did not put
    /// there.
    pub fn opaque(&mut self, dir: &[u8]) -> Result<(), ApplyError> {
        let d = self.parent(dir).map_err(|e| io_err(dir, e))?;
        let listing = sys::openat(d, c".", libc::O_RDONLY | libc::O_DIRECTORY, 0)
            .and_then(|fd| sys::read_dir_names(fd.as_fd()))
            .map_err(|e| io_err(dir, e))?;
        for (name, _) in listing {
            let child = join(dir, name.as_bytes());
            if !self.layer_paths.contains(&child) {
                self.remove(&child)?;
            }
        }
        Ok(())
    }

    /// Creates a regular file (removing what is in the way) and returns it,
    /// open for writing, for the caller to fill and [`Applier::finish_file`].
    pub fn create_file(&mut self, p: &[u8], h: &Header) -> Result<OwnedFd, ApplyError> {
        self.layer_paths.insert(p.to_vec());
        let (dir, name) = split(p);
        let cname = cs(name).map_err(|e| io_err(p, e))?;
        for attempt in 0..2 {
            let pfd = self.parent(dir).map_err(|e| io_err(p, e))?;
            match sys::openat(pfd, &cname, libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW, h.mode) {
                Ok(fd) => return Ok(fd),
                Err(e) if errno_is(&e, libc::EEXIST) && attempt == 0 => self.remove(p)?,
                Err(e) => return Err(io_err(p, e)),
            }
        }
        Err(ApplyError::Invalid(format!("{}: cannot be replaced", show(p))))
    }

    /// Sets owner, setuid bits, extended attributes and times of a file
    /// whose content was written.
    pub fn finish_file(&mut self, p: &[u8], fd: OwnedFd, h: &Header) -> Result<(), ApplyError> {
        let f = fd.as_fd();
        if h.uid != 0 || h.gid != 0 {
            sys::fchown(f, h.uid, h.gid).map_err(|e| io_err(p, e))?;
            // chown clears setuid and setgid: put them back.
            if h.mode & 0o6000 != 0 {
                sys::fchmod(f, h.mode).map_err(|e| io_err(p, e))?;
            }
        }
        for (k, v) in &h.xattrs {
            let k = cs(k).map_err(|e| io_err(p, e))?;
            // Best effort: a file system without xattrs (or a namespace the
            // kernel refuses) does not fail the image.
            if let Err(e) = sys::fsetxattr(f, &k, v) {
                crate::log::debug(format_args!("xattr {:?} on {}: {e}", k, show(p)));
            }
        }
        sys::futimens(f, h.mtime).map_err(|e| io_err(p, e))?;
        drop(fd);
        Ok(())
    }

    /// Creates a directory, or updates one already there.
    pub fn dir(&mut self, p: &[u8], h: &Header) -> Result<(), ApplyError> {
        self.layer_paths.insert(p.to_vec());
        let (dir, name) = split(p);
        let cname = cs(name).map_err(|e| io_err(p, e))?;
        let pfd = self.parent(dir).map_err(|e| io_err(p, e))?;
        match sys::mkdirat(pfd, &cname, h.mode) {
            Ok(()) => {
                // mkdir drops setuid/setgid bits and may inherit setgid.
                if h.mode & 0o6000 != 0 {
                    sys::fchmodat(pfd, &cname, h.mode).map_err(|e| io_err(p, e))?;
                }
            }
            Err(e) if errno_is(&e, libc::EEXIST) => {
                let st = sys::lstatat(pfd, &cname).map_err(|e| io_err(p, e))?;
                if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
                    if st.st_mode & 0o7777 != h.mode {
                        sys::fchmodat(pfd, &cname, h.mode).map_err(|e| io_err(p, e))?;
                    }
                    if (st.st_uid, st.st_gid) != (h.uid, h.gid) {
                        sys::lchownat(pfd, &cname, h.uid, h.gid).map_err(|e| io_err(p, e))?;
                    }
                    self.dir_times.push((p.to_vec(), h.mtime));
                    return Ok(());
                }
                self.remove(p)?;
                let pfd = self.parent(dir).map_err(|e| io_err(p, e))?;
                sys::mkdirat(pfd, &cname, h.mode).map_err(|e| io_err(p, e))?;
            }
            Err(e) => return Err(io_err(p, e)),
        }
        if h.uid != 0 || h.gid != 0 {
            let pfd = self.parent(dir).map_err(|e| io_err(p, e))?;
            sys::lchownat(pfd, &cname, h.uid, h.gid).map_err(|e| io_err(p, e))?;
        }
        self.dir_times.push((p.to_vec(), h.mtime));
        Ok(())
    }

    /// Creates a symlink, hard link, device node or fifo.
    pub fn special(&mut self, p: &[u8], h: &Header, link: Option<&[u8]>) -> Result<(), ApplyError> {
        self.layer_paths.insert(p.to_vec());
        let (dir, name) = split(p);
        let cname = cs(name).map_err(|e| io_err(p, e))?;
        let target = match h.kind {
            Kind::Symlink => {
                if h.link.is_empty() {
                    return Err(ApplyError::Invalid(format!("{}: symlink with an empty target", show(p))));
                }
                Some(cs(&h.link[..]).map_err(|e| io_err(p, e))?)
            }
            _ => None,
        };
        if h.kind == Kind::HardLink && link == Some(p) {
            return Ok(());
        }
        for attempt in 0..2 {
            let r = match h.kind {
                Kind::Symlink => {
                    let pfd = self.parent(dir).map_err(|e| io_err(p, e))?;
                    sys::symlinkat(target.as_deref().unwrap_or(c"."), pfd, &cname)
                }
                Kind::HardLink => {
                    let l = link.ok_or_else(|| ApplyError::Invalid(format!("{}: hard link without target", show(p))))?;
                    let (ldir, lname) = split(l);
                    let clname = cs(lname).map_err(|e| io_err(l, e))?;
                    let ldfd = sys::dup(self.parent(ldir).map_err(|e| io_err(l, e))?).map_err(|e| io_err(l, e))?;
                    let pfd = self.parent(dir).map_err(|e| io_err(p, e))?;
                    sys::linkat(ldfd.as_fd(), &clname, pfd, &cname)
                }
                Kind::Char | Kind::Block | Kind::Fifo => {
                    let ty = match h.kind {
                        Kind::Char => libc::S_IFCHR,
                        Kind::Block => libc::S_IFBLK,
                        _ => libc::S_IFIFO,
                    };
                    let pfd = self.parent(dir).map_err(|e| io_err(p, e))?;
                    sys::mknodat(pfd, &cname, ty | h.mode, libc::makedev(h.dev.0, h.dev.1))
                }
                Kind::File | Kind::Dir => return Err(ApplyError::Invalid("not a special entry".into())),
            };
            match r {
                Ok(()) => break,
                Err(e) if errno_is(&e, libc::EEXIST) && attempt == 0 => self.remove(p)?,
                Err(e) => return Err(io_err(p, e)),
            }
        }
        if h.kind == Kind::HardLink {
            // Same inode as its target: owner and times are the target's.
            return Ok(());
        }
        let pfd = self.parent(dir).map_err(|e| io_err(p, e))?;
        if h.uid != 0 || h.gid != 0 {
            sys::lchownat(pfd, &cname, h.uid, h.gid).map_err(|e| io_err(p, e))?;
        }
        sys::lutimensat(pfd, &cname, h.mtime).map_err(|e| io_err(p, e))?;
        Ok(())
    }
}
