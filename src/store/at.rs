//! Paths of the local store in the form the `*at` system calls take: a directory descriptor and
//! a name under it. The space's root directory is held open and paths are resolved from it, so
//! the data dir's own path neither counts towards `PATH_MAX` nor is looked up again on every
//! call. A path that is itself `PATH_MAX` bytes or longer (a process working deep inside the
//! mount can use one) is reached through its parent directory, opened a piece at a time.

use std::ffi::{CStr, CString};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// A store path ready for the `*at` calls.
pub struct At {
    /// The parent directory opened for a long path; the name is then its last component.
    opened: Option<OwnedFd>,
    base: RawFd,
    name: CString,
}

const PATH_MAX: usize = libc::PATH_MAX as usize;

impl At {
    /// `path`, relative to the directory `base` (the empty path is `base` itself); `base` must
    /// stay open while the result is used.
    pub fn new(base: RawFd, path: &Path) -> io::Result<At> {
        let bytes = path.as_os_str().as_bytes();
        if bytes.len() < PATH_MAX {
            let name = if bytes.is_empty() { b"." } else { bytes };
            return Ok(At {
                opened: None,
                base,
                name: cstring(name)?,
            });
        }
        let split = bytes
            .iter()
            .rposition(|&b| b == b'/')
            .ok_or_else(too_long)?;
        let (mut rest, last) = (&bytes[..split], &bytes[split + 1..]);
        let mut opened: Option<OwnedFd> = None;
        while !rest.is_empty() {
            // The longest run of whole components one call can take.
            let take = if rest.len() < PATH_MAX {
                rest.len()
            } else {
                rest[..PATH_MAX]
                    .iter()
                    .rposition(|&b| b == b'/')
                    .filter(|&i| i > 0)
                    .ok_or_else(too_long)?
            };
            let dir = opened.as_ref().map_or(base, |fd| fd.as_raw_fd());
            let piece = cstring(&rest[..take])?;
            let flags = libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC;
            // SAFETY: a valid descriptor and a NUL-terminated path.
            let fd = unsafe { libc::openat(dir, piece.as_ptr(), flags) };
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: `fd` was just opened and is owned by nobody else.
            opened = Some(unsafe { OwnedFd::from_raw_fd(fd) });
            rest = rest[take..].strip_prefix(b"/").unwrap_or(&rest[take..]);
        }
        Ok(At {
            opened,
            base,
            name: cstring(last)?,
        })
    }

    /// An absolute path, or one relative to the working directory (staging files, tests).
    pub fn path(path: &Path) -> io::Result<At> {
        At::new(libc::AT_FDCWD, path)
    }

    /// The directory descriptor to pass.
    pub fn dir(&self) -> RawFd {
        self.opened.as_ref().map_or(self.base, |fd| fd.as_raw_fd())
    }

    /// The name to pass with `dir()`.
    pub fn name(&self) -> &CStr {
        &self.name
    }

    /// `openat` with `flags` (`O_CLOEXEC` is added) and, for a new file, `mode`.
    pub fn open(&self, flags: libc::c_int, mode: libc::mode_t) -> io::Result<File> {
        let flags = flags | libc::O_CLOEXEC;
        // SAFETY: a valid descriptor and a NUL-terminated path.
        let fd = unsafe { libc::openat(self.dir(), self.name.as_ptr(), flags, mode) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just opened and is owned by nobody else.
        Ok(unsafe { File::from_raw_fd(fd) })
    }

    /// Attributes of the entry itself (a symlink is not followed).
    pub fn stat(&self) -> io::Result<libc::stat> {
        let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
        // SAFETY: a valid descriptor, a NUL-terminated path and room for the result.
        let ret = unsafe {
            libc::fstatat(
                self.dir(),
                self.name.as_ptr(),
                st.as_mut_ptr(),
                libc::AT_SYMLINK_NOFOLLOW,
            )
        };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fstatat filled it in.
        Ok(unsafe { st.assume_init() })
    }
}

fn cstring(bytes: &[u8]) -> io::Result<CString> {
    CString::new(bytes).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

fn too_long() -> io::Error {
    io::Error::from_raw_os_error(libc::ENAMETOOLONG)
}

/// Turns a libc return value into a result.
pub fn check(ret: libc::c_int) -> io::Result<()> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn a_path_longer_than_path_max_is_reached_through_its_parent() {
        let dir = tempfile::tempdir().unwrap();
        let root = File::open(dir.path()).unwrap();
        let component = "d".repeat(200);
        let mut rel = std::path::PathBuf::new();
        while rel.as_os_str().len() < PATH_MAX + 300 {
            rel.push(&component);
            let at = At::new(root.as_raw_fd(), &rel).unwrap();
            // SAFETY: valid descriptor and path.
            check(unsafe { libc::mkdirat(at.dir(), at.name().as_ptr(), 0o755) }).unwrap();
        }
        let file = rel.join("f");
        let at = At::new(root.as_raw_fd(), &file).unwrap();
        assert!(at.opened.is_some(), "a long path goes through its parent");
        at.open(libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL, 0o644)
            .unwrap();
        let st = At::new(root.as_raw_fd(), &file).unwrap().stat().unwrap();
        assert_eq!(st.st_mode & libc::S_IFMT, libc::S_IFREG);
        // The empty path is the base directory itself.
        let st = At::new(root.as_raw_fd(), Path::new(""))
            .unwrap()
            .stat()
            .unwrap();
        assert_eq!(st.st_ino, fs::metadata(dir.path()).unwrap().ino());
        // A component longer than one call can take is refused, not truncated.
        let huge = Path::new(&"y".repeat(PATH_MAX + 10)).join("z");
        assert_eq!(
            At::new(root.as_raw_fd(), &huge)
                .err()
                .and_then(|e| e.raw_os_error()),
            Some(libc::ENAMETOOLONG)
        );
    }
}
