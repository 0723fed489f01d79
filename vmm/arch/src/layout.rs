//! The guest physical address map of a vmrun VM.
//!
//! ```text
//! 0x0000_0500  boot GDT            0x0000_0520  boot IDT (empty)
//! 0x0000_7000  zero page (boot_params)
//! 0x0000_8ff0  boot stack pointer
//! 0x0000_9000  boot page tables (PML4, PDPT, PD: identity map of 1 GiB)
//! 0x0002_0000  kernel command line
//! 0x0002_1000  setup_data: the random seed of a boot
//! 0x0009_fc00  MP table (first place Linux scans after the first KiB)
//! 0x000a_0000  legacy hole, not RAM for the guest (page-table pages for
//!              the syscall trap of the host compatibility layer)
//! 0x0010_0000  RAM the kernel may use; the kernel is loaded at 16 MiB
//! 0xd000_0000  MMIO window: boot marker, then virtio-mmio devices
//! 0xfec0_0000  IOAPIC            0xfee0_0000  local APIC
//! 0x1_0000_0000 RAM above the MMIO window, for guests bigger than 3.25 GiB
//! ```

/// Where the boot GDT is written.
pub const BOOT_GDT_START: u64 = 0x500;
/// Where the (empty) boot IDT is written.
pub const BOOT_IDT_START: u64 = 0x520;
/// The zero page: Linux's `struct boot_params`.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer of the boot vCPU.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Boot page tables: PML4, then one PDPT, then one PD of 2 MiB pages.
pub const PML4_START: u64 = 0x9000;
/// Page directory pointer table of the boot identity map.
pub const PDPTE_START: u64 = 0xa000;
/// Page directory of the boot identity map.
pub const PDE_START: u64 = 0xb000;
/// The kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Longest command line, terminating NUL included (x86's COMMAND_LINE_SIZE).
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// The zero page's `setup_data` list: one entry, a seed for the guest's
/// random generator (`SETUP_RNG_SEED`), in the first MiB, which Linux
/// keeps reserved.
pub const SETUP_DATA_START: u64 = 0x21000;
/// Start of the extended BIOS data area; the MP table is written here.
pub const EBDA_START: u64 = 0x9fc00;
/// Start of the legacy VGA/ROM hole: guest memory, but not in the e820 map.
pub const LEGACY_HOLE_START: u64 = 0xa0000;
/// End of the legacy hole.
pub const LEGACY_HOLE_END: u64 = 0x100000;
/// First byte of RAM above the legacy hole.
pub const HIGH_MEMORY_START: u64 = 0x100000;
/// Where an ELF or bzImage kernel is loaded when it does not say otherwise.
pub const KERNEL_START: u64 = 0x100_0000;

/// Start of the MMIO window below 4 GiB.
pub const MMIO_START: u64 = 0xd000_0000;
/// End of the MMIO window (4 GiB).
pub const MMIO_END: u64 = 0x1_0000_0000;
/// The boot marker: a guest write here makes the VMM record the time since
/// it started. Any width, any value; one page is reserved for it.
pub const BOOT_MARKER_ADDR: u64 = MMIO_START;
/// Size of the boot marker's page.
pub const BOOT_MARKER_SIZE: u64 = 0x1000;
/// First virtio-mmio device slot; each device gets [`VIRTIO_MMIO_SIZE`].
pub const VIRTIO_MMIO_START: u64 = MMIO_START + 0x1000;
/// Size of one virtio-mmio device's register window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// A page in the MMIO window that no device and no memory slot ever claims.
/// The host compatibility layer points its syscall trap at it, so that an
/// instruction fetch there leaves the guest.
pub const UNBACKED_TRAP_PAGE: u64 = 0xdfff_f000;
/// IOAPIC registers (KVM's in-kernel IOAPIC).
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// Local APIC registers.
pub const LAPIC_START: u64 = 0xfee0_0000;
/// KVM's task state segment pages (three pages below the BIOS ROM area).
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;

/// Number of pins on the IOAPIC, hence of GSIs a device can use.
pub const IOAPIC_PINS: u32 = 24;
/// The serial console's interrupt (COM1).
pub const SERIAL_IRQ: u32 = 4;
/// First interrupt handed out to virtio devices.
pub const VIRTIO_IRQ_START: u32 = 5;

/// Most vCPUs a guest may have (the MP table and the guest kernel's
/// NR_CPUS both allow this many).
pub const MAX_VCPUS: u8 = 32;

// The boot stack sits between the zero page and the page tables, and the
// trap page inside the MMIO window below the IOAPIC: checked at compile time.
const _: () = assert!(BOOT_STACK_POINTER < PML4_START && BOOT_STACK_POINTER > ZERO_PAGE_START + 0x1000);
const _: () = assert!(UNBACKED_TRAP_PAGE >= MMIO_START && UNBACKED_TRAP_PAGE < IOAPIC_START);
const _: () = assert!(VIRTIO_MMIO_START >= BOOT_MARKER_ADDR + BOOT_MARKER_SIZE);

/// Guest RAM regions for a guest of `mem_size` bytes: everything below the
/// MMIO window first, the rest above 4 GiB.
pub fn ram_regions(mem_size: u64) -> Vec<(u64, u64)> {
    if mem_size <= MMIO_START {
        vec![(0, mem_size)]
    } else {
        vec![(0, MMIO_START), (MMIO_END, mem_size - MMIO_START)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guest_is_one_region() {
        assert_eq!(ram_regions(128 << 20), vec![(0, 128 << 20)]);
        assert_eq!(ram_regions(MMIO_START), vec![(0, MMIO_START)]);
    }

    #[test]
    fn big_guest_skips_the_mmio_window() {
        let r = ram_regions(4 << 30);
        assert_eq!(r, vec![(0, MMIO_START), (MMIO_END, (4 << 30) - MMIO_START)]);
        let total: u64 = r.iter().map(|(_, s)| s).sum();
        assert_eq!(total, 4 << 30);
    }

    #[test]
    fn fixed_areas_do_not_overlap() {
        let areas = [
            (BOOT_GDT_START, 0x20),
            (BOOT_IDT_START, 0x8),
            (ZERO_PAGE_START, 0x1000),
            (PML4_START, 0x1000),
            (PDPTE_START, 0x1000),
            (PDE_START, 0x1000),
            (CMDLINE_START, CMDLINE_MAX_SIZE as u64),
            (EBDA_START, LEGACY_HOLE_START - EBDA_START),
        ];
        for (i, a) in areas.iter().enumerate() {
            for b in &areas[i + 1..] {
                assert!(a.0 + a.1 <= b.0 || b.0 + b.1 <= a.0, "{a:x?} overlaps {b:x?}");
            }
        }
    }
}
