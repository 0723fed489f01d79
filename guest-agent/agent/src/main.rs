//! `vmrun-agent`: the guest's PID 1, or (with `--listen-unix`) an ordinary
//! process on a host.

// `main` is the C entry point: the Rust runtime's startup (stack guards,
// alternate signal stacks, SIGPIPE) costs system calls the guest cannot
// spare; the agent does what it needs itself.
#![no_main]

use vmrun_agent::server::{self, ServeError};
use vmrun_agent::settings::{self, Listen, Settings};
use vmrun_agent::{init, log};

fn serve(settings: Settings, started_ms: u64) -> Result<(), ServeError> {
    let sigfd = server::sigchld_fd().map_err(ServeError::Signalfd)?;
    let listener =
        server::listen(&settings.listen).map_err(|source| ServeError::Listen { listen: settings.listen.clone(), source })?;
    let now = init::monotonic_ms();
    let place = match &settings.listen {
        Listen::Vsock(p) => format!("vsock port {p}"),
        Listen::Unix(p) => format!("{}", p.display()),
    };
    let line = format_args!("ready on {place} ({} ms after the agent started, {now} ms after boot)", now.saturating_sub(started_ms));
    if settings.guest {
        log::info(line);
    } else {
        log::debug(line);
    }
    if settings.guest {
        if let Err(e) = vmrun_agent::net::loopback_up() {
            log::error(format_args!("lo: {e}"));
        }
        if let Some(n) = &settings.net {
            if let Err(e) = vmrun_agent::net::configure("eth0", n) {
                log::error(format_args!("eth0: {e}"));
            }
        }
    }
    let guest = settings.guest;
    let mut srv = server::Server::new(settings, listener, sigfd).map_err(ServeError::EventLoop)?;
    let r = srv.run().map_err(ServeError::EventLoop);
    if !guest {
        srv.cleanup();
    }
    r
}

/// The C entry point.
#[no_mangle]
pub extern "C" fn main(_argc: libc::c_int, _argv: *const *const libc::c_char) -> libc::c_int {
    let started_ms = init::monotonic_ms();
    init::process_setup();
    // SAFETY: getpid cannot fail.
    let guest = unsafe { libc::getpid() } == 1;
    let settings = if guest {
        init::tune_malloc();
        init::leave_initramfs();
        init::mount_basics();
        match init::guest_settings() {
            Ok(s) => s,
            Err(e) => {
                log::error(format_args!("{e}; using the defaults"));
                settings::from_pairs([]).unwrap_or_else(|_| init::end_guest())
            }
        }
    } else {
        let args: Vec<String> = std::env::args().skip(1).collect();
        if args.iter().any(|a| a == "--help" || a == "-h") {
            println!("{}", settings::USAGE);
            return 0;
        }
        match settings::from_args(&args) {
            Ok(Some(s)) => s,
            Ok(None) => {
                eprintln!("{}", settings::USAGE);
                return 2;
            }
            Err(e) => {
                eprintln!("vmrun-agent: {e}");
                return 2;
            }
        }
    };
    if settings.debug {
        log::set_level(log::DEBUG);
    }
    if !guest {
        if let Err(e) = init::host_setup() {
            log::error(format_args!("host setup (the agent needs root): {e}"));
            return 1;
        }
    }
    let r = serve(settings, started_ms);
    if let Err(e) = &r {
        log::error(format_args!("{e}"));
    }
    if guest {
        init::end_guest();
    }
    i32::from(r.is_err())
}
