//! Virtio devices over the MMIO transport (virtio 1.x, "modern" only).
//!
//! [`mmio::MmioTransport`] is the part every device shares: the register
//! file, the status state machine, feature negotiation, queue setup and
//! reset. A device implements [`VirtioDevice`]: what it offers, its config
//! space, and what it does with its queues once the driver activated it.
//! [`handler::VirtioEventHandler`] connects an activated device to the
//! VMM's event loop (queue notifications arrive on ioeventfds; interrupts
//! leave through an irqfd).
//!
//! Everything a device reads from a queue is written by the guest and is
//! treated as hostile: descriptor chains that loop, point outside guest
//! memory or are too short or long end in an error status or a device
//! reset, never a panic or an access outside guest memory.

pub mod block;
pub mod handler;
pub mod mmio;
pub mod net;
pub mod rng;
pub mod vsock;

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU32, Ordering};

use event_manager::EventOps;
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

/// Device type ids (virtio 1.2, 5).
pub const TYPE_NET: u32 = 1;
pub const TYPE_BLOCK: u32 = 2;
pub const TYPE_RNG: u32 = 4;
pub const TYPE_VSOCK: u32 = 19;

/// Feature bit: the device is a modern (virtio 1.x) device.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// Feature bit: the driver uses event-index notification suppression.
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;

/// Interrupt status bit: a used buffer was added to a queue.
pub const INT_USED_RING: u32 = 1;
/// Interrupt status bit: the configuration changed (or the device needs a reset).
pub const INT_CONFIG: u32 = 2;

/// A device's interrupt line: the status bits the driver reads, and the
/// irqfd that raises the interrupt.
#[derive(Debug)]
pub struct Interrupt {
    status: AtomicU32,
    irqfd: EventFd,
}

impl Interrupt {
    /// An interrupt raised through `irqfd`.
    pub fn new(irqfd: EventFd) -> Self {
        Self { status: AtomicU32::new(0), irqfd }
    }

    /// Sets `bits` in the status and raises the interrupt.
    pub fn trigger(&self, bits: u32) {
        self.status.fetch_or(bits, Ordering::SeqCst);
        if let Err(e) = self.irqfd.write(1) {
            log::error!("virtio: cannot raise interrupt: {e}");
        }
    }

    /// The interrupt status register.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// The driver acknowledged `bits`.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// The irqfd, to register with KVM.
    pub fn irqfd(&self) -> &EventFd {
        &self.irqfd
    }
}

/// Why a device refused to activate.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ActivateError {
    #[error("queue {0} is not ready or not valid")]
    BadQueue(usize),
    #[error("device cannot start: {0}")]
    Device(String),
}

/// What a device gets when the driver sets DRIVER_OK.
#[allow(missing_debug_implementations)]
pub struct ActivateContext<'a> {
    pub mem: GuestMemoryMmap,
    /// Every queue the device declared, configured by the driver.
    pub queues: Vec<Queue>,
    /// Features both sides agreed on.
    pub acked_features: u64,
    pub interrupt: &'a std::sync::Arc<Interrupt>,
}

