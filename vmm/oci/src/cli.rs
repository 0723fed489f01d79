//! The command line, as runc callers (containerd's shim, CRI-O, podman)
//! use it: global flags before the command, runc's commands and flags,
//! errors on standard error (and in the `--log` file) with exit status 1.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::cgroups::{self, UpdateArgs};
use crate::error::{Error, Result};
use crate::logger;
use crate::ops::{self, CreateArgs, Ctx, ExecArgs};
use crate::state::Root;

/// vmrun-oci: an OCI runtime with runc's command line whose containers run
/// in vmrun microVMs.
#[derive(Parser, Debug)]
#[command(name = "vmrun-oci", disable_version_flag = true)]
struct Cli {
    /// Where container states live.
    #[arg(long, global = true, default_value = "/run/vmrun-oci")]
    root: PathBuf,
    /// Append the runtime's log to this file.
    #[arg(long, global = true)]
    log: Option<PathBuf>,
    /// The log's format: text or json.
    #[arg(long = "log-format", global = true, default_value = "text")]
    log_format: String,
    /// Accepted for runc compatibility; the container's cgroup is in its
    /// VM.
    #[arg(long = "systemd-cgroup", global = true)]
    systemd_cgroup: bool,
    /// Accepted for runc compatibility (`--rootless[=true|false|auto]`).
    #[arg(long, global = true, num_args = 0..=1, default_missing_value = "true", require_equals = true)]
    rootless: Option<String>,
    /// Log debug messages.
    #[arg(long, global = true)]
    debug: bool,
    /// Print the version.
    #[arg(short = 'v', long = "version")]
    version: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create a container from a bundle: its VM runs, its process waits for
    /// `start`.
    Create {
        /// The bundle (directory with config.json).
        #[arg(short, long)]
        bundle: Option<PathBuf>,
        /// Write the container's pid here.
        #[arg(long = "pid-file")]
        pid_file: Option<PathBuf>,
        /// Send the terminal's master to this Unix socket.
        #[arg(long = "console-socket")]
        console_socket: Option<PathBuf>,
        /// Accepted for runc compatibility.
        #[arg(long = "no-pivot")]
        no_pivot: bool,
        /// Accepted for runc compatibility.
        #[arg(long = "no-new-keyring")]
        no_new_keyring: bool,
        /// Accepted for runc compatibility; no descriptors are passed.
        #[arg(long = "preserve-fds")]
        preserve_fds: Option<u32>,
        /// The container's id.
        id: String,
    },
    /// Start a created container's process.
    Start {
        /// The container's id.
        id: String,
    },
    /// Print a container's state as JSON.
    State {
        /// The container's id.
        id: String,
    },
    /// Send a signal (default SIGTERM) to the container's process.
    Kill {
        /// Signal exec'd processes too.
        #[arg(short, long)]
        all: bool,
        /// The container's id.
        id: String,
        /// The signal: a name (KILL, SIGKILL) or a number.
        signal: Option<String>,
    },
    /// Remove a container.
    Delete {
        /// Kill it first if it runs.
        #[arg(short, long)]
        force: bool,
        /// The container's id.
        id: String,
    },
    /// Run another process in a running container.
    #[command(trailing_var_arg = true)]
    Exec {
        /// The process, as a JSON file (runc's process.json).
        #[arg(short, long)]
        process: Option<PathBuf>,
        /// Run it in the background.
        #[arg(short, long)]
        detach: bool,
        /// Write its pid here.
        #[arg(long = "pid-file")]
        pid_file: Option<PathBuf>,
        /// Send the terminal's master to this Unix socket.
        #[arg(long = "console-socket")]
        console_socket: Option<PathBuf>,
        /// Give it a terminal.
        #[arg(short, long)]
        tty: bool,
        /// Working directory.
        #[arg(long)]
        cwd: Option<String>,
        /// Extra environment (NAME=value).
        #[arg(short, long)]
        env: Vec<String>,
        /// User: uid[:gid].
        #[arg(short, long)]
        user: Option<String>,
        /// Accepted for runc compatibility.
        #[arg(long = "preserve-fds")]
        preserve_fds: Option<u32>,
        /// Set no_new_privs for the process.
        #[arg(long = "no-new-privs")]
        no_new_privs: bool,
        /// Add a capability to its bounding, effective and permitted sets
        /// (`CAP_NET_ADMIN`); may be repeated.
        #[arg(short = 'c', long = "cap")]
        cap: Vec<String>,
        /// The container's id.
        id: String,
        /// The command and its arguments (without --process).
        command: Vec<String>,
    },
    /// List the container's host processes.
    #[command(trailing_var_arg = true)]
    Ps {
        /// table or json.
        #[arg(short, long, default_value = "table")]
        format: String,
        /// The container's id.
        id: String,
        /// Accepted for runc compatibility (ps options).
        ps_args: Vec<String>,
    },
    /// Print the container's cgroup statistics (in the guest) as runc's
    /// events JSON: once with --stats, else every --interval.
    Events {
        /// Print the statistics once.
        #[arg(long)]
        stats: bool,
        /// Time between statistics events.
        #[arg(long, default_value = "5s")]
        interval: String,
        /// The container's id.
        id: String,
    },
    /// Change the container's cgroup limits in the guest (memory within
    /// the VM's, which cannot change).
    Update(UpdateArgs),
    /// Freeze the container's processes (its cgroup in the guest).
    Pause {
        /// The container's id.
        id: String,
    },
    /// Let a paused container's processes run again.
    Resume {
        /// The container's id.
        id: String,
    },
    /// Print what this runtime supports, as JSON.
    Features,
    /// Write a default config.json.
    Spec {
        /// The bundle to write it in.
        #[arg(short, long)]
        bundle: Option<PathBuf>,
    },
    /// (internal) Own a container's VM: started by `create`.
    #[command(hide = true)]
    Supervise {
        /// The container's id.
        id: String,
    },
    /// (internal) Hold the container's pid in its namespaces: started by
    /// `create`.
    #[command(hide = true)]
    Hold,
    /// (internal) Own an exec'd process: started by `exec --detach`.
    #[command(hide = true)]
    ExecSupervise {
        /// The container's id.
        id: String,
        /// The process's id in the guest.
        exec_id: String,
    },
}

