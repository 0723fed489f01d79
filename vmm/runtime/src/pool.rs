//! A pool of restored VMs: a run takes one that is already running
//! instead of restoring its template.
//!
//! A keeper (`vmrun pool IMAGE`, [`Keeper`]) keeps `size` VMs restored
//! from one prepared template, each in a directory of its own under the
//! pool's (`pools/<hash>/vm-N/`, the hash naming the template and the
//! network), and serves a Unix socket there (`pool.sock`, its owner's
//! alone). A run whose VM that template would make
//! asks it for one ([`claim`]): the answer names the VM's directory and
//! the VMM's pid, and carries a pidfd of it and a connection to its agent
//! (`SCM_RIGHTS`). The keeper made that connection once the VM was
//! restored and exchanged the hello on it (whose fresh host entropy
//! reseeds the guest's random generator, and which sets its clock), so
//! the run starts its container at once. The keeper's connection stays
//! open as the run's lease on the VM. The run ends the VM itself as it
//! ends one it started: through the jail's outer process, waited for on
//! the pidfd. When the lease closes (the run is over, or its process died,
//! `kill -9` included), the keeper kills the VM if it still runs, reaps
//! it, removes its directory, and restores another. The replacement of a
//! claimed VM is restored once its run has ended, or a second after the
//! claim if the run goes on, so that it does not compete with the run's
//! start.
//!
//! The keeper owns the VMMs (its children, which die with it:
//! `PR_SET_PDEATHSIG`); a keeper that was killed leaves only directories
//! and the links recorded in them, which the next one for the same pool
//! or `vmrun system prune` removes (under the pool's lock, which also
//! keeps two keepers from serving one pool). While it
//! runs it holds its template's lock shared, so `rmi` and `system prune`
//! leave the template alone.

use std::io::{BufRead, BufReader, Read};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::lock::Lock;
use crate::net::{Link, Mode};
use crate::vm::{Layout, VmProcess};
use crate::{Error, Result};

/// The keeper's socket, in the pool's directory.
pub const SOCKET: &str = "pool.sock";

/// The lock the keeper holds for its whole life.
const LOCK: &str = "pool.lock";

/// The prefix of a pooled VM's directory.
const ENTRY_PREFIX: &str = "vm-";

/// The record of a pooled VM's link, in its directory: written before the
/// link is made, so that whoever finds the directory of a keeper that was
/// killed removes the link too ([`clean_up`]).
const LINK_RECORD: &str = "link.json";

/// How long either side waits for the other's line.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(2);

/// How long a restored VMM may take to say it is ready.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// After a restore failed, the keeper tries again this much later.
const RETRY_PAUSE: Duration = Duration::from_secs(5);

/// How long after a claim the VM that replaces the claimed one may wait
/// for the run to end: restored meanwhile, it would take CPU from the
/// run's start (on a host with few cores, a tenth of a short run's time),
/// and a run that goes on longer must not leave the pool short.
const REFILL_DELAY: Duration = Duration::from_secs(1);

/// Longest request or answer line.
const MAX_LINE: u64 = 4096;

/// A request to the keeper.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Hand over a ready VM; the connection is then the lease on it.
    Claim {},
    /// How many VMs are ready; with `full`, answered once all of them are.
    Status {
        #[serde(default)]
        full: bool,
    },
}

/// The keeper's answer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Answer {
    /// VMs the pool keeps.
    pub size: usize,
    /// VMs ready to be claimed (after this answer's claim).
    pub ready: usize,
    /// The claimed VM (a claim of a pool with none ready has none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<PooledVm>,
}

/// A VM handed over by a claim.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PooledVm {
    /// Its directory (its [`Layout`]: sockets, console).
    pub dir: PathBuf,
    /// The VMM's process (its jail's outer process when jailed).
    pub pid: u32,
    /// Whether it is jailed (ended through [`vmrun_jail::kill_signal`]).
    pub jailed: bool,
    /// Its network link (TAP device and addresses), which the keeper
    /// made and removes once the VM has ended; the run gives the guest
    /// its address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link: Option<Link>,
}

