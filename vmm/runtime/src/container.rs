//! A container's state on the host, one type for every front end: `vmrun
//! run` keeps its containers under `$VMRUN_HOME/containers/<id>/`, and
//! `vmrun-oci` under its `--root` (`<root>/<id>/`, with the bundle's part in
//! [`State::oci`]).
//!
//! The directory holds:
//! - `state.json` ([`State`]), rewritten atomically (write, fsync, rename)
//!   by the process that owns the VM (`vmrun run` in the foreground, or the
//!   supervisor of a detached or OCI container);
//! - `container.log`, the container's output in [`LogRecord`] frames;
//! - the sandbox's files (`crate::vm::Layout`: `vmm.json`, `vmm.log`, and
//!   `vm/` with the VM's sockets, console and the disks made for it).
//!
//! Whether a container still runs is never taken from `state.json` alone:
//! its owner process must be alive too (same pid *and* start time, so a
//! reused pid is not mistaken for it). A VMM or owner killed with SIGKILL
//! therefore shows as exited.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::home::Home;

/// The file in a container's directory that holds its [`State`].
pub const STATE_FILE: &str = "state.json";
/// The container's output.
pub const LOG_FILE: &str = "container.log";

/// Where a container is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Its VM is being started and its root file system prepared.
    Creating,
    /// Its VM runs and its process waits to be started (OCI's `created`,
    /// until `start`).
    Created,
    /// Its process runs.
    Running,
    /// Its process ended (or its VM did); OCI's `stopped`.
    #[serde(alias = "stopped")]
    Exited,
}

/// A process, recognised by pid and start time (in clock ticks since
/// boot, `/proc/PID/stat` field 22).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessRef {
    pub pid: u32,
    pub start_time: u64,
}

impl ProcessRef {
    /// This process.
    pub fn current() -> Option<Self> {
        Self::of(std::process::id())
    }

    /// The process `pid`, if it runs.
    pub fn of(pid: u32) -> Option<Self> {
        start_time(pid).map(|start_time| Self { pid, start_time })
    }

    /// Whether this very process still runs (not a zombie, not a new
    /// process with the same pid).
    pub fn alive(&self) -> bool {
        start_time(self.pid) == Some(self.start_time)
    }

    /// A pidfd for this very process (readable once it ends), or `None`
    /// if it has ended or its pid names another process now. The pidfd is
    /// opened first and the start time checked second: if the process is
    /// still this one then, the pidfd names it, even if the pid is reused
    /// later.
    pub fn pidfd(&self) -> std::io::Result<Option<std::os::fd::OwnedFd>> {
        let fd = match crate::watch::pidfd_open(self.pid) {
            Ok(fd) => fd,
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => return Ok(None),
            Err(e) => return Err(e),
        };
        Ok(self.alive().then_some(fd))
    }
}

/// Field 22 of `/proc/PID/stat`, for a process that is not a zombie.
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold anything;
    // the fields after its last ')' are plain.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state).
    if fields.first() == Some(&"Z") || fields.first() == Some(&"X") {
        return None;
    }
    fields.get(22 - 3)?.parse().ok()
}

/// What `vmrun ps` and the other container commands know of a container.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct State {
    /// 12 hex digits.
    pub id: String,
    /// The user's name for it (`--name`), or a generated one.
    pub name: String,
    /// The image as the user named it.
    pub image: String,
    /// The image's manifest digest: its layer disk and prepared templates
    /// are kept while the container exists.
    #[serde(default)]
    pub image_digest: Option<String>,
    /// The directory name of the template its VM was restored from (under
    /// `templates/`), kept while the container exists.
    #[serde(default)]
    pub template: Option<String>,
    /// The command, as shown by `ps`.
    pub command: String,
    /// Seconds since the epoch.
    pub created: u64,
    pub status: Status,
    /// The process that owns the VM and writes this file (an OCI
    /// container's supervisor, whose pid is the container's).
    #[serde(alias = "supervisor")]
    pub owner: Option<ProcessRef>,
    /// The process creating it, before there is an owner (`vmrun-oci
    /// create`).
    #[serde(default)]
    pub creator: Option<ProcessRef>,
    /// The VMM.
    pub vmm: Option<ProcessRef>,
    /// The sandbox's directory ([`crate::vm::Layout`]), when it is not the
    /// container's own (an OCI state directory whose socket paths would be
    /// too long).
    #[serde(default)]
    pub vm_dir: Option<PathBuf>,
    /// The container's id inside the VM (for exec, signals).
    pub guest_id: String,
    /// Whether the process has a terminal.
    #[serde(default)]
    pub tty: bool,
    /// The exit code, once exited.
    pub exit_code: Option<i32>,
    /// Seconds since the epoch, once exited.
    pub finished: Option<u64>,
    /// Why it failed to start or ended abnormally.
    pub error: Option<String>,
    /// Remove the directory when it exits.
    #[serde(default)]
    pub auto_remove: bool,
    /// The host's TAP device, with `--network tap`.
    #[serde(default)]
    pub tap: Option<String>,
    /// The guest's address, with `--network tap`.
    #[serde(default)]
    pub ip: Option<String>,
    /// Published ports, `HOST:GUEST`.
    #[serde(default)]
    pub ports: Vec<String>,
    /// What an OCI runtime's container adds: its bundle.
    #[serde(default)]
    pub oci: Option<OciBundle>,
    /// Host cgroup directories made for the container's VM (an OCI
    /// container's `linux.cgroupsPath`), top down: removed with it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub host_cgroups: Vec<PathBuf>,
}

