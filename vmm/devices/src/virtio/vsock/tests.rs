//! Device-level tests: a guest made of split queues in guest memory, real
//! Unix sockets for the host side, and a real epoll standing in for the
//! event loop (so a stream left watched while it cannot progress shows up
//! as an event that keeps coming).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::tempdir::TempDir;

use super::connection::BUF_ALLOC;
use super::muxer::{FdWatch, FIRST_LOCAL_PORT, MAX_STRAY_RSTS};
use super::packet::*;
use super::*;
use crate::virtio::{Interrupt, VIRTIO_F_VERSION_1};

const CID: u64 = 3;
const MEM_SIZE: u64 = 0x100_0000;
const BUF_BASE: u64 = 0x10_0000;
const RX_BUF: u32 = 4096 + HEADER_SIZE as u32;
/// What the test guest advertises unless a test says otherwise.
const GUEST_BUF: u32 = 64 * 1024;

// ---- the event loop ----

/// An epoll and what is registered in it.
struct Watch {
    epoll: Epoll,
    fds: HashMap<RawFd, EventSet>,
}

impl Watch {
    fn new() -> Self {
        Self { epoll: Epoll::new().unwrap(), fds: HashMap::new() }
    }

    fn ctl(&self, op: ControlOperation, fd: RawFd, events: EventSet) -> std::io::Result<()> {
        self.epoll.ctl(op, fd, EpollEvent::new(events, fd as u64))
    }
}

impl FdWatch for Watch {
    fn add(&mut self, fd: RawFd, events: EventSet) -> std::io::Result<()> {
        assert!(!self.fds.contains_key(&fd), "fd {fd} added twice");
        self.ctl(ControlOperation::Add, fd, events)?;
        self.fds.insert(fd, events);
        Ok(())
    }
    fn modify(&mut self, fd: RawFd, events: EventSet) -> std::io::Result<()> {
        assert!(self.fds.contains_key(&fd), "fd {fd} modified but not watched");
        self.ctl(ControlOperation::Modify, fd, events)?;
        self.fds.insert(fd, events);
        Ok(())
    }
    fn remove(&mut self, fd: RawFd, events: EventSet) -> std::io::Result<()> {
        assert!(self.fds.remove(&fd).is_some(), "fd {fd} removed but not watched");
        self.ctl(ControlOperation::Delete, fd, events)
    }
}

// ---- the guest ----

/// A split virtqueue in guest memory (descriptors at `base`, avail ring at
/// +0x1000, used ring at +0x2000, as `mmio::tests::bring_up` places them).
struct TestQueue {
    base: u64,
    size: u16,
    next_desc: u16,
    avail_idx: u16,
    used_seen: u16,
}

impl TestQueue {
    fn new(base: u64, size: u16) -> Self {
        Self { base, size, next_desc: 0, avail_idx: 0, used_seen: 0 }
    }

    fn queue(&self) -> Queue {
        let mut q = Queue::new(self.size).unwrap();
        q.set_size(self.size);
        q.set_desc_table_address(Some(self.base as u32), Some(0));
        q.set_avail_ring_address(Some((self.base + 0x1000) as u32), Some(0));
        q.set_used_ring_address(Some((self.base + 0x2000) as u32), Some(0));
        q.set_ready(true);
        q
    }

    /// Makes a chain of (address, length, device-writable) available.
    fn add(&mut self, m: &GuestMemoryMmap, descs: &[(u64, u32, bool)]) -> u16 {
        let head = self.next_desc;
        for (i, &(addr, len, write)) in descs.iter().enumerate() {
            let idx = self.next_desc;
            self.next_desc = (self.next_desc + 1) % self.size;
            let last = i + 1 == descs.len();
            let flags = u16::from(!last) | if write { 2 } else { 0 };
            let at = self.base + 16 * u64::from(idx);
            m.write_obj(addr, GuestAddress(at)).unwrap();
            m.write_obj(len, GuestAddress(at + 8)).unwrap();
            m.write_obj(flags, GuestAddress(at + 12)).unwrap();
            m.write_obj(self.next_desc, GuestAddress(at + 14)).unwrap();
        }
        let slot = u64::from(self.avail_idx % self.size);
        m.write_obj(head, GuestAddress(self.base + 0x1004 + 2 * slot)).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        m.write_obj(self.avail_idx, GuestAddress(self.base + 0x1002)).unwrap();
        head
    }

    /// Chains the device returned since the last call: (head, length).
    fn used(&mut self, m: &GuestMemoryMmap) -> Vec<(u16, u32)> {
        let idx: u16 = m.read_obj(GuestAddress(self.base + 0x2002)).unwrap();
        let mut out = Vec::new();
        while self.used_seen != idx {
            let at = self.base + 0x2004 + 8 * u64::from(self.used_seen % self.size);
            let id: u32 = m.read_obj(GuestAddress(at)).unwrap();
            let len: u32 = m.read_obj(GuestAddress(at + 4)).unwrap();
            out.push((id as u16, len));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        out
    }
}

struct Guest {
    mem: GuestMemoryMmap,
    rx: TestQueue,
    tx: TestQueue,
    ev: TestQueue,
    next_buf: u64,
    rx_bufs: HashMap<u16, u64>,
}

impl Guest {
    fn new() -> Self {
        Self {
            mem: GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap(),
            rx: TestQueue::new(0x10000, RX_QUEUE_SIZE),
            tx: TestQueue::new(0x14000, QUEUE_SIZE),
            ev: TestQueue::new(0x18000, QUEUE_SIZE),
            next_buf: BUF_BASE,
            rx_bufs: HashMap::new(),
        }
    }

    fn alloc(&mut self, len: u32) -> u64 {
        if self.next_buf + u64::from(len) > MEM_SIZE {
            self.next_buf = BUF_BASE;
        }
        let at = self.next_buf;
        self.next_buf = (at + u64::from(len) + 15) & !15;
        at
    }

    fn give_rx(&mut self, n: usize) {
        for _ in 0..n {
            let at = self.alloc(RX_BUF);
            let head = self.rx.add(&self.mem, &[(at, RX_BUF, true)]);
            self.rx_bufs.insert(head, at);
        }
    }

    /// Queues a packet on tx: the header in one descriptor, the payload
    /// (if any) in a second one.
    fn push_tx(&mut self, h: &Header, payload: &[u8]) {
        let h = Header { len: payload.len() as u32, ..*h };
        let hdr_at = self.alloc(HEADER_SIZE as u32);
        self.mem.write_slice(&h.to_bytes(), GuestAddress(hdr_at)).unwrap();
        if payload.is_empty() {
            self.tx.add(&self.mem, &[(hdr_at, HEADER_SIZE as u32, false)]);
        } else {
            let at = self.alloc(payload.len() as u32);
            self.mem.write_slice(payload, GuestAddress(at)).unwrap();
            self.tx.add(&self.mem, &[(hdr_at, HEADER_SIZE as u32, false), (at, payload.len() as u32, false)]);
        }
    }

