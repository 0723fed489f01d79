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
    let b = bundle("bundle-echo", &["sh", "-c", "echo hello-oci; echo to-stderr >&2; exit 3"], |s| {
        s["annotations"] = serde_json::json!({ "org.example.note": "kept" });
    });
    let (out, err) = (support::scratch("echo.out"), support::scratch("echo.err"));
    let pid = create(&root, &b, "c-echo", &out, &err);
    assert_eq!(state(&root, "c-echo")["annotations"]["org.example.note"], "kept");
    let ps = run(&root, &["ps", "--format", "json", "c-echo"]);
    assert_ok(&ps);
    assert_eq!(serde_json::from_slice::<Vec<i32>>(&ps.stdout).unwrap(), [pid]);

    let t = Instant::now();
    assert_ok(&run(&root, &["start", "c-echo"]));
    assert_fails(&run(&root, &["start", "c-echo"]), "cannot start");
    assert_eq!(wait_pid(pid, &root, "c-echo"), 3, "the supervisor exits with the process's code");
    eprintln!("oci test: start to exit: {:.1} s", t.elapsed().as_secs_f64());
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "hello-oci\n");
    assert!(std::fs::read_to_string(&err).unwrap().contains("to-stderr"));
    let s = state(&root, "c-echo");
    assert_eq!((s["status"].as_str(), s["pid"].as_i64()), (Some("stopped"), Some(0)), "{s}");
    assert_fails(&run(&root, &["kill", "c-echo", "TERM"]), "not running");

    assert_ok(&run(&root, &["delete", "c-echo"]));
    assert!(!root.join("c-echo").exists(), "delete leaves nothing");
    assert_fails(&run(&root, &["state", "c-echo"]), "does not exist");
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
    assert_ok(&run(&root, &["kill", "c-long", "SIGTERM"]));
    assert_eq!(wait_pid(pid, &root, "c-long"), 7);
    assert_eq!(state(&root, "c-long")["status"], "stopped");
    assert_ok(&run(&root, &["delete", "c-long"]));

    // SIGKILL through the agent: 128+9.
    let b = bundle("bundle-sleep", &["sleep", "1000"], |_| {});
    let pid = create(&root, &b, "c-kill", &out, &err);
    assert_ok(&run(&root, &["start", "c-kill"]));
    assert_ok(&run(&root, &["kill", "c-kill", "9"]));
    assert_eq!(wait_pid(pid, &root, "c-kill"), 137);
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
    assert_eq!((f["ociVersionMin"].as_str(), f["ociVersionMax"].as_str()), (Some("1.0.0"), Some("1.1.0")));
    let o = Command::new(OCI).arg("--version").output().unwrap();
    assert!(text(&o.stdout).starts_with("vmrun-oci version"));

    // A reader that went away (`vmrun-oci state X | grep -q running`) gets
    // an error, not a panic.
    let mut child = Command::new(OCI).arg("features").stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    drop(child.stdout.take());
    let o = child.wait_with_output().unwrap();
    assert!(!text(&o.stderr).contains("panicked"), "{}", text(&o.stderr));
    assert!(o.status.success() || text(&o.stderr).contains("Broken pipe"), "{:?}: {}", o.status, text(&o.stderr));
}

/// Finds `name` on PATH.
fn which(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?).map(|d| d.join(name)).find(|p| p.is_file())
}

