//! The jail a VMM runs in, like Firecracker's jailer, entered by the VMM
//! process itself before it opens /dev/kvm or starts a thread:
//!
//! 0. every descriptor it inherited beyond standard input, output and
//!    error closed (a caller's open files never reach the jailed VMM);
//! 1. a cgroup of its own (`vmrun-<pid>`; v2 where the host has it, else
//!    the v1 `memory`, `cpu` and `pids` hierarchies) with memory, CPU and
//!    pids limits, under the cgroup of whoever started it (or
//!    `$VMRUN_CGROUP_PARENT`), so that it stays within that one's limits;
//! 2. new mount, pid, IPC and UTS namespaces (and network, unless the VM
//!    has a TAP device, which lives in the host's);
//! 3. a fork: the process in the new pid namespace runs the VMM, the
//!    outer one moves it into the cgroup, then only waits for it, forwards
//!    signals and ends with its status (and removes the cgroup);
//!    [`kill_signal`] sent to it kills the VMM, so that the outer process
//!    ends once all is removed. Moving a process between cgroups waits
//!    for an RCU grace period on a cgroup v1 host (tens of milliseconds):
//!    the VMM sets its VM up meanwhile and waits for the move
//!    ([`Confined::wait`]) only before the guest runs;
//! 4. a private root (a tmpfs) holding only what the VMM needs, bind-mounted
//!    at the paths the VMM was given: the kernel, initramfs, disks and
//!    snapshot read-only, the VM's own directory (sockets, console,
//!    snapshots it writes) writable, and its device nodes (`/dev/kvm`,
//!    `/dev/net/tun`, `/dev/null`, `/dev/urandom`); `pivot_root` into it;
//! 5. an unprivileged uid and gid of its own (`10000000 + pid`: no two
//!    running VMMs share one), no supplementary groups, no capabilities,
//!    an empty capability bounding set and `no_new_privs` (its own
//!    `/proc/self/pagemap`, which it may not open afterwards, is opened
//!    just before: [`pagemap`], for the snapshot writer).
//!
//! Nothing of the host beyond those paths is reachable afterwards; the
//! seccomp filters (installed later, per thread) narrow what the process
//! may ask of the kernel.
//!
//! What a jail makes on the host (its cgroups, its root directory) is
//! written down first in a record, `/run/vmrun-jail/<pid>.json`, that the
//! outer process holds locked (`flock`) for as long as it lives: whatever a
//! jail whose process was killed with SIGKILL left is found by
//! [`collect_orphans`] (records nobody holds), whichever cgroup it sits in.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

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

/// The CPU bandwidth period of the VMM's cgroup, in microseconds.
pub const CPU_PERIOD: u64 = 100_000;

/// The VMM's CPU quota per [`CPU_PERIOD`] for `cpus` vCPUs: that many
/// CPUs' worth of time, plus one for its own threads.
pub fn cpu_quota(cpus: u32) -> u64 {
    CPU_PERIOD * u64::from(cpus + 1)
}
/// Names the cgroup (a path relative to each hierarchy's root) that jails'
/// cgroups are made in, instead of the cgroup of the process that starts
/// the VMM (docker's `--cgroup-parent`).
pub const CGROUP_PARENT_ENV: &str = "VMRUN_CGROUP_PARENT";
/// Where the cgroup hierarchies are mounted.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";

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
    #[error("jail: the outer process could not move the VMM into its cgroup (its log says why)")]
    NotConfined,
    #[error(
        "jail: cannot enable the memory, cpu and pids controllers for the children of cgroup {dir} ({source}); \
         a cgroup v2 that holds processes cannot delegate them: set {CGROUP_PARENT_ENV} to a cgroup that holds none"
    )]
    Delegation { dir: PathBuf, source: std::io::Error },
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
    /// Descriptors above standard error that the jailed process keeps
    /// (every other one is closed at entry): e.g. the pipe on which the VMM
    /// says it is ready. The outer process closes its copies.
    pub keep_fds: Vec<RawFd>,
}

/// The uid and gid a jailed VMM with (outer) pid `pid` runs as.
pub fn uid_for(pid: u32) -> u32 {
    UID_BASE + pid
}

/// What a VMM's configuration names, from which its jail is derived
/// ([`Jail::for_needs`]).
#[derive(Debug, Default)]
pub struct Needs {
    /// Files read (kernel, initramfs, snapshot directory).
    pub read_only: Vec<PathBuf>,
    /// Disk images (read-only unless inside a writable directory).
    pub disks: Vec<PathBuf>,
    /// Files the VMM creates or writes (sockets, console, report): their
    /// directories are writable.
    pub outputs: Vec<PathBuf>,
    pub taps: Vec<String>,
    pub memory_mib: u64,
    pub cpus: u32,
    /// Inherited descriptors the VMM keeps through the jail (its readiness
    /// pipe).
    pub keep_fds: Vec<RawFd>,
}

