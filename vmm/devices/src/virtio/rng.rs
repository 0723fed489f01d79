//! virtio-rng: entropy from the host's `getrandom`, so the guest's pool
//! fills at once instead of slowly from timer jitter.

use std::sync::Arc;

use event_manager::EventOps;
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;

use super::{drain_queue, ActivateContext, ActivateError, Interrupt, VirtioDevice, TYPE_RNG};

/// Queue size.
pub const QUEUE_SIZE: u16 = 64;
/// Most bytes handed out per request.
pub const MAX_REQUEST: usize = 64 * 1024;

struct Active {
    mem: GuestMemoryMmap,
    queue: Queue,
    interrupt: Arc<Interrupt>,
}

/// A virtio entropy device.
#[derive(Default)]
pub struct Rng {
    active: Option<Active>,
}

impl std::fmt::Debug for Rng {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rng").field("active", &self.active.is_some()).finish()
    }
}

/// Fills `buf` from the host's random source.
pub fn host_random(buf: &mut [u8]) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        // SAFETY: getrandom writes at most `rest.len()` bytes into `rest`.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        done += n as usize;
    }
    Ok(())
}

impl Rng {
    /// A new, inactive device.
    pub fn new() -> Self {
        Self::default()
    }
}

/// Fills the writable part of one request; returns the used length.
pub fn fill_request(chain: virtio_queue::DescriptorChain<&GuestMemoryMmap>, mem: &GuestMemoryMmap) -> u32 {
    use std::io::Write;
    let Ok(mut w) = chain.writer(mem) else { return 0 };
    let n = w.available_bytes().min(MAX_REQUEST);
    let mut buf = vec![0u8; n];
    if host_random(&mut buf).is_err() || w.write_all(&buf).is_err() {
        return 0;
    }
    n as u32
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        TYPE_RNG
    }
    fn features(&self) -> u64 {
        0
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn activate(&mut self, mut ctx: ActivateContext<'_>) -> Result<(), ActivateError> {
        let queue = ctx.queues.pop().ok_or(ActivateError::BadQueue(0))?;
        self.active = Some(Active { mem: ctx.mem, queue, interrupt: ctx.interrupt.clone() });
        Ok(())
    }
    fn reset(&mut self) {
        self.active = None;
    }
    fn is_active(&self) -> bool {
        self.active.is_some()
    }

    fn queue_states(&self) -> Vec<virtio_queue::QueueState> {
        self.active.as_ref().map_or_else(Vec::new, |a| vec![a.queue.state()])
    }
    fn process_queue(&mut self, _index: usize, _ops: &mut EventOps) {
        let Some(a) = self.active.as_mut() else { return };
        let mem = &a.mem;
        drain_queue(&mut a.queue, mem, &a.interrupt, |chain| fill_request(chain, mem));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn fills_writable_buffers_with_random_bytes() {
        let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let q = MockSplitQueue::new(&m, 16);
        let chain = q
            .build_desc_chain(&[RawDescriptor::from(SplitDescriptor::new(0x8000, 256, 2, 0))])
            .unwrap();
        assert_eq!(fill_request(chain, &m), 256);
        let mut got = [0u8; 256];
        m.read_slice(&mut got, GuestAddress(0x8000)).unwrap();
        assert!(got.iter().filter(|&&b| b != 0).count() > 200, "not random: {got:?}");
    }

    #[test]
    fn read_only_or_outside_buffers_get_nothing() {
        let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let q = MockSplitQueue::new(&m, 16);
        let ro = q.build_desc_chain(&[RawDescriptor::from(SplitDescriptor::new(0x8000, 256, 0, 0))]).unwrap();
        assert_eq!(fill_request(ro, &m), 0);
        let out = q.build_desc_chain(&[RawDescriptor::from(SplitDescriptor::new(0xff_0000, 256, 2, 0))]).unwrap();
        assert_eq!(fill_request(out, &m), 0);
    }
}
