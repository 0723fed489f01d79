//! The allowlists: which system calls each kind of VMM thread may make once
//! its filter is installed, and with which arguments.
//!
//! Each entry says why the call is there. The lists were derived by reading
//! the code and by running the VMM under `strace -f` through a cold boot, a
//! snapshot (paused and `--resume`), a stop, a restore, agent traffic over
//! hybrid vsock, a disk and a TAP device (see `docs/seccomp.md` for the
//! procedure). Only what a thread does *after* its filter is installed
//! belongs here: setup (opening `/dev/kvm` and the device files, mapping
//! guest memory, the state a boot or restore sets such as `KVM_SET_CPUID2`,
//! `KVM_SET_LAPIC`, `KVM_SET_IRQCHIP` or `KVM_SET_CLOCK`, `KVM_IRQFD`,
//! `KVM_IOEVENTFD`, `TUNSETIFF`, binding sockets, spawning the vCPU
//! threads) is done before, and is deliberately absent.
//!
//! Argument conditions: an entry with an empty `when` allows the call with
//! any arguments; otherwise the call is allowed when one of the `when`
//! alternatives matches (all the conditions of that alternative).
//! File-descriptor numbers are not checked: they are only known at run time.

use super::{Allowed, Arg};

// ---------------------------------------------------------------------------
// ioctl request numbers (Linux `_IOC` encoding, x86_64).

const IOC_NONE: u64 = 0;
const IOC_WRITE: u64 = 1;
const IOC_READ: u64 = 2;

const fn ioc(dir: u64, ty: u64, nr: u64, size: usize) -> u64 {
    (dir << 30) | ((size as u64) << 16) | (ty << 8) | nr
}
const fn io(ty: u64, nr: u64) -> u64 {
    ioc(IOC_NONE, ty, nr, 0)
}
const fn ior(ty: u64, nr: u64, size: usize) -> u64 {
    ioc(IOC_READ, ty, nr, size)
}
const fn iow(ty: u64, nr: u64, size: usize) -> u64 {
    ioc(IOC_WRITE, ty, nr, size)
}
const fn iowr(ty: u64, nr: u64, size: usize) -> u64 {
    ioc(IOC_READ | IOC_WRITE, ty, nr, size)
}

const KVMIO: u64 = 0xAE;
const TUNIO: u64 = b'T' as u64;

use kvm_bindings as kb;
use std::mem::size_of;

/// `linux/kvm.h`, the vCPU ioctls the VMM makes after setup.
pub const KVM_RUN: u64 = io(KVMIO, 0x80);
pub const KVM_GET_REGS: u64 = ior(KVMIO, 0x81, size_of::<kb::kvm_regs>());
pub const KVM_SET_REGS: u64 = iow(KVMIO, 0x82, size_of::<kb::kvm_regs>());
pub const KVM_GET_SREGS: u64 = ior(KVMIO, 0x83, size_of::<kb::kvm_sregs>());
pub const KVM_SET_SREGS: u64 = iow(KVMIO, 0x84, size_of::<kb::kvm_sregs>());
pub const KVM_TRANSLATE: u64 = iowr(KVMIO, 0x85, size_of::<kb::kvm_translation>());
pub const KVM_GET_MSRS: u64 = iowr(KVMIO, 0x88, size_of::<kb::kvm_msrs>());
pub const KVM_SET_MSRS: u64 = iow(KVMIO, 0x89, size_of::<kb::kvm_msrs>());
pub const KVM_GET_LAPIC: u64 = ior(KVMIO, 0x8e, size_of::<kb::kvm_lapic_state>());
pub const KVM_GET_CPUID2: u64 = iowr(KVMIO, 0x91, size_of::<kb::kvm_cpuid2>());
pub const KVM_GET_MP_STATE: u64 = ior(KVMIO, 0x98, size_of::<kb::kvm_mp_state>());
pub const KVM_GET_VCPU_EVENTS: u64 = ior(KVMIO, 0x9f, size_of::<kb::kvm_vcpu_events>());
pub const KVM_SET_VCPU_EVENTS: u64 = iow(KVMIO, 0xa0, size_of::<kb::kvm_vcpu_events>());
pub const KVM_GET_DEBUGREGS: u64 = ior(KVMIO, 0xa1, size_of::<kb::kvm_debugregs>());
pub const KVM_GET_XSAVE: u64 = ior(KVMIO, 0xa4, size_of::<kb::kvm_xsave>());
pub const KVM_GET_XCRS: u64 = ior(KVMIO, 0xa6, size_of::<kb::kvm_xcrs>());

