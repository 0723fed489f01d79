//! Processes' exits as they begin, from the kernel's per-task statistics
//! (taskstats, over generic netlink).
//!
//! The kernel sends a listener a record for every task as it starts to
//! exit: after its exit status is fixed, before its memory is unmapped,
//! its files closed and its namespaces released. For a short program that
//! teardown is a good part of its run (on hosts that emulate the guest's
//! kernel mode, about a tenth of a warm `vmrun run --rm busybox true`),
//! and for a container's first process nothing after it concerns the host:
//! the kernel kills the rest of its PID namespace. The agent reports such
//! an exit at once ([`crate::server`]) and reaps the process when its
//! `SIGCHLD` comes, as ever.
//!
//! A record is a process's exit only when its task was the last of the
//! process and the process never had another task that exited before it
//! (the kernel adds a whole-process aggregate to the record once a process
//! had several): [`Ended::whole_process`]. For a process of one task the
//! status is then exactly what `waitpid` will say. (The kernel marks an
//! earlier exit of another task by allocating the process's statistics;
//! should that allocation fail, a process of several tasks could pass for
//! one, and the reap finds the difference.)

use std::os::fd::{AsRawFd, RawFd};

use netlink_packet_core::{
    DecodeError, Emitable, NetlinkHeader, NetlinkMessage, NetlinkPayload, NlasIterator, ParseableParametrized, NLM_F_ACK,
    NLM_F_REQUEST,
};
use netlink_packet_generic::ctrl::nlas::GenlCtrlAttrs;
use netlink_packet_generic::ctrl::{GenlCtrl, GenlCtrlCmd};
use netlink_packet_generic::{GenlFamily, GenlHeader, GenlMessage};
use netlink_sys::{protocols::NETLINK_GENERIC, Socket, SocketAddr};

/// The generic netlink family (`linux/taskstats.h`).
const FAMILY_NAME: &str = "TASKSTATS";
const VERSION: u8 = 1;
const CMD_GET: u8 = 1;
const CMD_NEW: u8 = 2;
/// Attributes of a `TASKSTATS_CMD_NEW` record.
const TYPE_PID: u16 = 1;
const TYPE_STATS: u16 = 3;
const TYPE_AGGR_PID: u16 = 4;
const TYPE_AGGR_TGID: u16 = 5;
/// The `TASKSTATS_CMD_GET` attribute that makes the socket a listener for
/// the exits on a list of CPUs.
const CMD_ATTR_REGISTER_CPUMASK: u16 = 3;
/// `struct taskstats`: `ac_exitcode` (u32) at 4, `ac_flag` (u8) at 8.
const EXITCODE_AT: usize = 4;
const FLAG_AT: usize = 8;
/// `ac_flag`: the task was the last of its process (`linux/acct.h`).
const AGROUP: u8 = 0x20;

/// Why exits cannot be watched.
#[derive(Debug, thiserror::Error)]
pub enum ExitWatchError {
    #[error("generic netlink socket: {0}")]
    Socket(#[source] std::io::Error),
    #[error("looking up the kernel's {FAMILY_NAME} family (a kernel without CONFIG_TASKSTATS?): {0}")]
    Family(String),
    #[error("registering for exits on CPUs {cpus}: {why}")]
    Register { cpus: String, why: String },
}

/// A task that began to exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ended {
    /// Its id (a process's id for a process's only or main task).
    pub pid: i32,
    /// Its exit status, as `waitpid` encodes it.
    pub status: i32,
    /// Its process ends with it: it was the process's last task, and no
    /// other task of the process exited before it.
    pub whole_process: bool,
}

/// What the agent sends and the kernel answers in the family.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Taskstats {
    /// Listen to the exits on these CPUs (a list such as `0-3`).
    Register(String),
    /// One exiting task's record.
    New(Option<Ended>),
    /// Another command (none is expected).
    Other(u8),
}

impl GenlFamily for Taskstats {
    fn family_name() -> &'static str {
        FAMILY_NAME
    }

    fn command(&self) -> u8 {
        match self {
            Self::Register(_) => CMD_GET,
            Self::New(_) => CMD_NEW,
            Self::Other(c) => *c,
        }
    }

    fn version(&self) -> u8 {
        VERSION
    }
}

impl Emitable for Taskstats {
    fn buffer_len(&self) -> usize {
        match self {
            // One attribute: its 4-byte header and the NUL-terminated list,
            // padded to 4 bytes.
            Self::Register(cpus) => 4 + (cpus.len() + 1).next_multiple_of(4),
            _ => 0,
        }
    }

