//! The PC devices a Linux guest expects at fixed ports.

pub mod cmos;
pub mod i8042;
pub mod serial;

pub use cmos::Cmos;
pub use i8042::I8042;
pub use serial::SerialConsole;

/// COM1's I/O ports.
pub const SERIAL_PORT_BASE: u64 = 0x3f8;
/// Number of COM1 registers.
pub const SERIAL_PORT_LEN: u64 = 8;
/// The i8042's data port; the command port is at +4.
pub const I8042_PORT_BASE: u64 = 0x60;
/// Ports 0x60..=0x64.
pub const I8042_PORT_LEN: u64 = 5;
/// The CMOS index port; the data port is at +1.
pub const CMOS_PORT_BASE: u64 = 0x70;
/// Ports 0x70 and 0x71.
pub const CMOS_PORT_LEN: u64 = 2;
