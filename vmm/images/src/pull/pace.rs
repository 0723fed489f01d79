//! How slowly and how long a pull may run.
//!
//! A registry that sends one byte every few seconds never trips a per-read
//! time-out, so every body of a pull (manifests, configs, blobs, tokens,
//! error messages) is read through [`Paced`], which gives up when the
//! bytes received over a window fall below a minimum rate, or when the
//! pull's overall deadline has passed. The deadline also bounds the wait
//! for connections and headers (as each request's global time-out).

use std::fmt;
use std::io::{self, Read};
use std::time::{Duration, Instant};

use crate::error::Error;

/// The environment variable that sets [`MinRate`] (`BYTES[/SECONDS]`).
pub const MIN_RATE_ENV: &str = "VMRUN_PULL_MIN_RATE";
/// The environment variable that sets the pull's deadline (seconds, or
/// with an `s`, `m` or `h` suffix).
pub const TIMEOUT_ENV: &str = "VMRUN_PULL_TIMEOUT";

/// Why a value of [`MIN_RATE_ENV`] or [`TIMEOUT_ENV`] is not one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PaceError {
    /// The rate's number is missing or too large.
    #[error("{input:?} is not BYTES[/SECONDS] (e.g. 1KiB/30s, or 0 to turn the check off)")]
    Rate {
        /// The value as given.
        input: String,
        /// Why its number is not one.
        #[source]
        source: std::num::ParseIntError,
    },
    /// The rate's unit is not one of B, KiB, MiB.
    #[error("unknown unit {unit:?} in {input:?} (use B, KiB or MiB)")]
    RateUnit {
        /// The unit as given.
        unit: String,
        /// The value as given.
        input: String,
    },
    /// The window is 0.
    #[error("{input:?}: the window must be longer than 0 s")]
    ZeroWindow {
        /// The value as given.
        input: String,
    },
    /// The duration's number is missing or not one.
    #[error("{input:?} is not a duration (e.g. 90s, 30m, 4h)")]
    Duration {
        /// The value as given.
        input: String,
        /// Why its number is not one.
        #[source]
        source: std::num::ParseFloatError,
    },
    /// The duration's unit is not one of s, m, h.
    #[error("unknown unit {unit:?} in {input:?} (use s, m or h)")]
    DurationUnit {
        /// The unit as given.
        unit: String,
        /// The value as given.
        input: String,
    },
    /// The duration is negative or too long.
    #[error("{input:?} is not a duration (it is negative or too long; e.g. 90s, 30m, 4h)")]
    DurationRange {
        /// The value as given.
        input: String,
        /// Why it is out of range.
        #[source]
        source: std::time::TryFromFloatSecsError,
    },
}

/// A transfer is given up when it receives fewer than `bytes_per_sec`
/// bytes a second, on average, over `window`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MinRate {
    /// Bytes a second; 0 turns the check off.
    pub bytes_per_sec: u64,
    /// The window the rate is measured over.
    pub window: Duration,
}

impl Default for MinRate {
    /// 1 KiB/s over 30 s: far below any working link, far above a trickle.
    fn default() -> Self {
        Self { bytes_per_sec: 1024, window: Duration::from_secs(30) }
    }
}

impl fmt::Display for MinRate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/s over {}", bytes(self.bytes_per_sec), secs(self.window))
    }
}

impl MinRate {
    /// Parses `BYTES[/SECONDS]`: `1KiB/30s`, `2048`, `512/5`; `0` or `off`
    /// turns the check off.
    pub fn parse(s: &str) -> Result<Self, PaceError> {
        let s = s.trim();
        if s == "0" || s.eq_ignore_ascii_case("off") {
            return Ok(Self { bytes_per_sec: 0, ..Self::default() });
        }
        let (rate, window) = match s.split_once('/') {
            Some((r, w)) => (r, Some(w)),
            None => (s, None),
        };
        let rate = rate.trim();
        let rate = rate.strip_suffix("/s").unwrap_or(rate);
        let digits = rate.find(|c: char| !c.is_ascii_digit()).unwrap_or(rate.len());
        let number: u64 = rate[..digits].parse().map_err(|source| PaceError::Rate { input: s.to_owned(), source })?;
        let unit = match rate[digits..].trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kib" | "kb" => 1 << 10,
            "m" | "mib" | "mb" => 1 << 20,
            other => return Err(PaceError::RateUnit { unit: other.to_owned(), input: s.to_owned() }),
        };
        let window = match window {
            Some(w) => parse_duration(w)?,
            None => Self::default().window,
        };
        if window.is_zero() {
            return Err(PaceError::ZeroWindow { input: s.to_owned() });
        }
        Ok(Self { bytes_per_sec: number.saturating_mul(unit), window })
    }

    fn enabled(&self) -> bool {
        self.bytes_per_sec > 0 && !self.window.is_zero()
    }
}

