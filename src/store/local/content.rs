//! The local store's files as the core sees them: committed content (an open file and the
//! attributes of the version it was opened at) and working copies (a file in the staging
//! area, discarded when dropped uncommitted).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nix::errno::Errno;
use nix::fcntl::{FallocateFlags, fallocate};

use super::staging::StagingArea;
use crate::store::{
    Content, CopyStat, FileId, Kind, LocalFile, Meta, Version, WorkingCopy, off_t_range,
};

/// Committed content backed by an open local file, with its attributes read once.
pub struct LocalContent {
    pub(super) file: File,
    pub(super) meta: Meta,
    /// The file object: device and inode number.
    dev: u64,
    ino: u64,
}

impl LocalContent {
    pub fn new(file: File, st: &libc::stat) -> LocalContent {
        LocalContent {
            file,
            meta: meta_of(st),
            dev: st.st_dev,
            ino: st.st_ino,
        }
    }

    /// The file object this content was opened from: (device, inode number).
    pub(super) fn ident(&self) -> (u64, u64) {
        (self.dev, self.ino)
    }

    /// Whether a read of `len` bytes at `offset` reads the file as it is now, to its end,
    /// rather than this version's bytes only: for a file with several names (hard links).
    /// Every commit of such a file rewrites it in place (see `commit`), so its readers read it
    /// as it is rewritten, as on a local disk. A file linked since it was opened is seen as
    /// linked once a read reaches this version's end: a second link then is a hard link, or
    /// the crash marker of a change under way, which holds the file's `flock` (then: not
    /// linked, for now). The link count of an open or a commit is counted after any marker is
    /// gone.
    fn linked(&self, offset: u64, len: usize) -> io::Result<bool> {
        if self.meta.nlink > 1 {
            return Ok(true);
        }
        if offset + len as u64 <= self.meta.size || self.file.metadata()?.nlink() <= 1 {
            return Ok(false);
        }
        let fd = self.file.as_raw_fd();
        // SAFETY: a valid descriptor; flock touches no memory.
        if unsafe { libc::flock(fd, libc::LOCK_SH | libc::LOCK_NB) } != 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EWOULDBLOCK | libc::EINTR) => Ok(false),
                _ => Err(e),
            };
        }
        let now = self.file.metadata();
        // SAFETY: as above.
        unsafe { libc::flock(fd, libc::LOCK_UN) };
        Ok(now?.nlink() > 1)
    }

    /// Reads at `offset`, nothing at or past `end`.
    fn read_before(&self, buf: &mut [u8], offset: u64, end: u64) -> io::Result<usize> {
        let left = end.saturating_sub(offset);
        let len = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        if len == 0 {
            return Ok(0);
        }
        self.file.read_at(&mut buf[..len], offset)
    }

    /// The file's size now, if no append (or patch) is under way on it: its crash marker, a
    /// second link, exists from before the first byte is written until after the last (a file
    /// with no name left, replaced since, has no marker either). Two looks, since one `fstat`
    /// reads the link count and the size one after the other.
    fn settled_size(&self) -> io::Result<Option<u64>> {
        let first = self.file.metadata()?;
        let second = self.file.metadata()?;
        let settled = first.nlink() <= 1 && second.nlink() <= 1 && first.len() == second.len();
        Ok(settled.then_some(first.len()))
    }
}

impl LocalContent {
    /// The file's size once the append (or patch) under way on it is in: its appender holds
    /// the file's `flock` until then (moments; with `fsync`, a few milliseconds). The kernel
    /// may have been shown the longer size already (a `stat` during the append), and a read
    /// answered short of it leaves it zeros in its cached page. `None` when the marker outlived
    /// its process (the next start undoes that append).
    fn size_once_settled(&self) -> io::Result<Option<u64>> {
        super::flock_waiting(&self.file, libc::LOCK_SH)?;
        let size = self.settled_size();
        // SAFETY: a valid descriptor; flock touches no memory.
        unsafe { libc::flock(self.file.as_raw_fd(), libc::LOCK_UN) };
        size
    }
}

impl Content for LocalContent {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        if self.linked(offset, buf.len())? {
            return self.file.read_at(buf, offset);
        }
        // Only this version's bytes: a later in-place append may have grown the file.
        self.read_before(buf, offset, self.meta.size)
    }

    fn read_appended_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let end = offset + buf.len() as u64;
        if end <= self.meta.size {
            return self.read_at(buf, offset);
        }
        if self.linked(offset, buf.len())? {
            return self.file.read_at(buf, offset);
        }
        let size = match self.settled_size()? {
            Some(size) => size,
            None => self.size_once_settled()?.unwrap_or(0),
        };
        self.read_before(buf, offset, size.max(self.meta.size))
    }

    fn meta(&self) -> &Meta {
        &self.meta
    }

    fn local(&self) -> Option<LocalFile<'_>> {
        Some(LocalFile {
            file: &self.file,
            object: Version::from_words([self.dev, self.ino, 0, 0]),
        })
    }
}

