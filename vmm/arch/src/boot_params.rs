//! Linux's zero page (`struct boot_params`) for 64-bit direct boot: the
//! setup header, the e820 memory map, the command line and the initramfs.

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};

use crate::layout::{
    ram_regions, CMDLINE_START, EBDA_START, HIGH_MEMORY_START, KERNEL_START,
};

/// e820 type of usable RAM.
pub const E820_RAM: u32 = 1;
/// e820 type of reserved memory.
pub const E820_RESERVED: u32 = 2;

const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x100_0000;
/// `loadflags` bit: the protected-mode kernel is loaded at 0x100000 or above.
const LOADED_HIGH: u8 = 0x01;

/// Errors building the zero page.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// The e820 table has room for 128 entries.
    #[error("too many e820 entries")]
    E820TableFull,
    /// Guest memory too small to hold the kernel.
    #[error("guest memory of {0} bytes is too small (at least 32 MiB are needed)")]
    MemoryTooSmall(u64),
}

/// Where the initramfs was loaded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InitrdLocation {
    /// Guest physical address of the first byte.
    pub addr: u64,
    /// Size in bytes.
    pub size: u64,
}

/// Everything that goes into the zero page.
#[derive(Clone, Debug)]
pub struct BootParamsConfig {
    /// Guest memory size in bytes.
    pub mem_size: u64,
    /// Length of the command line, without its terminating NUL.
    pub cmdline_len: usize,
    /// The initramfs, if any.
    pub initrd: Option<InitrdLocation>,
    /// The setup header of a bzImage; `None` for an ELF vmlinux.
    pub setup_header: Option<setup_header>,
    /// Guest address of the first `setup_data` entry, if any
    /// ([`rng_seed_setup_data`]).
    pub setup_data: Option<u64>,
}

/// `setup_data` type of a seed for the guest's random generator.
pub const SETUP_RNG_SEED: u32 = 9;

/// A `setup_data` entry (`next`, `type`, `len`, then the data) that hands
/// the guest kernel `seed` for its random generator, the last of its list.
/// Linux mixes it into its entropy pool early in `setup_arch` and wipes it;
/// it credits it (the generator is ready at once, instead of extracting
/// from a pool with nothing credited at every request until interrupts
/// and devices have added enough) where it trusts its boot loader:
/// `RANDOM_TRUST_BOOTLOADER` in its configuration. (The command line's
/// `random.trust_bootloader=on` comes too late: Linux parses it after
/// `setup_data`.)
pub fn rng_seed_setup_data(seed: &[u8]) -> Vec<u8> {
    let mut entry = Vec::with_capacity(16 + seed.len());
    entry.extend_from_slice(&0u64.to_le_bytes());
    entry.extend_from_slice(&SETUP_RNG_SEED.to_le_bytes());
    entry.extend_from_slice(&(seed.len() as u32).to_le_bytes());
    entry.extend_from_slice(seed);
    entry
}

/// Smallest guest that can boot: the kernel is loaded at 16 MiB.
pub const MIN_MEM_SIZE: u64 = 32 << 20;

