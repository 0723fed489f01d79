//! virtio-vsock with Firecracker's hybrid vsock: guest stream sockets
//! reach the host through one Unix socket.
//!
//! - A host process connects to the device's socket and sends
//!   `CONNECT <port>\n`; the guest is asked to accept on `port`, and on
//!   its RESPONSE the host reads `OK <host_port>\n`, then the bytes flow.
//! - A guest connection to CID 2 port P becomes a connection to the Unix
//!   socket `<socket>_<P>`.
//!
//! `packet.rs` parses and writes the wire header, `connection.rs` holds one
//! stream's state and credit, `muxer.rs` the host sockets and the dispatch,
//! `socket.rs` the raw socket calls; this file is the virtio device: its
//! three queues (rx 0, tx 1, event 2) and its config space (the guest CID).
//!
//! After a restore the device resets the transport: the guest is sent
//! VIRTIO_VSOCK_EVENT_TRANSPORT_RESET and drops every connected socket
//! when it handles the event. A host connection forwarded before that
//! would be dropped with them, so host connections are held (their
//! `CONNECT` read, no REQUEST sent) until the guest has handled the event.
//! Linux's driver shows that it has (`virtio_vsock_event_work`): for each
//! event buffer it takes back, it handles the event, then makes the buffer
//! available again, then notifies the event queue. So the event queue's
//! available index moving past where it was when the event was delivered
//! means the reset is done. A guest that does not do so within
//! [`RESET_ACK_TIMEOUT`] of the first held connection gets its held
//! connections refused (`ERR ...` where `OK` would be), and host
//! connections go through unheld from then on.
//!
//! What a guest can make the host hold is bounded per device: at most
//! [`muxer::MAX_CONNECTIONS`] connections (host handshakes included), at
//! most `connection::BUF_ALLOC` guest bytes buffered per connection for a
//! slow host peer, and at most [`muxer::MAX_BUFFERED_BYTES`] (or
//! [`Vsock::set_buffer_limit`]) across connections, past which the device
//! stops taking the tx queue until host peers read.

pub mod connection;
pub mod muxer;
pub mod packet;
pub mod socket;

#[cfg(test)]
mod tests;

use std::io::Write;
use std::os::fd::RawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::num::Wrapping;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use event_manager::EventOps;
use virtio_queue::{Queue, QueueOwnedT, QueueT, Writer};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::timerfd::TimerFd;

use super::{complete, ActivateContext, ActivateError, Interrupt, VirtioDevice, INT_USED_RING, TYPE_VSOCK};
use muxer::{FdWatch, Muxer};
use packet::{HEADER_SIZE, MAX_PAYLOAD};

/// Queue size of the transmit and event queues.
pub const QUEUE_SIZE: u16 = 256;
/// Queue size of the receive queue. The guest's driver fills it with one
/// 4 KiB buffer per descriptor at boot: 64 keep 256 KiB in flight (256
/// took 1 MiB of guest memory, and where guest kernel mode is emulated
/// about 160k more instructions of a boot).
pub const RX_QUEUE_SIZE: u16 = 64;
/// The maximum size of each queue, in queue order.
const QUEUE_MAX_SIZES: [u16; 3] = [RX_QUEUE_SIZE, QUEUE_SIZE, QUEUE_SIZE];
/// Queue indices.
pub const RX: usize = 0;
pub const TX: usize = 1;
pub const EVENT: usize = 2;
/// `virtio_vsock_event.id`: the transport was reset (after a restore).
pub const EVENT_TRANSPORT_RESET: u32 = 0;
/// How long host connections are held, at most, for the guest to handle a
/// transport reset (from the first one held). It stays under the host's
/// usual handshake timeouts, so a host learns why rather than timing out.
pub const RESET_ACK_TIMEOUT: Duration = Duration::from_secs(3);
/// The first host port a restored VMM allocates from: somewhere in the
/// upper half of the host's port range, picked from the clock, so that it
/// is not where the snapshot's VMM started (`muxer::FIRST_LOCAL_PORT`) nor,
/// but by a chance of one in 2^28 per connection, where a VMM restored
/// before was.
pub fn restored_first_port(now: std::time::SystemTime) -> u32 {
    let t = now.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let mix = (t.as_secs() as u32).wrapping_mul(0x9e37_79b9) ^ t.subsec_nanos();
    muxer::FIRST_LOCAL_PORT + (1 << 29) + (mix & ((1 << 29) - 1)) / 2
}

