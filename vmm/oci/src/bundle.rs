//! A bundle's `config.json` (read with the `oci-spec` crate), checked and
//! turned into a [`Plan`]: what the VM is made of and what the guest agent
//! runs.
//!
//! What is used: `ociVersion` (1.0.x, 1.1.x and 1.2.x; unknown fields are
//! ignored), `root` (a directory,
//! copied into an ext4 disk; `readonly` makes the container's root
//! read-only once the agent has made its mount points), `process` (args,
//! env, cwd, user uid/gid/additionalGids, terminal, rlimits,
//! `capabilities`, `noNewPrivileges`, `oomScoreAdj`),
//! `hostname`, `mounts`, `linux.seccomp`,
//! `linux.resources` (see below) and the annotations `io.vmrun.memory` /
//! `io.vmrun.cpus`;
//! `linux.maskedPaths`, `linux.readonlyPaths`, `linux.sysctl`,
//! `linux.devices` and `linux.rootfsPropagation`.
//!
//! `linux.resources` does two things. It sizes the VM: the memory limit
//! (rounded up to MiB, at least 128) is the guest's memory and the CPU
//! quota over its period (rounded up) its vCPUs, unless the annotations
//! `io.vmrun.memory` / `io.vmrun.cpus` say otherwise. And the guest agent
//! applies it to the container's own cgroup v2 in the guest
//! (`/sys/fs/cgroup/vmrun/<id>`, holding every process of the container),
//! converted as runc converts for cgroup v2: `memory.limit` →
//! `memory.max`, `reservation` → `memory.low`, `swap` → `memory.swap.max`
//! (ignored: the guest has no swap), `cpu.shares` → `cpu.weight`,
//! `quota`/`period` → `cpu.max`, `pids.limit` → `pids.max`, `unified` as
//! written, `devices` → a device program (BPF) attached to that cgroup;
//! `cpu.cpus`/`mems` are refused (the guest kernel has no cpuset
//! controller) unless `linux.cgroupsPath` is given: the VM's cgroup on the
//! host (`crate::host_cgroup`), which applies them. Kernel memory, swappiness, realtime CPU time, block I/O,
//! huge pages, network classes and RDMA are not applied.
//! `vmrun-oci events` reads the cgroup's statistics and `vmrun-oci update`
//! changes its limits (within the VM's memory, which cannot change).
//!
//! Capabilities and `noNewPrivileges` are applied to the container's
//! processes by the guest agent, as runc does: the bounding set dropped,
//! the effective, permitted and inheritable sets set after the uid change,
//! the ambient ones raised; `no_new_privs` only when `noNewPrivileges` is
//! true. A spec without `process.capabilities` leaves root every
//! capability (as runc does); an unknown capability name is refused.
//!
//! `linux.seccomp` is passed on to the agent ([`seccomp`]), which compiles
//! it to a BPF filter and installs it in every process of the container
//! where runc does (just before `execve` with `noNewPrivileges`, before
//! the capabilities change without it). Every action but `SCMP_ACT_NOTIFY`
//! (refused: a listener on the host is out of the VM's reach), every
//! comparison and the flags `SECCOMP_FILTER_FLAG_LOG` and
//! `SECCOMP_FILTER_FLAG_SPEC_ALLOW` are applied; `architectures` is not
//! used (the filter is x86_64's, other ABIs get `ENOSYS`), and unknown
//! system call names are skipped, as runc does.
//! The agent applies the rest in runc's order: the user's uid, gid and
//! `additionalGids` exactly (no groups from the image's `/etc/group`),
//! `oom_score_adj`, the device nodes (under `/dev/` only: everything else
//! in the container is `nodev`), the root's propagation, the kernel
//! parameters (only those of a namespace the spec gives the container, as
//! runc's validator: IPC ones with `ipc`, `net.*` with `network`,
//! `kernel.domainname` with `uts`; others are refused here), the root made
//! read-only, the read-only and the masked paths.
//!
//! Mounts: the standard ones a caller such as containerd always lists
//! (`/proc`, `/dev`, `/dev/pts`, `/dev/shm`, `/dev/mqueue`, `/sys`,
//! `/sys/fs/cgroup`) are skipped: the agent makes its own `/proc`, `/dev`
//! (with `/dev/pts`, `/dev/shm`, `/dev/mqueue`) and `/sys`, in runc's
//! order. Bind mounts, any number of them, reach the guest as copies
//! ([`crate::copies::route`]): a file or a small directory (the host files
//! `/etc/resolv.conf`, `/etc/hosts`, `/etc/hostname`,
//! `/dev/termination-log` included) is copied in through the agent and
//! kept up to date ([`crate::copies`]); a larger directory goes on the
//! container's one volume disk, a copy made at create. Nothing is copied
//! back to the host. `tmpfs`, `proc`, `sysfs`, `mqueue` and `devpts`
//! mounts elsewhere are made by the agent in the guest. Missing
//! destinations are made, inside the root (the image's links followed
//! within it).
//!
//! Hooks ([`crate::hooks`]) run on the host: `prestart`, `createRuntime`
//! and `createContainer` during `create`, `poststart` in `start`,
//! `poststop` in `delete`; `startContainer` is not run (a warning).
//!
//! Accepted but not enforced (the VM boundary is the isolation):
//! AppArmor/SELinux labels, namespaces (joining a namespace by path
//! included, though the path must be a namespace of the stated type),
//! the cgroup settings named above, the options of the standard mounts
//! (the agent's own are used).
//!
//! A user namespace (`linux.uidMappings`, `gidMappings`) is made in the
//! guest: the maps take guest ids (the container's root, 1000 in a map
//! `0 1000 N`, is user 1000 of the guest, not of the host); the image's
//! files stay owned by the guest's root, so the container's root sees them
//! as `nobody` (no idmapped root, as with runc).
//!
//! What else a config asks for and is not applied gets a
//! warning with the reason ([`unapplied`]): `domainname`,
//! `process.consoleSize`, AppArmor and SELinux labels (`apparmorProfile`,
//! `selinuxLabel`, `mountLabel`), `ioPriority`, `scheduler`,
//! `execCPUAffinity`, a umask other than 022,
//! `intelRdt`, `memoryPolicy`, `personality`, `timeOffsets`, `netDevices`.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

use oci_spec::runtime::{LinuxSeccomp, LinuxSeccompAction, LinuxSeccompFilterFlag, LinuxSeccompOperator, Process, Spec};
use serde::{Deserialize, Serialize};
use vmrun_agent_protocol::{
    Capabilities, CpuResources, Device, DeviceKind, IdMapping, MemoryResources, Mount, PidsResources, Propagation, Resources, Rlimit, SeccompAction, SeccompArg,
    SeccompFlag, SeccompOp, SeccompProfile, SeccompSyscalls, SysctlNamespace,
};

use crate::copies::{CopyPlan, Route};
use crate::error::{Error, Result};

/// Guest memory without a limit in the spec, in MiB.
pub const DEFAULT_MEMORY_MIB: u32 = 512;
/// The least guest memory, in MiB.
pub const MIN_MEMORY_MIB: u32 = 128;
/// Annotation that sets the VM's memory (`512m`, `1g`, MiB).
pub const ANNOTATION_MEMORY: &str = "io.vmrun.memory";
/// Annotation that sets the VM's vCPUs.
pub const ANNOTATION_CPUS: &str = "io.vmrun.cpus";
/// The least room an ext4 root copy gets, in bytes (the disk is sparse).
pub const MIN_ROOTFS_BYTES: u64 = 256 << 20;

/// Mount destinations a runc caller always lists and the agent provides
/// (or that make no sense in a VM): skipped. (`/etc/resolv.conf`,
/// `/etc/hosts`, `/etc/hostname` and `/dev/termination-log`, which a
/// caller binds from host files, are copied in as any bind-mounted file.)
pub const STANDARD_MOUNTS: &[&str] = &[
    "/proc",
    "/dev",
    "/dev/pts",
    "/dev/shm",
    "/dev/mqueue",
    "/sys",
    "/sys/fs/cgroup",
];

/// The process to run, as the agent takes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessPlan {
    /// argv.
    pub args: Vec<String>,
    /// Environment (`NAME=value`).
    pub env: Vec<String>,
    /// Working directory (absolute).
    pub cwd: String,
    /// `uid:gid`.
    pub user: String,
    /// Whether it gets a terminal.
    pub terminal: bool,
    /// Resource limits.
    pub rlimits: Vec<Rlimit>,
    /// Capability sets (a spec without `process.capabilities`: every
    /// capability bounding, effective and permitted, as runc leaves them).
    #[serde(default = "Capabilities::all")]
    pub capabilities: Capabilities,
    /// `noNewPrivileges` (false when absent).
    #[serde(default)]
    pub no_new_privileges: bool,
    /// `user.additionalGids`: the supplementary groups, exactly.
    #[serde(default)]
    pub additional_gids: Vec<u32>,
    /// `oomScoreAdj`.
    #[serde(default)]
    pub oom_score_adj: Option<i32>,
}

