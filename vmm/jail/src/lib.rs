//! The jail a VMM runs in, like Firecracker's jailer, entered by the VMM
//! process itself before it opens /dev/kvm or starts a thread:
//!
//! 1. a cgroup of its own (`vmrun-<pid>`; v2 where the host has it, else
//!    the v1 `memory`, `cpu` and `pids` hierarchies) with memory, CPU and
//!    pids limits;
//! 2. new mount, pid, IPC and UTS namespaces (and network, unless the VM
//!    has a TAP device, which lives in the host's);
//! 3. a fork: the process in the new pid namespace runs the VMM, the
//!    outer one only waits for it, forwards signals and ends with its
//!    status (and removes the cgroup);
//! 4. a private root (a tmpfs) holding only what the VMM needs, bind-mounted
//!    at the paths the VMM was given: the kernel, initramfs, disks and
//!    snapshot read-only, the VM's own directory (sockets, console,
//!    snapshots it writes) writable, and its device nodes (`/dev/kvm`,
//!    `/dev/net/tun`, `/dev/null`, `/dev/urandom`); `pivot_root` into it;
//! 5. an unprivileged uid and gid of its own (`10000000 + pid`: no two
//!    running VMMs share one), no supplementary groups, no capabilities,
//!    an empty capability bounding set and `no_new_privs`.
//!
//! Nothing of the host beyond those paths is reachable afterwards; the
//! seccomp filters (installed later, per thread) narrow what the process
//! may ask of the kernel.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use vmrun_devices::virtio::net::tap::Tap;

/// Where jail roots are made (an empty directory each, a tmpfs mounted on
/// it in the VMM's own mount namespace only).
pub const JAIL_BASE: &str = "/run/vmrun-jail";
/// Jailed VMMs run as `UID_BASE + pid`.
pub const UID_BASE: u32 = 10_000_000;
/// Memory the cgroup allows beyond guest memory: the VMM's own (a few MiB),
/// its page tables and buffers, with room to spare.
pub const MEMORY_OVERHEAD: u64 = 128 << 20;
/// Most tasks (threads) in the cgroup: the event loop, vCPUs, device and
/// port threads.
pub const MAX_PIDS: u32 = 128;

/// Errors entering the jail; each names the step.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the jail needs root (run as root, or turn it off with --jail off)")]
    NotRoot,
    #[error("the jail must be entered before any thread starts ({0} threads run)")]
    Threads(usize),
    #[error("jail: {what}: {source}")]
    Sys { what: String, source: std::io::Error },
    #[error("jail: {0} does not exist")]
    Missing(PathBuf),
}

fn sys(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |source| Error::Sys { what, source }
}

fn check(r: libc::c_int, what: impl Into<String>) -> Result<(), Error> {
    if r < 0 {
        return Err(Error::Sys { what: what.into(), source: std::io::Error::last_os_error() });
    }
    Ok(())
}

fn cstr(p: &Path) -> Result<CString, Error> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| Error::Sys { what: format!("{p:?}"), source: std::io::ErrorKind::InvalidInput.into() })
}

/// Resource limits of the VMM's cgroup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Guest memory; the cgroup allows [`MEMORY_OVERHEAD`] more.
    pub guest_memory: u64,
    /// vCPUs: the cgroup gets that many CPUs' worth of time, plus one for
    /// the VMM's own threads.
    pub cpus: u32,
}

/// What the VMM may reach.
#[derive(Debug, Clone, Default)]
pub struct Jail {
    /// Files and directories bound read-only.
    pub read_only: Vec<PathBuf>,
    /// Directories bound writable, and given to the jail's uid.
    pub writable: Vec<PathBuf>,
    /// TAP devices the VMM attaches to: they are given to the jail's uid
    /// (`TUNSETOWNER`), and the VMM stays in the host's network namespace
    /// where they live.
    pub taps: Vec<String>,
    /// The cgroup's limits; `None` for no cgroup.
    pub limits: Option<Limits>,
}

/// The uid and gid a jailed VMM with (outer) pid `pid` runs as.
pub fn uid_for(pid: u32) -> u32 {
    UID_BASE + pid
}

