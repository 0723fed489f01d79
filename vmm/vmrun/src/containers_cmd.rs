//! `vmrun ps`, `logs`, `exec`, `stop`, `kill` and `rm`: the containers in
//! `$VMRUN_HOME/containers/`, found by name, id or id prefix.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use vmrun_agent_client::Client;
use vmrun_agent_protocol::ExecProcess;
use vmrun_runtime::container::{self, LogReader, ProcessRef, State, Status, Stream};
use vmrun_runtime::home::Home;
use vmrun_runtime::watch::{self, Waiter};

use crate::attach::{self, Signals, Sink};
use crate::run_cmd::ProcessFlags;

/// `vmrun ps`.
pub fn ps(all: bool, quiet: bool) -> Result<i32> {
    let home = Home::from_env()?;
    let now = container::now();
    let rows: Vec<State> = container::list(&home)?
        .into_iter()
        .map(|(_, s)| s)
        .filter(|s| all || s.effective_status() != Status::Exited)
        .collect();
    if quiet {
        for s in rows {
            println!("{}", s.id);
        }
        return Ok(0);
    }
    let table: Vec<[String; 7]> = rows
        .iter()
        .map(|s| {
            let mut command = s.command.clone();
            if command.chars().count() > 30 {
                command = command.chars().take(29).collect::<String>() + "…";
            }
            let ports = match &s.ip {
                Some(ip) if !s.ports.is_empty() => format!("{ip} {}", s.ports.join(",")),
                Some(ip) => ip.clone(),
                None => String::new(),
            };
            [s.id.clone(), s.image.clone(), format!("\"{command}\""), format!("{} ago", ago(now, s.created)), s.describe(now), ports, s.name.clone()]
        })
        .collect();
    let header = ["CONTAINER ID", "IMAGE", "COMMAND", "CREATED", "STATUS", "PORTS", "NAMES"].map(String::from);
    let mut widths = header.clone().map(|h| h.chars().count());
    for r in &table {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    for r in std::iter::once(&header).chain(&table) {
        let line: Vec<String> = r.iter().zip(widths).map(|(c, w)| format!("{c:<w$}")).collect();
        println!("{}", line.join("   ").trim_end());
    }
    Ok(0)
}

fn ago(now: u64, then: u64) -> String {
    let s = State { created: then, status: Status::Running, owner: ProcessRef::current(), ..State::new("", "", "", "") };
    // `describe` of a running container says "Up <duration>".
    s.describe(now).trim_start_matches("Up ").to_string()
}

/// `vmrun logs [-f] CONTAINER`.
pub fn logs(key: &str, follow: bool) -> Result<i32> {
    let home = Home::from_env()?;
    let (dir, _) = container::find(&home, key)?;
    let path = dir.join(container::LOG_FILE);
    let mut reader = match LogReader::open(&path) {
        Ok(r) => r,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("container {key} has no log (only detached containers, run with -d, keep one)")
        }
        Err(e) => return Err(e.into()),
    };
    let (mut out, mut err) = (std::io::stdout(), std::io::stderr());
    // Set up before the first read, so that output written or a state
    // saved after a look at them wakes the wait that follows.
    let mut waiter = Waiter::new();
    if follow {
        waiter.watch(&path, watch::FILE_GROWS).watch_dir(&dir);
    }
    loop {
        while let Some(rec) = reader.next_record()? {
            let w: &mut dyn std::io::Write = if rec.stream == Stream::Stdout { &mut out } else { &mut err };
            if w.write_all(&rec.data).and_then(|()| w.flush()).is_err() {
                return Ok(0); // the reader went away (e.g. `| head`)
            }
        }
        if !follow {
            return Ok(0);
        }
        // Ended (or removed): drain what is left, then stop.
        let state = State::load(&dir).ok();
        let running = state.as_ref().is_some_and(|s| s.effective_status() != Status::Exited);
        if !running {
            while let Some(rec) = reader.next_record()? {
                let w: &mut dyn std::io::Write = if rec.stream == Stream::Stdout { &mut out } else { &mut err };
                let _ = w.write_all(&rec.data);
            }
            return Ok(0);
        }
        // Its owner dying without a word ends it too.
        if let Some(owner) = state.and_then(|s| s.owner) {
            waiter.process(owner);
        }
        waiter.wait(None);
    }
}

/// `vmrun exec`'s flags.
#[derive(Args, Debug)]
#[command(trailing_var_arg = true)]
pub struct ExecArgs {
    #[command(flatten)]
    pub process: ProcessFlags,
    /// The container.
    pub container: String,
    /// The command and its arguments.
    #[arg(required = true)]
    pub command: Vec<String>,
}

/// A running container's agent.
fn connect(key: &str) -> Result<(State, Client)> {
    let home = Home::from_env()?;
    let (dir, state) = container::find(&home, key)?;
    if state.effective_status() != Status::Running {
        bail!("container {} is not running", state.name);
    }
    // The same patience as `vmrun run`: a process starts slowly where many
    // guests with emulated kernels share the CPUs.
    let client = vmrun_runtime::sandbox::reach(&state, &dir, crate::run_cmd::agent_options())
        .with_context(|| format!("cannot reach the agent of container {}", state.name))?;
    Ok((state, client))
}

