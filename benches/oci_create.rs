//! `vmrun-oci create` of the busybox and (where it can be built: root and
//! debootstrap) the Debian image's root, laid out three ways:
//! - a plain directory, as `runc spec` bundles have: copied for the
//!   container alone at every create;
//! - an overlay of the image's snapshot and an empty upper directory, as
//!   containerd's overlay snapshotter makes it, the first time: the shared
//!   copy of the snapshot is made;
//! - the same again, for another container: the copy is reused.
//!
//! Prints the median wall time of each create (the VM restored, the
//! container set up and held before its program; the template is built
//! first, by a create not counted) and the size of the image's root.
//!
//! `cargo bench -p vmrun-oci --bench oci_create` as root. Uses
//! `VMRUN_TEST_KERNEL` / `VMRUN_AGENT_INITRD` like the tests (built when
//! unset) and a scratch `VMRUN_HOME`; `OCI_BENCH_RUNS` creates of each
//! kind (default 3); `OCI_BENCH_IMAGES` (default `busybox,debian`).

#![allow(clippy::unwrap_used)] // a benchmark: any failure aborts it

#[path = "../tests/support/mod.rs"]
mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

const OCI: &str = env!("CARGO_BIN_EXE_vmrun-oci");

struct Bench {
    home: PathBuf,
    root: PathBuf,
    kernel: PathBuf,
    initrd: PathBuf,
}

impl Bench {
    fn oci(&self, args: &[&str]) -> Command {
        let mut c = Command::new(OCI);
        c.arg("--root")
            .arg(&self.root)
            .args(args)
            .env("VMRUN_HOME", &self.home)
            .env("VMRUN_KERNEL", &self.kernel)
            .env("VMRUN_AGENT_INITRD", &self.initrd)
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        c
    }

    /// Creates a container of `bundle` and deletes it; returns the
    /// create's milliseconds.
    fn create(&self, bundle: &Path, id: &str) -> f64 {
        // The container's supervisor keeps create's standard streams (its
        // process's stdio): a file, not a pipe read to its end.
        let err = support::scratch("bench-oci-create.err");
        let t = Instant::now();
        let status = self.oci(&["create", "--bundle", bundle.to_str().unwrap(), id]).stderr(std::fs::File::create(&err).unwrap()).status().unwrap();
        let ms = t.elapsed().as_secs_f64() * 1000.0;
        assert!(status.success(), "create {id}: {}", std::fs::read_to_string(&err).unwrap_or_default());
        let d = self.oci(&["delete", "--force", id]).status().unwrap();
        assert!(d.success(), "delete {id}");
        ms
    }
}

/// A bundle in `dir` running `true`, its root at `dir/rootfs`: a copy of
/// `image` (`plain`), or an overlay of it with an empty upper directory.
fn bundle(dir: &Path, image: &Path, plain: bool) -> PathBuf {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir.join("rootfs")).unwrap();
    support::run_ok(Command::new(OCI).args(["spec", "--bundle"]).arg(dir));
    let config = dir.join("config.json");
    let mut spec: serde_json::Value = serde_json::from_slice(&std::fs::read(&config).unwrap()).unwrap();
    spec["process"]["args"] = serde_json::json!(["true"]);
    spec["process"]["terminal"] = false.into();
    std::fs::write(&config, spec.to_string()).unwrap();
    if plain {
        support::run_ok(Command::new("cp").arg("-a").arg(format!("{}/.", image.display())).arg(dir.join("rootfs")));
    } else {
        for d in ["upper", "work"] {
            std::fs::create_dir_all(dir.join(d)).unwrap();
        }
        let opts = format!("lowerdir={},upperdir={},workdir={}", image.display(), dir.join("upper").display(), dir.join("work").display());
        support::run_ok(Command::new("mount").args(["-t", "overlay", "overlay", "-o", &opts]).arg(dir.join("rootfs")));
    }
    dir.to_path_buf()
}

fn unmount(bundle: &Path) {
    let _ = Command::new("umount").arg(bundle.join("rootfs")).status();
}

/// The image's layer unpacked (the test images have one).
fn unpack(image_dir: &Path, into: &Path) {
    let env = std::fs::read_to_string(image_dir.join("digests.env")).unwrap();
    let layer = env.lines().find_map(|l| l.strip_prefix("LAYER_DIGEST=sha256:")).unwrap().trim().to_string();
    let _ = std::fs::remove_dir_all(into);
    std::fs::create_dir_all(into).unwrap();
    support::run_ok(Command::new("tar").arg("-xzf").arg(image_dir.join("oci/blobs/sha256").join(layer)).arg("-C").arg(into));
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("oci_create: needs root (VM jails, overlay mounts)");
        return;
    }
    support::build_vmm(OCI);
    let runs: usize = support::env_or("OCI_BENCH_RUNS", 3usize).max(1);
    let images = std::env::var("OCI_BENCH_IMAGES").unwrap_or_else(|_| "busybox,debian".into());
    let b = Bench {
        home: support::scratch("bench-oci-home"),
        root: support::scratch("bench-oci-root"),
        kernel: support::kernel().to_path_buf(),
        initrd: support::agent_initrd(),
    };
    let copies = b.home.join("rootfs-copies");
    println!("| image | root size | plain directory (copied each time) | snapshot, first (copy made) | snapshot again (copy shared) |");
    println!("|---|---|---|---|---|");
    for name in images.split(',') {
        let image_dir = match name {
            "busybox" => support::busybox_image(),
            "debian" => support::debian_image(),
            other => panic!("unknown image {other}: busybox or debian"),
        };
        let lower = support::scratch(&format!("bench-oci-{name}-image"));
        unpack(&image_dir, &lower);
        let size = String::from_utf8_lossy(&support::run_ok(Command::new("du").arg("-sm").arg(&lower)).stdout).split_whitespace().next().unwrap_or("?").to_string();
        // The template (a boot) is made by a first create, not counted.
        let warm = bundle(&support::scratch("bench-oci-warm"), &lower, true);
        b.create(&warm, &format!("warm-{name}"));

        let (mut plain, mut first, mut again) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..runs {
            let p = bundle(&support::scratch("bench-oci-plain"), &lower, true);
            plain.push(b.create(&p, &format!("plain-{name}-{i}")));
            let _ = std::fs::remove_dir_all(&copies);
            let s1 = bundle(&support::scratch("bench-oci-first"), &lower, false);
            first.push(b.create(&s1, &format!("first-{name}-{i}")));
            let s2 = bundle(&support::scratch("bench-oci-again"), &lower, false);
            again.push(b.create(&s2, &format!("again-{name}-{i}")));
            unmount(&s1);
            unmount(&s2);
        }
        println!(
            "| {name} | {size} MiB | {:.0} ms | {:.0} ms | {:.0} ms |",
            median(plain),
            median(first),
            median(again)
        );
    }
    println!("medians of {runs} creates each; `vmrun-oci create` wall time, the container held before its program");
}
