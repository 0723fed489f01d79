//! Warm start: a snapshot of a booted guest whose agent waits for work.
//!
//! The first VM for a given kernel, agent initramfs, memory size and vCPU
//! count boots, waits for its agent, and is snapshotted into
//! `templates/<key>/`; later VMs restore from it in milliseconds instead of
//! booting, with the image's layer disk in the template's disk slot. The
//! key hashes the inputs (the files' contents included), so a template
//! that no longer matches them is never used: a new one is built.

use std::fs::File;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use vmrun_agent_client::Options;

use crate::lock::Lock;
use crate::vm::{VmProcess, VmSpec};
use crate::{Error, Result};

/// What a template depends on: kernel, agent, memory, vCPUs, command
/// line, and its device slots (a template with a network slot is another
/// template). Volume disks and the TAP device are chosen at restore.
#[derive(Debug, Clone)]
pub struct TemplateKey {
    pub hash: String,
}

/// FNV-1a over bytes, continuing from `h`.
fn fnv(mut h: u64, bytes: &[u8]) -> u64 {
    for b in bytes {
        h = (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3);
    }
    h
}

fn hash_file(h: u64, path: &Path) -> std::io::Result<u64> {
    let mut f = File::open(path)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut h = h;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok(h);
        }
        h = fnv(h, &buf[..n]);
    }
}

/// How the VMM boots a template's guest, beyond its spec: bumped when that
/// changes, so that templates booted the older way are not restored
/// (2: the guest's TSC frequency on the command line of emulating hosts).
const BOOT_REVISION: u32 = 2;

/// The file in a base template that records what it was made from
/// ([`Inputs`]), for `vmrun system prune` to tell a stale template.
pub const INPUTS_FILE: &str = "inputs.json";

/// What a base template was made from, beyond its VM's size: templates
/// whose `artifacts` is not the current one will never be used again.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Inputs {
    /// [`artifacts_hash`] of its kernel, agent and vmrun version.
    pub artifacts: String,
}

/// A hash of the kernel, the agent initramfs (their contents) and vmrun's
/// version and boot revision: what every template key depends on, whatever
/// the VM's size.
pub fn artifacts_hash(artifacts: &crate::artifacts::Artifacts) -> std::io::Result<String> {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    h = hash_file(h, &artifacts.kernel)?;
    h = hash_file(h, &artifacts.agent_initrd)?;
    h = fnv(h, format!("{} boot-revision={BOOT_REVISION}", env!("CARGO_PKG_VERSION")).as_bytes());
    Ok(format!("{h:016x}"))
}

impl TemplateKey {
    /// The key of a VM made as `spec` describes (the layer disk aside).
    pub fn of(spec: &VmSpec) -> std::io::Result<Self> {
        let mut h = 0xcbf2_9ce4_8422_2325u64;
        h = hash_file(h, &spec.artifacts.kernel)?;
        h = hash_file(h, &spec.artifacts.agent_initrd)?;
        let slots = format!("volumes={} net={}", crate::volume::SLOTS, spec.tap.is_some());
        let version = format!("{} boot-revision={BOOT_REVISION}", env!("CARGO_PKG_VERSION"));
        h = fnv(h, format!("{} {} {} {version} {slots}", spec.mem_mib, spec.cpus, spec.cmdline()).as_bytes());
        Ok(Self { hash: format!("{h:016x}") })
    }
}

