//! One stream between a host Unix socket and a guest vsock port: its
//! state, the guest's bytes the host has not taken yet, the control packets
//! owed to the guest, and credit accounting in both directions.
//!
//! Credit (virtio 1.2, 5.10.6.3): each side advertises `buf_alloc` (its
//! receive buffer) and `fwd_cnt` (bytes it has consumed). A sender may
//! have at most `peer.buf_alloc - (tx_cnt - peer.fwd_cnt)` bytes in flight.
//! Here "consumed" means written to the host stream, so the bytes buffered
//! for a slow host are bounded by the [`BUF_ALLOC`] we advertise; a guest
//! that sends past it is misbehaving and gets an RST. Every connection of a
//! device also counts its buffered bytes in a [`BufferedTotal`] shared with
//! the others, which the device bounds (see `Muxer::tx_blocked`).

use std::collections::VecDeque;
use std::io::{self, Read};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use vmm_sys_util::epoll::EventSet;

use super::packet::{self, Header, HOST_CID, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM};
use super::socket;

/// Receive buffer advertised to the guest: the most guest bytes buffered
/// per connection while the host is slow to read.
pub const BUF_ALLOC: u32 = 256 * 1024;
/// Bytes forwarded to the host since the guest last heard our `fwd_cnt`
/// after which a CREDIT_UPDATE is sent unasked.
pub const CREDIT_UPDATE_THRESHOLD: u32 = BUF_ALLOC / 2;

/// The bytes buffered for the host by all connections of one device:
/// each connection adds what it buffers and takes away what it writes out,
/// drops on reset, or still holds when it goes away.
#[derive(Clone, Debug, Default)]
pub struct BufferedTotal(Arc<AtomicUsize>);

impl BufferedTotal {
    /// Bytes buffered now.
    pub fn get(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }

    fn add(&self, n: usize) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    fn sub(&self, n: usize) {
        self.0.fetch_sub(n, Ordering::Relaxed);
    }
}

/// A connection's name: (host-side port, guest-side port).
pub type Key = (u32, u32);

/// Where a connection is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Host-initiated: the REQUEST is owed or sent; the host waits for `OK`.
    Requesting,
    /// Bytes flow.
    Established,
    /// The host stream is closed; an RST is owed to the guest, after which
    /// the connection is forgotten.
    Closing,
}

/// Control packets owed to the guest (bit set).
pub mod pending {
    pub const RST: u8 = 1;
    pub const REQUEST: u8 = 2;
    pub const RESPONSE: u8 = 4;
    pub const SHUTDOWN: u8 = 8;
    pub const CREDIT_REQUEST: u8 = 16;
    pub const CREDIT_UPDATE: u8 = 32;
}

/// Why a connection must be reset.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("host stream: {0}")]
    Io(#[from] io::Error),
    #[error("guest sent past its credit ({0} bytes would be buffered)")]
    Overflow(usize),
    #[error("guest sent data after shutting down its send side")]
    DataAfterShutdown,
}

/// What a read from the host stream gave.
#[derive(Debug, PartialEq, Eq)]
pub enum HostRead {
    Data(usize),
    /// Nothing to read now.
    Empty,
    /// The host will send no more.
    Eof,
}

/// One connection.
#[derive(Debug)]
pub struct Connection {
    stream: Option<UnixStream>,
    state: State,
    local_port: u32,
    peer_port: u32,
    pending: u8,
    /// Events the stream is registered for in the event loop (empty: not registered).
    pub registered: EventSet,
    /// Whether the connection is in the muxer's rx queue.
    pub in_rxq: bool,

    // Guest to host.
    tx_buf: VecDeque<u8>,
    /// The device's count of buffered bytes, which `tx_buf` is part of.
    total: BufferedTotal,
    /// Leading bytes of `tx_buf` that are the `OK` line, not guest data.
    tx_prefix: usize,
    fwd_cnt: u32,
    last_fwd_cnt_sent: u32,
    guest_send_done: bool,
    host_write_shut: bool,

    // Host to guest.
    tx_cnt: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// No more reading from the host (its EOF, or the guest will not receive).
    read_done: bool,
    /// The host stream is (believed) readable.
    want_rx: bool,
    credit_requested: bool,
}