#[test]
fn containerd_runs_containers_through_the_vmrun_shim() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: containerd needs root");
        return;
    }
    let (Some(containerd), Some(ctr)) = (which("containerd"), which("ctr")) else {
        eprintln!("skipped: no containerd/ctr (scripts/deps.sh installs Debian's containerd)");
        return;
    };
    let _turn = vm_turn();
    let e = shared();
    let dir = support::scratch("containerd");
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("c.sock");
    let config = format!(
        r#"version = 2
root = "{d}/root"
state = "{d}/state"
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.devmapper"]
[grpc]
  address = "{s}"
[ttrpc]
  address = "{s}.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"
"#,
        d = dir.display(),
        s = sock.display()
    );
    std::fs::write(dir.join("config.toml"), config).unwrap();
    // containerd finds containerd-shim-vmrun-v2 (and the shim vmrun-oci and
    // vmrun) in the directory cargo built them in.
    let bin = Path::new(SHIM).parent().unwrap();
    let path = std::env::join_paths(std::iter::once(bin.to_path_buf()).chain(std::env::split_paths(&std::env::var_os("PATH").unwrap()))).unwrap();
    let log = File::create(dir.join("containerd.log")).unwrap();
    let mut daemon = support::Reaped(
        Command::new(&containerd)
            .arg("--config")
            .arg(dir.join("config.toml"))
            .env("PATH", &path)
            .env("VMRUN_HOME", &e.home)
            .env("VMRUN_KERNEL", &e.kernel)
            .env("VMRUN_AGENT_INITRD", &e.initrd)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let ns = "vmrun-oci-test";
    let ctr_cmd = |args: &[&str]| {
        let mut c = Command::new(&ctr);
        c.arg("--address").arg(&sock).arg("--namespace").arg(ns).args(args).stdin(Stdio::null());
        c
    };
    let start = Instant::now();
    while !ctr_cmd(&["version"]).output().unwrap().status.success() {
        assert!(daemon.try_wait().unwrap().is_none(), "containerd ended: {}", std::fs::read_to_string(dir.join("containerd.log")).unwrap());
        assert!(start.elapsed() < Duration::from_secs(60), "containerd did not come up");
        std::thread::sleep(Duration::from_millis(200));
    }
    let archive = support::busybox_image().join("busybox-oci.tar");
    let o = ctr_cmd(&["images", "import", archive.to_str().unwrap()]).output().unwrap();
    assert_ok(&o);
    let image = "docker.io/library/busybox:latest";
    let id = format!("t1-{}", std::process::id());
    let t = Instant::now();
    let o = ctr_cmd(&["run", "--rm", "--runtime", "io.containerd.vmrun.v2", image, &id, "echo", "hello-from-containerd"]).output().unwrap();
    let clog = || std::fs::read_to_string(dir.join("containerd.log")).unwrap_or_default();
    assert!(o.status.success(), "ctr run: {:?}\n{}\n{}\ncontainerd:\n{}", o.status, text(&o.stdout), text(&o.stderr), clog());
    assert_eq!(text(&o.stdout).trim_end(), "hello-from-containerd");
    eprintln!("oci test: ctr run echo: {:.1} s", t.elapsed().as_secs_f64());

    let id2 = format!("t2-{}", std::process::id());
    let o = ctr_cmd(&["run", "--rm", "--runtime", "io.containerd.vmrun.v2", image, &id2, "sh", "-c", "echo out; exit 3"]).output().unwrap();
    assert_eq!(o.status.code(), Some(3), "ctr run: {}\n{}\ncontainerd:\n{}", text(&o.stdout), text(&o.stderr), clog());
    assert_eq!(text(&o.stdout).trim_end(), "out");
    // containerd's shim keeps the runtime's state under its runc root; the
    // deletes removed it.
    let runc_root = Path::new("/run/containerd/runc").join(ns);
    assert!(!runc_root.join(&id).exists() && !runc_root.join(&id2).exists(), "state left in {}", runc_root.display());
    let _ = daemon.kill();
    let _ = daemon.wait();
}

/// The jail of a container's VMM, as its record lists it: its root
/// directory and cgroups (empty once collected).
fn jail_paths(vmm_pid: u64) -> Vec<PathBuf> {
    let record = PathBuf::from(format!("/run/vmrun-jail/{vmm_pid}.json"));
    let Ok(text) = std::fs::read(&record) else { return Vec::new() };
    let v: serde_json::Value = serde_json::from_slice(&text).unwrap();
    let mut paths = vec![record, PathBuf::from(v["root"].as_str().unwrap())];
    paths.extend(v["cgroups"].as_array().unwrap().iter().map(|c| PathBuf::from(c.as_str().unwrap())));
    paths
}

