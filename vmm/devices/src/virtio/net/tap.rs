//! A TAP network device opened through `/dev/net/tun`, with the virtio net
//! header (`IFF_VNET_HDR`) on every frame so checksum and segmentation
//! offloads pass through unchanged between the guest and the host kernel.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const TUNSETOWNER: libc::c_ulong = 0x4004_54cc;
const TUNSETGROUP: libc::c_ulong = 0x4004_54ce;

/// Offload flags for `TUNSETOFFLOAD`.
pub const TUN_F_CSUM: u32 = 0x01;
pub const TUN_F_TSO4: u32 = 0x02;
pub const TUN_F_TSO6: u32 = 0x04;
pub const TUN_F_UFO: u32 = 0x10;

/// Size of `struct virtio_net_hdr_v1` (virtio 1.x, with `num_buffers`).
pub const VNET_HDR_LEN: usize = 12;

/// Errors opening a TAP device.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open /dev/net/tun: {0}")]
    OpenTun(std::io::Error),
    #[error("invalid TAP name {0:?} (1 to 15 characters)")]
    Name(String),
    #[error("cannot attach to TAP device {name}: {source} (does it exist, and may this user use it?)")]
    Attach { name: String, source: std::io::Error },
    #[error("TAP ioctl {what} failed: {source}")]
    Ioctl { what: &'static str, source: std::io::Error },
}

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// An open TAP device.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Attaches to the TAP device `name` (creating a transient one if the
    /// caller may), non-blocking.
    pub fn open(name: &str) -> Result<Self, Error> {
        if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains('/') {
            return Err(Error::Name(name.to_string()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(Error::OpenTun)?;
        let mut req = IfReq { name: [0; libc::IFNAMSIZ], flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR, _pad: [0; 22] };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads and writes an ifreq, which `req` is laid out as.
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF as _, &mut req) } < 0 {
            return Err(Error::Attach { name: name.into(), source: std::io::Error::last_os_error() });
        }
        let hdr_len = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads an int.
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETVNETHDRSZ as _, &hdr_len) } < 0 {
            return Err(Error::Ioctl { what: "TUNSETVNETHDRSZ", source: std::io::Error::last_os_error() });
        }
        Ok(Self { file, name: name.to_string() })
    }

    /// Lets `uid` and `gid` attach to this (persistent) TAP device without
    /// privileges, e.g. a jailed VMM.
    pub fn set_owner(&self, uid: u32, gid: u32) -> Result<(), Error> {
        for (what, req, id) in [("TUNSETOWNER", TUNSETOWNER, uid), ("TUNSETGROUP", TUNSETGROUP, gid)] {
            // SAFETY: TUNSETOWNER and TUNSETGROUP take an integer argument.
            if unsafe { libc::ioctl(self.file.as_raw_fd(), req as _, libc::c_ulong::from(id)) } < 0 {
                return Err(Error::Ioctl { what, source: std::io::Error::last_os_error() });
            }
        }
        Ok(())
    }

    /// Tells the host kernel which offloads the guest accepts in frames it
    /// receives.
    pub fn set_offload(&self, flags: u32) -> Result<(), Error> {
        // SAFETY: TUNSETOFFLOAD takes the flags as its integer argument.
        if unsafe { libc::ioctl(self.file.as_raw_fd(), TUNSETOFFLOAD as _, flags as libc::c_ulong) } < 0 {
            return Err(Error::Ioctl { what: "TUNSETOFFLOAD", source: std::io::Error::last_os_error() });
        }
        Ok(())
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Reads one frame (virtio net header first).
    pub fn read_frame(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.file.read(buf)
    }

    /// Writes one frame (virtio net header first).
    pub fn write_frame(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.file.write(buf)
    }
}

#[cfg(test)]
impl Tap {
    /// A stand-in for tests: one end of a Unix datagram pair, which keeps
    /// frame boundaries as a TAP does (offloads cannot be set on it). The
    /// other end is the "host network".
    pub(crate) fn test_pair() -> std::io::Result<(Self, std::os::unix::net::UnixDatagram)> {
        let (a, b) = std::os::unix::net::UnixDatagram::pair()?;
        a.set_nonblocking(true)?;
        let file = File::from(std::os::fd::OwnedFd::from(a));
        Ok((Self { file, name: "test".into() }, b))
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}
