//! A container's network: `nat` (the default as root), `tap`, `none`.
//!
//! Each container with a network gets a TAP device `vmrun-<id>` on the
//! host and a point-to-point /30 out of `10.213.0.0/16`: the host end is
//! `.1`, the guest's `eth0` is `.2` with the host as its gateway. Subnets
//! are allocated host-wide ([`allocate`]): under one lock for the whole
//! host, skipping every /30 that an address on any of the host's
//! interfaces covers, whoever put it there (another data directory's
//! containers, a TAP device left by a killed run, the host's own
//! networks). The agent is told the address after the VM starts (a VM
//! restored from a template has no address of its own), and on the NAT
//! network the host's name servers.
//!
//! Links are made through rtnetlink ([`netlink`]), not by running `ip`.
//! What the host's kernel does for them is in one nftables table, `ip
//! vmrun` ([`nat`]), made when the first link that needs it appears and
//! deleted with the last: on the NAT network a container's outbound
//! traffic is masqueraded behind whichever interface it leaves by; a
//! `tap` container starts no connection beyond its host end. `-p
//! HOST:GUEST[/tcp|/udp]` is a DNAT rule for the host's own addresses,
//! for connections from other hosts (prerouting) and from this one
//! (output, `127.0.0.1` included: the TAP device gets `route_localnet`,
//! and the table drops loopback addresses coming from a container); no
//! process of vmrun carries the traffic. IPv4 forwarding is turned on when
//! a link needs the table (and left on, with a warning that says so).

pub mod nat;
pub mod netlink;
pub mod pod;

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Subnets handed out: `10.213.0.0/16` in /30s.
const SUBNETS: u32 = 1 << 14;

/// Every container link's name starts with this.
pub const TAP_PREFIX: &str = "vmrun-";

/// A container's network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// No interface: only the host's vsock link to the agent.
    None,
    /// Its own link to the host and nothing beyond.
    Tap,
    /// Its own link, outbound traffic masqueraded (docker's bridge network
    /// does the same for its containers).
    Nat,
}

impl Mode {
    /// Without `--network`: NAT for root, none otherwise (links and rules
    /// need CAP_NET_ADMIN).
    pub fn default_here() -> Self {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            Mode::Nat
        } else {
            Mode::None
        }
    }
}

impl std::str::FromStr for Mode {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "none" => Ok(Mode::None),
            "tap" => Ok(Mode::Tap),
            "nat" | "bridge" => Ok(Mode::Nat),
            _ => Err(Error::Network(format!("unknown network {s:?} (use nat, bridge, tap or none)"))),
        }
    }
}

/// A container's link.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Link {
    /// The host's TAP device.
    pub tap: String,
    pub host: Ipv4Addr,
    pub guest: Ipv4Addr,
}

impl Link {
    /// The link with subnet number `index` for container `id`.
    pub fn new(id: &str, index: u32) -> Self {
        let base = u32::from(Ipv4Addr::new(10, 213, 0, 0)) + (index % SUBNETS) * 4;
        let short: String = id.chars().take(9).collect();
        Self { tap: format!("{TAP_PREFIX}{short}"), host: Ipv4Addr::from(base + 1), guest: Ipv4Addr::from(base + 2) }
    }

    /// The subnet number of a guest address of ours.
    pub fn index_of(guest: &str) -> Option<u32> {
        let a: Ipv4Addr = guest.split('/').next()?.parse().ok()?;
        let off = u32::from(a).checked_sub(u32::from(Ipv4Addr::new(10, 213, 0, 0)))?;
        (off < SUBNETS * 4).then_some(off / 4)
    }

    /// What the agent is told (`nameservers` for the container's
    /// `/etc/resolv.conf`).
    pub fn guest_config(&self, nameservers: &[Ipv4Addr]) -> vmrun_agent_protocol::NetworkConfig {
        vmrun_agent_protocol::NetworkConfig {
            interface: "eth0".into(),
            address: format!("{}/30", self.guest),
            gateway: Some(self.host.to_string()),
            nameservers: nameservers.iter().map(Ipv4Addr::to_string).collect(),
            mac: None,
            mtu: None,
            routes: Vec::new(),
        }
    }

