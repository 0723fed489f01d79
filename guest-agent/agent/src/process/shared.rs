//! A held first process that shares the agent's memory until it execs.
//!
//! A held child waits at its gate, possibly for the whole life of a
//! template, and the run that releases it execs the program. A child
//! cloned like `fork` holds a copy of the agent's address space, and that
//! copy is torn down at the exec: page by page, on every warm run. This
//! child is cloned with `CLONE_VM | CLONE_VFORK` instead, as
//! `posix_spawn` does: it runs in the agent's own address space, on a
//! stack of its own, and its exec only drops a reference to it.
//!
//! `CLONE_VFORK` suspends the cloning thread until the child execs or
//! exits, so the clone is made by a thread of its own, which waits there
//! and then frees what the child used (the plan; its stack is kept for
//! the next held child). It ends only once the child's process has ended
//! (it waits on a copy of the pidfd): a thread's end (its exit, the
//! exit record the agent's taskstats listener reads, glibc's teardown of
//! the thread) right after the release was work on the path of every
//! warm run: about 10k of the 390k guest instructions that a warm
//! `vmrun run --rm busybox true` emulates where the guest's kernel mode
//! is emulated. The child
//! shares that thread's thread-local storage (glibc's `errno`), which is
//! safe only because that thread is suspended meanwhile; it makes only
//! raw system calls on memory nothing else writes, as every child does
//! (see the parent module). The waiting thread may have entered a pod's
//! IPC and UTS namespaces for the clone: it never returns to the agent's,
//! it ends (keeping them meanwhile, as the child does).
//!
//! Only a child with a PID namespace of its own takes this path: nothing
//! but the agent can see it then. A pod member that shares its sandbox's
//! PID namespace would be visible (and, with `CAP_SYS_PTRACE`, writable
//! through `/proc/PID/mem`) to the sandbox's processes while it waits,
//! and its memory is the agent's; it is cloned like `fork`.
//!
//! Being a vfork child, it keeps an `oom_score_adj` of its own (the
//! kernel applies a change to every process sharing an address space
//! otherwise). The agent is the guest's init, which the OOM killer never
//! picks; pages the child touches before its exec count against the
//! agent's memory cgroup, not the container's.

use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{mpsc, Arc, Mutex};

use super::{
    child, enter_for_clone, finish_user_ns, user_ns_sync, Enter, Gate, Plan, Pointers, Started,
    Tail, CLONE_INTO_CGROUP,
};
use crate::sys;

/// The child's stack, its lowest page a guard: an overflow faults instead
/// of writing over the agent's memory.
const STACK_BYTES: usize = 256 << 10;

/// Whether `plan`'s child takes this path: held, in a PID namespace of
/// its own, on x86-64 (where the clone's entry is written).
pub(super) fn applies(plan: &Plan) -> bool {
    cfg!(target_arch = "x86_64")
        && plan.gate.is_some()
        && matches!(&plan.enter, Enter::New { join, .. } if join.is_none_or(|j| j.pid.is_none()))
}

