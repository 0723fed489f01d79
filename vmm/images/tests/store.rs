//! The store on its own: names, removal, GC, concurrent writers, crashes
//! mid-write and damaged blobs. Images come from the busybox test archives.

#![allow(clippy::unwrap_used)] // test code: a failed step is a failed test

mod support;

use std::fs;
use std::path::Path;

use support::{assert_one_line, busybox, snapshot};
use vmrun_images::{Digest, Error, NoProgress, Reference, Store};

fn loaded_store(dir: &Path) -> Store {
    let store = Store::open(dir).unwrap();
    store.load(&busybox().oci_archive(), &mut NoProgress).unwrap();
    store
}

fn blob_count(store: &Store) -> usize {
    fs::read_dir(store.root().join("blobs/sha256")).unwrap().count()
}

#[test]
fn new_store_is_an_empty_oci_layout() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().join("a/b")).unwrap();
    assert_eq!(fs::read_to_string(store.root().join("oci-layout")).unwrap(), r#"{"imageLayoutVersion":"1.0.0"}"#);
    let index: serde_json::Value = serde_json::from_slice(&fs::read(store.root().join("index.json")).unwrap()).unwrap();
    assert_eq!(index["schemaVersion"], 2);
    assert_eq!(index["manifests"].as_array().unwrap().len(), 0);
    assert!(store.list().unwrap().is_empty());
    let err = store.resolve("busybox").unwrap_err();
    assert!(matches!(err, Error::NotFound(_)));
    assert_one_line(&err, "no image \"busybox\" in the store");
    assert_one_line(&store.resolve("Bad:Ref!").unwrap_err(), "invalid reference");
}

#[test]
fn tag_list_remove_and_gc() {
    let dir = tempfile::tempdir().unwrap();
    let store = loaded_store(dir.path());
    let other: Reference = "localhost:5000/tools/bb:1".parse().unwrap();
    store.tag("busybox", &other).unwrap();
    store.load(&busybox().docker_archive(), &mut NoProgress).unwrap(); // moves busybox:latest
    let list = store.list().unwrap();
    assert_eq!(list.len(), 2, "{list:?}");
    let named = |r: &str| list.iter().find(|s| s.reference.as_ref().map(ToString::to_string).as_deref() == Some(r)).unwrap();
    let oci = named("localhost:5000/tools/bb:1");
    let docker = named("docker.io/library/busybox:latest");
    assert_eq!(oci.manifest_digest, busybox().digest("MANIFEST_DIGEST"));
    assert_ne!(docker.manifest_digest, oci.manifest_digest);
    assert_eq!(oci.config_digest, docker.config_digest); // the same image ID
    assert!(oci.created.as_deref().unwrap().ends_with('Z'));
    assert_eq!(oci.size.to_string(), busybox().var("LAYER_SIZE"));
    // 2 manifests, 1 config, 2 layers.
    assert_eq!(blob_count(&store), 5);
    assert!(store.gc().unwrap().removed.is_empty());

    // Removing one name frees only what nothing else uses.
    let removed = store.remove("localhost:5000/tools/bb:1").unwrap();
    assert_eq!(removed.len(), 1);
    let report = store.gc().unwrap();
    assert_eq!(report.removed.len(), 2, "{report:?}"); // the OCI manifest and gzip layer
    store.resolve("busybox").unwrap();
    assert_eq!(blob_count(&store), 3);

    // Removing by image ID removes every name of it; then GC empties the store.
    store.tag("busybox", &"again:x".parse().unwrap()).unwrap();
    let removed = store.remove(&busybox().var("CONFIG_DIGEST")[7..20]).unwrap();
    assert_eq!(removed.len(), 2);
    assert_one_line(&store.remove("busybox").unwrap_err(), "no image");
    assert_eq!(store.gc().unwrap().removed.len(), 3);
    assert_eq!(blob_count(&store), 0);
    assert!(store.list().unwrap().is_empty());
}

