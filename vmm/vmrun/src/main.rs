//! `vmrun`: the command line front of the vmrun VMM.

mod attach;
mod containers_cmd;
mod device_args;
mod images_cmd;
mod login_cmd;
mod pool_cmd;
mod profile_cmd;
mod run_cmd;
mod system_cmd;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use vmrun_vmm::config::{RestoreDisk, RestoreNet};
use vmrun_vmm::controller::Request;
use vmrun_vmm::{
    ConsoleOutput, DiskConfig, HostCompatMode, NetConfig, ProcessOptions, RestoreConfig, SeccompMode, VmConfig, VmmConfig,
    VsockConfig,
};

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
    /// Restore a VM from a snapshot and run it in the foreground.
    ///
    /// The snapshot fixes the guest; the files and devices behind its
    /// device slots are chosen here. Exit status as for `boot`.
    Restore(RestoreArgs),
    /// Show a guest profile (`boot --profile`): where the guest kernel
    /// spent its time, by function.
    Profile(profile_cmd::ProfileArgs),
    /// Run a command in a new container, in its own microVM.
    Run(run_cmd::RunArgs),
    /// Keep VMs of an image restored ahead of its runs, in the foreground:
    /// a `vmrun run IMAGE ...` on the pool's network whose process needs
    /// no input, terminal, volume or published port takes one instead of
    /// restoring its template (`--status`: how many are ready).
    Pool(pool_cmd::PoolArgs),
    /// Pull an image from a registry into the local store.
    Pull {
        /// Image reference, e.g. `busybox`, `localhost:5000/busybox:latest`.
        reference: String,
    },
    /// Log in to a registry: check the credentials with it and save them in
    /// docker's config.json ($DOCKER_CONFIG, default ~/.docker), or in the
    /// credential helper it names.
    Login(login_cmd::LoginArgs),
    /// Forget a registry's credentials.
    Logout(login_cmd::LogoutArgs),
    /// Load images from a `docker save` or OCI archive.
    Load {
        /// The archive (tar, optionally gzip-compressed).
        #[arg(short = 'i', long = "input")]
        input: PathBuf,
    },
    /// List the images in the local store.
    Images,
    /// Remove images from the local store.
    Rmi {
        /// Image references or IDs.
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Disk usage, and collecting what nothing uses.
    #[command(subcommand)]
    System(SystemCommand),
    /// List containers.
    Ps {
        /// Show exited ones too.
        #[arg(short, long)]
        all: bool,
        /// Only the ids.
        #[arg(short, long)]
        quiet: bool,
    },
    /// Print a detached container's output.
    Logs {
        /// Keep printing as it comes, until the container exits.
        #[arg(short, long)]
        follow: bool,
        container: String,
    },
    /// Run a command in a running container.
    Exec(containers_cmd::ExecArgs),
    /// Stop containers: SIGTERM, then SIGKILL after the grace period.
    Stop {
        /// Seconds to wait before SIGKILL.
        #[arg(short = 't', long = "time", default_value_t = 10)]
        time: u64,
        #[arg(required = true)]
        containers: Vec<String>,
    },
    /// Send a signal to containers' processes.
    Kill {
        /// The signal (name or number).
        #[arg(short, long, default_value = "KILL")]
        signal: String,
        #[arg(required = true)]
        containers: Vec<String>,
    },
    /// Remove containers.
    Rm {
        /// Kill running ones first.
        #[arg(short, long)]
        force: bool,
        #[arg(required = true)]
        containers: Vec<String>,
    },
    /// Owns a detached container's VM (started by `vmrun run -d`).
    #[command(hide = true)]
    Supervise {
        dir: PathBuf,
    },
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// Pause, resume, stop or measure a running VM through its control
    /// socket.
    Vm {
        /// The VM's control socket (`boot --control`).
        #[arg(long)]
        control: PathBuf,
        #[command(subcommand)]
        action: VmAction,
    },
}

#[derive(Subcommand, Debug)]
enum SystemCommand {
    /// Show the space images, containers, layer disks and templates take,
    /// and what a prune would free.
    Df,
    /// Remove stopped containers, layer disks and prepared templates no
    /// image or container uses, templates made with another kernel, agent
    /// or vmrun, and temporary files of processes that are gone.
    Prune {
        /// Also remove images no container uses.
        #[arg(short, long)]
        all: bool,
        /// Do not ask for confirmation.
        #[arg(short, long)]
        force: bool,
    },
}

#[derive(Subcommand, Debug)]
enum SnapshotCommand {
    /// Pause a running VM and save it into a directory.
    Create {
        /// The VM's control socket (`boot --control`).
        #[arg(long)]
        control: PathBuf,
        /// Where the snapshot goes (created if needed).
        #[arg(long)]
        dir: PathBuf,
        /// Let the VM run on afterwards (default: it stays paused).
        #[arg(long)]
        resume: bool,
    },
}