fn parent_dir(p: &Path) -> Option<PathBuf> {
    let abs = std::path::absolute(p).ok()?;
    abs.parent().map(Path::to_path_buf)
}

impl Jail {
    /// The jail for `needs`. Read-only: the files read and the disks
    /// outside the writable directories. Writable: the directories of the
    /// outputs (the VM's own directory). Device nodes (`/dev/null` in an
    /// empty disk slot) are the jail's own.
    pub fn for_needs(needs: &Needs) -> std::io::Result<Jail> {
        let mut writable: Vec<PathBuf> = needs.outputs.iter().filter_map(|p| parent_dir(p)).collect();
        writable.sort();
        writable.dedup();
        // A directory inside another is covered by it.
        let outer: Vec<PathBuf> =
            writable.iter().filter(|d| !writable.iter().any(|o| o != *d && d.starts_with(o))).cloned().collect();
        let covered = |p: &Path| outer.iter().any(|d| p.starts_with(d));
        let mut read_only = Vec::new();
        for p in needs.read_only.iter().chain(&needs.disks) {
            let abs = std::path::absolute(p)?;
            if abs.starts_with("/dev") || covered(&abs) {
                continue;
            }
            read_only.push(abs);
        }
        Ok(Jail {
            read_only,
            writable: outer,
            taps: needs.taps.clone(),
            limits: Some(Limits { guest_memory: needs.memory_mib << 20, cpus: needs.cpus }),
            keep_fds: needs.keep_fds.clone(),
        })
    }

    /// Enters the jail; returns in the jailed process (the outer one never
    /// returns: it exits with the jailed one's status), which must call
    /// [`Confined::wait`] before it runs anything of the guest's: its move
    /// into the cgroup may still be under way.
    pub fn enter(&self) -> Result<Confined, Error> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err(Error::NotRoot);
        }
        let threads = std::fs::read_dir("/proc/self/task").map(|d| d.count()).unwrap_or(1);
        if threads > 1 {
            return Err(Error::Threads(threads));
        }
        close_inherited_fds(&self.keep_fds)?;
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
        let root = PathBuf::from(JAIL_BASE).join(pid.to_string());
        let cgroups = match self.limits {
            Some(_) => cgroup_dirs(&format!("vmrun-{pid}"))?,
            None => Vec::new(),
        };
        // What a dead process with our pid left goes first; ours is written
        // down before anything is made, and locked while this (outer)
        // process lives.
        collect(pid);
        let record = Record { root: root.clone(), cgroups: cgroups.clone() }.write(pid)?;
        let cgroup = match self.limits {
            Some(l) => Some(Cgroup::create(cgroups, l)?),
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
        std::fs::create_dir_all(&root).map_err(sys(format!("mkdir {}", root.display())))?;
        // Signals the outer process forwards; blocked before the fork so
        // that none is lost in between.
        let set = forwarded_signals();
        // The jailed process learns that the outer one died (without it,
        // from inside its pid namespace) by this pipe's end of file.
        let mut alive = [0 as libc::c_int; 2];
        // SAFETY: pipe2 fills the two descriptors.
        check(unsafe { libc::pipe2(alive.as_mut_ptr(), libc::O_CLOEXEC) }, "pipe")?;
        // The outer process writes a byte here once the jailed one is in
        // its cgroup (end of file without it: the move failed).
        let mut moved = [-1 as libc::c_int; 2];
        if cgroup.is_some() {
            // SAFETY: pipe2 fills the two descriptors.
            check(unsafe { libc::pipe2(moved.as_mut_ptr(), libc::O_CLOEXEC) }, "pipe")?;
        }
        // SAFETY: fork in a single-threaded process (checked above); the
        // child only continues this function's work.
        let child = unsafe { libc::fork() };
        if child < 0 {
            return Err(Error::Sys { what: "fork".into(), source: std::io::Error::last_os_error() });
        }
        if child > 0 {
            // SAFETY: our copy of the read end, and our copies of the
            // descriptors the jailed process keeps (it alone uses them:
            // they reach end of file when it ends).
            unsafe {
                libc::close(alive[0]);
                for &fd in &self.keep_fds {
                    libc::close(fd);
                }
            }
            if let Some(c) = &cgroup {
                // SAFETY: our copy of the read end.
                unsafe { libc::close(moved[0]) };
                match c.attach(child) {
                    // SAFETY: a one-byte write to our pipe, then its close
                    // (a jailed process already gone makes it fail with
                    // EPIPE: Rust programs ignore SIGPIPE).
                    Ok(()) => unsafe {
                        libc::write(moved[1], [1u8].as_ptr().cast(), 1);
                        libc::close(moved[1]);
                    },
                    Err(e) => {
                        log::error!("{e}: the VMM is killed");
                        // SAFETY: kill of our own child; the close makes
                        // its wait end if it is not dead yet.
                        unsafe {
                            libc::kill(child, libc::SIGKILL);
                            libc::close(moved[1]);
                        }
                    }
                }
            }
            let status = wait_forwarding(child, &set);
            let _ = std::fs::remove_dir(&root);
            if let Some(c) = cgroup {
                c.remove();
            }
            Record::remove(pid);
            drop(record);
            std::process::exit(status);
        }
        // Only the outer process holds the record's lock.
        drop(record);
        let confined = match cgroup {
            Some(_) => {
                // SAFETY: our copy of the write end; the read end is ours
                // alone from now on.
                unsafe { libc::close(moved[1]) };
                // SAFETY: a descriptor pipe2 made, owned by nothing else.
                Confined { moved: Some(unsafe { std::os::fd::OwnedFd::from_raw_fd(moved[0]) }) }
            }
            None => Confined { moved: None },
        };
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
        // Once unprivileged the process is not dumpable and may no longer
        // open its own /proc/self/pagemap: the snapshot writer needs it to
        // skip the guest pages never touched (without it, it reads them
        // all, and all of guest memory becomes resident).
        match File::open("/proc/self/pagemap") {
            Ok(f) => {
                let _ = PAGEMAP.set(f);
            }
            Err(e) => log::debug!("jail: no /proc/self/pagemap: {e}"),
        }
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
        Ok(confined)
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

/// `/proc/self/pagemap` of the jailed process, opened before it dropped its
/// privileges.
static PAGEMAP: std::sync::OnceLock<File> = std::sync::OnceLock::new();

/// The jailed process's `/proc/self/pagemap`, opened while it still could
/// (`None` outside a jail: open it there).
pub fn pagemap() -> Option<&'static File> {
    PAGEMAP.get()
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

/// The signal that, sent to a jail's outer process (the VMM's pid as its
/// starter knows it), kills the jailed VMM with SIGKILL: the outer process
/// waits for it, removes its cgroups and root, and ends (with status 137).
/// Whoever waits for the outer process then finds the jail gone, where
/// SIGKILL to the outer process leaves the VMM dying on its own and its
/// cgroups for [`collect_record`] to remove once it has
/// ([`jailed_processes`] are the ones to wait for).
pub fn kill_signal() -> i32 {
    libc::SIGRTMIN() + 4
}

fn forwarded_signals() -> libc::sigset_t {
    // SAFETY: builds a set and blocks it for this (single-threaded) process.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGQUIT, libc::SIGUSR1, libc::SIGUSR2, libc::SIGCHLD, kill_signal()] {
            libc::sigaddset(&mut set, s);
        }
        libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

/// The outer process: forwards signals to `child` until it ends
/// ([`kill_signal`] as SIGKILL); returns the exit code to end with (128+N
/// when signal N killed it).
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
            let sig = if sig == kill_signal() { libc::SIGKILL } else { sig };
            // SAFETY: kill of our own child.
            unsafe { libc::kill(child, sig) };
        }
    }
}