    /// Packets the device put in rx buffers since the last call.
    fn take_rx(&mut self) -> Vec<(Header, Vec<u8>)> {
        let used = self.rx.used(&self.mem);
        used.into_iter()
            .map(|(head, len)| {
                let at = self.rx_bufs.remove(&head).expect("unknown rx buffer");
                assert!(len as usize >= HEADER_SIZE, "rx packet of {len} bytes");
                let mut b = vec![0u8; len as usize];
                self.mem.read_slice(&mut b, GuestAddress(at)).unwrap();
                let h = parse(&b).unwrap();
                assert_eq!(h.len as usize, b.len() - HEADER_SIZE);
                assert_eq!(h.dst_cid, CID);
                (h, b.split_off(HEADER_SIZE))
            })
            .collect()
    }
}

/// A guest packet from `guest_port` to host port `host_port`.
fn gh(op: u16, guest_port: u32, host_port: u32) -> Header {
    Header {
        src_cid: CID,
        dst_cid: HOST_CID,
        src_port: guest_port,
        dst_port: host_port,
        len: 0,
        type_: TYPE_STREAM,
        op,
        flags: 0,
        buf_alloc: GUEST_BUF,
        fwd_cnt: 0,
    }
}

fn ops(pkts: &[(Header, Vec<u8>)]) -> Vec<u16> {
    pkts.iter().map(|(h, _)| h.op).collect()
}

fn data(pkts: &[(Header, Vec<u8>)]) -> Vec<u8> {
    pkts.iter().filter(|(h, _)| h.op == OP_RW).flat_map(|(_, p)| p.clone()).collect()
}

// ---- the harness ----

struct H {
    _dir: TempDir,
    uds: PathBuf,
    dev: Vsock,
    g: Guest,
    w: Watch,
    irq: Arc<Interrupt>,
}

impl H {
    fn new() -> Self {
        let dir = TempDir::new_with_prefix("/tmp/vmrun-vsock-").unwrap();
        let uds = dir.as_path().join("v.sock");
        let mut dev = Vsock::new(CID, &uds).unwrap();
        let g = Guest::new();
        let irq = Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
        dev.activate(ActivateContext {
            mem: g.mem.clone(),
            queues: vec![g.rx.queue(), g.tx.queue(), g.ev.queue()],
            acked_features: VIRTIO_F_VERSION_1,
            interrupt: &irq,
        })
        .unwrap();
        let mut w = Watch::new();
        for (fd, set) in dev.watched_fds() {
            w.add(fd, set).unwrap();
        }
        Self { _dir: dir, uds, dev, g, w, irq }
    }

    fn kick(&mut self, q: usize) {
        self.dev.handle_queue(q, &mut self.w);
    }

    fn send(&mut self, h: &Header, payload: &[u8]) {
        self.g.push_tx(h, payload);
        self.kick(TX);
    }

    fn give_rx(&mut self, n: usize) {
        self.g.give_rx(n);
        self.kick(RX);
    }

    /// Runs the event loop until it has been idle for a while.
    fn pump(&mut self) {
        let mut events = vec![EpollEvent::default(); 64];
        for _ in 0..10_000 {
            let n = self.w.epoll.wait(30, &mut events).unwrap();
            if n == 0 {
                return;
            }
            for e in &events[..n] {
                let fd = e.fd();
                // Skip events of descriptors dropped earlier in this batch.
                if self.w.fds.contains_key(&fd) {
                    self.dev.handle_fd(fd, e.event_set(), &mut self.w);
                }
            }
        }
        panic!("the event loop never went idle: something spins");
    }

    /// Nothing is ready in the event loop: no stream is watched while it
    /// cannot make progress.
    fn assert_quiet(&self) {
        let mut events = vec![EpollEvent::default(); 8];
        let n = self.w.epoll.wait(0, &mut events).unwrap();
        let ready: Vec<_> = events[..n].iter().map(|e| (e.fd(), e.event_set())).collect();
        assert!(ready.is_empty(), "ready while nothing can progress: {ready:?}");
    }

    fn take_rx(&mut self) -> Vec<(Header, Vec<u8>)> {
        self.g.take_rx()
    }

    fn host_connect(&self) -> UnixStream {
        let s = UnixStream::connect(&self.uds).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s
    }

    /// A host-initiated connection to guest port `port`, accepted by the
    /// guest: (host stream, host-side port).
    fn establish_from_host(&mut self, port: u32) -> (UnixStream, u32) {
        let mut s = self.host_connect();
        s.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
        self.give_rx(1);
        self.pump();
        let p = self.take_rx();
        assert_eq!(ops(&p), [OP_REQUEST], "{p:?}");
        let req = p[0].0;
        assert_eq!(req.dst_port, port);
        assert!(req.src_port >= FIRST_LOCAL_PORT);
        self.send(&gh(OP_RESPONSE, port, req.src_port), &[]);
        let line = format!("OK {}\n", req.src_port);
        let mut got = vec![0u8; line.len()];
        s.read_exact(&mut got).unwrap();
        assert_eq!(got, line.as_bytes());
        (s, req.src_port)
    }

    /// A host listener for guest connections to port `port`.
    fn host_listen(&self, port: u32) -> UnixListener {
        let mut p = self.uds.as_os_str().to_owned();
        p.push(format!("_{port}"));
        UnixListener::bind(PathBuf::from(p)).unwrap()
    }

    /// A guest-initiated connection from guest port `gport` to host port
    /// `port` (listened on by `l`): (host stream).
    fn establish_from_guest(&mut self, l: &UnixListener, gport: u32, port: u32) -> UnixStream {
        self.give_rx(1);
        self.send(&gh(OP_REQUEST, gport, port), &[]);
        let p = self.take_rx();
        assert_eq!(ops(&p), [OP_RESPONSE], "{p:?}");
        assert_eq!((p[0].0.src_port, p[0].0.dst_port), (port, gport));
        assert_eq!(p[0].0.buf_alloc, BUF_ALLOC);
        let (s, _) = l.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s
    }

    fn connections(&self) -> usize {
        self.dev.muxer.connection_count()
    }

    /// Makes `n` event buffers available (without a kick).
    fn give_events(&mut self, n: usize) {
        for _ in 0..n {
            let at = self.g.alloc(8);
            self.g.ev.add(&self.g.mem, &[(at, 8, true)]);
        }
    }

    /// What Linux does with a transport reset event: takes the used
    /// buffer, resets its sockets, makes the buffer available again and
    /// kicks the event queue.
    fn guest_handles_reset(&mut self) {
        self.give_events(1);
        self.kick(EVENT);
    }

