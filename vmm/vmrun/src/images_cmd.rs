//! `vmrun pull`, `vmrun load`, `vmrun images` and `vmrun rmi`: thin fronts
//! over the image store (`vmrun-images`), with a progress bar on standard
//! error for pulls and loads.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use vmrun_images::{Digest, Image, Progress, PullOptions, Reference, Store};

/// The store directory: `$VMRUN_HOME/images`, else `/var/lib/vmrun/images`
/// for root, else `~/.local/share/vmrun/images`.
pub fn default_store_dir() -> Result<PathBuf> {
    vmrun_images::default_store_dir().ok_or_else(|| anyhow!("cannot tell where to keep images: set VMRUN_HOME"))
}

fn open(store_dir: &Path) -> Result<Store> {
    Store::open(store_dir).with_context(|| format!("opening the image store {}", store_dir.display()))
}

/// `vmrun pull REFERENCE`, with the credentials `vmrun login` (or `docker
/// login`) saved for the registry. Registries named in
/// `VMRUN_INSECURE_REGISTRIES` (comma-separated `host:port`) are spoken to
/// over plain HTTP, as loopback ones are unless they have a `certs.d`
/// directory (`VMRUN_CERTS_D`, default `/etc/docker/certs.d`);
/// `VMRUN_PULL_MIN_RATE` and `VMRUN_PULL_TIMEOUT` bound slow transfers and
/// the whole pull ([`PullOptions::from_env`]).
pub fn pull(store_dir: &Path, reference: &str) -> Result<()> {
    pull_reporting(store_dir, reference, &mut std::io::stdout())
}

/// `pull`, with its one-line summary written to `out` (`vmrun run` keeps
/// standard output for the container).
pub fn pull_reporting(store_dir: &Path, reference: &str, out: &mut dyn std::io::Write) -> Result<()> {
    let reference: Reference = reference.parse()?;
    let store = open(store_dir)?;
    let mut options = PullOptions::from_env()?;
    options.credentials = crate::login_cmd::credentials_for(reference.registry());
    let mut bar = Bar::new();
    let result = store.pull(&reference, &options, &mut bar);
    bar.finish();
    let image = match result {
        Err(e @ vmrun_images::Error::Denied { .. }) if options.credentials.is_none() => {
            bail!("{e}; log in first: vmrun login {}", reference.registry())
        }
        r => r?,
    };
    writeln!(out, "{}: pulled {} ({})", familiar(&reference), image.manifest_digest, human_size(image.size()))?;
    Ok(())
}

/// `vmrun load -i FILE`: a `docker save` archive or an OCI archive, plain
/// or gzip-compressed.
pub fn load(store_dir: &Path, input: &Path) -> Result<()> {
    let store = open(store_dir)?;
    let mut bar = Bar::new();
    let result = store.load(input, &mut bar);
    bar.finish();
    for image in result? {
        match &image.reference {
            Some(r) => println!("Loaded image: {}", familiar(r)),
            None => println!("Loaded image ID: {}", image.config_digest),
        }
    }
    Ok(())
}

/// `vmrun images`: REPOSITORY TAG IMAGE ID SIZE, newest first, as `docker
/// images` prints it (SIZE is what the layers take in the store,
/// compressed).
pub fn images(store_dir: &Path) -> Result<()> {
    let store = open(store_dir)?;
    let mut rows = vec![["REPOSITORY".to_owned(), "TAG".into(), "IMAGE ID".into(), "SIZE".into()]];
    for s in store.list()?.into_iter().rev() {
        let (repo, tag) = match &s.reference {
            Some(r) => (r.familiar_name(), r.tag().unwrap_or("<none>").to_owned()),
            None => ("<none>".to_owned(), "<none>".to_owned()),
        };
        let id = s.config_digest.as_ref().map_or("<damaged>", Digest::short).to_owned();
        rows.push([repo, tag, id, human_size(s.size)]);
    }
    print_table(&rows);
    Ok(())
}

/// Prints rows in columns, three spaces apart.
pub fn print_table<const N: usize>(rows: &[[String; N]]) {
    let mut widths = [0usize; N];
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    for row in rows {
        let line: Vec<String> = row.iter().zip(widths).map(|(c, w)| format!("{c:<w$}")).collect();
        println!("{}", line.join("   ").trim_end());
    }
}

