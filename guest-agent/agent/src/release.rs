//! What a held first process is released with when its run changes the
//! program (`Request::Release` with overrides, a container prepared in a
//! warm-start template): the program and its `PATH` candidates, the
//! environment, the working directory, the user and groups, the
//! capabilities and `no_new_privs`. The agent encodes them ([`encode`])
//! and writes them on the gate; the held child, which may not allocate,
//! decodes them in place ([`decode`]) into buffers made before `clone`.
//!
//! Layout (native byte order, the agent and the child are one program):
//! 20 words (magic, uid, gid, `no_new_privs`, the counts of groups,
//! arguments, environment entries, candidates and directories to make,
//! the five capability sets as low and high halves, the last capability),
//! the groups, then NUL-terminated strings: the working directory, the
//! arguments, the environment, the candidates, the directories.

use std::ffi::{c_char, CStr, CString};
use std::io;

use crate::caps::CapSets;

/// The most bytes a release carries.
pub const MAX_BYTES: usize = 256 * 1024;
/// The most strings (arguments, environment, candidates, directories).
pub const MAX_STRINGS: usize = 16 * 1024;
/// The most supplementary groups.
pub const MAX_GROUPS: usize = 1024;

const MAGIC: u32 = 0x564d_5231;
const WORDS: usize = 20;

/// What the released process runs as (the agent's side).
#[derive(Debug)]
pub struct Exec<'a> {
    /// argv.
    pub argv: &'a [CString],
    /// envp.
    pub envp: &'a [CString],
    /// Where `execve` is tried, in order.
    pub candidates: &'a [CString],
    /// Working directory.
    pub cwd: &'a CStr,
    /// Directories made, top down, when `cwd` is missing.
    pub cwd_mkdirs: &'a [CString],
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
    /// Supplementary groups.
    pub groups: &'a [libc::gid_t],
    /// Capability sets.
    pub caps: CapSets,
    /// `no_new_privs`.
    pub no_new_privs: bool,
}

fn too_large(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, format!("the process's {what} are too large to hand to a prepared container"))
}

/// Encodes `e` for the gate.
pub fn encode(e: &Exec<'_>) -> io::Result<Vec<u8>> {
    if e.groups.len() > MAX_GROUPS {
        return Err(too_large("groups"));
    }
    if e.argv.is_empty() || e.argv.len() + e.envp.len() + e.candidates.len() + e.cwd_mkdirs.len() + 2 > MAX_STRINGS {
        return Err(too_large("arguments and environment"));
    }
    let c = &e.caps;
    let mut words = vec![
        MAGIC,
        e.uid,
        e.gid,
        u32::from(e.no_new_privs),
        e.groups.len() as u32,
        e.argv.len() as u32,
        e.envp.len() as u32,
        e.candidates.len() as u32,
        e.cwd_mkdirs.len() as u32,
    ];
    for set in [c.bounding, c.effective, c.permitted, c.inheritable, c.ambient] {
        words.extend([set as u32, (set >> 32) as u32]);
    }
    words.push(c.last_cap);
    debug_assert_eq!(words.len(), WORDS);
    words.extend(e.groups.iter().copied());
    let mut out: Vec<u8> = words.iter().flat_map(|w| w.to_ne_bytes()).collect();
    let strings = std::iter::once(e.cwd).chain(e.argv.iter().chain(e.envp).chain(e.candidates).chain(e.cwd_mkdirs).map(CString::as_c_str));
    for s in strings {
        out.extend_from_slice(s.to_bytes_with_nul());
    }
    if out.len() > MAX_BYTES {
        return Err(too_large("arguments and environment"));
    }
    Ok(out)
}

/// A decoded release: pointers into the buffer it was decoded from.
#[derive(Debug)]
pub struct View<'a> {
    /// argv, then a null pointer.
    pub argv: &'a [*const c_char],
    /// envp, then a null pointer.
    pub envp: &'a [*const c_char],
    /// Where `execve` is tried.
    pub candidates: &'a [*const c_char],
    /// Working directory.
    pub cwd: *const c_char,
    /// Directories made when `cwd` is missing.
    pub cwd_mkdirs: &'a [*const c_char],
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
    /// Supplementary groups.
    pub groups: &'a [libc::gid_t],
    /// Capability sets.
    pub caps: CapSets,
    /// `no_new_privs`.
    pub no_new_privs: bool,
}

