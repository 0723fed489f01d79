//! What the guest-booting tests and benchmarks share: the guest kernel and
//! the demo initramfs.
//!
//! `VMRUN_TEST_KERNEL` names a vmlinux; without it, `kernel-config/build.sh`
//! builds one (once; it is cached). `VMRUN_TEST_BUSYBOX` names a static
//! busybox (default `/bin/busybox`, from Debian's busybox-static).

#![allow(dead_code)]

pub mod containerd;
pub mod sandboxes;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

/// The number in environment variable `name`, or `default` when it is
/// unset or not a number (the benchmarks' knobs).
pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// The repository's root directory.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().expect("repository root")
}

/// The guest kernel, built (or found in the cache) once per process.
pub fn kernel() -> &'static Path {
    static KERNEL: OnceLock<PathBuf> = OnceLock::new();
    KERNEL.get_or_init(|| {
        if let Some(k) = std::env::var_os("VMRUN_TEST_KERNEL") {
            return PathBuf::from(k);
        }
        script_path("kernel-config/build.sh")
    })
}

/// The kernel vmrun boots for a VM of `cpus` vCPUs, as `vmrun run` picks
/// it: for one, the uniprocessor build beside [`kernel`] (`vmlinux-up`).
pub fn kernel_for(cpus: u8) -> PathBuf {
    vmrun_runtime::artifacts::Artifacts::new(kernel().to_path_buf(), PathBuf::new()).kernel_for(cpus).to_path_buf()
}

/// Runs `script` (relative to the repository) and returns the path it
/// prints as its last line of standard output, as the build scripts do.
pub fn script_path(script: &str) -> PathBuf {
    let out = Command::new(repo_root().join(script))
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {script}: {e}"));
    assert!(out.status.success(), "{script} failed");
    let stdout = String::from_utf8(out.stdout).expect("utf-8 path");
    PathBuf::from(stdout.lines().last().unwrap_or_else(|| panic!("{script} printed no path")).trim())
}

/// The agent initramfs: `VMRUN_AGENT_INITRD`, else built by
/// `rootfs/build.sh` (once per process: benchmarks time the runs that
/// use it).
pub fn agent_initrd() -> PathBuf {
    static INITRD: OnceLock<PathBuf> = OnceLock::new();
    INITRD
        .get_or_init(|| std::env::var_os("VMRUN_AGENT_INITRD").map(PathBuf::from).unwrap_or_else(|| script_path("rootfs/build.sh")))
        .clone()
}

/// The busybox test image's directory (OCI layout and archives).
pub fn busybox_image() -> PathBuf {
    script_path("tests/images/make-busybox-image.sh")
}

/// The Debian test image's directory (`debootstrap --variant=minbase`,
/// built once by `tests/images/make-debian-image.sh` and cached).
pub fn debian_image() -> PathBuf {
    script_path("tests/images/make-debian-image.sh")
}

