//! The few Unix-socket calls the standard library does not offer: a
//! connect that never blocks the event loop, a send that never raises
//! SIGPIPE, and a peek.

use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;

/// Connects to the stream socket at `path` without blocking: a listener
/// whose backlog is full is an error (`WouldBlock`), not a wait.
pub fn connect_nonblocking(path: &OsStr) -> io::Result<UnixStream> {
    // SAFETY: a plain zeroed `sockaddr_un` is a valid value of the type.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_bytes();
    if bytes.is_empty() || bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "unusable socket path"));
    }
    for (dst, &src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = src as libc::c_char;
    }
    // SAFETY: socket() takes no pointers; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created and is owned by nobody else.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = (std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1) as libc::socklen_t;
    // SAFETY: `addr` is a valid `sockaddr_un` that lives across the call and
    // `len` does not exceed its size (the path is shorter than `sun_path`).
    let rc = unsafe { libc::connect(owned.as_raw_fd(), std::ptr::addr_of!(addr).cast(), len) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(UnixStream::from(owned))
}

/// Sends from `buf` without raising SIGPIPE when the peer is gone (the
/// error comes back as `BrokenPipe` instead).
pub fn send(stream: &UnixStream, buf: &[u8]) -> io::Result<usize> {
    loop {
        // SAFETY: `buf` is valid for reads of `buf.len()` bytes during the call.
        let n = unsafe { libc::send(stream.as_raw_fd(), buf.as_ptr().cast(), buf.len(), libc::MSG_NOSIGNAL) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Copies the next bytes of `stream` into `buf` without consuming them.
pub fn peek(stream: &UnixStream, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        // SAFETY: `buf` is valid for writes of `buf.len()` bytes during the call.
        let n = unsafe { libc::recv(stream.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), libc::MSG_PEEK) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::net::UnixListener;

    #[test]
    fn connect_send_peek() {
        let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/vmrun-vsock-sock-").unwrap();
        let path = dir.as_path().join("s");
        let l = UnixListener::bind(&path).unwrap();
        let c = connect_nonblocking(path.as_os_str()).unwrap();
        let (mut s, _) = l.accept().unwrap();
        assert_eq!(send(&c, b"hello").unwrap(), 5);
        let mut b = [0u8; 8];
        assert_eq!(peek(&s, &mut b).unwrap(), 5);
        let mut all = [0u8; 5];
        s.read_exact(&mut all).unwrap();
        assert_eq!(&all, b"hello");
        drop(s);
        assert_eq!(send(&c, b"x").unwrap_err().kind(), io::ErrorKind::BrokenPipe);
    }

    #[test]
    fn connect_failures_are_errors() {
        let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/vmrun-vsock-sock-").unwrap();
        let missing = dir.as_path().join("missing");
        assert!(connect_nonblocking(missing.as_os_str()).is_err());
        let long = "x".repeat(200);
        assert_eq!(connect_nonblocking(OsStr::new(&long)).unwrap_err().kind(), io::ErrorKind::InvalidInput);
        assert!(connect_nonblocking(OsStr::new("")).is_err());
    }
}