/// The lock a keeper holds on the pool in `dir` for its whole life.
pub fn lock_path(dir: &Path) -> PathBuf {
    dir.join(LOCK)
}

/// The directory of the pool of VMs restored from the prepared template
/// `template` on network `network`, under `pools` (the template says
/// whether a VM has a network slot; the pool also what its link does):
/// named by a hash of both, short enough for the VMs' socket paths below
/// it.
pub fn dir_for(pools: &Path, template: &Path, network: Mode) -> PathBuf {
    let mode = match network {
        Mode::None => "none",
        Mode::Tap => "tap",
        Mode::Nat => "nat",
    };
    let name = format!("{} {mode}", template.file_name().unwrap_or_default().to_string_lossy());
    pools.join(format!("{:016x}", vmrun_vmm_api::hash::fnv1a_continue(vmrun_vmm_api::hash::FNV_OFFSET, name.as_bytes())))
}

/// Where a warm VM shaped as `spec` comes from, on network `network`
/// (whatever `spec`'s TAP device): see [`locate`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origins {
    /// The base template's directory (built or not).
    pub base: PathBuf,
    /// The prepared template of the image (made or not).
    pub prepared: PathBuf,
    /// The pool of that prepared template on that network (served or not).
    pub pool: PathBuf,
}

/// The templates and the pool a warm VM shaped as `spec` of the image
/// `manifest_digest` comes from on network `network`; nothing is built.
pub fn locate(home: &crate::home::Home, spec: &crate::vm::VmSpec, network: Mode, manifest_digest: &str) -> Result<Origins> {
    // The template key says whether there is a network slot, not which TAP.
    let shape = crate::vm::VmSpec { tap: (network != Mode::None).then(String::new), ..spec.clone() };
    let base = crate::template::base_dir(&home.templates(), &shape)?;
    let prepared = crate::template::prepared_dir(&base, manifest_digest);
    let pool = dir_for(&home.pools(), &prepared, network);
    Ok(Origins { base, prepared, pool })
}

/// A host-wide name for a pooled VM's link (`vmrun-` and 9 more
/// characters: `p` and 8 random hex digits).
fn link_id() -> String {
    let mut b = [0u8; 4];
    // SAFETY: getrandom writes at most 4 bytes into `b`.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    let r = if n == 4 { u32::from_ne_bytes(b) } else { std::process::id() ^ (Instant::now().elapsed().subsec_nanos()) };
    format!("p{r:08x}")
}

/// A VM from a pool, claimed: the run owns it until this is dropped, which
/// kills it (if it still runs) and ends the lease.
#[derive(Debug)]
pub struct Claimed {
    vm: PooledVm,
    layout: Layout,
    pidfd: OwnedFd,
    /// The connection to the keeper: open while the run holds the VM.
    _lease: UnixStream,
    ended: bool,
}

/// Takes a ready VM from the pool in `dir`, if a keeper serves one there
/// and has one ready, with a connection to its agent whose hello was
/// exchanged ([`vmrun_agent_client::Client::established`]); `None`
/// otherwise (the run restores its own).
pub fn claim(dir: &Path) -> Option<(Claimed, UnixStream)> {
    let mut s = match UnixStream::connect(dir.join(SOCKET)) {
        Ok(s) => s,
        Err(e) => {
            if e.kind() != std::io::ErrorKind::NotFound {
                log::debug!("no pool at {} ({e})", dir.display());
            }
            return None;
        }
    };
    match ask(&mut s, &Request::Claim {}) {
        Ok((answer, fds)) => {
            let vm = answer.vm?;
            // A keeper's VM lives in a directory of its pool's.
            if vm.dir.parent() != Some(dir) || vm.link.as_ref().is_some_and(|l| !l.tap.starts_with(crate::net::TAP_PREFIX)) {
                log::warn!("the pool at {} named a VM outside it ({}, {:?}): not used", dir.display(), vm.dir.display(), vm.link);
                return None;
            }
            let [pidfd, agent]: [OwnedFd; 2] = fds.try_into().ok()?;
            if let Err(e) = s.set_read_timeout(None) {
                log::debug!("pool lease: {e}");
            }
            Some((Claimed { layout: Layout::of(&vm.dir), vm, pidfd, _lease: s, ended: false }, UnixStream::from(agent)))
        }
        Err(e) => {
            log::warn!("the pool at {} did not answer ({e}): restoring a VM instead", dir.display());
            None
        }
    }
}