    /// A host connection that sent `CONNECT <port>\n` (and `more`).
    fn host_connect_line(&mut self, port: u32, more: &[u8]) -> UnixStream {
        let mut s = self.host_connect();
        s.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
        s.write_all(more).unwrap();
        s
    }
}

/// Reads from a host stream until `n` bytes arrived.
fn read_n(s: &mut UnixStream, n: usize) -> Vec<u8> {
    let mut b = vec![0u8; n];
    s.read_exact(&mut b).unwrap();
    b
}

/// Whether the host stream reached EOF (or was reset) without more data.
fn host_sees_end(s: &mut UnixStream) -> bool {
    let mut b = [0u8; 16];
    matches!(s.read(&mut b), Ok(0) | Err(_))
}

// ---- the tests ----

#[test]
fn device_identity_and_config_space() {
    let h = H::new();
    assert_eq!(h.dev.device_type(), TYPE_VSOCK);
    assert_eq!(h.dev.features(), 0, "VERSION_1 only, added by the transport");
    assert_eq!(h.dev.queue_max_sizes(), &[RX_QUEUE_SIZE, QUEUE_SIZE, QUEUE_SIZE]);
    let mut c = [0xffu8; 8];
    h.dev.read_config(0, &mut c);
    assert_eq!(u64::from_le_bytes(c), CID);
    let mut hi = [0xffu8; 4];
    h.dev.read_config(4, &mut hi);
    assert_eq!(hi, [0; 4]);
    h.dev.read_config(8, &mut hi);
    assert_eq!(hi, [0; 4], "past the config space");
}

#[test]
fn constructor_checks_cid_and_socket_path() {
    let dir = TempDir::new_with_prefix("/tmp/vmrun-vsock-").unwrap();
    let path = dir.as_path().join("v.sock");
    for cid in [0, 1, 2, u64::from(u32::MAX), u64::MAX] {
        assert!(matches!(Vsock::new(cid, &path), Err(Error::Cid(_))), "cid {cid}");
    }
    // A stale socket is replaced; the device removes its own on drop.
    drop(UnixListener::bind(&path).unwrap());
    let dev = Vsock::new(CID, &path).unwrap();
    assert!(UnixStream::connect(&path).is_ok());
    drop(dev);
    assert!(!path.exists());
    // Anything else is left alone.
    std::fs::write(&path, b"precious").unwrap();
    assert!(matches!(Vsock::new(CID, &path), Err(Error::NotASocket(_))));
    assert_eq!(std::fs::read(&path).unwrap(), b"precious");
    let nowhere = dir.as_path().join("no/such/dir/v.sock");
    assert!(matches!(Vsock::new(CID, &nowhere), Err(Error::Listen { .. })));
}

#[test]
fn host_connect_then_bytes_both_ways() {
    let mut h = H::new();
    let (mut s, port) = h.establish_from_host(52);
    h.give_rx(4);
    s.write_all(b"hello guest").unwrap();
    h.pump();
    let p = h.take_rx();
    assert_eq!(data(&p), b"hello guest");
    assert!(p.iter().all(|(hd, _)| (hd.src_port, hd.dst_port) == (port, 52)));
    h.send(&gh(OP_RW, 52, port), b"hello host");
    assert_eq!(read_n(&mut s, 10), b"hello host");
    assert_ne!(h.irq.status() & INT_USED_RING, 0);
    assert_eq!(h.connections(), 1);
    h.assert_quiet();
}

#[test]
fn connect_line_split_over_writes_and_data_right_behind_it() {
    let mut h = H::new();
    let mut s = h.host_connect();
    s.write_all(b"conn").unwrap();
    h.give_rx(2);
    h.pump();
    assert!(h.take_rx().is_empty());
    // The line's end and the first data in one write: the data must wait
    // in the stream, not be eaten by the handshake.
    s.write_all(b"ect  77 \nearly").unwrap();
    h.pump();
    let p = h.take_rx();
    assert_eq!(ops(&p), [OP_REQUEST]);
    let port = p[0].0.src_port;
    assert_eq!(p[0].0.dst_port, 77);
    h.send(&gh(OP_RESPONSE, 77, port), &[]);
    assert_eq!(read_n(&mut s, format!("OK {port}\n").len()), format!("OK {port}\n").as_bytes());
    h.pump();
    assert_eq!(data(&h.take_rx()), b"early");
}

#[test]
fn garbage_connect_lines_close_the_host_stream() {
    let mut h = H::new();
    let too_long = [b'C'; 40];
    let lines: [&[u8]; 6] =
        [b"HELLO 52\n", b"CONNECT\n", b"CONNECT 99999999999\n", b"CONNECT 5 6\n", b"CONNECT -1\n", &too_long];
    for line in lines {
        let mut s = h.host_connect();
        s.write_all(line).unwrap();
        h.pump();
        assert!(host_sees_end(&mut s), "{:?} was accepted", String::from_utf8_lossy(line));
    }
    // EOF before the end of the line.
    let mut s = h.host_connect();
    s.write_all(b"CONNECT 5").unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    h.pump();
    assert!(host_sees_end(&mut s));
    h.give_rx(4);
    assert!(h.take_rx().is_empty(), "no REQUEST for a bad line");
    assert_eq!(h.connections(), 0);
    h.assert_quiet();
}

#[test]
fn guest_refusal_closes_the_host_stream() {
    let mut h = H::new();
    let mut s = h.host_connect();
    s.write_all(b"CONNECT 9\n").unwrap();
    h.give_rx(1);
    h.pump();
    let req = h.take_rx()[0].0;
    h.send(&gh(OP_RST, 9, req.src_port), &[]);
    assert!(host_sees_end(&mut s));
    assert_eq!(h.connections(), 0);
}

#[test]
fn guest_connect_to_host_listener() {
    let mut h = H::new();
    let l = h.host_listen(5000);
    let mut s = h.establish_from_guest(&l, 1234, 5000);
    h.send(&gh(OP_RW, 1234, 5000), b"from guest");
    assert_eq!(read_n(&mut s, 10), b"from guest");
    h.give_rx(2);
    s.write_all(b"from host").unwrap();
    h.pump();
    let p = h.take_rx();
    assert_eq!(data(&p), b"from host");
    assert_eq!((p[0].0.src_port, p[0].0.dst_port), (5000, 1234));
    // fwd_cnt tells the guest what the host took.
    assert_eq!(p[0].0.fwd_cnt, 10);
}

#[test]
fn guest_connect_refused_gets_rst() {
    let mut h = H::new();
    h.give_rx(1);
    h.send(&gh(OP_REQUEST, 1234, 5001), &[]);
    let p = h.take_rx();
    assert_eq!(ops(&p), [OP_RST]);
    assert_eq!((p[0].0.src_port, p[0].0.dst_port), (5001, 1234));
    assert_eq!(h.connections(), 0);
}

#[test]
fn host_data_respects_guest_credit_without_spinning() {
    let mut h = H::new();
    let l = h.host_listen(5000);
    let mut req = gh(OP_REQUEST, 1, 5000);
    req.buf_alloc = 1000;
    h.give_rx(1);
    h.send(&req, &[]);
    assert_eq!(ops(&h.take_rx()), [OP_RESPONSE]);
    let (mut s, _) = l.accept().unwrap();
    let msg: Vec<u8> = (0..5000u32).map(|i| i as u8).collect();
    s.write_all(&msg).unwrap();
    h.give_rx(8);
    h.pump();
    let p = h.take_rx();
    assert_eq!(data(&p), &msg[..1000], "exactly the credit");
    assert_eq!(p.last().unwrap().0.op, OP_CREDIT_REQUEST);
    // 4000 bytes wait in the host stream; the loop must not see it.
    h.assert_quiet();
    // The guest read 1000 bytes.
    let mut upd = gh(OP_CREDIT_UPDATE, 1, 5000);
    upd.buf_alloc = 1000;
    upd.fwd_cnt = 1000;
    h.send(&upd, &[]);
    let p = h.take_rx();
    assert_eq!(data(&p), &msg[1000..2000]);
    // A larger buffer: everything else, in rx-buffer-sized packets.
    upd.buf_alloc = 1 << 20;
    upd.fwd_cnt = 2000;
    h.send(&upd, &[]);
    let p = h.take_rx();
    assert_eq!(data(&p), &msg[2000..]);
    assert!(p.iter().all(|(hd, d)| d.len() <= 4096 && hd.op == OP_RW));
    h.pump();
    h.assert_quiet();
}

#[test]
fn no_rx_buffers_means_no_watching_until_some_arrive() {
    let mut h = H::new();
    let l = h.host_listen(5000);
    let mut s = h.establish_from_guest(&l, 1, 5000);
    s.write_all(&[7u8; 10_000]).unwrap();
    h.pump();
    h.assert_quiet();
    assert!(h.take_rx().is_empty());
    h.give_rx(1);
    assert_eq!(data(&h.take_rx()).len(), 4096);
    h.assert_quiet();
    h.give_rx(8);
    assert_eq!(data(&h.take_rx()).len(), 10_000 - 4096);
    h.pump();
    h.assert_quiet();
}

#[test]
fn credit_request_is_answered_and_updates_follow_forwarding() {
    let mut h = H::new();
    let l = h.host_listen(5000);
    let mut s = h.establish_from_guest(&l, 1, 5000);
    h.give_rx(4);
    h.send(&gh(OP_CREDIT_REQUEST, 1, 5000), &[]);
    let p = h.take_rx();
    assert_eq!(ops(&p), [OP_CREDIT_UPDATE]);
    assert_eq!((p[0].0.buf_alloc, p[0].0.fwd_cnt), (BUF_ALLOC, 0));
    // Forwarding half the buffer makes the device announce it unasked.
    let chunk = vec![1u8; 64 * 1024];
    let reader = std::thread::spawn(move || (read_n(&mut s, 2 * 64 * 1024).len(), s));
    h.send(&gh(OP_RW, 1, 5000), &chunk);
    h.send(&gh(OP_RW, 1, 5000), &chunk);
    h.pump();
    let (n, _s) = reader.join().unwrap();
    assert_eq!(n, 128 * 1024);
    let p = h.take_rx();
    assert_eq!(ops(&p), [OP_CREDIT_UPDATE]);
    assert_eq!(p[0].0.fwd_cnt, 128 * 1024);
}

#[test]
fn bulk_transfer_both_ways_with_credit() {
    const N: usize = 3 << 20;
    let mut h = H::new();
    let (s, port) = h.establish_from_host(80);
    let mut hs = s.try_clone().unwrap();
    let pattern = |i: usize| (i * 7 + i / 4099) as u8;
    // Host to guest, from a thread; the guest acknowledges what it read.
    let writer = std::thread::spawn(move || {
        let msg: Vec<u8> = (0..N).map(pattern).collect();
        hs.write_all(&msg).unwrap();
        hs.shutdown(std::net::Shutdown::Write).unwrap();
        hs
    });
    let mut got = Vec::new();
    let mut end = false;
    h.give_rx(64);
    for _ in 0..100_000 {
        h.pump();
        let p = h.take_rx();
        end |= p.iter().any(|(hd, _)| hd.op == OP_SHUTDOWN && hd.flags == SHUTDOWN_SEND);
        got.extend(data(&p));
        if end {
            break;
        }
        let mut upd = gh(OP_CREDIT_UPDATE, 80, port);
        upd.fwd_cnt = got.len() as u32;
        h.g.give_rx(p.len());
        h.send(&upd, &[]);
    }
    assert!(end, "no SHUTDOWN after {} bytes", got.len());
    assert_eq!(got.len(), N);
    assert!(got.iter().enumerate().all(|(i, &b)| b == pattern(i)), "corrupted");
    let mut s = writer.join().unwrap();
    // Guest to host, while the host reads in a thread; the guest honours
    // the device's credit.
    let reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        s.read_to_end(&mut v).unwrap();
        v
    });
    let mut sent = 0usize;
    let mut credit_fwd = 0u32;
    let mut stalls = 0;
    while sent < N {
        let in_flight = sent as u32 - credit_fwd;
        let room = (BUF_ALLOC - in_flight) as usize;
        if room == 0 {
            stalls += 1;
            assert!(stalls < 10_000, "no credit came back");
            h.pump();
            for (hd, _) in h.take_rx() {
                credit_fwd = hd.fwd_cnt;
            }
            if h.g.rx_bufs.len() < 16 {
                h.give_rx(4);
            }
            continue;
        }
        let n = room.min(32 * 1024).min(N - sent);
        let chunk: Vec<u8> = (sent..sent + n).map(pattern).collect();
        h.send(&gh(OP_RW, 80, port), &chunk);
        sent += n;
        for (hd, _) in h.take_rx() {
            credit_fwd = hd.fwd_cnt;
        }
    }
    // Shut both ways: the device resets and forgets the connection once
    // everything reached the host.
    h.send(&Header { flags: SHUTDOWN_SEND | SHUTDOWN_RCV, ..gh(OP_SHUTDOWN, 80, port) }, &[]);
    for _ in 0..1000 {
        h.pump();
        if h.connections() == 0 {
            break;
        }
    }
    let v = reader.join().unwrap();
    assert_eq!(v.len(), N);
    assert!(v.iter().enumerate().all(|(i, &b)| b == pattern(i)), "corrupted");
    h.give_rx(4);
    assert_eq!(ops(&h.take_rx()), [OP_RST]);
    assert_eq!(h.connections(), 0);
}