/// Whether process `pid` runs (a zombie does not: one this subreaper
/// inherited, a VMM whose supervisor was killed, is reaped here).
fn alive(pid: u64) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return false };
    // "pid (comm) S ...": the state follows the last ')'.
    if stat.rsplit_once(')').and_then(|(_, rest)| rest.trim_start().chars().next()) != Some('Z') {
        return true;
    }
    let mut status = 0;
    // SAFETY: waitpid of a zombie; WNOHANG, nothing else is touched.
    unsafe { libc::waitpid(pid as i32, &mut status, libc::WNOHANG) };
    false
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
    let create = |id: &str| -> (u64, u64) {
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
        (std::fs::read_to_string(&pid_file).unwrap().parse().unwrap(), vmm)
    };
    // (The supervisor, this subreaper's orphan, reaped before.)
    let assert_gone = |id: &str, supervisor: u64, vmm: u64, jail: &[PathBuf]| {
        assert!(!alive(supervisor), "{id}: its supervisor {supervisor} runs on");
        assert!(!root.join(id).exists(), "{id}: its state directory is left");
        assert!(!alive(vmm), "{id}: its VMM {vmm} runs on");
        let left: Vec<&PathBuf> = jail.iter().filter(|p| p.exists()).collect();
        assert!(left.is_empty(), "{id}: its jail left {left:?}");
    };
    let hooks_seen = || std::fs::read_to_string(&hook_log).unwrap_or_default();

    // create, delete.
    let (sup, vmm) = create("l-created");
    let jail = jail_paths(vmm);
    assert!(jail.len() >= 3, "the VMM {vmm} is jailed: {jail:?}");
    assert_eq!(hooks_seen(), "prestart creating\ncreateRuntime creating\n");
    assert_ok(&cmd(&["delete", "l-created"]).output().unwrap());
    assert_eq!(wait_pid(sup as i32, &root, "l-created"), 128 + libc::SIGTERM);
    assert_gone("l-created", sup, vmm, &jail);
    assert_eq!(hooks_seen(), "prestart creating\ncreateRuntime creating\npoststop stopped\n");

    // create, kill KILL (the supervisor dies, and its VMM with it), delete.
    let (sup, vmm) = create("l-killed");
    let jail = jail_paths(vmm);
    assert_ok(&cmd(&["kill", "l-killed", "KILL"]).output().unwrap());
    assert_eq!(wait_pid(sup as i32, &root, "l-killed"), 128 + libc::SIGKILL);
    assert_ok(&cmd(&["delete", "l-killed"]).output().unwrap());
    assert_gone("l-killed", sup, vmm, &jail);

    // create, start, kill KILL, delete: the poststart hook ran before
    // start returned.
    std::fs::remove_file(&hook_log).unwrap();
    let (sup, vmm) = create("l-started");
    let jail = jail_paths(vmm);
    assert_ok(&cmd(&["start", "l-started"]).output().unwrap());
    assert!(hooks_seen().ends_with("poststart running\n"), "{}", hooks_seen());
    assert_ok(&cmd(&["kill", "l-started", "KILL"]).output().unwrap());
    assert_eq!(wait_pid(sup as i32, &root, "l-started"), 128 + libc::SIGKILL);
    assert_ok(&cmd(&["delete", "l-started"]).output().unwrap());
    assert_gone("l-started", sup, vmm, &jail);
    assert!(hooks_seen().ends_with("poststart running\npoststop stopped\n"), "{}", hooks_seen());

    // create, start, delete --force of the running container.
    let (sup, vmm) = create("l-forced");
    let jail = jail_paths(vmm);
    assert_ok(&cmd(&["start", "l-forced"]).output().unwrap());
    assert_ok(&cmd(&["delete", "--force", "l-forced"]).output().unwrap());
    assert_eq!(wait_pid(sup as i32, &root, "l-forced"), 128 + libc::SIGKILL);
    assert_gone("l-forced", sup, vmm, &jail);

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
