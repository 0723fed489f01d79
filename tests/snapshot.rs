//! Snapshots: a guest is booted once, snapshotted while its init waits for
//! a disk to say "go", and restored twice at the same time: one onto a disk
//! of another size, one onto an empty disk slot that gets its image
//! through the control socket while the guest runs (read-only). Each copy
//! must see its own disk, writes must reach only the writable one, and
//! both must see their disk detached before they end cleanly. Broken
//! snapshots must be refused with a clear error.

#![allow(clippy::unwrap_used)] // test code: a failed step is a failed test

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use support::{kernel, scratch, wait_for, Reaped};

const VMRUN: &str = env!("CARGO_BIN_EXE_vmrun");

const INIT: &str = r#"#!/bin/busybox sh
export PATH=/bin
busybox mount -t proc proc /proc
busybox mount -t sysfs sys /sys
busybox mount -t devtmpfs dev /dev
echo "ready-for-snapshot"
while true; do
  echo 3 > /proc/sys/vm/drop_caches
  [ "$(busybox head -c 2 /dev/vda)" = "go" ] && break
  busybox sleep 1
done
echo "CHECK disk=$(busybox head -c 8 /dev/vda) sectors=$(busybox cat /sys/block/vda/size)"
if busybox dd if=/dev/zero of=/dev/vda bs=512 count=1 conv=fsync 2>/dev/null; then echo "WRITE=ok"; else echo "WRITE=refused"; fi
while [ "$(busybox cat /sys/block/vda/size)" != 0 ]; do busybox sleep 1; done
echo "DETACHED"
busybox reboot -f
"#;

fn initramfs(dir: &Path) -> PathBuf {
    let busybox = std::env::var_os("VMRUN_TEST_BUSYBOX").unwrap_or_else(|| "/bin/busybox".into());
    let bin = std::fs::read(&busybox).expect("a static busybox");
    let path = dir.join("wait.cpio");
    let f = std::fs::File::create(&path).unwrap();
    vmrun_initramfs::demo::write_with_init(std::io::BufWriter::new(f), &bin, INIT).unwrap();
    path
}

fn disk(dir: &Path, name: &str, head: &[u8], size: usize) -> PathBuf {
    let mut bytes = head.to_vec();
    bytes.resize(size, 0);
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}


fn vmrun(args: &[&str]) -> Output {
    Command::new(support::with_vmm(VMRUN)).args(args).stdin(Stdio::null()).output().unwrap()
}