#[test]
fn guest_overrunning_its_credit_is_reset() {
    let mut h = H::new();
    let l = h.host_listen(5000);
    let mut s = h.establish_from_guest(&l, 1, 5000);
    // The host never reads; the guest ignores the credit.
    let chunk = vec![9u8; 64 * 1024];
    let mut rst = false;
    for _ in 0..200 {
        h.send(&gh(OP_RW, 1, 5000), &chunk);
        h.give_rx(1);
        if ops(&h.take_rx()).contains(&OP_RST) {
            rst = true;
            break;
        }
    }
    assert!(rst, "never reset");
    assert_eq!(h.connections(), 0);
    // The host gets what the socket held, then the end.
    s.set_nonblocking(false).unwrap();
    let mut v = Vec::new();
    let _ = s.read_to_end(&mut v);
    assert!(v.len() < 200 * chunk.len());
    h.assert_quiet();
}

#[test]
fn guest_shutdown_send_half_closes_the_host_stream() {
    let mut h = H::new();
    let (mut s, port) = h.establish_from_host(52);
    h.send(&gh(OP_RW, 52, port), b"last words");
    h.send(&Header { flags: SHUTDOWN_SEND, ..gh(OP_SHUTDOWN, 52, port) }, &[]);
    assert_eq!(read_n(&mut s, 10), b"last words");
    assert!(host_sees_end(&mut s));
    // The host can still answer.
    h.give_rx(4);
    s.write_all(b"reply").unwrap();
    h.pump();
    assert_eq!(data(&h.take_rx()), b"reply");
    // Its EOF ends the connection: RST, forgotten.
    s.shutdown(std::net::Shutdown::Write).unwrap();
    h.pump();
    assert_eq!(ops(&h.take_rx()), [OP_RST]);
    assert_eq!(h.connections(), 0);
    h.assert_quiet();
}

