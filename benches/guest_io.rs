//! Guest I/O benchmark: one guest measures virtio-vsock throughput (guest to
//! host) and round-trip latency, and virtio-blk sequential read and write
//! throughput, with the VMM's host CPU time per GiB moved.
//!
//! Where guest kernel mode is emulated (kvm_pvm) the guest's kernel, not
//! the VMM, is the bottleneck: compare with the device-side microbenchmark
//! (`cargo bench -p vmrun-devices --bench virtio_devices`) to see the VMM's
//! own share.
//!
//! `cargo bench -p vmrun --bench guest_io`; `GUEST_IO_MIB` (default 16)
//! sets the bytes moved per measurement.

#![allow(clippy::unwrap_used)] // a benchmark: any failure aborts it

#[path = "../tests/support/mod.rs"]
mod support;

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const VMRUN: &str = env!("CARGO_BIN_EXE_vmrun");
const PINGS: u32 = 200;

/// CPU seconds (user + system) process `pid` has used.
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
    // utime and stime are fields 14 and 15; after ')' they are at 11 and 12.
    let ticks: f64 = fields.get(11..13).map_or(0.0, |f| f.iter().filter_map(|v| v.parse::<f64>().ok()).sum());
    // SAFETY: sysconf has no preconditions.
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

fn wait_for(console: &Path, needle: &str, timeout: Duration) -> Instant {
    let start = Instant::now();
    loop {
        if std::fs::read_to_string(console).unwrap_or_default().contains(needle) {
            return Instant::now();
        }
        assert!(start.elapsed() < timeout, "no {needle:?} on the console after {timeout:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn main() {
    let mib: usize = support::env_or("GUEST_IO_MIB", 16);
    let dir = support::scratch("guest-io");
    std::fs::create_dir_all(&dir).unwrap();
    let init = format!(
        r#"#!/bin/busybox sh
export PATH=/bin
busybox mount -t proc proc /proc
busybox mount -t devtmpfs dev /dev
echo PHASE vsock-bulk
probe bulk 7001 {bytes}
echo PHASE vsock-ping
probe pingpong 7002 {PINGS}
echo PHASE blk-read-start
busybox dd if=/dev/vdb of=/dev/null bs=1M count={mib} iflag=direct 2>/dev/null
echo PHASE blk-read-end
echo PHASE blk-write-start
busybox dd if=/dev/zero of=/dev/vdb bs=1M count={mib} oflag=direct 2>/dev/null
echo PHASE blk-write-end
busybox reboot -f
"#,
        bytes = mib << 20
    );
    let rootfs = support::guest_rootfs(&dir, &init);
    let data = dir.join("data.raw");
    std::fs::write(&data, vec![0x5au8; mib << 20]).unwrap();
    let uds = dir.join("vsock.sock");
    let console = dir.join("console.log");

    let bulk = UnixListener::bind(format!("{}_7001", uds.display())).unwrap();
    let ping = UnixListener::bind(format!("{}_7002", uds.display())).unwrap();

    let mut vmm = support::Reaped(
        Command::new(support::with_vmm(VMRUN))
            .args(["boot", "--kernel"])
            .arg(support::kernel())
            .args(["--cmdline", "console=ttyS0 reboot=k panic=1 root=/dev/vda rw init=/init"])
            .arg("--disk")
            .arg(&rootfs)
            .arg("--disk")
            .arg(&data)
            .arg("--vsock")
            .arg(format!("cid=3,uds={}", uds.display()))
            .arg("--console")
            .arg(&console)
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let pid = vmm.id();
    let gib = mib as f64 / 1024.0;
    println!("guest I/O benchmark: {mib} MiB per measurement, kernel {}", support::kernel().display());
    println!("(booting the guest first; about a minute where guest kernel mode is emulated)\n");

    // vsock throughput, guest to host.
    let (mut s, _) = bulk.accept().unwrap();
    let (t0, c0) = (Instant::now(), cpu_secs(pid));
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0usize;
    loop {
        let n = s.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        total += n;
    }
    let (secs, cpu) = (t0.elapsed().as_secs_f64(), cpu_secs(pid) - c0);
    s.write_all(b"done").unwrap();
    drop(s);
    assert_eq!(total, mib << 20);
    println!(
        "vsock guest->host   {:>9.2} MiB/s   VMM CPU {:>8.1} s/GiB",
        mib as f64 / secs,
        cpu / gib
    );

    // vsock round trips.
    let (mut s, _) = ping.accept().unwrap();
    let mut b = [0u8; 1];
    let mut first = None;
    for i in 0..PINGS {
        s.read_exact(&mut b).unwrap();
        if i == 1 {
            first = Some(Instant::now());
        }
        s.write_all(&b).unwrap();
    }
    let rtt = first.map(|f| f.elapsed().as_secs_f64() / f64::from(PINGS - 2)).unwrap_or(f64::NAN);
    println!("vsock round trip    {:>9.3} ms (host's view, {PINGS} one-byte pings)", rtt * 1000.0);

    // virtio-blk, timed by the console markers.
    let timeout = Duration::from_secs(1200);
    let r0 = wait_for(&console, "PHASE blk-read-start", timeout);
    let rc0 = cpu_secs(pid);
    let r1 = wait_for(&console, "PHASE blk-read-end", timeout);
    let rc1 = cpu_secs(pid);
    println!(
        "virtio-blk read     {:>9.2} MiB/s   VMM CPU {:>8.1} s/GiB",
        mib as f64 / (r1 - r0).as_secs_f64(),
        (rc1 - rc0) / gib
    );
    let w0 = wait_for(&console, "PHASE blk-write-start", timeout);
    let wc0 = cpu_secs(pid);
    let w1 = wait_for(&console, "PHASE blk-write-end", timeout);
    let wc1 = cpu_secs(pid);
    println!(
        "virtio-blk write    {:>9.2} MiB/s   VMM CPU {:>8.1} s/GiB",
        mib as f64 / (w1 - w0).as_secs_f64(),
        (wc1 - wc0) / gib
    );
    let status = vmm.wait().unwrap();
    assert!(status.success(), "the guest did not end cleanly: {status}");
    println!("\nVMM CPU includes the host compatibility layer's work (syscall trap, assists) where it is on.");
}
