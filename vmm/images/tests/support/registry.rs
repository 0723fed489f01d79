//! Debian's `docker-registry` (the CNCF distribution registry) on a free
//! loopback port, with its storage in a temporary directory, killed when
//! dropped; optionally over TLS (with a CA made by the test, and client
//! certificates required if asked) and with htpasswd basic auth; and a
//! small push client for OCI layouts.

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::Value;
use ureq::tls::{Certificate, ClientCert, PrivateKey, RootCerts, TlsConfig};

/// The registry binary from Debian's docker-registry package.
pub const BINARY: &str = "/usr/bin/docker-registry";

/// A CA made for a test (by the `openssl` command), a server certificate
/// for 127.0.0.1 and a client certificate it signed.
#[derive(Debug)]
pub struct TestCa {
    dir: tempfile::TempDir,
}

impl TestCa {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let openssl = |args: &[&str]| {
            let out = Command::new("openssl").args(args).current_dir(dir.path()).output().expect("run openssl");
            assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        };
        let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
        let mut ca = vec!["req", "-x509", "-days", "2", "-subj", "/CN=vmrun test CA", "-keyout", "ca.key", "-out", "ca.crt"];
        ca.extend(ec);
        ca.extend(["-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign"]);
        openssl(&ca);
        for (name, ext) in [
            ("server", "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n"),
            ("client", "extendedKeyUsage=clientAuth\n"),
        ] {
            let (key, csr, crt, extfile) = (format!("{name}.key"), format!("{name}.csr"), format!("{name}.crt"), format!("{name}.ext"));
            let subj = format!("/CN=vmrun test {name}");
            let mut req = vec!["req", "-subj", &subj, "-keyout", &key, "-out", &csr];
            req.extend(ec);
            openssl(&req);
            fs::write(dir.path().join(&extfile), format!("basicConstraints=CA:FALSE\n{ext}")).unwrap();
            openssl(&[
                "x509", "-req", "-days", "2", "-in", &csr, "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-out", &crt,
                "-extfile", &extfile,
            ]);
        }
        Self { dir }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Makes `root/host/` as docker's certs.d has it: `ca.crt`, and the
    /// client certificate as `client.cert` and `client.key` if asked.
    pub fn certs_d(&self, root: &Path, host: &str, client: bool) {
        let d = root.join(host);
        fs::create_dir_all(&d).unwrap();
        fs::copy(self.path("ca.crt"), d.join("ca.crt")).unwrap();
        if client {
            fs::copy(self.path("client.crt"), d.join("client.cert")).unwrap();
            fs::copy(self.path("client.key"), d.join("client.key")).unwrap();
        }
    }

    /// A TLS configuration that trusts this CA and presents the client
    /// certificate.
    fn tls(&self) -> TlsConfig {
        let pem = |name| fs::read(self.path(name)).unwrap();
        let ca = Certificate::from_pem(&pem("ca.crt")).unwrap();
        let client = ClientCert::new_with_certs(
            &[Certificate::from_pem(&pem("client.crt")).unwrap()],
            PrivateKey::from_pem(&pem("client.key")).unwrap(),
        );
        TlsConfig::builder().root_certs(RootCerts::new_with_certs(&[ca])).client_cert(Some(client)).build()
    }
}

/// How a registry is started.
#[derive(Debug, Default)]
pub struct Options<'a> {
    /// Serve TLS with this CA's server certificate.
    pub tls: Option<&'a TestCa>,
    /// Ask TLS clients for a certificate the CA signed.
    pub client_certs: bool,
    /// Ask for this user name and password (htpasswd, bcrypt).
    pub user: Option<(&'a str, &'a str)>,
}

#[derive(Debug)]
pub struct Registry {
    child: Child,
    pub port: u16,
    _dir: tempfile::TempDir,
    agent: ureq::Agent,
    scheme: &'static str,
    authorization: Option<String>,
}

impl Registry {
    /// Starts a registry over plain HTTP, open to all, and waits until it
    /// answers `GET /v2/`.
    pub fn start() -> Self {
        Self::start_with(&Options::default())
    }

