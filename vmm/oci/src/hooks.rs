//! The spec's hooks (`hooks` in `config.json`), run on the host with the
//! container's state JSON on their standard input, `args` (argv, its first
//! element the program's name), `env` (the whole environment) and
//! `timeout` (seconds; the hook is killed and fails after it).
//!
//! Where each kind runs:
//!
//! - `prestart` and `createRuntime`: by the supervisor during `create`,
//!   once the VM runs and the guest has created the container (status
//!   `creating`); one that fails fails the `create`, which stops the VM and
//!   removes everything it made.
//! - `createContainer`: right after them, on the host as well: its path
//!   resolves in the runtime's namespace (as the spec says), but it does not
//!   run in the container's namespaces, which are in the guest's kernel.
//! - `startContainer`: not run (a warning): its path resolves in the
//!   container, inside the VM, where the agent runs nothing before the
//!   process.
//! - `poststart`: by `start`, once the process runs, before `start`
//!   returns; a failure is logged.
//! - `poststop`: by `delete`, once the container's processes are gone and
//!   its state removed, before `delete` returns; a failure is logged.

use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use vmrun_runtime::watch::Waiter;

/// One hook, as the spec gives it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hook {
    /// The executable (absolute, on the host).
    pub path: PathBuf,
    /// argv (`args[0]` is the name the program sees); empty: the path.
    pub args: Vec<String>,
    /// The environment (`NAME=value`); nothing else is inherited.
    pub env: Vec<String>,
    /// Seconds it may run.
    pub timeout: Option<u32>,
}

/// The hooks of a container, by kind.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hooks {
    /// `prestart` (deprecated; run with `createRuntime`).
    #[serde(default)]
    pub prestart: Vec<Hook>,
    /// `createRuntime`.
    #[serde(default)]
    pub create_runtime: Vec<Hook>,
    /// `createContainer` (run on the host).
    #[serde(default)]
    pub create_container: Vec<Hook>,
    /// `poststart`.
    #[serde(default)]
    pub poststart: Vec<Hook>,
    /// `poststop`.
    #[serde(default)]
    pub poststop: Vec<Hook>,
}

/// Why a hook failed.
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    /// It could not be started.
    #[error("{kind} hook {path}: cannot run it: {source}")]
    Spawn {
        /// The kind.
        kind: &'static str,
        /// The executable.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// It ended with a failure.
    #[error("{kind} hook {path} failed ({status}){output}")]
    Failed {
        /// The kind.
        kind: &'static str,
        /// The executable.
        path: String,
        /// Its exit status.
        status: std::process::ExitStatus,
        /// The end of what it printed, prefixed with ": ".
        output: String,
    },
    /// It ran past its timeout and was killed.
    #[error("{kind} hook {path} timed out after {secs} s")]
    TimedOut {
        /// The kind.
        kind: &'static str,
        /// The executable.
        path: String,
        /// The timeout.
        secs: u32,
    },
}

/// The spec's hooks as this runtime runs them; `startContainer` hooks are
/// reported and dropped.
pub fn from_spec(h: &oci_spec::runtime::Hooks) -> Hooks {
    let list = |v: &Option<Vec<oci_spec::runtime::Hook>>| -> Vec<Hook> {
        v.iter()
            .flatten()
            .map(|h| Hook {
                path: h.path().clone(),
                args: h.args().clone().unwrap_or_default(),
                env: h.env().clone().unwrap_or_default(),
                timeout: h.timeout().and_then(|t| u32::try_from(t).ok()).filter(|t| *t > 0),
            })
            .collect()
    };
    if h.start_container().as_ref().is_some_and(|v| !v.is_empty()) {
        log::warn!(
            "hooks.startContainer are not run: their paths are in the container, inside the VM, where nothing runs before the process"
        );
    }
    #[allow(deprecated)] // prestart: deprecated in the spec, still used
    let prestart = list(h.prestart());
    Hooks {
        prestart,
        create_runtime: list(h.create_runtime()),
        create_container: list(h.create_container()),
        poststart: list(h.poststart()),
        poststop: list(h.poststop()),
    }
}

/// Runs `hooks` of `kind` in order with `state` (the state JSON) on their
/// standard input; stops at the first that fails.
pub fn run(kind: &'static str, hooks: &[Hook], state: &serde_json::Value) -> Result<(), HookError> {
    let input = state.to_string();
    for h in hooks {
        run_one(kind, h, input.as_bytes())?;
        log::debug!("{kind} hook {} ran", h.path.display());
    }
    Ok(())
}

