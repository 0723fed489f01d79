//! Loading the busybox test image (`tests/images/make-busybox-image.sh`)
//! from its `docker save` and OCI archives, and damaged archives.

#![allow(clippy::unwrap_used)] // test code: a failed step is a failed test

mod support;

use std::fs;
use std::io::Write;

use support::{assert_one_line, busybox, snapshot, Recorder};
use vmrun_images::{spec, Error, NoProgress, Store};

#[test]
fn loads_oci_archive_with_its_digests() {
    let img = busybox();
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let mut rec = Recorder::default();
    let loaded = store.load(&img.oci_archive(), &mut rec).unwrap();
    assert_eq!(loaded.len(), 1);
    let image = store.resolve("busybox").unwrap();
    assert_eq!(image, loaded[0]);
    assert_eq!(image.reference.as_ref().unwrap().to_string(), "docker.io/library/busybox:latest");
    assert_eq!(image.manifest_digest, img.digest("MANIFEST_DIGEST"));
    assert_eq!(image.config_digest, img.digest("CONFIG_DIGEST"));
    assert_eq!(image.layers.len(), 1);
    assert_eq!(image.layers[0].digest, img.digest("LAYER_DIGEST"));
    assert_eq!(image.layers[0].media_type, spec::OCI_LAYER_GZIP);
    assert_eq!(image.layers[0].size.to_string(), img.var("LAYER_SIZE"));
    assert_eq!(image.config.cmd, ["sh"]);
    assert_eq!(image.config.env, ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]);
    assert_eq!(image.config.diff_ids, [img.digest("DIFF_ID")]);
    assert_eq!((image.config.os.as_str(), image.config.architecture.as_str()), ("linux", "amd64"));
    store.verify(&image).unwrap();
    // Progress covered the whole archive.
    assert_eq!(rec.total, fs::metadata(img.oci_archive()).unwrap().len());
    assert_eq!(rec.bytes, rec.total);
    // The store is an OCI layout skopeo could read: the blobs are the
    // script's, byte for byte.
    let ours = store.blob_path(&image.manifest_digest);
    let theirs = img.oci_layout().join("blobs/sha256").join(image.manifest_digest.hex());
    assert_eq!(fs::read(ours).unwrap(), fs::read(theirs).unwrap());
    assert!(fs::read_dir(dir.path().join("tmp")).unwrap().next().is_none(), "staging left behind");
}

#[test]
fn loads_docker_save_archive_plain_and_gzipped() {
    let img = busybox();
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    store.load(&img.docker_archive(), &mut NoProgress).unwrap();
    let image = store.resolve("busybox:latest").unwrap();
    // Same config bytes as the OCI image; the layer is the uncompressed tar.
    assert_eq!(image.config_digest, img.digest("CONFIG_DIGEST"));
    assert_eq!(image.layers[0].digest, img.digest("DIFF_ID"));
    assert_eq!(image.layers[0].media_type, spec::OCI_LAYER_TAR);
    store.verify(&image).unwrap();
    // The manifest made for it, byte for byte as vmrun has always written
    // it (its digest names the image in stores that have it).
    let config_size = fs::metadata(store.blob_path(&image.config_digest)).unwrap().len();
    let (layer, layer_size) = (&image.layers[0].digest, image.layers[0].size);
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"{}","config":{{"mediaType":"{}","digest":"{}","size":{config_size}}},"layers":[{{"mediaType":"{}","digest":"{layer}","size":{layer_size}}}]}}"#,
        spec::OCI_MANIFEST,
        spec::OCI_CONFIG,
        image.config_digest,
        spec::OCI_LAYER_TAR,
    );
    assert_eq!(fs::read_to_string(store.blob_path(&image.manifest_digest)).unwrap(), manifest);
    // By image ID, as `docker run ID` would.
    assert_eq!(store.resolve(&img.var("CONFIG_DIGEST")[7..19]).unwrap().manifest_digest, image.manifest_digest);

    // `docker save | gzip` loads too, to the same image.
    let gz = dir.path().join("busybox.tar.gz");
    let mut enc = flate2::write::GzEncoder::new(fs::File::create(&gz).unwrap(), flate2::Compression::fast());
    enc.write_all(&fs::read(img.docker_archive()).unwrap()).unwrap();
    enc.finish().unwrap();
    let other = tempfile::tempdir().unwrap();
    let store2 = Store::open(other.path()).unwrap();
    let loaded = store2.load(&gz, &mut NoProgress).unwrap();
    assert_eq!(loaded[0].manifest_digest, image.manifest_digest);
}

/// Loads `bytes` as an archive into a store holding busybox already, and
/// checks that it fails with one line saying `needle`, leaving the store
/// unchanged.
fn assert_load_fails(name: &str, bytes: &[u8], needle: &str) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().join("store")).unwrap();
    store.load(&busybox().oci_archive(), &mut NoProgress).unwrap();
    let before = snapshot(store.root());
    let path = dir.path().join(name);
    fs::write(&path, bytes).unwrap();
    let err = store.load(&path, &mut NoProgress).unwrap_err();
    assert!(matches!(err, Error::Archive { .. }), "{name}: {err:?}");
    assert_one_line(&err, needle);
    assert_one_line(&err, name);
    assert_eq!(snapshot(store.root()), before, "{name} changed the store");
}

#[test]
fn damaged_archives_give_one_clear_error_and_change_nothing() {
    let oci = fs::read(busybox().oci_archive()).unwrap();
    let docker = fs::read(busybox().docker_archive()).unwrap();

    // Cut short in the middle of the layer blob.
    assert_load_fails("truncated.tar", &oci[..oci.len() / 2], "");
    // A byte of the layer flipped: it no longer matches its name.
    let layer_at = find(&oci, &[0x1f, 0x8b]).unwrap();
    let mut flipped = oci.clone();
    flipped[layer_at + 5000] ^= 0xff;
    assert_load_fails("flipped.tar", &flipped, "hashes to");
    // A byte of the docker layer.tar flipped: it no longer matches the
    // config's diff_id.
    let at = find(&docker, b"bin/busybox").unwrap();
    let mut flipped = docker.clone();
    flipped[at + 700] ^= 0xff;
    assert_load_fails("flipped-docker.tar", &flipped, "but the config says");
    // Not an archive at all, and an empty file.
    assert_load_fails("random.tar", &[0x42; 4096], "not a tar archive");
    assert_load_fails("empty.tar", b"", "neither a docker save archive");
    // A tar of something else.
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(5);
    h.set_cksum();
    b.append_data(&mut h, "hello.txt", &b"hello"[..]).unwrap();
    assert_load_fails("other.tar", &b.into_inner().unwrap(), "neither a docker save archive");
}

#[test]
fn missing_archive_is_one_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let err = store.load(&dir.path().join("nope.tar"), &mut NoProgress).unwrap_err();
    assert_one_line(&err, "nope.tar: No such file");
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}
