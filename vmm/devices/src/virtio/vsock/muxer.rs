//! The host side of the device: the listening socket and the handshake of
//! host connections (`CONNECT <port>\n`), connections to `<uds>_<port>` for
//! guest requests, the dispatch of guest packets to connections, and the
//! order in which connections speak to the guest.
//!
//! Each host stream is in the event loop only while something is expected
//! of it (see [`Connection::interest`]); the muxer adds, changes and removes
//! it through an [`FdWatch`] and removes it before closing it.
//!
//! While the guest has not yet handled a transport reset (after a
//! restore), host connections that sent their `CONNECT` line are held
//! ([`Muxer::hold`]): the REQUEST would reach guest sockets that the reset
//! is about to drop, and the connection would be lost. They are out of the
//! event loop meanwhile, count towards [`MAX_CONNECTIONS`], and go on
//! ([`Muxer::release_held`]) or are refused ([`Muxer::refuse_held`]) when
//! the device says so.

use std::collections::{HashMap, VecDeque};
use std::ffi::OsString;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use event_manager::{EventOps, Events};
use vmm_sys_util::epoll::EventSet;

use super::connection::{pending, BufferedTotal, ConnError, Connection, HostRead, Key, State};
use super::packet::{self, Header, HOST_CID, TYPE_STREAM};
use super::socket;

/// Most connections (and host connections still in their handshake) per device.
pub const MAX_CONNECTIONS: usize = 1024;
/// Default bound on the guest bytes buffered for slow host peers, across
/// all connections of a device (each connection is also bounded by the
/// credit it advertises, `connection::BUF_ALLOC`). At the bound the device
/// stops taking the guest's tx queue until host peers read.
pub const MAX_BUFFERED_BYTES: usize = 16 << 20;
/// Most RSTs owed for packets that belong to no connection; the tx queue
/// waits while this many are owed.
pub const MAX_STRAY_RSTS: usize = 256;
/// Longest `CONNECT <port>\n` line.
pub const CONNECT_LINE_MAX: usize = 32;
/// First host-side port of host-initiated connections.
pub const FIRST_LOCAL_PORT: u32 = 1 << 30;
const ACCEPTS_PER_EVENT: usize = 64;

/// What the device needs from the event loop: watch, change or stop
/// watching one of its descriptors.
pub trait FdWatch {
    fn add(&mut self, fd: RawFd, events: EventSet) -> io::Result<()>;
    fn modify(&mut self, fd: RawFd, events: EventSet) -> io::Result<()>;
    fn remove(&mut self, fd: RawFd, events: EventSet) -> io::Result<()>;
}

fn ops_error(e: event_manager::Error) -> io::Error {
    io::Error::other(e.to_string())
}

impl FdWatch for EventOps<'_> {
    fn add(&mut self, fd: RawFd, events: EventSet) -> io::Result<()> {
        EventOps::add(self, Events::new_raw(fd, events)).map_err(ops_error)
    }
    fn modify(&mut self, fd: RawFd, events: EventSet) -> io::Result<()> {
        EventOps::modify(self, Events::new_raw(fd, events)).map_err(ops_error)
    }
    fn remove(&mut self, fd: RawFd, events: EventSet) -> io::Result<()> {
        EventOps::remove(self, Events::new_raw(fd, events)).map_err(ops_error)
    }
}

/// Parses `CONNECT <port>\n` (case-insensitive, spaces tolerated, as
/// Firecracker does).
pub fn parse_connect_line(line: &[u8]) -> Option<u32> {
    let text = std::str::from_utf8(line.strip_suffix(b"\n")?).ok()?;
    let mut words = text.split_ascii_whitespace();
    let verb = words.next()?;
    let port = words.next()?.parse().ok()?;
    (verb.eq_ignore_ascii_case("connect") && words.next().is_none()).then_some(port)
}

/// A host connection that has not finished its `CONNECT` line.
#[derive(Debug)]
struct Handshake {
    stream: UnixStream,
    line: Vec<u8>,
}