    /// Creates the TAP device with the host's address, up.
    fn create(&self, nl: &mut netlink::Rtnl) -> Result<()> {
        let fail = |what: &str, e: std::io::Error| Error::Network(format!("{what} {}: {e} (a container network needs root or CAP_NET_ADMIN)", self.tap));
        netlink::create_tap(&self.tap).map_err(|e| fail("cannot create TAP device", e))?;
        let up = nl.link(&self.tap).and_then(|l| {
            let l = l.ok_or_else(|| std::io::Error::from(std::io::ErrorKind::NotFound))?;
            nl.add_ipv4(l.index, self.host, 30)?;
            nl.set_up(l.index)
        });
        if let Err(e) = up {
            delete_link(nl, &self.tap);
            return Err(fail("cannot configure", e));
        }
        Ok(())
    }

    /// Removes the TAP device and its rules (see [`release`]).
    pub fn delete(&self) {
        release(&self.tap);
    }
}

/// Deletes link `name` if it exists; failures are logged.
fn delete_link(nl: &mut netlink::Rtnl, name: &str) {
    match nl.link(name) {
        Ok(Some(l)) => {
            if let Err(e) = nl.delete(l.index) {
                log::warn!("cannot delete network interface {name}: {e}");
            }
        }
        Ok(None) => {}
        Err(e) => log::warn!("cannot list the host's network interfaces: {e}"),
    }
}

/// The names of the container links on the host now.
fn taps_present(nl: &mut netlink::Rtnl) -> Result<BTreeSet<String>> {
    let links = nl.links().map_err(|e| Error::Network(format!("cannot list the host's network interfaces: {e}")))?;
    Ok(links.into_iter().map(|l| l.name).filter(|n| n.starts_with(TAP_PREFIX)).collect())
}

/// Removes a container's TAP device (nothing if it is gone already) and
/// its record, and brings the host's rules in line with the links left
/// (the table goes with the last one). Failures are logged.
pub fn release(tap: &str) {
    let result = (|| -> Result<()> {
        let _lock = host_lock()?;
        let mut nl = netlink::Rtnl::open()?;
        delete_link(&mut nl, tap);
        nat::Record::remove(tap);
        let present = taps_present(&mut nl)?;
        nat::apply(&nat::live_records(&present))
    })();
    if let Err(e) = result {
        log::warn!("releasing network interface {tap}: {e}");
    }
}

/// Brings the host's rules in line with the container links present:
/// records of links that are gone are dropped (`vmrun system prune`).
pub fn sync() -> Result<()> {
    if !Path::new(nat::RECORDS).exists() {
        return Ok(());
    }
    let _lock = host_lock()?;
    let mut nl = netlink::Rtnl::open()?;
    let present = taps_present(&mut nl)?;
    nat::apply(&nat::live_records(&present))
}

/// The first subnet number not in `used`.
pub fn free_index(used: &[u32]) -> Result<u32> {
    (0..SUBNETS).find(|i| !used.contains(i)).ok_or_else(|| Error::Network("no free container subnet left in 10.213.0.0/16".into()))
}

/// The lock that serialises subnet allocation and the host's rules on the
/// whole host (every data directory's `vmrun`s take it).
pub const HOST_LOCK: &str = "/run/vmrun/network.lock";

fn host_lock() -> Result<crate::lock::Lock> {
    let lock_path = Path::new(HOST_LOCK);
    if let Some(dir) = lock_path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::Network(format!("cannot make {}: {e} (a container network needs root)", dir.display())))?;
    }
    Ok(crate::lock::Lock::take(lock_path)?)
}

/// What a container's link is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Setup {
    /// Masquerade its outbound traffic.
    pub nat: bool,
    /// Its published ports.
    pub ports: Vec<PortMap>,
}

