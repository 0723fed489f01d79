//! A container's VM: a child `vmrun boot` process with the agent initramfs,
//! the image's layer disk and a vsock device, and the conversation with the
//! agent in it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vmrun_agent_client::{Client, Options};

use crate::artifacts::Artifacts;
use crate::{Error, Result};

/// The vsock port the agent listens on (`vmrun.port=`).
pub const AGENT_PORT: u32 = 1024;
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
    /// [`crate::volume::SLOTS`]; the other slots are empty.
    pub volumes: Vec<PathBuf>,
    /// The host's TAP device: the VM gets a network interface on it.
    pub tap: Option<String>,
    /// The VM's directory: its log, and [`VmSpec::vm_dir`].
    pub dir: PathBuf,
    /// The `vmrun` executable that runs the VMM.
    pub vmm_exe: PathBuf,
}

/// Where a VM's sockets and console are.
struct VmPaths {
    vsock: PathBuf,
    control: PathBuf,
    console: PathBuf,
}

/// A running VMM process; killed if dropped while it runs.
#[derive(Debug)]
pub struct VmProcess {
    child: Child,
    /// The VMM's own messages (its standard error).
    log: PathBuf,
    pub vsock: PathBuf,
    pub control: PathBuf,
    pub console: PathBuf,
    /// What the VMM may write; snapshots it takes go there first.
    pub vm_dir: PathBuf,
    /// A shared lock on the template it was restored from (and on its
    /// layer disk), held until its agent answers (by then the VMM has read
    /// the snapshot), so that nothing removes them meanwhile.
    in_use: Vec<crate::lock::Lock>,
}

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

impl VmSpec {
    /// The directory the VMM may write (sockets, console, the snapshots it
    /// takes, volume disks): all that a jailed VMM sees writable. The
    /// container's state stays out of its reach, one level up.
    pub fn vm_dir(&self) -> PathBuf {
        self.dir.join("vm")
    }

    /// The disks of the volume slots, the empty ones included.
    pub fn volume_slots(&self) -> Vec<PathBuf> {
        (0..crate::volume::SLOTS).map(|i| self.volumes.get(i).cloned().unwrap_or_else(|| PathBuf::from(EMPTY_DISK))).collect()
    }

    /// The guest's kernel command line.
    pub fn cmdline(&self) -> String {
        format!("console=ttyS0 reboot=k panic=1 quiet vmrun.port={AGENT_PORT}")
    }

    /// Starts the VMM.
    pub fn boot(&self) -> Result<VmProcess> {
        VmProcess::spawn(self, |cmd, paths| {
            cmd.arg("boot")
                .arg("--kernel")
                .arg(&self.artifacts.kernel)
                .arg("--initrd")
                .arg(&self.artifacts.agent_initrd)
                .arg("--cmdline")
                .arg(self.cmdline())
                .arg("--memory")
                .arg(self.mem_mib.to_string())
                .arg("--cpus")
                .arg(self.cpus.to_string())
                .arg("--disk")
                .arg(format!("{},ro,id=layers", self.layer_disk.display()));
            for (i, v) in self.volume_slots().iter().enumerate() {
                cmd.arg("--disk").arg(format!("{},id=vol{i}", v.display()));
            }
            if let Some(tap) = &self.tap {
                cmd.arg("--net").arg(format!("tap={tap}"));
            }
            cmd.arg("--vsock")
                .arg(format!("cid={GUEST_CID},uds={}", paths.vsock.display()));
        })
    }
}

impl VmProcess {
    /// Starts a VM for `spec` from a template snapshot (see
    /// [`crate::template`]): the layer disk goes into the template's disk
    /// slot.
    pub fn restore(template: &Path, spec: &VmSpec) -> Result<Self> {
        Self::spawn(spec, |cmd, paths| {
            cmd.arg("restore")
                .arg("--snapshot")
                .arg(template)
                .arg("--disk")
                .arg(&spec.layer_disk);
            for v in spec.volume_slots() {
                cmd.arg("--disk").arg(v);
            }
            if let Some(tap) = &spec.tap {
                cmd.arg("--tap").arg(tap);
            }
            cmd.arg("--vsock-uds").arg(&paths.vsock);
        })
    }

