//! `--network tap` and `-p HOST:GUEST`: a container's own link to the host.
//!
//! Each container with a network gets a TAP device `vmrun-<id>` on the
//! host and a point-to-point /30 out of `10.213.0.0/16`: the host end is
//! `.1`, the guest's `eth0` is `.2` with the host as its gateway. Subnets
//! are allocated host-wide ([`allocate`]): under one lock for the whole
//! host, skipping every /30 that an address on any of the host's
//! interfaces covers, whoever put it there (another data directory's
//! containers, a TAP device left by a killed run, the host's own
//! networks). The agent
//! is told the address after the VM starts (a VM restored from a template
//! has no address of its own). Published ports are forwarded by a TCP
//! proxy on the host that listens on `0.0.0.0:HOST` and connects to the
//! guest's address; no firewall rules are added. Outbound traffic beyond
//! the host needs forwarding and NAT set up by the host's administrator.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use crate::{Error, Result};

/// Subnets handed out: `10.213.0.0/16` in /30s.
const SUBNETS: u32 = 1 << 14;

/// A container's link.
#[derive(Debug, Clone, PartialEq, Eq)]
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
        Self { tap: format!("vmrun-{short}"), host: Ipv4Addr::from(base + 1), guest: Ipv4Addr::from(base + 2) }
    }

    /// The subnet number of a guest address of ours.
    pub fn index_of(guest: &str) -> Option<u32> {
        let a: Ipv4Addr = guest.split('/').next()?.parse().ok()?;
        let off = u32::from(a).checked_sub(u32::from(Ipv4Addr::new(10, 213, 0, 0)))?;
        (off < SUBNETS * 4).then_some(off / 4)
    }

    /// What the agent is told.
    pub fn guest_config(&self) -> vmrun_agent_protocol::NetworkConfig {
        vmrun_agent_protocol::NetworkConfig {
            interface: "eth0".into(),
            address: format!("{}/30", self.guest),
            gateway: Some(self.host.to_string()),
        }
    }

    /// Creates the TAP device with the host's address, up.
    pub fn create(&self) -> Result<()> {
        ip(&["tuntap", "add", "dev", &self.tap, "mode", "tap"])?;
        let up = ip(&["addr", "add", &format!("{}/30", self.host), "dev", &self.tap])
            .and_then(|()| ip(&["link", "set", "dev", &self.tap, "up"]));
        if up.is_err() {
            self.delete();
        }
        up
    }

    /// Removes the TAP device (nothing if it is gone already).
    pub fn delete(&self) {
        delete_tap(&self.tap);
    }
}

/// Removes a TAP device by name, if it exists.
pub fn delete_tap(name: &str) {
    if Path::new("/sys/class/net").join(name).exists() {
        if let Err(e) = ip(&["link", "del", "dev", name]) {
            log::warn!("{e}");
        }
    }
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip").args(args).output().map_err(|e| Error::Network(format!("cannot run ip (install iproute2): {e}")))?;
    if out.status.success() {
        return Ok(());
    }
    Err(Error::Network(format!(
        "ip {}: {} (--network tap needs root or CAP_NET_ADMIN)",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    )))
}

/// The first subnet number not in `used`.
pub fn free_index(used: &[u32]) -> Result<u32> {
    (0..SUBNETS).find(|i| !used.contains(i)).ok_or_else(|| Error::Network("no free container subnet left in 10.213.0.0/16".into()))
}

/// The lock that serialises subnet allocation on the whole host (every
/// data directory's `vmrun`s take it).
pub const HOST_LOCK: &str = "/run/vmrun/network.lock";

/// Allocates a subnet and creates container `id`'s link on it, holding
/// the host-wide lock from the choice until the TAP device has its
/// address (from then on the address itself marks the subnet as taken).
/// `also_used`: subnets recorded for containers that have not made their
/// link yet or are being restarted.
pub fn allocate(id: &str, also_used: &[u32]) -> Result<Link> {
    let lock_path = Path::new(HOST_LOCK);
    if let Some(dir) = lock_path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| Error::Network(format!("cannot make {}: {e} (--network tap needs root)", dir.display())))?;
    }
    let _lock = crate::lock::Lock::take(lock_path)?;
    let mut used = host_used_indexes()?;
    used.extend_from_slice(also_used);
    let link = Link::new(id, free_index(&used)?);
    link.create()?;
    Ok(link)
}

/// The subnet numbers that an IPv4 address on any of the host's
/// interfaces covers (its address with its netmask).
pub fn host_used_indexes() -> Result<Vec<u32>> {
    let mut used = Vec::new();
    for (addr, mask) in host_ipv4_networks()? {
        used.extend(indexes_covered(addr, mask));
    }
    used.sort_unstable();
    used.dedup();
    Ok(used)
}

