//! Compatibility layer for hosts whose KVM emulates guest kernel mode.
//!
//! Some nested hypervisors (the "PVM" KVM flavour, `/sys/module/kvm_pvm`)
//! run guest user mode natively but emulate guest kernel mode one
//! instruction at a time. On such hosts a stock guest does not get far:
//!
//! * `SYSCALL` from guest user mode lands at `LSTAR` but stays at CPL 3, so
//!   every process dies on its first system call. [`syscall_trap`] hides the
//!   guest's `LSTAR` behind an MSR filter, points the real one at a page the
//!   guest cannot execute, and finishes each `SYSCALL` in the VMM.
//! * The instruction emulator rejects a few instructions the kernel uses;
//!   [`assist`] completes them in the VMM.
//! * CPUID masks set with `KVM_SET_CPUID2` do not reach the guest, so
//!   features the emulator cannot handle are hidden on the kernel command
//!   line instead ([`CMDLINE`]).
//!
//! Nothing here runs on hardware KVM: [`HostCompat::detect`] turns the layer
//! on only where such a host is found (or when forced), and every hook is a
//! no-op when it is off.

pub mod assist;
pub mod syscall_trap;

use std::path::Path;

use kvm_ioctls::{Cap, MsrExitReason, MsrFilterDefaultAction, MsrFilterRange, MsrFilterRangeFlags, VmFd};

use crate::config::HostCompatMode;
use crate::error::{Error, Result};
use vmrun_arch::msr::MSR_LSTAR;

/// Present on hosts running the PVM flavour of KVM.
pub const PVM_MODULE_PATH: &str = "/sys/module/kvm_pvm";

/// Kernel command-line additions on such hosts:
/// * `noxsave`: XRSTOR cannot be emulated;
/// * `nopv`: paravirtual features cause a storm of hypercalls;
/// * `clearcpuid=`: X86_FEATURE bit numbers (Linux 6.1) of features whose
///   instructions the emulator rejects or that fault: cx16, popcnt, rdrand,
///   rdseed, fsgsbase, pcid, invpcid, movbe, clflushopt, clwb, rdpid, pku,
///   rdtscp, smap, smep; and erms and fsrm (297, 580), so that the
///   kernel copies and clears memory with `rep movsq`/`rep stosq` instead
///   of byte-wise `rep movsb`/`rep stosb`, which the emulator steps
///   through a byte at a time (a boot took an eighth less time, and
///   unpacking an image a third less);
/// * `noreplace-smp`: a guest with one vCPU would otherwise rewrite every
///   `lock` prefix of the kernel's text at boot, one text poke each (about
///   2.9M emulated instructions, 8 % of a boot); the prefixes stay;
/// * `percpu_alloc=page`: the per-CPU areas in pages of their own, rather
///   than embedded in a 2 MiB block that is zeroed whole at boot (one
///   `rep stos` the emulator takes about 1.5 s to step through);
/// * `fault_around_bytes=4096` (`kernel-config/patches/0002`): a read
///   fault on a file maps only its own page, not the 16 around it, which
///   a short-lived process then unmaps unused at its exit (a warm run's
///   process, `true`, emulated about a fifth fewer instructions).
pub const CMDLINE: &str = "noxsave nopv \
    clearcpuid=141,151,158,306,288,145,298,150,311,312,534,515,59,308,295,297,580 noreplace-smp percpu_alloc=page \
    fault_around_bytes=4096";

/// Whether the compatibility layer is active for this VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostCompat {
    enabled: bool,
}

impl HostCompat {
    /// Decides from `mode` and, for [`HostCompatMode::Auto`], the host.
    pub fn detect(mode: HostCompatMode) -> Self {
        Self::decide(mode, Path::new(PVM_MODULE_PATH).exists())
    }

    fn decide(mode: HostCompatMode, emulating_host: bool) -> Self {
        let enabled = match mode {
            HostCompatMode::On => true,
            HostCompatMode::Off => false,
            HostCompatMode::Auto => emulating_host,
        };
        Self { enabled }
    }

    /// Whether the layer is on.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// What to append to the kernel command line. `tsc_khz` is the guest's
    /// TSC frequency (KVM's): with `nopv` there is no kvm-clock, and this
    /// host offers no PIT or HPET to calibrate the TSC against, so without
    /// it the guest falls back to the jiffies clocksource, on which it cannot
    /// stop its tick when idle; an idle guest then takes 100 timer
    /// interrupts a second, each one emulated (about an eighth of a host
    /// CPU per idle VM). Given the frequency, it keeps the TSC and idles
    /// tickless. `tsc=reliable`: no other clock is there to watch it with.
    pub fn cmdline(&self, tsc_khz: Option<u32>) -> Option<String> {
        if !self.enabled {
            return None;
        }
        Some(match tsc_khz {
            Some(khz) if khz > 0 => format!("{CMDLINE} tsc_early_khz={khz} tsc=reliable"),
            _ => CMDLINE.to_string(),
        })
    }

    /// VM-wide setup: route the guest's accesses to `LSTAR` to the VMM.
    pub fn setup_vm(&self, vm: &VmFd) -> Result<()> {
        if !self.enabled {
            return Ok(());
        }
        if !vm.check_extension(Cap::X86UserSpaceMsr) || !vm.check_extension(Cap::X86MsrFilter) {
            return Err(Error::KvmCapability("KVM_CAP_X86_USER_SPACE_MSR and KVM_CAP_X86_MSR_FILTER"));
        }
        let cap = kvm_bindings::kvm_enable_cap {
            cap: kvm_bindings::KVM_CAP_X86_USER_SPACE_MSR,
            args: [u64::from(MsrExitReason::Filter.bits()), 0, 0, 0],
            ..Default::default()
        };
        vm.enable_cap(&cap).map_err(Error::kvm("KVM_ENABLE_CAP(X86_USER_SPACE_MSR)"))?;
        // One MSR, its bit clear: denied, hence forwarded to the VMM.
        let deny_lstar = [0u8; 1];
        let range = MsrFilterRange {
            flags: MsrFilterRangeFlags::READ | MsrFilterRangeFlags::WRITE,
            base: MSR_LSTAR,
            msr_count: 1,
            bitmap: &deny_lstar,
        };
        vm.set_msr_filter(MsrFilterDefaultAction::ALLOW, &[range])
            .map_err(Error::kvm("KVM_X86_SET_MSR_FILTER"))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mode_overrides_detection() {
        assert!(HostCompat::decide(HostCompatMode::Auto, true).enabled());
        assert!(!HostCompat::decide(HostCompatMode::Auto, false).enabled());
        assert!(HostCompat::decide(HostCompatMode::On, false).enabled());
        assert!(!HostCompat::decide(HostCompatMode::Off, true).enabled());
    }

    #[test]
    fn cmdline_only_when_enabled() {
        assert_eq!(HostCompat::decide(HostCompatMode::Off, true).cmdline(Some(2_000_000)), None);
        let c = HostCompat::decide(HostCompatMode::On, false).cmdline(None).unwrap();
        assert!(c.contains("noxsave") && c.contains("clearcpuid=141,"));
        assert!(!c.contains("tsc"));
        let c = HostCompat::decide(HostCompatMode::On, false).cmdline(Some(2_000_000)).unwrap();
        assert!(c.ends_with(" tsc_early_khz=2000000 tsc=reliable"), "{c}");
    }
}
