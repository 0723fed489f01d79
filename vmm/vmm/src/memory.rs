//! Guest memory: anonymous host memory mapped into the VM.

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::error::{Error, Result};
use vmrun_arch::layout::ram_regions;

/// Allocates `mib` MiB of guest memory (pages are only backed once touched).
pub fn allocate(mib: u32) -> Result<GuestMemoryMmap> {
    let size = u64::from(mib) << 20;
    let ranges: Vec<(GuestAddress, usize)> =
        ram_regions(size).into_iter().map(|(start, len)| (GuestAddress(start), len as usize)).collect();
    GuestMemoryMmap::from_ranges(&ranges).map_err(|e| Error::GuestMemory { mib, reason: e.to_string() })
}

/// Registers every region of `mem` with KVM, one memory slot each.
pub fn register(vm: &VmFd, mem: &GuestMemoryMmap) -> Result<()> {
    for (slot, region) in mem.iter().enumerate() {
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .map_err(|e| Error::GuestMemory { mib: 0, reason: e.to_string() })?;
        let slot_desc = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the region is a live mapping of `memory_size` bytes owned by
        // `mem`, which outlives the VM (the VM is dropped first in `vm::run`).
        unsafe { vm.set_user_memory_region(slot_desc) }.map_err(Error::kvm("KVM_SET_USER_MEMORY_REGION"))?;
    }
    Ok(())
}

/// Host address ranges of the guest memory mappings, for accounting.
pub fn host_ranges(mem: &GuestMemoryMmap) -> Vec<(u64, u64)> {
    mem.iter()
        .filter_map(|r| {
            let host = r.get_host_address(vm_memory::MemoryRegionAddress(0)).ok()? as u64;
            Some((host, host + r.len()))
        })
        .collect()
}

/// Total guest memory in bytes.
pub fn total_size(mem: &GuestMemoryMmap) -> u64 {
    mem.iter().map(|r| r.len()).sum()
}