#[derive(Subcommand, Debug)]
enum VmAction {
    /// Pause the vCPUs.
    Pause,
    /// Let paused vCPUs run again.
    Resume,
    /// End the VM.
    Stop,
    /// Print KVM's counters per vCPU and the VMM's resident memory (JSON).
    Stats,
    /// Put a raw disk image into an empty disk slot of the running VM
    /// (the guest sees the disk's size change from 0).
    AttachDisk {
        /// The disk slot: 0 is the VM's first disk (`/dev/vda`).
        #[arg(long)]
        disk: usize,
        /// The image (opened here, handed to the VMM).
        #[arg(long)]
        image: PathBuf,
        /// Refuse the guest's writes to it.
        #[arg(long)]
        read_only: bool,
    },
    /// Empty a disk slot of the running VM (the guest should have stopped
    /// using the disk: its further requests fail).
    DetachDisk {
        /// The disk slot: 0 is the VM's first disk (`/dev/vda`).
        #[arg(long)]
        disk: usize,
    },
}

#[derive(Args, Debug)]
struct RestoreArgs {
    /// The snapshot directory.
    #[arg(long)]
    snapshot: PathBuf,
    /// Disk image for the snapshot's next disk slot (repeatable, in order).
    /// Restored disks and network interfaces are not rate limited here
    /// (the VMM's configuration can carry limits; `vmrun-vmm`).
    #[arg(long = "disk", value_name = "PATH")]
    disks: Vec<PathBuf>,
    /// TAP device for the snapshot's next network slot (repeatable).
    #[arg(long = "tap", value_name = "NAME")]
    taps: Vec<String>,
    /// Unix socket for the snapshot's vsock device.
    #[arg(long)]
    vsock_uds: Option<PathBuf>,
    #[command(flatten)]
    process: ProcessArgs,
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
    /// Number of vCPUs (1 to 32).
    #[arg(long, default_value_t = 1)]
    cpus: u32,
    /// Attach a raw disk image as virtio-blk:
    /// PATH[,ro][,id=NAME][,bw=BYTES][,iops=N]. bw limits the bytes read
    /// plus written per second (k, m, g: KiB, MiB, GiB; e.g. bw=10m), iops
    /// the requests per second; each lets one second's worth through at
    /// once after an idle second. Repeatable; the guest sees them as vda,
    /// vdb, ... in order.
    #[arg(long = "disk", value_name = "PATH[,ro][,id=NAME][,bw=BYTES][,iops=N]", value_parser = device_args::parse_disk)]
    disks: Vec<DiskConfig>,
    /// Attach a network interface (virtio-net) on a TAP device:
    /// tap=NAME[,mac=MAC][,bw=BYTES][,rx_bw=BYTES][,tx_bw=BYTES][,iops=N].
    /// bw limits each direction to BYTES per second (receive and transmit
    /// separately, not their sum; k, m, g: KiB, MiB, GiB); rx_bw (to the
    /// guest) and tx_bw (from the guest) set one direction and override
    /// bw; iops limits frames per second in each direction. Repeatable
    /// (eth0, eth1, ...).
    #[arg(long = "net", value_name = "tap=NAME[,mac=MAC][,bw=BYTES][,rx_bw=BYTES][,tx_bw=BYTES][,iops=N]", value_parser = device_args::parse_net)]
    nets: Vec<NetConfig>,
    /// Attach a vsock device bridged to Unix sockets: cid=N,uds=PATH
    /// (Firecracker's hybrid vsock).
    #[arg(long, value_name = "cid=N,uds=PATH", value_parser = device_args::parse_vsock)]
    vsock: Option<VsockConfig>,
    /// Do not attach the virtio-rng entropy device.
    #[arg(long)]
    no_rng: bool,
    #[command(flatten)]
    process: ProcessArgs,
}

