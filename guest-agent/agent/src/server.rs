//! The agent's event loop: one thread, one `epoll`, everything else a
//! descriptor in it.
//!
//! - the listening socket (vsock in a guest, Unix on a host) and the host's
//!   connections, framed by `vmrun_agent_protocol::frame`;
//! - a `signalfd` for `SIGCHLD`: the loop reaps every child (it is PID 1, or
//!   a child subreaper on a host) and answers `Wait`s;
//! - processes' stdout/stderr pipes (or terminal masters), read only while
//!   the host has granted credit, and stdin pipes, written without
//!   blocking from a per-stream queue bounded by the window;
//! - each new process's error pipe, which says whether it reached `execve`
//!   (so a start never blocks the loop);
//! - an `eventfd` through which worker threads (one per `CreateContainer`,
//!   which unpacks for a while) hand back their results;
//! - the kernel's exit records (`crate::exits`; in a guest, and on a host
//!   where the agent may read them): a container's first process's exit
//!   is answered as it begins, before its teardown.
//!
//! Containers' cgroups (`cgroup.rs`, in a guest) are made at create and
//! removed at remove, or, while processes of a removed container are still
//! dying, once they are reaped; `Stats` reads them, `Update` changes them.
//!
//! A slow or silent host stalls only the processes whose output it does
//! not read; nothing is buffered beyond one window per stream.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex};

use vmrun_agent_protocol::frame::{self, Decoder, Kind};
use vmrun_agent_protocol::{
    check_hello, AgentError, CreateContainer, Entropy, ErrorKind, Exec, Hello, Reply, Request, Response, Stdio, WallClock, STREAM_WINDOW,
};

use crate::cgroup::{self, Cgroup, Hierarchy};
use crate::container::{self, Container};
use crate::process::{self, ChildStdio};
use crate::settings::{Listen, Settings};
use crate::sys;

/// The agent's name and version in its hello.
pub const SOFTWARE: &str = concat!("vmrun-agent ", env!("CARGO_PKG_VERSION"));
const MAX_CONNS: usize = 16;
const MAX_STREAMS_PER_CONN: usize = 4096;
const READ_BUF: usize = 1 << 20;
/// A connection's queued frames are written at once from this size on:
/// what a batch of events queues stays small whatever output it reads.
const FLUSH_AT: usize = 64 << 10;

const T_LISTEN: u64 = 1;
const T_SIGNAL: u64 = 2;
const T_WAKE: u64 = 3;
const T_CONN: u64 = 4;
const T_OUT: u64 = 5;
const T_IN: u64 = 6;
const T_START: u64 = 7;
const T_EXITS: u64 = 8;

/// Writes connection `id`'s queued frames; a failed write marks it dead.
fn write_pending(id: u64, c: &mut Conn) {
    let bytes = std::mem::take(&mut c.pending);
    if let Err(e) = sys::write_all(c.fd.as_fd(), &bytes) {
        crate::log::debug(format_args!("connection {id}: write: {e}"));
        c.dead = true;
    }
}

fn token(kind: u64, id: u64) -> u64 {
    (kind << 56) | (id & ((1 << 56) - 1))
}

fn err(kind: ErrorKind, m: impl Into<String>) -> AgentError {
    AgentError::new(kind, m)
}

/// A process's stdout, stderr or terminal output, flowing to the host.
#[derive(Debug)]
struct OutStream {
    fd: OwnedFd,
    conn: Option<u64>,
    stream: u32,
    credit: u64,
    watching: bool,
}

/// A process's stdin (or terminal input), flowing from the host.
#[derive(Debug)]
struct InStream {
    fd: OwnedFd,
    conn: u64,
    stream: u32,
    queue: VecDeque<u8>,
    eof: bool,
    watching: bool,
}

#[derive(Debug)]
struct Conn {
    fd: OwnedFd,
    decoder: Decoder,
    hello_done: bool,
    /// Stream id -> key of the OutStream / InStream.
    outs: HashMap<u32, u64>,
    ins: HashMap<u32, u64>,
    dead: bool,
    /// Frames sent while handling one batch of events, written together
    /// (one system call, one vsock packet) before the loop waits again.
    pending: Vec<u8>,
}

/// A process the agent started.
#[derive(Debug)]
struct Proc {
    container: String,
    exec_id: Option<String>,
    exit: Option<i32>,
    waiters: Vec<(u64, u32)>,
    tty: Option<OwnedFd>,
    /// Until the start is answered: the connection and request.
    start: Option<(u64, u32)>,
    /// A held first process's gate (the write end): one byte releases it.
    gate: Option<OwnedFd>,
    /// The bounding set a held process dropped to before its hold: its
    /// release may not ask for more.
    bounding: u64,
    /// Keys of its output streams (stdout, then stderr), for a held
    /// process whose release moves them to another connection.
    outs: Vec<u64>,
    arg0: String,
    ops: Vec<String>,
    /// The exit status the kernel gave as the process began to exit
    /// (`crate::exits`), until it is reported.
    ending: Option<i32>,
}

/// Results handed back by worker threads.
#[derive(Debug)]
struct Completion {
    conn: u64,
    req: u32,
    id: String,
    result: Result<Container, AgentError>,
}

/// The agent's state and its event loop.
#[derive(Debug)]
pub struct Server {
    settings: Settings,
    epfd: OwnedFd,
    listener: OwnedFd,
    sigfd: OwnedFd,
    wake: OwnedFd,
    done: Arc<Mutex<Vec<Completion>>>,
    conns: HashMap<u64, Conn>,
    containers: HashMap<String, Container>,
    creating: HashSet<String>,
    procs: HashMap<i32, Proc>,
    outs: HashMap<u64, OutStream>,
    ins: HashMap<u64, InStream>,
    starts: HashMap<u64, (i32, OwnedFd)>,
    next_id: u64,
    buf: Vec<u8>,
    devnull: Option<OwnedFd>,
    urandom: Option<OwnedFd>,
    own_pidfd: Option<OwnedFd>,
    devpts_ready: bool,
    shutdown: bool,
    /// The cgroup2 hierarchy containers get cgroups in (in a guest).
    hierarchy: Option<Hierarchy>,
    /// Containers' cgroups, by container id.
    cgroups: HashMap<String, Cgroup>,
    /// Cgroups of removed containers whose processes were still dying:
    /// removed once they are reaped.
    stale_cgroups: Vec<Cgroup>,
    /// Signals for inits that cannot take them yet.
    held: crate::held::HeldSignals,
    /// Exits as they begin, where the kernel lets the agent listen.
    exits: Option<crate::exits::ExitWatch>,
}

fn owned(fd: libc::c_int) -> OwnedFd {
    // SAFETY: a descriptor a system call just returned to us.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// Opens the listening socket.
pub fn listen(l: &Listen) -> io::Result<OwnedFd> {
    match l {
        Listen::Unix(path) => {
            // The socket file appears at bind(), before listen(): a client
            // that sees it then would be refused. Bind under a temporary
            // name and rename it into place once it is listening, so the
            // path exists only when connections are accepted.
            let mut tmp = path.as_os_str().to_owned();
            tmp.push(".binding");
            let tmp = std::path::PathBuf::from(tmp);
            let _ = std::fs::remove_file(&tmp);
            let s = std::os::unix::net::UnixListener::bind(&tmp)?;
            std::fs::rename(&tmp, path)?;
            Ok(OwnedFd::from(s))
        }
        Listen::Vsock(port) => {
            // SAFETY: plain system call; the result is checked.
            let fd = sys::cvt(unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) })?;
            let fd = owned(fd);
            // SAFETY: sockaddr_vm is a plain C struct; all-zero is valid.
            let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
            addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
            addr.svm_port = *port;
            addr.svm_cid = libc::VMADDR_CID_ANY;
            // SAFETY: addr is a valid sockaddr_vm of the size passed.
            sys::cvt(unsafe {
                libc::bind(
                    fd.as_raw_fd(),
                    &addr as *const libc::sockaddr_vm as *const libc::sockaddr,
                    std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
                )
            })?;
            // SAFETY: listen on our socket.
            sys::cvt(unsafe { libc::listen(fd.as_raw_fd(), 8) })?;
            Ok(fd)
        }
    }
}

/// The peer of an accepted connection, as far as the agent checks it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    /// A Unix socket peer (the agent on a host, in tests).
    Unix,
    /// A vsock peer.
    Vsock {
        /// Its CID.
        cid: u32,
        /// Its port.
        port: u32,
    },
    /// Any other address family.
    Other(libc::sa_family_t),
}

/// A connection the agent refuses to serve.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// A vsock peer other than the host: a process in the guest itself,
    /// through a local transport or the guest's own CID.
    #[error("connection from vsock CID {cid} port {port} refused: only the host (CID 2) may talk to the agent")]
    NotTheHost {
        /// Its CID.
        cid: u32,
        /// Its port.
        port: u32,
    },
    /// An address of another family than the listening socket's.
    #[error("connection from an unexpected address family {0} refused")]
    Family(libc::sa_family_t),
}

