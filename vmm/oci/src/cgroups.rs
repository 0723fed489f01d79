//! `events` and `update`: the container's cgroup in the guest (see
//! `guest-agent/agent/src/cgroup.rs`), read and changed through the guest
//! agent, with runc's command lines and runc's statistics JSON.

use std::io::Read;
use std::path::PathBuf;
use std::time::Duration;

use vmrun_agent_protocol::{CgroupStats, Resources};

use crate::bundle;
use crate::error::{io, Error, Result};
use crate::ops::{self, Ctx};
use crate::state::{self, State, Status};
use crate::supervisor::SupervisorPlan;

/// `update`'s flags (runc's).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct UpdateArgs {
    /// A JSON file of the spec's linux.resources ("-": standard input).
    #[arg(short = 'r', long)]
    pub resources: Option<PathBuf>,
    /// Memory limit, bytes (512m, 1g; -1: none).
    #[arg(long, allow_hyphen_values = true)]
    pub memory: Option<String>,
    /// Memory reservation (soft limit).
    #[arg(long = "memory-reservation", allow_hyphen_values = true)]
    pub memory_reservation: Option<String>,
    /// Memory plus swap limit (-1: no swap limit).
    #[arg(long = "memory-swap", allow_hyphen_values = true)]
    pub memory_swap: Option<String>,
    /// CPU shares (relative weight).
    #[arg(long = "cpu-shares", visible_alias = "cpu-share")]
    pub cpu_shares: Option<u64>,
    /// CPU time per period, microseconds (-1: none).
    #[arg(long = "cpu-quota", allow_hyphen_values = true)]
    pub cpu_quota: Option<i64>,
    /// The period of --cpu-quota, microseconds.
    #[arg(long = "cpu-period")]
    pub cpu_period: Option<u64>,
    /// CPUs to use (0-1,3).
    #[arg(long = "cpuset-cpus")]
    pub cpuset_cpus: Option<String>,
    /// Memory nodes to use.
    #[arg(long = "cpuset-mems")]
    pub cpuset_mems: Option<String>,
    /// Most processes (0 or -1: no limit).
    #[arg(long = "pids-limit", allow_hyphen_values = true)]
    pub pids_limit: Option<i64>,
    /// The container's id.
    pub id: String,
}

/// A memory flag's bytes: `-1` (no limit), or a size (`512m`, bytes when
/// plain).
pub fn memory_bytes(flag: &str, v: &str) -> Result<i64> {
    if v.trim() == "-1" {
        return Ok(-1);
    }
    let bad = |e: String| Error::Usage(format!("--{flag} {v:?}: {e}"));
    let b = vmrun_runtime::size::bytes(v.trim()).map_err(|e| bad(e.to_string()))?;
    i64::try_from(b).map_err(|_| bad("too large".into()))
}

/// The limits an `update` asks for: the `-r` file's, then the flags'.
pub fn update_resources(args: &UpdateArgs) -> Result<Resources> {
    let mut r = match &args.resources {
        None => Resources::default(),
        Some(path) => {
            let mut text = Vec::new();
            let what = format!("reading {}", path.display());
            if path.as_os_str() == "-" {
                std::io::stdin().read_to_end(&mut text).map_err(io(what))?;
            } else {
                text = std::fs::read(path).map_err(io(what))?;
            }
            let spec: oci_spec::runtime::LinuxResources =
                serde_json::from_slice(&text).map_err(|e| Error::Usage(format!("invalid resources in {}: {e}", path.display())))?;
            bundle::resources(&spec)
        }
    };
    let mem = |flag: &str, v: &Option<String>| v.as_deref().map(|v| memory_bytes(flag, v)).transpose();
    r.memory.limit = mem("memory", &args.memory)?.or(r.memory.limit);
    r.memory.reservation = mem("memory-reservation", &args.memory_reservation)?.or(r.memory.reservation);
    r.memory.swap = mem("memory-swap", &args.memory_swap)?.or(r.memory.swap);
    r.cpu.shares = args.cpu_shares.or(r.cpu.shares);
    r.cpu.quota = args.cpu_quota.or(r.cpu.quota);
    r.cpu.period = args.cpu_period.or(r.cpu.period);
    r.cpu.cpus = args.cpuset_cpus.clone().or(r.cpu.cpus.take());
    r.cpu.mems = args.cpuset_mems.clone().or(r.cpu.mems.take());
    r.pids.limit = args.pids_limit.or(r.pids.limit);
    Ok(r)
}

