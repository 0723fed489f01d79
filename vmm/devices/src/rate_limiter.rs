//! A token-bucket rate limiter for devices: one bucket for bytes, one for
//! operations, each refilled continuously at `size` tokens per
//! `refill_time`, with an optional one-time burst on top that is never
//! refilled.
//!
//! The limiter is driven by the device's event loop, it never sleeps:
//! - before it serves a request, the device asks [`RateLimiter::consume`]
//!   for the request's bytes and operations; both buckets must have them,
//!   or nothing is taken;
//! - when it is refused, the device stops serving the queue (it puts the
//!   request back) and the limiter arms a timerfd for the moment the
//!   missing tokens are back; [`RateLimiter::timer_fd`] is one of the
//!   device's watched descriptors;
//! - when the timer fires, the device calls [`RateLimiter::on_timer`] and
//!   serves its queue again.
//!
//! While the limiter waits for its timer every `consume` is refused, so a
//! guest kicking its queue meanwhile costs nothing but the kick.
//!
//! A request larger than a bucket can ever hold is let through once the
//! bucket is full, and the bucket goes into debt by the difference: the
//! average rate holds, and such a request cannot stall the device forever.
//!
//! A limiter without buckets ([`RateLimiter::unlimited`], or a
//! [`RateLimitConfig`] with neither bucket) has no timer and `consume` is
//! two `None` checks.
//!
//! The limiter's state is not part of a device snapshot: a restored device
//! starts with full buckets.
//!
//! The idea (two buckets, a one-time burst, a timerfd that wakes the
//! device) is Firecracker's; the code is our own.

use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use vmm_sys_util::timerfd::TimerFd;

/// The shortest wait the timer is armed for: bounds the wake-ups of a
/// throttled device to 1000 per second.
pub const MIN_WAIT: Duration = Duration::from_millis(1);

/// Longest time counted in one refill, and longest refill time (2^62 ns,
/// about 146 years): keeps the token arithmetic within `i128`.
const MAX_ELAPSED_NS: i128 = 1 << 62;

/// Errors creating a rate limiter.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot create the rate limiter's timer: {0}")]
    Timer(std::io::Error),
    #[error("a rate-limit bucket needs a size and a refill time above zero")]
    EmptyBucket,
}

/// One bucket's shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BucketConfig {
    /// Tokens the bucket holds when full; also the tokens added per
    /// `refill_time`.
    pub size: u64,
    /// Extra tokens available once, at the start (never refilled).
    pub one_time_burst: u64,
    /// Time to refill an empty bucket.
    pub refill_time: Duration,
}

impl BucketConfig {
    /// `rate` tokens per second, a bucket of one second's worth, no burst.
    pub fn per_second(rate: u64) -> Self {
        Self { size: rate, one_time_burst: 0, refill_time: Duration::from_secs(1) }
    }
}

/// What a limiter limits: `None` is no limit on that count.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RateLimitConfig {
    /// Bytes.
    pub bandwidth: Option<BucketConfig>,
    /// Operations (requests, frames).
    pub ops: Option<BucketConfig>,
}

impl RateLimitConfig {
    /// No limit at all.
    pub const UNLIMITED: Self = Self { bandwidth: None, ops: None };

    /// `bytes` per second and `ops` per second, each with a bucket of one
    /// second's worth; `None` is unlimited.
    pub fn per_second(bytes: Option<u64>, ops: Option<u64>) -> Self {
        Self { bandwidth: bytes.map(BucketConfig::per_second), ops: ops.map(BucketConfig::per_second) }
    }

    /// Whether nothing is limited.
    pub fn is_unlimited(&self) -> bool {
        self.bandwidth.is_none() && self.ops.is_none()
    }
}

/// One token bucket. Token counts are `i128` so that debt (a negative
/// budget) and any `u64` configuration fit without overflow.
#[derive(Debug)]
struct TokenBucket {
    size: i128,
    refill_ns: i128,
    /// Tokens in the bucket; negative after an oversized request.
    budget: i128,
    /// What is left of the one-time burst.
    burst: i128,
    /// The time up to which refills were counted.
    last_refill: Instant,
}

impl TokenBucket {
    fn new(c: &BucketConfig, now: Instant) -> Result<Self, Error> {
        let refill_ns = c.refill_time.as_nanos();
        if c.size == 0 || refill_ns == 0 {
            return Err(Error::EmptyBucket);
        }
        Ok(Self {
            size: i128::from(c.size),
            refill_ns: i128::try_from(refill_ns).unwrap_or(MAX_ELAPSED_NS).min(MAX_ELAPSED_NS),
            budget: i128::from(c.size),
            burst: i128::from(c.one_time_burst),
            last_refill: now,
        })
    }

