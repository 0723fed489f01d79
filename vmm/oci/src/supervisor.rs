//! The supervisors: the process that owns a container's VM, and the one
//! that owns an exec'd process.
//!
//! `create` starts `vmrun-oci supervise ID` in a session of its own, with
//! the standard streams it was given (the caller's pipes or FIFOs; with a
//! terminal, none). The supervisor makes the disks, starts a sandbox from
//! the warm-start template (`vmrun_runtime::sandbox`), has the agent create
//! the container on the root copy, records `created`, and blocks opening
//! `exec.fifo` for writing until `start` opens it for reading, as runc's
//! init does (a signal meanwhile cancels, through the sandbox's `Cancel`).
//! Then it starts the process, pumps its streams to its own standard
//! streams (or between the host pty and the guest's terminal),
//! forwards the signals it receives (SIGWINCH as a resize; the holder's
//! too, see `holder.rs`), and exits with the process's exit code (128+N
//! for signal N), which it sends the holder first: the holder's pid is
//! the container's pid, the one containerd's shim reaps to learn how the
//! container ended. The VMM is its child and dies with it
//! (`PR_SET_PDEATHSIG`).
//!
//! `exec` starts `vmrun-oci exec-supervise ID EXEC_ID` the same way (or
//! runs the same code in the foreground without `--detach`).

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::os::unix::fs::OpenOptionsExt;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use vmrun_agent_client::{Options, Process, StdioMode};
use vmrun_agent_protocol::{CreateContainer, DiskDir, ExecProcess, ImageConfig, LayerSource, UnpackLimits};
use vmrun_runtime::artifacts::Artifacts;
use vmrun_runtime::container::ProcessRef;
use vmrun_runtime::home::Home;
use vmrun_runtime::sandbox::{AgentWait, Cancel, Origin, Sandbox};
use vmrun_runtime::signal::{Relay, Target};
use vmrun_runtime::vm::VmSpec;

use crate::bundle::{Plan, ProcessPlan};
use crate::console;
use crate::copies::{self, Watcher};
use crate::error::{io, Error, Result};
use crate::signals;
use crate::state::{self, ExecRecord, ExecStatus, Root, State, Status};

/// Exit status of a supervisor that failed before its process ran.
pub const FAILED: i32 = 1;

/// What `create` hands the supervisor in `plan.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SupervisorPlan {
    /// The container.
    pub plan: Plan,
    /// Where to send the terminal's master (with `process.terminal`).
    pub console_socket: Option<PathBuf>,
    /// The `vmrun` executable that runs the VMM.
    pub vmm_exe: PathBuf,
}

impl SupervisorPlan {
    /// Reads the plan of the container whose state directory is `dir`.
    pub fn load(dir: &Path) -> Result<Self> {
        serde_json::from_slice(&std::fs::read(dir.join(state::PLAN_FILE)).map_err(io("reading plan.json"))?)
            .map_err(|e| Error::Bundle(format!("plan.json: {e}")))
    }
}

/// What `exec` hands an exec supervisor in `execs/<exec id>.plan.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExecPlan {
    /// The process.
    pub process: ProcessPlan,
    /// Where to send the terminal's master.
    pub console_socket: Option<PathBuf>,
}

/// Whether the descriptor `fd` is `/dev/null`.
fn is_dev_null(fd: RawFd) -> bool {
    // SAFETY: fstat fills the stat it is given.
    let st = unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        (libc::fstat(fd, &mut st) == 0).then_some(st)
    };
    st.is_some_and(|st| st.st_mode & libc::S_IFMT == libc::S_IFCHR && st.st_rdev == libc::makedev(1, 3))
}

/// A terminal for the process: a host pty whose master goes to `socket`
/// and whose slave (raw, and this process's controlling terminal when it
/// leads a session) is returned.
fn terminal(socket: &Path) -> Result<File> {
    let pty = console::open_pty().map_err(io("opening a pseudo-terminal"))?;
    console::make_raw(pty.slave.as_raw_fd()).map_err(io("setting the terminal to raw mode"))?;
    if let Err(e) = console::set_controlling(pty.slave.as_raw_fd()) {
        log::debug!("the terminal is not our controlling terminal (no resize signals): {e}");
    }
    console::send_fd(socket, pty.master.as_raw_fd(), &pty.name)
        .map_err(io(format!("sending the terminal to the console socket {}", socket.display())))?;
    Ok(File::from(pty.slave))
}

