//! Bind mounts copied in through the guest agent, and kept up to date.
//!
//! A bind mount of a host file, or of a directory whose tree is small (at
//! most [`COPY_MAX_BYTES`] of file content and [`COPY_MAX_ENTRIES`]
//! entries), is read here and sent to the agent in [`WriteFiles`] parts
//! before the container starts ([`send_all`]). The tree is read without
//! following symbolic links: a link is sent as a link (the container
//! resolves it in its own root, as kubelet's `..data` links expect);
//! sockets, FIFOs and device nodes are left out. Then [`Watcher`] watches
//! the sources with inotify and sends a mount again, whole, when its tree
//! changed (after a short quiet time: kubelet's update of a configmap is
//! several renames). Nothing goes back: what the container writes to a
//! writable copy stays in the guest.

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use vmrun_agent_client::Client;
use vmrun_agent_protocol::{CopyContent, CopyEntry, CopyKind, WriteFiles, COPY_MAX_BYTES, COPY_MAX_ENTRIES, COPY_PART_BYTES};
use vmrun_runtime::watch::Waiter;

use crate::error::{Error, Result};

/// How long a source must stay quiet after a change before it is sent.
pub const SETTLE: Duration = Duration::from_millis(200);
/// Most bytes of JSON a part is planned to take (a frame holds 1 MiB).
const PART_BUDGET: usize = 768 << 10;
/// Deepest tree read.
const MAX_DEPTH: usize = 64;

/// A bind mount copied in through the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CopyPlan {
    /// The host file or directory.
    pub host: PathBuf,
    /// Where the container sees it.
    pub guest: String,
    /// A file or a directory.
    pub kind: CopyKind,
    /// Bound read-only.
    pub read_only: bool,
}

/// How a bind mount's source reaches the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// Copied through the agent.
    Copy(CopyKind),
    /// A directory too large for that: on the volume disk.
    Disk,
}

fn bad(msg: impl Into<String>) -> Error {
    Error::Bundle(msg.into())
}

/// What entries of a tree are copied: directories, regular files and
/// symbolic links.
fn copied(t: &std::fs::FileType) -> bool {
    t.is_dir() || t.is_file() || t.is_symlink()
}

/// How the source `host` of a bind mount goes to the guest: a file or a
/// small directory is copied; a directory over [`COPY_MAX_BYTES`] of file
/// content or [`COPY_MAX_ENTRIES`] entries goes on the volume disk. A file
/// over the limit is refused.
pub fn route(host: &Path) -> Result<Route> {
    let meta = std::fs::metadata(host).map_err(|e| bad(format!("mount source {}: {e}", host.display())))?;
    if meta.is_file() {
        if meta.len() > COPY_MAX_BYTES {
            return Err(bad(format!(
                "bind-mounted file {} has {} bytes: files are copied into the VM, at most {COPY_MAX_BYTES} bytes",
                host.display(),
                meta.len()
            )));
        }
        return Ok(Route::Copy(CopyKind::File));
    }
    if !meta.is_dir() {
        return Err(bad(format!("mount source {} is neither a file nor a directory", host.display())));
    }
    let (mut bytes, mut entries) = (0u64, 0u64);
    let mut stack = vec![(host.to_path_buf(), 0usize)];
    while let Some((dir, depth)) = stack.pop() {
        if depth > MAX_DEPTH {
            return Ok(Route::Disk);
        }
        for e in std::fs::read_dir(&dir).map_err(|e| bad(format!("mount source {}: {e}", dir.display())))? {
            let e = e.map_err(|e| bad(format!("mount source {}: {e}", dir.display())))?;
            let m = e.path().symlink_metadata().map_err(|err| bad(format!("mount source {}: {err}", e.path().display())))?;
            if !copied(&m.file_type()) {
                continue;
            }
            entries += 1;
            if m.is_file() {
                bytes += m.len();
            } else if m.is_dir() {
                stack.push((e.path(), depth + 1));
            }
            if bytes > COPY_MAX_BYTES || entries >= COPY_MAX_ENTRIES {
                return Ok(Route::Disk);
            }
        }
    }
    Ok(Route::Copy(CopyKind::Directory))
}

