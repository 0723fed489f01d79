//! Containers' cgroups: in a guest, one cgroup v2 per container,
//! `/sys/fs/cgroup/vmrun/<id>`, holding all its processes, with the
//! container's `resources` applied.
//!
//! The first container enables every controller the guest kernel offers
//! (`cgroup.controllers`: `cpu`, `memory`, `pids` with vmrun's kernel) in
//! the root's and `vmrun`'s `cgroup.subtree_control`. The agent stays in
//! the root cgroup, the one cgroup exempt from the "no internal processes"
//! rule; `vmrun` holds no process, only the containers' leaves. A
//! container's processes are cloned straight into its leaf
//! (`clone3(CLONE_INTO_CGROUP)`, see `process.rs`), so nothing of theirs
//! ever runs outside it.
//!
//! Limits come in the OCI runtime spec's (cgroup v1) units and are
//! converted as runc converts them for cgroup v2:
//!
//! | spec | file | value |
//! | --- | --- | --- |
//! | `memory.limit` | `memory.max` | bytes, -1: `max` |
//! | `memory.reservation` | `memory.low` | bytes, -1: `max` |
//! | `memory.swap` | `memory.swap.max` | `swap - limit` (swap counts the memory too), -1: `max` |
//! | `cpu.shares` | `cpu.weight` | `1 + ((shares - 2) * 9999) / 262142` |
//! | `cpu.quota`, `cpu.period` | `cpu.max` | `"$quota $period"`, quota <= 0: `max` |
//! | `cpu.cpus`, `cpu.mems` | `cpuset.cpus`, `cpuset.mems` | as given |
//! | `pids.limit` | `pids.max` | > 0: the number, else `max` |
//! | `unified` | the key | the value |
//!
//! A setting whose controller the guest kernel lacks (`cpuset` with
//! vmrun's kernel) is refused with an error naming both. A swap limit
//! where the kernel has no swap accounting (vmrun's guest has no swap at
//! all) is ignored: memory plus swap cannot exceed the memory limit then.
//!
//! `devices` becomes a BPF program attached to the cgroup (`devcg.rs`).

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

use vmrun_agent_protocol::{CgroupStats, CpuStats, ErrorKind, MemoryEvents, MemoryStats, PidsStats, Resources};

/// Where the guest's cgroup2 hierarchy is mounted (`init.rs`).
pub const ROOT: &str = "/sys/fs/cgroup";
/// The cgroup under the root that holds the containers' cgroups.
pub const PARENT: &str = "vmrun";

/// A cgroup that cannot be made, changed or read.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// A container id that is not a single path component.
    #[error("invalid container id {0:?} for a cgroup")]
    InvalidId(String),
    /// No cgroup v2 hierarchy to put the container in.
    #[error("no cgroup v2 hierarchy: {0} cannot be applied (only a guest's agent makes cgroups)")]
    Unavailable(String),
    /// A setting needs a controller the guest kernel does not have.
    #[error("the guest kernel has no {controller} cgroup controller: {setting} cannot be applied")]
    MissingController {
        /// The controller.
        controller: String,
        /// The setting that needs it.
        setting: String,
    },
    /// A value that cannot be applied.
    #[error("{setting}: {reason}")]
    Invalid {
        /// The setting.
        setting: String,
        /// Why.
        reason: String,
    },
    /// The container's cgroup exists already (an earlier container of
    /// that id whose processes have not all ended).
    #[error("the cgroup {} exists already", .0.display())]
    Exists(PathBuf),
    /// The device rules could not be applied.
    #[error(transparent)]
    Devices(#[from] crate::devcg::DevCgroupError),
    /// A file system operation on the hierarchy failed.
    #[error("{what} {}: {source}", path.display())]
    Io {
        /// What was done.
        what: &'static str,
        /// Where.
        path: PathBuf,
        /// Why it failed.
        #[source]
        source: io::Error,
    },
}

