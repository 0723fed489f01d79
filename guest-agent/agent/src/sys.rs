//! Thin, safe wrappers over the system calls the agent makes.
//!
//! Every system call is expensive in the guest (tens of milliseconds where
//! guest kernel mode is emulated), so callers make each one count; these
//! wrappers add none of their own. Paths are `&CStr` so that the caller
//! builds them once (and the forked child never allocates).

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

pub use vmrun_tree::sys::{
    cstring, cvt, cvt_long, dup, errno, fchmod, fchown, lchownat, mkdirat, openat, openat2, owned, read_dir_names, symlinkat, unlinkat,
    write_all,
};

/// `open(2)` (always close-on-exec).
pub fn open(path: &CStr, flags: i32, mode: u32) -> io::Result<OwnedFd> {
    // SAFETY: path is NUL-terminated; the result is checked.
    let fd = cvt(unsafe { libc::open(path.as_ptr(), flags | libc::O_CLOEXEC, mode) })?;
    Ok(owned(fd))
}

/// `linkat(2)` without following a symlink at `old`.
pub fn linkat(old_dir: BorrowedFd<'_>, old: &CStr, new_dir: BorrowedFd<'_>, new: &CStr) -> io::Result<()> {
    // SAFETY: both strings are NUL-terminated.
    cvt(unsafe { libc::linkat(old_dir.as_raw_fd(), old.as_ptr(), new_dir.as_raw_fd(), new.as_ptr(), 0) }).map(drop)
}

/// `mknodat(2)`.
pub fn mknodat(dir: BorrowedFd<'_>, name: &CStr, mode: u32, dev: u64) -> io::Result<()> {
    // SAFETY: name is NUL-terminated.
    cvt(unsafe { libc::mknodat(dir.as_raw_fd(), name.as_ptr(), mode, dev) }).map(drop)
}

/// `fchmodat(2)` (follows a final symlink: use on directories only).
pub fn fchmodat(dir: BorrowedFd<'_>, name: &CStr, mode: u32) -> io::Result<()> {
    // SAFETY: name is NUL-terminated.
    cvt(unsafe { libc::fchmodat(dir.as_raw_fd(), name.as_ptr(), mode, 0) }).map(drop)
}

fn times(sec: i64) -> [libc::timespec; 2] {
    let t = libc::timespec { tv_sec: sec, tv_nsec: 0 };
    [t, t]
}

/// Sets access and modification time of an open file.
pub fn futimens(fd: BorrowedFd<'_>, sec: i64) -> io::Result<()> {
    let t = times(sec);
    // SAFETY: `t` is an array of two timespecs, as futimens wants.
    cvt(unsafe { libc::futimens(fd.as_raw_fd(), t.as_ptr()) }).map(drop)
}

/// Sets access and modification time of `name` itself (not a symlink's
/// target).
pub fn lutimensat(dir: BorrowedFd<'_>, name: &CStr, sec: i64) -> io::Result<()> {
    let t = times(sec);
    // SAFETY: name is NUL-terminated, `t` holds two timespecs.
    cvt(unsafe { libc::utimensat(dir.as_raw_fd(), name.as_ptr(), t.as_ptr(), libc::AT_SYMLINK_NOFOLLOW) }).map(drop)
}

/// Sets `CLOCK_REALTIME` to `to` since the epoch (needs `CAP_SYS_TIME`).
pub fn set_realtime(to: std::time::Duration) -> io::Result<()> {
    let t = libc::timespec {
        tv_sec: libc::time_t::try_from(to.as_secs()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?,
        tv_nsec: libc::c_long::from(to.subsec_nanos()),
    };
    // SAFETY: clock_settime reads the timespec this function owns.
    cvt(unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &t) }).map(drop)
}

