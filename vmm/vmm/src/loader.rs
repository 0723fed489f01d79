//! Putting the guest's software into its memory: the kernel (ELF vmlinux or
//! bzImage), the initramfs, the command line and the zero page.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::{load_cmdline, BzImage, Cmdline, Elf, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::error::{Error, Result};
use vmrun_arch::boot_params::{self, BootParamsConfig, InitrdLocation};
use vmrun_arch::layout::{CMDLINE_MAX_SIZE, CMDLINE_START, HIGH_MEMORY_START, SETUP_DATA_START, ZERO_PAGE_START};

/// Offset of the 64-bit entry point in a bzImage's protected-mode code.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
/// Offset of the setup header's "HdrS" magic in a bzImage.
const BZIMAGE_HDRS_OFFSET: u64 = 0x202;

/// A kernel loaded into guest memory.
#[derive(Debug, Clone, Copy)]
pub struct LoadedKernel {
    /// Where the boot vCPU starts executing.
    pub entry: u64,
    /// First guest address past the kernel image.
    pub end: u64,
    /// The bzImage's setup header (none for an ELF vmlinux).
    pub setup_header: Option<setup_header>,
}

#[derive(Debug, PartialEq, Eq)]
enum KernelFormat {
    Elf,
    BzImage,
}

fn detect_format(file: &mut File) -> std::io::Result<Option<KernelFormat>> {
    let mut magic = [0u8; 4];
    file.seek(SeekFrom::Start(0))?;
    if file.read(&mut magic)? == 4 && &magic == b"\x7fELF" {
        return Ok(Some(KernelFormat::Elf));
    }
    file.seek(SeekFrom::Start(BZIMAGE_HDRS_OFFSET))?;
    if file.read(&mut magic)? == 4 && &magic == b"HdrS" {
        return Ok(Some(KernelFormat::BzImage));
    }
    Ok(None)
}

/// Loads the kernel at `path`.
pub fn load_kernel(mem: &GuestMemoryMmap, path: &Path) -> Result<LoadedKernel> {
    let mut file = File::open(path).map_err(|source| Error::Open { what: "kernel", path: path.into(), source })?;
    let format = detect_format(&mut file)
        .map_err(|source| Error::Open { what: "kernel", path: path.into(), source })?
        .ok_or_else(|| Error::KernelFormat {
            path: path.into(),
            reason: "neither an ELF file nor a bzImage".into(),
        })?;
    let load_error = |e: linux_loader::loader::Error| Error::KernelLoad { path: path.into(), reason: e.to_string() };
    match format {
        KernelFormat::Elf => {
            let r = Elf::load(mem, None, &mut file, Some(GuestAddress(HIGH_MEMORY_START))).map_err(load_error)?;
            Ok(LoadedKernel { entry: r.kernel_load.0, end: r.kernel_end, setup_header: None })
        }
        KernelFormat::BzImage => {
            let r = BzImage::load(mem, None, &mut file, Some(GuestAddress(HIGH_MEMORY_START))).map_err(load_error)?;
            Ok(LoadedKernel {
                entry: r.kernel_load.0 + BZIMAGE_64BIT_ENTRY_OFFSET,
                end: r.kernel_end,
                setup_header: r.setup_header,
            })
        }
    }
}

/// Loads the initramfs at `path` as high in low memory as it fits.
pub fn load_initrd(mem: &GuestMemoryMmap, mem_mib: u32, kernel: &LoadedKernel, path: &Path) -> Result<InitrdLocation> {
    let mut file = File::open(path).map_err(|source| Error::Open { what: "initramfs", path: path.into(), source })?;
    let size = file
        .metadata()
        .map_err(|source| Error::InitrdRead { path: path.into(), source })?
        .len();
    let addr_max = kernel.setup_header.map(|h| h.initrd_addr_max).unwrap_or(0);
    let addr = boot_params::initrd_address(u64::from(mem_mib) << 20, kernel.end, size, addr_max)
        .ok_or(Error::InitrdTooLarge { path: path.into(), size, mem_mib })?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, size as usize).map_err(|e| Error::InitrdRead {
        path: path.into(),
        source: std::io::Error::other(e.to_string()),
    })?;
    Ok(InitrdLocation { addr, size })
}

