//! `vmrun run IMAGE [COMMAND...]`: a container in a fresh microVM, like
//! `docker run`.
//!
//! The image is resolved in the store (pulled if it is not there), its
//! layers are put on a read-only disk, and a VMM is started: restored from
//! a warm template (see `vmrun_runtime::template`), or booted with
//! `--cold`. The agent in the guest unpacks the layers and runs the
//! process. In the foreground, its output is printed as it comes, standard
//! input is passed on with `-i`, SIGINT/SIGTERM/SIGHUP/SIGQUIT are
//! forwarded to it, and `vmrun run` exits with its exit code (125 when
//! vmrun itself failed, 126 and 127 when the command cannot be run or
//! found, 128+N when signal N killed it).
//!
//! With `-d`, a supervisor (`vmrun supervise DIR`, a new session of its
//! own) owns the VM instead and writes the container's output to its log;
//! `vmrun run -d` waits until the process runs and prints the container's
//! id. `vmrun ps`, `logs`, `exec`, `stop`, `kill` and `rm` find it in its
//! directory (see `vmrun_runtime::container`).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use serde::{Deserialize, Serialize};
use vmrun_agent_client::Options;
use vmrun_agent_protocol::{CreateContainer, ExecProcess, ImageConfig, LayerSource, RootfsSpec, UnpackLimits};
use vmrun_runtime::artifacts::Artifacts;
use vmrun_runtime::container::{self, LogWriter, ProcessRef, State, Status};
use vmrun_runtime::home::Home;
use vmrun_runtime::net::{Link, Mode, PortMap, Setup};
use vmrun_runtime::sandbox::{AgentWait, Origin, Sandbox};
use vmrun_runtime::template::PREPARED_ID;
use vmrun_runtime::vm::VmSpec;
use vmrun_runtime::volume::Volume;

use crate::attach::{self, Signals, Sink};
use crate::images_cmd;

