//! `vmrun run IMAGE true` end to end, split into its phases, for the
//! busybox image and (where it can be built: root and debootstrap) the
//! Debian one: cold (a boot), the first warm run (restores the base
//! template, unpacks the image and saves the image's prepared template),
//! warm runs (restore the prepared template: the image is unpacked
//! already), and pooled runs (`vmrun pool --size 1` serving the image: a
//! run takes a VM restored ahead of it, each once the pool is full again).
//! The "guest to agent ready" phase of a warm run is the restore alone:
//! VMM start to the agent's connection accepted (its hello, sent then,
//! is answered with the first request, in the next phase); a pooled
//! run's "VM claimed" phase
//! counts the guest's instructions since that VM's restore (its wait in
//! the pool included). It also prints what a pooled VM costs while it
//! waits: resident memory and emulated instructions per second. A
//! pooled run's host CPU is vmrun's own until it has claimed the VM (the
//! VM's was spent before the run).
//!
//! Beside each phase's time it prints the guest instructions KVM emulated
//! in it (the VMM's stats, read by `vmrun run` at each phase's end: on a
//! host that emulates guest kernel mode, the guest kernel's work, a count
//! that does not depend on the machine's speed; "-" where no VM of the run
//! ran, or after it stopped), then the host CPU a run spent from its start
//! until its VM's vCPUs ran (vmrun's and its VMM's, taken when the VMM says
//! it is ready; a first warm run's includes the base template's boot), and
//! last, `runc run` of a busybox `true` on the same machine when runc is
//! installed, the baseline of a container without a VM.
//!
//! `cargo bench -p vmrun --bench run`. Uses `VMRUN_TEST_KERNEL` /
//! `VMRUN_AGENT_INITRD` like the tests (built when unset) and a scratch
//! `VMRUN_HOME`; `RUN_BENCH_WARM` warm runs per image (default 3);
//! `RUN_BENCH_IMAGES` (default `busybox,debian`); `RUN_BENCH_TEMPLATE_AGE`
//! seconds to wait after the first warm run (default 0), so that the warm
//! and pooled runs restore templates of that age, as a host that keeps
//! its templates does (a restored guest's clock jumps by its template's
//! age where the host cannot offset its TSC, and the periodic timers due
//! meanwhile fire at the restore).

#![allow(clippy::unwrap_used)] // a benchmark: any failure aborts it

#[path = "../tests/support/mod.rs"]
mod support;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const VMRUN: &str = env!("CARGO_BIN_EXE_vmrun");

/// The phases `vmrun run` reports with `VMRUN_LOG=debug`, in order.
const PHASES: [&str; 11] = [
    "store lookup",
    "layer disk",
    "VM start",
    "guest to agent ready",
    "VM claimed from the pool",
    "unpack",
    "container set up and held",
    "prepared template saved",
    "process run",
    "teardown",
    "total (wall clock)",
];

/// One phase of one run: milliseconds, and the guest instructions emulated
/// in it where a VM ran.
#[derive(Debug, Clone, Copy, Default)]
struct Phase {
    ms: Option<f64>,
    insns: Option<u64>,
}

/// One run: its phases (the last is the wall-clock total, with the guest's
/// instructions summed over the phases), and the host CPU milliseconds
/// spent from its start until its VM's vCPUs ran (`host CPU until the guest
/// ran N ms` on the line of the phase that reached the agent: vmrun's and
/// the VMM's).
#[derive(Debug, Clone, Copy)]
struct Timing {
    phases: [Phase; PHASES.len()],
    host_cpu_ms: Option<f64>,
}

/// Reads the `host CPU until the guest ran N ms` of a phase line (a
/// pooled run's: `host CPU until the VM was claimed N ms`).
fn parse_host_cpu(line: &str) -> Option<f64> {
    let rest = line.split("; host CPU until the guest ran ").nth(1).or_else(|| line.split("; host CPU until the VM was claimed ").nth(1))?;
    rest.split(' ').next()?.parse().ok()
}

