//! One vCPU: its boot-time register state and the thread that runs it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use kvm_bindings::{
    kvm_debugregs, kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs, kvm_vcpu_events,
    kvm_xcrs, kvm_xsave, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES,
};
use serde::{Deserialize, Serialize};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::error::{Error, Result};
use crate::host_compat::{assist, syscall_trap, HostCompat};
use crate::profile::{Profiler, SampleTimer};
use crate::seccomp;
use crate::vm::ExitReason;
use vmrun_arch::gdt::{self, BOOT_GDT, CODE_INDEX, DATA_INDEX, TSS_INDEX};
use vmrun_arch::layout::{BOOT_GDT_START, BOOT_IDT_START, BOOT_STACK_POINTER, ZERO_PAGE_START};
use vmrun_arch::msr::{self, EFER_LMA, EFER_LME, MSR_IA32_TSC_DEADLINE, MSR_LSTAR, MSR_STAR, MSR_SYSCALL_MASK};
use vmrun_arch::{cpuid, paging};
use vmrun_devices::Bus;

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
/// Local APIC LVT registers for LINT0 and LINT1, and their delivery modes.
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_EXTINT: u32 = 0x7;
const APIC_MODE_NMI: u32 = 0x4;
/// `kvm_run.internal.suberror` for an instruction the emulator rejected.
const KVM_INTERNAL_ERROR_EMULATION: u32 = 1;

/// The MSRs KVM can save and restore (fetched once per process). The VMM
/// fetches it during setup ([`prefetch_msr_index_list`]): a vCPU thread
/// saving its state for a snapshot could not open `/dev/kvm` under its
/// seccomp filter.
fn msr_index_list() -> Result<Vec<u32>> {
    static LIST: std::sync::OnceLock<std::result::Result<Vec<u32>, kvm_ioctls::Error>> = std::sync::OnceLock::new();
    LIST.get_or_init(|| Kvm::new()?.get_msr_index_list().map(|l| l.as_slice().to_vec()))
        .clone()
        .map_err(Error::kvm("KVM_GET_MSR_INDEX_LIST"))
}

/// Fetches the MSR index list now, while the VMM may still open
/// `/dev/kvm`. A failure is only logged: a snapshot reports it again.
pub fn prefetch_msr_index_list() {
    if let Err(e) = msr_index_list() {
        log::debug!("KVM_GET_MSR_INDEX_LIST: {e} (snapshots will fail)");
    }
}

/// KVM's supported CPUID table, fetched once per VM.
pub fn supported_cpuid(kvm: &Kvm) -> Result<CpuId> {
    kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(Error::kvm("KVM_GET_SUPPORTED_CPUID"))
}

/// Everything KVM keeps about a vCPU, for a snapshot, plus the VMM's own
/// per-vCPU state (the guest's LSTAR behind the syscall trap).
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    pub id: u8,
    pub cpuid: Vec<kvm_bindings::kvm_cpuid_entry2>,
    pub msrs: Vec<(u32, u64)>,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub debugregs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    pub mp_state: kvm_mp_state,
    pub events: kvm_vcpu_events,
    pub guest_lstar: u64,
}

/// Pausing the vCPU threads (for a snapshot) and letting them go on.
#[derive(Debug, Default)]
pub struct VcpuControl {
    state: Mutex<ControlState>,
    changed: Condvar,
}

#[derive(Debug, Default)]
struct ControlState {
    pause: bool,
    /// Ask each pausing vCPU to save its state.
    save: bool,
    paused: usize,
    saved: Vec<Result<VcpuState>>,
}

impl VcpuControl {
    fn lock(&self) -> std::sync::MutexGuard<'_, ControlState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Asks every vCPU to pause (saving its state if `save`). The caller
    /// then kicks the threads and waits with [`VcpuControl::wait_paused`].
    pub fn request_pause(&self, save: bool) {
        let mut s = self.lock();
        s.pause = true;
        s.save = save;
        s.saved.clear();
    }

