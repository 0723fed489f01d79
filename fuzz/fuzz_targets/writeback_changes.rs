//! The OCI runtime's write-back of a container's changes into a bundle's
//! root: whatever a hostile guest lists (paths with `..`, `.`, empty or
//! absolute parts, through the bundle's symbolic links, over files and
//! directories of any kind), nothing outside the root is written or
//! removed, and nothing panics.
//!
//! An input is a list of changes, three bytes each plus a name table
//! walk: what (directory, file, appended file, link, removal), whether it
//! replaces what is there, and up to three path parts from a table of
//! awkward names. The root holds links out of it (relative and absolute);
//! after each input the directory beside it must be as it was.
#![no_main]

use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use libfuzzer_sys::fuzz_target;
use vmrun_agent_protocol::{Change, CopyContent, CopyEntry};

const NAMES: [&str; 10] = ["a", "b", "..", ".", "", "out", "abs", "/", "a/../..", "out/x"];

fn dirs() -> (PathBuf, PathBuf) {
    let base = std::env::temp_dir().join(format!("vmrun-fuzz-writeback-{}", std::process::id()));
    (base.join("root"), base.join("outside"))
}

fn set_up(root: &Path, outside: &Path) {
    let _ = std::fs::remove_dir_all(root);
    std::fs::create_dir_all(root).expect("root");
    std::fs::create_dir_all(outside).expect("outside");
    std::fs::write(outside.join("victim"), "keep").expect("victim");
    std::os::unix::fs::symlink("../outside", root.join("out")).expect("link");
    std::os::unix::fs::symlink(outside, root.join("abs")).expect("link");
}

fn change(op: &[u8]) -> Change {
    let parts = (op[1] % 3) as usize + 1;
    let path: Vec<&str> = (0..parts).map(|i| NAMES[(op[2].rotate_left(3 * i as u32) as usize) % NAMES.len()]).collect();
    let path = path.join("/");
    let entry = |content| CopyEntry { path: path.clone(), mode: u32::from(op[1]) << 3, uid: 0, gid: 0, content };
    let replace = op[0] & 0x80 != 0;
    match op[0] % 5 {
        0 => Change::Put { entry: entry(CopyContent::Directory), replace },
        1 => Change::Put { entry: entry(CopyContent::File { data: b"data".to_vec(), append: false }), replace },
        2 => Change::Put { entry: entry(CopyContent::File { data: b"more".to_vec(), append: true }), replace },
        3 => Change::Put { entry: entry(CopyContent::Symlink { target: NAMES[op[1] as usize % NAMES.len()].into() }), replace },
        _ => Change::Remove { path },
    }
}

fuzz_target!(|data: &[u8]| {
    let (root, outside) = dirs();
    set_up(&root, &outside);
    let fd: OwnedFd = std::fs::File::open(&root).expect("open root").into();
    for op in data.chunks_exact(3).take(64) {
        let _ = vmrun_tree::apply(fd.as_fd(), &change(op));
    }
    let names: Vec<_> = std::fs::read_dir(&outside).expect("outside").map(|e| e.expect("entry").file_name()).collect();
    assert_eq!(names, ["victim"], "something was made or removed outside the root");
    assert_eq!(std::fs::read(outside.join("victim")).expect("victim"), b"keep");
});
