//! Connects a virtio device to the VMM's event loop: its queue
//! notifications (ioeventfds) and its own descriptors (a tap, sockets) are
//! watched while the device is active, and dropped when the driver resets
//! it.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex, MutexGuard};

use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;

use super::mmio::MmioTransport;

/// The event-loop side of one virtio device.
#[derive(Debug)]
pub struct VirtioEventHandler {
    transport: Arc<Mutex<MmioTransport>>,
    activate_fd: RawFd,
    queue_fds: Vec<RawFd>,
    /// Descriptors registered at activation (queues and the device's own).
    registered: Vec<(RawFd, EventSet)>,
}

impl VirtioEventHandler {
    /// A handler for `transport`.
    pub fn new(transport: Arc<Mutex<MmioTransport>>) -> Self {
        let (activate_fd, queue_fds) = {
            let t = lock(&transport);
            (t.activate_evt().as_raw_fd(), t.queue_evts().iter().map(|e| e.as_raw_fd()).collect())
        };
        Self { transport, activate_fd, queue_fds, registered: Vec::new() }
    }

    /// Registers or unregisters descriptors to match the device's state.
    fn sync(&mut self, ops: &mut EventOps) {
        let mut t = lock(&self.transport);
        let active = t.device().is_active();
        if active && self.registered.is_empty() {
            let mut fds: Vec<(RawFd, EventSet)> = self.queue_fds.iter().map(|&fd| (fd, EventSet::IN)).collect();
            fds.extend(t.device().watched_fds());
            for (fd, set) in fds {
                match ops.add(Events::new_raw(fd, set)) {
                    Ok(()) => self.registered.push((fd, set)),
                    Err(e) => log::error!("virtio: cannot watch fd {fd}: {e:?}"),
                }
            }
        } else if !active && !self.registered.is_empty() {
            for (fd, set) in self.registered.drain(..) {
                let _ = ops.remove(Events::new_raw(fd, set));
            }
            t.device_mut().release_fds(ops);
        }
    }
}

fn lock(t: &Arc<Mutex<MmioTransport>>) -> MutexGuard<'_, MmioTransport> {
    t.lock().unwrap_or_else(|e| e.into_inner())
}

impl MutEventSubscriber for VirtioEventHandler {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new_raw(self.activate_fd, EventSet::IN)) {
            log::error!("virtio: cannot watch the activation event: {e:?}");
        }
        // The device may already be active (restored from a snapshot).
        self.sync(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.activate_fd {
            let _ = lock(&self.transport).activate_evt().read();
            self.sync(ops);
            return;
        }
        let mut t = lock(&self.transport);
        if let Some(i) = self.queue_fds.iter().position(|&q| q == fd) {
            let _ = t.queue_evts()[i].read();
            if t.device().is_active() {
                t.device_mut().process_queue(i, ops);
            }
        } else if t.device().is_active() {
            t.device_mut().process_fd(fd, events.event_set(), ops);
        }
    }
}
