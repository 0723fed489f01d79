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

/// A disk: a raw image file behind virtio-blk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskConfig {
    pub path: PathBuf,
    pub read_only: bool,
    /// Serial the guest sees (`/sys/block/vdX/serial`); default `diskN`.
    pub id: Option<String>,
}

impl std::str::FromStr for DiskConfig {
    type Err = String;

    /// `PATH[,ro][,id=NAME]`.
    fn from_str(s: &str) -> Result<Self, String> {
        let mut parts = s.split(',');
        let path = parts.next().filter(|p| !p.is_empty()).ok_or("a disk needs a path: PATH[,ro][,id=NAME]")?;
        let mut disk = DiskConfig { path: path.into(), read_only: false, id: None };
        for opt in parts {
            match opt.split_once('=') {
                None if opt == "ro" => disk.read_only = true,
                None if opt == "rw" => disk.read_only = false,
                Some(("id", v)) if !v.is_empty() && v.len() <= 20 => disk.id = Some(v.to_string()),
                Some(("id", _)) => return Err("a disk id has 1 to 20 characters".into()),
                _ => return Err(format!("unknown disk option {opt:?} (use ro, rw, id=NAME)")),
            }
        }
        Ok(disk)
    }
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
    /// Disks, in the order the guest sees them (vda, vdb, ...).
    pub disks: Vec<DiskConfig>,
    /// A virtio-rng device fed from the host's getrandom.
    pub rng: bool,
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
            disks: Vec::new(),
            rng: true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_options() {
        let d: DiskConfig = "/img/a.raw,ro,id=layers".parse().unwrap();
        assert_eq!(d, DiskConfig { path: "/img/a.raw".into(), read_only: true, id: Some("layers".into()) });
        let d: DiskConfig = "b.raw".parse().unwrap();
        assert!(!d.read_only && d.id.is_none());
        assert!("".parse::<DiskConfig>().is_err());
        assert!("a,bogus".parse::<DiskConfig>().is_err());
        assert!("a,id=".parse::<DiskConfig>().is_err());
        assert!("a,id=123456789012345678901".parse::<DiskConfig>().is_err());
    }
}
