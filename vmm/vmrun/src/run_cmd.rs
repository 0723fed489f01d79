//! `vmrun run IMAGE [COMMAND...]`: a container in a fresh microVM, in the
//! foreground, like `docker run`.
//!
//! The image is resolved in the store (pulled if it is not there), its
//! layers are put on a read-only disk, a VMM (`vmrun boot`) boots the guest
//! kernel with the agent as init, and the agent unpacks the layers and runs
//! the process. Its output is printed as it comes, standard input is passed
//! on with `-i`, SIGINT/SIGTERM/SIGHUP/SIGQUIT are forwarded to it, and
//! `vmrun run` exits with its exit code (125 when vmrun itself failed, 126
//! and 127 when the command cannot be run or found, 128+N when signal N
//! killed it).

use std::io::{Read, Write};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use vmrun_agent_client::{Options, StdioMode};
use vmrun_agent_protocol::{CreateContainer, ExecProcess, ImageConfig, LayerSource, RootfsSpec, UnpackLimits};
use vmrun_runtime::artifacts::Artifacts;
use vmrun_runtime::home::Home;
use vmrun_runtime::template::PREPARED_ID;
use vmrun_runtime::vm::VmSpec;

use crate::images_cmd;

/// `vmrun run`'s flags, as docker spells them.
#[derive(Args, Debug)]
#[command(trailing_var_arg = true)]
pub struct RunArgs {
    /// Remove the container when it exits (always the case today: the
    /// microVM and its files go away with the process).
    #[arg(long)]
    pub rm: bool,
    /// Keep standard input open and pass it to the container.
    #[arg(short, long)]
    pub interactive: bool,
    /// Give the container a terminal.
    #[arg(short, long)]
    pub tty: bool,
    /// Set an environment variable (KEY=VALUE, or KEY to take it from here).
    #[arg(short = 'e', long = "env", value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// Read environment variables from a file (KEY=VALUE lines).
    #[arg(long = "env-file", value_name = "FILE")]
    pub env_file: Vec<PathBuf>,
    /// Working directory inside the container.
    #[arg(short = 'w', long = "workdir")]
    pub workdir: Option<String>,
    /// User (name or uid, optionally :group or :gid).
    #[arg(short = 'u', long)]
    pub user: Option<String>,
    /// Override the image's entrypoint.
    #[arg(long)]
    pub entrypoint: Option<String>,
    /// A name for the container (also its host name).
    #[arg(long)]
    pub name: Option<String>,
    /// Memory of the microVM (e.g. 512m, 1g).
    #[arg(short = 'm', long, default_value = "512m")]
    pub memory: String,
    /// vCPUs of the microVM.
    #[arg(long, default_value_t = 1)]
    pub cpus: u8,
    /// Guest kernel (default: $VMRUN_KERNEL, else $VMRUN_HOME/boot/vmlinux).
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// Agent initramfs (default: $VMRUN_AGENT_INITRD, else $VMRUN_HOME/boot/agent.cpio).
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    /// Boot the microVM instead of restoring a warm template.
    #[arg(long)]
    pub cold: bool,
    /// The image.
    pub image: String,
    /// The command and its arguments (default: the image's).
    pub command: Vec<String>,
}

/// Parses `512m`, `1g`, `256` (MiB) into MiB.
pub fn parse_memory(s: &str) -> Result<u32> {
    let t = s.trim().to_ascii_lowercase();
    let (num, mult) = match t.chars().last() {
        Some('g') => (&t[..t.len() - 1], 1024u64),
        Some('m') => (&t[..t.len() - 1], 1),
        Some('k') => (&t[..t.len() - 1], 0),
        _ => (t.as_str(), 1),
    };
    let n: u64 = num.trim_end_matches('b').parse().map_err(|_| anyhow!("invalid memory size {s:?} (use e.g. 512m or 1g)"))?;
    let mib = if mult == 0 { n / 1024 } else { n * mult };
    u32::try_from(mib).ok().filter(|m| *m >= 64).ok_or_else(|| anyhow!("memory size {s:?} must be at least 64m"))
}

