//! TLS to registries as docker does it: the system's CA store
//! (`rustls-native-certs`: `SSL_CERT_FILE`, `SSL_CERT_DIR`, else the
//! distribution's bundle), plus what a registry's own directory in
//! `certs.d` holds (`/etc/docker/certs.d/HOST[:PORT]/`, or
//! `$VMRUN_CERTS_D/HOST[:PORT]/`):
//!
//! - `*.crt`: CA certificates the registry's certificate may chain to;
//! - `NAME.cert` with `NAME.key`: a client certificate (chain) and its
//!   private key (PKCS#8, PKCS#1 or SEC1 PEM), presented when the
//!   registry asks. A `.cert` without its `.key` (or the reverse) is an
//!   error, as in docker.
//!
//! When the system store is empty, Mozilla's roots (`webpki-roots`) stand
//! in for it unless the registry's directory has CAs of its own.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use ureq::tls::{Certificate, ClientCert, PemItem, PrivateKey, RootCerts, TlsConfig};

use crate::error::{Error, Result};

/// Where docker keeps registries' certificates.
pub const DEFAULT_CERTS_DIR: &str = "/etc/docker/certs.d";
/// The variable that replaces [`DEFAULT_CERTS_DIR`].
pub const CERTS_DIR_ENV: &str = "VMRUN_CERTS_D";

/// The largest certificate or key file read.
const MAX_PEM_FILE: u64 = 1 << 20;

/// A registry's directory under `certs_dir`, if there is one.
pub(crate) fn registry_dir(certs_dir: Option<&Path>, registry: &str) -> Option<PathBuf> {
    // A registry name has no '/' and no "..", but the directory must not be
    // left whatever it is given.
    if registry.is_empty() || registry.contains('/') || registry.starts_with('.') {
        return None;
    }
    let dir = certs_dir?.join(registry);
    dir.is_dir().then_some(dir)
}

/// The system's CA certificates, loaded once per process.
fn system_roots() -> &'static Arc<Vec<Certificate<'static>>> {
    static ROOTS: OnceLock<Arc<Vec<Certificate<'static>>>> = OnceLock::new();
    ROOTS.get_or_init(|| {
        let found = rustls_native_certs::load_native_certs();
        Arc::new(found.certs.iter().map(|der| Certificate::from_der(der.as_ref()).to_owned()).collect())
    })
}

/// The TLS configuration for a registry whose certs.d directory is `dir`
/// (or that has none).
pub(crate) fn config(dir: Option<&Path>) -> Result<TlsConfig> {
    let mut cas = Vec::new();
    let mut client = None;
    if let Some(dir) = dir {
        let bad = |path: &Path, reason: String| Error::Certs { path: path.to_owned(), reason };
        let mut names: Vec<PathBuf> = std::fs::read_dir(dir).map_err(Error::io(dir))?.filter_map(|e| e.ok().map(|e| e.path())).collect();
        names.sort();
        for path in &names {
            match path.extension().and_then(|e| e.to_str()) {
                Some("crt") => {
                    let found = certificates(path)?;
                    if found.is_empty() {
                        return Err(bad(path, "no certificate in it".into()));
                    }
                    cas.extend(found);
                }
                Some("cert") => {
                    let key = path.with_extension("key");
                    if !key.exists() {
                        return Err(bad(
                            path,
                            format!("client certificate without its key {} (CA certificates end in .crt)", key.display()),
                        ));
                    }
                    if client.is_none() {
                        let chain = certificates(path)?;
                        if chain.is_empty() {
                            return Err(bad(path, "no certificate in it".into()));
                        }
                        client = Some(ClientCert::new_with_certs(&chain, private_key(&key)?));
                    }
                }
                Some("key") if !path.with_extension("cert").exists() => {
                    return Err(bad(path, format!("key without its client certificate {}", path.with_extension("cert").display())));
                }
                _ => {}
            }
        }
    }
    let system = system_roots();
    let roots = match (cas.is_empty(), system.is_empty()) {
        (true, true) => RootCerts::WebPki,
        (true, false) => RootCerts::Specific(Arc::clone(system)),
        (false, _) => RootCerts::Specific(Arc::new(system.iter().cloned().chain(cas).collect())),
    };
    Ok(TlsConfig::builder().root_certs(roots).client_cert(client).build())
}

/// The PEM file at `path`, bounded.
fn read_pem(path: &Path) -> Result<Vec<u8>> {
    use std::io::Read;
    let mut bytes = Vec::new();
    std::fs::File::open(path).and_then(|f| f.take(MAX_PEM_FILE + 1).read_to_end(&mut bytes)).map_err(Error::io(path))?;
    if bytes.len() as u64 > MAX_PEM_FILE {
        return Err(Error::Certs { path: path.to_owned(), reason: "larger than 1 MiB".into() });
    }
    Ok(bytes)
}

/// The certificates in a PEM file.
fn certificates(path: &Path) -> Result<Vec<Certificate<'static>>> {
    let bytes = read_pem(path)?;
    let mut out = Vec::new();
    for item in ureq::tls::parse_pem(&bytes) {
        match item {
            Ok(PemItem::Certificate(c)) => out.push(c),
            Ok(_) => {}
            Err(e) => return Err(Error::Certs { path: path.to_owned(), reason: format!("not PEM: {e}") }),
        }
    }
    Ok(out)
}

/// The private key in a PEM file.
fn private_key(path: &Path) -> Result<PrivateKey<'static>> {
    let bytes = read_pem(path)?;
    for item in ureq::tls::parse_pem(&bytes) {
        match item {
            Ok(PemItem::PrivateKey(k)) => return Ok(k),
            Ok(_) => {}
            Err(e) => return Err(Error::Certs { path: path.to_owned(), reason: format!("not PEM: {e}") }),
        }
    }
    Err(Error::Certs { path: path.to_owned(), reason: "no private key in it".into() })
}