/// Runs `hooks` of `kind` whose failure does not change the lifecycle
/// (`poststart`, `poststop`): each runs, a failure is logged as a warning.
pub fn run_logged(kind: &'static str, hooks: &[Hook], state: &serde_json::Value) {
    let input = state.to_string();
    for h in hooks {
        if let Err(e) = run_one(kind, h, input.as_bytes()) {
            log::warn!("{e}");
        }
    }
}

/// The last bytes of a hook's output, for its error message.
fn tail(out: &[u8]) -> String {
    let text = String::from_utf8_lossy(&out[out.len().saturating_sub(400)..]);
    let text = text.trim();
    if text.is_empty() {
        String::new()
    } else {
        format!(": {text}")
    }
}

fn run_one(kind: &'static str, h: &Hook, input: &[u8]) -> Result<(), HookError> {
    let path = h.path.display().to_string();
    let mut cmd = Command::new(&h.path);
    if let Some((arg0, rest)) = h.args.split_first() {
        cmd.arg0(arg0).args(rest);
    }
    cmd.env_clear();
    for e in &h.env {
        match e.split_once('=') {
            Some((k, v)) if !k.is_empty() => cmd.env(k, v),
            _ => cmd.env(e, ""),
        };
    }
    vmrun_runtime::vm::no_inherited_fds(&mut cmd);
    cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|source| HookError::Spawn { kind, path: path.clone(), source })?;
    // The state is small (a pipe holds it); a hook that does not read it
    // closes the pipe (EPIPE is no failure).
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(input);
    }
    // Both streams are read to their ends (a full pipe would stall the
    // hook); their ends come with the hook's.
    let readers: Vec<_> = [child.stdout.take().map(|s| Box::new(s) as Box<dyn Read + Send>), child.stderr.take().map(|s| Box::new(s) as _)]
        .into_iter()
        .flatten()
        .map(|mut s| {
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                let _ = s.read_to_end(&mut buf);
                buf
            })
        })
        .collect();
    let deadline = h.timeout.map(|t| Instant::now() + Duration::from_secs(t.into()));
    let mut waiter = Waiter::new();
    waiter.child(child.id());
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break Some(s),
            Ok(None) => {}
            Err(_) => break None,
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            let _ = child.kill();
            let _ = child.wait();
            return Err(HookError::TimedOut { kind, path, secs: h.timeout.unwrap_or_default() });
        }
        waiter.wait(deadline);
    };
    let status = match status {
        Some(s) => s,
        None => child.wait().map_err(|source| HookError::Spawn { kind, path: path.clone(), source })?,
    };
    let output: Vec<u8> = readers.into_iter().flat_map(|r| r.join().unwrap_or_default()).collect();
    if status.success() {
        return Ok(());
    }
    Err(HookError::Failed { kind, path, status, output: tail(&output) })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn sh(script: &str, timeout: Option<u32>) -> Hook {
        Hook { path: "/bin/sh".into(), args: vec!["sh".into(), "-c".into(), script.into()], env: vec!["WHO=hook".into()], timeout }
    }

    #[test]
    fn hooks_get_the_state_args_and_env() {
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("out");
        let script = format!("read -r line; echo \"$0 $WHO ${{HOME:-nohome}} $line\" >> {}", out.display());
        let state = serde_json::json!({ "id": "c1", "status": "creating" });
        run("createRuntime", &[sh(&script, None), sh(&script, Some(5))], &state).unwrap();
        let text = std::fs::read_to_string(&out).unwrap();
        let want = format!("sh hook nohome {state}\n");
        assert_eq!(text, want.repeat(2));
    }

    #[test]
    fn failures_and_timeouts_are_errors_and_stop_the_list() {
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("out");
        let state = serde_json::json!({});
        let after = sh(&format!("touch {}", out.display()), None);
        let e = run("prestart", &[sh("echo why >&2; exit 3", None), after.clone()], &state).unwrap_err();
        assert!(e.to_string().contains("exit status: 3") && e.to_string().ends_with(": why"), "{e}");
        assert!(!out.exists(), "the hooks after a failed one do not run");
        let t = Instant::now();
        let e = run("createRuntime", &[sh("sleep 30", Some(1))], &state).unwrap_err();
        assert!(matches!(e, HookError::TimedOut { secs: 1, .. }), "{e}");
        assert!(t.elapsed() < Duration::from_secs(10));
        let missing = Hook { path: d.path().join("nope"), args: Vec::new(), env: Vec::new(), timeout: None };
        assert!(matches!(run("prestart", std::slice::from_ref(&missing), &state), Err(HookError::Spawn { .. })));
        run_logged("poststop", &[missing, after], &state);
        assert!(out.exists(), "a failed poststop hook does not stop the others");
    }
}
