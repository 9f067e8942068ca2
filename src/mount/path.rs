//! Resolving a mount point the way a root daemon may: through the symlinks only root could
//! have made.
//!
//! Mount points are often in directories that others own: an agent's home or workspace. A
//! symlink planted there (`~/work -> /etc`) would have the daemon, as root, mount a space the
//! agent can write over the directory the link names, and create directories through it.
//! So, as root, a symlink on the way is followed only when it is *trusted*: owned by root, in
//! a directory owned by root that no one else can change (not writable by group or others,
//! or sticky, where only the link's owner may replace it) — `/var/run -> /run` is, a link in
//! a user's home is not, and naming such a path is refused with what to name instead.
//! Without root, every symlink is followed (the mount is then the user's own, checked by
//! `fusermount3`).
//!
//! A resolved path has no symlinks, and `kernel::mount_directly` opens it without following
//! any, so a link swapped in after resolving fails the mount rather than redirecting it.

use std::ffi::OsString;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

/// Symlinks followed in one path, at most (as the kernel's `ELOOP`).
const MAX_LINKS: usize = 40;

/// A path resolved: the part that exists, without symlinks, and the components that do not
/// exist (yet) after it.
#[derive(Debug, PartialEq, Eq)]
pub struct Resolved {
    pub existing: PathBuf,
    pub missing: Vec<OsString>,
}

/// Why a path was not resolved.
#[derive(Debug)]
pub enum Refused {
    /// A symlink on the way that someone other than root could have made or replaced.
    Untrusted {
        link: PathBuf,
        owner: u32,
    },
    Io(io::Error),
}

impl From<io::Error> for Refused {
    fn from(e: io::Error) -> Refused {
        Refused::Io(e)
    }
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refused::Untrusted { link, owner } => write!(
                f,
                "it goes through the symlink {}, which someone other than root could have made \
                 or replaced (owned by uid {owner}, or in a directory others can write): \
                 running as root, roomfs follows only root's symlinks in root's directories; \
                 name the directory it leads to instead",
                link.display()
            ),
            Refused::Io(e) => e.fmt(f),
        }
    }
}

/// Whether a symlink (`link`) in the directory `dir` is one only root could have made or
/// replaced.
pub fn trusted(link: &std::fs::Metadata, dir: &std::fs::Metadata) -> bool {
    link.uid() == 0
        && dir.uid() == 0
        && (dir.mode() & 0o022 == 0 || dir.mode() & libc::S_ISVTX != 0)
}

/// Resolves the absolute `path` (see the module docs): symlinks followed only where `trust`
/// says (as root, [`trusted`]), `..` taken from the directory resolved so far.
pub fn resolve(
    path: &Path,
    trust: &dyn Fn(&std::fs::Metadata, &std::fs::Metadata) -> bool,
) -> Result<Resolved, Refused> {
    if !path.is_absolute() {
        return Err(io::Error::from_raw_os_error(libc::EINVAL).into());
    }
    // Components still to walk, the next last.
    let mut todo: Vec<OsString> = Vec::new();
    push_components(&mut todo, path);
    let mut at = PathBuf::from("/");
    let mut links = 0;
    while let Some(part) = todo.pop() {
        if part == ".." {
            at.pop();
            continue;
        }
        let next = at.join(&part);
        let meta = match std::fs::symlink_metadata(&next) {
            Ok(meta) => meta,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                todo.push(part);
                todo.reverse();
                return Ok(Resolved {
                    existing: at,
                    missing: todo,
                });
            }
            // A dead FUSE mount (its server gone) answers ENOTCONN: it is a mount point, not
            // a symlink, and the mount clears it.
            Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => {
                at = next;
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        if !meta.file_type().is_symlink() {
            at = next;
            continue;
        }
        links += 1;
        if links > MAX_LINKS {
            return Err(io::Error::from_raw_os_error(libc::ELOOP).into());
        }
        let dir = std::fs::symlink_metadata(&at)?;
        if !trust(&meta, &dir) {
            return Err(Refused::Untrusted {
                link: next,
                owner: meta.uid(),
            });
        }
        let target = std::fs::read_link(&next)?;
        if target.is_absolute() {
            at = PathBuf::from("/");
        }
        push_components(&mut todo, &target);
    }
    Ok(Resolved {
        existing: at,
        missing: Vec::new(),
    })
}

/// Pushes the components of `path` onto `todo` so that its first is popped first (`.` and the
/// root left out).
fn push_components(todo: &mut Vec<OsString>, path: &Path) {
    let parts: Vec<OsString> = path
        .components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_os_string()),
            Component::ParentDir => Some("..".into()),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => None,
        })
        .collect();
    todo.extend(parts.into_iter().rev());
}

