//! Starting processes: a container's first process in new namespaces, or
//! another one inside a running container.
//!
//! Everything the child needs is prepared before `clone` ([`Plan`]): the
//! agent has other threads, so between `clone` and `execve` the child only
//! makes raw system calls (no allocation, no locks, no glibc wrapper that
//! keeps process-wide state such as `setresuid`). A setup step that fails
//! writes a 12-byte record (step, errno, exit code) to a close-on-exec pipe
//! and exits; a successful `execve` closes the pipe. The parent learns which
//! from the pipe without blocking ([`Started`]).
//!
//! Every process of a container is cloned straight into the container's
//! cgroup (`clone3` with `CLONE_INTO_CGROUP`, see `cgroup.rs`), so it
//! never runs outside it, and its limits hold from the first instruction.
//!
//! A container's first process:
//! `clone3(CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWUTS | CLONE_NEWIPC |
//! CLONE_PIDFD | CLONE_INTO_CGROUP)`, then in the child: standard streams, `pivot_root` into the
//! unpacked root (the old root detached whole), `/proc`,
//! `/sys`, a small `nodev` `/dev` (null, zero, full, random, urandom, tty
//! bound from the agent's own nodes; pts, shm), the configured mounts, the
//! spec's device nodes (bound the same way), the root's propagation,
//! kernel parameters, the root made read-only, read-only and masked paths
//! (see [`Op`]), host name, umask 022, rlimits, `oom_score_adj`, working
//! directory, capabilities and user as runc sets them (the bounding set dropped with
//! `PR_CAPBSET_DROP`, `PR_SET_KEEPCAPS` across groups and uid/gid, then the
//! effective, permitted and inheritable sets with `capset` and the ambient
//! ones raised), `no_new_privs` when asked, the seccomp filter, `execve`
//! along `PATH`. The seccomp filter goes in as late as possible, as runc
//! installs it: after `no_new_privs`, just before `execve`; a process
//! without `no_new_privs` needs `CAP_SYS_ADMIN` to install one, so it does
//! so before its capabilities and user change (the filter then applies to
//! those calls too, as under runc).
//!
//! A container's first process may be held (OCI `create`): with a
//! [`Plan::gate`], the child sets up the namespaces, root, mounts and host
//! name, writes a "ready" record to the error pipe and blocks reading the
//! gate; one byte from the agent (OCI `start`) lets it go on from the
//! rlimits, and the gate's end makes it exit. The steps that depend on who
//! runs the program (user, capabilities, seccomp) come after the gate.
//! A held child with a PID namespace of its own waits in the agent's own
//! address space rather than a copy of it (`shared`).
//!
//! An exec'd process: the agent thread enters the container's PID
//! namespace for its children (`setns(pidfd, CLONE_NEWPID)`), clones, and
//! returns to its own; the child enters the mount, UTS and IPC namespaces
//! (`setns(pidfd, ...)`, which also puts it at the container's root) and
//! goes on as above from the rlimits.
//!
//! Mount targets are resolved after `pivot_root`, so the image's symbolic
//! links cannot lead out of the container's root; the agent resolves them
//! beforehand too (`crate::paths`) so that a missing target behind a link is
//! made inside the root.

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};

use crate::caps::CapSets;
use crate::seccomp;
use crate::sys::{self, cstring};

mod shared;

/// `clone3`'s flag to start the child in the cgroup `clone_args.cgroup`
/// names (libc's constant has the wrong type).
const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// Exit code when the program cannot be run (docker's 126).
pub const EXIT_CANNOT_RUN: i32 = 126;
/// Exit code when the program is not found (docker's 127).
pub const EXIT_NOT_FOUND: i32 = 127;

/// One step of setting up a container's file system, run in the child.
#[derive(Debug)]
pub enum Op {
    /// `mount(2)`; when the target is missing, `mkdirs` are created first.
    Mount {
        /// Source.
        source: Option<CString>,
        /// Target.
        target: CString,
        /// File system type.
        fstype: Option<CString>,
        /// Flags.
        flags: libc::c_ulong,
        /// Data.
        data: Option<CString>,
        /// Directories to create (top down) if the target is missing.
        mkdirs: Vec<CString>,
    },
    /// Attaches a detached mount tree (from `open_tree(OPEN_TREE_CLONE)`
    /// in the agent) at `target` with `move_mount(2)`: how a mount made in
    /// the agent's view reaches the container's mount namespace (a plain
    /// bind of a path from another namespace is refused).
    Attach {
        /// The tree's descriptor (open in the child).
        tree: libc::c_int,
        /// Target.
        target: CString,
        /// Directories to create (top down) if the target is missing.
        mkdirs: Vec<CString>,
        /// The tree is a file: a missing target is made an empty file
        /// (the last of `mkdirs`), not a directory.
        file: bool,
    },
    /// Remounts a bind mount read-only (or with other flags), or changes
    /// a mount's propagation (`mount(NULL, target, NULL, flags, NULL)`).
    Remount {
        /// Target.
        target: CString,
        /// Flags (`MS_REMOUNT | MS_BIND | ...`).
        flags: libc::c_ulong,
    },
    /// A device node: an empty file made at `target` (it must not exist;
    /// directories above it are made when missing), and the agent's node at
    /// `source` bound onto it.
    BindNode {
        /// The agent's node.
        source: CString,
        /// Where, in the container.
        target: CString,
        /// Directories to create (top down; the last is the target's).
        mkdirs: Vec<CString>,
    },
    /// Detaches the mount at `target` and removes its directory.
    Unmount {
        /// Target.
        target: CString,
    },
    /// `mkdir(2)` (an existing directory is fine).
    Mkdir {
        /// Path.
        path: CString,
        /// Mode.
        mode: u32,
    },
    /// `symlink(2)`.
    Symlink {
        /// Link target.
        target: CString,
        /// Link path.
        path: CString,
    },
    /// Writes `data` to an existing file (a kernel parameter under
    /// `/proc/sys`).
    Write {
        /// Path.
        path: CString,
        /// What to write.
        data: Vec<u8>,
    },
    /// Makes a path read-only, as runc's `readonlyPath`: bound onto itself,
    /// then remounted read-only keeping its other flags. A missing path is
    /// skipped.
    ReadOnly {
        /// Path.
        path: CString,
    },
    /// Hides a path, as runc's `maskPath`: `/dev/null` bound onto a file, an
    /// empty read-only tmpfs onto a directory. A missing path is skipped.
    Mask {
        /// Path.
        path: CString,
    },
    /// A new instance of a kernel file system (`proc`), made before
    /// `pivot_root` (`fsopen`, `fsmount`) and attached at `target` with
    /// the other steps. In a user namespace of its own, a container may
    /// mount `proc` only while a fully visible one is in its mount
    /// namespace: the agent's, until `pivot_root` detaches it.
    Fresh {
        /// File system type.
        fstype: CString,
        /// Target.
        target: CString,
        /// `MOUNT_ATTR_*` flags.
        attrs: libc::c_uint,
        /// Directories to create (top down) if the target is missing.
        mkdirs: Vec<CString>,
        /// The detached mount, once the child made it (a descriptor of
        /// the child's, not the agent's).
        fd: std::sync::atomic::AtomicI32,
    },
}