/// The subnet numbers of ours that `addr`/`mask` overlaps.
fn indexes_covered(addr: Ipv4Addr, mask: Ipv4Addr) -> std::ops::Range<u32> {
    let ours = u32::from(Ipv4Addr::new(10, 213, 0, 0));
    let (mask, addr) = (u32::from(mask), u32::from(addr));
    let first = addr & mask;
    let last = first | !mask;
    let (lo, hi) = (first.max(ours), last.min(ours + SUBNETS * 4 - 1));
    if lo > hi {
        return 0..0;
    }
    (lo - ours) / 4..(hi - ours) / 4 + 1
}

/// Every IPv4 address on the host's interfaces, with its netmask.
fn host_ipv4_networks() -> Result<Vec<(Ipv4Addr, Ipv4Addr)>> {
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `list` with a list we free below.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        return Err(Error::Network(format!("cannot list the host's addresses: {}", std::io::Error::last_os_error())));
    }
    let v4 = |sa: *const libc::sockaddr| -> Option<Ipv4Addr> {
        // SAFETY: a non-null sockaddr from getifaddrs whose family says
        // it is a sockaddr_in.
        unsafe {
            if sa.is_null() || i32::from((*sa).sa_family) != libc::AF_INET {
                return None;
            }
            Some(Ipv4Addr::from(u32::from_be((*sa.cast::<libc::sockaddr_in>()).sin_addr.s_addr)))
        }
    };
    let mut out = Vec::new();
    let mut cur = list;
    while !cur.is_null() {
        // SAFETY: `cur` walks the list getifaddrs made.
        let ifa = unsafe { &*cur };
        if let (Some(a), Some(m)) = (v4(ifa.ifa_addr), v4(ifa.ifa_netmask)) {
            out.push((a, m));
        }
        cur = ifa.ifa_next;
    }
    // SAFETY: the list from getifaddrs, freed once.
    unsafe { libc::freeifaddrs(list) };
    Ok(out)
}

/// One `-p` option: `HOST:GUEST` or `HOST:GUEST/tcp` (TCP only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortMap {
    pub host: u16,
    pub guest: u16,
}

impl std::str::FromStr for PortMap {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let bad = |why: &str| Error::Network(format!("invalid port mapping {s:?}: {why} (use -p HOST:GUEST)"));
        let body = match s.split_once('/') {
            Some((b, "tcp")) => b,
            Some(_) => return Err(bad("only tcp is supported")),
            None => s,
        };
        let (h, g) = body.split_once(':').ok_or_else(|| bad("expected HOST:GUEST"))?;
        let port = |p: &str| p.parse::<u16>().ok().filter(|p| *p > 0).ok_or_else(|| bad("ports are 1 to 65535"));
        Ok(Self { host: port(h)?, guest: port(g)? })
    }
}

impl std::fmt::Display for PortMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.host, self.guest)
    }
}

/// Published ports: a listening socket per mapping and a thread that
/// proxies each connection to the guest. Stops accepting when dropped.
#[derive(Debug)]
pub struct Forwarder {
    /// The write end of a pipe whose read end every accept loop waits on
    /// beside its listener: dropping it (with the forwarder) wakes them
    /// all, at once, to end.
    _stop: OwnedFd,
}

impl Forwarder {
    /// Binds every host port (so that a port in use fails the start) and
    /// starts proxying to `guest`.
    pub fn start(guest: Ipv4Addr, maps: &[PortMap]) -> Result<Self> {
        let mut listeners = Vec::new();
        for m in maps {
            let l = TcpListener::bind((Ipv4Addr::UNSPECIFIED, m.host))
                .map_err(|e| Error::Network(format!("cannot publish port {}: {e}", m.host)))?;
            // Never blocks in accept: a client that left between the poll
            // and the accept is just skipped.
            l.set_nonblocking(true)?;
            listeners.push((l, *m));
        }
        let (stop_r, stop_w) = crate::vm::pipe()?;
        let stop_r = Arc::new(stop_r);
        for (l, m) in listeners {
            let stop = Arc::clone(&stop_r);
            std::thread::spawn(move || accept_loop(&l, guest, m.guest, &stop));
        }
        Ok(Self { _stop: stop_w })
    }
}

