//! Containers: creating their root (a tmpfs holding the unpacked image),
//! building the plan of their processes, removing them.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

use vmrun_agent_protocol::{
    AgentError, Capabilities, CreateContainer, Device, DeviceKind, ErrorKind, IdMapping, ImageConfig, Mount, Propagation, Rlimit, RootfsSpec,
    SeccompProfile,
};

use crate::caps::{self, CapSets};
use crate::process::{self, ChildStdio, Enter, Op, Plan};
use crate::seccomp::{self, Filter};
use crate::sys::{self, cstring};
use crate::unpack;
use crate::user::{self, Identity};

/// `PATH` when the image sets none (docker's default).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Largest `/etc/passwd` or `/etc/group` read.
const MAX_ID_FILE: usize = 1 << 20;

/// A created container.
#[derive(Debug)]
pub struct Container {
    /// Its id.
    pub id: String,
    /// `{root}/{id}`.
    pub dir: PathBuf,
    /// `{dir}/rootfs`, a mount point.
    pub rootfs: PathBuf,
    /// Its configuration.
    pub config: ImageConfig,
    /// The image's `/etc/passwd` and `/etc/group` (empty if absent).
    pub passwd: String,
    /// See `passwd`.
    pub group: String,
    /// The first process, once started.
    pub init_pid: Option<i32>,
    /// Its pidfd (to enter the container's namespaces).
    pub init_pidfd: Option<OwnedFd>,
    /// Whether the first process has exited.
    pub stopped: bool,
    /// `config.seccomp`, compiled.
    pub seccomp: Option<Filter>,
    /// Bind mounts the host copies in ([`crate::copy`]).
    pub copies: crate::copy::Copies,
    /// Its devpts instance (a detached mount until the first process
    /// attaches it on `/dev/pts`): its terminals come from it.
    pub devpts: Option<OwnedFd>,
    /// Its mount namespace, held from its first process's start until the
    /// container is removed: the first process's exit then does not
    /// unmount everything before its end is reported (the guest is often
    /// thrown away right after, and the work never done).
    pub mnt_ns: Option<OwnedFd>,
    /// Its IPC namespace, held likewise: freeing one (its message queue
    /// file system unmounted, an RCU grace period waited for) is work the
    /// guest would otherwise do while the exit is being reported.
    pub ipc_ns: Option<OwnedFd>,
    /// Its UTS namespace, held likewise (a pod's other containers may join
    /// it, and its IPC namespace: `ImageConfig::share_ipc_uts_with`).
    pub uts_ns: Option<OwnedFd>,
    /// The upper layer of an overlay root ([`crate::changes`]).
    pub upper: Option<PathBuf>,
    /// Its changes, listed at the first `ReadChanges` part.
    pub changes: Option<Vec<crate::changes::Piece>>,
}

fn err(kind: ErrorKind, m: impl Into<String>) -> AgentError {
    AgentError::new(kind, m)
}

fn internal(what: &str, e: io::Error) -> AgentError {
    err(ErrorKind::Internal, format!("{what}: {e}"))
}

/// Reads a small file of the image, resolving it as the container would
/// (`RESOLVE_IN_ROOT`): symlinks in the image stay in the image.
fn read_in_root(root: &Path, rel: &CStr) -> String {
    let Ok(croot) = cstring(root.as_os_str().as_encoded_bytes()) else { return String::new() };
    let Ok(rootfd) = sys::open(&croot, libc::O_PATH | libc::O_DIRECTORY, 0) else { return String::new() };
    let Ok(fd) = sys::openat2(rootfd.as_fd(), rel, libc::O_RDONLY, 0, libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS) else {
        return String::new();
    };
    let mut buf = vec![0u8; MAX_ID_FILE];
    let mut len = 0;
    while len < buf.len() {
        match sys::read(fd.as_fd(), &mut buf[len..]) {
            Ok(0) | Err(_) => break,
            Ok(n) => len += n,
        }
    }
    buf.truncate(len);
    String::from_utf8_lossy(&buf).into_owned()
}

use std::ffi::CStr;

/// Flags of a container's root file system: `nodev`. Device nodes an
/// image brings (a node of the guest's layer disk, of `/dev/mem`) are
/// created when it is unpacked but cannot be opened, by root or anyone
/// else in the container; only the container's own `/dev` (a tmpfs the
/// agent fills with the standard nodes) allows devices.
pub const ROOTFS_FLAGS: libc::c_ulong = libc::MS_NODEV;

/// Mounts the container's root at `rootfs`; for an overlay root, returns
/// its upper layer.
fn mount_rootfs(rootfs: &Path, spec: &RootfsSpec) -> Result<Option<PathBuf>, AgentError> {
    let target = cstring(rootfs.as_os_str().as_encoded_bytes()).map_err(|e| internal("rootfs path", e))?;
    let r = match spec {
        RootfsSpec::Tmpfs { size_mib } => {
            let data = match size_mib {
                Some(s) => format!("mode=0755,size={s}m"),
                None => "mode=0755".to_string(),
            };
            let data = cstring(data).map_err(|e| internal("tmpfs options", e))?;
            sys::mount(Some(c"tmpfs"), &target, Some(c"tmpfs"), ROOTFS_FLAGS, Some(&data))
        }
        RootfsSpec::Mount { source, fstype, options } => return mount_root_disk(rootfs, source, fstype, options, 0).map(|()| None),
        RootfsSpec::Overlay { source, fstype, options, upper } => {
            let disk = disk_dir(rootfs);
            std::fs::create_dir(&disk).map_err(|e| internal("creating the root disk's mount point", e))?;
            let layering = |e| err(ErrorKind::Internal, format!("layering the container root over {source}: {e}"));
            let Some(upper) = upper else {
                mount_root_disk(&disk, source, fstype, options, 0)?;
                return crate::changes::layer(&disk, rootfs).map(Some).map_err(layering);
            };
            // A copy other VMs share: read-only, as it is.
            mount_root_disk(&disk, source, fstype, options, libc::MS_RDONLY)?;
            let layers = upper_disk_dir(rootfs);
            std::fs::create_dir(&layers).map_err(|e| internal("creating the upper disk's mount point", e))?;
            mount_root_disk(&layers, upper, fstype, options, 0)?;
            return crate::changes::over(&disk, &layers, rootfs).map(Some).map_err(layering);
        }
    };
    r.map_err(|e| err(ErrorKind::Internal, format!("mounting the container root at {}: {e}", rootfs.display())))?;
    Ok(None)
}

/// Where an overlay root's disk is mounted: beside the root.
fn disk_dir(rootfs: &Path) -> PathBuf {
    rootfs.with_file_name("disk")
}

/// Where an overlay root's upper disk is mounted, when it has one.
fn upper_disk_dir(rootfs: &Path) -> PathBuf {
    rootfs.with_file_name("upper-disk")
}