fn env_entries(args: &RunArgs) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for f in &args.env_file {
        let text = std::fs::read_to_string(f).with_context(|| format!("cannot read env file {}", f.display()))?;
        for line in text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
            out.push(expand_env(line));
        }
    }
    out.extend(args.env.iter().map(|e| expand_env(e)));
    Ok(out)
}

/// `KEY` alone takes the value from this process's environment.
fn expand_env(e: &str) -> String {
    if e.contains('=') {
        e.to_string()
    } else {
        format!("{e}={}", std::env::var(e).unwrap_or_default())
    }
}

fn container_id(name: Option<&str>) -> String {
    if let Some(n) = name {
        return n.to_string();
    }
    let mut b = [0u8; 6];
    // SAFETY: getrandom writes at most b.len() bytes into b.
    unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 64
        && !n.starts_with(['.', '-'])
        && n.chars().all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
}

/// Finds the image, pulling it if the store does not have it.
fn image(home: &Home, name: &str) -> Result<vmrun_images::Image> {
    let dir = home.images();
    match images_cmd::resolve_verified(&dir, name) {
        Ok(i) => Ok(i),
        Err(first) => {
            if name.parse::<vmrun_images::Reference>().is_err() {
                return Err(first);
            }
            eprintln!("Unable to find image '{name}' locally");
            images_cmd::pull_reporting(&dir, name, &mut std::io::stderr()).with_context(|| format!("{first:#}"))?;
            images_cmd::resolve_verified(&dir, name)
        }
    }
}

/// Times the phases of one run; printed with `VMRUN_LOG=debug`.
struct Phases(std::time::Instant);

impl Phases {
    fn mark(&mut self, phase: &str) {
        log::debug!("phase {phase}: {:.1} ms", self.0.elapsed().as_secs_f64() * 1000.0);
        self.0 = std::time::Instant::now();
    }
}

/// The user's changes to the image's process, as start-time overrides:
/// arguments (entrypoint and command, when either was given), extra
/// environment, working directory, user.
fn process_overrides(args: &RunArgs, image: &ImageConfig) -> Result<ExecProcess> {
    let mut entrypoint = image.entrypoint.clone();
    let mut cmd = image.cmd.clone();
    if let Some(e) = &args.entrypoint {
        entrypoint = if e.is_empty() { Vec::new() } else { vec![e.clone()] };
        cmd.clear();
    }
    if !args.command.is_empty() {
        cmd = args.command.clone();
    }
    let changed = args.entrypoint.is_some() || !args.command.is_empty();
    Ok(ExecProcess {
        args: if changed { entrypoint.into_iter().chain(cmd).collect() } else { Vec::new() },
        env: env_entries(args)?,
        working_dir: args.workdir.clone(),
        user: args.user.clone(),
    })
}

/// The configuration a container is created with when it is not prepared.
fn apply_overrides(config: &mut ImageConfig, o: &ExecProcess) {
    if !o.args.is_empty() {
        config.entrypoint.clear();
        config.cmd = o.args.clone();
    }
    config.env.extend(o.env.iter().cloned());
    if let Some(w) = &o.working_dir {
        config.working_dir = w.clone();
    }
    if let Some(u) = &o.user {
        config.user = u.clone();
    }
}

/// Runs the container; returns the exit code for `vmrun run`.
pub fn run(args: RunArgs) -> Result<i32> {
    let mut phases = Phases(std::time::Instant::now());
    if let Some(n) = &args.name {
        if !valid_name(n) {
            bail!("invalid container name {n:?}: 1 to 64 of [A-Za-z0-9_.-], not starting with . or -");
        }
    }
    let mem_mib = parse_memory(&args.memory)?;
    let home = Home::from_env()?;
    let image = image(&home, &args.image)?;
    phases.mark("store lookup");
    let artifacts = Artifacts::find(&home, args.kernel.as_deref(), args.initrd.as_deref())?;
    let (layer_disk, digests) = vmrun_runtime::layer_disk::for_image(&home.layer_disks(), &image)?;
    phases.mark("layer disk");

    let id = container_id(args.name.as_deref());
    let dir = home.containers().join(&id);
    if dir.exists() {
        bail!("a container named {id:?} exists already ({})", dir.display());
    }
    let spec = VmSpec {
        artifacts,
        mem_mib,
        cpus: args.cpus,
        layer_disk,
        dir: dir.clone(),
        vmm_exe: std::env::current_exe().context("cannot find the vmrun executable")?,
    };
    let result = run_in_vm(&args, &spec, &id, &image, digests, &mut phases);
    vmrun_runtime::vm::remove_dir(&dir);
    result
}