/// The entries of a copy's tree, parents first (names sorted), files in
/// pieces of at most [`COPY_PART_BYTES`].
fn entries(c: &CopyPlan) -> Result<Vec<CopyEntry>> {
    let err = |p: &Path, e: std::io::Error| bad(format!("copying {} for {}: {e}", p.display(), c.guest));
    let attrs = |m: &std::fs::Metadata| (m.mode() & 0o7777, m.uid(), m.gid());
    let mut out = Vec::new();
    let mut bytes = 0u64;
    let mut file = |out: &mut Vec<CopyEntry>, path: &Path, rel: String, m: &std::fs::Metadata| -> Result<()> {
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW).open(path).map_err(|e| err(path, e))?;
        let mut data = Vec::new();
        std::io::Read::read_to_end(&mut std::io::Read::take(&mut f, COPY_MAX_BYTES + 1 - bytes), &mut data).map_err(|e| err(path, e))?;
        bytes += data.len() as u64;
        if bytes > COPY_MAX_BYTES {
            return Err(bad(format!("the files for {} grew over {COPY_MAX_BYTES} bytes", c.guest)));
        }
        let (mode, uid, gid) = attrs(m);
        let mut pieces = data.chunks(COPY_PART_BYTES).peekable();
        if pieces.peek().is_none() {
            out.push(CopyEntry { path: rel, mode, uid, gid, content: CopyContent::File { data: Vec::new(), append: false } });
            return Ok(());
        }
        for (i, piece) in pieces.enumerate() {
            out.push(CopyEntry { path: rel.clone(), mode, uid, gid, content: CopyContent::File { data: piece.to_vec(), append: i > 0 } });
        }
        Ok(())
    };
    let top = std::fs::metadata(&c.host).map_err(|e| err(&c.host, e))?;
    if c.kind == CopyKind::File {
        if !top.is_file() {
            return Err(bad(format!("{} for {} is no longer a file", c.host.display(), c.guest)));
        }
        file(&mut out, &c.host, String::new(), &top)?;
        return Ok(out);
    }
    if !top.is_dir() {
        return Err(bad(format!("{} for {} is no longer a directory", c.host.display(), c.guest)));
    }
    let (mode, uid, gid) = attrs(&top);
    out.push(CopyEntry { path: String::new(), mode, uid, gid, content: CopyContent::Directory });
    // Depth first, parents before children.
    let mut stack = vec![(c.host.clone(), String::new(), 0usize)];
    let mut count = 0u64;
    while let Some((dir, rel, depth)) = stack.pop() {
        if depth > MAX_DEPTH {
            return Err(bad(format!("the tree for {} is over {MAX_DEPTH} levels deep", c.guest)));
        }
        let mut names: Vec<_> = std::fs::read_dir(&dir).map_err(|e| err(&dir, e))?.collect::<std::io::Result<_>>().map_err(|e| err(&dir, e))?;
        names.sort_by_key(|e| e.file_name());
        let mut subdirs = Vec::new();
        for e in names {
            let path = e.path();
            let Some(name) = e.file_name().to_str().map(str::to_string) else {
                log::warn!("{}: a name that is not UTF-8 is not copied", path.display());
                continue;
            };
            let child = if rel.is_empty() { name } else { format!("{rel}/{name}") };
            let m = path.symlink_metadata().map_err(|e| err(&path, e))?;
            let t = m.file_type();
            if !copied(&t) {
                log::debug!("{}: {} not copied", path.display(), if t.is_socket() { "a socket" } else { "a special file" });
                continue;
            }
            count += 1;
            if count >= COPY_MAX_ENTRIES {
                return Err(bad(format!("the tree for {} grew over {COPY_MAX_ENTRIES} entries", c.guest)));
            }
            let (mode, uid, gid) = attrs(&m);
            if t.is_dir() {
                out.push(CopyEntry { path: child.clone(), mode, uid, gid, content: CopyContent::Directory });
                subdirs.push((path, child, depth + 1));
            } else if t.is_symlink() {
                let target = std::fs::read_link(&path).map_err(|e| err(&path, e))?;
                let Some(target) = target.to_str().map(str::to_string) else {
                    log::warn!("{}: a link to a name that is not UTF-8 is not copied", path.display());
                    continue;
                };
                out.push(CopyEntry { path: child, mode, uid, gid, content: CopyContent::Symlink { target } });
            } else {
                file(&mut out, &path, child, &m)?;
            }
        }
        // Popped in name order.
        stack.extend(subdirs.into_iter().rev());
    }
    Ok(out)
}

