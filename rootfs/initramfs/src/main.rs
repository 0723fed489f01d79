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
    /// The guest agent's initramfs: the static agent as /init, /dev/console
    /// and the mount points the agent uses, nothing else.
    Agent {
        /// The statically linked vmrun-agent (rootfs/build.sh builds it).
        #[arg(long)]
        agent: PathBuf,
        /// Where to write the archive.
        #[arg(long)]
        out: PathBuf,
    },
}

/// Writes the agent's initramfs: the agent as `/init`, `/dev/console` (the
/// kernel opens it for init's standard streams) and the directories the
/// agent mounts on, so that it creates none at boot.
fn write_agent<W: std::io::Write>(out: W, agent: &[u8]) -> Result<W, vmrun_initramfs::Error> {
    let mut a = vmrun_initramfs::Archive::new(out);
    for d in ["dev", "proc", "sys", "tmp", "run"] {
        a.dir(d, 0o755)?;
    }
    a.char_device("dev/console", 0o600, 5, 1)?;
    a.file("init", 0o755, agent)?;
    a.finish()
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
        Command::Agent { agent, out } => {
            let bin = std::fs::read(&agent).with_context(|| format!("cannot read the agent {}", agent.display()))?;
            anyhow::ensure!(bin.starts_with(b"\x7fELF"), "{} is not an ELF executable", agent.display());
            let tmp = out.with_extension("tmp");
            let f = File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
            write_agent(BufWriter::new(f), &bin)?;
            std::fs::rename(&tmp, &out).with_context(|| format!("cannot write {}", out.display()))?;
            println!("{}", out.display());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_archive_holds_init_console_and_mount_points() {
        let bytes = write_agent(Vec::new(), b"\x7fELF agent").unwrap();
        let text = String::from_utf8_lossy(&bytes);
        for name in ["init\0", "dev/console\0", "proc\0", "sys\0", "tmp\0", "run\0", "\x7fELF agent"] {
            assert!(text.contains(name), "{name:?} missing");
        }
        assert!(!text.contains("busybox"));
    }
}
