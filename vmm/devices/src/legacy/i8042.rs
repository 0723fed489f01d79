//! The i8042 keyboard controller, reduced to what a guest without a keyboard
//! uses it for: resetting the machine (command 0xFE on port 0x64), which
//! vmrun turns into a clean exit of the VMM.

use vm_superio::I8042Device;

use crate::{BusDevice, EventFdTrigger};

/// The i8042 at ports 0x60..=0x64.
#[derive(Debug)]
pub struct I8042(I8042Device<EventFdTrigger>);

impl I8042 {
    /// An i8042 that signals `reset` when the guest resets the machine.
    pub fn new(reset: EventFdTrigger) -> Self {
        Self(I8042Device::new(reset))
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // Status 0: no data waiting, input buffer empty, so the kernel's
        // waits for the controller end at once.
        let v = self.0.read(offset as u8);
        data.fill(v);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let [value] = data {
            if let Err(e) = self.0.write(offset as u8, *value) {
                log::error!("i8042: cannot signal the reset: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EventFd;

    #[test]
    fn reset_command_signals() {
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = I8042::new(EventFdTrigger::try_clone(&evt).unwrap());
        dev.write(0, &[0xfe]);
        assert!(evt.read().is_err(), "a write to the data port is no reset");
        dev.write(4, &[0xaa]);
        assert!(evt.read().is_err(), "another command is no reset");
        dev.write(4, &[0xfe]);
        assert_eq!(evt.read().unwrap(), 1);
        let mut s = [0xffu8];
        dev.read(4, &mut s);
        assert_eq!(s, [0]);
    }
}