/// `vmrun run`'s flags, as docker spells them.
#[derive(Args, Debug, Clone, Serialize, Deserialize)]
#[command(trailing_var_arg = true)]
pub struct RunArgs {
    /// Remove the container when it exits (a container run in the
    /// foreground always is).
    #[arg(long)]
    pub rm: bool,
    /// Run in the background and print the container's id.
    #[arg(short = 'd', long)]
    pub detach: bool,
    #[command(flatten)]
    #[serde(flatten)]
    pub process: ProcessFlags,
    /// Read environment variables from a file (KEY=VALUE lines).
    #[arg(long = "env-file", value_name = "FILE")]
    pub env_file: Vec<PathBuf>,
    /// Override the image's entrypoint.
    #[arg(long)]
    pub entrypoint: Option<String>,
    /// A name for the container (also its host name).
    #[arg(long)]
    pub name: Option<String>,
    /// A copy of a host directory in the container, on a disk of its own:
    /// HOST_DIR:CONTAINER_DIR[:ro]. Writes stay in the container's copy.
    #[arg(short = 'v', long = "volume", value_name = "HOST:CONTAINER[:ro]")]
    pub volumes: Vec<String>,
    /// `nat` (or `bridge`; the default as root): an interface on a TAP
    /// device of its own, with an address in 10.213.0.0/16, reaching out
    /// through the host's NAT; `tap`: the same link, reaching only the
    /// host; `none` (the default without root): only the host's vsock
    /// link to the agent.
    #[arg(long, value_parser = ["nat", "bridge", "tap", "none"])]
    pub network: Option<String>,
    /// Publish a container port on the host's addresses:
    /// HOST:CONTAINER[/tcp|/udp] (needs a network, and root).
    #[arg(short = 'p', long = "publish", value_name = "HOST:CONTAINER")]
    pub publish: Vec<String>,
    /// Memory of the microVM (e.g. 512m, 1g).
    #[arg(short = 'm', long, default_value = "512m")]
    pub memory: String,
    /// vCPUs of the microVM (1 to 32).
    #[arg(long, default_value_t = 1)]
    pub cpus: u32,
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

/// The process flags `vmrun run` and `vmrun exec` share, as docker spells
/// them.
#[derive(Args, Debug, Clone, Serialize, Deserialize)]
pub struct ProcessFlags {
    /// Keep standard input open and pass it to the process.
    #[arg(short, long)]
    pub interactive: bool,
    /// Give the process a terminal.
    #[arg(short, long)]
    pub tty: bool,
    /// Set an environment variable (KEY=VALUE, or KEY to take it from here).
    #[arg(short = 'e', long = "env", value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// Working directory inside the container.
    #[arg(short = 'w', long = "workdir")]
    pub workdir: Option<String>,
    /// User (name or uid, optionally :group or :gid).
    #[arg(short = 'u', long)]
    pub user: Option<String>,
}

/// The options of a run, checked before anything starts.
struct Checked {
    mem_mib: u32,
    cpus: u8,
    volumes: Vec<Volume>,
    network: Mode,
    ports: Vec<PortMap>,
}

fn check(args: &RunArgs) -> Result<Checked> {
    if let Some(n) = &args.name {
        if !valid_name(n) {
            bail!("invalid container name {n:?}: 1 to 64 of [A-Za-z0-9_.-], not starting with . or -");
        }
    }
    let volumes = args.volumes.iter().map(|v| v.parse::<Volume>()).collect::<Result<Vec<_>, _>>()?;
    if volumes.len() > vmrun_runtime::volume::SLOTS {
        bail!("at most {} volumes per container", vmrun_runtime::volume::SLOTS);
    }
    let ports = args.publish.iter().map(|p| p.parse::<PortMap>()).collect::<Result<Vec<_>, _>>()?;
    let network = match &args.network {
        Some(n) => n.parse::<Mode>()?,
        None => Mode::default_here(),
    };
    if !ports.is_empty() && network == Mode::None {
        if args.network.is_none() {
            bail!("publishing ports needs root (or CAP_NET_ADMIN): without it the default network is none");
        }
        bail!("publishing ports needs a network: --network none has none");
    }
    let mem_mib = parse_memory(&args.memory)?;
    vmrun_vmm::check_resources(u64::from(args.cpus), u64::from(mem_mib))?;
    let cpus = u8::try_from(args.cpus).context("vCPU count")?;
    Ok(Checked { mem_mib, cpus, volumes, network, ports })
}

/// Parses `512m`, `1g`, `256` (MiB) into MiB (`vmrun_runtime::size`).
pub fn parse_memory(s: &str) -> Result<u32> {
    let too_large = || anyhow!("memory size {s:?} is too large: at most {}g", vmrun_vmm::MAX_MEM_MIB / 1024);
    let mib = match vmrun_runtime::size::mib(s) {
        Ok(m) => m,
        Err(vmrun_runtime::size::SizeError::TooLarge(_)) => return Err(too_large()),
        Err(_) => bail!("invalid memory size {s:?} (use e.g. 512m or 1g)"),
    };
    if mib < 64 {
        bail!("memory size {s:?} must be at least 64m");
    }
    u32::try_from(mib).map_err(|_| too_large())
}

fn env_entries(args: &RunArgs) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for f in &args.env_file {
        let text = std::fs::read_to_string(f).with_context(|| format!("cannot read env file {}", f.display()))?;
        for line in text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
            out.push(expand_env(line));
        }
    }
    out.extend(args.process.env.iter().map(|e| expand_env(e)));
    Ok(out)
}

/// `KEY` alone takes the value from this process's environment.
pub fn expand_env(e: &str) -> String {
    if e.contains('=') {
        e.to_string()
    } else {
        format!("{e}={}", std::env::var(e).unwrap_or_default())
    }
}

fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 64
        && !n.starts_with(['.', '-'])
        && n.chars().all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
}

