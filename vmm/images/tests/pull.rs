//! Pulls: from Debian's docker-registry started on a loopback port (the
//! busybox test image pushed to it), from a fake registry that lies, and
//! from nowhere.

#![allow(clippy::unwrap_used)] // test code: a failed step is a failed test

mod support;

use std::time::{Duration, Instant};

use support::fake::{Body, FakeImage, FakeRegistry, Route};
use support::registry::Registry;
use support::{assert_one_line, busybox, closed_port, snapshot, Recorder};
use vmrun_images::{Credentials, Digest, Error, MinRate, NoProgress, PullOptions, Reference, Store};

fn r(s: &str) -> Reference {
    s.parse().unwrap()
}

#[test]
fn pulls_busybox_from_a_real_registry() {
    let reg = Registry::start();
    reg.push_layout(&busybox().oci_layout(), "busybox", "latest");
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let reference = r(&format!("{}/busybox:latest", reg.host()));

    let mut rec = Recorder::default();
    let image = store.pull(&reference, &PullOptions::default(), &mut rec).unwrap();
    assert_eq!(image.manifest_digest, busybox().digest("MANIFEST_DIGEST"));
    assert_eq!(image.config_digest, busybox().digest("CONFIG_DIGEST"));
    assert_eq!(image.layers[0].digest, busybox().digest("LAYER_DIGEST"));
    assert_eq!(image.config.cmd, ["sh"]);
    store.verify(&image).unwrap();
    assert_eq!(store.resolve(&format!("{}/busybox", reg.host())).unwrap(), image);
    assert_eq!(rec.started.len(), 2, "config and layer downloaded");
    assert_eq!(rec.bytes, rec.total);

    // Again: nothing is downloaded, the layer is found in the store.
    let mut rec = Recorder::default();
    store.pull(&reference, &PullOptions::default(), &mut rec).unwrap();
    assert!(rec.started.is_empty(), "{rec:?}");
    assert_eq!(rec.existing.len(), 2);

    // By digest, into a fresh store.
    let other = tempfile::tempdir().unwrap();
    let store2 = Store::open(other.path()).unwrap();
    let by_digest = r(&format!("{}/busybox@{}", reg.host(), busybox().var("MANIFEST_DIGEST")));
    let image2 = store2.pull(&by_digest, &PullOptions::default(), &mut NoProgress).unwrap();
    assert_eq!(image2.manifest_digest, image.manifest_digest);
    assert_eq!(store2.resolve(&by_digest.to_string()).unwrap().manifest_digest, image.manifest_digest);
}

#[test]
fn index_resolves_to_linux_amd64() {
    let reg = Registry::start();
    let bb = busybox();
    reg.push_layout(&bb.oci_layout(), "multi", "amd64-only");
    // An arm64 sibling: same layer, its own config.
    let config = br#"{"architecture":"arm64","os":"linux","config":{},"rootfs":{"type":"layers","diff_ids":[]}}"#;
    let config_digest = Digest::of(config);
    reg.push_blob("multi", &config_digest.to_string(), config);
    let size: u64 = bb.var("LAYER_SIZE").parse().unwrap();
    let arm = FakeImage::manifest_for(&config_digest, config.len() as u64, &bb.digest("LAYER_DIGEST"), size);
    let arm_digest = Digest::of(&arm);
    reg.push_manifest("multi", &arm_digest.to_string(), "application/vnd.oci.image.manifest.v1+json", &arm);
    let amd_size = std::fs::metadata(bb.oci_layout().join("blobs/sha256").join(bb.digest("MANIFEST_DIGEST").hex()))
        .unwrap()
        .len();
    let entry = |d: &str, size: u64, arch: &str| {
        format!(
            r#"{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{d}","size":{size},"platform":{{"architecture":"{arch}","os":"linux"}}}}"#
        )
    };
    let index = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{},{}]}}"#,
        entry(&arm_digest.to_string(), arm.len() as u64, "arm64"),
        entry(bb.var("MANIFEST_DIGEST"), amd_size, "amd64"),
    );
    reg.push_manifest("multi", "latest", "application/vnd.oci.image.index.v1+json", index.as_bytes());
    let arm_only = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{}]}}"#,
        entry(&arm_digest.to_string(), arm.len() as u64, "arm64"),
    );
    reg.push_manifest("multi", "arm", "application/vnd.oci.image.index.v1+json", arm_only.as_bytes());

    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let image = store.pull(&r(&format!("{}/multi", reg.host())), &PullOptions::default(), &mut NoProgress).unwrap();
    assert_eq!(image.manifest_digest, bb.digest("MANIFEST_DIGEST"));

    let before = snapshot(store.root());
    let err = store.pull(&r(&format!("{}/multi:arm", reg.host())), &PullOptions::default(), &mut NoProgress).unwrap_err();
    assert!(matches!(err, Error::Platform { .. }), "{err:?}");
    assert_one_line(&err, "no linux/amd64 image in the index (it has: linux/arm64)");
    // An arm64 manifest pulled directly is refused by its config.
    let err = store
        .pull(&r(&format!("{}/multi@{arm_digest}", reg.host())), &PullOptions::default(), &mut NoProgress)
        .unwrap_err();
    assert_one_line(&err, "the image is for linux/arm64");
    assert_eq!(snapshot(store.root()), before);
}

