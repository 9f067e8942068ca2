//! Object keys mirror paths: a space's entry `a/b.txt` is the object
//! `<prefix>/rooms/<id>/a/b.txt`, a directory `a` is the prefix `<prefix>/rooms/<id>/a/` (and
//! its marker object of that name, when it was made empty). So any S3 tool reads the same
//! files.
//!
//! Invariants:
//! - a key made here never holds `//`, a `.` or `..` component, a leading `/` or a `\`
//!   (SeaweedFS stores `\` as `/`; names holding one are refused with `EINVAL` rather than
//!   encoded, so keys stay the paths), and is at most 1024 bytes (`ENAMETOOLONG` past that);
//! - names are UTF-8 (S3 keys are): other names are `EINVAL`;
//! - the name [`INDEX`] is the store's own (each directory's attribute index) and cannot be
//!   made through a mount (`EINVAL`);
//! - what a listing returns is hostile input: a name that is empty, `.`, `..`, holds `/`, `\`
//!   or NUL, or is the index, is never shown (see [`listed_name`]).

use std::ffi::OsStr;
use std::path::{Component, Path, PathBuf};

use crate::store::{StoreError, StoreResult};

/// The name of each directory's attribute index object (see `attrs`).
pub const INDEX: &str = ".roomfs-attrs";

/// The longest key S3 accepts.
pub const MAX_KEY: usize = 1024;

/// Where a space's objects live: `<prefix>/<kind>/<id>/` (no leading `/`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpaceKeys {
    root: String,
}

fn einval() -> StoreError {
    StoreError::errno(libc::EINVAL)
}

/// Checks one name of a path given by the core.
pub fn check_name(name: &OsStr) -> StoreResult<&str> {
    let name = name.to_str().ok_or_else(einval)?;
    if name.is_empty()
        || name == "."
        || name == ".."
        || name == INDEX
        || name.contains(['/', '\\', '\0'])
    {
        return Err(einval());
    }
    Ok(name)
}

/// The name a listing gives for an entry of the directory at `dir_prefix`, if it is one the
/// store shows (see the module docs): `key` minus the prefix, minus one trailing `/` for a
/// common prefix.
pub fn listed_name<'a>(dir_prefix: &str, key: &'a str, common: bool) -> Option<&'a str> {
    let rest = key.strip_prefix(dir_prefix)?;
    let name = if common {
        rest.strip_suffix('/')?
    } else {
        rest
    };
    let bad = name.is_empty()
        || name == "."
        || name == ".."
        || name == INDEX
        || name.contains(['/', '\\', '\0']);
    (!bad).then_some(name)
}

/// A bucket prefix as configured (`a/b`, `/a/b/`, ``): its components joined by `/`, without
/// empty, `.` or `..` ones (refused).
pub fn normalize_prefix(prefix: &str) -> Result<String, String> {
    let mut parts = Vec::new();
    for part in prefix.split('/') {
        match part {
            "" => {}
            "." | ".." => return Err(format!("prefix {prefix:?}: no . or .. components")),
            p if p.contains('\\') => return Err(format!("prefix {prefix:?}: no backslashes")),
            p => parts.push(p),
        }
    }
    Ok(parts.join("/"))
}

impl SpaceKeys {
    /// The keys of space `<kind>/<id>` under the bucket prefix `prefix` (normalized).
    pub fn new(prefix: &str, kind: &str, id: &str) -> SpaceKeys {
        let root = if prefix.is_empty() {
            format!("{kind}/{id}/")
        } else {
            format!("{prefix}/{kind}/{id}/")
        };
        SpaceKeys { root }
    }

    /// The keys of the space whose prefix is `root` (ending with `/`), as `root()` gave it.
    pub fn new_root(root: &str) -> SpaceKeys {
        SpaceKeys {
            root: root.to_string(),
        }
    }

    /// The prefix of every key of the space (ends with `/`).
    pub fn root(&self) -> &str {
        &self.root
    }