impl Op {
    /// For error messages.
    pub fn describe(&self) -> String {
        match self {
            Op::Mount { target, fstype, .. } => {
                format!("mount {} on {}", fstype.as_deref().unwrap_or(c"bind").to_string_lossy(), target.to_string_lossy())
            }
            Op::Attach { target, .. } => format!("bind on {}", target.to_string_lossy()),
            Op::Remount { target, .. } => format!("remount {}", target.to_string_lossy()),
            Op::BindNode { target, .. } => format!("device node {}", target.to_string_lossy()),
            Op::Unmount { target } => format!("unmount {}", target.to_string_lossy()),
            Op::Mkdir { path, .. } => format!("mkdir {}", path.to_string_lossy()),
            Op::Symlink { path, .. } => format!("symlink {}", path.to_string_lossy()),
            Op::Write { path, .. } => format!("writing {}", path.to_string_lossy()),
            Op::ReadOnly { path } => format!("read-only path {}", path.to_string_lossy()),
            Op::Mask { path } => format!("masked path {}", path.to_string_lossy()),
            Op::Fresh { fstype, target, .. } => format!("mount {} on {}", fstype.to_string_lossy(), target.to_string_lossy()),
        }
    }
}

/// Standard streams of the child, as descriptors in the agent.
#[derive(Debug)]
pub struct ChildStdio {
    /// Descriptors to become 0, 1, 2.
    pub fds: [OwnedFd; 3],
    /// Whether they are a terminal (the child makes it its controlling
    /// terminal).
    pub tty: bool,
}

/// How the child enters its container.
#[derive(Debug)]
pub enum Enter {
    /// A new container: new namespaces, `pivot_root` into `rootfs`, then
    /// `ops`, then the host name.
    New {
        /// The unpacked root (a mount point).
        rootfs: CString,
        /// File system setup after `pivot_root`.
        ops: Vec<Op>,
        /// Host name (not set when `join` gives the UTS namespace).
        hostname: CString,
        /// Another container's IPC and UTS namespaces to share.
        join: Option<Join>,
    },
    /// An existing container, through a pidfd of its first process.
    Existing {
        /// pidfd of the container's first process.
        pidfd: RawFd,
        /// The agent's own pidfd, to return to its PID namespace.
        own_pidfd: RawFd,
    },
}

/// The IPC and UTS namespaces a new container shares with another (a pod's
/// sandbox): the agent enters them for the `clone` and returns to its own.
#[derive(Debug, Clone, Copy)]
pub struct Join {
    /// The other container's IPC namespace.
    pub ipc: RawFd,
    /// The other container's UTS namespace.
    pub uts: RawFd,
    /// The agent's own IPC namespace.
    pub own_ipc: RawFd,
    /// The agent's own UTS namespace.
    pub own_uts: RawFd,
    /// The other container's first process's pidfd and the agent's own,
    /// when the PID namespace is shared too.
    pub pid: Option<(RawFd, RawFd)>,
}

impl Join {
    /// The calling thread enters `ipc` and `uts` (the agent's own after a
    /// clone).
    fn enter(ipc: RawFd, uts: RawFd) -> io::Result<()> {
        // SAFETY: setns on descriptors of namespaces; it changes only this
        // thread's IPC and UTS namespaces.
        sys::cvt(unsafe { libc::setns(ipc, libc::CLONE_NEWIPC) })?;
        // SAFETY: as above.
        sys::cvt(unsafe { libc::setns(uts, libc::CLONE_NEWUTS) }).map(drop)
    }
}

/// Everything the child needs, prepared before `clone`.
#[derive(Debug)]
pub struct Plan {
    /// How to enter the container.
    pub enter: Enter,
    /// Standard streams.
    pub stdio: ChildStdio,
    /// Paths to try `execve` on, in order (the `PATH` search).
    pub candidates: Vec<CString>,
    /// argv.
    pub argv: Vec<CString>,
    /// envp.
    pub envp: Vec<CString>,
    /// Working directory, and the directories to create if it is missing.
    pub cwd: CString,
    /// Directories to create, top down, when `cwd` is missing.
    pub cwd_mkdirs: Vec<CString>,
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
    /// Supplementary groups.
    pub groups: Vec<libc::gid_t>,
    /// Resource limits.
    pub rlimits: Vec<(libc::c_int, libc::rlimit)>,
    /// Capability sets.
    pub caps: CapSets,
    /// Whether to set `no_new_privs`.
    pub no_new_privs: bool,
    /// The seccomp filter to install, if any.
    pub seccomp: Option<seccomp::Filter>,
    /// What to write to `/proc/self/oom_score_adj` (a decimal number).
    pub oom_score_adj: Option<String>,
    /// The container's cgroup (a directory descriptor), which the child
    /// is cloned into; `None`: the agent's own.
    pub cgroup: Option<RawFd>,
    /// Hold the child once its container is set up, until a byte arrives
    /// on this pipe (read end, write end: the child closes its copy of
    /// the write end). Only for [`Enter::New`].
    pub gate: Option<(RawFd, RawFd)>,
    /// The container's user namespace: made with these maps
    /// ([`Enter::New`]: the agent writes them, and the rlimits and
    /// `oom_score_adj`, which need the guest's privileges, before the
    /// child goes on), or joined ([`Enter::Existing`], limits set before).
    pub user_ns: Option<IdMaps>,
    /// Descriptors the steps refer to (detached mount trees), held until
    /// the child is cloned.
    pub keep: Vec<OwnedFd>,
}

/// A user namespace's maps, as written to `/proc/PID/uid_map` and
/// `gid_map` (`container-id guest-id count` lines).
#[derive(Debug, Clone)]
pub struct IdMaps {
    /// The uid map.
    pub uid_map: String,
    /// The gid map.
    pub gid_map: String,
}

