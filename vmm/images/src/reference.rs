//! Image references: `busybox`, `busybox:1.36`, `localhost:5000/busybox:latest`,
//! `busybox@sha256:...`, parsed and normalized the way Docker does it.

use std::fmt;
use std::str::FromStr;

use crate::digest::{Digest, DigestError};

/// The registry that names without a registry part refer to.
pub const DEFAULT_REGISTRY: &str = "docker.io";
/// The tag of a reference that names neither a tag nor a digest.
pub const DEFAULT_TAG: &str = "latest";

const MAX_NAME_LEN: usize = 255;
const MAX_TAG_LEN: usize = 128;

/// A parsed, normalized image reference.
///
/// `busybox` becomes `docker.io/library/busybox:latest`; a reference with a
/// digest keeps the tag it was written with (if any) for display, but the
/// digest is what gets pulled.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Reference {
    registry: String,
    repository: String,
    tag: Option<String>,
    digest: Option<Digest>,
}

/// Why a string is not an image reference.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid reference {input:?}: {reason}")]
pub struct ReferenceError {
    /// The string as given (cut to 300 characters).
    pub input: String,
    /// What is wrong with it.
    pub reason: ReferenceProblem,
}

/// What is wrong with a string that is not an image reference.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReferenceProblem {
    /// Nothing was given.
    #[error("empty reference (give a name such as busybox or busybox:1.36)")]
    Empty,
    /// A space or control character.
    #[error("contains {0:?} (a reference has no spaces or control characters)")]
    BadChar(char),
    /// The part after `@` is not a digest.
    #[error("{}", .0.reason)]
    Digest(#[source] DigestError),
    /// The part after the last `:` is not a tag.
    #[error(
        "bad tag {0:?} (up to {MAX_TAG_LEN} letters, digits, '_', '.' and '-', not starting with '.' or '-')"
    )]
    Tag(String),
    /// Nothing before the tag or digest.
    #[error("missing repository name")]
    MissingName,
    /// A name over the limit.
    #[error("repository name longer than {MAX_NAME_LEN} characters")]
    NameTooLong,
    /// The first component looks like a registry but is not a host name
    /// or address.
    #[error("bad registry {0:?} (a host name, IPv4 address or [IPv6] address, with an optional :port)")]
    Registry(String),
    /// The registry's port is not a number from 0 to 65535.
    #[error("bad port in registry {0:?} (a number up to 65535)")]
    Port(String),
    /// `a//b`, or a name ending in `/`.
    #[error("empty path component in repository name")]
    EmptyComponent,
    /// An uppercase letter in the repository.
    #[error("repository name must be lowercase")]
    Uppercase,
    /// A component that starts or ends with a separator, or has two in a row.
    #[error("bad repository name component {0:?} (lowercase letters and digits, separated by '.', '_', '__' or '-')")]
    Component(String),
    /// A character no repository name has.
    #[error("bad character {0:?} in repository name")]
    Char(char),
    /// 64 hex digits: an image ID, not a name.
    #[error("a 64-digit hex string is an image ID, not a repository name")]
    ImageId,
}

impl Reference {
    /// The registry's host (and port): `docker.io`, `localhost:5000`.
    pub fn registry(&self) -> &str {
        &self.registry
    }

    /// The repository inside the registry: `library/busybox`.
    pub fn repository(&self) -> &str {
        &self.repository
    }

    /// The tag, if the reference has one (one without a digest always does).
    pub fn tag(&self) -> Option<&str> {
        self.tag.as_deref()
    }

    /// The digest, if the reference pins one.
    pub fn digest(&self) -> Option<&Digest> {
        self.digest.as_ref()
    }

    /// `registry/repository`: `docker.io/library/busybox`.
    pub fn name(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }

    /// The name as `docker images` shows it: `busybox`,
    /// `localhost:5000/busybox`, `user/app`.
    pub fn familiar_name(&self) -> String {
        if self.registry == DEFAULT_REGISTRY {
            match self.repository.strip_prefix("library/") {
                Some(short) if !short.contains('/') => short.to_owned(),
                _ => self.repository.clone(),
            }
        } else {
            self.name()
        }
    }

