//! What `vmrun rmi`, `vmrun system df` and `vmrun system prune` collect, on
//! a data directory made by the test (no VM): fake layer disks, template
//! directories, container states and a small image store.

#![allow(clippy::unwrap_used)] // test code: a failed step is a failed test

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

use vmrun_images::{Digest, Store};
use vmrun_runtime::container::{ProcessRef, State, Status};
use vmrun_runtime::home::Home;
use vmrun_runtime::prune::{self, Kind, Options};
use vmrun_runtime::template::{self, Inputs, INPUTS_FILE};
use vmrun_runtime::{artifacts::Artifacts, layer_disk, lock::Lock};

/// Puts an image named `name` in the store (hand-written blobs and
/// index); returns its manifest digest.
fn add_image(home: &Home, name: &str, seed: u8) -> String {
    let store = Store::open(home.images()).unwrap();
    let blobs = store.root().join("blobs/sha256");
    let put = |bytes: &[u8]| {
        let d = Digest::of(bytes);
        fs::write(blobs.join(d.hex()), bytes).unwrap();
        d
    };
    let layer = vec![seed; 5000];
    let layer_d = put(&layer);
    let config = format!(
        r#"{{"architecture":"amd64","os":"linux","config":{{"Cmd":["sh"]}},"rootfs":{{"type":"layers","diff_ids":["{layer_d}"]}}}}"#
    );
    let config_d = put(config.as_bytes());
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config_d}","size":{}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{layer_d}","size":{}}}]}}"#,
        config.len(),
        layer.len()
    );
    let manifest_d = put(manifest.as_bytes());
    let index_path = store.root().join("index.json");
    let mut index: serde_json::Value = serde_json::from_slice(&fs::read(&index_path).unwrap()).unwrap();
    index["manifests"].as_array_mut().unwrap().push(serde_json::json!({
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": manifest_d.to_string(),
        "size": manifest.len(),
        "annotations": {"org.opencontainers.image.ref.name": format!("example.com/{name}:latest")},
    }));
    fs::write(&index_path, serde_json::to_vec(&index).unwrap()).unwrap();
    manifest_d.to_string()
}

/// A digest of an image that is not in the store.
fn absent_digest(seed: u8) -> String {
    Digest::of(&[seed; 10]).to_string()
}

fn write(path: &Path, len: usize) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, vec![7u8; len]).unwrap();
}

fn disk(home: &Home, digest: &str) -> PathBuf {
    let p = home.layer_disks().join(layer_disk::file_name(digest));
    write(&p, 8192);
    p
}

/// A template directory with a snapshot-like file (and its inputs record).
fn template_dir(home: &Home, name: &str, inputs: Option<&str>) -> PathBuf {
    let p = home.templates().join(name);
    write(&p.join("vmstate.json"), 100);
    write(&p.join("memory"), 16384);
    if let Some(a) = inputs {
        fs::write(p.join(INPUTS_FILE), serde_json::to_vec(&Inputs { artifacts: a.into() }).unwrap()).unwrap();
    }
    p
}

fn container(home: &Home, id: &str, image_digest: &str, template: Option<&str>, running: bool) -> PathBuf {
    let dir = home.containers().join(id);
    fs::create_dir_all(&dir).unwrap();
    let state = State {
        status: if running { Status::Running } else { Status::Exited },
        owner: if running { ProcessRef::current() } else { None },
        image_digest: Some(image_digest.into()),
        template: template.map(str::to_owned),
        ..State::new(id, id, "example.com/whatever", "sh")
    };
    state.save(&dir).unwrap();
    write(&dir.join("console.log"), 4096);
    dir
}

/// A pid that no process has.
fn dead_pid() -> u32 {
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let pid = child.id();
    child.wait().unwrap();
    pid
}