/// What the error pipe said so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The child reached its program (the pipe closed on `execve`).
    Running,
    /// The child is set up and waits at its gate.
    Held,
}

/// A process just cloned; [`Started::result`] tells whether it reached
/// `execve`.
#[derive(Debug)]
pub struct Started {
    /// Its pid.
    pub pid: i32,
    /// Its pidfd.
    pub pidfd: OwnedFd,
    /// Read end of the error pipe.
    pub errors: OwnedFd,
}

/// Why the child did not reach the program.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartFailure {
    /// The exit code it exited with (126 or 127).
    pub exit_code: i32,
    /// What failed.
    pub message: String,
}

const STEP_STDIO: u32 = 1;
const STEP_ROOT: u32 = 2;
const STEP_NAMESPACES: u32 = 3;
const STEP_HOSTNAME: u32 = 4;
const STEP_RLIMIT: u32 = 5;
const STEP_CWD: u32 = 6;
const STEP_USER: u32 = 7;
const STEP_EXEC: u32 = 8;
const STEP_CAPS: u32 = 9;
const STEP_NO_NEW_PRIVS: u32 = 10;
const STEP_SECCOMP: u32 = 11;
const STEP_OOM_SCORE_ADJ: u32 = 12;
/// Not a failure: the held child is ready (errno and code 0).
const STEP_READY: u32 = 13;
/// The gate closed without its byte: the start was called off.
const STEP_GATE: u32 = 14;
const STEP_USER_NS: u32 = 15;
const STEP_OPS: u32 = 100;

/// The `PATH` search: where `execve` is tried for `arg0`.
pub fn candidates(arg0: &str, path: &str) -> io::Result<Vec<CString>> {
    if arg0.contains('/') {
        return Ok(vec![cstring(arg0)?]);
    }
    let mut v = Vec::new();
    for dir in path.split(':') {
        let dir = if dir.is_empty() { "." } else { dir };
        v.push(cstring(format!("{}/{arg0}", dir.trim_end_matches('/')))?);
    }
    Ok(v)
}

/// Top-down list of the directories of an absolute path (`/a/b` gives
/// `/a`, `/a/b`).
pub fn mkdirs_for(path: &str) -> io::Result<Vec<CString>> {
    let mut v = Vec::new();
    let mut cur = String::new();
    for c in path.split('/').filter(|c| !c.is_empty() && *c != ".") {
        cur.push('/');
        cur.push_str(c);
        v.push(cstring(cur.as_str())?);
    }
    Ok(v)
}

/// What the child does after its container is set up, as pointers made
/// before `clone`; a held child may be released with another
/// ([`crate::release`]).
struct Tail<'a> {
    argv: &'a [*const libc::c_char],
    envp: &'a [*const libc::c_char],
    candidates: &'a [*const libc::c_char],
    cwd: *const libc::c_char,
    cwd_mkdirs: &'a [*const libc::c_char],
    uid: u32,
    gid: u32,
    groups: &'a [libc::gid_t],
    caps: CapSets,
    no_new_privs: bool,
}

/// A held child's gate and the buffers it decodes a release into.
struct Gate {
    read: RawFd,
    write: RawFd,
    buf: Vec<u8>,
    ptrs: Vec<*const libc::c_char>,
    groups: Vec<libc::gid_t>,
}

/// Pointer arrays for `execve` and the directories of the working
/// directory, built before `clone` from a plan.
struct Pointers {
    argv: Vec<*const libc::c_char>,
    envp: Vec<*const libc::c_char>,
    candidates: Vec<*const libc::c_char>,
    cwd_mkdirs: Vec<*const libc::c_char>,
}

impl Pointers {
    fn new(plan: &Plan) -> Self {
        let nul_ended = |v: &[CString]| v.iter().map(|a| a.as_ptr()).chain(std::iter::once(std::ptr::null())).collect();
        Pointers {
            argv: nul_ended(&plan.argv),
            envp: nul_ended(&plan.envp),
            candidates: plan.candidates.iter().map(|c| c.as_ptr()).collect(),
            cwd_mkdirs: plan.cwd_mkdirs.iter().map(|c| c.as_ptr()).collect(),
        }
    }

    fn tail<'a>(&'a self, plan: &'a Plan) -> Tail<'a> {
        Tail {
            argv: &self.argv,
            envp: &self.envp,
            candidates: &self.candidates,
            cwd: plan.cwd.as_ptr(),
            cwd_mkdirs: &self.cwd_mkdirs,
            uid: plan.uid,
            gid: plan.gid,
            groups: &plan.groups,
            caps: plan.caps,
            no_new_privs: plan.no_new_privs,
        }
    }
}

impl Gate {
    /// Where a held child reads what it is released with (it may not
    /// allocate).
    fn new((read, write): (RawFd, RawFd)) -> Self {
        Gate {
            read,
            write,
            buf: vec![0u8; crate::release::MAX_BYTES],
            ptrs: vec![std::ptr::null(); crate::release::MAX_STRINGS],
            groups: vec![0; crate::release::MAX_GROUPS],
        }
    }
}

/// Enters, for this thread's next child, the namespaces `plan` joins (a
/// pod's IPC and UTS, perhaps its PID namespace, or an existing
/// container's PID namespace), and returns the `clone` flags of the
/// namespaces the child gets new. On an error this thread is back in its
/// own.
fn enter_for_clone(plan: &Plan, new_user_ns: bool) -> io::Result<libc::c_int> {
    let user = if new_user_ns { libc::CLONE_NEWUSER } else { 0 };
    match plan.enter {
        Enter::New { join: Some(j), .. } => {
            // Its child is created in the other container's IPC and UTS
            // namespaces.
            if let Err(e) = Join::enter(j.ipc, j.uts) {
                leave_after_clone(plan);
                return Err(e);
            }
            // A shared PID namespace: the child is made in the other's.
            if let Some((other, _)) = j.pid {
                // SAFETY: setns on a pidfd the caller holds; it changes
                // only which PID namespace this thread's next child is
                // created in.
                if let Err(e) = sys::cvt(unsafe { libc::setns(other, libc::CLONE_NEWPID) }) {
                    leave_after_clone(plan);
                    return Err(e);
                }
            }
            let new_pid = if j.pid.is_some() { 0 } else { libc::CLONE_NEWPID };
            Ok(libc::CLONE_NEWNS | new_pid | user)
        }
        Enter::New { join: None, .. } => Ok(libc::CLONE_NEWNS | libc::CLONE_NEWPID | libc::CLONE_NEWUTS | libc::CLONE_NEWIPC | user),
        Enter::Existing { pidfd, .. } => {
            // SAFETY: setns on a pidfd we hold; it changes only which PID
            // namespace this thread's next child is created in.
            sys::cvt(unsafe { libc::setns(pidfd, libc::CLONE_NEWPID) })?;
            Ok(0)
        }
    }
}