/// `fstatat(2)` without following a final symlink.
pub fn lstatat(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<libc::stat> {
    // SAFETY: all-zero is a valid `stat`; the kernel fills it in.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: name is NUL-terminated and `st` is writable.
    cvt(unsafe { libc::fstatat(dir.as_raw_fd(), name.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) })?;
    Ok(st)
}

/// `fsetxattr(2)`.
pub fn fsetxattr(fd: BorrowedFd<'_>, name: &CStr, value: &[u8]) -> io::Result<()> {
    // SAFETY: name is NUL-terminated; value is a valid slice.
    cvt(unsafe { libc::fsetxattr(fd.as_raw_fd(), name.as_ptr(), value.as_ptr().cast(), value.len(), 0) }).map(drop)
}

/// One `write(2)`; returns how much was written.
pub fn write(fd: BorrowedFd<'_>, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: buf is a valid slice.
    let n = unsafe { libc::write(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len()) };
    if n < 0 {
        Err(errno())
    } else {
        Ok(n as usize)
    }
}

/// One `read(2)`.
pub fn read(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: buf is a valid, writable slice.
    let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        Err(errno())
    } else {
        Ok(n as usize)
    }
}

/// `mount(2)`.
pub fn mount(source: Option<&CStr>, target: &CStr, fstype: Option<&CStr>, flags: libc::c_ulong, data: Option<&CStr>) -> io::Result<()> {
    let p = |s: Option<&CStr>| s.map_or(std::ptr::null(), |s| s.as_ptr());
    // SAFETY: every pointer is NUL-terminated or null, as mount(2) allows.
    cvt(unsafe { libc::mount(p(source), target.as_ptr(), p(fstype), flags, p(data).cast()) }).map(drop)
}

/// `open_tree(2)` with `OPEN_TREE_CLONE`: a detached copy of the mount at
/// `path` (with the mounts below it when `recursive`), which `move_mount`
/// can attach in another mount namespace.
pub fn clone_tree(path: &CStr, recursive: bool) -> io::Result<OwnedFd> {
    const OPEN_TREE_CLONE: libc::c_uint = 1;
    const AT_RECURSIVE: libc::c_uint = 0x8000;
    let flags = OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint | if recursive { AT_RECURSIVE } else { 0 };
    // SAFETY: path is NUL-terminated; the result is checked.
    let fd = unsafe { libc::syscall(libc::SYS_open_tree, libc::AT_FDCWD, path.as_ptr(), flags) };
    if fd < 0 {
        return Err(errno());
    }
    // SAFETY: a descriptor the kernel just returned.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// `umount2(2)`.
pub fn umount2(target: &CStr, flags: i32) -> io::Result<()> {
    // SAFETY: target is NUL-terminated.
    cvt(unsafe { libc::umount2(target.as_ptr(), flags) }).map(drop)
}

/// `pipe2(2)` with close-on-exec (and `extra` flags): (read end, write end).
pub fn pipe(extra: i32) -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: fds has room for the two descriptors.
    cvt(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | extra) })?;
    Ok((owned(fds[0]), owned(fds[1])))
}

/// Adds flags to a descriptor's status flags (`O_NONBLOCK`).
pub fn set_fl(fd: BorrowedFd<'_>, flags: i32) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor we hold.
    let cur = cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) })?;
    // SAFETY: as above.
    cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, cur | flags) }).map(drop)
}

/// `kill(2)`.
pub fn kill(pid: i32, sig: i32) -> io::Result<()> {
    // SAFETY: plain system call.
    cvt(unsafe { libc::kill(pid, sig) }).map(drop)
}

