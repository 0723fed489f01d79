//! The spec's `linux.cgroupsPath` on the host: the cgroup the container's
//! VM lives in (its supervisor, and under it the VMM's jail cgroup), where
//! containerd and kubelet expect a container's processes, so that the
//! node's accounting sees the VM.
//!
//! An absolute path is taken from each hierarchy's root, a relative one
//! from the cgroup `vmrun-oci` runs in (as runc's cgroupfs driver does);
//! systemd's `slice:prefix:name` form is not supported (a warning). On a
//! v1 host the directory is made in every mounted hierarchy, on v2 once.
//!
//! Which of `linux.resources` hold on the host, for the whole VM: the CPU
//! ones (shares or weight, quota and period, `cpus` and `mems`), which
//! only slow the VM or pin it; `pids` and memory limits only when they
//! leave the VM room (its VMM's threads, its guest memory and the VMM's
//! own), since below that they would kill the VM rather than limit the
//! container. Inside the guest the container's own cgroup applies them all
//! (but `cpus` and `mems`: the guest's CPUs are the VM's vCPUs).
//!
//! The directories this makes are recorded in the container's state and
//! removed by `delete` once the VM's processes are gone.

use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant};

use vmrun_agent_protocol::Resources;

pub use vmrun_jail::{is_v2, CGROUP_ROOT};

use crate::error::{Error, Result};

/// What the VM needs: host limits below it are not applied on the host.
#[derive(Debug, Clone, Copy)]
pub struct VmNeeds {
    /// Guest memory plus the VMM's own, in bytes.
    pub memory: u64,
    /// Tasks (threads) of the supervisor and the VMM.
    pub pids: i64,
    /// The CPU quota the VMM's jail cgroup gives itself (per
    /// `vmrun_jail::CPU_PERIOD`).
    pub cpu_quota: u64,
}

impl VmNeeds {
    /// For a VM of `mem_mib` MiB and `cpus` vCPUs.
    pub fn for_vm(mem_mib: u32, cpus: u8) -> Self {
        // The supervisor's threads (a few) beside the jail's allowance.
        Self {
            memory: (u64::from(mem_mib) << 20) + vmrun_jail::MEMORY_OVERHEAD,
            pids: i64::from(vmrun_jail::MAX_PIDS) + 32,
            cpu_quota: vmrun_jail::cpu_quota(u32::from(cpus)),
        }
    }
}

fn bad(msg: String) -> Error {
    Error::Bundle(msg)
}

/// The cgroup directories of `cgroups_path` under `root`: one per v1
/// hierarchy (`hierarchies`: their directory names, each with this
/// process's path in it from `/proc/self/cgroup`), or one under the v2
/// root.
pub fn plan(root: &Path, v2: bool, hierarchies: &[(String, String)], cgroups_path: &str) -> Result<Vec<PathBuf>> {
    if cgroups_path.contains(':') {
        return Err(bad(format!("linux.cgroupsPath {cgroups_path:?}: the systemd form (slice:prefix:name) is not supported; give a path")));
    }
    let p = Path::new(cgroups_path);
    if p.components().any(|c| matches!(c, Component::ParentDir)) || cgroups_path.trim_matches('/').is_empty() {
        return Err(bad(format!("linux.cgroupsPath {cgroups_path:?}: not a cgroup below the hierarchy's root")));
    }
    let rel = cgroups_path.trim_start_matches('/');
    let at = |hierarchy: PathBuf, own: &str| {
        if p.is_absolute() {
            hierarchy.join(rel)
        } else {
            hierarchy.join(own.trim_start_matches('/')).join(rel)
        }
    };
    if v2 {
        let own = hierarchies.iter().find(|(h, _)| h.is_empty()).map_or("/", |(_, o)| o.as_str());
        return Ok(vec![at(root.to_path_buf(), own)]);
    }
    Ok(hierarchies.iter().filter(|(h, _)| !h.is_empty()).map(|(h, own)| at(root.join(h), own)).collect())
}

