//! The malicious-layer corpus: each layer tries to write outside the
//! container root (or to exhaust the guest) and must be refused with
//! nothing written outside the root.
//!
//! Layout of each case: `sandbox/root` is the container root;
//! `sandbox/outside/keep` and `sandbox/victim.txt` are what an escape
//! would touch. After the unpack, everything outside `root` must be exactly
//! as before.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::*;
use vmrun_agent::unpack::{self, UnpackError};
use vmrun_agent_protocol::UnpackLimits;

struct Sandbox {
    dir: TempDir,
}

impl Sandbox {
    fn new() -> Self {
        let dir = TempDir::new("malicious");
        std::fs::create_dir(dir.path().join("root")).unwrap();
        std::fs::create_dir(dir.path().join("outside")).unwrap();
        std::fs::write(dir.path().join("outside/keep"), b"original").unwrap();
        std::fs::write(dir.path().join("victim.txt"), b"victim").unwrap();
        Self { dir }
    }

    fn root(&self) -> std::path::PathBuf {
        self.dir.path().join("root")
    }

    fn abs(&self, rel: &str) -> String {
        self.dir.path().join(rel).display().to_string()
    }

    /// Everything outside `root`: path -> content ("<dir>" for dirs).
    fn outside_snapshot(&self) -> BTreeMap<String, String> {
        fn walk(base: &Path, p: &Path, out: &mut BTreeMap<String, String>) {
            for e in std::fs::read_dir(p).unwrap() {
                let e = e.unwrap();
                let path = e.path();
                let rel = path.strip_prefix(base).unwrap().display().to_string();
                if rel == "root" {
                    continue;
                }
                let md = std::fs::symlink_metadata(&path).unwrap();
                if md.is_dir() {
                    out.insert(rel, "<dir>".into());
                    walk(base, &path, out);
                } else {
                    out.insert(rel, String::from_utf8_lossy(&std::fs::read(&path).unwrap()).into_owned());
                }
            }
        }
        let mut out = BTreeMap::new();
        walk(self.dir.path(), self.dir.path(), &mut out);
        out
    }

    fn assert_untouched(&self) {
        let want: BTreeMap<String, String> =
            [("outside", "<dir>"), ("outside/keep", "original"), ("victim.txt", "victim")].iter().map(|(a, b)| (a.to_string(), b.to_string())).collect();
        assert_eq!(self.outside_snapshot(), want, "something was written outside the root");
    }

    /// Unpacks layers (each a tar, gzip-compressed) and returns the error.
    fn unpack_err(&self, layers: Vec<Vec<u8>>, limits: UnpackLimits) -> UnpackError {
        let blobs: Vec<(Vec<u8>, &str)> = layers.into_iter().map(|l| (gzip(&l), GZIP)).collect();
        let (dk, digests) = disk(&blobs);
        let e = unpack::unpack(&dk, &digests, &self.root(), limits).expect_err("the layer was accepted");
        self.assert_untouched();
        e
    }
}

fn one(f: impl FnOnce(&mut Layer)) -> Vec<u8> {
    let mut l = Layer::new();
    f(&mut l);
    l.finish()
}

#[test]
fn path_traversal_is_refused() {
    if !require_root() {
        return;
    }
    for p in ["../outside/pwned", "a/../../outside/pwned", "./../victim.txt", ".."] {
        let s = Sandbox::new();
        let e = s.unpack_err(vec![one(|l| {
            l.raw(p.as_bytes(), tar::EntryType::Regular, b"", b"pwned");
        })], UnpackLimits::default());
        assert!(e.to_string().contains(".."), "{p}: {e}");
    }
}

#[test]
fn absolute_paths_are_refused() {
    if !require_root() {
        return;
    }
    let s = Sandbox::new();
    let target = s.abs("outside/pwned");
    let e = s.unpack_err(vec![one(|l| {
        l.raw(target.as_bytes(), tar::EntryType::Regular, b"", b"pwned");
    })], UnpackLimits::default());
    assert!(e.to_string().contains("absolute"), "{e}");
}

