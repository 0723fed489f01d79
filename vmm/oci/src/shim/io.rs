//! A process's standard streams as containerd names them: FIFOs (or
//! files) for stdin, stdout and stderr, or a terminal whose master the
//! supervisor sends to a console socket.
//!
//! Without a terminal the supervisor gets stdout and stderr themselves
//! (the FIFOs containerd reads, opened read-write: see [`open_output`])
//! and, for stdin, a pipe that a thread fills from the stdin FIFO:
//! containerd may open its end later, and `CloseIO` must be able to end
//! the process's input. With a terminal, threads copy the stdin FIFO to
//! the master and the master to the stdout FIFO.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, OpenOptionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::error::{io, Error, Result};
use crate::ops::Streams;

/// The streams containerd asked for.
#[derive(Debug, Clone, Default)]
pub struct Paths {
    /// Standard input ("": none).
    pub stdin: String,
    /// Standard output ("": none).
    pub stdout: String,
    /// Standard error ("": none).
    pub stderr: String,
    /// Whether the process has a terminal.
    pub terminal: bool,
}

/// What keeps a process's streams going: the terminal's master once it
/// came, and the flag that ends its input.
#[derive(Debug, Default)]
pub struct Live {
    /// The terminal's master (a process with a terminal, once started).
    pub master: Mutex<Option<Arc<OwnedFd>>>,
    /// `CloseIO`: no more input.
    pub stdin_closed: AtomicBool,
}

/// A stream's path: a plain path, or a `fifo://` or `file://` URI.
fn path_of(s: &str) -> Result<PathBuf> {
    if let Some(p) = s
        .strip_prefix("fifo://")
        .or_else(|| s.strip_prefix("file://"))
    {
        return Ok(PathBuf::from(p));
    }
    if s.contains("://") {
        return Err(Error::Usage(format!(
            "stream {s:?}: only FIFOs and files are supported (no logging binaries)"
        )));
    }
    Ok(PathBuf::from(s))
}

/// Opens an output stream for writing: a FIFO, a file appended to, or
/// `/dev/null`.
///
/// A FIFO is opened read-write, as containerd's own shims hold a reader
/// beside their writer: containerd's clients (`ctr`, the CRI plugin) open
/// their reading end in the background and may not have it open yet when
/// the process starts, and a client that goes away (containerd restarted)
/// can open it again; the process never takes `SIGPIPE` meanwhile.
fn open_output(s: &str) -> Result<File> {
    if s.is_empty() {
        return File::options()
            .write(true)
            .open("/dev/null")
            .map_err(io("opening /dev/null"));
    }
    let path = path_of(s)?;
    let fifo = std::fs::metadata(&path).is_ok_and(|m| m.file_type().is_fifo());
    let f = OpenOptions::new()
        .read(fifo)
        .append(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(&path)
        .map_err(io(format!("opening {}", path.display())))?;
    set_blocking(&f)?;
    Ok(f)
}

fn set_blocking(f: &File) -> Result<()> {
    // SAFETY: fcntl on a descriptor this function borrows.
    unsafe {
        let flags = libc::fcntl(f.as_raw_fd(), libc::F_GETFL);
        if flags < 0 || libc::fcntl(f.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK) < 0 {
            return Err(io("making a stream blocking")(
                std::io::Error::last_os_error(),
            ));
        }
    }
    Ok(())
}

/// Copies `from` (opened when containerd opens its end) to `to` until
/// either ends or `live` says the input is closed.
fn pump_stdin(from: PathBuf, mut to: File, live: Arc<Live>) {
    std::thread::spawn(move || {
        // Opening for reading waits for containerd's writer.
        let Ok(mut fifo) = File::open(&from) else {
            return;
        };
        let mut buf = vec![0u8; 32 * 1024];
        while !live.stdin_closed.load(Ordering::SeqCst) {
            match fifo.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if live.stdin_closed.load(Ordering::SeqCst) || to.write_all(&buf[..n]).is_err()
                    {
                        break;
                    }
                }
            }
        }
        // `to` closes here: the process reads the end of its input.
    });
}