#[test]
fn concurrent_pulls_of_one_image() {
    let reg = Registry::start();
    reg.push_layout(&busybox().oci_layout(), "busybox", "latest");
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_owned();
    let reference = r(&format!("{}/busybox", reg.host()));
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let (root, reference) = (root.clone(), reference.clone());
            std::thread::spawn(move || {
                let store = Store::open(&root).unwrap();
                store.pull(&reference, &PullOptions::default(), &mut NoProgress).unwrap()
            })
        })
        .collect();
    for t in threads {
        assert_eq!(t.join().unwrap().manifest_digest, busybox().digest("MANIFEST_DIGEST"));
    }
    let store = Store::open(&root).unwrap();
    assert_eq!(store.list().unwrap().len(), 1);
    assert!(store.gc().unwrap().removed.is_empty());
}

#[test]
fn missing_image_unreachable_registry_and_bad_reference_are_one_clear_error() {
    let reg = Registry::start();
    reg.push_layout(&busybox().oci_layout(), "busybox", "latest");
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let before = snapshot(store.root());

    let err = store.pull(&r(&format!("{}/nothere:latest", reg.host())), &PullOptions::default(), &mut NoProgress).unwrap_err();
    assert!(matches!(err, Error::ManifestUnknown { .. }), "{err:?}");
    assert_one_line(&err, &format!("image {}/nothere:latest not found in registry {}", reg.host(), reg.host()));
    let err = store.pull(&r(&format!("{}/busybox:1.0", reg.host())), &PullOptions::default(), &mut NoProgress).unwrap_err();
    assert_one_line(&err, "busybox:1.0 not found in registry");

    let port = closed_port();
    let start = Instant::now();
    let err = store.pull(&r(&format!("127.0.0.1:{port}/busybox")), &PullOptions::default(), &mut NoProgress).unwrap_err();
    assert!(matches!(err, Error::Unreachable { .. }), "{err:?}");
    assert_one_line(&err, &format!("cannot reach registry 127.0.0.1:{port}"));
    assert!(start.elapsed() < Duration::from_secs(10));

    let err = format!("{}/BusyBox", reg.host()).parse::<Reference>().unwrap_err();
    assert_one_line(&err, "must be lowercase");
    let err = "busybox:".parse::<Reference>().unwrap_err();
    assert_one_line(&err, "invalid reference \"busybox:\": bad tag");
    assert_eq!(snapshot(store.root()), before);
}

/// Pulls `img:latest` from the fake registry into a store that already
/// holds an image, expecting an error that says `needle` and an unchanged
/// store.
fn assert_pull_fails(fake: &FakeRegistry, options: &PullOptions, needle: &str) -> Error {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    store.load(&busybox().oci_archive(), &mut NoProgress).unwrap();
    let before = snapshot(store.root());
    let err = store.pull(&r(&format!("{}/img:latest", fake.host())), options, &mut NoProgress).unwrap_err();
    assert_one_line(&err, needle);
    assert_eq!(snapshot(store.root()), before, "a failed pull changed the store");
    err
}

