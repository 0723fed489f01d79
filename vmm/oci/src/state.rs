//! A container's state on the host: `<root>/<id>/` (runc's `--root`).
//!
//! ```text
//! state.json          State: written atomically by `create`, then only by
//!                     the supervisor that owns the VM
//! plan.json           what `create` made of the bundle (bundle::Plan)
//! exec.fifo           the supervisor waits on it until `start` opens it
//! vmrun-oci.log       the supervisors' log when no --log is given
//! execs/<id>.json     each exec'd process: ExecRecord (and its plan)
//! vmm.log             the VMM's log
//! vm/                 what the VMM may write: vsock.sock, control.sock,
//!                     console.log, rootfs.disk (the ext4 copy of the root
//!                     file system), volume-N.disk (copies of bind-mounted
//!                     host directories)
//! ```
//!
//! `vmm.log` and `vm/` are in `vm_dir`, which is this directory unless the
//! socket paths would be too long for a Unix socket address.
//!
//! The state is the runtime's one container state
//! (`vmrun_runtime::container::State`, the bundle's part in its `oci`); its
//! owner is the supervisor. As with `vmrun run`, whether a container still
//! runs is never taken from `state.json` alone: its supervisor must be
//! alive too (same pid and start time). A supervisor that died means the
//! container has stopped.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use vmrun_runtime::container::ProcessRef;

use crate::error::{io, Error, Result};

/// The state file.
pub const STATE_FILE: &str = "state.json";
/// What `create` made of the bundle.
pub const PLAN_FILE: &str = "plan.json";
/// The FIFO `start` opens.
pub const FIFO: &str = "exec.fifo";
/// The supervisors' log when the caller gave no `--log`.
pub const LOG_FILE: &str = "vmrun-oci.log";
/// Exec'd processes.
pub const EXECS: &str = "execs";
/// There while the container is paused (`pause`, until `resume`).
pub const PAUSED_FILE: &str = "paused";

/// Whether the container whose state directory is `dir` is paused.
pub fn paused(dir: &Path) -> bool {
    dir.join(PAUSED_FILE).exists()
}

pub use vmrun_runtime::container::{write_atomic, OciBundle, State, Status};

/// runc's word for a status.
pub fn status_word(s: Status) -> &'static str {
    match s {
        Status::Creating => "creating",
        Status::Created => "created",
        Status::Running => "running",
        Status::Exited => "stopped",
    }
}

/// The container's pid: its holder's (`crate::holder`), else its
/// supervisor's (the state's owner), or 0 once stopped.
pub fn pid(st: &State) -> u32 {
    match st.effective_status() {
        Status::Exited => 0,
        _ => st.oci.as_ref().and_then(|o| o.holder).or(st.owner).map_or(0, |s| s.pid),
    }
}

/// What `state` prints: runc's JSON.
pub fn oci_json(st: &State) -> serde_json::Value {
    let bundle = st.oci.as_ref();
    serde_json::json!({
        "ociVersion": bundle.map(|b| b.oci_version.as_str()).unwrap_or_default(),
        "id": st.id,
        "pid": pid(st),
        "status": status_word(st.effective_status()),
        "bundle": bundle.map(|b| b.bundle.clone()).unwrap_or_default(),
        "rootfs": bundle.map(|b| b.rootfs.clone()).unwrap_or_default(),
        "created": bundle.map(|b| b.created.as_str()).unwrap_or_default(),
        "owner": "",
        "annotations": bundle.map(|b| b.annotations.clone()).unwrap_or_default(),
    })
}

/// Where an exec'd process is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExecStatus {
    /// Its supervisor is asking the agent to start it.
    Starting,
    /// It runs.
    Running,
    /// It ended.
    Exited,
    /// It could not be started.
    Failed,
}

/// An exec'd process, in `execs/<exec id>.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExecRecord {
    /// Its id in the guest.
    pub exec_id: String,
    /// Its supervisor (the pid `exec --pid-file` writes).
    pub supervisor: Option<ProcessRef>,
    /// Where it is.
    pub status: ExecStatus,
    /// Its exit code, once exited.
    pub exit_code: Option<i32>,
    /// Why it failed.
    pub error: Option<String>,
}

impl ExecRecord {
    /// Whether it is still running (its supervisor alive).
    pub fn alive(&self) -> bool {
        matches!(self.status, ExecStatus::Starting | ExecStatus::Running) && self.supervisor.is_some_and(|s| s.alive())
    }
}

/// The `--root` directory.
#[derive(Debug, Clone)]
pub struct Root {
    path: PathBuf,
}

/// Whether `id` is an id runc accepts: `[A-Za-z0-9_+.-]+`, not `.` or
/// `..`, at most 1024 bytes.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 1024
        && id != "."
        && id != ".."
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b"_+.-".contains(&b))
}