fn copy_out(from: &mut impl Read, to: &mut impl Write) {
    let mut buf = [0u8; 32 * 1024];
    while let Ok(n) = from.read(&mut buf) {
        if n == 0 || to.write_all(&buf[..n]).and_then(|()| to.flush()).is_err() {
            break;
        }
    }
}

/// Pumps the process's streams: with `tty`, between it and the terminal;
/// otherwise to this process's stdout and stderr, and from its stdin (when
/// the process has a stdin stream). Returns the exit code.
fn pump(process: &mut Process, tty: Option<File>) -> std::result::Result<i32, vmrun_agent_client::Error> {
    let mut outputs = Vec::new();
    let input = process.stdin.take();
    match tty {
        Some(term) => {
            if let (Some(mut out), Ok(mut w)) = (process.stdout.take(), term.try_clone()) {
                outputs.push(std::thread::spawn(move || copy_out(&mut out, &mut w)));
            }
            if let Some(mut input) = input {
                let mut r = term;
                std::thread::spawn(move || {
                    copy_out(&mut r, &mut input);
                    let _ = input.close();
                });
            }
        }
        None => {
            if let Some(mut out) = process.stdout.take() {
                outputs.push(std::thread::spawn(move || copy_out(&mut out, &mut std::io::stdout())));
            }
            if let Some(mut err) = process.stderr.take() {
                outputs.push(std::thread::spawn(move || copy_out(&mut err, &mut std::io::stderr())));
            }
            if let Some(mut input) = input {
                std::thread::spawn(move || {
                    copy_out(&mut std::io::stdin(), &mut input);
                    let _ = input.close();
                });
            }
        }
    }
    let code = process.wait();
    for t in outputs {
        let _ = t.join();
    }
    code
}

/// The stdio mode for a process: its terminal's size, or pipes (stdin
/// only when this process's stdin is not `/dev/null`).
fn stdio_mode(tty: Option<&File>, terminal: bool) -> StdioMode {
    match tty {
        Some(t) => {
            let (rows, cols) = console::window_size(t.as_raw_fd()).unwrap_or((24, 80));
            StdioMode::Tty { rows, cols }
        }
        None if terminal => StdioMode::Tty { rows: 24, cols: 80 },
        None => StdioMode::Piped { stdin: !is_dev_null(libc::STDIN_FILENO) },
    }
}

/// The exit code a failed start gives: the agent's (126: cannot run, 127:
/// not found), else [`FAILED`].
fn failure_code(e: &Error) -> i32 {
    match e {
        Error::Agent(a) => a.exit_code().unwrap_or(FAILED),
        _ => FAILED,
    }
}

/// `vmrun-oci supervise ID`: owns the container's VM until its process
/// ends; returns the exit status.
pub fn supervise(root: &Root, id: &str) -> i32 {
    // Taken while this process has one thread (its environment changes).
    let holder = crate::holder::inherited();
    let relay = Relay::start(signals::FORWARDED, None);
    // The holder's signals become this process's, once the relay takes
    // them.
    let link = holder.and_then(|s| match crate::holder::Link::start(s) {
        Ok(l) => Some(l),
        Err(e) => {
            log::error!("container {id}: {e}");
            None
        }
    });
    let code = supervise_container(root, id, &relay);
    if let Some(l) = link {
        l.finish(code);
    }
    code
}

fn supervise_container(root: &Root, id: &str, relay: &Relay) -> i32 {
    let dir = match root.dir(id) {
        Ok(d) => d,
        Err(e) => {
            log::error!("{e}");
            return FAILED;
        }
    };
    let mut state = match State::load(&dir) {
        Ok(s) => s,
        Err(e) => {
            log::error!("container {id}: cannot read its state: {e}");
            return FAILED;
        }
    };
    state.owner = ProcessRef::current();
    if let Err(e) = state.save(&dir) {
        log::error!("container {id}: cannot write its state: {e}");
        return FAILED;
    }
    let result = run_container(&dir, &mut state, relay);
    relay.stop_forwarding();
    // The VM is gone: the pod's network namespace is left as it was found.
    if let Some(link) = state.oci.as_mut().and_then(|o| o.network.take()) {
        vmrun_runtime::net::pod::detach(&link);
    }
    let code = match (&result, relay.cancel().cancelled()) {
        (Ok(code), _) => *code,
        (Err(_), Some(sig)) => 128 + sig,
        (Err(e), None) => {
            log::error!("container {id}: {e}");
            failure_code(e)
        }
    };
    state.status = Status::Exited;
    state.exit_code = Some(code);
    state.error = result.err().map(|e| e.to_string());
    if let Err(e) = state.save(&dir) {
        log::warn!("container {id}: cannot record its end: {e}");
    }
    code
}