/// Clones `plan`'s held child sharing this address space; returns once
/// the child runs (its pid and pidfd written).
pub(super) fn spawn(plan: Plan) -> io::Result<Started> {
    let (err_r, err_w) = sys::pipe(0)?;
    // The child writes one byte here first: the pid and pidfd are then
    // stored. The end of the pipe without it: the clone failed.
    let (started_r, started_w) = sys::pipe(0)?;
    let user_ns_sync = user_ns_sync(&plan)?;
    let stack = Stack::take(STACK_BYTES)?;
    let plan = Arc::new(plan);
    // The kernel stores the pid (CLONE_PARENT_SETTID) and the pidfd
    // (CLONE_PIDFD) before the child first runs.
    let ids = Arc::new([AtomicI32::new(-1), AtomicI32::new(-1)]);
    let fds = ChildFds {
        errors: err_w.as_raw_fd(),
        started: started_w.as_raw_fd(),
        user_ns_sync: user_ns_sync.as_ref().map(|(r, _)| r.as_raw_fd()),
    };
    let (p, i) = (Arc::clone(&plan), Arc::clone(&ids));
    // The child's pidfd, for the waiting thread to wait on once the child
    // has exec'd (a copy: the agent closes its own when it likes).
    let (pidfd_tx, pidfd_rx) = mpsc::sync_channel::<OwnedFd>(1);
    let waiter = std::thread::Builder::new()
        .name("held-clone".into())
        .stack_size(64 << 10)
        .spawn(move || {
            let done = clone_and_wait(&p, &i, &stack, fds);
            stack.put_back();
            // What the child used goes now: the plan holds the agent's
            // ends of its pipes, whose end the agent waits for.
            drop((p, i, started_w));
            if done.is_ok() {
                if let Ok(pidfd) = pidfd_rx.recv() {
                    // An error (none is expected) ends the thread early.
                    let _ = sys::wait_ended(pidfd.as_fd(), None);
                }
            }
            done
        })?;
    let mut byte = [0u8; 1];
    let n = loop {
        match sys::read(started_r.as_fd(), &mut byte) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            r => break r,
        }
    };
    if !matches!(n, Ok(1)) {
        drop(pidfd_tx);
        return Err(match waiter.join() {
            Ok(Err(e)) => e,
            Ok(Ok(())) | Err(_) => io::Error::other("the held child did not start"),
        });
    }
    let pid = ids[0].load(Ordering::Acquire);
    // SAFETY: CLONE_PIDFD stored a new descriptor, which we now own.
    let pidfd = unsafe { OwnedFd::from_raw_fd(ids[1].load(Ordering::Acquire)) };
    // Without a copy (no descriptor left) the thread ends at once.
    if let Ok(copy) = pidfd.try_clone() {
        let _ = pidfd_tx.send(copy);
    }
    drop(pidfd_tx);
    drop(err_w);
    finish_user_ns(pid, &plan, user_ns_sync.as_ref().map(|(_, go)| go.as_fd()))?;
    Ok(Started {
        pid,
        pidfd,
        errors: err_r,
    })
}

/// The descriptors the child uses by number (its copies of the agent's).
#[derive(Clone, Copy)]
struct ChildFds {
    errors: RawFd,
    started: RawFd,
    user_ns_sync: Option<RawFd>,
}

/// What the child's entry finds behind its argument.
struct Entry<'a> {
    plan: &'a Plan,
    tail: &'a Tail<'a>,
    gate: &'a mut Gate,
    fds: ChildFds,
}

