//! One vCPU: its boot-time register state and the thread that runs it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use kvm_bindings::{kvm_fpu, kvm_regs, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::error::{Error, Result};
use crate::host_compat::{assist, syscall_trap, HostCompat};
use crate::vm::ExitReason;
use vmrun_arch::gdt::{self, BOOT_GDT, CODE_INDEX, DATA_INDEX, TSS_INDEX};
use vmrun_arch::layout::{BOOT_GDT_START, BOOT_IDT_START, BOOT_STACK_POINTER, ZERO_PAGE_START};
use vmrun_arch::msr::{self, EFER_LMA, EFER_LME, MSR_LSTAR, MSR_STAR, MSR_SYSCALL_MASK};
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

/// KVM's supported CPUID table, fetched once per VM.
pub fn supported_cpuid(kvm: &Kvm) -> Result<CpuId> {
    kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(Error::kvm("KVM_GET_SUPPORTED_CPUID"))
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
    /// Creates vCPU `id` of `count` and sets its boot state. vCPU 0 starts at
    /// `entry` in 64-bit mode; the others wait for the guest to start them.
    pub fn new(
        vm: &kvm_ioctls::VmFd,
        cpuid_template: &CpuId,
        mem: &GuestMemoryMmap,
        id: u8,
        count: u8,
        entry: u64,
    ) -> Result<Self> {
        let fd = vm.create_vcpu(u64::from(id)).map_err(Error::kvm("KVM_CREATE_VCPU"))?;

        let mut cpuid = cpuid_template.clone();
        cpuid::adjust(cpuid.as_mut_slice(), id, count);
        fd.set_cpuid2(&cpuid).map_err(Error::kvm("KVM_SET_CPUID2"))?;

        let entries = msr::boot_msrs();
        let msrs = Msrs::from_entries(&entries).map_err(|e| Error::Config(format!("MSR list: {e:?}")))?;
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
            Self::setup_boot_registers(&fd, mem, entry)?;
        }
        Ok(Self { id, fd, guest_lstar: 0 })
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

    /// Runs the vCPU until the VM ends or `shared.stop` is set.
    pub fn run(mut self, shared: VcpuShared, on_first_run: Option<Box<dyn FnOnce() + Send>>) {
        if let Some(f) = on_first_run {
            f();
        }
        while !shared.stop.load(Ordering::Acquire) {
            let next = self.run_once(&shared);
            let outcome = match next {
                Next::Continue => Ok(()),
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
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Next::Continue,
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
