//! Debian's `docker-registry` (the CNCF distribution registry) on a free
//! loopback port, with its storage in a temporary directory, killed when
//! dropped; and a small push client over HTTP for OCI layouts.

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The registry binary from Debian's docker-registry package.
pub const BINARY: &str = "/usr/bin/docker-registry";

#[derive(Debug)]
pub struct Registry {
    child: Child,
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl Registry {
    /// Starts a registry and waits until it answers `GET /v2/`.
    pub fn start() -> Self {
        assert!(
            Path::new(BINARY).exists(),
            "{BINARY} is missing: install Debian's docker-registry package (scripts/deps.sh)"
        );
        let mut last_err = String::new();
        for _ in 0..3 {
            let dir = tempfile::tempdir().unwrap();
            let port = super::closed_port();
            let config = dir.path().join("config.yml");
            fs::write(
                &config,
                format!(
                    "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\n\
                     storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
                     http:\n  addr: 127.0.0.1:{port}\n",
                    dir.path().join("data").display()
                ),
            )
            .unwrap();
            let mut cmd = Command::new(BINARY);
            cmd.arg("serve").arg(&config).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
            // SAFETY: prctl is async-signal-safe and touches no memory of
            // ours; it makes the kernel kill the registry if this test's
            // thread ends without dropping it (a crash, an abort).
            unsafe {
                cmd.pre_exec(|| {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                    Ok(())
                });
            }
            let child = cmd.spawn().unwrap();
            let mut reg = Registry { child, port, _dir: dir };
            let deadline = Instant::now() + Duration::from_secs(15);
            while Instant::now() < deadline {
                if let Ok(Some(status)) = reg.child.try_wait() {
                    last_err = format!("docker-registry exited with {status}");
                    break;
                }
                if let Ok(r) = ureq::get(&format!("http://127.0.0.1:{port}/v2/")).call() {
                    if r.status() == 200 {
                        return reg;
                    }
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            if last_err.is_empty() {
                last_err = "docker-registry did not answer within 15 s".into();
            }
            drop(reg);
        }
        panic!("{last_err}");
    }

    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// Uploads a blob (monolithic upload) unless the registry has it.
    pub fn push_blob(&self, repo: &str, digest: &str, bytes: &[u8]) {
        let head = ureq::head(&self.url(&format!("/v2/{repo}/blobs/{digest}"))).call();
        if head.is_ok_and(|r| r.status() == 200) {
            return;
        }
        let r = ureq::post(&self.url(&format!("/v2/{repo}/blobs/uploads/"))).send_empty().unwrap();
        assert_eq!(r.status(), 202, "starting an upload");
        let location = r.headers().get("location").unwrap().to_str().unwrap().to_owned();
        let location = if location.starts_with("http") { location } else { self.url(&location) };
        let sep = if location.contains('?') { '&' } else { '?' };
        let r = ureq::put(&format!("{location}{sep}digest={digest}"))
            .header("Content-Type", "application/octet-stream")
            .send(bytes)
            .unwrap();
        assert_eq!(r.status(), 201, "uploading {digest}");
    }

    /// Uploads a manifest (or index) under `reference` (a tag or digest).
    pub fn push_manifest(&self, repo: &str, reference: &str, media_type: &str, bytes: &[u8]) {
        let r = ureq::put(&self.url(&format!("/v2/{repo}/manifests/{reference}")))
            .header("Content-Type", media_type)
            .send(bytes)
            .unwrap();
        assert_eq!(r.status(), 201, "pushing manifest {repo}:{reference}");
    }

    /// Pushes the image that an OCI layout's `index.json` names first, as
    /// `repo:tag`.
    pub fn push_layout(&self, layout: &Path, repo: &str, tag: &str) {
        let blob = |d: &str| fs::read(layout.join("blobs/sha256").join(d.trim_start_matches("sha256:"))).unwrap();
        let index: Value = serde_json::from_slice(&fs::read(layout.join("index.json")).unwrap()).unwrap();
        let desc = &index["manifests"][0];
        let mdigest = desc["digest"].as_str().unwrap();
        let mbytes = blob(mdigest);
        let manifest: Value = serde_json::from_slice(&mbytes).unwrap();
        let mut blobs = vec![manifest["config"]["digest"].as_str().unwrap().to_owned()];
        for l in manifest["layers"].as_array().unwrap() {
            blobs.push(l["digest"].as_str().unwrap().to_owned());
        }
        for d in &blobs {
            self.push_blob(repo, d, &blob(d));
        }
        self.push_manifest(repo, tag, desc["mediaType"].as_str().unwrap(), &mbytes);
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
