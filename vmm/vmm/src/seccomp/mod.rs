//! Seccomp filters for the VMM's threads.
//!
//! The VMM process runs two kinds of threads, and each gets its own
//! allowlist (see `docs/seccomp.md` for the rationale of each entry and how
//! to extend the lists):
//!
//! * the **VMM thread** (the one that called [`crate::run`] or
//!   [`crate::restore`]): it builds the VM, then runs the event loop
//!   (devices, console input, control socket, snapshots) and tears the VM
//!   down. Its filter, [`filters::VMM`], is installed once setup is done,
//!   right before the event loop's first turn;
//! * the **vCPU threads**: each installs [`filters::VCPU`] first thing,
//!   before its first `KVM_RUN`.
//!
//! The VMM starts no other thread. Its filter has no `clone`/`clone3`, so a
//! thread started later from the event loop would kill the VMM at once: a
//! new kind of thread needs its own list here.
//!
//! No guest instruction runs before every filter is in place: the vCPU
//! threads install theirs, report it, and wait at a start gate that the
//! VMM thread opens only after installing its own (see `vm.rs`).
//!
//! A system call outside a thread's list kills the whole process
//! (`SECCOMP_RET_KILL_PROCESS`, the VMM dies of `SIGSYS`): a compromised or
//! broken device model must take the VMM down, not leave a VM half
//! working. [`SeccompMode::Log`] lets such calls through and has the kernel
//! log them instead (`dmesg`), to find what a list lacks;
//! [`SeccompMode::Off`] installs nothing.
//!
//! The lists are Rust data ([`filters`]), not seccompiler's JSON: system
//! call names are `libc::SYS_*` constants and ioctl numbers are computed
//! from the kernel's `_IOC` encoding and `kvm_bindings`' struct sizes, so a
//! typo does not compile, each entry carries its reason next to it, and
//! nothing is parsed at start. They are compiled to BPF with `seccompiler`
//! when a VM is built (well under a millisecond).
//!
//! The filters stay on their threads for good (seccomp filters cannot be
//! removed): a program that calls [`crate::run`] keeps the VMM filter on
//! that thread after the VM ends. `vmrun` runs one VM per process and
//! exits; a library user who wants to go on should run the VM on a thread
//! of its own, or turn the filters off.

pub mod filters;

use std::collections::BTreeMap;
use std::sync::Arc;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule,
    TargetArch,
};

use crate::config::SeccompMode;

/// One system call a thread may make.
#[derive(Debug, Clone, Copy)]
pub struct Allowed {
    /// Its number (`libc::SYS_*`).
    pub nr: i64,
    /// Its name, for messages and documentation.
    pub name: &'static str,
    /// Why the thread makes it.
    pub why: &'static str,
    /// Empty: allowed with any arguments. Otherwise allowed when one of
    /// these alternatives matches, that is when all of its conditions do.
    pub when: &'static [&'static [Arg]],
}

/// A condition on one argument: `(argument & mask) == value`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Arg {
    /// Which argument (0 to 5).
    pub index: u8,
    /// Compare all 64 bits (`false`: the low 32, for `int` arguments).
    pub wide: bool,
    pub mask: u64,
    pub value: u64,
}

/// The kinds of threads of the VMM process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    /// The thread that builds the VM and runs the event loop.
    Vmm,
    /// A vCPU thread.
    Vcpu,
}

impl ThreadKind {
    /// Every kind.
    pub const ALL: [ThreadKind; 2] = [ThreadKind::Vmm, ThreadKind::Vcpu];

    /// Its name in messages.
    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Vmm => "VMM",
            ThreadKind::Vcpu => "vCPU",
        }
    }

    /// Its allowlist: what every thread needs plus its own.
    pub fn allowlist(self) -> impl Iterator<Item = &'static Allowed> {
        let own = match self {
            ThreadKind::Vmm => filters::VMM,
            ThreadKind::Vcpu => filters::VCPU,
        };
        filters::COMMON.iter().chain(own)
    }
}

/// Errors building or installing a filter.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the seccomp allowlist of the {thread} thread lists {syscall} twice")]
    Duplicate { thread: &'static str, syscall: &'static str },
    #[error("cannot build the seccomp filter of the {thread} thread: {source}")]
    Build {
        thread: &'static str,
        #[source]
        source: seccompiler::BackendError,
    },
    #[error("cannot install the seccomp filter of the {thread} thread: {source} (--seccomp off goes without)")]
    Install {
        thread: &'static str,
        #[source]
        source: seccompiler::Error,
    },
}