    fn emit(&self, buffer: &mut [u8]) {
        if let Self::Register(cpus) = self {
            let len = 4 + cpus.len() + 1;
            buffer[..self.buffer_len()].fill(0);
            buffer[0..2].copy_from_slice(&(len as u16).to_ne_bytes());
            buffer[2..4].copy_from_slice(&CMD_ATTR_REGISTER_CPUMASK.to_ne_bytes());
            buffer[4..4 + cpus.len()].copy_from_slice(cpus.as_bytes());
        }
    }
}

impl ParseableParametrized<[u8], GenlHeader> for Taskstats {
    fn parse_with_param(buf: &[u8], header: GenlHeader) -> Result<Self, DecodeError> {
        if header.cmd != CMD_NEW {
            return Ok(Self::Other(header.cmd));
        }
        Ok(Self::New(parse_record(buf)?))
    }
}

/// A `TASKSTATS_CMD_NEW` record's attributes: the task's id and statistics
/// (nested in `AGGR_PID`), and for a process that had several tasks, when
/// its last one exits, the whole process's (`AGGR_TGID`). None when the
/// record carries no task.
fn parse_record(buf: &[u8]) -> Result<Option<Ended>, DecodeError> {
    let (mut pid, mut stats, mut aggregate) = (None, None, false);
    for nla in NlasIterator::new(buf) {
        let nla = nla?;
        match nla.kind() {
            TYPE_AGGR_PID => {
                for inner in NlasIterator::new(nla.value()) {
                    let inner = inner?;
                    let v = inner.value();
                    match inner.kind() {
                        TYPE_PID => pid = Some(u32_at(v, 0).ok_or("a short task id")?),
                        TYPE_STATS => {
                            let code = u32_at(v, EXITCODE_AT).ok_or("short statistics")?;
                            let flag = *v.get(FLAG_AT).ok_or("short statistics")?;
                            stats = Some((code, flag));
                        }
                        _ => {}
                    }
                }
            }
            TYPE_AGGR_TGID => aggregate = true,
            _ => {}
        }
    }
    let (Some(pid), Some((code, flag))) = (pid, stats) else { return Ok(None) };
    let Ok(pid) = i32::try_from(pid) else { return Ok(None) };
    // The kernel's exit code is the status `waitpid` reports: exit codes
    // and signals fit in 16 bits.
    let status = (code & 0xffff) as i32;
    Ok(Some(Ended { pid, status, whole_process: flag & AGROUP != 0 && !aggregate }))
}

fn u32_at(v: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(v.get(at..at + 4)?.try_into().ok()?))
}

/// The exits of one datagram from the socket (a datagram holds whole
/// messages); what is not an exit record, or does not parse, is skipped.
pub fn parse_datagram(data: &[u8], family: u16) -> Vec<Ended> {
    let mut out = Vec::new();
    for m in messages(data) {
        let Ok(m) = m else { break };
        if u16::from_ne_bytes([m[4], m[5]]) != family {
            continue;
        }
        if let Ok(m) = NetlinkMessage::<GenlMessage<Taskstats>>::deserialize(m) {
            if let NetlinkPayload::InnerMessage(g) = m.payload {
                if let Taskstats::New(Some(e)) = g.payload {
                    out.push(e);
                }
            }
        }
    }
    out
}

/// The size of a netlink message header (`struct nlmsghdr`).
const NLMSG_HEADER: usize = 16;

/// The netlink messages of one datagram, each whole (as long as its
/// header says, at least a header), the next at a 4-byte boundary; a
/// length that does not fit ends the walk with an error.
fn messages(mut data: &[u8]) -> impl Iterator<Item = Result<&[u8], String>> {
    std::iter::from_fn(move || {
        if data.len() < NLMSG_HEADER {
            return None;
        }
        let len = u32::from_ne_bytes([data[0], data[1], data[2], data[3]]) as usize;
        if len < NLMSG_HEADER || len > data.len() {
            let left = data.len();
            data = &[];
            return Some(Err(format!("a message of {len} bytes where {left} are left")));
        }
        let m = &data[..len];
        data = &data[len.next_multiple_of(4).min(data.len())..];
        Some(Ok(m))
    })
}

/// A socket the kernel sends every exit on the guest's CPUs to.
#[derive(Debug)]
pub struct ExitWatch {
    socket: Socket,
    family: u16,
}