/// Why the agent stopped serving (or could not start).
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The SIGCHLD signalfd could not be made.
    #[error("signalfd: {0}")]
    Signalfd(#[source] io::Error),
    /// The listening socket could not be made.
    #[error("listen on {listen:?}: {source}")]
    Listen {
        /// Where.
        listen: Listen,
        /// What the system said.
        #[source]
        source: io::Error,
    },
    /// The event loop could not be set up, or failed.
    #[error("event loop: {0}")]
    EventLoop(#[source] io::Error),
}

/// Why the guest's random generator could not be reseeded from a hello
/// (the connection is refused: a restored VM must not answer with the
/// snapshot's random state).
#[derive(Debug, thiserror::Error)]
pub enum ReseedError {
    /// The host sent no entropy.
    #[error("the host's hello carries no entropy to reseed the guest with (use the vmrun this agent was built with)")]
    NoEntropy,
    /// `/dev/urandom` could not be opened.
    #[error("/dev/urandom: {0}")]
    Open(#[source] io::Error),
    /// The kernel refused the entropy or the reseed.
    #[error("reseeding the guest's random generator: {0}")]
    Reseed(#[source] io::Error),
}

/// The peer address `accept` returned.
pub fn peer_of(addr: &libc::sockaddr_storage, len: libc::socklen_t) -> Peer {
    let family = addr.ss_family;
    match i32::from(family) {
        libc::AF_UNIX => Peer::Unix,
        libc::AF_VSOCK if len as usize >= std::mem::size_of::<libc::sockaddr_vm>() => {
            // SAFETY: sockaddr_storage is large enough and aligned for any
            // socket address, and the kernel wrote a sockaddr_vm (the
            // family says so, the length covers it).
            let vm = unsafe { &*(addr as *const libc::sockaddr_storage as *const libc::sockaddr_vm) };
            Peer::Vsock { cid: vm.svm_cid, port: vm.svm_port }
        }
        _ => Peer::Other(family),
    }
}

/// Whether the agent serves a connection from `peer`. On vsock only the
/// host (`VMADDR_CID_HOST`) may connect: the agent creates containers with
/// any mounts, so a process in the guest that reached it (vsock loopback,
/// or its own CID through a transport that routes it back) would own the
/// guest. On a Unix socket (a host, in tests) the socket's permissions
/// decide.
pub fn admit(listen: &Listen, peer: Peer) -> Result<(), Refused> {
    match (listen, peer) {
        (Listen::Unix(_), Peer::Unix) => Ok(()),
        (Listen::Vsock(_), Peer::Vsock { cid, .. }) if cid == libc::VMADDR_CID_HOST => Ok(()),
        (Listen::Vsock(_), Peer::Vsock { cid, port }) => Err(Refused::NotTheHost { cid, port }),
        (_, Peer::Unix) => Err(Refused::Family(libc::AF_UNIX as libc::sa_family_t)),
        (_, Peer::Vsock { .. }) => Err(Refused::Family(libc::AF_VSOCK as libc::sa_family_t)),
        (_, Peer::Other(f)) => Err(Refused::Family(f)),
    }
}

/// Blocks SIGCHLD (before any thread starts, so every thread inherits the
/// mask) and returns a signalfd for it.
pub fn sigchld_fd() -> io::Result<OwnedFd> {
    // SAFETY: building a signal set and blocking it; plain system calls.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGCHLD);
        sys::cvt(libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()))?;
        let fd = sys::cvt(libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK))?;
        Ok(owned(fd))
    }
}