#[test]
fn host_eof_is_a_shutdown_and_the_guest_can_still_send() {
    let mut h = H::new();
    let (mut s, port) = h.establish_from_host(52);
    h.give_rx(4);
    s.write_all(b"bye").unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    h.pump();
    let p = h.take_rx();
    assert_eq!(ops(&p), [OP_RW, OP_SHUTDOWN]);
    assert_eq!(p[1].0.flags, SHUTDOWN_SEND);
    h.assert_quiet();
    h.send(&gh(OP_RW, 52, port), b"ack");
    assert_eq!(read_n(&mut s, 3), b"ack");
    // Guest closes (both flags): RST, host stream closed.
    h.send(&Header { flags: SHUTDOWN_SEND | SHUTDOWN_RCV, ..gh(OP_SHUTDOWN, 52, port) }, &[]);
    assert_eq!(ops(&h.take_rx()), [OP_RST]);
    assert!(host_sees_end(&mut s));
    assert_eq!(h.connections(), 0);
}

#[test]
fn host_close_with_unread_guest_credit_ends_cleanly() {
    let mut h = H::new();
    let l = h.host_listen(5000);
    let s = h.establish_from_guest(&l, 1, 5000);
    h.give_rx(4);
    drop(s);
    h.pump();
    assert_eq!(ops(&h.take_rx()), [OP_SHUTDOWN]);
    // Writing to a host that is gone resets the connection.
    h.send(&gh(OP_RW, 1, 5000), b"anyone?");
    assert_eq!(ops(&h.take_rx()), [OP_RST]);
    assert_eq!(h.connections(), 0);
    h.assert_quiet();
}

#[test]
fn guest_rst_closes_the_host_stream() {
    let mut h = H::new();
    let (mut s, port) = h.establish_from_host(52);
    h.give_rx(2);
    h.send(&gh(OP_RST, 52, port), &[]);
    assert!(host_sees_end(&mut s));
    assert_eq!(h.connections(), 0);
    assert!(h.take_rx().is_empty(), "an RST is not answered");
    h.assert_quiet();
}

#[test]
fn host_reset_while_data_waits_for_credit() {
    let mut h = H::new();
    let l = h.host_listen(5000);
    let mut req = gh(OP_REQUEST, 1, 5000);
    req.buf_alloc = 10;
    h.give_rx(1);
    h.send(&req, &[]);
    let (mut s, _) = l.accept().unwrap();
    h.take_rx();
    s.write_all(&[1u8; 100]).unwrap();
    h.give_rx(4);
    h.pump();
    assert_eq!(data(&h.take_rx()).len(), 10);
    drop(s);
    // The stream is not watched (no credit), so its hang-up must not spin.
    h.pump();
    h.assert_quiet();
    let mut upd = gh(OP_CREDIT_UPDATE, 1, 5000);
    upd.buf_alloc = 1000;
    upd.fwd_cnt = 10;
    h.send(&upd, &[]);
    h.pump();
    let p = h.take_rx();
    assert_eq!(data(&p).len(), 90);
    assert_eq!(p.last().unwrap().0.op, OP_SHUTDOWN);
}

#[test]
fn malformed_packets_never_panic() {
    let mut h = H::new();
    let (mut s, port) = h.establish_from_host(52);
    h.give_rx(16);
    let g = &mut h.g;
    // Header too short, header only in a device-writable buffer, header
    // outside guest memory, an empty chain of one zero-length buffer.
    let at = g.alloc(64);
    g.mem.write_slice(&gh(OP_RW, 52, port).to_bytes(), GuestAddress(at)).unwrap();
    g.tx.add(&g.mem, &[(at, 20, false)]);
    g.tx.add(&g.mem, &[(at, 44, true)]);
    g.tx.add(&g.mem, &[(MEM_SIZE + 0x1000, 44, false)]);
    g.tx.add(&g.mem, &[(at, 0, false)]);
    // A length over the limit, and a header in the same buffer as its data.
    let mut big = gh(OP_RW, 52, port);
    big.len = MAX_PAYLOAD + 1;
    let at2 = g.alloc(64);
    g.mem.write_slice(&big.to_bytes(), GuestAddress(at2)).unwrap();
    g.tx.add(&g.mem, &[(at2, 64, false)]);
    let mut inline = gh(OP_RW, 52, port);
    inline.len = 4;
    let at3 = g.alloc(48);
    g.mem.write_slice(&inline.to_bytes(), GuestAddress(at3)).unwrap();
    g.mem.write_slice(b"abcd", GuestAddress(at3 + 44)).unwrap();
    g.tx.add(&g.mem, &[(at3, 48, false)]);
    // Wrong source CID: dropped silently.
    g.push_tx(&Header { src_cid: 99, ..gh(OP_RW, 52, port) }, b"spoofed");
    h.kick(TX);
    assert_eq!(read_n(&mut s, 4), b"abcd");
    assert!(h.take_rx().is_empty(), "nothing to answer so far");
    // Unknown connection, unknown type, wrong destination: RST; an RST
    // for an unknown connection: nothing.
    h.send(&gh(OP_RW, 53, port), b"x");
    h.send(&Header { type_: 2, ..gh(OP_REQUEST, 60, 5000) }, &[]);
    h.send(&Header { dst_cid: 7, ..gh(OP_REQUEST, 61, 5000) }, &[]);
    h.send(&gh(OP_RST, 62, 5000), &[]);
    let p = h.take_rx();
    assert_eq!(ops(&p), [OP_RST, OP_RST, OP_RST]);
    assert_eq!(p[0].0.dst_port, 53);
    assert_eq!(p[1].0.type_, 2, "RST echoes the type");
    // A payload shorter than the header says resets that connection.
    let mut short = gh(OP_RW, 52, port);
    short.len = 100;
    let at4 = h.g.alloc(60);
    h.g.mem.write_slice(&short.to_bytes(), GuestAddress(at4)).unwrap();
    h.g.tx.add(&h.g.mem, &[(at4, 60, false)]);
    h.kick(TX);
    assert_eq!(ops(&h.take_rx()), [OP_RST]);
    assert!(host_sees_end(&mut s));
    assert_eq!(h.connections(), 0);
    h.assert_quiet();
}

