//! virtio-net on a TAP device: one receive and one transmit queue, the MAC
//! address in config space, and checksum/TSO/UFO offloads passed through
//! (the virtio net header travels with each frame to and from the TAP).

pub mod tap;

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use event_manager::{EventOps, Events};
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::EventSet;

use super::{complete, ActivateContext, ActivateError, Interrupt, VirtioDevice, INT_USED_RING, TYPE_NET};
use tap::{Tap, TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_UFO, VNET_HDR_LEN};

/// Feature bits (virtio 1.2, 5.1.3).
pub const F_CSUM: u64 = 1 << 0;
pub const F_GUEST_CSUM: u64 = 1 << 1;
pub const F_MAC: u64 = 1 << 5;
pub const F_GUEST_TSO4: u64 = 1 << 7;
pub const F_GUEST_TSO6: u64 = 1 << 8;
pub const F_GUEST_UFO: u64 = 1 << 10;
pub const F_HOST_TSO4: u64 = 1 << 11;
pub const F_HOST_TSO6: u64 = 1 << 12;
pub const F_HOST_UFO: u64 = 1 << 14;

/// Largest frame: a 64 KiB segment, its Ethernet header, and the virtio
/// net header.
pub const MAX_FRAME: usize = 65562 + VNET_HDR_LEN;
/// Queue size.
pub const QUEUE_SIZE: u16 = 256;
const RX: usize = 0;
const TX: usize = 1;

/// A MAC address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mac(pub [u8; 6]);

impl std::str::FromStr for Mac {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let parts: Vec<&str> = s.split(':').collect();
        let bad = || format!("invalid MAC address {s:?} (use aa:bb:cc:dd:ee:ff)");
        if parts.len() != 6 {
            return Err(bad());
        }
        let mut m = [0u8; 6];
        for (i, p) in parts.iter().enumerate() {
            if p.len() != 2 {
                return Err(bad());
            }
            m[i] = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        if m[0] & 1 != 0 {
            return Err(format!("{s} is a multicast address"));
        }
        Ok(Mac(m))
    }
}

impl std::fmt::Display for Mac {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let m = self.0;
        write!(f, "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", m[0], m[1], m[2], m[3], m[4], m[5])
    }
}

struct Active {
    mem: GuestMemoryMmap,
    rx: Queue,
    tx: Queue,
    interrupt: Arc<Interrupt>,
}

/// Counters, for logs and tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct NetStats {
    pub rx_frames: u64,
    pub tx_frames: u64,
    /// Frames dropped: too big for the guest's buffer, or the TAP refused them.
    pub dropped: u64,
}

/// A virtio network device.
pub struct Net {
    tap: Tap,
    mac: Mac,
    active: Option<Active>,
    /// A frame read from the TAP that waits for a receive buffer.
    pending_rx: Option<usize>,
    rx_buf: Vec<u8>,
    tx_buf: Vec<u8>,
    /// Whether the TAP is watched for input (not while frames cannot be
    /// delivered).
    tap_watched: bool,
    stats: NetStats,
}

impl std::fmt::Debug for Net {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Net").field("tap", &self.tap.name()).field("mac", &self.mac).finish()
    }
}

impl Net {
    /// A device on `tap` with MAC address `mac`.
    pub fn new(tap: Tap, mac: Mac) -> Self {
        Self {
            tap,
            mac,
            active: None,
            pending_rx: None,
            rx_buf: vec![0; MAX_FRAME],
            tx_buf: Vec::with_capacity(MAX_FRAME),
            tap_watched: false,
            stats: NetStats::default(),
        }
    }

    /// Counters so far.
    pub fn stats(&self) -> NetStats {
        self.stats
    }

    fn watch_tap(&mut self, ops: &mut EventOps, want: bool) {
        if want == self.tap_watched {
            return;
        }
        let ev = Events::new_raw(self.tap.as_raw_fd(), EventSet::IN);
        let r = if want { ops.add(ev) } else { ops.remove(ev) };
        match r {
            Ok(()) => self.tap_watched = want,
            Err(e) => log::warn!("virtio-net: cannot change TAP watch: {e:?}"),
        }
    }

