//! The OCI runtime end to end: `vmrun-oci` driven as runc callers drive
//! it (bundles, create/start/state/kill/delete/exec/ps, pid files, exit
//! statuses reaped as a subreaper, a console socket), its refusals of bad
//! input, and containerd running containers through
//! `containerd-shim-vmrun-v2` (`ctr run --runtime io.containerd.vmrun.v2`).
//!
//! The tests share one data directory: the first container builds the
//! warm-start template (one boot, minutes where guest kernel mode is
//! emulated), the others restore it; tests that start VMs take turns. Needs
//! the guest kernel (`VMRUN_TEST_KERNEL`, see `support/mod.rs`), the agent
//! initramfs (`VMRUN_AGENT_INITRD`, else `rootfs/build.sh` builds it), the
//! `vmrun-vmm` binary beside `vmrun-oci` (built here if missing),
//! and for the containerd test root and Debian's containerd.

#![allow(clippy::unwrap_used)] // test code: a failed step is a failed test

mod support;

use std::fs::File;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

const OCI: &str = env!("CARGO_BIN_EXE_vmrun-oci");
const SHIM: &str = env!("CARGO_BIN_EXE_containerd-shim-vmrun-v2");

struct Env {
    home: PathBuf,
    kernel: PathBuf,
    initrd: PathBuf,
}

/// The data directory, kernel and agent the tests share.
fn shared() -> &'static Env {
    static E: OnceLock<Env> = OnceLock::new();
    E.get_or_init(|| {
        support::build_vmm(OCI);
        // Supervisors outlive the `create` that starts them: as a subreaper
        // this process inherits them and reaps their exit statuses, as
        // containerd's shim does.
        // SAFETY: prctl(PR_SET_CHILD_SUBREAPER) only changes who reaps
        // this process's orphaned descendants.
        assert_eq!(unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1) }, 0);
        Env { home: support::scratch("oci-home"), kernel: support::kernel().to_path_buf(), initrd: support::agent_initrd() }
    })
}

/// Tests that start VMs take turns (two cores; guest kernel code is slow
/// where it is emulated).
fn vm_turn() -> MutexGuard<'static, ()> {
    static M: Mutex<()> = Mutex::new(());
    M.lock().unwrap_or_else(|p| p.into_inner())
}

fn oci(root: &Path, args: &[&str]) -> Command {
    let e = shared();
    let mut c = Command::new(OCI);
    c.arg("--root")
        .arg(root)
        .args(args)
        .env("VMRUN_HOME", &e.home)
        .env("VMRUN_KERNEL", &e.kernel)
        .env("VMRUN_AGENT_INITRD", &e.initrd)
        .stdin(Stdio::null());
    c
}

