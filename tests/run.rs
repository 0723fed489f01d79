//! `vmrun run` end to end: images from Debian's `docker-registry` on
//! loopback and from an archive, containers in microVMs with their output,
//! exit codes, standard input, environment, working directory and user.
//!
//! The tests share one data directory: the first run builds the warm-start
//! template (one boot, under a lock), the others restore it. Needs the
//! guest kernel (`VMRUN_TEST_KERNEL`, see `support/mod.rs`), the agent
//! initramfs (`VMRUN_AGENT_INITRD`, else `rootfs/build.sh` builds it),
//! Debian's docker-registry, and root for `--network tap` and the Debian
//! image (debootstrap).

#![allow(clippy::unwrap_used)] // test code: a failed step is a failed test

mod support;

#[path = "../vmm/images/tests/support/registry.rs"]
#[allow(dead_code)] // shared with the image store's tests, which use all of it
mod registry;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

const VMRUN: &str = env!("CARGO_BIN_EXE_vmrun");

/// A port nothing listens on (used by the registry helper too).
pub fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

struct Vmrun {
    home: PathBuf,
    kernel: PathBuf,
    initrd: PathBuf,
}

impl Vmrun {
    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(VMRUN);
        c.args(args)
            .env("VMRUN_HOME", &self.home)
            .env("VMRUN_KERNEL", &self.kernel)
            .env("VMRUN_AGENT_INITRD", &self.initrd)
            .stdin(Stdio::null());
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().unwrap()
    }

    fn run_with_stdin(&self, args: &[&str], input: &[u8]) -> Output {
        let mut child = self.cmd(args).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        child.stdin.take().unwrap().write_all(input).unwrap();
        child.wait_with_output().unwrap()
    }
}

/// The data directory the tests share.
fn shared() -> &'static Vmrun {
    static V: OnceLock<Vmrun> = OnceLock::new();
    V.get_or_init(|| {
        support::build_vmm(VMRUN);
        Vmrun { home: support::scratch("run-home"), kernel: support::kernel().to_path_buf(), initrd: support::agent_initrd() }
    })
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Exit code `code`, and the output shown if not.
fn assert_code(o: &Output, code: i32) {
    assert_eq!(o.status.code(), Some(code), "stdout: {}\nstderr: {}", text(&o.stdout), text(&o.stderr));
}

/// One clear line of error and exit code `code`.
fn assert_error(o: &Output, code: i32, needle: &str) {
    assert_code(o, code);
    let err = text(&o.stderr);
    assert!(err.contains(needle), "expected {needle:?} in: {err}");
    assert_eq!(err.lines().filter(|l| l.contains("error")).count(), 1, "one error line: {err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn run_containers_from_a_registry_and_an_archive() {
    let v = shared();
    let images = support::busybox_image();

    // Pull from a real registry on loopback.
    let reg = registry::Registry::start();
    reg.push_layout(&images.join("oci"), "busybox", "latest");
    let reference = format!("127.0.0.1:{}/busybox:latest", reg.port);
    let o = v.run(&["pull", &reference]);
    assert_code(&o, 0);

    // The first run builds the warm-start template.
    let o = v.run(&["run", "--rm", &reference, "echo", "hello"]);
    assert_code(&o, 0);
    assert_eq!(text(&o.stdout), "hello\n");

    let o = v.run(&["run", &reference, "sh", "-c", "echo to-stderr >&2; exit 3"]);
    assert_code(&o, 3);
    assert_eq!(text(&o.stderr).lines().filter(|l| *l == "to-stderr").count(), 1, "{}", text(&o.stderr));

    // The agent reports a first process's exit as it begins, before the
    // kernel tears the process down: what it and its children wrote
    // before still arrives whole, and the status is the one its reaping
    // gives, a signal's too (the kernel's SIGKILL at the hard CPU limit:
    // a namespace's init ignores its own `kill -9 $$`).
    let o = v.run(&["run", "--rm", &reference, "sh", "-c", "echo out; echo err >&2; ulimit -t 1; while :; do :; done"]);
    assert_code(&o, 137);
    assert_eq!(text(&o.stdout), "out\n");
    assert_eq!(text(&o.stderr).lines().filter(|l| *l == "err").count(), 1, "{}", text(&o.stderr));
    let o = v.run(&["run", "--rm", &reference, "sh", "-c", "(echo from-a-child) & wait; head -c 300000 /dev/zero; exit 6"]);
    assert_code(&o, 6);
    assert_eq!(o.stdout.len(), "from-a-child\n".len() + 300_000);
    assert!(o.stdout.starts_with(b"from-a-child\n"), "{:?}", &o.stdout[..20.min(o.stdout.len())]);

    let o = v.run_with_stdin(&["run", "-i", &reference, "cat"], b"piped through cat\n");
    assert_code(&o, 0);
    assert_eq!(text(&o.stdout), "piped through cat\n");

    let o = v.run(&[
        "run",
        "-e",
        "GREETING=bonjour",
        "-w",
        "/tmp/work",
        "-u",
        "1000:1000",
        &reference,
        "sh",
        "-c",
        "echo $GREETING $(pwd) $(id -u):$(id -g)",
    ]);
    assert_code(&o, 0);
    assert_eq!(text(&o.stdout), "bonjour /tmp/work 1000:1000\n");

    let o = v.run(&["run", &reference, "no-such-command"]);
    assert_code(&o, 127);

    // With debug logging, each phase a VM runs in says how much guest work
    // it took: the instructions KVM emulated and the exits, from the VMM;
    // and the phase that reaches the agent, the host CPU spent until the
    // guest ran. With VMRUN_GUEST_PROFILE, the VM writes a guest profile
    // whose epochs are those phases.
    let profiles = support::scratch("run-profiles");
    std::fs::create_dir_all(&profiles).unwrap();
    // The jailed VMM runs as a uid of its own.
    std::fs::set_permissions(&profiles, std::os::unix::fs::PermissionsExt::from_mode(0o1777)).unwrap();
    let o = v
        .cmd(&["run", "--rm", &reference, "true"])
        .env("VMRUN_LOG", "debug")
        .env("VMRUN_GUEST_PROFILE", &profiles)
        .output()
        .unwrap();
    assert_code(&o, 0);
    let log = text(&o.stderr);
    assert!(
        log.lines().any(|l| l.contains("phase guest to agent ready") && l.contains("; host CPU until the guest ran ")),
        "{log}"
    );
    let written: Vec<PathBuf> = std::fs::read_dir(&profiles).unwrap().flatten().map(|e| e.path()).collect();
    assert_eq!(written.len(), 1, "one VM, one profile: {written:?}");
    let profile: vmrun_vmm_api::profile::Profile = serde_json::from_slice(&std::fs::read(&written[0]).unwrap()).unwrap();
    let in_epoch = |e: u32| profile.samples.iter().filter(|s| s.epoch == e && s.kernel).map(|s| s.count).sum::<u64>();
    assert!(in_epoch(0) > 0 && in_epoch(1) > 0, "samples of the agent's start and of the process run: {:?}", (in_epoch(0), in_epoch(1)));
    let counted = |phase: &str| {
        log.lines().filter_map(|l| l.split(&format!("phase {phase}")).nth(1)).any(|rest| {
            let guest = rest.split("; ").nth(1).unwrap_or_default();
            guest.ends_with(" exits") && guest.split(' ').next().is_some_and(|n| n.parse::<u64>().is_ok())
        })
    };
    assert!(counted("guest to agent ready") && counted("process run"), "{log}");
    assert!(!counted("store lookup"), "no VM runs while the store is read: {log}");

    // The cold path (a boot, no template) behaves the same; with two
    // vCPUs, the guest runs the SMP kernel, where one vCPU gets its
    // uniprocessor build. Its only disk is the layer disk (no empty
    // volume slots), and its kernel's random generator was ready before
    // the kernel had parsed its command line: the VMM's seed, credited.
    let o = v.run(&["run", "--cold", "--cpus", "2", "-e", "WHERE=cold", &reference, "sh", "-c", "echo $WHERE $(nproc); uname -v; echo $(ls /sys/block); dmesg; exit 5"]);
    assert_code(&o, 5);
    let out = text(&o.stdout);
    assert!(out.starts_with("cold 2\n") && out.lines().nth(1).is_some_and(|l| l.contains(" SMP ")), "{out}");
    assert_eq!(out.lines().nth(2), Some("vda"), "the disks: {out}");
    let at = |needle: &str| out.lines().position(|l| l.contains(needle)).unwrap_or_else(|| panic!("no {needle:?} in the kernel's log: {out}"));
    assert!(at("random: crng init done") < at("Kernel command line:"), "{out}");
    // A cold boot initialises only the first COLD_BOOT_MEMORY_MIB of its
    // memory (a template's boot, 128 MiB): Linux's "Memory: FREEK/TOTALK
    // available" counts what was initialised at boot.
    let available: u64 = out.lines().nth(at("Memory: ")).and_then(|l| l.split("Memory: ").nth(1)).and_then(|r| r.split('K').next()).and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("no Memory: line: {out}"));
    assert!(available < u64::from(vmrun_runtime::vm::COLD_BOOT_MEMORY_MIB) * 1024, "{available} KiB available at boot: {out}");
    assert!(vmrun_runtime::artifacts::up_kernel_beside(&v.kernel).is_some(), "kernel-config/build.sh builds vmlinux-up beside vmlinux");
    let o = v.run(&["run", "--rm", &reference, "sh", "-c", "echo $(nproc); uname -v"]);
    assert_code(&o, 0);
    let out = text(&o.stdout);
    assert!(out.starts_with("1\n") && out.lines().nth(1).is_some_and(|l| !l.contains("SMP")), "{out}");

    // The same image from an archive, by its short name.
    let o = v.run(&["load", "-i", images.join("busybox-docker.tar").to_str().unwrap()]);
    assert_code(&o, 0);
    let o = v.run(&["images"]);
    assert!(text(&o.stdout).contains("busybox"), "{}", text(&o.stdout));

    // Errors: one line each, exit 125 (vmrun run) or 1 (the others).
    let missing = format!("127.0.0.1:{}/nothing-here:latest", reg.port);
    assert_error(&v.run(&["run", &missing, "true"]), 125, "nothing-here");
    assert_error(&v.run(&["run", "Bad//Reference!!", "true"]), 125, "Bad//Reference!!");
    let unreachable = format!("127.0.0.1:{}/busybox:latest", closed_port());
    assert_error(&v.run(&["run", &unreachable, "true"]), 125, "127.0.0.1");
    let garbage = v.home.join("garbage.tar");
    std::fs::write(&garbage, b"this is not a tar archive").unwrap();
    assert_error(&v.run(&["load", "-i", garbage.to_str().unwrap()]), 1, "garbage.tar");

    // Nothing is left of these containers (other tests' may run).
    let left: Vec<_> = std::fs::read_dir(v.home.join("containers"))
        .map(|d| d.flatten().map(|e| e.path()).filter(|p| p.is_dir()).collect())
        .unwrap_or_default();
    let ours: Vec<_> = left
        .iter()
        .filter(|d| std::fs::read_to_string(d.join("state.json")).map_or(true, |s| s.contains(&reference)))
        .collect();
    assert!(ours.is_empty(), "container directories left behind: {ours:?}");
    assert!(Path::new(&v.home.join("templates")).is_dir());

    // rmi takes the image's layer disk and prepared template with it; the
    // base template stays. (An image of its own: busybox's manifest with an
    // annotation, so that no other test's run shares its files.)
    let layout = images.join("oci");
    let index: serde_json::Value = serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let digest = index["manifests"][0]["digest"].as_str().unwrap().to_owned();
    let blob = layout.join("blobs/sha256").join(digest.trim_start_matches("sha256:"));
    let mut manifest: serde_json::Value = serde_json::from_slice(&std::fs::read(blob).unwrap()).unwrap();
    manifest["annotations"] = serde_json::json!({"vmrun.test": "rmi"});
    let bytes = serde_json::to_vec(&manifest).unwrap();
    reg.push_layout(&layout, "rmi-me", "base");
    reg.push_manifest("rmi-me", "latest", "application/vnd.oci.image.manifest.v1+json", &bytes);
    let own = format!("127.0.0.1:{}/rmi-me:latest", reg.port);
    let own_digest = vmrun_images::Digest::of(&bytes).hex().to_owned();
    assert_code(&v.run(&["run", "--rm", &own, "true"]), 0);
    let disk = v.home.join(format!("layer-disks/sha256-{own_digest}.disk"));
    let prepared_suffix = format!("-image-{}", &own_digest[..16]);
    let prepared = || -> Vec<PathBuf> {
        std::fs::read_dir(v.home.join("templates"))
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.to_string_lossy().ends_with(&prepared_suffix))
            .collect()
    };
    assert!(disk.is_file(), "no layer disk {}", disk.display());
    let made = prepared();
    assert_eq!(made.len(), 1, "{made:?}");
    let base = made[0].to_string_lossy().trim_end_matches(&prepared_suffix).to_owned();
    let o = v.run(&["rmi", &own]);
    assert_code(&o, 0);
    assert!(!disk.exists(), "layer disk left: {}", text(&o.stdout));
    assert!(prepared().is_empty(), "prepared template left: {}", text(&o.stdout));
    assert!(Path::new(&base).join("vmstate.json").is_file(), "the base template went too");
}