/// `vmrun rmi NAME...`: removes names (or all names of an image ID), then
/// the blobs no image uses any more (unless another vmrun is pulling or
/// loading right now; the next `rmi` then removes them), then the layer
/// disk and prepared templates of each image no name and no container
/// uses any more (a run starting with them keeps them; `vmrun system
/// prune` collects them later).
pub fn rmi(store_dir: &Path, names: &[String]) -> Result<()> {
    let store = open(store_dir)?;
    let mut errors = Vec::new();
    let mut untagged = Vec::new();
    for name in names {
        match store.remove(name) {
            Ok(removed) => {
                for r in removed {
                    match &r.reference {
                        Some(r) => println!("Untagged: {}", familiar(r)),
                        None => println!("Untagged: {}", r.manifest_digest),
                    }
                    untagged.push(r.manifest_digest.to_string());
                }
            }
            Err(e) => errors.push(e.into()),
        }
    }
    if let Some(report) = store.try_gc()? {
        for d in report.removed {
            println!("Deleted: {d}");
        }
    }
    if !untagged.is_empty() {
        if let Err(e) = remove_leftovers(store_dir, &untagged) {
            errors.push(e);
        }
    }
    // The last error is returned; any before it are printed here.
    let last = errors.pop();
    for e in errors {
        eprintln!("vmrun: error: {e}");
    }
    match last {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Removes the layer disks and prepared templates of `images` (manifest
/// digests) that nothing uses any more. The data directory is the one the
/// store is in.
fn remove_leftovers(store_dir: &Path, images: &[String]) -> Result<()> {
    let home = vmrun_runtime::home::Home::at(store_dir.parent().unwrap_or(store_dir));
    let usage = vmrun_runtime::prune::Usage::read(&home)?;
    for digest in images {
        for c in vmrun_runtime::prune::image_leftovers(&home, &usage, digest)? {
            let what = c.path.strip_prefix(home.root()).unwrap_or(&c.path).display().to_string();
            match vmrun_runtime::prune::remove(&c) {
                vmrun_runtime::prune::Outcome::Removed(_) => println!("Deleted: {what}"),
                vmrun_runtime::prune::Outcome::Busy => eprintln!("vmrun: kept {what}: a run is starting with it"),
                vmrun_runtime::prune::Outcome::Failed(e) => eprintln!("vmrun: cannot remove {what}: {e}"),
            }
        }
    }
    Ok(())
}

/// Resolves an image for `vmrun run`: by reference or image ID, with every
/// layer's digest checked.
pub fn resolve_verified(store_dir: &Path, name: &str) -> Result<Image> {
    let store = open(store_dir)?;
    let image = store.resolve(name)?;
    store.verify(&image)?;
    Ok(image)
}

/// `busybox:latest`, `localhost:5000/app@sha256:...`.
fn familiar(r: &Reference) -> String {
    match (r.tag(), r.digest()) {
        (Some(t), _) => format!("{}:{t}", r.familiar_name()),
        (None, Some(d)) => format!("{}@{d}", r.familiar_name()),
        (None, None) => r.familiar_name(),
    }
}

/// Sizes as Docker prints them: decimal units, three significant digits.
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1000.0 && unit < UNITS.len() - 1 {
        v /= 1000.0;
        unit += 1;
    }
    let text = if unit == 0 || v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    };
    format!("{text}{}", UNITS[unit])
}

/// A byte progress bar on standard error (drawn only on a terminal).
struct Bar {
    bar: ProgressBar,
}

impl Bar {
    fn new() -> Self {
        let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template("{spinner} {msg}").unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        bar.enable_steady_tick(Duration::from_millis(120));
        Self { bar }
    }

    fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

impl Progress for Bar {
    fn message(&mut self, message: &str) {
        self.bar.set_message(message.to_owned());
    }

    fn total(&mut self, bytes: u64) {
        self.bar.set_length(bytes);
        self.bar.set_style(
            ProgressStyle::with_template(
                "{spinner} {msg:24} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {eta}",
            )
            .map(|s| s.progress_chars("=> "))
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
    }

    fn blob_started(&mut self, digest: &Digest, _size: u64) {
        self.bar.set_message(format!("{}: downloading", digest.short()));
    }

    fn blob_exists(&mut self, _digest: &Digest, size: u64) {
        self.bar.inc(size);
    }

    fn advance(&mut self, bytes: u64) {
        self.bar.inc(bytes);
    }

    fn blob_done(&mut self, digest: &Digest) {
        self.bar.set_message(format!("{}: done", digest.short()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_like_docker() {
        assert_eq!(human_size(0), "0B");
        assert_eq!(human_size(999), "999B");
        assert_eq!(human_size(1_031_646), "1.03MB");
        assert_eq!(human_size(48_580_895), "48.6MB");
        assert_eq!(human_size(123_456_789), "123MB");
        assert_eq!(human_size(2_000_000_000), "2.00GB");
    }
}
