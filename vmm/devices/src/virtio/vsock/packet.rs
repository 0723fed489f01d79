//! The virtio-vsock packet (virtio 1.2, 5.10.6): a 44-byte header, then
//! the payload of an `RW` packet. [`parse`] is a pure function of the
//! header bytes (the fuzz target's entry point); [`read_packet`] and
//! [`write_packet`] move packets through descriptor chains.

use std::io::{Read, Write};

use virtio_queue::{DescriptorChain, Reader, Writer};
use vm_memory::GuestMemoryMmap;

/// Size of `struct virtio_vsock_hdr`.
pub const HEADER_SIZE: usize = 44;
/// The host's CID: what the guest connects to.
pub const HOST_CID: u64 = 2;
/// Largest payload of one packet (Linux's `VIRTIO_VSOCK_MAX_PKT_BUF_SIZE`).
pub const MAX_PAYLOAD: u32 = 64 * 1024;

/// `type`: stream socket, the only type offered.
pub const TYPE_STREAM: u16 = 1;

/// `op` values.
pub const OP_REQUEST: u16 = 1;
pub const OP_RESPONSE: u16 = 2;
pub const OP_RST: u16 = 3;
pub const OP_SHUTDOWN: u16 = 4;
pub const OP_RW: u16 = 5;
pub const OP_CREDIT_UPDATE: u16 = 6;
pub const OP_CREDIT_REQUEST: u16 = 7;

/// `flags` of a SHUTDOWN: the sender will receive no more data.
pub const SHUTDOWN_RCV: u32 = 1;
/// `flags` of a SHUTDOWN: the sender will send no more data.
pub const SHUTDOWN_SEND: u32 = 2;

/// `struct virtio_vsock_hdr`, in host byte order.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub type_: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

/// Why a header was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseError {
    #[error("vsock header is {0} bytes, needs {HEADER_SIZE}")]
    Short(usize),
    #[error("vsock payload of {0} bytes is over the {MAX_PAYLOAD}-byte limit")]
    TooLong(u32),
}

fn u16_at(b: &[u8; HEADER_SIZE], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8; HEADER_SIZE], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8; HEADER_SIZE], at: usize) -> u64 {
    u64::from(u32_at(b, at)) | (u64::from(u32_at(b, at + 4)) << 32)
}

/// Decodes the first [`HEADER_SIZE`] bytes of `bytes`. Only the sizes are
/// checked here; what the fields mean (op, type, CIDs, ports) is the
/// muxer's business.
pub fn parse(bytes: &[u8]) -> Result<Header, ParseError> {
    let b: &[u8; HEADER_SIZE] = bytes
        .get(..HEADER_SIZE)
        .and_then(|b| b.try_into().ok())
        .ok_or(ParseError::Short(bytes.len()))?;
    let h = Header {
        src_cid: u64_at(b, 0),
        dst_cid: u64_at(b, 8),
        src_port: u32_at(b, 16),
        dst_port: u32_at(b, 20),
        len: u32_at(b, 24),
        type_: u16_at(b, 28),
        op: u16_at(b, 30),
        flags: u32_at(b, 32),
        buf_alloc: u32_at(b, 36),
        fwd_cnt: u32_at(b, 40),
    };
    if h.len > MAX_PAYLOAD {
        return Err(ParseError::TooLong(h.len));
    }
    Ok(h)
}

impl Header {
    /// The wire form.
    pub fn to_bytes(&self) -> [u8; HEADER_SIZE] {
        let mut b = [0u8; HEADER_SIZE];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }
}

/// Why a packet could not be taken from the tx queue.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TxError {
    #[error("descriptor chain is not in guest memory")]
    Chain,
    #[error(transparent)]
    Header(#[from] ParseError),
    /// The header is fine but the chain holds fewer payload bytes than it
    /// says: the header is kept so the connection can be reset.
    #[error("vsock packet says {} payload bytes, the chain holds {avail}", .header.len)]
    Truncated { header: Header, avail: usize },
}

