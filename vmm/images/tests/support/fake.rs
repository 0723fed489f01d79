//! A fake registry: a few lines of HTTP/1.1 on a loopback port that answer
//! each path with what the test put there, truthful or not. One request per
//! connection (`Connection: close`); bodies that never end (or trickle)
//! are cut after 64 MiB or 30 s, or when the client hangs up. A route for
//! `/token` replaces the token service's answer.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vmrun_images::Digest;

/// What a route answers.
#[derive(Debug, Clone)]
pub enum Body {
    /// These bytes, with a correct Content-Length.
    Bytes(Vec<u8>),
    /// These bytes, with this Content-Length (a lie).
    WrongLength(Vec<u8>, u64),
    /// These bytes, chunked (no Content-Length).
    Chunked(Vec<u8>),
    /// Zeros, chunked, without end.
    Endless,
    /// Nothing at all: the response is never sent.
    Stall,
    /// These bytes, with a correct Content-Length, `step` bytes at a time
    /// with `pause` before each (a trickling registry).
    Trickle { bytes: Vec<u8>, step: usize, pause: Duration },
}

#[derive(Debug, Clone)]
pub struct Route {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Body,
}

impl Route {
    pub fn ok(body: Body) -> Self {
        Self { status: 200, headers: Vec::new(), body }
    }
    pub fn header(mut self, k: &str, v: &str) -> Self {
        self.headers.push((k.into(), v.into()));
        self
    }
}

#[derive(Debug, Default)]
struct State {
    routes: HashMap<String, Route>,
    token: Option<String>,
    requests: Vec<String>,
    bodies: Vec<String>,
}

#[derive(Debug)]
pub struct FakeRegistry {
    pub port: u16,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
}

/// A small, well-formed image for the fake registry to serve.
#[derive(Debug, Clone)]
pub struct FakeImage {
    pub layer: Vec<u8>,
    pub layer_digest: Digest,
    pub config: Vec<u8>,
    pub config_digest: Digest,
    pub manifest: Vec<u8>,
    pub manifest_digest: Digest,
}

impl FakeImage {
    pub fn new(layer_size: usize) -> Self {
        let layer: Vec<u8> = (0..layer_size).map(|i| (i * 7 % 251) as u8).collect();
        let layer_digest = Digest::of(&layer);
        Self::with_layer(layer, layer_digest, layer_size as u64)
    }

    /// An image whose manifest declares `declared_size` for `layer`.
    pub fn with_layer(layer: Vec<u8>, layer_digest: Digest, declared_size: u64) -> Self {
        let config = format!(
            r#"{{"architecture":"amd64","os":"linux","config":{{"Cmd":["sh"],"Env":["A=1"],"WorkingDir":"/w","User":"1000:1000"}},"rootfs":{{"type":"layers","diff_ids":["{layer_digest}"]}}}}"#
        )
        .into_bytes();
        let config_digest = Digest::of(&config);
        let manifest = Self::manifest_for(&config_digest, config.len() as u64, &layer_digest, declared_size);
        let manifest_digest = Digest::of(&manifest);
        Self { layer, layer_digest, config, config_digest, manifest, manifest_digest }
    }

    pub fn manifest_for(config: &Digest, config_size: u64, layer: &Digest, layer_size: u64) -> Vec<u8> {
        format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config}","size":{config_size}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{layer}","size":{layer_size}}}]}}"#
        )
        .into_bytes()
    }
}

