//! containerd's CRI plugin running a pod in vmrun microVMs, driven as
//! kubelet drives it: gRPC on containerd's Unix socket (the `k8s-cri`
//! crate's client), a runtime handler `vmrun` whose runtime is
//! `containerd-shim-vmrun-v2`, CNI's bridge for the pod's network, a pause
//! image of our own as the sandbox image.
//!
//! One test, one private containerd (its own root, state, socket and CNI
//! configuration in a scratch directory): a pod in one VM, its sandbox's
//! (pause), with two containers made in it: a server (busybox's httpd) and
//! a client that fetches from it over localhost; a configmap-like file
//! bind-mounted into the server, `ExecSync`, the container's log in CRI's
//! format, the pod's address from the host, the file updated on the host
//! and seen inside, then the pod stopped and removed, with nothing of it
//! left on the host. It prints the time from `RunPodSandbox` to both
//! containers running and the host memory the pod takes. Needs root, Debian's containerd (1.6), its CNI
//! plugins, the guest kernel (`VMRUN_TEST_KERNEL`, see `support/mod.rs`)
//! and the agent initramfs (`VMRUN_AGENT_INITRD`); it boots its own
//! warm-start template (a scratch data directory), so its first VM takes
//! half a minute or more where guest kernel mode is emulated. Skipped
//! without root or containerd, unless `CI=true`.

#![allow(clippy::unwrap_used)] // test code: a failed step is a failed test

mod support;

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{
    ContainerConfig, ContainerMetadata, ContainerState, ContainerStatsRequest, ContainerStatusRequest, CreateContainerRequest, ExecSyncRequest, ExecSyncResponse,
    ImageSpec, ImageStatusRequest, LinuxContainerConfig, LinuxContainerResources, LinuxContainerSecurityContext, LinuxPodSandboxConfig, LinuxSandboxSecurityContext, Mount, NamespaceMode, NamespaceOption,
    PodSandboxConfig, PodSandboxMetadata, PodSandboxState, PodSandboxStatusRequest, RemoveContainerRequest, RemovePodSandboxRequest,
    RunPodSandboxRequest, StartContainerRequest, StopContainerRequest, StopPodSandboxRequest, UpdateContainerResourcesRequest, VersionRequest,
};
use support::containerd::{which, Containerd};
use tonic::transport::{Channel, Endpoint, Uri};

const SHIM: &str = env!("CARGO_BIN_EXE_containerd-shim-vmrun-v2");
const OCI: &str = env!("CARGO_BIN_EXE_vmrun-oci");

/// CRI's namespace in containerd.
const K8S_NS: &str = "k8s.io";
const PAUSE_IMAGE: &str = "docker.io/library/pause:vmrun-test";
const BUSYBOX_IMAGE: &str = "docker.io/library/busybox:latest";

/// How long a CRI call may take. The test's data directory is new: the
/// sandbox's VM (with the pod's network interface and the pod's disk
/// slots) boots a warm-start template first, half a minute to a few
/// minutes where guest kernel mode is emulated; other calls take seconds.
const BOOTS_A_TEMPLATE: Duration = Duration::from_secs(600);
const CALL: Duration = Duration::from_secs(120);

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A test that cannot run here is skipped, but never in CI, where it is
/// required.
fn skip(reason: &str) {
    assert!(std::env::var("CI").as_deref() != Ok("true"), "{reason}: CI=true requires this test to run");
    eprintln!("skipped: {reason}");
}

/// The CRI's two gRPC services over containerd's socket, called from a
/// runtime of this thread's own.
struct Cri<'a> {
    rt: tokio::runtime::Runtime,
    runtime: RuntimeServiceClient<Channel>,
    images: ImageServiceClient<Channel>,
    containerd: &'a Containerd,
}

impl<'a> Cri<'a> {
    /// A client of `containerd`'s CRI; connects on its first call.
    fn new(containerd: &'a Containerd) -> Self {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a tokio runtime");
        // tonic speaks HTTP/2 over whatever the connector gives it: the
        // URI is a placeholder, the socket is containerd's.
        let sock = containerd.sock.clone();
        let channel = {
            let _in_rt = rt.enter();
            Endpoint::from_static("http://[::]:50051").connect_with_connector_lazy(tower::service_fn(move |_: Uri| {
                let sock = sock.clone();
                async move { Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tokio::net::UnixStream::connect(sock).await?)) }
            }))
        };
        Self { rt, runtime: RuntimeServiceClient::new(channel.clone()), images: ImageServiceClient::new(channel), containerd }
    }

    /// Runs one call, up to `limit`; its answer, or what went wrong.
    fn try_call<T>(&self, limit: Duration, call: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>) -> Result<T, String> {
        // The timer is made inside the runtime, whose clock it needs.
        match self.rt.block_on(async { tokio::time::timeout(limit, call).await }) {
            Ok(Ok(r)) => Ok(r.into_inner()),
            Ok(Err(status)) => Err(format!("{:?}: {}", status.code(), status.message())),
            Err(_) => Err(format!("no answer in {limit:?}")),
        }
    }

    /// Runs one call, up to `limit`; fails the test, with containerd's
    /// log, if it fails.
    fn call<T>(&self, what: &str, limit: Duration, call: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>) -> T {
        let t = Instant::now();
        match self.try_call(limit, call) {
            Ok(r) => {
                eprintln!("cri test: {what}: {:.1} s", t.elapsed().as_secs_f64());
                r
            }
            Err(e) => panic!("{what}: {e}\ncontainerd's log (end):\n{}", self.containerd.log_tail(80)),
        }
    }

    fn rs(&self) -> RuntimeServiceClient<Channel> {
        self.runtime.clone()
    }

    /// `ExecSync` of `cmd` in container `id`.
    fn exec(&self, id: &str, cmd: &[&str]) -> ExecSyncResponse {
        let req = ExecSyncRequest { container_id: id.into(), cmd: cmd.iter().map(|s| s.to_string()).collect(), timeout: 60 };
        self.call(&format!("ExecSync {cmd:?}"), CALL, self.rs().exec_sync(req))
    }

    /// `sh -c script` in container `id`: its standard output; fails the
    /// test unless it exits 0.
    fn sh(&self, id: &str, script: &str) -> String {
        let r = self.exec(id, &["sh", "-c", script]);
        assert_eq!(r.exit_code, 0, "{script}: stdout {:?}, stderr {:?}", text(&r.stdout), text(&r.stderr));
        text(&r.stdout)
    }
}

