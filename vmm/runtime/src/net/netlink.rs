//! The host's links through rtnetlink, on a blocking socket (no async
//! runtime): list links and IPv4 addresses, add an address, bring a link
//! up, delete one. TAP devices are made with the tun driver's ioctls, which
//! is the only way the kernel offers (it has no rtnetlink `newlink` for
//! them).

use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;

use netlink_packet_core::{
    NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_MULTIPART, NLM_F_REQUEST,
};
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteMessage, RouteType};
use netlink_packet_route::tc::{
    TcAction, TcActionAttribute, TcActionMirrorOption, TcActionOption, TcActionType, TcAttribute, TcFilterU32Option, TcHandle, TcMessage,
    TcMirror, TcMirrorActionType, TcOption, TcU32Key, TcU32Selector, TcU32SelectorFlags,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

/// `RT_TABLE_MAIN`.
const RT_TABLE_MAIN: u8 = 254;

/// `_IOW('T', 202, int)` and `_IOW('T', 203, int)`.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb;

/// A link: its index and name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
}

/// A link as a pod's network needs it described.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkDetails {
    pub index: u32,
    pub name: String,
    /// Its hardware address, when it is an Ethernet one.
    pub mac: Option<[u8; 6]>,
    pub mtu: u32,
    pub loopback: bool,
}

/// An IPv4 route of the main table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route4 {
    pub destination: Ipv4Addr,
    pub prefix: u8,
    pub gateway: Option<Ipv4Addr>,
    /// The link it leaves by.
    pub oif: Option<u32>,
}

/// `ETH_P_ALL`, in the network byte order a filter's protocol is given in.
const ETH_P_ALL_BE: u16 = (libc::ETH_P_ALL as u16).to_be();

/// An rtnetlink socket and the sequence number of its last request.
#[derive(Debug)]
pub struct Rtnl {
    socket: Socket,
    seq: u32,
}

impl Rtnl {
    pub fn open() -> io::Result<Self> {
        let mut socket = Socket::new(NETLINK_ROUTE)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        Ok(Self { socket, seq: 0 })
    }

    /// Sends `msg` and collects the answers to it until the kernel's
    /// acknowledgement (or the end of a dump).
    fn request(&mut self, msg: RouteNetlinkMessage, flags: u16) -> io::Result<Vec<RouteNetlinkMessage>> {
        self.seq = self.seq.wrapping_add(1);
        let mut req = NetlinkMessage::from(msg);
        req.header.flags = NLM_F_REQUEST | flags;
        req.header.sequence_number = self.seq;
        req.finalize();
        let mut buf = vec![0; req.buffer_len()];
        req.serialize(&mut buf);
        self.socket.send(&buf, 0)?;
        let bad = |e: String| io::Error::new(io::ErrorKind::InvalidData, format!("rtnetlink: {e}"));
        let mut out = Vec::new();
        loop {
            let (data, _) = self.socket.recv_from_full()?;
            let mut rest = &data[..];
            while !rest.is_empty() {
                let reply = NetlinkMessage::<RouteNetlinkMessage>::deserialize(rest).map_err(|e| bad(e.to_string()))?;
                let len = reply.header.length as usize;
                // Messages are 4-byte aligned in a datagram.
                let step = len.checked_add(3).map(|l| l & !3).filter(|s| *s > 0).ok_or_else(|| bad("a message of length 0".into()))?;
                rest = rest.get(step..).unwrap_or_default();
                if reply.header.sequence_number != self.seq {
                    continue;
                }
                let multipart = reply.header.flags & NLM_F_MULTIPART != 0;
                match reply.payload {
                    NetlinkPayload::Done(_) => return Ok(out),
                    NetlinkPayload::Error(e) if e.code.is_some() => return Err(e.to_io()),
                    NetlinkPayload::Error(_) => return Ok(out),
                    NetlinkPayload::InnerMessage(m) => {
                        out.push(m);
                        if !multipart && flags & NLM_F_ACK == 0 {
                            return Ok(out);
                        }
                    }
                    _ => {}
                }
            }
        }
    }

    /// Every link, with its name.
    pub fn links(&mut self) -> io::Result<Vec<Link>> {
        Ok(self.link_details()?.into_iter().filter(|d| !d.name.is_empty()).map(|d| Link { index: d.index, name: d.name }).collect())
    }

    /// The link named `name`, if there is one.
    pub fn link(&mut self, name: &str) -> io::Result<Option<Link>> {
        Ok(self.links()?.into_iter().find(|l| l.name == name))
    }

    /// Every link, with its address, MTU and whether it is a loopback.
    pub fn link_details(&mut self) -> io::Result<Vec<LinkDetails>> {
        let replies = self.request(RouteNetlinkMessage::GetLink(LinkMessage::default()), NLM_F_DUMP)?;
        let mut out = Vec::new();
        for m in replies {
            let RouteNetlinkMessage::NewLink(l) = m else { continue };
            let mut d = LinkDetails {
                index: l.header.index,
                name: String::new(),
                mac: None,
                mtu: 0,
                loopback: l.header.flags.contains(LinkFlags::Loopback),
            };
            for a in &l.attributes {
                match a {
                    LinkAttribute::IfName(n) => d.name = n.clone(),
                    LinkAttribute::Address(b) => d.mac = <[u8; 6]>::try_from(b.as_slice()).ok(),
                    LinkAttribute::Mtu(m) => d.mtu = *m,
                    _ => {}
                }
            }
            out.push(d);
        }
        Ok(out)
    }

