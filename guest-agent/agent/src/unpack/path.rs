//! Checking the paths a layer names.

/// What a tar path means once checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// The root directory itself (`./`).
    Root,
    /// A path inside the root: relative, `/`-separated, no `.`, `..` or
    /// empty components.
    Path(Vec<u8>),
    /// `.wh.NAME`: delete `NAME` (the path given) from lower layers.
    Whiteout(Vec<u8>),
    /// `.wh..wh..opq`: hide the lower layers' content of this directory
    /// (`Vec` empty for the root).
    Opaque(Vec<u8>),
    /// Another `.wh..wh.` name (aufs metadata): ignored.
    Ignored,
}

/// Why a path was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// Starts with `/`.
    #[error("absolute path {0:?} in layer")]
    Absolute(String),
    /// Has a `..` component.
    #[error("path {0:?} in layer climbs out with '..'")]
    DotDot(String),
    /// Empty.
    #[error("empty path in layer")]
    Empty,
    /// A whiteout (`.wh.NAME`) whose NAME is not a plain entry name: empty,
    /// `.`, `..` or holding a `/`.
    #[error("whiteout {0:?} in layer does not name a plain entry")]
    BadWhiteout(String),
}

fn show(p: &[u8]) -> String {
    String::from_utf8_lossy(&p[..p.len().min(200)]).into_owned()
}

/// Checks and normalizes a path from a tar header (for a link target too).
pub fn normalize(raw: &[u8]) -> Result<Vec<u8>, PathError> {
    if raw.is_empty() {
        return Err(PathError::Empty);
    }
    if raw[0] == b'/' {
        return Err(PathError::Absolute(show(raw)));
    }
    let mut out = Vec::with_capacity(raw.len());
    for comp in raw.split(|&c| c == b'/') {
        match comp {
            b"" | b"." => {}
            b".." => return Err(PathError::DotDot(show(raw))),
            c => {
                if !out.is_empty() {
                    out.push(b'/');
                }
                out.extend_from_slice(c);
            }
        }
    }
    Ok(out)
}

/// Classifies a tar path: a file to create, a whiteout, or the root.
pub fn classify(raw: &[u8]) -> Result<Target, PathError> {
    let p = normalize(raw)?;
    if p.is_empty() {
        return Ok(Target::Root);
    }
    let (dir, name) = split(&p);
    if name == b".wh..wh..opq" {
        return Ok(Target::Opaque(dir.to_vec()));
    }
    if name.starts_with(b".wh..wh.") {
        return Ok(Target::Ignored);
    }
    if let Some(hidden) = name.strip_prefix(b".wh.") {
        if !is_plain_name(hidden) {
            return Err(PathError::BadWhiteout(show(raw)));
        }
        return Ok(Target::Whiteout(join(dir, hidden)));
    }
    Ok(Target::Path(p))
}

/// Whether `name` names an entry of a directory: not empty, not `.` or
/// `..`, no `/`.
pub fn is_plain_name(name: &[u8]) -> bool {
    !name.is_empty() && name != b"." && name != b".." && !name.contains(&b'/')
}

/// Splits a normalized path into its parent (empty for the root) and name.
pub fn split(p: &[u8]) -> (&[u8], &[u8]) {
    match p.iter().rposition(|&c| c == b'/') {
        Some(i) => (&p[..i], &p[i + 1..]),
        None => (&[], p),
    }
}

/// `dir/name` (or `name` when `dir` is the root).
pub fn join(dir: &[u8], name: &[u8]) -> Vec<u8> {
    let mut v = dir.to_vec();
    if !v.is_empty() {
        v.push(b'/');
    }
    v.extend_from_slice(name);
    v
}

/// Whether `p` is `prefix` or below it.
pub fn is_under(p: &[u8], prefix: &[u8]) -> bool {
    prefix.is_empty() || (p.starts_with(prefix) && (p.len() == prefix.len() || p[prefix.len()] == b'/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes_and_refuses() {
        assert_eq!(normalize(b"./usr//bin/./sh").unwrap(), b"usr/bin/sh");
        assert_eq!(normalize(b"./").unwrap(), b"");
        assert!(matches!(normalize(b"/etc/passwd"), Err(PathError::Absolute(_))));
        assert!(matches!(normalize(b"a/../../b"), Err(PathError::DotDot(_))));
        assert!(matches!(normalize(b".."), Err(PathError::DotDot(_))));
        assert!(matches!(normalize(b""), Err(PathError::Empty)));
        // A name that merely contains dots is fine.
        assert_eq!(normalize(b"a/..b/c..").unwrap(), b"a/..b/c..");
    }

    #[test]
    fn whiteouts() {
        assert_eq!(classify(b"etc/.wh.passwd").unwrap(), Target::Whiteout(b"etc/passwd".to_vec()));
        assert_eq!(classify(b".wh.tmp").unwrap(), Target::Whiteout(b"tmp".to_vec()));
        assert_eq!(classify(b"var/.wh..wh..opq").unwrap(), Target::Opaque(b"var".to_vec()));
        assert_eq!(classify(b".wh..wh..opq").unwrap(), Target::Opaque(vec![]));
        assert_eq!(classify(b".wh..wh.plnk/1").unwrap(), Target::Path(b".wh..wh.plnk/1".to_vec()));
        assert_eq!(classify(b"x/.wh..wh.aufs").unwrap(), Target::Ignored);
        assert_eq!(classify(b"./").unwrap(), Target::Root);
        assert!(classify(b"../.wh.x").is_err());
        // Dots that are part of a name are fine.
        assert_eq!(classify(b".wh...x").unwrap(), Target::Whiteout(b"..x".to_vec()));
        assert_eq!(classify(b"a/.wh....").unwrap(), Target::Whiteout(b"a/...".to_vec()));
    }

    #[test]
    fn whiteouts_must_name_a_plain_entry() {
        for raw in [&b".wh..."[..], b".wh..", b".wh.", b"a/.wh...", b"a/b/.wh..", b"./a/.wh.", b"a/.wh.../"] {
            assert!(matches!(classify(raw), Err(PathError::BadWhiteout(_))), "{}", String::from_utf8_lossy(raw));
        }
        assert!(is_plain_name(b"x") && is_plain_name(b"...") && is_plain_name(b".x"));
        assert!(!is_plain_name(b"") && !is_plain_name(b".") && !is_plain_name(b"..") && !is_plain_name(b"a/b"));
    }

    #[test]
    fn prefixes() {
        assert!(is_under(b"a/b/c", b"a/b"));
        assert!(is_under(b"a/b", b"a/b"));
        assert!(!is_under(b"a/bc", b"a/b"));
        assert!(is_under(b"anything", b""));
        assert_eq!(split(b"a/b/c"), (&b"a/b"[..], &b"c"[..]));
        assert_eq!(split(b"c"), (&b""[..], &b"c"[..]));
    }
}
