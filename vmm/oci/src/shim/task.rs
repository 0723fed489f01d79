//! The task service: containerd's task API answered with vmrun-oci's
//! operations.
//!
//! Each task is a container ([`crate::ops::create_container`]) whose pid
//! is its holder's, and each exec a process under an exec supervisor
//! ([`crate::ops::exec_detached`]); both are this shim's children, whose
//! exits the shim crate reaps (this shim is a subreaper) and reports on
//! its monitor: a thread turns them into the tasks' exit statuses and
//! `TaskExit` events. An exit may come before the pid it belongs to is
//! recorded (a short exec): it is kept until it is claimed.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Instant;

use containerd_shim as shim;
use shim::api;
use shim::api::Empty;
use shim::monitor::{ExitEvent, Subject, Topic};
use shim::protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskIO, TaskOOM, TaskPaused,
    TaskResumed, TaskStart,
};
use shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use shim::protos::protobuf::{MessageDyn, MessageField};
use shim::protos::topics;
use shim::protos::ttrpc::{self, Code};
use shim::synchronous::publisher::RemotePublisher;
use shim::{ExitSignal, TtrpcContext, TtrpcResult};

use super::io::{self as stdio, Live, Paths};
use crate::error::Error;
use crate::ops::{self, CreateArgs, ExecArgs};

/// Exits kept for pids not (yet) recorded, at most.
const UNCLAIMED: usize = 4096;

/// The time now, as containerd's timestamps.
pub fn now() -> Timestamp {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    Timestamp {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
        ..Default::default()
    }
}

/// Unmounts what `Create` mounted on the bundle's root.
pub fn unmount_rootfs(bundle: &Path) {
    let root = bundle.join("rootfs");
    if let Err(e) = shim::mount::umount_recursive(root.to_str(), libc::MNT_DETACH) {
        log::warn!("unmounting {}: {e}", root.display());
    }
}

/// A runtime error as a ttrpc status containerd maps to its own errors.
fn status(e: Error) -> ttrpc::Error {
    let code = match &e {
        Error::NotFound(_) => Code::NOT_FOUND,
        Error::Exists(_) => Code::ALREADY_EXISTS,
        Error::State(_) => Code::FAILED_PRECONDITION,
        Error::Usage(_) | Error::Bundle(_) | Error::InvalidId(_) => Code::INVALID_ARGUMENT,
        _ => Code::UNKNOWN,
    };
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, e.to_string()))
}

fn not_found(what: String) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(Code::NOT_FOUND, what))
}

/// Where a process is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Created,
    Running,
    Stopped,
}

/// A container's first process or an exec'd one.
#[derive(Debug)]
struct Proc {
    pid: u32,
    phase: Phase,
    /// Exit status and time, once stopped.
    exit: Option<(u32, Timestamp)>,
    paths: Paths,
    live: Arc<Live>,
}

impl Proc {
    fn new(paths: Paths) -> Self {
        Proc {
            pid: 0,
            phase: Phase::Created,
            exit: None,
            paths,
            live: Arc::new(Live::default()),
        }
    }
}

/// Container `id`'s process `exec_id` ("" for its first).
fn proc_of<'a>(c: &'a Container, id: &str, exec_id: &str) -> TtrpcResult<&'a Proc> {
    let p = if exec_id.is_empty() {
        Some(&c.init)
    } else {
        c.execs.get(exec_id).map(|x| &x.proc)
    };
    p.ok_or_else(|| not_found(format!("exec {exec_id} of {id}")))
}

/// The supervisor's streams, or the console socket that gets its
/// terminal (served by threads once the master comes).
fn process_io(
    paths: &Paths,
    live: &Arc<Live>,
) -> Result<(Option<ops::Streams>, Option<PathBuf>), Error> {
    if !paths.terminal {
        return Ok((Some(stdio::streams(paths, live)?), None));
    }
    let console = stdio::console(&Path::new(super::ROOT_BASE).join("consoles"))?;
    let path = console.path.clone();
    stdio::serve_terminal(console, paths, live)?;
    Ok((None, Some(path)))
}

/// An exec'd process, before and after it starts.
#[derive(Debug)]
struct ExecTask {
    process: crate::bundle::ProcessPlan,
    proc: Proc,
}