impl Jail {
    /// Enters the jail; returns in the jailed process (the outer one never
    /// returns: it exits with the jailed one's status).
    pub fn enter(&self) -> Result<(), Error> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err(Error::NotRoot);
        }
        let threads = std::fs::read_dir("/proc/self/task").map(|d| d.count()).unwrap_or(1);
        if threads > 1 {
            return Err(Error::Threads(threads));
        }
        for p in self.read_only.iter().chain(&self.writable) {
            if std::fs::symlink_metadata(p).is_err() {
                return Err(Error::Missing(p.clone()));
            }
        }
        let pid = std::process::id();
        let id = uid_for(pid);
        for d in &self.writable {
            chown_tree(d, id).map_err(sys(format!("chown {}", d.display())))?;
        }
        let cgroup = match self.limits {
            Some(l) => Some(Cgroup::create(&format!("vmrun-{pid}"), l)?),
            None => None,
        };
        for t in &self.taps {
            give_tap(t, id)?;
        }
        // The pid namespace applies to the children: the fork below. The
        // others are the jailed process's own (the outer one keeps the
        // host's view, to clean up).
        // SAFETY: unshare with namespace flags only changes this process.
        check(unsafe { libc::unshare(libc::CLONE_NEWPID) }, "unshare the pid namespace")?;
        let root = PathBuf::from(JAIL_BASE).join(pid.to_string());
        std::fs::create_dir_all(&root).map_err(sys(format!("mkdir {}", root.display())))?;
        // Signals the outer process forwards; blocked before the fork so
        // that none is lost in between.
        let set = forwarded_signals();
        // The jailed process learns that the outer one died (without it,
        // from inside its pid namespace) by this pipe's end of file.
        let mut alive = [0 as libc::c_int; 2];
        // SAFETY: pipe2 fills the two descriptors.
        check(unsafe { libc::pipe2(alive.as_mut_ptr(), libc::O_CLOEXEC) }, "pipe")?;
        // SAFETY: fork in a single-threaded process (checked above); the
        // child only continues this function's work.
        let child = unsafe { libc::fork() };
        if child < 0 {
            return Err(Error::Sys { what: "fork".into(), source: std::io::Error::last_os_error() });
        }
        if child > 0 {
            // SAFETY: our copy of the read end.
            unsafe { libc::close(alive[0]) };
            let status = wait_forwarding(child, &set);
            let _ = std::fs::remove_dir(&root);
            if let Some(c) = cgroup {
                c.remove();
            }
            std::process::exit(status);
        }
        // The jailed process: dies with the outer one.
        // SAFETY: prctl and sigprocmask on this process.
        unsafe {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            libc::sigprocmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
        }
        let mut flags = libc::CLONE_NEWNS | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS;
        if self.taps.is_empty() {
            flags |= libc::CLONE_NEWNET;
        }
        // SAFETY: unshare with namespace flags only changes this process.
        check(unsafe { libc::unshare(flags) }, "unshare")?;
        // SAFETY: our copy of the write end.
        unsafe { libc::close(alive[1]) };
        self.build_root(&root, id)?;
        drop_privileges(id)?;
        // A change of credentials clears the parent-death signal: set it
        // again, then make sure the outer process did not die meanwhile.
        // SAFETY: prctl and poll on this process's own descriptors.
        unsafe {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            let mut p = libc::pollfd { fd: alive[0], events: libc::POLLIN, revents: 0 };
            if libc::poll(&mut p, 1, 0) != 0 {
                libc::_exit(125);
            }
        }
        Ok(())
    }

    fn build_root(&self, root: &Path, id: u32) -> Result<(), Error> {
        let none: *const libc::c_char = std::ptr::null();
        // SAFETY: mount(2) with NUL-terminated strings or null; this is the
        // jail's own mount namespace.
        unsafe {
            check(libc::mount(none, c"/".as_ptr(), none, libc::MS_REC | libc::MS_PRIVATE, std::ptr::null()), "make / private")?;
            let r = cstr(root)?;
            check(libc::mount(c"tmpfs".as_ptr(), r.as_ptr(), c"tmpfs".as_ptr(), libc::MS_NOSUID, c"mode=755,size=1m".as_ptr().cast()), "tmpfs root")?;
        }
        for (p, writable) in self.read_only.iter().map(|p| (p, false)).chain(self.writable.iter().map(|p| (p, true))) {
            bind(root, p, writable)?;
        }
        let dev = root.join("dev");
        std::fs::create_dir_all(dev.join("net")).map_err(sys("mkdir /dev"))?;
        for (name, mode, major, minor) in [("kvm", 0o600, 10, 232), ("net/tun", 0o600, 10, 200), ("null", 0o666, 1, 3), ("urandom", 0o444, 1, 9)] {
            let path = cstr(&dev.join(name))?;
            // SAFETY: mknod/chown of a path in the jail's tmpfs.
            unsafe {
                check(libc::mknod(path.as_ptr(), libc::S_IFCHR | mode, libc::makedev(major, minor)), format!("mknod /dev/{name}"))?;
                check(libc::chown(path.as_ptr(), id, id), format!("chown /dev/{name}"))?;
            }
        }
        let proc_dir = root.join("proc");
        std::fs::create_dir_all(&proc_dir).map_err(sys("mkdir /proc"))?;
        let p = cstr(&proc_dir)?;
        // SAFETY: as above; this process is the new pid namespace's first.
        unsafe {
            check(
                libc::mount(c"proc".as_ptr(), p.as_ptr(), c"proc".as_ptr(), libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC, std::ptr::null()),
                "mount /proc",
            )?;
            let r = cstr(root)?;
            check(libc::chdir(r.as_ptr()), "chdir root")?;
            check(libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) as libc::c_int, "pivot_root")?;
            check(libc::umount2(c".".as_ptr(), libc::MNT_DETACH), "detach the old root")?;
            check(libc::chdir(c"/".as_ptr()), "chdir /")?;
            let host = b"vmrun-vmm";
            check(libc::sethostname(host.as_ptr().cast(), host.len()), "sethostname")?;
        }
        Ok(())
    }
}

