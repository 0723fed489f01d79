//! Building a VM from a [`VmConfig`] and running it to its end.
//!
//! The order follows a real boot: KVM and the VM, guest memory, the kernel,
//! initramfs, command line, zero page and MP table, the devices, the vCPUs;
//! then one thread per vCPU and the event loop on this thread, until a vCPU
//! or a device reports the end, or a signal asks for it. Each of these
//! threads is confined by its seccomp filter before the guest runs its
//! first instruction (see [`crate::seccomp`]).

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd as _, IntoRawFd as _};
use std::os::unix::thread::JoinHandleExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_pit_config, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::config::{rate_limit, ConsoleOutput, RateLimit, RestoreConfig, SeccompMode, VmConfig};
use crate::console::{BoundedWriter, ConsoleSink};
use crate::controller::{event_loop, ControlSocket, Controller, SnapshotSource};
use crate::error::{Error, Result};
use crate::host_compat::HostCompat;
use crate::profile::Profiler;
use crate::report::{resident_kib, BootReport, Smaps, Timeline};
use crate::seccomp;
use crate::snapshot::{self, DeviceKind};
use crate::stats::{self, Stats};
use crate::vcpu::{prefetch_msr_index_list, supported_cpuid, StartGate, Vcpu, VcpuControl, VcpuShared};
use crate::virtio_devices::VirtioDevices;
use crate::{loader, memory};
use vmrun_arch::layout::{BOOT_MARKER_ADDR, BOOT_MARKER_SIZE, KVM_TSS_ADDRESS, MAX_VCPUS, SERIAL_IRQ};
use vmrun_arch::mptable;
use vmrun_devices::boot_marker::BootMarker;
use vmrun_devices::legacy::cmos::CmosState;
use vmrun_devices::legacy::serial::SerialConsoleState;
use vmrun_devices::legacy::{self, Cmos, SerialConsole, I8042};
use vmrun_devices::rate_limiter::RateLimiter;
use vmrun_devices::virtio::block::Block;
use vmrun_devices::virtio::net::tap::Tap;
use vmrun_devices::virtio::net::Net;
use vmrun_devices::virtio::rng::Rng;
use vmrun_devices::virtio::vsock::Vsock;
use vmrun_devices::virtio::VirtioDevice;
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
    /// Another process asked the VMM to stop (control socket).
    Stopped,
}

impl ExitReason {
    /// The VMM's exit status for this end: 0 when the guest ended itself,
    /// 3 when it crashed, 128 + N when signal N stopped it.
    pub fn exit_code(&self) -> i32 {
        match self {
            ExitReason::GuestReset | ExitReason::SystemEvent(_) | ExitReason::Stopped => 0,
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
            ExitReason::Stopped => write!(f, "stopped through the control socket"),
        }
    }
}

fn validate(config: &VmConfig) -> Result<()> {
    check_resources(u64::from(config.vcpus), u64::from(config.mem_mib))
}

/// Checks a VM's vCPU count and memory size (MiB) before anything is
/// made: in the range this VMM supports, and no more memory than the host
/// has. Front ends call it too, so that a bad size fails up front with the
/// reason rather than in a VMM whose messages nobody reads.
pub fn check_resources(vcpus: u64, mem_mib: u64) -> Result<()> {
    if vcpus == 0 || vcpus > u64::from(MAX_VCPUS) {
        return Err(Error::Config(format!("{vcpus} vCPUs requested; 1 to {MAX_VCPUS} are supported")));
    }
    let min = vmrun_arch::boot_params::MIN_MEM_SIZE >> 20;
    if mem_mib < min || mem_mib > u64::from(MAX_MEM_MIB) {
        return Err(Error::Config(format!("{mem_mib} MiB of memory requested; {min} to {MAX_MEM_MIB} MiB are supported")));
    }
    if let Some(host) = host_memory_mib() {
        if mem_mib > host {
            return Err(Error::Config(format!("{mem_mib} MiB of memory requested; this host has {host} MiB")));
        }
    }
    Ok(())
}

/// The host's memory in MiB (`MemTotal`), if /proc tells.
fn host_memory_mib() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 = info.lines().find_map(|l| l.strip_prefix("MemTotal:"))?.trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kib >> 10)
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

