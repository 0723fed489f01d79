//! The device cgroup of a container: cgroup v2 controls devices with a BPF
//! program (`BPF_PROG_TYPE_CGROUP_DEVICE`) attached to the cgroup, run by
//! the kernel at each open or `mknod` of a device node. This module turns
//! the spec's rules (`linux.resources.devices`) into such a program, loads
//! it and attaches it.
//!
//! The rules keep cgroup v1's meaning, as runc emulates it: they are
//! applied in order, so for each access asked (read, write, mknod) the last
//! rule that matches the device and names that access decides; a device no
//! rule matches is denied. runc's default rules come after the spec's
//! ([`DEFAULT_RULES`]): the standard nodes and ptys stay usable, whatever
//! the spec denies.
//!
//! The program is attached without `BPF_F_ALLOW_OVERRIDE` or
//! `BPF_F_ALLOW_MULTI`: the cgroups a container makes below its own cannot
//! attach a program of their own, and so cannot widen what it allows.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use vmrun_agent_protocol::{DeviceKind, DeviceRule};

/// Why a device program could not be made.
#[derive(Debug, thiserror::Error)]
pub enum DevCgroupError {
    /// A rule the program cannot express.
    #[error("linux.resources.devices: {0}")]
    Invalid(String),
    /// The kernel refused the program (its verifier's log follows).
    #[error("the guest kernel refused the device program: {source}{log}")]
    Load {
        /// The error.
        source: std::io::Error,
        /// The verifier's log, if any.
        log: String,
    },
    /// Attaching it to the cgroup failed.
    #[error("attaching the device program to the cgroup: {0}")]
    Attach(#[source] std::io::Error),
}

/// An allowing rule: kind, major, minor (`None`: any), access.
pub type DefaultRule = (Option<DeviceKind>, Option<u32>, Option<u32>, &'static str);

/// runc's default device rules (its `AllowedDevices`), added after the
/// spec's: `mknod` of any node, `/dev/null`, `zero`, `full`, `random`,
/// `urandom`, `tty`, `console`, `ptmx`, the ptys and `/dev/net/tun`.
pub const DEFAULT_RULES: [DefaultRule; 12] = [
    (Some(DeviceKind::Char), None, None, "m"),
    (Some(DeviceKind::Block), None, None, "m"),
    (Some(DeviceKind::Char), Some(1), Some(3), "rwm"),
    (Some(DeviceKind::Char), Some(1), Some(5), "rwm"),
    (Some(DeviceKind::Char), Some(1), Some(7), "rwm"),
    (Some(DeviceKind::Char), Some(1), Some(8), "rwm"),
    (Some(DeviceKind::Char), Some(1), Some(9), "rwm"),
    (Some(DeviceKind::Char), Some(5), Some(0), "rwm"),
    (Some(DeviceKind::Char), Some(5), Some(1), "rwm"),
    (Some(DeviceKind::Char), Some(5), Some(2), "rwm"),
    (Some(DeviceKind::Char), Some(136), None, "rwm"),
    (Some(DeviceKind::Char), Some(10), Some(200), "rwm"),
];

/// The kernel's `BPF_DEVCG_DEV_*` device types.
const DEV_BLOCK: i32 = 1;
const DEV_CHAR: i32 = 2;
/// The kernel's `BPF_DEVCG_ACC_*` accesses.
const ACC_MKNOD: i32 = 1;
const ACC_READ: i32 = 2;
const ACC_WRITE: i32 = 4;

/// The spec's rules followed by [`DEFAULT_RULES`].
pub fn with_defaults(rules: &[DeviceRule]) -> Vec<DeviceRule> {
    let defaults =
        DEFAULT_RULES.iter().map(|&(kind, major, minor, access)| DeviceRule { allow: true, kind, major, minor, access: access.into() });
    rules.iter().cloned().chain(defaults).collect()
}

/// The access bits a rule names.
fn access_bits(rule: &DeviceRule) -> Result<i32, DevCgroupError> {
    if rule.access.is_empty() {
        return Ok(ACC_MKNOD | ACC_READ | ACC_WRITE);
    }
    rule.access.chars().try_fold(0, |bits, c| match c {
        'r' => Ok(bits | ACC_READ),
        'w' => Ok(bits | ACC_WRITE),
        'm' => Ok(bits | ACC_MKNOD),
        _ => Err(DevCgroupError::Invalid(format!("access {:?}: only r, w and m", rule.access))),
    })
}

/// One instruction (the kernel's `struct bpf_insn`).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Insn {
    /// The opcode.
    pub code: u8,
    /// The destination register (low nibble) and source (high nibble).
    pub regs: u8,
    /// A jump's offset, or a load's.
    pub off: i16,
    /// The immediate.
    pub imm: i32,
}

/// Opcodes used (`BPF_*` classes and operations).
pub mod op {
    /// `dst = *(u32 *)(src + off)`.
    pub const LDX_W: u8 = 0x61;
    /// `dst32 = imm`.
    pub const MOV32_K: u8 = 0xb4;
    /// `dst32 = src32`.
    pub const MOV32_X: u8 = 0xbc;
    /// `dst32 &= imm`.
    pub const AND32_K: u8 = 0x54;
    /// `dst32 >>= imm`.
    pub const RSH32_K: u8 = 0x74;
    /// `if dst32 != imm goto +off`.
    pub const JNE32_K: u8 = 0x56;
    /// `if dst32 == imm goto +off`.
    pub const JEQ32_K: u8 = 0x16;
    /// `goto +off`.
    pub const JA: u8 = 0x05;
    /// `return r0`.
    pub const EXIT: u8 = 0x95;
}

/// Registers: r1 the context; r2 the device type, r3 the access asked,
/// r4 the major, r5 the minor; r0 the result and scratch.
const R0: u8 = 0;
const R1: u8 = 1;
const R_TYPE: u8 = 2;
const R_ACCESS: u8 = 3;
const R_MAJOR: u8 = 4;
const R_MINOR: u8 = 5;

fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn { code, regs: dst | (src << 4), off, imm }
}

