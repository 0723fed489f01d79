//! virtio-blk: a raw image file as a disk, read-only or read-write.

pub mod request;

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use event_manager::EventOps;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use super::{drain_queue, ActivateContext, ActivateError, Interrupt, VirtioDevice, TYPE_BLOCK, VIRTIO_RING_F_EVENT_IDX};
use request::{DiskInfo, ID_LEN, SECTOR_SIZE};

/// Feature: the disk is read-only.
pub const VIRTIO_BLK_F_RO: u64 = 1 << 5;
/// Feature: the device supports the flush command.
pub const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;
/// Queue size.
pub const QUEUE_SIZE: u16 = 256;

/// Errors opening a disk.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open disk image {path}: {source}")]
    Open { path: PathBuf, source: std::io::Error },
    #[error("disk image {path} is {size} bytes, not a multiple of 512")]
    Size { path: PathBuf, size: u64 },
}

struct Active {
    mem: GuestMemoryMmap,
    queue: Queue,
    interrupt: Arc<Interrupt>,
}

/// A virtio block device.
pub struct Block {
    file: File,
    info: DiskInfo,
    active: Option<Active>,
    buf: Vec<u8>,
}

impl std::fmt::Debug for Block {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Block").field("info", &self.info).finish()
    }
}

impl Block {
    /// Opens `path` as a disk. `id` (up to 20 bytes) is what the guest sees
    /// as its serial (`/sys/block/vdX/serial`).
    pub fn open(path: &Path, read_only: bool, id: &str) -> Result<Self, Error> {
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|source| Error::Open { path: path.into(), source })?;
        let size = file.metadata().map_err(|source| Error::Open { path: path.into(), source })?.len();
        if size % SECTOR_SIZE != 0 {
            return Err(Error::Size { path: path.into(), size });
        }
        let mut id_bytes = [0u8; ID_LEN];
        let n = id.len().min(ID_LEN);
        id_bytes[..n].copy_from_slice(&id.as_bytes()[..n]);
        Ok(Self {
            file,
            info: DiskInfo { capacity: size / SECTOR_SIZE, read_only, id: id_bytes },
            active: None,
            buf: Vec::new(),
        })
    }

    /// Capacity in sectors.
    pub fn capacity(&self) -> u64 {
        self.info.capacity
    }

    fn process(&mut self) {
        let Some(a) = self.active.as_mut() else { return };
        let (file, info, buf) = (&mut self.file, &self.info, &mut self.buf);
        drain_queue(&mut a.queue, &a.mem, &a.interrupt, |chain| {
            request::execute(chain, &a.mem, file, info, buf).map_or(0, |o| o.used_len)
        });
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }

    fn features(&self) -> u64 {
        let ro = if self.info.read_only { VIRTIO_BLK_F_RO } else { 0 };
        VIRTIO_BLK_F_FLUSH | VIRTIO_RING_F_EVENT_IDX | ro
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_blk_config: only `capacity` is meaningful with the
        // features offered.
        super::read_config_bytes(&self.info.capacity.to_le_bytes(), offset, data);
    }

    fn activate(&mut self, mut ctx: ActivateContext<'_>) -> Result<(), ActivateError> {
        let mut queue = ctx.queues.pop().ok_or(ActivateError::BadQueue(0))?;
        queue.set_event_idx(ctx.acked_features & VIRTIO_RING_F_EVENT_IDX != 0);
        self.active = Some(Active { mem: ctx.mem, queue, interrupt: ctx.interrupt.clone() });
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
    }

    fn is_active(&self) -> bool {
        self.active.is_some()
    }

    fn queue_states(&self) -> Vec<virtio_queue::QueueState> {
        self.active.as_ref().map_or_else(Vec::new, |a| vec![a.queue.state()])
    }

    fn process_queue(&mut self, _index: usize, _ops: &mut EventOps) {
        self.process();
    }
}