    /// Whether a pause was asked for.
    pub fn pause_requested(&self) -> bool {
        self.lock().pause
    }

    /// Waits up to `timeout` until `count` vCPUs are paused; `kick` is
    /// called every few milliseconds meanwhile (a kick can be lost if it
    /// lands before a thread enters KVM_RUN).
    pub fn wait_paused(&self, count: usize, timeout: std::time::Duration, kick: impl Fn()) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        let mut s = self.lock();
        while s.paused < count {
            if std::time::Instant::now() > deadline {
                return false;
            }
            drop(s);
            kick();
            s = self.lock();
            let (g, _) = self
                .changed
                .wait_timeout(s, std::time::Duration::from_millis(5))
                .unwrap_or_else(|e| e.into_inner());
            s = g;
        }
        true
    }

    /// The states the paused vCPUs saved, in vCPU order.
    pub fn take_saved(&self) -> Vec<Result<VcpuState>> {
        let mut v = std::mem::take(&mut self.lock().saved);
        v.sort_by_key(|r| r.as_ref().map(|s| s.id).unwrap_or(u8::MAX));
        v
    }

    /// Lets the paused vCPUs run again.
    pub fn resume(&self) {
        let mut s = self.lock();
        s.pause = false;
        s.save = false;
        self.changed.notify_all();
    }

    /// Wakes every waiting vCPU (to see the stop flag).
    pub fn wake_all(&self) {
        self.changed.notify_all();
    }
}

/// Holds the vCPU threads back until every seccomp filter is in place:
/// each vCPU thread installs its own filter and reports it, the VMM
/// thread waits for all the reports, installs its own filter and opens
/// the gate. So no guest instruction runs before the VMM is confined.
#[derive(Debug, Default)]
pub struct StartGate {
    state: Mutex<GateState>,
    changed: Condvar,
}

#[derive(Debug, Default)]
struct GateState {
    /// vCPU threads that reported (with or without a filter).
    reported: usize,
    /// Why vCPU threads could not install their filter.
    errors: Vec<seccomp::Error>,
    open: bool,
}

impl StartGate {
    fn lock(&self) -> std::sync::MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A vCPU thread is ready to run (or could not install its filter).
    fn report(&self, result: std::result::Result<(), seccomp::Error>) {
        let mut s = self.lock();
        s.reported += 1;
        if let Err(e) = result {
            s.errors.push(e);
        }
        self.changed.notify_all();
    }