/// An instruction whose jump goes to a label, resolved by [`Asm::finish`].
struct Asm {
    insns: Vec<Insn>,
    /// (instruction index, label) of each forward jump.
    jumps: Vec<(usize, usize)>,
    /// Each label's instruction index, once placed.
    labels: Vec<Option<usize>>,
}

impl Asm {
    fn new() -> Self {
        Self { insns: Vec::new(), jumps: Vec::new(), labels: Vec::new() }
    }
    fn label(&mut self) -> usize {
        self.labels.push(None);
        self.labels.len() - 1
    }
    fn place(&mut self, label: usize) {
        self.labels[label] = Some(self.insns.len());
    }
    fn push(&mut self, i: Insn) {
        self.insns.push(i);
    }
    fn jump(&mut self, code: u8, dst: u8, imm: i32, label: usize) {
        self.jumps.push((self.insns.len(), label));
        self.insns.push(insn(code, dst, 0, 0, imm));
    }
    fn ret(&mut self, v: i32) {
        self.push(insn(op::MOV32_K, R0, 0, 0, v));
        self.push(insn(op::EXIT, 0, 0, 0, 0));
    }
    fn finish(mut self) -> Result<Vec<Insn>, DevCgroupError> {
        for (at, label) in self.jumps {
            let to = self.labels[label].expect("every label is placed");
            let off = i16::try_from(to as i64 - at as i64 - 1).map_err(|_| DevCgroupError::Invalid("too many rules".into()))?;
            self.insns[at].off = off;
        }
        Ok(self.insns)
    }
}

