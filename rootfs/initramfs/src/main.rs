//! `vmrun-initramfs`: builds initramfs archives for vmrun guests.

use std::fs::File;
use std::io::BufWriter;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(name = "vmrun-initramfs", about = "Builds initramfs archives for vmrun guests")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// The demo guest: busybox and an init that greets, writes the boot
    /// marker and reboots.
    Demo {
        /// A statically linked busybox (Debian's busybox-static).
        #[arg(long, default_value = "/bin/busybox")]
        busybox: PathBuf,
        /// Where to write the archive.
        #[arg(long)]
        out: PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Demo { busybox, out } => {
            let bin = std::fs::read(&busybox)
                .with_context(|| format!("cannot read {} (install busybox-static)", busybox.display()))?;
            let tmp = out.with_extension("tmp");
            let f = File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
            vmrun_initramfs::demo::write(BufWriter::new(f), &bin)?;
            std::fs::rename(&tmp, &out).with_context(|| format!("cannot write {}", out.display()))?;
            println!("{}", out.display());
        }
    }
    Ok(())
}
