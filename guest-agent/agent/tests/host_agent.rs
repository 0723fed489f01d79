//! The agent as a host process behind a Unix socket, driven through the
//! client library: the protocol, running processes, signals, exec, exit
//! codes, terminals, flow control, removal and shutdown.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use common::*;
use vmrun_agent_client::{Client, CreateContainer, Error, ErrorKind, ExecProcess, ImageConfig, LayerSource, StdioMode};
use vmrun_agent_protocol::frame::{self, Kind};
use vmrun_agent_protocol::{Capabilities, Hello, UnpackLimits};

const LIMIT: usize = 16 << 20;

fn create(client: &Client, agent: &Agent, id: &str, config: ImageConfig) {
    let (disk, layers) = test_image(agent.dir.path());
    let spec = CreateContainer {
        id: id.into(),
        layers: LayerSource { disk: disk.display().to_string(), layers },
        rootfs: Default::default(),
        config,
        limits: UnpackLimits::default(),
    };
    client.create_container(&spec).unwrap();
}

fn cmd(args: &[&str]) -> ImageConfig {
    ImageConfig { cmd: args.iter().map(|s| s.to_string()).collect(), ..Default::default() }
}

fn exec_args(args: &[&str]) -> ExecProcess {
    ExecProcess { args: args.iter().map(|s| s.to_string()).collect(), ..Default::default() }
}

#[test]
fn ping_and_a_process_with_stdio_and_exit_code() {
    if !require_root() {
        return;
    }
    let agent = Agent::start();
    let c = agent.client();
    assert!(c.ping().unwrap().starts_with("vmrun-agent "));
    create(&c, &agent, "c1", cmd(&["sh", "-c", "echo out; echo err >&2; read line; echo \"got $line\"; cat /marker; exit 3"]));
    let mut p = c.start("c1", StdioMode::Piped { stdin: true }).unwrap();
    assert!(p.pid > 0);
    let mut stdin = p.stdin.take().unwrap();
    stdin.write_all(b"hello\n").unwrap();
    stdin.close().unwrap();
    let out = p.output(LIMIT).unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "out\ngot hello\nfrom the image\n");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "err\n");
    assert_eq!(out.exit_code, 3);
    // Waiting again after the end answers at once.
    assert_eq!(c.wait("c1", None, Some(Duration::from_secs(5))).unwrap(), 3);
    c.remove_container("c1", false).unwrap();
}

#[test]
fn environment_user_directory_hostname_and_namespaces() {
    if !require_root() {
        return;
    }
    let agent = Agent::start();
    let c = agent.client();
    let script = "echo \"foo=$FOO home=$HOME host=$HOSTNAME\"; pwd; id -u; id -g; id -G; hostname; echo pid=$$; \
                  test -c /dev/null && test -c /dev/urandom && test -d /dev/pts && test -r /proc/self/status && echo devices-ok; \
                  echo > /dev/null && echo null-ok; umask";
    let config = ImageConfig {
        cmd: vec!["sh".into(), "-c".into(), script.into()],
        env: vec!["FOO=bar".into()],
        working_dir: "/work/dir".into(),
        user: "alice".into(),
        hostname: "box".into(),
        ..Default::default()
    };
    create(&c, &agent, "c2", config);
    let out = c.start("c2", StdioMode::Piped { stdin: false }).unwrap().output(LIMIT).unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.exit_code, 0, "{text} {}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines,
        ["foo=bar home=/home/alice host=box", "/work/dir", "1000", "1000", "1000 10", "box", "pid=1", "devices-ok", "null-ok", "0022"],
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn signals_give_128_plus_the_signal() {
    if !require_root() {
        return;
    }
    let agent = Agent::start();
    let c = agent.client();
    create(&c, &agent, "sig", cmd(&["sleep", "1000"]));
    let p = c.start("sig", StdioMode::Null).unwrap();
    // An exec'd process is not its namespace's init: SIGTERM kills it.
    let e = c.exec("sig", "e1", &exec_args(&["sleep", "1000"]), StdioMode::Null).unwrap();
    e.signal(15).unwrap();
    assert_eq!(e.wait().unwrap(), 128 + 15);
    p.signal(9).unwrap();
    assert_eq!(p.wait().unwrap(), 128 + 9);
    // Exec into a stopped container is refused.
    let err = c.exec("sig", "e2", &exec_args(&["true"]), StdioMode::Null).unwrap_err();
    assert!(matches!(err, Error::Agent(ref a) if a.kind == ErrorKind::InvalidState), "{err}");
}

#[test]
fn exec_runs_inside_the_container() {
    if !require_root() {
        return;
    }
    let agent = Agent::start();
    let c = agent.client();
    let config = ImageConfig { cmd: vec!["sleep".into(), "1000".into()], hostname: "inside".into(), env: vec!["A=1".into()], ..Default::default() };
    create(&c, &agent, "ex", config);
    let init = c.start("ex", StdioMode::Null).unwrap();
    let spec = ExecProcess {
        args: vec!["sh".into(), "-c".into(), "hostname; cat /marker; echo A=$A B=$B; pwd; ls /srv; exit 5".into()],
        env: vec!["B=2".into()],
        working_dir: Some("/srv".into()),
        ..Default::default()
    };
    let out = c.exec("ex", "e1", &spec, StdioMode::Piped { stdin: false }).unwrap().output(LIMIT).unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "inside\nfrom the image\nA=1 B=2\n/srv\nzstd-layer\n");
    assert_eq!(out.exit_code, 5);
    // It sees the container's processes (its PID namespace) and is not
    // PID 1 there.
    let out = c.exec("ex", "e2", &exec_args(&["sh", "-c", "echo $$; cat /proc/1/cmdline | tr '\\0' ' '"]), StdioMode::Piped { stdin: false }).unwrap().output(LIMIT).unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let mut lines = text.lines();
    let pid: u32 = lines.next().unwrap().parse().unwrap();
    assert!(pid > 1 && pid < 100, "{text}");
    assert_eq!(lines.next(), Some("sleep 1000 "));
    // Duplicate exec ids are refused.
    let err = c.exec("ex", "e1", &exec_args(&["true"]), StdioMode::Null).unwrap_err();
    assert!(matches!(err, Error::Agent(ref a) if a.kind == ErrorKind::AlreadyExists), "{err}");
    init.signal(9).unwrap();
    assert_eq!(init.wait().unwrap(), 137);
}

