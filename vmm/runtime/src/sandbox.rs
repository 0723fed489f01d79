//! One sandbox: a microVM and the agent in it, from its start (a cold boot,
//! or a restore of a template snapshot) to its end, and the containers and
//! processes in it. Every front end that owns a VM drives it through
//! [`Sandbox`]: `vmrun run` (in the foreground, and the supervisor of a
//! detached container) and `vmrun-oci`'s supervisor. A signal that comes
//! before the container's process runs cancels the start one way, through
//! [`Cancel`] (which [`crate::signal::Relay`] holds).
//!
//! ```text
//! Sandbox::base_template   the template for the VM's shape, built once
//! Sandbox::launch          boot or restore (the VMM runs)
//! Launched::connect        wait for the VMM's readiness and the agent's
//!                          hello (events, not polls)
//! create / start_process   a container from the layer disk or a root disk,
//!                          and its process
//! client / reach           more processes, signals, resizes (`reach`: from
//!                          another process, through the container's state)
//! save_prepared            snapshot the guest with the image unpacked
//! stop / kill              shut the guest down, or kill the VMM
//! ```

use std::path::Path;
use std::sync::atomic::{AtomicI32, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vmrun_agent_client::{Client, Options, Process, StdioMode};
use vmrun_agent_protocol::{CreateContainer, ExecProcess};

use crate::lock::Lock;
use crate::template;
use crate::vm::{VmProcess, VmSpec};
use crate::Result;

/// How long the VMM may take to answer a control request (stats, a disk
/// attached or detached).
const CONTROL_TIMEOUT: Duration = Duration::from_secs(5);

/// How a sandbox's VM starts.
#[derive(Debug, Clone, Copy)]
pub enum Origin<'a> {
    /// A cold boot of the kernel and the agent initramfs.
    Boot,
    /// A restore of the template snapshot in this directory.
    Template(&'a Path),
}

/// How long the agent may take to answer, and the agent connection's
/// timeouts.
#[derive(Debug, Clone, Copy)]
pub struct AgentWait {
    pub timeout: Duration,
    pub options: Options,
}

/// A VM whose VMM runs, its agent not reached yet. Dropping it kills the
/// VMM.
#[derive(Debug)]
pub struct Launched {
    vm: VmProcess,
    /// Restored from a template: its agent listens already.
    restored: bool,
}

impl Launched {
    /// The VMM's pid.
    pub fn pid(&self) -> u32 {
        self.vm.pid()
    }

    /// Waits until the agent answers: the VMM's readiness, then the
    /// agent's hello (events, not polls; see `VmProcess::connect_agent`).
    /// A restored VM's agent listens already: once its connection is
    /// accepted, the first request goes out behind the hello without
    /// waiting for the answer (`Options::defer_hello`), a round trip fewer.
    pub fn connect(mut self, wait: AgentWait) -> Result<Sandbox> {
        let options = Options { defer_hello: wait.options.defer_hello || self.restored, ..wait.options };
        let client = self.vm.connect_agent(wait.timeout, options)?;
        Ok(Sandbox { vm: Vm::Own(self.vm), client })
    }
}

/// A running VM with its agent connected. Dropping it kills the VMM.
#[derive(Debug)]
pub struct Sandbox {
    vm: Vm,
    client: Client,
}

/// A sandbox's VMM: started by this process, or claimed from a pool
/// (another process's child, handed over with a pidfd).
#[derive(Debug)]
enum Vm {
    Own(VmProcess),
    Pooled(crate::pool::Claimed),
}

impl Vm {
    fn pid(&self) -> u32 {
        match self {
            Vm::Own(vm) => vm.pid(),
            Vm::Pooled(c) => c.pid(),
        }
    }

    fn layout(&self) -> &crate::vm::Layout {
        match self {
            Vm::Own(vm) => vm.layout(),
            Vm::Pooled(c) => c.layout(),
        }
    }
}

impl Sandbox {
    /// The base template for `spec`'s shape under `templates`, built (a
    /// boot, then a snapshot) if it is missing. A cancel meanwhile kills
    /// the template's VMM: the build fails and cleans up after itself.
    pub fn base_template(templates: &Path, spec: &VmSpec, progress: &dyn Fn(&str), cancel: &Cancel) -> Result<std::path::PathBuf> {
        template::ensure(templates, spec, progress, &|pid| cancel.set_vmm(pid))
    }

    /// Starts the VM (its VMM runs; [`Launched::connect`] waits for the
    /// agent). `hold` (a lock on what the VMM reads while it starts, such
    /// as the layer disk) is kept until the agent answers. A cancel from
    /// now on kills the VMM, and the wait for the agent returns its end as
    /// an error.
    pub fn launch(spec: &VmSpec, origin: Origin<'_>, hold: Option<Lock>, cancel: &Cancel) -> Result<Launched> {
        let restored = matches!(origin, Origin::Template(_));
        let mut vm = match origin {
            Origin::Boot => spec.boot()?,
            Origin::Template(dir) => template::restore(dir, spec)?,
        };
        if let Some(lock) = hold {
            vm.hold_until_ready(lock);
        }
        cancel.set_vmm(Some(vm.pid()));
        Ok(Launched { vm, restored })
    }

    /// A VM of the pool in `pool` (see [`crate::pool`]), on the agent
    /// connection its keeper greeted; `None` when no pool serves there or
    /// it has no VM ready (or the connection fails: then the VM is ended):
    /// the caller restores one instead. A cancel from now on kills the
    /// VMM.
    pub fn claim(pool: &Path, options: Options, cancel: &Cancel) -> Option<Sandbox> {
        let (claimed, agent) = crate::pool::claim(pool)?;
        cancel.set_vmm(Some(claimed.pid()));
        match Client::established(agent, options) {
            Ok(client) => Some(Sandbox { vm: Vm::Pooled(claimed), client }),
            Err(e) => {
                log::warn!("the connection to a pooled VM's agent failed ({e}): restoring one instead");
                cancel.set_vmm(None);
                None
            }
        }
    }

    /// The network link of a VM from a pool (its keeper's to remove).
    pub fn pooled_link(&self) -> Option<&crate::net::Link> {
        match &self.vm {
            Vm::Pooled(c) => c.link(),
            Vm::Own(_) => None,
        }
    }

    /// The connection to the agent (for signals, resizes, waits).
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The VMM's pid.
    pub fn pid(&self) -> u32 {
        self.vm.pid()
    }

    /// Where the VM's files are: its console, its vsock socket (where
    /// other processes reach the agent), its control socket.
    pub fn layout(&self) -> &crate::vm::Layout {
        self.vm.layout()
    }

    /// The host CPU spent until its VMM was ready to run the guest: this
    /// process's and the VMM's (measured with debug logging only).
    pub fn ready_cpu(&self) -> Option<crate::cpu::HostCpu> {
        match &self.vm {
            Vm::Own(vm) => vm.ready_cpu(),
            Vm::Pooled(_) => None,
        }
    }

    /// What the VMM counts of its VM: guest instructions KVM emulated and
    /// exits per vCPU since the VM started (a restore starts from zero),
    /// and its resident memory.
    pub fn stats(&self) -> Result<vmrun_vmm_api::control::VmmStats> {
        let answer = vmrun_vmm_api::control::request(&self.vm.layout().control(), &vmrun_vmm_api::control::Request::Stats, CONTROL_TIMEOUT)?;
        answer.stats.ok_or_else(|| {
            crate::Error::Control(vmrun_vmm_api::ControlError::Refused("the VMM answered the stats request without stats".into()))
        })
    }

    /// Creates a container in the guest (its root unpacked from the layer
    /// disk, or mounted from a disk).
    pub fn create(&self, spec: &CreateContainer) -> Result<()> {
        Ok(self.client.create_container(spec)?)
    }

    /// Starts the process of container `id`, with start-time `overrides`
    /// of its configuration if given.
    pub fn start_process(&self, id: &str, mode: StdioMode, overrides: Option<&ExecProcess>) -> Result<Process> {
        Ok(self.client.start_with(id, mode, overrides)?)
    }

    /// Sets up a created container's process and holds it before its
    /// program (OCI `create`); [`Sandbox::release`] lets it run.
    pub fn prepare_process(&self, id: &str, mode: StdioMode) -> Result<Process> {
        Ok(self.client.prepare(id, mode)?)
    }

    /// Lets the process held by [`Sandbox::prepare_process`] run (OCI
    /// `start`); returns its guest pid.
    pub fn release(&self, id: &str) -> Result<u32> {
        Ok(self.client.release(id)?)
    }

    /// Lets a process held before this VM's snapshot run with `overrides`
    /// (see [`vmrun_agent_client::Client::release_with`]).
    pub fn release_with(&self, id: &str, overrides: Option<&ExecProcess>, mode: StdioMode) -> Result<Process> {
        Ok(self.client.release_with(id, overrides, mode)?)
    }

    /// Gives the guest its network interface's configuration.
    pub fn configure_network(&self, config: &vmrun_agent_protocol::NetworkConfig) -> Result<()> {
        Ok(self.client.configure_network(config)?)
    }

    /// Snapshots the guest into the prepared template `dir` and lets it run
    /// on (best effort: see [`template::save_prepared`]).
    pub fn save_prepared(&self, dir: &Path) {
        match &self.vm {
            Vm::Own(vm) => template::save_prepared(vm, dir),
            Vm::Pooled(_) => log::debug!("a pooled VM is not saved as a template"),
        }
    }

    /// Waits up to `timeout` for the VMM to end (after the guest lost its
    /// agent, or was shut down), killing it after that.
    pub fn wait_vmm(&mut self, timeout: Duration) {
        match &mut self.vm {
            Vm::Own(vm) => match vm.wait(timeout) {
                Ok(status) if !status.success() => log::warn!("the VMM ended with {status}"),
                Ok(_) => {}
                Err(e) => log::warn!("waiting for the VMM: {e}"),
            },
            // Its keeper reaps it.
            Vm::Pooled(c) => c.wait(timeout),
        }
    }

    /// Shuts the guest down (its file systems are synced) and waits for
    /// the VMM, killing it after 30 s.
    pub fn stop(mut self) {
        let _ = self.client.shutdown();
        self.wait_vmm(Duration::from_secs(30));
    }

    /// Ends the VM at once (a guest with nothing to save): the VMM is
    /// killed.
    pub fn kill(self) {
        self.client.close();
        drop(self.vm);
    }
}

/// Attaches the disk image `image` to the empty volume slot `slot` of the
/// running VM whose directory's layout is `layout` (the guest's
/// `/dev/vd{b+slot}`; its size changes from 0). The image is opened here
/// and its descriptor handed to the (jailed) VMM; with `read_only` the
/// VMM refuses the guest's writes to it.
pub fn attach_volume(layout: &crate::vm::Layout, slot: usize, image: &Path, read_only: bool) -> Result<()> {
    vmrun_vmm_api::control::attach_disk(&layout.control(), 1 + slot, image, read_only, CONTROL_TIMEOUT)?;
    Ok(())
}

/// Empties volume slot `slot` of the running VM of `layout` (the guest
/// should have unmounted its disk).
pub fn detach_volume(layout: &crate::vm::Layout, slot: usize) -> Result<()> {
    let req = vmrun_vmm_api::control::Request::DetachDisk { disk: 1 + slot };
    vmrun_vmm_api::control::request(&layout.control(), &req, CONTROL_TIMEOUT)?;
    Ok(())
}

/// A connection to the agent of a sandbox another process owns (for `exec`,
/// `kill`, `stop` and the like in a running container): the container's
/// state says where its VM's vsock socket is, its directory being `dir`.
pub fn reach(state: &crate::container::State, dir: &Path, options: Options) -> Result<Client> {
    reach_vm(&state.layout(dir), options)
}

/// A connection to the agent of the running VM whose directory's layout
/// is `layout`.
pub fn reach_vm(layout: &crate::vm::Layout, options: Options) -> Result<Client> {
    Ok(Client::connect_hybrid_vsock(layout.vsock(), crate::vm::AGENT_PORT, options)?)
}

/// The one way to cancel the start of a sandbox: a signal before the
/// container's process runs calls [`Cancel::cancel`], which kills the VMM
/// being started (so whatever waits on it returns) and wakes what waits on
/// a cancel ([`Cancel::on_cancel`]). Clones share their state.
#[derive(Clone, Default)]
pub struct Cancel(Arc<CancelState>);

type Waker = Box<dyn Fn() + Send>;

#[derive(Default)]
struct CancelState {
    signal: AtomicI32,
    vmm: AtomicU32,
    wakers: Mutex<Vec<Waker>>,
}

impl std::fmt::Debug for Cancel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cancel").field("signal", &self.cancelled()).field("vmm", &self.0.vmm.load(Ordering::SeqCst)).finish()
    }
}

