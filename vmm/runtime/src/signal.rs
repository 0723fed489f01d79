//! Signals: names as `kill` takes them, for every front end (`vmrun
//! kill`, `vmrun-oci kill`; one table, `nix`'s), and the [`Relay`] that
//! every process owning a sandbox or a process in one (`vmrun run`, its
//! detached supervisor, `vmrun exec`, `vmrun-oci`'s supervisors) uses to
//! take its signals: forwarded to the container's process once it runs,
//! and before that, one way to cancel the start ([`Cancel`]).

use std::os::fd::RawFd;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::{Arc, Mutex};

use vmrun_agent_client::Client;

use crate::sandbox::Cancel;

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

/// The size of the terminal `fd`, if it is one with a size.
pub fn window_size(fd: RawFd) -> Option<(u16, u16)> {
    // SAFETY: TIOCGWINSZ fills the winsize it is given.
    let ws = unsafe {
        let mut ws: libc::winsize = std::mem::zeroed();
        (libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) == 0).then_some(ws)
    }?;
    (ws.ws_row > 0 && ws.ws_col > 0).then_some((ws.ws_row, ws.ws_col))
}

/// The process signals are forwarded to, once it runs.
#[derive(Debug, Clone)]
pub struct Target {
    pub client: Client,
    /// The container.
    pub id: String,
    /// The exec'd process, or `None` for the container's own.
    pub exec_id: Option<String>,
    /// The host terminal whose size the process's terminal follows
    /// (SIGWINCH becomes a resize), if it has one.
    pub terminal: Option<RawFd>,
}

/// Takes a process's signals in a thread of its own (`sigwait`). Once a
/// [`Target`] is set, they are forwarded to it (SIGWINCH as a resize of its
/// terminal). Before that, a signal cancels the start through the relay's
/// [`Cancel`] (the VMM being started is killed, a blocked wait is woken);
/// when there is nothing to cancel, the directory given (if any) is removed
/// and the process exits at once with 128+N, as the signal's default action
/// would end it.
#[derive(Debug, Clone)]
pub struct Relay(Arc<RelayState>);

#[derive(Debug)]
struct RelayState {
    cancel: Cancel,
    dir: Mutex<Option<PathBuf>>,
    target: Mutex<Option<Target>>,
}

impl Relay {
    /// Blocks `signals` (call it before any other thread starts: threads
    /// inherit the mask) and starts the thread that takes them.
    pub fn start(signals: &[libc::c_int], dir: Option<PathBuf>) -> Self {
        let set = block(signals);
        let relay = Self(Arc::new(RelayState { cancel: Cancel::default(), dir: Mutex::new(dir), target: Mutex::new(None) }));
        let me = relay.clone();
        std::thread::spawn(move || loop {
            let mut sig: libc::c_int = 0;
            // SAFETY: sigwait reads `set` and writes the signal number to `sig`.
            if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
                return;
            }
            me.take(sig);
        });
        relay
    }

    fn take(&self, sig: libc::c_int) {
        let target = self.0.target.lock().ok().and_then(|t| t.clone());
        match target {
            Some(t) if sig == libc::SIGWINCH => {
                if let Some((rows, cols)) = t.terminal.and_then(window_size) {
                    let _ = t.client.resize(&t.id, t.exec_id.as_deref(), rows, cols);
                }
            }
            Some(t) => {
                if let Err(e) = t.client.signal(&t.id, t.exec_id.as_deref(), sig) {
                    log::debug!("forwarding signal {sig}: {e}");
                }
            }
            None if sig == libc::SIGWINCH => {}
            None => {
                if !self.0.cancel.cancel(sig) {
                    if let Some(dir) = self.0.dir.lock().ok().and_then(|d| d.clone()) {
                        let _ = std::fs::remove_dir_all(dir);
                    }
                    std::process::exit(128 + sig);
                }
            }
        }
    }

    /// What a signal before the process runs cancels.
    pub fn cancel(&self) -> &Cancel {
        &self.0.cancel
    }

    /// The directory a signal removes when there is nothing to cancel.
    pub fn set_dir(&self, dir: &std::path::Path) {
        if let Ok(mut d) = self.0.dir.lock() {
            *d = Some(dir.to_path_buf());
        }
    }

    /// Signals go to `target` from now on.
    pub fn forward_to(&self, target: Target) {
        if let Ok(mut t) = self.0.target.lock() {
            *t = Some(target);
        }
    }

    /// Signals no longer go to a process (it ended).
    pub fn stop_forwarding(&self) {
        if let Ok(mut t) = self.0.target.lock() {
            *t = None;
        }
    }
}

/// Blocks `signals` in this thread and the threads it starts later;
/// returns the set for `sigwait`.
fn block(signals: &[libc::c_int]) -> libc::sigset_t {
    // SAFETY: builds a signal set and blocks it for this thread.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in signals {
            libc::sigaddset(&mut set, *s);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
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