/// Asks the keeper of the pool in `dir` how many VMs are ready; with
/// `full`, waits until all of them are (up to `timeout`).
pub fn status(dir: &Path, full: bool, timeout: Duration) -> Result<Answer> {
    let mut s = UnixStream::connect(dir.join(SOCKET)).map_err(|e| Error::Pool(format!("no pool serves {}: {e}", dir.display())))?;
    s.set_read_timeout(Some(timeout))?;
    Ok(ask_with(&mut s, &Request::Status { full })?.0)
}

fn ask(s: &mut UnixStream, req: &Request) -> std::io::Result<(Answer, Vec<OwnedFd>)> {
    s.set_read_timeout(Some(ANSWER_TIMEOUT))?;
    ask_with(s, req)
}

fn ask_with(s: &mut UnixStream, req: &Request) -> std::io::Result<(Answer, Vec<OwnedFd>)> {
    s.set_write_timeout(Some(ANSWER_TIMEOUT))?;
    vmrun_vmm_api::control::write_line_with_fds(s, &line_of(req)?, &[])?;
    let (line, fds) = vmrun_vmm_api::control::read_line_with_fds(s)?;
    let answer = serde_json::from_str(&line).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{e}: {line:?}")))?;
    Ok((answer, fds))
}

fn line_of(value: &impl Serialize) -> std::io::Result<Vec<u8>> {
    let mut line = serde_json::to_vec(value).map_err(std::io::Error::other)?;
    line.push(b'\n');
    Ok(line)
}

/// `pidfd_send_signal(fd, sig)`.
fn pidfd_signal(fd: BorrowedFd<'_>, sig: i32) {
    // SAFETY: pidfd_send_signal takes a pidfd, a signal, no siginfo and no
    // flags; it touches no memory of ours.
    unsafe { libc::syscall(libc::SYS_pidfd_send_signal, fd.as_raw_fd(), sig, std::ptr::null::<libc::siginfo_t>(), 0u32) };
}

impl Claimed {
    /// Its network link, if it has one (the keeper's to remove).
    pub fn link(&self) -> Option<&Link> {
        self.vm.link.as_ref()
    }

    /// The VMM's pid.
    pub fn pid(&self) -> u32 {
        self.vm.pid
    }

    /// Where its files are.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Waits up to `timeout` for the VMM to end, killing it after that.
    pub fn wait(&mut self, timeout: Duration) {
        if !matches!(crate::watch::poll_readable(self.pidfd.as_raw_fd(), Instant::now() + timeout), Ok(true)) {
            self.kill_and_wait();
        }
        self.ended = true;
    }

    /// Kills the VMM as [`VmProcess`] kills its own (through the jail's
    /// outer process when jailed, SIGKILL after [`crate::vm::JAIL_KILL_TIMEOUT`])
    /// and waits for its end on the pidfd. The keeper reaps it.
    fn kill_and_wait(&mut self) {
        if self.ended {
            return;
        }
        self.ended = true;
        let fd = self.pidfd.as_fd();
        if self.vm.jailed {
            pidfd_signal(fd, vmrun_jail::kill_signal());
            if matches!(crate::watch::poll_readable(fd.as_raw_fd(), Instant::now() + crate::vm::JAIL_KILL_TIMEOUT), Ok(true)) {
                return;
            }
        }
        pidfd_signal(fd, libc::SIGKILL);
        let _ = crate::watch::poll_readable(fd.as_raw_fd(), Instant::now() + crate::vm::JAIL_KILL_TIMEOUT);
    }
}

