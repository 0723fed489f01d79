//! Device-side microbenchmark: how fast the VMM's own virtio code moves
//! requests, with no guest (its descriptor chains are built in memory the
//! way a driver would). On hosts that emulate guest kernel mode the guest
//! is far slower than this, so this is where the VMM's own cost shows.
//!
//! `cargo bench -p vmrun-devices --bench virtio_devices`

#![allow(clippy::unwrap_used)] // a benchmark: any failure aborts it

use std::time::{Duration, Instant};

use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};
use vmrun_devices::rate_limiter::{RateLimitConfig, RateLimiter};
use vmrun_devices::virtio::block::request::{execute, DiskInfo, Request, T_IN, T_OUT};
use vmrun_devices::virtio::rng::fill_request;

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const QUEUE: u16 = 256;
const HDR: u64 = 0x10_0000;
const DATA: u64 = 0x20_0000;
const STATUS: u64 = 0x1f_0000;

fn cpu_time() -> Duration {
    // SAFETY: getrusage fills the zeroed struct it is given.
    let u = unsafe {
        let mut u: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut u);
        u
    };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(u.ru_utime) + tv(u.ru_stime)
}

fn d(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
}

/// Runs `requests` block requests of `size` bytes, refilling the queue as
/// a driver would. Returns (wall, cpu).
fn block(kind: u32, size: u32, requests: usize, disk: &mut Vec<u8>) -> (Duration, Duration) {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap();
    mem.write_obj(kind, GuestAddress(HDR)).unwrap();
    let sectors = disk.len() as u64 / 512;
    let info = DiskInfo { capacity: sectors, read_only: false, id: [0; 20] };
    let q = MockSplitQueue::new(&mem, QUEUE);
    let data_flags = if kind == T_IN { F_NEXT | F_WRITE } else { F_NEXT };
    let mut buf = Vec::new();
    let (wall, cpu) = (Instant::now(), cpu_time());
    let mut done = 0;
    while done < requests {
        // A batch of chains: 3 descriptors each.
        let batch = (requests - done).min(usize::from(QUEUE / 3));
        let mut descs = Vec::with_capacity(batch * 3);
        for i in 0..batch {
            let base = (i * 3) as u16;
            let sector = ((done + i) as u64 * u64::from(size) / 512) % (sectors - u64::from(size) / 512);
            mem.write_obj(sector, GuestAddress(HDR + 8)).unwrap();
            descs.push(d(HDR, 16, F_NEXT, base + 1));
            descs.push(d(DATA, size, data_flags, base + 2));
            descs.push(d(STATUS + i as u64, 1, F_WRITE, 0));
        }
        // Each batch starts on an empty ring and a fresh queue.
        mem.write_obj(0u16, q.avail_addr().unchecked_add(2)).unwrap();
        q.add_desc_chains(&descs, 0).unwrap();
        let mut queue: Queue = q.create_queue().unwrap();
        while let Some(chain) = queue.pop_descriptor_chain(&mem) {
            let head = chain.head_index();
            let o = execute(chain, &mem, disk, &info, &mut buf).expect("request");
            assert_eq!(o.status, 0);
            queue.add_used(&mem, head, o.used_len).unwrap();
        }
        done += batch;
    }
    (wall.elapsed(), cpu_time() - cpu)
}

fn rng(size: u32, requests: usize) -> (Duration, Duration) {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap();
    let q = MockSplitQueue::new(&mem, 16);
    let (wall, cpu) = (Instant::now(), cpu_time());
    for _ in 0..requests {
        mem.write_obj(0u16, q.avail_addr().unchecked_add(2)).unwrap();
        let chain = q.build_desc_chain(&[d(DATA, size, F_WRITE, 0)]).unwrap();
        assert_eq!(fill_request(chain, &mem), size);
    }
    (wall.elapsed(), cpu_time() - cpu)
}

/// Reads of `size` bytes through a rate limiter of `rate` bytes per second
/// (the `--disk ...,bw=` bucket: one second's worth), the way the device
/// uses it: a refused request waits for the limiter's timer. The first
/// full bucket is spent before measuring, so what is measured is the
/// sustained rate. Returns (bytes per second achieved, timer wake-ups).
fn limited_block(size: u32, rate: u64, run: Duration, disk: &mut Vec<u8>) -> (f64, u64) {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap();
    mem.write_obj(T_IN, GuestAddress(HDR)).unwrap();
    mem.write_obj(0u64, GuestAddress(HDR + 8)).unwrap();
    let info = DiskInfo { capacity: disk.len() as u64 / 512, read_only: false, id: [0; 20] };
    let q = MockSplitQueue::new(&mem, QUEUE);
    let mut buf = Vec::new();
    let mut limiter = RateLimiter::new(&RateLimitConfig::per_second(Some(rate), None)).unwrap();
    let timer = limiter.timer_fd().unwrap();
    let wait = |limiter: &mut RateLimiter| {
        let mut p = libc::pollfd { fd: timer, events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd, for the duration of the call.
        assert_eq!(unsafe { libc::poll(&mut p, 1, 5000) }, 1, "the limiter's timer never fired");
        limiter.on_timer();
    };
    while limiter.consume(u64::from(size), 1) {}
    wait(&mut limiter);
    let (start, mut bytes, mut wakeups) = (Instant::now(), 0u64, 0u64);
    while start.elapsed() < run {
        mem.write_obj(0u16, q.avail_addr().unchecked_add(2)).unwrap();
        let chain = q
            .build_desc_chain(&[d(HDR, 16, F_NEXT, 1), d(DATA, size, F_NEXT | F_WRITE, 2), d(STATUS, 1, F_WRITE, 0)])
            .unwrap();
        let req = Request::parse(chain, &mem).unwrap();
        if limiter.consume(req.data_len(), 1) {
            assert_eq!(req.execute(disk, &info, &mut buf).unwrap().status, 0);
            bytes += u64::from(size);
        } else {
            wait(&mut limiter);
            wakeups += 1;
        }
    }
    (bytes as f64 / start.elapsed().as_secs_f64(), wakeups)
}

fn report(name: &str, size: u32, requests: usize, (wall, cpu): (Duration, Duration)) {
    let bytes = size as f64 * requests as f64;
    let gib = bytes / (1u64 << 30) as f64;
    println!(
        "{name:<26} {:>8} B  {:>10.0} req/s  {:>8.2} GiB/s  {:>8.1} ms CPU/GiB",
        size,
        requests as f64 / wall.as_secs_f64(),
        gib / wall.as_secs_f64(),
        cpu.as_secs_f64() * 1000.0 / gib
    );
}

fn main() {
    println!("virtio device-side microbenchmark (no guest; in-memory disk)\n");
    let mut disk = vec![0u8; 256 << 20];
    for &(size, n) in &[(4096u32, 200_000usize), (65536, 40_000), (1 << 20, 2_000)] {
        report("virtio-blk read", size, n, block(T_IN, size, n, &mut disk));
        report("virtio-blk write", size, n, block(T_OUT, size, n, &mut disk));
    }
    report("virtio-rng", 64, 100_000, rng(64, 100_000));
    println!();
    const MIB: f64 = (1u64 << 20) as f64;
    for size in [4096u32, 65536, 1 << 20] {
        let (rate, wakeups) = limited_block(size, 100 << 20, Duration::from_secs(3), &mut disk);
        println!(
            "virtio-blk read, bw=100m  {size:>8} B  {:>8.1} MiB/s sustained ({:+.1}% of the limit), {wakeups} timer wake-ups in 3 s",
            rate / MIB,
            (rate / (100.0 * MIB) - 1.0) * 100.0
        );
    }
}