/// The pod, stopped and removed through the CRI if the test fails before
/// it does so itself (containerd must still run: this is dropped before
/// it). A failure shows the runtime's logs of the pod's containers first.
struct PodGuard<'a> {
    cri: &'a Cri<'a>,
    sandbox: Option<String>,
    ids: Vec<String>,
}

impl Drop for PodGuard<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for id in &self.ids {
                eprintln!("cri test: the runtime's log of {id}:\n{}", runtime_log(&self.cri.containerd.dir, id));
            }
        }
        let Some(id) = self.sandbox.take() else { return };
        // StopPodSandbox stops the pod's containers, RemovePodSandbox
        // removes them.
        let stop = self.cri.try_call(CALL, self.cri.rs().stop_pod_sandbox(StopPodSandboxRequest { pod_sandbox_id: id.clone() }));
        let remove = self.cri.try_call(CALL, self.cri.rs().remove_pod_sandbox(RemovePodSandboxRequest { pod_sandbox_id: id.clone() }));
        eprintln!("cri test: cleanup of pod {id}: stop {stop:?}, remove {remove:?}");
    }
}

/// What the test made on the host, removed whatever happened (dropped after
/// containerd is killed): runtime states the CRI could not remove (the
/// shims' `vmrun-oci delete --force`), shims left running, mounts under
/// containerd's directory and the pod's network namespace, the bridge,
/// the pods' cgroup parent.
struct HostGuard {
    dir: PathBuf,
    sock: PathBuf,
    bridge: String,
    cgroup_parent: String,
    ids: Vec<String>,
    netns: Option<PathBuf>,
}

impl Drop for HostGuard {
    fn drop(&mut self) {
        // The pod's containers before its sandbox, whose VM they may be in.
        for id in self.ids.iter().rev() {
            let root = vmrun_oci::shim::root_of(K8S_NS);
            if root.join(id).exists() {
                let _ = Command::new(OCI).arg("--root").arg(&root).args(["delete", "--force", id]).output();
            }
        }
        for pid in processes_mentioning(&[&self.sock.to_string_lossy()]) {
            // SAFETY: kill of a shim of this test's containerd.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
        let mut under = mounts_under(&self.dir);
        if let Some(ns) = &self.netns {
            under.extend(mounts_under(ns));
        }
        for m in under.iter().rev() {
            let _ = Command::new("umount").arg("-l").arg(m).output();
        }
        if let Some(ns) = &self.netns {
            let _ = std::fs::remove_file(ns);
        }
        let _ = Command::new("ip").args(["link", "del", &self.bridge]).output();
        for dir in cgroup_dirs_under(&self.cgroup_parent).iter().rev() {
            let _ = std::fs::remove_dir(dir);
        }
        for h in cgroup_hierarchies() {
            let _ = std::fs::remove_dir(h.join(self.cgroup_parent.trim_start_matches('/')));
        }
    }
}

/// What `vmrun-oci` logged for container `id`: the shim has it log in
/// JSON into the container's bundle.
fn runtime_log(containerd_dir: &Path, id: &str) -> String {
    std::fs::read_to_string(containerd_dir.join("state/io.containerd.runtime.v2.task").join(K8S_NS).join(id).join("log.json"))
        .unwrap_or_default()
}

/// The pids of the processes whose command line mentions any of `needles`.
fn processes_mentioning(needles: &[&str]) -> Vec<u64> {
    let me = std::process::id() as u64;
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<u64>().ok()))
        .filter(|&pid| pid != me && support::alive(pid))
        .filter(|&pid| {
            let cmdline = cmdline(pid);
            needles.iter().any(|n| cmdline.contains(n))
        })
        .collect()
}

/// `pid`'s command line, for messages.
fn cmdline(pid: u64) -> String {
    text(&std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default()).replace('\0', " ")
}

/// Mount points at or below `dir`, in the order they were mounted.
fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    info.lines().filter_map(|l| l.split(' ').nth(4)).map(PathBuf::from).filter(|m| m.starts_with(dir)).collect()
}