/// Finds the image, pulling it if the store does not have it.
pub(crate) fn image(home: &Home, name: &str) -> Result<vmrun_images::Image> {
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

/// Times the phases of one run, and counts the guest's work in those its
/// VM runs in (the instructions KVM emulated and the exits, from the VMM's
/// stats: on hosts that emulate guest kernel mode, a measure of the
/// guest's work that does not depend on the machine's speed); printed with
/// `VMRUN_LOG=debug` as
/// `phase NAME: MS ms; N guest instructions emulated, M exits`.
pub(crate) struct Phases {
    at: std::time::Instant,
    /// The VM's counters at the last mark (they start at zero with it).
    guest: (u64, u64),
}

impl Phases {
    pub(crate) fn start() -> Self {
        Self { at: std::time::Instant::now(), guest: (0, 0) }
    }

    /// Ends a phase in which no VM of the run ran.
    pub(crate) fn mark(&mut self, phase: &str) {
        log::debug!("phase {phase}: {:.1} ms", self.elapsed_ms());
        self.at = std::time::Instant::now();
    }

    /// Ends the phase in which `sandbox`'s guest started and its agent
    /// answered: [`Phases::mark_vm`], with the host CPU spent until the
    /// VMM was ready to run the guest, this process's (since it started)
    /// and the VMM's (its process tree, the jail's included), as
    /// `...; host CPU until the guest ran N ms (vmrun A ms, VMM B ms)`.
    pub(crate) fn mark_ready(&mut self, phase: &str, sandbox: &Sandbox) {
        let cpu_ms = |d: std::time::Duration| d.as_secs_f64() * 1000.0;
        let host = sandbox.ready_cpu().map(|c| {
            format!(
                "; host CPU until the guest ran {:.1} ms (vmrun {:.1} ms, VMM {:.1} ms)",
                cpu_ms(c.own + c.vmm),
                cpu_ms(c.own),
                cpu_ms(c.vmm)
            )
        });
        self.mark_vm_with(phase, sandbox, &host.unwrap_or_default());
    }

    /// Ends a phase in which `sandbox` ran.
    fn mark_vm(&mut self, phase: &str, sandbox: &Sandbox) {
        self.mark_vm_with(phase, sandbox, "");
    }

    /// [`Phases::mark_vm`], `extra` appended to its line.
    fn mark_vm_with(&mut self, phase: &str, sandbox: &Sandbox, extra: &str) {
        if !log::log_enabled!(log::Level::Debug) {
            return;
        }
        let ms = self.elapsed_ms();
        let counts = sandbox.stats().ok().and_then(|s| Some((s.insn_emulation()?, s.exits()?)));
        match counts {
            Some((insns, exits)) => {
                let (i0, e0) = std::mem::replace(&mut self.guest, (insns, exits));
                log::debug!(
                    "phase {phase}: {ms:.1} ms; {} guest instructions emulated, {} exits{extra}",
                    insns.saturating_sub(i0),
                    exits.saturating_sub(e0)
                );
            }
            None => log::debug!("phase {phase}: {ms:.1} ms{extra}"),
        }
        self.at = std::time::Instant::now();
    }

    fn elapsed_ms(&self) -> f64 {
        self.at.elapsed().as_secs_f64() * 1000.0
    }
}

/// The user's changes to the image's process, as start-time overrides:
/// arguments (entrypoint and command, when either was given), extra
/// environment, working directory, user, volume mounts.
fn process_overrides(args: &RunArgs, image: &ImageConfig, volumes: &[Volume]) -> Result<ExecProcess> {
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
        working_dir: args.process.workdir.clone(),
        user: args.process.user.clone(),
        mounts: volumes.iter().enumerate().map(|(slot, v)| v.mount(slot)).collect(),
        ..Default::default()
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
    config.mounts.extend(o.mounts.iter().cloned());
}

/// `vmrun run`: returns its exit code.
pub fn run(args: RunArgs) -> Result<i32> {
    let signals = Signals::start(None);
    check(&args)?;
    let home = Home::from_env()?;
    let image = image(&home, &args.image)?;
    std::fs::create_dir_all(home.containers())?;
    let (dir, state) = new_container(&home, &args, &image)?;
    if args.detach {
        return detach(&home, &args, &dir);
    }
    signals.set_dir(&dir);
    let result = run_container(&home, &args, &dir, state, &Sink::Terminal, &signals);
    remove_container_dir(&dir);
    interrupted(result, &signals)
}

/// A run ended by a signal before its process ran exits 128+N, quietly.
fn interrupted(result: Result<i32>, signals: &Signals) -> Result<i32> {
    match (result, signals.caught()) {
        (Err(_), Some(sig)) => Ok(128 + sig),
        (r, _) => r,
    }
}

/// Makes the container's directory and first state, under a lock so that
/// two containers cannot take one name.
fn new_container(home: &Home, args: &RunArgs, image: &vmrun_images::Image) -> Result<(PathBuf, State)> {
    let _lock = vmrun_runtime::lock::Lock::take(&home.containers().join(".lock"))?;
    let id = container::new_id();
    let name = args.name.clone().unwrap_or_else(|| id.clone());
    if let Ok((_, other)) = container::find(home, &name) {
        if other.name == name {
            bail!("the container name {name:?} is in use by container {}: remove it (vmrun rm) or pick another name", other.id);
        }
    }
    let config = &image.config;
    let command = if args.command.is_empty() {
        args.entrypoint.iter().cloned().chain(config.entrypoint.iter().cloned()).chain(config.cmd.iter().cloned()).collect::<Vec<_>>()
    } else {
        args.entrypoint.iter().cloned().chain(args.command.iter().cloned()).collect()
    };
    let state = State {
        owner: if args.detach { None } else { ProcessRef::current() },
        tty: args.process.tty,
        auto_remove: args.rm || !args.detach,
        ports: args.publish.clone(),
        image_digest: Some(image.manifest_digest.to_string()),
        ..State::new(&id, &name, &args.image, &command.join(" "))
    };
    let dir = home.containers().join(&id);
    std::fs::create_dir(&dir).with_context(|| format!("cannot make {}", dir.display()))?;
    state.save(&dir)?;
    Ok((dir, state))
}

/// The file a detached container's options are handed over in.
const RUN_FILE: &str = "run.json";
/// The supervisor's own messages.
const SUPERVISOR_LOG: &str = "supervisor.log";

/// `vmrun run -d`: starts the supervisor and waits until the container's
/// process runs (its messages, e.g. a template being built, are shown
/// meanwhile), then prints the id.
fn detach(home: &Home, args: &RunArgs, dir: &Path) -> Result<i32> {
    let fail = |e: anyhow::Error| {
        remove_container_dir(dir);
        e
    };
    std::fs::write(dir.join(RUN_FILE), serde_json::to_vec(args)?).map_err(|e| fail(e.into()))?;
    let log = std::fs::File::create(dir.join(SUPERVISOR_LOG)).map_err(|e| fail(e.into()))?;
    let mut cmd = std::process::Command::new(std::env::current_exe().context("cannot find the vmrun executable")?);
    cmd.arg("supervise").arg(dir).env("VMRUN_HOME", home.root());
    cmd.stdin(std::process::Stdio::null()).stdout(std::process::Stdio::null()).stderr(log);
    vmrun_runtime::vm::no_inherited_fds(&mut cmd);
    // SAFETY: setsid is async-signal-safe; the supervisor leaves this
    // terminal's session so that closing it does not end the container.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            libc::setsid();
            Ok(())
        })
    };
    let mut child = cmd.spawn().context("cannot start the supervisor").map_err(fail)?;
    // Its messages, its state and its end wake the loop; set up before the
    // first look so that nothing in between is missed.
    let mut waiter = vmrun_runtime::watch::Waiter::new();
    waiter.watch_dir(dir).watch(&dir.join(SUPERVISOR_LOG), vmrun_runtime::watch::FILE_GROWS).child(child.id());
    let mut shown = 0usize;
    loop {
        let messages = std::fs::read_to_string(dir.join(SUPERVISOR_LOG)).unwrap_or_default();
        if let Some(new) = messages.get(shown..) {
            eprint!("{new}");
            shown = messages.len();
        }
        let state = State::load(dir).ok();
        match state.as_ref().map(|s| s.status) {
            Some(Status::Running) => {
                println!("{}", state.map(|s| s.id).unwrap_or_default());
                return Ok(0);
            }
            Some(Status::Exited) => {
                let s = state.unwrap_or_else(|| unreachable_state(dir));
                if let Some(e) = &s.error {
                    eprintln!("vmrun: error: {e}");
                }
                remove_container_dir(dir);
                return Ok(s.exit_code.filter(|c| *c == 126 || *c == 127).unwrap_or(125));
            }
            _ => {}
        }
        if let Ok(Some(status)) = child.try_wait() {
            // It may have written its state just before it ended.
            if State::load(dir).map(|s| s.status != Status::Creating).unwrap_or(false) {
                continue;
            }
            remove_container_dir(dir);
            bail!("the supervisor ended ({status}) before the container started");
        }
        waiter.wait(None);
    }
}

