//! The host's rules for the NAT network and published ports: one nftables
//! table, `ip vmrun`, that vmrun owns.
//!
//! The table is a function of what is on the host: each container link
//! (of any data directory) records what it needs in
//! `/run/vmrun/net/TAP.json` (NAT or not, its published ports), and
//! [`sync`] rebuilds the whole table from the records whose TAP device
//! still exists, under the host-wide lock, in one `nft -f -` transaction
//! (or deletes the table when no record needs it). A record whose TAP is
//! gone (removed by `vmrun rm`, `system prune`, or by hand) is dropped at
//! the next sync, so a run killed with SIGKILL leaves rules only as long
//! as it leaves its TAP device. The `nft` command is used rather than a
//! netlink crate: `nftnl` binds the C libnftnl (a build dependency on
//! every host), `rustables` has few users and no stable rule API, and a
//! generated ruleset in nft's own syntax is readable, checked by the
//! tool every host with nftables has, and applied atomically.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde::{Deserialize, Serialize};

use super::{PortMap, Proto, TAP_PREFIX};
use crate::{Error, Result};

/// The table's name (family `ip`).
pub const TABLE: &str = "vmrun";

/// Where the links' records are.
pub const RECORDS: &str = "/run/vmrun/net";

/// What a container's link needs of the host's rules.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Its TAP device.
    pub tap: String,
    /// The guest's address.
    pub guest: Ipv4Addr,
    /// Outbound traffic is masqueraded (the NAT network); otherwise the
    /// container reaches nothing beyond its host end.
    pub nat: bool,
    /// Published ports.
    #[serde(default)]
    pub ports: Vec<PortMap>,
}

impl Record {
    fn path(tap: &str) -> PathBuf {
        Path::new(RECORDS).join(format!("{tap}.json"))
    }

    /// Whether it needs the table (and forwarding).
    fn needs_rules(&self) -> bool {
        self.nat || !self.ports.is_empty()
    }

    /// Writes it (before [`sync`]).
    pub fn save(&self) -> Result<()> {
        std::fs::create_dir_all(RECORDS)?;
        let bytes = serde_json::to_vec(self).map_err(|e| Error::Network(format!("cannot record link {}: {e}", self.tap)))?;
        crate::container::write_atomic(&Self::path(&self.tap), &bytes)?;
        Ok(())
    }

    /// Removes the record of `tap`, if there is one.
    pub fn remove(tap: &str) {
        match std::fs::remove_file(Self::path(tap)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => log::warn!("cannot remove {}: {e}", Self::path(tap).display()),
            _ => {}
        }
    }
}

/// Every record, and whatever could not be read (removed: its link can
/// no longer be matched to it).
fn records() -> Vec<Record> {
    let Ok(dir) = std::fs::read_dir(RECORDS) else { return Vec::new() };
    let mut out = Vec::new();
    for e in dir.flatten() {
        let path = e.path();
        if path.extension().is_none_or(|x| x != "json") {
            continue;
        }
        match std::fs::read(&path).ok().and_then(|b| serde_json::from_slice::<Record>(&b).ok()) {
            Some(r) => out.push(r),
            None => {
                log::warn!("removing unreadable network record {}", path.display());
                let _ = std::fs::remove_file(&path);
            }
        }
    }
    out.sort_by(|a, b| a.tap.cmp(&b.tap));
    out
}

/// The records of links present now: the others are removed. Called
/// under the host lock.
pub fn live_records(present: &BTreeSet<String>) -> Vec<Record> {
    let (live, gone): (Vec<_>, Vec<_>) = records().into_iter().partition(|r| present.contains(&r.tap));
    for r in gone {
        Record::remove(&r.tap);
    }
    live
}

