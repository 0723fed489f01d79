//! Bringing up network interfaces with ioctls (a handful of system calls,
//! no netlink round trips to parse).

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use crate::settings::NetConfig;
use crate::sys::cvt;

fn ifreq(name: &str) -> libc::ifreq {
    // SAFETY: ifreq is a plain C struct; all-zero is valid.
    let mut r: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in r.ifr_name.iter_mut().zip(name.bytes().take(libc::IFNAMSIZ - 1)) {
        *d = s as libc::c_char;
    }
    r
}

fn sockaddr_in(a: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(a.octets()) },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size; the kernel reads
    // it back as sockaddr_in because of the family.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

fn ioctl<T>(sock: &OwnedFd, req: libc::c_ulong, arg: &mut T) -> io::Result<()> {
    // SAFETY: every request used here takes a pointer to the struct passed.
    cvt(unsafe { libc::ioctl(sock.as_raw_fd(), req, arg as *mut T) }).map(drop)
}

fn socket() -> io::Result<OwnedFd> {
    // SAFETY: plain system call; the result is checked.
    let fd = cvt(unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: a descriptor the kernel just returned.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Brings `lo` up (the kernel gives it 127.0.0.1/8): two system calls.
pub fn loopback_up() -> io::Result<()> {
    let s = socket()?;
    let mut r = ifreq("lo");
    r.ifr_ifru.ifru_flags = (libc::IFF_UP | libc::IFF_LOOPBACK | libc::IFF_RUNNING) as libc::c_short;
    ioctl(&s, libc::SIOCSIFFLAGS, &mut r)
}

/// Configures `iface` and its default route.
pub fn configure(iface: &str, c: &NetConfig) -> io::Result<()> {
    let s = socket()?;
    let mut r = ifreq(iface);
    r.ifr_ifru.ifru_addr = sockaddr_in(c.addr);
    ioctl(&s, libc::SIOCSIFADDR, &mut r)?;
    r.ifr_ifru.ifru_netmask = sockaddr_in(Ipv4Addr::from(vmrun_agent_protocol::ipv4_netmask(c.prefix)));
    ioctl(&s, libc::SIOCSIFNETMASK, &mut r)?;
    ioctl(&s, libc::SIOCGIFFLAGS, &mut r)?;
    // SAFETY: SIOCGIFFLAGS filled in the flags member of the union.
    let flags = unsafe { r.ifr_ifru.ifru_flags };
    r.ifr_ifru.ifru_flags = flags | libc::IFF_UP as libc::c_short;
    ioctl(&s, libc::SIOCSIFFLAGS, &mut r)?;
    if let Some(gw) = c.gateway {
        add_route_on(&s, None, Ipv4Addr::UNSPECIFIED, 0, Some(gw))?;
    }
    Ok(())
}

/// Gives `iface` the MAC address `mac` (virtio-net takes a new address
/// while up).
pub fn set_mac(iface: &str, mac: [u8; 6]) -> io::Result<()> {
    let s = socket()?;
    let mut r = ifreq(iface);
    // SAFETY: sockaddr is a plain C struct; all-zero is valid.
    let mut addr: libc::sockaddr = unsafe { std::mem::zeroed() };
    addr.sa_family = libc::ARPHRD_ETHER;
    for (d, b) in addr.sa_data.iter_mut().zip(mac) {
        *d = b as libc::c_char;
    }
    r.ifr_ifru.ifru_hwaddr = addr;
    ioctl(&s, libc::SIOCSIFHWADDR, &mut r)
}

/// Sets `iface`'s MTU.
pub fn set_mtu(iface: &str, mtu: u32) -> io::Result<()> {
    let s = socket()?;
    let mut r = ifreq(iface);
    r.ifr_ifru.ifru_mtu = i32::try_from(mtu).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    ioctl(&s, libc::SIOCSIFMTU, &mut r)
}

/// Adds a route to `dst`/`prefix` through `iface`, by `gateway` or on the
/// link.
pub fn add_route(iface: &str, dst: Ipv4Addr, prefix: u8, gateway: Option<Ipv4Addr>) -> io::Result<()> {
    add_route_on(&socket()?, Some(iface), dst, prefix, gateway)
}

/// Adds a route with socket `s`, bound to `iface` if given (else the
/// kernel finds the interface by the gateway).
fn add_route_on(s: &OwnedFd, iface: Option<&str>, dst: Ipv4Addr, prefix: u8, gateway: Option<Ipv4Addr>) -> io::Result<()> {
    let mask = vmrun_agent_protocol::ipv4_netmask(prefix);
    let mut dev: Option<Vec<libc::c_char>> = iface.map(|i| i.bytes().map(|b| b as libc::c_char).chain(std::iter::once(0)).collect());
    // SAFETY: rtentry is a plain C struct; all-zero is valid.
    let mut rt: libc::rtentry = unsafe { std::mem::zeroed() };
    rt.rt_dst = sockaddr_in(Ipv4Addr::from(u32::from(dst) & mask));
    rt.rt_genmask = sockaddr_in(Ipv4Addr::from(mask));
    rt.rt_flags = libc::RTF_UP;
    if prefix == 32 {
        rt.rt_flags |= libc::RTF_HOST;
    }
    if let Some(gw) = gateway {
        rt.rt_gateway = sockaddr_in(gw);
        rt.rt_flags |= libc::RTF_GATEWAY;
    }
    // The kernel copies the name in during the call.
    if let Some(d) = dev.as_mut() {
        rt.rt_dev = d.as_mut_ptr();
    }
    ioctl(s, libc::SIOCADDRT, &mut rt)
}

/// Parses `aa:bb:cc:dd:ee:ff`; a multicast address is refused.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut mac {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    (parts.next().is_none() && mac[0] & 1 == 0).then_some(mac)
}

/// A resolv.conf naming `servers`, which must be IP addresses.
pub fn resolv_conf(servers: &[String]) -> io::Result<String> {
    let mut text = String::new();
    for s in servers {
        let a: std::net::IpAddr = s.parse().map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, format!("invalid name server {s:?}")))?;
        text.push_str(&format!("nameserver {a}\n"));
    }
    Ok(text)
}