/// A host directory given to the container as a copy on the volume disk
/// (too large to copy through the agent: see [`crate::copies::route`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumePlan {
    /// The host directory.
    pub host: PathBuf,
    /// Where the container sees it.
    pub guest: String,
    /// Mounted read-only.
    pub read_only: bool,
}

/// What `create` made of a bundle; the supervisor builds the VM from it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    /// The spec's `ociVersion`.
    pub oci_version: String,
    /// The container's process.
    pub process: ProcessPlan,
    /// The host name (empty: the container id).
    pub hostname: String,
    /// The root file system on the host (absolute, a directory).
    pub rootfs: PathBuf,
    /// Mount the root copy read-only.
    pub readonly: bool,
    /// Mounts the agent makes in the guest (tmpfs, proc, ...).
    pub mounts: Vec<Mount>,
    /// Host directories copied onto the volume disk.
    pub volumes: Vec<VolumePlan>,
    /// Host files and small directories copied in through the agent, and
    /// kept up to date.
    #[serde(default)]
    pub copies: Vec<CopyPlan>,
    /// Guest memory in MiB.
    pub mem_mib: u32,
    /// vCPUs.
    pub cpus: u8,
    /// The spec's annotations.
    pub annotations: BTreeMap<String, String>,
    /// `linux.seccomp`, for every process of the container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seccomp: Option<SeccompProfile>,
    /// `linux.maskedPaths`.
    #[serde(default)]
    pub masked_paths: Vec<String>,
    /// `linux.readonlyPaths`.
    #[serde(default)]
    pub readonly_paths: Vec<String>,
    /// `linux.sysctl` (namespaced parameters only).
    #[serde(default)]
    pub sysctl: BTreeMap<String, String>,
    /// `linux.devices`.
    #[serde(default)]
    pub devices: Vec<Device>,
    /// `linux.rootfsPropagation`.
    #[serde(default)]
    pub rootfs_propagation: Option<Propagation>,
    /// `linux.uidMappings` of the container's user namespace (made in
    /// the guest; empty: none).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub uid_mappings: Vec<IdMapping>,
    /// `linux.gidMappings`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gid_mappings: Vec<IdMapping>,
    /// `linux.resources`, applied to the container's cgroup in the guest
    /// (and partly to the VM's host cgroup, see `host_cgroup`).
    #[serde(default)]
    pub resources: Resources,
    /// `linux.cgroupsPath`: the VM's cgroup on the host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroups_path: Option<String>,
    /// The hooks run on the host.
    #[serde(default)]
    pub hooks: crate::hooks::Hooks,
    /// The namespaces the container's pid on the host is put in
    /// (`crate::holder`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub host_namespaces: Vec<crate::holder::HostNamespace>,
}

fn bad(msg: impl Into<String>) -> Error {
    Error::Bundle(msg.into())
}

/// Checks that `v` is a version this runtime implements: 1.0.x, 1.1.x or
/// 1.2.x (pre-releases such as `1.0.2-dev` included).
pub fn check_version(v: &str) -> Result<()> {
    let core = v.split(['-', '+']).next().unwrap_or_default();
    let parts: Vec<&str> = core.split('.').collect();
    let numeric = parts.len() == 3 && parts.iter().all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
    if numeric && parts[0] == "1" && matches!(parts[1], "0" | "1" | "2") {
        return Ok(());
    }
    Err(bad(format!("unsupported ociVersion {v:?}: vmrun-oci implements the OCI runtime spec 1.0.x, 1.1.x and 1.2.x")))
}

/// Reads and checks `bundle/config.json`.
pub fn load(bundle: &Path) -> Result<Plan> {
    let path = bundle.join("config.json");
    let text = std::fs::read(&path).map_err(|e| bad(format!("cannot read config.json in bundle {}: {e}", bundle.display())))?;
    let raw: serde_json::Value =
        serde_json::from_slice(&text).map_err(|e| bad(format!("invalid JSON in {}: {e}", path.display())))?;
    // The version first: a spec of another version gets that error, not a
    // parse error about a field that version changed.
    let version = raw
        .get("ociVersion")
        .and_then(|v| v.as_str())
        .ok_or_else(|| bad(format!("{} has no ociVersion", path.display())))?
        .to_string();
    check_version(&version)?;
    if let Some(p) = raw.get("process") {
        check_capability_names(p, &path)?;
    }
    let spec: Spec = serde_json::from_value(raw).map_err(|e| bad(format!("invalid runtime spec in {}: {e}", path.display())))?;
    plan(bundle, &spec)
}

/// The plan for `spec` from the bundle at `bundle` (absolute).
pub fn plan(bundle: &Path, spec: &Spec) -> Result<Plan> {
    let root = spec.root().as_ref().ok_or_else(|| bad("config.json has no root"))?;
    let rootfs = resolve_root(bundle, root.path())?;
    let process = process_plan(spec.process().as_ref().ok_or_else(|| bad("config.json has no process"))?)?;
    let annotations: BTreeMap<String, String> = spec.annotations().clone().unwrap_or_default().into_iter().collect();
    let (mounts, volumes, copies) = mounts(spec.mounts().as_deref().unwrap_or_default())?;
    let hooks = spec.hooks().as_ref().map(crate::hooks::from_spec).unwrap_or_default();
    warn_unapplied(spec);
    let mut linux_plan = LinuxPlan::default();
    let mut host_namespaces = Vec::new();
    if let Some(linux) = spec.linux() {
        for ns in linux.namespaces().as_deref().unwrap_or_default() {
            if let Some(p) = ns.path() {
                check_namespace_path(ns.typ(), p)?;
                log::debug!("namespace {:?} at {}: the container's pid on the host joins it; the container runs in its VM", ns.typ(), p.display());
            }
            match crate::holder::NsKind::of(ns.typ()) {
                Some(kind) => host_namespaces.push(crate::holder::HostNamespace { kind, path: ns.path().clone() }),
                None => log::debug!("namespace {:?}: the container's pid on the host is not put in one", ns.typ()),
            }
        }
        linux_plan = linux_plan_of(linux)?;
    }
    let seccomp = spec.linux().as_ref().and_then(|l| l.seccomp().as_ref()).map(seccomp).transpose()?;
    Ok(Plan {
        oci_version: spec.version().clone(),
        process,
        hostname: spec.hostname().clone().unwrap_or_default(),
        rootfs,
        readonly: root.readonly().unwrap_or(false),
        mounts,
        volumes,
        copies,
        mem_mib: memory_mib(spec, &annotations)?,
        cpus: cpus(spec, &annotations)?,
        annotations,
        seccomp,
        masked_paths: linux_plan.masked_paths,
        readonly_paths: linux_plan.readonly_paths,
        sysctl: linux_plan.sysctl,
        devices: linux_plan.devices,
        rootfs_propagation: linux_plan.rootfs_propagation,
        uid_mappings: linux_plan.uid_mappings,
        gid_mappings: linux_plan.gid_mappings,
        resources: spec.linux().as_ref().and_then(|l| l.resources().as_ref()).map(resources).unwrap_or_default(),
        cgroups_path: spec
            .linux()
            .as_ref()
            .and_then(|l| l.cgroups_path().as_ref())
            .map(|p| p.to_string_lossy().into_owned())
            .filter(|p| !p.is_empty()),
        hooks,
        host_namespaces,
    })
}

/// A seccomp action as the agent takes it; `SCMP_ACT_NOTIFY` is refused:
/// the listener it hands calls to would be on the host, out of the VM's
/// reach.
fn seccomp_action(a: LinuxSeccompAction, what: &str) -> Result<SeccompAction> {
    Ok(match a {
        LinuxSeccompAction::ScmpActAllow => SeccompAction::Allow,
        LinuxSeccompAction::ScmpActErrno => SeccompAction::Errno,
        LinuxSeccompAction::ScmpActKill | LinuxSeccompAction::ScmpActKillThread => SeccompAction::KillThread,
        LinuxSeccompAction::ScmpActKillProcess => SeccompAction::KillProcess,
        LinuxSeccompAction::ScmpActTrap => SeccompAction::Trap,
        LinuxSeccompAction::ScmpActLog => SeccompAction::Log,
        LinuxSeccompAction::ScmpActTrace => SeccompAction::Trace,
        LinuxSeccompAction::ScmpActNotify => {
            return Err(bad(format!(
                "linux.seccomp: {what} is SCMP_ACT_NOTIFY, which vmrun-oci cannot honour: \
                 the container runs in a VM, out of reach of a seccomp agent's listener"
            )))
        }
    })
}