fn run_container(dir: &Path, state: &mut State, relay: &Relay) -> Result<i32> {
    let sp = SupervisorPlan::load(dir)?;
    let plan = &sp.plan;
    let tty = match (&sp.console_socket, plan.process.terminal) {
        (Some(socket), true) => Some(terminal(socket)?),
        _ => None,
    };
    let home = Home::from_env().map_err(io("the data directory"))?;
    match state.oci.as_ref().and_then(|o| o.pod_sandbox.clone()) {
        Some(sandbox) => run_member(dir, state, relay, &sp, tty, &home, &sandbox),
        None => run_own_vm(dir, state, relay, &sp, tty, &home),
    }
}

/// A container in a VM of its own (a pod's sandbox makes the pod's VM).
fn run_own_vm(dir: &Path, state: &mut State, relay: &Relay, sp: &SupervisorPlan, tty: Option<File>, home: &Home) -> Result<i32> {
    let plan = &sp.plan;
    let artifacts = Artifacts::find(home, None, None)?;
    let layer_disk = vmrun_runtime::layer_disk::empty(&home.layer_disks())?;
    // The disks the guest writes go where the VMM may write.
    let layout = state.layout(dir);
    let disk_dir = layout.vm_dir();
    std::fs::create_dir_all(&disk_dir).map_err(io(format!("creating {}", disk_dir.display())))?;
    let root_copy = crate::rootcopy::make(home, &plan.rootfs, &disk_dir)?;
    let mut disks = root_copy.disks();
    let staging = layout.vm_dir().join("volumes.staging");
    let disk_dirs = match volume_disk(plan, layout.volume_disk(disks.len()), &staging, disks.len())? {
        Some((path, dirs)) => {
            disks.push(path);
            dirs
        }
        None => Vec::new(),
    };
    log::debug!("disks made");
    let pod_sandbox = crate::pod::role(&plan.annotations) == crate::pod::PodRole::Sandbox;
    if pod_sandbox {
        // The pod's other containers' disks go in the slots after these.
        crate::pod::reserve(dir, disks.len())?;
    }
    let network = attach_network(dir, state, plan)?;
    let spec = VmSpec {
        artifacts,
        mem_mib: plan.mem_mib,
        cpus: plan.cpus,
        layer_disk,
        volumes: disks,
        volume_slots: if pod_sandbox { crate::pod::POD_SLOTS } else { vmrun_runtime::volume::SLOTS },
        read_only_volumes: root_copy.read_only_slots(),
        tap: network.as_ref().map(|_| vmrun_runtime::net::pod::TAP.to_string()),
        netns: network.as_ref().map(|n| n.netns.clone()),
        dir: layout.dir().to_path_buf(),
        vmm_exe: sp.vmm_exe.clone(),
        boot_memory_mib: None,
    };
    let cancel = relay.cancel();
    let base = Sandbox::base_template(&home.templates(), &spec, &|m| log::info!("{m}"), cancel)?;
    // The VM's cgroup on the host: this supervisor joins it, and the VMM's
    // jail cgroup is made under it.
    let host_cpuset = join_host_cgroup(dir, state, plan)?;
    let wait = AgentWait { timeout: Duration::from_secs(120), options: Options::default() };
    let launched = Sandbox::launch(&spec, Origin::Template(&base), None, cancel)?;
    // Recorded at once: a `delete` that has to kill this supervisor
    // (SIGKILL: the VMM dies with it, its jail's cgroups and root left
    // behind) collects what that jail left by the VMM's pid.
    state.vmm = ProcessRef::of(launched.pid());
    state.save(dir).map_err(io("writing the state"))?;
    let sandbox = launched.connect(wait)?;
    log::debug!("VM {} restored, agent connected", sandbox.pid());
    if let Some(n) = &network {
        sandbox.configure_network(&n.guest_config())?;
        log::debug!("eth0 has the address of {} ({}/{})", n.interface, n.address, n.prefix);
    }
    let guest = Guest { client: sandbox.client(), console: sandbox.layout().console(), pod_sandbox: None };
    let code = run_process(dir, state, relay, sp, tty, &guest, root_copy.rootfs_spec(), disk_dirs, host_cpuset, root_copy.writable())?;
    // The guest has nothing more to save (what the container wrote in its
    // root is written back): the VM is killed, not shut down.
    sandbox.kill();
    log::debug!("VM stopped");
    Ok(code)
}

