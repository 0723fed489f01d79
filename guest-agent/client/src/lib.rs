//! The host's client of the vmrun guest agent.
//!
//! Plain Rust types over the protocol of `vmrun_agent_protocol`: requests
//! become methods, process streams become `Read`/`Write` values. One
//! reader thread per connection sorts incoming frames: responses to their
//! callers, stream data to per-stream buffers.
//!
//! The client never trusts the agent: frames are bounded by the frame
//! limit, stream data by the window (data beyond it, or for a stream that
//! was never opened or already ended, is a protocol violation that closes
//! the connection), exit codes must be 0-255, and every request but `wait`
//! has a timeout.
//!
//! Transports: a Unix socket ([`Client::connect_unix`]), Firecracker-style
//! hybrid vsock ([`Client::connect_hybrid_vsock`]: `CONNECT <port>\n` on the
//! VMM's socket, `OK <n>\n` back), or any reader/writer pair
//! ([`Client::handshake`]).

use std::collections::{HashMap, VecDeque};
use std::io::{self, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use vmrun_agent_protocol::frame::{self, Kind, MAX_PAYLOAD};
use vmrun_agent_protocol::{check_hello, Entropy, Exec, Hello, Reply, Request, Response, Stdio, WallClock, STREAM_WINDOW};

pub use vmrun_agent_protocol::{
    AgentError, CgroupStats, CpuResources, CreateContainer, Digest, ErrorKind, ExecProcess, HandshakeError, ImageConfig, LayerSource,
    MemoryResources, Mount, PidsResources, Resources, Rlimit, RootfsSpec, UnpackLimits,
};

/// The client's software string in its hello.
pub const SOFTWARE: &str = concat!("vmrun ", env!("CARGO_PKG_VERSION"));

/// Errors of the client.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The transport failed.
    #[error("agent connection: {0}")]
    Io(#[from] io::Error),
    /// The agent refused us or we refused it.
    #[error(transparent)]
    Handshake(#[from] HandshakeError),
    /// The agent broke the protocol; the connection is closed.
    #[error("agent protocol violation: {0}")]
    Protocol(String),
    /// No answer in time.
    #[error("timed out after {0:?} waiting for the agent ({1})")]
    Timeout(Duration, &'static str),
    /// The connection is closed.
    #[error("agent connection closed: {0}")]
    Closed(String),
    /// The agent answered with an error.
    #[error("agent: {0}")]
    Agent(AgentError),
}

/// A frame from the agent that breaks the protocol (the connection is
/// closed: the agent or the guest is broken or not the vmrun agent).
#[derive(Debug, thiserror::Error)]
pub enum Violation {
    /// A response that is not one.
    #[error("malformed response: {0}")]
    MalformedResponse(#[source] serde_json::Error),
    /// A response to a request id this client never used.
    #[error("response to request {0} that was never sent")]
    UnsentRequest(u32),
    /// Data for a stream that was never opened.
    #[error("data for unknown stream {0}")]
    DataUnknownStream(u32),
    /// Data for a stream that is input only, or already ended.
    #[error("data on stream {0} that is not open for output")]
    DataNotOutput(u32),
    /// Empty data, or more than the window allows.
    #[error("stream {0}: data beyond the window")]
    DataBeyondWindow(u32),
    /// End of a stream that was never opened.
    #[error("end of unknown stream {0}")]
    EofUnknownStream(u32),
    /// End of a stream that is input only, or already ended.
    #[error("end of stream {0} that is not open for output")]
    EofNotOutput(u32),
    /// A credit frame whose payload is not 4 bytes.
    #[error("malformed credit: {0}")]
    MalformedCredit(#[source] std::array::TryFromSliceError),
    /// More credit than the window.
    #[error("stream {0}: credit beyond the window")]
    CreditBeyondWindow(u32),
    /// A hello or request from the agent after the handshake.
    #[error("unexpected frame kind {0:?}")]
    UnexpectedKind(Kind),
}

impl Error {
    /// For a process that could not be started: the exit code it got
    /// (126: cannot run, 127: not found).
    pub fn exit_code(&self) -> Option<i32> {
        match self {
            Error::Agent(e) if e.kind == ErrorKind::CannotRun => e.exit_code,
            _ => None,
        }
    }
}

/// Timeouts.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// For the handshake (and the hybrid vsock `CONNECT`).
    pub handshake_timeout: Duration,
    /// For requests other than create and wait.
    pub request_timeout: Duration,
    /// For `create_container` (unpacking in a slow guest takes minutes)
    /// and for setting a held process up (`prepare`).
    pub create_timeout: Duration,
    /// The handshake returns once our hello is written, without waiting
    /// for the agent's: the requests written next travel behind it (the
    /// agent reseeds and answers the hello before it reads them), a round
    /// trip fewer; an answer that does not match fails them. For an agent
    /// known to be there (a restored VM's), where waiting buys nothing.
    pub defer_hello: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            handshake_timeout: Duration::from_secs(30),
            request_timeout: Duration::from_secs(60),
            create_timeout: Duration::from_secs(900),
            defer_hello: false,
        }
    }
}

/// How a process's standard streams are connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StdioMode {
    /// `/dev/null`.
    Null,
    /// stdout and stderr piped back; stdin too if asked.
    Piped {
        /// Give the process a stdin stream.
        stdin: bool,
    },
    /// One terminal of that size: [`Process::stdin`] writes to it,
    /// [`Process::stdout`] reads it.
    Tty {
        /// Rows.
        rows: u16,
        /// Columns.
        cols: u16,
    },
}

#[derive(Debug, Default)]
struct StreamState {
    /// Agent to host.
    output: bool,
    buf: VecDeque<u8>,
    eof: bool,
    consumed: u64,
    discard: bool,
    /// Host to agent.
    input: bool,
    credit: u64,
}

#[derive(Debug, Default)]
struct State {
    pending: HashMap<u32, SyncSender<Response>>,
    next_req: u32,
    next_stream: u32,
    streams: HashMap<u32, StreamState>,
    closed: Option<String>,
}

/// A request sent and not answered yet: its id, and where its answer
/// arrives.
type PendingReply = (u32, mpsc::Receiver<Response>);

struct Shared {
    writer: Mutex<Box<dyn Write + Send>>,
    state: Mutex<State>,
    cond: Condvar,
    close: Box<dyn Fn() + Send + Sync>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").finish_non_exhaustive()
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn new<W, C>(writer: W, close: C) -> Arc<Self>
    where
        W: Write + Send + 'static,
        C: Fn() + Send + Sync + 'static,
    {
        Arc::new(Shared {
            writer: Mutex::new(Box::new(writer)),
            state: Mutex::new(State { next_req: 1, next_stream: 1, ..Default::default() }),
            cond: Condvar::new(),
            close: Box::new(close),
        })
    }

    fn send(&self, kind: Kind, id: u32, payload: &[u8]) -> io::Result<()> {
        self.send_bytes(&frame::encode(kind, id, payload))
    }

    /// Writes frames already encoded, in one write.
    fn send_bytes(&self, bytes: &[u8]) -> io::Result<()> {
        let mut w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        w.write_all(bytes)?;
        w.flush()
    }

    fn fail(&self, why: String) {
        let mut st = self.lock();
        if st.closed.is_none() {
            st.closed = Some(why);
        }
        st.pending.clear();
        drop(st);
        self.cond.notify_all();
        (self.close)();
    }

    fn closed_error(&self) -> Error {
        Error::Closed(self.lock().closed.clone().unwrap_or_else(|| "closed".into()))
    }
}

/// A connection to an agent.
#[derive(Debug, Clone)]
pub struct Client {
    shared: Arc<Shared>,
    opts: Options,
}

fn reader_loop<R: Read>(mut r: BufReader<R>, shared: Arc<Shared>) {
    let why = loop {
        let f = match frame::read_frame(&mut r) {
            Ok(Some(f)) => f,
            Ok(None) => break "the agent closed the connection".to_string(),
            Err(e) => break e.to_string(),
        };
        if let Err(v) = dispatch(&shared, f) {
            break format!("protocol violation: {v}");
        }
    };
    shared.fail(why);
}

fn dispatch(shared: &Shared, f: frame::Frame) -> Result<(), Violation> {
    let mut st = shared.lock();
    match f.kind {
        Kind::Response => {
            let r: Response = serde_json::from_slice(&f.payload).map_err(Violation::MalformedResponse)?;
            if let Some(tx) = st.pending.remove(&f.id) {
                let _ = tx.send(r);
            } else if f.id >= st.next_req {
                return Err(Violation::UnsentRequest(f.id));
            }
        }
        Kind::Data => {
            let s = st.streams.get_mut(&f.id).ok_or(Violation::DataUnknownStream(f.id))?;
            if !s.output || s.eof {
                return Err(Violation::DataNotOutput(f.id));
            }
            if f.payload.is_empty() || s.buf.len() as u64 + s.consumed + f.payload.len() as u64 > u64::from(STREAM_WINDOW) {
                return Err(Violation::DataBeyondWindow(f.id));
            }
            if s.discard {
                let n = f.payload.len() as u32;
                drop(st);
                let _ = shared.send(Kind::Credit, f.id, &n.to_le_bytes());
                return Ok(());
            }
            s.buf.extend(&f.payload);
            shared.cond.notify_all();
        }
        Kind::Eof => {
            let s = st.streams.get_mut(&f.id).ok_or(Violation::EofUnknownStream(f.id))?;
            if !s.output || s.eof {
                return Err(Violation::EofNotOutput(f.id));
            }
            s.eof = true;
            if s.discard && !s.input {
                st.streams.remove(&f.id);
            }
            shared.cond.notify_all();
        }
        Kind::Credit => {
            let n = <[u8; 4]>::try_from(f.payload.as_slice()).map_err(Violation::MalformedCredit)?;
            if let Some(s) = st.streams.get_mut(&f.id).filter(|s| s.input) {
                s.credit += u64::from(u32::from_le_bytes(n));
                if s.credit > u64::from(STREAM_WINDOW) {
                    return Err(Violation::CreditBeyondWindow(f.id));
                }
                shared.cond.notify_all();
            }
        }
        Kind::Hello | Kind::Request => return Err(Violation::UnexpectedKind(f.kind)),
    }
    Ok(())
}

/// A reader of `s` and what closes it (shuts the socket down, so that a
/// blocked read returns).
fn split(s: &UnixStream) -> io::Result<(UnixStream, impl Fn() + Send + Sync + 'static)> {
    let reader = s.try_clone()?;
    let closer = s.try_clone()?;
    Ok((reader, move || {
        let _ = closer.shutdown(std::net::Shutdown::Both);
    }))
}

/// Starts the connection's reader thread: `body` reads from `reader`,
/// buffered.
fn spawn_reader<R: Read + Send + 'static>(reader: R, body: impl FnOnce(BufReader<R>) + Send + 'static) -> io::Result<()> {
    std::thread::Builder::new().name("vmrun-agent-client".into()).spawn(move || body(BufReader::with_capacity(256 * 1024, reader)))?;
    Ok(())
}

