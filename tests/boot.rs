//! Boots real guests with `vmrun boot`: the guest kernel built by
//! `kernel-config/build.sh` and a busybox initramfs.
//!
//! A boot takes about a minute on hosts that emulate guest kernel mode, so
//! one guest does all the checks of a successful boot (two vCPUs, the init's
//! output, the boot marker, a clean exit); the other tests fail before the
//! guest runs, or stop it early.
//!
//! Inputs: see `support/mod.rs` (`VMRUN_TEST_KERNEL`, `VMRUN_TEST_BUSYBOX`).

#![allow(clippy::unwrap_used)] // test code: a failed step is a failed test

mod support;

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use support::{demo_initramfs, kernel, scratch, Reaped};

const VMRUN: &str = env!("CARGO_BIN_EXE_vmrun");

fn vmrun(args: &[&str]) -> Output {
    Command::new(support::with_vmm(VMRUN)).args(args).stdin(Stdio::null()).output().expect("run vmrun")
}

fn stderr_of(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Asserts a failure before the guest ran: exit status 1, one clear error
/// naming `needle`, and no panic.
fn assert_clean_error(o: &Output, needle: &str) {
    let err = stderr_of(o);
    assert_eq!(o.status.code(), Some(1), "stderr: {err}");
    // From vmrun before it runs the VMM, or from vmrun-vmm (which then
    // takes its place).
    assert!(err.contains("vmrun: error:") || err.contains("vmrun-vmm: error:"), "stderr: {err}");
    assert!(err.contains(needle), "expected {needle:?} in: {err}");
    assert!(!err.contains("panicked"), "the VMM panicked: {err}");
}

#[test]
fn boots_to_user_space_with_two_vcpus_and_exits_cleanly() {
    let console = scratch("console.log");
    let report = scratch("report.json");
    let profile = scratch("profile.json");
    let started = Instant::now();
    let out = vmrun(&[
        "boot",
        "--kernel",
        kernel().to_str().unwrap(),
        "--initrd",
        demo_initramfs().to_str().unwrap(),
        "--memory",
        "128",
        "--cpus",
        "2",
        "--console",
        console.to_str().unwrap(),
        "--report",
        report.to_str().unwrap(),
        "--profile",
        profile.to_str().unwrap(),
    ]);
    let log = std::fs::read_to_string(&console).unwrap_or_default();
    eprintln!("guest ran for {:.1} s", started.elapsed().as_secs_f64());
    assert_eq!(out.status.code(), Some(0), "vmrun failed: {}\nconsole:\n{log}", stderr_of(&out));
    assert!(log.contains("Run /init as init process"), "console:\n{log}");
    assert!(log.contains(vmrun_initramfs::demo::GREETING), "the init's output is missing:\n{log}");
    assert!(log.contains("cpu(s)") && log.contains(", 2 cpu(s)"), "the guest should see 2 CPUs:\n{log}");
    assert!(log.contains("reboot: Restarting system"), "console:\n{log}");

    let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&report).expect("report")).unwrap();
    assert_eq!(r["exit"], "the guest reset the machine");
    assert_eq!(r["boot_marker_value"], 1, "the init's boot marker was not recorded: {r}");
    let t = |k: &str| r[k]["wall_ms"].as_f64().unwrap_or_else(|| panic!("no {k} in report: {r}"));
    assert!(t("first_instruction") < t("run_init"), "{r}");
    assert!(t("run_init") < t("boot_marker"), "{r}");
    assert!(t("boot_marker") <= t("end"), "{r}");

    // The profile: both vCPUs' samples, most of them in the guest kernel,
    // whose boot runs through start_kernel.
    let p: vmrun_vmm_api::profile::Profile = serde_json::from_slice(&std::fs::read(&profile).expect("profile")).unwrap();
    let kernel_samples: u64 = p.samples.iter().filter(|s| s.kernel).map(|s| s.count).sum();
    // (Hundreds where guest kernel mode is emulated; fewer on hardware.)
    assert!(kernel_samples >= 20, "too few samples of the guest kernel: {kernel_samples}");
    let map = scratch("System.map");
    let nm = Command::new("nm").arg(kernel()).output().expect("run nm");
    assert!(nm.status.success(), "nm failed: {}", stderr_of(&nm));
    std::fs::write(&map, &nm.stdout).unwrap();
    let shown = vmrun(&["profile", profile.to_str().unwrap(), "--system-map", map.to_str().unwrap(), "--top", "100000"]);
    let text = String::from_utf8_lossy(&shown.stdout);
    assert!(shown.status.success(), "vmrun profile failed: {}", stderr_of(&shown));
    assert!(text.starts_with(&format!("{} samples", p.samples.iter().map(|s| s.count).sum::<u64>())), "{text}");
    let inclusive = text.split("inclusive").nth(1).unwrap_or_default();
    assert!(inclusive.lines().any(|l| l.ends_with(" start_kernel")), "start_kernel is on no stack:\n{text}");
}