/// `vmrun exec`: returns the process's exit code.
pub fn exec(args: ExecArgs) -> Result<i32> {
    let signals = Signals::start(None);
    let (state, client) = connect(&args.container)?;
    let exec_id = format!("exec-{}", container::new_id());
    let process = ExecProcess {
        args: args.command.clone(),
        env: args.process.env.iter().map(|e| crate::run_cmd::expand_env(e)).collect(),
        working_dir: args.process.workdir.clone(),
        user: args.process.user.clone(),
        mounts: Vec::new(),
        ..Default::default()
    };
    let tty = args.process.tty && attach::is_tty(libc::STDIN_FILENO);
    let mut p = match client.exec(&state.guest_id, &exec_id, &process, attach::stdio_mode(tty, args.process.interactive)) {
        Ok(p) => p,
        Err(e) => {
            if let Some(code) = e.exit_code() {
                eprintln!("vmrun: {e}");
                return Ok(code);
            }
            return Err(e.into());
        }
    };
    signals.forward_to(client.clone(), state.guest_id.clone(), Some(exec_id), tty);
    let code = attach::pump(&mut p, &Sink::Terminal, args.process.interactive || tty, tty)?;
    client.close();
    Ok(code)
}

/// A signal by name (`KILL`, `SIGKILL`) or number.
pub fn parse_signal(s: &str) -> Result<i32> {
    Ok(vmrun_runtime::signal::parse(s)?)
}

/// `vmrun kill [-s SIGNAL] CONTAINER...`.
pub fn kill(keys: &[String], signal: &str) -> Result<i32> {
    let sig = parse_signal(signal)?;
    each(keys, |key| {
        let (state, client) = connect(key)?;
        client.signal(&state.guest_id, None, sig)?;
        client.close();
        Ok(())
    })
}

/// Runs `f` on each container; prints the names it worked on, and an error
/// line for each it did not; exit code 1 if any failed.
fn each(keys: &[String], mut f: impl FnMut(&str) -> Result<()>) -> Result<i32> {
    let mut code = 0;
    for k in keys {
        match f(k) {
            Ok(()) => println!("{k}"),
            Err(e) => {
                eprintln!("vmrun: error: {e:#}");
                code = 1;
            }
        }
    }
    Ok(code)
}

/// Waits until the container is no longer running, up to `timeout`: its
/// state changing or its owner ending wakes the wait.
fn wait_exited(dir: &Path, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    let mut waiter = Waiter::new();
    waiter.watch_dir(dir);
    loop {
        match State::load(dir) {
            Ok(s) if s.effective_status() != Status::Exited => {
                if let Some(owner) = s.owner {
                    waiter.process(owner);
                }
            }
            _ => return true, // exited, or removed (auto-remove)
        }
        if Instant::now() >= deadline {
            return false;
        }
        waiter.wait(Some(deadline));
    }
}

/// `vmrun stop [-t SECONDS] CONTAINER...`: SIGTERM, then SIGKILL after the
/// grace period, then the VM itself if it still runs.
pub fn stop(keys: &[String], grace: u64) -> Result<i32> {
    let home = Home::from_env()?;
    each(keys, |key| {
        let (dir, state) = container::find(&home, key)?;
        if state.effective_status() == Status::Exited {
            return Ok(());
        }
        if let Ok((s, client)) = connect(key) {
            let _ = client.signal(&s.guest_id, None, libc::SIGTERM);
            if !wait_exited(&dir, Duration::from_secs(grace)) {
                let _ = client.signal(&s.guest_id, None, libc::SIGKILL);
            }
            client.close();
        }
        if !wait_exited(&dir, Duration::from_secs(10)) {
            kill_processes(&state);
            wait_exited(&dir, Duration::from_secs(10));
        }
        Ok(())
    })
}

/// Kills a container's VMM and owner with SIGKILL and waits until they are
/// gone.
fn kill_processes(state: &State) {
    for p in [state.vmm, state.owner].into_iter().flatten() {
        if p.alive() {
            // SAFETY: kill of a process we identified by pid and start time.
            unsafe { libc::kill(p.pid as i32, libc::SIGKILL) };
        }
    }
    let procs: Vec<ProcessRef> = [state.vmm, state.owner].into_iter().flatten().collect();
    watch::wait_gone(&procs, Instant::now() + Duration::from_secs(10));
    if let Some(vmm) = state.vmm {
        vmrun_runtime::vm::collect_jail(vmm.pid);
    }
}

/// `vmrun rm [-f] CONTAINER...`: removes exited containers (running ones
/// too with `-f`, after killing their VM): directory, disks, sockets, TAP
/// device.
pub fn rm(keys: &[String], force: bool) -> Result<i32> {
    let home = Home::from_env()?;
    each(keys, |key| {
        let (dir, state) = container::find(&home, key)?;
        if state.effective_status() != Status::Exited {
            if !force {
                bail!("container {} is running: stop it first, or use rm -f", state.name);
            }
            kill_processes(&state);
        } else {
            // An owner that is gone may have left its VMM behind.
            kill_processes(&state);
        }
        let state = State::load(&dir).unwrap_or(state);
        if let Some(tap) = &state.tap {
            vmrun_runtime::net::release(tap);
        }
        crate::run_cmd::remove_container_dir(&dir);
        if dir.exists() {
            bail!("cannot remove {}", dir.display());
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_by_name_and_number() {
        assert_eq!(parse_signal("KILL").unwrap(), 9);
        assert_eq!(parse_signal("sigterm").unwrap(), 15);
        assert_eq!(parse_signal("SIGUSR1").unwrap(), libc::SIGUSR1);
        assert_eq!(parse_signal("2").unwrap(), 2);
        assert!(parse_signal("0").is_err() && parse_signal("NOPE").is_err() && parse_signal("65").is_err());
    }
}