    /// Moves frames from the TAP into receive buffers until one side runs dry.
    fn receive(&mut self, ops: &mut EventOps) {
        let Some(a) = self.active.as_mut() else { return };
        let mut notify = false;
        let mut out_of_buffers = false;
        loop {
            let len = match self.pending_rx.take() {
                Some(len) => len,
                None => match self.tap.read_frame(&mut self.rx_buf) {
                    Ok(len) => len,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        log::warn!("virtio-net: TAP read failed: {e}");
                        break;
                    }
                },
            };
            let Some(chain) = a.rx.pop_descriptor_chain(&a.mem) else {
                self.pending_rx = Some(len);
                out_of_buffers = true;
                break;
            };
            let head = chain.head_index();
            let delivered = chain
                .writer(&a.mem)
                .is_ok_and(|mut w| w.available_bytes() >= len && w.write_all(&self.rx_buf[..len]).is_ok());
            let written = if delivered {
                self.stats.rx_frames += 1;
                len as u32
            } else {
                self.stats.dropped += 1;
                0
            };
            notify |= complete(&mut a.rx, &a.mem, head, written);
        }
        if notify {
            a.interrupt.trigger(INT_USED_RING);
        }
        self.watch_tap(ops, !out_of_buffers);
    }

    /// Sends every frame the guest queued.
    fn transmit(&mut self) {
        let Some(a) = self.active.as_mut() else { return };
        let mut notify = false;
        while let Some(chain) = a.tx.pop_descriptor_chain(&a.mem) {
            let head = chain.head_index();
            if read_tx_frame(chain, &a.mem, &mut self.tx_buf) && self.tap.write_frame(&self.tx_buf).is_ok() {
                self.stats.tx_frames += 1;
            } else {
                self.stats.dropped += 1;
            }
            notify |= complete(&mut a.tx, &a.mem, head, 0);
        }
        if notify {
            a.interrupt.trigger(INT_USED_RING);
        }
    }
}

/// Gathers the frame (virtio net header first) the guest queued in `chain`
/// into `frame`. `false` if the chain is unreadable, shorter than the net
/// header or longer than [`MAX_FRAME`].
pub fn read_tx_frame(chain: DescriptorChain<&GuestMemoryMmap>, mem: &GuestMemoryMmap, frame: &mut Vec<u8>) -> bool {
    frame.clear();
    chain.reader(mem).is_ok_and(|mut r| {
        let n = r.available_bytes();
        (VNET_HDR_LEN..=MAX_FRAME).contains(&n) && {
            frame.resize(n, 0);
            r.read_exact(frame).is_ok()
        }
    })
}

