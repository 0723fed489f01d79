//! A VM on a pod's network: the interface that CNI (or whoever made the
//! network namespace) set up is mirrored to the VM, as Kata's `tcfilter`
//! model does.
//!
//! In the network namespace, next to the pod's interface (a veth holding
//! the pod's address), a TAP device [`TAP`] is made for the VMM, and two
//! tc filters redirect every frame arriving on one of them out of the
//! other. The guest's `eth0` then takes the interface's MAC address,
//! address, routes and MTU ([`PodLink::guest_config`]), so that the pod's
//! address answers from inside the VM. Nothing outside the namespace is
//! touched, and nothing in it but the TAP device and the ingress queueing
//! discipline on the pod's interface, both removed by [`detach`].
//!
//! The work is done on a thread of its own that enters the namespace
//! (network namespaces are per thread), so the caller stays where it is.

use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::netlink::{self, Rtnl};
use crate::{Error, Result};

/// The TAP device in a pod's network namespace (one VM per namespace).
pub const TAP: &str = "tap0_vmrun";

/// What a VM attached to a namespace's interface needs to know, and what
/// [`detach`] undoes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodLink {
    /// The network namespace (a path to its file).
    pub netns: PathBuf,
    /// The pod's interface whose traffic is mirrored.
    pub interface: String,
    pub mac: [u8; 6],
    pub mtu: u32,
    pub address: Ipv4Addr,
    pub prefix: u8,
    pub gateway: Option<Ipv4Addr>,
    /// The other routes through the interface.
    pub routes: Vec<PodRoute>,
}

/// A route through the pod's interface.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodRoute {
    pub destination: Ipv4Addr,
    pub prefix: u8,
    pub gateway: Option<Ipv4Addr>,
}

/// A link and its IPv4 addresses with their prefix lengths.
type Addressed = (netlink::LinkDetails, Vec<(Ipv4Addr, u8)>);

impl PodLink {
    /// What the agent is told: `eth0` becomes the pod's interface.
    pub fn guest_config(&self) -> vmrun_agent_protocol::NetworkConfig {
        vmrun_agent_protocol::NetworkConfig {
            interface: "eth0".into(),
            address: format!("{}/{}", self.address, self.prefix),
            gateway: self.gateway.map(|g| g.to_string()),
            nameservers: Vec::new(),
            mac: Some(vmrun_vmm_api::Mac(self.mac).to_string()),
            mtu: Some(self.mtu),
            routes: self
                .routes
                .iter()
                .map(|r| vmrun_agent_protocol::RouteConfig {
                    destination: format!("{}/{}", r.destination, r.prefix),
                    gateway: r.gateway.map(|g| g.to_string()),
                })
                .collect(),
        }
    }
}

/// Runs `f` on a thread that has entered the network namespace `netns`.
fn in_netns<T: Send>(netns: &Path, f: impl FnOnce() -> std::io::Result<T> + Send) -> std::io::Result<T> {
    let ns = std::fs::File::open(netns)?;
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: setns on this thread alone with a namespace descriptor
            // we own; the thread ends with the scope.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            f()
        })
        .join()
        .unwrap_or_else(|_| Err(std::io::Error::other("the network namespace's thread panicked")))
    })
}

/// The interface of a namespace that is mirrored: the first one (by
/// index) that is not a loopback or our TAP device and has an Ethernet
/// address and an IPv4 address.
fn pod_interface(nl: &mut Rtnl) -> std::io::Result<Option<Addressed>> {
    let mut links = nl.link_details()?;
    links.sort_by_key(|l| l.index);
    for l in links {
        if l.loopback || l.name == TAP || l.mac.is_none() {
            continue;
        }
        let addrs = nl.ipv4_addresses_of(l.index)?;
        if !addrs.is_empty() {
            return Ok(Some((l, addrs)));
        }
    }
    Ok(None)
}

/// The routes the guest needs: the default route's gateway and the other
/// routes through `index`, less the one the kernel makes for the address
/// itself.
fn guest_routes(routes: &[netlink::Route4], index: u32, address: Ipv4Addr, prefix: u8) -> (Option<Ipv4Addr>, Vec<PodRoute>) {
    let own_subnet = Ipv4Addr::from(u32::from(address) & vmrun_agent_protocol::ipv4_netmask(prefix));
    let mut gateway = None;
    let mut out = Vec::new();
    for r in routes.iter().filter(|r| r.oif == Some(index)) {
        if r.prefix == 0 {
            gateway = gateway.or(r.gateway);
        } else if !(r.gateway.is_none() && r.prefix == prefix && r.destination == own_subnet) {
            out.push(PodRoute { destination: r.destination, prefix: r.prefix, gateway: r.gateway });
        }
    }
    (gateway, out)
}

