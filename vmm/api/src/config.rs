//! A VM's configuration: everything the process that starts a VMM
//! decides, to boot a kernel ([`VmConfig`]) or to restore a snapshot
//! ([`RestoreConfig`]). [`VmmConfig`] wraps either with the format's
//! [`VERSION`], which a reader checks before anything else.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The version of the configuration format; bumped on any change a reader
/// of the previous version would misread.
pub const VERSION: u32 = 2;

/// The kernel command line used when the user gives none: the serial
/// console, reboot through the i8042 (which ends the VMM), and a reboot one
/// second after a panic.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1";

/// Default bound on a console log file (`--console-limit`): 16 MiB.
pub const DEFAULT_CONSOLE_LIMIT: u64 = 16 << 20;

/// Errors reading a configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("the VMM configuration has no version field (it was not written by vmrun)")]
    NoVersion,
    #[error("the VMM configuration is version {found}, and this vmrun-vmm reads version {supported}: install vmrun and vmrun-vmm from the same build")]
    Version { found: u32, supported: u32 },
    #[error("invalid VMM configuration: {0}")]
    Json(#[source] serde_json::Error),
    #[error("cannot read the VMM configuration {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
}

/// What a VMM is told to do, and the format's version.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmmConfig {
    /// [`VERSION`] when written.
    pub version: u32,
    /// Boot or restore.
    pub start: Start,
}

/// Boot a kernel, or restore a snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Start {
    Boot(VmConfig),
    Restore(RestoreConfig),
}

impl VmmConfig {
    /// A boot, in the current version.
    pub fn boot(config: VmConfig) -> Self {
        Self { version: VERSION, start: Start::Boot(config) }
    }

    /// A restore, in the current version.
    pub fn restore(config: RestoreConfig) -> Self {
        Self { version: VERSION, start: Start::Restore(config) }
    }

    /// The JSON form. Fails only on a path that is not UTF-8.
    pub fn to_json(&self) -> Result<Vec<u8>, ConfigError> {
        serde_json::to_vec_pretty(self).map_err(ConfigError::Json)
    }

    /// Reads the JSON form: the version first (a configuration of another
    /// version is refused with both numbers, whatever else it holds), then
    /// the rest, refusing unknown fields.
    pub fn from_json(bytes: &[u8]) -> Result<Self, ConfigError> {
        #[derive(Deserialize)]
        struct Header {
            version: Option<u32>,
        }
        let header: Header = serde_json::from_slice(bytes).map_err(ConfigError::Json)?;
        match header.version {
            None => return Err(ConfigError::NoVersion),
            Some(v) if v != VERSION => return Err(ConfigError::Version { found: v, supported: VERSION }),
            Some(_) => {}
        }
        serde_json::from_slice(bytes).map_err(ConfigError::Json)
    }

    /// Reads the configuration in the file at `path`.
    pub fn read(path: &Path) -> Result<Self, ConfigError> {
        let bytes = std::fs::read(path).map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
        Self::from_json(&bytes)
    }

    /// Whether the VMM confines itself before it starts the guest.
    pub fn jail(&self) -> bool {
        self.options().jail
    }

    /// The process options of the boot or restore.
    pub fn options(&self) -> &ProcessOptions {
        match &self.start {
            Start::Boot(c) => &c.options,
            Start::Restore(c) => &c.options,
        }
    }
}

/// A rate limit on one device (or one direction of one): bytes and
/// operations per second, `None` for no limit. Each limit is a token
/// bucket that holds one second's worth: after an idle second, that much
/// goes through at once, then the rate holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    /// Bytes per second (`bw=`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_per_sec: Option<u64>,
    /// Operations per second (`iops=`): disk requests, or network frames.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ops_per_sec: Option<u64>,
}

impl RateLimit {
    /// Whether nothing is limited.
    pub fn is_unlimited(&self) -> bool {
        self.bytes_per_sec.is_none() && self.ops_per_sec.is_none()
    }
}

/// Where the guest's serial console goes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConsoleOutput {
    /// The VMM's standard output.
    Stdout,
    /// A file, created or truncated.
    File(PathBuf),
    /// Nowhere.
    Null,
}