impl Connection {
    fn new(stream: UnixStream, state: State, local_port: u32, peer_port: u32, pending: u8, total: &BufferedTotal) -> Self {
        Self {
            stream: Some(stream),
            state,
            local_port,
            peer_port,
            pending,
            registered: EventSet::empty(),
            in_rxq: false,
            tx_buf: VecDeque::new(),
            total: total.clone(),
            tx_prefix: 0,
            fwd_cnt: 0,
            last_fwd_cnt_sent: 0,
            guest_send_done: false,
            host_write_shut: false,
            tx_cnt: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            read_done: false,
            want_rx: false,
            credit_requested: false,
        }
    }

    /// A host-initiated connection: a REQUEST to the guest is owed. Its
    /// buffered bytes count in `total`.
    pub fn host_initiated(stream: UnixStream, local_port: u32, peer_port: u32, total: &BufferedTotal) -> Self {
        Self::new(stream, State::Requesting, local_port, peer_port, pending::REQUEST, total)
    }

    /// A guest-initiated connection, connected on the host: a RESPONSE is
    /// owed. Its buffered bytes count in `total`.
    pub fn guest_initiated(stream: UnixStream, request: &Header, total: &BufferedTotal) -> Self {
        let mut c =
            Self::new(stream, State::Established, request.dst_port, request.src_port, pending::RESPONSE, total);
        c.update_peer_credit(request);
        c
    }

    pub fn key(&self) -> Key {
        (self.local_port, self.peer_port)
    }

    pub fn state(&self) -> State {
        self.state
    }

    /// The host stream's descriptor, while it is open.
    pub fn fd(&self) -> Option<RawFd> {
        self.stream.as_ref().map(AsRawFd::as_raw_fd)
    }

    /// Takes the host stream out to close it (after it left the event loop).
    pub fn take_stream(&mut self) -> Option<UnixStream> {
        self.stream.take()
    }

    /// Bytes of guest data waiting for the host to take them.
    pub fn buffered(&self) -> usize {
        self.tx_buf.len() - self.tx_prefix
    }

    /// Records the guest's `buf_alloc` and `fwd_cnt` (every packet carries them).
    pub fn update_peer_credit(&mut self, h: &Header) {
        self.peer_buf_alloc = h.buf_alloc;
        self.peer_fwd_cnt = h.fwd_cnt;
        if self.peer_credit() > 0 {
            self.credit_requested = false;
        }
    }

    /// Bytes the guest can take now. A guest whose counters make no sense
    /// (acknowledging bytes never sent, shrinking its buffer) gets none.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = self.tx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// The guest answered our REQUEST: the host is told `OK <port>`.
    pub fn accept_response(&mut self) -> Result<(), ConnError> {
        self.state = State::Established;
        let line = format!("OK {}\n", self.local_port);
        let sent = self.send_direct(line.as_bytes())?;
        let rest = &line.as_bytes()[sent..];
        self.buffer(rest);
        self.tx_prefix += rest.len();
        Ok(())
    }

    /// Keeps `data` for the host, counted in the device's total.
    fn buffer(&mut self, data: &[u8]) {
        self.tx_buf.extend(data);
        self.total.add(data.len());
    }