/// What the jailed process holds of its jail: [`Confined::wait`] returns
/// once it is in its cgroup.
#[derive(Debug)]
pub struct Confined {
    /// Readable once the outer process has moved this one into the
    /// cgroup (a byte) or failed to (end of file); `None` without a
    /// cgroup.
    moved: Option<std::os::fd::OwnedFd>,
}

impl Confined {
    /// Waits until the outer process has moved this process into its
    /// cgroup, so that the cgroup's limits hold what runs next (at once
    /// once it has). An error if the move failed (the outer process kills
    /// this one then).
    pub fn wait(&mut self) -> Result<(), Error> {
        let Some(fd) = &self.moved else { return Ok(()) };
        let mut b = [0u8; 1];
        loop {
            // SAFETY: a read into a one-byte buffer from our descriptor.
            let n = unsafe { libc::read(fd.as_raw_fd(), b.as_mut_ptr().cast(), 1) };
            match n {
                1 => {
                    self.moved = None;
                    return Ok(());
                }
                0 => return Err(Error::NotConfined),
                _ if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted => continue,
                _ => return Err(Error::Sys { what: "wait for the cgroup".into(), source: std::io::Error::last_os_error() }),
            }
        }
    }
}

/// The VMM's cgroup, in each hierarchy it was made in.
#[derive(Debug)]
struct Cgroup {
    dirs: Vec<PathBuf>,
}

