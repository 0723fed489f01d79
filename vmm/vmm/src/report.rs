//! The boot report: when things happened, measured from the VMM's start,
//! and what the boot cost. Written as JSON with `vmrun boot --report FILE`
//! and read by the boot benchmark.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

/// Milliseconds, as a float, for the report.
fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// CPU time (user + system) this process has used.
pub fn process_cpu_time() -> Duration {
    // SAFETY: getrusage writes into the zeroed struct it is given.
    let usage = unsafe {
        let mut u: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut u);
        u
    };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, (t.tv_usec as u32) * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// A moment of the boot.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct Milestone {
    /// Wall-clock milliseconds since the VMM started.
    pub wall_ms: f64,
    /// CPU milliseconds the VMM process had used by then.
    pub vmm_cpu_ms: f64,
    /// Guest instructions KVM had emulated by then, all vCPUs together
    /// (only meaningful where KVM emulates guest kernel mode).
    pub emulated_instructions: Option<u64>,
    /// vCPU exits by then.
    pub exits: Option<u64>,
}

/// Everything the report holds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct BootReport {
    /// The host compatibility layer was on.
    pub host_compat: bool,
    /// Guest memory in MiB.
    pub mem_mib: u32,
    /// Number of vCPUs.
    pub vcpus: u8,
    /// Just before the first `KVM_RUN` of the boot vCPU.
    pub first_instruction: Option<Milestone>,
    /// The kernel printed "Run /init as init process" (needs kernel messages
    /// on the console, i.e. no `quiet`).
    pub run_init: Option<Milestone>,
    /// The guest wrote the boot marker (first write).
    pub boot_marker: Option<Milestone>,
    /// Value of the first boot-marker write.
    pub boot_marker_value: Option<u64>,
    /// The VM ended.
    pub end: Option<Milestone>,
    /// How it ended.
    pub exit: String,
    /// Resident memory of the VMM process at the boot marker (or the end),
    /// minus what guest memory accounts for, in KiB.
    pub vmm_overhead_rss_kib: Option<u64>,
    /// Resident guest memory at that moment, in KiB.
    pub guest_rss_kib: Option<u64>,
}

/// Records milestones from any thread.
#[derive(Debug, Clone)]
pub struct Timeline {
    start: Instant,
    report: Arc<Mutex<BootReport>>,
}

impl Timeline {
    /// A timeline whose zero is `start` (the VMM's start).
    pub fn new(start: Instant) -> Self {
        Self { start, report: Arc::new(Mutex::new(BootReport::default())) }
    }

    /// A milestone now, with the given counters.
    pub fn now(&self, emulated_instructions: Option<u64>, exits: Option<u64>) -> Milestone {
        Milestone {
            wall_ms: ms(self.start.elapsed()),
            vmm_cpu_ms: ms(process_cpu_time()),
            emulated_instructions,
            exits,
        }
    }

    /// Changes the report.
    pub fn update(&self, f: impl FnOnce(&mut BootReport)) {
        let mut r = self.report.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut r);
    }

    /// A copy of the report so far.
    pub fn report(&self) -> BootReport {
        self.report.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// Resident memory of this process: (total, inside `ranges`) in KiB, from
/// `/proc/self/smaps`.
pub fn resident_kib(ranges: &[(u64, u64)]) -> Option<(u64, u64)> {
    let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
    Some(parse_smaps_rss(&smaps, ranges))
}

/// `/proc/self/smaps`, opened once and read from its start each time: a
/// thread whose seccomp filter forbids opening files (the vCPU thread that
/// handles the boot marker) can still measure with it.
#[derive(Debug)]
pub struct Smaps(std::fs::File);

impl Smaps {
    /// Opens `/proc/self/smaps`; `None` where it cannot be read.
    pub fn open() -> Option<Self> {
        std::fs::File::open("/proc/self/smaps").ok().map(Self)
    }

    /// As [`resident_kib`], with positioned reads only.
    pub fn resident_kib(&self, ranges: &[(u64, u64)]) -> Option<(u64, u64)> {
        use std::os::unix::fs::FileExt;
        let mut text = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match self.0.read_at(&mut buf, text.len() as u64) {
                Ok(0) => break,
                Ok(n) => text.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => return None,
            }
        }
        Some(parse_smaps_rss(&String::from_utf8_lossy(&text), ranges))
    }
}

fn parse_smaps_rss(smaps: &str, ranges: &[(u64, u64)]) -> (u64, u64) {
    let (mut total, mut inside) = (0, 0);
    let mut in_range = false;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if let Some((a, b)) = first.split_once('-') {
            if let (Ok(start), Ok(end)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) {
                in_range = ranges.iter().any(|&(s, e)| start >= s && end <= e);
                continue;
            }
        }
        if let Some(rest) = line.strip_prefix("Rss:") {
            let kib: u64 = rest.trim().trim_end_matches("kB").trim().parse().unwrap_or(0);
            total += kib;
            if in_range {
                inside += kib;
            }
        }
    }
    (total, inside)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smaps_split_between_guest_and_vmm() {
        let smaps = "\
55d0a0000000-55d0a0100000 r-xp 00000000 fd:00 1 /usr/bin/vmrun
Size:               1024 kB
Rss:                 300 kB
7f0000000000-7f0008000000 rw-p 00000000 00:00 0
Size:             131072 kB
Rss:               20000 kB
7fff00000000-7fff00021000 rw-p 00000000 00:00 0 [stack]
Rss:                  12 kB
";
        let (total, guest) = parse_smaps_rss(smaps, &[(0x7f00_0000_0000, 0x7f00_0800_0000)]);
        assert_eq!(total, 20312);
        assert_eq!(guest, 20000);
    }

    #[test]
    fn this_process_has_resident_memory() {
        let (total, inside) = resident_kib(&[]).unwrap();
        assert!(total > 0);
        assert_eq!(inside, 0);
    }

    #[test]
    fn an_open_smaps_reads_again_from_the_start() {
        let smaps = Smaps::open().unwrap();
        // A range that holds every mapping: all of it is "inside".
        let (first, inside) = smaps.resident_kib(&[(0, u64::MAX)]).unwrap();
        assert!(first > 0);
        assert_eq!(first, inside);
        let _more = vec![1u8; 4 << 20];
        let (second, _) = smaps.resident_kib(&[]).unwrap();
        assert!(second > 0, "a second read starts over");
    }
}