    /// Adds the tokens earned since the last refill. Only whole tokens
    /// are added and the time of the fraction is kept, so nothing is lost
    /// to rounding however often this runs.
    fn refill(&mut self, now: Instant) {
        let Some(elapsed) = now.checked_duration_since(self.last_refill) else { return };
        if self.budget >= self.size {
            self.last_refill = now;
            return;
        }
        // Capped at 2^62 ns (146 years) so that the product below fits
        // (size is below 2^64).
        let elapsed_ns = i128::try_from(elapsed.as_nanos()).unwrap_or(MAX_ELAPSED_NS).min(MAX_ELAPSED_NS);
        let earned = elapsed_ns * self.size / self.refill_ns;
        if earned == 0 {
            return;
        }
        if self.budget + earned >= self.size {
            self.budget = self.size;
            self.last_refill = now;
        } else {
            self.budget += earned;
            // The time those tokens took, rounded up: the remainder is
            // carried to the next refill, and the rate is never exceeded.
            let used_ns = (earned * self.refill_ns + self.size - 1) / self.size;
            self.last_refill += Duration::from_nanos(u64::try_from(used_ns).unwrap_or(u64::MAX));
        }
    }

    /// The tokens a request of `tokens` needs to find: all of them, or a
    /// full bucket if it is larger than the bucket.
    fn needed(&self, tokens: u64) -> i128 {
        i128::from(tokens).min(self.size)
    }

    /// How long after `now` until `tokens` can be taken (zero: now). Call
    /// it right after [`TokenBucket::refill`].
    fn wait_for(&self, tokens: u64, now: Instant) -> Duration {
        let missing = self.needed(tokens) - (self.budget + self.burst);
        if missing <= 0 {
            return Duration::ZERO;
        }
        // Rounded up, so the timer never fires a little too early; the
        // part of a token earned since the last refill counts.
        let ns = (missing * self.refill_ns + self.size - 1) / self.size;
        let ns = Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX));
        let since = now.saturating_duration_since(self.last_refill);
        ns.saturating_sub(since).max(Duration::from_nanos(1))
    }

    /// Takes `tokens` (the caller checked [`TokenBucket::wait_for`]): the
    /// burst first, then the bucket, which may go into debt.
    fn take(&mut self, tokens: u64) {
        let tokens = i128::from(tokens);
        let from_burst = tokens.min(self.burst);
        self.burst -= from_burst;
        self.budget -= tokens - from_burst;
    }
}

/// A rate limiter with a bytes bucket and an operations bucket.
#[derive(Debug)]
pub struct RateLimiter {
    bytes: Option<TokenBucket>,
    ops: Option<TokenBucket>,
    /// Armed while the limiter is blocked; `None` when nothing is limited.
    timer: Option<TimerFd>,
    blocked: bool,
}

impl Default for RateLimiter {
    fn default() -> Self {
        Self::unlimited()
    }
}

impl RateLimiter {
    /// A limiter that never refuses, with no timer.
    pub fn unlimited() -> Self {
        Self { bytes: None, ops: None, timer: None, blocked: false }
    }

    /// A limiter for `config`, with full buckets; without any bucket it is
    /// [`RateLimiter::unlimited`].
    pub fn new(config: &RateLimitConfig) -> Result<Self, Error> {
        Self::new_at(config, Instant::now())
    }

    fn new_at(config: &RateLimitConfig, now: Instant) -> Result<Self, Error> {
        if config.is_unlimited() {
            return Ok(Self::unlimited());
        }
        let bytes = config.bandwidth.as_ref().map(|c| TokenBucket::new(c, now)).transpose()?;
        let ops = config.ops.as_ref().map(|c| TokenBucket::new(c, now)).transpose()?;
        let timer = TimerFd::new().map_err(|e| Error::Timer(e.into()))?;
        // The timer is re-armed from the event loop, possibly after epoll
        // reported it readable and before the handler reads it: the read
        // must not block then.
        // SAFETY: fcntl on a descriptor we own, with integer arguments only.
        let r = unsafe { libc::fcntl(timer.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) };
        if r < 0 {
            return Err(Error::Timer(std::io::Error::last_os_error()));
        }
        Ok(Self { bytes, ops, timer: Some(timer), blocked: false })
    }

    /// Whether this limiter limits nothing.
    pub fn is_unlimited(&self) -> bool {
        self.timer.is_none()
    }

    /// Whether the limiter refuses everything until its timer fires.
    pub fn is_blocked(&self) -> bool {
        self.blocked
    }

    /// The timer to watch for readability while the device is active
    /// (`None` for an unlimited limiter).
    pub fn timer_fd(&self) -> Option<RawFd> {
        self.timer.as_ref().map(AsRawFd::as_raw_fd)
    }