/// Removes a connection's stream from the event loop and closes it.
fn close_stream(conn: &mut Connection, by_fd: &mut HashMap<RawFd, Key>, w: &mut dyn FdWatch) {
    if let Some(fd) = conn.fd() {
        if !conn.registered.is_empty() {
            if let Err(e) = w.remove(fd, conn.registered) {
                log::warn!("vsock: cannot stop watching fd {fd}: {e}");
            }
        }
        by_fd.remove(&fd);
    }
    conn.registered = EventSet::empty();
    drop(conn.take_stream());
}

/// The host side of one vsock device.
#[derive(Debug)]
pub struct Muxer {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    listener_paused: bool,
    max_connections: usize,
    /// Guest bytes buffered by all connections.
    buffered: BufferedTotal,
    max_buffered: usize,
    conns: HashMap<Key, Connection>,
    by_fd: HashMap<RawFd, Key>,
    handshakes: HashMap<RawFd, Handshake>,
    /// Whether completed handshakes are held instead of sent to the guest.
    holding: bool,
    /// Host connections held, in arrival order: (stream, guest port).
    held: VecDeque<(UnixStream, u32)>,
    /// Connections with a packet for the guest, in turn.
    rxq: VecDeque<Key>,
    /// RSTs owed for packets of no connection.
    strays: VecDeque<Header>,
    /// Connections whose state changed since the last [`Muxer::sync`].
    touched: Vec<Key>,
    /// Streams of a reset device: still watched, closed on the next call
    /// that can reach the event loop.
    released: Vec<(UnixStream, EventSet)>,
    next_local_port: u32,
}

impl Muxer {
    /// A muxer for the guest `guest_cid`, accepting host connections on
    /// `listener` (non-blocking, bound at `uds_path`).
    pub fn new(guest_cid: u64, uds_path: &Path, listener: UnixListener) -> Self {
        Self {
            guest_cid,
            uds_path: uds_path.to_path_buf(),
            listener,
            listener_paused: false,
            max_connections: MAX_CONNECTIONS,
            buffered: BufferedTotal::default(),
            max_buffered: MAX_BUFFERED_BYTES,
            conns: HashMap::new(),
            by_fd: HashMap::new(),
            handshakes: HashMap::new(),
            holding: false,
            held: VecDeque::new(),
            rxq: VecDeque::new(),
            strays: VecDeque::new(),
            touched: Vec::new(),
            released: Vec::new(),
            next_local_port: FIRST_LOCAL_PORT,
        }
    }

    #[cfg(test)]
    pub fn set_max_connections(&mut self, n: usize) {
        self.max_connections = n;
    }

    /// Bounds the guest bytes buffered across connections (default
    /// [`MAX_BUFFERED_BYTES`]).
    pub fn set_max_buffered(&mut self, bytes: usize) {
        self.max_buffered = bytes;
    }

    /// Guest bytes buffered for host peers, across connections.
    pub fn buffered_bytes(&self) -> usize {
        self.buffered.get()
    }

    pub fn listener_fd(&self) -> RawFd {
        self.listener.as_raw_fd()
    }

    /// Connections, handshakes and held host connections alive.
    pub fn connection_count(&self) -> usize {
        self.conns.len() + self.handshakes.len() + self.held.len()
    }

    /// From now on, host connections that complete their handshake are
    /// held: no REQUEST goes to the guest until [`Muxer::release_held`].
    pub fn hold(&mut self) {
        self.holding = true;
    }

    /// Whether host connections are held.
    pub fn holding(&self) -> bool {
        self.holding
    }

    /// Host connections held now.
    pub fn held_count(&self) -> usize {
        self.held.len()
    }

    /// Stops holding: the held connections become connections whose
    /// REQUEST is owed to the guest, in the order they arrived.
    pub fn release_held(&mut self) {
        self.holding = false;
        while let Some((stream, port)) = self.held.pop_front() {
            self.open_host_connection(stream, port, EventSet::empty());
        }
    }

    /// Stops holding: the held connections are refused, each told `why`
    /// on an error line (`ERR <why>\n`, where a granted connection reads
    /// `OK <port>\n`) and closed.
    pub fn refuse_held(&mut self, why: &str) {
        self.holding = false;
        let line = format!("ERR {why}\n");
        for (stream, port) in self.held.drain(..) {
            log::debug!("vsock: host connection to guest port {port} refused: {why}");
            // A fresh socket's buffer takes a short line; if it does not,
            // the close alone says no.
            let _ = (&stream).write(line.as_bytes());
        }
    }