fn word(buf: &[u8], i: usize) -> Option<u32> {
    let b = buf.get(i * 4..i * 4 + 4)?;
    Some(u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
}

/// Decodes `buf` without allocating: the strings stay in `buf`, their
/// pointers go to `ptrs`, the groups to `groups`. `None` when `buf` is not
/// a whole release or does not fit.
pub fn decode<'a>(buf: &'a [u8], ptrs: &'a mut [*const c_char], groups: &'a mut [libc::gid_t]) -> Option<View<'a>> {
    if word(buf, 0)? != MAGIC {
        return None;
    }
    let [uid, gid, nnp, ngroups, argc, envc, ncand, nmkdirs] = [1, 2, 3, 4, 5, 6, 7, 8].map(|i| word(buf, i).unwrap_or(u32::MAX) as usize);
    let set = |i: usize| -> Option<u64> { Some(u64::from(word(buf, 9 + 2 * i)?) | (u64::from(word(buf, 10 + 2 * i)?) << 32)) };
    let caps = CapSets {
        bounding: set(0)?,
        effective: set(1)?,
        permitted: set(2)?,
        inheritable: set(3)?,
        ambient: set(4)?,
        last_cap: word(buf, 19)?,
    };
    if ngroups > groups.len() || argc == 0 || argc.checked_add(envc)?.checked_add(ncand)?.checked_add(nmkdirs)?.checked_add(2)? > ptrs.len()
    {
        return None;
    }
    for (i, g) in groups.iter_mut().take(ngroups).enumerate() {
        *g = word(buf, WORDS + i)?;
    }
    let mut pos = (WORDS + ngroups) * 4;
    let mut next = || -> Option<*const c_char> {
        let rest = buf.get(pos..)?;
        let nul = rest.iter().position(|b| *b == 0)?;
        let p = rest.as_ptr().cast::<c_char>();
        pos += nul + 1;
        Some(p)
    };
    let cwd = next()?;
    // argv, NULL, envp, NULL, candidates, directories.
    let mut at = 0;
    for (count, terminated) in [(argc, true), (envc, true), (ncand, false), (nmkdirs, false)] {
        for _ in 0..count {
            ptrs[at] = next()?;
            at += 1;
        }
        if terminated {
            ptrs[at] = std::ptr::null();
            at += 1;
        }
    }
    if pos != buf.len() {
        return None;
    }
    let (argv, rest) = ptrs.split_at(argc + 1);
    let (envp, rest) = rest.split_at(envc + 1);
    let (candidates, rest) = rest.split_at(ncand);
    Some(View {
        argv,
        envp,
        candidates,
        cwd,
        cwd_mkdirs: &rest[..nmkdirs],
        uid: uid as u32,
        gid: gid as u32,
        groups: &groups[..ngroups],
        caps,
        no_new_privs: nnp != 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(v: &[&str]) -> Vec<CString> {
        v.iter().map(|s| CString::new(*s).unwrap()).collect()
    }

    fn text(p: *const c_char) -> String {
        // SAFETY: pointers decode returns point at NUL-terminated strings
        // in the buffer, alive for the test.
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }

    #[test]
    fn a_release_round_trips_and_bad_ones_are_refused() {
        let (argv, envp, cand, dirs) =
            (strings(&["sh", "-c", "echo hi"]), strings(&["A=1", "PATH=/bin"]), strings(&["/bin/sh"]), strings(&["/w"]));
        let caps = CapSets { bounding: 1 << 40 | 5, effective: 5, permitted: 5, inheritable: 0, ambient: 1, last_cap: 40 };
        let e = Exec {
            argv: &argv,
            envp: &envp,
            candidates: &cand,
            cwd: c"/w",
            cwd_mkdirs: &dirs,
            uid: 1000,
            gid: 100,
            groups: &[100, 27],
            caps,
            no_new_privs: true,
        };
        let buf = encode(&e).unwrap();
        let (mut ptrs, mut groups) = (vec![std::ptr::null(); 64], vec![0; 8]);
        let v = decode(&buf, &mut ptrs, &mut groups).unwrap();
        assert_eq!(v.argv.iter().take(3).map(|p| text(*p)).collect::<Vec<_>>(), ["sh", "-c", "echo hi"]);
        assert!(v.argv[3].is_null() && v.envp[2].is_null());
        assert_eq!((text(v.envp[0]), text(v.envp[1])), ("A=1".into(), "PATH=/bin".into()));
        assert_eq!((text(v.candidates[0]), text(v.cwd), text(v.cwd_mkdirs[0])), ("/bin/sh".into(), "/w".into(), "/w".into()));
        assert_eq!((v.uid, v.gid, v.groups, v.caps, v.no_new_privs), (1000, 100, &[100, 27][..], caps, true));

        // Truncated, extended, or with too little room: refused, no panic.
        let (mut ptrs, mut groups) = (vec![std::ptr::null(); 64], vec![0; 8]);
        for n in 0..buf.len() {
            assert!(decode(&buf[..n], &mut ptrs, &mut groups).is_none(), "{n} bytes");
        }
        let mut longer = buf.clone();
        longer.push(b'x');
        assert!(decode(&longer, &mut ptrs, &mut groups).is_none());
        assert!(decode(&buf, &mut [std::ptr::null(); 8], &mut groups).is_none());
        assert!(decode(&buf, &mut ptrs, &mut [0; 1]).is_none());
        // Counts that overflow.
        let mut bad = buf.clone();
        bad[5 * 4..6 * 4].copy_from_slice(&u32::MAX.to_ne_bytes());
        assert!(decode(&bad, &mut ptrs, &mut groups).is_none());
        // Too large to encode.
        let many = strings(&["x"; MAX_STRINGS]);
        assert!(encode(&Exec { argv: &many, ..e }).is_err());
    }
}