    /// Takes `bytes` and `ops` tokens if both buckets have them, and says
    /// whether it did. When it did not, the limiter is blocked and its
    /// timer fires when the tokens are back.
    pub fn consume(&mut self, bytes: u64, ops: u64) -> bool {
        if self.bytes.is_none() && self.ops.is_none() {
            return true;
        }
        self.consume_at(bytes, ops, Instant::now())
    }

    fn consume_at(&mut self, bytes: u64, ops: u64, now: Instant) -> bool {
        if self.blocked {
            return false;
        }
        let mut wait = Duration::ZERO;
        for (bucket, tokens) in [(&mut self.bytes, bytes), (&mut self.ops, ops)] {
            if let Some(b) = bucket {
                b.refill(now);
                wait = wait.max(b.wait_for(tokens, now));
            }
        }
        if wait.is_zero() {
            for (bucket, tokens) in [(&mut self.bytes, bytes), (&mut self.ops, ops)] {
                if let Some(b) = bucket {
                    b.take(tokens);
                }
            }
            return true;
        }
        self.block_for(wait)
    }

    /// Arms the timer for `wait`; `false` (refused) unless the timer
    /// cannot be armed, in which case the request is let through rather
    /// than leaving the device stalled with nothing to wake it.
    fn block_for(&mut self, wait: Duration) -> bool {
        let Some(timer) = self.timer.as_mut() else { return true };
        match timer.reset(wait.max(MIN_WAIT), None) {
            Ok(()) => {
                self.blocked = true;
                false
            }
            Err(e) => {
                log::error!("rate limiter: cannot arm the timer ({e}); not limiting");
                true
            }
        }
    }

    /// The timer fired (its descriptor is readable): the limiter is
    /// unblocked and the device should serve its queue again. Returns
    /// whether the limiter was blocked (a `false` is a spurious wake-up).
    pub fn on_timer(&mut self) -> bool {
        if let Some(timer) = self.timer.as_mut() {
            // Non-blocking: an error is a timer that did not expire.
            let _ = timer.wait();
        }
        std::mem::replace(&mut self.blocked, false)
    }