/// The hello this side sends, and its payload. Fresh entropy on every
/// connection: a guest restored from a snapshot reseeds from it before it
/// answers; and the host's clock, which the guest's is set to if it lags.
fn our_hello() -> Result<(Hello, Vec<u8>), Error> {
    let entropy = Entropy::new(host_entropy()?).map_err(|e| Error::Protocol(e.to_string()))?;
    let ours = Hello::ours(SOFTWARE).with_entropy(entropy).with_time(WallClock::now());
    let payload = serde_json::to_vec(&ours).map_err(|e| Error::Protocol(e.to_string()))?;
    Ok((ours, payload))
}

/// Checks the agent's answer to our hello (the first frame it sent, as
/// read) against ours.
fn check_answer(ours: &Hello, first: Result<Option<frame::Frame>, frame::FrameError>) -> Result<(), Error> {
    let f = match first {
        Ok(Some(f)) if f.kind == Kind::Hello => f,
        Ok(Some(f)) => return Err(Error::Protocol(format!("expected a hello, got {:?}", f.kind))),
        Ok(None) => return Err(Error::Closed("the agent closed the connection during the handshake".into())),
        Err(e) => return Err(Error::Protocol(e.to_string())),
    };
    let theirs: Hello = serde_json::from_slice(&f.payload).map_err(|e| Error::Protocol(format!("malformed hello: {e}")))?;
    check_hello(ours, &theirs)?;
    Ok(())
}

/// Connects to the agent through Firecracker-style hybrid vsock: the VMM's
/// Unix socket, `CONNECT <port>\n`, `OK <n>\n`.
pub fn hybrid_vsock_connect(uds: &Path, port: u32, timeout: Duration) -> io::Result<UnixStream> {
    let mut s = UnixStream::connect(uds)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    s.write_all(format!("CONNECT {port}\n").as_bytes())?;
    // Byte by byte: nothing past the line belongs to us.
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while line.len() < 64 {
        if s.read(&mut b)? == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the VMM closed the vsock socket during CONNECT"));
        }
        if b[0] == b'\n' {
            break;
        }
        line.push(b[0]);
    }
    let text = String::from_utf8_lossy(&line);
    let ok = text.strip_prefix("OK ").is_some_and(|n| n.trim().parse::<u32>().is_ok());
    if !ok {
        return Err(io::Error::new(io::ErrorKind::ConnectionRefused, format!("vsock CONNECT {port} refused: {text:?}")));
    }
    s.set_read_timeout(None)?;
    s.set_write_timeout(None)?;
    Ok(s)
}

