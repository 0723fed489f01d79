//! One guest exercises every virtio device (a boot costs about a minute on
//! hosts that emulate guest kernel mode, so one guest runs all the checks):
//!
//! - virtio-blk: the root file system is ext4 on `/dev/vda` (`root=`), a
//!   read-write data disk is read and written (the host checks both), a
//!   read-only disk refuses writes;
//! - virtio-rng: the guest's hw_random uses it;
//! - virtio-vsock: the guest connects to a host listener (`<uds>_<port>`)
//!   and gets an echo, sends a bulk transfer, and accepts a connection the
//!   host makes through `CONNECT <port>`;
//! - virtio-net: in a network namespace made for the test, on a TAP device,
//!   guest and host ping each other and the guest sends TCP data to a host
//!   listener.
//!
//! Needs root (network namespaces, TAP), `ip`, `mkfs.ext4` and a C compiler
//! for the static guest probe (`tests/guest/probe.c`).

#![allow(clippy::unwrap_used)] // test code: a failed step is a failed test

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::{kernel, run_ok, scratch, wait_for, Reaped};

const VMRUN: &str = env!("CARGO_BIN_EXE_vmrun");
const HOST_IP: &str = "172.30.77.1";
const GUEST_IP: &str = "172.30.77.2";
const TAP: &str = "vmtap0";
const GUEST_CID: &str = "3";
const BULK_BYTES: usize = 4 << 20;

/// A network namespace with a TAP device for the guest, removed on drop.
struct NetNs(String);

impl NetNs {
    fn new() -> Self {
        let name = format!("vmrun-test-{}", std::process::id());
        run_ok(Command::new("ip").args(["netns", "add", &name]));
        let ns = NetNs(name);
        let ip = |args: &[&str]| run_ok(Command::new("ip").args(["-n", &ns.0]).args(args));
        ip(&["link", "set", "lo", "up"]);
        ip(&["tuntap", "add", "dev", TAP, "mode", "tap"]);
        ip(&["addr", "add", &format!("{HOST_IP}/24"), "dev", TAP]);
        ip(&["link", "set", TAP, "up"]);
        ns
    }

    fn exec(&self) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.0]);
        c
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "delete", &self.0]).status();
    }
}

