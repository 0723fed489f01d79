//! A small client for the OCI distribution API: GET manifests and blobs,
//! with anonymous or basic-credential bearer tokens (or an identity
//! token's OAuth2 refresh), over TLS as [`super::tls`] sets it up.

use std::io::Read;
use std::time::Duration;

use base64::Engine;
use ureq::http::{Response, StatusCode};
use ureq::Body;

use super::pace::{Pace, Paced};
use super::{tls, PullOptions};
use crate::error::{Error, Result};

/// A token response is refused beyond this size.
const MAX_TOKEN_RESPONSE: u64 = 1 << 20;
/// How much of an error body is read for its message.
const MAX_ERROR_BODY: u64 = 64 << 10;

/// A user name and password (or token) for a registry.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The user name.
    pub username: String,
    /// The password or access token.
    pub password: String,
    /// An OAuth2 refresh token (docker's `identitytoken`): a token service
    /// is asked for access with it instead of the user name and password.
    pub identity_token: Option<String>,
}

impl Credentials {
    /// A user name and password.
    pub fn new(username: impl Into<String>, password: impl Into<String>) -> Self {
        Self { username: username.into(), password: password.into(), identity_token: None }
    }
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials").field("username", &self.username).finish_non_exhaustive()
    }
}

/// One repository on one registry (or, with an empty repository, the
/// registry itself, for a login).
pub(crate) struct Client {
    agent: ureq::Agent,
    base: String,
    pub(crate) registry: String,
    repository: String,
    credentials: Option<Credentials>,
    authorization: Option<String>,
    pub(crate) pace: Pace,
    /// The longest a read may wait.
    per_read: Duration,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("base", &self.base).field("repository", &self.repository).finish()
    }
}

impl Client {
    /// A client for `repository` on `registry`: over plain HTTP when the
    /// registry is named insecure, or is on loopback without a certs.d
    /// directory; else over TLS with the system's CAs and its certs.d
    /// directory's.
    pub(crate) fn new(registry: &str, repository: &str, options: &PullOptions, pace: Pace) -> Result<Self> {
        let host = match registry {
            crate::reference::DEFAULT_REGISTRY => "registry-1.docker.io",
            other => other,
        };
        let certs = tls::registry_dir(options.certs_dir.as_deref(), registry);
        let plain_http = options.insecure_registries.iter().any(|r| r == registry)
            || (crate::reference::is_loopback(registry) && certs.is_none());
        let scheme = if plain_http { "http" } else { "https" };
        let timeout = options.timeout;
        // A read waits at most one rate window, so that a stalled body is
        // checked against the minimum rate when its window ends.
        let per_read = if pace.min_rate.bytes_per_sec > 0 { timeout.min(pace.min_rate.window) } else { timeout };
        let mut config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(5)
            .timeout_connect(Some(Duration::from_secs(15).min(timeout)))
            .timeout_recv_response(Some(timeout))
            .timeout_per_read(Some(per_read))
            .user_agent(concat!("vmrun/", env!("CARGO_PKG_VERSION")));
        if crate::reference::is_loopback(registry) {
            config = config.proxy(None);
        }
        if !plain_http {
            config = config.tls_config(tls::config(certs.as_deref())?);
        }
        Ok(Self {
            agent: ureq::Agent::new_with_config(config.build()),
            base: format!("{scheme}://{host}"),
            registry: registry.to_owned(),
            repository: repository.to_owned(),
            credentials: options.credentials.clone(),
            authorization: None,
            pace,
            per_read,
        })
    }