#[test]
fn concurrent_loads_and_gcs_keep_the_store_consistent() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_owned();
    Store::open(&root).unwrap();
    let threads: Vec<_> = (0..6)
        .map(|i| {
            let root = root.clone();
            std::thread::spawn(move || {
                // Each thread opens its own Store, as separate processes do.
                let store = Store::open(&root).unwrap();
                for _ in 0..3 {
                    let archive = if i % 2 == 0 { busybox().oci_archive() } else { busybox().docker_archive() };
                    store.load(&archive, &mut NoProgress).unwrap();
                    store.resolve("busybox").unwrap();
                    if i == 5 {
                        store.gc().unwrap();
                    }
                    if i == 4 {
                        store.try_gc().unwrap();
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let store = Store::open(&root).unwrap();
    let list = store.list().unwrap();
    assert_eq!(list.len(), 1, "one name, one entry: {list:?}");
    let image = store.resolve("busybox").unwrap();
    store.verify(&image).unwrap();
    store.gc().unwrap();
    assert_eq!(blob_count(&store), 3);
    assert!(fs::read_dir(root.join("tmp")).unwrap().next().is_none());
}

#[test]
fn leftovers_of_a_crash_are_ignored_then_cleaned() {
    let dir = tempfile::tempdir().unwrap();
    let store = loaded_store(dir.path());
    let image = store.resolve("busybox").unwrap();
    // A pull killed while writing a blob: its staging directory and a
    // half-written file; an index rewrite killed before its rename; a blob
    // renamed in before the index named it.
    let staging = store.root().join("tmp/.tmp-999999-0-1");
    fs::create_dir_all(&staging).unwrap();
    fs::write(staging.join(".tmp-999999-1-2.blob"), vec![7u8; 100_000]).unwrap();
    fs::write(store.root().join(".tmp-999999-3-4.partial"), b"{\"schemaV").unwrap();
    let stray = Digest::of(b"stray");
    fs::write(store.blob_path(&stray), b"stray").unwrap();

    // Nothing of it is used.
    assert_eq!(store.resolve("busybox").unwrap(), image);
    assert_eq!(store.list().unwrap().len(), 1);

    // The next open (no operation running) removes the temporary files,
    // GC the unreferenced blob.
    let store = Store::open(dir.path()).unwrap();
    assert!(!staging.exists());
    assert!(!store.root().join(".tmp-999999-3-4.partial").exists());
    let report = store.gc().unwrap();
    assert_eq!(report.removed, vec![stray]);
    assert_eq!(store.resolve("busybox").unwrap(), image);
}

#[test]
fn damaged_blobs_are_detected_and_repaired_by_a_new_load() {
    let dir = tempfile::tempdir().unwrap();
    let store = loaded_store(dir.path());
    let image = store.resolve("busybox").unwrap();
    let layer = image.layers[0].path.clone();
    let good_layer = fs::read(&layer).unwrap();

    // A flipped byte in the layer: same size, so only verify() notices.
    let mut bad = good_layer.clone();
    bad[1000] ^= 1;
    fs::write(&layer, &bad).unwrap();
    store.resolve("busybox").unwrap();
    let err = store.verify(&image).unwrap_err();
    assert!(matches!(err, Error::CorruptBlob { .. }), "{err:?}");
    assert_one_line(&err, "is corrupt in the store");

    // A truncated layer: resolve notices.
    fs::write(&layer, &good_layer[..100]).unwrap();
    assert_one_line(&store.resolve("busybox").unwrap_err(), "100 bytes, the manifest says");

    // A missing layer.
    fs::remove_file(&layer).unwrap();
    let err = store.resolve("busybox").unwrap_err();
    assert!(matches!(err, Error::MissingBlob { .. }), "{err:?}");

    // A flipped byte in the config: resolve checks its digest.
    let config = store.blob_path(&image.config_digest);
    let mut c = fs::read(&config).unwrap();
    c[10] ^= 1;
    fs::write(&config, &c).unwrap();
    assert_one_line(&store.resolve("busybox").unwrap_err(), "config) is corrupt in the store");

    // Loading the image again replaces the damaged blobs.
    store.load(&busybox().oci_archive(), &mut NoProgress).unwrap();
    let again = store.resolve("busybox").unwrap();
    store.verify(&again).unwrap();
    assert_eq!(again, image);

    // A damaged index.json is one clear error, not a panic.
    fs::write(store.root().join("index.json"), b"{\"manifests\": 3}").unwrap();
    assert_one_line(&store.resolve("busybox").unwrap_err(), "not an OCI index");
}

#[test]
fn failed_operations_leave_the_store_as_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let store = loaded_store(dir.path());
    let before = snapshot(store.root());
    assert!(store.remove("nothere").is_err());
    assert!(store.tag("nothere", &"x:y".parse().unwrap()).is_err());
    assert!(store.load(&dir.path().join("nothere.tar"), &mut NoProgress).is_err());
    assert_eq!(snapshot(store.root()), before);
}

/// A store as vmrun has written it so far, byte for byte: `index.json`
/// pretty-printed with one `ref.name` annotation per named entry, the
/// manifest `load` makes for a `docker save` archive, and a manifest with
/// Docker's media types as a registry sends it. It must stay readable, and
/// rewriting `index.json` must keep its format.
#[test]
fn a_store_in_the_format_written_so_far_still_loads() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let blobs = root.join("blobs/sha256");
    fs::create_dir_all(&blobs).unwrap();
    let put = |bytes: &[u8]| {
        let d = Digest::of(bytes);
        fs::write(blobs.join(d.hex()), bytes).unwrap();
        (d, bytes.len())
    };
    let (layer, layer_size) = put(b"not a tar: resolve checks a layer's size only");
    let config = format!(
        r#"{{"architecture":"amd64","os":"linux","created":"2024-01-02T03:04:05Z","config":{{"Cmd":["sh"],"Env":["A=1"],"ExposedPorts":{{"80/tcp":{{}},"53/udp":{{}}}},"Labels":{{"b":"2","a":"1"}},"WorkingDir":"/w"}},"rootfs":{{"type":"layers","diff_ids":["{layer}"]}}}}"#
    );
    let (config_d, config_size) = put(config.as_bytes());
    let loaded = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config_d}","size":{config_size}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{layer}","size":{layer_size}}}]}}"#
    );
    let (loaded_d, loaded_size) = put(loaded.as_bytes());
    let pulled = format!(
        r#"{{
   "schemaVersion": 2,
   "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
   "config": {{
      "mediaType": "application/vnd.docker.container.image.v1+json",
      "size": {config_size},
      "digest": "{config_d}"
   }},
   "layers": [
      {{
         "mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip",
         "size": {layer_size},
         "digest": "{layer}"
      }}
   ]
}}"#
    );
    let (pulled_d, pulled_size) = put(pulled.as_bytes());
    let index = format!(
        r#"{{
  "schemaVersion": 2,
  "mediaType": "application/vnd.oci.image.index.v1+json",
  "manifests": [
    {{
      "mediaType": "application/vnd.oci.image.manifest.v1+json",
      "digest": "{loaded_d}",
      "size": {loaded_size},
      "annotations": {{
        "org.opencontainers.image.ref.name": "docker.io/library/busybox:latest"
      }}
    }},
    {{
      "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
      "digest": "{pulled_d}",
      "size": {pulled_size},
      "annotations": {{
        "org.opencontainers.image.ref.name": "localhost:5000/app:1"
      }}
    }},
    {{
      "mediaType": "application/vnd.oci.image.manifest.v1+json",
      "digest": "{loaded_d}",
      "size": {loaded_size}
    }}
  ]
}}
"#
    );
    fs::write(root.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    fs::write(root.join("index.json"), &index).unwrap();

    let store = Store::open(root).unwrap();
    let image = store.resolve("busybox").unwrap();
    assert_eq!((&image.manifest_digest, &image.config_digest), (&loaded_d, &config_d));
    assert_eq!(image.layers.len(), 1);
    assert_eq!((&image.layers[0].digest, image.layers[0].size), (&layer, layer_size as u64));
    assert_eq!(image.layers[0].media_type, "application/vnd.oci.image.layer.v1.tar");
    assert_eq!((image.config.os.as_str(), image.config.architecture.as_str()), ("linux", "amd64"));
    assert_eq!(image.config.created.as_deref(), Some("2024-01-02T03:04:05Z"));
    assert_eq!((image.config.cmd.as_slice(), image.config.env.as_slice()), (&["sh".to_owned()][..], &["A=1".to_owned()][..]));
    assert_eq!(image.config.working_dir.as_deref(), Some("/w"));
    assert_eq!(image.config.exposed_ports, ["53/udp", "80/tcp"]);
    assert_eq!(image.config.labels.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>(), ["a=1", "b=2"]);
    assert_eq!(image.config.diff_ids, std::slice::from_ref(&layer));

    let pulled_image = store.resolve("localhost:5000/app:1").unwrap();
    assert_eq!((&pulled_image.manifest_digest, &pulled_image.config_digest), (&pulled_d, &config_d));
    assert_eq!(pulled_image.layers[0].media_type, "application/vnd.docker.image.rootfs.diff.tar.gzip");
    assert_eq!(pulled_image.config, image.config);

    let list = store.list().unwrap();
    let names: Vec<_> = list.iter().map(|s| s.reference.as_ref().map(ToString::to_string)).collect();
    assert_eq!(names, [Some("docker.io/library/busybox:latest".to_owned()), Some("localhost:5000/app:1".to_owned()), None]);
    assert!(list.iter().all(|s| s.config_digest.as_ref() == Some(&config_d)));
    assert!(store.gc().unwrap().removed.is_empty());

    // A rewrite of index.json (a tag, then its removal) writes it as it was.
    store.tag("busybox", &"x:y".parse().unwrap()).unwrap();
    assert_eq!(store.remove("x:y").unwrap().len(), 1);
    assert_eq!(fs::read_to_string(root.join("index.json")).unwrap(), index);
}