/// A container.
#[derive(Debug)]
struct Container {
    bundle: PathBuf,
    init: Proc,
    execs: HashMap<String, ExecTask>,
    /// Whether `Create` mounted its root.
    mounted: bool,
    /// The guest OOM killer's kills in it already reported.
    oom_seen: u64,
}

/// What the service's threads share.
#[derive(Debug, Default)]
struct Inner {
    containers: HashMap<String, Container>,
    /// Exits of pids no process claimed yet, and when they came.
    unclaimed: HashMap<u32, (i32, Instant)>,
}

impl Inner {
    /// Records `code` as the exit of the process `pid`, if one has it;
    /// returns `(container, exec id, pid, status, time)` for its event.
    fn exited(&mut self, pid: u32, code: i32) -> Option<(String, String, u32, u32, Timestamp)> {
        for (id, c) in &mut self.containers {
            let procs = std::iter::once((id.clone(), &mut c.init))
                .chain(c.execs.iter_mut().map(|(e, x)| (e.clone(), &mut x.proc)));
            for (name, p) in procs {
                if p.pid == pid && p.phase != Phase::Stopped {
                    let at = now();
                    p.phase = Phase::Stopped;
                    p.exit = Some((code as u32, at.clone()));
                    return Some((id.clone(), name, pid, code as u32, at));
                }
            }
        }
        if self.unclaimed.len() >= UNCLAIMED {
            self.unclaimed.clear();
        }
        self.unclaimed.insert(pid, (code, Instant::now()));
        None
    }
}

/// Whether a process of container `id` that ended killed was the guest
/// OOM killer's: the container's count of OOM kills, from its cgroup in
/// the guest (an exec's, while the container runs) or as its supervisor
/// recorded it when its process ended, is above what was reported.
fn oom_killed(namespace: &str, inner: &(Mutex<Inner>, Condvar), id: &str, exec: bool) -> bool {
    let kills = if exec {
        let bundle = inner
            .0
            .lock()
            .ok()
            .and_then(|g| g.containers.get(id).map(|c| c.bundle.clone()));
        super::ctx(namespace, bundle.as_deref())
            .and_then(|ctx| crate::cgroups::stats(&ctx, id))
            .map(|s| s.memory.events.oom_kill)
    } else {
        super::ctx(namespace, None)
            .and_then(|ctx| ctx.root.find(id))
            .map(|(_, st)| st.oci.map_or(0, |o| o.oom_kills))
    };
    let kills = match kills {
        Ok(k) => k,
        Err(e) => {
            log::warn!("container {id}: cannot tell whether the OOM killer struck: {e}");
            return false;
        }
    };
    let Ok(mut g) = inner.0.lock() else {
        return false;
    };
    match g.containers.get_mut(id) {
        Some(c) if kills > c.oom_seen => {
            c.oom_seen = kills;
            true
        }
        _ => false,
    }
}

