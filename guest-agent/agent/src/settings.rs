//! The agent's settings: from the kernel command line in a guest, from
//! flags on a host.
//!
//! In a guest, parameters are `vmrun.KEY=VALUE` on the kernel command line
//! (read from `/proc/cmdline`), or `vmrun_KEY=VALUE`: the kernel hands
//! parameters without a dot to init as environment variables, which costs
//! the agent no system call at all, so a host that cares about boot time
//! uses those. When any `vmrun_*` variable is set, `/proc/cmdline` is not
//! read.
//!
//! | key | meaning | default |
//! | --- | --- | --- |
//! | `port` | vsock port to listen on | 1024 |
//! | `ip` | eth0's address, `A.B.C.D/PREFIX` (no eth0 without it) | none |
//! | `gw` | default gateway through eth0 | none |
//! | `root` | where container roots go | `/run/vmrun` |
//! | `log` | `debug` for more output | `info` |

use std::net::Ipv4Addr;
use std::path::PathBuf;

/// The default vsock port.
pub const DEFAULT_PORT: u32 = vmrun_agent_protocol::AGENT_PORT;
/// Where container roots go in a guest.
pub const DEFAULT_ROOT: &str = "/run/vmrun";

/// Where the agent listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    /// A vsock port (in a guest).
    Vsock(u32),
    /// A Unix socket (on a host).
    Unix(PathBuf),
}

/// eth0's configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NetConfig {
    /// Address.
    pub addr: Ipv4Addr,
    /// Prefix length.
    pub prefix: u8,
    /// Default gateway.
    pub gateway: Option<Ipv4Addr>,
}

/// Everything the agent is told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// Where to listen.
    pub listen: Listen,
    /// Where container roots go.
    pub root: PathBuf,
    /// Debug logging.
    pub debug: bool,
    /// eth0, when configured.
    pub net: Option<NetConfig>,
    /// Whether this is a guest's PID 1 (mounts, network, reboot at the end).
    pub guest: bool,
}

/// A bad setting.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct SettingsError(pub String);

pub fn parse_net(ip: &str, gw: Option<&str>) -> Result<NetConfig, SettingsError> {
    let bad = || SettingsError(format!("vmrun.ip={ip}: expected A.B.C.D/PREFIX"));
    let (a, p) = ip.split_once('/').ok_or_else(bad)?;
    let addr: Ipv4Addr = a.parse().map_err(|_| bad())?;
    let prefix: u8 = p.parse().ok().filter(|p| *p <= 32).ok_or_else(bad)?;
    let gateway = match gw {
        Some(g) => Some(g.parse().map_err(|_| SettingsError(format!("vmrun.gw={g}: not an IPv4 address")))?),
        None => None,
    };
    Ok(NetConfig { addr, prefix, gateway })
}

/// Settings of a guest from `key=value` pairs (the `vmrun.` or `vmrun_`
/// prefix already removed).
pub fn from_pairs<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Result<Settings, SettingsError> {
    let mut s = Settings { listen: Listen::Vsock(DEFAULT_PORT), root: DEFAULT_ROOT.into(), debug: false, net: None, guest: true };
    let (mut ip, mut gw) = (None, None);
    for (k, v) in pairs {
        match k {
            "port" => {
                let p = v.parse().map_err(|_| SettingsError(format!("vmrun.port={v}: not a port number")))?;
                s.listen = Listen::Vsock(p);
            }
            "ip" => ip = Some(v),
            "gw" => gw = Some(v),
            "root" => s.root = v.into(),
            "log" => s.debug = v == "debug",
            _ => {}
        }
    }
    if let Some(ip) = ip {
        s.net = Some(parse_net(ip, gw)?);
    } else if gw.is_some() {
        return Err(SettingsError("vmrun.gw without vmrun.ip".into()));
    }
    Ok(s)
}

/// `vmrun_KEY=VALUE` pairs from the environment.
pub fn env_pairs(env: &[(String, String)]) -> Vec<(&str, &str)> {
    env.iter().filter_map(|(k, v)| k.strip_prefix("vmrun_").map(|k| (k, v.as_str()))).collect()
}