/// `linux/kvm.h`, the VM ioctls a snapshot makes (on the event loop).
pub const KVM_GET_IRQCHIP: u64 = iowr(KVMIO, 0x62, size_of::<kb::kvm_irqchip>());
pub const KVM_GET_CLOCK: u64 = ior(KVMIO, 0x7c, size_of::<kb::kvm_clock_data>());
pub const KVM_GET_PIT2: u64 = ior(KVMIO, 0x9f, size_of::<kb::kvm_pit_state2>());

/// `linux/if_tun.h`: the offloads the guest accepted, set when the guest's
/// driver activates virtio-net (an MMIO write, handled on a vCPU thread).
pub const TUNSETOFFLOAD: u64 = iow(TUNIO, 208, size_of::<libc::c_uint>());

/// `asm-generic/ioctls.h`: what `set_nonblocking` uses on sockets.
pub const FIONBIO: u64 = 0x5421;

// ---------------------------------------------------------------------------
// Argument conditions.

/// Argument `index`, as a 32-bit value (`int`, `unsigned int`), equals `value`.
const fn eq32(index: u8, value: u64) -> Arg {
    Arg { index, wide: false, mask: u32::MAX as u64, value }
}

/// Argument `index`, as a 64-bit value, equals `value`.
const fn eq64(index: u8, value: u64) -> Arg {
    Arg { index, wide: true, mask: u64::MAX, value }
}

/// The bits `mask` of argument `index` (64-bit) equal `value`.
const fn masked(index: u8, mask: u64, value: u64) -> Arg {
    Arg { index, wide: true, mask, value }
}

/// `ioctl(fd, request, ...)` with this request (an `unsigned int` in the
/// kernel, hence a 32-bit comparison).
macro_rules! req {
    ($r:expr) => {
        &[eq32(1, $r)]
    };
}

/// An allowed call with any arguments.
macro_rules! any {
    ($name:ident, $why:literal) => {
        Allowed { nr: libc::$name, name: strip(stringify!($name)), why: $why, when: &[] }
    };
}

/// An allowed call with conditions on its arguments.
macro_rules! when {
    ($name:ident, $why:literal, [$($alt:expr),+ $(,)?]) => {
        Allowed { nr: libc::$name, name: strip(stringify!($name)), why: $why, when: &[$($alt),+] }
    };
}