/// Builds the command line (checking its length) and writes it.
pub fn load_command_line(mem: &GuestMemoryMmap, cmdline: &str) -> Result<usize> {
    let c = Cmdline::try_from(cmdline, CMDLINE_MAX_SIZE).map_err(|e| Error::Cmdline(e.to_string()))?;
    load_cmdline(mem, GuestAddress(CMDLINE_START), &c).map_err(|e| Error::Cmdline(e.to_string()))?;
    Ok(cmdline.len())
}

/// Bytes of the random seed each boot hands its guest.
const RNG_SEED_LEN: usize = 32;

/// Writes a fresh seed for the guest's random generator, from the host's
/// (`getrandom`), as a `setup_data` entry at [`SETUP_DATA_START`], and
/// returns its address for the zero page. Each boot gets its own; a VM
/// restored from a snapshot is reseeded by its agent instead.
pub fn load_rng_seed(mem: &GuestMemoryMmap) -> Result<u64> {
    let mut seed = [0u8; RNG_SEED_LEN];
    vmrun_devices::virtio::rng::host_random(&mut seed).map_err(|e| Error::BootSetup(format!("a random seed for the guest: {e}")))?;
    let entry = boot_params::rng_seed_setup_data(&seed);
    mem.write_slice(&entry, GuestAddress(SETUP_DATA_START))
        .map_err(|e| Error::BootSetup(format!("the random seed's setup_data: {e}")))?;
    Ok(SETUP_DATA_START)
}

