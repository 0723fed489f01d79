//! Writes and removes the entries of a file tree (directories, regular
//! files, symbolic links; [`CopyEntry`]) beneath a directory held open,
//! resolving every path beneath it and following no symbolic link: a path
//! that would leave the directory, or pass through a link, fails.
//!
//! The agent writes with it the copies the host sends into a container
//! (`WriteFiles`); the OCI runtime writes back with it, into a bundle's
//! root on the host, what a container changed in its root
//! (`ReadChanges`). Both take the entries from the other side, which they
//! do not trust.

pub mod sys;

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use vmrun_agent_protocol::{plain_path, Change, CopyContent, CopyEntry, MAX_PATH};

use sys::cstring;

/// Deepest directory tree [`remove_at`] goes into.
const MAX_DEPTH: usize = 1024;

fn invalid(m: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, m)
}

fn errno_is(e: &io::Error, n: i32) -> bool {
    e.raw_os_error() == Some(n)
}

/// Checks an entry's path: plain names separated by `/` (`""`: the root).
pub fn check_path(path: &str) -> io::Result<()> {
    if plain_path(path) {
        Ok(())
    } else {
        Err(invalid(format!("path {path:?} must be relative, of plain names (no /, ., .. or empty parts)")))
    }
}

/// Checks a symbolic link's target: not empty, at most [`MAX_PATH`]
/// bytes, no NUL (it is never followed here).
pub fn check_target(target: &str) -> io::Result<()> {
    if target.is_empty() || target.len() > MAX_PATH || target.contains('\0') {
        return Err(invalid(format!("symbolic link target {target:?} is empty, too long or holds a NUL")));
    }
    Ok(())
}

/// Opens the directory `rel` (plain names) beneath `root`, following no
/// symbolic link.
pub fn open_dir_beneath(root: BorrowedFd<'_>, rel: &str) -> io::Result<OwnedFd> {
    if rel.is_empty() {
        return sys::dup(root);
    }
    let resolve = libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS | libc::RESOLVE_NO_XDEV;
    sys::openat2(root, &cstring(rel)?, libc::O_RDONLY | libc::O_DIRECTORY, 0, resolve)
}

/// The directory holding `path` (beneath `root`) and its last name.
fn parent_of(root: BorrowedFd<'_>, path: &str) -> io::Result<(OwnedFd, CString)> {
    check_path(path)?;
    match path.rsplit_once('/') {
        _ if path.is_empty() => Err(invalid("an entry of path \"\" is the root itself".into())),
        Some((p, n)) => Ok((open_dir_beneath(root, p)?, cstring(n)?)),
        None => Ok((sys::dup(root)?, cstring(path)?)),
    }
}

/// Writes entry `e` at `path` beneath `root`: see [`put_at`]. With
/// `replace`, whatever `path` held is removed first.
pub fn put(root: BorrowedFd<'_>, e: &CopyEntry, replace: bool) -> io::Result<()> {
    let (dir, name) = parent_of(root, &e.path)?;
    if replace {
        remove_all(dir.as_fd(), &name, 0)?;
    }
    put_at(dir.as_fd(), &name, e)
}

/// Makes one change a container listed ([`Change`]) beneath `root`: a
/// mode with bits other than permissions is refused, not masked.
pub fn apply(root: BorrowedFd<'_>, change: &Change) -> io::Result<()> {
    match change {
        Change::Put { entry, .. } if entry.mode & !0o7777 != 0 => {
            Err(invalid(format!("{:?}: mode {:o} has bits other than permissions", entry.path, entry.mode)))
        }
        Change::Put { entry, replace } => put(root, entry, *replace),
        Change::Remove { path } => remove(root, path),
    }
}

/// Removes `path` beneath `root`, a directory with everything in it (a
/// path already gone is no error).
pub fn remove(root: BorrowedFd<'_>, path: &str) -> io::Result<()> {
    let (dir, name) = parent_of(root, path)?;
    remove_all(dir.as_fd(), &name, 0)
}

