//! What a VM is made of: everything the CLI or a library user decides.

use std::path::PathBuf;

/// The kernel command line used when the user gives none: the serial
/// console, reboot through the i8042 (which ends the VMM), and a reboot one
/// second after a panic.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1";

/// Where the guest's serial console goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConsoleOutput {
    /// The VMM's standard output.
    Stdout,
    /// A file, created or truncated.
    File(PathBuf),
    /// Nowhere.
    Null,
}

/// Whether to run the compatibility layer for hosts whose KVM emulates guest
/// kernel mode (see [`crate::host_compat`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostCompatMode {
    /// On if such a host is detected.
    Auto,
    /// Always on.
    On,
    /// Always off.
    Off,
}

/// A VM to boot.
#[derive(Clone, Debug)]
pub struct VmConfig {
    /// ELF `vmlinux` or bzImage.
    pub kernel: PathBuf,
    /// Initramfs (cpio, optionally compressed), if any.
    pub initrd: Option<PathBuf>,
    /// Kernel command line; the VMM appends what its devices and the host
    /// compatibility layer need.
    pub cmdline: String,
    /// Guest memory in MiB.
    pub mem_mib: u32,
    /// Number of vCPUs.
    pub vcpus: u8,
    /// Where the serial console goes.
    pub console: ConsoleOutput,
    /// Forward the VMM's standard input to the serial console.
    pub console_input: bool,
    /// Host compatibility layer.
    pub host_compat: HostCompatMode,
    /// Write a JSON boot report here when the VM ends.
    pub report: Option<PathBuf>,
}

impl VmConfig {
    /// A configuration with the defaults: 128 MiB, one vCPU, console on
    /// standard output, the default command line.
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        Self {
            kernel: kernel.into(),
            initrd: None,
            cmdline: DEFAULT_CMDLINE.to_string(),
            mem_mib: 128,
            vcpus: 1,
            console: ConsoleOutput::Stdout,
            console_input: true,
            host_compat: HostCompatMode::Auto,
            report: None,
        }
    }
}
