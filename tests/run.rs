//! `vmrun run` end to end: images from Debian's `docker-registry` on
//! loopback and from an archive, containers in microVMs with their output,
//! exit codes, standard input, environment, working directory and user.
//!
//! The first run builds the warm-start template (one boot); the others
//! restore it. Needs the guest kernel (`VMRUN_TEST_KERNEL`, see
//! `support/mod.rs`), the agent initramfs (`VMRUN_AGENT_INITRD`, else
//! `rootfs/build.sh` builds it) and Debian's docker-registry.

#![allow(clippy::unwrap_used)] // test code: a failed step is a failed test

mod support;

#[path = "../vmm/images/tests/support/registry.rs"]
#[allow(dead_code)] // shared with the image store's tests, which use all of it
mod registry;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

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
    let v = Vmrun { home: support::scratch("run-home"), kernel: support::kernel().to_path_buf(), initrd: support::agent_initrd() };
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

    // The cold path (a boot, no template) behaves the same.
    let o = v.run(&["run", "--cold", "-e", "WHERE=cold", &reference, "sh", "-c", "echo $WHERE; exit 5"]);
    assert_code(&o, 5);
    assert_eq!(text(&o.stdout), "cold\n");

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

    // Nothing is left of the containers.
    let left: Vec<_> = std::fs::read_dir(v.home.join("containers")).map(|d| d.flatten().collect()).unwrap_or_default();
    assert!(left.is_empty(), "container directories left behind: {left:?}");
    assert!(Path::new(&v.home.join("templates")).is_dir());
}
