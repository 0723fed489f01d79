//! The task API's typed payloads: a guest cgroup's statistics as
//! containerd's cgroup metrics (`io.containerd.cgroups.v1.Metrics`, the
//! format of the task API's version 2, which containerd's CRI turns into
//! container stats: working set = usage - total_inactive_file), and the
//! resources of an `Update` (the runtime spec's `LinuxResources`, which
//! containerd sends as JSON).

use containerd_shim::protos::cgroups::metrics::{
    CPUStat, CPUUsage, MemoryEntry, MemoryOomControl, MemoryStat, Metrics, PidsStat, Throttle,
};
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::{Message, MessageField};
use vmrun_agent_protocol::{CgroupStats, Resources};

use crate::error::{Error, Result};

/// The type URL containerd reads cgroup metrics by.
pub const METRICS: &str = "io.containerd.cgroups.v1.Metrics";

/// `s` (cgroup v2's files in the guest) in containerd's cgroup metrics,
/// as containerd's own shim fills them from cgroup v1: CPU times in
/// nanoseconds; `cache` is v2's `file`, `rss` its `anon`; an unlimited
/// memory limit is `u64::MAX`, an unlimited pids limit 0.
pub fn metrics(s: &CgroupStats) -> Metrics {
    let m = &s.memory;
    let stat = |k: &str| m.stat.get(k).copied().unwrap_or(0);
    let limit = m.max.unwrap_or(u64::MAX);
    Metrics {
        pids: MessageField::some(PidsStat {
            current: s.pids.current,
            limit: s.pids.max.unwrap_or(0),
            ..Default::default()
        }),
        cpu: MessageField::some(CPUStat {
            usage: MessageField::some(CPUUsage {
                total: s.cpu.usage_usec * 1000,
                kernel: s.cpu.system_usec * 1000,
                user: s.cpu.user_usec * 1000,
                ..Default::default()
            }),
            throttling: MessageField::some(Throttle {
                periods: s.cpu.nr_periods,
                throttled_periods: s.cpu.nr_throttled,
                throttled_time: s.cpu.throttled_usec * 1000,
                ..Default::default()
            }),
            ..Default::default()
        }),
        memory: MessageField::some(MemoryStat {
            cache: stat("file"),
            rss: stat("anon"),
            rss_huge: stat("anon_thp"),
            mapped_file: stat("file_mapped"),
            dirty: stat("file_dirty"),
            writeback: stat("file_writeback"),
            pg_fault: stat("pgfault"),
            pg_maj_fault: stat("pgmajfault"),
            inactive_anon: stat("inactive_anon"),
            active_anon: stat("active_anon"),
            inactive_file: stat("inactive_file"),
            active_file: stat("active_file"),
            unevictable: stat("unevictable"),
            hierarchical_memory_limit: limit,
            total_cache: stat("file"),
            total_rss: stat("anon"),
            total_mapped_file: stat("file_mapped"),
            total_pg_fault: stat("pgfault"),
            total_pg_maj_fault: stat("pgmajfault"),
            total_inactive_anon: stat("inactive_anon"),
            total_active_anon: stat("active_anon"),
            total_inactive_file: stat("inactive_file"),
            total_active_file: stat("active_file"),
            total_unevictable: stat("unevictable"),
            usage: MessageField::some(MemoryEntry {
                usage: m.current,
                limit,
                failcnt: m.events.max,
                ..Default::default()
            }),
            swap: MessageField::some(MemoryEntry {
                usage: m.current + m.swap_current.unwrap_or(0),
                limit,
                ..Default::default()
            }),
            kernel: MessageField::some(MemoryEntry {
                usage: stat("kernel"),
                ..Default::default()
            }),
            ..Default::default()
        }),
        memory_oom_control: MessageField::some(MemoryOomControl {
            oom_kill: m.events.oom_kill,
            under_oom: 0,
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// [`metrics`] packed for a `Stats` reply.
pub fn metrics_any(s: &CgroupStats) -> Result<Any> {
    let value = metrics(s)
        .write_to_bytes()
        .map_err(|e| Error::State(format!("encoding the metrics: {e}")))?;
    Ok(Any {
        type_url: METRICS.into(),
        value,
        ..Default::default()
    })
}

/// An `Update`'s resources: the runtime spec's `LinuxResources` in JSON.
pub fn resources(any: &Any) -> Result<Resources> {
    if !any.type_url.ends_with("LinuxResources") {
        return Err(Error::Usage(format!(
            "update: resources of type {:?}, not the runtime spec's LinuxResources",
            any.type_url
        )));
    }
    let r: oci_spec::runtime::LinuxResources = serde_json::from_slice(&any.value)
        .map_err(|e| Error::Usage(format!("update: invalid LinuxResources: {e}")))?;
    Ok(crate::bundle::resources(&r))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn guest_statistics_become_containerds_metrics() {
        let mut s = CgroupStats::default();
        s.cpu.usage_usec = 1500;
        s.memory.current = 8 << 20;
        s.memory.stat.insert("inactive_file".into(), 1 << 20);
        s.memory.events.oom_kill = 2;
        s.pids.current = 3;
        let any = metrics_any(&s).unwrap();
        assert_eq!(any.type_url, METRICS);
        let m = Metrics::parse_from_bytes(&any.value).unwrap();
        assert_eq!(m.cpu.usage.total, 1_500_000, "nanoseconds");
        assert_eq!(m.memory.usage.usage, 8 << 20);
        assert_eq!(
            m.memory.total_inactive_file,
            1 << 20,
            "what the CRI takes off the usage for the working set"
        );
        assert_eq!(m.memory.usage.limit, u64::MAX, "no limit");
        assert_eq!(m.memory_oom_control.oom_kill, 2);
        assert_eq!((m.pids.current, m.pids.limit), (3, 0));
    }

    #[test]
    fn update_resources_are_the_specs_in_json() {
        let json = serde_json::json!({ "memory": { "limit": 64 << 20 }, "cpu": { "shares": 512 } });
        let any = Any {
            type_url: "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources".into(),
            value: json.to_string().into_bytes(),
            ..Default::default()
        };
        let r = resources(&any).unwrap();
        assert_eq!(r.memory.limit, Some(64 << 20));
        assert_eq!(r.cpu.shares, Some(512));
        assert!(resources(&Any {
            type_url: "other".into(),
            ..Default::default()
        })
        .is_err());
        assert!(resources(&Any {
            type_url: any.type_url.clone(),
            value: b"{".to_vec(),
            ..Default::default()
        })
        .is_err());
    }
}
