//! The control protocol: one JSON request per connection to the VM's
//! control socket, one JSON answer, each a line.
//!
//! A request is an [`Envelope`]: the protocol's [`CONTROL_VERSION`] and
//! the request, `{"version":1,"request":{"op":"ping"}}`; the request is
//! `{"op":"ping"}`, `{"op":"pause"}`, `{"op":"resume"}`,
//! `{"op":"snapshot","dir":"/path","resume":true}`, `{"op":"stop"}`,
//! `{"op":"stats"}`, `{"op":"attach_disk","disk":2,"read_only":true}` or
//! `{"op":"detach_disk","disk":2}`. The VMM reads the version first and
//! refuses any other (naming both), then the request, refusing unknown
//! fields. The answer is `{"ok":true,...}` or `{"ok":false,"error":"..."}`.
//!
//! `attach_disk` carries the disk image's open descriptor with its line
//! (`SCM_RIGHTS`, [`request_with_fd`]): the VMM runs jailed and opens no
//! host path itself, so whoever may open the image hands it over.

use std::io::{BufRead, BufReader, IoSlice, IoSliceMut, Read, Write};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Longest a request or an answer may be.
pub const MAX_MESSAGE: u64 = 64 * 1024;

/// The version of the control protocol; bumped on any change a VMM or a
/// client of the previous version would misread.
pub const CONTROL_VERSION: u32 = 1;

/// What a client sends: a request and the protocol's version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Envelope {
    /// [`CONTROL_VERSION`] when sent.
    pub version: u32,
    pub request: Request,
}

/// Why the VMM refused a control request before acting on it.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("the control request has no protocol version (it was not sent by a vmrun client): send {{\"version\":{CONTROL_VERSION},\"request\":...}}")]
    NoVersion,
    #[error("the control request is protocol version {found}, and this VMM speaks version {supported}: use the vmrun that started this VMM, or one from the same build")]
    Version { found: u32, supported: u32 },
    #[error("invalid control request {line:?}: {source}")]
    Json { line: String, source: serde_json::Error },
}

impl Envelope {
    /// `request` in the current version.
    pub fn new(request: Request) -> Self {
        Self { version: CONTROL_VERSION, request }
    }

    /// Reads one request line: the version first (another version is
    /// refused with both numbers, whatever else the line holds), then the
    /// request, refusing unknown fields.
    pub fn parse(line: &str) -> Result<Request, RequestError> {
        #[derive(Deserialize)]
        struct Header {
            version: Option<u32>,
        }
        let json = |source| RequestError::Json { line: line.trim_end().to_string(), source };
        let header: Header = serde_json::from_str(line).map_err(json)?;
        match header.version {
            None => return Err(RequestError::NoVersion),
            Some(v) if v != CONTROL_VERSION => return Err(RequestError::Version { found: v, supported: CONTROL_VERSION }),
            Some(_) => {}
        }
        serde_json::from_str::<Envelope>(line).map(|e| e.request).map_err(json)
    }
}

/// A control request. Unknown fields are refused in the requests that
/// have fields (`snapshot`); serde reads the others (`ping`, `stop`, ...)
/// from their `op` alone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Answers at once: the VMM serves its socket.
    Ping,
    /// Pauses the vCPUs.
    Pause,
    /// Lets paused vCPUs run again.
    Resume,
    /// Pauses the vCPUs and saves the VM into `dir`; with `resume`, the VM
    /// runs on afterwards (else it stays paused).
    Snapshot {
        dir: PathBuf,
        #[serde(default)]
        resume: bool,
    },
    /// Ends the VM (the VMM exits 0).
    Stop,
    /// What the VMM knows of the VM's work and memory ([`VmmStats`]).
    Stats,
    /// Puts the image whose descriptor comes with the request into the
    /// empty disk slot `disk` (0 is the VM's first disk, the guest's
    /// `/dev/vda`) and tells the guest its new size. With `read_only` the
    /// VMM refuses the guest's writes to it, whatever the slot was.
    AttachDisk {
        disk: usize,
        #[serde(default)]
        read_only: bool,
    },
    /// Empties disk slot `disk`: the VMM closes its image and the guest
    /// sees a disk of size 0 (unmount it first: its further requests fail).
    DetachDisk { disk: usize },
}

/// A control answer.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub error: Option<String>,
    /// Milliseconds the operation took.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub ms: Option<f64>,
    /// The answer to [`Request::Stats`].
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub stats: Option<VmmStats>,
}

/// What the VMM knows of its VM: KVM's counters per vCPU and its resident
/// memory. A value is `None` where the host does not tell.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmmStats {
    /// One entry per vCPU, in order.
    pub vcpus: Vec<VcpuStats>,
    /// The VMM process's resident memory, guest memory included, in KiB.
    #[serde(default)]
    pub rss_kib: Option<u64>,
    /// The part of it that is guest memory, in KiB.
    #[serde(default)]
    pub guest_rss_kib: Option<u64>,
}