/// The supervisor's streams for a process without a terminal.
pub fn streams(p: &Paths, live: &Arc<Live>) -> Result<Streams> {
    let stdout = open_output(&p.stdout)?;
    let stderr = open_output(&p.stderr)?;
    let stdin: OwnedFd = if p.stdin.is_empty() {
        File::open("/dev/null")
            .map_err(io("opening /dev/null"))?
            .into()
    } else {
        let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .map_err(|e| io("making a pipe")(e.into()))?;
        pump_stdin(path_of(&p.stdin)?, File::from(w), live.clone());
        r
    };
    Ok(Streams {
        stdin: Arc::new(stdin),
        stdout: Arc::new(stdout.into()),
        stderr: Arc::new(stderr.into()),
    })
}

/// A console socket the supervisor sends the terminal's master to.
#[derive(Debug)]
pub struct Console {
    /// Its path (`--console-socket`).
    pub path: PathBuf,
    listener: UnixListener,
}

impl Drop for Console {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A new console socket in `dir` (made private).
pub fn console(dir: &Path) -> Result<Console> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io(format!("creating {}", dir.display())))?;
    let path = dir.join(format!(
        "{}-{}.sock",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).map_err(io(format!("binding {}", path.display())))?;
    Ok(Console { path, listener })
}

/// Once the supervisor has sent the master to `console`, copies the
/// stdin FIFO to it and it to the stdout FIFO, and keeps it in `live` for
/// resizes.
pub fn serve_terminal(console: Console, p: &Paths, live: &Arc<Live>) -> Result<()> {
    let out = open_output(&p.stdout)?;
    let stdin = (!p.stdin.is_empty())
        .then(|| path_of(&p.stdin))
        .transpose()?;
    let live = live.clone();
    std::thread::spawn(move || {
        let master = match console
            .listener
            .accept()
            .and_then(|(s, _)| crate::console::recv_fd(&s))
        {
            Ok((fd, _)) => Arc::new(fd),
            Err(e) => return log::warn!("no terminal came on {}: {e}", console.path.display()),
        };
        drop(console);
        if let Ok(mut g) = live.master.lock() {
            *g = Some(master.clone());
        }
        if let (Some(from), Ok(to)) = (stdin, master.try_clone()) {
            pump_stdin(from, File::from(to), live.clone());
        }
        let Ok(m) = master.try_clone() else { return };
        let mut m = File::from(m);
        let mut out = out;
        let mut buf = vec![0u8; 32 * 1024];
        // EIO once the terminal's last process has closed it.
        while let Ok(n @ 1..) = m.read(&mut buf) {
            if out.write_all(&buf[..n]).is_err() {
                break;
            }
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn output_fifos_keep_what_is_written_before_the_reader_comes() {
        let d = tempfile::tempdir().unwrap();
        let fifo = d.path().join("out");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        // No reader yet (ctr opens its end in the background): no error,
        // no hang, and nothing lost.
        let mut w = open_output(&format!("fifo://{}", fifo.display())).unwrap();
        w.write_all(b"hi").unwrap();
        let reader = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&fifo)
            .unwrap();
        w.write_all(b"!").unwrap();
        drop(w);
        let mut got = [0u8; 3];
        (&reader).read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hi!");
        // The only writer gone: the reader sees the end.
        assert_eq!((&reader).read(&mut got).unwrap(), 0);
        // Files are appended to; other URIs are refused.
        let file = d.path().join("log");
        std::fs::write(&file, "a").unwrap();
        open_output(&format!("file://{}", file.display())).unwrap().write_all(b"b").unwrap();
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "ab");
        assert!(open_output(d.path().join("missing").to_str().unwrap()).is_err());
        assert!(open_output("binary:///usr/bin/logger").is_err());
        open_output("").unwrap().write_all(b"x").unwrap();
    }

    #[test]
    fn stdin_is_copied_until_containerd_closes_it() {
        let d = tempfile::tempdir().unwrap();
        let fifo = d.path().join("in");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let live = Arc::new(Live::default());
        let s = streams(
            &Paths {
                stdin: fifo.display().to_string(),
                ..Default::default()
            },
            &live,
        )
        .unwrap();
        let mut w = OpenOptions::new().write(true).open(&fifo).unwrap();
        w.write_all(b"input").unwrap();
        drop(w);
        let mut r = File::from(s.stdin.try_clone().unwrap());
        drop(s);
        let mut got = String::new();
        r.read_to_string(&mut got).unwrap();
        assert_eq!(got, "input", "the process reads the input, then its end");
    }
}
