//! The guest's wall clock, set from the host's.
//!
//! A guest's clock can lag the host's: its boot reads the emulated CMOS
//! clock, in whole seconds, before the kernel has a clock source that
//! counts the rest of the boot; and on hardware KVM a VM restored from a
//! snapshot resumes the snapshot's clock, minutes or days behind. The
//! host's hello carries its wall clock as it sent it (the true time when
//! the agent reads it is later), so the agent, as the guest's init, moves
//! the guest's clock forward to it when the guest's is behind, and back
//! only when the guest's is ahead by more than any hello takes to arrive.

use std::io;
use std::time::Duration;

/// Behind the host's clock by more than this: set.
pub const BEHIND: Duration = Duration::from_millis(20);
/// Ahead of the host's clock (as it was when it sent its hello) by more
/// than this: set (the host's clock was set back since the snapshot).
pub const AHEAD: Duration = Duration::from_secs(1);

/// The time to set the guest's clock to, if any: `host` when `guest` is
/// behind it by more than [`BEHIND`] or ahead by more than [`AHEAD`].
pub fn correction(guest: Duration, host: Duration) -> Option<Duration> {
    (guest + BEHIND < host || guest > host + AHEAD).then_some(host)
}

/// `CLOCK_REALTIME` now, as time since the epoch (zero before it).
pub fn now() -> Duration {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default()
}

/// Sets the guest's clock from the host's (`host` as its hello gave it)
/// when [`correction`] says so; returns what the guest's clock said
/// before, or `None` when it was left alone.
pub fn follow(host: Duration) -> io::Result<Option<Duration>> {
    let guest = now();
    let Some(to) = correction(guest, host) else {
        return Ok(None);
    };
    crate::sys::set_realtime(to)?;
    Ok(Some(guest))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_clock_behind_is_set_forward_and_one_far_ahead_back() {
        let host = Duration::from_secs(1_765_000_000);
        let ms = Duration::from_millis;
        // The CMOS clock's whole seconds, a snapshot's age.
        assert_eq!(correction(host - ms(1_465), host), Some(host));
        assert_eq!(correction(host - Duration::from_secs(3_600), host), Some(host));
        // In step, or ahead by what the hello took to arrive: left alone.
        assert_eq!(correction(host, host), None);
        assert_eq!(correction(host - ms(5), host), None);
        assert_eq!(correction(host + ms(800), host), None);
        // Far ahead (the host's clock was set back).
        assert_eq!(correction(host + ms(1_500), host), Some(host));
        assert_eq!(correction(host + Duration::from_secs(60), host), Some(host));
    }
}
