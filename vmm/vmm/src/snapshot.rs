//! Snapshots of a running VM: a directory holding `vmstate.json` (vCPUs,
//! interrupt controllers, timers, devices; versioned) and `memory` (guest
//! RAM, sparse: pages of zeros are holes).
//!
//! A snapshot names device *slots* (a disk, a network interface, ...), not
//! the files or TAP devices behind them: whoever restores it chooses those,
//! so one snapshot of a booted guest serves any image.
//!
//! Restoring maps `memory` copy-on-write (`MAP_PRIVATE`): VMs restored from
//! the same snapshot share the pages none of them wrote.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use kvm_bindings::{kvm_clock_data, kvm_irqchip, kvm_pit_state2};
use serde::{Deserialize, Serialize};
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap, MmapRegion};

use crate::vcpu::VcpuState;
use vmrun_arch::layout::ram_regions;
use vmrun_devices::legacy::cmos::CmosState;
use vmrun_devices::legacy::serial::SerialConsoleState;
use vmrun_devices::virtio::mmio::TransportState;

/// Identifies the file format.
pub const FORMAT: &str = "vmrun-snapshot";
/// Version of the format; a snapshot of another version is refused.
pub const VERSION: u32 = 1;
/// The state file in a snapshot directory.
pub const STATE_FILE: &str = "vmstate.json";
/// The memory file in a snapshot directory.
pub const MEMORY_FILE: &str = "memory";
/// Largest state file accepted.
const MAX_STATE_SIZE: u64 = 64 << 20;
const PAGE: usize = 4096;

/// Errors reading or writing a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{0} is not a vmrun snapshot (no {STATE_FILE}); take one with `vmrun snapshot create`")]
    Missing(PathBuf),
    #[error("{path} is corrupt: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("snapshot {path} has format version {found}; this vmrun reads version {VERSION}: take a new snapshot")]
    Version { path: PathBuf, found: u32 },
    #[error("snapshot memory {path} is {found} bytes, {expected} expected (truncated?)")]
    MemorySize { path: PathBuf, found: u64, expected: u64 },
    #[error("cannot map snapshot memory: {0}")]
    Map(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io { path: path.to_path_buf(), source }
}

/// What kind of device sits in a slot, and what about it the snapshot
/// fixes (the rest is chosen at restore).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum DeviceKind {
    Block {
        read_only: bool,
        id: String,
        /// The disk's size in sectors when the snapshot was taken (none in
        /// older snapshots): a restore onto a disk of another size tells
        /// the guest to read it again.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        capacity: Option<u64>,
    },
    Net { mac: String },
    Vsock { cid: u64 },
    Rng,
}

/// One virtio device slot.
#[derive(Debug, Serialize, Deserialize)]
pub struct DeviceSnapshot {
    #[serde(flatten)]
    pub kind: DeviceKind,
    pub transport: TransportState,
}

/// Everything but guest memory.
#[derive(Debug, Serialize, Deserialize)]
pub struct VmState {
    pub format: String,
    pub version: u32,
    pub vmrun_version: String,
    /// The host compatibility layer was on: the guest's syscall trap and
    /// feature masks only work where it is on again.
    pub host_compat: bool,
    pub mem_mib: u32,
    pub vcpus: Vec<VcpuState>,
    /// PIC master, PIC slave, IOAPIC.
    pub irqchips: Vec<kvm_irqchip>,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
    pub serial: SerialConsoleState,
    pub cmos: CmosState,
    pub devices: Vec<DeviceSnapshot>,
}

impl VmState {
    /// Stamps the format and version.
    pub fn header() -> (String, u32, String) {
        (FORMAT.to_string(), VERSION, env!("CARGO_PKG_VERSION").to_string())
    }
}

/// Pages looked at per step of [`write_memory`].
const CHUNK_PAGES: usize = 256;