/// Waits until the process of `pidfd` has ended (the pidfd reads as
/// ready), for at most `limit` (`None`: however long it takes). `false`
/// when the limit passed first; an interrupted wait goes on within it.
pub fn wait_ended(pidfd: BorrowedFd<'_>, limit: Option<std::time::Duration>) -> io::Result<bool> {
    let deadline = limit.map(|l| std::time::Instant::now() + l);
    loop {
        let timeout = deadline.map_or(-1, |d| {
            let left = d.saturating_duration_since(std::time::Instant::now());
            left.as_micros().div_ceil(1000).min(libc::c_int::MAX as u128) as libc::c_int
        });
        let mut p = libc::pollfd { fd: pidfd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: poll of one pollfd on this stack, for a descriptor the
        // caller holds.
        match unsafe { libc::poll(&mut p, 1, timeout) } {
            0 if deadline.is_none_or(|d| std::time::Instant::now() >= d) => return Ok(false),
            // Timed out before the deadline (poll's clock is coarser): the
            // wait goes on.
            0 => {}
            n if n > 0 => return Ok(true),
            _ => {
                let e = errno();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
}

/// Sets a terminal's window size.
pub fn set_winsize(fd: BorrowedFd<'_>, rows: u16, cols: u16) -> io::Result<()> {
    let ws = libc::winsize { ws_row: rows, ws_col: cols, ws_xpixel: 0, ws_ypixel: 0 };
    // SAFETY: TIOCSWINSZ reads one winsize.
    cvt(unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCSWINSZ, &ws as *const libc::winsize) }).map(drop)
}

/// Opens a new pseudo-terminal from the `ptmx` at `ptmx`: (master, slave).
/// The slave is opened through the master (`TIOCGPTPEER`), never by path.
pub fn open_pty(ptmx: &CStr) -> io::Result<(OwnedFd, OwnedFd)> {
    pty_pair(open(ptmx, libc::O_RDWR | libc::O_NOCTTY, 0)?)
}

/// A pseudo-terminal of the devpts instance whose root is `devpts` (from
/// [`new_devpts`]): its `ptmx`, so that the terminal belongs to that
/// instance (`tty` names it in a container that mounts it on `/dev/pts`).
pub fn open_pty_in(devpts: BorrowedFd<'_>) -> io::Result<(OwnedFd, OwnedFd)> {
    pty_pair(openat(devpts, c"ptmx", libc::O_RDWR | libc::O_NOCTTY, 0)?)
}

/// A new devpts instance as a detached mount (`fsopen`, `fsmount`: it is
/// in no mount namespace until `move_mount` attaches it), `nosuid` and
/// `noexec`, with runc's options `ptmxmode=0666,mode=0620,gid=5`.
pub fn new_devpts() -> io::Result<OwnedFd> {
    // "source" names it in mountinfo as a mount(2) of "devpts" would.
    let options = [(c"source", c"devpts"), (c"ptmxmode", c"0666"), (c"mode", c"0620"), (c"gid", c"5")];
    new_mount(c"devpts", &options, MOUNT_ATTR_NOSUID | MOUNT_ATTR_NOEXEC)
}

/// `fsmount`'s attribute: `nosuid`.
pub const MOUNT_ATTR_NOSUID: libc::c_uint = 0x2;
/// `fsmount`'s attribute: `nodev`.
pub const MOUNT_ATTR_NODEV: libc::c_uint = 0x4;
/// `fsmount`'s attribute: `noexec`.
pub const MOUNT_ATTR_NOEXEC: libc::c_uint = 0x8;

/// A new instance of the file system `fstype` with string `options`, as a
/// detached mount with the attributes `attrs` (`MOUNT_ATTR_*`): a
/// directory descriptor of its root, which `move_mount` can attach.
pub fn new_mount(fstype: &CStr, options: &[(&CStr, &CStr)], attrs: libc::c_uint) -> io::Result<OwnedFd> {
    const FSOPEN_CLOEXEC: libc::c_uint = 1;
    const FSCONFIG_SET_STRING: libc::c_uint = 1;
    const FSCONFIG_CMD_CREATE: libc::c_uint = 6;
    const FSMOUNT_CLOEXEC: libc::c_uint = 1;
    // SAFETY: the name is NUL-terminated; the result is checked.
    let fs = cvt_long(unsafe { libc::syscall(libc::SYS_fsopen, fstype.as_ptr(), FSOPEN_CLOEXEC) })?;
    let fs = owned(fs as RawFd);
    for (key, value) in options {
        // SAFETY: key and value are NUL-terminated; fs is our descriptor.
        cvt_long(unsafe { libc::syscall(libc::SYS_fsconfig, fs.as_raw_fd(), FSCONFIG_SET_STRING, key.as_ptr(), value.as_ptr(), 0) })?;
    }
    // SAFETY: FSCONFIG_CMD_CREATE takes no key or value.
    cvt_long(unsafe {
        libc::syscall(libc::SYS_fsconfig, fs.as_raw_fd(), FSCONFIG_CMD_CREATE, std::ptr::null::<libc::c_char>(), std::ptr::null::<libc::c_void>(), 0)
    })?;
    // SAFETY: fsmount of a created file system context; the result is checked.
    let m = cvt_long(unsafe { libc::syscall(libc::SYS_fsmount, fs.as_raw_fd(), FSMOUNT_CLOEXEC, attrs) })?;
    Ok(owned(m as RawFd))
}

/// The slave of the pty whose master is `master` (unlocked).
fn pty_pair(master: OwnedFd) -> io::Result<(OwnedFd, OwnedFd)> {
    let unlock: libc::c_int = 0;
    // SAFETY: TIOCSPTLCK reads one int.
    cvt(unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSPTLCK, &unlock as *const libc::c_int) })?;
    // SAFETY: TIOCGPTPEER takes open flags by value and returns a new fd.
    let slave = cvt(unsafe {
        libc::ioctl(master.as_raw_fd(), libc::TIOCGPTPEER, libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC)
    })?;
    Ok((master, owned(slave)))
}