/// The parts that send copy `c` to the container `container`, each well
/// under a frame's size.
pub fn parts(container: &str, c: &CopyPlan) -> Result<Vec<WriteFiles>> {
    let size = |e: &CopyEntry| {
        let content = match &e.content {
            CopyContent::File { data, .. } => data.len().div_ceil(3) * 4,
            CopyContent::Symlink { target } => 2 * target.len(),
            CopyContent::Directory => 0,
        };
        content + 2 * e.path.len() + 128
    };
    let part = |entries| WriteFiles {
        container: container.to_string(),
        destination: c.guest.clone(),
        kind: c.kind,
        read_only: c.read_only,
        entries,
        last: false,
    };
    let mut out = Vec::new();
    let (mut cur, mut used) = (Vec::new(), 0usize);
    for e in entries(c)? {
        let s = size(&e);
        if !cur.is_empty() && used + s > PART_BUDGET {
            out.push(part(std::mem::take(&mut cur)));
            used = 0;
        }
        used += s;
        cur.push(e);
    }
    out.push(part(cur));
    if let Some(l) = out.last_mut() {
        l.last = true;
    }
    Ok(out)
}

/// Sends every copy to the container `container` (before its start);
/// returns what was sent, for the [`Watcher`].
pub fn send_all(client: &Client, container: &str, copies: &[CopyPlan]) -> Result<Vec<Vec<WriteFiles>>> {
    copies
        .iter()
        .map(|c| {
            let p = parts(container, c)?;
            for w in &p {
                client.write_files(w)?;
            }
            Ok(p)
        })
        .collect()
}

/// Watches the sources of copies and sends a copy again when its tree
/// changed. Dropping it stops the thread.
#[derive(Debug)]
pub struct Watcher {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Watches `path` and, for a directory, every directory under it (not
/// following links); for a file, its directory too (a file replaced by a
/// rename is a new inode).
fn watch_tree(w: &mut Waiter, c: &CopyPlan) {
    const MASK: u32 = vmrun_runtime::watch::DIR_CHANGES | libc::IN_MODIFY | libc::IN_ATTRIB;
    if c.kind == CopyKind::File {
        w.watch(&c.host, MASK);
        if let Some(parent) = c.host.parent() {
            w.watch(parent, vmrun_runtime::watch::DIR_CHANGES);
        }
        return;
    }
    let mut stack = vec![(c.host.clone(), 0usize)];
    while let Some((dir, depth)) = stack.pop() {
        w.watch(&dir, MASK);
        if depth >= MAX_DEPTH {
            continue;
        }
        for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push((e.path(), depth + 1));
            }
        }
    }
}