impl Root {
    /// The root at `path` (made absolute).
    pub fn new(path: &Path) -> Result<Self> {
        let path = std::path::absolute(path).map_err(io(format!("--root {}", path.display())))?;
        Ok(Self { path })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A container's state directory (which may not exist).
    pub fn dir(&self, id: &str) -> Result<PathBuf> {
        if !valid_id(id) {
            return Err(Error::InvalidId(id.into()));
        }
        Ok(self.path.join(id))
    }

    /// An existing container's directory and state.
    pub fn find(&self, id: &str) -> Result<(PathBuf, State)> {
        let dir = self.dir(id)?;
        match State::load(&dir) {
            Ok(s) => Ok((dir, s)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(Error::NotFound(id.into())),
            Err(e) => Err(io(format!("reading the state of container {id}"))(e)),
        }
    }

    /// A container's exec'd processes.
    pub fn execs(dir: &Path) -> Vec<ExecRecord> {
        let Ok(entries) = std::fs::read_dir(dir.join(EXECS)) else { return Vec::new() };
        let mut out: Vec<ExecRecord> = entries
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".json") && !e.file_name().to_string_lossy().ends_with(".plan.json"))
            .filter_map(|e| std::fs::read(e.path()).ok())
            .filter_map(|b| serde_json::from_slice(&b).ok())
            .collect();
        out.sort_by(|a, b| a.exec_id.cmp(&b.exec_id));
        out
    }
}

/// The directory for a VM's sockets: `dir` itself when the longest socket
/// path there fits in a Unix socket address (the VMM adds `_PORT` to the
/// vsock socket for connections the guest opens), else a short directory
/// named after a hash of `dir`.
pub fn vm_dir_for(dir: &Path) -> PathBuf {
    // sun_path holds 108 bytes with the NUL.
    const LONGEST: &str = "vm/vsock.sock_4294967295";
    if dir.join(LONGEST).as_os_str().len() < 100 {
        return dir.to_path_buf();
    }
    let h = vmrun_vmm_api::hash::fnv1a(dir.as_os_str().as_encoded_bytes());
    let base = if Path::new("/run").is_dir() && is_root() { PathBuf::from("/run/vmrun-oci-vm") } else { std::env::temp_dir().join("vmrun-oci-vm") };
    base.join(format!("{h:016x}"))
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn state(status: Status, supervisor: Option<ProcessRef>) -> State {
        State {
            status,
            owner: supervisor,
            guest_id: "c1".into(),
            vm_dir: Some("/b".into()),
            oci: Some(OciBundle {
                holder: None,
                network: None,
                pod_sandbox: None,
                oom_kills: 0,
                oci_version: "1.0.2".into(),
                bundle: "/b".into(),
                rootfs: "/b/rootfs".into(),
                created: "2024-01-01T00:00:00Z".into(),
                annotations: Default::default(),
            }),
            ..State::new("c1", "c1", "", "")
        }
    }

    #[test]
    fn a_dead_supervisor_means_stopped() {
        let me = ProcessRef::current();
        assert_eq!(state(Status::Running, me).effective_status(), Status::Running);
        assert_eq!(pid(&state(Status::Running, me)), std::process::id());
        let dead = Some(ProcessRef { pid: u32::MAX - 1, start_time: 1 });
        let s = state(Status::Running, dead);
        assert_eq!(s.effective_status(), Status::Exited);
        assert_eq!(pid(&s), 0);
        assert_eq!(oci_json(&s)["status"], "stopped");
        let mut c = state(Status::Creating, None);
        assert_eq!(c.effective_status(), Status::Exited, "no creator, no supervisor");
        c.creator = me;
        assert_eq!(c.effective_status(), Status::Creating);
    }

    #[test]
    fn state_json_is_runcs() {
        let mut s = state(Status::Created, ProcessRef::current());
        if let Some(b) = s.oci.as_mut() {
            b.annotations.insert("a".into(), "b".into());
        }
        let j = oci_json(&s);
        for k in ["ociVersion", "id", "pid", "status", "bundle", "rootfs", "created", "annotations"] {
            assert!(j.get(k).is_some(), "{k}");
        }
        assert_eq!(j["status"], "created");
        assert_eq!(j["annotations"]["a"], "b");
        assert_eq!(j["bundle"], "/b");
    }

    #[test]
    fn ids() {
        for ok in ["a", "abc-1_2.3+x", &"x".repeat(200)] {
            assert!(valid_id(ok), "{ok}");
        }
        for bad in ["", ".", "..", "a/b", "a b", "../x", "é"] {
            assert!(!valid_id(bad), "{bad}");
        }
    }

    #[test]
    fn long_state_dirs_get_a_short_vm_dir() {
        assert_eq!(vm_dir_for(Path::new("/run/x/c1")), PathBuf::from("/run/x/c1"));
        let long = PathBuf::from("/run/containerd/runc/k8s.io").join("f".repeat(64));
        let v = vm_dir_for(&long);
        assert_ne!(v, long);
        assert!(v.join("vm/vsock.sock_4294967295").as_os_str().len() < 100);
        assert_eq!(v, vm_dir_for(&long), "stable");
    }

    #[test]
    fn unknown_containers_are_not_found() {
        let d = tempfile::tempdir().unwrap();
        let root = Root::new(d.path()).unwrap();
        assert!(matches!(root.find("nope"), Err(Error::NotFound(_))));
        assert!(root.find("nope").unwrap_err().to_string().contains("does not exist"));
        assert!(matches!(root.find("../x"), Err(Error::InvalidId(_))));
    }
}