/// Refuses a published port that another container has, or that a socket
/// on the host holds (the kernel's rules would hide it from other hosts).
pub fn check_ports(ports: &[PortMap], others: &[Record]) -> Result<()> {
    for (i, p) in ports.iter().enumerate() {
        if ports[..i].iter().any(|q| q.host == p.host && q.proto == p.proto) {
            return Err(Error::Network(format!("port {}/{} is published twice", p.host, p.proto)));
        }
        if let Some(r) = others.iter().find(|r| r.ports.iter().any(|q| q.host == p.host && q.proto == p.proto)) {
            return Err(Error::Network(format!("port {}/{} is already published by the container on {}", p.host, p.proto, r.tap)));
        }
        let bound = match p.proto {
            Proto::Tcp => std::net::TcpListener::bind((Ipv4Addr::UNSPECIFIED, p.host)).map(drop),
            Proto::Udp => std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, p.host)).map(drop),
        };
        if let Err(e) = bound {
            return Err(Error::Network(format!("cannot publish port {}/{}: {e}", p.host, p.proto)));
        }
    }
    Ok(())
}

/// The table for `records`, as an `nft -f` script that replaces it whole,
/// or `None` when no record needs it.
pub fn ruleset(records: &[Record]) -> Option<String> {
    if !records.iter().any(Record::needs_rules) {
        return None;
    }
    let any = format!("\"{TAP_PREFIX}*\"");
    let mut dnat = String::new();
    for r in records {
        for p in &r.ports {
            let _ = writeln!(dnat, "\t\tfib daddr type local {} dport {} dnat to {}:{}", p.proto, p.host, r.guest, p.guest);
        }
    }
    let mut masquerade = String::new();
    let mut outbound = String::new();
    for r in records.iter().filter(|r| r.nat) {
        let _ = writeln!(masquerade, "\t\tiifname \"{}\" ip saddr {} oifname != {any} masquerade", r.tap, r.guest);
        let _ = writeln!(outbound, "\t\tiifname \"{}\" ip saddr {} oifname != {any} accept", r.tap, r.guest);
    }
    Some(format!(
        "table ip {TABLE}
delete table ip {TABLE}
table ip {TABLE} {{
\t# Nothing from a container claims or asks for the host's loopback
\t# (the links accept loopback addresses for published ports).
\tchain guard {{
\t\ttype filter hook prerouting priority raw; policy accept;
\t\tiifname {any} ip saddr 127.0.0.0/8 drop
\t\tiifname {any} ip daddr 127.0.0.0/8 drop
\t}}
\t# Published ports, from other hosts and from this one.
\tchain prerouting {{
\t\ttype nat hook prerouting priority dstnat; policy accept;
{dnat}\t}}
\tchain output {{
\t\ttype nat hook output priority -100; policy accept;
{dnat}\t}}
\tchain postrouting {{
\t\ttype nat hook postrouting priority srcnat; policy accept;
\t\toifname {any} ip saddr 127.0.0.0/8 masquerade
{masquerade}\t}}
\t# Into a container: answers and published ports. Out of one: only a
\t# NAT container's, and not to another container.
\tchain forward {{
\t\ttype filter hook forward priority filter; policy accept;
\t\toifname {any} ct state established,related accept
\t\toifname {any} ct status dnat accept
\t\toifname {any} drop
{outbound}\t\tiifname {any} ct state established,related accept
\t\tiifname {any} drop
\t}}
}}
"
    ))
}

/// The script that deletes the table, whether or not it exists.
fn delete_script() -> String {
    format!("table ip {TABLE}\ndelete table ip {TABLE}\n")
}

/// Makes the table what `records` need. `nft` missing is an error only
/// when rules are needed.
pub fn apply(records: &[Record]) -> Result<()> {
    match ruleset(records) {
        Some(script) => {
            enable_forwarding()?;
            nft(&script)
        }
        None => match nft(&delete_script()) {
            Err(Error::Io(e)) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            r => r,
        },
    }
}

