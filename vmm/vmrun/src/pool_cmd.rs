//! `vmrun pool IMAGE`: keeps VMs restored ahead of the runs of an image
//! (`vmrun_runtime::pool`), in the foreground until SIGINT, SIGTERM or
//! SIGHUP; `vmrun pool --status IMAGE` asks a running one how many are
//! ready.
//!
//! The pool's VMs are those `vmrun run IMAGE ...` would restore (same
//! memory, vCPUs, kernel, agent and network): the image's prepared
//! template, made here first if it is missing. A run takes one when its
//! process can be the template's held one (output on pipes, no input, no
//! terminal, no volume, no published port, no `--name`).

use std::os::fd::AsFd;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use vmrun_runtime::artifacts::Artifacts;
use vmrun_runtime::home::Home;
use vmrun_runtime::net::{Link, Mode, Setup};
use vmrun_runtime::sandbox::{AgentWait, Cancel, Origin, Sandbox};
use vmrun_runtime::template::PREPARED_ID;
use vmrun_runtime::vm::VmSpec;

use crate::run_cmd::{self, Phases};

/// Most VMs one pool keeps.
const MAX_SIZE: usize = 64;

/// `vmrun pool`'s flags.
#[derive(Args, Debug, Clone)]
pub struct PoolArgs {
    /// VMs kept ready.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=MAX_SIZE as i64))]
    pub size: u16,
    /// Memory of each microVM, as for `vmrun run` (e.g. 512m, 1g).
    #[arg(short = 'm', long, default_value = "512m")]
    pub memory: String,
    /// vCPUs of each microVM, as for `vmrun run`.
    #[arg(long, default_value_t = 1)]
    pub cpus: u32,
    /// The network of each microVM, as for `vmrun run` (`nat` by default
    /// as root, else `none`): runs on that network take the pool's VMs.
    /// Each VM's link (TAP device, addresses, rules) is made with the VM
    /// and removed after it.
    #[arg(long, value_parser = ["nat", "bridge", "tap", "none"])]
    pub network: Option<String>,
    /// Print how many VMs the running pool of IMAGE has ready, and exit.
    #[arg(long)]
    pub status: bool,
    /// With --status: wait until all of them are (up to 10 minutes).
    #[arg(long, requires = "status")]
    pub wait: bool,
    /// The image.
    pub image: String,
}

