//! Building a VM from a [`VmConfig`] and running it to its end.
//!
//! The order follows a real boot: KVM and the VM, guest memory, the kernel,
//! initramfs, command line, zero page and MP table, the devices, the vCPUs;
//! then one thread per vCPU and the event loop on this thread, until a vCPU
//! or a device reports the end, or a signal asks for it.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use kvm_bindings::{kvm_pit_config, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VmFd};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::config::{ConsoleOutput, VmConfig};
use crate::console::ConsoleSink;
use crate::error::{Error, Result};
use crate::host_compat::HostCompat;
use crate::report::{resident_kib, BootReport, Timeline};
use crate::stats::{self, Stats};
use crate::vcpu::{supported_cpuid, Vcpu, VcpuShared};
use crate::virtio_devices::VirtioDevices;
use crate::{loader, memory};
use vmrun_devices::virtio::block::Block;
use vmrun_devices::virtio::net::tap::Tap;
use vmrun_devices::virtio::net::Net;
use vmrun_devices::virtio::rng::Rng;
use vmrun_arch::layout::{BOOT_MARKER_ADDR, BOOT_MARKER_SIZE, KVM_TSS_ADDRESS, MAX_VCPUS, SERIAL_IRQ};
use vmrun_arch::mptable;
use vmrun_devices::boot_marker::BootMarker;
use vmrun_devices::legacy::{self, Cmos, SerialConsole, I8042};
use vmrun_devices::virtio::handler::VirtioEventHandler;
use vmrun_devices::{Bus, EventFdTrigger};

/// Largest guest vmrun accepts, in MiB.
pub const MAX_MEM_MIB: u32 = 256 * 1024;

/// How a VM ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest reset the machine through the i8042 (`reboot`, or a panic
    /// with `panic=N`): the normal way for a guest to end.
    GuestReset,
    /// A KVM system event (shutdown or reset) of the given type.
    SystemEvent(u32),
    /// The guest triple-faulted.
    TripleFault,
    /// The VMM received this signal and stopped the guest.
    Signal(i32),
    /// The guest did something the VMM cannot run.
    Crash(String),
}

impl ExitReason {
    /// The VMM's exit status for this end: 0 when the guest ended itself,
    /// 3 when it crashed, 128 + N when signal N stopped it.
    pub fn exit_code(&self) -> i32 {
        match self {
            ExitReason::GuestReset | ExitReason::SystemEvent(_) => 0,
            ExitReason::TripleFault | ExitReason::Crash(_) => 3,
            ExitReason::Signal(n) => 128 + n,
        }
    }
}

impl std::fmt::Display for ExitReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitReason::GuestReset => write!(f, "the guest reset the machine"),
            ExitReason::SystemEvent(t) => write!(f, "the guest signalled system event {t}"),
            ExitReason::TripleFault => write!(f, "the guest crashed (triple fault)"),
            ExitReason::Signal(n) => write!(f, "stopped by signal {n}"),
            ExitReason::Crash(m) => write!(f, "the guest crashed: {m}"),
        }
    }
}

fn validate(config: &VmConfig) -> Result<()> {
    if config.vcpus == 0 || config.vcpus > MAX_VCPUS {
        return Err(Error::Config(format!("{} vCPUs requested; 1 to {MAX_VCPUS} are supported", config.vcpus)));
    }
    let min = (vmrun_arch::boot_params::MIN_MEM_SIZE >> 20) as u32;
    if config.mem_mib < min || config.mem_mib > MAX_MEM_MIB {
        return Err(Error::Config(format!(
            "{} MiB of memory requested; {min} to {MAX_MEM_MIB} MiB are supported",
            config.mem_mib
        )));
    }
    Ok(())
}