/// The version lines (`runc --version` prints the same kind).
pub fn version() -> String {
    format!("vmrun-oci version {}\nspec: 1.1.0\n", env!("CARGO_PKG_VERSION"))
}

fn run(cli: Cli, ctx: &Ctx) -> Result<i32> {
    let Some(command) = cli.command else {
        return Err(Error::Usage("no command given (see --help)".into()));
    };
    match command {
        Command::Create { bundle, pid_file, console_socket, id, .. } => {
            ops::create(ctx, &CreateArgs { id, bundle, pid_file, console_socket, streams: None })
        }
        Command::Start { id } => ops::start(ctx, &id),
        Command::State { id } => ops::state(ctx, &id),
        Command::Kill { all, id, signal } => ops::kill(ctx, &id, signal.as_deref(), all),
        Command::Delete { force, id } => ops::delete(ctx, &id, force),
        Command::Exec { process, detach, pid_file, console_socket, tty, cwd, env, user, no_new_privs, cap, id, command, .. } => {
            ops::exec(ctx, &ExecArgs { id, process, detach, pid_file, console_socket, tty, cwd, env, user, no_new_privs, caps: cap, command, ..Default::default() })
        }
        Command::Ps { format, id, .. } => ops::ps(ctx, &id, &format),
        Command::Events { stats, interval, id } => cgroups::events(ctx, &id, stats, cgroups::parse_interval(&interval)?),
        Command::Update(args) => cgroups::update(ctx, &args),
        Command::Pause { id } => ops::pause(ctx, &id, true),
        Command::Resume { id } => ops::pause(ctx, &id, false),
        Command::Features => ops::features(),
        Command::Spec { bundle } => ops::spec(bundle.as_deref()),
        Command::Hold => Ok(crate::holder::hold()),
        Command::Supervise { id } => Ok(crate::supervisor::supervise(&ctx.root, &id)),
        Command::ExecSupervise { id, exec_id } => Ok(crate::supervisor::exec_supervise(&ctx.root, &id, &exec_id)),
    }
}