#[cfg(test)]
mod tests {
    use super::request::*;
    use super::*;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    const F_NEXT: u16 = 1;
    const F_WRITE: u16 = 2;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap()
    }

    fn info(sectors: u64, read_only: bool) -> DiskInfo {
        DiskInfo { capacity: sectors, read_only, id: *b"vmrun-disk-serial-01" }
    }

    fn header(m: &GuestMemoryMmap, at: u64, t: u32, sector: u64) {
        m.write_obj(t, GuestAddress(at)).unwrap();
        m.write_obj(0u32, GuestAddress(at + 4)).unwrap();
        m.write_obj(sector, GuestAddress(at + 8)).unwrap();
    }

    fn d(addr: u64, len: u32, flags: u16) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0))
    }

    /// Runs one request made of `descs` against `disk`.
    fn run(m: &GuestMemoryMmap, descs: &[RawDescriptor], disk: &mut Vec<u8>, info: &DiskInfo) -> Option<Outcome> {
        let q = MockSplitQueue::new(m, 16);
        let chain = q.build_desc_chain(descs).unwrap();
        execute(chain, m, disk, info, &mut Vec::new())
    }

    #[test]
    fn read_returns_disk_contents() {
        let m = mem();
        let mut disk: Vec<u8> = (0..4096u32).map(|i| i as u8).collect();
        header(&m, 0x10000, T_IN, 2);
        let o = run(&m, &[d(0x10000, 16, F_NEXT), d(0x20000, 1024, F_NEXT | F_WRITE), d(0x30000, 1, F_WRITE)], &mut disk, &info(8, false)).unwrap();
        assert_eq!(o, Outcome { status: S_OK, used_len: 1025 });
        let mut got = vec![0u8; 1024];
        m.read_slice(&mut got, GuestAddress(0x20000)).unwrap();
        assert_eq!(got, disk[1024..2048]);
        assert_eq!(m.read_obj::<u8>(GuestAddress(0x30000)).unwrap(), S_OK);
    }

    #[test]
    fn write_changes_the_disk_unless_read_only() {
        let m = mem();
        m.write_slice(&[0xab; 512], GuestAddress(0x20000)).unwrap();
        header(&m, 0x10000, T_OUT, 1);
        let descs = [d(0x10000, 16, F_NEXT), d(0x20000, 512, F_NEXT), d(0x30000, 1, F_WRITE)];
        let mut disk = vec![0u8; 2048];
        assert_eq!(run(&m, &descs, &mut disk, &info(4, false)).unwrap().status, S_OK);
        assert!(disk[512..1024].iter().all(|&b| b == 0xab));
        assert!(disk[..512].iter().all(|&b| b == 0));
        let mut disk = vec![0u8; 2048];
        assert_eq!(run(&m, &descs, &mut disk, &info(4, true)).unwrap().status, S_IOERR);
        assert!(disk.iter().all(|&b| b == 0), "a read-only disk was written");
    }

    #[test]
    fn out_of_range_and_unaligned_requests_fail() {
        let m = mem();
        let mut disk = vec![0u8; 4096];
        for (sector, len) in [(7u64, 1024u32), (u64::MAX / 256, 512), (0, 100)] {
            header(&m, 0x10000, T_IN, sector);
            let o = run(&m, &[d(0x10000, 16, F_NEXT), d(0x20000, len, F_NEXT | F_WRITE), d(0x30000, 1, F_WRITE)], &mut disk, &info(8, false));
            assert_eq!(o.unwrap().status, S_IOERR, "sector {sector} len {len}");
        }
    }

    #[test]
    fn get_id_flush_and_unknown() {
        let m = mem();
        let mut disk = vec![0u8; 512];
        header(&m, 0x10000, T_GET_ID, 0);
        let o = run(&m, &[d(0x10000, 16, F_NEXT), d(0x20000, 20, F_NEXT | F_WRITE), d(0x30000, 1, F_WRITE)], &mut disk, &info(1, false)).unwrap();
        assert_eq!(o, Outcome { status: S_OK, used_len: 21 });
        let mut id = [0u8; 20];
        m.read_slice(&mut id, GuestAddress(0x20000)).unwrap();
        assert_eq!(&id, b"vmrun-disk-serial-01");
        header(&m, 0x10000, T_FLUSH, 0);
        assert_eq!(run(&m, &[d(0x10000, 16, F_NEXT), d(0x30000, 1, F_WRITE)], &mut disk, &info(1, false)).unwrap().status, S_OK);
        header(&m, 0x10000, 99, 0);
        assert_eq!(run(&m, &[d(0x10000, 16, F_NEXT), d(0x30000, 1, F_WRITE)], &mut disk, &info(1, false)).unwrap().status, S_UNSUPP);
    }

    #[test]
    fn malformed_chains_never_touch_memory_outside_the_guest() {
        let m = mem();
        let mut disk = vec![0u8; 4096];
        let i = info(8, false);
        // No writable byte for the status: nothing can be reported.
        header(&m, 0x10000, T_IN, 0);
        assert_eq!(run(&m, &[d(0x10000, 16, 0)], &mut disk, &i), None);
        // Header too short.
        assert_eq!(run(&m, &[d(0x10000, 8, F_NEXT), d(0x30000, 1, F_WRITE)], &mut disk, &i).unwrap().status, S_IOERR);
        // Data buffer outside guest memory.
        assert_eq!(run(&m, &[d(0x10000, 16, F_NEXT), d(0x7fff_0000, 512, F_NEXT | F_WRITE), d(0x30000, 1, F_WRITE)], &mut disk, &i), None);
        // Buffer straddling the end of guest memory.
        assert_eq!(run(&m, &[d(0x10000, 16, F_NEXT), d(0x3f_ff00, 512, F_NEXT | F_WRITE), d(0x30000, 1, F_WRITE)], &mut disk, &i), None);
        // Header in a writable buffer only: reads as missing.
        assert_eq!(run(&m, &[d(0x10000, 17, F_WRITE)], &mut disk, &i).unwrap().status, S_IOERR);
    }

    #[test]
    fn a_looping_chain_ends() {
        // Descriptor 0 -> 1 -> 0 -> ...: the queue's chain walk is bounded by
        // the queue size, so processing ends.
        let m = mem();
        let q = MockSplitQueue::new(&m, 16);
        let looped = [
            RawDescriptor::from(SplitDescriptor::new(0x10000, 16, F_NEXT, 1)),
            RawDescriptor::from(SplitDescriptor::new(0x20000, 512, F_NEXT | F_WRITE, 0)),
        ];
        q.add_desc_chains(&looped, 0).unwrap();
        let mut queue: Queue = q.create_queue().unwrap();
        header(&m, 0x10000, T_IN, 0);
        let chain = queue.pop_descriptor_chain(&m).unwrap();
        let mut disk = vec![0u8; 4096];
        // Whatever the outcome, it returns, and within the chain's bound.
        let _ = execute(chain, &m, &mut disk, &info(8, false), &mut Vec::new());
    }

    #[test]
    fn an_active_disk_survives_save_and_restore() {
        use crate::virtio::mmio::tests::{bring_up, mem as tmem};
        use crate::virtio::mmio::MmioTransport;
        use crate::virtio::VIRTIO_F_VERSION_1;
        use vmm_sys_util::eventfd::EventFd;
        let path = std::env::temp_dir().join(format!("vmrun-blk-snap-{}", std::process::id()));
        std::fs::write(&path, vec![0u8; 4096]).unwrap();
        let irq = || EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let m = tmem();
        let mut t = MmioTransport::new(Box::new(Block::open(&path, false, "a").unwrap()), m.clone(), irq()).unwrap();
        bring_up(&mut t, VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_FLUSH);
        assert!(t.device().is_active());
        let state = t.save();
        assert_eq!(state.queues.len(), 1);
        assert_eq!(state.queues[0].desc_table, 0x10000);
        let r = MmioTransport::restore(Box::new(Block::open(&path, false, "a").unwrap()), m, irq(), &state).unwrap();
        assert!(r.device().is_active());
        assert_eq!(r.save(), state);
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn config_space_holds_the_capacity() {
        let dir = std::env::temp_dir().join(format!("vmrun-blk-{}", std::process::id()));
        std::fs::write(&dir, vec![0u8; 8192]).unwrap();
        let b = Block::open(&dir, true, "x").unwrap();
        let mut c = [0u8; 8];
        b.read_config(0, &mut c);
        assert_eq!(u64::from_le_bytes(c), 16);
        assert_ne!(b.features() & VIRTIO_BLK_F_RO, 0);
        std::fs::write(&dir, vec![0u8; 1000]).unwrap();
        assert!(matches!(Block::open(&dir, true, "x"), Err(Error::Size { .. })));
        std::fs::remove_file(&dir).unwrap();
        assert!(matches!(Block::open(&dir, true, "x"), Err(Error::Open { .. })));
    }
}