/// Returns this thread to the agent's own namespaces after
/// [`enter_for_clone`].
fn leave_after_clone(plan: &Plan) {
    let own_pid = match plan.enter {
        Enter::New { join: Some(j), .. } => {
            if let Err(e) = Join::enter(j.own_ipc, j.own_uts) {
                crate::log::error(format_args!("cannot return to the agent's IPC and UTS namespaces: {e}"));
            }
            j.pid.map(|(_, own)| own)
        }
        Enter::Existing { own_pidfd, .. } => Some(own_pidfd),
        Enter::New { join: None, .. } => None,
    };
    // SAFETY: back to this process's own PID namespace for children.
    if own_pid.is_some_and(|own| unsafe { libc::setns(own, libc::CLONE_NEWPID) } != 0) {
        crate::log::error(format_args!("cannot return to the agent's PID namespace: {}", sys::errno()));
    }
}

/// Clones the child of `plan` and returns in the parent as soon as the
/// child exists (its pid and pidfd known).
///
/// A held first process with a PID namespace of its own shares the
/// agent's memory until it execs (see `shared`); every other child gets
/// a copy of it, as with `fork`.
pub fn spawn(plan: Plan) -> io::Result<Started> {
    if shared::applies(&plan) {
        return shared::spawn(plan);
    }
    let (err_r, err_w) = sys::pipe(0)?;
    let pointers = Pointers::new(&plan);
    let tail = pointers.tail(&plan);
    let mut gate = plan.gate.map(Gate::new);
    let mut pidfd: libc::c_int = -1;
    let user_ns_sync = user_ns_sync(&plan)?;
    let flags = enter_for_clone(&plan, user_ns_sync.is_some())?;
    // SAFETY: clone_args is plain integers; all-zero is valid.
    let mut args: libc::clone_args = unsafe { std::mem::zeroed() };
    args.flags = (flags | libc::CLONE_PIDFD) as u64 | plan.cgroup.map_or(0, |_| CLONE_INTO_CGROUP);
    args.pidfd = &mut pidfd as *mut libc::c_int as u64;
    args.exit_signal = libc::SIGCHLD as u64;
    args.cgroup = plan.cgroup.map_or(0, |fd| fd as u64);
    // SAFETY: clone3 without CLONE_VM and without a stack (0, size 0)
    // behaves like fork: the child gets a copy of this address space and
    // runs `child(plan)`, which only makes raw system calls on data
    // prepared above and never returns. `pidfd` receives the child's
    // pidfd; `args` outlives the call.
    let pid = unsafe { libc::syscall(libc::SYS_clone3, &mut args as *mut libc::clone_args, std::mem::size_of::<libc::clone_args>()) };
    if pid == 0 {
        child(&plan, err_w.as_raw_fd(), &tail, gate.as_mut(), user_ns_sync.as_ref().map(|(r, _)| r.as_raw_fd()));
    }
    let clone_err = sys::errno();
    leave_after_clone(&plan);
    if pid < 0 {
        return Err(clone_err);
    }
    drop(err_w);
    // SAFETY: CLONE_PIDFD stored a new descriptor that we now own.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
    finish_user_ns(pid as i32, &plan, user_ns_sync.as_ref().map(|(_, go)| go.as_fd()))?;
    Ok(Started { pid: pid as i32, pidfd, errors: err_r })
}

/// The pipe a child in a new user namespace waits on for its maps (read
/// end, write end); `None` for any other child.
fn user_ns_sync(plan: &Plan) -> io::Result<Option<(OwnedFd, OwnedFd)>> {
    match (&plan.enter, &plan.user_ns) {
        (Enter::New { .. }, Some(_)) => sys::pipe(0).map(Some),
        _ => Ok(None),
    }
}

/// For a child in a new user namespace (`go`, the write end of the pipe
/// it waits on): its maps and limits ([`set_up_user_ns`]); on an error the
/// child, which never ran anything of its own, is killed.
fn finish_user_ns(pid: i32, plan: &Plan, go: Option<BorrowedFd<'_>>) -> io::Result<()> {
    if let (Some(go), Some(maps)) = (go, &plan.user_ns) {
        if let Err(e) = set_up_user_ns(pid, maps, plan, go) {
            let _ = sys::kill(pid, libc::SIGKILL);
            return Err(e);
        }
    }
    Ok(())
}

/// From the agent, for a child in a new user namespace: its maps, then
/// what only the guest's root may do (raise hard rlimits, lower
/// `oom_score_adj`), then the byte that lets it go on.
fn set_up_user_ns(pid: i32, maps: &IdMaps, plan: &Plan, go: BorrowedFd<'_>) -> io::Result<()> {
    let write = |file: &str, data: &[u8]| -> io::Result<()> {
        let path = cstring(format!("/proc/{pid}/{file}"))?;
        let fd = sys::open(&path, libc::O_WRONLY, 0)?;
        // One write: the kernel takes a map in a single write only.
        match sys::write(fd.as_fd(), data) {
            Ok(n) if n == data.len() => Ok(()),
            Ok(_) => Err(io::Error::new(io::ErrorKind::WriteZero, format!("{file}: short write"))),
            Err(e) => Err(io::Error::new(e.kind(), format!("{file}: {e}"))),
        }
    };
    write("uid_map", maps.uid_map.as_bytes())?;
    write("gid_map", maps.gid_map.as_bytes())?;
    for (res, lim) in &plan.rlimits {
        // SAFETY: prlimit64 of our child, reading one rlimit.
        let r = unsafe { libc::syscall(libc::SYS_prlimit64, pid, *res, lim as *const libc::rlimit, std::ptr::null_mut::<libc::rlimit>()) };
        if r < 0 {
            let e = sys::errno();
            return Err(io::Error::new(e.kind(), format!("rlimit {res}: {e}")));
        }
    }
    if let Some(adj) = &plan.oom_score_adj {
        write("oom_score_adj", adj.as_bytes())?;
    }
    sys::write_all(go, &[1])
}