#[test]
fn fake_registry_tells_the_truth_with_a_token() {
    let fake = FakeRegistry::start();
    let img = FakeImage::new(300_000);
    fake.serve_image("img", "latest", &img);
    fake.require_token("s3cret");
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let image = store.pull(&r(&format!("{}/img", fake.host())), &PullOptions::default(), &mut NoProgress).unwrap();
    assert_eq!(image.manifest_digest, img.manifest_digest);
    assert_eq!(image.config.working_dir.as_deref(), Some("/w"));
    assert_eq!(image.config.user.as_deref(), Some("1000:1000"));
    assert_eq!(image.config.env, ["A=1"]);
    store.verify(&image).unwrap();
    let reqs = fake.requests();
    assert!(reqs.iter().any(|l| l.starts_with("GET /token?service=fake&scope=repository%3Aimg%3Apull")), "{reqs:?}");
    assert!(reqs.iter().filter(|l| l.contains("/blobs/")).all(|l| l.ends_with("auth")), "{reqs:?}");
}

/// With an identity token, the token service is asked by OAuth2's refresh
/// grant (a POST), as docker does, not with the user name and password.
#[test]
fn identity_token_is_refreshed_at_the_token_service() {
    let fake = FakeRegistry::start();
    fake.serve_image("img", "latest", &FakeImage::new(1000));
    fake.require_token("s3cret");
    let credentials = Credentials { identity_token: Some("refresh-me".into()), ..Credentials::new("", "") };
    let opts = PullOptions { credentials: Some(credentials), ..PullOptions::default() };
    let dir = tempfile::tempdir().unwrap();
    Store::open(dir.path()).unwrap().pull(&r(&format!("{}/img", fake.host())), &opts, &mut NoProgress).unwrap();
    assert!(fake.requests().iter().any(|l| l.starts_with("POST /token ") && l.ends_with("anon")), "{:?}", fake.requests());
    let bodies = fake.bodies();
    assert_eq!(bodies.len(), 1, "{bodies:?}");
    let form: Vec<&str> = bodies[0].split('&').collect();
    for field in ["grant_type=refresh_token", "refresh_token=refresh-me", "service=fake", "scope=repository%3Aimg%3Apull"] {
        assert!(form.contains(&field), "{field} missing from {form:?}");
    }
}