/// The program for `rules` (already with the defaults, if wanted).
pub fn program(rules: &[DeviceRule]) -> Result<Vec<Insn>, DevCgroupError> {
    let mut a = Asm::new();
    // struct bpf_cgroup_dev_ctx { u32 access_type; u32 major; u32 minor; }:
    // access_type is (access << 16) | type.
    a.push(insn(op::LDX_W, R_TYPE, R1, 0, 0));
    a.push(insn(op::MOV32_X, R_ACCESS, R_TYPE, 0, 0));
    a.push(insn(op::AND32_K, R_TYPE, 0, 0, 0xffff));
    a.push(insn(op::RSH32_K, R_ACCESS, 0, 0, 16));
    a.push(insn(op::LDX_W, R_MAJOR, R1, 4, 0));
    a.push(insn(op::LDX_W, R_MINOR, R1, 8, 0));
    let mut checked = Vec::with_capacity(rules.len());
    for r in rules {
        let kind = match r.kind {
            None => None,
            Some(DeviceKind::Char) => Some(DEV_CHAR),
            Some(DeviceKind::Block) => Some(DEV_BLOCK),
            Some(DeviceKind::Fifo) => return Err(DevCgroupError::Invalid("a rule for FIFOs (type p): only a, c and b".into())),
        };
        checked.push((r, kind, access_bits(r)?));
    }
    // Each access asked is decided on its own; all must be allowed.
    for bit in [ACC_MKNOD, ACC_READ, ACC_WRITE] {
        let done = a.label();
        a.push(insn(op::MOV32_X, R0, R_ACCESS, 0, 0));
        a.push(insn(op::AND32_K, R0, 0, 0, bit));
        a.jump(op::JEQ32_K, R0, 0, done);
        // A rule that matches every device ends the list: the verifier
        // refuses code that cannot be reached.
        let mut decided = false;
        for &(r, kind, _) in checked.iter().rev().filter(|(_, _, bits)| bits & bit != 0) {
            let next = a.label();
            // The kernel's numbers are u32; the immediates are their bits.
            let checks = [(R_TYPE, kind), (R_MAJOR, r.major.map(|m| m as i32)), (R_MINOR, r.minor.map(|m| m as i32))];
            for (reg, v) in checks.iter().filter_map(|(reg, want)| Some((*reg, (*want)?))) {
                a.jump(op::JNE32_K, reg, v, next);
            }
            if r.allow {
                a.jump(op::JA, 0, 0, done);
            } else {
                a.ret(0);
            }
            a.place(next);
            if checks.iter().all(|(_, want)| want.is_none()) {
                decided = true;
                break;
            }
        }
        if !decided {
            a.ret(0);
        }
        a.place(done);
    }
    a.ret(1);
    a.finish()
}

/// `BPF_PROG_LOAD`'s attribute (the fields used; the rest is zero).
#[repr(C)]
#[derive(Default)]
struct ProgLoad {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

/// `BPF_PROG_ATTACH`'s attribute.
#[repr(C)]
#[derive(Default)]
struct ProgAttach {
    target_fd: u32,
    attach_bpf_fd: u32,
    attach_type: u32,
    attach_flags: u32,
    replace_bpf_fd: u32,
}

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_ATTACH: libc::c_long = 8;
const BPF_PROG_TYPE_CGROUP_DEVICE: u32 = 15;
const BPF_CGROUP_DEVICE: u32 = 6;

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<libc::c_long> {
    // SAFETY: attr is a live, writable attribute of the layout the command
    // reads, its size given; its pointers point at buffers that outlive
    // the call.
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut T, std::mem::size_of::<T>() as libc::c_uint) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Loads `insns` as a device program.
fn load(insns: &[Insn]) -> Result<OwnedFd, DevCgroupError> {
    const LICENSE: &[u8] = b"Apache-2.0\0";
    let mut name = [0u8; 16];
    name[..10].copy_from_slice(b"vmrun_devs");
    let mut attr = ProgLoad {
        prog_type: BPF_PROG_TYPE_CGROUP_DEVICE,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: LICENSE.as_ptr() as u64,
        prog_name: name,
        expected_attach_type: BPF_CGROUP_DEVICE,
        ..Default::default()
    };
    match bpf(BPF_PROG_LOAD, &mut attr) {
        // SAFETY: a successful BPF_PROG_LOAD returns a new descriptor,
        // owned by no one else.
        Ok(fd) => Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) }),
        Err(source) => {
            // Again with the verifier's log, to say why.
            let mut log = vec![0u8; 1 << 16];
            attr.log_level = 1;
            attr.log_size = log.len() as u32;
            attr.log_buf = log.as_mut_ptr() as u64;
            if let Ok(fd) = bpf(BPF_PROG_LOAD, &mut attr) {
                // SAFETY: as above.
                return Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) });
            }
            let end = log.iter().position(|b| *b == 0).unwrap_or(log.len());
            let text = String::from_utf8_lossy(&log[..end]);
            let tail: Vec<&str> = text.lines().rev().take(4).collect();
            let log = if tail.is_empty() { String::new() } else { format!(": {}", tail.into_iter().rev().collect::<Vec<_>>().join(" / ")) };
            Err(DevCgroupError::Load { source, log })
        }
    }
}