impl Server {
    /// A server on an already listening socket.
    pub fn new(settings: Settings, listener: OwnedFd, sigfd: OwnedFd) -> io::Result<Self> {
        // SAFETY: plain system calls; results checked.
        let epfd = owned(sys::cvt(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) })?);
        // SAFETY: as above.
        let wake = owned(sys::cvt(unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) })?);
        let hierarchy = settings.guest.then(|| Hierarchy::new(cgroup::ROOT));
        let mut s = Self {
            settings,
            epfd,
            listener,
            sigfd,
            wake,
            done: Arc::new(Mutex::new(Vec::new())),
            conns: HashMap::new(),
            containers: HashMap::new(),
            creating: HashSet::new(),
            procs: HashMap::new(),
            outs: HashMap::new(),
            ins: HashMap::new(),
            starts: HashMap::new(),
            next_id: 1,
            buf: vec![0u8; READ_BUF],
            devnull: None,
            urandom: None,
            own_pidfd: None,
            devpts_ready: false,
            shutdown: false,
            hierarchy: None,
            cgroups: HashMap::new(),
            stale_cgroups: Vec::new(),
            held: crate::held::HeldSignals::default(),
            exits: None,
        };
        s.hierarchy = hierarchy;
        // On a host (as root, where the kernel has taskstats) as well:
        // the record of every exit there comes too, and is mostly not ours.
        match crate::exits::ExitWatch::open(&crate::exits::possible_cpus()) {
            Ok(w) => {
                s.watch(w.as_raw_fd(), token(T_EXITS, 0), libc::EPOLLIN as u32)?;
                s.exits = Some(w);
            }
            Err(e) if s.settings.guest => crate::log::error(format_args!("{e}; exits are reported once reaped")),
            Err(e) => crate::log::debug(format_args!("{e}; exits are reported once reaped")),
        }
        s.watch(s.listener.as_raw_fd(), token(T_LISTEN, 0), libc::EPOLLIN as u32)?;
        s.watch(s.sigfd.as_raw_fd(), token(T_SIGNAL, 0), libc::EPOLLIN as u32)?;
        s.watch(s.wake.as_raw_fd(), token(T_WAKE, 0), libc::EPOLLIN as u32)?;
        Ok(s)
    }

    fn watch(&self, fd: RawFd, tok: u64, events: u32) -> io::Result<()> {
        let mut ev = libc::epoll_event { events, u64: tok };
        // SAFETY: epoll_ctl on our epoll descriptor with a valid event.
        sys::cvt(unsafe { libc::epoll_ctl(self.epfd.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut ev) }).map(drop)
    }

    fn unwatch(&self, fd: RawFd) {
        // SAFETY: as above; a descriptor not watched just fails.
        unsafe { libc::epoll_ctl(self.epfd.as_raw_fd(), libc::EPOLL_CTL_DEL, fd, std::ptr::null_mut()) };
    }

    fn new_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// Runs until a `Shutdown` request. Returns then (the caller ends the
    /// guest or the process).
    pub fn run(&mut self) -> io::Result<()> {
        let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 64];
        while !self.shutdown {
            // SAFETY: events has room for its length of entries.
            let n = unsafe { libc::epoll_wait(self.epfd.as_raw_fd(), events.as_mut_ptr(), events.len() as i32, self.held.timeout_ms()) };
            if n < 0 {
                let e = sys::errno();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            for ev in &events[..n as usize] {
                let (tok, bits) = (ev.u64, ev.events);
                let id = tok & ((1 << 56) - 1);
                match tok >> 56 {
                    T_LISTEN => self.accept(),
                    T_SIGNAL => self.reap(),
                    T_WAKE => self.completions(),
                    T_CONN => self.conn_readable(id),
                    T_OUT => {
                        self.out_readable(id);
                    }
                    T_IN => self.in_writable(id, bits),
                    T_START => self.start_verdict(id),
                    T_EXITS => self.exits_readable(),
                    _ => {}
                }
            }
            self.flush_conns();
            self.close_dead_conns();
            let procs = &self.procs;
            self.held.retry(|pid| procs.get(&pid).is_some_and(|p| p.exit.is_none()));
        }
        Ok(())
    }

    // ---- Connections ----

    fn accept(&mut self) {
        // SAFETY: sockaddr_storage is a plain C struct; all-zero is valid.
        let mut addr: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        // SAFETY: accept4 on our listening socket, with room for any
        // address and its length; the result is checked.
        let fd = unsafe {
            libc::accept4(self.listener.as_raw_fd(), &mut addr as *mut libc::sockaddr_storage as *mut libc::sockaddr, &mut len, libc::SOCK_CLOEXEC)
        };
        if fd < 0 {
            crate::log::error(format_args!("accept: {}", sys::errno()));
            return;
        }
        let fd = owned(fd);
        if let Err(e) = admit(&self.settings.listen, peer_of(&addr, len)) {
            // Closed at once (dropped), before a byte is read.
            crate::log::error(format_args!("{e}"));
            return;
        }
        if self.conns.len() >= MAX_CONNS {
            crate::log::error(format_args!("too many connections; refusing one"));
            return;
        }
        let id = self.new_id();
        if let Err(e) = self.watch(fd.as_raw_fd(), token(T_CONN, id), libc::EPOLLIN as u32) {
            crate::log::error(format_args!("epoll: {e}"));
            return;
        }
        crate::log::debug(format_args!("connection {id}"));
        self.conns.insert(id, Conn { fd, decoder: Decoder::new(), hello_done: false, outs: HashMap::new(), ins: HashMap::new(), dead: false, pending: Vec::new() });
    }

    /// Queues a frame for `conn`; [`Self::flush_conns`] writes it, or
    /// this once [`FLUSH_AT`] bytes are queued.
    fn send(&mut self, conn: u64, kind: Kind, id: u32, payload: &[u8]) {
        let Some(c) = self.conns.get_mut(&conn) else { return };
        if c.dead {
            return;
        }
        frame::encode_into(&mut c.pending, kind, id, payload);
        if c.pending.len() >= FLUSH_AT {
            write_pending(conn, c);
        }
    }

    /// Writes each connection's queued frames: a process's end (its
    /// streams' ends and its exit) goes to the host in one write, not
    /// one per frame. A connection found dead after queueing (a refused
    /// hello) still gets what was queued before.
    fn flush_conns(&mut self) {
        for (id, c) in &mut self.conns {
            if !c.pending.is_empty() {
                write_pending(*id, c);
            }
        }
    }

    fn respond(&mut self, conn: u64, req: u32, r: Response) {
        match serde_json::to_vec(&r) {
            Ok(p) if p.len() <= frame::MAX_PAYLOAD => self.send(conn, Kind::Response, req, &p),
            _ => {
                let fallback: Response = Err(err(ErrorKind::Internal, "response too large"));
                if let Ok(p) = serde_json::to_vec(&fallback) {
                    self.send(conn, Kind::Response, req, &p);
                }
            }
        }
    }

    fn conn_readable(&mut self, id: u64) {
        let Some(c) = self.conns.get_mut(&id) else { return };
        let n = match sys::read(c.fd.as_fd(), &mut self.buf) {
            Ok(0) => {
                c.dead = true;
                return;
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted || e.kind() == io::ErrorKind::WouldBlock => return,
            Err(e) => {
                crate::log::debug(format_args!("connection {id}: read: {e}"));
                c.dead = true;
                return;
            }
        };
        c.decoder.feed(&self.buf[..n]);
        loop {
            let Some(c) = self.conns.get_mut(&id) else { return };
            if c.dead {
                return;
            }
            match c.decoder.next_frame() {
                Ok(Some(f)) => self.frame(id, f),
                Ok(None) => return,
                Err(e) => {
                    crate::log::error(format_args!("connection {id}: {e}"));
                    c.dead = true;
                    return;
                }
            }
        }
    }

    fn violation(&mut self, conn: u64, what: &str) {
        crate::log::error(format_args!("connection {conn}: protocol violation: {what}"));
        if let Some(c) = self.conns.get_mut(&conn) {
            c.dead = true;
        }
    }

    fn frame(&mut self, conn: u64, f: frame::Frame) {
        let hello_done = self.conns.get(&conn).is_some_and(|c| c.hello_done);
        if !hello_done {
            if f.kind != Kind::Hello {
                return self.violation(conn, "first frame is not a hello");
            }
            let ours = Hello::ours(SOFTWARE);
            let payload = serde_json::to_vec(&ours).unwrap_or_default();
            let theirs: Hello = match serde_json::from_slice(&f.payload) {
                Ok(h) => h,
                Err(_) => {
                    self.send(conn, Kind::Hello, 0, &payload);
                    return self.violation(conn, "malformed hello");
                }
            };
            // In a guest, nothing is answered before the guest's random
            // state is its own: a VM restored from a snapshot starts with
            // the snapshot's, like every other VM restored from it.
            if self.settings.guest && check_hello(&ours, &theirs).is_ok() {
                if let Err(e) = self.reseed(theirs.entropy.as_ref()) {
                    crate::log::error(format_args!("connection {conn}: refused: {e}"));
                    if let Some(c) = self.conns.get_mut(&conn) {
                        c.dead = true;
                    }
                    return;
                }
                if let Some(host) = theirs.time {
                    follow_the_hosts_clock(host);
                }
            }
            self.send(conn, Kind::Hello, 0, &payload);
            match check_hello(&ours, &theirs) {
                Ok(()) => {
                    if let Some(c) = self.conns.get_mut(&conn) {
                        c.hello_done = true;
                    }
                }
                Err(e) => {
                    crate::log::error(format_args!("connection {conn}: refused: {e}"));
                    if let Some(c) = self.conns.get_mut(&conn) {
                        c.dead = true;
                    }
                }
            }
            return;
        }
        match f.kind {
            Kind::Request => match serde_json::from_slice::<Request>(&f.payload) {
                Ok(r) => self.request(conn, f.id, r),
                Err(e) => self.respond(conn, f.id, Err(err(ErrorKind::BadRequest, format!("malformed request: {e}")))),
            },
            Kind::Data => self.stdin_data(conn, f.id, &f.payload),
            Kind::Eof => self.stdin_eof(conn, f.id),
            Kind::Credit => {
                let Ok(b) = <[u8; 4]>::try_from(f.payload.as_slice()) else {
                    return self.violation(conn, "malformed credit");
                };
                self.credit(conn, f.id, u32::from_le_bytes(b));
            }
            Kind::Hello | Kind::Response => self.violation(conn, "unexpected frame kind"),
        }
    }

    /// Mixes the host's entropy into the guest kernel's pool and reseeds
    /// its CRNG (`/dev/urandom` is opened once and kept).
    fn reseed(&mut self, entropy: Option<&Entropy>) -> Result<(), ReseedError> {
        let entropy = entropy.ok_or(ReseedError::NoEntropy)?;
        let fd = match self.urandom.take() {
            Some(fd) => fd,
            None => sys::open(c"/dev/urandom", libc::O_RDONLY | libc::O_CLOEXEC, 0).map_err(ReseedError::Open)?,
        };
        let fd = self.urandom.insert(fd);
        sys::add_entropy_and_reseed(fd.as_fd(), entropy.bytes()).map_err(ReseedError::Reseed)?;
        crate::log::debug(format_args!("random generator reseeded with {} bytes from the host", entropy.bytes().len()));
        Ok(())
    }

    fn close_dead_conns(&mut self) {
        let dead: Vec<u64> = self.conns.iter().filter(|(_, c)| c.dead).map(|(id, _)| *id).collect();
        for id in dead {
            let Some(c) = self.conns.remove(&id) else { continue };
            self.unwatch(c.fd.as_raw_fd());
            crate::log::debug(format_args!("connection {id} closed"));
            // Output keeps being drained (and dropped) so processes do not
            // block; input is closed (the process sees end of file).
            for key in c.outs.values() {
                if let Some(o) = self.outs.get_mut(key) {
                    o.conn = None;
                    o.credit = u64::MAX;
                    if !o.watching {
                        o.watching = true;
                        let (fd, tok) = (o.fd.as_raw_fd(), token(T_OUT, *key));
                        let _ = self.watch(fd, tok, libc::EPOLLIN as u32);
                    }
                }
            }
            for key in c.ins.values() {
                if let Some(i) = self.ins.remove(key) {
                    if i.watching {
                        self.unwatch(i.fd.as_raw_fd());
                    }
                }
            }
            for p in self.procs.values_mut() {
                p.waiters.retain(|(c, _)| *c != id);
                if p.start.is_some_and(|(c, _)| c == id) {
                    p.start = None;
                }
            }
        }
    }

    // ---- Streams ----

    /// Reads what stream `key`'s pipe holds, as far as the host's credit
    /// allows: true when it read some (there may be more).
    fn out_readable(&mut self, key: u64) -> bool {
        let Some(o) = self.outs.get_mut(&key) else { return false };
        let want = (o.credit.min(READ_BUF as u64) as usize).min(frame::MAX_PAYLOAD);
        let r = sys::read(o.fd.as_fd(), &mut self.buf[..want.max(1)]);
        let (conn, stream) = (o.conn, o.stream);
        match r {
            Ok(n) if n > 0 => {
                o.credit = o.credit.saturating_sub(n as u64);
                let stall = o.credit == 0;
                if stall {
                    o.watching = false;
                    let fd = o.fd.as_raw_fd();
                    self.unwatch(fd);
                }
                if let Some(c) = conn {
                    let data = self.buf[..n].to_vec();
                    self.send(c, Kind::Data, stream, &data);
                }
                true
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::Interrupted => false,
            // End of file, or EIO from a terminal whose last user is gone.
            _ => {
                self.end_out(key);
                false
            }
        }
    }

    /// Ends stream `key`: its pipe closed, the host told it ended.
    fn end_out(&mut self, key: u64) {
        let Some(o) = self.outs.remove(&key) else { return };
        self.unwatch(o.fd.as_raw_fd());
        if let Some(c) = o.conn {
            self.send(c, Kind::Eof, o.stream, &[]);
            if let Some(cc) = self.conns.get_mut(&c) {
                cc.outs.remove(&o.stream);
            }
        }
    }

    /// Reads stream `key` until its pipe is empty (or ends): false when
    /// the host's credit ran out first.
    fn drain_out(&mut self, key: u64) -> bool {
        loop {
            match self.outs.get(&key) {
                None => return true,
                Some(o) if o.credit == 0 => return false,
                Some(_) => {}
            }
            if !self.out_readable(key) {
                return true;
            }
        }
    }

    fn credit(&mut self, conn: u64, stream: u32, n: u32) {
        let Some(key) = self.conns.get(&conn).and_then(|c| c.outs.get(&stream)).copied() else { return };
        let Some(o) = self.outs.get_mut(&key) else { return };
        o.credit = o.credit.saturating_add(u64::from(n)).min(2 * u64::from(STREAM_WINDOW));
        if !o.watching && o.credit > 0 {
            o.watching = true;
            let fd = o.fd.as_raw_fd();
            let _ = self.watch(fd, token(T_OUT, key), libc::EPOLLIN as u32);
        }
    }

    fn stdin_data(&mut self, conn: u64, stream: u32, data: &[u8]) {
        let Some(key) = self.conns.get(&conn).and_then(|c| c.ins.get(&stream)).copied() else {
            // The process closed its input already: drop, as a pipe would.
            return;
        };
        let Some(i) = self.ins.get_mut(&key) else { return };
        if i.eof || i.queue.len() + data.len() > STREAM_WINDOW as usize {
            return self.violation(conn, "stdin data beyond the window or after end of file");
        }
        i.queue.extend(data);
        self.flush_stdin(key);
    }

    fn stdin_eof(&mut self, conn: u64, stream: u32) {
        let Some(key) = self.conns.get(&conn).and_then(|c| c.ins.get(&stream)).copied() else { return };
        if let Some(i) = self.ins.get_mut(&key) {
            i.eof = true;
        }
        self.flush_stdin(key);
    }

    /// Writes what the stream has queued, as far as the pipe takes it
    /// without blocking, and gives the host credit for it.
    fn flush_stdin(&mut self, key: u64) {
        let Some(i) = self.ins.get_mut(&key) else { return };
        let mut written = 0usize;
        let mut closed = false;
        while !i.queue.is_empty() {
            let (a, _) = i.queue.as_slices();
            match sys::write(i.fd.as_fd(), a) {
                Ok(n) => {
                    i.queue.drain(..n);
                    written += n;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => {
                    closed = true;
                    break;
                }
            }
        }
        let (conn, stream, fd) = (i.conn, i.stream, i.fd.as_raw_fd());
        let finished = closed || (i.queue.is_empty() && i.eof);
        let need_watch = !finished && !i.queue.is_empty();
        if need_watch != i.watching {
            i.watching = need_watch;
            if need_watch {
                let _ = self.watch(fd, token(T_IN, key), libc::EPOLLOUT as u32);
            } else {
                self.unwatch(fd);
            }
        }
        if finished {
            if let Some(i) = self.ins.remove(&key) {
                if i.watching {
                    self.unwatch(i.fd.as_raw_fd());
                }
            }
            if let Some(c) = self.conns.get_mut(&conn) {
                c.ins.remove(&stream);
            }
        }
        if written > 0 && !closed {
            self.send(conn, Kind::Credit, stream, &(written as u32).to_le_bytes());
        }
    }

    fn in_writable(&mut self, key: u64, _bits: u32) {
        self.flush_stdin(key);
    }

    // ---- Requests ----

    fn request(&mut self, conn: u64, req: u32, r: Request) {
        crate::log::debug(format_args!("request {req}: {}", request_name(&r)));
        let result = match r {
            Request::Ping => Ok(Some(Reply::Pong { software: SOFTWARE.into() })),
            Request::CreateContainer(c) => self.create(conn, req, c).map(|()| None),
            Request::StartContainer { container, stdio, process, hold } => {
                self.start(conn, req, &container, Start::Init(process, hold), stdio).map(|()| None)
            }
            Request::Release { container, process, stdio } => self.release(conn, req, &container, process, stdio).map(|()| None),
            Request::Exec(e) => self.exec(conn, req, e).map(|()| None),
            Request::Signal { container, exec_id, signal } => self.signal(&container, exec_id.as_deref(), signal).map(|()| Some(Reply::Done)),
            Request::Wait { container, exec_id } => self.wait(conn, req, &container, exec_id.as_deref()),
            Request::ResizeTty { container, exec_id, rows, cols } => {
                self.resize(&container, exec_id.as_deref(), rows, cols).map(|()| Some(Reply::Done))
            }
            Request::RemoveContainer { container, force } => self.remove(&container, force).map(|()| Some(Reply::Done)),
            Request::ConfigureNetwork(n) => self.configure_network(&n).map(|()| Some(Reply::Done)),
            Request::WriteFiles(w) => self.write_files(&w).map(|()| Some(Reply::Done)),
            Request::Shutdown => {
                self.shutdown = true;
                self.kill_all();
                Ok(Some(Reply::Done))
            }
            Request::ReadChanges { container, from } => {
                self.read_changes(&container, from).map(|(changes, next)| Some(Reply::Changes { changes, next }))
            }
            Request::Stats { container } => self.cgroup_of(&container).map(|cg| Some(Reply::Stats(cg.stats()))),
            Request::Update { container, resources } => self.update(&container, &resources).map(|()| Some(Reply::Done)),
            Request::Freeze { container, frozen } => self.freeze(&container, frozen).map(|()| Some(Reply::Done)),
        };
        match result {
            Ok(Some(reply)) => self.respond(conn, req, Ok(reply)),
            Ok(None) => {}
            Err(e) => self.respond(conn, req, Err(e)),
        }
    }

    fn configure_network(&mut self, n: &vmrun_agent_protocol::NetworkConfig) -> Result<(), AgentError> {
        if !self.settings.guest {
            return Err(err(ErrorKind::BadRequest, "this agent is not a guest's init: it leaves the network alone"));
        }
        if n.interface.is_empty() || n.interface.len() >= libc::IFNAMSIZ || n.interface.contains('/') {
            return Err(err(ErrorKind::BadRequest, format!("invalid interface name {:?}", n.interface)));
        }
        let bad = |e: String| err(ErrorKind::BadRequest, e);
        let c = crate::settings::parse_net(&n.address, n.gateway.as_deref()).map_err(|e| bad(e.to_string()))?;
        let mac = match &n.mac {
            Some(m) => Some(crate::net::parse_mac(m).ok_or_else(|| bad(format!("invalid MAC address {m:?}")))?),
            None => None,
        };
        let routes = n
            .routes
            .iter()
            .map(|r| crate::settings::parse_net(&r.destination, r.gateway.as_deref()).map_err(|e| bad(format!("route: {e}"))))
            .collect::<Result<Vec<_>, _>>()?;
        let fail = |what: &str, e: std::io::Error| err(ErrorKind::Internal, format!("{what} of {}: {e}", n.interface));
        if let Some(mtu) = n.mtu {
            crate::net::set_mtu(&n.interface, mtu).map_err(|e| fail("setting the MTU", e))?;
        }
        if let Some(mac) = mac {
            crate::net::set_mac(&n.interface, mac).map_err(|e| fail("setting the MAC address", e))?;
        }
        // Routes on the link first: a gateway may be reachable only by one
        // (an address of prefix 32 and a route to its gateway).
        crate::net::configure(&n.interface, &crate::settings::NetConfig { gateway: None, ..c })
            .map_err(|e| fail("configuring the address", e))?;
        let (on_link, via): (Vec<_>, Vec<_>) = routes.into_iter().partition(|r| r.gateway.is_none());
        let default = c.gateway.map(|gw| crate::settings::NetConfig { addr: std::net::Ipv4Addr::UNSPECIFIED, prefix: 0, gateway: Some(gw) });
        for r in on_link.into_iter().chain(default).chain(via) {
            crate::net::add_route(&n.interface, r.addr, r.prefix, r.gateway).map_err(|e| fail("adding a route", e))?;
        }
        if n.nameservers.is_empty() {
            return Ok(());
        }
        // The containers there are now (`vmrun run` creates its container
        // before it configures the network) get the name servers.
        let text = crate::net::resolv_conf(&n.nameservers).map_err(|e| err(ErrorKind::BadRequest, e.to_string()))?;
        for c in self.containers.values() {
            crate::net::write_resolv_conf(&c.rootfs, &text)
                .map_err(|e| err(ErrorKind::Internal, format!("writing /etc/resolv.conf of container {}: {e}", c.id)))?;
        }
        Ok(())
    }

    fn write_files(&mut self, w: &vmrun_agent_protocol::WriteFiles) -> Result<(), AgentError> {
        let ct = self.containers.get_mut(&w.container).ok_or_else(|| err(ErrorKind::NotFound, format!("no container {}", w.container)))?;
        if ct.stopped {
            return Err(err(ErrorKind::InvalidState, format!("container {} has exited", w.container)));
        }
        let started = ct.init_pid.is_some();
        ct.copies.write(w, started)
    }

    /// A part of what a container changed in its overlay root (the list
    /// made at the first part).
    fn read_changes(&mut self, id: &str, from: u64) -> Result<(Vec<vmrun_agent_protocol::Change>, Option<u64>), AgentError> {
        let ct = self.containers.get_mut(id).ok_or_else(|| err(ErrorKind::NotFound, format!("no container {id}")))?;
        let Some(upper) = ct.upper.clone() else {
            return Err(err(ErrorKind::BadRequest, format!("container {id}'s root is not an overlay: it has no changes to read")));
        };
        let fail = |e: std::io::Error| err(ErrorKind::Internal, format!("reading container {id}'s changes: {e}"));
        if from == 0 || ct.changes.is_none() {
            ct.changes = Some(crate::changes::list(&upper).map_err(fail)?);
        }
        crate::changes::part(&upper, ct.changes.as_deref().unwrap_or_default(), from).map_err(fail)
    }

    fn create(&mut self, conn: u64, req: u32, c: CreateContainer) -> Result<(), AgentError> {
        if !vmrun_agent_protocol::valid_id(&c.id) {
            return Err(err(ErrorKind::BadRequest, format!("invalid container id {:?}", c.id)));
        }
        if self.containers.contains_key(&c.id) || self.creating.contains(&c.id) {
            return Err(err(ErrorKind::AlreadyExists, format!("container {} already exists", c.id)));
        }
        self.make_cgroup(&c.id, &c.config.resources, c.config.cgroup)?;
        self.creating.insert(c.id.clone());
        let root = self.settings.root.clone();
        let done = Arc::clone(&self.done);
        let wake = sys::dup(self.wake.as_fd()).map_err(|e| err(ErrorKind::Internal, format!("dup: {e}")))?;
        let id = c.id.clone();
        let spawned = std::thread::Builder::new().name(format!("create-{id}")).spawn(move || {
            let result = container::create(&root, &c);
            if let Ok(mut v) = done.lock() {
                v.push(Completion { conn, req, id: c.id.clone(), result });
            }
            let _ = sys::write(wake.as_fd(), &1u64.to_ne_bytes());
        });
        if let Err(e) = spawned {
            self.creating.remove(&id);
            self.drop_cgroup(&id);
            return Err(err(ErrorKind::Internal, format!("cannot start a worker thread: {e}")));
        }
        Ok(())
    }

    fn completions(&mut self) {
        let mut b = [0u8; 8];
        let _ = sys::read(self.wake.as_fd(), &mut b);
        let list: Vec<Completion> = match self.done.lock() {
            Ok(mut v) => std::mem::take(&mut *v),
            Err(_) => return,
        };
        for c in list {
            self.creating.remove(&c.id);
            let r = match c.result {
                Ok(ct) => {
                    crate::log::debug(format_args!("container {} created", c.id));
                    self.containers.insert(c.id.clone(), ct);
                    Ok(Reply::Done)
                }
                Err(e) => {
                    self.drop_cgroup(&c.id);
                    Err(e)
                }
            };
            self.respond(c.conn, c.req, r);
        }
    }

    fn devnull(&mut self) -> Result<OwnedFd, AgentError> {
        if self.devnull.is_none() {
            let fd = sys::open(c"/dev/null", libc::O_RDWR, 0).map_err(|e| err(ErrorKind::Internal, format!("/dev/null: {e}")))?;
            self.devnull = Some(fd);
        }
        match &self.devnull {
            Some(fd) => sys::dup(fd.as_fd()).map_err(|e| err(ErrorKind::Internal, format!("dup: {e}"))),
            None => Err(err(ErrorKind::Internal, "/dev/null")),
        }
    }

    fn ptmx(&mut self) -> &'static std::ffi::CStr {
        if self.settings.guest && !self.devpts_ready {
            // Lazily: only a terminal needs devpts in the guest.
            let _ = sys::mkdirat(
                // SAFETY: AT_FDCWD is a valid "descriptor" for *at calls.
                unsafe { BorrowedFd::borrow_raw(libc::AT_FDCWD) },
                c"/dev/pts",
                0o755,
            );
            if let Err(e) = sys::mount(Some(c"devpts"), c"/dev/pts", Some(c"devpts"), libc::MS_NOSUID | libc::MS_NOEXEC, Some(c"ptmxmode=0666,mode=0620")) {
                crate::log::error(format_args!("mounting /dev/pts: {e}"));
            }
            self.devpts_ready = true;
        }
        c"/dev/ptmx"
    }

    /// The devpts instance of container `id` (a duplicate descriptor), made
    /// first when its first process is about to start (`init`).
    fn container_devpts(&mut self, id: &str, init: bool) -> Option<OwnedFd> {
        let ct = self.containers.get_mut(id)?;
        if init {
            container::make_devpts(ct);
        }
        ct.devpts.as_ref().and_then(|fd| sys::dup(fd.as_fd()).ok())
    }

    /// Builds the child's stdio and registers the agent's ends.
    #[allow(clippy::type_complexity)]
    fn stdio(
        &mut self,
        conn: u64,
        stdio: &Stdio,
        devpts: Option<BorrowedFd<'_>>,
    ) -> Result<(ChildStdio, Vec<(u32, OwnedFd, bool)>, Option<OwnedFd>), AgentError> {
        let ioerr = |e: io::Error| err(ErrorKind::Internal, format!("stdio: {e}"));
        let c = self.conns.get(&conn).ok_or_else(|| err(ErrorKind::Internal, "connection gone"))?;
        let used = |s: u32| c.outs.contains_key(&s) || c.ins.contains_key(&s);
        if c.outs.len() + c.ins.len() + 3 > MAX_STREAMS_PER_CONN {
            return Err(err(ErrorKind::BadRequest, "too many streams on this connection"));
        }
        match stdio {
            Stdio::Null => Ok((ChildStdio { fds: [self.devnull()?, self.devnull()?, self.devnull()?], tty: false }, vec![], None)),
            Stdio::Pipes { stdin, stdout, stderr } => {
                let ids: Vec<u32> = [stdin, stdout, stderr].iter().filter_map(|s| **s).collect();
                let uniq: HashSet<u32> = ids.iter().copied().collect();
                if uniq.len() != ids.len() || ids.iter().any(|s| used(*s)) {
                    return Err(err(ErrorKind::BadRequest, "stream ids must be unique on the connection"));
                }
                let mut ours = Vec::new();
                let fd0 = match stdin {
                    Some(s) => {
                        let (r, w) = sys::pipe(0).map_err(ioerr)?;
                        sys::set_fl(w.as_fd(), libc::O_NONBLOCK).map_err(ioerr)?;
                        ours.push((*s, w, true));
                        r
                    }
                    None => self.devnull()?,
                };
                let mut out = |s: &Option<u32>, ours: &mut Vec<(u32, OwnedFd, bool)>| -> Result<OwnedFd, AgentError> {
                    match s {
                        Some(s) => {
                            let (r, w) = sys::pipe(0).map_err(ioerr)?;
                            ours.push((*s, r, false));
                            Ok(w)
                        }
                        None => self.devnull(),
                    }
                };
                let fd1 = out(stdout, &mut ours)?;
                let fd2 = out(stderr, &mut ours)?;
                Ok((ChildStdio { fds: [fd0, fd1, fd2], tty: false }, ours, None))
            }
            Stdio::Tty { stream, rows, cols } => {
                if used(*stream) {
                    return Err(err(ErrorKind::BadRequest, "stream ids must be unique on the connection"));
                }
                let pty = match devpts {
                    Some(pts) => sys::open_pty_in(pts),
                    None => sys::open_pty(self.ptmx()),
                };
                let (master, slave) = pty.map_err(|e| err(ErrorKind::Internal, format!("cannot open a terminal: {e}")))?;
                let _ = sys::set_winsize(master.as_fd(), *rows, *cols);
                let input = sys::dup(master.as_fd()).map_err(ioerr)?;
                sys::set_fl(input.as_fd(), libc::O_NONBLOCK).map_err(ioerr)?;
                let resize = sys::dup(master.as_fd()).map_err(ioerr)?;
                let s1 = sys::dup(slave.as_fd()).map_err(ioerr)?;
                let s2 = sys::dup(slave.as_fd()).map_err(ioerr)?;
                Ok((ChildStdio { fds: [slave, s1, s2], tty: true }, vec![(*stream, input, true), (*stream, master, false)], Some(resize)))
            }
        }
    }

    /// Registers the agent's ends of a process's streams on `conn`;
    /// returns the keys of the output ones, in order.
    fn register_streams(&mut self, conn: u64, ours: Vec<(u32, OwnedFd, bool)>) -> Vec<u64> {
        let mut out_keys = Vec::new();
        for (stream, fd, is_input) in ours {
            let key = self.new_id();
            if is_input {
                self.ins.insert(key, InStream { fd, conn, stream, queue: VecDeque::new(), eof: false, watching: false });
                if let Some(c) = self.conns.get_mut(&conn) {
                    c.ins.insert(stream, key);
                }
            } else {
                let raw = fd.as_raw_fd();
                self.outs.insert(key, OutStream { fd, conn: Some(conn), stream, credit: u64::from(STREAM_WINDOW), watching: true });
                let _ = self.watch(raw, token(T_OUT, key), libc::EPOLLIN as u32);
                if let Some(c) = self.conns.get_mut(&conn) {
                    c.outs.insert(stream, key);
                }
                out_keys.push(key);
            }
        }
        out_keys
    }

    fn start(&mut self, conn: u64, req: u32, id: &str, what: Start, stdio: Stdio) -> Result<(), AgentError> {
        let tty = matches!(stdio, Stdio::Tty { .. });
        let ct = self.containers.get(id).ok_or_else(|| err(ErrorKind::NotFound, format!("no container {id}")))?;
        let (spec, enter, exec_id, binds) = match &what {
            Start::Init(overrides, _) => {
                if self.discard_held(id) {
                    crate::log::debug(format_args!("container {id}: its held process was discarded for a fresh start"));
                }
                let ct = self.containers.get(id).ok_or_else(|| err(ErrorKind::NotFound, format!("no container {id}")))?;
                if ct.init_pid.is_some() {
                    return Err(err(ErrorKind::InvalidState, format!("container {id} was already started")));
                }
                let mut extra = overrides.as_ref().map(|o| o.mounts.clone()).unwrap_or_default();
                // Directories on a volume disk, then the copies the host sent.
                extra.extend(container::disk_dir_mounts(&ct.config.disk_dirs)?);
                extra.extend(ct.copies.bind_mounts());
                if !extra.is_empty() {
                    let mut mounts = ct.config.mounts.clone();
                    mounts.extend(extra);
                    if let Some(ct) = self.containers.get_mut(id) {
                        ct.config.mounts = mounts;
                    }
                }
                let ct = self.containers.get(id).ok_or_else(|| err(ErrorKind::NotFound, format!("no container {id}")))?;
                let binds = container::open_bind_sources(&ct.config.mounts)?;
                (ct.init_spec(tty, overrides.as_ref())?, None, None, binds)
            }
            Start::Exec(e) => {
                if !vmrun_agent_protocol::valid_id(&e.exec_id) {
                    return Err(err(ErrorKind::BadRequest, format!("invalid exec id {:?}", e.exec_id)));
                }
                if !e.process.mounts.is_empty() {
                    return Err(err(ErrorKind::BadRequest, "an exec cannot add mounts"));
                }
                let (Some(pidfd), false) = (&ct.init_pidfd, ct.stopped) else {
                    return Err(err(ErrorKind::InvalidState, format!("container {id} is not running")));
                };
                if self.procs.values().any(|p| p.container == id && p.exec_id.as_deref() == Some(&e.exec_id)) {
                    return Err(err(ErrorKind::AlreadyExists, format!("exec {} already exists in {id}", e.exec_id)));
                }
                let own = own_pidfd(&mut self.own_pidfd)?;
                (ct.exec_spec(&e.process, tty)?, Some((pidfd.as_raw_fd(), own)), Some(e.exec_id.clone()), Vec::new())
            }
        };
        let pts = self.container_devpts(id, matches!(what, Start::Init(..)));
        let (child_stdio, ours, resize) = self.stdio(conn, &stdio, pts.as_ref().map(AsFd::as_fd))?;
        let ct = self.containers.get(id).ok_or_else(|| err(ErrorKind::NotFound, format!("no container {id}")))?;
        // A container that shares another's IPC and UTS namespaces (a
        // pod's, its sandbox's): the descriptors live until the clone.
        let mut join_fds = Vec::new();
        let join = match (&what, &ct.config.share_ipc_uts_with) {
            (Start::Init(..), Some(other)) => {
                let gone = || err(ErrorKind::InvalidState, format!("container {other}, whose IPC and UTS namespaces {id} shares, has no running process"));
                let o = self.containers.get(other).ok_or_else(gone)?;
                let (Some(ipc), Some(uts)) = (o.ipc_ns.as_ref(), o.uts_ns.as_ref()) else { return Err(gone()) };
                for kind in ["ipc", "uts"] {
                    join_fds.push(open_ns("self", kind).map_err(|e| err(ErrorKind::Internal, format!("the agent's {kind} namespace: {e}")))?);
                }
                let pid = if ct.config.share_pid {
                    let (Some(other_pid), false) = (o.init_pidfd.as_ref(), o.stopped) else { return Err(gone()) };
                    Some((other_pid.as_raw_fd(), own_pidfd(&mut self.own_pidfd)?))
                } else {
                    None
                };
                Some(process::Join {
                    ipc: ipc.as_raw_fd(),
                    uts: uts.as_raw_fd(),
                    own_ipc: join_fds[0].as_raw_fd(),
                    own_uts: join_fds[1].as_raw_fd(),
                    pid,
                })
            }
            _ => None,
        };
        let mut plan = ct.plan(&spec, child_stdio, enter, join, &binds)?;
        plan.cgroup = self.cgroups.get(id).map(Cgroup::fd);
        let gate = match what {
            Start::Init(_, true) => Some(sys::pipe(0).map_err(|e| err(ErrorKind::Internal, format!("pipe: {e}")))?),
            _ => None,
        };
        plan.gate = gate.as_ref().map(|(r, w)| (r.as_raw_fd(), w.as_raw_fd()));
        let ops = match &plan.enter {
            process::Enter::New { ops, .. } => ops.iter().map(|o| o.describe()).collect(),
            process::Enter::Existing { .. } => Vec::new(),
        };
        let started = process::spawn(plan).map_err(|e| err(ErrorKind::Internal, format!("clone: {e}")))?;
        drop(join_fds);
        drop(binds);
        let gate = gate.map(|(_, w)| w);
        let pid = started.pid;
        crate::log::debug(format_args!("container {id}: started {:?} as pid {pid}", spec.args));
        if matches!(what, Start::Init(..)) {
            let ns_of = |kind: &str| {
                open_ns(&pid.to_string(), kind).map_err(|e| crate::log::debug(format_args!("/proc/{pid}/ns/{kind}: {e}"))).ok()
            };
            let (mnt_ns, ipc_ns, uts_ns) = (ns_of("mnt"), ns_of("ipc"), ns_of("uts"));
            if let Some(ct) = self.containers.get_mut(id) {
                ct.mnt_ns = mnt_ns;
                ct.ipc_ns = ipc_ns;
                ct.uts_ns = uts_ns;
                ct.init_pid = Some(pid);
                ct.init_pidfd = Some(started.pidfd);
            }
        }
        let outs = self.register_streams(conn, ours);
        self.procs.insert(
            pid,
            Proc {
                container: id.to_string(),
                exec_id,
                exit: None,
                waiters: Vec::new(),
                tty: resize,
                start: Some((conn, req)),
                gate,
                bounding: spec.caps.bounding,
                outs,
                arg0: spec.args[0].clone(),
                ops,
                ending: None,
            },
        );
        let key = self.new_id();
        let raw = started.errors.as_raw_fd();
        self.starts.insert(key, (pid, started.errors));
        if let Err(e) = self.watch(raw, token(T_START, key), libc::EPOLLIN as u32) {
            return Err(err(ErrorKind::Internal, format!("epoll: {e}")));
        }
        Ok(())
    }

    fn start_verdict(&mut self, key: u64) {
        let Some((pid, fd)) = self.starts.remove(&key) else { return };
        let Some(p) = self.procs.get(&pid) else {
            self.unwatch(fd.as_raw_fd());
            return;
        };
        let verdict = process::read_verdict(fd.as_fd(), &p.ops, &p.arg0);
        let held = verdict == Ok(process::Verdict::Held);
        if held {
            // Set up and waiting: the pipe stays watched for the verdict
            // on its program once released.
            self.starts.insert(key, (pid, fd));
        } else {
            self.unwatch(fd.as_raw_fd());
        }
        let Some(p) = self.procs.get_mut(&pid) else { return };
        if !held {
            p.ops = Vec::new();
            p.gate = None;
        }
        let Some((conn, req)) = p.start.take() else { return };
        let r = match verdict {
            Ok(process::Verdict::Running) => Ok(Reply::Started { pid: pid as u32 }),
            Ok(process::Verdict::Held) => Ok(Reply::Prepared { pid: pid as u32 }),
            Err(f) => Err(AgentError { kind: ErrorKind::CannotRun, message: f.message, exit_code: Some(f.exit_code) }),
        };
        self.respond(conn, req, r);
        // A program that ended before its start was answered.
        self.report_ending(pid);
    }

    /// The pid of container `id`'s first process when it is held (set up,
    /// not yet released).
    fn held_init(&self, id: &str) -> Option<i32> {
        let pid = self.containers.get(id)?.init_pid?;
        let p = self.procs.get(&pid)?;
        (p.gate.is_some() && p.exit.is_none() && p.start.is_none()).then_some(pid)
    }

    /// Kills container `id`'s held first process and forgets it, so that
    /// another can start (a run that cannot use the prepared one). True
    /// when there was one.
    fn discard_held(&mut self, id: &str) -> bool {
        let Some(pid) = self.held_init(id) else { return false };
        let _ = sys::kill(pid, libc::SIGKILL);
        if let Some(p) = self.procs.remove(&pid) {
            for key in p.outs {
                if let Some(o) = self.outs.remove(&key) {
                    self.unwatch(o.fd.as_raw_fd());
                    if let Some(c) = o.conn.and_then(|c| self.conns.get_mut(&c)) {
                        c.outs.remove(&o.stream);
                    }
                }
            }
        }
        let starts: Vec<u64> = self.starts.iter().filter(|(_, (p, _))| *p == pid).map(|(k, _)| *k).collect();
        for key in starts {
            if let Some((_, fd)) = self.starts.remove(&key) {
                self.unwatch(fd.as_raw_fd());
            }
        }
        if let Some(ct) = self.containers.get_mut(id) {
            ct.init_pid = None;
            ct.init_pidfd = None;
            ct.mnt_ns = None;
            ct.ipc_ns = None;
            ct.uts_ns = None;
            // Its devpts instance went with its mount namespace.
            ct.devpts = None;
        }
        true
    }

    /// Lets a held first process go on to its program, as planned or with
    /// `overrides`, its output on new streams of `conn` when `stdio` says;
    /// its verdict answers the request.
    fn release(
        &mut self,
        conn: u64,
        req: u32,
        id: &str,
        overrides: Option<vmrun_agent_protocol::ExecProcess>,
        stdio: Option<Stdio>,
    ) -> Result<(), AgentError> {
        let not_held = || err(ErrorKind::InvalidState, format!("container {id} has no process waiting to start"));
        let pid = self.held_init(id).ok_or_else(not_held)?;
        let message = match &overrides {
            Some(o) => {
                if !o.mounts.is_empty() || o.seccomp.is_some() || o.oom_score_adj.is_some() {
                    return Err(err(ErrorKind::BadRequest, "mounts, seccomp and oom_score_adj are set up before the hold: they cannot change at release"));
                }
                let ct = self.containers.get(id).ok_or_else(|| err(ErrorKind::NotFound, format!("no container {id}")))?;
                let spec = ct.init_spec(false, Some(o))?;
                let held = self.procs.get(&pid).map_or(0, |p| p.bounding);
                if spec.caps.bounding & !held != 0 {
                    return Err(err(ErrorKind::BadRequest, "the held process's bounding set is already dropped: it cannot get capabilities outside it at release"));
                }
                let parts = ct.exec_parts(&spec)?;
                let blob = crate::release::encode(&crate::release::Exec {
                    argv: &parts.argv,
                    envp: &parts.envp,
                    candidates: &parts.candidates,
                    cwd: &parts.cwd,
                    cwd_mkdirs: &parts.cwd_mkdirs,
                    uid: spec.id.uid,
                    gid: spec.id.gid,
                    groups: &spec.id.groups,
                    caps: spec.caps,
                    no_new_privs: spec.no_new_privs,
                })
                .map_err(|e| err(ErrorKind::BadRequest, e.to_string()))?;
                let mut m = vec![2u8];
                m.extend_from_slice(&(blob.len() as u32).to_ne_bytes());
                m.extend_from_slice(&blob);
                (m, Some(spec.args[0].clone()))
            }
            None => (vec![1u8], None),
        };
        if let Some(stdio) = &stdio {
            self.rehome_outputs(conn, pid, stdio)?;
        }
        let p = self.procs.get_mut(&pid).ok_or_else(not_held)?;
        let gate = p.gate.take().ok_or_else(not_held)?;
        if let Some(arg0) = message.1 {
            p.arg0 = arg0;
        }
        p.start = Some((conn, req));
        // The child reads as the agent writes (at most a release's bytes).
        sys::write_all(gate.as_fd(), &message.0).map_err(|e| err(ErrorKind::Internal, format!("releasing the process: {e}")))?;
        Ok(())
    }

    /// Moves held process `pid`'s output streams to new ids on `conn`: it
    /// was held with pipes for stdout and stderr; `stdio` must ask for
    /// the same, without input.
    fn rehome_outputs(&mut self, conn: u64, pid: i32, stdio: &Stdio) -> Result<(), AgentError> {
        let Stdio::Pipes { stdin: None, stdout: Some(o), stderr: Some(e) } = stdio else {
            return Err(err(ErrorKind::BadRequest, "a held process's output can only move to new stdout and stderr streams, without input"));
        };
        let keys = self.procs.get(&pid).map(|p| p.outs.clone()).unwrap_or_default();
        let c = self.conns.get(&conn).ok_or_else(|| err(ErrorKind::Internal, "connection gone"))?;
        if keys.len() != 2 || o == e || c.outs.contains_key(o) || c.outs.contains_key(e) || c.ins.contains_key(o) || c.ins.contains_key(e) {
            return Err(err(ErrorKind::BadRequest, "the held process's streams do not match (or the stream ids are in use)"));
        }
        for (key, new) in keys.into_iter().zip([*o, *e]) {
            let Some(out) = self.outs.get_mut(&key) else { continue };
            let (old_conn, old_stream) = (out.conn, out.stream);
            out.conn = Some(conn);
            out.stream = new;
            out.credit = u64::from(STREAM_WINDOW);
            let (fd, rewatch) = (out.fd.as_raw_fd(), !out.watching);
            out.watching = true;
            if rewatch {
                let _ = self.watch(fd, token(T_OUT, key), libc::EPOLLIN as u32);
            }
            if let Some(c) = old_conn.and_then(|c| self.conns.get_mut(&c)) {
                c.outs.remove(&old_stream);
            }
            if let Some(c) = self.conns.get_mut(&conn) {
                c.outs.insert(new, key);
            }
        }
        Ok(())
    }

    fn exec(&mut self, conn: u64, req: u32, e: Exec) -> Result<(), AgentError> {
        let (container, stdio) = (e.container.clone(), e.stdio.clone());
        self.start(conn, req, &container, Start::Exec(e), stdio)
    }

    fn find_proc(&self, container: &str, exec_id: Option<&str>) -> Result<i32, AgentError> {
        if exec_id.is_none() {
            let ct = self.containers.get(container).ok_or_else(|| err(ErrorKind::NotFound, format!("no container {container}")))?;
            return ct.init_pid.ok_or_else(|| err(ErrorKind::InvalidState, format!("container {container} was not started")));
        }
        self.procs
            .iter()
            .find(|(_, p)| p.container == container && p.exec_id.as_deref() == exec_id)
            .map(|(pid, _)| *pid)
            .ok_or_else(|| err(ErrorKind::NotFound, format!("no process {} in container {container}", exec_id.unwrap_or(""))))
    }

    fn signal(&mut self, container: &str, exec_id: Option<&str>, sig: i32) -> Result<(), AgentError> {
        if !(1..=64).contains(&sig) {
            return Err(err(ErrorKind::BadRequest, format!("invalid signal {sig}")));
        }
        let pid = self.find_proc(container, exec_id)?;
        // Only this loop reaps: a process not yet reaped still owns its pid.
        // A container's init that cannot take the signal yet gets it once
        // it can (`held`).
        if self.procs.get(&pid).is_some_and(|p| p.exit.is_none()) && !(exec_id.is_none() && self.held.hold_if_needed(pid, sig)) {
            sys::kill(pid, sig).map_err(|e| err(ErrorKind::Internal, format!("kill: {e}")))?;
        }
        Ok(())
    }

    fn wait(&mut self, conn: u64, req: u32, container: &str, exec_id: Option<&str>) -> Result<Option<Reply>, AgentError> {
        let pid = self.find_proc(container, exec_id)?;
        let p = self.procs.get_mut(&pid).ok_or_else(|| err(ErrorKind::NotFound, "process gone"))?;
        match p.exit {
            Some(code) => Ok(Some(Reply::Exited { exit_code: code })),
            None => {
                p.waiters.push((conn, req));
                Ok(None)
            }
        }
    }

    fn resize(&mut self, container: &str, exec_id: Option<&str>, rows: u16, cols: u16) -> Result<(), AgentError> {
        let pid = self.find_proc(container, exec_id)?;
        let p = self.procs.get(&pid).ok_or_else(|| err(ErrorKind::NotFound, "process gone"))?;
        let fd = p.tty.as_ref().ok_or_else(|| err(ErrorKind::InvalidState, "the process has no terminal"))?;
        sys::set_winsize(fd.as_fd(), rows, cols).map_err(|e| err(ErrorKind::Internal, format!("resize: {e}")))
    }

    fn remove(&mut self, id: &str, force: bool) -> Result<(), AgentError> {
        if self.creating.contains(id) {
            return Err(err(ErrorKind::InvalidState, format!("container {id} is being created")));
        }
        let ct = self.containers.get(id).ok_or_else(|| err(ErrorKind::NotFound, format!("no container {id}")))?;
        let running = ct.init_pid.is_some() && !ct.stopped;
        if running && !force {
            return Err(err(ErrorKind::InvalidState, format!("container {id} is running (remove with force to kill it)")));
        }
        if running {
            if let Some(pid) = ct.init_pid {
                // Killing the namespace's init kills everything in it.
                let _ = sys::kill(pid, libc::SIGKILL);
            }
        }
        // A first process not reaped yet (killed just now, or one whose
        // exit was reported as it began: `report_ending`): its end
        // releases its namespaces, and with them its mounts. Wait for it,
        // so that its disks are let go of when the answer says it is
        // removed (the host may give the disk slots to another container
        // then).
        if let Some(pidfd) = &ct.init_pidfd {
            if !matches!(sys::wait_ended(pidfd.as_fd(), Some(REMOVE_LIMIT)), Ok(true)) {
                return Err(err(ErrorKind::Internal, format!("container {id}: its processes did not end within {REMOVE_LIMIT:?}")));
            }
        }
        if let Some(ct) = self.containers.remove(id) {
            container::remove_files(&ct.dir, &ct.rootfs);
        }
        self.drop_cgroup(id);
        // Records of processes already reaped go; the others stay until
        // reaped, so their waiters are answered.
        self.procs.retain(|_, p| p.container != id || p.exit.is_none());
        Ok(())
    }

    /// Removes every container's files (on a host, when the agent ends).
    pub fn cleanup(&mut self) {
        for (_, ct) in self.containers.drain() {
            container::remove_files(&ct.dir, &ct.rootfs);
        }
    }

    fn kill_all(&mut self) {
        for (pid, p) in &self.procs {
            if p.exit.is_none() {
                let _ = sys::kill(*pid, libc::SIGKILL);
            }
        }
    }

    // ---- Children ----

    fn reap(&mut self) {
        // Drain the signalfd (one SIGCHLD may stand for many children).
        let mut info = [0u8; 128 * 4];
        while let Ok(n) = sys::read(self.sigfd.as_fd(), &mut info) {
            if n < info.len() {
                break;
            }
        }
        loop {
            let mut status = 0;
            // SAFETY: waitpid with a valid status pointer.
            let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
            if pid <= 0 {
                break;
            }
            let code = sys::exit_code(status);
            let Some(p) = self.procs.get_mut(&pid) else { continue };
            // Known before the reap only when it was reported as it began
            // (`report_ending`): the reap confirms it.
            if let Some(reported) = p.exit.filter(|r| *r != code) {
                crate::log::error(format_args!("pid {pid}: its exit was reported as {reported} as it began, but it ended with {code}"));
            }
            p.exit = Some(code);
            p.tty = None;
            let waiters = std::mem::take(&mut p.waiters);
            let (container, is_init) = (p.container.clone(), p.exec_id.is_none());
            crate::log::debug(format_args!("pid {pid} ({container}) exited: {code}"));
            if is_init {
                if let Some(ct) = self.containers.get_mut(&container) {
                    ct.stopped = true;
                    ct.init_pidfd = None;
                    // In a shared PID namespace the kernel ends nothing
                    // with the container's first process: its other
                    // processes end with it here (as runc's shim does).
                    if ct.config.share_pid {
                        if let Some(Err(e)) = self.cgroups.get(&container).map(Cgroup::kill) {
                            crate::log::error(format_args!("container {container}: killing its processes: {e}"));
                        }
                    }
                }
            }
            if !self.containers.contains_key(&container) {
                self.procs.remove(&pid);
            }
            for (conn, req) in waiters {
                self.respond(conn, req, Ok(Reply::Exited { exit_code: code }));
            }
        }
        self.stale_cgroups.retain(|cg| cg.remove().is_err());
    }

    /// The kernel's records of tasks that began to exit: a container's
    /// first process among them is reported at once (`report_ending`).
    fn exits_readable(&mut self) {
        let ended = match &self.exits {
            Some(w) => w.read(&mut self.buf),
            None => return,
        };
        for e in ended {
            if !e.whole_process {
                continue;
            }
            let Some(p) = self.procs.get_mut(&e.pid) else { continue };
            if p.exit.is_none() {
                p.ending = Some(sys::exit_code(e.status));
                self.report_ending(e.pid);
            }
        }
    }

    /// Reports the exit of a container's first process as it begins, when
    /// nothing after it concerns the host: the kernel kills everything
    /// else in the container's PID namespace with it, so its output is
    /// read to the end now, its streams end and its waiters get its exit
    /// status. Left to the reap: a process whose start is not answered
    /// yet (retried once it is), one with a terminal (whose output may
    /// still be on its way to the master), an exec'd process (whose
    /// children outlive it), one in a shared PID namespace, and output
    /// beyond the host's credit.
    fn report_ending(&mut self, pid: i32) {
        let Some(p) = self.procs.get(&pid) else { return };
        let Some(code) = p.ending else { return };
        if p.exit.is_some() || p.start.is_some() || p.gate.is_some() || p.tty.is_some() || p.exec_id.is_some() {
            return;
        }
        let Some(ct) = self.containers.get(&p.container) else { return };
        if ct.init_pid != Some(pid) || ct.config.share_pid {
            return;
        }
        let outs = p.outs.clone();
        for key in &outs {
            if !self.drain_out(*key) {
                return;
            }
        }
        for key in outs {
            self.end_out(key);
        }
        let Some(p) = self.procs.get_mut(&pid) else { return };
        p.exit = Some(code);
        let waiters = std::mem::take(&mut p.waiters);
        let container = p.container.clone();
        if let Some(ct) = self.containers.get_mut(&container) {
            ct.stopped = true;
        }
        crate::log::debug(format_args!("pid {pid} ({container}) is exiting: {code}"));
        for (conn, req) in waiters {
            self.respond(conn, req, Ok(Reply::Exited { exit_code: code }));
        }
    }

    // ---- Cgroups ----

    /// Makes container `id`'s cgroup with `resources`, when it has limits
    /// or `wanted` says so (in a guest; on a host, where the agent makes
    /// none, asking for limits is an error).
    fn make_cgroup(&mut self, id: &str, resources: &vmrun_agent_protocol::Resources, wanted: bool) -> Result<(), AgentError> {
        if resources.is_empty() && !wanted {
            return Ok(());
        }
        let Some(h) = self.hierarchy.as_mut() else {
            if resources.is_empty() {
                return Ok(());
            }
            let e = cgroup::CgroupError::Unavailable("linux.resources".into());
            return Err(err(e.kind(), e.to_string()));
        };
        let cg = h.create(id, resources).map_err(|e| err(e.kind(), format!("container {id}: {e}")))?;
        crate::log::debug(format_args!("container {id}: cgroup {}", cg.path().display()));
        self.cgroups.insert(id.to_string(), cg);
        Ok(())
    }

    /// Removes container `id`'s cgroup, or keeps it to remove once its
    /// processes are reaped.
    fn drop_cgroup(&mut self, id: &str) {
        if let Some(cg) = self.cgroups.remove(id) {
            if cg.remove().is_err() {
                self.stale_cgroups.push(cg);
            }
        }
    }

    fn cgroup_of(&self, id: &str) -> Result<&Cgroup, AgentError> {
        if !self.containers.contains_key(id) {
            return Err(err(ErrorKind::NotFound, format!("no container {id}")));
        }
        self.cgroups.get(id).ok_or_else(|| err(ErrorKind::BadRequest, format!("container {id} has no cgroup (only a guest's agent makes them, for a container created with limits or asking for one)")))
    }

    /// Freezes or thaws container `id`'s processes (a paused container):
    /// briefly blocks the agent, until the kernel reports it done.
    fn freeze(&mut self, id: &str, frozen: bool) -> Result<(), AgentError> {
        let cg = self.cgroup_of(id)?;
        cg.freeze(frozen, FREEZE_LIMIT).map_err(|e| err(ErrorKind::Internal, format!("container {id}: {e}")))
    }

    fn update(&mut self, id: &str, resources: &vmrun_agent_protocol::Resources) -> Result<(), AgentError> {
        self.cgroup_of(id)?;
        let (Some(h), Some(cg)) = (self.hierarchy.as_mut(), self.cgroups.get_mut(id)) else {
            return Err(err(ErrorKind::BadRequest, format!("container {id} has no cgroup")));
        };
        h.update(cg, resources).map_err(|e| err(e.kind(), format!("container {id}: {e}")))
    }
}

/// Sets the guest's clock to the host's when it lags (`crate::clock`).
fn follow_the_hosts_clock(host: WallClock) {
    let Some(host) = host.since_epoch() else {
        return crate::log::error(format_args!("the host's hello gave an invalid time ({host:?}): clock left as it is"));
    };
    match crate::clock::follow(host) {
        Ok(Some(was)) => crate::log::debug(format_args!(
            "clock set to the host's {}.{:09}; it said {}.{:09}",
            host.as_secs(),
            host.subsec_nanos(),
            was.as_secs(),
            was.subsec_nanos()
        )),
        Ok(None) => {}
        Err(e) => crate::log::error(format_args!("setting the clock to the host's: {e}")),
    }
}

/// A pidfd of the agent itself (its PID namespace, to return to), opened
/// into `slot` the first time.
fn own_pidfd(slot: &mut Option<OwnedFd>) -> Result<RawFd, AgentError> {
    if let Some(fd) = slot {
        return Ok(fd.as_raw_fd());
    }
    // SAFETY: pidfd_open of our own pid; the result is checked.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, libc::getpid(), 0) };
    if fd < 0 {
        return Err(err(ErrorKind::Internal, format!("pidfd_open: {}", sys::errno())));
    }
    Ok(slot.insert(owned(fd as libc::c_int)).as_raw_fd())
}

/// Opens `/proc/PROC/ns/KIND` (`PROC` a pid or `self`): a namespace held,
/// or entered with `setns`.
fn open_ns(proc: &str, kind: &str) -> io::Result<OwnedFd> {
    sys::open(&sys::cstring(format!("/proc/{proc}/ns/{kind}").as_str())?, libc::O_RDONLY | libc::O_CLOEXEC, 0)
}

/// How long the processes of a container removed with `force` may take
/// to end.
const REMOVE_LIMIT: std::time::Duration = std::time::Duration::from_secs(10);

/// How long freezing or thawing a container may take.
const FREEZE_LIMIT: std::time::Duration = std::time::Duration::from_secs(10);

fn request_name(r: &Request) -> &'static str {
    match r {
        Request::Ping => "ping",
        Request::CreateContainer(_) => "create",
        Request::StartContainer { .. } => "start",
        Request::Release { .. } => "release",
        Request::Exec(_) => "exec",
        Request::Signal { .. } => "signal",
        Request::Wait { .. } => "wait",
        Request::ResizeTty { .. } => "resize",
        Request::RemoveContainer { .. } => "remove",
        Request::ConfigureNetwork(_) => "configure-network",
        Request::Shutdown => "shutdown",
        Request::WriteFiles(_) => "write-files",
        Request::ReadChanges { .. } => "read-changes",
        Request::Stats { .. } => "stats",
        Request::Update { .. } => "update",
        Request::Freeze { .. } => "freeze",
    }
}
/// What `start` starts: a container's own process (with the overrides of
/// a prepared container) or another process in it.
enum Start {
    /// The first process, with overrides; held before its program.
    Init(Option<vmrun_agent_protocol::ExecProcess>, bool),
    Exec(Exec),
}


