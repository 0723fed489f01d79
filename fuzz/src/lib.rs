//! Shared pieces of the fuzz targets: turning fuzz input into a guest
//! memory with a virtqueue whose descriptors the input chose.

use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Size of the fuzzed guest memory.
pub const MEM_SIZE: usize = 0x2_0000;
/// Queue size.
pub const QUEUE_SIZE: u16 = 16;
/// Where the input's payload bytes go in guest memory.
pub const DATA_START: u64 = 0x1000;

/// A guest memory and a queue with up to 16 descriptors taken from `input`:
/// each descriptor is 12 bytes (address, length, flags, next: anything
/// goes, including loops and addresses outside guest memory); the rest of
/// the input is copied to guest memory at [`DATA_START`].
pub fn guest_with_queue(input: &[u8]) -> Option<(GuestMemoryMmap, Queue)> {
    let (&count, rest) = input.split_first()?;
    let count = usize::from(count % (QUEUE_SIZE as u8)) + 1;
    if rest.len() < count * 12 {
        return None;
    }
    let (descs, payload) = rest.split_at(count * 12);
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).ok()?;
    let n = payload.len().min(MEM_SIZE - DATA_START as usize);
    mem.write_slice(&payload[..n], GuestAddress(DATA_START)).ok()?;
    let raw: Vec<RawDescriptor> = descs
        .chunks_exact(12)
        .map(|d| {
            let addr = u64::from(u32::from_le_bytes([d[0], d[1], d[2], d[3]]));
            let len = u32::from_le_bytes([d[4], d[5], d[6], d[7]]);
            let flags = u16::from_le_bytes([d[8], d[9]]);
            let next = u16::from_le_bytes([d[10], d[11]]);
            RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
        })
        .collect();
    let q = MockSplitQueue::new(&mem, QUEUE_SIZE);
    q.add_desc_chains(&raw, 0).ok()?;
    let queue: Queue = q.create_queue().ok()?;
    let _ = queue.size();
    Some((mem, queue))
}