#[test]
fn writing_through_an_escaping_symlink_is_refused() {
    if !require_root() {
        return;
    }
    // Relative and absolute symlinks out of the root, then a file, a
    // directory, a symlink, a device and a whiteout through them; in the
    // same layer and in a later one.
    let outside_abs = Sandbox::new().abs("outside");
    for link in ["../outside", outside_abs.as_str(), "a/../../outside"] {
        for (what, entry) in [
            ("file", tar::EntryType::Regular),
            ("dir", tar::EntryType::Directory),
            ("symlink", tar::EntryType::Symlink),
            ("fifo", tar::EntryType::Fifo),
        ] {
            for split_layers in [false, true] {
                let s = Sandbox::new();
                let mut first = Layer::new();
                first.dir("a", 0o755).symlink("escape", link);
                let mut second = Layer::new();
                let target = if entry == tar::EntryType::Symlink { &b"/etc/passwd"[..] } else { b"" };
                let data = if entry == tar::EntryType::Regular { &b"pwned"[..] } else { b"" };
                let into = if split_layers { &mut second } else { &mut first };
                into.raw(b"escape/pwned", entry, target, data);
                let layers = if split_layers { vec![first.finish(), second.finish()] } else { vec![first.finish()] };
                let e = s.unpack_err(layers, UnpackLimits::default());
                assert!(e.to_string().contains("outside the container root"), "{link} {what}: {e}");
            }
        }
    }
}

#[test]
fn whiteouts_through_an_escaping_symlink_are_refused() {
    if !require_root() {
        return;
    }
    for name in [".wh.victim.txt", ".wh..wh..opq"] {
        let s = Sandbox::new();
        let dir = s.dir.path().display().to_string();
        let mut l = Layer::new();
        l.symlink("escape", &dir);
        l.raw(format!("escape/{name}").as_bytes(), tar::EntryType::Regular, b"", b"");
        let e = s.unpack_err(vec![l.finish()], UnpackLimits::default());
        assert!(e.to_string().contains("outside the container root"), "{name}: {e}");
    }
}

#[test]
fn a_symlink_in_the_way_is_replaced_not_written_through() {
    if !require_root() {
        return;
    }
    let s = Sandbox::new();
    let victim = s.abs("victim.txt");
    let (dk, digests) = disk(&[
        (one(|l| {
            l.symlink("link", &victim);
        }), TAR),
        (one(|l| {
            l.file("link", 0o644, b"replaced");
        }), TAR),
    ]);
    unpack::unpack(&dk, &digests, &s.root(), UnpackLimits::default()).unwrap();
    s.assert_untouched();
    let md = std::fs::symlink_metadata(s.root().join("link")).unwrap();
    assert!(md.is_file());
    assert_eq!(std::fs::read(s.root().join("link")).unwrap(), b"replaced");
}

#[test]
fn hard_links_out_of_the_root_are_refused() {
    if !require_root() {
        return;
    }
    let s = Sandbox::new();
    let e = s.unpack_err(vec![one(|l| {
        l.hardlink("h", "../victim.txt");
    })], UnpackLimits::default());
    assert!(e.to_string().contains(".."), "{e}");

    let s = Sandbox::new();
    let victim = s.abs("victim.txt");
    let e = s.unpack_err(vec![one(|l| {
        l.raw(b"h", tar::EntryType::Link, victim.as_bytes(), b"");
    })], UnpackLimits::default());
    assert!(e.to_string().contains("absolute"), "{e}");

    // Through a symlinked directory.
    let s = Sandbox::new();
    let dir = s.dir.path().display().to_string();
    let e = s.unpack_err(vec![one(|l| {
        l.symlink("esc", &dir);
        l.hardlink("h", "esc/victim.txt");
        l.file("h", 0o644, b"pwned");
    })], UnpackLimits::default());
    assert!(e.to_string().contains("outside the container root"), "{e}");

    // A hard link to a symlink that points out links the symlink itself;
    // writing the link's path afterwards replaces it.
    let s = Sandbox::new();
    let victim = s.abs("victim.txt");
    let (dk, digests) = disk(&[(
        one(|l| {
            l.symlink("s", &victim);
            l.hardlink("h", "s");
            l.file("h", 0o644, b"replaced");
        }),
        TAR,
    )]);
    unpack::unpack(&dk, &digests, &s.root(), UnpackLimits::default()).unwrap();
    s.assert_untouched();
}