#[test]
fn protocol_violations_reset_the_connection() {
    let mut h = H::new();
    for (op, flags) in [(0u16, 0u32), (99, 0), (OP_REQUEST, 0), (OP_RESPONSE, 0)] {
        let (mut s, port) = h.establish_from_host(52);
        h.give_rx(2);
        h.send(&Header { flags, ..gh(op, 52, port) }, &[]);
        assert_eq!(ops(&h.take_rx()), [OP_RST], "op {op}");
        assert!(host_sees_end(&mut s));
    }
    // Data before the guest accepted, and data after its SHUTDOWN SEND.
    let mut s = h.host_connect();
    s.write_all(b"CONNECT 52\n").unwrap();
    h.give_rx(1);
    h.pump();
    let port = h.take_rx()[0].0.src_port;
    h.give_rx(1);
    h.send(&gh(OP_RW, 52, port), b"too early");
    assert_eq!(ops(&h.take_rx()), [OP_RST]);
    assert!(host_sees_end(&mut s));
    let (_s, port) = h.establish_from_host(52);
    h.give_rx(1);
    h.send(&Header { flags: SHUTDOWN_SEND, ..gh(OP_SHUTDOWN, 52, port) }, &[]);
    h.send(&gh(OP_RW, 52, port), b"too late");
    assert_eq!(ops(&h.take_rx()), [OP_RST]);
    assert_eq!(h.connections(), 0);
}

#[test]
fn unusable_rx_buffers_are_returned_empty() {
    let mut h = H::new();
    let g = &mut h.g;
    let at = g.alloc(64);
    // Too small for a header, read-only, outside guest memory.
    for d in [(at, 20, true), (at, 64, false), (MEM_SIZE, 64, true)] {
        let head = g.rx.add(&g.mem, &[d]);
        g.rx_bufs.insert(head, at);
    }
    h.send(&gh(OP_REQUEST, 1, 5999), &[]);
    let used = h.g.rx.used(&h.g.mem);
    assert_eq!(used.iter().map(|u| u.1).collect::<Vec<_>>(), [0, 0, 0]);
    h.g.rx_bufs.clear();
    h.give_rx(1);
    assert_eq!(ops(&h.take_rx()), [OP_RST], "the RST waited for a usable buffer");
}

#[test]
fn owed_rsts_are_bounded_and_hold_back_tx() {
    let mut h = H::new();
    // No rx buffers: every packet for an unknown connection owes an RST.
    let n = MAX_STRAY_RSTS + 10;
    for i in 0..n {
        h.g.push_tx(&gh(OP_RW, 10_000 + i as u32, 5000), b"?");
        if i % 100 == 99 {
            h.kick(TX);
        }
    }
    h.kick(TX);
    let used = h.g.tx.used(&h.g.mem).len();
    assert_eq!(used, MAX_STRAY_RSTS, "tx waits once the owed RSTs are at the bound");
    // A full receive queue of buffers (they all take an RST): tx resumes.
    h.give_rx(usize::from(RX_QUEUE_SIZE));
    let mut answered = h.take_rx().len();
    assert_eq!(answered, usize::from(RX_QUEUE_SIZE));
    assert_eq!(h.g.tx.used(&h.g.mem).len(), 10, "tx resumed");
    while answered < n {
        h.give_rx(usize::from(RX_QUEUE_SIZE).min(n - answered));
        let got = h.take_rx().len();
        assert!(got > 0, "owed RSTs left unanswered: {answered} of {n}");
        answered += got;
    }
    assert_eq!(answered, n, "every packet answered");
}

#[test]
fn buffered_guest_bytes_are_bounded_per_device_with_back_pressure() {
    const LIMIT: usize = 128 * 1024;
    let mut h = H::new();
    assert_eq!(h.dev.buffered_bytes(), 0);
    h.dev.set_buffer_limit(LIMIT);
    let l = h.host_listen(5000);
    let mut slow = h.establish_from_guest(&l, 1, 5000);
    let mut other = h.establish_from_guest(&l, 2, 5000);
    // The guest sends to a host peer that does not read, within its
    // credit, until the device holds the bound.
    let chunk = vec![0x42u8; 16 * 1024];
    let mut sent = 0usize;
    while h.dev.buffered_bytes() < LIMIT {
        h.send(&gh(OP_RW, 1, 5000), &chunk);
        sent += chunk.len();
        assert!(sent < 64 << 20, "the host socket never filled");
    }
    let taken = h.g.tx.used(&h.g.mem).len();
    assert!(h.dev.buffered_bytes() < LIMIT + chunk.len(), "past the bound by at most one packet");
    // Now nothing more is taken from the tx queue, for any connection:
    // the packets wait in the ring, none is dropped or reset.
    h.send(&gh(OP_RW, 1, 5000), &chunk);
    h.send(&gh(OP_RW, 2, 5000), b"hello");
    h.send(&gh(OP_RW, 2, 5000), b" world");
    assert_eq!(h.g.tx.used(&h.g.mem).len(), 0, "tx waits");
    assert!(h.dev.buffered_bytes() < LIMIT + chunk.len());
    h.give_rx(8);
    assert!(!ops(&h.take_rx()).contains(&OP_RST));
    h.pump();
    h.assert_quiet();
    // The slow peer reads: buffered bytes go out, the tx queue resumes and
    // the waiting packets arrive in order.
    slow.set_nonblocking(true).unwrap();
    let mut got = 0usize;
    let mut buf = vec![0u8; 256 * 1024];
    let expect = sent + chunk.len();
    for _ in 0..10_000 {
        match slow.read(&mut buf) {
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("{e}"),
        }
        h.pump();
        if got == expect {
            break;
        }
    }
    assert_eq!(got, expect, "every byte reached the slow peer");
    assert_eq!(read_n(&mut other, 11), b"hello world");
    assert!(taken > 0);
    assert_eq!(h.g.tx.used(&h.g.mem).len(), 3, "the waiting packets were taken");
    assert_eq!(h.dev.buffered_bytes(), 0);
    // A peer that goes away with bytes buffered gives them back too.
    while h.dev.buffered_bytes() == 0 {
        h.send(&gh(OP_RW, 2, 5000), &chunk);
    }
    drop(other);
    h.pump();
    assert_eq!(h.dev.buffered_bytes(), 0);
    h.give_rx(4);
    assert!(ops(&h.take_rx()).contains(&OP_RST));
}

#[test]
fn connection_limit() {
    let mut h = H::new();
    h.dev.muxer.set_max_connections(3);
    let l = h.host_listen(5000);
    let _a = h.establish_from_guest(&l, 1, 5000);
    let _b = h.establish_from_host(52);
    let mut c = h.host_connect(); // a handshake counts
    h.pump();
    let mut d = h.host_connect();
    h.pump();
    assert!(host_sees_end(&mut d), "the fourth is refused");
    h.give_rx(1);
    h.send(&gh(OP_REQUEST, 2, 5000), &[]);
    assert_eq!(ops(&h.take_rx()), [OP_RST]);
    c.write_all(b"CONNECT 52\n").unwrap();
    h.give_rx(1);
    h.pump();
    assert_eq!(ops(&h.take_rx()), [OP_REQUEST]);
    assert_eq!(h.connections(), 3);
}

