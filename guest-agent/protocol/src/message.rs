//! The messages: JSON payloads of `Hello`, `Request` and `Response` frames.

use serde::{Deserialize, Serialize};
use vmrun_layerdisk::Digest;

/// The first frame each side sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Always [`crate::MAGIC`].
    pub magic: String,
    /// The protocol version the sender speaks.
    pub version: u32,
    /// The sender's software and version, for messages (`vmrun 0.1.0`).
    pub software: String,
    /// Host to agent: fresh random bytes from the host, which an agent that
    /// is a guest's init mixes into the guest kernel's random pool (and
    /// reseeds its CRNG with) before it answers. Every VM restored from
    /// one snapshot starts with the same random state; this makes each
    /// connection's guest diverge before anything runs. `None` in the
    /// agent's hello.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entropy: Option<Entropy>,
    /// Host to agent: the host's wall clock when it sent this hello. An
    /// agent that is a guest's init sets the guest's clock to it when the
    /// guest's is behind (a boot reads the emulated CMOS clock in whole
    /// seconds; a VM restored from a snapshot on hardware KVM resumes the
    /// snapshot's clock) or far ahead. `None` in the agent's hello.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<WallClock>,
}

impl Hello {
    /// This side's hello (without entropy).
    pub fn ours(software: &str) -> Self {
        Self { magic: crate::MAGIC.into(), version: crate::VERSION, software: software.into(), entropy: None, time: None }
    }

    /// This hello, carrying `entropy`.
    pub fn with_entropy(self, entropy: Entropy) -> Self {
        Self { entropy: Some(entropy), ..self }
    }

    /// This hello, carrying the wall clock's `time`.
    pub fn with_time(self, time: WallClock) -> Self {
        Self { time: Some(time), ..self }
    }
}

/// A moment of a wall clock (`CLOCK_REALTIME`): time since the Unix epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WallClock {
    /// Whole seconds.
    pub secs: u64,
    /// Nanoseconds past them (below 10^9 in a valid moment).
    pub nanos: u32,
}

impl WallClock {
    /// This machine's wall clock now (the epoch itself if the clock is set
    /// before it).
    pub fn now() -> Self {
        let d = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        Self { secs: d.as_secs(), nanos: d.subsec_nanos() }
    }

    /// The time since the epoch; `None` for nanoseconds of a second or
    /// more.
    pub fn since_epoch(self) -> Option<std::time::Duration> {
        (self.nanos < 1_000_000_000).then(|| std::time::Duration::new(self.secs, self.nanos))
    }
}

/// Random bytes for the guest's pool: [`Entropy::MIN`] to [`Entropy::MAX`]
/// of them, written as a hex string. Their `Debug` does not show them.
#[derive(Clone, PartialEq, Eq)]
pub struct Entropy(Vec<u8>);

/// Entropy that is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EntropyError {
    /// Too few or too many bytes.
    #[error("{0} bytes of entropy (expected {min} to {max})", min = Entropy::MIN, max = Entropy::MAX)]
    Length(usize),
    /// Not an even number of hex digits.
    #[error("entropy is not a hex string")]
    Hex,
}

impl Entropy {
    /// Bytes the host sends.
    pub const LEN: usize = 64;
    /// Fewest bytes accepted (256 bits).
    pub const MIN: usize = 32;
    /// Most bytes accepted.
    pub const MAX: usize = 512;

    /// `bytes`, when their number is within bounds.
    pub fn new(bytes: Vec<u8>) -> Result<Self, EntropyError> {
        if !(Self::MIN..=Self::MAX).contains(&bytes.len()) {
            return Err(EntropyError::Length(bytes.len()));
        }
        Ok(Self(bytes))
    }

    /// The bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.0
    }

    fn to_hex(&self) -> String {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        self.0.iter().flat_map(|b| [DIGITS[usize::from(b >> 4)] as char, DIGITS[usize::from(b & 15)] as char]).collect()
    }

    fn from_hex(s: &str) -> Result<Self, EntropyError> {
        if s.len() % 2 != 0 || s.len() > 2 * Self::MAX {
            return Err(if s.len() % 2 != 0 { EntropyError::Hex } else { EntropyError::Length(s.len() / 2) });
        }
        let digit = |c: u8| (c as char).to_digit(16).ok_or(EntropyError::Hex);
        let bytes = s.as_bytes().chunks(2).map(|p| Ok((digit(p[0])? << 4 | digit(p[1])?) as u8)).collect::<Result<Vec<u8>, _>>()?;
        Self::new(bytes)
    }
}

impl std::fmt::Debug for Entropy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Entropy({} bytes)", self.0.len())
    }
}

impl Serialize for Entropy {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for Entropy {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = std::borrow::Cow::<str>::deserialize(d)?;
        Self::from_hex(&s).map_err(serde::de::Error::custom)
    }
}

