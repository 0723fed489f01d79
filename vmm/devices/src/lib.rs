//! The devices of a vmrun guest, and the buses that route the guest's port
//! and MMIO accesses to them.
//!
//! Legacy devices live in `legacy/` (serial console, i8042 reset, CMOS
//! clock); `boot_marker` is vmrun's own boot-time probe; `rate_limiter`
//! bounds what a guest may take of a device's bandwidth and operations.

pub mod boot_marker;
pub mod bus;
pub mod legacy;
pub mod rate_limiter;
pub mod virtio;

pub use bus::{Bus, BusDevice};

use vm_superio::Trigger;
use vmm_sys_util::eventfd::EventFd;

/// A `vm-superio` trigger that writes to an eventfd (an interrupt through
/// irqfd, or an exit request to the event loop).
#[derive(Debug)]
pub struct EventFdTrigger(pub EventFd);

impl Trigger for EventFdTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

impl EventFdTrigger {
    /// A trigger writing to a duplicate of `evt`.
    pub fn try_clone(evt: &EventFd) -> std::io::Result<Self> {
        evt.try_clone().map(EventFdTrigger)
    }
}
