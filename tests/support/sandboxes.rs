//! Many sandboxes through the `vmrun` command line, and what they may leave
//! behind: for the leak test and the stress benchmark.

#![allow(clippy::unwrap_used)] // test code: a failed step is a failed test

use std::collections::BTreeMap;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// A data directory and the `vmrun` to drive.
pub struct Sandboxes {
    pub vmrun: PathBuf,
    pub home: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

/// What a host keeps of sandboxes: it must be the same before and after.
#[derive(Debug, PartialEq, Eq)]
pub struct Leftovers {
    /// `vmrun` and `vmrun-vmm` processes (supervisors, VMMs) by their
    /// command name and first argument.
    pub processes: BTreeMap<String, usize>,
    /// Network interfaces named `vmrun-*`.
    pub taps: Vec<String>,
    /// Mount points (this mount namespace).
    pub mounts: usize,
    /// Entries under the data directory's `containers/`.
    pub containers: Vec<String>,
    /// Sockets under the data directory.
    pub sockets: usize,
    /// Every other path under the data directory, relative to it.
    pub files: Vec<String>,
    /// File descriptors open in this process (the one driving `vmrun`).
    pub fds: usize,
    /// Cgroups named `vmrun*` under /sys/fs/cgroup (any hierarchy, at any
    /// depth: a jail's cgroup sits under its caller's).
    pub cgroups: Vec<String>,
    /// Jail records and roots under /run/vmrun-jail.
    pub jails: Vec<String>,
}

/// Directories named `vmrun*` in the cgroup tree below `dir`.
fn vmrun_cgroups(dir: &Path, depth: usize, out: &mut Vec<String>) {
    if depth == 0 {
        return;
    }
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if !e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            continue;
        }
        if e.file_name().to_string_lossy().starts_with("vmrun") {
            out.push(e.path().display().to_string());
        }
        vmrun_cgroups(&e.path(), depth - 1, out);
    }
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let p = e.path();
        if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            walk(&p, out);
        }
        out.push(p);
    }
}

impl Leftovers {
    /// What is there now for the data directory `home`.
    pub fn now(home: &Path) -> Self {
        let mut processes = BTreeMap::new();
        for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            let args: Vec<String> = cmdline.split(|b| *b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
            let exe = args.first().map(|a| a.rsplit('/').next().unwrap_or("").to_string()).unwrap_or_default();
            let mentions_home = args.iter().any(|a| a.contains(&*home.to_string_lossy()));
            if (exe == "vmrun" || exe == "vmrun-vmm") && mentions_home {
                *processes.entry(format!("{exe} {}", args.get(1).cloned().unwrap_or_default())).or_insert(0) += 1;
            }
        }
        let taps = std::fs::read_dir("/sys/class/net")
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("vmrun-"))
            .collect();
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default().lines().count();
        let mut containers: Vec<String> = std::fs::read_dir(home.join("containers"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| !n.starts_with('.'))
            .collect();
        containers.sort();
        let mut all = Vec::new();
        walk(home, &mut all);
        let (sockets, others): (Vec<PathBuf>, Vec<PathBuf>) =
            all.into_iter().partition(|p| std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_socket()));
        let sockets = sockets.len();
        let mut files: Vec<String> =
            others.iter().filter_map(|p| p.strip_prefix(home).ok()).map(|p| p.display().to_string()).collect();
        files.sort();
        let fds = std::fs::read_dir("/proc/self/fd").into_iter().flatten().count();
        let mut cgroups = Vec::new();
        vmrun_cgroups(Path::new("/sys/fs/cgroup"), 8, &mut cgroups);
        cgroups.sort();
        let mut jails: Vec<String> = std::fs::read_dir("/run/vmrun-jail")
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        jails.sort();
        Self { processes, taps, mounts, containers, sockets, files, fds, cgroups, jails }
    }

    /// What `later` has that `self` had not (or lacks), a line per kind;
    /// empty when they are the same.
    pub fn changes(&self, later: &Self) -> String {
        let mut out = String::new();
        let mut kind = |name: &str, before: String, after: String| {
            if before != after {
                out.push_str(&format!("{name}: {before} -> {after}\n"));
            }
        };
        kind("processes", format!("{:?}", self.processes), format!("{:?}", later.processes));
        kind("taps", format!("{:?}", self.taps), format!("{:?}", later.taps));
        kind("mounts", self.mounts.to_string(), later.mounts.to_string());
        kind("containers", format!("{:?}", self.containers), format!("{:?}", later.containers));
        kind("sockets", self.sockets.to_string(), later.sockets.to_string());
        let added: Vec<_> = later.files.iter().filter(|f| !self.files.contains(f)).collect();
        let removed: Vec<_> = self.files.iter().filter(|f| !later.files.contains(f)).collect();
        kind("files", format!("removed {removed:?}"), format!("added {added:?}"));
        kind("fds", self.fds.to_string(), later.fds.to_string());
        kind("cgroups", format!("{:?}", self.cgroups), format!("{:?}", later.cgroups));
        kind("jails", format!("{:?}", self.jails), format!("{:?}", later.jails));
        out
    }
}

