//! The storage backend behind a space: a trait the filesystem core talks to, so an object store
//! can be added later without touching the core. Paths are relative to the space root (`""` is
//! the root itself) and never contain `.` or `..` components.

pub mod local;
pub mod meta;

use std::ffi::OsString;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use nix::errno::Errno;
use nix::fcntl::{FallocateFlags, fallocate};

/// The type of a stored entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    /// A named pipe: the kernel passes its data between processes; the store keeps its name.
    Fifo,
    /// The name of a Unix socket (`bind`); as for a FIFO, only the name is stored.
    Socket,
    /// Device nodes, when found in the backing store: shown as what they are (with their
    /// device number), never created by roomfs; the kernel refuses to open them (`nodev`).
    BlockDevice,
    CharDevice,
}

/// Attributes of a stored entry.
#[derive(Clone, Debug)]
pub struct Meta {
    pub kind: Kind,
    pub size: u64,
    pub blocks: u64,
    pub perm: u16,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub atime: SystemTime,
    pub mtime: SystemTime,
    pub ctime: SystemTime,
    /// The device number (`st_rdev`) of a device node; 0 for anything else.
    pub rdev: u64,
    /// Identity of the stored object (device, inode number, ctime in ns): changes whenever the
    /// committed content is replaced, so caches can tell whether they are stale.
    pub version: (u64, u64, i64),
    /// Generated on demand (the `.meta` view): the kernel must not cache its attributes.
    pub volatile: bool,
}

/// One directory entry as listed by the store.
#[derive(Clone, Debug)]
pub struct DirEntry {
    pub name: OsString,
    pub kind: Kind,
}

/// Attribute changes (`chmod`, `chown`, `utimens`); `None` leaves a field alone.
#[derive(Clone, Debug, Default)]
pub struct SetAttr {
    pub perm: Option<u16>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub atime: Option<TimeSpec>,
    pub mtime: Option<TimeSpec>,
}

/// A timestamp to set: a given time or "now".
#[derive(Clone, Copy, Debug)]
pub enum TimeSpec {
    Now,
    At(SystemTime),
}

/// How `rename` treats an existing target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RenameMode {
    /// Replace the target (POSIX `rename`).
    Replace,
    /// Fail with EEXIST if the target exists (`RENAME_NOREPLACE`).
    NoReplace,
    /// Swap source and target atomically (`RENAME_EXCHANGE`).
    Exchange,
}

/// Owner given to new entries; `None` keeps the daemon's own (when it cannot chown).
pub type Owner = Option<(u32, u32)>;

/// Committed content of a file, opened at one moment: later commits do not change what it reads.
pub trait Content: Send + Sync {
    /// Reads at `offset`; returns 0 at end of file.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;
    /// Attributes of this content as it was opened or committed (its identity and size).
    fn meta(&self) -> io::Result<Meta>;
    /// The local file behind this content, when there is one (fast copies, fsync).
    fn local_file(&self) -> Option<&File>;
    /// Reads at `offset` like `read_at`, and on past this version's end into what whole
    /// appends committed to it since (in place, see `append`), as `tail -f` expects.
    fn read_appended_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.read_at(buf, offset)
    }
}

/// Copies `len` bytes at `offset` of `src` to the same offset of `dst` (in the kernel when
/// `src` is a local file); stops early at the end of `src`.
pub fn copy_range(src: &dyn Content, dst: &File, offset: u64, len: u64) -> io::Result<()> {
    let end = offset + len;
    if let Some(file) = src.local_file() {
        let mut off_in = offset as i64;
        let mut off_out = offset as i64;
        while (off_in as u64) < end {
            let want = (end - off_in as u64).min(1 << 30) as usize;
            let n =
                nix::fcntl::copy_file_range(file, Some(&mut off_in), dst, Some(&mut off_out), want)
                    .map_err(io::Error::from)?;
            if n == 0 {
                break;
            }
        }
        return Ok(());
    }
    let mut buf = vec![0u8; len.min(1 << 20) as usize];
    let mut off = offset;
    while off < end {
        let want = (end - off).min(buf.len() as u64) as usize;
        let n = src.read_at(&mut buf[..want], off)?;
        if n == 0 {
            break;
        }
        std::os::unix::fs::FileExt::write_all_at(dst, &buf[..n], off)?;
        off += n as u64;
    }
    Ok(())
}

/// A private, writable working copy of a file on local disk. It becomes the file's content
/// only when committed.
#[derive(Debug)]
pub struct Staged {
    pub file: File,
    /// Its name in the store's staging area.
    pub name: String,
}

impl Staged {
    /// Attributes of the working copy as it is now.
    pub fn meta(&self) -> io::Result<Meta> {
        Ok(local::meta_of(&local::fstat(&self.file)?))
    }

    /// Allocates disk space for `offset..offset + len` without changing the size, so a full
    /// disk shows now rather than at a later write. A staging filesystem that cannot
    /// preallocate is not an error: the space is then taken as the data arrives.
    pub fn reserve(&self, offset: u64, len: u64) -> io::Result<()> {
        let (offset, len) = off_t_range(offset, len)?;
        match fallocate(&self.file, FallocateFlags::FALLOC_FL_KEEP_SIZE, offset, len) {
            Err(Errno::EOPNOTSUPP) => Ok(()),
            other => Ok(other?),
        }
    }