/// Writes entry `e` (its path aside) as `name` in `dir`, then sets its
/// owner and mode (`0o7777` at most):
/// - a directory is made, or kept if there (with what it holds);
/// - a file (or its first piece) replaces whatever `name` was, as a new
///   file (another hard link to the old one keeps the old content); a
///   piece with `append` is added to the end of the file;
/// - a symbolic link replaces whatever `name` was.
pub fn put_at(dir: BorrowedFd<'_>, name: &CStr, e: &CopyEntry) -> io::Result<()> {
    let mode = e.mode & 0o7777;
    match &e.content {
        CopyContent::Directory => {
            match sys::mkdirat(dir, name, 0o700) {
                Err(err) if errno_is(&err, libc::EEXIST) => {}
                r => r?,
            }
            let d = match sys::openat(dir, name, libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW, 0) {
                // Something else is there: a directory takes its place.
                Err(err) if errno_is(&err, libc::ENOTDIR) || errno_is(&err, libc::ELOOP) => {
                    sys::unlinkat(dir, name, 0)?;
                    sys::mkdirat(dir, name, 0o700)?;
                    sys::openat(dir, name, libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW, 0)?
                }
                r => r?,
            };
            sys::fchown(d.as_fd(), e.uid, e.gid)?;
            sys::fchmod(d.as_fd(), mode)
        }
        CopyContent::File { data, append } => {
            let f = if *append {
                sys::openat(dir, name, libc::O_WRONLY | libc::O_NOFOLLOW | libc::O_APPEND, 0)?
            } else {
                remove_all(dir, name, 0)?;
                sys::openat(dir, name, libc::O_WRONLY | libc::O_NOFOLLOW | libc::O_CREAT | libc::O_EXCL, 0o600)?
            };
            sys::write_all(f.as_fd(), data)?;
            sys::fchown(f.as_fd(), e.uid, e.gid)?;
            sys::fchmod(f.as_fd(), mode)
        }
        CopyContent::Symlink { target } => {
            check_target(target)?;
            let target = cstring(target.as_str())?;
            match sys::symlinkat(&target, dir, name) {
                Err(err) if errno_is(&err, libc::EEXIST) => {
                    remove_all(dir, name, 0)?;
                    sys::symlinkat(&target, dir, name)?;
                }
                r => r?,
            }
            sys::lchownat(dir, name, e.uid, e.gid)
        }
    }
}