/// The bundle an OCI container was created from (`vmrun-oci`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OciBundle {
    /// The bundle's `ociVersion`.
    pub oci_version: String,
    /// The bundle (absolute).
    pub bundle: PathBuf,
    /// The root file system the container's copy was made of (absolute).
    pub rootfs: PathBuf,
    /// When `create` ran (RFC 3339, as runc reports it).
    pub created: String,
    /// The bundle's annotations.
    #[serde(default)]
    pub annotations: std::collections::BTreeMap<String, String>,
    /// The process in the spec's namespaces on the host whose pid is the
    /// container's (`vmrun-oci hold`); `None`: the supervisor's pid is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub holder: Option<ProcessRef>,
    /// The pod network the VM is attached to (its namespace's interface
    /// mirrored to a TAP device there), until it is detached.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<crate::net::pod::PodLink>,
    /// The pod's sandbox container, for a container made in its VM (a
    /// pod's other containers): the VM ([`State::vm_dir`]) is the
    /// sandbox's, and not this container's to remove.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_sandbox: Option<String>,
    /// How many of the container's processes the guest's OOM killer had
    /// killed when its process ended killed (a shim reports an OOM).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub oom_kills: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// Seconds since the epoch.
pub fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl State {
    /// A container just created: no owner, VM, exit or network yet.
    pub fn new(id: &str, name: &str, image: &str, command: &str) -> Self {
        Self {
            id: id.into(),
            name: name.into(),
            image: image.into(),
            image_digest: None,
            template: None,
            command: command.into(),
            created: now(),
            status: Status::Creating,
            owner: None,
            creator: None,
            vmm: None,
            vm_dir: None,
            guest_id: String::new(),
            tty: false,
            exit_code: None,
            finished: None,
            error: None,
            auto_remove: false,
            tap: None,
            ip: None,
            ports: Vec::new(),
            oci: None,
            host_cgroups: Vec::new(),
        }
    }

    /// Reads `dir/state.json`.
    pub fn load(dir: &Path) -> std::io::Result<Self> {
        let text = std::fs::read(dir.join(STATE_FILE))?;
        serde_json::from_slice(&text).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
    }

    /// Writes `dir/state.json` atomically.
    pub fn save(&self, dir: &Path) -> std::io::Result<()> {
        write_atomic(&dir.join(STATE_FILE), &serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?)
    }

    /// The status, corrected for processes that are gone: a container
    /// whose owner died without writing its end (or whose creator died
    /// before there was an owner) has exited.
    pub fn effective_status(&self) -> Status {
        match (self.status, self.owner) {
            (Status::Exited, _) => Status::Exited,
            (_, Some(o)) if o.alive() => self.status,
            (Status::Creating, None) if self.creator.is_some_and(|c| c.alive()) => Status::Creating,
            _ => Status::Exited,
        }
    }

    /// The layout of the container's sandbox, whose directory is `dir`
    /// (the container's) unless [`State::vm_dir`] names another.
    pub fn layout(&self, dir: &Path) -> crate::vm::Layout {
        crate::vm::Layout::of(self.vm_dir.as_deref().unwrap_or(dir))
    }

    /// Whether the owner ended without recording how the container did.
    pub fn lost(&self) -> bool {
        self.status != Status::Exited && self.effective_status() == Status::Exited
    }

    /// `Up 5 seconds`, `Exited (3) 2 minutes ago`, as docker says it.
    pub fn describe(&self, now: u64) -> String {
        match self.effective_status() {
            Status::Creating | Status::Created => "Created".into(),
            Status::Running => format!("Up {}", ago(now.saturating_sub(self.created))),
            Status::Exited if self.lost() => "Exited (unknown): its VMM is gone".into(),
            Status::Exited => {
                let code = self.exit_code.map_or_else(|| "?".into(), |c| c.to_string());
                let when = self.finished.map_or_else(String::new, |f| format!(" {} ago", ago(now.saturating_sub(f))));
                format!("Exited ({code}){when}")
            }
        }
    }
}