/// The flags `boot` and `restore` share: the VMM process's options.
#[derive(Args, Debug)]
struct ProcessArgs {
    /// Write the serial console to this file instead of standard output.
    #[arg(long)]
    console: Option<PathBuf>,
    /// Most bytes written to the --console file (k, m, g: KiB, MiB, GiB);
    /// later output is dropped after one "[vmrun: console output
    /// truncated]" line. 0: no bound.
    #[arg(long, value_name = "BYTES", default_value = "16m", value_parser = device_args::parse_size)]
    console_limit: u64,
    /// Compatibility layer for hosts whose KVM emulates guest kernel mode.
    #[arg(long, value_enum, default_value_t = CompatArg::Auto)]
    host_compat: CompatArg,
    /// Seccomp filters on the VMM's threads: on (a forbidden system call
    /// kills the VMM with SIGSYS), off (for debugging), or log (forbidden
    /// calls go through and the kernel logs them: see dmesg).
    #[arg(long, value_enum, default_value_t = SeccompArg::On)]
    seccomp: SeccompArg,
    /// Confine the VMM before it starts the guest: new namespaces, a
    /// private root holding only its files, an unprivileged uid of its own,
    /// a cgroup (needs root; `vmrun run` turns it on as root).
    #[arg(long, value_enum, default_value_t = JailArg::Off)]
    jail: JailArg,
    /// Write a JSON report (timings, emulated instructions, memory)
    /// here when the VM ends.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Serve a control socket here (pause, resume, snapshot, stop, stats).
    #[arg(long)]
    control: Option<PathBuf>,
    /// Sample where the guest's vCPUs are (every millisecond of a vCPU
    /// thread's CPU time) and write the samples here as JSON when the VM
    /// ends; `vmrun profile` reads them.
    #[arg(long)]
    profile: Option<PathBuf>,
}

impl ProcessArgs {
    /// The VMM's process options; the console takes standard input.
    fn options(self) -> ProcessOptions {
        ProcessOptions {
            console: self.console.map(ConsoleOutput::File).unwrap_or(ConsoleOutput::Stdout),
            console_limit: (self.console_limit > 0).then_some(self.console_limit),
            console_input: true,
            host_compat: self.host_compat.into(),
            report: self.report,
            control: self.control,
            seccomp: self.seccomp.into(),
            jail: self.jail == JailArg::On,
            profile: self.profile,
        }
    }
}

impl From<CompatArg> for HostCompatMode {
    fn from(c: CompatArg) -> Self {
        match c {
            CompatArg::Auto => HostCompatMode::Auto,
            CompatArg::On => HostCompatMode::On,
            CompatArg::Off => HostCompatMode::Off,
        }
    }
}