/// `vmrun.KEY=VALUE` pairs from a kernel command line.
pub fn cmdline_pairs(cmdline: &str) -> Vec<(&str, &str)> {
    cmdline
        .split_ascii_whitespace()
        .filter_map(|w| w.strip_prefix("vmrun.").and_then(|kv| kv.split_once('=')))
        .collect()
}

/// Settings from the agent's own command line (on a host). `None` when the
/// arguments ask for the guest mode (no arguments).
pub fn from_args(args: &[String]) -> Result<Option<Settings>, SettingsError> {
    if args.is_empty() {
        return Ok(None);
    }
    let mut listen = None;
    let mut root = None;
    let mut debug = false;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = |name: &str| it.next().cloned().ok_or_else(|| SettingsError(format!("{name} needs a value")));
        match a.as_str() {
            "--listen-unix" => listen = Some(Listen::Unix(value("--listen-unix")?.into())),
            "--listen-vsock" => {
                let v = value("--listen-vsock")?;
                listen = Some(Listen::Vsock(v.parse().map_err(|_| SettingsError(format!("bad port {v}")))?));
            }
            "--root" => root = Some(PathBuf::from(value("--root")?)),
            "--debug" => debug = true,
            other => return Err(SettingsError(format!("unknown argument {other:?}\n{USAGE}"))),
        }
    }
    let listen = listen.ok_or_else(|| SettingsError(format!("--listen-unix or --listen-vsock is required\n{USAGE}")))?;
    let root = root.ok_or_else(|| SettingsError(format!("--root is required\n{USAGE}")))?;
    Ok(Some(Settings { listen, root, debug, net: None, guest: false }))
}

/// Usage of the host mode.
pub const USAGE: &str = "usage: vmrun-agent                      (as a guest's PID 1; settings from the kernel command line)
       vmrun-agent --listen-unix PATH --root DIR [--debug]   (on a host, as root)";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_command_line() {
        let c = "console=ttyS0 reboot=k vmrun.port=2000 vmrun.ip=10.0.0.2/24 vmrun.gw=10.0.0.1 vmrun.log=debug quiet";
        let s = from_pairs(cmdline_pairs(c)).unwrap();
        assert_eq!(s.listen, Listen::Vsock(2000));
        assert!(s.debug && s.guest);
        assert_eq!(s.net, Some(NetConfig { addr: Ipv4Addr::new(10, 0, 0, 2), prefix: 24, gateway: Some(Ipv4Addr::new(10, 0, 0, 1)) }));
        let d = from_pairs(cmdline_pairs("console=ttyS0")).unwrap();
        assert_eq!((d.listen, d.root, d.net), (Listen::Vsock(DEFAULT_PORT), PathBuf::from(DEFAULT_ROOT), None));
    }

    #[test]
    fn environment() {
        let env = vec![("vmrun_port".to_string(), "77".to_string()), ("HOME".into(), "/".into())];
        assert_eq!(from_pairs(env_pairs(&env)).unwrap().listen, Listen::Vsock(77));
    }

    #[test]
    fn bad_values_are_refused() {
        for c in ["vmrun.port=x", "vmrun.ip=10.0.0.2", "vmrun.ip=10.0.0.2/33", "vmrun.ip=1.2.3.4/8 vmrun.gw=nope", "vmrun.gw=1.1.1.1"] {
            assert!(from_pairs(cmdline_pairs(c)).is_err(), "{c}");
        }
    }

    #[test]
    fn host_flags() {
        let a = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let s = from_args(&a(&["--listen-unix", "/tmp/s", "--root", "/tmp/r"])).unwrap().unwrap();
        assert_eq!(s.listen, Listen::Unix("/tmp/s".into()));
        assert!(!s.guest);
        assert!(from_args(&[]).unwrap().is_none());
        assert!(from_args(&a(&["--root", "/x"])).is_err());
        assert!(from_args(&a(&["--bogus"])).is_err());
    }
}
