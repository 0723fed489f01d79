//! A container's VM: a child `vmrun-vmm` process, given its typed
//! configuration (`vmrun-vmm-api`: a boot with the agent initramfs, the
//! image's layer disk and a vsock device, or a restore of a template) in a
//! JSON file, and the conversation with the agent in it.
//!
//! The host waits for its VMM on events, not by polling: the VMM writes a
//! byte on a pipe (`--ready-fd`) once its sockets listen, and its exit is a
//! pidfd becoming readable.

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vmrun_agent_client::{Client, Options};
use vmrun_vmm_api::config::{
    ConsoleOutput, DiskConfig, HostCompatMode, NetConfig, RestoreConfig, RestoreDisk, RestoreNet, SeccompMode, VmConfig,
    VmmConfig, VsockConfig, DEFAULT_CONSOLE_LIMIT,
};

use crate::artifacts::Artifacts;
use crate::container::ProcessRef;
use crate::watch::{pidfd_open, poll_readable};
use crate::{Error, Result};

/// The vsock port the agent listens on (`vmrun.port=`).
pub use vmrun_agent_protocol::AGENT_PORT;
/// The guest's vsock context id (each VM has its own vsock device, so one
/// number serves all).
pub const GUEST_CID: u64 = 3;

/// What the VM is made of.
#[derive(Debug, Clone)]
pub struct VmSpec {
    pub artifacts: Artifacts,
    /// Guest memory in MiB.
    pub mem_mib: u32,
    pub cpus: u8,
    /// The layer disk: the guest's `/dev/vda`, read-only.
    pub layer_disk: PathBuf,
    /// Disk images for the volume slots (`/dev/vdb`...), at most
    /// `volume_slots`; the other slots are empty.
    pub volumes: Vec<PathBuf>,
    /// How many volume slots the VM has ([`crate::volume::SLOTS`], or
    /// [`crate::volume::POD_SLOTS`] for a pod's).
    pub volume_slots: usize,
    /// The volume slots (indexes into `volumes`) opened read-only: the
    /// guest's writes to them fail (an image several VMs share).
    pub read_only_volumes: Vec<usize>,
    /// The host's TAP device: the VM gets a network interface on it.
    pub tap: Option<String>,
    /// The network namespace the VMM runs in (and finds `tap` in): a
    /// pod's ([`crate::net::pod`]); none: the caller's.
    pub netns: Option<PathBuf>,
    /// The VM's directory ([`Layout`]).
    pub dir: PathBuf,
    /// The `vmrun-vmm` executable that runs the VMM ([`find_vmm`]).
    pub vmm_exe: PathBuf,
    /// The memory the guest kernel initialises at boot, in MiB
    /// (`deferred_init_boot_mb=`): the rest is initialised when its
    /// allocations need it. `None`: the kernel's own, 128 MiB (templates:
    /// each restored run would otherwise grow its memory again).
    pub boot_memory_mib: Option<u32>,
}

/// What a cold boot initialises of its memory ([`VmSpec::boot_memory_mib`]):
/// the guest grows it when the run needs more, at the same cost as at boot
/// (it grows to the next 128 MiB boundary and by at least 128 MiB), so a
/// run that needs little saves the rest (where guest kernel mode is
/// emulated, 32 MiB instead of 128 MiB is about 1.7M instructions fewer).
pub const COLD_BOOT_MEMORY_MIB: u32 = 32;

/// The VMM's executable.
pub const VMM_NAME: &str = "vmrun-vmm";
/// Names the VMM's executable when it is not beside the running one.
pub const VMM_ENV: &str = "VMRUN_VMM";

