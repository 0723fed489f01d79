//! A container root layered over the host's copy of an image's root
//! ([`RootfsSpec::Overlay`](vmrun_agent_protocol::RootfsSpec::Overlay)),
//! and what the container changed in it, read from the overlay's upper
//! layer ([`Request::ReadChanges`](vmrun_agent_protocol::Request)).
//!
//! The disk holds the image's root at its top. It is mounted at
//! `{container dir}/disk`, its entries are moved into `.vmrun/lower`, and
//! the container's root is an overlay of that (left as it is) with
//! `.vmrun/upper` (on the same disk: writes take the disk's room, not the
//! guest's memory). Redirects, metacopy and the index are off, so the
//! upper layer says everything in the plainest form: a directory, file or
//! link the container made or changed is there whole (with its parents),
//! a removed one is a whiteout (a character device 0:0), and a directory
//! removed and made again is opaque (`trusted.overlay.opaque`).

use std::io;
use std::os::unix::ffi::OsStrExt;
use std::ffi::CStr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use vmrun_agent_protocol::{Change, CopyContent, CopyEntry, CHANGES_PART_BYTES, CHANGES_PART_ENTRIES, MAX_PATH};

use crate::sys::{self, cstring};

/// The directory on the disk that holds the layers.
pub const LAYERS: &str = ".vmrun";
/// Deepest directory walked in the upper layer.
const MAX_DEPTH: usize = 1024;
/// What one [`Reply::Changes`](vmrun_agent_protocol::Reply) part may take
/// (JSON, file content in base64), well under a frame.
const PART_BUDGET: usize = 960 << 10;

/// Makes the layers on the disk mounted at `disk` (its entries moved
/// into `.vmrun/lower`) and mounts the overlay at `rootfs`; returns the
/// upper layer's path.
pub fn layer(disk: &Path, rootfs: &Path) -> io::Result<PathBuf> {
    let layers = disk.join(LAYERS);
    match std::fs::create_dir(&layers) {
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            return Err(io::Error::other(format!("the root file system holds a /{LAYERS} of its own, where the agent keeps its layers")))
        }
        r => r?,
    }
    let lower = layers.join("lower");
    std::fs::create_dir(&lower)?;
    for e in std::fs::read_dir(disk)? {
        let name = e?.file_name();
        if name != LAYERS {
            std::fs::rename(disk.join(&name), lower.join(&name))?;
        }
    }
    same_owner_and_mode(disk, &lower)?;
    over(&lower, &layers, rootfs)
}

/// Mounts at `rootfs` (`nodev`, as every container root) an overlay of
/// `lower`, left as it is, and an upper layer made in `layers` (`upper`
/// and `work`); returns the upper layer's path.
pub fn over(lower: &Path, layers: &Path, rootfs: &Path) -> io::Result<PathBuf> {
    let (upper, work) = (layers.join("upper"), layers.join("work"));
    std::fs::create_dir(&upper)?;
    std::fs::create_dir(&work)?;
    // The root's owner and mode are the container's `/`: an overlay's
    // root takes its upper layer's.
    same_owner_and_mode(lower, &upper)?;
    let data = format!(
        "lowerdir={},upperdir={},workdir={},redirect_dir=off,index=off,metacopy=off,xino=off",
        lower.display(),
        upper.display(),
        work.display()
    );
    let target = cstring(rootfs.as_os_str().as_bytes())?;
    sys::mount(Some(c"overlay"), &target, Some(c"overlay"), crate::container::ROOTFS_FLAGS, Some(&cstring(data)?))?;
    Ok(upper)
}

/// Gives directory `to` the owner and mode of directory `from`.
fn same_owner_and_mode(from: &Path, to: &Path) -> io::Result<()> {
    let m = std::fs::metadata(from)?;
    std::os::unix::fs::chown(to, Some(m.uid()), Some(m.gid()))?;
    std::fs::set_permissions(to, std::os::unix::fs::PermissionsExt::from_mode(m.mode() & 0o7777))
}

