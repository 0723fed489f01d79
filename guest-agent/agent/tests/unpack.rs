//! Unpacking well-formed layers: every entry type, metadata, whiteouts,
//! the three compressions.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};

use common::*;
use vmrun_agent::unpack;
use vmrun_agent_protocol::UnpackLimits;

#[test]
fn entries_and_metadata() {
    if !require_root() {
        return;
    }
    let dir = TempDir::new("unpack");
    let root = dir.path().join("root");
    std::fs::create_dir(&root).unwrap();
    let mut l = Layer::new();
    l.dir("usr", 0o755).dir("usr/bin", 0o750);
    l.file_full("usr/bin/tool", 0o4755, 1000, 2000, 1_234_567_890, b"#!/bin/sh\n");
    l.file("etc/implicit/parent.conf", 0o600, b"made its parents");
    l.symlink("bin", "usr/bin");
    l.symlink("abs", "/usr/bin/tool");
    l.hardlink("usr/bin/tool2", "usr/bin/tool");
    l.device("dev/null", tar::EntryType::Char, 1, 3);
    l.device("dev/loop0", tar::EntryType::Block, 7, 0);
    l.device("run/fifo", tar::EntryType::Fifo, 0, 0);
    l.file("bin/through-relative-symlink", 0o644, b"ok");
    let (disk, digests) = disk(&[(l.finish(), TAR)]);
    let stats = unpack::unpack(&disk, &digests, &root, UnpackLimits::default()).unwrap();
    assert_eq!(stats.layers, 1);
    assert_eq!(stats.bytes, 10 + 16 + 2);

    let tool = std::fs::metadata(root.join("usr/bin/tool")).unwrap();
    assert_eq!(tool.permissions().mode() & 0o7777, 0o4755, "setuid survives chown");
    assert_eq!((tool.uid(), tool.gid()), (1000, 2000));
    assert_eq!(tool.mtime(), 1_234_567_890);
    assert_eq!(std::fs::metadata(root.join("usr/bin")).unwrap().permissions().mode() & 0o7777, 0o750);
    assert_eq!(std::fs::metadata(root.join("usr/bin")).unwrap().mtime(), 1_600_000_000, "directory mtime set after its content");
    assert_eq!(std::fs::read(root.join("etc/implicit/parent.conf")).unwrap(), b"made its parents");
    assert_eq!(std::fs::read_link(root.join("bin")).unwrap().to_str(), Some("usr/bin"));
    assert_eq!(std::fs::read_link(root.join("abs")).unwrap().to_str(), Some("/usr/bin/tool"));
    assert_eq!(std::fs::metadata(root.join("usr/bin/tool2")).unwrap().ino(), tool.ino());
    let null = std::fs::symlink_metadata(root.join("dev/null")).unwrap();
    assert!(null.file_type().is_char_device());
    assert_eq!(null.rdev(), libc::makedev(1, 3));
    assert!(std::fs::symlink_metadata(root.join("dev/loop0")).unwrap().file_type().is_block_device());
    assert!(std::fs::symlink_metadata(root.join("run/fifo")).unwrap().file_type().is_fifo());
    assert_eq!(std::fs::read(root.join("usr/bin/through-relative-symlink")).unwrap(), b"ok");
}

#[test]
fn layers_whiteouts_and_compressions() {
    if !require_root() {
        return;
    }
    let dir = TempDir::new("layers");
    let root = dir.path().join("root");
    std::fs::create_dir(&root).unwrap();
    let mut base = Layer::new();
    base.file("keep", 0o644, b"base");
    base.file("gone", 0o644, b"base");
    base.dir("tree", 0o755).file("tree/a", 0o644, b"a").dir("tree/sub", 0o755).file("tree/sub/b", 0o644, b"b");
    base.dir("opaque", 0o755).file("opaque/old", 0o644, b"old");
    base.file("was-file", 0o644, b"file");
    base.dir("was-dir", 0o755).file("was-dir/x", 0o644, b"x");
    let mut upper = Layer::new();
    upper.file(".wh.gone", 0o644, b"");
    upper.file(".wh.tree", 0o644, b"");
    upper.dir("opaque", 0o700).file("opaque/new", 0o644, b"new").file("opaque/.wh..wh..opq", 0o644, b"");
    upper.dir("was-file", 0o755);
    upper.file("was-dir", 0o644, b"now a file");
    upper.file("keep", 0o644, b"upper");
    let mut top = Layer::new();
    top.file("from-zstd", 0o644, b"zstd");
    let (disk, digests) = disk(&[(gzip(&base.finish()), GZIP), (upper.finish(), TAR), (zstd(&top.finish()), ZSTD)]);
    let stats = unpack::unpack(&disk, &digests, &root, UnpackLimits::default()).unwrap();
    assert_eq!(stats.layers, 3);
    let mut names: Vec<String> = std::fs::read_dir(&root).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    names.sort();
    assert_eq!(names, ["from-zstd", "keep", "opaque", "was-dir", "was-file"]);
    assert_eq!(std::fs::read(root.join("keep")).unwrap(), b"upper");
    let opaque: Vec<String> = std::fs::read_dir(root.join("opaque")).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    assert_eq!(opaque, ["new"], "opaque keeps this layer's entries only");
    assert_eq!(std::fs::metadata(root.join("opaque")).unwrap().permissions().mode() & 0o777, 0o700);
    assert!(std::fs::metadata(root.join("was-file")).unwrap().is_dir());
    assert_eq!(std::fs::read(root.join("was-dir")).unwrap(), b"now a file");
    assert_eq!(std::fs::read(root.join("from-zstd")).unwrap(), b"zstd");
}

#[test]
fn multi_frame_zstd_and_multi_member_gzip() {
    if !require_root() {
        return;
    }
    let dir = TempDir::new("frames");
    let root = dir.path().join("root");
    std::fs::create_dir(&root).unwrap();
    let mut l = Layer::new();
    l.file("a", 0o644, &[1u8; 3000]).file("b", 0o644, &[2u8; 3000]);
    let tar = l.finish();
    let (h1, h2) = tar.split_at(2048);
    // Two zstd frames with a skippable frame between them.
    let mut z = zstd(h1);
    z.extend_from_slice(&0x184d_2a50u32.to_le_bytes());
    z.extend_from_slice(&4u32.to_le_bytes());
    z.extend_from_slice(b"skip");
    z.extend_from_slice(&zstd(h2));
    let mut g = gzip(h1);
    g.extend_from_slice(&gzip(h2));
    for (blob, mt) in [(z, ZSTD), (g, GZIP)] {
        let (disk, digests) = disk(&[(blob, mt)]);
        unpack::unpack(&disk, &digests, &root, UnpackLimits::default()).unwrap();
        assert_eq!(std::fs::read(root.join("b")).unwrap(), vec![2u8; 3000], "{mt}");
    }
}