#[test]
fn lying_registry_leaves_the_store_unchanged() {
    let opts = PullOptions::default();
    let img = FakeImage::new(200_000);
    let layer_path = format!("/v2/img/blobs/{}", img.layer_digest);
    let config_path = format!("/v2/img/blobs/{}", img.config_digest);
    let manifest_path = "/v2/img/manifests/latest";

    // A layer with other bytes of the same size.
    let fake = FakeRegistry::start();
    fake.serve_image("img", "latest", &img);
    let mut other = img.layer.clone();
    other[123] ^= 1;
    fake.route(&layer_path, Route::ok(Body::Bytes(other)));
    let err = assert_pull_fails(&fake, &opts, "but its content hashes to");
    assert!(matches!(err, Error::Registry { .. }));

    // A layer whose Content-Length is not the manifest's size.
    fake.route(&layer_path, Route::ok(Body::WrongLength(img.layer.clone(), 1000)));
    assert_pull_fails(&fake, &opts, "is 1000 bytes by the registry's Content-Length, the manifest says 200000");

    // Longer and shorter layers without a Content-Length.
    let mut longer = img.layer.clone();
    longer.extend_from_slice(b"more");
    fake.route(&layer_path, Route::ok(Body::Chunked(longer)));
    assert_pull_fails(&fake, &opts, "is longer than the 200000 bytes it should have");
    fake.route(&layer_path, Route::ok(Body::Chunked(img.layer[..5000].to_vec())));
    assert_pull_fails(&fake, &opts, "ended after 5000 of its 200000 bytes");

    // A layer without end.
    fake.route(&layer_path, Route::ok(Body::Endless));
    assert_pull_fails(&fake, &opts, "is longer than the 200000 bytes");

    // A config that lies.
    fake.serve_image("img", "latest", &img);
    fake.route(&config_path, Route::ok(Body::Bytes(b"{}".to_vec())));
    assert_pull_fails(&fake, &opts, "config");

    // A manifest without end, and one over the size limit.
    fake.route(manifest_path, Route::ok(Body::Endless));
    assert_pull_fails(&fake, &opts, "larger than the 4194304 bytes allowed");
    fake.route(manifest_path, Route::ok(Body::Bytes(vec![b' '; 5 << 20])));
    assert_pull_fails(&fake, &opts, "is 5242880 bytes, more than the 4194304 allowed");

    // A manifest whose Docker-Content-Digest header is not its digest.
    fake.route(
        manifest_path,
        Route::ok(Body::Bytes(img.manifest.clone())).header("Docker-Content-Digest", &img.config_digest.to_string()),
    );
    assert_pull_fails(&fake, &opts, "the Docker-Content-Digest header says");

    // A manifest asked for by digest that comes back different.
    fake.serve_image("img", "latest", &img);
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    fake.route(&format!("/v2/img/manifests/{}", img.manifest_digest), Route::ok(Body::Bytes(img.config.clone())));
    let err = store
        .pull(&r(&format!("{}/img@{}", fake.host(), img.manifest_digest)), &opts, &mut NoProgress)
        .unwrap_err();
    assert_one_line(&err, "was asked for, but the content sent hashes to");

    // A manifest that declares a huge config, and one that is not JSON.
    let huge = FakeImage::manifest_for(&img.config_digest, 5 << 20, &img.layer_digest, 200_000);
    fake.route(manifest_path, Route::ok(Body::Bytes(huge)));
    assert_pull_fails(&fake, &opts, "more than the 4194304 allowed");
    fake.route(manifest_path, Route::ok(Body::Bytes(b"<html>".to_vec())));
    assert_pull_fails(&fake, &opts, "not a manifest");

    // A registry that never answers.
    fake.route(manifest_path, Route::ok(Body::Stall));
    let quick = PullOptions { timeout: Duration::from_secs(1), ..PullOptions::default() };
    let start = Instant::now();
    assert_pull_fails(&fake, &quick, "timeout");
    assert!(start.elapsed() < Duration::from_secs(10));

    // An HTTP error.
    fake.route(layer_path.as_str(), Route { status: 500, headers: vec![], body: Body::Bytes(b"oops".to_vec()) });
    fake.serve_image("img", "latest", &img);
    fake.route(&layer_path, Route { status: 500, headers: vec![], body: Body::Bytes(b"oops".to_vec()) });
    assert_pull_fails(&fake, &opts, "HTTP 500");
}

/// Limits small enough for a test: 1 KiB/s over half a second, 20 s in all.
fn paced() -> PullOptions {
    PullOptions {
        min_rate: MinRate { bytes_per_sec: 1024, window: Duration::from_millis(500) },
        deadline: Some(Duration::from_secs(20)),
        ..PullOptions::default()
    }
}