/// A request from the host.
// A request lives only while it is sent or handled, one at a time: the
// size of `CreateContainer` costs nothing that boxing it would save.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Is the agent there? Answered with [`Reply::Pong`].
    Ping,
    /// Unpacks an image into a new container's root and prepares it.
    /// Answered with [`Reply::Done`] once the root is ready.
    CreateContainer(CreateContainer),
    /// Starts the container's process. Answered with [`Reply::Started`]
    /// once it runs the image's program, or with an error of kind
    /// [`ErrorKind::CannotRun`] (exit code 126 or 127).
    StartContainer {
        /// The container.
        container: String,
        /// Where its standard streams go.
        stdio: Stdio,
        /// Overrides of what the container was created with, for a
        /// container prepared ahead of the run (a snapshot of a guest that
        /// unpacked the image): arguments (when not empty), extra
        /// environment, working directory, user.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        process: Option<ExecProcess>,
        /// Set up the process's namespaces, root and mounts, then hold it
        /// before its program (OCI `create`): answered with
        /// [`Reply::Prepared`] once it waits, or with the setup's error;
        /// [`Request::Release`] lets it run.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        hold: bool,
    },
    /// Lets a container's process held by `StartContainer { hold: true }`
    /// go on to its program (OCI `start`). Answered like `StartContainer`.
    Release {
        /// The container.
        container: String,
        /// Overrides of the program, environment, working directory and
        /// user (a container prepared in a warm-start template); what is
        /// set up before the hold (mounts, seccomp, `oom_score_adj`)
        /// cannot change here.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        process: Option<ExecProcess>,
        /// New stream ids on this connection for the held process's
        /// output (it was held with pipes for stdout and stderr, on a
        /// connection that may be gone); its input stays closed.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        stdio: Option<Stdio>,
    },
    /// Runs another process in a running container, like `docker exec`.
    /// Answered like `StartContainer`.
    Exec(Exec),
    /// Sends a signal to the container's process (`exec_id: None`) or to an
    /// exec'd one. Answered with [`Reply::Done`].
    Signal {
        /// The container.
        container: String,
        /// The exec'd process, or `None` for the container's own.
        exec_id: Option<String>,
        /// The signal number.
        signal: i32,
    },
    /// Waits for a process to end. Answered with [`Reply::Exited`] when it
    /// has; other requests go on meanwhile.
    Wait {
        /// The container.
        container: String,
        /// The exec'd process, or `None` for the container's own.
        exec_id: Option<String>,
    },
    /// Sets the window size of a process's terminal.
    ResizeTty {
        /// The container.
        container: String,
        /// The exec'd process, or `None` for the container's own.
        exec_id: Option<String>,
        /// Rows.
        rows: u16,
        /// Columns.
        cols: u16,
    },
    /// Removes a container and its root. Refused while its process runs,
    /// unless `force`, which kills it first.
    RemoveContainer {
        /// The container.
        container: String,
        /// Kill its processes first.
        force: bool,
    },
    /// Gives the guest's network interface its address and default route
    /// (a VM restored from a snapshot learns its address this way).
    /// Answered with [`Reply::Done`]; refused by an agent that is not a
    /// guest's init.
    ConfigureNetwork(NetworkConfig),
    /// Kills every process and ends the guest (on the host: the agent).
    /// Answered with [`Reply::Done`] just before.
    Shutdown,
    /// Copies files into a container, for a bind mount whose source the
    /// host copies in (part by part: see [`WriteFiles`]). Answered with
    /// [`Reply::Done`].
    WriteFiles(WriteFiles),
    /// Reads what a container with a [`RootfsSpec::Overlay`] root changed
    /// in it, in parts: from the change numbered `from` (0 at first) on.
    /// Answered with [`Reply::Changes`]; the list is made at the first
    /// part (`from: 0`) and kept for the later ones.
    ReadChanges {
        /// The container.
        container: String,
        /// The first change of this part: 0, then the last answer's `next`.
        from: u64,
    },
    /// Reads a container's cgroup statistics. Answered with
    /// [`Reply::Stats`].
    Stats {
        /// The container.
        container: String,
    },
    /// Applies new limits to a container's cgroup (the fields set in
    /// `resources`; the others keep their values). Answered with
    /// [`Reply::Done`].
    Update {
        /// The container.
        container: String,
        /// The limits to change.
        resources: Resources,
    },
    /// Freezes (`frozen: true`) or thaws a container's processes, its
    /// exec'd ones included (its cgroup's `cgroup.freeze`). Answered with
    /// [`Reply::Done`] once the kernel reports them frozen (or thawed).
    Freeze {
        /// The container.
        container: String,
        /// Freeze, or thaw.
        frozen: bool,
    },
}

/// An interface's IPv4 configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkConfig {
    /// The interface, e.g. `eth0`.
    pub interface: String,
    /// `A.B.C.D/PREFIX`.
    pub address: String,
    /// The default gateway, if any.
    #[serde(default)]
    pub gateway: Option<String>,
    /// Name servers (IP addresses) for the containers' `/etc/resolv.conf`;
    /// none: the containers' own file is left as it is.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nameservers: Vec<String>,
    /// The interface's MAC address (`aa:bb:cc:dd:ee:ff`), when it must be
    /// another's (a pod's interface, whose traffic the host mirrors to the
    /// VM); none: the one it has.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// The interface's MTU; none: the one it has.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    /// Routes through the interface besides the default one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<RouteConfig>,
}

/// The IPv4 netmask of a `/PREFIX` (of a [`NetworkConfig`]'s address or a
/// [`RouteConfig`]'s destination); a prefix over 32 counts as 32.
pub fn ipv4_netmask(prefix: u8) -> u32 {
    u32::MAX.checked_shl(32 - u32::from(prefix.min(32))).unwrap_or(0)
}

/// A route through the configured interface.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteConfig {
    /// `A.B.C.D/PREFIX`.
    pub destination: String,
    /// The next hop; none: the destination is on the link.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
}

/// A new container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateContainer {
    /// Its id: 1 to 64 of `[A-Za-z0-9_.-]`, not starting with `.` or `-`.
    pub id: String,
    /// Where its layers are.
    pub layers: LayerSource,
    /// What its root file system lives on.
    #[serde(default)]
    pub rootfs: RootfsSpec,
    /// The image's configuration (and the user's overrides).
    pub config: ImageConfig,
    /// Bounds on what unpacking may write.
    #[serde(default)]
    pub limits: UnpackLimits,
}

/// The image layers of a container: blobs on a layer disk
/// (see `vmrun_layerdisk`), applied in this order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerSource {
    /// The disk, as a path in the guest (`/dev/vdb`; on the host, a file).
    pub disk: String,
    /// The layers, lowest first.
    pub layers: Vec<Digest>,
}