/// The paths under the layer disks, templates and containers directories
/// (lock files aside).
fn tree(home: &Home) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for dir in [home.layer_disks(), home.templates(), home.containers()] {
        for e in fs::read_dir(&dir).unwrap() {
            let name = e.unwrap().file_name().to_string_lossy().into_owned();
            if !name.ends_with(".lock") {
                out.insert(format!("{}/{name}", dir.file_name().unwrap().to_string_lossy()));
            }
        }
    }
    out
}

#[test]
fn prune_rmi_and_df_remove_exactly_what_nothing_uses() {
    std::env::remove_var("VMRUN_KERNEL");
    std::env::remove_var("VMRUN_AGENT_INITRD");
    let tmp = tempfile::tempdir().unwrap();
    let home = Home::at(tmp.path());
    write(&home.boot().join("vmlinux"), 3000);
    write(&home.boot().join("agent.cpio"), 2000);
    let hashes = template::FileHashes::of_templates(&home.templates());
    let current = template::artifacts_hash(&Artifacts::find(&home, None, None).unwrap(), &hashes).unwrap();

    // Images: a in the store; b in the store and run by a running
    // container; c gone from the store, recorded by an exited container;
    // d gone and used by nobody; e gone, its disk held by a run starting.
    let a = add_image(&home, "a", 1);
    let b = add_image(&home, "b", 2);
    let (c, d, e) = (absent_digest(3), absent_digest(4), absent_digest(5));
    let hex = |x: &str| template::prepared_suffix(x);
    for x in [&a, &b, &c, &d, &e] {
        disk(&home, x);
    }
    write(&home.layer_disks().join("empty.disk"), 4096);
    let dead = dead_pid();
    write(&home.layer_disks().join(format!(".{}.{dead}.tmp", layer_disk::file_name(&d).trim_end_matches(".disk"))), 100);
    let busy = Lock::shared(&layer_disk::lock_path(&home.layer_disks().join(layer_disk::file_name(&e)))).unwrap();

    // Templates: k1 current, k2 made with another kernel, k3 made before
    // templates recorded their inputs (but a running container uses it).
    let (k1, k2, k3) = ("1111111111111111", "2222222222222222", "3333333333333333");
    template_dir(&home, k1, Some(&current));
    template_dir(&home, k2, Some("00000000deadbeef"));
    template_dir(&home, k3, None);
    for (key, image) in [(k1, &a), (k1, &b), (k1, &c), (k1, &d), (k2, &a)] {
        template_dir(&home, &format!("{key}-image-{}", hex(image)), None);
    }
    fs::write(home.templates().join(format!("{k1}.lock")), b"").unwrap();
    template_dir(&home, &format!("{k1}.build-{dead}"), None);
    template_dir(&home, &format!("{k1}.build-{}", std::process::id()), None);

    container(&home, "run000000001", &b, Some(k3), true);
    container(&home, "old000000002", &c, Some(&format!("{k1}-image-{}", hex(&c))), false);

    let before = tree(&home);

    // df: counts, and what a prune --all would free.
    let rows = prune::df(&home).unwrap();
    let row = |k: Kind| rows.iter().find(|r| r.kind == k).unwrap().clone();
    assert_eq!((row(Kind::Image).total, row(Kind::Image).active), (2, 1));
    assert!(row(Kind::Image).reclaimable > 0 && row(Kind::Image).reclaimable < row(Kind::Image).bytes);
    assert_eq!((row(Kind::Container).total, row(Kind::Container).active), (2, 1));
    assert_eq!(row(Kind::LayerDisk).total, 5);
    assert_eq!(row(Kind::Template).total, 8);
    assert_eq!(row(Kind::Temporary).total, 3, "{rows:?}");
    assert!(row(Kind::LayerDisk).reclaimable >= 3 * 8192);
    assert_eq!(tree(&home), before, "df removed something");

    // rmi of b: a running container uses it, so its files stay.
    let store = Store::open(home.images()).unwrap();
    store.remove("example.com/b:latest").unwrap();
    let usage_b = prune::Usage::read(&home).unwrap();
    assert!(prune::image_leftovers(&home, &usage_b, &b).unwrap().is_empty());

    // rmi of a: its layer disk and both its prepared templates (on k1 and
    // on the stale k2) go; nothing else.
    store.remove("example.com/a:latest").unwrap();
    let usage = prune::Usage::read(&home).unwrap();
    let leftovers = prune::image_leftovers(&home, &usage, &a).unwrap();
    let names: BTreeSet<String> =
        leftovers.iter().map(|c| c.path.file_name().unwrap().to_string_lossy().into_owned()).collect();
    let expected: BTreeSet<String> =
        [layer_disk::file_name(&a), format!("{k1}-image-{}", hex(&a)), format!("{k2}-image-{}", hex(&a))].into();
    assert_eq!(names, expected);
    for c in &leftovers {
        assert!(matches!(prune::remove(c), prune::Outcome::Removed(n) if n > 0), "{c:?}");
    }

    // prune: the exited container, then what only it used; stale
    // templates; leftovers of dead processes. The disk a run holds stays.
    let report = prune::prune(&home, Options::default(), true).unwrap();
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    assert_eq!(report.busy.len(), 1);
    assert_eq!(report.busy[0].path, home.layer_disks().join(layer_disk::file_name(&e)));
    assert!(report.untagged.is_empty());
    let removed: BTreeSet<String> = report
        .removed
        .iter()
        .map(|(c, _)| c.path.strip_prefix(tmp.path()).unwrap().to_string_lossy().into_owned())
        .collect();
    let expected: BTreeSet<String> = [
        "containers/old000000002".to_owned(),
        format!("layer-disks/{}", layer_disk::file_name(&c)),
        format!("layer-disks/{}", layer_disk::file_name(&d)),
        format!("layer-disks/.{}.{dead}.tmp", layer_disk::file_name(&d).trim_end_matches(".disk")),
        format!("templates/{k1}-image-{}", hex(&c)),
        format!("templates/{k1}-image-{}", hex(&d)),
        format!("templates/{k2}"),
        format!("templates/{k1}.build-{dead}"),
    ]
    .into();
    assert_eq!(removed, expected);
    assert!(report.freed() > 0);
    let kept: BTreeSet<String> = [
        "containers/run000000001".to_owned(),
        format!("layer-disks/{}", layer_disk::file_name(&b)),
        format!("layer-disks/{}", layer_disk::file_name(&e)),
        "layer-disks/empty.disk".into(),
        format!("templates/{k1}"),
        format!("templates/{k3}"),
        format!("templates/{k1}-image-{}", hex(&b)),
        format!("templates/{k1}.build-{}", std::process::id()),
        // The remembered hashes of the kernel and agent (the prune hashed
        // them to tell stale templates).
        "templates/file-hashes".into(),
    ]
    .into();
    assert_eq!(tree(&home), kept);

    // Once the run has its disk, a prune takes it; a second prune finds
    // nothing more.
    drop(busy);
    let report = prune::prune(&home, Options::default(), true).unwrap();
    assert_eq!(report.removed.len(), 1, "{:?}", report.removed);
    assert!(prune::prune(&home, Options::default(), true).unwrap().removed.is_empty());

    // --all: images no container uses go too (b is used by the running
    // container, which stays, and so do its files).
    let x = add_image(&home, "x", 9);
    disk(&home, &x);
    add_image(&home, "b", 2);
    let report = prune::prune(&home, Options { all: true, host: false }, true).unwrap();
    assert_eq!(report.untagged, ["example.com/x:latest"]);
    assert!(report.image_bytes > 0);
    let removed: Vec<_> = report.removed.iter().map(|(c, _)| c.path.clone()).collect();
    assert_eq!(removed, [home.layer_disks().join(layer_disk::file_name(&x))]);
    assert_eq!(Store::open(home.images()).unwrap().list().unwrap().len(), 1);
}
