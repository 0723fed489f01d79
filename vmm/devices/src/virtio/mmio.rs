//! The virtio-mmio transport, version 2 (virtio 1.2, 4.2.2): the register
//! file a driver programs, the device status state machine, feature
//! negotiation and queue setup, written once for every device.
//!
//! The driver is the guest kernel, so every register write is checked: out
//! of order status changes, feature or queue writes at the wrong time,
//! oversized queues and odd access widths are ignored (and logged); a
//! device that cannot start with what the driver set up is marked
//! DEVICE_NEEDS_RESET instead of being started.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::{ActivateContext, Interrupt, VirtioDevice, INT_CONFIG, VIRTIO_F_VERSION_1};
use crate::BusDevice;

const MMIO_MAGIC: u32 = 0x7472_6976; // "virt"
const MMIO_VERSION: u32 = 2;
const VENDOR_ID: u32 = 0x4e55_5256; // "VRUN"

const REG_MAGIC: u64 = 0x000;
const REG_VERSION: u64 = 0x004;
const REG_DEVICE_ID: u64 = 0x008;
const REG_VENDOR_ID: u64 = 0x00c;
const REG_DEVICE_FEATURES: u64 = 0x010;
const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
const REG_DRIVER_FEATURES: u64 = 0x020;
const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
const REG_QUEUE_SEL: u64 = 0x030;
const REG_QUEUE_NUM_MAX: u64 = 0x034;
const REG_QUEUE_NUM: u64 = 0x038;
const REG_QUEUE_READY: u64 = 0x044;
/// Offset of the queue notification register (an ioeventfd covers it).
pub const REG_QUEUE_NOTIFY: u64 = 0x050;
const REG_INTERRUPT_STATUS: u64 = 0x060;
const REG_INTERRUPT_ACK: u64 = 0x064;
const REG_STATUS: u64 = 0x070;
const REG_QUEUE_DESC_LOW: u64 = 0x080;
const REG_QUEUE_DESC_HIGH: u64 = 0x084;
const REG_QUEUE_AVAIL_LOW: u64 = 0x090;
const REG_QUEUE_AVAIL_HIGH: u64 = 0x094;
const REG_QUEUE_USED_LOW: u64 = 0x0a0;
const REG_QUEUE_USED_HIGH: u64 = 0x0a4;
const REG_CONFIG_GENERATION: u64 = 0x0fc;
const CONFIG_SPACE: u64 = 0x100;

/// Device status bits (virtio 1.2, 2.1).
pub mod status {
    pub const ACKNOWLEDGE: u32 = 1;
    pub const DRIVER: u32 = 2;
    pub const DRIVER_OK: u32 = 4;
    pub const FEATURES_OK: u32 = 8;
    pub const DEVICE_NEEDS_RESET: u32 = 64;
    pub const FAILED: u32 = 128;
}
use status::*;

/// A queue's driver-visible setup and ring positions, for a snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    pub max_size: u16,
    pub size: u16,
    pub ready: bool,
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx_enabled: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
}