fn run_in_vm(
    args: &RunArgs,
    spec: &VmSpec,
    id: &str,
    image: &vmrun_images::Image,
    digests: Vec<vmrun_layerdisk::Digest>,
    phases: &mut Phases,
) -> Result<i32> {
    let c = &image.config;
    let mut config = ImageConfig {
        entrypoint: c.entrypoint.clone(),
        cmd: c.cmd.clone(),
        env: c.env.clone(),
        working_dir: c.working_dir.clone().unwrap_or_default(),
        user: c.user.clone().unwrap_or_default(),
        hostname: args.name.clone().unwrap_or_else(|| "vmrun".into()),
        ..Default::default()
    };
    let image_defaults = config.clone();
    let overrides = process_overrides(args, &config)?;
    apply_overrides(&mut config, &overrides);
    if config.entrypoint.is_empty() && config.cmd.is_empty() {
        bail!("no command given and the image has none");
    }
    let create = |id: &str, config: ImageConfig| CreateContainer {
        id: id.to_string(),
        layers: LayerSource { disk: "/dev/vda".into(), layers: digests.clone() },
        rootfs: RootfsSpec::default(),
        config,
        limits: UnpackLimits::default(),
    };

    // Cold: boot. Warm: restore the image's prepared template if there is
    // one (the image already unpacked), else the base template, and
    // prepare the image for next time. A --name (host name) is baked in at
    // creation, so named containers are never prepared.
    let home = Home::from_env()?;
    let (mut vm, client, in_vm_id, prepared) = if args.cold {
        let mut vm = spec.boot()?;
        phases.mark("VM start");
        let client = vm.connect_agent(Duration::from_secs(900), Options::default())?;
        phases.mark("guest to agent ready");
        client.create_container(&create(id, config))?;
        phases.mark("unpack");
        (vm, client, id.to_string(), false)
    } else {
        let base = vmrun_runtime::template::ensure(&home.templates(), spec, &|m| eprintln!("vmrun: {m}"))?;
        let prepared_dir = vmrun_runtime::template::prepared_dir(&base, &image.manifest_digest.to_string());
        let preparable = args.name.is_none();
        if preparable && vmrun_runtime::template::is_ready(&prepared_dir) {
            let mut vm = vmrun_runtime::template::restore(&prepared_dir, spec)?;
            phases.mark("VM start");
            let client = vm.connect_agent(Duration::from_secs(900), Options::default())?;
            phases.mark("guest to agent ready (image unpacked in the template)");
            (vm, client, PREPARED_ID.to_string(), true)
        } else {
            let mut vm = vmrun_runtime::template::restore(&base, spec)?;
            phases.mark("VM start");
            let client = vm.connect_agent(Duration::from_secs(900), Options::default())?;
            phases.mark("guest to agent ready");
            if preparable {
                client.create_container(&create(PREPARED_ID, image_defaults))?;
                phases.mark("unpack");
                vmrun_runtime::template::save_prepared(&spec.vmm_exe, &vm.control, &prepared_dir);
                phases.mark("prepared template saved");
                (vm, client, PREPARED_ID.to_string(), true)
            } else {
                client.create_container(&create(id, config))?;
                phases.mark("unpack");
                (vm, client, id.to_string(), false)
            }
        }
    };
    let id = in_vm_id.as_str();

    let tty = args.tty && stdio_is_tty(libc::STDIN_FILENO);
    let mode = if tty {
        let (rows, cols) = window_size().unwrap_or((24, 80));
        StdioMode::Tty { rows, cols }
    } else {
        StdioMode::Piped { stdin: args.interactive }
    };
    let started = if prepared { client.start_with(id, mode, Some(&overrides)) } else { client.start(id, mode) };
    let mut process = match started {
        Ok(p) => p,
        Err(e) => {
            if let Some(code) = e.exit_code() {
                eprintln!("vmrun: {e}");
                let _ = client.shutdown();
                let _ = vm.wait(Duration::from_secs(30));
                return Ok(code);
            }
            return Err(e.into());
        }
    };
    let _raw = if tty { RawTerminal::enter() } else { None };

    let mut pumps = Vec::new();
    if let Some(mut out) = process.stdout.take() {
        pumps.push(std::thread::spawn(move || copy_out(&mut out, &mut std::io::stdout())));
    }
    if let Some(mut err) = process.stderr.take() {
        pumps.push(std::thread::spawn(move || copy_out(&mut err, &mut std::io::stderr())));
    }
    if let Some(mut input) = process.stdin.take() {
        if args.interactive || tty {
            std::thread::spawn(move || {
                let mut buf = [0u8; 16 * 1024];
                let mut stdin = std::io::stdin();
                while let Ok(n) = stdin.read(&mut buf) {
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
    let signals = forward_signals(client.clone(), id.to_string(), tty);
    let code = process.wait()?;
    for p in pumps {
        let _ = p.join();
    }
    drop(signals);
    phases.mark("process run");
    let _ = client.shutdown();
    let status = vm.wait(Duration::from_secs(30))?;
    if !status.success() {
        log::warn!("the VMM ended with {status}");
    }
    phases.mark("teardown");
    Ok(code)
}

fn copy_out(from: &mut impl Read, to: &mut impl Write) {
    let mut buf = [0u8; 32 * 1024];
    while let Ok(n) = from.read(&mut buf) {
        if n == 0 || to.write_all(&buf[..n]).is_err() {
            break;
        }
        let _ = to.flush();
    }
}

fn stdio_is_tty(fd: i32) -> bool {
    // SAFETY: isatty only inspects the descriptor.
    unsafe { libc::isatty(fd) == 1 }
}

fn window_size() -> Option<(u16, u16)> {
    // SAFETY: TIOCGWINSZ fills the winsize it is given.
    let ws = unsafe {
        let mut ws: libc::winsize = std::mem::zeroed();
        (libc::ioctl(libc::STDIN_FILENO, libc::TIOCGWINSZ, &mut ws) == 0).then_some(ws)
    }?;
    (ws.ws_row > 0 && ws.ws_col > 0).then_some((ws.ws_row, ws.ws_col))
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

/// Forwards SIGINT, SIGTERM, SIGHUP and SIGQUIT to the container's process
/// (and SIGWINCH as a terminal resize), from a thread that waits for them;
/// they are blocked everywhere else.
fn forward_signals(client: vmrun_agent_client::Client, id: String, tty: bool) -> std::thread::JoinHandle<()> {
    // SAFETY: builds a signal set and blocks it for this thread (threads
    // started later inherit the mask).
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT, libc::SIGWINCH] {
            libc::sigaddset(&mut set, s);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    };
    std::thread::spawn(move || loop {
        let mut sig: libc::c_int = 0;
        // SAFETY: sigwait reads `set` and writes the signal number to `sig`.
        if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
            return;
        }
        let result = if sig == libc::SIGWINCH {
            if !tty {
                continue;
            }
            match window_size() {
                Some((rows, cols)) => client.resize(&id, None, rows, cols),
                None => continue,
            }
        } else {
            client.signal(&id, None, sig)
        };
        if result.is_err() {
            return;
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_sizes() {
        assert_eq!(parse_memory("512m").unwrap(), 512);
        assert_eq!(parse_memory("1g").unwrap(), 1024);
        assert_eq!(parse_memory("2G").unwrap(), 2048);
        assert_eq!(parse_memory("256").unwrap(), 256);
        assert_eq!(parse_memory("262144k").unwrap(), 256);
        assert!(parse_memory("12m").is_err());
        assert!(parse_memory("lots").is_err());
    }

    #[test]
    fn names_and_env() {
        assert!(valid_name("web-1.test_a"));
        assert!(!valid_name("-x") && !valid_name("a/b") && !valid_name(""));
        std::env::set_var("VMRUN_TEST_ENV_X", "from-host");
        assert_eq!(expand_env("VMRUN_TEST_ENV_X"), "VMRUN_TEST_ENV_X=from-host");
        assert_eq!(expand_env("A=b=c"), "A=b=c");
        assert_eq!(container_id(Some("n")), "n");
        assert_eq!(container_id(None).len(), 12);
    }
}
