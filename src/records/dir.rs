//! The records dir on disk, reached only through directory descriptors.
//!
//! The daemon runs as root, and other processes may write the records dir (the agent SDK
//! writes the same layout), so nothing below it is trusted:
//! - The records dir itself is opened once, following a symlink (where it lives is the
//!   operator's choice), and held open. Everything else is resolved beneath that descriptor.
//! - A collection directory is opened with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS |
//!   RESOLVE_NO_MAGICLINKS)` and `O_DIRECTORY | O_NOFOLLOW` (plain `openat` with those flags
//!   where the kernel has no `openat2`: the name is one component). A symlink or a
//!   non-directory there is an error naming it, never followed.
//! - A record file is opened with `O_NOFOLLOW | O_NONBLOCK | O_NOCTTY` and read only if it
//!   is a regular file of at most [`MAX_RECORD_BYTES`]: a FIFO planted there does not block,
//!   a symlink is not read, a directory is not a record.
//! - A record is written as a temporary file created with `O_EXCL | O_NOFOLLOW` beside it,
//!   fsynced, renamed over the record with `renameat` (which replaces a link, never follows
//!   it), and the directory fsynced. Removal is `unlinkat`.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use nix::dir::{Dir, Type};
use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, OpenHow, ResolveFlag, openat, openat2, renameat};
use nix::sys::stat::{FileStat, Mode, SFlag, fstat, fstatat, mkdirat};
use nix::unistd::{UnlinkatFlags, fsync, unlinkat};

/// Largest record file read; larger ones are refused (the control API takes at most 16 MiB).
pub const MAX_RECORD_BYTES: u64 = 64 << 20;

/// The records dir, held open.
pub struct RecordsDir {
    root: OwnedFd,
    path: PathBuf,
}

/// A collection directory (`session`, `message`, ...) opened beneath the records dir.
pub struct CollectionDir {
    fd: OwnedFd,
    /// `<records dir>/<collection>`, for messages.
    path: PathBuf,
}

/// What identifies one state of a file or directory: a change through any name moves
/// `ctime` (which nobody can set), a replacement changes `ino`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stamp {
    pub dev: u64,
    pub ino: u64,
    pub size: i64,
    pub mtime: (i64, i64),
    pub ctime: (i64, i64),
}

impl Stamp {
    fn of(st: &FileStat) -> Stamp {
        Stamp {
            dev: st.st_dev,
            ino: st.st_ino,
            size: st.st_size,
            mtime: (st.st_mtime, st.st_mtime_nsec),
            ctime: (st.st_ctime, st.st_ctime_nsec),
        }
    }
}

/// A name in a collection directory, with its type where `readdir` tells it.
pub struct Listed {
    pub name: String,
    /// `None`: the filesystem did not say; only `Some(false)` is known not to be a file.
    pub regular: Option<bool>,
}

