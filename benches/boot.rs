//! Boot benchmark: boots the demo guest (busybox init that writes the boot
//! marker and reboots) with `vmrun boot --report` and prints, per run and as
//! medians: VMM start to the first guest instruction (wall and VMM CPU), to
//! the kernel's `Run /init`, to the boot marker; guest instructions KVM
//! emulated before init (hosts that emulate guest kernel mode only); and the
//! VMM's resident memory beyond guest memory.
//!
//! `cargo bench -p vmrun --bench boot`; `BOOT_BENCH_RUNS` (default 3),
//! `BOOT_BENCH_CPUS` (default 1), `BOOT_BENCH_MEMORY` (MiB, default 128).

#[path = "../tests/support/mod.rs"]
mod support;

use std::path::PathBuf;
use std::process::{Command, Stdio};

use serde_json::Value;

const VMRUN: &str = env!("CARGO_BIN_EXE_vmrun");

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

struct Run {
    first_wall: f64,
    first_cpu: f64,
    run_init: f64,
    marker: f64,
    insns_before_init: Option<u64>,
    insns_at_marker: Option<u64>,
    overhead_kib: Option<u64>,
    compat: bool,
}

/// The kernel `vmrun run` boots for `cpus` vCPUs (the uniprocessor build
/// for one); the SMP one when `cpus` is no number (`vmrun boot` refuses it).
fn kernel(cpus: &str) -> PathBuf {
    cpus.parse().map_or_else(|_| support::kernel().to_path_buf(), support::kernel_for)
}

fn boot_once(i: usize, cpus: &str, memory: &str) -> Run {
    let report = support::scratch(&format!("bench-report-{i}.json"));
    let console = support::scratch(&format!("bench-console-{i}.log"));
    let status = Command::new(support::with_vmm(VMRUN))
        .args(["boot", "--kernel"])
        .arg(kernel(cpus))
        .arg("--initrd")
        .arg(support::demo_initramfs())
        .args(["--cpus", cpus, "--memory", memory, "--console"])
        .arg(&console)
        .arg("--report")
        .arg(&report)
        .stdin(Stdio::null())
        .status()
        .expect("run vmrun");
    assert!(status.success(), "boot {i} failed ({status}); console in {}", console.display());
    let r: Value = serde_json::from_str(&std::fs::read_to_string(&report).expect("report")).expect("json");
    let wall = |k: &str| r[k]["wall_ms"].as_f64().unwrap_or_else(|| panic!("report lacks {k}: {r}"));
    Run {
        first_wall: wall("first_instruction"),
        first_cpu: r["first_instruction"]["vmm_cpu_ms"].as_f64().unwrap_or(f64::NAN),
        run_init: wall("run_init"),
        marker: wall("boot_marker"),
        insns_before_init: r["run_init"]["emulated_instructions"].as_u64(),
        insns_at_marker: r["boot_marker"]["emulated_instructions"].as_u64(),
        overhead_kib: r["vmm_overhead_rss_kib"].as_u64(),
        compat: r["host_compat"].as_bool().unwrap_or(false),
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn opt(v: Option<u64>) -> String {
    v.map(|x| x.to_string()).unwrap_or_else(|| "-".into())
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` passes nothing
    // we need to honour. Either way, one full run.
    let runs: usize = env_or("BOOT_BENCH_RUNS", "3").parse().expect("BOOT_BENCH_RUNS");
    let cpus = env_or("BOOT_BENCH_CPUS", "1");
    let memory = env_or("BOOT_BENCH_MEMORY", "128");
    let kvm_kind = if std::path::Path::new("/sys/module/kvm_pvm").exists() {
        "KVM emulating guest kernel mode (kvm_pvm)"
    } else {
        "hardware KVM"
    };
    println!("vmrun boot benchmark: {runs} run(s), {cpus} vCPU(s), {memory} MiB, {kvm_kind}");
    println!("kernel  {}", kernel(&cpus).display());
    println!();
    println!(
        "{:>3}  {:>12} {:>12} {:>12} {:>12} {:>14} {:>14} {:>10}",
        "run", "1st insn ms", "1st insn CPU", "Run /init ms", "marker ms", "insns<init", "insns<marker", "VMM RSS"
    );
    let mut all = Vec::new();
    for i in 0..runs {
        let r = boot_once(i, &cpus, &memory);
        println!(
            "{:>3}  {:>12.1} {:>12.1} {:>12.1} {:>12.1} {:>14} {:>14} {:>7} KiB",
            i + 1,
            r.first_wall,
            r.first_cpu,
            r.run_init,
            r.marker,
            opt(r.insns_before_init),
            opt(r.insns_at_marker),
            opt(r.overhead_kib)
        );
        all.push(r);
    }
    let m = |f: fn(&Run) -> f64| median(all.iter().map(f).collect());
    println!(
        "med  {:>12.1} {:>12.1} {:>12.1} {:>12.1} {:>14} {:>14} {:>7} KiB",
        m(|r| r.first_wall),
        m(|r| r.first_cpu),
        m(|r| r.run_init),
        m(|r| r.marker),
        opt(all.iter().filter_map(|r| r.insns_before_init).min()),
        opt(all.iter().filter_map(|r| r.insns_at_marker).min()),
        opt(all.iter().filter_map(|r| r.overhead_kib).max())
    );
    println!();
    println!(
        "1st insn: VMM start to the first KVM_RUN. Run /init, marker: VMM start to the kernel's \
         'Run /init' and to the init's boot marker. insns: guest instructions KVM emulated (min over \
         runs){}. VMM RSS: resident memory beyond guest memory, at the marker (max over runs).",
        if all.iter().any(|r| r.compat) { "" } else { "; only counted where guest kernel mode is emulated" }
    );
}
