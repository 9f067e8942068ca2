//! Extended attributes: the `user.` namespace is stored by the store (kept across commits:
//! attributes belong to the file, not to one version of its content); `user.mime_type` is a
//! file's content type for downloads. The other namespaces are refused, each with its errno:
//! reading `security.`, `trusted.` or `system.` attributes finds none (`ENODATA`, what programs
//! probing for labels expect), setting or removing them is `EOPNOTSUPP` (`security.`,
//! `system.`) or `EPERM` (`trusted.`, which needs privileges no mount user has here). POSIX
//! ACLs (`system.posix_acl_*`) are answered by the kernel itself (the mount has no ACLs).

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;

use super::{Errno, Fs, FsResult, Ino};
use crate::events::Changed;
use crate::grant::Access;
use crate::store::{Kind, XattrMode};

/// Longest attribute name (`XATTR_NAME_MAX`).
const NAME_MAX: usize = 255;

/// What the namespace of an attribute name allows.
enum Namespace {
    User,
    /// Refused: what a read answers, and what a change answers.
    Refused {
        read: Errno,
        change: Errno,
    },
}

fn namespace(name: &OsStr) -> FsResult<Namespace> {
    let bytes = name.as_bytes();
    if bytes.len() > NAME_MAX {
        return Err(Errno(libc::ERANGE));
    }
    Ok(if bytes.starts_with(b"user.") && bytes.len() > 5 {
        Namespace::User
    } else if bytes.starts_with(b"trusted.") {
        Namespace::Refused {
            read: Errno::ENODATA,
            change: Errno::EPERM,
        }
    } else if bytes.starts_with(b"security.") || bytes.starts_with(b"system.") {
        Namespace::Refused {
            read: Errno::ENODATA,
            change: Errno::EOPNOTSUPP,
        }
    } else {
        Namespace::Refused {
            read: Errno::EOPNOTSUPP,
            change: Errno::EOPNOTSUPP,
        }
    })
}

impl Fs {
    /// The path of `ino`, after the grant allows `access` to its attributes (directories
    /// above granted paths may be looked at, as with `stat`).
    fn xattr_path(&self, op: &str, ino: Ino, access: Access) -> FsResult<std::path::PathBuf> {
        let path = self.path(ino)?;
        let kind = super::read_lock(&self.table).kind(ino);
        if access == Access::Read && kind == Some(Kind::Dir) {
            self.allow_traverse(op, &path)?;
        } else {
            self.allow(op, &path, access)?;
        }
        if !self.store.capabilities().xattrs {
            return Err(Errno::EOPNOTSUPP);
        }
        Ok(path)
    }

    /// `getxattr(2)`: the value of `name`.
    pub fn getxattr(&self, ino: Ino, name: &OsStr) -> FsResult<Vec<u8>> {
        let path = self.xattr_path("getxattr", ino, Access::Read)?;
        match namespace(name)? {
            Namespace::User => Ok(self.store.get_xattr(&path, name)?),
            Namespace::Refused { read, .. } => Err(read),
        }
    }

    /// `listxattr(2)`: the names, each followed by a NUL.
    pub fn listxattr(&self, ino: Ino) -> FsResult<Vec<u8>> {
        let path = self.xattr_path("listxattr", ino, Access::Read)?;
        let names: Vec<OsString> = self.store.list_xattr(&path)?;
        let mut out = Vec::new();
        for name in names.iter().filter(|n| n.as_bytes().starts_with(b"user.")) {
            out.extend_from_slice(name.as_bytes());
            out.push(0);
        }
        Ok(out)
    }

    /// `setxattr(2)` with its `flags` (`XATTR_CREATE`, `XATTR_REPLACE`).
    pub fn setxattr(&self, ino: Ino, name: &OsStr, value: &[u8], flags: i32) -> FsResult<()> {
        let mode = match flags {
            0 => XattrMode::Set,
            libc::XATTR_CREATE => XattrMode::Create,
            libc::XATTR_REPLACE => XattrMode::Replace,
            _ => return Err(Errno::EINVAL),
        };
        let path = self.xattr_path("setxattr", ino, Access::Write)?;
        match namespace(name)? {
            Namespace::User => {
                let (path, _claim) = self.claim_path(ino).ok_or(Errno::ENOENT)?;
                self.store.set_xattr(&path, name, value, mode)?;
                self.publish(Changed::attributes(&path));
                Ok(())
            }
            Namespace::Refused { change, .. } => {
                let _ = path;
                Err(change)
            }
        }
    }

    /// `removexattr(2)`.
    pub fn removexattr(&self, ino: Ino, name: &OsStr) -> FsResult<()> {
        self.xattr_path("removexattr", ino, Access::Write)?;
        match namespace(name)? {
            Namespace::User => {
                let (path, _claim) = self.claim_path(ino).ok_or(Errno::ENOENT)?;
                self.store.remove_xattr(&path, name)?;
                self.publish(Changed::attributes(&path));
                Ok(())
            }
            Namespace::Refused { change, .. } => Err(change),
        }
    }
}