    /// Tokens left in the buckets: (bytes, ops), `None` for an absent
    /// bucket; the one-time burst is not counted.
    pub fn budget(&self) -> (Option<i128>, Option<i128>) {
        (self.bytes.as_ref().map(|b| b.budget), self.ops.as_ref().map(|b| b.budget))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn readable(fd: RawFd, timeout_ms: i32) -> bool {
        let mut p = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd, for the duration of the call.
        let n = unsafe { libc::poll(&mut p, 1, timeout_ms) };
        n == 1 && p.revents & libc::POLLIN != 0
    }

    fn bucket(size: u64, ms: u64) -> BucketConfig {
        BucketConfig { size, one_time_burst: 0, refill_time: Duration::from_millis(ms) }
    }

    #[test]
    fn unlimited_has_no_timer_and_never_refuses() {
        let mut l = RateLimiter::new(&RateLimitConfig::default()).unwrap();
        assert!(l.is_unlimited());
        assert_eq!(l.timer_fd(), None);
        for _ in 0..1000 {
            assert!(l.consume(u64::MAX, u64::MAX));
        }
        assert!(!l.is_blocked());
        assert!(!l.on_timer());
        assert_eq!(l.budget(), (None, None));
        assert!(RateLimiter::default().is_unlimited());
    }

    #[test]
    fn empty_buckets_are_refused() {
        let zero = RateLimitConfig { bandwidth: Some(bucket(0, 1000)), ops: None };
        assert!(matches!(RateLimiter::new(&zero), Err(Error::EmptyBucket)));
        let instant = RateLimitConfig { bandwidth: None, ops: Some(bucket(10, 0)) };
        assert!(matches!(RateLimiter::new(&instant), Err(Error::EmptyBucket)));
    }

    #[test]
    fn consumption_takes_from_both_buckets_or_neither() {
        let t0 = Instant::now();
        let c = RateLimitConfig { bandwidth: Some(bucket(1000, 1000)), ops: Some(bucket(3, 1000)) };
        let mut l = RateLimiter::new_at(&c, t0).unwrap();
        assert!(!l.is_unlimited());
        assert!(l.consume_at(400, 1, t0));
        assert!(l.consume_at(400, 1, t0));
        assert_eq!(l.budget(), (Some(200), Some(1)));
        // Bytes missing: the op is not taken either.
        assert!(!l.consume_at(300, 1, t0));
        assert!(l.is_blocked());
        assert_eq!(l.budget(), (Some(200), Some(1)));
        // Blocked: refused until the timer fired, even what would fit.
        assert!(!l.consume_at(1, 0, t0));
        assert!(l.on_timer());
        assert!(!l.is_blocked());
        assert!(l.consume_at(200, 1, t0));
        // Ops missing now.
        assert!(!l.consume_at(0, 1, t0));
        assert_eq!(l.budget(), (Some(0), Some(0)));
    }

    #[test]
    fn refill_over_time_is_exact_and_capped() {
        let t0 = Instant::now();
        let c = RateLimitConfig { bandwidth: Some(bucket(1000, 1000)), ops: None };
        let mut l = RateLimiter::new_at(&c, t0).unwrap();
        assert!(l.consume_at(1000, 0, t0));
        // 1 token per ms: nothing after 0.9 ms, one token at 1 ms.
        assert!(!l.consume_at(1, 0, t0 + Duration::from_micros(900)));
        l.on_timer();
        assert!(l.consume_at(1, 0, t0 + Duration::from_millis(1)));
        // Many small steps lose nothing to rounding: 1.5 ms steps over
        // 300 ms earn 300 tokens.
        let mut now = t0 + Duration::from_millis(1);
        let mut got = 0;
        for _ in 0..200 {
            now += Duration::from_micros(1500);
            while l.consume_at(1, 0, now) {
                got += 1;
            }
            l.on_timer();
        }
        assert_eq!(got, 300);
        // Never above the size, however long it waits.
        l.consume_at(0, 0, now + Duration::from_secs(3600));
        assert_eq!(l.budget().0, Some(1000));
    }

    #[test]
    fn one_time_burst_comes_first_and_does_not_refill() {
        let t0 = Instant::now();
        let b = BucketConfig { size: 100, one_time_burst: 500, refill_time: Duration::from_secs(1) };
        let mut l = RateLimiter::new_at(&RateLimitConfig { bandwidth: Some(b), ops: None }, t0).unwrap();
        assert!(l.consume_at(550, 0, t0), "burst and bucket together");
        assert_eq!(l.budget().0, Some(50));
        assert!(l.consume_at(50, 0, t0));
        assert!(!l.consume_at(1, 0, t0));
        l.on_timer();
        // A long wait refills the bucket, never the burst.
        let later = t0 + Duration::from_secs(60);
        assert!(l.consume_at(100, 0, later));
        assert!(!l.consume_at(1, 0, later));
    }

    #[test]
    fn oversized_requests_pass_on_a_full_bucket_and_leave_debt() {
        let t0 = Instant::now();
        let c = RateLimitConfig { bandwidth: Some(bucket(1000, 1000)), ops: None };
        let mut l = RateLimiter::new_at(&c, t0).unwrap();
        assert!(l.consume_at(2500, 0, t0));
        assert_eq!(l.budget().0, Some(-1500));
        // The debt is paid before anything else goes: 1.5 s plus the
        // next request's own time.
        assert!(!l.consume_at(1, 0, t0 + Duration::from_millis(1500)));
        l.on_timer();
        assert!(l.consume_at(1, 0, t0 + Duration::from_millis(1501)));
        // Another oversized one waits for a full bucket.
        assert!(!l.consume_at(5000, 0, t0 + Duration::from_millis(2000)));
        l.on_timer();
        assert!(l.consume_at(5000, 0, t0 + Duration::from_millis(2501)));
    }

    #[test]
    fn the_timer_fires_when_tokens_are_back() {
        // 10 ops per 100 ms: after 10, the next is 10 ms away.
        let c = RateLimitConfig { bandwidth: None, ops: Some(bucket(10, 100)) };
        let mut l = RateLimiter::new(&c).unwrap();
        let fd = l.timer_fd().unwrap();
        let start = Instant::now();
        let mut n = 0;
        while l.consume(0, 1) {
            n += 1;
        }
        assert!(n >= 10, "the full bucket went out first");
        assert!(l.is_blocked());
        assert!(!readable(fd, 0), "nothing to do yet");
        assert!(readable(fd, 2000), "the timer fired");
        assert!(start.elapsed() >= Duration::from_millis(9));
        assert!(l.on_timer());
        assert!(!readable(fd, 0), "read: no longer readable");
        assert!(l.consume(0, 1), "tokens are back");
        // A spurious wake-up does not block (the descriptor is non-blocking).
        assert!(!l.on_timer());
    }

    #[test]
    fn sustained_rate_is_the_configured_rate() {
        // Clocked: 1 MB/s in 64 KiB requests over 10 simulated seconds.
        let t0 = Instant::now();
        let c = RateLimitConfig::per_second(Some(1_000_000), None);
        let mut l = RateLimiter::new_at(&c, t0).unwrap();
        let mut now = t0;
        let mut sent = 0u64;
        while now < t0 + Duration::from_secs(10) {
            if l.consume_at(65536, 1, now) {
                sent += 65536;
            } else {
                l.on_timer();
                now += Duration::from_millis(1);
            }
        }
        // One bucket of burst plus 10 s at the rate, within one request.
        let expected = 1_000_000 + 10 * 1_000_000;
        assert!(sent.abs_diff(expected) <= 65536, "sent {sent}, expected about {expected}");
    }
}