/// One step of a container's changes: a whole directory, link or
/// removal, or a piece of a file's content.
#[derive(Debug)]
pub enum Piece {
    /// A directory made or changed; `opaque`: it replaces what was there.
    Dir { path: String, mode: u32, uid: u32, gid: u32, opaque: bool },
    /// A piece of a file: `len` bytes from `offset` (the first piece, at
    /// 0, makes the file).
    File { path: String, mode: u32, uid: u32, gid: u32, offset: u64, len: u64 },
    /// A symbolic link.
    Link { path: String, uid: u32, gid: u32, target: String },
    /// A removed path.
    Remove { path: String },
}

/// Walks the upper layer `upper`: its changes in order, parents before
/// their children. Names that are not UTF-8, and devices, FIFOs and
/// sockets the container made, are left out (with a note in the log).
/// The walk goes from descriptor to descriptor and follows no link: the
/// container's processes that still run may change the layer meanwhile.
pub fn list(upper: &Path) -> io::Result<Vec<Piece>> {
    let dir = sys::open(&cstring(upper.as_os_str().as_bytes())?, libc::O_RDONLY | libc::O_DIRECTORY, 0)?;
    let mut out = Vec::new();
    walk(dir.as_fd(), "", 0, &mut out)?;
    Ok(out)
}

fn walk(dir: BorrowedFd<'_>, rel: &str, depth: usize, out: &mut Vec<Piece>) -> io::Result<()> {
    if depth > MAX_DEPTH {
        return Err(io::Error::other(format!("{rel}: directory tree too deep")));
    }
    let mut names = sys::read_dir_names(dir)?;
    names.sort();
    for (name, _) in names {
        let Ok(n) = name.to_str() else {
            crate::log::info(format_args!("changes: {rel}/{}: not UTF-8, left out", name.to_string_lossy()));
            continue;
        };
        let path = if rel.is_empty() { n.to_owned() } else { format!("{rel}/{n}") };
        if path.len() > MAX_PATH {
            crate::log::info(format_args!("changes: a path longer than {MAX_PATH} bytes left out"));
            continue;
        }
        let st = match fstatat(dir, &name) {
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue, // removed meanwhile
            r => r?,
        };
        let (mode, uid, gid) = (st.st_mode & 0o7777, st.st_uid, st.st_gid);
        match st.st_mode & libc::S_IFMT {
            libc::S_IFDIR => {
                let sub = sys::openat(dir, &name, libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW, 0)?;
                out.push(Piece::Dir { opaque: is_opaque(sub.as_fd()), path: path.clone(), mode, uid, gid });
                walk(sub.as_fd(), &path, depth + 1, out)?;
            }
            libc::S_IFREG => {
                let size = st.st_size.max(0) as u64;
                let mut offset = 0;
                loop {
                    let len = (size - offset).min(CHANGES_PART_BYTES as u64);
                    out.push(Piece::File { path: path.clone(), mode, uid, gid, offset, len });
                    offset += len;
                    if offset >= size {
                        break;
                    }
                }
            }
            libc::S_IFLNK => match readlinkat(dir, &name).map(String::from_utf8) {
                Ok(Ok(target)) => out.push(Piece::Link { path, uid, gid, target }),
                Ok(Err(_)) => crate::log::info(format_args!("changes: link {path}: target not UTF-8, left out")),
                Err(e) => return Err(e),
            },
            libc::S_IFCHR if st.st_rdev == 0 => out.push(Piece::Remove { path }),
            _ => crate::log::info(format_args!("changes: {path}: a device, FIFO or socket, left out")),
        }
    }
    Ok(())
}

