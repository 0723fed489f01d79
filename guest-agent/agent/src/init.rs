//! PID 1 in the guest: the first system calls after the kernel hands over.
//!
//! Startup to "listening" is a handful of system calls: a tmpfs made the
//! root (the initramfs left behind, empty), six mounts, at most
//! one read of `/proc/cmdline` (none when the settings come as `vmrun_*`
//! parameters), `umask`, `sigaction`, `sigprocmask`, `signalfd`, then
//! `socket`, `bind`, `listen`. The Rust runtime's own setup (stack guard
//! pages, alternate signal stacks) is skipped: `main` is the C entry point.

use std::os::fd::AsFd;

use crate::settings::{self, Settings, SettingsError};
use crate::sys;

/// Milliseconds on `CLOCK_MONOTONIC` (since boot, in a guest).
pub fn monotonic_ms() -> u64 {
    let mut t = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime fills in `t`.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut t) };
    t.tv_sec as u64 * 1000 + t.tv_nsec as u64 / 1_000_000
}

/// The directory of the initramfs the new root is mounted on, then moved
/// from.
const NEW_ROOT: &std::ffi::CStr = c"/root";

/// Leaves the initramfs for a root of its own, as `switch_root` does: a
/// tmpfs with the mount points, moved over `/`, the initramfs's files
/// (this program, the console node, the mount points) deleted first. The initramfs stays
/// the mount namespace's bottom mount (it cannot be unmounted), now empty:
/// a container whose process gets above its root (`chroot` and `..`)
/// finds nothing there. And every container's root can now be entered
/// with `pivot_root` (it needs a root mount with a parent), which leaves
/// none of the agent's mounts in the container's namespace.
///
/// A failure before the move leaves the agent on the initramfs; it is
/// logged, and containers then cannot start (`pivot_root` is refused).
pub fn leave_initramfs() {
    let steps = || -> std::io::Result<()> {
        // The kernel may have made it (an empty `/root`).
        // SAFETY: mkdir of a constant path.
        if unsafe { libc::mkdir(NEW_ROOT.as_ptr(), 0o755) } < 0 && sys::errno().raw_os_error() != Some(libc::EEXIST) {
            return Err(sys::errno());
        }
        sys::mount(Some(c"tmpfs"), NEW_ROOT, Some(c"tmpfs"), libc::MS_NOSUID, Some(c"mode=0755"))?;
        let root = sys::open(NEW_ROOT, libc::O_DIRECTORY | libc::O_PATH, 0)?;
        for d in [c"dev", c"proc", c"sys", c"tmp", c"run"] {
            sys::mkdirat(root.as_fd(), d, 0o755)?;
        }
        // What the initramfs holds (`rootfs/initramfs`); a file left over
        // is logged, not fatal.
        let top = sys::open(c"/", libc::O_DIRECTORY | libc::O_PATH, 0)?;
        let files = [c"init", c"dev/console"].map(|f| (f, 0));
        let dirs = [c"dev", c"proc", c"sys", c"tmp", c"run"].map(|d| (d, libc::AT_REMOVEDIR));
        for (name, flags) in files.into_iter().chain(dirs) {
            if let Err(e) = sys::unlinkat(top.as_fd(), name, flags) {
                crate::log::error(format_args!("removing /{} from the initramfs: {e}", name.to_string_lossy()));
            }
        }
        // SAFETY: plain system calls on constant paths; results checked.
        unsafe {
            sys::cvt(libc::chdir(NEW_ROOT.as_ptr()))?;
            sys::cvt(libc::mount(c".".as_ptr(), c"/".as_ptr(), std::ptr::null(), libc::MS_MOVE, std::ptr::null()))?;
            sys::cvt(libc::chroot(c".".as_ptr()))?;
            sys::cvt(libc::chdir(c"/".as_ptr()))?;
        }
        Ok(())
    };
    if let Err(e) = steps() {
        crate::log::error(format_args!("leaving the initramfs: {e}"));
    }
}