    /// Runs `vmrun` with the arguments `args` adds, plus the VM's control
    /// socket and console in its directory; its log goes to `vmm.log`.
    fn spawn(spec: &VmSpec, args: impl FnOnce(&mut Command, &VmPaths)) -> Result<Self> {
        let vm_dir = spec.vm_dir();
        std::fs::create_dir_all(&vm_dir)?;
        let paths = VmPaths {
            vsock: vm_dir.join("vsock.sock"),
            control: vm_dir.join("control.sock"),
            console: vm_dir.join("console.log"),
        };
        let log_path = spec.dir.join("vmm.log");
        let log = std::fs::File::create(&log_path)?;
        let mut cmd = Command::new(&spec.vmm_exe);
        args(&mut cmd, &paths);
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
        if jail_wanted() {
            cmd.args(["--jail", "on"]);
        }
        let child = cmd
            .arg("--control")
            .arg(&paths.control)
            .arg("--console")
            .arg(&paths.console)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(Error::Spawn)?;
        Ok(VmProcess { child, log: log_path, vsock: paths.vsock, control: paths.control, console: paths.console, vm_dir, in_use: Vec::new() })
    }

    /// Waits until the agent answers (the guest boots meanwhile), up to
    /// `timeout`.
    pub fn connect_agent(&mut self, timeout: Duration, opts: Options) -> Result<Client> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Err(Error::VmEnded { status: status.to_string(), reason: self.why_it_ended() });
            }
            if self.vsock.exists() {
                // A short handshake timeout: while the guest boots, the
                // connection waits for a driver that is not there yet.
                let quick = Options { handshake_timeout: Duration::from_secs(5), ..opts };
                match Client::connect_hybrid_vsock(&self.vsock, AGENT_PORT, quick) {
                    Ok(c) => {
                        self.in_use.clear();
                        return Ok(c);
                    }
                    Err(e) => log::debug!("agent not there yet: {e}"),
                }
            }
            if start.elapsed() > timeout {
                return Err(Error::AgentTimeout { secs: timeout.as_secs(), console: self.console.clone() });
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Holds `lock` until the agent answers.
    pub fn hold_until_ready(&mut self, lock: crate::lock::Lock) {
        self.in_use.push(lock);
    }

    /// The VMM's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the VMM to end, up to `timeout`; kills it after that.
    pub fn wait(&mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        let start = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait()? {
                vmrun_jail::clean_up(self.child.id());
                return Ok(s);
            }
            if start.elapsed() > timeout {
                let _ = self.child.kill();
                let s = self.child.wait()?;
                vmrun_jail::clean_up(self.child.id());
                return Ok(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Why the VMM ended, for an error message that outlives its files (a
    /// template build's are removed): its own last error lines, else the
    /// guest console's last lines, else the VMM's last words.
    fn why_it_ended(&self) -> String {
        let last_lines = |text: &str, n: usize| {
            let lines: Vec<&str> = text.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
            lines[lines.len().saturating_sub(n)..].join("; ")
        };
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let errors: String = log
            .lines()
            .filter(|l| l.contains("error") || l.contains("ERROR"))
            .map(|l| l.trim_start_matches("vmrun: error: "))
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
        let s = std::fs::read_to_string(&self.console).unwrap_or_default();
        let start = s.len().saturating_sub(max);
        s.get(start..).unwrap_or_default().to_string()
    }
}

impl Drop for VmProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        vmrun_jail::clean_up(self.child.id());
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

/// Removes a VM directory (sockets, console) once the VM is gone.
pub fn remove_dir(dir: &Path) {
    if let Err(e) = std::fs::remove_dir_all(dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            log::warn!("cannot remove {}: {e}", dir.display());
        }
    }
}