/// A compiled filter for one kind of thread.
#[derive(Debug, Clone)]
pub struct Filter {
    kind: ThreadKind,
    program: BpfProgram,
}

impl Filter {
    /// Compiles the filter of `kind`; `log` only logs what the list lacks
    /// instead of killing the process.
    pub fn compile(kind: ThreadKind, log: bool) -> Result<Self, Error> {
        let thread = kind.name();
        let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
        for allowed in kind.allowlist() {
            let chain = allowed
                .when
                .iter()
                .map(|alt| {
                    let conditions = alt.iter().map(condition).collect::<Result<Vec<_>, _>>()?;
                    SeccompRule::new(conditions)
                })
                .collect::<Result<Vec<_>, _>>()
                .map_err(|source| Error::Build { thread, source })?;
            if rules.insert(allowed.nr, chain).is_some() {
                return Err(Error::Duplicate { thread, syscall: allowed.name });
            }
        }
        let mismatch = if log { SeccompAction::Log } else { SeccompAction::KillProcess };
        let program = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, TargetArch::x86_64)
            .and_then(BpfProgram::try_from)
            .map_err(|source| Error::Build { thread, source })?;
        Ok(Self { kind, program })
    }

    /// Which kind of thread it is for.
    pub fn kind(&self) -> ThreadKind {
        self.kind
    }

    /// Its length in BPF instructions.
    pub fn len(&self) -> usize {
        self.program.len()
    }

    /// Whether it has no instructions (never the case for a compiled one).
    pub fn is_empty(&self) -> bool {
        self.program.is_empty()
    }

    /// Installs it on the calling thread, for good (it also sets
    /// `PR_SET_NO_NEW_PRIVS`, which seccomp requires).
    pub fn install(&self) -> Result<(), Error> {
        seccompiler::apply_filter(&self.program).map_err(|source| Error::Install { thread: self.kind.name(), source })
    }
}

fn condition(a: &Arg) -> Result<SeccompCondition, seccompiler::BackendError> {
    let len = if a.wide { SeccompCmpArgLen::Qword } else { SeccompCmpArgLen::Dword };
    let full = if a.wide { u64::MAX } else { u64::from(u32::MAX) };
    let op = if a.mask == full { SeccompCmpOp::Eq } else { SeccompCmpOp::MaskedEq(a.mask) };
    SeccompCondition::new(a.index, len, op, a.value)
}

/// The filters of one VM: compiled once, before any thread needs one.
#[derive(Debug, Clone, Default)]
pub struct Filters {
    /// For the VMM thread; `None` when seccomp is off.
    pub vmm: Option<Arc<Filter>>,
    /// For each vCPU thread; `None` when seccomp is off.
    pub vcpu: Option<Arc<Filter>>,
}