/// `linux.seccomp` as the agent takes it (it compiles and checks the rest:
/// argument indexes, `errnoRet` values, system call names). The flags
/// `SECCOMP_FILTER_FLAG_TSYNC` (the filter is installed in a process with
/// one thread) and `SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV` (for a
/// listener, which is refused) have nothing to do and are dropped.
pub fn seccomp(s: &LinuxSeccomp) -> Result<SeccompProfile> {
    let mut syscalls = Vec::new();
    for (i, call) in s.syscalls().as_deref().unwrap_or_default().iter().enumerate() {
        let args = call
            .args()
            .as_deref()
            .unwrap_or_default()
            .iter()
            .map(|a| {
                let index = u32::try_from(a.index())
                    .map_err(|_| bad(format!("linux.seccomp.syscalls[{i}]: argument index {} is out of range", a.index())))?;
                let op = match a.op() {
                    LinuxSeccompOperator::ScmpCmpEq => SeccompOp::Eq,
                    LinuxSeccompOperator::ScmpCmpNe => SeccompOp::Ne,
                    LinuxSeccompOperator::ScmpCmpLt => SeccompOp::Lt,
                    LinuxSeccompOperator::ScmpCmpLe => SeccompOp::Le,
                    LinuxSeccompOperator::ScmpCmpGt => SeccompOp::Gt,
                    LinuxSeccompOperator::ScmpCmpGe => SeccompOp::Ge,
                    LinuxSeccompOperator::ScmpCmpMaskedEq => SeccompOp::MaskedEq,
                };
                Ok(SeccompArg { index, value: a.value(), value_two: a.value_two().unwrap_or(0), op })
            })
            .collect::<Result<Vec<_>>>()?;
        syscalls.push(SeccompSyscalls {
            names: call.names().clone(),
            action: seccomp_action(call.action(), &format!("the action of syscalls[{i}] ({})", call.names().join(", ")))?,
            errno_ret: call.errno_ret(),
            args,
        });
    }
    let mut flags = Vec::new();
    for f in s.flags().as_deref().unwrap_or_default() {
        match f {
            LinuxSeccompFilterFlag::SeccompFilterFlagLog => flags.push(SeccompFlag::Log),
            LinuxSeccompFilterFlag::SeccompFilterFlagSpecAllow => flags.push(SeccompFlag::SpecAllow),
            LinuxSeccompFilterFlag::SeccompFilterFlagTsync | LinuxSeccompFilterFlag::SeccompFilterFlagWaitKillableRecv => {
                log::debug!("linux.seccomp: flag {f} dropped: nothing to do in the container's process")
            }
        }
    }
    if s.listener_path().is_some() {
        log::debug!("linux.seccomp.listenerPath is not used: no action is SCMP_ACT_NOTIFY");
    }
    Ok(SeccompProfile {
        default_action: seccomp_action(s.default_action(), "defaultAction")?,
        default_errno_ret: s.default_errno_ret(),
        architectures: s.architectures().as_deref().unwrap_or_default().iter().map(|a| a.to_string()).collect(),
        flags,
        syscalls,
    })
}

/// What of `linux` the guest agent applies (see [`Plan`]).
#[derive(Debug, Default)]
struct LinuxPlan {
    masked_paths: Vec<String>,
    readonly_paths: Vec<String>,
    sysctl: BTreeMap<String, String>,
    devices: Vec<Device>,
    rootfs_propagation: Option<Propagation>,
    uid_mappings: Vec<IdMapping>,
    gid_mappings: Vec<IdMapping>,
}

/// Checks and translates the parts of `linux` the agent applies: a new
/// user namespace needs both maps, which must map the container's root and
/// be maps the kernel takes (one joined by path gets none: the container
/// gets its own VM), kernel parameters must belong to a namespace the
/// container has (runc's validator), device nodes must be of a kind and
/// under `/dev`.
fn linux_plan_of(linux: &oci_spec::runtime::Linux) -> Result<LinuxPlan> {
    use oci_spec::runtime::{LinuxDeviceType, LinuxNamespaceType};
    let namespaces = linux.namespaces().as_deref().unwrap_or_default();
    let has = |t: LinuxNamespaceType| namespaces.iter().any(|n| n.typ() == t);
    let map = |m: &Option<Vec<oci_spec::runtime::LinuxIdMapping>>| -> Vec<IdMapping> {
        let m = m.as_deref().unwrap_or_default();
        m.iter().map(|m| IdMapping { container_id: m.container_id(), host_id: m.host_id(), size: m.size() }).collect()
    };
    let (uid_mappings, gid_mappings) = (map(linux.uid_mappings()), map(linux.gid_mappings()));
    let new_user_ns = namespaces.iter().any(|n| n.typ() == LinuxNamespaceType::User && n.path().is_none());
    match (new_user_ns, uid_mappings.is_empty() && gid_mappings.is_empty()) {
        (true, _) => {
            for (what, m) in [("uidMappings", &uid_mappings), ("gidMappings", &gid_mappings)] {
                vmrun_agent_protocol::check_user_ns_map(m).map_err(|e| bad(format!("a user namespace: linux.{what}: {e}")))?;
            }
        }
        (false, false) if !has(LinuxNamespaceType::User) => {
            return Err(bad("linux.uidMappings/gidMappings are set but the spec has no user namespace"))
        }
        // Joined by path (not joined: a warning said so), its maps unused.
        (false, _) => {}
    }
    let (uid_mappings, gid_mappings) = if new_user_ns { (uid_mappings, gid_mappings) } else { (Vec::new(), Vec::new()) };
    let mut sysctl = BTreeMap::new();
    for (key, value) in linux.sysctl().clone().unwrap_or_default() {
        let ns = vmrun_agent_protocol::sysctl_namespace(&key).map_err(|e| bad(e.to_string()))?;
        let (needed, name) = match ns {
            SysctlNamespace::Ipc => (LinuxNamespaceType::Ipc, "ipc"),
            SysctlNamespace::Net => (LinuxNamespaceType::Network, "network"),
            SysctlNamespace::Uts => (LinuxNamespaceType::Uts, "uts"),
        };
        if !has(needed) {
            return Err(bad(format!("sysctl {key:?} is not allowed: the spec has no {name} namespace (it would be the host's)")));
        }
        sysctl.insert(key, value);
    }
    let mut devices = Vec::new();
    for d in linux.devices().as_deref().unwrap_or_default() {
        let path = d.path().to_string_lossy().into_owned();
        let kind = match d.typ() {
            LinuxDeviceType::C | LinuxDeviceType::U => DeviceKind::Char,
            LinuxDeviceType::B => DeviceKind::Block,
            LinuxDeviceType::P => DeviceKind::Fifo,
            LinuxDeviceType::A => return Err(bad(format!("linux.devices {path}: type \"a\" is not a kind of node"))),
        };
        let number = |n: i64, what: &str| u32::try_from(n).map_err(|_| bad(format!("linux.devices {path}: invalid {what} number {n}")));
        let (major, minor) = (number(d.major(), "major")?, number(d.minor(), "minor")?);
        if !path.starts_with("/dev/") || path.split('/').any(|p| p == ".." || p == ".") {
            return Err(bad(format!("linux.devices {path}: a device node must be under /dev/ (the rest of the container is nodev)")));
        }
        devices.push(Device { path, kind, major, minor, file_mode: d.file_mode().map(|m| m & 0o7777), uid: d.uid(), gid: d.gid() });
    }
    let rootfs_propagation = match linux.rootfs_propagation().as_deref() {
        None | Some("") => None,
        Some(p) => Some(Propagation::from_name(p).ok_or_else(|| bad(format!("invalid linux.rootfsPropagation {p:?}")))?),
    };
    let paths = |list: &Option<Vec<String>>, what: &str| -> Result<Vec<String>> {
        let list = list.clone().unwrap_or_default();
        match list.iter().find(|p| !p.starts_with('/')) {
            Some(p) => Err(bad(format!("linux.{what} {p:?} must be an absolute path"))),
            None => Ok(list),
        }
    };
    Ok(LinuxPlan {
        masked_paths: paths(linux.masked_paths(), "maskedPaths")?,
        readonly_paths: paths(linux.readonly_paths(), "readonlyPaths")?,
        sysctl,
        devices,
        rootfs_propagation,
        uid_mappings,
        gid_mappings,
    })
}

