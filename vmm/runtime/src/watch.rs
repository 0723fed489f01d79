//! Waiting on events instead of sleeping and looking again.
//!
//! A waiter blocks in poll(2) on descriptors that the kernel makes
//! readable when something happens:
//! - a pidfd when its process ends ([`pidfd_open`] works for any process,
//!   not only our children; [`crate::container::ProcessRef::pidfd`] checks
//!   that the pid still names the same process);
//! - an inotify descriptor when a watched directory or file changes (state
//!   files are replaced by rename, logs grow).
//!
//! [`Waiter`] puts both together: a caller sets up what to watch, checks
//! its condition, and waits; anything that may have changed the answer
//! wakes it, and it checks again. Setting up the watches before the first
//! check means that no change between a check and the wait is missed.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::time::{Duration, Instant};

use crate::container::ProcessRef;

/// What a state directory does when its files are written: a file written
/// and closed, renamed into it or out, created, removed, or the directory
/// itself removed or moved.
pub const DIR_CHANGES: u32 = libc::IN_CLOSE_WRITE
    | libc::IN_MOVED_TO
    | libc::IN_MOVED_FROM
    | libc::IN_CREATE
    | libc::IN_DELETE
    | libc::IN_DELETE_SELF
    | libc::IN_MOVE_SELF;

/// What a growing file (a log) does: it is written to, or removed.
pub const FILE_GROWS: u32 = libc::IN_MODIFY | libc::IN_CLOSE_WRITE | libc::IN_DELETE_SELF | libc::IN_MOVE_SELF;

/// How long a [`Waiter`] that could not set up one of its watches sleeps
/// at most before its caller looks again.
const FALLBACK_TICK: Duration = Duration::from_millis(50);

/// A descriptor that becomes readable when the process `pid` ends;
/// close-on-exec. It names whatever process has the pid when it is opened:
/// for our own child not yet reaped that is the child; for another process
/// check afterwards that it is still the one meant
/// ([`crate::container::ProcessRef::pidfd`] does).
pub fn pidfd_open(pid: u32) -> std::io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0u32) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let fd = RawFd::try_from(fd).map_err(|_| std::io::Error::other("pidfd_open: descriptor out of range"))?;
    // SAFETY: a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Waits until `fd` is readable (or hung up), up to `deadline`: whether it
/// is.
pub fn poll_readable(fd: RawFd, deadline: Instant) -> std::io::Result<bool> {
    let mut p = [libc::pollfd { fd, events: libc::POLLIN, revents: 0 }];
    poll_until(&mut p, Some(deadline))
}

/// Waits until one of `fds` is readable (or hung up), up to `deadline`
/// (`None`: without end): whether one is. No descriptors and no deadline
/// is an error rather than a wait for ever.
pub fn wait(fds: &[BorrowedFd<'_>], deadline: Option<Instant>) -> std::io::Result<bool> {
    if fds.is_empty() && deadline.is_none() {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "nothing to wait for"));
    }
    let mut p: Vec<libc::pollfd> = fds.iter().map(|f| libc::pollfd { fd: f.as_raw_fd(), events: libc::POLLIN, revents: 0 }).collect();
    poll_until(&mut p, deadline)
}