impl Filters {
    /// The filters for `mode`.
    pub fn new(mode: SeccompMode) -> Result<Self, Error> {
        let log = match mode {
            SeccompMode::Off => return Ok(Self::default()),
            SeccompMode::On => false,
            SeccompMode::Log => true,
        };
        Ok(Self {
            vmm: Some(Arc::new(Filter::compile(ThreadKind::Vmm, log)?)),
            vcpu: Some(Arc::new(Filter::compile(ThreadKind::Vcpu, log)?)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::filters::*;
    use super::*;
    use std::os::unix::process::ExitStatusExt;
    use std::process::Command;

    #[test]
    fn every_filter_compiles_for_x86_64() {
        for kind in ThreadKind::ALL {
            for log in [false, true] {
                let f = Filter::compile(kind, log).unwrap();
                assert_eq!(f.kind(), kind);
                // BPF programs are limited to 4096 instructions.
                assert!(!f.is_empty() && f.len() < 4096, "{}: {} instructions", kind.name(), f.len());
            }
        }
        assert!(Filters::new(SeccompMode::Off).unwrap().vmm.is_none());
        let on = Filters::new(SeccompMode::On).unwrap();
        assert!(on.vmm.is_some() && on.vcpu.is_some());
    }

    #[test]
    fn every_entry_says_why_and_lists_are_disjoint() {
        for kind in ThreadKind::ALL {
            let mut seen = std::collections::HashSet::new();
            for a in kind.allowlist() {
                assert!(!a.why.is_empty(), "{}", a.name);
                assert!(seen.insert(a.nr), "{} twice in the {} list", a.name, kind.name());
                assert!(a.when.iter().all(|alt| !alt.is_empty()), "{}: an empty alternative", a.name);
            }
        }
    }

    #[test]
    fn dangerous_calls_are_on_no_list() {
        let never = [
            libc::SYS_execve,
            libc::SYS_execveat,
            libc::SYS_fork,
            libc::SYS_vfork,
            libc::SYS_clone,
            libc::SYS_clone3,
            libc::SYS_ptrace,
            libc::SYS_process_vm_writev,
            libc::SYS_mount,
            libc::SYS_kexec_load,
            libc::SYS_bpf,
            libc::SYS_seccomp,
            libc::SYS_prctl,
            libc::SYS_setuid,
            libc::SYS_chmod,
        ];
        for kind in ThreadKind::ALL {
            for a in kind.allowlist() {
                assert!(!never.contains(&a.nr), "{} on the {} list", a.name, kind.name());
            }
        }
        // The vCPU threads open nothing and talk to no one.
        let vcpu: Vec<i64> = ThreadKind::Vcpu.allowlist().map(|a| a.nr).collect();
        for nr in [libc::SYS_openat, libc::SYS_socket, libc::SYS_connect, libc::SYS_read, libc::SYS_sendto] {
            assert!(!vcpu.contains(&nr), "{nr} on the vCPU list");
        }
    }

    #[test]
    fn ioctl_numbers_match_the_kernel_headers() {
        // Values as strace prints them with `-X raw`, and as in the kernel's
        // uapi headers for x86_64.
        assert_eq!(KVM_RUN, 0xae80);
        assert_eq!(KVM_GET_REGS, 0x8090_ae81);
        assert_eq!(KVM_SET_REGS, 0x4090_ae82);
        assert_eq!(KVM_GET_SREGS, 0x8138_ae83);
        assert_eq!(KVM_SET_SREGS, 0x4138_ae84);
        assert_eq!(KVM_TRANSLATE, 0xc018_ae85);
        assert_eq!(KVM_GET_MSRS, 0xc008_ae88);
        assert_eq!(KVM_SET_MSRS, 0x4008_ae89);
        assert_eq!(KVM_GET_LAPIC, 0x8400_ae8e);
        assert_eq!(KVM_GET_CPUID2, 0xc008_ae91);
        assert_eq!(KVM_GET_MP_STATE, 0x8004_ae98);
        assert_eq!(KVM_GET_VCPU_EVENTS, 0x8040_ae9f);
        assert_eq!(KVM_SET_VCPU_EVENTS, 0x4040_aea0);
        assert_eq!(KVM_GET_DEBUGREGS, 0x8080_aea1);
        assert_eq!(KVM_GET_XSAVE, 0x9000_aea4);
        assert_eq!(KVM_GET_XCRS, 0x8188_aea6);
        assert_eq!(KVM_GET_IRQCHIP, 0xc208_ae62);
        assert_eq!(KVM_GET_CLOCK, 0x8030_ae7c);
        assert_eq!(KVM_GET_PIT2, 0x8070_ae9f);
        assert_eq!(TUNSETOFFLOAD, 0x4004_54d0);
        assert_eq!(FIONBIO, libc::FIONBIO);
    }

    #[test]
    fn the_kick_signal_is_glibc_sigrtmin() {
        assert_eq!(KICK_SIGNAL, libc::SIGRTMIN() as u64);
    }

    /// Set in a child test process: which probe [`child_probe`] runs.
    const PROBE_ENV: &str = "VMRUN_SECCOMP_PROBE";

    /// Runs this test binary again with only [`child_probe`], doing `probe`
    /// under a filter; returns how the child ended.
    fn probe(probe: &str) -> std::process::Output {
        let exe = std::env::current_exe().unwrap();
        Command::new(exe)
            .args(["seccomp::tests::child_probe", "--exact", "--nocapture", "--test-threads=1"])
            .env(PROBE_ENV, probe)
            .output()
            .unwrap()
    }

    fn assert_killed_by_sigsys(probe_name: &str) {
        let out = probe(probe_name);
        assert_eq!(
            out.status.signal(),
            Some(libc::SIGSYS),
            "{probe_name}: {:?}\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn assert_survives(probe_name: &str) {
        let out = probe(probe_name);
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{probe_name}: {:?}\n{stdout}{stderr}", out.status);
        assert!(stdout.contains(&format!("probe {probe_name} done")), "{stdout}");
    }

    #[test]
    fn a_forbidden_call_on_a_vcpu_thread_kills_the_process() {
        assert_killed_by_sigsys("vcpu-socket");
        assert_killed_by_sigsys("vcpu-execve");
    }

    #[test]
    fn argument_conditions_are_enforced() {
        // Allowed call, wrong arguments.
        assert_killed_by_sigsys("vcpu-mmap-exec");
        assert_killed_by_sigsys("vcpu-ioctl-other");
        assert_killed_by_sigsys("vmm-socket-inet");
        assert_killed_by_sigsys("vmm-open-rw");
    }

    #[test]
    fn allowed_calls_still_work_under_the_filter() {
        assert_survives("vcpu-allowed");
        assert_survives("vmm-allowed");
    }

    #[test]
    fn log_mode_lets_a_forbidden_call_through() {
        assert_survives("vcpu-log");
    }

    extern "C" fn kicked(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

    /// The child side of the probes above; does nothing in a normal test
    /// run. Each probe runs on a thread of its own, as the VMM's threads
    /// do, so that the test harness's own thread stays unfiltered. While
    /// the probe waits at its end, this thread kicks it with `SIGRTMIN`,
    /// as the VMM kicks a vCPU out of `KVM_RUN`.
    #[test]
    fn child_probe() {
        use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};
        let Ok(which) = std::env::var(PROBE_ENV) else { return };
        // No core file for the expected deaths.
        let no_core = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        // SAFETY: setrlimit reads the struct it is given.
        unsafe { libc::setrlimit(libc::RLIMIT_CORE, &no_core) };
        register_signal_handler(SIGRTMIN(), kicked).unwrap();
        let (done, wait) = std::sync::mpsc::channel::<()>();
        let name = which.clone();
        let t = std::thread::spawn(move || {
            run_probe(&name);
            // Waiting (futex) when the kick comes: the handler returns
            // (rt_sigreturn) and the wait goes on.
            let _ = wait.recv();
        });
        std::thread::sleep(std::time::Duration::from_millis(50));
        t.kill(SIGRTMIN()).unwrap();
        done.send(()).unwrap();
        t.join().unwrap();
        println!("probe {which} done");
    }

    fn install(kind: ThreadKind, log: bool) {
        Filter::compile(kind, log).unwrap().install().unwrap();
    }

    fn run_probe(which: &str) {
        // Made before the filter, as the VMM makes its descriptors in setup.
        let evt = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let dir = std::env::temp_dir().join(format!("vmrun-seccomp-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        match which {
            "vcpu-socket" => {
                install(ThreadKind::Vcpu, false);
                // SAFETY: socket takes no pointers.
                unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) };
            }
            "vcpu-execve" => {
                install(ThreadKind::Vcpu, false);
                let path = c"/bin/true";
                let argv = [path.as_ptr(), std::ptr::null()];
                // SAFETY: a NUL-terminated path and a NULL-terminated argv.
                unsafe { libc::execv(path.as_ptr(), argv.as_ptr()) };
            }
            "vcpu-mmap-exec" => {
                install(ThreadKind::Vcpu, false);
                // SAFETY: an anonymous mapping at an address of the kernel's choice.
                unsafe {
                    libc::mmap(
                        std::ptr::null_mut(),
                        4096,
                        libc::PROT_READ | libc::PROT_EXEC,
                        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                        -1,
                        0,
                    )
                };
            }
            "vcpu-ioctl-other" => {
                install(ThreadKind::Vcpu, false);
                let mut n: libc::c_int = 0;
                // SAFETY: FIONREAD writes an int to the pointer given.
                unsafe { libc::ioctl(std::os::fd::AsRawFd::as_raw_fd(&evt), libc::FIONREAD, &mut n) };
            }
            "vmm-socket-inet" => {
                install(ThreadKind::Vmm, false);
                // SAFETY: socket takes no pointers.
                unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0) };
            }
            "vmm-open-rw" => {
                install(ThreadKind::Vmm, false);
                let _ = std::fs::OpenOptions::new().read(true).write(true).open("/dev/null");
            }
            "vcpu-allowed" => {
                let stats = std::fs::File::open("/proc/self/stat").unwrap();
                install(ThreadKind::Vcpu, false);
                // Eventfd writes, the allocator (large blocks are mmapped),
                // locks, positioned reads (KVM statistics), CPU time, the
                // console.
                evt.write(1).unwrap();
                let big = vec![7u8; 8 << 20];
                assert_eq!(big[big.len() - 1], 7);
                let m = Arc::new(std::sync::Mutex::new(0));
                *m.lock().unwrap() += 1;
                let mut buf = [0u8; 64];
                assert!(std::os::unix::fs::FileExt::read_at(&stats, &mut buf, 0).unwrap() > 0);
                assert!(crate::report::process_cpu_time() > std::time::Duration::ZERO);
                let mut so = std::io::stdout().lock();
                std::io::Write::write_all(&mut so, b"vcpu filter on\n").unwrap();
            }
            "vmm-allowed" => vmm_allowed(&dir, &evt),
            "vcpu-log" => {
                install(ThreadKind::Vcpu, true);
                // SAFETY: socket takes no pointers.
                let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) };
                assert!(fd >= 0, "log mode must let the call through");
            }
            other => panic!("unknown probe {other}"),
        }
    }