/// Why a namespace path is refused.
#[derive(Debug, thiserror::Error)]
pub enum NamespacePathError {
    /// It cannot be opened.
    #[error("namespace path {path}: {source}")]
    Open {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// It is not a namespace file (the ioctl is refused).
    #[error("namespace path {path} is not a namespace: {source}")]
    NotANamespace {
        /// The path.
        path: PathBuf,
        /// The ioctl's error.
        #[source]
        source: std::io::Error,
    },
    /// It is a namespace of another type.
    #[error("namespace path {path} is not a {want} namespace (it is of type {found:#x})")]
    WrongType {
        /// The path.
        path: PathBuf,
        /// The type the spec says.
        want: String,
        /// The `CLONE_NEW*` value the kernel gives.
        found: i32,
    },
}

/// Checks that `path` is a namespace of type `typ` (`NS_GET_NSTYPE`), as
/// the spec requires of a namespace entry with a path.
pub fn check_namespace_path(typ: oci_spec::runtime::LinuxNamespaceType, path: &Path) -> std::result::Result<(), NamespacePathError> {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(path).map_err(|source| NamespacePathError::Open { path: path.to_path_buf(), source })?;
    // SAFETY: an argument-less ioctl on a descriptor we hold; the result
    // is checked.
    let found = unsafe { libc::ioctl(f.as_raw_fd(), libc::NS_GET_NSTYPE) };
    if found < 0 {
        return Err(NamespacePathError::NotANamespace { path: path.to_path_buf(), source: std::io::Error::last_os_error() });
    }
    if found != typ as i32 {
        return Err(NamespacePathError::WrongType { path: path.to_path_buf(), want: typ.to_string(), found });
    }
    Ok(())
}

/// What a spec asks for that this runtime does not apply, each with the
/// reason (docs/oci.md lists them). Parts of the spec
/// handled elsewhere (seccomp, masked and read-only paths, sysctl, devices,
/// groups, oomScoreAdj, cgroups and resources, user namespaces,
/// namespaces to join, the standard mounts' options) are not repeated
/// here.
pub fn unapplied(spec: &Spec) -> Vec<(&'static str, &'static str)> {
    let mut list = Vec::new();
    let mut warn = |what: &'static str, why: &'static str| list.push((what, why));
    const NO_LSM: &str = "the guest kernel has no AppArmor or SELinux (the VM boundary is the isolation)";
    if spec.domainname().as_ref().is_some_and(|d| !d.is_empty()) {
        warn("domainname", "the guest agent sets only the host name");
    }
    if let Some(p) = spec.process() {
        if p.console_size().is_some() {
            warn("process.consoleSize", "the terminal starts with the console socket's window size");
        }
        if p.apparmor_profile().as_ref().is_some_and(|a| !a.is_empty()) {
            warn("process.apparmorProfile", NO_LSM);
        }
        if p.selinux_label().as_ref().is_some_and(|l| !l.is_empty()) {
            warn("process.selinuxLabel", NO_LSM);
        }
        if p.io_priority().is_some() {
            warn("process.ioPriority", "the guest agent does not set I/O priorities");
        }
        if p.scheduler().is_some() {
            warn("process.scheduler", "the guest agent does not set scheduling policies");
        }
        if p.exec_cpu_affinity().is_some() {
            warn("process.execCPUAffinity", "the VM's vCPUs are not the host's CPUs");
        }
        if p.user().umask().is_some_and(|u| u != 0o022) {
            warn("process.user.umask", "the container's processes start with umask 022");
        }
    }
    let Some(linux) = spec.linux() else { return list };
    if linux.mount_label().as_ref().is_some_and(|l| !l.is_empty()) {
        warn("linux.mountLabel", NO_LSM);
    }
    if linux.intel_rdt().is_some() {
        warn("linux.intelRdt", "the VM has no resctrl");
    }
    if linux.memory_policy().is_some() {
        warn("linux.memoryPolicy", "the guest's memory is not the host's NUMA nodes");
    }
    if linux.personality().is_some() {
        warn("linux.personality", "the guest agent does not set execution domains");
    }
    if linux.time_offsets().as_ref().is_some_and(|t| !t.is_empty()) {
        warn("linux.timeOffsets", "the guest has no time namespaces");
    }
    if linux.net_devices().as_ref().is_some_and(|d| !d.is_empty()) {
        warn("linux.netDevices", "the VM has no network device of the host's");
    }
    list
}

/// Logs a warning for each part of `spec` that is not applied.
fn warn_unapplied(spec: &Spec) {
    for (what, why) in unapplied(spec) {
        log::warn!("{what} is not applied: {why}");
    }
}

/// The root file system: `path` relative to the bundle (and not escaping
/// it, symbolic links included), or absolute as the spec allows; it must
/// be a directory.
pub fn resolve_root(bundle: &Path, path: &Path) -> Result<PathBuf> {
    let escape = || bad(format!("root.path {:?} escapes the bundle {}", path.display().to_string(), bundle.display()));
    let candidate = if path.is_absolute() {
        path.to_path_buf()
    } else {
        // Cleaned lexically, as runc's filepath.Join does.
        let mut clean = PathBuf::new();
        for c in path.components() {
            match c {
                Component::Normal(n) => clean.push(n),
                Component::CurDir => {}
                Component::ParentDir => {
                    if !clean.pop() {
                        return Err(escape());
                    }
                }
                Component::RootDir | Component::Prefix(_) => return Err(escape()),
            }
        }
        bundle.join(clean)
    };
    let canon = candidate.canonicalize().map_err(|e| bad(format!("root {}: {e}", candidate.display())))?;
    if !path.is_absolute() {
        let b = bundle.canonicalize().map_err(|e| bad(format!("bundle {}: {e}", bundle.display())))?;
        if !canon.starts_with(&b) {
            return Err(escape());
        }
    }
    if !canon.is_dir() {
        return Err(bad(format!("root {} is not a directory", canon.display())));
    }
    Ok(canon)
}

/// The process of a spec or of `exec --process`.
pub fn process_plan(p: &Process) -> Result<ProcessPlan> {
    let args = p.args().clone().unwrap_or_default();
    if args.is_empty() {
        return Err(bad("process.args must not be empty"));
    }
    let cwd = p.cwd().to_string_lossy().into_owned();
    if !cwd.starts_with('/') {
        return Err(bad(format!("process.cwd {cwd:?} must be an absolute path")));
    }
    let user = p.user();
    let rlimits = p
        .rlimits()
        .as_deref()
        .unwrap_or_default()
        .iter()
        .map(|r| Rlimit { resource: r.typ().to_string(), soft: r.soft(), hard: r.hard() })
        .collect();
    Ok(ProcessPlan {
        args,
        env: p.env().clone().unwrap_or_default(),
        cwd,
        user: format!("{}:{}", user.uid(), user.gid()),
        terminal: p.terminal().unwrap_or(false),
        rlimits,
        capabilities: p.capabilities().as_ref().map_or_else(Capabilities::all, capabilities),
        no_new_privileges: p.no_new_privileges().unwrap_or(false),
        additional_gids: user.additional_gids().clone().unwrap_or_default(),
        oom_score_adj: p.oom_score_adj(),
    })
}

/// The spec's capability sets as the agent takes them (names such as
/// `CAP_NET_ADMIN`, sorted); a set that is absent is empty, as in runc.
fn capabilities(c: &oci_spec::runtime::LinuxCapabilities) -> Capabilities {
    let names = |set: &Option<oci_spec::runtime::Capabilities>| {
        let mut v: Vec<String> = set.iter().flatten().map(|c| format!("CAP_{c}")).collect();
        v.sort();
        v
    };
    Capabilities {
        bounding: names(c.bounding()),
        effective: names(c.effective()),
        permitted: names(c.permitted()),
        inheritable: names(c.inheritable()),
        ambient: names(c.ambient()),
    }
}

/// Refuses capability names this runtime does not know, with the set they
/// are in (`process` is a spec's process or a `process.json`), before the
/// spec is parsed (whose error would name neither).
pub fn check_capability_names(process: &serde_json::Value, file: &Path) -> Result<()> {
    let Some(sets) = process.get("capabilities").and_then(|c| c.as_object()) else { return Ok(()) };
    for (set, names) in sets {
        for name in names.as_array().into_iter().flatten() {
            let known = name.as_str().and_then(vmrun_agent_protocol::capability_number).is_some();
            if !known {
                return Err(bad(format!("unknown capability {name} in process.capabilities.{set} of {}", file.display())));
            }
        }
    }
    Ok(())
}

/// The options the agent understands: flags it knows and `key=value` file
/// system data; propagation and atime flags have no meaning in the guest.
fn guest_options(opts: &[String]) -> Vec<String> {
    opts.iter()
        .filter(|o| matches!(o.as_str(), "ro" | "rw" | "nosuid" | "nodev" | "noexec" | "newinstance") || o.contains('='))
        .cloned()
        .collect()
}

/// The spec's mounts: those the agent makes, host directories too large to
/// copy through the agent (all on one volume disk), and the host files and
/// directories copied through it ([`crate::copies::route`] decides).
pub fn mounts(list: &[oci_spec::runtime::Mount]) -> Result<(Vec<Mount>, Vec<VolumePlan>, Vec<CopyPlan>)> {
    let mut guest = Vec::new();
    let mut volumes = Vec::new();
    let mut copies = Vec::new();
    for m in list {
        let dest = m.destination().to_string_lossy().into_owned();
        if !dest.starts_with('/') || dest.split('/').any(|c| c == "..") {
            return Err(bad(format!("mount destination {dest:?} must be an absolute path without ..")));
        }
        let dest_norm = dest.trim_end_matches('/');
        let typ = m.typ().clone().unwrap_or_default();
        let opts = m.options().clone().unwrap_or_default();
        if STANDARD_MOUNTS.contains(&dest_norm) {
            log::debug!("mount {dest} ({typ}): skipped, the guest agent provides it");
            continue;
        }
        let bind = typ == "bind" || opts.iter().any(|o| o == "bind" || o == "rbind");
        if bind {
            let src = m.source().as_ref().ok_or_else(|| bad(format!("bind mount on {dest} has no source")))?;
            let (host, guest, read_only) = (src.clone(), dest_norm.to_string(), opts.iter().any(|o| o == "ro"));
            match crate::copies::route(src)? {
                Route::Copy(kind) => copies.push(CopyPlan { host, guest, kind, read_only }),
                Route::Disk => volumes.push(VolumePlan { host, guest, read_only }),
            }
            continue;
        }
        match typ.as_str() {
            "tmpfs" | "proc" | "sysfs" | "mqueue" | "devpts" => guest.push(Mount {
                destination: dest_norm.to_string(),
                fstype: typ.clone(),
                source: m.source().as_ref().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| typ.clone()),
                options: guest_options(&opts),
            }),
            "cgroup" | "cgroup2" => log::debug!("mount {dest} ({typ}): skipped, cgroups are the VM's"),
            _ => log::warn!("mount {dest} of type {typ:?} skipped: not supported in the VM"),
        }
    }
    if copies.len() > vmrun_agent_protocol::COPY_MAX_MOUNTS {
        return Err(bad(format!("{} bind mounts of files and small directories: at most {}", copies.len(), vmrun_agent_protocol::COPY_MAX_MOUNTS)));
    }
    Ok((guest, volumes, copies))
}

