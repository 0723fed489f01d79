//! Registry credentials as docker keeps them, so that `docker login` and
//! `vmrun login` share them: `config.json` in `$DOCKER_CONFIG` (default
//! `~/.docker`).
//!
//! - `auths`: per registry, `auth` (base64 of `user:password`) and
//!   `identitytoken` (an OAuth2 refresh token).
//! - `credHelpers` (per registry) and `credsStore` (all others): the
//!   credentials live in a helper, `docker-credential-NAME` on `PATH`,
//!   spoken to as docker does (`get` and `erase` take the server URL on
//!   standard input, `store` a JSON object `{ServerURL, Username,
//!   Secret}`; `get` answers with that object, and a user name `<token>`
//!   means the secret is an identity token).
//!
//! Registries are keyed as docker keys them: `host[:port]`, and Docker
//! Hub's [`DOCKER_HUB_KEY`]; when reading, keys with a scheme or a path
//! (`https://host/v2/`) match their host, as in docker. The file is
//! rewritten atomically (a new file, mode 0600, renamed over it), keeping
//! whatever else it holds. Passwords are never part of an error.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use base64::Engine;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::pull::Credentials;
use crate::reference::DEFAULT_REGISTRY;

/// The key docker files Docker Hub's credentials under.
pub const DOCKER_HUB_KEY: &str = "https://index.docker.io/v1/";

/// A helper's answer is refused beyond this size.
const MAX_HELPER_OUTPUT: u64 = 1 << 20;
/// The config file is refused beyond this size.
const MAX_CONFIG_SIZE: u64 = 16 << 20;
/// What helpers say (on standard output) when they have nothing for a
/// server.
const HELPER_NOT_FOUND: &str = "credentials not found in native keychain";

/// What can go wrong with docker's config file or a credential helper.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// Neither `$DOCKER_CONFIG` nor `$HOME` is set.
    #[error("cannot tell where docker's config.json is: set DOCKER_CONFIG or HOME")]
    NoConfigDir,
    /// The file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What the system said.
        source: io::Error,
    },
    /// The file is not a docker config file.
    #[error("{}: not a docker config file: {reason}", path.display())]
    BadConfig {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// An `auths` entry cannot be decoded.
    #[error("{}: the credentials for {key} cannot be read: {reason}", path.display())]
    BadEntry {
        /// The file.
        path: PathBuf,
        /// The entry's key.
        key: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// `credsStore` or `credHelpers` names a helper that cannot be a
    /// program name.
    #[error("credential helper name {0:?} is not a name (letters, digits, '-', '_', '.')")]
    BadHelperName(String),
    /// A credential helper could not be run.
    #[error("cannot run credential helper docker-credential-{helper}: {source}")]
    HelperSpawn {
        /// The helper's name (`docker-credential-NAME`).
        helper: String,
        /// What the system said.
        source: io::Error,
    },
    /// A credential helper failed.
    #[error("credential helper docker-credential-{helper} {action} failed: {message}")]
    Helper {
        /// The helper's name.
        helper: String,
        /// `get`, `store` or `erase`.
        action: &'static str,
        /// What it said, on one line.
        message: String,
    },
}

type Result<T, E = AuthError> = std::result::Result<T, E>;

/// Where credentials were saved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Saved {
    /// In a credential helper (`docker-credential-NAME`).
    Helper(String),
    /// In the config file, base64-encoded (not encrypted).
    File(PathBuf),
}

/// Docker's `config.json`: what `login` writes and pulls read.
#[derive(Debug)]
pub struct DockerConfig {
    path: PathBuf,
    file: ConfigFile,
}

/// The parts of `config.json` this module reads and writes; the rest is
/// kept as it is.
#[derive(Debug, Default, Serialize, Deserialize)]
struct ConfigFile {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    auths: BTreeMap<String, AuthEntry>,
    #[serde(rename = "credsStore", default, skip_serializing_if = "Option::is_none")]
    creds_store: Option<String>,
    #[serde(rename = "credHelpers", default, skip_serializing_if = "BTreeMap::is_empty")]
    cred_helpers: BTreeMap<String, String>,
    #[serde(flatten)]
    other: Map<String, Value>,
}

