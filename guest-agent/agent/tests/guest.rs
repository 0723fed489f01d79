//! The agent in a real guest: boots the agent initramfs (rootfs/build.sh)
//! with `vmrun boot`, the image's layer disk as virtio-blk and a hybrid
//! vsock socket, then creates a container over vsock, runs a command in it
//! and checks its stdout, stderr and exit code, and shuts the guest down.
//!
//! Runs where `VMRUN_TEST_KERNEL` names the guest kernel (scripts/test.sh
//! sets it; so does CI). `VMRUN_AGENT_INITRD` may name a prebuilt
//! initramfs; otherwise rootfs/build.sh builds one (in its own target
//! directory). It takes minutes on hosts that emulate guest kernel mode.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use vmrun_agent_client::{Client, CreateContainer, ImageConfig, LayerSource, Options, StdioMode};
use vmrun_agent_protocol::UnpackLimits;

const PORT: u32 = 1024;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap()
}

/// `vmrun`, built by the same `cargo test --workspace` (next to this test
/// binary's directory).
fn vmrun_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("VMRUN_BIN") {
        return p.into();
    }
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(Path::parent).unwrap();
    let p = dir.join("vmrun");
    assert!(p.exists(), "{} not found: build it (cargo build -p vmrun) or set VMRUN_BIN", p.display());
    p
}

fn agent_initramfs() -> PathBuf {
    if let Some(p) = std::env::var_os("VMRUN_AGENT_INITRD") {
        return p.into();
    }
    let out = Command::new(repo_root().join("rootfs/build.sh")).stderr(Stdio::inherit()).output().unwrap();
    assert!(out.status.success(), "rootfs/build.sh failed");
    let path = String::from_utf8(out.stdout).unwrap().lines().last().unwrap().trim().to_string();
    repo_root().join(path)
}

struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

#[test]
fn runs_a_container_in_a_guest_over_vsock() {
    let Some(kernel) = std::env::var_os("VMRUN_TEST_KERNEL") else {
        eprintln!("SKIPPED: VMRUN_TEST_KERNEL is not set (scripts/test.sh sets it)");
        return;
    };
    let initramfs = agent_initramfs();
    let dir = TempDir::new("guest");
    let (disk, layers) = test_image(dir.path());
    let uds = dir.path().join("vsock.sock");
    let console = dir.path().join("console.log");
    let started = Instant::now();
    let mut vm = Killed(
        Command::new(vmrun_binary())
            .arg("boot")
            .arg("--kernel")
            .arg(&kernel)
            .arg("--initrd")
            .arg(&initramfs)
            .args(["--cmdline", &format!("console=ttyS0 reboot=k panic=1 vmrun_port={PORT}")])
            .arg("--disk")
            .arg(format!("{},ro", disk.display()))
            .arg("--vsock")
            .arg(format!("cid=3,uds={}", uds.display()))
            .arg("--console")
            .arg(&console)
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let log = || std::fs::read_to_string(&console).unwrap_or_default();

    // Connect once the agent listens.
    let opts = Options { handshake_timeout: Duration::from_secs(60), request_timeout: Duration::from_secs(120), create_timeout: Duration::from_secs(600), defer_hello: false };
    let deadline = Instant::now() + Duration::from_secs(600);
    let client = loop {
        if let Some(s) = vm.0.try_wait().unwrap() {
            panic!("vmrun ended ({s}) before the agent answered; console:\n{}", log());
        }
        if log().contains("vmrun-agent: ready") {
            if let Ok(c) = Client::connect_hybrid_vsock(&uds, PORT, opts) {
                break c;
            }
        }
        assert!(Instant::now() < deadline, "the agent did not answer; console:\n{}", log());
        std::thread::sleep(Duration::from_millis(500));
    };
    let ready = started.elapsed();
    assert!(client.ping().unwrap().starts_with("vmrun-agent"));

    let t = Instant::now();
    client
        .create_container(&CreateContainer {
            id: "hello".into(),
            layers: LayerSource { disk: "/dev/vda".into(), layers },
            rootfs: Default::default(),
            config: ImageConfig {
                cmd: vec!["sh".into(), "-c".into(), "echo hello from $(hostname); cat /marker; echo oops >&2; exit 7".into()],
                hostname: "guest-box".into(),
                ..Default::default()
            },
            limits: UnpackLimits::default(),
        })
        .unwrap_or_else(|e| panic!("create: {e}; console:\n{}", log()));
    let created = t.elapsed();
    let t = Instant::now();
    let out = client.start("hello", StdioMode::Piped { stdin: false }).unwrap().output(1 << 20).unwrap();
    let ran = t.elapsed();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello from guest-box\nfrom the image\n", "console:\n{}", log());
    assert_eq!(String::from_utf8_lossy(&out.stderr), "oops\n");
    assert_eq!(out.exit_code, 7);

    client.shutdown().unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(s) = vm.0.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "the guest did not end after shutdown; console:\n{}", log());
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(status.success(), "vmrun: {status}; console:\n{}", log());
    let ready_line = log().lines().find(|l| l.contains("vmrun-agent: ready")).unwrap_or_default().to_string();
    eprintln!(
        "guest: agent connected {:.1} s after vmrun started; create (unpack) {:.1} s; run {:.1} s; initramfs {} bytes\n  {ready_line}",
        ready.as_secs_f64(),
        created.as_secs_f64(),
        ran.as_secs_f64(),
        std::fs::metadata(&initramfs).map(|m| m.len()).unwrap_or(0),
    );
}