/// The template for `spec` under `dir`, built if missing (a boot: minutes
/// on hosts that emulate guest kernel mode). Returns its directory.
/// `vmm` is told the template VMM's pid while one runs (`None` once it has
/// ended): a caller that kills it (on a signal) makes the build fail and
/// clean up after itself.
pub fn ensure(dir: &Path, spec: &VmSpec, progress: &dyn Fn(&str), vmm: &dyn Fn(Option<u32>)) -> Result<PathBuf> {
    let key = TemplateKey::of(spec)?;
    let path = dir.join(&key.hash);
    if path.join("vmstate.json").is_file() {
        return Ok(path);
    }
    std::fs::create_dir_all(dir)?;
    let _lock = Lock::take(&dir.join(format!("{}.lock", key.hash)))?;
    if path.join("vmstate.json").is_file() {
        return Ok(path); // another vmrun built it meanwhile
    }
    // Whatever a build of this template killed with SIGKILL left: we hold
    // its lock, so no build of it runs.
    collect_stale_builds(dir, &key.hash);
    vmrun_jail::collect_orphans();
    progress("booting a template VM for warm starts (once per kernel, agent and VM size)");
    let work = dir.join(format!("{}.build-{}", key.hash, std::process::id()));
    std::fs::create_dir_all(&work)?;
    let result = build(&work, spec, vmm);
    match result {
        Ok(snapshot) => {
            let inputs = Inputs { artifacts: artifacts_hash(&spec.artifacts)? };
            std::fs::write(snapshot.join(INPUTS_FILE), serde_json::to_vec(&inputs).map_err(std::io::Error::other)?)?;
            own_by_root(&snapshot)?;
            std::fs::rename(&snapshot, &path)?;
            let _ = std::fs::remove_dir_all(&work);
            Ok(path)
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&work);
            Err(e)
        }
    }
}

/// Removes the work directories (`<key>.build-<pid>`) of builds of the
/// template `key` under `dir`; the caller holds that template's lock, so
/// they belong to builds that died. Returns what it removed.
pub fn collect_stale_builds(dir: &Path, key: &str) -> Vec<PathBuf> {
    let prefix = format!("{key}.build-");
    let mut removed = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.file_name().to_string_lossy().starts_with(&prefix) {
            let p = e.path();
            match std::fs::remove_dir_all(&p) {
                Ok(()) => removed.push(p),
                Err(err) => log::warn!("cannot remove {}: {err}", p.display()),
            }
        }
    }
    removed
}

/// Gives a snapshot a (jailed) VMM wrote to root, so that no later VMM
/// running as the same uid could change a template others restore.
fn own_by_root(dir: &Path) -> std::io::Result<()> {
    vmrun_jail::chown_tree(dir, 0)
}

/// Boots the template VM and snapshots it; returns the snapshot's
/// directory (in the VM's own directory: a jailed VMM writes nowhere else).
fn build(work: &Path, spec: &VmSpec, vmm: &dyn Fn(Option<u32>)) -> Result<PathBuf> {
    // The disk slot gets a placeholder; each run puts its image there.
    let placeholder = work.join("placeholder.disk");
    File::create(&placeholder)?.set_len(4096)?;
    // Volume slots stay empty; a network slot is built on the TAP device of
    // the container that needs the template first.
    let template_spec = VmSpec { layer_disk: placeholder, volumes: Vec::new(), dir: work.join("vm"), ..spec.clone() };
    let mut vm: VmProcess = template_spec.boot()?;
    vmm(Some(vm.pid()));
    let result = snapshot_booted(&mut vm, spec);
    // It has ended (or is killed on drop): its pid is no longer ours to
    // signal.
    vmm(None);
    drop(vm);
    result
}

/// Waits for the template VM's agent, then snapshots the VM and stops it.
fn snapshot_booted(vm: &mut VmProcess, spec: &VmSpec) -> Result<PathBuf> {
    let client = vm.connect_agent(Duration::from_secs(900), Options::default())?;
    client.ping()?;
    client.close();
    let snap = vm.vm_dir.join("snapshot");
    let status = Command::new(&spec.vmm_exe)
        .args(["snapshot", "create", "--control"])
        .arg(&vm.control)
        .arg("--dir")
        .arg(&snap)
        .stdin(Stdio::null())
        .output()?;
    if !status.status.success() {
        return Err(Error::Io(std::io::Error::other(format!(
            "snapshot of the template VM failed: {}",
            String::from_utf8_lossy(&status.stderr).trim()
        ))));
    }
    let _ = Command::new(&spec.vmm_exe).args(["vm", "--control"]).arg(&vm.control).arg("stop").output();
    vm.wait(Duration::from_secs(30))?;
    Ok(snap)
}

