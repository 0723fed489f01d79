//! Density: N idle VMs whose agent waits for work, restored from the
//! warm-start template, against N cold-booted ones. Prints each group's
//! resident memory (RSS) and proportional share (PSS: pages shared between
//! VMs, such as the template's memory file mapped copy-on-write, are split
//! between them), and the host CPU the idle VMs take (an idle guest should
//! take none: where its kernel is emulated, every timer tick is costly).
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

/// CPU time of process `pid` (all its threads) in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces): utime and
    // stime are the 12th and 13th.
    let rest = text.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let f: Vec<u64> = rest.split_whitespace().filter_map(|x| x.parse().ok()).collect();
    f.get(10).copied().unwrap_or(0) + f.get(11).copied().unwrap_or(0)
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

/// What a group of idle VMs took: RSS and PSS in KiB (all VMs), seconds
/// until every agent answered, and host CPU per VM while idle (percent of
/// one CPU).
struct Group {
    rss: u64,
    pss: u64,
    ready: f64,
    idle_cpu: f64,
}

fn group(name: &str, n: usize, dir: &Path, spawn: &dyn Fn(&Path) -> Command) -> Group {
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
    let idle = Duration::from_secs(10);
    let before: u64 = vms.iter().map(|(vm, _)| cpu_ticks(vm.id())).sum();
    std::thread::sleep(idle);
    let after: u64 = vms.iter().map(|(vm, _)| cpu_ticks(vm.id())).sum();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let idle_cpu = (after - before) as f64 / hz / idle.as_secs_f64() / n.max(1) as f64 * 100.0;
    Group { rss, pss, ready, idle_cpu }
}

fn main() {
    support::build_vmm(VMRUN);
    let n: usize = support::env_or("DENSITY_VMS", 10);
    let home = support::scratch("density-home");
    let kernel = support::kernel().to_path_buf();
    let initrd = support::agent_initrd();
    let images = support::busybox_image();
    let vmrun = |args: &[&str]| {
        let o = Command::new(support::with_vmm(VMRUN))
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
        let mut c = Command::new(support::with_vmm(VMRUN));
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
    report("restored", &restored, n);
    let cold = group("cold", n, &dir, &|d| {
        let mut c = Command::new(support::with_vmm(VMRUN));
        c.args(["boot", "--memory", "512", "--cmdline", "console=ttyS0 reboot=k panic=1 quiet vmrun.port=1024"])
            .arg("--kernel")
            .arg(support::kernel_for(1))
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
    report("cold", &cold, n);
}

fn report(name: &str, g: &Group, n: usize) {
    println!(
        "{:<9} {:>8} KiB RSS, {:>8} KiB PSS in all ({:>6} KiB PSS per VM), agents ready after {:.1} s, idle: {:.1}% of a host CPU per VM",
        format!("{name}:"),
        g.rss,
        g.pss,
        g.pss / n.max(1) as u64,
        g.ready,
        g.idle_cpu
    );
}