#[test]
fn a_trickling_registry_is_given_up_on() {
    let img = FakeImage::new(200_000);
    let layer_path = format!("/v2/img/blobs/{}", img.layer_digest);
    let fake = FakeRegistry::start();
    fake.serve_image("img", "latest", &img);
    let opts = paced();

    // An honest registry is pulled from under these limits.
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let image = store.pull(&r(&format!("{}/img", fake.host())), &opts, &mut NoProgress).unwrap();
    assert_eq!(image.manifest_digest, img.manifest_digest);

    let trickle = |bytes: &[u8]| Body::Trickle { bytes: bytes.to_vec(), step: 1, pause: Duration::from_millis(50) };
    let quick = |what: &str| {
        let start = Instant::now();
        let err = assert_pull_fails(&fake, &opts, what);
        assert!(start.elapsed() < Duration::from_secs(5), "{what}: gave up after {:?}", start.elapsed());
        err
    };

    // A layer sent one byte every 50 ms (20 B/s).
    fake.route(&layer_path, Route::ok(trickle(&img.layer)));
    let err = quick(&format!("bytes of layer 1 {} in the last", img.layer_digest));
    assert!(matches!(err, Error::TooSlow { .. }), "{err:?}");
    assert_one_line(
        &err,
        "(minimum 1 KiB/s over 0.5 s): giving up; check the network or set VMRUN_PULL_MIN_RATE / VMRUN_PULL_TIMEOUT",
    );
    assert_one_line(&err, &format!("registry {} sent ", fake.host()));

    // A manifest, and a config, sent so.
    fake.serve_image("img", "latest", &img);
    fake.route("/v2/img/manifests/latest", Route::ok(trickle(&img.manifest)));
    quick("bytes of manifest latest in the last");
    fake.serve_image("img", "latest", &img);
    fake.route(&format!("/v2/img/blobs/{}", img.config_digest), Route::ok(trickle(&img.config)));
    quick("bytes of config");

    // A token service that trickles.
    fake.serve_image("img", "latest", &img);
    fake.require_token("s3cret");
    fake.route("/token", Route::ok(trickle(br#"{"token":"s3cret"}"#)));
    quick("bytes of the token in the last");

    // A registry fast enough for the minimum rate (80 KB/s) but not for
    // the deadline, and one that never answers: the deadline ends both.
    let fake = FakeRegistry::start();
    fake.serve_image("img", "latest", &img);
    let steady = Body::Trickle { bytes: img.layer.clone(), step: 8000, pause: Duration::from_millis(100) };
    fake.route(&layer_path, Route::ok(steady));
    let opts = PullOptions { deadline: Some(Duration::from_secs(1)), ..paced() };
    let start = Instant::now();
    let err = assert_pull_fails(&fake, &opts, "the pull took longer than the 1 s allowed (while receiving layer 1");
    assert!(matches!(err, Error::PullTimeout { .. }), "{err:?}");
    assert_one_line(&err, "giving up; check the network or set VMRUN_PULL_TIMEOUT");
    assert!(start.elapsed() < Duration::from_secs(4), "{:?}", start.elapsed());
    fake.route("/v2/img/manifests/latest", Route::ok(Body::Stall));
    let start = Instant::now();
    let no_rate = PullOptions { min_rate: MinRate { bytes_per_sec: 0, ..MinRate::default() }, ..opts };
    assert_pull_fails(&fake, &no_rate, "the pull took longer than the 1 s allowed (while receiving manifests/latest)");
    assert!(start.elapsed() < Duration::from_secs(4), "{:?}", start.elapsed());
    // With the minimum rate, a registry that sends nothing for a window is
    // too slow as well.
    let start = Instant::now();
    assert_pull_fails(&fake, &paced(), "sent 0 bytes of manifests/latest in the last 0.5 s (minimum 1 KiB/s over 0.5 s)");
    assert!(start.elapsed() < Duration::from_secs(4), "{:?}", start.elapsed());
}

#[test]
fn pull_limits_from_the_environment() {
    // One test sets these variables; the others pass their options.
    std::env::set_var("VMRUN_PULL_MIN_RATE", "2KiB/10s");
    std::env::set_var("VMRUN_PULL_TIMEOUT", "90m");
    let o = PullOptions::from_env().unwrap();
    assert_eq!(o.min_rate, MinRate { bytes_per_sec: 2048, window: Duration::from_secs(10) });
    assert_eq!(o.deadline, Some(Duration::from_secs(90 * 60)));
    std::env::set_var("VMRUN_PULL_TIMEOUT", "0");
    assert_eq!(PullOptions::from_env().unwrap().deadline, None);
    std::env::set_var("VMRUN_PULL_MIN_RATE", "fast");
    assert_one_line(&PullOptions::from_env().unwrap_err(), "VMRUN_PULL_MIN_RATE: \"fast\" is not BYTES[/SECONDS]");
    std::env::remove_var("VMRUN_PULL_MIN_RATE");
    std::env::remove_var("VMRUN_PULL_TIMEOUT");
    let d = PullOptions::from_env().unwrap();
    assert_eq!((d.min_rate, d.deadline), (MinRate::default(), Some(vmrun_images::DEFAULT_PULL_DEADLINE)));
}