/// Mirrors the pod interface of network namespace `netns` to a new TAP
/// device there ([`TAP`]), which the VMM (started in that namespace)
/// opens. `None`: the namespace has no such interface (a new, empty
/// namespace), or its interface is another VM's already (a later
/// container of a pod, whose VM is not shared yet): the VM gets no
/// network interface.
pub fn attach(netns: &Path) -> Result<Option<PodLink>> {
    let fail = |e: std::io::Error| Error::Network(format!("cannot attach to the network of {}: {e}", netns.display()));
    let netns_path = netns.to_path_buf();
    in_netns(netns, move || {
        let mut nl = Rtnl::open()?;
        let Some((link, addrs)) = pod_interface(&mut nl)? else {
            log::debug!("network namespace {}: no interface with an address; the VM gets none", netns_path.display());
            return Ok(None);
        };
        match netlink::create_tap_exclusive(TAP) {
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) || e.kind() == std::io::ErrorKind::AlreadyExists => {
                log::warn!(
                    "network namespace {}: its interface {} is another container's VM's already; this container's VM gets no network interface",
                    netns_path.display(),
                    link.name
                );
                return Ok(None);
            }
            r => r?,
        }
        let mirrored = (|| {
            let tap = nl.link(TAP)?.ok_or_else(|| std::io::Error::other("the TAP device made is not listed"))?;
            nl.set_mtu(tap.index, link.mtu)?;
            nl.add_ingress_qdisc(link.index).map_err(|e| {
                if e.kind() == std::io::ErrorKind::AlreadyExists {
                    std::io::Error::other(format!("{} has an ingress queueing discipline already: its traffic cannot be redirected", link.name))
                } else {
                    e
                }
            })?;
            let filters = (|| {
                nl.add_ingress_qdisc(tap.index)?;
                nl.redirect_ingress(link.index, tap.index)?;
                nl.redirect_ingress(tap.index, link.index)?;
                nl.set_up(tap.index)
            })();
            if filters.is_err() {
                let _ = nl.delete_ingress_qdisc(link.index);
            }
            filters
        })();
        if let Err(e) = mirrored {
            if let Ok(Some(tap)) = nl.link(TAP) {
                let _ = nl.delete(tap.index);
            }
            return Err(e);
        }
        let (address, prefix) = addrs[0];
        if addrs.len() > 1 {
            log::warn!("{} has {} IPv4 addresses: the VM takes the first, {address}/{prefix}", link.name, addrs.len());
        }
        let (gateway, routes) = guest_routes(&nl.ipv4_routes()?, link.index, address, prefix);
        let mac = link.mac.unwrap_or_default();
        Ok(Some(PodLink { netns: netns_path, interface: link.name, mac, mtu: link.mtu, address, prefix, gateway, routes }))
    })
    .map_err(fail)
}