    /// The IPv4 addresses of link `index`, with their prefix lengths.
    pub fn ipv4_addresses_of(&mut self, index: u32) -> io::Result<Vec<(Ipv4Addr, u8)>> {
        self.ipv4_addresses_where(Some(index))
    }

    /// The unicast IPv4 routes of the main table.
    pub fn ipv4_routes(&mut self) -> io::Result<Vec<Route4>> {
        let mut msg = RouteMessage::default();
        msg.header.address_family = AddressFamily::Inet;
        let replies = self.request(RouteNetlinkMessage::GetRoute(msg), NLM_F_DUMP)?;
        let mut out = Vec::new();
        for m in replies {
            let RouteNetlinkMessage::NewRoute(r) = m else { continue };
            let mut table = u32::from(r.header.table);
            let mut route =
                Route4 { destination: Ipv4Addr::UNSPECIFIED, prefix: r.header.destination_prefix_length, gateway: None, oif: None };
            for a in &r.attributes {
                match a {
                    RouteAttribute::Destination(RouteAddress::Inet(d)) => route.destination = *d,
                    RouteAttribute::Gateway(RouteAddress::Inet(g)) => route.gateway = Some(*g),
                    RouteAttribute::Oif(i) => route.oif = Some(*i),
                    RouteAttribute::Table(t) => table = *t,
                    _ => {}
                }
            }
            if r.header.address_family == AddressFamily::Inet && r.header.kind == RouteType::Unicast && table == u32::from(RT_TABLE_MAIN) {
                out.push(route);
            }
        }
        Ok(out)
    }

    /// Sets link `index`'s MTU.
    pub fn set_mtu(&mut self, index: u32, mtu: u32) -> io::Result<()> {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        msg.attributes.push(LinkAttribute::Mtu(mtu));
        self.request(RouteNetlinkMessage::SetLink(msg), NLM_F_ACK).map(drop)
    }

    /// Gives link `index` an ingress queueing discipline (`tc qdisc add
    /// dev D ingress`), which its filters hang on.
    pub fn add_ingress_qdisc(&mut self, index: u32) -> io::Result<()> {
        let mut msg = TcMessage::with_index(index_i32(index)?);
        msg.header.parent = TcHandle::INGRESS;
        msg.header.handle = TcHandle { major: 0xffff, minor: 0 };
        msg.attributes.push(TcAttribute::Kind("ingress".into()));
        self.request(RouteNetlinkMessage::NewQueueDiscipline(msg), NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL).map(drop)
    }

    /// Removes link `index`'s ingress queueing discipline and its filters.
    pub fn delete_ingress_qdisc(&mut self, index: u32) -> io::Result<()> {
        let mut msg = TcMessage::with_index(index_i32(index)?);
        msg.header.parent = TcHandle::INGRESS;
        msg.header.handle = TcHandle { major: 0xffff, minor: 0 };
        self.request(RouteNetlinkMessage::DelQueueDiscipline(msg), NLM_F_ACK).map(drop)
    }

    /// Sends every frame that arrives on link `from` out of link `to`
    /// (`tc filter add dev FROM parent ffff: protocol all u32 match u8 0 0
    /// action mirred egress redirect dev TO`); `from` needs its ingress
    /// queueing discipline.
    pub fn redirect_ingress(&mut self, from: u32, to: u32) -> io::Result<()> {
        let mut msg = TcMessage::with_index(index_i32(from)?);
        msg.header.parent = TcHandle { major: 0xffff, minor: 0 };
        // Priority 1 in the upper half, the protocol in the lower.
        msg.header.info = (1 << 16) | u32::from(ETH_P_ALL_BE);
        let mut all = TcU32Selector::default();
        all.flags = TcU32SelectorFlags::Terminal;
        all.nkeys = 1;
        all.keys = vec![TcU32Key::default()];
        let mut mirred = TcMirror::default();
        mirred.generic.action = TcActionType::Stolen;
        mirred.eaction = TcMirrorActionType::EgressRedir;
        mirred.ifindex = to;
        let mut action = TcAction::default();
        action.tab = 1;
        action.attributes = vec![
            TcActionAttribute::Kind("mirred".into()),
            TcActionAttribute::Options(vec![TcActionOption::Mirror(TcActionMirrorOption::Parms(mirred))]),
        ];
        msg.attributes.push(TcAttribute::Kind("u32".into()));
        msg.attributes.push(TcAttribute::Options(vec![
            TcOption::U32(TcFilterU32Option::Selector(all)),
            TcOption::U32(TcFilterU32Option::Action(vec![action])),
        ]));
        self.request(RouteNetlinkMessage::NewTrafficFilter(msg), NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL).map(drop)
    }

