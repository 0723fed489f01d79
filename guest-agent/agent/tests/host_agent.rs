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
use vmrun_agent_protocol::{
    Capabilities, CopyContent, CopyEntry, CopyKind, Hello, SeccompAction, SeccompArg, SeccompOp, SeccompProfile, SeccompSyscalls, UnpackLimits,
    WriteFiles, COPY_MAX_BYTES, COPY_MAX_ENTRIES, COPY_PART_BYTES,
};

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

/// `p` as root with CHOWN and KILL bound and only KILL permitted and
/// effective.
fn kill_only(p: ExecProcess) -> ExecProcess {
    let caps = Capabilities {
        bounding: names(&["CAP_CHOWN", "CAP_KILL"]),
        effective: names(&["CAP_KILL"]),
        permitted: names(&["CAP_KILL"]),
        ..Default::default()
    };
    ExecProcess { user: Some("root".into()), capabilities: Some(caps), ..p }
}

/// What [`privileges`] shows of a [`kill_only`] process with no_new_privs.
const KILL_ONLY: &str = "0000000000000000 0000000000000020 0000000000000020 0000000000000021 0000000000000000 1";

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
    // The container's own devpts instance, named as a mount of "devpts".
    assert!(mounts.lines().any(|l| l.starts_with("devpts /dev/pts devpts rw,nosuid,noexec")), "{mounts}");

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
    let own = kill_only(ExecProcess { no_new_privileges: Some(true), ..status.clone() });
    let out = c.exec("caps", "own", &own, piped).unwrap().output(LIMIT).unwrap();
    assert_eq!(privileges(&out), KILL_ONLY);
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

fn seccomp_entry(names: &[&str], action: SeccompAction, errno_ret: Option<i32>, args: Vec<SeccompArg>) -> SeccompSyscalls {
    SeccompSyscalls { names: names.iter().map(|s| s.to_string()).collect(), action, errno_ret: errno_ret.map(|e| e as u32), args }
}

fn seccomp_profile(default_action: SeccompAction, default_errno: Option<i32>, syscalls: Vec<SeccompSyscalls>) -> SeccompProfile {
    SeccompProfile { default_action, default_errno_ret: default_errno.map(|e| e as u32), architectures: vec![], flags: vec![], syscalls }
}

/// A profile that fails `mkdir` with `errno` and lets everything else run.
fn no_mkdir(errno: i32) -> SeccompProfile {
    seccomp_profile(SeccompAction::Allow, None, vec![seccomp_entry(&["mkdir", "mkdirat"], SeccompAction::Errno, Some(errno), vec![])])
}

/// The text of an errno, as busybox prints it.
fn strerror(errno: i32) -> String {
    std::io::Error::from_raw_os_error(errno).to_string().split(" (os error").next().unwrap().to_string()
}

