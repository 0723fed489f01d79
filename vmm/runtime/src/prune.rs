//! Collecting what the data directory no longer needs: `vmrun rmi` (what
//! only the removed image used), `vmrun system df` (what could be
//! collected) and `vmrun system prune` (collecting it).
//!
//! What is in use is read from the image store and the containers' states
//! ([`Usage`]): an image's layer disk (`layer-disks/sha256-<hex>.disk`)
//! and prepared templates (`templates/<key>-image-<hex16>/`) are kept
//! while the store has the image or a container (running or not) records
//! it; a template a container records it was restored from is kept too. A
//! base template (`templates/<key>/`) is stale when the kernel, agent or
//! vmrun it was made with are no longer the current ones (its
//! [`crate::template::INPUTS_FILE`] says, and one without that file was
//! made by an older vmrun).
//!
//! Pruning is a list of [`Collector`]s: each looks at the data directory
//! and returns [`Candidate`]s (what it would remove, with why and how
//! big); [`remove`] then removes each candidate under its lock, if nobody
//! holds the lock (a run starting with a template or layer disk holds it
//! shared). To collect something more, write a function with the
//! [`Collector`] signature and add it to [`COLLECTORS`].

use std::collections::BTreeSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::artifacts::Artifacts;
use crate::container::{self, State, Status};
use crate::home::Home;
use crate::layer_disk;
use crate::lock::Lock;
use crate::template::{self, Inputs, INPUTS_FILE};

/// What uses what: the images in the store and the containers' states.
#[derive(Debug, Clone, Default)]
pub struct Usage {
    /// Manifest digests (`sha256:<hex>`) of the images in the store.
    pub images: BTreeSet<String>,
    /// Manifest digests of the images containers record (any status).
    pub container_images: BTreeSet<String>,
    /// Template directory names containers record.
    pub container_templates: BTreeSet<String>,
    /// Every container: its directory, state and image's manifest digest.
    pub containers: Vec<(PathBuf, State, Option<String>)>,
    /// [`template::artifacts_hash`] of the current kernel and agent, if
    /// they are found: base templates made from others are stale.
    pub current_artifacts: Option<String>,
}

impl Usage {
    /// Reads the store and the containers under `home`. A container state
    /// without an image digest (written by an older vmrun) is matched to
    /// an image by its name in the store.
    pub fn read(home: &Home) -> Result<Self, Error> {
        let store = vmrun_images::Store::open(home.images()).map_err(Error::Store)?;
        let images: BTreeSet<String> =
            store.list().map_err(Error::Store)?.into_iter().map(|s| s.manifest_digest.to_string()).collect();
        let containers = container::list(home)
            .map_err(|e| Error::Io { path: home.containers(), source: e })?
            .into_iter()
            .map(|(dir, s)| {
                let digest =
                    s.image_digest.clone().or_else(|| store.resolve(&s.image).ok().map(|i| i.manifest_digest.to_string()));
                (dir, s, digest)
            })
            .collect();
        let current_artifacts =
            Artifacts::find(home, None, None).ok().and_then(|a| {
                template::artifacts_hash(&a, &template::FileHashes::of_templates(&home.templates())).ok()
            });
        let mut usage = Self { images, containers, current_artifacts, ..Self::default() };
        usage.tally();
        Ok(usage)
    }

    /// Recomputes what the containers use.
    fn tally(&mut self) {
        self.container_images = self.containers.iter().filter_map(|c| c.2.clone()).collect();
        self.container_templates = self.containers.iter().filter_map(|c| c.1.template.clone()).collect();
    }

    /// What is used once `removed` (paths of containers and images' digests)
    /// are gone: what a prune that removed them sees next.
    pub fn without(&mut self, removed: &[Candidate], images: &[String]) {
        self.containers.retain(|c| !removed.iter().any(|r| r.path == c.0));
        self.images.retain(|d| !images.contains(d));
        self.tally();
    }

