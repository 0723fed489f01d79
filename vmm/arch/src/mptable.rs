//! The Intel MultiProcessor Specification table (version 1.4) that tells
//! Linux how many CPUs there are and how the IOAPIC is wired, without ACPI.
//!
//! The floating pointer structure goes at [`EBDA_START`] (0x9fc00), the
//! first place Linux looks after the first KiB of memory, so that its scan
//! ends at once; the configuration table follows it directly.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout::{EBDA_START, IOAPIC_PINS, IOAPIC_START, LAPIC_START, LEGACY_HOLE_START, MAX_VCPUS};

const MPF_SIGNATURE: &[u8; 4] = b"_MP_";
const MPC_SIGNATURE: &[u8; 4] = b"PCMP";
const MP_SPEC_REV: u8 = 4;
const MPF_SIZE: usize = 16;
const MPC_HEADER_SIZE: usize = 44;
const MPC_CPU_SIZE: usize = 20;
const MPC_SMALL_ENTRY_SIZE: usize = 8;

const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;

const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;
const LAPIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const IOAPIC_USABLE: u8 = 1;
/// Family 6 in the CPU signature; Linux only prints it.
const CPU_SIGNATURE: u32 = 0x600;
/// FPU and APIC present.
const CPU_FEATURES: u32 = (1 << 0) | (1 << 9);

const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
/// "Conforms to the bus" polarity and trigger mode.
const INT_FLAGS_CONFORMING: u16 = 0;
const BUS_ISA: &[u8; 6] = b"ISA   ";

/// Errors building the MP table.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// Zero vCPUs or more than the table and the guest kernel support.
    #[error("{0} vCPUs requested; between 1 and {MAX_VCPUS} are supported")]
    VcpuCount(u8),
    /// Writing the table into guest memory failed.
    #[error("cannot write the MP table into guest memory")]
    Write,
}

/// Little-endian byte writer for the table's packed structures.
struct Table(Vec<u8>);

impl Table {
    fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }
    fn u16(&mut self, v: u16) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn bytes(&mut self, v: &[u8]) -> &mut Self {
        self.0.extend_from_slice(v);
        self
    }
}

/// The byte that makes `bytes` sum to zero (mod 256).
fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

/// Builds the floating pointer and configuration table for `num_cpus` vCPUs
/// (APIC ids 0..num_cpus, vCPU 0 the boot processor), to be placed at `base`.
pub fn build(num_cpus: u8, base: u64) -> Result<Vec<u8>, Error> {
    if num_cpus == 0 || num_cpus > MAX_VCPUS {
        return Err(Error::VcpuCount(num_cpus));
    }
    let ioapic_id = num_cpus;

    let mut entries = Table(Vec::new());
    let mut count: u16 = 0;
    for cpu in 0..num_cpus {
        let flags = CPU_ENABLED | if cpu == 0 { CPU_BOOTPROCESSOR } else { 0 };
        entries
            .u8(ENTRY_PROCESSOR)
            .u8(cpu)
            .u8(LAPIC_VERSION)
            .u8(flags)
            .u32(CPU_SIGNATURE)
            .u32(CPU_FEATURES)
            .u32(0)
            .u32(0);
        count += 1;
    }
    entries.u8(ENTRY_BUS).u8(0).bytes(BUS_ISA);
    count += 1;
    entries.u8(ENTRY_IOAPIC).u8(ioapic_id).u8(IOAPIC_VERSION).u8(IOAPIC_USABLE).u32(IOAPIC_START as u32);
    count += 1;
    // Bus IRQ n arrives on IOAPIC pin n, as KVM's default GSI routing does it.
    for irq in 0..IOAPIC_PINS as u8 {
        entries
            .u8(ENTRY_IO_INTERRUPT)
            .u8(INT_TYPE_INT)
            .u16(INT_FLAGS_CONFORMING)
            .u8(0)
            .u8(irq)
            .u8(ioapic_id)
            .u8(irq);
        count += 1;
    }
    // The PIC on LINT0 of every local APIC, NMIs on LINT1.
    entries.u8(ENTRY_LOCAL_INTERRUPT).u8(INT_TYPE_EXTINT).u16(INT_FLAGS_CONFORMING).u8(0).u8(0).u8(0xff).u8(0);
    entries.u8(ENTRY_LOCAL_INTERRUPT).u8(INT_TYPE_NMI).u16(INT_FLAGS_CONFORMING).u8(0).u8(0).u8(0xff).u8(1);
    count += 2;

    let config_len = (MPC_HEADER_SIZE + entries.0.len()) as u16;
    let mut config = Table(Vec::with_capacity(config_len as usize));
    config
        .bytes(MPC_SIGNATURE)
        .u16(config_len)
        .u8(MP_SPEC_REV)
        .u8(0) // checksum, below
        .bytes(b"VMRUN   ")
        .bytes(b"MICROVM     ")
        .u32(0) // OEM table pointer
        .u16(0) // OEM table size
        .u16(count)
        .u32(LAPIC_START as u32)
        .u16(0) // extended table length
        .u8(0) // extended table checksum
        .u8(0); // reserved
    debug_assert_eq!(config.0.len(), MPC_HEADER_SIZE);
    config.bytes(&entries.0);
    config.0[7] = checksum(&config.0);

    let mut mpf = Table(Vec::with_capacity(MPF_SIZE));
    mpf.bytes(MPF_SIGNATURE)
        .u32((base + MPF_SIZE as u64) as u32)
        .u8(1) // length in 16-byte units
        .u8(MP_SPEC_REV)
        .u8(0) // checksum, below
        .bytes(&[0; 5]); // feature bytes: 0 = a configuration table is present
    mpf.0[10] = checksum(&mpf.0);

    let mut table = mpf.0;
    table.extend_from_slice(&config.0);
    Ok(table)
}

