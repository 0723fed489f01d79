//! The syscall trap: finishing guest `SYSCALL`s in the VMM on hosts where
//! the CPU enters `LSTAR` without leaving CPL 3.
//!
//! * The guest's `WRMSR LSTAR` exits to the VMM (MSR filter). The VMM keeps
//!   the value as the guest's `LSTAR`, answers `RDMSR LSTAR` with it, and
//!   programs the real `LSTAR` with [`TRAP_VA`].
//! * [`TRAP_VA`] lies in an unused slot of the kernel half (PML4 index 504).
//!   The VMM maps it, user-accessible, in the page tables in CR3 at that
//!   moment (the kernel's `swapper_pg_dir`; every later process copies its
//!   kernel-half entries) to [`UNBACKED_TRAP_PAGE`], which no memory slot
//!   backs. The page-table pages live in the legacy hole at 0xA0000, guest
//!   memory the guest never uses (it is not in the e820 map).
//! * A user `SYSCALL` then fetches from an unbacked page and exits with an
//!   emulation failure at [`TRAP_VA`]. The VMM completes the `SYSCALL` the
//!   way the CPU should have: CS and SS from `STAR`, RFLAGS masked with
//!   `SFMASK`, RIP at the guest's `LSTAR` (RCX and R11 are already set).
//!
//! Both the mapping and the MSR values live in guest state, so a snapshot of
//! a VM carries the trap with it.

use kvm_bindings::kvm_segment;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use vmrun_arch::layout::{LEGACY_HOLE_START, UNBACKED_TRAP_PAGE};
use vmrun_arch::paging::{table_indices, PTE_ADDR_MASK, PTE_PRESENT_RW_USER};

/// The address the real `LSTAR` points to.
pub const TRAP_VA: u64 = 0xffff_fc00_0000_0000;
/// Page-table pages for the trap mapping: PDPT, PD, PT.
pub const TRAP_PDPT: u64 = LEGACY_HOLE_START;
/// Page directory of the trap mapping.
pub const TRAP_PD: u64 = LEGACY_HOLE_START + 0x1000;
/// Page table of the trap mapping.
pub const TRAP_PT: u64 = LEGACY_HOLE_START + 0x2000;
/// Present and user-accessible, read-only, executable.
const PTE_PRESENT_USER: u64 = 0x5;

/// Error writing the trap mapping.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("cannot map the syscall trap: page table at {0:#x} is outside guest memory")]
pub struct MapError(pub u64);

/// Maps [`TRAP_VA`] in the page tables rooted at `cr3`.
pub fn map(mem: &GuestMemoryMmap, cr3: u64) -> Result<(), MapError> {
    let [pml4_i, pdpt_i, pd_i, pt_i] = table_indices(TRAP_VA);
    let write = |table: u64, index: usize, value: u64| {
        let addr = table + index as u64 * 8;
        mem.write_obj(value, GuestAddress(addr)).map_err(|_| MapError(addr))
    };
    write(TRAP_PT, pt_i, UNBACKED_TRAP_PAGE | PTE_PRESENT_USER)?;
    write(TRAP_PD, pd_i, TRAP_PT | PTE_PRESENT_RW_USER)?;
    write(TRAP_PDPT, pdpt_i, TRAP_PD | PTE_PRESENT_RW_USER)?;
    write(cr3 & PTE_ADDR_MASK, pml4_i, TRAP_PDPT | PTE_PRESENT_RW_USER)
}

/// The register changes that complete a `SYSCALL` which trapped.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SyscallEntry {
    pub rip: u64,
    pub rflags: u64,
    pub cs: kvm_segment,
    pub ss: kvm_segment,
}

/// Computes the state after `SYSCALL` from the guest's `LSTAR`, `STAR`,
/// `SFMASK` and the current RFLAGS.
pub fn complete_syscall(guest_lstar: u64, star: u64, sfmask: u64, rflags: u64) -> SyscallEntry {
    let cs_sel = ((star >> 32) & 0xfffc) as u16;
    let flat = kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        present: 1,
        dpl: 0,
        s: 1,
        g: 1,
        ..Default::default()
    };
    SyscallEntry {
        rip: guest_lstar,
        // Bit 1 of RFLAGS is always set.
        rflags: (rflags & !sfmask) | 0x2,
        cs: kvm_segment { selector: cs_sel, type_: 0xb, l: 1, db: 0, ..flat },
        ss: kvm_segment { selector: cs_sel + 8, type_: 0x3, l: 0, db: 1, ..flat },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmrun_arch::paging::PTE_PRESENT_RW;

    #[test]
    fn trap_is_in_an_unused_kernel_slot() {
        assert_eq!(table_indices(TRAP_VA)[0], 504);
    }

    #[test]
    fn mapping_is_user_accessible_at_every_level() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let cr3 = 0x9000;
        // A kernel entry already there stays.
        mem.write_obj(0x1234_5000u64 | PTE_PRESENT_RW, GuestAddress(cr3 + 511 * 8)).unwrap();
        map(&mem, cr3 | 0x5 /* PCID bits are ignored */).unwrap();
        let rd = |a: u64| mem.read_obj::<u64>(GuestAddress(a)).unwrap();
        let pml4e = rd(cr3 + 504 * 8);
        assert_eq!(pml4e, TRAP_PDPT | PTE_PRESENT_RW_USER);
        assert_eq!(rd(TRAP_PDPT), TRAP_PD | PTE_PRESENT_RW_USER);
        assert_eq!(rd(TRAP_PD), TRAP_PT | PTE_PRESENT_RW_USER);
        let pte = rd(TRAP_PT);
        assert_eq!(pte & PTE_ADDR_MASK, UNBACKED_TRAP_PAGE);
        assert_eq!(pte & 0x4, 0x4, "user");
        assert_eq!(pte >> 63, 0, "executable");
        assert_eq!(rd(cr3 + 511 * 8), 0x1234_5000 | PTE_PRESENT_RW);
        // Mapping again (another vCPU) changes nothing.
        map(&mem, cr3).unwrap();
        assert_eq!(rd(cr3 + 504 * 8), pml4e);
    }

    #[test]
    fn page_tables_outside_memory_are_an_error() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        assert_eq!(map(&mem, 0x4000_0000), Err(MapError(0x4000_0000 + 504 * 8)));
    }

    #[test]
    fn syscall_completion_follows_star_and_sfmask() {
        // Linux: STAR[47:32] = __KERNEL_CS (0x10), SFMASK clears TF, DF, IF, AC, NT...
        let star = (0x23u64 << 48) | (0x10u64 << 32);
        let sfmask = 0x47700;
        let e = complete_syscall(0xffff_ffff_8160_0000, star, sfmask, 0x246 | 0x40000);
        assert_eq!(e.rip, 0xffff_ffff_8160_0000);
        assert_eq!(e.rflags, 0x46, "IF and AC cleared, bit 1 kept");
        assert_eq!((e.cs.selector, e.cs.l, e.cs.dpl, e.cs.type_), (0x10, 1, 0, 0xb));
        assert_eq!((e.ss.selector, e.ss.db, e.ss.dpl, e.ss.type_), (0x18, 1, 0, 0x3));
    }
}