/// The cgroup hierarchies' roots (v1: one per controller; v2: one).
fn cgroup_hierarchies() -> Vec<PathBuf> {
    let root = Path::new("/sys/fs/cgroup");
    if root.join("cgroup.controllers").exists() {
        return vec![root.to_path_buf()];
    }
    std::fs::read_dir(root).into_iter().flatten().flatten().filter(|e| e.file_type().is_ok_and(|t| t.is_dir())).map(|e| e.path()).collect()
}

/// The cgroups below `parent` (absolute, e.g. `/vmrun-cri-123`) in every
/// hierarchy, parents before their children.
fn cgroup_dirs_under(parent: &str) -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                out.push(e.path());
                walk(&e.path(), out);
            }
        }
    }
    let mut out = Vec::new();
    for h in cgroup_hierarchies() {
        walk(&h.join(parent.trim_start_matches('/')), &mut out);
    }
    out
}

/// A container's host processes as `vmrun-oci` recorded them in its state
/// under containerd's runc root: its supervisor, and its VMM if it has a
/// VM of its own (a pod's sandbox has; a pod's other containers, made in
/// the sandbox's VM, have none).
fn runtime_pids(id: &str) -> (u64, Option<u64>) {
    let path = vmrun_oci::shim::root_of(K8S_NS).join(id).join("state.json");
    let s: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let supervisor = s["owner"]["pid"].as_u64().unwrap_or_else(|| panic!("no supervisor in {}: {s}", path.display()));
    (supervisor, s["vmm"]["pid"].as_u64())
}

/// `pids` and all their descendants.
fn with_descendants(pids: &[u64]) -> Vec<u64> {
    let parents: Vec<(u64, u64)> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u64>().ok())
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // The fields after the command's closing parenthesis: state, ppid.
            let ppid = stat.rsplit_once(')')?.1.split_whitespace().nth(1)?.parse().ok()?;
            Some((pid, ppid))
        })
        .collect();
    let mut all = pids.to_vec();
    let mut i = 0;
    while i < all.len() {
        let p = all[i];
        all.extend(parents.iter().filter(|(_, pp)| *pp == p).map(|(c, _)| *c));
        i += 1;
    }
    all
}

/// The proportional set size of process `pid` in KiB (0 once it is gone).
fn pss_kib(pid: u64) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("Pss:").and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())))
        .unwrap_or(0)
}

/// The `info` JSON of a verbose CRI status (containerd's: the pid, the
/// runtime spec, ...).
fn verbose_info(info: &HashMap<String, String>) -> serde_json::Value {
    let raw = info.get("info").unwrap_or_else(|| panic!("no \"info\" in the verbose status: {info:?}"));
    serde_json::from_str(raw).unwrap_or_else(|e| panic!("the verbose status's info is not JSON ({e}): {raw}"))
}