impl Cgroup {
    /// Makes the cgroup directories `dirs` (from [`cgroup_dirs`]) with the
    /// limits `l`.
    fn create(dirs: Vec<PathBuf>, l: Limits) -> Result<Self, Error> {
        let memory = l.guest_memory + MEMORY_OVERHEAD;
        let period = CPU_PERIOD;
        let quota = cpu_quota(l.cpus);
        let v2 = is_v2();
        let mut made = Self { dirs: Vec::new() };
        for dir in dirs {
            let files: Vec<(&str, String)> = if v2 {
                // The controllers must be enabled for the parent's children.
                let parent = dir.parent().unwrap_or(Path::new(CGROUP_ROOT));
                enable_controllers(parent)?;
                vec![("memory.max", memory.to_string()), ("cpu.max", format!("{quota} {period}")), ("pids.max", MAX_PIDS.to_string())]
            } else {
                match dir.strip_prefix(CGROUP_ROOT).ok().and_then(|r| r.iter().next()).and_then(|c| c.to_str()) {
                    Some("memory") => vec![("memory.limit_in_bytes", memory.to_string())],
                    Some("cpu") => {
                        // v1 refuses a quota above the parent's (an OCI
                        // container's host cgroup may have one).
                        let quota = dir.parent().and_then(parent_quota_for(period)).map_or(quota, |p| p.min(quota));
                        vec![("cpu.cfs_period_us", period.to_string()), ("cpu.cfs_quota_us", quota.to_string())]
                    }
                    Some("pids") => vec![("pids.max", MAX_PIDS.to_string())],
                    _ => Vec::new(),
                }
            };
            std::fs::create_dir_all(&dir).map_err(sys(format!("cgroup {}", dir.display())))?;
            made.dirs.push(dir.clone());
            for (f, v) in files {
                std::fs::write(dir.join(f), v).map_err(sys(format!("cgroup {}/{f}", dir.display())))?;
            }
        }
        Ok(made)
    }

    /// Moves process `pid` (the jailed one, with its threads) into the
    /// cgroup; the outer process stays where it was started.
    fn attach(&self, pid: libc::pid_t) -> Result<(), Error> {
        for d in &self.dirs {
            std::fs::write(d.join("cgroup.procs"), pid.to_string()).map_err(sys(format!("cgroup {}/cgroup.procs", d.display())))?;
        }
        Ok(())
    }

    /// Removes the cgroup (its only member, the jailed process, has ended).
    fn remove(self) {
        for d in &self.dirs {
            if let Err(e) = std::fs::remove_dir(d) {
                log::warn!("cannot remove cgroup {}: {e}", d.display());
            }
        }
    }
}

/// What collecting one record found.
#[derive(Debug, PartialEq, Eq)]
enum Collected {
    /// No record, or its process still holds it.
    Nothing,
    /// Removed: these paths.
    Removed(Vec<PathBuf>),
    /// Its process is gone but a cgroup still has tasks (they are dying).
    Busy,
}

/// Collects the record of the jail of outer process `pid` if nobody holds
/// it any more.
fn collect(pid: u32) -> Collected {
    let path = Record::path(pid);
    let Ok(file) = File::open(&path) else { return Collected::Nothing };
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Collected::Nothing; // its jail is alive
    }
    let record = Record::read(&file);
    let mut removed = Vec::new();
    for d in record.cgroups.iter().filter(|d| d.is_dir()) {
        match std::fs::remove_dir(d) {
            Ok(()) => removed.push(d.clone()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => return Collected::Busy,
            Err(e) => log::warn!("cannot remove cgroup {}: {e}", d.display()),
        }
    }
    // Only ever a directory of the jails' base.
    let root = PathBuf::from(JAIL_BASE).join(pid.to_string());
    if std::fs::remove_dir(&root).is_ok() {
        removed.push(root);
    }
    if std::fs::remove_file(&path).is_ok() {
        removed.push(path);
    }
    Collected::Removed(removed)
}

/// The processes (host pids) still in the cgroups of the jail of outer
/// process `pid`: its jailed VMM, still dying after the outer process was
/// killed, while [`collect_record`] says `WouldBlock`.
pub fn jailed_processes(pid: u32) -> Vec<u32> {
    let Ok(file) = File::open(Record::path(pid)) else { return Vec::new() };
    let mut pids: Vec<u32> = Record::read(&file)
        .cgroups
        .iter()
        .flat_map(|d| std::fs::read_to_string(d.join("cgroup.procs")).unwrap_or_default().lines().filter_map(|l| l.trim().parse().ok()).collect::<Vec<u32>>())
        .collect();
    pids.sort_unstable();
    pids.dedup();
    pids
}

/// The outer pids of jails whose records nobody holds: their processes
/// are gone, and [`collect_record`] collects what they left.
pub fn orphan_records() -> Vec<u32> {
    let mut pids: Vec<u32> = std::fs::read_dir(JAIL_BASE)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.strip_suffix(".json")?.parse().ok())
        .filter(|pid| {
            let Ok(f) = File::open(Record::path(*pid)) else { return false };
            // SAFETY: flock on a descriptor we own (released when `f` closes).
            unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
        })
        .collect();
    pids.sort_unstable();
    pids
}

/// The record of the jail of outer process `pid`.
pub fn record_path(pid: u32) -> PathBuf {
    Record::path(pid)
}