fn unreachable_state(dir: &Path) -> State {
    State::load(dir).unwrap_or_else(|_| State {
        status: Status::Exited,
        error: Some("the container's state is gone".into()),
        ..State::new("", "", "", "")
    })
}

/// `vmrun supervise DIR`: owns a detached container's VM until its process
/// ends, writing its output to the container's log.
pub fn supervise(dir: &Path) -> Result<i32> {
    let signals = Signals::start(Some(dir.to_path_buf()));
    let args: RunArgs = serde_json::from_slice(&std::fs::read(dir.join(RUN_FILE))?).context("reading the run options")?;
    let mut state = State::load(dir)?;
    state.owner = ProcessRef::current();
    state.save(dir)?;
    let home = Home::from_env()?;
    // The terminal's size is not known here; a fixed one serves `-t`.
    let log = LogWriter::open(&dir.join(container::LOG_FILE), LOG_LIMIT)?;
    let sink = Sink::Log(Arc::new(Mutex::new(log)));
    let result = interrupted(run_container(&home, &args, dir, state, &sink, &signals), &signals);
    if let Err(e) = &result {
        eprintln!("vmrun: error: {e:#}");
    }
    let state = State::load(dir).ok();
    if state.as_ref().is_some_and(|s| s.auto_remove) {
        remove_container_dir(dir);
    }
    result
}