fn create_vm(kvm: &Kvm) -> Result<VmFd> {
    let version = kvm.get_api_version();
    if version != 12 {
        return Err(Error::KvmApiVersion(version));
    }
    let vm = kvm.create_vm().map_err(Error::kvm("KVM_CREATE_VM"))?;
    vm.set_tss_address(KVM_TSS_ADDRESS as usize).map_err(Error::kvm("KVM_SET_TSS_ADDR"))?;
    vm.create_irq_chip().map_err(Error::kvm("KVM_CREATE_IRQCHIP"))?;
    let pit = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
    vm.create_pit2(pit).map_err(Error::kvm("KVM_CREATE_PIT2"))?;
    Ok(vm)
}

fn console_output(console: &ConsoleOutput) -> Result<Box<dyn Write + Send>> {
    Ok(match console {
        ConsoleOutput::Stdout => Box::new(std::io::stdout()),
        ConsoleOutput::File(p) => Box::new(File::create(p).map_err(Error::Console)?),
        ConsoleOutput::Null => Box::new(std::io::sink()),
    })
}

/// The full kernel command line: the user's, then what the VMM needs (its
/// devices, the compatibility layer's feature masks).
pub fn full_cmdline(config: &VmConfig, compat: &HostCompat, devices: &str) -> String {
    let mut c = config.cmdline.trim().to_string();
    for extra in [compat.cmdline().unwrap_or(""), devices] {
        if !extra.is_empty() {
            c.push(' ');
            c.push_str(extra);
        }
    }
    c
}

/// Milestone counters across all vCPUs.
fn counters(stats: &[Stats]) -> (Option<u64>, Option<u64>) {
    (stats::sum(stats, "insn_emulation"), stats::sum(stats, "exits"))
}