/// The container's state file, as JSON.
fn state(v: &Vmrun, id: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(v.home.join("containers").join(id).join("state.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// Polls `f` until it returns true, up to `timeout`.
fn eventually(what: &str, timeout: Duration, f: impl FnMut() -> bool) {
    assert!(within(timeout, f), "not within {timeout:?}: {what}");
}

/// Polls `f` until it returns true, up to `timeout`: whether it did.
fn within(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while !f() {
        if start.elapsed() >= timeout {
            return false;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    true
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

#[test]
fn detached_containers_logs_exec_stop_and_volumes() {
    let v = shared();
    assert_code(&v.run(&["load", "-i", support::busybox_image().join("busybox-oci.tar").to_str().unwrap()]), 0);

    // run -d prints the id and returns while the container runs.
    let o = v.run(&["run", "-d", "--name", "det", "busybox", "sh", "-c", "echo started; echo oops >&2; while true; do sleep 1; done"]);
    assert_code(&o, 0);
    let id = text(&o.stdout).trim().to_string();
    assert!(id.len() == 12 && id.chars().all(|c| c.is_ascii_hexdigit()), "id: {id:?}");
    let ps = text(&v.run(&["ps"]).stdout);
    assert!(ps.lines().any(|l| l.starts_with(&id) && l.contains("Up") && l.ends_with("det")), "{ps}");

    // Its VMM is jailed (as root) and filtered: its own uid, no
    // capabilities, its own mount namespace whose root holds none of the
    // host's /etc, seccomp on.
    if is_root() {
        let outer = state(v, &id)["vmm"]["pid"].as_i64().unwrap();
        let children = std::fs::read_to_string(format!("/proc/{outer}/task/{outer}/children")).unwrap();
        let jailed: i64 = children.split_whitespace().next().expect("the jailed VMM").parse().unwrap();
        let status = std::fs::read_to_string(format!("/proc/{jailed}/status")).unwrap();
        let field = |name: &str| status.lines().find_map(|l| l.strip_prefix(name)).unwrap_or_default().split_whitespace().next().unwrap_or_default().to_string();
        assert!(field("Uid:").parse::<u32>().unwrap() >= 10_000_000, "{status}");
        assert_eq!(field("CapEff:"), "0000000000000000", "{status}");
        assert_eq!(field("NoNewPrivs:"), "1", "{status}");
        assert_eq!(field("Seccomp:"), "2", "{status}");
        let ns = |pid: &str| std::fs::read_link(format!("/proc/{pid}/ns/mnt")).unwrap();
        assert_ne!(ns(&jailed.to_string()), ns("self"));
        assert!(!Path::new(&format!("/proc/{jailed}/root/etc/passwd")).exists(), "the jail shows the host's /etc");
        assert!(Path::new(&format!("/proc/{jailed}/root/dev/kvm")).exists());
        no_file_of_the_caller_and_the_callers_cgroup(v);
    }

    // Its output is in its log, each stream to its own.
    eventually("the log shows the output", Duration::from_secs(120), || {
        let o = v.run(&["logs", "det"]);
        text(&o.stdout) == "started\n" && text(&o.stderr) == "oops\n"
    });

    // exec runs beside it, with its own exit code; by id prefix too.
    let o = v.run(&["exec", "det", "sh", "-c", "echo $((6*7)) $(hostname); exit 4"]);
    assert_code(&o, 4);
    assert_eq!(text(&o.stdout), "42 det\n");
    let o = v.run(&["exec", &id[..6], "cat", "/proc/1/cmdline"]);
    assert_code(&o, 0);
    assert!(text(&o.stdout).starts_with("sh\0-c\0echo started"), "{:?}", text(&o.stdout));
    assert_error(&v.run(&["exec", "no-such-container", "true"]), 125, "no such container");

    // SIGINT to `vmrun exec` or to `vmrun run` reaches the process in the
    // guest: its trap answers, and its exit code comes back.
    let trap = "trap 'echo trapped; exit 7' INT; echo ready; while true; do sleep 1; done";
    for args in [&["exec", "det", "sh", "-c", trap][..], &["run", "--rm", "busybox", "sh", "-c", trap]] {
        let o = interrupted_when_ready(v, args);
        assert_code(&o, 7);
        assert_eq!(text(&o.stdout), "ready\ntrapped\n", "{args:?}");
    }

    // A name is taken while its container exists.
    assert_error(&v.run(&["run", "-d", "--name", "det", "busybox", "true"]), 125, "in use");

    // stop: SIGTERM (which a shell as PID 1 ignores), then SIGKILL.
    let o = v.run(&["stop", "-t", "2", "det"]);
    assert_code(&o, 0);
    assert_eq!(text(&o.stdout), "det\n");
    let s = state(v, &id);
    assert_eq!((s["status"].as_str(), s["exit_code"].as_i64()), (Some("exited"), Some(137)), "{s}");
    assert!(!text(&v.run(&["ps"]).stdout).contains(&id));
    assert!(text(&v.run(&["ps", "-a"]).stdout).contains("Exited (137)"));
    assert_error(&v.run(&["exec", "det", "true"]), 125, "not running");
    // Logs outlive the process; rm removes everything.
    assert_eq!(text(&v.run(&["logs", "det"]).stdout), "started\n");
    assert_code(&v.run(&["rm", "det"]), 0);
    assert!(!v.home.join("containers").join(&id).exists());
    assert_error(&v.run(&["logs", "det"]), 1, "no such container");

    // --rm with -d: gone once it exits.
    let o = v.run(&["run", "-d", "--rm", "busybox", "sh", "-c", "exit 2"]);
    assert_code(&o, 0);
    let quick = text(&o.stdout).trim().to_string();
    eventually("an exited --rm container is removed", Duration::from_secs(120), || !v.home.join("containers").join(&quick).exists());

    // Volumes: a copy of a host directory, read-only or writable.
    let data = support::scratch("volume-data");
    std::fs::create_dir_all(data.join("sub")).unwrap();
    std::fs::write(data.join("sub/in.txt"), "from the host\n").unwrap();
    let ro = format!("{}:/data:ro", data.display());
    let o = v.run(&["run", "--rm", "-v", &ro, "busybox", "sh", "-c", "cat /data/sub/in.txt; echo x > /data/new"]);
    assert_code(&o, 1);
    assert_eq!(text(&o.stdout), "from the host\n");
    assert!(text(&o.stderr).contains("Read-only file system"), "{}", text(&o.stderr));
    let rw = format!("{}:/data", data.display());
    let o = v.run(&["run", "--rm", "-v", &rw, "busybox", "sh", "-c", "echo written > /data/new && cat /data/new /data/sub/in.txt"]);
    assert_code(&o, 0);
    assert_eq!(text(&o.stdout), "written\nfrom the host\n");
    assert!(!data.join("new").exists(), "the host directory is never written");
    assert_error(&v.run(&["run", "--rm", "-v", "relative:/data", "busybox", "true"]), 125, "absolute");
    assert_error(&v.run(&["run", "--rm", "--network", "none", "-p", "8080:80", "busybox", "true"]), 125, "--network none");
}

/// The VMM's parent in the jail (the state's `vmm`) and the jailed VMM.
fn vmm_pids(v: &Vmrun, id: &str) -> (i64, i64) {
    let outer = state(v, id)["vmm"]["pid"].as_i64().unwrap();
    let children = std::fs::read_to_string(format!("/proc/{outer}/task/{outer}/children")).unwrap();
    (outer, children.split_whitespace().next().expect("the jailed VMM").parse().unwrap())
}

/// `vmrun run -d` started with a file open on descriptor 9 and in a cgroup
/// of its own (as a CI job or a systemd unit would be): neither the
/// supervisor nor the VMM holds the file, and the VMM's cgroup lies under
/// the caller's, so the caller's limits hold it.
fn no_file_of_the_caller_and_the_callers_cgroup(v: &Vmrun) {
    use std::os::unix::process::CommandExt;
    let secret = support::scratch("secret.txt");
    std::fs::write(&secret, "not for the VMM").unwrap();
    let v1_memory = Path::new("/sys/fs/cgroup/memory");
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap();
    let own_memory = own.lines().find_map(|l| l.split_once(":memory:").map(|(_, p)| p.to_string()));
    let caller = match (&own_memory, v1_memory.is_dir()) {
        (Some(p), true) => Some(format!("{}/vmrun-test-{}", p.trim_end_matches('/'), std::process::id())),
        _ => None, // cgroup v2: a caller's cgroup that holds processes cannot delegate controllers
    };
    let procs = caller.as_ref().map(|c| {
        let dir = v1_memory.join(c.trim_start_matches('/'));
        std::fs::create_dir_all(&dir).unwrap();
        std::ffi::CString::new(dir.join("cgroup.procs").to_str().unwrap()).unwrap()
    });
    let secret_c = std::ffi::CString::new(secret.to_str().unwrap()).unwrap();
    let mut cmd = v.cmd(&["run", "-d", "busybox", "sleep", "600"]);
    // SAFETY: only system calls between fork and exec, on strings made
    // before.
    unsafe {
        cmd.pre_exec(move || {
            let fd = libc::open(secret_c.as_ptr(), libc::O_RDONLY);
            if fd < 0 || libc::dup2(fd, 9) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if let Some(p) = &procs {
                let c = libc::open(p.as_ptr(), libc::O_WRONLY);
                // "0": the writer itself.
                if c < 0 || libc::write(c, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
                libc::close(c);
            }
            Ok(())
        })
    };
    let o = cmd.output().unwrap();
    assert_code(&o, 0);
    let id = text(&o.stdout).trim().to_string();
    let (outer, jailed) = vmm_pids(v, &id);
    let supervisor = state(v, &id)["owner"]["pid"].as_i64().unwrap();
    for pid in [supervisor, outer, jailed] {
        for fd in std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().flatten() {
            let target = std::fs::read_link(fd.path()).unwrap_or_default();
            assert_ne!(target, secret, "process {pid} holds the caller's file as descriptor {:?}", fd.file_name());
        }
    }
    if let Some(c) = &caller {
        let cg = std::fs::read_to_string(format!("/proc/{jailed}/cgroup")).unwrap();
        let mem = cg.lines().find_map(|l| l.split_once(":memory:").map(|(_, p)| p.to_string())).unwrap();
        assert_eq!(mem, format!("{c}/vmrun-{outer}"), "the VMM's memory cgroup is not under the caller's");
    }
    assert_code(&v.run(&["rm", "-f", &id]), 0);
    if let Some(c) = &caller {
        let dir = v1_memory.join(c.trim_start_matches('/'));
        let emptied = within(Duration::from_secs(60), || std::fs::remove_dir(&dir).is_ok());
        assert!(emptied, "not within 60 s: the caller's cgroup empties; it holds: {}", cgroup_tree(&dir));
    }
}

/// What a cgroup directory and those under it hold: each one's processes,
/// with their state and name, for a failure's message.
fn cgroup_tree(dir: &Path) -> String {
    let mut out = String::new();
    let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
    out += &format!("{}: [", dir.display());
    for pid in procs.split_whitespace() {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let field = |name: &str| status.lines().find_map(|l| l.strip_prefix(name)).unwrap_or_default().trim().to_string();
        out += &format!("{pid} {} {}; ", field("Name:"), field("State:"));
    }
    out += "] ";
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.path().is_dir() {
            out += &cgroup_tree(&e.path());
        }
    }
    out
}

/// Runs `vmrun args`, sends it SIGINT once its process printed "ready",
/// and returns what it gave.
fn interrupted_when_ready(v: &Vmrun, args: &[&str]) -> Output {
    let mut child = v.cmd(args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut ready = [0u8; 6];
    stdout.read_exact(&mut ready).unwrap();
    assert_eq!(&ready, b"ready\n", "{args:?}");
    // SAFETY: a signal to our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let mut rest = Vec::new();
    stdout.read_to_end(&mut rest).unwrap();
    let mut o = child.wait_with_output().unwrap();
    o.stdout = [&ready[..], &rest].concat();
    o
}

/// An HTTP GET to 127.0.0.1:`port`, its response as text.
fn http_get(port: u16) -> Option<String> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
    s.write_all(b"GET /index.html HTTP/1.0\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

/// `logs -f` shows output as it is written and ends when the container
/// does: its state turning to exited, or its owner dying without a word.
/// No VM: the container's directory is made by hand.
#[test]
fn logs_follow_shows_output_as_it_comes_and_ends_with_the_container() {
    use std::io::BufRead;
    use vmrun_runtime::container::{LogWriter, ProcessRef, State, Status, Stream, LOG_FILE};

    let home = support::scratch("logs-follow-home");
    let dir = home.join("containers").join("f011011011f0");
    std::fs::create_dir_all(&dir).unwrap();
    let follow = |owner: &std::process::Child| {
        let state = State { status: Status::Running, owner: ProcessRef::of(owner.id()), ..State::new("f011011011f0", "follow", "busybox", "sh") };
        state.save(&dir).unwrap();
        let mut f = Command::new(VMRUN).args(["logs", "-f", "follow"]).env("VMRUN_HOME", &home).stdout(Stdio::piped()).spawn().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let out = f.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(out).lines() {
                let _ = tx.send(line.unwrap());
            }
        });
        (f, rx, state)
    };
    let ended = |f: &mut std::process::Child| {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(10) {
            if let Some(s) = f.try_wait().unwrap() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    };
    let line = |rx: &std::sync::mpsc::Receiver<String>| rx.recv_timeout(Duration::from_secs(10)).unwrap();

    let mut log = LogWriter::open(&dir.join(LOG_FILE), 1 << 20).unwrap();
    log.write(Stream::Stdout, b"one\n").unwrap();
    let mut owner = Command::new("sleep").arg("600").spawn().unwrap();
    let (mut f, rx, mut state) = follow(&owner);
    assert_eq!(line(&rx), "one");
    log.write(Stream::Stdout, b"two\n").unwrap();
    assert_eq!(line(&rx), "two");
    assert!(f.try_wait().unwrap().is_none(), "still following");
    // The state says it exited: what is left is shown, and it ends.
    log.write(Stream::Stdout, b"three\n").unwrap();
    state.status = Status::Exited;
    state.save(&dir).unwrap();
    assert_eq!(line(&rx), "three");
    assert!(ended(&mut f).is_some_and(|s| s.success()), "logs -f ended with the container");

    // Its owner dies without writing its end.
    let (mut f, rx, _) = follow(&owner);
    for want in ["one", "two", "three"] {
        assert_eq!(line(&rx), want);
    }
    std::thread::sleep(Duration::from_millis(200));
    assert!(f.try_wait().unwrap().is_none(), "still following");
    owner.kill().unwrap();
    owner.wait().unwrap();
    assert!(ended(&mut f).is_some_and(|s| s.success()), "logs -f ended with the owner");
    std::fs::remove_dir_all(&home).unwrap();
}

#[test]
fn network_tap_publishes_ports_and_a_killed_vmm_is_cleaned_up() {
    if !is_root() {
        eprintln!("skipped: --network tap needs root");
        return;
    }
    let v = shared();
    assert_code(&v.run(&["load", "-i", support::busybox_image().join("busybox-oci.tar").to_str().unwrap()]), 0);
    let port = closed_port();
    let publish = format!("{port}:8080");
    let script = "mkdir -p /www && echo served-from-the-guest > /www/index.html && exec httpd -f -p 8080 -h /www";
    let o = v.run(&["run", "-d", "--network", "tap", "-p", &publish, "busybox", "sh", "-c", script]);
    assert_code(&o, 0);
    let id = text(&o.stdout).trim().to_string();
    let s = state(v, &id);
    let tap = s["tap"].as_str().unwrap().to_string();
    assert!(Path::new("/sys/class/net").join(&tap).exists(), "TAP device {tap}");

    eventually("the published port answers", Duration::from_secs(180), || {
        http_get(port).is_some_and(|r| r.contains("served-from-the-guest"))
    });
    let o = v.run(&["exec", &id, "ip", "-4", "addr", "show", "eth0"]);
    assert!(text(&o.stdout).contains(s["ip"].as_str().unwrap()), "{}", text(&o.stdout));

    // Another tenant's data directory on the same host (sharing the
    // templates, so nothing boots): its container gets another subnet, and
    // its published port reaches its own container, not the first one.
    let other = Vmrun { home: support::scratch("run-home-other-tenant"), kernel: v.kernel.clone(), initrd: v.initrd.clone() };
    std::fs::create_dir_all(&other.home).unwrap();
    let _ = std::os::unix::fs::symlink(v.home.join("templates"), other.home.join("templates"));
    assert_code(&other.run(&["load", "-i", support::busybox_image().join("busybox-oci.tar").to_str().unwrap()]), 0);
    let port2 = closed_port();
    let script2 = "mkdir -p /www && echo served-to-the-other-tenant > /www/index.html && exec httpd -f -p 8080 -h /www";
    let o = other.run(&["run", "-d", "--network", "tap", "-p", &format!("{port2}:8080"), "busybox", "sh", "-c", script2]);
    assert_code(&o, 0);
    let id2 = text(&o.stdout).trim().to_string();
    let ip2 = state(&other, &id2)["ip"].as_str().unwrap().to_string();
    assert_ne!(ip2, s["ip"].as_str().unwrap(), "two data directories were given one subnet");
    eventually("the other tenant's port answers", Duration::from_secs(180), || {
        http_get(port2).is_some_and(|r| r.contains("served-to-the-other-tenant"))
    });
    assert!(http_get(port).is_some_and(|r| r.contains("served-from-the-guest")), "the first tenant's port changed hands");
    assert_code(&other.run(&["rm", "-f", &id2]), 0);

    // kill -9 of the VMM: the container shows as exited, rm cleans up.
    let vmm = s["vmm"]["pid"].as_i64().unwrap() as i32;
    // SAFETY: kill of the VMM the state names.
    unsafe { libc::kill(vmm, libc::SIGKILL) };
    eventually("the container shows as exited", Duration::from_secs(60), || {
        let ps = text(&v.run(&["ps", "-a"]).stdout);
        ps.lines().any(|l| l.starts_with(&id) && l.contains("Exited"))
    });
    assert_code(&v.run(&["rm", &id]), 0);
    assert!(!Path::new("/sys/class/net").join(&tap).exists(), "TAP device {tap} left behind");
    assert!(!v.home.join("containers").join(&id).exists());
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err(), "port {port} still published");
    let cmdline = std::fs::read_to_string(format!("/proc/{vmm}/cmdline")).unwrap_or_default();
    assert!(!cmdline.contains(&id), "the VMM still runs: {cmdline}");
}

/// A TCP port in LISTEN state on the host (`/proc/net/tcp`).
fn host_listens_on(port: u16) -> bool {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    table.lines().skip(1).any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() > 3 && f[3] == "0A" && f[1].rsplit(':').next().and_then(|p| u16::from_str_radix(p, 16).ok()) == Some(port)
    })
}

/// A network namespace with an HTTP server on `10.250.N.2:8000`, joined to
/// the host by a veth pair (`10.250.N.1` on the host's side) and with no
/// route beyond it: it can answer the host's address only.
struct OtherNetwork {
    ns: String,
    server: std::net::Ipv4Addr,
}

impl OtherNetwork {
    fn new(body: &'static str) -> Self {
        let n = std::process::id() % 250 + 1;
        let ns = format!("vmrunt-srv{n}");
        let (host_if, ns_if) = (format!("vrt{n}h"), format!("vrt{n}s"));
        let ip = |args: &[&str]| {
            let o = Command::new("ip").args(args).output().unwrap();
            assert!(o.status.success(), "ip {args:?}: {}", text(&o.stderr));
        };
        let _ = Command::new("ip").args(["netns", "del", &ns]).output();
        ip(&["netns", "add", &ns]);
        ip(&["link", "add", &host_if, "type", "veth", "peer", "name", &ns_if, "netns", &ns]);
        ip(&["addr", "add", &format!("10.250.{n}.1/30"), "dev", &host_if]);
        ip(&["link", "set", &host_if, "up"]);
        ip(&["-n", &ns, "addr", "add", &format!("10.250.{n}.2/30"), "dev", &ns_if]);
        ip(&["-n", &ns, "link", "set", &ns_if, "up"]);
        let routes = Command::new("ip").args(["-n", &ns, "route"]).output().unwrap();
        assert!(!text(&routes.stdout).contains("10.213.") && !text(&routes.stdout).contains("default"), "{}", text(&routes.stdout));
        let server = std::net::Ipv4Addr::new(10, 250, n as u8, 2);
        let path = format!("/run/netns/{ns}");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            // This thread alone moves into the namespace.
            let f = std::fs::File::open(&path).unwrap();
            // SAFETY: setns on a namespace file we hold open.
            assert_eq!(unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) }, 0);
            let l = std::net::TcpListener::bind((server, 8000)).unwrap();
            tx.send(()).unwrap();
            for mut c in l.incoming().flatten() {
                let mut req = [0u8; 1024];
                let _ = c.read(&mut req);
                let _ = c.write_all(format!("HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{body}", body.len()).as_bytes());
            }
        });
        rx.recv_timeout(Duration::from_secs(10)).unwrap();
        Self { ns, server }
    }
}