    fn send_direct(&mut self, data: &[u8]) -> Result<usize, ConnError> {
        if !self.tx_buf.is_empty() || data.is_empty() {
            return Ok(0);
        }
        let Some(s) = &self.stream else { return Ok(0) };
        match socket::send(s, data) {
            Ok(n) => Ok(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
            Err(e) => Err(e.into()),
        }
    }

    /// An RW packet's payload: written to the host stream, and what it
    /// does not take now is buffered.
    pub fn guest_data(&mut self, data: &[u8]) -> Result<(), ConnError> {
        if self.guest_send_done {
            return Err(ConnError::DataAfterShutdown);
        }
        let sent = self.send_direct(data)?;
        self.forwarded(sent);
        let rest = &data[sent..];
        let total = self.buffered() + rest.len();
        if total > BUF_ALLOC as usize {
            return Err(ConnError::Overflow(total));
        }
        self.buffer(rest);
        Ok(())
    }

    fn forwarded(&mut self, n: usize) {
        self.fwd_cnt = self.fwd_cnt.wrapping_add(n as u32);
        if self.fwd_cnt.wrapping_sub(self.last_fwd_cnt_sent) >= CREDIT_UPDATE_THRESHOLD {
            self.pending |= pending::CREDIT_UPDATE;
        }
    }

    /// Writes buffered bytes to the host stream; once the guest has shut
    /// its send side and everything is out, shuts the host stream's write
    /// side.
    pub fn flush(&mut self) -> Result<(), ConnError> {
        while !self.tx_buf.is_empty() {
            let Some(s) = &self.stream else { return Ok(()) };
            let (front, _) = self.tx_buf.as_slices();
            let n = match socket::send(s, front) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e.into()),
            };
            if n == 0 {
                break;
            }
            self.tx_buf.drain(..n);
            self.total.sub(n);
            let prefix = n.min(self.tx_prefix);
            self.tx_prefix -= prefix;
            self.forwarded(n - prefix);
        }
        self.shut_write_if_done()
    }

    fn shut_write_if_done(&mut self) -> Result<(), ConnError> {
        if self.guest_send_done && self.tx_buf.is_empty() && !self.host_write_shut {
            self.host_write_shut = true;
            if let Some(s) = &self.stream {
                match s.shutdown(Shutdown::Write) {
                    Err(e) if e.kind() != io::ErrorKind::NotConnected => return Err(e.into()),
                    _ => {}
                }
            }
        }
        Ok(())
    }

    /// The guest sent SHUTDOWN with `flags`.
    pub fn guest_shutdown(&mut self, flags: u32) -> Result<(), ConnError> {
        if flags & SHUTDOWN_RCV != 0 && !self.read_done {
            self.read_done = true;
            self.want_rx = false;
            if let Some(s) = &self.stream {
                // The host's further writes fail instead of piling up.
                let _ = s.shutdown(Shutdown::Read);
            }
        }
        if flags & SHUTDOWN_SEND != 0 {
            self.guest_send_done = true;
        }
        self.shut_write_if_done()
    }

    /// Both directions are finished: the connection can be reset and forgotten.
    pub fn done(&self) -> bool {
        self.read_done && self.guest_send_done && self.tx_buf.is_empty()
    }

    /// The event loop says the host stream is readable (or hung up).
    pub fn host_readable(&mut self) {
        if self.state == State::Established && !self.read_done {
            self.want_rx = true;
        }
    }

    /// Reads host bytes for one RW packet into `buf` (the caller sized it
    /// to the guest's credit and rx buffer).
    pub fn read_host(&mut self, buf: &mut [u8]) -> Result<HostRead, ConnError> {
        if buf.is_empty() || !self.want_rx {
            return Ok(HostRead::Empty);
        }
        let Some(mut s) = self.stream.as_ref() else { return Ok(HostRead::Empty) };
        loop {
            return match s.read(buf) {
                Ok(0) => {
                    self.read_done = true;
                    self.want_rx = false;
                    if !self.done() {
                        self.pending |= pending::SHUTDOWN;
                    }
                    Ok(HostRead::Eof)
                }
                Ok(n) => {
                    self.tx_cnt = self.tx_cnt.wrapping_add(n as u32);
                    if n < buf.len() {
                        // A stream socket returns less only when it is empty.
                        self.want_rx = false;
                    }
                    Ok(HostRead::Data(n))
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.want_rx = false;
                    Ok(HostRead::Empty)
                }
                Err(e) => Err(e.into()),
            };
        }
    }

    /// Whether host data can go to the guest now.
    pub fn can_send_data(&self) -> bool {
        self.state == State::Established && self.want_rx && !self.read_done && self.peer_credit() > 0
    }

    /// Whether the connection has a packet for the guest.
    pub fn has_rx(&self) -> bool {
        self.pending != 0 || self.can_send_data()
    }

    /// If host data waits but the guest gave no credit, asks for some (once).
    pub fn request_credit_if_stalled(&mut self) {
        let stalled = self.state == State::Established && self.want_rx && !self.read_done && self.peer_credit() == 0;
        if stalled && !self.credit_requested {
            self.credit_requested = true;
            self.pending |= pending::CREDIT_REQUEST;
        }
    }

    /// The events to watch the host stream for. Nothing while the guest
    /// cannot take data (no credit, no rx buffers: `want_rx` stays set),
    /// so a readable stream never makes the level-triggered loop spin.
    pub fn interest(&self) -> EventSet {
        let mut set = EventSet::empty();
        if self.stream.is_none() || self.state != State::Established {
            return set;
        }
        if !self.read_done && !self.want_rx {
            set |= EventSet::IN;
        }
        if !self.tx_buf.is_empty() {
            set |= EventSet::OUT;
        }
        set
    }

    /// Owes the guest the control packet `bit` (a [`pending`] bit).
    pub fn owe(&mut self, bit: u8) {
        self.pending |= bit;
    }

    /// Marks the connection for reset: the stream is to be closed (by the
    /// muxer) and only an RST is owed.
    pub fn set_reset(&mut self) {
        self.state = State::Closing;
        self.pending = pending::RST;
        self.want_rx = false;
        // The stream is being closed: what it did not take is lost.
        self.total.sub(self.tx_buf.len());
        self.tx_buf.clear();
        self.tx_prefix = 0;
    }

    /// The next control packet owed, highest priority first.
    pub fn take_pending(&mut self) -> Option<u16> {
        const ORDER: [(u8, u16); 6] = [
            (pending::RST, packet::OP_RST),
            (pending::REQUEST, packet::OP_REQUEST),
            (pending::RESPONSE, packet::OP_RESPONSE),
            (pending::SHUTDOWN, packet::OP_SHUTDOWN),
            (pending::CREDIT_REQUEST, packet::OP_CREDIT_REQUEST),
            (pending::CREDIT_UPDATE, packet::OP_CREDIT_UPDATE),
        ];
        let &(bit, op) = ORDER.iter().find(|(bit, _)| self.pending & bit != 0)?;
        self.pending &= !bit;
        Some(op)
    }

    /// A header from this connection to the guest; it tells the guest our
    /// current `fwd_cnt`, so no separate CREDIT_UPDATE is owed after it.
    pub fn header(&mut self, op: u16, guest_cid: u64) -> Header {
        self.last_fwd_cnt_sent = self.fwd_cnt;
        self.pending &= !pending::CREDIT_UPDATE;
        Header {
            src_cid: HOST_CID,
            dst_cid: guest_cid,
            src_port: self.local_port,
            dst_port: self.peer_port,
            len: 0,
            type_: TYPE_STREAM,
            op,
            flags: if op == packet::OP_SHUTDOWN { SHUTDOWN_SEND } else { 0 },
            buf_alloc: BUF_ALLOC,
            fwd_cnt: self.fwd_cnt,
        }
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.total.sub(self.tx_buf.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (Connection, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        b.set_nonblocking(true).unwrap();
        let req = Header { src_port: 1000, dst_port: 52, buf_alloc: 4096, op: packet::OP_REQUEST, ..Default::default() };
        (Connection::guest_initiated(a, &req, &BufferedTotal::default()), b)
    }

    #[test]
    fn credit_arithmetic_wraps_and_distrusts_the_guest() {
        let (mut c, _h) = pair();
        assert_eq!(c.peer_credit(), 4096);
        c.tx_cnt = 1000;
        assert_eq!(c.peer_credit(), 3096);
        c.update_peer_credit(&Header { buf_alloc: 4096, fwd_cnt: 1000, ..Default::default() });
        assert_eq!(c.peer_credit(), 4096);
        // Counters wrap around u32.
        c.tx_cnt = 5;
        c.update_peer_credit(&Header { buf_alloc: 4096, fwd_cnt: u32::MAX - 10, ..Default::default() });
        assert_eq!(c.peer_credit(), 4096 - 16);
        // Acknowledging more than was sent, or shrinking the buffer below
        // what is in flight: no credit, no panic.
        c.update_peer_credit(&Header { buf_alloc: 4096, fwd_cnt: 100, ..Default::default() });
        assert_eq!(c.peer_credit(), 0);
        c.update_peer_credit(&Header { buf_alloc: 0, fwd_cnt: 0, ..Default::default() });
        assert_eq!(c.peer_credit(), 0);
    }

    #[test]
    fn guest_bytes_are_buffered_up_to_buf_alloc() {
        let (mut c, h) = pair();
        // Fill the host's socket buffer until it refuses more.
        let chunk = vec![7u8; 64 * 1024];
        let mut total = 0usize;
        while c.buffered() == 0 {
            c.guest_data(&chunk).unwrap();
            total += chunk.len();
            assert!(total < 64 << 20, "the socket never filled");
        }
        assert_eq!(c.interest() & EventSet::OUT, EventSet::OUT);
        while c.buffered() + chunk.len() <= BUF_ALLOC as usize {
            c.guest_data(&chunk).unwrap();
            total += chunk.len();
        }
        // fwd_cnt counts what reached the host socket; a credit update
        // became due on the way.
        assert_eq!(c.fwd_cnt as usize + c.buffered(), total);
        assert_ne!(c.pending & pending::CREDIT_UPDATE, 0);
        assert!(matches!(c.guest_data(&chunk), Err(ConnError::Overflow(_))));
        drop(h);
        assert!(matches!(c.flush(), Err(ConnError::Io(_))));
    }

    #[test]
    fn the_shared_total_follows_every_buffer() {
        let total = BufferedTotal::default();
        let conn = |total: &BufferedTotal| {
            let (a, b) = UnixStream::pair().unwrap();
            a.set_nonblocking(true).unwrap();
            let req = Header { src_port: 1000, dst_port: 52, buf_alloc: 4096, ..Default::default() };
            (Connection::guest_initiated(a, &req, total), b)
        };
        let (mut c1, mut h1) = conn(&total);
        let (mut c2, _h2) = conn(&total);
        let chunk = vec![1u8; 32 * 1024];
        for c in [&mut c1, &mut c2] {
            while c.buffered() < 64 * 1024 {
                c.guest_data(&chunk).unwrap();
            }
        }
        assert_eq!(total.get(), c1.buffered() + c2.buffered());
        // The host takes some: the total goes down by as much.
        h1.set_nonblocking(true).unwrap();
        let mut sink = vec![0u8; 1 << 20];
        while h1.read(&mut sink).is_ok() {}
        c1.flush().unwrap();
        assert_eq!(total.get(), c1.buffered() + c2.buffered());
        // A reset drops the buffer; a connection that goes away takes its bytes along.
        c2.set_reset();
        assert_eq!(c2.buffered(), 0);
        assert_eq!(total.get(), c1.buffered());
        while c1.buffered() == 0 {
            c1.guest_data(&chunk).unwrap();
        }
        drop(c1);
        assert_eq!(total.get(), 0);
    }

    #[test]
    fn ok_line_is_not_guest_data() {
        let (a, mut h) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        let mut c = Connection::host_initiated(a, 1 << 30, 52, &BufferedTotal::default());
        assert_eq!(c.take_pending(), Some(packet::OP_REQUEST));
        assert_eq!(c.interest(), EventSet::empty(), "nothing to watch before the guest answers");
        c.accept_response().unwrap();
        assert_eq!(c.state(), State::Established);
        assert_eq!(c.fwd_cnt, 0);
        let mut line = [0u8; 14];
        h.read_exact(&mut line).unwrap();
        assert_eq!(&line, b"OK 1073741824\n");
    }

    #[test]
    fn shutdown_both_ways_is_done() {
        let (mut c, mut h) = pair();
        c.guest_shutdown(SHUTDOWN_SEND).unwrap();
        assert!(!c.done());
        let mut b = [0u8; 4];
        assert_eq!(h.read(&mut b).unwrap(), 0, "host sees EOF");
        std::io::Write::write_all(&mut h, b"hi").unwrap();
        h.shutdown(Shutdown::Write).unwrap();
        c.host_readable();
        let mut buf = [0u8; 16];
        assert_eq!(c.read_host(&mut buf).unwrap(), HostRead::Data(2));
        c.host_readable();
        assert_eq!(c.read_host(&mut buf).unwrap(), HostRead::Eof);
        assert!(c.done());
        assert!(matches!(c.guest_data(b"x"), Err(ConnError::DataAfterShutdown)));
    }

    #[test]
    fn headers_carry_counters_and_clear_credit_update() {
        let (mut c, _h) = pair();
        c.pending |= pending::CREDIT_UPDATE;
        c.fwd_cnt = 77;
        let h = c.header(packet::OP_RW, 3);
        assert_eq!((h.src_cid, h.dst_cid, h.src_port, h.dst_port), (HOST_CID, 3, 52, 1000));
        assert_eq!((h.buf_alloc, h.fwd_cnt, h.type_), (BUF_ALLOC, 77, TYPE_STREAM));
        assert_eq!(c.take_pending(), Some(packet::OP_RESPONSE));
        assert_eq!(c.take_pending(), None);
    }
}