/// Parses `30`, `30s`, `5m`, `4h`, `1.5` (seconds).
pub fn parse_duration(s: &str) -> Result<Duration, PaceError> {
    let t = s.trim();
    let (number, unit) = match t.char_indices().find(|(_, c)| !(c.is_ascii_digit() || *c == '.')) {
        Some((i, _)) => (&t[..i], t[i..].trim()),
        None => (t, "s"),
    };
    let n: f64 = number.parse().map_err(|source| PaceError::Duration { input: s.to_owned(), source })?;
    let scale = match unit {
        "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        other => return Err(PaceError::DurationUnit { unit: other.to_owned(), input: s.to_owned() }),
    };
    Duration::try_from_secs_f64(n * scale).map_err(|source| PaceError::DurationRange { input: s.to_owned(), source })
}

/// `1 KiB`, `300 B`, `2 MiB`.
fn bytes(n: u64) -> String {
    if n >= 1 << 20 && n % (1 << 20) == 0 {
        format!("{} MiB", n >> 20)
    } else if n >= 1 << 10 && n % (1 << 10) == 0 {
        format!("{} KiB", n >> 10)
    } else {
        format!("{n} B")
    }
}

/// `30 s`, `1.5 s`, `4 h`.
pub(crate) fn secs(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s >= 3600.0 && d.as_secs() % 3600 == 0 {
        format!("{} h", d.as_secs() / 3600)
    } else if s >= 60.0 && d.as_secs() % 60 == 0 && d.subsec_nanos() == 0 {
        format!("{} min", d.as_secs() / 60)
    } else if d.subsec_millis() == 0 {
        format!("{} s", d.as_secs())
    } else {
        format!("{s:.1} s")
    }
}

/// The limits of one pull: its minimum rate and its deadline.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Pace {
    pub(crate) min_rate: MinRate,
    /// The overall limit and when it runs out.
    pub(crate) deadline: Option<(Duration, Instant)>,
}

impl Pace {
    pub(crate) fn new(min_rate: MinRate, timeout: Option<Duration>) -> Self {
        Self { min_rate, deadline: timeout.filter(|t| !t.is_zero()).map(|t| (t, Instant::now() + t)) }
    }

    /// What is left of the deadline (`None` without one).
    pub(crate) fn remaining(&self) -> Option<Duration> {
        self.deadline.map(|(_, at)| at.saturating_duration_since(Instant::now()))
    }

    pub(crate) fn expired(&self) -> bool {
        self.remaining().is_some_and(|r| r.is_zero())
    }

    /// `reader`, given up on when too slow or too late.
    pub(crate) fn reader<R: Read>(&self, reader: R) -> Paced<R> {
        Paced { inner: reader, pace: *self, window_start: Instant::now(), window_bytes: 0 }
    }

    /// The error for a read that `Paced` gave up on, naming `what` was
    /// being read from `registry`; `None` if `e` is another error.
    pub(crate) fn error(&self, registry: &str, what: &str, e: &io::Error) -> Option<Error> {
        let stalled = e.get_ref()?.downcast_ref::<Stalled>()?;
        Some(match *stalled {
            Stalled::Rate { bytes, elapsed } => self.too_slow(registry, what, bytes, elapsed),
            Stalled::Deadline => self.deadline_error(registry, what),
        })
    }

    /// The error for `bytes` of `what` received over `elapsed`, below the
    /// minimum rate.
    pub(crate) fn too_slow(&self, registry: &str, what: &str, bytes: u64, elapsed: Duration) -> Error {
        Error::TooSlow {
            registry: registry.to_owned(),
            what: what.to_owned(),
            bytes,
            elapsed: secs(elapsed),
            min_rate: self.min_rate.to_string(),
        }
    }

    pub(crate) fn deadline_error(&self, registry: &str, what: &str) -> Error {
        Error::PullTimeout {
            registry: registry.to_owned(),
            what: what.to_owned(),
            limit: self.deadline.map_or_else(String::new, |(t, _)| secs(t)),
        }
    }
}

/// Why [`Paced`] gave up (carried in an `io::Error`).
#[derive(Debug, Clone, Copy)]
enum Stalled {
    /// `bytes` arrived over the last `elapsed`, below the minimum rate.
    Rate { bytes: u64, elapsed: Duration },
    /// The pull's deadline passed.
    Deadline,
}

impl fmt::Display for Stalled {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Rate { bytes, elapsed } => write!(f, "{bytes} bytes in the last {}", secs(*elapsed)),
            Self::Deadline => f.write_str("the pull's deadline passed"),
        }
    }
}

impl std::error::Error for Stalled {}

/// A body reader that fails when the bytes over the current window fall
/// below the minimum rate, or the deadline has passed. Windows follow one
/// another: each one that ends (checked when a read returns, which the
/// client's per-read time-out, at most one window, makes happen) must have
/// brought its share.
pub(crate) struct Paced<R> {
    inner: R,
    pace: Pace,
    window_start: Instant,
    window_bytes: u64,
}