impl Drop for OtherNetwork {
    fn drop(&mut self) {
        // The veth pair goes with the namespace.
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).output();
    }
}

/// The default network as root: the container reaches a server in a
/// network that has no route back to the containers' subnet (so only the
/// host's NAT makes it work), gets the host's name servers, and publishes
/// a port through the kernel (no vmrun process listens on it); after `rm`
/// its TAP device, its rules, and with the last container the `vmrun`
/// table are gone. `--network none` has no interface but loopback.
#[test]
fn the_default_network_reaches_out_through_nat_and_publishes_ports_in_the_kernel() {
    if !is_root() {
        eprintln!("skipped: the NAT network needs root");
        return;
    }
    let v = shared();
    assert_code(&v.run(&["load", "-i", support::busybox_image().join("busybox-oci.tar").to_str().unwrap()]), 0);
    let other = OtherNetwork::new("from-the-other-network\n");

    let port = closed_port();
    let script = "mkdir -p /www && echo served-through-nat > /www/index.html && exec httpd -f -p 8080 -h /www";
    let o = v.run(&["run", "-d", "-p", &format!("{port}:8080"), "busybox", "sh", "-c", script]);
    assert_code(&o, 0);
    let id = text(&o.stdout).trim().to_string();
    let tap = state(v, &id)["tap"].as_str().unwrap().to_string();
    assert!(Path::new("/sys/class/net").join(&tap).exists(), "TAP device {tap}");
    let table = || Command::new("nft").args(["list", "table", "ip", "vmrun"]).output().unwrap();
    let rules = text(&table().stdout);
    assert!(rules.contains(&format!("dport {port} dnat to")) && rules.contains(&format!("iifname \"{tap}\"")), "{rules}");

    eventually("the published port answers", Duration::from_secs(180), || {
        http_get(port).is_some_and(|r| r.contains("served-through-nat"))
    });
    assert!(!host_listens_on(port), "a process on the host listens on port {port}: the kernel should carry it");

    let url = format!("http://{}:8000/", other.server);
    let o = v.run(&["exec", &id, "sh", "-c", &format!("cat /etc/resolv.conf; wget -qO- {url}")]);
    assert_code(&o, 0);
    let out = text(&o.stdout);
    assert!(out.contains("from-the-other-network"), "{out}\n{}", text(&o.stderr));
    for ns in vmrun_runtime::net::nat::host_nameservers() {
        assert!(out.contains(&format!("nameserver {ns}\n")), "{out}");
    }

    assert_code(&v.run(&["rm", "-f", &id]), 0);
    assert!(!Path::new("/sys/class/net").join(&tap).exists(), "TAP device {tap} left behind");
    assert!(!text(&table().stdout).contains(&tap), "rules for {tap} left behind");
    assert!(http_get(port).is_none(), "port {port} still published");
    let others_left = std::fs::read_dir(vmrun_runtime::net::nat::RECORDS).map(|d| d.count()).unwrap_or(0);
    if others_left == 0 {
        assert!(!table().status.success(), "the vmrun table outlived the last container: {}", text(&table().stdout));
    }

    let o = v.run(&["run", "--rm", "--network", "none", "busybox", "ls", "/sys/class/net"]);
    assert_code(&o, 0);
    assert_eq!(text(&o.stdout).split_whitespace().collect::<Vec<_>>(), ["lo"]);
}