/// Reads `phase NAME: MS ms[; N guest instructions emulated, M exits]`.
fn parse_phase(line: &str) -> Option<(&str, f64, Option<u64>)> {
    let rest = line.split("phase ").nth(1)?;
    let (name, figures) = rest.split_once(": ")?;
    let name = name.split(" (").next().unwrap_or(name);
    let (time, guest) = match figures.split_once("; ") {
        Some((t, g)) => (t, Some(g)),
        None => (figures, None),
    };
    let ms = time.trim_end_matches(" ms").parse::<f64>().ok()?;
    let insns = guest.and_then(|g| g.split(' ').next()).and_then(|n| n.parse::<u64>().ok());
    Some((name, ms, insns))
}

/// `vmrun ARGS` on the benchmark's data directory, kernel and agent.
fn vmrun(home: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(VMRUN);
    c.args(args)
        .env("VMRUN_HOME", home)
        .env("VMRUN_KERNEL", support::kernel())
        .env("VMRUN_AGENT_INITRD", support::agent_initrd())
        .stdin(Stdio::null());
    c
}

fn run(home: &Path, args: &[&str]) -> Timing {
    // The command (the kernel's and agent's paths found) before the clock.
    let mut cmd = vmrun(home, args);
    cmd.env("VMRUN_LOG", "debug");
    let t = Instant::now();
    let o = cmd.output().unwrap();
    let total = t.elapsed().as_secs_f64() * 1000.0;
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "vmrun {args:?}: {err}");
    let mut timing = [Phase::default(); PHASES.len()];
    let host_cpu_ms = err.lines().find_map(parse_host_cpu);
    for (name, ms, insns) in err.lines().filter_map(parse_phase) {
        if let Some(i) = PHASES.iter().position(|p| *p == name) {
            let p = &mut timing[i];
            p.ms = Some(p.ms.unwrap_or(0.0) + ms);
            if let Some(n) = insns {
                p.insns = Some(p.insns.unwrap_or(0) + n);
            }
        }
    }
    let last = PHASES.len() - 1;
    let guest: Vec<u64> = timing[..last].iter().filter_map(|p| p.insns).collect();
    timing[last] = Phase { ms: Some(total), insns: (!guest.is_empty()).then(|| guest.iter().sum()) };
    Timing { phases: timing, host_cpu_ms }
}

fn median<T: Copy + PartialOrd>(mut v: Vec<T>) -> Option<T> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    Some(v[v.len() / 2])
}

fn median_phase(runs: &[Timing], phase: usize) -> Phase {
    Phase {
        ms: median(runs.iter().filter_map(|r| r.phases[phase].ms).collect()),
        insns: median(runs.iter().filter_map(|r| r.phases[phase].insns).collect()),
    }
}

fn cell(p: Phase) -> String {
    let time = match p.ms {
        None => "-".into(),
        Some(ms) if ms >= 10_000.0 => format!("{:.1} s", ms / 1000.0),
        Some(ms) => format!("{ms:.0} ms"),
    };
    let insns = match p.insns {
        None => "-".into(),
        Some(n) if n >= 1_000_000 => format!("{:.1}M", n as f64 / 1e6),
        Some(n) if n >= 1_000 => format!("{:.0}k", n as f64 / 1e3),
        Some(n) => n.to_string(),
    };
    format!("{time} / {insns}")
}

