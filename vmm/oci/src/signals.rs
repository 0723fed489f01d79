//! Signals: names as `kill` takes them, and the set a supervisor catches
//! to forward to the container's process.

use crate::error::{Error, Result};


/// A signal by name (`KILL`, `SIGKILL`, `sigkill`) or number (1 to 64).
pub fn parse(s: &str) -> Result<i32> {
    vmrun_runtime::signal::parse(s).map_err(|e| Error::Usage(e.to_string()))
}

/// The signals a supervisor forwards to its process (SIGWINCH as a
/// terminal resize).
pub const FORWARDED: &[libc::c_int] =
    &[libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGQUIT, libc::SIGUSR1, libc::SIGUSR2, libc::SIGWINCH, libc::SIGALRM];

/// Blocks [`FORWARDED`] in this thread and the threads it starts later
/// (call it first thing); returns the set for [`wait`].
pub fn block_forwarded() -> libc::sigset_t {
    // SAFETY: builds a signal set and blocks it for this thread.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in FORWARDED {
            libc::sigaddset(&mut set, *s);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

/// Waits for one of the signals in `set` (blocked by [`block_forwarded`]).
pub fn wait(set: &libc::sigset_t) -> Option<libc::c_int> {
    let mut sig: libc::c_int = 0;
    // SAFETY: sigwait reads `set` and writes the signal number to `sig`.
    (unsafe { libc::sigwait(set, &mut sig) } == 0).then_some(sig)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn names_and_numbers() {
        assert_eq!(parse("KILL").unwrap(), 9);
        assert_eq!(parse("SIGTERM").unwrap(), 15);
        assert_eq!(parse("sigusr1").unwrap(), libc::SIGUSR1);
        assert_eq!(parse("9").unwrap(), 9);
        assert_eq!(parse("WINCH").unwrap(), libc::SIGWINCH);
        for bad in ["0", "65", "NOPE", "", "-9"] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }
}