    /// The object key of `path` (the root itself has none: `EINVAL`).
    pub fn key(&self, path: &Path) -> StoreResult<String> {
        let mut key = self.root.clone();
        let mut first = true;
        for c in path.components() {
            let Component::Normal(name) = c else {
                return Err(einval());
            };
            if !first {
                key.push('/');
            }
            key.push_str(check_name(name)?);
            first = false;
        }
        if first {
            return Err(einval());
        }
        if key.len() + 1 > MAX_KEY {
            // The `+ 1`: a directory's marker needs a `/` more.
            return Err(StoreError::errno(libc::ENAMETOOLONG));
        }
        Ok(key)
    }

    /// The prefix of the entries of the directory `path` (ends with `/`).
    pub fn dir_prefix(&self, path: &Path) -> StoreResult<String> {
        if path.as_os_str().is_empty() {
            return Ok(self.root.clone());
        }
        Ok(self.key(path)? + "/")
    }

    /// The key of the attribute index of the directory `path`.
    pub fn index_key(&self, path: &Path) -> StoreResult<String> {
        Ok(self.dir_prefix(path)? + INDEX)
    }

    /// The path of `key`, which lies under the space's root (`None` if it does not, or is not
    /// a path the store would make).
    pub fn path_of(&self, key: &str) -> Option<PathBuf> {
        let rest = key.strip_prefix(&self.root)?;
        let mut path = PathBuf::new();
        for part in rest.split('/') {
            if part.is_empty() || part == "." || part == ".." || part.contains(['\\', '\0']) {
                return None;
            }
            path.push(part);
        }
        Some(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_mirror_paths_and_refuse_what_s3_would_rewrite() {
        let k = SpaceKeys::new("team/a", "rooms", "r1");
        assert_eq!(k.root(), "team/a/rooms/r1/");
        assert_eq!(
            k.key(Path::new("d/f.txt")).unwrap(),
            "team/a/rooms/r1/d/f.txt"
        );
        assert_eq!(k.dir_prefix(Path::new("")).unwrap(), "team/a/rooms/r1/");
        assert_eq!(k.dir_prefix(Path::new("d")).unwrap(), "team/a/rooms/r1/d/");
        assert_eq!(
            k.index_key(Path::new("")).unwrap(),
            "team/a/rooms/r1/.roomfs-attrs"
        );
        let errno = |p: &str| k.key(Path::new(p)).unwrap_err().raw_os_error();
        assert_eq!(errno("a\\b"), libc::EINVAL);
        assert_eq!(errno(".roomfs-attrs"), libc::EINVAL);
        assert_eq!(errno("d/.roomfs-attrs"), libc::EINVAL);
        assert_eq!(errno(""), libc::EINVAL);
        assert_eq!(errno(&"x/".repeat(600)), libc::ENAMETOOLONG);
        use std::os::unix::ffi::OsStrExt;
        let bad = OsStr::from_bytes(b"\xff");
        assert_eq!(
            k.key(Path::new(bad)).unwrap_err().raw_os_error(),
            libc::EINVAL
        );
        let plain = SpaceKeys::new("", "sessions", "s");
        assert_eq!(plain.key(Path::new("a")).unwrap(), "sessions/s/a");
        assert_eq!(normalize_prefix("/a//b/").unwrap(), "a/b");
        assert!(normalize_prefix("a/../b").is_err());
        assert_eq!(
            k.path_of("team/a/rooms/r1/d/f.txt"),
            Some(PathBuf::from("d/f.txt"))
        );
        assert_eq!(k.path_of("team/a/rooms/r1/d//f"), None);
    }

    #[test]
    fn hostile_listed_names_are_not_shown() {
        let p = "x/rooms/r/d/";
        assert_eq!(listed_name(p, "x/rooms/r/d/a", false), Some("a"));
        assert_eq!(listed_name(p, "x/rooms/r/d/sub/", true), Some("sub"));
        for bad in ["", ".", "..", ".roomfs-attrs", "a\\b", "a\0"] {
            assert_eq!(listed_name(p, &format!("{p}{bad}"), false), None, "{bad:?}");
        }
        assert_eq!(listed_name(p, "x/rooms/r/d//", true), None);
        assert_eq!(listed_name(p, "x/rooms/r/d/../", true), None);
        assert_eq!(listed_name(p, "elsewhere/a", false), None);
    }
}
