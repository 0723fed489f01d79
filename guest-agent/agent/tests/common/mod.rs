//! Helpers shared by the agent's tests: layers built in memory (the tar
//! crate, or raw headers for what it refuses to write), layer disks, temp
//! directories, and the agent started as a host process.

#![allow(dead_code, clippy::unwrap_used)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use vmrun_layerdisk::{Blob, Digest};

pub const TAR: &str = "application/vnd.oci.image.layer.v1.tar";
pub const GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";

/// The tests create namespaces, mount, chown and mknod: they need root,
/// which CI has. Elsewhere, `VMRUN_SKIP_ROOT_TESTS=1` skips them (loudly).
pub fn require_root() -> bool {
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    if std::env::var_os("VMRUN_SKIP_ROOT_TESTS").is_some() {
        eprintln!("SKIPPED: not root (VMRUN_SKIP_ROOT_TESTS is set)");
        return false;
    }
    panic!("these tests need root (CI runs them as root); set VMRUN_SKIP_ROOT_TESTS=1 to skip them");
}

/// A directory removed when dropped.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!("vmrun-agent-test-{}-{tag}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed)));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A layer being built.
pub struct Layer(tar::Builder<Vec<u8>>);

fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_mtime(1_600_000_000);
    h.set_uid(0);
    h.set_gid(0);
    h
}

impl Default for Layer {
    fn default() -> Self {
        Self::new()
    }
}

impl Layer {
    pub fn new() -> Self {
        Self(tar::Builder::new(Vec::new()))
    }

    pub fn dir(&mut self, path: &str, mode: u32) -> &mut Self {
        let mut h = header(tar::EntryType::Directory, mode, 0);
        self.0.append_data(&mut h, path, &[][..]).unwrap();
        self
    }

    pub fn file(&mut self, path: &str, mode: u32, data: &[u8]) -> &mut Self {
        self.file_full(path, mode, 0, 0, 1_600_000_000, data)
    }

    pub fn file_full(&mut self, path: &str, mode: u32, uid: u64, gid: u64, mtime: u64, data: &[u8]) -> &mut Self {
        let mut h = header(tar::EntryType::Regular, mode, data.len() as u64);
        h.set_uid(uid);
        h.set_gid(gid);
        h.set_mtime(mtime);
        self.0.append_data(&mut h, path, data).unwrap();
        self
    }

    pub fn symlink(&mut self, path: &str, target: &str) -> &mut Self {
        self.raw(path.as_bytes(), tar::EntryType::Symlink, target.as_bytes(), &[])
    }

    pub fn hardlink(&mut self, path: &str, target: &str) -> &mut Self {
        self.raw(path.as_bytes(), tar::EntryType::Link, target.as_bytes(), &[])
    }

    pub fn device(&mut self, path: &str, kind: tar::EntryType, major: u32, minor: u32) -> &mut Self {
        let mut h = header(kind, 0o666, 0);
        h.set_device_major(major).unwrap();
        h.set_device_minor(minor).unwrap();
        self.0.append_data(&mut h, path, &[][..]).unwrap();
        self
    }

    /// An entry written header byte by header byte: the tar crate refuses
    /// `..` and absolute paths, which the malicious corpus needs.
    pub fn raw(&mut self, path: &[u8], kind: tar::EntryType, link: &[u8], data: &[u8]) -> &mut Self {
        assert!(path.len() < 100 && link.len() < 100);
        let mut h = header(kind, 0o777, data.len() as u64);
        {
            let b = h.as_mut_bytes();
            b[..100].fill(0);
            b[..path.len()].copy_from_slice(path);
            b[157..257].fill(0);
            b[157..157 + link.len()].copy_from_slice(link);
        }
        if kind != tar::EntryType::Symlink && kind != tar::EntryType::Link {
            h.set_mode(0o644);
        }
        h.set_cksum();
        self.0.append(&h, data).unwrap();
        self
    }

    pub fn finish(self) -> Vec<u8> {
        self.0.into_inner().unwrap()
    }
}

pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

pub fn zstd(data: &[u8]) -> Vec<u8> {
    ruzstd::encoding::compress_to_vec(data, ruzstd::encoding::CompressionLevel::Fastest)
}