impl CgroupError {
    /// The protocol's kind of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Io { .. } => ErrorKind::Internal,
            Self::Devices(crate::devcg::DevCgroupError::Invalid(_)) => ErrorKind::BadRequest,
            Self::Devices(_) => ErrorKind::Internal,
            Self::Exists(_) => ErrorKind::AlreadyExists,
            _ => ErrorKind::BadRequest,
        }
    }
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> CgroupError {
    let path = path.to_path_buf();
    move |source| CgroupError::Io { what, path, source }
}

fn invalid(setting: &str, reason: impl Into<String>) -> CgroupError {
    CgroupError::Invalid { setting: setting.into(), reason: reason.into() }
}

/// One value to write into a cgroup file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupWrite {
    /// The file (`memory.max`).
    pub file: String,
    /// What is written.
    pub value: String,
    /// The spec's setting, for errors (`linux.resources.memory.limit`).
    pub setting: String,
}

impl CgroupWrite {
    fn new(file: &str, value: impl ToString, setting: &str) -> Self {
        Self { file: file.into(), value: value.to_string(), setting: format!("linux.resources.{setting}") }
    }

    /// The controller the file belongs to (`memory` for `memory.max`).
    pub fn controller(&self) -> &str {
        self.file.split_once('.').map_or(self.file.as_str(), |(c, _)| c)
    }
}

/// A byte limit as cgroup v2 writes it: -1 is `max`, 0 unset (`None`).
fn bytes_value(v: i64, setting: &str) -> Result<Option<String>, CgroupError> {
    match v {
        0 => Ok(None),
        -1 => Ok(Some("max".into())),
        v if v > 0 => Ok(Some(v.to_string())),
        v => Err(invalid(setting, format!("invalid value {v} (bytes, or -1 for no limit)"))),
    }
}

/// cgroup v2's `memory.swap.max` for the spec's memory+swap `swap` and
/// memory `limit` (runc's `ConvertMemorySwapToCgroupV2Value`): -1 is
/// `max`, 0 unset.
pub fn swap_max(swap: i64, limit: i64) -> Result<i64, CgroupError> {
    let setting = "linux.resources.memory.swap";
    if limit == -1 && swap == 0 {
        return Ok(-1);
    }
    if swap == -1 || swap == 0 {
        return Ok(swap);
    }
    if swap < -1 {
        return Err(invalid(setting, format!("invalid value {swap}")));
    }
    if limit == 0 || limit == -1 {
        return Err(invalid(setting, "a swap limit needs a memory limit"));
    }
    if limit < 0 {
        return Err(invalid("linux.resources.memory.limit", format!("invalid value {limit}")));
    }
    if swap < limit {
        return Err(invalid(setting, format!("memory+swap {swap} is below the memory limit {limit}")));
    }
    Ok(swap - limit)
}

/// cgroup v2's `cpu.weight` for cgroup v1's `cpu.shares` (runc's
/// `ConvertCPUSharesToCgroupV2Value`; shares clamped to v1's 2..=262144).
pub fn cpu_weight(shares: u64) -> u64 {
    1 + ((shares.clamp(2, 262_144) - 2) * 9999) / 262_142
}

/// `cpu.max` for a quota and a period (runc's): `max` for a quota <= 0,
/// the period appended when set; `None` when neither is.
pub fn cpu_max(quota: i64, period: u64) -> Option<String> {
    if quota == 0 && period == 0 {
        return None;
    }
    let mut s = if quota > 0 { quota.to_string() } else { "max".to_string() };
    if period != 0 {
        s.push_str(&format!(" {period}"));
    }
    Some(s)
}

/// Whether `list` is a CPU or memory node list (`0-3,5`).
fn is_cpu_list(list: &str) -> bool {
    !list.is_empty() && list.bytes().all(|b| b.is_ascii_digit() || b == b',' || b == b'-')
}