fn run(root: &Path, args: &[&str]) -> Output {
    oci(root, args).output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn assert_ok(o: &Output) {
    assert!(o.status.success(), "status {:?}\nstdout: {}\nstderr: {}", o.status, text(&o.stdout), text(&o.stderr));
}

/// Exit status 1 and `needle` in the error.
fn assert_fails(o: &Output, needle: &str) {
    assert_eq!(o.status.code(), Some(1), "stdout: {}\nstderr: {}", text(&o.stdout), text(&o.stderr));
    let err = text(&o.stderr);
    assert!(err.contains(needle), "expected {needle:?} in: {err}");
    assert!(!err.contains("panicked"), "{err}");
}

fn state(root: &Path, id: &str) -> serde_json::Value {
    let o = run(root, &["state", id]);
    assert_ok(&o);
    serde_json::from_slice(&o.stdout).unwrap()
}

/// The busybox test image's layer, unpacked into `dir` (our own test
/// image: trusted).
fn unpack_busybox(dir: &Path) {
    let image = support::busybox_image();
    let env = std::fs::read_to_string(image.join("digests.env")).unwrap();
    let layer = env.lines().find_map(|l| l.strip_prefix("LAYER_DIGEST=sha256:")).unwrap().trim().to_string();
    std::fs::create_dir_all(dir).unwrap();
    support::run_ok(Command::new("tar").arg("-xzf").arg(image.join("oci/blobs/sha256").join(layer)).arg("-C").arg(dir));
}

/// A bundle: the busybox root in `rootfs`, and `vmrun-oci spec`'s
/// config.json running `args` without a terminal, changed by `edit`.
fn bundle(name: &str, args: &[&str], edit: impl FnOnce(&mut serde_json::Value)) -> PathBuf {
    let dir = support::scratch(name);
    unpack_busybox(&dir.join("rootfs"));
    assert_ok(&Command::new(OCI).args(["spec", "--bundle"]).arg(&dir).output().unwrap());
    let path = dir.join("config.json");
    let mut spec: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    spec["process"]["args"] = serde_json::json!(args);
    spec["process"]["terminal"] = false.into();
    spec["root"]["readonly"] = false.into();
    edit(&mut spec);
    std::fs::write(&path, spec.to_string()).unwrap();
    dir
}

/// Waits (up to 3 minutes) for the child `pid` (an orphan this subreaper
/// inherited) and returns its exit status, 128+N for signal N.
fn wait_pid(pid: i32, root: &Path, id: &str) -> i32 {
    let start = Instant::now();
    loop {
        let mut status = 0;
        // SAFETY: waitpid on a child of this process.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        assert!(r >= 0, "waitpid {pid}: {}", std::io::Error::last_os_error());
        if r == pid {
            return if libc::WIFEXITED(status) { libc::WEXITSTATUS(status) } else { 128 + libc::WTERMSIG(status) };
        }
        if start.elapsed() > Duration::from_secs(180) {
            let log = std::fs::read_to_string(root.join(id).join("vmrun-oci.log")).unwrap_or_default();
            panic!("container {id} (pid {pid}) did not end; its log:\n{log}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Creates container `id` from `bundle` with a pid file (its standard
/// streams in `out` and `err`); returns its pid.
fn create(root: &Path, bundle: &Path, id: &str, out: &Path, err: &Path) -> i32 {
    let pid_file = bundle.join(format!("{id}.pid"));
    let t = Instant::now();
    let status = oci(root, &["create", "--bundle", bundle.to_str().unwrap(), "--pid-file", pid_file.to_str().unwrap(), id])
        .stdout(File::create(out).unwrap())
        .stderr(File::create(err).unwrap())
        .status()
        .unwrap();
    let log = std::fs::read_to_string(root.join(id).join("vmrun-oci.log")).unwrap_or_default();
    assert!(status.success(), "create {id}: {status:?}\nstderr: {}\nlog: {log}", std::fs::read_to_string(err).unwrap_or_default());
    eprintln!("oci test: create {id}: {:.1} s", t.elapsed().as_secs_f64());
    let pid: i32 = std::fs::read_to_string(&pid_file).unwrap().parse().expect("a pid file holds the pid alone");
    let s = state(root, id);
    assert_eq!(s["status"], "created", "{s}");
    assert_eq!(s["pid"], pid, "{s}");
    assert_eq!(s["id"], id);
    assert_eq!(s["bundle"], bundle.to_str().unwrap());
    pid
}

#[test]
fn oci_runtime_runs_a_container_like_runc() {
    let _turn = vm_turn();
    let root = support::scratch("oci-root-lifecycle");
    // A network namespace to join by path.
    let mut netns = Command::new("unshare").args(["--net", "sleep", "1000"]).spawn().unwrap();
    let netns_path = format!("/proc/{}/ns/net", netns.id());
    let ns_of = |pid: &str, ns: &str| std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while ns_of(&netns.id().to_string(), "net") == ns_of("self", "net") {
        assert!(Instant::now() < deadline, "unshare --net made no network namespace");
        std::thread::sleep(Duration::from_millis(20));
    }
    // linux.seccomp fails mkdir with ENOSPC.
    let b = bundle("bundle-echo", &["sh", "-c", "echo hello-oci; echo to-stderr >&2; mkdir /tmp/blocked || exit 3"], |s| {
        s["linux"]["namespaces"] = serde_json::json!([
            { "type": "pid" }, { "type": "network", "path": netns_path }, { "type": "ipc" }, { "type": "uts" }, { "type": "mount" }
        ]);
        s["annotations"] = serde_json::json!({ "org.example.note": "kept" });
        s["linux"]["seccomp"] = serde_json::json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [{ "names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": libc::ENOSPC }]
        });
    });
    let (out, err) = (support::scratch("echo.out"), support::scratch("echo.err"));
    let pid = create(&root, &b, "c-echo", &out, &err);
    assert_eq!(state(&root, "c-echo")["annotations"]["org.example.note"], "kept");
    // The container's pid on the host is in the spec's namespaces: the
    // network one joined, new ones of the other types it names, the
    // host's of those it does not.
    let p = pid.to_string();
    assert_eq!(ns_of(&p, "net"), ns_of(&netns.id().to_string(), "net"), "joined by path");
    for ns in ["pid", "ipc", "uts", "mnt"] {
        assert_ne!(ns_of(&p, ns), ns_of("self", ns), "a new {ns} namespace");
    }
    for ns in ["user", "cgroup"] {
        assert_eq!(ns_of(&p, ns), ns_of("self", ns), "the host's {ns} namespace");
    }
    let supervisor = serde_json::from_slice::<serde_json::Value>(&std::fs::read(root.join("c-echo/state.json")).unwrap()).unwrap()["owner"]["pid"]
        .as_i64()
        .unwrap() as i32;
    assert_eq!(ns_of(&supervisor.to_string(), "net"), ns_of("self", "net"), "the supervisor stays in the host's namespaces");
    let ps = run(&root, &["ps", "--format", "json", "c-echo"]);
    assert_ok(&ps);
    assert_eq!(serde_json::from_slice::<Vec<i32>>(&ps.stdout).unwrap(), [pid, supervisor]);

    let t = Instant::now();
    assert_ok(&run(&root, &["start", "c-echo"]));
    assert_fails(&run(&root, &["start", "c-echo"]), "cannot start");
    assert_eq!(wait_pid(pid, &root, "c-echo"), 3, "the container's pid exits with the process's code");
    eprintln!("oci test: start to exit: {:.1} s", t.elapsed().as_secs_f64());
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "hello-oci\n");
    let stderr = std::fs::read_to_string(&err).unwrap();
    assert!(stderr.contains("to-stderr") && stderr.contains("No space left on device"), "{stderr}");
    let s = state(&root, "c-echo");
    assert_eq!((s["status"].as_str(), s["pid"].as_i64()), (Some("stopped"), Some(0)), "{s}");
    assert_fails(&run(&root, &["kill", "c-echo", "TERM"]), "not running");

    assert_ok(&run(&root, &["delete", "c-echo"]));
    assert!(!root.join("c-echo").exists(), "delete leaves nothing");
    assert_fails(&run(&root, &["state", "c-echo"]), "does not exist");
    let _ = netns.kill();
    let _ = netns.wait();
}

/// As under runc, where the container writes into the bundle's root
/// itself: what it made, changed and removed there is in the bundle once
/// it is stopped (its root in the guest is an overlay of a copy, whose
/// changes are written back when its process ends).
#[test]
fn oci_runtime_writes_the_containers_changes_back_into_the_bundle() {
    use std::os::unix::fs::PermissionsExt;
    let _turn = vm_turn();
    let root = support::scratch("oci-root-writeback");
    let script = "set -e; echo new > /new; chmod 604 /new; mkdir -p /made/deep; echo deep > /made/deep/f; ln -s new /link; \
                  echo more >> /kept; rm -r /gone-dir; rm /gone-file; rm -r /again; mkdir /again; echo fresh > /again/f; \
                  dd if=/dev/urandom of=/big bs=64k count=20 2>/dev/null; sha256sum /big > /big.sum; rm /bin/ls";
    let b = bundle("bundle-writeback", &["sh", "-c", script], |_| {});
    let r = b.join("rootfs");
    std::fs::create_dir_all(r.join("gone-dir/a")).unwrap();
    std::fs::write(r.join("gone-dir/a/f"), "x").unwrap();
    std::fs::write(r.join("gone-file"), "x").unwrap();
    std::fs::create_dir_all(r.join("again")).unwrap();
    std::fs::write(r.join("again/old"), "old").unwrap();
    std::fs::write(r.join("kept"), "kept\n").unwrap();
    // A link in the bundle the container sees as a plain name: nothing is
    // written through it.
    let outside = support::scratch("writeback-outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::os::unix::fs::symlink(&outside, r.join("out")).unwrap();

    let (out, err) = (support::scratch("writeback.out"), support::scratch("writeback.err"));
    let pid = create(&root, &b, "c-wb", &out, &err);
    assert!(!r.join("new").exists(), "nothing is written back before the process runs");
    assert_ok(&run(&root, &["start", "c-wb"]));
    assert_eq!(wait_pid(pid, &root, "c-wb"), 0, "{}", std::fs::read_to_string(&err).unwrap());
    assert_eq!(state(&root, "c-wb")["status"], "stopped");

    let read = |p: &str| std::fs::read_to_string(r.join(p)).unwrap_or_else(|e| panic!("{p}: {e}"));
    assert_eq!(read("new"), "new\n");
    assert_eq!(std::fs::metadata(r.join("new")).unwrap().permissions().mode() & 0o7777, 0o604);
    assert_eq!(read("made/deep/f"), "deep\n");
    assert_eq!(std::fs::read_link(r.join("link")).unwrap().to_str(), Some("new"));
    assert_eq!(read("kept"), "kept\nmore\n");
    assert!(!r.join("gone-dir").exists() && !r.join("gone-file").exists() && !r.join("bin/ls").exists());
    assert!(r.join("bin/sh").exists(), "what the container left alone stays");
    let again: Vec<_> = std::fs::read_dir(r.join("again")).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(again, ["f"], "a directory removed and made again holds only its new entries");
    // 1.25 MiB: written back in several parts, whole.
    let big = std::fs::read(r.join("big")).unwrap();
    assert_eq!(big.len(), 20 << 16);
    let sum = Command::new("sha256sum").arg(r.join("big")).output().unwrap();
    assert_eq!(text(&sum.stdout).split_whitespace().next(), read("big.sum").split_whitespace().next());
    assert!(std::fs::read_link(r.join("out")).is_ok() && std::fs::read_dir(&outside).unwrap().count() == 0);
    assert_ok(&run(&root, &["delete", "c-wb"]));
}

/// Roots laid out as containerd's overlay snapshotter makes them (an
/// overlay of the image's snapshot and the container's own empty upper
/// directory): the image's root is copied once, the copy shared by the
/// containers of that snapshot, and each container's changes reach its
/// own upper directory, not the snapshot or the other container.
#[test]
fn oci_roots_of_one_snapshot_share_one_copy() {
    let _turn = vm_turn();
    let root = support::scratch("oci-root-shared");
    let lower = support::scratch("shared-snapshot");
    unpack_busybox(&lower);
    struct Unmount(Vec<PathBuf>);
    impl Drop for Unmount {
        fn drop(&mut self) {
            for m in &self.0 {
                let _ = Command::new("umount").arg(m).status();
            }
        }
    }
    let mut mounted = Unmount(Vec::new());
    let copies = shared().home.join("rootfs-copies");
    let disks = || -> Vec<(String, u64)> {
        use std::os::unix::fs::MetadataExt;
        let mut d: Vec<_> = std::fs::read_dir(&copies)
            .map(|d| d.flatten().filter(|e| e.file_name().to_string_lossy().ends_with(".disk")).map(|e| (e.file_name().to_string_lossy().into_owned(), e.metadata().unwrap().ino())).collect())
            .unwrap_or_default();
        d.sort();
        d
    };
    let before = disks();
    let (mut made, mut uppers) = (Vec::new(), Vec::new());
    for name in ["a", "b"] {
        let b = bundle(&format!("bundle-shared-{name}"), &["sh", "-c", &format!("echo {name} > /{name}-file; rm /bin/ls")], |_| {});
        let (upper, work) = (b.join("upper"), b.join("work"));
        std::fs::create_dir_all(&upper).unwrap();
        std::fs::create_dir_all(&work).unwrap();
        let opts = format!("lowerdir={},upperdir={},workdir={}", lower.display(), upper.display(), work.display());
        support::run_ok(Command::new("mount").args(["-t", "overlay", "overlay", "-o", &opts]).arg(b.join("rootfs")));
        mounted.0.push(b.join("rootfs"));
        let (out, err) = (support::scratch(&format!("shared-{name}.out")), support::scratch(&format!("shared-{name}.err")));
        let id = format!("c-shared-{name}");
        let pid = create(&root, &b, &id, &out, &err);
        made.push(disks());
        assert_ok(&run(&root, &["start", &id]));
        assert_eq!(wait_pid(pid, &root, &id), 0, "{}", std::fs::read_to_string(&err).unwrap());
        assert_ok(&run(&root, &["delete", &id]));
        assert_eq!(std::fs::read_to_string(upper.join(format!("{name}-file"))).unwrap(), format!("{name}\n"), "written back into the container's snapshot");
        assert!(upper.join("bin/ls").exists() && !b.join("rootfs/bin/ls").exists(), "a removal is a whiteout in the upper directory");
        uppers.push(upper);
    }
    let new: Vec<_> = made[0].iter().filter(|d| !before.contains(d)).collect();
    assert_eq!(new.len(), 1, "one copy of the snapshot: {before:?} then {:?}", made[0]);
    assert_eq!(made[0], made[1], "the second container of the snapshot uses the first one's copy");
    assert!(!uppers[1].join("a-file").exists() && !lower.join("a-file").exists(), "changes stay with their container");
    assert!(lower.join("bin/ls").exists(), "the snapshot is left as it was");
}

#[test]
fn oci_runtime_signals_execs_and_force_deletes() {
    let _turn = vm_turn();
    let root = support::scratch("oci-root-signals");
    // A read-only root; the init traps SIGTERM (PID 1 ignores signals it
    // has no handler for).
    let b = bundle("bundle-long", &["sh", "-c", "trap 'exit 7' TERM; while :; do sleep 1; done"], |s| {
        s["root"]["readonly"] = true.into();
        s["process"]["env"] = serde_json::json!(["PATH=/bin:/usr/bin", "WHO=container"]);
        let caps = serde_json::json!(["CAP_CHOWN", "CAP_KILL"]);
        s["process"]["capabilities"] = serde_json::json!({ "bounding": caps, "effective": caps, "permitted": caps });
        s["process"]["noNewPrivileges"] = false.into();
    });
    let (out, err) = (support::scratch("long.out"), support::scratch("long.err"));
    let pid = create(&root, &b, "c-long", &out, &err);
    assert_ok(&run(&root, &["start", "c-long"]));
    assert_eq!(state(&root, "c-long")["status"], "running");

    // Exec in the foreground: output, exit code, the container's
    // environment, its read-only root.
    let o = run(&root, &["exec", "c-long", "sh", "-c", "echo from-exec $WHO; exit 5"]);
    assert_eq!(o.status.code(), Some(5), "{}", text(&o.stderr));
    assert_eq!(text(&o.stdout), "from-exec container\n");
    let o = run(&root, &["exec", "c-long", "sh", "-c", "echo x > /probe"]);
    assert_ne!(o.status.code(), Some(0));
    assert!(text(&o.stderr).contains("Read-only file system"), "{}", text(&o.stderr));

    // The spec's capabilities and noNewPrivileges, for the init and an
    // exec'd process; --cap and --no-new-privs add to them.
    let privileges = |o: &Output| {
        assert_ok(o);
        let t = text(&o.stdout);
        let field = |n: &str| t.lines().find_map(|l| l.strip_prefix(n)).unwrap_or_else(|| panic!("no {n} in {t}")).trim().to_string();
        ["CapEff:", "CapPrm:", "CapBnd:", "CapAmb:", "NoNewPrivs:"].map(field).join(" ")
    };
    let want = "0000000000000021 0000000000000021 0000000000000021 0000000000000000 0";
    assert_eq!(privileges(&run(&root, &["exec", "c-long", "cat", "/proc/1/status"])), want, "the init");
    assert_eq!(privileges(&run(&root, &["exec", "c-long", "cat", "/proc/self/status"])), want, "an exec'd process");
    let added = "0000000000002021 0000000000002021 0000000000002021 0000000000000000 1";
    assert_eq!(privileges(&run(&root, &["exec", "--cap", "CAP_NET_RAW", "--no-new-privs", "c-long", "cat", "/proc/self/status"])), added);

    // runc's process.json.
    let pj = support::scratch("process.json");
    std::fs::write(&pj, r#"{"args":["sh","-c","echo $FOO; id -u"],"env":["FOO=from-process-json"],"cwd":"/tmp","user":{"uid":65534,"gid":65534}}"#).unwrap();
    let o = run(&root, &["exec", "--process", pj.to_str().unwrap(), "c-long"]);
    assert_ok(&o);
    assert_eq!(text(&o.stdout), "from-process-json\n65534\n");

    // A detached exec: its supervisor's pid in the pid file, its exit
    // status the process's; `ps` lists it.
    let epid_file = support::scratch("exec.pid");
    let o = oci(&root, &["exec", "--detach", "--pid-file", epid_file.to_str().unwrap(), "c-long", "sh", "-c", "sleep 2; exit 4"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(o.success());
    let epid: i32 = std::fs::read_to_string(&epid_file).unwrap().parse().unwrap();
    let ps = run(&root, &["ps", "--format", "json", "c-long"]);
    let pids: Vec<i32> = serde_json::from_slice(&ps.stdout).unwrap();
    assert!(pids.contains(&pid) && pids.contains(&epid), "{pids:?} should hold {pid} and {epid}");
    assert_eq!(wait_pid(epid, &root, "c-long"), 4);

    assert_fails(&run(&root, &["delete", "c-long"]), "not stopped");
    // A signal sent to the container's pid (its holder) reaches the
    // process.
    // SAFETY: kill of the container's pid, this test's orphan.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    assert_eq!(wait_pid(pid, &root, "c-long"), 7);
    assert_eq!(state(&root, "c-long")["status"], "stopped");
    assert_ok(&run(&root, &["delete", "c-long"]));

    // SIGKILL of the container's pid kills the container: its supervisor
    // and VMM end, the state says stopped.
    let b = bundle("bundle-sleep", &["sleep", "1000"], |_| {});
    let pid = create(&root, &b, "c-kill", &out, &err);
    assert_ok(&run(&root, &["start", "c-kill"]));
    let st: serde_json::Value = serde_json::from_slice(&std::fs::read(root.join("c-kill/state.json")).unwrap()).unwrap();
    let (supervisor, vmm) = (st["owner"]["pid"].as_u64().unwrap(), st["vmm"]["pid"].as_u64().unwrap());
    // SAFETY: kill of the container's pid, this test's orphan.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    assert_eq!(wait_pid(pid, &root, "c-kill"), 137);
    let deadline = Instant::now() + Duration::from_secs(30);
    while support::alive(supervisor) || support::alive(vmm) {
        assert!(Instant::now() < deadline, "the supervisor {supervisor} or VMM {vmm} outlived the container's pid");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(state(&root, "c-kill")["status"], "stopped");
    assert_ok(&run(&root, &["delete", "c-kill"]));

    // delete --force of a running container kills it.
    let pid = create(&root, &b, "c-force", &out, &err);
    assert_ok(&run(&root, &["start", "c-force"]));
    assert_ok(&run(&root, &["delete", "--force", "c-force"]));
    assert_eq!(wait_pid(pid, &root, "c-force"), 137);
    assert!(!root.join("c-force").exists());

    // A created container that never starts can be deleted; its supervisor
    // stops as a SIGTERM would stop runc's waiting init.
    let pid = create(&root, &b, "c-created", &out, &err);
    assert_ok(&run(&root, &["delete", "c-created"]));
    assert_eq!(wait_pid(pid, &root, "c-created"), 128 + libc::SIGTERM);
    assert_eq!(std::fs::read_dir(&root).unwrap().count(), 0, "nothing left in --root");
}

/// `events --stats`: runc's stats event of container `id`; its data.
fn stats(root: &Path, id: &str) -> serde_json::Value {
    let o = run(root, &["events", "--stats", id]);
    assert_ok(&o);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!((v["type"].as_str(), v["id"].as_str()), (Some("stats"), Some(id)), "{v}");
    v["data"].clone()
}

/// Starts up to 20 background processes in container `id` and waits for
/// them; its output: how many started, and standard error.
fn fork_twenty(root: &Path, id: &str) -> (u32, String) {
    let script = "i=0; while [ $i -lt 20 ]; do sleep 2 & i=$((i+1)); echo $i; done; wait";
    let o = run(root, &["exec", id, "sh", "-c", script]);
    let started = text(&o.stdout).lines().last().map_or(0, |l| l.trim().parse().unwrap());
    (started, text(&o.stderr))
}

#[test]
fn oci_runtime_applies_resources_in_a_guest_cgroup() {
    let _turn = vm_turn();
    let root = support::scratch("oci-root-cgroup");
    // The VM keeps the size the other tests' template has: the limits are
    // the container cgroup's alone. The CPU quota (10 CPUs' worth) does
    // not slow the setup of exec'd processes, which is slow where guest
    // kernel mode is emulated; a tight one comes with an update below. The
    // init reaps what the forks below leave behind (zombies count against
    // pids.max) without forking itself.
    let limits = serde_json::json!({
        "memory": { "limit": 64 << 20 },
        "cpu": { "quota": 1_000_000, "period": 100_000 },
        "pids": { "limit": 10 }
    });
    // The VM's cgroup on the host is the spec's cgroupsPath.
    let cgroups_path = format!("/vmrun-test-{}/c-cg", std::process::id());
    let b = bundle("bundle-cgroup", &["sh", "-c", "trap 'exit 0' TERM; sleep 100000 & wait"], |s| {
        s["annotations"] = serde_json::json!({ "io.vmrun.memory": "512m", "io.vmrun.cpus": "1" });
        s["linux"]["resources"] = limits.clone();
        s["linux"]["cgroupsPath"] = cgroups_path.clone().into();
    });
    let (out, err) = (support::scratch("cgroup.out"), support::scratch("cgroup.err"));
    let pid = create(&root, &b, "c-cg", &out, &err);
    let host_dirs = host_cgroup_dirs(&cgroups_path);
    assert!(!host_dirs.is_empty() && host_dirs.iter().all(|d| d.is_dir()), "{host_dirs:?}");
    let own = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    assert!(own.contains(&cgroups_path), "the container's pid is in the VM's host cgroup: {own}");
    // The CPU quota holds for the whole VM on the host; the pids and
    // memory limits, below what the VM itself needs, only in the guest.
    let (quota, pids) = host_cgroup_files(&host_dirs);
    assert_eq!(quota.as_deref(), Some("1000000"), "{host_dirs:?}");
    assert_eq!(pids.as_deref(), Some("max"), "{host_dirs:?}");
    let s = stats(&root, "c-cg");
    assert_eq!((s["memory"]["usage"]["limit"].as_u64(), s["pids"]["limit"].as_u64()), (Some(64 << 20), Some(10)), "{s}");
    // As under runc: the process is set up at create, held before its
    // program, and already in the container's cgroup.
    assert_eq!(s["pids"]["current"], 1, "only the held process before start: {s}");
    assert_ok(&run(&root, &["start", "c-cg"]));

    // The init and every exec'd process are in the container's cgroup.
    let o = run(&root, &["exec", "c-cg", "cat", "/proc/1/cgroup", "/proc/self/cgroup"]);
    assert_ok(&o);
    assert_eq!(text(&o.stdout), "0::/vmrun/c-cg\n0::/vmrun/c-cg\n");
    let s = stats(&root, "c-cg");
    assert!(s["pids"]["current"].as_u64().unwrap() >= 2, "the init and its sleep: {s}");
    assert!(s["cpu"]["usage"]["total"].as_u64().unwrap() > 0, "{s}");
    assert!(s["cpu"]["throttling"]["periods"].as_u64().unwrap() > 0, "cpu.max is set: {s}");
    assert!(s["memory"]["usage"]["usage"].as_u64().unwrap() > 0, "{s}");

    // pids.max: forks stop at the limit (the init, its sleep, the shell
    // and its children share 10); an update lets all twenty start.
    let (started, stderr) = fork_twenty(&root, "c-cg");
    assert!(started < 20, "{started} processes started under pids.max 10; stderr: {stderr}");
    assert!(stderr.contains("fork"), "{stderr}");
    assert_ok(&run(&root, &["update", "--pids-limit", "40", "c-cg"]));
    assert_eq!(stats(&root, "c-cg")["pids"]["limit"], 40);
    let (started, stderr) = fork_twenty(&root, "c-cg");
    assert_eq!(started, 20, "{stderr}");

    // memory.max: a memory limit above the VM's is refused; under a small
    // one, a process that touches 16 MiB is killed by the cgroup's OOM
    // killer (the VM has 512 MiB).
    assert_fails(&run(&root, &["update", "--memory", "1g", "c-cg"]), "above the container's VM memory (512 MiB)");
    assert_ok(&run(&root, &["update", "--memory", "8m", "c-cg"]));
    let o = run(&root, &["exec", "c-cg", "dd", "if=/dev/zero", "of=/dev/null", "bs=16M", "count=1"]);
    assert_eq!(o.status.code(), Some(137), "{}", text(&o.stderr));
    let s = stats(&root, "c-cg");
    assert_eq!(s["memory"]["usage"]["limit"].as_u64(), Some(8 << 20), "{s}");
    assert!(s["memory"]["usage"]["failcnt"].as_u64().unwrap() > 0, "{s}");
    let r = support::scratch("resources.json");
    std::fs::write(&r, r#"{"memory":{"limit":134217728},"pids":{"limit":-1}}"#).unwrap();
    assert_ok(&run(&root, &["update", "-r", r.to_str().unwrap(), "c-cg"]));
    let s = stats(&root, "c-cg");
    assert_eq!((s["memory"]["usage"]["limit"].as_u64(), s["pids"]["limit"].as_u64()), (Some(128 << 20), Some(0)), "{s}");
    assert_eq!(s["cpu"]["throttling"]["throttledPeriods"].as_u64(), Some(0), "not throttled with 10 CPUs' worth: {s}");

    // cpu.max: a busy loop (started before, in the background) is
    // throttled once an update allows 20 ms per 100 ms.
    let busy = "(i=0; while [ $i -lt 3000000 ]; do i=$((i+1)); done) >/dev/null 2>&1 &";
    assert_ok(&run(&root, &["exec", "c-cg", "sh", "-c", busy]));
    assert_ok(&run(&root, &["update", "--cpu-quota", "20000", "c-cg"]));
    assert_eq!(host_cgroup_files(&host_dirs).0.as_deref(), Some("20000"), "the VM's host cgroup is updated too: {host_dirs:?}");
    std::thread::sleep(Duration::from_secs(3));
    let s = stats(&root, "c-cg");
    assert!(s["cpu"]["throttling"]["throttledPeriods"].as_u64().unwrap() > 0, "{s}");

    assert_ok(&run(&root, &["kill", "c-cg", "TERM"]));
    assert_eq!(wait_pid(pid, &root, "c-cg"), 0);
    assert_fails(&run(&root, &["events", "--stats", "c-cg"]), "not running");
    assert_ok(&run(&root, &["delete", "c-cg"]));
    assert!(host_dirs.iter().all(|d| !d.exists() && !d.parent().unwrap().exists()), "delete removes what it made: {host_dirs:?}");

    // A limit whose controller the guest kernel lacks is refused.
    let b = bundle("bundle-cpuset", &["true"], |s| {
        s["linux"]["resources"] = serde_json::json!({ "cpu": { "cpus": "0" } });
    });
    let o = oci(&root, &["create", "--bundle", b.to_str().unwrap(), "c-cpuset"]).output().unwrap();
    assert_fails(&o, "no cpuset cgroup controller");
    assert_ok(&run(&root, &["delete", "--force", "c-cpuset"]));
}

#[test]
fn oci_runtime_applies_the_specs_linux_settings() {
    let _turn = vm_turn();
    let root = support::scratch("oci-root-linux");
    let script = "echo status: $(head -c 5 /proc/self/status); echo cwd: $(pwd); \
                  touch /probe 2>&1 | grep -o 'Read-only file system' | sed 's/^/root-write: /'; \
                  echo masked: $(wc -c < /etc/motd) $(ls -A /secret | wc -l); \
                  (echo 1 > /proc/sys/kernel/shmmni) 2>&1 | grep -o 'Read-only file system' | sed 's/^/proc-sys: /'; \
                  echo sysctl: $(cat /proc/sys/kernel/shmmax /proc/sys/net/ipv4/ip_forward); \
                  echo oom: $(cat /proc/self/oom_score_adj); echo groups: $(grep Groups /proc/self/status | cut -f2); \
                  echo device: $(stat -c '%F %t:%T %a %u:%g' /dev/mynull) $(head -c 1 /dev/mynull | wc -c); \
                  echo devcg: $(dd if=/dev/rkmsg count=0 2>/dev/null && echo read-ok) \
                      $( (echo x > /dev/rkmsg) 2>&1 | grep -o 'Operation not permitted') \
                      $(dd if=/dev/myloop count=0 2>&1 | grep -o 'Operation not permitted') $(echo x > /dev/mynull && echo null-ok)";
    let b = bundle("bundle-linux", &["sh", "-c", script], |s| {
        s["root"]["readonly"] = true.into();
        s["process"]["cwd"] = "/made/here".into();
        s["process"]["oomScoreAdj"] = (-500).into();
        s["process"]["user"] = serde_json::json!({ "uid": 0, "gid": 0, "additionalGids": [5, 6] });
        s["linux"]["maskedPaths"] = serde_json::json!(["/etc/motd", "/secret", "/no/such/path"]);
        s["linux"]["readonlyPaths"] = serde_json::json!(["/proc/sys"]);
        s["linux"]["sysctl"] = serde_json::json!({ "kernel.shmmax": "123456789", "net.ipv4.ip_forward": "1" });
        s["linux"]["devices"] = serde_json::json!([
            { "path": "/dev/mynull", "type": "c", "major": 1, "minor": 3, "fileMode": 416, "uid": 1000, "gid": 10 },
            { "path": "/dev/rkmsg", "type": "c", "major": 1, "minor": 11 },
            { "path": "/dev/myloop", "type": "b", "major": 7, "minor": 0 }
        ]);
        // The device cgroup: kmsg may be read, not written; the loop
        // device's node exists but may not be opened (EPERM, not the
        // driver's ENXIO); /dev/null stays usable (runc's defaults).
        s["linux"]["resources"] = serde_json::json!({ "devices": [
            { "allow": false, "access": "rwm" },
            { "allow": true, "type": "c", "major": 1, "minor": 11, "access": "r" }
        ] });
        s["linux"]["rootfsPropagation"] = "rprivate".into();
    });
    // As a pause image: no /proc, /dev or /sys to mount on, and a
    // read-only root.
    for d in ["proc", "dev", "sys"] {
        std::fs::remove_dir_all(b.join("rootfs").join(d)).unwrap();
    }
    std::fs::write(b.join("rootfs/etc/motd"), b"welcome\n").unwrap();
    std::fs::create_dir(b.join("rootfs/secret")).unwrap();
    std::fs::write(b.join("rootfs/secret/key"), b"hidden\n").unwrap();
    let (out, err) = (support::scratch("linux.out"), support::scratch("linux.err"));
    let pid = create(&root, &b, "c-linux", &out, &err);
    assert_ok(&run(&root, &["start", "c-linux"]));
    assert_eq!(wait_pid(pid, &root, "c-linux"), 0, "{}", std::fs::read_to_string(&err).unwrap_or_default());
    let text = std::fs::read_to_string(&out).unwrap();
    let line = |name: &str| {
        let prefix = format!("{name}: ");
        text.lines().find_map(|l| l.strip_prefix(prefix.as_str()).map(str::to_owned)).unwrap_or_else(|| panic!("no {name} in:\n{text}"))
    };
    assert_eq!(line("status"), "Name:");
    assert_eq!(line("cwd"), "/made/here");
    assert_eq!(line("root-write"), "Read-only file system");
    assert_eq!(line("masked"), "0 0");
    assert_eq!(line("proc-sys"), "Read-only file system");
    assert_eq!(line("sysctl"), "123456789 1");
    assert_eq!(line("oom"), "-500");
    assert_eq!(line("groups"), "5 6");
    assert_eq!(line("device"), "character special file 1:3 640 1000:10 0");
    assert_eq!(line("devcg"), "read-ok Operation not permitted Operation not permitted null-ok");
    assert_ok(&run(&root, &["delete", "c-linux"]));

    // A user namespace, made in the guest: the container's root is the
    // guest's user 1000, the image's files (the guest root's) are nobody's,
    // and its /dev and /proc work.
    let script = "echo uid_map: $(cat /proc/self/uid_map); echo gid_map: $(cat /proc/self/gid_map); echo id: $(id -u); \
                  echo owner: $(stat -c %u /bin/busybox); echo null: $(echo x > /dev/null && echo ok); echo pid1: $(cat /proc/1/comm)";
    let b = bundle("bundle-userns-run", &["sh", "-c", script], |s| {
        s["linux"]["namespaces"].as_array_mut().unwrap().push(serde_json::json!({ "type": "user" }));
        s["linux"]["uidMappings"] = serde_json::json!([{ "containerID": 0, "hostID": 1000, "size": 2000 }]);
        s["linux"]["gidMappings"] = serde_json::json!([{ "containerID": 0, "hostID": 1000, "size": 3000 }]);
    });
    let (out, err) = (support::scratch("userns.out"), support::scratch("userns.err"));
    let pid = create(&root, &b, "c-userns", &out, &err);
    assert_ok(&run(&root, &["start", "c-userns"]));
    assert_eq!(wait_pid(pid, &root, "c-userns"), 0, "{}", std::fs::read_to_string(&err).unwrap_or_default());
    let text = std::fs::read_to_string(&out).unwrap();
    for want in ["uid_map: 0 1000 2000", "gid_map: 0 1000 3000", "id: 0", "owner: 65534", "null: ok", "pid1: sh"] {
        assert!(text.lines().any(|l| l == want), "{want:?} in:\n{text}");
    }
    assert_ok(&run(&root, &["delete", "c-userns"]));

    // Refused at create: a kernel parameter of the whole kernel, a user
    // namespace whose map leaves out the container's root, a namespace
    // path of another type.
    for (name, edit, needle) in [
        ("bundle-sysctl", serde_json::json!({ "sysctl": { "kernel.panic": "1" } }), "not in a separate kernel namespace"),
        (
            "bundle-userns",
            serde_json::json!({ "namespaces": [{ "type": "user" }], "uidMappings": [{ "containerID": 1, "hostID": 1000, "size": 1 }], "gidMappings": [{ "containerID": 0, "hostID": 1000, "size": 1 }] }),
            "does not map the container's root",
        ),
        ("bundle-nspath", serde_json::json!({ "namespaces": [{ "type": "network", "path": "/proc/self/ns/ipc" }] }), "is not a net namespace"),
    ] {
        let b = bundle(name, &["true"], |s| {
            for (k, v) in edit.as_object().unwrap() {
                s["linux"][k] = v.clone();
            }
        });
        assert_fails(&run(&root, &["create", "--bundle", b.to_str().unwrap(), name]), needle);
    }
}

#[test]
fn oci_runtime_sends_a_terminal_to_the_console_socket() {
    let _turn = vm_turn();
    let root = support::scratch("oci-root-tty");
    let b = bundle("bundle-tty", &["sh", "-c", "echo tty-ok; tty; stty size; read line; echo got-$line; stty size"], |s| {
        s["process"]["terminal"] = true.into()
    });
    let sock = support::scratch("console.sock");
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let pid_file = b.join("tty.pid");
    let (b_s, sock_s, pid_s) = (b.to_str().unwrap().to_string(), sock.to_str().unwrap().to_string(), pid_file.to_str().unwrap().to_string());
    let creator = std::thread::spawn({
        let root = root.clone();
        move || oci(&root, &["create", "--bundle", &b_s, "--console-socket", &sock_s, "--pid-file", &pid_s, "c-tty"]).output().unwrap()
    });
    let (conn, _) = listener.accept().unwrap();
    let (master, name) = vmrun_oci::console::recv_fd(&conn).unwrap();
    assert!(name.starts_with("/dev/pts/"), "{name}");
    let o = creator.join().unwrap();
    assert_ok(&o);
    let pid: i32 = std::fs::read_to_string(&pid_file).unwrap().parse().unwrap();
    vmrun_oci::console::set_window_size(master.as_raw_fd(), 30, 100).unwrap();
    assert_ok(&run(&root, &["start", "c-tty"]));
    let mut m = File::from(master);
    let mut reader = m.try_clone().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 1024];
        // The slave side closes when the supervisor exits: EIO ends it.
        while let Ok(n) = reader.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let mut seen = String::new();
    let read_until = |needle: &str, seen: &mut String| {
        let start = Instant::now();
        while !seen.contains(needle) {
            let left = Duration::from_secs(120).saturating_sub(start.elapsed());
            match rx.recv_timeout(left) {
                Ok(chunk) => seen.push_str(&text(&chunk)),
                Err(_) => panic!("no {needle:?} from the terminal; got {seen:?}"),
            }
        }
    };
    read_until("30 100", &mut seen);
    assert!(seen.contains("tty-ok\r\n"), "{seen:?}");
    // The terminal is one of the container's own devpts instance.
    assert!(seen.contains("tty-ok\r\n/dev/pts/0\r\n"), "{seen:?}");
    // A resize of the master reaches the guest's terminal (SIGWINCH to the
    // supervisor, whose controlling terminal the slave is).
    vmrun_oci::console::set_window_size(m.as_raw_fd(), 40, 120).unwrap();
    std::thread::sleep(Duration::from_secs(1));
    std::io::Write::write_all(&mut m, b"hello\r").unwrap();
    read_until("40 120", &mut seen);
    assert!(seen.contains("got-hello"), "input reaches the process: {seen:?}");
    assert_eq!(wait_pid(pid, &root, "c-tty"), 0);
    assert_ok(&run(&root, &["delete", "c-tty"]));
}

#[test]
fn oci_bind_mounts_of_files_and_directories_are_copied_and_kept_up_to_date() {
    let _turn = vm_turn();
    let root = support::scratch("oci-root-mounts");
    let src = support::scratch("mount-sources");
    let _ = std::fs::remove_dir_all(&src);
    let file = |name: &str, content: &str| {
        std::fs::create_dir_all(src.join(name).parent().unwrap()).unwrap();
        std::fs::write(src.join(name), content).unwrap();
        src.join(name)
    };
    let resolv = file("resolv.conf", "nameserver 10.0.0.10\n");
    let hosts = file("etc-hosts", "10.1.2.3 pod\n");
    let hostname = file("hostname", "pod-name\n");
    let termination = file("termination-log", "");
    let app = file("app.conf", "mode=one\n");
    support::configmap(&src.join("configmap"), "..2024_a", &[("key", "v1"), ("other", "o1")]);
    file("secret/token", "s3cret");
    file("secret/nested/ca.crt", "CERT");
    file("plain/notes", "n1");
    file("tool/run.sh", "#!/bin/sh\necho tool\n");
    // Two directories over the copy limit: both on the one volume disk.
    let big = vec![b'b'; vmrun_agent_protocol::COPY_MAX_BYTES as usize + 1];
    for d in ["big", "big2"] {
        std::fs::create_dir_all(src.join(d)).unwrap();
        std::fs::write(src.join(d).join("blob"), &big).unwrap();
        std::fs::write(src.join(d).join("marker"), d).unwrap();
    }
    let bind = |dest: &str, source: &Path, ro: bool| {
        let opts = if ro { serde_json::json!(["rbind", "ro"]) } else { serde_json::json!(["rbind"]) };
        serde_json::json!({ "destination": dest, "type": "bind", "source": source, "options": opts })
    };
    let mounts = [
        bind("/etc/resolv.conf", &resolv, true),
        bind("/etc/hosts", &hosts, true),
        bind("/etc/hostname", &hostname, true),
        bind("/dev/termination-log", &termination, false),
        bind("/etc/app.conf", &app, true),
        bind("/etc/config", &src.join("configmap"), true),
        bind("/var/run/secrets/token", &src.join("secret"), true),
        bind("/plain", &src.join("plain"), false),
        bind("/opt/tool", &src.join("tool"), true),
        bind("/data/big", &src.join("big"), true),
        bind("/data/big2", &src.join("big2"), false),
    ];
    let b = bundle("bundle-mounts", &["sleep", "1000"], |s| {
        let list = s["mounts"].as_array_mut().unwrap();
        list.extend(mounts.iter().cloned());
    });
    let (out, err) = (support::scratch("mounts.out"), support::scratch("mounts.err"));
    let pid = create(&root, &b, "c-mounts", &out, &err);
    assert_ok(&run(&root, &["start", "c-mounts"]));
    let sh = |script: &str| {
        let o = run(&root, &["exec", "c-mounts", "sh", "-c", script]);
        assert_ok(&o);
        text(&o.stdout)
    };
    let got = sh("cat /etc/resolv.conf /etc/hosts /etc/hostname /etc/app.conf; cat /etc/config/key /etc/config/other; echo; \
                  cat /var/run/secrets/token/token /var/run/secrets/token/nested/ca.crt; echo; cat /plain/notes; echo; sh /opt/tool/run.sh; \
                  cat /data/big/marker /data/big2/marker; echo; wc -c < /data/big/blob; \
                  echo died > /dev/termination-log && cat /dev/termination-log; echo w > /plain/new && echo plain-rw; \
                  echo w > /data/big2/new && echo big2-rw; \
                  for f in /etc/config/x /var/run/secrets/token/x /opt/tool/x /data/big/x /etc/app.conf; do echo w 2>/dev/null > $f || echo ro; done");
    let want = format!(
        "nameserver 10.0.0.10\n10.1.2.3 pod\npod-name\nmode=one\nv1o1\ns3cretCERT\nn1\ntool\nbigbig2\n{}\ndied\nplain-rw\nbig2-rw\nro\nro\nro\nro\nro\n",
        big.len()
    );
    assert_eq!(got, want);
    assert_eq!(std::fs::read_to_string(&termination).unwrap(), "", "nothing is copied back to the host");

    // Kubelet updates the configmap; a file is rewritten: the container sees
    // both within seconds.
    support::configmap(&src.join("configmap"), "..2024_b", &[("key", "v2"), ("other", "o2")]);
    std::fs::write(&app, "mode=two\n").unwrap();
    let t = Instant::now();
    loop {
        let now = sh("cat /etc/config/key /etc/config/other; echo; cat /etc/app.conf; ls -a /etc/config | tr '\\n' ' '");
        if now == "v2o2\nmode=two\n. .. ..2024_b ..data key other " {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(15), "not updated after {:?}: {now:?}", t.elapsed());
        std::thread::sleep(Duration::from_millis(300));
    }
    eprintln!("oci test: copies updated in {:.1} s", t.elapsed().as_secs_f64());
    assert_ok(&run(&root, &["kill", "c-mounts", "9"]));
    assert_eq!(wait_pid(pid, &root, "c-mounts"), 137);
    assert_ok(&run(&root, &["delete", "c-mounts"]));
    let _ = std::fs::remove_dir_all(&src);
}

#[test]
fn bad_bundles_and_unknown_ids_are_refused() {
    let root = support::scratch("oci-root-bad");
    let create_in = |b: &Path| run(&root, &["create", "--bundle", b.to_str().unwrap(), "c-bad"]);
    let empty = |root: &Path| std::fs::read_dir(root).map(|d| d.count()).unwrap_or(0) == 0;

    let b = support::scratch("bundle-bad");
    std::fs::create_dir_all(b.join("rootfs")).unwrap();
    assert_fails(&create_in(&b), "config.json");
    std::fs::write(b.join("config.json"), b"{ this is not json").unwrap();
    assert_fails(&create_in(&b), "invalid JSON");
    let write = |edit: &dyn Fn(&mut serde_json::Value)| {
        let mut spec: serde_json::Value = serde_json::json!({
            "ociVersion": "1.0.2",
            "process": { "user": { "uid": 0, "gid": 0 }, "args": ["true"], "cwd": "/" },
            "root": { "path": "rootfs" }
        });
        edit(&mut spec);
        std::fs::write(b.join("config.json"), spec.to_string()).unwrap();
    };
    write(&|s| s["ociVersion"] = "2.0.0".into());
    assert_fails(&create_in(&b), "unsupported ociVersion");
    write(&|s| s["root"]["path"] = "../rootfs".into());
    assert_fails(&create_in(&b), "escapes the bundle");
    std::fs::write(b.join("afile"), b"x").unwrap();
    write(&|s| s["root"]["path"] = "afile".into());
    assert_fails(&create_in(&b), "not a directory");
    write(&|s| s["process"]["terminal"] = true.into());
    assert_fails(&create_in(&b), "console-socket");
    assert!(empty(&root), "nothing left in --root");

    // The error also goes to a JSON log, where containerd's shim reads it.
    let log = support::scratch("bad.log.json");
    write(&|s| s["ociVersion"] = "0.5.0".into());
    let o = run(&root, &["--log", log.to_str().unwrap(), "--log-format", "json", "create", "--bundle", b.to_str().unwrap(), "c-bad"]);
    assert_fails(&o, "unsupported ociVersion");
    let last = std::fs::read_to_string(&log).unwrap().lines().last().unwrap().to_string();
    let v: serde_json::Value = serde_json::from_str(&last).unwrap();
    assert_eq!(v["level"], "error");
    assert!(v["msg"].as_str().unwrap().contains("unsupported ociVersion"), "{v}");
    assert!(v["time"].as_str().is_some());

    for args in [&["state", "nope"][..], &["start", "nope"], &["kill", "nope", "KILL"], &["delete", "nope"], &["exec", "nope", "true"], &["ps", "nope"]] {
        assert_fails(&run(&root, args), "does not exist");
    }
    assert_ok(&run(&root, &["delete", "--force", "nope"]));
    assert_fails(&run(&root, &["state", "../etc"]), "invalid container id");
    assert!(empty(&root), "nothing left in --root");

    let o = Command::new(OCI).arg("features").output().unwrap();
    assert_ok(&o);
    let f: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!((f["ociVersionMin"].as_str(), f["ociVersionMax"].as_str()), (Some("1.0.0"), Some("1.2.1")));
    let o = Command::new(OCI).arg("--version").output().unwrap();
    assert!(text(&o.stdout).starts_with("vmrun-oci version"));

    // A reader that went away (`vmrun-oci state X | grep -q running`) took
    // what it wanted: no panic, no error.
    let mut child = Command::new(OCI).arg("features").stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    drop(child.stdout.take());
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success() && o.stderr.is_empty(), "{:?}: {}", o.status, text(&o.stderr));
}

/// The host cgroup directories of OCI `cgroupsPath` `path` (absolute).
fn host_cgroup_dirs(path: &str) -> Vec<PathBuf> {
    let v2 = vmrun_oci::host_cgroup::is_v2();
    let hierarchies = vmrun_oci::host_cgroup::hierarchies(v2).unwrap();
    vmrun_oci::host_cgroup::plan(Path::new(vmrun_oci::host_cgroup::CGROUP_ROOT), v2, &hierarchies, path).unwrap()
}

/// The CPU quota (microseconds per period) and pids limit in host cgroup
/// directories `dirs` (v1: in their hierarchies; v2: `cpu.max`).
fn host_cgroup_files(dirs: &[PathBuf]) -> (Option<String>, Option<String>) {
    let read = |p: PathBuf| std::fs::read_to_string(p).ok().map(|s| s.trim().to_string());
    if vmrun_oci::host_cgroup::is_v2() {
        let d = &dirs[0];
        return (read(d.join("cpu.max")).and_then(|m| m.split(' ').next().map(str::to_string)), read(d.join("pids.max")));
    }
    let quota = dirs.iter().find_map(|d| read(d.join("cpu.cfs_quota_us")));
    let pids = dirs.iter().find_map(|d| read(d.join("pids.max")));
    (quota, pids)
}

#[test]
fn containerd_runs_containers_through_the_vmrun_shim() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: containerd needs root");
        return;
    }
    let (Some(containerd), Some(ctr)) = (support::containerd::which("containerd"), support::containerd::which("ctr")) else {
        eprintln!("skipped: no containerd/ctr (scripts/deps.sh installs Debian's containerd)");
        return;
    };
    let _turn = vm_turn();
    let e = shared();
    // containerd finds containerd-shim-vmrun-v2 (and the shim vmrun-oci and
    // vmrun) in the directory cargo built them in.
    let bin = Path::new(SHIM).parent().unwrap();
    let daemon = support::containerd::Containerd::start(
        &containerd,
        &ctr,
        &support::scratch("containerd"),
        &[
            "io.containerd.grpc.v1.cri",
            "io.containerd.snapshotter.v1.btrfs",
            "io.containerd.snapshotter.v1.zfs",
            "io.containerd.snapshotter.v1.aufs",
            "io.containerd.snapshotter.v1.devmapper",
        ],
        "",
        bin,
        &[("VMRUN_HOME", e.home.as_os_str()), ("VMRUN_KERNEL", e.kernel.as_os_str()), ("VMRUN_AGENT_INITRD", e.initrd.as_os_str())],
    );
    let ns = "vmrun-oci-test";
    let ctr_cmd = |args: &[&str]| daemon.ctr(ns, args);
    let archive = support::busybox_image().join("busybox-oci.tar");
    let o = ctr_cmd(&["images", "import", archive.to_str().unwrap()]).output().unwrap();
    assert_ok(&o);
    let image = "docker.io/library/busybox:latest";
    let id = format!("t1-{}", std::process::id());
    let t = Instant::now();
    let o = ctr_cmd(&["run", "--rm", "--runtime", "io.containerd.vmrun.v2", image, &id, "echo", "hello-from-containerd"]).output().unwrap();
    let clog = || daemon.log();
    assert!(o.status.success(), "ctr run: {:?}\n{}\n{}\ncontainerd:\n{}", o.status, text(&o.stdout), text(&o.stderr), clog());
    assert_eq!(text(&o.stdout).trim_end(), "hello-from-containerd");
    eprintln!("oci test: ctr run echo: {:.1} s", t.elapsed().as_secs_f64());

    let id2 = format!("t2-{}", std::process::id());
    let o = ctr_cmd(&["run", "--rm", "--runtime", "io.containerd.vmrun.v2", image, &id2, "sh", "-c", "echo out; exit 3"]).output().unwrap();
    assert_eq!(o.status.code(), Some(3), "ctr run: {}\n{}\ncontainerd:\n{}", text(&o.stdout), text(&o.stderr), clog());
    assert_eq!(text(&o.stdout).trim_end(), "out");
    // Both containers' roots were the image's snapshot (containerd's
    // overlay snapshotter): one copy of it, shared.
    let of_containerd: Vec<_> = std::fs::read_dir(shared().home.join("rootfs-copies"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".json"))
        .filter(|e| std::fs::read_to_string(e.path()).unwrap().contains("io.containerd.snapshotter.v1.overlayfs"))
        .collect();
    assert_eq!(of_containerd.len(), 1, "{of_containerd:?}");
    // The task API on a running container: pause and resume (the
    // container's cgroup in the guest frozen), exec, stats, ps.
    let id3 = format!("t3-{}", std::process::id());
    let o = ctr_cmd(&["run", "-d", "--runtime", "io.containerd.vmrun.v2", image, &id3, "sleep", "1000"]).output().unwrap();
    assert!(o.status.success(), "ctr run -d: {}\n{}\ncontainerd:\n{}", text(&o.stdout), text(&o.stderr), clog());
    let task_status = || {
        let o = ctr_cmd(&["task", "ls"]).output().unwrap();
        text(&o.stdout).lines().find(|l| l.starts_with(id3.as_str())).and_then(|l| l.split_whitespace().last()).unwrap_or("").to_string()
    };
    assert_eq!(task_status(), "RUNNING");
    assert_ok(&ctr_cmd(&["task", "pause", &id3]).output().unwrap());
    assert_eq!(task_status(), "PAUSED");
    assert_ok(&ctr_cmd(&["task", "resume", &id3]).output().unwrap());
    assert_eq!(task_status(), "RUNNING");
    // Exec: its output and exit code, through the shim's own FIFO handling.
    let o = ctr_cmd(&["task", "exec", "--exec-id", "e1", &id3, "sh", "-c", "echo from-exec; echo err >&2; exit 4"]).output().unwrap();
    assert_eq!(o.status.code(), Some(4), "ctr task exec: {}\n{}\ncontainerd:\n{}", text(&o.stdout), text(&o.stderr), clog());
    assert_eq!(text(&o.stdout).trim_end(), "from-exec");
    assert!(text(&o.stderr).contains("err"), "{}", text(&o.stderr));
    // An exec with a terminal (ctr's own on a pty of `script`'s): the
    // shim takes the master from the console socket and copies it to
    // ctr's FIFOs.
    let line = format!(
        "{} --address {} --namespace {ns} task exec -t --exec-id e2 {id3} sh -c 'tty; echo tty-done'",
        ctr.display(),
        daemon.sock.display()
    );
    let o = Command::new("script").args(["-qec", &line, "/dev/null"]).stdin(Stdio::null()).output().unwrap();
    let out = text(&o.stdout);
    assert!(o.status.success() && out.contains("/dev/pts/") && out.contains("tty-done"), "ctr task exec -t: {out}\n{}", text(&o.stderr));
    // Stats come from the container's cgroup in the guest (ctr has no
    // update; the CRI test updates a container's limits).
    let o = ctr_cmd(&["task", "metrics", "--format", "json", &id3]).output().unwrap();
    assert_ok(&o);
    let m: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&o.stdout)));
    assert!(m["memory"]["usage"]["usage"].as_u64().unwrap_or(0) > 0, "{m}");
    assert!(m["pids"]["current"].as_u64().unwrap_or(0) >= 1, "{m}");
    let o = ctr_cmd(&["task", "ps", &id3]).output().unwrap();
    assert_ok(&o);
    assert!(text(&o.stdout).lines().count() >= 2, "ctr task ps: {}", text(&o.stdout));
    assert_ok(&ctr_cmd(&["task", "kill", "-s", "SIGKILL", &id3]).output().unwrap());
    let t = Instant::now();
    while task_status() != "STOPPED" {
        assert!(t.elapsed() < Duration::from_secs(60), "task {id3} did not stop: {}", task_status());
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_ok(&ctr_cmd(&["task", "delete", &id3]).output().unwrap());
    assert_ok(&ctr_cmd(&["container", "delete", &id3]).output().unwrap());
    // A shim killed with SIGKILL: containerd runs the shim's `delete`,
    // which removes the container (its VMM too) and unmounts its root.
    let id4 = format!("t4-{}", std::process::id());
    let o = ctr_cmd(&["run", "-d", "--runtime", "io.containerd.vmrun.v2", image, &id4, "sleep", "1000"]).output().unwrap();
    assert!(o.status.success(), "ctr run -d: {}\n{}\ncontainerd:\n{}", text(&o.stdout), text(&o.stderr), clog());
    let shim_root = vmrun_oci::shim::root_of(ns);
    let st: serde_json::Value = serde_json::from_slice(&std::fs::read(shim_root.join(&id4).join("state.json")).unwrap()).unwrap();
    let vmm = st["vmm"]["pid"].as_u64().unwrap_or_else(|| panic!("no VMM in {st}")) as i32;
    let shim = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .find(|pid| {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cmd = String::from_utf8_lossy(&cmd);
            cmd.contains("containerd-shim-vmrun-v2") && cmd.contains(&id4) && cmd.contains(&daemon.sock.to_string_lossy().into_owned())
        })
        .expect("the container's shim");
    // SAFETY: kill of the shim this test's containerd started.
    assert_eq!(unsafe { libc::kill(shim, libc::SIGKILL) }, 0);
    let t = Instant::now();
    // SAFETY: kill with signal 0 only checks that the process exists.
    while shim_root.join(&id4).exists() || unsafe { libc::kill(vmm, 0) } == 0 {
        assert!(t.elapsed() < Duration::from_secs(60), "{id4} left after its shim died: {:?}", std::fs::read_dir(&shim_root).map(|d| d.count()));
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = ctr_cmd(&["task", "delete", &id4]).output().unwrap();
    assert_ok(&ctr_cmd(&["container", "delete", &id4]).output().unwrap());
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    assert!(!mounts.contains(&id4), "{id4}'s root is still mounted");
    // The shim keeps the runtime's states under its root, a directory per
    // containerd namespace; the deletes removed them.
    for i in [&id, &id2, &id3, &id4] {
        assert!(!shim_root.join(i).exists(), "state of {i} left in {}", shim_root.display());
    }
    drop(daemon);
}

/// Whatever order a caller uses, nothing of a container is left on the
/// host: its processes (supervisor, VMM), its state directory, its VMM's
/// jail (record, root, cgroups). The jails' cgroups are made under a
/// cgroup parent of this test's own, so that a jail whose pid the test
/// never learns (a create that fails) is found too. The hooks run where
/// the spec puts them, on the host, with the state on their standard
/// input; a failing `createRuntime` hook fails the create.
#[test]
fn oci_runtime_leaves_nothing_behind_and_runs_hooks() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: the jail needs root");
        return;
    }
    let _turn = vm_turn();
    let root = support::scratch("oci-root-leaks");
    let parent = format!("vmrun-leaktest-{}", std::process::id());
    let cmd = |args: &[&str]| {
        let mut c = oci(&root, args);
        c.env("VMRUN_CGROUP_PARENT", &parent);
        c
    };
    let (out, err) = (support::scratch("leaks.out"), support::scratch("leaks.err"));
    let hook_log = support::scratch("hooks.log");
    // Each hook appends its kind and the status it was given.
    let hook = |kind: &str| {
        let script = format!("read -r s; echo \"{kind} $(echo \"$s\" | sed 's/.*\"status\":\"\\([a-z]*\\)\".*/\\1/')\" >> {}", hook_log.display());
        serde_json::json!({ "path": "/bin/sh", "args": ["sh", "-c", script], "env": ["PATH=/usr/bin:/bin"], "timeout": 30 })
    };
    let b = bundle("bundle-leaks", &["sleep", "1000"], |s| {
        s["hooks"] = serde_json::json!({
            "prestart": [hook("prestart")], "createRuntime": [hook("createRuntime")],
            "poststart": [hook("poststart")], "poststop": [hook("poststop")]
        });
    });
    let create = |id: &str| -> (u64, u64, u64) {
        let pid_file = b.join(format!("{id}.pid"));
        // The supervisor keeps create's standard streams: files, not pipes
        // that would not end before it does.
        let status = cmd(&["create", "--bundle", b.to_str().unwrap(), "--pid-file", pid_file.to_str().unwrap(), id])
            .stdout(File::create(&out).unwrap())
            .stderr(File::create(&err).unwrap())
            .status()
            .unwrap();
        assert!(status.success(), "create {id}: {status:?}: {}", std::fs::read_to_string(&err).unwrap_or_default());
        let s: serde_json::Value = serde_json::from_slice(&std::fs::read(root.join(id).join("state.json")).unwrap()).unwrap();
        let vmm = s["vmm"]["pid"].as_u64().expect("the state names the VMM");
        let supervisor = s["owner"]["pid"].as_u64().expect("the state names the supervisor");
        (std::fs::read_to_string(&pid_file).unwrap().parse().unwrap(), supervisor, vmm)
    };
    // (The container's pid, its holder, this subreaper's orphan, reaped
    // before.)
    let assert_gone = |id: &str, (pid, supervisor): (u64, u64), vmm: u64, jail: &[PathBuf]| {
        assert!(!support::alive(pid), "{id}: its pid {pid} runs on");
        assert!(!support::alive(supervisor), "{id}: its supervisor {supervisor} runs on");
        assert!(!root.join(id).exists(), "{id}: its state directory is left");
        assert!(!support::alive(vmm), "{id}: its VMM {vmm} runs on");
        let left: Vec<&PathBuf> = jail.iter().filter(|p| p.exists()).collect();
        assert!(left.is_empty(), "{id}: its jail left {left:?}");
    };
    let hooks_seen = || std::fs::read_to_string(&hook_log).unwrap_or_default();

    // create, delete.
    let (sup, owner, vmm) = create("l-created");
    let jail = support::jail_paths(vmm);
    assert!(jail.len() >= 3, "the VMM {vmm} is jailed: {jail:?}");
    assert_eq!(hooks_seen(), "prestart creating\ncreateRuntime creating\n");
    assert_ok(&cmd(&["delete", "l-created"]).output().unwrap());
    assert_eq!(wait_pid(sup as i32, &root, "l-created"), 128 + libc::SIGTERM);
    assert_gone("l-created", (sup, owner), vmm, &jail);
    assert_eq!(hooks_seen(), "prestart creating\ncreateRuntime creating\npoststop stopped\n");

    // create, kill KILL (the supervisor dies, and its VMM with it), delete.
    let (sup, owner, vmm) = create("l-killed");
    let jail = support::jail_paths(vmm);
    assert_ok(&cmd(&["kill", "l-killed", "KILL"]).output().unwrap());
    assert_eq!(wait_pid(sup as i32, &root, "l-killed"), 128 + libc::SIGKILL);
    assert_ok(&cmd(&["delete", "l-killed"]).output().unwrap());
    assert_gone("l-killed", (sup, owner), vmm, &jail);

    // create, start, kill KILL, delete: the poststart hook ran before
    // start returned.
    std::fs::remove_file(&hook_log).unwrap();
    let (sup, owner, vmm) = create("l-started");
    let jail = support::jail_paths(vmm);
    assert_ok(&cmd(&["start", "l-started"]).output().unwrap());
    assert!(hooks_seen().ends_with("poststart running\n"), "{}", hooks_seen());
    assert_ok(&cmd(&["kill", "l-started", "KILL"]).output().unwrap());
    assert_eq!(wait_pid(sup as i32, &root, "l-started"), 128 + libc::SIGKILL);
    assert_ok(&cmd(&["delete", "l-started"]).output().unwrap());
    assert_gone("l-started", (sup, owner), vmm, &jail);
    assert!(hooks_seen().ends_with("poststart running\npoststop stopped\n"), "{}", hooks_seen());

    // create, start, delete --force of the running container.
    let (sup, owner, vmm) = create("l-forced");
    let jail = support::jail_paths(vmm);
    assert_ok(&cmd(&["start", "l-forced"]).output().unwrap());
    assert_ok(&cmd(&["delete", "--force", "l-forced"]).output().unwrap());
    assert_eq!(wait_pid(sup as i32, &root, "l-forced"), 128 + libc::SIGKILL);
    assert_gone("l-forced", (sup, owner), vmm, &jail);

    // A create whose createRuntime hook fails: the create fails, the VM
    // it had started is stopped and everything removed.
    let spec_path = b.join("config.json");
    let mut spec: serde_json::Value = serde_json::from_slice(&std::fs::read(&spec_path).unwrap()).unwrap();
    spec["hooks"]["createRuntime"] = serde_json::json!([{ "path": "/bin/sh", "args": ["sh", "-c", "echo hook-says-no >&2; exit 1"] }]);
    std::fs::write(&spec_path, spec.to_string()).unwrap();
    let o = cmd(&["create", "--bundle", b.to_str().unwrap(), "l-failed"]).stdout(Stdio::null()).output().unwrap();
    assert_fails(&o, "createRuntime hook /bin/sh failed");
    assert!(text(&o.stderr).contains("hook-says-no"), "{}", text(&o.stderr));
    assert!(!root.join("l-failed").exists());

    // No jail cgroup is left under this test's parent, in any hierarchy.
    let hierarchies: Vec<PathBuf> = if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        vec![PathBuf::from("/sys/fs/cgroup")]
    } else {
        ["memory", "cpu", "pids"].iter().map(|h| Path::new("/sys/fs/cgroup").join(h)).collect()
    };
    for h in hierarchies {
        let dir = h.join(&parent);
        let left: Vec<PathBuf> =
            std::fs::read_dir(&dir).into_iter().flatten().flatten().map(|e| e.path()).filter(|p| p.is_dir()).collect();
        assert!(left.is_empty(), "jail cgroups left: {left:?}");
        let _ = std::fs::remove_dir(&dir);
    }
}