/// A layer disk holding `blobs` (content, media type) and their digests.
pub fn disk(blobs: &[(Vec<u8>, &str)]) -> (Vec<u8>, Vec<Digest>) {
    let mut bs: Vec<Blob<&[u8]>> = blobs
        .iter()
        .map(|(d, mt)| Blob { digest: Digest::of(d), media_type: mt.to_string(), size: d.len() as u64, data: &d[..] })
        .collect();
    let mut out = Vec::new();
    let index = vmrun_layerdisk::write(&mut out, &mut bs).unwrap();
    (out, index.entries.iter().map(|e| e.digest).collect())
}

/// Writes a layer disk file and returns its path and digests.
pub fn disk_file(dir: &Path, name: &str, blobs: &[(Vec<u8>, &str)]) -> (PathBuf, Vec<Digest>) {
    let (bytes, digests) = disk(blobs);
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    (p, digests)
}

/// The static busybox the images of the tests run (Debian's
/// busybox-static, which scripts/deps.sh installs).
pub fn busybox() -> Vec<u8> {
    for p in ["/bin/busybox", "/usr/bin/busybox"] {
        if let Ok(b) = std::fs::read(p) {
            return b;
        }
    }
    panic!("/bin/busybox not found: install busybox-static (scripts/deps.sh does)");
}

/// A small image: busybox and its applets, /etc/passwd and /etc/group
/// with a user `alice` (1000:1000), a non-executable /bin/notexec and a
/// marker file; in three layers (plain tar, gzip, zstd).
pub fn test_image(dir: &Path) -> (PathBuf, Vec<Digest>) {
    test_image_plus(dir, Vec::new())
}

/// [`test_image`] with more (plain tar) layers on top.
pub fn test_image_plus(dir: &Path, more: Vec<Vec<u8>>) -> (PathBuf, Vec<Digest>) {
    let mut base = Layer::new();
    base.dir("bin", 0o755).dir("etc", 0o755).dir("tmp", 0o1777);
    base.file("bin/busybox", 0o755, &busybox());
    for applet in ["sh", "echo", "cat", "sleep", "id", "hostname", "pwd", "env", "ls", "true", "false", "head", "yes", "stty", "test", "wc", "tr"] {
        base.symlink(&format!("bin/{applet}"), "busybox");
    }
    base.file("etc/passwd", 0o644, b"root:x:0:0:root:/root:/bin/sh\nalice:x:1000:1000::/home/alice:/bin/sh\n");
    base.file("etc/group", 0o644, b"root:x:0:root\nwheel:x:10:root,alice\nalice:x:1000:\n");
    let mut second = Layer::new();
    second.file("bin/notexec", 0o644, b"#!/bin/sh\necho should not run\n");
    second.file("marker", 0o644, b"from the image\n");
    let mut third = Layer::new();
    third.dir("srv", 0o755).file("srv/zstd-layer", 0o600, b"zstd\n");
    let mut layers = vec![(base.finish(), TAR), (gzip(&second.finish()), GZIP), (zstd(&third.finish()), ZSTD)];
    layers.extend(more.into_iter().map(|l| (l, TAR)));
    disk_file(dir, "image.disk", &layers)
}

/// The agent running as a host process behind a Unix socket.
pub struct Agent {
    pub child: Child,
    pub socket: PathBuf,
    pub root: PathBuf,
    pub dir: TempDir,
}

impl Agent {
    pub fn start() -> Self {
        let dir = TempDir::new("agent");
        let socket = dir.path().join("agent.sock");
        let root = dir.path().join("containers");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_vmrun-agent"));
        cmd.arg("--listen-unix").arg(&socket).arg("--root").arg(&root);
        if std::env::var_os("VMRUN_AGENT_DEBUG").is_some() {
            cmd.arg("--debug");
        }
        let child = cmd.spawn().unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while !socket.exists() {
            assert!(Instant::now() < deadline, "the agent did not create its socket");
            std::thread::sleep(Duration::from_millis(20));
        }
        Self { child, socket, root, dir }
    }

    pub fn client(&self) -> vmrun_agent_client::Client {
        self.client_with(false)
    }

    /// A client whose requests may follow its hello before the answer
    /// (`defer_hello`, as for a restored VM's agent).
    pub fn client_with(&self, defer_hello: bool) -> vmrun_agent_client::Client {
        let opts = vmrun_agent_client::Options {
            handshake_timeout: Duration::from_secs(20),
            request_timeout: Duration::from_secs(30),
            create_timeout: Duration::from_secs(120),
            defer_hello,
        };
        vmrun_agent_client::Client::connect_unix(&self.socket, opts).unwrap()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
