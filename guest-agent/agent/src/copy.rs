//! Copied mounts: bind mounts whose source the host copies in through the
//! agent ([`WriteFiles`]), kept up to date while the container runs.
//!
//! Each container has a tmpfs of its own at `{container dir}/mounts`
//! ([`TMPFS_OPTIONS`] bound it), mounted with its first copy. A copy is
//! written part by part into a staging directory `{n}.new`, checked as it
//! comes: paths of plain names only, files and directories written through
//! descriptors resolved beneath the staging directory without following
//! symbolic links (a link the copy brings is written as a link, never
//! followed), at most [`COPY_MAX_BYTES`] of content and
//! [`COPY_MAX_ENTRIES`] entries. With the last part it goes in place as
//! `{n}`, which the container's bind mount shows at its destination
//! (`{n}` itself for a directory, `{n}/file` for a file).
//!
//! An update of a copy the container has is merged into `{n}` in place
//! (the bind mount holds `{n}`, so it cannot be swapped), one directory
//! level at a time: new entries are renamed in first, then entries of
//! both are replaced by `rename(2)` (atomic for each file and link;
//! directories are merged the same way), then entries gone from the
//! source are removed. A directory that kubelet maintains (its files are
//! links through a `..data` link to a timestamped directory, which kubelet
//! swaps) is therefore updated as kubelet updates it: the new timestamped
//! directory appears, `..data` is swapped at once, the old one goes, and a
//! reader sees the old set of files or the new one, never a mix. A copied
//! *file* is rewritten in place (a bind mount of a file holds its inode):
//! a reader may see it part written.

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use vmrun_agent_protocol::{
    AgentError, CopyContent, CopyEntry, CopyKind, ErrorKind, Mount, WriteFiles, COPY_MAX_BYTES, COPY_MAX_ENTRIES, COPY_MAX_MOUNTS,
};

use crate::sys::{self, cstring};
use vmrun_tree::remove_all;

/// Mount data of a container's copies tmpfs: what all its copies (and one
/// update being staged) may take together.
pub const TMPFS_OPTIONS: &CStr = c"mode=0700,size=64m,nr_inodes=65536";
/// Deepest directory tree merged.
const MAX_DEPTH: usize = 128;
/// The name of a copied file in its directory.
const FILE_NAME: &CStr = c"file";

fn bad(m: impl Into<String>) -> AgentError {
    AgentError::new(ErrorKind::BadRequest, m)
}

fn internal(what: &str, e: io::Error) -> AgentError {
    AgentError::new(ErrorKind::Internal, format!("{what}: {e}"))
}

/// A copy in place.
#[derive(Debug)]
struct Copied {
    destination: String,
    kind: CopyKind,
    read_only: bool,
    n: usize,
}

/// A copy being received.
#[derive(Debug)]
struct Staging {
    destination: String,
    kind: CopyKind,
    read_only: bool,
    n: usize,
    bytes: u64,
    entries: u64,
}

/// A container's copied mounts.
#[derive(Debug)]
pub struct Copies {
    /// `{container dir}/mounts`.
    dir: PathBuf,
    /// Whether its tmpfs is mounted.
    mounted: bool,
    list: Vec<Copied>,
    staging: Option<Staging>,
}

/// Checks an entry's path: plain names separated by `/` (`""`: the root).
pub fn check_path(path: &str) -> Result<(), AgentError> {
    vmrun_tree::check_path(path).map_err(|e| bad(format!("copied {e}")))
}

fn check_destination(d: &str) -> Result<(), AgentError> {
    if !d.starts_with('/') || d.split('/').any(|c| c == "..") || d.contains('\0') || d.len() > vmrun_agent_protocol::MAX_PATH {
        return Err(bad(format!("copy destination {d:?} must be an absolute path without ..")));
    }
    Ok(())
}

fn c(s: &str) -> Result<CString, AgentError> {
    cstring(s).map_err(|_| bad(format!("{s:?} holds a NUL byte")))
}

fn errno_is(e: &io::Error, n: i32) -> bool {
    e.raw_os_error() == Some(n)
}