/// What a host connection refused after [`RESET_ACK_TIMEOUT`] reads.
pub const RESET_ACK_REFUSAL: &str = "the guest did not handle the vsock transport reset in time";

/// Errors creating a vsock device.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("guest CID {0} is reserved or too large (use 3 to 4294967294)")]
    Cid(u64),
    #[error("vsock socket path {0} exists and is not a socket")]
    NotASocket(PathBuf),
    #[error("cannot remove the stale vsock socket {path}: {source}")]
    RemoveStale { path: PathBuf, source: std::io::Error },
    #[error("cannot listen on vsock socket {path}: {source}")]
    Listen { path: PathBuf, source: std::io::Error },
    #[error("vsock: cannot create a timer: {0}")]
    Timer(std::io::Error),
}

struct Active {
    mem: GuestMemoryMmap,
    queues: Vec<Queue>,
    interrupt: Arc<Interrupt>,
}

/// A virtio-vsock device.
pub struct Vsock {
    guest_cid: u64,
    uds_path: PathBuf,
    /// (device, inode) of the socket file we bound, to remove only ours.
    uds_id: Option<(u64, u64)>,
    muxer: Muxer,
    active: Option<Active>,
    transport_reset_owed: bool,
    /// The transport reset is in the guest's event queue and the guest has
    /// not handled it yet: the queue's available index when it was put
    /// there. Host connections are held meanwhile.
    reset_unacked: Option<Wrapping<u16>>,
    /// Fires [`RESET_ACK_TIMEOUT`] after the first host connection is held.
    ack_timer: TimerFd,
    ack_timer_armed: bool,
    ack_timeout: Duration,
    /// The tx queue waits for owed RSTs to reach the guest, or for host
    /// peers to take buffered bytes ([`Muxer::tx_blocked`]).
    tx_stalled: bool,
    payload: Vec<u8>,
    scratch: Vec<u8>,
}

impl std::fmt::Debug for Vsock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vsock")
            .field("guest_cid", &self.guest_cid)
            .field("uds_path", &self.uds_path)
            .field("active", &self.active.is_some())
            .field("connections", &self.muxer.connection_count())
            .finish()
    }
}

impl Vsock {
    /// A device for the guest `guest_cid`, listening on `uds_path` (a
    /// stale socket file there is replaced; any other file is an error).
    pub fn new(guest_cid: u64, uds_path: &Path) -> Result<Self, Error> {
        if !(3..u64::from(u32::MAX)).contains(&guest_cid) {
            return Err(Error::Cid(guest_cid));
        }
        match std::fs::symlink_metadata(uds_path) {
            Ok(m) if m.file_type().is_socket() => std::fs::remove_file(uds_path)
                .map_err(|source| Error::RemoveStale { path: uds_path.into(), source })?,
            Ok(_) => return Err(Error::NotASocket(uds_path.into())),
            Err(_) => {}
        }
        let listen_err = |source| Error::Listen { path: uds_path.into(), source };
        let listener = UnixListener::bind(uds_path).map_err(listen_err)?;
        listener.set_nonblocking(true).map_err(listen_err)?;
        let uds_id = std::fs::metadata(uds_path).ok().map(|m| (m.dev(), m.ino()));
        let ack_timer = TimerFd::new().map_err(|e| Error::Timer(e.into()))?;
        // Read from the event loop after a re-arm may have emptied it: the
        // read must not block.
        // SAFETY: fcntl on a descriptor we own, with integer arguments only.
        if unsafe { libc::fcntl(ack_timer.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) } < 0 {
            return Err(Error::Timer(std::io::Error::last_os_error()));
        }
        Ok(Self {
            guest_cid,
            uds_path: uds_path.into(),
            uds_id,
            muxer: Muxer::new(guest_cid, uds_path, listener),
            active: None,
            transport_reset_owed: false,
            reset_unacked: None,
            ack_timer,
            ack_timer_armed: false,
            ack_timeout: RESET_ACK_TIMEOUT,
            tx_stalled: false,
            payload: Vec::with_capacity(MAX_PAYLOAD as usize),
            scratch: vec![0; MAX_PAYLOAD as usize],
        })
    }