/// Whether to run the compatibility layer for hosts whose KVM emulates
/// guest kernel mode.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HostCompatMode {
    /// On if such a host is detected.
    #[default]
    Auto,
    /// Always on.
    On,
    /// Always off.
    Off,
}

/// Whether the VMM confines its threads with seccomp filters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
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

/// A MAC address; its JSON form is `"aa:bb:cc:dd:ee:ff"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mac(pub [u8; 6]);

/// Why a MAC address was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MacError {
    #[error("invalid MAC address {0:?}: write six two-digit hex bytes, aa:bb:cc:dd:ee:ff")]
    Syntax(String),
    #[error("{0} is a multicast address: give a unicast one (its first byte even, e.g. 06:00:ac:10:00:02)")]
    Multicast(String),
}

impl std::str::FromStr for Mac {
    type Err = MacError;
    fn from_str(s: &str) -> Result<Self, MacError> {
        let parts: Vec<&str> = s.split(':').collect();
        let bad = || MacError::Syntax(s.to_string());
        if parts.len() != 6 {
            return Err(bad());
        }
        let mut m = [0u8; 6];
        for (i, p) in parts.iter().enumerate() {
            if p.len() != 2 {
                return Err(bad());
            }
            m[i] = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        if m[0] & 1 != 0 {
            return Err(MacError::Multicast(s.to_string()));
        }
        Ok(Mac(m))
    }
}

impl std::fmt::Display for Mac {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let m = self.0;
        write!(f, "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", m[0], m[1], m[2], m[3], m[4], m[5])
    }
}

impl Serialize for Mac {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Mac {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A disk: a raw image file behind virtio-blk.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    pub path: PathBuf,
    #[serde(default)]
    pub read_only: bool,
    /// Serial the guest sees (`/sys/block/vdX/serial`); default `diskN`.
    #[serde(default)]
    pub id: Option<String>,
    /// What the guest may read and write: bytes (read plus written) and
    /// requests per second.
    #[serde(default)]
    pub limit: RateLimit,
}

impl DiskConfig {
    /// A read-write disk at `path`, with the default id and no limits.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into(), read_only: false, id: None, limit: RateLimit::default() }
    }
}

/// A network interface: virtio-net on a TAP device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    /// The TAP device's name (it is created if it does not exist and the
    /// VMM may create it; then it goes away with the VMM).
    pub tap: String,
    /// The guest's MAC address; default: a locally administered address
    /// derived from the TAP name.
    #[serde(default)]
    pub mac: Option<Mac>,
    /// What the guest may receive: bytes (of Ethernet frames) and frames
    /// per second.
    #[serde(default)]
    pub rx_limit: RateLimit,
    /// What the guest may send, likewise.
    #[serde(default)]
    pub tx_limit: RateLimit,
}

impl NetConfig {
    /// An interface on the TAP device `tap`, with the default MAC and no
    /// limits.
    pub fn new(tap: impl Into<String>) -> Self {
        Self { tap: tap.into(), mac: None, rx_limit: RateLimit::default(), tx_limit: RateLimit::default() }
    }

    /// The MAC address to use: the configured one, or one derived from the
    /// TAP name (locally administered, unicast).
    pub fn mac(&self) -> Mac {
        self.mac.unwrap_or_else(|| {
            let h = crate::hash::fnv1a(self.tap.as_bytes());
            let b = h.to_le_bytes();
            Mac([0x06, 0x00, b[0], b[1], b[2], b[3]])
        })
    }
}

/// A vsock device bridged to Unix sockets, Firecracker style.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockConfig {
    /// The guest's context id (3 or more).
    pub cid: u64,
    /// The Unix socket host programs connect to (`CONNECT <port>`); guest
    /// connections to port P arrive at `<uds>_<P>`.
    pub uds: PathBuf,
}

