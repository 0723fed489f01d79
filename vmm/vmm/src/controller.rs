//! The VMM's event loop: the end of the VM (a vCPU, the i8042 reset, a
//! signal), console input, the virtio devices' events, and the control
//! socket through which another process pauses, resumes, snapshots or stops
//! the VM.
//!
//! The protocol's types and its client are the VMM API's
//! ([`vmrun_vmm_api::control`]): one JSON request per connection, in an
//! envelope carrying the protocol's version (a request of another version
//! is refused), one JSON answer. A failed request's answer carries the
//! [`Error`]'s message.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use kvm_bindings::{kvm_irqchip, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE};
use kvm_ioctls::VmFd;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::error::{Error, Result};
use crate::host_compat::HostCompat;
use crate::snapshot::{self, DeviceKind, DeviceSnapshot, VmState};
use crate::stats::Stats;
use crate::vcpu::VcpuControl;
use crate::virtio_devices::DeviceHandle;
use crate::vm::ExitReason;
use vmrun_devices::legacy::{Cmos, SerialConsole};
use vmrun_devices::virtio::handler::VirtioEventHandler;
use vmrun_devices::virtio::INT_CONFIG;

pub use vmrun_vmm_api::control::{Envelope, Request, Response, VcpuStats, VmmStats, CONTROL_VERSION};

/// How long the vCPUs get to pause.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(10);

/// The listening control socket; the file is removed when it is dropped.
#[derive(Debug)]
pub struct ControlSocket {
    listener: UnixListener,
    path: PathBuf,
}

impl ControlSocket {
    /// Listens at `path` (replacing a stale socket file).
    pub fn bind(path: &Path) -> Result<Self> {
        if std::fs::symlink_metadata(path).is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type())) {
            let _ = std::fs::remove_file(path);
        }
        let listener =
            UnixListener::bind(path).map_err(|source| Error::ControlSocket { path: path.to_path_buf(), source })?;
        listener.set_nonblocking(true)?;
        Ok(Self { listener, path: path.to_path_buf() })
    }
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Everything needed to take a snapshot of the running VM.
pub struct SnapshotSource<'a> {
    pub vm: &'a VmFd,
    pub mem: &'a GuestMemoryMmap,
    pub compat: HostCompat,
    pub mem_mib: u32,
    pub serial: Arc<Mutex<SerialConsole>>,
    pub cmos: Arc<Mutex<Cmos>>,
    pub devices: Vec<DeviceHandle>,
    pub control: Arc<VcpuControl>,
    pub vcpu_count: usize,
    /// Kicks every vCPU thread out of KVM_RUN.
    pub kick: Box<dyn Fn() + 'a>,
    /// The vCPUs' KVM statistics, once they are open.
    pub stats: Arc<OnceLock<Vec<Stats>>>,
    /// Where guest memory is in the VMM's address space.
    pub guest_ranges: Vec<(u64, u64)>,
    /// The guest profile, if one is taken: each `stats` request ends one
    /// of its epochs.
    pub profiler: Option<Arc<crate::profile::Profiler>>,
}

impl std::fmt::Debug for SnapshotSource<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotSource").field("vcpus", &self.vcpu_count).finish()
    }
}

