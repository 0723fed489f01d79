//! What a VM is made of: everything the CLI or a library user decides.

use std::path::PathBuf;

pub use vmrun_devices::virtio::net::Mac;
use vmrun_devices::rate_limiter::RateLimitConfig;

/// The kernel command line used when the user gives none: the serial
/// console, reboot through the i8042 (which ends the VMM), and a reboot one
/// second after a panic.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1";

/// Default bound on a console log file (`--console-limit`): 16 MiB.
pub const DEFAULT_CONSOLE_LIMIT: u64 = 16 << 20;

/// Parses a byte count: digits with an optional suffix `k`, `m` or `g`
/// (KiB, MiB, GiB: powers of 1024; either case), e.g. `4096`, `512k`,
/// `10m`, `1g`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let bad = || format!("invalid size {s:?} (use a number of bytes, optionally with k, m or g: 512k, 10m, 1g)");
    let (digits, shift) = match s.as_bytes().last() {
        Some(b'k' | b'K') => (&s[..s.len() - 1], 10),
        Some(b'm' | b'M') => (&s[..s.len() - 1], 20),
        Some(b'g' | b'G') => (&s[..s.len() - 1], 30),
        _ => (s, 0),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let n: u64 = digits.parse().map_err(|_| format!("size {s:?} is too large"))?;
    n.checked_mul(1 << shift).ok_or_else(|| format!("size {s:?} is too large"))
}

/// Largest rate accepted (bytes or operations per second): 2^50, a
/// petabyte per second, is effectively unlimited and keeps the limiter's
/// arithmetic comfortable.
const MAX_RATE: u64 = 1 << 50;

/// Parses the value of a rate key (`bw=`, `iops=`...): a positive count per
/// second; with `sizes`, `k`/`m`/`g` suffixes are accepted.
fn parse_rate(key: &str, v: &str, sizes: bool) -> Result<u64, String> {
    let n = if sizes {
        parse_size(v).map_err(|e| format!("{key}: {e}"))?
    } else {
        v.parse::<u64>().map_err(|_| format!("{key}: invalid count {v:?} (use a whole number per second)"))?
    };
    if n == 0 {
        return Err(format!("{key}=0 would stop the device; leave {key} out for no limit"));
    }
    if n > MAX_RATE {
        return Err(format!("{key}={v} is too large (at most {MAX_RATE} per second)"));
    }
    Ok(n)
}

/// A rate limit on one device (or one direction of one): bytes and
/// operations per second, `None` for no limit. Each limit is a token
/// bucket that holds one second's worth: after an idle second, that much
/// goes through at once, then the rate holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RateLimit {
    /// Bytes per second (`bw=`).
    pub bytes_per_sec: Option<u64>,
    /// Operations per second (`iops=`): disk requests, or network frames.
    pub ops_per_sec: Option<u64>,
}

impl RateLimit {
    /// Whether nothing is limited.
    pub fn is_unlimited(&self) -> bool {
        self.bytes_per_sec.is_none() && self.ops_per_sec.is_none()
    }

    /// The device crate's form.
    pub fn to_device(&self) -> RateLimitConfig {
        RateLimitConfig::per_second(self.bytes_per_sec, self.ops_per_sec)
    }
}

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

/// Whether the VMM confines its threads with seccomp filters (see
/// [`crate::seccomp`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SeccompMode {
    /// Each thread gets its filter; a system call outside its list kills
    /// the VMM with `SIGSYS`.
    #[default]
    On,
    /// No filters: for debugging only.
    Off,
    /// Each thread gets its filter, but a system call outside its list is
    /// only logged by the kernel (`dmesg`: `audit: type=1326 ...
    /// syscall=N`) and then allowed: for finding what a list lacks.
    Log,
}

/// A disk: a raw image file behind virtio-blk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskConfig {
    pub path: PathBuf,
    pub read_only: bool,
    /// Serial the guest sees (`/sys/block/vdX/serial`); default `diskN`.
    pub id: Option<String>,
    /// What the guest may read and write: bytes (read plus written) and
    /// requests per second.
    pub limit: RateLimit,
}

impl DiskConfig {
    /// A read-write disk at `path`, with the default id and no limits.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into(), read_only: false, id: None, limit: RateLimit::default() }
    }
}

impl std::str::FromStr for DiskConfig {
    type Err = String;

