//! What the image store's tests share: the busybox test image, store
//! snapshots, a progress recorder, Debian's registry and a fake one.

#![allow(dead_code)]

pub mod fake;
pub mod registry;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use vmrun_images::{Digest, Progress};

/// The repository's root directory.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().expect("repository root")
}

/// The busybox test image that `tests/images/make-busybox-image.sh` makes.
#[derive(Debug)]
pub struct TestImage {
    /// Its output directory.
    pub dir: PathBuf,
    /// `digests.env`.
    pub vars: BTreeMap<String, String>,
}

impl TestImage {
    pub fn var(&self, k: &str) -> &str {
        self.vars.get(k).unwrap_or_else(|| panic!("{k} missing from digests.env"))
    }
    pub fn digest(&self, k: &str) -> Digest {
        self.var(k).parse().unwrap()
    }
    pub fn oci_layout(&self) -> PathBuf {
        self.dir.join("oci")
    }
    pub fn oci_archive(&self) -> PathBuf {
        self.dir.join("busybox-oci.tar")
    }
    pub fn docker_archive(&self) -> PathBuf {
        self.dir.join("busybox-docker.tar")
    }
}

/// Builds (or finds in the cache) the busybox test image, once per process.
pub fn busybox() -> &'static TestImage {
    static IMAGE: OnceLock<TestImage> = OnceLock::new();
    IMAGE.get_or_init(|| {
        let script = repo_root().join("tests/images/make-busybox-image.sh");
        let out = Command::new(&script).stderr(Stdio::inherit()).output().expect("run make-busybox-image.sh");
        assert!(out.status.success(), "{} failed (is busybox-static installed? scripts/deps.sh)", script.display());
        let stdout = String::from_utf8(out.stdout).unwrap();
        let dir = PathBuf::from(stdout.lines().last().expect("output directory").trim());
        let vars = fs::read_to_string(dir.join("digests.env"))
            .unwrap()
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        TestImage { dir, vars }
    })
}

/// Every file under a store (but its lock files), with its size and
/// content digest: equal snapshots mean an unchanged store.
pub fn snapshot(store: &Path) -> BTreeMap<String, (u64, Digest)> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, (u64, Digest)>) {
        for e in fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            if rel == "locks" {
                continue;
            }
            if e.file_type().unwrap().is_dir() {
                out.insert(format!("{rel}/"), (0, Digest::of(b"")));
                walk(root, &p, out);
            } else {
                let bytes = fs::read(&p).unwrap();
                out.insert(rel, (bytes.len() as u64, Digest::of(&bytes)));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(store, store, &mut out);
    out
}

/// Records what a pull or load reported.
#[derive(Debug, Default)]
pub struct Recorder {
    pub messages: Vec<String>,
    pub total: u64,
    pub started: Vec<Digest>,
    pub existing: Vec<Digest>,
    pub done: Vec<Digest>,
    pub bytes: u64,
}

impl Progress for Recorder {
    fn message(&mut self, m: &str) {
        self.messages.push(m.to_owned());
    }
    fn total(&mut self, bytes: u64) {
        self.total = bytes;
    }
    fn blob_started(&mut self, d: &Digest, _size: u64) {
        self.started.push(d.clone());
    }
    fn blob_exists(&mut self, d: &Digest, _size: u64) {
        self.existing.push(d.clone());
    }
    fn advance(&mut self, n: u64) {
        self.bytes += n;
    }
    fn blob_done(&mut self, d: &Digest) {
        self.done.push(d.clone());
    }
}

/// Asserts that an error's message is one line that contains `needle`.
#[track_caller]
pub fn assert_one_line(err: &dyn std::fmt::Display, needle: &str) {
    let msg = err.to_string();
    assert!(!msg.contains('\n'), "error message is not one line: {msg:?}");
    assert!(msg.contains(needle), "error {msg:?} does not say {needle:?}");
}

/// A port on 127.0.0.1 that nothing listens on (bound and released).
pub fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}