    /// Starts a registry as `options` say and waits until it answers
    /// `GET /v2/` (with 200, or 401 when it asks for a password).
    pub fn start_with(options: &Options<'_>) -> Self {
        assert!(
            Path::new(BINARY).exists(),
            "{BINARY} is missing: install Debian's docker-registry package (scripts/deps.sh)"
        );
        let mut agent_config = ureq::Agent::config_builder().http_status_as_error(false).proxy(None);
        if let Some(ca) = options.tls {
            agent_config = agent_config.tls_config(ca.tls());
        }
        let agent = ureq::Agent::new_with_config(agent_config.build());
        let scheme = if options.tls.is_some() { "https" } else { "http" };
        let authorization = options
            .user
            .map(|(u, p)| format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))));
        let mut last_err = String::new();
        for _ in 0..3 {
            let dir = tempfile::tempdir().unwrap();
            let port = super::closed_port();
            let config = dir.path().join("config.yml");
            let mut yaml = format!(
                "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\n\
                 storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
                 http:\n  addr: 127.0.0.1:{port}\n",
                dir.path().join("data").display()
            );
            if let Some(ca) = options.tls {
                yaml += &format!(
                    "  tls:\n    certificate: {}\n    key: {}\n",
                    ca.path("server.crt").display(),
                    ca.path("server.key").display()
                );
                if options.client_certs {
                    yaml += &format!("    clientcas:\n      - {}\n", ca.path("ca.crt").display());
                }
            }
            if let Some((user, password)) = options.user {
                let out = Command::new("htpasswd").args(["-Bbn", user, password]).output().expect(
                    "run htpasswd: install apache2-utils (scripts/deps.sh)",
                );
                assert!(out.status.success(), "htpasswd: {}", String::from_utf8_lossy(&out.stderr));
                let file = dir.path().join("htpasswd");
                fs::write(&file, &out.stdout).unwrap();
                yaml += &format!("auth:\n  htpasswd:\n    realm: vmrun-test\n    path: {}\n", file.display());
            }
            fs::write(&config, yaml).unwrap();
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
            let mut reg =
                Registry { child, port, _dir: dir, agent: agent.clone(), scheme, authorization: authorization.clone() };
            let deadline = Instant::now() + Duration::from_secs(15);
            while Instant::now() < deadline {
                if let Ok(Some(status)) = reg.child.try_wait() {
                    last_err = format!("docker-registry exited with {status}");
                    break;
                }
                if let Ok(r) = reg.agent.get(&reg.url("/v2/")).call() {
                    if r.status() == 200 || (r.status() == 401 && options.user.is_some()) {
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
        format!("{}://127.0.0.1:{}{path}", self.scheme, self.port)
    }

    /// A request with the registry's credentials, if it has some.
    fn request<B>(&self, req: ureq::RequestBuilder<B>) -> ureq::RequestBuilder<B> {
        match &self.authorization {
            Some(a) => req.header("Authorization", a),
            None => req,
        }
    }

    /// Uploads a blob (monolithic upload) unless the registry has it.
    pub fn push_blob(&self, repo: &str, digest: &str, bytes: &[u8]) {
        let head = self.request(self.agent.head(&self.url(&format!("/v2/{repo}/blobs/{digest}")))).call();
        if head.is_ok_and(|r| r.status() == 200) {
            return;
        }
        let r = self.request(self.agent.post(&self.url(&format!("/v2/{repo}/blobs/uploads/")))).send_empty().unwrap();
        assert_eq!(r.status(), 202, "starting an upload");
        let location = r.headers().get("location").unwrap().to_str().unwrap().to_owned();
        let location = if location.starts_with("http") { location } else { self.url(&location) };
        let sep = if location.contains('?') { '&' } else { '?' };
        let r = self
            .request(self.agent.put(&format!("{location}{sep}digest={digest}")))
            .header("Content-Type", "application/octet-stream")
            .send(bytes)
            .unwrap();
        assert_eq!(r.status(), 201, "uploading {digest}");
    }

    /// Uploads a manifest (or index) under `reference` (a tag or digest).
    pub fn push_manifest(&self, repo: &str, reference: &str, media_type: &str, bytes: &[u8]) {
        let r = self
            .request(self.agent.put(&self.url(&format!("/v2/{repo}/manifests/{reference}"))))
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