fn text(out: &vmrun_agent_client::Output) -> (String, String) {
    (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn seccomp_profiles_filter_the_containers_processes() {
    if !require_root() {
        return;
    }
    let agent = Agent::start();
    let c = agent.client();
    let piped = StdioMode::Piped { stdin: false };
    let status = "while read k v; do case $k in Seccomp:|NoNewPrivs:) echo $k$v;; esac; done < /proc/self/status";

    // Everything allowed but mkdir (ENOSPC), and kill with signal 0
    // (ESRCH): an argument condition.
    let mut profile = no_mkdir(libc::ENOSPC);
    let signal_0 = SeccompArg { index: 1, value: 0, value_two: 0, op: SeccompOp::Eq };
    profile.syscalls.push(seccomp_entry(&["kill"], SeccompAction::Errno, Some(libc::ESRCH), vec![signal_0]));
    let script =
        format!("{status}; busybox mkdir /tmp/a; echo mkdir=$?; kill -0 $$; echo kill0=$?; kill -CONT $$; echo cont=$?; ls -d /tmp/a");
    let config = ImageConfig { cmd: names(&["sh", "-c", &script]), seccomp: Some(profile.clone()), ..Default::default() };
    create(&c, &agent, "deny", config);
    let out = c.start("deny", piped).unwrap().output(LIMIT).unwrap();
    let (stdout, stderr) = text(&out);
    assert_eq!(stdout, "NoNewPrivs:1\nSeccomp:2\nmkdir=1\nkill0=1\ncont=0\n", "{stderr}");
    assert!(stderr.contains(&format!("can't create directory '/tmp/a': {}", strerror(libc::ENOSPC))), "{stderr}");
    assert!(stderr.contains(&strerror(libc::ESRCH)), "{stderr}");
    assert_ne!(out.exit_code, 0, "/tmp/a was not made: {stderr}");

    // Without no_new_privs (and as a user without CAP_SYS_ADMIN once
    // started), the filter goes in while the process may still install it.
    let config = ImageConfig {
        cmd: names(&["sh", "-c", &format!("{status}; busybox mkdir /tmp/b")]),
        user: "alice".into(),
        no_new_privileges: Some(false),
        seccomp: Some(no_mkdir(libc::EDQUOT)),
        ..Default::default()
    };
    create(&c, &agent, "nnp", config);
    let out = c.start("nnp", piped).unwrap().output(LIMIT).unwrap();
    let (stdout, stderr) = text(&out);
    assert_eq!((stdout.as_str(), out.exit_code), ("NoNewPrivs:0\nSeccomp:2\n", 1), "{stderr}");
    assert!(stderr.contains(&strerror(libc::EDQUOT)), "{stderr}");

    // An exec'd process inherits the container's filter, or has its own.
    let config = ImageConfig { cmd: names(&["sleep", "1000"]), seccomp: Some(no_mkdir(libc::ENOSPC)), ..Default::default() };
    create(&c, &agent, "execs", config);
    let init = c.start("execs", StdioMode::Null).unwrap();
    let mkdir = exec_args(&["busybox", "mkdir", "/tmp/c"]);
    let out = c.exec("execs", "same", &mkdir, piped).unwrap().output(LIMIT).unwrap();
    assert_eq!(out.exit_code, 1);
    assert!(text(&out).1.contains(&strerror(libc::ENOSPC)), "{:?}", text(&out));
    let own = ExecProcess { seccomp: Some(no_mkdir(libc::EROFS)), ..mkdir.clone() };
    let out = c.exec("execs", "own", &own, piped).unwrap().output(LIMIT).unwrap();
    assert_eq!(out.exit_code, 1);
    assert!(text(&out).1.contains(&strerror(libc::EROFS)), "{:?}", text(&out));

    // A default of ERRNO with an allow list: every known call but mkdir
    // (and a name that is no system call, left out).
    let mut allowed: Vec<&str> = vmrun_agent::seccomp::known().filter(|n| !n.starts_with("mkdir")).collect();
    allowed.push("no_such_syscall");
    let list = seccomp_profile(SeccompAction::Errno, Some(libc::EMLINK), vec![seccomp_entry(&allowed, SeccompAction::Allow, None, vec![])]);
    let p = ExecProcess { seccomp: Some(list), ..exec_args(&["sh", "-c", "echo start; busybox mkdir /tmp/d; echo mkdir=$?; echo end"]) };
    let out = c.exec("execs", "list", &p, piped).unwrap().output(LIMIT).unwrap();
    let (stdout, stderr) = text(&out);
    assert_eq!((stdout.as_str(), out.exit_code), ("start\nmkdir=1\nend\n", 0), "{stderr}");
    assert!(stderr.contains(&strerror(libc::EMLINK)), "{stderr}");

    // A profile that cannot be compiled is refused, at create and at exec.
    let mut bad = no_mkdir(libc::EPERM);
    bad.syscalls[0].args = vec![SeccompArg { index: 6, value: 0, value_two: 0, op: SeccompOp::Eq }];
    let p = ExecProcess { seccomp: Some(bad.clone()), ..mkdir };
    let err = c.exec("execs", "bad", &p, piped).unwrap_err();
    assert!(matches!(err, Error::Agent(ref a) if a.kind == ErrorKind::BadRequest && a.message.contains("argument index 6")), "{err}");
    let (disk, layers) = test_image(agent.dir.path());
    let err = c
        .create_container(&CreateContainer {
            id: "bad".into(),
            layers: LayerSource { disk: disk.display().to_string(), layers },
            rootfs: Default::default(),
            config: ImageConfig { cmd: names(&["true"]), seccomp: Some(bad), ..Default::default() },
            limits: UnpackLimits::default(),
        })
        .unwrap_err();
    assert!(matches!(err, Error::Agent(ref a) if a.kind == ErrorKind::BadRequest && a.message.contains("argument index 6")), "{err}");
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
    // A request in the same write as a refused hello is not served.
    let s = UnixStream::connect(&agent.socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut both = frame::encode(Kind::Hello, 0, &serde_json::to_vec(&h).unwrap());
    frame::encode_into(&mut both, Kind::Request, 1, b"{\"op\":\"ping\"}");
    (&s).write_all(&both).unwrap();
    let mut r = BufReader::new(&s);
    assert_eq!(frame::read_frame(&mut r).unwrap().unwrap().kind, Kind::Hello);
    assert!(frame::read_frame(&mut r).unwrap().is_none(), "a request behind a refused hello was answered");
    // And the agent still serves others, one whose request follows its
    // hello before the answer too.
    agent.client().ping().unwrap();
    assert!(agent.client_with(true).ping().unwrap().starts_with("vmrun-agent "));
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

/// An image layer with more busybox applets (the test image links only a
/// few).
fn applets(names: &[&str]) -> Layer {
    let mut l = Layer::new();
    for a in names {
        l.symlink(&format!("bin/{a}"), "busybox");
    }
    l
}

/// Runs the container `id` made of `layers` and `config` to its end: its
/// standard output, after checking it exited with 0.
fn run_to_end(c: &Client, agent: &Agent, id: &str, layers: Vec<Vec<u8>>, config: ImageConfig) -> String {
    let (disk, digests) = test_image_plus(agent.dir.path(), layers);
    let spec = CreateContainer {
        id: id.into(),
        layers: LayerSource { disk: disk.display().to_string(), layers: digests },
        rootfs: Default::default(),
        config,
        limits: UnpackLimits::default(),
    };
    c.create_container(&spec).unwrap();
    let out = c.start(id, StdioMode::Piped { stdin: false }).unwrap().output(LIMIT).unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.exit_code, 0, "{id}: {text} {}", String::from_utf8_lossy(&out.stderr));
    text
}

/// The value of the line `name: value` of a script's output.
fn line<'a>(text: &'a str, name: &str) -> &'a str {
    let prefix = format!("{name}: ");
    text.lines().find_map(|l| l.strip_prefix(prefix.as_str())).unwrap_or_else(|| panic!("no {name} in:\n{text}"))
}

#[test]
fn masked_and_readonly_paths_sysctl_oom_score_groups_and_devices() {
    if !require_root() {
        return;
    }
    let agent = Agent::start();
    let c = agent.client();
    let mut extra = applets(&["stat", "touch", "grep", "mkdir"]);
    extra.dir("secret", 0o755).file("secret/key", 0o644, b"hidden\n");
    let host_shmmax = std::fs::read_to_string("/proc/sys/kernel/shmmax").unwrap();
    let host_domain = std::fs::read_to_string("/proc/sys/kernel/domainname").unwrap();
    let dev = |path: &str, kind, major, minor, mode, uid, gid| vmrun_agent_protocol::Device {
        path: path.into(),
        kind,
        major,
        minor,
        file_mode: mode,
        uid,
        gid,
    };
    use vmrun_agent_protocol::DeviceKind::{Char, Fifo};
    // A negative score takes CAP_SYS_RESOURCE (which the guest agent has;
    // a host running these tests may not).
    let oom = if has_sys_resource() { -300 } else { 300 };
    let script = "echo marker: $(wc -c < /marker); echo secret: $(ls -A /secret | wc -l); \
                  touch /secret/new 2>/dev/null && echo secret-write: yes || echo secret-write: no; \
                  echo cmdline: $(wc -c < /proc/cmdline); \
                  touch /srv/new 2>&1 | grep -o 'Read-only file system' | sed 's/^/srv-write: /'; \
                  echo srv-mount: $(grep ' /srv ' /proc/self/mountinfo | cut -d' ' -f6); \
                  echo shmmax: $(cat /proc/sys/kernel/shmmax); echo domain: $(cat /proc/sys/kernel/domainname); \
                  (echo 1 > /proc/sys/kernel/shmmni) 2>&1 | grep -o 'Read-only file system' | sed 's/^/sysctl-write: /'; \
                  echo oom: $(cat /proc/self/oom_score_adj); \
                  echo groups: $(grep Groups /proc/self/status | cut -f2); echo id: $(id -G); \
                  echo mynull: $(stat -c '%F %t:%T %a %u:%g' /dev/mynull) $(head -c 1 /dev/mynull | wc -c); \
                  echo tun: $(stat -c '%F %t:%T %a' /dev/net/tun); echo fifo: $(stat -c '%F %a' /dev/fifo); \
                  echo null: $(stat -c '%t:%T' /dev/null); \
                  mknod /dev/mine c 1 3 && (head -c 1 /dev/mine 2>&1 | grep -o 'Permission denied' | sed 's/^/own-node: /'); \
                  echo dev-mount: $(grep ' /dev ' /proc/self/mountinfo | cut -d' ' -f6); echo dev: $(ls -A /dev | tr '\n' ' '); \
                  echo root: $(grep ' / / ' /proc/self/mountinfo | grep -c shared:)";
    let config = ImageConfig {
        cmd: vec!["sh".into(), "-c".into(), script.into()],
        user: "0:0".into(),
        additional_gids: Some(vec![5, 6]),
        oom_score_adj: Some(oom),
        masked_paths: names(&["/marker", "/secret", "/proc/cmdline", "/proc/kcore", "/does/not/exist"]),
        readonly_paths: names(&["/srv", "/proc/sys", "/not/here/either"]),
        sysctl: [("kernel.shmmax", "123456789"), ("kernel.domainname", "example.test")].into_iter().map(|(k, v)| (k.into(), v.into())).collect(),
        devices: vec![
            dev("/dev/mynull", Char, 1, 3, Some(0o640), Some(1000), Some(10)),
            dev("/dev/net/tun", Char, 10, 200, None, None, None),
            dev("/dev/fifo", Fifo, 0, 0, Some(0o600), None, None),
        ],
        rootfs_propagation: Some(vmrun_agent_protocol::Propagation::Private),
        ..Default::default()
    };
    let extra_layer = {
        let mut l = extra;
        l.symlink("bin/cut", "busybox").symlink("bin/sed", "busybox").symlink("bin/mknod", "busybox");
        l.finish()
    };
    let text = run_to_end(&c, &agent, "spec", vec![extra_layer], config);
    assert_eq!(line(&text, "marker"), "0", "a masked file reads empty:\n{text}");
    assert_eq!(line(&text, "secret"), "0", "a masked directory is empty:\n{text}");
    assert_eq!(line(&text, "secret-write"), "no");
    assert_eq!(line(&text, "cmdline"), "0");
    assert_eq!(line(&text, "srv-write"), "Read-only file system");
    let srv = line(&text, "srv-mount");
    assert!(srv.split(',').any(|o| o == "ro") && srv.split(',').any(|o| o == "nodev"), "a read-only path keeps nodev: {srv}");
    assert_eq!(line(&text, "shmmax"), "123456789");
    assert_eq!(line(&text, "domain"), "example.test");
    assert_eq!(line(&text, "sysctl-write"), "Read-only file system", "/proc/sys is read-only after the sysctls");
    assert_eq!(std::fs::read_to_string("/proc/sys/kernel/shmmax").unwrap(), host_shmmax, "the host's is untouched");
    assert_eq!(std::fs::read_to_string("/proc/sys/kernel/domainname").unwrap(), host_domain);
    assert_eq!(line(&text, "oom"), oom.to_string());
    assert_eq!(line(&text, "groups"), "5 6", "the additional gids, exactly");
    assert_eq!(line(&text, "id"), "0 5 6");
    assert_eq!(line(&text, "mynull"), "character special file 1:3 640 1000:10 0");
    assert_eq!(line(&text, "tun"), "character special file a:c8 666");
    assert_eq!(line(&text, "fifo"), "fifo 600");
    assert_eq!(line(&text, "null"), "1:3");
    assert_eq!(line(&text, "own-node"), "Permission denied", "a node the container makes cannot be opened:\n{text}");
    assert!(line(&text, "dev-mount").split(',').any(|o| o == "nodev"), "{text}");
    assert!(!line(&text, "dev").contains(".vmrun-nodes"), "the agent's nodes stay attached: {text}");
    assert_eq!(line(&text, "root"), "0", "rootfsPropagation private");
}

/// Whether this process has `CAP_SYS_RESOURCE`.
fn has_sys_resource() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let eff = status.lines().find_map(|l| l.strip_prefix("CapEff:")).unwrap();
    u64::from_str_radix(eff.trim(), 16).unwrap() & 1 << 24 != 0
}