/// Binds `path` at the same path under `root` (read-only unless
/// `writable`), creating what it is bound on.
fn bind(root: &Path, path: &Path, writable: bool) -> Result<(), Error> {
    let rel = path.strip_prefix("/").map_err(|_| Error::Missing(path.to_path_buf()))?;
    let target = root.join(rel);
    let meta = std::fs::metadata(path).map_err(sys(format!("stat {}", path.display())))?;
    if meta.is_dir() {
        std::fs::create_dir_all(&target).map_err(sys(format!("mkdir {}", target.display())))?;
    } else {
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).map_err(sys(format!("mkdir {}", parent.display())))?;
        }
        std::fs::File::create(&target).map_err(sys(format!("create {}", target.display())))?;
    }
    let (src, dst) = (cstr(path)?, cstr(&target)?);
    let none: *const libc::c_char = std::ptr::null();
    // SAFETY: mount(2) with NUL-terminated strings or null.
    unsafe {
        check(libc::mount(src.as_ptr(), dst.as_ptr(), none, libc::MS_BIND | libc::MS_REC, std::ptr::null()), format!("bind {}", path.display()))?;
        let ro = if writable { 0 } else { libc::MS_RDONLY };
        let flags = libc::MS_REMOUNT | libc::MS_BIND | libc::MS_NOSUID | libc::MS_NODEV | ro;
        check(libc::mount(none, dst.as_ptr(), none, flags, std::ptr::null()), format!("remount {}", path.display()))?;
    }
    Ok(())
}

/// Makes the persistent TAP device `name` usable by `id` without
/// privileges.
fn give_tap(name: &str, id: u32) -> Result<(), Error> {
    let failed = |e| Error::Sys { what: format!("TAP device {name}"), source: std::io::Error::other(e) };
    Tap::open(name).and_then(|tap| tap.set_owner(id, id)).map_err(failed)
}

/// Gives `dir` and what is in it (not following symbolic links) to `id`
/// (uid and gid).
pub fn chown_tree(dir: &Path, id: u32) -> std::io::Result<()> {
    std::os::unix::fs::lchown(dir, Some(id), Some(id))?;
    if std::fs::symlink_metadata(dir)?.is_dir() {
        for e in std::fs::read_dir(dir)? {
            chown_tree(&e?.path(), id)?;
        }
    }
    Ok(())
}

/// Drops to `id` (uid and gid), with no groups, capabilities or way back.
fn drop_privileges(id: u32) -> Result<(), Error> {
    // SAFETY: plain system calls on this process.
    unsafe {
        for cap in 0..=63 {
            // Unknown capability numbers fail with EINVAL: fine.
            libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0);
        }
        check(libc::setgroups(0, std::ptr::null()), "setgroups")?;
        check(libc::setresgid(id, id, id), "setresgid")?;
        check(libc::setresuid(id, id, id), "setresuid")?;
        check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")?;
    }
    Ok(())
}

fn forwarded_signals() -> libc::sigset_t {
    // SAFETY: builds a set and blocks it for this (single-threaded) process.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGQUIT, libc::SIGUSR1, libc::SIGUSR2, libc::SIGCHLD] {
            libc::sigaddset(&mut set, s);
        }
        libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

/// The outer process: forwards signals to `child` until it ends; returns
/// the exit code to end with (128+N when signal N killed it).
fn wait_forwarding(child: libc::pid_t, set: &libc::sigset_t) -> i32 {
    loop {
        let mut status = 0;
        // SAFETY: waitpid on our child with a valid status pointer.
        let r = unsafe { libc::waitpid(child, &mut status, libc::WNOHANG) };
        if r == child {
            if libc::WIFEXITED(status) {
                return libc::WEXITSTATUS(status);
            }
            if libc::WIFSIGNALED(status) {
                return 128 + libc::WTERMSIG(status);
            }
        } else if r < 0 {
            return 125;
        }
        let mut sig = 0;
        // SAFETY: sigwait with the set blocked above.
        if unsafe { libc::sigwait(set, &mut sig) } == 0 && sig != libc::SIGCHLD {
            // SAFETY: kill of our own child.
            unsafe { libc::kill(child, sig) };
        }
    }
}