/// Writes guest memory to `path`, leaving holes for pages of zeros.
///
/// Only pages that can hold data are read: a page the process never
/// touched is not read through the mapping, since a read would back it:
/// with memory zeros (harmless), but in a VM restored from a snapshot on a
/// tmpfs, with a new page of the snapshot's file for each of its holes (a
/// 29 MB template grew to the guest's full 512 MB that way, and a full
/// tmpfs killed the VMM with SIGBUS). Which pages are in the mapping comes
/// from `/proc/self/pagemap` (present or swapped); the others hold what
/// the file behind them holds (read with `pread`, which reads a hole as
/// zeros without filling it), or zeros for anonymous memory. Without
/// `/proc`, every page is read.
pub fn write_memory(mem: &GuestMemoryMmap, path: &Path) -> Result<u64, Error> {
    let file = File::create(path).map_err(io(path))?;
    // In a jail, the one the jail opened for us (the process may not open
    // it once unprivileged).
    let opened;
    let pagemap: Option<&File> = match vmrun_jail::pagemap() {
        Some(f) => Some(f),
        None => {
            opened = File::open("/proc/self/pagemap").map_err(|e| log::warn!("no /proc/self/pagemap ({e}): reading every page")).ok();
            opened.as_ref()
        }
    };
    let mut offset = 0u64;
    let mut page = vec![0u8; PAGE];
    let mut entries = vec![0u8; CHUNK_PAGES * 8];
    for region in mem.iter() {
        let len = region.len();
        file.set_len(offset + len).map_err(io(path))?;
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .map_err(|e| Error::Io { path: path.into(), source: std::io::Error::other(e.to_string()) })? as u64;
        let backing = region.file_offset();
        let mut at = 0u64;
        while at < len {
            let pages = CHUNK_PAGES.min((len - at).div_ceil(PAGE as u64) as usize);
            let mapped = match &pagemap {
                Some(pm) => {
                    let buf = &mut entries[..pages * 8];
                    pm.read_exact_at(buf, (host + at) / PAGE as u64 * 8)
                        .map_err(|e| Error::Io { path: "/proc/self/pagemap".into(), source: e })?;
                    // Bit 63: present; bit 62: swapped out.
                    buf.chunks_exact(8).map(|e| u64::from_le_bytes(e.try_into().unwrap_or_default()) >> 62 != 0).collect()
                }
                None => vec![true; pages],
            };
            for (i, in_mapping) in mapped.into_iter().enumerate() {
                let page_at = at + (i * PAGE) as u64;
                let n = PAGE.min((len - page_at) as usize);
                if in_mapping {
                    vm_memory::Bytes::read_slice(region, &mut page[..n], vm_memory::MemoryRegionAddress(page_at))
                        .map_err(|e| Error::Io { path: path.into(), source: std::io::Error::other(e.to_string()) })?;
                } else if let Some(fo) = backing {
                    read_file_page(fo.file(), fo.start() + page_at, &mut page[..n]).map_err(|e| Error::Io { path: path.into(), source: e })?;
                } else {
                    continue; // never touched anonymous memory: zeros
                }
                if page[..n].iter().any(|&b| b != 0) {
                    file.write_all_at(&page[..n], offset + page_at).map_err(io(path))?;
                }
            }
            at += (pages * PAGE) as u64;
        }
        offset += len;
    }
    file.sync_all().map_err(io(path))?;
    Ok(offset)
}

/// Reads `buf.len()` bytes of `file` at `at`; what lies past its end reads
/// as zeros.
fn read_file_page(file: &File, at: u64, buf: &mut [u8]) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], at + done as u64)? {
            0 => break,
            n => done += n,
        }
    }
    buf[done..].fill(0);
    Ok(())
}

/// Maps `path` as the memory of a guest of `mem_mib` MiB, copy-on-write.
pub fn map_memory(path: &Path, mem_mib: u32) -> Result<GuestMemoryMmap, Error> {
    let file = File::open(path).map_err(io(path))?;
    let expected = u64::from(mem_mib) << 20;
    let found = file.metadata().map_err(io(path))?.len();
    if found != expected {
        return Err(Error::MemorySize { path: path.into(), found, expected });
    }
    let file = std::sync::Arc::new(file);
    let mut regions = Vec::new();
    let mut offset = 0u64;
    for (start, len) in ram_regions(expected) {
        let mapping = MmapRegion::build(
            Some(FileOffset::from_arc(file.clone(), offset)),
            len as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_NORESERVE,
        )
        .map_err(|e| Error::Map(e.to_string()))?;
        regions.push(GuestRegionMmap::new(mapping, GuestAddress(start)).ok_or_else(|| Error::Map("region".into()))?);
        offset += len;
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| Error::Map(e.to_string()))
}