#[test]
fn exec_gets_its_own_groups_and_oom_score() {
    if !require_root() {
        return;
    }
    let agent = Agent::start();
    let c = agent.client();
    let config = ImageConfig { cmd: names(&["sleep", "1000"]), user: "1000:100".into(), additional_gids: Some(vec![7]), oom_score_adj: Some(100), ..Default::default() };
    let (disk, layers) = test_image_plus(agent.dir.path(), vec![applets(&["grep", "cut"]).finish()]);
    let spec = CreateContainer { id: "ex".into(), layers: LayerSource { disk: disk.display().to_string(), layers }, rootfs: Default::default(), config, limits: UnpackLimits::default() };
    c.create_container(&spec).unwrap();
    let init = c.start("ex", StdioMode::Null).unwrap();
    let script = "echo groups: $(grep Groups /proc/self/status | cut -f2); echo id: $(id -G); echo oom: $(cat /proc/self/oom_score_adj)";
    let run = |id: &str, p: ExecProcess| {
        let out = c.exec("ex", id, &p, StdioMode::Piped { stdin: false }).unwrap().output(LIMIT).unwrap();
        assert_eq!(out.exit_code, 0, "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    // The container's.
    let text = run("same", exec_args(&["sh", "-c", script]));
    assert_eq!((line(&text, "groups"), line(&text, "id"), line(&text, "oom")), ("7", "100 7", "100"));
    // Its own: a user by name keeps the image's groups, then the extra ones.
    let own = ExecProcess { user: Some("alice".into()), additional_gids: Some(vec![42]), oom_score_adj: Some(17), ..exec_args(&["sh", "-c", script]) };
    let text = run("own", own);
    assert_eq!((line(&text, "groups"), line(&text, "id"), line(&text, "oom")), ("10 42", "1000 10 42", "17"));
    let bad = ExecProcess { oom_score_adj: Some(1001), ..exec_args(&["true"]) };
    let err = c.exec("ex", "bad", &bad, StdioMode::Null).unwrap_err();
    assert!(matches!(err, Error::Agent(ref a) if a.kind == ErrorKind::BadRequest && a.message.contains("oom_score_adj")), "{err}");
    init.signal(9).unwrap();
    init.wait().unwrap();
}

#[test]
fn a_read_only_root_without_mount_points_and_destinations_through_links() {
    if !require_root() {
        return;
    }
    // The test image has no /proc, /dev or /sys (as a pause image): they
    // are made before the root becomes read-only. Links of the image that
    // point out of its root are followed inside it.
    let agent = Agent::start();
    let c = agent.client();
    let outside = agent.dir.path().join("outside");
    let mut l = applets(&["touch", "grep", "readlink"]);
    l.symlink("escape", &outside.display().to_string());
    l.symlink("up", "../../../../../../../../outside-up");
    let bound = agent.dir.path().join("bound-file");
    std::fs::write(&bound, b"bound file\n").unwrap();
    let mount = |dest: &str, fstype: &str, source: &str, options: &[&str]| vmrun_agent_protocol::Mount {
        destination: dest.into(),
        fstype: fstype.into(),
        source: source.into(),
        options: names(options),
    };
    let script = format!(
        "echo status: $(head -1 /proc/self/status); echo cwd: $(pwd); \
         touch /new 2>&1 | grep -o 'Read-only file system' | sed 's/^/root-write: /'; \
         touch /escape/mnt/f && echo escape: $(ls {out}/mnt); touch /up/mnt/g && echo up: $(ls /outside-up/mnt); \
         echo file: $(cat /etc/bound); \
         echo root: $(grep ' / / ' /proc/self/mountinfo | grep -c shared:)",
        out = outside.display()
    );
    let config = ImageConfig {
        cmd: vec!["sh".into(), "-c".into(), script],
        working_dir: "/made/here".into(),
        readonly_rootfs: true,
        mounts: vec![
            mount("/escape/mnt", "tmpfs", "tmpfs", &[]),
            mount("/up/mnt", "tmpfs", "tmpfs", &[]),
            mount("/etc/bound", "bind", &bound.display().to_string(), &["bind", "ro"]),
        ],
        rootfs_propagation: Some(vmrun_agent_protocol::Propagation::Shared),
        ..Default::default()
    };
    let mut extra = l;
    extra.symlink("bin/sed", "busybox");
    let text = run_to_end(&c, &agent, "ro", vec![extra.finish()], config);
    assert!(line(&text, "status").starts_with("Name:"), "{text}");
    assert_eq!(line(&text, "cwd"), "/made/here");
    assert_eq!(line(&text, "root-write"), "Read-only file system");
    assert_eq!(line(&text, "escape"), "f");
    assert_eq!(line(&text, "up"), "g");
    assert_eq!(line(&text, "file"), "bound file");
    assert_eq!(line(&text, "root"), "1", "rootfsPropagation shared");
    assert!(!outside.exists(), "a link out of the image reached the host");
    assert!(!std::path::Path::new("/outside-up").exists());
}

/// One part of a copied mount.
fn part(container: &str, destination: &str, kind: CopyKind, read_only: bool, entries: Vec<CopyEntry>, last: bool) -> WriteFiles {
    WriteFiles { container: container.into(), destination: destination.into(), kind, read_only, entries, last }
}

fn entry(path: &str, mode: u32, content: CopyContent) -> CopyEntry {
    CopyEntry { path: path.into(), mode, uid: 0, gid: 0, content }
}

fn file(data: &str) -> CopyContent {
    CopyContent::File { data: data.as_bytes().to_vec(), append: false }
}

fn link(target: &str) -> CopyContent {
    CopyContent::Symlink { target: target.into() }
}

/// A directory laid out as kubelet lays out a configmap: keys are links
/// through `..data` to a timestamped directory.
fn configmap(stamp: &str, keys: &[(&str, &str)]) -> Vec<CopyEntry> {
    let mut v = vec![entry("", 0o755, CopyContent::Directory), entry(stamp, 0o755, CopyContent::Directory)];
    for (k, val) in keys {
        v.push(entry(&format!("{stamp}/{k}"), 0o644, file(val)));
        v.push(entry(k, 0o777, link(&format!("..data/{k}"))));
    }
    v.push(entry("..data", 0o777, link(stamp)));
    v
}

fn bad_request(r: Result<(), Error>) -> String {
    match r {
        Err(Error::Agent(a)) if a.kind == ErrorKind::BadRequest => a.message,
        other => panic!("expected a bad request, got {other:?}"),
    }
}

#[test]
fn copied_mounts_reach_the_container_are_updated_in_place_and_bounded() {
    if !require_root() {
        return;
    }
    let agent = Agent::start();
    let c = agent.client();
    create(&c, &agent, "cp", cmd(&["sleep", "1000"]));
    // A directory in two parts, a writable file whose mount point the image
    // lacks, a read-only file.
    let mut cm = configmap("..2024_a", &[("key", "v1")]);
    let rest = cm.split_off(2);
    c.write_files(&part("cp", "/etc/conf", CopyKind::Directory, true, cm, false)).unwrap();
    let mut rest = rest;
    rest.push(entry("sub", 0o750, CopyContent::Directory));
    rest.push(entry("sub/deep", 0o600, file("deep")));
    c.write_files(&part("cp", "/etc/conf", CopyKind::Directory, true, rest, true)).unwrap();
    c.write_files(&part("cp", "/dev/termination-log", CopyKind::File, false, vec![entry("", 0o666, file(""))], true)).unwrap();
    let big = CopyContent::File { data: b"first ".to_vec(), append: false };
    let more = CopyContent::File { data: b"second\n".to_vec(), append: true };
    c.write_files(&part("cp", "/etc/extra/hosts", CopyKind::File, true, vec![entry("", 0o644, big)], false)).unwrap();
    c.write_files(&part("cp", "/etc/extra/hosts", CopyKind::File, true, vec![entry("", 0o644, more)], true)).unwrap();

    // Refusals, each of which leaves the copies as they were.
    let dir = |entries| part("cp", "/etc/bad", CopyKind::Directory, false, entries, true);
    let root = entry("", 0o755, CopyContent::Directory);
    for path in ["../escape", "/abs", "a/../../b", "a//b", "."] {
        let m = bad_request(c.write_files(&dir(vec![root.clone(), entry(path, 0o644, file("x"))])));
        assert!(m.contains("plain names"), "{path}: {m}");
    }
    // A link the copy brings is never followed by the agent.
    let escape = format!("{}/escaped", agent.dir.path().display());
    let through = vec![root.clone(), entry("out", 0o777, link(agent.dir.path().to_str().unwrap())), entry("out/escaped", 0o644, file("x"))];
    let m = bad_request(c.write_files(&dir(through)));
    assert!(m.contains("out/escaped"), "{m}");
    assert!(!std::path::Path::new(&escape).exists(), "written through a link");
    let m = bad_request(c.write_files(&dir(vec![root.clone(), entry("f", 0o100644, file("x"))])));
    assert!(m.contains("mode"), "{m}");
    let m = bad_request(c.write_files(&part("cp", "/etc/f", CopyKind::File, false, vec![entry("", 0o755, CopyContent::Directory)], true)));
    assert!(m.contains("does not fit"), "{m}");
    let m = bad_request(c.write_files(&part("cp", "relative", CopyKind::File, false, vec![entry("", 0o644, file("x"))], true)));
    assert!(m.contains("absolute"), "{m}");
    // Over the size limit, in parts: the part that goes over is refused.
    let chunk = vec![b'x'; COPY_PART_BYTES];
    let parts = (COPY_MAX_BYTES as usize).div_ceil(COPY_PART_BYTES) + 1;
    let mut refused = None;
    for i in 0..parts {
        let e = entry("", 0o644, CopyContent::File { data: chunk.clone(), append: i > 0 });
        if let Err(e) = c.write_files(&part("cp", "/etc/huge", CopyKind::File, false, vec![e], i + 1 == parts)) {
            refused = Some((i, e.to_string()));
            break;
        }
    }
    let (at, m) = refused.expect("a copy over the limit was taken");
    assert_eq!(at, COPY_MAX_BYTES as usize / COPY_PART_BYTES, "refused at the part that goes over");
    assert!(m.contains("over the limit"), "{m}");
    // Too many entries.
    let many: Vec<CopyEntry> = std::iter::once(root.clone()).chain((0..COPY_MAX_ENTRIES).map(|i| entry(&format!("f{i}"), 0o644, file("")))).collect();
    assert!(bad_request(c.write_files(&dir(many))).contains("over the limit"));

    let p = c.start("cp", StdioMode::Null).unwrap();
    let run = |script: &str| {
        let out = c.exec("cp", &format!("e{}", script.len()), &exec_args(&["sh", "-c", script]), StdioMode::Piped { stdin: false }).unwrap().output(LIMIT).unwrap();
        (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (out, err) = run(
        "cat /etc/conf/key; echo; cat /etc/conf/sub/deep; echo; ls -ld /etc/conf/sub | head -c 10; echo; cat /etc/extra/hosts; \
         echo x > /etc/conf/new || echo ro; echo died > /dev/termination-log && cat /dev/termination-log; \
         echo x >> /etc/extra/hosts || echo ro; test -e /etc/bad || echo no-bad; test -e /etc/huge || echo no-huge",
    );
    assert_eq!(out, "v1\ndeep\ndrwxr-x---\nfirst second\nro\ndied\nro\nno-bad\nno-huge\n", "{err}");

    // Updates: kubelet's swap of ..data, a new key, a file rewritten.
    c.write_files(&part("cp", "/etc/conf", CopyKind::Directory, true, configmap("..2024_b", &[("key", "v2"), ("key2", "new")]), true)).unwrap();
    c.write_files(&part("cp", "/etc/extra/hosts", CopyKind::File, true, vec![entry("", 0o644, file("updated\n"))], true)).unwrap();
    let (out, err) = run("cat /etc/conf/key; echo; cat /etc/conf/key2; echo; ls -a /etc/conf | tr '\\n' ' '; echo; cat /etc/extra/hosts");
    assert_eq!(out, "v2\nnew\n. .. ..2024_b ..data key key2 \nupdated\n", "{err}");
    // The container's mounts are set once it started.
    let late = c.write_files(&part("cp", "/etc/late", CopyKind::File, false, vec![entry("", 0o644, file("x"))], true)).unwrap_err();
    assert!(matches!(late, Error::Agent(ref a) if a.kind == ErrorKind::InvalidState), "{late}");
    p.signal(9).unwrap();
    p.wait().unwrap();
    c.remove_container("cp", false).unwrap();
    assert!(!agent.root.join("cp").exists(), "the copies' tmpfs went with the container");
}

#[test]
fn limits_need_a_guests_cgroups() {
    if !require_root() {
        return;
    }
    let agent = Agent::start();
    let c = agent.client();
    // On a host the agent makes no cgroups: limits are refused before
    // anything is unpacked, and there are no statistics to read.
    let (disk, layers) = test_image(agent.dir.path());
    let resources = vmrun_agent_client::Resources { pids: vmrun_agent_client::PidsResources { limit: Some(8) }, ..Default::default() };
    let err = c
        .create_container(&CreateContainer {
            id: "limited".into(),
            layers: LayerSource { disk: disk.display().to_string(), layers },
            rootfs: Default::default(),
            config: ImageConfig { resources: Box::new(resources), ..cmd(&["true"]) },
            limits: UnpackLimits::default(),
        })
        .unwrap_err();
    assert!(matches!(err, Error::Agent(ref a) if a.kind == ErrorKind::BadRequest && a.message.contains("no cgroup v2 hierarchy")), "{err}");
    assert!(!agent.root.join("limited").exists(), "nothing was unpacked");
    create(&c, &agent, "free", cmd(&["true"]));
    let err = c.stats("free").unwrap_err();
    assert!(matches!(err, Error::Agent(ref a) if a.kind == ErrorKind::BadRequest && a.message.contains("no cgroup")), "{err}");
    let err = c.stats("nope").unwrap_err();
    assert!(matches!(err, Error::Agent(ref a) if a.kind == ErrorKind::NotFound), "{err}");
    let err = c.update("free", &Default::default()).unwrap_err();
    assert!(matches!(err, Error::Agent(ref a) if a.kind == ErrorKind::BadRequest), "{err}");
    // Its processes still start (clone3 without a cgroup).
    let p = c.start("free", StdioMode::Null).unwrap();
    assert_eq!(p.wait().unwrap(), 0);
}

/// The namespaces of the agent's process `pid` held open (`/proc/PID/fd`
/// links such as `ipc:[4026532001]`).
fn held_namespaces(pid: u32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .map(|l| l.to_string_lossy().into_owned())
        .filter(|l| l.starts_with("ipc:[") || l.starts_with("mnt:["))
        .collect()
}

#[test]
fn a_containers_mount_and_ipc_namespaces_outlive_its_process_until_it_is_removed() {
    if !require_root() {
        return;
    }
    let agent = Agent::start();
    let c = agent.client();
    create(&c, &agent, "ns", cmd(&["sh", "-c", "readlink /proc/self/ns/ipc; readlink /proc/self/ns/mnt"]));
    let out = c.start("ns", StdioMode::Piped { stdin: false }).unwrap().output(LIMIT).unwrap();
    assert_eq!(out.exit_code, 0, "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let own: Vec<&str> = text.lines().collect();
    assert_eq!(own.len(), 2, "{text}");
    assert_ne!(own[0], std::fs::read_link("/proc/self/ns/ipc").unwrap().to_string_lossy(), "an IPC namespace of its own");
    // Its process has ended: the agent still holds both, so that their
    // teardown is not part of the end being reported.
    let held = held_namespaces(agent.child.id());
    for ns in &own {
        assert!(held.iter().any(|h| h == ns), "{ns} not held by the agent: {held:?}");
    }
    c.remove_container("ns", false).unwrap();
    let held = held_namespaces(agent.child.id());
    for ns in &own {
        assert!(!held.iter().any(|h| h == ns), "{ns} still held after the removal: {held:?}");
    }
}

#[test]
fn a_pods_container_shares_its_sandboxs_ipc_and_uts_namespaces() {
    if !require_root() {
        return;
    }
    let agent = Agent::start();
    let c = agent.client();
    let show = "readlink /proc/self/ns/ipc; readlink /proc/self/ns/uts; readlink /proc/self/ns/mnt; hostname";
    // Not yet started: nothing to share.
    create(&c, &agent, "sandbox", ImageConfig { hostname: "pod-host".into(), ..cmd(&["sleep", "1000"]) });
    create(&c, &agent, "member", ImageConfig { hostname: "ignored".into(), share_ipc_uts_with: Some("sandbox".into()), ..cmd(&["sh", "-c", show]) });
    let e = c.start("member", StdioMode::Null).unwrap_err();
    assert!(e.to_string().contains("has no running process"), "{e}");
    let _sandbox = c.start("sandbox", StdioMode::Null).unwrap();
    let out = c.exec("sandbox", "s1", &exec_args(&["sh", "-c", show]), StdioMode::Piped { stdin: false }).unwrap().output(LIMIT).unwrap();
    let sandbox_ns = String::from_utf8_lossy(&out.stdout).into_owned();
    // Held first (OCI create), as a pod's containers are: it waits in the
    // agent's address space, cloned by a thread that entered the
    // sandbox's namespaces for it.
    let agent_pid = agent.child.id() as i32;
    let held = c.prepare("member", StdioMode::Piped { stdin: false }).unwrap();
    assert!(same_memory(agent_pid, held.pid as i32), "a copy of the agent's memory");
    assert_eq!(c.release("member").unwrap(), held.pid);
    let out = held.output(LIMIT).unwrap();
    assert_eq!(out.exit_code, 0, "{}", String::from_utf8_lossy(&out.stderr));
    let member_ns = String::from_utf8_lossy(&out.stdout).into_owned();
    let (s, m): (Vec<&str>, Vec<&str>) = (sandbox_ns.lines().collect(), member_ns.lines().collect());
    assert_eq!(s.len(), 4, "{sandbox_ns}");
    assert_eq!(m.len(), 4, "{member_ns}");
    assert_eq!((m[0], m[1], m[3]), (s[0], s[1], "pod-host"), "IPC, UTS and the host name are the sandbox's");
    assert_ne!(m[2], s[2], "its own mount namespace");
    // The agent is back in its own namespaces.
    let own = |k: &str| std::fs::read_link(format!("/proc/{}/ns/{k}", agent.child.id())).unwrap().to_string_lossy().into_owned();
    assert_ne!(own("ipc"), s[0]);
    assert_ne!(own("uts"), s[1]);
    let sandbox_pid_ns = s_pid(&c);
    assert_ne!(own("pid"), sandbox_pid_ns, "the agent's PID namespace is not the sandbox's");
    // Sharing the PID namespace too (shareProcessNamespace): the member
    // sees the sandbox's first process as PID 1 and is not PID 1 itself;
    // the agent returns to its own PID namespace.
    let show_pid = "readlink /proc/self/ns/pid; echo $$; tr '\\0' ' ' < /proc/1/cmdline";
    let config = ImageConfig { share_ipc_uts_with: Some("sandbox".into()), share_pid: true, ..cmd(&["sh", "-c", show_pid]) };
    create(&c, &agent, "pid-member", config);
    // Held, it would be seen by the sandbox's processes: it waits in a
    // copy of the agent's memory, not in the agent's own.
    let held = c.prepare("pid-member", StdioMode::Piped { stdin: false }).unwrap();
    assert!(!same_memory(agent_pid, held.pid as i32), "the agent's own memory");
    assert_eq!(c.release("pid-member").unwrap(), held.pid);
    let out = held.output(LIMIT).unwrap();
    assert_eq!(out.exit_code, 0, "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    assert_eq!(lines[0], sandbox_pid_ns, "the sandbox's PID namespace");
    assert_ne!(lines[1], "1", "not PID 1 in a shared namespace");
    assert!(lines[2].starts_with("sleep 1000"), "PID 1 is the sandbox's: {text}");
    assert_ne!(own("pid"), lines[0], "the agent is back in its own PID namespace");
    c.remove_container("pid-member", false).unwrap();
    c.remove_container("member", false).unwrap();
    c.remove_container("sandbox", true).unwrap();
}

/// The PID namespace of container `sandbox`'s processes, as an exec there
/// reads it.
fn s_pid(c: &Client) -> String {
    let out = c.exec("sandbox", "pid-ns", &exec_args(&["sh", "-c", "readlink /proc/self/ns/pid"]), StdioMode::Piped { stdin: false });
    String::from_utf8_lossy(&out.unwrap().output(LIMIT).unwrap().stdout).trim().to_string()
}

/// Whether processes `a` and `b` share one address space (`kcmp`).
fn same_memory(a: i32, b: i32) -> bool {
    const KCMP_VM: libc::c_long = 1;
    // SAFETY: kcmp compares two processes' kernel objects; no memory is
    // passed.
    match unsafe { libc::syscall(libc::SYS_kcmp, a, b, KCMP_VM, 0, 0) } {
        0 => true,
        r if r > 0 => false,
        _ => panic!("kcmp({a}, {b}): {}", std::io::Error::last_os_error()),
    }
}

/// The agent's threads that wait for a held process's exec.
fn waiting_threads(agent: i32) -> usize {
    std::fs::read_dir(format!("/proc/{agent}/task"))
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|comm| comm.trim() == "held-clone")
        .count()
}

#[test]
fn a_held_process_runs_its_program_only_once_released() {
    if !require_root() {
        return;
    }
    let agent = Agent::start();
    let c = agent.client();
    create(&c, &agent, "held", cmd(&["sh", "-c", "echo ran; cat /marker; exit 4"]));
    let p = c.prepare("held", StdioMode::Piped { stdin: false }).unwrap();
    assert!(p.pid > 0);
    // Set up and waiting: still the agent's program, in its own mount
    // namespace, with the container's root.
    let exe = std::fs::read_link(format!("/proc/{}/exe", p.pid)).unwrap();
    let agent_exe = std::fs::read_link("/proc/self/exe").unwrap();
    assert_ne!(exe.file_name(), Some(std::ffi::OsStr::new("busybox")), "{exe:?}");
    let marker = std::fs::read_to_string(format!("/proc/{}/root/marker", p.pid)).unwrap();
    assert_eq!(marker, "from the image\n", "not in the container's root");
    assert_ne!(
        std::fs::read_link(format!("/proc/{}/ns/mnt", p.pid)).unwrap(),
        std::fs::read_link("/proc/self/ns/mnt").unwrap(),
        "{agent_exe:?}"
    );
    std::thread::sleep(Duration::from_millis(200));
    assert!(std::fs::metadata(format!("/proc/{}", p.pid)).is_ok(), "the held process ended");
    // It keeps none of the agent's descriptors (its sockets above all):
    // its standard streams, its error pipe and its gate.
    let fds = std::fs::read_dir(format!("/proc/{}/fd", p.pid)).unwrap().count();
    assert_eq!(fds, 5, "the held process's descriptors");
    // It waits in the agent's own address space (its exec then tears
    // down no copy of it), and a thread of the agent waits for the exec.
    let agent_pid = agent.child.id() as i32;
    assert!(same_memory(agent_pid, p.pid as i32), "the held process has a copy of the agent's memory");
    assert_eq!(waiting_threads(agent_pid), 1);
    // Released: it runs, and its output is the program's alone.
    assert_eq!(c.release("held").unwrap(), p.pid);
    let out = p.output(LIMIT).unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "ran\nfrom the image\n");
    assert_eq!(out.exit_code, 4);
    let deadline = Instant::now() + Duration::from_secs(20);
    while waiting_threads(agent_pid) != 0 {
        assert!(Instant::now() < deadline, "the thread that waited for the exec did not end");
        std::thread::sleep(Duration::from_millis(20));
    }
    // That thread ends with the process, not at its exec (its end would
    // be work on the release's path).
    create(&c, &agent, "long", cmd(&["sleep", "1000"]));
    let l = c.prepare("long", StdioMode::Null).unwrap();
    assert_eq!(waiting_threads(agent_pid), 1);
    assert_eq!(c.release("long").unwrap(), l.pid);
    let deadline = Instant::now() + Duration::from_secs(20);
    while same_memory(agent_pid, l.pid as i32) {
        assert!(Instant::now() < deadline, "the released process never exec'd");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(waiting_threads(agent_pid), 1, "the thread ended while the process runs");
    c.remove_container("long", true).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while waiting_threads(agent_pid) != 0 {
        assert!(Instant::now() < deadline, "the thread did not end with the process");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Once only; and never for a container that was not held.
    let again = c.release("held").unwrap_err();
    assert!(matches!(&again, Error::Agent(e) if e.kind == ErrorKind::InvalidState), "{again}");
    create(&c, &agent, "plain", cmd(&["true"]));
    let not_held = c.release("plain").unwrap_err();
    assert!(matches!(&not_held, Error::Agent(e) if e.kind == ErrorKind::InvalidState), "{not_held}");

    // A setup that fails fails the prepare (OCI create), naming the step.
    let mut bad = cmd(&["true"]);
    bad.mounts = vec![vmrun_agent_protocol::Mount {
        destination: "/x".into(),
        fstype: "no-such-fs".into(),
        source: "none".into(),
        options: Vec::new(),
    }];
    create(&c, &agent, "bad", bad);
    let err = c.prepare("bad", StdioMode::Null).unwrap_err();
    assert_eq!(err.exit_code(), Some(126), "{err}");
    assert!(err.to_string().contains("mount no-such-fs on /x"), "{err}");

    // A held process removed with force is killed.
    create(&c, &agent, "gone", cmd(&["true"]));
    let g = c.prepare("gone", StdioMode::Null).unwrap();
    c.remove_container("gone", true).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::fs::metadata(format!("/proc/{}", g.pid)).is_ok() {
        assert!(Instant::now() < deadline, "the held process outlived its container");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_held_process_is_released_with_overrides_on_another_connection_or_discarded() {
    if !require_root() {
        return;
    }
    let agent = Agent::start();
    let first = agent.client();
    create(&first, &agent, "tmpl", cmd(&["sh", "-c", "echo default"]));
    let held = first.prepare("tmpl", StdioMode::Piped { stdin: false }).unwrap();
    // The connection that prepared it goes (as a template's does once
    // snapshotted); a new one releases it with the run's overrides.
    drop(held);
    first.close();
    let c = agent.client();
    let overrides = ExecProcess {
        args: names(&["sh", "-c", "echo $X; pwd; id -u; id -g"]),
        env: names(&["X=over"]),
        working_dir: Some("/made/here".into()),
        user: Some("1000:1001".into()),
        ..Default::default()
    };
    // Only pipes without input can take the held process's output.
    let e = c.release_with("tmpl", Some(&overrides), StdioMode::Piped { stdin: true }).unwrap_err();
    assert!(matches!(&e, Error::Agent(a) if a.kind == ErrorKind::BadRequest), "{e}");
    let mounts = ExecProcess {
        mounts: vec![vmrun_agent_protocol::Mount { destination: "/m".into(), fstype: "tmpfs".into(), source: "tmpfs".into(), options: Vec::new() }],
        ..overrides.clone()
    };
    let e = c.release_with("tmpl", Some(&mounts), StdioMode::Piped { stdin: false }).unwrap_err();
    assert!(matches!(&e, Error::Agent(a) if a.kind == ErrorKind::BadRequest), "{e}");
    let out = c.release_with("tmpl", Some(&overrides), StdioMode::Piped { stdin: false }).unwrap().output(LIMIT).unwrap();
    assert_eq!((String::from_utf8_lossy(&out.stdout).as_ref(), out.exit_code), ("over\n/made/here\n1000\n1001\n", 0));

    // A plain start (a run that cannot use the held process, one with a
    // terminal or input) starts afresh: the held one is killed.
    create(&c, &agent, "fresh", cmd(&["sh", "-c", "echo default"]));
    let h = c.prepare("fresh", StdioMode::Piped { stdin: false }).unwrap();
    let p = c.start("fresh", StdioMode::Piped { stdin: false }).unwrap();
    assert_ne!(p.pid, h.pid);
    let out = p.output(LIMIT).unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "default\n");
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::fs::metadata(format!("/proc/{}", h.pid)).is_ok() {
        assert!(Instant::now() < deadline, "the discarded held process lives on");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The held process drops its bounding set to the planned one (docker's
    // default) before it waits, not at its release: a release may narrow
    // it, and one that would widen it is refused, the process still held.
    create(&c, &agent, "bounded", cmd(&["cat", "/proc/self/status"]));
    let h = c.prepare("bounded", StdioMode::Piped { stdin: false }).unwrap();
    let status = std::fs::read_to_string(format!("/proc/{}/status", h.pid)).unwrap();
    assert_eq!(status.lines().find_map(|l| l.strip_prefix("CapBnd:")).map(str::trim), Some("00000000a80425fb"), "{status}");
    let wider = ExecProcess {
        capabilities: Some(Capabilities { bounding: names(&["CAP_SYS_ADMIN"]), ..Default::default() }),
        ..Default::default()
    };
    let e = c.release_with("bounded", Some(&wider), StdioMode::Piped { stdin: false }).unwrap_err();
    assert!(matches!(&e, Error::Agent(a) if a.kind == ErrorKind::BadRequest && a.message.contains("bounding set")), "{e}");
    let narrower = kill_only(ExecProcess::default());
    let out = c.release_with("bounded", Some(&narrower), StdioMode::Piped { stdin: false }).unwrap().output(LIMIT).unwrap();
    assert_eq!(privileges(&out), KILL_ONLY);

    // A bad release blob never reaches a child: the agent refuses what it
    // cannot encode.
    create(&c, &agent, "big", cmd(&["true"]));
    let _h = c.prepare("big", StdioMode::Piped { stdin: false }).unwrap();
    let huge = ExecProcess { args: vec!["x".repeat(300 * 1024)], ..Default::default() };
    let e = c.release_with("big", Some(&huge), StdioMode::Piped { stdin: false }).unwrap_err();
    assert!(e.to_string().contains("too large"), "{e}");
}

/// A container with a user namespace of its own: its ids are the map's
/// (root inside, 100000 outside), its `/dev` (the standard nodes and the
/// spec's, owned as the map says) and `/proc` work, `/sys` is the
/// guest's read-only, an rlimit holds, an exec'd process joins the same
/// namespace, and maps the kernel would refuse are refused first.
#[test]
fn a_user_namespace_maps_ids_and_keeps_the_standard_mounts() {
    if !require_root() {
        return;
    }
    let agent = Agent::start();
    let c = agent.client();
    let map = || vec![vmrun_agent_protocol::IdMapping { container_id: 0, host_id: 100000, size: 65536 }];
    let dev = |path: &str, major, minor, mode, uid, gid| vmrun_agent_protocol::Device {
        path: path.into(),
        kind: vmrun_agent_protocol::DeviceKind::Char,
        major,
        minor,
        file_mode: mode,
        uid,
        gid,
    };
    let script = "echo uid_map: $(cat /proc/self/uid_map); echo gid_map: $(cat /proc/self/gid_map); \
                  echo id: $(id -u):$(id -g); echo dev: $(stat -c '%u:%g %a' /dev); \
                  echo null: $(echo x > /dev/null && echo ok) $(stat -c '%t:%T' /dev/null); \
                  echo mynull: $(stat -c '%F %t:%T %a %u:%g' /dev/mynull) $(head -c 1 /dev/mynull | wc -c); \
                  echo tun: $(stat -c '%F %t:%T' /dev/net/tun); \
                  echo sys: $(ls /sys | grep -c class) $(touch /sys/x 2>&1 | grep -o 'Read-only file system'); \
                  echo marker: $(stat -c %u /marker); echo pid1: $(cat /proc/1/comm); \
                  echo nofile: $(ulimit -n); echo mknod: $(mknod /tmp/n c 1 3 2>&1 | grep -o 'not permitted')";
    let config = ImageConfig {
        cmd: vec!["sh".into(), "-c".into(), script.into()],
        user: "0:0".into(),
        uid_mappings: map(),
        gid_mappings: map(),
        devices: vec![dev("/dev/mynull", 1, 3, Some(0o640), Some(1000), Some(10)), dev("/dev/net/tun", 10, 200, None, None, None)],
        rlimits: vec![vmrun_agent_protocol::Rlimit { resource: "RLIMIT_NOFILE".into(), soft: 123, hard: 456 }],
        ..Default::default()
    };
    // Mount points in the image: the container's root (100000 in the guest)
    // may not make them in a root the guest's root owns (as with runc).
    let layer = {
        let mut l = applets(&["stat", "touch", "grep", "mkdir", "mknod"]);
        l.dir("proc", 0o755).dir("dev", 0o755).dir("sys", 0o755).dir("tmp", 0o1777);
        l.finish()
    };
    let text = run_to_end(&c, &agent, "userns", vec![layer.clone()], config.clone());
    assert_eq!(line(&text, "uid_map"), "0 100000 65536", "{text}");
    assert_eq!(line(&text, "gid_map"), "0 100000 65536");
    assert_eq!(line(&text, "id"), "0:0");
    assert_eq!(line(&text, "dev"), "0:0 755", "the container's root owns its /dev");
    assert_eq!(line(&text, "null"), "ok 1:3");
    assert_eq!(line(&text, "mynull"), "character special file 1:3 640 1000:10 0");
    assert_eq!(line(&text, "tun"), "character special file a:c8");
    assert_eq!(line(&text, "sys"), "1 Read-only file system", "the guest's /sys, read-only");
    assert_eq!(line(&text, "marker"), "65534", "the guest's root is no one inside");
    assert_eq!(line(&text, "pid1"), "sh", "its own PID namespace and /proc");
    assert_eq!(line(&text, "nofile"), "123");
    assert_eq!(line(&text, "mknod"), "not permitted", "no device nodes of its own");

    // An exec'd process joins the namespace; seen from outside, its uid is
    // the map's.
    let (disk, layers) = test_image_plus(agent.dir.path(), vec![layer]);
    let mut long = config;
    long.cmd = vec!["sleep".into(), "100".into()];
    let spec = CreateContainer { id: "userns-long".into(), layers: LayerSource { disk: disk.display().to_string(), layers }, rootfs: Default::default(), config: long, limits: UnpackLimits::default() };
    c.create_container(&spec).unwrap();
    let init = c.start("userns-long", StdioMode::Piped { stdin: false }).unwrap();
    let status = std::fs::read_to_string(format!("/proc/{}/status", init.pid)).unwrap();
    assert!(status.lines().any(|l| l.starts_with("Uid:\t100000\t")), "{status}");
    let mut e = exec_args(&["sh", "-c", "cat /proc/self/uid_map; id -u"]);
    e.user = Some("1000:1000".into());
    let out = c.exec("userns-long", "e1", &e, StdioMode::Piped { stdin: false }).unwrap().output(LIMIT).unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).split_whitespace().collect::<Vec<_>>(), ["0", "100000", "65536", "1000"]);
    c.remove_container("userns-long", true).unwrap();

    // Maps the kernel would refuse, or without the container's root.
    let m = |container_id, host_id, size| vmrun_agent_protocol::IdMapping { container_id, host_id, size };
    for (uids, gids, want) in [
        (vec![m(1, 100000, 10)], map(), "does not map the container's root"),
        (map(), vec![], "the gid map: the map is empty"),
        (vec![m(0, 100000, 10), m(5, 0, 1)], map(), "overlap"),
    ] {
        let (disk, layers) = test_image(agent.dir.path());
        let config = ImageConfig { cmd: vec!["true".into()], uid_mappings: uids, gid_mappings: gids, ..Default::default() };
        let spec = CreateContainer { id: "bad-map".into(), layers: LayerSource { disk: disk.display().to_string(), layers }, rootfs: Default::default(), config, limits: UnpackLimits::default() };
        let e = c.create_container(&spec).unwrap_err();
        assert!(matches!(&e, Error::Agent(a) if a.kind == ErrorKind::BadRequest && a.message.contains(want)), "{want}: {e}");
    }
}