impl Drop for Claimed {
    fn drop(&mut self) {
        self.kill_and_wait();
    }
}

/// A VM of the pool. Dropped: the VMM first (killed if it runs, reaped),
/// then its directory (fields drop in order).
struct Pooled {
    vm: VmProcess,
    /// A connection to its agent, the hello exchanged: handed to the run.
    agent: UnixStream,
    /// Its link, removed once the VMM has ended.
    link: Option<PooledLink>,
    dir: EntryDir,
}

/// A pooled VM's link, removed when dropped.
struct PooledLink(Link);

impl Drop for PooledLink {
    fn drop(&mut self) {
        self.0.delete();
    }
}

/// A pooled VM's directory, removed when dropped.
struct EntryDir(PathBuf);

impl Drop for EntryDir {
    fn drop(&mut self) {
        crate::vm::remove_dir(&self.0);
    }
}

/// A claimed VM, and its lease.
struct Leased {
    pooled: Pooled,
    lease: UnixStream,
    claimed_at: Instant,
}

/// Removes what the keeper of the pool in `dir` left when it was killed
/// (its VMs died with it): each VM's directory, and the link it records.
/// The caller holds the pool's lock, or it is free.
pub fn clean_up(dir: &Path) -> std::io::Result<()> {
    release_recorded_link(dir);
    for entry in std::fs::read_dir(dir)?.flatten() {
        if entry.file_name().to_string_lossy().starts_with(ENTRY_PREFIX) {
            release_recorded_link(&entry.path());
            crate::vm::remove_dir(&entry.path());
        }
    }
    Ok(())
}

/// Removes the link recorded in `dir` ([`recorded_link`]), if any.
fn release_recorded_link(dir: &Path) {
    let record = std::fs::read(dir.join(LINK_RECORD)).ok();
    if let Some(link) = record.and_then(|r| serde_json::from_slice::<Link>(&r).ok()).filter(|l| l.tap.starts_with(crate::net::TAP_PREFIX)) {
        link.delete();
        let _ = std::fs::remove_file(dir.join(LINK_RECORD));
    }
}

/// A new link for a VM of a pool (or a template a pool makes) whose
/// directory is `dir`, recorded there before it is made, so that
/// [`clean_up`] finds it if the process that made it is killed.
pub fn recorded_link(dir: &Path, setup: &crate::net::Setup) -> Result<Link> {
    std::fs::create_dir_all(dir)?;
    let id = link_id();
    let record = |link: &Link| -> Result<()> { Ok(std::fs::write(dir.join(LINK_RECORD), serde_json::to_vec(link).map_err(std::io::Error::other)?)?) };
    // The name identifies it; the addresses come with the allocation,
    // and the record is written again with them.
    record(&Link::new(&id, 0))?;
    let link = crate::net::allocate(&id, &[], setup)?;
    record(&link)?;
    Ok(link)
}

/// Keeps a pool of VMs and serves claims (see the module's documentation).
pub struct Keeper<F> {
    dir: PathBuf,
    size: usize,
    /// What each VM's link is for (`None`: no network).
    network: Option<crate::net::Setup>,
    start: F,
    listener: UnixListener,
    ready: Vec<Pooled>,
    leased: Vec<Leased>,
    /// Status requests waiting for a full pool.
    waiters: Vec<UnixStream>,
    next: u64,
    retry_at: Option<Instant>,
    _lock: Lock,
    _template: Lock,
}