/// Where the console's bytes go; a file is bounded by `limit` (`None`:
/// unbounded).
fn console_output(console: &ConsoleOutput, limit: Option<u64>) -> Result<Box<dyn Write + Send>> {
    Ok(match console {
        ConsoleOutput::Stdout => Box::new(std::io::stdout()),
        ConsoleOutput::File(p) => {
            let file = File::create(p).map_err(Error::Console)?;
            match limit {
                Some(limit) => Box::new(BoundedWriter::new(file, limit)),
                None => Box::new(file),
            }
        }
        ConsoleOutput::Null => Box::new(std::io::sink()),
    })
}

/// The full kernel command line: the user's, then what the VMM needs (its
/// devices, the compatibility layer's feature masks).
pub fn full_cmdline(config: &VmConfig, compat: &HostCompat, tsc_khz: Option<u32>, devices: &str) -> String {
    let mut c = config.cmdline.trim().to_string();
    for extra in [&compat.cmdline(tsc_khz).unwrap_or_default(), devices] {
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

/// How a built VM runs: what only matters once it runs.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Forward standard input to the serial console.
    pub console_input: bool,
    /// Write the boot report here at the end.
    pub report: Option<PathBuf>,
    /// Serve the control socket (pause, resume, snapshot, stop) here.
    pub control: Option<PathBuf>,
    /// Seccomp filters on the VMM's threads (see [`crate::seccomp`]; the
    /// VMM thread's filter stays on the calling thread after the VM ends).
    pub seccomp: SeccompMode,
    /// Sample where the vCPUs are ([`crate::profile`]) and write the
    /// samples here at the end.
    pub profile: Option<PathBuf>,
    /// Gets one byte once the control socket and the vsock socket listen
    /// and the event loop is about to serve them (before the guest runs):
    /// whoever started the VMM may connect from then on, without polling
    /// for the socket files. A pipe's write end, typically; the VMM keeps
    /// it open until it ends, so a reader sees end of file if it fails
    /// before that.
    pub ready: Option<Arc<File>>,
}

/// A VM ready to run: built by a cold boot or from a snapshot.
struct Machine {
    vm: VmFd,
    mem: GuestMemoryMmap,
    compat: HostCompat,
    mem_mib: u32,
    vcpus: Vec<Vcpu>,
    pio: Bus,
    mmio: Bus,
    legacy: LegacyDevices,
    virtio: VirtioDevices,
    probe: BootProbe,
    /// A jailed VMM's wait for its move into its cgroup, made before the
    /// guest runs (the VM is set up meanwhile).
    confined: Option<vmrun_jail::Confined>,
    /// The VM-wide setup still under way ([`open_kvm`]).
    setup: VmSetup,
}

fn stats_of(stats: &OnceLock<Vec<Stats>>) -> (Option<u64>, Option<u64>) {
    stats.get().map_or((None, None), |s| counters(s))
}

/// Where the boot milestones are recorded: the timeline, and the vCPUs'
/// KVM counters (known once the vCPUs exist).
#[derive(Clone)]
struct BootProbe {
    timeline: Timeline,
    stats: Arc<OnceLock<Vec<Stats>>>,
}

impl BootProbe {
    fn now(&self) -> crate::report::Milestone {
        let (insns, exits) = stats_of(&self.stats);
        self.timeline.now(insns, exits)
    }
}

/// The legacy devices' handles the VMM keeps.
struct LegacyDevices {
    serial: Arc<Mutex<SerialConsole>>,
    cmos: Arc<Mutex<Cmos>>,
    reset_evt: EventFd,
}

/// The legacy devices on the port bus and the boot marker on the MMIO bus.
fn legacy_devices(
    vm: &VmFd,
    console: Box<dyn Write + Send>,
    restored: Option<(&SerialConsoleState, &CmosState)>,
    probe: &BootProbe,
    guest_ranges: Vec<(u64, u64)>,
    pio: &mut Bus,
    mmio: &mut Bus,
) -> Result<LegacyDevices> {
    let serial_irq = EventFd::new(libc::EFD_NONBLOCK)?;
    vm.register_irqfd(&serial_irq, SERIAL_IRQ).map_err(Error::kvm("KVM_IRQFD"))?;
    let run_init_hook = {
        let probe = probe.clone();
        Box::new(move || {
            let m = probe.now();
            probe.timeline.update(|r| r.run_init = Some(m));
        })
    };
    let sink = Box::new(ConsoleSink::new(console, run_init_hook));
    let serial = match restored {
        Some((state, _)) => SerialConsole::restore(state, EventFdTrigger(serial_irq), sink).map_err(Error::Io)?,
        None => SerialConsole::new(EventFdTrigger(serial_irq), sink),
    };
    let serial = Arc::new(Mutex::new(serial));
    let cmos = Arc::new(Mutex::new(restored.map_or_else(Cmos::new, |(_, c)| Cmos::restore(c))));
    let reset_evt = EventFd::new(libc::EFD_NONBLOCK)?;
    let i8042 = Arc::new(Mutex::new(I8042::new(EventFdTrigger::try_clone(&reset_evt)?)));
    let marker = {
        let probe = probe.clone();
        // Opened here: the marker is written on a vCPU thread, whose seccomp
        // filter lets it read but not open files.
        let smaps = Smaps::open();
        BootMarker::new(Box::new(move |value| {
            let m = probe.now();
            log::info!("boot marker {value} at {:.1} ms", m.wall_ms);
            let rss = smaps.as_ref().and_then(|s| s.resident_kib(&guest_ranges));
            probe.timeline.update(|r| {
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
    pio.insert(serial.clone(), legacy::SERIAL_PORT_BASE, legacy::SERIAL_PORT_LEN).map_err(bus_err)?;
    pio.insert(i8042, legacy::I8042_PORT_BASE, legacy::I8042_PORT_LEN).map_err(bus_err)?;
    pio.insert(cmos.clone(), legacy::CMOS_PORT_BASE, legacy::CMOS_PORT_LEN).map_err(bus_err)?;
    mmio.insert(Arc::new(Mutex::new(marker)), BOOT_MARKER_ADDR, BOOT_MARKER_SIZE).map_err(bus_err)?;
    Ok(LegacyDevices { serial, cmos, reset_evt })
}

/// The host compatibility layer's VM-wide setup, under way on a thread of
/// its own: its MSR filter waits for an SRCU grace period when installed
/// (12 to 16 ms on the nested host), while the VM is built. Joined before
/// the guest runs.
type VmSetup = Option<std::thread::JoinHandle<Result<()>>>;

fn open_kvm(mode: crate::config::HostCompatMode) -> Result<(Kvm, VmFd, HostCompat, VmSetup)> {
    let kvm = Kvm::new().map_err(Error::Kvm)?;
    let vm = create_vm(&kvm)?;
    let compat = HostCompat::detect(mode);
    if !compat.enabled() {
        return Ok((kvm, vm, compat, None));
    }
    log::info!("host compatibility layer on (guest kernel mode is emulated on this host)");
    // SAFETY: the VM's descriptor, open as long as `vm` (all of this call).
    let copy = unsafe { std::os::fd::BorrowedFd::borrow_raw(vm.as_raw_fd()) }.try_clone_to_owned().map_err(Error::Io)?;
    // SAFETY: a copy of this VM's descriptor that nothing else owns,
    // handed over whole.
    let copy = unsafe { kvm.create_vmfd_from_rawfd(copy.into_raw_fd()) }.map_err(Error::Kvm)?;
    let setup = std::thread::Builder::new().name("vm-setup".into()).spawn(move || compat.setup_vm(&copy)).map_err(Error::Io)?;
    Ok((kvm, vm, compat, Some(setup)))
}

/// Waits for the VM-wide setup [`open_kvm`] started.
fn finish_setup(setup: &mut VmSetup) -> Result<()> {
    match setup.take().map(std::thread::JoinHandle::join) {
        None => Ok(()),
        Some(Ok(r)) => r,
        Some(Err(_)) => Err(Error::Config("the VM's setup thread panicked".into())),
    }
}

/// Boots the VM described by `config` and runs it until it ends. `start` is
/// when the VMM started (the zero of the boot report's times).
pub fn run(config: &VmConfig, start: Instant) -> Result<(ExitReason, BootReport)> {
    run_signalling(config, start, None)
}

/// [`run`], writing one byte to `ready` once the control and vsock sockets
/// listen (see [`RunOptions::ready`]). A jailed VMM is in its cgroup
/// already: it writes the kernel into guest memory before the guest runs.
pub fn run_signalling(config: &VmConfig, start: Instant, ready: Option<Arc<File>>) -> Result<(ExitReason, BootReport)> {
    validate(config)?;
    let (kvm, vm, compat, setup) = open_kvm(config.options.host_compat)?;
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
    for (kind, device) in cold_devices(config)? {
        virtio.attach(&vm, &mem, &mut mmio, kind, device, None)?;
    }
    let cpuid = supported_cpuid(&kvm)?;
    let vcpus = (0..config.vcpus)
        .map(|id| {
            let v = Vcpu::create(&vm, id)?;
            v.configure(&cpuid, &mem, config.vcpus, kernel.entry)?;
            Ok(v)
        })
        .collect::<Result<Vec<_>>>()?;

    let tsc_khz = vcpus.first().and_then(Vcpu::tsc_khz);
    let cmdline = full_cmdline(config, &compat, tsc_khz, &virtio.cmdline());
    let cmdline_len = loader::load_command_line(&mem, &cmdline)?;
    let rng_seed = loader::load_rng_seed(&mem)?;
    loader::write_boot_params(&mem, config.mem_mib, &kernel, cmdline_len, initrd, Some(rng_seed))?;
    mptable::write(&mem, config.vcpus).map_err(|e| Error::BootSetup(e.to_string()))?;

    let timeline = Timeline::new(start);
    timeline.update(|r| {
        r.host_compat = compat.enabled();
        r.mem_mib = config.mem_mib;
        r.vcpus = config.vcpus;
    });
    let probe = BootProbe { timeline, stats: Arc::new(OnceLock::new()) };
    let mut pio = Bus::new();
    let console = console_output(&config.options.console, config.options.console_limit)?;
    let legacy = legacy_devices(&vm, console, None, &probe, memory::host_ranges(&mem), &mut pio, &mut mmio)?;
    let machine = Machine { vm, mem, compat, mem_mib: config.mem_mib, vcpus, pio, mmio, legacy, virtio, probe, confined: None, setup };
    machine.run(&RunOptions {
        console_input: config.options.console_input,
        report: config.options.report.clone(),
        control: config.options.control.clone(),
        seccomp: config.options.seccomp,
        profile: config.options.profile.clone(),
        ready,
    })
}

/// The virtio devices of a cold boot, in slot order.
fn cold_devices(config: &VmConfig) -> Result<Vec<(DeviceKind, Box<dyn VirtioDevice>)>> {
    let mut devices: Vec<(DeviceKind, Box<dyn VirtioDevice>)> = Vec::new();
    for (i, disk) in config.disks.iter().enumerate() {
        let id = disk.id.clone().unwrap_or_else(|| format!("disk{i}"));
        let limiter = disk_limiter(&disk.path, &disk.limit)?;
        let block = Block::open(&disk.path, disk.read_only, &id)?.with_rate_limiter(limiter);
        let capacity = Some(block.capacity());
        devices.push((DeviceKind::Block { read_only: disk.read_only, id, capacity }, Box::new(block)));
    }
    for net in &config.nets {
        let tap = Tap::open(&net.tap)?;
        let mac = net.mac();
        let dev = Net::new(tap, mac)
            .with_rate_limiters(net_limiter(&net.tap, &net.rx_limit)?, net_limiter(&net.tap, &net.tx_limit)?);
        devices.push((DeviceKind::Net { mac: mac.to_string() }, Box::new(dev)));
    }
    if let Some(v) = &config.vsock {
        let vsock = Vsock::new(v.cid, &v.uds)?;
        devices.push((DeviceKind::Vsock { cid: v.cid }, Box::new(vsock)));
    }
    if config.rng {
        devices.push((DeviceKind::Rng, Box::new(Rng::new())));
    }
    Ok(devices)
}

fn disk_limiter(path: &std::path::Path, limit: &RateLimit) -> Result<RateLimiter> {
    RateLimiter::new(&rate_limit(limit))
        .map_err(|source| Error::RateLimit { what: format!("disk {}", path.display()), source })
}

fn net_limiter(tap: &str, limit: &RateLimit) -> Result<RateLimiter> {
    RateLimiter::new(&rate_limit(limit)).map_err(|source| Error::RateLimit { what: format!("network {tap}"), source })
}

/// Restores the VM saved in `config.snapshot` and runs it until it ends.
pub fn restore(config: &RestoreConfig, start: Instant) -> Result<(ExitReason, BootReport)> {
    restore_signalling(config, start, None, None)
}

/// [`restore`], writing one byte to `ready` once the control and vsock
/// sockets listen (see [`RunOptions::ready`]).
///
/// A jailed VMM passes its [`vmrun_jail::Confined`]: the VM is built while
/// the jail's outer process moves the VMM into its cgroup, and the guest
/// runs once it is there.
pub fn restore_signalling(
    config: &RestoreConfig,
    start: Instant,
    ready: Option<Arc<File>>,
    confined: Option<vmrun_jail::Confined>,
) -> Result<(ExitReason, BootReport)> {
    let state = snapshot::load_state(&config.snapshot).map_err(Error::SnapshotLoad)?;
    let (_kvm, vm, compat, setup) = open_kvm(config.options.host_compat)?;
    if compat.enabled() != state.host_compat {
        return Err(Error::Snapshot(format!(
            "the snapshot was taken with the host compatibility layer {}, and it is {} here",
            if state.host_compat { "on" } else { "off" },
            if compat.enabled() { "on" } else { "off" }
        )));
    }
    let mem =
        snapshot::map_memory(&config.snapshot.join(snapshot::MEMORY_FILE), state.mem_mib).map_err(Error::SnapshotLoad)?;
    memory::register(&vm, &mem)?;

    let mut mmio = Bus::new();
    let mut virtio = VirtioDevices::new();
    // Rate limits are not part of a snapshot: each slot gets the
    // configuration's (unlimited when it gives none).
    let (mut disks, mut taps) = (config.disks.iter(), config.nets.iter());
    // The disks whose size is not what the guest saw when the snapshot
    // was taken.
    let mut resized = Vec::new();
    for (slot, dev) in state.devices.iter().enumerate() {
        let mut kind = dev.kind.clone();
        let device: Box<dyn VirtioDevice> = match &mut kind {
            DeviceKind::Block { read_only, id, capacity } => {
                let disk = disks.next().ok_or_else(|| {
                    Error::Snapshot(format!("the snapshot has a disk in slot {slot}: give a disk image for it"))
                })?;
                let block = Block::open(&disk.path, *read_only || disk.read_only, id)?;
                if *capacity != Some(block.capacity()) {
                    resized.push(slot);
                    *capacity = Some(block.capacity());
                }
                Box::new(block.with_rate_limiter(disk_limiter(&disk.path, &disk.limit)?))
            }
            DeviceKind::Net { mac } => {
                let net = taps.next().ok_or_else(|| {
                    Error::Snapshot(format!("the snapshot has a network interface in slot {slot}: give a TAP device"))
                })?;
                let mac = mac.parse().map_err(Error::SnapshotMac)?;
                let tap = Tap::open(&net.tap)?;
                Box::new(Net::new(tap, mac).with_rate_limiters(
                    net_limiter(&net.tap, &net.rx_limit)?,
                    net_limiter(&net.tap, &net.tx_limit)?,
                ))
            }
            DeviceKind::Rng => Box::new(Rng::new()),
            DeviceKind::Vsock { cid } => {
                let uds = config.vsock_uds.as_ref().ok_or_else(|| {
                    Error::Snapshot(format!("the snapshot has a vsock device in slot {slot}: give its Unix socket"))
                })?;
                Box::new(Vsock::new(*cid, uds)?)
            }
        };
        virtio.attach(&vm, &mem, &mut mmio, kind, device, Some(&dev.transport))?;
    }
    if disks.next().is_some() || taps.next().is_some() {
        return Err(Error::Snapshot("more disks or TAP devices given than the snapshot has slots for".into()));
    }

    let mut vcpus = Vec::with_capacity(state.vcpus.len());
    for (i, vs) in state.vcpus.iter().enumerate() {
        if usize::from(vs.id) != i {
            return Err(Error::Snapshot(format!("vCPU {i} of the snapshot is numbered {}", vs.id)));
        }
        let mut v = Vcpu::create(&vm, vs.id)?;
        v.restore_state(vs)?;
        vcpus.push(v);
    }
    for chip in &state.irqchips {
        vm.set_irqchip(chip).map_err(Error::kvm("KVM_SET_IRQCHIP"))?;
    }
    vm.set_pit2(&state.pit).map_err(Error::kvm("KVM_SET_PIT2"))?;
    let mut clock = state.clock;
    clock.flags = 0;
    vm.set_clock(&clock).map_err(Error::kvm("KVM_SET_CLOCK"))?;

    let timeline = Timeline::new(start);
    timeline.update(|r| {
        r.host_compat = compat.enabled();
        r.mem_mib = state.mem_mib;
        r.vcpus = state.vcpus.len() as u8;
    });
    let probe = BootProbe { timeline, stats: Arc::new(OnceLock::new()) };
    let mut pio = Bus::new();
    let legacy = legacy_devices(
        &vm,
        console_output(&config.options.console, config.options.console_limit)?,
        Some((&state.serial, &state.cmos)),
        &probe,
        memory::host_ranges(&mem),
        &mut pio,
        &mut mmio,
    )?;
    // Now that the interrupt controllers and vCPUs have their state, the
    // devices may raise interrupts: vsock's transport reset, and disks that
    // have other sizes than when the snapshot was taken.
    virtio.after_restore(&resized);
    let machine = Machine { vm, mem, compat, mem_mib: state.mem_mib, vcpus, pio, mmio, legacy, virtio, probe, confined, setup };
    machine.run(&RunOptions {
        console_input: config.options.console_input,
        report: config.options.report.clone(),
        control: config.options.control.clone(),
        seccomp: config.options.seccomp,
        profile: config.options.profile.clone(),
        ready,
    })
}

impl Machine {
    /// Runs the vCPUs and the event loop until the VM ends, then tears
    /// everything down and writes the report.
    fn run(mut self, opts: &RunOptions) -> Result<(ExitReason, BootReport)> {
        // Compiled before any thread needs one.
        let filters = seccomp::Filters::new(opts.seccomp)?;
        prefetch_msr_index_list();
        let vcpu_stats: Vec<Stats> = self
            .vcpus
            .iter()
            .filter_map(|v| Stats::open(v.fd()).map_err(|e| log::debug!("no KVM statistics: {e}")).ok())
            .collect();
        let _ = self.probe.stats.set(vcpu_stats);
        let guest_ranges = memory::host_ranges(&self.mem);
        let control_listener = match &opts.control {
            Some(path) => Some(ControlSocket::bind(path)?),
            None => None,
        };

        // Signals: SIGINT and SIGTERM are read from a signalfd by the event
        // loop (blocked here, hence in every vCPU thread); SIGRTMIN kicks a
        // vCPU thread out of KVM_RUN.
        let signals = SignalGuard::new()?;
        register_signal_handler(SIGRTMIN(), kick_handler)
            .map_err(|e| Error::Io(std::io::Error::from_raw_os_error(e.errno())))?;
        catch_sigbus()?;
        keep_heaps();
        // Everything that can fail is done before the vCPU threads start.
        let signal_fd = signals.fd()?;
        let reset_evt = self.legacy.reset_evt.try_clone()?;

        let shared = VcpuShared {
            mem: self.mem.clone(),
            pio: self.pio.clone(),
            mmio: self.mmio.clone(),
            compat: self.compat,
            stop: Arc::new(AtomicBool::new(false)),
            exit_reason: Arc::new(Mutex::new(None)),
            exit_evt: Arc::new(EventFd::new(libc::EFD_NONBLOCK)?),
            control: Arc::new(VcpuControl::default()),
            seccomp: filters.vcpu.clone(),
            start: Arc::new(StartGate::default()),
            profiler: opts.profile.as_ref().map(|_| Arc::new(Profiler::default())),
        };
        let vcpu_count = self.vcpus.len();
        let mut threads = Vec::new();
        for vcpu in std::mem::take(&mut self.vcpus) {
            let s = shared.clone();
            let hook: Option<Box<dyn FnOnce() + Send>> = (vcpu.id == 0).then(|| {
                let probe = self.probe.clone();
                Box::new(move || {
                    let m = probe.now();
                    probe.timeline.update(|r| r.first_instruction = Some(m));
                }) as Box<dyn FnOnce() + Send>
            });
            let spawned = std::thread::Builder::new().name(format!("vcpu{}", vcpu.id)).spawn(move || vcpu.run(s, hook));
            match spawned {
                Ok(t) => threads.push(t),
                Err(e) => {
                    stop_vcpus(&shared, threads);
                    return Err(Error::VcpuThread(e));
                }
            }
        }
        // Each vCPU thread installs its filter, then waits at the gate.
        if let Err(e) = shared.start.wait_reported(vcpu_count) {
            stop_vcpus(&shared, threads);
            return Err(e.into());
        }
        let pthreads: Vec<libc::pthread_t> = threads.iter().map(|t| t.as_pthread_t()).collect();

        let source = SnapshotSource {
            vm: &self.vm,
            mem: &self.mem,
            compat: self.compat,
            mem_mib: self.mem_mib,
            serial: self.legacy.serial.clone(),
            cmos: self.legacy.cmos.clone(),
            devices: self.virtio.snapshot_handles(),
            control: shared.control.clone(),
            vcpu_count,
            kick: Box::new(move || kick_threads(&pthreads)),
            stats: self.probe.stats.clone(),
            guest_ranges: guest_ranges.clone(),
            profiler: shared.profiler.clone(),
        };
        let controller = Arc::new(Mutex::new(Controller::new(
            shared.exit_evt.clone(),
            shared.exit_reason.clone(),
            reset_evt,
            signal_fd,
            opts.console_input,
            self.legacy.serial.clone(),
            control_listener,
        )));
        // The VMM thread's filter goes on once the event loop is set up;
        // then the vCPUs may run the guest.
        let start = shared.start.clone();
        let mut confined = self.confined.take();
        let mut setup = self.setup.take();
        let loop_result = event_loop(controller.clone(), self.virtio.take_handlers(), &source, || {
            if let Some(ready) = &opts.ready {
                // Before the filter: the descriptor is no device's.
                if let Err(e) = (&**ready).write_all(b"R") {
                    log::warn!("cannot signal readiness: {e}");
                }
            }
            // The guest runs within the jail's cgroup only, and with the
            // VM set up whole.
            if let Some(c) = confined.as_mut() {
                c.wait().map_err(Error::Confine)?;
            }
            finish_setup(&mut setup)?;
            if let Some(filter) = &filters.vmm {
                filter.install()?;
            }
            start.open();
            Ok(())
        });

        shared.control.wake_all();
        stop_vcpus(&shared, threads);
        drop(source);
        drop(signals);
        if let Ok(mut s) = self.legacy.serial.lock() {
            s.flush();
        }
        let reason = match loop_result {
            Ok(()) => controller.lock().unwrap_or_else(|e| e.into_inner()).outcome(),
            Err(e) => return Err(e),
        }
        .unwrap_or_else(|| ExitReason::Crash("the event loop ended without a reason".into()));

        let end = self.probe.now();
        let rss = resident_kib(&guest_ranges);
        self.probe.timeline.update(|r| {
            r.end = Some(end);
            r.exit = reason.to_string();
            if r.vmm_overhead_rss_kib.is_none() {
                if let Some((total, guest)) = rss {
                    r.vmm_overhead_rss_kib = Some(total.saturating_sub(guest));
                    r.guest_rss_kib = Some(guest);
                }
            }
        });
        if let (Some(path), Some(profiler)) = (&opts.profile, &shared.profiler) {
            profiler.write(path).map_err(|source| Error::Report { path: path.clone(), source })?;
        }
        let report = self.probe.timeline.report();
        if let Some(path) = &opts.report {
            let json = serde_json::to_string_pretty(&report).map_err(std::io::Error::other);
            json.and_then(|j| std::fs::write(path, j + "\n"))
                .map_err(|source| Error::Report { path: path.clone(), source })?;
        }
        Ok((reason, report))
    }
}

fn kick_threads(pthreads: &[libc::pthread_t]) {
    for &t in pthreads {
        // SAFETY: the threads are joinable and not yet joined (they are
        // joined only after the event loop, which owns this closure, ends),
        // so their pthread_t is valid.
        unsafe { libc::pthread_kill(t, SIGRTMIN()) };
    }
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// A SIGBUS in the VMM means guest memory could not be backed: the file a
/// restored VM's memory maps is on a full file system (a tmpfs data
/// directory) or was truncated. The VMM ends with that said, instead of
/// Rust's default handler resetting the signal (a call seccomp forbids:
/// the VMM would die by SIGSYS without a word).
/// The C library's allocator keeps freed memory at the top of its heaps
/// instead of returning it (`M_TRIM_THRESHOLD` at its maximum). The first
/// time glibc shrinks a thread's heap, it reads
/// `/proc/sys/vm/overcommit_memory`; on a vCPU thread (whose profile
/// samples grow and free a table) that open was forbidden by the thread's
/// seccomp filter and killed the VMM. Large blocks are still mapped apart
/// and unmapped when freed.
fn keep_heaps() {
    // SAFETY: mallopt only changes the allocator's parameters.
    if unsafe { libc::mallopt(libc::M_TRIM_THRESHOLD, libc::c_int::MAX) } != 1 {
        log::debug!("mallopt(M_TRIM_THRESHOLD) failed: freed heap memory may be trimmed");
    }
}

fn catch_sigbus() -> Result<()> {
    // SAFETY: a zeroed sigaction with a handler that only calls
    // async-signal-safe functions.
    let r = unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = sigbus_handler as extern "C" fn(libc::c_int) as usize;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(libc::SIGBUS, &sa, std::ptr::null_mut())
    };
    if r != 0 {
        return Err(Error::Io(std::io::Error::last_os_error()));
    }
    Ok(())
}

extern "C" fn sigbus_handler(_: libc::c_int) {
    const MSG: &[u8] = b"vmrun: error: guest memory could not be backed (SIGBUS): the file system that holds the \
snapshot's memory file is full, or the file was truncated; free space in the data directory (a tmpfs?) and retry\n";
    // SAFETY: write(2) and _exit(2) are async-signal-safe.
    unsafe {
        libc::write(2, MSG.as_ptr().cast(), MSG.len());
        libc::_exit(1);
    }
}

/// Stops every vCPU thread: sets the flag, opens the start gate (for
/// threads that never ran) and kicks each thread out of KVM_RUN until it
/// has returned.
fn stop_vcpus(shared: &VcpuShared, threads: Vec<JoinHandle<()>>) {
    shared.stop.store(true, Ordering::Release);
    shared.start.open();
    shared.control.wake_all();
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

    fn fd(&self) -> Result<std::fs::File> {
        // SAFETY: `set` is an initialised signal set; signalfd returns a new fd or -1.
        let fd = unsafe { libc::signalfd(-1, &self.set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK) };
        if fd < 0 {
            return Err(Error::Io(std::io::Error::last_os_error()));
        }
        // SAFETY: `fd` is a fresh descriptor owned by nothing else.
        Ok(unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) })
    }
}

impl Drop for SignalGuard {
    fn drop(&mut self) {
        // SAFETY: restores the mask saved in `new`.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &self.old, std::ptr::null_mut()) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sigbus_ends_the_vmm_with_the_reason() {
        // A mapping whose second page lies past the end of its file: a
        // touch of it raises SIGBUS, as guest memory on a full tmpfs does.
        let dir = tempfile::tempdir().unwrap();
        let f = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(dir.path().join("memory")).unwrap();
        f.set_len(4096).unwrap();
        let mut pipe = [0; 2];
        // SAFETY: mmap of our file; pipe fills two descriptors; the child
        // makes only async-signal-safe calls.
        unsafe {
            let p = libc::mmap(std::ptr::null_mut(), 8192, libc::PROT_READ, libc::MAP_SHARED, std::os::fd::AsRawFd::as_raw_fd(&f), 0);
            assert_ne!(p, libc::MAP_FAILED);
            assert_eq!(libc::pipe(pipe.as_mut_ptr()), 0);
            let child = libc::fork();
            if child == 0 {
                libc::dup2(pipe[1], 2);
                if catch_sigbus().is_err() {
                    libc::_exit(9);
                }
                let _ = std::ptr::read_volatile(p.cast::<u8>().add(4096));
                libc::_exit(0);
            }
            libc::close(pipe[1]);
            let mut status = 0;
            libc::waitpid(child, &mut status, 0);
            assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 1, "status {status}");
        }
        let mut msg = String::new();
        // SAFETY: the read end, ours alone.
        let mut r = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(pipe[0]) };
        std::io::Read::read_to_string(&mut r, &mut msg).unwrap();
        assert!(msg.contains("SIGBUS") && msg.contains("full"), "{msg}");
    }

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
        assert_eq!(full_cmdline(&c, &off, Some(2_000_000), ""), "console=ttyS0");
        assert!(full_cmdline(&c, &on, None, "").starts_with("console=ttyS0 noxsave "));
        assert!(!full_cmdline(&c, &on, None, "").contains("tsc"));
        assert!(full_cmdline(&c, &on, Some(2_000_000), "").ends_with(" tsc_early_khz=2000000 tsc=reliable"));
        assert_eq!(
            full_cmdline(&c, &off, None, "virtio_mmio.device=4K@0xd0001000:5"),
            "console=ttyS0 virtio_mmio.device=4K@0xd0001000:5"
        );
    }
}