fn names(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// The capability masks and `NoNewPrivs` a process printed from
/// `/proc/self/status`: `CapInh CapPrm CapEff CapBnd CapAmb NoNewPrivs`.
fn privileges(out: &vmrun_agent_client::Output) -> String {
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.exit_code, 0, "{text} {}", String::from_utf8_lossy(&out.stderr));
    let field = |name: &str| {
        text.lines().find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_string())).unwrap_or_else(|| panic!("no {name} in {text}"))
    };
    ["CapInh:", "CapPrm:", "CapEff:", "CapBnd:", "CapAmb:", "NoNewPrivs:"].map(field).join(" ")
}

#[test]
fn capabilities_no_new_privs_and_mqueue() {
    if !require_root() {
        return;
    }
    let agent = Agent::start();
    let c = agent.client();
    let piped = StdioMode::Piped { stdin: false };
    // Without capabilities in the request: docker's default set, and
    // no_new_privs; /dev/mqueue is mounted.
    create(&c, &agent, "dflt", cmd(&["sh", "-c", "cat /proc/self/status; cat /proc/mounts"]));
    let out = c.start("dflt", piped).unwrap().output(LIMIT).unwrap();
    let d = "00000000a80425fb";
    assert_eq!(privileges(&out), format!("0000000000000000 {d} {d} {d} 0000000000000000 1"));
    let mounts = String::from_utf8_lossy(&out.stdout);
    assert!(mounts.lines().any(|l| l.starts_with("mqueue /dev/mqueue mqueue rw,nosuid,nodev,noexec")), "{mounts}");

    // A user other than root with an ambient capability, without
    // no_new_privs: CHOWN | KILL | NET_BIND_SERVICE bound, NET_BIND_SERVICE
    // in every other set.
    let nbs = names(&["CAP_NET_BIND_SERVICE"]);
    let caps = Capabilities {
        bounding: names(&["CAP_CHOWN", "CAP_KILL", "CAP_NET_BIND_SERVICE"]),
        effective: nbs.clone(),
        permitted: nbs.clone(),
        inheritable: nbs.clone(),
        ambient: nbs,
    };
    let config = ImageConfig {
        cmd: names(&["sh", "-c", "cat /proc/self/status; sleep 1000"]),
        user: "alice".into(),
        capabilities: Some(caps),
        no_new_privileges: Some(false),
        ..Default::default()
    };
    create(&c, &agent, "caps", config);
    let mut init = c.start("caps", piped).unwrap();
    let mut stdout = init.stdout.take().unwrap();
    let mut text = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&text).contains("NoNewPrivs") {
        let n = stdout.read(&mut buf).unwrap();
        assert!(n > 0, "{}", String::from_utf8_lossy(&text));
        text.extend_from_slice(&buf[..n]);
    }
    let read = vmrun_agent_client::Output { stdout: text, stderr: Vec::new(), exit_code: 0 };
    let want = "0000000000000400 0000000000000400 0000000000000400 0000000000000421 0000000000000400 0";
    assert_eq!(privileges(&read), want);

    // An exec'd process gets the container's sets, or its own: root with
    // CHOWN and KILL bound and only KILL permitted and effective (with
    // no_new_privs root's execve keeps the permitted set; without it,
    // it would fill it from the bounding set, as under runc).
    let status = exec_args(&["cat", "/proc/self/status"]);
    let out = c.exec("caps", "same", &status, piped).unwrap().output(LIMIT).unwrap();
    assert_eq!(privileges(&out), want);
    let own = ExecProcess {
        user: Some("root".into()),
        capabilities: Some(Capabilities {
            bounding: names(&["CAP_CHOWN", "CAP_KILL"]),
            effective: names(&["CAP_KILL"]),
            permitted: names(&["CAP_KILL"]),
            ..Default::default()
        }),
        no_new_privileges: Some(true),
        ..status.clone()
    };
    let out = c.exec("caps", "own", &own, piped).unwrap().output(LIMIT).unwrap();
    assert_eq!(privileges(&out), "0000000000000000 0000000000000020 0000000000000020 0000000000000021 0000000000000000 1");
    // Unknown names and sets the kernel would refuse are refused.
    for (i, (caps, what)) in [
        (Capabilities { bounding: names(&["CAP_NO_SUCH_THING"]), ..Default::default() }, "CAP_NO_SUCH_THING"),
        (Capabilities { effective: names(&["CAP_KILL"]), ..Default::default() }, "not in the permitted set"),
    ]
    .into_iter()
    .enumerate()
    {
        let p = ExecProcess { capabilities: Some(caps), ..status.clone() };
        let err = c.exec("caps", &format!("bad{i}"), &p, piped).unwrap_err();
        assert!(matches!(err, Error::Agent(ref a) if a.kind == ErrorKind::BadRequest && a.message.contains(what)), "{err}");
    }
    init.signal(9).unwrap();
    assert_eq!(init.wait().unwrap(), 137);
}

