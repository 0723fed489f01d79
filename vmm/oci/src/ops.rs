//! The commands: `create`, `start`, `state`, `kill`, `delete`, `exec`,
//! `ps`, `features`, `spec`, with runc's behaviour where a caller can see
//! it (messages containerd's shim recognises, pid files without a newline,
//! a supervisor that is not reaped so that the caller's subreaper gets its
//! exit status).

use std::io::Read;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vmrun_agent_client::{Client, ErrorKind, Options};
use vmrun_runtime::container::ProcessRef;
use vmrun_runtime::home::Home;
use vmrun_runtime::watch::{self, Waiter};

use crate::bundle::{self, ProcessPlan};
use crate::error::{io, Error, Result};
use crate::logger;
use crate::signals;
use crate::state::{self, ExecRecord, ExecStatus, OciBundle, Root, State, Status};
use crate::supervisor::{self, ExecPlan, SupervisorPlan};

/// The global flags, as the supervisors get them again.
#[derive(Debug, Clone)]
pub struct Ctx {
    /// `--root`.
    pub root: Root,
    /// `--log`.
    pub log: Option<PathBuf>,
    /// `--log-format`.
    pub log_format: logger::Format,
    /// `--debug`.
    pub debug: bool,
    /// The `vmrun-oci` executable that runs supervisors and holders
    /// (`None`: this one).
    pub exe: Option<PathBuf>,
}

impl Ctx {
    /// The `vmrun-oci` executable.
    fn exe(&self) -> Result<PathBuf> {
        match &self.exe {
            Some(e) => Ok(e.clone()),
            None => std::env::current_exe().map_err(io("finding the vmrun-oci executable")),
        }
    }

    /// `vmrun-oci` itself with the global flags, its log going to `log`.
    fn self_command(&self, log: &Path) -> Result<Command> {
        let mut c = Command::new(self.exe()?);
        c.arg("--root").arg(self.root.path()).arg("--log").arg(log).arg("--log-format").arg(match self.log_format {
            logger::Format::Json => "json",
            logger::Format::Text => "text",
        });
        if self.debug {
            c.arg("--debug");
        }
        Ok(c)
    }
}

/// The `vmrun-vmm` executable that runs VMMs: beside this executable,
/// else `$VMRUN_VMM`, else on `PATH` ([`vmrun_runtime::vm::find_vmm`]).
pub fn vmm_exe() -> Result<PathBuf> {
    vmrun_runtime::vm::find_vmm().map_err(|e| Error::Usage(e.to_string()))
}

/// `name` in a directory of `$PATH`.
pub fn find_in_path(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?).map(|d| d.join(name)).find(|p| p.is_file())
}

/// The container's id in the guest: the characters the agent accepts, at
/// most 64.
pub(crate) fn guest_id(id: &str) -> String {
    let s: String = id.chars().filter(|c| c.is_ascii_alphanumeric() || "_.-".contains(*c)).take(64).collect();
    let s = s.trim_start_matches(['.', '-']).to_string();
    if s.is_empty() {
        "container".into()
    } else {
        s
    }
}

