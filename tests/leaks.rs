//! Nothing leaks: sandboxes started and removed one after another and
//! several at once, with networks, a VMM killed with SIGKILL, and a run
//! interrupted while its template VM boots, leave no process, TAP device,
//! mount, cgroup, file in the data directory, socket or open descriptor
//! behind; a full disk during a load leaves the image store as it was.
//!
//! A small scale for CI; `cargo bench -p vmrun --bench stress` runs the
//! same checks at 100 in a row and 20 at once. Needs root (TAP devices,
//! a small tmpfs for the full disk), the guest kernel and agent like the
//! other guest tests.

#![allow(clippy::unwrap_used)] // test code: a failed step is a failed test

mod support;

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use support::sandboxes::{Leftovers, Sandboxes};

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// One test at a time: the leak checks count the host's mounts, cgroups
/// and this process's descriptors, which the other test changes.
fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static M: std::sync::Mutex<()> = std::sync::Mutex::new(());
    M.lock().unwrap_or_else(|p| p.into_inner())
}

#[test]
fn sandboxes_leave_nothing_behind() {
    if !is_root() {
        eprintln!("skipped: needs root for TAP devices");
        return;
    }
    let _one = one_at_a_time();
    let s = Sandboxes::new(env!("CARGO_BIN_EXE_vmrun"), "leaks-home");
    s.load_busybox();
    // What runs killed earlier on this host left (a jail's record and
    // cgroups, whoever made them) is collected by any template build, so
    // first by a prune: the baselines below hold only what lives.
    s.ok(&["system", "prune", "-f"]);
    a_signal_during_a_template_build_leaves_nothing(&s);
    a_kill_during_a_template_build_is_collected(&s);
    // The templates (a boot each) are made first: they are meant to stay.
    s.warm_up();
    let before = Leftovers::now(&s.home);

    s.in_a_row(5);
    s.at_once(3, true);

    // A VMM killed in the middle of a run: seen as exited, then removed.
    let id = s.detached(&["busybox", "sleep", "1000"], false);
    let vmm = s.vmm_pid(&id);
    // SAFETY: kill of the VMM the container's state names.
    unsafe { libc::kill(vmm, libc::SIGKILL) };
    let start = Instant::now();
    while !s.ps_all().lines().any(|l| l.starts_with(&id) && l.contains("Exited")) {
        assert!(start.elapsed() < Duration::from_secs(60), "{}", s.ps_all());
        std::thread::sleep(Duration::from_millis(200));
    }
    s.ok(&["rm", &id]);
    // The store is intact: the image still runs.
    s.ok(&["run", "--rm", "busybox", "true"]);

    let after = Leftovers::now(&s.home);
    assert!(before == after, "leftovers after the runs:\n{}", before.changes(&after));
}

/// SIGINT to a `vmrun run` while its template VM boots: the run exits 130,
/// and the build leaves no work directory, VMM, jail cgroup or container.
fn a_signal_during_a_template_build_leaves_nothing(s: &Sandboxes) {
    let before = Leftovers::now(&s.home);
    let run = run_until_its_template_vm_runs(s);
    // SAFETY: a signal to our own child.
    unsafe { libc::kill(run.id() as i32, libc::SIGINT) };
    let out = run.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "{}", String::from_utf8_lossy(&out.stderr));
    let after = Leftovers::now(&s.home);
    let builds: Vec<_> = after.files.iter().filter(|f| f.contains(".build-")).collect();
    assert!(builds.is_empty(), "the template build's work directory is left: {builds:?}");
    assert!(kept(&before) == kept(&after), "an interrupted template build left:\n{}", before.changes(&after));
}

/// Starts `vmrun run --rm busybox true` in a data directory with no
/// template and returns once its template VM runs (and its jail is in
/// place, cgroup made), with its standard error piped.
fn run_until_its_template_vm_runs(s: &Sandboxes) -> std::process::Child {
    let mut run = s.cmd(&["run", "--rm", "busybox", "true"]).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    let start = Instant::now();
    while !Leftovers::now(&s.home).processes.contains_key("vmrun-vmm --config") {
        assert!(run.try_wait().unwrap().is_none(), "the run ended before its template VM started");
        assert!(start.elapsed() < Duration::from_secs(120), "no template VM after 2 minutes");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(1));
    run
}