impl ExitWatch {
    /// Looks the family up and registers for the exits on `cpus` (a CPU
    /// list: `0-3`). The socket is non-blocking.
    pub fn open(cpus: &str) -> Result<Self, ExitWatchError> {
        let mut socket = Socket::new(NETLINK_GENERIC).map_err(ExitWatchError::Socket)?;
        socket.bind_auto().map_err(ExitWatchError::Socket)?;
        socket.connect(&SocketAddr::new(0, 0)).map_err(ExitWatchError::Socket)?;
        let mut buf = vec![0u8; 8192];

        let mut lookup = GenlMessage::from_payload(GenlCtrl { cmd: GenlCtrlCmd::GetFamily, nlas: vec![GenlCtrlAttrs::FamilyName(FAMILY_NAME.into())] });
        lookup.finalize();
        let family = request(&socket, lookup, &mut buf)
            .map_err(ExitWatchError::Family)?
            .and_then(|answer| {
                answer.payload.nlas.iter().find_map(|a| match a {
                    GenlCtrlAttrs::FamilyId(id) => Some(*id),
                    _ => None,
                })
            })
            .ok_or_else(|| ExitWatchError::Family("the answer names no family id".into()))?;

        let mut register = GenlMessage::from_payload(Taskstats::Register(cpus.to_string()));
        register.set_resolved_family_id(family);
        register.finalize();
        request(&socket, register, &mut buf).map_err(|why| ExitWatchError::Register { cpus: cpus.into(), why })?;
        socket.set_non_blocking(true).map_err(ExitWatchError::Socket)?;
        Ok(Self { socket, family })
    }

    /// The exits the kernel has sent since the last call, without waiting.
    pub fn read(&self, buf: &mut [u8]) -> Vec<Ended> {
        let mut out = Vec::new();
        loop {
            match self.socket.recv(&mut &mut buf[..], 0) {
                Ok(n) => out.extend(parse_datagram(&buf[..n.min(buf.len())], self.family)),
                // Records lost to a full receive queue (ENOBUFS) are
                // exits that `SIGCHLD` reports instead.
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) || e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            }
        }
        out
    }
}

impl AsRawFd for ExitWatch {
    fn as_raw_fd(&self) -> RawFd {
        self.socket.as_raw_fd()
    }
}

/// Sends `msg` (asking for an acknowledgement) and reads the answer: the
/// answer's message when it has one, none for a bare acknowledgement.
fn request<F>(socket: &Socket, msg: GenlMessage<F>, buf: &mut [u8]) -> Result<Option<GenlMessage<F>>, String>
where
    F: GenlFamily + Emitable + ParseableParametrized<[u8], GenlHeader> + std::fmt::Debug,
{
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_ACK;
    let mut nl = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(msg));
    nl.finalize();
    let mut out = vec![0u8; nl.buffer_len()];
    nl.serialize(&mut out);
    socket.send(&out, 0).map_err(|e| format!("send: {e}"))?;
    let mut answer = None;
    // The answer, then the acknowledgement (or only an error).
    loop {
        let n = socket.recv(&mut &mut buf[..], 0).map_err(|e| format!("receive: {e}"))?;
        for m in messages(&buf[..n.min(buf.len())]) {
            let m = m.and_then(|m| NetlinkMessage::<GenlMessage<F>>::deserialize(m).map_err(|e| e.to_string()));
            match m.map_err(|e| format!("the kernel's answer: {e}"))?.payload {
                NetlinkPayload::InnerMessage(g) => answer = Some(g),
                NetlinkPayload::Error(e) => {
                    return match e.code {
                        None => Ok(answer),
                        Some(code) => Err(std::io::Error::from_raw_os_error(-code.get()).to_string()),
                    }
                }
                _ => {}
            }
        }
    }
}

