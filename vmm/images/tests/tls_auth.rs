//! Pulls and logins against Debian's docker-registry over TLS (a CA made by
//! the test, given in a certs.d directory) with htpasswd basic auth, and
//! with client certificates required.

#![allow(clippy::unwrap_used)] // test code: a failed step is a failed test

mod support;

use std::path::Path;

use support::registry::{Options, Registry, TestCa};
use support::{assert_one_line, busybox};
use vmrun_images::{Credentials, Error, NoProgress, PullOptions, Reference, Store};

const USER: &str = "tester";
const PASSWORD: &str = "correct horse";

fn options(certs_d: &Path, credentials: Option<Credentials>) -> PullOptions {
    PullOptions { certs_dir: Some(certs_d.to_owned()), credentials, ..PullOptions::default() }
}

fn pull(reg: &Registry, options: &PullOptions) -> Result<vmrun_images::Image, Error> {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let reference: Reference = format!("{}/busybox:latest", reg.host()).parse().unwrap();
    store.pull(&reference, options, &mut NoProgress)
}

#[test]
fn login_and_pull_over_tls_with_basic_auth() {
    let ca = TestCa::new();
    let reg = Registry::start_with(&Options { tls: Some(&ca), user: Some((USER, PASSWORD)), ..Options::default() });
    reg.push_layout(&busybox().oci_layout(), "busybox", "latest");
    let certs = tempfile::tempdir().unwrap();
    ca.certs_d(certs.path(), &reg.host(), false);
    let right = Some(Credentials::new(USER, PASSWORD));

    vmrun_images::login(&reg.host(), &options(certs.path(), right.clone())).unwrap();
    let err = vmrun_images::login(&reg.host(), &options(certs.path(), Some(Credentials::new(USER, "wrong")))).unwrap_err();
    assert!(matches!(err, Error::LoginDenied { .. }), "{err:?}");
    assert_one_line(&err, &format!("registry {} refused the user name and password: HTTP 401", reg.host()));

    let image = pull(&reg, &options(certs.path(), right.clone())).unwrap();
    assert_eq!(image.manifest_digest, busybox().digest("MANIFEST_DIGEST"));

    let err = pull(&reg, &options(certs.path(), None)).unwrap_err();
    assert!(matches!(err, Error::Denied { .. }), "{err:?}");
    assert_one_line(&err, &format!("registry {} denied access to busybox: the registry asks for a user name and password", reg.host()));

    // Without the registry's CA, its certificate is not trusted: a
    // certs.d directory without ca.crt still means TLS, with the
    // system's CAs only.
    let bare = tempfile::tempdir().unwrap();
    std::fs::create_dir(bare.path().join(reg.host())).unwrap();
    let err = pull(&reg, &options(bare.path(), right.clone())).unwrap_err();
    assert!(matches!(err, Error::Unreachable { .. }), "{err:?}");
    assert_one_line(&err, "UnknownIssuer");
    let err = vmrun_images::login(&reg.host(), &options(bare.path(), right)).unwrap_err();
    assert_one_line(&err, &format!("cannot reach registry {}", reg.host()));
}

#[test]
fn client_certificates_from_certs_d() {
    let ca = TestCa::new();
    let reg = Registry::start_with(&Options { tls: Some(&ca), client_certs: true, ..Options::default() });
    reg.push_layout(&busybox().oci_layout(), "busybox", "latest");

    let ca_only = tempfile::tempdir().unwrap();
    ca.certs_d(ca_only.path(), &reg.host(), false);
    let err = pull(&reg, &options(ca_only.path(), None)).unwrap_err();
    assert!(matches!(err, Error::Unreachable { .. }), "{err:?}");
    assert_one_line(&err, &format!("cannot reach registry {}", reg.host()));

    let with_client = tempfile::tempdir().unwrap();
    ca.certs_d(with_client.path(), &reg.host(), true);
    let image = pull(&reg, &options(with_client.path(), None)).unwrap();
    assert_eq!(image.manifest_digest, busybox().digest("MANIFEST_DIGEST"));

    // A client certificate without its key is one clear error, as in
    // docker.
    std::fs::remove_file(with_client.path().join(reg.host()).join("client.key")).unwrap();
    let err = pull(&reg, &options(with_client.path(), None)).unwrap_err();
    assert!(matches!(err, Error::Certs { .. }), "{err:?}");
    assert_one_line(&err, "client.cert: client certificate without its key");
}
