//! `-v HOST_DIR:GUEST_DIR[:ro]`: a host directory given to a container as
//! a disk.
//!
//! vmrun copies the directory into a fresh ext4 image (`mkfs.ext4 -d`, from
//! e2fsprogs) in the container's directory and attaches it to one of the
//! VM's volume disk slots; the agent mounts it and binds it at `GUEST_DIR`.
//! This keeps the host's file system out of the guest's reach: the guest
//! sees a copy, and no file server runs on the host on its behalf. The
//! price is that it is a copy: writes inside the container go to the image
//! and are not seen in the host directory (`:ro` mounts it read-only in
//! the guest). The image is removed with the container.
//! ([`make_dirs_image`] puts several directories on one image: how the OCI
//! runtime gives a container its large bind-mounted directories.)

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{Error, Result};

/// How many volume disks a VM has (disk slots `/dev/vdb`...).
pub const SLOTS: usize = 4;

/// How many a pod's VM has: its containers' disks (a root's shared copy
/// and upper layer each) are attached to its empty slots while it runs.
/// The interrupt controller's pins bound it: with the layer disk, vsock,
/// rng and a network interface, 18 of the 19 virtio devices.
pub const POD_SLOTS: usize = 14;

/// One `-v` option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Volume {
    pub host: PathBuf,
    pub guest: String,
    pub read_only: bool,
}

fn invalid(s: &str, why: &str) -> Error {
    Error::Volume(format!("invalid volume {s:?}: {why} (use -v /host/dir:/guest/dir[:ro])"))
}

impl std::str::FromStr for Volume {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let parts: Vec<&str> = s.split(':').collect();
        let (host, guest, mode) = match parts.as_slice() {
            [h, g] => (*h, *g, "rw"),
            [h, g, m] => (*h, *g, *m),
            _ => return Err(invalid(s, "expected HOST_DIR:GUEST_DIR[:ro|rw]")),
        };
        if !host.starts_with('/') {
            return Err(invalid(s, "the host directory must be an absolute path (named volumes are not supported)"));
        }
        if !guest.starts_with('/') || guest == "/" || guest.split('/').any(|c| c == "..") {
            return Err(invalid(s, "the container path must be absolute, not / and without .."));
        }
        let read_only = match mode {
            "ro" => true,
            "rw" => false,
            _ => return Err(invalid(s, "the mode must be ro or rw")),
        };
        Ok(Self { host: PathBuf::from(host), guest: guest.to_string(), read_only })
    }
}

/// Bytes the files under `dir` take, rounded up to 4 KiB blocks, and
/// their count.
fn usage(dir: &Path) -> std::io::Result<(u64, u64)> {
    let (mut bytes, mut count) = (0u64, 0u64);
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d)? {
            let e = e?;
            let m = e.metadata()?;
            count += 1;
            bytes += m.len().div_ceil(4096) * 4096;
            if m.is_dir() {
                stack.push(e.path());
            }
        }
    }
    Ok((bytes, count))
}

impl Volume {
    /// Makes the disk image of the directory at `out` (sparse: only what
    /// the files take is written). Room is left to write: a quarter more
    /// than the files, and at least 64 MiB.
    pub fn make_image(&self, out: &Path) -> Result<()> {
        make_dir_image(&self.host, out, "volume", "vmrun-volume", 64 << 20)
    }

    /// The mount the agent makes for it, from the disk in volume slot
    /// `slot`.
    pub fn mount(&self, slot: usize) -> vmrun_agent_protocol::Mount {
        vmrun_agent_protocol::Mount {
            destination: self.guest.clone(),
            fstype: "ext4".into(),
            source: guest_device(slot),
            options: vec![if self.read_only { "ro" } else { "rw" }.into()],
        }
    }
}

/// The guest's device for the disk in volume slot `slot` (`/dev/vdb` for
/// slot 0: `/dev/vda` is the layer disk).
pub fn guest_device(slot: usize) -> String {
    format!("/dev/vd{}", char::from(b'b' + slot as u8))
}

