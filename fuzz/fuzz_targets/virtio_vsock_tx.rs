//! virtio-vsock: reading and parsing the packets a guest transmits.
#![no_main]

use libfuzzer_sys::fuzz_target;
use virtio_queue::QueueT;
use vmrun_devices::virtio::vsock::packet::{parse, read_packet, HEADER_SIZE, MAX_PAYLOAD};

fuzz_target!(|data: &[u8]| {
    // The header parser alone, on the raw input.
    if let Ok(h) = parse(&data[..data.len().min(HEADER_SIZE)]) {
        assert!(h.len <= MAX_PAYLOAD);
    }
    // Whole packets from a queue the input built.
    let Some((mem, mut queue)) = vmrun_fuzz::guest_with_queue(data) else { return };
    let mut payload = Vec::new();
    while let Some(chain) = queue.pop_descriptor_chain(&mem) {
        let head = chain.head_index();
        if let Ok(h) = read_packet(chain, &mem, &mut payload) {
            assert!(payload.len() <= h.len as usize);
        }
        let _ = queue.add_used(&mem, head, 0);
    }
});