/// A pod's container other than its sandbox: made in the sandbox's VM,
/// its root's disks attached to free slots of it while it runs, then
/// removed from the guest and detached.
fn run_member(
    dir: &Path,
    state: &mut State,
    relay: &Relay,
    sp: &SupervisorPlan,
    tty: Option<File>,
    home: &Home,
    sandbox: &str,
) -> Result<i32> {
    let plan = &sp.plan;
    let root = Root::new(dir.parent().unwrap_or(dir))?;
    let (sandbox_dir, sandbox_state) = crate::pod::sandbox_of(&root, sandbox)?;
    // The sandbox's VM.
    let layout = state.layout(dir);
    // This container's own disks: in its own directory (the jailed VMM
    // is handed them open, it never opens them by path).
    let disk_dir = dir.join("disks");
    std::fs::create_dir_all(&disk_dir).map_err(io(format!("creating {}", disk_dir.display())))?;
    let root_copy = crate::rootcopy::make(home, &plan.rootfs, &disk_dir)?;
    let disks = root_copy.disks();
    let count = disks.len() + usize::from(!plan.volumes.is_empty());
    let remove = |m: &str| crate::pod::remove_from_guest(&layout, &crate::ops::guest_id(m));
    let slots = crate::pod::allocate(&root, &sandbox_dir, &layout, &state.id, count, &remove)?;
    let result = (|| {
        let mut disk_dirs = Vec::new();
        let mut attach = disks.iter().cloned().enumerate().map(|(i, d)| (d, root_copy.read_only_slots().contains(&i))).collect::<Vec<_>>();
        if let Some(&slot) = slots.get(disks.len()) {
            if let Some((path, dirs)) = volume_disk(plan, disk_dir.join("volumes.disk"), &disk_dir.join("volumes.staging"), slot)? {
                attach.push((path, false));
                disk_dirs = dirs;
            }
        }
        for ((disk, read_only), slot) in attach.iter().zip(&slots) {
            vmrun_runtime::sandbox::attach_volume(&layout, *slot, disk, *read_only)?;
        }
        log::debug!("disks attached to slots {slots:?} of the pod's VM");
        let host_cpuset = join_host_cgroup(dir, state, plan)?;
        let client = vmrun_runtime::sandbox::reach(state, dir, Options::default())?;
        let guest = Guest { client: &client, console: layout.console(), pod_sandbox: Some(sandbox_state.guest_id.clone()) };
        run_process(dir, state, relay, sp, tty, &guest, root_copy.rootfs_spec_in(&slots), disk_dirs, host_cpuset, root_copy.writable())
    })();
    leave_pod(&root, sandbox, state);
    result
}

/// Takes a pod member out of its sandbox's VM: its container removed from
/// the guest (unmounting its disks), then its slots emptied and freed.
/// Slots whose container could not be removed stay taken (the next member
/// that needs room tries again); a VM that is gone took all of it along.
pub fn leave_pod(root: &Root, sandbox: &str, state: &State) {
    let Ok(dir) = root.dir(&state.id) else { return };
    let layout = state.layout(&dir);
    if !crate::pod::remove_from_guest(&layout, &state.guest_id) {
        return;
    }
    if let Ok(sandbox_dir) = root.dir(sandbox) {
        crate::pod::release(&sandbox_dir, &layout, &state.id);
    }
}

/// Where a container's process runs: the agent of its VM, the VM's
/// console (named when the VM is lost), and for a pod's container the
/// guest id of the pod's sandbox, whose IPC and UTS namespaces it shares.
struct Guest<'a> {
    client: &'a vmrun_agent_client::Client,
    console: PathBuf,
    pod_sandbox: Option<String>,
}