#[cfg(test)]
mod tests {
    use super::*;

    fn vsock_addr(cid: u32, port: u32) -> (libc::sockaddr_storage, libc::socklen_t) {
        // SAFETY: plain C structs; all-zero is valid.
        let mut st: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let mut vm: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
        vm.svm_family = libc::AF_VSOCK as libc::sa_family_t;
        vm.svm_cid = cid;
        vm.svm_port = port;
        // SAFETY: sockaddr_storage is larger than sockaddr_vm; both are
        // plain bytes.
        unsafe { std::ptr::write(&mut st as *mut libc::sockaddr_storage as *mut libc::sockaddr_vm, vm) };
        (st, std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t)
    }

    #[test]
    fn only_the_host_may_connect_over_vsock() {
        let listen = Listen::Vsock(1024);
        let (a, l) = vsock_addr(libc::VMADDR_CID_HOST, 1_073_741_824);
        assert_eq!(admit(&listen, peer_of(&a, l)), Ok(()));
        // The guest itself: local (loopback), its own CID, the hypervisor,
        // any, and a CID a guest could make up.
        for cid in [libc::VMADDR_CID_LOCAL, 3, 0, libc::VMADDR_CID_ANY, 4, 1000] {
            let (a, l) = vsock_addr(cid, 5555);
            let e = admit(&listen, peer_of(&a, l)).unwrap_err();
            assert_eq!(e, Refused::NotTheHost { cid, port: 5555 });
            assert!(e.to_string().contains(&format!("CID {cid} ")), "{e}");
        }
        // A truncated address is no vsock peer.
        let (a, _) = vsock_addr(libc::VMADDR_CID_HOST, 1);
        assert!(admit(&listen, peer_of(&a, 4)).is_err());
        // A Unix peer on a vsock listener, and the other way round.
        assert!(admit(&listen, Peer::Unix).is_err());
        let unix = Listen::Unix("/tmp/agent.sock".into());
        assert_eq!(admit(&unix, Peer::Unix), Ok(()));
        assert!(admit(&unix, Peer::Vsock { cid: 2, port: 1 }).is_err());
    }
}