/// Resolves `path` as this process may: as root through trusted symlinks only, otherwise
/// through any.
pub fn resolve_as_me(path: &Path) -> Result<Resolved, Refused> {
    if nix::unistd::geteuid().is_root() {
        resolve(path, &trusted)
    } else {
        resolve(path, &|_, _| true)
    }
}

/// `path` (taken from the working directory if relative) resolved as [`resolve_as_me`] does,
/// all of it existing (else `ENOENT`): where a command names a mount point, as `canonicalize`
/// would, but never through a symlink someone other than root could have swapped in.
pub fn existing_as_me(path: &Path) -> Result<PathBuf, Refused> {
    let Resolved { existing, missing } = resolve_as_me(&std::path::absolute(path)?)?;
    if !missing.is_empty() {
        return Err(io::Error::from_raw_os_error(libc::ENOENT).into());
    }
    Ok(existing)
}

/// Makes the directory `path` (mode 0755) and the missing ones above it, as `mkdir -p` but
/// resolved as [`resolve_as_me`] does and created beneath the part that exists without
/// following any symlink. Returns the directory's resolved path.
pub fn create_dirs(path: &Path) -> Result<PathBuf, Refused> {
    let Resolved { existing, missing } = resolve_as_me(path)?;
    if missing.is_empty() {
        return Ok(existing);
    }
    if missing.iter().any(|c| c == "..") {
        return Err(io::Error::other(format!(
            "{} does not exist, and `..` after it leaves nothing to create",
            existing.join(&missing[0]).display()
        ))
        .into());
    }
    use crate::store::local::at::Dir;
    let rel: PathBuf = missing.iter().collect();
    let root = Dir::open_trusted(Path::new("/"), false)?;
    let base = match existing.strip_prefix("/") {
        Ok(rel) if !rel.as_os_str().is_empty() => root.open(rel)?,
        _ => root,
    };
    base.create_dirs(&rel, 0o755)?;
    Ok(existing.join(rel))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn all(_: &std::fs::Metadata, _: &std::fs::Metadata) -> bool {
        true
    }

    fn none(_: &std::fs::Metadata, _: &std::fs::Metadata) -> bool {
        false
    }

    #[test]
    fn symlinks_are_followed_only_where_trusted_and_dotdot_from_where_they_led() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().canonicalize().unwrap();
        std::fs::create_dir_all(root.join("real/sub")).unwrap();
        std::fs::create_dir_all(root.join("other")).unwrap();
        symlink(root.join("real"), root.join("abs")).unwrap();
        symlink("real/sub", root.join("rel")).unwrap();
        let got = resolve(&root.join("rel/../sub/./"), &all).unwrap();
        assert_eq!(got.existing, root.join("real/sub"));
        assert!(got.missing.is_empty());
        let got = resolve(&root.join("abs/sub/new/deeper"), &all).unwrap();
        assert_eq!(got.existing, root.join("real/sub"));
        assert_eq!(got.missing, ["new", "deeper"]);
        match resolve(&root.join("abs/sub"), &none) {
            Err(Refused::Untrusted { link, .. }) => assert_eq!(link, root.join("abs")),
            other => panic!("{other:?}"),
        }
        // Without links there is nothing to trust.
        let got = resolve(&root.join("other/../real"), &none).unwrap();
        assert_eq!(got.existing, root.join("real"));
        symlink("loop", root.join("loop")).unwrap();
        match resolve(&root.join("loop"), &all) {
            Err(Refused::Io(e)) => assert_eq!(e.raw_os_error(), Some(libc::ELOOP)),
            other => panic!("{other:?}"),
        }
        assert!(resolve(Path::new("relative"), &all).is_err());
    }

    #[test]
    fn trusted_links_are_roots_in_directories_only_root_can_change() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        symlink("x", dir.join("l")).unwrap();
        let link = std::fs::symlink_metadata(dir.join("l")).unwrap();
        let parent = std::fs::symlink_metadata(dir).unwrap();
        let root = nix::unistd::geteuid().is_root();
        use std::os::unix::fs::PermissionsExt;
        for (mode, want) in [
            (0o755, root),
            (0o775, false),
            (0o1777, root),
            (0o757, false),
        ] {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode)).unwrap();
            let parent_now = std::fs::symlink_metadata(dir).unwrap();
            assert_eq!(trusted(&link, &parent_now), want, "{mode:o}");
        }
        if root {
            // Another's link in root's directory, or root's link in another's directory.
            std::os::unix::fs::lchown(dir.join("l"), Some(65534), None).unwrap();
            let theirs = std::fs::symlink_metadata(dir.join("l")).unwrap();
            assert!(!trusted(&theirs, &parent));
            std::os::unix::fs::lchown(dir.join("l"), Some(0), None).unwrap();
            std::os::unix::fs::chown(dir, Some(65534), None).unwrap();
            let theirs = std::fs::symlink_metadata(dir).unwrap();
            assert!(!trusted(&link, &theirs));
        }
    }
}
