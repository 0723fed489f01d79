//! Signals: names as `kill` takes them, and the set a supervisor takes
//! (`vmrun_runtime::signal::Relay`) to forward to the container's process.

use crate::error::{Error, Result};


/// A signal by name (`KILL`, `SIGKILL`, `sigkill`) or number (1 to 64).
pub fn parse(s: &str) -> Result<i32> {
    vmrun_runtime::signal::parse(s).map_err(|e| Error::Usage(e.to_string()))
}

/// The signals a supervisor forwards to its process (SIGWINCH as a
/// terminal resize); before it runs, they cancel the start.
pub const FORWARDED: &[libc::c_int] =
    &[libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGQUIT, libc::SIGUSR1, libc::SIGUSR2, libc::SIGWINCH, libc::SIGALRM];

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