/// What a container's root lives on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RootfsSpec {
    /// A fresh tmpfs (the default), its size in MiB or, without one, the
    /// kernel's default of half the memory. Removing the container frees it
    /// at once.
    Tmpfs {
        /// Size limit in MiB.
        size_mib: Option<u64>,
    },
    /// A file system the host provides, e.g. a scratch disk:
    /// `mount -t fstype -o options source`.
    Mount {
        /// The device.
        source: String,
        /// Its file system type.
        fstype: String,
        /// Mount data (`""` for none).
        #[serde(default)]
        options: String,
    },
    /// A disk the host made from the image's root (`source`, mounted like
    /// [`RootfsSpec::Mount`]), left as it is: the container's root is an
    /// overlay of it and an upper layer that holds what the container
    /// changes ([`Request::ReadChanges`] reads it).
    Overlay {
        /// The device.
        source: String,
        /// Its file system type.
        fstype: String,
        /// Mount data (`""` for none).
        #[serde(default)]
        options: String,
        /// A disk of its own for the upper layer (an empty file system of
        /// the same type, mounted with the same data): `source` is then
        /// mounted read-only, as it is (a copy several VMs share). `None`:
        /// the upper layer is on `source`, whose entries the agent first
        /// moves into `.vmrun/lower` (a root that has its own `.vmrun` is
        /// refused).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        upper: Option<String>,
    },
}

/// Most bytes of file content in one [`Reply::Changes`] part (a file
/// larger than that comes in pieces).
pub const CHANGES_PART_BYTES: usize = COPY_PART_BYTES;
/// Most changes in one [`Reply::Changes`] part.
pub const CHANGES_PART_ENTRIES: usize = 1024;

/// One change a container made in its root, relative to the image it was
/// created from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Change {
    /// A directory, file or symbolic link made or changed: written as
    /// [`WriteFiles`] writes one (a directory that exists keeps its
    /// entries, its owner and mode set).
    Put {
        /// What is written (`path` is relative to the root; never `""`).
        entry: CopyEntry,
        /// Whatever the path held is removed first (a directory the
        /// container removed and made again: the old entries are gone).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        replace: bool,
    },
    /// A path the container removed (a directory with all it held).
    Remove {
        /// Relative to the root, of plain names.
        path: String,
    },
}

impl Default for RootfsSpec {
    fn default() -> Self {
        Self::Tmpfs { size_mib: None }
    }
}

/// Bounds on unpacking, checked before anything is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnpackLimits {
    /// Most bytes of file content, all layers together; the decompressed
    /// tar streams are bounded a little above this.
    pub max_bytes: u64,
    /// Most tar entries, all layers together.
    pub max_entries: u64,
}

impl Default for UnpackLimits {
    fn default() -> Self {
        Self { max_bytes: 16 << 30, max_entries: 1_000_000 }
    }
}

/// The parts of an OCI image configuration the agent uses, after the
/// user's overrides (`docker run --entrypoint`, `-e`, `-w`, `-u`, ...).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct ImageConfig {
    /// `Entrypoint`.
    pub entrypoint: Vec<String>,
    /// `Cmd`, appended to the entrypoint.
    pub cmd: Vec<String>,
    /// `Env`, `NAME=value`.
    pub env: Vec<String>,
    /// `WorkingDir`; created if missing; `/` when empty.
    pub working_dir: String,
    /// `User`: `""`, `name`, `uid`, `name:group` or `uid:gid`.
    pub user: String,
    /// The container's host name (empty: the container id).
    pub hostname: String,
    /// A container whose IPC and UTS namespaces this one joins instead of
    /// having its own (a pod's sandbox, for the pod's other containers);
    /// the host name is then that container's. It must have a running
    /// first process when this one's starts.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub share_ipc_uts_with: Option<String>,
    /// With `share_ipc_uts_with`: that container's PID namespace too
    /// (Kubernetes' `shareProcessNamespace`): this one's processes are
    /// not PID 1 and see the other's.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub share_pid: bool,
    /// Mounts made in the container's root.
    pub mounts: Vec<Mount>,
    /// Resource limits of the container's processes.
    pub rlimits: Vec<Rlimit>,
    /// The capability sets of the container's processes; `None`: docker's
    /// default ([`Capabilities::docker_default`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub capabilities: Option<Capabilities>,
    /// Whether the container's processes get `no_new_privs`; `None`: yes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub no_new_privileges: Option<bool>,
    /// The seccomp filter of the container's processes; `None`: none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seccomp: Option<SeccompProfile>,

    // The OCI runtime spec's `linux` and process settings (runc's
    // semantics), applied by the agent in runc's order.
    /// Supplementary groups (`process.user.additionalGids`). `None`: the
    /// groups of the image's `/etc/group` (docker's way); `Some`: these,
    /// exactly, after the image's groups of a user given by name (runc's
    /// way: a numeric `uid:gid` user gets only these).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub additional_gids: Option<Vec<u32>>,
    /// `process.oomScoreAdj`, written to `/proc/self/oom_score_adj`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub oom_score_adj: Option<i32>,
    /// The root is mounted read-only once the container's mounts, device
    /// nodes and working directory are made (`root.readonly`).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub readonly_rootfs: bool,
    /// Paths hidden from the container (`linux.maskedPaths`): a directory
    /// gets an empty read-only tmpfs, a file `/dev/null`; a missing path is
    /// ignored.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub masked_paths: Vec<String>,
    /// Paths made read-only (`linux.readonlyPaths`); a missing path is
    /// ignored.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub readonly_paths: Vec<String>,
    /// Kernel parameters (`linux.sysctl`), namespaced ones only (see
    /// [`crate::sysctl_namespace`]).
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub sysctl: std::collections::BTreeMap<String, String>,
    /// Device nodes made in the container's `/dev` (`linux.devices`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub devices: Vec<crate::Device>,
    /// Mount propagation of the container's root
    /// (`linux.rootfsPropagation`); `None`: left as the new mount
    /// namespace has it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rootfs_propagation: Option<crate::Propagation>,
    /// The user namespace's uid map (`linux.uidMappings`); with
    /// `gid_mappings`, the container gets a user namespace of its own
    /// (both or neither). Ids of the other fields (user, groups, device
    /// owners) are the container's.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub uid_mappings: Vec<crate::IdMapping>,
    /// The user namespace's gid map (`linux.gidMappings`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub gid_mappings: Vec<crate::IdMapping>,
    /// Directories on a volume disk bound into the container (several on
    /// one disk, each in its own subdirectory).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub disk_dirs: Vec<DiskDir>,
    /// Limits of the container's cgroup (in a guest: a cgroup v2 of its
    /// own, `/sys/fs/cgroup/vmrun/<id>`); empty: none. Boxed: most
    /// containers have none, and requests stay small.
    #[serde(skip_serializing_if = "Resources::is_empty")]
    pub resources: Box<Resources>,
    /// Whether the container gets a cgroup of its own in the guest even
    /// without limits (for its statistics and later limits, as an OCI
    /// runtime's containers do). A container with limits always gets one;
    /// one without either has none: its processes stay in the guest's root
    /// cgroup, which saves about a quarter of a process start's guest
    /// instructions (memory accounting and the cgroup's own upkeep).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub cgroup: bool,
}