/// Size of the table for `num_cpus` vCPUs.
pub fn size(num_cpus: u8) -> usize {
    MPF_SIZE
        + MPC_HEADER_SIZE
        + MPC_CPU_SIZE * num_cpus as usize
        + MPC_SMALL_ENTRY_SIZE * (2 + IOAPIC_PINS as usize + 2)
}

/// Writes the MP table for `num_cpus` vCPUs at [`EBDA_START`].
pub fn write(mem: &GuestMemoryMmap, num_cpus: u8) -> Result<(), Error> {
    let table = build(num_cpus, EBDA_START)?;
    debug_assert!(EBDA_START + table.len() as u64 <= LEGACY_HOLE_START);
    mem.write_slice(&table, GuestAddress(EBDA_START)).map_err(|_| Error::Write)
}

#[cfg(test)]
mod tests {
    use super::*;


    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
    }

    #[test]
    fn checksums_are_zero() {
        for n in [1, 2, 7, MAX_VCPUS] {
            let t = build(n, EBDA_START).unwrap();
            assert_eq!(t.len(), size(n));
            assert_eq!(sum(&t[..MPF_SIZE]), 0, "floating pointer checksum, {n} cpus");
            assert_eq!(sum(&t[MPF_SIZE..]), 0, "config table checksum, {n} cpus");
        }
    }

    #[test]
    fn pointers_and_lengths() {
        let t = build(2, EBDA_START).unwrap();
        assert_eq!(&t[0..4], b"_MP_");
        let physptr = u32::from_le_bytes(t[4..8].try_into().unwrap());
        assert_eq!(u64::from(physptr), EBDA_START + 16);
        assert_eq!(&t[16..20], b"PCMP");
        let len = u16::from_le_bytes(t[20..22].try_into().unwrap());
        assert_eq!(len as usize, t.len() - MPF_SIZE);
        let lapic = u32::from_le_bytes(t[16 + 36..16 + 40].try_into().unwrap());
        assert_eq!(u64::from(lapic), LAPIC_START);
    }

    /// Walks the entries the way Linux's `smp_read_mpc` does.
    fn parse(t: &[u8]) -> (Vec<(u8, u8)>, usize, Vec<u8>) {
        let count = u16::from_le_bytes(t[16 + 34..16 + 36].try_into().unwrap()) as usize;
        let mut off = MPF_SIZE + MPC_HEADER_SIZE;
        let (mut cpus, mut irqs, mut ioapics) = (Vec::new(), 0, Vec::new());
        for _ in 0..count {
            match t[off] {
                ENTRY_PROCESSOR => {
                    cpus.push((t[off + 1], t[off + 3]));
                    off += MPC_CPU_SIZE;
                }
                ENTRY_IOAPIC => {
                    ioapics.push(t[off + 1]);
                    off += 8;
                }
                ENTRY_IO_INTERRUPT => {
                    irqs += 1;
                    off += 8;
                }
                ENTRY_BUS | ENTRY_LOCAL_INTERRUPT => off += 8,
                other => panic!("unknown entry type {other}"),
            }
        }
        assert_eq!(off, t.len(), "entry count and table length disagree");
        (cpus, irqs, ioapics)
    }

    #[test]
    fn one_entry_per_cpu_and_only_cpu0_boots() {
        let (cpus, irqs, ioapics) = parse(&build(4, EBDA_START).unwrap());
        assert_eq!(
            cpus,
            vec![(0, CPU_ENABLED | CPU_BOOTPROCESSOR), (1, CPU_ENABLED), (2, CPU_ENABLED), (3, CPU_ENABLED)]
        );
        assert_eq!(irqs, IOAPIC_PINS as usize);
        assert_eq!(ioapics, vec![4], "IOAPIC id follows the CPU ids");
    }

    #[test]
    fn vcpu_count_is_checked() {
        assert_eq!(build(0, EBDA_START), Err(Error::VcpuCount(0)));
        assert_eq!(build(MAX_VCPUS + 1, EBDA_START), Err(Error::VcpuCount(MAX_VCPUS + 1)));
    }

    #[test]
    fn largest_table_fits_below_the_legacy_hole() {
        assert!(EBDA_START + size(MAX_VCPUS) as u64 <= LEGACY_HOLE_START);
    }

    #[test]
    fn written_into_guest_memory() {
        let mem: GuestMemoryMmap = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write(&mem, 2).unwrap();
        let mut sig = [0u8; 4];
        mem.read_slice(&mut sig, GuestAddress(EBDA_START)).unwrap();
        assert_eq!(&sig, b"_MP_");
        // Too little memory to hold it.
        let tiny: GuestMemoryMmap = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        assert_eq!(write(&tiny, 1), Err(Error::Write));
    }
}