/// On the waiting thread: clones the child, then waits (in `clone3`, for
/// `CLONE_VFORK`) until it has exec'd or exited.
fn clone_and_wait(
    plan: &Plan,
    ids: &[AtomicI32; 2],
    stack: &Stack,
    fds: ChildFds,
) -> io::Result<()> {
    let gate = plan
        .gate
        .ok_or_else(|| io::Error::other("a shared clone is for a held child"))?;
    // This thread stays in the namespaces it enters: it ends after the
    // child's exec.
    let flags = enter_for_clone(plan, fds.user_ns_sync.is_some())?;
    let pointers = Pointers::new(plan);
    let tail = pointers.tail(plan);
    let mut gate = Gate::new(gate);
    let mut entry = Entry {
        plan,
        tail: &tail,
        gate: &mut gate,
        fds,
    };
    // SAFETY: clone_args is plain integers; all-zero is valid.
    let mut args: libc::clone_args = unsafe { std::mem::zeroed() };
    let shared = libc::CLONE_VM | libc::CLONE_VFORK | libc::CLONE_PIDFD | libc::CLONE_PARENT_SETTID;
    args.flags = (flags | shared) as u64 | plan.cgroup.map_or(0, |_| CLONE_INTO_CGROUP);
    args.pidfd = ids[1].as_ptr() as u64;
    args.parent_tid = ids[0].as_ptr() as u64;
    args.exit_signal = libc::SIGCHLD as u64;
    args.cgroup = plan.cgroup.map_or(0, |fd| fd as u64);
    args.stack = stack.low as u64;
    args.stack_size = stack.len as u64;
    // SAFETY: the child runs `entry_point(&mut entry)` on `stack`, both of
    // which live until this call returns (after its exec or exit); it
    // makes only raw system calls and never returns.
    let r = unsafe {
        clone3_calling(
            &mut args,
            entry_point,
            (&mut entry as *mut Entry<'_>).cast(),
        )
    };
    if r < 0 {
        return Err(io::Error::from_raw_os_error((-r) as i32));
    }
    Ok(())
}

/// The child's first code, on its own stack.
extern "C" fn entry_point(arg: *mut libc::c_void) -> ! {
    // SAFETY: `arg` is the `Entry` on the suspended waiting thread's
    // stack, alive until this child execs or exits; nothing else uses it
    // meanwhile.
    let e = unsafe { &mut *arg.cast::<Entry<'_>>() };
    // SAFETY: a one-byte write from a stack buffer to a descriptor of
    // this child's.
    unsafe { libc::write(e.fds.started, [1u8].as_ptr().cast(), 1) };
    child(
        e.plan,
        e.fds.errors,
        e.tail,
        Some(&mut *e.gate),
        e.fds.user_ns_sync,
    )
}

/// `clone3` whose child calls `entry(arg)` on the stack `args` names: the
/// child cannot return through the caller's frames, which are not on its
/// stack (glibc's `clone` does the same for `clone`).
///
/// # Safety
/// `args` must name a stack; `entry` must never return and `arg` must be
/// valid for it.
#[cfg(target_arch = "x86_64")]
unsafe fn clone3_calling(
    args: &mut libc::clone_args,
    entry: extern "C" fn(*mut libc::c_void) -> !,
    arg: *mut libc::c_void,
) -> libc::c_long {
    let ret: libc::c_long;
    // SAFETY: the caller's contract. The system call keeps every register
    // but rax, rcx and r11; in the child (rax 0) r12 and r13 still hold
    // `arg` and `entry`, and rsp is the top of the new stack (16-byte
    // aligned: the call leaves it as the ABI expects at entry).
    unsafe {
        std::arch::asm!(
            "syscall",
            "test rax, rax",
            "jnz 2f",
            "xor ebp, ebp",
            "mov rdi, r12",
            "call r13",
            "ud2",
            "2:",
            inlateout("rax") libc::SYS_clone3 => ret,
            in("rdi") args as *mut libc::clone_args,
            in("rsi") std::mem::size_of::<libc::clone_args>(),
            in("r12") arg,
            in("r13") entry,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    ret
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn clone3_calling(
    _: &mut libc::clone_args,
    _: extern "C" fn(*mut libc::c_void) -> !,
    _: *mut libc::c_void,
) -> libc::c_long {
    -(libc::ENOSYS as libc::c_long)
}

/// The child's stack: an anonymous mapping whose lowest page is
/// inaccessible.
struct Stack {
    /// The lowest usable address (above the guard page).
    low: usize,
    /// Usable bytes.
    len: usize,
}

/// A stack whose child has exec'd or exited, kept for the next held
/// child: unmapping it (two mappings, the pages the child touched) was
/// work on the path of every release. The next child shares the agent's
/// memory anyway; what the last one left on it is the agent's.
static SPARE: Mutex<Option<Stack>> = Mutex::new(None);

impl Stack {
    /// The spare stack if there is one of `bytes`, else a new one.
    fn take(bytes: usize) -> io::Result<Self> {
        let spare = SPARE.lock().unwrap_or_else(|p| p.into_inner()).take();
        match spare {
            Some(s) if s.len == bytes => Ok(s),
            _ => Self::new(bytes),
        }
    }

    /// Keeps this stack (its child has exec'd or exited) as the spare, or
    /// unmaps it if there is one already.
    fn put_back(self) {
        let mut spare = SPARE.lock().unwrap_or_else(|p| p.into_inner());
        if spare.is_none() {
            *spare = Some(self);
        }
    }

    fn new(bytes: usize) -> io::Result<Self> {
        let page = 4096;
        // SAFETY: a new private anonymous mapping; nothing else refers to it.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes + page,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(sys::errno());
        }
        let stack = Stack {
            low: base as usize + page,
            len: bytes,
        };
        // SAFETY: the mapping's first page, made inaccessible.
        sys::cvt(unsafe { libc::mprotect(base, page, libc::PROT_NONE) })?;
        Ok(stack)
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unused once the child has
        // exec'd or exited.
        unsafe { libc::munmap((self.low - 4096) as *mut libc::c_void, self.len + 4096) };
    }
}