/// The v1 hierarchies mounted under [`CGROUP_ROOT`] (directory names, a
/// combined one once) with this process's path in each; on v2 the unified
/// one (an empty name).
pub fn hierarchies(v2: bool) -> Result<Vec<(String, String)>> {
    let own = std::fs::read_to_string("/proc/self/cgroup").map_err(crate::error::io("reading /proc/self/cgroup"))?;
    let mut out = Vec::new();
    for line in own.lines() {
        let mut f = line.splitn(3, ':');
        let (Some(_), Some(ctrls), Some(path)) = (f.next(), f.next(), f.next()) else { continue };
        if v2 {
            if ctrls.is_empty() {
                out.push((String::new(), path.to_string()));
            }
            continue;
        }
        // "cpu,cpuacct" is mounted as such (or under one of its names);
        // "name=systemd" as "systemd".
        let names: Vec<&str> = ctrls.split(',').map(|c| c.trim_start_matches("name=")).collect();
        let dir = std::iter::once(ctrls.to_string())
            .chain(names.iter().map(|n| n.to_string()))
            .find(|d| !d.is_empty() && Path::new(CGROUP_ROOT).join(d).join("cgroup.procs").is_file());
        if let Some(d) = dir {
            out.push((d, path.to_string()));
        }
    }
    Ok(out)
}

/// The files written in the directory of hierarchy `hierarchy` (a v1
/// directory name; empty for v2).
pub fn files(hierarchy: &str, r: &Resources, vm: VmNeeds) -> Vec<(&'static str, String)> {
    let mut out = Vec::new();
    let c = &r.cpu;
    let memory = r.memory.limit.filter(|l| *l > 0 && *l as u64 >= vm.memory);
    let pids = r.pids.limit.filter(|l| *l > 0 && *l >= vm.pids);
    let has = |name: &str| hierarchy.split(',').any(|h| h == name);
    if hierarchy.is_empty() {
        if let Some(s) = c.shares {
            // runc's conversion of shares to a v2 weight.
            out.push(("cpu.weight", (1 + (s.clamp(2, 262_144) - 2) * 9999 / 262_142).to_string()));
        }
        if c.quota.is_some() || c.period.is_some() {
            let quota = c.quota.filter(|q| *q > 0).map_or("max".to_string(), |q| q.to_string());
            out.push(("cpu.max", format!("{quota} {}", c.period.unwrap_or(100_000))));
        }
        push_cpuset(&mut out, c);
        if let Some(l) = memory {
            out.push(("memory.max", l.to_string()));
        }
        if let Some(l) = pids {
            out.push(("pids.max", l.to_string()));
        }
        return out;
    }
    if has("cpu") {
        if let Some(s) = c.shares {
            out.push(("cpu.shares", s.to_string()));
        }
        // The period first: a quota is checked against it.
        if let Some(p) = c.period {
            out.push(("cpu.cfs_period_us", p.to_string()));
        }
        if let Some(q) = c.quota {
            out.push(("cpu.cfs_quota_us", q.to_string()));
        }
    }
    if has("cpuset") {
        push_cpuset(&mut out, c);
    }
    if has("memory") {
        if let Some(l) = memory {
            out.push(("memory.limit_in_bytes", l.to_string()));
        }
    }
    if has("pids") {
        if let Some(l) = pids {
            out.push(("pids.max", l.to_string()));
        }
    }
    out
}

