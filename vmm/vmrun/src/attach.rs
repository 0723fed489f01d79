//! A running process's standard streams and signals, for `vmrun run` and
//! `vmrun exec`: output to this terminal (or to the container's log when
//! detached), input from it, signals and window size changes forwarded.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use vmrun_agent_client::{Client, Process, StdioMode};
use vmrun_runtime::container::{LogWriter, Stream};
use vmrun_runtime::sandbox::Cancel;
use vmrun_runtime::signal::{window_size, Relay, Target};

/// Where a process's output goes.
#[derive(Clone)]
pub enum Sink {
    /// This process's stdout and stderr.
    Terminal,
    /// The container's log (detached containers).
    Log(Arc<Mutex<LogWriter>>),
}

/// The stdio mode for a process: a terminal of this one's size when asked
/// and stdin is one, else pipes.
pub fn stdio_mode(tty: bool, interactive: bool) -> StdioMode {
    if tty {
        let (rows, cols) = window_size(libc::STDIN_FILENO).unwrap_or((24, 80));
        StdioMode::Tty { rows, cols }
    } else {
        StdioMode::Piped { stdin: interactive }
    }
}

/// Pumps the process's streams until its output ends, then waits for its
/// exit code. `stdin` passes this process's stdin on; otherwise the
/// process's input is closed. With `tty` the local terminal is in raw mode
/// meanwhile.
pub fn pump(process: &mut Process, sink: &Sink, stdin: bool, tty: bool) -> Result<i32, vmrun_agent_client::Error> {
    let _raw = if tty { RawTerminal::enter() } else { None };
    let has_terminal = tty_open(process);
    let mut pumps = Vec::new();
    for (stream, out) in [(Stream::Stdout, process.stdout.take()), (Stream::Stderr, process.stderr.take())] {
        let Some(mut out) = out else { continue };
        let sink = sink.clone();
        pumps.push(std::thread::spawn(move || copy_out(&mut out, &sink, stream)));
    }
    // A terminal with no one typing stays open (closing its input would
    // end a shell reading it).
    let _held_input = if !stdin && has_terminal { process.stdin.take() } else { None };
    if let Some(mut input) = process.stdin.take() {
        if stdin {
            std::thread::spawn(move || {
                let mut buf = [0u8; 16 * 1024];
                let mut local = std::io::stdin();
                while let Ok(n) = local.read(&mut buf) {
                    if n == 0 || input.write_all(&buf[..n]).is_err() {
                        break;
                    }
                    let _ = input.flush();
                }
                let _ = input.close();
            });
        } else {
            let _ = input.close();
        }
    }
    let code = process.wait();
    for p in pumps {
        let _ = p.join();
    }
    code
}

/// Whether the process has a terminal: one stream for output, none for
/// errors.
fn tty_open(process: &Process) -> bool {
    process.stderr.is_none() && process.stdin.is_some()
}

fn copy_out(from: &mut impl Read, sink: &Sink, stream: Stream) {
    let mut buf = [0u8; 32 * 1024];
    while let Ok(n) = from.read(&mut buf) {
        if n == 0 {
            break;
        }
        let ok = match sink {
            Sink::Terminal => {
                let r = match stream {
                    Stream::Stdout => write_flush(&mut std::io::stdout(), &buf[..n]),
                    Stream::Stderr => write_flush(&mut std::io::stderr(), &buf[..n]),
                };
                r.is_ok()
            }
            Sink::Log(log) => log.lock().map(|mut l| l.write(stream, &buf[..n]).is_ok()).unwrap_or(false),
        };
        if !ok {
            break;
        }
    }
}

fn write_flush(to: &mut impl Write, data: &[u8]) -> std::io::Result<()> {
    to.write_all(data)?;
    to.flush()
}

/// Whether `fd` is a terminal.
pub fn is_tty(fd: i32) -> bool {
    // SAFETY: isatty only inspects the descriptor.
    unsafe { libc::isatty(fd) == 1 }
}

/// The local terminal in raw mode while the container has it; restored on
/// drop.
struct RawTerminal(libc::termios);

impl RawTerminal {
    fn enter() -> Option<Self> {
        // SAFETY: tcgetattr/tcsetattr read and write the termios given;
        // cfmakeraw edits a copy.
        unsafe {
            let mut old: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(libc::STDIN_FILENO, &mut old) != 0 {
                return None;
            }
            let mut raw = old;
            libc::cfmakeraw(&mut raw);
            (libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &raw) == 0).then_some(Self(old))
        }
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        // SAFETY: restores the attributes saved in `enter`.
        unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &self.0) };
    }
}

/// The signals `vmrun run` and `vmrun exec` take: forwarded to the
/// container's process once it runs (SIGWINCH as a resize), and before
/// that, the end of the run (see `vmrun_runtime::signal::Relay`).
const FORWARDED: &[libc::c_int] = &[libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT, libc::SIGWINCH];

/// Signals of a whole run (or exec), from its start. Before the container's
/// process runs, SIGINT, SIGTERM, SIGHUP or SIGQUIT end the run: the VMM
/// (if there is one yet) is killed, so that whatever waits on it returns,
/// and the run reports [`Signals::caught`]; with no VMM yet, the
/// container's directory (if any) is removed and vmrun exits at once. Once
/// the process runs, they are forwarded to it (and SIGWINCH becomes a
/// resize).
#[derive(Clone)]
pub struct Signals(Relay);

impl Signals {
    /// Blocks the signals (call before any other thread starts) and starts
    /// the thread that takes them. `dir` is removed if a signal comes
    /// before any VMM.
    pub fn start(dir: Option<PathBuf>) -> Self {
        Self(Relay::start(FORWARDED, dir))
    }

    /// The container's directory, removed by a signal before any VMM.
    pub fn set_dir(&self, dir: &std::path::Path) {
        self.0.set_dir(dir);
    }

    /// What a signal before the process runs cancels (the sandbox being
    /// started).
    pub fn cancel(&self) -> &Cancel {
        self.0.cancel()
    }

    /// Signals go to the process of container `id` from now on: the
    /// exec'd process `exec_id`, or the container's own; with `tty`, its
    /// terminal follows this one's size.
    pub fn forward_to(&self, client: Client, id: String, exec_id: Option<String>, tty: bool) {
        self.0.forward_to(Target { client, id, exec_id, terminal: tty.then_some(libc::STDIN_FILENO) });
    }

    /// The signal that ended the run before its process ran, if any.
    pub fn caught(&self) -> Option<i32> {
        self.0.cancel().cancelled()
    }
}