#[test]
fn many_concurrent_streams_stay_apart() {
    let mut h = H::new();
    let l = h.host_listen(7000);
    let mut host: Vec<(UnixStream, u32)> = (0..20).map(|i| h.establish_from_host(100 + i)).collect();
    let mut guest: Vec<UnixStream> = (0..20).map(|i| h.establish_from_guest(&l, 3000 + i, 7000)).collect();
    for (i, (s, _)) in host.iter_mut().enumerate() {
        s.write_all(format!("host-{i}").as_bytes()).unwrap();
    }
    for (i, s) in guest.iter_mut().enumerate() {
        s.write_all(format!("listener-{i}").as_bytes()).unwrap();
    }
    h.give_rx(64);
    h.pump();
    let p = h.take_rx();
    for (i, (_, port)) in host.iter().enumerate() {
        let got: Vec<u8> = p.iter().filter(|(hd, _)| hd.src_port == *port).flat_map(|(_, d)| d.clone()).collect();
        assert_eq!(got, format!("host-{i}").as_bytes());
    }
    for i in 0..20u32 {
        let got: Vec<u8> = p.iter().filter(|(hd, _)| hd.dst_port == 3000 + i).flat_map(|(_, d)| d.clone()).collect();
        assert_eq!(got, format!("listener-{i}").as_bytes());
    }
    for (i, (s, port)) in host.iter_mut().enumerate() {
        h.send(&gh(OP_RW, 100 + i as u32, *port), format!("g{i}").as_bytes());
        assert_eq!(read_n(s, format!("g{i}").len()), format!("g{i}").as_bytes());
    }
    assert_eq!(h.connections(), 40);
    h.assert_quiet();
}

#[test]
fn transport_reset_event_and_connections_closed() {
    let mut h = H::new();
    let (mut s, _) = h.establish_from_host(52);
    // No event buffer yet: the event waits for one.
    h.dev.transport_reset();
    assert_eq!(h.connections(), 0);
    let at = h.g.alloc(8);
    h.g.mem.write_obj(0xffff_ffffu32, GuestAddress(at)).unwrap();
    h.g.ev.add(&h.g.mem, &[(at, 8, true)]);
    // The guest's kick reaches the event loop, which closes the streams.
    h.kick(EVENT);
    assert_eq!(h.g.ev.used(&h.g.mem), [(0, 4)]);
    assert_eq!(h.g.mem.read_obj::<u32>(GuestAddress(at)).unwrap(), EVENT_TRANSPORT_RESET);
    assert!(host_sees_end(&mut s), "host stream closed");
    assert_eq!(h.w.fds.len(), 2, "only the listener and the timer are watched");
    // With a buffer ready, it goes at once; once the guest has handled it
    // (it makes a buffer available again), the device keeps working.
    let at = h.g.alloc(8);
    h.g.ev.add(&h.g.mem, &[(at, 8, true)]);
    h.dev.transport_reset();
    assert_eq!(h.g.ev.used(&h.g.mem).len(), 1);
    h.guest_handles_reset();
    let (mut s, port) = h.establish_from_host(52);
    h.send(&gh(OP_RW, 52, port), b"again");
    assert_eq!(read_n(&mut s, 5), b"again");
}

#[test]
fn driver_reset_releases_every_stream() {
    let mut h = H::new();
    let l = h.host_listen(5000);
    let (mut a, _) = h.establish_from_host(52);
    let mut b = h.establish_from_guest(&l, 1, 5000);
    let mut c = h.host_connect(); // still in its handshake
    h.pump();
    h.dev.reset();
    assert!(!h.dev.is_active());
    h.dev.release_fds_with(&mut h.w);
    assert_eq!(h.w.fds.len(), 2, "only the listener and the timer are left for the handler to remove");
    for s in [&mut a, &mut b, &mut c] {
        assert!(host_sees_end(s));
    }
}

impl Vsock {
    /// `release_fds` with the test's event loop.
    fn release_fds_with(&mut self, w: &mut Watch) {
        self.muxer.release_all();
        self.muxer.close_released(w);
    }
}

/// The whole path: MMIO transport, the event-loop handler and a real
/// `EventManager`, the way the VMM runs the device.
#[test]
fn through_the_transport_and_event_manager() {
    use crate::virtio::handler::VirtioEventHandler;
    use crate::virtio::mmio::tests::{bring_up, wr};
    use crate::virtio::mmio::{MmioTransport, REG_QUEUE_NOTIFY};
    use event_manager::{EventManager, SubscriberOps};

    let dir = TempDir::new_with_prefix("/tmp/vmrun-vsock-").unwrap();
    let uds = dir.as_path().join("v.sock");
    let mut g = Guest::new();
    let dev = Vsock::new(CID, &uds).unwrap();
    let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let mut t = MmioTransport::new(Box::new(dev), g.mem.clone(), irq).unwrap();
    bring_up(&mut t, VIRTIO_F_VERSION_1);
    assert!(t.device().is_active());
    let t = Arc::new(Mutex::new(t));
    let mut em = EventManager::<VirtioEventHandler>::new().unwrap();
    em.add_subscriber(VirtioEventHandler::new(t.clone()));
    fn run(em: &mut EventManager<VirtioEventHandler>) {
        for _ in 0..1000 {
            if em.run_with_timeout(50).unwrap() == 0 {
                return;
            }
        }
        panic!("the event manager never went idle");
    }
    run(&mut em);

    g.give_rx(4);
    wr(&mut t.lock().unwrap(), REG_QUEUE_NOTIFY, RX as u32);
    let mut s = UnixStream::connect(&uds).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"CONNECT 1024\n").unwrap();
    run(&mut em);
    let p = g.take_rx();
    assert_eq!(ops(&p), [OP_REQUEST]);
    let port = p[0].0.src_port;

    g.push_tx(&gh(OP_RESPONSE, 1024, port), &[]);
    g.push_tx(&gh(OP_RW, 1024, port), b"hi host");
    wr(&mut t.lock().unwrap(), REG_QUEUE_NOTIFY, TX as u32);
    run(&mut em);
    let expect = format!("OK {port}\nhi host");
    assert_eq!(read_n(&mut s, expect.len()), expect.as_bytes());
    s.write_all(b"hi guest").unwrap();
    run(&mut em);
    assert_eq!(data(&g.take_rx()), b"hi guest");

    // Driver reset (status 0): the handler stops watching and the device
    // closes its streams.
    wr(&mut t.lock().unwrap(), 0x070, 0);
    run(&mut em);
    assert!(host_sees_end(&mut s));
    assert!(!t.lock().unwrap().device().is_active());
}