/// Starts `cmd` in a new session (not reaped: when this process exits, the
/// caller's subreaper inherits it and gets its exit status), handing it
/// `holder`'s socket (`crate::holder::FD_ENV`).
fn spawn_session(mut cmd: Command, quiet: bool, holder: Option<&std::os::unix::net::UnixStream>) -> Result<Child> {
    if quiet {
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
    }
    let fd = holder.map(std::os::fd::AsRawFd::as_raw_fd);
    if let Some(fd) = fd {
        cmd.env(crate::holder::FD_ENV, fd.to_string());
    }
    // SAFETY: setsid and fcntl are async-signal-safe; the supervisor
    // leaves the caller's session and process group, and keeps the
    // holder's socket across exec.
    unsafe {
        cmd.pre_exec(move || {
            libc::setsid();
            if let Some(fd) = fd {
                if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        })
    };
    cmd.spawn().map_err(io("starting the supervisor"))
}

/// Whether the child `pid` has exited, without reaping it.
fn exited(pid: u32) -> bool {
    // SAFETY: waitid with WNOWAIT only inspects the child; the zeroed
    // siginfo is filled in when a child has changed state.
    unsafe {
        let mut info: libc::siginfo_t = std::mem::zeroed();
        let r = libc::waitid(libc::P_PID, pid, &mut info, libc::WEXITED | libc::WNOHANG | libc::WNOWAIT);
        r != 0 || info.si_pid() != 0
    }
}

/// Reaps a failed supervisor (killing it if it lingers): its end wakes the
/// wait, for up to 10 s.
fn reap(child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut waiter = Waiter::new();
    waiter.child(child.id());
    loop {
        match child.try_wait() {
            // ECHILD: the caller's reaper (a shim's) has reaped it.
            Ok(Some(_)) | Err(_) => return,
            Ok(None) => {}
        }
        if Instant::now() >= deadline {
            break;
        }
        waiter.wait(Some(deadline));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Where to look for why a supervisor failed: the caller's log is named;
/// the state directory's own log (removed with it) is quoted.
fn log_tail(log: &Path, dir: &Path) -> String {
    if !log.starts_with(dir) {
        return format!("; see {}", log.display());
    }
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().rev().take(3).collect();
    if lines.is_empty() {
        String::new()
    } else {
        format!(": {}", lines.into_iter().rev().collect::<Vec<_>>().join(" / "))
    }
}

/// Writes a pid file as runc does: the number alone, atomically.
fn write_pid_file(path: &Path, pid: u32) -> Result<()> {
    let path = std::path::absolute(path).map_err(io(format!("pid file {}", path.display())))?;
    state::write_atomic(&path, pid.to_string().as_bytes()).map_err(io(format!("writing the pid file {}", path.display())))
}

/// Removes a container's directories.
fn remove_dirs(dir: &Path, st: Option<&State>) {
    if let Some(s) = st {
        crate::host_cgroup::remove(&s.host_cgroups);
        // Its supervisor died before it detached the VM from a pod network.
        if let Some(link) = s.oci.as_ref().and_then(|o| o.network.as_ref()) {
            vmrun_runtime::net::pod::detach(link);
        }
    }
    // A pod member's VM directory is its sandbox's, not its to remove.
    let own_vm = st.is_some_and(|s| s.oci.as_ref().is_none_or(|o| o.pod_sandbox.is_none()));
    if let Some(vm_dir) = st.and_then(|s| s.vm_dir.as_deref()).filter(|d| *d != dir && own_vm) {
        vmrun_runtime::vm::remove_dir(vm_dir);
    }
    vmrun_runtime::vm::remove_dir(dir);
}

/// `create`'s flags.
#[derive(Debug, Clone, Default)]
pub struct CreateArgs {
    /// The container's id.
    pub id: String,
    /// The bundle (default: the current directory).
    pub bundle: Option<PathBuf>,
    /// Where to write the container's pid.
    pub pid_file: Option<PathBuf>,
    /// Where to send the terminal's master.
    pub console_socket: Option<PathBuf>,
    /// The supervisor's standard streams (default: this process's).
    pub streams: Option<Streams>,
}

/// Standard input, output and error for a supervisor, the process's own
/// streams (without a terminal).
#[derive(Debug, Clone)]
pub struct Streams {
    /// Standard input.
    pub stdin: std::sync::Arc<std::os::fd::OwnedFd>,
    /// Standard output.
    pub stdout: std::sync::Arc<std::os::fd::OwnedFd>,
    /// Standard error.
    pub stderr: std::sync::Arc<std::os::fd::OwnedFd>,
}

impl Streams {
    /// Gives `cmd` copies of the streams.
    fn apply(&self, cmd: &mut Command) -> Result<()> {
        let dup = |fd: &std::os::fd::OwnedFd| fd.try_clone().map(Stdio::from).map_err(io("duplicating a standard stream"));
        cmd.stdin(dup(&self.stdin)?).stdout(dup(&self.stdout)?).stderr(dup(&self.stderr)?);
        Ok(())
    }
}

/// `create`: checks the bundle, starts the supervisor and waits until the
/// container is created (its VM runs, the guest has mounted its root).
pub fn create(ctx: &Ctx, args: &CreateArgs) -> Result<i32> {
    create_container(ctx, args).map(|_| 0)
}

/// [`create`], returning the container's pid (its holder's).
pub fn create_container(ctx: &Ctx, args: &CreateArgs) -> Result<u32> {
    let dir = ctx.root.dir(&args.id)?;
    let bundle = std::path::absolute(args.bundle.as_deref().unwrap_or(Path::new("."))).map_err(io("the bundle path"))?;
    let plan = bundle::load(&bundle)?;
    match (plan.process.terminal, &args.console_socket) {
        (true, None) => {
            return Err(Error::Usage("process.terminal is set but no --console-socket was given (the container runs detached)".into()))
        }
        (false, Some(_)) => return Err(Error::Usage("--console-socket was given but process.terminal is not set".into())),
        _ => {}
    }
    // What every VM needs, checked before anything is made.
    let home = Home::from_env().map_err(io("the data directory"))?;
    vmrun_runtime::artifacts::Artifacts::find(&home, None, None)?;
    let vmm_exe = vmm_exe()?;

    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o711)
        .create(ctx.root.path())
        .map_err(io(format!("creating {}", ctx.root.path().display())))?;
    match std::fs::DirBuilder::new().mode(0o711).create(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Err(Error::Exists(args.id.clone())),
        Err(e) => return Err(io(format!("creating {}", dir.display()))(e)),
    }
    let result = create_in(ctx, args, &dir, &bundle, plan, vmm_exe);
    if result.is_err() {
        remove_dirs(&dir, State::load(&dir).ok().as_ref());
    }
    result
}

fn create_in(ctx: &Ctx, args: &CreateArgs, dir: &Path, bundle: &Path, plan: bundle::Plan, vmm_exe: PathBuf) -> Result<u32> {
    let fifo = dir.join(state::FIFO);
    let cfifo = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).map_err(|_| Error::Usage("a NUL in the --root path".into()))?;
    // SAFETY: mkfifo of a NUL-terminated path.
    if unsafe { libc::mkfifo(cfifo.as_ptr(), 0o622) } != 0 {
        return Err(io("creating exec.fifo")(std::io::Error::last_os_error()));
    }
    // A pod's container other than its sandbox is made in the sandbox's
    // VM: its state names that VM (exec, kill and ps reach its agent).
    let (pod_sandbox, vm_dir) = match crate::pod::role(&plan.annotations) {
        crate::pod::PodRole::Member(sandbox) => {
            let (sdir, sst) = crate::pod::sandbox_of(&ctx.root, &sandbox)?;
            let vm = sst.vm_dir.clone().unwrap_or(sdir);
            (Some(sandbox), vm)
        }
        _ => (None, state::vm_dir_for(dir)),
    };
    let terminal = plan.process.terminal;
    // The container's pid on the host: a holder in the spec's namespaces.
    let mut hold = Command::new(ctx.exe()?);
    hold.arg("hold").stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
    let holder = crate::holder::start(hold, &plan.host_namespaces, &plan.uid_mappings, &plan.gid_mappings)?;
    let holder_pid = holder.child.id();
    let st = State {
        status: Status::Creating,
        creator: ProcessRef::current(),
        vm_dir: Some(vm_dir),
        guest_id: guest_id(&args.id),
        tty: terminal,
        oci: Some(OciBundle {
            oci_version: plan.oci_version.clone(),
            bundle: bundle.to_path_buf(),
            rootfs: plan.rootfs.clone(),
            created: crate::time::now(true),
            annotations: plan.annotations.clone(),
            holder: ProcessRef::of(holder_pid),
            network: None,
            pod_sandbox,
            oom_kills: 0,
        }),
        ..State::new(&args.id, &args.id, "", "")
    };
    let console_socket = args.console_socket.as_deref().map(std::path::absolute).transpose().map_err(io("the console socket path"))?;
    let sp = SupervisorPlan { plan, console_socket, vmm_exe };
    state::write_atomic(&dir.join(state::PLAN_FILE), &serde_json::to_vec_pretty(&sp).map_err(|e| Error::Bundle(e.to_string()))?)
        .map_err(io("writing plan.json"))?;
    st.save(dir).map_err(io("writing the state"))?;

    let log = ctx.log.clone().unwrap_or_else(|| dir.join(state::LOG_FILE));
    let mut cmd = ctx.self_command(&log)?;
    cmd.arg("supervise").arg(&args.id);
    if let Some(s) = &args.streams {
        s.apply(&mut cmd)?;
    }
    // With a terminal the process's streams are the pty: the supervisor
    // keeps none of the caller's (a caller reading create's output to its
    // end would wait for the container otherwise).
    let mut child = spawn_session(cmd, terminal, Some(&holder.socket))?;
    // The supervisor has its end; the holder ends when it does.
    drop(holder.socket);
    let pid = child.id();
    // The supervisor recording its state, or ending, wakes the wait.
    let mut waiter = Waiter::new();
    waiter.watch_dir(dir).child(pid);
    loop {
        let now = State::load(dir).ok();
        match now.as_ref().map(|s| s.status) {
            Some(Status::Created | Status::Running) => break,
            Some(Status::Exited) => {
                reap(&mut child);
                let why = now.and_then(|s| s.error).unwrap_or_else(|| "the container stopped while being created".into());
                return Err(Error::State(why));
            }
            _ => {}
        }
        if exited(pid) {
            // It may have written its state just before it ended.
            if State::load(dir).is_ok_and(|s| s.status != Status::Creating) {
                continue;
            }
            reap(&mut child);
            return Err(Error::State(format!("the supervisor ended before the container was created{}", log_tail(&log, dir))));
        }
        waiter.wait(None);
    }
    if let Some(p) = &args.pid_file {
        if let Err(e) = write_pid_file(p, holder_pid) {
            let _ = child.kill();
            reap(&mut child);
            return Err(e);
        }
    }
    log::debug!("container {} created, supervisor {pid}, pid {holder_pid}", args.id);
    Ok(holder_pid)
}

/// `start`: lets the created container's process run.
pub fn start(ctx: &Ctx, id: &str) -> Result<i32> {
    let (dir, st) = ctx.root.find(id)?;
    match st.effective_status() {
        Status::Created => {}
        Status::Creating => return Err(Error::State(format!("container {id} is still being created"))),
        Status::Running => return Err(Error::State("cannot start an already running container".into())),
        Status::Exited => return Err(Error::State("cannot start a container that has stopped".into())),
    }
    let fifo_path = dir.join(state::FIFO);
    let mut fifo = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&fifo_path)
        .map_err(io("opening exec.fifo"))?;
    // The supervisor's byte, or its end, wakes the wait (without a pidfd,
    // kernels before 5.3, its end is checked every 100 ms).
    let supervisor = st.owner.map(|s| s.pidfd()).transpose().map_err(io("watching the supervisor"))?.flatten();
    let mut byte = [0u8; 1];
    // Once the writer hung up without its byte (the supervisor is ending),
    // only the supervisor's end is waited for.
    let mut hung_up = false;
    loop {
        let mut fds: Vec<BorrowedFd<'_>> = Vec::new();
        if !hung_up {
            fds.push(fifo.as_fd());
        }
        fds.extend(supervisor.as_ref().map(AsFd::as_fd));
        let fallback = (supervisor.is_none()).then(|| Instant::now() + Duration::from_millis(100));
        vmrun_runtime::watch::wait(&fds, fallback).map_err(io("waiting on exec.fifo"))?;
        match fifo.read(&mut byte) {
            Ok(1) => break,
            Ok(_) => hung_up = true,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(io("reading exec.fifo")(e)),
        }
        if !st.owner.is_some_and(|s| s.alive()) {
            return Err(Error::State(format!("container {id}: its supervisor is gone")));
        }
    }
    let _ = std::fs::remove_file(&fifo_path);
    // Report a process that cannot be started, as runc does. The state
    // changing or the supervisor ending wakes the wait.
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut waiter = Waiter::new();
    waiter.watch_dir(&dir);
    loop {
        let now = State::load(&dir).map_err(io("reading the state"))?;
        match now.effective_status() {
            Status::Running => {
                run_poststart(&dir, &now);
                return Ok(0);
            }
            Status::Exited => {
                return match now.error {
                    Some(e) => Err(Error::State(e)),
                    None => {
                        run_poststart(&dir, &now);
                        Ok(0)
                    }
                }
            }
            _ if Instant::now() > deadline => return Err(Error::State(format!("container {id} did not start in time"))),
            _ => {
                if let Some(s) = now.owner {
                    waiter.process(s);
                }
                waiter.wait(Some(deadline));
            }
        }
    }
}