/// Writes one entry beneath the staging directory `root`.
fn write_entry(root: BorrowedFd<'_>, kind: CopyKind, e: &CopyEntry) -> io::Result<()> {
    match kind {
        CopyKind::File => vmrun_tree::put_at(root, FILE_NAME, e),
        // The root itself.
        CopyKind::Directory if e.path.is_empty() => {
            sys::fchown(root, e.uid, e.gid)?;
            sys::fchmod(root, e.mode)
        }
        CopyKind::Directory => vmrun_tree::put(root, e, false),
    }
}

fn renameat(from_dir: BorrowedFd<'_>, from: &CStr, to_dir: BorrowedFd<'_>, to: &CStr) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: NUL-terminated names relative to descriptors that live
    // across the call.
    sys::cvt(unsafe { libc::renameat(from_dir.as_raw_fd(), from.as_ptr(), to_dir.as_raw_fd(), to.as_ptr()) }).map(drop)
}

fn fstat(fd: BorrowedFd<'_>) -> io::Result<libc::stat> {
    use std::os::fd::AsRawFd;
    // SAFETY: fstat fills the stat it is given.
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        sys::cvt(libc::fstat(fd.as_raw_fd(), &mut st))?;
        Ok(st)
    }
}

/// Merges the directory `new` into `old` in place (see the module docs):
/// new entries first, then replacements, then removals; `new` is left with
/// what was not moved.
fn merge(new: BorrowedFd<'_>, old: BorrowedFd<'_>, depth: usize) -> io::Result<()> {
    if depth > MAX_DEPTH {
        return Err(io::Error::other("directory tree too deep"));
    }
    let fresh = sys::read_dir_names(new)?;
    let existing = sys::read_dir_names(old)?;
    let has = |list: &[(CString, u8)], n: &CStr| list.iter().find(|(m, _)| m.as_c_str() == n).map(|(_, t)| *t);
    for (name, _) in &fresh {
        if has(&existing, name).is_none() {
            renameat(new, name, old, name)?;
        }
    }
    for (name, t) in &fresh {
        let Some(old_t) = has(&existing, name) else { continue };
        match (*t == libc::DT_DIR, old_t == libc::DT_DIR) {
            (true, true) => {
                let flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW;
                let (n, o) = (sys::openat(new, name, flags, 0)?, sys::openat(old, name, flags, 0)?);
                merge(n.as_fd(), o.as_fd(), depth + 1)?;
                let st = fstat(n.as_fd())?;
                sys::fchown(o.as_fd(), st.st_uid, st.st_gid)?;
                sys::fchmod(o.as_fd(), st.st_mode & 0o7777)?;
            }
            (false, false) => renameat(new, name, old, name)?,
            _ => {
                remove_all(old, name, 0)?;
                renameat(new, name, old, name)?;
            }
        }
    }
    for (name, _) in &existing {
        if has(&fresh, name).is_none() {
            remove_all(old, name, 0)?;
        }
    }
    Ok(())
}

impl Copies {
    /// No copies yet, for the container whose directory is `container_dir`.
    pub fn new(container_dir: &Path) -> Self {
        Self { dir: container_dir.join("mounts"), mounted: false, list: Vec::new(), staging: None }
    }

    fn open_dir(&self) -> io::Result<OwnedFd> {
        sys::open(&cstring(self.dir.as_os_str().as_encoded_bytes())?, libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW, 0)
    }

    fn ensure_tmpfs(&mut self) -> Result<(), AgentError> {
        if self.mounted {
            return Ok(());
        }
        let what = format!("the copies tmpfs {}", self.dir.display());
        match std::fs::create_dir(&self.dir) {
            Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(internal(&what, e)),
            _ => {}
        }
        let target = cstring(self.dir.as_os_str().as_encoded_bytes()).map_err(|e| internal(&what, e))?;
        sys::mount(Some(c"tmpfs"), &target, Some(c"tmpfs"), libc::MS_NOSUID | libc::MS_NODEV, Some(TMPFS_OPTIONS))
            .map_err(|e| internal(&what, e))?;
        self.mounted = true;
        Ok(())
    }

    fn drop_staging(&mut self) {
        if let Some(s) = self.staging.take() {
            if let (Ok(d), Ok(name)) = (self.open_dir(), cstring(format!("{}.new", s.n))) {
                let _ = remove_all(d.as_fd(), &name, 0);
            }
        }
    }