/// The container's pid on the host (its holder, `vmm/oci/src/holder.rs`)
/// is put in the namespaces asked for, passes the signals it is sent on,
/// and exits with the code it is given, or with 137 when its supervisor's
/// end closes without one. No VM: the supervisor's end is this test's.
#[test]
fn the_containers_pid_holds_its_namespaces_and_passes_signals_on() {
    use std::io::Write;
    use vmrun_oci::holder::{self, HostNamespace, NsKind};
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: namespaces need root");
        return;
    }
    let ns_of = |pid: &str, ns: &str| std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).unwrap();
    let new = |kind| HostNamespace { kind, path: None };
    let maps = [vmrun_agent_protocol::IdMapping { container_id: 0, host_id: 1000, size: 10 }];
    let mut cmd = Command::new(OCI);
    cmd.arg("hold");
    let mut h = holder::start(cmd, &[new(NsKind::Pid), new(NsKind::Network), new(NsKind::User)], &maps, &maps).unwrap();
    let pid = h.child.id().to_string();
    for ns in ["pid", "net", "user"] {
        assert_ne!(ns_of(&pid, ns), ns_of("self", ns), "a new {ns} namespace");
    }
    for ns in ["ipc", "uts", "mnt", "cgroup"] {
        assert_eq!(ns_of(&pid, ns), ns_of("self", ns), "the host's {ns} namespace");
    }
    assert_eq!(ns_of("thread-self", "pid_for_children"), ns_of("self", "pid"), "this process's children stay in its pid namespace");
    assert_eq!(std::fs::read_to_string(format!("/proc/{pid}/uid_map")).unwrap().split_whitespace().collect::<Vec<_>>(), ["0", "1000", "10"]);
    // A signal at once (blocked from before its exec: not lost, and it
    // does not kill it), then another.
    for sig in [libc::SIGTERM, libc::SIGUSR1] {
        // SAFETY: kill of this test's child.
        assert_eq!(unsafe { libc::kill(h.child.id() as i32, sig) }, 0);
        let mut buf = [0u8; 4];
        h.socket.read_exact(&mut buf).unwrap();
        assert_eq!(i32::from_le_bytes(buf), sig);
    }
    h.socket.write_all(&42i32.to_le_bytes()).unwrap();
    assert_eq!(h.child.wait().unwrap().code(), Some(42));

    // Joined by path: the first holder's network namespace is gone with
    // it, so a second one's.
    let mut cmd = Command::new(OCI);
    cmd.arg("hold");
    let mut first = holder::start(cmd, &[new(NsKind::Network), new(NsKind::Uts)], &[], &[]).unwrap();
    let path = PathBuf::from(format!("/proc/{}/ns/net", first.child.id()));
    let mut cmd = Command::new(OCI);
    cmd.arg("hold");
    let mut second = holder::start(cmd, &[HostNamespace { kind: NsKind::Network, path: Some(path) }], &[], &[]).unwrap();
    assert_eq!(ns_of(&second.child.id().to_string(), "net"), ns_of(&first.child.id().to_string(), "net"));
    assert_eq!(ns_of(&second.child.id().to_string(), "uts"), ns_of("self", "uts"));
    // Its supervisor's end closed without an exit code: 137.
    drop(second.socket);
    assert_eq!(second.child.wait().unwrap().code(), Some(137));
    drop(first.socket);
    assert_eq!(first.child.wait().unwrap().code(), Some(137));
    // A namespace that cannot be joined fails the start, saying which.
    let mut cmd = Command::new(OCI);
    cmd.arg("hold");
    let bad = HostNamespace { kind: NsKind::Network, path: Some(PathBuf::from("/proc/self/ns/uts")) };
    let e = holder::start(cmd, &[bad], &[], &[]).unwrap_err().to_string();
    assert!(e.contains("namespaces it asks for") && e.contains("/proc/self/ns/uts"), "{e}");
}