    /// The device was (re)activated: the event loop watches the listener again.
    pub fn activated(&mut self) {
        self.listener_paused = false;
    }

    /// Whether a packet is owed to the guest.
    pub fn rx_pending(&self) -> bool {
        !self.strays.is_empty() || !self.rxq.is_empty()
    }

    /// Whether the tx queue must wait for owed RSTs to drain.
    pub fn strays_full(&self) -> bool {
        self.strays.len() >= MAX_STRAY_RSTS
    }

    /// Whether the tx queue must wait: for owed RSTs to reach the guest,
    /// or for host peers to read what is buffered for them (back-pressure:
    /// the guest's packets stay in its queue, nothing is dropped). The
    /// buffered bytes may pass the bound by one packet's payload.
    ///
    /// While it waits, no guest packet is taken, for any connection: host
    /// peers that do not read hold up the guest's other streams until they
    /// read or close.
    pub fn tx_blocked(&self) -> bool {
        self.strays_full() || self.buffered.get() >= self.max_buffered
    }

    /// Forgets every connection (device or transport reset). The streams
    /// stay open and watched until [`Muxer::close_released`] runs on the
    /// event loop.
    pub fn release_all(&mut self) {
        for (_, mut c) in self.conns.drain() {
            if let Some(s) = c.take_stream() {
                self.released.push((s, c.registered));
            }
        }
        for (_, h) in self.handshakes.drain() {
            self.released.push((h.stream, EventSet::IN));
        }
        for (s, _) in self.held.drain(..) {
            self.released.push((s, EventSet::empty()));
        }
        self.holding = false;
        self.by_fd.clear();
        self.rxq.clear();
        self.strays.clear();
        self.touched.clear();
    }

    /// Stops watching and closes the streams of [`Muxer::release_all`].
    pub fn close_released(&mut self, w: &mut dyn FdWatch) {
        for (s, set) in self.released.drain(..) {
            if !set.is_empty() {
                let _ = w.remove(s.as_raw_fd(), set);
            }
        }
    }

    fn port_path(&self, port: u32) -> OsString {
        let mut p = self.uds_path.as_os_str().to_owned();
        p.push(format!("_{port}"));
        p
    }

    fn touch(&mut self, key: Key) {
        self.touched.push(key);
    }

    // ---- host side ----

