//! virtio-rng request handling.
#![no_main]

use libfuzzer_sys::fuzz_target;
use virtio_queue::QueueT;
use vmrun_devices::virtio::rng::fill_request;

fuzz_target!(|data: &[u8]| {
    let Some((mem, mut queue)) = vmrun_fuzz::guest_with_queue(data) else { return };
    while let Some(chain) = queue.pop_descriptor_chain(&mem) {
        let head = chain.head_index();
        let len = fill_request(chain, &mem);
        let _ = queue.add_used(&mem, head, len);
    }
});
