//! The filesystem core's error type: an errno, because that is the vocabulary of the mount
//! (and of every program using it). Backend errors keep their errno; their cause goes to the
//! log where they become an errno, when they are failures rather than answers (see
//! `StoreError::is_failure`).

use std::fmt;
use std::io;

/// A POSIX error number returned by a filesystem operation.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Errno(pub i32);

impl Errno {
    pub const ENOENT: Errno = Errno(libc::ENOENT);
    pub const EEXIST: Errno = Errno(libc::EEXIST);
    pub const ENOTEMPTY: Errno = Errno(libc::ENOTEMPTY);
    pub const ENOTDIR: Errno = Errno(libc::ENOTDIR);
    pub const EISDIR: Errno = Errno(libc::EISDIR);
    pub const EINVAL: Errno = Errno(libc::EINVAL);
    pub const ENAMETOOLONG: Errno = Errno(libc::ENAMETOOLONG);
    pub const EACCES: Errno = Errno(libc::EACCES);
    pub const EPERM: Errno = Errno(libc::EPERM);
    pub const EROFS: Errno = Errno(libc::EROFS);
    pub const EBADF: Errno = Errno(libc::EBADF);
    pub const EIO: Errno = Errno(libc::EIO);
    pub const ENOSYS: Errno = Errno(libc::ENOSYS);
    pub const EOPNOTSUPP: Errno = Errno(libc::EOPNOTSUPP);
    pub const EFBIG: Errno = Errno(libc::EFBIG);
    pub const EDQUOT: Errno = Errno(libc::EDQUOT);
    pub const ENOSPC: Errno = Errno(libc::ENOSPC);
    pub const ENODATA: Errno = Errno(libc::ENODATA);
    pub const ENXIO: Errno = Errno(libc::ENXIO);
    pub const ESTALE: Errno = Errno(libc::ESTALE);
}

impl From<io::Error> for Errno {
    fn from(e: io::Error) -> Errno {
        match e.raw_os_error() {
            Some(n) => Errno(n),
            None => {
                log::error!("backend error without errno, reporting EIO: {e}");
                Errno::EIO
            }
        }
    }
}

impl From<crate::store::StoreError> for Errno {
    fn from(e: crate::store::StoreError) -> Errno {
        if e.is_failure() {
            log::error!("{e}");
        } else {
            log::debug!("{e}");
        }
        Errno(e.raw_os_error())
    }
}

impl fmt::Debug for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", io::Error::from_raw_os_error(self.0), self.0)
    }
}

impl fmt::Display for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// Result of a filesystem operation.
pub type FsResult<T> = Result<T, Errno>;