    /// The listener is readable: takes new host connections.
    pub fn accept(&mut self, w: &mut dyn FdWatch) {
        for _ in 0..ACCEPTS_PER_EVENT {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if matches!(e.kind(), io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted) => continue,
                Err(e) => {
                    // Out of descriptors or similar: a listener that stays
                    // readable must not make the loop spin. It is watched
                    // again when a connection goes away.
                    log::warn!("vsock: cannot accept on {}: {e}; pausing", self.uds_path.display());
                    self.pause_listener(w);
                    return;
                }
            };
            if self.connection_count() >= self.max_connections {
                log::warn!("vsock: {} connections open; refusing a host connection", self.max_connections);
                continue; // dropped: closed
            }
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            let fd = stream.as_raw_fd();
            match w.add(fd, EventSet::IN) {
                Ok(()) => {
                    self.handshakes.insert(fd, Handshake { stream, line: Vec::new() });
                }
                Err(e) => log::warn!("vsock: cannot watch a host connection: {e}"),
            }
        }
    }

    fn pause_listener(&mut self, w: &mut dyn FdWatch) {
        if !self.listener_paused {
            let _ = w.remove(self.listener.as_raw_fd(), EventSet::IN);
            self.listener_paused = true;
        }
    }

    fn resume_listener(&mut self, w: &mut dyn FdWatch) {
        if self.listener_paused && self.connection_count() < self.max_connections {
            if let Err(e) = w.add(self.listener.as_raw_fd(), EventSet::IN) {
                log::warn!("vsock: cannot watch the listener again: {e}");
            }
            self.listener_paused = false;
        }
    }

    /// One of the muxer's streams is ready.
    pub fn handle_fd(&mut self, fd: RawFd, events: EventSet, w: &mut dyn FdWatch) {
        if self.handshakes.contains_key(&fd) {
            self.handshake_readable(fd, w);
        } else if let Some(&key) = self.by_fd.get(&fd) {
            self.conn_event(key, events, w);
        }
    }

    fn close_handshake(&mut self, fd: RawFd, w: &mut dyn FdWatch) {
        if let Some(h) = self.handshakes.remove(&fd) {
            let _ = w.remove(fd, EventSet::IN);
            drop(h.stream);
        }
    }

    fn handshake_readable(&mut self, fd: RawFd, w: &mut dyn FdWatch) {
        let Some(h) = self.handshakes.get_mut(&fd) else { return };
        let mut buf = [0u8; CONNECT_LINE_MAX];
        let room = CONNECT_LINE_MAX - h.line.len();
        // Peek first: bytes after the line are the stream's, not ours.
        let n = match socket::peek(&h.stream, &mut buf[..room]) {
            Ok(0) => return self.close_handshake(fd, w),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(_) => return self.close_handshake(fd, w),
        };
        let take = buf[..n].iter().position(|&b| b == b'\n').map_or(n, |i| i + 1);
        let got = match (&h.stream).read(&mut buf[..take]) {
            Ok(got) if got > 0 => got,
            _ => return self.close_handshake(fd, w),
        };
        h.line.extend_from_slice(&buf[..got]);
        if h.line.last() != Some(&b'\n') {
            if h.line.len() >= CONNECT_LINE_MAX {
                log::debug!("vsock: host connection sent no CONNECT line; closed");
                self.close_handshake(fd, w);
            }
            return;
        }
        let Some(port) = parse_connect_line(&h.line) else {
            log::debug!("vsock: bad CONNECT line {:?}; closed", String::from_utf8_lossy(&h.line));
            return self.close_handshake(fd, w);
        };
        let Some(h) = self.handshakes.remove(&fd) else { return };
        if self.holding {
            // Out of the event loop while held: bytes after the line are
            // the stream's and stay unread, which would keep it readable.
            if let Err(e) = w.remove(fd, EventSet::IN) {
                log::warn!("vsock: cannot stop watching fd {fd}: {e}");
            }
            log::debug!("vsock: host connection to guest port {port} held until the guest takes the transport reset");
            self.held.push_back((h.stream, port));
            return;
        }
        self.open_host_connection(h.stream, port, EventSet::IN); // as the handshake left it
    }

    /// A host connection that sent its `CONNECT` line: a REQUEST to the
    /// guest is owed. `registered`: what its stream is watched for now.
    fn open_host_connection(&mut self, stream: UnixStream, port: u32, registered: EventSet) {
        let fd = stream.as_raw_fd();
        let local_port = self.allocate_local_port(port);
        let mut conn = Connection::host_initiated(stream, local_port, port, &self.buffered);
        conn.registered = registered;
        let key = conn.key();
        self.by_fd.insert(fd, key);
        self.conns.insert(key, conn);
        self.touch(key);
    }

    /// Where the next host connection's local port is allocated from.
    pub fn start_local_ports_at(&mut self, port: u32) {
        self.next_local_port = port.max(FIRST_LOCAL_PORT);
    }

    fn allocate_local_port(&mut self, peer_port: u32) -> u32 {
        // At most MAX_CONNECTIONS ports are taken, so this ends quickly.
        loop {
            let port = self.next_local_port;
            self.next_local_port = port.checked_add(1).unwrap_or(FIRST_LOCAL_PORT);
            if !self.conns.contains_key(&(port, peer_port)) {
                return port;
            }
        }
    }

    fn conn_event(&mut self, key: Key, events: EventSet, w: &mut dyn FdWatch) {
        let Some(conn) = self.conns.get_mut(&key) else { return };
        if events.intersects(EventSet::IN | EventSet::READ_HANG_UP | EventSet::HANG_UP | EventSet::ERROR) {
            conn.host_readable();
        }
        let mut result = Ok(());
        if events.intersects(EventSet::OUT | EventSet::HANG_UP | EventSet::ERROR) {
            result = conn.flush();
            if result.is_ok() && events.contains(EventSet::HANG_UP) && conn.buffered() > 0 {
                result = Err(ConnError::Io(io::ErrorKind::BrokenPipe.into()));
            }
        }
        match result {
            Err(e) => {
                log::debug!("vsock: connection {key:?}: {e}; reset");
                self.reset(key, w);
            }
            Ok(()) if conn.done() => self.reset(key, w),
            Ok(()) => self.touch(key),
        }
    }

    /// Closes the host stream; an RST is owed to the guest.
    fn reset(&mut self, key: Key, w: &mut dyn FdWatch) {
        if let Some(conn) = self.conns.get_mut(&key) {
            conn.set_reset();
            close_stream(conn, &mut self.by_fd, w);
            self.touch(key);
        }
    }

    /// Closes the host stream and forgets the connection.
    fn forget(&mut self, key: Key, w: &mut dyn FdWatch) {
        if let Some(mut conn) = self.conns.remove(&key) {
            close_stream(&mut conn, &mut self.by_fd, w);
            if conn.in_rxq {
                self.rxq.retain(|k| *k != key);
            }
        }
    }

    // ---- guest side ----

    fn stray_rst(&mut self, h: &Header) {
        if h.op == packet::OP_RST || self.strays.len() >= MAX_STRAY_RSTS {
            return;
        }
        self.strays.push_back(Header {
            src_cid: h.dst_cid,
            dst_cid: h.src_cid,
            src_port: h.dst_port,
            dst_port: h.src_port,
            len: 0,
            type_: h.type_,
            op: packet::OP_RST,
            flags: 0,
            buf_alloc: 0,
            fwd_cnt: 0,
        });
    }

    /// A packet from the guest's tx queue.
    pub fn handle_guest_packet(&mut self, h: &Header, payload: &[u8], w: &mut dyn FdWatch) {
        if h.src_cid != self.guest_cid {
            log::debug!("vsock: packet from CID {} (guest is {}); dropped", h.src_cid, self.guest_cid);
            return;
        }
        if h.dst_cid != HOST_CID || h.type_ != TYPE_STREAM {
            return self.stray_rst(h);
        }
        let key = (h.dst_port, h.src_port);
        let Some(conn) = self.conns.get_mut(&key) else {
            match h.op {
                packet::OP_REQUEST => self.guest_connect(h),
                _ => self.stray_rst(h),
            }
            return;
        };
        conn.update_peer_credit(h);
        let result = match (conn.state(), h.op) {
            (_, packet::OP_RST) => return self.forget(key, w),
            (State::Closing, _) => Ok(()),
            (_, packet::OP_CREDIT_UPDATE) => Ok(()),
            (_, packet::OP_CREDIT_REQUEST) => {
                conn.owe(pending::CREDIT_UPDATE);
                Ok(())
            }
            (State::Requesting, packet::OP_RESPONSE) => conn.accept_response(),
            (State::Established, packet::OP_RW) => conn.guest_data(payload),
            (State::Established, packet::OP_SHUTDOWN) => conn.guest_shutdown(h.flags),
            (state, op) => {
                log::debug!("vsock: connection {key:?}: op {op} in state {state:?}; reset");
                return self.reset(key, w);
            }
        };
        match result {
            Err(e) => {
                log::debug!("vsock: connection {key:?}: {e}; reset");
                self.reset(key, w);
            }
            Ok(()) if conn.state() != State::Closing && conn.done() => self.reset(key, w),
            Ok(()) => self.touch(key),
        }
    }

    /// A packet whose payload is shorter than its header says.
    pub fn handle_truncated(&mut self, h: &Header, w: &mut dyn FdWatch) {
        if h.src_cid != self.guest_cid {
            return;
        }
        let key = (h.dst_port, h.src_port);
        if self.conns.contains_key(&key) {
            self.reset(key, w);
        } else {
            self.stray_rst(h);
        }
    }

    fn guest_connect(&mut self, h: &Header) {
        if self.connection_count() >= self.max_connections {
            log::warn!("vsock: {} connections open; refusing guest port {}", self.max_connections, h.src_port);
            return self.stray_rst(h);
        }
        let path = self.port_path(h.dst_port);
        match socket::connect_nonblocking(&path) {
            Ok(stream) => {
                let conn = Connection::guest_initiated(stream, h, &self.buffered);
                let key = conn.key();
                if let Some(fd) = conn.fd() {
                    self.by_fd.insert(fd, key);
                }
                self.conns.insert(key, conn);
                self.touch(key);
            }
            Err(e) => {
                log::debug!("vsock: guest connection to {}: {e}", path.to_string_lossy());
                self.stray_rst(h);
            }
        }
    }

    /// The next packet for the guest, its payload read into `buf` (sized to
    /// the rx buffer's room). `None`: nothing can be sent now.
    pub fn next_rx(&mut self, buf: &mut [u8], w: &mut dyn FdWatch) -> Option<(Header, usize)> {
        if let Some(h) = self.strays.pop_front() {
            return Some((h, 0));
        }
        for _ in 0..self.rxq.len() {
            let key = self.rxq.pop_front()?;
            let Some(conn) = self.conns.get_mut(&key) else { continue };
            conn.in_rxq = false;
            let out = self.conn_rx(key, buf, w);
            if let Some(conn) = self.conns.get_mut(&key) {
                if conn.has_rx() && !conn.in_rxq {
                    conn.in_rxq = true;
                    self.rxq.push_back(key);
                }
            }
            self.touch(key);
            if out.is_some() {
                return out;
            }
        }
        None
    }

    fn conn_rx(&mut self, key: Key, buf: &mut [u8], w: &mut dyn FdWatch) -> Option<(Header, usize)> {
        let cid = self.guest_cid;
        let conn = self.conns.get_mut(&key)?;
        if !conn.has_rx() {
            return None;
        }
        if let Some(op) = conn.take_pending() {
            let h = conn.header(op, cid);
            if op == packet::OP_RST {
                self.forget(key, w);
            }
            return Some((h, 0));
        }
        let n = buf.len().min(conn.peer_credit() as usize);
        match conn.read_host(&mut buf[..n]) {
            Ok(HostRead::Data(n)) => Some((conn.header(packet::OP_RW, cid), n)),
            Ok(HostRead::Empty) => None,
            Ok(HostRead::Eof) if conn.done() => {
                self.reset(key, w);
                self.conn_rx(key, buf, w)
            }
            Ok(HostRead::Eof) => {
                let op = conn.take_pending()?;
                Some((conn.header(op, cid), 0))
            }
            Err(e) => {
                log::debug!("vsock: connection {key:?}: {e}; reset");
                self.reset(key, w);
                self.conn_rx(key, buf, w)
            }
        }
    }

    /// An RW packet could not be written to the guest: its bytes are lost,
    /// so the stream is reset.
    pub fn rx_lost(&mut self, h: &Header, w: &mut dyn FdWatch) {
        if h.op == packet::OP_RW {
            self.reset((h.src_port, h.dst_port), w);
        }
    }

    /// Brings the event loop and the rx queue up to date with the
    /// connections that changed.
    pub fn sync(&mut self, w: &mut dyn FdWatch) {
        let mut touched = std::mem::take(&mut self.touched);
        for key in touched.drain(..) {
            let Some(conn) = self.conns.get_mut(&key) else { continue };
            conn.request_credit_if_stalled();
            let want = conn.interest();
            if let (Some(fd), true) = (conn.fd(), want != conn.registered) {
                let r = if conn.registered.is_empty() {
                    w.add(fd, want)
                } else if want.is_empty() {
                    w.remove(fd, conn.registered)
                } else {
                    w.modify(fd, want)
                };
                match r {
                    Ok(()) => conn.registered = want,
                    Err(e) => {
                        log::warn!("vsock: cannot watch fd {fd}: {e}; connection reset");
                        conn.set_reset();
                        close_stream(conn, &mut self.by_fd, w);
                    }
                }
            }
            if conn.has_rx() && !conn.in_rxq {
                conn.in_rxq = true;
                self.rxq.push_back(key);
            }
        }
        self.touched = touched;
        self.resume_listener(w);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_lines() {
        assert_eq!(parse_connect_line(b"CONNECT 52\n"), Some(52));
        assert_eq!(parse_connect_line(b"connect   4294967295 \n"), Some(u32::MAX));
        for bad in [
            &b"CONNECT 52"[..],
            b"CONNECT\n",
            b"CONNECT 4294967296\n",
            b"CONNECT 1 2\n",
            b"CONNECTX 1\n",
            b"CONNECT -1\n",
            b"\xff\xfe 1\n",
            b"\n",
        ] {
            assert_eq!(parse_connect_line(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }
}