    /// What the registry's manifest endpoint is asked for: the digest if
    /// there is one, else the tag.
    pub fn manifest_reference(&self) -> String {
        match (&self.digest, &self.tag) {
            (Some(d), _) => d.to_string(),
            (None, Some(t)) => t.clone(),
            (None, None) => DEFAULT_TAG.to_owned(),
        }
    }

    /// The same reference pinned to `digest`.
    pub fn with_digest(&self, digest: Digest) -> Self {
        Self { digest: Some(digest), ..self.clone() }
    }

    /// Whether the registry is on this machine (`localhost`, `127.0.0.0/8`,
    /// `[::1]`), where plain HTTP is used.
    pub fn is_loopback_registry(&self) -> bool {
        is_loopback(&self.registry)
    }
}

/// Whether a registry (`host[:port]`) is on this machine.
pub(crate) fn is_loopback(registry: &str) -> bool {
    let host = host_of(registry);
    host == "localhost" || host == "[::1]" || host.parse::<std::net::Ipv4Addr>().is_ok_and(|ip| ip.is_loopback())
}

/// A registry as a user names it to `login` or `logout` (`host[:port]`,
/// with or without `https://` and a path, as docker takes it) to the
/// `host[:port]` references use: Docker Hub's names (`index.docker.io`,
/// `registry-1.docker.io`, `https://index.docker.io/v1/`) are
/// [`DEFAULT_REGISTRY`].
pub fn parse_registry(input: &str) -> Result<String, ReferenceError> {
    let err = |reason| ReferenceError { input: input.chars().take(300).collect(), reason };
    let rest = input.strip_prefix("https://").or_else(|| input.strip_prefix("http://")).unwrap_or(input);
    let host = rest.split('/').next().unwrap_or(rest);
    if host.is_empty() {
        return Err(err(ReferenceProblem::Registry(input.chars().take(300).collect())));
    }
    check_registry(host).map_err(err)?;
    Ok(match host {
        "index.docker.io" | "registry-1.docker.io" => DEFAULT_REGISTRY.to_owned(),
        h => h.to_owned(),
    })
}