/// Creates the container in the guest, holds its process until `start`,
/// runs it and reports its end; returns its exit code.
#[allow(clippy::too_many_arguments)]
fn run_process(
    dir: &Path,
    state: &mut State,
    relay: &Relay,
    sp: &SupervisorPlan,
    tty: Option<File>,
    guest: &Guest<'_>,
    rootfs: vmrun_agent_protocol::RootfsSpec,
    disk_dirs: Vec<DiskDir>,
    host_cpuset: bool,
    writable: &Path,
) -> Result<i32> {
    let plan = &sp.plan;
    let cancel = relay.cancel();
    let config = ImageConfig {
        entrypoint: Vec::new(),
        cmd: plan.process.args.clone(),
        env: plan.process.env.clone(),
        working_dir: plan.process.cwd.clone(),
        user: plan.process.user.clone(),
        hostname: plan.hostname.clone(),
        share_ipc_uts_with: guest.pod_sandbox.clone(),
        // A pod member whose spec joins a PID namespace by path (the
        // sandbox's: Kubernetes' shareProcessNamespace) shares the
        // sandbox's in the guest.
        share_pid: guest.pod_sandbox.is_some()
            && plan.host_namespaces.iter().any(|n| n.kind == crate::holder::NsKind::Pid && n.path.is_some()),
        mounts: plan.mounts.clone(),
        rlimits: plan.process.rlimits.clone(),
        capabilities: Some(plan.process.capabilities.clone()),
        no_new_privileges: Some(plan.process.no_new_privileges),
        seccomp: plan.seccomp.clone(),
        additional_gids: Some(plan.process.additional_gids.clone()),
        oom_score_adj: plan.process.oom_score_adj,
        readonly_rootfs: plan.readonly,
        masked_paths: plan.masked_paths.clone(),
        readonly_paths: plan.readonly_paths.clone(),
        sysctl: plan.sysctl.clone(),
        devices: plan.devices.clone(),
        rootfs_propagation: plan.rootfs_propagation,
        uid_mappings: plan.uid_mappings.clone(),
        gid_mappings: plan.gid_mappings.clone(),
        disk_dirs,
        resources: Box::new(crate::host_cgroup::guest_share(&plan.resources, host_cpuset)),
        cgroup: true,
    };
    guest.client.create_container(&CreateContainer {
        id: state.guest_id.clone(),
        layers: LayerSource { disk: "/dev/vda".into(), layers: Vec::new() },
        // The copy stays as it is, under an overlay whose upper layer
        // holds what the container changes: written back into the bundle
        // when the process ends. Writable even for `root.readonly`: the
        // agent makes the missing mount points first, then the
        // container's root read-only (as runc does).
        rootfs,
        config,
        limits: UnpackLimits::default(),
    })?;
    let watcher = send_copies(guest.client, &state.guest_id, plan)?;
    // As runc's create: the process is set up (namespaces, root, mounts)
    // and waits before its program; a setup that fails fails the create.
    let mut process = guest.client.prepare(&state.guest_id, stdio_mode(tty.as_ref(), false))?;
    log::debug!("process set up (guest pid {}), held before its program", process.pid);
    run_create_hooks(plan, state)?;
    state.status = Status::Created;
    state.save(dir).map_err(io("writing the state"))?;
    log::debug!("container {} created; waiting for start", state.id);

    if let Some(sig) = wait_for_start(dir, cancel)? {
        log::info!("signal {sig} before start: stopping");
        return Ok(128 + sig);
    }

    log::debug!("starting the process");
    // The terminal may have been resized since create (the relay forwards
    // resizes from here on).
    if let Some((rows, cols)) = tty.as_ref().and_then(|t| console::window_size(t.as_raw_fd())) {
        if let Err(e) = guest.client.resize(&state.guest_id, None, rows, cols) {
            log::warn!("resizing the container's terminal: {e}");
        }
    }
    guest.client.release(&state.guest_id)?;
    log::debug!("process started (guest pid {})", process.pid);
    // Signals go to the process now; they no longer cancel the sandbox.
    relay.forward_to(Target {
        client: guest.client.clone(),
        id: state.guest_id.clone(),
        exec_id: None,
        terminal: tty.as_ref().map(AsRawFd::as_raw_fd),
    });
    state.status = Status::Running;
    state.save(dir).map_err(io("writing the state"))?;
    let code = match pump(&mut process, tty) {
        Ok(c) => {
            log::debug!("process exited with {c}");
            drop(watcher);
            // Killed: by the guest's OOM killer? (Read while the
            // container's cgroup is there.)
            if c == 128 + libc::SIGKILL {
                match guest.client.stats(&state.guest_id) {
                    Ok(s) => state.oci.iter_mut().for_each(|o| o.oom_kills = s.memory.events.oom_kill),
                    Err(e) => log::warn!("reading the container's OOM kills: {e}"),
                }
            }
            write_back(guest.client, &state.guest_id, plan, writable);
            c
        }
        Err(e) => {
            // Its VMM was killed (`delete --force`) or died: the container
            // ends as if killed, and what it wrote in its root is lost.
            log::error!("lost the container's VM ({e}); its console is in {}", guest.console.display());
            128 + libc::SIGKILL
        }
    };
    // Stopped as soon as the process has ended: a caller polling `state`
    // for `stopped` does not wait for the VM's teardown.
    state.status = Status::Exited;
    state.exit_code = Some(code);
    if let Err(e) = state.save(dir) {
        log::warn!("container {}: cannot record its end: {e}", state.id);
    }
    Ok(code)
}

