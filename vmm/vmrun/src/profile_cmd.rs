//! `vmrun profile`: the guest profile a VMM wrote (`vmrun boot --profile`,
//! or `VMRUN_GUEST_PROFILE=DIR` for the VMs of other commands), with its
//! addresses mapped to the guest kernel's symbols.

use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use vmrun_vmm_api::profile::Profile;

#[derive(Args, Debug)]
pub struct ProfileArgs {
    /// The profile (JSON) the VMM wrote.
    profile: PathBuf,
    /// The guest kernel's symbols (`nm vmlinux`; the kernel build leaves
    /// `System.map` beside its `vmlinux`, `System.map-up` beside the
    /// `vmlinux-up` that VMs of one vCPU boot).
    #[arg(long)]
    system_map: PathBuf,
    /// Functions listed in each table.
    #[arg(long, default_value_t = 30)]
    top: usize,
    /// Also list this many of the most frequent stacks, symbolised.
    #[arg(long, default_value_t = 0)]
    stacks: usize,
    /// Only the samples of this epoch: what came after the VMM had
    /// answered N `stats` requests (`vmrun run` asks at the end of each
    /// phase in which a VM runs: after a restore, epoch 0 is the phase
    /// "guest to agent ready" and epoch 1 "process run").
    #[arg(long, value_name = "N")]
    epoch: Option<u32>,
}

/// The kernel's symbols, by address.
#[derive(Debug, Default)]
pub struct Symbols {
    /// (start, name, is a function), sorted by start.
    all: Vec<(u64, String, bool)>,
}

impl Symbols {
    /// Parses `nm` output (`ADDRESS TYPE NAME` lines).
    pub fn parse(map: &str) -> Self {
        let mut all = Vec::new();
        for line in map.lines() {
            let mut f = line.split_whitespace();
            let (Some(addr), Some(kind), Some(name)) = (f.next(), f.next(), f.next()) else { continue };
            let Ok(addr) = u64::from_str_radix(addr, 16) else { continue };
            all.push((addr, name.to_string(), matches!(kind, "T" | "t" | "W" | "w")));
        }
        all.sort();
        Self { all }
    }

    /// Whether the map names any function.
    pub fn has_text(&self) -> bool {
        self.all.iter().any(|s| s.2)
    }

    /// The function holding `addr`: none if the nearest symbol below it is
    /// not a function (data, or the end of the image).
    pub fn lookup(&self, addr: u64) -> Option<&str> {
        let i = self.all.partition_point(|(a, _, _)| *a <= addr).checked_sub(1)?;
        // Of several symbols at one address, any function among them.
        let at = self.all[i].0;
        self.all[..=i].iter().rev().take_while(|s| s.0 == at).find(|s| s.2).map(|s| s.1.as_str())
    }
}

/// Samples per function: where the guest was (self), and the functions
/// anywhere on its stack, each once per sample (inclusive).
#[derive(Debug, Default, PartialEq)]
pub struct Tables {
    pub total: u64,
    pub user: u64,
    pub own: BTreeMap<String, u64>,
    pub inclusive: BTreeMap<String, u64>,
}

pub fn tables(profile: &Profile, symbols: &Symbols) -> Tables {
    let mut t = Tables::default();
    for s in &profile.samples {
        t.total += s.count;
        if !s.kernel {
            t.user += s.count;
            continue;
        }
        let name = |a: &u64| symbols.lookup(*a).map_or_else(|| format!("{a:#x}"), str::to_string);
        let Some(rip) = s.stack.first() else { continue };
        *t.own.entry(name(rip)).or_default() += s.count;
        let on_stack: HashSet<String> = s.stack.iter().map(name).collect();
        for f in on_stack {
            *t.inclusive.entry(f).or_default() += s.count;
        }
    }
    t
}

fn print_table(out: &mut dyn Write, title: &str, counts: &BTreeMap<String, u64>, total: u64, top: usize) -> std::io::Result<()> {
    let mut v: Vec<(&String, &u64)> = counts.iter().collect();
    v.sort_by(|a, b| b.1.cmp(a.1).then_with(|| a.0.cmp(b.0)));
    writeln!(out, "\n{title}")?;
    writeln!(out, "{:>6} {:>8}  function", "%", "samples")?;
    for (name, &n) in v.into_iter().take(top) {
        writeln!(out, "{:>6.1} {:>8}  {name}", 100.0 * n as f64 / total.max(1) as f64, n)?;
    }
    Ok(())
}