/// Boots the VM described by `config` and runs it until it ends. `start` is
/// when the VMM started (the zero of the boot report's times).
pub fn run(config: &VmConfig, start: Instant) -> Result<(ExitReason, BootReport)> {
    validate(config)?;
    let kvm = Kvm::new().map_err(Error::Kvm)?;
    let vm = create_vm(&kvm)?;
    let compat = HostCompat::detect(config.host_compat);
    compat.setup_vm(&vm)?;
    if compat.enabled() {
        log::info!("host compatibility layer on (guest kernel mode is emulated on this host)");
    }

    let mem = memory::allocate(config.mem_mib)?;
    memory::register(&vm, &mem)?;

    let kernel = loader::load_kernel(&mem, &config.kernel)?;
    let initrd = match &config.initrd {
        Some(p) => Some(loader::load_initrd(&mem, config.mem_mib, &kernel, p)?),
        None => None,
    };
    // Virtio devices first: the command line announces them.
    let mut mmio = Bus::new();
    let mut virtio = VirtioDevices::new();
    for (i, disk) in config.disks.iter().enumerate() {
        let id = disk.id.clone().unwrap_or_else(|| format!("disk{i}"));
        let block = Block::open(&disk.path, disk.read_only, &id).map_err(|e| Error::Config(e.to_string()))?;
        virtio.attach(&vm, &mem, &mut mmio, Box::new(block))?;
    }
    for net in &config.nets {
        let tap = Tap::open(&net.tap).map_err(|e| Error::Config(e.to_string()))?;
        virtio.attach(&vm, &mem, &mut mmio, Box::new(Net::new(tap, net.mac())))?;
    }
    if config.rng {
        virtio.attach(&vm, &mem, &mut mmio, Box::new(Rng::new()))?;
    }

    let cmdline = full_cmdline(config, &compat, &virtio.cmdline());
    let cmdline_len = loader::load_command_line(&mem, &cmdline)?;
    loader::write_boot_params(&mem, config.mem_mib, &kernel, cmdline_len, initrd)?;
    mptable::write(&mem, config.vcpus).map_err(|e| Error::BootSetup(e.to_string()))?;

    let cpuid = supported_cpuid(&kvm)?;
    let vcpus = (0..config.vcpus)
        .map(|id| Vcpu::new(&vm, &cpuid, &mem, id, config.vcpus, kernel.entry))
        .collect::<Result<Vec<_>>>()?;
    let vcpu_stats: Arc<Vec<Stats>> = Arc::new(
        vcpus
            .iter()
            .filter_map(|v| Stats::open(v.fd()).map_err(|e| log::debug!("no KVM statistics: {e}")).ok())
            .collect(),
    );

    let timeline = Timeline::new(start);
    timeline.update(|r| {
        r.host_compat = compat.enabled();
        r.mem_mib = config.mem_mib;
        r.vcpus = config.vcpus;
    });
    let guest_ranges = memory::host_ranges(&mem);

    // Devices.
    let serial_irq = EventFd::new(libc::EFD_NONBLOCK)?;
    vm.register_irqfd(&serial_irq, SERIAL_IRQ).map_err(Error::kvm("KVM_IRQFD"))?;
    let run_init_hook = {
        let (timeline, stats) = (timeline.clone(), vcpu_stats.clone());
        Box::new(move || {
            let (insns, exits) = counters(&stats);
            let m = timeline.now(insns, exits);
            timeline.update(|r| r.run_init = Some(m));
        })
    };
    let sink = ConsoleSink::new(console_output(&config.console)?, run_init_hook);
    let serial = Arc::new(Mutex::new(SerialConsole::new(EventFdTrigger(serial_irq), Box::new(sink))));
    let reset_evt = EventFd::new(libc::EFD_NONBLOCK)?;
    let i8042 = Arc::new(Mutex::new(I8042::new(EventFdTrigger::try_clone(&reset_evt)?)));
    let marker = {
        let (timeline, stats, ranges) = (timeline.clone(), vcpu_stats.clone(), guest_ranges.clone());
        BootMarker::new(Box::new(move |value| {
            let (insns, exits) = counters(&stats);
            let m = timeline.now(insns, exits);
            log::info!("boot marker {value} at {:.1} ms", m.wall_ms);
            let rss = resident_kib(&ranges);
            timeline.update(|r| {
                if r.boot_marker.is_none() {
                    r.boot_marker = Some(m);
                    r.boot_marker_value = Some(value);
                    if let Some((total, guest)) = rss {
                        r.vmm_overhead_rss_kib = Some(total.saturating_sub(guest));
                        r.guest_rss_kib = Some(guest);
                    }
                }
            });
        }))
    };

    let bus_err = |e: vmrun_devices::bus::Error| Error::Config(e.to_string());
    let mut pio = Bus::new();
    pio.insert(serial.clone(), legacy::SERIAL_PORT_BASE, legacy::SERIAL_PORT_LEN).map_err(bus_err)?;
    pio.insert(i8042, legacy::I8042_PORT_BASE, legacy::I8042_PORT_LEN).map_err(bus_err)?;
    pio.insert(Arc::new(Mutex::new(Cmos::new())), legacy::CMOS_PORT_BASE, legacy::CMOS_PORT_LEN)
        .map_err(bus_err)?;
    mmio.insert(Arc::new(Mutex::new(marker)), BOOT_MARKER_ADDR, BOOT_MARKER_SIZE).map_err(bus_err)?;

    // Signals: SIGINT and SIGTERM are read from a signalfd by the event loop
    // (blocked here, hence in every vCPU thread); SIGRTMIN kicks a vCPU
    // thread out of KVM_RUN.
    let signals = SignalGuard::new()?;
    register_signal_handler(SIGRTMIN(), kick_handler).map_err(|e| Error::Io(std::io::Error::from_raw_os_error(e.errno())))?;

    let shared = VcpuShared {
        mem: mem.clone(),
        pio,
        mmio,
        compat,
        stop: Arc::new(AtomicBool::new(false)),
        exit_reason: Arc::new(Mutex::new(None)),
        exit_evt: Arc::new(EventFd::new(libc::EFD_NONBLOCK)?),
    };
    let mut threads = Vec::new();
    for vcpu in vcpus {
        let s = shared.clone();
        let hook: Option<Box<dyn FnOnce() + Send>> = (vcpu.id == 0).then(|| {
            let (timeline, stats) = (timeline.clone(), vcpu_stats.clone());
            Box::new(move || {
                let (insns, exits) = counters(&stats);
                let m = timeline.now(insns, exits);
                timeline.update(|r| r.first_instruction = Some(m));
            }) as Box<dyn FnOnce() + Send>
        });
        let t = std::thread::Builder::new()
            .name(format!("vcpu{}", vcpu.id))
            .spawn(move || vcpu.run(s, hook))
            .map_err(Error::VcpuThread)?;
        threads.push(t);
    }

    let controller = Arc::new(Mutex::new(Controller {
        vcpu_exit: shared.exit_evt.clone(),
        vcpu_exit_reason: shared.exit_reason.clone(),
        reset_evt,
        signal_fd: signals.fd()?,
        stdin: config.console_input,
        serial: serial.clone(),
        outcome: None,
    }));
    let loop_result = event_loop(controller.clone(), virtio.take_handlers());

    stop_vcpus(&shared.stop, threads);
    drop(signals);
    if let Ok(mut s) = serial.lock() {
        s.flush();
    }
    let reason = match loop_result {
        Ok(()) => controller.lock().unwrap_or_else(|e| e.into_inner()).outcome.take(),
        Err(e) => return Err(e),
    }
    .unwrap_or_else(|| ExitReason::Crash("the event loop ended without a reason".into()));

    let (insns, exits) = counters(&vcpu_stats);
    let end = timeline.now(insns, exits);
    let rss = resident_kib(&guest_ranges);
    timeline.update(|r| {
        r.end = Some(end);
        r.exit = reason.to_string();
        if r.vmm_overhead_rss_kib.is_none() {
            if let Some((total, guest)) = rss {
                r.vmm_overhead_rss_kib = Some(total.saturating_sub(guest));
                r.guest_rss_kib = Some(guest);
            }
        }
    });
    let report = timeline.report();
    if let Some(path) = &config.report {
        let json = serde_json::to_string_pretty(&report).map_err(std::io::Error::other);
        json.and_then(|j| std::fs::write(path, j + "\n"))
            .map_err(|source| Error::Report { path: path.clone(), source })?;
    }
    drop(vm);
    Ok((reason, report))
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Stops every vCPU thread: sets the flag and kicks each thread out of
/// KVM_RUN until it has returned.
fn stop_vcpus(stop: &AtomicBool, threads: Vec<JoinHandle<()>>) {
    stop.store(true, Ordering::Release);
    for t in threads {
        while !t.is_finished() {
            // A kick that lands before the thread enters KVM_RUN is lost,
            // hence the loop.
            let _ = t.kill(SIGRTMIN());
            std::thread::sleep(Duration::from_millis(2));
        }
        if t.join().is_err() {
            log::error!("a vCPU thread panicked");
        }
    }
}

/// Blocks SIGINT and SIGTERM for this thread (and threads it starts) while
/// the VM runs, and hands them to the event loop through a signalfd.
struct SignalGuard {
    old: libc::sigset_t,
    set: libc::sigset_t,
}

impl SignalGuard {
    fn new() -> Result<Self> {
        // SAFETY: sigemptyset/sigaddset initialise the sets they are given;
        // pthread_sigmask reads `set` and writes the previous mask to `old`.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            let mut old: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGINT);
            libc::sigaddset(&mut set, libc::SIGTERM);
            let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &set, &mut old);
            if rc != 0 {
                return Err(Error::Io(std::io::Error::from_raw_os_error(rc)));
            }
            Ok(Self { old, set })
        }
    }

    fn fd(&self) -> Result<File> {
        // SAFETY: `set` is an initialised signal set; signalfd returns a new fd or -1.
        let fd = unsafe { libc::signalfd(-1, &self.set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK) };
        if fd < 0 {
            return Err(Error::Io(std::io::Error::last_os_error()));
        }
        // SAFETY: `fd` is a fresh descriptor owned by nothing else.
        Ok(unsafe { File::from_raw_fd(fd) })
    }
}