    /// Whether the image with this manifest digest is in the store or
    /// recorded by a container.
    pub fn image_used(&self, digest: &str) -> bool {
        self.images.contains(digest) || self.container_images.contains(digest)
    }

    /// Whether a prepared template named with this digest prefix belongs
    /// to a used image.
    fn prepared_used(&self, hex16: &str) -> bool {
        self.images.iter().chain(&self.container_images).any(|d| template::prepared_suffix(d) == hex16)
    }

    /// Whether a base template is stale (`None`: cannot tell, the current
    /// kernel or agent is not found).
    fn base_stale(&self, dir: &Path) -> Option<bool> {
        let current = self.current_artifacts.as_ref()?;
        let recorded: Option<Inputs> =
            std::fs::read(dir.join(INPUTS_FILE)).ok().and_then(|b| serde_json::from_slice(&b).ok());
        Some(recorded.is_none_or(|i| &i.artifacts != current))
    }
}

/// Errors of pruning.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The image store could not be read or changed.
    #[error(transparent)]
    Store(vmrun_images::Error),
    /// A directory could not be read.
    #[error("{}: {source}", path.display())]
    Io {
        /// The directory.
        path: PathBuf,
        /// What the system said.
        source: std::io::Error,
    },
}

/// What a collected thing is, for reports and `vmrun system df`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    /// An image in the store.
    Image,
    /// A container's directory.
    Container,
    /// A layer disk.
    LayerDisk,
    /// A base or prepared template.
    Template,
    /// A temporary file or directory an operation left behind.
    Temporary,
}

/// How a candidate is removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Removal {
    /// The file, or the directory and everything in it.
    Path,
    /// An empty directory, with `rmdir` (a cgroup).
    Rmdir,
    /// A container's directory, after its TAP device (if it has one).
    Container {
        /// Its TAP device.
        tap: Option<String>,
    },
    /// A pool's directory (or a template preparation's) whose keeper was
    /// killed, after the links recorded there ([`crate::pool::clean_up`]).
    Pool,
    /// What the jail of a VMM killed with SIGKILL left (its cgroups, root
    /// directory and record; `vmrun_jail::collect_record`): the jail's
    /// outer pid.
    Jail(u32),
}

/// Something a collector would remove.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// What it is.
    pub kind: Kind,
    /// The file or directory.
    pub path: PathBuf,
    /// The space it takes on disk (allocated blocks), in bytes.
    pub bytes: u64,
    /// Why it can go (`no image uses it`).
    pub reason: String,
    /// A lock that must be free (taken without waiting) to remove it.
    pub lock: Option<PathBuf>,
    /// How to remove it.
    pub removal: Removal,
}

/// What a collector is given.
#[derive(Debug, Clone, Copy)]
pub struct Context<'a> {
    /// The data directory.
    pub home: &'a Home,
    /// What is in use.
    pub usage: &'a Usage,
}

/// A collector: what it would remove, given what is in use. It only
/// looks; [`remove`] removes.
pub type Collector = fn(&Context<'_>) -> Result<Vec<Candidate>, Error>;

/// The collectors of `vmrun system prune`, in order: stopped containers
/// first, so that what they used can go in the same prune.
pub const COLLECTORS: &[(&str, Collector)] = &[
    ("stopped containers", stopped_containers),
    ("layer disks", unused_layer_disks),
    ("prepared templates", unused_prepared_templates),
    ("base templates", stale_base_templates),
    ("temporary files", stale_temporaries),
    ("abandoned pools", abandoned_pools),
];

/// Collectors of what dead processes left outside any data directory, on
/// the whole host ([`Options::host`]).
pub const HOST_COLLECTORS: &[(&str, Collector)] = &[("jail leftovers", jail_leftovers)];

/// Space on disk: allocated blocks (snapshots and disks are sparse), for
/// a file or a directory tree.
pub fn disk_usage(path: &Path) -> u64 {
    let Ok(m) = std::fs::symlink_metadata(path) else { return 0 };
    let mut total = m.blocks() * 512;
    if m.is_dir() {
        if let Ok(entries) = std::fs::read_dir(path) {
            for e in entries.flatten() {
                total += disk_usage(&e.path());
            }
        }
    }
    total
}

fn read_dir(dir: &Path) -> Result<Vec<(String, PathBuf)>, Error> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::Io { path: dir.to_path_buf(), source: e }),
    };
    let mut out: Vec<(String, PathBuf)> = entries
        .flatten()
        .filter_map(|e| e.file_name().to_str().map(|n| (n.to_owned(), e.path())))
        .collect();
    out.sort();
    Ok(out)
}

