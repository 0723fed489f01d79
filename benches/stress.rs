//! The leak test at scale: `STRESS_IN_A_ROW` sandboxes (default 100) started
//! and removed one after another, then `STRESS_AT_ONCE` (default 20) at
//! once with TAP networks; prints the time of each part, the VMM's resident
//! memory over the sequence (it must stay flat), and what is left behind
//! (it must be nothing: processes, TAP devices, mounts, cgroups, sockets,
//! files in the data directory, open file descriptors).
//!
//! `cargo bench -p vmrun --bench stress` (root: TAP devices).

#![allow(clippy::unwrap_used)] // a benchmark: any failure aborts it

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::Instant;

use support::sandboxes::{Leftovers, Sandboxes};

fn rss_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Rss:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn main() {
    let (in_a_row, at_once): (usize, usize) = (support::env_or("STRESS_IN_A_ROW", 100), support::env_or("STRESS_AT_ONCE", 20));
    let s = Sandboxes::new(env!("CARGO_BIN_EXE_vmrun"), "stress-home");
    eprintln!("warming up (templates)...");
    s.warm_up();
    let before = Leftovers::now(&s.home);

    let t = Instant::now();
    let mut rss = Vec::new();
    for i in 0..in_a_row {
        let id = s.detached(&["busybox", "sh", "-c", "echo up; sleep 100000"], false);
        let o = s.ok(&["exec", &id, "echo", "alive"]);
        assert_eq!(String::from_utf8_lossy(&o.stdout), "alive\n");
        // The VMM proper: with the jail, the recorded pid is its outer
        // process and the VMM is that process's child.
        let pid = s.vmm_pid(&id);
        let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
        let vmm = children.split_whitespace().next().and_then(|c| c.parse().ok()).unwrap_or(pid);
        rss.push(rss_kib(vmm));
        s.ok(&["rm", "-f", &id]);
        if (i + 1) % 10 == 0 {
            eprintln!("{} in a row...", i + 1);
        }
    }
    let row_secs = t.elapsed().as_secs_f64();
    // Printed at once: the part at once may still fail.
    println!("stress: sandboxes started, used (exec) and removed\n");
    println!("{in_a_row} in a row:           {row_secs:>8.1} s ({:.2} s each)", row_secs / in_a_row.max(1) as f64);
    let n = rss.len().clamp(1, 5);
    let avg = |v: &[u64]| v.iter().sum::<u64>() / v.len().max(1) as u64;
    println!("VMM RSS, first {n} runs: {:>8} KiB on average", avg(&rss[..n.min(rss.len())]));
    println!("VMM RSS, last {n} runs:  {:>8} KiB on average", avg(&rss[rss.len().saturating_sub(n)..]));

    let t = Instant::now();
    s.at_once(at_once, true);
    let once_secs = t.elapsed().as_secs_f64();
    let after = Leftovers::now(&s.home);
    println!("{at_once} at once (TAP):      {once_secs:>8.1} s");
    let same = before == after;
    println!("leftovers: {}", if same { "none".to_string() } else { format!("\n{}", before.changes(&after)) });
    assert!(same, "sandboxes left something behind");
}
