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

/// One range of a user namespace's id map (`linux.uidMappings`,
/// `linux.gidMappings`): ids `container_id..container_id + size` in the
/// container are `host_id..host_id + size` in the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdMapping {
    /// First id inside the container.
    pub container_id: u32,
    /// First id in the guest.
    pub host_id: u32,
    /// Number of ids.
    pub size: u32,
}

/// The most ranges one id map may have (the kernel's limit).
pub const MAX_ID_MAPPINGS: usize = 340;

/// Why an id map cannot be written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdMapError {
    /// No range at all.
    #[error("the map is empty")]
    Empty,
    /// More ranges than the kernel takes.
    #[error("{0} ranges (at most {MAX_ID_MAPPINGS})")]
    TooMany(usize),
    /// A range of no ids, or one past the last id (4294967295 is not an id).
    #[error("the range {0} {1} {2} is empty or goes past the last id")]
    Range(u32, u32, u32),
    /// Two ranges share ids, inside the container or in the guest.
    #[error("the ranges starting at container id {0} and {1} overlap")]
    Overlap(u32, u32),
    /// The container's root is not in the map (a user namespace's process
    /// becomes its root first).
    #[error("it does not map the container's root (id 0)")]
    NoRoot,
}

/// Checks an id map as the kernel would before it takes it.
pub fn check_id_mappings(map: &[IdMapping]) -> Result<(), IdMapError> {
    if map.is_empty() {
        return Err(IdMapError::Empty);
    }
    if map.len() > MAX_ID_MAPPINGS {
        return Err(IdMapError::TooMany(map.len()));
    }
    let end = |start: u32, size: u32| u64::from(start) + u64::from(size);
    for m in map {
        if m.size == 0 || end(m.container_id, m.size) > u64::from(u32::MAX) || end(m.host_id, m.size) > u64::from(u32::MAX) {
            return Err(IdMapError::Range(m.container_id, m.host_id, m.size));
        }
    }
    let overlap = |a: u32, b: u32, size_a: u32, size_b: u32| u64::from(a) < end(b, size_b) && u64::from(b) < end(a, size_a);
    for (i, a) in map.iter().enumerate() {
        for b in &map[i + 1..] {
            if overlap(a.container_id, b.container_id, a.size, b.size) || overlap(a.host_id, b.host_id, a.size, b.size) {
                return Err(IdMapError::Overlap(a.container_id, b.container_id));
            }
        }
    }
    Ok(())
}

/// Checks an id map of a container's user namespace: one the kernel takes
/// ([`check_id_mappings`]) that maps the container's root.
pub fn check_user_ns_map(map: &[IdMapping]) -> Result<(), IdMapError> {
    check_id_mappings(map)?;
    map_id(map, 0).map(drop).ok_or(IdMapError::NoRoot)
}

/// The guest's id of `id` inside the container, if the map has it.
pub fn map_id(map: &[IdMapping], id: u32) -> Option<u32> {
    map.iter().find(|m| id >= m.container_id && u64::from(id) < u64::from(m.container_id) + u64::from(m.size)).map(|m| m.host_id + (id - m.container_id))
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
    fn id_maps_are_checked_as_the_kernel_does() {
        let m = |container_id, host_id, size| IdMapping { container_id, host_id, size };
        let map = [m(0, 100000, 1000), m(1000, 1000, 1)];
        assert_eq!(check_id_mappings(&map), Ok(()));
        assert_eq!((map_id(&map, 0), map_id(&map, 999), map_id(&map, 1000), map_id(&map, 1001)), (Some(100000), Some(100999), Some(1000), None));
        assert_eq!(check_id_mappings(&[]), Err(IdMapError::Empty));
        assert_eq!(check_id_mappings(&[m(0, 0, 0)]), Err(IdMapError::Range(0, 0, 0)));
        assert_eq!(check_id_mappings(&[m(1, 0, u32::MAX)]), Err(IdMapError::Range(1, 0, u32::MAX)));
        assert_eq!(check_id_mappings(&[m(0, 0, 10), m(5, 100, 1)]), Err(IdMapError::Overlap(0, 5)));
        assert_eq!(check_id_mappings(&[m(0, 0, 10), m(10, 5, 1)]), Err(IdMapError::Overlap(0, 10)));
        assert_eq!(check_id_mappings(&vec![m(0, 0, 1); 341]), Err(IdMapError::TooMany(341)));
        assert_eq!(check_user_ns_map(&map), Ok(()));
        assert_eq!(check_user_ns_map(&[m(1, 100000, 10)]), Err(IdMapError::NoRoot));
        assert_eq!(check_user_ns_map(&[]), Err(IdMapError::Empty));
    }

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