/// Refuses memory limits above the VM's memory, which cannot change.
pub fn check_memory(r: &Resources, vm_mib: u32) -> Result<()> {
    let vm = i64::from(vm_mib) << 20;
    for (name, v) in [("memory limit", r.memory.limit), ("memory reservation", r.memory.reservation)] {
        if let Some(v) = v.filter(|v| *v > vm) {
            return Err(Error::Usage(format!(
                "{name} of {v} bytes is above the container's VM memory ({vm_mib} MiB), which cannot change: \
                 create the container with a larger limit or the {} annotation",
                bundle::ANNOTATION_MEMORY
            )));
        }
    }
    Ok(())
}

/// The container, when its VM runs.
fn running(ctx: &Ctx, id: &str) -> Result<(PathBuf, State)> {
    let (dir, st) = ctx.root.find(id)?;
    match st.effective_status() {
        Status::Created | Status::Running => Ok((dir, st)),
        _ => Err(Error::State("container not running".into())),
    }
}

/// `update`: applies new limits to the container's cgroup in the guest.
pub fn update(ctx: &Ctx, args: &UpdateArgs) -> Result<i32> {
    let r = update_resources(args)?;
    if r.is_empty() {
        return Err(Error::Usage("nothing to update: give -r or a limit flag".into()));
    }
    update_limits(ctx, &args.id, &r)?;
    Ok(0)
}

/// Applies `r` to container `id`'s cgroup in the guest (and the VM's host
/// cgroup's share); limits the VM's fixed memory cannot hold are refused.
pub fn update_limits(ctx: &Ctx, id: &str, r: &Resources) -> Result<()> {
    let (dir, st) = running(ctx, id)?;
    let sp: SupervisorPlan = serde_json::from_slice(&std::fs::read(dir.join(state::PLAN_FILE)).map_err(io("reading plan.json"))?)
        .map_err(|e| Error::Bundle(format!("plan.json: {e}")))?;
    check_memory(r, sp.plan.mem_mib)?;
    // The VM's host cgroup, when it has one (`linux.cgroupsPath`), takes
    // its share first (CPU time and CPUs for the whole VM), as at create.
    let host = match crate::host_cgroup::of_plan(&sp.plan)? {
        Some((v2, dirs)) if !st.host_cgroups.is_empty() => {
            let vm = crate::host_cgroup::VmNeeds::for_vm(sp.plan.mem_mib, sp.plan.cpus);
            crate::host_cgroup::update(std::path::Path::new(crate::host_cgroup::CGROUP_ROOT), &dirs, v2, r, vm)?;
            true
        }
        _ => false,
    };
    let client = ops::connect(&st, &dir)?;
    let result = client.update(&st.guest_id, &crate::host_cgroup::guest_share(r, host)).map_err(ops::not_running);
    client.close();
    result
}

/// The statistics of container `id`'s cgroup in the guest.
pub fn stats(ctx: &Ctx, id: &str) -> Result<CgroupStats> {
    let (dir, st) = running(ctx, id)?;
    let client = ops::connect(&st, &dir)?;
    let result = client.stats(&st.guest_id).map_err(ops::not_running);
    client.close();
    result
}

/// runc's `events` stats object (`types.Stats`) for the guest cgroup's
/// statistics: CPU times in nanoseconds; an unlimited memory limit is
/// `u64::MAX` and an unlimited pids limit 0, as runc reports them; `swap`
/// is memory plus swap, as in cgroup v1 (the guest has no swap).
pub fn runc_stats(s: &CgroupStats) -> serde_json::Value {
    let m = &s.memory;
    let stat = |k: &str| m.stat.get(k).copied().unwrap_or(0);
    serde_json::json!({
        "cpu": {
            "usage": { "total": s.cpu.usage_usec * 1000, "kernel": s.cpu.system_usec * 1000, "user": s.cpu.user_usec * 1000 },
            "throttling": { "periods": s.cpu.nr_periods, "throttledPeriods": s.cpu.nr_throttled, "throttledTime": s.cpu.throttled_usec * 1000 }
        },
        "memory": {
            "cache": stat("file"),
            "usage": { "usage": m.current, "limit": m.max.unwrap_or(u64::MAX), "failcnt": m.events.max },
            "swap": { "usage": m.current + m.swap_current.unwrap_or(0), "limit": m.max.unwrap_or(u64::MAX), "failcnt": 0 },
            "kernel": { "usage": stat("kernel"), "limit": 0, "failcnt": 0 },
            "raw": m.stat
        },
        "pids": { "current": s.pids.current, "limit": s.pids.max.unwrap_or(0) }
    })
}

/// One event line: `{"type":..,"id":..,"data":..}`.
fn event(kind: &str, id: &str, data: serde_json::Value) -> String {
    serde_json::json!({ "type": kind, "id": id, "data": data }).to_string()
}

