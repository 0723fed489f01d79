//! The container's pid on the host: a holder process in the spec's
//! namespaces.
//!
//! The container runs in the guest; its namespaces are the guest kernel's.
//! Callers of an OCI runtime also look at the host process the state's
//! `pid` names: they read `/proc/PID/ns/*`, enter its network namespace
//! (`nsenter -t PID -n`, a hook that sets up a network there), read its
//! cgroup. So that what they find there is what the spec asked, `create`
//! starts a holder, `vmrun-oci hold`, in the namespaces the spec names:
//! those with a `path` joined, the others made new (`pid` makes the holder
//! PID 1 of a new PID namespace; `user` a new user namespace with the
//! spec's maps), and none where the spec names none. The holder's pid is
//! the container's pid: the pid file's, the state's, the hooks'.
//!
//! The holder does nothing of the container's work: that is the
//! supervisor's, which stays in the host's namespaces, where the VM's
//! host resources are. The two share a socket pair: the holder passes on
//! the signals it is sent (each as a 4-byte number, delivered to the
//! supervisor as if sent to it), and the supervisor sends the container's
//! exit code (4 bytes) before it ends, which the holder exits with. A
//! holder whose supervisor died without a word exits with 137 (as if
//! killed); a supervisor whose holder died (SIGKILL, which cannot be
//! passed on) kills itself with SIGKILL, taking its VMM along: the
//! container is killed, as when its pid is under runc.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command};

use nix::sched::CloneFlags;
use serde::{Deserialize, Serialize};
use vmrun_agent_protocol::IdMapping;

use crate::error::{io, Error, Result};

/// The environment variable that gives the holder and the supervisor the
/// number of their end of the socket pair.
pub const FD_ENV: &str = "VMRUN_OCI_HOLDER_FD";

/// A namespace the holder is put in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostNamespace {
    /// Its type.
    pub kind: NsKind,
    /// The namespace to join; `None`: a new one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
}

/// The types of namespace a holder can be put in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NsKind {
    /// `pid`.
    Pid,
    /// `network`.
    Network,
    /// `mount`.
    Mount,
    /// `ipc`.
    Ipc,
    /// `uts`.
    Uts,
    /// `user`.
    User,
    /// `cgroup`.
    Cgroup,
}

impl NsKind {
    /// The spec's type, `None` for one the holder is not put in (`time`).
    pub fn of(t: oci_spec::runtime::LinuxNamespaceType) -> Option<Self> {
        use oci_spec::runtime::LinuxNamespaceType as T;
        Some(match t {
            T::Pid => Self::Pid,
            T::Network => Self::Network,
            T::Mount => Self::Mount,
            T::Ipc => Self::Ipc,
            T::Uts => Self::Uts,
            T::User => Self::User,
            T::Cgroup => Self::Cgroup,
            _ => return None,
        })
    }

    fn flag(self) -> CloneFlags {
        match self {
            Self::Pid => CloneFlags::CLONE_NEWPID,
            Self::Network => CloneFlags::CLONE_NEWNET,
            Self::Mount => CloneFlags::CLONE_NEWNS,
            Self::Ipc => CloneFlags::CLONE_NEWIPC,
            Self::Uts => CloneFlags::CLONE_NEWUTS,
            Self::User => CloneFlags::CLONE_NEWUSER,
            Self::Cgroup => CloneFlags::CLONE_NEWCGROUP,
        }
    }
}

/// A started holder: the process (not reaped: the caller's subreaper gets
/// its exit status) and the supervisor's end of the socket pair.
#[derive(Debug)]
pub struct Started {
    /// The holder.
    pub child: Child,
    /// The supervisor's end.
    pub socket: UnixStream,
}

/// Puts this thread's future children in the pid namespace the spec asks
/// for until dropped.
struct PidNsGuard {
    own: Option<File>,
}

