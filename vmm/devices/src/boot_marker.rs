//! vmrun's boot marker: a guest write to [`BOOT_MARKER_ADDR`] (any width,
//! any value) makes the VMM record how long after its own start the write
//! came. Like Firecracker's boot timer, but on an MMIO page, so that a user
//! space program can reach it through `/dev/mem`:
//!
//! ```sh
//! devmem 0xd0000000 8 1    # busybox
//! ```
//!
//! [`BOOT_MARKER_ADDR`]: ../../vmrun_arch/layout/constant.BOOT_MARKER_ADDR.html

use crate::BusDevice;

/// What to do when the guest writes the marker: called with the value
/// written (little endian, zero-extended).
pub type OnMark = Box<dyn FnMut(u64) + Send>;

/// The boot marker device.
pub struct BootMarker {
    on_mark: OnMark,
}

impl std::fmt::Debug for BootMarker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BootMarker").finish()
    }
}

impl BootMarker {
    /// A marker calling `on_mark` for each guest write.
    pub fn new(on_mark: OnMark) -> Self {
        Self { on_mark }
    }
}

impl BusDevice for BootMarker {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        let mut v = [0u8; 8];
        let n = data.len().min(8);
        v[..n].copy_from_slice(&data[..n]);
        (self.on_mark)(u64::from_le_bytes(v));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[test]
    fn each_write_is_reported_with_its_value() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let mut m = BootMarker::new(Box::new(move |v| s.lock().unwrap().push(v)));
        m.write(0, &[7]);
        m.write(0, &0x1234_5678u32.to_le_bytes());
        m.write(0, &[1, 2, 3, 4, 5, 6, 7, 8, 9]);
        assert_eq!(*seen.lock().unwrap(), vec![7, 0x1234_5678, 0x0807_0605_0403_0201]);
    }
}