/// How long the agent may take: unpacking a large image where guest kernel
/// mode is emulated takes many minutes, and starting a process minutes when
/// many such guests share the CPUs (the user can always interrupt).
pub fn agent_options() -> Options {
    Options { create_timeout: Duration::from_secs(4 * 3600), request_timeout: Duration::from_secs(900), ..Options::default() }
}

/// The most bytes a detached container's log keeps.
const LOG_LIMIT: u64 = 64 << 20;

/// Removes a container's directory (its VM is gone).
pub fn remove_container_dir(dir: &Path) {
    vmrun_runtime::vm::remove_dir(dir);
}

/// Records the end of the container in its state.
fn finish(dir: &Path, state: &mut State, result: &Result<i32>) {
    state.status = Status::Exited;
    state.finished = Some(container::now());
    match result {
        Ok(code) => state.exit_code = Some(*code),
        Err(e) => {
            state.error = Some(format!("{e:#}"));
            state.exit_code = e.downcast_ref::<StartFailed>().map(|f| f.0).or(Some(125));
        }
    }
    if let Err(e) = state.save(dir) {
        log::warn!("cannot record the end of container {}: {e}", state.id);
    }
}

/// The process could not be started (exit code 126 or 127).
#[derive(Debug, thiserror::Error)]
#[error("{1}")]
struct StartFailed(i32, String);

/// Resources of a container that are given back when it ends: its link
/// and the host's rules for it (unless a pool owns them).
struct Network {
    link: Link,
    nat: bool,
    owned: bool,
}

impl Drop for Network {
    fn drop(&mut self) {
        if self.owned {
            self.link.delete();
        }
    }
}

/// Gives the container a network link: a subnet free on the whole host
/// (see `vmrun_runtime::net::allocate`), its TAP device and the host's
/// rules for it, recorded in its state.
fn set_up_network(home: &Home, dir: &Path, state: &mut State, setup: &Setup) -> Result<Link> {
    let used: Vec<u32> = container::list(home)?
        .iter()
        .filter(|(_, s)| s.effective_status() != Status::Exited && s.id != state.id)
        .filter_map(|(_, s)| s.ip.as_deref().and_then(Link::index_of))
        .collect();
    let link = vmrun_runtime::net::allocate(&state.id, &used, setup)?;
    state.tap = Some(link.tap.clone());
    state.ip = Some(link.guest.to_string());
    if let Err(e) = state.save(dir) {
        link.delete();
        return Err(e.into());
    }
    Ok(link)
}

/// Runs the container in `dir` (state `state`) to its end; returns its
/// exit code. The state is kept up to date.
fn run_container(home: &Home, args: &RunArgs, dir: &Path, mut state: State, sink: &Sink, signals: &Signals) -> Result<i32> {
    let result = interrupted(run_container_inner(home, args, dir, &mut state, sink, signals), signals);
    finish(dir, &mut state, &result);
    result
}

