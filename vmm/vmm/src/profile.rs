//! A sampling profiler of the guest: where the vCPUs spend their time.
//!
//! Each vCPU thread arms a POSIX timer on its own CPU-time clock that
//! sends it the kick signal every [`INTERVAL`] of CPU time; the signal
//! interrupts `KVM_RUN`, and the thread records where the guest was: the
//! instruction pointer and, in kernel mode, the words on the kernel stack
//! that point into the kernel's image (the return addresses a "guess"
//! unwinder would find, with some stale ones among them). A halted vCPU
//! uses no CPU time and is not sampled. On a host that emulates guest
//! kernel mode, the vCPU thread's CPU time in the guest kernel is the
//! emulator's, so the samples fall where the emulated instructions go.
//!
//! The samples are written as JSON ([`Profile`]) when the VM ends; `vmrun
//! profile` maps the addresses to the kernel's symbols.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

pub use vmrun_vmm_api::profile::{Profile, Sample};

/// CPU time of a vCPU thread between two samples.
pub const INTERVAL: Duration = Duration::from_millis(1);
/// The kernel's image is mapped here (x86-64's `__START_KERNEL_map`, 1 GiB).
const KERNEL_IMAGE: std::ops::Range<u64> = 0xffff_ffff_8000_0000..0xffff_ffff_c000_0000;
/// Guest addresses from here up are the kernel's half.
const KERNEL_HALF: u64 = 0xffff_8000_0000_0000;
/// Kernel stacks are this size and aligned to it (x86-64, without KASAN).
const KERNEL_STACK: u64 = 16 << 10;
/// The most return addresses kept per sample.
const MAX_FRAMES: usize = 48;

/// Where a sample found the guest: the epoch, kernel mode or not, and the
/// stack (see [`Sample`]).
type Place = (u32, bool, Vec<u64>);

/// The samples of all vCPUs, counted by stack.
#[derive(Debug, Default)]
pub struct Profiler {
    samples: Mutex<HashMap<Place, u64>>,
    epoch: AtomicU32,
}

impl Profiler {
    /// Records where `fd`'s guest is now (called on the vCPU's thread,
    /// after its `KVM_RUN` was interrupted).
    pub fn sample(&self, fd: &VcpuFd, mem: &GuestMemoryMmap) {
        let Ok(regs) = fd.get_regs() else { return };
        let kernel = regs.rip >= KERNEL_HALF;
        let mut stack = vec![regs.rip];
        if kernel {
            stack.extend(kernel_return_addresses(fd, mem, regs.rsp));
        }
        let epoch = self.epoch.load(Ordering::Relaxed);
        let mut samples = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        *samples.entry((epoch, kernel, stack)).or_default() += 1;
    }

    /// Ends the current epoch (a `stats` request was answered).
    pub fn next_epoch(&self) {
        self.epoch.fetch_add(1, Ordering::Relaxed);
    }

    /// The samples so far, the most frequent first.
    pub fn profile(&self) -> Profile {
        let samples = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<Sample> = samples
            .iter()
            .map(|((epoch, kernel, stack), &count)| Sample { count, epoch: *epoch, kernel: *kernel, stack: stack.clone() })
            .collect();
        v.sort_by(|a, b| b.count.cmp(&a.count).then_with(|| (a.epoch, &a.stack).cmp(&(b.epoch, &b.stack))));
        Profile { interval_us: INTERVAL.as_micros() as u64, samples: v }
    }

    /// Writes [`Profiler::profile`] to `path` as JSON.
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        let json = serde_json::to_vec(&self.profile()).map_err(std::io::Error::other)?;
        std::fs::write(path, json)
    }
}

/// The words between `rsp` and the top of its kernel stack that point into
/// the kernel's image, innermost first.
fn kernel_return_addresses(fd: &VcpuFd, mem: &GuestMemoryMmap, rsp: u64) -> Vec<u64> {
    let mut found = Vec::new();
    let top = (rsp | (KERNEL_STACK - 1)).saturating_add(1);
    let mut va = rsp & !7;
    while va < top && found.len() < MAX_FRAMES {
        let Ok(t) = fd.translate_gva(va) else { break };
        if t.valid == 0 {
            break;
        }
        // The guest chooses rsp: its last page ends at the top of the
        // address space, where the next page's address would overflow.
        let page_end = (va | 0xfff).saturating_add(1).min(top);
        let mut buf = vec![0u8; (page_end - va) as usize];
        if mem.read_slice(&mut buf, GuestAddress(t.physical_address)).is_err() {
            break;
        }
        found.extend(text_words(&buf).take(MAX_FRAMES - found.len()));
        va = page_end;
    }
    found
}