/// Reads the child's verdict from the error pipe (once it is readable):
/// whether it ran the program or waits at its gate, or why it failed.
pub fn read_verdict(errors: BorrowedFd<'_>, plan_ops: &[String], arg0: &str) -> Result<Verdict, StartFailure> {
    let mut rec = [0u8; 12];
    let n = sys::read(errors, &mut rec).unwrap_or(0);
    if n < 12 {
        return Ok(Verdict::Running);
    }
    let step = u32::from_ne_bytes([rec[0], rec[1], rec[2], rec[3]]);
    if step == STEP_READY {
        return Ok(Verdict::Held);
    }
    let errno = i32::from_ne_bytes([rec[4], rec[5], rec[6], rec[7]]);
    let exit_code = i32::from_ne_bytes([rec[8], rec[9], rec[10], rec[11]]);
    let err = io::Error::from_raw_os_error(errno);
    let what = match step {
        STEP_EXEC if exit_code == EXIT_NOT_FOUND => {
            return Err(StartFailure { exit_code, message: format!("exec: {arg0:?}: executable file not found in $PATH") })
        }
        STEP_EXEC => return Err(StartFailure { exit_code, message: format!("exec: {arg0:?}: {err}") }),
        STEP_STDIO => "standard streams".to_string(),
        STEP_ROOT => "entering the container root".to_string(),
        STEP_NAMESPACES => "entering the container's namespaces".to_string(),
        STEP_HOSTNAME => "setting the host name".to_string(),
        STEP_RLIMIT => "setting resource limits".to_string(),
        STEP_CWD => "changing to the working directory".to_string(),
        STEP_USER => "changing user".to_string(),
        STEP_CAPS => "setting capabilities".to_string(),
        STEP_NO_NEW_PRIVS => "setting no_new_privs".to_string(),
        STEP_SECCOMP => "installing the seccomp filter".to_string(),
        STEP_OOM_SCORE_ADJ => "setting oom_score_adj".to_string(),
        STEP_GATE => "waiting to be started".to_string(),
        STEP_USER_NS => "becoming root of the user namespace".to_string(),
        s if s >= STEP_OPS => plan_ops.get((s - STEP_OPS) as usize).cloned().unwrap_or_else(|| "container setup".into()),
        _ => "setup".to_string(),
    };
    Err(StartFailure { exit_code, message: format!("cannot start the process: {what}: {err}") })
}

// ---- The child. Only raw system calls from here on. ----

fn fail(errfd: RawFd, step: u32, errno: i32, code: i32) -> ! {
    let mut rec = [0u8; 12];
    rec[0..4].copy_from_slice(&step.to_ne_bytes());
    rec[4..8].copy_from_slice(&errno.to_ne_bytes());
    rec[8..12].copy_from_slice(&code.to_ne_bytes());
    // SAFETY: writing a stack buffer to the error pipe, then exiting
    // without running any destructor or atexit handler.
    unsafe {
        libc::write(errfd, rec.as_ptr().cast(), rec.len());
        libc::_exit(code)
    }
}

/// Reads exactly `buf.len()` bytes from the gate; false at its end.
fn read_gate(fd: RawFd, buf: &mut [u8]) -> bool {
    let mut got = 0;
    while got < buf.len() {
        // SAFETY: reading into the unread part of `buf`.
        let n = unsafe { libc::read(fd, buf[got..].as_mut_ptr().cast(), buf.len() - got) };
        match n {
            n if n > 0 => got += n as usize,
            n if n < 0 && last_errno() == libc::EINTR => {}
            _ => return false,
        }
    }
    true
}

/// The held child: says it is ready, then waits on the gate for its
/// release: `1` (run as planned) or `2`, a length and a release
/// ([`crate::release`]) to run instead. The gate's end without either
/// calls the start off.
fn hold(errfd: RawFd, gate: &mut Gate) -> Option<crate::release::View<'_>> {
    let mut rec = [0u8; 12];
    rec[0..4].copy_from_slice(&STEP_READY.to_ne_bytes());
    // SAFETY: raw system calls in the child on descriptors it holds and a
    // stack buffer.
    unsafe {
        libc::close(gate.write);
        // It may wait long (in a template's snapshot): it keeps none of the
        // agent's descriptors (they close at execve otherwise), least of
        // all its vsock sockets, which a restored guest must free for the
        // host's next connection.
        let (a, b) = (errfd.min(gate.read) as libc::c_uint, errfd.max(gate.read) as libc::c_uint);
        for (first, last) in [(3, a.wrapping_sub(1)), (a + 1, b.wrapping_sub(1)), (b + 1, libc::c_uint::MAX)] {
            if first <= last && last >= 3 {
                libc::syscall(libc::SYS_close_range, first, last, 0);
            }
        }
        if libc::write(errfd, rec.as_ptr().cast(), rec.len()) != rec.len() as isize {
            fail(errfd, STEP_GATE, last_errno(), EXIT_CANNOT_RUN);
        }
    }
    let mut kind = [0u8; 1];
    if !read_gate(gate.read, &mut kind) {
        fail(errfd, STEP_GATE, libc::ECANCELED, EXIT_CANNOT_RUN);
    }
    let released = match kind[0] {
        1 => None,
        2 => {
            let mut len = [0u8; 4];
            let n = if read_gate(gate.read, &mut len) { u32::from_ne_bytes(len) as usize } else { usize::MAX };
            if n > gate.buf.len() || !read_gate(gate.read, &mut gate.buf[..n]) {
                fail(errfd, STEP_GATE, libc::EINVAL, EXIT_CANNOT_RUN);
            }
            match crate::release::decode(&gate.buf[..n], &mut gate.ptrs, &mut gate.groups) {
                Some(v) => Some(v),
                None => fail(errfd, STEP_GATE, libc::EINVAL, EXIT_CANNOT_RUN),
            }
        }
        _ => fail(errfd, STEP_GATE, libc::EINVAL, EXIT_CANNOT_RUN),
    };
    // SAFETY: closing the gate, which this child holds.
    unsafe { libc::close(gate.read) };
    released
}

fn last_errno() -> i32 {
    // SAFETY: reads this thread's errno.
    unsafe { *libc::__errno_location() }
}

fn check(r: libc::c_long, errfd: RawFd, step: u32) {
    if r < 0 {
        fail(errfd, step, last_errno(), EXIT_CANNOT_RUN);
    }
}