    /// Waits until `count` vCPU threads reported; an error one of them
    /// met, if one did.
    pub fn wait_reported(&self, count: usize) -> std::result::Result<(), seccomp::Error> {
        let mut s = self.lock();
        while s.reported < count {
            s = self.changed.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        s.errors.pop().map_or(Ok(()), Err)
    }

    /// Lets the vCPU threads run (or, with the stop flag set, return).
    pub fn open(&self) {
        self.lock().open = true;
        self.changed.notify_all();
    }

    fn wait_open(&self) {
        let mut s = self.lock();
        while !s.open {
            s = self.changed.wait(s).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// What the vCPU threads share.
#[derive(Clone)]
pub struct VcpuShared {
    pub mem: GuestMemoryMmap,
    pub pio: Bus,
    pub mmio: Bus,
    pub compat: HostCompat,
    /// Set to make every vCPU thread return.
    pub stop: Arc<AtomicBool>,
    /// Where a vCPU records why the VM must end...
    pub exit_reason: Arc<Mutex<Option<ExitReason>>>,
    /// ...before it signals this.
    pub exit_evt: Arc<EventFd>,
    /// Pause and snapshot requests.
    pub control: Arc<VcpuControl>,
    /// The seccomp filter each vCPU thread installs first (`None`: off).
    pub seccomp: Option<Arc<seccomp::Filter>>,
    /// Where the threads wait until every filter is in place.
    pub start: Arc<StartGate>,
    /// Samples where the guest is, when profiling.
    pub profiler: Option<Arc<Profiler>>,
}

/// A snapshot's MSRs as KVM_SET_MSRS entries, the TSC deadline last (after
/// the TSC it is measured against).
fn msrs_in_restore_order(msrs: &[(u32, u64)]) -> Vec<kvm_msr_entry> {
    let mut entries: Vec<kvm_msr_entry> =
        msrs.iter().map(|&(index, data)| kvm_msr_entry { index, data, ..Default::default() }).collect();
    entries.sort_by_key(|e| e.index == MSR_IA32_TSC_DEADLINE);
    entries
}

/// A configured vCPU.
pub struct Vcpu {
    pub id: u8,
    fd: VcpuFd,
    /// The guest's own LSTAR, kept by the VMM while the syscall trap is on.
    guest_lstar: u64,
}

/// What a KVM exit asks the run loop to do once the exit's borrow of the
/// vCPU fd has ended.
enum Next {
    Continue,
    /// A signal interrupted KVM_RUN (a kick, or the profile's timer).
    Interrupted,
    Exit(ExitReason),
    InternalError(u32),
    LstarWritten,
}

fn set_lapic_lint(regs: &mut [std::os::raw::c_char], offset: usize, mode: u32) {
    let bytes: [u8; 4] = std::array::from_fn(|i| regs[offset + i] as u8);
    let v = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
    for (i, b) in v.to_le_bytes().iter().enumerate() {
        regs[offset + i] = *b as std::os::raw::c_char;
    }
}

impl Vcpu {
    /// Creates vCPU `id` (its state is set by [`Vcpu::configure`] or
    /// [`Vcpu::restore_state`]).
    pub fn create(vm: &kvm_ioctls::VmFd, id: u8) -> Result<Self> {
        let fd = vm.create_vcpu(u64::from(id)).map_err(Error::kvm("KVM_CREATE_VCPU"))?;
        Ok(Self { id, fd, guest_lstar: 0 })
    }

    /// The guest's TSC frequency in kHz, if KVM tells it.
    pub fn tsc_khz(&self) -> Option<u32> {
        self.fd.get_tsc_khz().ok().filter(|k| *k > 0)
    }

    /// Sets the boot state of vCPU `id` of `count`. vCPU 0 starts at `entry`
    /// in 64-bit mode; the others wait for the guest to start them.
    pub fn configure(&self, cpuid_template: &CpuId, mem: &GuestMemoryMmap, count: u8, entry: u64) -> Result<()> {
        let (id, fd) = (self.id, &self.fd);

        let mut cpuid = cpuid_template.clone();
        cpuid::adjust(cpuid.as_mut_slice(), id, count);
        fd.set_cpuid2(&cpuid).map_err(Error::kvm("KVM_SET_CPUID2"))?;

        let entries = msr::boot_msrs();
        let msrs = Msrs::from_entries(&entries).map_err(Error::kvm_list("boot MSR list"))?;
        let set = fd.set_msrs(&msrs).map_err(Error::kvm("KVM_SET_MSRS"))?;
        if set != entries.len() {
            let failed = entries.get(set).map(|e| e.index).unwrap_or_default();
            return Err(Error::Config(format!("KVM refused boot MSR {failed:#x}")));
        }

        let fpu = kvm_fpu { fcw: 0x37f, mxcsr: 0x1f80, ..Default::default() };
        fd.set_fpu(&fpu).map_err(Error::kvm("KVM_SET_FPU"))?;

        let mut lapic = fd.get_lapic().map_err(Error::kvm("KVM_GET_LAPIC"))?;
        set_lapic_lint(&mut lapic.regs, APIC_LVT0, APIC_MODE_EXTINT);
        set_lapic_lint(&mut lapic.regs, APIC_LVT1, APIC_MODE_NMI);
        fd.set_lapic(&lapic).map_err(Error::kvm("KVM_SET_LAPIC"))?;

        if id == 0 {
            Self::setup_boot_registers(fd, mem, entry)?;
        }
        Ok(())
    }

    fn setup_boot_registers(fd: &VcpuFd, mem: &GuestMemoryMmap, entry: u64) -> Result<()> {
        let regs = kvm_regs {
            rflags: 0x2,
            rip: entry,
            rsp: BOOT_STACK_POINTER,
            rbp: BOOT_STACK_POINTER,
            rsi: ZERO_PAGE_START,
            ..Default::default()
        };
        fd.set_regs(&regs).map_err(Error::kvm("KVM_SET_REGS"))?;

        let boot_err = |what: &str| Error::BootSetup(what.to_string());
        for (i, entry) in BOOT_GDT.iter().enumerate() {
            mem.write_obj(*entry, GuestAddress(BOOT_GDT_START + i as u64 * 8)).map_err(|_| boot_err("GDT"))?;
        }
        mem.write_obj(0u64, GuestAddress(BOOT_IDT_START)).map_err(|_| boot_err("IDT"))?;
        let cr3 = paging::write_identity_map(mem).map_err(|_| boot_err("boot page tables"))?;

        let mut sregs = fd.get_sregs().map_err(Error::kvm("KVM_GET_SREGS"))?;
        sregs.gdt.base = BOOT_GDT_START;
        sregs.gdt.limit = (BOOT_GDT.len() * 8 - 1) as u16;
        sregs.idt.base = BOOT_IDT_START;
        sregs.idt.limit = 7;
        sregs.cs = gdt::segment(CODE_INDEX);
        let data = gdt::segment(DATA_INDEX);
        (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
        sregs.tr = gdt::segment(TSS_INDEX);
        sregs.cr0 |= X86_CR0_PE | X86_CR0_PG;
        sregs.cr3 = cr3;
        sregs.cr4 |= X86_CR4_PAE;
        sregs.efer |= EFER_LME | EFER_LMA;
        fd.set_sregs(&sregs).map_err(Error::kvm("KVM_SET_SREGS"))?;
        Ok(())
    }

    /// The vCPU fd, for statistics.
    pub fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    /// Runs the vCPU until the VM ends or `shared.stop` is set. The
    /// thread's seccomp filter goes on first, before its first `KVM_RUN`;
    /// then it waits at the start gate.
    pub fn run(mut self, shared: VcpuShared, on_first_run: Option<Box<dyn FnOnce() + Send>>) {
        // The sampling timer is armed before the filter, which does not
        // allow timer_create.
        let _timer = shared.profiler.as_ref().and_then(|_| {
            SampleTimer::arm(vmm_sys_util::signal::SIGRTMIN())
                .map_err(|e| log::warn!("vCPU {}: cannot arm the profile's timer: {e}", self.id))
                .ok()
        });
        let filtered = match &shared.seccomp {
            Some(filter) => filter.install(),
            None => Ok(()),
        };
        shared.start.report(filtered);
        shared.start.wait_open();
        if shared.stop.load(Ordering::Acquire) {
            return;
        }
        if let Some(f) = on_first_run {
            f();
        }
        while !shared.stop.load(Ordering::Acquire) {
            if shared.control.pause_requested() {
                self.park(&shared);
                continue;
            }
            let next = self.run_once(&shared);
            let outcome = match next {
                Next::Continue => Ok(()),
                Next::Interrupted => {
                    if let Some(p) = &shared.profiler {
                        p.sample(&self.fd, &shared.mem);
                    }
                    Ok(())
                }
                Next::Exit(reason) => Err(reason),
                Next::InternalError(suberror) => self.handle_internal_error(&shared, suberror),
                Next::LstarWritten => self.arm_syscall_trap(&shared),
            };
            if let Err(reason) = outcome {
                self.end(&shared, reason);
                return;
            }
        }
    }

    /// Pauses this vCPU until resumed or stopped, saving its state first if
    /// asked.
    fn park(&mut self, shared: &VcpuShared) {
        // Let KVM finish an instruction whose port or MMIO access the VMM
        // just answered, so the saved state is consistent.
        self.fd.set_kvm_immediate_exit(1);
        let _ = self.fd.run();
        self.fd.set_kvm_immediate_exit(0);
        let control = &shared.control;
        let mut s = control.lock();
        if s.save {
            drop(s);
            let state = self.save_state();
            s = control.lock();
            s.saved.push(state);
        }
        s.paused += 1;
        control.changed.notify_all();
        while s.pause && !shared.stop.load(Ordering::Acquire) {
            s = control.changed.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        s.paused -= 1;
    }

    /// Everything KVM holds about this vCPU.
    pub fn save_state(&self) -> Result<VcpuState> {
        let e = |what| Error::vcpu(self.id, what);
        let cpuid = self.fd.get_cpuid2(KVM_MAX_CPUID_ENTRIES).map_err(e("KVM_GET_CPUID2"))?;
        Ok(VcpuState {
            id: self.id,
            cpuid: cpuid.as_slice().to_vec(),
            msrs: self.save_msrs()?,
            regs: self.fd.get_regs().map_err(e("KVM_GET_REGS"))?,
            sregs: self.fd.get_sregs().map_err(e("KVM_GET_SREGS"))?,
            xsave: self.fd.get_xsave().map_err(e("KVM_GET_XSAVE"))?,
            xcrs: self.fd.get_xcrs().map_err(e("KVM_GET_XCRS"))?,
            debugregs: self.fd.get_debug_regs().map_err(e("KVM_GET_DEBUGREGS"))?,
            lapic: self.fd.get_lapic().map_err(e("KVM_GET_LAPIC"))?,
            mp_state: self.fd.get_mp_state().map_err(e("KVM_GET_MP_STATE"))?,
            events: self.fd.get_vcpu_events().map_err(e("KVM_GET_VCPU_EVENTS"))?,
            guest_lstar: self.guest_lstar,
        })
    }

    /// Reads every MSR KVM lists, skipping the ones it refuses to read.
    fn save_msrs(&self) -> Result<Vec<(u32, u64)>> {
        let index = msr_index_list()?;
        let mut out = Vec::with_capacity(index.len());
        let mut rest: &[u32] = &index;
        while !rest.is_empty() {
            let entries: Vec<kvm_msr_entry> =
                rest.iter().map(|&index| kvm_msr_entry { index, ..Default::default() }).collect();
            let mut msrs = Msrs::from_entries(&entries).map_err(Error::kvm_list("MSR list"))?;
            let n = self.fd.get_msrs(&mut msrs).map_err(Error::vcpu(self.id, "KVM_GET_MSRS"))?;
            out.extend(msrs.as_slice()[..n].iter().map(|m| (m.index, m.data)));
            // KVM stops at the first MSR it cannot read: skip that one.
            rest = rest.get(n + 1..).unwrap_or(&[]);
        }
        Ok(out)
    }

    /// Puts a saved state back, in the order KVM needs it.
    pub fn restore_state(&mut self, state: &VcpuState) -> Result<()> {
        let cpuid = CpuId::from_entries(&state.cpuid).map_err(Error::kvm_list("snapshot's CPUID"))?;
        self.fd.set_cpuid2(&cpuid).map_err(Error::kvm("KVM_SET_CPUID2"))?;
        self.fd.set_sregs(&state.sregs).map_err(Error::kvm("KVM_SET_SREGS"))?;
        // The LAPIC before the MSRs, and the TSC before the timer's
        // deadline: KVM drops a TSC deadline written while the LAPIC timer
        // is not in TSC-deadline mode, and reads it against the guest's TSC.
        // A tickless guest whose deadline was lost would sleep until some
        // other interrupt came.
        self.fd.set_lapic(&state.lapic).map_err(Error::kvm("KVM_SET_LAPIC"))?;
        let entries = msrs_in_restore_order(&state.msrs);
        let mut rest: &[kvm_msr_entry] = &entries;
        while !rest.is_empty() {
            let msrs = Msrs::from_entries(rest).map_err(Error::kvm_list("snapshot's MSR list"))?;
            let n = self.fd.set_msrs(&msrs).map_err(Error::kvm("KVM_SET_MSRS"))?;
            if n < rest.len() {
                log::debug!("vCPU {}: MSR {:#x} not restored", self.id, rest[n].index);
            }
            rest = rest.get(n + 1..).unwrap_or(&[]);
        }
        self.fd.set_regs(&state.regs).map_err(Error::kvm("KVM_SET_REGS"))?;
        // SAFETY: KVM reads a `kvm_xsave` (4 KiB) here; it would read more
        // only if the VMM had enabled dynamic XSTATE features (AMX) with
        // arch_prctl, which vmrun never does.
        unsafe { self.fd.set_xsave(&state.xsave) }.map_err(Error::kvm("KVM_SET_XSAVE"))?;
        self.fd.set_xcrs(&state.xcrs).map_err(Error::kvm("KVM_SET_XCRS"))?;
        self.fd.set_debug_regs(&state.debugregs).map_err(Error::kvm("KVM_SET_DEBUGREGS"))?;
        self.fd.set_mp_state(state.mp_state).map_err(Error::kvm("KVM_SET_MP_STATE"))?;
        self.fd.set_vcpu_events(&state.events).map_err(Error::kvm("KVM_SET_VCPU_EVENTS"))?;
        self.guest_lstar = state.guest_lstar;
        Ok(())
    }

    fn end(&self, shared: &VcpuShared, reason: ExitReason) {
        log::debug!("vCPU {}: {reason}", self.id);
        {
            let mut r = shared.exit_reason.lock().unwrap_or_else(|e| e.into_inner());
            r.get_or_insert(reason);
        }
        if let Err(e) = shared.exit_evt.write(1) {
            log::error!("vCPU {}: cannot signal the VM's end: {e}", self.id);
        }
    }

    fn run_once(&mut self, shared: &VcpuShared) -> Next {
        match self.fd.run() {
            Ok(VcpuExit::IoIn(port, data)) => {
                if !shared.pio.read(u64::from(port), data) {
                    data.fill(0xff);
                }
                Next::Continue
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                shared.pio.write(u64::from(port), data);
                Next::Continue
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                if !shared.mmio.read(addr, data) {
                    data.fill(0);
                }
                Next::Continue
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                shared.mmio.write(addr, data);
                Next::Continue
            }
            Ok(VcpuExit::X86Rdmsr(exit)) => {
                if shared.compat.enabled() && exit.index == MSR_LSTAR {
                    *exit.data = self.guest_lstar;
                } else {
                    *exit.error = 1;
                }
                Next::Continue
            }
            Ok(VcpuExit::X86Wrmsr(exit)) => {
                if shared.compat.enabled() && exit.index == MSR_LSTAR {
                    self.guest_lstar = exit.data;
                    Next::LstarWritten
                } else {
                    *exit.error = 1;
                    Next::Continue
                }
            }
            Ok(VcpuExit::Shutdown) => Next::Exit(ExitReason::TripleFault),
            Ok(VcpuExit::SystemEvent(kind, _)) => Next::Exit(ExitReason::SystemEvent(kind)),
            Ok(VcpuExit::Hlt) => Next::Exit(ExitReason::Crash(format!("vCPU {} halted", self.id))),
            Ok(VcpuExit::FailEntry(reason, cpu)) => Next::Exit(ExitReason::Crash(format!(
                "vCPU {}: KVM entry failed (hardware reason {reason:#x} on CPU {cpu})",
                self.id
            ))),
            Ok(VcpuExit::InternalError) => {
                let run = self.fd.get_kvm_run();
                // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so
                // `internal` is the union member KVM filled in.
                let suberror = unsafe { run.__bindgen_anon_1.internal.suberror };
                Next::InternalError(suberror)
            }
            Ok(VcpuExit::Intr) | Ok(VcpuExit::IrqWindowOpen) => Next::Continue,
            Ok(other) => {
                log::warn!("vCPU {}: unexpected exit {other:?}", self.id);
                Next::Continue
            }
            Err(e) if e.errno() == libc::EINTR => Next::Interrupted,
            Err(e) if e.errno() == libc::EAGAIN => Next::Continue,
            Err(e) => Next::Exit(ExitReason::Crash(format!("vCPU {}: KVM_RUN failed: {e}", self.id))),
        }
    }

    /// The guest wrote LSTAR: map the trap in the current page tables and
    /// point the real LSTAR at it.
    fn arm_syscall_trap(&mut self, shared: &VcpuShared) -> std::result::Result<(), ExitReason> {
        let crash = |m: String| ExitReason::Crash(format!("vCPU {}: syscall trap: {m}", self.id));
        let sregs = self.fd.get_sregs().map_err(|e| crash(format!("KVM_GET_SREGS: {e}")))?;
        syscall_trap::map(&shared.mem, sregs.cr3).map_err(|e| crash(e.to_string()))?;
        let msrs = Msrs::from_entries(&[kvm_bindings::kvm_msr_entry {
            index: MSR_LSTAR,
            data: syscall_trap::TRAP_VA,
            ..Default::default()
        }])
        .map_err(|e| crash(format!("{e:?}")))?;
        self.fd.set_msrs(&msrs).map_err(|e| crash(format!("KVM_SET_MSRS: {e}")))?;
        log::debug!("vCPU {}: guest LSTAR {:#x}, trap armed", self.id, self.guest_lstar);
        Ok(())
    }

    fn handle_internal_error(&mut self, shared: &VcpuShared, suberror: u32) -> std::result::Result<(), ExitReason> {
        let id = self.id;
        let crash = move |m: String| ExitReason::Crash(format!("vCPU {id}: {m}"));
        if !shared.compat.enabled() || suberror != KVM_INTERNAL_ERROR_EMULATION {
            let rip = self.fd.get_regs().map(|r| r.rip).unwrap_or_default();
            return Err(crash(format!("KVM internal error (suberror {suberror}) at RIP {rip:#x}")));
        }
        let mut regs = self.fd.get_regs().map_err(|e| crash(format!("KVM_GET_REGS: {e}")))?;
        if regs.rip == syscall_trap::TRAP_VA {
            return self.complete_syscall(regs);
        }
        let bytes = self.read_instruction(&shared.mem, regs.rip).map_err(crash)?;
        let Some(insn) = assist::decode(&bytes) else {
            return Err(crash(format!(
                "the host cannot emulate the instruction at RIP {:#x} ({}); vmrun has no assist for it",
                regs.rip,
                assist::hex(&bytes)
            )));
        };
        let breakpoint = assist::apply(insn, &mut regs.rip, &mut regs.rflags);
        self.fd.set_regs(&regs).map_err(|e| crash(format!("KVM_SET_REGS: {e}")))?;
        if breakpoint {
            let mut events = self.fd.get_vcpu_events().map_err(|e| crash(format!("KVM_GET_VCPU_EVENTS: {e}")))?;
            events.exception.injected = 1;
            events.exception.nr = assist::BP_VECTOR;
            events.exception.has_error_code = 0;
            events.exception.error_code = 0;
            self.fd.set_vcpu_events(&events).map_err(|e| crash(format!("KVM_SET_VCPU_EVENTS: {e}")))?;
        }
        Ok(())
    }

    fn complete_syscall(&mut self, mut regs: kvm_regs) -> std::result::Result<(), ExitReason> {
        let id = self.id;
        let crash = move |m: String| ExitReason::Crash(format!("vCPU {id}: syscall trap: {m}"));
        let mut msrs = Msrs::from_entries(&[
            kvm_bindings::kvm_msr_entry { index: MSR_STAR, ..Default::default() },
            kvm_bindings::kvm_msr_entry { index: MSR_SYSCALL_MASK, ..Default::default() },
        ])
        .map_err(|e| crash(format!("{e:?}")))?;
        let n = self.fd.get_msrs(&mut msrs).map_err(|e| crash(format!("KVM_GET_MSRS: {e}")))?;
        if n != 2 {
            return Err(crash("cannot read STAR and SFMASK".into()));
        }
        let (star, sfmask) = (msrs.as_slice()[0].data, msrs.as_slice()[1].data);
        let entry = syscall_trap::complete_syscall(self.guest_lstar, star, sfmask, regs.rflags);
        let mut sregs = self.fd.get_sregs().map_err(|e| crash(format!("KVM_GET_SREGS: {e}")))?;
        sregs.cs = entry.cs;
        sregs.ss = entry.ss;
        self.fd.set_sregs(&sregs).map_err(|e| crash(format!("KVM_SET_SREGS: {e}")))?;
        regs.rip = entry.rip;
        regs.rflags = entry.rflags;
        self.fd.set_regs(&regs).map_err(|e| crash(format!("KVM_SET_REGS: {e}")))?;
        Ok(())
    }

    /// Reads up to 15 bytes of the instruction at guest virtual `rip`,
    /// translating each page separately.
    fn read_instruction(&self, mem: &GuestMemoryMmap, rip: u64) -> std::result::Result<Vec<u8>, String> {
        let mut bytes = Vec::with_capacity(assist::MAX_INSN_LEN);
        let mut va = rip;
        while bytes.len() < assist::MAX_INSN_LEN {
            let t = self.fd.translate_gva(va).map_err(|e| format!("KVM_TRANSLATE {va:#x}: {e}"))?;
            if t.valid == 0 {
                break;
            }
            let in_page = (0x1000 - (va & 0xfff)) as usize;
            let n = in_page.min(assist::MAX_INSN_LEN - bytes.len());
            let mut chunk = vec![0u8; n];
            if mem.read_slice(&mut chunk, GuestAddress(t.physical_address)).is_err() {
                break;
            }
            bytes.extend_from_slice(&chunk);
            va += n as u64;
        }
        if bytes.is_empty() {
            return Err(format!("cannot read the instruction at RIP {rip:#x}"));
        }
        Ok(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tsc_deadline_is_restored_after_the_tsc() {
        use vmrun_arch::msr::MSR_IA32_TSC;
        let saved = [(MSR_IA32_TSC_DEADLINE, 7), (0x1a0, 1), (MSR_IA32_TSC, 5), (MSR_LSTAR, 9)];
        let order: Vec<u32> = msrs_in_restore_order(&saved).iter().map(|e| e.index).collect();
        assert_eq!(order, [0x1a0, MSR_IA32_TSC, MSR_LSTAR, MSR_IA32_TSC_DEADLINE]);
        assert_eq!(msrs_in_restore_order(&saved).last().map(|e| e.data), Some(7));
    }

    #[test]
    fn the_start_gate_waits_for_every_vcpu_and_holds_them_until_opened() {
        let gate = Arc::new(StartGate::default());
        let through = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let threads: Vec<_> = (0..3)
            .map(|_| {
                let (gate, through) = (gate.clone(), through.clone());
                std::thread::spawn(move || {
                    gate.report(Ok(()));
                    gate.wait_open();
                    through.fetch_add(1, Ordering::SeqCst);
                })
            })
            .collect();
        gate.wait_reported(3).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert_eq!(through.load(Ordering::SeqCst), 0, "nobody passes a closed gate");
        gate.open();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(through.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn the_start_gate_passes_on_a_filter_error() {
        let gate = StartGate::default();
        gate.report(Ok(()));
        gate.report(Err(seccomp::Error::Duplicate { thread: "vCPU", syscall: "read" }));
        let e = gate.wait_reported(2).unwrap_err();
        assert!(e.to_string().contains("twice"), "{e}");
    }
}
