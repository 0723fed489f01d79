//! `vmrun-vmm`: one VMM process. It reads its configuration (the VMM API's
//! [`VmmConfig`]: boot or restore) as JSON from a file or an inherited
//! descriptor, enters its jail if the configuration says so, runs the VM
//! with its seccomp filters and serves its control socket, until the VM
//! ends.
//!
//! ```text
//! vmrun-vmm --config FILE [--ready-fd N]
//! vmrun-vmm --config-fd N [--ready-fd N]
//! ```
//!
//! `--ready-fd N`: an inherited descriptor (a pipe's write end) that gets
//! one byte once the control and vsock sockets listen; it stays open until
//! the VMM ends, so whoever started it waits on it instead of polling for
//! the socket files (end of file first: the VMM failed).
//!
//! Exit status: 0 when the guest ended itself (reset) or was stopped
//! through the control socket, 1 when the VM could not be built, 2 for a
//! bad command line, 3 when the guest crashed, 128+N when signal N stopped
//! it. Its messages go to standard error (`VMRUN_LOG` sets the level).

use std::io::Read;
use std::os::fd::FromRawFd;
use std::process::ExitCode;
use std::time::Instant;

use vmrun_vmm::VmmConfig;

const USAGE: &str = "usage: vmrun-vmm (--config FILE | --config-fd N) [--ready-fd N]";

/// Where the configuration comes from.
enum Source {
    File(std::path::PathBuf),
    Fd(i32),
}

/// The command line: where the configuration comes from, and the
/// readiness descriptor.
fn parse_args(mut args: impl Iterator<Item = std::ffi::OsString>) -> Result<(Source, Option<i32>), String> {
    let fd_value = |flag: &str, value: &std::ffi::OsString| {
        value
            .to_str()
            .and_then(|v| v.parse::<i32>().ok())
            .filter(|fd| *fd > 2)
            .ok_or_else(|| format!("{flag} needs a descriptor number above 2, not {:?}", value.to_string_lossy()))
    };
    let (mut source, mut ready) = (None, None);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or_else(|| format!("{} needs a value\n{USAGE}", flag.to_string_lossy()))?;
        match flag.to_str() {
            Some("--config") if source.is_none() => source = Some(Source::File(value.into())),
            Some("--config-fd") if source.is_none() => source = Some(Source::Fd(fd_value("--config-fd", &value)?)),
            Some("--ready-fd") if ready.is_none() => ready = Some(fd_value("--ready-fd", &value)?),
            _ => return Err(format!("unexpected argument {:?}\n{USAGE}", flag.to_string_lossy())),
        }
    }
    Ok((source.ok_or_else(|| USAGE.to_string())?, ready))
}

/// Takes over the readiness descriptor (checked open; close-on-exec, so
/// nothing the VMM might start inherits it).
fn ready_file(fd: Option<i32>) -> Result<Option<std::fs::File>, String> {
    let Some(fd) = fd else { return Ok(None) };
    // SAFETY: fcntl with integer arguments only; it fails on a descriptor
    // that is not open.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } < 0 {
        return Err(format!("--ready-fd {fd}: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: open (checked above) and handed to this process for the VMM
    // to signal on; nothing else here owns it.
    Ok(Some(unsafe { std::fs::File::from_raw_fd(fd) }))
}

/// Why the configuration could not be read.
#[derive(Debug, thiserror::Error)]
enum ReadConfigError {
    #[error(transparent)]
    Config(#[from] vmrun_vmm_api::ConfigError),
    #[error("--config-fd {fd} is not an open descriptor: {source} (the VMM must inherit it)")]
    FdClosed { fd: i32, source: std::io::Error },
    #[error("cannot read the configuration from descriptor {fd}: {source}")]
    FdRead { fd: i32, source: std::io::Error },
}

fn read_config(source: &Source) -> Result<VmmConfig, ReadConfigError> {
    match source {
        Source::File(path) => Ok(VmmConfig::read(path)?),
        Source::Fd(fd) => {
            let fd = *fd;
            // SAFETY: F_GETFD only inspects the descriptor table.
            if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
                return Err(ReadConfigError::FdClosed { fd, source: std::io::Error::last_os_error() });
            }
            // SAFETY: the descriptor is open (checked above) and was handed
            // to this process for its configuration alone: the File owns it
            // and closes it once read, before the jail or the VM exist.
            let mut file = unsafe { std::fs::File::from_raw_fd(fd) };
            let mut bytes = Vec::new();
            file.read_to_end(&mut bytes).map_err(|source| ReadConfigError::FdRead { fd, source })?;
            Ok(VmmConfig::from_json(&bytes)?)
        }
    }
}

fn main() -> ExitCode {
    let start = Instant::now();
    vmrun_vmm::logger::init("vmrun-vmm");
    let mut args = std::env::args_os().skip(1).peekable();
    match args.peek().and_then(|a| a.to_str()) {
        Some("--help" | "-h") => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Some("--version" | "-V") => {
            println!("vmrun-vmm {} (configuration version {})", env!("CARGO_PKG_VERSION"), vmrun_vmm_api::VERSION);
            return ExitCode::SUCCESS;
        }
        _ => {}
    }
    let (source, ready) = match parse_args(args).and_then(|(s, r)| Ok((s, ready_file(r)?))) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("vmrun-vmm: error: {e}");
            return ExitCode::from(2);
        }
    };
    let config = match read_config(&source) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("vmrun-vmm: error: {e}");
            return ExitCode::from(1);
        }
    };
    match vmrun_vmm::launch(config, start, ready) {
        Ok((reason, _report)) => {
            let code = reason.exit_code();
            if code == 0 {
                log::info!("{reason}");
            } else {
                log::error!("{reason}");
            }
            ExitCode::from(code.clamp(0, 255) as u8)
        }
        Err(e) => {
            eprintln!("vmrun-vmm: error: cannot run the VM: {e}");
            ExitCode::from(1)
        }
    }
}