/// What the VMM process does around its VM, the same for a boot and a
/// restore: where the console goes and whether it takes input, the control
/// socket, the report, the compatibility layer, seccomp and the jail.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessOptions {
    /// Where the serial console goes.
    pub console: ConsoleOutput,
    /// The most bytes a console file ([`ConsoleOutput::File`]) gets; later
    /// output is dropped after one truncation line. `None`: no bound.
    #[serde(default)]
    pub console_limit: Option<u64>,
    /// Forward the VMM's standard input to the serial console.
    #[serde(default)]
    pub console_input: bool,
    /// Host compatibility layer.
    #[serde(default)]
    pub host_compat: HostCompatMode,
    /// Write a JSON report (timings, emulated instructions, memory) here
    /// when the VM ends.
    #[serde(default)]
    pub report: Option<PathBuf>,
    /// Serve the control socket (pause, resume, snapshot, stop, stats) here.
    #[serde(default)]
    pub control: Option<PathBuf>,
    /// Seccomp filters on the VMM's threads.
    #[serde(default)]
    pub seccomp: SeccompMode,
    /// Confine the VMM before it starts the guest (`vmrun-jail`; needs
    /// root).
    #[serde(default)]
    pub jail: bool,
    /// Sample where the guest's vCPUs are and write the samples here as
    /// JSON ([`crate::profile::Profile`]) when the VM ends.
    #[serde(default)]
    pub profile: Option<PathBuf>,
}

impl Default for ProcessOptions {
    /// What [`VmConfig::new`] and [`RestoreConfig::new`] start from: the
    /// console on standard output (bounded by [`DEFAULT_CONSOLE_LIMIT`] if
    /// it becomes a file) taking input, the compatibility layer as the host
    /// needs, seccomp on, no control socket, no report, no jail. (A field
    /// missing from the JSON form reads as its type's default instead.)
    fn default() -> Self {
        Self {
            console: ConsoleOutput::Stdout,
            console_limit: Some(DEFAULT_CONSOLE_LIMIT),
            console_input: true,
            host_compat: HostCompatMode::Auto,
            report: None,
            control: None,
            seccomp: SeccompMode::On,
            jail: false,
            profile: None,
        }
    }
}

/// A VM to boot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// ELF `vmlinux` or bzImage.
    pub kernel: PathBuf,
    /// Initramfs (cpio, optionally compressed), if any.
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    /// Kernel command line; the VMM appends what its devices and the host
    /// compatibility layer need.
    pub cmdline: String,
    /// Guest memory in MiB.
    pub mem_mib: u32,
    /// Number of vCPUs.
    pub vcpus: u8,
    /// The console, the control socket, the report, confinement: what a
    /// restore chooses alike.
    pub options: ProcessOptions,
    /// Disks, in the order the guest sees them (vda, vdb, ...).
    #[serde(default)]
    pub disks: Vec<DiskConfig>,
    /// A virtio-rng device fed from the host's getrandom.
    #[serde(default)]
    pub rng: bool,
    /// Network interfaces (eth0, eth1, ...).
    #[serde(default)]
    pub nets: Vec<NetConfig>,
    /// A vsock device.
    #[serde(default)]
    pub vsock: Option<VsockConfig>,
}

impl VmConfig {
    /// A configuration with the defaults: 128 MiB, one vCPU, console on
    /// standard output, the default command line, an entropy device, no
    /// jail.
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        Self {
            kernel: kernel.into(),
            initrd: None,
            cmdline: DEFAULT_CMDLINE.to_string(),
            mem_mib: 128,
            vcpus: 1,
            options: ProcessOptions::default(),
            disks: Vec::new(),
            rng: true,
            nets: Vec::new(),
            vsock: None,
        }
    }
}

/// The backing of one disk slot of a snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestoreDisk {
    /// The image (read-only or not as the snapshot's slot says).
    pub path: PathBuf,
    /// Rate limits are not part of a snapshot: a restore sets its own.
    #[serde(default)]
    pub limit: RateLimit,
    /// Opened read-only even where the snapshot's slot is writable: the
    /// guest's writes to it fail (an image several VMs share).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub read_only: bool,
}