    /// Takes one part of a copy; `started`: whether the container's
    /// process was started (its set of mounts is then fixed).
    pub fn write(&mut self, w: &WriteFiles, started: bool) -> Result<(), AgentError> {
        check_destination(&w.destination)?;
        let known = self.list.iter().find(|c| c.destination == w.destination);
        if let Some(k) = known {
            if k.kind != w.kind {
                return Err(bad(format!("{} was copied as a {:?}, not a {:?}", w.destination, k.kind, w.kind)));
            }
        } else if started {
            return Err(AgentError::new(
                ErrorKind::InvalidState,
                format!("the container was started: its mounts are set, {} cannot be added", w.destination),
            ));
        } else if self.list.len() >= COPY_MAX_MOUNTS {
            return Err(bad(format!("at most {COPY_MAX_MOUNTS} copied mounts per container")));
        }
        let n = known.map_or_else(|| self.list.iter().map(|c| c.n + 1).max().unwrap_or(0), |k| k.n);
        let same = self.staging.as_ref().is_some_and(|s| s.destination == w.destination && s.kind == w.kind);
        if !same {
            // A part of another copy: the one being received was abandoned.
            self.drop_staging();
        }
        let result = self.receive(w, n);
        if result.is_err() {
            self.drop_staging();
        }
        result
    }

    fn receive(&mut self, w: &WriteFiles, n: usize) -> Result<(), AgentError> {
        for e in &w.entries {
            check_path(&e.path)?;
            if e.mode & !0o7777 != 0 {
                return Err(bad(format!("copied entry {:?}: mode {:o} has bits other than permissions", e.path, e.mode)));
            }
            let ok = match (w.kind, &e.content) {
                (CopyKind::File, CopyContent::File { .. }) => e.path.is_empty(),
                (CopyKind::File, _) => false,
                (CopyKind::Directory, CopyContent::Directory) => true,
                (CopyKind::Directory, _) => !e.path.is_empty(),
            };
            if !ok {
                return Err(bad(format!("copied entry {:?} does not fit a copy of a {:?}", e.path, w.kind)));
            }
            if let CopyContent::Symlink { target } = &e.content {
                vmrun_tree::check_target(target).map_err(|err| bad(format!("copied link {:?}: {err}", e.path)))?;
            }
        }
        self.ensure_tmpfs()?;
        let dir = self.open_dir().map_err(|e| internal("the copies directory", e))?;
        let staging_name = c(&format!("{n}.new"))?;
        if self.staging.is_none() {
            match sys::mkdirat(dir.as_fd(), &staging_name, 0o755) {
                Err(e) if errno_is(&e, libc::EEXIST) => {
                    remove_all(dir.as_fd(), &staging_name, 0).map_err(|e| internal("clearing a staging directory", e))?;
                    sys::mkdirat(dir.as_fd(), &staging_name, 0o755).map_err(|e| internal("a staging directory", e))?;
                }
                r => r.map_err(|e| internal("a staging directory", e))?,
            }
            self.staging = Some(Staging {
                destination: w.destination.clone(),
                kind: w.kind,
                read_only: w.read_only,
                n,
                bytes: 0,
                entries: 0,
            });
        }
        let root = sys::openat(dir.as_fd(), &staging_name, libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW, 0)
            .map_err(|e| internal("the staging directory", e))?;
        for e in &w.entries {
            let s = self.staging.as_mut().ok_or_else(|| internal("staging", io::Error::other("gone")))?;
            if let CopyContent::File { data, append } = &e.content {
                s.bytes += data.len() as u64;
                if *append {
                    s.entries = s.entries.saturating_sub(1);
                }
            }
            s.entries += 1;
            if s.bytes > COPY_MAX_BYTES || s.entries > COPY_MAX_ENTRIES {
                return Err(bad(format!(
                    "the copy for {} is over the limit of {COPY_MAX_BYTES} bytes and {COPY_MAX_ENTRIES} entries",
                    w.destination
                )));
            }
            write_entry(root.as_fd(), w.kind, e).map_err(|err| {
                let kind = if err.raw_os_error() == Some(libc::ENOSPC) { "no room left" } else { "cannot write" };
                bad(format!("copy for {}: entry {:?}: {kind}: {err}", w.destination, e.path))
            })?;
        }
        if w.last {
            self.put_in_place(dir.as_fd(), root.as_fd(), &staging_name)?;
        }
        Ok(())
    }

