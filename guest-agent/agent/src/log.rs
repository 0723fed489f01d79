//! Logging to the console: one `write(2)` per line on standard error (in
//! the guest, PID 1's standard error is `/dev/console`). Each line costs a
//! system call and serial output in the guest, so the agent logs little:
//! errors, and one line when it is ready.

use std::fmt;
use std::io::Write;
use std::os::fd::BorrowedFd;
use std::sync::atomic::{AtomicU8, Ordering};

static LEVEL: AtomicU8 = AtomicU8::new(1);

/// Logs errors and the ready line only.
pub const INFO: u8 = 1;
/// Logs what the agent does.
pub const DEBUG: u8 = 2;

/// Sets the level ([`INFO`] or [`DEBUG`]).
pub fn set_level(level: u8) {
    LEVEL.store(level, Ordering::Relaxed);
}

/// Whether debug lines are written.
pub fn debug_enabled() -> bool {
    LEVEL.load(Ordering::Relaxed) >= DEBUG
}

fn emit(level: &str, args: fmt::Arguments<'_>) {
    let mut line = Vec::with_capacity(128);
    let _ = writeln!(line, "vmrun-agent: {level}{args}");
    // SAFETY: descriptor 2 stays open for the life of the process.
    let fd = unsafe { BorrowedFd::borrow_raw(2) };
    let _ = crate::sys::write_all(fd, &line);
}

/// An informational line (always written).
pub fn info(args: fmt::Arguments<'_>) {
    emit("", args);
}

/// An error line (always written).
pub fn error(args: fmt::Arguments<'_>) {
    emit("error: ", args);
}

/// A debug line (written with `vmrun.log=debug` or `--debug`).
pub fn debug(args: fmt::Arguments<'_>) {
    if debug_enabled() {
        emit("debug: ", args);
    }
}