/// `SYS_read` -> `read`.
const fn strip(s: &'static str) -> &'static str {
    match s.as_bytes() {
        [b'S', b'Y', b'S', b'_', rest @ ..] => match std::str::from_utf8(rest) {
            Ok(r) => r,
            Err(_) => s,
        },
        _ => s,
    }
}

/// glibc's `SIGRTMIN`, the signal that kicks a vCPU thread out of
/// `KVM_RUN` (glibc keeps 32 and 33 for itself; a test checks the value).
pub const KICK_SIGNAL: u64 = 34;

/// `PROT_EXEC` must be clear: no thread maps or makes executable memory
/// after setup.
const NO_EXEC: &[Arg] = &[masked(2, libc::PROT_EXEC as u64, 0)];

/// `std::fs::File::open` and `File::create`: the only two ways files are
/// opened after setup.
const OPEN_READ: &[Arg] = &[eq32(2, (libc::O_RDONLY | libc::O_CLOEXEC) as u64)];
const OPEN_CREATE: &[Arg] =
    &[eq32(2, (libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC | libc::O_CLOEXEC) as u64)];

// ---------------------------------------------------------------------------
// What every thread needs: memory, locks, signals, its own end.

/// Calls both lists share: the allocator, locks, the kick signal and
/// debug-build checks. Kept separate so each thread's list below reads
/// as what is particular to it.
pub const COMMON: &[Allowed] = &[
    when!(SYS_mmap, "the allocator (glibc malloc: large blocks, new arenas); never executable", [NO_EXEC]),
    when!(SYS_mprotect, "the allocator grows a thread's arena (PROT_READ|PROT_WRITE); never executable", [NO_EXEC]),
    any!(SYS_munmap, "the allocator; a thread's alternate signal stack and kvm_run page at its end"),
    // Not seen in the traces, kept because glibc does it whenever a block
    // above the mmap threshold (128 KiB) is reallocated.
    any!(SYS_mremap, "the allocator: realloc of a block above the mmap threshold"),
    any!(SYS_brk, "the allocator's main arena"),
    when!(SYS_madvise, "glibc: freeing arena memory and a finished thread's stack", [&[
        eq32(2, libc::MADV_DONTNEED as u64)
    ]]),
    any!(SYS_futex, "Mutex, Condvar, OnceLock, thread join"),
    any!(SYS_rt_sigreturn, "return from the SIGRTMIN kick handler"),
    // Not seen in the traces, kept because the kernel makes it whenever a
    // sleep interrupted by the kick signal is restarted.
    any!(SYS_restart_syscall, "a call interrupted by the kick signal is restarted by the kernel"),
    // glibc also blocks signals while a thread ends.
    when!(SYS_rt_sigprocmask, "SignalGuard (vm.rs) restores the mask; glibc blocks signals in pthread_kill", [
        &[eq32(0, libc::SIG_BLOCK as u64)],
        &[eq32(0, libc::SIG_SETMASK as u64)],
    ]),
    any!(SYS_sigaltstack, "Rust's stack-overflow handler removes a thread's alternate signal stack when it ends"),
    any!(SYS_close, "dropping descriptors (connections, the vCPU fd at the end, snapshot files)"),
    when!(SYS_fcntl, "F_GETFD: debug builds' check that a dropped descriptor is open", [&[
        eq32(1, libc::F_GETFD as u64)
    ]]),
    any!(SYS_write, "eventfds (interrupts, queue and exit notifications), the console, the log on stderr"),
    any!(SYS_pread64, "KVM statistics (boot report milestones); /proc/self/smaps (resident memory); disk reads"),
    any!(SYS_getrusage, "CPU time at each boot report milestone"),
    // Not seen in the traces (the vDSO answers), kept because the vDSO
    // falls back to the system call on hosts whose clock source it cannot
    // read directly.
    any!(SYS_clock_gettime, "Instant::now when the vDSO falls back to the system call"),
    any!(SYS_exit, "the thread ends (a vCPU thread; the VMM thread when a library user runs the VM on a thread)"),
];

// ---------------------------------------------------------------------------
// vCPU threads: KVM_RUN and what a KVM exit leads to.

/// The vCPU threads' own list ([`COMMON`] is added).
///
/// A vCPU thread runs `KVM_RUN` and handles its exits: port and MMIO
/// accesses go to the device models (the serial console writes its
/// output, virtio transports write eventfds and, on activation of
/// virtio-net, set the TAP offloads), the host compatibility layer reads
/// and writes registers and MSRs to complete instructions the host cannot
/// emulate and the guest's system calls, and a pause for a snapshot saves
/// the vCPU's state. When profiling, the kick signal also comes from a
/// timer on the thread's CPU-time clock, and each interrupted `KVM_RUN`
/// reads the registers and the kernel stack (`KVM_GET_REGS`,
/// `KVM_TRANSLATE` above).
pub const VCPU: &[Allowed] = &[
    when!(SYS_ioctl, "KVM_RUN, exit handling, host compatibility assists, snapshot save, TUNSETOFFLOAD", [
        req!(KVM_RUN),
        // Host compatibility layer (host_compat): the syscall trap and the
        // instruction assists read and write registers and MSRs, translate
        // RIP and inject #BP.
        req!(KVM_GET_REGS),
        req!(KVM_SET_REGS),
        req!(KVM_GET_SREGS),
        req!(KVM_SET_SREGS),
        req!(KVM_GET_MSRS),
        req!(KVM_SET_MSRS),
        req!(KVM_TRANSLATE),
        req!(KVM_GET_VCPU_EVENTS),
        req!(KVM_SET_VCPU_EVENTS),
        // Snapshot: Vcpu::save_state (with GET_REGS, GET_SREGS, GET_MSRS,
        // GET_VCPU_EVENTS above).
        req!(KVM_GET_CPUID2),
        req!(KVM_GET_XSAVE),
        req!(KVM_GET_XCRS),
        req!(KVM_GET_DEBUGREGS),
        req!(KVM_GET_LAPIC),
        req!(KVM_GET_MP_STATE),
        // virtio-net activation (an MMIO write of DRIVER_OK).
        req!(TUNSETOFFLOAD),
    ]),
    any!(SYS_timer_delete, "the profile's sampling timer is deleted when the thread ends (armed before the filter)"),
];

// ---------------------------------------------------------------------------
// The VMM thread: the event loop.

/// The VMM thread's own list ([`COMMON`] is added), in force from the
/// first turn of the event loop to the process's exit.
///
/// The event loop serves the virtio devices (block: disk reads and
/// writes; net: the TAP; vsock: Unix sockets; rng: getrandom), console
/// input, the end of the VM (eventfds, signalfd), the control socket
/// (pause, resume, snapshot, stop, stats, attaching and detaching disk
/// images) and snapshots (files, directories,
/// VM-wide KVM state); then it stops the vCPU threads and writes the
/// boot report.
pub const VMM: &[Allowed] = &[
    any!(SYS_epoll_wait, "the event loop"),
    any!(SYS_epoll_ctl, "devices watch and unwatch descriptors (activation, vsock connections)"),
    any!(SYS_read, "eventfds, signalfd, timerfds, standard input, the TAP, vsock and control connections"),
    any!(SYS_pwrite64, "disk writes; snapshot memory file"),
    any!(SYS_fdatasync, "virtio-blk flush (File::sync_data)"),
    any!(SYS_fsync, "a snapshot's files are synced before their rename"),
    any!(SYS_ftruncate, "a snapshot's memory file gets its size (sparse)"),
    any!(SYS_timerfd_settime, "rate limiters arm their timer; vsock times host connections held over a transport reset"),
    when!(SYS_getrandom, "virtio-rng; hash map keys", [&[eq32(2, 0)], &[eq32(2, libc::GRND_INSECURE as u64)]]),
    when!(SYS_ioctl, "FIONBIO on control connections; the VM-wide state of a snapshot", [
        req!(FIONBIO),
        req!(KVM_GET_IRQCHIP),
        req!(KVM_GET_PIT2),
        req!(KVM_GET_CLOCK),
    ]),
    // Sockets: the control socket and hybrid vsock, all Unix stream sockets.
    when!(SYS_accept4, "new control and vsock connections (UnixListener::accept)", [&[
        eq32(3, libc::SOCK_CLOEXEC as u64)
    ]]),
    when!(SYS_socket, "vsock: a guest connects to a host port (<uds>_<port>)", [&[
        eq32(0, libc::AF_UNIX as u64),
        eq32(1, (libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC) as u64),
    ]]),
    any!(SYS_connect, "vsock: a guest connects to a host port"),
    when!(SYS_sendto, "vsock and control answers, on connected sockets only", [&[eq64(4, 0)]]),
    any!(SYS_recvfrom, "vsock (MSG_PEEK for the handshake) and control requests"),
    when!(SYS_recvmsg, "control requests, with the disk image descriptor an attach_disk brings", [&[
        eq32(2, libc::MSG_CMSG_CLOEXEC as u64)
    ]]),
    any!(SYS_shutdown, "vsock: a half-closed stream"),
    when!(SYS_setsockopt, "a read timeout on control connections", [&[
        eq32(1, libc::SOL_SOCKET as u64),
        eq32(2, libc::SO_RCVTIMEO as u64),
    ]]),
    // Files: snapshots, the boot report, resident memory.
    when!(SYS_openat, "snapshot and report files (File::create); /proc/self/smaps (File::open)", [
        OPEN_READ,
        OPEN_CREATE,
    ]),
    any!(SYS_mkdir, "a snapshot's directory (create_dir_all)"),
    any!(SYS_rename, "a snapshot's files are renamed into place"),
    any!(SYS_statx, "create_dir_all; the vsock socket file is checked before it is removed"),
    any!(SYS_unlink, "removing the control and vsock sockets at the end"),
    // Stopping the vCPUs and ending.
    when!(SYS_tgkill, "kicking the vCPU threads out of KVM_RUN (pause, snapshot, stop)", [&[eq32(2, KICK_SIGNAL)]]),
    any!(SYS_getpid, "pthread_kill needs the process id"),
    any!(SYS_clock_nanosleep, "waiting for the vCPU threads to stop"),
    any!(SYS_exit_group, "the process ends"),
];
