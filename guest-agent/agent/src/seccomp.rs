//! Seccomp: a container's profile (the OCI spec's `linux.seccomp`, as a
//! [`SeccompProfile`]) compiled to one BPF program before `clone`, which
//! the child installs with a raw `seccomp(2)` call ([`Filter::install`];
//! `process` says at which step).
//!
//! The program is built with `seccompiler`'s filter builder. One of its
//! filters has a single action for every call it matches, while a profile
//! has one per entry: the entries are grouped by action (in the order each
//! action first appears), each group is compiled as a filter whose
//! mismatch action is a sentinel, and the groups are chained: a sentinel
//! return becomes a jump to the next group, and the last one is followed
//! by the default action. A call thus gets the action of the first group
//! with a matching entry. Entries for one call with arguments are
//! alternatives (ORed, as libseccomp does), an entry without arguments
//! matches the call whatever they are, and entries whose action is the
//! default one are left out (as runc does).
//!
//! Names are resolved to x86_64 numbers with [`number`]; a name it does not
//! know is skipped, as runc does for a name libseccomp does not know (the
//! caller logs it). Before the groups, a call of another architecture or
//! of the x32 ABI fails with `ENOSYS`: the numbers in the filter are
//! x86_64's, so these calls must not reach it.

mod table;

use std::collections::BTreeMap;

use seccompiler::{sock_filter, BackendError, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule, TargetArch};
use vmrun_agent_protocol::{SeccompAction, SeccompFlag, SeccompOp, SeccompProfile, SeccompSyscalls};

/// The most instructions the kernel takes in one filter (`BPF_MAXINSNS`).
pub const MAX_INSTRUCTIONS: usize = 4096;
/// `AUDIT_ARCH_X86_64` (`EM_X86_64 | __AUDIT_ARCH_64BIT | __AUDIT_ARCH_LE`).
const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
/// `__X32_SYSCALL_BIT`: set in the numbers of x32 calls.
const X32_SYSCALL_BIT: u32 = 0x4000_0000;
/// Offsets in `struct seccomp_data`.
const DATA_NR: u32 = 0;
const DATA_ARCH: u32 = 4;
/// The largest `errnoRet` (the 16 bits of `SECCOMP_RET_DATA`).
const MAX_RET_DATA: u32 = 0xffff;

/// A profile that cannot be compiled.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// An argument index past the sixth.
    #[error("seccomp: argument index {index} in syscalls[{entry}] ({names}): a system call has arguments 0 to 5")]
    ArgIndex {
        /// The entry.
        entry: usize,
        /// Its names.
        names: String,
        /// The index.
        index: u32,
    },
    /// An `errnoRet` that does not fit the filter's return value.
    #[error("seccomp: errnoRet {0} is too large (at most 65535)")]
    ErrnoRet(u32),
    /// More instructions than the kernel takes.
    #[error("seccomp: the profile compiles to {0} BPF instructions, more than the kernel's {MAX_INSTRUCTIONS}")]
    TooLarge(usize),
    /// The filter builder refused a group.
    #[error("seccomp: {0}")]
    Build(#[source] BackendError),
}

/// A compiled profile, ready to install.
#[derive(Debug, Clone)]
pub struct Filter {
    program: Vec<sock_filter>,
    flags: libc::c_ulong,
    unknown: Vec<String>,
}

/// The x86_64 number of a system call.
pub fn number(name: &str) -> Option<i64> {
    table::SYSCALLS.binary_search_by(|(n, _)| n.cmp(&name)).ok().map(|i| table::SYSCALLS[i].1)
}

/// The names [`number`] knows, in order.
pub fn known() -> impl Iterator<Item = &'static str> {
    table::SYSCALLS.iter().map(|(n, _)| *n)
}