/// `--jail`.
#[derive(Clone, Copy, Debug, Default, ValueEnum, PartialEq, Eq)]
enum JailArg {
    /// Run the VMM as it was started.
    #[default]
    Off,
    /// Confine the VMM (needs root): namespaces, a private root with only
    /// its files, an unprivileged uid of its own, a cgroup.
    On,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum SeccompArg {
    On,
    Off,
    Log,
}

impl From<SeccompArg> for SeccompMode {
    fn from(s: SeccompArg) -> Self {
        match s {
            SeccompArg::On => SeccompMode::On,
            SeccompArg::Off => SeccompMode::Off,
            SeccompArg::Log => SeccompMode::Log,
        }
    }
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum CompatArg {
    Auto,
    On,
    Off,
}

fn boot(args: BootArgs) -> anyhow::Result<i32> {
    vmrun_vmm::check_resources(u64::from(args.cpus), u64::from(args.memory)).context("cannot run the VM")?;
    let vcpus = u8::try_from(args.cpus).context("vCPU count")?;
    let config = VmConfig {
        kernel: args.kernel,
        initrd: args.initrd,
        cmdline: args.cmdline,
        mem_mib: args.memory,
        vcpus,
        options: args.process.options(),
        disks: args.disks,
        rng: !args.no_rng,
        nets: args.nets,
        vsock: args.vsock,
    };
    exec_vmm(&VmmConfig::boot(config))
}

/// Runs the VM the way every vmrun command does: `vmrun-vmm` takes this
/// process's place (its standard streams and signals are the user's),
/// given `config` on an inherited memory file (`--config-fd`). Returns
/// only if it cannot be started.
fn exec_vmm(config: &VmmConfig) -> anyhow::Result<i32> {
    use std::os::unix::process::CommandExt;
    let vmm = vmrun_runtime::vm::find_vmm()?;
    let json = config.to_json().context("cannot write the VM's configuration")?;
    // SAFETY: memfd_create takes a NUL-terminated name and flags; without
    // MFD_CLOEXEC the descriptor is inherited by the VMM, the one process
    // that reads it.
    let fd = unsafe { libc::memfd_create(c"vmrun-vmm.json".as_ptr(), 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("cannot make a memory file for the VM's configuration");
    }
    // SAFETY: a new descriptor that nothing else owns.
    let mut file = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    std::io::Write::write_all(&mut file, &json).context("cannot write the VM's configuration")?;
    std::io::Seek::rewind(&mut file).context("cannot write the VM's configuration")?;
    let err = std::process::Command::new(&vmm).arg("--config-fd").arg(fd.to_string()).exec();
    Err(err).with_context(|| format!("cannot run {}", vmm.display()))
}

fn restore(args: RestoreArgs) -> anyhow::Result<i32> {
    let config = RestoreConfig {
        snapshot: args.snapshot,
        disks: args.disks.into_iter().map(RestoreDisk::new).collect(),
        nets: args.taps.into_iter().map(RestoreNet::new).collect(),
        vsock_uds: args.vsock_uds,
        options: args.process.options(),
    };
    exec_vmm(&VmmConfig::restore(config))
}

fn control(path: &std::path::Path, req: Request) -> anyhow::Result<i32> {
    let answer = vmrun_vmm_api::request(path, &req, Duration::from_secs(120))?;
    if let Some(ms) = answer.ms {
        log::info!("done in {ms:.1} ms");
    }
    if let Some(stats) = answer.stats {
        println!("{}", serde_json::to_string_pretty(&stats)?);
    }
    Ok(0)
}

/// Opens `image` (read-only or read-write) and hands it to the VMM for
/// disk slot `disk`.
fn attach_disk(path: &std::path::Path, disk: usize, image: &std::path::Path, read_only: bool) -> anyhow::Result<i32> {
    let answer = vmrun_vmm_api::attach_disk(path, disk, image, read_only, Duration::from_secs(120))?;
    if let Some(ms) = answer.ms {
        log::info!("done in {ms:.1} ms");
    }
    Ok(0)
}

/// `vmrun run` exits with the container's code, or 125 when vmrun itself
/// failed (as docker does).
fn run_exit(result: anyhow::Result<i32>) -> ExitCode {
    match result {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            eprintln!("vmrun: error: {e:#}");
            ExitCode::from(125)
        }
    }
}

/// Docker's convention: a bad flag of `run` or `exec` exits 125, like any
/// failure of the tool itself (the container's own codes stay apart).
fn usage_error_is_125() -> bool {
    matches!(std::env::args().nth(1).as_deref(), Some("run" | "exec"))
}

fn main() -> ExitCode {
    vmrun_vmm::logger::init("vmrun");
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if e.use_stderr() && usage_error_is_125() => {
            let _ = e.print();
            return ExitCode::from(125);
        }
        Err(e) => e.exit(),
    };
    let result = match cli.command {
        Command::Boot(args) => boot(args),
        Command::Restore(args) => restore(args),
        Command::Run(args) => return run_exit(run_cmd::run(args)),
        Command::Pool(args) => pool_cmd::run(args),
        Command::Ps { all, quiet } => containers_cmd::ps(all, quiet),
        Command::Logs { follow, container } => containers_cmd::logs(&container, follow),
        Command::Exec(args) => return run_exit(containers_cmd::exec(args)),
        Command::Stop { time, containers } => containers_cmd::stop(&containers, time),
        Command::Kill { signal, containers } => containers_cmd::kill(&containers, &signal),
        Command::Rm { force, containers } => containers_cmd::rm(&containers, force),
        Command::Supervise { dir } => return run_exit(run_cmd::supervise(&dir)),
        Command::Pull { reference } => images_cmd::default_store_dir().and_then(|d| images_cmd::pull(&d, &reference)).map(|()| 0),
        Command::Login(args) => login_cmd::login(args),
        Command::Logout(args) => login_cmd::logout(args),
        Command::Load { input } => images_cmd::default_store_dir().and_then(|d| images_cmd::load(&d, &input)).map(|()| 0),
        Command::Profile(args) => profile_cmd::run(args),
        Command::Images => images_cmd::default_store_dir().and_then(|d| images_cmd::images(&d)).map(|()| 0),
        Command::Rmi { names } => images_cmd::default_store_dir().and_then(|d| images_cmd::rmi(&d, &names)).map(|()| 0),
        Command::System(SystemCommand::Df) => system_cmd::df(),
        Command::System(SystemCommand::Prune { all, force }) => system_cmd::prune(all, force),
        Command::Snapshot(SnapshotCommand::Create { control: c, dir, resume }) => {
            control(&c, Request::Snapshot { dir, resume })
        }
        Command::Vm { control: c, action } => match action {
            VmAction::AttachDisk { disk, image, read_only } => attach_disk(&c, disk, &image, read_only),
            VmAction::DetachDisk { disk } => control(&c, Request::DetachDisk { disk }),
            VmAction::Pause => control(&c, Request::Pause),
            VmAction::Resume => control(&c, Request::Resume),
            VmAction::Stop => control(&c, Request::Stop),
            VmAction::Stats => control(&c, Request::Stats),
        },
    };
    match result {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            eprintln!("vmrun: error: {e:#}");
            ExitCode::from(1)
        }
    }
}
