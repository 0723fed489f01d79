//! A private containerd for the tests that drive vmrun through it
//! (`tests/oci.rs` with `ctr`, `tests/cri.rs` through its CRI plugin): its
//! own root, state, socket and configuration in a scratch directory, so
//! that it shares nothing with a containerd of the host.

use std::ffi::OsStr;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Finds `name` on PATH.
pub fn which(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?).map(|d| d.join(name)).find(|p| p.is_file())
}

/// A running containerd; killed (SIGKILL) when dropped, with the shims it
/// started and still running (a test that failed half-way leaves tasks
/// behind: their VMMs die with their shims, so the next test starts on a
/// host without them).
pub struct Containerd {
    /// Its directory: `config.toml`, `containerd.log`, `root/`, `state/`,
    /// `opt/`.
    pub dir: PathBuf,
    /// Its gRPC socket (`ttrpc` beside it, `.ttrpc`).
    pub sock: PathBuf,
    ctr: PathBuf,
    daemon: super::Reaped,
}

impl Containerd {
    /// Starts `containerd` in `dir` (made if missing) with `disabled`
    /// plugins and `extra` TOML appended to its configuration, and waits (up
    /// to a minute) until `ctr` reaches it. `shims` goes first on its PATH,
    /// where it finds `containerd-shim-vmrun-v2` (and the shim `vmrun-oci`
    /// and `vmrun-vmm`); `env` is added to its environment, which the shims
    /// and `vmrun-oci` inherit.
    pub fn start(containerd: &Path, ctr: &Path, dir: &Path, disabled: &[&str], extra: &str, shims: &Path, env: &[(&str, &OsStr)]) -> Self {
        std::fs::create_dir_all(dir).expect("containerd's directory");
        let sock = dir.join("c.sock");
        let disabled: Vec<String> = disabled.iter().map(|p| format!("{p:?}")).collect();
        let config = format!(
            r#"version = 2
root = "{d}/root"
state = "{d}/state"
disabled_plugins = [{disabled}]
[grpc]
  address = "{s}"
[ttrpc]
  address = "{s}.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"
{extra}"#,
            d = dir.display(),
            s = sock.display(),
            disabled = disabled.join(", "),
        );
        std::fs::write(dir.join("config.toml"), config).expect("containerd's config.toml");
        let path = std::env::join_paths(
            std::iter::once(shims.to_path_buf()).chain(std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())),
        )
        .expect("PATH");
        let log = File::create(dir.join("containerd.log")).expect("containerd.log");
        let mut cmd = Command::new(containerd);
        cmd.arg("--config")
            .arg(dir.join("config.toml"))
            .env("PATH", &path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("containerd.log"))
            .stderr(log);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let daemon = super::Reaped(cmd.spawn().unwrap_or_else(|e| panic!("cannot start {}: {e}", containerd.display())));
        let mut c = Self { dir: dir.to_path_buf(), sock, ctr: ctr.to_path_buf(), daemon };
        let start = Instant::now();
        while !c.ctr("default", &["version"]).output().is_ok_and(|o| o.status.success()) {
            assert!(c.daemon.try_wait().ok().flatten().is_none(), "containerd ended: {}", c.log());
            assert!(start.elapsed() < Duration::from_secs(60), "containerd did not come up: {}", c.log());
            std::thread::sleep(Duration::from_millis(200));
        }
        c
    }

    /// `ctr --address SOCK --namespace NS ARGS`.
    pub fn ctr(&self, ns: &str, args: &[&str]) -> Command {
        let mut c = Command::new(&self.ctr);
        c.arg("--address").arg(&self.sock).arg("--namespace").arg(ns).args(args).stdin(Stdio::null());
        c
    }

    /// What containerd logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default()
    }

    /// The last `n` lines of its log.
    pub fn log_tail(&self, n: usize) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Whether it still runs.
    pub fn running(&mut self) -> bool {
        self.daemon.try_wait().ok().flatten().is_none()
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        // Shims are started with `-address SOCK`: this daemon's.
        let address = format!("-address {}", self.sock.display());
        let _ = Command::new("pkill").args(["-KILL", "-f", "--", &address]).status();
    }
}
