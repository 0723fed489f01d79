//! `vmrun`: the command line front of the vmrun VMM.

mod logger;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use vmrun_vmm::{ConsoleOutput, DiskConfig, HostCompatMode, NetConfig, VmConfig};

/// vmrun: containers in KVM microVMs.
#[derive(Parser, Debug)]
#[command(name = "vmrun", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Boot a kernel in a microVM, in the foreground, until the guest
    /// resets or powers off.
    ///
    /// Exit status: 0 when the guest ended itself (reboot), 1 when the VM
    /// could not be built, 3 when the guest crashed, 128+N when signal N
    /// stopped it.
    Boot(BootArgs),
}

#[derive(Args, Debug)]
struct BootArgs {
    /// Guest kernel: an uncompressed ELF vmlinux (or a bzImage).
    #[arg(long)]
    kernel: PathBuf,
    /// Initramfs to hand to the kernel.
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Kernel command line (replaces the default; the VMM appends what its
    /// devices need).
    #[arg(long, default_value = vmrun_vmm::config::DEFAULT_CMDLINE)]
    cmdline: String,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 128)]
    memory: u32,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    cpus: u8,
    /// Write the serial console to this file instead of standard output.
    #[arg(long)]
    console: Option<PathBuf>,
    /// Compatibility layer for hosts whose KVM emulates guest kernel mode.
    #[arg(long, value_enum, default_value_t = CompatArg::Auto)]
    host_compat: CompatArg,
    /// Write a JSON boot report (timings, emulated instructions, memory)
    /// here when the VM ends.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Attach a raw disk image as virtio-blk: PATH[,ro][,id=NAME].
    /// Repeatable; the guest sees them as vda, vdb, ... in order.
    #[arg(long = "disk", value_name = "PATH[,ro][,id=NAME]")]
    disks: Vec<DiskConfig>,
    /// Attach a network interface (virtio-net) on a TAP device:
    /// tap=NAME[,mac=MAC]. Repeatable (eth0, eth1, ...).
    #[arg(long = "net", value_name = "tap=NAME[,mac=MAC]")]
    nets: Vec<NetConfig>,
    /// Do not attach the virtio-rng entropy device.
    #[arg(long)]
    no_rng: bool,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum CompatArg {
    Auto,
    On,
    Off,
}

fn boot(args: BootArgs, start: Instant) -> anyhow::Result<i32> {
    let config = VmConfig {
        kernel: args.kernel,
        initrd: args.initrd,
        cmdline: args.cmdline,
        mem_mib: args.memory,
        vcpus: args.cpus,
        console: args.console.map(ConsoleOutput::File).unwrap_or(ConsoleOutput::Stdout),
        console_input: true,
        host_compat: match args.host_compat {
            CompatArg::Auto => HostCompatMode::Auto,
            CompatArg::On => HostCompatMode::On,
            CompatArg::Off => HostCompatMode::Off,
        },
        report: args.report,
        disks: args.disks,
        rng: !args.no_rng,
        nets: args.nets,
    };
    let (reason, _report) = vmrun_vmm::run(&config, start).context("cannot run the VM")?;
    let code = reason.exit_code();
    if code == 0 {
        log::info!("{reason}");
    } else {
        log::error!("{reason}");
    }
    Ok(code)
}

fn main() -> ExitCode {
    let start = Instant::now();
    logger::init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Boot(args) => boot(args, start),
    };
    match result {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            eprintln!("vmrun: error: {e:#}");
            ExitCode::from(1)
        }
    }
}
