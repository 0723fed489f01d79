//! The command line's own front for devices: `vmrun boot --disk
//! PATH,ro,bw=...`, `--net tap=...`, `--vsock cid=...` and sizes are
//! parsed here into the VMM API's typed values. Nothing else parses or
//! formats device strings: the runtime and the VMM exchange the typed
//! configuration.

use std::path::PathBuf;

use vmrun_vmm::config::{DiskConfig, Mac, NetConfig, RateLimit, VsockConfig};

/// Parses a byte count (`vmrun_runtime::size`: `4096`, `512k`, `10m`,
/// `1g`).
pub fn parse_size(s: &str) -> Result<u64, String> {
    vmrun_runtime::size::bytes(s).map_err(|e| e.to_string())
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

/// `--disk PATH[,ro][,id=NAME][,bw=BYTES][,iops=N]`.
pub fn parse_disk(s: &str) -> Result<DiskConfig, String> {
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

/// `--net tap=NAME[,mac=MAC][,bw=BYTES][,rx_bw=BYTES][,tx_bw=BYTES][,iops=N]`:
/// `bw` limits each direction to that rate (receive and transmit
/// separately, not their sum); `rx_bw`/`tx_bw` set one direction and take
/// precedence over `bw`; `iops` limits frames per second, in each
/// direction.
pub fn parse_net(s: &str) -> Result<NetConfig, String> {
    let (mut tap, mut mac) = (None, None);
    let (mut bw, mut rx_bw, mut tx_bw, mut iops) = (None, None, None, None);
    for opt in s.split(',') {
        match opt.split_once('=') {
            Some(("tap", v)) if !v.is_empty() => tap = Some(v.to_string()),
            Some(("mac", v)) => mac = Some(v.parse::<Mac>().map_err(|e| e.to_string())?),
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

/// `--vsock cid=N,uds=PATH`.
pub fn parse_vsock(s: &str) -> Result<VsockConfig, String> {
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use vmrun_vmm::config::rate_limit;

    #[test]
    fn disk_options() {
        let d = parse_disk("/img/a.raw,ro,id=layers").unwrap();
        assert_eq!(
            d,
            DiskConfig { path: "/img/a.raw".into(), read_only: true, id: Some("layers".into()), limit: RateLimit::default() }
        );
        let d = parse_disk("b.raw").unwrap();
        assert!(!d.read_only && d.id.is_none());
        assert!(parse_disk("").is_err());
        assert!(parse_disk("a,bogus").is_err());
        assert!(parse_disk("a,id=").is_err());
        assert!(parse_disk("a,id=123456789012345678901").is_err());
    }

    #[test]
    fn vsock_options() {
        let v = parse_vsock("cid=3,uds=/run/v.sock").unwrap();
        assert_eq!(v, VsockConfig { cid: 3, uds: "/run/v.sock".into() });
        assert!(parse_vsock("cid=2,uds=/x").is_err(), "CID 2 is the host");
        assert!(parse_vsock("cid=3").is_err());
        assert!(parse_vsock("uds=/x").is_err());
        assert!(parse_vsock("cid=x,uds=/x").is_err());
    }

    #[test]
    fn net_options() {
        let n = parse_net("tap=vmtap0,mac=06:00:ac:10:00:02").unwrap();
        assert_eq!(n.tap, "vmtap0");
        assert_eq!(n.mac().to_string(), "06:00:ac:10:00:02");
        let n = parse_net("tap=vmtap1").unwrap();
        let m = n.mac();
        assert_eq!(m.0[0], 0x06, "locally administered unicast");
        assert_eq!(m, parse_net("tap=vmtap1").unwrap().mac(), "stable");
        assert_ne!(m, parse_net("tap=vmtap2").unwrap().mac());
        assert!(parse_net("mac=06:00:ac:10:00:02").is_err());
        assert!(parse_net("tap=x,mac=zz").is_err());
        assert!(parse_net("tap=x,speed=10").is_err());
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
        assert_eq!(parse_size("10mb"), Ok(10 << 20));
        for bad in ["", "k", "10x", "1.5m", "-1", " 10", "1 m", "0x10"] {
            let e = parse_size(bad).unwrap_err();
            assert!(e.contains("invalid size"), "{bad}: {e}");
        }
        assert!(parse_size("99999999999999999999").unwrap_err().contains("too large"));
        assert!(parse_size("17179869184g").unwrap_err().contains("too large"));
    }

    #[test]
    fn disk_rate_limits() {
        let d = parse_disk("a.raw,bw=10m,iops=500").unwrap();
        assert_eq!(d.limit, RateLimit { bytes_per_sec: Some(10 << 20), ops_per_sec: Some(500) });
        let c = rate_limit(&d.limit);
        assert_eq!(c.bandwidth.unwrap().size, 10 << 20);
        assert_eq!(c.bandwidth.unwrap().refill_time, std::time::Duration::from_secs(1));
        assert_eq!(c.ops.unwrap().size, 500);
        let d = parse_disk("a.raw,ro,bw=1048576").unwrap();
        assert_eq!(d.limit, RateLimit { bytes_per_sec: Some(1 << 20), ops_per_sec: None });
        assert!(d.read_only);
        assert!(rate_limit(&DiskConfig::new("a").limit).is_unlimited());
        let err = |s: &str| parse_disk(s).unwrap_err();
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
        let n = parse_net("tap=t0,bw=10m").unwrap();
        let ten = RateLimit { bytes_per_sec: Some(10 << 20), ops_per_sec: None };
        assert_eq!((n.rx_limit, n.tx_limit), (ten, ten), "bw is each direction's");
        let n = parse_net("tap=t0,rx_bw=1m,tx_bw=2m,iops=1000").unwrap();
        assert_eq!(n.rx_limit, RateLimit { bytes_per_sec: Some(1 << 20), ops_per_sec: Some(1000) });
        assert_eq!(n.tx_limit, RateLimit { bytes_per_sec: Some(2 << 20), ops_per_sec: Some(1000) });
        // A direction's own key wins over bw, in any order.
        let n = parse_net("tap=t0,tx_bw=1k,bw=5m").unwrap();
        assert_eq!(n.tx_limit.bytes_per_sec, Some(1024));
        assert_eq!(n.rx_limit.bytes_per_sec, Some(5 << 20));
        let n = parse_net("tap=t0,rx_bw=3k").unwrap();
        assert_eq!(n.tx_limit, RateLimit::default());
        let err = |s: &str| parse_net(s).unwrap_err();
        assert!(err("tap=t0,rx_bw=lots").contains("rx_bw: invalid size"));
        assert!(err("tap=t0,tx_bw=0").contains("tx_bw=0"));
        assert!(err("tap=t0,iops=x").contains("iops: invalid count"));
        assert!(err("tap=t0,rate=1").contains("unknown network option"));
    }
}
