//! Memory density: N idle VMs whose agent waits for work, restored from the
//! warm-start template, against N cold-booted ones. Prints each group's
//! resident memory (RSS) and proportional share (PSS: pages shared between
//! VMs, such as the template's memory file mapped copy-on-write, are split
//! between them).
//!
//! `cargo bench -p vmrun --bench density`; `DENSITY_VMS` (default 10).
//! The cold group boots N guests at once: minutes where guest kernel mode
//! is emulated.

#![allow(clippy::unwrap_used)] // a benchmark: any failure aborts it

#[path = "../tests/support/mod.rs"]
mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const VMRUN: &str = env!("CARGO_BIN_EXE_vmrun");

/// (Rss, Pss) of process `pid` in KiB.
fn memory_kib(pid: u32) -> (u64, u64) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    (field("Rss:"), field("Pss:"))
}

/// Waits until the agent behind `uds` answers a vsock CONNECT.
fn wait_agent(uds: &Path, timeout: Duration) {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if uds.exists() && vmrun_agent_client::hybrid_vsock_connect(uds, 1024, Duration::from_secs(5)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    panic!("no agent behind {} after {timeout:?}", uds.display());
}

fn group(name: &str, n: usize, dir: &Path, spawn: &dyn Fn(&Path) -> Command) -> (u64, u64, f64) {
    let t = Instant::now();
    let vms: Vec<(support::Reaped, PathBuf)> = (0..n)
        .map(|i| {
            let d = dir.join(format!("{name}-{i}"));
            std::fs::create_dir_all(&d).unwrap();
            let child = spawn(&d).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
            (support::Reaped(child), d.join("vsock.sock"))
        })
        .collect();
    for (_, uds) in &vms {
        wait_agent(uds, Duration::from_secs(1800));
    }
    let ready = t.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_secs(2));
    let (mut rss, mut pss) = (0, 0);
    for (vm, _) in &vms {
        let (r, p) = memory_kib(vm.id());
        rss += r;
        pss += p;
    }
    (rss, pss, ready)
}

fn main() {
    let n: usize = std::env::var("DENSITY_VMS").ok().and_then(|v| v.parse().ok()).unwrap_or(10);
    let home = support::scratch("density-home");
    let kernel = support::kernel().to_path_buf();
    let initrd = support::agent_initrd();
    let images = support::busybox_image();
    let vmrun = |args: &[&str]| {
        let o = Command::new(VMRUN)
            .args(args)
            .env("VMRUN_HOME", &home)
            .env("VMRUN_KERNEL", &kernel)
            .env("VMRUN_AGENT_INITRD", &initrd)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(o.status.success(), "vmrun {args:?}: {}", String::from_utf8_lossy(&o.stderr));
    };
    vmrun(&["load", "-i", images.join("busybox-oci.tar").to_str().unwrap()]);
    vmrun(&["run", "busybox", "true"]); // builds the base template
    let template = std::fs::read_dir(home.join("templates"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.is_dir() && !p.to_string_lossy().contains("-image-") && p.join("vmstate.json").is_file())
        .expect("a base template");
    let placeholder = home.join("placeholder.disk");
    std::fs::File::create(&placeholder).unwrap().set_len(4096).unwrap();
    let dir = support::scratch("density-vms");

    println!("{n} idle VMs (agent waiting), 512 MiB each, busybox placeholder disk\n");
    let restored = group("restored", n, &dir, &|d| {
        let mut c = Command::new(VMRUN);
        c.arg("restore")
            .arg("--snapshot")
            .arg(&template)
            .arg("--disk")
            .arg(&placeholder)
            // The template's empty volume slots.
            .args(["--disk", "/dev/null", "--disk", "/dev/null", "--disk", "/dev/null", "--disk", "/dev/null"])
            .arg("--vsock-uds")
            .arg(d.join("vsock.sock"))
            .arg("--console")
            .arg(d.join("console.log"));
        c
    });
    println!(
        "restored: {:>8} KiB RSS, {:>8} KiB PSS in all ({:>6} KiB PSS per VM), agents ready after {:.1} s",
        restored.0,
        restored.1,
        restored.1 / n as u64,
        restored.2
    );
    let cold = group("cold", n, &dir, &|d| {
        let mut c = Command::new(VMRUN);
        c.args(["boot", "--memory", "512", "--cmdline", "console=ttyS0 reboot=k panic=1 quiet vmrun.port=1024"])
            .arg("--kernel")
            .arg(&kernel)
            .arg("--initrd")
            .arg(&initrd)
            .arg("--disk")
            .arg(format!("{},ro", placeholder.display()))
            .arg("--vsock")
            .arg(format!("cid=3,uds={}", d.join("vsock.sock").display()))
            .arg("--console")
            .arg(d.join("console.log"));
        c
    });
    println!(
        "cold:     {:>8} KiB RSS, {:>8} KiB PSS in all ({:>6} KiB PSS per VM), agents ready after {:.1} s",
        cold.0,
        cold.1,
        cold.1 / n as u64,
        cold.2
    );
}