/// The `vmrun-vmm` executable: beside the running executable (an installed
/// or built vmrun, vmrun-oci), else `$VMRUN_VMM`, else on `PATH`.
pub fn find_vmm() -> Result<PathBuf> {
    let exe = std::env::current_exe().ok();
    if let Some(p) = exe.as_ref().map(|e| e.with_file_name(VMM_NAME)).filter(|p| p.is_file()) {
        return Ok(p);
    }
    if let Some(p) = std::env::var_os(VMM_ENV).map(PathBuf::from).filter(|p| p.is_file()) {
        return Ok(p);
    }
    let on_path = std::env::var_os("PATH")
        .and_then(|path| std::env::split_paths(&path).map(|d| d.join(VMM_NAME)).find(|p| p.is_file()));
    on_path.ok_or_else(|| Error::VmmNotFound {
        beside: exe.and_then(|e| e.parent().map(|d| d.display().to_string())).unwrap_or_else(|| "vmrun".into()),
    })
}

/// A sandbox's directory on disk, named in one place for every front end:
///
/// ```text
/// <dir>/vmm.json         the VMM's configuration (read before the jail)
/// <dir>/vmm.log          the VMM's messages
/// <dir>/vm/              all the jailed VMM may write:
///     vsock.sock         the hybrid vsock socket (the agent's port)
///     control.sock       the VMM's control socket
///     console.log        the guest's console
///     volume-N.disk      the disk of volume slot N (a copy the guest writes)
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    dir: PathBuf,
}

impl Layout {
    /// The layout of the sandbox directory `dir`.
    pub fn of(dir: &Path) -> Self {
        Self { dir: dir.to_path_buf() }
    }

    /// The sandbox's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// What the VMM may write: all that a jailed VMM sees writable.
    pub fn vm_dir(&self) -> PathBuf {
        self.dir.join("vm")
    }

    /// The hybrid vsock socket: where the host reaches the agent.
    pub fn vsock(&self) -> PathBuf {
        self.vm_dir().join("vsock.sock")
    }

    /// The VMM's control socket.
    pub fn control(&self) -> PathBuf {
        self.vm_dir().join("control.sock")
    }

    /// The guest's console log.
    pub fn console(&self) -> PathBuf {
        self.vm_dir().join("console.log")
    }

    /// The disk of volume slot `slot`.
    pub fn volume_disk(&self, slot: usize) -> PathBuf {
        self.vm_dir().join(format!("volume-{slot}.disk"))
    }

    /// The VMM's configuration: beside the VM's directory, not in it (read
    /// before the jail is entered, out of the VMM's reach afterwards).
    pub fn config(&self) -> PathBuf {
        self.dir.join(CONFIG_FILE)
    }

    /// The VMM's own messages (its standard error).
    pub fn vmm_log(&self) -> PathBuf {
        self.dir.join("vmm.log")
    }
}

/// The longest one attempt to reach the agent waits for its answer: while
/// a guest boots, a connection waits for a vsock driver that is not there
/// yet.
const CONNECT_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);
/// The pause after the guest refused a connection (its agent does not
/// listen yet) before the next attempt.
const CONNECT_RETRY_PAUSE: Duration = Duration::from_millis(200);

/// A running VMM process; killed if dropped while it runs.
#[derive(Debug)]
pub struct VmProcess {
    child: Child,
    /// Readable when the VMM has ended (`None` on kernels without pidfds,
    /// before 5.3: then its end is polled for).
    pidfd: Option<OwnedFd>,
    /// The read end of the VMM's readiness pipe, until it said ready.
    ready: Option<File>,
    /// How many connections the last [`VmProcess::connect_agent`] tried.
    connect_attempts: u32,
    /// Where its files are: sockets, console, its log, and what the VMM
    /// may write (snapshots it takes go there first).
    layout: Layout,
    /// A shared lock on the template it was restored from (and on its
    /// layer disk), held until its agent answers (by then the VMM has read
    /// the snapshot), so that nothing removes them meanwhile.
    in_use: Vec<crate::lock::Lock>,
    /// Its configuration names a guest profile ([`guest_profile`]), which
    /// the VMM writes when it ends: it is asked to stop rather than killed.
    profiled: bool,
    /// It runs in a jail, whose outer process is `child`: killed through
    /// it ([`VmProcess::kill_and_wait`]).
    jailed: bool,
    /// The host CPU spent when the VMM said it was ready, its vCPUs about
    /// to run (measured only with debug logging, for `vmrun run`'s phases).
    ready_cpu: Option<crate::cpu::HostCpu>,
}