/// Makes an ext4 image at `out` holding a copy of the directory `dir`
/// (`mkfs.ext4 -d`; sparse: only what the files take is written), labelled
/// `label`. Room is left to write: a quarter more than the files, and at
/// least `min_bytes`. `what` names the directory in errors (`volume`,
/// `rootfs`). Volumes use it, and so does the OCI runtime for a bundle's
/// root file system.
pub fn make_dir_image(dir: &Path, out: &Path, what: &str, label: &str, min_bytes: u64) -> Result<()> {
    let meta = std::fs::metadata(dir).map_err(|e| Error::Volume(format!("{what} {}: {e}", dir.display())))?;
    if !meta.is_dir() {
        return Err(Error::Volume(format!("{what} {}: not a directory", dir.display())));
    }
    let (bytes, count) = usage(dir).map_err(|e| Error::Volume(format!("{what} {}: {e}", dir.display())))?;
    let size = (bytes + bytes / 4 + count * 4096).max(min_bytes).div_ceil(1 << 20) << 20;
    mkfs_ext4(out, label, size, Some(dir))
}

/// Makes an empty sparse ext4 image of `bytes` (rounded up to MiB) at
/// `out`, labelled `label`: a disk for a guest to write on.
pub fn make_empty_image(out: &Path, label: &str, bytes: u64) -> Result<()> {
    mkfs_ext4(out, label, bytes.div_ceil(1 << 20) << 20, None)
}

/// `mkfs.ext4` of a new sparse file `out` of `size` bytes, with the files
/// of `dir` in it.
fn mkfs_ext4(out: &Path, label: &str, size: u64, dir: Option<&Path>) -> Result<()> {
    std::fs::File::create(out)?.set_len(size)?;
    let mut cmd = Command::new("mkfs.ext4");
    cmd.args(["-q", "-F", "-L", label, "-E", "lazy_itable_init=1,lazy_journal_init=1"]);
    if let Some(dir) = dir {
        cmd.arg("-d").arg(dir);
    }
    match cmd.arg(out).output() {
        Ok(o) if o.status.success() => Ok(()),
        Ok(o) => Err(Error::Volume(format!(
            "cannot make the disk {}{}: mkfs.ext4: {}",
            out.display(),
            dir.map(|d| format!(" of {}", d.display())).unwrap_or_default(),
            String::from_utf8_lossy(&o.stderr).trim()
        ))),
        Err(e) => Err(Error::Volume(format!("cannot run mkfs.ext4 (install e2fsprogs): {e}"))),
    }
}

/// The names of host directories `dirs` (all different) on a disk of
/// several ([`make_dirs_image`]): each its own base name where that is a
/// plain name no other has, as a bind mount's root reads in the
/// container's mountinfo under runc; else its index (with a suffix should
/// a base name already be that number).
pub fn disk_dir_names(dirs: &[PathBuf]) -> Vec<String> {
    let base = |d: &PathBuf| d.file_name().map(|n| n.to_string_lossy().into_owned()).filter(|n| !n.is_empty() && n != "." && n != "..");
    let count = |n: &str| dirs.iter().filter(|d| base(d).as_deref() == Some(n)).count();
    let mut names: Vec<Option<String>> = dirs.iter().map(|d| base(d).filter(|n| count(n) == 1)).collect();
    for i in 0..names.len() {
        if names[i].is_none() {
            let mut name = i.to_string();
            while names.iter().any(|n| n.as_deref() == Some(name.as_str())) {
                name.push('_');
            }
            names[i] = Some(name);
        }
    }
    names.into_iter().flatten().collect()
}