/// Containers that have exited (their owner and VMM are gone).
pub fn stopped_containers(cx: &Context<'_>) -> Result<Vec<Candidate>, Error> {
    Ok(cx
        .usage
        .containers
        .iter()
        .filter(|(_, s, _)| s.effective_status() == Status::Exited && !s.vmm.is_some_and(|v| v.alive()))
        .map(|(dir, s, _)| Candidate {
            kind: Kind::Container,
            path: dir.clone(),
            bytes: disk_usage(dir),
            reason: format!("container {} ({}) has exited", s.name, s.image),
            lock: None,
            removal: Removal::Container { tap: s.tap.clone() },
        })
        .collect())
}

/// Layer disks of images neither the store nor a container has.
pub fn unused_layer_disks(cx: &Context<'_>) -> Result<Vec<Candidate>, Error> {
    let mut out = Vec::new();
    for (name, path) in read_dir(&cx.home.layer_disks())? {
        let Some(digest) = layer_disk::manifest_digest_of(&name) else { continue };
        if cx.usage.image_used(&digest) {
            continue;
        }
        out.push(Candidate {
            kind: Kind::LayerDisk,
            bytes: disk_usage(&path),
            reason: format!("no image or container uses {digest}"),
            lock: Some(layer_disk::lock_path(&path)),
            path,
            removal: Removal::Path,
        });
    }
    Ok(out)
}

/// A template directory's name split into its base key and, for a
/// prepared template, the image's digest prefix; `None` for anything else
/// (lock files, build directories).
fn template_name(name: &str) -> Option<(&str, Option<&str>)> {
    let hex = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_hexdigit());
    match name.split_once("-image-") {
        Some((key, image)) if hex(key) && hex(image) => Some((key, Some(image))),
        None if hex(name) => Some((name, None)),
        _ => None,
    }
}

/// Prepared templates of images neither the store nor a container has,
/// or whose base template is gone or stale.
pub fn unused_prepared_templates(cx: &Context<'_>) -> Result<Vec<Candidate>, Error> {
    let dir = cx.home.templates();
    let mut out = Vec::new();
    for (name, path) in read_dir(&dir)? {
        let Some((key, Some(image))) = template_name(&name) else { continue };
        if !path.is_dir() || cx.usage.container_templates.contains(&name) {
            continue;
        }
        let base = dir.join(key);
        let reason = if !cx.usage.prepared_used(image) {
            format!("no image or container uses sha256:{image}...")
        } else if !template::is_ready(&base) {
            format!("its base template {key} is gone")
        } else if cx.usage.base_stale(&base) == Some(true) && !cx.usage.container_templates.contains(key) {
            format!("its base template {key} was made with another kernel, agent or vmrun")
        } else {
            continue;
        };
        out.push(Candidate {
            kind: Kind::Template,
            bytes: disk_usage(&path),
            reason,
            lock: Some(template::lock_path(&path)),
            path,
            removal: Removal::Path,
        });
    }
    Ok(out)
}