/// The `poststart` hooks, once the process runs (or has run), before
/// `start` returns; their failures are logged. Their state is `running`
/// with the container's pid, even when a short process has ended already.
fn run_poststart(dir: &Path, st: &State) {
    let sp = match SupervisorPlan::load(dir) {
        Ok(sp) => sp,
        Err(e) => return log::warn!("poststart hooks not run: {e}"),
    };
    if sp.plan.hooks.poststart.is_empty() {
        return;
    }
    let mut json = state::oci_json(st);
    json["status"] = state::status_word(Status::Running).into();
    json["pid"] = st.owner.map_or(0, |o| o.pid).into();
    crate::hooks::run_logged("poststart", &sp.plan.hooks.poststart, &json);
}

/// Writes `text` and a newline to standard output. A reader that went
/// away (EPIPE: `state ID | grep -q running`) took what it wanted: not an
/// error, and never a panic.
fn print_line(text: &str) -> Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match writeln!(out, "{text}").and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => r.map_err(io("writing to standard output")),
    }
}

/// `state`: runc's JSON.
pub fn state(ctx: &Ctx, id: &str) -> Result<i32> {
    let (dir, st) = ctx.root.find(id)?;
    let mut json = state::oci_json(&st);
    if st.effective_status() != Status::Exited && state::paused(&dir) {
        json["status"] = "paused".into();
    }
    let text = serde_json::to_string_pretty(&json).map_err(|e| Error::State(e.to_string()))?;
    print_line(&text)?;
    Ok(0)
}