/// Reports an error: on standard error, and in the log when it is a file.
fn report(e: &Error) {
    log::error!("{e}");
    if logger::to_file() {
        eprintln!("vmrun-oci: {e}");
    }
}

/// Runs the command line; the process's exit status.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind;
            let code = if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) { 0 } else { 1 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    if cli.version {
        print!("{}", version());
        return ExitCode::SUCCESS;
    }
    // The holder touches nothing of the root or the log: it may be in
    // another mount namespace, or a user namespace that owns neither.
    if matches!(cli.command, Some(Command::Hold)) {
        return ExitCode::from(u8::try_from(crate::holder::hold()).unwrap_or(255));
    }
    let format = match cli.log_format.parse::<logger::Format>() {
        Ok(f) => f,
        Err(e) => {
            eprintln!("vmrun-oci: {e}");
            return ExitCode::from(1);
        }
    };
    logger::init(cli.log.as_deref(), format, cli.debug);
    let root = match Root::new(&cli.root) {
        Ok(r) => r,
        Err(e) => {
            report(&e);
            return ExitCode::from(1);
        }
    };
    let ctx = Ctx { root, log: cli.log.clone(), log_format: format, debug: cli.debug, exe: None };
    match run(cli, &ctx) {
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(255)),
        Err(e) => {
            report(&e);
            ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn runc_command_lines_parse() {
        let c = Cli::try_parse_from([
            "runc", "--root", "/run/containerd/runc/default", "--log", "/b/log.json", "--log-format", "json", "--systemd-cgroup",
            "create", "--bundle", "/b", "--pid-file", "/b/init.pid", "--no-pivot", "--no-new-keyring", "c1",
        ])
        .unwrap();
        assert_eq!(c.log_format, "json");
        assert!(matches!(c.command, Some(Command::Create { ref id, no_pivot: true, .. }) if id == "c1"));
        let c = Cli::try_parse_from(["runc", "--root", "/r", "kill", "--all", "c1", "9"]).unwrap();
        assert!(matches!(c.command, Some(Command::Kill { all: true, ref signal, .. }) if signal.as_deref() == Some("9")));
        let c = Cli::try_parse_from(["runc", "exec", "--process", "/tmp/p.json", "--detach", "--pid-file", "/b/e.pid", "c1"]).unwrap();
        assert!(matches!(c.command, Some(Command::Exec { detach: true, ref command, .. }) if command.is_empty()));
        let c = Cli::try_parse_from(["runc", "exec", "c1", "sh", "-c", "echo -n x"]).unwrap();
        assert!(matches!(c.command, Some(Command::Exec { ref command, .. }) if command == &["sh", "-c", "echo -n x"]));
        let c = Cli::try_parse_from(["runc", "ps", "--format", "json", "c1"]).unwrap();
        assert!(matches!(c.command, Some(Command::Ps { ref format, .. }) if format == "json"));
        let c = Cli::try_parse_from(["runc", "delete", "--force", "c1"]).unwrap();
        assert!(matches!(c.command, Some(Command::Delete { force: true, .. })));
        assert!(Cli::try_parse_from(["runc", "--version"]).unwrap().version);
        let c = Cli::try_parse_from(["runc", "--rootless=false", "spec", "--bundle", "/b"]).unwrap();
        assert_eq!(c.rootless.as_deref(), Some("false"));
        assert_eq!(Cli::try_parse_from(["runc", "spec", "--rootless"]).unwrap().rootless.as_deref(), Some("true"));
        let c = Cli::try_parse_from(["runc", "events", "--stats", "c1"]).unwrap();
        assert!(matches!(c.command, Some(Command::Events { stats: true, ref interval, .. }) if interval == "5s"));
        let c = Cli::try_parse_from(["runc", "update", "--memory", "-1", "--cpu-share", "512", "--pids-limit", "-1", "-r", "-", "c1"]).unwrap();
        let Some(Command::Update(u)) = c.command else { panic!("not an update") };
        assert_eq!((u.memory.as_deref(), u.cpu_shares, u.pids_limit, u.id.as_str()), (Some("-1"), Some(512), Some(-1), "c1"));
        assert_eq!(u.resources, Some(PathBuf::from("-")));
    }
}