/// `events`: with `stats`, the container's statistics once; else a
/// statistics event every `interval` (and an `oom` event when the OOM
/// killer killed a process of it) until the container stops.
pub fn events(ctx: &Ctx, id: &str, stats: bool, interval: Duration) -> Result<i32> {
    let (dir, st) = running(ctx, id)?;
    let client = ops::connect(&st, &dir)?;
    let mut oom_kills = None;
    let result = loop {
        let s = match client.stats(&st.guest_id) {
            Ok(s) => s,
            // The container ended: so do its events.
            Err(_) if oom_kills.is_some() => break Ok(0),
            Err(e) => break Err(ops::not_running(e)),
        };
        if oom_kills.is_some_and(|n| s.memory.events.oom_kill > n) {
            println!("{}", event("oom", id, serde_json::Value::Null));
        }
        oom_kills = Some(s.memory.events.oom_kill);
        println!("{}", event("stats", id, runc_stats(&s)));
        if stats {
            break Ok(0);
        }
        std::thread::sleep(interval);
    };
    client.close();
    result
}

/// A duration as runc's `--interval` takes it: `5s`, `500ms`, `1m`.
pub fn parse_interval(s: &str) -> Result<Duration> {
    let bad = || Error::Usage(format!("invalid interval {s:?} (such as 5s, 500ms, 1m)"));
    let (num, unit) = s.find(|c: char| !c.is_ascii_digit()).map_or((s, "s"), |i| s.split_at(i));
    let n: u64 = num.parse().map_err(|_| bad())?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.saturating_mul(60)),
        _ => return Err(bad()),
    };
    if d.is_zero() {
        return Err(bad());
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use vmrun_agent_protocol::{MemoryStats, PidsStats};

    #[test]
    fn update_flags_and_resource_files() {
        let d = tempfile::tempdir().unwrap();
        let file = d.path().join("r.json");
        std::fs::write(&file, r#"{"memory":{"limit":1048576},"pids":{"limit":10},"cpu":{"shares":256}}"#).unwrap();
        let args = UpdateArgs {
            id: "c".into(),
            resources: Some(file),
            memory: Some("64m".into()),
            cpu_quota: Some(20_000),
            pids_limit: Some(-1),
            ..Default::default()
        };
        let r = update_resources(&args).unwrap();
        assert_eq!((r.memory.limit, r.pids.limit, r.cpu.shares, r.cpu.quota), (Some(64 << 20), Some(-1), Some(256), Some(20_000)), "flags win");
        assert_eq!(memory_bytes("memory", "-1").unwrap(), -1);
        assert_eq!(memory_bytes("memory", "1048576").unwrap(), 1 << 20);
        assert!(memory_bytes("memory", "lots").unwrap_err().to_string().contains("--memory"));
        let bad = UpdateArgs { resources: Some(d.path().join("missing.json")), ..Default::default() };
        assert!(update_resources(&bad).is_err());
    }

    #[test]
    fn memory_above_the_vm_is_refused() {
        let mut r = Resources::default();
        r.memory.limit = Some(256 << 20);
        check_memory(&r, 256).unwrap();
        r.memory.limit = Some((256 << 20) + 1);
        let e = check_memory(&r, 256).unwrap_err().to_string();
        assert!(e.contains("above the container's VM memory (256 MiB)"), "{e}");
        r.memory.limit = Some(-1);
        check_memory(&r, 256).unwrap();
    }

    #[test]
    fn stats_in_runcs_shape() {
        let mut s = CgroupStats::default();
        s.cpu.usage_usec = 7;
        s.cpu.user_usec = 5;
        s.cpu.system_usec = 2;
        s.memory = MemoryStats { current: 4096, max: Some(1 << 26), ..Default::default() };
        s.memory.stat.insert("file".into(), 100);
        s.pids = PidsStats { current: 3, max: None };
        let v = runc_stats(&s);
        assert_eq!(v["cpu"]["usage"], serde_json::json!({ "total": 7000, "kernel": 2000, "user": 5000 }));
        assert_eq!((v["memory"]["usage"]["usage"].as_u64(), v["memory"]["usage"]["limit"].as_u64()), (Some(4096), Some(1 << 26)));
        assert_eq!(v["memory"]["cache"], 100);
        assert_eq!(v["pids"], serde_json::json!({ "current": 3, "limit": 0 }));
        s.memory.max = None;
        assert_eq!(runc_stats(&s)["memory"]["usage"]["limit"].as_u64(), Some(u64::MAX));
        let line: serde_json::Value = serde_json::from_str(&event("stats", "c1", v)).unwrap();
        assert_eq!((line["type"].as_str(), line["id"].as_str()), (Some("stats"), Some("c1")));
    }

    #[test]
    fn intervals() {
        assert_eq!(parse_interval("5s").unwrap(), Duration::from_secs(5));
        assert_eq!(parse_interval("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_interval("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_interval("3").unwrap(), Duration::from_secs(3));
        for bad in ["", "0s", "5h", "x"] {
            assert!(parse_interval(bad).is_err(), "{bad}");
        }
    }
}