#[derive(Default, Serialize, Deserialize)]
struct AuthEntry {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    auth: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    identitytoken: Option<String>,
    #[serde(flatten)]
    other: Map<String, Value>,
}

impl std::fmt::Debug for AuthEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthEntry").finish_non_exhaustive()
    }
}

/// What a helper's `get` answers and `store` takes.
#[derive(Serialize, Deserialize)]
struct HelperCredentials {
    #[serde(rename = "ServerURL", default)]
    server_url: String,
    #[serde(rename = "Username")]
    username: String,
    #[serde(rename = "Secret")]
    secret: String,
}

/// The user name with which helpers keep identity tokens.
const TOKEN_USERNAME: &str = "<token>";

/// The key docker files a registry's credentials under: `host[:port]`, or
/// [`DOCKER_HUB_KEY`] for Docker Hub. `registry` is a reference's
/// registry ([`crate::parse_registry`]).
pub fn server_key(registry: &str) -> String {
    if registry == DEFAULT_REGISTRY {
        DOCKER_HUB_KEY.to_owned()
    } else {
        registry.to_owned()
    }
}

/// The registry a config key names: its host, without scheme or path, with
/// Docker Hub's names as [`DEFAULT_REGISTRY`] (docker's
/// `ConvertToHostname`).
fn key_registry(key: &str) -> &str {
    let rest = key.strip_prefix("https://").or_else(|| key.strip_prefix("http://")).unwrap_or(key);
    match rest.split('/').next().unwrap_or(rest) {
        "index.docker.io" | "registry-1.docker.io" => DEFAULT_REGISTRY,
        host => host,
    }
}

impl DockerConfig {
    /// `$DOCKER_CONFIG/config.json`, else `$HOME/.docker/config.json`.
    pub fn default_path() -> Result<PathBuf> {
        let var = |name| std::env::var_os(name).filter(|v| !v.is_empty());
        if let Some(dir) = var("DOCKER_CONFIG") {
            return Ok(PathBuf::from(dir).join("config.json"));
        }
        var("HOME").map(|h| PathBuf::from(h).join(".docker/config.json")).ok_or(AuthError::NoConfigDir)
    }

    /// Reads the config at [`Self::default_path`].
    pub fn load_default() -> Result<Self> {
        Self::load(&Self::default_path()?)
    }