/// Base templates made with another kernel, agent or vmrun than the
/// current ones (never used again: their key differs from any current
/// one), unless a container records it.
pub fn stale_base_templates(cx: &Context<'_>) -> Result<Vec<Candidate>, Error> {
    let mut out = Vec::new();
    for (name, path) in read_dir(&cx.home.templates())? {
        let Some((_, None)) = template_name(&name) else { continue };
        if !path.is_dir() || cx.usage.container_templates.contains(&name) {
            continue;
        }
        if cx.usage.base_stale(&path) != Some(true) {
            continue;
        }
        out.push(Candidate {
            kind: Kind::Template,
            bytes: disk_usage(&path),
            reason: "made with another kernel, agent or vmrun than the current ones".into(),
            lock: Some(template::lock_path(&path)),
            path,
            removal: Removal::Path,
        });
    }
    Ok(out)
}

/// The pid in `<something>.build-PID` or `.<something>.PID.tmp`.
fn owner_pid(name: &str) -> Option<u32> {
    if let Some((_, pid)) = name.rsplit_once(".build-") {
        return pid.parse().ok();
    }
    let rest = name.strip_prefix('.')?.strip_suffix(".tmp")?;
    rest.rsplit_once('.')?.1.parse().ok()
}

/// Template build directories and half-written layer disks whose process
/// is gone.
pub fn stale_temporaries(cx: &Context<'_>) -> Result<Vec<Candidate>, Error> {
    let mut out = Vec::new();
    for dir in [cx.home.templates(), cx.home.layer_disks()] {
        for (name, path) in read_dir(&dir)? {
            let Some(pid) = owner_pid(&name) else { continue };
            if container::ProcessRef::of(pid).is_some() {
                continue;
            }
            // A build directory goes only while no build of its template
            // runs (a pid can be reused).
            let lock = name.split_once(".build-").map(|(key, _)| dir.join(format!("{key}.lock")));
            out.push(Candidate {
                kind: Kind::Temporary,
                bytes: disk_usage(&path),
                reason: format!("left by process {pid}, which is gone"),
                lock,
                path,
                removal: Removal::Path,
            });
        }
    }
    Ok(out)
}

/// Pools no keeper serves any more (a `vmrun pool` killed with SIGKILL
/// leaves its directory; its VMs died with it), and the template
/// preparations of keepers that are gone.
pub fn abandoned_pools(cx: &Context<'_>) -> Result<Vec<Candidate>, Error> {
    let mut out = Vec::new();
    for (name, path) in read_dir(&cx.home.pools())? {
        let (reason, lock, removal) = match owner_pid(&name) {
            Some(pid) if container::ProcessRef::of(pid).is_some() => continue,
            Some(pid) => (format!("left by process {pid}, which is gone"), None, Removal::Pool),
            None => {
                let lock = crate::pool::lock_path(&path);
                if !matches!(Lock::try_take(&lock), Ok(Some(_))) {
                    continue;
                }
                ("no vmrun pool serves it".to_string(), Some(lock), Removal::Pool)
            }
        };
        out.push(Candidate { kind: Kind::Temporary, bytes: disk_usage(&path), reason, lock, path, removal });
    }
    Ok(out)
}

/// What jails of VMMs killed with SIGKILL left on this host (cgroups,
/// their roots under /run/vmrun-jail, their records), whichever data
/// directory they served: records their processes no longer hold.
pub fn jail_leftovers(_: &Context<'_>) -> Result<Vec<Candidate>, Error> {
    Ok(vmrun_jail::orphan_records()
        .into_iter()
        .map(|pid| Candidate {
            kind: Kind::Temporary,
            path: vmrun_jail::record_path(pid),
            bytes: 0,
            reason: format!("left by the jail of VMM process {pid}, which was killed"),
            lock: None,
            removal: Removal::Jail(pid),
        })
        .collect())
}

/// Runs `collectors` and returns what they would remove.
pub fn plan(home: &Home, usage: &Usage, collectors: &[(&str, Collector)]) -> Result<Vec<Candidate>, Error> {
    let cx = Context { home, usage };
    let mut out = Vec::new();
    for (_, c) in collectors {
        for cand in c(&cx)? {
            if !out.iter().any(|o: &Candidate| o.path == cand.path) {
                out.push(cand);
            }
        }
    }
    Ok(out)
}