fn run_container_inner(
    home: &Home,
    args: &RunArgs,
    dir: &Path,
    state: &mut State,
    sink: &Sink,
    signals: &Signals,
) -> Result<i32> {
    let mut phases = Phases::start();
    let checked = check(args)?;
    let image = image(home, &args.image)?;
    phases.mark("store lookup");
    let artifacts = Artifacts::find(home, args.kernel.as_deref(), args.initrd.as_deref())?;
    // Held (shared) until the VM's agent answers: `rmi` and `system prune`
    // leave the disk alone meanwhile.
    let (layer_disk, digests, disk_lock) = vmrun_runtime::layer_disk::use_for_image(&home.layer_disks(), &image)?;
    phases.mark("layer disk");
    let mut volume_disks = Vec::new();
    if !checked.volumes.is_empty() {
        // In the VM's own directory: the VMM writes them.
        let layout = vmrun_runtime::vm::Layout::of(dir);
        std::fs::create_dir_all(layout.vm_dir())?;
        for (i, v) in checked.volumes.iter().enumerate() {
            let path = layout.volume_disk(i);
            v.make_image(&path)?;
            volume_disks.push(path);
        }
    }
    if !volume_disks.is_empty() {
        phases.mark("volume disks");
    }
    let mut spec = VmSpec {
        artifacts,
        mem_mib: checked.mem_mib,
        cpus: checked.cpus,
        layer_disk,
        volumes: volume_disks,
        // Empty slots are for the volumes of the runs a template is
        // restored for; a cold boot has only its own (each disk costs its
        // boot a probe: about 245k emulated instructions where guest
        // kernel mode is emulated).
        volume_slots: if args.cold { 0 } else { vmrun_runtime::volume::SLOTS },
        read_only_volumes: Vec::new(),
        tap: None,
        netns: None,
        dir: dir.to_path_buf(),
        vmm_exe: vmrun_runtime::vm::find_vmm()?,
        // A cold boot initialises less of its memory at boot: a template
        // keeps the kernel's 128 MiB, or each run restored from it would
        // grow its memory again.
        boot_memory_mib: args.cold.then_some(vmrun_runtime::vm::COLD_BOOT_MEMORY_MIB),
    };

    let mut config = image_config(&image, args.name.as_deref());
    let image_defaults = config.clone();
    let overrides = process_overrides(args, &config, &checked.volumes)?;
    apply_overrides(&mut config, &overrides);
    if config.entrypoint.is_empty() && config.cmd.is_empty() {
        bail!("no command given and the image has none");
    }
    let create = |id: &str, config: ImageConfig| create_from_layers(id, config, &digests);
    let terminal = matches!(sink, Sink::Terminal);
    let tty = args.process.tty && (!terminal || attach::is_tty(libc::STDIN_FILENO));
    let mode = if terminal { attach::stdio_mode(tty, args.process.interactive) } else { stdio_detached(tty) };
    let cancel = signals.cancel();

    // A VM of a pool (`vmrun pool`) when the run can take one: the VM its
    // image's prepared template would give it, a process that can be the
    // held one (output on pipes, no input, no volume), no published port
    // and no name. Its link, if any, is the pool's.
    let poolable = !args.cold && args.name.is_none() && checked.ports.is_empty() && spec.volumes.is_empty() && mode == HELD_STDIO;
    let origins = (!args.cold).then(|| vmrun_runtime::pool::locate(home, &spec, checked.network, &image.manifest_digest.to_string())).transpose()?;
    let mut pooled = None;
    if let Some(o) = origins.as_ref().filter(|o| poolable && vmrun_runtime::template::is_ready(&o.prepared)) {
        pooled = Sandbox::claim(&o.pool, agent_options(), cancel).map(|s| (s, o.prepared.clone()));
    }
    let mut network = None;
    let nat = checked.network == Mode::Nat;
    match pooled.as_ref().map(|(s, _)| s.pooled_link()) {
        Some(link) => {
            state.ip = link.map(|l| l.guest.to_string());
            network = link.map(|l| Network { link: l.clone(), nat, owned: false });
        }
        None if checked.network != Mode::None => {
            let link = set_up_network(home, dir, state, &Setup { nat, ports: checked.ports.clone() })?;
            network = Some(Network { link, nat, owned: true });
        }
        None => {}
    }
    spec.tap = network.as_ref().map(|n| n.link.tap.clone());

    // Cold: boot. Warm: restore the image's prepared template if there is
    // one (the image already unpacked), else the base template, and
    // prepare the image for next time. A --name (host name) is baked in at
    // creation, so named containers are never prepared.
    let mut hold = Some(disk_lock);
    // The VM from `origin`, its agent connected; `ready` names the phase.
    let mut start = |origin: Origin<'_>, ready: &str, phases: &mut Phases| -> Result<Sandbox> {
        let launched = Sandbox::launch(&spec, origin, hold.take(), cancel)?;
        phases.mark("VM start");
        let sandbox = launched.connect(AgentWait { timeout: Duration::from_secs(900), options: agent_options() })?;
        phases.mark_ready(ready, &sandbox);
        Ok(sandbox)
    };
    let (sandbox, guest_id, prepared) = if let Some((sandbox, template)) = pooled {
        record_template(dir, state, &template)?;
        state.vm_dir = Some(sandbox.layout().dir().to_path_buf());
        state.save(dir)?;
        drop(hold.take());
        let cpu = log::log_enabled!(log::Level::Debug).then(|| format!("; host CPU until the VM was claimed {:.1} ms (vmrun)", vmrun_runtime::cpu::own().as_secs_f64() * 1000.0));
        phases.mark_vm_with("VM claimed from the pool (guest counts since the pooled VM's restore)", &sandbox, &cpu.unwrap_or_default());
        (sandbox, PREPARED_ID.to_string(), true)
    } else if let Some(vmrun_runtime::pool::Origins { base, prepared: prepared_dir, .. }) = origins {
        // Warm: located above (the key's files hashed once); built if missing.
        let base = match vmrun_runtime::template::is_ready(&base) {
            true => base,
            false => Sandbox::base_template(&home.templates(), &spec, &|m| eprintln!("vmrun: {m}"), cancel)?,
        };
        let preparable = args.name.is_none();
        if preparable && vmrun_runtime::template::is_ready(&prepared_dir) {
            record_template(dir, state, &prepared_dir)?;
            let sandbox = start(Origin::Template(&prepared_dir), "guest to agent ready (image unpacked in the template)", &mut phases)?;
            (sandbox, PREPARED_ID.to_string(), true)
        } else {
            record_template(dir, state, &base)?;
            let sandbox = start(Origin::Template(&base), "guest to agent ready", &mut phases)?;
            if preparable {
                prepare(home, &image, &sandbox, create(PREPARED_ID, image_defaults), &prepared_dir, &mut phases)?;
                (sandbox, PREPARED_ID.to_string(), true)
            } else {
                unpacked(home, &image, sandbox.create(&create(&state.id, config)))?;
                phases.mark_vm("unpack", &sandbox);
                (sandbox, state.id.clone(), false)
            }
        }
    } else {
        // Cold (`origins` is located for every warm run).
        let sandbox = start(Origin::Boot, "guest to agent ready", &mut phases)?;
        unpacked(home, &image, sandbox.create(&create(&state.id, config)))?;
        phases.mark_vm("unpack", &sandbox);
        (sandbox, state.id.clone(), false)
    };
    if let Some(n) = &network {
        let nameservers = if n.nat { vmrun_runtime::net::nat::host_nameservers() } else { Vec::new() };
        sandbox.configure_network(&n.link.guest_config(&nameservers))?;
        phases.mark_vm("network", &sandbox);
    }

    let started = if prepared { release_held(&sandbox, &guest_id, &overrides, mode) } else { None };
    let started = started.unwrap_or_else(|| sandbox.start_process(&guest_id, mode, prepared.then_some(&overrides)));
    let mut process = match started {
        Ok(p) => p,
        Err(e) => {
            sandbox.stop();
            if let Some(code) = e.exit_code() {
                if terminal {
                    eprintln!("vmrun: {e}");
                    return Ok(code);
                }
                return Err(StartFailed(code, e.to_string()).into());
            }
            return Err(e.into());
        }
    };
    state.status = Status::Running;
    state.vmm = ProcessRef::of(sandbox.pid());
    state.guest_id = guest_id.clone();
    state.save(dir)?;
    signals.forward_to(sandbox.client().clone(), guest_id.clone(), None, tty);
    let code = attach::pump(&mut process, sink, terminal && (args.process.interactive || tty), tty && terminal);
    phases.mark_vm("process run", &sandbox);
    let code = match code {
        Ok(c) => c,
        Err(e) => {
            let mut sandbox = sandbox;
            sandbox.wait_vmm(Duration::from_secs(5));
            return Err(anyhow!("lost the container's VM ({e}); its console is in {}", sandbox.layout().console().display()));
        }
    };
    // Nothing in the guest outlives the run (its root is a tmpfs, volumes
    // are copies, the output is all read): the VMM is killed, and the
    // guest's shutdown (its processes killed, file systems synced, the
    // reboot) is not waited for.
    sandbox.kill();
    phases.mark("teardown");
    Ok(code)
}

