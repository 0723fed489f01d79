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
use std::path::{Path, PathBuf};
use std::time::Duration;

use vmrun_agent_client::Options;
use vmrun_vmm_api::hash::{fnv1a_continue, FNV_OFFSET};
use vmrun_vmm_api::control::{self, Request};

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

/// The XXH3 hash of `path`'s contents.
fn xxh3_file(path: &Path) -> std::io::Result<u64> {
    use std::hash::Hasher;
    let mut f = File::open(path)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut xxh = twox_hash::XxHash3_64::new();
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok(xxh.finish());
        }
        xxh.write(&buf[..n]);
    }
}

/// The hashes of the files templates depend on (the kernel and the agent,
/// about 20 MB, which every warm run's template key covers), remembered in
/// a directory by the file's identity and stamps (device, inode, size,
/// modification and change times): a run reads them again only when one
/// of those changed. Writing a file changes its change time, which no
/// one can set back.
#[derive(Debug, Clone)]
pub struct FileHashes {
    dir: PathBuf,
}

impl FileHashes {
    /// The hashes remembered for the templates under `templates`.
    pub fn of_templates(templates: &Path) -> Self {
        Self { dir: templates.join("file-hashes") }
    }

    /// Continues `h` with the hash of `path`'s contents.
    fn continue_with(&self, h: u64, path: &Path) -> std::io::Result<u64> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path)?;
        let id = format!("{}-{}", m.dev(), m.ino());
        let stamp = format!("{} {}.{} {}.{}", m.size(), m.mtime(), m.mtime_nsec(), m.ctime(), m.ctime_nsec());
        let entry = self.dir.join(&id);
        let remembered = std::fs::read_to_string(&entry).ok().and_then(|s| {
            let (st, hash) = s.trim_end().rsplit_once(' ')?;
            (st == stamp).then(|| u64::from_str_radix(hash, 16).ok()).flatten()
        });
        let hash = match remembered {
            Some(hash) => hash,
            None => {
                let hash = xxh3_file(path)?;
                // At worst the next run hashes the file again.
                let tmp = self.dir.join(format!(".{id}.{}.tmp", std::process::id()));
                let saved = std::fs::create_dir_all(&self.dir)
                    .and_then(|()| std::fs::write(&tmp, format!("{stamp} {hash:016x}\n")))
                    .and_then(|()| std::fs::rename(&tmp, &entry));
                if let Err(e) = saved {
                    let _ = std::fs::remove_file(&tmp);
                    log::debug!("cannot remember the hash of {}: {e}", path.display());
                }
                hash
            }
        };
        Ok(fnv1a_continue(h, &hash.to_le_bytes()))
    }
}

/// How the VMM boots a template's guest, beyond its spec: bumped when that
/// changes, so that templates booted the older way are not restored
/// (2: the guest's TSC frequency on the command line of emulating hosts;
/// 3: there, no SMP alternatives patched and no `rep movsb` string copies;
/// 4: a random seed for the guest kernel, and a vsock receive queue of 64
/// descriptors, which a snapshot's device state records; 5: no hwrng
/// feeding thread in the guest).
const BOOT_REVISION: u32 = 5;

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

/// A hash of the kernel (and its uniprocessor build), the agent initramfs
/// (their contents) and vmrun's version and boot revision: what every
/// template key depends on, whatever the VM's size.
pub fn artifacts_hash(artifacts: &crate::artifacts::Artifacts, hashes: &FileHashes) -> std::io::Result<String> {
    Ok(format!("{:016x}", artifacts_fnv(artifacts, hashes)?))
}

/// [`artifacts_hash`], as the number both it and [`TemplateKey`] build on.
fn artifacts_fnv(artifacts: &crate::artifacts::Artifacts, hashes: &FileHashes) -> std::io::Result<u64> {
    let mut h = FNV_OFFSET;
    h = hashes.continue_with(h, &artifacts.kernel)?;
    if let Some(up) = &artifacts.kernel_up {
        h = hashes.continue_with(h, up)?;
    }
    h = hashes.continue_with(h, &artifacts.agent_initrd)?;
    Ok(fnv1a_continue(h, format!("{} boot-revision={BOOT_REVISION}", env!("CARGO_PKG_VERSION")).as_bytes()))
}