impl SnapshotSource<'_> {
    fn pause(&self, save: bool) -> Result<()> {
        self.control.request_pause(save);
        if self.control.wait_paused(self.vcpu_count, PAUSE_TIMEOUT, &self.kick) {
            Ok(())
        } else {
            self.control.resume();
            Err(Error::PauseTimeout(PAUSE_TIMEOUT))
        }
    }

    /// Pauses the vCPUs, saves the VM into `dir`, and resumes if asked.
    pub fn snapshot(&self, dir: &Path, resume: bool) -> Result<()> {
        self.pause(true)?;
        let result = self.save(dir);
        if resume || result.is_err() {
            self.control.resume();
        }
        result
    }

    /// Puts `file` into disk slot `disk` (the VM's disks in order, 0 the
    /// guest's `/dev/vda`), or empties it (`None`), and raises the slot's
    /// configuration-change interrupt so that the guest reads the new
    /// size. An image goes only into an empty slot: one the guest may
    /// still use is not swapped under it.
    pub fn replace_disk(&self, disk: usize, file: Option<File>, read_only: bool) -> Result<()> {
        let slot_err = |reason: &str| Error::DiskSlot { disk, reason: reason.to_string() };
        let handle = self
            .devices
            .iter()
            .filter(|d| matches!(d.kind, DeviceKind::Block { .. }))
            .nth(disk)
            .ok_or_else(|| slot_err(&format!("the VM has {} disk slots", self.disk_count())))?;
        let mut t = handle.transport.lock().unwrap_or_else(|e| e.into_inner());
        let block = t.device_mut().as_block_mut().ok_or_else(|| slot_err("not a disk"))?;
        if file.is_some() && block.capacity() != 0 {
            return Err(slot_err("it holds a disk: detach it first"));
        }
        let sectors = block.replace(file, read_only)?;
        log::info!("disk slot {disk}: {} ({sectors} sectors)", if sectors == 0 { "emptied" } else { "image attached" });
        if t.device().is_active() {
            t.interrupt().trigger(INT_CONFIG);
        }
        Ok(())
    }

    fn disk_count(&self) -> usize {
        self.devices.iter().filter(|d| matches!(d.kind, DeviceKind::Block { .. })).count()
    }

    /// KVM's counters per vCPU and the VMM's resident memory.
    pub fn stats(&self) -> VmmStats {
        let vcpus = self
            .stats
            .get()
            .map(|s| {
                s.iter().map(|v| VcpuStats { insn_emulation: v.read("insn_emulation"), exits: v.read("exits") }).collect()
            })
            .unwrap_or_default();
        let rss = crate::report::resident_kib(&self.guest_ranges);
        VmmStats { vcpus, rss_kib: rss.map(|(total, _)| total), guest_rss_kib: rss.map(|(_, guest)| guest) }
    }

    fn save(&self, dir: &Path) -> Result<()> {
        let vcpus = self.control.take_saved().into_iter().collect::<Result<Vec<_>>>()?;
        if vcpus.len() != self.vcpu_count {
            return Err(Error::VcpusSaved { saved: vcpus.len(), expected: self.vcpu_count });
        }
        let mut irqchips = Vec::new();
        for chip_id in [KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_IRQCHIP_IOAPIC] {
            let mut chip = kvm_irqchip { chip_id, ..Default::default() };
            self.vm.get_irqchip(&mut chip).map_err(Error::kvm("KVM_GET_IRQCHIP"))?;
            irqchips.push(chip);
        }
        let pit = self.vm.get_pit2().map_err(Error::kvm("KVM_GET_PIT2"))?;
        let clock = self.vm.get_clock().map_err(Error::kvm("KVM_GET_CLOCK"))?;
        let serial = self.serial.lock().unwrap_or_else(|e| e.into_inner()).save();
        let cmos = self.cmos.lock().unwrap_or_else(|e| e.into_inner()).save();
        let devices = self
            .devices
            .iter()
            .map(|d| {
                let mut kind = d.kind.clone();
                // A disk's size is its image's now (one may have been
                // attached or detached since the VM started).
                if let DeviceKind::Block { capacity, .. } = &mut kind {
                    let mut t = d.transport.lock().unwrap_or_else(|e| e.into_inner());
                    *capacity = t.device_mut().as_block_mut().map(|b| b.capacity());
                }
                DeviceSnapshot { kind, transport: d.save() }
            })
            .collect();
        let (format, version, vmrun_version) = VmState::header();
        let state = VmState {
            format,
            version,
            vmrun_version,
            host_compat: self.compat.enabled(),
            mem_mib: self.mem_mib,
            vcpus,
            irqchips,
            pit,
            clock,
            serial,
            cmos,
            devices,
        };
        snapshot::save(dir, &state, self.mem).map_err(|source| Error::SnapshotSave { dir: dir.to_path_buf(), source })
    }
}

/// The event loop's own subscriber: the end of the VM, console input and
/// the control socket.
pub struct Controller {
    vcpu_exit: Arc<EventFd>,
    vcpu_exit_reason: Arc<Mutex<Option<ExitReason>>>,
    reset_evt: EventFd,
    signal_fd: File,
    stdin: bool,
    serial: Arc<Mutex<SerialConsole>>,
    control: Option<ControlSocket>,
    outcome: Option<ExitReason>,
    /// Control requests accepted but not yet answered (they need the
    /// snapshot source, which the event loop holds).
    pending: Vec<UnixStream>,
}

impl std::fmt::Debug for Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Controller").field("outcome", &self.outcome).finish()
    }
}

const STDIN_FD: i32 = libc::STDIN_FILENO;