impl FakeRegistry {
    pub fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        listener.set_nonblocking(true).unwrap();
        let state = Arc::new(Mutex::new(State::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (st, sp) = (state.clone(), stop.clone());
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(300);
            while !sp.load(Ordering::Relaxed) && Instant::now() < deadline {
                match listener.accept() {
                    Ok((conn, _)) => {
                        let st = st.clone();
                        let sp = sp.clone();
                        std::thread::spawn(move || serve(conn, &st, &sp));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Self { port, state, stop }
    }

    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn route(&self, path: &str, route: Route) {
        self.state.lock().unwrap().routes.insert(path.into(), route);
    }

    /// Serves `image` as `repo:tag` (and by digest), truthfully.
    pub fn serve_image(&self, repo: &str, tag: &str, image: &FakeImage) {
        let m = Route::ok(Body::Bytes(image.manifest.clone()))
            .header("Content-Type", "application/vnd.oci.image.manifest.v1+json")
            .header("Docker-Content-Digest", &image.manifest_digest.to_string());
        self.route(&format!("/v2/{repo}/manifests/{tag}"), m.clone());
        self.route(&format!("/v2/{repo}/manifests/{}", image.manifest_digest), m);
        self.route(&format!("/v2/{repo}/blobs/{}", image.config_digest), Route::ok(Body::Bytes(image.config.clone())));
        self.route(&format!("/v2/{repo}/blobs/{}", image.layer_digest), Route::ok(Body::Bytes(image.layer.clone())));
    }

    /// From now on, `/v2/...` needs `Authorization: Bearer TOKEN`, which
    /// `/token` hands out.
    pub fn require_token(&self, token: &str) {
        self.state.lock().unwrap().token = Some(token.into());
    }

    /// The request lines served so far (`GET /v2/... auth`).
    pub fn requests(&self) -> Vec<String> {
        self.state.lock().unwrap().requests.clone()
    }

    /// The request bodies received so far (those with a Content-Length).
    pub fn bodies(&self) -> Vec<String> {
        self.state.lock().unwrap().bodies.clone()
    }
}

impl Drop for FakeRegistry {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn serve(conn: TcpStream, state: &Mutex<State>, stop: &AtomicBool) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() {
        return;
    }
    let mut auth = None;
    let mut length = 0usize;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).is_err() || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            if k.eq_ignore_ascii_case("authorization") {
                auth = Some(v.trim().to_owned());
            }
            if k.eq_ignore_ascii_case("content-length") {
                length = v.trim().parse().unwrap_or(0).min(1 << 20);
            }
        }
    }
    if length > 0 {
        let mut body = vec![0; length];
        if std::io::Read::read_exact(&mut reader, &mut body).is_ok() {
            state.lock().unwrap().bodies.push(String::from_utf8_lossy(&body).into_owned());
        }
    }
    let path = line.split_whitespace().nth(1).unwrap_or("/").to_owned();
    let path_only = path.split('?').next().unwrap_or("").to_owned();
    let route = {
        let mut s = state.lock().unwrap();
        s.requests.push(format!("{} {}", line.trim(), if auth.is_some() { "auth" } else { "anon" }));
        let port = conn.local_addr().unwrap().port();
        let route = match &s.token {
            Some(t) if path_only == "/token" => s
                .routes
                .get("/token")
                .cloned()
                .unwrap_or_else(|| Route::ok(Body::Bytes(format!(r#"{{"token":"{t}"}}"#).into_bytes()))),
            Some(t) if auth.as_deref() != Some(&format!("Bearer {t}")) => Route {
                status: 401,
                headers: vec![(
                    "WWW-Authenticate".into(),
                    format!(
                        r#"Bearer realm="http://127.0.0.1:{port}/token",service="fake",scope="repository:img:pull""#
                    ),
                )],
                body: Body::Bytes(br#"{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}"#.to_vec()),
            },
            _ => s.routes.get(&path_only).cloned().unwrap_or(Route {
                status: 404,
                headers: vec![("Content-Type".into(), "application/json".into())],
                body: Body::Bytes(br#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown"}]}"#.to_vec()),
            }),
        };
        route
    };
    let mut w = conn;
    let mut head = format!("HTTP/1.1 {} X\r\nConnection: close\r\n", route.status);
    for (k, v) in &route.headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let _ = match route.body {
        Body::Bytes(b) => w
            .write_all(format!("{head}Content-Length: {}\r\n\r\n", b.len()).as_bytes())
            .and_then(|()| w.write_all(&b)),
        Body::WrongLength(b, n) => {
            w.write_all(format!("{head}Content-Length: {n}\r\n\r\n").as_bytes()).and_then(|()| w.write_all(&b))
        }
        Body::Chunked(b) => (|| {
            w.write_all(format!("{head}Transfer-Encoding: chunked\r\n\r\n").as_bytes())?;
            for c in b.chunks(4096) {
                w.write_all(format!("{:x}\r\n", c.len()).as_bytes())?;
                w.write_all(c)?;
                w.write_all(b"\r\n")?;
            }
            w.write_all(b"0\r\n\r\n")
        })(),
        Body::Endless => (|| {
            w.write_all(format!("{head}Transfer-Encoding: chunked\r\n\r\n").as_bytes())?;
            let chunk = vec![0u8; 65536];
            let mut sent = 0usize;
            while sent < 64 << 20 && Instant::now() < deadline && !stop.load(Ordering::Relaxed) {
                w.write_all(format!("{:x}\r\n", chunk.len()).as_bytes())?;
                w.write_all(&chunk)?;
                w.write_all(b"\r\n")?;
                sent += chunk.len();
            }
            Ok(())
        })(),
        Body::Trickle { bytes, step, pause } => (|| {
            w.write_all(format!("{head}Content-Length: {}\r\n\r\n", bytes.len()).as_bytes())?;
            for c in bytes.chunks(step.max(1)) {
                if Instant::now() >= deadline || stop.load(Ordering::Relaxed) {
                    break;
                }
                std::thread::sleep(pause);
                w.write_all(c)?;
            }
            Ok(())
        })(),
        Body::Stall => {
            while Instant::now() < deadline && !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(20));
            }
            Ok(())
        }
    };
}