/// The id of the container in a prepared template.
pub const PREPARED_ID: &str = "prepared";

/// The lock file of a template directory (`<name>.lock`, next to it):
/// held exclusively while it is built or saved, shared while a VM is
/// restored from it, and exclusively (without waiting) by whatever removes
/// it.
pub fn lock_path(dir: &Path) -> PathBuf {
    let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    dir.with_file_name(format!("{name}.lock"))
}

/// The first 16 hex digits of a manifest digest, as prepared templates are
/// named (`<key>-image-<hex>`).
pub fn prepared_suffix(manifest_digest: &str) -> String {
    manifest_digest.trim_start_matches("sha256:").chars().take(16).collect()
}

/// Where the prepared template of an image lives: a snapshot of the base
/// template's guest after its agent unpacked the image (container
/// [`PREPARED_ID`], created with the image's own configuration), so that
/// later runs of the image start its process at once.
pub fn prepared_dir(base: &Path, manifest_digest: &str) -> PathBuf {
    let hex = prepared_suffix(manifest_digest);
    let name = base.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    base.with_file_name(format!("{name}-image-{hex}"))
}

/// Whether a template is complete.
pub fn is_ready(dir: &Path) -> bool {
    dir.join("vmstate.json").is_file()
}

/// Snapshots the running VM into `dir` (and lets it run on), unless
/// another vmrun is doing it or has done it. The VMM writes the snapshot
/// in its own directory; it is then given to root and moved into place.
/// Best effort: a failure only means later runs unpack again.
pub fn save_prepared(vmm_exe: &Path, vm: &VmProcess, dir: &Path) {
    let Ok(lock) = File::create(lock_path(dir)) else { return };
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 || is_ready(dir) {
        return;
    }
    let tmp = vm.vm_dir.join("prepared-snapshot");
    let _ = std::fs::remove_dir_all(&tmp);
    let out = Command::new(vmm_exe)
        .args(["snapshot", "create", "--resume", "--control"])
        .arg(&vm.control)
        .arg("--dir")
        .arg(&tmp)
        .stdin(Stdio::null())
        .output();
    match out {
        Ok(o) if o.status.success() => {
            if let Err(e) = own_by_root(&tmp).and_then(|()| std::fs::rename(&tmp, dir)) {
                log::warn!("cannot keep the prepared template {}: {e}", dir.display());
                let _ = std::fs::remove_dir_all(&tmp);
            }
        }
        Ok(o) => {
            log::warn!("no prepared template: {}", String::from_utf8_lossy(&o.stderr).trim());
            let _ = std::fs::remove_dir_all(&tmp);
        }
        Err(e) => log::warn!("no prepared template: {e}"),
    }
}

/// Starts a VM for `spec` from the template at `template`. The template's
/// lock is held (shared) until the VM's agent answers (the VMM has read
/// the snapshot by then), so that it is not removed meanwhile.
pub fn restore(template: &Path, spec: &VmSpec) -> Result<VmProcess> {
    let using = Lock::shared(&lock_path(template))?;
    if !is_ready(template) {
        return Err(Error::Io(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("the template {} was removed; run again", template.display()),
        )));
    }
    let mut vm = VmProcess::restore(template, spec)?;
    vm.hold_until_ready(using);
    Ok(vm)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn stale_build_directories_of_a_template_go() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for p in ["aaaa.build-1/vm", "aaaa.build-22", "bbbb.build-3", "aaaa/vm", "aaaa-image-1234"] {
            std::fs::create_dir_all(d.join(p)).unwrap();
        }
        let mut removed = collect_stale_builds(d, "aaaa");
        removed.sort();
        assert_eq!(removed, vec![d.join("aaaa.build-1"), d.join("aaaa.build-22")]);
        assert!(d.join("bbbb.build-3").is_dir() && d.join("aaaa/vm").is_dir() && d.join("aaaa-image-1234").is_dir());
    }
}