impl VmmStats {
    /// Instructions KVM emulated, summed over the vCPUs (`None` when a
    /// vCPU's count is unknown).
    pub fn insn_emulation(&self) -> Option<u64> {
        self.vcpus.iter().map(|v| v.insn_emulation).sum()
    }

    /// Exits to KVM, summed over the vCPUs (`None` when a vCPU's count is
    /// unknown).
    pub fn exits(&self) -> Option<u64> {
        self.vcpus.iter().map(|v| v.exits).sum()
    }

    /// Resident memory that is the VMM's own (not the guest's), in KiB.
    pub fn overhead_rss_kib(&self) -> Option<u64> {
        Some(self.rss_kib?.saturating_sub(self.guest_rss_kib?))
    }
}

/// One vCPU's KVM counters (`KVM_GET_STATS_FD`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuStats {
    /// Instructions KVM's emulator executed (`insn_emulation`): on hosts
    /// that emulate guest kernel mode, the guest kernel's instructions.
    #[serde(default)]
    pub insn_emulation: Option<u64>,
    /// Exits to KVM (`exits`).
    #[serde(default)]
    pub exits: Option<u64>,
}

/// Errors of a control request.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot reach the VM's control socket {path}: {source}")]
    Connect { path: PathBuf, source: std::io::Error },
    #[error("talking to the VM's control socket {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("the VMM's answer {answer:?} is not valid: {source}")]
    BadAnswer { answer: String, source: serde_json::Error },
    #[error("{0}")]
    Refused(String),
    #[error("cannot open the disk image {path}: {source}")]
    Image { path: PathBuf, source: std::io::Error },
}

/// Sends `req` (in an [`Envelope`] of the current version) to the control
/// socket at `path` and waits up to `timeout` (for each of the write and
/// the read) for the answer. An answer that is
/// not `ok` is [`ControlError::Refused`] with the VMM's reason.
pub fn request(path: &Path, req: &Request, timeout: Duration) -> Result<Response, ControlError> {
    send(path, req, None, timeout)
}

/// [`request`] with `fd` passed along with the request's line
/// (`SCM_RIGHTS`), as [`Request::AttachDisk`] needs.
pub fn request_with_fd(path: &Path, req: &Request, fd: BorrowedFd<'_>, timeout: Duration) -> Result<Response, ControlError> {
    send(path, req, Some(fd), timeout)
}

/// Opens the disk image `image` (read-only, or for reading and writing)
/// and hands it to the VMM of the control socket `path` for disk slot
/// `disk` ([`Request::AttachDisk`]).
pub fn attach_disk(path: &Path, disk: usize, image: &Path, read_only: bool, timeout: Duration) -> Result<Response, ControlError> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(!read_only)
        .open(image)
        .map_err(|source| ControlError::Image { path: image.to_path_buf(), source })?;
    request_with_fd(path, &Request::AttachDisk { disk, read_only }, std::os::fd::AsFd::as_fd(&file), timeout)
}

fn send(path: &Path, req: &Request, fd: Option<BorrowedFd<'_>>, timeout: Duration) -> Result<Response, ControlError> {
    let io = |source| ControlError::Io { path: path.to_path_buf(), source };
    let mut s = UnixStream::connect(path).map_err(|source| ControlError::Connect { path: path.to_path_buf(), source })?;
    s.set_read_timeout(Some(timeout)).map_err(io)?;
    s.set_write_timeout(Some(timeout)).map_err(io)?;
    let mut line = serde_json::to_vec(&Envelope::new(req.clone())).map_err(|e| io(std::io::Error::other(e)))?;
    line.push(b'\n');
    write_line_with_fds(&mut s, &line, fd.as_slice()).map_err(io)?;
    let mut answer = String::new();
    BufReader::new(s.take(MAX_MESSAGE)).read_line(&mut answer).map_err(io)?;
    let response: Response =
        serde_json::from_str(&answer).map_err(|source| ControlError::BadAnswer { answer: answer.clone(), source })?;
    if response.ok {
        Ok(response)
    } else {
        Err(ControlError::Refused(response.error.unwrap_or_else(|| "the VM refused the request".into())))
    }
}