fn push_cpuset(out: &mut Vec<(&'static str, String)>, c: &vmrun_agent_protocol::CpuResources) {
    if let Some(cpus) = c.cpus.as_deref().filter(|s| !s.is_empty()) {
        out.push(("cpuset.cpus", cpus.to_string()));
    }
    if let Some(mems) = c.mems.as_deref().filter(|s| !s.is_empty()) {
        out.push(("cpuset.mems", mems.to_string()));
    }
}

/// Makes the cgroup `dirs` (the ones made are added to `made`, top down,
/// so that they can be removed even when this fails midway), writes the
/// host's share of `resources` and moves this process (and the processes
/// `others`) into them; `v2`: the host has the unified hierarchy (`dirs`
/// from [`plan`] for it).
pub fn create_and_join(dirs: &[PathBuf], v2: bool, r: &Resources, vm: VmNeeds, others: &[u32], made: &mut Vec<PathBuf>) -> Result<()> {
    let root = Path::new(CGROUP_ROOT);
    for dir in dirs {
        let (hierarchy, top) = hierarchy_of(root, dir, v2);
        // Each missing level in turn: a v1 cpuset cgroup starts with no
        // CPUs and memory nodes, and takes its parent's.
        let mut missing: Vec<&Path> = dir.ancestors().take_while(|a| *a != top && !a.exists()).collect();
        missing.reverse();
        for d in missing {
            std::fs::create_dir(d).map_err(crate::error::io(format!("making cgroup {}", d.display())))?;
            made.push(d.to_path_buf());
            if hierarchy.split(',').any(|h| h == "cpuset") {
                for f in ["cpuset.cpus", "cpuset.mems"] {
                    let parent = d.parent().unwrap_or(&top);
                    let v = std::fs::read_to_string(parent.join(f)).unwrap_or_default();
                    std::fs::write(d.join(f), v.trim()).map_err(crate::error::io(format!("cgroup {}/{f}", d.display())))?;
                }
            }
        }
        let files = files(&hierarchy, r, vm);
        if hierarchy.is_empty() {
            enable_controllers(&top, dir, &files);
        }
        write_files(dir, files)?;
        for pid in std::iter::once(std::process::id()).chain(others.iter().copied()) {
            std::fs::write(dir.join("cgroup.procs"), pid.to_string())
                .map_err(crate::error::io(format!("moving process {pid} into cgroup {}", dir.display())))?;
        }
    }
    Ok(())
}

/// The hierarchy (a v1 directory name, empty on v2) of the cgroup `dir`
/// under `root`, and that hierarchy's top directory.
fn hierarchy_of(root: &Path, dir: &Path, v2: bool) -> (String, PathBuf) {
    let hierarchy = dir.strip_prefix(root).ok().and_then(|r| r.iter().next()).map(|c| c.to_string_lossy().into_owned());
    let hierarchy = if v2 { String::new() } else { hierarchy.unwrap_or_default() };
    let top = if hierarchy.is_empty() { root.to_path_buf() } else { root.join(&hierarchy) };
    (hierarchy, top)
}

fn write_files(dir: &Path, files: Vec<(&'static str, String)>) -> Result<()> {
    for (f, v) in files {
        std::fs::write(dir.join(f), &v).map_err(crate::error::io(format!("setting {f} to {v} in cgroup {}", dir.display())))?;
    }
    Ok(())
}

/// The VM's cgroup directories for the plan's `linux.cgroupsPath`, and
/// whether the host has cgroup v2; `None` without a path, or with one in
/// systemd's form (a warning: not supported).
pub fn of_plan(plan: &crate::bundle::Plan) -> Result<Option<(bool, Vec<PathBuf>)>> {
    let Some(path) = plan.cgroups_path.as_deref() else { return Ok(None) };
    if path.contains(':') {
        log::warn!("linux.cgroupsPath {path:?} is in systemd's form (slice:prefix:name), which vmrun-oci does not support: the VM stays in vmrun-oci's cgroup");
        return Ok(None);
    }
    let v2 = is_v2();
    Ok(Some((v2, self::plan(Path::new(CGROUP_ROOT), v2, &hierarchies(v2)?, path)?)))
}

/// `update`: writes the host's share of the new limits `r` (only the
/// fields set) in the VM's cgroup directories `dirs` under `root`.
pub fn update(root: &Path, dirs: &[PathBuf], v2: bool, r: &Resources, vm: VmNeeds) -> Result<()> {
    for dir in dirs {
        let (hierarchy, _) = hierarchy_of(root, dir, v2);
        let files = files(&hierarchy, r, vm);
        // A v1 cpu hierarchy that gets a new quota.
        let quota = r.cpu.quota.filter(|_| files.iter().any(|(f, _)| *f == "cpu.cfs_quota_us"));
        match quota {
            Some(q) => update_v1_cpu(dir, files, q, r.cpu.period, vm)?,
            None => write_files(dir, files)?,
        }
    }
    Ok(())
}

/// v1 refuses a cgroup a CPU quota below one of its children's (in CPUs'
/// worth), and the VMM's jail cgroup below the VM's has one (the jail's
/// own, capped to the VM's at its start): the cgroups below take the new
/// quota, or the jail's when that is smaller (the jail's when the new one
/// is unlimited), before `dir` when its current quota allows theirs, after
/// it otherwise.
fn update_v1_cpu(dir: &Path, files: Vec<(&'static str, String)>, quota: i64, period: Option<u64>, vm: VmNeeds) -> Result<()> {
    let period = period.filter(|p| *p > 0).or_else(|| read_number(dir, "cpu.cfs_period_us").map(|p| p as u64)).unwrap_or(vmrun_jail::CPU_PERIOD);
    let mut below = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).map_err(crate::error::io(format!("reading cgroup {}", d.display())))?.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(e.path());
                below.push(e.path());
            }
        }
    }
    let (now, now_period) = (read_number(dir, "cpu.cfs_quota_us").unwrap_or(-1), read_number(dir, "cpu.cfs_period_us").unwrap_or(0));
    let children: Vec<(PathBuf, String, bool)> = below
        .into_iter()
        .filter_map(|d| {
            let child_period = read_number(&d, "cpu.cfs_period_us").filter(|p| *p > 0)? as u64;
            let jail = vm.cpu_quota.saturating_mul(child_period) / vmrun_jail::CPU_PERIOD;
            let target = match u64::try_from(quota) {
                Ok(q) if q > 0 => jail.min(q.saturating_mul(child_period) / period),
                _ => jail,
            };
            let allowed_now = match (u64::try_from(now), u64::try_from(now_period)) {
                (Ok(q), Ok(p)) if q > 0 && p > 0 => target <= q.saturating_mul(child_period) / p,
                _ => true,
            };
            Some((d, target.to_string(), allowed_now))
        })
        .collect();
    let set = |d: &Path, q: &str| write_files(d, vec![("cpu.cfs_quota_us", q.to_string())]);
    for (d, q, _) in children.iter().filter(|c| c.2) {
        set(d, q)?;
    }
    write_files(dir, files)?;
    for (d, q, _) in children.iter().filter(|c| !c.2) {
        set(d, q)?;
    }
    Ok(())
}