/// TAP offload flags for the offloads the guest accepted on receive.
pub fn tap_offloads(acked: u64) -> u32 {
    let mut f = 0;
    if acked & F_GUEST_CSUM != 0 {
        f |= TUN_F_CSUM;
        if acked & F_GUEST_TSO4 != 0 {
            f |= TUN_F_TSO4;
        }
        if acked & F_GUEST_TSO6 != 0 {
            f |= TUN_F_TSO6;
        }
        if acked & F_GUEST_UFO != 0 {
            f |= TUN_F_UFO;
        }
    }
    f
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        TYPE_NET
    }

    fn features(&self) -> u64 {
        F_MAC | F_CSUM | F_GUEST_CSUM | F_GUEST_TSO4 | F_GUEST_TSO6 | F_GUEST_UFO | F_HOST_TSO4 | F_HOST_TSO6 | F_HOST_UFO
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&self.mac.0, offset, data);
    }

    fn activate(&mut self, mut ctx: ActivateContext<'_>) -> Result<(), ActivateError> {
        self.tap
            .set_offload(tap_offloads(ctx.acked_features))
            .map_err(|e| ActivateError::Device(e.to_string()))?;
        let tx = ctx.queues.pop().ok_or(ActivateError::BadQueue(TX))?;
        let rx = ctx.queues.pop().ok_or(ActivateError::BadQueue(RX))?;
        self.active = Some(Active { mem: ctx.mem, rx, tx, interrupt: ctx.interrupt.clone() });
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
        self.pending_rx = None;
    }

    fn is_active(&self) -> bool {
        self.active.is_some()
    }

    fn queue_states(&self) -> Vec<virtio_queue::QueueState> {
        self.active.as_ref().map_or_else(Vec::new, |a| vec![a.rx.state(), a.tx.state()])
    }

    fn process_queue(&mut self, index: usize, ops: &mut EventOps) {
        match index {
            RX => self.receive(ops),
            TX => self.transmit(),
            _ => {}
        }
    }

    fn watched_fds(&self) -> Vec<(RawFd, EventSet)> {
        Vec::new()
    }

    fn process_fd(&mut self, fd: RawFd, _events: EventSet, ops: &mut EventOps) {
        if fd == self.tap.as_raw_fd() {
            self.receive(ops);
        }
    }

    fn release_fds(&mut self, ops: &mut EventOps) {
        self.watch_tap(ops, false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_parsing() {
        assert_eq!("06:00:ac:10:00:02".parse::<Mac>().unwrap(), Mac([6, 0, 0xac, 0x10, 0, 2]));
        assert_eq!(Mac([6, 0, 0xac, 0x10, 0, 2]).to_string(), "06:00:ac:10:00:02");
        for bad in ["", "06:00:ac:10:00", "06:00:ac:10:00:zz", "6:0:ac:10:00:02", "01:00:5e:00:00:01"] {
            assert!(bad.parse::<Mac>().is_err(), "{bad}");
        }
    }

    #[test]
    fn offloads_follow_the_guest() {
        assert_eq!(tap_offloads(0), 0);
        assert_eq!(tap_offloads(F_GUEST_TSO4), 0, "TSO needs checksum offload");
        assert_eq!(tap_offloads(F_GUEST_CSUM | F_GUEST_TSO4 | F_GUEST_UFO), TUN_F_CSUM | TUN_F_TSO4 | TUN_F_UFO);
    }

    #[test]
    fn tx_frames_are_bounded() {
        use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
        use virtio_queue::mock::MockSplitQueue;
        use vm_memory::{Bytes, GuestAddress};
        let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
        m.write_slice(&[0x11; 64], GuestAddress(0x10000)).unwrap();
        let q = MockSplitQueue::new(&m, 16);
        let d = |addr, len, flags| RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0));
        let mut frame = Vec::new();
        // Header and payload in two buffers: gathered in order.
        let chain = q.build_desc_chain(&[d(0x10000, 12, 1), d(0x10000 + 12, 52, 0)]).unwrap();
        assert!(read_tx_frame(chain, &m, &mut frame));
        assert_eq!(frame, vec![0x11; 64]);
        // Shorter than a net header.
        let chain = q.build_desc_chain(&[d(0x10000, 8, 0)]).unwrap();
        assert!(!read_tx_frame(chain, &m, &mut frame));
        // Larger than any frame.
        let chain = q.build_desc_chain(&[d(0x10000, MAX_FRAME as u32 + 1, 0)]).unwrap();
        assert!(!read_tx_frame(chain, &m, &mut frame));
        // Writable-only buffers carry nothing to send.
        let chain = q.build_desc_chain(&[d(0x10000, 64, 2)]).unwrap();
        assert!(!read_tx_frame(chain, &m, &mut frame));
    }

    #[test]
    fn bad_tap_names_are_refused() {
        assert!(matches!(Tap::open(""), Err(tap::Error::Name(_))));
        assert!(matches!(Tap::open("a-very-long-interface-name"), Err(tap::Error::Name(_))));
    }
}