/// Writes the zero page.
pub fn write_boot_params(
    mem: &GuestMemoryMmap,
    mem_mib: u32,
    kernel: &LoadedKernel,
    cmdline_len: usize,
    initrd: Option<InitrdLocation>,
    setup_data: Option<u64>,
) -> Result<()> {
    let params = boot_params::build(&BootParamsConfig {
        mem_size: u64::from(mem_mib) << 20,
        cmdline_len,
        initrd,
        setup_header: kernel.setup_header,
        setup_data,
    })
    .map_err(|e| Error::Config(e.to_string()))?;
    LinuxBootConfigurator::write_bootparams(&BootParams::new(&params, GuestAddress(ZERO_PAGE_START)), mem)
        .map_err(|e| Error::BootSetup(format!("zero page: {e}")))?;
    debug_assert!(mem.read_obj::<u8>(GuestAddress(ZERO_PAGE_START)).is_ok());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap()
    }

    fn temp_file(name: &str, bytes: &[u8]) -> std::path::PathBuf {
        let p = std::env::temp_dir().join(format!("vmrun-loader-{}-{name}", std::process::id()));
        File::create(&p).unwrap().write_all(bytes).unwrap();
        p
    }

    #[test]
    fn each_boot_gets_its_own_rng_seed_as_setup_data() {
        let m = mem();
        let read = |m: &GuestMemoryMmap| {
            let mut e = [0u8; 16 + RNG_SEED_LEN];
            m.read_slice(&mut e, GuestAddress(SETUP_DATA_START)).unwrap();
            e
        };
        assert_eq!(load_rng_seed(&m).unwrap(), SETUP_DATA_START);
        let first = read(&m);
        assert_eq!(u64::from_le_bytes(first[..8].try_into().unwrap()), 0, "the only entry");
        assert_eq!(u32::from_le_bytes(first[8..12].try_into().unwrap()), boot_params::SETUP_RNG_SEED);
        assert_eq!(u32::from_le_bytes(first[12..16].try_into().unwrap()) as usize, RNG_SEED_LEN);
        load_rng_seed(&m).unwrap();
        let second = read(&m);
        assert_ne!(first[16..], second[16..], "a fresh seed each time");
        assert_ne!(second[16..], [0u8; RNG_SEED_LEN]);
    }

    #[test]
    fn missing_kernel_names_the_file() {
        let e = load_kernel(&mem(), Path::new("/nonexistent/vmlinux")).unwrap_err();
        assert!(matches!(e, Error::Open { what: "kernel", .. }), "{e}");
        assert!(e.to_string().contains("/nonexistent/vmlinux"));
    }

    #[test]
    fn garbage_is_not_a_kernel() {
        let p = temp_file("garbage", &[0x55; 4096]);
        let e = load_kernel(&mem(), &p).unwrap_err();
        assert!(matches!(e, Error::KernelFormat { .. }), "{e}");
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn truncated_elf_is_a_load_error() {
        // An ELF magic and nothing else.
        let p = temp_file("truncated", b"\x7fELF\x02\x01\x01");
        let e = load_kernel(&mem(), &p).unwrap_err();
        assert!(matches!(e, Error::KernelLoad { .. }), "{e}");
        std::fs::remove_file(p).unwrap();
    }

    /// A minimal bzImage: one setup sector after the boot sector, then the
    /// "protected-mode kernel".
    fn fake_bzimage(payload: &[u8]) -> Vec<u8> {
        let mut img = vec![0u8; 1024];
        img[0x1f1] = 1; // setup_sects
        img[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
        img[0x202..0x206].copy_from_slice(b"HdrS");
        img[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
        img[0x211] = 1; // loadflags: LOADED_HIGH
        img[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes()); // code32_start
        img.extend_from_slice(payload);
        img
    }

    #[test]
    fn bzimage_is_loaded_at_code32_start_with_its_header() {
        let p = temp_file("bzimage", &fake_bzimage(b"KERNEL CODE"));
        let m = mem();
        let k = load_kernel(&m, &p).unwrap();
        assert_eq!(k.entry, 0x10_0000 + BZIMAGE_64BIT_ENTRY_OFFSET);
        assert_eq!({ k.setup_header.expect("bzImage header").version }, 0x020f);
        let mut got = [0u8; 11];
        m.read_slice(&mut got, GuestAddress(0x10_0000)).unwrap();
        assert_eq!(&got, b"KERNEL CODE");
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn bzimage_without_loaded_high_is_refused() {
        let mut img = fake_bzimage(b"x");
        img[0x211] = 0;
        let p = temp_file("old-bzimage", &img);
        assert!(matches!(load_kernel(&mem(), &p), Err(Error::KernelLoad { .. })));
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn initrd_too_large_for_memory() {
        let p = temp_file("big-initrd", &vec![0u8; 1 << 20]);
        let k = LoadedKernel { entry: 0x100_0000, end: 0x3f8_0000, setup_header: None };
        let e = load_initrd(&mem(), 64, &k, &p).unwrap_err();
        assert!(matches!(e, Error::InitrdTooLarge { .. }), "{e}");
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn initrd_lands_at_the_top() {
        let p = temp_file("initrd", b"070701 fake cpio");
        let m = mem();
        let k = LoadedKernel { entry: 0x100_0000, end: 0x200_0000, setup_header: None };
        let loc = load_initrd(&m, 64, &k, &p).unwrap();
        assert_eq!(loc.size, 16);
        let mut got = [0u8; 6];
        m.read_slice(&mut got, GuestAddress(loc.addr)).unwrap();
        assert_eq!(&got, b"070701");
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn overlong_command_line_is_refused() {
        let long = "x".repeat(CMDLINE_MAX_SIZE + 1);
        assert!(matches!(load_command_line(&mem(), &long), Err(Error::Cmdline(_))));
        assert_eq!(load_command_line(&mem(), "console=ttyS0").unwrap(), 13);
    }
}