    /// What the event loop does, with the calls the devices themselves use.
    fn vmm_allowed(dir: &std::path::Path, evt: &vmm_sys_util::eventfd::EventFd) {
        use std::io::{Read, Write};
        use std::os::unix::fs::FileExt;
        use vmm_sys_util::signal::{Killable, SIGRTMIN};
        use vmrun_devices::virtio::vsock::socket;

        // Setup: a listening socket, a disk, a timer, a thread to kick.
        let sock = dir.join("v.sock");
        let _ = std::fs::remove_file(&sock);
        let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let disk = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(dir.join("disk"));
        let disk = disk.unwrap();
        let mut timer = vmm_sys_util::timerfd::TimerFd::new().unwrap();
        let (go, wait) = std::sync::mpsc::channel::<()>();
        let vcpu = std::thread::spawn(move || {
            let _ = wait.recv();
        });

        install(ThreadKind::Vmm, false);
        // Hybrid vsock: a guest connects to a host port, the host answers.
        let client = socket::connect_nonblocking(sock.as_os_str()).unwrap();
        let (mut server, _) = listener.accept().unwrap();
        server.set_nonblocking(true).unwrap();
        assert_eq!(socket::send(&client, b"CONNECT 1\n").unwrap(), 10);
        let mut buf = [0u8; 32];
        assert_eq!(socket::peek(&server, &mut buf).unwrap(), 10);
        assert_eq!(server.read(&mut buf).unwrap(), 10);
        server.set_read_timeout(Some(std::time::Duration::from_secs(1))).unwrap();
        server.write_all(b"OK\n").unwrap();
        client.shutdown(std::net::Shutdown::Write).unwrap();
        drop((client, server));
        // A Unix socket made by hand, as connect_nonblocking does.
        // SAFETY: socket takes no pointers.
        let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0) };
        assert!(fd >= 0);
        // SAFETY: closes the descriptor just made.
        unsafe { libc::close(fd) };
        // virtio-blk: positioned writes, reads, flush.
        disk.write_all_at(b"sector", 512).unwrap();
        let mut sector = [0u8; 6];
        disk.read_exact_at(&mut sector, 512).unwrap();
        assert_eq!(&sector, b"sector");
        disk.sync_data().unwrap();
        // virtio-rng.
        let mut entropy = [0u8; 16];
        // SAFETY: getrandom writes at most the length given.
        assert_eq!(unsafe { libc::getrandom(entropy.as_mut_ptr().cast(), entropy.len(), 0) }, 16);
        // A rate limiter's timer.
        timer.reset(std::time::Duration::from_millis(1), None).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(5));
        assert_eq!(timer.wait().unwrap(), 1);
        // Interrupts, a snapshot's files, the boot report.
        evt.write(1).unwrap();
        let snap = dir.join("snap");
        std::fs::create_dir_all(&snap).unwrap();
        let mem = std::fs::File::create(snap.join("memory.tmp")).unwrap();
        mem.set_len(1 << 20).unwrap();
        mem.write_all_at(b"page", 4096).unwrap();
        mem.sync_all().unwrap();
        std::fs::rename(snap.join("memory.tmp"), snap.join("memory")).unwrap();
        assert_eq!(std::fs::read(snap.join("memory")).unwrap().len(), 1 << 20);
        assert!(crate::report::resident_kib(&[]).is_some());
        std::fs::remove_file(snap.join("memory")).unwrap();
        std::fs::remove_file(&sock).unwrap();
        // Kicking a vCPU thread, then waiting for it.
        vcpu.kill(SIGRTMIN()).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(2));
        go.send(()).unwrap();
        vcpu.join().unwrap();
    }
}