/// Reads one packet from the device-readable part of `chain`: the header,
/// and for an `RW` packet its payload into `payload` (cleared first; other
/// ops carry none and any bytes after their header are ignored).
pub fn read_packet(
    chain: DescriptorChain<&GuestMemoryMmap>,
    mem: &GuestMemoryMmap,
    payload: &mut Vec<u8>,
) -> Result<Header, TxError> {
    payload.clear();
    let mut r: Reader<'_> = chain.reader(mem).map_err(|_| TxError::Chain)?;
    let mut hb = [0u8; HEADER_SIZE];
    let got = r.available_bytes().min(HEADER_SIZE);
    r.read_exact(&mut hb[..got]).map_err(|_| TxError::Chain)?;
    let header = parse(&hb[..got])?;
    if header.op != OP_RW {
        return Ok(header);
    }
    let len = header.len as usize;
    let avail = r.available_bytes();
    if avail < len {
        return Err(TxError::Truncated { header, avail });
    }
    payload.resize(len, 0);
    r.read_exact(payload).map_err(|_| TxError::Chain)?;
    Ok(header)
}

/// Writes `header` (its `len` set to the payload's) and `payload` into
/// `w`; returns the bytes written. The caller checked the room.
pub fn write_packet(w: &mut Writer<'_>, header: &Header, payload: &[u8]) -> std::io::Result<u32> {
    let header = Header { len: payload.len() as u32, ..*header };
    w.write_all(&header.to_bytes())?;
    w.write_all(payload)?;
    Ok((HEADER_SIZE + payload.len()) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    const F_WRITE: u16 = 2;

    fn sample() -> Header {
        Header {
            src_cid: 3,
            dst_cid: HOST_CID,
            src_port: 0x1234_5678,
            dst_port: 52,
            len: 5,
            type_: TYPE_STREAM,
            op: OP_RW,
            flags: 0,
            buf_alloc: 0x40000,
            fwd_cnt: 0xdead_beef,
        }
    }

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap()
    }

    fn d(addr: u64, len: u32, flags: u16) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0))
    }

    #[test]
    fn round_trip_and_wire_layout() {
        let h = sample();
        let b = h.to_bytes();
        assert_eq!(parse(&b), Ok(h));
        assert_eq!(&b[0..8], &3u64.to_le_bytes());
        assert_eq!(&b[24..28], &5u32.to_le_bytes());
        assert_eq!(&b[30..32], &OP_RW.to_le_bytes());
        assert_eq!(&b[40..44], &0xdead_beefu32.to_le_bytes());
        // Trailing bytes are not the header's.
        let mut long = b.to_vec();
        long.extend_from_slice(&[9; 10]);
        assert_eq!(parse(&long), Ok(h));
    }

    #[test]
    fn short_and_oversized_headers_are_refused() {
        let b = sample().to_bytes();
        for n in 0..HEADER_SIZE {
            assert_eq!(parse(&b[..n]), Err(ParseError::Short(n)));
        }
        let big = Header { len: MAX_PAYLOAD + 1, ..sample() };
        assert_eq!(parse(&big.to_bytes()), Err(ParseError::TooLong(MAX_PAYLOAD + 1)));
        let max = Header { len: MAX_PAYLOAD, ..sample() };
        assert!(parse(&max.to_bytes()).is_ok());
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        // A cheap stand-in for the fuzz target: pseudo-random headers.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..10_000 {
            let mut b = [0u8; HEADER_SIZE];
            for byte in &mut b {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *byte = x as u8;
            }
            if let Ok(h) = parse(&b) {
                assert!(h.len <= MAX_PAYLOAD);
                assert_eq!(h.to_bytes(), b);
            }
        }
    }

    #[test]
    fn reads_header_and_payload_split_over_descriptors() {
        let m = mem();
        let h = sample();
        let b = h.to_bytes();
        // Header split 20 + 24, payload in a third descriptor.
        m.write_slice(&b[..20], GuestAddress(0x10000)).unwrap();
        m.write_slice(&b[20..], GuestAddress(0x11000)).unwrap();
        m.write_slice(b"hello", GuestAddress(0x12000)).unwrap();
        let q = MockSplitQueue::new(&m, 16);
        let chain = q.build_desc_chain(&[d(0x10000, 20, 0), d(0x11000, 24, 0), d(0x12000, 5, 0)]).unwrap();
        let mut p = Vec::new();
        assert_eq!(read_packet(chain, &m, &mut p), Ok(h));
        assert_eq!(p, b"hello");
    }

    #[test]
    fn malformed_chains_are_errors() {
        let m = mem();
        let q = MockSplitQueue::new(&m, 16);
        let mut p = Vec::new();
        m.write_slice(&sample().to_bytes(), GuestAddress(0x10000)).unwrap();
        // Header cut short.
        let chain = q.build_desc_chain(&[d(0x10000, 30, 0)]).unwrap();
        assert_eq!(read_packet(chain, &m, &mut p), Err(TxError::Header(ParseError::Short(30))));
        // Only device-writable buffers: no header at all.
        let chain = q.build_desc_chain(&[d(0x10000, 44, F_WRITE)]).unwrap();
        assert_eq!(read_packet(chain, &m, &mut p), Err(TxError::Header(ParseError::Short(0))));
        // Payload shorter than `len`.
        let chain = q.build_desc_chain(&[d(0x10000, 44, 0), d(0x12000, 3, 0)]).unwrap();
        assert!(matches!(read_packet(chain, &m, &mut p), Err(TxError::Truncated { avail: 3, .. })));
        // Outside guest memory.
        let chain = q.build_desc_chain(&[d(0x10000, 44, 0), d(0xffff_0000, 5, 0)]).unwrap();
        assert_eq!(read_packet(chain, &m, &mut p), Err(TxError::Chain));
        // A length that does not fit a u32 sum: a 4 GiB descriptor.
        let chain = q.build_desc_chain(&[d(0x10000, u32::MAX, 0)]).unwrap();
        assert_eq!(read_packet(chain, &m, &mut p), Err(TxError::Chain));
    }

    #[test]
    fn non_rw_packets_carry_no_payload() {
        let m = mem();
        let q = MockSplitQueue::new(&m, 16);
        let h = Header { op: OP_CREDIT_UPDATE, len: 100, ..sample() };
        m.write_slice(&h.to_bytes(), GuestAddress(0x10000)).unwrap();
        let chain = q.build_desc_chain(&[d(0x10000, 44, 0)]).unwrap();
        let mut p = vec![1, 2, 3];
        assert_eq!(read_packet(chain, &m, &mut p), Ok(h));
        assert!(p.is_empty());
    }

    #[test]
    fn writes_into_split_rx_buffers() {
        let m = mem();
        let q = MockSplitQueue::new(&m, 16);
        let chain = q.build_desc_chain(&[d(0x10000, 10, F_WRITE), d(0x11000, 100, F_WRITE)]).unwrap();
        let mut w: Writer<'_> = chain.writer(&m).unwrap();
        let n = write_packet(&mut w, &Header { len: 999, ..sample() }, b"abc").unwrap();
        assert_eq!(n, 47);
        let mut b = [0u8; HEADER_SIZE];
        m.read_slice(&mut b[..10], GuestAddress(0x10000)).unwrap();
        m.read_slice(&mut b[10..], GuestAddress(0x11000)).unwrap();
        assert_eq!(parse(&b).unwrap().len, 3);
        let mut p = [0u8; 3];
        m.read_slice(&mut p, GuestAddress(0x11000 + 34)).unwrap();
        assert_eq!(&p, b"abc");
    }
}