/// `ip netns exec NS sh -c SCRIPT`: its output, and whether it succeeded.
fn in_netns(ns: &str, script: &str) -> (bool, String) {
    let o = Command::new("ip").args(["netns", "exec", ns, "sh", "-c", script]).output().unwrap();
    (o.status.success(), format!("{}{}", text(&o.stdout), text(&o.stderr)))
}

/// Runs CNI plugin `plugin` (Debian's containernetworking-plugins) with
/// `command` for network namespace `netns`; returns its result.
fn cni(command: &str, plugin: &str, conf: &serde_json::Value, netns: &str) -> serde_json::Value {
    use std::io::Write;
    let dir = Path::new("/usr/lib/cni");
    assert!(dir.join(plugin).is_file(), "no CNI plugin {plugin} in {}: install containernetworking-plugins (scripts/deps.sh)", dir.display());
    let mut child = Command::new(dir.join(plugin))
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", "c-cni")
        .env("CNI_NETNS", netns)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(conf.to_string().as_bytes()).unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "CNI {command} {plugin}: {}{}", text(&o.stdout), text(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap_or_default()
}

/// A pod's network as containerd's CRI makes one: Debian's CNI `bridge`
/// plugin with `host-local` addresses puts a veth with the pod's address,
/// MAC and MTU in a network namespace, which the container's spec names by
/// path. The VM's `eth0` takes the veth's place: the pod's address answers
/// from the host, the container reaches the host's end of the bridge, and
/// once it has stopped the namespace is as CNI left it.
#[test]
fn oci_containers_get_the_cni_network_of_their_namespace() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: network namespaces need root");
        return;
    }
    let _turn = vm_turn();
    let id = std::process::id();
    let (pod, bridge) = (format!("vmrun-test-pod-{id}"), format!("vmrunbr{}", id % 100_000));
    let net = format!("10.252.{}", id % 250);
    let (gateway, pod_ip) = (format!("{net}.1"), format!("{net}.2"));
    let netns = format!("/run/netns/{pod}");
    support::run_ok(Command::new("ip").args(["netns", "add", &pod]));
    let conf = serde_json::json!({
        "cniVersion": "0.4.0", "name": format!("vmrun-test-{id}"), "type": "bridge", "bridge": bridge,
        "isGateway": true, "ipMasq": false, "mtu": 1400,
        "ipam": { "type": "host-local", "ranges": [[{ "subnet": format!("{net}.0/24") }]], "routes": [{ "dst": "0.0.0.0/0" }],
                  "dataDir": support::scratch("cni-ipam") }
    });
    let result = cni("ADD", "bridge", &conf, &netns);
    let mac = result["interfaces"].as_array().unwrap().iter().find(|i| i["sandbox"] == netns.as_str()).unwrap()["mac"].as_str().unwrap().to_string();
    assert_eq!(result["ips"][0]["address"], format!("{pod_ip}/24"), "{result}");
    // The host serves a page on the bridge's address.
    let www = support::scratch("pod-host-www");
    std::fs::create_dir_all(&www).unwrap();
    std::fs::write(www.join("index.html"), "from-the-host\n").unwrap();
    let mut host_httpd = Command::new("busybox").args(["httpd", "-f", "-p", &format!("{gateway}:8081"), "-h"]).arg(&www).spawn().unwrap();

    let root = support::scratch("oci-root-pod-network");
    let script = format!(
        "cat /sys/class/net/eth0/address /sys/class/net/eth0/mtu; ifconfig eth0; ip route; \
         printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc {gateway} 8081; mkdir -p /tmp/www; echo from-the-pod > /tmp/www/index.html; \
         exec httpd -f -p 8080 -h /tmp/www"
    );
    let b = bundle("bundle-pod-network", &["sh", "-c", &script], |s| {
        s["linux"]["namespaces"] = serde_json::json!([
            { "type": "pid" }, { "type": "network", "path": netns }, { "type": "ipc" }, { "type": "uts" }, { "type": "mount" }
        ]);
    });
    let (out, err) = (support::scratch("pod.out"), support::scratch("pod.err"));
    let pid = create(&root, &b, "c-pod", &out, &err);
    let (_, links) = in_netns(&pod, "ip -o link");
    let (_, filters) = in_netns(&pod, "tc filter show dev eth0 parent ffff:");
    assert_ok(&run(&root, &["start", "c-pod"]));
    // The pod's address answers from the host, once the container serves.
    let deadline = Instant::now() + Duration::from_secs(180);
    let served = loop {
        let o = Command::new("curl").args(["-sS", "-m", "5", &format!("http://{pod_ip}:8080/")]).output().unwrap();
        if o.status.success() || Instant::now() > deadline {
            break format!("{}{}", text(&o.stdout), text(&o.stderr));
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    let ping = Command::new("busybox").args(["ping", "-c", "1", "-W", "10", &pod_ip]).output().unwrap();
    assert_ok(&run(&root, &["kill", "c-pod", "KILL"]));
    let code = wait_pid(pid, &root, "c-pod");
    let (_, links_after) = in_netns(&pod, "ip -o link");
    let (_, qdiscs_after) = in_netns(&pod, "tc qdisc show dev eth0");
    let log = std::fs::read_to_string(root.join("c-pod/vmrun-oci.log")).unwrap_or_default();
    assert_ok(&run(&root, &["delete", "c-pod"]));
    let _ = host_httpd.kill();
    let _ = host_httpd.wait();
    cni("DEL", "bridge", &conf, &netns);
    let _ = Command::new("ip").args(["netns", "del", &pod]).output();
    let _ = Command::new("ip").args(["link", "del", &bridge]).output();

    let stdout = std::fs::read_to_string(&out).unwrap();
    let context = format!("stdout:\n{stdout}\nstderr:\n{}\nlog:\n{log}", std::fs::read_to_string(&err).unwrap_or_default());
    assert!(links.contains("tap0_vmrun") && filters.contains("Redirect to device tap0_vmrun"), "{links}\n{filters}");
    assert_eq!(served.trim(), "from-the-pod", "{context}");
    assert!(ping.status.success(), "{}", text(&ping.stdout));
    assert_eq!(code, 128 + libc::SIGKILL);
    let mut lines = stdout.lines();
    assert_eq!((lines.next(), lines.next()), (Some(mac.as_str()), Some("1400")), "{context}");
    assert!(stdout.contains(&format!("inet addr:{pod_ip} ")) && stdout.contains("Mask:255.255.255.0"), "{context}");
    assert!(stdout.contains(&format!("default via {gateway} dev eth0")), "{context}");
    assert!(stdout.contains("from-the-host"), "the container reaches the host: {context}");
    assert!(!links_after.contains("tap0_vmrun") && !qdiscs_after.contains("ingress"), "{links_after}\n{qdiscs_after}");
}

/// Debian's podman with `vmrun-oci` as its runtime (`--runtime`), on
/// podman's own CNI bridge network: a container runs and prints, one
/// publishes a port that answers on the host's loopback address (podman's
/// `portmap` rules to the pod's address, which the VM holds), `exec`
/// reaches it, and `stop` and `rm` leave no VM behind. Podman's images
/// and containers are kept in a scratch store.
#[test]
fn podman_runs_containers_with_vmrun_oci() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: podman's bridge network needs root");
        return;
    }
    assert!(support::containerd::which("podman").is_some(), "no podman: install it (scripts/deps.sh)");
    let e = shared();
    let _turn = vm_turn();
    let store = support::scratch("podman-store");
    // Podman gives its runtime an environment of its own making (conmon's),
    // not its caller's: the runtime it runs is a script that names this
    // test's data directory, kernel and agent (a user's vmrun-oci finds
    // them in its default data directory).
    std::fs::create_dir_all(&store).unwrap();
    let runtime = store.join("vmrun-oci");
    let script = format!(
        "#!/bin/sh\nexec env VMRUN_HOME='{}' VMRUN_KERNEL='{}' VMRUN_AGENT_INITRD='{}' '{OCI}' \"$@\"\n",
        e.home.display(),
        e.kernel.display(),
        e.initrd.display()
    );
    std::fs::write(&runtime, script).unwrap();
    std::fs::set_permissions(&runtime, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let podman = |args: &[&str]| {
        let mut c = Command::new("podman");
        c.arg("--root").arg(store.join("root")).arg("--runroot").arg(store.join("run")).arg("--runtime").arg(&runtime).args(args).stdin(Stdio::null());
        c.output().unwrap()
    };
    let archive = support::busybox_image().join("busybox-docker.tar");
    assert_ok(&podman(&["load", "-q", "-i", archive.to_str().unwrap()]));

    let o = podman(&["run", "--rm", "localhost/busybox", "sh", "-c", "echo hello-podman; ip route"]);
    assert_ok(&o);
    let out = text(&o.stdout);
    assert!(out.starts_with("hello-podman\n") && out.contains("default via") && out.contains("dev eth0"), "{out}");

    let name = format!("vmrun-test-web-{}", std::process::id());
    let port = 18000 + std::process::id() % 1000;
    let o = podman(&[
        "run",
        "-d",
        "--name",
        &name,
        "-p",
        &format!("127.0.0.1:{port}:8080"),
        "localhost/busybox",
        "sh",
        "-c",
        "mkdir /w; echo served-by-vmrun > /w/index.html; exec httpd -f -p 8080 -h /w",
    ]);
    assert_ok(&o);
    let deadline = Instant::now() + Duration::from_secs(120);
    let served = loop {
        let o = Command::new("curl").args(["-sS", "-m", "5", &format!("http://127.0.0.1:{port}/")]).output().unwrap();
        if o.status.success() || Instant::now() > deadline {
            break format!("{}{}", text(&o.stdout), text(&o.stderr));
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    let exec = podman(&["exec", &name, "sh", "-c", "echo exec-ok"]);
    let stop = podman(&["stop", "-t", "5", &name]);
    let rm = podman(&["rm", "-f", &name]);
    assert_eq!(served.trim(), "served-by-vmrun");
    assert_ok(&exec);
    assert_eq!(text(&exec.stdout), "exec-ok\n");
    assert_ok(&stop);
    assert_ok(&rm);
    // This test's VMs were the only ones running (tests that start VMs
    // take turns); the zombies are other tests' jailed VMMs, orphans this
    // subreaper inherited.
    let vmms = Command::new("pgrep").args(["-x", "vmrun-vmm"]).output().unwrap();
    let pids = text(&vmms.stdout);
    let running = |pid: &str| {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        !stat.is_empty() && stat.rsplit(')').next().is_some_and(|rest| !rest.trim_start().starts_with('Z'))
    };
    let running: Vec<&str> = pids.lines().filter(|pid| running(pid)).collect();
    assert!(running.is_empty(), "VMMs left: {running:?}");
}

/// The annotations containerd's CRI gives a pod's containers.
fn in_pod(spec: &mut serde_json::Value, kind: &str, sandbox: &str) {
    spec["annotations"] = serde_json::json!({
        "io.kubernetes.cri.container-type": kind,
        "io.kubernetes.cri.sandbox-id": sandbox,
    });
}

/// Force-deletes a test's containers if it fails (a pod's sandbox would
/// leave its VM running otherwise, which later tests see).
struct DeleteOnPanic<'a> {
    root: &'a Path,
    ids: &'a [&'a str],
}