    /// Puts the staged copy in place: a new one is renamed, an update is
    /// merged (a file rewritten).
    fn put_in_place(&mut self, dir: BorrowedFd<'_>, staged: BorrowedFd<'_>, staging_name: &CStr) -> Result<(), AgentError> {
        let s = self.staging.take().ok_or_else(|| internal("staging", io::Error::other("gone")))?;
        let live_name = c(&s.n.to_string())?;
        let fail = |e| internal(&format!("putting the copy for {} in place", s.destination), e);
        if s.kind == CopyKind::File {
            // The file entry must have come.
            sys::lstatat(staged, FILE_NAME).map_err(|_| bad(format!("the copy for {} has no file", s.destination)))?;
        }
        match sys::openat(dir, &live_name, libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW, 0) {
            Err(e) if errno_is(&e, libc::ENOENT) => renameat(dir, staging_name, dir, &live_name).map_err(fail)?,
            Err(e) => return Err(fail(e)),
            Ok(live) => {
                let r = match s.kind {
                    CopyKind::Directory => merge(staged, live.as_fd(), 0).and_then(|()| {
                        let st = fstat(staged)?;
                        sys::fchown(live.as_fd(), st.st_uid, st.st_gid)?;
                        sys::fchmod(live.as_fd(), st.st_mode & 0o7777)
                    }),
                    CopyKind::File => rewrite_file(staged, live.as_fd()),
                };
                let _ = remove_all(dir, staging_name, 0);
                r.map_err(fail)?;
            }
        }
        if !self.list.iter().any(|c| c.destination == s.destination) {
            self.list.push(Copied { destination: s.destination, kind: s.kind, read_only: s.read_only, n: s.n });
        }
        Ok(())
    }

    /// The bind mounts of the copies, for the container's start.
    pub fn bind_mounts(&self) -> Vec<Mount> {
        self.list
            .iter()
            .map(|cp| {
                let mut source = self.dir.join(cp.n.to_string());
                if cp.kind == CopyKind::File {
                    source.push(FILE_NAME.to_string_lossy().as_ref());
                }
                let mut options = vec!["bind".to_string(), "nosuid".into(), "nodev".into()];
                if cp.read_only {
                    options.push("ro".into());
                }
                Mount { destination: cp.destination.clone(), fstype: "bind".into(), source: source.to_string_lossy().into_owned(), options }
            })
            .collect()
    }

}

/// Unmounts the copies' tmpfs of the container whose directory is
/// `container_dir`, if it has one (detached: its bind mounts in the
/// container's namespace go with that namespace), and removes its
/// directory.
pub fn remove(container_dir: &Path) {
    let dir = container_dir.join("mounts");
    if let Ok(t) = cstring(dir.as_os_str().as_encoded_bytes()) {
        let _ = sys::umount2(&t, libc::MNT_DETACH);
    }
    let _ = std::fs::remove_dir(&dir);
}

/// Rewrites the live copied file in `live` (its directory) with the staged
/// one in `staged`, in place.
fn rewrite_file(staged: BorrowedFd<'_>, live: BorrowedFd<'_>) -> io::Result<()> {
    let from = sys::openat(staged, FILE_NAME, libc::O_RDONLY | libc::O_NOFOLLOW, 0)?;
    let to = sys::openat(live, FILE_NAME, libc::O_WRONLY | libc::O_NOFOLLOW | libc::O_TRUNC, 0)?;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = sys::read(from.as_fd(), &mut buf)?;
        if n == 0 {
            break;
        }
        sys::write_all(to.as_fd(), &buf[..n])?;
    }
    let st = fstat(from.as_fd())?;
    sys::fchown(to.as_fd(), st.st_uid, st.st_gid)?;
    sys::fchmod(to.as_fd(), st.st_mode & 0o7777)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_plain_names() {
        for ok in ["", "a", "a/b", "..data", "..2024_01_01", "a/.hidden"] {
            check_path(ok).unwrap();
        }
        for bad in ["/a", "a/../b", "..", ".", "a//b", "a/", "a/./b", "a\0b"] {
            assert!(check_path(bad).is_err(), "{bad:?}");
        }
        assert!(check_path(&"a/".repeat(3000)).is_err());
    }

    #[test]
    fn destinations_are_absolute() {
        check_destination("/etc/hosts").unwrap();
        for bad in ["etc/hosts", "/etc/../x", ""] {
            assert!(check_destination(bad).is_err(), "{bad:?}");
        }
    }
}
