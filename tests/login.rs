//! `vmrun login`, `vmrun pull` and `vmrun logout` against Debian's
//! docker-registry over TLS (a CA made by the test, in a certs.d given by
//! `VMRUN_CERTS_D`) with htpasswd basic auth, with docker's config.json in
//! a temporary `DOCKER_CONFIG`: in the file, and in a credential helper.
//! No VM is started.

#![allow(clippy::unwrap_used)] // test code: a failed step is a failed test

#[path = "../vmm/images/tests/support/mod.rs"]
mod images_support;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use base64::Engine;
use images_support::busybox;
use images_support::registry::{Options, Registry, TestCa};
use serde_json::Value;

const VMRUN: &str = env!("CARGO_BIN_EXE_vmrun");
const USER: &str = "tester";
const PASSWORD: &str = "s3cret-Pa55word";

/// A registry with the busybox image, and the directories a vmrun run is
/// given: docker's config, certs.d, vmrun's home.
struct Setup {
    reg: Registry,
    _ca: TestCa,
    dir: tempfile::TempDir,
    /// Everything vmrun wrote on standard error, over all runs.
    stderr: String,
}

impl Setup {
    fn new() -> Self {
        let ca = TestCa::new();
        let reg = Registry::start_with(&Options { tls: Some(&ca), user: Some((USER, PASSWORD)), ..Options::default() });
        reg.push_layout(&busybox().oci_layout(), "busybox", "latest");
        let dir = tempfile::tempdir().unwrap();
        ca.certs_d(&dir.path().join("certs.d"), &reg.host(), false);
        std::fs::create_dir(dir.path().join("docker")).unwrap();
        Self { reg, _ca: ca, dir, stderr: String::new() }
    }

    fn config_path(&self) -> PathBuf {
        self.dir.path().join("docker/config.json")
    }

    fn config(&self) -> Value {
        serde_json::from_slice(&std::fs::read(self.config_path()).unwrap()).unwrap()
    }

    fn image(&self) -> String {
        format!("{}/busybox:latest", self.reg.host())
    }

    /// Runs vmrun with `args` and `input` on standard input, debug logging
    /// on; a fresh image store each time.
    fn vmrun(&mut self, args: &[&str], input: &str) -> Output {
        let home = tempfile::tempdir_in(self.dir.path()).unwrap();
        let path = format!("{}:{}", self.dir.path().join("bin").display(), std::env::var("PATH").unwrap_or_default());
        let mut child = Command::new(VMRUN)
            .args(args)
            .env("DOCKER_CONFIG", self.dir.path().join("docker"))
            .env("HOME", self.dir.path())
            .env("VMRUN_CERTS_D", self.dir.path().join("certs.d"))
            .env("VMRUN_HOME", home.path())
            .env("VMRUN_LOG", "debug")
            .env("PATH", path)
            .env_remove("VMRUN_INSECURE_REGISTRIES")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        match stdin.write_all(input.as_bytes()) {
            // It ended without reading its input (a refused login).
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
            r => r.unwrap(),
        }
        drop(stdin);
        let out = child.wait_with_output().unwrap();
        self.stderr += &String::from_utf8_lossy(&out.stderr);
        self.stderr += &String::from_utf8_lossy(&out.stdout);
        out
    }

    fn login(&mut self, password: &str) -> Output {
        let host = self.reg.host();
        self.vmrun(&["login", "-u", USER, "--password-stdin", &host], &format!("{password}\n"))
    }

    /// The password, plain and as a basic header has it, never shown.
    fn assert_no_password_shown(&self) {
        let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PASSWORD}"));
        // Debug logging was on, and said what it does with the user.
        assert!(self.stderr.contains(&format!("checking the credentials of {USER} with registry")), "{}", self.stderr);
        assert!(!self.stderr.contains(PASSWORD), "the password was shown: {}", self.stderr);
        assert!(!self.stderr.contains(&encoded), "the password was shown encoded: {}", self.stderr);
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The error lines (`vmrun: error: ...`) of a run.
fn errors(out: &Output) -> Vec<String> {
    text(&out.stderr).lines().filter(|l| l.starts_with("vmrun: error: ")).map(str::to_owned).collect()
}

#[test]
fn login_pull_logout_with_the_config_file() {
    let mut s = Setup::new();
    let host = s.reg.host();
    let image = s.image();

    // Without credentials, the pull is refused, saying how to log in.
    let out = s.vmrun(&["pull", &image], "");
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let e = errors(&out);
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(e[0].contains(&format!("registry {host} denied access to busybox")), "{e:?}");
    assert!(e[0].contains(&format!("log in first: vmrun login {host}")), "{e:?}");

    // A wrong password is one clear error and nothing is saved.
    let out = s.login("not-the-password");
    assert_eq!(out.status.code(), Some(1));
    let e = errors(&out);
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(e[0].contains(&format!("cannot log in to {host}: registry {host} refused the user name and password")), "{e:?}");
    assert!(!s.config_path().exists());

    // The right one is saved in the file (0600), as docker saves it.
    let out = s.login(PASSWORD);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "Login Succeeded");
    assert!(text(&out.stderr).contains("saved unencrypted"), "{}", text(&out.stderr));
    let mode = std::fs::metadata(s.config_path()).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let auth = s.config()["auths"][&host]["auth"].as_str().unwrap().to_owned();
    let decoded = base64::engine::general_purpose::STANDARD.decode(auth).unwrap();
    assert_eq!(text(&decoded), format!("{USER}:{PASSWORD}"));