/// Mounts the file system of disk `source` at `target` (`nodev`, and
/// `flags`), once the disk has a size.
fn mount_root_disk(target: &Path, source: &str, fstype: &str, options: &str, flags: libc::c_ulong) -> Result<(), AgentError> {
    let bad = |e| err(ErrorKind::BadRequest, format!("rootfs mount: {e}"));
    let s = cstring(source).map_err(bad)?;
    if is_host_disk(source) {
        wait_for_disk(&s).map_err(|e| err(ErrorKind::BadRequest, format!("rootfs disk {source}: {e}")))?;
    }
    let t = cstring(fstype).map_err(bad)?;
    let o = cstring(options).map_err(bad)?;
    let dir = cstring(target.as_os_str().as_encoded_bytes()).map_err(|e| internal("mount point", e))?;
    sys::mount(Some(&s), &dir, Some(&t), ROOTFS_FLAGS | flags, if options.is_empty() { None } else { Some(&o) })
        .map_err(|e| err(ErrorKind::Internal, format!("mounting {source} at {}: {e}", target.display())))
}

/// Whether `source` names a disk the host attached (`/dev/vdX`).
fn is_host_disk(source: &str) -> bool {
    let dev = source.strip_prefix("/dev/vd").unwrap_or_default();
    !dev.is_empty() && dev.chars().all(|c| c.is_ascii_lowercase())
}

