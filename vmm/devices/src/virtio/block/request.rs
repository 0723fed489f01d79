//! One virtio-blk request: parsing the guest's descriptor chain and doing
//! the I/O. Kept apart from the device so it can be unit-tested and fuzzed
//! against an in-memory disk.
//!
//! A request is a 16-byte header (type, reserved, sector) in device-readable
//! buffers, data buffers (readable for writes, writable for reads), and a
//! final writable status byte.

use std::io::{Read, Write};

use virtio_queue::{DescriptorChain, Reader, Writer};
use vm_memory::{ByteValued, GuestMemoryMmap};

/// Request types (virtio 1.2, 5.2.6).
pub const T_IN: u32 = 0;
pub const T_OUT: u32 = 1;
pub const T_FLUSH: u32 = 4;
pub const T_GET_ID: u32 = 8;
/// Status values.
pub const S_OK: u8 = 0;
pub const S_IOERR: u8 = 1;
pub const S_UNSUPP: u8 = 2;
/// Sector size of the virtio-blk protocol.
pub const SECTOR_SIZE: u64 = 512;
/// Length of the GET_ID answer.
pub const ID_LEN: usize = 20;
/// Bytes copied per step between the disk and guest memory.
const CHUNK: usize = 128 * 1024;

#[derive(Clone, Copy, Default, Debug)]
#[repr(C)]
struct RequestHeader {
    request_type: u32,
    reserved: u32,
    sector: u64,
}
// SAFETY: plain integers, no padding, any bit pattern is valid.
unsafe impl ByteValued for RequestHeader {}

/// Where the blocks are: a file in the VMM, a vector in tests.
pub trait Disk {
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> std::io::Result<()>;
    fn write_at(&mut self, buf: &[u8], offset: u64) -> std::io::Result<()>;
    fn flush(&mut self) -> std::io::Result<()>;
}

impl Disk for std::fs::File {
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        std::os::unix::fs::FileExt::read_exact_at(self, buf, offset)
    }
    fn write_at(&mut self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        std::os::unix::fs::FileExt::write_all_at(self, buf, offset)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.sync_data()
    }
}

impl Disk for Vec<u8> {
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let start = usize::try_from(offset).map_err(std::io::Error::other)?;
        let src = self.get(start..start + buf.len()).ok_or(std::io::ErrorKind::UnexpectedEof)?;
        buf.copy_from_slice(src);
        Ok(())
    }
    fn write_at(&mut self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        let start = usize::try_from(offset).map_err(std::io::Error::other)?;
        let dst = self.get_mut(start..start + buf.len()).ok_or(std::io::ErrorKind::UnexpectedEof)?;
        dst.copy_from_slice(buf);
        Ok(())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The disk and what the guest may do with it.
#[derive(Debug)]
pub struct DiskInfo {
    /// Size in 512-byte sectors.
    pub capacity: u64,
    pub read_only: bool,
    pub id: [u8; ID_LEN],
}

/// What a request came to: its status, and how many bytes the device
/// wrote into the chain (the used length).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    pub status: u8,
    pub used_len: u32,
}

/// Checks that `len` bytes at `sector` lie inside the disk.
fn in_bounds(info: &DiskInfo, sector: u64, len: u64) -> Option<u64> {
    if len % SECTOR_SIZE != 0 {
        return None;
    }
    let offset = sector.checked_mul(SECTOR_SIZE)?;
    let end = offset.checked_add(len)?;
    (end <= info.capacity.checked_mul(SECTOR_SIZE)?).then_some(offset)
}

fn do_read(disk: &mut dyn Disk, data: &mut Writer<'_>, offset: u64, len: usize, buf: &mut Vec<u8>) -> bool {
    let mut done = 0;
    while done < len {
        let n = (len - done).min(CHUNK);
        buf.resize(n, 0);
        if disk.read_at(&mut buf[..n], offset + done as u64).is_err() || data.write_all(&buf[..n]).is_err() {
            return false;
        }
        done += n;
    }
    true
}

