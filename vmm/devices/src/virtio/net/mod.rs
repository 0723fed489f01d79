//! virtio-net on a TAP device: one receive and one transmit queue, the MAC
//! address in config space, and checksum/TSO/UFO offloads passed through
//! (the virtio net header travels with each frame to and from the TAP).
//!
//! Each direction may have its own rate limiter (see
//! [`crate::rate_limiter`]): a frame costs one operation and its bytes
//! without the virtio net header. A frame the limiter refuses waits (a
//! transmit chain stays in the ring; a received frame stays in the device
//! and the TAP is not read meanwhile) until the limiter's timer fires.

pub mod tap;

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use event_manager::EventOps;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT, Reader};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::EventSet;

use super::vsock::muxer::FdWatch;
use super::{complete, ActivateContext, ActivateError, Interrupt, VirtioDevice, INT_USED_RING, TYPE_NET};
use crate::rate_limiter::RateLimiter;
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

/// A MAC address (the VMM API's type: configurations carry it).
pub use vmrun_vmm_api::Mac;

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
///
/// The rate limiters are not part of the device's snapshot state (the
/// queues are): a restored device starts with full buckets, and with
/// whatever limiters its restorer gives it.
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
    /// Frames from the TAP into the guest.
    rx_limiter: RateLimiter,
    /// Frames from the guest to the TAP.
    tx_limiter: RateLimiter,
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
            rx_limiter: RateLimiter::unlimited(),
            tx_limiter: RateLimiter::unlimited(),
        }
    }

    /// The device with `rx` limiting what the guest receives and `tx` what
    /// it sends.
    pub fn with_rate_limiters(mut self, rx: RateLimiter, tx: RateLimiter) -> Self {
        self.rx_limiter = rx;
        self.tx_limiter = tx;
        self
    }

    /// The rate limiters: (receive, transmit).
    pub fn rate_limiters(&self) -> (&RateLimiter, &RateLimiter) {
        (&self.rx_limiter, &self.tx_limiter)
    }

    /// Counters so far.
    pub fn stats(&self) -> NetStats {
        self.stats
    }

    fn watch_tap(&mut self, w: &mut dyn FdWatch, want: bool) {
        if want == self.tap_watched {
            return;
        }
        let fd = self.tap.as_raw_fd();
        let r = if want { w.add(fd, EventSet::IN) } else { w.remove(fd, EventSet::IN) };
        match r {
            Ok(()) => self.tap_watched = want,
            Err(e) => log::warn!("virtio-net: cannot change TAP watch: {e:?}"),
        }
    }

    /// Moves frames from the TAP into receive buffers until one side runs
    /// dry or the receive limiter refuses; the TAP is watched only while
    /// frames can go on.
    fn receive(&mut self, w: &mut dyn FdWatch) {
        let Some(a) = self.active.as_mut() else { return };
        let mut notify = false;
        let mut stalled = false;
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
                stalled = true;
                break;
            };
            // Charged when it can be delivered, so a waiting frame is
            // charged once.
            if !self.rx_limiter.consume(len.saturating_sub(VNET_HDR_LEN) as u64, 1) {
                a.rx.go_to_previous_position();
                self.pending_rx = Some(len);
                stalled = true;
                break;
            }
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
        self.watch_tap(w, !stalled);
    }

    /// Sends every frame the guest queued, until the transmit limiter
    /// refuses one (it stays in the ring).
    fn transmit(&mut self) {
        let Some(a) = self.active.as_mut() else { return };
        if self.tx_limiter.is_blocked() {
            return;
        }
        let mut notify = false;
        while let Some(chain) = a.tx.pop_descriptor_chain(&a.mem) {
            let head = chain.head_index();
            let frame = match chain.reader(&a.mem) {
                Ok(r) => {
                    // Frames that are dropped move no bytes.
                    let n = r.available_bytes();
                    let bytes = if (VNET_HDR_LEN..=MAX_FRAME).contains(&n) { n - VNET_HDR_LEN } else { 0 };
                    if !self.tx_limiter.consume(bytes as u64, 1) {
                        a.tx.go_to_previous_position();
                        break;
                    }
                    Some(r)
                }
                Err(_) => None,
            };
            let sent = frame.is_some_and(|r| read_frame_from(r, &mut self.tx_buf));
            if sent && self.tap.write_frame(&self.tx_buf).is_ok() {
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

    /// One of the device's own descriptors is ready: the TAP, or a
    /// limiter's timer.
    fn handle_fd(&mut self, fd: RawFd, w: &mut dyn FdWatch) {
        if fd == self.tap.as_raw_fd() {
            self.receive(w);
        } else if Some(fd) == self.rx_limiter.timer_fd() {
            self.rx_limiter.on_timer();
            self.receive(w);
        } else if Some(fd) == self.tx_limiter.timer_fd() {
            self.tx_limiter.on_timer();
            self.transmit();
        }
    }
}

/// Gathers the frame (virtio net header first) the guest queued in `chain`
/// into `frame`. `false` if the chain is unreadable, shorter than the net
/// header or longer than [`MAX_FRAME`].
pub fn read_tx_frame(chain: DescriptorChain<&GuestMemoryMmap>, mem: &GuestMemoryMmap, frame: &mut Vec<u8>) -> bool {
    frame.clear();
    chain.reader(mem).is_ok_and(|r| read_frame_from(r, frame))
}

/// [`read_tx_frame`] from a chain's reader.
fn read_frame_from(mut r: Reader<'_>, frame: &mut Vec<u8>) -> bool {
    frame.clear();
    let n = r.available_bytes();
    (VNET_HDR_LEN..=MAX_FRAME).contains(&n) && {
        frame.resize(n, 0);
        r.read_exact(frame).is_ok()
    }
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
        [self.rx_limiter.timer_fd(), self.tx_limiter.timer_fd()]
            .into_iter()
            .flatten()
            .map(|fd| (fd, EventSet::IN))
            .collect()
    }

    fn process_fd(&mut self, fd: RawFd, _events: EventSet, ops: &mut EventOps) {
        self.handle_fd(fd, ops);
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

    /// The event loop, as far as the device uses it: what is watched.
    #[derive(Default)]
    struct Watched(std::collections::HashSet<RawFd>);

    impl FdWatch for Watched {
        fn add(&mut self, fd: RawFd, _: EventSet) -> std::io::Result<()> {
            assert!(self.0.insert(fd), "fd {fd} added twice");
            Ok(())
        }
        fn modify(&mut self, _: RawFd, _: EventSet) -> std::io::Result<()> {
            Ok(())
        }
        fn remove(&mut self, fd: RawFd, _: EventSet) -> std::io::Result<()> {
            assert!(self.0.remove(&fd), "fd {fd} removed but not watched");
            Ok(())
        }
    }

    mod limits {
        use super::super::*;
        use super::Watched;
        use crate::rate_limiter::{BucketConfig, RateLimitConfig};
        use std::os::unix::net::UnixDatagram;
        use std::time::{Duration, Instant};
        use vm_memory::{Bytes, GuestAddress};
        use vmm_sys_util::eventfd::EventFd;

        const RXQ: u64 = 0x10000;
        const TXQ: u64 = 0x20000;
        const FRAME: usize = 1000 + VNET_HDR_LEN;

        fn limiter(bytes: Option<(u64, u64)>, ops: Option<(u64, u64)>) -> RateLimiter {
            let b = |(size, ms): (u64, u64)| BucketConfig { size, one_time_burst: 0, refill_time: Duration::from_millis(ms) };
            RateLimiter::new(&RateLimitConfig { bandwidth: bytes.map(b), ops: ops.map(b) }).unwrap()
        }

        struct H {
            mem: GuestMemoryMmap,
            net: Net,
            host: UnixDatagram,
            w: Watched,
        }

        impl H {
            fn new(rx: RateLimiter, tx: RateLimiter) -> Self {
                let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
                let (tap, host) = Tap::test_pair().unwrap();
                let mut net = Net::new(tap, Mac([6, 0, 0, 0, 0, 1])).with_rate_limiters(rx, tx);
                let queue = |base: u64| {
                    let mut q = Queue::new(64).unwrap();
                    q.set_size(64);
                    q.set_desc_table_address(Some(base as u32), Some(0));
                    q.set_avail_ring_address(Some((base + 0x1000) as u32), Some(0));
                    q.set_used_ring_address(Some((base + 0x2000) as u32), Some(0));
                    q.set_ready(true);
                    q
                };
                let (rx, tx) = (queue(RXQ), queue(TXQ));
                let interrupt = Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
                // Not through `activate`: offloads cannot be set on the stand-in.
                net.active = Some(Active { mem: mem.clone(), rx, tx, interrupt });
                Self { mem, net, host, w: Watched::default() }
            }

            /// The used ring's index of the queue at `base` (its rings at
            /// +0x1000 and +0x2000).
            fn used(&self, base: u64) -> u16 {
                self.mem.read_obj(GuestAddress(base + 0x2002)).unwrap()
            }

            /// `n` receive buffers of `FRAME` bytes, or `n` frames to send,
            /// one descriptor each (descriptor `i`, avail slot `i`).
            fn offer(&self, base: u64, n: u16, writable: bool) {
                for i in 0..n {
                    let at = 0x10_0000 + base * 16 + u64::from(i) * 0x1000;
                    let fill = if writable { 0xee } else { i as u8 };
                    self.mem.write_slice(&[fill; FRAME], GuestAddress(at)).unwrap();
                    let d = base + 16 * u64::from(i);
                    self.mem.write_obj(at, GuestAddress(d)).unwrap();
                    self.mem.write_obj(FRAME as u32, GuestAddress(d + 8)).unwrap();
                    self.mem.write_obj(if writable { 2u16 } else { 0 }, GuestAddress(d + 12)).unwrap();
                    self.mem.write_obj(i, GuestAddress(base + 0x1004 + 2 * u64::from(i))).unwrap();
                }
                self.mem.write_obj(n, GuestAddress(base + 0x1002)).unwrap();
            }

            fn host_frames(&self) -> usize {
                let mut b = vec![0u8; MAX_FRAME];
                let mut n = 0;
                self.host.set_nonblocking(true).unwrap();
                while let Ok(len) = self.host.recv(&mut b) {
                    assert_eq!(len, FRAME);
                    n += 1;
                }
                n
            }
        }

        fn wait_readable(fd: RawFd) {
            let mut p = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
            // SAFETY: one valid pollfd, for the duration of the call.
            assert_eq!(unsafe { libc::poll(&mut p, 1, 2000) }, 1, "the limiter's timer never fired");
        }

        #[test]
        fn unlimited_net_watches_no_timer() {
            let h = H::new(RateLimiter::unlimited(), RateLimiter::unlimited());
            assert!(h.net.watched_fds().is_empty());
            let (rx, tx) = h.net.rate_limiters();
            assert!(rx.is_unlimited() && tx.is_unlimited());
        }

        #[test]
        fn transmit_is_limited_and_resumes_on_the_timer() {
            // 3 frames per 60 ms.
            let mut h = H::new(RateLimiter::unlimited(), limiter(None, Some((3, 60))));
            let timer = h.net.tx_limiter.timer_fd().unwrap();
            assert_eq!(h.net.watched_fds(), vec![(timer, EventSet::IN)]);
            h.offer(TXQ, 8, false);
            h.net.transmit();
            assert_eq!(h.used(TXQ), 3);
            assert_eq!(h.host_frames(), 3);
            // A guest kick while throttled changes nothing.
            h.net.transmit();
            assert_eq!(h.used(TXQ), 3);
            let start = Instant::now();
            while h.used(TXQ) < 8 {
                assert!(start.elapsed() < Duration::from_secs(5));
                wait_readable(timer);
                h.net.handle_fd(timer, &mut h.w);
            }
            assert_eq!(h.host_frames(), 5);
            assert_eq!(h.net.stats().tx_frames, 8);
            // 5 more at 50 per second.
            assert!(start.elapsed() >= Duration::from_millis(80), "{:?}", start.elapsed());
        }

        #[test]
        fn receive_is_limited_keeps_the_frame_and_stops_watching_the_tap() {
            // Two frames' payload per 50 ms.
            let mut h = H::new(limiter(Some((2000, 50)), None), RateLimiter::unlimited());
            let timer = h.net.rx_limiter.timer_fd().unwrap();
            let tap = h.net.tap.as_raw_fd();
            h.offer(RXQ, 6, true);
            for i in 0..6u8 {
                h.host.send(&[i; FRAME]).unwrap();
            }
            h.net.receive(&mut h.w);
            assert_eq!(h.used(RXQ), 2);
            assert!(h.net.pending_rx.is_some(), "the third frame waits in the device");
            assert!(!h.w.0.contains(&tap), "the TAP is not watched while throttled");
            let start = Instant::now();
            while h.used(RXQ) < 6 {
                assert!(start.elapsed() < Duration::from_secs(5));
                wait_readable(timer);
                h.net.handle_fd(timer, &mut h.w);
            }
            assert!(h.w.0.contains(&tap), "watched again once frames flow");
            assert_eq!(h.net.stats(), NetStats { rx_frames: 6, tx_frames: 0, dropped: 0 });
            // In order, each charged once: 4 frames at 40 per second.
            assert!(start.elapsed() >= Duration::from_millis(75), "{:?}", start.elapsed());
            for i in 0..6u64 {
                let at = 0x10_0000 + RXQ * 16 + i * 0x1000;
                assert_eq!(h.mem.read_obj::<u8>(GuestAddress(at)).unwrap(), i as u8);
            }
        }
    }

    #[test]
    fn bad_tap_names_are_refused() {
        assert!(matches!(Tap::open(""), Err(tap::Error::Name(_))));
        assert!(matches!(Tap::open("a-very-long-interface-name"), Err(tap::Error::Name(_))));
    }
}