#[test]
fn not_found_is_127_and_not_executable_is_126() {
    if !require_root() {
        return;
    }
    let agent = Agent::start();
    let c = agent.client();
    create(&c, &agent, "nf", cmd(&["no-such-command"]));
    let err = c.start("nf", StdioMode::Piped { stdin: false }).unwrap_err();
    assert_eq!(err.exit_code(), Some(127), "{err}");
    assert!(err.to_string().contains("not found"), "{err}");
    assert_eq!(c.wait("nf", None, Some(Duration::from_secs(10))).unwrap(), 127);

    create(&c, &agent, "run", cmd(&["sleep", "1000"]));
    let init = c.start("run", StdioMode::Null).unwrap();
    for (id, args, code) in [("a", "/bin/notexec", 126), ("b", "/nonexistent/prog", 127), ("c", "/srv", 126)] {
        let err = c.exec("run", id, &exec_args(&[args]), StdioMode::Null).unwrap_err();
        assert_eq!(err.exit_code(), Some(code), "{args}: {err}");
        assert_eq!(c.wait("run", Some(id), Some(Duration::from_secs(10))).unwrap(), code);
    }
    init.signal(9).unwrap();
    init.wait().unwrap();
}

#[test]
fn a_terminal_with_resize() {
    if !require_root() {
        return;
    }
    let agent = Agent::start();
    let c = agent.client();
    create(&c, &agent, "tty", cmd(&["sh", "-c", "tty; stty size; read x; stty size; echo got:$x"]));
    let mut p = c.start("tty", StdioMode::Tty { rows: 24, cols: 80 }).unwrap();
    let mut out = p.stdout.take().unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 256];
    let deadline = Instant::now() + Duration::from_secs(20);
    while !String::from_utf8_lossy(&seen).contains("24 80") {
        assert!(Instant::now() < deadline, "no size: {:?}", String::from_utf8_lossy(&seen));
        let n = out.read(&mut buf).unwrap();
        assert!(n > 0, "terminal closed early: {:?}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    // The terminal is one of the container's own devpts instance (its
    // first), and so is an exec'd process's.
    assert!(String::from_utf8_lossy(&seen).starts_with("/dev/pts/0\r\n"), "{:?}", String::from_utf8_lossy(&seen));
    let mut e = c.exec("tty", "e1", &exec_args(&["sh", "-c", "tty; ls /dev/pts"]), StdioMode::Tty { rows: 24, cols: 80 }).unwrap();
    let mut exec_out = String::new();
    e.stdout.take().unwrap().read_to_string(&mut exec_out).unwrap();
    assert_eq!(e.wait().unwrap(), 0);
    assert!(exec_out.starts_with("/dev/pts/1\r\n") && exec_out.contains('0') && exec_out.contains("ptmx"), "{exec_out:?}");
    p.resize(50, 132).unwrap();
    let mut stdin = p.stdin.take().unwrap();
    stdin.write_all(b"typed\n").unwrap();
    let mut rest = Vec::new();
    out.read_to_end(&mut rest).unwrap();
    let text = String::from_utf8_lossy(&rest);
    assert!(text.contains("50 132") && text.contains("got:typed"), "{text:?}");
    assert_eq!(p.wait().unwrap(), 0);
}

#[test]
fn an_unread_stream_does_not_block_other_requests() {
    if !require_root() {
        return;
    }
    let agent = Agent::start();
    let c = agent.client();
    // Five windows of output.
    create(&c, &agent, "flood", cmd(&["sh", "-c", "yes 0123456789abcdef | head -c 5242880; echo done >&2"]));
    let mut p = c.start("flood", StdioMode::Piped { stdin: false }).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    // The process is stalled on its pipe, the connection is not.
    for _ in 0..5 {
        c.ping().unwrap();
    }
    let mut stdout = p.stdout.take().unwrap();
    let mut total = 0usize;
    let mut buf = vec![0u8; 100_000];
    loop {
        let n = stdout.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        total += n;
    }
    assert_eq!(total, 5 << 20);
    let out = p.output(LIMIT).unwrap();
    assert_eq!(out.stderr, b"done\n");
    assert_eq!(out.exit_code, 0);
}

#[test]
fn remove_and_shutdown() {
    if !require_root() {
        return;
    }
    let mut agent = Agent::start();
    let c = agent.client();
    create(&c, &agent, "rm", cmd(&["sleep", "1000"]));
    let err = c.create_container(&CreateContainer {
        id: "rm".into(),
        layers: LayerSource { disk: "/nonexistent".into(), layers: vec![] },
        rootfs: Default::default(),
        config: ImageConfig::default(),
        limits: UnpackLimits::default(),
    });
    assert!(matches!(err, Err(Error::Agent(ref a)) if a.kind == ErrorKind::AlreadyExists), "{err:?}");
    let p = c.start("rm", StdioMode::Null).unwrap();
    let err = c.remove_container("rm", false).unwrap_err();
    assert!(matches!(err, Error::Agent(ref a) if a.kind == ErrorKind::InvalidState), "{err}");
    // A wait that was asked before the removal is answered.
    let waiter = {
        let c = c.clone();
        std::thread::spawn(move || c.wait("rm", None, Some(Duration::from_secs(20))))
    };
    std::thread::sleep(Duration::from_millis(200));
    c.remove_container("rm", true).unwrap();
    assert_eq!(waiter.join().unwrap().unwrap(), 137);
    drop(p);
    assert!(!agent.root.join("rm").exists(), "the container's directory is gone");
    let err = c.start("rm", StdioMode::Null).unwrap_err();
    assert!(matches!(err, Error::Agent(ref a) if a.kind == ErrorKind::NotFound), "{err}");
    c.shutdown().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = agent.child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "the agent did not exit after shutdown");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status}");
}

