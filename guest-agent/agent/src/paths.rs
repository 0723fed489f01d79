//! Where a path of the container is in its image: symbolic links of the
//! (hostile) image followed the way the container will see them, inside
//! its root, never out of it.

use std::path::Path;

/// Most symbolic links followed for one path (the kernel's limit).
const MAX_LINKS: usize = 40;

/// `path` (absolute, as the container sees it) with the image's symbolic
/// links resolved inside `root`, the image's root in the agent's view:
/// `..` and absolute link targets stop at the root, as they will in the
/// container. The resolution stops (the rest is kept as written) at a part
/// that does not exist yet, at one that is not a directory or a link, and
/// under the paths in `covered`, which are mount points the container
/// gets before this path is used (its `/proc`, `/dev`, ...): what the image
/// has there will be hidden. The result is absolute and has no `.` or `..`.
pub fn resolve_in_root(root: &Path, path: &str, covered: &[String]) -> String {
    let mut done: Vec<String> = Vec::new();
    let mut todo: Vec<String> = path.split('/').rev().map(str::to_owned).collect();
    let mut links = 0;
    let mut literal = false;
    while let Some(part) = todo.pop() {
        match part.as_str() {
            "" | "." => continue,
            ".." => {
                done.pop();
                continue;
            }
            _ => {}
        }
        done.push(part);
        if literal {
            continue;
        }
        let here = format!("/{}", done.join("/"));
        if covered.iter().any(|c| c.trim_end_matches('/') == here) {
            literal = true;
            continue;
        }
        // Every part before this one is a directory of the image (not a
        // link): reading this one's link reads the image's.
        let on_host = root.join(&here[1..]);
        match std::fs::symlink_metadata(&on_host) {
            Ok(m) if m.file_type().is_symlink() => {
                links += 1;
                let Ok(target) = std::fs::read_link(&on_host) else {
                    literal = true;
                    continue;
                };
                if links > MAX_LINKS {
                    // Left to the kernel, which gives ELOOP.
                    literal = true;
                    continue;
                }
                done.pop();
                let target = target.to_string_lossy().into_owned();
                if target.starts_with('/') {
                    done.clear();
                }
                todo.extend(target.split('/').rev().map(str::to_owned));
            }
            Ok(m) if m.is_dir() => {}
            _ => literal = true,
        }
    }
    format!("/{}", done.join("/"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn links_stay_inside_the_root() {
        let d = tempfile_dir();
        let root = d.as_path();
        std::fs::create_dir_all(root.join("real/sub")).unwrap();
        symlink("/real", root.join("abs")).unwrap();
        symlink("../../../../real/sub", root.join("up")).unwrap();
        symlink("/etc/../../../outside", root.join("out")).unwrap();
        symlink("loop", root.join("loop")).unwrap();
        std::fs::create_dir(root.join("dev")).unwrap();
        symlink("/real", root.join("dev/shm")).unwrap();
        let r = |p: &str| resolve_in_root(root, p, &["/dev".to_string()]);
        assert_eq!(r("/abs/sub/x"), "/real/sub/x");
        assert_eq!(r("/up/x"), "/real/sub/x");
        assert_eq!(r("/out/mnt"), "/outside/mnt", "an escaping link lands inside the root");
        assert_eq!(r("/a/../../b/./c/"), "/b/c");
        assert_eq!(r("/dev/shm/x"), "/dev/shm/x", "nothing is resolved under a mount point the container gets");
        assert_eq!(r("/loop/x"), "/loop/x", "a loop is left to the kernel");
        assert_eq!(r("/"), "/");
        std::fs::remove_dir_all(root).unwrap();
    }

    fn tempfile_dir() -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("vmrun-paths-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}