impl Controller {
    /// A controller for one VM.
    pub fn new(
        vcpu_exit: Arc<EventFd>,
        vcpu_exit_reason: Arc<Mutex<Option<ExitReason>>>,
        reset_evt: EventFd,
        signal_fd: File,
        stdin: bool,
        serial: Arc<Mutex<SerialConsole>>,
        control: Option<ControlSocket>,
    ) -> Self {
        Self { vcpu_exit, vcpu_exit_reason, reset_evt, signal_fd, stdin, serial, control, outcome: None, pending: Vec::new() }
    }

    /// How the VM ended, once it has.
    pub fn outcome(&mut self) -> Option<ExitReason> {
        self.outcome.take()
    }

    fn answer(&mut self, source: &SnapshotSource<'_>) {
        for stream in std::mem::take(&mut self.pending) {
            let _ = stream.set_nonblocking(false);
            let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
            let start = Instant::now();
            let mut stats = None;
            let result = read_request(&stream).and_then(|(request, mut fds)| match request {
                Request::Ping => Ok(()),
                Request::Pause => source.pause(false),
                Request::Resume => {
                    source.control.resume();
                    Ok(())
                }
                Request::Snapshot { dir, resume } => source.snapshot(&dir, resume),
                Request::Stop => {
                    self.outcome.get_or_insert(ExitReason::Stopped);
                    Ok(())
                }
                Request::Stats => {
                    stats = Some(source.stats());
                    if let Some(p) = &source.profiler {
                        p.next_epoch();
                    }
                    Ok(())
                }
                Request::AttachDisk { disk, read_only } => match (fds.pop(), fds.is_empty()) {
                    (Some(fd), true) => source.replace_disk(disk, Some(File::from(fd)), read_only),
                    _ => Err(Error::DiskSlot { disk, reason: "attach_disk needs exactly one descriptor, its image's".into() }),
                },
                Request::DetachDisk { disk } => source.replace_disk(disk, None, false),
            });
            let response = respond(result, start.elapsed(), stats);
            if let Ok(mut bytes) = serde_json::to_vec(&response) {
                bytes.push(b'\n');
                let _ = (&stream).write_all(&bytes);
            }
        }
    }
}

/// Reads one request line from `stream`, with the descriptors that came
/// with it: refused if it is not of this VMM's protocol version
/// ([`CONTROL_VERSION`]) or not a request. Descriptors a request does not
/// use are closed when they are dropped.
fn read_request(stream: &UnixStream) -> Result<(Request, Vec<OwnedFd>)> {
    let (line, fds) = vmrun_vmm_api::read_line_with_fds(stream).map_err(Error::ControlRead)?;
    Ok((Envelope::parse(&line)?, fds))
}

/// The answer to a request that took `took`: on failure, the error's
/// message (the protocol carries text).
fn respond(result: Result<()>, took: Duration, stats: Option<VmmStats>) -> Response {
    let ms = Some(took.as_secs_f64() * 1000.0);
    match result {
        Ok(()) => Response { ok: true, error: None, ms, stats },
        Err(e) => {
            log::warn!("control request failed: {e}");
            Response { ok: false, error: Some(e.to_string()), ms, stats: None }
        }
    }
}