/// Writes `line` to `stream`, with the descriptors `fds` if any
/// (`SCM_RIGHTS`): they ride on the first bytes, and the rest of the line
/// (if the kernel took only part of it) follows plainly.
pub fn write_line_with_fds(stream: &mut UnixStream, line: &[u8], fds: &[BorrowedFd<'_>]) -> std::io::Result<()> {
    match fds {
        [] => stream.write_all(line),
        fds => {
            let fds: Vec<std::os::fd::RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
            let cmsg = [ControlMessage::ScmRights(&fds)];
            let n = sendmsg::<()>(stream.as_raw_fd(), &[IoSlice::new(line)], &cmsg, MsgFlags::empty(), None).map_err(std::io::Error::from)?;
            stream.write_all(&line[n..])
        }
    }
}

/// Reads one request line from `stream` (at most [`MAX_MESSAGE`] bytes),
/// with the descriptors that came with it (`SCM_RIGHTS`, received
/// close-on-exec). The line is not parsed: see [`Envelope::parse`].
pub fn read_line_with_fds(stream: &UnixStream) -> std::io::Result<(String, Vec<OwnedFd>)> {
    let mut line = Vec::new();
    let mut fds = Vec::new();
    let mut buf = [0u8; 4096];
    while !line.contains(&b'\n') {
        if line.len() as u64 >= MAX_MESSAGE {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "the control request is too long"));
        }
        let mut space = nix::cmsg_space!([std::os::fd::RawFd; 4]);
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg = recvmsg::<()>(stream.as_raw_fd(), &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC)
            .map_err(std::io::Error::from)?;
        let n = msg.bytes;
        let truncated = msg.flags.contains(MsgFlags::MSG_CTRUNC);
        for c in msg.cmsgs().map_err(std::io::Error::from)? {
            if let ControlMessageOwned::ScmRights(received) = c {
                // SAFETY: SCM_RIGHTS installed these descriptors in this
                // process for us; each is owned once, here.
                fds.extend(received.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }));
            }
        }
        if truncated {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "too many descriptors came with the control request"));
        }
        if n == 0 {
            break;
        }
        line.extend_from_slice(&buf[..n]);
    }
    let end = line.iter().position(|&b| b == b'\n').map_or(line.len(), |i| i + 1);
    line.truncate(end);
    let line = String::from_utf8(line).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    Ok((line, fds))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::os::unix::net::UnixListener;

    #[test]
    fn requests_and_answers_in_json() {
        let r: Request = serde_json::from_str(r#"{"op":"snapshot","dir":"/tmp/s"}"#).unwrap();
        assert_eq!(r, Request::Snapshot { dir: "/tmp/s".into(), resume: false });
        assert_eq!(serde_json::from_str::<Request>(r#"{"op":"stop"}"#).unwrap(), Request::Stop);
        assert_eq!(serde_json::to_string(&Request::Stats).unwrap(), r#"{"op":"stats"}"#);
        assert!(serde_json::from_str::<Request>(r#"{"op":"explode"}"#).is_err());
        assert_eq!(serde_json::to_string(&Response { ok: true, ..Default::default() }).unwrap(), r#"{"ok":true}"#);
        let stats = VmmStats {
            vcpus: vec![VcpuStats { insn_emulation: Some(5), exits: Some(9) }, VcpuStats::default()],
            rss_kib: Some(3000),
            guest_rss_kib: Some(1000),
        };
        let r = Response { ok: true, stats: Some(stats.clone()), ..Default::default() };
        let back: Response = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(back.stats.as_ref(), Some(&stats));
        assert_eq!(stats.overhead_rss_kib(), Some(2000));
    }

    #[test]
    fn a_request_of_the_current_version_is_read() {
        let line = serde_json::to_string(&Envelope::new(Request::Stats)).unwrap();
        assert_eq!(line, format!(r#"{{"version":{CONTROL_VERSION},"request":{{"op":"stats"}}}}"#));
        assert_eq!(Envelope::parse(&line).unwrap(), Request::Stats);
        assert_eq!(Envelope::parse("{\"version\":1,\"request\":{\"op\":\"ping\"}}\n").unwrap(), Request::Ping);
    }

    #[test]
    fn a_request_of_another_version_is_refused() {
        let e = Envelope::parse(r#"{"version":2,"request":{"op":"stop"}}"#).unwrap_err();
        assert!(matches!(e, RequestError::Version { found: 2, supported: CONTROL_VERSION }), "{e}");
        let m = e.to_string();
        assert!(m.contains("version 2") && m.contains(&format!("speaks version {CONTROL_VERSION}")), "{m}");
        // The version is checked first: a later version's requests do not
        // turn into a parse error.
        let e = Envelope::parse(r#"{"version":9,"request":{"op":"teleport","to":"mars"}}"#).unwrap_err();
        assert!(matches!(e, RequestError::Version { found: 9, .. }), "{e}");
        // A request without its envelope (as sent before the protocol had
        // a version).
        assert!(matches!(Envelope::parse(r#"{"op":"stop"}"#), Err(RequestError::NoVersion)));
    }

    #[test]
    fn unknown_fields_and_bad_requests_are_refused() {
        for bad in [
            r#"{"version":1,"request":{"op":"stop"},"force":true}"#,
            r#"{"version":1,"request":{"op":"snapshot","dir":"/s","compress":true}}"#,
            r#"{"version":1,"request":{"op":"explode"}}"#,
            r#"{"version":1}"#,
            "not json",
        ] {
            assert!(matches!(Envelope::parse(bad), Err(RequestError::Json { .. })), "{bad}");
        }
    }

    /// A one-shot server answering `answer` to whatever comes.
    fn serve(path: &Path, answer: &'static str) -> std::thread::JoinHandle<String> {
        let l = UnixListener::bind(path).unwrap();
        std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            let mut line = String::new();
            BufReader::new(&s).read_line(&mut line).unwrap();
            (&s).write_all(answer.as_bytes()).unwrap();
            line
        })
    }

    #[test]
    fn the_client_sends_a_line_and_reads_the_answer() {
        let dir = std::env::temp_dir().join(format!("vmm-api-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("c.sock");
        let server = serve(&sock, "{\"ok\":true,\"ms\":1.5}\n");
        let r = request(&sock, &Request::Snapshot { dir: "/s".into(), resume: true }, Duration::from_secs(5)).unwrap();
        assert_eq!(r.ms, Some(1.5));
        let sent = server.join().unwrap();
        assert_eq!(sent, "{\"version\":1,\"request\":{\"op\":\"snapshot\",\"dir\":\"/s\",\"resume\":true}}\n");
        assert_eq!(Envelope::parse(&sent).unwrap(), Request::Snapshot { dir: "/s".into(), resume: true });
        std::fs::remove_file(&sock).unwrap();

        let server = serve(&sock, "{\"ok\":false,\"error\":\"no room\"}\n");
        let e = request(&sock, &Request::Stop, Duration::from_secs(5)).unwrap_err();
        assert!(matches!(&e, ControlError::Refused(m) if m == "no room"), "{e}");
        server.join().unwrap();
        std::fs::remove_file(&sock).unwrap();

        // A server that says nothing: the timeout ends the wait.
        let l = UnixListener::bind(&sock).unwrap();
        let e = request(&sock, &Request::Ping, Duration::from_millis(100)).unwrap_err();
        assert!(matches!(e, ControlError::Io { .. } | ControlError::BadAnswer { .. }), "{e}");
        drop(l);
        let _ = std::fs::remove_dir_all(&dir);
        assert!(matches!(request(&sock, &Request::Ping, Duration::from_secs(1)), Err(ControlError::Connect { .. })));
    }

    #[test]
    fn a_descriptor_travels_with_its_request() {
        let dir = std::env::temp_dir().join(format!("vmm-api-fd-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("c.sock");
        let image = dir.join("disk.img");
        std::fs::write(&image, b"the disk's first bytes").unwrap();
        let l = UnixListener::bind(&sock).unwrap();
        let server = std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            let (line, fds) = read_line_with_fds(&s).unwrap();
            (&s).write_all(b"{\"ok\":true}\n").unwrap();
            (line, fds)
        });
        let file = std::fs::File::open(&image).unwrap();
        let req = Request::AttachDisk { disk: 2, read_only: true };
        request_with_fd(&sock, &req, std::os::fd::AsFd::as_fd(&file), Duration::from_secs(5)).unwrap();
        let (line, mut fds) = server.join().unwrap();
        assert_eq!(Envelope::parse(&line).unwrap(), req);
        assert_eq!(line, "{\"version\":1,\"request\":{\"op\":\"attach_disk\",\"disk\":2,\"read_only\":true}}\n");
        assert_eq!(fds.len(), 1, "one descriptor");
        let mut got = String::new();
        std::fs::File::from(fds.remove(0)).read_to_string(&mut got).unwrap();
        assert_eq!(got, "the disk's first bytes", "the descriptor is the image's");

        // A plain request brings none; a detach needs none.
        let l = UnixListener::bind(dir.join("d.sock")).unwrap();
        let server = std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            let got = read_line_with_fds(&s).unwrap();
            (&s).write_all(b"{\"ok\":true}\n").unwrap();
            got
        });
        request(&dir.join("d.sock"), &Request::DetachDisk { disk: 0 }, Duration::from_secs(5)).unwrap();
        let (line, fds) = server.join().unwrap();
        assert_eq!(Envelope::parse(&line).unwrap(), Request::DetachDisk { disk: 0 });
        assert!(fds.is_empty());
        assert!(Envelope::parse(r#"{"version":1,"request":{"op":"attach_disk","disk":1,"fd":3}}"#).is_err(), "unknown field");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