fn do_write(disk: &mut dyn Disk, data: &mut Reader<'_>, offset: u64, len: usize, buf: &mut Vec<u8>) -> bool {
    let mut done = 0;
    while done < len {
        let n = (len - done).min(CHUNK);
        buf.resize(n, 0);
        if data.read_exact(&mut buf[..n]).is_err() || disk.write_at(&buf[..n], offset + done as u64).is_err() {
            return false;
        }
        done += n;
    }
    true
}

/// A request taken apart: its header (if it had one to read), its data
/// buffers and its status byte. Parsing reads the descriptors once; what
/// [`Request::data_len`] reports is what [`Request::execute`] moves, so a
/// guest cannot change a request between its accounting and its I/O.
pub struct Request<'a> {
    header: Option<RequestHeader>,
    reader: Reader<'a>,
    data: Writer<'a>,
    status: Writer<'a>,
}

impl std::fmt::Debug for Request<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Request")
            .field("header", &self.header)
            .field("readable", &self.reader.available_bytes())
            .field("writable", &self.data.available_bytes())
            .finish()
    }
}

impl<'a> Request<'a> {
    /// Parses `chain`. `None` when the chain cannot carry a status at all
    /// (no writable byte, or buffers outside guest memory): the caller
    /// returns it with a used length of zero.
    pub fn parse(chain: DescriptorChain<&'a GuestMemoryMmap>, mem: &'a GuestMemoryMmap) -> Option<Self> {
        let mut reader = chain.clone().reader(mem).ok()?;
        let mut writer = chain.writer(mem).ok()?;
        let writable = writer.available_bytes();
        if writable == 0 {
            return None;
        }
        let status = writer.split_at(writable - 1).ok()?;
        let header = reader.read_obj::<RequestHeader>().ok();
        Some(Self { header, reader, data: writer, status })
    }

    /// The bytes the request moves between the disk and guest memory (zero
    /// for anything but reads and writes), for rate limiting.
    pub fn data_len(&self) -> u64 {
        match self.header.map(|h| h.request_type) {
            Some(T_IN) => self.data.available_bytes() as u64,
            Some(T_OUT) => self.reader.available_bytes() as u64,
            _ => 0,
        }
    }

    /// Does the I/O and writes the status. `None` when the status byte
    /// cannot be written.
    pub fn execute(self, disk: &mut dyn Disk, info: &DiskInfo, buf: &mut Vec<u8>) -> Option<Outcome> {
        let Self { header, mut reader, mut data, status: mut status_writer } = self;
        let status = match header {
            None => S_IOERR,
            Some(h) => match h.request_type {
                T_IN => {
                    let len = data.available_bytes();
                    match in_bounds(info, h.sector, len as u64) {
                        Some(offset) if do_read(disk, &mut data, offset, len, buf) => S_OK,
                        _ => S_IOERR,
                    }
                }
                T_OUT => {
                    let len = reader.available_bytes();
                    if info.read_only {
                        S_IOERR
                    } else {
                        match in_bounds(info, h.sector, len as u64) {
                            Some(offset) if do_write(disk, &mut reader, offset, len, buf) => S_OK,
                            _ => S_IOERR,
                        }
                    }
                }
                T_FLUSH => {
                    if disk.flush().is_ok() {
                        S_OK
                    } else {
                        S_IOERR
                    }
                }
                T_GET_ID => {
                    let n = data.available_bytes().min(ID_LEN);
                    if data.write_all(&info.id[..n]).is_ok() {
                        S_OK
                    } else {
                        S_IOERR
                    }
                }
                _ => S_UNSUPP,
            },
        };
        status_writer.write_all(&[status]).ok()?;
        let used_len = (data.bytes_written() + status_writer.bytes_written()) as u32;
        Some(Outcome { status, used_len })
    }
}

/// Executes the request in `chain`. `None` when the chain cannot carry a
/// status at all (no writable byte, or buffers outside guest memory): the
/// caller returns it with a used length of zero.
pub fn execute(
    chain: DescriptorChain<&GuestMemoryMmap>,
    mem: &GuestMemoryMmap,
    disk: &mut dyn Disk,
    info: &DiskInfo,
    buf: &mut Vec<u8>,
) -> Option<Outcome> {
    Request::parse(chain, mem)?.execute(disk, info, buf)
}