    /// The guest's CID.
    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    /// Bounds the guest bytes buffered for slow host peers across all
    /// connections (default [`muxer::MAX_BUFFERED_BYTES`]); at the bound
    /// the device stops taking the guest's tx queue until they read.
    pub fn set_buffer_limit(&mut self, bytes: usize) {
        self.muxer.set_max_buffered(bytes);
    }

    /// Guest bytes buffered for host peers now, across connections.
    pub fn buffered_bytes(&self) -> usize {
        self.muxer.buffered_bytes()
    }

    /// Resets every connection and tells the guest its transport was reset
    /// (VIRTIO_VSOCK_EVENT_TRANSPORT_RESET), as after a snapshot restore:
    /// the guest drops its connected sockets and the host streams are
    /// closed. The event waits for an event-queue buffer if there is none.
    /// Host connections made from now on are held until the guest has
    /// handled the event (see the module's documentation).
    pub fn transport_reset(&mut self) {
        self.muxer.release_all();
        self.transport_reset_owed = true;
        self.reset_unacked = None;
        self.muxer.hold();
        if self.deliver_events() {
            self.signal();
        }
    }

    /// Sets how long host connections wait for the guest to handle a
    /// transport reset (default [`RESET_ACK_TIMEOUT`]).
    pub fn set_reset_ack_timeout(&mut self, timeout: Duration) {
        self.ack_timeout = timeout;
    }

    /// Whether host connections wait for the guest to handle a transport
    /// reset.
    pub fn holding_host_connections(&self) -> bool {
        self.muxer.holding()
    }

    /// The guest handled the transport reset if it made an event buffer
    /// available again since: the held host connections go on.
    fn check_reset_ack(&mut self) {
        let (Some(seen), Some(a)) = (self.reset_unacked, self.active.as_ref()) else { return };
        match a.queues[EVENT].avail_idx(&a.mem, Ordering::Acquire) {
            Ok(now) if now == seen => return,
            Ok(_) => log::debug!(
                "vsock: the guest handled the transport reset; {} held host connections go on",
                self.muxer.held_count()
            ),
            Err(e) => log::debug!("vsock: event queue unreadable ({e}); held host connections go on"),
        }
        self.reset_unacked = None;
        self.disarm_ack_timer();
        self.muxer.release_held();
    }

    /// Starts the clock on held host connections.
    fn arm_ack_timer(&mut self) {
        if self.ack_timer_armed || self.muxer.held_count() == 0 {
            return;
        }
        match self.ack_timer.reset(self.ack_timeout, None) {
            Ok(()) => self.ack_timer_armed = true,
            Err(e) => {
                // Without a clock, no waiting: let them go on.
                log::warn!("vsock: cannot arm the transport reset timer: {e}; host connections go on");
                self.reset_unacked = None;
                self.muxer.release_held();
            }
        }
    }

    fn disarm_ack_timer(&mut self) {
        if self.ack_timer_armed {
            let _ = self.ack_timer.clear();
            self.ack_timer_armed = false;
        }
    }

    /// The timer fired: the guest did not handle the reset in time.
    fn ack_timer_fired(&mut self) {
        // Non-blocking: empty after a re-arm, which is fine.
        let _ = self.ack_timer.wait();
        if !self.ack_timer_armed {
            return;
        }
        self.ack_timer_armed = false;
        if self.muxer.holding() {
            log::warn!(
                "vsock: the guest did not handle the transport reset within {:?}; {} held host connections refused, \
                 later ones go through",
                self.ack_timeout,
                self.muxer.held_count()
            );
            self.reset_unacked = None;
            self.muxer.refuse_held(RESET_ACK_REFUSAL);
        }
    }

    fn signal(&self) {
        if let Some(a) = &self.active {
            a.interrupt.trigger(INT_USED_RING);
        }
    }