/// The host part of `host[:port]` (an IPv6 address keeps its brackets).
fn host_of(registry: &str) -> &str {
    if registry.starts_with('[') {
        match registry.find(']') {
            Some(end) => &registry[..=end],
            None => registry,
        }
    } else {
        registry.split(':').next().unwrap_or(registry)
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

impl FromStr for Reference {
    type Err = ReferenceError;

    fn from_str(input: &str) -> Result<Self, ReferenceError> {
        parse(input).map_err(|reason| ReferenceError { input: input.chars().take(300).collect(), reason })
    }
}

fn parse(input: &str) -> Result<Reference, ReferenceProblem> {
    if input.is_empty() {
        return Err(ReferenceProblem::Empty);
    }
    if let Some(c) = input.chars().find(|c| c.is_whitespace() || c.is_control()) {
        return Err(ReferenceProblem::BadChar(c));
    }
    let (rest, digest) = match input.split_once('@') {
        Some((rest, d)) => (rest, Some(d.parse::<Digest>().map_err(ReferenceProblem::Digest)?)),
        None => (input, None),
    };
    // A tag is after the last ':' that follows the last '/'.
    let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
    let (name, tag) = match rest[last_slash..].rfind(':') {
        Some(i) => (&rest[..last_slash + i], Some(&rest[last_slash + i + 1..])),
        None => (rest, None),
    };
    if let Some(t) = tag {
        check_tag(t)?;
    }
    if name.is_empty() {
        return Err(ReferenceProblem::MissingName);
    }
    if name.len() > MAX_NAME_LEN {
        return Err(ReferenceProblem::NameTooLong);
    }
    let (registry, path) = match name.split_once('/') {
        Some((first, path)) if first.contains(['.', ':']) || first == "localhost" || first.starts_with('[') => {
            check_registry(first)?;
            (first.to_owned(), path)
        }
        _ => (DEFAULT_REGISTRY.to_owned(), name),
    };
    let registry = if registry == "index.docker.io" { DEFAULT_REGISTRY.to_owned() } else { registry };
    for component in path.split('/') {
        check_component(component)?;
    }
    let repository = if registry == DEFAULT_REGISTRY && !path.contains('/') {
        format!("library/{path}")
    } else {
        path.to_owned()
    };
    if path.len() == 64 && path.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(ReferenceProblem::ImageId);
    }
    let tag = match (tag, &digest) {
        (Some(t), _) => Some(t.to_owned()),
        (None, Some(_)) => None,
        (None, None) => Some(DEFAULT_TAG.to_owned()),
    };
    Ok(Reference { registry, repository, tag, digest })
}

fn check_tag(tag: &str) -> Result<(), ReferenceProblem> {
    let ok = !tag.is_empty()
        && tag.len() <= MAX_TAG_LEN
        && tag.bytes().enumerate().all(|(i, b)| b.is_ascii_alphanumeric() || b == b'_' || (i > 0 && (b == b'.' || b == b'-')));
    if ok {
        Ok(())
    } else {
        Err(ReferenceProblem::Tag(tag.to_owned()))
    }
}

fn check_registry(registry: &str) -> Result<(), ReferenceProblem> {
    let bad = || Err(ReferenceProblem::Registry(registry.to_owned()));
    let (host, port) = if let Some(rest) = registry.strip_prefix('[') {
        let Some((addr, after)) = rest.split_once(']') else { return bad() };
        if addr.parse::<std::net::Ipv6Addr>().is_err() {
            return bad();
        }
        match after {
            "" => (None, None),
            p => match p.strip_prefix(':') {
                Some(p) => (None, Some(p)),
                None => return bad(),
            },
        }
    } else {
        match registry.split_once(':') {
            Some((h, p)) => (Some(h), Some(p)),
            None => (Some(registry), None),
        }
    };
    if let Some(host) = host {
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        };
        if !host.split('.').all(label_ok) {
            return bad();
        }
    }
    if let Some(port) = port {
        if port.is_empty() || port.len() > 5 || !port.bytes().all(|b| b.is_ascii_digit()) || port.parse::<u16>().is_err()
        {
            return Err(ReferenceProblem::Port(registry.to_owned()));
        }
    }
    Ok(())
}