impl PidNsGuard {
    fn enter(wanted: bool, joined: &[(File, HostNamespace)]) -> Result<Self> {
        if !wanted {
            return Ok(Self { own: None });
        }
        let own = File::open("/proc/thread-self/ns/pid").map_err(io("opening this process's pid namespace"))?;
        match joined.iter().find(|(_, n)| n.kind == NsKind::Pid) {
            Some((f, n)) => nix::sched::setns(f.as_fd(), CloneFlags::CLONE_NEWPID)
                .map_err(|e| Error::State(format!("joining the pid namespace {}: {e}", show(n))))?,
            None => nix::sched::unshare(CloneFlags::CLONE_NEWPID).map_err(|e| Error::State(format!("making a pid namespace: {e}")))?,
        }
        Ok(Self { own: Some(own) })
    }
}

impl Drop for PidNsGuard {
    fn drop(&mut self) {
        if let Some(own) = &self.own {
            // Back to this process's own pid namespace (always allowed).
            if let Err(e) = nix::sched::setns(own.as_fd(), CloneFlags::CLONE_NEWPID) {
                log::error!("returning to this process's pid namespace: {e}");
            }
        }
    }
}

fn show(n: &HostNamespace) -> String {
    n.path.as_ref().map_or_else(|| "(new)".into(), |p| p.display().to_string())
}