/// `RNDADDENTROPY` = `_IOW('R', 0x03, int[2])`: mix bytes into the input
/// pool and credit them.
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
/// `RNDRESEEDCRNG` = `_IO('R', 0x07)`: reseed the CRNG from the input pool
/// now.
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

/// Mixes `bytes` (trusted: from the host) into the kernel's random pool,
/// crediting them in full, and reseeds the CRNG from the pool, through
/// `random`, a descriptor of `/dev/urandom` or `/dev/random`. Needs
/// `CAP_SYS_ADMIN`. After it, every CRNG output (`getrandom`,
/// `/dev/urandom`, the kernel's own `get_random_*`, ASLR of new
/// processes) depends on `bytes`.
pub fn add_entropy_and_reseed(random: BorrowedFd<'_>, bytes: &[u8]) -> io::Result<()> {
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    let words = bytes.len().div_ceil(4);
    let mut info = vec![0u32; 2 + words];
    let bits = i32::try_from(bytes.len() * 8).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    info[0] = bits as u32;
    info[1] = bytes.len() as u32;
    for (i, chunk) in bytes.chunks(4).enumerate() {
        let mut w = [0u8; 4];
        w[..chunk.len()].copy_from_slice(chunk);
        info[2 + i] = u32::from_ne_bytes(w);
    }
    // SAFETY: `info` is a rand_pool_info whose buf_size bytes follow its
    // header in the same allocation; the kernel only reads it.
    cvt(unsafe { libc::ioctl(random.as_raw_fd(), RNDADDENTROPY as _, info.as_ptr()) })?;
    // SAFETY: an ioctl without argument on our descriptor.
    cvt(unsafe { libc::ioctl(random.as_raw_fd(), RNDRESEEDCRNG as _) })?;
    Ok(())
}

/// `BLKFLSBUF` = `_IO(0x12, 97)`: flush and drop a block device's cache.
const BLKFLSBUF: libc::c_ulong = 0x1261;

/// A read-only mapping of a whole file or block device.
#[derive(Debug)]
pub struct Mapping {
    ptr: *mut libc::c_void,
    len: usize,
}

