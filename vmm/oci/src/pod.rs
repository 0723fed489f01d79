//! A Kubernetes pod's containers share one VM: the pod's sandbox
//! container makes it (with [`POD_SLOTS`] volume slots), and each other
//! container of the pod is created inside it by the agent, its root's
//! disks attached to free slots of the running VM, so that the pod's
//! containers share its network (and reach each other on localhost).
//!
//! Which container is which comes from the annotations containerd's CRI
//! (and CRI-O) give a pod's containers. The slots a VM's containers hold
//! are recorded in the sandbox's state directory (`pod-slots.json`, under
//! a lock): the sandbox's own first, then each member's; a member's are
//! freed when it ends or is deleted, and those of a member whose
//! supervisor is gone are taken back by the next member that needs room,
//! once its container is out of the guest (a disk is never swapped under
//! a file system still mounted on it).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use vmrun_runtime::lock::Lock;
pub use vmrun_runtime::volume::POD_SLOTS;

use crate::error::{io, Error, Result};
use crate::state::{Root, State, Status};

/// containerd's CRI annotation: `sandbox` or `container`.
const CONTAINER_TYPE: &[&str] = &["io.kubernetes.cri.container-type", "io.kubernetes.cri-o.ContainerType"];
/// containerd's CRI annotation: the pod's sandbox container's id.
const SANDBOX_ID: &[&str] = &["io.kubernetes.cri.sandbox-id", "io.kubernetes.cri-o.SandboxID"];

/// The slot record, in the sandbox's directory.
const SLOTS_FILE: &str = "pod-slots.json";
/// Its lock.
const SLOTS_LOCK: &str = "pod-slots.lock";

/// A container's place in a pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PodRole {
    /// Not in a pod (`ctr run`, podman, a plain bundle): a VM of its own.
    Alone,
    /// A pod's sandbox: its VM is the pod's.
    Sandbox,
    /// A container of the pod whose sandbox has this id: made in its VM.
    Member(String),
}

/// The role the annotations give a container.
pub fn role(annotations: &BTreeMap<String, String>) -> PodRole {
    let get = |keys: &[&str]| keys.iter().find_map(|k| annotations.get(*k));
    match (get(CONTAINER_TYPE).map(String::as_str), get(SANDBOX_ID)) {
        (Some("sandbox"), _) => PodRole::Sandbox,
        (Some("container"), Some(sandbox)) if !sandbox.is_empty() => PodRole::Member(sandbox.clone()),
        _ => PodRole::Alone,
    }
}

/// Who holds which volume slots of a pod's VM.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Record {
    /// The sandbox's own slots: `0..reserved`.
    reserved: usize,
    /// Each member's slots.
    members: BTreeMap<String, Vec<usize>>,
}

fn load(sandbox_dir: &Path) -> Record {
    std::fs::read(sandbox_dir.join(SLOTS_FILE)).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default()
}

fn save(sandbox_dir: &Path, r: &Record) -> Result<()> {
    let bytes = serde_json::to_vec(r).map_err(|e| Error::State(format!("{SLOTS_FILE}: {e}")))?;
    crate::state::write_atomic(&sandbox_dir.join(SLOTS_FILE), &bytes).map_err(io(format!("writing {SLOTS_FILE}")))
}

fn lock(sandbox_dir: &Path) -> Result<Lock> {
    Lock::take(&sandbox_dir.join(SLOTS_LOCK)).map_err(io(format!("locking {SLOTS_LOCK}")))
}

/// Records that the sandbox's own disks hold the first `count` slots.
pub fn reserve(sandbox_dir: &Path, count: usize) -> Result<()> {
    let _l = lock(sandbox_dir)?;
    let mut r = load(sandbox_dir);
    r.reserved = count;
    save(sandbox_dir, &r)
}

/// The pod whose sandbox is `sandbox` in `root`: its directory and state,
/// once it has a VM that runs.
pub fn sandbox_of(root: &Root, sandbox: &str) -> Result<(PathBuf, State)> {
    let (dir, st) = root.find(sandbox).map_err(|e| match e {
        Error::NotFound(_) => Error::State(format!("the pod's sandbox container {sandbox} does not exist (create it first)")),
        e => e,
    })?;
    if !matches!(st.effective_status(), Status::Created | Status::Running) {
        return Err(Error::State(format!("the pod's sandbox container {sandbox} is not running")));
    }
    if st.oci.as_ref().is_some_and(|o| o.pod_sandbox.is_some()) {
        return Err(Error::State(format!("{sandbox} is not a pod's sandbox (it is a member of another)")));
    }
    Ok((dir, st))
}

/// Removes container `guest_id` from the pod's VM of `layout` (its
/// processes killed, its disks unmounted); true once the agent says it is
/// gone.
pub fn remove_from_guest(layout: &vmrun_runtime::vm::Layout, guest_id: &str) -> bool {
    let client = match vmrun_runtime::sandbox::reach_vm(layout, vmrun_agent_client::Options::default()) {
        Ok(c) => c,
        Err(e) => {
            log::warn!("cannot reach the pod's agent to remove {guest_id}: {e}");
            return false;
        }
    };
    let r = client.remove_container(guest_id, true);
    client.close();
    match r {
        Ok(()) => true,
        Err(vmrun_agent_client::Error::Agent(a)) if a.kind == vmrun_agent_protocol::ErrorKind::NotFound => true,
        Err(e) => {
            log::warn!("cannot remove {guest_id} from the pod's VM: {e}");
            false
        }
    }
}