/// A size in MiB: `512m`, `1g`, `262144k`, `1Gi`, or a plain number of
/// MiB (`vmrun_runtime::size`).
pub fn parse_size_mib(s: &str) -> Option<u64> {
    vmrun_runtime::size::mib(s).ok()
}

/// The spec's `linux.resources` as the agent applies them to the
/// container's cgroup in the guest (converted to cgroup v2 there). What a
/// cgroup v2 in the VM has no place for (kernel memory, swappiness,
/// realtime CPU time, block I/O, huge pages, network classes, RDMA) is
/// logged and left out. `devices` becomes the guest cgroup's device
/// program (a negative major or minor, as some callers write, is any).
pub fn resources(r: &oci_spec::runtime::LinuxResources) -> Resources {
    let devices = r
        .devices()
        .iter()
        .flatten()
        .map(|d| {
            use oci_spec::runtime::LinuxDeviceType as T;
            let number = |n: Option<i64>| n.and_then(|n| u32::try_from(n).ok());
            vmrun_agent_protocol::DeviceRule {
                allow: d.allow(),
                kind: match d.typ() {
                    None | Some(T::A) => None,
                    Some(T::C | T::U) => Some(DeviceKind::Char),
                    Some(T::B) => Some(DeviceKind::Block),
                    Some(T::P) => Some(DeviceKind::Fifo),
                },
                major: number(d.major()),
                minor: number(d.minor()),
                access: d.access().clone().unwrap_or_default(),
            }
        })
        .collect();
    let mut out = Resources { devices, ..Default::default() };
    if let Some(m) = r.memory() {
        out.memory = MemoryResources { limit: m.limit(), reservation: m.reservation(), swap: m.swap() };
        if m.kernel().is_some() || m.kernel_tcp().is_some() || m.swappiness().is_some() || m.disable_oom_killer().is_some() {
            log::debug!("linux.resources.memory kernel, kernelTCP, swappiness and disableOOMKiller are not applied: cgroup v2 has none");
        }
    }
    if let Some(c) = r.cpu() {
        out.cpu = CpuResources { shares: c.shares(), quota: c.quota(), period: c.period(), cpus: c.cpus().clone(), mems: c.mems().clone() };
        if c.realtime_runtime().is_some() || c.realtime_period().is_some() || c.idle().is_some() || c.burst().is_some() {
            log::debug!("linux.resources.cpu realtime, idle and burst settings are not applied");
        }
    }
    if let Some(p) = r.pids() {
        out.pids = PidsResources { limit: Some(p.limit()) };
    }
    out.unified = r.unified().iter().flatten().map(|(k, v)| (k.clone(), v.clone())).collect();
    if r.block_io().is_some() || r.hugepage_limits().is_some() || r.network().is_some() || r.rdma().is_some() {
        log::warn!("linux.resources blockIO, hugepageLimits, network and rdma are not applied in the guest");
    }
    out
}

/// The VM's memory: the annotation, else the memory limit rounded up to
/// MiB (at least [`MIN_MEMORY_MIB`]), else [`DEFAULT_MEMORY_MIB`].
pub fn memory_mib(spec: &Spec, annotations: &BTreeMap<String, String>) -> Result<u32> {
    if let Some(v) = annotations.get(ANNOTATION_MEMORY) {
        return parse_size_mib(v)
            .filter(|m| *m >= u64::from(MIN_MEMORY_MIB))
            .and_then(|m| u32::try_from(m).ok())
            .ok_or_else(|| bad(format!("invalid annotation {ANNOTATION_MEMORY}={v:?}: a size such as 512m or 1g, at least {MIN_MEMORY_MIB}m")));
    }
    let limit = spec
        .linux()
        .as_ref()
        .and_then(|l| l.resources().as_ref())
        .and_then(|r| r.memory().as_ref())
        .and_then(|m| m.limit());
    match limit {
        Some(bytes) if bytes > 0 => {
            let mib = (bytes as u64).div_ceil(1 << 20);
            u32::try_from(mib.max(u64::from(MIN_MEMORY_MIB))).map_err(|_| bad(format!("memory limit of {bytes} bytes is too large")))
        }
        _ => Ok(DEFAULT_MEMORY_MIB),
    }
}

/// The VM's vCPUs: the annotation, else the CPU quota over its period
/// rounded up, else 1.
pub fn cpus(spec: &Spec, annotations: &BTreeMap<String, String>) -> Result<u8> {
    if let Some(v) = annotations.get(ANNOTATION_CPUS) {
        return v
            .trim()
            .parse::<u8>()
            .ok()
            .filter(|n| *n >= 1)
            .ok_or_else(|| bad(format!("invalid annotation {ANNOTATION_CPUS}={v:?}: a number of vCPUs, 1 to 255")));
    }
    let cpu = spec.linux().as_ref().and_then(|l| l.resources().as_ref()).and_then(|r| r.cpu().as_ref());
    let (quota, period) = (cpu.and_then(|c| c.quota()), cpu.and_then(|c| c.period()));
    match (quota, period) {
        (Some(q), Some(p)) if q > 0 && p > 0 => Ok((q as u64).div_ceil(p).clamp(1, 255) as u8),
        _ => Ok(1),
    }
}

