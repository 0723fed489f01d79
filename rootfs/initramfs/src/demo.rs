//! The demo and test guest: busybox and a shell-script init that prints a
//! line, writes the boot marker and reboots (which ends the VMM).

use std::io::Write;

use crate::{Archive, Error};

/// The line the demo init prints.
pub const GREETING: &str = "Hello from a vmrun microVM";

/// Boot marker address (see `vmrun_arch::layout::BOOT_MARKER_ADDR`).
pub const BOOT_MARKER_ADDR: u64 = 0xd000_0000;

/// The demo init script. Besides its greeting it prints the kernel release
/// and the number of CPUs the guest sees, so a test can check them.
pub fn init_script() -> String {
    format!(
        r#"#!/bin/busybox sh
export PATH=/bin
busybox mount -t proc proc /proc
busybox mount -t devtmpfs dev /dev
echo "{GREETING}"
echo "guest: kernel $(busybox uname -r), $(busybox grep -c ^processor /proc/cpuinfo) cpu(s)"
busybox devmem {BOOT_MARKER_ADDR:#x} 8 1
busybox reboot -f
"#
    )
}

/// Writes the demo initramfs with `busybox` (a static binary) to `out`.
pub fn write<W: Write>(out: W, busybox: &[u8]) -> Result<W, Error> {
    write_with_init(out, busybox, &init_script())
}

/// Writes an initramfs with `busybox` and `init` (a shell script run by
/// busybox) to `out`.
pub fn write_with_init<W: Write>(out: W, busybox: &[u8], init: &str) -> Result<W, Error> {
    let mut a = Archive::new(out);
    for d in ["bin", "dev", "proc", "sys", "tmp"] {
        a.dir(d, 0o755)?;
    }
    a.char_device("dev/console", 0o600, 5, 1)?;
    a.file("bin/busybox", 0o755, busybox)?;
    a.symlink("bin/sh", "busybox")?;
    a.file("init", 0o755, init.as_bytes())?;
    a.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn script_writes_the_marker_and_reboots() {
        let s = init_script();
        assert!(s.starts_with("#!/bin/busybox sh\n"));
        assert!(s.contains("devmem 0xd0000000 8 1"));
        assert!(s.trim_end().ends_with("reboot -f"));
    }

    #[test]
    fn archive_holds_init_and_busybox() {
        let bytes = write(Vec::new(), b"\x7fELF fake").unwrap();
        let text = String::from_utf8_lossy(&bytes);
        assert!(text.contains("bin/busybox") && text.contains("dev/console") && text.contains(GREETING));
    }
}