/// Takes `count` free slots of the pod's VM for `member` (whose state
/// directories are in `root`). Slots of members that no longer exist, or
/// whose supervisor is gone, are taken back first, once `remove` (given a
/// member's id; [`remove_from_guest`] of its guest id) has taken its
/// container out of the guest; they are detached then.
pub fn allocate(
    root: &Root,
    sandbox_dir: &Path,
    layout: &vmrun_runtime::vm::Layout,
    member: &str,
    count: usize,
    remove: &dyn Fn(&str) -> bool,
) -> Result<Vec<usize>> {
    let _l = lock(sandbox_dir)?;
    let mut r = load(sandbox_dir);
    let gone: Vec<String> = r
        .members
        .keys()
        .filter(|m| *m != member && root.find(m).map_or(true, |(_, st)| st.effective_status() == Status::Exited && st.owner.is_none_or(|o| !o.alive())))
        .cloned()
        .collect();
    for m in gone {
        if !remove(&m) {
            continue;
        }
        for slot in r.members.remove(&m).unwrap_or_default() {
            if let Err(e) = vmrun_runtime::sandbox::detach_volume(layout, slot) {
                log::warn!("slot {slot} of {m}, a member gone: {e}");
            }
        }
    }
    let used: Vec<usize> = (0..r.reserved).chain(r.members.values().flatten().copied()).collect();
    let free: Vec<usize> = (0..POD_SLOTS).filter(|s| !used.contains(s)).take(count).collect();
    if free.len() < count {
        return Err(Error::State(format!(
            "the pod's VM has no room for another container's disks ({POD_SLOTS} slots, {} in use): a pod holds about {} containers",
            used.len(),
            POD_SLOTS / 2
        )));
    }
    r.members.insert(member.to_string(), free.clone());
    save(sandbox_dir, &r)?;
    Ok(free)
}

/// Frees `member`'s slots (detaching their disks from the VM, if it still
/// runs).
pub fn release(sandbox_dir: &Path, layout: &vmrun_runtime::vm::Layout, member: &str) {
    let Ok(_l) = lock(sandbox_dir) else { return };
    let mut r = load(sandbox_dir);
    let Some(slots) = r.members.remove(member) else { return };
    for slot in slots {
        if let Err(e) = vmrun_runtime::sandbox::detach_volume(layout, slot) {
            log::debug!("detaching slot {slot}: {e}");
        }
    }
    if let Err(e) = save(sandbox_dir, &r) {
        log::warn!("{e}");
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn ann(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn roles_come_from_the_cri_annotations() {
        assert_eq!(role(&ann(&[])), PodRole::Alone);
        assert_eq!(role(&ann(&[("io.kubernetes.cri.container-type", "sandbox"), ("io.kubernetes.cri.sandbox-id", "p1")])), PodRole::Sandbox);
        assert_eq!(
            role(&ann(&[("io.kubernetes.cri.container-type", "container"), ("io.kubernetes.cri.sandbox-id", "p1")])),
            PodRole::Member("p1".into())
        );
        assert_eq!(
            role(&ann(&[("io.kubernetes.cri-o.ContainerType", "container"), ("io.kubernetes.cri-o.SandboxID", "p2")])),
            PodRole::Member("p2".into())
        );
        assert_eq!(role(&ann(&[("io.kubernetes.cri.container-type", "container")])), PodRole::Alone, "no sandbox named");
    }

    #[test]
    fn slots_are_handed_out_after_the_sandboxs_and_taken_back() {
        let tmp = std::env::temp_dir().join(format!("vmrun-oci-pod-{}", std::process::id()));
        let root = Root::new(&tmp.join("root")).unwrap();
        let sandbox = tmp.join("sandbox");
        std::fs::create_dir_all(&sandbox).unwrap();
        let layout = vmrun_runtime::vm::Layout::of(&sandbox);
        reserve(&sandbox, 3).unwrap();
        // Members whose state exists and whose supervisor (this test) lives.
        let member = |m: &str| {
            let dir = root.dir(m).unwrap();
            std::fs::create_dir_all(&dir).unwrap();
            let st = State { owner: vmrun_runtime::container::ProcessRef::current(), ..State::new(m, m, "", "") };
            st.save(&dir).unwrap();
        };
        for m in ["m1", "m2", "m3", "m4", "m5"] {
            member(m);
        }
        let yes = |_: &str| true;
        assert_eq!(allocate(&root, &sandbox, &layout, "m1", 2, &yes).unwrap(), vec![3, 4]);
        assert_eq!(allocate(&root, &sandbox, &layout, "m2", 2, &yes).unwrap(), vec![5, 6]);
        release(&sandbox, &layout, "m1");
        assert_eq!(allocate(&root, &sandbox, &layout, "m3", 1, &yes).unwrap(), vec![3], "m1's slots are free again");
        // m2 disappears without releasing: its slots come back when
        // another member needs room.
        std::fs::remove_dir_all(root.dir("m2").unwrap()).unwrap();
        // Not while its container cannot be taken out of the guest.
        let e = allocate(&root, &sandbox, &layout, "m4", POD_SLOTS - 4, &|_| false).unwrap_err();
        assert!(e.to_string().contains("no room"), "{e}");
        let all = allocate(&root, &sandbox, &layout, "m4", POD_SLOTS - 4, &|m| m == "m2").unwrap();
        assert_eq!(all, (4..POD_SLOTS).collect::<Vec<_>>());
        let e = allocate(&root, &sandbox, &layout, "m5", 1, &yes).unwrap_err();
        assert!(e.to_string().contains("no room"), "{e}");
        let _ = std::fs::remove_dir_all(&tmp);
    }
}