/// The `config.json` that `vmrun-oci spec` writes: like runc's, running
/// `sh` with a terminal in `rootfs`.
pub fn default_spec() -> serde_json::Value {
    let mount = |dest: &str, typ: &str, src: &str, opts: &[&str]| {
        serde_json::json!({ "destination": dest, "type": typ, "source": src, "options": opts })
    };
    serde_json::json!({
        "ociVersion": "1.1.0",
        "process": {
            "terminal": true,
            "user": { "uid": 0, "gid": 0 },
            "args": ["sh"],
            "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "TERM=xterm"],
            "cwd": "/",
            "rlimits": [{ "type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024 }],
            "noNewPrivileges": true
        },
        "root": { "path": "rootfs", "readonly": true },
        "hostname": "vmrun",
        "mounts": [
            mount("/proc", "proc", "proc", &[]),
            mount("/dev", "tmpfs", "tmpfs", &["nosuid", "strictatime", "mode=755", "size=65536k"]),
            mount("/dev/pts", "devpts", "devpts", &["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]),
            mount("/dev/shm", "tmpfs", "shm", &["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]),
            mount("/dev/mqueue", "mqueue", "mqueue", &["nosuid", "noexec", "nodev"]),
            mount("/sys", "sysfs", "sysfs", &["nosuid", "noexec", "nodev", "ro"]),
            mount("/sys/fs/cgroup", "cgroup", "cgroup", &["nosuid", "noexec", "nodev", "relatime", "ro"])
        ],
        "linux": {
            "namespaces": [{ "type": "pid" }, { "type": "network" }, { "type": "ipc" }, { "type": "uts" }, { "type": "mount" }]
        }
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use vmrun_agent_protocol::{CopyKind, DeviceRule};

    fn spec_of(v: serde_json::Value) -> Spec {
        serde_json::from_value(v).unwrap()
    }

    fn bundle() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("rootfs")).unwrap();
        d
    }

    #[test]
    fn versions() {
        for ok in ["1.0.0", "1.0.2-dev", "1.1.0", "1.1.0-rc.1", "1.0.2+build", "1.2.0", "1.2.1"] {
            check_version(ok).unwrap();
        }
        for bad in ["1.3.0", "2.0.0", "0.9.0", "1.0", "", "one", "1.x.0"] {
            let e = check_version(bad).unwrap_err().to_string();
            assert!(e.contains("unsupported ociVersion"), "{bad}: {e}");
        }
    }

    #[test]
    fn the_default_spec_plans() {
        let b = bundle();
        let p = plan(b.path(), &spec_of(default_spec())).unwrap();
        assert_eq!(p.process.args, ["sh"]);
        assert!(p.process.terminal && p.readonly);
        assert_eq!(p.process.user, "0:0");
        assert_eq!(p.process.rlimits, [Rlimit { resource: "RLIMIT_NOFILE".into(), soft: 1024, hard: 1024 }]);
        assert!(p.mounts.is_empty() && p.volumes.is_empty() && p.copies.is_empty(), "the standard mounts are the agent's");
        assert_eq!((p.mem_mib, p.cpus), (DEFAULT_MEMORY_MIB, 1));
        assert_eq!(p.rootfs, b.path().join("rootfs").canonicalize().unwrap());
        assert_eq!(p.hostname, "vmrun");
    }

    #[test]
    fn roots_must_stay_in_the_bundle_and_be_directories() {
        let b = bundle();
        let root = |p: &str| resolve_root(b.path(), Path::new(p));
        root("rootfs").unwrap();
        root("./x/../rootfs").unwrap();
        assert!(root("../rootfs").unwrap_err().to_string().contains("escapes the bundle"));
        assert!(root("rootfs/../../etc").unwrap_err().to_string().contains("escapes the bundle"));
        std::os::unix::fs::symlink("/", b.path().join("link")).unwrap();
        assert!(root("link").unwrap_err().to_string().contains("escapes the bundle"), "through a symlink");
        std::fs::write(b.path().join("file"), b"x").unwrap();
        assert!(root("file").unwrap_err().to_string().contains("not a directory"));
        assert!(root("missing").is_err());
        // Absolute roots are the spec's business.
        assert_eq!(root(b.path().join("rootfs").to_str().unwrap()).unwrap(), b.path().join("rootfs").canonicalize().unwrap());
    }

    #[test]
    fn processes() {
        let p = |v: serde_json::Value| process_plan(&serde_json::from_value::<Process>(v).unwrap());
        let ok = p(serde_json::json!({ "user": { "uid": 1000, "gid": 100, "additionalGids": [5] }, "args": ["ls", "-l"], "cwd": "/tmp", "env": ["A=b"] })).unwrap();
        assert_eq!((ok.user.as_str(), ok.cwd.as_str(), ok.terminal), ("1000:100", "/tmp", false));
        assert_eq!(ok.env, ["A=b"]);
        assert_eq!((ok.additional_gids.as_slice(), ok.oom_score_adj), ([5].as_slice(), None));
        let adj = p(serde_json::json!({ "user": { "uid": 0, "gid": 0 }, "args": ["x"], "cwd": "/", "oomScoreAdj": -500 })).unwrap();
        assert_eq!((adj.additional_gids.len(), adj.oom_score_adj), (0, Some(-500)));
        assert_eq!((ok.capabilities.clone(), ok.no_new_privileges), (Capabilities::all(), false), "runc's defaults");
        assert!(p(serde_json::json!({ "user": { "uid": 0, "gid": 0 }, "args": [], "cwd": "/" })).unwrap_err().to_string().contains("args"));
        assert!(p(serde_json::json!({ "user": { "uid": 0, "gid": 0 }, "args": ["x"], "cwd": "tmp" })).unwrap_err().to_string().contains("absolute"));
    }

    #[test]
    fn capabilities_and_no_new_privileges_pass_through() {
        let b = bundle();
        let mut v = default_spec();
        v["process"]["capabilities"] = serde_json::json!({
            "bounding": ["CAP_KILL", "CAP_CHOWN", "NET_ADMIN"],
            "effective": ["CAP_KILL"],
            "permitted": ["CAP_KILL"],
        });
        let p = plan(b.path(), &spec_of(v.clone())).unwrap().process;
        assert!(p.no_new_privileges);
        let want = Capabilities {
            bounding: vec!["CAP_CHOWN".into(), "CAP_KILL".into(), "CAP_NET_ADMIN".into()],
            effective: vec!["CAP_KILL".into()],
            permitted: vec!["CAP_KILL".into()],
            ..Default::default()
        };
        assert_eq!(p.capabilities, want);
        v["process"]["noNewPrivileges"] = false.into();
        assert!(!plan(b.path(), &spec_of(v.clone())).unwrap().process.no_new_privileges);
        v["process"].as_object_mut().unwrap().remove("noNewPrivileges");
        assert!(!plan(b.path(), &spec_of(v.clone())).unwrap().process.no_new_privileges, "false when absent");
        v["process"]["capabilities"]["ambient"] = serde_json::json!(["CAP_NET_FLY"]);
        std::fs::write(b.path().join("config.json"), v.to_string()).unwrap();
        let e = load(b.path()).unwrap_err().to_string();
        assert!(e.contains("unknown capability \"CAP_NET_FLY\" in process.capabilities.ambient"), "{e}");
        // A plan written before capabilities were passed on keeps runc's
        // defaults.
        let old = serde_json::json!({ "args": ["sh"], "env": [], "cwd": "/", "user": "0:0", "terminal": false, "rlimits": [] });
        let old: ProcessPlan = serde_json::from_value(old).unwrap();
        assert_eq!((old.capabilities, old.no_new_privileges), (Capabilities::all(), false));
    }

    #[test]
    fn seccomp_profiles_are_passed_on_and_notify_is_refused() {
        let b = bundle();
        let mut v = default_spec();
        assert_eq!(plan(b.path(), &spec_of(v.clone())).unwrap().seccomp, None, "none without linux.seccomp");
        v["linux"]["seccomp"] = serde_json::json!({
            "defaultAction": "SCMP_ACT_ERRNO",
            "defaultErrnoRet": 38,
            "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86"],
            "flags": ["SECCOMP_FILTER_FLAG_LOG", "SECCOMP_FILTER_FLAG_TSYNC", "SECCOMP_FILTER_FLAG_SPEC_ALLOW"],
            "syscalls": [
                { "names": ["read", "write"], "action": "SCMP_ACT_ALLOW" },
                { "names": ["personality"], "action": "SCMP_ACT_ALLOW", "args": [{ "index": 0, "value": 8, "op": "SCMP_CMP_EQ" }] },
                { "names": ["clone"], "action": "SCMP_ACT_ALLOW",
                  "args": [{ "index": 0, "value": 2114060288, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ" }] },
                { "names": ["mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 28 },
                { "names": ["reboot"], "action": "SCMP_ACT_KILL" },
                { "names": ["ptrace"], "action": "SCMP_ACT_TRACE", "errnoRet": 7,
                  "args": [{ "index": 1, "value": 4, "op": "SCMP_CMP_GE" }, { "index": 1, "value": 9, "op": "SCMP_CMP_LT" }] }
            ]
        });
        let p = plan(b.path(), &spec_of(v.clone())).unwrap().seccomp.unwrap();
        let call = |names: &[&str], action, errno_ret, args| SeccompSyscalls {
            names: names.iter().map(|n| n.to_string()).collect(),
            action,
            errno_ret,
            args,
        };
        let arg = |index, value, value_two, op| SeccompArg { index, value, value_two, op };
        let want = SeccompProfile {
            default_action: SeccompAction::Errno,
            default_errno_ret: Some(38),
            architectures: vec!["SCMP_ARCH_X86_64".into(), "SCMP_ARCH_X86".into()],
            flags: vec![SeccompFlag::Log, SeccompFlag::SpecAllow],
            syscalls: vec![
                call(&["read", "write"], SeccompAction::Allow, None, vec![]),
                call(&["personality"], SeccompAction::Allow, None, vec![arg(0, 8, 0, SeccompOp::Eq)]),
                call(&["clone"], SeccompAction::Allow, None, vec![arg(0, 2114060288, 0, SeccompOp::MaskedEq)]),
                call(&["mkdirat"], SeccompAction::Errno, Some(28), vec![]),
                call(&["reboot"], SeccompAction::KillThread, None, vec![]),
                call(&["ptrace"], SeccompAction::Trace, Some(7), vec![arg(1, 4, 0, SeccompOp::Ge), arg(1, 9, 0, SeccompOp::Lt)]),
            ],
        };
        assert_eq!(p, want);
        // A plan written before seccomp was passed on has none.
        let mut old = serde_json::to_value(plan(b.path(), &spec_of(default_spec())).unwrap()).unwrap();
        assert!(old.as_object_mut().unwrap().remove("seccomp").is_none(), "not written when absent");
        assert_eq!(serde_json::from_value::<Plan>(old).unwrap().seccomp, None);
        // SCMP_ACT_NOTIFY has no listener to reach from the VM.
        let mut notify = v.clone();
        notify["linux"]["seccomp"]["syscalls"][3]["action"] = "SCMP_ACT_NOTIFY".into();
        let e = plan(b.path(), &spec_of(notify)).unwrap_err().to_string();
        assert!(e.contains("syscalls[3] (mkdirat) is SCMP_ACT_NOTIFY"), "{e}");
        v["linux"]["seccomp"]["defaultAction"] = "SCMP_ACT_NOTIFY".into();
        let e = plan(b.path(), &spec_of(v)).unwrap_err().to_string();
        assert!(e.contains("defaultAction is SCMP_ACT_NOTIFY"), "{e}");
    }

    #[test]
    fn mounts_become_guest_mounts_copies_volumes_or_nothing() {
        let host = tempfile::tempdir().unwrap();
        std::fs::write(host.path().join("f"), b"x").unwrap();
        let small = host.path().join("small");
        std::fs::create_dir(&small).unwrap();
        std::fs::write(small.join("f"), b"x").unwrap();
        let large = host.path().join("large");
        std::fs::create_dir(&large).unwrap();
        std::fs::write(large.join("blob"), vec![0u8; vmrun_agent_protocol::COPY_MAX_BYTES as usize + 1]).unwrap();
        let m = |v: serde_json::Value| serde_json::from_value::<oci_spec::runtime::Mount>(v).unwrap();
        let list = vec![
            m(serde_json::json!({ "destination": "/proc", "type": "proc", "source": "proc" })),
            m(serde_json::json!({ "destination": "/run", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"] })),
            m(serde_json::json!({ "destination": "/data", "type": "bind", "source": &small, "options": ["rbind", "ro"] })),
            m(serde_json::json!({ "destination": "/etc/resolv.conf", "type": "bind", "source": host.path().join("f"), "options": ["rbind", "ro"] })),
            m(serde_json::json!({ "destination": "/dev/termination-log", "type": "bind", "source": host.path().join("f"), "options": ["rbind"] })),
            m(serde_json::json!({ "destination": "/big/", "type": "none", "source": &large, "options": ["rbind"] })),
            m(serde_json::json!({ "destination": "/x", "type": "cgroup2", "source": "cgroup" })),
        ];
        let (guest, volumes, copies) = mounts(&list).unwrap();
        assert_eq!(guest, [Mount { destination: "/run".into(), fstype: "tmpfs".into(), source: "tmpfs".into(), options: vec!["nosuid".into(), "mode=755".into(), "size=65536k".into()] }]);
        assert_eq!(volumes, [VolumePlan { host: large.clone(), guest: "/big".into(), read_only: false }], "over the copy limit");
        let copy = |host: PathBuf, guest: &str, kind, read_only| CopyPlan { host, guest: guest.into(), kind, read_only };
        assert_eq!(
            copies,
            [
                copy(small.clone(), "/data", CopyKind::Directory, true),
                copy(host.path().join("f"), "/etc/resolv.conf", CopyKind::File, true),
                copy(host.path().join("f"), "/dev/termination-log", CopyKind::File, false),
            ]
        );
        let missing = m(serde_json::json!({ "destination": "/d", "type": "bind", "source": "/nonexistent/dir", "options": ["rbind"] }));
        assert!(mounts(&[missing]).unwrap_err().to_string().contains("/nonexistent/dir"));
        // No fixed limit: ten directories, each its own copy.
        let many: Vec<_> = (0..10).map(|i| m(serde_json::json!({ "destination": format!("/d{i}"), "type": "bind", "source": &small }))).collect();
        assert_eq!(mounts(&many).unwrap().2.len(), 10);
        let large_many: Vec<_> = (0..10).map(|i| m(serde_json::json!({ "destination": format!("/d{i}"), "type": "bind", "source": &large }))).collect();
        assert_eq!(mounts(&large_many).unwrap().1.len(), 10, "all on the one volume disk");
        let relative = m(serde_json::json!({ "destination": "data", "type": "tmpfs" }));
        assert!(mounts(&[relative]).is_err());
    }

    #[test]
    fn linux_settings_pass_through() {
        let b = bundle();
        let mut v = default_spec();
        v["linux"]["maskedPaths"] = serde_json::json!(["/proc/kcore", "/proc/acpi"]);
        v["linux"]["readonlyPaths"] = serde_json::json!(["/proc/sys"]);
        v["linux"]["sysctl"] = serde_json::json!({ "kernel.shmmax": "4096", "net.ipv4.ip_forward": "1", "kernel.domainname": "example.org" });
        v["linux"]["devices"] = serde_json::json!([
            { "path": "/dev/fuse", "type": "c", "major": 10, "minor": 229, "fileMode": 0o20666, "uid": 0, "gid": 5 },
            { "path": "/dev/loop9", "type": "b", "major": 7, "minor": 9 },
            { "path": "/dev/pipe", "type": "p" },
        ]);
        v["linux"]["rootfsPropagation"] = "rslave".into();
        let p = plan(b.path(), &spec_of(v.clone())).unwrap();
        assert_eq!(p.masked_paths, ["/proc/kcore", "/proc/acpi"]);
        assert_eq!(p.readonly_paths, ["/proc/sys"]);
        assert_eq!(p.sysctl.len(), 3);
        assert_eq!(p.sysctl["kernel.domainname"], "example.org");
        assert_eq!(
            p.devices,
            [
                Device { path: "/dev/fuse".into(), kind: DeviceKind::Char, major: 10, minor: 229, file_mode: Some(0o666), uid: Some(0), gid: Some(5) },
                Device { path: "/dev/loop9".into(), kind: DeviceKind::Block, major: 7, minor: 9, file_mode: None, uid: None, gid: None },
                Device { path: "/dev/pipe".into(), kind: DeviceKind::Fifo, major: 0, minor: 0, file_mode: None, uid: None, gid: None },
            ]
        );
        assert_eq!(p.rootfs_propagation, Some(Propagation::Rslave));
        // A plan written before these existed reads as none of them.
        let mut old = serde_json::to_value(&p).unwrap();
        for k in ["masked_paths", "readonly_paths", "sysctl", "devices", "rootfs_propagation"] {
            old.as_object_mut().unwrap().remove(k);
        }
        let old: Plan = serde_json::from_value(old).unwrap();
        assert!(old.masked_paths.is_empty() && old.sysctl.is_empty() && old.devices.is_empty() && old.rootfs_propagation.is_none());

        let refused = |f: &dyn Fn(&mut serde_json::Value), what: &str| {
            let mut v = default_spec();
            f(&mut v);
            let e = plan(b.path(), &spec_of(v)).unwrap_err().to_string();
            assert!(e.contains(what), "{what}: {e}");
        };
        refused(&|v| v["linux"]["sysctl"] = serde_json::json!({ "kernel.panic": "1" }), "not in a separate kernel namespace");
        refused(&|v| v["linux"]["sysctl"] = serde_json::json!({ "kernel.hostname": "x" }), "conflicts with the OCI \"hostname\" field");
        refused(
            &|v| {
                v["linux"]["sysctl"] = serde_json::json!({ "net.ipv4.ip_forward": "1" });
                v["linux"]["namespaces"] = serde_json::json!([{ "type": "ipc" }]);
            },
            "no network namespace",
        );
        refused(&|v| v["linux"]["devices"] = serde_json::json!([{ "path": "/etc/null", "type": "c", "major": 1, "minor": 3 }]), "under /dev/");
        refused(&|v| v["linux"]["devices"] = serde_json::json!([{ "path": "/dev/../etc/x", "type": "c", "major": 1, "minor": 3 }]), "under /dev/");
        refused(&|v| v["linux"]["devices"] = serde_json::json!([{ "path": "/dev/all", "type": "a" }]), "type \"a\"");
        refused(&|v| v["linux"]["devices"] = serde_json::json!([{ "path": "/dev/x", "type": "c", "major": -1, "minor": 3 }]), "major");
        refused(&|v| v["linux"]["rootfsPropagation"] = "sideways".into(), "rootfsPropagation");
        refused(&|v| v["linux"]["maskedPaths"] = serde_json::json!(["proc/kcore"]), "absolute");
        refused(&|v| v["linux"]["uidMappings"] = serde_json::json!([{ "containerID": 0, "hostID": 1, "size": 1 }]), "no user namespace");
        // A user namespace: both maps, mapping the container's root, as the
        // kernel takes them.
        let user_ns = |uids: serde_json::Value, gids: serde_json::Value| {
            move |v: &mut serde_json::Value| {
                v["linux"]["namespaces"] = serde_json::json!([{ "type": "user" }, { "type": "mount" }]);
                v["linux"]["uidMappings"] = uids.clone();
                v["linux"]["gidMappings"] = gids.clone();
            }
        };
        let full = serde_json::json!([{ "containerID": 0, "hostID": 100000, "size": 65536 }]);
        let mut v = default_spec();
        user_ns(full.clone(), serde_json::json!([{ "containerID": 0, "hostID": 1000, "size": 1 }]))(&mut v);
        let p = plan(b.path(), &spec_of(v)).unwrap();
        assert_eq!(p.uid_mappings, [IdMapping { container_id: 0, host_id: 100000, size: 65536 }]);
        assert_eq!(p.gid_mappings, [IdMapping { container_id: 0, host_id: 1000, size: 1 }]);
        refused(&user_ns(full.clone(), serde_json::json!([])), "gidMappings: the map is empty");
        refused(&user_ns(serde_json::json!([{ "containerID": 1, "hostID": 1000, "size": 5 }]), full.clone()), "does not map the container's root");
        let overlapping = serde_json::json!([{ "containerID": 0, "hostID": 0, "size": 10 }, { "containerID": 5, "hostID": 100, "size": 1 }]);
        refused(&user_ns(overlapping, full.clone()), "overlap");
        // Joined by path: not joined (the container gets its own VM), and
        // its maps unused.
        let mut v = default_spec();
        v["linux"]["namespaces"] = serde_json::json!([{ "type": "user", "path": "/proc/self/ns/user" }, { "type": "mount" }]);
        assert!(plan(b.path(), &spec_of(v)).unwrap().uid_mappings.is_empty());
    }

    #[test]
    fn namespace_paths_are_checked_for_their_type() {
        use oci_spec::runtime::LinuxNamespaceType as T;
        let ns = |name: &str| PathBuf::from(format!("/proc/self/ns/{name}"));
        for (typ, name) in [(T::Network, "net"), (T::Ipc, "ipc"), (T::Uts, "uts"), (T::Mount, "mnt"), (T::Pid, "pid")] {
            check_namespace_path(typ, &ns(name)).unwrap();
        }
        let e = check_namespace_path(T::Ipc, &ns("net")).unwrap_err();
        assert!(matches!(e, NamespacePathError::WrongType { found, .. } if found == libc::CLONE_NEWNET), "{e}");
        assert!(e.to_string().contains("is not a ipc namespace"), "{e}");
        let b = bundle();
        std::fs::write(b.path().join("file"), b"x").unwrap();
        let e = check_namespace_path(T::Network, &b.path().join("file")).unwrap_err();
        assert!(matches!(e, NamespacePathError::NotANamespace { .. }), "{e}");
        assert!(matches!(check_namespace_path(T::Network, &b.path().join("missing")), Err(NamespacePathError::Open { .. })));
        // In a spec: the right type plans (with a warning), a wrong one is refused.
        let mut v = default_spec();
        v["linux"]["namespaces"] = serde_json::json!([{ "type": "network", "path": "/proc/self/ns/net" }, { "type": "mount" }]);
        plan(b.path(), &spec_of(v.clone())).unwrap();
        v["linux"]["namespaces"][0]["path"] = "/proc/self/ns/uts".into();
        let e = plan(b.path(), &spec_of(v)).unwrap_err().to_string();
        assert!(e.contains("/proc/self/ns/uts is not a net namespace"), "{e}");
    }

    #[test]
    fn specs_of_1_2_with_unknown_fields_load() {
        let b = bundle();
        let mut v = default_spec();
        v["ociVersion"] = "1.2.0".into();
        // Fields of 1.2 and fields no version has, where the spec lets a
        // runtime ignore what it does not know.
        v["process"]["ioPriority"] = serde_json::json!({ "class": "IOPRIO_CLASS_IDLE", "priority": 0 });
        v["process"]["unknownProcessField"] = serde_json::json!({ "x": 1 });
        v["linux"]["unknownLinuxField"] = serde_json::json!([1, 2]);
        v["linux"]["intelRdt"] = serde_json::json!({ "closID": "x", "enableMonitoring": true });
        v["linux"]["personality"] = serde_json::json!({ "domain": "LINUX" });
        v["domainname"] = "example.org".into();
        v["somethingNew"] = true.into();
        std::fs::write(b.path().join("config.json"), v.to_string()).unwrap();
        let p = load(b.path()).unwrap();
        assert_eq!((p.oci_version.as_str(), p.process.args.as_slice()), ("1.2.0", &["sh".to_string()][..]));
        v["ociVersion"] = "1.3.0".into();
        std::fs::write(b.path().join("config.json"), v.to_string()).unwrap();
        assert!(load(b.path()).unwrap_err().to_string().contains("unsupported ociVersion"));
    }

    #[test]
    fn vm_size_from_resources_and_annotations() {
        let mut v = default_spec();
        let none = BTreeMap::new();
        v["linux"]["resources"] = serde_json::json!({ "memory": { "limit": 300_000_000 }, "cpu": { "quota": 150_000, "period": 100_000 } });
        let s = spec_of(v.clone());
        assert_eq!(memory_mib(&s, &none).unwrap(), 287);
        assert_eq!(cpus(&s, &none).unwrap(), 2);
        v["linux"]["resources"] = serde_json::json!({ "memory": { "limit": 1_000_000 }, "cpu": { "quota": -1, "period": 100_000 } });
        let s = spec_of(v);
        assert_eq!(memory_mib(&s, &none).unwrap(), MIN_MEMORY_MIB);
        assert_eq!(cpus(&s, &none).unwrap(), 1);
        let a: BTreeMap<String, String> = [(ANNOTATION_MEMORY.to_string(), "1g".to_string()), (ANNOTATION_CPUS.to_string(), "3".to_string())].into();
        assert_eq!((memory_mib(&s, &a).unwrap(), cpus(&s, &a).unwrap()), (1024, 3));
        let bad_mem: BTreeMap<String, String> = [(ANNOTATION_MEMORY.to_string(), "12m".to_string())].into();
        assert!(memory_mib(&s, &bad_mem).is_err());
        let bad_cpu: BTreeMap<String, String> = [(ANNOTATION_CPUS.to_string(), "0".to_string())].into();
        assert!(cpus(&s, &bad_cpu).is_err());
    }

    #[test]
    fn resources_pass_to_the_guest_cgroup() {
        let b = bundle();
        let mut v = default_spec();
        v["linux"]["resources"] = serde_json::json!({
            "memory": { "limit": 67_108_864, "reservation": 33_554_432, "swap": 134_217_728, "swappiness": 10 },
            "cpu": { "shares": 512, "quota": 50_000, "period": 100_000 },
            "pids": { "limit": 32 },
            "unified": { "memory.high": "60M" },
            "blockIO": { "weight": 100 },
            "devices": [
                { "allow": false, "access": "rwm" },
                { "allow": true, "type": "c", "major": 10, "minor": 229, "access": "rw" },
                { "allow": false, "type": "b", "major": -1, "minor": 0, "access": "m" }
            ]
        });
        let p = plan(b.path(), &spec_of(v.clone())).unwrap();
        let want = Resources {
            memory: MemoryResources { limit: Some(67_108_864), reservation: Some(33_554_432), swap: Some(134_217_728) },
            cpu: CpuResources { shares: Some(512), quota: Some(50_000), period: Some(100_000), ..Default::default() },
            pids: PidsResources { limit: Some(32) },
            unified: [("memory.high".to_string(), "60M".to_string())].into(),
            devices: vec![
                DeviceRule { allow: false, kind: None, major: None, minor: None, access: "rwm".into() },
                DeviceRule { allow: true, kind: Some(DeviceKind::Char), major: Some(10), minor: Some(229), access: "rw".into() },
                DeviceRule { allow: false, kind: Some(DeviceKind::Block), major: None, minor: Some(0), access: "m".into() },
            ],
        };
        assert_eq!(p.resources, want);
        assert_eq!((p.mem_mib, p.cpus), (MIN_MEMORY_MIB, 1), "the VM is still sized from them");
        v["linux"].as_object_mut().unwrap().remove("resources");
        assert!(plan(b.path(), &spec_of(v)).unwrap().resources.is_empty());
        // A plan written before resources were passed on has none.
        let mut old = serde_json::to_value(&p).unwrap();
        old.as_object_mut().unwrap().remove("resources");
        assert!(serde_json::from_value::<Plan>(old).unwrap().resources.is_empty());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size_mib("512m"), Some(512));
        assert_eq!(parse_size_mib("1g"), Some(1024));
        assert_eq!(parse_size_mib("2Gi"), Some(2048));
        assert_eq!(parse_size_mib("262144k"), Some(256));
        assert_eq!(parse_size_mib("300"), Some(300));
        assert_eq!(parse_size_mib("lots"), None);
    }

    #[test]
    fn loading_reports_what_is_wrong() {
        let b = bundle();
        assert!(load(b.path()).unwrap_err().to_string().contains("config.json"));
        std::fs::write(b.path().join("config.json"), b"{ not json").unwrap();
        assert!(load(b.path()).unwrap_err().to_string().contains("invalid JSON"));
        let mut v = default_spec();
        v["ociVersion"] = "2.0.0".into();
        std::fs::write(b.path().join("config.json"), v.to_string()).unwrap();
        assert!(load(b.path()).unwrap_err().to_string().contains("unsupported ociVersion"));
        v["ociVersion"] = "1.0.2-dev".into();
        std::fs::write(b.path().join("config.json"), v.to_string()).unwrap();
        assert_eq!(load(b.path()).unwrap().oci_version, "1.0.2-dev");
    }

    #[test]
    fn what_is_not_applied_is_named() {
        let mut spec: serde_json::Value = serde_json::to_value(default_spec()).unwrap();
        assert_eq!(unapplied(&serde_json::from_value(spec.clone()).unwrap()), []);
        spec["domainname"] = "example.org".into();
        spec["process"]["apparmorProfile"] = "docker-default".into();
        spec["process"]["user"]["umask"] = 0o077.into();
        spec["linux"]["rootfsPropagation"] = "shared".into();
        spec["linux"]["mountLabel"] = "system_u:object_r:svirt_sandbox_file_t:s0".into();
        let names: Vec<&str> = unapplied(&serde_json::from_value(spec.clone()).unwrap()).into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["domainname", "process.apparmorProfile", "process.user.umask", "linux.mountLabel"], "rootfsPropagation is applied");
        spec["process"]["user"]["umask"] = 0o022.into();
        assert!(!unapplied(&serde_json::from_value(spec).unwrap()).iter().any(|(n, _)| *n == "process.user.umask"), "022 is what is applied");
    }

}
