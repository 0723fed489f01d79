//! A bundle's `config.json` (read with the `oci-spec` crate), checked and
//! turned into a [`Plan`]: what the VM is made of and what the guest agent
//! runs.
//!
//! What is used: `ociVersion` (1.0.x and 1.1.x), `root` (a directory,
//! copied into an ext4 disk; `readonly` mounts the copy read-only),
//! `process` (args, env, cwd, user uid/gid, terminal, rlimits,
//! `capabilities`, `noNewPrivileges`),
//! `hostname`, `mounts`, `linux.resources.memory.limit` and
//! `linux.resources.cpu` quota/period (the VM's size) and the annotations
//! `io.vmrun.memory` / `io.vmrun.cpus`, which override them.
//!
//! Capabilities and `noNewPrivileges` are applied to the container's
//! processes by the guest agent, as runc does: the bounding set dropped,
//! the effective, permitted and inheritable sets set after the uid change,
//! the ambient ones raised; `no_new_privs` only when `noNewPrivileges` is
//! true. A spec without `process.capabilities` leaves root every
//! capability (as runc does); an unknown capability name is refused.
//!
//! Mounts: the standard ones a caller such as containerd always lists
//! (`/proc`, `/dev`, `/dev/pts`, `/dev/shm`, `/dev/mqueue`, `/sys`,
//! `/sys/fs/cgroup`, and the host files `/etc/resolv.conf`, `/etc/hosts`,
//! `/etc/hostname`, `/dev/termination-log`) are skipped: the agent makes
//! its own `/proc`, `/dev` (with `/dev/pts`, `/dev/shm`, `/dev/mqueue`)
//! and `/sys`, in runc's order. A bind mount of a host *directory*
//! becomes a copy on a volume disk, as `vmrun run -v` does; a bind mount of
//! a file is skipped with a warning; `tmpfs`, `proc`, `sysfs`, `mqueue` and
//! `devpts` mounts elsewhere are made by the agent in the guest.
//!
//! Hooks ([`crate::hooks`]) run on the host: `prestart`, `createRuntime`
//! and `createContainer` during `create`, `poststart` in `start`,
//! `poststop` in `delete`; `startContainer` is not run (a warning).
//!
//! Accepted but not enforced (the VM boundary is the isolation): seccomp,
//! namespaces (joining a namespace by path included), cgroups other than
//! the VM's size, `additionalGids` (supplementary groups come from the
//! image's `/etc/group`), the options of the standard mounts (the agent's
//! own are used). What else a config asks for and is not applied gets a
//! warning with the reason ([`unapplied`]): `domainname`,
//! `process.consoleSize`, AppArmor and SELinux labels (`apparmorProfile`,
//! `selinuxLabel`, `mountLabel`), `ioPriority`, `scheduler`,
//! `execCPUAffinity`, a umask other than 022, `rootfsPropagation`,
//! `intelRdt`, `memoryPolicy`, `personality`, `timeOffsets`, `netDevices`.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

use oci_spec::runtime::{Process, Spec};
use serde::{Deserialize, Serialize};
use vmrun_agent_protocol::{Capabilities, Mount, Rlimit};

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
/// (or that make no sense in a VM): skipped.
pub const STANDARD_MOUNTS: &[&str] = &[
    "/proc",
    "/dev",
    "/dev/pts",
    "/dev/shm",
    "/dev/mqueue",
    "/sys",
    "/sys/fs/cgroup",
    "/etc/resolv.conf",
    "/etc/hosts",
    "/etc/hostname",
    "/dev/termination-log",
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
}

/// A host directory given to the container as a copy on a volume disk.
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
    /// Host directories copied onto volume disks.
    pub volumes: Vec<VolumePlan>,
    /// Guest memory in MiB.
    pub mem_mib: u32,
    /// vCPUs.
    pub cpus: u8,
    /// The spec's annotations.
    pub annotations: BTreeMap<String, String>,
    /// The hooks run on the host.
    #[serde(default)]
    pub hooks: crate::hooks::Hooks,
}

fn bad(msg: impl Into<String>) -> Error {
    Error::Bundle(msg.into())
}

