//! Signals held for a container's init until it can take them.
//!
//! A container's first process is PID 1 of its PID namespace, and the
//! kernel drops a signal sent to it from outside unless it has a handler
//! for it (SIGKILL and SIGSTOP excepted). A shell that sets a `trap` as its
//! first command has no handler for the first moments after `execve`; on a
//! host those are microseconds, in a guest whose kernel mode is emulated
//! they can be long enough for a caller's `kill` right after `start` to
//! land in them, and the signal is lost. So a signal whose default action
//! would end or stop the init, sent while the init neither catches nor
//! ignores it, is held and sent once the init catches it, for up to
//! [`HOLD`]; after that it is sent anyway (and dropped by the kernel, as it
//! would have been). To the init that is a signal that arrived later.

use std::time::{Duration, Instant};

/// How long a signal is held at most.
pub const HOLD: Duration = Duration::from_secs(30);
/// How often a held signal's target is looked at.
pub const POLL: Duration = Duration::from_millis(20);

/// What a process does with a signal, from `/proc/PID/status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// It has a handler.
    Caught,
    /// It ignores it.
    Ignored,
    /// The default action.
    Default,
}

/// The disposition of `sig` in a `/proc/PID/status` text (`SigCgt`,
/// `SigIgn`: hexadecimal masks, bit N-1 for signal N); `None` when the text
/// says nothing.
pub fn disposition(status: &str, sig: i32) -> Option<Disposition> {
    let mask = |field: &str| -> Option<u64> {
        let hex = status.lines().find_map(|l| l.strip_prefix(field))?.trim();
        u64::from_str_radix(hex, 16).ok()
    };
    let bit = 1u64.checked_shl(u32::try_from(sig.checked_sub(1)?).ok()?)?;
    if mask("SigCgt:")? & bit != 0 {
        Some(Disposition::Caught)
    } else if mask("SigIgn:")? & bit != 0 {
        Some(Disposition::Ignored)
    } else {
        Some(Disposition::Default)
    }
}

/// Whether `sig`'s default action ends or stops a process (the signals
/// worth holding; SIGKILL and SIGSTOP always reach an init).
pub fn default_ends(sig: i32) -> bool {
    !matches!(sig, libc::SIGKILL | libc::SIGSTOP | libc::SIGCHLD | libc::SIGCONT | libc::SIGURG | libc::SIGWINCH)
}

/// What `disposition` of `pid` is now (`None`: the process is gone).
fn disposition_of(pid: i32, sig: i32) -> Option<Disposition> {
    disposition(&std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?, sig)
}

/// One held signal.
#[derive(Debug)]
struct Held {
    pid: i32,
    sig: i32,
    until: Instant,
}

/// The held signals.
#[derive(Debug, Default)]
pub struct HeldSignals {
    list: Vec<Held>,
}

impl HeldSignals {
    /// Whether `sig` to init `pid` must be held now (it would be dropped);
    /// if so it is.
    pub fn hold_if_needed(&mut self, pid: i32, sig: i32) -> bool {
        if !default_ends(sig) || disposition_of(pid, sig) != Some(Disposition::Default) {
            return false;
        }
        crate::log::debug(format_args!("signal {sig} for pid {pid} held until it has a handler"));
        self.list.push(Held { pid, sig, until: Instant::now() + HOLD });
        true
    }

    /// The `epoll_wait` timeout: -1 without held signals.
    pub fn timeout_ms(&self) -> i32 {
        if self.list.is_empty() {
            -1
        } else {
            POLL.as_millis() as i32
        }
    }

    /// Sends the held signals whose target now catches them (or whose time
    /// is up), and forgets those of processes gone; `alive(pid)` says
    /// whether the process is still the agent's (not reaped).
    pub fn retry(&mut self, alive: impl Fn(i32) -> bool) {
        let now = Instant::now();
        self.list.retain(|h| {
            if !alive(h.pid) {
                return false;
            }
            let ready = disposition_of(h.pid, h.sig) != Some(Disposition::Default);
            if !ready && now < h.until {
                return true;
            }
            if let Err(e) = crate::sys::kill(h.pid, h.sig) {
                crate::log::debug(format_args!("held signal {} for pid {}: {e}", h.sig, h.pid));
            }
            false
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dispositions_come_from_the_status_masks() {
        let status = "Name:\tsh\nSigBlk:\t0000000000000000\nSigIgn:\t0000000000000004\nSigCgt:\t0000000000004002\n";
        assert_eq!(disposition(status, libc::SIGINT), Some(Disposition::Caught));
        assert_eq!(disposition(status, libc::SIGTERM), Some(Disposition::Caught));
        assert_eq!(disposition(status, libc::SIGQUIT), Some(Disposition::Ignored));
        assert_eq!(disposition(status, libc::SIGUSR1), Some(Disposition::Default));
        assert_eq!(disposition(status, 0), None);
        assert_eq!(disposition(status, 65), None);
        assert_eq!(disposition("Name:\tsh\n", libc::SIGTERM), None);
        assert!(default_ends(libc::SIGTERM) && !default_ends(libc::SIGKILL) && !default_ends(libc::SIGCHLD));
    }

    #[test]
    fn a_held_signal_is_sent_once_caught_and_forgotten_when_its_process_is_gone() {
        // A shell that sets its trap a moment after it starts.
        let mut child = std::process::Command::new("sh")
            .args(["-c", "sleep 0.3; trap 'exit 7' USR2; while :; do sleep 0.05; done"])
            .spawn()
            .unwrap_or_else(|e| panic!("sh: {e}"));
        let pid = child.id() as i32;
        let mut held = HeldSignals::default();
        assert!(held.hold_if_needed(pid, libc::SIGUSR2), "no handler yet");
        assert!(!held.hold_if_needed(pid, libc::SIGKILL));
        assert_eq!(held.timeout_ms(), POLL.as_millis() as i32);
        let start = Instant::now();
        while held.timeout_ms() != -1 {
            assert!(start.elapsed() < HOLD, "the signal was never sent");
            std::thread::sleep(POLL);
            held.retry(|_| true);
        }
        assert_eq!(child.wait().ok().and_then(|s| s.code()), Some(7), "the trap got the signal");

        assert!(held.hold_if_needed(std::process::id() as i32, libc::SIGUSR2) || held.timeout_ms() == -1);
        held.retry(|_| false);
        assert_eq!(held.timeout_ms(), -1, "forgotten once its process is gone");
    }
}