/// The capability names the agent knows, by number (`CAP_CHOWN` is 0).
pub const CAPABILITY_NAMES: [&str; 41] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];

/// Docker's default capabilities (`docker run` without `--cap-add` or
/// `--cap-drop`).
pub const DOCKER_DEFAULT_CAPABILITIES: [&str; 14] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

/// The number of a capability name: `CAP_NET_ADMIN`, or `NET_ADMIN`, in
/// any case.
pub fn capability_number(name: &str) -> Option<u32> {
    let upper = name.to_ascii_uppercase();
    let bare = upper.strip_prefix("CAP_").unwrap_or(&upper);
    CAPABILITY_NAMES.iter().position(|n| n[4..] == *bare).map(|i| i as u32)
}

/// The capability sets of a process, as in the OCI runtime spec: names
/// such as `CAP_NET_ADMIN` (see [`capability_number`]). An unknown name is
/// refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct Capabilities {
    /// The bounding set: what the process and its children can ever get.
    pub bounding: Vec<String>,
    /// The effective set.
    pub effective: Vec<String>,
    /// The permitted set.
    pub permitted: Vec<String>,
    /// The inheritable set.
    pub inheritable: Vec<String>,
    /// The ambient set (kept across `execve` by a process that is not root).
    pub ambient: Vec<String>,
}

impl Capabilities {
    /// What docker gives: [`DOCKER_DEFAULT_CAPABILITIES`] as the bounding
    /// set and, for root, the effective and permitted sets (a user other
    /// than root gets only the bounding set, as `execve` would leave it).
    pub fn docker_default(root: bool) -> Self {
        let set: Vec<String> = DOCKER_DEFAULT_CAPABILITIES.iter().map(|s| s.to_string()).collect();
        let own = if root { set.clone() } else { Vec::new() };
        Self { bounding: set, effective: own.clone(), permitted: own, ..Default::default() }
    }

    /// Every capability in the bounding, effective and permitted sets:
    /// what root has without restrictions (runc's behaviour when a spec
    /// has no `process.capabilities`).
    pub fn all() -> Self {
        let set: Vec<String> = CAPABILITY_NAMES.iter().map(|s| s.to_string()).collect();
        Self { bounding: set.clone(), effective: set.clone(), permitted: set, ..Default::default() }
    }
}

/// A seccomp profile, as in the OCI runtime spec's `linux.seccomp`: the
/// agent compiles it to a BPF filter (x86_64 system call numbers) and
/// installs it in the process just before it runs its program. A call
/// gets the action of the first entry of `syscalls` (in the order their
/// actions first appear) that names it and whose `args` all hold, else
/// `default_action`. System call names the agent does not know are
/// skipped (as runc does); calls of another ABI (i386, x32) fail with
/// `ENOSYS`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeccompProfile {
    /// The action for a call no entry matches.
    pub default_action: SeccompAction,
    /// The errno of a default action [`SeccompAction::Errno`] (default
    /// `EPERM`) or the message of [`SeccompAction::Trace`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_errno_ret: Option<u32>,
    /// The spec's architectures (`SCMP_ARCH_X86_64`, ...), for messages:
    /// the filter is always for the native one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub architectures: Vec<String>,
    /// Flags of the filter.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub flags: Vec<SeccompFlag>,
    /// The entries.
    #[serde(default)]
    pub syscalls: Vec<SeccompSyscalls>,
}

/// What a filter does with a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SeccompAction {
    /// Runs it.
    Allow,
    /// Fails it with an errno (`errno_ret`, default `EPERM`).
    Errno,
    /// Kills the thread (`SCMP_ACT_KILL`, `SCMP_ACT_KILL_THREAD`).
    #[serde(alias = "kill")]
    KillThread,
    /// Kills the process.
    KillProcess,
    /// Sends `SIGSYS`.
    Trap,
    /// Runs it and logs it.
    Log,
    /// Hands it to a `ptrace` tracer (`errno_ret` as the message, default
    /// `EPERM`); without one it fails with `ENOSYS`.
    Trace,
}

/// A flag of `seccomp(SECCOMP_SET_MODE_FILTER)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SeccompFlag {
    /// `SECCOMP_FILTER_FLAG_LOG`: log every action but `allow`.
    Log,
    /// `SECCOMP_FILTER_FLAG_SPEC_ALLOW`: keep speculative store bypass
    /// mitigation off.
    SpecAllow,
}

/// System calls with one action, under conditions on their arguments.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeccompSyscalls {
    /// The system calls' names (`mkdirat`).
    pub names: Vec<String>,
    /// The action when every condition holds.
    pub action: SeccompAction,
    /// The errno of [`SeccompAction::Errno`] (default `EPERM`), the
    /// message of [`SeccompAction::Trace`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub errno_ret: Option<u32>,
    /// Conditions on the arguments, all of which must hold; none: always.
    /// Several entries for one call are alternatives.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<SeccompArg>,
}

/// A condition on a system call argument (compared as 64 bits).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeccompArg {
    /// The argument, 0 to 5.
    pub index: u32,
    /// The value compared with (the mask, for [`SeccompOp::MaskedEq`]).
    pub value: u64,
    /// For [`SeccompOp::MaskedEq`]: the value the masked argument must
    /// equal.
    #[serde(default)]
    pub value_two: u64,
    /// The comparison: `argument op value`.
    pub op: SeccompOp,
}