impl RecordsDir {
    /// Creates `path` if missing and opens it (following a symlink: the operator's choice).
    pub fn open(path: &Path) -> io::Result<RecordsDir> {
        std::fs::create_dir_all(path)
            .map_err(|e| context(e, format!("cannot create {}", path.display())))?;
        let root = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY)
            .open(path)
            .map_err(|e| context(e, format!("cannot open {}", path.display())))?;
        Ok(RecordsDir {
            root: root.into(),
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The records dir's own descriptor.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.root.as_fd()
    }

    /// Creates the collection directory `name` if nothing has that name.
    pub fn create_collection(&self, name: &str) -> io::Result<()> {
        match mkdirat(&self.root, name, Mode::from_bits_truncate(0o777)) {
            Ok(()) | Err(Errno::EEXIST) => Ok(()),
            Err(e) => Err(context(
                e.into(),
                format!("cannot create {}", self.path.join(name).display()),
            )),
        }
    }

    /// Opens the collection directory `name` beneath the records dir, refusing a symlink or
    /// anything else that is not a directory with an error naming it.
    pub fn collection(&self, name: &str) -> io::Result<CollectionDir> {
        let path = self.path.join(name);
        let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        let how = OpenHow::new().flags(flags).resolve(
            ResolveFlag::RESOLVE_BENEATH
                | ResolveFlag::RESOLVE_NO_SYMLINKS
                | ResolveFlag::RESOLVE_NO_MAGICLINKS,
        );
        let opened = match openat2(&self.root, name, how) {
            Err(Errno::ENOSYS) => openat(&self.root, name, flags, Mode::empty()),
            other => other,
        };
        match opened {
            Ok(fd) => Ok(CollectionDir { fd, path }),
            Err(err @ (Errno::ELOOP | Errno::ENOTDIR | Errno::EXDEV)) => {
                Err(not_a_directory(&self.root, name, &path, err))
            }
            Err(e) => Err(context(e.into(), format!("cannot open {}", path.display()))),
        }
    }

    /// Attributes of the entry `name` of the records dir itself (a symlink is not followed);
    /// `None` if there is none.
    pub fn stat_entry(&self, name: &str) -> io::Result<Option<(Stamp, SFlag)>> {
        stat_at(&self.root, name, &self.path)
    }
}

/// The error for a collection directory that is not one (`err` from opening it): says what
/// is there instead.
fn not_a_directory(root: &OwnedFd, name: &str, path: &Path, err: Errno) -> io::Error {
    let now = fstatat(root, name, AtFlags::AT_SYMLINK_NOFOLLOW)
        .ok()
        .map(|st| SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits()));
    let what = match (err, now) {
        (Errno::ELOOP, _) => "a symbolic link",
        (_, Some(kind)) if kind != SFlag::S_IFDIR => kind_name(kind),
        // Replaced again since (a race with whoever is changing it).
        _ => "a symbolic link or something else",
    };
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!(
            "{} is {what}, not a directory; the records store never follows links below its \
             directory",
            path.display()
        ),
    )
}

fn kind_name(kind: SFlag) -> &'static str {
    match kind {
        SFlag::S_IFLNK => "a symbolic link",
        SFlag::S_IFIFO => "a FIFO",
        SFlag::S_IFSOCK => "a socket",
        SFlag::S_IFCHR => "a character device",
        SFlag::S_IFBLK => "a block device",
        SFlag::S_IFDIR => "a directory",
        SFlag::S_IFREG => "a regular file",
        _ => "of an unknown kind",
    }
}

fn stat_at(dir: &OwnedFd, name: &str, dir_path: &Path) -> io::Result<Option<(Stamp, SFlag)>> {
    match fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(st) => Ok(Some((
            Stamp::of(&st),
            SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits()),
        ))),
        Err(Errno::ENOENT) => Ok(None),
        Err(e) => Err(context(
            e.into(),
            format!("cannot stat {}", dir_path.join(name).display()),
        )),
    }
}

impl CollectionDir {
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn raw_fd(&self) -> i32 {
        self.fd.as_raw_fd()
    }

    /// The directory's own attributes.
    pub fn stamp(&self) -> io::Result<Stamp> {
        fstat(&self.fd)
            .map(|st| Stamp::of(&st))
            .map_err(|e| context(e.into(), format!("cannot stat {}", self.path.display())))
    }

    /// Attributes of the entry `name` (a symlink is not followed); `None` if there is none.
    pub fn stat_entry(&self, name: &str) -> io::Result<Option<(Stamp, SFlag)>> {
        stat_at(&self.fd, name, &self.path)
    }

    /// The content of the regular file `name` and its attributes as read; `None` if there is
    /// no such entry. Anything else than a regular file of at most [`MAX_RECORD_BYTES`] is an
    /// error naming it, and is neither followed nor waited for.
    pub fn read(&self, name: &str) -> io::Result<Option<(Vec<u8>, Stamp)>> {
        let path = || self.path.join(name);
        let flags = OFlag::O_RDONLY
            | OFlag::O_NOFOLLOW
            | OFlag::O_NONBLOCK
            | OFlag::O_NOCTTY
            | OFlag::O_CLOEXEC;
        let fd = match openat(&self.fd, name, flags, Mode::empty()) {
            Ok(fd) => fd,
            Err(Errno::ENOENT) => return Ok(None),
            // ELOOP: a symlink (O_NOFOLLOW); ENXIO: a socket.
            Err(Errno::ELOOP | Errno::ENXIO) => return Err(self.not_a_file(name)),
            Err(e) => {
                return Err(context(
                    e.into(),
                    format!("cannot open {}", path().display()),
                ));
            }
        };
        let st = fstat(&fd)
            .map_err(|e| context(e.into(), format!("cannot stat {}", path().display())))?;
        if st.st_mode & SFlag::S_IFMT.bits() != SFlag::S_IFREG.bits() {
            return Err(self.not_a_file(name));
        }
        if st.st_size as u64 > MAX_RECORD_BYTES {
            return Err(too_large(&path()));
        }
        let mut bytes = Vec::with_capacity(st.st_size as usize);
        File::from(fd)
            .take(MAX_RECORD_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| context(e, format!("cannot read {}", path().display())))?;
        if bytes.len() as u64 > MAX_RECORD_BYTES {
            return Err(too_large(&path()));
        }
        Ok(Some((bytes, Stamp::of(&st))))
    }