fn nft(script: &str) -> Result<()> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(Error::Io)?;
    let written = child.stdin.take().map(|mut i| i.write_all(script.as_bytes()));
    let out = child.wait_with_output()?;
    if let Some(Err(e)) = written {
        return Err(Error::Network(format!("cannot give nft the ruleset: {e}")));
    }
    if out.status.success() {
        return Ok(());
    }
    Err(Error::Network(format!("nft: {} (the NAT network and -p need root and nftables)", String::from_utf8_lossy(&out.stderr).trim())))
}

const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";

/// Turns on IPv4 forwarding if it is off, and says so (it is left on: the
/// host may have come to rely on it, as it does with docker).
fn enable_forwarding() -> Result<()> {
    let now = std::fs::read_to_string(IP_FORWARD)?;
    if now.trim() == "1" {
        return Ok(());
    }
    std::fs::write(IP_FORWARD, "1").map_err(|e| Error::Network(format!("cannot enable {IP_FORWARD}: {e}")))?;
    log::warn!("enabled IPv4 forwarding on this host (net.ipv4.ip_forward was {}, is 1 now; vmrun leaves it on)", now.trim());
    Ok(())
}

/// Lets `tap` carry the host's own loopback connections to published
/// ports (`route_localnet` on that link only; the `guard` chain drops
/// loopback addresses coming from a container).
pub fn route_localnet(tap: &str) -> Result<()> {
    let path = format!("/proc/sys/net/ipv4/conf/{tap}/route_localnet");
    std::fs::write(&path, "1").map_err(|e| Error::Network(format!("cannot set {path}: {e}")))
}

/// The IPv4 name servers in a resolv.conf that a guest can use (not the
/// host's loopback).
pub fn nameservers(resolv_conf: &str) -> (Vec<Ipv4Addr>, bool) {
    let mut out = Vec::new();
    let mut loopback = false;
    for line in resolv_conf.lines() {
        let mut words = line.split_whitespace();
        if words.next() != Some("nameserver") {
            continue;
        }
        match words.next().and_then(|a| a.parse::<std::net::IpAddr>().ok()) {
            Some(a) if a.is_loopback() => loopback = true,
            Some(std::net::IpAddr::V4(a)) if !out.contains(&a) => out.push(a),
            _ => {}
        }
    }
    (out, loopback)
}