/// [`Entropy::LEN`] bytes from the host kernel's CRNG (`getrandom`).
fn host_entropy() -> Result<Vec<u8>, Error> {
    let mut buf = vec![0u8; Entropy::LEN];
    let mut got = 0;
    while got < buf.len() {
        // SAFETY: getrandom writes at most the given length into the
        // buffer's unfilled tail.
        let n = unsafe { libc::getrandom(buf[got..].as_mut_ptr().cast(), buf.len() - got, 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(Error::Io(e));
        }
        got += n as usize;
    }
    Ok(buf)
}

impl Client {
    /// Connects to an agent listening on a Unix socket (`--listen-unix`).
    pub fn connect_unix(path: impl AsRef<Path>, opts: Options) -> Result<Self, Error> {
        let s = UnixStream::connect(path)?;
        Self::from_unix(s, opts)
    }

    /// Connects to an agent in a guest through the VMM's hybrid vsock
    /// socket.
    pub fn connect_hybrid_vsock(uds: impl AsRef<Path>, port: u32, opts: Options) -> Result<Self, Error> {
        let s = hybrid_vsock_connect(uds.as_ref(), port, opts.handshake_timeout)?;
        Self::from_unix(s, opts)
    }

    fn from_unix(s: UnixStream, opts: Options) -> Result<Self, Error> {
        let (reader, close) = split(&s)?;
        Self::handshake(reader, s, close, opts)
    }

    /// Handshakes over any stream, split in a reader and a writer. `close`
    /// must make a blocked read of `reader` return (e.g. shut the socket
    /// down); it is called when the connection fails or the client is
    /// closed.
    pub fn handshake<R, W, C>(reader: R, writer: W, close: C, opts: Options) -> Result<Self, Error>
    where
        R: Read + Send + 'static,
        W: Write + Send + 'static,
        C: Fn() + Send + Sync + 'static,
    {
        let shared = Shared::new(writer, close);
        let (ours, payload) = our_hello()?;
        shared.send(Kind::Hello, 0, &payload)?;
        let (tx, rx) = mpsc::sync_channel(1);
        let sh = Arc::clone(&shared);
        let defer = opts.defer_hello;
        spawn_reader(reader, move |mut r| {
            let answer = check_answer(&ours, frame::read_frame(&mut r));
            let ok = answer.is_ok();
            match (defer, answer) {
                (true, Err(e)) => sh.fail(format!("the agent's hello: {e}")),
                (false, answer) => {
                    let _ = tx.send(answer);
                }
                (true, Ok(())) => {}
            }
            if ok {
                reader_loop(r, sh);
            }
        })?;
        if defer {
            return Ok(Self { shared, opts });
        }
        match rx.recv_timeout(opts.handshake_timeout) {
            Ok(Ok(())) => Ok(Self { shared, opts }),
            Ok(Err(e)) => {
                shared.fail(e.to_string());
                Err(e)
            }
            Err(_) => {
                (shared.close)();
                Err(Error::Timeout(opts.handshake_timeout, "hello"))
            }
        }
    }

    /// Says hello to the agent over `s` and reads its answer (not a byte
    /// more), up to `timeout`: the connection is then ready for
    /// [`Client::established`], in this process or another one it is
    /// handed to (a pool's VM is greeted, and so reseeded, while it waits).
    pub fn hello(s: &mut UnixStream, timeout: Duration) -> Result<(), Error> {
        let (ours, payload) = our_hello()?;
        s.set_write_timeout(Some(timeout))?;
        s.write_all(&frame::encode(Kind::Hello, 0, &payload))?;
        s.set_read_timeout(Some(timeout))?;
        let answer = frame::read_frame(s);
        s.set_read_timeout(None)?;
        s.set_write_timeout(None)?;
        check_answer(&ours, answer)
    }

    /// A client on a connection whose hello [`Client::hello`] exchanged.
    pub fn established(s: UnixStream, opts: Options) -> Result<Self, Error> {
        let (reader, close) = split(&s)?;
        let shared = Shared::new(s, close);
        let sh = Arc::clone(&shared);
        spawn_reader(reader, move |r| reader_loop(r, sh))?;
        Ok(Self { shared, opts })
    }

    /// Closes the connection (processes go on; their output is dropped).
    pub fn close(&self) {
        self.shared.fail("closed by the host".into());
    }

    fn call(&self, req: &Request, timeout: Option<Duration>, what: &'static str) -> Result<Reply, Error> {
        let mut bytes = Vec::new();
        let (id, rx) = self.queue_request(&mut bytes, req, what)?;
        self.send_requests(&bytes, &[id])?;
        self.await_reply(id, rx, timeout, what)
    }

    /// Sends the start `req` and, when given, `wait` in one write; returns
    /// the start's answer and the `Wait` still pending. A start that fails
    /// forgets its `Wait`: the answer to it, if one comes (the held process
    /// killed by a start afresh), is dropped.
    fn start_then_wait(&self, req: &Request, wait: Option<&Request>, timeout: Duration) -> Result<(Reply, Option<PendingReply>), Error> {
        let mut bytes = Vec::new();
        let (id, rx) = self.queue_request(&mut bytes, req, "start")?;
        let exit = match wait.map(|w| self.queue_request(&mut bytes, w, "wait")).transpose() {
            Ok(exit) => exit,
            Err(e) => {
                self.forget(&[id]);
                return Err(e);
            }
        };
        let ids: Vec<u32> = std::iter::once(id).chain(exit.as_ref().map(|e| e.0)).collect();
        self.send_requests(&bytes, &ids)?;
        match self.await_reply(id, rx, Some(timeout), "start") {
            Ok(reply) => Ok((reply, exit)),
            Err(e) => {
                if let Some((wait_id, _)) = exit {
                    self.forget(&[wait_id]);
                }
                Err(e)
            }
        }
    }

    /// Registers `req` as pending and appends its frame to `bytes`.
    fn queue_request(&self, bytes: &mut Vec<u8>, req: &Request, what: &'static str) -> Result<PendingReply, Error> {
        let payload = serde_json::to_vec(req).map_err(|e| Error::Protocol(e.to_string()))?;
        if payload.len() > MAX_PAYLOAD {
            return Err(Error::Protocol(format!("{what} request too large ({} bytes)", payload.len())));
        }
        let (tx, rx) = mpsc::sync_channel(1);
        let mut st = self.shared.lock();
        if let Some(c) = &st.closed {
            return Err(Error::Closed(c.clone()));
        }
        let id = st.next_req;
        st.next_req = st.next_req.wrapping_add(1).max(1);
        st.pending.insert(id, tx);
        frame::encode_into(bytes, Kind::Request, id, &payload);
        Ok((id, rx))
    }

    /// Writes the frames of the pending requests `ids` (forgotten if the
    /// write fails).
    fn send_requests(&self, bytes: &[u8], ids: &[u32]) -> Result<(), Error> {
        self.shared.send_bytes(bytes).map_err(|e| {
            self.forget(ids);
            Error::from(e)
        })
    }

    /// Forgets pending requests: their answers, if any come, are dropped.
    fn forget(&self, ids: &[u32]) {
        let mut st = self.shared.lock();
        for id in ids {
            st.pending.remove(id);
        }
    }

    /// Waits for the answer to pending request `id`.
    fn await_reply(&self, id: u32, rx: mpsc::Receiver<Response>, timeout: Option<Duration>, what: &'static str) -> Result<Reply, Error> {
        let r = match timeout {
            Some(t) => match rx.recv_timeout(t) {
                Ok(r) => r,
                Err(RecvTimeoutError::Timeout) => {
                    self.forget(&[id]);
                    return Err(Error::Timeout(t, what));
                }
                Err(RecvTimeoutError::Disconnected) => return Err(self.shared.closed_error()),
            },
            None => rx.recv().map_err(|_| self.shared.closed_error())?,
        };
        r.map_err(Error::Agent)
    }

    fn unexpected(&self, what: &str, r: Reply) -> Error {
        let e = Error::Protocol(format!("unexpected answer to {what}: {r:?}"));
        self.shared.fail(e.to_string());
        e
    }

    /// Pings the agent; returns its software string.
    pub fn ping(&self) -> Result<String, Error> {
        match self.call(&Request::Ping, Some(self.opts.request_timeout), "ping")? {
            Reply::Pong { software } => Ok(software.chars().take(128).collect()),
            r => Err(self.unexpected("ping", r)),
        }
    }

    /// Creates a container: unpacks its image into its root.
    pub fn create_container(&self, spec: &CreateContainer) -> Result<(), Error> {
        match self.call(&Request::CreateContainer(spec.clone()), Some(self.opts.create_timeout), "create")? {
            Reply::Done => Ok(()),
            r => Err(self.unexpected("create", r)),
        }
    }

    fn open_streams(&self, mode: StdioMode) -> (Stdio, Vec<(u32, bool, bool)>) {
        let mut st = self.shared.lock();
        let mut alloc = |output: bool, input: bool| {
            let id = st.next_stream;
            st.next_stream += 1;
            st.streams.insert(id, StreamState { output, input, credit: if input { u64::from(STREAM_WINDOW) } else { 0 }, ..Default::default() });
            (id, output, input)
        };
        match mode {
            StdioMode::Null => (Stdio::Null, vec![]),
            StdioMode::Piped { stdin } => {
                let i = stdin.then(|| alloc(false, true));
                let o = alloc(true, false);
                let e = alloc(true, false);
                let stdio = Stdio::Pipes { stdin: i.map(|s| s.0), stdout: Some(o.0), stderr: Some(e.0) };
                (stdio, i.into_iter().chain([o, e]).collect())
            }
            StdioMode::Tty { rows, cols } => {
                let t = alloc(true, true);
                (Stdio::Tty { stream: t.0, rows, cols }, vec![t])
            }
        }
    }

    fn process(&self, container: &str, exec_id: Option<&str>, req: Request, streams: Vec<(u32, bool, bool)>, mode: StdioMode) -> Result<Process, Error> {
        self.process_then(container, exec_id, req, None, streams, mode)
    }

    /// [`Client::process`], with `wait` (the process's `Wait`) sent in
    /// the same write as `req` when given: the process's [`Process::wait`]
    /// takes its answer.
    fn process_then(
        &self,
        container: &str,
        exec_id: Option<&str>,
        req: Request,
        wait: Option<Request>,
        streams: Vec<(u32, bool, bool)>,
        mode: StdioMode,
    ) -> Result<Process, Error> {
        // Setting a held process up is part of a create (namespaces,
        // mounts): it gets create's time, for a guest whose VM may be held
        // to a small CPU quota.
        let timeout = match &req {
            Request::StartContainer { hold: true, .. } => self.opts.create_timeout,
            _ => self.opts.request_timeout,
        };
        let (pid, exit) = match self.start_then_wait(&req, wait.as_ref(), timeout) {
            Ok((Reply::Started { pid } | Reply::Prepared { pid }, exit)) => (pid, exit),
            Ok((other, _)) => return Err(self.unexpected("start", other)),
            Err(e) => {
                // The agent may still end the output streams: let them
                // drain, and forget the input ones.
                let mut st = self.shared.lock();
                for (id, _, _) in &streams {
                    if let Some(s) = st.streams.get_mut(id) {
                        s.discard = true;
                        s.input = false;
                    }
                }
                return Err(e);
            }
        };
        let mut p = Process {
            client: self.clone(),
            container: container.into(),
            exec_id: exec_id.map(Into::into),
            pid,
            exit: Mutex::new(exit),
            stdin: None,
            stdout: None,
            stderr: None,
        };
        let mk_out = |id| OutputStream { shared: Arc::clone(&self.shared), id };
        let mk_in = |id| InputStream { shared: Arc::clone(&self.shared), id, closed: false };
        match mode {
            StdioMode::Null => {}
            StdioMode::Piped { stdin } => {
                let mut it = streams.iter().map(|s| s.0);
                if stdin {
                    p.stdin = it.next().map(mk_in);
                }
                p.stdout = it.next().map(mk_out);
                p.stderr = it.next().map(mk_out);
            }
            StdioMode::Tty { .. } => {
                p.stdin = streams.first().map(|s| mk_in(s.0));
                p.stdout = streams.first().map(|s| mk_out(s.0));
            }
        }
        Ok(p)
    }

    /// Starts a created container's process.
    pub fn start(&self, container: &str, mode: StdioMode) -> Result<Process, Error> {
        self.start_with(container, mode, None)
    }

    /// Starts a created container's process with `overrides` of what it was
    /// created with (arguments when not empty, extra environment, working
    /// directory, user): for containers prepared ahead of the run.
    pub fn start_with(&self, container: &str, mode: StdioMode, overrides: Option<&ExecProcess>) -> Result<Process, Error> {
        let (stdio, streams) = self.open_streams(mode);
        let req = Request::StartContainer { container: container.into(), stdio, process: overrides.cloned(), hold: false };
        self.process(container, None, req, streams, mode)
    }

    /// Sets up a created container's process (namespaces, root, mounts)
    /// and holds it before its program, as OCI `create` does; its streams
    /// are open from here. [`Client::release`] lets it run.
    pub fn prepare(&self, container: &str, mode: StdioMode) -> Result<Process, Error> {
        let (stdio, streams) = self.open_streams(mode);
        let req = Request::StartContainer { container: container.into(), stdio, process: None, hold: true };
        self.process(container, None, req, streams, mode)
    }

    /// Lets a process held by [`Client::prepare`] run its program (OCI
    /// `start`); an error of kind `CannotRun` when it cannot.
    pub fn release(&self, container: &str) -> Result<u32, Error> {
        let req = Request::Release { container: container.into(), process: None, stdio: None };
        match self.call(&req, Some(self.opts.request_timeout), "release")? {
            Reply::Started { pid } => Ok(pid),
            r => Err(self.unexpected("release", r)),
        }
    }

    /// Lets a process held by [`Client::prepare`] (on this connection or
    /// another, e.g. before a snapshot) run with `overrides` (arguments
    /// when not empty, extra environment, working directory, user), its
    /// output on new streams of this connection. `mode` must be pipes
    /// without input, as the held process's were; an error of kind
    /// `InvalidState` (nothing held) or `BadRequest` (what cannot change
    /// at release) leaves the held process as it was.
    ///
    /// The process's exit is asked for in the same write as its release
    /// (one message for the guest to take in, not two): [`Process::wait`]
    /// collects that answer.
    pub fn release_with(&self, container: &str, overrides: Option<&ExecProcess>, mode: StdioMode) -> Result<Process, Error> {
        let (stdio, streams) = self.open_streams(mode);
        let req = Request::Release { container: container.into(), process: overrides.cloned(), stdio: Some(stdio) };
        let wait = Request::Wait { container: container.into(), exec_id: None };
        self.process_then(container, None, req, Some(wait), streams, mode)
    }

    /// Runs another process in a running container.
    pub fn exec(&self, container: &str, exec_id: &str, process: &ExecProcess, mode: StdioMode) -> Result<Process, Error> {
        let (stdio, streams) = self.open_streams(mode);
        let req = Request::Exec(Exec { container: container.into(), exec_id: exec_id.into(), process: process.clone(), stdio });
        self.process(container, Some(exec_id), req, streams, mode)
    }

    /// Sends a signal to a container's process (`exec_id: None`) or an
    /// exec'd one.
    pub fn signal(&self, container: &str, exec_id: Option<&str>, signal: i32) -> Result<(), Error> {
        let req = Request::Signal { container: container.into(), exec_id: exec_id.map(Into::into), signal };
        match self.call(&req, Some(self.opts.request_timeout), "signal")? {
            Reply::Done => Ok(()),
            r => Err(self.unexpected("signal", r)),
        }
    }

    /// Waits for a process to end and returns its exit code (128 + signal
    /// when killed). `None` waits as long as it takes.
    pub fn wait(&self, container: &str, exec_id: Option<&str>, timeout: Option<Duration>) -> Result<i32, Error> {
        let req = Request::Wait { container: container.into(), exec_id: exec_id.map(Into::into) };
        let r = self.call(&req, timeout, "wait")?;
        self.exit_code(r)
    }

    /// The exit code a `Wait` was answered with.
    fn exit_code(&self, r: Reply) -> Result<i32, Error> {
        match r {
            Reply::Exited { exit_code } if (0..=255).contains(&exit_code) => Ok(exit_code),
            r => Err(self.unexpected("wait", r)),
        }
    }

    /// Sets the terminal size of a process.
    pub fn resize(&self, container: &str, exec_id: Option<&str>, rows: u16, cols: u16) -> Result<(), Error> {
        let req = Request::ResizeTty { container: container.into(), exec_id: exec_id.map(Into::into), rows, cols };
        match self.call(&req, Some(self.opts.request_timeout), "resize")? {
            Reply::Done => Ok(()),
            r => Err(self.unexpected("resize", r)),
        }
    }

    /// Removes a container (`force` kills it first if it runs).
    pub fn remove_container(&self, container: &str, force: bool) -> Result<(), Error> {
        let req = Request::RemoveContainer { container: container.into(), force };
        match self.call(&req, Some(self.opts.request_timeout), "remove")? {
            Reply::Done => Ok(()),
            r => Err(self.unexpected("remove", r)),
        }
    }

    /// Gives the guest's interface its address and default route.
    pub fn configure_network(&self, config: &vmrun_agent_protocol::NetworkConfig) -> Result<(), Error> {
        match self.call(&Request::ConfigureNetwork(config.clone()), Some(self.opts.request_timeout), "configure-network")? {
            Reply::Done => Ok(()),
            r => Err(self.unexpected("configure-network", r)),
        }
    }

    /// Copies files into a container, one part of a copied mount (see
    /// [`vmrun_agent_protocol::WriteFiles`]).
    pub fn write_files(&self, part: &vmrun_agent_protocol::WriteFiles) -> Result<(), Error> {
        match self.call(&Request::WriteFiles(part.clone()), Some(self.opts.request_timeout), "write-files")? {
            Reply::Done => Ok(()),
            r => Err(self.unexpected("write-files", r)),
        }
    }

    /// One part of what a container with an overlay root changed in it,
    /// from change `from` (0 first), and where the next part starts (see
    /// [`Request::ReadChanges`]).
    pub fn read_changes(&self, container: &str, from: u64) -> Result<(Vec<vmrun_agent_protocol::Change>, Option<u64>), Error> {
        let req = Request::ReadChanges { container: container.into(), from };
        match self.call(&req, Some(self.opts.request_timeout), "read-changes")? {
            Reply::Changes { changes, next } => Ok((changes, next)),
            r => Err(self.unexpected("read-changes", r)),
        }
    }

    /// A container's cgroup statistics.
    pub fn stats(&self, container: &str) -> Result<CgroupStats, Error> {
        match self.call(&Request::Stats { container: container.into() }, Some(self.opts.request_timeout), "stats")? {
            Reply::Stats(s) => Ok(s),
            r => Err(self.unexpected("stats", r)),
        }
    }

    /// Freezes (`frozen`) or thaws a container's processes (its cgroup's
    /// freezer), returning once the guest's kernel says it is done.
    pub fn freeze(&self, container: &str, frozen: bool) -> Result<(), Error> {
        let req = Request::Freeze { container: container.into(), frozen };
        match self.call(&req, Some(self.opts.request_timeout), "freeze")? {
            Reply::Done => Ok(()),
            r => Err(self.unexpected("freeze", r)),
        }
    }

    /// Applies new limits to a container's cgroup (what `resources` sets;
    /// the rest is kept).
    pub fn update(&self, container: &str, resources: &Resources) -> Result<(), Error> {
        let req = Request::Update { container: container.into(), resources: resources.clone() };
        match self.call(&req, Some(self.opts.request_timeout), "update")? {
            Reply::Done => Ok(()),
            r => Err(self.unexpected("update", r)),
        }
    }

    /// Ends the guest (on a host: the agent).
    pub fn shutdown(&self) -> Result<(), Error> {
        match self.call(&Request::Shutdown, Some(self.opts.request_timeout), "shutdown")? {
            Reply::Done => Ok(()),
            r => Err(self.unexpected("shutdown", r)),
        }
    }
}

/// A process started in a container.
#[derive(Debug)]
pub struct Process {
    client: Client,
    container: String,
    exec_id: Option<String>,
    /// Its pid in the guest.
    pub pid: u32,
    /// A `Wait` sent with its start, not answered yet.
    exit: Mutex<Option<PendingReply>>,
    /// Its stdin (or the terminal's input).
    pub stdin: Option<InputStream>,
    /// Its stdout (or the terminal's output).
    pub stdout: Option<OutputStream>,
    /// Its stderr.
    pub stderr: Option<OutputStream>,
}

/// What [`Process::output`] collects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    /// The exit code.
    pub exit_code: i32,
    /// Standard output (or the terminal's output).
    pub stdout: Vec<u8>,
    /// Standard error.
    pub stderr: Vec<u8>,
}