/// How long a jailed VMM's outer process may take to kill it and remove
/// its jail ([`VmProcess::kill_and_wait`]) before it is killed itself.
pub(crate) const JAIL_KILL_TIMEOUT: Duration = Duration::from_secs(2);

/// How long [`collect_jail`] waits for a killed jail's VMM to finish dying
/// (freeing its memory) and leave its cgroups.
pub const JAIL_COLLECT_TIMEOUT: Duration = Duration::from_secs(30);

/// Removes what the jail of the VMM whose outer process was `pid` left
/// (cgroups, root directory, record) once that process is gone; the outer
/// process does it itself, unless it was killed with SIGKILL. Then the
/// jailed VMM may still be dying in its cgroups: this waits for it on
/// pidfds, up to [`JAIL_COLLECT_TIMEOUT`]. Nothing to do if the jail's
/// outer process lives, or left nothing.
pub fn collect_jail(pid: u32) {
    let start = Instant::now();
    let deadline = start + JAIL_COLLECT_TIMEOUT;
    loop {
        match vmrun_jail::collect_record(pid) {
            Ok(removed) => {
                if !removed.is_empty() {
                    log::debug!("the jail of VMM {pid} collected after {} ms", start.elapsed().as_millis());
                }
                return;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                let dying: Vec<ProcessRef> = vmrun_jail::jailed_processes(pid).into_iter().filter_map(ProcessRef::of).collect();
                if dying.is_empty() {
                    // Gone from the list, not yet from the cgroup.
                    std::thread::sleep(Duration::from_millis(10));
                } else {
                    crate::watch::wait_gone(&dying, deadline);
                }
            }
            Err(e) => {
                log::warn!("what the jail of VMM {pid} made is left ({e}): `vmrun system prune` removes it once its processes are gone");
                return;
            }
        }
    }
}

/// The VMM's configuration, in the directory of the VM (beside its log).
pub const CONFIG_FILE: &str = "vmm.json";

/// What an empty volume slot holds: a disk of no sectors, so a guest can
/// neither read nor write anything through it.
pub const EMPTY_DISK: &str = "/dev/null";

/// Whether VMMs are jailed (`vmrun-jail`): as root, unless `VMRUN_JAIL=off`
/// (for debugging).
pub fn jail_wanted() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    root && std::env::var("VMRUN_JAIL").map_or(true, |v| v != "off")
}

/// Where a VM's guest profile goes (`vmm/vmm/src/profile.rs`): with
/// `VMRUN_GUEST_PROFILE=DIR` (for development), `DIR/NAME-START.json`,
/// NAME the sandbox directory's name and START `boot` or `restore`. A
/// jailed VMM runs as a uid of its own: DIR must be writable to it.
fn guest_profile(dir: &Path, start: &str) -> Option<PathBuf> {
    let out = PathBuf::from(std::env::var_os("VMRUN_GUEST_PROFILE")?);
    let name = dir.file_name().map_or_else(|| "vm".into(), |n| n.to_string_lossy().into_owned());
    Some(out.join(format!("{name}-{start}.json")))
}

/// RCU's CPU stall warnings off: a guest restored from a snapshot, or
/// paused, finds its clock far ahead, and when a grace period was under
/// way at the snapshot every restore would report a stall, formatting
/// stack dumps to the console (about half a million emulated instructions
/// on each warm run where guest kernel mode is emulated).
const NO_STALL_WARNINGS: &str = "rcupdate.rcu_cpu_stall_suppress=1";