fn ago(secs: u64) -> String {
    match secs {
        0..=1 => "1 second".into(),
        2..=59 => format!("{secs} seconds"),
        60..=119 => "1 minute".into(),
        120..=3599 => format!("{} minutes", secs / 60),
        3600..=7199 => "1 hour".into(),
        7200..=86399 => format!("{} hours", secs / 3600),
        _ => format!("{} days", secs / 86400),
    }
}

/// Writes `path` atomically: a temporary file beside it, fsync, rename.
pub fn write_atomic(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.{}", std::process::id()));
    let mut f = File::create(&tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// Errors finding a container.
#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    #[error("no such container: {0}")]
    NotFound(String),
    #[error("{0:?} names more than one container; give more of the id")]
    Ambiguous(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Every container in `home` with its directory, oldest first. Directories
/// without a readable state (being created, or damaged) are skipped.
pub fn list(home: &Home) -> std::io::Result<Vec<(PathBuf, State)>> {
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(home.containers()) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e),
    };
    for e in entries {
        let dir = e?.path();
        if let Ok(s) = State::load(&dir) {
            out.push((dir, s));
        }
    }
    out.sort_by_key(|(_, s)| (s.created, s.id.clone()));
    Ok(out)
}

/// The container named `key`: a full name, a full id, or an unambiguous
/// prefix of an id.
pub fn find(home: &Home, key: &str) -> Result<(PathBuf, State), LookupError> {
    let all = list(home)?;
    if let Some(hit) = all.iter().find(|(_, s)| s.name == key || s.id == key) {
        return Ok(hit.clone());
    }
    let mut prefixed = all.into_iter().filter(|(_, s)| !key.is_empty() && s.id.starts_with(key));
    match (prefixed.next(), prefixed.next()) {
        (Some(hit), None) => Ok(hit),
        (Some(_), Some(_)) => Err(LookupError::Ambiguous(key.into())),
        _ => Err(LookupError::NotFound(key.into())),
    }
}

/// A new random container id (12 hex digits).
pub fn new_id() -> String {
    let mut b = [0u8; 6];
    // SAFETY: getrandom writes at most b.len() bytes into b.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != b.len() as isize {
        // Fall back on time and pid: ids need to be unique, not secret.
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        b.copy_from_slice(&((t as u64) ^ u64::from(std::process::id()) << 40).to_le_bytes()[..6]);
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Which output stream a log record came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout = 1,
    Stderr = 2,
}

/// One record of `container.log`: a byte for the stream (1 stdout, 2
/// stderr), the length as 4 little-endian bytes, then the data. Records
/// keep the order in which output arrived across both streams.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogRecord {
    pub stream: Stream,
    pub data: Vec<u8>,
}

/// Most bytes of one log record.
pub const MAX_RECORD: usize = 1 << 20;

/// Appends records to a container's log, up to `limit` bytes in all; past
/// it, output is dropped and one notice is written on stderr's stream.
#[derive(Debug)]
pub struct LogWriter {
    file: File,
    written: u64,
    limit: u64,
    truncated: bool,
}

impl LogWriter {
    /// Opens (appends to) the log at `path`.
    pub fn open(path: &Path, limit: u64) -> std::io::Result<Self> {
        let file = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
        let written = file.metadata()?.len();
        Ok(Self { file, written, limit, truncated: false })
    }

    /// Appends one record (split if longer than [`MAX_RECORD`]).
    pub fn write(&mut self, stream: Stream, data: &[u8]) -> std::io::Result<()> {
        for chunk in data.chunks(MAX_RECORD) {
            let size = 5 + chunk.len() as u64;
            if self.written + size > self.limit {
                if !self.truncated {
                    self.truncated = true;
                    let note = b"[vmrun: log limit reached, further output dropped]\n";
                    self.raw(Stream::Stderr, note)?;
                }
                return Ok(());
            }
            self.raw(stream, chunk)?;
        }
        Ok(())
    }

    fn raw(&mut self, stream: Stream, data: &[u8]) -> std::io::Result<()> {
        let mut rec = Vec::with_capacity(5 + data.len());
        rec.push(stream as u8);
        rec.extend_from_slice(&(data.len() as u32).to_le_bytes());
        rec.extend_from_slice(data);
        self.file.write_all(&rec)?;
        self.written += rec.len() as u64;
        Ok(())
    }
}

/// Reads records from a container's log; stops (returns `None`) at the
/// end of what is written so far, so that a follower can retry later.
#[derive(Debug)]
pub struct LogReader {
    file: File,
    pending: Vec<u8>,
}

impl LogReader {
    pub fn open(path: &Path) -> std::io::Result<Self> {
        Ok(Self { file: File::open(path)?, pending: Vec::new() })
    }