    /// Reads the config at `path`; a missing file is an empty config.
    pub fn load(path: &Path) -> Result<Self> {
        let io_err = |source| AuthError::Io { path: path.to_owned(), source };
        let bytes = match std::fs::File::open(path) {
            Ok(f) => {
                let mut bytes = Vec::new();
                f.take(MAX_CONFIG_SIZE + 1).read_to_end(&mut bytes).map_err(io_err)?;
                bytes
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(io_err(e)),
        };
        if bytes.len() as u64 > MAX_CONFIG_SIZE {
            return Err(AuthError::BadConfig { path: path.to_owned(), reason: "larger than 16 MiB".into() });
        }
        let file = if bytes.iter().all(u8::is_ascii_whitespace) {
            ConfigFile::default()
        } else {
            serde_json::from_slice(&bytes).map_err(|e| AuthError::BadConfig {
                path: path.to_owned(),
                reason: format!("{} at line {} column {}", json_problem(&e), e.line(), e.column()),
            })?
        };
        Ok(Self { path: path.to_owned(), file })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The credential helper for `registry`, if one keeps its credentials:
    /// its `credHelpers` entry, else `credsStore`.
    fn helper(&self, registry: &str) -> Result<Option<&str>> {
        let name = self
            .file
            .cred_helpers
            .iter()
            .find(|(k, _)| key_registry(k) == registry)
            .map(|(_, v)| v.as_str())
            .or(self.file.creds_store.as_deref())
            .filter(|n| !n.is_empty());
        match name {
            Some(n) if !n.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.')) => {
                Err(AuthError::BadHelperName(n.to_owned()))
            }
            n => Ok(n),
        }
    }

    /// The `auths` keys that name `registry`, the exact key first.
    fn auth_keys(&self, registry: &str) -> Vec<String> {
        let exact = server_key(registry);
        let mut keys: Vec<String> = self.file.auths.contains_key(&exact).then(|| exact.clone()).into_iter().collect();
        keys.extend(self.file.auths.keys().filter(|k| **k != exact && key_registry(k) == registry).cloned());
        keys
    }

    /// The credentials kept for `registry` (a reference's registry), if
    /// any.
    pub fn credentials(&self, registry: &str) -> Result<Option<Credentials>> {
        if let Some(helper) = self.helper(registry)? {
            return helper_get(helper, &server_key(registry));
        }
        let Some(key) = self.auth_keys(registry).into_iter().next() else { return Ok(None) };
        let entry = &self.file.auths[&key];
        let bad = |reason| AuthError::BadEntry { path: self.path.clone(), key: key.clone(), reason };
        let (username, password) = match entry.auth.as_deref().filter(|a| !a.is_empty()) {
            Some(auth) => {
                let bytes = base64::engine::general_purpose::STANDARD.decode(auth.trim()).map_err(|_| bad("auth is not base64"))?;
                let text = String::from_utf8(bytes).map_err(|_| bad("auth is not UTF-8"))?;
                let (u, p) = text.split_once(':').ok_or_else(|| bad("auth is not user:password"))?;
                (u.to_owned(), p.to_owned())
            }
            None => (String::new(), String::new()),
        };
        let identity_token = entry.identitytoken.clone().filter(|t| !t.is_empty());
        if username.is_empty() && password.is_empty() && identity_token.is_none() {
            return Ok(None);
        }
        Ok(Some(Credentials { username, password, identity_token }))
    }

    /// Saves `credentials` for `registry`: in its credential helper if it
    /// has one, else in the file. Returns where they went.
    pub fn store(&mut self, registry: &str, credentials: &Credentials) -> Result<Saved> {
        let key = server_key(registry);
        if let Some(helper) = self.helper(registry)? {
            let helper = helper.to_owned();
            let (username, secret) = match &credentials.identity_token {
                Some(t) => (TOKEN_USERNAME.to_owned(), t.clone()),
                None => (credentials.username.clone(), credentials.password.clone()),
            };
            let json = serde_json::to_vec(&HelperCredentials { server_url: key, username, secret }).map_err(|e| AuthError::Helper {
                helper: helper.clone(),
                action: "store",
                message: e.to_string(),
            })?;
            helper_run(&helper, "store", &json)?;
            return Ok(Saved::Helper(helper));
        }
        for k in self.auth_keys(registry) {
            self.file.auths.remove(&k);
        }
        let auth =
            base64::engine::general_purpose::STANDARD.encode(format!("{}:{}", credentials.username, credentials.password).as_bytes());
        let entry = AuthEntry { auth: Some(auth), identitytoken: credentials.identity_token.clone(), other: Map::new() };
        self.file.auths.insert(key, entry);
        self.write()?;
        Ok(Saved::File(self.path.clone()))
    }

    /// Forgets the credentials for `registry`: in its helper, and every
    /// `auths` entry for it. Returns whether there were any.
    pub fn erase(&mut self, registry: &str) -> Result<bool> {
        let mut erased = false;
        if let Some(helper) = self.helper(registry)? {
            let helper = helper.to_owned();
            match helper_run(&helper, "erase", server_key(registry).as_bytes()) {
                Ok(_) => erased = true,
                Err(AuthError::Helper { message, .. }) if message.contains(HELPER_NOT_FOUND) => {}
                Err(e) => return Err(e),
            }
        }
        let keys = self.auth_keys(registry);
        if !keys.is_empty() {
            for k in keys {
                self.file.auths.remove(&k);
            }
            self.write()?;
            erased = true;
        }
        Ok(erased)
    }

    /// Writes the file: a new file beside it (mode 0600), synced, renamed
    /// over it. A symbolic link is followed, as docker does, so that the
    /// file it points to is replaced.
    fn write(&self) -> Result<()> {
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
        let target = match std::fs::canonicalize(&self.path) {
            Ok(p) => p,
            Err(e) if e.kind() == io::ErrorKind::NotFound => self.path.clone(),
            Err(source) => return Err(AuthError::Io { path: self.path.clone(), source }),
        };
        let dir = target.parent().unwrap_or(Path::new("."));
        let io_err = |path: &Path| {
            let path = path.to_owned();
            move |source| AuthError::Io { path, source }
        };
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(io_err(dir))?;
        let mut json =
            serde_json::to_vec_pretty(&self.file).map_err(|e| AuthError::BadConfig { path: self.path.clone(), reason: e.to_string() })?;
        json.push(b'\n');
        let name = target.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "config.json".into());
        let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
        let result = (|| {
            let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
            f.write_all(&json)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &target)
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result.map_err(io_err(&target))
    }
}

/// `docker-credential-HELPER get` for `server`.
fn helper_get(helper: &str, server: &str) -> Result<Option<Credentials>> {
    let out = match helper_run(helper, "get", server.as_bytes()) {
        Ok(out) => out,
        Err(AuthError::Helper { message, .. }) if message.contains(HELPER_NOT_FOUND) => return Ok(None),
        Err(e) => return Err(e),
    };
    let c: HelperCredentials = serde_json::from_slice(&out).map_err(|e| AuthError::Helper {
        helper: helper.to_owned(),
        action: "get",
        message: format!("its answer is not the credentials' JSON ({})", json_problem(&e)),
    })?;
    if c.username.is_empty() && c.secret.is_empty() {
        return Ok(None);
    }
    Ok(Some(if c.username == TOKEN_USERNAME {
        Credentials { username: String::new(), password: String::new(), identity_token: Some(c.secret) }
    } else {
        Credentials { username: c.username, password: c.secret, identity_token: None }
    }))
}

/// What kind of JSON error `e` is, without its text (which can quote the
/// input, and so a secret).
fn json_problem(e: &serde_json::Error) -> &'static str {
    match e.classify() {
        serde_json::error::Category::Io => "cannot be read",
        serde_json::error::Category::Syntax => "bad JSON",
        serde_json::error::Category::Data => "missing or wrong fields",
        serde_json::error::Category::Eof => "ends early",
    }
}

