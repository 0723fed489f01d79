//! Pseudo-terminals on the host and runc's `--console-socket` protocol.
//!
//! With a terminal, the supervisor opens a host pty pair, sends the master
//! over the caller's console socket with `SCM_RIGHTS` (the pty's name as
//! the message, as runc does), and makes the slave its controlling
//! terminal: the caller resizes the master, the kernel sends the
//! supervisor SIGWINCH, and the supervisor passes the new size on to the
//! guest's terminal. Data flows between the slave (in raw mode: the guest's
//! terminal does the line discipline) and the agent's terminal stream.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;

/// A host pty pair.
#[derive(Debug)]
pub struct Pty {
    /// The master: what the caller reads and writes.
    pub master: OwnedFd,
    /// The slave: what the supervisor pumps.
    pub slave: OwnedFd,
    /// The slave's path (`/dev/pts/N`).
    pub name: String,
}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Opens a pty pair (both ends close-on-exec, neither a controlling
/// terminal yet).
pub fn open_pty() -> io::Result<Pty> {
    // SAFETY: posix_openpt returns a new descriptor or -1.
    let m = cvt(unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) })?;
    // SAFETY: m is a descriptor we just opened and own.
    let master = unsafe { OwnedFd::from_raw_fd(m) };
    // SAFETY: grantpt/unlockpt on the master we hold.
    cvt(unsafe { libc::grantpt(master.as_raw_fd()) })?;
    // SAFETY: as above.
    cvt(unsafe { libc::unlockpt(master.as_raw_fd()) })?;
    let mut buf = [0 as libc::c_char; 128];
    // SAFETY: ptsname_r writes at most buf.len() bytes, NUL included.
    let r = unsafe { libc::ptsname_r(master.as_raw_fd(), buf.as_mut_ptr(), buf.len()) };
    if r != 0 {
        return Err(io::Error::from_raw_os_error(r));
    }
    // SAFETY: ptsname_r succeeded, so buf holds a NUL-terminated string.
    let name = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) };
    // SAFETY: open of a NUL-terminated path; returns a new descriptor or -1.
    let s = cvt(unsafe { libc::open(name.as_ptr(), libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) })?;
    // SAFETY: s is a descriptor we just opened and own.
    let slave = unsafe { OwnedFd::from_raw_fd(s) };
    Ok(Pty { master, slave, name: name.to_string_lossy().into_owned() })
}

/// Puts the terminal `fd` in raw mode.
pub fn make_raw(fd: RawFd) -> io::Result<()> {
    // SAFETY: tcgetattr fills the termios it is given; cfmakeraw edits it;
    // tcsetattr reads it.
    unsafe {
        let mut t: libc::termios = std::mem::zeroed();
        cvt(libc::tcgetattr(fd, &mut t))?;
        libc::cfmakeraw(&mut t);
        cvt(libc::tcsetattr(fd, libc::TCSANOW, &t))?;
    }
    Ok(())
}

/// Makes the terminal `fd` this process's controlling terminal (the
/// process must lead a session without one).
pub fn set_controlling(fd: RawFd) -> io::Result<()> {
    // SAFETY: TIOCSCTTY takes an int argument (0: do not steal).
    cvt(unsafe { libc::ioctl(fd, libc::TIOCSCTTY, 0) })?;
    Ok(())
}

pub use vmrun_runtime::signal::window_size;

/// Sets the window size of the terminal `fd`.
pub fn set_window_size(fd: RawFd, rows: u16, cols: u16) -> io::Result<()> {
    let ws = libc::winsize { ws_row: rows, ws_col: cols, ws_xpixel: 0, ws_ypixel: 0 };
    // SAFETY: TIOCSWINSZ reads the winsize it is given.
    cvt(unsafe { libc::ioctl(fd, libc::TIOCSWINSZ, &ws) })?;
    Ok(())
}

/// Sends `fd` over the Unix socket at `socket`, as runc does with a
/// console's master: one message whose data is `name` and whose ancillary
/// data is the descriptor (`SCM_RIGHTS`).
pub fn send_fd(socket: &Path, fd: RawFd, name: &str) -> io::Result<()> {
    let stream = UnixStream::connect(socket)?;
    let data = if name.is_empty() { "/dev/ptmx" } else { name };
    let mut iov = libc::iovec { iov_base: data.as_ptr() as *mut libc::c_void, iov_len: data.len() };
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<RawFd>() as u32) } as usize;
    let mut control = vec![0u8; space];
    // SAFETY: msghdr is plain data; every pointer set below outlives the
    // sendmsg call, and the control buffer is CMSG_SPACE bytes for one fd.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space;
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        if cmsg.is_null() {
            return Err(io::Error::other("no room for the control message"));
        }
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<RawFd>() as u32) as usize;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>(), fd);
        let n = libc::sendmsg(stream.as_raw_fd(), &msg, 0);
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Receives a descriptor sent by [`send_fd`] (what a runc caller does with
/// its console socket); returns it with the message's text.
pub fn recv_fd(stream: &UnixStream) -> io::Result<(OwnedFd, String)> {
    let mut data = vec![0u8; 4096];
    let mut iov = libc::iovec { iov_base: data.as_mut_ptr().cast(), iov_len: data.len() };
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<RawFd>() as u32) } as usize;
    let mut control = vec![0u8; space];
    // SAFETY: as in send_fd: the buffers outlive recvmsg, and the control
    // message is read only if the kernel filled in one of the right size
    // and type.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space;
        let n = libc::recvmsg(stream.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC);
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        if cmsg.is_null() || (*cmsg).cmsg_level != libc::SOL_SOCKET || (*cmsg).cmsg_type != libc::SCM_RIGHTS {
            return Err(io::Error::other("no descriptor in the message"));
        }
        let fd = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>());
        let name = String::from_utf8_lossy(&data[..n as usize]).into_owned();
        Ok((OwnedFd::from_raw_fd(fd), name))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn a_pty_master_travels_over_a_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let pty = open_pty().unwrap();
        assert!(pty.name.starts_with("/dev/pts/"), "{}", pty.name);
        make_raw(pty.slave.as_raw_fd()).unwrap();
        send_fd(&path, pty.master.as_raw_fd(), &pty.name).unwrap();
        drop(pty.master);
        let (conn, _) = listener.accept().unwrap();
        let (master, name) = recv_fd(&conn).unwrap();
        assert_eq!(name, pty.name);
        set_window_size(master.as_raw_fd(), 30, 100).unwrap();
        assert_eq!(window_size(pty.slave.as_raw_fd()), Some((30, 100)));
        let mut slave = std::fs::File::from(pty.slave);
        slave.write_all(b"through the pty").unwrap();
        let mut m = std::fs::File::from(master);
        let mut buf = [0u8; 64];
        let n = m.read(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"through the pty");
    }
}
