//! Parts of the OCI runtime spec's `linux` section and process the agent
//! applies to a container: device nodes, the root's mount propagation, the
//! kernel parameters (`sysctl`) a container may set.

use serde::{Deserialize, Serialize};

/// What kind of node a [`Device`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeviceKind {
    /// A character device (the spec's `c`, and `u`: unbuffered).
    #[serde(rename = "c", alias = "u")]
    Char,
    /// A block device (`b`).
    #[serde(rename = "b")]
    Block,
    /// A FIFO (`p`).
    #[serde(rename = "p")]
    Fifo,
}

/// A device node made in the container's `/dev` (`linux.devices`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Device {
    /// Where, inside the container: under `/dev/`.
    pub path: String,
    /// Its kind.
    pub kind: DeviceKind,
    /// Major number (0 for a FIFO).
    #[serde(default)]
    pub major: u32,
    /// Minor number (0 for a FIFO).
    #[serde(default)]
    pub minor: u32,
    /// Permission bits (`None`: 0666, as runc).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file_mode: Option<u32>,
    /// Owner (`None`: root).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    /// Group (`None`: root).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gid: Option<u32>,
}

/// Mount propagation of the container's root (`linux.rootfsPropagation`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Propagation {
    /// `private`.
    Private,
    /// `rprivate`.
    Rprivate,
    /// `slave`.
    Slave,
    /// `rslave`.
    Rslave,
    /// `shared`.
    Shared,
    /// `rshared`.
    Rshared,
    /// `unbindable`.
    Unbindable,
    /// `runbindable`.
    Runbindable,
}

impl Propagation {
    /// The spec's name (`rslave`, ...) as this type.
    pub fn from_name(name: &str) -> Option<Self> {
        serde_json::from_value(serde_json::Value::String(name.to_string())).ok()
    }
}

/// The kernel namespace a kernel parameter belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SysctlNamespace {
    /// IPC (`kernel.msg*`, `kernel.sem`, `kernel.shm*`, `fs.mqueue.*`).
    Ipc,
    /// Network (`net.*`).
    Net,
    /// UTS (`kernel.domainname`).
    Uts,
}

/// A kernel parameter a container may not set.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SysctlError {
    /// Not a name of the dotted form (`net.ipv4.ip_forward`).
    #[error("sysctl {0:?} is not a kernel parameter name (dot-separated, non-empty components, no '/')")]
    Name(String),
    /// `kernel.hostname`, which the spec's `hostname` sets.
    #[error("sysctl \"kernel.hostname\" is not allowed as it conflicts with the OCI \"hostname\" field")]
    Hostname,
    /// A parameter of the whole kernel, which a container cannot set
    /// without setting it for everyone (runc refuses it too).
    #[error("sysctl {0:?} is not in a separate kernel namespace")]
    NotNamespaced(String),
}

/// The IPC parameters a container may set (runc's list; `fs.mqueue.*`
/// besides).
const IPC_SYSCTLS: [&str; 8] =
    ["kernel.msgmax", "kernel.msgmnb", "kernel.msgmni", "kernel.sem", "kernel.shmall", "kernel.shmmax", "kernel.shmmni", "kernel.shm_rmid_forced"];

/// Which namespace the kernel parameter `key` belongs to, or why a
/// container may not set it (runc's validator).
pub fn sysctl_namespace(key: &str) -> Result<SysctlNamespace, SysctlError> {
    if key.contains(['/', '\0']) || key.split('.').any(str::is_empty) {
        return Err(SysctlError::Name(key.to_string()));
    }
    if IPC_SYSCTLS.contains(&key) || key.starts_with("fs.mqueue.") {
        return Ok(SysctlNamespace::Ipc);
    }
    if key.starts_with("net.") {
        return Ok(SysctlNamespace::Net);
    }
    match key {
        "kernel.domainname" => Ok(SysctlNamespace::Uts),
        "kernel.hostname" => Err(SysctlError::Hostname),
        _ => Err(SysctlError::NotNamespaced(key.to_string())),
    }
}

/// The file of the kernel parameter `key` under `/proc/sys`
/// (`net/ipv4/ip_forward`), for a key [`sysctl_namespace`] accepts.
pub fn sysctl_path(key: &str) -> String {
    key.replace('.', "/")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespaced_sysctls_only() {
        assert_eq!(sysctl_namespace("kernel.shmmax"), Ok(SysctlNamespace::Ipc));
        assert_eq!(sysctl_namespace("fs.mqueue.msg_max"), Ok(SysctlNamespace::Ipc));
        assert_eq!(sysctl_namespace("net.ipv4.ip_forward"), Ok(SysctlNamespace::Net));
        assert_eq!(sysctl_namespace("kernel.domainname"), Ok(SysctlNamespace::Uts));
        assert_eq!(sysctl_namespace("kernel.hostname"), Err(SysctlError::Hostname));
        for bad in ["kernel.panic", "vm.overcommit_memory", "fs.file-max", "kernel.shmmaxx"] {
            assert_eq!(sysctl_namespace(bad), Err(SysctlError::NotNamespaced(bad.into())), "{bad}");
        }
        for bad in ["net..ipv4", "net.ipv4/../../kernel", ".net", "net.", "", "net.a\0b"] {
            assert_eq!(sysctl_namespace(bad), Err(SysctlError::Name(bad.into())), "{bad}");
        }
        assert_eq!(sysctl_path("net.ipv4.ip_forward"), "net/ipv4/ip_forward");
    }

    #[test]
    fn device_kinds_and_propagation_names() {
        let d: Device = serde_json::from_str(r#"{ "path": "/dev/fuse", "kind": "u", "major": 10, "minor": 229 }"#).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((d.kind, d.file_mode, d.uid), (DeviceKind::Char, None, None));
        assert!(serde_json::from_str::<Device>(r#"{ "path": "/dev/x", "kind": "z" }"#).is_err());
        assert_eq!(Propagation::from_name("rslave"), Some(Propagation::Rslave));
        assert_eq!(Propagation::from_name("sideways"), None);
    }
}