/// Makes the program for `rules` (the spec's; the defaults are added) and
/// attaches it to the cgroup `dir`, replacing the one it had.
pub fn apply(dir: RawFd, rules: &[DeviceRule]) -> Result<(), DevCgroupError> {
    let insns = program(&with_defaults(rules))?;
    let prog = load(&insns)?;
    let mut attr =
        ProgAttach { target_fd: dir as u32, attach_bpf_fd: prog.as_raw_fd() as u32, attach_type: BPF_CGROUP_DEVICE, ..Default::default() };
    // The cgroup keeps the program; its descriptor closes here.
    bpf(BPF_PROG_ATTACH, &mut attr).map(drop).map_err(DevCgroupError::Attach)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs the program on one request: the instructions it uses, as the
    /// kernel's interpreter runs them.
    fn run(p: &[Insn], kind: i32, access: i32, major: u32, minor: u32) -> bool {
        let ctx = [((access << 16) | kind) as u32, major, minor];
        let mut r = [0u64; 11];
        let mut pc = 0usize;
        for _ in 0..100_000 {
            let i = p[pc];
            let (dst, src) = ((i.regs & 0xf) as usize, (i.regs >> 4) as usize);
            let imm = i.imm as u32 as u64;
            pc += 1;
            match i.code {
                op::LDX_W => {
                    assert_eq!(src, 1, "loads come from the context");
                    r[dst] = u64::from(ctx[i.off as usize / 4]);
                }
                op::MOV32_K => r[dst] = imm,
                op::MOV32_X => r[dst] = r[src] & 0xffff_ffff,
                op::AND32_K => r[dst] = (r[dst] & imm) & 0xffff_ffff,
                op::RSH32_K => r[dst] = (r[dst] & 0xffff_ffff) >> imm,
                op::JNE32_K | op::JEQ32_K | op::JA => {
                    let ne = (r[dst] as u32) != (imm as u32);
                    let taken = match i.code {
                        op::JNE32_K => ne,
                        op::JEQ32_K => !ne,
                        _ => true,
                    };
                    if taken {
                        assert!(i.off >= 0, "only forward jumps");
                        pc += i.off as usize;
                    }
                }
                op::EXIT => return r[0] == 1,
                c => panic!("unknown opcode {c:#x}"),
            }
        }
        panic!("no exit")
    }

    fn rule(allow: bool, kind: Option<DeviceKind>, major: Option<u32>, minor: Option<u32>, access: &str) -> DeviceRule {
        DeviceRule { allow, kind, major, minor, access: access.into() }
    }

    /// cgroup v1's meaning, the reference: per access, the last matching
    /// rule naming it decides; unmatched is denied.
    fn model(rules: &[DeviceRule], kind: i32, access: i32, major: u32, minor: u32) -> bool {
        [ACC_MKNOD, ACC_READ, ACC_WRITE].iter().filter(|b| access & **b != 0).all(|&b| {
            rules
                .iter()
                .rev()
                .find(|r| {
                    let k = r.kind.map(|k| if k == DeviceKind::Char { DEV_CHAR } else { DEV_BLOCK });
                    access_bits(r).unwrap() & b != 0
                        && k.is_none_or(|k| k == kind)
                        && r.major.is_none_or(|m| m == major)
                        && r.minor.is_none_or(|m| m == minor)
                })
                .is_some_and(|r| r.allow)
        })
    }

    const C: Option<DeviceKind> = Some(DeviceKind::Char);
    const B: Option<DeviceKind> = Some(DeviceKind::Block);

    #[test]
    fn containerd_default_rules() {
        // containerd's and docker's spec: deny all, then the defaults.
        let rules = with_defaults(&[rule(false, None, None, None, "rwm"), rule(true, C, Some(10), Some(229), "rwm")]);
        let p = program(&rules).unwrap();
        assert!(run(&p, DEV_CHAR, ACC_READ | ACC_WRITE, 1, 3), "/dev/null");
        assert!(run(&p, DEV_CHAR, ACC_READ, 136, 7), "a pty");
        assert!(run(&p, DEV_CHAR, ACC_READ | ACC_WRITE, 10, 229), "/dev/fuse, allowed by the spec");
        assert!(!run(&p, DEV_BLOCK, ACC_READ, 254, 0), "a disk");
        assert!(!run(&p, DEV_CHAR, ACC_READ, 1, 1), "/dev/mem");
        assert!(run(&p, DEV_BLOCK, ACC_MKNOD, 254, 0), "mknod of any node (the mounts are nodev)");
        assert!(!run(&p, DEV_BLOCK, ACC_MKNOD | ACC_READ, 254, 0));
    }

    #[test]
    fn a_partial_deny_takes_away_only_its_access() {
        let rules = [rule(true, None, None, None, "rwm"), rule(false, C, Some(1), Some(3), "w")];
        let p = program(&rules).unwrap();
        assert!(run(&p, DEV_CHAR, ACC_READ, 1, 3));
        assert!(!run(&p, DEV_CHAR, ACC_WRITE, 1, 3));
        assert!(!run(&p, DEV_CHAR, ACC_READ | ACC_WRITE, 1, 3), "read-write asks for write too");
        assert!(run(&p, DEV_CHAR, ACC_WRITE, 1, 5));
        // The defaults come after: they allow /dev/null again.
        let p = program(&with_defaults(&rules)).unwrap();
        assert!(run(&p, DEV_CHAR, ACC_WRITE, 1, 3));
    }

    #[test]
    fn the_program_agrees_with_the_rules_meaning() {
        // Rule lists made from a small set, every request checked against
        // the model (a deterministic pseudo-random walk).
        let pool = [
            rule(false, None, None, None, "rwm"),
            rule(true, None, None, None, ""),
            rule(true, C, Some(1), None, "r"),
            rule(false, C, Some(1), Some(3), "wm"),
            rule(true, B, None, Some(0), "rw"),
            rule(false, B, Some(8), None, "r"),
            rule(true, C, None, Some(3), "m"),
            rule(true, C, Some(u32::MAX), Some(u32::MAX), "w"),
        ];
        let mut seed = 0x9e37_79b9_u32;
        let mut next = |n: u32| {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            seed % n
        };
        for _ in 0..200 {
            let len = next(6) as usize;
            let rules: Vec<DeviceRule> = (0..len).map(|_| pool[next(pool.len() as u32) as usize].clone()).collect();
            let p = program(&rules).unwrap();
            for kind in [DEV_CHAR, DEV_BLOCK] {
                for access in 1..8 {
                    for (major, minor) in [(1, 3), (1, 5), (8, 0), (8, 3), (5, 0), (u32::MAX, u32::MAX), (0, u32::MAX)] {
                        assert_eq!(
                            run(&p, kind, access, major, minor),
                            model(&rules, kind, access, major, minor),
                            "{rules:?} {kind} {access} {major}:{minor}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn bad_rules_are_refused() {
        assert!(program(&[rule(true, Some(DeviceKind::Fifo), None, None, "r")]).unwrap_err().to_string().contains("FIFO"));
        assert!(program(&[rule(true, C, None, None, "rx")]).unwrap_err().to_string().contains("only r, w and m"));
    }
}