/// A comparison of a [`SeccompArg`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SeccompOp {
    /// `==`.
    Eq,
    /// `!=`.
    Ne,
    /// `<`.
    Lt,
    /// `<=`.
    Le,
    /// `>`.
    Gt,
    /// `>=`.
    Ge,
    /// `argument & value == value_two`.
    MaskedEq,
}

/// A mount inside the container, like an OCI runtime spec mount.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mount {
    /// Where, inside the container (absolute).
    pub destination: String,
    /// File system type (`tmpfs`, `bind`, ...).
    pub fstype: String,
    /// Source: a guest path for `bind`, anything for others.
    #[serde(default)]
    pub source: String,
    /// Options: flags (`ro`, `nosuid`, `nodev`, `noexec`, `rbind`) and
    /// file system data (`size=64m`).
    #[serde(default)]
    pub options: Vec<String>,
}

/// One resource limit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rlimit {
    /// `nofile`, `nproc`, `core`, ... (or `RLIMIT_NOFILE`, ...).
    pub resource: String,
    /// Soft limit.
    pub soft: u64,
    /// Hard limit.
    pub hard: u64,
}

/// A container's cgroup limits, as the OCI runtime spec's
/// `linux.resources` has them (cgroup v1 units); the agent converts them
/// to cgroup v2 as runc does. An unset field is left as it is (at creation:
/// the kernel's default, no limit).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct Resources {
    /// Memory.
    #[serde(skip_serializing_if = "MemoryResources::is_empty")]
    pub memory: MemoryResources,
    /// CPU.
    #[serde(skip_serializing_if = "CpuResources::is_empty")]
    pub cpu: CpuResources,
    /// Process numbers.
    #[serde(skip_serializing_if = "PidsResources::is_empty")]
    pub pids: PidsResources,
    /// cgroup v2 files written as they are (`"memory.high": "100M"`): the
    /// spec's `linux.resources.unified`. A key names a file of an enabled
    /// controller (`controller.name`).
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub unified: std::collections::BTreeMap<String, String>,
    /// The device cgroup's rules (`linux.resources.devices`), in order:
    /// for each access asked, the last rule that matches the device and
    /// names that access decides; none: denied. runc's default rules are
    /// added after them (the standard nodes, ptys, `mknod` of any node).
    /// Empty: no device program (the container's mounts are `nodev`
    /// anyway, but for its own `/dev`'s nodes). An update that sets rules
    /// replaces the old ones.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub devices: Vec<DeviceRule>,
}

impl Resources {
    /// Whether nothing is set.
    pub fn is_empty(&self) -> bool {
        self.memory.is_empty() && self.cpu.is_empty() && self.pids.is_empty() && self.unified.is_empty() && self.devices.is_empty()
    }
}

/// One rule of a device cgroup (the spec's `LinuxDeviceCgroup`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceRule {
    /// Whether the rule allows (else denies).
    pub allow: bool,
    /// `c` (character), `b` (block); `None`: both (`a`). A FIFO is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<crate::DeviceKind>,
    /// The major number; `None`: any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub major: Option<u32>,
    /// The minor number; `None`: any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub minor: Option<u32>,
    /// Which of `r` (read), `w` (write), `m` (mknod) it names; empty: all.
    #[serde(default)]
    pub access: String,
}

/// Memory limits, in bytes; -1 is no limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct MemoryResources {
    /// Hard limit (`memory.max`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<i64>,
    /// Soft limit, memory protected from reclaim (`memory.low`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reservation: Option<i64>,
    /// Memory plus swap (`memory.swap.max` is this less `limit`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub swap: Option<i64>,
}

impl MemoryResources {
    /// Whether nothing is set.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// CPU limits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct CpuResources {
    /// Relative weight, cgroup v1's 2 to 262144 (`cpu.weight`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shares: Option<u64>,
    /// Microseconds of CPU time per period; -1 (or 0 with a period) is no
    /// limit (`cpu.max`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quota: Option<i64>,
    /// The period of `quota`, in microseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub period: Option<u64>,
    /// The CPUs allowed (`0-1,3`; `cpuset.cpus`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpus: Option<String>,
    /// The memory nodes allowed (`cpuset.mems`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mems: Option<String>,
}

impl CpuResources {
    /// Whether nothing is set.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// Process number limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct PidsResources {
    /// Most tasks in the cgroup; 0 or -1: no limit (`pids.max`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<i64>,
}

impl PidsResources {
    /// Whether nothing is set.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// A container's cgroup statistics (cgroup v2 units: microseconds, bytes).
/// A limit of `None` is no limit (`max`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct CgroupStats {
    /// CPU time (`cpu.stat`).
    pub cpu: CpuStats,
    /// Memory (`memory.*`).
    pub memory: MemoryStats,
    /// Tasks (`pids.*`).
    pub pids: PidsStats,
}

/// `cpu.stat`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct CpuStats {
    /// All CPU time, microseconds.
    pub usage_usec: u64,
    /// In user mode.
    pub user_usec: u64,
    /// In kernel mode.
    pub system_usec: u64,
    /// Periods with a quota that have passed.
    pub nr_periods: u64,
    /// Periods in which the quota ran out.
    pub nr_throttled: u64,
    /// Time spent throttled, microseconds.
    pub throttled_usec: u64,
}

/// Memory use and limits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct MemoryStats {
    /// Bytes in use (`memory.current`).
    pub current: u64,
    /// `memory.max`.
    pub max: Option<u64>,
    /// `memory.low`.
    pub low: u64,
    /// Swap in use (`memory.swap.current`; `None` without swap accounting).
    pub swap_current: Option<u64>,
    /// `memory.events`.
    pub events: MemoryEvents,
    /// `memory.stat` (`anon`, `file`, `kernel_stack`, ...).
    pub stat: std::collections::BTreeMap<String, u64>,
}

/// `memory.events`: how often each happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct MemoryEvents {
    /// Reclaimed below `memory.low`.
    pub low: u64,
    /// Throttled above `memory.high`.
    pub high: u64,
    /// About to go over `memory.max`.
    pub max: u64,
    /// Reached the limit with nothing left to reclaim.
    pub oom: u64,
    /// Processes killed by the OOM killer.
    pub oom_kill: u64,
}