/// `pause` (`freeze`) or `resume`: freezes or thaws the container's
/// processes in the guest (its cgroup's freezer, exec'd processes
/// included); the state says `paused` in between.
pub fn pause(ctx: &Ctx, id: &str, freeze: bool) -> Result<i32> {
    let (dir, st) = ctx.root.find(id)?;
    if !matches!(st.effective_status(), Status::Created | Status::Running) {
        return Err(Error::State("container not running".into()));
    }
    match (freeze, state::paused(&dir)) {
        (true, true) => return Err(Error::State(format!("container {id} is already paused"))),
        (false, false) => return Err(Error::State(format!("container {id} is not paused"))),
        _ => {}
    }
    let client = connect(&st, &dir)?;
    let r = client.freeze(&st.guest_id, freeze).map_err(not_running);
    client.close();
    r?;
    let marker = dir.join(state::PAUSED_FILE);
    if freeze {
        std::fs::write(&marker, b"").map_err(io("recording the pause"))?;
    } else {
        std::fs::remove_file(&marker).map_err(io("recording the resume"))?;
    }
    Ok(0)
}

/// A connection to the container's guest agent.
pub(crate) fn connect(st: &State, dir: &Path) -> Result<Client> {
    Ok(vmrun_runtime::sandbox::reach(st, dir, Options::default())?)
}

