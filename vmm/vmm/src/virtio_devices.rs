//! Attaching virtio-mmio devices to a VM: an MMIO slot and an interrupt
//! each, their queue notifications as ioeventfds, their interrupt as an
//! irqfd, and the `virtio_mmio.device=` parameter that tells Linux where
//! they are.

use std::sync::{Arc, Mutex};

use kvm_ioctls::{IoEventAddress, VmFd};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::error::{Error, Result};
use vmrun_arch::layout::{IOAPIC_PINS, VIRTIO_IRQ_START, VIRTIO_MMIO_SIZE, VIRTIO_MMIO_START};
use vmrun_devices::virtio::handler::VirtioEventHandler;
use crate::snapshot::DeviceKind;
use vmrun_devices::virtio::mmio::{MmioTransport, TransportState, REG_QUEUE_NOTIFY};
use vmrun_devices::virtio::{VirtioDevice, INT_CONFIG};
use vmrun_devices::Bus;

/// A device slot, for snapshots.
#[derive(Debug, Clone)]
pub struct DeviceHandle {
    pub kind: DeviceKind,
    pub transport: Arc<Mutex<MmioTransport>>,
}

impl DeviceHandle {
    /// The transport's state (take it while the vCPUs are paused).
    pub fn save(&self) -> TransportState {
        self.transport.lock().unwrap_or_else(|e| e.into_inner()).save()
    }
}

/// The virtio devices of one VM.
#[derive(Debug, Default)]
pub struct VirtioDevices {
    count: u32,
    handlers: Vec<VirtioEventHandler>,
    cmdline: Vec<String>,
    slots: Vec<DeviceHandle>,
}

impl VirtioDevices {
    /// No devices yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Gives `device` the next MMIO slot and interrupt; with `restore`, the
    /// transport (and the device's queues) resume from a snapshot.
    pub fn attach(
        &mut self,
        vm: &VmFd,
        mem: &GuestMemoryMmap,
        mmio: &mut Bus,
        kind: DeviceKind,
        device: Box<dyn VirtioDevice>,
        restore: Option<&TransportState>,
    ) -> Result<()> {
        let irq = VIRTIO_IRQ_START + self.count;
        if irq >= IOAPIC_PINS {
            return Err(Error::Config(format!("too many virtio devices (at most {})", IOAPIC_PINS - VIRTIO_IRQ_START)));
        }
        let base = VIRTIO_MMIO_START + u64::from(self.count) * VIRTIO_MMIO_SIZE;
        let irqfd = EventFd::new(libc::EFD_NONBLOCK)?;
        vm.register_irqfd(&irqfd, irq).map_err(Error::kvm("KVM_IRQFD"))?;
        let transport = match restore {
            None => MmioTransport::new(device, mem.clone(), irqfd)?,
            Some(state) => MmioTransport::restore(device, mem.clone(), irqfd, state)
                .map_err(|e| Error::Snapshot(format!("device slot {}: {e}", self.count)))?,
        };
        for (i, evt) in transport.queue_evts().iter().enumerate() {
            vm.register_ioevent(evt, &IoEventAddress::Mmio(base + REG_QUEUE_NOTIFY), i as u32)
                .map_err(Error::kvm("KVM_IOEVENTFD"))?;
        }
        let transport = Arc::new(Mutex::new(transport));
        mmio.insert(transport.clone(), base, VIRTIO_MMIO_SIZE).map_err(|e| Error::Config(e.to_string()))?;
        self.handlers.push(VirtioEventHandler::new(transport.clone()));
        self.slots.push(DeviceHandle { kind, transport });
        self.cmdline.push(format!("virtio_mmio.device=4K@{base:#x}:{irq}"));
        self.count += 1;
        Ok(())
    }

    /// The kernel command-line parameters announcing the devices.
    pub fn cmdline(&self) -> String {
        self.cmdline.join(" ")
    }

    /// The device slots, for snapshots.
    pub fn snapshot_handles(&self) -> Vec<DeviceHandle> {
        self.slots.clone()
    }

    /// Tells the restored devices that the guest runs again, once the
    /// interrupt controllers and vCPUs have their snapshot's state (an
    /// interrupt raised before would be lost): vsock resets its transport,
    /// and the disks in the slots `resized` (restored onto images of
    /// another size) raise a configuration-change interrupt, so that the
    /// guest reads their capacity again. Only those: the guest's handler
    /// formats and logs a line for each disk it is told about, a fifth of
    /// the work from a restore to the agent's answer where guest kernel
    /// mode is emulated.
    pub fn after_restore(&self, resized: &[usize]) {
        for (i, slot) in self.slots.iter().enumerate() {
            let mut t = slot.transport.lock().unwrap_or_else(|e| e.into_inner());
            t.after_restore();
            if resized.contains(&i) && matches!(slot.kind, DeviceKind::Block { .. }) && t.device().is_active() {
                t.interrupt().trigger(INT_CONFIG);
            }
        }
    }

    /// The event-loop handlers, to add to the event manager.
    pub fn take_handlers(&mut self) -> Vec<VirtioEventHandler> {
        std::mem::take(&mut self.handlers)
    }
}