/// Allocates a subnet and creates container `id`'s link on it with the
/// host's rules for it, holding the host-wide lock from the choice until
/// the TAP device has its address (from then on the address itself marks
/// the subnet as taken) and the rules are in place. `also_used`: subnets
/// recorded for containers that have not made their link yet or are being
/// restarted.
pub fn allocate(id: &str, also_used: &[u32], setup: &Setup) -> Result<Link> {
    let _lock = host_lock()?;
    let mut nl = netlink::Rtnl::open()?;
    let mut records = nat::live_records(&taps_present(&mut nl)?);
    nat::check_ports(&setup.ports, &records)?;
    let mut used = host_used_indexes_with(&mut nl)?;
    used.extend_from_slice(also_used);
    let link = Link::new(id, free_index(&used)?);
    link.create(&mut nl)?;
    let record = nat::Record { tap: link.tap.clone(), guest: link.guest, nat: setup.nat, ports: setup.ports.clone() };
    records.push(record.clone());
    let ruled = (|| {
        if !setup.ports.is_empty() {
            nat::route_localnet(&link.tap)?;
        }
        record.save()?;
        nat::apply(&records)
    })();
    if let Err(e) = ruled {
        delete_link(&mut nl, &link.tap);
        nat::Record::remove(&link.tap);
        records.pop();
        if let Err(e) = nat::apply(&records) {
            log::warn!("{e}");
        }
        return Err(e);
    }
    Ok(link)
}

/// The subnet numbers that an IPv4 address on any of the host's
/// interfaces covers (its address with its netmask).
pub fn host_used_indexes() -> Result<Vec<u32>> {
    host_used_indexes_with(&mut netlink::Rtnl::open()?)
}

fn host_used_indexes_with(nl: &mut netlink::Rtnl) -> Result<Vec<u32>> {
    let addrs = nl.ipv4_addresses().map_err(|e| Error::Network(format!("cannot list the host's addresses: {e}")))?;
    let mut used = Vec::new();
    for (addr, prefix) in addrs {
        used.extend(indexes_covered(addr, prefix));
    }
    used.sort_unstable();
    used.dedup();
    Ok(used)
}

/// The subnet numbers of ours that `addr`/`prefix` overlaps.
fn indexes_covered(addr: Ipv4Addr, prefix: u8) -> std::ops::Range<u32> {
    let ours = u32::from(Ipv4Addr::new(10, 213, 0, 0));
    let mask = vmrun_agent_protocol::ipv4_netmask(prefix);
    let addr = u32::from(addr);
    let first = addr & mask;
    let last = first | !mask;
    let (lo, hi) = (first.max(ours), last.min(ours + SUBNETS * 4 - 1));
    if lo > hi {
        return 0..0;
    }
    (lo - ours) / 4..(hi - ours) / 4 + 1
}

/// A published port's protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    Tcp,
    Udp,
}

impl std::fmt::Display for Proto {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        })
    }
}

/// One `-p` option: `HOST:GUEST`, `HOST:GUEST/tcp` or `HOST:GUEST/udp`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortMap {
    pub host: u16,
    pub guest: u16,
    pub proto: Proto,
}

impl std::str::FromStr for PortMap {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let bad = |why: &str| Error::Network(format!("invalid port mapping {s:?}: {why} (use -p HOST:GUEST[/tcp|/udp])"));
        let (body, proto) = match s.split_once('/') {
            Some((b, "tcp")) => (b, Proto::Tcp),
            Some((b, "udp")) => (b, Proto::Udp),
            Some(_) => return Err(bad("the protocol is tcp or udp")),
            None => (s, Proto::Tcp),
        };
        let (h, g) = body.split_once(':').ok_or_else(|| bad("expected HOST:GUEST"))?;
        let port = |p: &str| p.parse::<u16>().ok().filter(|p| *p > 0).ok_or_else(|| bad("ports are 1 to 65535"));
        Ok(Self { host: port(h)?, guest: port(g)?, proto })
    }
}