/// Sizes no VM can have fail before anything starts, with docker's 125 and
/// the reason; a kernel or agent that cannot boot says why, although the
/// template VM's files are gone by then.
#[test]
fn a_vm_that_cannot_be_made_says_why() {
    let v = shared();
    assert_code(&v.run(&["load", "-i", support::busybox_image().join("busybox-oci.tar").to_str().unwrap()]), 0);
    for (args, why) in [
        (&["--cpus", "0"][..], "0 vCPUs requested; 1 to 32 are supported"),
        (&["--cpus", "33"], "33 vCPUs requested; 1 to 32 are supported"),
        (&["--cpus", "500"], "500 vCPUs requested; 1 to 32 are supported"),
        (&["-m", "999999999999g"], "too large"),
        (&["-m", "200g"], "MiB of memory requested; this host has"),
        (&["-m", "12m"], "at least 64m"),
    ] {
        let o = v.run(&[&["run", "--rm"][..], args, &["busybox", "true"]].concat());
        assert_error(&o, 125, why);
    }
    assert_code(&v.run(&["run", "--rm", "--no-such-flag", "busybox", "true"]), 125);

    // A truncated kernel: the VMM refuses it, and the run says so.
    let kernel = std::fs::read(&v.kernel).unwrap();
    let truncated = support::scratch("truncated-vmlinux");
    std::fs::write(&truncated, &kernel[..kernel.len() / 3]).unwrap();
    let o = v.run(&["run", "--rm", "--kernel", truncated.to_str().unwrap(), "busybox", "true"]);
    assert_code(&o, 125);
    let err = text(&o.stderr);
    assert!(err.contains("before its agent answered") && err.contains("kernel"), "{err}");
    assert!(!err.contains("its console is in"), "points at a file that is gone: {err}");
    // A truncated agent initramfs: the guest boots and cannot start it;
    // what its console said is in the error.
    let agent = std::fs::read(&v.initrd).unwrap();
    let truncated = support::scratch("truncated-agent.cpio");
    std::fs::write(&truncated, &agent[..agent.len() / 2]).unwrap();
    let o = v.run(&["run", "--rm", "--initrd", truncated.to_str().unwrap(), "busybox", "true"]);
    assert_code(&o, 125);
    let err = text(&o.stderr);
    assert!(err.contains("before its agent answered") && err.contains("the guest console ends with"), "{err}");
    assert!(err.contains("panic") || err.contains("init"), "{err}");
}