impl Drop for DeleteOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for id in self.ids.iter().rev() {
                let _ = run(self.root, &["delete", "--force", id]);
            }
        }
    }
}

#[test]
fn oci_a_pods_containers_share_its_sandboxs_vm() {
    let _turn = vm_turn();
    let root = support::scratch("oci-pod-root");
    let _cleanup = DeleteOnPanic { root: &root, ids: &["pod-sb", "pod-m1", "pod-m2", "pod-m3"] };
    // The sandbox (where a pod has its pause process) serves a page on the
    // VM's loopback.
    let sandbox = bundle(
        "oci-pod-sandbox",
        &["sh", "-c", "mkdir -p /www && echo from-the-sandbox > /www/index.html && exec httpd -f -p 127.0.0.1:8080 -h /www"],
        |s| {
            in_pod(s, "sandbox", "pod-sb");
            s["hostname"] = "pod-host".into();
        },
    );
    let (out, err) = (sandbox.join("out"), sandbox.join("err"));
    let sandbox_pid = create(&root, &sandbox, "pod-sb", &out, &err);
    assert_ok(&run(&root, &["start", "pod-sb"]));
    let state_json = |id: &str| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(root.join(id).join("state.json")).unwrap()).unwrap()
    };

    // A container of the pod fetches it over localhost: it runs in the
    // sandbox's VM, not in one of its own.
    let fetch = "for i in 1 2 3 4 5 6 7 8 9 10; do wget -qO- http://127.0.0.1:8080/ && exit 0; sleep 1; done; exit 9";
    let member = bundle("oci-pod-member", &["sh", "-c", fetch], |s| in_pod(s, "container", "pod-sb"));
    let (mout, merr) = (member.join("out"), member.join("err"));
    let member_pid = create(&root, &member, "pod-m1", &mout, &merr);
    let (sb, m1) = (state_json("pod-sb"), state_json("pod-m1"));
    assert_eq!(m1["vm_dir"], sb["vm_dir"], "the member's VM is the sandbox's: {m1}");
    assert!(m1["vmm"].is_null() && !sb["vmm"].is_null(), "no VMM of its own: {m1}");
    assert_ok(&run(&root, &["start", "pod-m1"]));
    assert_eq!(wait_pid(member_pid, &root, "pod-m1"), 0, "stderr: {}", std::fs::read_to_string(&merr).unwrap_or_default());
    assert_eq!(std::fs::read_to_string(&mout).unwrap(), "from-the-sandbox\n");
    assert_ok(&run(&root, &["delete", "pod-m1"]));
    assert!(!root.join("pod-m1").exists());

    // Another takes the slots the first freed; exec reaches it in the
    // pod's VM; a member refused without its sandbox.
    let member2 = bundle("oci-pod-member2", &["sleep", "1000"], |s| {
        in_pod(s, "container", "pod-sb");
        s["hostname"] = "member-host".into();
    });
    let m2_pid = create(&root, &member2, "pod-m2", &member2.join("out"), &member2.join("err"));
    assert_ok(&run(&root, &["start", "pod-m2"]));
    let o = run(&root, &["exec", "pod-m2", "sh", "-c", "wget -qO- http://127.0.0.1:8080/; hostname; readlink /proc/self/ns/ipc"]);
    assert_ok(&o);
    let lines: Vec<String> = text(&o.stdout).lines().map(String::from).collect();
    assert_eq!(lines.len(), 3, "{lines:?}");
    assert_eq!((lines[0].as_str(), lines[1].as_str()), ("from-the-sandbox", "pod-host"), "the pod's UTS namespace");
    let o = run(&root, &["exec", "pod-sb", "readlink", "/proc/self/ns/ipc"]);
    assert_ok(&o);
    assert_eq!(text(&o.stdout).trim(), lines[2], "the pod's IPC namespace");
    let orphan = bundle("oci-pod-orphan", &["true"], |s| in_pod(s, "container", "pod-none"));
    assert_fails(&run(&root, &["create", "--bundle", orphan.to_str().unwrap(), "pod-orphan"]), "does not exist");
    assert!(!root.join("pod-orphan").exists(), "a refused create leaves nothing");

    // Its supervisor killed (kill -9): its container and disks stay in the
    // pod's VM until its delete takes them out.
    let supervisor = state_json("pod-m2")["owner"]["pid"].as_u64().unwrap();
    // SAFETY: kill of the member's supervisor, a process this test started.
    assert_eq!(unsafe { libc::kill(supervisor as i32, libc::SIGKILL) }, 0);
    wait_pid(m2_pid, &root, "pod-m2");
    let slots_now = || -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(root.join("pod-sb").join("pod-slots.json")).unwrap()).unwrap()
    };
    assert!(slots_now()["members"]["pod-m2"].is_array(), "{}", slots_now());
    assert_ok(&run(&root, &["delete", "--force", "pod-m2"]));
    assert_eq!(slots_now()["members"], serde_json::json!({}), "the members' slots are free: {}", slots_now());
    // The slots serve the next member.
    let member3 = bundle("oci-pod-member3", &["sh", "-c", "wget -qO- http://127.0.0.1:8080/"], |s| in_pod(s, "container", "pod-sb"));
    let (m3out, m3err) = (member3.join("out"), member3.join("err"));
    let m3_pid = create(&root, &member3, "pod-m3", &m3out, &m3err);
    assert_ok(&run(&root, &["start", "pod-m3"]));
    assert_eq!(wait_pid(m3_pid, &root, "pod-m3"), 0, "stderr: {}", std::fs::read_to_string(&m3err).unwrap_or_default());
    assert_eq!(std::fs::read_to_string(&m3out).unwrap(), "from-the-sandbox\n");
    assert_ok(&run(&root, &["delete", "pod-m3"]));
    assert_eq!(slots_now()["members"], serde_json::json!({}), "the members' slots are free: {}", slots_now());

    // The sandbox ends the pod: its VM goes with it.
    let vmm = sb["vmm"]["pid"].as_u64().unwrap();
    assert_ok(&run(&root, &["kill", "pod-sb", "KILL"]));
    assert_eq!(wait_pid(sandbox_pid, &root, "pod-sb"), 137);
    assert_ok(&run(&root, &["delete", "pod-sb"]));
    let t = Instant::now();
    while support::alive(vmm) {
        assert!(t.elapsed() < Duration::from_secs(30), "the pod's VMM {vmm} outlived its sandbox");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn oci_runtime_pauses_and_resumes_a_container() {
    let _turn = vm_turn();
    let root = support::scratch("oci-root-pause");
    let b = bundle("oci-pause", &["sh", "-c", "i=0; while :; do i=$((i+1)); echo $i; sleep 0.2; done"], |_| {});
    let (out, err) = (b.join("out"), b.join("err"));
    let pid = create(&root, &b, "c-pause", &out, &err);
    assert_fails(&run(&root, &["resume", "c-pause"]), "is not paused");
    assert_ok(&run(&root, &["start", "c-pause"]));
    let size = || std::fs::metadata(&out).map(|m| m.len()).unwrap_or(0);
    let grows_past = |n: u64| {
        let t = Instant::now();
        while size() <= n {
            assert!(t.elapsed() < Duration::from_secs(60), "the container does not count on: {} bytes", size());
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    grows_past(0);
    assert_ok(&run(&root, &["pause", "c-pause"]));
    assert_eq!(state(&root, "c-pause")["status"], "paused");
    assert_fails(&run(&root, &["pause", "c-pause"]), "already paused");
    assert_fails(&run(&root, &["exec", "c-pause", "true"]), "paused");
    // What was on its way out has arrived; then nothing more comes.
    std::thread::sleep(Duration::from_secs(1));
    let frozen = size();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(size(), frozen, "the paused container went on counting");
    assert_ok(&run(&root, &["resume", "c-pause"]));
    assert_eq!(state(&root, "c-pause")["status"], "running");
    grows_past(frozen);
    assert_ok(&run(&root, &["kill", "c-pause", "KILL"]));
    assert_eq!(wait_pid(pid, &root, "c-pause"), 137);
    assert_ok(&run(&root, &["delete", "c-pause"]));
}
