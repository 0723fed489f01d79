//! `containerd-shim-vmrun-v2`: vmrun's containerd shim (runtime
//! `io.containerd.vmrun.v2`), built on containerd's Rust shim crate
//! (`containerd-shim`): the crate parses containerd's command line, serves
//! the task API over ttrpc, reaps the shim's children and publishes
//! events; this module answers the task API with vmrun-oci's operations
//! (`crate::ops`), called in this process.
//!
//! - **One shim per pod.** `start` groups a pod's containers: a container
//!   whose bundle names its pod's sandbox (CRI's
//!   `io.kubernetes.cri.sandbox-id`, CRI-O's too, [`crate::pod::role`]) is
//!   served by the shim of its sandbox, which made the pod's VM; other
//!   containers (`ctr run`, a pod's sandbox) get a shim of their own.
//! - **Tasks** ([`task`]): `Create` mounts the root containerd gives as
//!   mounts of its snapshots on the bundle's `rootfs`, opens the stdio
//!   FIFOs (or takes the terminal's master through a console socket) and
//!   creates the container (its supervisor in a session of its own, the
//!   container's pid its holder's, which this shim, a subreaper, reaps:
//!   its exit status is the container's); `Exec` and `Start` of an exec
//!   run an exec supervisor the same way. Stats, Update, Pause and Resume
//!   act on the container's cgroup inside the guest, through the agent.
//! - The runtime's states live under [`root_of`]`(namespace)`.
//!
//! `docs/oci.md` ("containerd") explains the design.

mod io;
pub mod metrics;
mod task;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use containerd_shim as shim;
use shim::synchronous::publisher::RemotePublisher;
use shim::{api, Config, ExitSignal, Flags, StartOpts};

use crate::ops::Ctx;
use crate::state::Root;

/// The runtime's name, as containerd names it.
pub const RUNTIME: &str = "io.containerd.vmrun.v2";

/// Where the shim keeps the runtime's states, a directory per containerd
/// namespace.
pub const ROOT_BASE: &str = "/run/containerd/vmrun";

/// The `vmrun-oci --root` of containerd namespace `namespace`.
pub fn root_of(namespace: &str) -> PathBuf {
    Path::new(ROOT_BASE).join(namespace)
}

/// The `vmrun-oci` executable that runs supervisors and holders:
/// `$VMRUN_OCI`, else the one beside this binary, else on `PATH`.
pub fn vmrun_oci() -> crate::Result<PathBuf> {
    if let Some(p) = std::env::var_os("VMRUN_OCI") {
        return Ok(PathBuf::from(p));
    }
    std::env::current_exe()
        .ok()
        .map(|e| e.with_file_name("vmrun-oci"))
        .filter(|p| p.is_file())
        .or_else(|| crate::ops::find_in_path("vmrun-oci"))
        .ok_or_else(|| crate::Error::Usage("cannot find vmrun-oci: install it beside containerd-shim-vmrun-v2, or set VMRUN_OCI".into()))
}

/// The operations' context for containerd namespace `namespace`, logging
/// in JSON to the bundle's `log.json` (where containerd's runc shim has
/// runc log), or to the container's state directory without a bundle.
pub(crate) fn ctx(namespace: &str, bundle: Option<&Path>) -> crate::Result<Ctx> {
    Ok(Ctx {
        root: Root::new(&root_of(namespace))?,
        log: bundle.map(|b| b.join("log.json")),
        log_format: crate::logger::Format::Json,
        debug: false,
        exe: Some(vmrun_oci()?),
    })
}

/// The shim whose socket serves the bundle in `bundle`: its pod's
/// sandbox's for a pod's container, else its own.
pub fn grouping(bundle: &Path, id: &str) -> String {
    let annotations = std::fs::read(bundle.join("config.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|v| {
            serde_json::from_value::<std::collections::BTreeMap<String, String>>(
                v.get("annotations")?.clone(),
            )
            .ok()
        })
        .unwrap_or_default();
    match crate::pod::role(&annotations) {
        crate::pod::PodRole::Member(sandbox) => sandbox,
        _ => id.to_string(),
    }
}

/// The shim: its lifecycle commands (`start`, `delete`) and its task
/// service.
pub struct Service {
    /// containerd's namespace.
    namespace: String,
    /// The container the shim was started for.
    id: String,
    /// Set when the shim should end.
    exit: Arc<ExitSignal>,
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service")
            .field("namespace", &self.namespace)
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for task::Tasks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tasks")
            .field("namespace", &self.namespace)
            .finish_non_exhaustive()
    }
}

impl shim::Shim for Service {
    type T = task::Tasks;

    fn new(_runtime_id: &str, args: &Flags, _config: &mut Config) -> Self {
        Service {
            namespace: args.namespace.clone(),
            id: args.id.clone(),
            exit: Arc::new(ExitSignal::default()),
        }
    }

    fn start_shim(&mut self, opts: StartOpts) -> Result<String, shim::Error> {
        let bundle = std::env::current_dir()
            .map_err(|e| shim::Error::Other(format!("the bundle directory: {e}")))?;
        let group = grouping(&bundle, &opts.id);
        // A second shim for a group whose shim runs finds its socket in
        // use and hands back its address.
        let (_pid, address) = shim::spawn(opts, &group, Vec::new())?;
        Ok(address)
    }

    fn delete_shim(&mut self) -> Result<api::DeleteResponse, shim::Error> {
        // containerd cleans up after a shim that died: the container is
        // deleted (its processes killed) and its root unmounted.
        let bundle = std::env::current_dir()
            .map_err(|e| shim::Error::Other(format!("the bundle directory: {e}")))?;
        let ctx =
            ctx(&self.namespace, Some(&bundle)).map_err(|e| shim::Error::Other(e.to_string()))?;
        if let Err(e) = crate::ops::delete(&ctx, &self.id, true) {
            log::warn!("deleting container {}: {e}", self.id);
        }
        task::unmount_rootfs(&bundle);
        Ok(api::DeleteResponse {
            exit_status: 128 + libc::SIGKILL as u32,
            exited_at: shim::protos::protobuf::MessageField::some(task::now()),
            ..Default::default()
        })
    }

    fn wait(&mut self) {
        self.exit.wait();
    }

    fn create_task_service(&self, publisher: RemotePublisher) -> Self::T {
        task::Tasks::new(&self.namespace, publisher, self.exit.clone())
    }
}

/// The shim's `main`.
pub fn main() {
    shim::run::<Service>(RUNTIME, None);
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_pods_containers_share_their_sandboxs_shim() {
        let d = tempfile::tempdir().unwrap();
        let write = |a: serde_json::Value| {
            std::fs::write(
                d.path().join("config.json"),
                serde_json::json!({ "annotations": a }).to_string(),
            )
            .unwrap()
        };
        write(
            serde_json::json!({ "io.kubernetes.cri.container-type": "container", "io.kubernetes.cri.sandbox-id": "pod1" }),
        );
        assert_eq!(grouping(d.path(), "c1"), "pod1");
        write(
            serde_json::json!({ "io.kubernetes.cri.container-type": "sandbox", "io.kubernetes.cri.sandbox-id": "pod1" }),
        );
        assert_eq!(grouping(d.path(), "pod1"), "pod1");
        write(serde_json::json!({}));
        assert_eq!(
            grouping(d.path(), "c2"),
            "c2",
            "a container outside a pod has its own shim"
        );
        std::fs::write(d.path().join("config.json"), b"{not json").unwrap();
        assert_eq!(grouping(d.path(), "c3"), "c3");
    }
}