#[test]
fn two_images_restored_at_once_from_one_template() {
    if !is_root() {
        eprintln!("skipped: the Debian image needs root (debootstrap)");
        return;
    }
    let v = shared();
    let debian = support::debian_image();
    assert_code(&v.run(&["load", "-i", debian.join("debian-oci.tar").to_str().unwrap()]), 0);
    assert_code(&v.run(&["load", "-i", support::busybox_image().join("busybox-oci.tar").to_str().unwrap()]), 0);
    // The template first (a boot), so that both runs below restore it.
    assert_code(&v.run(&["run", "--rm", "busybox", "true"]), 0);

    // A real distribution's userland and busybox, side by side.
    let deb = v
        .cmd(&["run", "--rm", "debian:bookworm", "bash", "-c", "echo bash ${BASH_VERSINFO[0]}; perl -e 'print 6*7, qq(\\n)'; cat /etc/debian_version; exit 6"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let bb = v.cmd(&["run", "--rm", "busybox", "sh", "-c", "busybox | head -1; exit 9"]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let (deb, bb) = (deb.wait_with_output().unwrap(), bb.wait_with_output().unwrap());
    assert_code(&deb, 6);
    let out = text(&deb.stdout);
    assert!(out.starts_with("bash 5\n42\n12."), "{out}");
    assert_code(&bb, 9);
    assert!(text(&bb.stdout).starts_with("BusyBox v1."), "{}", text(&bb.stdout));
}

#[test]
fn a_guest_initialises_its_memory_as_it_needs_it() {
    // The guest kernel builds the `struct page`s of its memory beyond the
    // first 128 MiB section only as allocations need them
    // (kernel-config/patches/0005): a 512 MiB VM's zone starts with less
    // memory handed to the allocator ("managed" pages), and a container
    // that needs more gets it, without running out. (`MemTotal` counts all
    // of the VM's memory from the start.)
    let v = shared();
    assert_code(&v.run(&["load", "-i", support::busybox_image().join("busybox-oci.tar").to_str().unwrap()]), 0);
    let managed = "awk '/zone +DMA32/ { z = 1 } z && $1 == \"managed\" { print $2; exit }' /proc/zoneinfo";
    let script = format!("{managed}; dd if=/dev/zero of=/big bs=1M count=200 2>/dev/null; echo $(wc -c < /big); {managed}; grep MemTotal /proc/meminfo");
    let o = v.run(&["run", "--rm", "--network", "none", "-m", "512m", "busybox", "sh", "-c", &script]);
    assert_code(&o, 0);
    let out = text(&o.stdout);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 4, "{out}");
    let pages = |l: &str| l.trim().parse::<u64>().unwrap_or_else(|_| panic!("not a page count: {l:?} in {out}"));
    let (before, after) = (pages(lines[0]), pages(lines[2]));
    assert!(before < (256 << 20) / 4096, "a 512 MiB guest starts with less than two sections handed to the allocator: {out}");
    assert_eq!(lines[1], (200u64 << 20).to_string(), "{out}");
    assert!(after >= before + (128 << 20) / 4096, "200 MiB written into memory made the kernel initialise more: {out}");
    assert!(after <= (512 << 20) / 4096, "{out}");
    assert!(lines[3].starts_with("MemTotal:"), "{out}");
}

/// The busybox test image with one more layer (device nodes an image
/// should not be able to use), as a `docker save` archive
/// (`docker.io/library/devnodes:latest`). `disk` is the guest's layer disk
/// device number (major, minor).
fn devnodes_image(dir: &Path, disk: (u32, u32)) -> PathBuf {
    // The extra layer: block and char nodes outside /dev, and an image
    // /dev that tries to bring its own null and disk.
    let mut layer = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Directory);
    h.set_mode(0o755);
    h.set_size(0);
    h.set_cksum();
    layer.append_data(&mut h, "nodes", &[][..]).unwrap();
    let mut node = |path: &str, kind: tar::EntryType, (major, minor): (u32, u32)| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(0o666);
        h.set_size(0);
        h.set_device_major(major).unwrap();
        h.set_device_minor(minor).unwrap();
        h.set_cksum();
        layer.append_data(&mut h, path, &[][..]).unwrap();
    };
    node("nodes/disk", tar::EntryType::Block, disk);
    node("nodes/zero", tar::EntryType::Char, (1, 5));
    node("nodes/mem", tar::EntryType::Char, (1, 1));
    node("dev/null", tar::EntryType::Block, disk);
    node("dev/vda", tar::EntryType::Block, disk);
    busybox_plus(dir, "devnodes", &layer.into_inner().unwrap())
}