/// poll(2) on `p` until one is ready or `deadline` passes; retries EINTR,
/// and a timeout that ends before the deadline (the kernel's clock and
/// ours differ by a fraction of a millisecond).
fn poll_until(p: &mut [libc::pollfd], deadline: Option<Instant>) -> std::io::Result<bool> {
    let n = libc::nfds_t::try_from(p.len()).map_err(|_| std::io::Error::other("too many descriptors"))?;
    loop {
        let (ms, left) = match deadline {
            None => (-1, Duration::MAX),
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                // Rounded up: a deadline a fraction of a millisecond away
                // must not turn into a busy loop of zero timeouts.
                (i32::try_from(left.as_micros().div_ceil(1000)).unwrap_or(i32::MAX), left)
            }
        };
        // SAFETY: poll on pollfds that live across the call; n is their
        // number.
        match unsafe { libc::poll(p.as_mut_ptr(), n, ms) } {
            r if r > 0 => return Ok(true),
            0 if left.is_zero() => return Ok(false),
            0 => continue,
            _ => {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
}

/// An inotify instance (non-blocking, close-on-exec) with its watches.
#[derive(Debug)]
pub struct Inotify {
    fd: OwnedFd,
}

impl Inotify {
    /// A new instance without watches.
    pub fn new() -> std::io::Result<Self> {
        // SAFETY: inotify_init1 takes flags and returns a new descriptor.
        let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: a new descriptor that nothing else owns.
        Ok(Self { fd: unsafe { OwnedFd::from_raw_fd(fd) } })
    }

    /// Watches `path` for the events in `mask` (`IN_*`, e.g.
    /// [`DIR_CHANGES`], [`FILE_GROWS`]).
    pub fn add(&self, path: &Path, mask: u32) -> std::io::Result<()> {
        let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "a NUL in the path"))?;
        // SAFETY: a NUL-terminated path that lives across the call.
        if unsafe { libc::inotify_add_watch(self.fd.as_raw_fd(), c.as_ptr(), mask) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Reads and drops the events queued so far (their only use is to
    /// wake a waiter): the descriptor is readable again only when
    /// something new happens.
    pub fn drain(&self) {
        let mut buf = [0u8; 4096];
        loop {
            // SAFETY: read into a buffer we own, at most its length.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n > 0 {
                continue;
            }
            if n < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return; // EAGAIN: nothing left (or an error there is nothing to do about)
        }
    }
}

impl AsFd for Inotify {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// What wakes a caller that waits for a change: watched directories and
/// files, and processes whose end matters.
///
/// Each process wakes it once, when it ends: a caller that checks again
/// sees that it is gone. Where a watch cannot be set up (no inotify
/// instances left, a kernel without pidfds), the waiter still works, by
/// waking its caller every [`FALLBACK_TICK`] at most.
#[derive(Debug, Default)]
pub struct Waiter {
    inotify: Option<Inotify>,
    /// Processes being watched, with their pidfds.
    procs: Vec<(ProcessRef, OwnedFd)>,
    /// Processes that ended (or were gone when added): not watched again.
    ended: Vec<ProcessRef>,
    /// Our children being watched (by pid), and those that ended.
    children: Vec<(u32, Option<OwnedFd>)>,
    /// A process was gone when it was added: the next wait returns at once.
    wake_now: bool,
    /// A watch could not be set up: waits are cut to [`FALLBACK_TICK`].
    degraded: bool,
}

impl Waiter {
    /// A waiter with nothing to watch yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Wakes on the events in `mask` on `path` (`IN_*`, e.g. [`DIR_CHANGES`],
    /// [`FILE_GROWS`]).
    pub fn watch(&mut self, path: &Path, mask: u32) -> &mut Self {
        let added = match &self.inotify {
            Some(i) => i.add(path, mask),
            None => Inotify::new().and_then(|i| {
                i.add(path, mask)?;
                self.inotify = Some(i);
                Ok(())
            }),
        };
        if let Err(e) = added {
            log::debug!("cannot watch {} ({e}): looking again every {} ms", path.display(), FALLBACK_TICK.as_millis());
            self.degraded = true;
        }
        self
    }

    /// Wakes when a file in the directory `dir` is written, renamed into it
    /// or removed, or when `dir` goes.
    pub fn watch_dir(&mut self, dir: &Path) -> &mut Self {
        self.watch(dir, DIR_CHANGES)
    }

    /// Wakes when `p` ends. A process already gone (or whose pid names
    /// another process now) makes the next wait return at once; one that
    /// is already watched, or has already woken this waiter, is not added
    /// again.
    pub fn process(&mut self, p: ProcessRef) -> &mut Self {
        if self.ended.contains(&p) || self.procs.iter().any(|(q, _)| *q == p) {
            return self;
        }
        match p.pidfd() {
            Ok(Some(fd)) => self.procs.push((p, fd)),
            Ok(None) => {
                self.ended.push(p);
                self.wake_now = true;
            }
            Err(e) => {
                log::debug!("no pidfd for process {} ({e}): looking again every {} ms", p.pid, FALLBACK_TICK.as_millis());
                self.degraded = true;
            }
        }
        self
    }

    /// Wakes when our child `pid` (not yet reaped, so that its pid cannot
    /// name another process) ends.
    pub fn child(&mut self, pid: u32) -> &mut Self {
        if self.children.iter().any(|(c, _)| *c == pid) {
            return self;
        }
        match pidfd_open(pid) {
            Ok(fd) => self.children.push((pid, Some(fd))),
            Err(e) => {
                log::debug!("no pidfd for process {pid} ({e}): looking again every {} ms", FALLBACK_TICK.as_millis());
                self.degraded = true;
            }
        }
        self
    }

    /// Waits until something watched happens, up to `deadline` (`None`:
    /// without end): whether something did (false: the deadline passed).
    /// Spurious wakes are possible: callers check their condition again.
    pub fn wait(&mut self, deadline: Option<Instant>) -> bool {
        if std::mem::take(&mut self.wake_now) {
            return true;
        }
        let nothing = self.inotify.is_none() && self.procs.is_empty() && self.children.iter().all(|(_, f)| f.is_none());
        let tick = (self.degraded || (nothing && deadline.is_none())).then(|| Instant::now() + FALLBACK_TICK);
        let until = match (deadline, tick) {
            (Some(d), Some(t)) => Some(d.min(t)),
            (d, t) => d.or(t),
        };
        let mut fds: Vec<BorrowedFd<'_>> = Vec::new();
        fds.extend(self.inotify.as_ref().map(|i| i.as_fd()));
        fds.extend(self.procs.iter().map(|(_, f)| f.as_fd()));
        fds.extend(self.children.iter().filter_map(|(_, f)| f.as_ref().map(|f| f.as_fd())));
        let woke = match wait(&fds, until) {
            Ok(w) => w,
            Err(e) => {
                log::debug!("poll: {e}; looking again in {} ms", FALLBACK_TICK.as_millis());
                self.degraded = true;
                std::thread::sleep(until.map_or(FALLBACK_TICK, |u| u.saturating_duration_since(Instant::now())));
                false
            }
        };
        if !woke {
            // The tick, not the deadline, may have ended it.
            return deadline.is_none_or(|d| Instant::now() < d);
        }
        if let Some(i) = &self.inotify {
            i.drain();
        }
        // A pidfd stays readable: each process wakes the waiter once.
        let (gone, live): (Vec<_>, Vec<_>) = std::mem::take(&mut self.procs).into_iter().partition(|(_, f)| readable(f.as_fd()));
        self.procs = live;
        self.ended.extend(gone.into_iter().map(|(p, _)| p));
        for (_, f) in &mut self.children {
            if f.as_ref().is_some_and(|f| readable(f.as_fd())) {
                *f = None;
            }
        }
        true
    }
}

/// Whether `fd` is readable now.
fn readable(fd: BorrowedFd<'_>) -> bool {
    let mut p = [libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 }];
    // SAFETY: poll on one pollfd that lives across the call, no timeout.
    unsafe { libc::poll(p.as_mut_ptr(), 1, 0) > 0 }
}

/// Waits until none of `procs` runs, up to `deadline`: whether they are
/// all gone.
pub fn wait_gone(procs: &[ProcessRef], deadline: Instant) -> bool {
    let mut w = Waiter::new();
    loop {
        let alive: Vec<ProcessRef> = procs.iter().copied().filter(ProcessRef::alive).collect();
        if alive.is_empty() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        for p in alive {
            w.process(p);
        }
        w.wait(Some(deadline));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn soon(ms: u64) -> Instant {
        Instant::now() + Duration::from_millis(ms)
    }

    #[test]
    fn a_child_ending_wakes_its_pidfd() {
        let mut child = std::process::Command::new("sleep").arg("0.2").spawn().unwrap();
        let fd = pidfd_open(child.id()).unwrap();
        let start = Instant::now();
        assert!(wait(&[fd.as_fd()], Some(soon(10_000))).unwrap());
        assert!(start.elapsed() < Duration::from_secs(5));
        assert!(child.try_wait().unwrap().is_some(), "the pidfd woke when the child ended");
    }

    #[test]
    fn a_waiter_wakes_when_a_process_it_watches_ends() {
        let mut child = std::process::Command::new("sleep").arg("0.2").spawn().unwrap();
        let p = ProcessRef::of(child.id()).unwrap();
        let mut w = Waiter::new();
        w.process(p);
        assert!(w.wait(Some(soon(10_000))));
        assert!(!p.alive());
        // Once it has woken the waiter, it is not watched again: the next
        // wait lasts to its deadline.
        w.process(p);
        let start = Instant::now();
        assert!(!w.wait(Some(soon(100))));
        assert!(start.elapsed() >= Duration::from_millis(100));
        child.wait().unwrap();
    }

    #[test]
    fn wait_gone_returns_once_the_processes_end() {
        let mut a = std::process::Command::new("sleep").arg("0.1").spawn().unwrap();
        let mut b = std::process::Command::new("sleep").arg("0.3").spawn().unwrap();
        let procs = [ProcessRef::of(a.id()).unwrap(), ProcessRef::of(b.id()).unwrap()];
        assert!(wait_gone(&procs, soon(10_000)));
        assert!(procs.iter().all(|p| !p.alive()));
        a.wait().unwrap();
        b.wait().unwrap();
        let mut c = std::process::Command::new("sleep").arg("10").spawn().unwrap();
        assert!(!wait_gone(&[ProcessRef::of(c.id()).unwrap()], soon(50)), "still running at the deadline");
        c.kill().unwrap();
        c.wait().unwrap();
    }

    #[test]
    fn a_rename_into_a_watched_directory_wakes_the_waiter() {
        let dir = tempfile::tempdir().unwrap();
        let tmp = dir.path().join(".state.json.1");
        std::fs::write(&tmp, b"{}").unwrap(); // before the watch: not an event
        let mut w = Waiter::new();
        w.watch_dir(dir.path());
        let path = dir.path().to_path_buf();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            std::fs::rename(&tmp, path.join("state.json")).unwrap();
        });
        let start = Instant::now();
        assert!(w.wait(Some(soon(10_000))));
        assert!(start.elapsed() >= Duration::from_millis(50), "woken by the rename, not at once");
        t.join().unwrap();
        // The events were read: the next wait lasts to its deadline.
        assert!(!w.wait(Some(soon(50))));
    }

    #[test]
    fn a_growing_file_wakes_the_waiter() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("container.log");
        let mut f = std::fs::File::create(&log).unwrap();
        let mut w = Waiter::new();
        w.watch(&log, FILE_GROWS);
        assert!(!w.wait(Some(soon(20))));
        std::io::Write::write_all(&mut f, b"more").unwrap();
        assert!(w.wait(Some(soon(10_000))));
    }

    #[test]
    fn without_events_the_deadline_passes() {
        let dir = tempfile::tempdir().unwrap();
        let mut child = std::process::Command::new("sleep").arg("10").spawn().unwrap();
        let mut w = Waiter::new();
        w.watch_dir(dir.path()).child(child.id()).process(ProcessRef::current().unwrap());
        let start = Instant::now();
        assert!(!w.wait(Some(soon(150))));
        let took = start.elapsed();
        assert!(took >= Duration::from_millis(150) && took < Duration::from_secs(5), "{took:?}");
        // A deadline already past returns at once.
        assert!(!w.wait(Some(Instant::now())));
        let fd = pidfd_open(child.id()).unwrap();
        assert!(!poll_readable(fd.as_raw_fd(), soon(1)).unwrap());
        child.kill().unwrap();
        assert!(w.wait(None), "a child ending wakes a wait without deadline");
        child.wait().unwrap();
    }

    #[test]
    fn a_process_ref_with_another_start_time_is_refused() {
        let me = ProcessRef::current().unwrap();
        assert!(me.pidfd().unwrap().is_some());
        let other = ProcessRef { start_time: me.start_time + 1, ..me };
        assert!(other.pidfd().unwrap().is_none(), "same pid, other process: no pidfd");
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let p = ProcessRef::of(child.id()).unwrap_or(ProcessRef { pid: child.id(), start_time: 0 });
        child.wait().unwrap();
        assert!(p.pidfd().unwrap().is_none(), "a process that ended");
        // Waiting on it returns at once, once.
        let mut w = Waiter::new();
        w.process(other);
        assert!(w.wait(Some(soon(10_000))));
        assert!(!w.wait(Some(soon(20))));
    }
}