/// What [`remove`] did with one candidate.
#[derive(Debug)]
pub enum Outcome {
    /// Removed: this many bytes freed.
    Removed(u64),
    /// Its lock is held (a run is starting with it): kept.
    Busy,
    /// Removing it failed.
    Failed(std::io::Error),
}

/// Removes a candidate, under its lock if it has one.
pub fn remove(c: &Candidate) -> Outcome {
    let _lock = match &c.lock {
        Some(l) => match Lock::try_take(l) {
            Ok(Some(lock)) => Some(lock),
            Ok(None) => return Outcome::Busy,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Outcome::Failed(e),
        },
        None => None,
    };
    let result = match &c.removal {
        Removal::Path => match std::fs::symlink_metadata(&c.path) {
            Ok(m) if m.is_dir() => std::fs::remove_dir_all(&c.path),
            Ok(_) => std::fs::remove_file(&c.path),
            Err(e) => Err(e),
        },
        Removal::Rmdir => std::fs::remove_dir(&c.path),
        Removal::Jail(pid) => vmrun_jail::collect_record(*pid).map(|_| ()),
        Removal::Pool => crate::pool::clean_up(&c.path).and_then(|()| std::fs::remove_dir_all(&c.path)),
        Removal::Container { tap } => {
            if let Some(tap) = tap {
                crate::net::release(tap);
            }
            std::fs::remove_dir_all(&c.path)
        }
    };
    match result {
        Ok(()) => Outcome::Removed(c.bytes),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Outcome::Removed(0),
        Err(e) => Outcome::Failed(e),
    }
}

/// What `vmrun rmi` leaves of an image it untagged: its layer disk and
/// prepared templates, if neither the store (another name for the same
/// manifest) nor a container still uses it.
pub fn image_leftovers(home: &Home, usage: &Usage, manifest_digest: &str) -> Result<Vec<Candidate>, Error> {
    if usage.image_used(manifest_digest) {
        return Ok(Vec::new());
    }
    let cx = Context { home, usage };
    let disk = layer_disk::file_name(manifest_digest);
    let hex = template::prepared_suffix(manifest_digest);
    let mut out: Vec<Candidate> =
        unused_layer_disks(&cx)?.into_iter().filter(|c| c.path.file_name().is_some_and(|n| *n == *disk)).collect();
    out.extend(
        unused_prepared_templates(&cx)?
            .into_iter()
            .filter(|c| c.path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.ends_with(&format!("-image-{hex}")))),
    );
    Ok(out)
}

/// Images no container uses (for `vmrun system prune --all`): their
/// manifest digests.
pub fn unused_images(usage: &Usage) -> Vec<String> {
    usage.images.iter().filter(|d| !usage.container_images.contains(*d)).cloned().collect()
}

/// What `vmrun system prune` is asked to do.
#[derive(Debug, Clone, Copy, Default)]
pub struct Options {
    /// Also remove the images no container uses (`--all`).
    pub all: bool,
    /// Also run [`HOST_COLLECTORS`]: what dead VMMs of any data directory
    /// left on the host.
    pub host: bool,
}

/// What a prune did (or, planned only, would do).
#[derive(Debug, Default)]
pub struct Report {
    /// Names untagged (`busybox:latest`, or a manifest digest).
    pub untagged: Vec<String>,
    /// Bytes the image store freed (its blobs).
    pub image_bytes: u64,
    /// Removed (or to be removed), with the bytes each freed.
    pub removed: Vec<(Candidate, u64)>,
    /// Kept because a run is starting with them.
    pub busy: Vec<Candidate>,
    /// Could not be removed.
    pub failed: Vec<(Candidate, std::io::Error)>,
}