#[test]
fn sigterm_stops_the_guest_and_the_vmm() {
    let mut child = Reaped(
        Command::new(support::with_vmm(VMRUN))
            .args(["boot", "--kernel", kernel().to_str().unwrap(), "--console", "/dev/null"])
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start vmrun"),
    );
    std::thread::sleep(Duration::from_secs(3));
    assert!(child.try_wait().expect("wait").is_none(), "the VMM ended before it was signalled");
    // SAFETY: sends SIGTERM to the child we started.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let t = Instant::now();
    let mut stderr = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().expect("stderr"), &mut stderr).expect("read stderr");
    let status = child.wait().expect("wait");
    assert!(t.elapsed() < Duration::from_secs(10), "teardown took {:?}", t.elapsed());
    assert_eq!(status.code(), Some(128 + libc::SIGTERM), "stderr: {stderr}");
    assert!(stderr.contains("stopped by signal 15"), "stderr: {stderr}");
}

#[test]
fn missing_files_are_clear_errors() {
    let o = vmrun(&["boot", "--kernel", "/nonexistent/vmlinux"]);
    assert_clean_error(&o, "cannot open kernel /nonexistent/vmlinux");
    let o = vmrun(&["boot", "--kernel", kernel().to_str().unwrap(), "--initrd", "/nonexistent/initrd"]);
    assert_clean_error(&o, "cannot open initramfs /nonexistent/initrd");
}

#[test]
fn truncated_and_corrupt_kernels_are_clear_errors() {
    let full = std::fs::read(kernel()).expect("read vmlinux");
    let truncated = scratch("truncated-vmlinux");
    std::fs::write(&truncated, &full[..full.len() / 3]).unwrap();
    assert_clean_error(&vmrun(&["boot", "--kernel", truncated.to_str().unwrap()]), "cannot load kernel");

    // Program headers pointing far past the end of the file.
    let mut corrupt = full.clone();
    corrupt[0x20..0x28].copy_from_slice(&(u64::MAX / 2).to_le_bytes()); // e_phoff
    let corrupt_path = scratch("corrupt-vmlinux");
    std::fs::write(&corrupt_path, &corrupt).unwrap();
    assert_clean_error(&vmrun(&["boot", "--kernel", corrupt_path.to_str().unwrap()]), "cannot load kernel");

    let garbage = scratch("garbage-vmlinux");
    std::fs::write(&garbage, vec![0x5a; 1 << 16]).unwrap();
    assert_clean_error(&vmrun(&["boot", "--kernel", garbage.to_str().unwrap()]), "is not a kernel vmrun can boot");
}

#[test]
fn initramfs_larger_than_memory_is_a_clear_error() {
    let big = scratch("big-initrd");
    let f = std::fs::File::create(&big).unwrap();
    f.set_len(96 << 20).unwrap(); // sparse
    let o = vmrun(&[
        "boot",
        "--kernel",
        kernel().to_str().unwrap(),
        "--initrd",
        big.to_str().unwrap(),
        "--memory",
        "64",
    ]);
    assert_clean_error(&o, "does not fit in guest memory (64 MiB)");
}

#[test]
fn bad_sizes_are_clear_errors() {
    let k = kernel().to_str().unwrap();
    assert_clean_error(&vmrun(&["boot", "--kernel", k, "--cpus", "0"]), "0 vCPUs requested");
    assert_clean_error(&vmrun(&["boot", "--kernel", k, "--memory", "8"]), "8 MiB of memory requested");
}