fn sha256(path: &Path) -> String {
    let out = run_ok(Command::new("sha256sum").arg(path));
    String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap_or_default().to_string()
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

fn init_script() -> String {
    format!(
        r#"#!/bin/busybox sh
export PATH=/bin
busybox mount -t proc proc /proc
busybox mount -t sysfs sys /sys
busybox mount -t devtmpfs dev /dev
echo "CHECK root-fs=$(busybox awk '$2=="/" {{print $3}}' /proc/mounts)"
echo "CHECK data-sha256=$(busybox sha256sum /dev/vdb | busybox cut -d' ' -f1)"
echo "CHECK data-serial=$(busybox cat /sys/block/vdb/serial)"
echo "CHECK ro-flag=$(busybox cat /sys/block/vdc/ro)"
printf 'written-by-guest' | busybox dd of=/dev/vdb bs=512 seek=1 conv=sync,notrunc 2>/dev/null
busybox sync
if echo x | busybox dd of=/dev/vdc 2>/dev/null; then echo "CHECK ro-write=allowed"; else echo "CHECK ro-write=refused"; fi
echo "CHECK rng=$(busybox cat /sys/class/misc/hw_random/rng_current)"
echo "CHECK vsock-echo=$(probe connect 6000 ping-from-guest)"
echo "CHECK vsock-bulk=$(probe bulk 6001 {BULK_BYTES})"
busybox ip link set lo up
busybox ip addr add {GUEST_IP}/24 dev eth0
busybox ip link set eth0 up
if busybox ping -c 1 -W 20 {HOST_IP} >/dev/null; then echo "CHECK guest-ping=ok"; else echo "CHECK guest-ping=failed"; fi
echo tcp-from-guest | busybox nc {HOST_IP} 7777
echo "CHECK net-up"
probe listen 5000
echo "CHECK vsock-listen-done"
busybox reboot -f
"#
    )
}


fn check(log: &str, key: &str) -> String {
    let prefix = format!("CHECK {key}=");
    log.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no {prefix} line; console:\n{log}"))
        .trim()
        .to_string()
}

#[test]
fn guest_uses_disks_entropy_vsock_and_network() {
    assert!(running_as_root(), "this test needs root (network namespaces and TAP devices)");
    let dir = scratch("devices");
    std::fs::create_dir_all(&dir).unwrap();
    let rootfs = support::guest_rootfs(&dir, &init_script());
    let data = dir.join("data.raw");
    std::fs::write(&data, pattern(1 << 20, 7)).unwrap();
    let data_sha = sha256(&data);
    let ro = dir.join("ro.raw");
    std::fs::write(&ro, pattern(64 << 10, 9)).unwrap();
    let uds = dir.join("vsock.sock");
    let console = dir.join("console.log");

    // Host ends of the guest's vsock connections.
    let echo = UnixListener::bind(format!("{}_6000", uds.display())).unwrap();
    let echo_thread = std::thread::spawn(move || {
        let (mut s, _) = echo.accept().unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).unwrap();
        s.write_all(&got).unwrap();
        got
    });
    let bulk = UnixListener::bind(format!("{}_6001", uds.display())).unwrap();
    let bulk_thread = std::thread::spawn(move || {
        let (mut s, _) = bulk.accept().unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).unwrap();
        let expected: Vec<u8> = (0..got.len()).map(|i| ((i % 65536) as u8).wrapping_mul(7).wrapping_add(3)).collect();
        let verdict = if got == expected { "intact" } else { "corrupt" };
        s.write_all(format!("{}-{verdict}", got.len()).as_bytes()).unwrap();
    });

    let ns = NetNs::new();
    let mut tcp = Reaped(ns.exec().args(["busybox", "nc", "-l", "-p", "7777"]).stdout(Stdio::piped()).spawn().unwrap());

    let mut vmm = Reaped(ns
        .exec()
        .arg(support::with_vmm(VMRUN))
        .arg("boot")
        .arg("--kernel")
        .arg(kernel())
        .args(["--cmdline", "console=ttyS0 reboot=k panic=1 root=/dev/vda rw init=/init", "--memory", "128"])
        .arg("--disk")
        .arg(&rootfs)
        .arg("--disk")
        .arg(format!("{},id=data-disk", data.display()))
        .arg("--disk")
        .arg(format!("{},ro", ro.display()))
        .arg("--vsock")
        .arg(format!("cid={GUEST_CID},uds={}", uds.display()))
        .arg("--net")
        .arg(format!("tap={TAP},mac=06:00:ac:1e:4d:02"))
        .arg("--console")
        .arg(&console)
        .stdin(Stdio::null())
        .spawn()
        .unwrap());

    let boot = Duration::from_secs(600);
    wait_for(&console, "CHECK net-up", &mut vmm.0, boot);
    run_ok(ns.exec().args(["busybox", "ping", "-c", "1", "-W", "20", GUEST_IP]));
    wait_for(&console, "listening on vsock port 5000", &mut vmm.0, boot);
    let mut s = UnixStream::connect(&uds).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    s.write_all(b"CONNECT 5000\n").unwrap();
    let mut line = String::new();
    BufReader::new(s.try_clone().unwrap()).read_line(&mut line).unwrap();
    assert!(line.starts_with("OK "), "handshake answer: {line:?}");
    s.write_all(b"hello-from-host").unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut back = String::new();
    s.read_to_string(&mut back).unwrap();
    assert_eq!(back, "hello-from-host");

    let t = Instant::now();
    let status = loop {
        if let Some(st) = vmm.try_wait().unwrap() {
            break st;
        }
        assert!(t.elapsed() < boot, "the guest did not shut down");
        std::thread::sleep(Duration::from_millis(500));
    };
    let log = std::fs::read_to_string(&console).unwrap();
    assert!(status.success(), "vmrun: {status}; console:\n{log}");

    assert_eq!(check(&log, "root-fs"), "ext4");
    assert_eq!(check(&log, "data-sha256"), data_sha, "the guest read other bytes than the host wrote");
    assert_eq!(check(&log, "data-serial"), "data-disk");
    assert_eq!(check(&log, "ro-flag"), "1");
    assert_eq!(check(&log, "ro-write"), "refused");
    assert!(check(&log, "rng").starts_with("virtio_rng"), "{log}");
    assert_eq!(check(&log, "vsock-echo"), "ping-from-guest");
    assert_eq!(check(&log, "vsock-bulk"), format!("{BULK_BYTES}-intact"));
    assert_eq!(check(&log, "guest-ping"), "ok");
    assert!(log.contains("CHECK vsock-listen-done"));
    assert_eq!(echo_thread.join().unwrap(), b"ping-from-guest");
    bulk_thread.join().unwrap();

    let written = std::fs::read(&data).unwrap();
    assert_eq!(&written[512..528], b"written-by-guest", "the guest's write did not reach the disk image");
    assert_eq!(&written[..512], &pattern(1 << 20, 7)[..512], "sector 0 changed");

    let mut tcp_out = String::new();
    tcp.stdout.take().unwrap().read_to_string(&mut tcp_out).unwrap();
    let _ = tcp.wait();
    assert_eq!(tcp_out.trim(), "tcp-from-guest");
}

fn running_as_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}