fn action(a: SeccompAction, errno_ret: Option<u32>) -> Result<seccompiler::SeccompAction, SeccompError> {
    let data = match errno_ret {
        Some(v) if v > MAX_RET_DATA => return Err(SeccompError::ErrnoRet(v)),
        Some(v) => v,
        None => libc::EPERM as u32,
    };
    Ok(match a {
        SeccompAction::Allow => seccompiler::SeccompAction::Allow,
        SeccompAction::Errno => seccompiler::SeccompAction::Errno(data),
        SeccompAction::KillThread => seccompiler::SeccompAction::KillThread,
        SeccompAction::KillProcess => seccompiler::SeccompAction::KillProcess,
        SeccompAction::Trap => seccompiler::SeccompAction::Trap,
        SeccompAction::Log => seccompiler::SeccompAction::Log,
        SeccompAction::Trace => seccompiler::SeccompAction::Trace(data),
    })
}

/// The conditions of entry `n`, or `None` when they can never all hold (a
/// masked value with bits outside its mask).
fn conditions(n: usize, entry: &SeccompSyscalls) -> Result<Option<Vec<SeccompCondition>>, SeccompError> {
    let mut out = Vec::with_capacity(entry.args.len());
    for a in &entry.args {
        let bad_index = || SeccompError::ArgIndex { entry: n, names: entry.names.join(", "), index: a.index };
        let index = u8::try_from(a.index).ok().filter(|i| *i <= 5).ok_or_else(bad_index)?;
        let (op, value) = match a.op {
            SeccompOp::Eq => (SeccompCmpOp::Eq, a.value),
            SeccompOp::Ne => (SeccompCmpOp::Ne, a.value),
            SeccompOp::Lt => (SeccompCmpOp::Lt, a.value),
            SeccompOp::Le => (SeccompCmpOp::Le, a.value),
            SeccompOp::Gt => (SeccompCmpOp::Gt, a.value),
            SeccompOp::Ge => (SeccompCmpOp::Ge, a.value),
            SeccompOp::MaskedEq if a.value_two & !a.value != 0 => return Ok(None),
            SeccompOp::MaskedEq => (SeccompCmpOp::MaskedEq(a.value), a.value_two),
        };
        out.push(SeccompCondition::new(index, SeccompCmpArgLen::Qword, op, value).map_err(SeccompError::Build)?);
    }
    Ok(Some(out))
}

/// The rules of one action, by call number: `None` matches the call
/// whatever its arguments.
type Group = BTreeMap<i64, Option<Vec<SeccompRule>>>;

fn stmt(code: u32, k: u32) -> sock_filter {
    sock_filter { code: code as u16, jt: 0, jf: 0, k }
}

fn jump(code: u32, k: u32, jt: u8, jf: u8) -> sock_filter {
    sock_filter { code: code as u16, jt, jf, k }
}