/// Removes `name` in `dir`, recursively if it is a directory. `name` must
/// be a plain entry name (`.`, `..` and paths are refused). A symbolic
/// link is removed, never followed; a name already gone is no error.
pub fn remove_all(dir: BorrowedFd<'_>, name: &std::ffi::CStr, depth: usize) -> io::Result<()> {
    let n = name.to_bytes();
    if n.is_empty() || n == b"." || n == b".." || n.contains(&b'/') {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("refusing to remove {name:?}")));
    }
    match sys::unlinkat(dir, name, 0) {
        Ok(()) => return Ok(()),
        Err(e) if errno_is(&e, libc::ENOENT) => return Ok(()),
        Err(e) if errno_is(&e, libc::EISDIR) || errno_is(&e, libc::EPERM) => {}
        Err(e) => return Err(e),
    }
    if depth > MAX_DEPTH {
        return Err(io::Error::other("directory tree too deep"));
    }
    let d = sys::openat(dir, name, libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW, 0)?;
    for (child, dtype) in sys::read_dir_names(d.as_fd())? {
        if dtype == libc::DT_DIR {
            remove_all(d.as_fd(), &child, depth + 1)?;
        } else {
            match sys::unlinkat(d.as_fd(), &child, 0) {
                Err(e) if errno_is(&e, libc::EISDIR) => remove_all(d.as_fd(), &child, depth + 1)?,
                r => r?,
            }
        }
    }
    drop(d);
    sys::unlinkat(dir, name, libc::AT_REMOVEDIR)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // test code: a failed step is a failed test

    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    fn root(d: &std::path::Path) -> OwnedFd {
        std::fs::File::open(d).unwrap().into()
    }

    fn file(path: &str, data: &[u8], append: bool) -> CopyEntry {
        CopyEntry { path: path.into(), mode: 0o640, uid: 0, gid: 0, content: CopyContent::File { data: data.to_vec(), append } }
    }

    fn dir(path: &str) -> CopyEntry {
        CopyEntry { path: path.into(), mode: 0o750, uid: 0, gid: 0, content: CopyContent::Directory }
    }

    fn link(path: &str, target: &str) -> CopyEntry {
        CopyEntry { path: path.into(), mode: 0o777, uid: 0, gid: 0, content: CopyContent::Symlink { target: target.into() } }
    }

    #[test]
    fn entries_are_written_removed_and_replaced() {
        let t = tempfile::tempdir().unwrap();
        let r = root(t.path());
        put(r.as_fd(), &dir("d"), false).unwrap();
        put(r.as_fd(), &file("d/f", b"one ", false), false).unwrap();
        put(r.as_fd(), &file("d/f", b"two", true), false).unwrap();
        put(r.as_fd(), &link("d/l", "../etc/passwd"), false).unwrap();
        assert_eq!(std::fs::read(t.path().join("d/f")).unwrap(), b"one two");
        assert_eq!(std::fs::metadata(t.path().join("d/f")).unwrap().permissions().mode() & 0o7777, 0o640);
        assert_eq!(std::fs::metadata(t.path().join("d")).unwrap().permissions().mode() & 0o7777, 0o750);
        assert_eq!(std::fs::read_link(t.path().join("d/l")).unwrap().to_str(), Some("../etc/passwd"));

        // A directory kept with what it holds; replaced, emptied.
        put(r.as_fd(), &dir("d"), false).unwrap();
        assert!(t.path().join("d/f").exists());
        put(r.as_fd(), &dir("d"), true).unwrap();
        assert_eq!(std::fs::read_dir(t.path().join("d")).unwrap().count(), 0);

        // A file in place of a directory tree, a directory in place of a
        // file, a link in place of a directory.
        std::fs::create_dir_all(t.path().join("x/y/z")).unwrap();
        put(r.as_fd(), &file("x", b"x", false), false).unwrap();
        assert_eq!(std::fs::read(t.path().join("x")).unwrap(), b"x");
        put(r.as_fd(), &dir("x"), false).unwrap();
        assert!(t.path().join("x").is_dir());
        put(r.as_fd(), &link("x", "y"), false).unwrap();
        assert!(t.path().join("x").is_symlink());

        std::fs::create_dir_all(t.path().join("gone/a/b")).unwrap();
        std::fs::write(t.path().join("gone/a/b/c"), "c").unwrap();
        remove(r.as_fd(), "gone").unwrap();
        assert!(!t.path().join("gone").exists());
        remove(r.as_fd(), "gone").unwrap();
    }

    #[test]
    fn a_new_file_leaves_its_old_hard_links_alone() {
        let t = tempfile::tempdir().unwrap();
        std::fs::write(t.path().join("a"), "old").unwrap();
        std::fs::hard_link(t.path().join("a"), t.path().join("b")).unwrap();
        put(root(t.path()).as_fd(), &file("a", b"new", false), false).unwrap();
        assert_eq!(std::fs::read(t.path().join("a")).unwrap(), b"new");
        assert_eq!(std::fs::read(t.path().join("b")).unwrap(), b"old");
        assert_eq!(std::fs::metadata(t.path().join("b")).unwrap().nlink(), 1);
    }

    #[test]
    fn nothing_is_written_or_removed_outside_the_root() {
        let t = tempfile::tempdir().unwrap();
        let inside = t.path().join("root");
        let outside = t.path().join("outside");
        std::fs::create_dir_all(&inside).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join("victim"), "keep").unwrap();
        std::os::unix::fs::symlink(&outside, inside.join("out")).unwrap();
        std::os::unix::fs::symlink("../outside", inside.join("rel")).unwrap();
        std::fs::create_dir_all(inside.join("sub")).unwrap();
        let r = root(&inside);
        for path in ["out/victim", "rel/victim", "out/new", "../outside/victim", "/etc/x", "sub/../../outside/victim", "a//b", "", "."] {
            assert!(put(r.as_fd(), &file(path, b"bad", false), false).is_err(), "{path}");
            assert!(remove(r.as_fd(), path).is_err(), "{path}");
        }
        assert!(put(r.as_fd(), &dir("out/d"), false).is_err());
        assert!(put(r.as_fd(), &link("rel/l", "x"), false).is_err());
        // A link is removed, never what it points to; appending through
        // one fails.
        assert!(put(r.as_fd(), &file("out", b"bad", true), false).is_err());
        remove(r.as_fd(), "out").unwrap();
        assert_eq!(std::fs::read(outside.join("victim")).unwrap(), b"keep");
        assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 1);
        // Replacing a link to a directory replaces the link only.
        put(r.as_fd(), &dir("rel"), true).unwrap();
        assert!(inside.join("rel").is_dir() && !inside.join("rel").is_symlink());
        assert_eq!(std::fs::read(outside.join("victim")).unwrap(), b"keep");
    }
}