/// A path component: lowercase letters and digits, separated by `.`, `_`,
/// `__` or runs of `-`.
fn check_component(c: &str) -> Result<(), ReferenceProblem> {
    if c.is_empty() {
        return Err(ReferenceProblem::EmptyComponent);
    }
    if c.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err(ReferenceProblem::Uppercase);
    }
    let b = c.as_bytes();
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    let mut i = 0;
    let mut expect_alnum = true;
    while i < b.len() {
        if alnum(b[i]) {
            expect_alnum = false;
            i += 1;
            continue;
        }
        if expect_alnum {
            return Err(ReferenceProblem::Component(c.to_owned()));
        }
        let sep_len = match b[i] {
            b'.' => 1,
            b'_' if b.get(i + 1) == Some(&b'_') => 2,
            b'_' => 1,
            b'-' => b[i..].iter().take_while(|&&x| x == b'-').count(),
            _ => return Err(ReferenceProblem::Char(char::from(b[i]))),
        };
        i += sep_len;
        expect_alnum = true;
    }
    if expect_alnum {
        return Err(ReferenceProblem::Component(c.to_owned()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Reference {
        s.parse().unwrap()
    }

    fn err(s: &str) -> String {
        s.parse::<Reference>().unwrap_err().to_string()
    }

    const D: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn normalizes_docker_hub_names() {
        assert_eq!(p("busybox").to_string(), "docker.io/library/busybox:latest");
        assert_eq!(p("busybox:1.36").to_string(), "docker.io/library/busybox:1.36");
        assert_eq!(p("user/app").to_string(), "docker.io/user/app:latest");
        assert_eq!(p("docker.io/busybox").to_string(), "docker.io/library/busybox:latest");
        assert_eq!(p("index.docker.io/library/busybox").to_string(), "docker.io/library/busybox:latest");
        assert_eq!(p("busybox").familiar_name(), "busybox");
        assert_eq!(p("user/app").familiar_name(), "user/app");
    }

    #[test]
    fn registries_with_ports_and_digests() {
        let r = p("localhost:5000/busybox:latest");
        assert_eq!((r.registry(), r.repository(), r.tag()), ("localhost:5000", "busybox", Some("latest")));
        assert!(r.is_loopback_registry());
        assert_eq!(r.familiar_name(), "localhost:5000/busybox");
        assert!(p("127.0.0.1:5000/a/b").is_loopback_registry());
        assert!(p("[::1]:5000/a").is_loopback_registry());
        assert!(!p("quay.io/a/b").is_loopback_registry());
        assert!(!p("localhostx.io/a").is_loopback_registry());
        let r = p(&format!("busybox@{D}"));
        assert_eq!((r.tag(), r.digest().map(|d| d.to_string())), (None, Some(D.to_owned())));
        assert_eq!(r.manifest_reference(), D);
        let r = p(&format!("localhost:5000/busybox:1.36@{D}"));
        assert_eq!(r.tag(), Some("1.36"));
        assert_eq!(r.manifest_reference(), D);
        assert_eq!(r.to_string(), format!("localhost:5000/busybox:1.36@{D}"));
        assert_eq!(p("a.b-c.io/x__y/z-w.v--u:T_1.0-x").repository(), "x__y/z-w.v--u");
    }

    #[test]
    fn registries_as_login_takes_them() {
        assert_eq!(parse_registry("localhost:5000").unwrap(), "localhost:5000");
        assert_eq!(parse_registry("https://reg.example:5000/v2/").unwrap(), "reg.example:5000");
        for hub in ["docker.io", "index.docker.io", "https://index.docker.io/v1/", "registry-1.docker.io"] {
            assert_eq!(parse_registry(hub).unwrap(), DEFAULT_REGISTRY, "{hub}");
        }
        for bad in ["", "https://", "a b", "reg.example:99999", "-x.io"] {
            assert!(parse_registry(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn rejects_bad_references() {
        assert!(err("").contains("empty reference"));
        assert!(err("Busybox").contains("must be lowercase"));
        assert!(err("busybox:").contains("bad tag"));
        assert!(err("busybox:-x").contains("bad tag"));
        assert!(err(&format!("busybox:{}", "a".repeat(129))).contains("bad tag"));
        assert!(err("busybox@sha256:abc").contains("64 hex digits"));
        assert!(err("busybox@md5:abc").contains("only sha256"));
        assert!(err("bus box").contains("contains ' '"));
        assert!(err("localhost:99999/a").contains("bad port"));
        assert!(err("a//b").contains("empty path component"));
        assert!(err("-a").contains("bad repository name component"));
        assert!(err("a-").contains("bad repository name component"));
        assert!(err("a..b").contains("bad repository name component"));
        assert!(err("a!b").contains("bad character"));
        assert!(err(":latest").contains("missing repository name"));
        assert!(err(&"a".repeat(256)).contains("longer than"));
        assert!(err(&"ab".repeat(32)).contains("image ID"));
        assert!(err("[::1/a").contains("bad registry"));
        let e = "busybox@md5:abc".parse::<Reference>().unwrap_err();
        assert!(matches!(&e.reason, ReferenceProblem::Digest(d) if d.reason.contains("only sha256")), "{e:?}");
        assert!(std::error::Error::source(&e.reason).is_some());
        assert_eq!("Busybox".parse::<Reference>().unwrap_err().reason, ReferenceProblem::Uppercase);
    }
}