/// One virtio device model.
pub trait VirtioDevice: Send {
    /// Device type id.
    fn device_type(&self) -> u32;
    /// Features the device offers ([`VIRTIO_F_VERSION_1`] is added by the transport).
    fn features(&self) -> u64;
    /// Maximum size of each queue; the number of entries is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Reads the device-specific configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device-specific configuration space (ignored by default).
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// Starts the device with the driver's queues.
    fn activate(&mut self, ctx: ActivateContext<'_>) -> Result<(), ActivateError>;
    /// Stops the device and forgets the queues (driver reset).
    fn reset(&mut self);
    /// Whether the device is active.
    fn is_active(&self) -> bool;
    /// The driver notified queue `index`. `ops` lets the device watch or
    /// stop watching its own descriptors (it must stop watching a
    /// descriptor before closing it).
    fn process_queue(&mut self, index: usize, ops: &mut EventOps);
    /// File descriptors (besides queue notifications) the device wants
    /// watched from activation on, with the events to watch for.
    fn watched_fds(&self) -> Vec<(RawFd, EventSet)> {
        Vec::new()
    }
    /// A watched descriptor is ready.
    fn process_fd(&mut self, _fd: RawFd, _events: EventSet, _ops: &mut EventOps) {}
    /// The queues of an active device, in order, for a snapshot (an
    /// inactive device has none).
    fn queue_states(&self) -> Vec<virtio_queue::QueueState> {
        Vec::new()
    }
    /// Called once after the device was restored from a snapshot and
    /// re-activated, when the VM's interrupt controllers and vCPUs have
    /// their snapshot's state ([`mmio::MmioTransport::after_restore`]; vsock
    /// tells the guest its connections are gone).
    fn after_restore(&mut self) {}
    /// Called on the event loop after a reset: stop watching and close the
    /// descriptors the device added itself while active. (The descriptors
    /// of [`VirtioDevice::watched_fds`] are removed by the caller.)
    fn release_fds(&mut self, _ops: &mut EventOps) {}

    /// The device as a disk, if it is one (a disk slot's image can be
    /// replaced while the VM runs).
    fn as_block_mut(&mut self) -> Option<&mut block::Block> {
        None
    }
}

/// Serves every request the driver queued: each chain goes to `handle`,
/// which returns the bytes it wrote into it (the used length). With
/// notifications suppressed while draining, the ring is checked again after
/// they are re-enabled, so no request is left behind; the interrupt is
/// raised once at the end if the driver wants it.
pub fn drain_queue(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    interrupt: &Interrupt,
    mut handle: impl FnMut(virtio_queue::DescriptorChain<&GuestMemoryMmap>) -> u32,
) {
    drain_queue_until(queue, mem, interrupt, |chain| Some(handle(chain)));
}

/// [`drain_queue`] for a device that may have to stop (a rate limiter
/// refused): when `handle` returns `None` the chain is put back, untouched
/// in the ring, and draining stops with notifications left suppressed (the
/// device comes back by itself, e.g. on its limiter's timer). Returns
/// whether it stopped early.
pub fn drain_queue_until(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    interrupt: &Interrupt,
    mut handle: impl FnMut(virtio_queue::DescriptorChain<&GuestMemoryMmap>) -> Option<u32>,
) -> bool {
    use virtio_queue::{QueueOwnedT, QueueT};
    let mut notify = false;
    let mut stopped = false;
    'drain: loop {
        if let Err(e) = queue.disable_notification(mem) {
            log::warn!("virtio: broken queue: {e}");
            return false;
        }
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            match handle(chain) {
                Some(used) => notify |= complete(queue, mem, head, used),
                None => {
                    queue.go_to_previous_position();
                    stopped = true;
                    break 'drain;
                }
            }
        }
        match queue.enable_notification(mem) {
            Ok(true) => continue,
            Ok(false) => break,
            Err(e) => {
                log::warn!("virtio: broken queue: {e}");
                break;
            }
        }
    }
    if notify {
        interrupt.trigger(INT_USED_RING);
    }
    stopped
}

/// Common helper: puts `chain` back as used with `len` bytes written and
/// tells the driver if it wants to know. Errors here mean the guest's queue
/// memory is broken; they are logged and the request is dropped.
pub fn complete(queue: &mut Queue, mem: &GuestMemoryMmap, head: u16, len: u32) -> bool {
    use virtio_queue::QueueT;
    if let Err(e) = queue.add_used(mem, head, len) {
        log::warn!("virtio: cannot return descriptor {head}: {e}");
        return false;
    }
    queue.needs_notification(mem).unwrap_or(true)
}

/// Copies the part of `config` at `offset` into `data`; bytes past its end
/// read as zero.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else { return };
    if start >= config.len() {
        return;
    }
    let n = data.len().min(config.len() - start);
    data[..n].copy_from_slice(&config[start..start + n]);
}
