//! Per-vCPU adjustments of the CPUID table KVM supports.

use kvm_bindings::kvm_cpuid_entry2;

/// CPUID.1:ECX bit 31: running under a hypervisor.
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
/// CPUID.1:EDX bit 28: the logical-processor count in EBX[23:16] is valid.
const LEAF1_EDX_HTT: u32 = 1 << 28;

/// Adjusts KVM's supported CPUID entries for vCPU `vcpu_id` of `vcpu_count`:
/// its APIC id, the logical-processor count, the hypervisor bit, and the
/// topology leaves (one core per vCPU, one thread per core).
pub fn adjust(entries: &mut [kvm_cpuid_entry2], vcpu_id: u8, vcpu_count: u8) {
    for e in entries.iter_mut() {
        match e.function {
            0x1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | (u32::from(vcpu_id) << 24) | (u32::from(vcpu_count) << 16);
                e.ecx |= LEAF1_ECX_HYPERVISOR;
                if vcpu_count > 1 {
                    e.edx |= LEAF1_EDX_HTT;
                } else {
                    e.edx &= !LEAF1_EDX_HTT;
                }
            }
            0x4 => {
                // EAX[31:26]: cores per package - 1.
                e.eax = (e.eax & 0x03ff_ffff) | (u32::from(vcpu_count.saturating_sub(1)) << 26);
            }
            0xb | 0x1f => {
                // Extended topology: level 0 is SMT (1 thread), level 1 core.
                e.edx = u32::from(vcpu_id);
                match e.index {
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = 0x100;
                    }
                    1 => {
                        e.eax = bits_for(vcpu_count);
                        e.ebx = u32::from(vcpu_count);
                        e.ecx = 0x201;
                    }
                    _ => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = e.index;
                    }
                }
            }
            _ => {}
        }
    }
}

/// Number of APIC-id bits needed to number `n` cores.
fn bits_for(n: u8) -> u32 {
    u32::from(n.max(1)).next_power_of_two().trailing_zeros()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 { function, index, ebx: 0xdead_0000, ..Default::default() }
    }

    #[test]
    fn apic_id_and_count_in_leaf_1() {
        let mut e = [entry(1, 0)];
        adjust(&mut e, 3, 4);
        assert_eq!(e[0].ebx >> 24, 3);
        assert_eq!((e[0].ebx >> 16) & 0xff, 4);
        assert_ne!(e[0].ecx & LEAF1_ECX_HYPERVISOR, 0);
        assert_ne!(e[0].edx & LEAF1_EDX_HTT, 0);
    }

    #[test]
    fn topology_leaves() {
        let mut e = [entry(0xb, 0), entry(0xb, 1), entry(0xb, 2)];
        adjust(&mut e, 2, 3);
        assert!(e.iter().all(|x| x.edx == 2));
        assert_eq!((e[0].ebx, e[0].ecx), (1, 0x100));
        assert_eq!((e[1].eax, e[1].ebx, e[1].ecx), (2, 3, 0x201));
        assert_eq!((e[2].eax, e[2].ebx), (0, 0));
    }

    #[test]
    fn apic_id_bits() {
        assert_eq!(bits_for(1), 0);
        assert_eq!(bits_for(2), 1);
        assert_eq!(bits_for(3), 2);
        assert_eq!(bits_for(32), 5);
    }
}