    /// The body of `resp`, read under the pull's minimum rate and deadline.
    pub(crate) fn body<'r>(&self, resp: &'r mut Response<Body>) -> Paced<ureq::BodyReader<'r>> {
        self.pace.reader(resp.body_mut().as_reader())
    }

    /// The error for a read of `what` that failed with `e`, if the pace
    /// gave up on it.
    pub(crate) fn slow(&self, what: &str, e: &std::io::Error) -> Option<Error> {
        self.pace.error(&self.registry, what, e)
    }

    /// The registry's error message from a JSON error body, as `: CODE:
    /// message` (or nothing).
    pub(crate) fn error_detail(&self, resp: &mut Response<Body>) -> String {
        let mut bytes = Vec::new();
        if self.body(resp).take(MAX_ERROR_BODY).read_to_end(&mut bytes).is_err() {
            return String::new();
        }
        error_detail_of(&bytes)
    }

    /// GET `/v2/<repository>/<path>`, authenticating once if asked to.
    /// Returns the response whatever its status, except 401 after
    /// authenticating, which is [`Error::Denied`].
    pub(crate) fn get(&mut self, path: &str, accept: Option<&str>) -> Result<Response<Body>> {
        let url = format!("{}/v2/{}/{}", self.base, self.repository, path);
        self.get_url(&url, accept, path)
    }

    /// GET `/v2/` with the credentials, answering the registry's challenge:
    /// whether they work. A registry that asks for nothing takes them too.
    pub(crate) fn login(&mut self) -> Result<()> {
        let url = format!("{}/v2/", self.base);
        let mut resp = self.get_url(&url, None, "/v2/")?;
        if !resp.status().is_success() {
            let detail = self.error_detail(&mut resp);
            return Err(Error::Registry {
                registry: self.registry.clone(),
                reason: format!("GET /v2/: HTTP {}{detail}", resp.status().as_u16()),
            });
        }
        Ok(())
    }

    fn get_url(&mut self, url: &str, accept: Option<&str>, path: &str) -> Result<Response<Body>> {
        let resp = self.send(url, accept, path)?;
        if resp.status() != StatusCode::UNAUTHORIZED || self.authorization.is_some() {
            return self.check_denied(resp);
        }
        let challenge = resp
            .headers()
            .get("www-authenticate")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
            .ok_or_else(|| self.denied("HTTP 401 without a WWW-Authenticate challenge".into()))?;
        self.authenticate(&challenge)?;
        let resp = self.send(url, accept, path)?;
        self.check_denied(resp)
    }

    fn check_denied(&self, mut resp: Response<Body>) -> Result<Response<Body>> {
        if resp.status() == StatusCode::UNAUTHORIZED || resp.status() == StatusCode::FORBIDDEN {
            let detail = self.error_detail(&mut resp);
            let reason = format!("HTTP {}{detail}", resp.status().as_u16());
            return Err(self.denied(if self.credentials.is_none() {
                format!("{reason} (no credentials were given)")
            } else {
                reason
            }));
        }
        Ok(resp)
    }

    fn denied(&self, reason: String) -> Error {
        if self.repository.is_empty() {
            return Error::LoginDenied { registry: self.registry.clone(), reason };
        }
        Error::Denied { registry: self.registry.clone(), repository: self.repository.clone(), reason }
    }

    /// GET `url` (for `what`), within what is left of the deadline.
    fn send(&self, url: &str, accept: Option<&str>, what: &str) -> Result<Response<Body>> {
        let mut req = self.agent.get(url);
        if let Some(a) = accept {
            req = req.header("Accept", a);
        }
        if let Some(auth) = &self.authorization {
            req = req.header("Authorization", auth);
        }
        self.call(req, what)
    }

    /// Sends `req`, bounded by what is left of the pull's deadline.
    fn call(&self, req: ureq::RequestBuilder<ureq::typestate::WithoutBody>, what: &str) -> Result<Response<Body>> {
        self.bounded(req, what)?.call().map_err(|e| self.transport_error(e, what))
    }

    /// `req`, bounded by what is left of the pull's deadline.
    fn bounded<B>(&self, req: ureq::RequestBuilder<B>, what: &str) -> Result<ureq::RequestBuilder<B>> {
        Ok(match self.pace.remaining() {
            Some(left) if left.is_zero() => return Err(self.pace.deadline_error(&self.registry, what)),
            Some(left) => req.config().timeout_global(Some(left)).build(),
            None => req,
        })
    }

    fn transport_error(&self, e: ureq::Error, what: &str) -> Error {
        use ureq::Error as E;
        if matches!(e, E::Timeout(_)) && self.pace.expired() {
            return self.pace.deadline_error(&self.registry, what);
        }
        // Nothing at all for a whole rate window (the per-read time-out is
        // the window then): too slow, like a trickle.
        let window = self.pace.min_rate.window;
        if matches!(e, E::Timeout(ureq::Timeout::PerRead)) && self.pace.min_rate.bytes_per_sec > 0 && self.per_read >= window
        {
            return self.pace.too_slow(&self.registry, what, 0, self.per_read);
        }
        let reason = e.to_string();
        match e {
            E::Io(_)
            | E::Timeout(_)
            | E::HostNotFound
            | E::ConnectionFailed
            | E::Tls(_)
            | E::Rustls(_)
            | E::Protocol(_)
            | E::ConnectProxyFailed(_) => Error::Unreachable { registry: self.registry.clone(), reason },
            _ => Error::Registry { registry: self.registry.clone(), reason },
        }
    }

    /// Answers a `WWW-Authenticate` challenge: `Basic` with the credentials,
    /// or `Bearer` by fetching a token from the realm.
    fn authenticate(&mut self, challenge: &str) -> Result<()> {
        let (scheme, params) = parse_challenge(challenge);
        if scheme.eq_ignore_ascii_case("basic") {
            let c = self.credentials.as_ref().ok_or_else(|| self.denied("the registry asks for a user name and password".into()))?;
            self.authorization = Some(basic(c));
            return Ok(());
        }
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(self.denied(format!("unsupported authentication scheme {scheme:?}")));
        }
        let param = |k: &str| params.iter().find(|(n, _)| n.eq_ignore_ascii_case(k)).map(|(_, v)| v.as_str());
        let realm = param("realm").ok_or_else(|| self.denied("bearer challenge without a realm".into()))?;
        if !(realm.starts_with("https://") || realm.starts_with("http://")) {
            return Err(self.denied(format!("token realm {realm:?} is not an http(s) URL")));
        }
        // A login asks for no scope: any token shows the credentials work.
        let scope = param("scope")
            .map(str::to_owned)
            .or_else(|| (!self.repository.is_empty()).then(|| format!("repository:{}:pull", self.repository)));
        let identity_token = self.credentials.as_ref().and_then(|c| c.identity_token.clone());
        let mut resp = if let Some(refresh) = identity_token {
            // OAuth2's refresh grant, as docker does with an identity token.
            let mut form = vec![("grant_type", "refresh_token".to_owned()), ("client_id", "vmrun".to_owned())];
            form.extend(param("service").map(|s| ("service", s.to_owned())));
            form.extend(scope.map(|s| ("scope", s)));
            form.push(("refresh_token", refresh));
            let req = self.bounded(self.agent.post(realm), "the token")?;
            req.send_form(form.iter().map(|(k, v)| (*k, v.as_str()))).map_err(|e| self.transport_error(e, "the token"))?
        } else {
            let mut url = realm.to_owned();
            let mut sep = if url.contains('?') { '&' } else { '?' };
            if let Some(service) = param("service") {
                url.push_str(&format!("{sep}service={}", urlencode(service)));
                sep = '&';
            }
            if let Some(scope) = &scope {
                url.push_str(&format!("{sep}scope={}", urlencode(scope)));
            }
            let mut req = self.agent.get(&url);
            if let Some(c) = &self.credentials {
                req = req.header("Authorization", basic(c));
            }
            self.call(req, "the token")?
        };
        if !resp.status().is_success() {
            let detail = self.error_detail(&mut resp);
            return Err(self.denied(format!("token service answered HTTP {}{detail}", resp.status().as_u16())));
        }
        let mut bytes = Vec::new();
        self.body(&mut resp)
            .take(MAX_TOKEN_RESPONSE + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| self.slow("the token", &e).unwrap_or_else(|| self.denied(format!("reading the token: {e}"))))?;
        if bytes.len() as u64 > MAX_TOKEN_RESPONSE {
            return Err(self.denied("token response larger than 1 MiB".into()));
        }
        #[derive(serde::Deserialize)]
        struct Token {
            token: Option<String>,
            access_token: Option<String>,
        }
        let t: Token =
            serde_json::from_slice(&bytes).map_err(|e| self.denied(format!("token response is not JSON: {e}")))?;
        let token = t
            .token
            .or(t.access_token)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| self.denied("token response without a token".into()))?;
        if !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(self.denied("token has characters a header cannot carry".into()));
        }
        self.authorization = Some(format!("Bearer {token}"));
        Ok(())
    }
}