fn mkdirs(dirs: &[CString]) {
    for d in dirs {
        // SAFETY: NUL-terminated path; EEXIST is expected for existing parts.
        unsafe { libc::mkdir(d.as_ptr(), 0o755) };
    }
}

/// Attaches the detached mount `tree` at `target` (`move_mount`); a
/// missing target is made first (an empty file when `file`).
fn attach(tree: libc::c_int, target: &CStr, dirs: &[CString], file: bool) -> libc::c_int {
    const MOVE_MOUNT_F_EMPTY_PATH: libc::c_long = 4;
    // SAFETY: raw system calls on a descriptor and NUL-terminated paths
    // prepared before clone.
    unsafe {
        let m = || libc::syscall(libc::SYS_move_mount, tree, c"".as_ptr(), libc::AT_FDCWD, target.as_ptr(), MOVE_MOUNT_F_EMPTY_PATH) as libc::c_int;
        let mut r = m();
        if r < 0 && last_errno() == libc::ENOENT && !dirs.is_empty() {
            if file {
                mkdirs(&dirs[..dirs.len() - 1]);
                let fd = libc::open(target.as_ptr(), libc::O_WRONLY | libc::O_CREAT | libc::O_NOFOLLOW | libc::O_CLOEXEC, 0o644);
                if fd >= 0 {
                    libc::close(fd);
                }
            } else {
                mkdirs(dirs);
            }
            r = m();
        }
        r
    }
}

fn run_op(op: &Op) -> libc::c_int {
    let p = |s: &Option<CString>| s.as_deref().map_or(std::ptr::null(), CStr::as_ptr);
    // SAFETY: in every arm, each pointer is a NUL-terminated string
    // prepared before clone, or null where the call allows it.
    unsafe {
        match op {
            Op::Mount { source, target, fstype, flags, data, mkdirs: dirs } => {
                let m = || libc::mount(p(source), target.as_ptr(), p(fstype), *flags, p(data).cast());
                let mut r = m();
                if r < 0 && last_errno() == libc::ENOENT && !dirs.is_empty() {
                    mkdirs(dirs);
                    r = m();
                }
                r
            }
            Op::Attach { tree, target, mkdirs: dirs, file } => attach(*tree, target, dirs, *file),
            Op::Fresh { target, mkdirs: dirs, fd, .. } => attach(fd.load(std::sync::atomic::Ordering::Relaxed), target, dirs, false),
            Op::Remount { target, flags } => libc::mount(std::ptr::null(), target.as_ptr(), std::ptr::null(), *flags, std::ptr::null()),
            // Into the fresh tmpfs on /dev: a file already there is not
            // ours, so it is an error, not taken as the node asked for.
            Op::BindNode { source, target, mkdirs: dirs } => {
                if !dirs.is_empty() {
                    mkdirs(&dirs[..dirs.len() - 1]);
                }
                // mknod of a regular file: one call where open and close
                // are two; it fails on anything already there.
                if libc::mknod(target.as_ptr(), libc::S_IFREG | 0o600, 0) < 0 {
                    return -1;
                }
                libc::mount(source.as_ptr(), target.as_ptr(), std::ptr::null(), libc::MS_BIND, std::ptr::null())
            }
            Op::Unmount { target } => {
                if libc::umount2(target.as_ptr(), libc::MNT_DETACH) < 0 {
                    return -1;
                }
                libc::rmdir(target.as_ptr())
            }
            Op::Mkdir { path, mode } => {
                let r = libc::mkdir(path.as_ptr(), *mode);
                if r < 0 && last_errno() == libc::EEXIST {
                    0
                } else {
                    r
                }
            }
            Op::Symlink { target, path } => {
                let r = libc::symlink(target.as_ptr(), path.as_ptr());
                if r < 0 && last_errno() == libc::EEXIST {
                    0
                } else {
                    r
                }
            }
            Op::Write { path, data } => {
                let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_NOFOLLOW | libc::O_CLOEXEC);
                if fd < 0 {
                    return -1;
                }
                let n = libc::write(fd, data.as_ptr().cast(), data.len());
                let e = last_errno();
                libc::close(fd);
                if n < 0 || n as usize != data.len() {
                    *libc::__errno_location() = if n < 0 { e } else { libc::EIO };
                    return -1;
                }
                0
            }
            Op::ReadOnly { path } => {
                if libc::mount(path.as_ptr(), path.as_ptr(), std::ptr::null(), libc::MS_BIND | libc::MS_REC, std::ptr::null()) < 0 {
                    return if last_errno() == libc::ENOENT { 0 } else { -1 };
                }
                let mut st = KernelStatfs::default();
                if libc::syscall(libc::SYS_statfs, path.as_ptr(), &mut st as *mut KernelStatfs) < 0 {
                    return -1;
                }
                let flags = libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | kept_flags(st.flags as libc::c_ulong);
                libc::mount(std::ptr::null(), path.as_ptr(), std::ptr::null(), flags, std::ptr::null())
            }
            Op::Mask { path } => {
                if libc::mount(c"/dev/null".as_ptr(), path.as_ptr(), std::ptr::null(), libc::MS_BIND, std::ptr::null()) == 0 {
                    return 0;
                }
                match last_errno() {
                    libc::ENOENT => 0,
                    libc::ENOTDIR => {
                        let flags = libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
                        libc::mount(c"tmpfs".as_ptr(), path.as_ptr(), c"tmpfs".as_ptr(), flags, std::ptr::null())
                    }
                    _ => -1,
                }
            }
        }
    }
}

/// The kernel's `struct statfs` on 64-bit targets (the `libc` crate's
/// does not show `f_flags`).
#[repr(C)]
#[derive(Default)]
struct KernelStatfs {
    fs_type: i64,
    bsize: i64,
    counts: [u64; 5],
    fsid: [i32; 2],
    namelen: i64,
    frsize: i64,
    flags: i64,
    spare: [i64; 4],
}

/// The per-mount flags of `statfs`'s `f_flags` that a bind remount must
/// repeat to keep them (it sets them all).
fn kept_flags(f_flags: libc::c_ulong) -> libc::c_ulong {
    [
        (libc::ST_NOSUID, libc::MS_NOSUID),
        (libc::ST_NODEV, libc::MS_NODEV),
        (libc::ST_NOEXEC, libc::MS_NOEXEC),
        (libc::ST_NOATIME, libc::MS_NOATIME),
        (libc::ST_NODIRATIME, libc::MS_NODIRATIME),
        (libc::ST_RELATIME, libc::MS_RELATIME),
    ]
    .iter()
    .filter(|(st, _)| f_flags & *st != 0)
    .fold(0, |acc, (_, ms)| acc | ms)
}