/// Tasks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct PidsStats {
    /// `pids.current`.
    pub current: u64,
    /// `pids.max`.
    pub max: Option<u64>,
}

/// Another process in a running container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Exec {
    /// The container.
    pub container: String,
    /// The new process's id within the container (same rules as container
    /// ids).
    pub exec_id: String,
    /// What to run.
    pub process: ExecProcess,
    /// Where its standard streams go.
    pub stdio: Stdio,
}

/// What an exec'd process runs; unset fields come from the container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct ExecProcess {
    /// The program and its arguments.
    pub args: Vec<String>,
    /// Variables added to the container's environment.
    pub env: Vec<String>,
    /// The working directory (default: the container's).
    pub working_dir: Option<String>,
    /// The user (default: the container's).
    pub user: Option<String>,
    /// Mounts added to the container's own (for the container's first
    /// process only; refused for an exec). A mount of a block device
    /// (`source` under `/dev/`, a disk file system type such as `ext4`) is
    /// made by the agent and bound into the container.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub mounts: Vec<Mount>,
    /// The capability sets (default: the container's).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub capabilities: Option<Capabilities>,
    /// `no_new_privs` (default: the container's).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub no_new_privileges: Option<bool>,
    /// The seccomp filter (default: the container's).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seccomp: Option<SeccompProfile>,
    /// Supplementary groups, as [`ImageConfig::additional_gids`] (default:
    /// the container's).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub additional_gids: Option<Vec<u32>>,
    /// `oom_score_adj` (default: the container's).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub oom_score_adj: Option<i32>,
}

/// Where a process's standard streams go. Stream ids are chosen by the
/// host, unique on the connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stdio {
    /// All three on `/dev/null`.
    Null,
    /// Separate pipes; a missing one is `/dev/null`.
    Pipes {
        /// Host-to-process stream.
        stdin: Option<u32>,
        /// Process-to-host stream.
        stdout: Option<u32>,
        /// Process-to-host stream.
        stderr: Option<u32>,
    },
    /// One terminal: the stream carries input to it and its output back.
    Tty {
        /// The stream, both ways.
        stream: u32,
        /// Initial rows.
        rows: u16,
        /// Initial columns.
        cols: u16,
    },
}

/// A successful answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum Reply {
    /// Done.
    Done,
    /// Answer to a ping.
    Pong {
        /// The agent's software and version.
        software: String,
    },
    /// The process runs.
    Started {
        /// Its pid in the guest.
        pid: u32,
    },
    /// The process is set up and held before its program (see
    /// `StartContainer`'s `hold`).
    Prepared {
        /// Its pid in the guest.
        pid: u32,
    },
    /// The process ended.
    Exited {
        /// Its exit code as docker reports it: the status it exited with,
        /// or 128 + the signal that killed it.
        exit_code: i32,
    },
    /// A container's cgroup statistics.
    Stats(CgroupStats),
    /// A part of what a container changed in its root
    /// ([`Request::ReadChanges`]).
    Changes {
        /// Changes in order: parents before their children.
        changes: Vec<Change>,
        /// Where the next part starts; `None`: this was the last.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        next: Option<u64>,
    },
}

/// What kind of failure an error is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The request is malformed or asks for something impossible.
    BadRequest,
    /// No such container or process.
    NotFound,
    /// A container or process with that id exists.
    AlreadyExists,
    /// Not in this state (e.g. removing a running container).
    InvalidState,
    /// The image cannot be unpacked: bad disk, digest mismatch, malicious or
    /// corrupt layer, limits exceeded.
    Image,
    /// The process could not be started; `exit_code` says why (126: could
    /// not be run, 127: not found).
    CannotRun,
    /// The agent failed.
    Internal,
}

/// A failed answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentError {
    /// What kind of failure.
    pub kind: ErrorKind,
    /// A message for a person.
    pub message: String,
    /// For [`ErrorKind::CannotRun`]: the exit code the process got.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
}

impl AgentError {
    /// An error without an exit code.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self { kind, message: message.into(), exit_code: None }
    }
}

impl std::fmt::Display for AgentError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for AgentError {}

/// The payload of a `Response` frame.
pub type Response = Result<Reply, AgentError>;

/// Whether `id` is a valid container or exec id: 1 to 64 of
/// `[A-Za-z0-9_.-]`, not starting with `.` or `-` (it names a directory).
pub fn valid_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && !id.starts_with(['.', '-'])
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
}

// ---- Copied mounts ----

/// Most bytes of file content in one copied mount ([`WriteFiles`]); a bind
/// mount whose source holds more goes on a volume disk.
pub const COPY_MAX_BYTES: u64 = 4 << 20;
/// Most entries (files, directories, symbolic links) in one copied mount.
pub const COPY_MAX_ENTRIES: u64 = 1024;
/// Most copied mounts in one container.
pub const COPY_MAX_MOUNTS: usize = 256;
/// Most bytes of file content the host puts in one [`WriteFiles`] part
/// (base64 in JSON: a part stays well under a frame's
/// [`crate::frame::MAX_PAYLOAD`]).
pub const COPY_PART_BYTES: usize = 512 << 10;

/// Longest path in a copied tree or a change.
pub const MAX_PATH: usize = 4096;

/// Whether `path` is a relative path of plain names separated by `/`
/// (none empty, `.` or `..`, longer than 255 bytes or holding a NUL), or
/// `""` (the root): how copied trees and changes name their entries.
pub fn plain_path(path: &str) -> bool {
    let plain = |c: &str| !c.is_empty() && c != "." && c != ".." && c.len() <= 255 && !c.contains('\0');
    path.is_empty() || (path.len() <= MAX_PATH && path.split('/').all(plain))
}