/// Starts `cmd` (`vmrun-oci hold`) in `namespaces`, with the user
/// namespace's maps when it makes one.
pub fn start(mut cmd: Command, namespaces: &[HostNamespace], uid_map: &[IdMapping], gid_map: &[IdMapping]) -> Result<Started> {
    let (mine, theirs) = UnixStream::pair().map_err(io("making the holder's socket pair"))?;
    let mut joined = Vec::new();
    for n in namespaces {
        if let Some(p) = &n.path {
            let f = File::open(p).map_err(io(format!("opening the {:?} namespace {}", n.kind, p.display())))?;
            joined.push((f, n.clone()));
        }
    }
    // Joined first (the user namespace last: once in it, this process's
    // privileges are its), then the new ones at once (a new user namespace
    // owns the others made with it). The pid namespace is this process's
    // choice for its children, made around the fork.
    let mut joins: Vec<(RawFd, libc::c_int)> =
        joined.iter().filter(|(_, n)| n.kind != NsKind::Pid).map(|(f, n)| (f.as_raw_fd(), n.kind.flag().bits())).collect();
    joins.sort_by_key(|(_, flag)| *flag == libc::CLONE_NEWUSER);
    let new = namespaces.iter().filter(|n| n.path.is_none() && n.kind != NsKind::Pid).fold(CloneFlags::empty(), |f, n| f | n.kind.flag());
    let fd = theirs.as_raw_fd();
    cmd.env(FD_ENV, fd.to_string());
    // The signals the holder passes on are blocked from before its exec
    // (the mask survives it), so that none sent early kills it.
    let mask = forwarded_set();
    // SAFETY: between fork and exec the closure makes only
    // async-signal-safe system calls (setsid, sigprocmask, fcntl, setns,
    // unshare) on descriptors and values prepared before the fork.
    unsafe {
        cmd.pre_exec(move || {
            libc::setsid();
            if libc::pthread_sigmask(libc::SIG_BLOCK, mask.as_ref(), std::ptr::null_mut()) != 0 {
                return Err(std::io::Error::other("blocking signals"));
            }
            if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            for &(nsfd, flag) in &joins {
                if libc::setns(nsfd, flag) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if !new.is_empty() && libc::unshare(new.bits()) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    };
    let child = {
        let _pid_ns = PidNsGuard::enter(namespaces.iter().any(|n| n.kind == NsKind::Pid), &joined)?;
        cmd.spawn().map_err(|e| {
            Error::State(format!("cannot put the container's pid in the namespaces it asks for ({}): {e}", list(namespaces)))
        })?
    };
    drop(theirs);
    if new.contains(CloneFlags::CLONE_NEWUSER) {
        for (file, map) in [("uid_map", uid_map), ("gid_map", gid_map)] {
            let text: String = map.iter().map(|m| format!("{} {} {}\n", m.container_id, m.host_id, m.size)).collect();
            if let Err(e) = std::fs::write(format!("/proc/{}/{file}", child.id()), text) {
                log::debug!("the holder's {file}: {e}");
            }
        }
    }
    Ok(Started { child, socket: mine })
}

fn list(namespaces: &[HostNamespace]) -> String {
    namespaces.iter().map(|n| format!("{:?} {}", n.kind, show(n))).collect::<Vec<_>>().join(", ")
}

/// The socket end named by [`FD_ENV`], if this process was given one
/// (marked close-on-exec, and the variable removed: children inherit
/// neither). Call it while the process has one thread.
pub fn inherited() -> Option<UnixStream> {
    let fd: RawFd = std::env::var(FD_ENV).ok()?.parse().ok()?;
    std::env::remove_var(FD_ENV);
    // SAFETY: fcntl on a descriptor number; fails harmlessly if not open.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } != 0 {
        return None;
    }
    // SAFETY: the descriptor was handed to this process for this use and
    // nothing else owns it.
    Some(UnixStream::from(unsafe { OwnedFd::from_raw_fd(fd) }))
}

/// The signals a holder passes on.
fn forwarded_set() -> nix::sys::signal::SigSet {
    let mut set = nix::sys::signal::SigSet::empty();
    for &s in crate::signals::FORWARDED {
        if let Ok(sig) = nix::sys::signal::Signal::try_from(s) {
            set.add(sig);
        }
    }
    set
}

/// `vmrun-oci hold`: the holder's life. Returns the exit code.
pub fn hold() -> i32 {
    let Some(mut socket) = inherited() else {
        eprintln!("vmrun-oci hold: started without its socket ({FD_ENV}); it is started by create");
        return 1;
    };
    let set = forwarded_set();
    if set.thread_block().is_err() {
        return 1;
    }
    let flags = nix::sys::signalfd::SfdFlags::SFD_NONBLOCK | nix::sys::signalfd::SfdFlags::SFD_CLOEXEC;
    let Ok(sigfd) = nix::sys::signalfd::SignalFd::with_flags(&set, flags) else { return 1 };
    loop {
        if let Err(e) = vmrun_runtime::watch::wait(&[socket.as_fd(), sigfd.as_fd()], None) {
            if e.kind() != std::io::ErrorKind::Interrupted {
                return 128 + libc::SIGKILL;
            }
        }
        while let Ok(Some(info)) = sigfd.read_signal() {
            if socket.write_all(&info.ssi_signo.to_le_bytes()).is_err() {
                break;
            }
        }
        let mut buf = [0u8; 4];
        match nonblocking_read(&mut socket, &mut buf) {
            Some(true) => return i32::from_le_bytes(buf),
            Some(false) => return 128 + libc::SIGKILL,
            None => {}
        }
    }
}

/// Reads 4 bytes if some are ready: `Some(true)` with them, `Some(false)`
/// at the end (or an error), `None` when nothing is ready.
fn nonblocking_read(socket: &mut UnixStream, buf: &mut [u8; 4]) -> Option<bool> {
    let mut p = [libc::pollfd { fd: socket.as_raw_fd(), events: libc::POLLIN, revents: 0 }];
    // SAFETY: poll of one valid descriptor, without waiting.
    if unsafe { libc::poll(p.as_mut_ptr(), 1, 0) } <= 0 || p[0].revents == 0 {
        return None;
    }
    Some(socket.read_exact(buf).is_ok())
}

/// The supervisor's side: passes the holder's signals on to this process
/// (its signal relay handles them as its own), and kills this process if
/// the holder dies first. [`Link::finish`] sends the exit code.
#[derive(Debug)]
pub struct Link {
    socket: UnixStream,
    done: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Link {
    /// Starts passing the holder's signals on.
    pub fn start(socket: UnixStream) -> Result<Self> {
        let mut reader = socket.try_clone().map_err(io("the holder's socket"))?;
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let finished = done.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4];
            while reader.read_exact(&mut buf).is_ok() {
                let sig = i32::from_le_bytes(buf);
                // SAFETY: a signal to this process, which handles it.
                unsafe { libc::kill(libc::getpid(), sig) };
            }
            if !finished.load(std::sync::atomic::Ordering::SeqCst) {
                log::error!("the container's pid (its holder) was killed: killing the container");
                // SAFETY: this process ends; its VMM dies with it.
                unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
            }
        });
        Ok(Self { socket, done })
    }

    /// Sends the container's exit code to the holder, which exits with it.
    pub fn finish(mut self, code: i32) {
        self.done.store(true, std::sync::atomic::Ordering::SeqCst);
        let _ = self.socket.write_all(&code.to_le_bytes());
    }
}