fn read_bounded(mut r: impl Read, limit: usize) -> io::Result<Vec<u8>> {
    let mut v = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            return Ok(v);
        }
        let keep = n.min(limit - v.len().min(limit));
        v.extend_from_slice(&buf[..keep]);
    }
}

impl Process {
    /// Waits for the process to end; returns its exit code.
    pub fn wait(&self) -> Result<i32, Error> {
        let sent = self.exit.lock().unwrap_or_else(|p| p.into_inner()).take();
        match sent {
            Some((id, rx)) => {
                let r = self.client.await_reply(id, rx, None, "wait")?;
                self.client.exit_code(r)
            }
            None => self.client.wait(&self.container, self.exec_id.as_deref(), None),
        }
    }

    /// Sends it a signal.
    pub fn signal(&self, signal: i32) -> Result<(), Error> {
        self.client.signal(&self.container, self.exec_id.as_deref(), signal)
    }

    /// Resizes its terminal.
    pub fn resize(&self, rows: u16, cols: u16) -> Result<(), Error> {
        self.client.resize(&self.container, self.exec_id.as_deref(), rows, cols)
    }

    /// Closes stdin, collects stdout and stderr to their ends (at most
    /// `limit` bytes of each are kept, the rest read and dropped), and
    /// waits for the exit code.
    pub fn output(mut self, limit: usize) -> Result<Output, Error> {
        drop(self.stdin.take());
        let err_thread = self.stderr.take().map(|e| std::thread::spawn(move || read_bounded(e, limit)));
        let stdout = match self.stdout.take() {
            Some(o) => read_bounded(o, limit)?,
            None => Vec::new(),
        };
        let stderr = match err_thread {
            Some(t) => t.join().map_err(|_| Error::Closed("stderr reader panicked".into()))??,
            None => Vec::new(),
        };
        let exit_code = self.wait()?;
        Ok(Output { exit_code, stdout, stderr })
    }
}