fn bench_image(home: &Path, label: &str, archive: &Path, reference: &str, warm_runs: usize, template_age: Duration) {
    let o = Command::new(VMRUN).args(["load", "-i"]).arg(archive).env("VMRUN_HOME", home).output().unwrap();
    assert!(o.status.success(), "load: {}", String::from_utf8_lossy(&o.stderr));
    // No network, as `runc run` of the baseline has none: the default NAT
    // network (as root) would add its link and rules to every run.
    eprintln!("{label}: cold run (a boot)...");
    let cold = run(home, &["run", "--network", "none", "--cold", reference, "true"]);
    eprintln!("{label}: first warm run (template, unpack, prepared template)...");
    let first = run(home, &["run", "--network", "none", reference, "true"]);
    if !template_age.is_zero() {
        eprintln!("{label}: waiting {} s for the templates to age...", template_age.as_secs());
        std::thread::sleep(template_age);
    }
    let warm: Vec<Timing> = (0..warm_runs)
        .map(|i| {
            eprintln!("{label}: warm run {}...", i + 1);
            run(home, &["run", "--network", "none", reference, "true"])
        })
        .collect();
    let (pooled, idle) = pooled_runs(home, label, reference, warm_runs);
    let aged = if template_age.is_zero() { String::new() } else { format!(", templates {} s old", template_age.as_secs()) };
    println!("\nvmrun run {label} true, by phase: time / guest instructions emulated ({warm_runs} warm and pooled runs, median{aged})\n");
    println!("{:<40}{:>18}{:>18}{:>18}{:>18}", "phase", "cold", "first warm", "warm", "pooled");
    let warm_median: Vec<Phase> = (0..PHASES.len()).map(|i| median_phase(&warm, i)).collect();
    let pooled_median: Vec<Phase> = (0..PHASES.len()).map(|i| median_phase(&pooled, i)).collect();
    for (i, p) in PHASES.iter().enumerate() {
        println!(
            "{p:<40}{:>18}{:>18}{:>18}{:>18}",
            cell(cold.phases[i]),
            cell(first.phases[i]),
            cell(warm_median[i]),
            cell(pooled_median[i])
        );
    }
    let cpu = |ms: Option<f64>| ms.map_or_else(|| "-".into(), |ms| format!("{ms:.1} ms"));
    let warm_cpu = median(warm.iter().filter_map(|r| r.host_cpu_ms).collect());
    let pooled_cpu = median(pooled.iter().filter_map(|r| r.host_cpu_ms).collect());
    println!(
        "{:<40}{:>18}{:>18}{:>18}{:>18}",
        "host CPU to the guest (pooled: claim)",
        cpu(cold.host_cpu_ms),
        cpu(first.host_cpu_ms),
        cpu(warm_cpu),
        cpu(pooled_cpu)
    );
    println!("\n{idle}");
    let last = PHASES.len() - 1;
    if let (Some(c), Some(w)) = (cold.phases[last].ms, warm_median[last].ms) {
        println!("warm is {:.1} times faster than cold end to end", c / w);
    }
    if let (Some(c), Some(p)) = (cold.phases[last].ms, pooled_median[last].ms) {
        println!("pooled is {:.1} times faster than cold end to end", c / p);
    }
    if label == "busybox" {
        if let (Some(r), Some(w), Some(p)) = (runc_true(warm_runs.max(3)), warm_median[last].ms, pooled_median[last].ms) {
            println!("runc run of busybox true: {r:.0} ms (median); warm vmrun is {:.1} times runc, pooled {:.1} times", w / r, p / r);
        }
    }
}

/// `runs` runs of `reference` with `vmrun pool --size 1` serving it, each
/// once the pool is full again, and a line on what a pooled VM costs while
/// it waits: the VMM's resident memory and the guest's emulated
/// instructions per second, over 5 s of waiting.
fn pooled_runs(home: &Path, label: &str, reference: &str, runs: usize) -> (Vec<Timing>, String) {
    use std::io::BufRead;
    let mut keeper = support::Reaped(vmrun(home, &["pool", "--size", "1", "--network", "none", reference]).stderr(Stdio::piped()).spawn().unwrap());
    let mut lines = std::io::BufReader::new(keeper.0.stderr.take().unwrap()).lines().map_while(Result::ok);
    let pool = lines.find_map(|l| l.split_once(" VMs of ").and_then(|(_, r)| r.split_once(" at ")).map(|(_, d)| std::path::PathBuf::from(d))).unwrap();
    std::thread::spawn(move || lines.for_each(drop));
    let wait_full = || {
        let o = vmrun(home, &["pool", "--status", "--wait", "--network", "none", reference]).output().unwrap();
        assert!(o.status.success(), "vmrun pool --status: {}", String::from_utf8_lossy(&o.stderr));
    };
    wait_full();
    let vm = std::fs::read_dir(&pool).unwrap().flatten().map(|e| e.path()).find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("vm-"))).unwrap();
    let stats = || vmrun_vmm_api::request(&vmrun_runtime::vm::Layout::of(&vm).control(), &vmrun_vmm_api::Request::Stats, Duration::from_secs(10)).unwrap().stats.unwrap();
    let (before, t) = (stats(), Instant::now());
    std::thread::sleep(Duration::from_secs(5));
    let after = stats();
    let per_s = (after.insn_emulation().unwrap_or(0) - before.insn_emulation().unwrap_or(0)) as f64 / t.elapsed().as_secs_f64();
    let idle = format!(
        "a pooled VM while it waits: VMM resident {:.0} MiB ({:.0} MiB of it guest memory), {per_s:.0} guest instructions emulated per second",
        after.rss_kib.unwrap_or(0) as f64 / 1024.0,
        after.guest_rss_kib.unwrap_or(0) as f64 / 1024.0
    );
    let timings = (0..runs)
        .map(|i| {
            wait_full();
            eprintln!("{label}: pooled run {}...", i + 1);
            let t = run(home, &["run", "--network", "none", reference, "true"]);
            assert!(t.phases[4].ms.is_some(), "pooled run {}: no VM came from the pool", i + 1);
            t
        })
        .collect();
    // SAFETY: kill of our own child, not yet reaped.
    unsafe { libc::kill(keeper.0.id() as i32, libc::SIGTERM) };
    keeper.0.wait().unwrap();
    (timings, idle)
}