/// The network namespace the spec names by path (a pod's, which CNI set
/// up): its interface is mirrored to the VM, recorded in the state at once
/// (for `delete`, should this supervisor die). A new namespace, or none
/// (the host's), gives the VM no network interface: the host's own network
/// is never the guest's.
fn attach_network(dir: &Path, state: &mut State, plan: &Plan) -> Result<Option<vmrun_runtime::net::pod::PodLink>> {
    let path = plan.host_namespaces.iter().find(|n| n.kind == crate::holder::NsKind::Network).and_then(|n| n.path.as_deref());
    let Some(link) = path.map(vmrun_runtime::net::pod::attach).transpose()?.flatten() else { return Ok(None) };
    if let Some(o) = state.oci.as_mut() {
        o.network = Some(link.clone());
    }
    if let Err(e) = state.save(dir) {
        vmrun_runtime::net::pod::detach(&link);
        return Err(io("writing the state")(e));
    }
    log::debug!("attached to {} of {}: {}/{}", link.interface, link.netns.display(), link.address, link.prefix);
    Ok(Some(link))
}

/// Writes what the container changed in its root back into the bundle's
/// root (as it would be under runc), before the container is reported
/// stopped. A failure is logged: the process's exit stands.
fn write_back(client: &vmrun_agent_client::Client, guest_id: &str, plan: &Plan, disk: &Path) {
    let limit = std::fs::metadata(disk).map(|m| m.len()).unwrap_or(0);
    match crate::writeback::write_back(client, guest_id, &plan.rootfs, limit) {
        Ok(w) if w.failed > 0 => log::warn!(
            "{} changes of the container's root written back into {}, {} could not be",
            w.changes,
            plan.rootfs.display(),
            w.failed
        ),
        Ok(w) => log::debug!("{} changes ({} bytes) of the container's root written back", w.changes, w.bytes),
        Err(e) => log::error!("cannot write the container's changes back into {}: {e}", plan.rootfs.display()),
    }
}

/// Makes the spec's `linux.cgroupsPath` on the host, with the host's share
/// of its limits, and moves this supervisor and the holder into it (before the VMM
/// starts, so that the VMM's jail cgroup is made under it); the
/// directories made are recorded in the state at once, for `delete`.
/// Whether the host applies `cpus` and `mems`.
fn join_host_cgroup(dir: &Path, state: &mut State, plan: &Plan) -> Result<bool> {
    let Some((v2, dirs)) = crate::host_cgroup::of_plan(plan)? else { return Ok(false) };
    let path = plan.cgroups_path.as_deref().unwrap_or_default();
    let mut made = Vec::new();
    // The container's pid (its holder) is in the cgroup too, as the pid
    // runc reports is: callers find the container's cgroup from it.
    let holder: Vec<u32> = state.oci.as_ref().and_then(|o| o.holder).filter(|h| h.alive()).map(|h| h.pid).into_iter().collect();
    let needs = crate::host_cgroup::VmNeeds::for_vm(plan.mem_mib, plan.cpus);
    let joined = crate::host_cgroup::create_and_join(&dirs, v2, &plan.resources, needs, &holder, &mut made);
    state.host_cgroups = made;
    state.save(dir).map_err(io("writing the state"))?;
    joined?;
    log::debug!("the VM's host cgroup: {path}");
    Ok(true)
}