/// Collects what the jail of outer process `pid` left (cgroups, root,
/// record) if its process is gone; returns the paths removed (none if it
/// lives). `WouldBlock` while a cgroup still has tasks (they are dying).
pub fn collect_record(pid: u32) -> std::io::Result<Vec<PathBuf>> {
    match collect(pid) {
        Collected::Nothing => Ok(Vec::new()),
        Collected::Removed(paths) => Ok(paths),
        Collected::Busy => Err(std::io::ErrorKind::WouldBlock.into()),
    }
}

/// Collects what every jail whose process is gone left on this host (its
/// cgroups, its root directory, its record), whoever started it and in
/// whichever cgroup: for `vmrun system prune` and before a template build.
/// Returns the paths removed.
pub fn collect_orphans() -> Vec<PathBuf> {
    let mut removed = Vec::new();
    for e in std::fs::read_dir(JAIL_BASE).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.strip_suffix(".json").and_then(|p| p.parse::<u32>().ok()) else {
            // A root directory without a record (made by an older vmrun):
            // empty once its process is gone.
            if let Ok(pid) = name.parse::<u32>() {
                if !Record::path(pid).exists() && !process_exists(pid) && std::fs::remove_dir(e.path()).is_ok() {
                    removed.push(e.path());
                }
            }
            continue;
        };
        if let Collected::Removed(paths) = collect(pid) {
            removed.extend(paths);
        }
    }
    // Cgroups that older versions made at the hierarchies' roots.
    let root = Path::new(CGROUP_ROOT);
    for base in [root.join("vmrun"), root.join("memory/vmrun"), root.join("cpu/vmrun"), root.join("pids/vmrun")] {
        for e in std::fs::read_dir(&base).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(pid) = name.strip_prefix("vmrun-").and_then(|p| p.parse::<u32>().ok()) else { continue };
            if !Record::path(pid).exists() && !process_exists(pid) && std::fs::remove_dir(e.path()).is_ok() {
                removed.push(e.path());
            }
        }
    }
    removed
}

/// Whether process `pid` exists.
fn process_exists(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else { return false };
    // SAFETY: signal 0 only checks that the process exists.
    unsafe { libc::kill(pid, 0) == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM) }
}

/// What a jail makes on the host, written before it is made.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Record {
    root: PathBuf,
    cgroups: Vec<PathBuf>,
}

impl Record {
    fn path(pid: u32) -> PathBuf {
        PathBuf::from(JAIL_BASE).join(format!("{pid}.json"))
    }

    /// Writes the record of outer process `pid` and returns it open and
    /// locked (close-on-exec).
    fn write(&self, pid: u32) -> Result<File, Error> {
        std::fs::create_dir_all(JAIL_BASE).map_err(sys(format!("mkdir {JAIL_BASE}")))?;
        let path = Self::path(pid);
        let file = File::create(&path).map_err(sys(format!("create {}", path.display())))?;
        // SAFETY: flock on a descriptor we own. A record left by a dead
        // process with this pid is not held by anyone.
        check(unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) }, format!("lock {}", path.display()))?;
        let json = serde_json::to_vec(self).map_err(|e| Error::Sys { what: "jail record".into(), source: std::io::Error::other(e) })?;
        std::io::Write::write_all(&mut &file, &json).map_err(sys(format!("write {}", path.display())))?;
        Ok(file)
    }

    /// The record in `file` (empty if it cannot be read: nothing is then
    /// removed but the root and the record).
    fn read(file: &File) -> Self {
        let mut bytes = Vec::new();
        let _ = std::io::Read::read_to_end(&mut std::io::Read::take(file, 64 << 10), &mut bytes);
        serde_json::from_slice(&bytes).unwrap_or_default()
    }

    fn remove(pid: u32) {
        let _ = std::fs::remove_file(Self::path(pid));
    }
}

/// Whether the host has the unified (v2) hierarchy at /sys/fs/cgroup.
pub fn is_v2() -> bool {
    Path::new(CGROUP_ROOT).join("cgroup.controllers").exists()
}

/// The cgroup directories a jail named `name` gets: one under the v2 root,
/// else one in each of the v1 `memory`, `cpu` and `pids` hierarchies;
/// each under `$VMRUN_CGROUP_PARENT` or the cgroup this process is in.
fn cgroup_dirs(name: &str) -> Result<Vec<PathBuf>, Error> {
    let own = std::fs::read_to_string("/proc/self/cgroup").map_err(sys("read /proc/self/cgroup"))?;
    let parent = std::env::var(CGROUP_PARENT_ENV).ok().filter(|p| !p.is_empty());
    if let Some(p) = &parent {
        if Path::new(p).components().any(|c| matches!(c, std::path::Component::ParentDir)) {
            return Err(Error::Sys { what: format!("{CGROUP_PARENT_ENV}={p}"), source: std::io::ErrorKind::InvalidInput.into() });
        }
    }
    Ok(plan_cgroups(Path::new(CGROUP_ROOT), is_v2(), &own, parent.as_deref(), name))
}