/// Output of a process (`Read`): blocks until data, or returns 0 at the
/// end of the stream. Dropping it drains and drops the rest.
#[derive(Debug)]
pub struct OutputStream {
    shared: Arc<Shared>,
    id: u32,
}

impl Read for OutputStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut st = self.shared.lock();
        loop {
            let closed = st.closed.clone();
            let Some(s) = st.streams.get_mut(&self.id) else { return Ok(0) };
            if !s.buf.is_empty() {
                let n = buf.len().min(s.buf.len());
                for (d, b) in buf.iter_mut().zip(s.buf.drain(..n)) {
                    *d = b;
                }
                s.consumed += n as u64;
                // Credit in half-windows: fewer frames (and fewer system calls
                // in the guest); the agent still has half a window to go on.
                let grant = if s.consumed >= u64::from(STREAM_WINDOW / 2) {
                    std::mem::take(&mut s.consumed)
                } else {
                    0
                };
                drop(st);
                if grant > 0 {
                    let _ = self.shared.send(Kind::Credit, self.id, &(grant as u32).to_le_bytes());
                }
                return Ok(n);
            }
            if s.eof {
                return Ok(0);
            }
            if let Some(c) = closed {
                return Err(io::Error::new(io::ErrorKind::ConnectionAborted, c));
            }
            st = self.shared.cond.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }
}