impl<F> std::fmt::Debug for Keeper<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keeper").field("dir", &self.dir).field("size", &self.size).field("ready", &self.ready.len()).field("leased", &self.leased.len()).finish()
    }
}

impl<F: FnMut(&Path, Option<&Link>) -> Result<VmProcess>> Keeper<F> {
    /// A keeper of `size` VMs in `dir`, each started by `start` in the
    /// directory it is given, on the link given (made for it with `network`,
    /// removed after it); `template` is the template they are restored
    /// from, held (shared) for the keeper's life. Fails if another keeper
    /// serves `dir`.
    pub fn new(dir: &Path, template: &Path, size: usize, network: Option<crate::net::Setup>, start: F) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        let lock = Lock::try_take(&lock_path(dir))?.ok_or_else(|| Error::Pool(format!("another vmrun pool serves {} already", dir.display())))?;
        let template_lock = Lock::shared(&crate::template::lock_path(template))?;
        if !crate::template::is_ready(template) {
            return Err(Error::Pool(format!("the template {} was removed; start the pool again", template.display())));
        }
        // What a killed keeper left: its VMs died with it.
        clean_up(dir)?;
        let socket = dir.join(SOCKET);
        match std::fs::remove_file(&socket) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
            _ => {}
        }
        let listener = UnixListener::bind(&socket)?;
        std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600))?;
        listener.set_nonblocking(true)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            size,
            network,
            start,
            listener,
            ready: Vec::new(),
            leased: Vec::new(),
            waiters: Vec::new(),
            next: 0,
            retry_at: None,
            _lock: lock,
            _template: template_lock,
        })
    }

    /// Serves claims until `stop` is readable (then every VM is killed);
    /// `full` is called each time the pool becomes full.
    pub fn serve(&mut self, stop: BorrowedFd<'_>, full: &dyn Fn(usize)) -> Result<()> {
        loop {
            // A claimed VM's replacement waits for its run to end, or for
            // REFILL_DELAY after the claim at the latest.
            let now = Instant::now();
            let deferrals: Vec<Instant> = self.leased.iter().map(|l| l.claimed_at + REFILL_DELAY).filter(|t| *t > now).collect();
            let missing = self.ready.len() + deferrals.len() < self.size;
            let may_start = self.retry_at.is_none_or(|t| now >= t);
            if missing && may_start {
                self.retry_at = None;
                self.start_one();
                if self.ready.len() == self.size {
                    full(self.size);
                    self.answer_waiters();
                }
            }
            // Poll: the stop, the socket, the leases, the ready VMs' ends.
            let mut fds = vec![stop.as_raw_fd(), self.listener.as_raw_fd()];
            fds.extend(self.leased.iter().map(|l| l.lease.as_raw_fd()));
            let ready_pidfds: Vec<i32> = self.ready.iter().filter_map(|p| p.vm.pidfd().map(|f| f.as_raw_fd())).collect();
            fds.extend(&ready_pidfds);
            let mut p: Vec<libc::pollfd> = fds.iter().map(|&fd| libc::pollfd { fd, events: libc::POLLIN, revents: 0 }).collect();
            let wake = match (missing, self.retry_at) {
                (true, None) => Some(Instant::now()),
                (true, Some(t)) => Some(t),
                (false, _) => None,
            };
            let timeout_ms = match wake.into_iter().chain(deferrals).min() {
                Some(t) => t.saturating_duration_since(Instant::now()).as_millis().min(i32::MAX as u128) as i32,
                None => -1,
            };
            // SAFETY: `p` is a valid array of pollfd of the given length.
            let n = unsafe { libc::poll(p.as_mut_ptr(), p.len() as libc::nfds_t, timeout_ms) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e.into());
            }
            let readable = |i: usize| p[i].revents != 0;
            if readable(0) {
                return Ok(());
            }
            // Leases that ended, and ready VMs that died, from the last
            // index down (their positions in `p` follow their vectors').
            let leases = 2..2 + self.leased.len();
            for i in leases.clone().rev() {
                if readable(i) {
                    let l = self.leased.remove(i - 2);
                    log::debug!("the lease on {} ended", l.pooled.dir.0.display());
                }
            }
            for (k, fd) in ready_pidfds.iter().enumerate().rev() {
                if readable(leases.end + k) {
                    if let Some(i) = self.ready.iter().position(|r| r.vm.pidfd().map(|f| f.as_raw_fd()) == Some(*fd)) {
                        let r = self.ready.remove(i);
                        log::warn!("a pooled VM ended before it was claimed; its console is in {}", Layout::of(&r.dir.0).console().display());
                    }
                }
            }
            if readable(1) {
                self.accept();
            }
        }
    }

    /// Restores one VM into a new directory of the pool; a failure is
    /// logged and tried again [`RETRY_PAUSE`] later.
    fn start_one(&mut self) {
        let dir = self.dir.join(format!("{ENTRY_PREFIX}{}", self.next));
        self.next += 1;
        let started = self.link_for(&dir).and_then(|link| {
            let mut vm = (self.start)(&dir, link.as_ref().map(|l| &l.0))?;
            match vm.wait_until_ready(READY_TIMEOUT) {
                Ok(true) => {
                    // Greeted now, so that a run finds its agent connected:
                    // the hello's fresh entropy reseeds this guest's random
                    // generator, and its clock is set, while it waits.
                    let mut agent = vmrun_agent_client::hybrid_vsock_connect(&vm.layout().vsock(), crate::vm::AGENT_PORT, READY_TIMEOUT)?;
                    vmrun_agent_client::Client::hello(&mut agent, READY_TIMEOUT)?;
                    Ok((vm, agent, link))
                }
                Ok(false) => Err(Error::Pool(format!("the VMM did not say it was ready within {} s", READY_TIMEOUT.as_secs()))),
                Err(e) => Err(e),
            }
        });
        match started {
            Ok((vm, agent, link)) => self.ready.push(Pooled { vm, agent, link, dir: EntryDir(dir) }),
            Err(e) => {
                log::warn!("cannot restore a VM for the pool ({e}); trying again in {} s", RETRY_PAUSE.as_secs());
                crate::vm::remove_dir(&dir);
                self.retry_at = Some(Instant::now() + RETRY_PAUSE);
            }
        }
    }

    /// A new link for the VM of `dir` (recorded there first), if the pool
    /// has a network.
    fn link_for(&self, dir: &Path) -> Result<Option<PooledLink>> {
        self.network.as_ref().map(|setup| recorded_link(dir, setup).map(PooledLink)).transpose()
    }

    /// Serves the connections waiting on the socket.
    fn accept(&mut self) {
        loop {
            let s = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    log::warn!("pool socket: {e}");
                    return;
                }
            };
            if let Err(e) = self.serve_one(s) {
                log::debug!("a pool client: {e}");
            }
        }
    }

    fn serve_one(&mut self, s: UnixStream) -> std::io::Result<()> {
        s.set_nonblocking(false)?;
        s.set_read_timeout(Some(ANSWER_TIMEOUT))?;
        s.set_write_timeout(Some(ANSWER_TIMEOUT))?;
        let mut line = String::new();
        BufReader::new((&s).take(MAX_LINE)).read_line(&mut line)?;
        let req: Request = serde_json::from_str(&line).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, format!("bad request {line:?}: {e}")))?;
        match req {
            Request::Status { full } if full && self.ready.len() < self.size => self.waiters.push(s),
            Request::Status { .. } => drop(self.answer(s, None, &[])?),
            Request::Claim {} => self.hand_over(s)?,
        }
        Ok(())
    }

    /// Answers a claim with the oldest ready VM (or none).
    fn hand_over(&mut self, s: UnixStream) -> std::io::Result<()> {
        // Skip VMs that died since the last poll.
        while let Some(mut pooled) = (!self.ready.is_empty()).then(|| self.ready.remove(0)) {
            if pooled.vm.has_ended() {
                continue;
            }
            let Some(pidfd) = pooled.vm.pidfd().map(|f| f.try_clone_to_owned()).transpose()? else {
                // Without pidfds a claimer could not wait for it.
                self.ready.insert(0, pooled);
                break;
            };
            let vm = PooledVm { dir: pooled.dir.0.clone(), pid: pooled.vm.pid(), jailed: pooled.vm.jailed(), link: pooled.link.as_ref().map(|l| l.0.clone()) };
            let s = self.answer(s, Some(vm), &[pidfd.as_fd(), pooled.agent.as_fd()])?;
            log::debug!("handed over {}", pooled.dir.0.display());
            self.leased.push(Leased { pooled, lease: s, claimed_at: Instant::now() });
            return Ok(());
        }
        self.answer(s, None, &[]).map(drop)
    }

    fn answer(&self, mut s: UnixStream, vm: Option<PooledVm>, fds: &[BorrowedFd<'_>]) -> std::io::Result<UnixStream> {
        let ready = self.ready.len();
        vmrun_vmm_api::control::write_line_with_fds(&mut s, &line_of(&Answer { size: self.size, ready, vm })?, fds)?;
        Ok(s)
    }

    fn answer_waiters(&mut self) {
        for s in std::mem::take(&mut self.waiters) {
            if let Err(e) = self.answer(s, None, &[]) {
                log::debug!("a pool client: {e}");
            }
        }
    }
}