/// The files to write for `r`, in order.
pub fn writes(r: &Resources) -> Result<Vec<CgroupWrite>, CgroupError> {
    let mut w = Vec::new();
    let m = &r.memory;
    let limit = m.limit.unwrap_or(0);
    if let Some(v) = m.limit.map(|v| bytes_value(v, "linux.resources.memory.limit")).transpose()?.flatten() {
        w.push(CgroupWrite::new("memory.max", v, "memory.limit"));
    }
    if let Some(v) = m.reservation.map(|v| bytes_value(v, "linux.resources.memory.reservation")).transpose()?.flatten() {
        w.push(CgroupWrite::new("memory.low", v, "memory.reservation"));
    }
    if m.swap.is_some() || limit == -1 {
        let swap = swap_max(m.swap.unwrap_or(0), limit)?;
        let value = match swap {
            -1 => Some("max".to_string()),
            // Memory and memory+swap equal: no swap.
            0 if m.swap.unwrap_or(0) > 0 => Some("0".to_string()),
            0 => None,
            s => Some(s.to_string()),
        };
        if let Some(v) = value {
            w.push(CgroupWrite::new("memory.swap.max", v, "memory.swap"));
        }
    }
    let c = &r.cpu;
    if let Some(s) = c.shares.filter(|s| *s != 0) {
        w.push(CgroupWrite::new("cpu.weight", cpu_weight(s), "cpu.shares"));
    }
    if let Some(v) = cpu_max(c.quota.unwrap_or(0), c.period.unwrap_or(0)) {
        w.push(CgroupWrite::new("cpu.max", v, "cpu.quota"));
    }
    for (file, value, setting) in [("cpuset.cpus", &c.cpus, "cpu.cpus"), ("cpuset.mems", &c.mems, "cpu.mems")] {
        if let Some(v) = value.as_deref().filter(|v| !v.is_empty()) {
            if !is_cpu_list(v) {
                return Err(invalid(&format!("linux.resources.{setting}"), format!("{v:?} is not a list such as 0-1,3")));
            }
            w.push(CgroupWrite::new(file, v, setting));
        }
    }
    if let Some(l) = r.pids.limit {
        w.push(CgroupWrite::new("pids.max", if l > 0 { l.to_string() } else { "max".into() }, "pids.limit"));
    }
    for (key, value) in &r.unified {
        let setting = format!("unified.{key}");
        let named = key.split_once('.').is_some_and(|(c, f)| {
            !c.is_empty() && !f.is_empty() && c.bytes().all(|b| b.is_ascii_lowercase() || b == b'_') && !f.contains('/') && f != ".."
        });
        if !named || key.starts_with("cgroup.") {
            return Err(invalid(&format!("linux.resources.{setting}"), "not a controller's file (controller.name)"));
        }
        if value.contains('\n') {
            return Err(invalid(&format!("linux.resources.{setting}"), "a value on one line"));
        }
        w.push(CgroupWrite::new(key, value, &setting));
    }
    Ok(w)
}

/// `old` with what `new` sets (an update: the fields it leaves unset keep
/// their values).
pub fn merge(old: &Resources, new: &Resources) -> Resources {
    let mut r = old.clone();
    let (m, c) = (&new.memory, &new.cpu);
    r.memory.limit = m.limit.or(r.memory.limit);
    r.memory.reservation = m.reservation.or(r.memory.reservation);
    r.memory.swap = m.swap.or(r.memory.swap);
    r.cpu.shares = c.shares.or(r.cpu.shares);
    r.cpu.quota = c.quota.or(r.cpu.quota);
    r.cpu.period = c.period.or(r.cpu.period);
    r.cpu.cpus = c.cpus.clone().or(r.cpu.cpus.take());
    r.cpu.mems = c.mems.clone().or(r.cpu.mems.take());
    r.pids.limit = new.pids.limit.or(r.pids.limit);
    r.unified.extend(new.unified.iter().map(|(k, v)| (k.clone(), v.clone())));
    if !new.devices.is_empty() {
        r.devices = new.devices.clone();
    }
    r
}

/// Whether `id` may name a cgroup directory: one path component.
pub fn valid_name(id: &str) -> bool {
    vmrun_agent_protocol::valid_id(id) && !id.contains('/') && id != "." && id != ".."
}