impl MutEventSubscriber for Controller {
    fn init(&mut self, ops: &mut EventOps) {
        let mut fds = vec![
            (self.vcpu_exit.as_raw_fd(), "vCPU exit"),
            (self.reset_evt.as_raw_fd(), "reset"),
            (self.signal_fd.as_raw_fd(), "signals"),
        ];
        if let Some(c) = &self.control {
            fds.push((c.listener.as_raw_fd(), "control socket"));
        }
        for (fd, what) in fds {
            if let Err(e) = ops.add(Events::new_raw(fd, EventSet::IN)) {
                log::error!("event loop: cannot watch {what}: {e:?}");
                self.outcome.get_or_insert(ExitReason::Crash(format!("event loop setup: {e:?}")));
            }
        }
        // Standard input may be a file or /dev/null, which epoll refuses:
        // then the guest simply gets no input.
        if self.stdin && ops.add(Events::new_raw(STDIN_FD, EventSet::IN)).is_err() {
            log::debug!("standard input cannot be watched; the console gets no input");
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.vcpu_exit.as_raw_fd() {
            let _ = self.vcpu_exit.read();
            let reason = self.vcpu_exit_reason.lock().unwrap_or_else(|e| e.into_inner()).clone();
            self.outcome.get_or_insert(reason.unwrap_or(ExitReason::Crash("a vCPU stopped".into())));
        } else if fd == self.reset_evt.as_raw_fd() {
            let _ = self.reset_evt.read();
            self.outcome.get_or_insert(ExitReason::GuestReset);
        } else if fd == self.signal_fd.as_raw_fd() {
            let mut info = [0u8; std::mem::size_of::<libc::signalfd_siginfo>()];
            if self.signal_fd.read(&mut info).is_ok() {
                let signo = u32::from_ne_bytes([info[0], info[1], info[2], info[3]]);
                self.outcome.get_or_insert(ExitReason::Signal(signo as i32));
            }
        } else if self.control.as_ref().is_some_and(|c| c.listener.as_raw_fd() == fd) {
            if let Some(c) = &self.control {
                while let Ok((stream, _)) = c.listener.accept() {
                    self.pending.push(stream);
                }
            }
        } else if fd == STDIN_FD {
            let mut buf = [0u8; 1024];
            // SAFETY: reads into a local buffer of the given length.
            let n = unsafe { libc::read(STDIN_FD, buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                let _ = ops.remove(Events::new_raw(STDIN_FD, EventSet::IN));
                return;
            }
            let n = n as usize;
            let mut serial = self.serial.lock().unwrap_or_else(|e| e.into_inner());
            let taken = serial.queue_input(&buf[..n]);
            if taken < n {
                log::warn!("console input: the guest is not reading; {} bytes dropped", n - taken);
            }
        }
    }
}

/// Any subscriber of the VMM's event loop.
type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// Runs the event loop until the controller has an outcome. `ready` runs
/// once the loop is set up (its epoll instance made, every subscriber
/// registered), right before its first turn: the VMM installs its seccomp
/// filter there and lets the vCPUs go.
pub fn event_loop(
    controller: Arc<Mutex<Controller>>,
    devices: Vec<VirtioEventHandler>,
    source: &SnapshotSource<'_>,
    ready: impl FnOnce() -> Result<()>,
) -> Result<()> {
    let mut manager: EventManager<Subscriber> = EventManager::new().map_err(|e| Error::EventLoop(format!("{e:?}")))?;
    manager.add_subscriber(controller.clone());
    for d in devices {
        manager.add_subscriber(Arc::new(Mutex::new(d)));
    }
    ready()?;
    loop {
        {
            let mut c = controller.lock().unwrap_or_else(|e| e.into_inner());
            if !c.pending.is_empty() {
                c.answer(source);
            }
            if c.outcome.is_some() {
                return Ok(());
            }
        }
        manager.run().map_err(|e| Error::EventLoop(format!("{e:?}")))?;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// The request the VMM reads from the line `line`.
    fn read(line: &str) -> Result<Request> {
        let (client, server) = UnixStream::pair().unwrap();
        (&client).write_all(line.as_bytes()).unwrap();
        read_request(&server).map(|(r, _)| r)
    }

    #[test]
    fn a_request_of_the_current_version_is_served() {
        let line = format!("{}\n", serde_json::to_string(&Envelope::new(Request::Pause)).unwrap());
        assert_eq!(read(&line).unwrap(), Request::Pause);
        let response = respond(Ok(()), Duration::from_millis(2), None);
        assert!(response.ok && response.error.is_none(), "{response:?}");
        assert_eq!(response.ms, Some(2.0));
    }

    #[test]
    fn a_request_of_another_version_is_refused_with_both_versions() {
        let other = CONTROL_VERSION + 1;
        let e = read(&format!("{{\"version\":{other},\"request\":{{\"op\":\"stop\"}}}}\n")).unwrap_err();
        assert!(
            matches!(&e, Error::ControlRequest(vmrun_vmm_api::RequestError::Version { found, supported })
                if *found == other && *supported == CONTROL_VERSION),
            "{e}"
        );
        let response = respond(Err(e), Duration::ZERO, None);
        let message = response.error.unwrap();
        assert!(!response.ok);
        assert!(message.contains(&format!("version {other}")), "{message}");
        assert!(message.contains(&format!("speaks version {CONTROL_VERSION}")), "{message}");
        // Nor is a request without a version, or an unknown one.
        assert!(matches!(read("{\"op\":\"stop\"}\n"), Err(Error::ControlRequest(_))));
        assert!(matches!(read("{\"version\":1,\"request\":{\"op\":\"eject\"}}\n"), Err(Error::ControlRequest(_))));
    }

    #[test]
    fn a_failure_is_answered_with_its_message() {
        let r = respond(Err(Error::PauseTimeout(PAUSE_TIMEOUT)), Duration::ZERO, None);
        assert!(!r.ok);
        let message = r.error.unwrap();
        assert_eq!(message, "the vCPUs did not pause within 10s (the host may be overloaded): try again");
    }
}