/// No kernel thread feeding virtio-rng's bytes into the random pool: it
/// woke every minute (and at most restores, the template's age having
/// put its timer in the past) for a request to the VMM and a hash. The
/// generator is seeded at boot from the VMM's `setup_data` seed and
/// reseeded from the host's entropy at every agent connection; the
/// device stays for whoever reads `/dev/hwrng`. (Linux 6.1 applied the
/// parameter only to drivers without a quality of their own, which
/// virtio-rng is not; `kernel-config/patches/0012` makes it a maximum.)
const NO_HWRNG_FEED: &str = "rng_core.default_quality=0";

impl VmSpec {
    /// The layout of the VM's directory ([`Layout::vm_dir`] is all a jailed
    /// VMM sees writable; the container's state stays out of its reach, one
    /// level up).
    pub fn layout(&self) -> Layout {
        Layout::of(&self.dir)
    }

    /// The disks of the volume slots, the empty ones included.
    pub fn volume_slots(&self) -> Vec<PathBuf> {
        (0..self.volume_slots.max(self.volumes.len())).map(|i| self.volumes.get(i).cloned().unwrap_or_else(|| PathBuf::from(EMPTY_DISK))).collect()
    }

    /// The guest's kernel command line: quiet, without stall warnings
    /// ([`NO_STALL_WARNINGS`]) nor the hardware generator's feeding
    /// thread ([`NO_HWRNG_FEED`]), the agent's port, and the memory to
    /// initialise at boot if the spec says. (The guest kernel
    /// makes neither `/sys/kernel/slab` nor `/sys/module`:
    /// `kernel-config/vmrun.config`.)
    pub fn cmdline(&self) -> String {
        let boot_memory = self.boot_memory_mib.map(|m| format!(" deferred_init_boot_mb={m}")).unwrap_or_default();
        format!("{} quiet {NO_STALL_WARNINGS} {NO_HWRNG_FEED} vmrun.port={AGENT_PORT}{boot_memory}", vmrun_vmm_api::DEFAULT_CMDLINE)
    }

    /// Starts the VMM: a cold boot.
    pub fn boot(&self) -> Result<VmProcess> {
        VmProcess::spawn(self, |layout| {
            let mut disks = vec![DiskConfig {
                path: self.layer_disk.clone(),
                read_only: true,
                id: Some("layers".into()),
                limit: Default::default(),
            }];
            for (i, v) in self.volume_slots().into_iter().enumerate() {
                let read_only = self.read_only_volumes.contains(&i);
                disks.push(DiskConfig { id: Some(format!("vol{i}")), read_only, ..DiskConfig::new(v) });
            }
            VmmConfig::boot(VmConfig {
                kernel: self.artifacts.kernel_for(self.cpus).to_path_buf(),
                initrd: Some(self.artifacts.agent_initrd.clone()),
                cmdline: self.cmdline(),
                mem_mib: self.mem_mib,
                vcpus: self.cpus,
                options: vmrun_vmm_api::ProcessOptions {
                    console: ConsoleOutput::File(layout.console()),
                    console_limit: Some(DEFAULT_CONSOLE_LIMIT),
                    console_input: false,
                    host_compat: HostCompatMode::Auto,
                    report: None,
                    control: Some(layout.control()),
                    seccomp: SeccompMode::On,
                    jail: jail_wanted(),
                    profile: guest_profile(&self.dir, "boot"),
                },
                disks,
                rng: true,
                nets: self.tap.iter().map(NetConfig::new).collect(),
                vsock: Some(VsockConfig { cid: GUEST_CID, uds: layout.vsock() }),
            })
        })
    }
}