impl Drop for OutputStream {
    fn drop(&mut self) {
        let mut st = self.shared.lock();
        let Some(s) = st.streams.get_mut(&self.id) else { return };
        let grant = s.consumed + s.buf.len() as u64;
        s.buf.clear();
        s.consumed = 0;
        s.discard = true;
        s.output = s.output && !s.eof;
        if s.eof && !s.input {
            st.streams.remove(&self.id);
        }
        drop(st);
        if grant > 0 {
            let _ = self.shared.send(Kind::Credit, self.id, &(grant as u32).to_le_bytes());
        }
    }
}

/// Input of a process (`Write`): blocks while the agent has no room.
/// [`InputStream::close`] (or dropping it) ends the process's stdin.
#[derive(Debug)]
pub struct InputStream {
    shared: Arc<Shared>,
    id: u32,
    closed: bool,
}

impl InputStream {
    /// Ends the process's stdin.
    pub fn close(mut self) -> io::Result<()> {
        self.finish()
    }

    fn finish(&mut self) -> io::Result<()> {
        if self.closed {
            return Ok(());
        }
        self.closed = true;
        let mut st = self.shared.lock();
        if let Some(s) = st.streams.get_mut(&self.id) {
            s.input = false;
            if !s.output || (s.eof && s.discard) {
                st.streams.remove(&self.id);
            }
        }
        drop(st);
        self.shared.send(Kind::Eof, self.id, &[])
    }
}