/// Polls `f` every 500 ms until it gives `Some`, up to `limit`.
fn poll<T>(limit: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if start.elapsed() > limit {
            return None;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The pod's namespaces: its network, IPC and PID namespaces (a pod with
/// `shareProcessNamespace`).
fn pod_namespaces() -> NamespaceOption {
    NamespaceOption { network: NamespaceMode::Pod as i32, pid: NamespaceMode::Pod as i32, ipc: NamespaceMode::Pod as i32, ..Default::default() }
}

/// A container's configuration in the pod's namespaces, as kubelet gives it.
fn in_pod_namespaces() -> LinuxContainerConfig {
    LinuxContainerConfig {
        security_context: Some(LinuxContainerSecurityContext { namespace_options: Some(pod_namespaces()), ..Default::default() }),
        ..Default::default()
    }
}

#[test]
fn cri_runs_a_pod_in_vmrun_microvms() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return skip("containerd's CRI needs root");
    }
    let (Some(containerd_bin), Some(ctr)) = (which("containerd"), which("ctr")) else {
        return skip("no containerd/ctr (scripts/deps.sh installs Debian's containerd)");
    };
    let cni_bin = Path::new("/usr/lib/cni");
    for plugin in ["bridge", "host-local", "loopback", "portmap"] {
        if !cni_bin.join(plugin).is_file() {
            return skip(&format!(
                "no CNI plugin {plugin} in {} (scripts/deps.sh installs containernetworking-plugins)",
                cni_bin.display()
            ));
        }
    }
    let t0 = Instant::now();
    support::build_vmm(OCI);
    let (home, kernel, initrd) = (support::scratch("cri-home"), support::kernel().to_path_buf(), support::agent_initrd());
    let pause_archive = support::script_path("tests/images/make-pause-image.sh").join("pause-oci.tar");
    let busybox_archive = support::busybox_image().join("busybox-oci.tar");

    // This test's own names: a bridge, a subnet and a cgroup parent no
    // other test (oci.rs's pod network test takes 10.252.N, run.rs
    // 10.250.N) or run of this one uses at the same time.
    let pid = std::process::id();
    let dir = support::scratch("cri-containerd");
    let bridge = format!("vmrcri{}", pid % 100_000);
    let net = format!("10.251.{}", pid % 250);
    let gateway = format!("{net}.1");
    let cgroup_parent = format!("/vmrun-cri-test-{pid}");
    let mut host = HostGuard {
        dir: dir.clone(),
        sock: dir.join("c.sock"),
        bridge: bridge.clone(),
        cgroup_parent: cgroup_parent.clone(),
        ids: Vec::new(),
        netns: None,
    };

    // The pod network: CNI's bridge (the host holds the gateway's address
    // on it, so the pod's address is routed from the root namespace) with
    // host-local addresses kept in the scratch directory, and portmap for
    // hostPorts. The CRI adds a loopback network (Debian's `loopback`
    // plugin, from bin_dir) for each pod itself.
    let cni_conf = dir.join("cni");
    std::fs::create_dir_all(&cni_conf).unwrap();
    let conflist = serde_json::json!({
        "cniVersion": "0.4.0",
        "name": format!("vmrun-cri-test-{pid}"),
        "plugins": [
            { "type": "bridge", "bridge": bridge, "isGateway": true, "ipMasq": false, "hairpinMode": true,
              "ipam": { "type": "host-local", "ranges": [[{ "subnet": format!("{net}.0/24"), "gateway": gateway }]],
                        "routes": [{ "dst": "0.0.0.0/0" }], "dataDir": dir.join("cni-ipam") } },
            { "type": "portmap", "capabilities": { "portMappings": true } }
        ]
    });
    std::fs::write(cni_conf.join("10-vmrun-cri-test.conflist"), serde_json::to_string_pretty(&conflist).unwrap()).unwrap();

    // The CRI plugin with a runtime handler `vmrun` beside the default,
    // runc (the pod asks for vmrun by name, as a RuntimeClass does). This
    // host refuses negative oom_score_adj values (restrict_oom_score_adj
    // keeps the CRI's within what it is allowed). The streaming server (exec and
    // attach that are not ExecSync) on a port of the kernel's choice: the
    // default, 10010, may be another containerd's. The shim timeouts are
    // raised from containerd's defaults (seconds) for a slow host where a
    // VM's teardown can take longer.
    let extra = format!(
        r#"[timeouts]
  "io.containerd.timeout.shim.cleanup" = "60s"
  "io.containerd.timeout.shim.load" = "60s"
  "io.containerd.timeout.shim.shutdown" = "60s"
  "io.containerd.timeout.task.state" = "60s"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.vmrun]
      runtime_type = "io.containerd.vmrun.v2"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{bin}"
    conf_dir = "{conf}"
    max_conf_num = 1
"#,
        bin = cni_bin.display(),
        conf = cni_conf.display(),
    );
    let containerd = Containerd::start(
        &containerd_bin,
        &ctr,
        &dir,
        &[
            "io.containerd.snapshotter.v1.btrfs",
            "io.containerd.snapshotter.v1.zfs",
            "io.containerd.snapshotter.v1.aufs",
            "io.containerd.snapshotter.v1.devmapper",
        ],
        &extra,
        // containerd finds containerd-shim-vmrun-v2 (and the shim vmrun-oci
        // and vmrun-vmm) in the directory cargo built them in.
        Path::new(SHIM).parent().unwrap(),
        &[("VMRUN_HOME", home.as_os_str()), ("VMRUN_KERNEL", kernel.as_os_str()), ("VMRUN_AGENT_INITRD", initrd.as_os_str())],
    );
    for archive in [&pause_archive, &busybox_archive] {
        let o = containerd.ctr(K8S_NS, &["images", "import", archive.to_str().unwrap()]).output().unwrap();
        assert!(o.status.success(), "ctr images import {}: {}{}", archive.display(), text(&o.stdout), text(&o.stderr));
    }
    let cri = Cri::new(&containerd);

    // Version: the CRI serves (once its plugin has started).
    let mut last = String::new();
    let version = poll(Duration::from_secs(60), || {
        let log = containerd.log();
        assert!(!log.contains("failed to load plugin io.containerd.grpc.v1.cri"), "the CRI plugin did not load:\n{log}");
        cri.try_call(CALL, cri.rs().version(VersionRequest { version: "v1".into() })).map_err(|e| last = e).ok()
    })
    .unwrap_or_else(|| panic!("the CRI did not answer Version ({last}); containerd's log:\n{}", containerd.log_tail(80)));
    eprintln!("cri test: {} {} (CRI {})", version.runtime_name, version.runtime_version, version.runtime_api_version);
    assert_eq!(version.runtime_name, "containerd");
    assert_eq!(version.runtime_api_version, "v1");
    // The imported images, as the CRI's image service sees them (it learns
    // of them from containerd's events).
    for image in [PAUSE_IMAGE, BUSYBOX_IMAGE] {
        let seen = poll(Duration::from_secs(30), || {
            let req = ImageStatusRequest { image: Some(ImageSpec { image: image.into(), ..Default::default() }), verbose: false };
            cri.try_call(CALL, cri.images.clone().image_status(req)).ok().and_then(|r| r.image)
        });
        assert!(seen.is_some(), "the CRI does not see {image}");
    }

    // RunPodSandbox: the pause container in a VM that gets the pod's
    // network.
    let logs = dir.join("pod-logs");
    std::fs::create_dir_all(&logs).unwrap();
    let sandbox_config = PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: "web".into(),
            uid: format!("vmrun-cri-test-uid-{pid}"),
            namespace: "vmrun-cri-test".into(),
            attempt: 0,
        }),
        hostname: "web-pod".into(),
        log_directory: logs.to_string_lossy().into_owned(),
        linux: Some(LinuxPodSandboxConfig {
            cgroup_parent: cgroup_parent.clone(),
            // The pod's network and IPC, and (shareProcessNamespace) its
            // PID namespace, as kubelet asks for them.
            security_context: Some(LinuxSandboxSecurityContext {
                namespace_options: Some(pod_namespaces()),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let mut pod = PodGuard { cri: &cri, sandbox: None, ids: Vec::new() };
    let pod_start = Instant::now();
    let req = RunPodSandboxRequest { config: Some(sandbox_config.clone()), runtime_handler: "vmrun".into() };
    let sandbox = cri.call("RunPodSandbox (boots a template)", BOOTS_A_TEMPLATE, cri.rs().run_pod_sandbox(req)).pod_sandbox_id;
    pod.sandbox = Some(sandbox.clone());
    pod.ids.push(sandbox.clone());
    host.ids.push(sandbox.clone());
    let status = cri.call(
        "PodSandboxStatus",
        CALL,
        cri.rs().pod_sandbox_status(PodSandboxStatusRequest { pod_sandbox_id: sandbox.clone(), verbose: true }),
    );
    let info = verbose_info(&status.info);
    let sandbox_status = status.status.unwrap();
    assert_eq!(sandbox_status.state, PodSandboxState::SandboxReady as i32, "{sandbox_status:?}");
    assert_eq!(sandbox_status.runtime_handler, "vmrun");
    assert_eq!(info["runtimeType"], "io.containerd.vmrun.v2", "{info}");
    let pod_ip = sandbox_status.network.as_ref().map(|n| n.ip.clone()).unwrap_or_default();
    assert!(pod_ip.starts_with(&format!("{net}.")), "the pod's address {pod_ip:?} is not on {net}.0/24");
    let netns = info["runtimeSpec"]["linux"]["namespaces"]
        .as_array()
        .and_then(|l| l.iter().find(|n| n["type"] == "network"))
        .and_then(|n| n["path"].as_str())
        .map(PathBuf::from)
        .unwrap_or_else(|| panic!("no network namespace path in the sandbox's spec: {info}"));
    // (/var/run is a link to /run, where the mount table has it.)
    let netns = std::fs::canonicalize(&netns).unwrap_or_else(|e| panic!("the pod's network namespace {}: {e}", netns.display()));
    host.netns = Some(netns.clone());
    let sandbox_pid = info["pid"].as_u64().unwrap_or_else(|| panic!("no pid in the sandbox's info: {info}"));
    let (sandbox_supervisor, sandbox_vmm) = runtime_pids(&sandbox);
    let sandbox_vmm = sandbox_vmm.unwrap_or_else(|| panic!("the sandbox {sandbox} has no VMM"));
    let sandbox_jail = support::jail_paths(sandbox_vmm);
    eprintln!("cri test: pod {sandbox}: address {pod_ip}, network namespace {}", netns.display());

    // A configmap-like file on the host, bind-mounted read-only into the
    // container (kubelet's subPath-free configmap volume: a directory of
    // links through `..data`), and a plain file beside it.
    let volumes = dir.join("volumes");
    let config_dir = volumes.join("config");
    support::configmap(&config_dir, "..2024_a", &[("greeting", "hello-v1")]);
    let app_conf = volumes.join("app.conf");
    std::fs::write(&app_conf, "mode=one\n").unwrap();

    // CreateContainer, StartContainer: busybox's httpd serving a file, in
    // the sandbox's VM. It says it serves (the log) and exits 0 on SIGTERM
    // (its trap).
    let container_config = ContainerConfig {
        metadata: Some(ContainerMetadata { name: "server".into(), attempt: 0 }),
        image: Some(ImageSpec { image: BUSYBOX_IMAGE.into(), ..Default::default() }),
        command: vec!["sh".into(), "-c".into()],
        args: vec!["trap 'exit 0' TERM; mkdir -p /www; echo served-from-a-vmrun-pod > /www/index.html; \
                    echo server-says-hello; httpd -f -p 8080 -h /www & wait"
            .into()],
        mounts: vec![
            Mount {
                container_path: "/etc/config".into(),
                host_path: config_dir.to_string_lossy().into(),
                readonly: true,
                ..Default::default()
            },
            Mount {
                container_path: "/etc/app.conf".into(),
                host_path: app_conf.to_string_lossy().into(),
                readonly: true,
                ..Default::default()
            },
        ],
        log_path: "server/0.log".into(),
        linux: Some(in_pod_namespaces()),
        ..Default::default()
    };
    let req = CreateContainerRequest {
        pod_sandbox_id: sandbox.clone(),
        config: Some(container_config),
        sandbox_config: Some(sandbox_config.clone()),
    };
    let container = cri.call("CreateContainer", CALL, cri.rs().create_container(req)).container_id;
    pod.ids.push(container.clone());
    host.ids.push(container.clone());
    // (containerd's CRI creates the task, `vmrun-oci create`, here.)
    cri.call("StartContainer", CALL, cri.rs().start_container(StartContainerRequest { container_id: container.clone() }));

    // A second container of the pod: a client, in the same VM.
    let client_config = ContainerConfig {
        metadata: Some(ContainerMetadata { name: "client".into(), attempt: 0 }),
        image: Some(ImageSpec { image: BUSYBOX_IMAGE.into(), ..Default::default() }),
        command: vec!["sh".into(), "-c".into()],
        args: vec!["trap 'exit 0' TERM; sleep 3600 & wait".into()],
        log_path: "client/0.log".into(),
        linux: Some(in_pod_namespaces()),
        ..Default::default()
    };
    let req = CreateContainerRequest {
        pod_sandbox_id: sandbox.clone(),
        config: Some(client_config),
        sandbox_config: Some(sandbox_config.clone()),
    };
    let client = cri.call("CreateContainer (client)", CALL, cri.rs().create_container(req)).container_id;
    pod.ids.push(client.clone());
    host.ids.push(client.clone());
    cri.call("StartContainer (client)", CALL, cri.rs().start_container(StartContainerRequest { container_id: client.clone() }));
    eprintln!(
        "cri test: RunPodSandbox to both containers running: {:.1} s (the first pod of a data directory boots the pod's template)",
        pod_start.elapsed().as_secs_f64()
    );

    // ContainerStatus: running, its log where the CRI says.
    let status = cri.call(
        "ContainerStatus",
        CALL,
        cri.rs().container_status(ContainerStatusRequest { container_id: container.clone(), verbose: true }),
    );
    let container_info = verbose_info(&status.info);
    let cstatus = status.status.unwrap();
    assert_eq!(cstatus.state, ContainerState::ContainerRunning as i32, "{cstatus:?}");
    assert_eq!(Path::new(&cstatus.log_path), logs.join("server/0.log"));
    let container_pid = container_info["pid"].as_u64().unwrap_or_else(|| panic!("no pid in the container's info: {container_info}"));
    let (container_supervisor, container_vmm) = runtime_pids(&container);
    assert_eq!(container_vmm, None, "the pod's container {container} has a VM of its own, not the sandbox's");
    let client_status = cri.call(
        "ContainerStatus (client)",
        CALL,
        cri.rs().container_status(ContainerStatusRequest { container_id: client.clone(), verbose: true }),
    );
    let client_pid = verbose_info(&client_status.info)["pid"].as_u64().unwrap_or_else(|| panic!("no pid in the client's info"));
    let (client_supervisor, client_vmm) = runtime_pids(&client);
    assert_eq!(client_vmm, None, "the pod's client {client} has a VM of its own, not the sandbox's");
    // One shim serves the pod: the containers' shims found their
    // sandbox's running and handed containerd its address.
    let shims = processes_mentioning(&[&containerd.sock.to_string_lossy()]);
    assert_eq!(shims.len(), 1, "one shim for the pod: {:?}", shims.iter().map(|p| cmdline(*p)).collect::<Vec<_>>());
    // What the pod takes of the host's memory: its VMM (the jail's
    // process and the VMM in it; guest memory the guest touched
    // included), the shims, and vmrun-oci's supervisors and holders (the
    // containers' pids), as proportional set sizes.
    let vmm_tree = with_descendants(&[sandbox_vmm]);
    let pss = |pids: &[u64]| -> u64 { pids.iter().map(|p| pss_kib(*p)).sum() };
    let (vmm_kib, shim_kib) = (pss(&vmm_tree), pss(&shims));
    let oci_kib = pss(&[sandbox_supervisor, container_supervisor, client_supervisor, sandbox_pid, container_pid, client_pid]);
    eprintln!(
        "cri test: host memory of the pod (PSS): {:.1} MiB: VMM {:.1} MiB, shims {:.1} MiB ({}), supervisors and holders {:.1} MiB",
        (vmm_kib + shim_kib + oci_kib) as f64 / 1024.0,
        vmm_kib as f64 / 1024.0,
        shim_kib as f64 / 1024.0,
        shims.len(),
        oci_kib as f64 / 1024.0
    );
    // What must be gone at the end is there now: the VMMs' jails, mounts
    // under containerd's directory (the containers' roots, the pod's
    // /dev/shm) and the pod's network namespace, the pod's veth on the
    // bridge, cgroups under the pod's parent.
    assert!(sandbox_jail.len() >= 3, "the VMM is jailed: {sandbox_jail:?}");
    assert!(!mounts_under(&dir).is_empty(), "no mounts under {}", dir.display());
    assert!(!mounts_under(&netns).is_empty(), "the pod's network namespace {} is not mounted", netns.display());
    assert!(std::fs::read_dir(format!("/sys/class/net/{bridge}/brif")).is_ok_and(|mut d| d.next().is_some()), "no port on {bridge}");
    let running_cgroups = cgroup_dirs_under(&cgroup_parent);
    assert!(
        [&sandbox, &container, &client].iter().all(|id| running_cgroups.iter().any(|c| c.ends_with(id.as_str()))),
        "no cgroups of the pod's containers under {cgroup_parent}: {running_cgroups:?}"
    );

    // ExecSync: exit codes, and the mounted files' contents.
    let r = cri.exec(&container, &["sh", "-c", "echo out; echo err >&2; exit 3"]);
    assert_eq!((r.exit_code, text(&r.stdout), text(&r.stderr)), (3, "out\n".into(), "err\n".into()));
    assert_eq!(cri.sh(&container, "cat /etc/config/greeting; echo; cat /etc/app.conf"), "hello-v1\nmode=one\n");
    // The pod's host name: in the file the CRI mounts and in the
    // environment it gives.
    assert_eq!(cri.sh(&container, "cat /etc/hostname; echo $HOSTNAME"), "web-pod\nweb-pod\n");
    // And uname's: the container joins the sandbox's UTS namespace by
    // path (its spec has no `hostname`), which holds the pod's name; in
    // the pod's VM the agent shares the sandbox's namespace with it.
    assert_eq!(cri.sh(&container, "hostname"), "web-pod\n", "the container's uname nodename");
    assert_eq!(cri.sh(&client, "hostname"), "web-pod\n", "the client's uname nodename");
    // One PID namespace for the pod: its first process is the sandbox's
    // pause, and the client sees the server's httpd.
    let ps = cri.sh(&client, "cat /proc/1/cmdline; echo; ps -o comm");
    assert!(ps.starts_with("/pause") && ps.lines().any(|l| l.trim() == "httpd"), "the client's view of the pod's processes: {ps}");

    // ContainerStats: the container's cgroup in the guest, through the
    // shim's Stats.
    let stats = cri.call("ContainerStats", CALL, cri.rs().container_stats(ContainerStatsRequest { container_id: container.clone() }));
    let stats = stats.stats.unwrap();
    let working_set = stats.memory.as_ref().and_then(|m| m.working_set_bytes.as_ref()).map_or(0, |v| v.value);
    let cpu = stats.cpu.as_ref().and_then(|c| c.usage_core_nano_seconds.as_ref()).map_or(0, |v| v.value);
    assert!(working_set > 0 && cpu > 0, "the server's stats: {stats:?}");
    eprintln!("cri test: the server's working set {} KiB, CPU {} ms", working_set / 1024, cpu / 1_000_000);
    // UpdateContainerResources: a memory limit in the guest cgroup (a
    // process that touches 16 MiB under 8 MiB is killed by the guest's
    // OOM killer, and not once the limit is raised); one above the pod's
    // VM memory is refused.
    let update = |bytes: i64| {
        let linux = LinuxContainerResources { memory_limit_in_bytes: bytes, ..Default::default() };
        cri.try_call(CALL, cri.rs().update_container_resources(UpdateContainerResourcesRequest { container_id: client.clone(), linux: Some(linux), ..Default::default() }))
    };
    update(8 << 20).unwrap();
    let r = cri.exec(&client, &["dd", "if=/dev/zero", "of=/dev/null", "bs=16M", "count=1"]);
    assert_eq!(r.exit_code, 137, "dd under an 8 MiB limit: {}", text(&r.stderr));
    // The shim reported the guest's OOM kill (TaskOOM): the CRI marks the
    // container.
    let reason = poll(Duration::from_secs(30), || {
        let s = cri.try_call(CALL, cri.rs().container_status(ContainerStatusRequest { container_id: client.clone(), verbose: false }));
        s.ok().and_then(|s| s.status).map(|s| s.reason).filter(|r| r == "OOMKilled")
    });
    assert!(reason.is_some(), "the client's status does not say OOMKilled");
    let refused = update(4 << 30).unwrap_err();
    assert!(refused.contains("above the container's VM memory"), "{refused}");
    update(256 << 20).unwrap();
    let r = cri.exec(&client, &["dd", "if=/dev/zero", "of=/dev/null", "bs=16M", "count=1"]);
    assert_eq!(r.exit_code, 0, "dd under a 256 MiB limit: {}", text(&r.stderr));

    // The container's log: CRI's format, `TIMESTAMP STREAM TAG LINE`.
    let log_path = PathBuf::from(&cstatus.log_path);
    let log = poll(Duration::from_secs(30), || {
        std::fs::read_to_string(&log_path).ok().filter(|l| l.lines().any(|l| l.ends_with(" stdout F server-says-hello")))
    })
    .unwrap_or_else(|| panic!("no \"stdout F server-says-hello\" in {}: {:?}", log_path.display(), std::fs::read_to_string(&log_path)));
    for line in log.lines() {
        let fields: Vec<&str> = line.splitn(4, ' ').collect();
        assert!(
            fields.len() == 4
                && fields[0].ends_with('Z')
                && fields[0].contains('T')
                && ["stdout", "stderr"].contains(&fields[1])
                && ["F", "P"].contains(&fields[2]),
            "not a CRI log line: {line:?}"
        );
    }

    // The pod's address from the host, through the bridge's route: the
    // sandbox's VM holds the address CNI gave the pod and answers.
    let ping = Command::new("busybox").args(["ping", "-c", "1", "-W", "10", &pod_ip]).output().unwrap();
    assert!(ping.status.success(), "ping {pod_ip}: {}{}", text(&ping.stdout), text(&ping.stderr));
    // The server serves (on the loopback of the VM it is in).
    let page = poll(Duration::from_secs(60), || {
        let r = cri.exec(&container, &["wget", "-qO-", "http://127.0.0.1:8080/"]);
        (r.exit_code == 0).then(|| text(&r.stdout))
    });
    assert_eq!(page.as_deref(), Some("served-from-a-vmrun-pod\n"), "the server in the container does not answer on its loopback");
    // The server on the pod's address, from the host: the pod's interface
    // is mirrored to the pod's VM.
    let url = format!("http://{pod_ip}:8080/");
    let served = poll(Duration::from_secs(60), || {
        let o = Command::new("curl").args(["-sS", "-m", "5", &url]).output().unwrap();
        o.status.success().then(|| text(&o.stdout))
    });
    assert_eq!(served.as_deref(), Some("served-from-a-vmrun-pod\n"), "the pod's server from the host on {url}");
    // The client reaches the server over localhost: one network
    // namespace, the pod's, in one VM.
    let r = cri.exec(&client, &["wget", "-qO-", "http://127.0.0.1:8080/"]);
    assert_eq!((r.exit_code, text(&r.stdout)), (0, "served-from-a-vmrun-pod\n".into()), "the client over localhost: {}", text(&r.stderr));

    // The mounted files, updated on the host while the pod runs (kubelet's
    // swap of `..data`, a rewrite), are seen inside.
    support::configmap(&config_dir, "..2024_b", &[("greeting", "hello-v2")]);
    std::fs::write(&app_conf, "mode=two\n").unwrap();
    let t = Instant::now();
    let mut seen = String::new();
    let updated = poll(Duration::from_secs(60), || {
        seen = cri.sh(&container, "cat /etc/config/greeting; echo; cat /etc/app.conf");
        (seen == "hello-v2\nmode=two\n").then_some(())
    });
    assert!(updated.is_some(), "the mounted files are not updated after {:?}: {seen:?}", t.elapsed());
    eprintln!("cri test: mounted files updated in {:.1} s", t.elapsed().as_secs_f64());

    // StopContainer: SIGTERM, which the container's trap turns into exit 0.
    cri.call("StopContainer", CALL, cri.rs().stop_container(StopContainerRequest { container_id: container.clone(), timeout: 30 }));
    let cstatus = cri
        .call(
            "ContainerStatus",
            CALL,
            cri.rs().container_status(ContainerStatusRequest { container_id: container.clone(), verbose: false }),
        )
        .status
        .unwrap();
    assert_eq!((cstatus.state, cstatus.exit_code), (ContainerState::ContainerExited as i32, 0), "{cstatus:?}");
    cri.call("RemoveContainer", CALL, cri.rs().remove_container(RemoveContainerRequest { container_id: container.clone() }));
    cri.call("StopContainer (client)", CALL, cri.rs().stop_container(StopContainerRequest { container_id: client.clone(), timeout: 30 }));
    cri.call("RemoveContainer (client)", CALL, cri.rs().remove_container(RemoveContainerRequest { container_id: client.clone() }));
    cri.call("StopPodSandbox", CALL, cri.rs().stop_pod_sandbox(StopPodSandboxRequest { pod_sandbox_id: sandbox.clone() }));
    cri.call("RemovePodSandbox", CALL, cri.rs().remove_pod_sandbox(RemovePodSandboxRequest { pod_sandbox_id: sandbox.clone() }));
    pod.sandbox = None;

    // Nothing of the pod is left: its processes (the containers' pids,
    // supervisors and VMMs, the shims), their jails, runtime states,
    // network namespace, mounts, ports on the bridge and cgroups.
    let pids = [
        ("sandbox pid", sandbox_pid),
        ("sandbox supervisor", sandbox_supervisor),
        ("sandbox VMM", sandbox_vmm),
        ("container pid", container_pid),
        ("container supervisor", container_supervisor),
        ("client pid", client_pid),
        ("client supervisor", client_supervisor),
    ];
    let mut recorded: Vec<(String, u64)> = pids.iter().map(|(w, p)| (w.to_string(), *p)).collect();
    recorded.extend(shims.iter().map(|p| ("shim".to_string(), *p)));
    let left = poll(Duration::from_secs(30), || {
        let mut left: Vec<String> =
            recorded.iter().filter(|(_, p)| support::alive(*p)).map(|(w, p)| format!("{w} {p}: {}", cmdline(*p))).collect();
        for p in processes_mentioning(&[&sandbox, &container, &client, &containerd.sock.to_string_lossy()]) {
            left.push(format!("{p}: {}", cmdline(p)));
        }
        left.is_empty().then_some(())
    });
    let still: Vec<String> =
        recorded.iter().filter(|(_, p)| support::alive(*p)).map(|(w, p)| format!("{w} {p}: {}", cmdline(*p))).collect();
    let others: Vec<String> = processes_mentioning(&[&sandbox, &container, &client, &containerd.sock.to_string_lossy()])
        .iter()
        .map(|p| format!("{p}: {}", cmdline(*p)))
        .collect();
    assert!(left.is_some(), "processes of the pod left: {still:?} {others:?}");
    let jails: Vec<PathBuf> = sandbox_jail.iter().filter(|p| p.exists()).cloned().collect();
    assert!(jails.is_empty(), "the VMMs' jails left {jails:?}");
    for id in [&sandbox, &container, &client] {
        let root = vmrun_oci::shim::root_of(K8S_NS);
        assert!(!root.join(id).exists(), "{id}'s runtime state is left in {}", root.display());
    }
    assert!(!netns.exists(), "the pod's network namespace {} is left", netns.display());
    let mounts: Vec<PathBuf> = mounts_under(&dir).into_iter().chain(mounts_under(&netns)).collect();
    assert!(mounts.is_empty(), "mounts left: {mounts:?}");
    let ports: Vec<String> = std::fs::read_dir(format!("/sys/class/net/{bridge}/brif"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(ports.is_empty(), "interfaces left on the pod bridge {bridge}: {ports:?}");
    let cgroups = cgroup_dirs_under(&cgroup_parent);
    assert!(cgroups.is_empty(), "cgroups of the pod left: {cgroups:?}");
    eprintln!("cri test: done in {:.1} s", t0.elapsed().as_secs_f64());
    drop(pod);
    drop(cri);
    drop(containerd);
    drop(host);
}