/// The guest's possible CPUs, as a CPU list (`0-3`), from sysfs; `0` when
/// it cannot be read.
pub fn possible_cpus() -> String {
    std::fs::read_to_string("/sys/devices/system/cpu/possible").map(|s| s.trim().to_string()).ok().filter(|s| !s.is_empty()).unwrap_or_else(|| "0".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    const FAMILY: u16 = 0x17;

    fn nla(kind: u16, value: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend(((4 + value.len()) as u16).to_ne_bytes());
        v.extend(kind.to_ne_bytes());
        v.extend(value);
        v.resize(v.len().next_multiple_of(4), 0);
        v
    }

    fn stats(code: u32, flag: u8) -> Vec<u8> {
        let mut s = vec![0u8; 328];
        s[0..2].copy_from_slice(&13u16.to_ne_bytes());
        s[EXITCODE_AT..EXITCODE_AT + 4].copy_from_slice(&code.to_ne_bytes());
        s[FLAG_AT] = flag;
        s
    }

    /// A `TASKSTATS_CMD_NEW` message as the kernel builds it.
    fn record(pid: u32, code: u32, flag: u8, tgid_aggregate: bool) -> Vec<u8> {
        let mut attrs = nla(TYPE_AGGR_PID, &[nla(TYPE_PID, &pid.to_ne_bytes()), nla(TYPE_STATS, &stats(code, flag))].concat());
        if tgid_aggregate {
            attrs.extend(nla(TYPE_AGGR_TGID, &[nla(2, &pid.to_ne_bytes()), nla(TYPE_STATS, &stats(0, 0))].concat()));
        }
        let mut m = Vec::new();
        m.extend(((16 + 4 + attrs.len()) as u32).to_ne_bytes());
        m.extend(FAMILY.to_ne_bytes());
        m.extend([0u8; 10]);
        m.extend([CMD_NEW, VERSION, 0, 0]);
        m.extend(attrs);
        m
    }

    #[test]
    fn a_single_task_process_ending_is_a_whole_process_with_its_wait_status() {
        // exit(3): status 3 << 8; the last task of its process.
        let got = parse_datagram(&record(42, 3 << 8, AGROUP, false), FAMILY);
        assert_eq!(got, vec![Ended { pid: 42, status: 3 << 8, whole_process: true }]);
        // Killed by SIGKILL.
        let got = parse_datagram(&record(7, 9, AGROUP | 0x10, false), FAMILY);
        assert_eq!(got, vec![Ended { pid: 7, status: 9, whole_process: true }]);
    }

    #[test]
    fn a_task_that_leaves_others_or_ends_a_process_of_several_is_not_a_whole_process() {
        assert!(!parse_datagram(&record(42, 0, 0, false), FAMILY)[0].whole_process);
        assert!(!parse_datagram(&record(42, 0, AGROUP, true), FAMILY)[0].whole_process);
    }

    #[test]
    fn other_families_messages_and_garbage_give_no_exit() {
        assert!(parse_datagram(&record(42, 0, AGROUP, false), FAMILY + 1).is_empty());
        let mut short = record(42, 0, AGROUP, false);
        short.truncate(40);
        assert!(parse_datagram(&short, FAMILY).is_empty());
        assert!(parse_datagram(&[0xff; 64], FAMILY).is_empty());
        assert!(parse_datagram(&[], FAMILY).is_empty());
    }

    #[test]
    fn a_datagram_of_two_records_gives_both() {
        let two = [record(1, 0, AGROUP, false), record(2, 1 << 8, AGROUP, false)].concat();
        let got: Vec<i32> = parse_datagram(&two, FAMILY).iter().map(|e| e.pid).collect();
        assert_eq!(got, vec![1, 2]);
    }

    /// Against this host's kernel (as root): a child's exit arrives as a
    /// whole process's, with the status `waitpid` then gives.
    #[test]
    fn a_childs_exit_arrives_as_it_begins() {
        // SAFETY: geteuid cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: registering for exits needs root");
            return;
        }
        let w = match ExitWatch::open(&possible_cpus()) {
            Ok(w) => w,
            // The guest kernel has it (the guest tests go through it);
            // a host's may not.
            Err(e @ ExitWatchError::Family(_)) => return eprintln!("skipped: {e}"),
            Err(e) => panic!("{e}"),
        };
        let mut child = std::process::Command::new("/bin/sh").args(["-c", "exit 3"]).spawn().unwrap();
        let pid = child.id() as i32;
        let status = child.wait().unwrap();
        assert_eq!(status.code(), Some(3));
        let mut buf = vec![0u8; 65536];
        let mut poll = libc::pollfd { fd: w.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let found = loop {
            if let Some(e) = w.read(&mut buf).into_iter().find(|e| e.pid == pid) {
                break e;
            }
            assert!(std::time::Instant::now() < deadline, "no exit record for pid {pid}");
            // SAFETY: poll of one pollfd we own.
            unsafe { libc::poll(&mut poll, 1, 100) };
        };
        assert_eq!(found, Ended { pid, status: 3 << 8, whole_process: true });
    }

    #[test]
    fn the_registration_is_one_nul_terminated_padded_attribute() {
        let r = Taskstats::Register("0-3".into());
        let mut buf = vec![0xaa; r.buffer_len()];
        r.emit(&mut buf);
        assert_eq!(buf, [8, 0, 3, 0, b'0', b'-', b'3', 0]);
    }
}