// SAFETY: the mapping is read-only and owned by this value; sharing or
// sending a pointer to immutable memory between threads is sound.
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps `path` (a file or a block device) read-only, in four system
    /// calls: open, lseek to learn its size, mmap, close.
    /// For a block device, its cached pages are dropped first (BLKFLSBUF):
    /// after a snapshot restore the device holds another disk than the one
    /// the cache saw.
    pub fn open(path: &CStr) -> io::Result<Self> {
        let fd = open(path, libc::O_RDONLY, 0)?;
        // SAFETY: BLKFLSBUF takes no argument; on a regular file it fails
        // with ENOTTY, which is fine.
        unsafe { libc::ioctl(fd.as_raw_fd(), BLKFLSBUF as _, 0) };
        // SAFETY: lseek on a descriptor we hold.
        let size = unsafe { libc::lseek(fd.as_raw_fd(), 0, libc::SEEK_END) };
        if size < 0 {
            return Err(errno());
        }
        let len = usize::try_from(size).map_err(|_| io::Error::from(io::ErrorKind::InvalidData))?;
        if len == 0 {
            return Ok(Self { ptr: std::ptr::null_mut(), len: 0 });
        }
        // SAFETY: a fresh read-only private mapping of `len` bytes of a file
        // we opened; the kernel picks the address.
        let ptr = unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ, libc::MAP_PRIVATE, fd.as_raw_fd(), 0) };
        if ptr == libc::MAP_FAILED {
            return Err(errno());
        }
        Ok(Self { ptr, len })
    }

    /// The mapped bytes. (A device that shrinks while mapped would fault;
    /// the host gives a read-only disk that does not change.)
    pub fn bytes(&self) -> &[u8] {
        if self.len == 0 {
            return &[];
        }
        // SAFETY: ptr..ptr+len is mapped readable for as long as self lives.
        unsafe { std::slice::from_raw_parts(self.ptr as *const u8, self.len) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        if self.len > 0 {
            // SAFETY: unmapping exactly what Mapping::open mapped.
            unsafe { libc::munmap(self.ptr, self.len) };
        }
    }
}

/// Decodes a wait status the way docker reports exit codes: the exit
/// status, or 128 + the signal that killed the process.
pub fn exit_code(status: libc::c_int) -> i32 {
    if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else if libc::WIFSIGNALED(status) {
        128 + libc::WTERMSIG(status)
    } else {
        255
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn a_wait_for_a_process_ends_with_it_or_at_its_limit() {
        let mut child = std::process::Command::new("sleep").arg("1000").spawn().unwrap_or_else(|e| panic!("sleep: {e}"));
        // SAFETY: pidfd_open of our own child; the result is checked.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, child.id() as libc::pid_t, 0) };
        assert!(fd >= 0, "pidfd_open: {}", io::Error::last_os_error());
        // SAFETY: a new descriptor, which we now own.
        let pidfd = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
        let start = std::time::Instant::now();
        assert!(!wait_ended(pidfd.as_fd(), Some(std::time::Duration::from_millis(100))).unwrap(), "it is still running");
        assert!(start.elapsed() >= std::time::Duration::from_millis(100), "the limit was not waited out");
        child.kill().unwrap();
        assert!(wait_ended(pidfd.as_fd(), None).unwrap(), "it ended");
        child.wait().unwrap();
    }

    #[test]
    fn exit_codes_follow_docker() {
        assert_eq!(exit_code(3 << 8), 3);
        assert_eq!(exit_code(9), 137);
        assert_eq!(exit_code(15 | 0x80), 143); // core dumped
    }

    #[test]
    fn maps_a_file() {
        let p = std::env::temp_dir().join(format!("vmrun-agent-map-{}", std::process::id()));
        std::fs::write(&p, b"layer bytes").unwrap();
        let m = Mapping::open(&cstring(p.as_os_str().as_encoded_bytes()).unwrap()).unwrap();
        assert_eq!(m.bytes(), b"layer bytes");
        std::fs::remove_file(&p).unwrap();
        assert!(Mapping::open(&cstring(p.as_os_str().as_encoded_bytes()).unwrap()).is_err());
    }
}