    /// Puts owed events in the event queue; whether the guest must be told.
    fn deliver_events(&mut self) -> bool {
        let Some(a) = self.active.as_mut() else { return false };
        let q = &mut a.queues[EVENT];
        let mut notify = false;
        while self.transport_reset_owed {
            let Some(chain) = q.pop_descriptor_chain(&a.mem) else { break };
            let head = chain.head_index();
            let mut w: Writer<'_> = match chain.writer(&a.mem) {
                Ok(w) => w,
                Err(_) => {
                    notify |= complete(q, &a.mem, head, 0);
                    continue;
                }
            };
            let ok = w.available_bytes() >= 4 && w.write_all(&EVENT_TRANSPORT_RESET.to_le_bytes()).is_ok();
            if ok {
                // Read before the guest can see the event: a buffer it
                // makes available after this is one it took back.
                match q.avail_idx(&a.mem, Ordering::Acquire) {
                    Ok(idx) => self.reset_unacked = Some(idx),
                    Err(e) => {
                        log::debug!("vsock: event queue unreadable ({e}); host connections are not held");
                        self.reset_unacked = None;
                        self.muxer.release_held();
                    }
                }
            }
            notify |= complete(q, &a.mem, head, if ok { 4 } else { 0 });
            self.transport_reset_owed = !ok;
        }
        notify
    }

    /// Takes the guest's packets from the tx queue.
    fn process_tx(&mut self, w: &mut dyn FdWatch) -> bool {
        let Some(a) = self.active.as_mut() else { return false };
        let q = &mut a.queues[TX];
        let mut notify = false;
        self.tx_stalled = false;
        'queue: loop {
            if q.disable_notification(&a.mem).is_err() {
                break;
            }
            while !self.muxer.tx_blocked() {
                let Some(chain) = q.pop_descriptor_chain(&a.mem) else {
                    match q.enable_notification(&a.mem) {
                        Ok(true) => continue 'queue,
                        _ => break 'queue,
                    }
                };
                let head = chain.head_index();
                match packet::read_packet(chain, &a.mem, &mut self.payload) {
                    Ok(h) => self.muxer.handle_guest_packet(&h, &self.payload, w),
                    Err(packet::TxError::Truncated { header, .. }) => self.muxer.handle_truncated(&header, w),
                    Err(e) => log::debug!("vsock: tx packet dropped: {e}"),
                }
                notify |= complete(q, &a.mem, head, 0);
            }
            // Owed RSTs fill up, or too much waits for host peers: wait
            // for the guest to take RSTs or for the peers to read.
            self.tx_stalled = true;
            let _ = q.enable_notification(&a.mem);
            break;
        }
        notify
    }

    /// Fills the guest's rx buffers with owed packets: (whether the guest
    /// must be told, packets delivered).
    fn process_rx(&mut self, w: &mut dyn FdWatch) -> (bool, usize) {
        let Self { active, muxer, scratch, .. } = self;
        let Some(a) = active.as_mut() else { return (false, 0) };
        let q = &mut a.queues[RX];
        let mut notify = false;
        let mut delivered = 0;
        while muxer.rx_pending() {
            let Some(chain) = q.pop_descriptor_chain(&a.mem) else { break };
            let head = chain.head_index();
            let mut writer: Writer<'_> = match chain.writer(&a.mem) {
                Ok(wr) if wr.available_bytes() >= HEADER_SIZE => wr,
                _ => {
                    log::debug!("vsock: rx buffer {head} unusable; returned empty");
                    notify |= complete(q, &a.mem, head, 0);
                    continue;
                }
            };
            let room = (writer.available_bytes() - HEADER_SIZE).min(scratch.len());
            let Some((h, n)) = muxer.next_rx(&mut scratch[..room], w) else {
                q.go_to_previous_position();
                break;
            };
            let len = packet::write_packet(&mut writer, &h, &scratch[..n]).unwrap_or_else(|e| {
                log::warn!("vsock: cannot write an rx packet: {e}");
                muxer.rx_lost(&h, w);
                0
            });
            notify |= complete(q, &a.mem, head, len);
            delivered += 1;
        }
        (notify, delivered)
    }

    /// Does all that can be done now (taking the tx queue's packets if
    /// `tx`); signals the guest if needed.
    fn run(&mut self, mut tx: bool, w: &mut dyn FdWatch) {
        let mut notify = self.deliver_events();
        self.check_reset_ack();
        self.arm_ack_timer();
        loop {
            if tx {
                notify |= self.process_tx(w);
            }
            self.muxer.sync(w);
            // Sending can owe more (a credit request after the last
            // credit was used): go on while packets go out.
            loop {
                let (n, delivered) = self.process_rx(w);
                notify |= n;
                self.muxer.sync(w);
                if delivered == 0 || !self.muxer.rx_pending() {
                    break;
                }
            }
            // Owed RSTs went out, or host peers read: the waiting tx
            // packets can come in.
            tx = self.tx_stalled && !self.muxer.tx_blocked();
            if !tx {
                break;
            }
        }
        if notify {
            self.signal();
        }
    }

    fn handle_queue(&mut self, index: usize, w: &mut dyn FdWatch) {
        self.muxer.close_released(w);
        if self.active.is_some() {
            self.run(index == TX || self.tx_stalled, w);
        }
    }

    fn handle_fd(&mut self, fd: RawFd, events: EventSet, w: &mut dyn FdWatch) {
        self.muxer.close_released(w);
        if fd == self.ack_timer.as_raw_fd() {
            self.ack_timer_fired();
        }
        if self.active.is_none() {
            return;
        }
        if fd == self.ack_timer.as_raw_fd() {
            // Nothing more: `run` below lets the refusals out.
        } else if fd == self.muxer.listener_fd() {
            self.muxer.accept(w);
        } else {
            self.muxer.handle_fd(fd, events, w);
        }
        self.run(false, w);
    }
}