impl Report {
    /// All the bytes freed.
    pub fn freed(&self) -> u64 {
        self.image_bytes + self.removed.iter().map(|(_, b)| b).sum::<u64>()
    }
}

/// `vmrun system prune`: with `all`, images no container uses first, then
/// every collector of [`COLLECTORS`] in turn, each seeing what the ones
/// before it removed. Without `apply`, nothing is removed: the report
/// says what would be (for `vmrun system df` and the confirmation).
pub fn prune(home: &Home, options: Options, apply: bool) -> Result<Report, Error> {
    let mut usage = Usage::read(home)?;
    let mut report = Report::default();
    if options.all {
        let images = unused_images(&usage);
        if apply {
            let store = vmrun_images::Store::open(home.images()).map_err(Error::Store)?;
            for d in &images {
                let digest = d.parse().map_err(|e: vmrun_images::DigestError| {
                    Error::Store(vmrun_images::Error::Unsupported(format!("{d}: {e}")))
                })?;
                for r in store.remove_manifest(&digest).map_err(Error::Store)? {
                    report.untagged.push(r.reference.map_or_else(|| r.manifest_digest.to_string(), |r| r.to_string()));
                }
            }
            if let Some(gc) = store.try_gc().map_err(Error::Store)? {
                report.image_bytes = gc.freed_bytes;
            }
        } else {
            report.untagged = images.clone();
        }
        usage.without(&[], &images);
    }
    let host: &[(&str, Collector)] = if options.host { HOST_COLLECTORS } else { &[] };
    for collector in COLLECTORS.iter().chain(host) {
        let planned = plan(home, &usage, std::slice::from_ref(collector))?;
        let mut gone = Vec::new();
        for c in planned {
            if !apply {
                let bytes = c.bytes;
                gone.push(c.clone());
                report.removed.push((c, bytes));
                continue;
            }
            match remove(&c) {
                Outcome::Removed(bytes) => {
                    gone.push(c.clone());
                    report.removed.push((c, bytes));
                }
                Outcome::Busy => report.busy.push(c),
                Outcome::Failed(e) => report.failed.push((c, e)),
            }
        }
        usage.without(&gone, &[]);
    }
    Ok(report)
}

/// One row of `vmrun system df`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DfRow {
    /// What the row counts.
    pub kind: Kind,
    /// How many there are.
    pub total: usize,
    /// How many are in use (not what a prune removes).
    pub active: usize,
    /// The space they take, in bytes.
    pub bytes: u64,
    /// The space `vmrun system prune` would free (`--all` for images).
    pub reclaimable: u64,
}

