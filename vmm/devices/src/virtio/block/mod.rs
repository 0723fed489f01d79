//! virtio-blk: a raw image file as a disk, read-only or read-write,
//! optionally rate limited (bytes read or written, and requests, per
//! second; see [`crate::rate_limiter`]).

pub mod request;

use std::fs::{File, OpenOptions};
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use event_manager::EventOps;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::EventSet;

use super::{drain_queue_until, ActivateContext, ActivateError, Interrupt, VirtioDevice, TYPE_BLOCK, VIRTIO_RING_F_EVENT_IDX};
use crate::rate_limiter::RateLimiter;
use request::{DiskInfo, Request, ID_LEN, SECTOR_SIZE};

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
    #[error("cannot read the size of the disk image handed over: {0}")]
    HandedStat(#[source] std::io::Error),
    #[error("the disk image handed over is {0} bytes, not a multiple of 512")]
    HandedSize(u64),
}

struct Active {
    mem: GuestMemoryMmap,
    queue: Queue,
    interrupt: Arc<Interrupt>,
}

/// A virtio block device.
///
/// With a rate limiter, every request costs one operation and, for reads
/// and writes, its data bytes; a request the limiter refuses stays in the
/// ring and the device stops serving the queue until the limiter's timer
/// (one of the device's watched descriptors) fires.
///
/// The limiter is not part of the device's snapshot state (the queues
/// are): a restored device starts with full buckets, and with whatever
/// limiter its restorer gives it.
pub struct Block {
    /// The image; `None` in an empty slot (capacity 0).
    file: Option<File>,
    /// Whether the guest was offered a read-only disk in this slot (the
    /// feature it negotiated once).
    offered_read_only: bool,
    info: DiskInfo,
    active: Option<Active>,
    buf: Vec<u8>,
    limiter: RateLimiter,
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
            file: Some(file),
            offered_read_only: read_only,
            info: DiskInfo { capacity: size / SECTOR_SIZE, read_only, id: id_bytes },
            active: None,
            buf: Vec::new(),
            limiter: RateLimiter::unlimited(),
        })
    }

    /// The device with `limiter` bounding what the guest may take.
    pub fn with_rate_limiter(mut self, limiter: RateLimiter) -> Self {
        self.limiter = limiter;
        self
    }

    /// The device's rate limiter.
    pub fn rate_limiter(&self) -> &RateLimiter {
        &self.limiter
    }

    /// Capacity in sectors.
    pub fn capacity(&self) -> u64 {
        self.info.capacity
    }

    /// Puts `file` in this slot in place of its image (`None`: no image,
    /// capacity 0) and returns the new capacity in sectors. The guest's
    /// requests are served from the new image from the next one on; the
    /// caller tells the guest with a configuration-change interrupt. With
    /// `read_only` (or a slot offered read-only) writes are refused.
    pub fn replace(&mut self, file: Option<File>, read_only: bool) -> Result<u64, Error> {
        let size = match &file {
            Some(f) => f.metadata().map_err(Error::HandedStat)?.len(),
            None => 0,
        };
        if size % SECTOR_SIZE != 0 {
            return Err(Error::HandedSize(size));
        }
        self.file = file;
        self.info.capacity = size / SECTOR_SIZE;
        self.info.read_only = self.offered_read_only || read_only;
        Ok(self.info.capacity)
    }

    fn process(&mut self) {
        let Some(a) = self.active.as_mut() else { return };
        // Throttled: the limiter's timer brings the device back.
        if self.limiter.is_blocked() {
            return;
        }
        // An empty slot: a disk of no bytes, on which every read and write
        // is out of bounds.
        let mut nothing: Vec<u8> = Vec::new();
        let file: &mut dyn request::Disk = match self.file.as_mut() {
            Some(f) => f,
            None => &mut nothing,
        };
        let (info, buf, limiter) = (&self.info, &mut self.buf, &mut self.limiter);
        let mem = &a.mem;
        drain_queue_until(&mut a.queue, mem, &a.interrupt, |chain| {
            let Some(req) = Request::parse(chain, mem) else { return Some(0) };
            if !limiter.consume(req.data_len(), 1) {
                return None;
            }
            Some(req.execute(file, info, buf).map_or(0, |o| o.used_len))
        });
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }

    fn features(&self) -> u64 {
        let ro = if self.offered_read_only { VIRTIO_BLK_F_RO } else { 0 };
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

    fn watched_fds(&self) -> Vec<(RawFd, EventSet)> {
        self.limiter.timer_fd().map(|fd| (fd, EventSet::IN)).into_iter().collect()
    }

    fn process_fd(&mut self, fd: RawFd, _events: EventSet, _ops: &mut EventOps) {
        if Some(fd) == self.limiter.timer_fd() {
            self.limiter.on_timer();
            self.process();
        }
    }

    fn as_block_mut(&mut self) -> Option<&mut Block> {
        Some(self)
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

    /// A split queue of 256 entries at `base` (avail ring at +0x1000, used
    /// ring at +0x2000, as `mmio::tests::bring_up` places queue 0 at
    /// 0x10000): offers read request `n` (descriptors 3n..3n+2) of `len`
    /// bytes from sector `n`.
    fn offer_read(m: &GuestMemoryMmap, base: u64, n: u16, len: u32) {
        let hdr = 0x40000 + u64::from(n) * 16;
        header(m, hdr, T_IN, u64::from(n));
        let data = 0x50000 + u64::from(n) * u64::from(len);
        let status = 0x30000 + u64::from(n);
        let first = 3 * n;
        for (i, (addr, l, flags)) in [(hdr, 16, F_NEXT), (data, len, F_NEXT | F_WRITE), (status, 1, F_WRITE)].into_iter().enumerate() {
            let at = base + 16 * u64::from(first + i as u16);
            m.write_obj(addr, GuestAddress(at)).unwrap();
            m.write_obj(l, GuestAddress(at + 8)).unwrap();
            m.write_obj(flags, GuestAddress(at + 12)).unwrap();
            m.write_obj(first + i as u16 + 1, GuestAddress(at + 14)).unwrap();
        }
        m.write_obj(first, GuestAddress(base + 0x1004 + 2 * u64::from(n))).unwrap();
        m.write_obj(n + 1, GuestAddress(base + 0x1002)).unwrap();
    }

    fn used_idx(m: &GuestMemoryMmap, base: u64) -> u16 {
        m.read_obj(GuestAddress(base + 0x2002)).unwrap()
    }

    fn disk_file(name: &str, len: usize) -> std::path::PathBuf {
        let path = std::env::temp_dir().join(format!("vmrun-blk-{name}-{}", std::process::id()));
        std::fs::write(&path, vec![0x5au8; len]).unwrap();
        path
    }

    fn limited(bytes: Option<(u64, u64)>, ops: Option<(u64, u64)>) -> RateLimiter {
        use crate::rate_limiter::{BucketConfig, RateLimitConfig};
        let b = |(size, ms): (u64, u64)| BucketConfig {
            size,
            one_time_burst: 0,
            refill_time: std::time::Duration::from_millis(ms),
        };
        RateLimiter::new(&RateLimitConfig { bandwidth: bytes.map(b), ops: ops.map(b) }).unwrap()
    }

    fn activate_with(dev: &mut Block, m: &GuestMemoryMmap, base: u64) -> Arc<Interrupt> {
        use vmm_sys_util::eventfd::EventFd;
        let mut q = Queue::new(QUEUE_SIZE).unwrap();
        q.set_size(QUEUE_SIZE);
        q.set_desc_table_address(Some(base as u32), Some(0));
        q.set_avail_ring_address(Some((base + 0x1000) as u32), Some(0));
        q.set_used_ring_address(Some((base + 0x2000) as u32), Some(0));
        q.set_ready(true);
        let irq = Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
        dev.activate(ActivateContext { mem: m.clone(), queues: vec![q], acked_features: 0, interrupt: &irq }).unwrap();
        irq
    }

    #[test]
    fn unlimited_disk_has_no_timer_and_serves_everything() {
        let path = disk_file("unlimited", 64 * 1024);
        let m = mem();
        let mut dev = Block::open(&path, false, "u").unwrap();
        assert!(dev.rate_limiter().is_unlimited());
        assert!(dev.watched_fds().is_empty());
        let _irq = activate_with(&mut dev, &m, 0x10000);
        for n in 0..20 {
            offer_read(&m, 0x10000, n, 512);
        }
        dev.process();
        assert_eq!(used_idx(&m, 0x10000), 20);
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn a_limited_disk_stops_and_resumes_on_its_timer() {
        let path = disk_file("limited", 64 * 1024);
        let m = mem();
        // 2 KiB per 100 ms, 4 requests per 100 ms.
        let mut dev = Block::open(&path, false, "l").unwrap().with_rate_limiter(limited(Some((2048, 100)), Some((4, 100))));
        let timer = dev.rate_limiter().timer_fd().unwrap();
        assert_eq!(dev.watched_fds(), vec![(timer, EventSet::IN)]);
        let _irq = activate_with(&mut dev, &m, 0x10000);
        for n in 0..8 {
            offer_read(&m, 0x10000, n, 1024);
        }
        dev.process();
        // Two reads of 1 KiB emptied the bytes bucket; the third waits in the ring.
        assert_eq!(used_idx(&m, 0x10000), 2);
        assert!(dev.rate_limiter().is_blocked());
        let next_avail = dev.queue_states()[0].next_avail;
        assert_eq!(next_avail, 2, "the refused request was put back");
        // A kick while throttled does nothing.
        dev.process();
        assert_eq!(used_idx(&m, 0x10000), 2);
        // The timer brings it back, a little at a time.
        let start = std::time::Instant::now();
        while used_idx(&m, 0x10000) < 8 {
            assert!(start.elapsed() < std::time::Duration::from_secs(5), "stuck at {}", used_idx(&m, 0x10000));
            let mut p = libc::pollfd { fd: timer, events: libc::POLLIN, revents: 0 };
            // SAFETY: one valid pollfd, for the duration of the call.
            assert_eq!(unsafe { libc::poll(&mut p, 1, 1000) }, 1, "the timer fired");
            dev.limiter.on_timer();
            dev.process();
        }
        // 6 KiB at 20 KiB/s: at least about 250 ms (less a little for the
        // partial tokens earned while the first ones ran).
        assert!(start.elapsed() >= std::time::Duration::from_millis(250), "{:?}", start.elapsed());
        for n in 0..8u64 {
            assert_eq!(m.read_obj::<u8>(GuestAddress(0x30000 + n)).unwrap(), S_OK);
        }
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn flushes_cost_an_operation_and_no_bytes() {
        let path = disk_file("flush", 4096);
        let m = mem();
        let mut dev = Block::open(&path, false, "f").unwrap().with_rate_limiter(limited(Some((1, 1000)), Some((3, 1000))));
        let _irq = activate_with(&mut dev, &m, 0x10000);
        for n in 0..4u16 {
            let hdr = 0x40000 + u64::from(n) * 16;
            header(&m, hdr, T_FLUSH, 0);
            let at = 0x10000 + 16 * u64::from(2 * n);
            for (i, (addr, l, flags)) in [(hdr, 16u32, F_NEXT), (0x30000 + u64::from(n), 1, F_WRITE)].into_iter().enumerate() {
                let at = at + 16 * i as u64;
                m.write_obj(addr, GuestAddress(at)).unwrap();
                m.write_obj(l, GuestAddress(at + 8)).unwrap();
                m.write_obj(flags, GuestAddress(at + 12)).unwrap();
                m.write_obj(2 * n + i as u16 + 1, GuestAddress(at + 14)).unwrap();
            }
            m.write_obj(2 * n, GuestAddress(0x11004 + 2 * u64::from(n))).unwrap();
            m.write_obj(n + 1, GuestAddress(0x11002)).unwrap();
        }
        dev.process();
        assert_eq!(used_idx(&m, 0x10000), 3, "the ops bucket, not the 1-byte bytes bucket, stopped it");
        std::fs::remove_file(&path).unwrap();
    }

    /// The whole path: the limiter's timer is registered by the event-loop
    /// handler at activation and wakes the device.
    #[test]
    fn the_event_loop_wakes_a_throttled_disk() {
        use crate::virtio::handler::VirtioEventHandler;
        use crate::virtio::mmio::tests::{bring_up, mem as tmem, wr};
        use crate::virtio::mmio::{MmioTransport, REG_QUEUE_NOTIFY};
        use crate::virtio::VIRTIO_F_VERSION_1;
        use event_manager::{EventManager, SubscriberOps};
        use std::sync::Mutex;
        use vmm_sys_util::eventfd::EventFd;

        let path = disk_file("em", 64 * 1024);
        let m = tmem();
        let dev = Block::open(&path, false, "e").unwrap().with_rate_limiter(limited(None, Some((2, 50))));
        let mut t = MmioTransport::new(Box::new(dev), m.clone(), EventFd::new(libc::EFD_NONBLOCK).unwrap()).unwrap();
        bring_up(&mut t, VIRTIO_F_VERSION_1);
        let t = Arc::new(Mutex::new(t));
        let mut em = EventManager::<VirtioEventHandler>::new().unwrap();
        em.add_subscriber(VirtioEventHandler::new(t.clone()));
        em.run_with_timeout(0).unwrap();
        for n in 0..10 {
            offer_read(&m, 0x10000, n, 512);
        }
        wr(&mut t.lock().unwrap(), REG_QUEUE_NOTIFY, 0);
        em.run_with_timeout(0).unwrap();
        assert_eq!(used_idx(&m, 0x10000), 2, "throttled after the bucket");
        let start = std::time::Instant::now();
        while used_idx(&m, 0x10000) < 10 {
            assert!(start.elapsed() < std::time::Duration::from_secs(5), "the timer never woke the device");
            em.run_with_timeout(100).unwrap();
        }
        // 8 more at 40 per second.
        assert!(start.elapsed() >= std::time::Duration::from_millis(150), "{:?}", start.elapsed());
        // Snapshot and restore keep working; the restored device has a
        // fresh limiter (full buckets) of its own.
        let state = t.lock().unwrap().save();
        let dev = Block::open(&path, false, "e").unwrap().with_rate_limiter(limited(None, Some((2, 50))));
        let r = MmioTransport::restore(Box::new(dev), m, EventFd::new(libc::EFD_NONBLOCK).unwrap(), &state).unwrap();
        assert_eq!(r.save(), state);
        assert!(!r.device().watched_fds().is_empty());
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

    #[test]
    fn a_slots_image_is_replaced_emptied_and_made_read_only() {
        let dir = std::env::temp_dir().join(format!("vmrun-blk-replace-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty.img");
        std::fs::write(&empty, b"").unwrap();
        let mut b = Block::open(&empty, false, "slot").unwrap();
        assert_eq!(b.capacity(), 0);
        let image = dir.join("image.img");
        std::fs::write(&image, vec![7u8; 4096]).unwrap();
        let file = OpenOptions::new().read(true).write(true).open(&image).unwrap();
        assert_eq!(b.replace(Some(file), true).unwrap(), 8);
        assert!(b.info.read_only, "handed over read-only: writes refused");
        assert_eq!(b.features() & VIRTIO_BLK_F_RO, 0, "the slot's offer stays what the guest negotiated");
        let mut cfg = [0u8; 8];
        b.read_config(0, &mut cfg);
        assert_eq!(u64::from_le_bytes(cfg), 8, "the guest reads the new capacity");
        assert_eq!(b.replace(None, false).unwrap(), 0);
        assert!(b.file.is_none() && !b.info.read_only);
        let odd = dir.join("odd.img");
        std::fs::write(&odd, vec![0u8; 1000]).unwrap();
        let e = b.replace(Some(File::open(&odd).unwrap()), false).unwrap_err();
        assert!(matches!(e, Error::HandedSize(1000)), "{e}");
        assert_eq!(b.capacity(), 0, "a refused image changes nothing");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