impl RestoreDisk {
    /// The image at `path`, unlimited.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into(), limit: RateLimit::default(), read_only: false }
    }
}

/// The backing of one network slot of a snapshot (its MAC address is the
/// snapshot's).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestoreNet {
    pub tap: String,
    #[serde(default)]
    pub rx_limit: RateLimit,
    #[serde(default)]
    pub tx_limit: RateLimit,
}

impl RestoreNet {
    /// The TAP device `tap`, unlimited.
    pub fn new(tap: impl Into<String>) -> Self {
        Self { tap: tap.into(), rx_limit: RateLimit::default(), tx_limit: RateLimit::default() }
    }
}

/// A VM to restore: the snapshot fixes the guest; what backs its device
/// slots, and where the console goes, are chosen here.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestoreConfig {
    /// The snapshot directory.
    pub snapshot: PathBuf,
    /// One disk per block slot of the snapshot, in order.
    #[serde(default)]
    pub disks: Vec<RestoreDisk>,
    /// One TAP device per network slot, in order.
    #[serde(default)]
    pub nets: Vec<RestoreNet>,
    /// The Unix socket for the snapshot's vsock device, if it has one.
    #[serde(default)]
    pub vsock_uds: Option<PathBuf>,
    /// The console, the control socket, the report, confinement.
    pub options: ProcessOptions,
}

