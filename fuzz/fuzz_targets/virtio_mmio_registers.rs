//! The virtio-mmio transport's register file and status state machine,
//! driven by arbitrary register accesses (with an entropy device behind it,
//! activated whenever the input manages to).
#![no_main]

use libfuzzer_sys::fuzz_target;
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;
use vmrun_devices::virtio::mmio::MmioTransport;
use vmrun_devices::virtio::rng::Rng;
use vmrun_devices::BusDevice;

fuzz_target!(|data: &[u8]| {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1_0000)]).expect("memory");
    let Ok(irq) = EventFd::new(libc::EFD_NONBLOCK) else { return };
    let Ok(mut t) = MmioTransport::new(Box::new(Rng::new()), mem, irq) else { return };
    // Each access: offset (u16), width selector, value (u32), read or write.
    for op in data.chunks_exact(8) {
        let offset = u64::from(u16::from_le_bytes([op[0], op[1]]) & 0x1ff);
        let width = [1usize, 2, 4, 8][usize::from(op[2] & 3)];
        let value = u32::from_le_bytes([op[3], op[4], op[5], op[6]]);
        let mut bytes = [0u8; 8];
        bytes[..4].copy_from_slice(&value.to_le_bytes());
        if op[7] & 1 == 0 {
            t.write(offset, &bytes[..width]);
        } else {
            t.read(offset, &mut bytes[..width]);
        }
    }
});