impl VmProcess {
    /// Starts a VM for `spec` from a template snapshot (see
    /// [`crate::template`]): the layer disk goes into the template's disk
    /// slot.
    pub fn restore(template: &Path, spec: &VmSpec) -> Result<Self> {
        Self::spawn(spec, |layout| {
            let volumes = spec
                .volume_slots()
                .into_iter()
                .enumerate()
                .map(|(i, v)| RestoreDisk { read_only: spec.read_only_volumes.contains(&i), ..RestoreDisk::new(v) });
            let disks = std::iter::once(RestoreDisk::new(&spec.layer_disk)).chain(volumes).collect();
            VmmConfig::restore(RestoreConfig {
                disks,
                nets: spec.tap.iter().map(RestoreNet::new).collect(),
                vsock_uds: Some(layout.vsock()),
                options: vmrun_vmm_api::ProcessOptions {
                    console: ConsoleOutput::File(layout.console()),
                    console_input: false,
                    control: Some(layout.control()),
                    jail: jail_wanted(),
                    profile: guest_profile(&spec.dir, "restore"),
                    ..Default::default()
                },
                ..RestoreConfig::new(template)
            })
        })
    }

    /// Runs `vmrun-vmm` with the configuration `config` makes (the VM's
    /// control socket and console in its directory), written to
    /// `vmm.json` in the VM's directory; its log goes to `vmm.log`.
    fn spawn(spec: &VmSpec, config: impl FnOnce(&Layout) -> VmmConfig) -> Result<Self> {
        let layout = spec.layout();
        std::fs::create_dir_all(layout.vm_dir())?;
        let config_path = layout.config();
        let config = config(&layout);
    std::fs::write(&config_path, config.to_json()?)?;
        let log = std::fs::File::create(layout.vmm_log())?;
        let mut cmd = Command::new(&spec.vmm_exe);
        cmd.arg("--config").arg(&config_path);
        // SAFETY: prctl is async-signal-safe. The VMM dies with the process
        // that started it (a `vmrun run` or supervisor killed with SIGKILL
        // leaves no VM behind).
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            })
        };
        no_inherited_fds(&mut cmd);
        if let Some(path) = &spec.netns {
            let ns = File::open(path).map_err(|e| Error::Network(format!("cannot open the network namespace {}: {e}", path.display())))?;
            // SAFETY: setns is async-signal-safe; it moves the child alone
            // into the namespace `ns` (open in the parent, copied into the
            // child, closed at its exec) before it execs the VMM.
            unsafe {
                std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
                    if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                })
            };
        }
        // The readiness pipe's write end goes to the VMM, and only there.
        let (ready_r, ready_w) = pipe()?;
        let ready_fd = ready_w.as_raw_fd();
        // SAFETY: fcntl is async-signal-safe; it clears close-on-exec on
        // this one descriptor of the child's (after `no_inherited_fds` set
        // it on all).
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
                if libc::fcntl(ready_fd, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            })
        };
        let child = cmd
            .arg("--ready-fd")
            .arg(ready_fd.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(Error::Spawn)?;
        drop(ready_w);
        let pidfd = pidfd_open(child.id())
            .map_err(|e| log::debug!("no pidfd for the VMM ({e}): its end is polled for"))
            .ok();
        Ok(VmProcess {
            child,
            pidfd,
            ready: Some(File::from(ready_r)),
            connect_attempts: 0,
            profiled: config.options().profile.is_some(),
            jailed: config.options().jail,
            ready_cpu: None,
            layout,
            in_use: Vec::new(),
        })
    }

    /// Waits until the agent answers (the guest boots meanwhile), up to
    /// `timeout`.
    ///
    /// First the VMM says its sockets listen (its readiness pipe). Then
    /// each attempt connects and waits for the agent's hello: after a
    /// restore the first one is answered (the VMM holds it until the guest
    /// has taken the vsock transport reset); while a guest boots, an
    /// attempt waits for the vsock driver, or the guest refuses it until
    /// the agent listens, and the next one follows
    /// [`CONNECT_RETRY_PAUSE`] later (at once if the VMM ends).
    pub fn connect_agent(&mut self, timeout: Duration, opts: Options) -> Result<Client> {
        let deadline = Instant::now() + timeout;
        let timed_out = |vm: &Self| Error::AgentTimeout { secs: timeout.as_secs(), console: vm.layout.console() };
        self.connect_attempts = 0;
        if !self.wait_ready(deadline)? {
            return Err(timed_out(self));
        }
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Err(Error::VmEnded { status: status.to_string(), reason: self.why_it_ended() });
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(timed_out(self));
            }
            self.connect_attempts += 1;
            let attempt = Options { handshake_timeout: CONNECT_ATTEMPT_TIMEOUT.min(left), ..opts };
            match Client::connect_hybrid_vsock(self.layout.vsock(), AGENT_PORT, attempt) {
                Ok(c) => {
                    self.in_use.clear();
                    return Ok(c);
                }
                Err(e) => log::debug!("agent not there yet (attempt {}): {e}", self.connect_attempts),
            }
            self.wait_exit(Instant::now() + CONNECT_RETRY_PAUSE.min(left))?;
        }
    }

    /// How many connections the last [`VmProcess::connect_agent`] tried
    /// (1: the first one was answered).
    pub fn connect_attempts(&self) -> u32 {
        self.connect_attempts
    }

    /// Waits for the VMM's readiness byte, up to `deadline`: whether it
    /// came (once it did, at once). The VMM ending first is an error.
    fn wait_ready(&mut self, deadline: Instant) -> Result<bool> {
        let Some(r) = self.ready.as_mut() else { return Ok(true) };
        if !poll_readable(r.as_raw_fd(), deadline)? {
            return Ok(false);
        }
        let mut b = [0u8; 1];
        let n = loop {
            match r.read(&mut b) {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                other => break other?,
            }
        };
        if n == 1 {
            self.ready = None;
            if log::log_enabled!(log::Level::Debug) {
                self.ready_cpu = Some(crate::cpu::HostCpu::now(self.child.id()));
            }
            return Ok(true);
        }
        // End of file: the VMM closed it by ending.
        let status = self.child.wait()?;
        Err(Error::VmEnded { status: status.to_string(), reason: self.why_it_ended() })
    }

    /// Waits for the VMM to end, up to `deadline`: whether it did.
    fn wait_exit(&mut self, deadline: Instant) -> Result<bool> {
        loop {
            if self.child.try_wait()?.is_some() {
                return Ok(true);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(false);
            }
            match &self.pidfd {
                Some(fd) => {
                    poll_readable(fd.as_raw_fd(), deadline)?;
                }
                None => std::thread::sleep(left.min(Duration::from_millis(20))),
            }
        }
    }

    /// Waits up to `timeout` for the VMM to say it is ready (its sockets
    /// listen, the guest about to run) without reaching the agent: whether
    /// it did. The VMM ending first is an error.
    pub fn wait_until_ready(&mut self, timeout: Duration) -> Result<bool> {
        self.wait_ready(Instant::now() + timeout)
    }

    /// Whether the VMM has ended (reaped if it has).
    pub fn has_ended(&mut self) -> bool {
        !matches!(self.child.try_wait(), Ok(None))
    }

    /// A descriptor readable once the VMM has ended (`None` without
    /// pidfds).
    pub fn pidfd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        self.pidfd.as_ref().map(std::os::fd::AsFd::as_fd)
    }

    /// Whether it runs in a jail (whose outer process is the child): see
    /// [`VmProcess::kill_and_wait`].
    pub fn jailed(&self) -> bool {
        self.jailed
    }

    /// Holds `lock` until the agent answers.
    pub fn hold_until_ready(&mut self, lock: crate::lock::Lock) {
        self.in_use.push(lock);
    }

    /// Where its files are (sockets, console, log).
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The VMM's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The host CPU spent until the VMM was ready to run the guest
    /// (measured with debug logging only).
    pub fn ready_cpu(&self) -> Option<crate::cpu::HostCpu> {
        self.ready_cpu
    }

    /// Waits for the VMM to end, up to `timeout`; kills it after that.
    pub fn wait(&mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        if !self.wait_exit(Instant::now() + timeout)? {
            self.kill_and_wait();
        }
        let s = self.child.wait()?;
        collect_jail(self.child.id());
        Ok(s)
    }

    /// Kills the VMM and waits for it. A jailed one is killed by its
    /// jail's outer process ([`vmrun_jail::kill_signal`]), which ends once
    /// the VMM has and its cgroups are removed: waited for by the pidfd,
    /// not polled. With SIGKILL when it is not jailed, or when the outer
    /// process has not ended within [`JAIL_KILL_TIMEOUT`].
    fn kill_and_wait(&mut self) {
        if self.jailed {
            // SAFETY: kill of our own child, not yet reaped (its pid is
            // not anyone else's).
            unsafe { libc::kill(self.child.id() as libc::pid_t, vmrun_jail::kill_signal()) };
            if matches!(self.wait_exit(Instant::now() + JAIL_KILL_TIMEOUT), Ok(true)) {
                return;
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Why the VMM ended, for an error message that outlives its files (a
    /// template build's are removed): its own last error lines, else the
    /// guest console's last lines, else the VMM's last words.
    fn why_it_ended(&self) -> String {
        let last_lines = |text: &str, n: usize| {
            let lines: Vec<&str> = text.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
            lines[lines.len().saturating_sub(n)..].join("; ")
        };
        let log = std::fs::read_to_string(self.layout.vmm_log()).unwrap_or_default();
        let errors: String = log
            .lines()
            .filter(|l| l.contains("error") || l.contains("ERROR"))
            .map(|l| l.trim_start_matches("vmrun-vmm: error: ").trim_start_matches("vmrun: error: "))
            .collect::<Vec<_>>()
            .join("\n");
        if !errors.is_empty() {
            return last_lines(&errors, 3);
        }
        let console = self.console_tail(4096);
        if !console.trim().is_empty() {
            return format!("the guest console ends with: {}", last_lines(&console, 5));
        }
        if !log.trim().is_empty() {
            return last_lines(&log, 3);
        }
        "the VMM printed nothing and the guest wrote nothing to its console".into()
    }

    /// The console log so far (for error messages).
    pub fn console_tail(&self, max: usize) -> String {
        let s = std::fs::read_to_string(self.layout.console()).unwrap_or_default();
        let start = s.len().saturating_sub(max);
        s.get(start..).unwrap_or_default().to_string()
    }
}

impl Drop for VmProcess {
    fn drop(&mut self) {
        if self.profiled && matches!(self.child.try_wait(), Ok(None)) {
            let stop = vmrun_vmm_api::request(&self.layout.control(), &vmrun_vmm_api::Request::Stop, Duration::from_secs(10));
            if stop.is_ok() {
                let _ = self.wait_exit(Instant::now() + Duration::from_secs(10));
            }
        }
        if let Ok(None) = self.child.try_wait() {
            self.kill_and_wait();
        }
        collect_jail(self.child.id());
    }
}

/// Makes every descriptor above standard error close when `cmd` execs: a
/// caller's open files (`9</etc/shadow`) do not reach the VMM or a
/// supervisor that vmrun starts.
pub fn no_inherited_fds(cmd: &mut Command) {
    // SAFETY: close_range is a system call (async-signal-safe); it only
    // sets close-on-exec flags in the child's descriptor table. Kernels
    // before 5.11 lack the flag: there the jail closes them itself.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(cmd, || {
            libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, libc::CLOSE_RANGE_CLOEXEC);
            Ok(())
        })
    };
}

/// A pipe: (read end, write end), both close-on-exec.
pub(crate) fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: pipe2 fills the two descriptors on success.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both are new descriptors that nothing else owns.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Removes a VM directory (sockets, console) once the VM is gone.
pub fn remove_dir(dir: &Path) {
    if let Err(e) = std::fs::remove_dir_all(dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            log::warn!("cannot remove {}: {e}", dir.display());
        }
    }
}