    /// The next complete record, or `None` for now. A record that claims
    /// more than [`MAX_RECORD`] bytes or a bad stream byte is an error: the
    /// log is damaged.
    pub fn next_record(&mut self) -> std::io::Result<Option<LogRecord>> {
        loop {
            if self.pending.len() >= 5 {
                let stream = match self.pending[0] {
                    1 => Stream::Stdout,
                    2 => Stream::Stderr,
                    b => return Err(damaged(format!("bad stream byte {b}"))),
                };
                let len = u32::from_le_bytes([self.pending[1], self.pending[2], self.pending[3], self.pending[4]]) as usize;
                if len > MAX_RECORD {
                    return Err(damaged(format!("record of {len} bytes")));
                }
                if self.pending.len() >= 5 + len {
                    let data = self.pending[5..5 + len].to_vec();
                    self.pending.drain(..5 + len);
                    return Ok(Some(LogRecord { stream, data }));
                }
            }
            let mut buf = [0u8; 64 * 1024];
            let n = self.file.read(&mut buf)?;
            if n == 0 {
                return Ok(None);
            }
            self.pending.extend_from_slice(&buf[..n]);
        }
    }
}

fn damaged(what: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, format!("the container log is damaged: {what}"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn state(id: &str, name: &str, created: u64) -> State {
        State { created, status: Status::Running, owner: ProcessRef::current(), ..State::new(id, name, "busybox", "sh") }
    }

    #[test]
    fn this_process_is_alive_and_a_dead_one_is_not() {
        let me = ProcessRef::current().unwrap();
        assert!(me.alive());
        assert!(!ProcessRef { start_time: me.start_time + 1, ..me }.alive(), "same pid, other start: not the same process");
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        assert!(ProcessRef::of(pid).is_none());
    }

    #[test]
    fn an_owner_that_died_means_exited() {
        let mut s = state("aaaaaaaaaaaa", "a", 1);
        assert_eq!(s.effective_status(), Status::Running);
        s.owner = Some(ProcessRef { pid: u32::MAX - 1, start_time: 1 });
        assert_eq!(s.effective_status(), Status::Exited);
        assert!(s.lost());
        assert!(s.describe(10).contains("unknown"));
        s.status = Status::Exited;
        s.exit_code = Some(3);
        s.finished = Some(5);
        assert_eq!(s.describe(125), "Exited (3) 2 minutes ago");
    }

    #[test]
    fn find_by_name_id_and_prefix() {
        let root = tempfile::tempdir().unwrap();
        let home = Home::at(root.path());
        for (id, name, t) in [("abc111111111", "web", 1), ("abc222222222", "db", 2), ("def333333333", "x", 3)] {
            let d = home.containers().join(id);
            std::fs::create_dir_all(&d).unwrap();
            state(id, name, t).save(&d).unwrap();
        }
        std::fs::create_dir_all(home.containers().join("half-made")).unwrap();
        assert_eq!(list(&home).unwrap().len(), 3);
        assert_eq!(find(&home, "web").unwrap().1.id, "abc111111111");
        assert_eq!(find(&home, "def").unwrap().1.name, "x");
        assert_eq!(find(&home, "abc2").unwrap().1.name, "db");
        assert!(matches!(find(&home, "abc"), Err(LookupError::Ambiguous(_))));
        assert!(matches!(find(&home, "zzz"), Err(LookupError::NotFound(_))));
        assert!(matches!(find(&home, ""), Err(LookupError::NotFound(_))));
    }

    #[test]
    fn log_records_keep_order_and_respect_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(LOG_FILE);
        let mut w = LogWriter::open(&path, 64).unwrap();
        w.write(Stream::Stdout, b"out1\n").unwrap();
        w.write(Stream::Stderr, b"err1\n").unwrap();
        let mut r = LogReader::open(&path).unwrap();
        assert_eq!(r.next_record().unwrap().unwrap(), LogRecord { stream: Stream::Stdout, data: b"out1\n".to_vec() });
        assert_eq!(r.next_record().unwrap().unwrap().stream, Stream::Stderr);
        assert!(r.next_record().unwrap().is_none(), "nothing more yet");
        w.write(Stream::Stdout, &[b'x'; 100]).unwrap(); // over the limit
        w.write(Stream::Stdout, b"more").unwrap();
        let rec = r.next_record().unwrap().unwrap();
        assert!(String::from_utf8_lossy(&rec.data).contains("log limit"));
        assert!(r.next_record().unwrap().is_none());
    }

    #[test]
    fn a_damaged_log_is_an_error_not_a_huge_allocation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(LOG_FILE);
        std::fs::write(&path, [1u8, 0xff, 0xff, 0xff, 0xff]).unwrap();
        assert!(LogReader::open(&path).unwrap().next_record().is_err());
        std::fs::write(&path, [9u8, 0, 0, 0, 0]).unwrap();
        assert!(LogReader::open(&path).unwrap().next_record().is_err());
    }
}