/// A working copy: a file in this process's staging area.
pub struct LocalCopy {
    pub(super) file: File,
    /// Its name in the staging area.
    pub(super) name: String,
    staging: Arc<StagingArea>,
    /// Its name no longer holds this copy (a commit swapped it in): nothing to remove.
    consumed: AtomicBool,
    /// A hole was punched into it (`zero`): committed whole, never as a patch, whose redo
    /// after a crash could not tell the hole from ranges the writer left alone.
    pub(super) punched: AtomicBool,
}

impl LocalCopy {
    pub fn new(staging: Arc<StagingArea>) -> io::Result<LocalCopy> {
        let (file, name) = staging.new_file()?;
        Ok(LocalCopy {
            file,
            name,
            staging,
            consumed: AtomicBool::new(false),
            punched: AtomicBool::new(false),
        })
    }

    /// The copy was swapped in: its staging name now holds the replaced version (or
    /// nothing), which the commit takes care of.
    pub(super) fn consume(&self) {
        self.consumed.store(true, Ordering::Relaxed);
    }
}

impl Drop for LocalCopy {
    fn drop(&mut self) {
        if !self.consumed.load(Ordering::Relaxed)
            && let Err(e) = self.staging.remove(&self.name)
        {
            log::warn!("could not remove working copy {}: {e}", self.name);
        }
    }
}

impl WorkingCopy for LocalCopy {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.file.read_at(buf, offset)
    }

    fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(data, offset)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }

    fn zero(&self, offset: u64, len: u64) -> io::Result<()> {
        let (at, n) = off_t_range(offset, len)?;
        self.punched.store(true, Ordering::Relaxed);
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

    fn reserve(&self, offset: u64, len: u64) -> io::Result<()> {
        let (offset, len) = off_t_range(offset, len)?;
        // A staging filesystem that cannot preallocate is not an error: the space is then
        // taken as the data arrives.
        match fallocate(&self.file, FallocateFlags::FALLOC_FL_KEEP_SIZE, offset, len) {
            Err(Errno::EOPNOTSUPP) => Ok(()),
            other => Ok(other?),
        }
    }

    fn stat(&self) -> io::Result<CopyStat> {
        let st = fstat(&self.file)?;
        Ok(CopyStat {
            size: st.st_size as u64,
            blocks: st.st_blocks as u64,
            mtime: time(st.st_mtime, st.st_mtime_nsec),
            ctime: time(st.st_ctime, st.st_ctime_nsec),
        })
    }

    fn local_file(&self) -> Option<&File> {
        Some(&self.file)
    }
}

pub(super) fn time(secs: i64, nsecs: i64) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + Duration::new(secs as u64, nsecs as u32)
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs()) + Duration::from_nanos(nsecs as u64)
    }
}

/// The store's kind of a local file type (the `S_IFMT` bits of a mode).
pub(super) fn kind_of(mode: u32) -> Kind {
    match mode & libc::S_IFMT {
        libc::S_IFREG => Kind::File,
        libc::S_IFDIR => Kind::Dir,
        libc::S_IFLNK => Kind::Symlink,
        libc::S_IFIFO => Kind::Fifo,
        libc::S_IFSOCK => Kind::Socket,
        libc::S_IFBLK => Kind::BlockDevice,
        _ => Kind::CharDevice, // S_IFCHR, the only type left
    }
}

/// Attributes of an open file.
pub fn fstat(file: &File) -> io::Result<libc::stat> {
    Ok(nix::sys::stat::fstat(file)?)
}

/// Converts local attributes (`fstat`, `fstatat`) into the store's attribute type. The
/// version is the file object, its ctime and its size: a commit by exchange makes another
/// object, a patch or an append in place changes the ctime or the size (an append within one
/// clock tick changes the size).
pub fn meta_of(st: &libc::stat) -> Meta {
    let ctime_ns = (st.st_ctime as i128 * 1_000_000_000 + st.st_ctime_nsec as i128) as u64;
    Meta {
        kind: kind_of(st.st_mode),
        rdev: match st.st_mode & libc::S_IFMT {
            libc::S_IFBLK | libc::S_IFCHR => st.st_rdev,
            _ => 0,
        },
        size: st.st_size as u64,
        blocks: st.st_blocks as u64,
        perm: (st.st_mode & 0o7777) as u16,
        nlink: st.st_nlink as u32,
        uid: st.st_uid,
        gid: st.st_gid,
        atime: time(st.st_atime, st.st_atime_nsec),
        mtime: time(st.st_mtime, st.st_mtime_nsec),
        ctime: time(st.st_ctime, st.st_ctime_nsec),
        version: Version::from_words([st.st_dev, st.st_ino, ctime_ns, st.st_size as u64]),
        file_id: Some(FileId(st.st_dev, st.st_ino)),
        volatile: false,
    }
}