    // The pull uses it, over TLS with the certs.d CA.
    let out = s.vmrun(&["pull", &image], "");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains(&format!("pulled {}", busybox().var("MANIFEST_DIGEST"))), "{}", text(&out.stdout));

    // Logout removes it; the pull is refused again.
    let out = s.vmrun(&["logout", &host], "");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), format!("Removing login credentials for {host}"));
    assert!(s.config().get("auths").is_none_or(|a| a.get(&host).is_none()), "{}", s.config());
    let out = s.vmrun(&["logout", &format!("https://{host}/")], "");
    assert_eq!(text(&out.stdout).trim(), format!("Not logged in to {host}"));
    let out = s.vmrun(&["pull", &image], "");
    assert_eq!(out.status.code(), Some(1));

    // Without --password-stdin and no terminal, there is no password.
    let out = s.vmrun(&["login", "-u", USER, &host], PASSWORD);
    assert_eq!(out.status.code(), Some(1));
    assert!(errors(&out)[0].contains("--password-stdin"), "{:?}", errors(&out));

    s.assert_no_password_shown();
}

/// A credential helper that keeps one server's credentials in a file and
/// logs each action.
fn write_helper(dir: &Path) {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let script = format!(
        r#"#!/bin/sh
store={store}
echo "$1" >> {log}
case "$1" in
store) cat > "$store" ;;
get)
    read -r server
    if [ -f "$store" ] && grep -q "\"ServerURL\":\"$server\"" "$store"; then cat "$store"; exit 0; fi
    echo "credentials not found in native keychain"; exit 1 ;;
erase)
    if [ -f "$store" ]; then rm "$store"; exit 0; fi
    echo "credentials not found in native keychain"; exit 1 ;;
*) echo "unknown action $1"; exit 1 ;;
esac
"#,
        store = dir.join("helper-store.json").display(),
        log = dir.join("helper.log").display(),
    );
    let path = bin.join("docker-credential-vmruntest");
    std::fs::write(&path, script).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

#[test]
fn credentials_in_a_credential_helper() {
    let mut s = Setup::new();
    let host = s.reg.host();
    let image = s.image();
    write_helper(s.dir.path());
    std::fs::write(s.config_path(), r#"{"credsStore":"vmruntest","experimental":"enabled"}"#).unwrap();
    let log_path = s.dir.path().join("helper.log");
    let helper_log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let stored = s.dir.path().join("helper-store.json");

    let out = s.login(PASSWORD);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(!text(&out.stderr).contains("unencrypted"), "{}", text(&out.stderr));
    let kept: Value = serde_json::from_slice(&std::fs::read(&stored).unwrap()).unwrap();
    assert_eq!((kept["ServerURL"].as_str(), kept["Username"].as_str()), (Some(host.as_str()), Some(USER)));
    assert_eq!(kept["Secret"].as_str(), Some(PASSWORD));
    // The file is as it was: no password in it.
    assert_eq!(s.config(), serde_json::json!({"credsStore": "vmruntest", "experimental": "enabled"}));

    let out = s.vmrun(&["pull", &image], "");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(helper_log().lines().collect::<Vec<_>>(), ["store", "get"]);

    let out = s.vmrun(&["logout", &host], "");
    assert_eq!(text(&out.stdout).trim(), format!("Removing login credentials for {host}"));
    assert!(!stored.exists());
    let out = s.vmrun(&["logout", &host], "");
    assert_eq!(text(&out.stdout).trim(), format!("Not logged in to {host}"));
    // With nothing in the helper, the pull goes without credentials.
    let out = s.vmrun(&["pull", &image], "");
    assert_eq!(out.status.code(), Some(1));
    assert!(errors(&out)[0].contains("log in first"), "{:?}", errors(&out));

    s.assert_no_password_shown();
}