/// The registry's error message in a JSON error body, as `: CODE: message`
/// (or nothing).
fn error_detail_of(bytes: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct Errors {
        errors: Vec<OneError>,
    }
    #[derive(serde::Deserialize)]
    struct OneError {
        #[serde(default)]
        code: String,
        #[serde(default)]
        message: String,
    }
    match serde_json::from_slice::<Errors>(bytes) {
        Ok(e) => match e.errors.first() {
            Some(first) => {
                let text: String = format!("{}: {}", first.code, first.message).chars().take(200).collect();
                format!(" ({})", text.replace(|c: char| c.is_control(), " "))
            }
            None => String::new(),
        },
        Err(_) => String::new(),
    }
}

/// `scheme k1="v1",k2=v2` → (`scheme`, [(k1, v1), (k2, v2)]).
pub(crate) fn parse_challenge(s: &str) -> (String, Vec<(String, String)>) {
    let s = s.trim();
    let (scheme, rest) = s.split_once(' ').unwrap_or((s, ""));
    let mut params = Vec::new();
    let mut chars = rest.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        if key.is_empty() {
            break;
        }
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => value.extend(chars.next()),
                    '"' => break,
                    c => value.push(c),
                }
            }
        } else {
            while let Some(c) = chars.peek().copied().filter(|c| *c != ',') {
                value.push(c);
                chars.next();
            }
        }
        params.push((key.trim().to_owned(), value));
    }
    (scheme.to_owned(), params)
}

