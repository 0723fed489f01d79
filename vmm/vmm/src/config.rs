//! What a VM is made of: the VMM API's types ([`vmrun_vmm_api::config`]),
//! which the CLI, the runtime and the `vmrun-vmm` binary share, and their
//! conversion to the device crate's forms.

pub use vmrun_vmm_api::config::{
    ConsoleOutput, DiskConfig, HostCompatMode, Mac, MacError, NetConfig, ProcessOptions, RateLimit, RestoreConfig,
    RestoreDisk, RestoreNet, SeccompMode, Start, VmConfig, VmmConfig, VsockConfig, DEFAULT_CMDLINE, DEFAULT_CONSOLE_LIMIT,
};
use vmrun_devices::rate_limiter::RateLimitConfig;

/// The device crate's form of a rate limit.
pub fn rate_limit(limit: &RateLimit) -> RateLimitConfig {
    RateLimitConfig::per_second(limit.bytes_per_sec, limit.ops_per_sec)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limits_become_one_second_buckets() {
        let c = rate_limit(&RateLimit { bytes_per_sec: Some(10 << 20), ops_per_sec: Some(500) });
        assert_eq!(c.bandwidth.map(|b| b.size), Some(10 << 20));
        assert_eq!(c.bandwidth.map(|b| b.refill_time), Some(std::time::Duration::from_secs(1)));
        assert_eq!(c.ops.map(|b| b.size), Some(500));
        assert!(rate_limit(&RateLimit::default()).is_unlimited());
    }
}