    fn not_a_file(&self, name: &str) -> io::Error {
        let what = match self.stat_entry(name) {
            Ok(Some((_, kind))) => kind_name(kind),
            _ => "not a regular file",
        };
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{} is {what}, not a record file; it is neither followed nor read",
                self.path.join(name).display()
            ),
        )
    }

    /// The names in the directory that are UTF-8 (record names are), with their types.
    pub fn list(&self) -> io::Result<Vec<Listed>> {
        let fail = |e: Errno| context(e.into(), format!("cannot list {}", self.path.display()));
        // A descriptor of its own, so listings don't share a directory offset.
        let fd = openat(
            &self.fd,
            ".",
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(fail)?;
        let mut dir = Dir::from_fd(fd).map_err(fail)?;
        let mut out = Vec::new();
        for entry in dir.iter() {
            let entry = entry.map_err(fail)?;
            let Ok(name) = std::str::from_utf8(entry.file_name().to_bytes()) else {
                continue;
            };
            if name == "." || name == ".." {
                continue;
            }
            out.push(Listed {
                name: name.to_owned(),
                regular: entry.file_type().map(|t| t == Type::File),
            });
        }
        Ok(out)
    }

    /// Writes `bytes` into the new file `tmp` (created with `O_EXCL | O_NOFOLLOW`, mode 0666
    /// less the umask) and fsyncs it.
    pub fn create(&self, tmp: &str, bytes: &[u8]) -> io::Result<()> {
        let fd = openat(
            &self.fd,
            tmp,
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o666),
        )
        .map_err(|e| context(e.into(), format!("cannot create {}", self.show(tmp))))?;
        let mut file = File::from(fd);
        file.write_all(bytes)
            .and_then(|()| file.sync_all())
            .map_err(|e| context(e, format!("cannot write {}", self.show(tmp))))
    }

    /// Renames `from` over `to`, both in this directory; what `to` was (a symlink too) is
    /// replaced, never followed.
    pub fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        renameat(&self.fd, from, &self.fd, to).map_err(|e| {
            let e = match e {
                Errno::EISDIR | Errno::ENOTEMPTY | Errno::EEXIST => {
                    return io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!(
                            "cannot replace {}: it is a directory, not a record file",
                            self.show(to)
                        ),
                    );
                }
                e => e,
            };
            context(e.into(), format!("cannot replace {}", self.show(to)))
        })
    }

    /// Removes the entry `name` (a symlink itself, never its target); false if there was none.
    pub fn remove(&self, name: &str) -> io::Result<bool> {
        match unlinkat(&self.fd, name, UnlinkatFlags::NoRemoveDir) {
            Ok(()) => Ok(true),
            Err(Errno::ENOENT) => Ok(false),
            Err(e) => Err(context(
                e.into(),
                format!("cannot remove {}", self.show(name)),
            )),
        }
    }

    /// Makes the directory's entries durable.
    pub fn sync(&self) -> io::Result<()> {
        fsync(&self.fd)
            .map_err(|e| context(e.into(), format!("cannot fsync {}", self.path.display())))
    }

    fn show(&self, name: &str) -> String {
        self.path.join(name).display().to_string()
    }
}

fn too_large(path: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!(
            "{} is larger than {} MiB, too large for a record",
            path.display(),
            MAX_RECORD_BYTES >> 20
        ),
    )
}

/// `err` with what was being done in front of it; the kind is kept.
pub fn context(err: io::Error, what: String) -> io::Error {
    io::Error::new(err.kind(), format!("{what}: {err}"))
}