pub fn run(args: ProfileArgs) -> anyhow::Result<i32> {
    let read = |p: &Path| std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()));
    let mut profile: Profile =
        serde_json::from_str(&read(&args.profile)?).with_context(|| format!("{} is not a guest profile", args.profile.display()))?;
    if let Some(e) = args.epoch {
        profile.samples.retain(|s| s.epoch == e);
    }
    let symbols = Symbols::parse(&read(&args.system_map)?);
    anyhow::ensure!(symbols.has_text(), "{} names no text symbols: give the output of `nm vmlinux`", args.system_map.display());
    let t = tables(&profile, &symbols);
    match print(&mut std::io::stdout().lock(), &profile, &symbols, &t, &args) {
        // A reader that stopped early (`| head`) is not an error.
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e).context("cannot write the tables"),
        _ => Ok(0),
    }
}

fn print(out: &mut dyn Write, profile: &Profile, symbols: &Symbols, t: &Tables, args: &ProfileArgs) -> std::io::Result<()> {
    writeln!(
        out,
        "{} samples, asked for every {} µs of a vCPU thread's CPU time (taken at the host's ticks, so at most one per tick): {} in the guest kernel, {} in user mode",
        t.total,
        profile.interval_us,
        t.total - t.user,
        t.user
    )?;
    print_table(out, "where the guest kernel was (self)", &t.own, t.total, args.top)?;
    print_table(out, "on the guest kernel's stack (inclusive; stale stack words count too)", &t.inclusive, t.total, args.top)?;
    if args.stacks > 0 {
        writeln!(out, "\nthe most frequent stacks")?;
        for s in profile.samples.iter().filter(|s| s.kernel).take(args.stacks) {
            let names: Vec<String> = s.stack.iter().map(|a| symbols.lookup(*a).map_or_else(|| format!("{a:#x}"), str::to_string)).collect();
            writeln!(out, "{:>8}  {}", s.count, names.join(" < "))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmrun_vmm_api::profile::Sample;

    const MAP: &str = "\
ffffffff81000000 T _stext
ffffffff81000100 t memmap_init
ffffffff81000200 T clear_page
ffffffff81000300 D some_data
ffffffff81000400 T _etext
ffffffff82000000 t memblock_init
ffffffff82000100 B _end
";

    #[test]
    fn addresses_map_to_the_function_that_holds_them() {
        let s = Symbols::parse(MAP);
        assert_eq!(s.lookup(0xffffffff81000100), Some("memmap_init"));
        assert_eq!(s.lookup(0xffffffff810001ff), Some("memmap_init"));
        assert_eq!(s.lookup(0xffffffff81000350), None, "in data");
        assert_eq!(s.lookup(0xffffffff82000010), Some("memblock_init"), "init text");
        assert_eq!(s.lookup(0xffffffff82000100), None, "past the image");
        assert_eq!(s.lookup(0xffffffff80000000), None, "before the text");
    }

    #[test]
    fn self_counts_the_first_address_and_inclusive_each_function_once() {
        let s = Symbols::parse(MAP);
        let profile = Profile {
            interval_us: 1000,
            samples: vec![
                Sample { count: 3, epoch: 0, kernel: true, stack: vec![0xffffffff81000210, 0xffffffff81000110, 0xffffffff81000120] },
                Sample { count: 2, epoch: 0, kernel: true, stack: vec![0xffffffff81000110] },
                Sample { count: 4, epoch: 1, kernel: false, stack: vec![0x401000] },
            ],
        };
        let t = tables(&profile, &s);
        assert_eq!((t.total, t.user), (9, 4));
        assert_eq!(t.own.get("clear_page"), Some(&3));
        assert_eq!(t.own.get("memmap_init"), Some(&2));
        assert_eq!(t.inclusive.get("memmap_init"), Some(&5), "counted once per sample though twice on the stack");
        assert_eq!(t.inclusive.get("clear_page"), Some(&3));
    }
}