/// Accepts connections on `l` as they come (waiting in `poll`, no timer)
/// until `stop` says the forwarder is gone.
fn accept_loop(l: &TcpListener, guest: Ipv4Addr, port: u16, stop: &OwnedFd) {
    loop {
        let mut fds = [
            libc::pollfd { fd: l.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: stop.as_raw_fd(), events: libc::POLLIN, revents: 0 },
        ];
        // SAFETY: poll on two descriptors we hold open, with their count.
        if unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) } < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            log::warn!("port {port}: poll: {e}");
            return;
        }
        if fds[1].revents != 0 {
            return; // the forwarder was dropped
        }
        match l.accept() {
            Ok((client, _)) => {
                let _ = client.set_nonblocking(false);
                std::thread::spawn(move || proxy(client, guest, port));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => {
                // Out of descriptors, say: back off rather than spin.
                log::warn!("port {port}: accept: {e}");
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
}

fn proxy(client: TcpStream, guest: Ipv4Addr, port: u16) {
    let Ok(server) = TcpStream::connect_timeout(&(guest, port).into(), Duration::from_secs(30)) else {
        let _ = client.shutdown(Shutdown::Both);
        return;
    };
    let (Ok(c2), Ok(s2)) = (client.try_clone(), server.try_clone()) else { return };
    let up = std::thread::spawn(move || pipe(client, server));
    pipe(s2, c2);
    let _ = up.join();
}

/// Copies `from` to `to` until the end, then half-closes `to`.
fn pipe(mut from: TcpStream, mut to: TcpStream) {
    let mut buf = [0u8; 32 * 1024];
    while let Ok(n) = from.read(&mut buf) {
        if n == 0 || to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
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
        assert_eq!(a.guest_config().address, "10.213.0.2/30");
    }

    #[test]
    fn addresses_on_the_host_take_the_subnets_they_cover() {
        let a = |s: &str| s.parse::<Ipv4Addr>().unwrap();
        assert_eq!(indexes_covered(a("10.213.0.1"), a("255.255.255.252")), 0..1);
        assert_eq!(indexes_covered(a("10.213.1.6"), a("255.255.255.252")), 65..66);
        // A host network over part of ours takes all it covers.
        assert_eq!(indexes_covered(a("10.213.2.9"), a("255.255.255.0")), 128..192);
        assert_eq!(indexes_covered(a("10.0.0.1"), a("255.0.0.0")), 0..SUBNETS);
        assert_eq!(indexes_covered(a("192.168.1.1"), a("255.255.255.0")), 0..0);
        assert_eq!(indexes_covered(a("10.212.255.255"), a("255.255.255.255")), 0..0);
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
        let ip = |args: &[&str]| assert!(Command::new("ip").args(args).status().unwrap().success(), "ip {args:?}");
        ip(&["tuntap", "add", "dev", &name, "mode", "tap"]);
        let taken: Vec<u32> = (0..3).collect();
        for i in &taken {
            ip(&["addr", "add", &format!("{}/30", Link::new("x", *i).host), "dev", &name]);
        }
        let used = host_used_indexes();
        drop(lock);
        let _ = Command::new("ip").args(["link", "del", &name]).status();
        let used = used.unwrap();
        assert!(taken.iter().all(|i| used.contains(i)), "{used:?}");
        assert!(free_index(&used).unwrap() >= 3);
    }

    #[test]
    fn port_maps() {
        assert_eq!("8080:80".parse::<PortMap>().unwrap(), PortMap { host: 8080, guest: 80 });
        assert_eq!("1:2/tcp".parse::<PortMap>().unwrap().to_string(), "1:2");
        for bad in ["80", "0:80", "80:70000", "80:80/udp", "a:b", ""] {
            assert!(bad.parse::<PortMap>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_forwarder_proxies_both_ways() {
        // A "guest" on loopback that upper-cases what it reads.
        let server = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let gport = server.local_addr().unwrap().port();
        std::thread::spawn(move || {
            let (mut s, _) = server.accept().unwrap();
            let mut buf = Vec::new();
            s.read_to_end(&mut buf).unwrap();
            s.write_all(&buf.to_ascii_uppercase()).unwrap();
        });
        let probe = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let hport = probe.local_addr().unwrap().port();
        drop(probe);
        let _f = Forwarder::start(Ipv4Addr::LOCALHOST, &[PortMap { host: hport, guest: gport }]).unwrap();
        let mut c = TcpStream::connect((Ipv4Addr::LOCALHOST, hport)).unwrap();
        c.write_all(b"hello").unwrap();
        c.shutdown(Shutdown::Write).unwrap();
        let mut out = String::new();
        c.read_to_string(&mut out).unwrap();
        assert_eq!(out, "HELLO");
        // A port in use is an error at start.
        assert!(Forwarder::start(Ipv4Addr::LOCALHOST, &[PortMap { host: hport, guest: gport }]).is_err());
    }

    #[test]
    fn a_dropped_forwarder_lets_its_port_go_at_once() {
        let probe = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let hport = probe.local_addr().unwrap().port();
        drop(probe);
        let f = Forwarder::start(Ipv4Addr::LOCALHOST, &[PortMap { host: hport, guest: 9 }]).unwrap();
        drop(f);
        // Its accept loop wakes on the stop pipe and closes the listener:
        // the port can be bound again well within a second.
        let start = std::time::Instant::now();
        while TcpListener::bind((Ipv4Addr::UNSPECIFIED, hport)).is_err() {
            assert!(start.elapsed() < Duration::from_secs(1), "port {hport} still held after the forwarder was dropped");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}