impl TemplateKey {
    /// The key of a VM made as `spec` describes (the layer disk aside):
    /// [`artifacts_hash`], continued with the VM's shape.
    pub fn of(spec: &VmSpec, hashes: &FileHashes) -> std::io::Result<Self> {
        let slots = format!("volumes={} net={}", spec.volume_slots, spec.tap.is_some());
        let shape = format!("{} {} {} {slots}", spec.mem_mib, spec.cpus, spec.cmdline());
        let h = fnv1a_continue(artifacts_fnv(&spec.artifacts, hashes)?, shape.as_bytes());
        Ok(Self { hash: format!("{h:016x}") })
    }
}

/// The template for `spec` under `dir`, built if missing (a boot: minutes
/// on hosts that emulate guest kernel mode). Returns its directory.
/// `vmm` is told the template VMM's pid while one runs (`None` once it has
/// ended): a caller that kills it (on a signal) makes the build fail and
/// clean up after itself.
pub fn ensure(dir: &Path, spec: &VmSpec, progress: &dyn Fn(&str), vmm: &dyn Fn(Option<u32>)) -> Result<PathBuf> {
    let hashes = FileHashes::of_templates(dir);
    let key = TemplateKey::of(spec, &hashes)?;
    let path = dir.join(&key.hash);
    if is_ready(&path) {
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
            let inputs = Inputs { artifacts: artifacts_hash(&spec.artifacts, &hashes)? };
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

/// Where the template for `spec` under `dir` is (or would be built by
/// [`ensure`]); nothing is built.
pub fn base_dir(dir: &Path, spec: &VmSpec) -> Result<PathBuf> {
    Ok(dir.join(TemplateKey::of(spec, &FileHashes::of_templates(dir))?.hash))
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
    let template_spec = VmSpec { layer_disk: placeholder, volumes: Vec::new(), read_only_volumes: Vec::new(), dir: work.join("vm"), ..spec.clone() };
    let mut vm: VmProcess = template_spec.boot()?;
    vmm(Some(vm.pid()));
    let result = snapshot_booted(&mut vm);
    // It has ended (or is killed on drop): its pid is no longer ours to
    // signal.
    vmm(None);
    drop(vm);
    result
}

/// How long a snapshot may take: guest memory is written out (zero pages
/// skipped) while the vCPUs are paused.
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(120);

/// Waits for the template VM's agent, then snapshots the VM and stops it,
/// both through its control socket.
///
/// The agent's connection stays open through the snapshot: a restore's
/// transport reset ends it in the guest without a packet. Closed before,
/// the guest's side of the close could be under way in the snapshot (its
/// SHUTDOWN sent, the host's answer not yet taken), and every restore
/// would send a RST at its first tick, ahead of the run's connection.
fn snapshot_booted(vm: &mut VmProcess) -> Result<PathBuf> {
    let client = vm.connect_agent(Duration::from_secs(900), Options::default())?;
    client.ping()?;
    let snap = vm.layout().vm_dir().join("snapshot");
    let snapshot = control::request(&vm.layout().control(), &Request::Snapshot { dir: snap.clone(), resume: false }, SNAPSHOT_TIMEOUT);
    client.close();
    snapshot.map_err(|e| Error::Io(std::io::Error::other(format!("snapshot of the template VM failed: {e}"))))?;
    if let Err(e) = control::request(&vm.layout().control(), &Request::Stop, Duration::from_secs(10)) {
        log::debug!("stopping the template VM: {e}");
    }
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
/// [`PREPARED_ID`], created with the image's own configuration) and set
/// its process up, held before its program, so that later runs of the
/// image only release it with their own program.
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
pub fn save_prepared(vm: &VmProcess, dir: &Path) {
    let _lock = match Lock::try_take(&lock_path(dir)) {
        Ok(Some(l)) if !is_ready(dir) => l,
        _ => return,
    };
    let tmp = vm.layout().vm_dir().join("prepared-snapshot");
    let _ = std::fs::remove_dir_all(&tmp);
    match control::request(&vm.layout().control(), &Request::Snapshot { dir: tmp.clone(), resume: true }, SNAPSHOT_TIMEOUT) {
        Ok(_) => {
            if let Err(e) = own_by_root(&tmp).and_then(|()| std::fs::rename(&tmp, dir)) {
                log::warn!("cannot keep the prepared template {}: {e}", dir.display());
                let _ = std::fs::remove_dir_all(&tmp);
            }
        }
        Err(e) => {
            log::warn!("no prepared template: {e}");
            let _ = std::fs::remove_dir_all(&tmp);
        }
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
    fn file_hashes_are_remembered_until_the_file_changes() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("vmlinux");
        std::fs::write(&file, b"kernel one").unwrap();
        let hashes = FileHashes::of_templates(&dir.path().join("templates"));
        let first = hashes.continue_with(FNV_OFFSET, &file).unwrap();
        assert_eq!(first, fnv1a_continue(FNV_OFFSET, &xxh3_file(&file).unwrap().to_le_bytes()));
        let remembered: Vec<_> = std::fs::read_dir(dir.path().join("templates/file-hashes")).unwrap().collect();
        assert_eq!(remembered.len(), 1, "one entry, no temporary file left");
        assert_eq!(hashes.continue_with(FNV_OFFSET, &file).unwrap(), first);

        // The same size, another content: its change time moves, and the
        // hash is taken again.
        std::thread::sleep(Duration::from_millis(20));
        std::fs::write(&file, b"kernel two").unwrap();
        let second = hashes.continue_with(FNV_OFFSET, &file).unwrap();
        assert_ne!(second, first);
        assert_eq!(second, fnv1a_continue(FNV_OFFSET, &xxh3_file(&file).unwrap().to_le_bytes()));

        // A remembered hash that does not parse is taken again.
        let entry = std::fs::read_dir(dir.path().join("templates/file-hashes")).unwrap().next().unwrap().unwrap().path();
        let stamp = std::fs::read_to_string(&entry).unwrap();
        std::fs::write(&entry, format!("{} zz\n", stamp.trim_end().rsplit_once(' ').unwrap().0)).unwrap();
        assert_eq!(hashes.continue_with(FNV_OFFSET, &file).unwrap(), second);
    }

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

    /// A template build starts `vmrun-vmm --config FILE` and nothing else
    /// (snapshot and stop go through the control socket, no process is
    /// exec'd for them); the file holds the typed boot configuration. A
    /// stand-in VMM records how it was started and exits at once.
    #[test]
    fn a_template_build_execs_only_the_vmm_with_its_configuration() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(d.join("vmlinux"), b"kernel").unwrap();
        std::fs::write(d.join("agent.cpio"), b"agent").unwrap();
        let log = d.join("execs.log");
        let fake = d.join("vmrun-vmm");
        std::fs::write(&fake, format!("#!/bin/sh\necho \"$0 $*\" >> {}\ncp \"$2\" {}\nexit 1\n", log.display(), d.join("seen.json").display()))
            .unwrap();
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
        let spec = VmSpec {
            artifacts: crate::artifacts::Artifacts::new(d.join("vmlinux"), d.join("agent.cpio")),
            mem_mib: 256,
            cpus: 1,
            layer_disk: d.join("layers.disk"),
            volumes: Vec::new(),
            volume_slots: crate::volume::SLOTS,
            read_only_volumes: Vec::new(),
            tap: None,
            netns: None,
            dir: d.join("container"),
            vmm_exe: fake.clone(),
            boot_memory_mib: None,
        };
        let err = ensure(&d.join("templates"), &spec, &|_| {}, &|_| {}).unwrap_err();
        assert!(matches!(err, Error::VmEnded { .. }), "{err}");
        let execs = std::fs::read_to_string(&log).unwrap();
        let lines: Vec<&str> = execs.lines().collect();
        assert_eq!(lines.len(), 1, "{execs}");
        let args: Vec<&str> = lines[0].split(' ').collect();
        assert!(args.len() == 5 && args[0] == fake.to_str().unwrap() && args[1] == "--config" && args[3] == "--ready-fd", "{execs}");
        assert!(args[2].ends_with("/vmm.json") && args[4].parse::<i32>().is_ok_and(|fd| fd > 2), "{execs}");
        let config = vmrun_vmm_api::VmmConfig::from_json(&std::fs::read(d.join("seen.json")).unwrap()).unwrap();
        let vmrun_vmm_api::Start::Boot(boot) = config.start else { panic!("a template build boots") };
        assert_eq!(boot.mem_mib, 256);
        assert_eq!(boot.disks.len(), 1 + crate::volume::SLOTS);
        assert!(boot.disks[0].read_only && boot.disks[0].path.ends_with("placeholder.disk"));
        assert_eq!(boot.disks[0].id.as_deref(), Some("layers"));
        assert!(boot.disks[1..].iter().all(|v| v.path == Path::new(crate::vm::EMPTY_DISK)));
        assert_eq!(boot.vsock.as_ref().map(|v| v.cid), Some(crate::vm::GUEST_CID));
        assert!(boot.options.control.is_some() && !boot.options.console_input);
    }
}