impl<R> Paced<R> {
    /// Checks the window that ends now.
    fn check(&mut self) -> io::Result<()> {
        if self.pace.expired() {
            return Err(io::Error::new(io::ErrorKind::TimedOut, Stalled::Deadline));
        }
        let rate = self.pace.min_rate;
        if !rate.enabled() {
            return Ok(());
        }
        let elapsed = self.window_start.elapsed();
        if elapsed < rate.window {
            return Ok(());
        }
        let wanted = rate.bytes_per_sec as f64 * elapsed.as_secs_f64();
        if (self.window_bytes as f64) < wanted {
            return Err(io::Error::new(io::ErrorKind::TimedOut, Stalled::Rate { bytes: self.window_bytes, elapsed }));
        }
        self.window_start = Instant::now();
        self.window_bytes = 0;
        Ok(())
    }
}

impl<R: Read> Read for Paced<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.pace.expired() {
            return Err(io::Error::new(io::ErrorKind::TimedOut, Stalled::Deadline));
        }
        match self.inner.read(buf) {
            Ok(0) => Ok(0),
            Ok(n) => {
                self.window_bytes += n as u64;
                self.check()?;
                Ok(n)
            }
            Err(e) => {
                // A read that timed out (ureq's per-read time-out, or its
                // global one at the deadline) is told as what it means.
                if is_timeout(&e) {
                    self.check()?;
                }
                Err(e)
            }
        }
    }
}

/// Whether `e` is a time-out, plain or ureq's.
fn is_timeout(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::TimedOut
        || e.kind() == io::ErrorKind::WouldBlock
        || e.get_ref().and_then(|i| i.downcast_ref::<ureq::Error>()).is_some_and(|u| matches!(u, ureq::Error::Timeout(_)))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn parses_rates_and_durations() {
        assert_eq!(MinRate::parse("1KiB/30s").unwrap(), MinRate { bytes_per_sec: 1024, window: Duration::from_secs(30) });
        assert_eq!(MinRate::parse("512/2").unwrap(), MinRate { bytes_per_sec: 512, window: Duration::from_secs(2) });
        assert_eq!(MinRate::parse("2M").unwrap().bytes_per_sec, 2 << 20);
        assert_eq!(MinRate::parse("0").unwrap().bytes_per_sec, 0);
        assert!(MinRate::parse("fast").is_err());
        assert!(MinRate::parse("1KiB/0").is_err());
        assert_eq!(parse_duration("4h").unwrap(), Duration::from_secs(4 * 3600));
        assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert!(matches!(parse_duration("soon"), Err(PaceError::Duration { .. })));
        assert!(matches!(parse_duration("5d"), Err(PaceError::DurationUnit { .. })));
        let e = MinRate::parse("fast").unwrap_err();
        assert!(matches!(e, PaceError::Rate { .. }) && std::error::Error::source(&e).is_some(), "{e:?}");
        assert!(matches!(MinRate::parse("1KiB/soon"), Err(PaceError::Duration { .. })));
        assert_eq!(MinRate::default().to_string(), "1 KiB/s over 30 s");
        assert_eq!(secs(Duration::from_secs(6 * 3600)), "6 h");
    }

    /// Gives `step` bytes a read, waiting `pause` before each.
    struct Trickle {
        step: usize,
        pause: Duration,
    }

    impl Read for Trickle {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            std::thread::sleep(self.pause);
            let n = self.step.min(buf.len());
            buf[..n].fill(b'x');
            Ok(n)
        }
    }

    #[test]
    fn a_trickle_is_given_up_on_a_steady_flow_is_not() {
        let rate = MinRate { bytes_per_sec: 1000, window: Duration::from_millis(200) };
        let pace = Pace::new(rate, None);
        let mut slow = pace.reader(Trickle { step: 1, pause: Duration::from_millis(20) });
        let mut buf = [0u8; 64];
        let start = Instant::now();
        let err = loop {
            if let Err(e) = slow.read(&mut buf) {
                break e;
            }
        };
        assert!(start.elapsed() < Duration::from_secs(2));
        let e = pace.error("r.example", "layer 1", &err).unwrap();
        let msg = e.to_string();
        assert!(msg.starts_with("registry r.example sent "), "{msg}");
        assert!(msg.contains("bytes of layer 1 in the last"), "{msg}");
        assert!(msg.contains("(minimum 1000 B/s over 0.2 s): giving up"), "{msg}");

        let mut fast = pace.reader(Trickle { step: 64, pause: Duration::from_millis(10) });
        let start = Instant::now();
        while start.elapsed() < Duration::from_millis(600) {
            assert!(fast.read(&mut buf).unwrap() > 0);
        }

        let late = Pace::new(MinRate { bytes_per_sec: 0, ..rate }, Some(Duration::from_millis(100)));
        let mut r = late.reader(Trickle { step: 64, pause: Duration::from_millis(10) });
        let err = loop {
            if let Err(e) = r.read(&mut buf) {
                break e;
            }
        };
        let msg = late.error("r.example", "the manifest", &err).unwrap().to_string();
        assert!(msg.contains("took longer than the 0.1 s allowed"), "{msg}");
    }
}