impl Write for InputStream {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if data.is_empty() {
            return Ok(0);
        }
        let deadline = Instant::now() + Duration::from_secs(3600);
        let mut st = self.shared.lock();
        let n = loop {
            if let Some(c) = &st.closed {
                return Err(io::Error::new(io::ErrorKind::BrokenPipe, c.clone()));
            }
            let Some(s) = st.streams.get_mut(&self.id) else { return Err(io::ErrorKind::BrokenPipe.into()) };
            if s.credit > 0 {
                let n = (data.len() as u64).min(s.credit).min(MAX_PAYLOAD as u64) as usize;
                s.credit -= n as u64;
                break n;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::ErrorKind::TimedOut.into());
            }
            st = self.shared.cond.wait_timeout(st, left).unwrap_or_else(|p| p.into_inner()).0;
        };
        drop(st);
        self.shared.send(Kind::Data, self.id, &data[..n])?;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for InputStream {
    fn drop(&mut self) {
        let _ = self.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    /// A fake agent on the other end of a socket pair: answers the hello
    /// with `version`, then runs `script` with the raw socket.
    fn fake_agent(version: u32, script: impl FnOnce(UnixStream) + Send + 'static) -> Result<Client, Error> {
        let (a, b) = UnixStream::pair().unwrap();
        std::thread::spawn(move || {
            let mut r = BufReader::new(b.try_clone().unwrap());
            let hello = frame::read_frame(&mut r).unwrap().unwrap();
            assert_eq!(hello.kind, Kind::Hello);
            let host: Hello = serde_json::from_slice(&hello.payload).unwrap();
            assert_eq!(host.entropy.map(|e| e.bytes().len()), Some(Entropy::LEN), "the host's hello carries entropy");
            assert!(host.time.and_then(WallClock::since_epoch).is_some(), "the host's hello carries its clock");
            let h = Hello { version, ..Hello::ours("fake-agent") };
            (&b).write_all(&frame::encode(Kind::Hello, 0, &serde_json::to_vec(&h).unwrap())).unwrap();
            script(b);
        });
        let opts = Options { handshake_timeout: Duration::from_secs(5), request_timeout: Duration::from_millis(300), ..Options::default() };
        Client::from_unix(a, opts)
    }

    #[test]
    fn every_connection_sends_fresh_entropy() {
        let hello_of_a_connection = || {
            let (a, b) = UnixStream::pair().unwrap();
            let agent = std::thread::spawn(move || {
                let mut r = BufReader::new(b.try_clone().unwrap());
                let hello = frame::read_frame(&mut r).unwrap().unwrap();
                let h = Hello::ours("fake-agent");
                (&b).write_all(&frame::encode(Kind::Hello, 0, &serde_json::to_vec(&h).unwrap())).unwrap();
                serde_json::from_slice::<Hello>(&hello.payload).unwrap()
            });
            let c = Client::from_unix(a, Options::default()).unwrap();
            let host = agent.join().unwrap();
            c.close();
            host.entropy.expect("the host's hello carries entropy")
        };
        let (one, two) = (hello_of_a_connection(), hello_of_a_connection());
        assert_eq!(one.bytes().len(), Entropy::LEN);
        assert_ne!(one, two, "two connections sent the same entropy");
        assert!(one.bytes().iter().any(|b| *b != 0));
    }

    /// A connection greeted in one place ([`Client::hello`]) serves
    /// requests from another ([`Client::established`]), with no second
    /// hello; a hello the agent refuses is an error.
    #[test]
    fn a_greeted_connection_is_used_without_another_hello() {
        let (mut a, b) = UnixStream::pair().unwrap();
        let agent = std::thread::spawn(move || {
            let mut r = BufReader::new(b.try_clone().unwrap());
            let hello = frame::read_frame(&mut r).unwrap().unwrap();
            assert_eq!(hello.kind, Kind::Hello);
            let h = Hello::ours("fake-agent");
            (&b).write_all(&frame::encode(Kind::Hello, 0, &serde_json::to_vec(&h).unwrap())).unwrap();
            let req = frame::read_frame(&mut r).unwrap().unwrap();
            assert_eq!(req.kind, Kind::Request, "a second hello came");
            let resp: Response = Ok(Reply::Pong { software: "fake-agent".into() });
            (&b).write_all(&frame::encode(Kind::Response, req.id, &serde_json::to_vec(&resp).unwrap())).unwrap();
            std::thread::sleep(Duration::from_millis(200));
        });
        Client::hello(&mut a, Duration::from_secs(5)).unwrap();
        let c = Client::established(a, Options::default()).unwrap();
        assert_eq!(c.ping().unwrap(), "fake-agent");
        agent.join().unwrap();

        let (mut a, b) = UnixStream::pair().unwrap();
        std::thread::spawn(move || {
            let mut r = BufReader::new(b.try_clone().unwrap());
            frame::read_frame(&mut r).unwrap().unwrap();
            let h = Hello { version: vmrun_agent_protocol::VERSION + 1, ..Hello::ours("fake-agent") };
            (&b).write_all(&frame::encode(Kind::Hello, 0, &serde_json::to_vec(&h).unwrap())).unwrap();
        });
        let e = Client::hello(&mut a, Duration::from_secs(5)).unwrap_err();
        assert!(matches!(e, Error::Handshake(HandshakeError::VersionMismatch { .. })), "{e}");
    }

    /// A release asks for the process's exit in the same write: the agent
    /// has both requests before it answers the first. A refused release
    /// forgets its `Wait`, whose answer, if one comes, is dropped.
    #[test]
    fn a_release_sends_its_wait_with_it() {
        let c = fake_agent(vmrun_agent_protocol::VERSION, |s| {
            let mut r = BufReader::new(s.try_clone().unwrap());
            let answer = |id: u32, resp: Response| (&s).write_all(&frame::encode(Kind::Response, id, &serde_json::to_vec(&resp).unwrap())).unwrap();
            let kinds = |req: &frame::Frame| serde_json::from_slice::<Request>(&req.payload).unwrap();
            // The first release is refused; its Wait is answered anyway.
            let release = frame::read_frame(&mut r).unwrap().unwrap();
            assert!(matches!(kinds(&release), Request::Release { .. }));
            assert!(!r.buffer().is_empty(), "the Wait did not come with the release");
            let wait = frame::read_frame(&mut r).unwrap().unwrap();
            assert!(matches!(kinds(&wait), Request::Wait { .. }));
            answer(release.id, Err(AgentError::new(ErrorKind::BadRequest, "refused")));
            answer(wait.id, Ok(Reply::Exited { exit_code: 137 }));
            // The second is started; its Wait answered once it exits.
            let release = frame::read_frame(&mut r).unwrap().unwrap();
            assert!(!r.buffer().is_empty(), "the Wait did not come with the release");
            let wait = frame::read_frame(&mut r).unwrap().unwrap();
            assert!(matches!(kinds(&wait), Request::Wait { container, exec_id: None } if container == "held"));
            answer(release.id, Ok(Reply::Started { pid: 9 }));
            std::thread::sleep(Duration::from_millis(100));
            answer(wait.id, Ok(Reply::Exited { exit_code: 3 }));
            // Nothing else is asked: the process's wait took that answer.
            s.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
            assert!(frame::read_frame(&mut r).is_err(), "another request came");
        })
        .unwrap();
        let e = c.release_with("held", None, StdioMode::Piped { stdin: false }).unwrap_err();
        assert!(matches!(&e, Error::Agent(a) if a.kind == ErrorKind::BadRequest), "{e}");
        let p = c.release_with("held", None, StdioMode::Piped { stdin: false }).unwrap();
        assert_eq!(p.pid, 9);
        assert_eq!(p.wait().unwrap(), 3);
    }

    /// With `defer_hello` the handshake does not wait: the first request
    /// reaches the agent before it has answered the hello, and is answered
    /// after it. An answer that does not match fails what is pending, with
    /// the reason.
    #[test]
    fn a_deferred_hello_lets_the_first_request_follow_it() {
        let agent = |version: u32| {
            let (a, b) = UnixStream::pair().unwrap();
            let agent = std::thread::spawn(move || {
                let mut r = BufReader::new(b.try_clone().unwrap());
                let hello = frame::read_frame(&mut r).unwrap().unwrap();
                assert_eq!(hello.kind, Kind::Hello);
                // Nothing answered yet, and the request is here.
                b.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let req = frame::read_frame(&mut r).unwrap().unwrap();
                assert_eq!(req.kind, Kind::Request);
                let h = Hello { version, ..Hello::ours("fake-agent") };
                (&b).write_all(&frame::encode(Kind::Hello, 0, &serde_json::to_vec(&h).unwrap())).unwrap();
                let resp: Response = Ok(Reply::Pong { software: "fake-agent".into() });
                let _ = (&b).write_all(&frame::encode(Kind::Response, req.id, &serde_json::to_vec(&resp).unwrap()));
                std::thread::sleep(Duration::from_millis(200));
            });
            let opts = Options { handshake_timeout: Duration::from_secs(5), defer_hello: true, ..Options::default() };
            (Client::from_unix(a, opts).unwrap(), agent)
        };
        let (c, a) = agent(vmrun_agent_protocol::VERSION);
        assert_eq!(c.ping().unwrap(), "fake-agent");
        a.join().unwrap();

        let (c, a) = agent(vmrun_agent_protocol::VERSION + 1);
        let e = c.ping().unwrap_err();
        assert!(matches!(&e, Error::Closed(why) if why.contains("the agent's hello") && why.contains("fake-agent")), "{e}");
        a.join().unwrap();
    }

    #[test]
    fn version_mismatch_is_refused_with_both_versions() {
        let e = fake_agent(vmrun_agent_protocol::VERSION + 1, |_| {}).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, Error::Handshake(HandshakeError::VersionMismatch { .. })), "{msg}");
        assert!(msg.contains("fake-agent"), "{msg}");
    }

    #[test]
    fn requests_time_out() {
        let c = fake_agent(vmrun_agent_protocol::VERSION, |s| {
            std::thread::sleep(Duration::from_secs(2));
            drop(s);
        })
        .unwrap();
        assert!(matches!(c.ping(), Err(Error::Timeout(..))));
    }

    #[test]
    fn data_beyond_the_window_closes_the_connection() {
        let c = fake_agent(vmrun_agent_protocol::VERSION, |s| {
            let mut r = BufReader::new(s.try_clone().unwrap());
            let req = frame::read_frame(&mut r).unwrap().unwrap();
            let resp: Response = Ok(Reply::Started { pid: 7 });
            (&s).write_all(&frame::encode(Kind::Response, req.id, &serde_json::to_vec(&resp).unwrap())).unwrap();
            // Stream 1 is stdout: send more than a window without credit.
            let chunk = vec![b'x'; MAX_PAYLOAD];
            for _ in 0..=(STREAM_WINDOW as usize / MAX_PAYLOAD) {
                if (&s).write_all(&frame::encode(Kind::Data, 1, &chunk)).is_err() {
                    break;
                }
            }
            std::thread::sleep(Duration::from_secs(1));
        })
        .unwrap();
        let p = c.start("c", StdioMode::Piped { stdin: false }).unwrap();
        assert_eq!(p.pid, 7);
        let mut out = p.stdout.unwrap();
        std::thread::sleep(Duration::from_millis(300));
        let mut all = Vec::new();
        let e = out.read_to_end(&mut all).unwrap_err();
        assert!(e.to_string().contains("window"), "{e}");
        assert!(matches!(c.ping(), Err(Error::Closed(m)) if m.contains("window")));
    }

    #[test]
    fn data_for_an_unknown_stream_is_a_violation() {
        let c = fake_agent(vmrun_agent_protocol::VERSION, |s| {
            (&s).write_all(&frame::encode(Kind::Data, 99, b"boo")).unwrap();
            std::thread::sleep(Duration::from_secs(1));
        })
        .unwrap();
        std::thread::sleep(Duration::from_millis(200));
        assert!(matches!(c.ping(), Err(Error::Closed(m)) if m.contains("unknown stream")));
    }

    #[test]
    fn out_of_range_exit_codes_are_refused() {
        let c = fake_agent(vmrun_agent_protocol::VERSION, |s| {
            let mut r = BufReader::new(s.try_clone().unwrap());
            let req = frame::read_frame(&mut r).unwrap().unwrap();
            let resp: Response = Ok(Reply::Exited { exit_code: -5 });
            (&s).write_all(&frame::encode(Kind::Response, req.id, &serde_json::to_vec(&resp).unwrap())).unwrap();
            std::thread::sleep(Duration::from_secs(1));
        })
        .unwrap();
        assert!(matches!(c.wait("c", None, Some(Duration::from_secs(5))), Err(Error::Protocol(_))));
    }

    #[test]
    fn hybrid_vsock_handshake() {
        let dir = std::env::temp_dir().join(format!("vmrun-client-vsock-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("v.sock");
        let _ = std::fs::remove_file(&path);
        let l = UnixListener::bind(&path).unwrap();
        let t = std::thread::spawn(move || {
            for answer in ["OK 1073741824\nrest", "NOPE\n"] {
                let (mut s, _) = l.accept().unwrap();
                let mut line = [0u8; 13];
                s.read_exact(&mut line).unwrap();
                assert_eq!(&line, b"CONNECT 1024\n");
                s.write_all(answer.as_bytes()).unwrap();
            }
        });
        let mut s = hybrid_vsock_connect(&path, 1024, Duration::from_secs(5)).unwrap();
        let mut rest = [0u8; 4];
        s.read_exact(&mut rest).unwrap();
        assert_eq!(&rest, b"rest");
        let e = hybrid_vsock_connect(&path, 1024, Duration::from_secs(5)).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused);
        t.join().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