/// [`cgroup_dirs`] for a cgroup file system at `root` and the contents of
/// `/proc/self/cgroup`.
fn plan_cgroups(root: &Path, v2: bool, proc_cgroup: &str, parent: Option<&str>, name: &str) -> Vec<PathBuf> {
    // "ID:CONTROLLERS:PATH"; v2's line is "0::PATH".
    let path_of = |controller: &str| -> String {
        proc_cgroup
            .lines()
            .filter_map(|l| {
                let mut f = l.splitn(3, ':');
                let (_, ctrls, path) = (f.next()?, f.next()?, f.next()?);
                let hit = if controller.is_empty() { ctrls.is_empty() } else { ctrls.split(',').any(|c| c == controller) };
                hit.then(|| path.to_string())
            })
            .next()
            .unwrap_or_else(|| "/".into())
    };
    let under = |hierarchy: PathBuf, controller: &str| {
        let rel = parent.map(str::to_string).unwrap_or_else(|| path_of(controller));
        hierarchy.join(rel.trim_start_matches('/')).join(name)
    };
    if v2 {
        return vec![under(root.to_path_buf(), "")];
    }
    ["memory", "cpu", "pids"].iter().map(|c| (root.join(c), *c)).filter(|(h, _)| h.is_dir()).map(|(h, c)| under(h, c)).collect()
}

/// A v1 cpu cgroup's quota (none: `-1` or unreadable) over `period`
/// microseconds: what a child's quota may be at most.
fn parent_quota_for(period: u64) -> impl Fn(&Path) -> Option<u64> {
    move |parent: &Path| {
        let read = |f: &str| std::fs::read_to_string(parent.join(f)).ok()?.trim().parse::<i64>().ok();
        let (quota, parent_period) = (read("cpu.cfs_quota_us")?, read("cpu.cfs_period_us")?);
        (quota > 0 && parent_period > 0).then(|| (quota as u64).saturating_mul(period) / parent_period as u64)
    }
}

/// Enables the memory, cpu and pids controllers for the children of v2
/// cgroup `dir` (and, as v2 requires, of its ancestors below the root).
fn enable_controllers(dir: &Path) -> Result<(), Error> {
    let root = Path::new(CGROUP_ROOT);
    let mut chain: Vec<&Path> = dir.ancestors().take_while(|a| a.starts_with(root)).collect();
    chain.reverse();
    for d in chain {
        let enabled = std::fs::read_to_string(d.join("cgroup.subtree_control")).unwrap_or_default();
        if ["memory", "cpu", "pids"].iter().all(|c| enabled.split_whitespace().any(|e| e == *c)) {
            continue;
        }
        std::fs::write(d.join("cgroup.subtree_control"), "+memory +cpu +pids")
            .map_err(|source| Error::Delegation { dir: d.to_path_buf(), source })?;
    }
    Ok(())
}

/// Closes every descriptor above standard error but `keep`: what the
/// process that started the VMM had open (a file on `9<`, a socket) is not
/// the jailed VMM's to use.
fn close_inherited_fds(keep: &[RawFd]) -> Result<(), Error> {
    let (ranges, keep) = ranges_to_close(keep);
    // SAFETY: close_range on this process's own descriptor table; nothing
    // of Rust's owns a descriptor above 2 this early in a VMM (checked:
    // single-threaded, before any file is opened) but the kept ones.
    let closed = ranges.iter().all(|&(a, b)| unsafe { libc::syscall(libc::SYS_close_range, a, b, 0u32) } == 0);
    if closed {
        return Ok(());
    }
    // Kernels before 5.9: one by one.
    let fds: Vec<i32> = std::fs::read_dir("/proc/self/fd")
        .map_err(sys("list /proc/self/fd"))?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .filter(|fd| *fd > 2 && !keep.contains(&(*fd as u32)))
        .collect();
    for fd in fds {
        // SAFETY: as above; the directory's own descriptor is closed
        // already (EBADF is fine).
        unsafe { libc::close(fd) };
    }
    Ok(())
}

