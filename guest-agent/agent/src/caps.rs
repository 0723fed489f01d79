//! Capability sets of a container's process, as bit masks computed before
//! `clone` (the child only copies them into system calls).

use vmrun_agent_protocol::{capability_number, Capabilities};

/// The highest capability number this agent knows (`CAP_CHECKPOINT_RESTORE`).
pub const LAST_KNOWN: u32 = vmrun_agent_protocol::CAPABILITY_NAMES.len() as u32 - 1;

/// The five sets as masks (bit `n` is capability `n`), limited to what the
/// running kernel knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CapSets {
    /// Bounding set.
    pub bounding: u64,
    /// Effective set.
    pub effective: u64,
    /// Permitted set.
    pub permitted: u64,
    /// Inheritable set.
    pub inheritable: u64,
    /// Ambient set.
    pub ambient: u64,
    /// The kernel's highest capability (`/proc/sys/kernel/cap_last_cap`):
    /// the bounding set is dropped up to it.
    pub last_cap: u32,
}

/// Capability sets that cannot be applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CapsError {
    #[error("unknown capability {0:?} (use names such as CAP_CHOWN or NET_ADMIN)")]
    Unknown(String),
    /// Capabilities (named) in one set but not in the one it must be within.
    #[error("capabilities: {names} {why}")]
    Outside { names: String, why: &'static str },
}

/// The mask of a list of names; an unknown name is an error.
pub fn mask(names: &[String]) -> Result<u64, CapsError> {
    names.iter().try_fold(0u64, |m, n| capability_number(n).map(|c| m | 1 << c).ok_or_else(|| CapsError::Unknown(n.clone())))
}

fn names(mask: u64) -> String {
    let v: Vec<&str> = vmrun_agent_protocol::CAPABILITY_NAMES.iter().enumerate().filter(|(i, _)| mask & 1 << i != 0).map(|(_, n)| *n).collect();
    v.join(", ")
}

impl CapSets {
    /// The masks of `caps`, for a kernel whose highest capability is
    /// `last_cap` (capabilities it does not know are left out, as runc
    /// does). Refused: an unknown name, and sets the kernel would refuse
    /// later with a bare `EPERM` (effective beyond permitted, inheritable
    /// beyond bounding, ambient beyond permitted and inheritable).
    pub fn new(caps: &Capabilities, last_cap: u32) -> Result<Self, CapsError> {
        let known = if last_cap >= 63 { u64::MAX } else { (1u64 << (last_cap + 1)) - 1 };
        let s = Self {
            bounding: mask(&caps.bounding)? & known,
            effective: mask(&caps.effective)? & known,
            permitted: mask(&caps.permitted)? & known,
            inheritable: mask(&caps.inheritable)? & known,
            ambient: mask(&caps.ambient)? & known,
            last_cap,
        };
        let outside = |a: u64, b: u64, why: &'static str| {
            if a & !b != 0 {
                Err(CapsError::Outside { names: names(a & !b), why })
            } else {
                Ok(())
            }
        };
        outside(s.effective, s.permitted, "in the effective set but not in the permitted set")?;
        outside(s.inheritable, s.bounding, "in the inheritable set but not in the bounding set")?;
        outside(s.ambient, s.permitted & s.inheritable, "in the ambient set but not in both the permitted and inheritable sets")?;
        Ok(s)
    }
}

/// The running kernel's highest capability number, or the highest this
/// agent knows when it cannot be read.
pub fn kernel_last_cap() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap").ok().and_then(|s| s.trim().parse().ok()).unwrap_or(LAST_KNOWN)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn docker_default_is_the_well_known_mask() {
        // `CapBnd` / `CapEff` of a `docker run` container as root.
        let s = CapSets::new(&Capabilities::docker_default(true), 40).unwrap();
        assert_eq!((s.bounding, s.effective, s.permitted, s.inheritable, s.ambient), (0xa80425fb, 0xa80425fb, 0xa80425fb, 0, 0));
        let u = CapSets::new(&Capabilities::docker_default(false), 40).unwrap();
        assert_eq!((u.bounding, u.effective, u.permitted), (0xa80425fb, 0, 0));
        assert_eq!(CapSets::new(&Capabilities::all(), 40).unwrap().bounding, 0x1ff_ffff_ffff);
    }

    #[test]
    fn masks_of_names() {
        assert_eq!(mask(&v(&["CAP_CHOWN", "NET_ADMIN", "cap_sys_admin"])).unwrap(), 1 | 1 << 12 | 1 << 21);
        assert_eq!(mask(&[]).unwrap(), 0);
        assert_eq!(mask(&v(&["CAP_CHOWN", "CAP_WHATEVER"])), Err(CapsError::Unknown("CAP_WHATEVER".into())));
    }

    #[test]
    fn capabilities_the_kernel_lacks_are_left_out() {
        let s = CapSets::new(&Capabilities::all(), 37).unwrap();
        assert_eq!(s.bounding, (1 << 38) - 1);
        assert_eq!(s.last_cap, 37);
    }

    #[test]
    fn sets_the_kernel_would_refuse_are_refused() {
        let c = |b: &[&str], e: &[&str], p: &[&str], i: &[&str], a: &[&str]| Capabilities {
            bounding: v(b),
            effective: v(e),
            permitted: v(p),
            inheritable: v(i),
            ambient: v(a),
        };
        let e = CapSets::new(&c(&["CAP_KILL"], &["CAP_KILL"], &[], &[], &[]), 40).unwrap_err().to_string();
        assert!(e.contains("CAP_KILL in the effective set"), "{e}");
        let e = CapSets::new(&c(&[], &[], &[], &["CAP_CHOWN"], &[]), 40).unwrap_err().to_string();
        assert!(e.contains("CAP_CHOWN in the inheritable set"), "{e}");
        let e = CapSets::new(&c(&["CAP_CHOWN"], &[], &["CAP_CHOWN"], &[], &["CAP_CHOWN"]), 40).unwrap_err().to_string();
        assert!(e.contains("ambient"), "{e}");
        let ok = CapSets::new(&c(&["CAP_CHOWN", "CAP_KILL"], &["CAP_CHOWN"], &["CAP_CHOWN"], &["CAP_CHOWN"], &["CAP_CHOWN"]), 40).unwrap();
        assert_eq!((ok.bounding, ok.ambient), (0b100001, 1));
    }
}