/// This process's scratch directory, `$TMPDIR/vmrun-test-PID`. Made once:
/// the directories of test processes that are gone (a killed run leaves
/// its own) are removed first, and this one is removed when the process
/// exits.
fn scratch_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let tmp = std::env::temp_dir();
        for entry in std::fs::read_dir(&tmp).into_iter().flatten().flatten() {
            let name = entry.file_name();
            let pid = name.to_str().and_then(|n| n.strip_prefix("vmrun-test-")).and_then(|p| p.parse::<i32>().ok());
            if pid.is_some_and(|p| !Path::new(&format!("/proc/{p}")).exists()) {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
        let dir = tmp.join(format!("vmrun-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("scratch dir");
        extern "C" fn remove_at_exit() {
            if let Some(dir) = DIR.get() {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
        // SAFETY: registers a plain function with no arguments; it only
        // reads the OnceLock, which is set before this runs.
        unsafe { libc::atexit(remove_at_exit) };
        dir
    })
}

/// A scratch file path private to this process.
pub fn scratch(name: &str) -> PathBuf {
    scratch_dir().join(name)
}

/// The demo initramfs (busybox; the init greets, writes the boot marker and
/// reboots), written once per process.
pub fn demo_initramfs() -> &'static Path {
    static INITRD: OnceLock<PathBuf> = OnceLock::new();
    INITRD.get_or_init(|| {
        let busybox = std::env::var_os("VMRUN_TEST_BUSYBOX").unwrap_or_else(|| "/bin/busybox".into());
        let bin = std::fs::read(&busybox).expect("a static busybox (apt-get install busybox-static)");
        let path = scratch("demo.cpio");
        let f = std::fs::File::create(&path).expect("create initramfs");
        vmrun_initramfs::demo::write(std::io::BufWriter::new(f), &bin).expect("write initramfs");
        path
    })
}

/// A child process that is killed if the test ends (or panics) while it
/// still runs, so a failed test leaves no VMM behind.
pub struct Reaped(pub std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

impl std::ops::Deref for Reaped {
    type Target = std::process::Child;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for Reaped {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

/// Runs `cmd`, failing the test with its standard error if it fails.
pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    out
}

/// An ext4 root file system in `dir`: busybox, the static guest probe
/// (`tests/guest/probe.c`, compiled with `cc -static`) and `init` as
/// `/init`. Boot it with `root=/dev/vda rw init=/init`.
pub fn guest_rootfs(dir: &Path, init: &str) -> PathBuf {
    let root = dir.join("rootfs");
    let bin = root.join("bin");
    std::fs::create_dir_all(&bin).expect("rootfs dir");
    for d in ["proc", "sys", "dev", "tmp"] {
        std::fs::create_dir_all(root.join(d)).expect("rootfs dir");
    }
    let busybox = std::env::var_os("VMRUN_TEST_BUSYBOX").unwrap_or_else(|| "/bin/busybox".into());
    std::fs::copy(&busybox, bin.join("busybox")).expect("copy busybox");
    let probe_src = repo_root().join("tests/guest/probe.c");
    run_ok(Command::new("cc").args(["-static", "-O2", "-o"]).arg(bin.join("probe")).arg(probe_src));
    let init_path = root.join("init");
    std::fs::write(&init_path, init).expect("write init");
    run_ok(Command::new("chmod").arg("755").arg(&init_path));
    let image = dir.join("rootfs.ext4");
    run_ok(Command::new("mkfs.ext4").args(["-q", "-F", "-d"]).arg(&root).arg(&image).arg("32M"));
    image
}

/// Waits until the file `console` shows `needle`; fails the test, showing
/// the console, if `vmm` ends first or `timeout` passes (and kills it).
pub fn wait_for(console: &Path, needle: &str, vmm: &mut std::process::Child, timeout: std::time::Duration) {
    let start = std::time::Instant::now();
    loop {
        let log = std::fs::read_to_string(console).unwrap_or_default();
        if log.contains(needle) {
            return;
        }
        if let Ok(Some(status)) = vmm.try_wait() {
            panic!("the VMM ended ({status}) before {needle:?}; console:\n{log}");
        }
        if start.elapsed() > timeout {
            let _ = vmm.kill();
            panic!("no {needle:?} after {timeout:?}; console:\n{log}");
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
}

/// `exe` (the tests' `vmrun`), with `vmrun-vmm` built beside it: `vmrun
/// boot` and `vmrun restore` run it ([`build_vmm`]).
pub fn with_vmm(exe: &'static str) -> &'static str {
    build_vmm(exe);
    exe
}

/// Builds `vmrun-vmm` (once per process) into the directory of `exe`, a
/// binary cargo built for these tests (`vmrun`, `vmrun-oci`): the runtime
/// spawns the VMM found beside the running executable, and `cargo test -p
/// vmrun` builds only its own package's binaries. An up-to-date build is a
/// no-op.
pub fn build_vmm(exe: &str) -> PathBuf {
    static VMM: OnceLock<PathBuf> = OnceLock::new();
    VMM.get_or_init(|| {
        let exe = Path::new(exe);
        let profile_dir = exe.parent().expect("the binary's directory");
        let target_dir = profile_dir.parent().expect("the target directory");
        let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
            Some("debug") | None => "dev",
            Some(p) => p,
        };
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "--quiet", "-p", "vmrun-vmm", "--bin", "vmrun-vmm", "--profile", profile, "--target-dir"])
            .arg(target_dir)
            .current_dir(repo_root())
            .status()
            .expect("cannot run cargo to build vmrun-vmm");
        assert!(status.success(), "building vmrun-vmm failed");
        let vmm = profile_dir.join("vmrun-vmm");
        assert!(vmm.is_file(), "{} is missing after cargo build", vmm.display());
        vmm
    })
    .clone()
}

/// Lays `dir` out as kubelet lays out a configmap volume: each key a link
/// through `..data` to a timestamped directory, which an update swaps.
pub fn configmap(dir: &Path, stamp: &str, keys: &[(&str, &str)]) {
    std::fs::create_dir_all(dir.join(stamp)).expect("configmap dir");
    for (k, v) in keys {
        std::fs::write(dir.join(stamp).join(k), v).expect("configmap key");
        if dir.join(k).symlink_metadata().is_err() {
            std::os::unix::fs::symlink(format!("..data/{k}"), dir.join(k)).expect("configmap link");
        }
    }
    let old = std::fs::read_link(dir.join("..data")).ok();
    std::os::unix::fs::symlink(stamp, dir.join("..data_tmp")).expect("configmap ..data_tmp");
    std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).expect("configmap ..data");
    if let Some(old) = old {
        std::fs::remove_dir_all(dir.join(old)).expect("configmap's old data");
    }
}

/// The jail of a container's VMM, as its record lists it: its root
/// directory and cgroups (empty once collected).
pub fn jail_paths(vmm_pid: u64) -> Vec<PathBuf> {
    let record = PathBuf::from(format!("/run/vmrun-jail/{vmm_pid}.json"));
    let Ok(text) = std::fs::read(&record) else { return Vec::new() };
    let v: serde_json::Value = serde_json::from_slice(&text).expect("a jail record is JSON");
    let mut paths = vec![record, PathBuf::from(v["root"].as_str().expect("a jail record names its root"))];
    paths.extend(
        v["cgroups"]
            .as_array()
            .expect("a jail record lists its cgroups")
            .iter()
            .map(|c| PathBuf::from(c.as_str().expect("a jail cgroup is a path"))),
    );
    paths
}

/// Whether process `pid` runs (a zombie does not: one this process
/// inherited as a subreaper, a VMM whose supervisor was killed, is reaped
/// here).
pub fn alive(pid: u64) -> bool {
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
