//! Resolving a container's `User` (`name`, `uid`, `name:group`, `uid:gid`)
//! against the image's `/etc/passwd` and `/etc/group`, as docker does.

/// Who a process runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Supplementary groups.
    pub groups: Vec<u32>,
    /// Home directory (for `HOME` when the image does not set it).
    pub home: String,
}

struct PasswdEntry<'a> {
    name: &'a str,
    uid: u32,
    gid: u32,
    home: &'a str,
}

fn passwd_entries(passwd: &str) -> impl Iterator<Item = PasswdEntry<'_>> {
    passwd.lines().filter_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        if f.len() < 6 {
            return None;
        }
        Some(PasswdEntry { name: f[0], uid: f[2].parse().ok()?, gid: f[3].parse().ok()?, home: f[5] })
    })
}

fn group_entries(group: &str) -> impl Iterator<Item = (&str, u32, Vec<&str>)> {
    group.lines().filter_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        if f.len() < 3 {
            return None;
        }
        let members = f.get(3).map(|m| m.split(',').filter(|s| !s.is_empty()).collect()).unwrap_or_default();
        Some((f[0], f[2].parse().ok()?, members))
    })
}

/// Why a container's `User` names no one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UserError {
    /// A user name that is not in the image's `/etc/passwd` (and not a
    /// number).
    #[error("unable to find user {user}: no matching entries in passwd file (add the user to the image, or give a numeric uid)")]
    UnknownUser {
        /// The name.
        user: String,
        /// Why it is not a uid either.
        #[source]
        source: std::num::ParseIntError,
    },
    /// A group name that is not in the image's `/etc/group` (and not a
    /// number).
    #[error("unable to find group {group}: no matching entries in group file (add the group to the image, or give a numeric gid)")]
    UnknownGroup {
        /// The name.
        group: String,
        /// Why it is not a gid either.
        #[source]
        source: std::num::ParseIntError,
    },
}

/// Resolves `spec` (empty: root). `passwd` and `group` are the image's
/// files, if it has them.
pub fn resolve(spec: &str, passwd: &str, group: &str) -> Result<Identity, UserError> {
    resolve_with(spec, passwd, group, None)
}

/// [`resolve`], with supplementary groups as `additional` says: `None`,
/// docker's (the image's groups of a user named, and the primary group);
/// `Some`, runc's (the image's groups of a user named, then these, and not
/// the primary group: a numeric `uid:gid` gets exactly these).
pub fn resolve_with(spec: &str, passwd: &str, group: &str, additional: Option<&[u32]>) -> Result<Identity, UserError> {
    let (user, grp) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let user = if user.is_empty() { "0" } else { user };
    let mut id = Identity { uid: 0, gid: 0, groups: Vec::new(), home: "/".into() };
    let mut matched_name = None;
    let by_name_or_id = |e: &PasswdEntry<'_>| e.name == user || user.parse::<u32>().is_ok_and(|u| u == e.uid);
    if let Some(e) = passwd_entries(passwd).find(by_name_or_id) {
        id.uid = e.uid;
        id.gid = e.gid;
        id.home = if e.home.is_empty() { "/".into() } else { e.home.into() };
        matched_name = Some(e.name);
    } else {
        id.uid = user.parse().map_err(|source| UserError::UnknownUser { user: user.to_owned(), source })?;
    }
    match grp {
        Some(g) if !g.is_empty() => {
            id.gid = match group_entries(group).find(|(name, gid, _)| *name == g || g.parse::<u32>().is_ok_and(|n| n == *gid)) {
                Some((_, gid, _)) => gid,
                None => g.parse().map_err(|source| UserError::UnknownGroup { group: g.to_owned(), source })?,
            };
        }
        _ => {
            if let Some(name) = matched_name {
                id.groups = group_entries(group).filter(|(_, _, m)| m.contains(&name)).map(|(_, gid, _)| gid).collect();
            }
        }
    }
    match additional {
        None if !id.groups.contains(&id.gid) => id.groups.insert(0, id.gid),
        None => {}
        Some(extra) => {
            for g in extra {
                if !id.groups.contains(g) {
                    id.groups.push(*g);
                }
            }
        }
    }
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\nbin:x:1:1:bin:/bin:/sbin/nologin\nnobody:x:65534:65534:nobody:/:/sbin/nologin\nalice:x:1000:1000::/home/alice:/bin/sh\n";
    const GROUP: &str = "root:x:0:root\nbin:x:1:root,bin\nwheel:x:10:root,alice\nalice:x:1000:\nstaff:x:50:\n";

    #[test]
    fn root_by_default_with_its_groups() {
        let id = resolve("", PASSWD, GROUP).unwrap();
        assert_eq!((id.uid, id.gid, id.home.as_str()), (0, 0, "/root"));
        assert_eq!(id.groups, vec![0, 1, 10]);
    }

    #[test]
    fn names_numbers_and_groups() {
        let a = resolve("alice", PASSWD, GROUP).unwrap();
        assert_eq!((a.uid, a.gid, a.groups.clone()), (1000, 1000, vec![1000, 10]));
        assert_eq!(resolve("1000", PASSWD, GROUP).unwrap(), a);
        let s = resolve("alice:staff", PASSWD, GROUP).unwrap();
        assert_eq!((s.uid, s.gid, s.groups), (1000, 50, vec![50]));
        let n = resolve("4242:4343", "", "").unwrap();
        assert_eq!((n.uid, n.gid, n.home.as_str()), (4242, 4343, "/"));
        assert_eq!(resolve("4242", "", "").unwrap().gid, 0);
    }

    #[test]
    fn additional_groups_are_exact_for_numeric_users() {
        let n = resolve_with("4242:4343", "", "", Some(&[5, 6, 5])).unwrap();
        assert_eq!((n.uid, n.gid, n.groups), (4242, 4343, vec![5, 6]), "runc: only additionalGids");
        assert!(resolve_with("1000:1000", PASSWD, GROUP, Some(&[])).unwrap().groups.is_empty());
        let a = resolve_with("alice", PASSWD, GROUP, Some(&[50, 10])).unwrap();
        assert_eq!((a.gid, a.groups), (1000, vec![10, 50]), "the image's groups of a named user, then the extra ones");
    }

    #[test]
    fn unknown_names_are_errors() {
        let e = resolve("mallory", PASSWD, GROUP).unwrap_err();
        assert!(matches!(&e, UserError::UnknownUser { user, .. } if user == "mallory"), "{e:?}");
        assert!(e.to_string().starts_with("unable to find user mallory: no matching entries in passwd file"), "{e}");
        let e = resolve("alice:nogroup", PASSWD, GROUP).unwrap_err();
        assert!(matches!(&e, UserError::UnknownGroup { group, .. } if group == "nogroup"), "{e:?}");
        assert!(e.to_string().contains("nogroup"), "{e}");
    }
}
