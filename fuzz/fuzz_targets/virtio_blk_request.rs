//! virtio-blk request parsing and execution against an in-memory disk.
#![no_main]

use libfuzzer_sys::fuzz_target;
use virtio_queue::QueueT;
use vmrun_devices::virtio::block::request::{execute, DiskInfo};

fuzz_target!(|data: &[u8]| {
    let Some((mem, mut queue)) = vmrun_fuzz::guest_with_queue(data) else { return };
    let mut disk = vec![0u8; 64 * 512];
    let info = DiskInfo { capacity: 64, read_only: data.first().is_some_and(|b| b & 0x80 != 0), id: [b'f'; 20] };
    let mut buf = Vec::new();
    while let Some(chain) = queue.pop_descriptor_chain(&mem) {
        let head = chain.head_index();
        let used = execute(chain, &mem, &mut disk, &info, &mut buf).map_or(0, |o| o.used_len);
        let _ = queue.add_used(&mem, head, used);
    }
});
