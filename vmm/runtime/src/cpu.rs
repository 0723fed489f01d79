//! Host CPU time: this process's, and a process tree's (a VMM, with the
//! jail's fork), for the measure of what a start costs the host.

use std::time::Duration;

/// The host CPU a VM's start had cost at some moment: this process's
/// (since it started) and its VMM's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostCpu {
    pub own: Duration,
    pub vmm: Duration,
}

impl HostCpu {
    /// Now, for the VMM of pid `vmm`.
    pub fn now(vmm: u32) -> Self {
        Self { own: own(), vmm: tree(vmm) }
    }
}

/// CPU time (user and system) this process and its reaped children have
/// used.
pub fn own() -> Duration {
    let of = |who| {
        // SAFETY: getrusage writes into the zeroed struct it is given.
        let u = unsafe {
            let mut u: libc::rusage = std::mem::zeroed();
            libc::getrusage(who, &mut u);
            u
        };
        let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, (t.tv_usec as u32) * 1000);
        tv(u.ru_utime) + tv(u.ru_stime)
    };
    of(libc::RUSAGE_SELF) + of(libc::RUSAGE_CHILDREN)
}

/// The CPU time the threads of `pid` and of its descendants have run,
/// from `/proc/PID/task/TID/schedstat` (nanoseconds on the CPU, its first
/// field) and `children`. Processes that end meanwhile are skipped.
pub fn tree(pid: u32) -> Duration {
    let mut total = Duration::ZERO;
    let mut todo = vec![pid];
    while let Some(p) = todo.pop() {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{p}/task")) else { continue };
        for task in tasks.flatten() {
            let dir = task.path();
            if let Some(ns) = std::fs::read_to_string(dir.join("schedstat")).ok().as_deref().and_then(on_cpu_ns) {
                total += Duration::from_nanos(ns);
            }
            if let Ok(children) = std::fs::read_to_string(dir.join("children")) {
                todo.extend(children.split_whitespace().filter_map(|c| c.parse::<u32>().ok()));
            }
        }
    }
    total
}

/// The first field of a `schedstat` line.
fn on_cpu_ns(schedstat: &str) -> Option<u64> {
    schedstat.split_whitespace().next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedstat_gives_the_time_on_the_cpu() {
        assert_eq!(on_cpu_ns("123456 789 10\n"), Some(123456));
        assert_eq!(on_cpu_ns(""), None);
        assert_eq!(on_cpu_ns("x 1 2"), None);
    }

    #[test]
    fn a_busy_child_counts_in_the_tree() {
        let mut child =
            std::process::Command::new("sh").args(["-c", "i=0; while [ $i -lt 200000 ]; do i=$((i+1)); done; sleep 5"]).spawn().unwrap();
        let start = std::time::Instant::now();
        // The loop takes tens of milliseconds of CPU; wait until it shows.
        while tree(child.id()) < Duration::from_millis(20) && start.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(20));
        }
        let (of_child, of_me) = (tree(child.id()), tree(std::process::id()));
        let _ = child.kill();
        let _ = child.wait();
        assert!(of_child >= Duration::from_millis(20), "the busy child's CPU time is missing: {of_child:?}");
        assert!(of_me >= of_child, "the parent's tree holds its child: {of_me:?} < {of_child:?}");
        assert_eq!(tree(u32::MAX), Duration::ZERO, "no such process");
    }
}