/// Writes `text` as `/etc/resolv.conf` of the container root `rootfs`,
/// resolved inside it (`RESOLVE_IN_ROOT`: the image's symlinks stay in
/// the image). An image without `/etc` gets none.
pub fn write_resolv_conf(rootfs: &std::path::Path, text: &str) -> io::Result<()> {
    use std::os::fd::AsFd;
    use std::os::unix::ffi::OsStrExt;
    let root = std::ffi::CString::new(rootfs.as_os_str().as_bytes()).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let root = crate::sys::open(&root, libc::O_PATH | libc::O_DIRECTORY, 0)?;
    let resolve = libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS;
    let file = match crate::sys::openat2(root.as_fd(), c"etc/resolv.conf", libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC, 0o644, resolve) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        r => r?,
    };
    crate::sys::write_all(file.as_fd(), text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_in_network_order() {
        let sa = sockaddr_in(Ipv4Addr::new(10, 0, 0, 2));
        assert_eq!(sa.sa_family, libc::AF_INET as libc::sa_family_t);
        // sa_data: port (2 bytes), then the address.
        assert_eq!(&sa.sa_data[2..6], &[10, 0, 0, 2]);
    }

    #[test]
    fn macs() {
        assert_eq!(parse_mac("0a:1b:2c:3d:4e:5f"), Some([0x0a, 0x1b, 0x2c, 0x3d, 0x4e, 0x5f]));
        for bad in ["", "0a:1b:2c:3d:4e", "0a:1b:2c:3d:4e:5f:60", "01:00:5e:00:00:01", "0a:1b:2c:3d:4e:zz", "0a:1b:2c:3d:4e:5"] {
            assert_eq!(parse_mac(bad), None, "{bad}");
        }
    }

    #[test]
    fn resolv_conf_names_addresses_only() {
        assert_eq!(resolv_conf(&["10.0.0.2".into(), "2001:db8::1".into()]).unwrap(), "nameserver 10.0.0.2\nnameserver 2001:db8::1\n");
        assert!(resolv_conf(&["10.0.0.2\nsearch evil".into()]).is_err());
        assert!(resolv_conf(&["example.com".into()]).is_err());
    }

    #[test]
    fn resolv_conf_is_written_inside_the_root() {
        // The image's /etc/resolv.conf is a symlink that points out of the
        // root: it is followed as in the container, to the root's own /tmp.
        let scratch = std::env::temp_dir().join(format!("vmrun-agent-resolv-{}", std::process::id()));
        let (root, outside) = (scratch.join("root"), scratch.join("outside"));
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::create_dir_all(root.join("etc")).unwrap();
        let target = outside.join("resolv.conf");
        // Where the link leads inside the root.
        let inside = root.join(target.parent().unwrap().strip_prefix("/").unwrap());
        std::fs::create_dir_all(&inside).unwrap();
        std::os::unix::fs::symlink(format!("../../../../../../../..{}", target.display()), root.join("etc/resolv.conf")).unwrap();
        let written = write_resolv_conf(&root, "nameserver 10.0.0.2\n");
        let (escaped, kept) = (target.exists(), std::fs::read_to_string(inside.join("resolv.conf")));
        // No /etc: nothing is written, and no error.
        let bare = scratch.join("bare");
        std::fs::create_dir_all(&bare).unwrap();
        let bare_written = write_resolv_conf(&bare, "nameserver 10.0.0.2\n");
        let bare_etc = bare.join("etc").exists();
        std::fs::remove_dir_all(&scratch).unwrap();
        written.unwrap();
        assert!(!escaped, "written outside the root");
        assert_eq!(kept.unwrap(), "nameserver 10.0.0.2\n");
        bare_written.unwrap();
        assert!(!bare_etc);
    }
}