fn write_file(path: &Path, value: &str) -> io::Result<()> {
    let mut f = std::fs::OpenOptions::new().write(true).open(path)?;
    // One write: a cgroup file takes its value in one piece.
    let n = f.write(value.as_bytes())?;
    if n != value.len() {
        return Err(io::Error::other(format!("short write ({n} of {} bytes)", value.len())));
    }
    Ok(())
}

/// The guest's cgroup2 hierarchy, as the agent uses it.
#[derive(Debug)]
pub struct Hierarchy {
    root: PathBuf,
    /// The controllers enabled for containers, once set up.
    enabled: Option<BTreeSet<String>>,
}

impl Hierarchy {
    /// The hierarchy mounted at `root` (set up on first use).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into(), enabled: None }
    }

    /// Enables every controller the kernel offers for the containers'
    /// cgroups (once); the set enabled.
    fn setup(&mut self) -> Result<&BTreeSet<String>, CgroupError> {
        if self.enabled.is_none() {
            let path = self.root.join("cgroup.controllers");
            let text = std::fs::read_to_string(&path).map_err(io_err("reading", &path))?;
            let offered: Vec<&str> = text.split_whitespace().collect();
            let parent = self.root.join(PARENT);
            match std::fs::create_dir(&parent) {
                Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(io_err("creating", &parent)(e)),
                _ => {}
            }
            let mut enabled = BTreeSet::new();
            for c in offered {
                let on = [&self.root, &parent].iter().all(|dir| {
                    let r = write_file(&dir.join("cgroup.subtree_control"), &format!("+{c}"));
                    if let Err(e) = &r {
                        crate::log::error(format_args!("enabling the {c} controller in {}: {e}", dir.display()));
                    }
                    r.is_ok()
                });
                if on {
                    enabled.insert(c.to_string());
                }
            }
            crate::log::debug(format_args!("cgroup controllers for containers: {enabled:?}"));
            self.enabled = Some(enabled);
        }
        Ok(self.enabled.get_or_insert_with(BTreeSet::new))
    }

    /// Checks that every write has its controller.
    fn check(enabled: &BTreeSet<String>, writes: &[CgroupWrite]) -> Result<(), CgroupError> {
        match writes.iter().find(|w| !enabled.contains(w.controller())) {
            Some(w) => Err(CgroupError::MissingController { controller: w.controller().into(), setting: w.setting.clone() }),
            None => Ok(()),
        }
    }

    /// Creates container `id`'s cgroup with `resources` applied.
    pub fn create(&mut self, id: &str, resources: &Resources) -> Result<Cgroup, CgroupError> {
        if !valid_name(id) {
            return Err(CgroupError::InvalidId(id.into()));
        }
        let writes = writes(resources)?;
        let enabled = self.setup()?;
        Self::check(enabled, &writes)?;
        let path = self.root.join(PARENT).join(id);
        match std::fs::create_dir(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Err(CgroupError::Exists(path)),
            Err(e) => return Err(io_err("creating", &path)(e)),
        }
        let made = (|| {
            let dir = std::fs::File::open(&path).map_err(io_err("opening", &path))?;
            let cg = Cgroup { path: path.clone(), dir: OwnedFd::from(dir), applied: Resources::default() };
            cg.apply(&writes)?;
            if !resources.devices.is_empty() {
                crate::devcg::apply(cg.fd(), &resources.devices)?;
            }
            Ok(Cgroup { applied: resources.clone(), ..cg })
        })();
        if made.is_err() {
            let _ = std::fs::remove_dir(&path);
        }
        made
    }

    /// Applies `resources` to `cg` on top of what it has.
    pub fn update(&mut self, cg: &mut Cgroup, resources: &Resources) -> Result<(), CgroupError> {
        let merged = merge(&cg.applied, resources);
        let writes = writes(&merged)?;
        Self::check(self.setup()?, &writes)?;
        cg.apply(&writes)?;
        if !resources.devices.is_empty() {
            crate::devcg::apply(cg.fd(), &resources.devices)?;
        }
        cg.applied = merged;
        Ok(())
    }
}