impl Watcher {
    /// Starts watching `copies`, whose content `sent` was sent to the
    /// container `container` through `client`.
    pub fn start(client: Client, container: String, copies: Vec<CopyPlan>, sent: Vec<Vec<WriteFiles>>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("copies".into())
            .spawn(move || watch_loop(&client, &container, &copies, sent, &flag))
            .map_err(|e| log::warn!("copied mounts are not kept up to date: cannot start a thread: {e}"))
            .ok();
        Self { stop, thread }
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn watch_loop(client: &Client, container: &str, copies: &[CopyPlan], mut sent: Vec<Vec<WriteFiles>>, stop: &AtomicBool) {
    let mut w = Waiter::new();
    for c in copies {
        watch_tree(&mut w, c);
    }
    while !stop.load(Ordering::SeqCst) {
        if !w.wait(Some(Instant::now() + Duration::from_millis(500))) {
            continue;
        }
        // Let the change settle: kubelet's update is several renames.
        while w.wait(Some(Instant::now() + SETTLE)) && !stop.load(Ordering::SeqCst) {}
        for (i, c) in copies.iter().enumerate() {
            watch_tree(&mut w, c);
            let now = match parts(container, c) {
                Ok(p) => p,
                Err(e) => {
                    log::warn!("copied mount {}: not updated: {e}", c.guest);
                    continue;
                }
            };
            if sent.get(i) == Some(&now) {
                continue;
            }
            log::debug!("copied mount {}: its source changed, sending it again", c.guest);
            match now.iter().try_for_each(|p| client.write_files(p)) {
                Ok(()) => {
                    if let Some(s) = sent.get_mut(i) {
                        *s = now;
                    }
                }
                Err(e) => log::warn!("copied mount {}: not updated: {e}", c.guest),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn plan(host: &Path, kind: CopyKind) -> CopyPlan {
        CopyPlan { host: host.to_path_buf(), guest: "/g".into(), kind, read_only: true }
    }

    #[test]
    fn files_and_small_trees_are_copied_larger_ones_go_on_the_disk() {
        let d = tempfile::tempdir().unwrap();
        let small = d.path().join("small");
        std::fs::create_dir(&small).unwrap();
        std::fs::write(small.join("a"), b"x").unwrap();
        assert_eq!(route(&small).unwrap(), Route::Copy(CopyKind::Directory));
        assert_eq!(route(&small.join("a")).unwrap(), Route::Copy(CopyKind::File));
        // Over the size threshold.
        let big = d.path().join("big");
        std::fs::create_dir(&big).unwrap();
        std::fs::write(big.join("half"), vec![0u8; COPY_MAX_BYTES as usize / 2]).unwrap();
        assert_eq!(route(&big).unwrap(), Route::Copy(CopyKind::Directory));
        std::fs::create_dir(big.join("sub")).unwrap();
        std::fs::write(big.join("sub/more"), vec![0u8; COPY_MAX_BYTES as usize / 2 + 1]).unwrap();
        assert_eq!(route(&big).unwrap(), Route::Disk, "counted in subdirectories");
        // Over the entry threshold.
        let many = d.path().join("many");
        std::fs::create_dir(&many).unwrap();
        for i in 0..COPY_MAX_ENTRIES {
            std::fs::write(many.join(i.to_string()), b"").unwrap();
        }
        assert_eq!(route(&many).unwrap(), Route::Disk);
        // A file too large to copy is refused; a link to a large tree is
        // not followed when measuring.
        std::fs::write(d.path().join("huge"), vec![0u8; COPY_MAX_BYTES as usize + 1]).unwrap();
        let e = route(&d.path().join("huge")).unwrap_err().to_string();
        assert!(e.contains("at most"), "{e}");
        std::os::unix::fs::symlink(&big, small.join("link")).unwrap();
        assert_eq!(route(&small).unwrap(), Route::Copy(CopyKind::Directory));
        assert!(route(&d.path().join("missing")).is_err());
    }

    #[test]
    fn trees_are_read_parents_first_links_as_links_specials_left_out() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("cm");
        std::fs::create_dir_all(src.join("..2024_a/sub")).unwrap();
        std::fs::write(src.join("..2024_a/key"), b"v1").unwrap();
        std::fs::write(src.join("..2024_a/sub/deep"), b"deep").unwrap();
        std::os::unix::fs::symlink("..2024_a", src.join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/key", src.join("key")).unwrap();
        std::os::unix::fs::symlink("/etc/shadow", src.join("outside")).unwrap();
        let fifo = std::ffi::CString::new(src.join("fifo").to_str().unwrap()).unwrap();
        // SAFETY: a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
        let p = parts("c", &plan(&src, CopyKind::Directory)).unwrap();
        assert_eq!(p.len(), 1);
        assert!(p[0].last && p[0].read_only && p[0].destination == "/g");
        let list: Vec<(&str, &CopyContent)> = p[0].entries.iter().map(|e| (e.path.as_str(), &e.content)).collect();
        let file = |s: &str| CopyContent::File { data: s.as_bytes().to_vec(), append: false };
        let link = |s: &str| CopyContent::Symlink { target: s.into() };
        assert_eq!(
            list,
            [
                ("", &CopyContent::Directory),
                ("..2024_a", &CopyContent::Directory),
                ("..data", &link("..2024_a")),
                ("key", &link("..data/key")),
                ("outside", &link("/etc/shadow")),
                ("..2024_a/key", &file("v1")),
                ("..2024_a/sub", &CopyContent::Directory),
                ("..2024_a/sub/deep", &file("deep")),
            ]
        );
        // A file copy; large files in pieces, parts within a frame.
        let f = d.path().join("f");
        let data: Vec<u8> = (0..COPY_MAX_BYTES).map(|i| (i % 253) as u8).collect();
        std::fs::write(&f, &data).unwrap();
        let p = parts("c", &plan(&f, CopyKind::File)).unwrap();
        assert!(p.len() > 1 && p.iter().filter(|w| w.last).count() == 1 && p.last().unwrap().last);
        let mut back = Vec::new();
        for (i, e) in p.iter().flat_map(|w| &w.entries).enumerate() {
            let CopyContent::File { data, append } = &e.content else { panic!("{e:?}") };
            assert_eq!(*append, i > 0);
            back.extend_from_slice(data);
        }
        assert_eq!(back, data);
        for w in &p {
            assert!(serde_json::to_vec(&vmrun_agent_protocol::Request::WriteFiles(w.clone())).unwrap().len() < 1 << 20);
        }
        // Grown over the limit since it was planned.
        std::fs::write(&f, vec![0u8; COPY_MAX_BYTES as usize + 1]).unwrap();
        assert!(parts("c", &plan(&f, CopyKind::File)).unwrap_err().to_string().contains("grew over"));
        assert!(parts("c", &plan(&src, CopyKind::File)).unwrap_err().to_string().contains("no longer a file"));
    }
}