/// A query parameter's value, percent-encoded but for RFC 3986's
/// unreserved characters.
fn urlencode(s: &str) -> String {
    const QUERY_VALUE: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC.remove(b'-').remove(b'_').remove(b'.').remove(b'~');
    percent_encoding::utf8_percent_encode(s, QUERY_VALUE).to_string()
}

fn basic(c: &Credentials) -> String {
    format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{}:{}", c.username, c.password)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_challenges() {
        let (s, p) = parse_challenge(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/busybox:pull""#,
        );
        assert_eq!(s, "Bearer");
        assert_eq!(p[0], ("realm".into(), "https://auth.docker.io/token".into()));
        assert_eq!(p[2], ("scope".into(), "repository:library/busybox:pull".into()));
        let (s, p) = parse_challenge(r#"Basic realm=x, charset="UTF-8""#);
        assert_eq!((s.as_str(), p.len()), ("Basic", 2));
        assert_eq!(p[0].1, "x");
    }

    #[test]
    fn encodes() {
        assert_eq!(basic(&Credentials::new("user", "pass")), "Basic dXNlcjpwYXNz");
        assert_eq!(urlencode("repository:a/b:pull"), "repository%3Aa%2Fb%3Apull");
        assert_eq!(urlencode("a-b_c.d~e é"), "a-b_c.d~e%20%C3%A9");
    }
}