impl std::fmt::Display for PortMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}/{}", self.host, self.guest, self.proto)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn links_are_disjoint_slash_30s() {
        let a = Link::new("0123456789ab", 0);
        assert_eq!((a.tap.as_str(), a.host, a.guest), ("vmrun-012345678", Ipv4Addr::new(10, 213, 0, 1), Ipv4Addr::new(10, 213, 0, 2)));
        assert!(a.tap.len() < 16, "interface names are at most 15 bytes");
        let b = Link::new("x", 65);
        assert_eq!(b.guest, Ipv4Addr::new(10, 213, 1, 6));
        assert_eq!(Link::index_of(&b.guest.to_string()), Some(65));
        assert_eq!(Link::index_of("10.213.1.6/30"), Some(65));
        assert_eq!(Link::index_of("192.168.0.1"), None);
        assert_eq!(free_index(&[0, 1, 3]).unwrap(), 2);
        let c = a.guest_config(&[Ipv4Addr::new(192, 0, 2, 53)]);
        assert_eq!((c.address.as_str(), c.gateway.as_deref()), ("10.213.0.2/30", Some("10.213.0.1")));
        assert_eq!(c.nameservers, ["192.0.2.53"]);
        assert_eq!(["nat", "bridge", "tap", "none"].map(|m| m.parse::<Mode>().unwrap()), [Mode::Nat, Mode::Nat, Mode::Tap, Mode::None]);
        assert!("host".parse::<Mode>().is_err());
    }

    #[test]
    fn addresses_on_the_host_take_the_subnets_they_cover() {
        let a = |s: &str| s.parse::<Ipv4Addr>().unwrap();
        assert_eq!(indexes_covered(a("10.213.0.1"), 30), 0..1);
        assert_eq!(indexes_covered(a("10.213.1.6"), 30), 65..66);
        // A host network over part of ours takes all it covers.
        assert_eq!(indexes_covered(a("10.213.2.9"), 24), 128..192);
        assert_eq!(indexes_covered(a("10.0.0.1"), 8), 0..SUBNETS);
        assert_eq!(indexes_covered(a("192.168.1.1"), 24), 0..0);
        assert_eq!(indexes_covered(a("10.212.255.255"), 32), 0..0);
        assert_eq!(indexes_covered(a("10.213.0.9"), 32), 2..3);
        assert_eq!(indexes_covered(a("1.2.3.4"), 0), 0..SUBNETS);
    }

    #[test]
    fn a_subnet_in_use_by_another_data_directory_is_not_handed_out() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: needs root for a dummy interface");
            return;
        }
        // As another data directory's container (or a TAP left by a run
        // killed with SIGKILL) holds them: a TAP device with the host ends
        // of the first three /30s.
        // Done under the host lock, so that no vmrun allocates meanwhile.
        std::fs::create_dir_all("/run/vmrun").unwrap();
        let lock = crate::lock::Lock::take(Path::new(HOST_LOCK)).unwrap();
        let name = format!("vmrunt{}", std::process::id() % 100_000);
        netlink::create_tap(&name).unwrap();
        let mut nl = netlink::Rtnl::open().unwrap();
        let index = nl.link(&name).unwrap().unwrap().index;
        let taken: Vec<u32> = (0..3).collect();
        for i in &taken {
            nl.add_ipv4(index, Link::new("x", *i).host, 30).unwrap();
        }
        let used = host_used_indexes();
        drop(lock);
        nl.delete(index).unwrap();
        let used = used.unwrap();
        assert!(taken.iter().all(|i| used.contains(i)), "{used:?}");
        assert!(free_index(&used).unwrap() >= 3);
    }

    #[test]
    fn port_maps() {
        let p = |s: &str| s.parse::<PortMap>().unwrap();
        assert_eq!(p("8080:80"), PortMap { host: 8080, guest: 80, proto: Proto::Tcp });
        assert_eq!(p("1:2/tcp").to_string(), "1:2/tcp");
        assert_eq!(p("53:5353/udp"), PortMap { host: 53, guest: 5353, proto: Proto::Udp });
        assert_eq!(p(&p("53:5353/udp").to_string()), p("53:5353/udp"));
        for bad in ["80", "0:80", "80:70000", "80:80/sctp", "a:b", ""] {
            assert!(bad.parse::<PortMap>().is_err(), "{bad:?}");
        }
    }
}