/// The volume disk of the plan's large bind-mounted directories, all on
/// one disk (slot `slot`, after the root's), each in its own
/// subdirectory; and where the agent binds them. `None` without any.
fn volume_disk(plan: &Plan, path: PathBuf, staging: &Path, slot: usize) -> Result<Option<(PathBuf, Vec<DiskDir>)>> {
    if plan.volumes.is_empty() {
        return Ok(None);
    }
    // A host directory bound several times is copied once, and bound from
    // that copy each time (writes through one show through the others, as
    // on the host).
    let mut hosts: Vec<PathBuf> = Vec::new();
    for v in &plan.volumes {
        if !hosts.contains(&v.host) {
            hosts.push(v.host.clone());
        }
    }
    let names = vmrun_runtime::volume::disk_dir_names(&hosts);
    let named: Vec<(PathBuf, String)> = hosts.iter().cloned().zip(names.iter().cloned()).collect();
    vmrun_runtime::volume::make_dirs_image(&named, &path, staging)?;
    // The volume disks: the root's first, then this.
    let disk = vmrun_runtime::volume::guest_device(slot);
    let dirs = plan
        .volumes
        .iter()
        .map(|v| DiskDir {
            disk: disk.clone(),
            fstype: "ext4".into(),
            subdir: named.iter().find(|(h, _)| *h == v.host).map(|(_, n)| n.clone()).unwrap_or_default(),
            destination: v.guest.clone(),
            read_only: v.read_only,
        })
        .collect();
    Ok(Some((path, dirs)))
}

/// Sends the plan's copied mounts to the created container and starts
/// keeping them up to date (until the returned watcher is dropped).
fn send_copies(client: &vmrun_agent_client::Client, guest_id: &str, plan: &Plan) -> Result<Option<Watcher>> {
    if plan.copies.is_empty() {
        return Ok(None);
    }
    let sent = copies::send_all(client, guest_id, &plan.copies)?;
    log::debug!("{} copied mounts sent", plan.copies.len());
    Ok(Some(Watcher::start(client.clone(), guest_id.to_string(), plan.copies.clone(), sent)))
}

/// The hooks of `create`, once the container exists in its VM: `prestart`
/// and `createRuntime`, then `createContainer` (on the host too), with the
/// state (`creating`). One that fails fails the create.
fn run_create_hooks(plan: &Plan, state: &State) -> Result<()> {
    let json = state::oci_json(state);
    let h = &plan.hooks;
    crate::hooks::run("prestart", &h.prestart, &json)?;
    crate::hooks::run("createRuntime", &h.create_runtime, &json)?;
    crate::hooks::run("createContainer", &h.create_container, &json)?;
    Ok(())
}

/// Waits until `start` opens `exec.fifo` for reading, and tells it with a
/// byte (as runc's init does); or until a signal cancels: returns it. The
/// open blocks; a cancel wakes it by opening the FIFO for reading itself
/// (that reader stays open, so a cancel just before the open wakes it
/// too).
fn wait_for_start(dir: &Path, cancel: &Cancel) -> Result<Option<i32>> {
    let path = dir.join(state::FIFO);
    let wake = path.clone();
    cancel.on_cancel(move || {
        match std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(&wake) {
            // Kept open until the supervisor ends.
            Ok(reader) => std::mem::forget(reader),
            Err(e) => log::warn!("cannot wake the wait for start: {e}"),
        }
    });
    if let Some(sig) = cancel.cancelled() {
        return Ok(Some(sig));
    }
    let mut fifo = loop {
        match std::fs::OpenOptions::new().write(true).open(&path) {
            Ok(f) => break f,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io("opening exec.fifo")(e)),
        }
    };
    if let Some(sig) = cancel.cancelled() {
        return Ok(Some(sig));
    }
    fifo.write_all(b"0").map(|()| None).map_err(io("writing exec.fifo"))
}