    /// `PATH[,ro][,id=NAME][,bw=BYTES][,iops=N]`.
    fn from_str(s: &str) -> Result<Self, String> {
        let mut parts = s.split(',');
        let path = parts
            .next()
            .filter(|p| !p.is_empty())
            .ok_or("a disk needs a path: PATH[,ro][,id=NAME][,bw=BYTES][,iops=N]")?;
        let mut disk = DiskConfig::new(path);
        for opt in parts {
            match opt.split_once('=') {
                None if opt == "ro" => disk.read_only = true,
                None if opt == "rw" => disk.read_only = false,
                Some(("id", v)) if !v.is_empty() && v.len() <= 20 => disk.id = Some(v.to_string()),
                Some(("id", _)) => return Err("a disk id has 1 to 20 characters".into()),
                Some(("bw", v)) => disk.limit.bytes_per_sec = Some(parse_rate("bw", v, true)?),
                Some(("iops", v)) => disk.limit.ops_per_sec = Some(parse_rate("iops", v, false)?),
                _ => return Err(format!("unknown disk option {opt:?} (use ro, rw, id=NAME, bw=BYTES, iops=N)")),
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
    /// What the guest may receive: bytes (of Ethernet frames) and frames
    /// per second.
    pub rx_limit: RateLimit,
    /// What the guest may send, likewise.
    pub tx_limit: RateLimit,
}

impl NetConfig {
    /// An interface on the TAP device `tap`, with the default MAC and no
    /// limits.
    pub fn new(tap: impl Into<String>) -> Self {
        Self { tap: tap.into(), mac: None, rx_limit: RateLimit::default(), tx_limit: RateLimit::default() }
    }
}

impl std::str::FromStr for NetConfig {
    type Err = String;

    /// `tap=NAME[,mac=MAC][,bw=BYTES][,rx_bw=BYTES][,tx_bw=BYTES][,iops=N]`:
    /// `bw` limits each direction to that rate (receive and transmit
    /// separately, not their sum); `rx_bw`/`tx_bw` set one direction and
    /// take precedence over `bw`; `iops` limits frames per second, in each
    /// direction.
    fn from_str(s: &str) -> Result<Self, String> {
        let (mut tap, mut mac) = (None, None);
        let (mut bw, mut rx_bw, mut tx_bw, mut iops) = (None, None, None, None);
        for opt in s.split(',') {
            match opt.split_once('=') {
                Some(("tap", v)) if !v.is_empty() => tap = Some(v.to_string()),
                Some(("mac", v)) => mac = Some(v.parse::<Mac>()?),
                Some(("bw", v)) => bw = Some(parse_rate("bw", v, true)?),
                Some(("rx_bw", v)) => rx_bw = Some(parse_rate("rx_bw", v, true)?),
                Some(("tx_bw", v)) => tx_bw = Some(parse_rate("tx_bw", v, true)?),
                Some(("iops", v)) => iops = Some(parse_rate("iops", v, false)?),
                _ => {
                    return Err(format!(
                        "unknown network option {opt:?} (use tap=NAME[,mac=MAC][,bw=BYTES][,rx_bw=BYTES][,tx_bw=BYTES][,iops=N])"
                    ))
                }
            }
        }
        let mut net = NetConfig::new(tap.ok_or("a network interface needs tap=NAME")?);
        net.mac = mac;
        net.rx_limit = RateLimit { bytes_per_sec: rx_bw.or(bw), ops_per_sec: iops };
        net.tx_limit = RateLimit { bytes_per_sec: tx_bw.or(bw), ops_per_sec: iops };
        Ok(net)
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
    /// The most bytes a console file ([`ConsoleOutput::File`]) gets; later
    /// output is dropped after one truncation line. `None`: no bound.
    pub console_limit: Option<u64>,
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
    /// Seccomp filters on the VMM's threads.
    pub seccomp: SeccompMode,
    /// Written one byte once the control socket and the vsock socket
    /// listen (see [`crate::vm::RunOptions::ready`]).
    pub ready: Option<std::sync::Arc<std::fs::File>>,
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
            console_limit: Some(DEFAULT_CONSOLE_LIMIT),
            console_input: true,
            host_compat: HostCompatMode::Auto,
            report: None,
            disks: Vec::new(),
            rng: true,
            nets: Vec::new(),
            control: None,
            vsock: None,
            seccomp: SeccompMode::On,
            ready: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_options() {
        let d: DiskConfig = "/img/a.raw,ro,id=layers".parse().unwrap();
        assert_eq!(
            d,
            DiskConfig { path: "/img/a.raw".into(), read_only: true, id: Some("layers".into()), limit: RateLimit::default() }
        );
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
        assert!(n.rx_limit.is_unlimited() && n.tx_limit.is_unlimited());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size("512k"), Ok(512 << 10));
        assert_eq!(parse_size("10m"), Ok(10 << 20));
        assert_eq!(parse_size("10M"), Ok(10 << 20));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        for bad in ["", "k", "10x", "1.5m", "-1", "10mb", " 10", "1 m", "0x10"] {
            let e = parse_size(bad).unwrap_err();
            assert!(e.contains("invalid size"), "{bad}: {e}");
        }
        assert!(parse_size("99999999999999999999").unwrap_err().contains("too large"));
        assert!(parse_size("17179869184g").unwrap_err().contains("too large"));
    }

    #[test]
    fn disk_rate_limits() {
        let d: DiskConfig = "a.raw,bw=10m,iops=500".parse().unwrap();
        assert_eq!(d.limit, RateLimit { bytes_per_sec: Some(10 << 20), ops_per_sec: Some(500) });
        let c = d.limit.to_device();
        assert_eq!(c.bandwidth.unwrap().size, 10 << 20);
        assert_eq!(c.bandwidth.unwrap().refill_time, std::time::Duration::from_secs(1));
        assert_eq!(c.ops.unwrap().size, 500);
        let d: DiskConfig = "a.raw,ro,bw=1048576".parse().unwrap();
        assert_eq!(d.limit, RateLimit { bytes_per_sec: Some(1 << 20), ops_per_sec: None });
        assert!(d.read_only);
        assert!(DiskConfig::new("a").limit.to_device().is_unlimited());
        let err = |s: &str| s.parse::<DiskConfig>().unwrap_err();
        assert!(err("a,bw=fast").contains("bw: invalid size \"fast\""), "{}", err("a,bw=fast"));
        assert!(err("a,bw=").contains("bw: invalid size"));
        assert!(err("a,bw=0").contains("bw=0 would stop the device"));
        assert!(err("a,iops=0").contains("iops=0"));
        assert!(err("a,iops=1k").contains("iops: invalid count \"1k\""));
        assert!(err("a,iops=-5").contains("iops: invalid count"));
        assert!(err("a,bw=9999999g").contains("too large"));
        assert!(err("a,bps=1").contains("unknown disk option"));
    }

    #[test]
    fn net_rate_limits() {
        let n: NetConfig = "tap=t0,bw=10m".parse().unwrap();
        let ten = RateLimit { bytes_per_sec: Some(10 << 20), ops_per_sec: None };
        assert_eq!((n.rx_limit, n.tx_limit), (ten, ten), "bw is each direction's");
        let n: NetConfig = "tap=t0,rx_bw=1m,tx_bw=2m,iops=1000".parse().unwrap();
        assert_eq!(n.rx_limit, RateLimit { bytes_per_sec: Some(1 << 20), ops_per_sec: Some(1000) });
        assert_eq!(n.tx_limit, RateLimit { bytes_per_sec: Some(2 << 20), ops_per_sec: Some(1000) });
        // A direction's own key wins over bw, in any order.
        let n: NetConfig = "tap=t0,tx_bw=1k,bw=5m".parse().unwrap();
        assert_eq!(n.tx_limit.bytes_per_sec, Some(1024));
        assert_eq!(n.rx_limit.bytes_per_sec, Some(5 << 20));
        let n: NetConfig = "tap=t0,rx_bw=3k".parse().unwrap();
        assert_eq!(n.tx_limit, RateLimit::default());
        let err = |s: &str| s.parse::<NetConfig>().unwrap_err();
        assert!(err("tap=t0,rx_bw=lots").contains("rx_bw: invalid size"));
        assert!(err("tap=t0,tx_bw=0").contains("tx_bw=0"));
        assert!(err("tap=t0,iops=x").contains("iops: invalid count"));
        assert!(err("tap=t0,rate=1").contains("unknown network option"));
    }
}