/// The busybox test image with the layer `layer` (a tar) on top, as a
/// `docker save` archive in `dir` (`docker.io/library/NAME:latest`).
fn busybox_plus(dir: &Path, name: &str, layer: &[u8]) -> PathBuf {
    // The busybox archive's config and layer.
    let mut base = tar::Archive::new(std::fs::File::open(support::busybox_image().join("busybox-docker.tar")).unwrap());
    let mut files = std::collections::BTreeMap::new();
    for e in base.entries().unwrap() {
        let mut e = e.unwrap();
        let path = e.path().unwrap().to_string_lossy().into_owned();
        let mut data = Vec::new();
        e.read_to_end(&mut data).unwrap();
        files.insert(path, data);
    }
    let manifest: serde_json::Value = serde_json::from_slice(&files["manifest.json"]).unwrap();
    let config_name = manifest[0]["Config"].as_str().unwrap();
    let layer_name = manifest[0]["Layers"][0].as_str().unwrap();
    let mut config: serde_json::Value = serde_json::from_slice(&files[config_name]).unwrap();
    let diff_id = vmrun_layerdisk::Digest::of(layer).to_string();
    config["rootfs"]["diff_ids"].as_array_mut().unwrap().push(serde_json::Value::String(diff_id));
    let config = serde_json::to_vec(&config).unwrap();
    let config_file = format!("{}.json", &vmrun_layerdisk::Digest::of(&config).to_string()["sha256:".len()..]);
    let top = format!("{name}/layer.tar");
    let manifest = serde_json::json!([{ "Config": config_file, "RepoTags": [format!("{name}:latest")], "Layers": [layer_name, top] }]);

    let path = dir.join(format!("{name}-docker.tar"));
    let mut out = tar::Builder::new(std::fs::File::create(&path).unwrap());
    let mut add = |name: &str, data: &[u8]| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        h.set_cksum();
        out.append_data(&mut h, name, data).unwrap();
    };
    add("manifest.json", &serde_json::to_vec(&manifest).unwrap());
    add(&config_file, &config);
    add(layer_name, &files[layer_name]);
    add(&top, layer);
    out.into_inner().unwrap();
    path
}