/// An event for containerd: its topic and message.
type Event = (&'static str, Box<dyn MessageDyn>);

/// The task service.
pub struct Tasks {
    pub(super) namespace: String,
    inner: Arc<(Mutex<Inner>, Condvar)>,
    events: Mutex<Sender<Event>>,
    exit: Arc<ExitSignal>,
}

impl Tasks {
    /// The service, its exit monitor and its event publisher running.
    pub fn new(namespace: &str, publisher: RemotePublisher, exit: Arc<ExitSignal>) -> Self {
        let inner: Arc<(Mutex<Inner>, Condvar)> = Arc::default();
        let (tx, rx) = channel::<Event>();
        let ns = namespace.to_string();
        // Events go out in order, without holding up the calls that
        // cause them.
        std::thread::spawn(move || {
            for (topic, event) in rx {
                if let Err(e) = publisher.publish(Default::default(), topic, &ns, event) {
                    log::warn!("publishing {topic}: {e}");
                }
            }
        });
        match shim::monitor::monitor_subscribe(Topic::Pid) {
            Ok(sub) => {
                let inner = inner.clone();
                let ns_oom = namespace.to_string();
                let tx = tx.clone();
                std::thread::spawn(move || {
                    while let Ok(ExitEvent {
                        subject: Subject::Pid(pid),
                        exit_code,
                    }) = sub.rx.recv()
                    {
                        let (lock, cv) = &*inner;
                        let Ok(mut g) = lock.lock() else { return };
                        let done = g.exited(pid as u32, exit_code);
                        cv.notify_all();
                        drop(g);
                        if let Some((container_id, id, pid, exit_status, at)) = done {
                            if exit_status == 128 + libc::SIGKILL as u32
                                && oom_killed(&ns_oom, &inner, &container_id, id != container_id)
                            {
                                let e = TaskOOM {
                                    container_id: container_id.clone(),
                                    ..Default::default()
                                };
                                let _ = tx.send((topics::TASK_OOM_EVENT_TOPIC, Box::new(e)));
                            }
                            let e = TaskExit {
                                container_id,
                                id,
                                pid,
                                exit_status,
                                exited_at: MessageField::some(at),
                                ..Default::default()
                            };
                            let _ = tx.send((topics::TASK_EXIT_EVENT_TOPIC, Box::new(e)));
                        }
                    }
                });
            }
            Err(e) => log::error!("cannot watch for exits: {e}"),
        }
        Tasks {
            namespace: namespace.to_string(),
            inner,
            events: Mutex::new(tx),
            exit,
        }
    }

    fn publish(&self, topic: &'static str, event: Box<dyn MessageDyn>) {
        if let Ok(tx) = self.events.lock() {
            let _ = tx.send((topic, event));
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The operations' context for container `id`, logging into its
    /// bundle.
    fn ctx_of(&self, id: &str) -> TtrpcResult<ops::Ctx> {
        super::ctx(&self.namespace, Some(&self.bundle(id)?)).map_err(status)
    }

    /// Freezes or thaws container `id` in the guest; publishes the event.
    fn freeze(&self, id: &str, frozen: bool) -> TtrpcResult<Empty> {
        ops::pause(&self.ctx_of(id)?, id, frozen).map_err(status)?;
        let container_id = id.to_string();
        if frozen {
            self.publish(
                topics::TASK_PAUSED_EVENT_TOPIC,
                Box::new(TaskPaused {
                    container_id,
                    ..Default::default()
                }),
            );
        } else {
            self.publish(
                topics::TASK_RESUMED_EVENT_TOPIC,
                Box::new(TaskResumed {
                    container_id,
                    ..Default::default()
                }),
            );
        }
        Ok(Empty::new())
    }

    /// Runs `f` on container `id`'s process `exec_id`, under the lock.
    fn with_proc<R>(
        &self,
        id: &str,
        exec_id: &str,
        f: impl FnOnce(&Container, &Proc) -> TtrpcResult<R>,
    ) -> TtrpcResult<R> {
        let g = self.lock();
        let c = g
            .containers
            .get(id)
            .ok_or_else(|| not_found(format!("container {id}")))?;
        f(c, proc_of(c, id, exec_id)?)
    }

    fn bundle(&self, id: &str) -> TtrpcResult<PathBuf> {
        self.lock()
            .containers
            .get(id)
            .map(|c| c.bundle.clone())
            .ok_or_else(|| not_found(format!("container {id}")))
    }

    /// Records that `pid`, started at `since` or later, is `id`'s process
    /// `exec_id` ("" for its first), running if `started`, taking an
    /// exit that came first (not an older one of a process that had the
    /// same pid).
    fn record(&self, id: &str, exec_id: &str, pid: u32, since: Instant, started: bool) {
        let mut g = self.lock();
        let early = g
            .unclaimed
            .remove(&pid)
            .filter(|(_, at)| *at >= since)
            .map(|(code, _)| code);
        let Some(c) = g.containers.get_mut(id) else {
            return;
        };
        let p = if exec_id.is_empty() {
            Some(&mut c.init)
        } else {
            c.execs.get_mut(exec_id).map(|x| &mut x.proc)
        };
        let Some(p) = p else { return };
        p.pid = pid;
        if started && p.phase == Phase::Created {
            p.phase = Phase::Running;
        }
        let exited = early.map(|code| {
            let at = now();
            p.phase = Phase::Stopped;
            p.exit = Some((code as u32, at.clone()));
            TaskExit {
                container_id: id.into(),
                id: if exec_id.is_empty() {
                    id.into()
                } else {
                    exec_id.into()
                },
                pid,
                exit_status: code as u32,
                exited_at: MessageField::some(at),
                ..Default::default()
            }
        });
        self.inner.1.notify_all();
        drop(g);
        if let Some(e) = exited {
            self.publish(topics::TASK_EXIT_EVENT_TOPIC, Box::new(e));
        }
    }

    fn create_task(&self, req: &api::CreateTaskRequest) -> Result<u32, Error> {
        let bundle = PathBuf::from(&req.bundle);
        let mut mounted = false;
        if !req.rootfs.is_empty() {
            let root = bundle.join("rootfs");
            std::fs::create_dir_all(&root)
                .map_err(crate::error::io(format!("creating {}", root.display())))?;
            for m in &req.rootfs {
                let ty = (!m.type_.is_empty()).then_some(m.type_.as_str());
                let src = (!m.source.is_empty()).then_some(m.source.as_str());
                shim::mount::mount_rootfs(ty, src, &m.options, &root).map_err(|e| {
                    Error::Bundle(format!(
                        "mounting the container's root ({} {}): {e}",
                        m.type_, m.source
                    ))
                })?;
                mounted = true;
            }
        }
        let paths = Paths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        let init = Proc::new(paths.clone());
        let ctx = super::ctx(&self.namespace, Some(&bundle))?;
        let result = process_io(&paths, &init.live).and_then(|(streams, console_socket)| {
            ops::create_container(
                &ctx,
                &CreateArgs {
                    id: req.id.clone(),
                    bundle: Some(bundle.clone()),
                    pid_file: None,
                    console_socket,
                    streams,
                },
            )
        });
        let pid = match result {
            Ok(pid) => pid,
            Err(e) => {
                if mounted {
                    unmount_rootfs(&bundle);
                }
                return Err(e);
            }
        };
        let mut g = self.lock();
        let mut init = init;
        init.pid = pid;
        g.containers.insert(
            req.id.clone(),
            Container {
                bundle,
                init,
                execs: HashMap::new(),
                mounted,
                oom_seen: 0,
            },
        );
        Ok(pid)
    }

    fn exec_process(
        &self,
        req: &api::ExecProcessRequest,
    ) -> Result<crate::bundle::ProcessPlan, Error> {
        let raw: serde_json::Value = serde_json::from_slice(&req.spec.value)
            .map_err(|e| Error::Usage(format!("exec {}: invalid process: {e}", req.exec_id)))?;
        crate::bundle::check_capability_names(&raw, Path::new("the exec's process"))?;
        let p: oci_spec::runtime::Process = serde_json::from_value(raw)
            .map_err(|e| Error::Usage(format!("exec {}: invalid process: {e}", req.exec_id)))?;
        let mut plan = crate::bundle::process_plan(&p)?;
        plan.terminal |= req.terminal;
        Ok(plan)
    }

    fn start_exec(&self, id: &str, exec_id: &str) -> Result<u32, Error> {
        let (bundle, process, paths, live) = {
            let g = self.lock();
            let c = g
                .containers
                .get(id)
                .ok_or_else(|| Error::NotFound(id.into()))?;
            let x = c
                .execs
                .get(exec_id)
                .ok_or_else(|| Error::NotFound(format!("{id}/{exec_id}")))?;
            if x.proc.phase != Phase::Created {
                return Err(Error::State(format!("exec {exec_id} has already started")));
            }
            (
                c.bundle.clone(),
                x.process.clone(),
                x.proc.paths.clone(),
                x.proc.live.clone(),
            )
        };
        let ctx = super::ctx(&self.namespace, Some(&bundle))?;
        let (streams, console_socket) = process_io(&paths, &live)?;
        let args = ExecArgs {
            id: id.into(),
            process_plan: Some(process),
            console_socket,
            streams,
            ..Default::default()
        };
        ops::exec_detached(&ctx, &args)
    }

    /// Waits until `id`'s process `exec_id` has stopped; its exit.
    fn wait_exit(&self, id: &str, exec_id: &str) -> TtrpcResult<(u32, Timestamp)> {
        let mut g = self.lock();
        loop {
            let c = g
                .containers
                .get(id)
                .ok_or_else(|| not_found(format!("container {id}")))?;
            let p = proc_of(c, id, exec_id)?;
            if let Some(e) = &p.exit {
                return Ok(e.clone());
            }
            g = self
                .inner
                .1
                .wait(g)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
    }
}

impl shim::Task for Tasks {
    fn create(
        &self,
        _ctx: &TtrpcContext,
        req: api::CreateTaskRequest,
    ) -> TtrpcResult<api::CreateTaskResponse> {
        if self.lock().containers.contains_key(&req.id) {
            return Err(status(Error::Exists(req.id.clone())));
        }
        let since = Instant::now();
        let pid = self.create_task(&req).map_err(status)?;
        self.record(&req.id, "", pid, since, false);
        self.publish(
            topics::TASK_CREATE_EVENT_TOPIC,
            Box::new(TaskCreate {
                container_id: req.id.clone(),
                bundle: req.bundle.clone(),
                rootfs: req.rootfs.clone(),
                io: MessageField::some(TaskIO {
                    stdin: req.stdin.clone(),
                    stdout: req.stdout.clone(),
                    stderr: req.stderr.clone(),
                    terminal: req.terminal,
                    ..Default::default()
                }),
                pid,
                ..Default::default()
            }),
        );
        Ok(api::CreateTaskResponse {
            pid,
            ..Default::default()
        })
    }

    fn start(
        &self,
        _ctx: &TtrpcContext,
        req: api::StartRequest,
    ) -> TtrpcResult<api::StartResponse> {
        if req.exec_id.is_empty() {
            ops::start(&self.ctx_of(&req.id)?, &req.id).map_err(status)?;
            let pid = self
                .lock()
                .containers
                .get(&req.id)
                .map_or(0, |c| c.init.pid);
            self.record(&req.id, "", pid, Instant::now(), true);
            self.publish(
                topics::TASK_START_EVENT_TOPIC,
                Box::new(TaskStart {
                    container_id: req.id.clone(),
                    pid,
                    ..Default::default()
                }),
            );
            return Ok(api::StartResponse {
                pid,
                ..Default::default()
            });
        }
        let since = Instant::now();
        let pid = self.start_exec(&req.id, &req.exec_id).map_err(status)?;
        self.record(&req.id, &req.exec_id, pid, since, true);
        self.publish(
            topics::TASK_EXEC_STARTED_EVENT_TOPIC,
            Box::new(TaskExecStarted {
                container_id: req.id.clone(),
                exec_id: req.exec_id.clone(),
                pid,
                ..Default::default()
            }),
        );
        Ok(api::StartResponse {
            pid,
            ..Default::default()
        })
    }

    fn exec(&self, _ctx: &TtrpcContext, req: api::ExecProcessRequest) -> TtrpcResult<Empty> {
        let process = self.exec_process(&req).map_err(status)?;
        {
            let mut g = self.lock();
            let c = g
                .containers
                .get_mut(&req.id)
                .ok_or_else(|| not_found(format!("container {}", req.id)))?;
            if c.init.phase != Phase::Running {
                return Err(status(Error::State(format!(
                    "cannot exec in container {}: it is not running",
                    req.id
                ))));
            }
            if c.execs.contains_key(&req.exec_id) {
                return Err(status(Error::Exists(format!("exec {}", req.exec_id))));
            }
            let paths = Paths {
                stdin: req.stdin.clone(),
                stdout: req.stdout.clone(),
                stderr: req.stderr.clone(),
                terminal: process.terminal,
            };
            c.execs.insert(
                req.exec_id.clone(),
                ExecTask {
                    process,
                    proc: Proc::new(paths),
                },
            );
        }
        self.publish(
            topics::TASK_EXEC_ADDED_EVENT_TOPIC,
            Box::new(TaskExecAdded {
                container_id: req.id.clone(),
                exec_id: req.exec_id.clone(),
                ..Default::default()
            }),
        );
        Ok(Empty::new())
    }

    fn state(
        &self,
        _ctx: &TtrpcContext,
        req: api::StateRequest,
    ) -> TtrpcResult<api::StateResponse> {
        self.with_proc(&req.id, &req.exec_id, |c, p| {
            let paused = req.exec_id.is_empty()
                && p.phase == Phase::Running
                && super::root_of(&self.namespace)
                    .join(&req.id)
                    .join(crate::state::PAUSED_FILE)
                    .exists();
            let st = match p.phase {
                _ if paused => api::Status::PAUSED,
                Phase::Created => api::Status::CREATED,
                Phase::Running => api::Status::RUNNING,
                Phase::Stopped => api::Status::STOPPED,
            };
            Ok(api::StateResponse {
                id: req.id.clone(),
                bundle: c.bundle.display().to_string(),
                pid: p.pid,
                status: st.into(),
                stdin: p.paths.stdin.clone(),
                stdout: p.paths.stdout.clone(),
                stderr: p.paths.stderr.clone(),
                terminal: p.paths.terminal,
                exit_status: p.exit.as_ref().map_or(0, |e| e.0),
                exited_at: p.exit.as_ref().map(|e| e.1.clone()).into(),
                exec_id: req.exec_id.clone(),
                ..Default::default()
            })
        })
    }

    fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> TtrpcResult<Empty> {
        let signal = i32::try_from(req.signal)
            .map_err(|_| status(Error::Usage(format!("signal {}", req.signal))))?;
        if req.exec_id.is_empty() {
            let ctx = self.ctx_of(&req.id)?;
            ops::kill(&ctx, &req.id, Some(&signal.to_string()), req.all).map_err(status)?;
            return Ok(Empty::new());
        }
        // The exec supervisor hands the signals it gets to its process.
        let pid = self.with_proc(&req.id, &req.exec_id, |_, p| {
            if p.phase != Phase::Running {
                return Err(status(Error::State(format!(
                    "exec {} is not running",
                    req.exec_id
                ))));
            }
            Ok(p.pid)
        })?;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::try_from(signal)
                .map_err(|e| status(Error::Usage(e.to_string())))?,
        )
        .map_err(|e| {
            status(Error::State(format!(
                "signalling exec {}: {e}",
                req.exec_id
            )))
        })?;
        Ok(Empty::new())
    }

    fn delete(
        &self,
        _ctx: &TtrpcContext,
        req: api::DeleteRequest,
    ) -> TtrpcResult<api::DeleteResponse> {
        if !req.exec_id.is_empty() {
            let mut g = self.lock();
            let c = g
                .containers
                .get_mut(&req.id)
                .ok_or_else(|| not_found(format!("container {}", req.id)))?;
            let x = c
                .execs
                .get(&req.exec_id)
                .ok_or_else(|| not_found(format!("exec {} of {}", req.exec_id, req.id)))?;
            if x.proc.phase == Phase::Running {
                return Err(status(Error::State(format!(
                    "exec {} is still running",
                    req.exec_id
                ))));
            }
            let x = c
                .execs
                .remove(&req.exec_id)
                .ok_or_else(|| not_found(req.exec_id.clone()))?;
            let (code, at) = x.proc.exit.unwrap_or_else(|| (0, now()));
            return Ok(api::DeleteResponse {
                pid: x.proc.pid,
                exit_status: code,
                exited_at: MessageField::some(at),
                ..Default::default()
            });
        }
        self.with_proc(&req.id, "", |_, p| match p.phase {
            Phase::Running => Err(status(Error::State(format!(
                "cannot delete container {}: it is running",
                req.id
            )))),
            _ => Ok(()),
        })?;
        let ctx = self.ctx_of(&req.id)?;
        // A created container that never ran is stopped here.
        match ops::delete(&ctx, &req.id, true) {
            Ok(_) | Err(Error::NotFound(_)) => {}
            Err(e) => return Err(status(e)),
        }
        let c = self.lock().containers.remove(&req.id);
        let Some(c) = c else {
            return Err(not_found(req.id.clone()));
        };
        if c.mounted {
            unmount_rootfs(&c.bundle);
        }
        let (code, at) = c
            .init
            .exit
            .clone()
            .unwrap_or_else(|| (128 + libc::SIGKILL as u32, now()));
        self.publish(
            topics::TASK_DELETE_EVENT_TOPIC,
            Box::new(TaskDelete {
                container_id: req.id.clone(),
                id: req.id.clone(),
                pid: c.init.pid,
                exit_status: code,
                exited_at: MessageField::some(at.clone()),
                ..Default::default()
            }),
        );
        Ok(api::DeleteResponse {
            pid: c.init.pid,
            exit_status: code,
            exited_at: MessageField::some(at),
            ..Default::default()
        })
    }

    fn wait(&self, _ctx: &TtrpcContext, req: api::WaitRequest) -> TtrpcResult<api::WaitResponse> {
        let (code, at) = self.wait_exit(&req.id, &req.exec_id)?;
        Ok(api::WaitResponse {
            exit_status: code,
            exited_at: MessageField::some(at),
            ..Default::default()
        })
    }

    fn pids(&self, _ctx: &TtrpcContext, req: api::PidsRequest) -> TtrpcResult<api::PidsResponse> {
        let pids = ops::pids(&self.ctx_of(&req.id)?, &req.id).map_err(status)?;
        let processes = pids
            .into_iter()
            .map(|pid| shim::protos::api::ProcessInfo {
                pid,
                ..Default::default()
            })
            .collect();
        Ok(api::PidsResponse {
            processes,
            ..Default::default()
        })
    }

    fn pause(&self, _ctx: &TtrpcContext, req: api::PauseRequest) -> TtrpcResult<Empty> {
        self.freeze(&req.id, true)
    }

    fn resume(&self, _ctx: &TtrpcContext, req: api::ResumeRequest) -> TtrpcResult<Empty> {
        self.freeze(&req.id, false)
    }

    fn resize_pty(&self, _ctx: &TtrpcContext, req: api::ResizePtyRequest) -> TtrpcResult<Empty> {
        let master = self.with_proc(&req.id, &req.exec_id, |_, p| {
            Ok(p.live.master.lock().ok().and_then(|m| m.clone()))
        })?;
        let master =
            master.ok_or_else(|| status(Error::State(format!("{} has no terminal", req.id))))?;
        let (rows, cols) = (
            u16::try_from(req.height).unwrap_or(u16::MAX),
            u16::try_from(req.width).unwrap_or(u16::MAX),
        );
        use std::os::fd::AsRawFd;
        crate::console::set_window_size(master.as_raw_fd(), rows, cols)
            .map_err(|e| status(Error::State(format!("resizing the terminal: {e}"))))?;
        Ok(Empty::new())
    }

    fn close_io(&self, _ctx: &TtrpcContext, req: api::CloseIORequest) -> TtrpcResult<Empty> {
        self.with_proc(&req.id, &req.exec_id, |_, p| {
            if req.stdin {
                p.live
                    .stdin_closed
                    .store(true, std::sync::atomic::Ordering::SeqCst);
            }
            Ok(Empty::new())
        })
    }

    fn update(&self, _ctx: &TtrpcContext, req: api::UpdateTaskRequest) -> TtrpcResult<Empty> {
        let ctx = self.ctx_of(&req.id)?;
        let any = req
            .resources
            .as_ref()
            .ok_or_else(|| status(Error::Usage("update: no resources".into())))?;
        let r = super::metrics::resources(any).map_err(status)?;
        crate::cgroups::update_limits(&ctx, &req.id, &r).map_err(status)?;
        Ok(Empty::new())
    }

    fn stats(
        &self,
        _ctx: &TtrpcContext,
        req: api::StatsRequest,
    ) -> TtrpcResult<api::StatsResponse> {
        let s = crate::cgroups::stats(&self.ctx_of(&req.id)?, &req.id).map_err(status)?;
        Ok(api::StatsResponse {
            stats: MessageField::some(super::metrics::metrics_any(&s).map_err(status)?),
            ..Default::default()
        })
    }

    fn connect(
        &self,
        _ctx: &TtrpcContext,
        req: api::ConnectRequest,
    ) -> TtrpcResult<api::ConnectResponse> {
        let task_pid = self
            .lock()
            .containers
            .get(&req.id)
            .map_or(0, |c| c.init.pid);
        Ok(api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid,
            version: crate::cli::version(),
            ..Default::default()
        })
    }

    fn shutdown(&self, _ctx: &TtrpcContext, _req: api::ShutdownRequest) -> TtrpcResult<Empty> {
        // A pod's shim serves its containers until the last is deleted.
        if self.lock().containers.is_empty() {
            self.exit.signal();
        }
        Ok(Empty::new())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn exits_go_to_their_process_once_and_early_ones_wait_to_be_claimed() {
        let mut inner = Inner::default();
        let mut init = Proc::new(Paths::default());
        init.pid = 10;
        init.phase = Phase::Running;
        inner.containers.insert(
            "c".into(),
            Container {
                bundle: PathBuf::from("/b"),
                init,
                execs: HashMap::new(),
                mounted: false,
                oom_seen: 0,
            },
        );
        let (id, exec, pid, code, _) = inner.exited(10, 137).unwrap();
        assert_eq!((id.as_str(), exec.as_str(), pid, code), ("c", "c", 10, 137));
        assert_eq!(inner.containers["c"].init.phase, Phase::Stopped);
        assert!(
            inner.exited(10, 0).is_none(),
            "a stopped process takes no second exit"
        );
        assert!(inner.exited(11, 3).is_none());
        assert_eq!(
            inner.unclaimed.get(&11).map(|e| e.0),
            Some(3),
            "an exit of a pid not recorded yet is kept"
        );
    }
}