fn assert_error(o: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "stderr: {err}");
    assert!(err.contains(needle), "expected {needle:?} in: {err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn snapshot_restores_twice_at_once_onto_other_disks() {
    let dir = scratch("snapshot");
    std::fs::create_dir_all(&dir).unwrap();
    let initrd = initramfs(&dir);
    let wait = disk(&dir, "wait.raw", b"wait", 4096);
    let control = dir.join("control.sock");
    let console = dir.join("template.log");
    let snap = dir.join("snap");

    let mut template = Reaped(Command::new(support::with_vmm(VMRUN))
        .args(["boot", "--kernel"])
        .arg(kernel())
        .arg("--initrd")
        .arg(&initrd)
        .arg("--disk")
        .arg(&wait)
        .arg("--control")
        .arg(&control)
        .arg("--console")
        .arg(&console)
        .stdin(Stdio::null())
        .spawn()
        .unwrap());
    wait_for(&console, "ready-for-snapshot", &mut template.0, Duration::from_secs(600));
    let o = vmrun(&["snapshot", "create", "--control", control.to_str().unwrap(), "--dir", snap.to_str().unwrap()]);
    assert!(o.status.success(), "snapshot: {}", String::from_utf8_lossy(&o.stderr));
    let o = vmrun(&["vm", "--control", control.to_str().unwrap(), "stop"]);
    assert!(o.status.success(), "stop: {}", String::from_utf8_lossy(&o.stderr));
    assert!(template.wait().unwrap().success());
    assert!(!control.exists(), "the control socket should be gone with the VMM");

    // Two restores at once: "a" onto an empty slot (its image is attached
    // once it runs, read-only), "b" onto a bigger disk of its own.
    let image_a = disk(&dir, "a-image.raw", b"go-aaaaa", 4096);
    let runs: Vec<(Reaped, PathBuf, PathBuf)> = [("a", 0usize), ("b", 8192)]
        .iter()
        .map(|(name, size)| {
            let d = disk(&dir, &format!("{name}.raw"), if *size == 0 { b"" } else { b"go-bbbbb" }, *size);
            let log = dir.join(format!("restore-{name}.log"));
            let control = dir.join(format!("{name}.sock"));
            let child = Reaped(
                Command::new(support::with_vmm(VMRUN))
                    .args(["restore", "--snapshot"])
                    .arg(&snap)
                    .arg("--disk")
                    .arg(&d)
                    .arg("--console")
                    .arg(&log)
                    .arg("--control")
                    .arg(&control)
                    .stdin(Stdio::null())
                    .spawn()
                    .unwrap(),
            );
            (child, log, control)
        })
        .collect();
    let vm = |control: &Path, args: &[&str]| {
        let mut all = vec!["vm", "--control", control.to_str().unwrap()];
        all.extend_from_slice(args);
        vmrun(&all)
    };
    let wait_socket = |control: &Path| {
        let t = Instant::now();
        while !control.exists() {
            assert!(t.elapsed() < Duration::from_secs(60), "{} never appeared", control.display());
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let (control_a, control_b) = (runs[0].2.clone(), runs[1].2.clone());
    wait_socket(&control_a);
    wait_socket(&control_b);
    // A slot that holds a disk takes no other; there is no slot 1.
    assert_error(&vm(&control_b, &["attach-disk", "--disk", "0", "--image", image_a.to_str().unwrap()]), "detach it first");
    assert_error(&vm(&control_a, &["attach-disk", "--disk", "1", "--image", image_a.to_str().unwrap()]), "has 1 disk slots");
    let o = vm(&control_a, &["attach-disk", "--disk", "0", "--read-only", "--image", image_a.to_str().unwrap()]);
    assert!(o.status.success(), "attach-disk: {}", String::from_utf8_lossy(&o.stderr));

    for (mut child, log, control) in runs {
        let name = if control == control_a { "a" } else { "b" };
        let (sectors, write) = if name == "a" { (8, "WRITE=refused") } else { (16, "WRITE=ok") };
        let expect = format!("CHECK disk=go-{name}{name}{name}{name}{name} sectors={sectors}");
        let t = Instant::now();
        loop {
            let out = std::fs::read_to_string(&log).unwrap_or_default();
            if out.contains(write) {
                assert!(out.contains(&expect), "restore {name} should print {expect:?}:\n{out}");
                break;
            }
            assert!(child.try_wait().unwrap().is_none(), "restore {name} ended early:\n{out}");
            assert!(t.elapsed() < Duration::from_secs(300), "restore {name} never wrote {write:?}:\n{out}");
            std::thread::sleep(Duration::from_millis(200));
        }
        let o = vm(&control, &["detach-disk", "--disk", "0"]);
        assert!(o.status.success(), "detach-disk {name}: {}", String::from_utf8_lossy(&o.stderr));
        let t = Instant::now();
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            assert!(t.elapsed() < Duration::from_secs(300), "restore {name} did not finish");
            std::thread::sleep(Duration::from_millis(200));
        };
        let out = std::fs::read_to_string(&log).unwrap();
        assert!(status.success(), "restore {name}: {status}\n{out}");
        assert!(out.contains("DETACHED"), "restore {name} should see its disk go:\n{out}");
    }
    // The read-only image is as it was; the writable disk took the write.
    assert_eq!(&std::fs::read(&image_a).unwrap()[..8], b"go-aaaaa");
    assert!(std::fs::read(dir.join("b.raw")).unwrap()[..512].iter().all(|&b| b == 0), "b's first sector was zeroed");

    // Broken snapshots.
    let broken = |name: &str, edit: &dyn Fn(&Path)| {
        let b = dir.join(name);
        std::fs::create_dir_all(&b).unwrap();
        std::fs::copy(snap.join("vmstate.json"), b.join("vmstate.json")).unwrap();
        let st = Command::new("cp").args(["--sparse=always"]).arg(snap.join("memory")).arg(b.join("memory")).status();
        assert!(st.unwrap().success());
        edit(&b);
        vmrun(&["restore", "--snapshot", b.to_str().unwrap(), "--disk", wait.to_str().unwrap(), "--console", "/dev/null"])
    };
    let o = broken("truncated", &|b| {
        std::fs::OpenOptions::new().write(true).open(b.join("memory")).unwrap().set_len(1 << 20).unwrap();
    });
    assert_error(&o, "truncated?");
    let o = broken("version", &|b| {
        let s = std::fs::read_to_string(b.join("vmstate.json")).unwrap();
        std::fs::write(b.join("vmstate.json"), s.replacen("\"version\":1,", "\"version\":99,", 1)).unwrap();
    });
    assert_error(&o, "format version 99");
    let o = broken("corrupt", &|b| {
        let s = std::fs::read(b.join("vmstate.json")).unwrap();
        std::fs::write(b.join("vmstate.json"), &s[..s.len() / 2]).unwrap();
    });
    assert_error(&o, "is corrupt");
    let o = vmrun(&["restore", "--snapshot", dir.to_str().unwrap()]);
    assert_error(&o, "is not a vmrun snapshot");
    let o = vmrun(&["restore", "--snapshot", snap.to_str().unwrap(), "--console", "/dev/null"]);
    assert_error(&o, "give a disk image for it");
}