/// `capset`'s header (`_LINUX_CAPABILITY_VERSION_3`, this thread).
#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

/// `capset`'s data: two of these, capabilities 0-31 then 32-63.
#[repr(C)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// Drops every capability of `held` (what the bounding set may still
/// hold) not in `caps.bounding` from the bounding set (before the uid
/// changes: it needs `CAP_SETPCAP`); returns what it may hold then.
fn drop_bounding(caps: &CapSets, held: u64, errfd: RawFd) -> u64 {
    for cap in 0..=caps.last_cap.min(63) {
        if held & !caps.bounding & 1 << cap != 0 {
            // SAFETY: prctl with integer arguments.
            check(unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) } as libc::c_long, errfd, STEP_CAPS);
        }
    }
    held & caps.bounding
}

/// Sets the effective, permitted and inheritable sets, then raises the
/// ambient ones (after the uid changed, with `PR_SET_KEEPCAPS` having kept
/// the permitted set across it).
fn set_caps(caps: &CapSets, errfd: RawFd) {
    let mut header = CapHeader { version: LINUX_CAPABILITY_VERSION_3, pid: 0 };
    let half = |m: u64, hi: bool| (if hi { m >> 32 } else { m }) as u32;
    let data = [false, true].map(|hi| CapData {
        effective: half(caps.effective, hi),
        permitted: half(caps.permitted, hi),
        inheritable: half(caps.inheritable, hi),
    });
    // SAFETY: capset reads a header and two data records from this stack.
    check(unsafe { libc::syscall(libc::SYS_capset, &mut header as *mut CapHeader, data.as_ptr()) }, errfd, STEP_CAPS);
    for cap in 0..=caps.last_cap.min(63) {
        if caps.ambient & 1 << cap != 0 {
            // SAFETY: prctl with integer arguments.
            let r = unsafe { libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_RAISE as libc::c_ulong, cap as libc::c_ulong, 0, 0) };
            check(r as libc::c_long, errfd, STEP_CAPS);
        }
    }
}

/// Makes an [`Op::Fresh`]'s detached mount (in the child, before
/// `pivot_root`); -1 with errno set on failure. `sys::new_mount` makes raw
/// system calls only, and its errors are errno values: nothing allocated.
fn make_fresh(op: &Op) -> libc::c_int {
    let Op::Fresh { fstype, attrs, fd, .. } = op else { return 0 };
    match sys::new_mount(fstype, &[(c"source", fstype)], *attrs) {
        Ok(m) => {
            fd.store(m.into_raw_fd(), std::sync::atomic::Ordering::Relaxed);
            0
        }
        Err(e) => {
            // SAFETY: sets this thread's errno.
            unsafe { *libc::__errno_location() = e.raw_os_error().unwrap_or(libc::EIO) };
            -1
        }
    }
}