impl RestoreConfig {
    /// A restore of `snapshot` with no device backings yet, the console on
    /// standard output, no jail.
    pub fn new(snapshot: impl Into<PathBuf>) -> Self {
        Self {
            snapshot: snapshot.into(),
            disks: Vec::new(),
            nets: Vec::new(),
            vsock_uds: None,
            options: ProcessOptions::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn full_boot() -> VmConfig {
        let mut c = VmConfig::new("/k/vmlinux");
        c.initrd = Some("/k/initrd.cpio".into());
        c.mem_mib = 256;
        c.vcpus = 2;
        c.options.console = ConsoleOutput::File("/vm/console.log".into());
        c.options.console_input = false;
        c.options.report = Some("/vm/report.json".into());
        c.disks = vec![
            DiskConfig {
                path: "/l/layers.disk".into(),
                read_only: true,
                id: Some("layers".into()),
                limit: RateLimit { bytes_per_sec: Some(10 << 20), ops_per_sec: Some(500) },
            },
            DiskConfig::new("/dev/null"),
        ];
        c.nets = vec![NetConfig {
            tap: "vmtap0".into(),
            mac: Some(Mac([6, 0, 0xac, 0x10, 0, 2])),
            rx_limit: RateLimit { bytes_per_sec: Some(1 << 20), ops_per_sec: None },
            tx_limit: RateLimit { bytes_per_sec: None, ops_per_sec: Some(1000) },
        }];
        c.vsock = Some(VsockConfig { cid: 3, uds: "/vm/vsock.sock".into() });
        c.options.control = Some("/vm/control.sock".into());
        c.options.seccomp = SeccompMode::Log;
        c.options.host_compat = HostCompatMode::On;
        c.options.jail = true;
        c
    }

    #[test]
    fn a_boot_survives_json() {
        let config = VmmConfig::boot(full_boot());
        let json = config.to_json().unwrap();
        assert_eq!(VmmConfig::from_json(&json).unwrap(), config);
        let text = String::from_utf8(json).unwrap();
        assert!(text.contains("\"mac\": \"06:00:ac:10:00:02\""), "{text}");
        assert!(text.contains("\"version\": 2"), "{text}");
    }

    #[test]
    fn a_restore_carries_rate_limits() {
        let mut r = RestoreConfig::new("/t/template");
        r.disks = vec![
            RestoreDisk {
                path: "/l/layers.disk".into(),
                limit: RateLimit { bytes_per_sec: Some(1 << 20), ops_per_sec: Some(100) },
                read_only: false,
            },
            RestoreDisk::new("/dev/null"),
        ];
        r.nets = vec![RestoreNet {
            tap: "vmtap1".into(),
            rx_limit: RateLimit { bytes_per_sec: Some(5 << 20), ops_per_sec: None },
            tx_limit: RateLimit { bytes_per_sec: Some(2 << 20), ops_per_sec: Some(10) },
        }];
        r.vsock_uds = Some("/vm/vsock.sock".into());
        let config = VmmConfig::restore(r);
        let back = VmmConfig::from_json(&config.to_json().unwrap()).unwrap();
        assert_eq!(back, config);
        let Start::Restore(r) = back.start else { panic!("not a restore") };
        assert_eq!(r.disks[0].limit.ops_per_sec, Some(100));
        assert!(r.disks[1].limit.is_unlimited());
        assert_eq!(r.nets[0].tx_limit, RateLimit { bytes_per_sec: Some(2 << 20), ops_per_sec: Some(10) });
    }

    #[test]
    fn another_version_is_refused() {
        let mut v: serde_json::Value = serde_json::from_slice(&VmmConfig::boot(full_boot()).to_json().unwrap()).unwrap();
        v["version"] = 1.into();
        let e = VmmConfig::from_json(&serde_json::to_vec(&v).unwrap()).unwrap_err();
        assert!(matches!(e, ConfigError::Version { found: 1, supported: 2 }), "{e}");
        assert!(e.to_string().contains("version 1") && e.to_string().contains("reads version 2"), "{e}");
        // The version is checked first: a future format's fields do not
        // turn it into a parse error.
        let e = VmmConfig::from_json(br#"{"version":7,"start":{"teleport":{}}}"#).unwrap_err();
        assert!(matches!(e, ConfigError::Version { found: 7, .. }), "{e}");
        let e = VmmConfig::from_json(br#"{"start":{"boot":{}}}"#).unwrap_err();
        assert!(matches!(e, ConfigError::NoVersion), "{e}");
    }

    #[test]
    fn unknown_fields_and_bad_values_are_refused() {
        let e = VmmConfig::from_json(br#"{"version":2,"start":{"restore":{"snapshot":"/s","options":{"console":"null"},"disks":[{"path":"/d","bw":5}]}}}"#);
        assert!(matches!(e, Err(ConfigError::Json(_))), "{e:?}");
        let ok = VmmConfig::from_json(br#"{"version":2,"start":{"restore":{"snapshot":"/s","options":{"console":"null"}}}}"#).unwrap();
        assert!(!ok.jail());
        // The process options are one nested object: at the top level, or
        // unknown inside it, a field is refused.
        let flat = br#"{"version":2,"start":{"restore":{"snapshot":"/s","console":"null","options":{"console":"null"}}}}"#;
        assert!(matches!(VmmConfig::from_json(flat), Err(ConfigError::Json(_))));
        let unknown = br#"{"version":2,"start":{"restore":{"snapshot":"/s","options":{"console":"null","tty":true}}}}"#;
        assert!(matches!(VmmConfig::from_json(unknown), Err(ConfigError::Json(_))));
        let bad_mac = br#"{"version":2,"start":{"boot":{"kernel":"/k","cmdline":"","mem_mib":128,"vcpus":1,"options":{"console":"stdout"},"nets":[{"tap":"t","mac":"01:00:00:00:00:00"}]}}}"#;
        assert!(VmmConfig::from_json(bad_mac).unwrap_err().to_string().contains("multicast"));
        assert!(matches!(VmmConfig::from_json(b"not json"), Err(ConfigError::Json(_))));
    }

    #[test]
    fn default_macs_are_stable_and_local() {
        let m = NetConfig::new("vmtap1").mac();
        assert_eq!(m.0[0], 0x06, "locally administered unicast");
        assert_eq!(m, NetConfig::new("vmtap1").mac());
        assert_ne!(m, NetConfig::new("vmtap2").mac());
        assert_eq!("06:00:ac:10:00:02".parse::<Mac>().unwrap().to_string(), "06:00:ac:10:00:02");
        assert!(matches!("zz".parse::<Mac>(), Err(MacError::Syntax(_))));
        assert!(matches!("01:00:5e:00:00:01".parse::<Mac>(), Err(MacError::Multicast(_))));
    }
}