/// What a killed run must not leave for good (the data directory's own
/// files aside).
fn kept(l: &Leftovers) -> impl PartialEq {
    (l.processes.clone(), l.taps.clone(), l.mounts, l.containers.clone(), l.sockets, l.cgroups.clone(), l.jails.clone())
}

/// `kill -9` of a `vmrun run` while its template VM boots: nothing can
/// clean up in the moment, so the work directory, the jail's record, root
/// and cgroups stay; `vmrun system prune` finds and removes them all.
fn a_kill_during_a_template_build_is_collected(s: &Sandboxes) {
    let before = Leftovers::now(&s.home);
    let mut run = run_until_its_template_vm_runs(s);
    run.kill().unwrap();
    run.wait().unwrap();
    // The VMM dies with it (its parent-death signal), its jail's outer
    // process first: wait until no vmrun process of this data directory
    // is left.
    let start = Instant::now();
    while !Leftovers::now(&s.home).processes.is_empty() {
        assert!(start.elapsed() < Duration::from_secs(30), "{:?}", Leftovers::now(&s.home).processes);
        std::thread::sleep(Duration::from_millis(100));
    }
    let left = Leftovers::now(&s.home);
    assert!(left.files.iter().any(|f| f.contains(".build-")), "no work directory left to collect: {:?}", left.files);
    assert!(left.jails.len() > before.jails.len(), "no jail record left to collect");

    let o = s.ok(&["system", "prune", "-f"]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains(".build-"), "prune did not say what it removed: {out}");
    let after = Leftovers::now(&s.home);
    let builds: Vec<_> = after.files.iter().filter(|f| f.contains(".build-")).collect();
    assert!(builds.is_empty(), "prune left the build's work directory: {builds:?}");
    assert!(kept(&before) == kept(&after), "prune left what the killed run made:\n{}", before.changes(&after));
}

#[test]
fn a_full_disk_during_a_load_leaves_the_store_consistent() {
    if !is_root() {
        eprintln!("skipped: needs root to mount a small tmpfs");
        return;
    }
    let _one = one_at_a_time();
    let dir = support::scratch("full-disk");
    std::fs::create_dir_all(&dir).unwrap();
    let mounted = std::process::Command::new("mount").args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"]).arg(&dir).status().unwrap();
    assert!(mounted.success());
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(self.0).status();
        }
    }
    let _unmount = Unmount(&dir);
    let vmrun = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_vmrun")).args(args).env("VMRUN_HOME", &dir).output().unwrap()
    };
    // The busybox image (about 1 MiB compressed) does not fit in 1 MiB with
    // the store's files.
    let archive = support::busybox_image().join("busybox-oci.tar");
    let o = vmrun(&["load", "-i", archive.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{}", String::from_utf8_lossy(&o.stderr));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("No space left") || err.contains("space"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    // No image; every blob there is whole (its name is its digest: the
    // ones that made it before the disk filled up, for gc to take); no
    // staging directory left.
    let images = vmrun(&["images"]);
    assert!(images.status.success());
    assert_eq!(String::from_utf8_lossy(&images.stdout).lines().count(), 1, "only the header: {}", String::from_utf8_lossy(&images.stdout));
    let blobs = dir.join("images/blobs/sha256");
    for b in std::fs::read_dir(&blobs).into_iter().flatten().flatten() {
        let out = std::process::Command::new("sha256sum").arg(b.path()).output().unwrap();
        let sum = String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap_or_default().to_string();
        assert_eq!(sum, b.file_name().to_string_lossy(), "a damaged blob in the store");
    }
    let staging = std::fs::read_dir(dir.join("images/tmp")).map(|d| d.count()).unwrap_or(0);
    assert_eq!(staging, 0, "staging directories left");

    // With room again, the same load works.
    let remount = std::process::Command::new("mount").args(["-o", "remount,size=64m"]).arg(&dir).status().unwrap();
    assert!(remount.success());
    let o = vmrun(&["load", "-i", archive.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&vmrun(&["images"]).stdout).contains("busybox"));
}
