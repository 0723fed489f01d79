//! `containerd-shim-vmrun-v2`: containerd's own runc shim
//! (`containerd-shim-runc-v2`) with `vmrun-oci` as its `runc`.
//!
//! containerd runs the shim of a runtime named `io.containerd.vmrun.v2` as
//! `containerd-shim-vmrun-v2` (found on its `PATH`), and that shim serves
//! the task API over ttrpc. The runc shim runs its OCI runtime through
//! go-runc, which, when the runtime options name no `BinaryName`, runs
//! `runc` as found on `PATH`. So this binary execs the runc shim with the
//! same arguments and a `PATH` that starts with a directory whose `runc` is
//! a symbolic link to `vmrun-oci`: every create, start, kill, delete, exec
//! and ps of the shim is then vmrun-oci's, and the shim's own task
//! service, I/O handling, event publishing and exit reaping are containerd's
//! tested code.
//!
//! Lookups: the runc shim is `$VMRUN_RUNC_SHIM`, else
//! `containerd-shim-runc-v2` on `PATH`, in `/usr/bin` or in
//! `/usr/local/bin`; `vmrun-oci` is `$VMRUN_OCI`, else the one beside this
//! binary, else on `PATH`. The link lives in
//! `$VMRUN_OCI_RUNC_DIR` if set, else `/run/vmrun-oci-shim/bin-<hash>`
//! (root), `$XDG_RUNTIME_DIR/vmrun-oci/bin-<hash>` or
//! `$TMPDIR/vmrun-oci-<uid>/bin-<hash>` (a directory only its user may
//! write), `<hash>` naming the vmrun-oci it points to; it is (re)made
//! atomically when missing or stale.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Why the shim cannot start.
#[derive(Debug, thiserror::Error)]
pub enum ShimError {
    /// A program is missing.
    #[error("cannot find {0}")]
    Missing(String),
    /// A file operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was done.
        what: String,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ShimError {
    let what = what.into();
    move |source| ShimError::Io { what, source }
}

/// The runc shim to exec.
pub fn runc_shim() -> Result<PathBuf, ShimError> {
    if let Some(p) = std::env::var_os("VMRUN_RUNC_SHIM") {
        return Ok(PathBuf::from(p));
    }
    crate::ops::find_in_path("containerd-shim-runc-v2")
        .or_else(|| ["/usr/bin", "/usr/local/bin"].iter().map(|d| Path::new(d).join("containerd-shim-runc-v2")).find(|p| p.is_file()))
        .ok_or_else(|| ShimError::Missing("containerd-shim-runc-v2 (install containerd) or set VMRUN_RUNC_SHIM".into()))
}

/// The `vmrun-oci` to run as `runc`.
pub fn vmrun_oci() -> Result<PathBuf, ShimError> {
    if let Some(p) = std::env::var_os("VMRUN_OCI") {
        return Ok(PathBuf::from(p));
    }
    std::env::current_exe()
        .ok()
        .map(|e| e.with_file_name("vmrun-oci"))
        .filter(|p| p.is_file())
        .or_else(|| crate::ops::find_in_path("vmrun-oci"))
        .ok_or_else(|| ShimError::Missing("vmrun-oci (install it beside containerd-shim-vmrun-v2) or set VMRUN_OCI".into()))
}

/// The directory whose `runc` links to `oci`, made if needed.
pub fn runc_dir(oci: &Path) -> Result<PathBuf, ShimError> {
    let dir = match std::env::var_os("VMRUN_OCI_RUNC_DIR") {
        Some(d) => PathBuf::from(d),
        None => {
            let h = vmrun_vmm_api::hash::fnv1a(oci.as_os_str().as_encoded_bytes());
            // SAFETY: geteuid has no preconditions.
            let uid = unsafe { libc::geteuid() };
            let base = if uid == 0 {
                PathBuf::from("/run/vmrun-oci-shim")
            } else if let Some(d) = std::env::var_os("XDG_RUNTIME_DIR") {
                PathBuf::from(d).join("vmrun-oci")
            } else {
                std::env::temp_dir().join(format!("vmrun-oci-{uid}"))
            };
            private_dir(&base, uid)?;
            base.join(format!("bin-{h:016x}"))
        }
    };
    link_in(&dir, oci)?;
    Ok(dir)
}

/// Makes `dir` (mode 0700 when new) and checks that it is a directory of
/// `uid`'s that no one else may write: the `runc` link in it decides what
/// the shim runs.
fn private_dir(dir: &Path, uid: u32) -> Result<(), ShimError> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    match std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) => return Err(io_err(format!("creating {}", dir.display()))(e)),
    }
    let m = std::fs::symlink_metadata(dir).map_err(io_err(dir.display().to_string()))?;
    if !m.is_dir() || m.uid() != uid || m.mode() & 0o022 != 0 {
        return Err(io_err(dir.display().to_string())(std::io::Error::other(
            "not a directory of this user's that only it may write: remove it, or set VMRUN_OCI_RUNC_DIR",
        )));
    }
    Ok(())
}

/// Makes `dir/runc` a symbolic link to `oci` (atomically replacing a stale
/// one).
pub fn link_in(dir: &Path, oci: &Path) -> Result<(), ShimError> {
    let link = dir.join("runc");
    if std::fs::read_link(&link).is_ok_and(|t| t == oci) {
        return Ok(());
    }
    std::fs::create_dir_all(dir).map_err(io_err(format!("creating {}", dir.display())))?;
    let tmp = dir.join(format!(".runc.{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(oci, &tmp).map_err(io_err(format!("linking {}", tmp.display())))?;
    std::fs::rename(&tmp, &link).map_err(io_err(format!("linking {}", link.display())))
}

fn run() -> Result<std::convert::Infallible, ShimError> {
    let shim = runc_shim()?;
    let dir = runc_dir(&vmrun_oci()?)?;
    let mut paths = vec![dir];
    if let Some(p) = std::env::var_os("PATH") {
        paths.extend(std::env::split_paths(&p));
    }
    let path = std::env::join_paths(paths).map_err(|e| io_err("PATH")(std::io::Error::other(e)))?;
    let err = std::process::Command::new(&shim).args(std::env::args_os().skip(1)).env("PATH", path).exec();
    Err(io_err(format!("running {}", shim.display()))(err))
}

/// Execs the runc shim; returns only on failure.
pub fn main() -> ExitCode {
    match run() {
        Ok(never) => match never {},
        Err(e) => {
            eprintln!("containerd-shim-vmrun-v2: {e}");
            ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_runc_link_points_at_vmrun_oci() {
        let d = tempfile::tempdir().unwrap();
        let oci = d.path().join("vmrun-oci");
        std::fs::write(&oci, b"").unwrap();
        let dir = d.path().join("bin");
        link_in(&dir, &oci).unwrap();
        assert_eq!(std::fs::read_link(dir.join("runc")).unwrap(), oci);
        link_in(&dir, &oci).unwrap();
        let other = d.path().join("other");
        link_in(&dir, &other).unwrap();
        assert_eq!(std::fs::read_link(dir.join("runc")).unwrap(), other, "a stale link is replaced");
    }

    #[test]
    fn the_link_directory_must_be_private() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        // SAFETY: geteuid has no preconditions.
        let uid = unsafe { libc::geteuid() };
        let p = d.path().join("base");
        private_dir(&p, uid).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o777)).unwrap();
        assert!(private_dir(&p, uid).is_err(), "world-writable");
        assert!(private_dir(&p, uid + 1).is_err(), "someone else's");
    }
}