/// A container's cgroup.
#[derive(Debug)]
pub struct Cgroup {
    path: PathBuf,
    /// The directory, open: what `clone3(CLONE_INTO_CGROUP)` takes.
    dir: OwnedFd,
    /// The limits applied so far (what an update adds to).
    applied: Resources,
}

impl Cgroup {
    /// Its directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The directory's descriptor.
    pub fn fd(&self) -> RawFd {
        self.dir.as_raw_fd()
    }

    fn apply(&self, writes: &[CgroupWrite]) -> Result<(), CgroupError> {
        for w in writes {
            let path = self.path.join(&w.file);
            match write_file(&path, &w.value) {
                Ok(()) => {}
                Err(e) if w.file == "memory.swap.max" && e.kind() == io::ErrorKind::NotFound => {
                    // No swap accounting: the guest has no swap, so memory
                    // plus swap is the memory limit anyway.
                    crate::log::debug(format_args!("{}: no swap accounting in the guest kernel; {} ignored", w.setting, w.value));
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    return Err(invalid(&w.setting, format!("the guest kernel has no {}", w.file)));
                }
                Err(e) => return Err(invalid(&w.setting, format!("writing {:?} to {}: {e}", w.value, w.file))),
            }
        }
        Ok(())
    }

    fn read(&self, file: &str) -> Option<String> {
        std::fs::read_to_string(self.path.join(file)).ok()
    }

    /// Its statistics (what the kernel does not have reads as zero).
    pub fn stats(&self) -> CgroupStats {
        let keyed = |f: &str| self.read(f).map(|t| flat_keyed(&t)).unwrap_or_default();
        let single = |f: &str| self.read(f).and_then(|t| t.trim().parse::<u64>().ok());
        let limit = |f: &str| self.read(f).and_then(|t| max_value(&t));
        let cpu = keyed("cpu.stat");
        let events = keyed("memory.events");
        let get = |m: &BTreeMap<String, u64>, k: &str| m.get(k).copied().unwrap_or(0);
        CgroupStats {
            cpu: CpuStats {
                usage_usec: get(&cpu, "usage_usec"),
                user_usec: get(&cpu, "user_usec"),
                system_usec: get(&cpu, "system_usec"),
                nr_periods: get(&cpu, "nr_periods"),
                nr_throttled: get(&cpu, "nr_throttled"),
                throttled_usec: get(&cpu, "throttled_usec"),
            },
            memory: MemoryStats {
                current: single("memory.current").unwrap_or(0),
                max: limit("memory.max"),
                low: single("memory.low").unwrap_or(0),
                swap_current: single("memory.swap.current"),
                events: MemoryEvents {
                    low: get(&events, "low"),
                    high: get(&events, "high"),
                    max: get(&events, "max"),
                    oom: get(&events, "oom"),
                    oom_kill: get(&events, "oom_kill"),
                },
                stat: keyed("memory.stat"),
            },
            pids: PidsStats { current: single("pids.current").unwrap_or(0), max: limit("pids.max") },
        }
    }

    /// Freezes or thaws its processes (`cgroup.freeze`) and waits up to
    /// `limit` for `cgroup.events` to say they are (the kernel wakes a
    /// `poll` of that file when it changes).
    pub fn freeze(&self, frozen: bool, limit: std::time::Duration) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        // Opened first: a change after this wakes the poll below.
        let events = std::fs::File::open(self.path.join("cgroup.events"))?;
        write_file(&self.path.join("cgroup.freeze"), if frozen { "1" } else { "0" })?;
        let want = if frozen { 1 } else { 0 };
        let deadline = std::time::Instant::now() + limit;
        let mut buf = [0u8; 256];
        loop {
            let n = events.read_at(&mut buf, 0)?;
            if flat_keyed(&String::from_utf8_lossy(&buf[..n])).get("frozen") == Some(&want) {
                return Ok(());
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let mut p = libc::pollfd { fd: events.as_raw_fd(), events: libc::POLLPRI, revents: 0 };
            // SAFETY: poll of one pollfd on a descriptor we hold, for at
            // most the time left.
            let r = unsafe { libc::poll(&mut p, 1, left.as_millis().min(i32::MAX as u128) as libc::c_int) };
            if r < 0 {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
            if r == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("its processes were not {} within {limit:?}", if frozen { "frozen" } else { "thawed" }),
                ));
            }
        }
    }

    /// Kills every process in the cgroup (`cgroup.kill`).
    pub fn kill(&self) -> io::Result<()> {
        write_file(&self.path.join("cgroup.kill"), "1")
    }

    /// Removes the cgroup. While processes of it remain (dying), they are
    /// killed (`cgroup.kill`) and the error says so: try again once they
    /// are reaped.
    pub fn remove(&self) -> io::Result<()> {
        match std::fs::remove_dir(&self.path) {
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                let _ = write_file(&self.path.join("cgroup.kill"), "1");
                Err(e)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            r => r,
        }
    }
}

