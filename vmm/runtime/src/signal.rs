//! Signals as `kill` takes them, for every front end (`vmrun kill`,
//! `vmrun-oci kill`): one table, `nix`'s.

use std::str::FromStr;

/// A name or number that is no signal.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown signal {0:?} (use a name such as TERM or SIGKILL, or a number from 1 to 64)")]
pub struct UnknownSignal(pub String);

/// A signal by name (`KILL`, `SIGKILL`, `sigkill`) or number (1 to 64,
/// real-time signals included).
pub fn parse(s: &str) -> Result<i32, UnknownSignal> {
    let unknown = || UnknownSignal(s.to_string());
    if let Ok(n) = s.parse::<i32>() {
        return if (1..=64).contains(&n) { Ok(n) } else { Err(unknown()) };
    }
    let upper = s.to_ascii_uppercase();
    let name = if upper.starts_with("SIG") { upper } else { format!("SIG{upper}") };
    nix::sys::signal::Signal::from_str(&name).map(|sig| sig as i32).map_err(|_| unknown())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn names_and_numbers() {
        assert_eq!(parse("TERM").unwrap(), libc::SIGTERM);
        assert_eq!(parse("SIGKILL").unwrap(), libc::SIGKILL);
        assert_eq!(parse("sigwinch").unwrap(), libc::SIGWINCH);
        assert_eq!(parse("usr1").unwrap(), libc::SIGUSR1);
        assert_eq!(parse("9").unwrap(), 9);
        assert_eq!(parse("64").unwrap(), 64);
        for bad in ["0", "65", "-1", "NOPE", "SIG", ""] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }
}