fn exec_record_path(dir: &Path, exec_id: &str) -> PathBuf {
    dir.join(state::EXECS).join(format!("{exec_id}.json"))
}

/// The plan file of an exec'd process.
pub fn exec_plan_path(dir: &Path, exec_id: &str) -> PathBuf {
    dir.join(state::EXECS).join(format!("{exec_id}.plan.json"))
}

/// Writes an exec record.
pub fn save_exec(dir: &Path, rec: &ExecRecord) -> std::io::Result<()> {
    state::write_atomic(&exec_record_path(dir, &rec.exec_id), &serde_json::to_vec(rec).map_err(std::io::Error::other)?)
}

/// Reads an exec record.
pub fn load_exec(dir: &Path, exec_id: &str) -> Option<ExecRecord> {
    serde_json::from_slice(&std::fs::read(exec_record_path(dir, exec_id)).ok()?).ok()
}

/// `vmrun-oci exec-supervise ID EXEC_ID` (and `exec` in the foreground):
/// runs the exec'd process to its end; returns its exit code.
pub fn exec_supervise(root: &Root, id: &str, exec_id: &str) -> i32 {
    let relay = Relay::start(signals::FORWARDED, None);
    let dir = match root.find(id) {
        Ok((d, _)) => d,
        Err(e) => {
            log::error!("{e}");
            return FAILED;
        }
    };
    let mut rec = ExecRecord { exec_id: exec_id.into(), supervisor: ProcessRef::current(), status: ExecStatus::Starting, exit_code: None, error: None };
    let _ = save_exec(&dir, &rec);
    let result = run_exec(root, id, &dir, &mut rec, &relay);
    relay.stop_forwarding();
    let code = match &result {
        Ok(c) => *c,
        Err(e) => {
            log::error!("exec in container {id}: {e}");
            failure_code(e)
        }
    };
    if rec.status != ExecStatus::Failed {
        rec.status = ExecStatus::Exited;
    }
    rec.exit_code = Some(code);
    if let Err(e) = &result {
        rec.error = Some(e.to_string());
    }
    let _ = save_exec(&dir, &rec);
    code
}

fn run_exec(root: &Root, id: &str, dir: &Path, rec: &mut ExecRecord, relay: &Relay) -> Result<i32> {
    let fail = |rec: &mut ExecRecord, e: Error| {
        rec.status = ExecStatus::Failed;
        e
    };
    let ep: ExecPlan = serde_json::from_slice(&std::fs::read(exec_plan_path(dir, &rec.exec_id)).map_err(io("reading the exec plan"))?)
        .map_err(|e| Error::Bundle(format!("exec plan: {e}")))?;
    let (_, st) = root.find(id)?;
    if st.effective_status() != Status::Running {
        return Err(fail(rec, Error::State(format!("cannot exec in container {id}: it is not running"))));
    }
    let tty = match (&ep.console_socket, ep.process.terminal) {
        (Some(socket), true) => Some(terminal(socket).map_err(|e| fail(rec, e))?),
        _ => None,
    };
    let client = vmrun_runtime::sandbox::reach(&st, dir, Options::default()).map_err(|e| fail(rec, e.into()))?;
    let p = ExecProcess {
        args: ep.process.args.clone(),
        env: ep.process.env.clone(),
        working_dir: Some(ep.process.cwd.clone()),
        user: Some(ep.process.user.clone()),
        mounts: Vec::new(),
        capabilities: Some(ep.process.capabilities.clone()),
        no_new_privileges: Some(ep.process.no_new_privileges),
        // The container's (`linux.seccomp` is not the process's).
        seccomp: None,
        additional_gids: Some(ep.process.additional_gids.clone()),
        oom_score_adj: ep.process.oom_score_adj,
    };
    let mut process =
        client.exec(&st.guest_id, &rec.exec_id, &p, stdio_mode(tty.as_ref(), ep.process.terminal)).map_err(|e| fail(rec, e.into()))?;
    relay.forward_to(Target {
        client: client.clone(),
        id: st.guest_id.clone(),
        exec_id: Some(rec.exec_id.clone()),
        terminal: tty.as_ref().map(AsRawFd::as_raw_fd),
    });
    rec.status = ExecStatus::Running;
    let _ = save_exec(dir, rec);
    let code = pump(&mut process, tty)?;
    client.close();
    Ok(code)
}