impl Cancel {
    /// Cancels with signal `sig`: kills the VMM being started and runs the
    /// wakers. Returns whether there was anything to cancel (else the
    /// caller ends the process itself).
    pub fn cancel(&self, sig: i32) -> bool {
        self.0.signal.store(sig, Ordering::SeqCst);
        let mut any = false;
        let pid = self.0.vmm.load(Ordering::SeqCst);
        if pid != 0 {
            kill_vmm(pid);
            any = true;
        }
        if let Ok(wakers) = self.0.wakers.lock() {
            for w in wakers.iter() {
                w();
                any = true;
            }
        }
        any
    }

    /// The signal that cancelled, if one did.
    pub fn cancelled(&self) -> Option<i32> {
        Some(self.0.signal.load(Ordering::SeqCst)).filter(|s| *s != 0)
    }

    /// The VMM being started now (`None`: none): a cancel kills it, at
    /// once if the cancel came first.
    pub fn set_vmm(&self, pid: Option<u32>) {
        let pid = pid.unwrap_or(0);
        self.0.vmm.store(pid, Ordering::SeqCst);
        if pid != 0 && self.cancelled().is_some() {
            kill_vmm(pid);
        }
    }

    /// Runs `wake` on a cancel (at once if one came already), for a wait
    /// that a killed VMM does not end.
    pub fn on_cancel(&self, wake: impl Fn() + Send + 'static) {
        if self.cancelled().is_some() {
            wake();
        }
        if let Ok(mut w) = self.0.wakers.lock() {
            w.push(Box::new(wake));
        }
    }
}