impl From<QueueState> for QueueSnapshot {
    fn from(q: QueueState) -> Self {
        Self {
            max_size: q.max_size,
            size: q.size,
            ready: q.ready,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

impl From<QueueSnapshot> for QueueState {
    fn from(q: QueueSnapshot) -> Self {
        Self {
            max_size: q.max_size,
            size: q.size,
            ready: q.ready,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

/// The transport's state (and its device's queues), for a snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransportState {
    pub device_type: u32,
    pub status: u32,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub driver_features: u64,
    pub queue_sel: u32,
    pub config_generation: u32,
    pub interrupt_status: u32,
    pub queues: Vec<QueueSnapshot>,
}

/// Why a transport could not be restored.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("snapshot holds a device of type {found} where type {expected} is attached")]
    DeviceType { expected: u32, found: u32 },
    #[error("snapshot holds {found} queues for a device with {expected}")]
    QueueCount { expected: usize, found: usize },
    #[error("invalid queue {0} in snapshot: {1}")]
    Queue(usize, String),
    #[error("device cannot resume: {0}")]
    Activate(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// A virtio device behind its MMIO register window.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    interrupt: Arc<Interrupt>,
    queues: Vec<Queue>,
    queue_evts: Vec<EventFd>,
    activate_evt: EventFd,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    config_generation: u32,
}

impl std::fmt::Debug for MmioTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioTransport")
            .field("type", &self.device.device_type())
            .field("status", &self.status)
            .finish()
    }
}

fn new_queues(device: &dyn VirtioDevice) -> std::io::Result<Vec<Queue>> {
    device
        .queue_max_sizes()
        .iter()
        .map(|&max| Queue::new(max).map_err(|e| std::io::Error::other(format!("queue of {max}: {e}"))))
        .collect()
}

impl MmioTransport {
    /// Wraps `device`, raising its interrupts through `irqfd`.
    pub fn new(device: Box<dyn VirtioDevice>, mem: GuestMemoryMmap, irqfd: EventFd) -> std::io::Result<Self> {
        let queues = new_queues(device.as_ref())?;
        let queue_evts = (0..queues.len())
            .map(|_| EventFd::new(libc::EFD_NONBLOCK))
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok(Self {
            device,
            mem,
            interrupt: Arc::new(Interrupt::new(irqfd)),
            queues,
            queue_evts,
            activate_evt: EventFd::new(libc::EFD_NONBLOCK)?,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            config_generation: 0,
        })
    }

    /// One eventfd per queue: register each as an ioeventfd on
    /// [`REG_QUEUE_NOTIFY`] with the queue index as data.
    pub fn queue_evts(&self) -> &[EventFd] {
        &self.queue_evts
    }

    /// Signalled when the device was activated or reset.
    pub fn activate_evt(&self) -> &EventFd {
        &self.activate_evt
    }

    /// The interrupt (its irqfd must be registered with KVM).
    pub fn interrupt(&self) -> &Arc<Interrupt> {
        &self.interrupt
    }

    /// The device.
    pub fn device(&self) -> &dyn VirtioDevice {
        self.device.as_ref()
    }

    /// The device, mutably (event handling).
    pub fn device_mut(&mut self) -> &mut dyn VirtioDevice {
        self.device.as_mut()
    }

    /// The device status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// The state to put in a snapshot (take it while the vCPUs are paused).
    pub fn save(&self) -> TransportState {
        let queues = if self.device.is_active() {
            self.device.queue_states().into_iter().map(QueueSnapshot::from).collect()
        } else {
            self.queues.iter().map(|q| QueueSnapshot::from(q.state())).collect()
        };
        TransportState {
            device_type: self.device.device_type(),
            status: self.status,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            queue_sel: self.queue_sel,
            config_generation: self.config_generation,
            interrupt_status: self.interrupt.status(),
            queues,
        }
    }

    /// Rebuilds a transport around a fresh `device` from `state` (which
    /// comes from a file, so it is checked like guest input), re-activating
    /// the device if the driver had.
    pub fn restore(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        irqfd: EventFd,
        state: &TransportState,
    ) -> Result<Self, RestoreError> {
        let mut t = Self::new(device, mem, irqfd)?;
        let expected = t.device.device_type();
        if state.device_type != expected {
            return Err(RestoreError::DeviceType { expected, found: state.device_type });
        }
        let max_sizes = t.device.queue_max_sizes().to_vec();
        if state.queues.len() != max_sizes.len() {
            return Err(RestoreError::QueueCount { expected: max_sizes.len(), found: state.queues.len() });
        }
        let mut queues = Vec::with_capacity(max_sizes.len());
        for (i, (q, max)) in state.queues.iter().zip(&max_sizes).enumerate() {
            if q.max_size != *max {
                return Err(RestoreError::Queue(i, format!("max size {} instead of {max}", q.max_size)));
            }
            queues.push(Queue::try_from(QueueState::from(*q)).map_err(|e| RestoreError::Queue(i, e.to_string()))?);
        }
        t.status = state.status;
        t.device_features_sel = state.device_features_sel;
        t.driver_features_sel = state.driver_features_sel;
        t.driver_features = state.driver_features;
        t.queue_sel = state.queue_sel;
        t.config_generation = state.config_generation;
        t.interrupt.status.store(state.interrupt_status, std::sync::atomic::Ordering::SeqCst);
        if state.status & DRIVER_OK != 0 {
            if let Some(bad) = queues.iter().position(|q| !q.ready() || !q.is_valid(&t.mem)) {
                return Err(RestoreError::Queue(bad, "not ready or outside guest memory".into()));
            }
            t.device
                .activate(ActivateContext {
                    mem: t.mem.clone(),
                    queues,
                    acked_features: t.driver_features,
                    interrupt: &t.interrupt,
                })
                .map_err(|e| RestoreError::Activate(e.to_string()))?;
        } else {
            t.queues = queues;
        }
        Ok(t)
    }

    /// Tells a restored device that its guest is about to run again
    /// ([`VirtioDevice::after_restore`]; vsock resets its transport and
    /// raises an interrupt). Call it once the VM's interrupt controllers
    /// and vCPUs have their snapshot's state: an interrupt raised before
    /// would be overwritten by that state, and lost.
    pub fn after_restore(&mut self) {
        if self.device.is_active() {
            self.device.after_restore();
        }
    }

    fn offered_features(&self) -> u64 {
        self.device.features() | VIRTIO_F_VERSION_1
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        let can_configure = self.status & FEATURES_OK != 0 && self.status & DRIVER_OK == 0;
        if !can_configure {
            log::warn!("virtio: queue configured outside of feature negotiation and DRIVER_OK; ignored");
            return None;
        }
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn reset(&mut self) {
        if self.device.is_active() {
            self.device.reset();
        }
        match new_queues(self.device.as_ref()) {
            Ok(q) => self.queues = q,
            Err(e) => log::error!("virtio: cannot recreate queues on reset: {e}"),
        }
        self.status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        self.interrupt.ack(u32::MAX);
        let _ = self.activate_evt.write(1);
    }

    fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        if value & FAILED != 0 {
            self.status |= FAILED;
            return;
        }
        let old = self.status;
        if value & old != old {
            log::warn!("virtio: driver cleared status bits ({old:#x} -> {value:#x}) without a reset; ignored");
            return;
        }
        match (old, value & !old) {
            (0, ACKNOWLEDGE) => self.status = value,
            (ACKNOWLEDGE, DRIVER) => self.status = value,
            (x, FEATURES_OK) if x == ACKNOWLEDGE | DRIVER => {
                let offered = self.offered_features();
                if self.driver_features & !offered != 0 || self.driver_features & VIRTIO_F_VERSION_1 == 0 {
                    log::warn!(
                        "virtio: driver features {:#x} not acceptable (offered {offered:#x}); FEATURES_OK refused",
                        self.driver_features
                    );
                } else {
                    self.status = value;
                }
            }
            (x, DRIVER_OK) if x == ACKNOWLEDGE | DRIVER | FEATURES_OK => self.activate(value),
            (old, new) => {
                log::warn!("virtio: invalid status transition {old:#x} + {new:#x}; ignored");
            }
        }
    }

    fn activate(&mut self, value: u32) {
        let result = self
            .queues
            .iter()
            .position(|q| !q.ready() || !q.is_valid(&self.mem))
            .map_or_else(
                || {
                    self.device.activate(ActivateContext {
                        mem: self.mem.clone(),
                        // The device owns the queues from here on; a reset
                        // makes new ones.
                        queues: std::mem::take(&mut self.queues),
                        acked_features: self.driver_features,
                        interrupt: &self.interrupt,
                    })
                },
                |bad| Err(super::ActivateError::BadQueue(bad)),
            );
        match result {
            Ok(()) => {
                self.status = value;
                let _ = self.activate_evt.write(1);
            }
            Err(e) => {
                log::warn!("virtio: device type {} not started: {e}", self.device.device_type());
                self.status |= DEVICE_NEEDS_RESET;
                self.interrupt.trigger(INT_CONFIG);
            }
        }
    }

    fn read_register(&self, offset: u64) -> u32 {
        let sel = self.queue_sel as usize;
        let max = self.device.queue_max_sizes().get(sel).copied();
        match offset {
            REG_MAGIC => MMIO_MAGIC,
            REG_VERSION => MMIO_VERSION,
            REG_DEVICE_ID => self.device.device_type(),
            REG_VENDOR_ID => VENDOR_ID,
            REG_DEVICE_FEATURES => match self.device_features_sel {
                0 => self.offered_features() as u32,
                1 => (self.offered_features() >> 32) as u32,
                _ => 0,
            },
            REG_QUEUE_NUM_MAX => max.map_or(0, u32::from),
            REG_QUEUE_READY if self.status & DRIVER_OK != 0 => u32::from(max.is_some()),
            REG_QUEUE_READY => self.queues.get(sel).map_or(0, |q| u32::from(q.ready())),
            REG_INTERRUPT_STATUS => self.interrupt.status(),
            REG_STATUS => self.status,
            REG_CONFIG_GENERATION => self.config_generation,
            _ => 0,
        }
    }

    fn write_register(&mut self, offset: u64, v: u32) {
        let features_phase = self.status == ACKNOWLEDGE | DRIVER;
        match offset {
            REG_DEVICE_FEATURES_SEL => self.device_features_sel = v,
            REG_DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            REG_DRIVER_FEATURES if features_phase => match self.driver_features_sel {
                0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(v),
                1 => self.driver_features = (self.driver_features & 0xffff_ffff) | (u64::from(v) << 32),
                _ => {}
            },
            REG_DRIVER_FEATURES => log::warn!("virtio: driver features written outside negotiation; ignored"),
            REG_QUEUE_SEL => self.queue_sel = v,
            REG_QUEUE_NUM => {
                if let Some(q) = self.selected_queue() {
                    q.set_size(v as u16);
                }
            }
            REG_QUEUE_READY => {
                if let Some(q) = self.selected_queue() {
                    q.set_ready(v == 1);
                }
            }
            REG_QUEUE_DESC_LOW => self.selected_queue().map_or((), |q| q.set_desc_table_address(Some(v), None)),
            REG_QUEUE_DESC_HIGH => self.selected_queue().map_or((), |q| q.set_desc_table_address(None, Some(v))),
            REG_QUEUE_AVAIL_LOW => self.selected_queue().map_or((), |q| q.set_avail_ring_address(Some(v), None)),
            REG_QUEUE_AVAIL_HIGH => self.selected_queue().map_or((), |q| q.set_avail_ring_address(None, Some(v))),
            REG_QUEUE_USED_LOW => self.selected_queue().map_or((), |q| q.set_used_ring_address(Some(v), None)),
            REG_QUEUE_USED_HIGH => self.selected_queue().map_or((), |q| q.set_used_ring_address(None, Some(v))),
            REG_QUEUE_NOTIFY => {
                // Normally caught by the ioeventfd; this path serves VMs
                // without one (and tests).
                if let Some(evt) = self.queue_evts.get(v as usize) {
                    let _ = evt.write(1);
                }
            }
            REG_INTERRUPT_ACK => self.interrupt.ack(v),
            REG_STATUS => self.set_status(v),
            _ => log::debug!("virtio: write {v:#x} to read-only or unknown register {offset:#x}"),
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE {
            self.device.read_config(offset - CONFIG_SPACE, data);
        } else if data.len() == 4 {
            data.copy_from_slice(&self.read_register(offset).to_le_bytes());
        } else {
            data.fill(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE {
            self.device.write_config(offset - CONFIG_SPACE, data);
            self.config_generation = self.config_generation.wrapping_add(1);
        } else if let Ok(bytes) = <[u8; 4]>::try_from(data) {
            self.write_register(offset, u32::from_le_bytes(bytes));
        } else {
            log::warn!("virtio: {}-byte write to register {offset:#x}; ignored", data.len());
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::virtio::ActivateError;
    use event_manager::EventOps;
    use vm_memory::GuestAddress;

    /// A device that records what happens to it.
    #[derive(Default)]
    pub struct Dummy {
        pub active: bool,
        pub resets: usize,
        pub config: [u8; 8],
        pub fail_activation: bool,
    }

    impl VirtioDevice for Dummy {
        fn device_type(&self) -> u32 {
            42
        }
        fn features(&self) -> u64 {
            1 << 3
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16, 8]
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            crate::virtio::read_config_bytes(&self.config, offset, data);
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) {
            if let Some(dst) = self.config.get_mut(offset as usize..offset as usize + data.len()) {
                dst.copy_from_slice(data);
            }
        }
        fn activate(&mut self, ctx: ActivateContext<'_>) -> Result<(), ActivateError> {
            assert_eq!(ctx.queues.len(), 2);
            if self.fail_activation {
                return Err(ActivateError::Device("refused".into()));
            }
            self.active = true;
            Ok(())
        }
        fn reset(&mut self) {
            self.active = false;
            self.resets += 1;
        }
        fn is_active(&self) -> bool {
            self.active
        }
        fn process_queue(&mut self, _: usize, _: &mut EventOps) {}
    }

    pub fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    pub fn transport(dev: Dummy) -> MmioTransport {
        MmioTransport::new(Box::new(dev), mem(), EventFd::new(libc::EFD_NONBLOCK).unwrap()).unwrap()
    }

    pub fn rd(t: &mut MmioTransport, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    pub fn wr(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    /// Drives the transport the way Linux's virtio_mmio driver does, with
    /// queues placed at `base`, `base + 0x1000`, ...
    pub fn bring_up(t: &mut MmioTransport, features: u64) {
        wr(t, REG_STATUS, ACKNOWLEDGE);
        wr(t, REG_STATUS, ACKNOWLEDGE | DRIVER);
        wr(t, REG_DRIVER_FEATURES_SEL, 0);
        wr(t, REG_DRIVER_FEATURES, features as u32);
        wr(t, REG_DRIVER_FEATURES_SEL, 1);
        wr(t, REG_DRIVER_FEATURES, (features >> 32) as u32);
        wr(t, REG_STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
        let n = t.device().queue_max_sizes().len();
        for i in 0..n as u32 {
            let base = 0x10000 + u64::from(i) * 0x4000;
            wr(t, REG_QUEUE_SEL, i);
            let max = rd(t, REG_QUEUE_NUM_MAX);
            wr(t, REG_QUEUE_NUM, max);
            wr(t, REG_QUEUE_DESC_LOW, base as u32);
            wr(t, REG_QUEUE_DESC_HIGH, 0);
            wr(t, REG_QUEUE_AVAIL_LOW, (base + 0x1000) as u32);
            wr(t, REG_QUEUE_AVAIL_HIGH, 0);
            wr(t, REG_QUEUE_USED_LOW, (base + 0x2000) as u32);
            wr(t, REG_QUEUE_USED_HIGH, 0);
            wr(t, REG_QUEUE_READY, 1);
        }
        wr(t, REG_STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
    }

    #[test]
    fn identity_registers() {
        let mut t = transport(Dummy::default());
        assert_eq!(rd(&mut t, REG_MAGIC), MMIO_MAGIC);
        assert_eq!(rd(&mut t, REG_VERSION), 2);
        assert_eq!(rd(&mut t, REG_DEVICE_ID), 42);
        wr(&mut t, REG_DEVICE_FEATURES_SEL, 0);
        assert_eq!(rd(&mut t, REG_DEVICE_FEATURES), 1 << 3);
        wr(&mut t, REG_DEVICE_FEATURES_SEL, 1);
        assert_eq!(rd(&mut t, REG_DEVICE_FEATURES), 1, "VERSION_1");
        wr(&mut t, REG_DEVICE_FEATURES_SEL, 7);
        assert_eq!(rd(&mut t, REG_DEVICE_FEATURES), 0);
    }

    #[test]
    fn full_bring_up_activates_the_device() {
        let mut t = transport(Dummy::default());
        bring_up(&mut t, VIRTIO_F_VERSION_1 | (1 << 3));
        assert_eq!(t.status(), ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
        assert!(t.device().is_active());
        assert_eq!(t.activate_evt().read().unwrap(), 1);
    }

    #[test]
    fn legacy_driver_without_version_1_is_refused() {
        let mut t = transport(Dummy::default());
        bring_up(&mut t, 1 << 3);
        assert_eq!(t.status() & FEATURES_OK, 0);
        assert!(!t.device().is_active());
    }

    #[test]
    fn features_the_device_did_not_offer_are_refused() {
        let mut t = transport(Dummy::default());
        bring_up(&mut t, VIRTIO_F_VERSION_1 | (1 << 4));
        assert!(!t.device().is_active());
    }

    #[test]
    fn status_bits_out_of_order_are_ignored() {
        let mut t = transport(Dummy::default());
        wr(&mut t, REG_STATUS, DRIVER_OK);
        assert_eq!(t.status(), 0);
        wr(&mut t, REG_STATUS, ACKNOWLEDGE);
        wr(&mut t, REG_STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
        assert_eq!(t.status(), ACKNOWLEDGE);
        wr(&mut t, REG_STATUS, ACKNOWLEDGE | DRIVER);
        wr(&mut t, REG_STATUS, ACKNOWLEDGE);
        assert_eq!(t.status(), ACKNOWLEDGE | DRIVER, "clearing a bit needs a reset");
        wr(&mut t, REG_STATUS, ACKNOWLEDGE | DRIVER | DRIVER_OK);
        assert!(!t.device().is_active(), "DRIVER_OK before FEATURES_OK");
        wr(&mut t, REG_STATUS, FAILED);
        assert_ne!(t.status() & FAILED, 0);
    }

    #[test]
    fn queues_cannot_change_after_driver_ok() {
        let mut t = transport(Dummy::default());
        bring_up(&mut t, VIRTIO_F_VERSION_1);
        wr(&mut t, REG_QUEUE_SEL, 0);
        wr(&mut t, REG_QUEUE_READY, 0);
        assert_eq!(rd(&mut t, REG_QUEUE_READY), 1);
        wr(&mut t, REG_QUEUE_SEL, 99);
        assert_eq!(rd(&mut t, REG_QUEUE_NUM_MAX), 0, "no such queue");
    }

    #[test]
    fn bad_queue_means_needs_reset_not_activation() {
        let mut t = transport(Dummy::default());
        wr(&mut t, REG_STATUS, ACKNOWLEDGE);
        wr(&mut t, REG_STATUS, ACKNOWLEDGE | DRIVER);
        wr(&mut t, REG_DRIVER_FEATURES_SEL, 1);
        wr(&mut t, REG_DRIVER_FEATURES, 1);
        wr(&mut t, REG_STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
        // Queue 0 ready but its rings are outside guest memory; queue 1 never set up.
        wr(&mut t, REG_QUEUE_SEL, 0);
        wr(&mut t, REG_QUEUE_NUM, 16);
        wr(&mut t, REG_QUEUE_DESC_LOW, 0xffff_0000);
        wr(&mut t, REG_QUEUE_DESC_HIGH, 0xffff);
        wr(&mut t, REG_QUEUE_READY, 1);
        wr(&mut t, REG_STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
        assert!(!t.device().is_active());
        assert_ne!(t.status() & DEVICE_NEEDS_RESET, 0);
        assert_eq!(t.interrupt().status() & INT_CONFIG, INT_CONFIG);
    }

    #[test]
    fn device_refusal_means_needs_reset() {
        let mut t = transport(Dummy { fail_activation: true, ..Default::default() });
        bring_up(&mut t, VIRTIO_F_VERSION_1);
        assert_ne!(t.status() & DEVICE_NEEDS_RESET, 0);
        assert_eq!(t.status() & DRIVER_OK, 0);
    }

    #[test]
    fn reset_stops_the_device_and_allows_a_new_bring_up() {
        let mut t = transport(Dummy::default());
        bring_up(&mut t, VIRTIO_F_VERSION_1);
        wr(&mut t, REG_STATUS, 0);
        assert_eq!(t.status(), 0);
        assert!(!t.device().is_active());
        wr(&mut t, REG_QUEUE_SEL, 0);
        assert_eq!(rd(&mut t, REG_QUEUE_READY), 0, "queues are reset too");
        bring_up(&mut t, VIRTIO_F_VERSION_1);
        assert!(t.device().is_active());
    }

    #[test]
    fn save_and_restore_an_active_device() {
        let mut t = transport(Dummy::default());
        bring_up(&mut t, VIRTIO_F_VERSION_1 | (1 << 3));
        t.interrupt().trigger(1);
        let state = t.save();
        // The Dummy hands back no queue states while active: it keeps none.
        assert_eq!(state.status & DRIVER_OK, DRIVER_OK);
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let err = MmioTransport::restore(Box::new(Dummy::default()), mem(), irq, &state).unwrap_err();
        assert!(matches!(err, RestoreError::QueueCount { expected: 2, found: 0 }), "{err}");
    }

    #[test]
    fn save_and_restore_during_negotiation() {
        let mut t = transport(Dummy::default());
        wr(&mut t, REG_STATUS, ACKNOWLEDGE);
        wr(&mut t, REG_STATUS, ACKNOWLEDGE | DRIVER);
        wr(&mut t, REG_DRIVER_FEATURES_SEL, 1);
        wr(&mut t, REG_DRIVER_FEATURES, 1);
        wr(&mut t, REG_STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
        wr(&mut t, REG_QUEUE_SEL, 1);
        wr(&mut t, REG_QUEUE_NUM, 4);
        let state = t.save();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut r = MmioTransport::restore(Box::new(Dummy::default()), mem(), irq, &state).unwrap();
        assert_eq!(r.save(), state);
        assert_eq!(r.status(), ACKNOWLEDGE | DRIVER | FEATURES_OK);
        // Negotiation goes on where it stopped.
        for i in 0..2u32 {
            let base = 0x10000 + u64::from(i) * 0x4000;
            wr(&mut r, REG_QUEUE_SEL, i);
            wr(&mut r, REG_QUEUE_DESC_LOW, base as u32);
            wr(&mut r, REG_QUEUE_AVAIL_LOW, (base + 0x1000) as u32);
            wr(&mut r, REG_QUEUE_USED_LOW, (base + 0x2000) as u32);
            wr(&mut r, REG_QUEUE_READY, 1);
        }
        wr(&mut r, REG_STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
        assert!(r.device().is_active());
    }

    #[test]
    fn restore_rejects_mismatched_state() {
        let t = transport(Dummy::default());
        let mut state = t.save();
        state.device_type = 2;
        let irq = || EventFd::new(libc::EFD_NONBLOCK).unwrap();
        assert!(matches!(
            MmioTransport::restore(Box::new(Dummy::default()), mem(), irq(), &state),
            Err(RestoreError::DeviceType { expected: 42, found: 2 })
        ));
        let mut state = t.save();
        state.queues[0].max_size = 1024;
        assert!(matches!(
            MmioTransport::restore(Box::new(Dummy::default()), mem(), irq(), &state),
            Err(RestoreError::Queue(0, _))
        ));
        let mut state = t.save();
        state.status = ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK;
        assert!(matches!(
            MmioTransport::restore(Box::new(Dummy::default()), mem(), irq(), &state),
            Err(RestoreError::Queue(0, _))
        ), "queues that were never set up cannot be resumed");
    }

    #[test]
    fn odd_widths_and_config_space() {
        let mut t = transport(Dummy::default());
        let mut two = [0xffu8; 2];
        t.read(REG_MAGIC, &mut two);
        assert_eq!(two, [0, 0]);
        t.write(REG_STATUS, &[1]);
        assert_eq!(t.status(), 0);
        t.write(CONFIG_SPACE + 2, &[9, 8]);
        let mut c = [0u8; 4];
        t.read(CONFIG_SPACE, &mut c);
        assert_eq!(c, [0, 0, 9, 8]);
        assert_eq!(rd(&mut t, REG_CONFIG_GENERATION), 1);
        // Past the end of the config space.
        t.read(CONFIG_SPACE + 6, &mut c);
        assert_eq!(c, [0, 0, 0, 0]);
        t.write(CONFIG_SPACE + 0xfff, &[1, 2, 3, 4]);
    }

    #[test]
    fn notify_register_signals_the_queue_event() {
        let mut t = transport(Dummy::default());
        wr(&mut t, REG_QUEUE_NOTIFY, 1);
        assert_eq!(t.queue_evts()[1].read().unwrap(), 1);
        wr(&mut t, REG_QUEUE_NOTIFY, 5); // no such queue: nothing happens
    }

    #[test]
    fn interrupt_ack_clears_bits() {
        let t = transport(Dummy::default());
        t.interrupt().trigger(INT_CONFIG | 1);
        let mut t = t;
        wr(&mut t, REG_INTERRUPT_ACK, 1);
        assert_eq!(rd(&mut t, REG_INTERRUPT_STATUS), INT_CONFIG);
    }
}