/// `runc run` of a busybox `true` (the host's static busybox in a bundle
/// of its own), `runs` times: the median in milliseconds, or `None`
/// without runc or root.
fn runc_true(runs: usize) -> Option<f64> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 || Command::new("runc").arg("--version").output().is_err() {
        eprintln!("runc baseline: skipped (needs runc and root)");
        return None;
    }
    let bundle = support::scratch("run-bench-runc");
    let rootfs = bundle.join("rootfs");
    std::fs::create_dir_all(rootfs.join("bin")).unwrap();
    let busybox = ["/bin/busybox", "/usr/bin/busybox"].into_iter().find(|p| Path::new(p).is_file())?;
    std::fs::copy(busybox, rootfs.join("bin/busybox")).unwrap();
    std::os::unix::fs::symlink("busybox", rootfs.join("bin/true")).unwrap();
    let o = Command::new("runc").arg("spec").arg("--bundle").arg(&bundle).output().unwrap();
    assert!(o.status.success(), "runc spec: {}", String::from_utf8_lossy(&o.stderr));
    let config = bundle.join("config.json");
    let mut spec: serde_json::Value = serde_json::from_slice(&std::fs::read(&config).unwrap()).unwrap();
    spec["process"]["terminal"] = false.into();
    spec["process"]["args"] = serde_json::json!(["/bin/true"]);
    std::fs::write(&config, serde_json::to_vec(&spec).unwrap()).unwrap();
    let times = (0..runs)
        .map(|i| {
            let t = Instant::now();
            let o = Command::new("runc")
                .args(["run", "--bundle"])
                .arg(&bundle)
                .arg(format!("vmrun-bench-{}-{i}", std::process::id()))
                .stdin(Stdio::null())
                .output()
                .unwrap();
            assert!(o.status.success(), "runc run: {}", String::from_utf8_lossy(&o.stderr));
            t.elapsed().as_secs_f64() * 1000.0
        })
        .collect();
    median(times)
}

fn main() {
    support::build_vmm(VMRUN);
    let warm_runs: usize = support::env_or("RUN_BENCH_WARM", 3);
    let images = std::env::var("RUN_BENCH_IMAGES").unwrap_or_else(|_| "busybox,debian".into());
    let template_age = Duration::from_secs(support::env_or("RUN_BENCH_TEMPLATE_AGE", 0));
    let home = support::scratch("run-bench-home");
    for image in images.split(',') {
        match image {
            "busybox" => bench_image(&home, "busybox", &support::busybox_image().join("busybox-oci.tar"), "busybox:latest", warm_runs, template_age),
            // SAFETY: geteuid has no preconditions.
            "debian" if unsafe { libc::geteuid() } != 0 => eprintln!("debian: skipped (debootstrap needs root)"),
            "debian" => bench_image(&home, "debian", &support::debian_image().join("debian-oci.tar"), "debian:bookworm", warm_runs, template_age),
            other => panic!("unknown image {other:?} in RUN_BENCH_IMAGES (busybox, debian)"),
        }
    }
}