pub fn run(args: PoolArgs) -> Result<i32> {
    let home = Home::from_env()?;
    let image = run_cmd::image(&home, &args.image)?;
    let mem_mib = run_cmd::parse_memory(&args.memory)?;
    vmrun_vmm::check_resources(u64::from(args.cpus), u64::from(mem_mib))?;
    let cpus = u8::try_from(args.cpus).context("vCPU count")?;
    let artifacts = Artifacts::find(&home, None, None)?;
    let (layer_disk, digests, _disk_lock) = vmrun_runtime::layer_disk::use_for_image(&home.layer_disks(), &image)?;
    let vmm_exe = vmrun_runtime::vm::find_vmm()?;
    let network = match &args.network {
        Some(n) => n.parse::<Mode>()?,
        None => Mode::default_here(),
    };
    // Each VM's link, made and removed by the keeper with the VM.
    let setup = (network != Mode::None).then(|| Setup { nat: network == Mode::Nat, ports: Vec::new() });
    let spec_in = |dir: &Path, link: Option<&Link>| VmSpec {
        artifacts: artifacts.clone(),
        mem_mib,
        cpus,
        layer_disk: layer_disk.clone(),
        volumes: Vec::new(),
        volume_slots: vmrun_runtime::volume::SLOTS,
        read_only_volumes: Vec::new(),
        tap: link.map(|l| l.tap.clone()),
        netns: None,
        dir: dir.to_path_buf(),
        vmm_exe: vmm_exe.clone(),
        boot_memory_mib: None,
    };
    // The template a run's VM would be restored from names the pool.
    let cancel = Cancel::default();
    let pools = home.pools();
    let origins = vmrun_runtime::pool::locate(&home, &spec_in(&pools, None), network, &image.manifest_digest.to_string())?;
    let (prepared, dir) = (origins.prepared, origins.pool);
    if args.status {
        let timeout = Duration::from_secs(if args.wait { 600 } else { 5 });
        let a = vmrun_runtime::pool::status(&dir, args.wait, timeout)?;
        println!("{} of {} VMs ready", a.ready, a.size);
        return Ok(0);
    }
    if !vmrun_runtime::template::is_ready(&prepared) {
        // The templates are made as a run makes them: with a link of
        // their own if the VMs have one.
        // Named so that `system prune` removes it (and the link recorded
        // there) if this process dies.
        let name = dir.file_name().unwrap_or_default().to_string_lossy();
        let work = pools.join(format!("{name}.build-{}", std::process::id()));
        let link = setup.as_ref().map(|setup| vmrun_runtime::pool::recorded_link(&work, setup)).transpose()?;
        let result = (|| -> Result<()> {
            let spec = spec_in(&work, link.as_ref());
            let base = Sandbox::base_template(&home.templates(), &spec, &|m| eprintln!("vmrun: {m}"), &cancel)?;
            eprintln!("vmrun: preparing the template of {} (once per image)", args.image);
            make_prepared(&home, &image, &spec, &base, &prepared, &digests, &cancel)
        })();
        if let Some(l) = link {
            l.delete();
        }
        vmrun_runtime::vm::remove_dir(&work);
        result?;
    }
    // SIGINT, SIGTERM and SIGHUP end the pool: read from a signalfd by its
    // loop (the VMMs it starts get the default mask back).
    let mut set = nix::sys::signal::SigSet::empty();
    for s in [nix::sys::signal::SIGINT, nix::sys::signal::SIGTERM, nix::sys::signal::SIGHUP] {
        set.add(s);
    }
    set.thread_block().context("cannot block the signals that end the pool")?;
    let stop = nix::sys::signalfd::SignalFd::with_flags(&set, nix::sys::signalfd::SfdFlags::SFD_CLOEXEC)
        .context("cannot make a signalfd")?;
    let size = usize::from(args.size);
    let start = |d: &Path, link: Option<&Link>| vmrun_runtime::template::restore(&prepared, &spec_in(d, link));
    let mut keeper = vmrun_runtime::pool::Keeper::new(&dir, &prepared, size, setup, start)?;
    eprintln!("vmrun: pool of {size} VMs of {} at {}", args.image, dir.display());
    keeper.serve(stop.as_fd(), &|n| eprintln!("vmrun: pool: {n} of {n} VMs ready"))?;
    eprintln!("vmrun: pool: ending its VMs");
    drop(keeper);
    Ok(0)
}

/// Makes the image's prepared template as the first warm run of it does.
fn make_prepared(
    home: &Home,
    image: &vmrun_images::Image,
    spec: &VmSpec,
    base: &Path,
    prepared: &Path,
    digests: &[vmrun_agent_client::Digest],
    cancel: &Cancel,
) -> Result<()> {
    let mut phases = Phases::start();
    let launched = Sandbox::launch(spec, Origin::Template(base), None, cancel)?;
    let sandbox = launched.connect(AgentWait { timeout: Duration::from_secs(900), options: run_cmd::agent_options() })?;
    phases.mark_ready("guest to agent ready", &sandbox);
    let create = run_cmd::create_from_layers(PREPARED_ID, run_cmd::image_config(image, None), digests);
    run_cmd::prepare(home, image, &sandbox, create, prepared, &mut phases)?;
    sandbox.kill();
    if !vmrun_runtime::template::is_ready(prepared) {
        anyhow::bail!("the prepared template of the image could not be saved (see the messages above)");
    }
    Ok(())
}
