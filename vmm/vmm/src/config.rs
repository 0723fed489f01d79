//! What a VM is made of: everything the CLI or a library user decides.

use std::path::PathBuf;

pub use vmrun_devices::virtio::net::Mac;

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

/// A network interface: virtio-net on a TAP device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetConfig {
    /// The TAP device's name (it is created if it does not exist and the
    /// VMM may create it; then it goes away with the VMM).
    pub tap: String,
    /// The guest's MAC address; default: a locally administered address
    /// derived from the TAP name.
    pub mac: Option<Mac>,
}

impl std::str::FromStr for NetConfig {
    type Err = String;

    /// `tap=NAME[,mac=MAC]`.
    fn from_str(s: &str) -> Result<Self, String> {
        let (mut tap, mut mac) = (None, None);
        for opt in s.split(',') {
            match opt.split_once('=') {
                Some(("tap", v)) if !v.is_empty() => tap = Some(v.to_string()),
                Some(("mac", v)) => mac = Some(v.parse::<Mac>()?),
                _ => return Err(format!("unknown network option {opt:?} (use tap=NAME[,mac=MAC])")),
            }
        }
        Ok(NetConfig { tap: tap.ok_or("a network interface needs tap=NAME")?, mac })
    }
}

impl NetConfig {
    /// The MAC address to use: the configured one, or one derived from the
    /// TAP name (locally administered, unicast).
    pub fn mac(&self) -> Mac {
        self.mac.unwrap_or_else(|| {
            let h = self.tap.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
            let b = h.to_le_bytes();
            Mac([0x06, 0x00, b[0], b[1], b[2], b[3]])
        })
    }
}

/// A vsock device bridged to Unix sockets, Firecracker style.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VsockConfig {
    /// The guest's context id (3 or more).
    pub cid: u64,
    /// The Unix socket host programs connect to (`CONNECT <port>`); guest
    /// connections to port P arrive at `<uds>_<P>`.
    pub uds: PathBuf,
}

impl std::str::FromStr for VsockConfig {
    type Err = String;

    /// `cid=N,uds=PATH`.
    fn from_str(s: &str) -> Result<Self, String> {
        let (mut cid, mut uds) = (None, None);
        for opt in s.split(',') {
            match opt.split_once('=') {
                Some(("cid", v)) => cid = Some(v.parse::<u64>().map_err(|_| format!("invalid vsock cid {v:?}"))?),
                Some(("uds", v)) if !v.is_empty() => uds = Some(PathBuf::from(v)),
                _ => return Err(format!("unknown vsock option {opt:?} (use cid=N,uds=PATH)")),
            }
        }
        let cid = cid.ok_or("vsock needs cid=N")?;
        if cid < 3 || cid >= u64::from(u32::MAX) {
            return Err(format!("vsock cid {cid} is reserved; use 3 or more"));
        }
        Ok(VsockConfig { cid, uds: uds.ok_or("vsock needs uds=PATH")? })
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
    /// Network interfaces (eth0, eth1, ...).
    pub nets: Vec<NetConfig>,
    /// Serve the control socket (pause, resume, snapshot, stop) here.
    pub control: Option<PathBuf>,
    /// A vsock device.
    pub vsock: Option<VsockConfig>,
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
            nets: Vec::new(),
            control: None,
            vsock: None,
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

    #[test]
    fn vsock_options() {
        let v: VsockConfig = "cid=3,uds=/run/v.sock".parse().unwrap();
        assert_eq!(v, VsockConfig { cid: 3, uds: "/run/v.sock".into() });
        assert!("cid=2,uds=/x".parse::<VsockConfig>().is_err(), "CID 2 is the host");
        assert!("cid=3".parse::<VsockConfig>().is_err());
        assert!("uds=/x".parse::<VsockConfig>().is_err());
        assert!("cid=x,uds=/x".parse::<VsockConfig>().is_err());
    }

    #[test]
    fn net_options() {
        let n: NetConfig = "tap=vmtap0,mac=06:00:ac:10:00:02".parse().unwrap();
        assert_eq!(n.tap, "vmtap0");
        assert_eq!(n.mac().to_string(), "06:00:ac:10:00:02");
        let n: NetConfig = "tap=vmtap1".parse().unwrap();
        let m = n.mac();
        assert_eq!(m.0[0], 0x06, "locally administered unicast");
        assert_eq!(m, "tap=vmtap1".parse::<NetConfig>().unwrap().mac(), "stable");
        assert_ne!(m, "tap=vmtap2".parse::<NetConfig>().unwrap().mac());
        assert!("mac=06:00:ac:10:00:02".parse::<NetConfig>().is_err());
        assert!("tap=x,mac=zz".parse::<NetConfig>().is_err());
        assert!("tap=x,speed=10".parse::<NetConfig>().is_err());
    }
}