/// `vmrun system df`: images, containers, layer disks, templates and
/// temporary files, with what a prune (`--all` for images) would free.
pub fn df(home: &Home) -> Result<Vec<DfRow>, Error> {
    let usage = Usage::read(home)?;
    let planned = prune(home, Options { all: true, host: false }, false)?;
    let store = vmrun_images::Store::open(home.images()).map_err(Error::Store)?;
    let summaries = store.list().map_err(Error::Store)?;
    let unused = unused_images(&usage);
    let image_bytes: u64 = summaries.iter().map(|s| s.size).sum();
    let unused_bytes: u64 = summaries.iter().filter(|s| unused.contains(&s.manifest_digest.to_string())).map(|s| s.size).sum();
    let mut rows = vec![DfRow {
        kind: Kind::Image,
        total: summaries.len(),
        active: summaries.len() - unused.len().min(summaries.len()),
        bytes: image_bytes,
        reclaimable: unused_bytes.min(image_bytes),
    }];
    let count = |kind: Kind, all: Vec<PathBuf>| {
        let reclaim: Vec<&(Candidate, u64)> = planned.removed.iter().filter(|(c, _)| c.kind == kind).collect();
        DfRow {
            kind,
            total: all.len(),
            active: all.len().saturating_sub(reclaim.len()),
            bytes: all.iter().map(|p| disk_usage(p)).sum(),
            reclaimable: reclaim.iter().map(|(_, b)| b).sum(),
        }
    };
    rows.push(count(Kind::Container, usage.containers.iter().map(|c| c.0.clone()).collect()));
    let disks = read_dir(&home.layer_disks())?;
    rows.push(count(
        Kind::LayerDisk,
        disks.iter().filter(|(n, _)| layer_disk::manifest_digest_of(n).is_some()).map(|(_, p)| p.clone()).collect(),
    ));
    let templates = read_dir(&home.templates())?;
    rows.push(count(
        Kind::Template,
        templates.iter().filter(|(n, p)| template_name(n).is_some() && p.is_dir()).map(|(_, p)| p.clone()).collect(),
    ));
    let pools = home.pools();
    let temporaries: Vec<PathBuf> = templates
        .iter()
        .chain(&disks)
        .filter(|(n, _)| owner_pid(n).is_some())
        .map(|(_, p)| p.clone())
        .chain(planned.removed.iter().filter(|(c, _)| c.path.starts_with(&pools)).map(|(c, _)| c.path.clone()))
        .collect();
    rows.push(count(Kind::Temporary, temporaries));
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        let hex = "ab".repeat(32);
        assert_eq!(layer_disk::manifest_digest_of(&format!("sha256-{hex}.disk")), Some(format!("sha256:{hex}")));
        assert_eq!(layer_disk::manifest_digest_of("empty.disk"), None);
        assert_eq!(layer_disk::manifest_digest_of(&format!(".sha256-{hex}.disk.lock")), None);
        assert_eq!(template_name("0123abcd0123abcd"), Some(("0123abcd0123abcd", None)));
        assert_eq!(template_name("0123abcd0123abcd-image-ffee"), Some(("0123abcd0123abcd", Some("ffee"))));
        assert_eq!(template_name("0123abcd0123abcd.lock"), None);
        assert_eq!(template_name("0123abcd0123abcd.build-77"), None);
        assert_eq!(owner_pid("0123abcd.build-77"), Some(77));
        assert_eq!(owner_pid(".sha256-ab.1234.tmp"), Some(1234));
        assert_eq!(owner_pid(".empty.99.tmp"), Some(99));
        assert_eq!(owner_pid(".sha256-ab.disk.lock"), None);
    }

    /// A pool goes once no keeper holds its lock; a preparation once its
    /// process is gone.
    #[test]
    fn abandoned_pools_are_those_no_keeper_serves() {
        let root = std::env::temp_dir().join(format!("vmrun-prune-pools-{}", std::process::id()));
        let home = Home::at(&root);
        let pools = home.pools();
        for name in ["served", "abandoned", "k.build-999999999"] {
            std::fs::create_dir_all(pools.join(name).join("vm-0")).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
        let own = format!("k.build-{}", std::process::id());
        std::fs::create_dir_all(pools.join(&own)).unwrap_or_else(|e| panic!("{own}: {e}"));
        let held = Lock::try_take(&crate::pool::lock_path(&pools.join("served"))).unwrap_or_else(|e| panic!("lock: {e}"));
        assert!(held.is_some());
        let usage = Usage::default();
        let found = abandoned_pools(&Context { home: &home, usage: &usage }).unwrap_or_else(|e| panic!("{e}"));
        let names: BTreeSet<String> = found.iter().map(|c| c.path.file_name().unwrap_or_default().to_string_lossy().into_owned()).collect();
        assert_eq!(names, ["abandoned", "k.build-999999999"].into_iter().map(String::from).collect());
        for c in &found {
            assert!(matches!(remove(c), Outcome::Removed(_)), "{}", c.path.display());
        }
        assert!(pools.join("served/vm-0").is_dir() && pools.join(&own).is_dir() && !pools.join("abandoned").exists());
        drop(held);
        let _ = std::fs::remove_dir_all(&root);
    }
}