/// `fstatat(2)` of `name` in `dir`, not following a link.
fn fstatat(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<libc::stat> {
    // SAFETY: an all-zero stat is valid; the kernel fills it.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: name is NUL-terminated and `st` is writable.
    sys::cvt(unsafe { libc::fstatat(dir.as_raw_fd(), name.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) })?;
    Ok(st)
}

/// The target of link `name` in `dir` (at most [`MAX_PATH`] bytes).
fn readlinkat(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; MAX_PATH + 1];
    // SAFETY: name is NUL-terminated; the kernel writes at most
    // `buf.len()` bytes into `buf`.
    let n = unsafe { libc::readlinkat(dir.as_raw_fd(), name.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        return Err(sys::errno());
    }
    if n as usize > MAX_PATH {
        return Err(io::Error::other("a link target longer than the longest path"));
    }
    buf.truncate(n as usize);
    Ok(buf)
}

/// Whether the upper layer's directory `dir` is opaque.
fn is_opaque(dir: BorrowedFd<'_>) -> bool {
    let mut v = [0u8; 2];
    // SAFETY: the name is NUL-terminated; the kernel writes at most
    // `v.len()` bytes into `v`.
    let n = unsafe { libc::fgetxattr(dir.as_raw_fd(), c"trusted.overlay.opaque".as_ptr(), v.as_mut_ptr().cast(), v.len()) };
    n == 1 && v[0] == b'y'
}

/// The changes from piece `from` on that fit one part, read from `upper`,
/// and where the next part starts.
pub fn part(upper: &Path, pieces: &[Piece], from: u64) -> io::Result<(Vec<Change>, Option<u64>)> {
    let start = usize::try_from(from).unwrap_or(usize::MAX).min(pieces.len());
    let mut out = Vec::new();
    let mut budget = 0usize;
    for (i, p) in pieces.iter().enumerate().skip(start) {
        // A path of control characters takes six bytes each in JSON.
        let (path, data_len) = match p {
            Piece::Dir { path, .. } | Piece::Remove { path } => (path, 0),
            Piece::File { path, len, .. } => (path, *len as usize),
            Piece::Link { path, target, .. } => (path, 6 * target.len()),
        };
        let cost = 128 + 6 * path.len() + data_len.div_ceil(3) * 4;
        if !out.is_empty() && (out.len() >= CHANGES_PART_ENTRIES || budget + cost > PART_BUDGET) {
            return Ok((out, Some(i as u64)));
        }
        budget += cost;
        match change(upper, p) {
            Ok(c) => out.push(c),
            // Gone or replaced since the walk (by a process of the
            // container that still ran): left out.
            Err(e) if [libc::ENOENT, libc::ENOTDIR, libc::ELOOP, libc::EXDEV].contains(&e.raw_os_error().unwrap_or(0)) => {
                crate::log::info(format_args!("changes: {path}: {e}, left out"));
            }
            Err(e) => return Err(e),
        }
    }
    Ok((out, None))
}

fn change(upper: &Path, p: &Piece) -> io::Result<Change> {
    let entry = |path: &str, mode, uid, gid, content| CopyEntry { path: path.to_owned(), mode, uid, gid, content };
    Ok(match p {
        Piece::Dir { path, mode, uid, gid, opaque } => Change::Put { entry: entry(path, *mode, *uid, *gid, CopyContent::Directory), replace: *opaque },
        Piece::Link { path, uid, gid, target } => {
            Change::Put { entry: entry(path, 0o777, *uid, *gid, CopyContent::Symlink { target: target.clone() }), replace: false }
        }
        Piece::Remove { path } => Change::Remove { path: path.clone() },
        Piece::File { path, mode, uid, gid, offset, len } => {
            let data = read_piece(upper, path, *offset, *len)?;
            Change::Put { entry: entry(path, *mode, *uid, *gid, CopyContent::File { data, append: *offset > 0 }), replace: false }
        }
    })
}

/// Up to `len` bytes of file `path` (beneath `upper`) from `offset` (less
/// if it has shrunk since the walk), following no link.
fn read_piece(upper: &Path, path: &str, offset: u64, len: u64) -> io::Result<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    let dir = sys::open(&cstring(upper.as_os_str().as_bytes())?, libc::O_RDONLY | libc::O_DIRECTORY, 0)?;
    let resolve = libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS | libc::RESOLVE_NO_XDEV;
    let f = std::fs::File::from(sys::openat2(dir.as_fd(), &cstring(path)?, libc::O_RDONLY, 0, resolve)?);
    let mut data = vec![0u8; len as usize];
    let mut got = 0;
    while got < data.len() {
        match f.read_at(&mut data[got..], offset + got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    data.truncate(got);
    Ok(data)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // test code: a failed step is a failed test

    use super::*;
    use std::os::fd::OwnedFd;

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("vmrun-changes-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// An upper layer as overlayfs leaves it, listed in parts and written
    /// with `vmrun_tree` over a copy of its lower layer, gives the merged
    /// tree.
    #[test]
    fn an_upper_layers_changes_rebuild_the_merged_tree() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: a whiteout is a device node, made by root");
            return;
        }
        let (upper, target) = (scratch("upper"), scratch("target"));
        // The lower layer, as the host's bundle holds it.
        for d in ["kept/sub", "gone", "again/old"] {
            std::fs::create_dir_all(target.join(d)).unwrap();
        }
        std::fs::write(target.join("kept/sub/f"), "lower").unwrap();
        std::fs::write(target.join("gone/f"), "x").unwrap();
        // What the container did: a new file in a kept directory (its
        // parents copied up), a big file, a link, a removal (whiteout), a
        // directory removed and made again (opaque).
        std::fs::create_dir_all(upper.join("kept/sub")).unwrap();
        std::fs::write(upper.join("kept/sub/f"), "changed").unwrap();
        let big: Vec<u8> = (0..(CHANGES_PART_BYTES * 2 + 7)).map(|i| (i % 251) as u8).collect();
        std::fs::write(upper.join("big"), &big).unwrap();
        std::os::unix::fs::symlink("kept/sub/f", upper.join("link")).unwrap();
        let whiteout = cstring(upper.join("gone").as_os_str().as_bytes()).unwrap();
        // SAFETY: the path is NUL-terminated.
        assert_eq!(unsafe { libc::mknod(whiteout.as_ptr(), libc::S_IFCHR | 0o600, 0) }, 0);
        std::fs::create_dir_all(upper.join("again")).unwrap();
        std::fs::write(upper.join("again/new"), "new").unwrap();
        let again = cstring(upper.join("again").as_os_str().as_bytes()).unwrap();
        // SAFETY: both strings are NUL-terminated; the value is 1 byte.
        let set = unsafe { libc::setxattr(again.as_ptr(), c"trusted.overlay.opaque".as_ptr(), b"y".as_ptr().cast(), 1, 0) };
        if set != 0 {
            eprintln!("skipped: no trusted xattrs on {}", upper.display());
            return;
        }

        let pieces = list(&upper).unwrap();
        let root: OwnedFd = std::fs::File::open(&target).unwrap().into();
        let (mut from, mut parts) = (0, 0);
        loop {
            let (changes, next) = part(&upper, &pieces, from).unwrap();
            let json = serde_json::to_vec(&vmrun_agent_protocol::Reply::Changes { changes: changes.clone(), next }).unwrap();
            assert!(json.len() < vmrun_agent_protocol::frame::MAX_PAYLOAD, "a part fits a frame");
            for c in changes {
                vmrun_tree::apply(root.as_fd(), &c).unwrap();
            }
            parts += 1;
            match next {
                Some(n) => from = n,
                None => break,
            }
        }
        assert!(parts >= 2, "the big file comes in pieces: {parts} parts");
        assert_eq!(std::fs::read(target.join("big")).unwrap(), big);
        assert_eq!(std::fs::read_to_string(target.join("kept/sub/f")).unwrap(), "changed");
        assert_eq!(std::fs::read_link(target.join("link")).unwrap().to_str(), Some("kept/sub/f"));
        assert!(!target.join("gone").exists());
        let names: Vec<_> = std::fs::read_dir(target.join("again")).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, ["new"]);
        let _ = std::fs::remove_dir_all(&upper);
        let _ = std::fs::remove_dir_all(&target);
    }
}
