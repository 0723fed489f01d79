//! virtio-net transmit: gathering a frame from the guest's chain.
#![no_main]

use libfuzzer_sys::fuzz_target;
use virtio_queue::QueueT;
use vmrun_devices::virtio::net::read_tx_frame;

fuzz_target!(|data: &[u8]| {
    let Some((mem, mut queue)) = vmrun_fuzz::guest_with_queue(data) else { return };
    let mut frame = Vec::new();
    while let Some(chain) = queue.pop_descriptor_chain(&mem) {
        let head = chain.head_index();
        if read_tx_frame(chain, &mem, &mut frame) {
            assert!(frame.len() <= vmrun_devices::virtio::net::MAX_FRAME);
        }
        let _ = queue.add_used(&mem, head, 0);
    }
});