/// Waits (up to 10 s) until the disk `dev` has a size. A VM restored from
/// a snapshot gets its disks in place of the template's empty
/// placeholders, and the guest kernel learns their new capacity a little
/// after the agent may already be asked to mount one (the container root
/// of the OCI runtime, on a volume disk slot).
fn wait_for_disk(dev: &CStr) -> io::Result<()> {
    for _ in 0..200 {
        if !sys::Mapping::open(dev)?.bytes().is_empty() {
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    Err(io::Error::other("the disk stayed empty"))
}

/// Creates a container: its directory, its root file system, the unpacked
/// image. Runs on a worker thread (unpacking takes a while).
pub fn create(root: &Path, req: &CreateContainer) -> Result<Container, AgentError> {
    let dir = root.join(&req.id);
    std::fs::create_dir_all(root).map_err(|e| internal(&format!("creating {}", root.display()), e))?;
    match std::fs::create_dir(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            return Err(err(ErrorKind::AlreadyExists, format!("container {} already exists", req.id)))
        }
        Err(e) => return Err(internal(&format!("creating {}", dir.display()), e)),
    }
    let rootfs = dir.join("rootfs");
    let result = (|| {
        std::fs::create_dir(&rootfs).map_err(|e| internal("creating the root directory", e))?;
        let upper = mount_rootfs(&rootfs, &req.rootfs)?;
        let stats = unpack::unpack_from_disk(Path::new(&req.layers.disk), &req.layers.layers, &rootfs, req.limits)
            .map_err(|e| err(ErrorKind::Image, e.to_string()))?;
        crate::log::debug(format_args!(
            "container {}: {} layers, {} entries, {} bytes",
            req.id, stats.layers, stats.entries, stats.bytes
        ));
        let passwd = read_in_root(&rootfs, c"etc/passwd");
        let group = read_in_root(&rootfs, c"etc/group");
        // Refuse a user that cannot be resolved now rather than at start.
        user::resolve(&req.config.user, &passwd, &group).map_err(|e| err(ErrorKind::BadRequest, e.to_string()))?;
        id_maps(&req.config)?;
        let seccomp = req.config.seccomp.as_ref().map(|p| compile_seccomp(p, &req.id)).transpose()?;
        Ok(Container {
            id: req.id.clone(),
            dir: dir.clone(),
            rootfs: rootfs.clone(),
            config: req.config.clone(),
            passwd,
            group,
            init_pid: None,
            init_pidfd: None,
            stopped: false,
            seccomp,
            copies: crate::copy::Copies::new(&dir),
            devpts: None,
            mnt_ns: None,
            ipc_ns: None,
            uts_ns: None,
            upper,
            changes: None,
        })
    })();
    if result.is_err() {
        remove_files(&dir, &rootfs);
    }
    result
}

/// Removes a container's root and directory (its processes are gone or
/// being killed: the root is detached, not waited for).
pub fn remove_files(dir: &Path, rootfs: &Path) {
    if let Ok(c) = cstring(rootfs.as_os_str().as_encoded_bytes()) {
        // A tmpfs: detaching it frees everything at once.
        let _ = sys::umount2(&c, libc::MNT_DETACH);
    }
    if std::fs::remove_dir(rootfs).is_err() {
        let _ = unpack::remove_tree(rootfs);
    }
    // An overlay root's disks (the layers go with them).
    for disk in [disk_dir(rootfs), upper_disk_dir(rootfs)] {
        if let Ok(c) = cstring(disk.as_os_str().as_encoded_bytes()) {
            if sys::umount2(&c, libc::MNT_DETACH).is_ok() {
                let _ = std::fs::remove_dir(&disk);
            }
        }
    }
    crate::copy::remove(dir);
    let _ = std::fs::remove_dir(dir);
}

fn rlimit_resource(name: &str) -> Option<libc::c_int> {
    let n = name.to_ascii_lowercase();
    let n = n.strip_prefix("rlimit_").unwrap_or(&n);
    Some(match n {
        "as" => libc::RLIMIT_AS,
        "core" => libc::RLIMIT_CORE,
        "cpu" => libc::RLIMIT_CPU,
        "data" => libc::RLIMIT_DATA,
        "fsize" => libc::RLIMIT_FSIZE,
        "locks" => libc::RLIMIT_LOCKS,
        "memlock" => libc::RLIMIT_MEMLOCK,
        "msgqueue" => libc::RLIMIT_MSGQUEUE,
        "nice" => libc::RLIMIT_NICE,
        "nofile" => libc::RLIMIT_NOFILE,
        "nproc" => libc::RLIMIT_NPROC,
        "rss" => libc::RLIMIT_RSS,
        "rtprio" => libc::RLIMIT_RTPRIO,
        "rttime" => libc::RLIMIT_RTTIME,
        "sigpending" => libc::RLIMIT_SIGPENDING,
        "stack" => libc::RLIMIT_STACK,
        _ => return None,
    } as libc::c_int)
}

fn rlimits(list: &[Rlimit]) -> Result<Vec<(libc::c_int, libc::rlimit)>, AgentError> {
    list.iter()
        .map(|r| {
            let res = rlimit_resource(&r.resource).ok_or_else(|| err(ErrorKind::BadRequest, format!("unknown rlimit {:?}", r.resource)))?;
            if r.soft > r.hard {
                return Err(err(ErrorKind::BadRequest, format!("rlimit {}: soft limit above hard limit", r.resource)));
            }
            Ok((res, libc::rlimit { rlim_cur: r.soft, rlim_max: r.hard }))
        })
        .collect()
}

fn c(s: &str) -> Result<CString, AgentError> {
    cstring(s).map_err(|_| err(ErrorKind::BadRequest, format!("{s:?} holds a NUL byte")))
}

fn abs(p: &str) -> Result<String, AgentError> {
    if !p.starts_with('/') {
        return Err(err(ErrorKind::BadRequest, format!("{p:?} is not an absolute path")));
    }
    Ok(p.to_string())
}

/// The container's devpts instance, made by the agent ([`sys::new_devpts`])
/// so that the terminals it opens there are the container's own, attached
/// on `/dev/pts`.
fn devpts_attach(devpts: BorrowedFd<'_>) -> Op {
    Op::Attach { tree: devpts.as_raw_fd(), target: c"/dev/pts".to_owned(), mkdirs: Vec::new(), file: false }
}

/// Gives `ct` a devpts instance of its own before its first process starts
/// (its terminal, and those of exec'd processes, come from it); without
/// one (a kernel without `fsopen`), the first process mounts a new
/// instance itself and terminals come from the agent's.
pub fn make_devpts(ct: &mut Container) {
    if ct.devpts.is_some() {
        return;
    }
    match sys::new_devpts() {
        Ok(fd) => ct.devpts = Some(fd),
        Err(e) => crate::log::error(format_args!("container {}: a devpts instance of its own: {e}", ct.id)),
    }
}

/// The file system setup of a new container, after `pivot_root`, in
/// runc's order: the standard mounts and device nodes, the configured
/// mounts (their destinations resolved in the image at `root`, created
/// when missing), the spec's device nodes, the root's propagation, the
/// kernel parameters, the root made read-only (after the working directory
/// `cwd` is made), the read-only and the masked paths. The container's
/// devpts instance, when the agent made one, is attached on `/dev/pts`.
///
/// Device nodes: `/dev` is a `nodev` tmpfs, and each node the container
/// may use (the standard ones, the spec's) is a file bound to a node the
/// agent made in a tree of its own (`trees.nodes`, [`device_tree`]),
/// attached below `/dev` for the time of the binds. A node the container
/// makes itself (root may, with `CAP_MKNOD`) cannot be opened anywhere:
/// what a device cgroup denies, without one (the guest kernel has no
/// cgroup BPF).
///
/// In a user namespace of its own (`trees.sys`), the container may not
/// mount a `sysfs` of the guest's network namespace: `/sys` is the
/// guest's, bound read-only, as runc does; `/proc` is made before
/// `pivot_root` ([`Op::Fresh`]).
fn setup_ops(
    config: &ImageConfig,
    root: &Path,
    cwd: &str,
    bind_sources: &[Option<OwnedFd>],
    devpts: Option<BorrowedFd<'_>>,
    trees: Trees,
) -> Result<Vec<Op>, AgentError> {
    let mounts = &config.mounts;
    let devices = device_nodes(&config.devices)?;
    let user_ns = trees.sys;
    let nosuid_dev_exec = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    let mount = |src: &CStr, target: &str, fstype: &CStr, flags, data: Option<&CStr>| -> Result<Op, AgentError> {
        Ok(Op::Mount {
            source: Some(src.to_owned()),
            target: c(target)?,
            fstype: Some(fstype.to_owned()),
            flags,
            data: data.map(CStr::to_owned),
            mkdirs: process::mkdirs_for(target).map_err(|e| internal("path", e))?,
        })
    };
    // runc's order: proc, the /dev tmpfs (and its nodes), devpts, shm,
    // mqueue, sysfs.
    let mut ops = vec![match user_ns {
        None => mount(c"proc", "/proc", c"proc", nosuid_dev_exec, None)?,
        Some(_) => Op::Fresh {
            fstype: c"proc".to_owned(),
            target: c"/proc".to_owned(),
            attrs: sys::MOUNT_ATTR_NOSUID | sys::MOUNT_ATTR_NODEV | sys::MOUNT_ATTR_NOEXEC,
            mkdirs: process::mkdirs_for("/proc").map_err(|e| internal("path", e))?,
            fd: std::sync::atomic::AtomicI32::new(-1),
        },
    }];
    ops.push(mount(c"tmpfs", "/dev", c"tmpfs", libc::MS_NOSUID | libc::MS_NODEV | libc::MS_STRICTATIME, Some(c"mode=755,size=65536k"))?);
    ops.push(Op::Mkdir { path: c(NODES)?, mode: 0o755 });
    ops.push(Op::Attach { tree: trees.nodes, target: c(NODES)?, mkdirs: Vec::new(), file: false });
    let bind_node = |rel: &str| -> Result<Op, AgentError> {
        let target = format!("/dev/{rel}");
        Ok(Op::BindNode { source: c(&format!("{NODES}/{rel}"))?, target: c(&target)?, mkdirs: process::mkdirs_for(&target).map_err(|e| internal("path", e))? })
    };
    for (name, _, _) in standard_nodes(config) {
        ops.push(bind_node(name)?);
    }
    ops.push(Op::Mkdir { path: c"/dev/pts".to_owned(), mode: 0o755 });
    ops.push(match devpts {
        Some(fd) => devpts_attach(fd),
        None => mount(c"devpts", "/dev/pts", c"devpts", libc::MS_NOSUID | libc::MS_NOEXEC, Some(c"newinstance,ptmxmode=0666,mode=0620,gid=5"))?,
    });
    ops.push(Op::Symlink { target: c"pts/ptmx".to_owned(), path: c"/dev/ptmx".to_owned() });
    ops.push(Op::Mkdir { path: c"/dev/shm".to_owned(), mode: 0o1777 });
    ops.push(mount(c"shm", "/dev/shm", c"tmpfs", nosuid_dev_exec, Some(c"mode=1777,size=65536k"))?);
    ops.push(Op::Mkdir { path: c"/dev/mqueue".to_owned(), mode: 0o755 });
    ops.push(mount(c"mqueue", "/dev/mqueue", c"mqueue", nosuid_dev_exec, None)?);
    match user_ns {
        None => ops.push(mount(c"sysfs", "/sys", c"sysfs", nosuid_dev_exec | libc::MS_RDONLY, None)?),
        Some(sys_tree) => {
            let mkdirs = process::mkdirs_for("/sys").map_err(|e| internal("path", e))?;
            ops.push(Op::Attach { tree: sys_tree, target: c"/sys".to_owned(), mkdirs, file: false });
            ops.push(Op::Remount { target: c"/sys".to_owned(), flags: libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY | nosuid_dev_exec });
        }
    }
    for (name, target) in [("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")] {
        ops.push(Op::Symlink { target: c(target)?, path: c(&format!("/dev/{name}"))? });
    }
    // Mount points the container has before each configured mount: the
    // image's links below them are not followed.
    let mut covered: Vec<String> = ["/proc", "/dev", "/sys"].map(String::from).to_vec();
    for (m, src) in mounts.iter().zip(bind_sources) {
        let dest = crate::paths::resolve_in_root(root, &abs(&m.destination)?, &covered);
        covered.push(dest.clone());
        let mut flags: libc::c_ulong = 0;
        let mut data = Vec::new();
        let mut readonly = false;
        for o in &m.options {
            match o.as_str() {
                "ro" => readonly = true,
                "rw" => {}
                "nosuid" => flags |= libc::MS_NOSUID,
                "nodev" => flags |= libc::MS_NODEV,
                "noexec" => flags |= libc::MS_NOEXEC,
                "rbind" => flags |= libc::MS_BIND | libc::MS_REC,
                "bind" => flags |= libc::MS_BIND,
                other => data.push(other.to_string()),
            }
        }
        // Devices only in the container's own /dev: every other mount is
        // nodev (a devpts mount holds only terminals, which the default
        // device set allows).
        if m.fstype != "devpts" {
            flags |= libc::MS_NODEV;
        }
        let mkdirs = process::mkdirs_for(&dest).map_err(|e| internal("path", e))?;
        if let Some(fd) = src {
            // The source was mounted or opened in the agent's view and
            // cloned as a detached tree (before the child had a namespace
            // of its own): attach it, then set its flags (a bind remount
            // sets them all: a volume keeps the nosuid it was mounted with).
            ops.push(Op::Attach { tree: fd.as_raw_fd(), target: c(&dest)?, mkdirs, file: !is_dir_tree(fd) });
            let mut keep = flags & (libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC) | libc::MS_NODEV;
            if is_volume_disk(m) {
                keep |= libc::MS_NOSUID;
            }
            ops.push(Op::Remount { target: c(&dest)?, flags: libc::MS_REMOUNT | libc::MS_BIND | keep | if readonly { libc::MS_RDONLY } else { 0 } });
        } else {
            ops.push(Op::Mount {
                source: Some(c(if m.source.is_empty() { &m.fstype } else { &m.source })?),
                target: c(&dest)?,
                fstype: Some(c(&m.fstype)?),
                flags: flags | if readonly { libc::MS_RDONLY } else { 0 },
                data: if data.is_empty() { None } else { Some(c(&data.join(","))?) },
                mkdirs,
            });
        }
    }
    for d in &devices {
        ops.push(bind_node(&d.rel)?);
    }
    ops.push(Op::Unmount { target: c(NODES)? });
    if let Some(p) = config.rootfs_propagation {
        ops.push(Op::Remount { target: c"/".to_owned(), flags: propagation_flags(p) });
    }
    for (key, value) in &config.sysctl {
        vmrun_agent_protocol::sysctl_namespace(key).map_err(|e| err(ErrorKind::BadRequest, e.to_string()))?;
        let path = format!("/proc/sys/{}", vmrun_agent_protocol::sysctl_path(key));
        ops.push(Op::Write { path: c(&path)?, data: value.as_bytes().to_vec() });
    }
    if config.readonly_rootfs {
        let cwd = crate::paths::resolve_in_root(root, &abs(cwd)?, &covered);
        for dir in process::mkdirs_for(&cwd).map_err(|e| internal("path", e))? {
            ops.push(Op::Mkdir { path: dir, mode: 0o755 });
        }
        ops.push(Op::Remount { target: c"/".to_owned(), flags: libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY | ROOTFS_FLAGS });
    }
    for p in &config.readonly_paths {
        ops.push(Op::ReadOnly { path: c(&crate::paths::resolve_in_root(root, &abs(p)?, &covered))? });
    }
    for p in &config.masked_paths {
        ops.push(Op::Mask { path: c(&crate::paths::resolve_in_root(root, &abs(p)?, &covered))? });
    }
    Ok(ops)
}

/// The standard device nodes a container's `/dev` gets (name, major,
/// minor), less those the spec gives itself (its own node takes the
/// place, as in runc).
fn standard_nodes(config: &ImageConfig) -> impl Iterator<Item = (&'static str, u32, u32)> + '_ {
    [("null", 1, 3), ("zero", 1, 5), ("full", 1, 7), ("random", 1, 8), ("urandom", 1, 9), ("tty", 5, 0)]
        .into_iter()
        .filter(|(name, _, _)| !config.devices.iter().any(|d| d.path.strip_prefix("/dev/") == Some(name)))
}

/// Where the agent's tree of device nodes is attached in the container
/// while they are bound (see [`setup_ops`]).
const NODES: &str = "/dev/.vmrun-nodes";

/// The detached trees the container's setup attaches (descriptors the
/// plan holds).
#[derive(Debug, Clone, Copy)]
struct Trees {
    /// The device nodes ([`device_tree`]).
    nodes: RawFd,
    /// The guest's `/sys` for a container in a user namespace of its own;
    /// `None` without one.
    sys: Option<RawFd>,
}

/// The user namespace's maps of a container's configuration, checked:
/// `None` without one.
fn id_maps(config: &ImageConfig) -> Result<Option<process::IdMaps>, AgentError> {
    let (uids, gids) = (&config.uid_mappings, &config.gid_mappings);
    if uids.is_empty() && gids.is_empty() {
        return Ok(None);
    }
    let text = |what: &str, map: &[IdMapping]| -> Result<String, AgentError> {
        vmrun_agent_protocol::check_user_ns_map(map).map_err(|e| err(ErrorKind::BadRequest, format!("user namespace: {what}: {e}")))?;
        Ok(map.iter().map(|m| format!("{} {} {}\n", m.container_id, m.host_id, m.size)).collect())
    };
    Ok(Some(process::IdMaps { uid_map: text("the uid map", uids)?, gid_map: text("the gid map", gids)? }))
}

/// The guest's id of a container's id, for a node the agent makes.
fn guest_id(map: &[IdMapping], id: u32, what: &str) -> Result<u32, AgentError> {
    vmrun_agent_protocol::map_id(map, id).ok_or_else(|| err(ErrorKind::BadRequest, format!("{what} {id} is not in the user namespace's map")))
}

/// The device nodes a container may use, made by the agent in a detached
/// tmpfs of their own (not `nodev`): the standard ones and the spec's,
/// with the spec's owners (the guest's ids of them in a user namespace).
fn device_tree(config: &ImageConfig) -> Result<OwnedFd, AgentError> {
    let (uids, gids) = (&config.uid_mappings, &config.gid_mappings);
    let user_ns = !uids.is_empty();
    let guest = |map: &[IdMapping], id: u32, what: &str| if user_ns { guest_id(map, id, what) } else { Ok(id) };
    let (root_uid, root_gid) = (guest(uids, 0, "uid")?, guest(gids, 0, "gid")?);
    // Few system calls: each costs much where guest kernel mode is
    // emulated (the tree is never seen in a mount table, and holds a few
    // empty nodes).
    let tree = sys::new_mount(c"tmpfs", &[(c"mode", c"755")], sys::MOUNT_ATTR_NOSUID | sys::MOUNT_ATTR_NOEXEC).map_err(|e| internal("device nodes", e))?;
    let node = |rel: &str, mode: u32, rdev: u64, uid: u32, gid: u32| -> Result<(), AgentError> {
        let made = |e| internal(&format!("device node /dev/{rel}"), e);
        let mut parent = String::new();
        let parts: Vec<&str> = rel.split('/').collect();
        for dir in &parts[..parts.len() - 1] {
            parent.push_str(dir);
            match sys::mkdirat(tree.as_fd(), &c(&parent)?, 0o755) {
                Ok(()) => sys::lchownat(tree.as_fd(), &c(&parent)?, root_uid, root_gid).map_err(made)?,
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
                Err(e) => return Err(made(e)),
            }
            parent.push('/');
        }
        let path = c(rel)?;
        // The agent's umask is 0 and it is root: the mode is exact, and
        // root's nodes need no chown.
        sys::mknodat(tree.as_fd(), &path, mode, rdev).map_err(made)?;
        if (uid, gid) != (0, 0) {
            sys::lchownat(tree.as_fd(), &path, uid, gid).map_err(made)?;
        }
        Ok(())
    };
    for (name, major, minor) in standard_nodes(config) {
        node(name, libc::S_IFCHR | 0o666, libc::makedev(major, minor), root_uid, root_gid)?;
    }
    for d in device_nodes(&config.devices)? {
        node(&d.rel, d.mode, d.dev, guest(uids, d.uid, "device owner")?, guest(gids, d.gid, "device group")?)?;
    }
    Ok(tree)
}

/// Whether a detached tree (from `open_tree`) is a directory.
fn is_dir_tree(fd: &OwnedFd) -> bool {
    // SAFETY: all-zero is a valid `stat`; the kernel fills it in.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat of a descriptor we hold, into a writable `stat`.
    let r = unsafe { libc::fstat(fd.as_raw_fd(), &mut st) };
    r == 0 && st.st_mode & libc::S_IFMT == libc::S_IFDIR
}

/// The `mount(2)` flags of a propagation.
fn propagation_flags(p: Propagation) -> libc::c_ulong {
    match p {
        Propagation::Private => libc::MS_PRIVATE,
        Propagation::Rprivate => libc::MS_PRIVATE | libc::MS_REC,
        Propagation::Slave => libc::MS_SLAVE,
        Propagation::Rslave => libc::MS_SLAVE | libc::MS_REC,
        Propagation::Shared => libc::MS_SHARED,
        Propagation::Rshared => libc::MS_SHARED | libc::MS_REC,
        Propagation::Unbindable => libc::MS_UNBINDABLE,
        Propagation::Runbindable => libc::MS_UNBINDABLE | libc::MS_REC,
    }
}

/// A device node of the spec, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Node {
    /// Its path under `/dev/`.
    rel: String,
    /// File type and permission bits.
    mode: u32,
    /// Device number.
    dev: u64,
    /// Owner, in the container.
    uid: u32,
    /// Group, in the container.
    gid: u32,
}

/// The spec's device nodes, checked. They go in the container's own
/// `/dev` (bound there from the agent's nodes), so a path elsewhere is
/// refused.
fn device_nodes(devices: &[Device]) -> Result<Vec<Node>, AgentError> {
    devices
        .iter()
        .map(|d| {
            let under_dev = d.path.strip_prefix("/dev/").is_some_and(|rest| rest.split('/').all(|p| !p.is_empty() && p != "." && p != ".."));
            if !under_dev {
                return Err(err(ErrorKind::BadRequest, format!("device {:?}: a device node must be under /dev/ (the rest of the container is nodev)", d.path)));
            }
            let kind = match d.kind {
                DeviceKind::Char => libc::S_IFCHR,
                DeviceKind::Block => libc::S_IFBLK,
                DeviceKind::Fifo => libc::S_IFIFO,
            };
            let perm = d.file_mode.unwrap_or(0o666);
            if perm & !0o7777 != 0 {
                return Err(err(ErrorKind::BadRequest, format!("device {}: file mode {perm:#o} has bits other than permissions", d.path)));
            }
            let dev = if d.kind == DeviceKind::Fifo { 0 } else { libc::makedev(d.major, d.minor) };
            c(&d.path)?;
            Ok(Node { rel: d.path["/dev/".len()..].to_string(), mode: kind | perm, dev, uid: d.uid.unwrap_or(0), gid: d.gid.unwrap_or(0) })
        })
        .collect()
}

/// Detached copies of the sources of bind mounts and volumes (made in the
/// agent's view) for the child to attach.
pub fn open_bind_sources(mounts: &[Mount]) -> Result<Vec<Option<OwnedFd>>, AgentError> {
    mounts
        .iter()
        .map(|m| {
            let bind = m.fstype == "bind" || m.options.iter().any(|o| o == "bind" || o == "rbind");
            if is_volume_disk(m) {
                return mount_volume_disk(m).map(Some);
            }
            if !bind {
                return Ok(None);
            }
            let recursive = m.fstype == "rbind" || m.options.iter().any(|o| o == "rbind");
            sys::clone_tree(&c(&m.source)?, recursive)
                .map(Some)
                .map_err(|e| err(ErrorKind::BadRequest, format!("bind mount source {}: {e}", m.source)))
        })
        .collect()
}

/// Whether a mount is of a disk the host attached (`/dev/vdX` with a disk
/// file system), made by the agent and bound into the container.
fn is_volume_disk(m: &Mount) -> bool {
    let dev = m.source.strip_prefix("/dev/vd").unwrap_or_default();
    !dev.is_empty() && dev.chars().all(|c| c.is_ascii_lowercase()) && matches!(m.fstype.as_str(), "ext4" | "ext3" | "ext2")
}

/// Mounts a volume disk in the agent's own view and opens it for the
/// child to bind. A VM restored from a snapshot gets its disks in place of
/// the template's empty placeholders: the device's cached pages are
/// dropped and its new size awaited (the host announced the change).
fn mount_volume_disk(m: &Mount) -> Result<OwnedFd, AgentError> {
    let dir = mount_disk(m)?;
    sys::clone_tree(&c(&dir)?, false).map_err(|e| err(ErrorKind::BadRequest, format!("volume {} on {}: open_tree: {e}", m.source, m.destination)))
}

/// Mounts the volume disk of `m` in the agent's own view; returns where.
fn mount_disk(m: &Mount) -> Result<String, AgentError> {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let bad = |what: &str, e: std::io::Error| err(ErrorKind::BadRequest, format!("volume {} on {}: {what}: {e}", m.source, m.destination));
    let dev = c(&m.source)?;
    wait_for_disk(&dev).map_err(|e| bad("open", e))?;
    let dir = format!("/run/vmrun-volumes/{}", NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
    std::fs::create_dir_all(&dir).map_err(|e| bad("staging directory", e))?;
    let readonly = m.options.iter().any(|o| o == "ro");
    let flags = libc::MS_NOSUID | libc::MS_NODEV | if readonly { libc::MS_RDONLY } else { 0 };
    sys::mount(Some(&dev), &c(&dir)?, Some(&c(&m.fstype)?), flags, None).map_err(|e| bad("mount", e))?;
    Ok(dir)
}

// ---- Directories on a volume disk ----

/// The bind mounts of `config.disk_dirs`: each disk is mounted once in the
/// agent's view (read-write: one disk's directories may be bound
/// read-only and read-write; the mount is `nosuid,nodev`), and each
/// directory of it is bound at its destination.
pub fn disk_dir_mounts(dirs: &[vmrun_agent_protocol::DiskDir]) -> Result<Vec<Mount>, AgentError> {
    let mut mounted: Vec<(String, String)> = Vec::new();
    let mut out = Vec::new();
    for d in dirs {
        crate::copy::check_path(&d.subdir)?;
        if d.subdir.is_empty() || d.subdir.contains('/') || !is_host_disk(&d.disk) {
            return Err(err(ErrorKind::BadRequest, format!("disk directory {:?} on {}: a plain name on a /dev/vdX disk", d.subdir, d.disk)));
        }
        let at = match mounted.iter().find(|(disk, _)| *disk == d.disk) {
            Some((_, at)) => at.clone(),
            None => {
                let m = Mount { destination: d.destination.clone(), fstype: d.fstype.clone(), source: d.disk.clone(), options: Vec::new() };
                if !is_volume_disk(&m) {
                    return Err(err(ErrorKind::BadRequest, format!("disk {} of type {:?} is not a volume disk", d.disk, d.fstype)));
                }
                let at = mount_disk(&m)?;
                mounted.push((d.disk.clone(), at.clone()));
                at
            }
        };
        let mut options = vec!["bind".to_string(), "nosuid".into(), "nodev".into()];
        if d.read_only {
            options.push("ro".into());
        }
        out.push(Mount { destination: d.destination.clone(), fstype: "bind".into(), source: format!("{at}/{}", d.subdir), options });
    }
    Ok(out)
}

fn env_name(e: &str) -> &str {
    e.split_once('=').map_or(e, |(n, _)| n)
}

/// Merges environments: later entries replace earlier ones of the same name.
pub fn merge_env(base: &[String], extra: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(base.len() + extra.len());
    for e in base.iter().chain(extra) {
        if let Some(i) = out.iter().position(|o| env_name(o) == env_name(e)) {
            out[i] = e.clone();
        } else {
            out.push(e.clone());
        }
    }
    out
}

/// What to run: the program, its environment, where, as whom.
#[derive(Debug)]
pub struct ProcessSpec {
    /// argv.
    pub args: Vec<String>,
    /// Environment (without the defaults added here).
    pub env: Vec<String>,
    /// Working directory.
    pub cwd: String,
    /// Identity.
    pub id: Identity,
    /// Whether it gets a terminal.
    pub tty: bool,
    /// Capability sets.
    pub caps: CapSets,
    /// Whether it gets `no_new_privs`.
    pub no_new_privs: bool,
    /// Its seccomp filter.
    pub seccomp: Option<Filter>,
    /// Its `oom_score_adj`, when set.
    pub oom_score_adj: Option<i32>,
}

/// What a process runs (see [`Container::exec_parts`]).
#[derive(Debug)]
pub struct ExecParts {
    /// Where `execve` is tried, in order.
    pub candidates: Vec<CString>,
    /// argv.
    pub argv: Vec<CString>,
    /// envp.
    pub envp: Vec<CString>,
    /// Working directory.
    pub cwd: CString,
    /// Directories made, top down, when `cwd` is missing.
    pub cwd_mkdirs: Vec<CString>,
}

/// Compiles the seccomp profile of a process of container `id`; a profile
/// that cannot be is a bad request. Names that are not system calls are
/// left out, and logged.
fn compile_seccomp(profile: &SeccompProfile, id: &str) -> Result<Filter, AgentError> {
    let filter = seccomp::compile(profile).map_err(|e| err(ErrorKind::BadRequest, e.to_string()))?;
    if !filter.unknown().is_empty() {
        crate::log::info(format_args!("container {id}: seccomp: unknown system calls left out: {}", filter.unknown().join(", ")));
    }
    Ok(filter)
}

/// An `oom_score_adj` the kernel takes (-1000 to 1000).
fn oom_score_adj(v: Option<i32>) -> Result<Option<i32>, AgentError> {
    match v {
        Some(n) if !(-1000..=1000).contains(&n) => Err(err(ErrorKind::BadRequest, format!("oom_score_adj {n} is not within -1000 and 1000"))),
        v => Ok(v),
    }
}

/// The capability sets and `no_new_privs` of a process: what it asks for,
/// else what the container was created with, else docker's default
/// capabilities and `no_new_privs`.
fn privileges(
    config: &ImageConfig,
    caps: Option<&Capabilities>,
    no_new_privs: Option<bool>,
    id: &Identity,
) -> Result<(CapSets, bool), AgentError> {
    let default;
    let caps = match caps.or(config.capabilities.as_ref()) {
        Some(c) => c,
        None => {
            default = Capabilities::docker_default(id.uid == 0);
            &default
        }
    };
    let sets = CapSets::new(caps, caps::kernel_last_cap()).map_err(|e| err(ErrorKind::BadRequest, e.to_string()))?;
    Ok((sets, no_new_privs.or(config.no_new_privileges).unwrap_or(true)))
}

impl Container {
    /// The host name.
    pub fn hostname(&self) -> String {
        if self.config.hostname.is_empty() {
            self.id.chars().take(63).collect()
        } else {
            self.config.hostname.clone()
        }
    }

    /// The container's own process.
    /// The container's own process, with `overrides` (arguments when not
    /// empty, extra environment, working directory, user) applied to what
    /// it was created with.
    pub fn init_spec(&self, tty: bool, overrides: Option<&vmrun_agent_protocol::ExecProcess>) -> Result<ProcessSpec, AgentError> {
        let mut args: Vec<String> = self.config.entrypoint.iter().chain(&self.config.cmd).cloned().collect();
        let mut env = self.config.env.clone();
        let mut user_spec = self.config.user.as_str();
        let mut working_dir = self.config.working_dir.as_str();
        let (mut caps, mut no_new_privs, mut seccomp) = (None, None, self.seccomp.clone());
        let mut additional_gids = self.config.additional_gids.as_deref();
        let mut oom = self.config.oom_score_adj;
        if let Some(o) = overrides {
            caps = o.capabilities.as_ref();
            no_new_privs = o.no_new_privileges;
            additional_gids = o.additional_gids.as_deref().or(additional_gids);
            oom = o.oom_score_adj.or(oom);
            if let Some(p) = &o.seccomp {
                seccomp = Some(compile_seccomp(p, &self.id)?);
            }
            if !o.args.is_empty() {
                args = o.args.clone();
            }
            env = merge_env(&env, &o.env);
            if let Some(u) = &o.user {
                user_spec = u;
            }
            if let Some(w) = &o.working_dir {
                working_dir = w;
            }
        }
        if args.is_empty() {
            return Err(err(ErrorKind::BadRequest, "no command: the image has no entrypoint or cmd, and none was given"));
        }
        let id = user::resolve_with(user_spec, &self.passwd, &self.group, additional_gids).map_err(|e| err(ErrorKind::BadRequest, e.to_string()))?;
        let cwd = if working_dir.is_empty() { "/".to_string() } else { abs(working_dir)? };
        let (caps, no_new_privs) = privileges(&self.config, caps, no_new_privs, &id)?;
        Ok(ProcessSpec { args, env, cwd, id, tty, caps, no_new_privs, seccomp, oom_score_adj: oom_score_adj(oom)? })
    }

    /// Another process in this container.
    pub fn exec_spec(&self, p: &vmrun_agent_protocol::ExecProcess, tty: bool) -> Result<ProcessSpec, AgentError> {
        if p.args.is_empty() {
            return Err(err(ErrorKind::BadRequest, "exec: no command"));
        }
        let user_spec = p.user.as_deref().unwrap_or(&self.config.user);
        let additional_gids = p.additional_gids.as_deref().or(self.config.additional_gids.as_deref());
        let id = user::resolve_with(user_spec, &self.passwd, &self.group, additional_gids).map_err(|e| err(ErrorKind::BadRequest, e.to_string()))?;
        let cwd = match &p.working_dir {
            Some(w) => abs(w)?,
            None if self.config.working_dir.is_empty() => "/".into(),
            None => abs(&self.config.working_dir)?,
        };
        let (caps, no_new_privs) = privileges(&self.config, p.capabilities.as_ref(), p.no_new_privileges, &id)?;
        let seccomp = match &p.seccomp {
            Some(profile) => Some(compile_seccomp(profile, &self.id)?),
            None => self.seccomp.clone(),
        };
        let oom_score_adj = oom_score_adj(p.oom_score_adj.or(self.config.oom_score_adj))?;
        Ok(ProcessSpec { args: p.args.clone(), env: merge_env(&self.config.env, &p.env), cwd, id, tty, caps, no_new_privs, seccomp, oom_score_adj })
    }

    /// What a process of this container runs: its program's `PATH`
    /// candidates, argv, envp (with the defaults added), working directory
    /// and the directories above it.
    pub fn exec_parts(&self, spec: &ProcessSpec) -> Result<ExecParts, AgentError> {
        let mut env = spec.env.clone();
        let has = |env: &[String], n: &str| env.iter().any(|e| env_name(e) == n);
        if !has(&env, "PATH") {
            env.push(format!("PATH={DEFAULT_PATH}"));
        }
        if !has(&env, "HOSTNAME") {
            env.push(format!("HOSTNAME={}", self.hostname()));
        }
        if !has(&env, "HOME") {
            env.push(format!("HOME={}", spec.id.home));
        }
        if spec.tty && !has(&env, "TERM") {
            env.push("TERM=xterm".into());
        }
        let path = env.iter().find_map(|e| e.strip_prefix("PATH=")).unwrap_or(DEFAULT_PATH);
        Ok(ExecParts {
            candidates: process::candidates(&spec.args[0], path).map_err(|e| err(ErrorKind::BadRequest, e.to_string()))?,
            argv: spec.args.iter().map(|a| c(a)).collect::<Result<_, _>>()?,
            envp: env.iter().map(|e| c(e)).collect::<Result<_, _>>()?,
            cwd: c(&spec.cwd)?,
            cwd_mkdirs: process::mkdirs_for(&spec.cwd).map_err(|e| internal("path", e))?,
        })
    }

    /// The plan for a process of this container.
    pub fn plan(
        &self,
        spec: &ProcessSpec,
        stdio: ChildStdio,
        enter_existing: Option<(i32, i32)>,
        join: Option<process::Join>,
        bind_sources: &[Option<OwnedFd>],
    ) -> Result<Plan, AgentError> {
        let ExecParts { candidates, argv, envp, cwd, cwd_mkdirs } = self.exec_parts(spec)?;
        let user_ns = id_maps(&self.config)?;
        if user_ns.is_some() {
            guest_id(&self.config.uid_mappings, spec.id.uid, "user")?;
            for g in std::iter::once(&spec.id.gid).chain(&spec.id.groups) {
                guest_id(&self.config.gid_mappings, *g, "group")?;
            }
        }
        let mut keep = Vec::new();
        let enter = match enter_existing {
            Some((pidfd, own_pidfd)) => Enter::Existing { pidfd, own_pidfd },
            None => {
                let nodes = device_tree(&self.config)?;
                let sys_tree = match user_ns {
                    Some(_) => Some(sys::clone_tree(c"/sys", true).map_err(|e| internal("the guest's /sys", e))?),
                    None => None,
                };
                let trees = Trees { nodes: nodes.as_raw_fd(), sys: sys_tree.as_ref().map(AsRawFd::as_raw_fd) };
                let devpts = self.devpts.as_ref().map(AsFd::as_fd);
                let ops = setup_ops(&self.config, &self.rootfs, &spec.cwd, bind_sources, devpts, trees)?;
                keep.push(nodes);
                keep.extend(sys_tree);
                Enter::New {
                    rootfs: cstring(self.rootfs.as_os_str().as_encoded_bytes()).map_err(|e| internal("rootfs", e))?,
                    ops,
                    hostname: c(&self.hostname())?,
                    join,
                }
            }
        };
        Ok(Plan {
            enter,
            stdio,
            candidates,
            argv,
            envp,
            cwd,
            cwd_mkdirs,
            uid: spec.id.uid,
            gid: spec.id.gid,
            groups: spec.id.groups.clone(),
            rlimits: rlimits(&self.config.rlimits)?,
            caps: spec.caps,
            no_new_privs: spec.no_new_privs,
            seccomp: spec.seccomp.clone(),
            oom_score_adj: spec.oom_score_adj.map(|v| v.to_string()),
            cgroup: None,
            gate: None,
            user_ns,
            keep,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Trees for plans that are only looked at.
    const NO_TREES: Trees = Trees { nodes: -1, sys: None };

    #[test]
    fn env_merging_replaces_by_name() {
        let base = vec!["PATH=/bin".to_string(), "A=1".to_string()];
        let out = merge_env(&base, &["A=2".to_string(), "B=3".to_string()]);
        assert_eq!(out, vec!["PATH=/bin", "A=2", "B=3"]);
    }

    #[test]
    fn rlimit_names() {
        assert_eq!(rlimit_resource("nofile"), Some(libc::RLIMIT_NOFILE as libc::c_int));
        assert_eq!(rlimit_resource("RLIMIT_NPROC"), Some(libc::RLIMIT_NPROC as libc::c_int));
        assert_eq!(rlimit_resource("bogus"), None);
        assert!(rlimits(&[Rlimit { resource: "nofile".into(), soft: 10, hard: 5 }]).is_err());
    }

    #[test]
    fn host_disks_are_vd_devices() {
        assert!(is_host_disk("/dev/vdb") && is_host_disk("/dev/vdaa"));
        assert!(!is_host_disk("/dev/vd") && !is_host_disk("/dev/sda") && !is_host_disk("/dev/vdb1") && !is_host_disk("tmpfs"));
    }

    #[test]
    fn devices_only_in_the_containers_own_dev() {
        let mounts = [
            Mount { destination: "/run".into(), fstype: "tmpfs".into(), source: "tmpfs".into(), options: vec!["nosuid".into()] },
            Mount { destination: "/data".into(), fstype: "ext4".into(), source: "/dev/vdb".into(), options: vec!["ro".into()] },
            Mount { destination: "/mnt".into(), fstype: "bind".into(), source: "/srv".into(), options: vec!["rbind".into()] },
            Mount { destination: "/ptys".into(), fstype: "devpts".into(), source: "devpts".into(), options: vec!["newinstance".into()] },
        ];
        let (r, w) = sys::pipe(0).unwrap();
        let sources = [None, Some(r), Some(w), None];
        let config = ImageConfig { mounts: mounts.to_vec(), ..Default::default() };
        let ops = setup_ops(&config, Path::new("/nonexistent"), "/", &sources, None, NO_TREES).unwrap();
        let mut attached = 0;
        for (i, op) in ops.iter().enumerate() {
            match op {
                Op::Mount { fstype, flags, .. } => {
                    // Even the container's /dev: its nodes are bound there.
                    assert_eq!(flags & libc::MS_NODEV == 0, fstype.as_deref() == Some(c"devpts"), "{}", op.describe());
                }
                Op::Attach { target, .. } if target.to_str() == Ok(NODES) => {
                    // The agent's nodes, attached for their binds only.
                    assert!(ops[i + 1..].iter().any(|o| matches!(o, Op::Unmount { target: t } if t == target)), "{NODES} stays");
                }
                Op::Attach { target, .. } => {
                    attached += 1;
                    let Some(Op::Remount { target: t, flags }) = ops.get(i + 1) else { panic!("{} is not remounted", op.describe()) };
                    assert!(t == target && flags & libc::MS_NODEV != 0, "{}", op.describe());
                }
                Op::BindNode { source, target, .. } => {
                    let rel = target.to_str().unwrap().strip_prefix("/dev/").unwrap();
                    assert_eq!(source.to_str().unwrap(), format!("{NODES}/{rel}"));
                }
                _ => {}
            }
        }
        assert_eq!(attached, 2);
        assert_eq!(ROOTFS_FLAGS & libc::MS_NODEV, libc::MS_NODEV);
    }

    #[test]
    fn standard_mounts_in_runcs_order() {
        let ops = setup_ops(&ImageConfig::default(), Path::new("/nonexistent"), "/", &[], None, NO_TREES).unwrap();
        let mounts: Vec<(&str, &str, libc::c_ulong)> = ops
            .iter()
            .filter_map(|op| match op {
                Op::Mount { target, fstype, flags, .. } => Some((target.to_str().unwrap(), fstype.as_deref().unwrap().to_str().unwrap(), *flags)),
                _ => None,
            })
            .collect();
        let order: Vec<(&str, &str)> = mounts.iter().map(|(t, f, _)| (*t, *f)).collect();
        assert_eq!(
            order,
            [("/proc", "proc"), ("/dev", "tmpfs"), ("/dev/pts", "devpts"), ("/dev/shm", "tmpfs"), ("/dev/mqueue", "mqueue"), ("/sys", "sysfs")]
        );
        let all = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
        assert_eq!(mounts[4].2 & all, all, "mqueue is nosuid,nodev,noexec");
    }

    #[test]
    fn privileges_default_to_dockers_and_no_new_privs() {
        let root = Identity { uid: 0, gid: 0, groups: vec![], home: "/root".into() };
        let alice = Identity { uid: 1000, gid: 1000, groups: vec![], home: "/home/alice".into() };
        let config = ImageConfig::default();
        let (c, nnp) = privileges(&config, None, None, &root).unwrap();
        assert_eq!((c.bounding, c.effective, c.permitted, c.inheritable, c.ambient, nnp), (0xa80425fb, 0xa80425fb, 0xa80425fb, 0, 0, true));
        let (c, _) = privileges(&config, None, None, &alice).unwrap();
        assert_eq!((c.bounding, c.effective, c.permitted), (0xa80425fb, 0, 0));
        // The container's own, then the process's.
        let own = Capabilities { bounding: vec!["CAP_KILL".into()], ..Default::default() };
        let config = ImageConfig { capabilities: Some(own), no_new_privileges: Some(false), ..Default::default() };
        let (c, nnp) = privileges(&config, None, None, &root).unwrap();
        assert_eq!((c.bounding, c.effective, nnp), (1 << 5, 0, false));
        let asked = Capabilities { bounding: vec!["CAP_CHOWN".into()], ..Default::default() };
        let (c, nnp) = privileges(&config, Some(&asked), Some(true), &root).unwrap();
        assert_eq!((c.bounding, nnp), (1, true));
        let bad = Capabilities { bounding: vec!["CAP_NOPE".into()], ..Default::default() };
        let e = privileges(&config, Some(&bad), None, &root).unwrap_err();
        assert!(e.kind == ErrorKind::BadRequest && e.message.contains("CAP_NOPE"), "{e}");
    }

    #[test]
    fn setup_refuses_relative_mount_targets() {
        let m = Mount { destination: "data".into(), fstype: "tmpfs".into(), source: String::new(), options: vec![] };
        let config = ImageConfig { mounts: vec![m], ..Default::default() };
        assert!(setup_ops(&config, Path::new("/nonexistent"), "/", &[None], None, NO_TREES).is_err());
    }

    #[test]
    fn the_specs_linux_settings_in_runcs_order() {
        use std::collections::BTreeMap;
        let dev = |path: &str, kind| Device { path: path.into(), kind, major: 10, minor: 200, file_mode: None, uid: Some(7), gid: None };
        let config = ImageConfig {
            devices: vec![dev("/dev/net/tun", DeviceKind::Char), dev("/dev/null", DeviceKind::Char), dev("/dev/fifo", DeviceKind::Fifo)],
            rootfs_propagation: Some(Propagation::Rslave),
            sysctl: BTreeMap::from([("kernel.shmmax".to_string(), "4096".to_string())]),
            readonly_rootfs: true,
            readonly_paths: vec!["/proc/sys".into()],
            masked_paths: vec!["/proc/kcore".into()],
            ..Default::default()
        };
        let ops = setup_ops(&config, Path::new("/nonexistent"), "/work/dir", &[], None, NO_TREES).unwrap();
        let described: Vec<String> = ops.iter().map(Op::describe).collect();
        let at = |what: &str| described.iter().position(|d| d == what).unwrap_or_else(|| panic!("no {what} in {described:?}"));
        // The spec's /dev/null replaces the standard one.
        assert_eq!(described.iter().filter(|d| *d == "device node /dev/null").count(), 1);
        let order = ["device node /dev/zero", "mount sysfs on /sys", "device node /dev/net/tun", "device node /dev/null", "device node /dev/fifo",
            "unmount /dev/.vmrun-nodes", "remount /", "writing /proc/sys/kernel/shmmax", "mkdir /work/dir", "read-only path /proc/sys",
            "masked path /proc/kcore"];
        let positions: Vec<usize> = order.iter().map(|w| at(w)).collect();
        assert!(positions.windows(2).all(|w| w[0] < w[1]), "{described:?}");
        let remounts: Vec<libc::c_ulong> = ops.iter().filter_map(|o| if let Op::Remount { flags, .. } = o { Some(*flags) } else { None }).collect();
        assert_eq!(remounts, [libc::MS_SLAVE | libc::MS_REC, libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY | ROOTFS_FLAGS]);
        let nodes = device_nodes(&config.devices).unwrap();
        let node = |rel: &str, mode, dev, uid, gid| Node { rel: rel.into(), mode, dev, uid, gid };
        assert_eq!(nodes[0], node("net/tun", libc::S_IFCHR | 0o666, libc::makedev(10, 200), 7, 0));
        assert_eq!(nodes[2], node("fifo", libc::S_IFIFO | 0o666, 0, 7, 0));

        // Refused: nodes outside /dev, kernel parameters of the whole kernel.
        for path in ["/etc/tun", "/dev/../etc/x", "/dev/", "/devx"] {
            let c = ImageConfig { devices: vec![dev(path, DeviceKind::Block)], ..Default::default() };
            let e = setup_ops(&c, Path::new("/nonexistent"), "/", &[], None, NO_TREES).unwrap_err();
            assert!(e.kind == ErrorKind::BadRequest && e.message.contains("under /dev/"), "{path}: {e}");
        }
        let c = ImageConfig { sysctl: BTreeMap::from([("kernel.panic".to_string(), "1".to_string())]), ..Default::default() };
        let e = setup_ops(&c, Path::new("/nonexistent"), "/", &[], None, NO_TREES).unwrap_err();
        assert!(e.kind == ErrorKind::BadRequest && e.message.contains("not in a separate kernel namespace"), "{e}");
    }
}