/// What a process in a container must not reach, whatever it runs as: the
/// guest agent's vsock port (any CID from inside the guest), the devices
/// of nodes its image brings, and the random state of the template it was
/// restored from; above its root (a `chroot` escape) it finds nothing.
#[test]
fn a_container_reaches_neither_the_agent_nor_image_devices_nor_template_randomness() {
    let v = shared();
    assert_code(&v.run(&["load", "-i", support::busybox_image().join("busybox-oci.tar").to_str().unwrap()]), 0);

    // Randomness: every run restored from the image's prepared template
    // (the first run makes it) reads other bytes from /dev/urandom.
    let urandom = "head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'";
    let mut seen = Vec::new();
    for _ in 0..3 {
        let o = v.run(&["run", "--rm", "busybox", "sh", "-c", urandom]);
        assert_code(&o, 0);
        let bytes = text(&o.stdout);
        assert_eq!(bytes.len(), 64, "{bytes:?}");
        seen.push(bytes);
    }
    assert!(seen[1] != seen[2] && seen[0] != seen[1] && seen[0] != seen[2], "restored VMs share their random state: {seen:?}");

    // The agent: a static probe, given to the container on a volume, tries
    // the agent's port on every CID a guest process could name (local,
    // the guest's own, any, the hypervisor's); none may answer. Exit 3 or
    // 4 says the probe ran and was refused.
    let probe_dir = support::scratch("probe-volume");
    std::fs::create_dir_all(&probe_dir).unwrap();
    support::run_ok(Command::new("cc").args(["-static", "-O2", "-o"]).arg(probe_dir.join("probe")).arg(support::repo_root().join("tests/guest/probe.c")));
    let volume = format!("{}:/probe:ro", probe_dir.display());
    let tries = "for cid in 1 3 -1 0; do /probe/probe agent $cid 1024; echo \"exit=$?\"; done";
    for user in ["65534", "0"] {
        let o = v.run(&["run", "--rm", "-u", user, "-v", &volume, "busybox", "sh", "-c", tries]);
        assert_code(&o, 0);
        let out = text(&o.stdout);
        let exits: Vec<&str> = out.lines().filter_map(|l| l.strip_prefix("exit=")).collect();
        assert_eq!(exits.len(), 4, "user {user}: {out}");
        assert!(exits.iter().all(|e| *e == "3" || *e == "4"), "user {user}: the agent was reached from a container:\n{out}");
    }
    // Above the container's root (root may chroot: docker's default
    // capabilities): the classic escape climbs no higher than the
    // container's own root (the directory it made there, its volume),
    // nothing of the agent's (whose initramfs, the mount namespace's
    // bottom, was emptied at boot anyway).
    let o = v.run(&["run", "--rm", "-v", &volume, "busybox", "/probe/probe", "escape", "/x"]);
    assert_code(&o, 0);
    let out = text(&o.stdout);
    let names: Vec<&str> = out.lines().find_map(|l| l.strip_prefix("escaped:")).expect(&out).split_whitespace().collect();
    assert!(names.contains(&"x") && names.contains(&"probe") && !names.contains(&"init"), "a container's escape from its root found {names:?}");

    // Device nodes: an image with world-readable nodes of the layer disk,
    // /dev/zero and /dev/mem outside /dev, and its own /dev/null and
    // /dev/vda, and a node of the layer disk the container makes in its
    // /dev. None opens, for root or another user; the container's /dev is
    // the agent's, and its standard nodes work.
    let o = v.run(&["run", "--rm", "busybox", "cat", "/sys/block/vda/dev"]);
    assert_code(&o, 0);
    let (major, minor) = text(&o.stdout).trim().split_once(':').map(|(a, b)| (a.parse().unwrap(), b.parse().unwrap())).unwrap();
    let image_dir = support::scratch("devnodes-image");
    std::fs::create_dir_all(&image_dir).unwrap();
    assert_code(&v.run(&["load", "-i", devnodes_image(&image_dir, (major, minor)).to_str().unwrap()]), 0);
    let script = format!(
        "mknod /dev/own b {major} {minor} 2>/dev/null; \
                  for n in /nodes/disk /nodes/zero /nodes/mem /dev/vda /dev/own; do \
                    if head -c 1 $n >/dev/null 2>&1; then echo \"$n opened\"; else echo \"$n refused\"; fi; done; \
                  stat -c 'null %F %t:%T' /dev/null; \
                  echo discarded >/dev/null && echo null ok; \
                  echo zero $(head -c 4 /dev/zero | od -An -tx1); \
                  echo urandom $(head -c 16 /dev/urandom | wc -c); \
                  echo dev $(ls /dev | grep -vx own)"
    );
    for user in ["1000", "0"] {
        let o = v.run(&["run", "--rm", "-u", user, "devnodes", "sh", "-c", &script]);
        assert_code(&o, 0);
        let out = text(&o.stdout);
        for n in ["/nodes/disk", "/nodes/zero", "/nodes/mem"] {
            assert!(out.contains(&format!("{n} refused")), "user {user}: {n} from the image can be opened:\n{out}");
        }
        assert!(out.contains("/dev/vda refused"), "user {user}: {out}");
        // Root may make a node (CAP_MKNOD, as under docker), but /dev is
        // nodev: only the nodes the agent bound there open.
        assert!(out.contains("/dev/own refused"), "user {user}: a node the container made opens:\n{out}");
        assert!(out.contains("null character special file 1:3\n"), "user {user}: {out}");
        assert!(out.contains("null ok\n") && out.contains("zero 00 00 00 00\n") && out.contains("urandom 16\n"), "user {user}: {out}");
        let dev: Vec<&str> = out.lines().find_map(|l| l.strip_prefix("dev ")).unwrap().split(' ').collect();
        for name in &dev {
            let standard = ["console", "fd", "full", "mqueue", "null", "ptmx", "pts", "random", "shm", "stderr", "stdin", "stdout", "tty", "urandom", "zero"];
            assert!(standard.contains(name), "user {user}: /dev/{name} in the container: {dev:?}");
        }
    }

    // The clock: restored from the busybox template made at the start of
    // this test (tens of seconds ago, all of which the guest's kernel
    // catches up with at its first tick), the guest tells the host's time:
    // its boot read the emulated CMOS clock in whole seconds (guests
    // lagged by about 1.5 s), and the agent set it to the host's from the
    // template's first connection. `adjtimex` prints microseconds.
    let unix_now = || std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    let before = unix_now();
    let o = v.run(&["run", "--rm", "busybox", "adjtimex"]);
    let after = unix_now();
    assert_code(&o, 0);
    let out = text(&o.stdout);
    let field = |name: &str| -> f64 { out.lines().find_map(|l| l.trim().strip_prefix(name)).unwrap_or_else(|| panic!("no {name} in {out}")).trim().parse().unwrap() };
    let guest = field("time.tv_sec:") + field("time.tv_usec:") / 1e6;
    assert!(guest >= before - 0.25 && guest <= after + 0.25, "the guest's clock says {guest:.3}, the host's was {before:.3} to {after:.3}");
}

/// A restored VM answers the host's very first connection to its agent:
/// the VMM holds it until the guest has taken the vsock transport reset
/// (a connection forwarded before that was dropped with the guest's old
/// sockets, and only a retry got through). Restored and connected at once
/// (the VMM says when its sockets listen), many times in a row; each VM
/// only says hello and shuts down; from the base template, then from a
/// snapshot taken while a connection to the agent was open.
#[test]
fn each_restore_answers_the_first_agent_connection() {
    use vmrun_agent_client::Options;
    use vmrun_runtime::artifacts::Artifacts;
    use vmrun_runtime::vm::{VmProcess, VmSpec};

    const RESTORES: usize = 20;
    let v = shared();
    let dir = support::scratch("first-connection");
    std::fs::create_dir_all(&dir).unwrap();
    let layer_disk = dir.join("empty.disk");
    std::fs::write(&layer_disk, vec![0u8; 4096]).unwrap();
    let spec = |i: usize| VmSpec {
        artifacts: Artifacts::new(v.kernel.clone(), v.initrd.clone()),
        // What `vmrun run` uses by default: its template is the one the
        // other tests share.
        mem_mib: 512,
        cpus: 1,
        layer_disk: layer_disk.clone(),
        volumes: Vec::new(),
        volume_slots: vmrun_runtime::volume::SLOTS,
        read_only_volumes: Vec::new(),
        tap: None,
        netns: None,
        dir: dir.join(format!("vm-{i}")),
        vmm_exe: support::build_vmm(VMRUN),
        boot_memory_mib: None,
    };
    let templates = vmrun_runtime::home::Home::at(&v.home).templates();
    let template = vmrun_runtime::template::ensure(&templates, &spec(0), &|m| eprintln!("{m}"), &|_| {}).unwrap();

    // A snapshot like an image's prepared template: taken while the guest
    // runs on with a connection to its agent open. Its restores must
    // answer at once too (the transport reset's interrupt is raised only
    // once the restored interrupt controllers and vCPUs are in place; when
    // it was raised before, their snapshot state overwrote it, and the
    // guest took the reset late, with the next connection).
    let busy = dir.join("busy-template");
    {
        let s = spec(RESTORES);
        let mut vm = VmProcess::restore(&template, &s).unwrap();
        let client = vm.connect_agent(Duration::from_secs(60), Options::default()).unwrap();
        vmrun_runtime::template::save_prepared(&vm, &busy);
        assert!(vmrun_runtime::template::is_ready(&busy), "no snapshot; VMM log: {}", std::fs::read_to_string(s.dir.join("vmm.log")).unwrap_or_default());
        // Taking the snapshot read only the guest pages in use: the rest
        // of guest memory stays out of the VMM's resident memory (a jailed
        // VMM reads /proc/self/pagemap through the descriptor its jail
        // opened; it read every page, and all 512 MiB became resident).
        let stats = vmrun_vmm_api::request(&vm.layout().control(), &vmrun_vmm_api::Request::Stats, Duration::from_secs(10)).unwrap().stats.unwrap();
        let guest = stats.guest_rss_kib.unwrap();
        assert!(guest < 128 * 1024, "{guest} KiB of guest memory resident after the snapshot");
        client.shutdown().unwrap();
        vm.wait(Duration::from_secs(30)).unwrap();
    }

    let start = Instant::now();
    let restores = (0..RESTORES).map(|i| (i, &template)).chain((0..RESTORES / 2).map(|i| (RESTORES + 1 + i, &busy)));
    for (i, template) in restores {
        let s = spec(i);
        let mut vm = VmProcess::restore(template, &s).unwrap();
        let client = vm.connect_agent(Duration::from_secs(60), Options::default()).unwrap_or_else(|e| {
            panic!("restore {i}: {e}; VMM log: {}", std::fs::read_to_string(s.dir.join("vmm.log")).unwrap_or_default())
        });
        assert_eq!(
            vm.connect_attempts(),
            1,
            "restore {i}: the first connection to the agent was lost; VMM log: {}",
            std::fs::read_to_string(s.dir.join("vmm.log")).unwrap_or_default()
        );
        client.shutdown().unwrap();
        let status = vm.wait(Duration::from_secs(30)).unwrap();
        assert!(status.success(), "restore {i}: the VMM ended with {status}");
        drop(vm);
        let _ = std::fs::remove_dir_all(&s.dir);
    }
    let _ = std::fs::remove_dir_all(&busy);
    eprintln!("{} restores, each answered at the first connection, in {:?}", RESTORES + RESTORES / 2, start.elapsed());
}