fn kill_vmm(pid: u32) {
    // SAFETY: kill of our own child, the VMM (not yet reaped: its owner
    // reaps it only after clearing it or once the start failed), or of a
    // pooled VM's, which its keeper reaps only once our lease on it ended.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_cancel_kills_the_vmm_and_wakes_the_waits() {
        let c = Cancel::default();
        assert_eq!(c.cancelled(), None);
        let mut child = std::process::Command::new("sleep").arg("60").spawn().unwrap();
        c.set_vmm(Some(child.id()));
        let woken = Arc::new(AtomicU32::new(0));
        let w = Arc::clone(&woken);
        c.on_cancel(move || {
            w.fetch_add(1, Ordering::SeqCst);
        });
        assert!(c.cancel(libc::SIGTERM));
        assert_eq!(c.cancelled(), Some(libc::SIGTERM));
        assert_eq!(woken.load(Ordering::SeqCst), 1);
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(child.wait().unwrap().signal(), Some(libc::SIGKILL));
        // A wait registered after the cancel is woken at once.
        let w = Arc::clone(&woken);
        c.on_cancel(move || {
            w.fetch_add(1, Ordering::SeqCst);
        });
        assert_eq!(woken.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn a_vmm_started_after_the_cancel_is_killed_at_once_and_nothing_is_nothing() {
        let c = Cancel::default();
        assert!(!c.cancel(libc::SIGINT), "nothing to cancel: the caller ends itself");
        let mut child = std::process::Command::new("sleep").arg("60").spawn().unwrap();
        c.set_vmm(Some(child.id()));
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(child.wait().unwrap().signal(), Some(libc::SIGKILL));
    }
}