fn read_number(dir: &Path, file: &str) -> Option<i64> {
    std::fs::read_to_string(dir.join(file)).ok()?.trim().parse().ok()
}

/// What the guest's cgroup of the container applies of `r`: everything
/// but `cpus` and `mems` when the host applies them (`host_cpuset`: the
/// guest's CPUs are the VM's vCPUs).
pub fn guest_share(r: &Resources, host_cpuset: bool) -> Resources {
    let mut r = r.clone();
    if host_cpuset {
        r.cpu.cpus = None;
        r.cpu.mems = None;
    }
    r
}

/// On v2: enables the controllers of the `files` to write for the
/// children of each cgroup from `top` down to `dir`'s parent (best effort:
/// a cgroup that holds processes cannot; the write of the file then says
/// what failed).
fn enable_controllers(top: &Path, dir: &Path, files: &[(&'static str, String)]) {
    let wanted: Vec<&str> =
        ["cpu", "cpuset", "memory", "pids"].into_iter().filter(|c| files.iter().any(|(f, _)| f.starts_with(&format!("{c}.")))).collect();
    let mut chain: Vec<&Path> = dir.ancestors().skip(1).take_while(|a| a.starts_with(top)).collect();
    chain.reverse();
    for d in chain {
        let enabled = std::fs::read_to_string(d.join("cgroup.subtree_control")).unwrap_or_default();
        let missing: Vec<String> =
            wanted.iter().filter(|c| !enabled.split_whitespace().any(|e| e == **c)).map(|c| format!("+{c}")).collect();
        if !missing.is_empty() {
            if let Err(e) = std::fs::write(d.join("cgroup.subtree_control"), missing.join(" ")) {
                log::debug!("enabling {} in {}: {e}", missing.join(" "), d.display());
            }
        }
    }
}

/// Removes the cgroup directories `made` (deepest first), waiting up to
/// 5 s for tasks that are still dying to leave them. What cannot be
/// removed is logged.
pub fn remove(made: &[PathBuf]) {
    let deadline = Instant::now() + Duration::from_secs(5);
    for d in made.iter().rev() {
        loop {
            match std::fs::remove_dir(d) {
                Ok(()) => break,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => {
                    log::warn!("cannot remove cgroup {}: {e}", d.display());
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_planned_per_hierarchy_and_bad_ones_refused() {
        let root = Path::new("/cg");
        let v1 = vec![("cpu,cpuacct".to_string(), "/".to_string()), ("memory".to_string(), "/jobs/1".to_string())];
        assert_eq!(
            plan(root, false, &v1, "/test/c1").unwrap(),
            vec![PathBuf::from("/cg/cpu,cpuacct/test/c1"), PathBuf::from("/cg/memory/test/c1")]
        );
        assert_eq!(
            plan(root, false, &v1, "pod/c1").unwrap(),
            vec![PathBuf::from("/cg/cpu,cpuacct/pod/c1"), PathBuf::from("/cg/memory/jobs/1/pod/c1")]
        );
        let v2 = vec![(String::new(), "/user.slice".to_string())];
        assert_eq!(plan(root, true, &v2, "/k8s/pod1/c1").unwrap(), vec![PathBuf::from("/cg/k8s/pod1/c1")]);
        assert_eq!(plan(root, true, &v2, "c1").unwrap(), vec![PathBuf::from("/cg/user.slice/c1")]);
        for bad in ["/a/../../etc", "system.slice:docker:c1", "/", ""] {
            assert!(plan(root, false, &v1, bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn only_limits_that_leave_the_vm_room_hold_on_the_host() {
        let vm = VmNeeds::for_vm(512, 1);
        let mut r = Resources::default();
        r.cpu.shares = Some(2048);
        r.cpu.quota = Some(50_000);
        r.cpu.period = Some(100_000);
        r.cpu.cpus = Some("0".into());
        r.memory.limit = Some(64 << 20);
        r.pids.limit = Some(10);
        let names = |h: &str, r: &Resources| files(h, r, vm).into_iter().map(|(f, v)| format!("{f}={v}")).collect::<Vec<_>>();
        assert_eq!(names("cpu,cpuacct", &r), ["cpu.shares=2048", "cpu.cfs_period_us=100000", "cpu.cfs_quota_us=50000"]);
        assert_eq!(names("cpuset", &r), ["cpuset.cpus=0"]);
        assert!(names("memory", &r).is_empty() && names("pids", &r).is_empty(), "below what the VM needs");
        r.memory.limit = Some(2 << 30);
        r.pids.limit = Some(1000);
        assert_eq!(names("memory", &r), [format!("memory.limit_in_bytes={}", 2u64 << 30)]);
        assert_eq!(names("pids", &r), ["pids.max=1000"]);
        assert_eq!(
            names("", &r),
            ["cpu.weight=79", "cpu.max=50000 100000", "cpuset.cpus=0", &format!("memory.max={}", 2u64 << 30), "pids.max=1000"]
        );
        assert!(names("devices", &r).is_empty());
    }

    #[test]
    fn an_update_writes_the_hosts_share_of_the_fields_set_and_the_guest_gets_the_rest() {
        let root = tempfile::tempdir().unwrap();
        let v1 = [root.path().join("cpu,cpuacct/vm"), root.path().join("pids/vm")];
        for d in &v1 {
            std::fs::create_dir_all(d).unwrap();
        }
        let mut r = Resources::default();
        r.cpu.quota = Some(20_000);
        r.cpu.cpus = Some("1".into());
        r.pids.limit = Some(5);
        update(root.path(), &v1, false, &r, VmNeeds::for_vm(512, 1)).unwrap();
        assert_eq!(std::fs::read_to_string(v1[0].join("cpu.cfs_quota_us")).unwrap(), "20000");
        assert!(!v1[0].join("cpu.shares").exists(), "a field not set is left as it is");
        assert!(!v1[1].join("pids.max").exists(), "a pids limit below the VM's needs is the guest's alone");
        let v2 = [root.path().join("vm2")];
        std::fs::create_dir_all(&v2[0]).unwrap();
        update(root.path(), &v2, true, &r, VmNeeds::for_vm(512, 1)).unwrap();
        assert_eq!(std::fs::read_to_string(v2[0].join("cpu.max")).unwrap(), "20000 100000");
        assert_eq!(std::fs::read_to_string(v2[0].join("cpuset.cpus")).unwrap(), "1");
        let guest = guest_share(&r, true);
        assert_eq!((guest.cpu.quota, guest.cpu.cpus, guest.pids.limit), (Some(20_000), None, Some(5)));
        assert_eq!(guest_share(&r, false).cpu.cpus.as_deref(), Some("1"));
        // v1: the jail's cgroup below takes the new quota when it is
        // smaller than its own (1 vCPU: two CPUs' worth), its own otherwise.
        let jail = v1[0].join("vmrun/vmrun-1");
        std::fs::create_dir_all(&jail).unwrap();
        for (d, quota) in [(&v1[0], "1000000"), (&jail, "200000")] {
            std::fs::write(d.join("cpu.cfs_period_us"), "100000").unwrap();
            std::fs::write(d.join("cpu.cfs_quota_us"), quota).unwrap();
        }
        update(root.path(), &v1, false, &r, VmNeeds::for_vm(512, 1)).unwrap();
        assert_eq!(std::fs::read_to_string(jail.join("cpu.cfs_quota_us")).unwrap(), "20000");
        let mut unlimited = Resources::default();
        unlimited.cpu.quota = Some(-1);
        update(root.path(), &v1, false, &unlimited, VmNeeds::for_vm(512, 1)).unwrap();
        assert_eq!(std::fs::read_to_string(v1[0].join("cpu.cfs_quota_us")).unwrap(), "-1");
        assert_eq!(std::fs::read_to_string(jail.join("cpu.cfs_quota_us")).unwrap(), "200000");
        let gone = [root.path().join("missing/vm")];
        assert!(update(root.path(), &gone, true, &r, VmNeeds::for_vm(512, 1)).unwrap_err().to_string().contains("missing/vm"));
    }
}
