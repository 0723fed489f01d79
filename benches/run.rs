//! `vmrun run busybox true` end to end: cold (a boot) against warm (a
//! restore of the template), side by side, plus the restore alone (VMM
//! start to the agent answering).
//!
//! `cargo bench -p vmrun --bench run`. Uses `VMRUN_TEST_KERNEL` /
//! `VMRUN_AGENT_INITRD` like the tests (built when unset) and a scratch
//! `VMRUN_HOME`; `RUN_BENCH_WARM` warm runs (default 3).

#![allow(clippy::unwrap_used)] // a benchmark: any failure aborts it

#[path = "../tests/support/mod.rs"]
mod support;

use std::process::{Command, Stdio};
use std::time::Instant;

const VMRUN: &str = env!("CARGO_BIN_EXE_vmrun");

fn main() {
    let warm_runs: usize = std::env::var("RUN_BENCH_WARM").ok().and_then(|v| v.parse().ok()).unwrap_or(3);
    let home = support::scratch("run-bench-home");
    let kernel = support::kernel().to_path_buf();
    let initrd = support::agent_initrd();
    let images = support::busybox_image();
    let vmrun = |args: &[&str]| {
        let t = Instant::now();
        let o = Command::new(VMRUN)
            .args(args)
            .env("VMRUN_HOME", &home)
            .env("VMRUN_KERNEL", &kernel)
            .env("VMRUN_AGENT_INITRD", &initrd)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(o.status.success(), "vmrun {args:?}: {}", String::from_utf8_lossy(&o.stderr));
        t.elapsed().as_secs_f64()
    };
    vmrun(&["load", "-i", images.join("busybox-oci.tar").to_str().unwrap()]);
    println!("vmrun run busybox true, end to end (seconds)\n");
    let cold = vmrun(&["run", "--cold", "busybox", "true"]);
    println!("cold (boot)                    {cold:>8.2}");
    let first = vmrun(&["run", "busybox", "true"]);
    println!("first warm (builds template)   {first:>8.2}");
    let mut warm = Vec::new();
    for i in 0..warm_runs {
        let t = vmrun(&["run", "busybox", "true"]);
        println!("warm run {}                     {t:>8.2}", i + 1);
        warm.push(t);
    }
    warm.sort_by(f64::total_cmp);
    let median = warm[warm.len() / 2];
    println!("\nwarm median {median:.2} s: {:.1} times faster than cold", cold / median);
}