/// The descriptor ranges above standard error around `keep` (inclusive):
/// [3, k1 - 1], [k1 + 1, k2 - 1], ..., [kn + 1, max]; and the kept ones
/// above 2, sorted.
fn ranges_to_close(keep: &[RawFd]) -> (Vec<(u32, u32)>, Vec<u32>) {
    let mut keep: Vec<u32> = keep.iter().filter_map(|&fd| u32::try_from(fd).ok()).filter(|&fd| fd > 2).collect();
    keep.sort_unstable();
    keep.dedup();
    let mut ranges = Vec::with_capacity(keep.len() + 1);
    let mut from = 3u32;
    for &k in &keep {
        if k > from {
            ranges.push((from, k - 1));
        }
        from = k.saturating_add(1);
    }
    ranges.push((from, u32::MAX));
    (ranges, keep)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn descriptors_closed_around_the_kept_ones() {
        assert_eq!(ranges_to_close(&[]).0, [(3, u32::MAX)]);
        assert_eq!(ranges_to_close(&[1, -1]).0, [(3, u32::MAX)]);
        assert_eq!(ranges_to_close(&[3]).0, [(4, u32::MAX)]);
        assert_eq!(ranges_to_close(&[9, 5, 9, 6]), (vec![(3, 4), (7, 8), (10, u32::MAX)], vec![5, 6, 9]));
    }

    #[test]
    fn outputs_make_writable_directories_and_the_rest_is_read_only() {
        let needs = Needs {
            read_only: vec!["/k/vmlinux".into(), "/t/snap".into()],
            disks: vec!["/vm/volume-0.disk".into(), "/layers/l.disk".into(), "/dev/null".into()],
            outputs: vec!["/vm/vsock.sock".into(), "/vm/control.sock".into(), "/vm/console.log".into()],
            taps: vec![],
            memory_mib: 256,
            cpus: 1,
            keep_fds: vec![7],
        };
        let j = Jail::for_needs(&needs).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(j.writable, vec![PathBuf::from("/vm")]);
        assert_eq!(j.read_only, vec![PathBuf::from("/k/vmlinux"), PathBuf::from("/t/snap"), PathBuf::from("/layers/l.disk")]);
        assert_eq!(j.limits, Some(Limits { guest_memory: 256 << 20, cpus: 1 }));
        assert_eq!(j.keep_fds, [7]);
    }

    #[test]
    fn uids_are_out_of_the_usual_ranges_and_distinct_per_pid() {
        assert_eq!(uid_for(1), 10_000_001);
        assert_ne!(uid_for(4_194_304), uid_for(4_194_303));
        assert!(uid_for(4_194_304) < u32::MAX);
    }

    #[test]
    fn a_quota_stays_within_the_parents() {
        let dir = tempfile::tempdir().unwrap();
        let q = parent_quota_for(100_000);
        assert_eq!(q(dir.path()), None, "no parent quota files");
        std::fs::write(dir.path().join("cpu.cfs_quota_us"), "50000\n").unwrap();
        std::fs::write(dir.path().join("cpu.cfs_period_us"), "200000\n").unwrap();
        assert_eq!(q(dir.path()), Some(25_000));
        std::fs::write(dir.path().join("cpu.cfs_quota_us"), "-1\n").unwrap();
        assert_eq!(q(dir.path()), None, "unlimited");
    }

    #[test]
    fn cgroups_go_under_the_callers_own_or_the_configured_parent() {
        let root = tempfile::tempdir().unwrap();
        for c in ["memory", "cpu", "pids", "devices"] {
            std::fs::create_dir(root.path().join(c)).unwrap();
        }
        // A hybrid host (this one's kind): v1 controllers, the caller in a
        // memory cgroup of its own.
        let v1 = "9:name=systemd:/\n8:pids:/\n4:memory:/ci/job-7\n2:cpu,cpuacct:/x\n0::/\n";
        let dirs = plan_cgroups(root.path(), false, v1, None, "vmrun-42");
        let want: Vec<PathBuf> = ["memory/ci/job-7/vmrun-42", "cpu/x/vmrun-42", "pids/vmrun-42"].iter().map(|d| root.path().join(d)).collect();
        assert_eq!(dirs, want);
        let dirs = plan_cgroups(root.path(), false, v1, Some("/tenants/a"), "vmrun-42");
        assert_eq!(dirs[0], root.path().join("memory/tenants/a/vmrun-42"));
        // v2: the one line "0::PATH".
        let v2 = "0::/system.slice/runner.service\n";
        assert_eq!(plan_cgroups(root.path(), true, v2, None, "vmrun-1"), vec![root.path().join("system.slice/runner.service/vmrun-1")]);
        assert_eq!(plan_cgroups(root.path(), true, "0::/\n", None, "vmrun-1"), vec![root.path().join("vmrun-1")]);
    }

    #[test]
    fn a_record_nobody_holds_is_collected_and_a_held_one_is_not() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: {JAIL_BASE} needs root");
            return;
        }
        // A pid no process has (above the kernel's pid_max).
        let pid = 4_194_304 + 17;
        let cg = tempfile::tempdir().unwrap();
        let dir = cg.path().join("vmrun-x");
        std::fs::create_dir(&dir).unwrap();
        let held = Record { root: PathBuf::from(JAIL_BASE).join(pid.to_string()), cgroups: vec![dir.clone()] }.write(pid).unwrap();
        std::fs::create_dir_all(PathBuf::from(JAIL_BASE).join(pid.to_string())).unwrap();
        // Its process is alive (we hold the lock): nothing goes.
        assert_eq!(collect(pid), Collected::Nothing);
        assert!(dir.is_dir() && Record::path(pid).exists());
        // Killed: the lock goes with it, and so does what it made.
        drop(held);
        let removed = collect_orphans();
        assert!(removed.contains(&dir) && removed.contains(&Record::path(pid)), "{removed:?}");
        assert!(!dir.exists() && !Record::path(pid).exists());
        assert!(!PathBuf::from(JAIL_BASE).join(pid.to_string()).exists());
    }

    #[test]
    fn a_record_whose_cgroup_still_has_a_process_waits_for_it() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: cgroups and {JAIL_BASE} need root");
            return;
        }
        let pid = 4_194_304 + 18;
        let hierarchy = if is_v2() { PathBuf::from(CGROUP_ROOT) } else { Path::new(CGROUP_ROOT).join("pids") };
        let dir = hierarchy.join(format!("vmrun-collect-test-{}", std::process::id()));
        std::fs::create_dir(&dir).unwrap();
        // The "jailed VMM" outliving its killed outer process: a child
        // moved into the cgroup.
        let mut child = std::process::Command::new("sleep").arg("600").spawn().unwrap();
        std::fs::write(dir.join("cgroup.procs"), child.id().to_string()).unwrap();
        drop(Record { root: PathBuf::from(JAIL_BASE).join(pid.to_string()), cgroups: vec![dir.clone()] }.write(pid).unwrap());
        assert_eq!(collect(pid), Collected::Busy);
        assert_eq!(jailed_processes(pid), vec![child.id()]);
        assert!(dir.is_dir() && Record::path(pid).exists());
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(jailed_processes(pid).is_empty());
        assert_eq!(collect(pid), Collected::Removed(vec![dir.clone(), Record::path(pid)]));
        assert!(!dir.exists());
    }

    #[test]
    fn confined_once_the_outer_process_says_so() {
        let pipe = || {
            let mut fds = [0 as libc::c_int; 2];
            // SAFETY: pipe2 fills the two descriptors, which we then own.
            unsafe {
                assert_eq!(libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC), 0);
                (std::os::fd::OwnedFd::from_raw_fd(fds[0]), File::from_raw_fd(fds[1]))
            }
        };
        // Moved: the byte, then the outer process's end closed.
        let (r, mut w) = pipe();
        let mut c = Confined { moved: Some(r) };
        std::io::Write::write_all(&mut w, &[1]).unwrap();
        drop(w);
        c.wait().unwrap();
        c.wait().unwrap();
        // The move failed: end of file without the byte.
        let (r, w) = pipe();
        drop(w);
        assert!(matches!(Confined { moved: Some(r) }.wait(), Err(Error::NotConfined)));
        // No cgroup: nothing to wait for.
        Confined { moved: None }.wait().unwrap();
    }

    #[test]
    fn inherited_descriptors_are_closed() {
        // In a child process: closing descriptors in the test harness
        // would break it.
        // SAFETY: the child only makes system calls and exits.
        let child = unsafe { libc::fork() };
        if child == 0 {
            // SAFETY: dup2 of an open descriptor, fcntl checks, _exit.
            unsafe {
                libc::dup2(1, 9);
                libc::dup2(1, 7);
                let ok = close_inherited_fds(&[7]).is_ok()
                    && libc::fcntl(9, libc::F_GETFD) < 0
                    && libc::fcntl(7, libc::F_GETFD) >= 0
                    && libc::fcntl(2, libc::F_GETFD) >= 0;
                libc::_exit(if ok { 0 } else { 1 });
            }
        }
        let mut status = 0;
        // SAFETY: waitpid on our own child.
        unsafe { libc::waitpid(child, &mut status, 0) };
        assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0, "descriptor 9 survived or 7 (kept) did not: status {status}");
    }

    #[test]
    fn the_kill_signal_reaches_the_jailed_process_as_sigkill() {
        // The outer process's part, in a child process: its own child (the
        // "VMM") keeps every forwarded signal blocked, so that only a
        // SIGKILL ends it (and SIGALRM, if nothing does within seconds).
        // SAFETY: the children only make system calls and exit.
        let outer = unsafe { libc::fork() };
        if outer == 0 {
            // SAFETY: as above.
            unsafe {
                let set = forwarded_signals();
                let inner = libc::fork();
                if inner == 0 {
                    libc::alarm(20);
                    loop {
                        libc::pause();
                    }
                }
                libc::kill(libc::getpid(), kill_signal());
                let code = wait_forwarding(inner, &set);
                libc::_exit(if code == 128 + libc::SIGKILL { 0 } else { code });
            }
        }
        let mut status = 0;
        // SAFETY: waitpid on our own child.
        unsafe { libc::waitpid(outer, &mut status, 0) };
        assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0, "the jailed process ended otherwise: status {status}");
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