/// The image's process as the guest gets it before a run's overrides:
/// its entrypoint, command, environment, directory and user, and the host
/// name (`name`, else `vmrun`).
pub(crate) fn image_config(image: &vmrun_images::Image, name: Option<&str>) -> ImageConfig {
    let c = &image.config;
    ImageConfig {
        entrypoint: c.entrypoint.clone(),
        cmd: c.cmd.clone(),
        env: c.env.clone(),
        working_dir: c.working_dir.clone().unwrap_or_default(),
        user: c.user.clone().unwrap_or_default(),
        hostname: name.unwrap_or("vmrun").to_string(),
        ..Default::default()
    }
}

/// Container `id` of `config`, its root unpacked from the layers
/// `digests` of the layer disk (the guest's `/dev/vda`).
pub(crate) fn create_from_layers(id: &str, config: ImageConfig, digests: &[vmrun_agent_client::Digest]) -> CreateContainer {
    CreateContainer {
        id: id.to_string(),
        layers: LayerSource { disk: "/dev/vda".into(), layers: digests.to_vec() },
        rootfs: RootfsSpec::default(),
        config,
        limits: UnpackLimits::default(),
    }
}

/// Makes the image's prepared template from `sandbox`, restored from the
/// base template: the image unpacked (`create`, the container
/// [`PREPARED_ID`] with the image's own configuration), its process set
/// up and held, and the guest saved into `prepared_dir`.
pub(crate) fn prepare(
    home: &Home,
    image: &vmrun_images::Image,
    sandbox: &Sandbox,
    create: CreateContainer,
    prepared_dir: &Path,
    phases: &mut Phases,
) -> Result<()> {
    unpacked(home, image, sandbox.create(&create))?;
    phases.mark_vm("unpack", sandbox);
    hold_ready(sandbox);
    phases.mark_vm("container set up and held", sandbox);
    sandbox.save_prepared(prepared_dir);
    phases.mark_vm("prepared template saved", sandbox);
    Ok(())
}