    /// Every IPv4 address on the host's links, with its prefix length.
    pub fn ipv4_addresses(&mut self) -> io::Result<Vec<(Ipv4Addr, u8)>> {
        self.ipv4_addresses_where(None)
    }

    /// The IPv4 addresses of link `index`, or of every link.
    fn ipv4_addresses_where(&mut self, index: Option<u32>) -> io::Result<Vec<(Ipv4Addr, u8)>> {
        let mut msg = AddressMessage::default();
        msg.header.family = AddressFamily::Inet;
        let replies = self.request(RouteNetlinkMessage::GetAddress(msg), NLM_F_DUMP)?;
        Ok(replies
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewAddress(a) if a.header.family == AddressFamily::Inet && index.is_none_or(|i| i == a.header.index) => {
                    let prefix = a.header.prefix_len;
                    a.attributes.iter().find_map(|attr| match attr {
                        AddressAttribute::Local(IpAddr::V4(ip)) => Some((*ip, prefix)),
                        _ => None,
                    })
                }
                _ => None,
            })
            .collect())
    }

    /// Adds `addr/prefix` to link `index`.
    pub fn add_ipv4(&mut self, index: u32, addr: Ipv4Addr, prefix: u8) -> io::Result<()> {
        let mut msg = AddressMessage::default();
        msg.header.family = AddressFamily::Inet;
        msg.header.prefix_len = prefix;
        msg.header.index = index;
        msg.attributes.push(AddressAttribute::Local(addr.into()));
        msg.attributes.push(AddressAttribute::Address(addr.into()));
        if prefix < 31 {
            msg.attributes.push(AddressAttribute::Broadcast(Ipv4Addr::from(u32::from(addr) | !vmrun_agent_protocol::ipv4_netmask(prefix))));
        }
        self.request(RouteNetlinkMessage::NewAddress(msg), NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL).map(drop)
    }

    /// Brings link `index` up.
    pub fn set_up(&mut self, index: u32) -> io::Result<()> {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        msg.header.flags = LinkFlags::Up;
        msg.header.change_mask = LinkFlags::Up;
        self.request(RouteNetlinkMessage::SetLink(msg), NLM_F_ACK).map(drop)
    }

    /// Deletes link `index`.
    pub fn delete(&mut self, index: u32) -> io::Result<()> {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        self.request(RouteNetlinkMessage::DelLink(msg), NLM_F_ACK).map(drop)
    }
}

fn index_i32(index: u32) -> io::Result<i32> {
    i32::try_from(index).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, format!("interface index {index} out of range")))
}

/// Makes a persistent TAP device `name` (as `ip tuntap add mode tap`
/// does): it stays when this process ends, until it is deleted.
pub fn create_tap(name: &str) -> io::Result<()> {
    make_tap(name, false)
}

/// As [`create_tap`], failing with `EBUSY` if `name` exists already.
pub fn create_tap_exclusive(name: &str) -> io::Result<()> {
    make_tap(name, true)
}

fn make_tap(name: &str, exclusive: bool) -> io::Result<()> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("invalid interface name {name:?}")));
    }
    let tun = std::fs::OpenOptions::new().read(true).write(true).custom_flags(libc::O_CLOEXEC).open("/dev/net/tun")?;
    // SAFETY: ifreq is a plain C struct; all-zero is valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    let excl = if exclusive { libc::IFF_TUN_EXCL } else { 0 };
    req.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI | excl) as libc::c_short;
    // SAFETY: TUNSETIFF reads and writes the ifreq `req` points to.
    if unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETIFF as _, &mut req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: TUNSETPERSIST takes an integer argument.
    if unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETPERSIST as _, 1 as libc::c_ulong) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_tap_made_addressed_listed_and_deleted_through_netlink() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: needs root for a TAP device");
            return;
        }
        let name = format!("vmrunnl{}", std::process::id() % 100_000);
        create_tap(&name).unwrap();
        let mut nl = Rtnl::open().unwrap();
        let link = nl.link(&name).unwrap().expect("the TAP device is listed");
        let addr = Ipv4Addr::new(10, 254, 253, 1);
        let added = nl.add_ipv4(link.index, addr, 30).and_then(|()| nl.set_up(link.index));
        let listed = nl.ipv4_addresses();
        let flags = std::fs::read_to_string(format!("/sys/class/net/{name}/flags"));
        // An address twice is the kernel's EEXIST, as an error.
        let twice = nl.add_ipv4(link.index, addr, 30);
        nl.delete(link.index).unwrap();
        added.unwrap();
        assert!(listed.unwrap().contains(&(addr, 30)));
        let flags = u32::from_str_radix(flags.unwrap().trim().trim_start_matches("0x"), 16).unwrap();
        assert_ne!(flags & libc::IFF_UP as u32, 0, "the link is up");
        assert_eq!(twice.unwrap_err().kind(), io::ErrorKind::AlreadyExists);
        assert!(nl.link(&name).unwrap().is_none(), "deleted");
        assert!(!std::path::Path::new("/sys/class/net").join(&name).exists());
    }
}