    /// Makes `offset..offset + len` read as zeros without changing the size: a hole where the
    /// staging filesystem can punch one, zeros written otherwise.
    pub fn zero(&self, offset: u64, len: u64) -> io::Result<()> {
        let (at, n) = off_t_range(offset, len)?;
        let punch = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
        match fallocate(&self.file, punch, at, n) {
            Err(Errno::EOPNOTSUPP) => {}
            other => return Ok(other?),
        }
        let zeros = vec![0u8; len.min(1 << 20) as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(zeros.len() as u64) as usize;
            self.file.write_all_at(&zeros[..n], offset + done)?;
            done += n as u64;
        }
        Ok(())
    }
}

/// `offset` and `len` as the `off_t`s of `fallocate(2)` (EFBIG past its range).
fn off_t_range(offset: u64, len: u64) -> io::Result<(libc::off_t, libc::off_t)> {
    let end = offset
        .checked_add(len)
        .filter(|&e| e <= libc::off_t::MAX as u64);
    match end {
        Some(_) => Ok((offset as libc::off_t, len as libc::off_t)),
        None => Err(io::Error::from_raw_os_error(libc::EFBIG)),
    }
}

/// Usage and capacity of the storage behind a space.
#[derive(Clone, Copy, Debug, Default)]
pub struct StoreStatfs {
    pub blocks: u64,
    pub bfree: u64,
    pub bavail: u64,
    pub files: u64,
    pub ffree: u64,
    pub bsize: u32,
    pub namelen: u32,
}

/// A storage backend holding one space.
pub trait Store: Send + Sync + 'static {
    /// Attributes of `path` (symlinks are not followed).
    fn stat(&self, path: &Path) -> io::Result<Meta>;
    /// Entries of the directory `path`, without `.` and `..`.
    fn list(&self, path: &Path) -> io::Result<Vec<DirEntry>>;
    /// Opens the committed content of the file at `path`.
    fn open(&self, path: &Path) -> io::Result<Arc<dyn Content>>;
    /// Creates an empty committed file (fails with EEXIST if `exclusive` and it exists).
    fn create(&self, path: &Path, perm: u16, owner: Owner, exclusive: bool) -> io::Result<Meta>;
    /// Makes a private working copy seeded with `seed` (or empty).
    fn stage(&self, seed: Option<&dyn Content>) -> io::Result<Staged>;
    /// Atomically replaces the content at `path` with `staged`, keeping the permissions and owner
    /// of the file it replaces; with `durable`, the data and the directory entry are on stable
    /// storage when this returns. Returns the committed content, or the working copy back on
    /// failure (so the caller can retry or discard it).
    fn commit(
        &self,
        staged: Staged,
        path: &Path,
        durable: bool,
    ) -> Result<Arc<dyn Content>, (io::Error, Staged)>;
    /// Drops a working copy that will never be committed.
    fn discard(&self, staged: Staged);
    /// Commits bytes appended to the file at `path` by adding `tail` to it in place, without a
    /// working copy. Only when the file still is exactly `base` (same object, same size) and
    /// nobody else is appending to it; readers of `base` keep reading only its bytes. `None`
    /// when this store or this moment does not allow it: the caller then commits a working copy.
    fn append(
        &self,
        base: &dyn Content,
        path: &Path,
        tail: &[u8],
    ) -> io::Result<Option<Arc<dyn Content>>> {
        let _ = (base, path, tail);
        Ok(None)
    }
    /// Whether an in-place change of the file at `path` (an `append` or `patch`) is under way
    /// right now, by this process or another: an append that found the file busy is worth
    /// trying again shortly.
    fn changing(&self, path: &Path) -> bool {
        let _ = path;
        false
    }
    /// Commits a large working copy by writing into the committed file at `path`, in place,
    /// only what the writer changed: the ranges `written` (below `base`'s size) and everything
    /// beyond `base`'s size. Only when the file still is exactly `base` and nobody else reads,
    /// appends to or patches it; with `durable`, as durable as `commit`. `None` when this store
    /// or this moment does not allow it: the caller then completes the working copy and
    /// commits it whole. `staged` stays the caller's to discard.
    fn patch(
        &self,
        base: &dyn Content,
        path: &Path,
        staged: &Staged,
        written: &[(u64, u64)],
        durable: bool,
    ) -> io::Result<Option<Arc<dyn Content>>> {
        let _ = (base, path, staged, written, durable);
        Ok(None)
    }
    /// Creates a FIFO or a socket's name (`kind` is `Fifo` or `Socket`). Stores that cannot
    /// keep such entries refuse with EPERM.
    fn mknod(&self, path: &Path, kind: Kind, perm: u16, owner: Owner) -> io::Result<Meta> {
        let _ = (path, kind, perm, owner);
        Err(io::Error::from_raw_os_error(libc::EPERM))
    }
    fn mkdir(&self, path: &Path, perm: u16, owner: Owner) -> io::Result<Meta>;
    fn rmdir(&self, path: &Path) -> io::Result<()>;
    fn unlink(&self, path: &Path) -> io::Result<()>;
    fn rename(&self, from: &Path, to: &Path, mode: RenameMode) -> io::Result<()>;
    fn symlink(&self, target: &Path, path: &Path, owner: Owner) -> io::Result<Meta>;
    fn readlink(&self, path: &Path) -> io::Result<PathBuf>;
    fn set_attr(&self, path: &Path, attr: &SetAttr) -> io::Result<Meta>;
    /// Makes the committed content of `path` and its directory entry durable.
    fn sync(&self, path: &Path) -> io::Result<()>;
    fn statfs(&self) -> io::Result<StoreStatfs>;
}