impl Drop for Vsock {
    fn drop(&mut self) {
        // Remove the socket file if it is still the one we bound.
        let still_ours = std::fs::symlink_metadata(&self.uds_path)
            .ok()
            .is_some_and(|m| Some((m.dev(), m.ino())) == self.uds_id);
        if still_ours {
            let _ = std::fs::remove_file(&self.uds_path);
        }
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        TYPE_VSOCK
    }

    fn features(&self) -> u64 {
        0
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_MAX_SIZES
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_vsock_config { le64 guest_cid; }
        super::read_config_bytes(&self.guest_cid.to_le_bytes(), offset, data);
    }

    fn activate(&mut self, ctx: ActivateContext<'_>) -> Result<(), ActivateError> {
        if ctx.queues.len() != 3 {
            return Err(ActivateError::BadQueue(ctx.queues.len()));
        }
        self.active = Some(Active { mem: ctx.mem, queues: ctx.queues, interrupt: ctx.interrupt.clone() });
        self.muxer.activated();
        self.tx_stalled = false;
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
        self.transport_reset_owed = false;
        self.reset_unacked = None;
        self.disarm_ack_timer();
        self.tx_stalled = false;
        // Closed by `release_fds`, on the event loop.
        self.muxer.release_all();
    }

    fn after_restore(&mut self) {
        // The host streams of the snapshot's VM are gone: the guest must
        // drop its connections and listen afresh. Until its processes have
        // closed their sockets, a new connection on an old one's ports
        // would be refused: this VMM's host ports start elsewhere than the
        // snapshot's VMM's did.
        self.muxer.start_local_ports_at(restored_first_port(std::time::SystemTime::now()));
        self.transport_reset();
    }

    fn queue_states(&self) -> Vec<virtio_queue::QueueState> {
        self.active.as_ref().map_or_else(Vec::new, |a| a.queues.iter().map(|q| q.state()).collect())
    }

    fn is_active(&self) -> bool {
        self.active.is_some()
    }

    fn process_queue(&mut self, index: usize, ops: &mut EventOps) {
        self.handle_queue(index, ops);
    }

    fn watched_fds(&self) -> Vec<(RawFd, EventSet)> {
        vec![(self.muxer.listener_fd(), EventSet::IN), (self.ack_timer.as_raw_fd(), EventSet::IN)]
    }

    fn process_fd(&mut self, fd: RawFd, events: EventSet, ops: &mut EventOps) {
        self.handle_fd(fd, events, ops);
    }

    fn release_fds(&mut self, ops: &mut EventOps) {
        self.muxer.release_all();
        self.muxer.close_released(ops);
    }
}