#[test]
fn a_decompression_bomb_is_stopped_before_writing() {
    if !require_root() {
        return;
    }
    // 256 MiB of zeros in one file compress to a few hundred KiB.
    let big = 256u64 << 20;
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_path("bomb").unwrap();
    h.set_size(big);
    h.set_mode(0o644);
    h.set_cksum();
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    use std::io::Write;
    enc.write_all(h.as_bytes()).unwrap();
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..(big >> 20) {
        enc.write_all(&zeros).unwrap();
    }
    enc.write_all(&[0u8; 1024]).unwrap();
    let blob = enc.finish().unwrap();
    assert!(blob.len() < 2 << 20, "the bomb should be small: {}", blob.len());
    let s = Sandbox::new();
    let (dk, digests) = disk(&[(blob, GZIP)]);
    let limits = UnpackLimits { max_bytes: 64 << 20, max_entries: 1000 };
    let e = unpack::unpack(&dk, &digests, &s.root(), limits).unwrap_err();
    assert!(e.to_string().contains("limit"), "{e}");
    s.assert_untouched();
    assert!(!s.root().join("bomb").exists(), "the bomb file was created");

    // Many small entries: the entry limit.
    let s = Sandbox::new();
    let mut l = Layer::new();
    for i in 0..200 {
        l.file(&format!("f{i}"), 0o644, b"");
    }
    let e = s.unpack_err(vec![l.finish()], UnpackLimits { max_bytes: 1 << 20, max_entries: 100 });
    assert!(e.to_string().contains("entries"), "{e}");

    // A stream that decompresses past every bound without a big entry: a
    // huge PAX header is refused before it is read into memory.
    let s = Sandbox::new();
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(tar::EntryType::XHeader);
    h.set_path("pax").unwrap();
    h.set_size(1 << 30);
    h.set_cksum();
    let e = s.unpack_err(vec![h.as_bytes().to_vec()], UnpackLimits::default());
    assert!(e.to_string().contains("extension header"), "{e}");
}

#[test]
fn a_truncated_blob_is_refused() {
    if !require_root() {
        return;
    }
    let layer = gzip(&one(|l| {
        l.file("a", 0o644, &[7u8; 100_000]);
    }));
    // The digest of the truncated bytes: the disk is consistent, the
    // stream is not.
    let cut = layer[..layer.len() / 2].to_vec();
    let s = Sandbox::new();
    let (dk, digests) = disk(&[(cut, GZIP)]);
    let e = unpack::unpack(&dk, &digests, &s.root(), UnpackLimits::default()).unwrap_err();
    assert!(matches!(e, UnpackError::Layer { .. }), "{e}");
    s.assert_untouched();

    // A disk cut short of its index.
    let s = Sandbox::new();
    let (dk, digests) = disk(&[(layer, GZIP)]);
    let e = unpack::unpack(&dk[..dk.len() - 4096], &digests, &s.root(), UnpackLimits::default()).unwrap_err();
    assert!(e.to_string().contains("truncated"), "{e}");
    s.assert_untouched();

    // A plain tar cut inside a file's content.
    let s = Sandbox::new();
    let tar = one(|l| {
        l.file("a", 0o644, &[7u8; 10_000]);
    });
    let (dk, digests) = disk(&[(tar[..3000].to_vec(), TAR)]);
    let e = unpack::unpack(&dk, &digests, &s.root(), UnpackLimits::default()).unwrap_err();
    assert!(e.to_string().contains("truncated"), "{e}");
    s.assert_untouched();
}