/// Files copied into a container for one bind mount, in parts: the host
/// sends the whole tree of the mount's source, in one or more requests
/// for the same `destination`, the last with `last: true`. The agent
/// writes the parts into a staging directory of its own (a tmpfs of the
/// container's, bounded by [`COPY_MAX_BYTES`] and [`COPY_MAX_ENTRIES`]),
/// and with the last part puts the copy in place: before the container
/// starts, a new mount bound at `destination` when it starts; after, the
/// new content replacing the old one of a mount the container has (see
/// the agent's `copy` module for how readers see the change).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriteFiles {
    /// The container.
    pub container: String,
    /// Where the container sees the copy (absolute): names the mount.
    pub destination: String,
    /// A file or a directory.
    pub kind: CopyKind,
    /// Bound read-only in the container.
    #[serde(default)]
    pub read_only: bool,
    /// Entries of this part, parents before their children.
    #[serde(default)]
    pub entries: Vec<CopyEntry>,
    /// Whether this is the last part of the tree.
    #[serde(default)]
    pub last: bool,
}

/// What a copied mount is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CopyKind {
    /// One regular file: one entry, of path `""`.
    File,
    /// A directory tree; the entry of path `""` is its root.
    Directory,
}

/// One entry of a copied tree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CopyEntry {
    /// Relative to the mount's root, `/`-separated, of plain names only (no
    /// `.`, `..`, empty or absolute components); `""`: the root.
    pub path: String,
    /// Permission bits (`0o7777` at most; set-id bits are kept, the mount
    /// is `nosuid`).
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// What it is.
    pub content: CopyContent,
}

/// The content of a [`CopyEntry`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum CopyContent {
    /// A directory.
    Directory,
    /// A regular file, or a piece of one.
    File {
        /// Its bytes (base64 in JSON).
        #[serde(with = "base64_bytes")]
        data: Vec<u8>,
        /// Appended to the file of the same path written by an earlier
        /// entry (a file larger than a part comes in pieces).
        #[serde(default)]
        append: bool,
    },
    /// A symbolic link, copied as it is (never followed by the agent; the
    /// container resolves it in its own root).
    Symlink {
        /// The link's target.
        target: String,
    },
}

/// A directory on a volume disk, bound into the container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskDir {
    /// The disk (`/dev/vdc`).
    pub disk: String,
    /// Its file system (`ext4`).
    pub fstype: String,
    /// The directory on it: a plain name in the disk's root.
    pub subdir: String,
    /// Where the container sees it (absolute).
    pub destination: String,
    /// Bound read-only.
    #[serde(default)]
    pub read_only: bool,
}

mod base64_bytes {
    use base64::Engine;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(b: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(b))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = std::borrow::Cow::<str>::deserialize(d)?;
        base64::engine::general_purpose::STANDARD.decode(s.as_bytes()).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn netmasks_of_prefixes() {
        assert_eq!(ipv4_netmask(0), 0);
        assert_eq!(ipv4_netmask(24), 0xffff_ff00);
        assert_eq!(ipv4_netmask(32), u32::MAX);
        assert_eq!(ipv4_netmask(40), u32::MAX);
    }

    #[test]
    fn requests_round_trip_through_json() {
        let reqs = vec![
            Request::Ping,
            Request::CreateContainer(CreateContainer {
                id: "c1".into(),
                layers: LayerSource { disk: "/dev/vdb".into(), layers: vec![Digest::of(b"x")] },
                rootfs: RootfsSpec::Tmpfs { size_mib: Some(64) },
                config: ImageConfig { cmd: vec!["sh".into()], env: vec!["A=b".into()], ..Default::default() },
                limits: UnpackLimits::default(),
            }),
            Request::StartContainer { container: "c1".into(), stdio: Stdio::Tty { stream: 1, rows: 24, cols: 80 }, process: None, hold: false },
            Request::StartContainer { container: "c1".into(), stdio: Stdio::Null, process: None, hold: true },
            Request::Release { container: "c1".into(), process: None, stdio: None },
            Request::Release {
                container: "c1".into(),
                process: Some(ExecProcess { args: vec!["ls".into()], ..Default::default() }),
                stdio: Some(Stdio::Pipes { stdin: None, stdout: Some(4), stderr: Some(5) }),
            },
            Request::Exec(Exec {
                container: "c1".into(),
                exec_id: "e1".into(),
                process: ExecProcess { args: vec!["ls".into()], ..Default::default() },
                stdio: Stdio::Pipes { stdin: None, stdout: Some(2), stderr: Some(3) },
            }),
            Request::Signal { container: "c1".into(), exec_id: None, signal: 9 },
            Request::Wait { container: "c1".into(), exec_id: Some("e1".into()) },
            Request::RemoveContainer { container: "c1".into(), force: true },
            Request::Shutdown,
            Request::Stats { container: "c1".into() },
            Request::Update {
                container: "c1".into(),
                resources: Resources {
                    memory: MemoryResources { limit: Some(64 << 20), ..Default::default() },
                    cpu: CpuResources { quota: Some(50_000), period: Some(100_000), ..Default::default() },
                    pids: PidsResources { limit: Some(-1) },
                    unified: [("memory.high".to_string(), "32M".to_string())].into(),
                    devices: vec![
                        DeviceRule { allow: false, kind: None, major: None, minor: None, access: "rwm".into() },
                        DeviceRule { allow: true, kind: Some(crate::DeviceKind::Char), major: Some(1), minor: None, access: "r".into() },
                    ],
                },
            },
        ];
        for r in reqs {
            let j = serde_json::to_vec(&r).unwrap();
            assert_eq!(serde_json::from_slice::<Request>(&j).unwrap(), r);
        }
        let resp: Response = Err(AgentError { kind: ErrorKind::CannotRun, message: "x: not found".into(), exit_code: Some(127) });
        let j = serde_json::to_string(&resp).unwrap();
        assert_eq!(serde_json::from_str::<Response>(&j).unwrap(), resp);
        let ok: Response = Ok(Reply::Exited { exit_code: 137 });
        assert_eq!(serde_json::from_slice::<Response>(&serde_json::to_vec(&ok).unwrap()).unwrap(), ok);
        let mut stats = CgroupStats::default();
        stats.memory.max = Some(1 << 26);
        stats.memory.stat.insert("anon".into(), 4096);
        stats.pids = PidsStats { current: 3, max: None };
        let ok: Response = Ok(Reply::Stats(stats));
        assert_eq!(serde_json::from_slice::<Response>(&serde_json::to_vec(&ok).unwrap()).unwrap(), ok);
    }