/// Writes `state` as `dir/vmstate.json` (atomically) and guest memory as
/// `dir/memory`.
pub fn save(dir: &Path, state: &VmState, mem: &GuestMemoryMmap) -> Result<(), Error> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let mem_tmp = dir.join(format!("{MEMORY_FILE}.tmp"));
    write_memory(mem, &mem_tmp)?;
    let mem_path = dir.join(MEMORY_FILE);
    std::fs::rename(&mem_tmp, &mem_path).map_err(io(&mem_path))?;
    let json = serde_json::to_vec(state).map_err(|e| Error::Corrupt { path: dir.into(), reason: e.to_string() })?;
    let tmp = dir.join(format!("{STATE_FILE}.tmp"));
    let mut f = File::create(&tmp).map_err(io(&tmp))?;
    f.write_all(&json).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    let path = dir.join(STATE_FILE);
    std::fs::rename(&tmp, &path).map_err(io(&path))?;
    Ok(())
}

/// Reads and checks `dir/vmstate.json`.
pub fn load_state(dir: &Path) -> Result<VmState, Error> {
    let path = dir.join(STATE_FILE);
    let file = match File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(Error::Missing(dir.into())),
        Err(e) => return Err(Error::Io { path, source: e }),
    };
    let mut bytes = Vec::new();
    file.take(MAX_STATE_SIZE + 1).read_to_end(&mut bytes).map_err(io(&path))?;
    if bytes.len() as u64 > MAX_STATE_SIZE {
        return Err(Error::Corrupt { path, reason: format!("larger than {MAX_STATE_SIZE} bytes") });
    }
    // Look at the header first, so an old or foreign file gets the right error.
    #[derive(Deserialize)]
    struct Header {
        format: String,
        version: u32,
    }
    let header: Header =
        serde_json::from_slice(&bytes).map_err(|e| Error::Corrupt { path: path.clone(), reason: e.to_string() })?;
    if header.format != FORMAT {
        return Err(Error::Corrupt { path, reason: format!("format {:?}", header.format) });
    }
    if header.version != VERSION {
        return Err(Error::Version { path, found: header.version });
    }
    let state: VmState =
        serde_json::from_slice(&bytes).map_err(|e| Error::Corrupt { path: path.clone(), reason: e.to_string() })?;
    if state.vcpus.is_empty() || state.vcpus.len() > usize::from(vmrun_arch::layout::MAX_VCPUS) {
        return Err(Error::Corrupt { path, reason: format!("{} vCPUs", state.vcpus.len()) });
    }
    if state.irqchips.len() != 3 {
        return Err(Error::Corrupt { path, reason: "irqchip state missing".into() });
    }
    Ok(state)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("vmrun-snap-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn memory_round_trip_is_sparse_and_private() {
        let d = dir("mem");
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 32 << 20)]).unwrap();
        mem.write_slice(b"hello", GuestAddress(0x1234)).unwrap();
        mem.write_slice(b"world", GuestAddress((32 << 20) - 5)).unwrap();
        let path = d.join(MEMORY_FILE);
        assert_eq!(write_memory(&mem, &path).unwrap(), 32 << 20);
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.len(), 32 << 20);
        use std::os::unix::fs::MetadataExt;
        assert!(meta.blocks() * 512 < 1 << 20, "zero pages should be holes");

        let a = map_memory(&path, 32).unwrap();
        let b = map_memory(&path, 32).unwrap();
        let mut got = [0u8; 5];
        a.read_slice(&mut got, GuestAddress(0x1234)).unwrap();
        assert_eq!(&got, b"hello");
        a.write_slice(b"HELLO", GuestAddress(0x1234)).unwrap();
        b.read_slice(&mut got, GuestAddress(0x1234)).unwrap();
        assert_eq!(&got, b"hello", "a write in one restored VM must not show in another");
        b.read_slice(&mut got, GuestAddress((32 << 20) - 5)).unwrap();
        assert_eq!(&got, b"world");
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn a_snapshot_of_a_restored_vm_fills_no_hole_of_its_template() {
        // The template's memory file on a tmpfs, where a read through a
        // private mapping backs a hole with a new page of the file.
        let base = if Path::new("/dev/shm").is_dir() { PathBuf::from("/dev/shm") } else { std::env::temp_dir() };
        let d = base.join(format!("vmrun-snap-{}-tmpfs", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        let template = d.join("template");
        let f = File::create(&template).unwrap();
        f.set_len(64 << 20).unwrap();
        f.write_all_at(b"in the template", 0x10_0000).unwrap();
        f.write_all_at(b"last page", (64 << 20) - 4096).unwrap();
        drop(f);
        use std::os::unix::fs::MetadataExt;
        let blocks = || std::fs::metadata(&template).unwrap().blocks();

        let mem = map_memory(&template, 64).unwrap();
        // The guest wrote one page (copy-on-write) and read another (a
        // page it touches is backed: that is the guest's doing).
        mem.write_slice(b"written after the restore", GuestAddress(0x20_0000)).unwrap();
        let mut got = [0u8; 15];
        mem.read_slice(&mut got, GuestAddress(0x10_0000)).unwrap();
        let before = blocks();
        let out = d.join("snapshot");
        write_memory(&mem, &out).unwrap();
        assert_eq!(blocks(), before, "writing the snapshot filled holes of the template's file");

        let copy = map_memory(&out, 64).unwrap();
        for (addr, want) in [(0x10_0000u64, &b"in the template"[..]), (0x20_0000, b"written after the restore"), ((64 << 20) - 4096, b"last page")] {
            let mut got = vec![0u8; want.len()];
            copy.read_slice(&mut got, GuestAddress(addr)).unwrap();
            assert_eq!(got, want, "at {addr:#x}");
        }
        assert!(std::fs::metadata(&out).unwrap().blocks() * 512 < 1 << 20, "zero pages should be holes");
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn truncated_memory_is_refused() {
        let d = dir("trunc");
        let path = d.join(MEMORY_FILE);
        std::fs::write(&path, vec![0u8; 4096]).unwrap();
        assert!(matches!(map_memory(&path, 32), Err(Error::MemorySize { found: 4096, .. })));
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn bad_state_files_get_clear_errors() {
        let d = dir("state");
        assert!(matches!(load_state(&d), Err(Error::Missing(_))));
        std::fs::write(d.join(STATE_FILE), b"{not json").unwrap();
        assert!(matches!(load_state(&d), Err(Error::Corrupt { .. })));
        std::fs::write(d.join(STATE_FILE), br#"{"format":"vmrun-snapshot","version":999}"#).unwrap();
        let e = load_state(&d).unwrap_err();
        assert!(matches!(e, Error::Version { found: 999, .. }), "{e}");
        assert!(e.to_string().contains("take a new snapshot"));
        std::fs::write(d.join(STATE_FILE), br#"{"format":"something-else","version":1}"#).unwrap();
        assert!(matches!(load_state(&d), Err(Error::Corrupt { .. })));
        std::fs::write(d.join(STATE_FILE), br#"{"format":"vmrun-snapshot","version":1,"mem_mib":128}"#).unwrap();
        assert!(matches!(load_state(&d), Err(Error::Corrupt { .. })), "fields missing");
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn device_kinds_serialise_readably() {
        let k = DeviceKind::Block { read_only: true, id: "layers".into(), capacity: Some(8) };
        assert_eq!(serde_json::to_string(&k).unwrap(), r#"{"kind":"block","read_only":true,"id":"layers","capacity":8}"#);
        let old: DeviceKind = serde_json::from_str(r#"{"kind":"block","read_only":true,"id":"layers"}"#).unwrap();
        assert_eq!(old, DeviceKind::Block { read_only: true, id: "layers".into(), capacity: None });
    }
}