#[test]
fn a_malicious_image_is_refused_over_the_protocol() {
    if !require_root() {
        return;
    }
    let agent = Agent::start();
    let c = agent.client();
    let victim = agent.dir.path().join("victim");
    std::fs::write(&victim, b"safe").unwrap();
    let mut l = Layer::new();
    l.symlink("esc", &agent.dir.path().display().to_string());
    l.file("esc/victim", 0o644, b"pwned");
    let (disk, layers) = disk_file(agent.dir.path(), "evil.disk", &[(gzip(&l.finish()), GZIP)]);
    let err = c
        .create_container(&CreateContainer {
            id: "evil".into(),
            layers: LayerSource { disk: disk.display().to_string(), layers },
            rootfs: Default::default(),
            config: cmd(&["true"]),
            limits: UnpackLimits::default(),
        })
        .unwrap_err();
    assert!(matches!(err, Error::Agent(ref a) if a.kind == ErrorKind::Image), "{err}");
    assert!(err.to_string().contains("outside the container root"), "{err}");
    assert_eq!(std::fs::read(&victim).unwrap(), b"safe");
    assert!(!agent.root.join("evil").exists(), "a failed create leaves nothing behind");
    // The id is free again.
    create(&c, &agent, "evil", cmd(&["true"]));
}