impl<F> Drop for Keeper<F> {
    fn drop(&mut self) {
        // Runs that look for the pool from now on restore their own VMs;
        // the VMs go with the fields.
        let _ = std::fs::remove_file(self.dir.join(SOCKET));
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn requests_and_answers_in_json() {
        assert_eq!(serde_json::to_string(&Request::Claim {}).unwrap(), r#"{"op":"claim"}"#);
        assert_eq!(serde_json::from_str::<Request>(r#"{"op":"status"}"#).unwrap(), Request::Status { full: false });
        assert!(serde_json::from_str::<Request>(r#"{"op":"claim","dir":"/"}"#).is_err());
        let link = Some(Link::new(&link_id(), 3));
        let a = Answer { size: 2, ready: 1, vm: Some(PooledVm { dir: "/p/vm-0".into(), pid: 7, jailed: true, link }) };
        assert_eq!(serde_json::from_str::<Answer>(&serde_json::to_string(&a).unwrap()).unwrap(), a);
        assert_eq!(serde_json::to_string(&Answer { size: 2, ready: 0, vm: None }).unwrap(), r#"{"size":2,"ready":0}"#);
    }

    /// A keeper's answer naming a directory outside its pool is refused:
    /// a claim then restores instead of reaching a VM it does not own.
    #[test]
    fn a_claim_refuses_a_vm_outside_the_pool() {
        let dir = tempfile::tempdir().unwrap();
        let listener = UnixListener::bind(dir.path().join(SOCKET)).unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut line = String::new();
            BufReader::new(&s).read_line(&mut line).unwrap();
            assert_eq!(line.trim(), r#"{"op":"claim"}"#);
            let me = std::fs::File::open("/proc/self/stat").unwrap();
            let a = Answer { size: 1, ready: 0, vm: Some(PooledVm { dir: "/elsewhere/vm-0".into(), pid: 1, jailed: false, link: None }) };
            vmrun_vmm_api::control::write_line_with_fds(&mut s, &line_of(&a).unwrap(), &[me.as_fd(), me.as_fd()]).unwrap();
        });
        assert!(claim(dir.path()).is_none());
        server.join().unwrap();
        // No keeper at all: no claim, no error.
        assert!(claim(&dir.path().join("none")).is_none());
    }
}