impl Sandboxes {
    /// A fresh data directory under the test's scratch directory, driving
    /// `vmrun` (the tests' `CARGO_BIN_EXE_vmrun`).
    pub fn new(vmrun: &str, name: &str) -> Self {
        super::build_vmm(vmrun);
        Self { vmrun: vmrun.into(), home: super::scratch(name), kernel: super::kernel().to_path_buf(), initrd: super::agent_initrd() }
    }

    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.vmrun);
        c.args(args)
            .env("VMRUN_HOME", &self.home)
            .env("VMRUN_KERNEL", &self.kernel)
            .env("VMRUN_AGENT_INITRD", &self.initrd)
            .stdin(Stdio::null());
        c
    }

    /// Runs `vmrun args`; fails the caller if it fails.
    pub fn ok(&self, args: &[&str]) -> Output {
        let o = self.cmd(args).output().unwrap_or_else(|e| panic!("vmrun {args:?}: {e}"));
        assert!(o.status.success(), "vmrun {args:?}: {}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
        o
    }

    /// Loads the busybox image.
    pub fn load_busybox(&self) {
        let archive = super::busybox_image().join("busybox-oci.tar");
        self.ok(&["load", "-i", &archive.to_string_lossy()]);
    }

    /// Loads the busybox image and makes the templates (a boot each, the
    /// network one too): they stay, and are not leftovers.
    pub fn warm_up(&self) {
        self.load_busybox();
        self.ok(&["run", "--rm", "busybox", "true"]);
        self.ok(&["run", "--rm", "--network", "tap", "busybox", "true"]);
    }

    /// `n` sandboxes one after another, each run to its end and removed.
    pub fn in_a_row(&self, n: usize) {
        for i in 0..n {
            let o = self.ok(&["run", "--rm", "busybox", "sh", "-c", &format!("echo run-{i}")]);
            assert_eq!(String::from_utf8_lossy(&o.stdout), format!("run-{i}\n"));
        }
    }

    /// Starts a detached sandbox; returns its id.
    pub fn detached(&self, args: &[&str], network: bool) -> String {
        let mut all = vec!["run", "-d"];
        if network {
            all.extend(["--network", "tap"]);
        }
        all.extend(args);
        String::from_utf8_lossy(&self.ok(&all).stdout).trim().to_string()
    }

    /// `n` detached sandboxes started at once (with networks if asked),
    /// each checked to answer an exec, then all removed with `rm -f`.
    pub fn at_once(&self, n: usize, network: bool) {
        let ids: Vec<String> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..n).map(|_| s.spawn(|| self.detached(&["busybox", "sleep", "100000"], network))).collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for id in &ids {
            let o = self.ok(&["exec", id, "sh", "-c", "echo alive"]);
            assert_eq!(String::from_utf8_lossy(&o.stdout), "alive\n");
        }
        let mut rm = vec!["rm", "-f"];
        rm.extend(ids.iter().map(String::as_str));
        self.ok(&rm);
    }

    /// The pid of a container's VMM.
    pub fn vmm_pid(&self, id: &str) -> i32 {
        let text = std::fs::read_to_string(self.home.join("containers").join(id).join("state.json")).unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        v["vmm"]["pid"].as_i64().unwrap() as i32
    }

    pub fn ps_all(&self) -> String {
        String::from_utf8_lossy(&self.ok(&["ps", "-a"]).stdout).into_owned()
    }
}