#[test]
fn host_connections_wait_until_the_guest_handled_the_transport_reset() {
    let mut h = H::new();
    h.give_events(2);
    h.give_rx(8);
    h.dev.transport_reset();
    assert_eq!(h.g.ev.used(&h.g.mem), [(0, 4)], "the reset event is delivered at once");
    assert!(h.dev.holding_host_connections());

    // A host connects before the guest handled the event: nothing goes to
    // the guest, and nothing is watched while it waits.
    let mut a = h.host_connect_line(1024, b"early bytes");
    h.pump();
    assert_eq!(ops(&h.take_rx()), [] as [u16; 0], "no REQUEST before the guest handled the reset");
    assert_eq!(h.connections(), 1);
    h.assert_quiet();
    // Other guest activity does not release it: a kick on any queue, the
    // event queue included, with no buffer made available again.
    h.kick(EVENT);
    h.kick(TX);
    h.give_rx(1);
    h.pump();
    assert_eq!(ops(&h.take_rx()), [] as [u16; 0]);
    let mut b = h.host_connect_line(1025, b"");
    h.pump();
    assert_eq!(h.take_rx().len(), 0);
    assert_eq!(h.connections(), 2);

    // The guest handled it: exactly one REQUEST per held connection, in
    // the order they came.
    h.guest_handles_reset();
    assert!(!h.dev.holding_host_connections());
    let p = h.take_rx();
    assert_eq!(ops(&p), [OP_REQUEST, OP_REQUEST], "{p:?}");
    assert_eq!((p[0].0.dst_port, p[1].0.dst_port), (1024, 1025));
    let (pa, pb) = (p[0].0.src_port, p[1].0.src_port);
    h.send(&gh(OP_RESPONSE, 1024, pa), &[]);
    h.send(&gh(OP_RESPONSE, 1025, pb), &[]);
    h.pump();
    let line = format!("OK {pa}\n");
    assert_eq!(read_n(&mut a, line.len()), line.as_bytes());
    let line = format!("OK {pb}\n");
    assert_eq!(read_n(&mut b, line.len()), line.as_bytes());
    // The bytes sent right behind the line went nowhere else meanwhile.
    h.pump();
    assert_eq!(data(&h.take_rx()), b"early bytes");
    h.send(&gh(OP_RW, 1024, pa), b"hi");
    assert_eq!(read_n(&mut a, 2), b"hi");
    assert_eq!(h.take_rx().len(), 0, "nothing more");

    // Later connections are not held.
    let (mut c, pc) = h.establish_from_host(52);
    h.send(&gh(OP_RW, 52, pc), b"c");
    assert_eq!(read_n(&mut c, 1), b"c");
    h.pump();
    h.assert_quiet();
}

#[test]
fn a_reset_waiting_for_an_event_buffer_holds_host_connections_too() {
    let mut h = H::new();
    h.give_rx(4);
    // No event buffer: the event is owed; connections wait for it to be
    // delivered and then handled.
    h.dev.transport_reset();
    let _a = h.host_connect_line(1024, b"");
    h.pump();
    h.give_events(1);
    h.kick(EVENT);
    assert_eq!(h.g.ev.used(&h.g.mem).len(), 1, "delivered now");
    assert_eq!(h.take_rx().len(), 0, "but not handled yet");
    h.guest_handles_reset();
    assert_eq!(ops(&h.take_rx()), [OP_REQUEST]);
}

#[test]
fn held_host_connections_are_bounded_and_refused_when_the_guest_never_handles_the_reset() {
    let mut h = H::new();
    h.dev.muxer.set_max_connections(2);
    h.dev.set_reset_ack_timeout(Duration::from_millis(100));
    h.give_events(1);
    h.give_rx(4);
    h.dev.transport_reset();
    let mut a = h.host_connect_line(1024, b"");
    let mut b = h.host_connect_line(1024, b"");
    h.pump();
    // Held connections count: the third is refused at once.
    let mut c = h.host_connect();
    h.pump();
    assert!(host_sees_end(&mut c), "over the connection limit");
    assert_eq!(h.connections(), 2);
    // The guest never makes a buffer available again: at the timeout the
    // held ones are refused with a reason; nothing went to the guest.
    std::thread::sleep(Duration::from_millis(150));
    h.pump();
    let line = format!("ERR {RESET_ACK_REFUSAL}\n");
    for s in [&mut a, &mut b] {
        assert_eq!(read_n(s, line.len()), line.as_bytes());
        assert!(host_sees_end(s));
    }
    assert_eq!(h.take_rx().len(), 0);
    assert_eq!(h.connections(), 0);
    assert!(!h.dev.holding_host_connections());
    // From then on, host connections go through as without a reset.
    let (mut d, port) = h.establish_from_host(52);
    h.send(&gh(OP_RW, 52, port), b"d");
    assert_eq!(read_n(&mut d, 1), b"d");
    h.pump();
    h.assert_quiet();
}

#[test]
fn handling_the_reset_in_time_disarms_the_timer() {
    let mut h = H::new();
    h.dev.set_reset_ack_timeout(Duration::from_millis(100));
    h.give_events(1);
    h.give_rx(4);
    h.dev.transport_reset();
    let mut a = h.host_connect_line(1024, b"");
    h.pump();
    h.guest_handles_reset();
    let p = h.take_rx();
    assert_eq!(ops(&p), [OP_REQUEST]);
    std::thread::sleep(Duration::from_millis(150));
    h.pump();
    h.assert_quiet();
    h.send(&gh(OP_RESPONSE, 1024, p[0].0.src_port), &[]);
    let line = format!("OK {}\n", p[0].0.src_port);
    assert_eq!(read_n(&mut a, line.len()), line.as_bytes());
}

#[test]
fn driver_reset_closes_held_host_connections() {
    let mut h = H::new();
    h.give_events(1);
    h.dev.transport_reset();
    let mut a = h.host_connect_line(1024, b"");
    h.pump();
    assert_eq!(h.connections(), 1);
    h.dev.reset();
    h.dev.release_fds_with(&mut h.w);
    assert!(host_sees_end(&mut a));
    assert_eq!(h.connections(), 0);
    assert!(!h.dev.holding_host_connections());
}

#[test]
fn a_restored_device_takes_host_ports_away_from_the_snapshots() {
    use crate::virtio::VirtioDevice;
    let at = |s: u64, n: u32| restored_first_port(std::time::UNIX_EPOCH + Duration::new(s, n));
    let range = FIRST_LOCAL_PORT + (1 << 29)..FIRST_LOCAL_PORT + (1 << 29) + (1 << 28);
    for (s, n) in [(0, 0), (1_765_000_000, 123), (u32::MAX as u64, 999_999_999)] {
        assert!(range.contains(&at(s, n)), "{s}.{n}: {}", at(s, n));
    }
    assert_ne!(at(1_765_000_000, 1000), at(1_765_000_000, 3000));

    // After a restore, the first host connection's port is not the one a
    // booted VMM's first connection had (which the snapshot's guest may
    // still hold a socket of).
    let mut h = H::new();
    h.give_events(1);
    h.give_rx(4);
    h.dev.after_restore();
    let _a = h.host_connect_line(1024, b"");
    h.pump();
    h.guest_handles_reset();
    let p = h.take_rx();
    assert_eq!(ops(&p), [OP_REQUEST]);
    assert!(range.contains(&p[0].0.src_port), "{}", p[0].0.src_port);
}