/// The output a prepared template's held process has: pipes for stdout
/// and stderr, no input (a run with a terminal or input starts afresh).
const HELD_STDIO: vmrun_agent_client::StdioMode = vmrun_agent_client::StdioMode::Piped { stdin: false };

/// Sets up the prepared container's process (namespaces, root, mounts)
/// and holds it before its program, so that a run restored from the
/// template only hands over its own program, environment, directory and
/// user, and the process execs. An image the guest cannot set up that way
/// (no default command, ...) gets a template without one: runs start the
/// process afresh.
fn hold_ready(sandbox: &Sandbox) {
    if let Err(e) = sandbox.prepare_process(PREPARED_ID, HELD_STDIO) {
        log::info!("the prepared template holds no process ({e}): runs set the container up themselves");
    }
}

/// Starts a prepared container's process by releasing the one its
/// template holds, when the run can use it: output on pipes, no input,
/// no volume. `None`: start it afresh (the agent then drops the held one).
fn release_held(
    sandbox: &Sandbox,
    guest_id: &str,
    overrides: &vmrun_agent_client::ExecProcess,
    mode: vmrun_agent_client::StdioMode,
) -> Option<vmrun_runtime::Result<vmrun_agent_client::Process>> {
    if mode != HELD_STDIO || !overrides.mounts.is_empty() {
        return None;
    }
    match sandbox.release_with(guest_id, Some(overrides), mode) {
        Err(vmrun_runtime::Error::Agent(vmrun_agent_client::Error::Agent(e)))
            if matches!(e.kind, vmrun_agent_protocol::ErrorKind::InvalidState | vmrun_agent_protocol::ErrorKind::BadRequest) =>
        {
            log::debug!("no held process to release ({}): starting afresh", e.message);
            None
        }
        r => Some(r),
    }
}

/// Records in the container's state the template its VM is restored from
/// (before the restore), so that `rmi` and `system prune` keep it while the
/// container exists.
fn record_template(dir: &Path, state: &mut State, template: &Path) -> Result<()> {
    state.template = template.file_name().map(|n| n.to_string_lossy().into_owned());
    state.save(dir)?;
    Ok(())
}

/// The result of creating the container in the guest. When the agent
/// refused the image (its unpack failed), the image's layer disk is
/// removed, so that the next run builds it again from the store instead of
/// reusing it as if it were good.
fn unpacked<T>(home: &Home, image: &vmrun_images::Image, result: vmrun_runtime::Result<T>) -> Result<T> {
    if let Err(vmrun_runtime::Error::Agent(vmrun_agent_client::Error::Agent(e))) = &result {
        if e.kind == vmrun_agent_protocol::ErrorKind::Image {
            let digest = image.manifest_digest.to_string();
            if vmrun_runtime::layer_disk::discard(&home.layer_disks(), &digest) {
                log::info!("removed the layer disk of {digest}: the guest could not unpack it");
            }
        }
    }
    Ok(result?)
}

/// A detached process's terminal, when asked for: 24x80, no input.
fn stdio_detached(tty: bool) -> vmrun_agent_client::StdioMode {
    if tty {
        vmrun_agent_client::StdioMode::Tty { rows: 24, cols: 80 }
    } else {
        vmrun_agent_client::StdioMode::Piped { stdin: false }
    }
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
        // No overflow into "at least 64m".
        let e = parse_memory("999999999999g").unwrap_err().to_string();
        assert!(e.contains("too large"), "{e}");
        let e = parse_memory("99999999999m").unwrap_err().to_string();
        assert!(e.contains("too large"), "{e}");
    }

    #[test]
    fn names_and_env() {
        assert!(valid_name("web-1.test_a"));
        assert!(!valid_name("-x") && !valid_name("a/b") && !valid_name(""));
        std::env::set_var("VMRUN_TEST_ENV_X", "from-host");
        assert_eq!(expand_env("VMRUN_TEST_ENV_X"), "VMRUN_TEST_ENV_X=from-host");
        assert_eq!(expand_env("A=b=c"), "A=b=c");
    }
}