/// Mounts /proc, /sys, /dev (devtmpfs), /tmp, /run and the cgroup2
/// hierarchy. The initramfs provides the mount points. A failure is
/// logged, not fatal: the agent can still serve without one of them.
pub fn mount_basics() {
    let nsd = libc::MS_NOSUID | libc::MS_NODEV;
    let mounts: [(&std::ffi::CStr, &std::ffi::CStr, &std::ffi::CStr, libc::c_ulong, Option<&std::ffi::CStr>); 6] = [
        (c"proc", c"/proc", c"proc", nsd | libc::MS_NOEXEC, None),
        (c"sysfs", c"/sys", c"sysfs", nsd | libc::MS_NOEXEC, None),
        (c"devtmpfs", c"/dev", c"devtmpfs", libc::MS_NOSUID, Some(c"mode=0755")),
        (c"tmpfs", c"/tmp", c"tmpfs", nsd, Some(c"mode=1777")),
        (c"tmpfs", c"/run", c"tmpfs", nsd, Some(c"mode=0755")),
        (c"cgroup2", c"/sys/fs/cgroup", c"cgroup2", nsd | libc::MS_NOEXEC, None),
    ];
    for (src, target, fstype, flags, data) in mounts {
        match sys::mount(Some(src), target, Some(fstype), flags, data) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
            Err(e) => crate::log::error(format_args!("mount {}: {e}", target.to_string_lossy())),
        }
    }
}

/// The guest's settings: `vmrun_*` from the environment, else `vmrun.*`
/// from `/proc/cmdline`.
pub fn guest_settings() -> Result<Settings, SettingsError> {
    let env: Vec<(String, String)> = std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .collect();
    let pairs = settings::env_pairs(&env);
    if !pairs.is_empty() {
        return settings::from_pairs(pairs);
    }
    // One read: /proc/cmdline hands over the whole line at once.
    let mut buf = vec![0u8; 64 * 1024];
    let n = sys::open(c"/proc/cmdline", libc::O_RDONLY, 0).and_then(|fd| sys::read(fd.as_fd(), &mut buf)).unwrap_or(0);
    let cmdline = String::from_utf8_lossy(&buf[..n]);
    settings::from_pairs(settings::cmdline_pairs(&cmdline))
}

/// Tunes malloc for few system calls: big `brk` steps, no `mmap` for
/// buffers up to 4 MiB, one arena for all threads.
pub fn tune_malloc() {
    // SAFETY: mallopt only changes malloc's parameters.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 4 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 64 << 20);
        libc::mallopt(libc::M_TOP_PAD, 16 << 20);
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// The process-wide settings both modes need: files are created with
/// exactly the modes asked for (umask 0; container processes get 022), and
/// a write to a closed pipe or socket is an error, not a signal.
pub fn process_setup() {
    // SAFETY: umask and signal disposition changes; no memory involved.
    unsafe {
        libc::umask(0);
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    }
}

/// On a host: a private mount namespace (container roots are mounted there
/// and vanish with the agent) and child-subreaper status (orphans of the
/// agent's children come back to it to be reaped).
pub fn host_setup() -> std::io::Result<()> {
    // SAFETY: plain system calls; results checked.
    unsafe {
        sys::cvt(libc::unshare(libc::CLONE_NEWNS))?;
        sys::cvt(libc::mount(c"none".as_ptr(), c"/".as_ptr(), std::ptr::null(), libc::MS_REC | libc::MS_PRIVATE, std::ptr::null()))?;
        sys::cvt(libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0))?;
    }
    Ok(())
}

/// Ends the guest: flush file systems the host gave us, then reboot (which
/// `reboot=k` turns into the reset that ends the VMM).
pub fn end_guest() -> ! {
    // What the agent wrote last (the answer to `Shutdown`) leaves through
    // the vsock transport's work item, which runs only once this process
    // lets go of the (often single) vCPU: give it the moment, or the reset
    // can come first and the host never sees the answer.
    std::thread::sleep(std::time::Duration::from_millis(50));
    // SAFETY: sync and reboot; PID 1 may call them.
    unsafe {
        libc::sync();
        libc::reboot(libc::RB_AUTOBOOT);
    }
    // reboot only returns on failure; PID 1 must not exit.
    loop {
        // SAFETY: pause just sleeps.
        unsafe { libc::pause() };
    }
}