/// The name servers a NAT container gets: the host's, or when the host
/// asks a local resolver (systemd-resolved's 127.0.0.53), that resolver's
/// upstream servers. Empty, with a warning, when there are none.
pub fn host_nameservers() -> Vec<Ipv4Addr> {
    let read = |p: &str| std::fs::read_to_string(p).map(|t| nameservers(&t)).unwrap_or_default();
    let (servers, loopback) = read("/etc/resolv.conf");
    if !servers.is_empty() {
        return servers;
    }
    let (upstream, _) = read("/run/systemd/resolve/resolv.conf");
    if upstream.is_empty() {
        let why = if loopback { "names only a resolver on the host's loopback" } else { "names no IPv4 name server" };
        log::warn!("DNS will not work in the container: the host's /etc/resolv.conf {why}");
    }
    upstream
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn rec(tap: &str, guest: [u8; 4], nat: bool, ports: &[&str]) -> Record {
        Record { tap: tap.into(), guest: guest.into(), nat, ports: ports.iter().map(|p| p.parse().unwrap()).collect() }
    }

    #[test]
    fn no_table_without_nat_or_ports() {
        assert_eq!(ruleset(&[]), None);
        assert_eq!(ruleset(&[rec("vmrun-a", [10, 213, 0, 2], false, &[])]), None);
        assert!(ruleset(&[rec("vmrun-a", [10, 213, 0, 2], false, &["80:80"])]).is_some());
    }

    #[test]
    fn the_ruleset_masquerades_nat_links_and_forwards_published_ports() {
        let set = ruleset(&[
            rec("vmrun-a", [10, 213, 0, 2], true, &["8080:80", "5353:53/udp"]),
            rec("vmrun-b", [10, 213, 0, 6], false, &["9090:90"]),
        ])
        .unwrap();
        // Replaces the table whole, in one transaction.
        assert!(set.starts_with("table ip vmrun\ndelete table ip vmrun\ntable ip vmrun {"), "{set}");
        let lines: Vec<&str> = set.lines().map(str::trim).collect();
        let count = |l: &str| lines.iter().filter(|x| **x == l).count();
        // Both the prerouting and the output chain have each port.
        assert_eq!(count("fib daddr type local tcp dport 8080 dnat to 10.213.0.2:80"), 2);
        assert_eq!(count("fib daddr type local udp dport 5353 dnat to 10.213.0.2:53"), 2);
        assert_eq!(count("fib daddr type local tcp dport 9090 dnat to 10.213.0.6:90"), 2);
        // Only the NAT link is masqueraded and may start connections out.
        assert_eq!(count("iifname \"vmrun-a\" ip saddr 10.213.0.2 oifname != \"vmrun-*\" masquerade"), 1);
        assert_eq!(count("iifname \"vmrun-a\" ip saddr 10.213.0.2 oifname != \"vmrun-*\" accept"), 1);
        assert!(!set.contains("iifname \"vmrun-b\""), "{set}");
        // The last word on a container's packets is drop.
        let forward = set.split("chain forward").nth(1).unwrap();
        assert_eq!(forward.lines().map(str::trim).rfind(|l| l.ends_with("drop")), Some("iifname \"vmrun-*\" drop"));
    }

    #[test]
    fn the_ruleset_is_what_nft_accepts() {
        // `nft -c` checks a script without applying it (root only: it asks
        // the kernel).
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 || Command::new("nft").arg("--version").output().is_err() {
            eprintln!("skipped: needs root and nft");
            return;
        }
        let set = ruleset(&[rec("vmrun-a", [10, 213, 0, 2], true, &["8080:80", "5353:53/udp"])]).unwrap();
        let mut child = Command::new("nft").args(["-c", "-f", "-"]).stdin(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        child.stdin.take().unwrap().write_all(set.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{}\n{set}", String::from_utf8_lossy(&out.stderr));
    }

    #[test]
    fn ports_in_use_are_refused() {
        let others = [rec("vmrun-b", [10, 213, 0, 6], true, &["9090:90"])];
        let p = |s: &str| s.parse::<PortMap>().unwrap();
        assert!(check_ports(&[p("9090:80")], &others).unwrap_err().to_string().contains("vmrun-b"));
        assert!(check_ports(&[p("9090:80/udp")], &[rec("x", [0; 4], true, &["9090:80/udp"])]).is_err());
        assert!(check_ports(&[p("7070:1"), p("7070:2")], &[]).unwrap_err().to_string().contains("twice"));
        let held = std::net::TcpListener::bind((Ipv4Addr::UNSPECIFIED, 0)).unwrap();
        let port = held.local_addr().unwrap().port();
        assert!(check_ports(&[p(&format!("{port}:80"))], &[]).is_err(), "a port a host socket holds");
        drop(held);
        // Once freed, the port may be taken again by any socket of the host
        // before the check binds it: a free port passes on one of a few tries.
        let free = |port: u16| check_ports(&[p(&format!("{port}:80"))], &others).is_ok();
        let unused = || std::net::TcpListener::bind((Ipv4Addr::UNSPECIFIED, 0)).unwrap().local_addr().unwrap().port();
        assert!(free(port) || (0..20).any(|_| free(unused())));
    }

    #[test]
    fn name_servers_from_resolv_conf() {
        let (s, lo) = nameservers("# x\nnameserver 10.0.0.2\nnameserver 10.0.0.2\nnameserver ::1\nnameserver 1.1.1.1\nsearch example\n");
        assert_eq!((s, lo), (vec![Ipv4Addr::new(10, 0, 0, 2), Ipv4Addr::new(1, 1, 1, 1)], true));
        assert_eq!(nameservers("nameserver 127.0.0.53\noptions edns0\n"), (vec![], true));
        assert_eq!(nameservers("nameserver 2001:db8::1\nnameserver bogus\n"), (vec![], false));
    }
}