/// Checks that `v` is a version this runtime implements: 1.0.x or 1.1.x
/// (pre-releases such as `1.0.2-dev` included).
pub fn check_version(v: &str) -> Result<()> {
    let core = v.split(['-', '+']).next().unwrap_or_default();
    let parts: Vec<&str> = core.split('.').collect();
    let numeric = parts.len() == 3 && parts.iter().all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
    if numeric && parts[0] == "1" && (parts[1] == "0" || parts[1] == "1") {
        return Ok(());
    }
    Err(bad(format!("unsupported ociVersion {v:?}: vmrun-oci implements the OCI runtime spec 1.0.x and 1.1.x")))
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
    let (mounts, volumes) = mounts(spec.mounts().as_deref().unwrap_or_default())?;
    let hooks = spec.hooks().as_ref().map(crate::hooks::from_spec).unwrap_or_default();
    warn_unapplied(spec);
    if let Some(linux) = spec.linux() {
        for ns in linux.namespaces().as_deref().unwrap_or_default() {
            if let Some(p) = ns.path() {
                log::warn!("namespace {:?} at {} is not joined: the container gets its own VM", ns.typ(), p.display());
            }
        }
        if linux.seccomp().is_some() {
            log::debug!("linux.seccomp is not applied: the VM boundary is the isolation");
        }
    }
    Ok(Plan {
        oci_version: spec.version().clone(),
        process,
        hostname: spec.hostname().clone().unwrap_or_default(),
        rootfs,
        readonly: root.readonly().unwrap_or(false),
        mounts,
        volumes,
        mem_mib: memory_mib(spec, &annotations)?,
        cpus: cpus(spec, &annotations)?,
        annotations,
        hooks,
    })
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
    if linux.rootfs_propagation().as_ref().is_some_and(|p| !p.is_empty()) {
        warn("linux.rootfsPropagation", "the root is a copy on a disk of the VM; no mount propagates to or from the host");
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
    if user.additional_gids().as_ref().is_some_and(|g| !g.is_empty()) {
        log::debug!("process.user.additionalGids are not passed on: supplementary groups come from the image's /etc/group");
    }
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

/// The spec's mounts: those the agent makes, and host directories to copy
/// onto volume disks (at most [`vmrun_runtime::volume::SLOTS`] - 1: the
/// root copy takes the first slot).
pub fn mounts(list: &[oci_spec::runtime::Mount]) -> Result<(Vec<Mount>, Vec<VolumePlan>)> {
    let mut guest = Vec::new();
    let mut volumes = Vec::new();
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
            let meta = std::fs::metadata(src).map_err(|e| bad(format!("mount source {} for {dest}: {e}", src.display())))?;
            if !meta.is_dir() {
                log::warn!("bind mount of the file {} on {dest} skipped: only directories are given to the VM (as copies)", src.display());
                continue;
            }
            volumes.push(VolumePlan { host: src.clone(), guest: dest_norm.to_string(), read_only: opts.iter().any(|o| o == "ro") });
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
    let most = vmrun_runtime::volume::SLOTS - 1;
    if volumes.len() > most {
        return Err(bad(format!("{} bind-mounted directories: at most {most} per container", volumes.len())));
    }
    Ok((guest, volumes))
}

/// A size in MiB: `512m`, `1g`, `262144k`, `1Gi`, or a plain number of
/// MiB (`vmrun_runtime::size`).
pub fn parse_size_mib(s: &str) -> Option<u64> {
    vmrun_runtime::size::mib(s).ok()
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
        for ok in ["1.0.0", "1.0.2-dev", "1.1.0", "1.1.0-rc.1", "1.0.2+build"] {
            check_version(ok).unwrap();
        }
        for bad in ["1.2.0", "2.0.0", "0.9.0", "1.0", "", "one", "1.x.0"] {
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
        assert!(p.mounts.is_empty() && p.volumes.is_empty(), "the standard mounts are the agent's");
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
    fn mounts_become_guest_mounts_volumes_or_nothing() {
        let host = tempfile::tempdir().unwrap();
        std::fs::write(host.path().join("f"), b"x").unwrap();
        let m = |v: serde_json::Value| serde_json::from_value::<oci_spec::runtime::Mount>(v).unwrap();
        let list = vec![
            m(serde_json::json!({ "destination": "/proc", "type": "proc", "source": "proc" })),
            m(serde_json::json!({ "destination": "/run", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"] })),
            m(serde_json::json!({ "destination": "/data", "type": "bind", "source": host.path(), "options": ["rbind", "ro"] })),
            m(serde_json::json!({ "destination": "/etc/resolv.conf", "type": "bind", "source": host.path().join("f"), "options": ["rbind"] })),
            m(serde_json::json!({ "destination": "/etc/other", "type": "bind", "source": host.path().join("f"), "options": ["rbind"] })),
            m(serde_json::json!({ "destination": "/x", "type": "cgroup2", "source": "cgroup" })),
        ];
        let (guest, volumes) = mounts(&list).unwrap();
        assert_eq!(guest, [Mount { destination: "/run".into(), fstype: "tmpfs".into(), source: "tmpfs".into(), options: vec!["nosuid".into(), "mode=755".into(), "size=65536k".into()] }]);
        assert_eq!(volumes, [VolumePlan { host: host.path().to_path_buf(), guest: "/data".into(), read_only: true }]);
        let missing = m(serde_json::json!({ "destination": "/d", "type": "bind", "source": "/nonexistent/dir", "options": ["rbind"] }));
        assert!(mounts(&[missing]).unwrap_err().to_string().contains("/nonexistent/dir"));
        let many: Vec<_> = (0..4).map(|i| m(serde_json::json!({ "destination": format!("/d{i}"), "type": "bind", "source": host.path() }))).collect();
        assert!(mounts(&many).unwrap_err().to_string().contains("at most 3"));
        let relative = m(serde_json::json!({ "destination": "data", "type": "tmpfs" }));
        assert!(mounts(&[relative]).is_err());
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
        assert_eq!(names, ["domainname", "process.apparmorProfile", "process.user.umask", "linux.mountLabel", "linux.rootfsPropagation"]);
        spec["process"]["user"]["umask"] = 0o022.into();
        assert!(!unapplied(&serde_json::from_value(spec).unwrap()).iter().any(|(n, _)| *n == "process.user.umask"), "022 is what is applied");
    }

}