/// The rlimits and `oom_score_adj` of the plan, set on this process.
fn set_limits(plan: &Plan, errfd: RawFd) {
    // SAFETY: raw system calls on data prepared before clone.
    unsafe {
        for (res, lim) in &plan.rlimits {
            check(libc::syscall(libc::SYS_prlimit64, 0, *res, lim as *const libc::rlimit, std::ptr::null_mut::<libc::rlimit>()), errfd, STEP_RLIMIT);
        }
        // Before the uid changes: lowering it takes CAP_SYS_RESOURCE.
        if let Some(adj) = &plan.oom_score_adj {
            let fd = libc::open(c"/proc/self/oom_score_adj".as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            check(fd as libc::c_long, errfd, STEP_OOM_SCORE_ADJ);
            check(libc::write(fd, adj.as_ptr().cast(), adj.len()) as libc::c_long, errfd, STEP_OOM_SCORE_ADJ);
            libc::close(fd);
        }
    }
}

fn child(plan: &Plan, errfd: RawFd, tail: &Tail<'_>, gate: Option<&mut Gate>, user_ns_sync: Option<RawFd>) -> ! {
    let mut released = None;
    // The capabilities the bounding set may still hold.
    let mut bounding = u64::MAX;
    // SAFETY: the whole child makes raw system calls on descriptors and
    // strings prepared by the parent before clone; this single-threaded
    // child never returns (it execs or exits).
    unsafe {
        // Signals as a fresh process expects them.
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        libc::setsid();

        for (i, fd) in plan.stdio.fds.iter().enumerate() {
            check(libc::dup2(fd.as_raw_fd(), i as libc::c_int) as libc::c_long, errfd, STEP_STDIO);
        }
        if plan.stdio.tty {
            check(libc::ioctl(0, libc::TIOCSCTTY, 0) as libc::c_long, errfd, STEP_STDIO);
        }

        match &plan.enter {
            Enter::New { rootfs, ops, hostname, join } => {
                if let Some(sync) = user_ns_sync {
                    let mut go = [0u8; 1];
                    if !read_gate(sync, &mut go) {
                        fail(errfd, STEP_USER_NS, libc::ECANCELED, EXIT_CANNOT_RUN);
                    }
                    libc::close(sync);
                    // The root, as copied into a namespace of a user
                    // namespace of its own, is locked to its place, and
                    // pivot_root refuses it: a bind of it made here is not.
                    let bind = libc::MS_BIND | libc::MS_REC;
                    check(libc::mount(rootfs.as_ptr(), rootfs.as_ptr(), std::ptr::null(), bind, std::ptr::null()) as libc::c_long, errfd, STEP_ROOT);
                }
                // Still the guest's root (the maps may not map it): the
                // path to the root is the agent's.
                check(libc::chdir(rootfs.as_ptr()) as libc::c_long, errfd, STEP_ROOT);
                if user_ns_sync.is_some() {
                    // Root of the new user namespace (its maps are written).
                    check(libc::syscall(libc::SYS_setresgid, 0, 0, 0), errfd, STEP_USER_NS);
                    check(libc::syscall(libc::SYS_setresuid, 0, 0, 0), errfd, STEP_USER_NS);
                }
                for (i, op) in ops.iter().enumerate() {
                    if make_fresh(op) < 0 {
                        fail(errfd, STEP_OPS + i as u32, last_errno(), EXIT_CANNOT_RUN);
                    }
                }
                let dot = c".".as_ptr();
                // The old root goes whole: nothing of the agent's mounts
                // stays in the container's namespace (a guest's agent has
                // left the initramfs, where pivot_root is refused, at boot).
                check(libc::syscall(libc::SYS_pivot_root, dot, dot), errfd, STEP_ROOT);
                check(libc::umount2(dot, libc::MNT_DETACH) as libc::c_long, errfd, STEP_ROOT);
                check(libc::chdir(c"/".as_ptr()) as libc::c_long, errfd, STEP_ROOT);
                for (i, op) in ops.iter().enumerate() {
                    if run_op(op) < 0 {
                        fail(errfd, STEP_OPS + i as u32, last_errno(), EXIT_CANNOT_RUN);
                    }
                }
                // A shared UTS namespace keeps its own host name.
                if join.is_none() {
                    let h = hostname.as_bytes();
                    check(libc::sethostname(h.as_ptr().cast(), h.len()) as libc::c_long, errfd, STEP_HOSTNAME);
                }
                if let Some(gate) = gate {
                    // The planned bounding set is dropped before the hold
                    // (a template's snapshot keeps that done): a release
                    // may narrow it, never widen it (the agent refuses).
                    bounding = drop_bounding(&tail.caps, bounding, errfd);
                    released = hold(errfd, gate);
                }
            }
            Enter::Existing { pidfd, .. } => {
                let mut flags = libc::CLONE_NEWNS | libc::CLONE_NEWUTS | libc::CLONE_NEWIPC;
                if plan.user_ns.is_some() {
                    // With the guest's privileges, which it then leaves.
                    set_limits(plan, errfd);
                    flags |= libc::CLONE_NEWUSER;
                }
                check(libc::setns(*pidfd, flags) as libc::c_long, errfd, STEP_NAMESPACES);
            }
        }

        let released_tail;
        let tail = match released {
            Some(v) => {
                released_tail = Tail {
                    argv: v.argv,
                    envp: v.envp,
                    candidates: v.candidates,
                    cwd: v.cwd,
                    cwd_mkdirs: v.cwd_mkdirs,
                    uid: v.uid,
                    gid: v.gid,
                    groups: v.groups,
                    caps: v.caps,
                    no_new_privs: v.no_new_privs,
                };
                &released_tail
            }
            None => tail,
        };
        libc::umask(0o022);
        // In a user namespace, the agent (a new one) or the step before
        // entering it (an existing one) set them.
        if plan.user_ns.is_none() {
            set_limits(plan, errfd);
        }
        if libc::chdir(tail.cwd) < 0 {
            if last_errno() != libc::ENOENT {
                fail(errfd, STEP_CWD, last_errno(), EXIT_CANNOT_RUN);
            }
            for d in tail.cwd_mkdirs {
                libc::mkdir(*d, 0o755);
            }
            check(libc::chdir(tail.cwd) as libc::c_long, errfd, STEP_CWD);
        }
        // The PATH search skips, with one lookup each, the candidates that
        // do not exist: an execve of a missing file fails only after it
        // has built the new program's address space and copied its
        // arguments and environment there. Looked up before the user and
        // the seccomp filter change (as runc looks the path up); the last
        // candidate is always left to execve, whose error is the answer.
        let mut candidates = tail.candidates;
        while let [c, rest @ ..] = candidates {
            if rest.is_empty() || libc::access(*c, libc::F_OK) == 0 || !matches!(last_errno(), libc::ENOENT | libc::ENOTDIR) {
                break;
            }
            candidates = rest;
        }
        // Without no_new_privs, installing a filter takes CAP_SYS_ADMIN:
        // before the capabilities change (runc's order).
        if let (Some(filter), false) = (&plan.seccomp, tail.no_new_privs) {
            check(filter.install(), errfd, STEP_SECCOMP);
        }
        // Raw system calls: glibc's wrappers would try to change the
        // credentials of the agent's other threads, which this child does
        // not have.
        drop_bounding(&tail.caps, bounding, errfd);
        check(libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0) as libc::c_long, errfd, STEP_CAPS);
        check(libc::syscall(libc::SYS_setgroups, tail.groups.len(), tail.groups.as_ptr()), errfd, STEP_USER);
        check(libc::syscall(libc::SYS_setresgid, tail.gid, tail.gid, tail.gid), errfd, STEP_USER);
        check(libc::syscall(libc::SYS_setresuid, tail.uid, tail.uid, tail.uid), errfd, STEP_USER);
        check(libc::prctl(libc::PR_SET_KEEPCAPS, 0, 0, 0, 0) as libc::c_long, errfd, STEP_CAPS);
        set_caps(&tail.caps, errfd);
        if tail.no_new_privs {
            check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) as libc::c_long, errfd, STEP_NO_NEW_PRIVS);
            // As late as possible: the fewest calls under the filter.
            if let Some(filter) = &plan.seccomp {
                check(filter.install(), errfd, STEP_SECCOMP);
            }
        }

        // The PATH search, as execvp does it: go on past missing files,
        // remember a permission error.
        let mut denied = 0;
        let mut last = libc::ENOENT;
        for c in candidates {
            libc::execve(*c, tail.argv.as_ptr(), tail.envp.as_ptr());
            let e = last_errno();
            match e {
                libc::ENOENT | libc::ENOTDIR | libc::ESTALE | libc::ENODEV | libc::ETIMEDOUT => {}
                libc::EACCES => denied = libc::EACCES,
                _ => {
                    last = e;
                    break;
                }
            }
            last = e;
        }
        if denied != 0 && matches!(last, libc::ENOENT | libc::ENOTDIR) {
            last = denied;
        }
        let code = if matches!(last, libc::ENOENT | libc::ENOTDIR) { EXIT_NOT_FOUND } else { EXIT_CANNOT_RUN };
        fail(errfd, STEP_EXEC, last, code)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_search_candidates() {
        let c = candidates("sh", "/usr/bin:/bin:").unwrap();
        assert_eq!(c, vec![c"/usr/bin/sh".to_owned(), c"/bin/sh".to_owned(), c"./sh".to_owned()]);
        assert_eq!(candidates("./run", "/bin").unwrap(), vec![c"./run".to_owned()]);
        assert!(candidates("a\0b", "/bin").is_err());
    }

    #[test]
    fn directories_of_a_path() {
        assert_eq!(mkdirs_for("/a/./b/").unwrap(), vec![c"/a".to_owned(), c"/a/b".to_owned()]);
        assert!(mkdirs_for("/").unwrap().is_empty());
    }
}
