//! `vmrun system df` and `vmrun system prune`: thin fronts over
//! `vmrun_runtime::prune`, printed the way docker prints them.

use std::io::{BufRead, Write};

use anyhow::{bail, Result};
use vmrun_runtime::home::Home;
use vmrun_runtime::prune::{self, Kind, Options};

use crate::images_cmd::human_size;

fn label(kind: Kind) -> &'static str {
    match kind {
        Kind::Image => "Images",
        Kind::Container => "Containers",
        Kind::LayerDisk => "Layer disks",
        Kind::Template => "Templates",
        Kind::Temporary => "Temporary files",
    }
}

/// `vmrun system df`: TYPE TOTAL ACTIVE SIZE RECLAIMABLE.
pub fn df() -> Result<i32> {
    let home = Home::from_env()?;
    let mut rows = vec![["TYPE".to_owned(), "TOTAL".into(), "ACTIVE".into(), "SIZE".into(), "RECLAIMABLE".into()]];
    for r in prune::df(&home)? {
        let pct = (r.reclaimable * 100).checked_div(r.bytes).unwrap_or(0);
        rows.push([
            label(r.kind).into(),
            r.total.to_string(),
            r.active.to_string(),
            human_size(r.bytes),
            format!("{} ({pct}%)", human_size(r.reclaimable)),
        ]);
    }
    crate::images_cmd::print_table(&rows);
    Ok(0)
}

/// `vmrun system prune [-a] [-f]`: asks first (on a terminal), unless
/// `-f`; refuses without a terminal and without `-f`.
pub fn prune(all: bool, force: bool) -> Result<i32> {
    let home = Home::from_env()?;
    let options = Options { all, host: true };
    if !force {
        // SAFETY: isatty has no preconditions.
        if unsafe { libc::isatty(libc::STDIN_FILENO) } != 1 {
            bail!("standard input is not a terminal, so vmrun system prune cannot ask: add -f (--force) to prune without asking");
        }
        eprintln!("WARNING! This will remove:");
        eprintln!("  - all stopped containers");
        eprintln!("  - layer disks and prepared templates no image or container uses");
        eprintln!("  - templates made with another kernel, agent or vmrun than the current ones");
        eprintln!("  - temporary files of processes that are gone");
        if all {
            eprintln!("  - all images no container uses");
        }
        eprint!("Are you sure you want to continue? [y/N] ");
        std::io::stderr().flush()?;
        let mut answer = String::new();
        std::io::stdin().lock().read_line(&mut answer)?;
        if !matches!(answer.trim(), "y" | "Y" | "yes") {
            return Ok(0);
        }
    }
    let report = prune::prune(&home, options, true)?;
    // The host's network rules of container links that are gone (a run
    // killed with SIGKILL, a TAP device removed by hand).
    if let Err(e) = vmrun_runtime::net::sync() {
        eprintln!("vmrun: cannot bring the host's network rules up to date: {e}");
    }
    for name in &report.untagged {
        println!("Untagged: {name}");
    }
    for (c, bytes) in &report.removed {
        let what = c.path.strip_prefix(home.root()).unwrap_or(&c.path);
        println!("Deleted: {} ({}; {})", what.display(), human_size(*bytes), c.reason);
    }
    for c in &report.busy {
        eprintln!("vmrun: kept {}: a run is starting with it", c.path.display());
    }
    for (c, e) in &report.failed {
        eprintln!("vmrun: cannot remove {}: {e}", c.path.display());
    }
    println!();
    println!("Total reclaimed space: {}", human_size(report.freed()));
    Ok(if report.failed.is_empty() { 0 } else { 1 })
}