/// The VMM's cgroup, in each hierarchy it was made in.
#[derive(Debug)]
struct Cgroup {
    dirs: Vec<PathBuf>,
}

impl Cgroup {
    fn create(name: &str, l: Limits) -> Result<Self, Error> {
        let memory = l.guest_memory + MEMORY_OVERHEAD;
        let period = 100_000u64;
        let quota = period * u64::from(l.cpus + 1);
        let base = Path::new("/sys/fs/cgroup");
        let mut dirs = Vec::new();
        let mut joined = |dir: PathBuf, files: &[(&str, String)], procs: &str| -> Result<(), Error> {
            std::fs::create_dir_all(&dir).map_err(sys(format!("cgroup {}", dir.display())))?;
            dirs.push(dir.clone());
            for (f, v) in files {
                std::fs::write(dir.join(f), v).map_err(sys(format!("cgroup {}/{f}", dir.display())))?;
            }
            std::fs::write(dir.join(procs), std::process::id().to_string()).map_err(sys(format!("cgroup {}/{procs}", dir.display())))
        };
        if base.join("cgroup.controllers").exists() {
            // v2: the controllers must be enabled for the parent's children.
            let parent = base.join("vmrun");
            std::fs::create_dir_all(&parent).map_err(sys("cgroup /sys/fs/cgroup/vmrun"))?;
            let _ = std::fs::write(base.join("cgroup.subtree_control"), "+memory +cpu +pids");
            let _ = std::fs::write(parent.join("cgroup.subtree_control"), "+memory +cpu +pids");
            joined(
                parent.join(name),
                &[("memory.max", memory.to_string()), ("cpu.max", format!("{quota} {period}")), ("pids.max", MAX_PIDS.to_string())],
                "cgroup.procs",
            )?;
        } else {
            for (ctrl, files) in [
                ("memory", vec![("memory.limit_in_bytes", memory.to_string())]),
                ("cpu", vec![("cpu.cfs_period_us", period.to_string()), ("cpu.cfs_quota_us", quota.to_string())]),
                ("pids", vec![("pids.max", MAX_PIDS.to_string())]),
            ] {
                let h = base.join(ctrl);
                if h.is_dir() {
                    joined(h.join("vmrun").join(name), &files, "cgroup.procs")?;
                }
            }
        }
        Ok(Self { dirs })
    }

    /// Leaves the cgroup and removes it (its other member has ended).
    fn remove(self) {
        for d in &self.dirs {
            // Back to the hierarchy's root, then the empty group goes.
            if let Some(root) = d.parent().and_then(Path::parent) {
                let _ = std::fs::write(root.join("cgroup.procs"), std::process::id().to_string());
            }
            if let Err(e) = std::fs::remove_dir(d) {
                log::warn!("cannot remove cgroup {}: {e}", d.display());
            }
        }
    }
}

/// Removes what the jail of the VMM whose outer process was `pid` left,
/// once that process is gone: its empty root directory and its cgroups
/// (the outer process does it itself, unless it was killed with SIGKILL).
pub fn clean_up(pid: u32) {
    let name = format!("vmrun-{pid}");
    let base = Path::new("/sys/fs/cgroup");
    let mut dirs = vec![base.join("vmrun").join(&name)];
    dirs.extend(["memory", "cpu", "pids"].iter().map(|c| base.join(c).join("vmrun").join(&name)));
    for d in dirs.iter().filter(|d| d.is_dir()) {
        // The jailed process may take a moment to die after the outer one.
        for _ in 0..50 {
            if std::fs::remove_dir(d).is_ok() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
    let _ = std::fs::remove_dir(PathBuf::from(JAIL_BASE).join(pid.to_string()));
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn uids_are_out_of_the_usual_ranges_and_distinct_per_pid() {
        assert_eq!(uid_for(1), 10_000_001);
        assert_ne!(uid_for(4_194_304), uid_for(4_194_303));
        assert!(uid_for(4_194_304) < u32::MAX);
    }

    #[test]
    fn missing_paths_are_refused_before_anything_changes() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            assert!(matches!(Jail::default().enter(), Err(Error::NotRoot)));
            return;
        }
        let j = Jail { read_only: vec!["/nonexistent/vmrun-kernel".into()], ..Jail::default() };
        // The test harness runs threads: the thread check comes first.
        assert!(matches!(j.enter(), Err(Error::Threads(_)) | Err(Error::Missing(_))));
    }
}