/// Makes one ext4 image at `out` holding copies of several host
/// directories, each `(dir, name)` in the subdirectory `name` of its root
/// (how the OCI runtime gives a container any number of bind-mounted
/// directories on one disk slot). The directories are first copied under
/// `staging` (`cp -a --reflink=auto`: a clone where the file system can),
/// which is removed afterwards.
pub fn make_dirs_image(dirs: &[(PathBuf, String)], out: &Path, staging: &Path) -> Result<()> {
    let _ = std::fs::remove_dir_all(staging);
    std::fs::create_dir_all(staging)?;
    let result = (|| {
        for (dir, name) in dirs {
            let meta = std::fs::metadata(dir).map_err(|e| Error::Volume(format!("volume {}: {e}", dir.display())))?;
            if !meta.is_dir() {
                return Err(Error::Volume(format!("volume {}: not a directory", dir.display())));
            }
            let o = Command::new("cp")
                .args(["-a", "--reflink=auto", "--no-target-directory"])
                .arg(dir)
                .arg(staging.join(name))
                .output()
                .map_err(|e| Error::Volume(format!("cannot run cp: {e}")))?;
            if !o.status.success() {
                return Err(Error::Volume(format!("cannot copy {}: cp: {}", dir.display(), String::from_utf8_lossy(&o.stderr).trim())));
            }
        }
        make_dir_image(staging, out, "volume", "vmrun-volumes", 64 << 20)
    })();
    let _ = std::fs::remove_dir_all(staging);
    result
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn parses_docker_volume_syntax() {
        let v: Volume = "/srv/data:/data:ro".parse().unwrap();
        assert_eq!(v, Volume { host: "/srv/data".into(), guest: "/data".into(), read_only: true });
        assert!(!"/a:/b".parse::<Volume>().unwrap().read_only);
        assert!(!"/a:/b:rw".parse::<Volume>().unwrap().read_only);
        for bad in ["data:/data", "/a", "/a:b", "/a:/", "/a:/b:rx", "/a:/b/../etc", "/a:/b:ro:x", ""] {
            assert!(bad.parse::<Volume>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn directories_on_one_disk_are_named_by_their_base_names_when_unique() {
        let p = |v: &[&str]| v.iter().map(PathBuf::from).collect::<Vec<_>>();
        assert_eq!(disk_dir_names(&p(&["/etc", "/srv/data", "/a/x", "/b/x", "/"])), ["etc", "data", "2", "3", "4"]);
        assert_eq!(disk_dir_names(&p(&["/a/1", "/b/c", "/d/c"])), ["1", "1_", "2"]);
    }

    #[test]
    fn slots_are_the_disks_after_the_layer_disk() {
        let v: Volume = "/a:/b:ro".parse().unwrap();
        let m = v.mount(0);
        assert_eq!((m.source.as_str(), m.fstype.as_str(), m.options.as_slice()), ("/dev/vdb", "ext4", &["ro".to_string()][..]));
        assert_eq!(v.mount(3).source, "/dev/vde");
    }

    #[test]
    fn an_image_is_made_of_a_directory() {
        if Command::new("mkfs.ext4").arg("-V").output().is_err() {
            eprintln!("skipped: no mkfs.ext4 (scripts/deps.sh installs e2fsprogs)");
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        std::fs::create_dir_all(src.join("sub")).unwrap();
        std::fs::write(src.join("sub/file"), b"hello").unwrap();
        let v = Volume { host: src, guest: "/x".into(), read_only: false };
        let img = d.path().join("v.img");
        v.make_image(&img).unwrap();
        assert!(std::fs::metadata(&img).unwrap().len() >= 64 << 20);
        // debugfs (e2fsprogs) reads it back.
        let out = Command::new("debugfs").args(["-R", "cat /sub/file"]).arg(&img).output().unwrap();
        assert_eq!(out.stdout, b"hello");
        let missing = Volume { host: d.path().join("nope"), guest: "/x".into(), read_only: false };
        assert!(missing.make_image(&img).unwrap_err().to_string().contains("nope"));

        // Several directories on one image, one subdirectory each.
        let other = d.path().join("other");
        std::fs::create_dir_all(&other).unwrap();
        std::fs::write(other.join("file"), b"other").unwrap();
        let staging = d.path().join("staging");
        let many = d.path().join("many.img");
        let dirs = [d.path().join("src"), other.clone()];
        let named: Vec<(PathBuf, String)> = dirs.iter().cloned().zip(disk_dir_names(&dirs)).collect();
        make_dirs_image(&named, &many, &staging).unwrap();
        for (path, want) in [("/src/sub/file", &b"hello"[..]), ("/other/file", b"other")] {
            let out = Command::new("debugfs").args(["-R", &format!("cat {path}")]).arg(&many).output().unwrap();
            assert_eq!(out.stdout, want, "{path}");
        }
        assert!(!staging.exists(), "the staging copy is removed");
        let e = make_dirs_image(&[(other.join("file"), "f".into())], &many, &staging).unwrap_err().to_string();
        assert!(e.contains("not a directory"), "{e}");
    }
}
