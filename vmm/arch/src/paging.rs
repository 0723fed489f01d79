//! The page tables a 64-bit kernel is entered with: an identity map of the
//! first GiB in 2 MiB pages (the kernel builds its own tables right away).

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout::{PDE_START, PDPTE_START, PML4_START};

/// Present and writable.
pub const PTE_PRESENT_RW: u64 = 0x3;
/// Present, writable and user-accessible.
pub const PTE_PRESENT_RW_USER: u64 = 0x7;
/// Page size bit of a PDE: the entry maps a 2 MiB page.
pub const PTE_HUGE: u64 = 0x80;
/// Address bits of a page-table entry.
pub const PTE_ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

/// Error writing the boot page tables.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("cannot write the boot page tables into guest memory")]
pub struct Error;

/// Writes the boot page tables and returns the value for CR3.
pub fn write_identity_map(mem: &GuestMemoryMmap) -> Result<u64, Error> {
    mem.write_obj(PDPTE_START | PTE_PRESENT_RW, GuestAddress(PML4_START)).map_err(|_| Error)?;
    mem.write_obj(PDE_START | PTE_PRESENT_RW, GuestAddress(PDPTE_START)).map_err(|_| Error)?;
    for i in 0..512u64 {
        mem.write_obj((i << 21) | PTE_HUGE | PTE_PRESENT_RW, GuestAddress(PDE_START + i * 8))
            .map_err(|_| Error)?;
    }
    Ok(PML4_START)
}

/// Index into each level of a 4-level page table walk for `va`:
/// PML4, PDPT, PD, PT.
pub fn table_indices(va: u64) -> [usize; 4] {
    [(va >> 39) as usize & 511, (va >> 30) as usize & 511, (va >> 21) as usize & 511, (va >> 12) as usize & 511]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_map() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        assert_eq!(write_identity_map(&mem).unwrap(), PML4_START);
        let pml4: u64 = mem.read_obj(GuestAddress(PML4_START)).unwrap();
        assert_eq!(pml4 & PTE_ADDR_MASK, PDPTE_START);
        let pde5: u64 = mem.read_obj(GuestAddress(PDE_START + 5 * 8)).unwrap();
        assert_eq!(pde5, (5 << 21) | PTE_HUGE | PTE_PRESENT_RW);
    }

    #[test]
    fn indices() {
        assert_eq!(table_indices(0xffff_fc00_0000_0000), [504, 0, 0, 0]);
        assert_eq!(table_indices(0xffff_ffff_8100_0000), [511, 510, 8, 0]);
        assert_eq!(table_indices(0x20_3000), [0, 0, 1, 3]);
    }
}