/// A flat keyed file (`cpu.stat`, `memory.events`, `memory.stat`):
/// `key value` lines; others are skipped.
pub fn flat_keyed(text: &str) -> BTreeMap<String, u64> {
    text.lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(' ')?;
            Some((k.to_string(), v.trim().parse().ok()?))
        })
        .collect()
}

/// A limit file's value: `None` for `max` (or anything unreadable).
pub fn max_value(text: &str) -> Option<u64> {
    text.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmrun_agent_protocol::{CpuResources, MemoryResources, PidsResources};

    fn files(r: &Resources) -> Vec<(String, String)> {
        writes(r).unwrap().into_iter().map(|w| (w.file, w.value)).collect()
    }

    fn pair(f: &str, v: &str) -> (String, String) {
        (f.to_string(), v.to_string())
    }

    #[test]
    fn runc_conversions() {
        assert_eq!(cpu_weight(1024), 39);
        assert_eq!(cpu_weight(2), 1);
        assert_eq!(cpu_weight(262_144), 10_000);
        assert_eq!(cpu_weight(0), 1, "clamped, no underflow");
        assert_eq!(cpu_weight(u64::MAX), 10_000);
        assert_eq!(cpu_max(50_000, 100_000).as_deref(), Some("50000 100000"));
        assert_eq!(cpu_max(-1, 100_000).as_deref(), Some("max 100000"));
        assert_eq!(cpu_max(20_000, 0).as_deref(), Some("20000"));
        assert_eq!(cpu_max(0, 0), None);
        assert_eq!(swap_max(200, 100).unwrap(), 100);
        assert_eq!(swap_max(100, 100).unwrap(), 0);
        assert_eq!(swap_max(-1, 100).unwrap(), -1);
        assert_eq!(swap_max(0, -1).unwrap(), -1, "no memory limit and no swap given: both unlimited");
        assert!(swap_max(50, 100).unwrap_err().to_string().contains("below the memory limit"));
        assert!(swap_max(200, 0).unwrap_err().to_string().contains("needs a memory limit"));
    }

    #[test]
    fn resources_become_cgroup_v2_files() {
        let r = Resources {
            memory: MemoryResources { limit: Some(64 << 20), reservation: Some(32 << 20), swap: Some(128 << 20) },
            cpu: CpuResources { shares: Some(512), quota: Some(50_000), period: Some(100_000), cpus: Some("0-1".into()), mems: None },
            pids: PidsResources { limit: Some(16) },
            unified: [("memory.high".to_string(), "48M".to_string())].into(),
            devices: vec![],
        };
        assert_eq!(
            files(&r),
            [
                pair("memory.max", "67108864"),
                pair("memory.low", "33554432"),
                pair("memory.swap.max", "67108864"),
                pair("cpu.weight", "20"),
                pair("cpu.max", "50000 100000"),
                pair("cpuset.cpus", "0-1"),
                pair("pids.max", "16"),
                pair("memory.high", "48M"),
            ]
        );
        let unlimited = Resources {
            memory: MemoryResources { limit: Some(-1), ..Default::default() },
            pids: PidsResources { limit: Some(0) },
            ..Default::default()
        };
        assert_eq!(files(&unlimited), [pair("memory.max", "max"), pair("memory.swap.max", "max"), pair("pids.max", "max")]);
        let no_swap = Resources { memory: MemoryResources { limit: Some(100), swap: Some(100), ..Default::default() }, ..Default::default() };
        assert_eq!(files(&no_swap), [pair("memory.max", "100"), pair("memory.swap.max", "0")]);
        assert_eq!(files(&Resources::default()), []);
        assert_eq!(writes(&unlimited).unwrap()[0].setting, "linux.resources.memory.limit");
        assert_eq!(writes(&r).unwrap()[5].controller(), "cpuset");
    }

    #[test]
    fn bad_values_are_refused() {
        let bad = |r: Resources, needle: &str| {
            let e = writes(&r).unwrap_err().to_string();
            assert!(e.contains(needle), "{needle:?} not in {e}");
        };
        bad(Resources { memory: MemoryResources { limit: Some(-5), ..Default::default() }, ..Default::default() }, "memory.limit");
        bad(Resources { cpu: CpuResources { cpus: Some("0\n1".into()), ..Default::default() }, ..Default::default() }, "cpu.cpus");
        for key in ["cgroup.procs", "memory", "../memory.max", "memory./x", "Memory.max"] {
            bad(Resources { unified: [(key.to_string(), "1".to_string())].into(), ..Default::default() }, "controller.name");
        }
        bad(Resources { unified: [("memory.high".to_string(), "1\n2".to_string())].into(), ..Default::default() }, "one line");
    }

    #[test]
    fn missing_controllers_are_named() {
        let enabled: BTreeSet<String> = ["cpu", "memory", "pids"].iter().map(|s| s.to_string()).collect();
        let r = Resources { cpu: CpuResources { cpus: Some("0".into()), ..Default::default() }, ..Default::default() };
        let e = Hierarchy::check(&enabled, &writes(&r).unwrap()).unwrap_err().to_string();
        assert_eq!(e, "the guest kernel has no cpuset cgroup controller: linux.resources.cpu.cpus cannot be applied");
        let r = Resources { pids: PidsResources { limit: Some(3) }, ..Default::default() };
        Hierarchy::check(&enabled, &writes(&r).unwrap()).unwrap();
    }

    #[test]
    fn updates_keep_what_they_do_not_set() {
        let old = Resources {
            memory: MemoryResources { limit: Some(100), swap: Some(200), ..Default::default() },
            pids: PidsResources { limit: Some(5) },
            ..Default::default()
        };
        let new = Resources { pids: PidsResources { limit: Some(50) }, cpu: CpuResources { quota: Some(1000), ..Default::default() }, ..Default::default() };
        let m = merge(&old, &new);
        assert_eq!((m.memory.limit, m.memory.swap, m.pids.limit, m.cpu.quota), (Some(100), Some(200), Some(50), Some(1000)));
        // A new memory limit moves swap.max with it.
        let m = merge(&m, &Resources { memory: MemoryResources { limit: Some(150), ..Default::default() }, ..Default::default() });
        assert!(files(&m).contains(&pair("memory.swap.max", "50")));
    }

    #[test]
    fn ids_must_be_one_path_component() {
        for bad in ["a/b", "..", ".", "../x", "/abs", "", "a\0b"] {
            assert!(!valid_name(bad), "{bad:?}");
            let mut h = Hierarchy::new("/nonexistent");
            assert!(matches!(h.create(bad, &Resources::default()), Err(CgroupError::InvalidId(_))), "{bad:?}");
        }
        assert!(valid_name("c-1.x"));
    }

    #[test]
    fn stat_files_parse() {
        let m = flat_keyed("usage_usec 120\nuser_usec 100\nsystem_usec 20\nbogus\nnr_periods x\n");
        assert_eq!(m.get("usage_usec"), Some(&120));
        assert_eq!(m.get("system_usec"), Some(&20));
        assert!(!m.contains_key("nr_periods") && !m.contains_key("bogus"));
        assert_eq!(max_value("max\n"), None);
        assert_eq!(max_value("4096\n"), Some(4096));
    }
}