/// Undoes [`attach`]: removes the TAP device and the pod interface's
/// ingress queueing discipline (with the filter). A namespace that is
/// gone has nothing left to undo; failures are logged.
pub fn detach(link: &PodLink) {
    if !link.netns.exists() {
        return;
    }
    let interface = link.interface.clone();
    let r = in_netns(&link.netns, move || {
        let mut nl = Rtnl::open()?;
        if let Some(tap) = nl.link(TAP)? {
            nl.delete(tap.index)?;
        }
        if let Some(l) = nl.link(&interface)? {
            match nl.delete_ingress_qdisc(l.index) {
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) || e.raw_os_error() == Some(libc::EINVAL) => {}
                r => r?,
            }
        }
        Ok(())
    });
    match r {
        Ok(()) => log::debug!("detached from the network of {}", link.netns.display()),
        // The namespace's file may outlive the namespace (a process's).
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => log::warn!("cannot detach from the network of {}: {e}", link.netns.display()),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::process::Command;

    fn ip(a: &str) -> Ipv4Addr {
        a.parse().unwrap()
    }

    #[test]
    fn routes_for_the_guest() {
        let r = |d: &str, p: u8, g: Option<&str>, oif: u32| netlink::Route4 {
            destination: ip(d),
            prefix: p,
            gateway: g.map(ip),
            oif: Some(oif),
        };
        let routes = [
            r("0.0.0.0", 0, Some("10.88.0.1"), 2),
            r("10.88.0.0", 16, None, 2),
            r("192.0.2.0", 24, Some("10.88.0.254"), 2),
            r("198.51.100.0", 24, None, 3),
            r("10.99.0.1", 32, None, 2),
        ];
        let (gw, rest) = guest_routes(&routes, 2, ip("10.88.0.5"), 16);
        assert_eq!(gw, Some(ip("10.88.0.1")));
        let route = |d: &str, p: u8, g: Option<&str>| PodRoute { destination: ip(d), prefix: p, gateway: g.map(ip) };
        assert_eq!(rest, [route("192.0.2.0", 24, Some("10.88.0.254")), route("10.99.0.1", 32, None)]);
        let l = PodLink {
            netns: "/x".into(),
            interface: "eth0".into(),
            mac: [0x0a, 0x58, 0x0a, 0x58, 0, 5],
            mtu: 1450,
            address: ip("10.88.0.5"),
            prefix: 16,
            gateway: gw,
            routes: rest,
        };
        let c = l.guest_config();
        assert_eq!(
            (c.address.as_str(), c.gateway.as_deref(), c.mac.as_deref(), c.mtu),
            ("10.88.0.5/16", Some("10.88.0.1"), Some("0a:58:0a:58:00:05"), Some(1450))
        );
        assert_eq!(c.routes[1], vmrun_agent_protocol::RouteConfig { destination: "10.99.0.1/32".into(), gateway: None });
    }

    fn sh(script: &str) {
        let o = Command::new("sh").arg("-c").arg(script).output().unwrap();
        assert!(o.status.success(), "{script}: {}", String::from_utf8_lossy(&o.stderr));
    }

    /// A namespace with a veth as CNI leaves it: attached, the TAP device
    /// and both redirects are there; detached, the namespace is as it was.
    #[test]
    fn a_namespaces_interface_is_mirrored_to_a_tap_device_and_released() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: needs root for network namespaces");
            return;
        }
        let ns = format!("vmrun-test-pod{}", std::process::id());
        let peer = format!("vmrun-test-peer{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &ns]).output();
        let _ = Command::new("ip").args(["netns", "del", &peer]).output();
        sh(&format!(
            "ip netns add {ns} && ip netns add {peer} && ip -n {ns} link add name eth0 type veth peer name p0 netns {peer} && \
             ip -n {ns} link set eth0 mtu 1400 address 0a:58:0a:fe:00:02 up && ip -n {ns} addr add 10.254.0.2/24 dev eth0 && \
             ip -n {ns} route add default via 10.254.0.1 && ip -n {ns} route add 192.0.2.0/24 via 10.254.0.9"
        ));
        let path = PathBuf::from(format!("/run/netns/{ns}"));
        let attached = attach(&path);
        let show = |what: &str| {
            let o = Command::new("sh").arg("-c").arg(format!("ip netns exec {ns} {what}")).output().unwrap();
            String::from_utf8_lossy(&o.stdout).into_owned()
        };
        let (links, filters_eth0, filters_tap) =
            (show("ip -o link"), show("tc filter show dev eth0 parent ffff:"), show(&format!("tc filter show dev {TAP} parent ffff:")));
        // A second VM in the namespace gets nothing.
        let again = attach(&path);
        if let Ok(Some(l)) = &attached {
            detach(l);
        }
        let (links_after, qdiscs_after) = (show("ip -o link"), show("tc qdisc show dev eth0"));
        let _ = Command::new("ip").args(["netns", "del", &ns]).output();
        let _ = Command::new("ip").args(["netns", "del", &peer]).output();

        let l = attached.unwrap().expect("the veth is found");
        assert_eq!((l.interface.as_str(), l.mac, l.mtu), ("eth0", [0x0a, 0x58, 0x0a, 0xfe, 0, 2], 1400));
        assert_eq!((l.address, l.prefix, l.gateway), (ip("10.254.0.2"), 24, Some(ip("10.254.0.1"))));
        assert_eq!(l.routes, [PodRoute { destination: ip("192.0.2.0"), prefix: 24, gateway: Some(ip("10.254.0.9")) }]);
        let tap_line = links.lines().find(|line| line.contains(&format!(" {TAP}:"))).unwrap_or_else(|| panic!("{links}"));
        assert!(tap_line.contains("mtu 1400") && tap_line.contains(",UP"), "{tap_line}");
        assert!(filters_eth0.contains(&format!("Redirect to device {TAP}")), "{filters_eth0}");
        assert!(filters_tap.contains("Redirect to device eth0"), "{filters_tap}");
        assert!(matches!(again, Ok(None)), "{again:?}");
        assert!(!links_after.contains(TAP), "{links_after}");
        assert!(!qdiscs_after.contains("ingress"), "{qdiscs_after}");
    }

    #[test]
    fn an_empty_namespace_gives_no_network() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: needs root for network namespaces");
            return;
        }
        let ns = format!("vmrun-test-empty{}", std::process::id());
        sh(&format!("ip netns add {ns}"));
        let r = attach(&PathBuf::from(format!("/run/netns/{ns}")));
        let _ = Command::new("ip").args(["netns", "del", &ns]).output();
        assert!(matches!(r, Ok(None)), "{r:?}");
        assert!(attach(Path::new("/nonexistent/netns")).is_err());
    }
}
