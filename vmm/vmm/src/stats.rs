//! KVM's binary statistics (`KVM_GET_STATS_FD`): per-vCPU counters such as
//! `exits` and `insn_emulation` (instructions KVM's emulator executed). On
//! hosts that emulate guest kernel mode, `insn_emulation` counts the guest
//! kernel's instructions: a measure of boot work that depends far less on
//! the machine's speed than a time does.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;

/// `KVM_GET_STATS_FD` = `_IO(KVMIO, 0xce)`.
const KVM_GET_STATS_FD: libc::c_ulong = 0xae_ce;
const HEADER_SIZE: usize = 24;
const DESC_FIXED_SIZE: usize = 16;

/// One counter: where its value lives in the stats file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Descriptor {
    pub name: String,
    /// Offset of the first value, from the start of the data block.
    pub offset: u32,
    /// Number of u64 values.
    pub size: u16,
}

/// Errors reading statistics.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("KVM_GET_STATS_FD is not supported: {0}")]
    Unsupported(std::io::Error),
    #[error("reading KVM statistics: {0}")]
    Io(#[from] std::io::Error),
    #[error("malformed KVM statistics header")]
    Malformed,
}

fn u32_at(b: &[u8], off: usize) -> Result<u32, Error> {
    b.get(off..off + 4).map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]])).ok_or(Error::Malformed)
}

/// Parses the descriptor block (`num_desc` entries, names `name_size` bytes).
pub fn parse_descriptors(block: &[u8], num_desc: usize, name_size: usize) -> Result<Vec<Descriptor>, Error> {
    let stride = DESC_FIXED_SIZE.checked_add(name_size).ok_or(Error::Malformed)?;
    (0..num_desc)
        .map(|i| {
            let d = block.get(i * stride..(i + 1) * stride).ok_or(Error::Malformed)?;
            let size = u16::from_le_bytes([d[6], d[7]]);
            let offset = u32_at(d, 8)?;
            let name_bytes = &d[DESC_FIXED_SIZE..];
            let end = name_bytes.iter().position(|&c| c == 0).unwrap_or(name_bytes.len());
            Ok(Descriptor { name: String::from_utf8_lossy(&name_bytes[..end]).into_owned(), offset, size })
        })
        .collect()
}

/// An open statistics file of one vCPU (or VM).
#[derive(Debug)]
pub struct Stats {
    file: File,
    data_offset: u64,
    descriptors: Vec<Descriptor>,
}

impl Stats {
    /// Opens the statistics of the KVM object behind `fd` (a vCPU or VM fd).
    pub fn open(fd: &impl AsRawFd) -> Result<Self, Error> {
        // SAFETY: KVM_GET_STATS_FD takes no argument and returns a new fd or -1.
        let raw = unsafe { libc::ioctl(fd.as_raw_fd(), KVM_GET_STATS_FD as _) };
        if raw < 0 {
            return Err(Error::Unsupported(std::io::Error::last_os_error()));
        }
        // SAFETY: `raw` is a fresh fd that nothing else owns.
        let file = unsafe { File::from_raw_fd(raw) };
        let mut header = [0u8; HEADER_SIZE];
        file.read_exact_at(&mut header, 0)?;
        let name_size = u32_at(&header, 4)? as usize;
        let num_desc = u32_at(&header, 8)? as usize;
        let desc_offset = u64::from(u32_at(&header, 16)?);
        let data_offset = u64::from(u32_at(&header, 20)?);
        if num_desc > 4096 || name_size > 4096 {
            return Err(Error::Malformed);
        }
        let mut block = vec![0u8; num_desc * (DESC_FIXED_SIZE + name_size)];
        file.read_exact_at(&mut block, desc_offset)?;
        let descriptors = parse_descriptors(&block, num_desc, name_size)?;
        Ok(Self { file, data_offset, descriptors })
    }

    /// The first value of counter `name`, if the kernel has it.
    pub fn read(&self, name: &str) -> Option<u64> {
        let d = self.descriptors.iter().find(|d| d.name == name)?;
        let mut v = [0u8; 8];
        self.file.read_exact_at(&mut v, self.data_offset + u64::from(d.offset)).ok()?;
        Some(u64::from_le_bytes(v))
    }
}

/// Sum of counter `name` over several vCPUs (`None` if none has it).
pub fn sum(stats: &[Stats], name: &str) -> Option<u64> {
    stats.iter().map(|s| s.read(name)).try_fold(0u64, |acc, v| v.map(|v| acc + v))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desc(name: &str, offset: u32, size: u16, name_size: usize) -> Vec<u8> {
        let mut d = Vec::new();
        d.extend_from_slice(&0u32.to_le_bytes()); // flags
        d.extend_from_slice(&0i16.to_le_bytes()); // exponent
        d.extend_from_slice(&size.to_le_bytes());
        d.extend_from_slice(&offset.to_le_bytes());
        d.extend_from_slice(&0u32.to_le_bytes()); // bucket size
        let mut n = name.as_bytes().to_vec();
        n.resize(name_size, 0);
        d.extend_from_slice(&n);
        d
    }

    #[test]
    fn parses_names_and_offsets() {
        let mut block = desc("exits", 0, 1, 48);
        block.extend(desc("insn_emulation", 8, 1, 48));
        let d = parse_descriptors(&block, 2, 48).unwrap();
        assert_eq!(d[1], Descriptor { name: "insn_emulation".into(), offset: 8, size: 1 });
        assert_eq!(d[0].name, "exits");
    }

    #[test]
    fn short_block_is_malformed() {
        let block = desc("exits", 0, 1, 48);
        assert!(matches!(parse_descriptors(&block, 2, 48), Err(Error::Malformed)));
    }
}