/// Compiles `profile` (see the module's documentation).
pub fn compile(profile: &SeccompProfile) -> Result<Filter, SeccompError> {
    let default = action(profile.default_action, profile.default_errno_ret)?;
    let mut groups: Vec<(seccompiler::SeccompAction, Group)> = Vec::new();
    let mut unknown: Vec<String> = Vec::new();
    for (n, entry) in profile.syscalls.iter().enumerate() {
        let act = action(entry.action, entry.errno_ret)?;
        // Checked even when the entry is left out.
        let conds = conditions(n, entry)?;
        let Some(conds) = conds.filter(|_| act != default) else { continue };
        let i = match groups.iter().position(|(a, _)| *a == act) {
            Some(i) => i,
            None => {
                groups.push((act, Group::new()));
                groups.len() - 1
            }
        };
        for name in &entry.names {
            let Some(nr) = number(name) else {
                if !unknown.contains(name) {
                    unknown.push(name.clone());
                }
                continue;
            };
            let rules = groups[i].1.entry(nr).or_insert_with(|| Some(Vec::new()));
            match (rules, conds.is_empty()) {
                (rules, true) => *rules = None,
                (Some(list), false) => list.push(SeccompRule::new(conds.clone()).map_err(SeccompError::Build)?),
                (None, false) => {}
            }
        }
    }

    let ret_k = libc::BPF_RET | libc::BPF_K;
    let load = libc::BPF_LD | libc::BPF_W | libc::BPF_ABS;
    let enosys = libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32;
    let mut program = vec![
        stmt(load, DATA_ARCH),
        jump(libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K, AUDIT_ARCH_X86_64, 1, 0),
        stmt(ret_k, enosys),
        stmt(load, DATA_NR),
        jump(libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K, X32_SYSCALL_BIT, 0, 1),
        stmt(ret_k, enosys),
    ];
    for (act, group) in groups {
        if group.is_empty() {
            continue;
        }
        // A mismatch return that is not the group's own action.
        let sentinel = seccompiler::SeccompAction::Trace(if act == seccompiler::SeccompAction::Trace(0xffff) { 0xfffe } else { 0xffff });
        let sentinel_k = u32::from(sentinel.clone());
        let rules = group.into_iter().map(|(nr, rules)| (nr, rules.unwrap_or_default())).collect();
        let filter = SeccompFilter::new(rules, sentinel, act, TargetArch::x86_64).map_err(SeccompError::Build)?;
        let mut part: Vec<sock_filter> = filter.try_into().map_err(|e| match e {
            BackendError::FilterTooLarge(n) => SeccompError::TooLarge(n),
            e => SeccompError::Build(e),
        })?;
        let len = part.len();
        for (i, insn) in part.iter_mut().enumerate() {
            if u32::from(insn.code) == ret_k && insn.k == sentinel_k {
                // On to the next group.
                *insn = stmt(libc::BPF_JMP | libc::BPF_JA, (len - i - 1) as u32);
            }
        }
        program.extend(part);
        if program.len() > MAX_INSTRUCTIONS {
            return Err(SeccompError::TooLarge(program.len()));
        }
    }
    program.push(stmt(ret_k, u32::from(default)));
    if program.len() > MAX_INSTRUCTIONS {
        return Err(SeccompError::TooLarge(program.len()));
    }
    let flags = profile.flags.iter().fold(0, |f, flag| {
        f | match flag {
            SeccompFlag::Log => libc::SECCOMP_FILTER_FLAG_LOG,
            SeccompFlag::SpecAllow => libc::SECCOMP_FILTER_FLAG_SPEC_ALLOW,
        }
    });
    Ok(Filter { program, flags, unknown })
}

impl Filter {
    /// The names the profile gave that are not known system calls (left out).
    pub fn unknown(&self) -> &[String] {
        &self.unknown
    }

    /// The BPF instructions.
    pub fn program(&self) -> &[sock_filter] {
        &self.program
    }

