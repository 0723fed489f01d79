//! `vmrun run IMAGE true` end to end, split into its phases, for the
//! busybox image and (where it can be built: root and debootstrap) the
//! Debian one: cold (a boot), the first warm run (restores the base
//! template, unpacks the image and saves the image's prepared template),
//! and warm runs (restore the prepared template: the image is unpacked
//! already). The "guest to agent ready" phase of a warm run is the restore
//! alone: VMM start to the agent answering.
//!
//! `cargo bench -p vmrun --bench run`. Uses `VMRUN_TEST_KERNEL` /
//! `VMRUN_AGENT_INITRD` like the tests (built when unset) and a scratch
//! `VMRUN_HOME`; `RUN_BENCH_WARM` warm runs per image (default 3);
//! `RUN_BENCH_IMAGES` (default `busybox,debian`).

#![allow(clippy::unwrap_used)] // a benchmark: any failure aborts it

#[path = "../tests/support/mod.rs"]
mod support;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

const VMRUN: &str = env!("CARGO_BIN_EXE_vmrun");

/// The phases `vmrun run` reports with `VMRUN_LOG=debug`, in order.
const PHASES: [&str; 9] = [
    "store lookup",
    "layer disk",
    "VM start",
    "guest to agent ready",
    "unpack",
    "prepared template saved",
    "process run",
    "teardown",
    "total (wall clock)",
];

/// One run: milliseconds per phase (the last is the wall-clock total).
type Timing = [Option<f64>; PHASES.len()];

fn run(home: &Path, args: &[&str]) -> Timing {
    let t = Instant::now();
    let o = Command::new(VMRUN)
        .args(args)
        .env("VMRUN_HOME", home)
        .env("VMRUN_KERNEL", support::kernel())
        .env("VMRUN_AGENT_INITRD", support::agent_initrd())
        .env("VMRUN_LOG", "debug")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let total = t.elapsed().as_secs_f64() * 1000.0;
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "vmrun {args:?}: {err}");
    let mut timing: Timing = [None; PHASES.len()];
    for line in err.lines() {
        let Some(rest) = line.split("phase ").nth(1) else { continue };
        let Some((name, ms)) = rest.rsplit_once(": ") else { continue };
        let name = name.split(" (").next().unwrap_or(name);
        let Ok(ms) = ms.trim_end_matches(" ms").parse::<f64>() else { continue };
        if let Some(i) = PHASES.iter().position(|p| *p == name) {
            timing[i] = Some(timing[i].unwrap_or(0.0) + ms);
        }
    }
    timing[PHASES.len() - 1] = Some(total);
    timing
}

fn median(runs: &[Timing], phase: usize) -> Option<f64> {
    let mut v: Vec<f64> = runs.iter().filter_map(|r| r[phase]).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    Some(v[v.len() / 2])
}

fn cell(ms: Option<f64>) -> String {
    match ms {
        None => "-".into(),
        Some(ms) if ms >= 10_000.0 => format!("{:.1} s", ms / 1000.0),
        Some(ms) => format!("{ms:.0} ms"),
    }
}

fn bench_image(home: &Path, label: &str, archive: &Path, reference: &str, warm_runs: usize) {
    let o = Command::new(VMRUN).args(["load", "-i"]).arg(archive).env("VMRUN_HOME", home).output().unwrap();
    assert!(o.status.success(), "load: {}", String::from_utf8_lossy(&o.stderr));
    eprintln!("{label}: cold run (a boot)...");
    let cold = run(home, &["run", "--cold", reference, "true"]);
    eprintln!("{label}: first warm run (template, unpack, prepared template)...");
    let first = run(home, &["run", reference, "true"]);
    let warm: Vec<Timing> = (0..warm_runs)
        .map(|i| {
            eprintln!("{label}: warm run {}...", i + 1);
            run(home, &["run", reference, "true"])
        })
        .collect();
    println!("\nvmrun run {label} true, by phase ({warm_runs} warm runs, median)\n");
    println!("{:<26}{:>12}{:>14}{:>12}", "phase", "cold", "first warm", "warm");
    for (i, p) in PHASES.iter().enumerate() {
        println!("{p:<26}{:>12}{:>14}{:>12}", cell(cold[i]), cell(first[i]), cell(median(&warm, i)));
    }
    let last = PHASES.len() - 1;
    if let (Some(c), Some(w)) = (cold[last], median(&warm, last)) {
        println!("\nwarm is {:.1} times faster than cold end to end", c / w);
    }
}

fn main() {
    support::build_vmm(VMRUN);
    let warm_runs: usize = std::env::var("RUN_BENCH_WARM").ok().and_then(|v| v.parse().ok()).unwrap_or(3);
    let images = std::env::var("RUN_BENCH_IMAGES").unwrap_or_else(|_| "busybox,debian".into());
    let home = support::scratch("run-bench-home");
    for image in images.split(',') {
        match image {
            "busybox" => bench_image(&home, "busybox", &support::busybox_image().join("busybox-oci.tar"), "busybox:latest", warm_runs),
            // SAFETY: geteuid has no preconditions.
            "debian" if unsafe { libc::geteuid() } != 0 => eprintln!("debian: skipped (debootstrap needs root)"),
            "debian" => bench_image(&home, "debian", &support::debian_image().join("debian-oci.tar"), "debian:bookworm", warm_runs),
            other => panic!("unknown image {other:?} in RUN_BENCH_IMAGES (busybox, debian)"),
        }
    }
}