fn add_e820_entry(params: &mut boot_params, addr: u64, size: u64, type_: u32) -> Result<(), Error> {
    let i = params.e820_entries as usize;
    if i >= params.e820_table.len() {
        return Err(Error::E820TableFull);
    }
    params.e820_table[i] = boot_e820_entry { addr, size, r#type: type_ };
    params.e820_entries += 1;
    Ok(())
}

/// Builds the zero page.
pub fn build(config: &BootParamsConfig) -> Result<boot_params, Error> {
    if config.mem_size < MIN_MEM_SIZE {
        return Err(Error::MemoryTooSmall(config.mem_size));
    }
    let mut params = boot_params::default();
    if let Some(hdr) = config.setup_header {
        params.hdr = hdr;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.loadflags |= LOADED_HIGH;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = config.cmdline_len as u32;
    if params.hdr.kernel_alignment == 0 {
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
    }
    if params.hdr.code32_start == 0 {
        params.hdr.code32_start = KERNEL_START as u32;
    }
    if let Some(initrd) = config.initrd {
        params.hdr.ramdisk_image = initrd.addr as u32;
        params.hdr.ramdisk_size = initrd.size as u32;
    }
    if let Some(addr) = config.setup_data {
        params.hdr.setup_data = addr;
    }

    // Low memory up to the EBDA (the MP table lives there), then everything
    // above 1 MiB. The legacy hole in between is not RAM for the guest.
    add_e820_entry(&mut params, 0, EBDA_START, E820_RAM)?;
    for (start, size) in ram_regions(config.mem_size) {
        let start_hi = start.max(HIGH_MEMORY_START);
        let end = start + size;
        if end > start_hi {
            add_e820_entry(&mut params, start_hi, end - start_hi, E820_RAM)?;
        }
    }
    Ok(params)
}

/// Where to put an initramfs of `size` bytes: page aligned, as high as
/// possible below both the end of low RAM and the kernel's `initrd_addr_max`,
/// and above `kernel_end`. `None` if it does not fit.
pub fn initrd_address(mem_size: u64, kernel_end: u64, size: u64, initrd_addr_max: u32) -> Option<u64> {
    let low_ram_end = ram_regions(mem_size).first().map(|(s, l)| s + l)?;
    let max = if initrd_addr_max == 0 { 0x37ff_ffff } else { u64::from(initrd_addr_max) };
    let ceiling = low_ram_end.min(max + 1);
    let addr = ceiling.checked_sub(size)? & !0xfff;
    (addr >= kernel_end && size > 0).then_some(addr)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{MMIO_END, MMIO_START, SETUP_DATA_START};

    fn entries(p: &boot_params) -> Vec<(u64, u64, u32)> {
        p.e820_table[..p.e820_entries as usize]
            .iter()
            .map(|e| (e.addr, e.size, e.r#type))
            .collect()
    }

    fn config(mem_size: u64) -> BootParamsConfig {
        BootParamsConfig { mem_size, cmdline_len: 10, initrd: None, setup_header: None, setup_data: None }
    }

    #[test]
    fn e820_small_guest() {
        let p = build(&config(128 << 20)).unwrap();
        assert_eq!(
            entries(&p),
            vec![(0, EBDA_START, E820_RAM), (HIGH_MEMORY_START, (128 << 20) - HIGH_MEMORY_START, E820_RAM)]
        );
    }

    #[test]
    fn e820_big_guest_has_a_hole_for_mmio() {
        let mem = 6u64 << 30;
        let p = build(&config(mem)).unwrap();
        assert_eq!(
            entries(&p),
            vec![
                (0, EBDA_START, E820_RAM),
                (HIGH_MEMORY_START, MMIO_START - HIGH_MEMORY_START, E820_RAM),
                (MMIO_END, mem - MMIO_START, E820_RAM),
            ]
        );
    }

    #[test]
    fn header_fields() {
        let mut c = config(256 << 20);
        c.cmdline_len = 42;
        c.initrd = Some(InitrdLocation { addr: 0x0800_0000, size: 12345 });
        let p = build(&c).unwrap();
        let hdr = p.hdr;
        assert_eq!({ hdr.boot_flag }, 0xaa55);
        assert_eq!({ hdr.header }, 0x5372_6448);
        assert_eq!({ hdr.type_of_loader }, 0xff);
        assert_eq!({ hdr.cmd_line_ptr }, CMDLINE_START as u32);
        assert_eq!({ hdr.cmdline_size }, 42);
        assert_eq!({ hdr.ramdisk_image }, 0x0800_0000);
        assert_eq!({ hdr.ramdisk_size }, 12345);
        assert_eq!({ hdr.setup_data }, 0, "no setup_data unless asked");
        c.setup_data = Some(SETUP_DATA_START);
        assert_eq!({ build(&c).unwrap().hdr.setup_data }, SETUP_DATA_START);
    }

    #[test]
    fn rng_seed_entry_is_linux_setup_data() {
        let seed: Vec<u8> = (1..=32).collect();
        let e = rng_seed_setup_data(&seed);
        assert_eq!(e.len(), 16 + 32);
        assert_eq!(u64::from_le_bytes(e[0..8].try_into().unwrap()), 0, "the last entry of the list");
        assert_eq!(u32::from_le_bytes(e[8..12].try_into().unwrap()), 9, "SETUP_RNG_SEED");
        assert_eq!(u32::from_le_bytes(e[12..16].try_into().unwrap()), 32);
        assert_eq!(&e[16..], &seed[..]);
    }

    #[test]
    fn bzimage_header_is_kept() {
        let hdr = setup_header { version: 0x020f, kernel_alignment: 0x20_0000, ..Default::default() };
        let mut c = config(64 << 20);
        c.setup_header = Some(hdr);
        let p = build(&c).unwrap();
        assert_eq!({ p.hdr.version }, 0x020f);
        assert_eq!({ p.hdr.kernel_alignment }, 0x20_0000);
    }

    #[test]
    fn too_little_memory_is_an_error() {
        assert_eq!(build(&config(16 << 20)).unwrap_err(), Error::MemoryTooSmall(16 << 20));
    }

    #[test]
    fn initrd_goes_high_and_aligned() {
        let mem = 128u64 << 20;
        let addr = initrd_address(mem, 0x200_0000, 5000, 0x7fff_ffff).unwrap();
        assert_eq!(addr % 0x1000, 0);
        assert!(addr + 5000 <= mem);
        assert_eq!(mem - addr, 0x2000, "5000 bytes take two pages at the top");
    }

    #[test]
    fn initrd_respects_addr_max_and_kernel_end() {
        let addr = initrd_address(1 << 30, 0x200_0000, 0x1000, 0x0fff_ffff).unwrap();
        assert_eq!(addr, 0x0fff_f000);
        // Larger than the RAM between the kernel and the end of memory.
        assert_eq!(initrd_address(64 << 20, 0x300_0000, 40 << 20, 0), None);
        assert_eq!(initrd_address(64 << 20, 0x300_0000, 0, 0), None);
    }
}
