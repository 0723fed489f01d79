//! x86_64 platform code for vmrun guests: where things live in guest memory,
//! and the tables and register values that a 64-bit Linux kernel expects to
//! find when it is entered directly (no firmware, no real mode).
//!
//! Everything here is pure data building and writing into guest memory; the
//! KVM ioctls that apply it live in `vmrun-vmm`.

pub mod boot_params;
pub mod cpuid;
pub mod gdt;
pub mod layout;
pub mod mptable;
pub mod msr;
pub mod paging;