    /// Installs the filter on the calling thread: `seccomp(2)`'s result.
    /// Only a raw system call on data prepared before (safe between
    /// `clone` and `execve`). Without `no_new_privs` it needs
    /// `CAP_SYS_ADMIN`.
    pub fn install(&self) -> libc::c_long {
        let prog = libc::sock_fprog {
            // At most MAX_INSTRUCTIONS (checked when compiled).
            len: self.program.len() as libc::c_ushort,
            filter: self.program.as_ptr().cast_mut().cast(),
        };
        // SAFETY: seccompiler's `sock_filter` has the kernel's layout
        // (`repr(C)`: u16, u8, u8, u32), as libc's does; the kernel copies
        // the program from `prog`, which lives across the call.
        unsafe { libc::syscall(libc::SYS_seccomp, libc::SECCOMP_SET_MODE_FILTER, self.flags, &prog as *const libc::sock_fprog) }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use vmrun_agent_protocol::SeccompArg;

    /// Runs a classic BPF seccomp program on a call: its return value.
    fn run(prog: &[sock_filter], arch: u32, nr: u32, args: [u64; 6]) -> u32 {
        let mut data = vec![nr, arch, 0, 0];
        for a in args {
            data.extend([a as u32, (a >> 32) as u32]);
        }
        let (mut acc, mut pc) = (0u32, 0usize);
        loop {
            let i = &prog[pc];
            let code = u32::from(i.code);
            pc += 1;
            match code {
                c if c == libc::BPF_LD | libc::BPF_W | libc::BPF_ABS => acc = data[i.k as usize / 4],
                c if c == libc::BPF_ALU | libc::BPF_AND | libc::BPF_K => acc &= i.k,
                c if c == libc::BPF_JMP | libc::BPF_JA => pc += i.k as usize,
                c if c & 0x07 == libc::BPF_JMP => {
                    let taken = match c & 0xf0 {
                        x if x == libc::BPF_JEQ => acc == i.k,
                        x if x == libc::BPF_JGT => acc > i.k,
                        x if x == libc::BPF_JGE => acc >= i.k,
                        x if x == libc::BPF_JSET => acc & i.k != 0,
                        x => panic!("jump {x:#x}"),
                    };
                    pc += usize::from(if taken { i.jt } else { i.jf });
                }
                c if c == libc::BPF_RET | libc::BPF_K => return i.k,
                c => panic!("instruction {c:#x}"),
            }
        }
    }

    fn nr(name: &str) -> u32 {
        number(name).unwrap() as u32
    }

    fn entry(names: &[&str], action: SeccompAction, errno_ret: Option<u32>, args: Vec<SeccompArg>) -> SeccompSyscalls {
        SeccompSyscalls { names: names.iter().map(|s| s.to_string()).collect(), action, errno_ret, args }
    }

    fn arg(index: u32, op: SeccompOp, value: u64, value_two: u64) -> SeccompArg {
        SeccompArg { index, value, value_two, op }
    }

    fn profile(default_action: SeccompAction, default_errno_ret: Option<u32>, syscalls: Vec<SeccompSyscalls>) -> SeccompProfile {
        SeccompProfile { default_action, default_errno_ret, architectures: vec![], flags: vec![], syscalls }
    }

    const ALLOW: u32 = libc::SECCOMP_RET_ALLOW;
    const fn errno(e: i32) -> u32 {
        libc::SECCOMP_RET_ERRNO | e as u32
    }

    #[test]
    fn the_table_is_sorted_and_resolves_names() {
        assert!(table::SYSCALLS.windows(2).all(|w| w[0].0 < w[1].0), "sorted, without duplicates");
        assert_eq!(number("close"), Some(3));
        assert_eq!(number("mkdir"), Some(83));
        assert_eq!(number("mkdirat"), Some(258));
        assert_eq!(number("cachestat"), Some(451), "newer than libc");
        assert_eq!(number("no_such_call"), None);
        assert_eq!(number(""), None);
    }

    #[test]
    fn a_call_gets_the_first_matching_groups_action_else_the_default() {
        let p = profile(
            SeccompAction::Errno,
            Some(libc::ENOSYS as u32),
            vec![
                entry(&["read", "write", "no_such_call"], SeccompAction::Allow, None, vec![]),
                entry(&["mkdirat"], SeccompAction::Errno, Some(libc::ENOSPC as u32), vec![]),
                entry(&["kill"], SeccompAction::Allow, None, vec![arg(1, SeccompOp::Eq, 0, 0)]),
                entry(&["kill"], SeccompAction::Allow, None, vec![arg(1, SeccompOp::Ge, 10, 0), arg(1, SeccompOp::Le, 12, 0)]),
                entry(&["getpid"], SeccompAction::KillProcess, None, vec![]),
                // The default's own action: left out.
                entry(&["close"], SeccompAction::Errno, Some(libc::ENOSYS as u32), vec![]),
            ],
        );
        let f = compile(&p).unwrap();
        assert_eq!(f.unknown(), ["no_such_call"]);
        let call = |name: &str, args: [u64; 6]| run(f.program(), AUDIT_ARCH_X86_64, nr(name), args);
        assert_eq!(call("read", [0; 6]), ALLOW);
        assert_eq!(call("write", [1, 2, 3, 4, 5, 6]), ALLOW);
        assert_eq!(call("mkdirat", [0; 6]), errno(libc::ENOSPC));
        assert_eq!(call("mkdir", [0; 6]), errno(libc::ENOSYS));
        assert_eq!(call("close", [0; 6]), errno(libc::ENOSYS));
        assert_eq!(call("getpid", [0; 6]), libc::SECCOMP_RET_KILL_PROCESS);
        // Entries for one call are alternatives, an entry's conditions all
        // hold.
        for (sig, want) in [(0, ALLOW), (9, errno(libc::ENOSYS)), (10, ALLOW), (12, ALLOW), (13, errno(libc::ENOSYS))] {
            assert_eq!(call("kill", [1, sig, 0, 0, 0, 0]), want, "signal {sig}");
        }
        // The high half of an argument counts.
        assert_eq!(call("kill", [1, 1 << 32, 0, 0, 0, 0]), errno(libc::ENOSYS));
        // Another architecture and the x32 ABI never reach the rules.
        assert_eq!(run(f.program(), 0x4000_0003, nr("read"), [0; 6]), errno(libc::ENOSYS), "i386");
        assert_eq!(run(f.program(), AUDIT_ARCH_X86_64, nr("read") | X32_SYSCALL_BIT, [0; 6]), errno(libc::ENOSYS), "x32");
    }

    #[test]
    fn comparisons() {
        let cases = [
            (SeccompOp::Eq, 5, 0, [(5, true), (4, false), (5 | 1 << 40, false)]),
            (SeccompOp::Ne, 5, 0, [(5, false), (6, true), (5 | 1 << 40, true)]),
            (SeccompOp::Lt, 1 << 33, 0, [(1 << 33, false), ((1 << 33) - 1, true), (u64::MAX, false)]),
            (SeccompOp::Le, 7, 0, [(7, true), (8, false), (0, true)]),
            (SeccompOp::Gt, 7, 0, [(7, false), (8, true), (1 << 63, true)]),
            (SeccompOp::Ge, 1 << 32, 0, [(1 << 32, true), ((1 << 32) - 1, false), (u64::MAX, true)]),
            (SeccompOp::MaskedEq, 0xf0, 0x30, [(0x35, true), (0x45, false), (0x1_0000_0030, true)]),
        ];
        for (op, value, value_two, checks) in cases {
            let p = profile(
                SeccompAction::Allow,
                None,
                vec![entry(&["ioctl"], SeccompAction::Errno, None, vec![arg(2, op, value, value_two)])],
            );
            let f = compile(&p).unwrap();
            for (a, matches) in checks {
                let got = run(f.program(), AUDIT_ARCH_X86_64, nr("ioctl"), [0, 0, a, 0, 0, 0]);
                assert_eq!(got, if matches { errno(libc::EPERM) } else { ALLOW }, "{op:?} {value:#x} {value_two:#x} on {a:#x}");
            }
        }
        // A masked value outside its mask never matches: the entry is left
        // out (the call keeps its other entries).
        let p = profile(
            SeccompAction::Allow,
            None,
            vec![
                entry(&["ioctl"], SeccompAction::Errno, None, vec![arg(0, SeccompOp::MaskedEq, 0x0f, 0x10)]),
                entry(&["ioctl"], SeccompAction::Errno, None, vec![arg(0, SeccompOp::Eq, 3, 0)]),
            ],
        );
        let f = compile(&p).unwrap();
        assert_eq!(run(f.program(), AUDIT_ARCH_X86_64, nr("ioctl"), [0x10, 0, 0, 0, 0, 0]), ALLOW);
        assert_eq!(run(f.program(), AUDIT_ARCH_X86_64, nr("ioctl"), [3, 0, 0, 0, 0, 0]), errno(libc::EPERM));
    }

    #[test]
    fn an_unconditional_entry_wins_over_conditional_ones() {
        let cond = entry(&["openat"], SeccompAction::Errno, None, vec![arg(0, SeccompOp::Eq, 1, 0)]);
        let always = entry(&["openat"], SeccompAction::Errno, None, vec![]);
        for list in [vec![cond.clone(), always.clone()], vec![always, cond]] {
            let f = compile(&profile(SeccompAction::Allow, None, list)).unwrap();
            assert_eq!(run(f.program(), AUDIT_ARCH_X86_64, nr("openat"), [7, 0, 0, 0, 0, 0]), errno(libc::EPERM));
        }
    }

    #[test]
    fn actions_and_flags() {
        for (a, ret, want) in [
            (SeccompAction::KillThread, None, libc::SECCOMP_RET_KILL_THREAD),
            (SeccompAction::Trap, None, libc::SECCOMP_RET_TRAP),
            (SeccompAction::Log, None, libc::SECCOMP_RET_LOG),
            (SeccompAction::Trace, Some(7), libc::SECCOMP_RET_TRACE | 7),
            (SeccompAction::Trace, None, libc::SECCOMP_RET_TRACE | libc::EPERM as u32),
            (SeccompAction::Errno, None, errno(libc::EPERM)),
            // The sentinels' own values stay the group's action.
            (SeccompAction::Trace, Some(0xffff), libc::SECCOMP_RET_TRACE | 0xffff),
        ] {
            let p = profile(
                SeccompAction::Allow,
                None,
                vec![entry(&["getuid"], a, ret, vec![]), entry(&["getgid"], SeccompAction::Trap, None, vec![])],
            );
            let f = compile(&p).unwrap();
            assert_eq!(run(f.program(), AUDIT_ARCH_X86_64, nr("getuid"), [0; 6]), want, "{a:?}");
            assert_eq!(run(f.program(), AUDIT_ARCH_X86_64, nr("getpid"), [0; 6]), ALLOW, "{a:?}");
        }
        let mut p = profile(SeccompAction::Log, None, vec![]);
        assert_eq!(run(compile(&p).unwrap().program(), AUDIT_ARCH_X86_64, nr("getpid"), [0; 6]), libc::SECCOMP_RET_LOG);
        p.flags = vec![SeccompFlag::Log, SeccompFlag::SpecAllow];
        assert_eq!(compile(&p).unwrap().flags, libc::SECCOMP_FILTER_FLAG_LOG | libc::SECCOMP_FILTER_FLAG_SPEC_ALLOW);
    }

    #[test]
    fn bad_profiles_are_refused() {
        let p = profile(SeccompAction::Allow, None, vec![entry(&["read"], SeccompAction::Errno, None, vec![arg(6, SeccompOp::Eq, 0, 0)])]);
        assert!(matches!(compile(&p), Err(SeccompError::ArgIndex { entry: 0, index: 6, .. })));
        // Even in an entry that is left out (the default's action, an
        // unknown name).
        for (a, name) in [(SeccompAction::Allow, "read"), (SeccompAction::Errno, "no_such_call")] {
            let p = profile(
                SeccompAction::Allow,
                None,
                vec![entry(&["read"], SeccompAction::Log, None, vec![]), entry(&[name], a, None, vec![arg(9, SeccompOp::Eq, 0, 0)])],
            );
            let e = compile(&p).unwrap_err().to_string();
            assert!(e.contains(&format!("argument index 9 in syscalls[1] ({name})")), "{e}");
        }
        let p = profile(SeccompAction::Errno, Some(70_000), vec![]);
        assert!(matches!(compile(&p), Err(SeccompError::ErrnoRet(70_000))));
        // Far too many conditions for one filter.
        let many = (0..1000).map(|i| entry(&["read"], SeccompAction::Errno, None, vec![arg(0, SeccompOp::Eq, i, 0)])).collect();
        let e = compile(&profile(SeccompAction::Allow, None, many)).unwrap_err();
        assert!(matches!(e, SeccompError::TooLarge(n) if n > MAX_INSTRUCTIONS), "{e}");
        // The whole table, allowed, fits.
        let all: Vec<&str> = table::SYSCALLS.iter().map(|(n, _)| *n).collect();
        let f = compile(&profile(SeccompAction::Errno, None, vec![entry(&all, SeccompAction::Allow, None, vec![])])).unwrap();
        assert!(f.program().len() <= MAX_INSTRUCTIONS && f.unknown().is_empty());
    }
}