#[test]
fn a_digest_mismatch_is_refused_before_anything_is_written() {
    if !require_root() {
        return;
    }
    let good = one(|l| {
        l.file("first", 0o644, b"from a good layer");
    });
    let bad = one(|l| {
        l.file("second", 0o644, b"tampered");
    });
    let s = Sandbox::new();
    let (mut dk, digests) = disk(&[(good, TAR), (bad, TAR)]);
    let index = vmrun_layerdisk::Index::decode(&dk, dk.len() as u64).unwrap();
    let off = index.entries[1].offset as usize + 600;
    dk[off] ^= 0x20;
    let e = unpack::unpack(&dk, &digests, &s.root(), UnpackLimits::default()).unwrap_err();
    assert!(e.to_string().contains("does not match its digest"), "{e}");
    s.assert_untouched();
    // Not even the good first layer was applied.
    assert_eq!(std::fs::read_dir(s.root()).unwrap().count(), 0);
}

#[test]
fn unknown_blobs_and_media_types_are_refused() {
    if !require_root() {
        return;
    }
    let s = Sandbox::new();
    let (dk, _) = disk(&[(one(|l| {
        l.file("a", 0o644, b"x");
    }), TAR)]);
    let e = unpack::unpack(&dk, &[vmrun_layerdisk::Digest::of(b"not there")], &s.root(), UnpackLimits::default()).unwrap_err();
    assert!(e.to_string().contains("not on the layer disk"), "{e}");
    let (dk, digests) = disk(&[(b"{}".to_vec(), "application/vnd.oci.image.config.v1+json")]);
    let e = unpack::unpack(&dk, &digests, &s.root(), UnpackLimits::default()).unwrap_err();
    assert!(e.to_string().contains("media type"), "{e}");
    s.assert_untouched();
}

#[test]
fn whiteouts_of_dot_dotdot_or_nothing_are_refused() {
    if !require_root() {
        return;
    }
    // `.wh.` + `..` once whited out the root's parent; `.wh.` + `.` the
    // directory itself; `.wh.` alone names nothing. Each is refused, in
    // the root and in a subdirectory, in the first layer and in a later
    // one, and nothing outside or inside the root is touched.
    let names = [".wh...", ".wh..", ".wh.", "./.wh...", "a/.wh...", "a/.wh..", "a/.wh.", "a/b/.wh...", "a/.wh.../"];
    for name in names {
        for later_layer in [false, true] {
            let s = Sandbox::new();
            let mut base = Layer::new();
            base.dir("a", 0o755).dir("a/b", 0o755).file("a/inner", 0o644, b"inner").file("keep", 0o644, b"kept");
            let mut bad = Layer::new();
            bad.raw(name.as_bytes(), tar::EntryType::Regular, b"", b"");
            let layers = if later_layer {
                vec![base.finish(), bad.finish()]
            } else {
                base.raw(name.as_bytes(), tar::EntryType::Regular, b"", b"");
                vec![base.finish()]
            };
            let e = s.unpack_err(layers, UnpackLimits::default());
            let msg = e.to_string();
            assert!(msg.contains("whiteout") && msg.contains(name.trim_start_matches("./").trim_end_matches('/')), "{name}: {msg}");
            assert!(s.root().is_dir(), "{name}: the root itself is gone");
            if later_layer {
                // The first layer's entries are all still there.
                assert_eq!(std::fs::read(s.root().join("keep")).unwrap(), b"kept", "{name}");
                assert_eq!(std::fs::read(s.root().join("a/inner")).unwrap(), b"inner", "{name}");
                assert!(s.root().join("a/b").is_dir(), "{name}");
            }
        }
    }
}

#[test]
fn ordinary_whiteouts_still_remove_their_entry() {
    if !require_root() {
        return;
    }
    // Names that merely start with dots are plain entries.
    let s = Sandbox::new();
    let (dk, digests) = disk(&[
        (one(|l| {
            l.file("..x", 0o644, b"1").file("...", 0o644, b"2").file("keep", 0o644, b"3");
        }), TAR),
        (one(|l| {
            l.raw(b".wh...x", tar::EntryType::Regular, b"", b"").raw(b".wh....", tar::EntryType::Regular, b"", b"");
        }), TAR),
    ]);
    unpack::unpack(&dk, &digests, &s.root(), UnpackLimits::default()).unwrap();
    s.assert_untouched();
    assert!(!s.root().join("..x").exists() && !s.root().join("...").exists());
    assert_eq!(std::fs::read(s.root().join("keep")).unwrap(), b"3");
}