/// An agent error, as "container not running" when the agent no longer
/// knows the container.
pub(crate) fn not_running(e: vmrun_agent_client::Error) -> Error {
    match &e {
        vmrun_agent_client::Error::Agent(a) if matches!(a.kind, ErrorKind::NotFound | ErrorKind::InvalidState) => {
            Error::State("container not running".into())
        }
        _ => e.into(),
    }
}

fn signal_process(p: ProcessRef, sig: i32) -> Result<()> {
    if !p.alive() {
        return Err(Error::State("container not running".into()));
    }
    // SAFETY: kill of a process identified by pid and start time.
    if unsafe { libc::kill(p.pid as i32, sig) } != 0 {
        return Err(io("kill")(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// `kill`: a signal to the container's process (through the agent), or,
/// before it started, to the supervisor (which ends it, as the signal
/// would end runc's waiting init).
pub fn kill(ctx: &Ctx, id: &str, signal: Option<&str>, all: bool) -> Result<i32> {
    let (dir, st) = ctx.root.find(id)?;
    let sig = signals::parse(signal.unwrap_or("SIGTERM"))?;
    match st.effective_status() {
        Status::Creating | Status::Created => {
            signal_process(st.owner.ok_or_else(|| Error::State("container not running".into()))?, sig)?;
        }
        Status::Running => {
            let client = connect(&st, &dir)?;
            let r = client.signal(&st.guest_id, None, sig).map_err(not_running);
            if all {
                for e in Root::execs(&dir).iter().filter(|e| e.alive()) {
                    let _ = client.signal(&st.guest_id, Some(&e.exec_id), sig);
                }
            }
            client.close();
            r?;
        }
        Status::Exited if all => {}
        Status::Exited => return Err(Error::State("container not running".into())),
    }
    Ok(0)
}

/// Stops a container's processes on the host and waits until they are
/// gone: exec supervisors are killed; the VMM is killed, then the
/// supervisor is asked to end (SIGTERM), which lets it clean up after its
/// VM, and killed if it has not ended within 10 s. Then whatever the VMM's
/// jail left is collected: a supervisor that was killed (`kill KILL`
/// before `start`, or the SIGKILL here) took its VMM with it
/// (`PR_SET_PDEATHSIG`) before either could remove the jail's cgroups and
/// root.
fn kill_processes(dir: &Path, st: &State) {
    let kill = |p: ProcessRef, sig: i32| {
        if p.alive() {
            // SAFETY: kill of a process identified by pid and start time.
            unsafe { libc::kill(p.pid as i32, sig) };
        }
    };
    let wait_gone = |procs: &[ProcessRef], secs: u64| {
        watch::wait_gone(procs, Instant::now() + Duration::from_secs(secs));
    };
    let execs: Vec<ProcessRef> = Root::execs(dir).iter().filter_map(|e| e.supervisor).collect();
    for p in execs.iter().copied().chain(st.vmm) {
        kill(p, libc::SIGKILL);
    }
    if let Some(s) = st.owner {
        kill(s, libc::SIGTERM);
        wait_gone(&[s], 10);
        kill(s, libc::SIGKILL);
    }
    // The holder ends once its supervisor has.
    let holder = st.oci.as_ref().and_then(|o| o.holder);
    let all: Vec<ProcessRef> = execs.into_iter().chain(st.vmm).chain(st.owner).chain(holder).collect();
    wait_gone(&all, 10);
    if let Some(vmm) = st.vmm {
        vmrun_runtime::vm::collect_jail(vmm.pid);
    }
}

/// `delete`: removes a stopped (or created) container; `--force` kills a
/// running one first.
pub fn delete(ctx: &Ctx, id: &str, force: bool) -> Result<i32> {
    let (dir, st) = match ctx.root.find(id) {
        Ok(found) => found,
        Err(Error::NotFound(_)) if force => {
            // A create that died early may have left a directory without
            // a state.
            vmrun_runtime::vm::remove_dir(&ctx.root.dir(id)?);
            return Ok(0);
        }
        Err(e) => return Err(e),
    };
    let status = st.effective_status();
    if matches!(status, Status::Running | Status::Creating) && !force {
        return Err(Error::State(format!("cannot delete container {id} that is not stopped: {}", state::status_word(status))));
    }
    // The poststop hooks run once the container is gone, with its last
    // state (`stopped`).
    let poststop = SupervisorPlan::load(&dir).map(|sp| sp.plan.hooks.poststop).unwrap_or_default();
    kill_processes(&dir, &st);
    let last = State::load(&dir).unwrap_or(st);
    // A pod member whose supervisor was killed left its container and
    // disks in the sandbox's VM.
    if let Some(sandbox) = last.oci.as_ref().and_then(|o| o.pod_sandbox.clone()) {
        crate::supervisor::leave_pod(&ctx.root, &sandbox, &last);
    }
    remove_dirs(&dir, Some(&last));
    if dir.exists() {
        return Err(Error::State(format!("cannot remove {}", dir.display())));
    }
    crate::hooks::run_logged("poststop", &poststop, &state::oci_json(&last));
    Ok(0)
}

/// `exec`'s flags.
#[derive(Debug, Clone, Default)]
pub struct ExecArgs {
    /// The container.
    pub id: String,
    /// A process.json (runc's `--process`).
    pub process: Option<PathBuf>,
    /// Run in the background; `--pid-file` gets the exec supervisor's pid.
    pub detach: bool,
    /// Where to write the pid.
    pub pid_file: Option<PathBuf>,
    /// Where to send the terminal's master.
    pub console_socket: Option<PathBuf>,
    /// Give the process a terminal.
    pub tty: bool,
    /// Working directory.
    pub cwd: Option<String>,
    /// Extra environment.
    pub env: Vec<String>,
    /// `uid[:gid]`.
    pub user: Option<String>,
    /// `--no-new-privs`: set no_new_privs whatever the process says.
    pub no_new_privs: bool,
    /// `--cap`: capabilities added to the bounding, effective and
    /// permitted sets.
    pub caps: Vec<String>,
    /// The command, without `--process`.
    pub command: Vec<String>,
    /// The process, instead of `--process` or the command.
    pub process_plan: Option<ProcessPlan>,
    /// The exec supervisor's standard streams (default: this process's).
    pub streams: Option<Streams>,
}

/// The exec'd process: from `--process`, else the container's own process
/// with the command and the flags' changes.
fn exec_process(dir: &Path, args: &ExecArgs) -> Result<ProcessPlan> {
    let mut plan = exec_process_of(dir, args)?;
    plan.no_new_privileges |= args.no_new_privs;
    for cap in &args.caps {
        let n = vmrun_agent_protocol::capability_number(cap).ok_or_else(|| Error::Usage(format!("unknown capability {cap:?} (--cap)")))?;
        let name = vmrun_agent_protocol::CAPABILITY_NAMES[n as usize].to_string();
        let c = &mut plan.capabilities;
        for set in [&mut c.bounding, &mut c.effective, &mut c.permitted] {
            if !set.contains(&name) {
                set.push(name.clone());
            }
        }
    }
    Ok(plan)
}

fn exec_process_of(dir: &Path, args: &ExecArgs) -> Result<ProcessPlan> {
    if let Some(plan) = &args.process_plan {
        return Ok(plan.clone());
    }
    if let Some(path) = &args.process {
        let text = std::fs::read(path).map_err(|e| Error::Usage(format!("cannot read the process file {}: {e}", path.display())))?;
        let raw: serde_json::Value =
            serde_json::from_slice(&text).map_err(|e| Error::Usage(format!("invalid process file {}: {e}", path.display())))?;
        bundle::check_capability_names(&raw, path)?;
        let p: oci_spec::runtime::Process =
            serde_json::from_value(raw).map_err(|e| Error::Usage(format!("invalid process file {}: {e}", path.display())))?;
        let mut plan = bundle::process_plan(&p)?;
        plan.terminal |= args.tty;
        return Ok(plan);
    }
    if args.command.is_empty() {
        return Err(Error::Usage("exec needs a command or --process".into()));
    }
    let mut plan = SupervisorPlan::load(dir)?.plan.process;
    plan.args = args.command.clone();
    plan.env.extend(args.env.iter().cloned());
    if let Some(c) = &args.cwd {
        plan.cwd = c.clone();
    }
    if let Some(u) = &args.user {
        plan.user = if u.contains(':') { u.clone() } else { format!("{u}:{u}") };
    }
    plan.terminal = args.tty;
    Ok(plan)
}

/// `exec`: another process in a running container, in the foreground
/// (returns its exit code) or with `--detach` (an exec supervisor whose pid
/// goes to `--pid-file` and whose exit status is the process's).
pub fn exec(ctx: &Ctx, args: &ExecArgs) -> Result<i32> {
    if !args.detach {
        let (_, exec_id, _) = prepare_exec(ctx, args, false)?;
        return Ok(supervisor::exec_supervise(&ctx.root, &args.id, &exec_id));
    }
    let pid = exec_detached(ctx, args)?;
    if let Some(p) = &args.pid_file {
        write_pid_file(p, pid)?;
    }
    Ok(0)
}

/// Checks an exec (`detach`ed or not) and records its plan and its
/// `starting` record: the container's directory, the exec's id, whether
/// the process has a terminal.
fn prepare_exec(ctx: &Ctx, args: &ExecArgs, detach: bool) -> Result<(PathBuf, String, bool)> {
    let (dir, st) = ctx.root.find(&args.id)?;
    if st.effective_status() != Status::Running {
        return Err(Error::State(format!("cannot exec in container {}: it is not running", args.id)));
    }
    if state::paused(&dir) {
        return Err(Error::State(format!("cannot exec in container {}: it is paused (resume it first)", args.id)));
    }
    let process = exec_process(&dir, args)?;
    if process.terminal && detach && args.console_socket.is_none() {
        return Err(Error::Usage("a terminal for a detached process needs a --console-socket".into()));
    }
    if !process.terminal && args.console_socket.is_some() {
        return Err(Error::Usage("--console-socket was given but the process has no terminal".into()));
    }
    let exec_id = format!("exec-{}", vmrun_runtime::container::new_id());
    std::fs::create_dir_all(dir.join(state::EXECS)).map_err(io("creating the execs directory"))?;
    let console_socket = args.console_socket.as_deref().map(std::path::absolute).transpose().map_err(io("the console socket path"))?;
    let terminal = process.terminal;
    let plan = ExecPlan { process, console_socket };
    state::write_atomic(&supervisor::exec_plan_path(&dir, &exec_id), &serde_json::to_vec(&plan).map_err(|e| Error::Usage(e.to_string()))?)
        .map_err(io("writing the exec plan"))?;
    let rec = ExecRecord { exec_id: exec_id.clone(), supervisor: None, status: ExecStatus::Starting, exit_code: None, error: None };
    supervisor::save_exec(&dir, &rec).map_err(io("writing the exec record"))?;
    Ok((dir, exec_id, terminal))
}

/// [`exec`] with `--detach`: starts the exec supervisor, whose exit
/// status is the process's, and returns its pid once the process runs.
pub fn exec_detached(ctx: &Ctx, args: &ExecArgs) -> Result<u32> {
    let (dir, exec_id, terminal) = prepare_exec(ctx, args, true)?;
    let log = ctx.log.clone().unwrap_or_else(|| dir.join(state::LOG_FILE));
    let mut cmd = ctx.self_command(&log)?;
    cmd.arg("exec-supervise").arg(&args.id).arg(&exec_id);
    if let Some(s) = &args.streams {
        s.apply(&mut cmd)?;
    }
    let mut child = spawn_session(cmd, terminal, None)?;
    let pid = child.id();
    // The exec supervisor recording its process, or ending, wakes the wait.
    let mut waiter = Waiter::new();
    waiter.watch_dir(&dir.join(state::EXECS)).child(pid);
    loop {
        let rec = supervisor::load_exec(&dir, &exec_id);
        match rec.as_ref().map(|r| r.status) {
            Some(ExecStatus::Running | ExecStatus::Exited) => break,
            Some(ExecStatus::Failed) => {
                reap(&mut child);
                return Err(Error::State(rec.and_then(|r| r.error).unwrap_or_else(|| "exec failed".into())));
            }
            _ => {}
        }
        if exited(pid) {
            // It may have written its record just before it ended.
            if supervisor::load_exec(&dir, &exec_id).is_none_or(|r| r.status == ExecStatus::Starting) {
                reap(&mut child);
                return Err(Error::State(format!("the exec supervisor ended before the process started{}", log_tail(&log, &dir))));
            }
            continue;
        }
        waiter.wait(None);
    }
    Ok(pid)
}

/// `ps`: the container's host processes (its supervisor and the exec
/// supervisors), as a JSON array of pids or a table.
pub fn ps(ctx: &Ctx, id: &str, format: &str) -> Result<i32> {
    let pids = pids(ctx, id)?;
    match format {
        "json" => print_line(&serde_json::to_string(&pids).map_err(|e| Error::State(e.to_string()))?)?,
        "table" => {
            let mut table = String::from("PID     CMD");
            for pid in pids {
                let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                let cmd: Vec<String> = cmd.split(|b| *b == 0).filter(|a| !a.is_empty()).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
                table.push_str(&format!("\n{pid:<7} {}", cmd.join(" ")));
            }
            print_line(&table)?;
        }
        other => return Err(Error::Usage(format!("invalid format {other:?} (table or json)"))),
    }
    Ok(0)
}

/// The container's host processes: its pid (its holder's), its
/// supervisor, its exec supervisors.
pub fn pids(ctx: &Ctx, id: &str) -> Result<Vec<u32>> {
    let (dir, st) = ctx.root.find(id)?;
    let mut pids = Vec::new();
    if st.effective_status() != Status::Exited {
        // The container's pid first (its holder), then its supervisor.
        pids.push(state::pid(&st));
        pids.extend(st.owner.map(|s| s.pid).filter(|p| !pids.contains(p)));
    }
    pids.extend(Root::execs(&dir).iter().filter(|e| e.alive()).filter_map(|e| e.supervisor.map(|s| s.pid)));
    Ok(pids)
}

/// What `features` prints: runc's features document.
pub fn features_json() -> serde_json::Value {
    serde_json::json!({
        "ociVersionMin": "1.0.0",
        "ociVersionMax": "1.2.1",
        "hooks": ["prestart", "createRuntime", "createContainer", "poststart", "poststop"],
        "mountOptions": ["ro", "rw", "nosuid", "nodev", "noexec", "bind", "rbind", "newinstance"],
        "linux": {
            "namespaces": ["mount", "pid", "uts", "ipc"],
            "capabilities": vmrun_agent_protocol::CAPABILITY_NAMES.as_slice(),
            "cgroup": { "v1": false, "v2": true, "systemd": false, "systemdUser": false, "rdma": false },
            "seccomp": { "enabled": false },
            "apparmor": { "enabled": false },
            "selinux": { "enabled": false },
            "intelRdt": { "enabled": false },
            "mountExtensions": { "idmap": { "enabled": false } }
        },
        "annotations": {
            "io.vmrun.oci.version": env!("CARGO_PKG_VERSION"),
            "io.vmrun.isolation": "microvm"
        }
    })
}

/// `features`.
pub fn features() -> Result<i32> {
    print_line(&serde_json::to_string_pretty(&features_json()).map_err(|e| Error::State(e.to_string()))?)?;
    Ok(0)
}

/// `spec`: writes a default `config.json` into the bundle.
pub fn spec(bundle: Option<&Path>) -> Result<i32> {
    let path = bundle.unwrap_or(Path::new(".")).join("config.json");
    if path.exists() {
        return Err(Error::Usage(format!("{} exists: remove it first", path.display())));
    }
    let text = serde_json::to_string_pretty(&bundle::default_spec()).map_err(|e| Error::Usage(e.to_string()))?;
    std::fs::write(&path, text + "\n").map_err(io(format!("writing {}", path.display())))?;
    Ok(0)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn exec_capabilities_from_the_process_file_and_flags() {
        let d = tempfile::tempdir().unwrap();
        let file = d.path().join("process.json");
        let process = serde_json::json!({
            "user": { "uid": 0, "gid": 0 }, "args": ["sh"], "cwd": "/",
            "capabilities": { "bounding": ["CAP_KILL"], "effective": ["CAP_KILL"], "permitted": ["CAP_KILL"] }
        });
        std::fs::write(&file, process.to_string()).unwrap();
        let mut args = ExecArgs {
            id: "c".into(),
            process: Some(file.clone()),
            ..Default::default()
        };
        let p = exec_process(d.path(), &args).unwrap();
        assert_eq!((p.capabilities.bounding.as_slice(), p.no_new_privileges), (["CAP_KILL".to_string()].as_slice(), false));
        args.no_new_privs = true;
        args.caps = vec!["net_admin".into(), "CAP_KILL".into()];
        let p = exec_process(d.path(), &args).unwrap();
        assert!(p.no_new_privileges);
        assert_eq!(p.capabilities.effective, ["CAP_KILL", "CAP_NET_ADMIN"]);
        assert_eq!(p.capabilities.bounding, p.capabilities.permitted);
        assert!(p.capabilities.ambient.is_empty());
        args.caps = vec!["CAP_TELEPORT".into()];
        assert!(exec_process(d.path(), &args).unwrap_err().to_string().contains("CAP_TELEPORT"));
        args.caps.clear();
        let bad = serde_json::json!({ "user": { "uid": 0, "gid": 0 }, "args": ["sh"], "cwd": "/", "capabilities": { "effective": ["CAP_NOPE"] } });
        std::fs::write(&file, bad.to_string()).unwrap();
        let e = exec_process(d.path(), &args).unwrap_err().to_string();
        assert!(e.contains("unknown capability \"CAP_NOPE\" in process.capabilities.effective"), "{e}");
    }

    #[test]
    fn guest_ids_are_valid_agent_ids() {
        assert_eq!(guest_id("abc"), "abc");
        assert_eq!(guest_id("a+b"), "ab");
        assert_eq!(guest_id(&"f".repeat(100)).len(), 64);
        assert_eq!(guest_id("+++"), "container");
        assert_eq!(guest_id("-.x"), "x");
        for id in ["abc", "a+b", "-.x", "+++"] {
            assert!(vmrun_agent_protocol::valid_id(&guest_id(id)));
        }
    }

    #[test]
    fn features_name_the_supported_versions() {
        let f = features_json();
        assert_eq!(f["ociVersionMin"], "1.0.0");
        assert_eq!(f["ociVersionMax"], "1.2.1");
        let hooks = f["hooks"].as_array().unwrap();
        assert!(hooks.contains(&"poststop".into()) && !hooks.contains(&"startContainer".into()), "{hooks:?}");
    }
}
