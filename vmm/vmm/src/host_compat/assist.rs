//! Completing, in the VMM, the instructions that a kernel-mode-emulating
//! host's instruction emulator rejects (`KVM_EXIT_INTERNAL_ERROR`, suberror
//! "emulation"). Each is decoded from the bytes at the guest's RIP and its
//! architectural effect applied to the vCPU's registers.

/// RFLAGS.AC, the alignment check / SMAP override flag.
pub const RFLAGS_AC: u64 = 1 << 18;
/// #BP, the breakpoint exception.
pub const BP_VECTOR: u8 = 3;
/// Longest x86 instruction.
pub const MAX_INSN_LEN: usize = 15;

/// What to do for an instruction the emulator rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// `int3`: a trap; RIP moves past it and #BP is injected.
    Breakpoint,
    /// `clac`: clear RFLAGS.AC.
    ClearAc,
    /// `stac`: set RFLAGS.AC.
    SetAc,
    /// No architectural effect worth emulating here (`fwait` with no
    /// pending x87 exception, `lfence`, `mfence`, `sfence`, `pause`).
    Nop,
}

/// A decoded instruction the VMM can complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Assist {
    /// Instruction length in bytes.
    pub len: u64,
    /// Its effect.
    pub action: Action,
}

/// Decodes the instruction at the start of `bytes`; `None` if it is not one
/// this module can complete.
pub fn decode(bytes: &[u8]) -> Option<Assist> {
    let a = |len, action| Some(Assist { len, action });
    match bytes {
        [0xcc, ..] => a(1, Action::Breakpoint),
        [0x9b, ..] => a(1, Action::Nop),
        [0xf3, 0x90, ..] => a(2, Action::Nop),
        [0x0f, 0x01, 0xca, ..] => a(3, Action::ClearAc),
        [0x0f, 0x01, 0xcb, ..] => a(3, Action::SetAc),
        // lfence, mfence, sfence.
        [0x0f, 0xae, 0xe8 | 0xf0 | 0xf8, ..] => a(3, Action::Nop),
        _ => None,
    }
}

/// Applies `assist` to RIP and RFLAGS; returns whether #BP must be injected.
pub fn apply(assist: Assist, rip: &mut u64, rflags: &mut u64) -> bool {
    *rip = rip.wrapping_add(assist.len);
    match assist.action {
        Action::Breakpoint => return true,
        Action::ClearAc => *rflags &= !RFLAGS_AC,
        Action::SetAc => *rflags |= RFLAGS_AC,
        Action::Nop => {}
    }
    false
}

/// Formats instruction bytes for an error message.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(bytes: &[u8], rflags: u64) -> (Option<Assist>, u64, u64, bool) {
        let (mut rip, mut fl) = (0x1000, rflags);
        let d = decode(bytes);
        let bp = d.map(|d| apply(d, &mut rip, &mut fl)).unwrap_or(false);
        (d, rip, fl, bp)
    }

    #[test]
    fn int3_advances_and_injects_breakpoint() {
        let (d, rip, fl, bp) = run(&[0xcc, 0x90], 0x2);
        assert_eq!(d, Some(Assist { len: 1, action: Action::Breakpoint }));
        assert_eq!((rip, fl, bp), (0x1001, 0x2, true));
    }

    #[test]
    fn clac_and_stac_toggle_ac() {
        let (_, rip, fl, bp) = run(&[0x0f, 0x01, 0xca], 0x2 | RFLAGS_AC);
        assert_eq!((rip, fl, bp), (0x1003, 0x2, false));
        let (_, rip, fl, _) = run(&[0x0f, 0x01, 0xcb], 0x2);
        assert_eq!((rip, fl), (0x1003, 0x2 | RFLAGS_AC));
    }

    #[test]
    fn fwait_pause_and_fences_are_skipped() {
        for (bytes, len) in [(&[0x9b][..], 1), (&[0xf3, 0x90], 2), (&[0x0f, 0xae, 0xe8], 3), (&[0x0f, 0xae, 0xf0], 3), (&[0x0f, 0xae, 0xf8], 3)] {
            let (d, rip, fl, bp) = run(bytes, 0x202);
            assert_eq!(d.map(|d| d.action), Some(Action::Nop), "{bytes:x?}");
            assert_eq!((rip, fl, bp), (0x1000 + len, 0x202, false));
        }
    }

    #[test]
    fn unknown_and_truncated_instructions_are_refused() {
        assert_eq!(decode(&[]), None);
        assert_eq!(decode(&[0x0f, 0x01]), None, "clac cut short");
        assert_eq!(decode(&[0x0f, 0x01, 0xd0]), None, "xgetbv");
        assert_eq!(decode(&[0x0f, 0xae, 0x28]), None, "xrstor");
        assert_eq!(decode(&[0x90]), None, "nop is never rejected, so not handled");
    }

    #[test]
    fn hex_formatting() {
        assert_eq!(hex(&[0x0f, 0x01, 0xca]), "0f 01 ca");
    }
}