impl Drop for SignalGuard {
    fn drop(&mut self) {
        // SAFETY: restores the mask saved in `new`.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &self.old, std::ptr::null_mut()) };
    }
}

/// The event loop's one subscriber: the end of the VM (a vCPU, the i8042,
/// a signal) and console input.
struct Controller {
    vcpu_exit: Arc<EventFd>,
    vcpu_exit_reason: Arc<Mutex<Option<ExitReason>>>,
    reset_evt: EventFd,
    signal_fd: File,
    stdin: bool,
    serial: Arc<Mutex<SerialConsole>>,
    outcome: Option<ExitReason>,
}

const STDIN_FD: i32 = libc::STDIN_FILENO;

impl MutEventSubscriber for Controller {
    fn init(&mut self, ops: &mut EventOps) {
        for (fd, what) in [
            (self.vcpu_exit.as_raw_fd(), "vCPU exit"),
            (self.reset_evt.as_raw_fd(), "reset"),
            (self.signal_fd.as_raw_fd(), "signals"),
        ] {
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
        } else if fd == STDIN_FD {
            let mut buf = [0u8; 1024];
            // SAFETY: reads into a local buffer of the given length.
            let n = unsafe { libc::read(STDIN_FD, buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 || events.event_set().contains(EventSet::HANG_UP) && n == 0 {
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

fn event_loop(controller: Arc<Mutex<Controller>>, devices: Vec<VirtioEventHandler>) -> Result<()> {
    let mut manager: EventManager<Subscriber> = EventManager::new().map_err(|e| Error::EventLoop(format!("{e:?}")))?;
    manager.add_subscriber(controller.clone());
    for d in devices {
        manager.add_subscriber(Arc::new(Mutex::new(d)));
    }
    loop {
        if controller.lock().unwrap_or_else(|e| e.into_inner()).outcome.is_some() {
            return Ok(());
        }
        manager.run().map_err(|e| Error::EventLoop(format!("{e:?}")))?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes() {
        assert_eq!(ExitReason::GuestReset.exit_code(), 0);
        assert_eq!(ExitReason::TripleFault.exit_code(), 3);
        assert_eq!(ExitReason::Crash("x".into()).exit_code(), 3);
        assert_eq!(ExitReason::Signal(libc::SIGTERM).exit_code(), 143);
    }

    #[test]
    fn config_limits() {
        let mut c = VmConfig::new("/k");
        c.vcpus = 0;
        assert!(matches!(validate(&c), Err(Error::Config(_))));
        c.vcpus = MAX_VCPUS + 1;
        assert!(matches!(validate(&c), Err(Error::Config(_))));
        c.vcpus = 2;
        c.mem_mib = 16;
        assert!(matches!(validate(&c), Err(Error::Config(_))));
        c.mem_mib = 128;
        assert!(validate(&c).is_ok());
    }

    #[test]
    fn compat_additions_follow_the_user_cmdline() {
        let mut c = VmConfig::new("/k");
        c.cmdline = " console=ttyS0 ".into();
        let on = HostCompat::detect(crate::config::HostCompatMode::On);
        let off = HostCompat::detect(crate::config::HostCompatMode::Off);
        assert_eq!(full_cmdline(&c, &off, ""), "console=ttyS0");
        assert!(full_cmdline(&c, &on, "").starts_with("console=ttyS0 noxsave "));
        assert_eq!(
            full_cmdline(&c, &off, "virtio_mmio.device=4K@0xd0001000:5"),
            "console=ttyS0 virtio_mmio.device=4K@0xd0001000:5"
        );
    }
}
