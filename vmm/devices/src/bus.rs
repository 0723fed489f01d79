//! Address buses: which device answers an access at a given port or MMIO
//! address. Devices are registered once at VM build time; lookups happen on
//! every exit of a vCPU thread.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device reachable through a bus.
pub trait BusDevice: Send {
    /// The guest reads `data.len()` bytes at `offset` from the device's base.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// The guest writes `data` at `offset` from the device's base.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Error registering a device.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// The new range overlaps a registered one.
    #[error("bus range {base:#x}+{len:#x} overlaps a registered device")]
    Overlap { base: u64, len: u64 },
    /// An empty or wrapping range.
    #[error("invalid bus range {base:#x}+{len:#x}")]
    InvalidRange { base: u64, len: u64 },
}

/// A shared device on a bus.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

#[derive(Clone)]
struct Range {
    len: u64,
    device: SharedDevice,
}

/// A set of non-overlapping address ranges, each served by one device.
#[derive(Clone, Default)]
pub struct Bus {
    ranges: BTreeMap<u64, Range>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.ranges.iter().map(|(b, r)| (*b, r.len))).finish()
    }
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `device` for `[base, base + len)`.
    pub fn insert(&mut self, device: SharedDevice, base: u64, len: u64) -> Result<(), Error> {
        let end = base.checked_add(len).filter(|_| len > 0).ok_or(Error::InvalidRange { base, len })?;
        let overlaps_below = self.ranges.range(..base).next_back().is_some_and(|(b, r)| b + r.len > base);
        let overlaps_above = self.ranges.range(base..end).next().is_some();
        if overlaps_below || overlaps_above {
            return Err(Error::Overlap { base, len });
        }
        self.ranges.insert(base, Range { len, device });
        Ok(())
    }

    fn find(&self, addr: u64, size: usize) -> Option<(u64, &SharedDevice)> {
        let (base, range) = self.ranges.range(..=addr).next_back()?;
        let offset = addr - base;
        (offset.checked_add(size as u64)? <= range.len).then_some((offset, &range.device))
    }

    /// Routes a read; `false` if no device covers the whole access.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((offset, dev)) => {
                lock(dev).read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Routes a write; `false` if no device covers the whole access.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((offset, dev)) => {
                lock(dev).write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// Locks a device; a device whose lock was poisoned by a panicking thread is
/// still usable (its state is plain data).
fn lock(dev: &SharedDevice) -> std::sync::MutexGuard<'_, dyn BusDevice + 'static> {
    dev.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        last: Option<(u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.last = Some((offset, data.to_vec()));
        }
    }

    #[test]
    fn routes_by_offset() {
        let dev = Arc::new(Mutex::new(Recorder::default()));
        let mut bus = Bus::new();
        bus.insert(dev.clone(), 0x3f8, 8).unwrap();
        let mut buf = [0u8; 1];
        assert!(bus.read(0x3fd, &mut buf));
        assert_eq!(buf, [5]);
        assert!(bus.write(0x3f9, &[0xab]));
        assert_eq!(dev.lock().unwrap().last, Some((1, vec![0xab])));
    }

    #[test]
    fn unmapped_and_straddling_accesses_miss() {
        let mut bus = Bus::new();
        bus.insert(Arc::new(Mutex::new(Recorder::default())), 0x1000, 0x10).unwrap();
        let mut buf = [0u8; 4];
        assert!(!bus.read(0xfff, &mut buf[..1]));
        assert!(!bus.read(0x1010, &mut buf[..1]));
        assert!(!bus.read(0x100e, &mut buf), "4 bytes at 0x100e run past the device");
        assert!(!bus.write(u64::MAX, &buf));
        assert!(bus.read(0x100c, &mut buf));
    }

    #[test]
    fn overlaps_are_refused() {
        let mut bus = Bus::new();
        let d = || -> SharedDevice { Arc::new(Mutex::new(Recorder::default())) };
        bus.insert(d(), 0x100, 0x10).unwrap();
        assert_eq!(bus.insert(d(), 0x108, 0x10), Err(Error::Overlap { base: 0x108, len: 0x10 }));
        assert_eq!(bus.insert(d(), 0xf8, 0x10), Err(Error::Overlap { base: 0xf8, len: 0x10 }));
        assert_eq!(bus.insert(d(), 0x100, 1), Err(Error::Overlap { base: 0x100, len: 1 }));
        assert_eq!(bus.insert(d(), 5, 0), Err(Error::InvalidRange { base: 5, len: 0 }));
        assert_eq!(bus.insert(d(), u64::MAX, 2), Err(Error::InvalidRange { base: u64::MAX, len: 2 }));
        bus.insert(d(), 0x110, 0x10).unwrap();
        bus.insert(d(), 0xf0, 0x10).unwrap();
    }
}