    #[test]
    fn minimal_create_uses_defaults() {
        let j = format!(
            r#"{{"op":"create_container","id":"a","layers":{{"disk":"/d","layers":["{}"]}},"config":{{"cmd":["true"]}}}}"#,
            Digest::of(b"")
        );
        let Request::CreateContainer(c) = serde_json::from_str::<Request>(&j).unwrap() else { panic!() };
        assert_eq!(c.rootfs, RootfsSpec::Tmpfs { size_mib: None });
        assert_eq!(c.limits, UnpackLimits::default());
        assert!(c.config.entrypoint.is_empty());
        assert_eq!((c.config.capabilities, c.config.no_new_privileges), (None, None), "older callers keep today's behaviour");
        assert!(c.config.resources.is_empty(), "no limits unless asked");
        let j = serde_json::to_string(&ImageConfig::default()).unwrap();
        assert!(!j.contains("resources"), "an empty set of limits is not sent: {j}");
    }

    #[test]
    fn capability_names() {
        assert_eq!(capability_number("CAP_CHOWN"), Some(0));
        assert_eq!(capability_number("net_admin"), Some(12));
        assert_eq!(capability_number("CAP_SYS_ADMIN"), Some(21));
        assert_eq!(capability_number("CAP_CHECKPOINT_RESTORE"), Some(40));
        assert_eq!(capability_number("CAP_BOGUS"), None);
        assert_eq!(capability_number("CAP_"), None);
        for d in DOCKER_DEFAULT_CAPABILITIES {
            assert!(capability_number(d).is_some(), "{d}");
        }
        let user = Capabilities::docker_default(false);
        assert!(user.effective.is_empty() && user.permitted.is_empty() && user.bounding.len() == 14);
        let c = ImageConfig { capabilities: Some(Capabilities::docker_default(true)), no_new_privileges: Some(false), ..Default::default() };
        assert_eq!(serde_json::from_str::<ImageConfig>(&serde_json::to_string(&c).unwrap()).unwrap(), c);
    }

    #[test]
    fn seccomp_profiles_round_trip_and_default_to_none() {
        let j = r#"{"default_action":"errno","default_errno_ret":38,"flags":["log"],"syscalls":[
            {"names":["reboot"],"action":"kill"},
            {"names":["clone"],"action":"allow","args":[{"index":0,"value":2114060288,"op":"masked_eq"}]}]}"#;
        let p: SeccompProfile = serde_json::from_str(j).unwrap();
        assert_eq!((p.default_action, p.default_errno_ret), (SeccompAction::Errno, Some(38)));
        assert_eq!(p.flags, [SeccompFlag::Log]);
        assert_eq!(p.syscalls[0].action, SeccompAction::KillThread, "kill is kill_thread, as in libseccomp");
        assert_eq!(p.syscalls[1].args, [SeccompArg { index: 0, value: 2114060288, value_two: 0, op: SeccompOp::MaskedEq }]);
        let c = ImageConfig { seccomp: Some(p.clone()), ..Default::default() };
        assert_eq!(serde_json::from_str::<ImageConfig>(&serde_json::to_string(&c).unwrap()).unwrap(), c);
        let e = ExecProcess { seccomp: Some(p), ..Default::default() };
        assert_eq!(serde_json::from_str::<ExecProcess>(&serde_json::to_string(&e).unwrap()).unwrap(), e);
        assert_eq!(serde_json::from_str::<ImageConfig>("{}").unwrap().seccomp, None, "older callers: no filter");
        assert_eq!(serde_json::from_str::<ExecProcess>("{}").unwrap().seccomp, None, "the container's");
        assert!(!serde_json::to_string(&ImageConfig::default()).unwrap().contains("seccomp"));
        assert!(serde_json::from_str::<SeccompProfile>(r#"{"default_action":"notify"}"#).is_err());
    }

    #[test]
    fn bad_digests_are_refused_when_parsing() {
        let j = r#"{"op":"create_container","id":"a","layers":{"disk":"/d","layers":["sha256:00"]},"config":{}}"#;
        assert!(serde_json::from_str::<Request>(j).is_err());
    }

    #[test]
    fn ids() {
        for ok in ["a", "c1", "my_container.2", "A-b", &"x".repeat(64)] {
            assert!(valid_id(ok), "{ok}");
        }
        for bad in ["", ".", "..", "-x", "a/b", "a b", &"x".repeat(65), "é"] {
            assert!(!valid_id(bad), "{bad}");
        }
    }

    #[test]
    fn copied_files_travel_as_base64_and_a_full_part_fits_a_frame() {
        let data: Vec<u8> = (0..COPY_PART_BYTES).map(|i| (i * 7 % 251) as u8).collect();
        let entry = |path: &str, content| CopyEntry { path: path.into(), mode: 0o644, uid: 0, gid: 0, content };
        let w = Request::WriteFiles(WriteFiles {
            container: "c1".into(),
            destination: "/etc/config".into(),
            kind: CopyKind::Directory,
            read_only: true,
            entries: vec![
                entry("", CopyContent::Directory),
                entry("..data", CopyContent::Symlink { target: "..2024_01".into() }),
                entry("big", CopyContent::File { data: data.clone(), append: false }),
            ],
            last: true,
        });
        let j = serde_json::to_vec(&w).unwrap();
        assert!(j.len() < crate::frame::MAX_PAYLOAD, "{} bytes", j.len());
        assert!(String::from_utf8_lossy(&j).contains(r#""type":"symlink""#));
        assert_eq!(serde_json::from_slice::<Request>(&j).unwrap(), w);
        let bad = r#"{"op":"write_files","container":"c","destination":"/x","kind":"file","entries":[{"path":"","mode":420,"uid":0,"gid":0,"content":{"type":"file","data":"!!"}}]}"#;
        assert!(serde_json::from_str::<Request>(bad).is_err(), "not base64");
        let old: ImageConfig = serde_json::from_str(r#"{"cmd":["sh"]}"#).unwrap();
        assert!(old.disk_dirs.is_empty());
    }
}