/// Runs `docker-credential-HELPER ACTION` with `input` on its standard
/// input; returns its standard output. A failure's message is what it
/// printed (helpers print their errors on standard output), on one line.
fn helper_run(helper: &str, action: &'static str, input: &[u8]) -> Result<Vec<u8>> {
    let program = format!("docker-credential-{helper}");
    let spawn_err = |source| AuthError::HelperSpawn { helper: helper.to_owned(), source };
    let mut child = Command::new(&program)
        .arg(action)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(spawn_err)?;
    // The helper may exit without reading everything: a broken pipe is
    // its answer to judge, not ours.
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(input);
    }
    let stderr = child.stderr.take();
    let err_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(s) = stderr {
            let _ = s.take(MAX_HELPER_OUTPUT).read_to_end(&mut buf);
        }
        buf
    });
    let mut out = Vec::new();
    if let Some(s) = child.stdout.take() {
        s.take(MAX_HELPER_OUTPUT).read_to_end(&mut out).map_err(spawn_err)?;
    }
    let status = child.wait().map_err(spawn_err)?;
    let err = err_reader.join().unwrap_or_default();
    if status.success() {
        return Ok(out);
    }
    // Helpers print the error on standard output; only a failure's output
    // is shown, and a store's input (the secret) is never part of it.
    let said = if out.iter().any(|b| !b.is_ascii_whitespace()) { out } else { err };
    let text: String = String::from_utf8_lossy(&said).trim().chars().take(300).collect();
    let text = text.replace(|c: char| c.is_control(), " ");
    let message = if text.is_empty() { status.to_string() } else { text };
    Err(AuthError::Helper { helper: helper.to_owned(), action, message })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_as_docker_has_them() {
        assert_eq!(server_key("docker.io"), DOCKER_HUB_KEY);
        assert_eq!(server_key("127.0.0.1:5000"), "127.0.0.1:5000");
        assert_eq!(key_registry(DOCKER_HUB_KEY), "docker.io");
        assert_eq!(key_registry("https://registry.example.com:5000/v2/"), "registry.example.com:5000");
        assert_eq!(key_registry("http://localhost:5000"), "localhost:5000");
        assert_eq!(key_registry("quay.io"), "quay.io");
    }

    fn config(dir: &Path, json: &str) -> DockerConfig {
        let path = dir.join("config.json");
        std::fs::write(&path, json).unwrap();
        DockerConfig::load(&path).unwrap()
    }

    #[test]
    fn reads_auths_by_any_key_form() {
        let dir = tempfile::tempdir().unwrap();
        let c = config(
            dir.path(),
            r#"{"auths":{"https://index.docker.io/v1/":{"auth":"dXNlcjpwYTpzcw=="},
                "https://reg.example:5000/v2/":{"auth":"YTpi","identitytoken":"tok"},
                "empty.example":{}}}"#,
        );
        let hub = c.credentials("docker.io").unwrap().unwrap();
        assert_eq!((hub.username.as_str(), hub.password.as_str(), hub.identity_token), ("user", "pa:ss", None));
        let other = c.credentials("reg.example:5000").unwrap().unwrap();
        assert_eq!((other.username.as_str(), other.identity_token.as_deref()), ("a", Some("tok")));
        assert!(c.credentials("empty.example").unwrap().is_none());
        assert!(c.credentials("reg.example").unwrap().is_none());

        let bad = config(dir.path(), r#"{"auths":{"x.example":{"auth":"!!"}}}"#);
        let err = bad.credentials("x.example").unwrap_err().to_string();
        assert!(err.contains("credentials for x.example cannot be read: auth is not base64"), "{err}");
    }

    #[test]
    fn store_and_erase_keep_the_rest_of_the_file() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let mut c = config(dir.path(), r#"{"auths":{"http://a.example/v2/":{"auth":"YTpi"}},"proxies":{"default":{"httpProxy":"x"}}}"#);
        let creds = Credentials { username: "u".into(), password: "p w".into(), identity_token: None };
        assert_eq!(c.store("a.example", &creds).unwrap(), Saved::File(c.path().to_owned()));
        let mode = std::fs::metadata(c.path()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let v: Value = serde_json::from_slice(&std::fs::read(c.path()).unwrap()).unwrap();
        assert_eq!(v["auths"]["a.example"]["auth"], "dTpwIHc=");
        assert!(v["auths"].get("http://a.example/v2/").is_none(), "{v}");
        assert_eq!(v["proxies"]["default"]["httpProxy"], "x");
        let again = DockerConfig::load(c.path()).unwrap();
        assert_eq!(again.credentials("a.example").unwrap(), Some(creds));

        assert!(c.erase("a.example").unwrap());
        assert!(!c.erase("a.example").unwrap());
        let v: Value = serde_json::from_slice(&std::fs::read(c.path()).unwrap()).unwrap();
        assert!(v.get("auths").is_none(), "{v}");
        assert_eq!(v["proxies"]["default"]["httpProxy"], "x");
    }

    #[test]
    fn missing_file_is_empty_and_bad_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let c = DockerConfig::load(&dir.path().join("none.json")).unwrap();
        assert!(c.credentials("docker.io").unwrap().is_none());
        let path = dir.path().join("bad.json");
        std::fs::write(&path, "{").unwrap();
        assert!(DockerConfig::load(&path).unwrap_err().to_string().contains("not a docker config file"));
        let c = config(dir.path(), r#"{"credsStore":"../evil"}"#);
        assert!(matches!(c.credentials("docker.io"), Err(AuthError::BadHelperName(_))));
    }
}