/// The lines a child writes to standard error, as they come.
fn stderr_lines(child: &mut std::process::Child) -> std::sync::mpsc::Receiver<String> {
    use std::io::BufRead;
    let err = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(err).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// Waits for a line containing `needle`, up to `timeout`: the line.
fn line_with(lines: &std::sync::mpsc::Receiver<String>, needle: &str, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(l) if l.contains(needle) => return l,
            Ok(l) => eprintln!("pool: {l}"),
            Err(e) => panic!("no line with {needle:?} within {timeout:?}: {e}"),
        }
    }
}

/// The pooled VMs' directories.
fn pooled_vms(pool: &Path) -> std::collections::BTreeSet<String> {
    std::fs::read_dir(pool).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).filter(|n| n.starts_with("vm-")).collect()
}

/// Host interfaces of pooled VMs (`vmrun-p...`: container links are
/// named after hex ids).
fn pool_links() -> std::collections::BTreeSet<String> {
    std::fs::read_dir("/sys/class/net").unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).filter(|n| n.starts_with("vmrun-p")).collect()
}

/// `vmrun pool`: runs take its VMs (already restored, on the default
/// network: NAT as root, with a link of their own) when their process can
/// be the held one, and each VM ends with its run, whether the run ends
/// or is killed (`kill -9`), and is replaced; runs that need input, or on
/// another network, restore their own; once the pool ends, its VMs and
/// links are gone and runs restore again.
#[test]
fn a_pool_hands_its_vms_to_runs_and_replaces_each_after_its_run() {
    let v = shared();
    // An image of its own, so that no other test's run takes a pooled VM.
    let image_dir = support::scratch("pooled-image");
    std::fs::create_dir_all(&image_dir).unwrap();
    let mut layer = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_mode(0o644);
    h.set_size(7);
    h.set_cksum();
    layer.append_data(&mut h, "pooled", &b"pooled\n"[..]).unwrap();
    assert_code(&v.run(&["load", "-i", busybox_plus(&image_dir, "pooled", &layer.into_inner().unwrap()).to_str().unwrap()]), 0);

    let mut keeper = support::Reaped(v.cmd(&["pool", "--size", "2", "pooled"]).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap());
    let lines = stderr_lines(&mut keeper.0);
    let at = line_with(&lines, "vmrun: pool of 2 VMs of pooled at ", Duration::from_secs(900));
    let pool = PathBuf::from(at.rsplit_once(" at ").unwrap().1);
    line_with(&lines, "2 of 2 VMs ready", Duration::from_secs(300));
    let first = pooled_vms(&pool);
    assert_eq!(first.len(), 2, "{first:?}");
    let o = v.run(&["pool", "--status", "pooled"]);
    assert_code(&o, 0);
    assert_eq!(text(&o.stdout), "2 of 2 VMs ready\n");

    let links = pool_links();
    assert_eq!(links.len(), if is_root() { 2 } else { 0 }, "{links:?}");

    // A run takes a pooled VM: its output and exit code as from any VM,
    // and as root its address on the NAT network, given at the claim.
    let script = "cat /pooled; ip -4 -o addr show dev eth0 2>/dev/null | grep -c ' 10[.]213[.]'; exit 7";
    let o = v.cmd(&["run", "--rm", "pooled", "sh", "-c", script]).env("VMRUN_LOG", "debug").output().unwrap();
    assert_code(&o, 7);
    assert_eq!(text(&o.stdout), if is_root() { "pooled\n1\n" } else { "pooled\n0\n" });
    assert!(text(&o.stderr).contains("VM claimed from the pool"), "{}", text(&o.stderr));
    // Its VM ended with it (the keeper removes it once the run's lease
    // ends), and another took its place.
    line_with(&lines, "2 of 2 VMs ready", Duration::from_secs(300));
    eventually("the run's VM removed", Duration::from_secs(60), || pooled_vms(&pool).len() == 2 && pool_links().len() == links.len());
    let second = pooled_vms(&pool);
    assert_eq!(second.len(), 2, "{second:?}");
    assert_eq!(first.intersection(&second).count(), 1, "the run's VM was not replaced: {first:?}, then {second:?}");
    if is_root() {
        let now = pool_links();
        assert_eq!((now.len(), links.intersection(&now).count()), (2, 1), "the run's link was not replaced: {links:?}, then {now:?}");
    }
    // A run on another network restores its own.
    let o = v.cmd(&["run", "--rm", "--network", "tap", "pooled", "true"]).env("VMRUN_LOG", "debug").output().unwrap();
    if is_root() {
        assert_code(&o, 0);
        assert!(!text(&o.stderr).contains("claimed from the pool"), "{}", text(&o.stderr));
    }

    // A run that needs input is not given one: it restores its own.
    let o = v.cmd(&["run", "--rm", "-i", "pooled", "cat"]).env("VMRUN_LOG", "debug").stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let mut o = o;
    o.stdin.take().unwrap().write_all(b"typed\n").unwrap();
    let o = o.wait_with_output().unwrap();
    assert_code(&o, 0);
    assert_eq!(text(&o.stdout), "typed\n");
    assert!(!text(&o.stderr).contains("claimed from the pool"), "{}", text(&o.stderr));
    assert_eq!(pooled_vms(&pool), second);

    // A run killed with SIGKILL: the keeper ends its VM and replaces it.
    let mut run = support::Reaped(v.cmd(&["run", "--rm", "pooled", "sleep", "600"]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap());
    line_with(&lines, "2 of 2 VMs ready", Duration::from_secs(300));
    let third = pooled_vms(&pool);
    assert_eq!(third.len(), 3, "the claimed VM and two ready ones: {third:?}");
    let pooled_run = || {
        std::fs::read_dir(v.home.join("containers"))
            .unwrap()
            .flatten()
            .filter(|e| e.path().join("state.json").is_file())
            .map(|e| state(v, &e.file_name().to_string_lossy()))
            .find(|s| s["status"] == "running" && s["vm_dir"].as_str().is_some_and(|d| d.starts_with(pool.to_str().unwrap())))
    };
    eventually("the run's state names a pooled VM", Duration::from_secs(60), || pooled_run().is_some());
    let vmm = pooled_run().unwrap();
    let claimed = Path::new(vmm["vm_dir"].as_str().unwrap()).file_name().unwrap().to_string_lossy().into_owned();
    assert!(second.contains(&claimed), "{claimed} was not a ready VM: {second:?}");
    let pid = vmm["vmm"]["pid"].as_i64().unwrap();
    assert!(Path::new(&format!("/proc/{pid}")).exists());
    run.0.kill().unwrap();
    run.0.wait().unwrap();
    eventually("the killed run's VM ended", Duration::from_secs(60), || !Path::new(&format!("/proc/{pid}")).exists());
    eventually("the killed run's VM directory removed", Duration::from_secs(60), || pooled_vms(&pool).len() == 2);
    assert!(!pooled_vms(&pool).contains(&claimed), "{claimed} is still there");
    let id = vmm["id"].as_str().unwrap().to_string();
    assert_code(&v.run(&["rm", "-f", &id]), 0);

    // The pool ends with SIGTERM: its VMs with it; runs restore again.
    // SAFETY: kill of our own child, not yet reaped.
    unsafe { libc::kill(keeper.0.id() as i32, libc::SIGTERM) };
    let status = keeper.0.wait().unwrap();
    assert!(status.success(), "vmrun pool ended with {status}");
    assert!(pooled_vms(&pool).is_empty(), "{:?}", pooled_vms(&pool));
    assert!(!pool.join("pool.sock").exists());
    assert!(pool_links().is_empty(), "{:?}", pool_links());
    let o = v.cmd(&["run", "--rm", "pooled", "cat", "/pooled"]).env("VMRUN_LOG", "debug").output().unwrap();
    assert_code(&o, 0);
    assert_eq!(text(&o.stdout), "pooled\n");
    assert!(!text(&o.stderr).contains("claimed from the pool"), "{}", text(&o.stderr));
}