#[test]
fn the_agent_refuses_another_protocol_version() {
    if !require_root() {
        return;
    }
    let agent = Agent::start();
    let s = UnixStream::connect(&agent.socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let h = Hello { version: 999, ..Hello::ours("test-host") };
    (&s).write_all(&frame::encode(Kind::Hello, 0, &serde_json::to_vec(&h).unwrap())).unwrap();
    let mut r = BufReader::new(&s);
    let reply = frame::read_frame(&mut r).unwrap().unwrap();
    assert_eq!(reply.kind, Kind::Hello);
    let theirs: Hello = serde_json::from_slice(&reply.payload).unwrap();
    assert_eq!(theirs.version, vmrun_agent_protocol::VERSION);
    // Then it hangs up.
    assert!(frame::read_frame(&mut r).unwrap().is_none());
    // A request before the hello is refused the same way.
    let s = UnixStream::connect(&agent.socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    (&s).write_all(&frame::encode(Kind::Request, 1, b"{\"op\":\"ping\"}")).unwrap();
    let mut b = [0u8; 1];
    assert_eq!((&s).read(&mut b).unwrap(), 0);
    // And the agent still serves others.
    agent.client().ping().unwrap();
}

#[test]
fn device_nodes_from_the_image_cannot_be_opened() {
    if !require_root() {
        return;
    }
    // Nodes of /dev/zero and /dev/mem outside /dev, and an image /dev
    // with a "null" that is really /dev/zero and an extra node: none of
    // them may be usable in the container, as root or as alice; the
    // container's /dev is the agent's own.
    let agent = Agent::start();
    let c = agent.client();
    let mut nodes = Layer::new();
    nodes.dir("nodes", 0o755).dir("dev", 0o755);
    nodes.device("nodes/zero", tar::EntryType::Char, 1, 5).device("nodes/mem", tar::EntryType::Char, 1, 1);
    nodes.device("dev/null", tar::EntryType::Char, 1, 5).device("dev/extra", tar::EntryType::Char, 1, 5);
    let (disk, layers) = test_image_plus(agent.dir.path(), vec![nodes.finish()]);
    let script = "for n in /nodes/zero /nodes/mem /dev/extra; do \
                    if head -c 1 $n >/dev/null 2>&1; then echo \"$n opened\"; else echo \"$n refused\"; fi; done; \
                  test -c /dev/null && echo null $(head -c 1 /dev/null | wc -c); \
                  echo zero $(head -c 3 /dev/zero | wc -c); \
                  echo dev $(ls /dev)";
    for (id, user) in [("nodes-root", ""), ("nodes-alice", "alice")] {
        let spec = CreateContainer {
            id: id.into(),
            layers: LayerSource { disk: disk.display().to_string(), layers: layers.clone() },
            rootfs: Default::default(),
            config: ImageConfig { cmd: vec!["sh".into(), "-c".into(), script.into()], user: user.into(), ..Default::default() },
            limits: UnpackLimits::default(),
        };
        c.create_container(&spec).unwrap();
        let out = c.start(id, StdioMode::Piped { stdin: false }).unwrap().output(LIMIT).unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.exit_code, 0, "{id}: {text} {}", String::from_utf8_lossy(&out.stderr));
        for n in ["/nodes/zero", "/nodes/mem", "/dev/extra"] {
            assert!(text.contains(&format!("{n} refused\n")), "{id}: {n} is usable:\n{text}");
        }
        assert!(text.contains("null 0\n") && text.contains("zero 3\n"), "{id}: {text}");
        let dev = text.lines().find_map(|l| l.strip_prefix("dev ")).unwrap();
        assert!(!dev.contains("extra"), "{id}: the image's /dev shows: {dev}");
        c.remove_container(id, false).unwrap();
    }
}