/// The little-endian words of `bytes` that fall in the kernel's image.
fn text_words(bytes: &[u8]) -> impl Iterator<Item = u64> + '_ {
    bytes.chunks_exact(8).map(|w| u64::from_le_bytes(w.try_into().expect("chunks of 8"))).filter(|w| KERNEL_IMAGE.contains(w))
}

/// A timer on the calling thread's CPU-time clock that sends it `signal`
/// every [`INTERVAL`]; deleted when dropped.
#[derive(Debug)]
pub struct SampleTimer(libc::timer_t);

impl SampleTimer {
    /// Arms the timer for the calling thread.
    pub fn arm(signal: libc::c_int) -> std::io::Result<Self> {
        // SAFETY: a zeroed sigevent is valid; the fields set below are the
        // ones SIGEV_THREAD_ID reads.
        let mut ev: libc::sigevent = unsafe { std::mem::zeroed() };
        ev.sigev_notify = libc::SIGEV_THREAD_ID;
        ev.sigev_signo = signal;
        // SAFETY: gettid has no preconditions.
        ev.sigev_notify_thread_id = unsafe { libc::gettid() };
        let mut timer: libc::timer_t = std::ptr::null_mut();
        // SAFETY: `ev` and `timer` are valid for the call; the thread's
        // CPU-time clock exists while the thread does.
        if unsafe { libc::timer_create(libc::CLOCK_THREAD_CPUTIME_ID, &mut ev, &mut timer) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let armed = Self(timer);
        let every = libc::timespec { tv_sec: 0, tv_nsec: INTERVAL.as_nanos() as libc::c_long };
        let spec = libc::itimerspec { it_interval: every, it_value: every };
        // SAFETY: the timer was just created; `spec` is valid for the call.
        if unsafe { libc::timer_settime(armed.0, 0, &spec, std::ptr::null_mut()) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(armed)
    }
}

impl Drop for SampleTimer {
    fn drop(&mut self) {
        // SAFETY: the timer is ours and deleted once.
        unsafe { libc::timer_delete(self.0) };
    }
}

// SAFETY: a timer id is a plain handle the kernel owns; it may be deleted
// from any thread.
unsafe impl Send for SampleTimer {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_words_in_the_kernel_image_are_return_addresses() {
        let words: [u64; 5] = [0xffff_ffff_8100_1234, 0x7fff_0000_1000, 0xffff_8880_0000_1000, 0xffff_ffff_bfff_fff8, 0];
        let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).chain([0xff, 0xff]).collect();
        assert_eq!(text_words(&bytes).collect::<Vec<_>>(), vec![0xffff_ffff_8100_1234, 0xffff_ffff_bfff_fff8]);
    }

    #[test]
    fn samples_are_counted_by_stack_and_listed_most_frequent_first() {
        let p = Profiler::default();
        {
            let mut s = p.samples.lock().unwrap();
            *s.entry((0, true, vec![1, 2])).or_default() += 1;
            *s.entry((0, false, vec![7])).or_default() += 3;
        }
        p.next_epoch();
        assert_eq!(p.epoch.load(Ordering::Relaxed), 1);
        let profile = p.profile();
        assert_eq!(profile.samples[0], Sample { count: 3, epoch: 0, kernel: false, stack: vec![7] });
        assert_eq!(profile.samples[1], Sample { count: 1, epoch: 0, kernel: true, stack: vec![1, 2] });
        assert_eq!(profile.interval_us, 1000);
    }

    #[test]
    fn the_timer_interrupts_a_busy_thread() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static HITS: AtomicUsize = AtomicUsize::new(0);
        extern "C" fn hit(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
            HITS.fetch_add(1, Ordering::Relaxed);
        }
        // A signal of its own, so that no other test's handler is replaced.
        let signal = libc::SIGRTMIN() + 3;
        vmm_sys_util::signal::register_signal_handler(signal, hit).unwrap();
        let timer = SampleTimer::arm(signal).unwrap();
        let start = std::time::Instant::now();
        while HITS.load(Ordering::Relaxed) < 5 && start.elapsed() < Duration::from_secs(10) {
            std::hint::spin_loop();
        }
        drop(timer);
        assert!(HITS.load(Ordering::Relaxed) >= 5, "the CPU-time timer never fired");
    }
}
